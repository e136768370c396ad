//! The verbs objects an application makes and destroys through the card
//! daemon: protection domains, memory regions over its own memory,
//! completion channels, completion queues and RC queue pairs with their
//! state machine. Each is rdma-core's struct first (what the application
//! sees) and this library's state after it.

use std::ffi::{c_int, c_void};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use softcard_rdma::ring::{self, QpRings, Ring};
use softcard_rdma::shm::Mapping;

use crate::conn::word;
use crate::memory::Source;
use crate::{context, set_errno, sys, Context};

/// Fails a call returning an object: null, `errno` set.
fn fail<T>(errno: c_int) -> *mut T {
    set_errno(errno);
    std::ptr::null_mut()
}

/// The session behind an object's context.
///
/// # Safety
/// `ctx` came from `ibv_open_device` and is open.
unsafe fn session<'a>(ctx: *mut sys::ibv_context) -> Option<&'a Context> {
    // SAFETY: per the caller.
    unsafe { context(ctx) }
}

/// `ibv_alloc_pd`.
#[no_mangle]
pub unsafe extern "C" fn ibv_alloc_pd(ctx: *mut sys::ibv_context) -> *mut sys::ibv_pd {
    // SAFETY: per the verbs contract.
    let Some(c) = (unsafe { session(ctx) }) else {
        return fail(libc::EINVAL);
    };
    match c.conn.call("PD", &[]).and_then(|(w, _)| word::<u32>(&w, 0)) {
        Ok(handle) => Box::into_raw(Box::new(sys::ibv_pd {
            context: ctx,
            handle,
        })),
        Err(e) => fail(e),
    }
}

/// `ibv_dealloc_pd`.
#[no_mangle]
pub unsafe extern "C" fn ibv_dealloc_pd(pd: *mut sys::ibv_pd) -> c_int {
    // SAFETY: per the verbs contract, pd came from ibv_alloc_pd.
    let Some(p) = (unsafe { pd.as_ref() }) else {
        return libc::EINVAL;
    };
    // SAFETY: its context is open.
    let Some(c) = (unsafe { session(p.context) }) else {
        return libc::EINVAL;
    };
    match c.conn.call(&format!("FREEPD {}", p.handle), &[]) {
        Ok(_) => {
            // SAFETY: a Box from ibv_alloc_pd, freed once.
            drop(unsafe { Box::from_raw(pd) });
            0
        }
        Err(e) => e,
    }
}

/// Registers `addr..addr+len` in `pd`.
unsafe fn reg(
    pd: *mut sys::ibv_pd,
    addr: *mut c_void,
    len: usize,
    access: u32,
) -> *mut sys::ibv_mr {
    // SAFETY: per the verbs contract.
    let Some(p) = (unsafe { pd.as_ref() }) else {
        return fail(libc::EINVAL);
    };
    // SAFETY: its context is open.
    let Some(c) = (unsafe { session(p.context) }) else {
        return fail(libc::EINVAL);
    };
    // Bits the card does not carry (on-demand paging, relaxed ordering
    // and the like) are hints it may ignore; the four rights are kept.
    let rights = access & 0xf;
    let pieces = match crate::memory::share(addr as usize, len) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let mut line = format!("MR {} {:x} {len} {rights}", p.handle, addr as usize);
    let mut fds = Vec::with_capacity(pieces.len());
    for piece in &pieces {
        line.push(' ');
        match &piece.source {
            Source::Memfd(fd) => fds.push(fd.as_fd()),
            Source::Segment { start, end } => line.push_str(&format!("S{start:x}-{end:x}:")),
        }
        line.push_str(&format!("{}:{}", piece.offset, piece.len));
    }
    match c.conn.call(&line, &fds) {
        Ok((w, _)) => {
            let (Ok(handle), Ok(key)) = (word::<u32>(&w, 0), word::<u32>(&w, 1)) else {
                return fail(libc::EIO);
            };
            Box::into_raw(Box::new(sys::ibv_mr {
                context: p.context,
                pd,
                addr,
                length: len,
                handle,
                lkey: key,
                rkey: key,
            }))
        }
        Err(e) => fail(e),
    }
}

