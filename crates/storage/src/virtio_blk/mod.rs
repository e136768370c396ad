//! vhost-user-blk: one virtual interface per attached volume.
//!
//! An [`Attachment`] owns a unix socket. A frontend (QEMU's
//! `vhost-user-blk-pci`, Cloud Hypervisor, libblkio) connects, maps guest
//! memory and hands over virtqueues; each virtqueue gets its own thread
//! running [`worker`]'s loop against its own device queue. When the
//! frontend disconnects, in-flight requests drain and the socket listens
//! again, so a VM can reconnect. The listening socket may come from the
//! card process this one replaced, and can be handed on to the next.
//!
//! Each connection has its own message handler (`handler.rs`) and one epoll
//! thread per queue (`event_loop.rs`). A frontend that sets up an inflight
//! region (`inflight.rs`) lets a card that replaced a crashed one take again
//! exactly the requests the dead one left unanswered.
//!
//! Or the other way round ([`Source::Connect`]): the frontend listens
//! (QEMU's `server=on` chardev) and the card connects to it, again after
//! every disconnect. A frontend that listens takes the next card at once,
//! with no reconnect timer of its own to wait for.

mod avail_ring;
mod batching;
mod clock;
mod crash_point;
pub(crate) mod desc_walk;
mod device;
mod event_loop;
mod handler;
pub(crate) mod hot_mem;
mod inflight;
mod iovec;
pub mod metrics;
mod notify_timing;
pub mod request;
mod throttle;
mod used_order;
mod used_ring;
mod worker;

use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{info, warn};
use serde::Serialize;
use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError, Listener};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use handler::BlkHandler;

use crate::qos::{QosError, QosLimits};
pub(crate) use throttle::SharedThrottle;

pub use device::{BlkBackend, BlkTarget, RingPosition, MAX_QUEUES, MAX_QUEUE_SIZE};
pub use metrics::{BlkMetrics, BlkMetricsSnapshot};

/// Errors starting an interface.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The socket could not be created.
    #[error("cannot listen on {path}: {reason}")]
    Listen {
        /// Socket path.
        path: String,
        /// Why.
        reason: String,
    },
    /// Queue count out of range.
    #[error("queue count {0} out of range 1..={MAX_QUEUES}")]
    Queues(u16),
    /// Throttle limits refused.
    #[error(transparent)]
    Qos(#[from] QosError),
    /// Thread or device setup failed.
    #[error("interface setup: {0}")]
    Setup(#[from] io::Error),
}

/// What the interface is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InterfaceState {
    /// Waiting for a frontend.
    Listening,
    /// A frontend is connected.
    Connected,
    /// A queue broke or a worker panicked; the next connection resets it.
    Failed,
    /// Stopped.
    Stopped,
}

struct Shared {
    stop: AtomicBool,
    /// Wakes the thread waiting for a frontend.
    wake: crate::listen::Wake,
    state: Mutex<InterfaceState>,
    /// A duplicate of the frontend connection, to shut it down.
    shutdown: Mutex<Option<UnixStream>>,
    /// The connected frontend's backend, to quiesce before the connection
    /// closes.
    backend: Mutex<Option<BlkBackend>>,
    failed: AtomicBool,
}

