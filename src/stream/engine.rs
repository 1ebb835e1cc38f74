//! Batches of chunks, the per-batch AEAD work, and the two drivers that move
//! batches from the reader through the cipher to the writer: a sequential one
//! and a pipelined one with crypto worker threads.
//!
//! A batch buffer holds up to `BATCH_CHUNKS` chunk places of `ENC_CHUNK_LEN`
//! bytes. Sealing reads plaintext straight into the chunk places (one
//! vectored read per batch), encrypts each in place and puts its tag right
//! after it, so the sealed batch is one contiguous run of ciphertext. Opening reads
//! ciphertext contiguously and decrypts it in place, shifted so that the
//! plaintext ends up contiguous at the start of the buffer. Either way the
//! writer sends one contiguous run out with plain `write` calls (a
//! chunk-by-chunk `writev` to a file was markedly slower on the build
//! machines' file system). Buffers are allocated once per stream and
//! reused, so memory is constant.

use std::collections::VecDeque;
use std::io::{self, IoSliceMut, Read};
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use zeroize::Zeroize;

use super::kdf::{Derived, NONCE_LEN};
use super::params::{CHUNK_SIZE, ENC_CHUNK_LEN, TAG_LEN};
use crate::error::{Error, Result};

/// Chunks per batch: ~1 MiB, large enough that channel and syscall
/// overhead vanish, small enough to stay near the cores' caches. 63 rather
/// than 64: on the build machines' sandboxed file system, writes that are
/// aligned to 64 KiB or 1 MiB in the file were up to 3x slower than others,
/// and with 63 chunks (1 MiB - 16 KiB of plaintext) the writes drift off
/// those boundaries. Decrypting 1 GiB with 2 threads, interleaved runs:
/// 0.7-1.1 s with 63, 0.9-2.4 s with 64. One chunk less costs nothing
/// anywhere else.
pub(super) const BATCH_CHUNKS: usize = 63;
/// Bytes of a batch as stored.
pub(super) const BATCH_BYTES: usize = BATCH_CHUNKS * ENC_CHUNK_LEN;
/// Plaintext bytes of a full batch.
pub(super) const BATCH_PLAIN: usize = BATCH_CHUNKS * CHUNK_SIZE;

/// Most worker threads used, whatever the caller asks for. Sixteen already
/// outrun any disk; the cap bounds memory, as batches in flight grow with
/// workers (34 batches, ~34 MiB, at the cap).
const MAX_THREADS: usize = 16;

pub(super) struct Batch {
    pub(super) buf: Vec<u8>,
    /// Position of this batch in the stream, for writing batches in order.
    seq: u64,
    /// Counter of the first chunk in the batch.
    pub(super) first_chunk: u64,
    pub(super) n_chunks: usize,
    /// Length of the last chunk's bytes in this batch: plaintext when
    /// sealing, ciphertext including the tag when opening. Every other chunk
    /// of the batch is full-size.
    pub(super) tail_len: usize,
    /// Opening: how many leading chunks authenticated (and were decrypted).
    pub(super) authenticated: usize,
    /// An error the reader found right after this batch's chunks (a
    /// truncated stream). It is reported only once the chunks before it have
    /// been checked and released, so the first failure in stream order wins.
    pub(super) trailer: Option<Error>,
    /// How much of `buf` has ever held data, so that wiping it on drop costs
    /// what the stream used, not a full batch (short streams are common).
    used: usize,
}

