//! A region's GPU server admits only vGPU credentials the region issued: a
//! real `softcard gpu serve --region` on lavapipe, a region, a simulated
//! host. A session without a credential, or with a wrong one, is refused;
//! the attachment's credential opens a session whose memory quota is the
//! vGPU type's; detaching the vGPU revokes the credential and ends the
//! live session.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::net::{free_port, wait_until, Proc};
use common::BIN;
use serde_json::json;
use softcard_region::client::RegionClient;

const SLOW: Duration = Duration::from_secs(30);

fn credential(admin: &RegionClient, path: &str) -> String {
    admin.post(path, &json!({})).unwrap()["credential"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A `softcard gpu serve --region` process (killed when dropped) and its
/// port, once the region lists it up.
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
    let p = Proc(
        Command::new(BIN)
            .args(["gpu", "serve", "--listen", &format!("127.0.0.1:{gport}")])
            .args(["--region", url, "--region-credential"])
            .arg(&gfile)
            .args(extra)
            .stdout(Stdio::null())
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
    (p, gport)
}

#[test]
fn gpu_server_admits_only_the_regions_credentials() {
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
    admin.post("/v1/tenants", &json!({"name": "acme"})).unwrap();
    let t = RegionClient::new(
        &url,
        &credential(&admin, "/v1/tenants/acme/credentials"),
        None,
    )
    .unwrap();
    let _gpu = gpu_server(&url, &admin, dir.path(), &["--gpu-memory", "4GiB"]);
    let gport = _gpu.1;
    // A simulated host (no QEMU): it receives the instance's vGPU access.
    let h = RegionClient::new(&url, &credential(&admin, "/v1/hosts/h1/credentials"), None).unwrap();
    h.call(
        "PUT",
        "/v1/agent/register",
        Some(&json!({"vcpus": 4, "memory_mib": 4096,
            "devices": [{"name": "nvme0", "capacity_bytes": 1u64 << 30}]})),
    )
    .unwrap();
    t.post(
        "/v1/instances",
        &json!({"name": "gfx", "type": "sc1.micro", "volume_size": "64MiB", "vgpu": "eg1.medium"}),
    )
    .unwrap();
    let work = h.get("/v1/agent/work").unwrap();
    let access = &work["instances"][0]["vgpu_access"];
    let endpoint = access["endpoint"].as_str().unwrap().to_owned();
    let secret = access["credential"].as_str().unwrap().to_owned();
    assert_eq!(endpoint, format!("127.0.0.1:{gport}"));
    // Tenants see the attachment, never the secret.
    let listed = t.get("/v1/vgpus").unwrap().to_string();
    assert!(listed.contains("eg1.medium") && !listed.contains(&secret));

    let open = |cred: Option<&str>| {
        softcard_gpu::remote_instance_with_credential(&endpoint, cred)
            .map_err(|e| e.to_string())
            .and_then(|i| softcard_gpu::workloads::open(&i).map_err(|e| e.to_string()))
    };
    let e = open(None).unwrap_err();
    assert!(e.contains("not admitted"), "{e}");
    let e = open(Some(&format!("sc_{}", "1".repeat(64)))).unwrap_err();
    assert!(e.contains("unknown or revoked"), "{e}");
    // The GPU server reads its grants twice a second.
    let mut session = None;
    wait_until("the credential admits a session", SLOW, || {
        session = open(Some(&secret)).ok();
        session.is_some()
    });
    let (device, _queue) = session.unwrap();
    let (_, quota, _) = softcard_gpu::usage(&device).expect("a live session");
    assert_eq!(
        quota,
        1 << 30,
        "the session's quota is the vGPU type's memory"
    );

    // Detach: the credential is revoked and the live session ends.
    t.call("DELETE", "/v1/instances/gfx/vgpu", None).unwrap();
    wait_until("the session ends", SLOW, || {
        softcard_gpu::usage(&device).is_none()
    });
    let e = open(Some(&secret)).unwrap_err();
    assert!(e.contains("unknown or revoked"), "{e}");
}

/// The patent's chain, but for the client device: an instance provisioned
/// by the region gets a vGPU backed by a separate GPU server process, and
/// an ordinary wgpu program inside the instance's QEMU guest (the
/// `gpu-demo` image: no GPU, no Vulkan driver, no display) renders and
/// presents 30 frames on it, with the endpoint and credential the metadata
/// service gave it.
#[test]
fn a_wgpu_program_in_an_instance_renders_on_its_vgpu() {
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
        console.contains("rendered 30 frames of 320x240"),
        "{console}"
    );
    // The GPU server lists the attachment it served.
    let servers = admin.get("/v1/gpu-servers").unwrap();
    let att = &servers[0]["adapters"][0]["attachments"];
    assert_eq!(att.as_array().map(Vec::len), Some(1), "{servers}");
    assert_eq!(att[0]["type"], "eg1.medium");
    let id = net.instance("art")["id"].as_str().unwrap().to_owned();
    net.t(&["instance", "terminate", "art"]);
    net.wait_state(&id, "terminated");
    let servers = admin.get("/v1/gpu-servers").unwrap();
    assert!(servers[0]["adapters"][0]["attachments"]
        .as_array()
        .unwrap()
        .is_empty());
}
