//! Buffers for plaintext that grow without leaving copies behind.
//!
//! A `String` or `Vec` that outgrows its capacity moves its bytes to a bigger block and frees
//! the old block as it is: a prefix of the plaintext stays in freed heap memory. These buffers
//! move their bytes into a new zeroizing buffer instead, and the old buffer is wiped as it is
//! dropped. They are for output whose size is not known up front (what a library writes into
//! a sink: NFC, IDNA, JSON); where the size is known, a `Zeroizing` buffer of that capacity is
//! enough.

use std::fmt;
use std::io;

use zeroize::Zeroizing;

/// A string for plaintext: wiped on drop, and when it grows.
pub(crate) struct WipingString(Zeroizing<String>);

impl WipingString {
    /// An empty string with room for `capacity` bytes.
    pub(crate) fn with_capacity(capacity: usize) -> WipingString {
        WipingString(Zeroizing::new(String::with_capacity(capacity)))
    }

    /// Makes room for `additional` more bytes (at least doubling the capacity when it grows).
    fn reserve(&mut self, additional: usize) {
        let (len, capacity) = (self.0.len(), self.0.capacity());
        if capacity - len >= additional {
            return;
        }
        let mut bigger = Zeroizing::new(String::with_capacity(
            len.saturating_add(additional)
                .max(capacity.saturating_mul(2)),
        ));
        bigger.push_str(&self.0);
        // The old buffer is wiped as it is dropped here.
        self.0 = bigger;
    }

    /// Appends `s`.
    pub(crate) fn push_str(&mut self, s: &str) {
        self.reserve(s.len());
        self.0.push_str(s);
    }

    /// The text, in its zeroizing buffer.
    pub(crate) fn into_inner(self) -> Zeroizing<String> {
        self.0
    }
}

impl std::ops::Deref for WipingString {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Write for WipingString {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_str(s);
        Ok(())
    }
}

/// A byte buffer for plaintext: wiped on drop, and when it grows.
pub(crate) struct WipingVec(Zeroizing<Vec<u8>>);

impl WipingVec {
    /// An empty buffer with room for `capacity` bytes.
    pub(crate) fn with_capacity(capacity: usize) -> WipingVec {
        WipingVec(Zeroizing::new(Vec::with_capacity(capacity)))
    }

    /// The bytes, in their zeroizing buffer.
    pub(crate) fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

impl io::Write for WipingVec {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (len, capacity) = (self.0.len(), self.0.capacity());
        if capacity - len < buf.len() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(
                len.saturating_add(buf.len())
                    .max(capacity.saturating_mul(2)),
            ));
            bigger.extend_from_slice(&self.0);
            // The old buffer is wiped as it is dropped here.
            self.0 = bigger;
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;
    use std::io::Write as _;

    use super::*;

    #[test]
    fn a_string_keeps_its_text_as_it_grows() {
        let mut s = WipingString::with_capacity(2);
        for _ in 0..100 {
            s.push_str("ab");
            s.push_str("é");
        }
        write!(s, "{}", 42).expect("a WipingString takes any text");
        assert_eq!(&*s, format!("{}42", "abé".repeat(100)));
        assert_eq!(*s.into_inner(), format!("{}42", "abé".repeat(100)));
    }

    #[test]
    fn a_vec_keeps_its_bytes_as_it_grows() {
        let mut v = WipingVec::with_capacity(0);
        for i in 0..=255u8 {
            v.write_all(&[i; 3]).expect("a WipingVec takes any bytes");
        }
        let bytes = v.into_inner();
        assert_eq!(bytes.len(), 256 * 3);
        assert!(bytes.chunks(3).enumerate().all(|(i, c)| c == [i as u8; 3]));
    }
}
