//! Unmodified verbs applications on the card's RDMA devices: a card
//! daemon with an `[[rdma]]` device on a loopback address, and Debian's
//! own `ibv_devices` and `ibv_devinfo` (rdma-core's ibverbs-utils) run
//! through softcard's drop-in libibverbs.so.1 (`softcard rdma exec`). They
//! list the device, its port active and its RoCE v2 GID; the library's
//! functions carry rdma-core's symbol versions (no loader warning).
//! Two unmodified applications on this host talk to each other through
//! the one card daemon and its one address: `ibv_rc_pingpong` (busy
//! polling and with a completion channel, `-e`), checking the data it
//! received (`-c`), and perftest's bandwidth, latency and atomic tools.
//! The calls not carried yet answer as verbs documents: the UD and SRQ
//! pingpongs load and stop with their own error, never a crash.

mod common;

use std::process::{Command, Output};

use common::{Daemon, BIN};
use softcard_testkit::deadline::output_within;

/// How long one tool run may take before it is killed (and fails).
const TOOL_LIMIT: std::time::Duration = std::time::Duration::from_secs(180);

fn exec(socket: &std::path::Path, cmd: &[&str]) -> Output {
    output_within(
        Command::new(BIN)
            .args(["rdma", "exec", "--socket"])
            .arg(socket)
            .arg("--")
            .args(cmd),
        TOOL_LIMIT,
    )
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

    // Not carried: XRC domains. The tool loads and stops cleanly, in its
    // own words, with verbs' EOPNOTSUPP (95).
    let o = exec(
        &socket,
        &["ibv_xsrq_pingpong", "-d", "softcard0", "-g", "0"],
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("Couldn't Open the XRC Domain 95"),
        "{out}{err}"
    );
    // Without the card: no devices, and the library says why.
    let o = exec(&d.path("nowhere.sock"), &["ibv_devices"]);
    let (out, err) = text(&o);
    assert!(!out.contains("softcard0"), "{out}");
    assert!(err.contains("cannot reach the card"), "{err}");
}

