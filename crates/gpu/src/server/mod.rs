//! The GPU server: owns the machine's physical GPU through wgpu and gives
//! every client connection its own vGPU session (device, queue, objects,
//! memory quota, a fair share of GPU time).
//!
//! Every message is hostile until proven otherwise: ids are looked up in the
//! session's own table only, sizes are checked against the quota before
//! anything is allocated, ranges are checked before wgpu's frontend (which
//! panics on bad ranges) sees them, and a panic that still escapes closes
//! only that session.

pub mod grants;
mod objects;
mod replay;
mod sched;
mod session;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use sched::Scheduler;
pub use session::SessionStats;

use crate::viewer::FrameHub;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Bytes of buffers and textures one session may hold (without an
    /// admission policy; with one, each grant says).
    pub quota: u64,
    /// Who may open a session: everyone when `None`.
    pub admission: Option<Arc<dyn Admission>>,
    /// The port speaks TLS with this identity; plain TCP when `None`.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            quota: 1 << 30,
            admission: None,
            tls: None,
        }
    }
}

/// The physical GPU and everything the sessions share.
#[derive(Debug)]
pub struct GpuServer {
    adapter: wgpu::Adapter,
    config: ServerConfig,
    sched: Scheduler,
    next_session: AtomicU64,
    frames: Arc<FrameHub>,
    live: session::Registry,
    admitted: Admitted,
    /// One device that `run_bytes_shared` sessions start with.
    shared_device: std::sync::OnceLock<Result<(wgpu::Device, wgpu::Queue), String>>,
}

/// What a credential admits a session to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The attachment the credential belongs to (its sessions end when it
    /// is revoked).
    pub attachment: String,
    /// GPU memory the session may hold.
    pub quota: u64,
}

/// Decides which sessions a server admits.
pub trait Admission: Send + Sync + std::fmt::Debug {
    /// The grant of `credential`, or why it is refused.
    fn admit(&self, credential: Option<&str>) -> Result<Grant, String>;
}

/// Live sessions' connections, by attachment: what a revocation ends;
/// and the GPU memory each attachment's sessions hold together.
#[derive(Debug, Default)]
pub(crate) struct Admitted {
    conns: Mutex<HashMap<String, Vec<(u64, TcpStream)>>>,
    pools: Mutex<HashMap<String, std::sync::Weak<AtomicU64>>>,
}

impl Admitted {
    pub(crate) fn add(&self, attachment: &str, session: u64, conn: TcpStream) {
        self.conns
            .lock()
            .expect("admitted")
            .entry(attachment.to_owned())
            .or_default()
            .push((session, conn));
    }

    /// The memory counter `attachment`'s sessions share (alive while one
    /// of them is).
    pub(crate) fn pool(&self, attachment: &str) -> Arc<AtomicU64> {
        let mut m = self.pools.lock().expect("pools");
        m.retain(|_, w| w.strong_count() > 0);
        if let Some(p) = m.get(attachment).and_then(std::sync::Weak::upgrade) {
            return p;
        }
        let p = Arc::new(AtomicU64::new(0));
        m.insert(attachment.to_owned(), Arc::downgrade(&p));
        p
    }

    /// Bytes the sessions of each attachment hold.
    fn usage(&self) -> HashMap<String, u64> {
        self.pools
            .lock()
            .expect("pools")
            .iter()
            .filter_map(|(a, w)| Some((a.clone(), w.upgrade()?.load(Ordering::Acquire))))
            .collect()
    }

    fn remove(&self, session: u64) {
        let mut m = self.conns.lock().expect("admitted");
        for v in m.values_mut() {
            v.retain(|(s, _)| *s != session);
        }
        m.retain(|_, v| !v.is_empty());
    }
}

/// A description of one adapter, for `softcard gpu list`.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub max_buffer_size: u64,
    pub max_texture_dimension_2d: u32,
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::VULKAN;
    wgpu::Instance::new(desc)
}

/// The machine's Vulkan adapters.
pub fn list_adapters() -> Vec<AdapterSummary> {
    let adapters = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::VULKAN));
    adapters
        .iter()
        .map(|a| {
            let info = a.get_info();
            let limits = a.limits();
            AdapterSummary {
                name: info.name,
                backend: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                driver: format!("{} {}", info.driver, info.driver_info),
                max_buffer_size: limits.max_buffer_size,
                max_texture_dimension_2d: limits.max_texture_dimension_2d,
            }
        })
        .collect()
}

