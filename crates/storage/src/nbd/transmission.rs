//! Transmission: a connection's requests, read, served and answered in
//! batches.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::{violation, Ctx, NBD_BLOCK, NBD_MAX_PAYLOAD};
use crate::device::{AlignedBuf, Crypt, DeviceQueue, IoCompletion, IoOp, IoRequest};
use crate::virtio_blk::BlkMetrics;

/// Request and reply magics.
pub(super) const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Commands and their flags.
const CMD_READ: u16 = 0;
pub(super) const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_NO_HOLE: u16 = 2;

/// Errors in replies (errno values, as the protocol defines them).
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ESHUTDOWN: u32 = 108;

/// Requests of one connection handled together: the first, and those the
/// client has already sent by then (up to this many).
const MAX_BATCH: usize = 32;
/// Payload bytes one batch may hold.
const MAX_BATCH_BYTES: u64 = 16 << 20;
/// Payload buffers a connection keeps between batches, in bytes.
const POOL_BYTES: usize = 16 << 20;

/// Why a request got an error reply.
#[derive(Debug)]
enum Refusal {
    Invalid(String),
    NoSpace,
    Unsupported,
    Io(io::Error),
    /// The export is stopping.
    Shutdown,
}

impl Refusal {
    fn errno(&self) -> u32 {
        match self {
            Refusal::Invalid(_) | Refusal::Unsupported => EINVAL,
            Refusal::NoSpace => ENOSPC,
            Refusal::Io(_) => EIO,
            Refusal::Shutdown => ESHUTDOWN,
        }
    }
}

/// One request of a batch.
struct Req {
    kind: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    /// The payload (reads and writes).
    buf: Option<AlignedBuf>,
    /// Its outcome; `None` while it has none yet.
    result: Option<Result<(), Refusal>>,
    started: Instant,
}

/// One connection in transmission: its socket, a device queue as deep as
/// a batch, and payload buffers.
pub(super) struct Conn<'a> {
    ctx: &'a Ctx,
    reader: io::BufReader<UnixStream>,
    writer: io::BufWriter<UnixStream>,
    q: Box<dyn DeviceQueue>,
    pool: Vec<AlignedBuf>,
    batch: Vec<Req>,
    done: Vec<IoCompletion>,
    /// The device queue failed with requests possibly still in flight:
    /// their buffers were leaked (the device may still write them) and the
    /// connection ends after this batch's replies.
    pub(super) broken: bool,
}

impl<'a> Conn<'a> {
    pub(super) fn new(ctx: &'a Ctx, s: UnixStream) -> io::Result<Self> {
        Ok(Conn {
            ctx,
            reader: io::BufReader::with_capacity(256 << 10, s.try_clone()?),
            writer: io::BufWriter::with_capacity(256 << 10, s),
            q: ctx.target.device.open_queue(MAX_BATCH as u16)?,
            pool: Vec::new(),
            batch: Vec::new(),
            done: Vec::new(),
            broken: false,
        })
    }

    /// A payload buffer of at least `len` bytes.
    fn take_buf(&mut self, len: u32) -> AlignedBuf {
        let len = len as usize;
        match self.pool.iter().position(|b| b.len() >= len) {
            Some(i) => self.pool.swap_remove(i),
            None => AlignedBuf::new(len.max(4096).next_multiple_of(64 << 10), 4096),
        }
    }

    fn give_buf(&mut self, b: AlignedBuf) {
        if self.pool.iter().map(AlignedBuf::len).sum::<usize>() + b.len() <= POOL_BYTES {
            self.pool.push(b);
        }
    }

    /// Whether the client has sent more than what is buffered.
    fn readable_now(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.reader.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call; zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    /// Reads the next batch: one request (waiting for it), then those
    /// already sent. Returns false when the client is done (DISC or end of
    /// file) after this batch.
    pub(super) fn read_batch(&mut self) -> io::Result<bool> {
        self.batch.clear();
        let mut bytes = 0u64;
        loop {
            if !self.batch.is_empty()
                && (self.batch.len() >= MAX_BATCH
                    || bytes >= MAX_BATCH_BYTES
                    || (self.reader.buffer().len() < 28 && !self.readable_now()))
            {
                return Ok(true);
            }
            let mut head = [0u8; 28];
            match self.reader.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(e),
            }
            let be32 = |i: usize| u32::from_be_bytes(head[i..i + 4].try_into().expect("4"));
            let be64 = |i: usize| u64::from_be_bytes(head[i..i + 8].try_into().expect("8"));
            let magic = be32(0);
            if magic != REQUEST_MAGIC {
                BlkMetrics::inc(&self.ctx.metrics.invalid_requests);
                return Err(violation(format!("request magic {magic:#x}")));
            }
            let mut r = Req {
                flags: u16::from_be_bytes([head[4], head[5]]),
                kind: u16::from_be_bytes([head[6], head[7]]),
                cookie: be64(8),
                offset: be64(16),
                len: be32(24),
                buf: None,
                result: None,
                started: Instant::now(),
            };
            match r.kind {
                CMD_DISC => return Ok(false),
                CMD_WRITE => {
                    if r.len > NBD_MAX_PAYLOAD {
                        // The payload cannot be skipped safely: close.
                        BlkMetrics::inc(&self.ctx.metrics.invalid_requests);
                        return Err(violation(format!("WRITE of {} bytes", r.len)));
                    }
                    let mut b = self.take_buf(r.len);
                    self.reader
                        .read_exact(&mut b.as_mut_slice()[..r.len as usize])?;
                    r.buf = Some(b);
                    bytes += u64::from(r.len);
                }
                CMD_READ if r.len <= NBD_MAX_PAYLOAD => bytes += u64::from(r.len),
                _ => {}
            }
            self.batch.push(r);
        }
    }

