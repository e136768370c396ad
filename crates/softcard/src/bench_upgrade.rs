//! `softcard bench upgrade`: how long I/O stops while the card daemon is
//! upgraded (`POST /v1/upgrade`: the sockets handed over) or killed with
//! SIGKILL and started again, seen by two clients in turn:
//!
//! - libblkio (virtio-blk-vhost-user), writing 4 KiB at queue depth 1; it
//!   has no reconnect of its own, so the bench reconnects it at once when
//!   a request has waited 5 ms: the card's own unavailability;
//! - a QEMU guest (TCG) writing 4 KiB blocks with O_DIRECT in a loop, its
//!   disk's chardev reconnecting with `reconnect=1` (QEMU 7.2 retries a
//!   lost socket once a second);
//! - the same guest with the socket's roles reversed: QEMU listens
//!   (`server=on`) and the card connects (`--vhost-user-connect`), so QEMU
//!   takes the next card process as soon as it connects.
//!
//! The pause of an event is the longest stretch without a completion that
//! starts after the event begins; the rates are those of the second before
//! the first event and the second after the last.

use std::io::BufRead;
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blkio::{Blkio, Completion, ReqFlags};
use softcard_control::ApiClient;

/// `softcard bench upgrade`.
#[derive(Debug, clap::Args)]
pub struct UpgradeBenchArgs {
    /// Upgrades, and crash restarts, per client.
    #[arg(long, default_value_t = 20)]
    events: usize,
    /// Skip the QEMU guest (libblkio only).
    #[arg(long)]
    no_guest: bool,
}

/// A card daemon the bench starts, upgrades and kills.
struct Card {
    dir: tempfile::TempDir,
    api: PathBuf,
    /// Our child, until an upgrade replaces it.
    child: Option<Child>,
    /// A successor: our child through the subreaper bit.
    adopted: Option<i32>,
}