impl GpuServer {
    /// Opens the first Vulkan adapter (lavapipe where there is no GPU).
    pub fn new(config: ServerConfig) -> Result<Arc<Self>, String> {
        let adapter =
            pollster::block_on(instance().request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            }))
            .map_err(|e| format!("no Vulkan adapter: {e}"))?;
        Ok(Arc::new(Self {
            adapter,
            config,
            sched: Scheduler::default(),
            next_session: AtomicU64::new(1),
            frames: Arc::new(FrameHub::default()),
            live: session::Registry::default(),
            admitted: Admitted::default(),
            shared_device: std::sync::OnceLock::new(),
        }))
    }

    /// The adapter's description.
    pub fn adapter_info(&self) -> wgpu::AdapterInfo {
        self.adapter.get_info()
    }

    /// What a session on this server may ask for: the wgpu features it
    /// offers (by name) and its main limits, as a region lists them.
    pub fn offer(&self) -> (Vec<String>, std::collections::BTreeMap<String, u64>) {
        let features = (self.adapter.features() & session::supported_features())
            .iter_names()
            .map(|(n, _)| n.to_owned())
            .collect();
        let l = self.adapter.limits();
        let limits = [
            ("max_buffer_size", l.max_buffer_size),
            (
                "max_texture_dimension_2d",
                u64::from(l.max_texture_dimension_2d),
            ),
            (
                "max_texture_dimension_3d",
                u64::from(l.max_texture_dimension_3d),
            ),
            ("max_bind_groups", u64::from(l.max_bind_groups)),
            (
                "max_storage_buffer_binding_size",
                l.max_storage_buffer_binding_size,
            ),
            (
                "max_compute_invocations_per_workgroup",
                u64::from(l.max_compute_invocations_per_workgroup),
            ),
            (
                "max_compute_workgroups_per_dimension",
                u64::from(l.max_compute_workgroups_per_dimension),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        (features, limits)
    }

    /// Frames presented by sessions, for the viewer.
    pub fn frames(&self) -> Arc<FrameHub> {
        self.frames.clone()
    }

    /// Live sessions and their memory use.
    pub fn sessions(&self) -> Vec<SessionStats> {
        self.live.snapshot()
    }

    /// GPU memory held by each attachment's live sessions.
    pub fn attachment_usage(&self) -> HashMap<String, u64> {
        self.admitted.usage()
    }

    /// Binds `addr` and serves it on a background thread; returns the
    /// address actually bound (for `127.0.0.1:0`).
    pub fn listen(self: &Arc<Self>, addr: &str) -> std::io::Result<std::net::SocketAddr> {
        let listener = TcpListener::bind(addr)?;
        let bound = listener.local_addr()?;
        let server = self.clone();
        std::thread::Builder::new()
            .name("vgpu-accept".into())
            .spawn(move || server.serve(listener))?;
        Ok(bound)
    }

    /// Accepts connections until the listener fails; one thread a session.
    pub fn serve(self: &Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        for conn in listener.incoming() {
            let conn = conn?;
            let server = self.clone();
            std::thread::Builder::new()
                .name("vgpu-session".into())
                .spawn(move || server.run_session(conn))?;
        }
        Ok(())
    }

    /// Feeds `input` to a fresh session as if a client had sent it, and
    /// returns how the session ended. Used by the fuzz target and tests.
    pub fn run_bytes(self: &Arc<Self>, input: &[u8]) -> Result<(), String> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.sched.join(id);
        let r = session::Session::new(id, self.clone()).run_bytes(input, None);
        self.sched.leave(id);
        self.live.remove(id);
        r.map_err(|e| e.to_string())
    }

    /// As [`run_bytes`](Self::run_bytes), but the session starts with a
    /// device shared by all such sessions (made once, errors discarded), so
    /// `input` starts after the hello. For the fuzz target: a device per
    /// input would cost more than the input.
    pub fn run_bytes_shared(self: &Arc<Self>, input: &[u8]) -> Result<(), String> {
        let shared = self
            .shared_device
            .get_or_init(|| {
                let (d, q) =
                    pollster::block_on(self.adapter.request_device(&wgpu::DeviceDescriptor {
                        label: Some("vgpu shared fuzz device"),
                        required_limits: wgpu::Limits::downlevel_defaults(),
                        ..Default::default()
                    }))
                    .map_err(|e| e.to_string())?;
                d.on_uncaptured_error(std::sync::Arc::new(|_e: wgpu::Error| {}));
                Ok((d, q))
            })
            .clone()?;
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.sched.join(id);
        let r = session::Session::new(id, self.clone()).run_bytes(input, Some(shared));
        self.sched.leave(id);
        self.live.remove(id);
        r.map_err(|e| e.to_string())
    }

    /// Ends every live session of `attachment` (its credential was
    /// revoked): their connections are shut, and the sessions end.
    pub fn revoke(&self, attachment: &str) -> usize {
        let conns = self
            .admitted
            .conns
            .lock()
            .expect("admitted")
            .remove(attachment);
        let n = conns.as_ref().map_or(0, Vec::len);
        for (_, c) in conns.into_iter().flatten() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if n > 0 {
            log::info!("vgpu attachment {attachment} revoked: {n} session(s) ended");
        }
        n
    }

    /// Runs one session on the calling thread until the client leaves.
    pub fn run_session(self: &Arc<Self>, conn: TcpStream) {
        let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        crate::proto::tune_socket(&conn);
        let halves = match &self.config.tls {
            None => crate::tls::plain_halves(&conn),
            Some(tls) => tls.accept(&conn).map(crate::tls::Split::boxed),
        };
        let halves = match halves {
            Ok(h) => h,
            Err(e) => {
                log::warn!(
                    "vgpu connection from {peer} refused: {}",
                    crate::tls::handshake_failure(&e)
                );
                return;
            }
        };
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        log::info!("vgpu session {id} from {peer}");
        self.sched.join(id);
        let result = session::Session::new(id, self.clone()).run(&conn, halves);
        self.sched.leave(id);
        self.live.remove(id);
        self.admitted.remove(id);
        match result {
            Ok(()) => log::info!("vgpu session {id} ended"),
            Err(e) => log::warn!("vgpu session {id} closed: {e}"),
        }
    }
}
