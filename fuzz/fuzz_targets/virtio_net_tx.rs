//! Feeds `devices::virtio::net::gather_tx_frame` (devices/src/virtio/net/tx.rs) the
//! descriptor chain a guest published on the transmit queue, over 64 KiB of guest memory
//! it filled (see `aivmm_fuzz::Guest` for the input layout).
//!
//! Hostile because the guest chooses every descriptor: addresses outside memory,
//! lengths up to 4 GiB, device-writable buffers where only readable ones belong, loops
//! and indirect tables. The gather must copy at most the caller's buffer and only from
//! guest memory, and refuse the rest without panicking.

#![no_main]

use aivmm_fuzz::Guest;
use devices::virtio::net::{gather_tx_frame, MAX_FRAME_LEN, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

/// Frame buffer sizes the knobs pick from: the worker's, one just under it, a small
/// one, one shorter than the virtio-net header, none.
const BUF_LENS: [usize; 5] = [MAX_FRAME_LEN, MAX_FRAME_LEN - 1, 64, VNET_HDR_LEN - 1, 0];

fuzz_target!(|data: &[u8]| {
    let mut guest = Guest::from_fuzz(data);
    let mut buf = vec![0u8; BUF_LENS[usize::from(guest.knobs) % BUF_LENS.len()]];
    let Some(chain) = guest.queue.pop_descriptor_chain(&guest.mem) else {
        return;
    };
    match gather_tx_frame(&guest.mem, chain, &mut buf) {
        Ok(len) => {
            assert!(len >= VNET_HDR_LEN, "frame shorter than its header");
            assert!(
                len <= buf.len().min(MAX_FRAME_LEN),
                "frame larger than the buffer"
            );
        }
        Err(e) => {
            let _ = (e.is_oversize(), e.to_string());
        }
    }
});
