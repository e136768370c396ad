//! `softcard gpu`: the vGPU server, and a demo application that renders to
//! a remote surface.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use softcard_control::size::{format_size, parse_size};
use softcard_gpu::workloads::{self, Scene};
use softcard_gpu::{GpuServer, ServerConfig};

/// Options of `softcard gpu serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Where clients connect (host:port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Where the viewer page and its frame stream are served (host:port).
    #[arg(long)]
    viewer: Option<String>,
    /// GPU memory (buffers and textures) one session may hold.
    #[arg(long, default_value = "1GiB")]
    quota: String,
    /// Register the adapter with the region at this URL as a resource
    /// provider, and keep it registered.
    #[arg(long, requires = "region_credential")]
    region: Option<String>,
    /// The GPU server's credential (`softcard gpu credential NAME`).
    #[arg(long)]
    region_credential: Option<std::path::PathBuf>,
    /// A PEM certificate to trust for an https region.
    #[arg(long)]
    region_ca: Option<std::path::PathBuf>,
    /// GPU memory the adapter offers to vGPUs (a CPU adapter such as
    /// lavapipe has none of its own: it uses the machine's).
    #[arg(long, default_value = "8GiB")]
    gpu_memory: String,
    /// The address clients reach this server at, as registered (default:
    /// the listening address).
    #[arg(long)]
    endpoint: Option<String>,
}

/// What the region learns of an adapter: name, backend, kind, the GPU
/// memory offered, and traits (`CUSTOM_<KIND>`, `CUSTOM_<BACKEND>`).
pub fn registration(info: &wgpu::AdapterInfo, endpoint: &str, memory: u64) -> serde_json::Value {
    let kind = format!("{:?}", info.device_type);
    let backend = format!("{:?}", info.backend);
    serde_json::json!({
        "endpoint": endpoint,
        "adapters": [{
            "name": info.name,
            "backend": backend,
            "device_type": kind,
            "memory_bytes": memory,
            "traits": [
                format!("CUSTOM_{}", kind.to_uppercase()),
                format!("CUSTOM_{}", backend.to_uppercase()),
            ],
        }],
    })
}

/// Keeps the GPU server registered with a region.
pub fn join_region(
    client: softcard_region::client::RegionClient,
    info: &wgpu::AdapterInfo,
    endpoint: &str,
    memory: u64,
) -> Result<softcard_region::client::Registration> {
    let offer = registration(info, endpoint, memory);
    Ok(softcard_region::client::Registration::start(
        client,
        "/v1/agent/gpu/register",
        "/v1/agent/gpu/heartbeat",
        move || offer.clone(),
    )?)
}

/// Options of `softcard gpu demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The GPU server (host:port), or `metadata`: the vGPU the instance
    /// metadata service names (inside a region's instance).
    #[arg(long, default_value = "127.0.0.1:7070")]
    server: String,
    /// Frames to render; 0 renders until killed.
    #[arg(long, default_value_t = 0)]
    frames: u32,
    /// Frame rate to pace at; 0 renders as fast as the GPU allows.
    #[arg(long, default_value_t = 30.0)]
    fps: f64,
    #[arg(long, default_value_t = 1280)]
    width: u32,
    #[arg(long, default_value_t = 720)]
    height: u32,
    /// Draw the same frame (the scene at t=0) every time, so that what a
    /// viewer shows can be compared with a local rendering.
    #[arg(long)]
    still: bool,
}

/// A region GPU server's admission: the credentials of the vGPUs attached
/// on it, by hash, as the region lists them (read every
/// [`GRANTS_REFRESH`]); a revoked one's sessions are ended.
#[derive(Debug, Default)]
pub struct RegionGrants {
    grants: std::sync::RwLock<std::collections::HashMap<String, softcard_gpu::server::Grant>>,
}

/// How often a region GPU server reads its attachments.
const GRANTS_REFRESH: Duration = Duration::from_millis(500);

impl softcard_gpu::server::Admission for RegionGrants {
    fn admit(&self, credential: Option<&str>) -> Result<softcard_gpu::server::Grant, String> {
        use sha2::Digest;
        let c = credential.ok_or("this GPU server admits only a vGPU attachment's credential")?;
        let hash = hex::encode(sha2::Sha256::digest(c.as_bytes()));
        self.grants
            .read()
            .map_err(|_| "grants unavailable".to_owned())?
            .get(&hash)
            .cloned()
            .ok_or_else(|| "unknown or revoked credential".to_owned())
    }
}

