//! Reliability under faults: two engines on a private namespace's loopback,
//! each injecting seeded faults into what it sends (2 % loss, 1 %
//! duplication, 1 % reordering, 0.5 % corruption). 256 MiB of RDMA WRITE
//! and SEND traffic must arrive intact, in order, with every completion
//! exactly once. (`SOFTCARD_FAULT_MIB` changes the amount.)

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use softcard_rdma::net::Faults;
use softcard_rdma::rc::{Access, Engine, RecvWr, WcOpcode, WcStatus};

const A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const WRITE_MSG: usize = 1 << 20;
const SEND_MSG: usize = 64 << 10;
const RECVS: usize = 32;
const IN_FLIGHT: usize = 8;

fn fill(k: u64, len: usize) -> Vec<u8> {
    let mut x = k.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn faults(seed: u64) -> Faults {
    Faults {
        seed,
        drop_ppm: 20_000,
        dup_ppm: 10_000,
        reorder_ppm: 10_000,
        corrupt_ppm: 5_000,
    }
}

#[test]
fn traffic_arrives_intact_under_faults_packet_by_packet() {
    under_faults(false);
}

/// The same with runs of packets sent as UDP GSO datagrams, which the
/// injector drops, duplicates, reorders and corrupts as a whole.
#[test]
fn traffic_arrives_intact_under_faults_in_gso_datagrams() {
    under_faults(true);
}

fn under_faults(gso: bool) {
    let mib: usize = std::env::var("SOFTCARD_FAULT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let writes = mib / 2 * (1 << 20) / WRITE_MSG;
    let sends = mib / 2 * (1 << 20) / SEND_MSG;
    let ns = softcard_testkit::Netns::new(if gso { "fltg" } else { "flt" });
    let t = std::thread::spawn(move || {
        ns.enter();
        let mut a = Engine::open(A).expect("engine (needs CAP_NET_RAW)");
        let mut b = Engine::open(B).unwrap();
        a.set_faults(faults(11));
        b.set_faults(faults(29));
        a.set_gso(gso);
        b.set_gso(gso);
        assert_eq!(b.gso(), gso, "this kernel passed the GSO probe");
        let (qa, qb) = (a.create_qp(0x100), b.create_qp(0x200));
        a.set_mtu(qa, 4096);
        b.set_mtu(qb, 4096);
        a.connect(qa, 0x200, B, 1, 900);
        b.connect(qb, 0x100, A, 900, 1);
        let target = a.reg_mr(
            writes * WRITE_MSG,
            Access {
                remote_write: true,
                remote_read: false,
                local_write: true,
                remote_atomic: false,
            },
        );
        // Receive buffers need local write access, as in verbs.
        let ring = a.reg_mr(
            RECVS * SEND_MSG,
            Access {
                local_write: true,
                ..Access::default()
            },
        );
        // One source buffer per message in flight: as with verbs, a
        // buffer stays untouched until its work completes (the engine reads
        // it again for retransmissions).
        let src = b.reg_mr(IN_FLIGHT * WRITE_MSG, Access::default());
        let (va, rkey) = (a.mr(target).va, a.mr(target).rkey);
        for i in 0..RECVS {
            a.post_recv(
                qa,
                RecvWr {
                    wr_id: i as u64,
                    mr: ring,
                    offset: i * SEND_MSG,
                    len: SEND_MSG,
                },
            );
        }
        let total = writes + sends;
        let mut posted = 0usize;
        let mut completed: BTreeMap<u64, u32> = BTreeMap::new();
        let mut received = 0usize;
        let deadline = Instant::now() + Duration::from_secs(600);
        while (completed.len() < total || received < sends) && Instant::now() < deadline {
            while posted < total && posted - completed.len() < IN_FLIGHT {
                let k = posted as u64;
                // Completions come in order, so the message that last used
                // this slot has completed.
                let slot = (posted % IN_FLIGHT) * WRITE_MSG;
                if posted < writes {
                    b.fill(src, slot, &fill(k, WRITE_MSG));
                    b.post_write(
                        qb,
                        k,
                        src,
                        slot,
                        WRITE_MSG,
                        va + (posted * WRITE_MSG) as u64,
                        rkey,
                        None,
                    )
                    .unwrap();
                } else {
                    b.fill(src, slot, &fill(k, SEND_MSG));
                    b.post_send(qb, k, src, slot, SEND_MSG).unwrap();
                }
                posted += 1;
            }
            a.poll(Duration::from_millis(1)).unwrap();
            b.poll(Duration::from_millis(1)).unwrap();
            while let Some(c) = b.cq.pop_front() {
                assert_eq!(c.status, WcStatus::Success, "{c:?}");
                *completed.entry(c.wr_id).or_default() += 1;
            }
            while let Some(c) = a.cq.pop_front() {
                assert_eq!(
                    (c.opcode, c.status, c.byte_len as usize),
                    (WcOpcode::Recv, WcStatus::Success, SEND_MSG)
                );
                // Messages arrive in order: the n-th receive holds message
                // writes + n.
                let slot = c.wr_id as usize;
                let got = &a.mr(ring).bytes()[slot * SEND_MSG..(slot + 1) * SEND_MSG];
                assert!(
                    got == &fill((writes + received) as u64, SEND_MSG)[..],
                    "SEND {received} corrupted or out of order"
                );
                received += 1;
                a.post_recv(
                    qa,
                    RecvWr {
                        wr_id: c.wr_id,
                        mr: ring,
                        offset: slot * SEND_MSG,
                        len: SEND_MSG,
                    },
                );
            }
        }
        assert_eq!(completed.len(), total, "not every work request completed");
        assert!(
            completed.values().all(|&n| n == 1),
            "a completion came twice"
        );
        assert_eq!(received, sends);
        for k in 0..writes {
            let got = &a.mr(target).bytes()[k * WRITE_MSG..(k + 1) * WRITE_MSG];
            assert!(got == &fill(k as u64, WRITE_MSG)[..], "WRITE {k} corrupted");
        }
        (a.stats, b.stats, a.injected(), b.injected())
    });
    let (sa, sb, ia, ib) = t.join().unwrap();
    eprintln!("{mib} MiB; A {sa:?} injected {ia:?}; B {sb:?} injected {ib:?}");
    // The faults really happened, and were recovered from.
    assert!(ib[0] > 0 && ib[1] > 0 && ib[2] > 0 && ib[3] > 0, "{ib:?}");
    assert!(sb.retransmits > 0, "{sb:?}");
    if gso {
        assert!(
            sb.gso_segments_sent > 0 && sa.gso_datagrams_received > 0,
            "{sb:?} {sa:?}"
        );
    } else {
        assert_eq!(sb.gso_segments_sent, 0, "{sb:?}");
    }
    assert!(
        sa.dropped > 0,
        "corrupted datagrams are dropped by the ICRC check: {sa:?}"
    );
}

/// RDMA READs, each followed by a SEND, while the responder loses 2 % of
/// what it sends. A READ is answered by its responses alone: when one of
/// them is lost and the ACK of the SEND behind it arrives, the READ is
/// not done (an implicit NAK) and is asked for again. Every READ returns
/// the responder's data, every SEND arrives once, in order.
#[test]
fn reads_complete_when_their_responses_are_lost() {
    const READS: usize = 512;
    const READ_MSG: usize = 64 << 10;
    const SEND: usize = 64;
    let ns = softcard_testkit::Netns::new("fltr");
    let t = std::thread::spawn(move || {
        ns.enter();
        let mut a = Engine::open(A).expect("engine (needs CAP_NET_RAW)");
        let mut b = Engine::open(B).unwrap();
        b.set_faults(Faults {
            seed: 5,
            drop_ppm: 20_000,
            dup_ppm: 0,
            reorder_ppm: 0,
            corrupt_ppm: 0,
        });
        let (qa, qb) = (a.create_qp(0x140), b.create_qp(0x240));
        a.set_mtu(qa, 4096);
        b.set_mtu(qb, 4096);
        a.connect(qa, 0x240, B, 1, 700);
        b.connect(qb, 0x140, A, 700, 1);
        let source = b.reg_mr(
            READS * READ_MSG,
            Access {
                remote_read: true,
                local_write: true,
                ..Access::default()
            },
        );
        for k in 0..READS {
            b.fill(source, k * READ_MSG, &fill(k as u64, READ_MSG));
        }
        let (va, rkey) = (b.mr(source).va, b.mr(source).rkey);
        let local = Access {
            local_write: true,
            ..Access::default()
        };
        let dest = a.reg_mr(READS * READ_MSG, local);
        let msgs = a.reg_mr(SEND, local);
        let inbox = b.reg_mr(RECVS * SEND, local);
        for i in 0..RECVS {
            b.post_recv(
                qb,
                RecvWr {
                    wr_id: i as u64,
                    mr: inbox,
                    offset: i * SEND,
                    len: SEND,
                },
            );
        }
        let mut posted = 0usize;
        let mut completed: BTreeMap<u64, u32> = BTreeMap::new();
        let mut received = 0usize;
        let deadline = Instant::now() + Duration::from_secs(120);
        while (completed.len() < 2 * READS || received < READS) && Instant::now() < deadline {
            while posted < READS && 2 * posted - completed.len() < IN_FLIGHT {
                let k = posted;
                a.post_read(
                    qa,
                    2 * k as u64,
                    dest,
                    k * READ_MSG,
                    READ_MSG,
                    va + (k * READ_MSG) as u64,
                    rkey,
                )
                .unwrap();
                a.post_send(qa, 2 * k as u64 + 1, msgs, 0, SEND).unwrap();
                posted += 1;
            }
            a.poll(Duration::from_millis(1)).unwrap();
            b.poll(Duration::from_millis(1)).unwrap();
            while let Some(c) = a.cq.pop_front() {
                assert_eq!(c.status, WcStatus::Success, "{c:?}");
                *completed.entry(c.wr_id).or_default() += 1;
            }
            while let Some(c) = b.cq.pop_front() {
                assert_eq!((c.opcode, c.status), (WcOpcode::Recv, WcStatus::Success));
                received += 1;
                b.post_recv(
                    qb,
                    RecvWr {
                        wr_id: c.wr_id,
                        mr: inbox,
                        offset: c.wr_id as usize * SEND,
                        len: SEND,
                    },
                );
            }
        }
        assert_eq!(
            completed.len(),
            2 * READS,
            "not every work request completed"
        );
        assert!(
            completed.values().all(|&n| n == 1),
            "a completion came twice"
        );
        assert_eq!(received, READS, "SENDs arrived more or less than once");
        for k in 0..READS {
            let got = &a.mr(dest).bytes()[k * READ_MSG..(k + 1) * READ_MSG];
            assert!(got == &fill(k as u64, READ_MSG)[..], "READ {k} differs");
        }
        (a.stats, b.injected())
    });
    let (sa, ib) = t.join().unwrap();
    eprintln!("A {sa:?}; B injected {ib:?}");
    assert!(ib[0] > 0, "responses were lost: {ib:?}");
    assert!(sa.retransmits > 0, "{sa:?}");
    // Reads whose first responses came asked for the rest only.
    assert!(sa.reads_resumed > 0, "{sa:?}");
}
