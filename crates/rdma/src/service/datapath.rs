//! The data path between applications and a device's engine, run by the
//! engine's progress thread ([`crate::progress::Hook`]): work requests
//! from the applications' send and receive rings into the engine, and
//! completions from the engine's queues into the applications' completion
//! rings, with events on their channels.
//!
//! Every work request is copied out of shared memory before it is read,
//! and every address in it is resolved through the application's own
//! regions (its lkeys, its protection domain): a request naming memory the
//! application did not register, or registered in another domain,
//! completes with a protection error and moves the queue pair to ERROR, as
//! verbs prescribes. Counters that cannot be true (a producer ahead of
//! what the ring holds) or requests no library writes (an unknown opcode,
//! more scatter entries than the queue pair was made with) mean the
//! application scribbled on its rings: its queue pairs go to ERROR and it
//! is disconnected. Nobody else is affected.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::progress::Hook;
use crate::rc::{Completion, Engine, SendOp, Sge, WcOpcode, WcStatus};
use crate::ring::{self, Cqe, RecvWqe, SendWqe};

use super::session::{Mr, Qp, Session};

/// The sessions of one device.
#[derive(Debug, Default)]
pub(super) struct Port {
    pub sessions: HashMap<u64, Session>,
}

pub(super) fn lock(p: &Mutex<Port>) -> MutexGuard<'_, Port> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Work requests taken from one queue in one round (fairness between
/// queue pairs and applications).
const BATCH: u32 = 64;

/// The progress thread's share of the data path.
#[derive(Debug)]
pub(super) struct DataPath {
    pub port: Arc<Mutex<Port>>,
    asleep: bool,
}

impl DataPath {
    pub fn new(port: Arc<Mutex<Port>>) -> Self {
        Self {
            port,
            asleep: false,
        }
    }
}

/// The progress thread's real-time priority (`SCHED_FIFO`, the lowest):
/// a NIC does not wait for the CPU behind applications that spin on their
/// completion queues, and neither should the card's thread. With more
/// spinning threads than cores it would otherwise wait a scheduler slice
/// (milliseconds) for every step. It sleeps whenever it has nothing to do,
/// and the kernel's real-time throttling still leaves others a share if it
/// never does.
const RT_PRIORITY: i32 = 1;

impl Hook for DataPath {
    fn started(&mut self) {
        let param = libc::sched_param {
            sched_priority: RT_PRIORITY,
        };
        // SAFETY: sched_setscheduler on this thread alone (tid 0) with a
        // live parameter struct.
        let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
        if r != 0 {
            log::info!(
                "rdma: the progress thread keeps ordinary scheduling ({}; CAP_SYS_NICE allows SCHED_FIFO)",
                std::io::Error::last_os_error()
            );
        }
    }

    fn work(&mut self, e: &mut Engine) -> bool {
        let mut busy = false;
        for s in lock(&self.port).sessions.values_mut() {
            busy |= pump(s, e);
        }
        busy
    }

    fn sleeping(&mut self, e: &mut Engine) -> bool {
        let mut port = lock(&self.port);
        for s in port.sessions.values() {
            set_sleeping(s, 1);
        }
        self.asleep = true;
        // Work published before the producers could see the flag.
        let mut busy = false;
        for s in port.sessions.values_mut() {
            busy |= pump(s, e);
        }
        busy
    }

    fn awake(&mut self) {
        if std::mem::take(&mut self.asleep) {
            for s in lock(&self.port).sessions.values() {
                set_sleeping(s, 0);
            }
        }
    }
}

fn set_sleeping(s: &Session, v: u32) {
    for q in s.srqs.values() {
        q.ring.sleeping(&q.map).store(v, Ordering::SeqCst);
    }
    for q in s.qps.values() {
        q.rings.sq.sleeping(&q.map).store(v, Ordering::SeqCst);
        q.rings.rq.sleeping(&q.map).store(v, Ordering::SeqCst);
    }
    for c in s.cqs.values() {
        c.ring.sleeping(&c.map).store(v, Ordering::SeqCst);
    }
}

