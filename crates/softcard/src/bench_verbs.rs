//! `softcard bench verbs`: Debian's unmodified perftest between two
//! processes on this host, through softcard's libibverbs and one card
//! daemon (started here, on a loopback address), beside sockperf
//! (busy-poll UDP ping-pong) and iperf3 (one TCP stream) on loopback and
//! beside the engine's own Rust API on the same path, in the same run: so
//! the cost of the library, the rings and the daemon's thread is visible.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::bench::require_peers;
use crate::bench_rdma::{iperf3_gbit, rdma_bench, sockperf_latency};

/// Options of `softcard bench verbs`.
#[derive(Debug, clap::Args)]
pub struct VerbsBenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

/// The card daemon the benchmark starts, stopped on drop.
struct Card {
    child: Child,
    dir: tempfile::TempDir,
}

impl Card {
    fn start(address: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("card.toml");
        std::fs::write(
            &config,
            format!(
                "api_socket = \"{}\"\nrdma_socket = \"{}\"\n[[rdma]]\naddress = \"{address}\"\n",
                dir.path().join("api.sock").display(),
                dir.path().join("rdma.sock").display()
            ),
        )?;
        let child = Command::new(std::env::current_exe()?)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("starting the card daemon")?;
        let card = Card { child, dir };
        for _ in 0..100 {
            if card.socket().exists() {
                return Ok(card);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the card daemon did not open its RDMA socket (run as root)")
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("rdma.sock")
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id().cast_signed(), libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Runs perftest's `tool` with `args` as server and client (through the
/// library); the client's output.
fn perftest(socket: &Path, tool: &str, args: &[&str], port: u16) -> Result<Output> {
    let exe = std::env::current_exe()?;
    let run = |peer: Option<&str>| {
        Command::new(&exe)
            .args(["rdma", "exec", "--socket"])
            .arg(socket)
            .arg("--")
            .arg(tool)
            .args(["-d", "softcard0", "-x", "0", "-F", "-p", &port.to_string()])
            .args(args)
            .args(peer)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let server = run(None).with_context(|| format!("{tool} (package perftest)"))?;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let out = run(Some("127.0.0.1"))?.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stderr);
        if text.contains("Couldn't connect") || text.contains("Unable to") {
            continue;
        }
        let _ = server.wait_with_output();
        if !out.status.success() {
            bail!(
                "{tool} {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        return Ok(out);
    }
    bail!("{tool}'s server did not listen")
}

/// perftest's result row (the line that starts with the message size).
fn row(out: &Output) -> Result<Vec<f64>> {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .map(str::split_ascii_whitespace)
        .map(|w| w.map(str::parse::<f64>).collect::<Result<Vec<_>, _>>())
        .find_map(|r| r.ok().filter(|v| v.len() >= 5))
        .with_context(|| format!("no result row in:\n{text}"))
}

/// `softcard bench verbs`.
pub fn verbs(a: &VerbsBenchArgs) -> Result<()> {
    require_peers(&[
        "sockperf",
        "iperf3",
        "ib_write_bw",
        "ib_send_bw",
        "ib_write_lat",
        "ib_send_lat",
    ])?;
    let secs = format!("{:.0}", a.seconds.ceil().max(1.0));
    let card = Card::start("127.0.0.3")?;
    let sock = card.socket();
    println!(
        "# softcard bench verbs: perftest through softcard's libibverbs and one card daemon (two processes, 127.0.0.3), {secs} s a cell"
    );
    let loopback = rdma_bench::Path {
        name: "loopback (127.0.0.1 <-> 127.0.0.2)",
        a: std::net::Ipv4Addr::new(127, 0, 0, 1),
        b: std::net::Ipv4Addr::new(127, 0, 0, 2),
        ns_a: None,
        ns_b: None,
    };
    let (sp50, sp99) = sockperf_latency(&loopback, a.seconds, true)?;
    let lat = |tool: &str, port| -> Result<(f64, f64)> {
        let v = row(&perftest(&sock, tool, &["-s", "64", "-n", "20000"], port)?)?;
        // #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%
        Ok((v[4], v[7]))
    };
    let (wl50, wl99) = lat("ib_write_lat", 18700)?;
    let (sl50, sl99) = lat("ib_send_lat", 18701)?;
    let engine = match rdma_bench::run(&loopback, rdma_bench::Mode::SendPingPong, a.seconds)? {
        rdma_bench::Figures::Latency { p50, p99 } => Some((p50, p99)),
        rdma_bench::Figures::Bandwidth { .. } => None,
    };
    println!();
    println!("| latency, 64 B, one way | p50 (typical) us | p99 us | p50 / sockperf busy-poll |");
    println!("|---|---:|---:|---:|");
    println!("| sockperf UDP ping-pong, busy-poll | {sp50:.1} | {sp99:.1} | 1.00 |");
    println!(
        "| ib_write_lat through the card | {wl50:.1} | {wl99:.1} | {:.2} |",
        wl50 / sp50
    );
    println!(
        "| ib_send_lat through the card | {sl50:.1} | {sl99:.1} | {:.2} |",
        sl50 / sp50
    );
    if let Some((p50, p99)) = engine {
        println!(
            "| engine's Rust API, SEND ping-pong (two threads) | {p50:.1} | {p99:.1} | {:.2} |",
            p50 / sp50
        );
    }

    let ip = iperf3_gbit(&loopback, a.seconds)?;
    let bw = |tool: &str, size: &str, port| -> Result<Vec<f64>> {
        row(&perftest(
            &sock,
            tool,
            &["-s", size, "-D", &secs, "--report_gbits"],
            port,
        )?)
    };
    // #bytes #iterations BW peak BW average MsgRate[Mpps]
    let w = bw("ib_write_bw", "65536", 18702)?;
    let s64 = bw("ib_send_bw", "64", 18703)?;
    let engine_bw = match rdma_bench::run(
        &loopback,
        rdma_bench::Mode::WriteBandwidth(64 << 10),
        a.seconds,
    )? {
        rdma_bench::Figures::Bandwidth { gbit, .. } => Some(gbit),
        rdma_bench::Figures::Latency { .. } => None,
    };
    println!();
    println!("| bandwidth | Gbit/s | / iperf3 | messages/s |");
    println!("|---|---:|---:|---:|");
    println!("| iperf3 TCP, one stream | {ip:.2} | 1.00 | |");
    println!(
        "| ib_write_bw 64 KiB through the card | {:.2} | {:.3} | {:.0} |",
        w[3],
        w[3] / ip,
        w[4] * 1e6
    );
    println!(
        "| ib_send_bw 64 B through the card (message rate) | {:.3} | | {:.0} |",
        s64[3],
        s64[4] * 1e6
    );
    if let Some(g) = engine_bw {
        println!(
            "| engine's Rust API, WRITE 64 KiB, 8 in flight | {g:.2} | {:.3} | |",
            g / ip
        );
    }
    Ok(())
}
