//! Unmodified verbs applications on the host, through softcard's
//! libibverbs and the card daemon, against Linux Soft-RoCE (rdma_rxe) in
//! a QEMU guest: the same Debian binaries on both sides (rdma-core's
//! `ibv_rc_pingpong`, perftest), each tool in both roles. The card daemon
//! runs in a network namespace the test creates, serving the host's end
//! of the guest's tap link (10.77.0.1); the guest is 10.77.0.2.
//!
//! Last, at the same time through the one daemon: two host applications
//! against two servers in the guest, and two more against each other.
//!
//! A second test runs READs, WRITEs and SENDs the same way through a card
//! that drops some of the packets it sends: rdma_rxe retransmits and asks
//! for a READ's rest (from inside the READ), the card answers it as rxe
//! does, and the tools still finish.
//!
//! A step passes when the tool itself reports success on both sides:
//! exit status 0, and its result line (`ibv_rc_pingpong -c` checks every
//! byte it received; perftest prints its table only after the run).
//!
//! Needs root (network namespace, tap, the card's raw socket),
//! qemu-system-x86, linux-image-amd64, busybox-static, ibverbs-utils,
//! rdma-core, ibverbs-providers, perftest; the README's test command
//! installs them.

mod common;

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::BIN;
use softcard_testkit::deadline::output_within;
use softcard_testkit::rxe::{run_guest, rxe_initramfs, tap_netns, Kill};

/// How long the guest may run before it is killed and the test fails.
const GUEST_LIMIT: Duration = Duration::from_secs(300);
/// How long one run of a tool on the host may take.
const TOOL_LIMIT: Duration = Duration::from_secs(120);

/// One tool run: the command without its device and GID options, and
/// whether the guest is the client.
struct Step {
    tool: &'static str,
    args: &'static [&'static str],
    guest_client: bool,
}

const TOOLS: [(&str, &[&str]); 10] = [
    ("ibv_rc_pingpong", &["-s", "4096", "-n", "20", "-c"]),
    ("ibv_rc_pingpong", &["-s", "4096", "-n", "20", "-c", "-e"]),
    // One path MTU per datagram (both ports' active MTU is 1024).
    ("ibv_ud_pingpong", &["-s", "1024", "-n", "20"]),
    ("ibv_srq_pingpong", &["-n", "20", "-c"]),
    (
        "ib_send_bw",
        &["-s", "65536", "-n", "50", "--use-srq", "-F"],
    ),
    ("ib_write_bw", &["-s", "65536", "-n", "50", "-F"]),
    ("ib_send_bw", &["-s", "65536", "-n", "50", "-e", "-F"]),
    ("ib_read_bw", &["-s", "65536", "-n", "50", "-F"]),
    ("ib_write_lat", &["-n", "50", "-F"]),
    ("ib_atomic_bw", &["-n", "50", "-F"]),
];

/// The tools of the second test, through loss: a READ lost on the way
/// is asked for again from where its data stopped, an atomic's lost
/// answer is replayed. `ibv_rc_pingpong` exits once it has its last
/// message: when the card's ACK for that is lost, rxe sends the message
/// again (forever: it takes `retry_cnt` 7 for "without limit"), and the
/// card acknowledges it for the queue pair that is gone.
const LOSSY_TOOLS: [(&str, &[&str]); 5] = [
    ("ib_read_bw", &["-s", "65536", "-n", "100", "-F"]),
    ("ib_write_bw", &["-s", "65536", "-n", "100", "-F"]),
    ("ib_send_bw", &["-s", "65536", "-n", "100", "-F"]),
    ("ib_atomic_bw", &["-n", "200", "-F"]),
    ("ibv_rc_pingpong", &["-s", "4096", "-n", "200", "-c"]),
];

/// Each tool in `tools` twice: the guest as client, then as server.
fn steps(tools: &'static [(&'static str, &'static [&'static str])]) -> Vec<Step> {
    tools
        .iter()
        .flat_map(|(tool, args)| {
            [true, false].map(|guest_client| Step {
                tool,
                args,
                guest_client,
            })
        })
        .collect()
}

/// The tool's options for a device and its RoCE v2 GID index, and port.
fn options(tool: &str, dev: &str, gid: &str, port: u16) -> Vec<String> {
    let g = if tool.starts_with("ibv_") { "-g" } else { "-x" };
    ["-d", dev, g, gid, "-p", &port.to_string()]
        .map(str::to_owned)
        .to_vec()
}

