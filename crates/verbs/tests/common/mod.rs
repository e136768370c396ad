//! What the library's C-API tests share: the real card service in a
//! network namespace of the test's own, and a queue pair connected to
//! itself.

use ibverbs::sys;
use softcard_rdma::service::RdmaService;

/// Starts the card service with one device on the loopback of a new
/// network namespace `ns` (needs root), and points the library at it.
/// The library reads its socket from the environment once, at the first
/// device list, so a binary using this has one test.
pub fn service(ns: &str) -> (tempfile::TempDir, RdmaService) {
    let ns = softcard_testkit::Netns::new(ns);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("rdma.sock");
    let svc = std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            RdmaService::start(
                &[("softcard0".into(), std::net::Ipv4Addr::LOCALHOST)],
                &sock,
            )
            .expect("the card's engine (needs CAP_NET_RAW)")
        })
        .join()
        .unwrap()
    });
    std::env::set_var("SOFTCARD_RDMA_SOCKET", &sock);
    (dir, svc)
}

/// Takes RC queue pair `qp` through INIT, RTR and RTS, connected to
/// itself on the loopback address.
///
/// # Safety
/// `qp` is a live queue pair of the library.
pub unsafe fn connect_to_itself(qp: *mut sys::ibv_qp) {
    // SAFETY: per the caller; every attribute is live for its call.
    unsafe {
        let mut a = sys::ibv_qp_attr {
            qp_state: sys::ibv_qp_state_IBV_QPS_INIT,
            port_num: 1,
            ..Default::default()
        };
        assert_eq!(ibverbs::ibv_modify_qp(qp, &mut a, 1 | 16 | 32 | 8), 0);
        let mut a = sys::ibv_qp_attr {
            qp_state: sys::ibv_qp_state_IBV_QPS_RTR,
            path_mtu: sys::ibv_mtu_IBV_MTU_1024,
            dest_qp_num: (*qp).qp_num,
            ..Default::default()
        };
        a.ah_attr.is_global = 1;
        a.ah_attr.port_num = 1;
        a.ah_attr.grh.dgid.raw = std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets();
        assert_eq!(
            ibverbs::ibv_modify_qp(qp, &mut a, 1 | 128 | 256 | 4096 | (1 << 20)),
            0
        );
        let mut a = sys::ibv_qp_attr {
            qp_state: sys::ibv_qp_state_IBV_QPS_RTS,
            ..Default::default()
        };
        assert_eq!(ibverbs::ibv_modify_qp(qp, &mut a, 1 | (1 << 16)), 0);
    }
}

/// Posts one receive of `len` bytes at `addr` (lkey `lkey`) through the
/// context's inline `post_recv`, as verbs.h's `ibv_post_recv` does.
///
/// # Safety
/// `qp` is a live queue pair of the library; the memory stays registered
/// until the receive completes.
pub unsafe fn post_recv(qp: *mut sys::ibv_qp, wr_id: u64, addr: *mut u8, len: u32, lkey: u32) {
    let mut sge = sys::ibv_sge {
        addr: addr as u64,
        length: len,
        lkey,
    };
    let mut wr = sys::ibv_recv_wr {
        wr_id,
        sg_list: &mut sge,
        num_sge: 1,
        ..Default::default()
    };
    let mut bad = std::ptr::null_mut();
    // SAFETY: per the caller; the context's ops were set by the library.
    unsafe {
        assert_eq!(
            (*(*qp).context).ops.post_recv.unwrap()(qp, &mut wr, &mut bad),
            0
        )
    };
}

