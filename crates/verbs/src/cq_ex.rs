//! The extended completion queue (`ibv_create_cq_ex`): the same ring as
//! `ibv_create_cq`'s, read one completion at a time through the
//! `ibv_cq_ex` functions (`ibv_start_poll`, `ibv_next_poll`,
//! `ibv_end_poll` and the `ibv_wc_read_*` accessors the header inlines).
//! The standard fields are carried (`IBV_WC_STANDARD_FLAGS`); timestamps,
//! VLANs, flow tags and tag matching are not (`EOPNOTSUPP` at creation).

use std::ffi::{c_int, c_uint};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

use softcard_rdma::ring::Cqe;

use crate::objects::{make_cq, Cq};
use crate::{set_errno, sys};

/// The state of one start/next/end sequence.
#[derive(Debug, Default)]
pub(crate) struct ExPoll {
    /// A sequence is open (start_poll succeeded, end_poll not yet).
    busy: AtomicBool,
    /// The completion the accessors read.
    cur: Mutex<Cqe>,
    /// The ring position of `cur`.
    at: AtomicU32,
}

/// The Cq behind an `ibv_cq_ex` this library made.
///
/// # Safety
/// `cq` came from [`create_cq_ex`] (or `ibv_create_cq`) and lives.
unsafe fn ours<'a>(cq: *mut sys::ibv_cq_ex) -> &'a Cq {
    // SAFETY: per the caller; a Cq starts with its ibv_cq_ex.
    unsafe { &*cq.cast::<Cq>() }
}

/// `verbs_context.create_cq_ex`.
pub(crate) unsafe extern "C" fn create_cq_ex(
    ctx: *mut sys::ibv_context,
    attr: *mut sys::ibv_cq_init_attr_ex,
) -> *mut sys::ibv_cq_ex {
    // SAFETY: per the verbs contract.
    let Some(a) = (unsafe { attr.as_ref() }) else {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    };
    let standard = u64::from(sys::IBV_WC_STANDARD_FLAGS);
    // IBV_CQ_INIT_ATTR_MASK_FLAGS (1): single-threaded and ignore-overrun
    // hints, which change nothing here.
    if a.wc_flags & !standard != 0 || a.comp_mask & !1 != 0 {
        set_errno(libc::EOPNOTSUPP);
        return std::ptr::null_mut();
    }
    // SAFETY: per the verbs contract: an open context and its channel.
    let q = unsafe { make_cq(ctx, a.cqe, a.cq_context, a.channel) };
    if q.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: the fresh CQ, not yet given out.
    let cq = unsafe { &mut (*q).cq };
    cq.start_poll = Some(start_poll);
    cq.next_poll = Some(next_poll);
    cq.end_poll = Some(end_poll);
    cq.read_opcode = Some(read_opcode);
    cq.read_vendor_err = Some(read_vendor_err);
    cq.read_byte_len = Some(read_byte_len);
    cq.read_imm_data = Some(read_imm_data);
    cq.read_qp_num = Some(read_qp_num);
    cq.read_src_qp = Some(read_src_qp);
    cq.read_wc_flags = Some(read_wc_flags);
    cq.read_slid = Some(read_slid);
    cq.read_sl = Some(read_sl);
    cq.read_dlid_path_bits = Some(read_dlid_path_bits);
    q.cast()
}

/// Loads the completion at ring position `at` if there is one, as the
/// current one; `ENOENT` if the ring holds nothing there yet.
fn load(q: &Cq, cq: *mut sys::ibv_cq_ex, at: u32) -> c_int {
    let r = q.ring;
    if r.prod(&q.map).load(Ordering::Acquire).wrapping_sub(at) == 0 {
        return libc::ENOENT;
    }
    let c: Cqe = q.map.read(r.slot(at));
    // SAFETY: the application's CQ: verbs has start/next_poll set its
    // status and wr_id for the accessors and the application.
    unsafe {
        (*cq).status = c.status;
        (*cq).wr_id = c.wr_id;
    }
    *q.ex
        .cur
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = c;
    q.ex.at.store(at, Ordering::Release);
    0
}

