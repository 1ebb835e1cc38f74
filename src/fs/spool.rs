//! A scratch file whose bytes never reach the disk in the clear.
//!
//! `pg --rewrite` holds a whole table between reading it and writing it
//! back (one connection cannot stream a `COPY TO` into a `COPY FROM`), and
//! the table's other columns are plaintext. So the spool:
//! - is unlinked from its creation (`tempfile::tempfile`, `O_TMPFILE` where
//!   the filesystem has it): a killed process leaves no name behind, and
//!   the space is freed when the descriptor closes;
//! - seals what it holds in frames of [`FRAME`] bytes with AES-256-GCM
//!   under a key drawn at random for this spool and kept only in this
//!   process's memory (zeroised on drop). The nonce is the frame's index,
//!   so a frame swapped, repeated or moved fails to open; the reader knows
//!   how many frames were written, so a truncated spool fails too.
//!
//! The format is private to one process and never read by anything else:
//! it is not in docs/FORMAT.md on purpose.

use crate::error::{Error, Result};
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use zeroize::Zeroize;

/// Plaintext bytes per sealed frame: large enough that the 20 bytes of
/// length and tag per frame are noise, small enough to keep memory flat.
pub const FRAME: usize = 1 << 20;

fn nonce(index: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&index.to_be_bytes());
    n
}

fn spool_err(what: &str, e: std::io::Error) -> Error {
    Error::io(format!("spool file: {what}: {e}"))
}

/// The writing side: [`Write`] bytes in, then [`Spool::into_reader`].
pub struct Spool {
    /// `None` only once handed to the reader.
    file: Option<BufWriter<File>>,
    cipher: Aes256Gcm,
    buf: Vec<u8>,
    frames: u64,
    bytes: u64,
}

impl Spool {
    /// A new spool in `dir`, or in the temporary directory (`TMPDIR`).
    pub fn new(dir: Option<&Path>) -> Result<Spool> {
        let file = match dir {
            Some(d) => tempfile::tempfile_in(d),
            None => tempfile::tempfile(),
        }
        .map_err(|e| spool_err("cannot create it in the temporary directory (TMPDIR)", e))?;
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let cipher = Aes256Gcm::new((&key).into());
        key.zeroize();
        Ok(Spool {
            file: Some(BufWriter::with_capacity(FRAME + 64, file)),
            cipher,
            buf: Vec::with_capacity(FRAME),
            frames: 0,
            bytes: 0,
        })
    }

    /// Plaintext bytes written so far.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    fn seal_frame(&mut self) -> Result<()> {
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce(self.frames)), self.buf.as_slice())
            .map_err(|_| Error::io("spool file: cannot seal a frame"))?;
        self.buf.zeroize();
        self.buf.clear();
        let len = u32::try_from(sealed.len()).expect("a frame is 1 MiB");
        let file = self.file.as_mut().expect("written before into_reader");
        file.write_all(&len.to_be_bytes())
            .and_then(|_| file.write_all(&sealed))
            .map_err(|e| spool_err("cannot write (is the temporary directory full?)", e))?;
        self.frames += 1;
        Ok(())
    }

    /// Seals what is buffered and rewinds: the bytes written, in order.
    pub fn into_reader(mut self) -> Result<SpoolReader> {
        if !self.buf.is_empty() {
            self.seal_frame()?;
        }
        let cipher = self.cipher.clone();
        let (frames, bytes) = (self.frames, self.bytes);
        let mut file = self
            .file
            .take()
            .expect("written before into_reader")
            .into_inner()
            .map_err(|e| {
                spool_err(
                    "cannot write (is the temporary directory full?)",
                    e.into_error(),
                )
            })?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| spool_err("cannot rewind", e))?;
        Ok(SpoolReader {
            file: BufReader::with_capacity(FRAME + 64, file),
            cipher,
            next: 0,
            frames,
            bytes,
            frame: Vec::new(),
            pos: 0,
        })
    }
}