/// `ibv_reg_mr`: the application's own memory, which the card reads and
/// writes in place (see `memory`).
#[no_mangle]
pub unsafe extern "C" fn ibv_reg_mr(
    pd: *mut sys::ibv_pd,
    addr: *mut c_void,
    len: usize,
    access: c_int,
) -> *mut sys::ibv_mr {
    // SAFETY: per the verbs contract.
    unsafe { reg(pd, addr, len, access.cast_unsigned()) }
}

/// `ibv_reg_mr_iova2`: only the identity (iova = address) is carried.
#[no_mangle]
pub unsafe extern "C" fn ibv_reg_mr_iova2(
    pd: *mut sys::ibv_pd,
    addr: *mut c_void,
    len: usize,
    iova: u64,
    access: u32,
) -> *mut sys::ibv_mr {
    if iova != addr as u64 {
        return fail(libc::EOPNOTSUPP);
    }
    // SAFETY: per the verbs contract.
    unsafe { reg(pd, addr, len, access) }
}

/// `ibv_reg_mr_iova`: as `ibv_reg_mr_iova2`.
#[no_mangle]
pub unsafe extern "C" fn ibv_reg_mr_iova(
    pd: *mut sys::ibv_pd,
    addr: *mut c_void,
    len: usize,
    iova: u64,
    access: c_int,
) -> *mut sys::ibv_mr {
    // SAFETY: per the verbs contract.
    unsafe { ibv_reg_mr_iova2(pd, addr, len, iova, access.cast_unsigned()) }
}

/// `ibv_dereg_mr`.
#[no_mangle]
pub unsafe extern "C" fn ibv_dereg_mr(mr: *mut sys::ibv_mr) -> c_int {
    // SAFETY: per the verbs contract, mr came from ibv_reg_mr.
    let Some(m) = (unsafe { mr.as_ref() }) else {
        return libc::EINVAL;
    };
    // SAFETY: its context is open.
    let Some(c) = (unsafe { session(m.context) }) else {
        return libc::EINVAL;
    };
    match c.conn.call(&format!("FREEMR {}", m.handle), &[]) {
        Ok(_) => {
            // SAFETY: a Box from reg, freed once.
            drop(unsafe { Box::from_raw(mr) });
            0
        }
        Err(e) => e,
    }
}

/// A completion channel: the application's end of a socket the card
/// sends events on.
#[repr(C)]
pub(crate) struct Channel {
    pub ch: sys::ibv_comp_channel,
    handle: u32,
    fd: OwnedFd,
}

/// `ibv_create_comp_channel`.
#[no_mangle]
pub unsafe extern "C" fn ibv_create_comp_channel(
    ctx: *mut sys::ibv_context,
) -> *mut sys::ibv_comp_channel {
    // SAFETY: per the verbs contract.
    let Some(c) = (unsafe { session(ctx) }) else {
        return fail(libc::EINVAL);
    };
    let Ok((mine, theirs)) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    ) else {
        return fail(libc::EMFILE);
    };
    match c
        .conn
        .call("CHANNEL", &[theirs.as_fd()])
        .and_then(|(w, _)| word::<u32>(&w, 0))
    {
        Ok(handle) => {
            let ch = sys::ibv_comp_channel {
                context: ctx,
                fd: mine.as_raw_fd(),
                refcnt: 0,
            };
            Box::into_raw(Box::new(Channel {
                ch,
                handle,
                fd: mine,
            }))
            .cast()
        }
        Err(e) => fail(e),
    }
}

/// `ibv_destroy_comp_channel`.
#[no_mangle]
pub unsafe extern "C" fn ibv_destroy_comp_channel(ch: *mut sys::ibv_comp_channel) -> c_int {
    // SAFETY: per the verbs contract, ch came from ibv_create_comp_channel.
    let Some(chan) = (unsafe { ch.cast::<Channel>().as_ref() }) else {
        return libc::EINVAL;
    };
    // SAFETY: its context is open.
    let Some(c) = (unsafe { session(chan.ch.context) }) else {
        return libc::EINVAL;
    };
    match c.conn.call(&format!("FREECHANNEL {}", chan.handle), &[]) {
        Ok(_) => {
            // SAFETY: a Box<Channel> from ibv_create_comp_channel.
            drop(unsafe { Box::from_raw(ch.cast::<Channel>()) });
            0
        }
        Err(e) => e,
    }
}

