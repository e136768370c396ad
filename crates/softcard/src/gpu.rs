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
    /// In a region: where the region's console reads attachments' frames
    /// (HTTPS, host:port).
    #[arg(long, default_value = "127.0.0.1:0")]
    frames: String,
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
    /// First run a compute workload (Collatz step counts of 1..=N) and
    /// print a digest of its result, to compare with a local run.
    #[arg(long, default_value_t = 0)]
    compute: u32,
}

/// The digest `gpu demo --compute N` prints: SHA-256 of the Collatz step
/// counts of 1..=N.
pub fn compute_digest(device: &wgpu::Device, queue: &wgpu::Queue, n: u32) -> Result<String> {
    use sha2::Digest;
    let input: Vec<u32> = (1..=n).collect();
    let out = workloads::collatz(device, queue, &input).map_err(|e| anyhow!(e))?;
    Ok(hex::encode(sha2::Sha256::digest(&out)))
}

/// Runs the GPU server until killed.
pub fn serve(a: &ServeArgs) -> Result<()> {
    if let Some(url) = &a.region {
        return serve_in_region(a, url);
    }
    let quota = parse_size(&a.quota).map_err(|e| anyhow!("--quota: {e}"))?;
    let server = GpuServer::new(ServerConfig {
        quota,
        ..Default::default()
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
    server.serve(listener)?;
    Ok(())
}

/// `gpu serve --region`: TLS with the region's certificate, the region's
/// credentials only, frames to the region's console only.
fn serve_in_region(a: &ServeArgs, url: &str) -> Result<()> {
    if a.viewer.is_some() {
        anyhow::bail!(
            "--viewer is for a GPU server outside a region; in a region, frames go to the \
             region's console (--frames sets where the region reads them)"
        );
    }
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
    let client = softcard_region::client::RegionClient::new(url, secret.trim(), ca.as_deref())?;
    let g = crate::gpu_region::start(
        client,
        &crate::gpu_region::Options {
            listen: a.listen.clone(),
            frames_listen: a.frames.clone(),
            endpoint: a.endpoint.clone(),
            memory: parse_size(&a.gpu_memory).map_err(|e| anyhow!("--gpu-memory: {e}"))?,
        },
    )?;
    let info = g.server.adapter_info();
    println!(
        "softcard gpu: {} ({:?}, {} {}) in the region at {url} as GPU server {}: \
         vGPUs (TLS) on {}, frames for the console on {}",
        info.name, info.backend, info.driver, info.driver_info, g.name, g.endpoint, g.frames
    );
    loop {
        std::thread::park();
    }
}

/// A vGPU server started by `softcard up`, in its region.
#[derive(Debug)]
pub struct Background {
    /// What runs where.
    pub description: String,
    /// The server, registered while this lives.
    _gpu: crate::gpu_region::RegionGpu,
}

/// Starts `softcard up`'s GPU server in its region, or says why it could
/// not start (no Vulkan adapter, a port in use).
pub fn start_in_background(
    client: softcard_region::client::RegionClient,
    listen: &str,
    frames: &str,
    memory: u64,
) -> Result<Background> {
    let gpu = crate::gpu_region::start(
        client,
        &crate::gpu_region::Options {
            listen: listen.to_owned(),
            frames_listen: frames.to_owned(),
            endpoint: None,
            memory,
        },
    )?;
    let info = gpu.server.adapter_info();
    Ok(Background {
        description: format!(
            "{} ({:?}), {} of GPU memory for vGPUs: GPU server {}, vGPUs (TLS) on {}, \
             frames for the console on {}",
            info.name,
            info.backend,
            format_size(memory),
            gpu.name,
            gpu.endpoint,
            gpu.frames
        ),
        _gpu: gpu,
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
    if a.compute > 0 {
        let t = Instant::now();
        let digest = compute_digest(&device, &queue, a.compute)?;
        println!(
            "compute: collatz 1..={} sha256 {digest} ({:.1} ms)",
            a.compute,
            t.elapsed().as_secs_f64() * 1e3
        );
    }
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
