//! The data path as the application calls it, through its context's ops
//! (the header's inline `ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq`,
//! `ibv_req_notify_cq`): work requests go onto the queue pair's rings and
//! completions come off the completion queue's ring, in shared memory, with
//! no system call unless the card's progress thread sleeps (then one
//! doorbell write); and the completion channel's events.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{fence, Ordering};

use softcard_rdma::ring::{self, Cqe, RecvWqe, SendWqe};
use softcard_rdma::shm;

use crate::objects::{Channel, Cq, Qp, Srq};
use crate::{context, sys};
use softcard_rdma::ring::Ring;
use softcard_rdma::shm::Mapping;

/// Rings the device's doorbell if the card's thread said it sleeps.
///
/// # Safety
/// `ctx` is an open context.
unsafe fn doorbell(ctx: *mut sys::ibv_context, sleeping: &std::sync::atomic::AtomicU32) {
    fence(Ordering::SeqCst);
    if sleeping.load(Ordering::SeqCst) != 0 {
        // SAFETY: per the caller.
        if let Some(c) = unsafe { context(ctx) } {
            shm::ring(&c.doorbell);
        }
    }
}

/// One send work request as the ring's entry, or the errno verbs returns
/// for it.
///
/// # Safety
/// `wr`'s scatter list is the application's (valid for `num_sge`), and
/// inline data lies at its addresses.
unsafe fn send_wqe(q: &Qp, wr: &sys::ibv_send_wr) -> Result<SendWqe, c_int> {
    let mut w = SendWqe {
        wr_id: wr.wr_id,
        opcode: wr.opcode,
        flags: wr.send_flags,
        ..SendWqe::default()
    };
    let n = usize::try_from(wr.num_sge).map_err(|_| libc::EINVAL)?;
    if n > q.caps.send_sge as usize || (n > 0 && wr.sg_list.is_null()) {
        return Err(libc::EINVAL);
    }
    let sges = if n == 0 {
        &[][..]
    } else {
        // SAFETY: per the caller: num_sge entries at sg_list.
        unsafe { std::slice::from_raw_parts(wr.sg_list, n) }
    };
    match wr.opcode {
        // UD: SEND and SEND_WITH_IMM to an address handle.
        2 | 3 if q.caps.ud => {
            // SAFETY: reading the union as the queue pair's type says.
            let ud = unsafe { wr.wr.ud };
            // SAFETY: an address handle from ibv_create_ah (or null).
            let Some(ah) = (unsafe { ud.ah.cast::<crate::objects::Ah>().as_ref() }) else {
                return Err(libc::EINVAL);
            };
            w.ah = ah.ip;
            w.remote_qpn = ud.remote_qpn;
            w.remote_qkey = ud.remote_qkey;
            // SAFETY: imm_data, a plain u32.
            w.imm = unsafe { wr.__bindgen_anon_1.imm_data };
        }
        _ if q.caps.ud => return Err(libc::EINVAL),
        // WRITE, WRITE_WITH_IMM, SEND, SEND_WITH_IMM, READ.
        0..=4 => {
            // SAFETY: reading the union as the opcode says.
            let rdma = unsafe { wr.wr.rdma };
            w.remote_addr = rdma.remote_addr;
            w.rkey = rdma.rkey;
            // SAFETY: imm_data, a plain u32.
            w.imm = unsafe { wr.__bindgen_anon_1.imm_data };
        }
        // CMP_AND_SWP, FETCH_AND_ADD.
        5 | 6 => {
            // SAFETY: reading the union as the opcode says.
            let at = unsafe { wr.wr.atomic };
            w.remote_addr = at.remote_addr;
            w.rkey = at.rkey;
            w.compare_add = at.compare_add;
            w.swap = at.swap;
        }
        _ => return Err(libc::EINVAL),
    }
    let inline = wr.send_flags & sys::ibv_send_flags_IBV_SEND_INLINE != 0 && wr.opcode <= 3;
    if inline {
        let mut at = 0usize;
        for s in sges {
            let len = s.length as usize;
            if at + len > q.caps.inline as usize || at + len > ring::MAX_INLINE {
                return Err(libc::EINVAL);
            }
            // SAFETY: inline data is the application's readable memory at
            // the entry's address (verbs: no registration needed).
            unsafe {
                std::ptr::copy_nonoverlapping(s.addr as *const u8, w.data[at..].as_mut_ptr(), len)
            };
            at += len;
        }
        w.inline_len = at as u32;
        w.flags |= sys::ibv_send_flags_IBV_SEND_INLINE;
    } else {
        w.flags &= !sys::ibv_send_flags_IBV_SEND_INLINE;
        for (i, s) in sges.iter().enumerate() {
            w.set_sge(
                i,
                ring::Sge {
                    addr: s.addr,
                    length: s.length,
                    lkey: s.lkey,
                },
            );
        }
        w.num_sge = n as u32;
    }
    Ok(w)
}