/// A completion queue: its ring, shared with the card. Its head is
/// `ibv_cq_ex`, whose first fields are `ibv_cq`'s, so one struct serves
/// both APIs.
#[repr(C)]
pub(crate) struct Cq {
    pub cq: sys::ibv_cq_ex,
    pub map: Mapping,
    pub ring: Ring,
    /// Completions taken (the consumer counter), under the lock verbs
    /// requires for a CQ polled from several threads.
    pub cons: Mutex<u32>,
    /// Events received and acknowledged.
    pub events: AtomicU32,
    pub acked: AtomicU32,
    /// The extended API's poll in progress.
    pub ex: crate::cq_ex::ExPoll,
}

/// `ibv_create_cq`.
#[no_mangle]
pub unsafe extern "C" fn ibv_create_cq(
    ctx: *mut sys::ibv_context,
    cqe: c_int,
    cq_context: *mut c_void,
    channel: *mut sys::ibv_comp_channel,
    _vector: c_int,
) -> *mut sys::ibv_cq {
    let Ok(want) = u32::try_from(cqe) else {
        return fail(libc::EINVAL);
    };
    // SAFETY: per the verbs contract.
    unsafe { make_cq(ctx, want, cq_context, channel) }.cast()
}

/// A completion queue of at least `want` entries (null and `errno` on
/// failure); what `ibv_create_cq` and `ibv_create_cq_ex` share.
///
/// # Safety
/// `ctx` is open; `channel` is null or one of its channels.
pub(crate) unsafe fn make_cq(
    ctx: *mut sys::ibv_context,
    want: u32,
    cq_context: *mut c_void,
    channel: *mut sys::ibv_comp_channel,
) -> *mut Cq {
    // SAFETY: per the caller.
    let Some(c) = (unsafe { session(ctx) }) else {
        return fail(libc::EINVAL);
    };
    // SAFETY: a channel of this context, or null.
    let chan = unsafe { channel.cast::<Channel>().as_ref() }.map_or(0, |ch| ch.handle);
    // The cookie events carry is the CQ's address: reserve it first.
    let slot: Box<std::mem::MaybeUninit<Cq>> = Box::new_uninit();
    let at = Box::into_raw(slot);
    let made = c
        .conn
        .call(&format!("CQ {want} {chan} {:x}", at as usize), &[])
        .and_then(|(w, mut fds)| {
            let entries: u32 = word(&w, 1)?;
            let bytes: usize = word(&w, 2)?;
            let fd = fds.pop().ok_or(libc::EIO)?;
            let (r, need) = ring::cq_ring(entries);
            if need != bytes {
                return Err(libc::EPROTO);
            }
            let map = Mapping::map(fd.as_fd(), 0, bytes).map_err(|_| libc::ENOMEM)?;
            Ok((word::<u32>(&w, 0)?, entries, map, r))
        });
    match made {
        Ok((handle, entries, map, r)) => {
            let cq = Cq {
                cq: sys::ibv_cq_ex {
                    context: ctx,
                    channel,
                    cq_context,
                    handle,
                    cqe: c_int::try_from(entries - 1).unwrap_or(c_int::MAX),
                    ..Default::default()
                },
                map,
                ring: r,
                cons: Mutex::new(0),
                events: AtomicU32::new(0),
                acked: AtomicU32::new(0),
                ex: crate::cq_ex::ExPoll::default(),
            };
            // SAFETY: `at` is the reserved, unaliased slot.
            unsafe { at.cast::<Cq>().write(cq) };
            at.cast()
        }
        Err(e) => {
            // SAFETY: the reserved slot, never initialised.
            drop(unsafe { Box::from_raw(at) });
            fail(e)
        }
    }
}

/// `ibv_destroy_cq`.
#[no_mangle]
pub unsafe extern "C" fn ibv_destroy_cq(cq: *mut sys::ibv_cq) -> c_int {
    // SAFETY: per the verbs contract, cq came from ibv_create_cq.
    let Some(q) = (unsafe { cq.cast::<Cq>().as_ref() }) else {
        return libc::EINVAL;
    };
    // SAFETY: its context is open.
    let Some(c) = (unsafe { session(q.cq.context) }) else {
        return libc::EINVAL;
    };
    match c.conn.call(&format!("FREECQ {}", q.cq.handle), &[]) {
        Ok(_) => {
            // SAFETY: a Box<Cq> from ibv_create_cq.
            drop(unsafe { Box::from_raw(cq.cast::<Cq>()) });
            0
        }
        Err(e) => e,
    }
}

