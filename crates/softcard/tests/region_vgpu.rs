//! vGPUs in a region, against a real `softcard gpu serve --region` on
//! lavapipe, a region and a simulated host (no QEMU here; the instance
//! test below boots one).
//!
//! Two tenants with a vGPU each on one GPU server: the vGPU port speaks
//! TLS that verifies against the region's authority; a session without a
//! credential, with a malformed, truncated, forged or another server's
//! credential, over plain TCP, or trusting another authority is refused
//! (with the reason in the server's log); each attachment's credential
//! opens sessions that share the type's memory, and one tenant over its
//! quota leaves the other working; neither reads the other's frames;
//! terminating frees the GPU memory and ends the sessions; a GPU server
//! that dies leaves its attachments impaired until it returns, and new
//! sessions work again then.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::net::{free_port, wait_until, Proc};
use common::BIN;
use serde_json::{json, Value};
use softcard_region::client::RegionClient;

const SLOW: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

fn credential(admin: &RegionClient, path: &str) -> String {
    admin.post(path, &json!({})).unwrap()["credential"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Starts `softcard gpu serve --region` as GPU server gpu-a (killed when
/// dropped), logging to `log`, and waits until the region lists it up.
fn start_gpu_server(
    url: &str,
    admin: &RegionClient,
    cred_file: &std::path::Path,
    gport: u16,
    log: &std::path::Path,
    extra: &[&str],
) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let p = Proc(
        Command::new(BIN)
            .args(["gpu", "serve", "--listen", &format!("127.0.0.1:{gport}")])
            .args(["--region", url, "--region-credential"])
            .arg(cred_file)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_until("the GPU server registers", SLOW, || {
        admin
            .get("/v1/gpu-servers")
            .unwrap()
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g["state"] == "up"))
    });
    p
}

/// A GPU server for `admin`'s region in `dir`, and its port.
fn gpu_server(
    url: &str,
    admin: &RegionClient,
    dir: &std::path::Path,
    extra: &[&str],
) -> (Proc, u16) {
    let gfile = dir.join("gpu.credential");
    std::fs::write(
        &gfile,
        credential(admin, "/v1/gpu-servers/gpu-a/credentials"),
    )
    .unwrap();
    let gport = free_port();
    let p = start_gpu_server(url, admin, &gfile, gport, &dir.join("gpu.log"), extra);
    (p, gport)
}

/// What a host hands an instance: endpoint, credential, authority.
fn endpoint(access: &Value, credential: Option<&str>) -> softcard_gpu::Endpoint {
    softcard_gpu::Endpoint {
        addr: access["endpoint"].as_str().unwrap().to_owned(),
        credential: credential.map(str::to_owned),
        tls: Some(softcard_gpu::tls::ClientTls {
            server_name: access["server_name"].as_str().unwrap().to_owned(),
            ca_pem: access["ca"].as_str().unwrap().to_owned(),
        }),
    }
}

fn open(e: &softcard_gpu::Endpoint) -> Result<(wgpu::Device, wgpu::Queue), String> {
    softcard_gpu::remote_instance_at(e)
        .map_err(|e| e.to_string())
        .and_then(|i| softcard_gpu::workloads::open(&i).map_err(|e| e.to_string()))
}

/// Allocates `n` buffers of `size` bytes; the error of the first that did
/// not fit, if one did not.
fn allocate(device: &wgpu::Device, n: usize, size: u64) -> (Vec<wgpu::Buffer>, Option<String>) {
    let mut kept = Vec::new();
    for _ in 0..n {
        let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let b = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return (kept, Some(format!("{e:?}")));
        }
        kept.push(b);
    }
    (kept, None)
}

fn log_has(dir: &std::path::Path, text: &str) -> bool {
    std::fs::read_to_string(dir.join("gpu.log")).is_ok_and(|l| l.contains(text))
}

