//! `softcard bench rdma`: the RoCEv2 engine between two threads, over
//! loopback and over a veth pair between two namespaces, against sockperf
//! (UDP ping-pong latency) and iperf3 (one TCP stream) on the same path, in
//! the same run.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::bench::require_peers;

/// Options of `softcard bench rdma`.
#[derive(Debug, clap::Args)]
pub struct RdmaBenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Which paths to measure: loopback (127.0.0.1 <-> 127.0.0.2) and/or a
    /// veth pair between two network namespaces the benchmark creates.
    #[arg(long, value_delimiter = ',', default_value = "loopback,veth")]
    path: Vec<String>,
}

pub(crate) mod rdma_bench {
    use std::net::Ipv4Addr;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result};
    use softcard_rdma::rc::{Access, Engine, PathStats, RecvWr, WcOpcode};

    /// The two ends of a measured path, and the network namespace each end
    /// runs in (none: the caller's).
    #[derive(Debug, Clone)]
    pub struct Path {
        pub name: &'static str,
        pub a: Ipv4Addr,
        pub b: Ipv4Addr,
        pub ns_a: Option<String>,
        pub ns_b: Option<String>,
    }

    /// Moves the calling thread into network namespace `ns`.
    pub fn enter(ns: Option<&str>) -> Result<()> {
        use std::os::fd::AsRawFd;
        let Some(ns) = ns else { return Ok(()) };
        let f = std::fs::File::open(format!("/run/netns/{ns}"))
            .with_context(|| format!("network namespace {ns}"))?;
        // SAFETY: a valid namespace file descriptor; setns(2) affects only
        // the calling thread's network namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        Ok(())
    }

    /// What the passive side tells the active one.
    #[derive(Debug, Clone, Copy)]
    pub struct Target {
        va: u64,
        rkey: u32,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Mode {
        SendPingPong,
        WritePingPong,
        WriteBandwidth(usize),
    }

    fn engine(
        local: Ipv4Addr,
        qpn: u32,
        peer: Ipv4Addr,
        peer_qpn: u32,
    ) -> Result<(Engine, usize, usize)> {
        let mut e = Engine::open(local).context("raw sockets (run as root)")?;
        let qp = e.create_qp(qpn);
        e.set_mtu(qp, 4096);
        e.connect(qp, peer_qpn, peer, 1000, 1000);
        e.window = 64;
        let mr = e.reg_mr(
            8 << 20,
            Access {
                remote_write: true,
                remote_read: true,
                local_write: true,
                remote_atomic: false,
            },
        );
        Ok((e, qp, mr))
    }

    /// The passive side: echoes SENDs, echoes WRITEs by watching memory,
    /// or just places WRITEs.
    /// Posts 64 receives of 4 KiB over the region and returns what the
    /// peer needs to WRITE into it.
    fn prime(e: &mut Engine, qp: usize, mr: usize) -> Target {
        for i in 0..64 {
            e.post_recv(
                qp,
                RecvWr {
                    wr_id: i,
                    mr,
                    offset: i as usize * 4096,
                    len: 4096,
                },
            );
        }
        Target {
            va: e.mr(mr).va,
            rkey: e.mr(mr).rkey,
        }
    }

    pub fn passive(
        path: &Path,
        mode: Mode,
        tx: mpsc::Sender<Target>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<PathStats> {
        enter(path.ns_b.as_deref())?;
        let (mut e, qp, mr) = engine(path.b, 0x200, path.a, 0x100)?;
        tx.send(prime(&mut e, qp, mr))?;
        let mut seen = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            e.poll(Duration::ZERO)?;
            while let Some(c) = e.cq.pop_front() {
                if c.opcode == WcOpcode::Recv {
                    e.post_recv(
                        qp,
                        RecvWr {
                            wr_id: c.wr_id,
                            mr,
                            offset: c.wr_id as usize * 4096,
                            len: 4096,
                        },
                    );
                    if mode == Mode::SendPingPong {
                        e.post_send(qp, 0, mr, 0, c.byte_len as usize)?;
                    }
                }
            }
            if mode == Mode::WritePingPong {
                let b = e.mr(mr).bytes();
                let v = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
                if v != seen {
                    seen = v;
                    let peer = PEER.with(|p| *p.borrow());
                    if let Some(t) = peer {
                        e.post_write(qp, 0, mr, 0, 64, t.va, t.rkey, None)?;
                    }
                }
            }
        }
        Ok(e.stats)
    }

    thread_local! {
        static PEER: std::cell::RefCell<Option<Target>> = const { std::cell::RefCell::new(None) };
    }

    /// Results: one-way latency percentiles (µs) or bandwidth (Gbit/s),
    /// with each engine's path counters (active side, passive side).
    #[derive(Debug, Clone, Copy)]
    #[allow(
        clippy::large_enum_variant,
        reason = "one value per measurement, returned once"
    )]
    pub enum Figures {
        Latency {
            p50: f64,
            p99: f64,
        },
        Bandwidth {
            gbit: f64,
            active: PathStats,
            passive: PathStats,
        },
    }

    /// Runs one measurement with each side in its own thread (and
    /// namespace).
    pub fn run(path: &Path, mode: Mode, seconds: f64) -> Result<Figures> {
        let path = path.clone();
        std::thread::spawn(move || -> Result<Figures> {
            enter(path.ns_a.as_deref())?;
            run_here(&path, mode, seconds)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("benchmark thread panicked"))?
    }

    fn run_here(path: &Path, mode: Mode, seconds: f64) -> Result<Figures> {
        let (tx, rx) = mpsc::channel();
        let (back_tx, back_rx) = mpsc::channel::<Target>();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let passive = {
            let stop = stop.clone();
            let path = path.clone();
            std::thread::spawn(move || -> Result<PathStats> {
                if let Ok(t) = back_rx.recv() {
                    PEER.with(|p| *p.borrow_mut() = Some(t));
                }
                passive(&path, mode, tx, stop)
            })
        };
        let (mut e, qp, mr) = engine(path.a, 0x100, path.b, 0x200)?;
        back_tx.send(prime(&mut e, qp, mr))?;
        let target = rx
            .recv_timeout(Duration::from_secs(10))
            .context("passive side")?;
        let end = Instant::now() + Duration::from_secs_f64(seconds);
        let mut rtts: Vec<u32> = Vec::new();
        let mut bytes = 0u64;
        let begin = Instant::now();
        let mut seq = 0u64;
        match mode {
            Mode::SendPingPong | Mode::WritePingPong => {
                while Instant::now() < end {
                    seq += 1;
                    let t0 = Instant::now();
                    if mode == Mode::SendPingPong {
                        e.post_send(qp, seq, mr, 0, 64)?;
                    } else {
                        e.fill(mr, 4096, &seq.to_le_bytes());
                        e.post_write(qp, seq, mr, 4096, 64, target.va, target.rkey, None)?;
                    }
                    loop {
                        e.poll(Duration::ZERO)?;
                        let mut done = false;
                        while let Some(c) = e.cq.pop_front() {
                            if c.opcode == WcOpcode::Recv {
                                e.post_recv(
                                    qp,
                                    RecvWr {
                                        wr_id: c.wr_id,
                                        mr,
                                        offset: c.wr_id as usize * 4096,
                                        len: 4096,
                                    },
                                );
                                done = mode == Mode::SendPingPong;
                            }
                        }
                        if mode == Mode::WritePingPong {
                            let b = e.mr(mr).bytes();
                            done = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")) == seq;
                        }
                        if done {
                            break;
                        }
                    }
                    rtts.push(u32::try_from(t0.elapsed().as_nanos()).unwrap_or(u32::MAX));
                }
            }
            Mode::WriteBandwidth(size) => {
                let mut inflight = 0;
                while Instant::now() < end || inflight > 0 {
                    while inflight < 8 && Instant::now() < end {
                        seq += 1;
                        e.post_write(qp, seq, mr, 0, size, target.va, target.rkey, None)?;
                        inflight += 1;
                    }
                    e.poll(Duration::ZERO)?;
                    while let Some(c) = e.cq.pop_front() {
                        if c.opcode == WcOpcode::RdmaWrite {
                            inflight -= 1;
                            bytes += size as u64;
                        }
                    }
                }
            }
        }
        let elapsed = begin.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let passive = passive
            .join()
            .map_err(|_| anyhow::anyhow!("passive side panicked"))??;
        Ok(match mode {
            Mode::WriteBandwidth(_) => Figures::Bandwidth {
                gbit: bytes as f64 * 8.0 / elapsed / 1e9,
                active: e.stats,
                passive,
            },
            _ => {
                rtts.sort_unstable();
                let pct = |pm: usize| {
                    f64::from(rtts[(rtts.len().saturating_sub(1) * pm + 500) / 1000]) / 2000.0
                };
                Figures::Latency {
                    p50: pct(500),
                    p99: pct(990),
                }
            }
        })
    }
}

