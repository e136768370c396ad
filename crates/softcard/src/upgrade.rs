//! Live update of the card daemon: `softcard upgrade`, `POST /v1/upgrade`
//! or SIGUSR2 starts a new binary and hands it the listening sockets.
//!
//! The running process (the predecessor) starts the new binary with the
//! same arguments and one end of a socket pair as `SOFTCARD_HANDOVER_FD`.
//! Over it go a versioned manifest and, by SCM_RIGHTS, the listening
//! sockets: the management API, the metrics endpoint and every volume's
//! interface. The successor reads its configuration and answers `ok` (or
//! why not: the predecessor then carries on as if nothing happened). On
//! `ok` the predecessor stops: its queues finish what they took and
//! publish it, its connections close, the sockets stay where they are,
//! and it exits, which the successor sees as the end of the stream. Only
//! then does the successor open the devices (their locks also wait for any
//! I/O of the predecessor still in the kernel) and serve the inherited
//! sockets. Frontends that reconnect meanwhile wait in the sockets'
//! queues; none is refused.
//!
//! No key crosses: the successor loads the tenants' keys from its own
//! configuration, as any start does.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use softcard_control::api::ApiError;
use softcard_rdma::shm::{recv_with_fds, send_with_fds, MAX_FDS};

/// The environment variable that gives a successor its end of the
/// hand-over socket.
pub const HANDOVER_ENV: &str = "SOFTCARD_HANDOVER_FD";
/// Version of the manifest; a successor refuses one it does not know.
const MANIFEST_VERSION: u32 = 1;
/// How long the predecessor waits for the successor's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(30);
/// How long the successor waits for the predecessor to exit.
const EXIT_WAIT: Duration = Duration::from_secs(60);

/// One handed-over socket, in the order of the descriptors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Entry {
    /// The management API's unix socket.
    Api { path: PathBuf },
    /// The Prometheus endpoint's TCP socket.
    Metrics { addr: String },
    /// A volume's interface (vhost-user or NBD), by socket path.
    Interface { path: PathBuf },
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    /// The predecessor's process id.
    pid: u32,
    sockets: Vec<Entry>,
}

/// The sockets a predecessor hands over.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// The API socket's path and listener.
    pub api: (&'a Path, BorrowedFd<'a>),
    /// The metrics listener and its address, when there is one.
    pub metrics: Option<(std::net::SocketAddr, BorrowedFd<'a>)>,
    /// Every volume interface's listener, by path.
    pub interfaces: Vec<(PathBuf, OwnedFd)>,
}