/// Batch buffers kept per thread for the next stream: most bulk runs seal
/// or open many small files one after another, and allocating a fresh
/// zeroed 1 MiB buffer per file was the largest user-space cost after the
/// cryptography (glibc's calloc memsets it once its mmap threshold has
/// grown; perf, 2,000 files of 1-4 KiB, 2026-12-01). A pooled buffer was
/// wiped where it held data when its batch was dropped, like any other.
const POOL_PER_THREAD: usize = 4;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Batch {
    fn new() -> Self {
        let buf = POOL
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BATCH_BYTES]);
        Batch {
            buf,
            seq: 0,
            first_chunk: 0,
            n_chunks: 0,
            tail_len: 0,
            authenticated: 0,
            trailer: None,
            used: 0,
        }
    }

    /// Records that the first `len` bytes of the buffer now hold data.
    pub(super) fn touch(&mut self, len: usize) {
        self.used = self.used.max(len);
    }

    /// Sealing: bytes of ciphertext the batch holds once sealed.
    pub(super) fn sealed_len(&self) -> usize {
        (self.n_chunks - 1) * ENC_CHUNK_LEN + self.tail_len + TAG_LEN
    }

    /// Sealing: plaintext bytes in the batch.
    pub(super) fn plain_len(&self) -> usize {
        (self.n_chunks - 1) * CHUNK_SIZE + self.tail_len
    }
}

impl Drop for Batch {
    // Opening leaves plaintext in the buffer; do not hand it back to the
    // allocator readable.
    fn drop(&mut self) {
        self.buf[..self.used].zeroize();
        let buf = std::mem::take(&mut self.buf);
        // `try_with`: a batch dropped while its thread is exiting just frees.
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_PER_THREAD && buf.len() == BATCH_BYTES {
                p.push(buf);
            }
        });
    }
}

/// The AEAD with this stream's key, and the base nonce.
///
/// AES-256-GCM comes from ring: with VAES and VPCLMULQDQ it seals ~9.5 GB/s
/// per core on the build machines, against ~1.5 GB/s for the aes-gcm crate
/// (AES-NI and one-block-at-a-time CLMUL GHASH). On two cores that also do
/// the I/O, that difference decides whether a 1 GiB file goes faster than
/// `openssl enc`.
pub(super) struct ChunkCipher {
    /// Dropped by hand in `Drop`, then its bytes wiped (see there).
    aead: ManuallyDrop<LessSafeKey>,
    base_nonce: [u8; NONCE_LEN],
}

impl Drop for ChunkCipher {
    fn drop(&mut self) {
        self.base_nonce.zeroize();
        // The AES round keys and the GHASH key are as good as the stream
        // key, and ring never wipes them. So: first drop the key the normal
        // way (whatever ring's own destructor does, if it ever has one),
        // then overwrite the bytes it occupied, which this struct still
        // owns and which are dead from then on. Nothing here depends on
        // ring's internals; only key material ring might keep on the heap
        // would escape the wipe, and `ring_keys_live_inline` (a test) says
        // when that could start to matter.
        // SAFETY: `aead` is dropped exactly once, here, and never used again.
        unsafe { ManuallyDrop::drop(&mut self.aead) };
        let p = std::ptr::addr_of_mut!(self.aead).cast::<u8>();
        for i in 0..std::mem::size_of::<ManuallyDrop<LessSafeKey>>() {
            // SAFETY: `p` points to the bytes of the `aead` field, owned by
            // this struct; the value in them was dropped above and is never
            // read again. Raw volatile writes of plain bytes: no reference
            // to the dead value or its padding is formed, and the stores
            // are not optimised away.
            unsafe { p.add(i).write_volatile(0) };
        }
        compiler_fence(Ordering::SeqCst);
    }
}

impl ChunkCipher {
    pub(super) fn new(derived: &Derived) -> Self {
        // Fails only for a key that is not 32 bytes, and this one is.
        let key = UnboundKey::new(&AES_256_GCM, derived.aead_key())
            .expect("AES-256-GCM takes a 32-byte key");
        ChunkCipher {
            aead: ManuallyDrop::new(LessSafeKey::new(key)),
            base_nonce: derived.base_nonce(),
        }
    }

    /// base_nonce XOR the big-endian chunk counter in the last 8 bytes
    /// (the counter is below 2^38, so it never reaches the first 4 bytes).
    /// Unique per chunk, and every stream has its own key.
    fn nonce(&self, counter: u64) -> Nonce {
        let mut n = self.base_nonce;
        for (b, c) in n[NONCE_LEN - 8..].iter_mut().zip(counter.to_be_bytes()) {
            *b ^= c;
        }
        Nonce::assume_unique_for_key(n)
    }

