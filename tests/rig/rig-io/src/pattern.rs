//! The byte stream every rig-io transfer carries, its verifier and its checksum.
//!
//! Sender and receiver agree on the stream without exchanging anything: it is the output of
//! a xorshift64 generator with a fixed seed, taken [`PERIOD`] bytes at a time and repeated.
//! A prime period means no power-of-two sized loss, duplication or reordering of buffers
//! can line the stream up with itself again, and the sender copies slices of one table
//! instead of generating bytes (rig-io is built unoptimised, and runs under TCG in the rig).

/// The generator's seed (any non-zero value; fixed so that both ends agree).
pub const PATTERN_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Length of the repeating part of the stream, in bytes (a prime).
pub const PERIOD: usize = 1_048_583;

/// One period of the stream.
pub struct Pattern {
    table: Vec<u8>,
}

impl Pattern {
    /// Generates the table (about 1 MiB, a few milliseconds).
    pub fn new() -> Self {
        let mut table = Vec::with_capacity(PERIOD + 8);
        let mut state = PATTERN_SEED;
        while table.len() < PERIOD {
            // xorshift64 (Marsaglia, shifts 13/7/17).
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            table.extend_from_slice(&state.to_le_bytes());
        }
        table.truncate(PERIOD);
        Pattern { table }
    }

    /// The stream's bytes from offset `pos`: at most `max`, fewer where the period wraps.
    pub fn chunk(&self, pos: u64, max: usize) -> &[u8] {
        let start = offset_in_period(pos);
        let end = start + max.min(PERIOD - start);
        &self.table[start..end]
    }
}

impl Pattern {
    /// Fills `out` with the stream's bytes from offset `pos` (across the wrap point).
    pub fn fill(&self, mut pos: u64, mut out: &mut [u8]) {
        while !out.is_empty() {
            let c = self.chunk(pos, out.len());
            let (head, tail) = out.split_at_mut(c.len());
            head.copy_from_slice(c);
            pos += c.len() as u64;
            out = tail;
        }
    }
}

impl Default for Pattern {
    fn default() -> Self {
        Self::new()
    }
}

/// `pos` modulo the period, as an index into the table.
fn offset_in_period(pos: u64) -> usize {
    // PERIOD fits in u64 and the remainder is below PERIOD, which fits in usize.
    let rem = pos % PERIOD as u64;
    usize::try_from(rem).unwrap_or(0)
}

/// The checksum both ends print, so that a log shows at a glance whether they saw the same
/// bytes: FNV-1a (64-bit) over the stream's little-endian 64-bit words, the last partial
/// word byte by byte. Words rather than bytes because rig-io is built unoptimised: a
/// byte-wise loop would cap a transfer at a few MiB/s under TCG. The value does not depend
/// on how the stream is split into chunks.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a64 {
    hash: u64,
    pending: [u8; 8],
    npending: usize,
}

impl Fnv1a64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub fn new() -> Self {
        Fnv1a64 {
            hash: Self::OFFSET_BASIS,
            pending: [0; 8],
            npending: 0,
        }
    }

    fn mix(hash: u64, value: u64) -> u64 {
        (hash ^ value).wrapping_mul(Self::PRIME)
    }

    pub fn update(&mut self, mut data: &[u8]) {
        if self.npending > 0 {
            let take = (8 - self.npending).min(data.len());
            self.pending[self.npending..self.npending + take].copy_from_slice(&data[..take]);
            self.npending += take;
            data = &data[take..];
            if self.npending < 8 {
                return;
            }
            self.hash = Self::mix(self.hash, u64::from_le_bytes(self.pending));
            self.npending = 0;
        }
        // Spelled out with plain indexing: in an unoptimised build this is about four times
        // as fast as chunks_exact + from_le_bytes (no function call per word).
        let whole = data.len() - data.len() % 8;
        let mut h = self.hash;
        let mut i = 0;
        while i < whole {
            let w = data[i] as u64
                | (data[i + 1] as u64) << 8
                | (data[i + 2] as u64) << 16
                | (data[i + 3] as u64) << 24
                | (data[i + 4] as u64) << 32
                | (data[i + 5] as u64) << 40
                | (data[i + 6] as u64) << 48
                | (data[i + 7] as u64) << 56;
            h = (h ^ w).wrapping_mul(Self::PRIME);
            i += 8;
        }
        self.hash = h;
        let rest = &data[whole..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.npending = rest.len();
    }

    pub fn value(&self) -> u64 {
        self.pending[..self.npending]
            .iter()
            .fold(self.hash, |h, &b| Self::mix(h, u64::from(b)))
    }
}

