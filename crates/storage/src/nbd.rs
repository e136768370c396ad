//! NBD: a volume presented to the host system itself (the first patent's
//! "to the virtual machines or the host system"), as a Network Block Device
//! export on a unix socket.
//!
//! The server speaks the NBD protocol's fixed newstyle negotiation
//! (`NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`,
//! `NBD_OPT_ABORT`; everything else is answered `NBD_REP_ERR_UNSUP`) and
//! simple replies in transmission: READ, WRITE (with FUA), FLUSH, TRIM,
//! WRITE_ZEROES and DISC. Clients: QEMU and qemu-img/qemu-io
//! (`nbd+unix:///VOLUME?socket=PATH`), libnbd's nbdinfo/nbdcopy/nbdsh, and
//! the kernel's nbd-client.
//!
//! Every request goes the way a vhost-user request goes: the volume's
//! throttle, its fair share of the device, its cipher, and its counters.
//! Each connection is served by its own thread, one request at a time,
//! through its own device queue.
//!
//! Every byte from the client is untrusted: bad magic, an oversized write
//! or option, or a malformed option closes that connection; a request out
//! of the volume, unaligned, or with unknown flags gets an error reply.
//! Nothing outside the volume is ever read or written.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::device::{AlignedBuf, Crypt, DeviceQueue, IoCompletion, IoOp, IoRequest};
use crate::qos::{QosLimits, ShareSlot};
use crate::virtio_blk::{
    BlkError, BlkMetrics, BlkMetricsSnapshot, BlkTarget, InterfaceState, SharedThrottle,
};

/// Handshake magics.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server) and client flags.
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_FIXED_NEWSTYLE: u32 = 1;
const CLIENT_NO_ZEROES: u32 = 2;

/// Transmission flags.
const TF_HAS_FLAGS: u16 = 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_FUA: u16 = 1 << 3;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// FLUSH on any connection makes every completed write durable.
const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

/// Option replies.
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

/// Information types.
const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_BLOCK_SIZE: u16 = 3;

/// Commands and their flags.
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
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

/// Requests are whole 512-byte sectors (the cipher's unit, and O_DIRECT's).
pub const NBD_BLOCK: u32 = 512;
/// The largest READ or WRITE payload (advertised as the maximum block
/// size; it bounds what one request makes the server allocate).
pub const NBD_MAX_PAYLOAD: u32 = 8 << 20;
/// Option data longer than this closes the connection.
const MAX_OPTION_BYTES: u32 = 16 << 10;
/// Options a client may send before transmission.
const MAX_OPTIONS: usize = 256;
/// Connections an export serves at once; more are closed at once.
pub const NBD_MAX_CONNECTIONS: usize = 16;

/// What the connection threads share with the export.
#[derive(Debug)]
struct Ctx {
    target: BlkTarget,
    metrics: Arc<BlkMetrics>,
    throttle: Arc<SharedThrottle>,
    stop: AtomicBool,
    /// Wakes the accepting thread at stop.
    wake: crate::listen::Wake,
    clients: AtomicUsize,
    /// A connection's device queue failed (state `Failed`).
    failed: AtomicBool,
    /// Open connections (a duplicate of each, to shut it at stop).
    conns: Mutex<Vec<(UnixStream, JoinHandle<()>)>>,
}

/// A running NBD export of one volume.
#[derive(Debug)]
pub struct NbdExport {
    socket: PathBuf,
    ctx: Arc<Ctx>,
    share_slot: Arc<ShareSlot>,
    thread: Option<JoinHandle<()>>,
    /// A duplicate of the listening socket, to hand on to a successor.
    listener: OwnedFd,
}

