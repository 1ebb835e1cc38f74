//! Properties of the streaming payload format beyond the Wycheproof vectors:
//! round trips at every size that matters (chunk and batch boundaries), with
//! one and several threads and with readers and writers that move a few
//! bytes at a time; and rejection of every kind of damage (truncation at
//! every length, every single-bit flip, reordered, duplicated, dropped or
//! spliced chunks, trailing data, wrong key or context), releasing nothing
//! but the chunks that authenticated before the damage.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use hsmseal::error::{Error, ErrorKind};
use hsmseal::secret::SecretKey;
use hsmseal::stream::{self, StreamOptions, CHUNK_SIZE, PAYLOAD_HEADER_LEN, TAG_LEN};
use proptest::prelude::*;

const ENC: usize = CHUNK_SIZE + TAG_LEN;
/// Chunks per internal batch: an implementation detail, not part of the
/// format, but the sizes around it take different paths.
const BATCH: usize = 63;

fn key() -> SecretKey {
    SecretKey::from_bytes([0x42; 32])
}

fn opts(threads: usize) -> StreamOptions<'static> {
    StreamOptions {
        threads,
        progress: None,
    }
}

/// Deterministic pseudo-random test data (xorshift), different per length.
fn data(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ len as u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn seal(pt: &[u8], ctx: &[u8], threads: usize) -> Vec<u8> {
    let mut ct = Vec::new();
    let n = stream::encrypt(&key(), ctx, pt, &mut ct, &opts(threads)).expect("encrypt");
    assert_eq!(n, pt.len() as u64);
    ct
}

fn seal_salt(pt: &[u8], salt: u8) -> Vec<u8> {
    let mut ct = Vec::new();
    stream::encrypt_with_salt(&key(), b"ctx", &[salt; 24], pt, &mut ct, &opts(1)).unwrap();
    ct
}

/// Decrypts, returning what was released and the outcome.
fn open(ct: &[u8], ctx: &[u8], threads: usize) -> (Vec<u8>, Result<u64, Error>) {
    let mut out = Vec::new();
    let r = stream::decrypt(&key(), ctx, ct, &mut out, &opts(threads));
    (out, r)
}

/// Asserts a decryption failed with an integrity error, released only whole
/// authenticated chunks of `pt`, at most `max_chunks` of them.
fn assert_rejected(ct: &[u8], pt: &[u8], threads: usize, max_chunks: usize, what: &str) {
    let (out, r) = open(ct, b"ctx", threads);
    let e = match r {
        Ok(n) => panic!("{what}: accepted ({n} bytes)"),
        Err(e) => e,
    };
    assert_eq!(e.kind(), ErrorKind::Integrity, "{what}: {e}");
    assert!(
        out.len() % CHUNK_SIZE == 0,
        "{what}: partial chunk released"
    );
    assert!(
        out.len() <= max_chunks * CHUNK_SIZE,
        "{what}: released too much"
    );
    assert_eq!(
        out[..],
        pt[..out.len()],
        "{what}: released bytes are not the plaintext"
    );
}

/// Reader handing out at most `step` bytes a call, interrupted now and then.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
    calls: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls.is_multiple_of(7) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(self.step).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Writer accepting at most `step` bytes a call, interrupted now and then.
struct TrickleOut {
    out: Vec<u8>,
    step: usize,
    calls: usize,
}

impl Write for TrickleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls.is_multiple_of(5) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(self.step);
        self.out.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn round_trip(len: usize, threads: usize) {
    let pt = data(len);
    let progress = AtomicU64::new(0);
    let o = StreamOptions {
        threads,
        progress: Some(&progress),
    };
    let mut ct = Vec::new();
    assert_eq!(
        stream::encrypt(&key(), b"ctx", &pt[..], &mut ct, &o).unwrap(),
        len as u64
    );
    assert_eq!(
        progress.load(Ordering::Relaxed),
        len as u64,
        "encrypt progress"
    );
    assert_eq!(
        ct.len() as u64,
        stream::ciphertext_len(len as u64),
        "len {len}"
    );
    assert_eq!(stream::plaintext_len(ct.len() as u64), Some(len as u64));

    progress.store(0, Ordering::Relaxed);
    let mut out = Vec::new();
    let n = stream::decrypt(&key(), b"ctx", &ct[..], &mut out, &o).unwrap();
    assert_eq!(n, len as u64);
    assert!(out == pt, "len {len} threads {threads}: round trip differs");
    assert_eq!(
        progress.load(Ordering::Relaxed),
        len as u64,
        "decrypt progress"
    );
    assert_eq!(
        stream::verify(&key(), b"ctx", &ct[..], &o).unwrap(),
        len as u64
    );
}

#[test]
fn round_trips_at_chunk_and_batch_boundaries() {
    let small = [
        0,
        1,
        CHUNK_SIZE - 1,
        CHUNK_SIZE,
        CHUNK_SIZE + 1,
        3 * CHUNK_SIZE,
        3 * CHUNK_SIZE + 5,
    ];
    for len in small {
        for threads in [1, 2, 3] {
            round_trip(len, threads);
        }
    }
    // Around the internal batch size, where the final chunk moves to its
    // own batch.
    for len in [
        BATCH * CHUNK_SIZE - 1,
        BATCH * CHUNK_SIZE,
        BATCH * CHUNK_SIZE + 1,
    ] {
        for threads in [1, 2] {
            round_trip(len, threads);
        }
    }
}

#[test]
fn several_mib_through_the_pipeline() {
    // More batches than the pipeline keeps in flight with two threads, so
    // batch buffers are recycled while others are still being processed.
    round_trip((7 << 20) + 12345, 2);
    round_trip((2 << 20) + 1, 1);
}

#[test]
fn same_salt_gives_same_bytes_whatever_the_threads() {
    let pt = data(2 * BATCH * CHUNK_SIZE + 77);
    let salt = [9u8; 24];
    let mut outs = Vec::new();
    for threads in [1, 2, 4] {
        let mut ct = Vec::new();
        stream::encrypt_with_salt(&key(), b"c", &salt, &pt[..], &mut ct, &opts(threads)).unwrap();
        outs.push(ct);
    }
    assert!(outs[0] == outs[1] && outs[1] == outs[2]);
    assert_eq!(outs[0][..24], salt);
}

#[test]
fn salts_are_random() {
    let a = seal(b"x", b"", 1);
    let b = seal(b"x", b"", 1);
    assert_ne!(a[..24], b[..24]);
    assert_ne!(a, b);
}

#[test]
fn short_reads_short_writes_and_interrupts() {
    let pt = data(3 * CHUNK_SIZE + 999);
    for threads in [1, 2] {
        for step in [1000, 7 * 1024 + 3] {
            let mut ct = TrickleOut {
                out: Vec::new(),
                step,
                calls: 0,
            };
            let rd = Trickle {
                data: &pt,
                step,
                calls: 0,
            };
            stream::encrypt(&key(), b"ctx", rd, &mut ct, &opts(threads)).unwrap();
            let mut out = TrickleOut {
                out: Vec::new(),
                step,
                calls: 0,
            };
            let rd = Trickle {
                data: &ct.out,
                step,
                calls: 0,
            };
            stream::decrypt(&key(), b"ctx", rd, &mut out, &opts(threads)).unwrap();
            assert!(out.out == pt, "step {step} threads {threads}");
        }
    }
}

#[test]
fn every_truncation_is_rejected() {
    // Two chunks: a full one and a short final one.
    let pt = data(CHUNK_SIZE + 40);
    let ct = seal(&pt, b"ctx", 1);
    assert_eq!(ct.len(), PAYLOAD_HEADER_LEN + ENC + 40 + TAG_LEN);
    for len in 0..ct.len() {
        assert_eq!(stream::plaintext_len(len as u64).is_some(), {
            let body = len.saturating_sub(PAYLOAD_HEADER_LEN);
            len >= PAYLOAD_HEADER_LEN && body % ENC >= TAG_LEN
        });
        // Cutting inside chunk 1 may release chunk 0, which authenticated.
        let max = usize::from(len >= PAYLOAD_HEADER_LEN + ENC);
        assert_rejected(&ct[..len], &pt, 1, max, &format!("truncated to {len}"));
    }
    // The same through the threaded pipeline, at the lengths that matter.
    for len in [
        0,
        55,
        56,
        57,
        71,
        72,
        56 + ENC - 1,
        56 + ENC,
        56 + ENC + 15,
        ct.len() - 1,
    ] {
        assert_rejected(
            &ct[..len],
            &pt,
            2,
            1,
            &format!("truncated to {len}, threads 2"),
        );
    }
}

#[test]
fn full_chunk_at_the_end_is_truncation() {
    // Exactly one full chunk: the payload must end with an empty chunk.
    let pt = data(CHUNK_SIZE);
    let ct = seal(&pt, b"ctx", 1);
    assert_eq!(ct.len(), PAYLOAD_HEADER_LEN + ENC + TAG_LEN);
    for threads in [1, 2] {
        let (out, r) = open(&ct[..ct.len() - TAG_LEN], b"ctx", threads);
        let e = r.unwrap_err();
        assert!(e.message().starts_with("truncated"), "{e}");
        // The full chunk authenticated, so it may be released, but the
        // stream still fails.
        assert!(out == pt);
    }
    // Header only.
    let (out, r) = open(&ct[..PAYLOAD_HEADER_LEN], b"ctx", 1);
    assert!(r.unwrap_err().message().starts_with("truncated"));
    assert!(out.is_empty());
}

#[test]
fn every_bit_flip_is_rejected() {
    // A one-chunk payload: every bit of salt, commitment, body and tag.
    let pt = data(37);
    let ct = seal(&pt, b"ctx", 1);
    for i in 0..ct.len() * 8 {
        let mut bad = ct.clone();
        bad[i / 8] ^= 1 << (i % 8);
        assert_rejected(&bad, &pt, 1, 0, &format!("bit {i} flipped"));
    }
    // A three-chunk payload through the pipeline: one bit in every 97th byte
    // and in every byte of the header and the tags. A flip in chunk k may
    // release chunks before k only.
    let pt = data(2 * CHUNK_SIZE + 100);
    let ct = seal(&pt, b"ctx", 2);
    let tag_bytes = (0..3).flat_map(|k| {
        let end = (PAYLOAD_HEADER_LEN + (k + 1) * ENC).min(ct.len());
        end - TAG_LEN..end
    });
    let positions: Vec<usize> = (0..PAYLOAD_HEADER_LEN)
        .chain((PAYLOAD_HEADER_LEN..ct.len()).step_by(97))
        .chain(tag_bytes)
        .collect();
    for (n, &pos) in positions.iter().enumerate() {
        let mut bad = ct.clone();
        bad[pos] ^= 1 << (n % 8);
        let chunk = pos.saturating_sub(PAYLOAD_HEADER_LEN) / ENC;
        let max = if pos < PAYLOAD_HEADER_LEN { 0 } else { chunk };
        assert_rejected(&bad, &pt, 2, max, &format!("byte {pos} flipped"));
    }
}

fn chunk(ct: &[u8], k: usize) -> &[u8] {
    let start = PAYLOAD_HEADER_LEN + k * ENC;
    &ct[start..(start + ENC).min(ct.len())]
}

#[test]
fn reordered_duplicated_dropped_and_spliced_chunks_are_rejected() {
    let pt = data(3 * CHUNK_SIZE + 10);
    let ct = seal_salt(&pt, 1);
    let header = &ct[..PAYLOAD_HEADER_LEN];
    let build = |order: &[usize]| -> Vec<u8> {
        let mut v = header.to_vec();
        for &k in order {
            v.extend_from_slice(chunk(&ct, k));
        }
        v
    };
    assert!(open(&build(&[0, 1, 2, 3]), b"ctx", 1).1.is_ok());
    for threads in [1, 2] {
        assert_rejected(
            &build(&[1, 0, 2, 3]),
            &pt,
            threads,
            0,
            "chunks 0 and 1 swapped",
        );
        assert_rejected(
            &build(&[0, 2, 1, 3]),
            &pt,
            threads,
            1,
            "chunks 1 and 2 swapped",
        );
        assert_rejected(&build(&[0, 0, 2, 3]), &pt, threads, 1, "chunk 0 duplicated");
        assert_rejected(&build(&[0, 2, 3]), &pt, threads, 1, "chunk 1 dropped");
        assert_rejected(&build(&[0, 1, 2]), &pt, threads, 3, "final chunk dropped");
        assert_rejected(&build(&[0, 1, 3, 2]), &pt, threads, 2, "final chunk moved");
        assert_rejected(
            &build(&[0, 1, 2, 3, 3]),
            &pt,
            threads,
            3,
            "final chunk repeated",
        );
    }
    // A chunk from another payload under the same key and context, at the
    // same position (same counter), still fails: the salt changes the key.
    let other = seal_salt(&pt, 2);
    let mut spliced = ct.clone();
    let at = PAYLOAD_HEADER_LEN + ENC;
    spliced[at..at + ENC].copy_from_slice(chunk(&other, 1));
    assert_rejected(&spliced, &pt, 2, 1, "chunk spliced from another payload");
    let (_, r) = open(&spliced, b"ctx", 1);
    let msg = r.unwrap_err().to_string();
    let expected = format!("authentication failed at chunk 1 (payload offset {at})");
    assert!(msg.starts_with(&expected), "{msg}");
}

#[test]
fn trailing_data_is_rejected() {
    let pt = data(CHUNK_SIZE + 5);
    let ct = seal(&pt, b"ctx", 1);
    let extra_chunk = chunk(&seal(&data(CHUNK_SIZE), b"ctx", 1), 0).to_vec();
    for extra in [
        vec![0u8],
        vec![0; 15],
        vec![0; 16],
        vec![0xff; ENC],
        extra_chunk,
    ] {
        let mut bad = ct.clone();
        bad.extend_from_slice(&extra);
        for threads in [1, 2] {
            assert_rejected(
                &bad,
                &pt,
                threads,
                1,
                &format!("{} trailing bytes", extra.len()),
            );
        }
    }
}

#[test]
fn wrong_key_or_context_fails_before_any_chunk() {
    let pt = data(2 * CHUNK_SIZE);
    let ct = seal(&pt, b"app.users/ssn", 2);
    for ctx in [&b""[..], b"app.users/ssm", b"app.users/ssn\0"] {
        let (out, r) = open(&ct, ctx, 2);
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Integrity);
        assert!(e.message().contains("commitment"), "{e}");
        assert!(out.is_empty());
    }
    let other = SecretKey::from_bytes([0x43; 32]);
    let mut out = Vec::new();
    let e = stream::decrypt(&other, b"app.users/ssn", &ct[..], &mut out, &opts(1)).unwrap_err();
    assert!(e.message().contains("commitment"), "{e}");
    assert!(out.is_empty());
    assert!(stream::verify(&other, b"app.users/ssn", &ct[..], &opts(2)).is_err());
}

