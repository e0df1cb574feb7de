//! 9P message encoding: little-endian integers, strings with a 16-bit length, qids. Decoding
//! checks every length against the message; a short or malformed message is an EPROTO error,
//! never a panic or an allocation sized by the guest.

/// A qid: what the server says a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qid {
    pub kind: u8,
    pub version: u32,
    pub path: u64,
}

pub const QID_DIR: u8 = 0x80;
pub const QID_SYMLINK: u8 = 0x02;
pub const QID_FILE: u8 = 0x00;

/// Reads fields from the body of a T-message.
pub struct Decoder<'a> {
    data: &'a [u8],
}

pub type Errno = i32;

impl<'a> Decoder<'a> {
    pub fn new(data: &'a [u8]) -> Decoder<'a> {
        Decoder { data }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Errno> {
        if self.data.len() < n {
            return Err(libc::EPROTO);
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, Errno> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Errno> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, Errno> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, Errno> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A string: 16-bit length, then that many bytes (not NUL-terminated).
    pub fn string(&mut self) -> Result<String, Errno> {
        let len = usize::from(self.u16()?);
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| libc::EINVAL)
    }

    /// `count` bytes of data (Twrite), bounded by what the message holds.
    pub fn bytes(&mut self, count: usize) -> Result<&'a [u8], Errno> {
        self.take(count)
    }
}

/// Builds an R-message: size, type and tag are filled in by [`Encoder::finish`].
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new(kind: u8, tag: u16) -> Encoder {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&[0, 0, 0, 0, kind]);
        buf.extend_from_slice(&tag.to_le_bytes());
        Encoder { buf }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn string(&mut self, s: &str) -> &mut Self {
        let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.u16(bytes.len() as u16);
        self.buf.extend_from_slice(bytes);
        self
    }

    pub fn qid(&mut self, q: Qid) -> &mut Self {
        self.u8(q.kind).u32(q.version).u64(q.path)
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len() <= 7
    }

    pub fn finish(mut self) -> Vec<u8> {
        let size = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&size.to_le_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_fields_and_rejects_short_messages() {
        let data = [1u8, 2, 0, 3, 0, 0, 0, 2, 0, b'h', b'i'];
        let mut d = Decoder::new(&data);
        assert_eq!(d.u8(), Ok(1));
        assert_eq!(d.u16(), Ok(2));
        assert_eq!(d.u32(), Ok(3));
        assert_eq!(d.string().as_deref(), Ok("hi"));
        assert_eq!(d.u8(), Err(libc::EPROTO));
        // A string whose length runs past the end.
        let mut d = Decoder::new(&[0xff, 0xff, b'x']);
        assert_eq!(d.string(), Err(libc::EPROTO));
    }

    #[test]
    fn encodes_rversion_like_the_spec() {
        let mut e = Encoder::new(101, 0xffff);
        e.u32(8192).string("9P2000.L");
        let mut expected = vec![21u8, 0, 0, 0, 101, 0xff, 0xff, 0, 0x20, 0, 0, 8, 0];
        expected.extend_from_slice(b"9P2000.L");
        assert_eq!(e.finish(), expected);
    }
}

/// 9P2000.L request types (the R-message of each is one more).
pub mod message {
    pub const TSTATFS: u8 = 8;
    pub const TLOPEN: u8 = 12;
    pub const TLCREATE: u8 = 14;
    pub const TSYMLINK: u8 = 16;
    pub const TMKNOD: u8 = 18;
    pub const TRENAME: u8 = 20;
    pub const TREADLINK: u8 = 22;
    pub const TGETATTR: u8 = 24;
    pub const TSETATTR: u8 = 26;
    pub const TXATTRWALK: u8 = 30;
    pub const TXATTRCREATE: u8 = 32;
    pub const TREADDIR: u8 = 40;
    pub const TFSYNC: u8 = 50;
    pub const TLOCK: u8 = 52;
    pub const TGETLOCK: u8 = 54;
    pub const TLINK: u8 = 70;
    pub const TMKDIR: u8 = 72;
    pub const TRENAMEAT: u8 = 74;
    pub const TUNLINKAT: u8 = 76;
    pub const TVERSION: u8 = 100;
    pub const TAUTH: u8 = 102;
    pub const TATTACH: u8 = 104;
    pub const TFLUSH: u8 = 108;
    pub const TWALK: u8 = 110;
    pub const TREAD: u8 = 116;
    pub const TWRITE: u8 = 118;
    pub const TCLUNK: u8 = 120;
    pub const TREMOVE: u8 = 122;
}
