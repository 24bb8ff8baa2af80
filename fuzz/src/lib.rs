//! What the virtqueue fuzz targets share: a small guest memory holding one split
//! virtqueue whose descriptor table, available-ring head and buffers all come from the
//! fuzz input, the way a hostile guest driver would lay them out.
//!
//! Input layout (missing bytes read as zero, extra bytes are dropped):
//!
//! | bytes            | what                                                          |
//! |------------------|---------------------------------------------------------------|
//! | 0                | head: the descriptor index the available ring publishes       |
//! | 1                | knobs: target-specific settings (disk limits, buffer size...) |
//! | 2 .. 2 + 256     | the 16-entry descriptor table, raw (addr, len, flags, next)   |
//! | 258 ..           | guest memory from [`DATA_ADDR`] on (headers, payloads, tables)|
//!
//! Descriptors are taken as they are: addresses may point anywhere (inside or outside
//! the 64 KiB of memory, at the rings themselves), lengths may be anything, `next` may
//! loop and `INDIRECT` may point at a table the input wrote into the data area.

#![forbid(unsafe_code)]

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Bytes of guest memory, from address 0.
pub const MEM_SIZE: usize = 64 << 10;
/// Entries of the virtqueue.
pub const QUEUE_SIZE: u16 = 16;
/// Where the descriptor table starts (the rings follow it).
pub const RING_ADDR: u64 = 0;
/// Bytes of the descriptor table.
pub const DESC_TABLE_LEN: usize = 16 * QUEUE_SIZE as usize;
/// Where the input's buffer bytes are copied.
pub const DATA_ADDR: u64 = 0x1000;
/// Offset of the descriptor table in the input.
pub const TABLE_OFFSET: usize = 2;
/// Offset of the guest memory contents in the input.
pub const DATA_OFFSET: usize = TABLE_OFFSET + DESC_TABLE_LEN;

/// Guest memory with one published chain, and the device's view of the queue.
pub struct Guest {
    /// The guest's memory.
    pub mem: GuestMemoryMmap,
    /// The queue as the transport hands it to the device.
    pub queue: Queue,
    /// Byte 1 of the input, for the target to interpret.
    pub knobs: u8,
}

impl Guest {
    /// Lays out `data` as described in the crate documentation and publishes one chain.
    pub fn from_fuzz(data: &[u8]) -> Self {
        let byte = |i: usize| data.get(i).copied().unwrap_or(0);
        let head = u16::from(byte(0)) % QUEUE_SIZE;
        let knobs = byte(1);

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("64 KiB of anonymous memory");
        let mut table = [0u8; DESC_TABLE_LEN];
        let given = data.get(TABLE_OFFSET..).unwrap_or_default();
        let n = given.len().min(DESC_TABLE_LEN);
        table[..n].copy_from_slice(&given[..n]);
        mem.write_slice(&table, GuestAddress(RING_ADDR))
            .expect("descriptor table inside memory");

        let contents = data.get(DATA_OFFSET..).unwrap_or_default();
        let room = MEM_SIZE - DATA_ADDR as usize;
        let contents = &contents[..contents.len().min(room)];
        mem.write_slice(contents, GuestAddress(DATA_ADDR))
            .expect("buffer contents inside memory");

        let queue = {
            let vq = MockSplitQueue::create(&mem, GuestAddress(RING_ADDR), QUEUE_SIZE);
            vq.avail()
                .ring()
                .ref_at(0)
                .expect("ring slot 0")
                .store(head.to_le());
            vq.avail().idx().store(1u16.to_le());
            let queue: Queue = vq.create_queue().expect("valid queue parameters");
            queue
        };
        Guest { mem, queue, knobs }
    }
}

/// Builds an input for [`Guest::from_fuzz`]: `descs` are (addr, len, flags, next) from
/// index 0, `contents` goes to [`DATA_ADDR`]. For seed corpora.
pub fn encode_input(
    head: u8,
    knobs: u8,
    descs: &[(u64, u32, u16, u16)],
    contents: &[u8],
) -> Vec<u8> {
    let mut out = vec![head, knobs];
    let mut table = [0u8; DESC_TABLE_LEN];
    for (slot, &(addr, len, flags, next)) in table.chunks_exact_mut(16).zip(descs) {
        slot[0..8].copy_from_slice(&addr.to_le_bytes());
        slot[8..12].copy_from_slice(&len.to_le_bytes());
        slot[12..14].copy_from_slice(&flags.to_le_bytes());
        slot[14..16].copy_from_slice(&next.to_le_bytes());
    }
    out.extend_from_slice(&table);
    out.extend_from_slice(contents);
    out
}

/// The API request target's method and path tables: its input picks one of each by
/// index, and the corpus generator writes its seeds with the same indices.
pub mod api {
    pub const METHODS: [&str; 6] = ["GET", "PUT", "PATCH", "DELETE", "POST", "get"];

    /// The endpoints of routes.rs, some Firecracker ones aivmm refuses, and odd prefixes.
    pub const PATHS: [&str; 20] = [
        "/",
        "/version",
        "/machine-config",
        "/vm/config",
        "/metrics/prometheus",
        "/boot-source",
        "/drives/",
        "/network-interfaces/",
        "/vsock",
        "/logger",
        "/metrics",
        "/actions",
        "/vm",
        "/ai-infer",
        "/passthrough/",
        "/memory-zones/",
        "/balloon",
        "/snapshot/create",
        "",
        "//",
    ];
}
