//! Rewrapping a file's data key under the current KWK version, in place
//! (`hsmseal rewrap`, alias `rotate`), and re-encrypting a file under a
//! fresh data key (`rewrap --reencrypt`).
//!
//! `rewrap` reads only the header and the payload's first and last pieces
//! (commitment and final chunk, to authenticate the data key and the file
//! length), so rewrapping a 1 MiB file and a 10 GiB file cost the same. It
//! then writes the data key, wrapped under the new KWK, into the header's
//! idle envelope place with the next sequence number, fsyncs, clears the old
//! envelope, fsyncs. Killed at any instant, the file keeps at least one
//! complete envelope and decrypts under the old or the new version
//! (docs/FORMAT.md, section 5). The payload is never written.
//!
//! `reencrypt` is for a suspected data-key exposure: a fresh data key and a
//! new payload, written to a temporary file and renamed over the original
//! only once the old payload fully authenticated.
//!
//! Concurrency: both hold the file's exclusive lock (`fs::LockedFile`)
//! from before they read the header until their last write or the rename,
//! and read the header only under it. Without it, two rewraps of one file
//! each cleared the envelope the other had just written and left none at
//! all (issue 9). Waiting for the lock ends on the file the path names then:
//! after a `--reencrypt` renamed a new file over it, the waiter rewraps the
//! new file, not the orphaned old one.

use super::file;
use super::header::{self, Envelope, Header, ENVELOPE_LEN, ENVELOPE_OFFSETS, HEADER_LEN};
use crate::backend::{KeyBackend, KeyRef};
use crate::error::{Error, Result};
use crate::fs::{AtomicFile, LockedFile};
use crate::secret::SecretKey;
use crate::stream::{self, StreamOptions};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::sync::mpsc;
use zeroize::Zeroizing;

/// What a rewrap or re-encryption did (or, with `dry_run`, would do) to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Already under the target key version, by its header: nothing
    /// written, no HSM call, not authenticated (see [`rewrap`]).
    Unchanged(KeyRef),
    /// Envelope rewritten from the first to the second key version.
    Rewrapped { from: KeyRef, to: KeyRef },
    /// `dry_run`: would be rewrapped.
    WouldRewrap { from: KeyRef, to: KeyRef },
}

/// The key version a file should end up under: `name` (default: the key the
/// file is under now) at its current version.
fn target_for(backend: &dyn KeyBackend, now: &KeyRef, name: Option<&str>) -> Result<KeyRef> {
    let name = name.unwrap_or(&now.name).to_string();
    Ok(KeyRef {
        version: backend.current_version(&name)?,
        name,
    })
}

/// The file at `path`, exclusively locked (writable unless `dry_run`).
fn lock(path: &Path, dry_run: bool) -> Result<LockedFile> {
    LockedFile::open(path, !dry_run)
}

/// Reads and checks (format, envelope checksums) the header; no HSM call.
fn read_header(f: &mut File) -> Result<Header> {
    f.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(format!("reading input: {e}")))?;
    Ok(file::read_header(f)?.0)
}

/// Reads and checks the header, unwraps the data key and authenticates it
/// against the payload (commitment and final chunk). Nothing is written.
fn authenticate(backend: &dyn KeyBackend, f: &mut File) -> Result<(Header, SecretKey, u64)> {
    let len = f
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat: {e}")))?
        .len();
    let hdr = read_header(f)?;
    let (dek, _) = file::unwrap_dek(backend, &hdr)?;
    let plain = stream::authenticate_key_and_length(
        &dek,
        &header::payload_context(),
        f,
        len - HEADER_LEN as u64,
    )?;
    Ok((hdr, dek, plain))
}