    /// Checks a request against the volume; the refusal if it fails.
    fn check(&self, r: &Req) -> Result<(), Refusal> {
        let known = match r.kind {
            CMD_WRITE | CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            CMD_TRIM => CMD_FLAG_FUA,
            CMD_READ | CMD_FLUSH => 0,
            _ => return Err(Refusal::Unsupported),
        };
        if r.flags & !known != 0 {
            return Err(Refusal::Invalid(format!(
                "flags {:#x} on command {}",
                r.flags, r.kind
            )));
        }
        if r.kind == CMD_FLUSH {
            return Ok(());
        }
        let size = self.ctx.target.size;
        if r.offset
            .checked_add(u64::from(r.len))
            .is_none_or(|e| e > size)
        {
            return Err(if matches!(r.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                Refusal::NoSpace
            } else {
                Refusal::Invalid(format!("{} bytes at {} beyond {size}", r.len, r.offset))
            });
        }
        if r.len == 0
            || !r.offset.is_multiple_of(u64::from(NBD_BLOCK))
            || !r.len.is_multiple_of(NBD_BLOCK)
            || (r.kind == CMD_READ && r.len > NBD_MAX_PAYLOAD)
        {
            return Err(Refusal::Invalid(format!(
                "{} bytes at {}: not whole sectors",
                r.len, r.offset
            )));
        }
        Ok(())
    }

    /// Waits for the volume's throttle; false if the export stops first.
    fn admit(&self, bytes: u64) -> bool {
        let mut waited = None;
        let mut admitted = true;
        while let Err(ns) = self.ctx.throttle.admit(bytes) {
            waited.get_or_insert_with(Instant::now);
            if self.ctx.stop.load(Ordering::SeqCst) {
                admitted = false;
                break;
            }
            // In slices, so that a stop is noticed.
            std::thread::sleep(Duration::from_nanos(ns).min(Duration::from_millis(20)));
        }
        if let Some(t) = waited {
            BlkMetrics::inc(&self.ctx.metrics.throttled_requests);
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            BlkMetrics::add(&self.ctx.metrics.throttled_ns, ns);
        }
        admitted
    }

