//! A completion queue smaller than the work that completes on it (an
//! overrun, which verbs leaves to the application): the completions that
//! do not fit wait at the card and reach the application as it polls room
//! free, in order, none lost, also after the card's thread went to sleep
//! with them. Through the real card service (in a network namespace the
//! test creates, on its loopback; needs root) and the library's C entry
//! points.

use std::ptr::null_mut;

mod common;

use ibverbs::sys;

#[test]
fn completions_beyond_a_full_ring_reach_the_application() {
    const N: u32 = 16;
    let _card = common::service("fullcq");
    let mut buf = vec![0u8; 64 * N as usize];
    // SAFETY: the library's C API, called as verbs documents; every
    // pointer passed is live for the call, every object is destroyed
    // before the buffer is freed.
    unsafe {
        let (list, ctx, pd) = common::open_pd();
        let access = sys::ibv_access_flags_IBV_ACCESS_LOCAL_WRITE.cast_signed();
        let mr = ibverbs::ibv_reg_mr(pd, buf.as_mut_ptr().cast(), buf.len(), access);
        assert!(!mr.is_null());
        // The smallest queue the card makes, for 2 x N completions.
        let cq = ibverbs::ibv_create_cq(ctx, 1, null_mut(), null_mut(), 0);
        assert!(!cq.is_null());
        let ring = u32::try_from((*cq).cqe).unwrap();
        assert!(ring < 2 * N, "a ring of {ring}");
        let qp = common::looped_rc_qp(pd, cq, N);

        let ops = &(*ctx).ops;
        let base = buf.as_mut_ptr();
        for k in 0..N {
            common::post_recv(qp, u64::from(k), base.add(64 * k as usize), 32, (*mr).lkey);
        }
        for k in 0..N {
            let at = 64 * k as usize + 32;
            buf[at..at + 4].copy_from_slice(&k.to_le_bytes());
            common::post_send(qp, 1000 + u64::from(k), base.add(at), 4, (*mr).lkey);
        }
        // Time for every message to go and for the card's thread to go to
        // sleep with a full ring and completions left over.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let (mut sends, mut recvs) = (Vec::new(), Vec::new());
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while sends.len() + recvs.len() < 2 * N as usize && std::time::Instant::now() < end {
            let mut wc = [sys::ibv_wc::default(); 1];
            let n = ops.poll_cq.unwrap()(cq, 1, wc.as_mut_ptr());
            assert!(n >= 0);
            if n == 1 {
                assert_eq!(wc[0].status, 0, "{:?}", wc[0].wr_id);
                if wc[0].opcode == sys::ibv_wc_opcode_IBV_WC_RECV {
                    recvs.push(wc[0].wr_id);
                } else {
                    sends.push(wc[0].wr_id);
                }
            }
        }
        let want: Vec<u64> = (0..u64::from(N)).collect();
        assert_eq!(recvs, want, "receives: every one, in order");
        assert_eq!(
            sends,
            want.iter().map(|k| k + 1000).collect::<Vec<_>>(),
            "sends: every one, in order"
        );
        for k in 0..N as usize {
            assert_eq!(&buf[64 * k..64 * k + 4], &(k as u32).to_le_bytes());
        }
        assert_eq!(ibverbs::ibv_destroy_qp(qp), 0);
        assert_eq!(ibverbs::ibv_dereg_mr(mr), 0);
        assert_eq!(ibverbs::ibv_destroy_cq(cq), 0);
        common::close(list, ctx, pd);
    }
}
