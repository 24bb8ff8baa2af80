//! Writes the seed corpus of every fuzz target into `corpus/<target>/`: a few small,
//! valid inputs each, encoded with the project's own encoders where it has them.
//!
//! `cargo run --example make_corpus` (inside fuzz/) rewrites the seeds; the files are
//! kept in the repository, so this is only needed when an input layout changes.

use std::fs;
use std::path::Path;

use ai_infer_protocol::{ChainLayout, DType, DeviceConfig, PriorityClass, Request, TensorDesc};
use aivmm_fuzz::api::{METHODS, PATHS};
use aivmm_fuzz::{encode_input, Guest, DATA_ADDR};
use devices::virtio::block::{parse_request, DiskLimits};
use devices::virtio::net::{gather_tx_frame, MAX_FRAME_LEN};
use devices::virtio::vsock::packet::{
    read_tx_packet, PacketHeader, OP_CREDIT_UPDATE, OP_REQUEST, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH,
    TYPE_STREAM,
};
use virtio_queue::QueueT;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

fn write(target: &str, seeds: &[(&str, Vec<u8>)]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds {
        assert!(
            bytes.len() < 4096,
            "{target}/{name} is {} bytes",
            bytes.len()
        );
        fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Guest memory contents from [`DATA_ADDR`]: `parts` are (address, bytes).
fn contents(parts: &[(u64, &[u8])]) -> Vec<u8> {
    let end = parts
        .iter()
        .map(|(addr, b)| (addr - DATA_ADDR) as usize + b.len())
        .max()
        .unwrap_or(0);
    let mut out = vec![0u8; end];
    for (addr, b) in parts {
        let at = (addr - DATA_ADDR) as usize;
        out[at..at + b.len()].copy_from_slice(b);
    }
    out
}

/// A descriptor table entry as the guest writes it.
fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    d
}

fn blk_header(request_type: u32, sector: u64) -> Vec<u8> {
    let mut h = request_type.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn virtio_blk() {
    const HDR: u64 = 0x1000;
    const SEG: u64 = 0x1010;
    const DATA: u64 = 0x1100;
    const STATUS: u64 = 0x1300;
    const TABLE: u64 = 0x1400;
    // Knobs: bit 0 read-only, bits 1-2 pick the capacity (2 = 128 sectors).
    const RW_128: u8 = 2 << 1;
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut s = sector.to_le_bytes().to_vec();
        s.extend_from_slice(&n.to_le_bytes());
        s.extend_from_slice(&flags.to_le_bytes());
        s
    };
    let three = |data_flags| {
        [
            (HDR, 16, NEXT, 1),
            (DATA, 512, data_flags | NEXT, 2),
            (STATUS, 1, WRITE, 0),
        ]
    };
    let mut indirect = raw_desc(HDR, 16, NEXT, 1);
    indirect.extend(raw_desc(DATA, 512, WRITE | NEXT, 2));
    indirect.extend(raw_desc(STATUS, 1, WRITE, 0));
    write(
        "virtio_blk_request",
        &[
            (
                "read",
                encode_input(
                    0,
                    RW_128,
                    &three(WRITE),
                    &contents(&[(HDR, &blk_header(0, 1))]),
                ),
            ),
            (
                "write-two-buffers",
                encode_input(
                    0,
                    RW_128,
                    &[
                        (HDR, 16, NEXT, 1),
                        (DATA, 256, NEXT, 2),
                        (DATA + 256, 256, NEXT, 3),
                        (STATUS, 1, WRITE, 0),
                    ],
                    &contents(&[(HDR, &blk_header(1, 3))]),
                ),
            ),
            (
                "flush",
                encode_input(
                    0,
                    RW_128,
                    &[(HDR, 16, NEXT, 1), (STATUS, 1, WRITE, 0)],
                    &contents(&[(HDR, &blk_header(4, 0))]),
                ),
            ),
            (
                "get-id",
                encode_input(
                    0,
                    RW_128,
                    &[
                        (HDR, 16, NEXT, 1),
                        (DATA, 20, WRITE | NEXT, 2),
                        (STATUS, 1, WRITE, 0),
                    ],
                    &contents(&[(HDR, &blk_header(8, 0))]),
                ),
            ),
            (
                "discard",
                encode_input(
                    0,
                    RW_128,
                    &[(HDR, 32, NEXT, 1), (STATUS, 1, WRITE, 0)],
                    &contents(&[(HDR, &blk_header(11, 0)), (SEG, &seg(8, 8, 0))]),
                ),
            ),
            (
                "write-zeroes-unmap",
                encode_input(
                    0,
                    RW_128,
                    &[
                        (HDR, 16, NEXT, 1),
                        (SEG, 16, NEXT, 2),
                        (STATUS, 1, WRITE, 0),
                    ],
                    &contents(&[(HDR, &blk_header(13, 0)), (SEG, &seg(0, 16, 1))]),
                ),
            ),
            (
                "read-indirect",
                encode_input(
                    0,
                    RW_128,
                    &[(TABLE, 48, INDIRECT, 0)],
                    &contents(&[(HDR, &blk_header(0, 2)), (TABLE, &indirect)]),
                ),
            ),
            (
                "write-read-only-disk",
                encode_input(
                    0,
                    RW_128 | 1,
                    &three(0),
                    &contents(&[(HDR, &blk_header(1, 0))]),
                ),
            ),
        ],
    );
}

fn virtio_net() {
    const FRAME: u64 = 0x1000;
    const TABLE: u64 = 0x1200;
    // A virtio-net header (12 bytes, no offloads) and a 60-byte Ethernet frame.
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x06, 0, 0xac, 0x10, 0, 2, 0x08, 0x06]);
    frame.resize(12 + 60, 0x5a);
    let mut indirect = raw_desc(FRAME, 12, NEXT, 1);
    indirect.extend(raw_desc(FRAME + 12, 60, 0, 0));
    write(
        "virtio_net_tx",
        &[
            (
                "one-buffer",
                encode_input(0, 0, &[(FRAME, 72, 0, 0)], &contents(&[(FRAME, &frame)])),
            ),
            (
                "header-then-packet",
                encode_input(
                    3,
                    0,
                    &[
                        (0, 0, 0, 0),
                        (0, 0, 0, 0),
                        (0, 0, 0, 0),
                        (FRAME, 12, NEXT, 4),
                        (FRAME + 12, 60, 0, 0),
                    ],
                    &contents(&[(FRAME, &frame)]),
                ),
            ),
            (
                "indirect",
                encode_input(
                    0,
                    0,
                    &[(TABLE, 32, INDIRECT, 0)],
                    &contents(&[(FRAME, &frame), (TABLE, &indirect)]),
                ),
            ),
            (
                "small-buffer",
                encode_input(0, 2, &[(FRAME, 72, 0, 0)], &contents(&[(FRAME, &frame)])),
            ),
        ],
    );
}