/// What a queue pair was made with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    pub send_sge: u32,
    pub recv_sge: u32,
    pub inline: u32,
    pub sig_all: bool,
    pub ud: bool,
}

/// A queue pair: its rings, shared with the card.
#[repr(C)]
pub(crate) struct Qp {
    pub qp: sys::ibv_qp,
    pub map: Mapping,
    pub rings: QpRings,
    /// Work requests posted to each queue (producer counters), under the
    /// locks verbs requires for posting from several threads.
    pub sq_prod: Mutex<u32>,
    pub rq_prod: Mutex<u32>,
    /// `ibv_qp_state`, as last set.
    pub state: AtomicU32,
    pub caps: Caps,
}

/// `ibv_create_qp`: RC and UD queue pairs.
#[no_mangle]
pub unsafe extern "C" fn ibv_create_qp(
    pd: *mut sys::ibv_pd,
    attr: *mut sys::ibv_qp_init_attr,
) -> *mut sys::ibv_qp {
    // SAFETY: per the verbs contract.
    let (Some(p), Some(a)) = (unsafe { pd.as_ref() }, unsafe { attr.as_mut() }) else {
        return fail(libc::EINVAL);
    };
    // SAFETY: its context is open.
    let Some(c) = (unsafe { session(p.context) }) else {
        return fail(libc::EINVAL);
    };
    let ud = a.qp_type == sys::ibv_qp_type_IBV_QPT_UD;
    if a.qp_type != sys::ibv_qp_type_IBV_QPT_RC && !ud {
        return fail(libc::EOPNOTSUPP);
    }
    // SAFETY: the application's SRQ, from ibv_create_srq (or null).
    let srq = unsafe { a.srq.as_ref() }.map_or(0, |s| s.handle);
    // SAFETY: the application's CQs, from ibv_create_cq (or null).
    let (Some(scq), Some(rcq)) = (unsafe { a.send_cq.as_ref() }, unsafe { a.recv_cq.as_ref() })
    else {
        return fail(libc::EINVAL);
    };
    let cap = a.cap;
    let line = format!(
        "QP {} {} {} {} {} {} {} {} {} {} {srq}",
        p.handle,
        scq.handle,
        rcq.handle,
        cap.max_send_wr,
        cap.max_recv_wr,
        cap.max_send_sge,
        cap.max_recv_sge,
        cap.max_inline_data,
        u8::from(a.sq_sig_all != 0),
        a.qp_type
    );
    let made = c.conn.call(&line, &[]).and_then(|(w, mut fds)| {
        let (handle, qpn, sq, rq, bytes): (u32, u32, u32, u32, usize) = (
            word(&w, 0)?,
            word(&w, 1)?,
            word(&w, 2)?,
            word(&w, 3)?,
            word(&w, 4)?,
        );
        let rings = QpRings::new(sq, rq);
        if rings.bytes != bytes {
            return Err(libc::EPROTO);
        }
        let fd = fds.pop().ok_or(libc::EIO)?;
        let map = Mapping::map(fd.as_fd(), 0, bytes).map_err(|_| libc::ENOMEM)?;
        Ok((handle, qpn, rings, map))
    });
    let (handle, qpn, rings, map) = match made {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let caps = Caps {
        send_sge: cap.max_send_sge.max(1),
        recv_sge: cap.max_recv_sge.max(1),
        inline: cap.max_inline_data,
        sig_all: a.sq_sig_all != 0,
        ud,
    };
    a.cap.max_send_wr = rings.sq.entries();
    a.cap.max_recv_wr = rings.rq.entries();
    a.cap.max_send_sge = caps.send_sge;
    a.cap.max_recv_sge = caps.recv_sge;
    let qp = Qp {
        qp: sys::ibv_qp {
            context: p.context,
            qp_context: a.qp_context,
            pd,
            send_cq: a.send_cq,
            recv_cq: a.recv_cq,
            srq: a.srq,
            handle,
            qp_num: qpn,
            state: sys::ibv_qp_state_IBV_QPS_RESET,
            qp_type: a.qp_type,
            ..Default::default()
        },
        map,
        rings,
        sq_prod: Mutex::new(0),
        rq_prod: Mutex::new(0),
        state: AtomicU32::new(sys::ibv_qp_state_IBV_QPS_RESET),
        caps,
    };
    Box::into_raw(Box::new(qp)).cast()
}

/// verbs' attribute mask bits this library reads.
const QP_STATE: c_int = 1;
const QP_QKEY: c_int = 1 << 6;
const QP_AV: c_int = 1 << 7;
const QP_PATH_MTU: c_int = 1 << 8;
const QP_RQ_PSN: c_int = 1 << 12;
const QP_SQ_PSN: c_int = 1 << 16;
const QP_DEST_QPN: c_int = 1 << 20;
const QP_MIN_RNR_TIMER: c_int = 1 << 15;
const QP_TIMEOUT: c_int = 1 << 9;
const QP_RETRY_CNT: c_int = 1 << 10;
const QP_RNR_RETRY: c_int = 1 << 11;
const QP_MAX_QP_RD_ATOMIC: c_int = 1 << 13;

/// `ibv_modify_qp`: RESET → INIT → RTR → RTS, ERROR and back to RESET.
/// The peer is named by its GID (RoCE v2: an IPv4-mapped address), so
/// the address vector must be global. Timers, retry counts and atomic
/// depths are the card's (docs/rdma.md).
#[no_mangle]
pub unsafe extern "C" fn ibv_modify_qp(
    qp: *mut sys::ibv_qp,
    attr: *mut sys::ibv_qp_attr,
    mask: c_int,
) -> c_int {
    // SAFETY: per the verbs contract.
    let (Some(q), Some(a)) = (unsafe { qp.cast::<Qp>().as_ref() }, unsafe {
        attr.as_ref()
    }) else {
        return libc::EINVAL;
    };
    // SAFETY: its context is open.
    let Some(c) = (unsafe { session(q.qp.context) }) else {
        return libc::EINVAL;
    };
    if mask & QP_STATE == 0 {
        return 0;
    }
    let state = a.qp_state;
    if !q.caps.ud
        && state == sys::ibv_qp_state_IBV_QPS_RTR
        && (mask & QP_AV == 0 || a.ah_attr.is_global == 0)
    {
        // RoCE needs the GRH: the peer's GID is its address.
        return libc::EINVAL;
    }
    let pick = |bit: c_int, v: u32| if mask & bit != 0 { v } else { 0 };
    // Retry settings: `-` where the mask leaves them alone (0 is a value).
    let given = |bit: c_int, v: u8| {
        if mask & bit != 0 {
            v.to_string()
        } else {
            "-".to_string()
        }
    };
    // SAFETY: the GID union is plain bytes.
    let gid: String = unsafe { a.ah_attr.grh.dgid.raw }
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let line = format!(
        "MODIFY {} {state} {} {} {} {} {gid} {} {} {} {} {} {}",
        q.qp.handle,
        pick(QP_PATH_MTU, a.path_mtu),
        pick(QP_DEST_QPN, a.dest_qp_num),
        pick(QP_RQ_PSN, a.rq_psn),
        pick(QP_SQ_PSN, a.sq_psn),
        pick(QP_QKEY, a.qkey),
        pick(QP_MIN_RNR_TIMER, u32::from(a.min_rnr_timer)),
        given(QP_TIMEOUT, a.timeout),
        given(QP_RETRY_CNT, a.retry_cnt),
        given(QP_RNR_RETRY, a.rnr_retry),
        given(QP_MAX_QP_RD_ATOMIC, a.max_rd_atomic),
    );
    match c.conn.call(&line, &[]) {
        Ok(_) => {
            q.state.store(state, Ordering::Release);
            // SAFETY: the application's own QP struct; verbs updates its
            // state field on a successful modify.
            unsafe { (*qp).state = state };
            0
        }
        Err(e) => e,
    }
}

/// `ibv_query_qp`.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_qp(
    qp: *mut sys::ibv_qp,
    attr: *mut sys::ibv_qp_attr,
    _mask: c_int,
    init: *mut sys::ibv_qp_init_attr,
) -> c_int {
    // SAFETY: per the verbs contract.
    let (Some(q), Some(a)) = (unsafe { qp.cast::<Qp>().as_ref() }, unsafe {
        attr.as_mut()
    }) else {
        return libc::EINVAL;
    };
    // SAFETY: its context is open.
    let Some(c) = (unsafe { session(q.qp.context) }) else {
        return libc::EINVAL;
    };
    let w = match c.conn.call(&format!("QUERYQP {}", q.qp.handle), &[]) {
        Ok((w, _)) => w,
        Err(e) => return e,
    };
    let (Ok(state), Ok(dqpn), Ok(ip), Ok(sq_psn), Ok(rq_psn), Ok(mtu)) = (
        word::<u32>(&w, 0),
        word::<u32>(&w, 1),
        word::<std::net::Ipv4Addr>(&w, 2),
        word::<u32>(&w, 3),
        word::<u32>(&w, 4),
        word::<u32>(&w, 5),
    ) else {
        return libc::EIO;
    };
    let cap = sys::ibv_qp_cap {
        max_send_wr: q.rings.sq.entries(),
        max_recv_wr: q.rings.rq.entries(),
        max_send_sge: q.caps.send_sge,
        max_recv_sge: q.caps.recv_sge,
        max_inline_data: q.caps.inline,
    };
    *a = sys::ibv_qp_attr {
        qp_state: state,
        cur_qp_state: state,
        path_mtu: mtu,
        dest_qp_num: dqpn,
        sq_psn,
        rq_psn,
        cap,
        port_num: 1,
        max_rd_atomic: 16,
        max_dest_rd_atomic: 16,
        timeout: 14,
        retry_cnt: 7,
        rnr_retry: 7,
        ..Default::default()
    };
    a.ah_attr.is_global = 1;
    a.ah_attr.port_num = 1;
    a.ah_attr.grh.dgid.raw = ip.to_ipv6_mapped().octets();
    // SAFETY: per the verbs contract, init is null or the caller's struct.
    if let Some(i) = unsafe { init.as_mut() } {
        *i = sys::ibv_qp_init_attr {
            qp_context: q.qp.qp_context,
            send_cq: q.qp.send_cq,
            recv_cq: q.qp.recv_cq,
            srq: q.qp.srq,
            cap,
            qp_type: q.qp.qp_type,
            sq_sig_all: c_int::from(q.caps.sig_all),
        };
    }
    0
}

