//! perftest against Linux Soft-RoCE: a QEMU guest (TCG) loads rdma_rxe on
//! a virtio-net NIC behind a tap device in a network namespace this test
//! creates and runs Debian's perftest tools (`ib_write_bw`, `ib_read_bw`,
//! the latency tools, atomics); on the host, this crate's engine answers
//! them by speaking perftest's own out-of-band exchange. Each test passes
//! only when the guest's tool reports success.
//!
//! Needs root (network namespace, tap), qemu-system-x86, linux-image-amd64,
//! busybox-static, perftest, rdma-core, ibverbs-providers, iproute2; the
//! README's test command installs them.

mod rxe_host;

use std::time::{Duration, Instant};

use rxe_host::{connect_when_listening, on_host};
use softcard_testkit::rxe::{run_guest, rxe_initramfs, tap_netns, GUEST};

/// How long the guest may run before it is killed and the test fails.
const GUEST_LIMIT: Duration = Duration::from_secs(300);

const PERFTEST_INIT: &str = r#"
$B ip link set lo up
$B ip link set eth0 up
$B ip addr add 10.77.0.2/24 dev eth0
/usr/bin/rdma link add rxe0 type rxe netdev eth0 || echo "SOFTCARD-FAIL rdma link add"
$B sleep 1
for t in write read atomic; do
  size="-s 65536"; [ $t = atomic ] && size=""
  /usr/bin/ib_${t}_bw -d rxe0 -x 1 $size -n 100 -F 10.77.0.1 > /tmp/$t.log 2>&1
  echo "SOFTCARD-PERF-client-$t rc=$?"
  $B sed "s/^/SOFTCARD-LOG-client-$t /" /tmp/$t.log
done
for t in write read atomic; do
  size="-s 65536"; [ $t = atomic ] && size=""
  /usr/bin/ib_${t}_bw -d rxe0 -x 1 $size -n 100 -F > /tmp/$t.log 2>&1
  echo "SOFTCARD-PERF-server-$t rc=$?"
  $B sed "s/^/SOFTCARD-LOG-server-$t /" /tmp/$t.log
done
$B poweroff -f
"#;

/// perftest's version as Debian's perftest 4.5-0.17 reports it (the
/// client refuses peers older than 5.70).
const PERFTEST_VERSION: &[u8] = b"6.06";
/// A key message with a GID: `lid:out_reads:qpn:psn:rkey:vaddr:gid
/// bytes:srqn:`, NUL-padded.
const PERFTEST_KEYS: usize = 108;

/// Reads exactly `n` bytes from a non-blocking socket, driving the engine
/// while it waits (the peer's work needs our ACKs and READ responses).
fn read_driving(
    eng: &mut softcard_rdma::rc::Engine,
    c: &mut std::net::TcpStream,
    n: usize,
) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while got < n {
        assert!(Instant::now() < deadline, "perftest peer went quiet");
        match c.read(&mut buf[got..]) {
            Ok(0) => panic!("perftest peer closed after {got} of {n} bytes"),
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                eng.poll(Duration::from_millis(1)).unwrap();
            }
            Err(e) => panic!("perftest socket: {e}"),
        }
    }
    buf
}

/// One `ctx_xchg_data`: perftest's client writes its side first, the
/// server reads first; both send the same size.
fn xchg(
    eng: &mut softcard_rdma::rc::Engine,
    c: &mut std::net::TcpStream,
    ours: &[u8],
    client: bool,
) -> Vec<u8> {
    use std::io::Write;
    if client {
        c.write_all(ours).unwrap();
        read_driving(eng, c, ours.len())
    } else {
        let theirs = read_driving(eng, c, ours.len());
        c.write_all(ours).unwrap();
        theirs
    }
}

