//! Two engines talking to each other over the loopback device of a private
//! network namespace: RDMA WRITE (multi-packet, with immediate), RDMA READ
//! (multi-packet), and an access violation that must write nothing.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use softcard_rdma::rc::{
    Access, Completion, Engine, PathKind, QpState, RecvWr, WcOpcode, WcStatus,
};

const A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Engines on A and B with one QP each (`qpn_a`, `qpn_b`), connected; A
/// starts at PSN `psn_a`, B at `psn_b`.
fn connected(qpn_a: u32, qpn_b: u32, psn_a: u32, psn_b: u32) -> (Engine, Engine, usize, usize) {
    let mut a = Engine::open(A).expect("engine (needs CAP_NET_RAW)");
    let mut b = Engine::open(B).unwrap();
    let (qa, qb) = (a.create_qp(qpn_a), b.create_qp(qpn_b));
    a.connect(qa, qpn_b, B, psn_b, psn_a);
    b.connect(qb, qpn_a, A, psn_a, psn_b);
    (a, b, qa, qb)
}

/// Polls both engines until `want` completions arrive at `which` (0: a,
/// 1: b).
fn pump(a: &mut Engine, b: &mut Engine, which: usize) -> Completion {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        a.poll(Duration::from_millis(2)).unwrap();
        b.poll(Duration::from_millis(2)).unwrap();
        let e = if which == 0 { &mut *a } else { &mut *b };
        if let Some(c) = e.cq.pop_front() {
            return c;
        }
        assert!(Instant::now() < deadline, "no completion");
    }
}

#[test]
fn write_read_and_protection_between_two_engines() {
    let ns = softcard_testkit::Netns::new("lo");
    let t = std::thread::spawn(move || {
        ns.enter();
        let mut a = Engine::open(A).expect("engine (needs CAP_NET_RAW)");
        let mut b = Engine::open(B).unwrap();
        let (qa, qb) = (a.create_qp(0x100), b.create_qp(0x200));
        a.set_mtu(qa, 1024);
        b.set_mtu(qb, 1024);
        a.connect(qa, 0x200, B, 5000, 7000);
        b.connect(qb, 0x100, A, 7000, 5000);
        let ma = a.reg_mr(
            65536,
            Access {
                remote_write: true,
                remote_read: true,
                local_write: true,
                remote_atomic: false,
            },
        );
        let ro = a.reg_mr(
            4096,
            Access {
                remote_write: false,
                remote_read: true,
                local_write: true,
                remote_atomic: false,
            },
        );
        let mb = b.reg_mr(
            65536,
            Access {
                remote_write: true,
                remote_read: true,
                local_write: true,
                remote_atomic: false,
            },
        );
        let (va_a, rkey_a) = (a.mr(ma).va, a.mr(ma).rkey);

        // B writes 10000 bytes (10 packets) into A at offset 100.
        let pattern: Vec<u8> = (0..10000u32).map(|i| (i % 251) as u8).collect();
        b.fill(mb, 0, &pattern);
        b.post_write(qb, 1, mb, 0, 10000, va_a + 100, rkey_a, None)
            .unwrap();
        let c = pump(&mut a, &mut b, 1);
        assert_eq!(
            (c.wr_id, c.opcode, c.status),
            (1, WcOpcode::RdmaWrite, WcStatus::Success)
        );
        assert_eq!(&a.mr(ma).bytes()[100..10100], &pattern[..]);
        assert!(
            a.cq.is_empty(),
            "a plain WRITE completes nothing at the target"
        );
        // The ten packets left B as two UDP GSO datagrams (the first
        // packet, longer by its RETH, with the second; then the other
        // eight), which stayed whole on loopback, the second too big for
        // a ring frame (the spill path), and were split and checked
        // packet by packet at A.
        assert!(b.gso(), "this kernel passed the GSO probe");
        assert_eq!(b.stats.gso_segments_sent, 10, "{:?}", b.stats);
        assert_eq!(a.stats.gso_datagrams_received, 2, "{:?}", a.stats);
        assert_eq!(a.stats.spilled, 1, "{:?}", a.stats);
        assert_eq!(a.stats.fast_packets, 10, "{:?}", a.stats);

        // B reads 7000 bytes of A back into its offset 30000.
        b.post_read(qb, 2, mb, 30000, 7000, va_a + 100, rkey_a)
            .unwrap();
        let c = pump(&mut a, &mut b, 1);
        assert_eq!(
            (c.wr_id, c.opcode, c.status, c.byte_len, c.path),
            (
                2,
                WcOpcode::RdmaRead,
                WcStatus::Success,
                7000,
                PathKind::Fast
            )
        );
        assert_eq!(&b.mr(mb).bytes()[30000..37000], &pattern[..7000]);
        // The seven READ responses (the first and last longer, with an
        // AETH) went out as GSO runs too.
        assert!(a.stats.gso_segments_sent >= 6, "{:?}", a.stats);

        // The same WRITE with every packet sent alone lands the same way.
        b.set_gso(false);
        assert!(!b.gso());
        b.post_write(qb, 4, mb, 0, 10000, va_a + 20000, rkey_a, None)
            .unwrap();
        let c = pump(&mut a, &mut b, 1);
        assert_eq!((c.wr_id, c.status), (4, WcStatus::Success));
        assert_eq!(&a.mr(ma).bytes()[20000..30000], &pattern[..]);
        assert_eq!(b.stats.gso_segments_sent, 10, "nothing more as GSO");
        b.set_gso(true);

        // WRITE with immediate consumes a receive at A and says so.
        a.post_recv(
            qa,
            RecvWr {
                wr_id: 9,
                mr: ma,
                offset: 0,
                len: 0,
            },
        );
        b.post_write(qb, 3, mb, 0, 3000, va_a + 40000, rkey_a, Some(0xfeed))
            .unwrap();
        let c = pump(&mut a, &mut b, 0);
        assert_eq!(
            (c.wr_id, c.opcode, c.imm, c.byte_len),
            (9, WcOpcode::RecvRdmaWithImm, Some(0xfeed), 3000)
        );
        assert_eq!(&a.mr(ma).bytes()[40000..43000], &pattern[..3000]);
        let c = pump(&mut a, &mut b, 1);
        assert_eq!((c.wr_id, c.status), (3, WcStatus::Success));

        // The QP state machine refuses what verbs refuses.
        let spare = b.create_qp(0x300);
        assert_eq!(b.qp_state(spare), QpState::Reset);
        assert!(
            b.post_send(spare, 77, mb, 0, 8).is_err(),
            "send on a RESET QP"
        );
        assert!(
            b.to_rts(spare, 1).is_err(),
            "RESET -> RTS skips INIT and RTR"
        );
        assert!(b.to_init(qb).is_err(), "RTS -> INIT");

        // A WRITE into a read-only region: NAK, error completion, nothing
        // written; the QP goes to ERROR and flushes its other work.
        b.post_recv(
            qb,
            RecvWr {
                wr_id: 50,
                mr: mb,
                offset: 0,
                len: 64,
            },
        );
        let before = a.mr(ro).bytes().to_vec();
        let (va_ro, rkey_ro) = (a.mr(ro).va, a.mr(ro).rkey);
        b.post_write(qb, 4, mb, 0, 512, va_ro, rkey_ro, None)
            .unwrap();
        let c = pump(&mut a, &mut b, 1);
        assert_eq!((c.wr_id, c.status), (4, WcStatus::RemoteAccessError));
        assert_eq!(a.mr(ro).bytes(), &before[..]);
        assert_eq!(b.qp_state(qb), QpState::Error);
        let c = b.cq.pop_front().expect("the posted receive is flushed");
        assert_eq!(
            (c.wr_id, c.opcode, c.status),
            (50, WcOpcode::Recv, WcStatus::Flushed)
        );
        assert!(b.post_send(qb, 5, mb, 0, 8).is_err(), "send on an ERROR QP");
        b.post_recv(
            qb,
            RecvWr {
                wr_id: 51,
                mr: mb,
                offset: 0,
                len: 64,
            },
        );
        assert_eq!(
            b.cq.pop_front().map(|c| (c.wr_id, c.status)),
            Some((51, WcStatus::Flushed))
        );
        (a.stats, b.stats)
    });
    let (sa, sb) = t.join().unwrap();
    assert!(sa.fast_bytes >= 13000, "{sa:?}");
    assert!(sb.fast_bytes >= 7000, "{sb:?}");
    assert_eq!(sa.dropped + sb.dropped, 0);
}