impl Card {
    fn start() -> Result<Card> {
        // SAFETY: prctl with integer arguments: successors orphaned by
        // their predecessor's exit become our children.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let dir = tempfile::Builder::new()
            .prefix("softcard-bench")
            .tempdir()?;
        let d = dir.path().display().to_string();
        std::fs::write(
            dir.path().join("card.toml"),
            format!(
                "api_socket = \"{d}/api.sock\"\nstate_file = \"{d}/state.json\"\n\
                 rdma_socket = \"{d}/rdma.sock\"\n[[device]]\nname = \"nvme0\"\nkind = \"file\"\n\
                 path = \"{d}/disk.img\"\nsize = \"256MiB\"\n"
            ),
        )?;
        let mut card = Card {
            api: dir.path().join("api.sock"),
            dir,
            child: None,
            adopted: None,
        };
        card.spawn()?;
        for (v, interface) in [
            ("blkio", "vhost-user-blk"),
            ("guest", "vhost-user-blk"),
            ("server", "vhost-user-blk-connect"),
        ] {
            let sock = card.path(&format!("{v}.sock"));
            let c = card.client();
            c.call(
                "POST",
                "/v1/volumes",
                Some(&serde_json::json!({"name": v, "device": "nvme0", "size": 64u64 << 20})),
            )?;
            c.call(
                "POST",
                &format!("/v1/volumes/{v}/attach"),
                Some(&serde_json::json!({"socket": sock, "interface": interface})),
            )?;
        }
        Ok(card)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(&self.api)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["serve", "--config"])
            .arg(self.path("card.toml"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("starting softcard serve")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&self.api).is_err() {
            if let Some(st) = child.try_wait()? {
                bail!("softcard serve exited: {st}");
            }
            if Instant::now() > deadline {
                bail!("softcard serve did not open its API");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> i32 {
        match (&self.child, self.adopted) {
            (Some(c), _) => i32::try_from(c.id()).unwrap_or(0),
            (None, Some(p)) => p,
            (None, None) => 0,
        }
    }

    /// Upgrades to the same binary; returns when the new process answers.
    fn upgrade(&mut self) -> Result<()> {
        let v = self.client().call("POST", "/v1/upgrade", None)?;
        let new = v["pid"].as_i64().context("no pid")?;
        loop {
            let p = self.client().call("GET", "/v1/process", None)?;
            if p["pid"].as_i64() == Some(new) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.reap(0);
        self.adopted = Some(i32::try_from(new)?);
        Ok(())
    }

    /// Kills the process with SIGKILL and starts a new one.
    fn crash(&mut self) -> Result<()> {
        self.reap(libc::SIGKILL);
        self.spawn()
    }

    /// Signals (0: none) and waits for the current process.
    fn reap(&mut self, signal: i32) {
        if let Some(mut c) = self.child.take() {
            if signal != 0 {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        if let Some(pid) = self.adopted.take() {
            let mut status = 0;
            // SAFETY: kill(2) and waitpid(2) on a child of ours.
            unsafe {
                if signal != 0 {
                    libc::kill(pid, signal);
                }
                libc::waitpid(pid, &mut status, 0);
            }
        }
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        if self.pid() != 0 {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        }
        self.reap(0);
    }
}

/// Completion times a client saw.
type Stamps = Arc<Mutex<Vec<Instant>>>;

/// libblkio at QD1, reconnecting when a request waits 5 ms.
fn blkio_client(sock: PathBuf, stop: Arc<AtomicBool>, stamps: Stamps) -> Result<()> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut b) = Blkio::new("virtio-blk-vhost-user") else {
            bail!("libblkio: no virtio-blk-vhost-user driver");
        };
        let connected = b
            .set_str("path", &sock.to_string_lossy())
            .and_then(|()| b.connect())
            .and_then(|()| b.start());
        let Ok(out) = connected else {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        };
        let mut q = out.queues.into_iter().next().context("no queue")?;
        let Ok(region) = b.alloc_mem_region(4096) else {
            continue;
        };
        if b.map_mem_region(&region).is_err() {
            continue;
        }
        let buf = region.addr as *const u8;
        let mut comps = [MaybeUninit::<Completion>::uninit()];
        while !stop.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            q.write((x % 16_384) * 4096, buf, 4096, 0, ReqFlags::empty());
            let mut timeout = Duration::from_millis(5);
            match q.do_io(&mut comps, 1, Some(&mut timeout), None) {
                // SAFETY: do_io initialised one completion.
                Ok(1) if unsafe { comps[0].assume_init_ref() }.ret == 0 => {
                    stamps
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Instant::now());
                }
                _ => break,
            }
        }
    }
    Ok(())
}

/// A QEMU guest writing in a loop; its console lines are the completions.
fn guest_client(
    sock: &Path,
    server: bool,
    dir: &Path,
    stop: Arc<AtomicBool>,
    stamps: Stamps,
) -> Result<Child> {
    let kernel = softcard_host::initramfs::host_kernel().context("a host kernel")?;
    let init = format!(
        "#!/bin/busybox sh\n{}{}",
        softcard_host::initramfs::INIT_PRELUDE,
        r#"
while [ ! -b /dev/vda ]; do $B sleep 0.1; done
$B dd if=/dev/urandom of=/blk bs=4096 count=1 2>/dev/null
n=0
while true; do
  $B dd if=/blk of=/dev/vda bs=4096 seek=$((n % 16384)) count=1 oflag=direct 2>/dev/null && echo "T $n"
  n=$((n+1))
done
"#
    );
    let mut i = softcard_host::initramfs::Initramfs::new(&kernel, &init)?;
    i.modules(&["virtio_pci", "virtio_blk"])?;
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, i.finish()?)?;
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(softcard_host::initramfs::guest_args(&kernel, &initrd))
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa",
            "node,memdev=mem",
            "-chardev",
            &if server {
                format!("socket,path={},server=on,wait=off,id=c0", sock.display())
            } else {
                format!("socket,path={},reconnect=1,id=c0", sock.display())
            },
            "-device",
            "vhost-user-blk-pci,chardev=c0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("qemu-system-x86_64 (package qemu-system-x86)")?;
    let out = qemu.stdout.take().context("qemu's console")?;
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if l.starts_with("T ") {
                stamps
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Instant::now());
            }
        }
    });
    Ok(qemu)
}