/// Rewraps the file's data key under `name`'s current version, in place.
///
/// [`Outcome::Unchanged`] costs no HSM call: it means the header is well
/// formed and its envelope in force already names the target version, so
/// there is nothing to rewrap and nothing was written. It does not
/// authenticate the file (an unwrap and the payload's first and last
/// pieces would; `verify` does all of it): a file already on the current
/// version is not made any more readable by a rewrap, and a nightly rewrap
/// of a tree should cost the HSM nothing for files it moved the night
/// before. Whatever is written is authenticated first.
pub fn rewrap(
    backend: &dyn KeyBackend,
    path: &Path,
    name: Option<&str>,
    dry_run: bool,
) -> Result<Outcome> {
    // Held until the second fsync: the header is read, checked and
    // rewritten by this process alone.
    let mut locked = lock(path, dry_run)?;
    // The cheapest correct check first: the header says which version the
    // data key is under, and the target needs no wrap or unwrap to find.
    let now = read_header(locked.file_mut())?.active().1.kwk.clone();
    let to = target_for(backend, &now, name)?;
    if to == now {
        return Ok(Outcome::Unchanged(now));
    }
    let (hdr, dek, _) = authenticate(backend, locked.file_mut())?;
    // The same header as above: it was read under the same lock.
    let (active_index, active) = hdr.active();
    let from = active.kwk.clone();
    // The sequence number is covered by the envelope checksum alone, so an
    // edited header can hold the largest one; wrapping it would write an
    // invalid envelope and then clear the valid one (found by fuzzing:
    // tests/fuzz_regressions.rs).
    let seq = active.seq.checked_add(1).ok_or_else(|| {
        Error::integrity(
            "header envelope sequence number is at its maximum (the header was edited); nothing was written: `hsmseal rotate --reencrypt` writes a fresh header",
        )
    })?;
    if dry_run {
        return Ok(Outcome::WouldRewrap { from, to });
    }
    let wrapped = backend.wrap(&to, &dek, &header::dek_aad(&to))?;
    drop(dek);
    let new_envelope = Envelope {
        seq,
        kwk: to.clone(),
        wrapped,
    };
    let idle = 1 - active_index;
    let f = locked.file();
    let sync = |f: &File| {
        f.sync_data()
            .map_err(|e| Error::io(format!("fsync during rotation: {e}")))
    };
    // 1. The new envelope into the idle place (its own sector), made durable.
    f.write_all_at(
        &header::encode_envelope(&new_envelope),
        ENVELOPE_OFFSETS[idle] as u64,
    )
    .map_err(|e| Error::io(format!("writing the new envelope: {e}")))?;
    sync(f)?;
    // 2. Only then clear the old envelope, so the file never depends on it
    //    again (a purge of the old key version cannot hurt it).
    f.write_all_at(&[0u8; ENVELOPE_LEN], ENVELOPE_OFFSETS[active_index] as u64)
        .map_err(|e| Error::io(format!("clearing the old envelope: {e}")))?;
    sync(f)?;
    Ok(Outcome::Rewrapped { from, to })
}