/// A SEND that arrives before its receive is posted: the responder answers
/// RNR NAK, the requester waits the timer the NAK names and sends again
/// until the receive is there. With `rnr_retry` 0 the same SEND fails with
/// `RnrRetryExceeded` and the QP goes to ERROR.
#[test]
fn rnr_retry_waits_for_the_receive_and_gives_up_when_told() {
    let ns = softcard_testkit::Netns::new("lo");
    let t = std::thread::spawn(move || {
        ns.enter();
        let (mut a, mut b, qa, qb) = connected(0x300, 0x400, 200, 100);
        let rw = Access {
            remote_write: true,
            remote_read: true,
            local_write: true,
            remote_atomic: false,
        };
        let (ma, mb) = (a.reg_mr(8192, rw), b.reg_mr(8192, rw));
        a.fill(ma, 0, b"not ready yet");
        a.post_send(qa, 7, ma, 0, 13).unwrap();
        // B has no receive posted: poll both for a while; only RNR NAKs.
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            a.poll(Duration::from_millis(1)).unwrap();
            b.poll(Duration::from_millis(1)).unwrap();
        }
        assert!(
            a.cq.is_empty() && b.cq.is_empty(),
            "nothing completes without a receive"
        );
        assert!(a.stats.rnr_naks >= 2, "RNR NAKs seen: {}", a.stats.rnr_naks);
        assert_eq!(a.qp_state(qa), QpState::Rts);
        // The receive arrives; the next retry lands the message.
        b.post_recv(
            qb,
            RecvWr {
                wr_id: 9,
                mr: mb,
                offset: 100,
                len: 4096,
            },
        );
        let c = pump(&mut a, &mut b, 1);
        assert_eq!(
            (c.wr_id, c.opcode, c.status, c.byte_len),
            (9, WcOpcode::Recv, WcStatus::Success, 13)
        );
        assert_eq!(&b.mr(mb).bytes()[100..113], b"not ready yet");
        let c = pump(&mut a, &mut b, 0);
        assert_eq!(
            (c.wr_id, c.opcode, c.status),
            (7, WcOpcode::Send, WcStatus::Success)
        );

        // Now with no RNR retries allowed and no receive posted.
        a.rnr_retry = 0;
        a.post_send(qa, 8, ma, 0, 13).unwrap();
        let c = pump(&mut a, &mut b, 0);
        assert_eq!(
            (c.wr_id, c.opcode, c.status),
            (8, WcOpcode::Send, WcStatus::RnrRetryExceeded)
        );
        assert_eq!(a.qp_state(qa), QpState::Error);
        assert!(b.cq.is_empty(), "nothing was received");
    });
    t.join().unwrap();
}