/// The start of every perftest run (TCP, no rdma_cm): versions, page and
/// cache-line sizes, the MTU, and the first exchange of QP keys (ours
/// advertise `va`/`rkey`). Returns our key message and the peer's QP
/// number, PSN, rkey and buffer address.
fn perftest_hello(
    eng: &mut softcard_rdma::rc::Engine,
    c: &mut std::net::TcpStream,
    client: bool,
    qpn: u32,
    va: u64,
    rkey: u32,
) -> (Vec<u8>, u64, u64, u64, u64) {
    c.set_nonblocking(true).unwrap();
    let mut version = [0u8; 16];
    version[..PERFTEST_VERSION.len()].copy_from_slice(PERFTEST_VERSION);
    let theirs = xchg(eng, c, &version, client);
    assert!(theirs.starts_with(b"6."), "perftest version {theirs:?}");
    xchg(eng, c, &4096u32.to_be_bytes(), client); // cycle buffer (page size)
    xchg(eng, c, &64u32.to_be_bytes(), client); // cache line
                                                // The MTU as an `enum ibv_mtu` digit: 3 is 1024, what rxe has on a
                                                // 1500-byte Ethernet link; each side takes the smaller.
    xchg(eng, c, b"3\0", client);
    let gid: Vec<String> = [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 77, 0, 1]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut keys = format!(
        "{:04x}:{:04x}:{qpn:06x}:{:06x}:{rkey:08x}:{va:016x}:{}:{:08x}:",
        0,
        16,
        0x33,
        gid.join(":"),
        0
    )
    .into_bytes();
    assert_eq!(keys.len(), PERFTEST_KEYS - 1);
    keys.push(0);
    let theirs = xchg(eng, c, &keys, client);
    let text = String::from_utf8_lossy(&theirs);
    let f: Vec<&str> = text.split(':').collect();
    let field = |i: usize| u64::from_str_radix(f[i], 16).unwrap();
    (keys, field(2), field(3), field(4), field(5))
}

/// A perftest peer's QP, connected: the common start
/// ([`perftest_hello`]), `early` more key exchanges (the latency tools
/// have one before connecting), our QP connected to the peer's, and the
/// two exchanges after connecting and after RTR.
struct PerftestQp {
    keys: Vec<u8>,
    qp: usize,
    peer_rkey: u32,
    peer_va: u64,
}

fn perftest_connect(
    eng: &mut softcard_rdma::rc::Engine,
    c: &mut std::net::TcpStream,
    client: bool,
    qpn: u32,
    (va, rkey): (u64, u32),
    early: usize,
) -> PerftestQp {
    let (keys, peer_qpn, peer_psn, peer_rkey, peer_va) =
        perftest_hello(eng, c, client, qpn, va, rkey);
    for _ in 0..early {
        xchg(eng, c, &keys, client);
    }
    let qp = eng.create_qp(qpn);
    eng.set_mtu(qp, 1024);
    eng.connect(qp, peer_qpn as u32, GUEST, peer_psn as u32, 0x33);
    xchg(eng, c, &keys, client); // after both connected their QPs
    xchg(eng, c, &keys, client); // after RTR
    PerftestQp {
        keys,
        qp,
        peer_rkey: u32::try_from(peer_rkey).expect("a 32-bit rkey"),
        peer_va,
    }
}

/// What a perftest peer reported (as the server, the client's figures).
#[derive(Debug)]
struct PerftestRun {
    /// The peer's bandwidth average, in MB/s (perftest's default unit).
    bw_avg: f64,
    /// Iterations the peer reported.
    iters: u64,
}

/// Which perftest run this side drives as the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Write,
    Read,
    /// perftest's default atomic: FETCH_AND_ADD of 8 bytes.
    Atomic,
}

const PERFTEST_ITERS: u64 = 100;
const PERFTEST_SIZE: usize = 65536;