    /// Carries the batch out: checks, throttle, the data requests all in
    /// flight at once, then what must follow them (zeroes on an encrypted
    /// volume, one flush for every FLUSH and FUA), then decryption.
    pub(super) fn run_batch(&mut self) {
        let ctx = self.ctx;
        let t = &ctx.target;
        let inline = t.cipher.is_some() && self.q.inline_crypto();
        for i in 0..self.batch.len() {
            if let Err(e) = self.check(&self.batch[i]) {
                self.batch[i].result = Some(Err(e));
                continue;
            }
            if self.batch[i].kind == CMD_READ {
                let b = self.take_buf(self.batch[i].len);
                self.batch[i].buf = Some(b);
            }
            let r = &self.batch[i];
            let bytes = if matches!(r.kind, CMD_READ | CMD_WRITE) {
                u64::from(r.len)
            } else {
                0
            };
            if !self.admit(bytes) {
                self.batch[i].result = Some(Err(Refusal::Shutdown));
            }
        }
        // Data requests, all in flight together.
        let mut inflight = 0usize;
        for i in 0..self.batch.len() {
            let r = &mut self.batch[i];
            let op = match r.kind {
                _ if r.result.is_some() => continue,
                CMD_READ => IoOp::Read,
                CMD_WRITE => IoOp::Write,
                CMD_TRIM => IoOp::Discard,
                CMD_WRITE_ZEROES if t.cipher.is_none() => IoOp::WriteZeroes,
                _ => continue, // after the data requests
            };
            let first_sector = r.offset / u64::from(NBD_BLOCK);
            if let (Some(c), IoOp::Write, false, Some(b)) = (&t.cipher, op, inline, &mut r.buf) {
                c.encrypt(&mut b.as_mut_slice()[..r.len as usize], first_sector);
            }
            while !t.share.try_start(&t.share_slot) {
                // Over the volume's share: let ours finish first.
                if inflight > 0 {
                    let n = self.reap();
                    if n == 0 {
                        if let Err(e) = self.q.submit().and_then(|()| self.q.wait()) {
                            self.fail_unfinished(&e);
                            return;
                        }
                    }
                    inflight -= n;
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            let r = &mut self.batch[i];
            let (ptr, len) = match &mut r.buf {
                Some(b) => (b.as_mut_ptr(), r.len as usize),
                None => (std::ptr::null_mut(), 0),
            };
            let iov = [libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            }];
            let data = matches!(op, IoOp::Read | IoOp::Write);
            let req = IoRequest {
                op,
                offset: t.offset + r.offset,
                len: u64::from(r.len),
                segments: if data { &iov } else { &[] },
                tag: u16::try_from(i).expect("batches are small"),
                crypt: match (&t.cipher, inline, data) {
                    (Some(c), true, true) => Some(Crypt {
                        cipher: c,
                        first_sector,
                    }),
                    _ => None,
                },
            };
            // SAFETY: the segment is this request's own buffer, which
            // stays in `self.batch` untouched until its completion is
            // reaped below; `check` put the device range inside the volume.
            unsafe { self.q.push(req) };
            inflight += 1;
        }
        if inflight > 0 {
            if let Err(e) = self.q.submit() {
                self.fail_unfinished(&e);
                return;
            }
        }
        while inflight > 0 {
            let n = self.reap();
            if n == 0 && self.q.wait().is_err() {
                self.fail_unfinished(&io::Error::other("device queue wait failed"));
                return;
            }
            inflight -= n;
        }
        // What must follow the data requests, one at a time.
        let mut flush = false;
        for i in 0..self.batch.len() {
            let r = &self.batch[i];
            if r.result.is_none() && r.kind == CMD_WRITE_ZEROES {
                let (offset, len) = (r.offset, r.len);
                let res = self.encrypted_zeroes(offset, len);
                self.batch[i].result = Some(res);
            }
            let r = &self.batch[i];
            let fua = r.flags & CMD_FLAG_FUA != 0 && matches!(r.result, Some(Ok(())));
            flush |= fua || (r.kind == CMD_FLUSH && r.result.is_none());
        }
        if flush {
            let res = self.sync_op(IoOp::Flush, 0, 0, None);
            for r in &mut self.batch {
                let wants = r.kind == CMD_FLUSH && r.result.is_none()
                    || r.flags & CMD_FLAG_FUA != 0 && matches!(r.result, Some(Ok(())));
                if wants {
                    r.result = Some(match &res {
                        Ok(()) => Ok(()),
                        Err(e) => Err(Refusal::Io(io::Error::new(e.kind(), e.to_string()))),
                    });
                }
            }
        }
        if let (Some(c), false) = (&t.cipher, inline) {
            for r in &mut self.batch {
                if let (CMD_READ, Some(Ok(())), Some(b)) = (r.kind, &r.result, &mut r.buf) {
                    c.decrypt(
                        &mut b.as_mut_slice()[..r.len as usize],
                        r.offset / u64::from(NBD_BLOCK),
                    );
                }
            }
        }
    }

    /// Moves finished device requests' outcomes into the batch; returns how
    /// many finished.
    fn reap(&mut self) -> usize {
        self.done.clear();
        self.q.reap(&mut self.done);
        let n = self.done.len();
        let t = &self.ctx.target;
        for c in self.done.drain(..) {
            t.share.done(&t.share_slot);
            if let Some(r) = self.batch.get_mut(usize::from(c.tag)) {
                r.result = Some(c.result.map(|_| ()).map_err(Refusal::Io));
            }
        }
        n
    }

    /// Ends every request still without an outcome with `e`, after a
    /// device queue failure: their buffers are leaked, because a request
    /// may still be in flight on them, and the connection is marked to end.
    fn fail_unfinished(&mut self, e: &io::Error) {
        self.broken = true;
        for r in &mut self.batch {
            if r.result.is_none() {
                r.result = Some(Err(Refusal::Io(io::Error::new(e.kind(), e.to_string()))));
                if let Some(b) = r.buf.take() {
                    std::mem::forget(b);
                }
            }
        }
    }

    /// One device request with nothing else in flight.
    fn sync_op(
        &mut self,
        op: IoOp,
        offset: u64,
        len: u32,
        buf: Option<&mut AlignedBuf>,
    ) -> io::Result<()> {
        let t = &self.ctx.target;
        let iov = [libc::iovec {
            iov_base: buf.map_or(std::ptr::null_mut(), |b| b.as_mut_ptr()).cast(),
            iov_len: len as usize,
        }];
        let data = matches!(op, IoOp::Read | IoOp::Write);
        while !t.share.try_start(&t.share_slot) {
            std::thread::sleep(Duration::from_micros(50));
        }
        let req = IoRequest {
            op,
            offset: t.offset + offset,
            len: u64::from(len),
            segments: if data { &iov } else { &[] },
            tag: 0,
            crypt: None,
        };
        // SAFETY: the segment, if any, is a buffer the caller holds
        // borrowed for this call; nothing else is in flight on the queue;
        // the range was checked to lie inside the volume.
        unsafe { self.q.push(req) };
        let r = (|| {
            self.q.submit()?;
            loop {
                self.done.clear();
                self.q.reap(&mut self.done);
                if let Some(c) = self.done.pop() {
                    return c.result.map(|_| ());
                }
                self.q.wait()?;
            }
        })();
        t.share.done(&t.share_slot);
        r
    }

    /// Zeroes on an encrypted volume: the ciphertext of zeroes, a buffer
    /// at a time (raw zeroes would read back as garbage).
    fn encrypted_zeroes(&mut self, offset: u64, len: u32) -> Result<(), Refusal> {
        let Some(c) = self.ctx.target.cipher.clone() else {
            return Err(Refusal::Unsupported);
        };
        let chunk = len.min(4 << 20);
        let mut b = self.take_buf(chunk);
        let mut done = 0u32;
        let mut res = Ok(());
        while done < len {
            let n = (len - done).min(chunk);
            let at = offset + u64::from(done);
            let s = &mut b.as_mut_slice()[..n as usize];
            s.fill(0);
            c.encrypt(s, at / u64::from(NBD_BLOCK));
            if let Err(e) = self.sync_op(IoOp::Write, at, n, Some(&mut b)) {
                res = Err(Refusal::Io(e));
                break;
            }
            done += n;
        }
        self.give_buf(b);
        res
    }

    /// Counts the batch and sends its replies.
    pub(super) fn reply_batch(&mut self) -> io::Result<()> {
        let m = &self.ctx.metrics;
        let batch = std::mem::take(&mut self.batch);
        let mut out = Ok(());
        for mut r in batch {
            let result = r.result.take().unwrap_or(Ok(()));
            let took = r.started.elapsed();
            match &result {
                Ok(()) => match r.kind {
                    CMD_READ => {
                        BlkMetrics::inc(&m.read_ops);
                        BlkMetrics::add(&m.read_bytes, u64::from(r.len));
                        m.read_latency.record(took);
                    }
                    CMD_WRITE => {
                        BlkMetrics::inc(&m.write_ops);
                        BlkMetrics::add(&m.write_bytes, u64::from(r.len));
                        m.write_latency.record(took);
                    }
                    CMD_FLUSH => {
                        BlkMetrics::inc(&m.flush_ops);
                        m.flush_latency.record(took);
                    }
                    CMD_TRIM => {
                        BlkMetrics::inc(&m.discard_ops);
                        m.discard_latency.record(took);
                    }
                    _ => {
                        BlkMetrics::inc(&m.write_zeroes_ops);
                        m.discard_latency.record(took);
                    }
                },
                Err(Refusal::Invalid(why)) => {
                    debug!("NBD export {}: refused: {why}", self.ctx.target.name);
                    BlkMetrics::inc(&m.invalid_requests);
                }
                Err(Refusal::NoSpace) => BlkMetrics::inc(&m.invalid_requests),
                Err(Refusal::Unsupported) => BlkMetrics::inc(&m.unsupported_requests),
                Err(Refusal::Shutdown) => {}
                Err(Refusal::Io(e)) => {
                    warn!("NBD export {}: {e}", self.ctx.target.name);
                    BlkMetrics::inc(&m.io_errors);
                }
            }
            let error = result.as_ref().err().map_or(0, Refusal::errno);
            if out.is_ok() {
                let mut reply = [0u8; 16];
                reply[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                reply[4..8].copy_from_slice(&error.to_be_bytes());
                reply[8..].copy_from_slice(&r.cookie.to_be_bytes());
                out = self.writer.write_all(&reply);
                if let (CMD_READ, 0, Some(b), true) = (r.kind, error, &r.buf, out.is_ok()) {
                    out = self.writer.write_all(&b.as_slice()[..r.len as usize]);
                }
            }
            if let Some(b) = r.buf.take() {
                self.give_buf(b);
            }
        }
        out?;
        self.writer.flush()
    }
}
