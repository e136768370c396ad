//! The region's API end to end over HTTP, with simulated hosts (no QEMU):
//! credentials on every endpoint, tenant isolation, placement races for
//! the last room, idempotent creates, bad input, the lifecycle as hosts
//! report it, lease expiry. Each test runs on both stores.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use softcard_region::client::RegionClient;
use softcard_region::server::{Background, ServeOptions};
use softcard_region::throwaway_etcd::ThrowawayEtcd;

/// Stops a simulated host's heartbeats when dropped.
struct Beat(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for Beat {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

struct Region {
    beats: std::sync::Mutex<Vec<std::sync::Arc<std::sync::atomic::AtomicBool>>>,
    bg: Background,
    admin: RegionClient,
    _dir: tempfile::TempDir,
    _etcd: Option<ThrowawayEtcd>,
}

fn region(etcd: bool, host_lease: Duration) -> Region {
    let dir = tempfile::tempdir().unwrap();
    let (store, etcd) = if etcd {
        let e = ThrowawayEtcd::start(false).expect("etcd (package etcd-server)");
        (format!("etcd:{}", e.url), Some(e))
    } else {
        (
            format!("redb:{}", dir.path().join("region.redb").display()),
            None,
        )
    };
    let mut opts = ServeOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        store,
        dir.path().join("admin.credential"),
    );
    opts.host_lease = host_lease;
    let bg = Background::start(opts, 2).unwrap();
    // The admin credential file is the operator's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("admin.credential"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let admin = RegionClient::new(&bg.url(), &bg.admin, None).unwrap();
    Region {
        beats: std::sync::Mutex::default(),
        bg,
        admin,
        _dir: dir,
        _etcd: etcd,
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        for b in self.beats.lock().unwrap().iter() {
            b.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Region {
    fn client(&self, credential: &str) -> RegionClient {
        RegionClient::new(&self.bg.url(), credential, None).unwrap()
    }

    fn tenant(&self, name: &str) -> RegionClient {
        self.admin
            .post("/v1/tenants", &json!({"name": name}))
            .unwrap();
        let c = self
            .admin
            .post(&format!("/v1/tenants/{name}/credentials"), &json!({}))
            .unwrap();
        self.client(c["credential"].as_str().unwrap())
    }

    /// A simulated host: registered with `vcpus`, 4 GiB, one 8 GiB device,
    /// heartbeating until the region is dropped.
    fn host(&self, name: &str, vcpus: u32) -> RegionClient {
        self.host_with_beat(name, vcpus).0
    }

    fn host_with_beat(&self, name: &str, vcpus: u32) -> (RegionClient, Beat) {
        let c = self
            .admin
            .post(&format!("/v1/hosts/{name}/credentials"), &json!({}))
            .unwrap();
        let h = self.client(c["credential"].as_str().unwrap());
        h.call(
            "PUT",
            "/v1/agent/register",
            Some(&json!({"vcpus": vcpus, "memory_mib": 4096,
                "devices": [{"name": "nvme0", "capacity_bytes": 8u64 << 30}]})),
        )
        .unwrap();
        wait_until(|| {
            self.admin
                .get("/v1/hosts")
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["name"] == name && x["state"] == "up")
        });
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (h, stop) = (h.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = h.post("/v1/agent/heartbeat", &json!({}));
                    std::thread::sleep(Duration::from_millis(300));
                }
            });
        }
        self.beats.lock().unwrap().push(stop.clone());
        (h, Beat(stop))
    }
}