/// perftest's out-of-band exchange (TCP, no rdma_cm), in the order
/// `ib_write_bw` and `ib_read_bw` run it, with this crate's engine as the
/// RDMA side: versions, page and cache-line sizes, MTU, the QP keys three
/// times (before and after connecting, then a sync), the client's run, a
/// sync, the bandwidth reports, a last sync and "done". As the server
/// (`drive` is `None`) the engine only answers; as the client it runs
/// `PERFTEST_ITERS` WRITEs or READs of `PERFTEST_SIZE` bytes against the
/// peer's buffer and reports what it measured.
fn perftest_peer(
    eng: &mut softcard_rdma::rc::Engine,
    c: &mut std::net::TcpStream,
    qpn: u32,
    mr: usize,
    drive: Option<Verb>,
) -> PerftestRun {
    let client = drive.is_some();
    let at = (eng.mr(mr).va, eng.mr(mr).rkey);
    let PerftestQp {
        keys,
        qp,
        peer_rkey,
        peer_va,
    } = perftest_connect(eng, c, client, qpn, at, 0);
    let mut ours = [0u64; 5];
    if let Some(verb) = drive {
        let (bw, rate) = perftest_run(eng, qp, mr, verb, peer_va, peer_rkey);
        ours = [
            if verb == Verb::Atomic {
                8
            } else {
                PERFTEST_SIZE as u64
            },
            PERFTEST_ITERS,
            bw.to_bits(),
            bw.to_bits(),
            rate.to_bits(),
        ];
    }
    // The client comes back when all its work completed, which needs the
    // server's ACKs or READ responses: `read_driving` polls meanwhile.
    xchg(eng, c, &keys, client);
    let mut report = [0u64; 5];
    for (theirs, ours) in report.iter_mut().zip(ours) {
        // Size, iterations, peak, average, message rate.
        *theirs = u64::from_be_bytes(
            xchg(eng, c, &ours.to_be_bytes(), client)
                .try_into()
                .unwrap(),
        );
    }
    xchg(eng, c, &keys, client);
    use std::io::Write;
    c.write_all(b"done\0").unwrap();
    eng.flush().unwrap();
    PerftestRun {
        bw_avg: f64::from_bits(report[3]),
        iters: report[1],
    }
}

