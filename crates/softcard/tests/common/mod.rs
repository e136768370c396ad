//! Shared helpers of the integration tests: a real `softcard` daemon
//! process, its CLI, and a libblkio client.
#![allow(dead_code)]

pub mod guest;
pub mod net;
pub mod raw_frontend;
pub mod screen;

use std::io::Write;
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use softcard_storage::device::{self, DeviceConfig, DeviceKind};
use softcard_storage::partition::PartitionMap;

pub const BIN: &str = env!("CARGO_BIN_EXE_softcard");

/// A `softcard serve` process with its own directory; stopped with SIGTERM
/// on drop.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub api: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    /// A successor started by `softcard upgrade`: our child only through
    /// the subreaper bit.
    adopted: Option<i32>,
}

impl Daemon {
    /// Writes `devices` (TOML `[[device]]` tables, `@DIR@` = the daemon's
    /// directory) into a config and starts the daemon.
    pub fn start(devices: &str) -> Daemon {
        Self::start_with(devices, |_| {})
    }

    /// Like [`Daemon::start`], running `prepare` on the directory first.
    pub fn start_with(devices: &str, prepare: impl FnOnce(&Path)) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("softcard-test")
            .tempdir()
            .unwrap();
        let api = dir.path().join("api.sock");
        let config = dir.path().join("card.toml");
        // Each daemon its own RDMA socket unless the test names one: the
        // default (/run/softcard/rdma.sock) is one per machine, and
        // daemons of tests running at once would take it from each other.
        let rdma = if devices.contains("rdma_socket") {
            String::new()
        } else {
            format!(
                "rdma_socket = \"{}\"\n",
                dir.path().join("rdma.sock").display()
            )
        };
        let text = format!(
            "api_socket = \"{}\"\n{rdma}{}",
            api.display(),
            devices.replace("@DIR@", &dir.path().display().to_string())
        );
        std::fs::write(&config, text).unwrap();
        prepare(dir.path());
        let mut d = Daemon {
            dir,
            api,
            config,
            child: None,
            adopted: None,
        };
        d.restart();
        d
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// (Re)starts the process on the same configuration.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Kills the process with SIGKILL (a crash: nothing is drained or
    /// closed in order) and starts a new one on the same configuration.
    pub fn crash_and_restart(&mut self) {
        self.crash_and_restart_with(&[]);
    }

    /// [`Daemon::crash_and_restart`], the new process with `env` added to
    /// its environment (the next restart goes without).
    pub fn crash_and_restart_with(&mut self, env: &[(&str, &str)]) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = self.adopted.take() {
            let _ = reap(pid, libc::SIGKILL);
        }
        self.spawn_with(env);
    }

    /// `softcard upgrade` to the same binary: the running process hands
    /// its sockets to a new one and exits cleanly. Returns the CLI's line.
    pub fn upgrade(&mut self) -> String {
        self.upgrade_to(None)
    }

    /// `softcard upgrade [--binary B]`.
    pub fn upgrade_to(&mut self, binary: Option<&Path>) -> String {
        // SAFETY: prctl with integer arguments: the successor, orphaned
        // when its predecessor exits, becomes this process's child.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let mut args = vec!["upgrade".to_owned()];
        if let Some(b) = binary {
            args.extend(["--binary".to_owned(), b.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let line = self.ok(&args);
        let new: i32 = line
            .split("-> ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no new pid in {line:?}"));
        if let Some(mut c) = self.child.take() {
            let status = c.wait().unwrap();
            assert!(status.success(), "the old daemon exited with {status}");
        }
        if let Some(old) = self.adopted.replace(new) {
            assert_eq!(reap(old, 0), Some(0), "the old daemon's exit");
        }
        line
    }

    fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    fn spawn_with(&mut self, env: &[(&str, &str)]) {
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn softcard serve");
        self.child = Some(child);
        wait_for_socket(&self.api, self.child.as_mut());
    }

    /// Stops the process with SIGTERM and checks it exits cleanly.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = i32::try_from(c.id()).unwrap();
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let status = c.wait().unwrap();
            assert!(status.success(), "daemon exited with {status}");
        }
        if let Some(pid) = self.adopted.take() {
            assert_eq!(reap(pid, libc::SIGTERM), Some(0), "daemon's exit status");
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> i32 {
        match (&self.child, self.adopted) {
            (Some(c), _) => i32::try_from(c.id()).unwrap(),
            (None, Some(pid)) => pid,
            (None, None) => panic!("no daemon running"),
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        if let Some(pid) = self.adopted {
            let mut status = 0;
            // SAFETY: waitpid on a child of ours with a valid out pointer.
            return unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0;
        }
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("SOFTCARD_API", &self.api)
            .output()
            .unwrap()
    }

    /// Runs the CLI and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "softcard {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the CLI and requires failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "softcard {args:?} succeeded unexpectedly"
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// `volume list --json` parsed.
    pub fn volumes(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["card", "volume", "list", "--json"])).unwrap()
    }

    /// Creates volume `name` of `size` on device `nvme0` and attaches it
    /// with `flag` (`--vhost-user`, `--vhost-user-connect`, `--nbd`) on
    /// the socket `socket` in the daemon's directory; returns its path.
    pub fn volume_on(&self, name: &str, size: &str, flag: &str, socket: &str) -> PathBuf {
        let sock = self.path(socket);
        self.ok(&[
            "card", "volume", "create", name, "--device", "nvme0", "--size", size,
        ]);
        self.ok(&[
            "card",
            "volume",
            "attach",
            name,
            flag,
            sock.to_str().unwrap(),
        ]);
        sock
    }

    /// Offset of a volume on its device.
    pub fn offset_of(&self, name: &str) -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["card", "volume", "show", name])).unwrap();
        v["offset_bytes"].as_u64().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = self.adopted.take() {
            let _ = reap(pid, libc::SIGKILL);
        }
    }
}