impl Write for Spool {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(FRAME - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.bytes += n as u64;
        if self.buf.len() == FRAME {
            self.seal_frame()
                .map_err(|e| std::io::Error::other(e.message().to_string()))?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

/// The reading side: [`Read`] gives back exactly the bytes written, or an
/// error if the file was changed, cut short or extended meanwhile.
pub struct SpoolReader {
    file: BufReader<File>,
    cipher: Aes256Gcm,
    next: u64,
    frames: u64,
    bytes: u64,
    frame: Vec<u8>,
    pos: usize,
}

impl SpoolReader {
    /// Plaintext bytes the spool holds.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    fn damaged() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "spool file: changed, cut short or extended while this run held it (nothing was written from it past the damage)",
        )
    }

    fn open_next(&mut self) -> std::io::Result<bool> {
        if self.next == self.frames {
            // Everything written has been read: the file must end here.
            let mut extra = [0u8; 1];
            return match self.file.read(&mut extra)? {
                0 => Ok(false),
                _ => Err(Self::damaged()),
            };
        }
        let mut len = [0u8; 4];
        self.file
            .read_exact(&mut len)
            .map_err(|_| Self::damaged())?;
        let len = u32::from_be_bytes(len) as usize;
        if len > FRAME + 16 {
            return Err(Self::damaged());
        }
        let mut sealed = vec![0u8; len];
        self.file
            .read_exact(&mut sealed)
            .map_err(|_| Self::damaged())?;
        self.frame.zeroize();
        self.frame = self
            .cipher
            .decrypt(Nonce::from_slice(&nonce(self.next)), sealed.as_slice())
            .map_err(|_| Self::damaged())?;
        self.pos = 0;
        self.next += 1;
        Ok(true)
    }
}

impl Read for SpoolReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.frame.len() {
            if !self.open_next()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.frame.len() - self.pos);
        out[..n].copy_from_slice(&self.frame[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for SpoolReader {
    fn drop(&mut self) {
        self.frame.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn spooled(d: &[u8]) -> SpoolReader {
        let mut s = Spool::new(None).unwrap();
        // Uneven writes, across frame boundaries.
        for c in d.chunks(FRAME / 3 + 7) {
            s.write_all(c).unwrap();
        }
        assert_eq!(s.len(), d.len() as u64);
        s.into_reader().unwrap()
    }

    #[test]
    fn gives_back_what_was_written() {
        for n in [0, 1, FRAME - 1, FRAME, FRAME + 1, 3 * FRAME + 5] {
            let d = data(n);
            let mut r = spooled(&d);
            let mut back = Vec::new();
            r.read_to_end(&mut back).unwrap();
            assert_eq!(back.len(), d.len(), "{n} bytes");
            assert!(back == d, "{n} bytes differ");
        }
    }

    #[test]
    fn holds_no_plaintext() {
        let d = b"SECRET-ROW-VALUE ".repeat(1000);
        let r = spooled(&d);
        let f = r.file.get_ref();
        let mut raw = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut raw, 0).unwrap();
        assert!(raw.len() > d.len());
        assert!(!raw.windows(16).any(|w| w == b"SECRET-ROW-VALUE"));
    }

    /// Reads the spool after `damage` changed its file: must fail.
    fn read_after(n: usize, damage: impl Fn(&File)) -> std::io::Result<Vec<u8>> {
        let mut r = spooled(&data(n));
        damage(r.file.get_ref());
        let mut back = Vec::new();
        r.read_to_end(&mut back).map(|_| back)
    }

    #[test]
    fn a_flipped_byte_fails() {
        for at in [0u64, 3, 4, 100, (FRAME + 20) as u64] {
            let e = read_after(2 * FRAME, |f| {
                let mut b = [0u8; 1];
                f.read_at(&mut b, at).unwrap();
                f.write_at(&[b[0] ^ 1], at).unwrap();
            })
            .unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "byte {at}");
        }
    }

    #[test]
    fn truncation_and_extension_fail() {
        let frame_len = (4 + FRAME + 16) as u64;
        for len in [0, 10, frame_len, frame_len + 3] {
            assert!(
                read_after(2 * FRAME, |f| f.set_len(len).unwrap()).is_err(),
                "cut at {len}"
            );
        }
        assert!(read_after(100, |f| {
            let l = f.metadata().unwrap().len();
            f.write_at(b"x", l).unwrap();
        })
        .is_err());
    }

    #[test]
    fn swapped_frames_fail() {
        let frame_len = 4 + FRAME + 16;
        let e = read_after(2 * FRAME, |f| {
            let mut a = vec![0u8; frame_len];
            let mut b = vec![0u8; frame_len];
            f.read_at(&mut a, 0).unwrap();
            f.read_at(&mut b, frame_len as u64).unwrap();
            f.write_at(&b, 0).unwrap();
            f.write_at(&a, frame_len as u64).unwrap();
        })
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn another_spools_frame_fails() {
        // Same index, another key: a frame from elsewhere never opens.
        let mut other = spooled(&data(100));
        let mut theirs = Vec::new();
        other.file.read_to_end(&mut theirs).unwrap();
        let e = read_after(100, |f| {
            f.write_at(&theirs, 0).unwrap();
        })
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }
}