/// Our side of a perftest run as the client: `PERFTEST_ITERS` operations,
/// 8 in flight, against the peer's buffer; bandwidth in MB/s (2^20 bytes,
/// as perftest reports) and message rate in Mpps.
fn perftest_run(
    eng: &mut softcard_rdma::rc::Engine,
    qp: usize,
    mr: usize,
    verb: Verb,
    peer_va: u64,
    peer_rkey: u32,
) -> (f64, f64) {
    use softcard_rdma::rc::{WcOpcode, WcStatus};
    let start = Instant::now();
    let deadline = start + Duration::from_secs(120);
    let (mut posted, mut done, mut inflight) = (0u64, 0u64, 0);
    while done < PERFTEST_ITERS {
        assert!(
            Instant::now() < deadline,
            "{verb:?}: {done} of {PERFTEST_ITERS} done"
        );
        while inflight < 8 && posted < PERFTEST_ITERS {
            match verb {
                Verb::Write => eng
                    .post_write(qp, posted, mr, 0, PERFTEST_SIZE, peer_va, peer_rkey, None)
                    .unwrap(),
                Verb::Read => eng
                    .post_read(qp, posted, mr, 0, PERFTEST_SIZE, peer_va, peer_rkey)
                    .unwrap(),
                Verb::Atomic => eng
                    .post_fetch_add(qp, posted, mr, 8 * posted as usize, peer_va, peer_rkey, 1)
                    .unwrap(),
            }
            posted += 1;
            inflight += 1;
        }
        eng.poll(Duration::from_millis(1)).unwrap();
        while let Some(c) = eng.cq.pop_front() {
            assert_eq!(c.status, WcStatus::Success, "{c:?}");
            assert!(matches!(
                c.opcode,
                WcOpcode::RdmaWrite | WcOpcode::RdmaRead | WcOpcode::FetchAdd
            ));
            done += 1;
            inflight -= 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let size = if verb == Verb::Atomic {
        8
    } else {
        PERFTEST_SIZE
    };
    let bytes = (PERFTEST_ITERS as usize * size) as f64;
    (
        bytes / secs / f64::from(1 << 20),
        PERFTEST_ITERS as f64 / secs / 1e6,
    )
}

/// perftest against the engine, both directions: `ib_write_bw`,
/// `ib_read_bw` (100 messages of 64 KiB, 1024-byte MTU) and `ib_atomic_bw`
/// (100 fetch-and-adds of 8 bytes) on rdma_rxe in the
/// guest, first as clients of a server built on this crate's engine (the
/// guest's rxe writes into and reads from a region the engine registered),
/// then as servers that the engine drives (it writes into and reads from
/// the guest's buffer). The test passes when all four runs of the tools
/// exit successfully and the engine placed (WRITE, READ responses) or
/// served (READ requests) at least what was asked.
#[test]
fn perftest_write_and_read_bandwidth_against_our_engine() {
    use softcard_rdma::rc::Access;

    let kernel = softcard_testkit::kernel();
    let dir = tempfile::tempdir().unwrap();
    let initrd = rxe_initramfs(
        &kernel,
        PERFTEST_INIT,
        dir.path(),
        &[
            "/usr/bin/ib_write_bw",
            "/usr/bin/ib_read_bw",
            "/usr/bin/ib_atomic_bw",
        ],
    );

    let ns = std::sync::Arc::new(tap_netns("pf"));
    let host = on_host(&ns, move |mut eng, tcp| {
        let mut runs = Vec::new();
        for (i, verb) in ["write", "read", "atomic"].into_iter().enumerate() {
            let (mut c, _) = tcp.accept().unwrap();
            let mr = eng.reg_mr(
                1 << 20,
                Access {
                    remote_write: true,
                    remote_read: true,
                    local_write: true,
                    remote_atomic: true,
                },
            );
            let before = eng.stats;
            let run = perftest_peer(&mut eng, &mut c, 0x41 + i as u32, mr, None);
            runs.push(("guest-client", verb, run, before, eng.stats));
        }
        // Guest as server: we connect when it listens, and drive.
        for (i, verb) in [Verb::Write, Verb::Read, Verb::Atomic]
            .into_iter()
            .enumerate()
        {
            let mut c = connect_when_listening();
            let mr = eng.reg_mr(
                1 << 20,
                Access {
                    remote_write: true,
                    remote_read: true,
                    local_write: true,
                    remote_atomic: true,
                },
            );
            let before = eng.stats;
            let run = perftest_peer(&mut eng, &mut c, 0x51 + i as u32, mr, Some(verb));
            let name = match verb {
                Verb::Write => "write",
                Verb::Read => "read",
                Verb::Atomic => "atomic",
            };
            runs.push(("guest-server", name, run, before, eng.stats));
        }
        runs
    });
    let console = run_guest(&ns, &kernel, &initrd, "52:54:00:12:34:58", GUEST_LIMIT);
    for l in console.lines().filter(|l| l.starts_with("SOFTCARD-")) {
        eprintln!("guest: {l}");
    }
    assert!(!console.contains("SOFTCARD-FAIL"), "{console}");
    // Checked before joining the host side, which would wait forever for
    // a tool that never ran.
    for role in ["client", "server"] {
        for t in ["write", "read", "atomic"] {
            assert!(
                console.contains(&format!("SOFTCARD-PERF-{role}-{t} rc=0")),
                "guest ib_{t}_bw as {role} failed:\n{console}"
            );
        }
    }
    let runs = host.join().unwrap();
    for (role, verb, run, before, after) in &runs {
        eprintln!("{role} ib_{verb}_bw: peer reported {run:?}; engine {after:?}");
        if *role == "guest-server" {
            // The server answers with zeros, as perftest servers do; the
            // guest printed our figures (see its log above).
            assert_eq!(after.dropped, before.dropped, "{verb}");
            if *verb == "read" {
                assert!(
                    after.fast_bytes - before.fast_bytes >= 100 * 65536,
                    "READ responses placed: {before:?} -> {after:?}"
                );
            }
            if *verb == "atomic" {
                // Every fetch-and-add's original value came back placed.
                assert!(
                    after.fast_bytes - before.fast_bytes >= 100 * 8,
                    "atomic ACKs placed: {before:?} -> {after:?}"
                );
            }
            continue;
        }
        assert!(run.iters >= PERFTEST_ITERS, "{verb}: {run:?}");
        // perftest prints MB/s with two decimals: 100 8-byte atomics
        // under TCG (slower still with other guests booting beside it)
        // round to 0.00, so the atomic run is judged by its iterations
        // and by the atomics this engine executed (below).
        assert!(run.bw_avg > 0.0 || *verb == "atomic", "{verb}: {run:?}");
        assert_eq!(after.dropped, before.dropped, "{verb}");
        let payload = 100 * 65536;
        if *verb == "write" {
            // Every WRITE packet went through the placement fast path.
            assert!(
                after.fast_bytes - before.fast_bytes >= payload,
                "{verb}: {before:?} -> {after:?}"
            );
        } else if *verb == "atomic" {
            // rxe's fetch-and-adds ran here, each once.
            assert!(
                after.atomics - before.atomics >= PERFTEST_ITERS,
                "{verb}: {before:?} -> {after:?}"
            );
        } else {
            // Each READ request was answered in software, 64 responses each.
            assert!(
                after.slow_packets - before.slow_packets >= 100,
                "{verb}: {before:?} -> {after:?}"
            );
        }
    }
}

const LAT_INIT: &str = r#"
$B ip link set lo up
$B ip link set eth0 up
$B ip addr add 10.77.0.2/24 dev eth0
/usr/bin/rdma link add rxe0 type rxe netdev eth0 || echo "SOFTCARD-FAIL rdma link add"
$B sleep 1
for t in write send read atomic; do
  size="-s 64"; [ $t = atomic ] && size=""
  /usr/bin/ib_${t}_lat -d rxe0 -x 1 $size -n 200 -F 10.77.0.1 > /tmp/lat.log 2>&1
  echo "SOFTCARD-LAT-client-$t rc=$?"
  $B sed "s/^/SOFTCARD-LOG-client-$t /" /tmp/lat.log
  /usr/bin/ib_${t}_lat -d rxe0 -x 1 $size -n 200 -F > /tmp/lat.log 2>&1
  echo "SOFTCARD-LAT-server-$t rc=$?"
  $B sed "s/^/SOFTCARD-LOG-server-$t /" /tmp/lat.log
done
$B poweroff -f
"#;

const LAT_ITERS: u64 = 200;
const LAT_SIZE: usize = 64;
/// Where in our region the peer's WRITEs land (the address we advertise).
const LAT_RECV_OFF: usize = 4096;

/// perftest's `ib_write_lat` ping-pong with the engine as the other side:
/// the same start as the bandwidth tools, a fourth key exchange, then
/// `LAT_ITERS` rounds in which each side WRITEs `LAT_SIZE` bytes into the
/// other's buffer with an iteration count in the last byte, and waits for
/// the other's count to appear in its own buffer (the server sends
/// first). Returns how many rounds saw the peer's count arrive in order.
fn perftest_write_lat(
    eng: &mut softcard_rdma::rc::Engine,
    c: &mut std::net::TcpStream,
    qpn: u32,
    mr: usize,
    client: bool,
) -> u64 {
    use softcard_rdma::rc::{WcOpcode, WcStatus};
    let at = (eng.mr(mr).va + LAT_RECV_OFF as u64, eng.mr(mr).rkey);
    let PerftestQp {
        qp,
        peer_rkey,
        peer_va,
        ..
    } = perftest_connect(eng, c, client, qpn, at, 1);
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut scnt, mut rcnt, mut ccnt, mut in_order) = (0u64, 0u64, 0u64, 0u64);
    while scnt < LAT_ITERS || rcnt < LAT_ITERS || ccnt < LAT_ITERS {
        assert!(
            Instant::now() < deadline,
            "write_lat stalled: sent {scnt}, received {rcnt}, completed {ccnt}"
        );
        if rcnt < LAT_ITERS && (client || scnt != 0) {
            rcnt += 1;
            let want = rcnt as u8;
            loop {
                let got = eng.mr(mr).bytes()[LAT_RECV_OFF + LAT_SIZE - 1];
                if got == want {
                    in_order += 1;
                    break;
                }
                assert!(Instant::now() < deadline, "round {rcnt}: last byte {got}");
                eng.poll(Duration::from_micros(200)).unwrap();
            }
        }
        if scnt < LAT_ITERS {
            scnt += 1;
            eng.fill(mr, LAT_SIZE - 1, &[scnt as u8]);
            eng.post_write(qp, scnt, mr, 0, LAT_SIZE, peer_va, peer_rkey, None)
                .unwrap();
        }
        if ccnt < LAT_ITERS {
            loop {
                if let Some(c) = eng.cq.pop_front() {
                    assert_eq!(
                        (c.opcode, c.status),
                        (WcOpcode::RdmaWrite, WcStatus::Success),
                        "{c:?}"
                    );
                    ccnt += 1;
                    break;
                }
                assert!(Instant::now() < deadline, "no completion for write {scnt}");
                eng.poll(Duration::from_micros(200)).unwrap();
            }
        }
    }
    // The peer's last WRITE is acknowledged before we stop.
    eng.flush().unwrap();
    in_order
}

/// perftest's `ib_send_lat` ping-pong with the engine as the other side:
/// receives posted for every round before the fourth key exchange, then
/// `LAT_ITERS` rounds of a `LAT_SIZE`-byte SEND each way (the client sends
/// first), then `ctx_close_connection` (a fifth exchange and "done",
/// which `ib_write_lat` does not do). Returns how many receives completed
/// with the full message.
fn perftest_send_lat(
    eng: &mut softcard_rdma::rc::Engine,
    c: &mut std::net::TcpStream,
    qpn: u32,
    mr: usize,
    client: bool,
) -> u64 {
    use softcard_rdma::rc::{RecvWr, WcOpcode, WcStatus};
    let at = (eng.mr(mr).va, eng.mr(mr).rkey);
    let PerftestQp { keys, qp, .. } = perftest_connect(eng, c, client, qpn, at, 0);
    for i in 0..LAT_ITERS {
        eng.post_recv(
            qp,
            RecvWr {
                wr_id: 1000 + i,
                mr,
                offset: LAT_RECV_OFF,
                len: LAT_SIZE,
            },
        );
    }
    xchg(eng, c, &keys, client); // receives posted on both sides
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut scnt, mut rcnt, mut acked, mut full) = (0u64, 0u64, 0u64, 0u64);
    let mut take = |eng: &mut softcard_rdma::rc::Engine, rcnt: &mut u64, acked: &mut u64| {
        while let Some(c) = eng.cq.pop_front() {
            assert_eq!(c.status, WcStatus::Success, "{c:?}");
            match c.opcode {
                WcOpcode::Recv => {
                    *rcnt += 1;
                    full += u64::from(c.byte_len as usize == LAT_SIZE);
                }
                WcOpcode::Send => *acked += 1,
                other => panic!("unexpected completion {other:?}"),
            }
        }
    };
    while scnt < LAT_ITERS || rcnt < LAT_ITERS {
        if rcnt < LAT_ITERS && (scnt != 0 || !client) {
            let want = rcnt + 1;
            while rcnt < want {
                assert!(
                    Instant::now() < deadline,
                    "send_lat stalled: sent {scnt}, received {rcnt}"
                );
                eng.poll(Duration::from_micros(200)).unwrap();
                take(eng, &mut rcnt, &mut acked);
            }
        }
        if scnt < LAT_ITERS {
            scnt += 1;
            eng.post_send(qp, scnt, mr, 0, LAT_SIZE).unwrap();
            take(eng, &mut rcnt, &mut acked);
        }
    }
    while acked < LAT_ITERS {
        assert!(
            Instant::now() < deadline,
            "{acked} of {LAT_ITERS} SENDs acknowledged"
        );
        eng.poll(Duration::from_micros(200)).unwrap();
        take(eng, &mut rcnt, &mut acked);
    }
    // `ctx_close_connection`: a last key exchange and "done".
    xchg(eng, c, &keys, client);
    use std::io::Write;
    c.write_all(b"done\0").unwrap();
    eng.flush().unwrap();
    full
}