#[test]
fn failure_in_a_later_batch_releases_exactly_the_prefix() {
    // Chunks 70 and 150 damaged, in the second and third batches; several
    // batches are in flight at once with threads, and later ones finish
    // first, yet only chunks 0..70 may come out and chunk 70 is reported.
    let pt = data(200 * CHUNK_SIZE + 3);
    let mut ct = seal(&pt, b"ctx", 2);
    for k in [70, 150] {
        ct[PAYLOAD_HEADER_LEN + k * ENC + 100] ^= 0x80;
    }
    for threads in [1, 2] {
        let (out, r) = open(&ct, b"ctx", threads);
        let e = r.unwrap_err();
        assert!(e.message().contains("chunk 70 "), "{e}");
        assert_eq!(out.len(), 70 * CHUNK_SIZE);
        assert!(out[..] == pt[..out.len()]);
    }
    assert!(stream::verify(&key(), b"ctx", &ct[..], &opts(2)).is_err());
}

#[test]
fn key_size_is_checked() {
    let ct = seal(b"hello", b"", 1);
    for len in [0, 16, 31, 33, 64] {
        let e =
            stream::decrypt_with_key_bytes(&vec![0x42; len], b"", &ct[..], Vec::new(), &opts(1))
                .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage);
    }
    let mut out = Vec::new();
    stream::decrypt_with_key_bytes(&[0x42; 32], b"", &ct[..], &mut out, &opts(1)).unwrap();
    assert_eq!(out, b"hello");
}