/// A second card daemon started on the socket a running one serves is
/// refused with a clear error, and the running one's applications still
/// reach it (it used to be replaced under them).
#[test]
fn a_second_daemon_on_a_served_rdma_socket_is_refused() {
    let first = Daemon::start(
        "rdma_socket = \"@DIR@/rdma.sock\"\n\
         [[device]]\nname = \"nvme0\"\npath = \"@DIR@/dev.img\"\nkind = \"file\"\nsize = \"16MiB\"\n\
         [[rdma]]\naddress = \"127.0.0.10\"\n",
    );
    let socket = first.path("rdma.sock");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("card.toml");
    std::fs::write(
        &config,
        format!(
            "api_socket = \"{}\"\nrdma_socket = \"{}\"\n",
            dir.path().join("api.sock").display(),
            socket.display()
        ),
    )
    .unwrap();
    let o = output_within(
        Command::new(BIN).args(["serve", "--config"]).arg(&config),
        TOOL_LIMIT,
    );
    let (out, err) = text(&o);
    assert!(!o.status.success(), "the second daemon started: {out}{err}");
    assert!(
        err.contains("another daemon is serving RDMA applications"),
        "{err}"
    );
    let o = exec(&socket, &["ibv_devices"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("softcard0"), "{out}");
}

/// Runs `server` and then `client` (retrying until the server listens)
/// through the library; both outputs.
fn pair(socket: &std::path::Path, server: &[&str], client: &[&str]) -> (Output, Output) {
    let s = {
        let socket = socket.to_owned();
        let server: Vec<String> = server.iter().map(|a| (*a).to_owned()).collect();
        std::thread::spawn(move || {
            let args: Vec<&str> = server.iter().map(String::as_str).collect();
            exec(&socket, &args)
        })
    };
    let mut c = None;
    for _ in 0..100 {
        let o = exec(socket, client);
        let (out, err) = text(&o);
        let refused = (out + &err).contains("Couldn't connect")
            || (o.status.code() == Some(1) && !s.is_finished() && o.stdout.is_empty());
        c = Some(o);
        if !refused {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    (s.join().unwrap(), c.unwrap())
}

#[test]
fn two_unmodified_applications_talk_through_one_card_daemon() {
    let d = Daemon::start(
        "rdma_socket = \"@DIR@/rdma.sock\"\n\
         [[rdma]]\naddress = \"127.0.0.8\"\n",
    );
    let socket = d.path("rdma.sock");
    // ibv_rc_pingpong, 4 KiB and 64 KiB messages, checking every byte
    // received (-c), busy polling and on a completion channel (-e);
    // ibv_ud_pingpong: datagrams of one MTU (its receives check nothing,
    // so the count of iterations is its proof).
    for (tool, extra) in [
        ("ibv_rc_pingpong", &["-s", "4096", "-c"][..]),
        ("ibv_rc_pingpong", &["-s", "65536", "-e", "-c"][..]),
        ("ibv_ud_pingpong", &["-s", "1024"][..]),
        // 16 queue pairs on one shared receive queue.
        ("ibv_srq_pingpong", &["-c"][..]),
    ] {
        let port = free_port();
        let base = [tool, "-d", "softcard0", "-g", "0", "-n", "200", "-p", &port];
        let server: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let mut client = server.clone();
        client.push("127.0.0.1");
        let (s, c) = pair(&socket, &server, &client);
        for (who, o) in [("server", &s), ("client", &c)] {
            let (out, err) = text(o);
            assert!(o.status.success(), "{tool} {who} {extra:?}: {out}{err}");
            assert!(
                out.contains("200 iters in"),
                "{tool} {who} {extra:?}: {out}{err}"
            );
        }
    }
    // perftest: every tool reports its table (a tool that fails prints
    // no result line and exits nonzero).
    for (tool, extra) in [
        ("ib_write_bw", &["-n", "200"][..]),
        ("ib_send_bw", &["-n", "200", "-e"][..]),
        ("ib_send_bw", &["-n", "200", "--use-srq"][..]),
        ("ib_read_bw", &["-n", "200"][..]),
        ("ib_write_lat", &["-n", "200"][..]),
        ("ib_send_lat", &["-n", "200"][..]),
        ("ib_read_lat", &["-n", "200"][..]),
        ("ib_atomic_lat", &["-n", "200"][..]),
        ("ib_atomic_bw", &["-n", "200"][..]),
    ] {
        let port = free_port();
        let server: Vec<&str> = [tool, "-d", "softcard0", "-x", "0", "-p", &port]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        let mut client = server.clone();
        client.push("127.0.0.1");
        let (s, c) = pair(&socket, &server, &client);
        for (who, o) in [("server", &s), ("client", &c)] {
            let (out, err) = text(o);
            assert!(o.status.success(), "{tool} {who}: {out}{err}");
            // The READ and atomic latency tools' server is passive: it
            // reports nothing of its own.
            if who == "server" && matches!(tool, "ib_read_lat" | "ib_atomic_lat") {
                continue;
            }
            assert!(
                out.lines()
                    .any(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())),
                "{tool} {who} printed no result: {out}{err}"
            );
        }
    }
    // Both applications' objects went with them.
    let v: serde_json::Value = serde_json::from_str(&d.ok(&["rdma", "list", "--json"])).unwrap();
    assert_eq!(v[0]["qps"], 0, "{v}");
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

#[test]
fn an_application_that_dies_leaves_nothing_and_its_peer_sees_the_rc_error() {
    let d = Daemon::start(
        "rdma_socket = \"@DIR@/rdma.sock\"\n\
         [[rdma]]\naddress = \"127.0.0.9\"\n",
    );
    let socket = d.path("rdma.sock");
    let port = free_port();
    // perftest's write bandwidth for 30 s: the client always has writes
    // in flight, which a dead peer never acknowledges.
    let args = [
        "ib_write_bw",
        "-d",
        "softcard0",
        "-x",
        "0",
        "-F",
        "-D",
        "30",
        "-p",
        &port,
    ];
    let spawn = |peer: Option<&str>| {
        Command::new(BIN)
            .args(["rdma", "exec", "--socket"])
            .arg(&socket)
            .arg("--")
            .args(args)
            .args(peer)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let qps = || -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&d.ok(&["rdma", "list", "--json"])).unwrap();
        v[0]["qps"].as_u64().unwrap()
    };
    let mut server = spawn(None);
    // The client, again until the server listens (perftest makes its
    // queue pair once the two have met).
    let mut client = None;
    'tries: for _ in 0..100 {
        let mut c = spawn(Some("127.0.0.1"));
        for _ in 0..200 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            if c.try_wait().unwrap().is_some() {
                // It could not connect yet.
                continue 'tries;
            }
            if qps() == 2 {
                client = Some(c);
                break 'tries;
            }
        }
        panic!("the client neither connected nor gave up");
    }
    let client = client.expect("the client connected");
    assert_eq!(qps(), 2, "both applications connected");
    // Let them run, then the server dies without a word.
    std::thread::sleep(std::time::Duration::from_millis(500));
    server.kill().unwrap();
    server.wait().unwrap();
    let out = client.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let said = format!("{}{err}", String::from_utf8_lossy(&out.stdout));
    // perftest reports the failed completion's status: 12 is
    // IBV_WC_RETRY_EXC_ERR (transport retry counter exceeded), as RC
    // prescribes when the peer stops acknowledging.
    assert!(
        said.contains("Completion with error") && said.contains("Failed status 12"),
        "the peer's error: {said}"
    );
    assert_eq!(qps(), 0, "the dead application's queue pair is gone");
}