unsafe extern "C" fn start_poll(
    cq: *mut sys::ibv_cq_ex,
    _attr: *mut sys::ibv_poll_cq_attr,
) -> c_int {
    // SAFETY: per the verbs contract.
    let q = unsafe { ours(cq) };
    if q.ex.busy.swap(true, Ordering::AcqRel) {
        return libc::EBUSY;
    }
    let at = *q
        .cons
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let r = load(q, cq, at);
    if r != 0 {
        // verbs: no end_poll after a start_poll that found nothing.
        q.ex.busy.store(false, Ordering::Release);
    }
    r
}

unsafe extern "C" fn next_poll(cq: *mut sys::ibv_cq_ex) -> c_int {
    // SAFETY: per the verbs contract.
    let q = unsafe { ours(cq) };
    let next = q.ex.at.load(Ordering::Acquire).wrapping_add(1);
    // The current one is consumed either way.
    *q.cons
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
    load(q, cq, next)
}

unsafe extern "C" fn end_poll(cq: *mut sys::ibv_cq_ex) {
    // SAFETY: per the verbs contract.
    let q = unsafe { ours(cq) };
    let mut cons = q
        .cons
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let at = q.ex.at.load(Ordering::Acquire);
    let prod = q.ring.prod(&q.map).load(Ordering::Acquire);
    // Only this side writes the consumer counter.
    let waiting = prod.wrapping_sub(q.ring.cons(&q.map).load(Ordering::Relaxed));
    // The last one loaded is consumed too (it was read).
    if prod.wrapping_sub(at) != 0 && *cons == at {
        *cons = at.wrapping_add(1);
    }
    q.ring.cons(&q.map).store(*cons, Ordering::Release);
    drop(cons);
    // SAFETY: the CQ's context is open.
    unsafe { crate::datapath::made_room(q, waiting) };
    q.ex.busy.store(false, Ordering::Release);
}

/// The current completion.
///
/// # Safety
/// `cq` came from [`create_cq_ex`], inside a start/end sequence.
unsafe fn cur(cq: *mut sys::ibv_cq_ex) -> Cqe {
    // SAFETY: per the caller.
    let q = unsafe { ours(cq) };
    *q.ex
        .cur
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

unsafe extern "C" fn read_opcode(cq: *mut sys::ibv_cq_ex) -> sys::ibv_wc_opcode {
    // SAFETY: per the verbs contract.
    unsafe { cur(cq) }.opcode
}

unsafe extern "C" fn read_vendor_err(cq: *mut sys::ibv_cq_ex) -> u32 {
    // SAFETY: per the verbs contract.
    unsafe { cur(cq) }.vendor_err
}

unsafe extern "C" fn read_byte_len(cq: *mut sys::ibv_cq_ex) -> u32 {
    // SAFETY: per the verbs contract.
    unsafe { cur(cq) }.byte_len
}

unsafe extern "C" fn read_imm_data(cq: *mut sys::ibv_cq_ex) -> u32 {
    // SAFETY: per the verbs contract.
    unsafe { cur(cq) }.imm
}

unsafe extern "C" fn read_qp_num(cq: *mut sys::ibv_cq_ex) -> u32 {
    // SAFETY: per the verbs contract.
    unsafe { cur(cq) }.qp_num
}

unsafe extern "C" fn read_src_qp(cq: *mut sys::ibv_cq_ex) -> u32 {
    // SAFETY: per the verbs contract.
    unsafe { cur(cq) }.src_qp
}

unsafe extern "C" fn read_wc_flags(cq: *mut sys::ibv_cq_ex) -> c_uint {
    // SAFETY: per the verbs contract.
    unsafe { cur(cq) }.wc_flags
}

unsafe extern "C" fn read_slid(cq: *mut sys::ibv_cq_ex) -> u32 {
    // SAFETY: per the verbs contract.
    u32::from(unsafe { cur(cq) }.slid)
}

unsafe extern "C" fn read_sl(cq: *mut sys::ibv_cq_ex) -> u8 {
    // SAFETY: per the verbs contract.
    unsafe { cur(cq) }.sl
}

unsafe extern "C" fn read_dlid_path_bits(cq: *mut sys::ibv_cq_ex) -> u8 {
    // SAFETY: per the verbs contract.
    unsafe { cur(cq) }.dlid_path_bits
}
