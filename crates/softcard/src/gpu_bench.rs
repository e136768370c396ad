//! `softcard bench gpu`: local wgpu against the vGPU over loopback, on the
//! same adapter, in the same run.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use softcard_gpu::workloads::{self, Offload, Scene};
use softcard_gpu::{GpuServer, ServerConfig};

/// Options of `softcard bench gpu`.
#[derive(Debug, clap::Args)]
pub struct GpuBenchArgs {
    /// Iterations of the offload and small-dispatch loops.
    #[arg(long, default_value_t = 40)]
    iterations: u32,
    /// Seconds of the render loop.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
}

fn two_sessions(addr: &str, len: u64, seconds: f64) -> Result<Vec<f64>> {
    let start = Instant::now() + Duration::from_millis(300);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let addr = addr.to_string();
            std::thread::spawn(move || -> Result<f64> {
                let inst = softcard_gpu::remote_instance(&addr)?;
                let (d, q) = workloads::open(&inst).map_err(|e| anyhow!(e))?;
                let o = Offload::new(&d, len);
                let data = vec![3u8; len as usize];
                o.run(&d, &q, &data).map_err(|e| anyhow!(e))?;
                std::thread::sleep(start.saturating_duration_since(Instant::now()));
                let mut n = 0u32;
                while start.elapsed().as_secs_f64() < seconds {
                    o.run(&d, &q, &data).map_err(|e| anyhow!(e))?;
                    n += 1;
                }
                Ok(f64::from(n) / start.elapsed().as_secs_f64())
            })
        })
        .collect();
    workers
        .into_iter()
        .map(|w| w.join().map_err(|_| anyhow!("worker panicked"))?)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time_offload(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    len: u64,
    iterations: u32,
) -> Result<(f64, Vec<u8>)> {
    let o = Offload::new(device, len);
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    // One warm-up run compiles the pipeline and faults the buffers in.
    let mut out = o.run(device, queue, &data).map_err(|e| anyhow!(e))?;
    let mut times = Vec::new();
    for _ in 0..iterations {
        let t = Instant::now();
        out = o.run(device, queue, &data).map_err(|e| anyhow!(e))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((median(times), out))
}

/// Bytes per second one loopback TCP stream carries on this machine, the
/// floor under any network transfer of the offload's bytes.
fn tcp_rate() -> Result<f64> {
    use std::io::{Read, Write};
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let total: usize = 256 << 20;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        softcard_gpu::proto::tune_socket(&s);
        let chunk = vec![7u8; 4 << 20];
        for _ in 0..total / chunk.len() {
            s.write_all(&chunk)?;
        }
        Ok(())
    });
    let (mut r, _) = l.accept()?;
    softcard_gpu::proto::tune_socket(&r);
    let mut buf = vec![0u8; 4 << 20];
    let mut got = 0;
    let start = Instant::now();
    while got < total {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let secs = start.elapsed().as_secs_f64();
    sender.join().map_err(|_| anyhow!("sender panicked"))??;
    Ok(got as f64 / secs)
}