#[test]
fn two_applications_move_256_mib_intact_through_loss_duplication_reordering_and_corruption() {
    let d = Daemon::start(
        "rdma_socket = \"@DIR@/rdma.sock\"\n\
         [[rdma]]\naddress = \"127.0.0.10\"\n\
         faults = { seed = 7, drop_ppm = 2000, dup_ppm = 2000, reorder_ppm = 2000, corrupt_ppm = 2000 }\n",
    );
    let socket = d.path("rdma.sock");
    let port = free_port();
    // 2048 messages of 64 KiB each way: 256 MiB, every byte checked by
    // the receiver (-c).
    let server = [
        "ibv_rc_pingpong",
        "-d",
        "softcard0",
        "-g",
        "0",
        "-s",
        "65536",
        "-n",
        "2048",
        "-c",
        "-p",
        &port,
    ];
    let mut client = server.to_vec();
    client.push("127.0.0.1");
    let (s, c) = pair(&socket, &server, &client);
    for (who, o) in [("server", &s), ("client", &c)] {
        let (out, err) = text(o);
        assert!(o.status.success(), "{who}: {out}{err}");
        assert!(out.contains("268435456 bytes in"), "{who}: {out}{err}");
    }
    // The faults happened, and the protocol recovered from them.
    let v: serde_json::Value = serde_json::from_str(&d.ok(&["rdma", "list", "--json"])).unwrap();
    let stats = &v[0]["stats"];
    assert!(stats["retransmits"].as_u64().unwrap() > 0, "{stats}");
    assert!(
        stats["dropped"].as_u64().unwrap() > 0,
        "corrupted datagrams: {stats}"
    );
    assert!(stats["software_packets"].as_u64().unwrap() > 0, "{stats}");
}

/// An application of the extended CQ API (`tests/c/cq_ex.c`), compiled
/// here against rdma-core's own header and run through the library.
#[test]
fn the_extended_cq_api_polls_the_same_ring() {
    let d = Daemon::start(
        "rdma_socket = \"@DIR@/rdma.sock\"\n\
         [[rdma]]\naddress = \"127.0.0.11\"\n",
    );
    let prog = d.path("cq_ex");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/cq_ex.c");
    let cc = Command::new("cc")
        .args(["-O1", "-Wall", "-Werror", "-o"])
        .arg(&prog)
        .arg(src)
        .arg("-libverbs")
        .output()
        .expect("cc");
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let o = exec(&d.path("rdma.sock"), &[prog.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("wr ")).count(),
        4,
        "{out}"
    );
    assert!(out.ends_with("OK\n"), "{out}{err}");
}