impl Shared {
    /// The connected frontend's backend, if a frontend is connected.
    fn backend(&self) -> Option<BlkBackend> {
        self.backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("stop", &self.stop)
            .field("state", &self.state)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// Where an interface's connections come from.
#[derive(Debug)]
pub enum Source {
    /// Listen on the socket path: a new socket, or `Some` listener that
    /// the card process this one replaced handed over.
    Listen(Option<std::os::unix::net::UnixListener>),
    /// Connect to the frontend listening on the socket path, and again
    /// after each disconnect.
    Connect,
}

/// Longest wait between two connection attempts in [`Source::Connect`].
const CONNECT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_millis(200);

/// A running vhost-user-blk interface.
#[derive(Debug)]
pub struct Attachment {
    socket: PathBuf,
    queues: u16,
    shared: Arc<Shared>,
    metrics: Arc<BlkMetrics>,
    throttle: Arc<SharedThrottle>,
    share_slot: Arc<crate::qos::ShareSlot>,
    thread: Option<JoinHandle<()>>,
    /// A duplicate of the listening socket, to hand on to a successor
    /// (none when the card connects to the frontend).
    listener: Option<std::os::fd::OwnedFd>,
}

impl Attachment {
    /// Serves `target` with `queues` virtqueues to each frontend on
    /// `socket`: listening there (replacing a stale socket file, or on a
    /// listener handed over) or connecting to a frontend that listens
    /// ([`Source`]).
    pub fn start(
        target: BlkTarget,
        socket: &Path,
        queues: u16,
        qos: QosLimits,
        metrics: Arc<BlkMetrics>,
        source: Source,
    ) -> Result<Self, BlkError> {
        if queues == 0 || queues > MAX_QUEUES {
            return Err(BlkError::Queues(queues));
        }
        qos.validate()?;
        let throttle = Arc::new(SharedThrottle::new(qos));
        let share_slot = target.share_slot.clone();
        share_slot.set_weight(qos.weight.unwrap_or(1));
        let (mut listener, listener_dup) = match source {
            Source::Listen(inherited) => {
                let bound = crate::listen::bind_or_adopt(socket, inherited)?;
                let dup: std::os::fd::OwnedFd = bound
                    .try_clone()
                    .map_err(|e| BlkError::Listen {
                        path: socket.display().to_string(),
                        reason: e.to_string(),
                    })?
                    .into();
                // No path: the socket file is removed by `stop`, never by
                // a hand-over.
                (Some(Listener::from(bound)), Some(dup))
            }
            Source::Connect => (None, None),
        };
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            wake: crate::listen::Wake::new()?,
            state: Mutex::new(InterfaceState::Listening),
            shutdown: Mutex::new(None),
            backend: Mutex::new(None),
            failed: AtomicBool::new(false),
        });
        // Fail early if the device cannot give us queues.
        drop(BlkBackend::new(
            &target,
            queues,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            metrics.clone(),
            throttle.clone(),
        )?);
        let thread = {
            let shared = shared.clone();
            let metrics = metrics.clone();
            let throttle = throttle.clone();
            let name = format!("vublk-{}", target.name);
            std::thread::Builder::new().name(name.clone()).spawn({
                let socket = socket.to_owned();
                move || {
                    let from = match listener.as_mut() {
                        Some(l) => From::Listener(l),
                        None => From::Frontend(&socket),
                    };
                    serve(&name, &target, queues, from, &shared, &metrics, &throttle);
                }
            })?
        };
        info!(
            "serving vhost-user-blk {} {} ({} queue(s))",
            if listener_dup.is_some() {
                "on"
            } else {
                "by connecting to"
            },
            socket.display(),
            queues
        );
        Ok(Attachment {
            socket: socket.to_owned(),
            queues,
            shared,
            metrics,
            throttle,
            share_slot,
            thread: Some(thread),
            listener: listener_dup,
        })
    }

    /// Socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the card connects to the frontend ([`Source::Connect`]).
    pub fn connects(&self) -> bool {
        self.listener.is_none()
    }

    /// Number of virtqueues offered.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// Current state.
    pub fn state(&self) -> InterfaceState {
        *self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where each started ring stands while a frontend is connected
    /// ([`RingPosition`]); empty otherwise.
    pub fn rings(&self) -> Vec<RingPosition> {
        self.shared
            .backend()
            .map(|b| b.ring_positions())
            .unwrap_or_default()
    }

    /// Counters.
    pub fn metrics(&self) -> BlkMetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Current throttle limits.
    pub fn qos(&self) -> QosLimits {
        self.throttle.limits()
    }

    /// Changes the throttle limits live; the new buckets start full.
    pub fn set_qos(&self, qos: QosLimits) -> Result<(), BlkError> {
        self.throttle.apply(&self.share_slot, qos)?;
        info!("{}: qos now {qos:?}", self.socket.display());
        Ok(())
    }

    /// Disconnects any frontend, drains in-flight requests, stops the
    /// threads and removes the socket.
    pub fn stop(mut self) {
        self.stop_inner(false);
    }

    /// Like [`Attachment::stop`], but leaves the listening socket to the
    /// process that took a duplicate of it ([`Attachment::listener`]):
    /// frontends that connect meanwhile wait for it.
    pub fn hand_over(mut self) {
        self.stop_inner(true);
    }

    /// The listening socket (none when the card connects to the
    /// frontend).
    pub fn listener(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.listener.as_ref().map(AsFd::as_fd)
    }

    fn stop_inner(&mut self, keep_socket: bool) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let handle = self
            .shared
            .shutdown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|c| c.try_clone().ok());
        match handle {
            Some(h) => {
                // Before the connection closes: what the queues took
                // completes onto the used rings and they take nothing
                // more, so a frontend that reconnects (restarting its
                // queues from the used index) loses no request and sees
                // none done twice.
                if let Some(b) = self.shared.backend() {
                    b.quiesce();
                }
                let _ = h.shutdown(Shutdown::Both);
            }
            // Waiting for a frontend: its own event wakes it (the
            // socket itself may be shared with a successor).
            None => self.shared.wake.wake(),
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("interface thread for {} panicked", self.socket.display());
            }
        }
        // A socket the frontend listens on is the frontend's.
        if !keep_socket && self.listener.is_some() {
            let _ = std::fs::remove_file(&self.socket);
        }
        *self.shared.state.lock().unwrap_or_else(|e| e.into_inner()) = InterfaceState::Stopped;
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_inner(false);
        }
    }
}

