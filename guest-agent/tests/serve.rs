//! `ai-agent serve` end to end: the HTTP server over real TCP sockets, in front of
//! the agent API on the fake ai_infer device (direct and daemon mode), with many
//! concurrent clients and hostile ones.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai_infer_protocol::{DType, PriorityClass, TensorDesc};
use guest_agent::api::Agent;
use guest_agent::engine::InferOptions;
use guest_agent::ipc::DaemonClient;
use guest_agent::serve::{Limits, ListenAddr, Listener, ServeOptions, Server};
use guest_agent::testing::{fake_daemon, fake_engine, FakeDeviceBehaviour, FakeVirtioPci};
use serde_json::{json, Value};

/// A server on 127.0.0.1 over `agent`; returns its address.
fn start(agent: Agent, options: ServeOptions) -> (SocketAddr, Arc<Server>) {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let ListenAddr::Tcp(addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let server = Arc::new(Server::new(Arc::new(agent), options));
    server.spawn(listener).unwrap();
    (addr.parse().unwrap(), server)
}

fn direct_server(options: ServeOptions) -> (FakeVirtioPci, SocketAddr, Arc<Server>) {
    let (fake, engine) = fake_engine(FakeDeviceBehaviour::default());
    let (addr, server) = start(Agent::from_engine(engine), options);
    (fake, addr, server)
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads one response from `s` (Content-Length framed).
fn read_reply(s: &mut TcpStream) -> std::io::Result<Reply> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0; len];
    s.read_exact(&mut body)?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn send(s: &mut TcpStream, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).unwrap();
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// One request on a new connection.
fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut s = connect(addr);
    send(&mut s, method, path, headers, body);
    read_reply(&mut s).unwrap()
}

fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    call(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// What the agent API itself gives for one input of `model` (on its own fake device).
fn direct(model: &str, desc: TensorDesc, data: &[u8]) -> Vec<u8> {
    let (_fake, engine) = fake_engine(FakeDeviceBehaviour::default());
    let agent = Agent::from_engine(engine);
    let m = agent.find_model(model).unwrap();
    let mut input = agent.ai_alloc(data.len(), 0).unwrap();
    input.as_mut_slice().copy_from_slice(data);
    let out_desc = TensorDesc::output(DType::F32, &[1, 0], 4096).unwrap();
    let mut output = agent.ai_alloc(4096, 0).unwrap();
    let r = agent
        .ai_infer(
            m.id,
            &[(desc, &input)],
            &mut [(out_desc, &mut output)],
            &InferOptions::default(),
        )
        .unwrap();
    assert_eq!(r.status, ai_infer_protocol::Status::Ok);
    output.as_slice()[..r.outputs[0].data_len as usize].to_vec()
}

fn metric(addr: SocketAddr, series: &str) -> f64 {
    let r = call(addr, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn health_metadata_and_json_infer_match_the_direct_api() {
    let (_fake, addr, _server) = direct_server(ServeOptions::default());
    assert_eq!(call(addr, "GET", "/v2/health/live", &[], b"").status, 200);
    assert_eq!(call(addr, "GET", "/v2/health/ready", &[], b"").status, 200);
    let v = call(addr, "GET", "/v2", &[], b"").json();
    assert_eq!(v["extensions"], json!(["binary_tensor_data"]));
    let meta = call(addr, "GET", "/v2/models/double", &[], b"").json();
    assert_eq!(
        meta,
        json!({"name": "double", "versions": ["1"], "platform": "ai_infer",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, -1]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, -1]}]})
    );
    assert_eq!(
        call(addr, "GET", "/v2/models/double/versions/1", &[], b"").json(),
        meta
    );
    assert_eq!(
        call(addr, "GET", "/v2/models/double/ready", &[], b"").status,
        200
    );
    assert_eq!(
        call(addr, "GET", "/v2/models/nope/ready", &[], b"").status,
        404
    );

    let x = [0.5f32, -1.25, 3.0, 7.75];
    let r = post_json(
        addr,
        "/v2/models/double/infer",
        &json!({"id": "q1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x}]}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["id"], "q1");
    assert_eq!(v["model_name"], "double");
    let out = &v["outputs"][0];
    assert_eq!(
        (out["name"].as_str(), out["datatype"].as_str()),
        (Some("y"), Some("FP32"))
    );
    assert_eq!(out["shape"], json!([1, 4]));
    let got: Vec<f32> = out["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let want = from_f32s(&direct(
        "double",
        TensorDesc::input(DType::F32, &[1, 4]).unwrap(),
        &f32s(&x),
    ));
    assert_eq!(got, want);
}

#[test]
fn binary_tensors_in_and_out() {
    let (_fake, addr, _server) = direct_server(ServeOptions::default());
    let x = [1.5f32, 2.5, -3.5];
    let header = json!({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": 12}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": true}}]
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(f32s(&x));
    let len = header.len().to_string();
    let r = call(
        addr,
        "POST",
        "/v2/models/double/infer",
        &[
            ("Content-Type", "application/octet-stream"),
            ("Inference-Header-Content-Length", &len),
        ],
        &body,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("Content-Type"), Some("application/octet-stream"));
    let n: usize = r
        .header("Inference-Header-Content-Length")
        .unwrap()
        .parse()
        .unwrap();
    let v: Value = serde_json::from_slice(&r.body[..n]).unwrap();
    assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 12);
    let want = direct(
        "double",
        TensorDesc::input(DType::F32, &[1, 3]).unwrap(),
        &f32s(&x),
    );
    assert_eq!(&r.body[n..], &want[..]);

    // JSON in, every output binary through the request parameter.
    let r = post_json(
        addr,
        "/v2/models/text-stats/infer",
        &json!({"parameters": {"binary_data_output": true},
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let n: usize = r
        .header("Inference-Header-Content-Length")
        .unwrap()
        .parse()
        .unwrap();
    let want = direct(
        "text-stats",
        TensorDesc::input(DType::U8, &[5]).unwrap(),
        b"hello",
    );
    assert_eq!(&r.body[n..], &want[..]);
}

#[test]
fn errors_have_the_protocol_bodies_and_statuses() {
    let (_fake, addr, _server) = direct_server(ServeOptions {
        limits: Limits {
            max_body_bytes: 4096,
            ..Limits::default()
        },
        ..ServeOptions::default()
    });
    let input =
        json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]});
    let cases: Vec<(Reply, u16)> = vec![
        (post_json(addr, "/v2/models/nope/infer", &input), 404),
        (
            post_json(addr, "/v2/models/double/versions/2/infer", &input),
            404,
        ),
        (call(addr, "GET", "/v2/models/nope", &[], b""), 404),
        (
            call(addr, "POST", "/v2/models/double/infer", &[], b"{not json"),
            400,
        ),
        (
            post_json(
                addr,
                "/v2/models/double/infer",
                &json!({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}]}),
            ),
            400,
        ),
        (
            post_json(
                addr,
                "/v2/models/double/infer",
                &json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2]}]}),
            ),
            400,
        ),
        (call(addr, "GET", "/v2/models/double/infer", &[], b""), 405),
        (call(addr, "GET", "/nowhere", &[], b""), 404),
        (
            call(
                addr,
                "POST",
                "/v2/models/double/infer",
                &[("X-Priority", "urgent")],
                input.to_string().as_bytes(),
            ),
            400,
        ),
        (
            call(
                addr,
                "POST",
                "/v2/models/double/infer",
                &[],
                &vec![b' '; 5000],
            ),
            413,
        ),
    ];
    for (i, (r, status)) in cases.iter().enumerate() {
        assert_eq!(
            r.status,
            *status,
            "case {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            r.json()["error"].is_string(),
            "case {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert_eq!(cases[6].0.header("Allow"), Some("POST"));
    // OpenAI routes answer in OpenAI's error format.
    let r = post_json(
        addr,
        "/v1/embeddings",
        &json!({"input": "x", "model": "nope"}),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = post_json(
        addr,
        "/v1/embeddings",
        &json!({"input": "x", "model": "double"}),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not a text embedding model"));
}

#[test]
fn priority_and_deadline_headers_reach_the_device() {
    let (fake, addr, _server) = direct_server(ServeOptions::default());
    let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}]})
        .to_string();
    for (prio, deadline, want) in [
        ("interactive", "250", (PriorityClass::Interactive, 250_000)),
        ("batch", "0", (PriorityClass::Batch, 0)),
        ("standard", "7", (PriorityClass::Normal, 7_000)),
    ] {
        fake.state().infer_options.clear();
        let r = call(
            addr,
            "POST",
            "/v2/models/double/infer",
            &[("X-Priority", prio), ("X-Deadline-Ms", deadline)],
            body.as_bytes(),
        );
        assert_eq!(r.status, 200);
        assert_eq!(fake.state().infer_options, vec![want]);
    }
    fake.state().infer_options.clear();
    let r = post_json(
        addr,
        "/v1/embeddings",
        &json!({"input": ["a", "b"], "model": "text-stats"}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        fake.state().infer_options,
        vec![(PriorityClass::Normal, 0); 2]
    );
}