    /// Encrypts every chunk of the batch in place and appends its tag.
    /// The reader ([`read_chunk_places`]) left each chunk's plaintext in its
    /// place, at `i * ENC_CHUNK_LEN`, with room for the tag behind it.
    pub(super) fn seal(&self, b: &mut Batch) {
        for i in 0..b.n_chunks {
            let len = if i + 1 == b.n_chunks {
                b.tail_len
            } else {
                CHUNK_SIZE
            };
            let place = &mut b.buf[i * ENC_CHUNK_LEN..i * ENC_CHUNK_LEN + len + TAG_LEN];
            let (data, tag_out) = place.split_at_mut(len);
            let nonce = self.nonce(b.first_chunk + i as u64);
            // Only fails for messages over 64 GiB; a chunk is 16 KiB.
            let tag = self
                .aead
                .seal_in_place_separate_tag(nonce, Aad::empty(), data)
                .expect("a chunk is far below the AES-GCM length limit");
            tag_out.copy_from_slice(tag.as_ref());
        }
    }

    /// Authenticates and decrypts chunks in order, stopping at the first
    /// that fails; `b.authenticated` says how many succeeded. Chunk `i`'s
    /// plaintext lands at `i * CHUNK_SIZE`, so the authenticated plaintext is
    /// contiguous at the start of the buffer and goes out in plain writes (a
    /// chunk-by-chunk `writev` to a file is markedly slower here). ring
    /// decrypts while it authenticates and zeroes a chunk whose tag is
    /// wrong; either way the writer releases only authenticated chunks.
    pub(super) fn open(&self, b: &mut Batch) {
        b.authenticated = 0;
        for i in 0..b.n_chunks {
            let len = if i + 1 == b.n_chunks {
                b.tail_len
            } else {
                ENC_CHUNK_LEN
            };
            let (start, end) = (i * ENC_CHUNK_LEN, i * ENC_CHUNK_LEN + len);
            let tag: [u8; TAG_LEN] = b.buf[end - TAG_LEN..end].try_into().expect("16 bytes");
            // Ciphertext at buf[start..end - TAG_LEN], plaintext written to
            // buf[i * CHUNK_SIZE..]: ring's in-place decryption with the
            // input shifted by `src`. The destination ends before the next
            // chunk's ciphertext starts, so nothing unread is overwritten.
            let dest = i * CHUNK_SIZE;
            let in_out = &mut b.buf[dest..end - TAG_LEN];
            let nonce = self.nonce(b.first_chunk + i as u64);
            if self
                .aead
                .open_in_place_separate_tag(
                    nonce,
                    Aad::empty(),
                    Tag::from(tag),
                    in_out,
                    start - dest..,
                )
                .is_err()
            {
                return;
            }
            b.authenticated += 1;
        }
    }
}

impl ChunkCipher {
    /// Authenticates and decrypts the single chunk `counter` held in
    /// `chunk` (ciphertext || tag), in place. Returns the plaintext length,
    /// or None if it does not authenticate (ring then zeroes the buffer).
    pub(super) fn open_one(&self, counter: u64, chunk: &mut [u8]) -> Option<usize> {
        let len = chunk.len().checked_sub(TAG_LEN)?;
        let tag: [u8; TAG_LEN] = chunk[len..].try_into().expect("16 bytes");
        self.aead
            .open_in_place_separate_tag(
                self.nonce(counter),
                Aad::empty(),
                Tag::from(tag),
                &mut chunk[..len],
                0..,
            )
            .ok()
            .map(|p| p.len())
    }
}