/// `cmd` run in network namespace `ns` (through `ip netns exec`).
fn in_ns(ns: Option<&str>, cmd: &str) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, cmd]);
            c
        }
        None => Command::new(cmd),
    }
}

pub(crate) fn sockperf_latency(
    path: &rdma_bench::Path,
    seconds: f64,
    busy: bool,
) -> Result<(f64, f64)> {
    let server_ip = path.b.to_string();
    let poll: &[&str] = if busy {
        &["--timeout", "0", "--nonblocked"]
    } else {
        &[]
    };
    let mut server = in_ns(path.ns_b.as_deref(), "sockperf")
        .args(["server", "-i", &server_ip, "-p", "11111"])
        .args(poll)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("sockperf (package sockperf)")?;
    std::thread::sleep(Duration::from_millis(500));
    let out = in_ns(path.ns_a.as_deref(), "sockperf")
        .args([
            "ping-pong",
            "-i",
            &server_ip,
            "-p",
            "11111",
            "-m",
            "64",
            "-t",
        ])
        .arg(format!("{:.0}", seconds.ceil()))
        .args(poll)
        .output()?;
    let _ = server.kill();
    let _ = server.wait();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let pct = |p: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p}")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
    };
    Ok((
        pct("50.000").context("sockperf p50")?,
        pct("99.000").context("sockperf p99")?,
    ))
}

