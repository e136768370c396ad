//! Unmodified verbs applications on the card's RDMA devices: a card
//! daemon with an `[[rdma]]` device on a loopback address, and Debian's
//! own `ibv_devices` and `ibv_devinfo` (rdma-core's ibverbs-utils) run
//! through softcard's drop-in libibverbs.so.1 (`softcard rdma exec`). They
//! list the device, its port active and its RoCE v2 GID; the library's
//! functions carry rdma-core's symbol versions (no loader warning).

mod common;

use std::process::{Command, Output};

use common::{Daemon, BIN};

fn exec(socket: &std::path::Path, cmd: &[&str]) -> Output {
    Command::new(BIN)
        .args(["rdma", "exec", "--socket"])
        .arg(socket)
        .arg("--")
        .args(cmd)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn debian_ibv_devices_and_ibv_devinfo_see_the_cards_device() {
    let d = Daemon::start(
        "rdma_socket = \"@DIR@/rdma.sock\"\n\
         [[device]]\nname = \"nvme0\"\npath = \"@DIR@/dev.img\"\nkind = \"file\"\nsize = \"16MiB\"\n\
         [[rdma]]\naddress = \"127.0.0.7\"\n",
    );
    let socket = d.path("rdma.sock");
    // The card API and CLI.
    let v: serde_json::Value = serde_json::from_str(&d.ok(&["rdma", "list", "--json"])).unwrap();
    assert_eq!(v[0]["name"], "softcard0");
    assert_eq!(v[0]["gid"], "::ffff:127.0.0.7");
    assert_eq!(v[0]["port_state"], "active");
    let stats = d.ok(&["rdma", "stats"]);
    assert!(stats.contains("softcard0"), "{stats}");

    let o = exec(&socket, &["ibv_devices"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().eq(["softcard0", "025343ff7f000007"])),
        "{out}"
    );
    assert!(!err.contains("no version information"), "{err}");

    let o = exec(&socket, &["ibv_devinfo", "-v"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    for want in [
        "hca_id:\tsoftcard0",
        "node_guid:\t\t\t0253:43ff:7f00:0007",
        "phys_port_cnt:\t\t\t1",
        "state:\t\t\tPORT_ACTIVE (4)",
        "link_layer:\t\tEthernet",
        "GID[  0]:\t\t::ffff:127.0.0.7, RoCE v2",
    ] {
        assert!(out.contains(want), "{want:?} not in\n{out}");
    }
    assert!(!err.contains("no version information"), "{err}");

    // Without the card: no devices, and the library says why.
    let o = exec(&d.path("nowhere.sock"), &["ibv_devices"]);
    let (out, err) = text(&o);
    assert!(!out.contains("softcard0"), "{out}");
    assert!(err.contains("cannot reach the card"), "{err}");
}