/// A `Write` that hands plaintext to another thread in zeroizing buffers.
struct ChannelWriter(mpsc::SyncSender<Zeroizing<Vec<u8>>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .send(Zeroizing::new(buf.to_vec()))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "re-encryption stopped"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The receiving end of `ChannelWriter`.
struct ChannelReader {
    rx: mpsc::Receiver<Zeroizing<Vec<u8>>>,
    current: Zeroizing<Vec<u8>>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(buf) => {
                    self.current = buf;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len() - self.pos);
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Re-encrypts the whole file under a fresh data key and `name`'s current
/// version (default: the file's key). The original is replaced atomically,
/// keeping its permissions, only if its payload authenticated completely.
/// A symbolic link named as `path` keeps pointing at the re-encrypted
/// target (the target is replaced, not the link).
pub fn reencrypt(
    backend: &dyn KeyBackend,
    path: &Path,
    name: Option<&str>,
    dry_run: bool,
    opts: &StreamOptions,
) -> Result<Outcome> {
    let real = std::fs::canonicalize(path).map_err(|e| Error::io(format!("cannot open: {e}")))?;
    // Held until the new file is renamed over this one: a rotation waiting
    // for it then finds the path naming the new file and works on that.
    let mut locked = lock(&real, dry_run)?;
    let (hdr, dek, _) = authenticate(backend, locked.file_mut())?;
    let from = hdr.active().1.kwk.clone();
    let to = target_for(backend, &from, name)?;
    if dry_run {
        return Ok(Outcome::WouldRewrap { from, to });
    }
    let f = locked.file_mut();
    let mode = f
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat: {e}")))?
        .permissions()
        .mode()
        & 0o7777;
    f.seek(SeekFrom::Start(HEADER_LEN as u64))
        .map_err(|e| Error::io(format!("reading input: {e}")))?;
    let mut out = AtomicFile::create(&real, mode, true)?;
    let (tx, rx) = mpsc::sync_channel(8);
    let threads = opts.threads;
    let decrypted = std::thread::scope(|s| {
        let reader = io::BufReader::with_capacity(crate::fs::IO_BUF, &mut *f);
        let dek = &dek;
        let worker = s.spawn(move || {
            let o = StreamOptions {
                threads,
                progress: None,
            };
            stream::decrypt(
                dek,
                &header::payload_context(),
                reader,
                ChannelWriter(tx),
                &o,
            )
        });
        let sealed = file::seal(
            backend,
            &to,
            ChannelReader {
                rx,
                current: Zeroizing::new(Vec::new()),
                pos: 0,
            },
            &mut out,
            opts,
        );
        let opened = worker
            .join()
            .unwrap_or_else(|_| Err(Error::integrity("re-encryption worker failed")));
        // The old payload's authentication failure is the cause to report
        // (the new file is then incomplete); otherwise a sealing error (which
        // also makes the decrypting side fail with a closed channel).
        match (opened, sealed) {
            (Err(e), _) if e.kind() == crate::error::ErrorKind::Integrity => Err(e),
            (_, Err(e)) => Err(e),
            (Err(e), Ok(_)) => Err(e),
            (Ok(_), Ok(_)) => Ok(()),
        }
    });
    decrypted?;
    out.commit_over(&locked)?;
    Ok(Outcome::Rewrapped { from, to })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    fn opts() -> StreamOptions<'static> {
        StreamOptions {
            threads: 2,
            progress: None,
        }
    }

    fn sealed_file(b: &MemoryBackend, dir: &Path, len: usize) -> (std::path::PathBuf, Vec<u8>) {
        let k = KeyRef {
            name: "k".into(),
            version: b.current_version("k").unwrap(),
        };
        let pt: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
        let p = dir.join(format!("f{len}"));
        let mut out = File::create(&p).unwrap();
        file::seal(b, &k, &pt[..], &mut out, &opts()).unwrap();
        (p, pt)
    }

    fn decrypt(b: &MemoryBackend, p: &Path) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        file::open(b, File::open(p).unwrap(), &mut out, &opts())?;
        Ok(out)
    }

    #[test]
    fn rewrap_changes_only_the_header_and_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let b = MemoryBackend::new();
        b.add_version("k");
        let (p, pt) = sealed_file(&b, d.path(), 50_000);
        let before = std::fs::read(&p).unwrap();
        b.add_version("k");
        let o = rewrap(&b, &p, None, false).unwrap();
        assert!(matches!(o, Outcome::Rewrapped { ref to, .. } if to.version == 2));
        let after = std::fs::read(&p).unwrap();
        assert_eq!(before[HEADER_LEN..], after[HEADER_LEN..], "payload changed");
        let h = Header::parse(&after).unwrap();
        assert_eq!(h.active().0, 1);
        assert!(h.envelopes[0].is_none(), "old envelope not cleared");
        assert_eq!(decrypt(&b, &p).unwrap(), pt);
        // Unchanged is told by the header: no backend call.
        let calls = b.calls();
        assert!(matches!(
            rewrap(&b, &p, None, false).unwrap(),
            Outcome::Unchanged(_)
        ));
        assert_eq!(b.calls(), calls);
        assert_eq!(std::fs::read(&p).unwrap(), after);
        // And back into place 0 on the next version.
        b.add_version("k");
        rewrap(&b, &p, None, false).unwrap();
        let h = Header::parse(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(
            (h.active().0, h.active().1.seq, h.active().1.kwk.version),
            (0, 3, 3)
        );
        assert_eq!(decrypt(&b, &p).unwrap(), pt);
    }

    #[test]
    fn dry_run_and_failures_leave_the_file_byte_identical() {
        let d = tempfile::tempdir().unwrap();
        let b = MemoryBackend::new();
        b.add_version("k");
        let (p, _) = sealed_file(&b, d.path(), 40_000);
        b.add_version("k");
        let orig = std::fs::read(&p).unwrap();
        assert!(matches!(
            rewrap(&b, &p, None, true).unwrap(),
            Outcome::WouldRewrap { .. }
        ));
        assert_eq!(std::fs::read(&p).unwrap(), orig);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", orig[..orig.len() - 5].to_vec()),
            ("final chunk", {
                let mut x = orig.clone();
                let n = x.len() - 3;
                x[n] ^= 1;
                x
            }),
            ("commitment", {
                let mut x = orig.clone();
                x[HEADER_LEN + 30] ^= 1;
                x
            }),
            ("wrapped key", {
                let mut x = orig.clone();
                x[256 + 100] ^= 1;
                x
            }),
        ];
        for (what, bytes) in cases {
            std::fs::write(&p, &bytes).unwrap();
            assert!(rewrap(&b, &p, None, false).is_err(), "{what} accepted");
            assert_eq!(std::fs::read(&p).unwrap(), bytes, "{what}: file changed");
            assert!(
                reencrypt(&b, &p, None, false, &opts()).is_err(),
                "{what} re-encrypted"
            );
            assert_eq!(std::fs::read(&p).unwrap(), bytes, "{what}: file changed");
        }
    }

    #[test]
    fn reencrypt_draws_a_new_key_and_keeps_the_plaintext_and_mode() {
        let d = tempfile::tempdir().unwrap();
        let b = MemoryBackend::new();
        b.add_version("k");
        let (p, pt) = sealed_file(&b, d.path(), 100_000);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let before = std::fs::read(&p).unwrap();
        b.add_version("k");
        reencrypt(&b, &p, None, false, &opts()).unwrap();
        let after = std::fs::read(&p).unwrap();
        assert_ne!(
            before[HEADER_LEN..HEADER_LEN + 56],
            after[HEADER_LEN..HEADER_LEN + 56]
        );
        assert_eq!(decrypt(&b, &p).unwrap(), pt);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "temp file left"
        );
        // A damaged middle chunk is only found by a full pass: reencrypt
        // refuses it and leaves the file alone.
        let mut bad = after.clone();
        bad[HEADER_LEN + 56 + 20_000] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        assert!(reencrypt(&b, &p, None, false, &opts()).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), bad);
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "temp file left"
        );
    }
}
