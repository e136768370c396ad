//! A provider network for tests: a region (processes on a throwaway etcd,
//! or one on the embedded store), card daemons as hosts with their own
//! directories and devices, and the CLI as a tenant and as the admin.

use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use softcard_region::throwaway_etcd::ThrowawayEtcd;

use super::BIN;

/// Hosts' lease in these tests.
pub const LEASE_SECONDS: u64 = 3;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let begin = Instant::now();
    while !f() {
        assert!(begin.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct Net {
    pub dir: tempfile::TempDir,
    pub regions: Vec<(Proc, String)>,
    pub cards: Vec<Option<Proc>>,
    pub admin: PathBuf,
    pub tenant: PathBuf,
    pub store: String,
    _etcd: Option<ThrowawayEtcd>,
}

impl Drop for Net {
    /// VMs outlive their card daemon by design: a failed test ends its own
    /// (found by their pid files under this test's directory).
    fn drop(&mut self) {
        for n in 0..self.cards.len() {
            let dir = self.card_dir(n).join("host/instances");
            for d in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if let Ok(pid) = std::fs::read_to_string(d.path().join("qemu.pid")) {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        // SAFETY: signalling a QEMU this test's hosts started.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
        }
    }
}

impl Net {
    fn region_proc(dir: &Path, store: &str, admin: &Path, n: usize, port: u16) -> (Proc, String) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("region{n}.log")))
            .unwrap();
        let child = Command::new(BIN)
            .args(["region", "serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--store", store, "--admin-credential"])
            .arg(admin)
            .args(["--host-lease-seconds", &LEASE_SECONDS.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let p = Proc(child);
        wait_until("region answers", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        (p, url)
    }

    pub fn start(etcd: bool) -> Net {
        let dir = tempfile::tempdir().unwrap();
        let admin = dir.path().join("admin.credential");
        let (store, etcd, regions) = if etcd {
            let e = ThrowawayEtcd::start(false).expect("etcd (package etcd-server)");
            (format!("etcd:{}", e.url), Some(e), 2)
        } else {
            (
                format!("redb:{}", dir.path().join("region.redb").display()),
                None,
                1,
            )
        };
        let mut net = Net {
            regions: Vec::new(),
            cards: Vec::new(),
            admin: admin.clone(),
            tenant: dir.path().join("acme.credential"),
            store: store.clone(),
            dir,
            _etcd: etcd,
        };
        for n in 0..regions {
            let r = Self::region_proc(net.dir.path(), &store, &admin, n, free_port());
            net.regions.push(r);
        }
        net.cli_ok(&net.admin, &["tenant", "create", "acme"]);
        let t = net.cli_ok(&net.admin, &["tenant", "credential", "acme"]);
        std::fs::write(&net.tenant, t).unwrap();
        for h in ["h1", "h2"] {
            let c = net.cli_ok(&net.admin, &["host", "credential", h]);
            std::fs::write(net.dir.path().join(format!("{h}.credential")), c).unwrap();
            let cdir = net.dir.path().join(h);
            std::fs::create_dir_all(&cdir).unwrap();
            // Tenant acme's key-encryption key, for its encrypted volumes.
            std::fs::write(cdir.join("acme.kek"), "5a".repeat(32)).unwrap();
            // Each card its own RDMA control socket: a daemon refuses one
            // another daemon answers on.
            std::fs::write(
                cdir.join("card.toml"),
                format!(
                    "api_socket = \"{d}/api.sock\"\nrdma_socket = \"{d}/rdma.sock\"\n[[device]]\nname = \"nvme0\"\nkind = \"file\"\npath = \"{d}/nvme0.img\"\nsize = \"1GiB\"\n[[tenant]]\nname = \"acme\"\nkek_file = \"{d}/acme.kek\"\n[host]\nname = \"{h}\"\nvcpus = 2\nmemory = \"2GiB\"\n",
                    d = cdir.display()
                ),
            )
            .unwrap();
            net.cards.push(None);
        }
        net.start_card(0);
        net.start_card(1);
        net
    }

    /// Kills the last region process and starts a new one on the same
    /// address and store.
    pub fn restart_region(&mut self) {
        let (mut p, url) = self.regions.pop().unwrap();
        p.kill();
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        let n = self.regions.len();
        let r = Self::region_proc(self.dir.path(), &self.store, &self.admin, n, port);
        self.regions.push(r);
    }

    pub fn url(&self) -> &str {
        &self.regions.last().unwrap().1
    }

    pub fn host_name(n: usize) -> &'static str {
        ["h1", "h2"][n]
    }

    pub fn card_dir(&self, n: usize) -> PathBuf {
        self.dir.path().join(Self::host_name(n))
    }

    pub fn start_card(&mut self, n: usize) {
        let h = Self::host_name(n);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.card_dir(n).join("card.log"))
            .unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(self.card_dir(n).join("card.toml"))
            .args(["--region", self.url(), "--region-credential"])
            .arg(self.dir.path().join(format!("{h}.credential")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.cards[n] = Some(Proc(child));
        wait_until(&format!("host {h} up"), Duration::from_secs(20), || {
            self.hosts()
                .iter()
                .any(|x| x["name"] == h && x["state"] == "up")
        });
    }

    pub fn cli(&self, cred: &Path, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("SOFTCARD_REGION", self.url())
            .env("SOFTCARD_CREDENTIAL_FILE", cred)
            .env_remove("SOFTCARD_CREDENTIAL")
            .output()
            .unwrap()
    }

    pub fn cli_ok(&self, cred: &Path, args: &[&str]) -> String {
        let out = self.cli(cred, args);
        assert!(
            out.status.success(),
            "softcard {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn t(&self, args: &[&str]) -> String {
        self.cli_ok(&self.tenant, args)
    }

    pub fn t_fails(&self, args: &[&str]) -> String {
        let out = self.cli(&self.tenant, args);
        assert!(!out.status.success(), "softcard {args:?} succeeded");
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn json(&self, cred: &Path, args: &[&str]) -> Value {
        serde_json::from_str(&self.cli_ok(cred, args)).unwrap()
    }

    pub fn hosts(&self) -> Vec<Value> {
        let out = self.cli(&self.admin, &["host", "list", "--json"]);
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    pub fn instance(&self, name: &str) -> Value {
        self.json(&self.tenant, &["instance", "show", name])
    }

    pub fn state(&self, name: &str) -> String {
        self.instance(name)["state"]["name"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn wait_state(&self, name: &str, state: &str) {
        wait_until(&format!("{name} {state}"), Duration::from_secs(60), || {
            self.state(name) == state
        });
    }

    pub fn console(&self, name: &str) -> String {
        self.t(&["instance", "console-output", name])
    }

    pub fn wait_console(&self, name: &str, text: &str) {
        wait_until(
            &format!("{name}'s console shows {text:?}"),
            Duration::from_secs(90),
            || self.console(name).contains(text),
        );
    }

    /// Waits for a whole console line (one the guest has ended with a
    /// newline) starting with `prefix`; the rest of that line. The console
    /// can end mid-line while the guest is still writing one.
    pub fn wait_console_line(&self, name: &str, prefix: &str) -> String {
        let mut found = None;
        wait_until(
            &format!("{name}'s console shows a whole line {prefix:?}"),
            Duration::from_secs(90),
            || {
                found = self
                    .console(name)
                    .split_inclusive('\n')
                    .filter(|l| l.ends_with('\n'))
                    .find_map(|l| l.strip_prefix(prefix).map(|r| r.trim_end().to_owned()));
                found.is_some()
            },
        );
        found.unwrap_or_default()
    }

    pub fn volume(&self, name: &str) -> Value {
        self.json(&self.tenant, &["volume", "show", name])
    }

    /// The first bytes of a region volume, read on its host's device file
    /// at the offset the card reports.
    pub fn device_bytes(&self, vol_id: &str, host: usize, len: usize) -> Vec<u8> {
        let off = self
            .card_volume_list(host)
            .into_iter()
            .find(|v| v["name"] == vol_id)
            .unwrap_or_else(|| panic!("volume {vol_id} not on host {host}"))["offset_bytes"]
            .as_u64()
            .unwrap();
        let mut f = std::fs::File::open(self.card_dir(host).join("nvme0.img")).unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        let mut b = vec![0; len];
        f.read_exact(&mut b).unwrap();
        b
    }

    pub fn card_volume_list(&self, host: usize) -> Vec<Value> {
        let out = Command::new(BIN)
            .args(["card", "volume", "list", "--json", "--api"])
            .arg(self.card_dir(host).join("api.sock"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array().unwrap().clone()
    }

    pub fn card_volumes(&self, host: usize) -> Vec<String> {
        self.card_volume_list(host)
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_owned())
            .collect()
    }
}
