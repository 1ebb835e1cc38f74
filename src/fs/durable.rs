//! `DurableWriter`: the buffered writer under `AtomicFile`, shaped for a
//! file that is fsynced when it is complete.
//!
//! Invariants:
//! - Bytes reach the file in the order given, each exactly once; nothing is
//!   held back after `finish` (which returns the file for its fsync), and
//!   nothing is written after an error (the caller drops the temp file).
//! - Writes start at page-aligned file offsets whenever the bytes allow it
//!   (everything but the file's start and a caller's explicit `flush`):
//!   a write that covers only part of a new page makes the kernel zero the
//!   rest and merge, which was visible in profiles of unaligned 64 KiB
//!   writes (hsmseal's payload follows a header of odd length).
//! - Write-back of every `WRITEBACK_EVERY` bytes written is started right
//!   away (`sync_file_range(SYNC_FILE_RANGE_WRITE)` on Linux, as RocksDB's
//!   `bytes_per_sync` does), so the disk works while the data is still
//!   being produced and the closing fsync covers only the tail. It is a
//!   hint: it makes nothing durable, its failure is ignored here, and the
//!   fsync in `AtomicFile::commit` remains what makes the file durable
//!   and what reports a write-back error.

use std::fs::File;
use std::io::{self, Write};

/// The kernel's page size on every platform hsmseal runs on (x86-64,
/// aarch64 with 4 KiB pages); a larger real page only costs alignment,
/// never correctness.
const PAGE: usize = 4096;
/// Small writes are gathered up to this much before going out.
const STAGE: usize = 256 * 1024;
/// Bytes written between two starts of write-back: small enough that the
/// disk is kept busy from the first seconds, large enough that the calls
/// cost nothing (128 per GiB).
pub(super) const WRITEBACK_EVERY: u64 = 8 << 20;

pub(super) struct DurableWriter {
    file: File,
    /// Bytes for file offsets `written..written + buf.len()`.
    buf: Vec<u8>,
    /// Bytes handed to `write(2)` so far.
    written: u64,
    /// Start of the bytes whose write-back has not been started yet.
    writeback_from: u64,
}

impl DurableWriter {
    pub(super) fn new(file: File) -> Self {
        DurableWriter {
            file,
            buf: Vec::with_capacity(STAGE),
            written: 0,
            writeback_from: 0,
        }
    }

    /// Writes out what is buffered and hands the file back.
    pub(super) fn finish(mut self) -> io::Result<File> {
        self.flush_buf()?;
        Ok(self.file)
    }

    fn write_out(&mut self, data: &[u8]) -> io::Result<()> {
        (&self.file).write_all(data)?;
        self.written += data.len() as u64;
        if self.written - self.writeback_from >= WRITEBACK_EVERY {
            start_writeback(&self.file, self.writeback_from, self.written);
            self.writeback_from = self.written;
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let r = self.write_out(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }
}

impl Write for DurableWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_all(data)?;
        Ok(data.len())
    }

    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        if self.buf.len() + data.len() <= STAGE {
            self.buf.extend_from_slice(data);
            if self.buf.len() == STAGE {
                self.flush_buf()?;
            }
            return Ok(());
        }
        if !self.buf.is_empty() {
            // Top the buffer up to a page boundary of the file and send it.
            // The top-up is under a page and fits (STAGE is whole pages),
            // and `data` holds it, or the first branch would have taken it.
            let end = self.written + self.buf.len() as u64;
            let k = ((PAGE - (end % PAGE as u64) as usize) % PAGE).min(data.len());
            self.buf.extend_from_slice(&data[..k]);
            data = &data[k..];
            self.flush_buf()?;
        }
        if data.len() < STAGE {
            self.buf.extend_from_slice(data);
            return Ok(());
        }
        // Large: whole pages straight from the caller's buffer, the rest
        // (under a page) kept for the next write.
        let direct = data.len() / PAGE * PAGE;
        self.write_out(&data[..direct])?;
        self.buf.extend_from_slice(&data[direct..]);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf()
    }
}

/// Starts write-back of file bytes `from..to` without waiting for it.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, from: u64, to: u64) {
    use std::os::unix::io::AsRawFd;
    let (Ok(off), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
        return;
    };
    // SAFETY: a plain syscall on a descriptor this writer owns; no memory
    // is passed. Errors are ignored: see the module invariants.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _from: u64, _to: u64) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Any mix of write sizes gives the same bytes, in order, and the file
    /// is complete after `finish`.
    #[test]
    fn writes_of_every_shape_arrive_whole_and_in_order() {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 * STAGE + 2 * WRITEBACK_EVERY as usize + 12345))
            .map(|i| (i * 31 + i / 4093) as u8)
            .collect();
        let shapes: [&[usize]; 5] = [
            &[1, 3, 4093, 1],
            &[56, 1_033_200],
            &[1080, 65536, 7],
            &[STAGE, PAGE - 1, 3 * STAGE + 5],
            &[4096, 100_000, 1, 1_032_192],
        ];
        for (n, shape) in shapes.iter().enumerate() {
            let p = d.path().join(format!("f{n}"));
            let mut w = DurableWriter::new(File::create(&p).unwrap());
            let (mut at, mut i) = (0, 0);
            while at < data.len() {
                let len = shape[i % shape.len()].min(data.len() - at);
                if i % 7 == 3 {
                    w.write_all(&data[at..at + len]).unwrap();
                } else {
                    // `write` promises all of it, as `write_all` does.
                    assert_eq!(w.write(&data[at..at + len]).unwrap(), len);
                }
                if i % 11 == 5 {
                    w.flush().unwrap();
                }
                at += len;
                i += 1;
            }
            drop(w.finish().unwrap());
            let mut got = Vec::new();
            File::open(&p).unwrap().read_to_end(&mut got).unwrap();
            assert!(got == data, "shape {shape:?}: bytes differ");
        }
    }

    /// A failing write is reported, not swallowed (here: a descriptor open
    /// for reading only).
    #[test]
    fn write_errors_surface() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ro");
        std::fs::write(&p, b"").unwrap();
        let mut w = DurableWriter::new(File::open(&p).unwrap());
        assert!(w.write_all(&vec![7u8; 2 * STAGE]).is_err());
        let mut w = DurableWriter::new(File::open(&p).unwrap());
        w.write_all(b"small, buffered").unwrap();
        assert!(w.finish().is_err());
    }
}