/// Reads until `buf` is full or the input ends (retrying interrupted reads);
/// returns the bytes read.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads plaintext into the chunk places of a batch buffer (`CHUNK_SIZE`
/// bytes at every `ENC_CHUNK_LEN`, leaving each tag's room free) until all
/// are full or the input ends; returns the bytes read. One `readv` fills the
/// whole batch from a file or pipe, so sealing needs no copy to spread the
/// plaintext out: moving 1 GiB within the buffers cost 13% of an encrypt's
/// CPU time (a third of what AES-GCM costs), the one copy `cat` does not
/// make. Readers without vectored reads fill one place per call, correctly.
pub(super) fn read_chunk_places(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut places: Vec<IoSliceMut<'_>> = buf
        .chunks_mut(ENC_CHUNK_LEN)
        .map(|c| {
            let len = CHUNK_SIZE.min(c.len());
            IoSliceMut::new(&mut c[..len])
        })
        .collect();
    let mut bufs = &mut places[..];
    let mut filled = 0;
    while !bufs.is_empty() {
        match r.read_vectored(bufs) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                IoSliceMut::advance_slices(&mut bufs, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Fills a batch from the input; returns true when the input has ended.
pub(super) type ReadFn<'a> = dyn FnMut(&mut Batch) -> Result<bool> + 'a;
/// The crypto applied to a batch; runs on worker threads.
pub(super) type CryptFn<'a> = dyn Fn(&mut Batch) + Sync + 'a;
/// Emits a processed batch; an error stops the stream.
pub(super) type WriteFn<'a> = dyn FnMut(&mut Batch) -> Result<()> + 'a;

/// Moves every batch of the stream through `read`, `crypt` and `write`, in
/// stream order for `write`, on `threads` threads in all. With more than
/// one, reading and writing stay on the calling thread (the reader and
/// writer need not be `Send`) while `threads - 1` workers run `crypt`, so
/// I/O overlaps with crypto. The calling thread counts as one of the
/// `threads`: it is busy with read and write syscalls (the kernel's copies
/// into and out of the page cache cost more than AES-GCM does), and
/// a worker more than there are cores only competes with it, and with the
/// kernel's write-back, for the same cores, and adds hand-offs.
pub(super) fn run(
    threads: usize,
    read: &mut ReadFn<'_>,
    crypt: &CryptFn<'_>,
    write: &mut WriteFn<'_>,
) -> Result<()> {
    let mut b = Batch::new();
    let last = read(&mut b)?;
    let workers = threads.saturating_sub(1).min(MAX_THREADS);
    if workers > 0 && !last {
        return run_parallel(workers, b, read, crypt, write);
    }
    // One thread, or a stream that fits one batch: starting workers would
    // cost more than it saves (bulk runs encrypt many small files).
    run_sequential(b, last, read, crypt, write)
}

/// Processes `b` (already read; `last` if the input ended in it) and the
/// rest of the stream on the calling thread.
fn run_sequential(
    mut b: Batch,
    mut last: bool,
    read: &mut ReadFn<'_>,
    crypt: &CryptFn<'_>,
    write: &mut WriteFn<'_>,
) -> Result<()> {
    loop {
        crypt(&mut b);
        write(&mut b)?;
        if last {
            return Ok(());
        }
        last = read(&mut b)?;
    }
}

/// What a worker hands back: the processed batch, or the sequence number of
/// a batch whose processing panicked.
type Done = std::result::Result<Batch, u64>;

fn worker_failed() -> Error {
    Error::io("internal error: a crypto worker thread failed")
}

/// Batches waiting for crypto, shared by the workers and the coordinator
/// (which takes one itself rather than sit idle waiting for a worker).
struct WorkQueue {
    state: Mutex<QueueState>,
    available: Condvar,
}

struct QueueState {
    batches: VecDeque<Batch>,
    /// No more batches will come: workers exit once the queue is empty.
    closed: bool,
}

impl WorkQueue {
    fn new(capacity: usize) -> Self {
        WorkQueue {
            state: Mutex::new(QueueState {
                batches: VecDeque::with_capacity(capacity),
                closed: false,
            }),
            available: Condvar::new(),
        }
    }

    // Nothing panics while the lock is held, so a poisoned lock cannot
    // happen; treat it as closed all the same rather than unwrap.
    fn push(&self, b: Batch) -> Result<()> {
        let mut st = self.state.lock().map_err(|_| worker_failed())?;
        st.batches.push_back(b);
        drop(st);
        self.available.notify_one();
        Ok(())
    }

    /// The oldest waiting batch, if any, without blocking.
    fn try_pop(&self) -> Option<Batch> {
        self.state.lock().ok()?.batches.pop_front()
    }

    /// The oldest waiting batch; blocks until there is one, or returns
    /// `None` once the queue is closed and empty.
    fn pop(&self) -> Option<Batch> {
        let mut st = self.state.lock().ok()?;
        loop {
            if let Some(b) = st.batches.pop_front() {
                return Some(b);
            }
            if st.closed {
                return None;
            }
            st = self.available.wait(st).ok()?;
        }
    }

    fn close(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.closed = true;
            // Batches nobody will process: drop (and wipe) them now.
            st.batches.clear();
        }
        self.available.notify_all();
    }
}

/// Closes the queue when the coordinator is done, however it leaves, so
/// that the workers exit and can be joined.
struct CloseOnDrop<'a>(&'a WorkQueue);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Runs `crypt` on a batch, turning a panic into a `Done` error.
fn process(crypt: &CryptFn<'_>, mut batch: Batch) -> Done {
    let seq = batch.seq;
    match catch_unwind(AssertUnwindSafe(|| crypt(&mut batch))) {
        Ok(()) => Ok(batch),
        Err(_) => Err(seq),
    }
}

fn run_parallel(
    workers: usize,
    first: Batch,
    read: &mut ReadFn<'_>,
    crypt: &CryptFn<'_>,
    write: &mut WriteFn<'_>,
) -> Result<()> {
    // Enough batches for every worker to have one in hand and one queued,
    // plus one being read and one being written: ~4 MiB with one worker,
    // ~34 MiB at most (MAX_THREADS).
    let in_flight = 2 * workers + 2;
    let queue = WorkQueue::new(in_flight);
    let (done_tx, done_rx) = mpsc::channel::<Done>();

    std::thread::scope(|s| {
        // `Builder::spawn_scoped` rather than `Scope::spawn`, which panics
        // when the system refuses a thread; with fewer workers, carry on.
        let handles: Vec<_> = (0..workers)
            .map_while(|_| {
                let done_tx = done_tx.clone();
                let queue = &queue;
                std::thread::Builder::new()
                    .name("hsmseal-crypto".into())
                    .spawn_scoped(s, move || worker(queue, done_tx, crypt))
                    .ok()
            })
            .collect();
        drop(done_tx);
        if handles.is_empty() {
            return run_sequential(first, false, read, crypt, write);
        }

        let result = {
            // Closing the queue (when this block ends, whatever the
            // outcome) is what tells the workers to exit; it must happen
            // before the joins below.
            let _close = CloseOnDrop(&queue);
            coordinate(in_flight, first, read, crypt, write, &queue, &done_rx)
        };
        // Join every worker by hand: a panicked worker then surfaces as an
        // error here instead of a panic out of `thread::scope`.
        let mut panicked = false;
        for h in handles {
            panicked |= h.join().is_err();
        }
        match result {
            Ok(()) if panicked => Err(worker_failed()),
            r => r,
        }
    })
}

fn worker(queue: &WorkQueue, done_tx: mpsc::Sender<Done>, crypt: &CryptFn<'_>) {
    while let Some(batch) = queue.pop() {
        if done_tx.send(process(crypt, batch)).is_err() {
            return; // the coordinator has gone
        }
    }
}

/// The calling thread's side of the pipeline: keeps up to `in_flight`
/// batches between reading and writing, reads ahead while workers encrypt,
/// writes finished batches strictly in stream order, and when it can
/// neither read nor write, processes a waiting batch itself. That last part
/// keeps a run from stalling on a worker the scheduler has not got round to
/// (the machines are small and shared), and costs nothing otherwise.
fn coordinate(
    in_flight: usize,
    first: Batch,
    read: &mut ReadFn<'_>,
    crypt: &CryptFn<'_>,
    write: &mut WriteFn<'_>,
    queue: &WorkQueue,
    done_rx: &mpsc::Receiver<Done>,
) -> Result<()> {
    let mut free: Vec<Batch> = Vec::with_capacity(in_flight);
    // Finished batches waiting for their turn, at index seq % in_flight.
    let mut ready: Vec<Option<Batch>> = (0..in_flight).map(|_| None).collect();
    let (mut next_read, mut next_write) = (0u64, 0u64);
    let mut input_done = false;
    // The batch `run` already read (seq 0) goes out first.
    let mut first = Some(first);

    let mut accept = |msg: Done,
                      ready: &mut Vec<Option<Batch>>,
                      free: &mut Vec<Batch>,
                      next_write: &mut u64|
     -> Result<()> {
        let b = msg.map_err(|_| worker_failed())?;
        let at = (b.seq % in_flight as u64) as usize;
        ready[at] = Some(b);
        // Write out every batch that is now next in order.
        loop {
            let at = (*next_write % in_flight as u64) as usize;
            let Some(mut b) = ready[at].take() else {
                return Ok(());
            };
            write(&mut b)?;
            *next_write += 1;
            free.push(b);
        }
    };

    loop {
        if !input_done && next_read - next_write < in_flight as u64 {
            let mut b = match first.take() {
                Some(b) => b, // read by `run`, known not to be the last
                None => {
                    let mut b = free.pop().unwrap_or_else(Batch::new);
                    input_done = read(&mut b)?;
                    b
                }
            };
            b.seq = next_read;
            next_read += 1;
            queue.push(b)?;
        } else if next_write == next_read {
            return Ok(());
        } else if let Some(b) = queue.try_pop() {
            let msg = process(crypt, b);
            accept(msg, &mut ready, &mut free, &mut next_write)?;
        } else {
            // Everything in flight is in a worker's hands.
            let msg = done_rx.recv().map_err(|_| worker_failed())?;
            accept(msg, &mut ready, &mut free, &mut next_write)?;
        }
        // Write whatever finished meanwhile, without waiting.
        while let Ok(msg) = done_rx.try_recv() {
            accept(msg, &mut ready, &mut free, &mut next_write)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::time::Duration;

    /// Drives `run` with `n` batches whose crypto is a cheap marker, so the
    /// pipeline's ordering and failure handling are tested with many more
    /// batches than are in flight, quickly even in debug builds.
    fn drive(
        threads: usize,
        n: u64,
        crypt: &CryptFn<'_>,
        fail_write_at: Option<u64>,
    ) -> (Vec<u64>, Result<()>) {
        let mut next = 0u64;
        let mut read = |b: &mut Batch| -> Result<bool> {
            b.first_chunk = next;
            b.n_chunks = 1;
            b.buf[..8].copy_from_slice(&next.to_le_bytes());
            b.touch(8);
            next += 1;
            Ok(next == n)
        };
        let mut written = Vec::new();
        let mut write = |b: &mut Batch| -> Result<()> {
            if Some(b.first_chunk) == fail_write_at {
                return Err(Error::io("writing output: full"));
            }
            // The marker must have been transformed by `crypt` for this batch.
            let v = u64::from_le_bytes(b.buf[..8].try_into().unwrap());
            assert_eq!(v, !b.first_chunk, "batch crypto and batch mixed up");
            written.push(b.first_chunk);
            Ok(())
        };
        let r = run(threads, &mut read, crypt, &mut write);
        (written, r)
    }

    fn invert(b: &mut Batch) {
        // Later batches finish first now and then.
        if b.first_chunk % 5 == 1 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let v = u64::from_le_bytes(b.buf[..8].try_into().unwrap());
        b.buf[..8].copy_from_slice(&(!v).to_le_bytes());
    }

    #[test]
    fn batches_are_written_in_order_and_buffers_reused() {
        for threads in [1, 2, 3, 8, 100] {
            for n in [1, 2, 100] {
                let (written, r) = drive(threads, n, &invert, None);
                r.unwrap();
                assert_eq!(written, (0..n).collect::<Vec<_>>(), "threads {threads}");
            }
        }
    }

    #[test]
    fn a_panicking_worker_is_an_error_not_a_panic() {
        let crypt = |b: &mut Batch| {
            if b.first_chunk == 17 {
                panic!("injected worker failure");
            }
            invert(b);
        };
        for threads in [2, 3] {
            let (written, r) = drive(threads, 60, &crypt, None);
            let e = r.unwrap_err();
            assert!(e.message().contains("worker"), "{e}");
            // Batches before the failed one, in order, and nothing after. (It
            // may stop sooner: the failure can arrive before earlier batches.)
            assert!(written.len() <= 17, "{written:?}");
            assert_eq!(written, (0..written.len() as u64).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_write_error_stops_the_stream() {
        for threads in [1, 2] {
            let (written, r) = drive(threads, 50, &invert, Some(9));
            assert_eq!(r.unwrap_err().kind(), ErrorKind::Io);
            assert_eq!(written, (0..9).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_read_error_stops_the_stream() {
        for threads in [1, 2] {
            let mut next = 0u64;
            let mut read = |b: &mut Batch| -> Result<bool> {
                if next == 12 {
                    return Err(Error::io("reading input: gone"));
                }
                b.first_chunk = next;
                next += 1;
                Ok(false)
            };
            let mut write = |_: &mut Batch| -> Result<()> { Ok(()) };
            let e = run(threads, &mut read, &|_| {}, &mut write).unwrap_err();
            assert_eq!(e.message(), "reading input: gone");
        }
    }

    /// A vectored reader that stops mid-place, every 5,000 bytes, with
    /// interruptions: the places fill in order, tag rooms stay untouched,
    /// and the count is exact at the end of the input.
    #[test]
    fn chunk_places_fill_in_order_across_partial_vectored_reads() {
        struct Bumpy<'a> {
            data: &'a [u8],
            calls: usize,
        }
        impl Read for Bumpy<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.read_vectored(&mut [IoSliceMut::new(buf)])
            }
            fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
                self.calls += 1;
                if self.calls.is_multiple_of(3) {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                let mut budget = 5000.min(self.data.len());
                let mut n = 0;
                for b in bufs.iter_mut() {
                    let k = b.len().min(budget);
                    b[..k].copy_from_slice(&self.data[n..n + k]);
                    n += k;
                    budget -= k;
                    if budget == 0 {
                        break;
                    }
                }
                self.data = &self.data[n..];
                Ok(n)
            }
        }
        let input: Vec<u8> = (0..BATCH_PLAIN + 999).map(|i| (i % 251) as u8).collect();
        for len in [
            0,
            1,
            CHUNK_SIZE,
            3 * CHUNK_SIZE + 7,
            BATCH_PLAIN,
            BATCH_PLAIN + 999,
        ] {
            let mut buf = vec![0xAAu8; BATCH_BYTES];
            let mut r = Bumpy {
                data: &input[..len],
                calls: 0,
            };
            let n = read_chunk_places(&mut r, &mut buf).unwrap();
            assert_eq!(n, len.min(BATCH_PLAIN), "len {len}");
            for (i, place) in buf.chunks(ENC_CHUNK_LEN).enumerate() {
                let want = &input[(i * CHUNK_SIZE).min(n)..((i + 1) * CHUNK_SIZE).min(n)];
                assert_eq!(&place[..want.len()], want, "place {i}, len {len}");
                assert!(
                    place[CHUNK_SIZE..].iter().all(|&b| b == 0xAA),
                    "tag room {i}"
                );
            }
        }
    }

    /// ring keeps the AES and GHASH keys inside the `LessSafeKey` value
    /// (no destructor, so no heap allocation to free): `ChunkCipher`'s wipe
    /// of the value's bytes then covers all of the key material. If a ring
    /// upgrade gives the key a destructor, this fails: check whether it now
    /// keeps key material on the heap, out of the wipe's reach.
    #[test]
    fn ring_keys_live_inline() {
        assert!(!std::mem::needs_drop::<LessSafeKey>());
    }
}