fn virtio_vsock() {
    const HDR: u64 = 0x1000;
    const PAYLOAD: u64 = 0x1100;
    const TABLE: u64 = 0x1200;
    let header = |op, len, flags| {
        PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 5000,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
        }
        .to_bytes()
    };
    let mut indirect = raw_desc(HDR, 44, NEXT, 1);
    indirect.extend(raw_desc(PAYLOAD, 5, 0, 0));
    write(
        "virtio_vsock_packet",
        &[
            (
                "request",
                encode_input(
                    0,
                    0,
                    &[(HDR, 44, 0, 0)],
                    &contents(&[(HDR, &header(OP_REQUEST, 0, 0))]),
                ),
            ),
            (
                "rw-payload",
                encode_input(
                    0,
                    0,
                    &[(HDR, 44, NEXT, 1), (PAYLOAD, 5, 0, 0)],
                    &contents(&[(HDR, &header(OP_RW, 5, 0)), (PAYLOAD, b"hello")]),
                ),
            ),
            (
                "header-split",
                encode_input(
                    0,
                    0,
                    &[(HDR, 30, NEXT, 1), (HDR + 30, 14, 0, 0)],
                    &contents(&[(HDR, &header(OP_CREDIT_UPDATE, 0, 0))]),
                ),
            ),
            (
                "shutdown",
                encode_input(
                    0,
                    0,
                    &[(HDR, 44, 0, 0)],
                    &contents(&[(HDR, &header(OP_SHUTDOWN, 0, SHUTDOWN_BOTH))]),
                ),
            ),
            (
                "rw-indirect",
                encode_input(
                    0,
                    0,
                    &[(TABLE, 32, INDIRECT, 0)],
                    &contents(&[
                        (HDR, &header(OP_RW, 5, 0)),
                        (PAYLOAD, b"world"),
                        (TABLE, &indirect),
                    ]),
                ),
            ),
        ],
    );
}

