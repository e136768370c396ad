//! SPDK's vhost target as a third peer of `softcard bench storage`.
//!
//! SPDK is what users pick for the fastest vhost-user-blk path, and issue
//! #16 sets softcard's goals against it. It is not packaged for Debian, so
//! the operator builds it (docs/benchmarks.md says how) and passes its
//! `vhost` binary with `--spdk`. The bench then starts it once, with two
//! block devices that match two of softcard's backings:
//!
//! - its Null bdev, which leaves read buffers untouched, against
//!   softcard's `null-untouched`;
//! - its Malloc bdev (memory, copied with the CPU), against `ram`.
//!
//! Its reactor busy-polls from start to stop. So that it takes no CPU from
//! the other servers' cells, the process is stopped (`SIGSTOP`) except
//! while its own cells run.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Bytes of each SPDK block device (the size of softcard's volume).
const DEVICE_BYTES: u64 = 1 << 30;
/// Block size SPDK's devices expose.
const BLOCK: u64 = 4096;
/// Memory SPDK may use, in MiB: the Malloc device and room for its pools.
const MEMORY_MIB: u64 = 1536;

/// A running SPDK vhost target, stopped between its cells.
pub(crate) struct Spdk {
    child: Child,
    dir: tempfile::TempDir,
    cpu: usize,
}

impl Spdk {
    /// Starts `bin` with its reactor on `cpu`, waits until both devices
    /// are served, and stops it until [`Spdk::resume`].
    pub(crate) fn start(bin: &Path, cpu: usize) -> Result<Spdk> {
        let dir = tempfile::Builder::new().prefix("softcard-spdk").tempdir()?;
        let conf = dir.path().join("bench.json");
        std::fs::write(&conf, config())?;
        if !hugepages_enough(MEMORY_MIB) {
            bail!(
                "SPDK needs {} free 2 MiB huge pages and a hugetlbfs mount (without them its Malloc device ran at 5 % of its speed here): echo {} > /proc/sys/vm/nr_hugepages; mkdir -p /dev/hugepages; mount -t hugetlbfs nodev /dev/hugepages",
                MEMORY_MIB / 2,
                MEMORY_MIB / 2 + 32
            );
        }
        let mut cmd = Command::new(bin);
        cmd.arg("-S")
            .arg(dir.path())
            .args(["-m", &format!("0x{:x}", 1u128 << cpu)])
            .args(["-s", &MEMORY_MIB.to_string()])
            // No PCI devices are used: none is probed or claimed.
            .arg("-u")
            .arg("--json")
            .arg(&conf)
            .stdin(Stdio::null());
        let log = std::fs::File::create(dir.path().join("spdk.log"))?;
        cmd.stdout(log.try_clone()?).stderr(log);
        // Its own process group: a stopped process in a group that loses
        // its last parent outside it (the bench's own shell exits) gets
        // SIGHUP from the kernel, and SPDK dies of it.
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting SPDK's vhost target {}", bin.display()))?;
        let mut spdk = Spdk { child, dir, cpu };
        for backing in ["null-untouched", "ram"] {
            let socket = spdk.socket(backing).context("a device without a socket")?;
            spdk.wait_for(&socket)?;
        }
        spdk.signal(libc::SIGSTOP)?;
        Ok(spdk)
    }