fn set_state(shared: &Shared, s: InterfaceState) {
    *shared.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
}

/// Where [`serve`] gets its connections.
enum From<'a> {
    Listener(&'a mut Listener),
    Frontend(&'a Path),
}

/// Accept (or connect) / serve / drain loop of one interface.
fn serve(
    name: &str,
    target: &BlkTarget,
    queues: u16,
    mut from: From<'_>,
    shared: &Shared,
    metrics: &Arc<BlkMetrics>,
    throttle: &Arc<SharedThrottle>,
) {
    while !shared.stop.load(Ordering::SeqCst) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let started = BlkBackend::new(
            target,
            queues,
            mem.clone(),
            metrics.clone(),
            throttle.clone(),
        )
        .and_then(|b| Ok((b.clone(), BlkHandler::new(name, b, mem)?)));
        let (backend, handler) = match started {
            Ok(b) => b,
            Err(e) => {
                warn!("{name}: cannot open device queues: {e}");
                set_state(shared, InterfaceState::Failed);
                std::thread::sleep(std::time::Duration::from_millis(500));
                continue;
            }
        };
        for i in 0..usize::from(queues) {
            let ev = handler.event_loop(i);
            let mut fds = vec![
                (
                    backend.timer_fd(i),
                    device::timer_event(queues),
                    "throttle timer",
                ),
                (
                    backend.resume_fd(i),
                    device::resume_event(queues),
                    "resume event",
                ),
            ];
            if let Some(fd) = backend.completion_fd(i) {
                fds.push((fd, device::completion_event(queues), "completions"));
            }
            for (fd, id, what) in fds {
                if let Err(e) = ev.add(fd, id) {
                    warn!("{name}: cannot watch the {what} of queue {i}: {e}");
                }
            }
        }
        if !shared.failed.load(Ordering::Relaxed) {
            set_state(shared, InterfaceState::Listening);
        }
        let conn = match &mut from {
            From::Listener(l) => {
                if !shared.wake.wait_for_client(&**l) {
                    break;
                }
                match l.accept() {
                    Ok(Some(c)) => Ok(c),
                    Ok(None) => continue,
                    Err(e) => Err(io::Error::other(e.to_string())),
                }
            }
            From::Frontend(path) => match connect(path, shared) {
                Some(r) => r,
                None => break,
            },
        };
        let conn = match conn.and_then(|c| Ok((c.try_clone()?, c))) {
            Ok(c) => c,
            Err(e) => {
                if !shared.stop.load(Ordering::SeqCst) {
                    warn!("{name}: accepting a frontend failed: {e}");
                }
                continue;
            }
        };
        info!("{name}: frontend connected");
        *shared.shutdown.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.0);
        *shared.backend.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend.clone());
        if shared.stop.load(Ordering::SeqCst) {
            let _ = conn.1.shutdown(Shutdown::Both);
        } else {
            set_state(shared, InterfaceState::Connected);
        }
        let mut requests = BackendReqHandler::from_stream(conn.1, Arc::new(Mutex::new(handler)));
        let result = loop {
            if let Err(e) = requests.handle_request() {
                break e;
            }
        };
        *shared.shutdown.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *shared.backend.lock().unwrap_or_else(|e| e.into_inner()) = None;
        backend.drain();
        // The handler goes with the connection; its threads stop.
        drop(requests);
        if backend.failed() {
            shared.failed.store(true, Ordering::Relaxed);
            set_state(shared, InterfaceState::Failed);
        }
        match result {
            VhostUserError::Disconnected
            | VhostUserError::PartialMessage
            | VhostUserError::SocketBroken(_) => info!("{name}: frontend disconnected"),
            e if !shared.stop.load(Ordering::SeqCst) => warn!("{name}: connection ended: {e}"),
            _ => {}
        }
    }
}

/// Connects to the frontend listening at `path`, retrying with a growing
/// pause while it is not there. None when the interface stops first.
fn connect(path: &Path, shared: &Shared) -> Option<io::Result<UnixStream>> {
    let mut pause = std::time::Duration::from_millis(1);
    let mut told = false;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return None;
        }
        match UnixStream::connect(path) {
            Ok(c) => return Some(Ok(c)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                if !told {
                    info!(
                        "{}: waiting for the frontend to listen ({e})",
                        path.display()
                    );
                    told = true;
                }
            }
            Err(e) => return Some(Err(e)),
        }
        if !shared.wake.sleep(pause) {
            return None;
        }
        pause = (pause * 2).min(CONNECT_BACKOFF_MAX);
    }
}
