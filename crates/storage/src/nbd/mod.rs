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

use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, info, warn};

use crate::qos::{QosLimits, ShareSlot};
use crate::virtio_blk::{
    BlkError, BlkMetrics, BlkMetricsSnapshot, BlkTarget, InterfaceState, SharedThrottle,
};

mod handshake;
mod transmission;

use handshake::negotiate;
use transmission::Conn;

/// Requests are whole 512-byte sectors (the cipher's unit, and O_DIRECT's).
pub const NBD_BLOCK: u32 = 512;
/// The largest READ or WRITE payload (advertised as the maximum block
/// size; it bounds what one request makes the server allocate).
pub const NBD_MAX_PAYLOAD: u32 = 8 << 20;
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

/// Runs one NBD connection on `input` (everything a client sends, from
/// the first byte of negotiation) against a 64 KiB volume in the middle of a
/// 192 KiB `ram` device filled with a pattern, encrypted when `encrypted`;
/// panics if anything outside the volume changed. For the fuzz target.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_connection(input: &[u8], encrypted: bool) {
    use crate::device::{PhysicalDevice, RamDevice};
    use std::io::Write;
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
    use super::handshake::OPT_GO;
    use super::transmission::{CMD_WRITE, REQUEST_MAGIC};
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
}
