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

mod common;

use std::process::Command;
use std::time::Duration;

use common::net::{wait_until, Net};

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

/// The guest does not release a disk (its vCPUs are paused, as a hung
/// guest's would be): the detach is reported `busy`; a forced detach cuts
/// it; once the guest runs again it lets the disk go.
fn busy_then_forced_detach(net: &Net, host: usize, id: &str) {
    use serde_json::json;
    use softcard_host::qmp::Qmp;
    net.t(&["volume", "attach", "d1", "--instance", "web1"]);
    net.wait_console("web1", "disk vdb stamped");
    let qmp = net
        .card_dir(host)
        .join(format!("host/instances/{id}/qmp.sock"));
    Qmp::connect(&qmp)
        .unwrap()
        .execute("stop", json!({}))
        .unwrap();
    net.t(&["volume", "detach", "d1"]);
    wait_until("d1 busy", Duration::from_secs(60), || {
        net.volume("d1")["attachment"]["state"] == "busy"
    });
    let e = net.t_fails(&["volume", "attach", "d1", "--instance", "web1"]);
    assert!(e.contains("only an available volume attaches"), "{e}");
    net.t(&["volume", "detach", "d1", "--force"]);
    wait_until(
        "d1 available after a forced detach",
        Duration::from_secs(60),
        || net.volume("d1")["state"] == "available",
    );
    Qmp::connect(&qmp)
        .unwrap()
        .execute("cont", json!({}))
        .unwrap();
    net.wait_console("web1", "disk vdb gone");
}