impl Default for Fnv1a64 {
    fn default() -> Self {
        Self::new()
    }
}

/// What was wrong with a received stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamFault {
    /// The first byte that differs from the pattern, at this offset.
    Mismatch { offset: u64 },
    /// The stream ended after `got` of `want` bytes.
    Short { got: u64, want: u64 },
    /// More than `want` bytes arrived (the receiver stops reading at the first extra one).
    Long { got: u64, want: u64 },
}

impl std::fmt::Display for StreamFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamFault::Mismatch { offset } => {
                write!(
                    f,
                    "received bytes differ from the pattern at offset {offset}"
                )
            }
            StreamFault::Short { got, want } => {
                write!(f, "stream ended after {got} of {want} bytes")
            }
            StreamFault::Long { got, want } => {
                write!(f, "received at least {got} bytes, expected {want}")
            }
        }
    }
}

/// Checks a received stream against the pattern, chunk by chunk, as it arrives.
pub struct Verifier<'p> {
    pattern: &'p Pattern,
    expected: u64,
    received: u64,
    first_mismatch: Option<u64>,
    fnv: Fnv1a64,
}

impl<'p> Verifier<'p> {
    /// A verifier for a stream of `expected` bytes.
    pub fn new(pattern: &'p Pattern, expected: u64) -> Self {
        Verifier {
            pattern,
            expected,
            received: 0,
            first_mismatch: None,
            fnv: Fnv1a64::new(),
        }
    }

    /// Feeds the next bytes of the stream.
    pub fn update(&mut self, mut data: &[u8]) {
        self.fnv.update(data);
        while !data.is_empty() {
            let left = self.expected.saturating_sub(self.received);
            if left == 0 {
                // Too long: count the excess, there is no pattern to compare it with.
                self.received = self.received.saturating_add(data.len() as u64);
                return;
            }
            let max = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
            let want = self.pattern.chunk(self.received, max);
            let n = want.len();
            let got = &data[..n];
            if self.first_mismatch.is_none() && got != want {
                let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                self.first_mismatch = Some(self.received + i as u64);
            }
            self.received += n as u64;
            data = &data[n..];
        }
    }

    /// Bytes fed so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// True once more bytes than expected arrived (no need to read further).
    pub fn overflowed(&self) -> bool {
        self.received > self.expected
    }

    /// Checksum of the bytes fed so far.
    pub fn checksum(&self) -> u64 {
        self.fnv.value()
    }