/// Starts `binary` with `args` as the successor, hands it `out` and waits
/// for its answer. Returns its process id once it has taken the sockets;
/// on any failure the successor is gone and the caller carries on.
pub fn hand_over(binary: &Path, args: &[OsString], out: &Outgoing<'_>) -> Result<u32> {
    let (ours, theirs) = UnixStream::pair().context("socket pair")?;
    let fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(binary);
    cmd.args(args).env(HANDOVER_ENV, fd.to_string());
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls fcntl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    drop(theirs);
    let pid = child.id();
    if let Err(e) = send_and_wait(&ours, out) {
        log::error!("upgrade to {} (pid {pid}) failed: {e:#}", binary.display());
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    // The successor outlives us; its exit is the service manager's to see.
    drop(child);
    // `ours` stays open until this process exits: the end of its stream
    // is how the successor knows we are gone.
    std::mem::forget(ours);
    Ok(pid)
}

fn send_and_wait(sock: &UnixStream, out: &Outgoing<'_>) -> Result<()> {
    let mut sockets = vec![Entry::Api {
        path: out.api.0.to_owned(),
    }];
    let mut fds: Vec<BorrowedFd<'_>> = vec![out.api.1];
    if let Some((addr, fd)) = out.metrics {
        sockets.push(Entry::Metrics {
            addr: addr.to_string(),
        });
        fds.push(fd);
    }
    for (path, fd) in &out.interfaces {
        sockets.push(Entry::Interface { path: path.clone() });
        fds.push(fd.as_fd());
    }
    let manifest = serde_json::to_vec(&Manifest {
        version: MANIFEST_VERSION,
        pid: std::process::id(),
        sockets,
    })?;
    let gone = "the new process exited before taking the sockets (is it a softcard binary?)";
    let mut w = sock;
    w.write_all(&u32::try_from(manifest.len())?.to_le_bytes())
        .context(gone)?;
    w.write_all(&manifest).context(gone)?;
    // The descriptors follow, at most MAX_FDS to a one-byte message.
    for chunk in fds.chunks(MAX_FDS) {
        send_with_fds(sock.as_fd(), b"F", chunk).context(gone)?;
    }
    sock.set_read_timeout(Some(ANSWER_WAIT))?;
    let mut answer = String::new();
    let mut r = sock;
    let mut byte = [0u8; 1];
    while r.read(&mut byte).context(gone)? == 1 && byte[0] != b'\n' {
        answer.push(char::from(byte[0]));
    }
    match answer.as_str() {
        "ok" => Ok(()),
        "" => bail!("{gone}"),
        other => bail!("the new process refused: {other}"),
    }
}

/// What a successor received.
#[derive(Debug)]
pub struct Incoming {
    sock: UnixStream,
    /// The predecessor's process id.
    pub pid: u32,
    /// The API's listener, by path.
    pub api: Option<(PathBuf, UnixListener)>,
    /// The metrics listener.
    pub metrics: Option<std::net::TcpListener>,
    /// Volume interfaces' listeners, by path.
    pub interfaces: Vec<(PathBuf, UnixListener)>,
}

impl Incoming {
    /// Takes the hand-over, when this process was started as a successor.
    pub fn receive() -> Result<Option<Incoming>> {
        let Some(fd) = std::env::var_os(HANDOVER_ENV) else {
            return Ok(None);
        };
        std::env::remove_var(HANDOVER_ENV);
        let fd: i32 = fd
            .to_str()
            .and_then(|s| s.parse().ok())
            .context("SOFTCARD_HANDOVER_FD is not a descriptor number")?;
        // Only a socket is taken over: a stray variable naming another
        // descriptor (or none) is refused, never closed or read.
        // SAFETY: fstat(2) writes into a zeroed stat of ours.
        let is_socket = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
        };
        ensure!(is_socket, "{HANDOVER_ENV}={fd} is not an open socket");
        // SAFETY: the predecessor passed this descriptor, open and ours
        // alone, under this number; nothing else in the process uses it.
        let sock = unsafe { UnixStream::from_raw_fd(fd) };
        // SAFETY: as above; close-on-exec so no child of ours inherits it.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        sock.set_read_timeout(Some(ANSWER_WAIT))?;
        let mut len = [0u8; 4];
        (&sock)
            .read_exact(&mut len)
            .context("reading the manifest")?;
        let len = u32::from_le_bytes(len) as usize;
        ensure!(len <= 1 << 24, "manifest of {len} bytes");
        let mut text = vec![0u8; len];
        (&sock).read_exact(&mut text)?;
        let m: Manifest = serde_json::from_slice(&text).context("the manifest")?;
        ensure!(
            m.version == MANIFEST_VERSION,
            "hand-over manifest version {} (this binary knows {MANIFEST_VERSION})",
            m.version
        );
        let mut fds: Vec<OwnedFd> = Vec::with_capacity(m.sockets.len());
        while fds.len() < m.sockets.len() {
            let mut b = [0u8; 1];
            let n = recv_with_fds(sock.as_fd(), &mut b, &mut fds)?;
            ensure!(n == 1, "the predecessor closed the hand-over early");
        }
        ensure!(fds.len() == m.sockets.len(), "more sockets than announced");
        let mut incoming = Incoming {
            sock,
            pid: m.pid,
            api: None,
            metrics: None,
            interfaces: Vec::new(),
        };
        for (entry, fd) in m.sockets.into_iter().zip(fds) {
            match entry {
                Entry::Api { path } => incoming.api = Some((path, UnixListener::from(fd))),
                Entry::Metrics { .. } => {
                    incoming.metrics = Some(std::net::TcpListener::from(fd));
                }
                Entry::Interface { path } => {
                    incoming.interfaces.push((path, UnixListener::from(fd)));
                }
            }
        }
        Ok(Some(incoming))
    }

    /// Tells the predecessor to stop; then waits until it has exited.
    pub fn take_over(&mut self) -> Result<()> {
        (&self.sock).write_all(b"ok\n")?;
        self.sock.set_read_timeout(Some(EXIT_WAIT))?;
        let started = Instant::now();
        let mut b = [0u8; 64];
        loop {
            match (&self.sock).read(&mut b) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => bail!(
                    "the previous card process (pid {}) did not exit within {:?}: {e}",
                    self.pid,
                    started.elapsed()
                ),
            }
        }
        log::info!(
            "the previous card process (pid {}) exited after {} ms",
            self.pid,
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// Tells the predecessor why this process cannot take over; it carries
    /// on.
    pub fn refuse(&mut self, why: &str) {
        let line = why.replace('\n', " ");
        let _ = (&self.sock).write_all(format!("{line}\n").as_bytes());
    }
}

/// An upgrade asked for through the API, waiting for the main thread.
type Request = (
    Option<PathBuf>,
    tokio::sync::oneshot::Sender<Result<u32, String>>,
);

/// Where the API leaves upgrade requests for the main thread.
#[derive(Debug, Default)]
pub struct Requests(Mutex<Option<Request>>);

impl Requests {
    /// The pending request, if the API made one (a plain SIGUSR2 has
    /// none).
    pub fn take(&self) -> Option<Request> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeBody {
    #[serde(default)]
    binary: Option<PathBuf>,
}

/// `POST /v1/upgrade` and `GET /v1/process`.
pub fn router(requests: Arc<Requests>, binary: PathBuf) -> Router {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Router::new()
        .route(
            "/v1/process",
            get(move || async move {
                Json(json!({
                    "pid": std::process::id(),
                    "binary": binary.display().to_string(),
                    "version": env!("CARGO_PKG_VERSION"),
                    "started_unix": started,
                }))
            }),
        )
        .route("/v1/upgrade", post(upgrade).with_state(requests))
}

async fn upgrade(
    State(requests): State<Arc<Requests>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: UpgradeBody = if body.is_empty() {
        UpgradeBody { binary: None }
    } else {
        softcard_control::api::parse_body(&body)?
    };
    if let Some(b) = &body.binary {
        if !b.is_absolute() {
            return Err(ApiError::new(400, "binary: give an absolute path"));
        }
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    {
        let mut slot = requests.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Err(ApiError::new(409, "an upgrade is already under way"));
        }
        *slot = Some((body.binary, tx));
    }
    // SAFETY: kill(2) to our own process; the main thread waits for it.
    unsafe { libc::kill(libc::getpid(), libc::SIGUSR2) };
    match rx.await {
        Ok(Ok(pid)) => Ok(Json(json!({
            "previous_pid": std::process::id(),
            "pid": pid,
        }))),
        Ok(Err(e)) => Err(ApiError::new(500, e)),
        Err(_) => Err(ApiError::new(500, "the daemon dropped the upgrade")),
    }
}

/// Tells systemd (`Type=notify`, `NotifyAccess=all`) that this process is
/// now the service's main process and ready. Does nothing outside systemd.
pub fn notify_service_manager() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let msg = format!("MAINPID={}\nREADY=1\n", std::process::id());
    let sent = match path.to_str() {
        Some(p) if p.starts_with('@') => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(&p.as_bytes()[1..]).and_then(
                |addr| {
                    let s = std::os::unix::net::UnixDatagram::unbound()?;
                    s.send_to_addr(msg.as_bytes(), &addr)
                },
            )
        }
        _ => std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.send_to(msg.as_bytes(), Path::new(&path))),
    };
    if let Err(e) = sent {
        log::warn!("notifying the service manager: {e}");
    }
}