#[test]
fn two_tenants_share_a_gpu_server_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let admin_file = dir.path().join("admin.credential");
    let _region = Proc(
        Command::new(BIN)
            .args(["region", "serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--store")
            .arg(format!("redb:{}", dir.path().join("r.redb").display()))
            .arg("--admin-credential")
            .arg(&admin_file)
            .args(["--host-lease-seconds", "3"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the region answers", SLOW, || admin_file.exists());
    wait_until("the region answers", SLOW, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let admin = RegionClient::new(
        &url,
        std::fs::read_to_string(&admin_file).unwrap().trim(),
        None,
    )
    .unwrap();
    let tenant = |name: &str| {
        admin.post("/v1/tenants", &json!({"name": name})).unwrap();
        RegionClient::new(
            &url,
            &credential(&admin, &format!("/v1/tenants/{name}/credentials")),
            None,
        )
        .unwrap()
    };
    let (acme, beta) = (tenant("acme"), tenant("beta"));
    let (mut gpu, gport) = gpu_server(&url, &admin, dir.path(), &["--gpu-memory", "4GiB"]);
    // A simulated host (no QEMU): it receives the instances' vGPU access.
    let h = RegionClient::new(&url, &credential(&admin, "/v1/hosts/h1/credentials"), None).unwrap();
    let register = || {
        h.call(
            "PUT",
            "/v1/agent/register",
            Some(&json!({"vcpus": 4, "memory_mib": 4096,
                "devices": [{"name": "nvme0", "capacity_bytes": 1u64 << 30}]})),
        )
        .unwrap();
    };
    register();
    let beat = h.clone();
    std::thread::spawn(move || loop {
        let _ = beat.post("/v1/agent/heartbeat", &json!({}));
        std::thread::sleep(Duration::from_millis(500));
    });
    for (t, name) in [(&acme, "gfx"), (&beta, "art")] {
        t.post(
            "/v1/instances",
            &json!({"name": name, "type": "sc1.micro", "volume_size": "64MiB", "vgpu": "eg1.medium"}),
        )
        .unwrap();
    }
    // Attaching, until the GPU server admits their credentials.
    wait_until("both vGPUs are attached", SLOW, || {
        admin
            .get("/v1/vgpus")
            .unwrap()
            .as_array()
            .is_some_and(|v| v.len() == 2 && v.iter().all(|v| v["state"] == "attached"))
    });
    let work = h.get("/v1/agent/work").unwrap();
    let access_of = |t: &RegionClient, name: &str| {
        let id = t.get(&format!("/v1/instances/{name}")).unwrap()["id"].clone();
        work["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap()["vgpu_access"]
            .clone()
    };
    let (a_acc, b_acc) = (access_of(&acme, "gfx"), access_of(&beta, "art"));
    let secret = |acc: &Value| acc["credential"].as_str().unwrap().to_owned();
    let (a_secret, b_secret) = (secret(&a_acc), secret(&b_acc));
    assert_eq!(a_acc["endpoint"], format!("127.0.0.1:{gport}"));
    assert_eq!(a_acc["server_name"], "gpu-a.vgpu.softcard.internal");
    assert!(a_acc["ca"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
    // Tenants see their attachment, never a secret or the other's.
    let listed = acme.get("/v1/vgpus").unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert!(!listed.to_string().contains(&a_secret));

    // Refused, each with its reason.
    let refused = |e: &softcard_gpu::Endpoint| open(e).unwrap_err();
    assert!(refused(&endpoint(&a_acc, None)).contains("no credential"));
    assert!(
        refused(&endpoint(&a_acc, Some(&format!("sc_{}", "1".repeat(64))))).contains("malformed")
    );
    assert!(
        refused(&endpoint(&a_acc, Some(&a_secret[..a_secret.len() - 3]))).contains("truncated")
    );
    let a_id = a_acc["id"].as_str().unwrap();
    let forged = format!("vg1_gpu-a_{a_id}_{}", "f".repeat(64));
    assert!(refused(&endpoint(&a_acc, Some(&forged))).contains("unknown or revoked"));
    let elsewhere = a_secret.replacen("vg1_gpu-a_", "vg1_gpu-b_", 1);
    assert!(refused(&endpoint(&a_acc, Some(&elsewhere))).contains("for GPU server gpu-b"));
    // Plain TCP to the TLS port, and a client that trusts another
    // authority.
    let mut plain = endpoint(&a_acc, Some(&a_secret));
    plain.tls = None;
    assert!(open(&plain).is_err());
    let mut other_ca = endpoint(&a_acc, Some(&a_secret));
    other_ca.tls.as_mut().unwrap().ca_pem =
        softcard_region::ca::Authority::generate().unwrap().cert_pem;
    let e = refused(&other_ca);
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    wait_until("the server logs why", SLOW, || {
        log_has(dir.path(), "not a TLS client")
            && log_has(dir.path(), "TLS handshake failed")
            && log_has(dir.path(), "for GPU server gpu-b")
    });

    // Admitted: the GPU server reads its grants twice a second.
    let mut a1 = None;
    wait_until("acme's credential admits a session", SLOW, || {
        a1 = open(&endpoint(&a_acc, Some(&a_secret))).ok();
        a1.is_some()
    });
    let (a1, _) = a1.unwrap();
    let (b1, bq) = open(&endpoint(&b_acc, Some(&b_secret))).unwrap();
    let (_, quota, _) = softcard_gpu::usage(&a1).expect("a live session");
    assert_eq!(
        quota,
        1 << 30,
        "the session's quota is the vGPU type's memory"
    );
    // acme's two sessions share its 1 GiB: 3 + 2 buffers of 200 MiB fit,
    // a sixth does not; beta carries on.
    let (_a1_bufs, e) = allocate(&a1, 3, 200 * MIB);
    assert_eq!(e, None);
    let (a2, _) = open(&endpoint(&a_acc, Some(&a_secret))).unwrap();
    let (_a2_bufs, e) = allocate(&a2, 3, 200 * MIB);
    let e = e.expect("acme's vGPU is over its memory");
    assert!(e.contains("quota exceeded"), "{e}");
    let (_b_bufs, e) = allocate(&b1, 4, 200 * MIB);
    assert_eq!(e, None, "beta's vGPU is not acme's");
    let input: Vec<u32> = (1..=4096).collect();
    let local = {
        let (d, q) =
            softcard_gpu::workloads::open(&softcard_gpu::workloads::local_instance()).unwrap();
        softcard_gpu::workloads::collatz(&d, &q, &input).unwrap()
    };
    assert_eq!(
        softcard_gpu::workloads::collatz(&b1, &bq, &input).unwrap(),
        local
    );

    // Frames: only through the region, only to the owner.
    let b_vgpu = b_acc["id"].as_str().unwrap();
    let e = acme.get(&format!("/v1/vgpus/{b_vgpu}/frame")).unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    let servers = admin.get("/v1/gpu-servers").unwrap();
    let frames_at = servers[0]["frames_endpoint"].as_str().unwrap().to_owned();
    // The adapter is registered with what a vGPU on it offers.
    let adapter = &servers[0]["adapters"][0];
    assert!(
        adapter["limits"]["max_buffer_size"].as_u64().unwrap() >= 256 << 20,
        "{adapter}"
    );
    assert!(adapter["features"].is_array(), "{adapter}");
    let https = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(a_acc["ca"].as_str().unwrap().as_bytes()).unwrap(),
        )
        .resolve("gpu-a.vgpu.softcard.internal", frames_at.parse().unwrap())
        .build()
        .unwrap();
    let port_of = frames_at.rsplit(':').next().unwrap();
    let frame_url =
        format!("https://gpu-a.vgpu.softcard.internal:{port_of}/v1/attachments/{b_vgpu}/frame");
    let status = |auth: Option<&str>| {
        let mut r = https.get(&frame_url);
        if let Some(a) = auth {
            r = r.bearer_auth(a);
        }
        r.send().unwrap().status().as_u16()
    };
    assert_eq!(status(None), 401, "a URL alone shows nothing");
    assert_eq!(
        status(Some(&a_secret)),
        403,
        "acme's credential is not beta's"
    );
    assert_eq!(status(Some(&b_secret)), 204, "beta's, with no frame yet");

    // Terminate acme's instance: its sessions end, its memory is free.
    let used = |admin: &RegionClient| {
        admin.get("/v1/gpu-servers").unwrap()[0]["adapters"][0]["free_bytes"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(used(&admin), 2 << 30);
    acme.post("/v1/instances/gfx/terminate", &json!({}))
        .unwrap();
    // The simulated host stops it.
    let gfx = acme.get("/v1/instances/gfx").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    h.post(
        &format!("/v1/agent/instances/{gfx}/status"),
        &json!({"state": "terminated"}),
    )
    .unwrap();
    wait_until("acme's sessions end", SLOW, || {
        softcard_gpu::usage(&a1).is_none() && softcard_gpu::usage(&a2).is_none()
    });
    wait_until("the GPU server gives acme's memory back", SLOW, || {
        used(&admin) == 3 << 30
    });
    assert!(
        softcard_gpu::usage(&b1).is_some(),
        "beta's session lives on"
    );
    // Replayed after the revocation: refused.
    assert!(refused(&endpoint(&a_acc, Some(&a_secret))).contains("unknown or revoked"));
    drop((a1, a2, _a1_bufs, _a2_bufs));

    // The GPU server dies: beta's vGPU is impaired until it returns.
    gpu.kill();
    let health = || beta.get("/v1/vgpus").unwrap()[0]["health"].clone();
    wait_until("the vGPU turns impaired", SLOW, || health() == "impaired");
    let _gpu = start_gpu_server(
        &url,
        &admin,
        &dir.path().join("gpu.credential"),
        gport,
        &dir.path().join("gpu.log"),
        &["--gpu-memory", "4GiB"],
    );
    wait_until("the vGPU is healthy again", SLOW, || health() == "ok");
    let mut again = None;
    wait_until("beta's credential admits a new session", SLOW, || {
        again = open(&endpoint(&b_acc, Some(&b_secret))).ok();
        again.is_some()
    });
    let (d, q) = again.unwrap();
    assert_eq!(
        softcard_gpu::workloads::collatz(&d, &q, &input).unwrap(),
        local
    );
}

/// The patent's chain, to the client device: an instance provisioned by
/// the region gets a vGPU backed by a separate GPU server process; an
/// ordinary wgpu program inside the instance's QEMU guest (the `gpu-demo`
/// image: no GPU, no Vulkan driver, no display), told its vGPU by the
/// metadata service and verifying the server's TLS certificate against
/// the region's authority, runs a compute workload whose result equals a
/// local lavapipe run, then renders; headless Chromium logs into the
/// region's console as the tenant and shows the instance's frames (the
/// screenshot matches a local rendering) with their rate, and another
/// tenant sees nothing of them.
#[test]
fn a_wgpu_program_in_an_instance_renders_on_its_vgpu_to_the_console() {
    let net = common::net::Net::start(false);
    let admin = RegionClient::new(
        net.url(),
        std::fs::read_to_string(&net.admin).unwrap().trim(),
        None,
    )
    .unwrap();
    let _gpu = gpu_server(net.url(), &admin, net.dir.path(), &[]);
    net.t(&[
        "instance",
        "create",
        "art",
        "--type",
        "sc1.small",
        "--volume-size",
        "64MiB",
        "--image",
        "gpu-demo",
        "--vgpu",
        "eg1.medium",
    ]);
    net.wait_state("art", "running");
    net.wait_console("art", "softcard: demo exited with");
    let console = net.console("art");
    assert!(
        console.contains("softcard: demo exited with 0"),
        "{console}"
    );
    assert!(
        console.contains("rendered 60 frames of 320x240"),
        "{console}"
    );
    // The instance's compute result is lavapipe's.
    let local = {
        let (d, q) =
            softcard_gpu::workloads::open(&softcard_gpu::workloads::local_instance()).unwrap();
        let input: Vec<u32> = (1..=65536).collect();
        let out = softcard_gpu::workloads::collatz(&d, &q, &input).unwrap();
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&out))
    };
    assert!(
        console.contains(&format!("compute: collatz 1..=65536 sha256 {local}")),
        "{console}"
    );
    for l in console.lines().filter(|l| l.contains("rendered 60 frames")) {
        println!("inside the TCG instance: {l}");
    }
    // The GPU server lists the attachment it serves.
    let servers = admin.get("/v1/gpu-servers").unwrap();
    let att = &servers[0]["adapters"][0]["attachments"];
    assert_eq!(att.as_array().map(Vec::len), Some(1), "{servers}");
    assert_eq!(att[0]["type"], "eg1.medium");
    let vgpu = att[0]["id"].as_str().unwrap().to_owned();

    // The owner's console shows the frames, after login.
    let mut b = softcard_testkit::browser::Browser::open(&format!("{}/", net.url()), 1280, 1200);
    b.wait_for(
        "the login form",
        "!!document.getElementById('credential')",
        SLOW,
    );
    let status = b.eval(&format!(
        "fetch('/v1/vgpus/{vgpu}/frame').then(r => r.status)"
    ));
    assert_eq!(status, 401, "no frames without a login");
    let cred = std::fs::read_to_string(&net.tenant).unwrap();
    b.type_into("#credential", cred.trim());
    b.click("#login-button");
    let fig = format!("document.querySelector('figure.vgpu-viewer[data-vgpu=\"{vgpu}\"]')");
    b.wait_for(
        "frames in the console, and their rate",
        &format!(
            "(() => {{ const f = {fig}; return !!f && Number(f.dataset.frames || 0) >= 30 \
             && Number(f.querySelector('.fps').textContent) > 0; }})()"
        ),
        Duration::from_secs(120),
    );
    let fps = b.eval(&format!("{fig}.querySelector('.fps').textContent"));
    println!("console viewer: {fps} fps");
    let rect = b.eval(&format!(
        "(() => {{ const r = {fig}.querySelector('img').getBoundingClientRect(); \
         return [r.left, r.top, r.width, r.height]; }})()"
    ));
    let rect: Vec<u32> = rect
        .as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_f64().unwrap().round() as i64).unwrap())
        .collect();
    assert_eq!(&rect[2..], &[320, 240], "the frame is shown at its size");
    let mean = common::screen::diff_from_scene(&b.screenshot(), rect[0], rect[1], 320, 240);
    println!("console screenshot vs local rendering: mean abs difference {mean:.2} per channel");
    assert!(
        mean < 6.0,
        "the console does not show the instance's frame ({mean:.2})"
    );

    // Another tenant sees no viewer and cannot fetch the frames.
    net.cli_ok(&net.admin, &["tenant", "create", "other"]);
    let other = net.cli_ok(&net.admin, &["tenant", "credential", "other"]);
    let mut o = softcard_testkit::browser::Browser::open(&format!("{}/", net.url()), 1280, 900);
    o.wait_for(
        "the login form",
        "!!document.getElementById('credential')",
        SLOW,
    );
    o.type_into("#credential", other.trim());
    o.click("#login-button");
    o.wait_for(
        "the other tenant's tables",
        "!document.getElementById('main').classList.contains('hidden')",
        SLOW,
    );
    let status = o.eval(&format!(
        "fetch('/v1/vgpus/{vgpu}/frame').then(r => r.status)"
    ));
    assert_eq!(status, 404, "another tenant's vGPU does not exist for it");
    assert_eq!(
        o.eval("document.querySelectorAll('figure.vgpu-viewer').length"),
        0
    );

    let id = net.instance("art")["id"].as_str().unwrap().to_owned();
    net.t(&["instance", "terminate", "art"]);
    net.wait_state(&id, "terminated");
    wait_until("the GPU server lets go of the attachment", SLOW, || {
        admin.get("/v1/gpu-servers").unwrap()[0]["adapters"][0]["attachments"]
            .as_array()
            .unwrap()
            .is_empty()
    });
}
