//! Unmodified verbs applications on the card's RDMA devices: a card
//! daemon with an `[[rdma]]` device on a loopback address, and Debian's
//! own `ibv_devices` and `ibv_devinfo` (rdma-core's ibverbs-utils) run
//! through softcard's drop-in libibverbs.so.1 (`softcard rdma exec`). They
//! list the device, its port active and its RoCE v2 GID; the library's
//! functions carry rdma-core's symbol versions (no loader warning). The
//! calls not carried yet answer as verbs documents: Debian's
//! `ibv_rc_pingpong` and perftest's `ib_write_bw` (which also links
//! rdma-core's librdmacm and the mlx5 and EFA providers) load, and stop
//! with their own error message and exit status, never a crash.

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

    // Not carried yet: the tools load and fail cleanly, in their words.
    for (cmd, says) in [
        (
            &["ibv_rc_pingpong", "-d", "softcard0", "-g", "0"][..],
            "Couldn't allocate PD",
        ),
        (
            &["ibv_rc_pingpong", "-d", "softcard0", "-g", "0", "-e"][..],
            "Couldn't create completion channel",
        ),
        (
            &["ibv_ud_pingpong", "-d", "softcard0", "-g", "0"][..],
            "Couldn't allocate PD",
        ),
        (
            &["ibv_srq_pingpong", "-d", "softcard0", "-g", "0"][..],
            "Couldn't allocate PD",
        ),
    ] {
        let o = exec(&socket, cmd);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{cmd:?}: {out}{err}");
        assert!(
            err.contains(says) || out.contains(says),
            "{cmd:?}: {out}{err}"
        );
    }
    // perftest: a server and a client exchange their parameters over TCP,
    // then stop at the protection domain.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let server = {
        let socket = socket.clone();
        let port = port.clone();
        std::thread::spawn(move || {
            exec(
                &socket,
                &["ib_write_bw", "-d", "softcard0", "-x", "0", "-p", &port],
            )
        })
    };
    let mut client = None;
    for _ in 0..50 {
        let o = exec(
            &socket,
            &[
                "ib_write_bw",
                "-d",
                "softcard0",
                "-x",
                "0",
                "-p",
                &port,
                "127.0.0.1",
            ],
        );
        let (out, err) = text(&o);
        if (out.clone() + &err).contains("Couldn't allocate PD") {
            client = Some(o);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let client = client.expect("ib_write_bw's client reaches the PD");
    assert_eq!(client.status.code(), Some(1));
    let server = server.join().unwrap();
    let (out, err) = text(&server);
    assert_eq!(server.status.code(), Some(1), "{out}{err}");
    assert!(!err.contains("symbol lookup error"), "{err}");

    // Without the card: no devices, and the library says why.
    let o = exec(&d.path("nowhere.sock"), &["ibv_devices"]);
    let (out, err) = text(&o);
    assert!(!out.contains("softcard0"), "{out}");
    assert!(err.contains("cannot reach the card"), "{err}");
}
