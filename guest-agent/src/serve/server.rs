//! The server: routes requests to the protocol modules, counts them, and runs the
//! accept loop of each listener with a cap on open connections (one thread each).

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai_infer_protocol::{ModelInfo, TensorDesc};

use super::backend::{InferBackend, ModelCatalog, OutputTensor};
use super::error::ServeError;
use super::http::{self, Connection, Handler, Limits, Request, Response};
use super::listen::Listener;
use super::metrics::Metrics;
use super::options::infer_options;
use super::{oip, openai};
use crate::engine::InferOptions;

/// Server settings. Defaults: the default [`Limits`], 64 connections, the model list
/// asked again after 10 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeOptions {
    /// Per-request limits.
    pub limits: Limits,
    /// Most connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// How long a MODELS answer is reused.
    pub models_max_age: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            limits: Limits::default(),
            max_connections: 64,
            models_max_age: Duration::from_secs(10),
        }
    }
}

/// Most connections being refused at once (each gets a short thread to read its
/// request and answer 503); beyond that they are closed at once.
const MAX_REFUSING: usize = 16;

/// The inference HTTP server.
pub struct Server {
    backend: Arc<dyn InferBackend>,
    options: ServeOptions,
    catalog: ModelCatalog,
    metrics: Metrics,
    open: Arc<AtomicUsize>,
    refusing: Arc<AtomicUsize>,
}

/// Releases a slot of a connection counter when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn take_slot(counter: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
    if counter.fetch_add(1, Ordering::AcqRel) >= max {
        counter.fetch_sub(1, Ordering::AcqRel);
        return None;
    }
    Some(Slot(counter.clone()))
}

/// The path's segments, percent-decoded.
fn segments(path: &str) -> Result<Vec<String>, ServeError> {
    path.trim_start_matches('/')
        .split('/')
        .map(|s| {
            let mut out = Vec::with_capacity(s.len());
            let b = s.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'%' {
                    let hex = b
                        .get(i + 1..i + 3)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| {
                            ServeError::BadRequest(format!("bad escape in path {path:?}"))
                        })?;
                    out.push(hex);
                    i += 3;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            String::from_utf8(out)
                .map_err(|_| ServeError::BadRequest(format!("path {path:?} is not UTF-8")))
        })
        .collect()
}

/// The backend, counting each device outcome.
struct Counted<'a> {
    backend: &'a dyn InferBackend,
    metrics: &'a Metrics,
}

impl InferBackend for Counted<'_> {
    fn models(&self) -> Result<Vec<ModelInfo>, ServeError> {
        self.backend.models()
    }

    fn infer(
        &self,
        model: &ModelInfo,
        inputs: &[(TensorDesc, &[u8])],
        options: &InferOptions,
    ) -> Result<Vec<OutputTensor>, ServeError> {
        let r = self.backend.infer(model, inputs, options);
        match &r {
            Ok(_) => self.metrics.device_status("OK"),
            Err(ServeError::Device { status, .. }) => self.metrics.device_status(status.name()),
            Err(_) => self.metrics.device_status("not_completed"),
        }
        r
    }
}

/// Which API a route belongs to (they have different error bodies).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Oip,
    OpenAi,
    Plain,
}