/// One round for one application: its new work, then its completions.
pub(super) fn pump(s: &mut Session, e: &mut Engine) -> bool {
    if s.broken.is_some() {
        return false;
    }
    let mut busy = false;
    let mut broke = None;
    for qp in s.qps.values_mut() {
        // UD queue pairs are named by number alone.
        let i = if qp.ud {
            usize::MAX
        } else {
            let Some(i) = e.qp_index(qp.qpn) else {
                continue;
            };
            i
        };
        match take_work(qp, i, e, &s.lkeys, &s.mrs) {
            Ok(n) => busy |= n,
            Err(why) => {
                broke = Some(why);
                break;
            }
        }
    }
    if broke.is_none() {
        for srq in s.srqs.values_mut() {
            match take_shared(srq, e, &s.lkeys, &s.mrs) {
                Ok(n) => busy |= n,
                Err(why) => {
                    broke = Some(why);
                    break;
                }
            }
        }
    }
    if broke.is_none() {
        for cq in s.cqs.values_mut() {
            match publish(cq, e, &s.channels) {
                Ok(n) => busy |= n,
                Err(why) => {
                    broke = Some(why);
                    break;
                }
            }
        }
    }
    if let Some(why) = broke {
        log::warn!("rdma: an application broke its rings ({why}); disconnecting it");
        for qp in s.qps.values() {
            if qp.ud {
                let _ = e.ud_modify(qp.qpn, crate::rc::QpState::Error, None);
            } else if let Some(i) = e.qp_index(qp.qpn) {
                e.to_error(i);
            }
        }
        if let Some(c) = &s.conn {
            let _ = rustix::net::shutdown(c, rustix::net::Shutdown::Both);
        }
        s.broken = Some(why);
    }
    busy
}

/// An application's scatter entry as the engine's: its region by lkey
/// (one of this application's), the offset in it. One it may not use
/// becomes an entry the engine refuses (no such region).
fn resolve(sge: ring::Sge, e: &Engine, lkeys: &HashMap<u32, u32>, mrs: &HashMap<u32, Mr>) -> Sge {
    let refused = Sge {
        mr: usize::MAX,
        offset: 0,
        len: sge.length as usize,
    };
    let Some(mr) = lkeys.get(&sge.lkey).and_then(|h| mrs.get(h)) else {
        return refused;
    };
    let Some((lkey, va, len, _)) = e.mr_key(mr.index) else {
        return refused;
    };
    let off = sge.addr.wrapping_sub(va);
    if lkey != sge.lkey || sge.addr < va || off > len as u64 {
        return refused;
    }
    Sge {
        mr: mr.index,
        offset: off as usize,
        len: sge.length as usize,
    }
}

/// Takes new work from a queue pair's rings into the engine.
fn take_work(
    qp: &mut Qp,
    i: usize,
    e: &mut Engine,
    lkeys: &HashMap<u32, u32>,
    mrs: &HashMap<u32, Mr>,
) -> Result<bool, String> {
    let sq = qp.rings.sq;
    let rq = qp.rings.rq;
    let sq_n = sq
        .prod(&qp.map)
        .load(Ordering::Acquire)
        .wrapping_sub(qp.sq_cons);
    let rq_n = rq
        .prod(&qp.map)
        .load(Ordering::Acquire)
        .wrapping_sub(qp.rq_cons);
    if sq_n > sq.entries() || rq_n > rq.entries() {
        return Err("a producer counter past its ring".into());
    }
    // Receives first: a SEND that answers this round's work finds them.
    for _ in 0..rq_n.min(BATCH) {
        let w: RecvWqe = qp.map.read(rq.slot(qp.rq_cons));
        if w.num_sge > qp.max_recv_sge {
            return Err("a receive with more entries than its queue pair takes".into());
        }
        let sges = w.sge[..w.num_sge as usize]
            .iter()
            .map(|s| resolve(*s, e, lkeys, mrs))
            .collect();
        if qp.ud {
            e.ud_post_recv(qp.qpn, w.wr_id, sges)
                .map_err(|x| x.to_string())?;
        } else {
            e.post_recv_sgl(i, w.wr_id, sges);
        }
        qp.rq_cons = qp.rq_cons.wrapping_add(1);
    }
    // This round's sends leave together.
    e.cork();
    let mut taken = Ok(());
    for _ in 0..sq_n.min(BATCH) {
        let w: SendWqe = qp.map.read(sq.slot(qp.sq_cons));
        taken = if qp.ud {
            post_ud(qp, &w, e, lkeys, mrs)
        } else {
            post(qp, i, &w, e, lkeys, mrs)
        };
        if taken.is_err() {
            break;
        }
        qp.sq_cons = qp.sq_cons.wrapping_add(1);
    }
    let sent = e.uncork();
    taken?;
    sent.map_err(|x| x.to_string())?;
    if rq_n > 0 {
        rq.cons(&qp.map).store(qp.rq_cons, Ordering::Release);
    }
    if sq_n > 0 {
        sq.cons(&qp.map).store(qp.sq_cons, Ordering::Release);
    }
    Ok(sq_n > 0 || rq_n > 0)
}