/// `writable_len` then the device-readable stream of a well-formed chain for `req`,
/// with `payload` bytes of payload area for MODELS and TRACE.
fn ai_chain(req: &Request, payload: u64) -> Vec<u8> {
    let layout = ChainLayout::new(req, payload).unwrap();
    let mut out = layout.writable_len.to_le_bytes().to_vec();
    let mut readable = vec![0u8; layout.readable_len as usize];
    req.encode(&mut readable).unwrap();
    // Input data: a recognisable pattern.
    for (i, b) in readable[req.encoded_len()..].iter_mut().enumerate() {
        *b = i as u8;
    }
    out.extend_from_slice(&readable);
    out
}

fn ai_infer() {
    let infer = Request::infer(
        42,
        7,
        vec![TensorDesc::input(DType::F32, &[1, 4]).unwrap()],
        vec![TensorDesc::output(DType::F32, &[1, 2], 8).unwrap()],
    )
    .unwrap();
    let tokens = Request::infer(
        43,
        3,
        vec![
            TensorDesc::input(DType::I64, &[1, 8]).unwrap(),
            TensorDesc::input(DType::I64, &[1, 8]).unwrap(),
        ],
        vec![TensorDesc::output(DType::F32, &[0, 16], 512).unwrap()],
    )
    .unwrap()
    .with_priority(PriorityClass::Interactive)
    .with_deadline_us(5000);
    write(
        "ai_infer_request",
        &[
            ("infer", ai_chain(&infer, 0)),
            ("infer-two-inputs", ai_chain(&tokens, 0)),
            ("models", ai_chain(&Request::models(1), 256)),
            (
                "trace",
                ai_chain(&Request::trace(2).with_priority(PriorityClass::Batch), 64),
            ),
            ("cancel", ai_chain(&Request::cancel(3, 42), 0)),
        ],
    );
}

/// One pci_config_space operation: kind (0-7), size index, offset, value.
fn pci_op(kind: u8, size: u8, offset: u16, value: u64) -> Vec<u8> {
    let mut op = vec![kind | size << 4];
    op.extend_from_slice(&offset.to_le_bytes());
    op.extend_from_slice(&value.to_le_bytes());
    op
}