/// An instance with a vGPU learns its endpoint and credential from the
/// metadata service, inside its guest (a registered GPU server, simulated:
/// no session is opened here; tests/region_vgpu.rs opens them).
fn vgpu_metadata(net: &Net) {
    use serde_json::json;
    use softcard_region::client::RegionClient;
    let admin = RegionClient::new(
        net.url(),
        std::fs::read_to_string(&net.admin).unwrap().trim(),
        None,
    )
    .unwrap();
    let c = admin
        .post("/v1/gpu-servers/gpu-a/credentials", &json!({}))
        .unwrap();
    let g = RegionClient::new(net.url(), c["credential"].as_str().unwrap(), None).unwrap();
    g.call(
        "PUT",
        "/v1/agent/gpu/register",
        Some(
            &json!({"endpoint": "127.0.0.1:7070", "adapters": [{"name": "gpu0",
            "backend": "Vulkan", "device_type": "DiscreteGpu", "memory_bytes": 4u64 << 30}]}),
        ),
    )
    .unwrap();
    net.t(&[
        "instance",
        "create",
        "gfx",
        "--type",
        "sc1.micro",
        "--volume-size",
        "64MiB",
        "--vgpu",
        "eg1.medium",
    ]);
    // Attaching until the GPU server says it admits the credential; then
    // attached, and in the instance's metadata.
    let vgpus = |c: &RegionClient| c.get("/v1/vgpus").unwrap()[0]["state"].clone();
    assert_eq!(vgpus(&admin), "attaching");
    let work = g.get("/v1/agent/gpu/work").unwrap();
    let ids: Vec<&str> = work["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "attaching")
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "{work}");
    let other = admin
        .post("/v1/gpu-servers/gpu-b/credentials", &json!({}))
        .unwrap();
    let gb = RegionClient::new(net.url(), other["credential"].as_str().unwrap(), None).unwrap();
    let n = gb
        .post("/v1/agent/gpu/attached", &json!({"attachments": ids}))
        .unwrap();
    assert_eq!(n["attached"], 0, "another GPU server cannot attach it");
    assert_eq!(vgpus(&admin), "attaching");
    g.post("/v1/agent/gpu/attached", &json!({"attachments": ids}))
        .unwrap();
    assert_eq!(vgpus(&admin), "attached");
    net.wait_state("gfx", "running");
    let line = net.wait_console_line("gfx", "softcard: metadata vgpu ");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["endpoint"], "127.0.0.1:7070");
    assert_eq!(v["type"], "eg1.medium");
    assert_eq!(v["credential"], "(given)", "the guest got a credential");
    let id = net.instance("gfx")["id"].as_str().unwrap().to_owned();
    net.t(&["instance", "terminate", "gfx"]);
    net.wait_state(&id, "terminated");
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
    // Each card's own API lists the instance it runs.
    for (name, host) in [("web1", h1), ("web2", h2)] {
        let out = Command::new(common::BIN)
            .args(["card", "instance", "list", "--api"])
            .arg(net.card_dir(host).join("api.sock"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let here = v.as_array().unwrap();
        assert_eq!(here.len(), 1, "{v}");
        assert_eq!(here[0]["name"], name);
        assert_eq!(here[0]["vm_running"], true);
    }
    // An instance on a boot volume encrypted under the tenant's key: the
    // card holds it encrypted, the guest boots and reads its disk.
    net.t(&[
        "instance",
        "create",
        "enc1",
        "--type",
        "sc1.micro",
        "--volume-size",
        "64MiB",
        "--encrypted",
    ]);
    net.wait_state("enc1", "running");
    net.wait_console("enc1", "disk vda appeared");
    let enc = net.instance("enc1");
    let eh = host_of(&net, "enc1");
    let boot = net
        .card_volume_list(eh)
        .into_iter()
        .find(|v| v["name"] == enc["boot_volume"])
        .unwrap();
    assert_eq!(boot["encrypted"], true, "{boot}");
    assert_eq!(boot["tenant"], "acme", "{boot}");
    net.t(&["instance", "terminate", "enc1"]);
    net.wait_state(enc["id"].as_str().unwrap(), "terminated");

    // Each guest asks its metadata service who it is.
    for name in ["web1", "web2"] {
        let id = net.instance(name)["id"].as_str().unwrap().to_owned();
        net.wait_console(name, &format!("softcard: metadata instance-id {id}"));
    }
    if !etcd {
        vgpu_metadata(&net);
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

    // QEMU dies under the instance: the instance says so, and starts again.
    let st = Command::new("pkill")
        .args(["-9", "-f", &format!("qemu-system-x86_64 -name {web1_id}")])
        .status()
        .unwrap();
    assert!(st.success());
    net.wait_state("web1", "stopped");
    let reason = net.instance("web1")["state_reason"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(reason.contains("QEMU is not running"), "{reason}");
    net.t(&["instance", "start", "web1"]);
    net.wait_state("web1", "running");
    wait_until("a fresh console", Duration::from_secs(90), || {
        let c = net.console("web1");
        c.contains("disk vda stamped") && !c.contains("vdb")
    });

    if !etcd {
        busy_then_forced_detach(&net, h1, &web1_id);
        // The region restarts on its file: nothing is lost, and the hosts
        // carry on with it.
        let before = net.t(&["instance", "list"]);
        net.restart_region();
        assert_eq!(net.t(&["instance", "list"]), before);
        assert!(
            net.hosts().iter().all(|h| h["state"] == "up"),
            "{:?}",
            net.hosts()
        );
    }

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
    // QEMU listens on the volume sockets and the new card connected to
    // them: no reconnect timer on QEMU's side.
    let boot = net.instance("web2")["boot_volume"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until("web2's boot volume served", Duration::from_secs(30), || {
        net.card_volume_list(h2).iter().any(|v| {
            v["name"] == boot.as_str()
                && v["attachment"]["interface"] == "vhost-user-blk-connect"
                && v["attachment"]["state"] == "connected"
        })
    });
    // Its guest still reaches its disks: d2 comes off cleanly.
    net.t(&["volume", "detach", "d2"]);
    net.wait_console("web2", "disk vdb gone");

    if etcd {
        // A reboot resets the guest once: it boots again.
        net.t(&["instance", "reboot", "web2"]);
        wait_until("web2 booted twice", Duration::from_secs(90), || {
            net.console("web2").matches("softcard: instance").count() >= 2
        });
        assert_eq!(net.state("web2"), "running");
        // Both region processes serve the same state.
        let via = |url: &str| {
            let out = Command::new(common::BIN)
                .args(["instance", "list", "--json"])
                .env("SOFTCARD_REGION", url)
                .env("SOFTCARD_CREDENTIAL_FILE", &net.tenant)
                .output()
                .unwrap();
            assert!(out.status.success());
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let mut ids: Vec<String> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|i| format!("{} {}", i["id"], i["state"]["name"]))
                .collect();
            ids.sort();
            ids
        };
        let first = via(&net.regions[0].1);
        // web1, web2 and the terminated enc1 (its record stays visible).
        assert_eq!(first.len(), 3, "{first:?}");
        assert_eq!(first, via(&net.regions[1].1));
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