struct FailingReader<'a> {
    data: &'a [u8],
}

impl Read for FailingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.data.is_empty() {
            return Err(io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

struct FailingWriter {
    room: usize,
}

impl Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.room == 0 {
            return Err(io::Error::other("no space left"));
        }
        let n = buf.len().min(self.room);
        self.room -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn io_errors_are_reported_as_io() {
    let pt = data(3 * BATCH * CHUNK_SIZE / 2);
    let ct = seal(&pt, b"ctx", 1);
    for threads in [1, 2] {
        let o = opts(threads);
        let e = stream::encrypt(
            &key(),
            b"ctx",
            FailingReader {
                data: &pt[..100_000],
            },
            Vec::new(),
            &o,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(
            e.message().starts_with("reading input: disk on fire"),
            "{e}"
        );

        let e = stream::encrypt(
            &key(),
            b"ctx",
            &pt[..],
            FailingWriter { room: 1_200_000 },
            &o,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(
            e.message().starts_with("writing output: no space left"),
            "{e}"
        );

        let e = stream::decrypt(
            &key(),
            b"ctx",
            FailingReader {
                data: &ct[..1_100_000],
            },
            Vec::new(),
            &o,
        )
        .unwrap_err();
        assert!(
            e.message().starts_with("reading input: disk on fire"),
            "{e}"
        );
        let e = stream::decrypt(
            &key(),
            b"ctx",
            FailingReader { data: &ct[..10] },
            Vec::new(),
            &o,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");

        let e = stream::decrypt(
            &key(),
            b"ctx",
            &ct[..],
            FailingWriter { room: 1_200_000 },
            &o,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(
            e.message().starts_with("writing output: no space left"),
            "{e}"
        );
    }
}

#[test]
fn errors_are_one_line_and_never_show_the_key() {
    let pt = data(CHUNK_SIZE + 1);
    let ct = seal(&pt, b"ctx", 1);
    let mut bad = ct.clone();
    bad[PAYLOAD_HEADER_LEN + 3] ^= 1;
    let errors = [
        open(&bad, b"ctx", 1).1.unwrap_err(),
        open(&ct, b"other", 1).1.unwrap_err(),
        open(&ct[..ct.len() - 20], b"ctx", 1).1.unwrap_err(),
        open(&ct[..10], b"ctx", 1).1.unwrap_err(),
    ];
    for e in errors {
        let s = e.to_string();
        assert!(!s.contains('\n'), "{s}");
        assert!(!s.to_lowercase().contains("4242"), "{s}");
        assert!(!s.contains("[66, 66"), "{s}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn prop_round_trip(
        len in 0usize..(4 * CHUNK_SIZE + 50),
        ctx in proptest::collection::vec(any::<u8>(), 0..40),
        threads in 1usize..4,
        step in 1usize..20_000,
    ) {
        let pt = data(len);
        let mut ct = Vec::new();
        let rd = Trickle { data: &pt, step, calls: 0 };
        stream::encrypt(&key(), &ctx, rd, &mut ct, &opts(threads)).unwrap();
        prop_assert_eq!(ct.len() as u64, stream::ciphertext_len(len as u64));
        prop_assert_eq!(stream::plaintext_len(ct.len() as u64), Some(len as u64));
        let (out, r) = open(&ct, &ctx, threads);
        prop_assert_eq!(r.unwrap(), len as u64);
        prop_assert!(out == pt);
        // Any other context is refused at the commitment.
        let mut other = ctx.clone();
        other.push(0);
        let (out, r) = open(&ct, &other, threads);
        prop_assert!(r.is_err());
        prop_assert!(out.is_empty());
    }

    #[test]
    fn prop_random_damage_is_rejected(
        len in 1usize..(3 * CHUNK_SIZE),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
        threads in 1usize..3,
    ) {
        let pt = data(len);
        let mut ct = seal(&pt, b"ctx", 1);
        let p = pos.index(ct.len());
        ct[p] ^= 1 << bit;
        let chunk = p.saturating_sub(PAYLOAD_HEADER_LEN) / ENC;
        let max = if p < PAYLOAD_HEADER_LEN { 0 } else { chunk };
        assert_rejected(&ct, &pt, threads, max, "random flip");
    }

    #[test]
    fn prop_lengths_agree(n in any::<u64>()) {
        let n = n >> 20; // keep ciphertext_len from overflowing
        prop_assert_eq!(stream::plaintext_len(stream::ciphertext_len(n)), Some(n));
        prop_assert_eq!(stream::plaintext_len(stream::ciphertext_len(n) + 1).is_some(), n % CHUNK_SIZE as u64 != CHUNK_SIZE as u64 - 1);
    }
}