fn pci() {
    // Kinds: 0 read_reg, 1 read_bytes, 2 write_reg, 3 read_table, 4 write_table,
    // 5 read_pba, 6 reset, 7 program a whole entry. Sizes: 0=1, 1=2, 2=4, 3=8 bytes.
    // Config offsets are register << 3 | byte.
    let cfg = |reg: u16, byte: u16| reg << 3 | byte;
    const MSIX_REG: u16 = 0x40 / 4;
    const VENDOR_REG: u16 = 0x4c / 4;
    let bar_sizing: Vec<u8> = [
        pci_op(2, 2, cfg(4, 0), 0xffff_ffff),
        pci_op(0, 2, cfg(4, 0), 0),
        pci_op(2, 2, cfg(5, 0), 0xffff_ffff),
        pci_op(0, 2, cfg(5, 0), 0),
        pci_op(2, 2, cfg(4, 0), 0xfe00_0000),
        pci_op(2, 2, cfg(5, 0), 0x1),
        pci_op(2, 2, cfg(7, 0), 0xc000),
        pci_op(2, 1, cfg(1, 0), 0x0007),
        pci_op(1, 2, cfg(4, 0), 0),
    ]
    .concat();
    let msix: Vec<u8> = [
        pci_op(4, 2, 0, 0xfee0_0000),
        pci_op(4, 2, 4, 0),
        pci_op(4, 2, 8, 0x4041),
        pci_op(4, 2, 12, 0),
        pci_op(2, 1, cfg(MSIX_REG, 2), 0x8000),
        pci_op(3, 3, 0, 0),
        pci_op(5, 3, 0, 0),
        pci_op(2, 1, cfg(MSIX_REG, 2), 0xc000),
        pci_op(2, 1, cfg(MSIX_REG, 2), 0),
    ]
    .concat();
    let entries: Vec<u8> = [
        pci_op(7, 0, 1, 0x0000_4042_fee0_1000),
        pci_op(7, 0, 2, 0x0000_4043_fee0_2000),
        pci_op(2, 2, cfg(MSIX_REG, 0), 0x8000_0000),
        pci_op(4, 3, 16, 0x1_0000_0000),
        pci_op(6, 0, 0, 0),
        pci_op(3, 2, 28, 0),
    ]
    .concat();
    let vendor: Vec<u8> = [
        pci_op(2, 0, cfg(VENDOR_REG + 1, 0), 0),
        pci_op(2, 2, cfg(VENDOR_REG + 2, 0), 0x40),
        pci_op(2, 2, cfg(VENDOR_REG + 3, 0), 4),
        pci_op(1, 2, cfg(VENDOR_REG + 4, 0), 0),
        pci_op(2, 1, cfg(1, 2), 0xf900),
        pci_op(2, 0, cfg(15, 0), 0x0a),
        pci_op(2, 2, cfg(3, 0), 0xffff_ffff),
    ]
    .concat();
    let extended: Vec<u8> = [
        pci_op(0, 2, cfg(0x100 / 4, 0), 0),
        pci_op(2, 2, cfg(0x100 / 4, 0), 0xffff_ffff),
        pci_op(0, 2, cfg(1023, 0), 0),
        pci_op(0, 2, cfg(1024, 0), 0),
        pci_op(1, 5, cfg(2, 1), 0),
    ]
    .concat();
    let with_setup = |setup: u8, ops: &[u8]| [&[setup][..], ops].concat();
    write(
        "pci_config_space",
        &[
            ("bar-sizing", with_setup(0, &bar_sizing)),
            ("msix-enable", with_setup(1, &msix)),
            ("msix-entries", with_setup(4, &entries)),
            ("vendor-cap-and-status", with_setup(2, &vendor)),
            ("extended", with_setup(0x80 | 5, &extended)),
        ],
    );
}

/// One api_request input: method index, path index, suffix and body.
fn api(method: u8, path: u8, suffix: &str, body: &str) -> Vec<u8> {
    let mut out = vec![method, path, suffix.len() as u8];
    out.extend_from_slice(suffix.as_bytes());
    out.extend_from_slice(body.as_bytes());
    out
}