/// `ibv_destroy_qp`.
#[no_mangle]
pub unsafe extern "C" fn ibv_destroy_qp(qp: *mut sys::ibv_qp) -> c_int {
    // SAFETY: per the verbs contract, qp came from ibv_create_qp.
    let Some(q) = (unsafe { qp.cast::<Qp>().as_ref() }) else {
        return libc::EINVAL;
    };
    // SAFETY: its context is open.
    let Some(c) = (unsafe { session(q.qp.context) }) else {
        return libc::EINVAL;
    };
    match c.conn.call(&format!("FREEQP {}", q.qp.handle), &[]) {
        Ok(_) => {
            // SAFETY: a Box<Qp> from ibv_create_qp.
            drop(unsafe { Box::from_raw(qp.cast::<Qp>()) });
            0
        }
        Err(e) => e,
    }
}

/// An address handle: the peer's IPv4 address, from its RoCE v2 GID.
#[repr(C)]
pub(crate) struct Ah {
    pub ah: sys::ibv_ah,
    pub ip: u32,
}

/// `ibv_create_ah`: global routes to IPv4-mapped GIDs (RoCE v2).
#[no_mangle]
pub unsafe extern "C" fn ibv_create_ah(
    pd: *mut sys::ibv_pd,
    attr: *mut sys::ibv_ah_attr,
) -> *mut sys::ibv_ah {
    // SAFETY: per the verbs contract.
    let (Some(p), Some(a)) = (unsafe { pd.as_ref() }, unsafe { attr.as_ref() }) else {
        return fail(libc::EINVAL);
    };
    // SAFETY: the GID union is plain bytes.
    let gid = unsafe { a.grh.dgid.raw };
    let v6 = std::net::Ipv6Addr::from(gid);
    let Some(ip) = v6.to_ipv4_mapped().filter(|_| a.is_global != 0) else {
        return fail(libc::EINVAL);
    };
    Box::into_raw(Box::new(Ah {
        ah: sys::ibv_ah {
            context: p.context,
            pd,
            handle: 0,
        },
        ip: u32::from(ip),
    }))
    .cast()
}