/// Posts one signaled SEND of `len` bytes at `addr` (lkey `lkey`) through
/// the context's inline `post_send`.
///
/// # Safety
/// As [`post_recv`].
pub unsafe fn post_send(qp: *mut sys::ibv_qp, wr_id: u64, addr: *mut u8, len: u32, lkey: u32) {
    let mut sge = sys::ibv_sge {
        addr: addr as u64,
        length: len,
        lkey,
    };
    let mut wr = sys::ibv_send_wr {
        wr_id,
        sg_list: &mut sge,
        num_sge: 1,
        opcode: sys::ibv_wr_opcode_IBV_WR_SEND,
        send_flags: sys::ibv_send_flags_IBV_SEND_SIGNALED,
        ..Default::default()
    };
    let mut bad = std::ptr::null_mut();
    // SAFETY: per the caller; the context's ops were set by the library.
    unsafe {
        assert_eq!(
            (*(*qp).context).ops.post_send.unwrap()(qp, &mut wr, &mut bad),
            0
        )
    };
}

/// An RC queue pair of `depth` sends and receives (one SGE each) on `cq`
/// for both, connected to itself.
///
/// # Safety
/// `pd` and `cq` are live objects of the library.
pub unsafe fn looped_rc_qp(
    pd: *mut sys::ibv_pd,
    cq: *mut sys::ibv_cq,
    depth: u32,
) -> *mut sys::ibv_qp {
    let mut init = sys::ibv_qp_init_attr {
        send_cq: cq,
        recv_cq: cq,
        qp_type: sys::ibv_qp_type_IBV_QPT_RC,
        cap: sys::ibv_qp_cap {
            max_send_wr: depth,
            max_recv_wr: depth,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        },
        ..Default::default()
    };
    // SAFETY: per the caller; `init` is live for the call.
    unsafe {
        let qp = ibverbs::ibv_create_qp(pd, &mut init);
        assert!(!qp.is_null());
        connect_to_itself(qp);
        qp
    }
}

/// Polls `cq` until `n` completions came or 10 s passed; each one's work
/// request id, status, opcode and length, sorted by id.
///
/// # Safety
/// `cq` is a live completion queue of the library.
#[allow(dead_code, reason = "full_cq polls one completion at a time")]
pub unsafe fn poll_all(cq: *mut sys::ibv_cq, n: usize) -> Vec<(u64, u32, u32, u32)> {
    let mut got = Vec::new();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while got.len() < n && std::time::Instant::now() < end {
        let mut wc = [sys::ibv_wc::default(); 4];
        // SAFETY: per the caller; the context's ops were set by the library.
        let k = unsafe { (*(*cq).context).ops.poll_cq.unwrap()(cq, 4, wc.as_mut_ptr()) };
        assert!(k >= 0);
        got.extend(
            wc[..usize::try_from(k).unwrap()]
                .iter()
                .map(|w| (w.wr_id, w.status, w.opcode, w.byte_len)),
        );
    }
    got.sort_unstable();
    got
}

/// The card's one device opened, with a protection domain: the device
/// list, the context and the domain, for [`close`].
///
/// # Safety
/// The library's C API; [`close`] frees what this returns.
pub unsafe fn open_pd() -> (
    *mut *mut sys::ibv_device,
    *mut sys::ibv_context,
    *mut sys::ibv_pd,
) {
    // SAFETY: verbs' calls as documented; `n` is live for the first.
    unsafe {
        let mut n = 0;
        let list = ibverbs::ibv_get_device_list(&mut n);
        assert_eq!(n, 1);
        let ctx = ibverbs::ibv_open_device(*list);
        assert!(!ctx.is_null());
        let pd = ibverbs::ibv_alloc_pd(ctx);
        assert!(!pd.is_null());
        (list, ctx, pd)
    }
}

/// Frees what [`open_pd`] made, checking each step succeeds.
///
/// # Safety
/// What [`open_pd`] returned, with every object on the domain destroyed.
pub unsafe fn close(
    list: *mut *mut sys::ibv_device,
    ctx: *mut sys::ibv_context,
    pd: *mut sys::ibv_pd,
) {
    // SAFETY: per the caller.
    unsafe {
        assert_eq!(ibverbs::ibv_dealloc_pd(pd), 0);
        assert_eq!(ibverbs::ibv_close_device(ctx), 0);
        ibverbs::ibv_free_device_list(list);
    }
}