/// perftest's `ib_read_lat` (or, with `atomic`, `ib_atomic_lat`) with the
/// engine as the other side: four key exchanges, then the client READs
/// `LAT_SIZE` bytes (or runs an 8-byte fetch-and-add) `LAT_ITERS` times,
/// one at a time, while the server only answers; both end with
/// `ctx_close_connection`. As the client, returns the operations
/// completed; as the server, the requests answered.
fn perftest_read_lat(
    eng: &mut softcard_rdma::rc::Engine,
    c: &mut std::net::TcpStream,
    qpn: u32,
    mr: usize,
    client: bool,
    atomic: bool,
) -> u64 {
    use softcard_rdma::rc::{WcOpcode, WcStatus};
    let at = (eng.mr(mr).va, eng.mr(mr).rkey);
    let PerftestQp {
        keys,
        qp,
        peer_rkey,
        peer_va,
    } = perftest_connect(eng, c, client, qpn, at, 1);
    let before = eng.stats.slow_packets;
    let mut done = 0;
    if client {
        let deadline = Instant::now() + Duration::from_secs(120);
        let want = if atomic {
            (WcOpcode::FetchAdd, WcStatus::Success, 8)
        } else {
            (WcOpcode::RdmaRead, WcStatus::Success, LAT_SIZE)
        };
        for i in 0..LAT_ITERS {
            let rkey = peer_rkey;
            if atomic {
                eng.post_fetch_add(qp, i, mr, 0, peer_va, rkey, 1).unwrap();
            } else {
                eng.post_read(qp, i, mr, 0, LAT_SIZE, peer_va, rkey)
                    .unwrap();
            }
            loop {
                if let Some(c) = eng.cq.pop_front() {
                    assert_eq!((c.opcode, c.status, c.byte_len as usize), want, "{c:?}");
                    done += 1;
                    break;
                }
                assert!(Instant::now() < deadline, "READ {i} never completed");
                eng.poll(Duration::from_micros(200)).unwrap();
            }
        }
    }
    // `ctx_close_connection`: the server waits here (answering READs
    // meanwhile) until the client has finished.
    xchg(eng, c, &keys, client);
    use std::io::Write;
    c.write_all(b"done\0").unwrap();
    eng.flush().unwrap();
    if client {
        done
    } else {
        eng.stats.slow_packets - before
    }
}

