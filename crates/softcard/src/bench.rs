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
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    block: usize,
    depth: usize,
    random: bool,
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
const MAP_SLACK: u64 = 16 << 20;

#[derive(Debug, Clone, Copy)]
struct Figures {
    iops: f64,
    mb_s: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Runs one workload against the vhost-user-blk socket.
fn drive(socket: &Path, w: Workload, seconds: f64) -> Result<Figures> {
    let mut b = Blkio::new("virtio-blk-vhost-user")
        .map_err(|e| anyhow::anyhow!("libblkio: {}", e.message()))?;
    let err = |what: &str, e: blkio::Error| anyhow::anyhow!("libblkio {what}: {}", e.message());
    b.set_str("path", &socket.to_string_lossy())
        .map_err(|e| err("path", e))?;
    b.connect().map_err(|e| err("connect", e))?;
    b.set_i32("num-queues", 1)
        .map_err(|e| err("num-queues", e))?;
    let capacity = b.get_u64("capacity").map_err(|e| err("capacity", e))?;
    let mut out = b.start().map_err(|e| err("start", e))?;
    let mut q = out.queues.pop().context("no queue")?;
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
fn require_peers(programs: &[&str]) -> Result<()> {
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

fn start_qsd(bin: &Path, args: &[String], socket: &Path, queues: u16) -> Result<Qsd> {
    let mut child = Command::new(bin)
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
fn create_luks(path: &Path) -> Result<()> {
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
    if !out.status.success() {
        bail!(
            "qemu-img create -f luks: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
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
const BACKINGS: [(&str, &str); 4] = [
    (
        "null",
        "softcard null device vs qsd null-co (read-zeroes=on)",
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
        "softcard file on tmpfs vs qsd file on tmpfs (aio=io_uring)",
    ),
];

/// `softcard bench storage`.
pub fn storage(a: &StorageBenchArgs) -> Result<()> {
    if !a.softcard_only {
        require_peers(&[&a.qsd.to_string_lossy(), "qemu-img"])?;
    }
    let dir = tempfile::Builder::new()
        .prefix("softcard-bench")
        .tempdir()?;
    let shm = tempfile::Builder::new()
        .prefix("softcard-bench")
        .tempdir_in(&a.tmpfs)
        .with_context(|| format!("tmpfs directory {}", a.tmpfs.display()))?;
    println!(
        "# softcard bench storage: libblkio virtio-blk-vhost-user client, {} s per cell, {} queue(s)",
        a.seconds, a.queues
    );
    for (name, what) in BACKINGS {
        println!("#   {name}: {what}");
    }
    println!("| backing | workload | softcard IOPS | qsd IOPS | softcard/qsd | softcard MB/s | qsd MB/s | softcard p50/p99 us | qsd p50/p99 us |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let wanted =
        |name: &str, filter: &Option<String>| filter.as_deref().is_none_or(|f| name.contains(f));
    for (backing, _) in BACKINGS.into_iter().filter(|(b, _)| wanted(b, &a.backing)) {
        let qsd_img = shm.path().join("qsd.img");
        let dev = match backing {
            "null" => DeviceConfig {
                name: "bench".into(),
                kind: DeviceKind::Null,
                path: None,
                size_bytes: Some(VOLUME_BYTES + MAP_SLACK),
                share_depth: None,
            },
            "ram" | "ram-encrypted" => DeviceConfig {
                name: "bench".into(),
                kind: DeviceKind::Ram,
                path: None,
                size_bytes: Some(VOLUME_BYTES + MAP_SLACK),
                share_depth: None,
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
                }
            }
        };
        let qsd_args: Vec<String> = match backing {
            "null" => vec![
                "--blockdev".into(),
                format!("driver=null-co,node-name=disk0,size={VOLUME_BYTES},read-zeroes=on"),
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
            Some(start_qsd(&a.qsd, &qsd_args, &theirs, a.queues)?)
        };
        for w in WORKLOADS
            .into_iter()
            .filter(|w| wanted(w.name, &a.workload))
        {
            let s = drive(&ours, w, a.seconds)
                .with_context(|| format!("softcard {backing} {}", w.name))?;
            let Some(_) = &qsd else {
                println!(
                    "| {backing} | {} | {:.0} | - | - | {:.0} | - | {:.0}/{:.0} | - |",
                    w.name, s.iops, s.mb_s, s.p50_us, s.p99_us
                );
                continue;
            };
            let q = drive(&theirs, w, a.seconds)
                .with_context(|| format!("qsd {backing} {}", w.name))?;
            println!(
                "| {backing} | {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0}/{:.0} | {:.0}/{:.0} |",
                w.name,
                s.iops,
                q.iops,
                s.iops / q.iops,
                s.mb_s,
                q.mb_s,
                s.p50_us,
                s.p99_us,
                q.p50_us,
                q.p99_us
            );
        }
        drop(qsd);
        card.shutdown();
        let _ = std::fs::remove_file(&qsd_img);
    }
    Ok(())
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
                got[i] = drive(&sockets[i], w, a.seconds)
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

/// Options of `softcard bench fairness`.
#[derive(Debug, clap::Args)]
pub struct FairnessBenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Directory for the device file (a disk-backed filesystem, so that
    /// O_DIRECT reaches a real device queue).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
}

/// `softcard bench fairness`: a quiet volume's latency alone and next to a
/// noisy neighbour on the same physical device.
pub fn fairness(a: &FairnessBenchArgs) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("softcard-fair")
        .tempdir_in(&a.dir)
        .with_context(|| format!("directory {}", a.dir.display()))?;
    let sockets = tempfile::Builder::new().prefix("softcard-fair").tempdir()?;
    // Written through (not sparse), so that reads reach the device; the
    // metadata area stays blank for a fresh partition map.
    const FAIR_VOLUME: u64 = 256 << 20;
    let img = dir.path().join("disk.img");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&img)?;
        f.write_all(&vec![0u8; MAP_SLACK as usize])?;
        let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
        for _ in 0..(2 * FAIR_VOLUME) >> 20 {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
    }
    let dev = DeviceConfig {
        name: "disk".into(),
        kind: DeviceKind::File,
        path: Some(img),
        size_bytes: None,
        share_depth: None,
    };
    let card = StorageCard::open(&[dev])?;
    let mut socks = Vec::new();
    for name in ["noisy", "quiet"] {
        card.create_volume(name, "disk", FAIR_VOLUME)?;
        let s = sockets.path().join(format!("{name}.sock"));
        card.attach(
            name,
            &AttachOptions {
                socket: s.clone(),
                queues: 1,
                qos: Default::default(),
                interface: Default::default(),
            },
        )?;
        socks.push(s);
    }
    let quiet_w = Workload {
        name: "4k-randread-qd1",
        write: false,
        block: 4096,
        depth: 1,
        random: true,
    };
    let noisy_w = Workload {
        name: "4k-randwrite-qd64",
        write: true,
        block: 4096,
        depth: 64,
        random: true,
    };
    let detail = card
        .devices()
        .first()
        .map(|d| d.detail.clone())
        .unwrap_or_default();
    println!(
        "# softcard bench fairness: {detail}; {} s per cell",
        a.seconds
    );
    let alone = drive(&socks[1], quiet_w, a.seconds)?;
    let noisy_alone = drive(&socks[0], noisy_w, a.seconds)?;
    let noisy_sock = socks[0].clone();
    let secs = a.seconds + 1.0;
    let noisy = std::thread::spawn(move || drive(&noisy_sock, noisy_w, secs));
    std::thread::sleep(Duration::from_millis(300));
    let shared = drive(&socks[1], quiet_w, a.seconds)?;
    let n = noisy
        .join()
        .map_err(|_| anyhow::anyhow!("noisy client panicked"))??;
    println!("| quiet volume 4k-randread-qd1 | IOPS | p50 us | p99 us |");
    println!("|---|---:|---:|---:|");
    println!(
        "| alone | {:.0} | {:.0} | {:.0} |",
        alone.iops, alone.p50_us, alone.p99_us
    );
    println!(
        "| next to 4k-randwrite-qd64 ({:.0} IOPS) | {:.0} | {:.0} | {:.0} |",
        n.iops, shared.iops, shared.p50_us, shared.p99_us
    );
    println!(
        "| ratio (shared/alone) | {:.2} | {:.2} | {:.2} |",
        shared.iops / alone.iops,
        shared.p50_us / alone.p50_us.max(1.0),
        shared.p99_us / alone.p99_us.max(1.0)
    );
    println!(
        "| (noisy volume: {:.0} IOPS alone, {:.0} next to the quiet one) | | | |",
        noisy_alone.iops, n.iops
    );
    card.shutdown();
    Ok(())
}

/// Options of `softcard bench qos`.
#[derive(Debug, clap::Args)]
pub struct QosBenchArgs {
    /// IOPS limit.
    #[arg(long, default_value_t = 1000)]
    iops: u64,
    /// Burst (requests).
    #[arg(long, default_value_t = 32)]
    burst: u64,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
}

/// `softcard bench qos`: how exactly an IOPS limit holds under
/// queue-depth-32 load.
pub fn qos(a: &QosBenchArgs) -> Result<()> {
    let sockets = tempfile::Builder::new().prefix("softcard-qos").tempdir()?;
    let card = StorageCard::open(&[DeviceConfig {
        name: "r".into(),
        kind: DeviceKind::Ram,
        path: None,
        size_bytes: Some(64 << 20),
        share_depth: None,
    }])?;
    card.create_volume("v", "r", 32 << 20)?;
    let sock = sockets.path().join("v.sock");
    card.attach(
        "v",
        &AttachOptions {
            socket: sock.clone(),
            queues: 1,
            qos: softcard_storage::qos::QosLimits {
                iops: Some(a.iops),
                iops_burst: Some(a.burst),
                ..Default::default()
            },
            interface: Default::default(),
        },
    )?;
    let w = Workload {
        name: "4k-randread-qd32",
        write: false,
        block: 4096,
        depth: 32,
        random: true,
    };
    let begin = Instant::now();
    let f = drive(&sock, w, a.seconds)?;
    let elapsed = begin.elapsed().as_secs_f64();
    let done = f.iops * elapsed;
    let expected = a.iops as f64 * a.seconds;
    println!(
        "# softcard bench qos: {} IOPS limit, burst {}, 4 KiB reads at QD32 for {} s",
        a.iops, a.burst, a.seconds
    );
    println!("| completed | expected (limit x time) | ratio | measured IOPS |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {done:.0} | {expected:.0} | {:.4} | {:.1} |",
        done / expected,
        f.iops
    );
    card.shutdown();
    Ok(())
}

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

mod rdma_bench {
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

fn sockperf_latency(path: &rdma_bench::Path, seconds: f64, busy: bool) -> Result<(f64, f64)> {
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

fn iperf3_gbit(path: &rdma_bench::Path, seconds: f64) -> Result<f64> {
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