impl RegionGrants {
    /// Keeps the grants in step with the region for as long as `server`
    /// lives, ending the sessions of attachments the region revoked.
    pub fn follow(
        self: &std::sync::Arc<Self>,
        client: softcard_region::client::RegionClient,
        server: &std::sync::Arc<GpuServer>,
    ) -> Result<()> {
        let (me, server) = (self.clone(), std::sync::Arc::downgrade(server));
        std::thread::Builder::new()
            .name("vgpu-grants".into())
            .spawn(move || loop {
                let Some(server) = server.upgrade() else {
                    return;
                };
                match client.get("/v1/agent/gpu/work") {
                    Ok(w) => {
                        let next: std::collections::HashMap<String, softcard_gpu::server::Grant> =
                            w["attachments"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|a| {
                                    Some((
                                        a["credential_hash"].as_str()?.to_owned(),
                                        softcard_gpu::server::Grant {
                                            attachment: a["id"].as_str()?.to_owned(),
                                            quota: a["memory_bytes"].as_u64()?,
                                        },
                                    ))
                                })
                                .collect();
                        let gone: Vec<String> = match me.grants.write() {
                            Ok(mut g) => {
                                let gone = g
                                    .values()
                                    .filter(|old| {
                                        !next.values().any(|n| n.attachment == old.attachment)
                                    })
                                    .map(|old| old.attachment.clone())
                                    .collect();
                                *g = next;
                                gone
                            }
                            Err(_) => Vec::new(),
                        };
                        for a in gone {
                            server.revoke(&a);
                        }
                    }
                    Err(e) => log::warn!("reading this GPU server's attachments: {e}"),
                }
                drop(server);
                std::thread::sleep(GRANTS_REFRESH);
            })?;
        Ok(())
    }
}

/// Runs the GPU server until killed.
pub fn serve(a: &ServeArgs) -> Result<()> {
    let quota = parse_size(&a.quota).map_err(|e| anyhow!("--quota: {e}"))?;
    // In a region, only the region's credentials open sessions.
    let grants = a
        .region
        .as_ref()
        .map(|_| std::sync::Arc::new(RegionGrants::default()));
    let server = GpuServer::new(ServerConfig {
        quota,
        admission: grants
            .clone()
            .map(|g| g as std::sync::Arc<dyn softcard_gpu::server::Admission>),
    })
    .map_err(|e| anyhow!(e))?;
    let info = server.adapter_info();
    let listener =
        TcpListener::bind(&a.listen).with_context(|| format!("listen on {}", a.listen))?;
    println!(
        "softcard gpu: {} ({:?}, {} {}), {} per session, clients on {}",
        info.name,
        info.backend,
        info.driver,
        info.driver_info,
        format_size(quota),
        listener.local_addr()?
    );
    if let Some(v) = &a.viewer {
        let vl = TcpListener::bind(v).with_context(|| format!("viewer on {v}"))?;
        println!("softcard gpu: viewer on http://{}/", vl.local_addr()?);
        let frames = server.frames();
        std::thread::Builder::new()
            .name("vgpu-viewer".into())
            .spawn(move || softcard_gpu::viewer::serve(vl, frames))?;
    }
    let _lease = match &a.region {
        Some(url) => {
            let file = a
                .region_credential
                .as_ref()
                .context("--region-credential")?;
            let secret = std::fs::read_to_string(file)
                .with_context(|| format!("GPU server credential {}", file.display()))?;
            let ca = a
                .region_ca
                .as_ref()
                .map(std::fs::read)
                .transpose()
                .context("region CA")?;
            let client =
                softcard_region::client::RegionClient::new(url, secret.trim(), ca.as_deref())?;
            let memory = parse_size(&a.gpu_memory).map_err(|e| anyhow!("--gpu-memory: {e}"))?;
            let endpoint = a
                .endpoint
                .clone()
                .unwrap_or(listener.local_addr()?.to_string());
            if let Some(g) = &grants {
                g.follow(client.clone(), &server)?;
            }
            Some(join_region(client, &info, &endpoint, memory)?)
        }
        None => None,
    };
    server.serve(listener)?;
    Ok(())
}

/// A vGPU server started by `softcard up`.
#[derive(Debug)]
pub struct Background {
    /// What runs where.
    pub description: String,
    /// Where clients connect.
    pub endpoint: std::net::SocketAddr,
    /// Its adapter.
    pub info: wgpu::AdapterInfo,
}

