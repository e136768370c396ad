//! `softcard bench storage`: the same libblkio client drives softcard's
//! vhost-user-blk interface and qemu-storage-daemon's vhost-user-blk export,
//! over the same kind of backing store, on the same machine, in the same
//! run, and prints the ratio.

use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blkio::{Blkio, Completion, ReqFlags};
use softcard_storage::crypto::{Kek, KeyStore};
use softcard_storage::device::{DeviceConfig, DeviceKind};
use softcard_storage::{AttachOptions, StorageCard};

use crate::bench_cells::{counters, figure, PerIo, Summary};
use crate::bench_cpu::{median_range, Meter, Server};
use crate::bench_spdk::Spdk;

/// Options of `softcard bench storage`.
#[derive(Debug, clap::Args)]
pub struct StorageBenchArgs {
    /// Seconds per workload and target.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// The qemu-storage-daemon binary to compare with.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// A tmpfs directory for the file-backed comparison.
    #[arg(long, default_value = "/dev/shm")]
    tmpfs: PathBuf,
    /// Virtqueues each interface offers (the client drives one).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Run only backings whose name contains this.
    #[arg(long)]
    backing: Option<String>,
    /// Run only workloads whose name contains this.
    #[arg(long)]
    workload: Option<String>,
    /// Skip qemu-storage-daemon (for profiling softcard alone).
    #[arg(long)]
    softcard_only: bool,
    /// Runs of each cell (softcard and qsd alternating); the table gives
    /// the median and the range.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The client busy-polls its queue (libblkio's poll queue) instead of
    /// sleeping on its completion eventfd: shows the server's own ceiling
    /// where a sleeping client is the limit.
    #[arg(long)]
    poll_client: bool,
    /// SPDK's vhost target (the `build/bin/vhost` of an SPDK build) to
    /// compare with as well, on the backings it has a counterpart for
    /// (its Null bdev against null-untouched, its Malloc bdev against
    /// ram); a second table gives those ratios.
    #[arg(long)]
    spdk: Option<PathBuf>,
    /// Leave every thread where the scheduler puts it, instead of the
    /// client on the first CPU and each server (softcard's queue worker,
    /// qemu-storage-daemon, SPDK's reactor) on the second.
    #[arg(long)]
    unpinned: bool,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Workload {
    pub(crate) name: &'static str,
    pub(crate) write: bool,
    pub(crate) block: usize,
    pub(crate) depth: usize,
    pub(crate) random: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4k-randread-qd32",
        write: false,
        block: 4096,
        depth: 32,
        random: true,
    },
    Workload {
        name: "4k-randwrite-qd32",
        write: true,
        block: 4096,
        depth: 32,
        random: true,
    },
    Workload {
        name: "4k-randread-qd1",
        write: false,
        block: 4096,
        depth: 1,
        random: true,
    },
    Workload {
        name: "128k-seqread-qd8",
        write: false,
        block: 128 << 10,
        depth: 8,
        random: false,
    },
];

const VOLUME_BYTES: u64 = 1 << 30;
/// Room for the partition map in front of softcard's volume.
pub(crate) const MAP_SLACK: u64 = 16 << 20;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Figures {
    pub(crate) iops: f64,
    pub(crate) mb_s: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    /// CPU seconds the server spent per million I/Os.
    pub(crate) cpu_per_m: f64,
    /// I/Os per second per core the server kept busy.
    pub(crate) iops_per_core: f64,
    /// Times the client thread slept per I/O (it waits on its completion
    /// eventfd when no answer is there yet).
    pub(crate) client_sleeps_per_io: f64,
    /// The share of the cell the client thread spent off its CPU (asleep
    /// on its completion eventfd, or waiting for a CPU).
    pub(crate) client_asleep: f64,
}

/// [`drive`] against a card in this process, with the default (sleeping)
/// client.
pub(crate) fn drive_card(socket: &Path, w: Workload, seconds: f64) -> Result<Figures> {
    drive(socket, w, seconds, Server::ThisProcessButMe, false)
}