/// `ops.post_send`.
pub(crate) unsafe extern "C" fn post_send(
    qp: *mut sys::ibv_qp,
    wr: *mut sys::ibv_send_wr,
    bad: *mut *mut sys::ibv_send_wr,
) -> c_int {
    // SAFETY: per the verbs contract, qp came from ibv_create_qp.
    let Some(q) = (unsafe { qp.cast::<Qp>().as_ref() }) else {
        return libc::EINVAL;
    };
    let state = q.state.load(Ordering::Acquire);
    if !matches!(
        state,
        sys::ibv_qp_state_IBV_QPS_RTS
            | sys::ibv_qp_state_IBV_QPS_SQD
            | sys::ibv_qp_state_IBV_QPS_ERR
    ) {
        // SAFETY: per the verbs contract.
        return unsafe { refuse(wr, bad) };
    }
    let ring = Producer {
        map: &q.map,
        ring: q.rings.sq,
        prod: &q.sq_prod,
        ctx: q.qp.context,
    };
    // SAFETY: per the verbs contract (each request's scatter list and
    // inline data are the application's); the QP's context is open.
    unsafe { ring.post(wr, bad, |w: &sys::ibv_send_wr| (send_wqe(q, w), w.next)) }
}

/// Refuses a whole chain of work requests: `EINVAL`, the first in `bad`.
///
/// # Safety
/// `bad` is null or the caller's out pointer.
unsafe fn refuse<W>(wr: *mut W, bad: *mut *mut W) -> c_int {
    if !bad.is_null() {
        // SAFETY: per the caller.
        unsafe { *bad = wr };
    }
    libc::EINVAL
}

/// One ring the library produces into, with what posting to it needs.
struct Producer<'a> {
    map: &'a Mapping,
    ring: Ring,
    prod: &'a std::sync::Mutex<u32>,
    ctx: *mut sys::ibv_context,
}

impl Producer<'_> {
    /// Writes a chain of work requests onto the ring: `entry` makes each
    /// one's ring entry (or the errno that stops the chain there) and
    /// names the next. Publishes what was written, rings the doorbell if
    /// the card sleeps, and reports the first request not posted in
    /// `bad`, as verbs does.
    ///
    /// # Safety
    /// `wr` is the application's chain (verbs' contract); `bad` is null
    /// or its out pointer; `self.ctx` is open.
    unsafe fn post<W, E: Copy>(
        &self,
        wr: *mut W,
        bad: *mut *mut W,
        entry: impl Fn(&W) -> (Result<E, c_int>, *mut W),
    ) -> c_int {
        let ring = self.ring;
        let mut prod = self
            .prod
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = *prod;
        let mut cur = wr;
        let mut err = 0;
        // SAFETY: the application's chain of work requests.
        while let Some(w) = unsafe { cur.as_ref() } {
            let cons = ring.cons(self.map).load(Ordering::Acquire);
            if prod.wrapping_sub(cons) >= ring.entries() {
                err = libc::ENOMEM;
                break;
            }
            let (e, next) = entry(w);
            match e {
                Ok(e) => self.map.write(ring.slot(*prod), e),
                Err(e) => {
                    err = e;
                    break;
                }
            }
            *prod = prod.wrapping_add(1);
            cur = next;
        }
        if *prod != start {
            ring.prod(self.map).store(*prod, Ordering::Release);
            // SAFETY: per the caller.
            unsafe { doorbell(self.ctx, ring.sleeping(self.map)) };
        }
        if err != 0 && !bad.is_null() {
            // SAFETY: the caller's out pointer.
            unsafe { *bad = cur };
        }
        err
    }
}