/// Waits until the client has completed `n` more requests (or 120 s).
fn wait_for_progress(stamps: &Stamps, n: usize) -> Result<()> {
    let start = stamps.lock().unwrap_or_else(|e| e.into_inner()).len();
    let deadline = Instant::now() + Duration::from_secs(120);
    while stamps.lock().unwrap_or_else(|e| e.into_inner()).len() < start + n {
        if Instant::now() > deadline {
            bail!("the client made no progress for 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// One client's run: `events` upgrades and `events` crashes, alternating,
/// each after the client has settled. Returns (upgrade pauses, crash
/// pauses, rate before, rate after).
fn run_events(
    card: &mut Card,
    stamps: &Stamps,
    events: usize,
    settle: Duration,
) -> Result<(Vec<Duration>, Vec<Duration>, f64, f64)> {
    wait_for_progress(stamps, 50)?;
    std::thread::sleep(Duration::from_secs(1));
    let first = Instant::now();
    let mut marks = Vec::new();
    for i in 0..2 * events {
        let upgrade = i % 2 == 0;
        marks.push((Instant::now(), upgrade));
        if upgrade {
            card.upgrade()?;
        } else {
            card.crash()?;
        }
        wait_for_progress(stamps, 10)?;
        std::thread::sleep(settle);
    }
    let last_done = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let s = stamps.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let rate = |from: Instant, to: Instant| {
        let n = s.iter().filter(|t| **t >= from && **t < to).count();
        n as f64 / (to - from).as_secs_f64()
    };
    let before = rate(first - Duration::from_secs(1), first);
    let after = rate(last_done, last_done + Duration::from_secs(1));
    let (mut up, mut crash) = (Vec::new(), Vec::new());
    for (k, (at, upgrade)) in marks.iter().enumerate() {
        let end = marks.get(k + 1).map_or(last_done, |m| m.0);
        // The longest gap between completions from the last one before
        // the event to the next event (the client was writing again by
        // then).
        let from = s.iter().rposition(|t| t < at).unwrap_or(0);
        let gap = s[from..]
            .windows(2)
            .take_while(|w| w[1] < end)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        log::debug!("event {k} (upgrade {upgrade}): pause {gap:?}");
        if *upgrade {
            up.push(gap);
        } else {
            crash.push(gap);
        }
    }
    Ok((up, crash, before, after))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50, p99 (nearest rank) and max, in ms.
fn summary(v: &mut [Duration]) -> (f64, f64, f64) {
    v.sort();
    // Nearest rank: the ceil(p/100 * n)-th smallest.
    let at = |percent: usize| ms(v[(percent * v.len()).div_ceil(100).clamp(1, v.len()) - 1]);
    (at(50), at(99), ms(v[v.len() - 1]))
}

/// `softcard bench upgrade`.
pub fn upgrade(a: &UpgradeBenchArgs) -> Result<()> {
    anyhow::ensure!(a.events > 0, "--events must be at least 1");
    let mut card = Card::start()?;
    println!(
        "# softcard bench upgrade: {} upgrades and {} SIGKILL restarts per client, file device, 4 KiB writes at QD1",
        a.events, a.events
    );
    println!(
        "{:<34} {:<8} {:>4} {:>9} {:>9} {:>9} {:>12} {:>12}",
        "client", "event", "n", "p50 ms", "p99 ms", "max ms", "before IO/s", "after IO/s"
    );
    let print = |client: &str, r: (Vec<Duration>, Vec<Duration>, f64, f64)| {
        let (mut up, mut crash, before, after) = r;
        for (name, v) in [("upgrade", &mut up), ("crash", &mut crash)] {
            let (p50, p99, max) = summary(v);
            println!(
                "{client:<34} {name:<8} {:>4} {p50:>9.1} {p99:>9.1} {max:>9.1} {before:>12.0} {after:>12.0}",
                v.len()
            );
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let stamps: Stamps = Arc::default();
    let client = {
        let (sock, stop, stamps) = (card.path("blkio.sock"), stop.clone(), stamps.clone());
        std::thread::spawn(move || blkio_client(sock, stop, stamps))
    };
    let r = run_events(&mut card, &stamps, a.events, Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    client
        .join()
        .map_err(|_| anyhow::anyhow!("the libblkio client panicked"))??;
    print("libblkio (reconnects after 5 ms)", r?);

    if !a.no_guest {
        for (volume, server, label) in [
            ("guest", false, "QEMU 7.2 guest (reconnect=1)"),
            ("server", true, "QEMU 7.2 guest (server=on)"),
        ] {
            let stop = Arc::new(AtomicBool::new(false));
            let stamps: Stamps = Arc::default();
            let mut qemu = guest_client(
                &card.path(&format!("{volume}.sock")),
                server,
                card.dir.path(),
                stop.clone(),
                stamps.clone(),
            )?;
            let r = run_events(&mut card, &stamps, a.events, Duration::from_millis(500));
            stop.store(true, Ordering::Relaxed);
            let _ = qemu.kill();
            let _ = qemu.wait();
            print(label, r?);
        }
    }
    Ok(())
}
