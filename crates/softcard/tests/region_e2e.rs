//! The provider network end to end through the CLI, with real peers: a
//! region (on etcd with two region processes, and on the embedded store),
//! two card daemons as two hosts (separate data directories and devices),
//! instances booted as QEMU guests on each, data volumes hot-plugged and
//! unplugged, the bytes the guests wrote checked on the devices at the
//! volumes' offsets, stop/start/terminate, a host's daemon killed and
//! restarted, a region process killed.
//!
//! Needs root, qemu-system-x86, linux-image-amd64, busybox-static and
//! etcd-server (the README's test command installs them).

use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use softcard_region::throwaway_etcd::ThrowawayEtcd;

const BIN: &str = env!("CARGO_BIN_EXE_softcard");
/// Hosts' lease in these tests.
const LEASE_SECONDS: u64 = 3;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
struct Proc(Child);

impl Proc {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let begin = Instant::now();
    while !f() {
        assert!(begin.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Net {
    dir: tempfile::TempDir,
    regions: Vec<(Proc, String)>,
    cards: Vec<Option<Proc>>,
    admin: PathBuf,
    tenant: PathBuf,
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
    fn region_proc(dir: &Path, store: &str, admin: &Path, n: usize) -> (Proc, String) {
        let port = free_port();
        let log = std::fs::File::create(dir.join(format!("region{n}.log"))).unwrap();
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

    fn start(etcd: bool) -> Net {
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
            dir,
            _etcd: etcd,
        };
        for n in 0..regions {
            let r = Self::region_proc(net.dir.path(), &store, &admin, n);
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
            std::fs::write(
                cdir.join("card.toml"),
                format!(
                    "api_socket = \"{d}/api.sock\"\n[[device]]\nname = \"nvme0\"\nkind = \"file\"\npath = \"{d}/nvme0.img\"\nsize = \"1GiB\"\n[host]\nname = \"{h}\"\nvcpus = 2\nmemory = \"2GiB\"\n",
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

    fn url(&self) -> &str {
        &self.regions.last().unwrap().1
    }

    fn host_name(n: usize) -> &'static str {
        ["h1", "h2"][n]
    }

    fn card_dir(&self, n: usize) -> PathBuf {
        self.dir.path().join(Self::host_name(n))
    }

    fn start_card(&mut self, n: usize) {
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

    fn cli(&self, cred: &Path, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("SOFTCARD_REGION", self.url())
            .env("SOFTCARD_CREDENTIAL_FILE", cred)
            .env_remove("SOFTCARD_CREDENTIAL")
            .output()
            .unwrap()
    }

    fn cli_ok(&self, cred: &Path, args: &[&str]) -> String {
        let out = self.cli(cred, args);
        assert!(
            out.status.success(),
            "softcard {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn t(&self, args: &[&str]) -> String {
        self.cli_ok(&self.tenant, args)
    }

    fn t_fails(&self, args: &[&str]) -> String {
        let out = self.cli(&self.tenant, args);
        assert!(!out.status.success(), "softcard {args:?} succeeded");
        String::from_utf8(out.stderr).unwrap()
    }

    fn json(&self, cred: &Path, args: &[&str]) -> Value {
        serde_json::from_str(&self.cli_ok(cred, args)).unwrap()
    }

    fn hosts(&self) -> Vec<Value> {
        let out = self.cli(&self.admin, &["host", "list", "--json"]);
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    fn instance(&self, name: &str) -> Value {
        self.json(&self.tenant, &["instance", "show", name])
    }

    fn state(&self, name: &str) -> String {
        self.instance(name)["state"]["name"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn wait_state(&self, name: &str, state: &str) {
        wait_until(&format!("{name} {state}"), Duration::from_secs(60), || {
            self.state(name) == state
        });
    }

    fn console(&self, name: &str) -> String {
        self.t(&["instance", "console-output", name])
    }

    fn wait_console(&self, name: &str, text: &str) {
        wait_until(
            &format!("{name}'s console shows {text:?}"),
            Duration::from_secs(90),
            || self.console(name).contains(text),
        );
    }

    fn volume(&self, name: &str) -> Value {
        self.json(&self.tenant, &["volume", "show", name])
    }

    /// The first bytes of a region volume, read on its host's device file
    /// at the offset the card reports.
    fn device_bytes(&self, vol_id: &str, host: usize, len: usize) -> Vec<u8> {
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

    fn card_volume_list(&self, host: usize) -> Vec<Value> {
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

    fn card_volumes(&self, host: usize) -> Vec<String> {
        self.card_volume_list(host)
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn qemu_running(id: &str) -> bool {
    let out = Command::new("pgrep")
        .args(["-f", &format!("qemu-system-x86_64 -name {id}")])
        .output()
        .unwrap();
    out.status.success()
}

fn host_of(net: &Net, name: &str) -> usize {
    match net.instance(name)["host"].as_str().unwrap() {
        "h1" => 0,
        _ => 1,
    }
}

fn stamp(dev: &str, id: &str) -> Vec<u8> {
    format!("SOFTCARD-DEMO {dev} {id}\n").into_bytes()
}

fn provider_network(etcd: bool) {
    let mut net = Net::start(etcd);
    // Two instances spread over the two hosts.
    net.t(&[
        "instance",
        "create",
        "web1",
        "--type",
        "sc1.small",
        "--volume-size",
        "128MiB",
    ]);
    net.t(&[
        "instance",
        "create",
        "web2",
        "--type",
        "sc1.small",
        "--volume-size",
        "128MiB",
    ]);
    let (h1, h2) = (host_of(&net, "web1"), host_of(&net, "web2"));
    assert_ne!(
        h1,
        h2,
        "the two instances share a host: {}",
        net.t(&["instance", "list"])
    );
    for name in ["web1", "web2"] {
        net.wait_state(name, "running");
        assert_eq!(net.instance(name)["state"]["code"], 16);
        net.wait_console(name, "disk vda stamped");
    }
    // The guests wrote their boot volumes: the bytes are on each host's
    // device at the boot volume's offset.
    for (name, host) in [("web1", h1), ("web2", h2)] {
        let i = net.instance(name);
        let id = i["id"].as_str().unwrap();
        let boot = i["boot_volume"].as_str().unwrap();
        let want = stamp("vda", id);
        assert_eq!(
            net.device_bytes(boot, host, want.len()),
            want,
            "{name}'s boot volume"
        );
    }
    // A data volume per instance, hot-plugged; the guest sees and writes it.
    net.t(&[
        "volume", "create", "d1", "--size", "32MiB", "--near", "web1",
    ]);
    net.t(&[
        "volume", "create", "d2", "--size", "32MiB", "--near", "web2",
    ]);
    wait_until("volumes available", Duration::from_secs(20), || {
        net.volume("d1")["state"] == "available" && net.volume("d2")["state"] == "available"
    });
    // A volume on another host, and a stopped instance, are clear errors.
    let e = net.t_fails(&["volume", "attach", "d1", "--instance", "web2"]);
    assert!(
        e.contains("attaches only to an instance on its own host"),
        "{e}"
    );
    net.t(&["volume", "attach", "d1", "--instance", "web1"]);
    net.t(&["volume", "attach", "d2", "--instance", "web2"]);
    for (name, vol, host) in [("web1", "d1", h1), ("web2", "d2", h2)] {
        net.wait_console(name, "disk vdb stamped");
        let v = net.volume(vol);
        assert_eq!(v["state"], "in-use");
        assert_eq!(v["attachment"]["state"], "attached");
        let id = net.instance(name)["id"].as_str().unwrap().to_owned();
        let want = stamp("vdb", &id);
        assert_eq!(
            net.device_bytes(v["id"].as_str().unwrap(), host, want.len()),
            want
        );
    }
    // Detach: the guest no longer sees it.
    net.t(&["volume", "detach", "d1"]);
    net.wait_console("web1", "disk vdb gone");
    wait_until("d1 available", Duration::from_secs(20), || {
        net.volume("d1")["state"] == "available"
    });
    // Stop and start: the VM goes and comes back on the same volumes.
    let web1_id = net.instance("web1")["id"].as_str().unwrap().to_owned();
    net.t(&["instance", "stop", "web1"]);
    net.wait_state("web1", "stopped");
    assert_eq!(net.instance("web1")["state"]["code"], 80);
    assert!(!qemu_running(&web1_id), "a stopped instance's QEMU runs");
    let e = net.t_fails(&["volume", "attach", "d1", "--instance", "web1"]);
    assert!(e.contains("stopped"), "{e}");
    net.t(&["instance", "start", "web1"]);
    net.wait_state("web1", "running");
    assert!(qemu_running(&web1_id));

    // The card daemon of web2's host dies: web2 is impaired after the
    // lease; the daemon comes back, adopts its VM, and web2 is healthy.
    net.cards[h2].as_mut().unwrap().kill();
    wait_until("web2 impaired", Duration::from_secs(30), || {
        net.instance("web2")["health"] == "impaired"
    });
    assert_eq!(net.state("web2"), "running");
    let down = net.hosts();
    let hd = down
        .iter()
        .find(|x| x["name"] == Net::host_name(h2))
        .unwrap();
    assert_eq!(hd["state"], "down");
    net.start_card(h2);
    wait_until("web2 healthy", Duration::from_secs(30), || {
        net.instance("web2")["health"] == "ok"
    });
    // Its guest still reaches its disks: d2 comes off cleanly.
    net.t(&["volume", "detach", "d2"]);
    net.wait_console("web2", "disk vdb gone");

    if etcd {
        // One of the two region processes dies: the other serves and
        // takes over the leader's duties.
        let (mut first, _) = net.regions.remove(0);
        first.kill();
        let admin = softcard_region::client::RegionClient::new(
            net.url(),
            std::fs::read_to_string(&net.admin).unwrap().trim(),
            None,
        )
        .unwrap();
        wait_until("the other region leads", Duration::from_secs(20), || {
            admin.get("/v1/region").is_ok_and(|r| r["leading"] == true)
        });
        net.t(&[
            "volume", "create", "d3", "--size", "16MiB", "--near", "web1",
        ]);
        wait_until("d3 available", Duration::from_secs(20), || {
            net.volume("d3")["state"] == "available"
        });
    }

    // Terminate: no QEMU, no boot volume left on the cards, the data
    // volumes stay available.
    let web2_id = net.instance("web2")["id"].as_str().unwrap().to_owned();
    let boots: Vec<String> = ["web1", "web2"]
        .iter()
        .map(|n| net.instance(n)["boot_volume"].as_str().unwrap().to_owned())
        .collect();
    net.t(&["instance", "terminate", "web1"]);
    net.t(&["instance", "terminate", "web2"]);
    // A terminated instance's name is free again: it is found by id.
    net.wait_state(&web1_id, "terminated");
    net.wait_state(&web2_id, "terminated");
    assert_eq!(net.instance(&web1_id)["state"]["code"], 48);
    assert!(!qemu_running(&web1_id) && !qemu_running(&web2_id));
    assert!(net
        .t_fails(&["instance", "show", "web1"])
        .contains("no instance web1"));
    for (h, b) in [(h1, &boots[0]), (h2, &boots[1])] {
        assert!(
            !net.card_volumes(h).contains(b),
            "boot volume {b} left on the card"
        );
    }
    assert_eq!(net.volume("d1")["state"], "available");
    assert_eq!(net.volume("d2")["state"], "available");
    let d1 = net.volume("d1")["id"].as_str().unwrap().to_owned();
    net.t(&["volume", "delete", "d1"]);
    wait_until("d1 deleted", Duration::from_secs(20), || {
        !net.card_volumes(h1).contains(&d1) && !net.t(&["volume", "list"]).contains(&d1)
    });
}

#[test]
fn provider_network_on_etcd() {
    provider_network(true);
}

#[test]
fn provider_network_on_the_embedded_store() {
    provider_network(false);
}