/// The guest's script: every step in order, the guest's client retrying
/// until the host's server listens.
fn guest_script(
    tools: &'static [(&'static str, &'static [&'static str])],
    together: bool,
) -> String {
    let mut s = String::from(
        "$B ip link set lo up\n\
         $B ip link set eth0 up\n\
         $B ip addr add 10.77.0.2/24 dev eth0\n\
         /usr/bin/rdma link add rxe0 type rxe netdev eth0 || echo \"SOFTCARD-FAIL rdma link add\"\n\
         $B sleep 1\n",
    );
    for (i, st) in steps(tools).iter().enumerate() {
        let port = 18600 + i as u16;
        let mut cmd = vec![format!("/usr/bin/{}", st.tool)];
        cmd.extend(options(st.tool, "rxe0", "1", port));
        cmd.extend(st.args.iter().map(|a| (*a).to_owned()));
        let cmd = cmd.join(" ");
        if st.guest_client {
            s.push_str(&format!(
                "for t in $($B seq 1 40); do {cmd} 10.77.0.1 > /tmp/s{i}.log 2>&1 && break; $B sleep 1; done\n"
            ));
        } else {
            s.push_str(&format!("{cmd} > /tmp/s{i}.log 2>&1\n"));
        }
        s.push_str(&format!(
            "echo \"SOFTCARD-STEP-{i} rc=$?\"\n$B sed \"s/^/SOFTCARD-LOG-{i} /\" /tmp/s{i}.log\n"
        ));
    }
    // Last, two servers at once, for two host applications that run at
    // the same time through the one card daemon.
    if together {
        s.push_str(TOGETHER_SCRIPT);
    }
    s.push_str("echo SOFTCARD-DONE\n$B poweroff -f\n");
    s
}

/// The guest's part of running together: two servers at once.
const TOGETHER_SCRIPT: &str =
    "/usr/bin/ibv_rc_pingpong -d rxe0 -g 1 -s 4096 -n 100 -c -p 18690 > /tmp/t1.log 2>&1 &\n\
         P1=$!\n\
         /usr/bin/ib_write_bw -d rxe0 -x 1 -s 65536 -n 200 -F -p 18691 > /tmp/t2.log 2>&1 &\n\
         P2=$!\n\
         wait $P1; echo \"SOFTCARD-TOGETHER-1 rc=$?\"\n\
         wait $P2; echo \"SOFTCARD-TOGETHER-2 rc=$?\"\n\
         $B sed \"s/^/SOFTCARD-TLOG-1 /\" /tmp/t1.log\n\
         $B sed \"s/^/SOFTCARD-TLOG-2 /\" /tmp/t2.log\n";