    /// SPDK's socket for softcard's `backing`, where it has a counterpart.
    pub(crate) fn socket(&self, backing: &str) -> Option<PathBuf> {
        let ctrlr = match backing {
            "null-untouched" => "vhost.null",
            "ram" => "vhost.malloc",
            _ => return None,
        };
        Some(self.dir.path().join(ctrlr))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One line for the bench's header.
    pub(crate) fn describe(&self) -> String {
        format!(
            "SPDK vhost target, reactor on CPU {}, {MEMORY_MIB} MiB in huge pages; its Null bdev (reads leave the buffer untouched) against null-untouched, its Malloc bdev against ram",
            self.cpu
        )
    }

    /// Lets the reactor run (before one of SPDK's cells); fails with the
    /// end of its log where it has exited.
    pub(crate) fn resume(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "SPDK's vhost target exited ({status}); its log ends:\n{}",
                self.log_tail()
            );
        }
        self.signal(libc::SIGCONT)
    }

    /// The last lines SPDK printed.
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("spdk.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Stops the reactor (after one of SPDK's cells).
    pub(crate) fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill takes no pointers; the pid is our own child's, not
        // yet reaped (we hold its Child until drop).
        if unsafe { libc::kill(pid, sig) } != 0 {
            bail!("signalling SPDK: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn wait_for(&mut self, socket: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "SPDK's vhost target exited early ({status}); its log ends:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!("SPDK's vhost target did not open {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Spdk {
    fn drop(&mut self) {
        // A stopped process takes SIGKILL all the same.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SPDK's JSON configuration: the two devices and a vhost-blk controller
/// on each.
fn config() -> String {
    let blocks = DEVICE_BYTES / BLOCK;
    let bdev = |method: &str, name: &str| {
        serde_json::json!({
            "method": method,
            "params": {"name": name, "num_blocks": blocks, "block_size": BLOCK},
        })
    };
    let ctrlr = |ctrlr: &str, dev: &str| {
        serde_json::json!({
            "method": "vhost_create_blk_controller",
            "params": {"ctrlr": ctrlr, "dev_name": dev},
        })
    };
    serde_json::json!({
        "subsystems": [
            {"subsystem": "bdev", "config": [
                bdev("bdev_malloc_create", "Malloc0"),
                bdev("bdev_null_create", "Null0"),
            ]},
            {"subsystem": "vhost_blk", "config": [
                ctrlr("vhost.malloc", "Malloc0"),
                ctrlr("vhost.null", "Null0"),
            ]},
        ]
    })
    .to_string()
}

/// Whether free huge pages cover `mib` and a hugetlbfs is mounted, as
/// SPDK's environment needs (its `--no-huge` mode exists, but copies into
/// and out of guest memory then crawl: 40k IOPS instead of 767k here).
fn hugepages_enough(mib: u64) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    hugepages_cover(&meminfo, &mounts, mib)
}

/// [`hugepages_enough`] from the texts of `/proc/meminfo` and
/// `/proc/mounts`.
fn hugepages_cover(meminfo: &str, mounts: &str, mib: u64) -> bool {
    let mounted = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"));
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    match (field("HugePages_Free:"), field("Hugepagesize:")) {
        (Some(free), Some(kib)) => mounted && free.saturating_mul(kib) >= mib * 1024,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_serves_both_devices_at_the_volume_size() {
        let c: serde_json::Value = serde_json::from_str(&config()).expect("json");
        let subsystems = c["subsystems"].as_array().expect("subsystems");
        let bdevs = &subsystems[0]["config"];
        for (i, (method, name)) in [
            ("bdev_malloc_create", "Malloc0"),
            ("bdev_null_create", "Null0"),
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(bdevs[i]["method"], method);
            assert_eq!(bdevs[i]["params"]["name"], name);
            let blocks = bdevs[i]["params"]["num_blocks"].as_u64().expect("blocks");
            let size = bdevs[i]["params"]["block_size"].as_u64().expect("size");
            assert_eq!(blocks * size, 1 << 30);
        }
        let ctrlrs = &subsystems[1]["config"];
        assert_eq!(ctrlrs[0]["params"]["ctrlr"], "vhost.malloc");
        assert_eq!(ctrlrs[0]["params"]["dev_name"], "Malloc0");
        assert_eq!(ctrlrs[1]["params"]["ctrlr"], "vhost.null");
        assert_eq!(ctrlrs[1]["params"]["dev_name"], "Null0");
    }

    #[test]
    fn huge_pages_must_be_free_and_mounted() {
        let mounted = "nodev /dev/hugepages hugetlbfs rw,relatime 0 0\n";
        let info = |free: u64| {
            format!("HugePages_Total: 900\nHugePages_Free: {free}\nHugepagesize: 2048 kB\n")
        };
        assert!(hugepages_cover(&info(768), mounted, 1536));
        assert!(!hugepages_cover(&info(767), mounted, 1536));
        assert!(!hugepages_cover(
            &info(800),
            "proc /proc proc rw 0 0\n",
            1536
        ));
        assert!(!hugepages_cover("", mounted, 1536));
    }
}