pub(crate) fn iperf3_gbit(path: &rdma_bench::Path, seconds: f64) -> Result<f64> {
    let server_ip = path.b.to_string();
    let mut server = in_ns(path.ns_b.as_deref(), "iperf3")
        .args(["-s", "-1", "-B", &server_ip, "-p", "5299"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 (package iperf3)")?;
    std::thread::sleep(Duration::from_millis(500));
    let out = in_ns(path.ns_a.as_deref(), "iperf3")
        .args(["-c", &server_ip, "-p", "5299", "-J", "-t"])
        .arg(format!("{:.0}", seconds.ceil()))
        .output()?;
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 result")
}

/// `softcard bench rdma`: the engine between two threads over loopback,
/// against sockperf (UDP ping-pong latency) and iperf3 (TCP single stream)
/// on the same path, in the same run.
pub fn rdma(a: &RdmaBenchArgs) -> Result<()> {
    require_peers(&["sockperf", "iperf3", "ip"])?;
    use rdma_bench::Path;
    for name in &a.path {
        match name.as_str() {
            "loopback" => rdma_path(
                &Path {
                    name: "loopback (127.0.0.1 <-> 127.0.0.2)",
                    a: std::net::Ipv4Addr::new(127, 0, 0, 1),
                    b: std::net::Ipv4Addr::new(127, 0, 0, 2),
                    ns_a: None,
                    ns_b: None,
                },
                a.seconds,
            )?,
            "veth" => {
                let pair = VethPair::new()?;
                rdma_path(&pair.path(), a.seconds)?;
            }
            other => anyhow::bail!("unknown path {other:?} (loopback, veth)"),
        }
    }
    Ok(())
}

/// Two network namespaces joined by a veth pair (MTU 9000, so a 4096-byte
/// RoCE path MTU fits in one frame), removed on drop.
struct VethPair {
    ns: [String; 2],
}

impl VethPair {
    fn new() -> Result<Self> {
        let tag = std::process::id();
        let ns = [format!("scb{tag}a"), format!("scb{tag}b")];
        let pair = Self { ns };
        let (a, b) = (&pair.ns[0], &pair.ns[1]);
        let (va, vb) = (format!("scv{tag}a"), format!("scv{tag}b"));
        let ip = |args: &[&str]| -> Result<()> {
            let st = Command::new("ip")
                .args(args)
                .status()
                .context("ip (iproute2)")?;
            anyhow::ensure!(st.success(), "ip {} failed (run as root)", args.join(" "));
            Ok(())
        };
        ip(&["netns", "add", a])?;
        ip(&["netns", "add", b])?;
        ip(&[
            "link", "add", &va, "mtu", "9000", "type", "veth", "peer", "name", &vb, "mtu", "9000",
        ])?;
        ip(&["link", "set", &va, "netns", a])?;
        ip(&["link", "set", &vb, "netns", b])?;
        for (ns, dev, addr) in [(a, &va, "10.77.0.1/24"), (b, &vb, "10.77.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    fn path(&self) -> rdma_bench::Path {
        rdma_bench::Path {
            name: "veth pair between two network namespaces (10.77.0.1 <-> 10.77.0.2, MTU 9000)",
            a: std::net::Ipv4Addr::new(10, 77, 0, 1),
            b: std::net::Ipv4Addr::new(10, 77, 0, 2),
            ns_a: Some(self.ns[0].clone()),
            ns_b: Some(self.ns[1].clone()),
        }
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn rdma_path(path: &rdma_bench::Path, seconds: f64) -> Result<()> {
    use rdma_bench::{run, Figures, Mode};
    println!();
    println!(
        "# softcard bench rdma: {}, {seconds} s per cell, one thread per side",
        path.name
    );
    // The engine busy-polls; sockperf is measured both ways, and the
    // ratio is taken against its busy-polling mode.
    let (bp50, bp99) = sockperf_latency(path, seconds, false)?;
    let (sp50, sp99) = sockperf_latency(path, seconds, true)?;
    println!("| latency, 64 B, one way (RTT/2) | p50 us | p99 us | p50 / sockperf busy-poll |");
    println!("|---|---:|---:|---:|");
    println!(
        "| sockperf UDP ping-pong (epoll, blocking) | {bp50:.1} | {bp99:.1} | {:.2} |",
        bp50 / sp50
    );
    println!("| sockperf UDP ping-pong (busy-poll: --timeout 0 --nonblocked) | {sp50:.1} | {sp99:.1} | 1.00 |");
    for (name, mode) in [
        ("softcard SEND ping-pong", Mode::SendPingPong),
        ("softcard WRITE ping-pong", Mode::WritePingPong),
    ] {
        if let Figures::Latency { p50, p99 } = run(path, mode, seconds)? {
            println!("| {name} | {p50:.1} | {p99:.1} | {:.2} |", p50 / sp50);
        }
    }
    let ip = iperf3_gbit(path, seconds)?;
    println!();
    println!("| bandwidth | Gbit/s | / iperf3 |");
    println!("|---|---:|---:|");
    println!("| iperf3 TCP, one stream | {ip:.2} | 1.00 |");
    let mut counters = Vec::new();
    for size in [64 << 10, 256 << 10, 1 << 20] {
        if let Figures::Bandwidth {
            gbit,
            active,
            passive,
        } = run(path, Mode::WriteBandwidth(size), seconds)?
        {
            println!(
                "| softcard WRITE {} KiB, 8 in flight | {gbit:.2} | {:.3} |",
                size >> 10,
                gbit / ip
            );
            counters.push((size, active, passive));
        }
    }
    // Which path the traffic took (the patent's two datapaths), and how
    // it travelled.
    println!();
    println!("| WRITE cell | target: fast-path packets | fast-path MiB | software-path packets | dropped | GSO datagrams in (oversize) | initiator: packets sent in GSO datagrams | ACKs handled in software | retransmits |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (size, a, p) in counters {
        println!(
            "| {} KiB | {} | {} | {} | {} | {} ({}) | {} | {} | {} |",
            size >> 10,
            p.fast_packets,
            p.fast_bytes >> 20,
            p.slow_packets,
            p.dropped,
            p.gso_datagrams_received,
            p.spilled,
            a.gso_segments_sent,
            a.slow_packets,
            a.retransmits
        );
    }
    Ok(())
}