    /// The verdict on the stream as fed so far, taken as complete.
    pub fn fault(&self) -> Option<StreamFault> {
        if let Some(offset) = self.first_mismatch {
            return Some(StreamFault::Mismatch { offset });
        }
        if self.received < self.expected {
            return Some(StreamFault::Short {
                got: self.received,
                want: self.expected,
            });
        }
        if self.received > self.expected {
            return Some(StreamFault::Long {
                got: self.received,
                want: self.expected,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stream's first `n` bytes, assembled through `chunk` like a sender does.
    fn stream(p: &Pattern, n: u64) -> Vec<u8> {
        let mut v = Vec::new();
        while (v.len() as u64) < n {
            let c = p.chunk(v.len() as u64, usize::try_from(n).unwrap() - v.len());
            v.extend_from_slice(c);
        }
        v
    }

    #[test]
    fn pattern_is_fixed_and_repeats_with_its_period() {
        let p = Pattern::new();
        let q = Pattern::new();
        assert_eq!(p.chunk(0, 64), q.chunk(0, 64));
        // First output of xorshift64 from the seed, little-endian.
        let mut s = PATTERN_SEED;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        assert_eq!(p.chunk(0, 8), &s.to_le_bytes()[..]);
        assert_eq!(p.chunk(PERIOD as u64, 100), p.chunk(0, 100));
        // A chunk never crosses the wrap point; fill does.
        assert_eq!(p.chunk(PERIOD as u64 - 3, 100).len(), 3);
        let mut across = [0u8; 8];
        p.fill(PERIOD as u64 - 3, &mut across);
        assert_eq!(&across[..3], p.chunk(PERIOD as u64 - 3, 3));
        assert_eq!(&across[3..], p.chunk(0, 5));
        // Not a constant stream.
        let head = p.chunk(0, 4096);
        assert!(head.iter().any(|&b| b != head[0]));
    }

    #[test]
    fn verifier_accepts_the_exact_stream_in_any_chunking() {
        let p = Pattern::new();
        let n = PERIOD as u64 + 5000;
        let data = stream(&p, n);
        for size in [1usize, 7, 4096, 65536, data.len()] {
            let mut v = Verifier::new(&p, n);
            for c in data.chunks(size) {
                v.update(c);
            }
            assert_eq!(v.fault(), None, "chunk size {size}");
            assert_eq!(v.received(), n);
            let mut f = Fnv1a64::new();
            f.update(&data);
            assert_eq!(v.checksum(), f.value());
        }
    }

    #[test]
    fn verifier_finds_a_flipped_byte() {
        let p = Pattern::new();
        let n = 200_000u64;
        let mut data = stream(&p, n);
        data[123_457] ^= 0x01;
        let mut v = Verifier::new(&p, n);
        for c in data.chunks(65536) {
            v.update(c);
        }
        assert_eq!(v.fault(), Some(StreamFault::Mismatch { offset: 123_457 }));
    }

    #[test]
    fn verifier_finds_a_short_and_a_long_stream() {
        let p = Pattern::new();
        let data = stream(&p, 10_001);
        let mut short = Verifier::new(&p, 10_001);
        short.update(&data[..10_000]);
        assert_eq!(
            short.fault(),
            Some(StreamFault::Short {
                got: 10_000,
                want: 10_001
            })
        );

        let mut long = Verifier::new(&p, 10_000);
        long.update(&data);
        assert!(long.overflowed());
        assert_eq!(
            long.fault(),
            Some(StreamFault::Long {
                got: 10_001,
                want: 10_000
            })
        );
    }

    #[test]
    fn verifier_rejects_a_stream_shifted_by_a_dropped_buffer() {
        let p = Pattern::new();
        let data = stream(&p, 3 * 65536);
        let mut v = Verifier::new(&p, 2 * 65536);
        v.update(&data[..65536]);
        v.update(&data[2 * 65536..]);
        assert!(matches!(v.fault(), Some(StreamFault::Mismatch { offset }) if offset >= 65536));
    }

    #[test]
    fn checksum_is_fnv1a_and_ignores_chunking() {
        // Under 8 bytes it is plain byte-wise FNV-1a (reference values).
        let mut f = Fnv1a64::new();
        assert_eq!(f.value(), 0xcbf2_9ce4_8422_2325);
        f.update(b"a");
        assert_eq!(f.value(), 0xaf63_dc4c_8601_ec8c);
        let mut g = Fnv1a64::new();
        g.update(b"foobar");
        assert_eq!(g.value(), 0x8594_4171_f739_67e8);
        // Any split of the same bytes gives the same value; a changed byte another.
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3).to_le_bytes()[0]).collect();
        let mut whole = Fnv1a64::new();
        whole.update(&data);
        for size in [1, 3, 8, 13, 999] {
            let mut parts = Fnv1a64::new();
            for c in data.chunks(size) {
                parts.update(c);
            }
            assert_eq!(parts.value(), whole.value(), "chunks of {size}");
        }
        let mut changed = data.clone();
        changed[500] ^= 0x80;
        let mut other = Fnv1a64::new();
        other.update(&changed);
        assert_ne!(other.value(), whole.value());
    }
}