/// Sends `signal` (0: none) to a child of ours and waits for it; returns
/// its exit code (None: killed by a signal).
pub fn reap(pid: i32, signal: i32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: kill(2) and waitpid(2) on a child of this process, with a
    // valid out pointer.
    unsafe {
        if signal != 0 {
            libc::kill(pid, signal);
        }
        libc::waitpid(pid, &mut status, 0);
    }
    libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
}

pub fn wait_for_socket(path: &Path, mut child: Option<&mut Child>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(path).is_err() {
        if let Some(c) = child.as_deref_mut() {
            if let Some(st) = c.try_wait().unwrap() {
                panic!("process exited before opening {}: {st}", path.display());
            }
        }
        assert!(Instant::now() < deadline, "{} never opened", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A libblkio virtio-blk-vhost-user client with one bounce region.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub capacity: u64,
}

pub const REGION_BYTES: usize = 4 << 20;

impl Client {
    pub fn connect(socket: &Path, queues: i32) -> Result<Client, String> {
        Self::connect_with(socket, queues, false)
    }

    /// One queue that libblkio polls (its poll queue: no notifications
    /// asked for).
    pub fn connect_polled(socket: &Path) -> Result<Client, String> {
        Self::connect_with(socket, 1, true)
    }

    fn connect_with(socket: &Path, queues: i32, polled: bool) -> Result<Client, String> {
        let e = |what: &'static str| move |err: blkio::Error| format!("{what}: {}", err.message());
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e("new"))?;
        b.set_str("path", &socket.to_string_lossy())
            .map_err(e("path"))?;
        b.connect().map_err(e("connect"))?;
        let (irq, poll) = if polled { (0, queues) } else { (queues, 0) };
        b.set_i32("num-queues", irq).map_err(e("num-queues"))?;
        b.set_i32("num-poll-queues", poll)
            .map_err(e("num-poll-queues"))?;
        let capacity = b.get_u64("capacity").map_err(e("capacity"))?;
        let mut out = b.start().map_err(e("start"))?;
        if polled {
            out.queues = std::mem::take(&mut out.poll_queues);
        }
        let region = b.alloc_mem_region(REGION_BYTES).map_err(e("alloc"))?;
        b.map_mem_region(&region).map_err(e("map"))?;
        Ok(Client {
            blkio: b,
            queues: out.queues,
            region,
            capacity,
        })
    }

    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is REGION_BYTES of memory owned by `blkio`
        // while `self` lives, and only reachable through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, REGION_BYTES) }
    }

    /// Waits for one completion on queue `q`; returns its `ret`.
    pub fn wait(&mut self, q: usize) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let n = self.queues[q].do_io(&mut c, 1, None, None).expect("do_io");
        assert_eq!(n, 1);
        // SAFETY: do_io initialised one completion.
        unsafe { c[0].assume_init_ref() }.ret
    }

    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        self.buf()[..data.len()].copy_from_slice(data);
        let p = self.region.addr as *const u8;
        self.queues[q].write(offset, p, data.len(), 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        self.buf()[..len].fill(0xee);
        let p = self.region.addr as *mut u8;
        self.queues[q].read(offset, p, len, 0, ReqFlags::empty());
        match self.wait(q) {
            0 => Ok(self.buf()[..len].to_vec()),
            e => Err(e),
        }
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].write_zeroes(offset, len, 0, ReqFlags::empty());
        self.wait(q)
    }
}