/// A receive work request as the ring's entry, or `EINVAL` for more
/// scatter entries than the queue takes.
///
/// # Safety
/// `w`'s scatter list is the application's (valid for `num_sge`).
unsafe fn recv_wqe(w: &sys::ibv_recv_wr, max_sge: u32) -> Result<RecvWqe, c_int> {
    let n = usize::try_from(w.num_sge).unwrap_or(usize::MAX);
    if n > max_sge as usize || n > ring::MAX_RECV_SGE || (n > 0 && w.sg_list.is_null()) {
        return Err(libc::EINVAL);
    }
    let mut wqe = RecvWqe {
        wr_id: w.wr_id,
        num_sge: n as u32,
        ..RecvWqe::default()
    };
    if n > 0 {
        // SAFETY: num_sge entries at sg_list, per the caller.
        let sges = unsafe { std::slice::from_raw_parts(w.sg_list, n) };
        for (d, s) in wqe.sge.iter_mut().zip(sges) {
            *d = ring::Sge {
                addr: s.addr,
                length: s.length,
                lkey: s.lkey,
            };
        }
    }
    Ok(wqe)
}

/// `ops.post_recv`.
pub(crate) unsafe extern "C" fn post_recv(
    qp: *mut sys::ibv_qp,
    wr: *mut sys::ibv_recv_wr,
    bad: *mut *mut sys::ibv_recv_wr,
) -> c_int {
    // SAFETY: per the verbs contract, qp came from ibv_create_qp.
    let Some(q) = (unsafe { qp.cast::<Qp>().as_ref() }) else {
        return libc::EINVAL;
    };
    // Verbs: no receives of its own for a QP in RESET or on an SRQ.
    if q.state.load(Ordering::Acquire) == sys::ibv_qp_state_IBV_QPS_RESET || !q.qp.srq.is_null() {
        // SAFETY: per the verbs contract.
        return unsafe { refuse(wr, bad) };
    }
    let r = Producer {
        map: &q.map,
        ring: q.rings.rq,
        prod: &q.rq_prod,
        ctx: q.qp.context,
    };
    let max = q.caps.recv_sge;
    // SAFETY: per the verbs contract (each request's scatter list is the
    // application's); the QP's context is open.
    unsafe { r.post(wr, bad, |w: &sys::ibv_recv_wr| (recv_wqe(w, max), w.next)) }
}

/// `ops.post_srq_recv`.
pub(crate) unsafe extern "C" fn post_srq_recv(
    srq: *mut sys::ibv_srq,
    wr: *mut sys::ibv_recv_wr,
    bad: *mut *mut sys::ibv_recv_wr,
) -> c_int {
    // SAFETY: per the verbs contract, srq came from ibv_create_srq.
    let Some(q) = (unsafe { srq.cast::<Srq>().as_ref() }) else {
        return libc::EINVAL;
    };
    let r = Producer {
        map: &q.map,
        ring: q.ring,
        prod: &q.prod,
        ctx: q.srq.context,
    };
    let max = q.max_sge;
    // SAFETY: per the verbs contract (each request's scatter list is the
    // application's); the SRQ's context is open.
    unsafe { r.post(wr, bad, |w: &sys::ibv_recv_wr| (recv_wqe(w, max), w.next)) }
}

/// `ops.poll_cq`.
pub(crate) unsafe extern "C" fn poll_cq(
    cq: *mut sys::ibv_cq,
    num: c_int,
    wc: *mut sys::ibv_wc,
) -> c_int {
    // SAFETY: per the verbs contract, cq came from ibv_create_cq.
    let Some(q) = (unsafe { cq.cast::<Cq>().as_ref() }) else {
        return -libc::EINVAL;
    };
    let Ok(num) = u32::try_from(num) else {
        return -libc::EINVAL;
    };
    if num > 0 && wc.is_null() {
        return -libc::EINVAL;
    }
    let r = q.ring;
    let mut cons = q
        .cons
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let waiting = r.prod(&q.map).load(Ordering::Acquire).wrapping_sub(*cons);
    let avail = waiting.min(r.entries());
    let n = avail.min(num);
    for k in 0..n {
        let c: Cqe = q.map.read(r.slot(cons.wrapping_add(k)));
        let mut out = sys::ibv_wc {
            wr_id: c.wr_id,
            status: c.status,
            opcode: c.opcode,
            vendor_err: c.vendor_err,
            byte_len: c.byte_len,
            qp_num: c.qp_num,
            src_qp: c.src_qp,
            wc_flags: c.wc_flags,
            pkey_index: c.pkey_index,
            slid: c.slid,
            sl: c.sl,
            dlid_path_bits: c.dlid_path_bits,
            ..Default::default()
        };
        out.__bindgen_anon_1.imm_data = c.imm;
        // SAFETY: the caller's array holds `num` entries.
        unsafe { wc.add(k as usize).write(out) };
    }
    if n > 0 {
        *cons = cons.wrapping_add(n);
        r.cons(&q.map).store(*cons, Ordering::Release);
        // SAFETY: the CQ's context is open.
        unsafe { made_room(q, waiting) };
    }
    n.cast_signed()
}

