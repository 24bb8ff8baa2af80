//! Feeds `devices::virtio::vsock::packet::read_tx_packet` and `PacketHeader::from_bytes`
//! (devices/src/virtio/vsock/packet.rs) the descriptor chain a guest published on the
//! vsock transmit queue, over 64 KiB of guest memory it filled (see `aivmm_fuzz::Guest`
//! for the input layout), then reads the payload as the muxer does.
//!
//! Hostile because the guest writes the 44-byte header, in particular `len`, which the
//! device must check against both its own maximum and the bytes the chain really holds,
//! and every descriptor (addresses, lengths, links, indirect tables).

#![no_main]

use aivmm_fuzz::{Guest, DATA_OFFSET};
use devices::virtio::vsock::packet::{read_tx_packet, PacketHeader, HEADER_SIZE, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

fuzz_target!(|data: &[u8]| {
    // The header decoder on its own, over the bytes the guest put at the data area.
    if let Some(raw) = data
        .get(DATA_OFFSET..DATA_OFFSET + HEADER_SIZE)
        .and_then(|b| <&[u8; HEADER_SIZE]>::try_from(b).ok())
    {
        let header = PacketHeader::from_bytes(raw);
        assert_eq!(&header.to_bytes(), raw, "header does not round-trip");
    }

    let mut guest = Guest::from_fuzz(data);
    let Some(chain) = guest.queue.pop_descriptor_chain(&guest.mem) else {
        return;
    };
    match read_tx_packet(&guest.mem, chain) {
        Ok(mut packet) => {
            assert!(packet.header.len <= MAX_PAYLOAD);
            let mut buf = vec![0u8; MAX_PAYLOAD as usize];
            let read = packet
                .read_payload(&mut buf)
                .expect("a checked payload is readable");
            assert_eq!(read, packet.header.len as usize);
        }
        Err(e) => {
            let _ = (e.header().copied(), e.to_string());
        }
    }
});
