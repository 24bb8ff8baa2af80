//! Little-endian field-by-field readers and writers over byte slices.
//!
//! Every access is bounds-checked and returns an error instead of panicking, because
//! the bytes may come from an untrusted guest (or, for the guest, from the device).

use crate::error::ProtocolError;

/// Sequential little-endian reader over a byte slice.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Starts reading `what`, failing early if `buf` cannot hold `needed` bytes so the
    /// error names the whole structure rather than the field where it ran out.
    pub(crate) fn new(
        buf: &'a [u8],
        what: &'static str,
        needed: usize,
    ) -> Result<Self, ProtocolError> {
        if buf.len() < needed {
            return Err(ProtocolError::Truncated {
                what,
                needed,
                got: buf.len(),
            });
        }
        Ok(Self { buf, pos: 0, what })
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Result<&'a [u8], ProtocolError> {
        let end = self.pos.checked_add(len).ok_or(ProtocolError::Truncated {
            what: self.what,
            needed: usize::MAX,
            got: self.buf.len(),
        })?;
        let slice = self
            .buf
            .get(self.pos..end)
            .ok_or(ProtocolError::Truncated {
                what: self.what,
                needed: end,
                got: self.buf.len(),
            })?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Reads a reserved field and rejects it unless it is zero, so that future
    /// versions can give reserved bytes a meaning without old devices misreading them.
    pub(crate) fn reserved_u8(&mut self, field: &'static str) -> Result<(), ProtocolError> {
        let value = self.u8()?;
        reserved_zero(field, u64::from(value))
    }

    pub(crate) fn reserved_u16(&mut self, field: &'static str) -> Result<(), ProtocolError> {
        let value = self.u16()?;
        reserved_zero(field, u64::from(value))
    }

    pub(crate) fn reserved_u32(&mut self, field: &'static str) -> Result<(), ProtocolError> {
        let value = self.u32()?;
        reserved_zero(field, u64::from(value))
    }
}

fn reserved_zero(field: &'static str, value: u64) -> Result<(), ProtocolError> {
    if value == 0 {
        Ok(())
    } else {
        Err(ProtocolError::ReservedNotZero { field, value })
    }
}

/// Sequential little-endian writer into a byte slice.
pub(crate) struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Writer<'a> {
    /// Starts writing `what`, failing before any byte is written if `buf` cannot hold
    /// `needed` bytes: a failed encode never leaves a half-written structure behind.
    pub(crate) fn new(
        buf: &'a mut [u8],
        what: &'static str,
        needed: usize,
    ) -> Result<Self, ProtocolError> {
        if buf.len() < needed {
            return Err(ProtocolError::BufferTooSmall {
                what,
                needed,
                got: buf.len(),
            });
        }
        Ok(Self { buf, pos: 0, what })
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn bytes(&mut self, data: &[u8]) -> Result<(), ProtocolError> {
        let got = self.buf.len();
        let end = self
            .pos
            .checked_add(data.len())
            .filter(|end| *end <= got)
            .ok_or(ProtocolError::BufferTooSmall {
                what: self.what,
                needed: self.pos.saturating_add(data.len()),
                got,
            })?;
        self.buf[self.pos..end].copy_from_slice(data);
        self.pos = end;
        Ok(())
    }

    /// Writes `len` zero bytes (reserved fields and padding).
    pub(crate) fn zeros(&mut self, len: usize) -> Result<(), ProtocolError> {
        const ZEROS: [u8; 64] = [0; 64];
        let mut left = len;
        while left > 0 {
            let chunk = left.min(ZEROS.len());
            self.bytes(&ZEROS[..chunk])?;
            left -= chunk;
        }
        Ok(())
    }

    pub(crate) fn u8(&mut self, value: u8) -> Result<(), ProtocolError> {
        self.bytes(&[value])
    }

    pub(crate) fn u16(&mut self, value: u16) -> Result<(), ProtocolError> {
        self.bytes(&value.to_le_bytes())
    }

    pub(crate) fn u32(&mut self, value: u32) -> Result<(), ProtocolError> {
        self.bytes(&value.to_le_bytes())
    }

    pub(crate) fn u64(&mut self, value: u64) -> Result<(), ProtocolError> {
        self.bytes(&value.to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_little_endian_fields_in_order() {
        let buf = [
            1, 0x34, 0x12, 0x78, 0x56, 0x34, 0x12, 8, 7, 6, 5, 4, 3, 2, 1,
        ];
        let mut r = Reader::new(&buf, "test", buf.len()).unwrap();
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(r.u16().unwrap(), 0x1234);
        assert_eq!(r.u32().unwrap(), 0x1234_5678);
        assert_eq!(r.u64().unwrap(), 0x0102_0304_0506_0708);
        assert_eq!(r.pos, 15);
        assert_eq!(
            r.u8(),
            Err(ProtocolError::Truncated {
                what: "test",
                needed: 16,
                got: 15
            })
        );
    }

    #[test]
    fn reader_rejects_short_buffer_up_front() {
        assert_eq!(
            Reader::new(&[0; 3], "header", 4).err(),
            Some(ProtocolError::Truncated {
                what: "header",
                needed: 4,
                got: 3
            })
        );
    }

    #[test]
    fn reserved_fields_must_be_zero() {
        let buf = [0, 0, 5, 0];
        let mut r = Reader::new(&buf, "test", 4).unwrap();
        assert_eq!(r.reserved_u16("a"), Ok(()));
        assert_eq!(
            r.reserved_u16("b"),
            Err(ProtocolError::ReservedNotZero {
                field: "b",
                value: 5
            })
        );
    }

    #[test]
    fn writer_writes_little_endian_and_refuses_overflow() {
        let mut buf = [0xffu8; 8];
        let mut w = Writer::new(&mut buf, "test", 7).unwrap();
        w.u16(0xbeef).unwrap();
        w.zeros(1).unwrap();
        w.u32(0x0102_0304).unwrap();
        assert_eq!(w.position(), 7);
        assert_eq!(
            w.u16(1),
            Err(ProtocolError::BufferTooSmall {
                what: "test",
                needed: 9,
                got: 8
            })
        );
        assert_eq!(buf, [0xef, 0xbe, 0, 4, 3, 2, 1, 0xff]);
        let mut small = [0u8; 2];
        assert!(matches!(
            Writer::new(&mut small, "x", 3),
            Err(ProtocolError::BufferTooSmall {
                needed: 3,
                got: 2,
                ..
            })
        ));
    }
}