impl NbdExport {
    /// Listens on `socket` (replacing a stale socket file), or on the
    /// `inherited` listener of that path, and serves `target` to every NBD
    /// client that connects.
    pub fn start(
        target: BlkTarget,
        socket: &Path,
        qos: QosLimits,
        metrics: Arc<BlkMetrics>,
        inherited: Option<UnixListener>,
    ) -> Result<NbdExport, BlkError> {
        qos.validate()?;
        let listen_err = |e: io::Error| BlkError::Listen {
            path: socket.display().to_string(),
            reason: e.to_string(),
        };
        let listener = crate::listen::bind_or_adopt(socket, inherited)?;
        let listener_dup: OwnedFd = listener.try_clone().map_err(listen_err)?.into();
        let share_slot = target.share_slot.clone();
        share_slot.set_weight(qos.weight.unwrap_or(1));
        let ctx = Arc::new(Ctx {
            target,
            metrics,
            throttle: Arc::new(SharedThrottle::new(qos)),
            stop: AtomicBool::new(false),
            wake: crate::listen::Wake::new()?,
            clients: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let thread = {
            let ctx = ctx.clone();
            let name = format!("nbd-{}", ctx.target.name);
            std::thread::Builder::new()
                .name(name)
                .spawn(move || accept_loop(&listener, &ctx))?
        };
        info!(
            "serving NBD export {:?} on {}",
            ctx.target.name,
            socket.display()
        );
        Ok(NbdExport {
            socket: socket.to_owned(),
            ctx,
            share_slot,
            thread: Some(thread),
            listener: listener_dup,
        })
    }

    /// Socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Current state: connected while at least one client is.
    pub fn state(&self) -> InterfaceState {
        if self.thread.is_none() {
            InterfaceState::Stopped
        } else if self.ctx.failed.load(Ordering::Relaxed) {
            InterfaceState::Failed
        } else if self.ctx.clients.load(Ordering::Relaxed) > 0 {
            InterfaceState::Connected
        } else {
            InterfaceState::Listening
        }
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.ctx.clients.load(Ordering::Relaxed)
    }

    /// Counters.
    pub fn metrics(&self) -> BlkMetricsSnapshot {
        self.ctx.metrics.snapshot()
    }

    /// Current throttle limits.
    pub fn qos(&self) -> QosLimits {
        self.ctx.throttle.limits()
    }

    /// Changes the throttle limits live; the new buckets start full.
    pub fn set_qos(&self, qos: QosLimits) -> Result<(), BlkError> {
        self.ctx.throttle.apply(&self.share_slot, qos)?;
        info!("{}: qos now {qos:?}", self.socket.display());
        Ok(())
    }

    /// Closes every connection (each finishes the request it is serving),
    /// stops the threads and removes the socket.
    pub fn stop(mut self) {
        self.stop_inner(false);
    }

    /// Like [`NbdExport::stop`], but leaves the listening socket to the
    /// process that took a duplicate of it ([`NbdExport::listener`]).
    pub fn hand_over(mut self) {
        self.stop_inner(true);
    }

    /// The listening socket.
    pub fn listener(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }

    fn stop_inner(&mut self, keep_socket: bool) {
        self.ctx.stop.store(true, Ordering::SeqCst);
        // Its own event wakes the accept: the socket itself may be shared
        // with a successor.
        self.ctx.wake.wake();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("NBD accept thread for {} panicked", self.socket.display());
            }
        }
        let conns = std::mem::take(&mut *lock(&self.ctx.conns));
        for (s, t) in conns {
            let _ = s.shutdown(std::net::Shutdown::Both);
            if t.join().is_err() {
                warn!("an NBD connection thread panicked");
            }
        }
        if !keep_socket {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_inner(false);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn accept_loop(listener: &UnixListener, ctx: &Arc<Ctx>) {
    loop {
        if !ctx.wake.wait_for_client(listener) {
            return;
        }
        let accepted = listener.accept();
        if ctx.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("NBD export {}: accept: {e}", ctx.target.name);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let mut conns = lock(&ctx.conns);
        conns.retain(|(_, t)| !t.is_finished());
        if conns.len() >= NBD_MAX_CONNECTIONS {
            warn!(
                "NBD export {}: {NBD_MAX_CONNECTIONS} connections already; closing a new one",
                ctx.target.name
            );
            continue;
        }
        let Ok(dup) = stream.try_clone() else {
            continue;
        };
        let c = ctx.clone();
        match std::thread::Builder::new()
            .name(format!("nbd-{}-conn", ctx.target.name))
            .spawn(move || {
                c.clients.fetch_add(1, Ordering::Relaxed);
                let end = stream.try_clone();
                if let Err(e) = serve_connection(stream, &c) {
                    debug!("NBD export {}: connection ended: {e}", c.target.name);
                }
                // Close it for the client now (the export keeps a duplicate
                // until stop): after DISC a client waits for end of file.
                if let Ok(s) = end {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                c.clients.fetch_sub(1, Ordering::Relaxed);
            }) {
            Ok(t) => conns.push((dup, t)),
            Err(e) => warn!("NBD export {}: no thread: {e}", ctx.target.name),
        }
    }
}

/// Why a connection ends before its client asked.
fn violation(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| violation("option reply too long"))?;
    let mut head = Vec::with_capacity(20 + data.len());
    head.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    head.extend_from_slice(&opt.to_be_bytes());
    head.extend_from_slice(&kind.to_be_bytes());
    head.extend_from_slice(&len.to_be_bytes());
    head.extend_from_slice(data);
    w.write_all(&head)
}

/// The export's transmission flags.
fn transmission_flags() -> u16 {
    TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_CAN_MULTI_CONN
}

/// Parsed `NBD_OPT_INFO`/`NBD_OPT_GO` data: export name and requested
/// information types.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let nlen = usize::try_from(u32::from_be_bytes(data.get(..4)?.try_into().ok()?)).ok()?;
    let name = data.get(4..4usize.checked_add(nlen)?)?;
    let rest = &data[4 + nlen..];
    let n = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
    let reqs = rest.get(2..)?;
    if reqs.len() != 2 * n {
        return None;
    }
    Some((
        name,
        reqs.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// Whether a client's export name means this volume: its name, or the
/// empty default name.
fn names_us(ctx: &Ctx, name: &[u8]) -> bool {
    name.is_empty() || name == ctx.target.name.as_bytes()
}

/// Option haggling; returns whether to go on to transmission.
fn negotiate(s: &mut UnixStream, ctx: &Ctx) -> io::Result<bool> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client = read_u32(s)?;
    if client & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
        || client & CLIENT_FIXED_NEWSTYLE == 0
    {
        return Err(violation(format!("client flags {client:#x}")));
    }
    let no_zeroes = client & CLIENT_NO_ZEROES != 0;
    let size = ctx.target.size;
    for _ in 0..MAX_OPTIONS {
        if read_u64(s)? != IHAVEOPT {
            return Err(violation("option without IHAVEOPT"));
        }
        let opt = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION_BYTES {
            return Err(violation(format!("option {opt} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                if !names_us(ctx, &data) {
                    // The protocol has no error reply here: close.
                    return Err(violation("EXPORT_NAME of an unknown export"));
                }
                let mut out = Vec::with_capacity(10 + 124);
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&transmission_flags().to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out)?;
                return Ok(true);
            }
            OPT_ABORT => {
                let _ = option_reply(s, opt, REP_ACK, &[]);
                return Ok(false);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(s, opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                let name = ctx.target.name.as_bytes();
                let mut d = Vec::with_capacity(4 + name.len());
                d.extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes());
                d.extend_from_slice(name);
                option_reply(s, opt, REP_SERVER, &d)?;
                option_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, wanted)) = parse_info_request(&data) else {
                    option_reply(s, opt, REP_ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                if !names_us(ctx, name) {
                    option_reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut export = Vec::with_capacity(12);
                export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                export.extend_from_slice(&size.to_be_bytes());
                export.extend_from_slice(&transmission_flags().to_be_bytes());
                option_reply(s, opt, REP_INFO, &export)?;
                // Always sent: requests must be whole sectors.
                let mut bs = Vec::with_capacity(14);
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs.extend_from_slice(&NBD_BLOCK.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&NBD_MAX_PAYLOAD.to_be_bytes());
                option_reply(s, opt, REP_INFO, &bs)?;
                if wanted.contains(&INFO_NAME) {
                    let mut n = INFO_NAME.to_be_bytes().to_vec();
                    n.extend_from_slice(ctx.target.name.as_bytes());
                    option_reply(s, opt, REP_INFO, &n)?;
                }
                option_reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(true);
                }
            }
            _ => option_reply(s, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
    Err(violation(format!("more than {MAX_OPTIONS} options")))
}

/// Requests of one connection handled together: the first, and those the
/// client has already sent by then (up to this many).
const MAX_BATCH: usize = 32;
/// Payload bytes one batch may hold.
const MAX_BATCH_BYTES: u64 = 16 << 20;
/// Payload buffers a connection keeps between batches, in bytes.
const POOL_BYTES: usize = 16 << 20;

fn serve_connection(mut s: UnixStream, ctx: &Ctx) -> io::Result<()> {
    if !negotiate(&mut s, ctx)? {
        return Ok(());
    }
    let mut c = Conn::new(ctx, s)?;
    loop {
        let more = c.read_batch()?;
        c.run_batch();
        c.reply_batch()?;
        if c.broken {
            // The interface reports Failed from now on.
            ctx.failed.store(true, Ordering::Relaxed);
            return Err(io::Error::other(
                "the device queue failed; connection closed",
            ));
        }
        if !more || ctx.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
    }
}

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
struct Conn<'a> {
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
    broken: bool,
}

impl<'a> Conn<'a> {
    fn new(ctx: &'a Ctx, s: UnixStream) -> io::Result<Self> {
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
    fn read_batch(&mut self) -> io::Result<bool> {
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
    fn run_batch(&mut self) {
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
    fn reply_batch(&mut self) -> io::Result<()> {
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

/// Runs one NBD connection on `input` (everything a client sends, from
/// the first byte of negotiation) against a 64 KiB volume in the middle of a
/// 192 KiB `ram` device filled with a pattern, encrypted when `encrypted`;
/// panics if anything outside the volume changed. For the fuzz target.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_connection(input: &[u8], encrypted: bool) {
    use crate::device::{PhysicalDevice, RamDevice};
    const UNIT: u64 = 64 << 10;
    let dev = Arc::new(RamDevice::new("fuzz", 3 * UNIT).expect("ram device"));
    let fill: Vec<u8> = (0..3 * UNIT).map(|i| (i % 251) as u8).collect();
    dev.write_all_at(&fill, 0).expect("fill");
    let share = Arc::new(crate::qos::DeviceShare::new(0));
    let target = BlkTarget {
        name: "fuzz".into(),
        device: dev.clone(),
        offset: UNIT,
        size: UNIT,
        cipher: encrypted.then(|| {
            Arc::new(crate::crypto::Xts256::new(
                &crate::crypto::DataKey::generate(),
            ))
        }),
        share_slot: share.register(),
        share,
    };
    let ctx = Ctx {
        target,
        metrics: Arc::default(),
        throttle: Arc::new(SharedThrottle::new(QosLimits::default())),
        stop: AtomicBool::new(false),
        wake: crate::listen::Wake::new().expect("eventfd"),
        clients: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        conns: Mutex::new(Vec::new()),
    };
    let (client, server) = UnixStream::pair().expect("socket pair");
    let mut tx = client.try_clone().expect("clone");
    let data = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = tx.write_all(&data);
        let _ = tx.shutdown(std::net::Shutdown::Write);
    });
    let reader = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let mut c = client;
        let _ = c.read_to_end(&mut sink);
    });
    let _ = serve_connection(server, &ctx);
    writer.join().expect("writer");
    reader.join().expect("reader");
    let mut after = vec![0u8; (3 * UNIT) as usize];
    dev.read_exact_at(&mut after, 0).expect("read back");
    let (lo, hi) = (UNIT as usize, 2 * UNIT as usize);
    assert!(after[..lo] == fill[..lo], "bytes before the volume changed");
    assert!(after[hi..] == fill[hi..], "bytes after the volume changed");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session that negotiates and then writes at and around the
    /// volume's edges leaves the device outside the volume alone (the
    /// fuzz target's invariant, on a crafted input).
    #[test]
    fn writes_at_the_edges_stay_inside_the_volume() {
        let mut s = 3u32.to_be_bytes().to_vec();
        s.extend_from_slice(b"IHAVEOPT");
        s.extend_from_slice(&OPT_GO.to_be_bytes());
        s.extend_from_slice(&6u32.to_be_bytes());
        s.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        for (offset, len) in [
            (0u64, 512u32),
            ((64 << 10) - 512, 1024),
            (u64::MAX - 511, 512),
        ] {
            s.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            s.extend_from_slice(&0u16.to_be_bytes());
            s.extend_from_slice(&CMD_WRITE.to_be_bytes());
            s.extend_from_slice(&7u64.to_be_bytes());
            s.extend_from_slice(&offset.to_be_bytes());
            s.extend_from_slice(&len.to_be_bytes());
            s.extend(std::iter::repeat_n(0xee, len as usize));
        }
        for encrypted in [false, true] {
            fuzz_connection(&s, encrypted);
        }
    }

    #[test]
    fn info_requests_parse_and_refuse_bad_lengths() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        let (name, wanted) = parse_info_request(&d).unwrap();
        assert_eq!(name, b"vol");
        assert_eq!(wanted, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        // One request short, one byte long, a name past the end, empty.
        assert!(parse_info_request(&d[..d.len() - 2]).is_none());
        let mut long = d.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_none());
        let mut past = d.clone();
        past[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&past).is_none());
        assert!(parse_info_request(&[]).is_none());
    }
}