/// Takes new receives from a shared receive queue's ring into the engine.
fn take_shared(
    srq: &mut super::session::Srq,
    e: &mut Engine,
    lkeys: &HashMap<u32, u32>,
    mrs: &HashMap<u32, Mr>,
) -> Result<bool, String> {
    let r = srq.ring;
    let n = r
        .prod(&srq.map)
        .load(Ordering::Acquire)
        .wrapping_sub(srq.cons);
    if n > r.entries() {
        return Err("a producer counter past its ring".into());
    }
    for _ in 0..n.min(BATCH) {
        let w: RecvWqe = srq.map.read(r.slot(srq.cons));
        if w.num_sge > srq.max_sge {
            return Err("a receive with more entries than its queue takes".into());
        }
        let sges = w.sge[..w.num_sge as usize]
            .iter()
            .map(|s| resolve(*s, e, lkeys, mrs))
            .collect();
        e.srq_post_recv(srq.id, w.wr_id, sges)
            .map_err(|x| x.to_string())?;
        srq.cons = srq.cons.wrapping_add(1);
    }
    if n > 0 {
        r.cons(&srq.map).store(srq.cons, Ordering::Release);
    }
    Ok(n > 0)
}

/// verbs' send flags.
const SIGNALED: u32 = 2;
const INLINE: u32 = 8;

/// One send work request into the engine.
fn post(
    qp: &Qp,
    i: usize,
    w: &SendWqe,
    e: &mut Engine,
    lkeys: &HashMap<u32, u32>,
    mrs: &HashMap<u32, Mr>,
) -> Result<(), String> {
    let imm = Some(u32::from_be(w.imm));
    let (remote_va, rkey) = (w.remote_addr, w.rkey);
    let (op, kind) = match w.opcode {
        0 => (
            SendOp::Write {
                remote_va,
                rkey,
                imm: None,
            },
            WcOpcode::RdmaWrite,
        ),
        1 => (
            SendOp::Write {
                remote_va,
                rkey,
                imm,
            },
            WcOpcode::RdmaWrite,
        ),
        2 => (SendOp::Send { imm: None }, WcOpcode::Send),
        3 => (SendOp::Send { imm }, WcOpcode::Send),
        4 => (SendOp::Read { remote_va, rkey }, WcOpcode::RdmaRead),
        5 => (
            SendOp::CompareSwap {
                remote_va,
                rkey,
                compare: w.compare_add,
                swap: w.swap,
            },
            WcOpcode::CompSwap,
        ),
        6 => (
            SendOp::FetchAdd {
                remote_va,
                rkey,
                add: w.compare_add,
            },
            WcOpcode::FetchAdd,
        ),
        other => return Err(format!("send opcode {other}")),
    };
    let signaled = qp.sig_all || w.flags & SIGNALED != 0;
    let r = if w.flags & INLINE != 0 {
        if w.inline_len > qp.max_inline || w.inline_len as usize > ring::MAX_INLINE {
            return Err("more inline bytes than the queue pair takes".into());
        }
        e.post_inline(i, w.wr_id, op, &w.data[..w.inline_len as usize], signaled)
    } else {
        if w.num_sge > qp.max_send_sge {
            return Err("a send with more entries than its queue pair takes".into());
        }
        let sg_list = (0..w.num_sge as usize)
            .map(|k| resolve(w.sge(k), e, lkeys, mrs))
            .collect();
        e.post(
            i,
            crate::rc::SendWr {
                wr_id: w.wr_id,
                op,
                sg_list,
                signaled,
            },
        )
    };
    if r.is_err() {
        // Not in RTS any more (the engine moved it to ERROR): verbs
        // flushes such work.
        e.complete_flushed(i, w.wr_id, kind);
    }
    Ok(())
}