/// After the application took completions from a ring that held
/// `waiting`: a full ring may have left completions at the card, which
/// publishes them when woken rather than at its next timed look (the card
/// sleeps only after looking at the consumer counter once more, so one of
/// the two sides sees the other).
///
/// # Safety
/// The CQ's context is open.
pub(crate) unsafe fn made_room(q: &Cq, waiting: u32) {
    if waiting >= q.ring.entries() {
        // SAFETY: per the caller.
        unsafe { doorbell(q.cq.context, q.ring.sleeping(&q.map)) };
    }
}

/// `ops.req_notify_cq`: the next completion (or one already waiting)
/// sends an event on the CQ's channel.
pub(crate) unsafe extern "C" fn req_notify_cq(
    cq: *mut sys::ibv_cq,
    solicited_only: c_int,
) -> c_int {
    // SAFETY: per the verbs contract, cq came from ibv_create_cq.
    let Some(q) = (unsafe { cq.cast::<Cq>().as_ref() }) else {
        return libc::EINVAL;
    };
    let r = q.ring;
    r.armed(&q.map)
        .store(if solicited_only != 0 { 2 } else { 1 }, Ordering::SeqCst);
    // SAFETY: the CQ's context is open.
    unsafe { doorbell(q.cq.context, r.sleeping(&q.map)) };
    0
}

/// `ibv_get_cq_event`: waits (unless the channel's descriptor was made
/// non-blocking) for the next event and says which CQ it is for.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_cq_event(
    ch: *mut sys::ibv_comp_channel,
    cq: *mut *mut sys::ibv_cq,
    cq_context: *mut *mut c_void,
) -> c_int {
    // SAFETY: per the verbs contract, ch came from ibv_create_comp_channel.
    let Some(chan) = (unsafe { ch.cast::<Channel>().as_ref() }) else {
        crate::set_errno(libc::EINVAL);
        return -1;
    };
    let mut b = [0u8; 8];
    // SAFETY: reading into a live buffer from the channel's own socket.
    let n = unsafe { libc::read(chan.ch.fd, b.as_mut_ptr().cast(), 8) };
    if n != 8 {
        if n >= 0 {
            crate::set_errno(libc::EIO);
        }
        return -1;
    }
    let q = usize::from_ne_bytes(b) as *mut Cq;
    // SAFETY: the card sends back the cookie this library gave it at
    // ibv_create_cq: a live CQ of this channel (verbs: a CQ is not
    // destroyed while it has unacknowledged events).
    let Some(found) = (unsafe { q.as_ref() }) else {
        crate::set_errno(libc::EIO);
        return -1;
    };
    found.events.fetch_add(1, Ordering::AcqRel);
    if !cq.is_null() {
        // SAFETY: the caller's out pointer.
        unsafe { *cq = q.cast() };
    }
    if !cq_context.is_null() {
        // SAFETY: the caller's out pointer.
        unsafe { *cq_context = found.cq.cq_context };
    }
    0
}

/// `ibv_ack_cq_events`.
#[no_mangle]
pub unsafe extern "C" fn ibv_ack_cq_events(cq: *mut sys::ibv_cq, n: c_uint) {
    // SAFETY: per the verbs contract, cq came from ibv_create_cq.
    if let Some(q) = unsafe { cq.cast::<Cq>().as_ref() } {
        q.acked.fetch_add(n, Ordering::AcqRel);
    }
}
