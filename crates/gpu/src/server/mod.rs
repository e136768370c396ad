//! The GPU server: owns the machine's physical GPU through wgpu and gives
//! every client connection its own vGPU session (device, queue, objects,
//! memory quota, a fair share of GPU time).
//!
//! Every message is hostile until proven otherwise: ids are looked up in the
//! session's own table only, sizes are checked against the quota before
//! anything is allocated, ranges are checked before wgpu's frontend (which
//! panics on bad ranges) sees them, and a panic that still escapes closes
//! only that session.

mod replay;
mod sched;
mod session;

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use sched::Scheduler;
pub use session::SessionStats;

use crate::viewer::FrameHub;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Bytes of buffers and textures one session may hold.
    pub quota: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { quota: 1 << 30 }
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
    /// One device that `run_bytes_shared` sessions start with.
    shared_device: std::sync::OnceLock<Result<(wgpu::Device, wgpu::Queue), String>>,
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
            shared_device: std::sync::OnceLock::new(),
        }))
    }

    /// The adapter's description.
    pub fn adapter_info(&self) -> wgpu::AdapterInfo {
        self.adapter.get_info()
    }

    /// Frames presented by sessions, for the viewer.
    pub fn frames(&self) -> Arc<FrameHub> {
        self.frames.clone()
    }

    /// Live sessions and their memory use.
    pub fn sessions(&self) -> Vec<SessionStats> {
        self.live.snapshot()
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

    /// Runs one session on the calling thread until the client leaves.
    pub fn run_session(self: &Arc<Self>, conn: TcpStream) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        log::info!("vgpu session {id} from {peer}");
        self.sched.join(id);
        let result = session::Session::new(id, self.clone()).run(conn);
        self.sched.leave(id);
        self.live.remove(id);
        match result {
            Ok(()) => log::info!("vgpu session {id} ended"),
            Err(e) => log::warn!("vgpu session {id} closed: {e}"),
        }
    }
}