impl Server {
    /// A server over `backend`.
    pub fn new(backend: Arc<dyn InferBackend>, options: ServeOptions) -> Self {
        Server {
            backend,
            options,
            catalog: ModelCatalog::new(options.models_max_age, Duration::from_secs(1)),
            metrics: Metrics::default(),
            open: Arc::new(AtomicUsize::new(0)),
            refusing: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The server's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn counted(&self) -> Counted<'_> {
        Counted {
            backend: &*self.backend,
            metrics: &self.metrics,
        }
    }

    fn model(&self, name: &str, version: Option<&str>) -> Result<ModelInfo, ServeError> {
        let model = self.catalog.find(&*self.backend, name)?;
        match version {
            Some(v) if v != oip::MODEL_VERSION => Err(ServeError::NotFound(format!(
                "model {name:?} has no version {v:?} (only {})",
                oip::MODEL_VERSION
            ))),
            _ => Ok(model),
        }
    }

    fn infer(
        &self,
        name: &str,
        version: Option<&str>,
        req: &Request,
    ) -> Result<Response, ServeError> {
        let options = infer_options(req)?;
        let model = self.model(name, version)?;
        let request = oip::parse_infer_request(&req.body, req.header(oip::HEADER_LENGTH))?;
        let inputs = oip::device_inputs(&model, &request)?;
        let selected = oip::selected_outputs(&model, &request)?;
        let refs: Vec<(TensorDesc, &[u8])> = inputs.iter().map(|(d, b)| (*d, &b[..])).collect();
        let outputs = self.counted().infer(&model, &refs, &options)?;
        oip::infer_response(&model, request.id.as_deref(), &selected, &outputs)
    }

    fn embeddings(&self, req: &Request) -> Result<Response, ServeError> {
        let options = infer_options(req)?;
        let request = openai::parse_request(&req.body)?;
        let model = self.catalog.find(&*self.backend, &request.model)?;
        openai::check_model(&model)?;
        let embeddings = openai::embed(&self.counted(), &model, &request.inputs, &options)?;
        Ok(Response::json(
            200,
            &openai::response(&request, &embeddings),
        ))
    }

    /// The route of `req`: its endpoint label for the metrics, its API, the method it
    /// takes, and what answers it.
    fn route(&self, req: &Request) -> (&'static str, Api, Result<Response, ServeError>) {
        let segs = match segments(&req.path) {
            Ok(s) => s,
            Err(e) => return ("other", Api::Plain, Err(e)),
        };
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let (endpoint, api, method) = match segs.as_slice() {
            ["v2"] => ("server_metadata", Api::Oip, "GET"),
            ["v2", "health", "live" | "ready"] => ("health", Api::Oip, "GET"),
            ["v2", "models", _] | ["v2", "models", _, "versions", _] => {
                ("model_metadata", Api::Oip, "GET")
            }
            ["v2", "models", _, "ready"] | ["v2", "models", _, "versions", _, "ready"] => {
                ("model_ready", Api::Oip, "GET")
            }
            ["v2", "models", _, "infer"] | ["v2", "models", _, "versions", _, "infer"] => {
                ("infer", Api::Oip, "POST")
            }
            ["v1", "embeddings"] => ("embeddings", Api::OpenAi, "POST"),
            ["metrics"] => ("metrics", Api::Plain, "GET"),
            _ => {
                let e = ServeError::NotFound(format!("no route {}", req.path));
                return ("other", Api::Plain, Err(e));
            }
        };
        if req.method != method {
            let e = ServeError::MethodNotAllowed(format!("{} takes {method}", req.path));
            return (endpoint, api, Err(e));
        }
        let version = match segs.as_slice() {
            ["v2", "models", _, "versions", v, ..] => Some(*v),
            _ => None,
        };
        let result = match segs.as_slice() {
            ["v2"] => Ok(Response::json(200, &oip::server_metadata())),
            ["v2", "health", "live"] => Ok(Response::new(200, "text/plain", Vec::new())),
            ["v2", "health", "ready"] => self
                .catalog
                .list(&*self.backend)
                .map(|_| Response::new(200, "text/plain", Vec::new())),
            ["v2", "models", name, .., "ready"] => self
                .model(name, version)
                .map(|_| Response::new(200, "text/plain", Vec::new())),
            ["v2", "models", name, .., "infer"] => self.infer(name, version, req),
            ["v2", "models", name, ..] => self
                .model(name, version)
                .map(|m| Response::json(200, &oip::model_metadata(&m))),
            ["v1", "embeddings"] => self.embeddings(req),
            _ => Ok(Response::new(
                200,
                "text/plain; version=0.0.4",
                self.metrics.render().into_bytes(),
            )),
        };
        (endpoint, api, result)
    }

    /// Serves connections from `listener` until accepting fails for good.
    pub fn serve(self: &Arc<Self>, listener: Listener) {
        loop {
            let conn = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors or memory: wait, the open connections go on.
                    log::warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            self.start_connection(conn);
        }
    }

    /// Serves connections from `listener` on a new thread.
    pub fn spawn(self: &Arc<Self>, listener: Listener) -> io::Result<std::thread::JoinHandle<()>> {
        let server = self.clone();
        std::thread::Builder::new()
            .name("serve-accept".into())
            .spawn(move || server.serve(listener))
    }

    fn start_connection(self: &Arc<Self>, conn: Box<dyn Connection>) {
        let server = self.clone();
        // A thread that cannot be spawned drops its closure, and with it the slot.
        if let Some(slot) = take_slot(&self.open, self.options.max_connections) {
            let spawned = std::thread::Builder::new()
                .name("serve-conn".into())
                .spawn(move || {
                    let _slot = slot;
                    let _open = server.metrics.connection_opened();
                    let mut conn = conn;
                    http::serve_connection(&mut *conn, &server.options.limits, &*server);
                });
            if let Err(e) = spawned {
                log::warn!("no thread for a new connection: {e}");
            }
            return;
        }
        self.metrics.connection_refused();
        let Some(slot) = take_slot(&self.refusing, MAX_REFUSING) else {
            return;
        };
        let _ = std::thread::Builder::new()
            .name("serve-refuse".into())
            .spawn(move || {
                let _slot = slot;
                refuse_busy(conn);
            });
    }
}

/// Answers 503 on a connection over the cap: reads what the client sent so far (so
/// closing does not reset the connection under the answer), writes, closes.
fn refuse_busy(mut conn: Box<dyn Connection>) {
    let mut scratch = [0u8; 16 << 10];
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = conn.read(&mut scratch);
    let mut r = Response::error(503, "too many connections; try again later");
    r.close = true;
    let mut bytes = r.head(false);
    bytes.extend_from_slice(&r.body);
    if conn.write_all(&bytes).is_ok() {
        http::linger(&mut *conn);
    }
}

impl Handler for Server {
    fn handle(&self, req: &Request) -> Response {
        let _in_flight = self.metrics.start();
        let start = Instant::now();
        let (endpoint, api, result) = self.route(req);
        let response = result.unwrap_or_else(|e| {
            let status = e.http_status();
            let mut r = match api {
                Api::OpenAi => Response::json(status, &openai::error_body(&e)),
                Api::Oip | Api::Plain => Response::error(status, &e.to_string()),
            };
            if let ServeError::MethodNotAllowed(_) = e {
                let allow = if endpoint == "infer" || endpoint == "embeddings" {
                    "POST"
                } else {
                    "GET"
                };
                r = r.with_header("Allow", allow);
            }
            r
        });
        self.metrics.record(
            endpoint,
            response.status,
            start.elapsed(),
            req.wire_bytes,
            response.body.len() as u64,
        );
        response
    }

    fn refused(&self, response: &Response, wire_bytes: u64) {
        self.metrics.record(
            "invalid",
            response.status,
            Duration::ZERO,
            wire_bytes,
            response.body.len() as u64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fake_models;
    use ai_infer_protocol::Status;
    use serde_json::{json, Value};
    use std::sync::Mutex;

    /// A backend that answers every INFER with a set outcome and can lose its device.
    struct Scripted {
        device_up: Mutex<bool>,
        outcome: Mutex<Result<(), Status>>,
    }

    impl InferBackend for Scripted {
        fn models(&self) -> Result<Vec<ModelInfo>, ServeError> {
            if *self.device_up.lock().unwrap() {
                Ok(fake_models())
            } else {
                Err(ServeError::Unavailable("device reset".into()))
            }
        }

        fn infer(
            &self,
            model: &ModelInfo,
            inputs: &[(TensorDesc, &[u8])],
            _: &InferOptions,
        ) -> Result<Vec<OutputTensor>, ServeError> {
            match *self.outcome.lock().unwrap() {
                Ok(()) => Ok(vec![OutputTensor {
                    desc: TensorDesc::produced(inputs[0].0.dtype, inputs[0].0.shape).unwrap(),
                    data: inputs[0].1.to_vec(),
                }]),
                Err(status) => Err(ServeError::from_device(status, None, &model.name)),
            }
        }
    }

    fn server() -> (Arc<Scripted>, Server) {
        let backend = Arc::new(Scripted {
            device_up: Mutex::new(true),
            outcome: Mutex::new(Ok(())),
        });
        let options = ServeOptions {
            models_max_age: Duration::ZERO,
            ..ServeOptions::default()
        };
        (backend.clone(), Server::new(backend, options))
    }

    fn request(method: &str, path: &str, body: &Value) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.to_string().into_bytes(),
            ..Request::default()
        }
    }

    #[test]
    fn device_outcomes_become_http_statuses_with_error_bodies() {
        let (backend, server) = server();
        let infer = request(
            "POST",
            "/v2/models/double/infer",
            &json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [2]}]}),
        );
        let embed = request(
            "POST",
            "/v1/embeddings",
            &json!({"input": "a", "model": "text-stats"}),
        );
        assert_eq!(server.handle(&infer).status, 200);
        for (status, code) in [
            (Status::QueueFull, 503),
            (Status::Deadline, 504),
            (Status::Throttled, 429),
            (Status::BackendError, 500),
            (Status::BadTensor, 400),
            (Status::ModelNotAllowed, 404),
        ] {
            *backend.outcome.lock().unwrap() = Err(status);
            let r = server.handle(&infer);
            assert_eq!(r.status, code, "{status:?}");
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            assert!(v["error"].as_str().unwrap().contains(status.name()), "{v}");
            let r = server.handle(&embed);
            assert_eq!(r.status, code, "{status:?}");
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains(status.name()),
                "{v}"
            );
        }
        let m = server.metrics();
        assert_eq!(m.requests("infer", 504), 1);
        assert_eq!(m.requests("embeddings", 503), 1);
        assert!(m
            .render()
            .contains("ai_agent_device_requests_total{status=\"DEADLINE\"} 2"));
    }

    #[test]
    fn readiness_follows_the_device() {
        let (backend, server) = server();
        let ready = request("GET", "/v2/health/ready", &Value::Null);
        let live = request("GET", "/v2/health/live", &Value::Null);
        let model = request("GET", "/v2/models/double/ready", &Value::Null);
        assert_eq!(server.handle(&ready).status, 200);
        assert_eq!(server.handle(&model).status, 200);
        *backend.device_up.lock().unwrap() = false;
        assert_eq!(server.handle(&ready).status, 503);
        assert_eq!(server.handle(&model).status, 503);
        assert_eq!(server.handle(&live).status, 200);
        *backend.device_up.lock().unwrap() = true;
        assert_eq!(server.handle(&ready).status, 200);
    }

    #[test]
    fn paths_are_percent_decoded() {
        assert_eq!(
            segments("/v2/models/a%20b").unwrap(),
            vec!["v2", "models", "a b"]
        );
        assert!(segments("/v2/models/a%2").is_err());
        assert!(segments("/v2/models/a%zz").is_err());
        assert!(segments("/v2/models/%ff").is_err());
    }

    #[test]
    fn connection_slots_are_capped_and_released() {
        let c = Arc::new(AtomicUsize::new(0));
        let a = take_slot(&c, 2).unwrap();
        let _b = take_slot(&c, 2).unwrap();
        assert!(take_slot(&c, 2).is_none());
        drop(a);
        assert!(take_slot(&c, 2).is_some());
        assert_eq!(c.load(Ordering::SeqCst), 1);
    }
}