/// Runs the benchmark and prints a table.
pub fn gpu(a: &GpuBenchArgs) -> Result<()> {
    let server = GpuServer::new(ServerConfig {
        quota: 2 << 30,
        ..Default::default()
    })
    .map_err(|e| anyhow!(e))?;
    let addr = server.listen("127.0.0.1:0")?.to_string();
    // The same server's twin speaking TLS, with a certificate from a
    // throwaway region authority, as a region's GPU server does.
    let (tls_server, tls_endpoint) = tls_twin()?;
    let vl = TcpListener::bind("127.0.0.1:0")?;
    let vport = vl.local_addr()?.port();
    let frames = server.frames();
    std::thread::spawn(move || softcard_gpu::viewer::serve(vl, frames));

    let info = server.adapter_info();
    println!(
        "# softcard bench gpu: {} ({}), local wgpu vs vGPU over loopback TCP, same adapter",
        info.name, info.driver_info
    );
    let (ld, lq) = workloads::open(&workloads::local_instance()).map_err(|e| anyhow!(e))?;
    let remote = softcard_gpu::remote_instance(&addr)?;
    let (rd, rq) = workloads::open(&remote).map_err(|e| anyhow!(e))?;

    // (a) 4 MiB upload, dispatch, readback.
    let len = 4 << 20;
    let (lt, lout) = time_offload(&ld, &lq, len, a.iterations)?;
    let (rt, rout) = time_offload(&rd, &rq, len, a.iterations)?;
    if lout != rout {
        bail!("the vGPU's offload result differs from the local one");
    }
    println!();
    println!("| (a) 4 MiB upload + dispatch + readback | median ms | ratio to local |");
    println!("|---|---:|---:|");
    println!("| local wgpu | {lt:.2} | 1.00 |");
    println!("| vGPU over loopback | {rt:.2} | {:.2} |", rt / lt);
    let (tls_d, tls_q) = workloads::open(&softcard_gpu::remote_instance_at(&tls_endpoint)?)
        .map_err(|e| anyhow!(e))?;
    let (tt, tout) = time_offload(&tls_d, &tls_q, len, a.iterations)?;
    if tout != lout {
        bail!("the vGPU's offload result over TLS differs from the local one");
    }
    println!(
        "| vGPU over loopback, TLS 1.3 (AES-GCM, rustls) | {tt:.2} | {:.2} (TLS / plain: {:.2}) |",
        tt / lt,
        tt / rt
    );
    let rate = tcp_rate()?;
    let floor = lt + 2.0 * len as f64 / rate * 1e3;
    println!(
        "| floor: local + 8 MiB at this machine's loopback TCP rate ({:.2} GB/s) | {floor:.2} | {:.2} |",
        rate / 1e9,
        floor / lt
    );

    // (c) small dispatch loop: per-iteration time and round trips.
    let small = 256;
    let (lt, _) = time_offload(&ld, &lq, small, a.iterations * 5)?;
    let before = softcard_gpu::round_trips();
    let (rt, _) = time_offload(&rd, &rq, small, a.iterations * 5)?;
    let trips = softcard_gpu::round_trips() - before;
    let runs = u64::from(a.iterations * 5 + 1);
    println!();
    println!("| (c) 256 B upload + dispatch + readback, per iteration | median us | ratio to local | round trips per readback |");
    println!("|---|---:|---:|---:|");
    println!("| local wgpu | {:.0} | 1.00 | - |", lt * 1e3);
    println!(
        "| vGPU over loopback | {:.0} | {:.2} | {:.2} |",
        rt * 1e3,
        rt / lt,
        trips as f64 / runs as f64
    );
    let (tt, _) = time_offload(&tls_d, &tls_q, small, a.iterations * 5)?;
    println!(
        "| vGPU over loopback, TLS | {:.0} | {:.2} | 1.00 |",
        tt * 1e3,
        tt / lt
    );
    // Where the added time goes: one empty round trip through the session
    // (submit nothing, wait for the queue), and a bare loopback TCP
    // ping-pong between two threads (the floor of any round trip here).
    let empty = |d: &wgpu::Device, q: &wgpu::Queue| -> Result<f64> {
        let mut times = Vec::new();
        for _ in 0..a.iterations * 5 {
            let t = Instant::now();
            q.submit([]);
            d.poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| anyhow!("{e}"))?;
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(median(times))
    };
    let (le, re) = (empty(&ld, &lq)?, empty(&rd, &rq)?);
    println!("| breakdown: empty submit + wait, local | {le:.0} | | |");
    println!("| breakdown: empty submit + wait, vGPU (one round trip) | {re:.0} | | 1.00 |");
    println!(
        "| breakdown: loopback TCP ping-pong, 64 B, two blocking threads | {:.0} | | |",
        tcp_ping_pong(a.iterations * 25)?
    );

    // (d) two sessions at once, each running the 4 MiB offload loop: how
    // evenly the GPU is shared.
    let per_session = two_sessions(&addr, len, a.seconds)?;
    println!();
    println!("| (d) two sessions at once, 4 MiB offload loop | iterations/s |");
    println!("|---|---:|");
    for (i, r) in per_session.iter().enumerate() {
        println!("| session {} | {r:.1} |", i + 1);
    }
    println!(
        "| ratio slower/faster | {:.2} |",
        per_session[0].min(per_session[1]) / per_session[0].max(per_session[1])
    );

    // (b) render loop at 1280x720: local offscreen, and remote presented to
    // the viewer with a WebSocket client counting the frames it receives.
    let (w, h) = (1280, 720);
    let local_fps = {
        let scene = Scene::new(&ld, &lq, w, h);
        let target = ld.create_texture(&wgpu::TextureDescriptor {
            label: Some("frame"),
            size: wgpu::Extent3d {
                width: w,
                height: h,
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: scene.format,
            usage: wgpu::TextureUsages::RENDER_ATTACHMENT | wgpu::TextureUsages::COPY_SRC,
            view_formats: &[],
        });
        let view = target.create_view(&Default::default());
        let start = Instant::now();
        let mut n = 0u32;
        while start.elapsed().as_secs_f64() < a.seconds {
            scene.draw(&lq, &ld, &view, n);
            ld.poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| anyhow!("{e}"))?;
            n += 1;
        }
        f64::from(n) / start.elapsed().as_secs_f64()
    };
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (received, stop) = (received.clone(), stop.clone());
        let stream = TcpStream::connect(("127.0.0.1", vport))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        let token_path = softcard_gpu::viewer_path(&remote).unwrap_or_default();
        let query = token_path.trim_start_matches('/');
        let (mut ws, _) = tungstenite::client(format!("ws://127.0.0.1:{vport}/ws{query}"), stream)
            .map_err(|e| anyhow!("viewer websocket: {e}"))?;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(tungstenite::Message::Binary(b)) = ws.read() {
                    if b.starts_with(&[0xFF, 0xD8]) {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let surface = softcard_gpu::remote_surface(&remote);
    surface.configure(
        &rd,
        &wgpu::SurfaceConfiguration {
            usage: wgpu::TextureUsages::RENDER_ATTACHMENT,
            format: wgpu::TextureFormat::Rgba8Unorm,
            color_space: wgpu::SurfaceColorSpace::Auto,
            width: w,
            height: h,
            desired_maximum_frame_latency: 2,
            present_mode: wgpu::PresentMode::Fifo,
            alpha_mode: wgpu::CompositeAlphaMode::Opaque,
            view_formats: vec![],
        },
    );
    let scene = Scene::new(&rd, &rq, w, h);
    let published0 = server.frames().published();
    let got0 = received.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed().as_secs_f64() < a.seconds {
        let frame = match surface.get_current_texture() {
            wgpu::CurrentSurfaceTexture::Success(f) => f,
            other => bail!("no surface texture: {other:?}"),
        };
        let view = frame.texture.create_view(&Default::default());
        scene.draw(&rq, &rd, &view, n);
        rq.present(frame);
        n += 1;
        // Like a vsync'd application, never run more than two frames ahead.
        if n.is_multiple_of(2) {
            rd.poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| anyhow!("{e}"))?;
        }
    }
    rd.poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| anyhow!("{e}"))?;
    let secs = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    let published = server.frames().published() - published0;
    // What one viewer costs the server: a 1280x720 frame's JPEG encoding
    // (one thread) and its size.
    let (encode_ms, jpeg_bytes) = {
        let rgba = scene_pixels(&ld, &lq, w, h)?;
        let frame = softcard_gpu::viewer::Frame::new(w, h, rgba);
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..20 {
            let t = Instant::now();
            bytes = frame.jpeg(80).map_err(|e| anyhow!(e))?.len();
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        (median(times), bytes)
    };
    let got = received.load(Ordering::Relaxed) - got0;
    println!();
    println!("| (b) render loop, {w}x{h}, textured depth-tested scene | frames/s |");
    println!("|---|---:|");
    println!("| local wgpu, offscreen | {local_fps:.1} |");
    println!(
        "| vGPU: frames the application presented | {:.1} |",
        f64::from(n) / secs
    );
    println!(
        "| vGPU: frames read back on the server | {:.1} |",
        published as f64 / secs
    );
    println!(
        "| vGPU: JPEG frames received by a viewer over WebSocket | {:.1} |",
        got as f64 / secs
    );
    println!(
        "| per viewer frame: JPEG encoding on one server thread | {encode_ms:.2} ms ({:.0} frames/s per core) |",
        1e3 / encode_ms
    );
    println!(
        "| per viewer frame: bytes (JPEG quality 80) | {jpeg_bytes} ({:.1} MB/s at 60 fps) |",
        jpeg_bytes as f64 * 60.0 / 1e6
    );
    drop(tls_server);
    Ok(())
}

/// The scene at t=0 rendered locally, RGBA.
fn scene_pixels(d: &wgpu::Device, q: &wgpu::Queue, w: u32, h: u32) -> Result<Vec<u8>> {
    Scene::new(d, q, w, h)
        .render_pixels(d, q, 0)
        .map_err(|e| anyhow!(e))
}

/// A GPU server speaking TLS with a certificate a throwaway authority
/// signed, and the endpoint a client trusting that authority uses.
fn tls_twin() -> Result<(std::sync::Arc<GpuServer>, softcard_gpu::Endpoint)> {
    let ca = softcard_region::ca::Authority::generate().map_err(|e| anyhow!(e))?;
    let (key, csr) = softcard_region::ca::new_key_and_csr().map_err(|e| anyhow!(e))?;
    let name = softcard_region::ca::gpu_server_name("bench");
    let cert = ca
        .sign_server(&csr, &name, softcard_region::ca::SERVER_CERT_LIFETIME)
        .map_err(|e| anyhow!(e))?;
    let server = GpuServer::new(ServerConfig {
        quota: 2 << 30,
        tls: Some(softcard_gpu::tls::ServerTls::from_pem(&cert, &key)?),
        ..Default::default()
    })
    .map_err(|e| anyhow!(e))?;
    let addr = server.listen("127.0.0.1:0")?.to_string();
    Ok((
        server,
        softcard_gpu::Endpoint {
            addr,
            credential: None,
            tls: Some(softcard_gpu::tls::ClientTls {
                server_name: name,
                ca_pem: ca.cert_pem.clone(),
            }),
        },
    ))
}

/// Median microseconds of a 64-byte ping-pong over loopback TCP between
/// two threads that block in read.
fn tcp_ping_pong(n: u32) -> Result<f64> {
    use std::io::{Read, Write};
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        softcard_gpu::proto::tune_socket(&s);
        let mut b = [0u8; 64];
        loop {
            if s.read_exact(&mut b).is_err() {
                return Ok(());
            }
            s.write_all(&b)?;
        }
    });
    let mut c = TcpStream::connect(addr)?;
    softcard_gpu::proto::tune_socket(&c);
    let mut b = [0u8; 64];
    let mut times = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(c);
    let _ = echo.join();
    Ok(median(times))
}