/// `ibv_destroy_ah`.
#[no_mangle]
pub unsafe extern "C" fn ibv_destroy_ah(ah: *mut sys::ibv_ah) -> c_int {
    if ah.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: a Box<Ah> from ibv_create_ah, freed once.
    drop(unsafe { Box::from_raw(ah.cast::<Ah>()) });
    0
}

/// A shared receive queue: its ring, shared with the card.
#[repr(C)]
pub(crate) struct Srq {
    pub srq: sys::ibv_srq,
    pub map: Mapping,
    pub ring: Ring,
    /// Receives posted (the producer counter).
    pub prod: Mutex<u32>,
    pub max_sge: u32,
}

/// `ibv_create_srq`.
#[no_mangle]
pub unsafe extern "C" fn ibv_create_srq(
    pd: *mut sys::ibv_pd,
    attr: *mut sys::ibv_srq_init_attr,
) -> *mut sys::ibv_srq {
    // SAFETY: per the verbs contract.
    let (Some(p), Some(a)) = (unsafe { pd.as_ref() }, unsafe { attr.as_mut() }) else {
        return fail(libc::EINVAL);
    };
    // SAFETY: its context is open.
    let Some(c) = (unsafe { session(p.context) }) else {
        return fail(libc::EINVAL);
    };
    let line = format!("SRQ {} {} {}", p.handle, a.attr.max_wr, a.attr.max_sge);
    let made = c.conn.call(&line, &[]).and_then(|(w, mut fds)| {
        let (handle, entries, bytes): (u32, u32, usize) =
            (word(&w, 0)?, word(&w, 1)?, word(&w, 2)?);
        let r = Ring::new(0, entries, size_of::<ring::RecvWqe>());
        if r.bytes().next_multiple_of(softcard_rdma::shm::page_size()) != bytes {
            return Err(libc::EPROTO);
        }
        let fd = fds.pop().ok_or(libc::EIO)?;
        let map = Mapping::map(fd.as_fd(), 0, bytes).map_err(|_| libc::ENOMEM)?;
        Ok((handle, r, map))
    });
    let (handle, r, map) = match made {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    a.attr.max_wr = r.entries();
    a.attr.max_sge = a.attr.max_sge.max(1);
    let srq = Srq {
        srq: sys::ibv_srq {
            context: p.context,
            srq_context: a.srq_context,
            pd,
            handle,
            ..Default::default()
        },
        map,
        ring: r,
        prod: Mutex::new(0),
        max_sge: a.attr.max_sge,
    };
    Box::into_raw(Box::new(srq)).cast()
}

/// `ibv_modify_srq`: the limit event is not carried (the limit is
/// accepted and never fires); the size cannot change.
#[no_mangle]
pub unsafe extern "C" fn ibv_modify_srq(
    srq: *mut sys::ibv_srq,
    _attr: *mut sys::ibv_srq_attr,
    mask: c_int,
) -> c_int {
    if srq.is_null() {
        return libc::EINVAL;
    }
    // IBV_SRQ_MAX_WR (1): resizing.
    if mask & 1 != 0 {
        return libc::EOPNOTSUPP;
    }
    0
}

/// `ibv_query_srq`.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_srq(
    srq: *mut sys::ibv_srq,
    attr: *mut sys::ibv_srq_attr,
) -> c_int {
    // SAFETY: per the verbs contract.
    let (Some(q), Some(a)) = (unsafe { srq.cast::<Srq>().as_ref() }, unsafe {
        attr.as_mut()
    }) else {
        return libc::EINVAL;
    };
    *a = sys::ibv_srq_attr {
        max_wr: q.ring.entries(),
        max_sge: q.max_sge,
        srq_limit: 0,
    };
    0
}

/// `ibv_destroy_srq`.
#[no_mangle]
pub unsafe extern "C" fn ibv_destroy_srq(srq: *mut sys::ibv_srq) -> c_int {
    // SAFETY: per the verbs contract, srq came from ibv_create_srq.
    let Some(q) = (unsafe { srq.cast::<Srq>().as_ref() }) else {
        return libc::EINVAL;
    };
    // SAFETY: its context is open.
    let Some(c) = (unsafe { session(q.srq.context) }) else {
        return libc::EINVAL;
    };
    match c.conn.call(&format!("FREESRQ {}", q.srq.handle), &[]) {
        Ok(_) => {
            // SAFETY: a Box<Srq> from ibv_create_srq.
            drop(unsafe { Box::from_raw(srq.cast::<Srq>()) });
            0
        }
        Err(e) => e,
    }
}