fn wait_until(mut f: impl FnMut() -> bool) {
    let begin = Instant::now();
    while !f() {
        assert!(
            begin.elapsed() < Duration::from_secs(30),
            "condition not met in 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status(r: Result<Value, softcard_region::client::ClientError>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(e) => e.status().unwrap_or(0),
    }
}

fn create(t: &RegionClient, name: &str) -> Result<Value, softcard_region::client::ClientError> {
    t.post(
        "/v1/instances",
        &json!({"name": name, "type": "sc1.small", "image": "default", "volume_size": "256MiB"}),
    )
}

fn credentials_and_isolation(r: &Region) {
    let acme = r.tenant("acme");
    let globex = r.tenant("globex");
    let h1 = r.host("h1", 8);
    let i = create(&acme, "web1").unwrap();
    let id = i["id"].as_str().unwrap().to_owned();
    assert_eq!(i["state"], json!({"code": 0, "name": "pending"}));
    let vol = acme
        .post(
            "/v1/volumes",
            &json!({"name": "data1", "size": "64MiB", "near": "web1"}),
        )
        .unwrap();
    let vid = vol["id"].as_str().unwrap().to_owned();
    assert_eq!(vol["host"], "h1");

    let nobody = r.client("");
    let wrong = r.client(&format!("sc_{}", "0".repeat(64)));
    let get = |c: &RegionClient, p: &str| status(c.get(p));
    let post = |c: &RegionClient, p: &str| status(c.post(p, &json!({})));
    // (method, path) of every API call.
    let calls: Vec<(&str, String)> = vec![
        ("GET", "/v1/whoami".into()),
        ("GET", "/v1/region".into()),
        ("GET", "/v1/instance-types".into()),
        ("GET", "/v1/images".into()),
        ("GET", "/v1/tenants".into()),
        ("POST", "/v1/tenants".into()),
        ("POST", "/v1/tenants/acme/credentials".into()),
        ("GET", "/v1/hosts".into()),
        ("POST", "/v1/hosts/h9/credentials".into()),
        ("GET", "/v1/instances".into()),
        ("POST", "/v1/instances".into()),
        ("GET", format!("/v1/instances/{id}")),
        ("GET", format!("/v1/instances/{id}/console")),
        ("POST", format!("/v1/instances/{id}/stop")),
        ("GET", "/v1/volumes".into()),
        ("POST", "/v1/volumes".into()),
        ("GET", format!("/v1/volumes/{vid}")),
        ("DELETE", format!("/v1/volumes/{vid}")),
        ("POST", format!("/v1/volumes/{vid}/attach")),
        ("POST", format!("/v1/volumes/{vid}/detach")),
        ("PUT", "/v1/agent/register".into()),
        ("POST", "/v1/agent/heartbeat".into()),
        ("GET", "/v1/agent/work".into()),
        ("POST", format!("/v1/agent/instances/{id}/status")),
        ("PUT", format!("/v1/agent/instances/{id}/console")),
        ("POST", format!("/v1/agent/volumes/{vid}/status")),
        ("GET", "/v1/gpu-servers".into()),
        ("POST", "/v1/gpu-servers/g1/credentials".into()),
        ("PUT", "/v1/agent/gpu/register".into()),
        ("POST", "/v1/agent/gpu/heartbeat".into()),
    ];
    for (m, p) in &calls {
        let body = (*m != "GET").then(|| json!({}));
        assert_eq!(
            status(nobody.call(m, p, body.as_ref())),
            401,
            "{m} {p} without a credential"
        );
        assert_eq!(
            status(wrong.call(m, p, body.as_ref())),
            401,
            "{m} {p} with a wrong credential"
        );
    }
    // Admin-only calls refuse tenants and hosts.
    for p in ["/v1/tenants", "/v1/hosts", "/v1/region"] {
        assert_eq!(get(&acme, p), 403, "tenant on GET {p}");
        assert_eq!(get(&h1, p), 403, "host on GET {p}");
    }
    for p in [
        "/v1/tenants",
        "/v1/tenants/acme/credentials",
        "/v1/hosts/h9/credentials",
    ] {
        assert_eq!(post(&acme, p), 403, "tenant on POST {p}");
    }
    // Agent calls refuse tenants; tenant calls refuse hosts.
    assert_eq!(get(&acme, "/v1/agent/work"), 403);
    assert_eq!(post(&acme, "/v1/agent/heartbeat"), 403);
    assert_eq!(get(&h1, "/v1/instances"), 403);
    // Another tenant's ids and names are not found, on every call.
    for p in [
        format!("/v1/instances/{id}"),
        format!("/v1/instances/{id}/console"),
        "/v1/instances/web1".into(),
        format!("/v1/volumes/{vid}"),
        "/v1/volumes/data1".into(),
    ] {
        assert_eq!(get(&globex, &p), 404, "globex GET {p}");
    }
    for a in ["stop", "start", "reboot", "terminate"] {
        assert_eq!(
            post(&globex, &format!("/v1/instances/{id}/{a}")),
            404,
            "globex {a}"
        );
    }
    assert_eq!(
        status(globex.call("DELETE", &format!("/v1/volumes/{vid}"), None)),
        404
    );
    assert_eq!(post(&globex, &format!("/v1/volumes/{vid}/detach")), 404);
    assert_eq!(
        status(globex.post(
            &format!("/v1/volumes/{vid}/attach"),
            &json!({"instance": id})
        )),
        404
    );
    assert!(globex
        .get("/v1/instances")
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
    assert!(globex
        .get("/v1/volumes")
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
    // The admin sees everything.
    assert_eq!(
        r.admin
            .get("/v1/instances")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A host sees only its own work and reports only on its own things.
    let h2 = r.host("h2", 8);
    assert!(h2.get("/v1/agent/work").unwrap()["instances"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        status(h2.post(
            &format!("/v1/agent/instances/{id}/status"),
            &json!({"state": "running"})
        )),
        404
    );
    assert_eq!(
        h1.get("/v1/agent/work").unwrap()["instances"][0]["id"],
        id.as_str()
    );
}

/// GPU servers register their adapters as resource providers under a
/// lease; only the admin lists them; only a GPU server's credential
/// registers one.
fn gpu_servers(r: &Region) {
    let c = r
        .admin
        .post("/v1/gpu-servers/g1/credentials", &json!({}))
        .unwrap();
    let g = r.client(c["credential"].as_str().unwrap());
    let offer = |endpoint: &str| {
        json!({"endpoint": endpoint, "adapters": [{"name": "llvmpipe", "backend": "Vulkan",
            "device_type": "Cpu", "memory_bytes": 8u64 << 30, "traits": ["CUSTOM_CPU"]}]})
    };
    assert_eq!(
        status(g.call("PUT", "/v1/agent/gpu/register", Some(&offer("nonsense")))),
        400
    );
    let no_adapters = json!({"endpoint": "127.0.0.1:7070", "adapters": []});
    assert_eq!(
        status(g.call("PUT", "/v1/agent/gpu/register", Some(&no_adapters))),
        400
    );
    g.call(
        "PUT",
        "/v1/agent/gpu/register",
        Some(&offer("127.0.0.1:7070")),
    )
    .unwrap();
    g.post("/v1/agent/gpu/heartbeat", &json!({})).unwrap();
    let list = r.admin.get("/v1/gpu-servers").unwrap();
    let g1 = &list.as_array().unwrap()[0];
    assert_eq!(
        (g1["name"].as_str(), g1["state"].as_str()),
        (Some("g1"), Some("up"))
    );
    assert_eq!(g1["adapters"][0]["free_bytes"], 8u64 << 30);
    // Hosts and tenants cannot register GPUs, nor list them; a GPU server
    // reaches nothing else.
    let t = r.tenant("gputenant");
    assert_eq!(status(t.get("/v1/gpu-servers")), 403);
    assert_eq!(
        status(t.call("PUT", "/v1/agent/gpu/register", Some(&offer("127.0.0.1:1")))),
        403
    );
    assert_eq!(status(g.get("/v1/instances")), 403);
    assert_eq!(status(g.get("/v1/agent/work")), 403);
    assert_eq!(status(g.get("/v1/gpu-servers")), 403);
}

fn bad_input(r: &Region) {
    let t = r.tenant("bad");
    let mk = |body: Value| status(t.post("/v1/instances", &body));
    let base =
        json!({"name": "ok", "type": "sc1.small", "image": "default", "volume_size": "256MiB"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    assert_eq!(mk(with("name", json!("Bad_Name"))), 400);
    assert_eq!(mk(with("name", json!("../x"))), 400);
    assert_eq!(mk(with("type", json!("m5.huge"))), 400);
    assert_eq!(mk(with("image", json!("windows"))), 400);
    assert_eq!(mk(with("volume_size", json!("lots"))), 400);
    assert_eq!(mk(with("volume_size", json!("1KiB"))), 400);
    assert_eq!(mk(with("volume_size", json!("100TiB"))), 400);
    assert_eq!(mk(with("surprise", json!(1))), 400);
    assert_eq!(status(t.call("POST", "/v1/instances", None)), 400);
    assert_eq!(
        status(r.admin.post("/v1/tenants", &json!({"name": "UPPER"}))),
        400
    );
    assert_eq!(
        status(r.admin.post("/v1/tenants", &json!({"name": "bad"}))),
        409
    );
    assert_eq!(
        status(t.post("/v1/instances/i-0000000000000000/explode", &json!({}))),
        404
    );
    // No host is up with room for this one.
    assert_eq!(
        status(t.post("/v1/volumes", &json!({"name": "huge", "size": "1TiB"}))),
        503
    );
    // Nothing was left behind by the failures.
    assert!(t
        .get("/v1/instances")
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
    assert!(t.get("/v1/volumes").unwrap().as_array().unwrap().is_empty());
}

/// A simulated host runs what it is given: pending -> running, and so on.
fn agent_pass(h: &RegionClient) {
    let work = h.get("/v1/agent/work").unwrap();
    for v in work["volumes"].as_array().unwrap() {
        let id = v["id"].as_str().unwrap();
        let rep = match v["state"].as_str().unwrap() {
            "creating" => json!({"state": "available"}),
            "deleting" => json!({"state": "deleted"}),
            _ => match v["attachment"]["state"].as_str() {
                Some("attaching") => json!({"attachment": "attached"}),
                Some("detaching") => json!({"detached": true}),
                _ => continue,
            },
        };
        h.post(&format!("/v1/agent/volumes/{id}/status"), &rep)
            .unwrap();
    }
    for i in work["instances"].as_array().unwrap() {
        let id = i["id"].as_str().unwrap();
        let next = match i["state"].as_str().unwrap() {
            "pending" => "running",
            "stopping" => "stopped",
            "shutting-down" => "terminated",
            _ => continue,
        };
        h.post(
            &format!("/v1/agent/instances/{id}/status"),
            &json!({"state": next}),
        )
        .unwrap();
    }
}

fn lifecycle(r: &Region) {
    let t = r.tenant("life");
    let h = r.host("hl", 2);
    let i = t
        .post(
            "/v1/instances",
            &json!({"name": "a", "type": "sc1.medium", "volume_size": "1GiB", "client_token": "tok-1"}),
        )
        .unwrap();
    let id = i["id"].as_str().unwrap().to_owned();
    // The same client token returns the same instance.
    let again = t
        .post(
            "/v1/instances",
            &json!({"name": "a", "type": "sc1.medium", "volume_size": "1GiB", "client_token": "tok-1"}),
        )
        .unwrap();
    assert_eq!(again["id"], id.as_str());
    // The host is full (2 vCPUs): another is refused with a clear error.
    let e = create(&t, "b").unwrap_err();
    assert_eq!(e.status(), Some(503));
    assert!(e.to_string().contains("no capacity"), "{e}");
    // Stopping a pending instance, attaching to it: refused while not running.
    agent_pass(&h);
    let get = |p: &str| t.get(p).unwrap();
    assert_eq!(
        get(&format!("/v1/instances/{id}"))["state"]["name"],
        "running"
    );
    let v = t
        .post(
            "/v1/volumes",
            &json!({"name": "d", "size": "16MiB", "host": "hl"}),
        )
        .unwrap();
    let vid = v["id"].as_str().unwrap().to_owned();
    assert_eq!(
        status(t.post(
            &format!("/v1/volumes/{vid}/attach"),
            &json!({"instance": "a"})
        )),
        409,
        "attach to a volume still creating"
    );
    agent_pass(&h);
    t.post(
        &format!("/v1/volumes/{vid}/attach"),
        &json!({"instance": "a"}),
    )
    .unwrap();
    assert_eq!(
        status(t.call("DELETE", &format!("/v1/volumes/{vid}"), None)),
        409
    );
    agent_pass(&h);
    let v = get(&format!("/v1/volumes/{vid}"));
    assert_eq!(
        (v["state"].as_str(), v["attachment"]["state"].as_str()),
        (Some("in-use"), Some("attached"))
    );
    t.post(&format!("/v1/volumes/{vid}/detach"), &json!({}))
        .unwrap();
    agent_pass(&h);
    assert_eq!(get(&format!("/v1/volumes/{vid}"))["state"], "available");
    // Stop, attach refused, start, reboot, terminate.
    t.post(&format!("/v1/instances/{id}/stop"), &json!({}))
        .unwrap();
    assert_eq!(
        get(&format!("/v1/instances/{id}"))["state"]["name"],
        "stopping"
    );
    agent_pass(&h);
    assert_eq!(
        get(&format!("/v1/instances/{id}"))["state"],
        json!({"code": 80, "name": "stopped"})
    );
    let e = t
        .post(
            &format!("/v1/volumes/{vid}/attach"),
            &json!({"instance": "a"}),
        )
        .unwrap_err();
    assert!(e.to_string().contains("stopped"), "{e}");
    assert_eq!(
        status(t.post(&format!("/v1/instances/{id}/reboot"), &json!({}))),
        409
    );
    t.post(&format!("/v1/instances/{id}/start"), &json!({}))
        .unwrap();
    agent_pass(&h);
    assert_eq!(
        get(&format!("/v1/instances/{id}"))["state"]["name"],
        "running"
    );
    t.post(&format!("/v1/instances/{id}/reboot"), &json!({}))
        .unwrap();
    assert_eq!(get(&format!("/v1/instances/{id}"))["reboots"], 1);
    t.post(&format!("/v1/instances/{id}/terminate"), &json!({}))
        .unwrap();
    assert_eq!(
        get(&format!("/v1/instances/{id}"))["state"]["name"],
        "shutting-down"
    );
    agent_pass(&h);
    assert_eq!(
        get(&format!("/v1/instances/{id}"))["state"],
        json!({"code": 48, "name": "terminated"})
    );
    // Terminated: its room, its name and its boot volume are given back.
    let hosts = r.admin.get("/v1/hosts").unwrap();
    let hl = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "hl")
        .unwrap();
    assert_eq!(hl["vcpus_used"], 0);
    assert_eq!(
        hl["devices"][0]["used_bytes"],
        16u64 << 20,
        "only the data volume is left"
    );
    assert!(t
        .get("/v1/volumes")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["boot_of"].is_null()));
    let b = create(&t, "a").unwrap();
    assert_ne!(b["id"], id.as_str());
    // A terminate of a terminated instance is a no-op.
    t.post(&format!("/v1/instances/{id}/terminate"), &json!({}))
        .unwrap();
    // Delete the data volume.
    t.call("DELETE", &format!("/v1/volumes/{vid}"), None)
        .unwrap();
    agent_pass(&h);
    assert_eq!(status(t.get(&format!("/v1/volumes/{vid}"))), 200);
    assert!(t
        .get("/v1/volumes")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["id"] != vid.as_str()));
}

/// 16 clients race for a host with room for 5: exactly 5 win.
fn race_for_the_last_room(r: &Region) {
    let t = r.tenant("race");
    r.host("hr", 5);
    let wins = std::sync::atomic::AtomicUsize::new(0);
    let full = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for n in 0..16 {
            let t = &t;
            let (wins, full) = (&wins, &full);
            s.spawn(move || match create(t, &format!("r{n}")) {
                Ok(_) => {
                    wins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Err(e) => {
                    assert_eq!(e.status(), Some(503), "{e}");
                    full.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    assert_eq!(
        wins.load(std::sync::atomic::Ordering::SeqCst),
        5,
        "exactly as many as fit"
    );
    let on_hr = t
        .get("/v1/instances")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["host"] == "hr")
        .count();
    let hosts = r.admin.get("/v1/hosts").unwrap();
    let hr = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "hr")
        .unwrap();
    assert_eq!(hr["vcpus_used"], on_hr);
    assert_eq!(on_hr, 5);
    assert_eq!(full.load(std::sync::atomic::Ordering::SeqCst), 11);
}

fn lease_expiry(r: &Region) {
    let t = r.tenant("lease");
    let (h, beat) = r.host_with_beat("hx", 64);
    // The race filled hr: the instance lands on hx.
    let i = create(&t, "x").unwrap();
    assert_eq!(i["host"], "hx");
    let id = i["id"].as_str().unwrap().to_owned();
    agent_pass(&h);
    let health = |id: &str| t.get(&format!("/v1/instances/{id}")).unwrap()["health"].clone();
    assert_eq!(health(&id), "ok");
    // The host stops heartbeating: after its lease its instances are
    // impaired, the host is down with the time last seen.
    drop(beat);
    wait_until(|| health(&id) == "impaired");
    assert_eq!(
        t.get(&format!("/v1/instances/{id}")).unwrap()["state"]["name"],
        "running"
    );
    wait_until(|| {
        let hosts = r.admin.get("/v1/hosts").unwrap();
        let hx = hosts
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == "hx")
            .unwrap()
            .clone();
        hx["state"] == "down" && hx["last_seen"].is_u64()
    });
    assert_eq!(status(h.post("/v1/agent/heartbeat", &json!({}))), 404);
    // It registers again: healthy.
    h.call(
        "PUT",
        "/v1/agent/register",
        Some(&json!({"vcpus": 64, "memory_mib": 4096, "devices": [{"name": "nvme0", "capacity_bytes": 8u64 << 30}]})),
    )
    .unwrap();
    assert_eq!(health(&id), "ok");
    h.post("/v1/agent/heartbeat", &json!({})).unwrap();
}

fn gpu_server(r: &Region, name: &str) -> RegionClient {
    let c = r
        .admin
        .post(&format!("/v1/gpu-servers/{name}/credentials"), &json!({}))
        .unwrap();
    let g = r.client(c["credential"].as_str().unwrap());
    g.call(
        "PUT",
        "/v1/agent/gpu/register",
        Some(
            &json!({"endpoint": "127.0.0.1:7070", "adapters": [{"name": "gpu0", "backend": "Vulkan",
            "device_type": "DiscreteGpu", "memory_bytes": 8u64 << 30}]}),
        ),
    )
    .unwrap();
    // Keep it alive for the test (2 s lease).
    let beat = g.clone();
    std::thread::spawn(move || {
        while beat.post("/v1/agent/gpu/heartbeat", &json!({})).is_ok() {
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    g
}

fn free_gpu_bytes(r: &Region) -> Vec<u64> {
    let mut v: Vec<u64> = r
        .admin
        .get("/v1/gpu-servers")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["adapters"][0]["free_bytes"].as_u64().unwrap())
        .collect();
    v.sort_unstable();
    v
}

/// vGPUs: claimed with the host in one transaction (both or neither),
/// packed onto the fewest GPUs, given back at detach and terminate, and
/// never over-committed by racing clients.
fn vgpus(r: &Region) {
    let t = r.tenant("gfx");
    let other = r.tenant("other");
    r.host("hg", 64);
    let gpus = [gpu_server(r, "ga"), gpu_server(r, "gb")];
    // The GPU servers end the sessions of detaching vGPUs and say so.
    let gpu_pass = || {
        let mut n = 0;
        for g in &gpus {
            let w = g.get("/v1/agent/gpu/work").unwrap();
            let r = g
                .post(
                    "/v1/agent/gpu/released",
                    &json!({"attachments": w["releasing"]}),
                )
                .unwrap();
            n += r["released"].as_u64().unwrap();
        }
        n
    };
    let with_vgpu = |name: &str, ty: &str| {
        t.post(
            "/v1/instances",
            &json!({"name": name, "type": "sc1.micro", "volume_size": "64MiB", "vgpu": ty}),
        )
    };
    assert_eq!(status(with_vgpu("bad", "eg9.huge")), 400);
    // Packing: two 1 GiB vGPUs share one GPU.
    let a = with_vgpu("a", "eg1.medium").unwrap();
    let b = with_vgpu("b", "eg1.medium").unwrap();
    assert_eq!(free_gpu_bytes(r), [6u64 << 30, 8u64 << 30], "not packed");
    let vg = t.get("/v1/vgpus").unwrap();
    assert_eq!(vg.as_array().unwrap().len(), 2);
    assert!(other
        .get("/v1/vgpus")
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        status(other.call(
            "DELETE",
            &format!("/v1/instances/{}/vgpu", a["id"].as_str().unwrap()),
            None
        )),
        404
    );
    // Detach and terminate give the memory back, once the GPU server has
    // ended the vGPU's sessions.
    let d = t.call("DELETE", "/v1/instances/a/vgpu", None).unwrap();
    assert_eq!(d["state"], "detaching");
    assert_eq!(status(t.call("DELETE", "/v1/instances/a/vgpu", None)), 409);
    assert_eq!(
        free_gpu_bytes(r),
        [6u64 << 30, 8u64 << 30],
        "held while detaching"
    );
    assert_eq!(gpu_pass(), 1);
    assert_eq!(gpu_pass(), 0);
    t.post(
        &format!("/v1/instances/{}/terminate", b["id"].as_str().unwrap()),
        &json!({}),
    )
    .unwrap();
    // b is shutting down, its 1 GiB held until its host reports it
    // terminated (no host agent runs here).
    assert_eq!(free_gpu_bytes(r), [7u64 << 30, 8u64 << 30]);
    // Attach to an existing instance (our extension): 8 GiB fits only the
    // empty GPU.
    t.post("/v1/instances/a/vgpu", &json!({"type": "eg1.2xlarge"}))
        .unwrap();
    assert_eq!(free_gpu_bytes(r), [0, 7u64 << 30]);
    assert_eq!(
        status(t.post("/v1/instances/a/vgpu", &json!({"type": "eg1.medium"}))),
        409
    );
    // Both or neither: no GPU has 8 GiB free, so the host's room is not
    // claimed either.
    let used_before = r.admin.get("/v1/hosts").unwrap()[0]["vcpus_used"].clone();
    let e = with_vgpu("c", "eg1.2xlarge").unwrap_err();
    assert_eq!(e.status(), Some(503));
    assert!(e.to_string().contains("GPU"), "{e}");
    assert_eq!(
        r.admin.get("/v1/hosts").unwrap()[0]["vcpus_used"],
        used_before
    );
    assert_eq!(free_gpu_bytes(r), [0, 7u64 << 30]);
    assert!(t.get("/v1/instances/c").is_err());
    // Terminating a gives its vGPU's memory back once its host reports it.
    let h = r.client(
        r.admin
            .post("/v1/hosts/hg/credentials", &json!({}))
            .unwrap()["credential"]
            .as_str()
            .unwrap(),
    );
    t.post("/v1/instances/a/terminate", &json!({})).unwrap();
    agent_pass(&h);
    agent_pass(&h);
    assert_eq!(gpu_pass(), 2, "a's and b's vGPUs");
    assert_eq!(free_gpu_bytes(r), [8u64 << 30, 8u64 << 30]);
}

/// 16 clients race for two whole GPUs: exactly two win.
fn vgpu_race(r: &Region) {
    let t = r.tenant("gpurace");
    r.host("hgr", 64);
    gpu_server(r, "gr1");
    gpu_server(r, "gr2");
    let wins = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for n in 0..16 {
            let (t, wins) = (&t, &wins);
            s.spawn(move || {
                match t.post(
                    "/v1/instances",
                    &json!({"name": format!("g{n}"), "type": "sc1.micro", "volume_size": "64MiB", "vgpu": "eg1.2xlarge"}),
                ) {
                    Ok(_) => {
                        wins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(e) => assert_eq!(e.status(), Some(503), "{e}"),
                }
            });
        }
    });
    assert_eq!(wins.into_inner(), 2);
    assert_eq!(free_gpu_bytes(r), [0, 0]);
    // No instance without its vGPU was left behind.
    assert_eq!(t.get("/v1/instances").unwrap().as_array().unwrap().len(), 2);
}

fn all(etcd: bool) {
    let r = region(etcd, Duration::from_secs(2));
    credentials_and_isolation(&r);
    gpu_servers(&r);
    bad_input(&r);
    drop(r);
    let r = region(etcd, Duration::from_secs(2));
    lifecycle(&r);
    drop(r);
    let r = region(etcd, Duration::from_secs(2));
    race_for_the_last_room(&r);
    lease_expiry(&r);
    drop(r);
    let r = region(etcd, Duration::from_secs(2));
    vgpus(&r);
    drop(r);
    let r = region(etcd, Duration::from_secs(2));
    vgpu_race(&r);
}

#[test]
fn region_api_on_redb() {
    all(false);
}

#[test]
fn region_api_on_etcd() {
    all(true);
}

/// HTTPS: a client that trusts the region's certificate gets answers; one
/// that does not, or that speaks plain HTTP, gets none.
#[test]
fn region_api_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    // A certificate authority, and the region's certificate signed by it
    // (webpki accepts no self-signed end-entity certificate).
    let p = |n: &str| dir.path().join(n);
    let openssl = |args: &[&str]| {
        let st = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl (package openssl)");
        assert!(st.success(), "openssl {args:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-days", "1", "-subj", "/CN=softcard test CA"],
            &[
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "key.pem",
                "-out",
                "req.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        p("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "req.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext",
        "-out",
        "cert.pem",
    ]);
    let (cert, key) = (p("cert.pem"), p("key.pem"));
    let mut opts = ServeOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        format!("redb:{}", dir.path().join("r.redb").display()),
        dir.path().join("admin.credential"),
    );
    opts.tls = Some((cert.clone(), key));
    let bg = Background::start(opts, 2).unwrap();
    assert!(bg.url().starts_with("https://"));
    let pem = std::fs::read(p("ca.pem")).unwrap();
    let trusted = RegionClient::new(&bg.url(), &bg.admin, Some(&pem)).unwrap();
    assert_eq!(trusted.get("/v1/whoami").unwrap()["kind"], "admin");
    let untrusted = RegionClient::new(&bg.url(), &bg.admin, None).unwrap();
    let e = untrusted.get("/v1/whoami").unwrap_err();
    assert!(
        e.status().is_none(),
        "answered without a trusted certificate: {e}"
    );
    let plain = RegionClient::new(&bg.url().replace("https", "http"), &bg.admin, None).unwrap();
    assert!(plain.get("/v1/whoami").is_err());
}