/// perftest's `ib_write_lat`, `ib_send_lat`, `ib_read_lat` and
/// `ib_atomic_lat` on rdma_rxe in the guest against the engine, the guest
/// as client and as server: 200 rounds of 64-byte WRITEs (every count
/// arriving in order), SENDs (every receive complete), READs (each
/// answered, or completed whole) or fetch-and-adds (each run once, or
/// completed), all eight runs of the tools exiting 0 with a latency
/// report from each side that measures.
#[test]
fn perftest_latency_tools_against_our_engine() {
    use softcard_rdma::rc::Access;

    let kernel = softcard_testkit::kernel();
    let dir = tempfile::tempdir().unwrap();
    let initrd = rxe_initramfs(
        &kernel,
        LAT_INIT,
        dir.path(),
        &[
            "/usr/bin/ib_write_lat",
            "/usr/bin/ib_send_lat",
            "/usr/bin/ib_read_lat",
            "/usr/bin/ib_atomic_lat",
        ],
    );
    let ns = std::sync::Arc::new(tap_netns("lat"));
    let host = on_host(&ns, move |mut eng, tcp| {
        let access = Access {
            remote_write: true,
            remote_read: false,
            local_write: true,
            remote_atomic: false,
        };
        let read_access = Access {
            remote_read: true,
            ..access
        };
        let atomic_access = Access {
            remote_atomic: true,
            ..access
        };
        let (mut c, _) = tcp.accept().unwrap();
        let mr = eng.reg_mr(2 * LAT_RECV_OFF, access);
        let write_server = perftest_write_lat(&mut eng, &mut c, 0x61, mr, false);
        let mut c = connect_when_listening();
        let mr = eng.reg_mr(2 * LAT_RECV_OFF, access);
        let write_client = perftest_write_lat(&mut eng, &mut c, 0x62, mr, true);
        let (mut c, _) = tcp.accept().unwrap();
        let mr = eng.reg_mr(2 * LAT_RECV_OFF, access);
        let send_server = perftest_send_lat(&mut eng, &mut c, 0x63, mr, false);
        let mut c = connect_when_listening();
        let mr = eng.reg_mr(2 * LAT_RECV_OFF, access);
        let send_client = perftest_send_lat(&mut eng, &mut c, 0x64, mr, true);
        let (mut c, _) = tcp.accept().unwrap();
        let mr = eng.reg_mr(2 * LAT_RECV_OFF, read_access);
        let read_server = perftest_read_lat(&mut eng, &mut c, 0x65, mr, false, false);
        let mut c = connect_when_listening();
        let mr = eng.reg_mr(2 * LAT_RECV_OFF, read_access);
        let read_client = perftest_read_lat(&mut eng, &mut c, 0x66, mr, true, false);
        let (mut c, _) = tcp.accept().unwrap();
        let mr = eng.reg_mr(2 * LAT_RECV_OFF, atomic_access);
        let before = eng.stats.atomics;
        perftest_read_lat(&mut eng, &mut c, 0x67, mr, false, true);
        let atomic_server = eng.stats.atomics - before;
        let mut c = connect_when_listening();
        let mr = eng.reg_mr(2 * LAT_RECV_OFF, atomic_access);
        let atomic_client = perftest_read_lat(&mut eng, &mut c, 0x68, mr, true, true);
        (
            [
                write_server,
                write_client,
                send_server,
                send_client,
                read_server,
                read_client,
                atomic_server,
                atomic_client,
            ],
            eng.stats,
        )
    });
    let console = run_guest(&ns, &kernel, &initrd, "52:54:00:12:34:59", GUEST_LIMIT);
    for l in console.lines().filter(|l| l.starts_with("SOFTCARD-")) {
        eprintln!("guest: {l}");
    }
    assert!(!console.contains("SOFTCARD-FAIL"), "{console}");
    // Checked before joining the host side, which would wait forever for
    // a tool that never ran.
    for t in ["write", "send", "read", "atomic"] {
        for role in ["client", "server"] {
            assert!(
                console.contains(&format!("SOFTCARD-LAT-{role}-{t} rc=0")),
                "guest ib_{t}_lat as {role} failed:\n{console}"
            );
        }
    }
    let (rounds, stats) = host.join().unwrap();
    eprintln!("engine: {stats:?}");
    // As the READ server, the engine answered each of the guest's READ
    // requests (at least one packet each, in software).
    assert_eq!(rounds[..4], [LAT_ITERS; 4]);
    assert!(
        rounds[4] >= LAT_ITERS,
        "READ requests answered: {}",
        rounds[4]
    );
    assert_eq!(rounds[5], LAT_ITERS);
    // The guest's fetch-and-adds ran here exactly once each; ours all
    // completed.
    assert_eq!(rounds[6..], [LAT_ITERS; 2]);
    for t in ["write", "send", "read", "atomic"] {
        for role in ["client", "server"] {
            // The report line: size, iterations, then latency figures
            // (an `ib_read_lat` server only answers, and reports nothing).
            if matches!(t, "read" | "atomic") && role == "server" {
                continue;
            }
            let size = if t == "atomic" { 8 } else { 64 };
            let prefix = format!("SOFTCARD-LOG-{role}-{t}  {size} ");
            assert!(
                console
                    .lines()
                    .any(|l| l.starts_with(&prefix) && l.contains("200")),
                "no latency report from ib_{t}_lat as {role}:\n{console}"
            );
        }
    }
    assert_eq!(stats.dropped, 0);
}