/// The verbs-shaped surface: protection domains keep a QP away from
/// another domain's memory (the peer's rkey and its own scatter entries),
/// scatter/gather lists gather in order, unsignaled work completes
/// silently, a bad scatter entry is a local protection error, and the
/// completion eventfd wakes a waiter.
#[test]
fn protection_domains_sgl_unsignaled_and_the_cq_eventfd() {
    use softcard_rdma::rc::{SendOp, SendWr, Sge};
    use std::os::fd::AsRawFd;

    let ns = softcard_testkit::Netns::new("lo");
    let t = std::thread::spawn(move || {
        ns.enter();
        let mut a = Engine::open(A).expect("engine (needs CAP_NET_RAW)");
        let mut b = Engine::open(B).unwrap();
        let (pa, pb, other) = (a.alloc_pd(), b.alloc_pd(), b.alloc_pd());
        let (qa, qb) = (a.create_qp_in(pa, 0x500), b.create_qp_in(pb, 0x600));
        a.connect(qa, 0x600, B, 10, 20);
        b.connect(qb, 0x500, A, 20, 10);
        let rw = Access {
            local_write: true,
            remote_write: true,
            remote_read: true,
            remote_atomic: false,
        };
        let (m1, m2) = (a.reg_mr_in(pa, 4096, rw), a.reg_mr_in(pa, 4096, rw));
        let mb = b.reg_mr_in(pb, 8192, rw);
        let foreign = b.reg_mr_in(other, 4096, rw);
        a.fill(m1, 0, b"hello, ");
        a.fill(m2, 100, b"gathered ");
        a.fill(m1, 200, b"world");
        let efd = a.cq_eventfd().unwrap().as_raw_fd();

        // An unsignaled WRITE, then a signaled SEND gathered from three
        // entries in two regions.
        b.post_recv(
            qb,
            RecvWr {
                wr_id: 1,
                mr: mb,
                offset: 0,
                len: 4096,
            },
        );
        let (vb, kb) = (b.mr(mb).va, b.mr(mb).rkey);
        a.post(
            qa,
            SendWr {
                wr_id: 10,
                op: SendOp::Write {
                    remote_va: vb + 5000,
                    rkey: kb,
                    imm: None,
                },
                sg_list: vec![Sge {
                    mr: m1,
                    offset: 0,
                    len: 5,
                }],
                signaled: false,
            },
        )
        .unwrap();
        a.post(
            qa,
            SendWr {
                wr_id: 11,
                op: SendOp::Send { imm: Some(0xfeed) },
                sg_list: vec![
                    Sge {
                        mr: m1,
                        offset: 0,
                        len: 7,
                    },
                    Sge {
                        mr: m2,
                        offset: 100,
                        len: 9,
                    },
                    Sge {
                        mr: m1,
                        offset: 200,
                        len: 5,
                    },
                ],
                signaled: true,
            },
        )
        .unwrap();
        let c = pump(&mut a, &mut b, 1);
        assert_eq!(
            (c.wr_id, c.opcode, c.byte_len, c.imm),
            (1, WcOpcode::Recv, 21, Some(0xfeed))
        );
        assert_eq!(&b.mr(mb).bytes()[..21], b"hello, gathered world");
        assert_eq!(&b.mr(mb).bytes()[5000..5005], b"hello");
        // B's (coalesced) ACK goes out while B is driven; then A alone
        // waits for its completion.
        let until = Instant::now() + Duration::from_millis(20);
        while Instant::now() < until {
            b.poll(Duration::from_millis(1)).unwrap();
        }
        // Only the signaled SEND completes at the requester, and the
        // eventfd says so.
        assert!(a.wait_cq(Duration::from_secs(10)).unwrap());
        let c = a.cq.pop_front().unwrap();
        assert_eq!(
            (c.wr_id, c.opcode, c.status),
            (11, WcOpcode::Send, WcStatus::Success)
        );
        assert!(a.cq.is_empty(), "the unsignaled WRITE completed visibly");
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer from our eventfd.
        let n = unsafe { libc::read(efd, count.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8, "the CQ eventfd was not signalled");
        assert!(u64::from_ne_bytes(count) >= 1);

        // A READ scattered over two entries in two regions.
        a.post(
            qa,
            SendWr {
                wr_id: 15,
                op: SendOp::Read {
                    remote_va: vb,
                    rkey: kb,
                },
                sg_list: vec![
                    Sge {
                        mr: m1,
                        offset: 1000,
                        len: 10,
                    },
                    Sge {
                        mr: m2,
                        offset: 2000,
                        len: 11,
                    },
                ],
                signaled: true,
            },
        )
        .unwrap();
        let c = pump(&mut a, &mut b, 0);
        assert_eq!(
            (c.wr_id, c.opcode, c.status, c.byte_len),
            (15, WcOpcode::RdmaRead, WcStatus::Success, 21)
        );
        assert_eq!(&a.mr(m1).bytes()[1000..1010], b"hello, gat");
        assert_eq!(&a.mr(m2).bytes()[2000..2011], b"hered world");

        // The peer's rkey of a region in another protection domain: remote
        // access error, nothing written.
        let (vf, kf) = (b.mr(foreign).va, b.mr(foreign).rkey);
        a.post_write(qa, 12, m1, 0, 5, vf, kf, None).unwrap();
        let c = pump(&mut a, &mut b, 0);
        assert_eq!((c.wr_id, c.status), (12, WcStatus::RemoteAccessError));
        assert!(b.mr(foreign).bytes().iter().all(|x| *x == 0));
        assert_eq!(a.qp_state(qa), QpState::Error);

        // A fresh QP pair; a scatter entry past the end of its region is a
        // local protection error, and nothing is sent.
        let (qa2, qb2) = (a.create_qp_in(pa, 0x700), b.create_qp_in(pb, 0x800));
        a.connect(qa2, 0x800, B, 1, 2);
        b.connect(qb2, 0x700, A, 2, 1);
        a.post(
            qa2,
            SendWr {
                wr_id: 13,
                op: SendOp::Send { imm: None },
                sg_list: vec![Sge {
                    mr: m1,
                    offset: 4000,
                    len: 200,
                }],
                signaled: true,
            },
        )
        .unwrap();
        let c = a.cq.pop_front().expect("completed at post time");
        assert_eq!((c.wr_id, c.status), (13, WcStatus::LocalProtectionError));
        assert_eq!(a.qp_state(qa2), QpState::Error);
        // Memory of another domain on this side: the same.
        let elsewhere = a.alloc_pd();
        let mine_elsewhere = a.reg_mr_in(elsewhere, 64, rw);
        let (qa3, qb3) = (a.create_qp_in(pa, 0x900), b.create_qp_in(pb, 0xa00));
        a.connect(qa3, 0xa00, B, 1, 2);
        b.connect(qb3, 0x900, A, 2, 1);
        a.post(
            qa3,
            SendWr {
                wr_id: 14,
                op: SendOp::Send { imm: None },
                sg_list: vec![Sge {
                    mr: mine_elsewhere,
                    offset: 0,
                    len: 8,
                }],
                signaled: true,
            },
        )
        .unwrap();
        let c = a.cq.pop_front().expect("completed at post time");
        assert_eq!((c.wr_id, c.status), (14, WcStatus::LocalProtectionError));
        let until = Instant::now() + Duration::from_millis(50);
        while Instant::now() < until {
            b.poll(Duration::from_millis(2)).unwrap();
        }
        assert!(b.cq.is_empty(), "a refused work request reached the peer");

        // A receive buffer in another domain's region, or past the end of
        // its own: refused at post, the QP goes to ERROR, and a SEND that
        // arrives then writes nothing.
        let (qa4, qb4) = (a.create_qp_in(pa, 0xb00), b.create_qp_in(pb, 0xc00));
        a.connect(qa4, 0xc00, B, 1, 2);
        b.connect(qb4, 0xb00, A, 2, 1);
        b.post_recv(
            qb4,
            RecvWr {
                wr_id: 20,
                mr: foreign,
                offset: 0,
                len: 64,
            },
        );
        let c = b.cq.pop_front().expect("completed at post time");
        assert_eq!((c.wr_id, c.status), (20, WcStatus::LocalProtectionError));
        assert_eq!(b.qp_state(qb4), QpState::Error);
        a.post_send(qa4, 21, m1, 0, 5).unwrap();
        let until = Instant::now() + Duration::from_millis(50);
        while Instant::now() < until {
            a.poll(Duration::from_millis(1)).unwrap();
            b.poll(Duration::from_millis(1)).unwrap();
        }
        assert!(b.mr(foreign).bytes().iter().all(|x| *x == 0));
        let (qa5, qb5) = (a.create_qp_in(pa, 0xd00), b.create_qp_in(pb, 0xe00));
        a.connect(qa5, 0xe00, B, 1, 2);
        b.connect(qb5, 0xd00, A, 2, 1);
        b.post_recv(
            qb5,
            RecvWr {
                wr_id: 22,
                mr: mb,
                offset: 8000,
                len: 500,
            },
        );
        let c = b.cq.pop_front().expect("completed at post time");
        assert_eq!((c.wr_id, c.status), (22, WcStatus::LocalProtectionError));
        let _ = (qb2, qb3, qa5);
    });
    t.join().unwrap();
}

/// With a progress thread each, neither engine is ever polled by the
/// application: it posts work, then blocks on the completion eventfd
/// (`Progress::wait_cq`) until the receive lands (scattered over two
/// entries) and the send is acknowledged, both driven in the background.
#[test]
fn progress_threads_let_applications_block_instead_of_polling() {
    use softcard_rdma::progress::Progress;
    use softcard_rdma::rc::Sge;

    let ns = softcard_testkit::Netns::new("lo");
    let t = std::thread::spawn(move || {
        ns.enter();
        let (mut a, mut b, qa, qb) = connected(0x100, 0x200, 7000, 5000);
        let access = Access {
            remote_write: false,
            remote_read: false,
            local_write: true,
            remote_atomic: false,
        };
        let (ma, mb) = (a.reg_mr(16384, access), b.reg_mr(16384, access));
        let message: Vec<u8> = (0..9000u32).map(|i| (i % 253) as u8).collect();
        a.fill(ma, 0, &message);
        // The receive scatters the message over two pieces of the region.
        b.post_recv_sgl(
            qb,
            5,
            vec![
                Sge {
                    mr: mb,
                    offset: 0,
                    len: 4000,
                },
                Sge {
                    mr: mb,
                    offset: 8000,
                    len: 8000,
                },
            ],
        );
        let (a, b) = (Progress::spawn(a).unwrap(), Progress::spawn(b).unwrap());

        // Nothing is there yet: the wait times out.
        assert!(!b.wait_cq(Duration::from_millis(50)).unwrap());
        a.lock().post_send(qa, 1, ma, 0, message.len()).unwrap();
        assert!(b.wait_cq(Duration::from_secs(10)).unwrap(), "no receive");
        let c = b.lock().cq.pop_front().unwrap();
        assert_eq!(
            (c.wr_id, c.opcode, c.status, c.byte_len),
            (5, WcOpcode::Recv, WcStatus::Success, 9000)
        );
        {
            let b = b.lock();
            let got = b.mr(mb).bytes();
            assert_eq!(&got[..4000], &message[..4000]);
            assert!(got[4000..8000].iter().all(|x| *x == 0), "between entries");
            assert_eq!(&got[8000..13000], &message[4000..]);
        }
        // The sender's completion needs the receiver's (coalesced) ACK,
        // which its progress thread sends on its timer.
        assert!(a.wait_cq(Duration::from_secs(10)).unwrap(), "no ACK");
        let c = a.lock().cq.pop_front().unwrap();
        assert_eq!(
            (c.wr_id, c.opcode, c.status),
            (1, WcOpcode::Send, WcStatus::Success)
        );

        // The engines come back whole.
        let (a, b) = (a.stop().unwrap(), b.stop().unwrap());
        assert_eq!(a.qp_state(qa), QpState::Rts);
        assert_eq!(b.stats.dropped, 0);
    });
    t.join().unwrap();
}

/// A READ of 200,000 bytes at a 1024-byte MTU: 196 responses, sent from
/// the region in several batches, placed in order at the requester.
#[test]
fn a_large_read_arrives_whole() {
    let ns = softcard_testkit::Netns::new("lo");
    let t = std::thread::spawn(move || {
        ns.enter();
        let (mut a, mut b, qa, qb) = connected(0x110, 0x220, 10, 20);
        a.set_mtu(qa, 1024);
        b.set_mtu(qb, 1024);
        let rw = Access {
            remote_write: false,
            remote_read: true,
            local_write: true,
            remote_atomic: false,
        };
        let (ma, mb) = (a.reg_mr(256 << 10, rw), b.reg_mr(256 << 10, rw));
        let pattern: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        a.fill(ma, 1000, &pattern);
        let (va, rkey) = (a.mr(ma).va, a.mr(ma).rkey);
        b.post_read(qb, 9, mb, 0, 200_000, va + 1000, rkey).unwrap();
        let c = pump(&mut a, &mut b, 1);
        assert_eq!(
            (c.wr_id, c.opcode, c.status, c.byte_len),
            (9, WcOpcode::RdmaRead, WcStatus::Success, 200_000)
        );
        assert!(
            b.mr(mb).bytes()[..200_000] == pattern[..],
            "READ data differs"
        );
        assert_eq!(b.stats.fast_packets, 196, "{:?}", b.stats);
    });
    t.join().unwrap();
}

/// Local writes and remote reads.
fn readable() -> Access {
    Access {
        remote_read: true,
        local_write: true,
        ..Access::default()
    }
}

/// The requester keeps at most `max_rd_atomic` READs unanswered: the
/// responder sees the next only once one has been answered (a responder
/// that remembers only so many could not replay the others).
#[test]
fn reads_unanswered_stay_within_max_rd_atomic() {
    let ns = softcard_testkit::Netns::new("lo");
    let t = std::thread::spawn(move || {
        ns.enter();
        let (mut a, mut b, _, qb) = connected(0x111, 0x221, 10, 20);
        b.set_max_rd_atomic(qb, 3);
        let (ma, mb) = (
            a.reg_mr(64 << 10, readable()),
            b.reg_mr(64 << 10, readable()),
        );
        let (va, rkey) = (a.mr(ma).va, a.mr(ma).rkey);
        for i in 0..10u64 {
            let at = usize::try_from(i).unwrap() * 4096;
            b.post_read(qb, i, mb, at, 4096, va + at as u64, rkey)
                .unwrap();
        }
        // A answers what reached it; B has heard nothing back yet.
        for _ in 0..5 {
            a.poll(Duration::from_millis(2)).unwrap();
        }
        assert_eq!(
            a.stats.slow_packets, 3,
            "READ requests A got: {:?}",
            a.stats
        );
        let mut done = Vec::new();
        while done.len() < 10 {
            let c = pump(&mut a, &mut b, 1);
            assert_eq!(
                (c.opcode, c.status),
                (WcOpcode::RdmaRead, WcStatus::Success)
            );
            done.push(c.wr_id);
        }
        assert_eq!(done, (0..10).collect::<Vec<_>>());
        assert_eq!(a.stats.slow_packets, 10, "{:?}", a.stats);
    });
    t.join().unwrap();
}

/// A queue pair destroyed right after its last message, whose ACK was
/// lost: the peer's resent message is acknowledged once more, and the
/// peer's SEND completes instead of retrying until its count runs out.
#[test]
fn a_destroyed_queue_pair_acknowledges_a_message_it_had_received() {
    let ns = softcard_testkit::Netns::new("lo");
    let t = std::thread::spawn(move || {
        ns.enter();
        let (mut a, mut b, qa, qb) = connected(0x112, 0x222, 30, 40);
        a.rto = Duration::from_millis(10);
        a.max_retries = 3;
        let local = Access {
            local_write: true,
            ..Access::default()
        };
        let (ma, mb) = (a.reg_mr(4096, local), b.reg_mr(4096, local));
        b.post_recv(
            qb,
            RecvWr {
                wr_id: 1,
                mr: mb,
                offset: 0,
                len: 4096,
            },
        );
        // Every packet B sends is lost: its ACK too.
        b.set_faults(softcard_rdma::net::Faults {
            seed: 1,
            drop_ppm: 1_000_000,
            ..Default::default()
        });
        a.post_send(qa, 7, ma, 0, 3000).unwrap();
        let c = pump(&mut a, &mut b, 1);
        assert_eq!((c.opcode, c.status), (WcOpcode::Recv, WcStatus::Success));
        b.destroy_qp(0x222).unwrap();
        b.set_faults(softcard_rdma::net::Faults::default());
        let c = pump(&mut a, &mut b, 0);
        assert_eq!(
            (c.wr_id, c.opcode, c.status),
            (7, WcOpcode::Send, WcStatus::Success)
        );
        assert!(b.stats.departed_acks > 0, "{:?}", b.stats);
        // A new message to the gone queue pair is not answered.
        a.post_send(qa, 8, ma, 0, 8).unwrap();
        let c = pump(&mut a, &mut b, 0);
        assert_eq!((c.wr_id, c.status), (8, WcStatus::RetryExceeded));
    });
    t.join().unwrap();
}

/// A peer with no route to it: the kernel refuses every send. Each refusal
/// counts as a lost packet, the post itself succeeds, and the work request
/// ends with `RetryExceeded` after the retries, the QP in ERROR; the
/// engine itself keeps working.
#[test]
fn an_unreachable_peer_fails_its_queue_pair_not_the_engine() {
    let ns = softcard_testkit::Netns::new("lo");
    let t = std::thread::spawn(move || {
        ns.enter();
        let mut a = Engine::open(A).expect("engine (needs CAP_NET_RAW)");
        a.rto = Duration::from_millis(5);
        a.max_retries = 3;
        let qa = a.create_qp(0x130);
        a.connect(qa, 0x230, Ipv4Addr::new(10, 99, 0, 1), 1, 2);
        let ma = a.reg_mr(
            8192,
            Access {
                remote_write: false,
                remote_read: false,
                local_write: true,
                remote_atomic: false,
            },
        );
        a.post_send(qa, 41, ma, 0, 6000)
            .expect("the post succeeds; the send is lost");
        let deadline = Instant::now() + Duration::from_secs(10);
        let c = loop {
            a.poll(Duration::from_millis(2))
                .expect("a refused send does not fail the engine");
            if let Some(c) = a.cq.pop_front() {
                break c;
            }
            assert!(Instant::now() < deadline, "no completion");
        };
        assert_eq!((c.wr_id, c.status), (41, WcStatus::RetryExceeded));
        assert_eq!(a.qp_state(qa), QpState::Error);
        assert!(a.stats.send_errors >= 4, "{:?}", a.stats);
    });
    t.join().unwrap();
}

/// Completion queues of their own: one QP's send and receive completions
/// land in the queues it was created with, and signal their own eventfds;
/// a second QP on the same engine keeps using the default ring; a
/// progress thread's waiter blocks on one queue; an unknown queue is
/// refused.
#[test]
fn queue_pairs_complete_into_the_queues_they_were_created_with() {
    use softcard_rdma::progress::Progress;
    use softcard_rdma::rc::{CqId, Pd};

    let ns = softcard_testkit::Netns::new("lo");
    let t = std::thread::spawn(move || {
        ns.enter();
        let mut a = Engine::open(A).expect("engine (needs CAP_NET_RAW)");
        let mut b = Engine::open(B).unwrap();
        let (send_cq, recv_cq) = (b.create_cq(), b.create_cq());
        use std::os::fd::AsRawFd;
        assert_ne!(send_cq, recv_cq);
        // A queue b never made (a's third).
        let foreign = (0..3).map(|_| a.create_cq()).last().unwrap();
        let err = b
            .create_qp_with(Pd::DEFAULT, 0x300, CqId::DEFAULT, foreign)
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
        assert!(b.cq_eventfd_of(foreign).is_err());

        // b: QP 0x200 on its own queues, QP 0x201 on the default ring.
        let own = b
            .create_qp_with(Pd::DEFAULT, 0x200, send_cq, recv_cq)
            .unwrap();
        let plain = b.create_qp(0x201);
        let (qa, qa2) = (a.create_qp(0x100), a.create_qp(0x101));
        a.connect(qa, 0x200, B, 100, 900);
        b.connect(own, 0x100, A, 900, 100);
        a.connect(qa2, 0x201, B, 300, 700);
        b.connect(plain, 0x101, A, 700, 300);
        let access = Access {
            remote_write: true,
            remote_read: true,
            local_write: true,
            remote_atomic: false,
        };
        let (ma, mb) = (a.reg_mr(8192, access), b.reg_mr(8192, access));
        let (va_a, rkey_a) = (a.mr(ma).va, a.mr(ma).rkey);
        let (recv_fd, send_fd) = (
            b.cq_eventfd_of(recv_cq).unwrap().as_raw_fd(),
            b.cq_eventfd_of(send_cq).unwrap().as_raw_fd(),
        );
        let readable = |fd: i32| {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout.
            unsafe { libc::poll(&mut p, 1, 0) == 1 }
        };
        let drain = |fd: i32| {
            let mut n = [0u8; 8];
            // SAFETY: 8 bytes into a live buffer from a non-blocking eventfd.
            unsafe { libc::read(fd, n.as_mut_ptr().cast(), 8) };
        };

        // A SEND from a to b's own QP: the receive completes in recv_cq.
        b.post_recv(
            own,
            RecvWr {
                wr_id: 7,
                mr: mb,
                offset: 0,
                len: 4096,
            },
        );
        a.fill(ma, 0, &[0x5a; 3000]);
        a.post_send(qa, 1, ma, 0, 3000).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while b.cq_of(recv_cq).is_empty() {
            a.poll(Duration::from_millis(1)).unwrap();
            b.poll(Duration::from_millis(1)).unwrap();
            assert!(Instant::now() < deadline, "no receive completion");
        }
        let c = b.cq_of(recv_cq).pop_front().unwrap();
        assert_eq!(
            (c.wr_id, c.opcode, c.status, c.byte_len, c.qpn),
            (7, WcOpcode::Recv, WcStatus::Success, 3000, 0x200)
        );
        assert!(
            readable(recv_fd),
            "the receive queue's eventfd was not signalled"
        );
        drain(recv_fd);
        assert!(b.cq.is_empty() && b.cq_of(send_cq).is_empty());
        assert!(!readable(send_fd));

        // A WRITE from b's own QP: its completion lands in send_cq.
        b.fill(mb, 4096, &[0xa5; 2000]);
        b.post_write(own, 8, mb, 4096, 2000, va_a, rkey_a, None)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while b.cq_of(send_cq).is_empty() {
            a.poll(Duration::from_millis(1)).unwrap();
            b.poll(Duration::from_millis(1)).unwrap();
            assert!(Instant::now() < deadline, "no send completion");
        }
        let c = b.cq_of(send_cq).pop_front().unwrap();
        assert_eq!(
            (c.wr_id, c.opcode, c.status),
            (8, WcOpcode::RdmaWrite, WcStatus::Success)
        );
        assert!(readable(send_fd));
        drain(send_fd);
        assert_eq!(&a.mr(ma).bytes()[..2000], &[0xa5; 2000][..]);
        assert!(b.cq.is_empty() && b.cq_of(recv_cq).is_empty());
        // a's own completion (SEND acknowledged) is in a's default ring.
        while a.cq.is_empty() {
            a.poll(Duration::from_millis(1)).unwrap();
            b.poll(Duration::from_millis(1)).unwrap();
        }
        assert_eq!(a.cq.pop_front().unwrap().wr_id, 1);

        // The other QP still completes into b's default ring.
        b.post_recv(
            plain,
            RecvWr {
                wr_id: 9,
                mr: mb,
                offset: 0,
                len: 4096,
            },
        );
        a.post_send(qa2, 2, ma, 0, 100).unwrap();
        let c = pump(&mut a, &mut b, 1);
        assert_eq!((c.wr_id, c.opcode, c.qpn), (9, WcOpcode::Recv, 0x201));
        assert!(b.cq_of(recv_cq).is_empty() && b.cq_of(send_cq).is_empty());

        // A progress thread's waiter blocks on one queue. Moving b to
        // ERROR flushes a posted receive into recv_cq.
        b.post_recv(
            own,
            RecvWr {
                wr_id: 10,
                mr: mb,
                offset: 0,
                len: 64,
            },
        );
        let b = Progress::spawn(b).unwrap();
        assert!(!b.wait_cq_of(recv_cq, Duration::from_millis(20)).unwrap());
        b.lock().to_error(own);
        assert!(b.wait_cq_of(recv_cq, Duration::from_secs(5)).unwrap());
        let c = b.lock().cq_of(recv_cq).pop_front().unwrap();
        assert_eq!((c.wr_id, c.status), (10, WcStatus::Flushed));
        assert!(b.lock().cq.is_empty());
        b.stop().unwrap();
    });
    t.join().unwrap();
}

/// Atomics between two engines: fetch-and-add and compare-and-swap return
/// the original value into the requester's region and change the
/// responder's 8 bytes; a region without the atomic right, and a
/// misaligned address, fail the request and nothing changes; under
/// dropped, duplicated and reordered packets every atomic runs exactly
/// once (duplicates are answered from the replay list).
#[test]
fn atomics_run_once_and_return_the_original_value() {
    use softcard_rdma::net::Faults;

    let ns = softcard_testkit::Netns::new("lo");
    let t = std::thread::spawn(move || {
        ns.enter();
        let (mut a, mut b, qa, _qb) = connected(0x100, 0x200, 1000, 2000);
        let atomic = Access {
            remote_write: false,
            remote_read: false,
            local_write: true,
            remote_atomic: true,
        };
        let (ma, mb) = (a.reg_mr(4096, atomic), b.reg_mr(4096, atomic));
        let (va, rkey) = (b.mr(mb).va, b.mr(mb).rkey);
        b.fill(mb, 8, &40u64.to_ne_bytes());
        let word = |e: &Engine, mr: usize, at: usize| {
            u64::from_ne_bytes(e.mr(mr).bytes()[at..at + 8].try_into().unwrap())
        };

        a.post_fetch_add(qa, 1, ma, 0, va + 8, rkey, 2).unwrap();
        let c = pump(&mut a, &mut b, 0);
        assert_eq!(
            (c.wr_id, c.opcode, c.status, c.byte_len),
            (1, WcOpcode::FetchAdd, WcStatus::Success, 8)
        );
        assert_eq!(word(&a, ma, 0), 40, "original value");
        assert_eq!(word(&b, mb, 8), 42);

        // Compare-and-swap: equal swaps, unequal leaves it.
        a.post_compare_swap(qa, 2, ma, 16, va + 8, rkey, 42, 7)
            .unwrap();
        let c = pump(&mut a, &mut b, 0);
        assert_eq!(
            (c.wr_id, c.opcode, c.status),
            (2, WcOpcode::CompSwap, WcStatus::Success)
        );
        assert_eq!((word(&a, ma, 16), word(&b, mb, 8)), (42, 7));
        a.post_compare_swap(qa, 3, ma, 24, va + 8, rkey, 42, 99)
            .unwrap();
        let c = pump(&mut a, &mut b, 0);
        assert_eq!((c.wr_id, c.status), (3, WcStatus::Success));
        assert_eq!((word(&a, ma, 24), word(&b, mb, 8)), (7, 7));

        // Exactly once under faults on both sides: 200 fetch-adds of 3.
        let faults = |seed| Faults {
            seed,
            drop_ppm: 100_000,
            dup_ppm: 100_000,
            reorder_ppm: 50_000,
            corrupt_ppm: 20_000,
        };
        a.set_faults(faults(5));
        b.set_faults(faults(9));
        a.rto = Duration::from_millis(5);
        let before = b.stats;
        let mut got = Vec::new();
        for i in 0..200u64 {
            a.post_fetch_add(qa, 100 + i, ma, 64 + 8 * i as usize, va + 8, rkey, 3)
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.len() < 200 {
            a.poll(Duration::from_millis(1)).unwrap();
            b.poll(Duration::from_millis(1)).unwrap();
            while let Some(c) = a.cq.pop_front() {
                assert_eq!(c.status, WcStatus::Success, "{c:?}");
                got.push(c.wr_id);
            }
            assert!(
                Instant::now() < deadline,
                "{} of 200 atomics done",
                got.len()
            );
        }
        assert_eq!(
            word(&b, mb, 8),
            7 + 600,
            "an atomic ran twice or not at all"
        );
        // The originals are 7, 10, ..., each seen once, in posting order.
        let originals: Vec<u64> = (0..200).map(|i| word(&a, ma, 64 + 8 * i)).collect();
        assert_eq!(originals, (0..200).map(|i| 7 + 3 * i).collect::<Vec<u64>>());
        assert_eq!(b.stats.atomics - before.atomics, 200);
        assert!(
            b.stats.atomic_replays > before.atomic_replays,
            "no duplicate reached the replay list: {:?}",
            b.stats
        );
        a.set_faults(Faults::default());
        b.set_faults(Faults::default());

        // No atomic right: a remote access error, nothing changed.
        let plain = b.reg_mr(
            64,
            Access {
                remote_write: true,
                remote_read: true,
                local_write: true,
                remote_atomic: false,
            },
        );
        let (pva, prkey) = (b.mr(plain).va, b.mr(plain).rkey);
        a.post_fetch_add(qa, 9, ma, 0, pva, prkey, 1).unwrap();
        let c = pump(&mut a, &mut b, 0);
        assert_eq!((c.wr_id, c.status), (9, WcStatus::RemoteAccessError));
        assert_eq!(word(&b, plain, 0), 0);
        assert!(b.mr(plain).bytes().iter().all(|&x| x == 0));
        assert_eq!(a.qp_state(qa), QpState::Error);

        // Misaligned: an invalid request (on a fresh pair).
        drop((a, b));
        let (mut a, mut b, qa, _) = connected(0x101, 0x201, 5, 6);
        let (ma, mb) = (a.reg_mr(64, atomic), b.reg_mr(64, atomic));
        let (va, rkey) = (b.mr(mb).va, b.mr(mb).rkey);
        a.post_fetch_add(qa, 10, ma, 0, va + 4, rkey, 1).unwrap();
        let c = pump(&mut a, &mut b, 0);
        assert_eq!((c.wr_id, c.status), (10, WcStatus::RemoteInvalidRequest));
        assert!(b.mr(mb).bytes().iter().all(|&x| x == 0));
        // A local entry that is not 8 bytes is refused before sending.
        drop((a, b));
        let (mut a, _b, qa, _) = connected(0x102, 0x202, 5, 6);
        let ma = a.reg_mr(64, atomic);
        a.post(
            qa,
            softcard_rdma::rc::SendWr {
                wr_id: 11,
                op: softcard_rdma::rc::SendOp::FetchAdd {
                    remote_va: va,
                    rkey,
                    add: 1,
                },
                sg_list: vec![softcard_rdma::rc::Sge {
                    mr: ma,
                    offset: 0,
                    len: 4,
                }],
                signaled: true,
            },
        )
        .unwrap();
        let c = a.cq.pop_front().unwrap();
        assert_eq!((c.wr_id, c.status), (11, WcStatus::LocalProtectionError));
    });
    t.join().unwrap();
}