/// Starts a vGPU server (and its viewer) on background threads, for
/// `softcard up`, or says why it could not start (no Vulkan adapter, a
/// port in use).
pub fn start_in_background(listen: &str, viewer: &str, quota: u64) -> Result<Background> {
    let server = GpuServer::new(ServerConfig {
        quota,
        admission: None,
    })
    .map_err(|e| anyhow!(e))?;
    let info = server.adapter_info();
    let vl = TcpListener::bind(viewer).with_context(|| format!("viewer on {viewer}"))?;
    let bound = server
        .listen(listen)
        .with_context(|| format!("listen on {listen}"))?;
    let viewer_at = vl.local_addr()?;
    let frames = server.frames();
    std::thread::Builder::new()
        .name("vgpu-viewer".into())
        .spawn(move || softcard_gpu::viewer::serve(vl, frames))?;
    Ok(Background {
        description: format!(
            "{} ({:?}), {} per session: clients on {bound}, viewer on http://{viewer_at}/ \
             (try: softcard gpu demo --server {bound})",
            info.name,
            info.backend,
            format_size(quota)
        ),
        endpoint: bound,
        info,
    })
}

/// Lists the machine's GPUs.
pub fn adapters() -> Result<()> {
    let adapters = softcard_gpu::server::list_adapters();
    if adapters.is_empty() {
        anyhow::bail!("no Vulkan adapter (install a driver, or mesa-vulkan-drivers for lavapipe)");
    }
    println!(
        "{:<40} {:<8} {:<14} {:>12} {:>8}  DRIVER",
        "ADAPTER", "BACKEND", "TYPE", "MAX BUFFER", "MAX 2D"
    );
    for a in adapters {
        println!(
            "{:<40} {:<8} {:<14} {:>12} {:>8}  {}",
            a.name,
            a.backend,
            a.device_type,
            format_size(a.max_buffer_size),
            a.max_texture_dimension_2d,
            a.driver
        );
    }
    Ok(())
}

/// An ordinary wgpu render loop whose only vGPU-specific lines are the
/// instance and the surface.
pub fn demo(a: &DemoArgs) -> Result<()> {
    // `--server metadata`: the vGPU the provider attached to this instance.
    let instance = if a.server == "metadata" {
        softcard_gpu::remote_instance_from_metadata()
            .context("connect to the vGPU named by the instance metadata")?
    } else {
        softcard_gpu::remote_instance(&a.server)
            .with_context(|| format!("connect to the GPU server at {}", a.server))?
    };
    let surface = softcard_gpu::remote_surface(&instance);
    if let Some(path) = softcard_gpu::viewer_path(&instance) {
        // The secret part of the URL: who has it sees these frames.
        println!("viewer: {path}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }
    let (device, queue) = workloads::open(&instance).map_err(|e| anyhow!(e))?;
    let config = wgpu::SurfaceConfiguration {
        usage: wgpu::TextureUsages::RENDER_ATTACHMENT,
        format: wgpu::TextureFormat::Rgba8Unorm,
        color_space: wgpu::SurfaceColorSpace::Auto,
        width: a.width,
        height: a.height,
        desired_maximum_frame_latency: 2,
        present_mode: wgpu::PresentMode::Fifo,
        alpha_mode: wgpu::CompositeAlphaMode::Opaque,
        view_formats: vec![],
    };
    surface.configure(&device, &config);
    let scene = Scene::new(&device, &queue, a.width, a.height);
    let period = (a.fps > 0.0).then(|| Duration::from_secs_f64(1.0 / a.fps));
    let start = Instant::now();
    let mut t = 0u32;
    while a.frames == 0 || t < a.frames {
        let frame = match surface.get_current_texture() {
            wgpu::CurrentSurfaceTexture::Success(f)
            | wgpu::CurrentSurfaceTexture::Suboptimal(f) => f,
            other => anyhow::bail!("no surface texture: {other:?}"),
        };
        let view = frame.texture.create_view(&Default::default());
        scene.draw(&queue, &device, &view, if a.still { 0 } else { t });
        queue.present(frame);
        t += 1;
        if let Some(p) = period {
            let due = start + p * t;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        if t.is_multiple_of(100) {
            device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| anyhow!("GPU server: {e}"))?;
        }
    }
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| anyhow!("GPU server: {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "rendered {t} frames of {}x{} in {secs:.2} s ({:.1} fps)",
        a.width,
        a.height,
        f64::from(t) / secs
    );
    Ok(())
}