/// Runs one workload against the vhost-user-blk socket, reading the CPU
/// that `server` spends meanwhile; `poll`: on a libblkio poll queue.
fn drive(socket: &Path, w: Workload, seconds: f64, server: Server, poll: bool) -> Result<Figures> {
    let mut b = Blkio::new("virtio-blk-vhost-user")
        .map_err(|e| anyhow::anyhow!("libblkio: {}", e.message()))?;
    let err = |what: &str, e: blkio::Error| anyhow::anyhow!("libblkio {what}: {}", e.message());
    b.set_str("path", &socket.to_string_lossy())
        .map_err(|e| err("path", e))?;
    b.connect().map_err(|e| err("connect", e))?;
    let (irq, polled) = if poll { (0, 1) } else { (1, 0) };
    b.set_i32("num-queues", irq)
        .map_err(|e| err("num-queues", e))?;
    b.set_i32("num-poll-queues", polled)
        .map_err(|e| err("num-poll-queues", e))?;
    let capacity = b.get_u64("capacity").map_err(|e| err("capacity", e))?;
    let mut out = b.start().map_err(|e| err("start", e))?;
    let mut q = if poll {
        out.poll_queues.pop()
    } else {
        out.queues.pop()
    }
    .context("no queue")?;
    let region = b
        .alloc_mem_region(w.block * w.depth)
        .map_err(|e| err("alloc_mem_region", e))?;
    b.map_mem_region(&region)
        .map_err(|e| err("map_mem_region", e))?;
    let blocks = capacity / w.block as u64;
    if blocks == 0 {
        bail!("device of {capacity} B is smaller than one block");
    }
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_seq = 0u64;
    let mut next_offset = || {
        let blk = if w.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            next_seq = (next_seq + 1) % blocks;
            next_seq
        };
        blk * w.block as u64
    };
    let mut started = vec![Instant::now(); w.depth];
    let submit = |q: &mut blkio::Blkioq, slot: usize, started: &mut [Instant], off: u64| {
        let buf = (region.addr + slot * w.block) as *mut u8;
        started[slot] = Instant::now();
        if w.write {
            q.write(off, buf, w.block, slot, ReqFlags::empty());
        } else {
            q.read(off, buf, w.block, slot, ReqFlags::empty());
        }
    };
    for slot in 0..w.depth {
        let off = next_offset();
        submit(&mut q, slot, &mut started, off);
    }
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..w.depth).map(|_| MaybeUninit::uninit()).collect();
    let mut lat_us: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut done = 0u64;
    let meter = Meter::start(server)?;
    let sleeps = crate::bench_cpu::sleeps_so_far()?;
    let client_cpu = crate::bench_cpu::thread_cpu_seconds()?;
    let begin = Instant::now();
    let stop_at = begin + Duration::from_secs_f64(seconds);
    let mut stopping = false;
    let mut inflight = w.depth;
    while inflight > 0 {
        let n = q
            .do_io(&mut completions, 1, None, None)
            .map_err(|e| err("do_io", e))?;
        let now = Instant::now();
        if now >= stop_at {
            stopping = true;
        }
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                bail!("request failed: ret {}", c.ret);
            }
            let slot = c.user_data;
            inflight -= 1;
            done += 1;
            let us = now.duration_since(started[slot]).as_micros();
            lat_us.push(u32::try_from(us).unwrap_or(u32::MAX));
            if !stopping {
                let off = next_offset();
                submit(&mut q, slot, &mut started, off);
                inflight += 1;
            }
        }
    }
    let elapsed = begin.elapsed().as_secs_f64();
    let client_cpu = crate::bench_cpu::thread_cpu_seconds()? - client_cpu;
    // Before the client disconnects: the server's threads still live.
    let cpu = meter.stop()?;
    let sleeps = crate::bench_cpu::sleeps_so_far()?.saturating_sub(sleeps);
    lat_us.sort_unstable();
    // Nearest-rank percentile, in integer arithmetic.
    let pct = |per_mille: usize| {
        let i = (lat_us.len().saturating_sub(1) * per_mille + 500) / 1000;
        f64::from(lat_us.get(i).copied().unwrap_or(0))
    };
    let iops = done as f64 / elapsed;
    Ok(Figures {
        iops,
        mb_s: iops * w.block as f64 / 1e6,
        p50_us: pct(500),
        p99_us: pct(990),
        cpu_per_m: cpu / (done as f64 / 1e6),
        iops_per_core: if cpu > 0.0 {
            done as f64 / cpu
        } else {
            f64::NAN
        },
        client_sleeps_per_io: sleeps as f64 / done.max(1) as f64,
        client_asleep: (1.0 - client_cpu / elapsed).clamp(0.0, 1.0),
    })
}