#[test]
fn embeddings_in_float_and_base64() {
    let (_fake, addr, _server) = direct_server(ServeOptions::default());
    let texts = ["hello world", "a", "The quick brown fox."];
    let r = post_json(
        addr,
        "/v1/embeddings",
        &json!({"input": texts, "model": "text-stats"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "text-stats");
    assert_eq!(v["usage"]["prompt_tokens"], json!(4 + 3 + 7));
    for (i, t) in texts.iter().enumerate() {
        let d = &v["data"][i];
        assert_eq!(
            (d["object"].as_str(), d["index"].as_u64()),
            (Some("embedding"), Some(i as u64))
        );
        let got: Vec<f32> = d["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let want = from_f32s(&direct(
            "text-stats",
            TensorDesc::input(DType::U8, &[t.len() as u64]).unwrap(),
            t.as_bytes(),
        ));
        assert_eq!(got, want, "{t}");
    }
    let r = post_json(
        addr,
        "/v1/embeddings",
        &json!({"input": "hello", "model": "text-stats", "encoding_format": "base64"}),
    );
    assert_eq!(r.status, 200);
    // "hello": 5 bytes, sum 532, first 'h' 104, last 'o' 111.
    let want = guest_agent::serve::openai::base64(&f32s(&[5.0, 532.0, 104.0, 111.0]));
    assert_eq!(r.json()["data"][0]["embedding"], json!(want));
}

/// 16 clients at once, each on its own kept-alive connection with its own inputs:
/// every answer is that client's, as the direct API computes it.
#[test]
fn concurrent_clients_get_their_own_answers() {
    let (_fake, addr, _server) = direct_server(ServeOptions::default());
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 12;
    let before = metric(
        addr,
        "ai_agent_http_requests_total{endpoint=\"infer\",code=\"200\"}",
    );
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            std::thread::spawn(move || {
                let mut s = connect(addr);
                for round in 0..ROUNDS {
                    if round % 3 == 2 {
                        let text = format!("client {c} round {round}");
                        send(&mut s, "POST", "/v1/embeddings", &[], json!({"input": text, "model": "text-stats"}).to_string().as_bytes());
                        let r = read_reply(&mut s).unwrap();
                        assert_eq!(r.status, 200);
                        let got: Vec<f32> = r.json()["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
                        let sum: u32 = text.bytes().map(u32::from).sum();
                        assert_eq!(got, vec![text.len() as f32, sum as f32, b'c' as f32, text.as_bytes()[text.len() - 1] as f32]);
                    } else {
                        let x: Vec<f32> = (0..=(c % 5)).map(|i| (c * 100 + round * 10 + i) as f32).collect();
                        let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, x.len()], "data": x}]});
                        send(&mut s, "POST", "/v2/models/double/infer", &[], body.to_string().as_bytes());
                        let r = read_reply(&mut s).unwrap();
                        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                        let got: Vec<f32> = r.json()["outputs"][0]["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
                        let want: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
                        assert_eq!(got, want, "client {c} round {round}");
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let infer = metric(
        addr,
        "ai_agent_http_requests_total{endpoint=\"infer\",code=\"200\"}",
    );
    assert_eq!(infer - before, (CLIENTS * ROUNDS * 2 / 3) as f64);
    let emb = metric(
        addr,
        "ai_agent_http_requests_total{endpoint=\"embeddings\",code=\"200\"}",
    );
    assert_eq!(emb, (CLIENTS * ROUNDS / 3) as f64);
    assert_eq!(
        metric(addr, "ai_agent_device_requests_total{status=\"OK\"}"),
        (CLIENTS * ROUNDS) as f64
    );
    assert!(metric(addr, "ai_agent_http_request_bytes_total") > 0.0);
    assert!(metric(addr, "ai_agent_http_connections_total") >= CLIENTS as f64);
    assert_eq!(
        metric(
            addr,
            "ai_agent_http_request_duration_seconds_count{endpoint=\"infer\"}"
        ),
        infer
    );
}

/// Garbage, a huge Content-Length, a slow client and a silent one do not delay a
/// well-behaved client, and each gets its 4xx (or is dropped).
#[test]
fn hostile_clients_do_not_disturb_a_good_one() {
    let (_fake, addr, _server) = direct_server(ServeOptions {
        limits: Limits {
            request_timeout: Duration::from_millis(800),
            idle_timeout: Duration::from_secs(2),
            ..Limits::default()
        },
        ..ServeOptions::default()
    });
    let hostile: Vec<std::thread::JoinHandle<Option<u16>>> = vec![
        // Garbage bytes.
        std::thread::spawn(move || {
            let mut s = connect(addr);
            let junk: Vec<u8> = (0..4000u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect();
            let _ = s.write_all(&junk);
            read_reply(&mut s).ok().map(|r| r.status)
        }),
        // A body far over the limit, announced.
        std::thread::spawn(move || {
            let mut s = connect(addr);
            let _ = s.write_all(
                b"POST /v2/models/double/infer HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
            );
            read_reply(&mut s).ok().map(|r| r.status)
        }),
        // Slowloris: a byte of head every 200 ms, never finishing.
        std::thread::spawn(move || {
            let mut s = connect(addr);
            for b in b"GET /v2/health/live HTTP/1.1\r\nX-Slow: "
                .iter()
                .cycle()
                .take(30)
            {
                // Stop once the server has answered.
                s.set_nonblocking(true).unwrap();
                let answered = matches!(s.peek(&mut [0u8]), Ok(n) if n > 0);
                s.set_nonblocking(false).unwrap();
                if answered || s.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            read_reply(&mut s).ok().map(|r| r.status)
        }),
        // Announces a body and never sends it.
        std::thread::spawn(move || {
            let mut s = connect(addr);
            let _ = s.write_all(
                b"POST /v2/models/double/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{",
            );
            read_reply(&mut s).ok().map(|r| r.status)
        }),
        // Connects and says nothing.
        std::thread::spawn(move || {
            let mut s = connect(addr);
            read_reply(&mut s).ok().map(|r| r.status)
        }),
    ];
    // Meanwhile a good client is served promptly, every time.
    let body =
        json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]})
            .to_string();
    let mut s = connect(addr);
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    while start.elapsed() < Duration::from_millis(1500) {
        let t = Instant::now();
        send(
            &mut s,
            "POST",
            "/v2/models/double/infer",
            &[],
            body.as_bytes(),
        );
        let r = read_reply(&mut s).unwrap();
        assert_eq!(r.status, 200);
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a request took {slowest:?}"
    );
    let statuses: Vec<Option<u16>> = hostile.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(statuses[0], Some(400), "garbage");
    assert_eq!(statuses[1], Some(413), "huge Content-Length");
    assert_eq!(statuses[2], Some(408), "slowloris");
    assert_eq!(statuses[3], Some(408), "missing body");
    assert_eq!(statuses[4], None, "silent client is closed");
    assert_eq!(
        metric(
            addr,
            "ai_agent_http_requests_total{endpoint=\"invalid\",code=\"400\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            addr,
            "ai_agent_http_requests_total{endpoint=\"invalid\",code=\"413\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            addr,
            "ai_agent_http_requests_total{endpoint=\"invalid\",code=\"408\"}"
        ),
        2.0
    );
}

#[test]
fn connections_over_the_cap_get_503_and_others_go_on() {
    let (_fake, addr, server) = direct_server(ServeOptions {
        max_connections: 2,
        ..ServeOptions::default()
    });
    let mut a = connect(addr);
    let mut b = connect(addr);
    // Both are being served (a request on each makes sure their threads run).
    for s in [&mut a, &mut b] {
        send(s, "GET", "/v2/health/live", &[], b"");
        assert_eq!(read_reply(s).unwrap().status, 200);
    }
    let r = call(addr, "GET", "/v2/health/live", &[], b"");
    assert_eq!(r.status, 503);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("too many connections"));
    // The open ones are unaffected.
    send(&mut a, "GET", "/v2/health/ready", &[], b"");
    assert_eq!(read_reply(&mut a).unwrap().status, 200);
    // Closing one frees its slot.
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = call(addr, "GET", "/v2/health/live", &[], b"");
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(a);
    let text = server.metrics().render();
    let refused: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("ai_agent_http_connections_refused_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refused >= 1.0, "{text}");
}

#[test]
fn daemon_mode_serves_the_same_answers() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("serve-daemon-{}", std::process::id()));
    let (_fake, socket) = fake_daemon(&dir, 4 << 20);
    let agent = Agent::from_client(DaemonClient::connect(&socket, 2 << 20).unwrap());
    let (addr, _server) = start(agent, ServeOptions::default());
    let workers: Vec<_> = (0..8)
        .map(|c| {
            std::thread::spawn(move || {
                let x = [c as f32, 1.5];
                let r = post_json(
                    addr,
                    "/v2/models/double/infer",
                    &json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": x}]}),
                );
                assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                let got: Vec<f64> = r.json()["outputs"][0]["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                assert_eq!(got, vec![2.0 * c as f64, 3.0]);
                let r = post_json(addr, "/v1/embeddings", &json!({"input": ["ab", "c"], "model": "text-stats"}));
                assert_eq!(r.status, 200);
                assert_eq!(r.json()["data"][1]["embedding"], json!([1.0, 99.0, 99.0, 99.0]));
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// vsock: binds on any CID; a connection through the loopback transport is served
/// when the host has one (`vsock_loopback`), else that part is skipped.
#[test]
fn vsock_listener_serves_when_a_transport_exists() {
    let listener = match Listener::bind(&ListenAddr::Vsock(u32::MAX)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("skipped: no AF_VSOCK on this host ({e})");
            return;
        }
    };
    let ListenAddr::Vsock(port) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    assert_ne!(port, u32::MAX);
    let (_fake, engine) = fake_engine(FakeDeviceBehaviour::default());
    let server = Arc::new(Server::new(
        Arc::new(Agent::from_engine(engine)),
        ServeOptions::default(),
    ));
    server.spawn(listener).unwrap();
    let mut s = match guest_agent::serve::vsock::VsockStream::connect(1, port) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skipped: no vsock loopback transport ({e})");
            return;
        }
    };
    s.write_all(b"GET /v2/health/live HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK"));
}

/// The `ai-agent serve` command itself, through the agent daemon (over the fake
/// device) as a guest runs it.
#[test]
fn the_command_serves_through_the_daemon() {
    use std::io::BufRead;
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("serve-cli-{}", std::process::id()));
    let (_fake, socket) = fake_daemon(&dir, 4 << 20);
    /// Stops the server however the test ends.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ai-agent"))
        .args([
            "serve",
            "--via-daemon",
            "--session-mb",
            "2",
            "--listen",
            "tcp:127.0.0.1:0",
        ])
        .arg("--socket")
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map(Running)
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on tcp:")
        .unwrap_or_else(|| panic!("{line:?}"))
        .parse()
        .unwrap();
    let r = post_json(
        addr,
        "/v2/models/double/infer",
        &json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [3, -1]}]}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["outputs"][0]["data"], json!([6.0, -2.0]));
    assert_eq!(call(addr, "GET", "/v2/health/ready", &[], b"").status, 200);
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}