fn api_requests() {
    // Methods: 0 GET, 1 PUT, 2 PATCH. Paths: indices into aivmm_fuzz::api::PATHS.
    write(
        "api_request",
        &[
            ("get-instance-info", api(0, 0, "", "")),
            ("get-machine-config-query", api(0, 2, "?x=1", "")),
            (
                "put-boot-source",
                api(
                    1,
                    5,
                    "",
                    r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
                ),
            ),
            (
                "put-machine-config",
                api(
                    1,
                    2,
                    "",
                    r#"{"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M"}"#,
                ),
            ),
            (
                "patch-machine-config",
                api(2, 2, "", r#"{"mem_size_mib": 512}"#),
            ),
            (
                "put-drive",
                api(
                    1,
                    6,
                    "rootfs",
                    r#"{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true, "is_read_only": false, "io_engine": "Sync", "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#,
                ),
            ),
            (
                "put-net",
                api(
                    1,
                    7,
                    "eth0",
                    r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}"#,
                ),
            ),
            (
                "put-vsock",
                api(1, 8, "", r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#),
            ),
            (
                "put-action",
                api(1, 11, "", r#"{"action_type": "InstanceStart"}"#),
            ),
            (
                "put-memory-zone",
                api(
                    1,
                    15,
                    "m0",
                    r#"{"id": "m0", "size_mib": 64, "backing": "hugetlb-2m", "host_node": 0}"#,
                ),
            ),
        ],
    );
}

/// Runs every seed through the parser its target feeds and prints the outcome, so a
/// seed that no longer reaches the accepting path shows up.
fn check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut targets: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    targets.sort();
    for target in targets {
        let name = target.file_name().unwrap().to_string_lossy().into_owned();
        let mut seeds: Vec<_> = fs::read_dir(&target)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        seeds.sort();
        for seed in seeds {
            let data = fs::read(&seed).unwrap();
            let outcome = match name.as_str() {
                "virtio_blk_request" => {
                    let mut g = Guest::from_fuzz(&data);
                    let disk = DiskLimits {
                        capacity_sectors: 128,
                        read_only: g.knobs & 1 != 0,
                    };
                    let chain = g.queue.pop_descriptor_chain(&g.mem).unwrap();
                    format!(
                        "{:?}",
                        parse_request(&g.mem, chain, &disk).map(|r| r.operation.name())
                    )
                }
                "virtio_net_tx" => {
                    let mut g = Guest::from_fuzz(&data);
                    let chain = g.queue.pop_descriptor_chain(&g.mem).unwrap();
                    let mut buf = vec![0u8; MAX_FRAME_LEN];
                    format!("{:?}", gather_tx_frame(&g.mem, chain, &mut buf))
                }
                "virtio_vsock_packet" => {
                    let mut g = Guest::from_fuzz(&data);
                    let chain = g.queue.pop_descriptor_chain(&g.mem).unwrap();
                    format!("{:?}", read_tx_packet(&g.mem, chain).map(|p| p.header.op))
                }
                "ai_infer_request" => {
                    let writable = u64::from_le_bytes(data[..8].try_into().unwrap());
                    let readable = &data[8..];
                    let req = Request::parse(readable, &DeviceConfig::default());
                    format!(
                        "{:?}",
                        req.and_then(|r| ChainLayout::from_chain(
                            &r,
                            readable.len() as u64,
                            writable
                        ))
                        .map(|l| l.writable_len)
                    )
                }
                "api_request" => {
                    let n = usize::from(data[2]);
                    let path = format!(
                        "{}{}",
                        PATHS[usize::from(data[1]) % PATHS.len()],
                        String::from_utf8_lossy(&data[3..3 + n])
                    );
                    let r = vmm::api::routes::parse(
                        METHODS[usize::from(data[0]) % METHODS.len()],
                        &path,
                        &data[3 + n..],
                    );
                    format!("{:?}", r.map(|r| r.metric()))
                }
                _ => "(no check)".to_string(),
            };
            println!(
                "{name}/{}: {outcome}",
                seed.file_name().unwrap().to_string_lossy()
            );
        }
    }
}

fn main() {
    virtio_blk();
    virtio_net();
    virtio_vsock();
    ai_infer();
    pci();
    api_requests();
    check();
}