fn wait_for_socket(path: &Path, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("qemu-storage-daemon exited early: {status}");
        }
        if Instant::now() > deadline {
            bail!("qemu-storage-daemon did not open {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops a benchmark before it starts when a peer it compares with is not
/// installed, naming the program and the command that installs it.
pub(crate) fn require_peers(programs: &[&str]) -> Result<()> {
    let on_path = |p: &str| {
        let p = Path::new(p);
        if p.components().count() > 1 {
            return p.is_file();
        }
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
    };
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !on_path(p)).collect();
    if !missing.is_empty() {
        bail!(
            "{} not installed: ./scripts/deps.sh bench installs the benchmarks' peers",
            missing.join(", ")
        );
    }
    Ok(())
}

struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_qsd(
    bin: &Path,
    args: &[String],
    socket: &Path,
    queues: u16,
    cpu: Option<usize>,
) -> Result<Qsd> {
    let mut cmd = Command::new(bin);
    if let Some(cpu) = cpu {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec the closure only makes the
        // sched_setaffinity system call (async-signal-safe) on a set on
        // its own stack; every thread qsd starts inherits it.
        unsafe {
            cmd.pre_exec(move || {
                if crate::bench_wake::pin(cpu) {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child = cmd
        .args(args)
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            socket.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (package qemu-system-common)", bin.display()))?;
    wait_for_socket(socket, &mut child)?;
    Ok(Qsd(child))
}

/// A preallocated LUKS image (QEMU's default cipher: aes-256-xts-plain64).
/// qemu-img times its key derivation on the CPU first, and now and then
/// gives up ("Unable to get accurate CPU usage"; once three times in a row
/// in the middle of a sitting): tried five times, a second apart.
fn create_luks(path: &Path) -> Result<()> {
    let mut last = String::new();
    for attempt in 0..5 {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        let _ = std::fs::remove_file(path);
        let out = Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                "secret,id=sec0,data=softcard-bench",
            ])
            .args(["-o", "key-secret=sec0,preallocation=falloc"])
            .arg(path)
            .arg(VOLUME_BYTES.to_string())
            .output()
            .context("running qemu-img (package qemu-utils)")?;
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    bail!("qemu-img create -f luks: {last}")
}

fn preallocate(path: &Path, bytes: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    use std::os::fd::AsRawFd;
    let len = i64::try_from(bytes)?;
    // SAFETY: plain syscall on an fd we own.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) };
    if rc != 0 {
        f.set_len(bytes)?;
    }
    Ok(())
}

/// The backings compared: softcard's device kind against what
/// qemu-storage-daemon offers for the same job.
const BACKINGS: [(&str, &str); 5] = [
    (
        "null",
        "softcard null device vs qsd null-co (read-zeroes=on)",
    ),
    (
        "null-untouched",
        "softcard null device with read_zeroes = false vs qsd null-co (read-zeroes=off): reads leave the buffer as it was, as SPDK's null bdev does (benchmarks only)",
    ),
    (
        "ram",
        "softcard ram device vs qsd file on tmpfs (aio=io_uring)",
    ),
    (
        "ram-encrypted",
        "softcard encrypted volume (AES-256-XTS) on ram vs qsd LUKS (aes-256-xts-plain64) on a tmpfs file",
    ),
    (
        "tmpfs-file",
        "softcard file device on tmpfs (copied in the queue's thread) vs qsd file on tmpfs (aio=io_uring)",
    ),
];

/// `softcard bench storage`.
pub fn storage(a: &StorageBenchArgs) -> Result<()> {
    if !a.softcard_only {
        require_peers(&[&a.qsd.to_string_lossy(), "qemu-img"])?;
    }
    if let Some(bin) = &a.spdk {
        require_peers(&[&bin.to_string_lossy()])?;
    }
    let dir = tempfile::Builder::new()
        .prefix("softcard-bench")
        .tempdir()?;
    let shm = tempfile::Builder::new()
        .prefix("softcard-bench")
        .tempdir_in(&a.tmpfs)
        .with_context(|| format!("tmpfs directory {}", a.tmpfs.display()))?;
    let runs = a.runs.max(1);
    println!(
        "# softcard bench storage: libblkio virtio-blk-vhost-user client ({}), {} s per cell, {} queue(s), {runs} run(s) of each cell (median, range)",
        if a.poll_client {
            "busy-polling its queue"
        } else {
            "sleeping on its completion eventfd"
        },
        a.seconds,
        a.queues
    );
    for (name, what) in BACKINGS {
        println!("#   {name}: {what}");
    }
    println!(
        "#   machine: {} (a sleeping client's wake-ups cost more where idle CPUs halt at once: docs/benchmarks.md)",
        crate::bench_cpu::idle_policy()
    );
    if let Some(cost) = crate::bench_wake::wake_cost() {
        println!("#   {cost}");
    }
    let cpus = crate::bench_wake::two_cpus();
    // SPDK's reactor takes the second CPU, as the servers below do; started
    // before the client's thread is pinned, whose mask it would inherit.
    let mut spdk = match &a.spdk {
        Some(bin) => {
            let s = Spdk::start(bin, cpus.map_or(0, |(_, second)| second))?;
            println!("#   spdk: {}", s.describe());
            Some(s)
        }
        None => None,
    };
    // The setup: the client on one CPU, the server on the other.
    let placement = if a.unpinned { None } else { cpus };
    match placement {
        Some((client, server)) => {
            // Before the client's thread is pinned: the check of the CPUs
            // allowed reads the calling thread's mask.
            softcard_storage::placement::set_queue_cpus(&[server])
                .map_err(|e| anyhow::anyhow!("pinning the queue workers: {e}"))?;
            if !crate::bench_wake::pin(client) {
                bail!(
                    "pinning the client to CPU {client}: {}",
                    std::io::Error::last_os_error()
                );
            }
            let mut servers = vec!["softcard's queue worker"];
            if !a.softcard_only {
                servers.push("qsd");
            }
            if spdk.is_some() {
                servers.push("SPDK's reactor");
            }
            println!(
                "#   placement: the client on CPU {client}; {} on CPU {server} (--unpinned: wherever the scheduler puts them)",
                servers.join(", ")
            );
        }
        None => println!(
            "#   placement: threads where the scheduler puts them (SPDK's reactor, if any, on its own CPU)"
        ),
    }
    let mut spdk_rows = Vec::new();
    println!("#   client sleeps/IO (asleep): times the client thread slept (voluntary context switches) per I/O; a sleep on an idle CPU costs it up to the wake-up above; in brackets the share of the cell the client spent off its CPU (its own CPU clock against the cell's time)");
    println!("#   CPU: the serving side's user + system seconds per million I/Os, and I/Os per second per core it kept busy (a spinning poller counts as busy)");
    println!("#   per I/O (softcard): rounds of the queue worker's polling loop (those that found nothing), wake-ups of the worker, notifications to the driver");
    println!("| backing | workload | softcard IOPS | qsd IOPS | softcard/qsd | softcard MB/s | qsd MB/s | softcard CPU s/M IO | qsd CPU s/M IO | softcard IOPS/core | qsd IOPS/core | softcard p50/p99 us | qsd p50/p99 us | client sleeps/IO (asleep) softcard | client sleeps/IO (asleep) qsd | polls/IO (idle) | wake-ups/IO | notifications/IO |");
    println!(
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let wanted =
        |name: &str, filter: &Option<String>| filter.as_deref().is_none_or(|f| name.contains(f));
    for (backing, _) in BACKINGS.into_iter().filter(|(b, _)| wanted(b, &a.backing)) {
        let qsd_img = shm.path().join("qsd.img");
        let dev = match backing {
            "null" | "null-untouched" => DeviceConfig {
                name: "bench".into(),
                kind: DeviceKind::Null,
                path: None,
                size_bytes: Some(VOLUME_BYTES + MAP_SLACK),
                share_depth: None,
                read_zeroes: (backing == "null-untouched").then_some(false),
                volatile_write_cache: None,
            },
            "ram" | "ram-encrypted" => DeviceConfig {
                name: "bench".into(),
                kind: DeviceKind::Ram,
                path: None,
                size_bytes: Some(VOLUME_BYTES + MAP_SLACK),
                share_depth: None,
                read_zeroes: None,
                volatile_write_cache: None,
            },
            _ => {
                let ours = shm.path().join("softcard.img");
                preallocate(&ours, VOLUME_BYTES + MAP_SLACK)?;
                DeviceConfig {
                    name: "bench".into(),
                    kind: DeviceKind::File,
                    path: Some(ours),
                    size_bytes: None,
                    share_depth: None,
                    read_zeroes: None,
                    volatile_write_cache: None,
                }
            }
        };
        let qsd_args: Vec<String> = match backing {
            "null" | "null-untouched" => vec![
                "--blockdev".into(),
                format!(
                    "driver=null-co,node-name=disk0,size={VOLUME_BYTES},read-zeroes={}",
                    if backing == "null" { "on" } else { "off" }
                ),
            ],
            "ram-encrypted" => {
                if !a.softcard_only {
                    create_luks(&qsd_img)?;
                }
                vec![
                    "--object".into(),
                    "secret,id=sec0,data=softcard-bench".into(),
                    "--blockdev".into(),
                    format!(
                        "driver=file,node-name=file0,filename={},aio=io_uring",
                        qsd_img.display()
                    ),
                    "--blockdev".into(),
                    "driver=luks,node-name=disk0,file=file0,key-secret=sec0".into(),
                ]
            }
            _ => {
                if !a.softcard_only {
                    preallocate(&qsd_img, VOLUME_BYTES)?;
                }
                vec![
                    "--blockdev".into(),
                    format!(
                        "driver=file,node-name=disk0,filename={},aio=io_uring",
                        qsd_img.display()
                    ),
                ]
            }
        };
        let (card, tenant) = if backing == "ram-encrypted" {
            let keys = KeyStore::with_keys(vec![("bench".into(), Kek::generate())]);
            (StorageCard::open_with_keys(&[dev], keys)?, Some("bench"))
        } else {
            (StorageCard::open(&[dev])?, None)
        };
        match tenant {
            Some(t) => card.create_encrypted_volume("bench", "bench", VOLUME_BYTES, t)?,
            None => card.create_volume("bench", "bench", VOLUME_BYTES)?,
        };
        let ours = dir.path().join(format!("softcard-{backing}.sock"));
        card.attach(
            "bench",
            &AttachOptions {
                socket: ours.clone(),
                queues: a.queues,
                qos: Default::default(),
                interface: Default::default(),
            },
        )?;
        // Same starting state for both: written once end to end is not
        // needed for null; for ram and files both start zero-filled.
        let theirs = dir.path().join(format!("qsd-{backing}.sock"));
        let qsd = if a.softcard_only {
            None
        } else {
            Some(start_qsd(
                &a.qsd,
                &qsd_args,
                &theirs,
                a.queues,
                placement.map(|(_, server)| server),
            )?)
        };
        for w in WORKLOADS
            .into_iter()
            .filter(|w| wanted(w.name, &a.workload))
        {
            let (mut s, mut q, mut k) = (Vec::new(), Vec::new(), Vec::new());
            let mut per_io = Vec::new();
            let spdk_socket = spdk.as_ref().and_then(|k| k.socket(backing));
            for _ in 0..runs {
                let before = counters(&card);
                s.push(
                    drive(&ours, w, a.seconds, Server::ThisProcessButMe, a.poll_client)
                        .with_context(|| format!("softcard {backing} {}", w.name))?,
                );
                per_io.push(PerIo::between(&before, &counters(&card)));
                if let Some(p) = &qsd {
                    q.push(
                        drive(
                            &theirs,
                            w,
                            a.seconds,
                            Server::Process(p.0.id()),
                            a.poll_client,
                        )
                        .with_context(|| format!("qsd {backing} {}", w.name))?,
                    );
                }
                if let (Some(p), Some(socket)) = (&mut spdk, &spdk_socket) {
                    p.resume()?;
                    let run = drive(
                        socket,
                        w,
                        a.seconds,
                        Server::Process(p.pid()),
                        a.poll_client,
                    )
                    .with_context(|| {
                        format!("SPDK {backing} {}; its log ends:\n{}", w.name, p.log_tail())
                    });
                    p.pause()?;
                    k.push(run?);
                }
            }
            let (s, q) = (Summary::of(&s), Summary::of(&q));
            if !k.is_empty() {
                spdk_rows.push(spdk_row(backing, w.name, &s, &q, &Summary::of(&k)));
            }
            let m = |f: fn(&PerIo) -> f64| {
                figure(median_range(&per_io.iter().map(f).collect::<Vec<_>>()).0, 2)
            };
            println!(
                "| {backing} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} |",
                w.name,
                s.iops_text(),
                q.iops_text(),
                figure(s.iops.0 / q.iops.0, 2),
                figure(s.mb_s, 0),
                figure(q.mb_s, 0),
                figure(s.cpu_per_m, 2),
                figure(q.cpu_per_m, 2),
                figure(s.iops_per_core, 0),
                figure(q.iops_per_core, 0),
                s.latency_text(),
                q.latency_text(),
                s.sleeps_text(),
                q.sleeps_text(),
                m(|c| c.polls),
                m(|c| c.idle_polls),
                m(|c| c.wakeups),
                m(|c| c.notifications),
            );
        }
        drop(qsd);
        card.shutdown();
        let _ = std::fs::remove_file(&qsd_img);
    }
    if !spdk_rows.is_empty() {
        println!();
        println!("softcard against SPDK's vhost target, from the same runs (SPDK/qsd: the issue's second yardstick):");
        println!();
        println!("| backing | workload | softcard IOPS | SPDK IOPS | softcard/SPDK | SPDK/qsd | softcard CPU s/M IO | SPDK CPU s/M IO | softcard IOPS/core | SPDK IOPS/core | softcard p50/p99 us | SPDK p50/p99 us | client sleeps/IO (asleep) softcard | client sleeps/IO (asleep) SPDK |");
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in &spdk_rows {
            println!("{row}");
        }
    }
    Ok(())
}

/// One row of the SPDK table: softcard (`s`), qsd (`q`, for the
/// SPDK/qsd yardstick) and SPDK (`k`) on one cell.
fn spdk_row(backing: &str, workload: &str, s: &Summary, q: &Summary, k: &Summary) -> String {
    format!(
        "| {backing} | {workload} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        s.iops_text(),
        k.iops_text(),
        figure(s.iops.0 / k.iops.0, 2),
        figure(k.iops.0 / q.iops.0, 2),
        figure(s.cpu_per_m, 2),
        figure(k.cpu_per_m, 2),
        figure(s.iops_per_core, 0),
        figure(k.iops_per_core, 0),
        s.latency_text(),
        k.latency_text(),
        s.sleeps_text(),
        k.sleeps_text(),
    )
}

/// Options of `softcard bench encryption`.
#[derive(Debug, clap::Args)]
pub struct EncryptionBenchArgs {
    /// Rounds; each measures both volumes once, in alternating order.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

/// `softcard bench encryption`: an encrypted `ram` volume against the same
/// volume unencrypted, both served at once and measured in alternating
/// short slices, so that the machine's drift (other tenants of a shared
/// host) falls on both alike. Prints each round's ratio and the median.
pub fn encryption(a: &EncryptionBenchArgs) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("softcard-bench")
        .tempdir()?;
    let ram = |name: &str| DeviceConfig {
        name: name.into(),
        kind: DeviceKind::Ram,
        path: None,
        size_bytes: Some(VOLUME_BYTES + MAP_SLACK),
        share_depth: None,
        read_zeroes: None,
        volatile_write_cache: None,
    };
    let keys = KeyStore::with_keys(vec![("bench".into(), Kek::generate())]);
    let card = StorageCard::open_with_keys(&[ram("plain"), ram("secret")], keys)?;
    card.create_volume("plain", "plain", VOLUME_BYTES)?;
    card.create_encrypted_volume("secret", "secret", VOLUME_BYTES, "bench")?;
    let mut sockets = Vec::new();
    for v in ["plain", "secret"] {
        let socket = dir.path().join(format!("{v}.sock"));
        card.attach(
            v,
            &AttachOptions {
                socket: socket.clone(),
                queues: 1,
                qos: Default::default(),
                interface: Default::default(),
            },
        )?;
        sockets.push(socket);
    }
    println!(
        "# softcard bench encryption: ram volume unencrypted vs AES-256-XTS, libblkio, {} rounds of {} s each, alternating",
        a.rounds, a.seconds
    );
    println!("| workload | unencrypted IOPS (median) | encrypted IOPS (median) | encrypted / unencrypted per round | median ratio |");
    println!("|---|---:|---:|---|---:|");
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for w in WORKLOADS.into_iter().filter(|w| w.depth == 32) {
        let (mut plain, mut secret, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..a.rounds.max(1) {
            // Alternate which goes first, so that neither always follows
            // the other's warm caches.
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            let mut got = [0.0; 2];
            for i in order {
                got[i] = drive_card(&sockets[i], w, a.seconds)
                    .with_context(|| format!("{} {}", ["plain", "secret"][i], w.name))?
                    .iops;
            }
            plain.push(got[0]);
            secret.push(got[1]);
            ratios.push(got[1] / got[0]);
        }
        let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "| {} | {:.0} | {:.0} | {} | {:.2} |",
            w.name,
            median(&mut plain),
            median(&mut secret),
            per_round.join(" "),
            median(&mut ratios)
        );
    }
    card.shutdown();
    Ok(())
}

/// Options of `softcard bench nbd`.
#[derive(Debug, clap::Args)]
pub struct NbdBenchArgs {
    /// Requests per run of `qemu-img bench` at queue depth 32 (a fifth of
    /// it at depth 1).
    #[arg(long, default_value_t = 200_000)]
    count: u32,
    /// The qemu-storage-daemon binary to compare with.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// A tmpfs directory for both servers' image files.
    #[arg(long, default_value = "/dev/shm")]
    tmpfs: PathBuf,
}

/// `softcard bench nbd`: softcard's NBD export of a volume against
/// qemu-storage-daemon's NBD export of a file, both on tmpfs, driven by the
/// same client (`qemu-img bench`, QEMU's NBD client) in the same run.
pub fn nbd(a: &NbdBenchArgs) -> Result<()> {
    require_peers(&[&a.qsd.to_string_lossy(), "qemu-img"])?;
    let shm = tempfile::Builder::new()
        .prefix("softcard-bench-nbd")
        .tempdir_in(&a.tmpfs)
        .with_context(|| format!("tmpfs directory {}", a.tmpfs.display()))?;
    let sockets = tempfile::Builder::new()
        .prefix("softcard-bench-nbd")
        .tempdir()?;
    let ours_img = shm.path().join("softcard.img");
    preallocate(&ours_img, VOLUME_BYTES + MAP_SLACK)?;
    let theirs_img = shm.path().join("qsd.img");
    preallocate(&theirs_img, VOLUME_BYTES)?;
    let card = StorageCard::open(&[DeviceConfig {
        name: "bench".into(),
        kind: DeviceKind::File,
        path: Some(ours_img),
        size_bytes: None,
        share_depth: None,
        read_zeroes: None,
        volatile_write_cache: None,
    }])?;
    card.create_volume("bench", "bench", VOLUME_BYTES)?;
    let ours = sockets.path().join("softcard.nbd");
    card.attach(
        "bench",
        &AttachOptions {
            socket: ours.clone(),
            queues: 1,
            qos: Default::default(),
            interface: softcard_storage::Interface::Nbd,
        },
    )?;
    let theirs = sockets.path().join("qsd.nbd");
    let mut child = Command::new(&a.qsd)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk0,filename={},aio=io_uring",
            theirs_img.display()
        ))
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", theirs.display()))
        .args([
            "--export",
            "type=nbd,id=exp0,node-name=disk0,name=bench,writable=on",
        ])
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (package qemu-system-common)", a.qsd.display()))?;
    wait_for_socket(&theirs, &mut child)?;
    let qsd = Qsd(child);
    println!(
        "# softcard bench nbd: qemu-img bench ({} requests of 4 KiB per cell at depth 32, a fifth at depth 1, 1 MiB apart) against each NBD export over a unix socket; both images on tmpfs",
        a.count
    );
    println!("| workload | softcard IOPS | qsd IOPS | softcard/qsd |");
    println!("|---|---:|---:|---:|");
    let bench = |socket: &Path, depth: u32, write: bool| -> Result<f64> {
        let uri = format!("nbd+unix:///bench?socket={}", socket.display());
        let count = if depth == 1 { a.count / 5 } else { a.count }.max(1);
        let mut cmd = Command::new("qemu-img");
        cmd.args(["bench", "-f", "raw", "-s", "4096", "-S", "1048576"])
            .args(["-c", &count.to_string(), "-d", &depth.to_string()]);
        if write {
            cmd.arg("-w");
        }
        let out = cmd
            .arg(&uri)
            .output()
            .context("running qemu-img bench (package qemu-utils)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "qemu-img bench on {uri}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // "Run completed in 2.092 seconds."
        let secs: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("Run completed in "))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no result in qemu-img bench output: {text}"))?;
        Ok(f64::from(count) / secs)
    };
    for (name, depth, write) in [
        ("4k-write-qd1", 1, true),
        ("4k-read-qd1", 1, false),
        ("4k-write-qd32", 32, true),
        ("4k-read-qd32", 32, false),
    ] {
        let s = bench(&ours, depth, write)?;
        let q = bench(&theirs, depth, write)?;
        println!("| {name} | {s:.0} | {q:.0} | {:.2} |", s / q);
    }
    drop(qsd);
    card.shutdown();
    Ok(())
}

/// Options of `softcard bench crypto`.
#[derive(Debug, clap::Args)]
pub struct CryptoBenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// The openssl binary to compare with.
    #[arg(long, default_value = "openssl")]
    openssl: PathBuf,
}

/// `softcard bench crypto`: AES-256-XTS on one core at 4 KiB units, ours
/// against `openssl speed -evp aes-256-xts` in the same run.
pub fn crypto(a: &CryptoBenchArgs) -> Result<()> {
    require_peers(&[&a.openssl.to_string_lossy()])?;
    use softcard_storage::crypto::{DataKey, Xts256};
    const UNIT: usize = 4096;
    let x = Xts256::new(&DataKey::generate());
    let mut buf = vec![0x5au8; UNIT];
    let measure = |f: &mut dyn FnMut(u64)| {
        let begin = Instant::now();
        let mut n = 0u64;
        while begin.elapsed() < Duration::from_secs(a.seconds) {
            for _ in 0..256 {
                f(n);
                n += 1;
            }
        }
        n as f64 * UNIT as f64 / begin.elapsed().as_secs_f64() / 1e6
    };
    let enc = measure(&mut |n| x.encrypt(&mut buf, n * 8));
    let dec = measure(&mut |n| x.decrypt(&mut buf, n * 8));
    let out = Command::new(&a.openssl)
        .args(["speed", "-evp", "aes-256-xts", "-bytes", "4096", "-seconds"])
        .arg(a.seconds.to_string())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {}", a.openssl.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The result line: "AES-256-XTS    6695344.13k" (1000s of bytes/s).
    let ossl = text
        .lines()
        .find(|l| l.starts_with("AES-256-XTS"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.trim_end_matches('k').parse::<f64>().ok())
        .map(|k| k * 1000.0 / 1e6)
        .context("could not read openssl speed's result")?;
    println!("# softcard bench crypto: AES-256-XTS, 4 KiB units (8 sectors of 512 B), one core, {} s each", a.seconds);
    println!("| implementation | MB/s | ratio to openssl |");
    println!("|---|---:|---:|");
    println!("| softcard encrypt | {enc:.0} | {:.2} |", enc / ossl);
    println!("| softcard decrypt | {dec:.0} | {:.2} |", dec / ossl);
    println!("| openssl speed -evp aes-256-xts (encrypt) | {ossl:.0} | 1.00 |");
    Ok(())
}