/// Whether a tool's output has its result: pingpong's iteration line,
/// perftest's table row (a line that starts with a number).
fn reported(tool: &str, out: &str) -> bool {
    if tool.starts_with("ibv_") {
        out.contains(" iters in ")
    } else {
        out.lines()
            .any(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
    }
}

#[test]
fn debian_tools_through_the_card_against_rdma_rxe_in_both_roles() {
    run(&TOOLS, true, "", "vrx");
}

#[test]
fn reads_writes_and_sends_through_loss_against_rdma_rxe() {
    // One packet the card sends in 200 is lost: READ responses among
    // them, so rxe asks for READs' rests.
    let stats = run(
        &LOSSY_TOOLS,
        false,
        "faults = { seed = 11, drop_ppm = 5000 }\n",
        "vrl",
    );
    let s = &stats[0]["stats"];
    eprintln!("card: {s}");
    // The card lost some of its READ responses, rxe asked for those
    // READs' rests, and the card answered them as continuations.
    assert!(s["reads_continued"].as_u64() > Some(0), "{s}");
}

/// Runs `tools`' steps (and, with `together`, the steps at the same time)
/// through a card daemon whose `[[rdma]]` section adds `rdma_extra`, in
/// namespace `tag`; asserts every step passed on both sides and returns
/// `softcard rdma stats --json` taken afterwards.
fn run(
    tools: &'static [(&'static str, &'static [&'static str])],
    together: bool,
    rdma_extra: &str,
    tag: &str,
) -> serde_json::Value {
    let kernel = softcard_testkit::kernel();
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = tools
        .iter()
        .map(|(t, _)| format!("/usr/bin/{t}"))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let initrd = rxe_initramfs(&kernel, &guest_script(tools, together), dir.path(), &names);

    let ns = Arc::new(tap_netns(tag));
    let sock = dir.path().join("rdma.sock");
    let config = dir.path().join("card.toml");
    std::fs::write(
        &config,
        format!(
            "api_socket = \"{}\"\nrdma_socket = \"{}\"\n[[rdma]]\naddress = \"10.77.0.1\"\n{rdma_extra}",
            dir.path().join("api.sock").display(),
            sock.display()
        ),
    )
    .unwrap();
    let _card = Kill(
        ns.command(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .expect("softcard serve"),
    );
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(sock.exists(), "the card daemon did not start");

    // Set once the guest has powered off or been killed: a host client
    // stops waiting for a server that will never listen.
    let guest_done = Arc::new(AtomicBool::new(false));
    let host = {
        let ns = ns.clone();
        let sock = sock.clone();
        let guest_done = guest_done.clone();
        std::thread::spawn(move || {
            let run = |st: &Step, port: u16, peer: Option<&str>| -> Output {
                let mut c: Command = ns.command(BIN);
                c.args(["rdma", "exec", "--socket"])
                    .arg(&sock)
                    .arg("--")
                    .arg(st.tool)
                    .args(options(st.tool, "softcard0", "0", port))
                    .args(st.args)
                    .args(peer);
                output_within(&mut c, TOOL_LIMIT)
            };
            // A client, again while its server does not listen yet (a
            // guest's server starts when the guest's previous step ends)
            // and the guest still runs; any other failure is the step's.
            let retry = |st: Step, port: u16, peer: &'static str| {
                let run = &run;
                let guest_done = &guest_done;
                move || loop {
                    let o = run(&st, port, Some(peer));
                    let refused = !o.status.success()
                        && [&o.stdout, &o.stderr]
                            .iter()
                            .any(|b| String::from_utf8_lossy(b).contains("Couldn't connect"));
                    if !refused || guest_done.load(Ordering::Relaxed) {
                        break o;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            };
            let mut outs = Vec::new();
            for (i, st) in steps(tools).into_iter().enumerate() {
                let port = 18600 + i as u16;
                let what = format!(
                    "host step {i} {} {:?} (host {})",
                    st.tool,
                    st.args,
                    if st.guest_client { "server" } else { "client" }
                );
                let o = if st.guest_client {
                    run(&st, port, None)
                } else {
                    retry(st, port, "10.77.0.2")()
                };
                // Progress, for a run that fails: the tool's own lines
                // name what went wrong.
                eprintln!("{what}: {}", o.status);
                outs.push(o);
            }
            if !together {
                return (outs, Vec::new());
            }
            // Then at the same time: two host applications against the
            // guest's two servers, and two more against each other, all
            // through the one daemon.
            let with = |tool: &'static str, args: &'static [&'static str]| Step {
                tool,
                args,
                guest_client: false,
            };
            let pp: &'static [&'static str] = &["-s", "4096", "-n", "100", "-c"];
            let pp_local: &'static [&'static str] = &["-s", "4096", "-n", "300", "-c"];
            let together = std::thread::scope(|s| {
                let g1 = s.spawn(retry(with("ibv_rc_pingpong", pp), 18690, "10.77.0.2"));
                let g2 = s.spawn(retry(
                    with("ib_write_bw", &["-s", "65536", "-n", "200", "-F"]),
                    18691,
                    "10.77.0.2",
                ));
                let server = s.spawn(|| run(&with("ibv_rc_pingpong", pp_local), 18692, None));
                let client = s.spawn(retry(with("ibv_rc_pingpong", pp_local), 18692, "10.77.0.1"));
                [g1, g2, server, client].map(|t| t.join().unwrap()).to_vec()
            });
            (outs, together)
        })
    };

    let console = run_guest(&ns, &kernel, &initrd, "52:54:00:12:34:61", GUEST_LIMIT);
    guest_done.store(true, Ordering::Relaxed);
    assert!(
        console.contains("SOFTCARD-DONE"),
        "the guest did not finish its steps: {console}"
    );
    let (host, at_once) = host.join().unwrap();
    assert!(!console.contains("SOFTCARD-FAIL"), "{console}");
    for (i, (st, o)) in steps(tools).iter().zip(&host).enumerate() {
        let role = if st.guest_client {
            "host server"
        } else {
            "host client"
        };
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && reported(st.tool, &out),
            "{} {:?} as {role}: {out}{err}",
            st.tool,
            st.args
        );
        let tag = format!("SOFTCARD-LOG-{i} ");
        let guest: String = console
            .lines()
            .filter_map(|l| l.strip_prefix(&tag))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(
            console.contains(&format!("SOFTCARD-STEP-{i} rc=0")) && reported(st.tool, &guest),
            "{} {:?}, guest's side ({role} on the host): {guest}",
            st.tool,
            st.args
        );
    }
    let stats: serde_json::Value = serde_json::from_slice(
        &output_within(
            ns.command(BIN)
                .args(["rdma", "list", "--json", "--api"])
                .arg(dir.path().join("api.sock")),
            TOOL_LIMIT,
        )
        .stdout,
    )
    .expect("softcard rdma list --json");
    if !together {
        return stats;
    }
    for (i, (what, tool)) in [
        ("guest's pingpong", "ibv_rc_pingpong"),
        ("guest's ib_write_bw", "ib_write_bw"),
        ("host server", "ibv_rc_pingpong"),
        ("host client", "ibv_rc_pingpong"),
    ]
    .into_iter()
    .enumerate()
    {
        let o = &at_once[i];
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && reported(tool, &out),
            "at the same time, {what}: {out}{err}"
        );
    }
    for i in 1..=2 {
        let tag = format!("SOFTCARD-TLOG-{i} ");
        let guest: String = console
            .lines()
            .filter_map(|l| l.strip_prefix(&tag))
            .map(|l| format!("{l}\n"))
            .collect();
        let tool = if i == 1 {
            "ibv_rc_pingpong"
        } else {
            "ib_write_bw"
        };
        assert!(
            console.contains(&format!("SOFTCARD-TOGETHER-{i} rc=0")) && reported(tool, &guest),
            "the guest's {tool} beside the others: {guest}"
        );
    }
    stats
}