impl Client {
    /// Keeps `depth` reads of `block` bytes in flight on queue `q` for
    /// `dur`, then drains; returns (completions, elapsed from the first
    /// submission to the last completion). Every request must succeed.
    pub fn load(&mut self, q: usize, depth: usize, block: usize, dur: Duration) -> (u64, Duration) {
        assert!(depth * block <= REGION_BYTES);
        let blocks = self.capacity / block as u64;
        let base = self.region.addr;
        let start = Instant::now();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % blocks) * block as u64
        };
        for slot in 0..depth {
            self.queues[q].read(
                next(),
                (base + slot * block) as *mut u8,
                block,
                slot,
                ReqFlags::empty(),
            );
        }
        let mut inflight = depth;
        let mut done = 0u64;
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..depth).map(|_| MaybeUninit::uninit()).collect();
        while inflight > 0 {
            let n = self.queues[q]
                .do_io(&mut comps, 1, None, None)
                .expect("do_io");
            let more = start.elapsed() < dur;
            for c in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                let c = unsafe { c.assume_init_ref() };
                assert_eq!(c.ret, 0, "a request failed");
                done += 1;
                inflight -= 1;
                if more {
                    let slot = c.user_data;
                    self.queues[q].read(
                        next(),
                        (base + slot * block) as *mut u8,
                        block,
                        slot,
                        ReqFlags::empty(),
                    );
                    inflight += 1;
                }
            }
        }
        (done, start.elapsed())
    }
}

/// A deterministic byte pattern keyed by `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Reads `len` bytes of a file at `offset`.
pub fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// Unwraps `wrapped` with `kek` and decrypts `data` (whole sectors,
/// starting at volume sector `first`) in Python.
pub fn python_decrypt(
    kek_hex: &str,
    wrapped: &[u8],
    first: u64,
    data: &[u8],
) -> Result<Vec<u8>, String> {
    let script = r#"
import sys
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
kek = bytes.fromhex(sys.argv[1]); wrapped = bytes.fromhex(sys.argv[2]); first = int(sys.argv[3])
key = aes_key_unwrap(kek, wrapped)
data = sys.stdin.buffer.read()
out = bytearray()
for i in range(0, len(data), 512):
    tweak = (first + i // 512).to_bytes(16, "little")
    d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
    out += d.update(data[i:i + 512]) + d.finalize()
sys.stdout.buffer.write(bytes(out))
"#;
    let hex: String = wrapped.iter().map(|b| format!("{b:02x}")).collect();
    let mut child = Command::new("python3")
        .args(["-c", script, kek_hex, &hex, &first.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (with python3-cryptography)");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

pub fn wrapped_key_on_device(path: &Path, volume: &str) -> Vec<u8> {
    // A copy: the serving daemon holds the device's lock.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.img");
    std::fs::copy(path, &copy).unwrap();
    let dev = device::open(&DeviceConfig {
        name: "check".into(),
        kind: DeviceKind::File,
        path: Some(copy),
        size_bytes: None,
        share_depth: None,
        read_zeroes: None,
        volatile_write_cache: None,
    })
    .unwrap();
    let map = PartitionMap::load(dev.as_ref()).unwrap();
    map.wrapped_key(volume)
        .expect("an encrypted volume")
        .wrapped
        .to_vec()
}
