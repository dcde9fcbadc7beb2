//! A reader that watches the tar headers streaming through it.
//!
//! The `tar` crate reads a GNU long-name/long-link entry or a pax extension header into
//! memory before handing the entry to us, as much of it as the header says. A hostile
//! upload (easily a gzip of zeros) could so make the server hold gigabytes for one
//! "file name". This guard parses each 512-byte header as the bytes pass and refuses an
//! extension entry larger than [`MAX_EXTENSION_BYTES`] before the crate reads its body.

use std::io::{self, Read};

/// Largest GNU long name/link or pax header accepted: far above any real path.
pub const MAX_EXTENSION_BYTES: u64 = 64 * 1024;

const BLOCK: usize = 512;

pub struct TarHeaderGuard<R> {
    inner: R,
    /// Bytes of the current entry's body (padded to a block) still to pass.
    body_left: u64,
    header: [u8; BLOCK],
    header_len: usize,
}

impl<R> TarHeaderGuard<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            body_left: 0,
            header: [0; BLOCK],
            header_len: 0,
        }
    }

    fn scan(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let skip = usize::try_from(self.body_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.body_left -= skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            let take = (BLOCK - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
            self.header_len += take;
            bytes = &bytes[take..];
            if self.header_len == BLOCK {
                self.header_len = 0;
                self.check_header()?;
            }
        }
        Ok(())
    }

    fn check_header(&mut self) -> io::Result<()> {
        if self.header.iter().all(|b| *b == 0) {
            return Ok(()); // end-of-archive block
        }
        let size = parse_size(&self.header[124..136]).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a tar header has an invalid size",
            )
        })?;
        let kind = self.header[156];
        if matches!(kind, b'L' | b'K' | b'x' | b'g') && size > MAX_EXTENSION_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a tar extension header of {size} bytes (more than {MAX_EXTENSION_BYTES}) was refused"
                ),
            ));
        }
        self.body_left = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        Ok(())
    }
}

/// The size field: octal digits (NUL/space padded), or GNU base-256 when the high bit
/// of the first byte is set.
fn parse_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let mut value: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(value);
    }
    let digits = field
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b));
    let mut value: u64 = 0;
    for b in digits {
        value = value.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(value)
}

impl<R: Read> Read for TarHeaderGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.scan(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive_with_long_name(name_len: usize) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o644);
        let long = format!("{}/file.txt", "d".repeat(name_len));
        builder
            .append_data(&mut header, &long, &b"abc"[..])
            .expect("append");
        builder.into_inner().expect("finish")
    }

    fn read_all(bytes: &[u8]) -> io::Result<Vec<String>> {
        let mut archive = tar::Archive::new(TarHeaderGuard::new(bytes));
        let mut names = Vec::new();
        for entry in archive.entries()? {
            names.push(entry?.path()?.display().to_string());
        }
        Ok(names)
    }

    #[test]
    fn ordinary_and_long_names_pass() {
        let names = read_all(&archive_with_long_name(300)).expect("a 300-byte name is fine");
        assert_eq!(names.len(), 1);
        assert!(names[0].ends_with("/file.txt"));
    }

    #[test]
    fn a_huge_long_name_entry_is_refused_before_it_is_read() {
        // A GNU long-name header claiming 1 GiB, followed by only a little of it: the
        // guard must refuse at the header, not after buffering.
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::GNULongName);
        header.set_size(1 << 30);
        header.set_path("././@LongLink").expect("path");
        header.set_cksum();
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(b'a', 4096));
        let err = read_all(&bytes).expect_err("refused");
        assert!(err.to_string().contains("extension header"), "{err}");
    }

    #[test]
    fn sizes_parse_in_octal_and_base_256() {
        assert_eq!(parse_size(b"00000001750\0"), Some(1000));
        assert_eq!(parse_size(b"     1750 \0\0"), Some(1000));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 5;
        big[10] = 1;
        assert_eq!(parse_size(&big), Some(256 + 5));
    }
}
