//! UCX on the card's RDMA device through softcard's libibverbs.so.1, with
//! Debian's unmodified UCX 1.13 (`ucx-utils`): `ucx_info` lists the
//! device's `rc_verbs` and `ud_verbs` transports (UCX lists a device only
//! when its node in /dev/infiniband is there, which the daemon makes, and
//! only when the context has an async event descriptor it can poll), and
//! `ucx_perftest` runs between two processes of this host through one card
//! daemon:
//! - UCT over `rc_verbs`: put latency (each side waits for the peer's
//!   RDMA WRITE to land in its own memory before it answers), active
//!   messages by copy (UCX ends a burst with a zero-length RDMA WRITE,
//!   which names no memory), RDMA READ by zero copy, and atomic adds;
//! - UCT over `ud_verbs`: active-message latency (UCX drops a datagram
//!   whose GRH area does not name its own address, which it finds by the
//!   completion's `sl`);
//! - UCP over both (connection set-up over UD): tag-matching latency, and
//!   4 MiB tag bandwidth, whose rendezvous is RDMA READs larger than the
//!   receive path absorbs at once: the READ responses lost on the way are
//!   asked for again (an ACK that passes an unanswered READ).
//!
//! Each run passes only when both processes exit with success and the
//! client prints its final figures.

mod common;

use std::process::{Command, Output};

use common::{Daemon, BIN};
use softcard_testkit::deadline::output_within;

/// How long one tool run may take before it is killed (and fails).
const TOOL_LIMIT: std::time::Duration = std::time::Duration::from_secs(180);

fn exec(socket: &std::path::Path, tls: Option<&str>, cmd: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.args(["rdma", "exec", "--socket"])
        .arg(socket)
        .arg("--")
        .args(cmd);
    if let Some(t) = tls {
        c.env("UCX_TLS", t);
    }
    output_within(&mut c, TOOL_LIMIT)
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// `ucx_perftest` as server and client on TCP port `port` for the
/// address exchange; the client retried until the server listens.
fn perftest(socket: &std::path::Path, port: u16, tls: Option<&str>, args: &[&str]) {
    let port = port.to_string();
    let server = {
        let socket = socket.to_owned();
        let tls = tls.map(str::to_owned);
        let mut a = vec!["ucx_perftest".to_owned(), "-p".into(), port.clone()];
        a.extend(args.iter().map(|s| (*s).to_owned()));
        std::thread::spawn(move || {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            exec(&socket, tls.as_deref(), &a)
        })
    };
    let mut client = vec!["ucx_perftest", "127.0.0.1", "-p", &port];
    client.extend_from_slice(args);
    let mut last = None;
    for _ in 0..100 {
        let o = exec(socket, tls, &client);
        let refused = text(&o).contains("Connection refused");
        last = Some(o);
        if !refused {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let c = last.unwrap();
    let s = server.join().unwrap();
    assert!(
        c.status.success() && s.status.success(),
        "{args:?}\nclient:\n{}\nserver:\n{}",
        text(&c),
        text(&s)
    );
    assert!(
        String::from_utf8_lossy(&c.stdout).contains("Final:"),
        "{args:?}: {}",
        text(&c)
    );
}

#[test]
fn ucx_lists_the_device_and_its_perftest_runs_over_rc_and_ud() {
    let d = Daemon::start(
        "rdma_socket = \"@DIR@/rdma.sock\"\n\
         [[rdma]]\naddress = \"127.0.0.12\"\n",
    );
    let socket = d.path("rdma.sock");
    let node = std::fs::metadata("/dev/infiniband/uverbs-softcard0").unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_char_device(&node.file_type()),
        "{node:?}"
    );

    let o = exec(&socket, None, &["ucx_info", "-d"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for tl in ["rc_verbs", "ud_verbs"] {
        let listed = out.lines().zip(out.lines().skip(1)).any(|(a, b)| {
            a.ends_with(&format!("Transport: {tl}")) && b.ends_with("Device: softcard0:1")
        });
        assert!(listed, "{tl} on softcard0:1 not in\n{out}");
    }

    let uct = |tl: &'static str, rest: &[&'static str]| {
        let mut a = vec!["-d", "softcard0:1", "-x", tl];
        a.extend_from_slice(rest);
        a
    };
    let mut port = 13_410;
    for args in [
        uct("rc_verbs", &["-t", "put_lat", "-n", "2000"]),
        uct(
            "rc_verbs",
            &["-t", "am_bw", "-D", "bcopy", "-s", "1024", "-n", "5000"],
        ),
        uct(
            "rc_verbs",
            &["-t", "get", "-D", "zcopy", "-s", "65536", "-n", "500"],
        ),
        uct("rc_verbs", &["-t", "add_lat", "-n", "1000"]),
        uct("ud_verbs", &["-t", "am_lat", "-n", "2000"]),
    ] {
        perftest(&socket, port, None, &args);
        port += 1;
    }
    let both = Some("rc_verbs,ud_verbs");
    perftest(&socket, port, both, &["-t", "tag_lat", "-n", "2000"]);
    perftest(
        &socket,
        port + 1,
        both,
        &["-t", "tag_bw", "-s", "4194304", "-n", "20"],
    );
}