/// One UD send: SEND or SEND with immediate to the address in `ah` (an
/// IPv4 address, as the library resolves address handles).
fn post_ud(
    qp: &Qp,
    w: &SendWqe,
    e: &mut Engine,
    lkeys: &HashMap<u32, u32>,
    mrs: &HashMap<u32, Mr>,
) -> Result<(), String> {
    let imm = match w.opcode {
        2 => None,
        3 => Some(u32::from_be(w.imm)),
        other => return Err(format!("UD send opcode {other}")),
    };
    let signaled = qp.sig_all || w.flags & SIGNALED != 0;
    let dest = std::net::Ipv4Addr::from(w.ah);
    let (sges, inline): (Vec<Sge>, Option<&[u8]>) = if w.flags & INLINE != 0 {
        if w.inline_len > qp.max_inline || w.inline_len as usize > ring::MAX_INLINE {
            return Err("more inline bytes than the queue pair takes".into());
        }
        (Vec::new(), Some(&w.data[..w.inline_len as usize]))
    } else {
        if w.num_sge > qp.max_send_sge {
            return Err("a send with more entries than its queue pair takes".into());
        }
        let sges = (0..w.num_sge as usize)
            .map(|k| resolve(w.sge(k), e, lkeys, mrs))
            .collect();
        (sges, None)
    };
    e.ud_send(
        qp.qpn,
        w.wr_id,
        dest,
        w.remote_qpn,
        w.remote_qkey,
        &sges,
        inline,
        imm,
        signaled,
    )
    .map_err(|x| x.to_string())
}

/// A completion as `ibv_wc` has it.
/// A UD receive completion's `sl`: the GRH area holds an IPv4 header.
const UD_L3_IPV4: u8 = 2;

fn cqe(c: &Completion) -> Cqe {
    let status = match c.status {
        WcStatus::Success => 0,
        WcStatus::LocalProtectionError => 4,
        WcStatus::Flushed => 5,
        WcStatus::RemoteInvalidRequest => 9,
        WcStatus::RemoteAccessError => 10,
        WcStatus::RetryExceeded => 12,
        WcStatus::RnrRetryExceeded => 13,
    };
    let opcode = match c.opcode {
        WcOpcode::Send => 0,
        WcOpcode::RdmaWrite => 1,
        WcOpcode::RdmaRead => 2,
        WcOpcode::CompSwap => 3,
        WcOpcode::FetchAdd => 4,
        WcOpcode::Recv => 128,
        WcOpcode::RecvRdmaWithImm => 129,
    };
    Cqe {
        wr_id: c.wr_id,
        status,
        opcode,
        byte_len: c.byte_len,
        imm: c.imm.map_or(0, u32::to_be),
        qp_num: c.qpn,
        src_qp: c.src_qp.unwrap_or(0),
        // IBV_WC_WITH_IMM, IBV_WC_GRH (UD receives).
        wc_flags: u32::from(c.imm.is_some()) << 1 | u32::from(c.src_qp.is_some()),
        // RoCE has no service level. A UD receive's `sl` says what the GRH
        // area holds, as ConnectX reports it and UCX reads it to find the
        // destination address there: 2, an IPv4 header.
        sl: if c.src_qp.is_some() { UD_L3_IPV4 } else { 0 },
        ..Cqe::default()
    }
}

/// Moves completions from the engine's queue into the application's ring
/// while it has room, and sends an event if the queue is armed and holds
/// completions.
fn publish(
    cq: &mut super::session::Cq,
    e: &mut Engine,
    channels: &HashMap<u32, std::os::fd::OwnedFd>,
) -> Result<bool, String> {
    let r = cq.ring;
    let cons = r.cons(&cq.map).load(Ordering::Acquire);
    let used = cq.prod.wrapping_sub(cons);
    if used > r.entries() {
        return Err("a completion consumer past its producer".into());
    }
    let room = r.entries() - used;
    let q = e.cq_of(cq.cq);
    let n = room.min(u32::try_from(q.len()).unwrap_or(u32::MAX));
    for _ in 0..n {
        let c = q.pop_front().expect("counted");
        cq.map.write(r.slot(cq.prod), cqe(&c));
        cq.prod = cq.prod.wrapping_add(1);
    }
    if n > 0 {
        r.prod(&cq.map).store(cq.prod, Ordering::Release);
    }
    let armed = r.armed(&cq.map);
    if cq.prod != cons && armed.load(Ordering::SeqCst) != 0 && armed.swap(0, Ordering::SeqCst) != 0
    {
        if let Some(fd) = cq.channel.and_then(|c| channels.get(&c)) {
            let _ = rustix::net::send(
                fd,
                &cq.cookie.to_ne_bytes(),
                rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
            );
        }
    }
    Ok(n > 0)
}
