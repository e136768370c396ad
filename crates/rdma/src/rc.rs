//! Reliable-connection queue pairs with the patent's split receive path:
//! a placement fast path ([`place`]) that the packet's own metadata steers
//! (BTH destination QP selects the queue; opcode, PSN and RETH decide what
//! to do), writing payload straight into registered memory and posting
//! amended metadata ([`Completion`]) to the completion ring; and a software
//! path ([`Engine`]'s handling of [`Slow`]) for everything the fast path
//! will not place: acknowledgements, duplicates, sequence errors, missing
//! receive buffers, protection faults.
//!
//! The requester side: SEND and WRITE (with and without immediate) and
//! READ, split by path MTU; 64-bit atomics (compare-and-swap,
//! fetch-and-add) as requester and responder, a responder replaying the
//! original value of a duplicate atomic instead of executing it twice; a
//! send window; coalesced ACKs; go-back-N on a sequence NAK or a timeout
//! with a retry limit; RNR retry after the timer the peer's RNR NAK names,
//! with verbs' `rnr_retry` limit.

use std::collections::VecDeque;
use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::net::{Piece, RawIo};
use crate::wire::{self, opcode, Aeth, AtomicEth, Bth, Packet, Reth, DEFAULT_PKEY};

/// A protection domain: QPs reach only memory regions of their own
/// domain, for the peer's requests (rkeys) and for their own work requests
/// (scatter/gather entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pd(u32);

impl Pd {
    /// The domain of `reg_mr` and `create_qp`.
    pub const DEFAULT: Pd = Pd(0);
}

/// A scatter/gather entry: `len` bytes at `offset` in region `mr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    /// Memory region index.
    pub mr: usize,
    /// Offset in the region.
    pub offset: usize,
    /// Bytes.
    pub len: usize,
}

/// What a send-queue work request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// SEND, with immediate data if given.
    Send {
        /// Immediate data.
        imm: Option<u32>,
    },
    /// RDMA WRITE to the peer's `remote_va` under `rkey`.
    Write {
        /// Peer virtual address.
        remote_va: u64,
        /// Peer's remote key.
        rkey: u32,
        /// Immediate data (WRITE with immediate).
        imm: Option<u32>,
    },
    /// RDMA READ from the peer's `remote_va` under `rkey` into the one
    /// scatter entry.
    Read {
        /// Peer virtual address.
        remote_va: u64,
        /// Peer's remote key.
        rkey: u32,
    },
    /// Atomic compare-and-swap of the 8 bytes at the peer's `remote_va`
    /// (8-byte aligned): `swap` is stored if they equal `compare`. The
    /// original value lands in the one 8-byte scatter entry, in host
    /// byte order, as with verbs.
    CompareSwap {
        /// Peer virtual address.
        remote_va: u64,
        /// Peer's remote key.
        rkey: u32,
        /// Compared with the remote value.
        compare: u64,
        /// Stored when they are equal.
        swap: u64,
    },
    /// Atomic fetch-and-add (wrapping) of the 8 bytes at the peer's
    /// `remote_va` (8-byte aligned); the original value lands in the one
    /// 8-byte scatter entry.
    FetchAdd {
        /// Peer virtual address.
        remote_va: u64,
        /// Peer's remote key.
        rkey: u32,
        /// Added to the remote value.
        add: u64,
    },
}

/// A send-queue work request, as verbs' `ibv_send_wr` has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendWr {
    /// Caller's id, returned in the completion.
    pub wr_id: u64,
    /// The operation.
    pub op: SendOp,
    /// Where the data comes from (SEND, WRITE: gathered in order) or goes
    /// (READ: exactly one entry).
    pub sg_list: Vec<Sge>,
    /// Whether success produces a completion; errors always do.
    pub signaled: bool,
}

/// Access rights of a memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// The engine may write it for this side's own work (receives, READ
    /// destinations). Implied by `remote_write`, as verbs requires.
    pub local_write: bool,
    /// The remote side may write.
    pub remote_write: bool,
    /// The remote side may read.
    pub remote_read: bool,
    /// The remote side may run atomics on it.
    pub remote_atomic: bool,
}

/// Registered memory, owned by the engine.
#[derive(Debug)]
pub struct MemoryRegion {
    buf: Vec<u8>,
    /// Local key.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
    access: Access,
    /// Remote virtual address of byte 0 (what the peer puts in RETH).
    pub va: u64,
    /// The protection domain it belongs to.
    pub pd: Pd,
}

impl MemoryRegion {
    /// The region's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// A posted receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvWr {
    /// Caller's id.
    pub wr_id: u64,
    /// Memory region index.
    pub mr: usize,
    /// Offset in the region.
    pub offset: usize,
    /// Bytes.
    pub len: usize,
}

/// A posted receive: where an incoming message is scattered, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PostedRecv {
    wr_id: u64,
    sges: Vec<Sge>,
    /// Total bytes the entries hold.
    len: usize,
}

impl From<RecvWr> for PostedRecv {
    fn from(wr: RecvWr) -> Self {
        PostedRecv {
            wr_id: wr.wr_id,
            sges: vec![Sge {
                mr: wr.mr,
                offset: wr.offset,
                len: wr.len,
            }],
            len: wr.len,
        }
    }
}

/// Copies `data` into the scatter list `sges` starting `at` bytes into it,
/// after checking that every piece lies inside its region (nothing is
/// written otherwise).
fn scatter(mrs: &mut [MemoryRegion], sges: &[Sge], at: usize, data: &[u8]) -> Result<(), Slow> {
    let mut pieces = Vec::with_capacity(2);
    let (mut skip, mut left) = (at, data.len());
    for e in sges {
        if left == 0 {
            break;
        }
        if skip >= e.len {
            skip -= e.len;
            continue;
        }
        let n = (e.len - skip).min(left);
        let start = e.offset.checked_add(skip).ok_or(Slow::Access)?;
        let mr = mrs.get(e.mr).ok_or(Slow::Access)?;
        if start.checked_add(n).is_none_or(|end| end > mr.buf.len()) {
            return Err(Slow::Access);
        }
        pieces.push((e.mr, start, n));
        skip = 0;
        left -= n;
    }
    if left != 0 {
        return Err(Slow::Access);
    }
    let mut from = 0;
    for (mr, start, n) in pieces {
        mrs[mr].buf[start..start + n].copy_from_slice(&data[from..from + n]);
        from += n;
    }
    Ok(())
}

/// Work completion opcodes (as verbs names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    /// A receive consumed by SEND.
    Recv,
    /// RDMA WRITE with immediate consumed a receive.
    RecvRdmaWithImm,
    /// A SEND of ours was acknowledged.
    Send,
    /// An RDMA WRITE of ours was acknowledged.
    RdmaWrite,
    /// An RDMA READ of ours has all its data.
    RdmaRead,
    /// An atomic compare-and-swap of ours returned the original value.
    CompSwap,
    /// An atomic fetch-and-add of ours returned the original value.
    FetchAdd,
}

/// Work completion status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcStatus {
    /// Success.
    Success,
    /// The peer reported a remote access error.
    RemoteAccessError,
    /// The peer reported an invalid request.
    RemoteInvalidRequest,
    /// No acknowledgement after every retry.
    RetryExceeded,
    /// The peer kept answering "receiver not ready" (no posted receive)
    /// after every RNR retry.
    RnrRetryExceeded,
    /// The QP went to ERROR before this work finished.
    Flushed,
    /// A work request named memory the QP may not use: an unknown region,
    /// one of another protection domain, or a range outside the region.
    LocalProtectionError,
}

/// A QP state change verbs does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QpError {
    /// From the first state to the second.
    #[error("QP cannot go from {0:?} to {1:?}")]
    Transition(QpState, QpState),
}

/// Which receive path produced a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// Placed by the fast path.
    Fast,
    /// Produced by the software path.
    Software,
}

/// The amended metadata a placement leaves for software: what was placed,
/// where, how long, immediate data, and that it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Work request id.
    pub wr_id: u64,
    /// Opcode.
    pub opcode: WcOpcode,
    /// Status.
    pub status: WcStatus,
    /// Bytes placed.
    pub byte_len: u32,
    /// Immediate data.
    pub imm: Option<u32>,
    /// Local QP.
    pub qpn: u32,
    /// Which path made it.
    pub path: PathKind,
}

/// Queue-pair state machine (verbs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpState {
    /// Reset.
    Reset,
    /// Initialised.
    Init,
    /// Ready to receive.
    Rtr,
    /// Ready to send.
    Rts,
    /// Error: nothing more is placed.
    Error,
}

/// One RC queue pair.
#[derive(Debug)]
pub struct QueuePair {
    /// Local QP number.
    pub qpn: u32,
    /// State.
    pub state: QpState,
    remote_qpn: u32,
    remote_ip: Ipv4Addr,
    /// Next PSN expected from the peer.
    epsn: u32,
    /// Messages completed as responder (for AETH).
    msn: u32,
    /// Next PSN to send.
    sq_psn: u32,
    /// Sent, not yet acknowledged.
    unacked: VecDeque<Outstanding>,
    rq: VecDeque<PostedRecv>,
    src_port: u16,
    /// Path MTU in bytes.
    mtu: usize,
    /// A multi-packet SEND being placed: its receive and bytes so far.
    recv_msg: Option<(PostedRecv, usize)>,
    /// A multi-packet WRITE being placed: region, next offset, bytes left,
    /// total length.
    write_msg: Option<(usize, usize, usize, usize)>,
    /// Our RDMA READs in flight, oldest first.
    reads: VecDeque<PendingRead>,
    /// Packets posted but not yet sent (the window is full).
    pending_tx: VecDeque<Outstanding>,
    /// When the oldest unacknowledged packet is resent.
    rto_at: Option<Instant>,
    /// Resends without progress.
    retries: u32,
    /// When the packets an RNR NAK refused are sent again.
    rnr_at: Option<Instant>,
    /// RNR NAKs in a row without progress.
    rnr_retries: u32,
    /// The protection domain whose regions this QP may use.
    pd: Pd,
    /// A NAK for the current expected PSN was sent (send it once).
    nak_sent: bool,
    /// A coalesced ACK not sent yet: the PSN it covers, requests it
    /// covers, and when it must go.
    ack_due: Option<(u32, u32, Instant)>,
    /// The original values of the latest atomics this QP executed as
    /// responder, by PSN: a duplicate request (its ACK was lost) gets the
    /// same answer again instead of running twice.
    atomic_replies: VecDeque<(u32, u64)>,
    /// Where completions of this QP's send queue go.
    send_cq: CqId,
    /// Where completions of its receive queue go.
    recv_cq: CqId,
}

impl QueuePair {
    /// Takes every unfinished work request, for flushing: the receive a
    /// message was arriving into, the other posted receives, then unsent
    /// and unacknowledged requests and pending reads.
    fn take_unfinished(&mut self) -> Vec<(u64, WcOpcode)> {
        let mut out: Vec<(u64, WcOpcode)> = self
            .recv_msg
            .take()
            .map(|(r, _)| r)
            .into_iter()
            .chain(self.rq.drain(..))
            .map(|r| (r.wr_id, WcOpcode::Recv))
            .collect();
        out.extend(
            self.unacked
                .drain(..)
                .chain(self.pending_tx.drain(..))
                .filter_map(|o| o.completes.map(|w| (w, o.kind))),
        );
        out.extend(self.reads.drain(..).map(|r| (r.wr_id, r.kind)));
        out
    }

    /// A QP in RESET with nothing posted.
    fn new(qpn: u32, mtu: usize) -> Self {
        QueuePair {
            qpn: qpn & 0x00ff_ffff,
            state: QpState::Reset,
            remote_qpn: 0,
            remote_ip: Ipv4Addr::UNSPECIFIED,
            epsn: 0,
            msn: 0,
            sq_psn: 0,
            unacked: VecDeque::new(),
            rq: VecDeque::new(),
            src_port: 0xc000 | u16::try_from(qpn & 0x3fff).unwrap_or(0),
            mtu,
            recv_msg: None,
            write_msg: None,
            reads: VecDeque::new(),
            pending_tx: VecDeque::new(),
            rto_at: None,
            retries: 0,
            rnr_at: None,
            rnr_retries: 0,
            pd: Pd::DEFAULT,
            nak_sent: false,
            ack_due: None,
            atomic_replies: VecDeque::new(),
            send_cq: CqId::DEFAULT,
            recv_cq: CqId::DEFAULT,
        }
    }
}

/// An unacknowledged packet of ours.
#[derive(Debug, Clone)]
struct Outstanding {
    psn: u32,
    /// The work request it completes, on the last packet of a message.
    completes: Option<u64>,
    /// What kind of completion that is.
    kind: WcOpcode,
    /// Unsignaled: success completes silently (errors still report).
    quiet: bool,
    /// The packet's bytes: its headers up to `split`, then its padding
    /// and ICRC field; the payload between them is `body` when it is read
    /// from a region at each send, or is stored with the headers.
    packet: Vec<u8>,
    split: usize,
    /// Region, offset and length of a payload not copied into `packet`.
    body: Option<(usize, usize, usize)>,
}

/// Where a message's payload comes from.
#[derive(Debug, Clone, Copy)]
enum Payload<'a> {
    /// Bytes gathered for it.
    Bytes(&'a [u8]),
    /// A range of a registered region, read at each send.
    Region {
        mr: usize,
        offset: usize,
        len: usize,
    },
}

impl Outstanding {
    /// A packet stored whole (ICRC field included).
    fn whole(
        psn: u32,
        completes: Option<u64>,
        kind: WcOpcode,
        quiet: bool,
        packet: Vec<u8>,
    ) -> Self {
        Outstanding {
            psn,
            completes,
            kind,
            quiet,
            split: packet.len().saturating_sub(wire::ICRC_BYTES),
            packet,
            body: None,
        }
    }

    /// The pieces to send: stored bytes, with the payload read from its
    /// region (its range was checked when the work was posted, and
    /// regions never shrink).
    fn piece<'a>(&'a mut self, mrs: &'a [MemoryRegion]) -> Piece<'a> {
        let (head, tail) = self.packet.split_at_mut(self.split);
        let body = match self.body {
            Some((mr, off, len)) => &mrs[mr].buf[off..off + len],
            None => &[],
        };
        Piece { head, body, tail }
    }
}

/// An RDMA READ of ours waiting for its responses.
#[derive(Debug, Clone)]
struct PendingRead {
    wr_id: u64,
    /// `RdmaRead`, or the atomic whose ACK carries the original value.
    kind: WcOpcode,
    first_psn: u32,
    packets: u32,
    received: u32,
    /// Where the data goes, in order.
    sges: Vec<Sge>,
    len: usize,
    /// Unsignaled: success completes silently.
    quiet: bool,
}

/// What the fast path did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Data placed; acknowledge `psn` if the requester asked.
    Done {
        /// PSN to acknowledge.
        psn: u32,
        /// Whether the requester set the ACK-request bit.
        ack_req: bool,
    },
}

/// Why the fast path handed a packet to software.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slow {
    /// Not a request the fast path places (ACKs, READs, ...).
    NotPlaceable,
    /// PSN before the expected one: a duplicate.
    Duplicate,
    /// PSN after the expected one: a sequence error.
    OutOfSequence,
    /// SEND with no receive posted.
    NoReceive,
    /// Bad rkey, bounds or rights, or a receive buffer too small.
    Access,
    /// The QP cannot receive (not RTR/RTS).
    State,
}

fn psn_add(p: u32, n: u32) -> u32 {
    p.wrapping_add(n) & 0x00ff_ffff
}

/// The fast path: steer by the packet's metadata, place in order, post the
/// amended metadata. Touches nothing when it returns `Err`.
pub fn place(
    qp: &mut QueuePair,
    mrs: &mut [MemoryRegion],
    pkt: &Packet<'_>,
    cq: &mut VecDeque<Completion>,
) -> Result<Placed, Slow> {
    use opcode::*;
    if !matches!(qp.state, QpState::Rtr | QpState::Rts) {
        return Err(Slow::State);
    }
    let op = pkt.bth.opcode;
    let is_send = matches!(
        op,
        SEND_FIRST | SEND_MIDDLE | SEND_LAST | SEND_LAST_IMM | SEND_ONLY | SEND_ONLY_IMM
    );
    let is_write = matches!(
        op,
        WRITE_FIRST | WRITE_MIDDLE | WRITE_LAST | WRITE_LAST_IMM | WRITE_ONLY | WRITE_ONLY_IMM
    );
    if !is_send && !is_write {
        return Err(Slow::NotPlaceable);
    }
    if pkt.bth.psn != qp.epsn {
        return Err(if wire::psn_before(pkt.bth.psn, qp.epsn) {
            Slow::Duplicate
        } else {
            Slow::OutOfSequence
        });
    }
    let first = matches!(
        op,
        SEND_FIRST | SEND_ONLY | SEND_ONLY_IMM | WRITE_FIRST | WRITE_ONLY | WRITE_ONLY_IMM
    );
    let last = matches!(
        op,
        SEND_LAST
            | SEND_LAST_IMM
            | SEND_ONLY
            | SEND_ONLY_IMM
            | WRITE_LAST
            | WRITE_LAST_IMM
            | WRITE_ONLY
            | WRITE_ONLY_IMM
    );
    let with_imm = matches!(
        op,
        SEND_LAST_IMM | SEND_ONLY_IMM | WRITE_LAST_IMM | WRITE_ONLY_IMM
    );
    let len = pkt.payload.len();
    // A message's middle packets carry exactly one MTU.
    if !last && len != qp.mtu {
        return Err(Slow::Access);
    }
    let mut completion = None;
    if is_send {
        let done = if first {
            if qp.recv_msg.is_some() {
                return Err(Slow::OutOfSequence);
            }
            let wr = qp.rq.front().ok_or(Slow::NoReceive)?;
            if len > wr.len {
                return Err(Slow::Access);
            }
            scatter(mrs, &wr.sges, 0, pkt.payload)?;
            let wr = qp.rq.pop_front().expect("checked above");
            qp.recv_msg = Some((wr, 0));
            0
        } else {
            let (wr, done) = qp.recv_msg.as_ref().ok_or(Slow::OutOfSequence)?;
            if done + len > wr.len {
                return Err(Slow::Access);
            }
            scatter(mrs, &wr.sges, *done, pkt.payload)?;
            *done
        };
        if last {
            let (wr, _) = qp.recv_msg.take().expect("set above");
            completion = Some(Completion {
                wr_id: wr.wr_id,
                opcode: WcOpcode::Recv,
                status: WcStatus::Success,
                byte_len: u32::try_from(done + len).map_err(|_| Slow::Access)?,
                imm: pkt.imm,
                qpn: qp.qpn,
                path: PathKind::Fast,
            });
        } else if let Some((_, d)) = qp.recv_msg.as_mut() {
            *d = done + len;
        }
    } else {
        let (mri, off, left, total) = if first {
            if qp.write_msg.is_some() {
                return Err(Slow::OutOfSequence);
            }
            let reth = pkt.reth.ok_or(Slow::Access)?;
            let total = reth.dma_len as usize;
            let mri = mrs
                .iter()
                .position(|m| m.rkey == reth.rkey && m.pd == qp.pd)
                .ok_or(Slow::Access)?;
            let mr = &mrs[mri];
            if !mr.access.remote_write {
                return Err(Slow::Access);
            }
            let off = usize::try_from(reth.va.checked_sub(mr.va).ok_or(Slow::Access)?)
                .map_err(|_| Slow::Access)?;
            if off.checked_add(total).is_none_or(|e| e > mr.buf.len()) {
                return Err(Slow::Access);
            }
            (mri, off, total, total)
        } else {
            qp.write_msg.ok_or(Slow::OutOfSequence)?
        };
        if len > left || (last && len != left) {
            return Err(Slow::Access);
        }
        if with_imm && qp.rq.is_empty() {
            return Err(Slow::NoReceive);
        }
        mrs[mri].buf[off..off + len].copy_from_slice(pkt.payload);
        if last {
            qp.write_msg = None;
            if with_imm {
                let wr = qp.rq.pop_front().expect("checked above");
                completion = Some(Completion {
                    wr_id: wr.wr_id,
                    opcode: WcOpcode::RecvRdmaWithImm,
                    status: WcStatus::Success,
                    byte_len: u32::try_from(total).map_err(|_| Slow::Access)?,
                    imm: pkt.imm,
                    qpn: qp.qpn,
                    path: PathKind::Fast,
                });
            }
        } else {
            qp.write_msg = Some((mri, off + len, left - len, total));
        }
    }
    if let Some(c) = completion {
        cq.push_back(c);
    }
    qp.epsn = psn_add(qp.epsn, 1);
    qp.nak_sent = false;
    if last {
        qp.msn = psn_add(qp.msn, 1);
    }
    Ok(Placed::Done {
        psn: pkt.bth.psn,
        ack_req: pkt.bth.ack_req,
    })
}

/// The fast path for RDMA READ responses at the requester: the response's
/// PSN selects the pending read and the place in it; data goes straight
/// into the local region. Returns the PSN of the last response when the
/// read is complete.
fn place_read_response(
    qp: &mut QueuePair,
    mrs: &mut [MemoryRegion],
    pkt: &Packet<'_>,
    cq: &mut VecDeque<Completion>,
) -> Result<Option<u32>, Slow> {
    use opcode::*;
    let r = qp.reads.front().ok_or(Slow::NotPlaceable)?;
    if r.kind != WcOpcode::RdmaRead {
        return Err(Slow::OutOfSequence);
    }
    let expect = psn_add(r.first_psn, r.received);
    if pkt.bth.psn != expect {
        return Err(if wire::psn_before(pkt.bth.psn, expect) {
            Slow::Duplicate
        } else {
            Slow::OutOfSequence
        });
    }
    let op = pkt.bth.opcode;
    let first = r.received == 0;
    let last = r.received + 1 == r.packets;
    let ok_op = match (first, last) {
        (true, true) => op == READ_RESPONSE_ONLY,
        (true, false) => op == READ_RESPONSE_FIRST,
        (false, true) => op == READ_RESPONSE_LAST,
        (false, false) => op == READ_RESPONSE_MIDDLE,
    };
    if !ok_op {
        return Err(Slow::OutOfSequence);
    }
    let at = r.received as usize * qp.mtu;
    let len = pkt.payload.len();
    if at.checked_add(len).is_none_or(|e| e > r.len) || (!last && len != qp.mtu) {
        return Err(Slow::Access);
    }
    scatter(mrs, &r.sges, at, pkt.payload)?;
    let front = qp.reads.front_mut().expect("checked above");
    front.received += 1;
    if !last {
        return Ok(None);
    }
    let r = qp.reads.pop_front().expect("checked above");
    if r.quiet {
        return Ok(Some(pkt.bth.psn));
    }
    cq.push_back(Completion {
        wr_id: r.wr_id,
        opcode: WcOpcode::RdmaRead,
        status: WcStatus::Success,
        byte_len: u32::try_from(r.len).map_err(|_| Slow::Access)?,
        imm: None,
        qpn: qp.qpn,
        path: PathKind::Fast,
    });
    Ok(Some(pkt.bth.psn))
}

/// Places an ATOMIC ACKNOWLEDGE: the original value of the atomic at the
/// front of the QP's outstanding READs and atomics (same PSN) goes to its
/// scatter entry, in host byte order. Returns the PSN it acknowledges.
fn place_atomic_ack(
    qp: &mut QueuePair,
    mrs: &mut [MemoryRegion],
    pkt: &Packet<'_>,
    cq: &mut VecDeque<Completion>,
) -> Result<u32, Slow> {
    let r = qp.reads.front().ok_or(Slow::NotPlaceable)?;
    if pkt.bth.psn != r.first_psn {
        return Err(if wire::psn_before(pkt.bth.psn, r.first_psn) {
            Slow::Duplicate
        } else {
            Slow::OutOfSequence
        });
    }
    if !matches!(r.kind, WcOpcode::CompSwap | WcOpcode::FetchAdd) {
        return Err(Slow::OutOfSequence);
    }
    let orig = pkt.atomic_ack.ok_or(Slow::NotPlaceable)?;
    let sges = r.sges.clone();
    scatter(mrs, &sges, 0, &orig.to_ne_bytes())?;
    let r = qp.reads.pop_front().expect("checked above");
    if !r.quiet {
        cq.push_back(Completion {
            wr_id: r.wr_id,
            opcode: r.kind,
            status: WcStatus::Success,
            byte_len: 8,
            imm: None,
            qpn: qp.qpn,
            path: PathKind::Fast,
        });
    }
    Ok(pkt.bth.psn)
}

/// Fuzzing entry: feeds arbitrary bytes to the parser and, when they
/// parse, to the fast path of a connected QP with posted receives and a
/// writable region, and checks that nothing lands outside the region or
/// the receive buffers.
#[doc(hidden)]
pub fn fuzz_receive(data: &[u8]) {
    let Ok(pkt) = Packet::parse(data) else {
        return;
    };
    let mut qp = QueuePair::new(pkt.bth.dest_qp, 256);
    qp.state = QpState::Rts;
    qp.remote_qpn = 1;
    qp.epsn = pkt.bth.psn;
    qp.rq.push_back(
        RecvWr {
            wr_id: 1,
            mr: 0,
            offset: 16,
            len: 64,
        }
        .into(),
    );
    let mut mrs = vec![MemoryRegion {
        buf: vec![0; 4096],
        lkey: 7,
        rkey: 7,
        access: Access {
            remote_write: true,
            remote_read: true,
            local_write: true,
            remote_atomic: false,
        },
        va: 0x10000,
        pd: Pd::DEFAULT,
    }];
    let mut cq = VecDeque::new();
    let before = mrs[0].buf.clone();
    match place(&mut qp, &mut mrs, &pkt, &mut cq) {
        Ok(_) => {
            let changed: Vec<usize> = (0..4096).filter(|&i| mrs[0].buf[i] != before[i]).collect();
            if let (Some(&lo), Some(&hi)) = (changed.first(), changed.last()) {
                let send = pkt.reth.is_none();
                if send {
                    assert!(
                        lo >= 16 && hi < 16 + 64,
                        "SEND placed outside its receive buffer"
                    );
                } else {
                    let r = pkt.reth.expect("write has RETH");
                    let off = usize::try_from(r.va - 0x10000).expect("in range");
                    assert!(
                        lo >= off && hi < off + r.dma_len as usize,
                        "WRITE placed outside its range"
                    );
                }
            }
        }
        Err(_) => assert_eq!(mrs[0].buf, before, "a refused packet changed memory"),
    }
}

/// Packets and bytes per receive path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathStats {
    /// Packets placed by the fast path.
    pub fast_packets: u64,
    /// Payload bytes placed by the fast path.
    pub fast_bytes: u64,
    /// Packets handled by software.
    pub slow_packets: u64,
    /// Packets sent again (timeouts, sequence NAKs, RNR NAKs).
    pub retransmits: u64,
    /// RNR NAKs received (the peer had no receive posted).
    pub rnr_naks: u64,
    /// Packets dropped for a bad ICRC or malformed headers.
    pub dropped: u64,
    /// Packets sent as segments of UDP GSO datagrams (one system call
    /// for a run of them).
    pub gso_segments_sent: u64,
    /// GSO datagrams received whole and split into their packets here.
    pub gso_datagrams_received: u64,
    /// Datagrams too big for a receive ring frame, read from the socket.
    pub spilled: u64,
    /// Sends the kernel refused (no route, no buffer space): counted as
    /// lost packets, which the protocol's timers recover or turn into
    /// `RetryExceeded` for that queue pair alone.
    pub send_errors: u64,
    /// Atomic requests executed as responder (duplicates answered from
    /// the replay list are not counted).
    pub atomics: u64,
    /// Duplicate atomic requests answered from the replay list.
    pub atomic_replays: u64,
}

impl PathStats {
    fn note_send(&mut self, r: io::Result<()>) {
        if r.is_err() {
            self.send_errors += 1;
        }
    }
}

/// A BTH as this engine sends it (migration state set, default partition).
fn header(opcode: u8, dest_qp: u32, psn: u32, ack_req: bool) -> Bth {
    Bth {
        opcode,
        solicited: false,
        mig_req: true,
        pad: 0,
        tver: 0,
        pkey: DEFAULT_PKEY,
        fecn: false,
        becn: false,
        dest_qp,
        ack_req,
        psn,
    }
}

/// Encodes `pkt`'s headers for a payload of `size` bytes sent from
/// elsewhere: the bytes are the headers, then room for the padding and
/// the ICRC; the second value is where the payload goes (the headers'
/// length). The BTH's pad count is the payload's.
fn headers_only(pkt: &Packet<'_>, size: usize) -> io::Result<(Vec<u8>, usize)> {
    let mut buf = encode(pkt)?;
    let pad = (4 - size % 4) % 4;
    let split = buf.len() - wire::ICRC_BYTES;
    buf[1] = (buf[1] & !0x30) | ((pad as u8) << 4);
    buf.truncate(split);
    buf.resize(split + pad + wire::ICRC_BYTES, 0);
    Ok((buf, split))
}

/// Encodes a packet into a fresh buffer (ICRC sealed when sent).
fn encode(pkt: &Packet<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; pkt.wire_len()];
    pkt.encode(&mut buf)
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok(buf)
}

/// READ responses built and sent at a time.
const READ_RESPONSE_BATCH: usize = 64;

/// Longest an ACK is held back for coalescing.
pub const ACK_DELAY: Duration = Duration::from_micros(50);
/// Requests one coalesced ACK covers at most.
pub const ACK_BATCH: u32 = 4;

/// AETH syndrome of an ACK with unlimited credit.
const ACK_UNLIMITED: u8 = 0x1f;
/// NAK syndromes.
const NAK_PSN_SEQ: u8 = 0x60;
const NAK_REMOTE_ACCESS: u8 = 0x62;
const NAK_INVALID_REQUEST: u8 = 0x61;
/// Atomics a QP remembers the answer of as responder, for duplicates: as
/// many as a requester may have outstanding (rdma_rxe's perftest runs
/// with 128).
const ATOMIC_REPLAY: usize = 128;
/// Atomics a QP has unacknowledged at most as requester (verbs'
/// `max_rd_atomic`), so that a responder remembering as few as 16 answers
/// can still replay any of them.
const MAX_RD_ATOMIC: usize = 16;
/// RNR NAK with a short timer.
const RNR_NAK: u8 = 0x20 | 0x01;

/// A completion queue of an [`Engine`]: [`CqId::DEFAULT`] is the ring in
/// [`Engine::cq`]; [`Engine::create_cq`] makes more, so that a QP's send
/// and receive completions, or different QPs' completions, can be read
/// (and waited for) apart, as with verbs' `ibv_create_cq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CqId(u32);

impl CqId {
    /// The engine's own ring, [`Engine::cq`]; every QP's default.
    pub const DEFAULT: CqId = CqId(0);
}

/// A completion queue made by [`Engine::create_cq`].
#[derive(Debug, Default)]
struct ExtraCq {
    entries: VecDeque<Completion>,
    event: Option<std::os::fd::OwnedFd>,
}

/// A fresh non-blocking eventfd.
fn new_eventfd() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: eventfd(2) with valid flags; the result is checked and owned
    // by exactly one OwnedFd.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes an eventfd readable (adds one to its counter).
fn signal(fd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own; a full
    // counter (EAGAIN) only means it is already readable.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
}

/// A user-space RoCEv2 engine over raw sockets.
#[derive(Debug)]
pub struct Engine {
    io: RawIo,
    mrs: Vec<MemoryRegion>,
    qps: Vec<QueuePair>,
    /// The completion ring software reads: [`CqId::DEFAULT`], where every
    /// QP's completions go unless it was created with others
    /// ([`Engine::create_qp_with`]).
    pub cq: VecDeque<Completion>,
    /// Completions made while handling packets and work, not yet moved to
    /// their QP's completion queue (see [`Engine::publish`]).
    staged: VecDeque<Completion>,
    /// Completion queues beyond the default (`CqId(i + 1)` is `cqs[i]`).
    cqs: Vec<ExtraCq>,
    /// Per-path counters.
    pub stats: PathStats,
    next_key: u32,
    /// Most packets a QP has unacknowledged.
    pub window: usize,
    /// Retransmission timeout.
    pub rto: Duration,
    /// Resends without progress before the QP fails its work requests
    /// with `RetryExceeded`.
    pub max_retries: u32,
    /// RNR NAKs in a row a QP accepts before failing its work with
    /// `RnrRetryExceeded`; 7 means without limit, as in verbs' `rnr_retry`.
    pub rnr_retry: u32,
    next_pd: u32,
    cq_event: Option<std::os::fd::OwnedFd>,
    /// Makes the next `poll` fail with this error (unit tests of what
    /// callers do when the engine fails).
    #[cfg(test)]
    pub(crate) fail_poll: Option<io::ErrorKind>,
}

/// The RNR NAK timer field (the low 5 bits of the AETH syndrome) in
/// microseconds, as the IBTA encodes it: 0 is the longest, 655.36 ms.
const RNR_TIMER_US: [u32; 32] = [
    655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1_280, 1_920, 2_560, 3_840,
    5_120, 7_680, 10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880, 163_840,
    245_760, 327_680, 491_520,
];

/// How long an RNR NAK with syndrome `syndrome` asks the requester to wait.
pub fn rnr_delay(syndrome: u8) -> Duration {
    Duration::from_micros(u64::from(RNR_TIMER_US[usize::from(syndrome & 0x1f)]))
}

impl Engine {
    /// An engine on `local` (UDP 4791; needs CAP_NET_RAW).
    pub fn open(local: Ipv4Addr) -> io::Result<Self> {
        Ok(Engine {
            io: RawIo::open(local)?,
            mrs: Vec::new(),
            qps: Vec::new(),
            cq: VecDeque::new(),
            staged: VecDeque::new(),
            cqs: Vec::new(),
            stats: PathStats::default(),
            next_key: 0x100,
            window: 32,
            rto: Duration::from_millis(20),
            max_retries: 7,
            rnr_retry: 7,
            next_pd: 0,
            cq_event: None,
            #[cfg(test)]
            fail_poll: None,
        })
    }

    /// Injects seeded faults into this engine's outgoing datagrams (tests).
    pub fn set_faults(&mut self, f: crate::net::Faults) {
        self.io.set_faults(f);
    }

    /// Whether runs of packets go out as UDP GSO datagrams (this kernel
    /// passed the probe at open, and `set_gso(false)` was not called).
    pub fn gso(&self) -> bool {
        self.io.gso()
    }

    /// Sends every packet alone (`false`), or runs of them as GSO
    /// datagrams again where the kernel allows (`true`).
    pub fn set_gso(&mut self, on: bool) {
        self.io.set_gso(on);
    }

    /// Datagrams the fault injector dropped, duplicated, reordered and
    /// corrupted.
    pub fn injected(&self) -> [u64; 4] {
        self.io.injected
    }

    /// Registers `len` zeroed bytes in the default protection domain;
    /// returns the region's index.
    pub fn reg_mr(&mut self, len: usize, access: Access) -> usize {
        self.reg_mr_in(Pd::DEFAULT, len, access)
    }

    /// A new protection domain.
    pub fn alloc_pd(&mut self) -> Pd {
        self.next_pd += 1;
        Pd(self.next_pd)
    }

    /// Registers `len` zeroed bytes in protection domain `pd`; returns the
    /// region's index.
    pub fn reg_mr_in(&mut self, pd: Pd, len: usize, access: Access) -> usize {
        self.next_key += 1;
        let key = self.next_key;
        self.mrs.push(MemoryRegion {
            buf: vec![0; len],
            lkey: key,
            rkey: key,
            access,
            va: 0x1000_0000 * u64::from(key),
            pd,
        });
        self.mrs.len() - 1
    }

    /// A registered region.
    pub fn mr(&self, i: usize) -> &MemoryRegion {
        &self.mrs[i]
    }

    /// Copies `data` into a registered region at `offset` (the
    /// application writing its own memory).
    pub fn fill(&mut self, mr: usize, offset: usize, data: &[u8]) {
        self.mrs[mr].buf[offset..offset + data.len()].copy_from_slice(data);
    }

    /// Creates a QP in RESET in the default protection domain; returns its
    /// index.
    pub fn create_qp(&mut self, qpn: u32) -> usize {
        self.create_qp_in(Pd::DEFAULT, qpn)
    }

    /// Creates a QP in RESET in protection domain `pd`.
    pub fn create_qp_in(&mut self, pd: Pd, qpn: u32) -> usize {
        self.create_qp_with(pd, qpn, CqId::DEFAULT, CqId::DEFAULT)
            .expect("the default completion queue exists")
    }

    /// Creates a QP in RESET in protection domain `pd` whose send-queue
    /// completions (SEND, WRITE, READ) go to `send_cq` and receive-queue
    /// completions (receives consumed by SEND or WRITE with immediate) to
    /// `recv_cq`, as verbs' `ibv_create_qp` does. An unknown queue is an
    /// `InvalidInput` error.
    pub fn create_qp_with(
        &mut self,
        pd: Pd,
        qpn: u32,
        send_cq: CqId,
        recv_cq: CqId,
    ) -> io::Result<usize> {
        for cq in [send_cq, recv_cq] {
            if cq.0 as usize > self.cqs.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("no completion queue {}", cq.0),
                ));
            }
        }
        let mut q = QueuePair::new(qpn, 1024);
        q.pd = pd;
        q.send_cq = send_cq;
        q.recv_cq = recv_cq;
        self.qps.push(q);
        Ok(self.qps.len() - 1)
    }

    /// A new, empty completion queue.
    pub fn create_cq(&mut self) -> CqId {
        self.cqs.push(ExtraCq::default());
        CqId(u32::try_from(self.cqs.len()).expect("fewer than 2^32 completion queues"))
    }

    /// The completions waiting in queue `cq`, oldest first (pop them to
    /// consume them). Panics on a queue this engine did not create.
    pub fn cq_of(&mut self, cq: CqId) -> &mut VecDeque<Completion> {
        match cq.0 {
            0 => &mut self.cq,
            i => &mut self.cqs[i as usize - 1].entries,
        }
    }

    /// Completes work request `wr_id` with `LocalProtectionError` and
    /// moves the QP to ERROR (a scatter entry it may not use).
    fn refuse(&mut self, qp: usize, wr_id: u64, opcode: WcOpcode) {
        let qpn = self.qps[qp].qpn;
        self.staged.push_back(Completion {
            wr_id,
            opcode,
            status: WcStatus::LocalProtectionError,
            byte_len: 0,
            imm: None,
            qpn,
            path: PathKind::Software,
        });
        self.to_error(qp);
        self.notify_cq();
    }

    /// Posts a send-queue work request (verbs' `ibv_post_send`): SEND,
    /// WRITE (both with optional immediate data, gathered from the scatter
    /// list) or READ (scattered over it, in order). A scatter entry the QP
    /// may not use completes the request with `LocalProtectionError` and
    /// moves the QP to ERROR, as verbs does; nothing is sent.
    pub fn post(&mut self, qp: usize, wr: SendWr) -> io::Result<()> {
        let r = self.post_work(qp, wr);
        self.notify_cq();
        r
    }

    fn post_work(&mut self, qp: usize, wr: SendWr) -> io::Result<()> {
        self.check_rts(qp)?;
        let pd = self.qps[qp].pd;
        let usable = |e: &Sge, mrs: &[MemoryRegion], write: bool| {
            mrs.get(e.mr).is_some_and(|m| {
                m.pd == pd
                    && e.offset
                        .checked_add(e.len)
                        .is_some_and(|end| end <= m.buf.len())
                    && (!write || m.access.local_write || m.access.remote_write)
            })
        };
        let atomic = matches!(wr.op, SendOp::CompareSwap { .. } | SendOp::FetchAdd { .. });
        let writes_local = atomic || matches!(wr.op, SendOp::Read { .. });
        let mut ok = wr
            .sg_list
            .iter()
            .all(|e| usable(e, &self.mrs, writes_local));
        if atomic {
            // The original value: exactly one 8-byte entry.
            ok &= matches!(wr.sg_list[..], [Sge { len: 8, .. }]);
        }
        let kind = match wr.op {
            SendOp::Send { .. } => WcOpcode::Send,
            SendOp::Write { .. } => WcOpcode::RdmaWrite,
            SendOp::Read { .. } => WcOpcode::RdmaRead,
            SendOp::CompareSwap { .. } => WcOpcode::CompSwap,
            SendOp::FetchAdd { .. } => WcOpcode::FetchAdd,
        };
        if !ok {
            self.refuse(qp, wr.wr_id, kind);
            return Ok(());
        }
        let quiet = !wr.signaled;
        match wr.op {
            SendOp::Read { remote_va, rkey } => {
                self.read(qp, wr.wr_id, wr.sg_list, remote_va, rkey, quiet)
            }
            SendOp::CompareSwap {
                remote_va,
                rkey,
                compare,
                swap,
            } => {
                let eth = AtomicEth {
                    va: remote_va,
                    rkey,
                    swap_add: swap,
                    compare,
                };
                self.atomic(qp, wr.wr_id, kind, wr.sg_list, eth, quiet)
            }
            SendOp::FetchAdd {
                remote_va,
                rkey,
                add,
            } => {
                let eth = AtomicEth {
                    va: remote_va,
                    rkey,
                    swap_add: add,
                    compare: 0,
                };
                self.atomic(qp, wr.wr_id, kind, wr.sg_list, eth, quiet)
            }
            SendOp::Send { imm } | SendOp::Write { imm, .. } => {
                let total: usize = wr.sg_list.iter().map(|e| e.len).sum();
                let reth = match wr.op {
                    SendOp::Write {
                        remote_va, rkey, ..
                    } => Some(Reth {
                        va: remote_va,
                        rkey,
                        dma_len: u32::try_from(total).map_err(|_| io::ErrorKind::InvalidInput)?,
                    }),
                    _ => None,
                };
                if let [e] = wr.sg_list[..] {
                    // One entry: packets keep only their headers; the
                    // payload goes out from the region itself, at every
                    // send (as a NIC would read it).
                    let body = Payload::Region {
                        mr: e.mr,
                        offset: e.offset,
                        len: e.len,
                    };
                    return self.message(qp, wr.wr_id, kind, body, reth, imm, quiet);
                }
                let mut data = Vec::with_capacity(total);
                for e in &wr.sg_list {
                    data.extend_from_slice(&self.mrs[e.mr].buf[e.offset..e.offset + e.len]);
                }
                self.message(qp, wr.wr_id, kind, Payload::Bytes(&data), reth, imm, quiet)
            }
        }
    }

    /// An eventfd that becomes readable whenever completions are added to
    /// the default completion ring (for epoll-based waiting; read it to
    /// reset).
    pub fn cq_eventfd(&mut self) -> io::Result<std::os::fd::BorrowedFd<'_>> {
        self.cq_eventfd_of(CqId::DEFAULT)
    }

    /// Like [`Engine::cq_eventfd`], for completion queue `cq`.
    pub fn cq_eventfd_of(&mut self, cq: CqId) -> io::Result<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        let slot = match cq.0 {
            0 => &mut self.cq_event,
            i => {
                &mut self
                    .cqs
                    .get_mut(i as usize - 1)
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("no completion queue {i}"),
                        )
                    })?
                    .event
            }
        };
        if slot.is_none() {
            *slot = Some(new_eventfd()?);
        }
        Ok(slot.as_ref().expect("just set").as_fd())
    }

    /// The receive ring's descriptor: readable when a datagram waits.
    /// With [`Engine::next_wakeup`], what a thread that drives the engine
    /// needs to sleep instead of spinning (see [`crate::progress`]).
    pub fn wait_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.io.wait_fd()
    }

    /// How long until the engine has timed work to do (a coalesced ACK, an
    /// RNR wait, a retransmission timer), if it has any.
    pub fn next_wakeup(&self) -> Option<Duration> {
        let now = Instant::now();
        self.qps
            .iter()
            .filter(|q| q.state != QpState::Error)
            .flat_map(|q| [q.ack_due.map(|(_, _, at)| at), q.rnr_at, q.rto_at])
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(now))
    }

    /// Moves staged completions to their QP's completion queues (send or
    /// receive side by opcode) and signals the eventfd of every queue that
    /// holds completions. Every public call that can complete work ends
    /// here, so that the application never sees a completion in the wrong
    /// queue.
    fn notify_cq(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        if self.cqs.is_empty() {
            // One queue: the staged completions are all its own.
            self.cq.append(&mut self.staged);
            if let Some(fd) = &self.cq_event {
                signal(fd);
            }
            return;
        }
        // Queues that got completions: bit i for CqId(i). Queues past the
        // 64th (rare) are signalled per completion instead.
        let mut got = 0u64;
        while let Some(c) = self.staged.pop_front() {
            let target =
                self.qps
                    .iter()
                    .find(|q| q.qpn == c.qpn)
                    .map_or(CqId::DEFAULT, |q| match c.opcode {
                        WcOpcode::Recv | WcOpcode::RecvRdmaWithImm => q.recv_cq,
                        _ => q.send_cq,
                    });
            self.cq_of(target).push_back(c);
            match 1u64.checked_shl(target.0) {
                Some(bit) => got |= bit,
                None => {
                    if let Some(fd) = &self.cqs[target.0 as usize - 1].event {
                        signal(fd);
                    }
                }
            }
        }
        let events = std::iter::once(&self.cq_event).chain(self.cqs.iter().map(|q| &q.event));
        for (i, event) in events.enumerate().take(64) {
            if let (Some(fd), true) = (event, got & (1 << i) != 0) {
                signal(fd);
            }
        }
    }

    /// Signals every completion queue's eventfd, so that whoever sleeps on
    /// one wakes up and looks (a driver that stopped).
    pub(crate) fn wake_all_cqs(&self) {
        let events = std::iter::once(&self.cq_event).chain(self.cqs.iter().map(|q| &q.event));
        for fd in events.flatten() {
            signal(fd);
        }
    }

    /// Drives the engine until a completion is in the default ring or
    /// `timeout` passes; true if there is one.
    pub fn wait_cq(&mut self, timeout: Duration) -> io::Result<bool> {
        self.wait_cq_of(CqId::DEFAULT, timeout)
    }

    /// Drives the engine until completion queue `cq` holds a completion or
    /// `timeout` passes; true if it does.
    pub fn wait_cq_of(&mut self, cq: CqId, timeout: Duration) -> io::Result<bool> {
        let end = Instant::now() + timeout;
        while self.cq_of(cq).is_empty() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.poll(left.min(Duration::from_millis(5)))?;
        }
        Ok(!self.cq_of(cq).is_empty())
    }

    /// RESET → INIT: the QP may take receive buffers.
    pub fn to_init(&mut self, qp: usize) -> Result<(), QpError> {
        let q = &mut self.qps[qp];
        if q.state != QpState::Reset {
            return Err(QpError::Transition(q.state, QpState::Init));
        }
        q.state = QpState::Init;
        Ok(())
    }

    /// INIT → RTR: the peer's QPN, address and first PSN; packets are
    /// placed from now on.
    pub fn to_rtr(
        &mut self,
        qp: usize,
        remote_qpn: u32,
        remote_ip: Ipv4Addr,
        remote_psn: u32,
    ) -> Result<(), QpError> {
        let q = &mut self.qps[qp];
        if q.state != QpState::Init {
            return Err(QpError::Transition(q.state, QpState::Rtr));
        }
        q.remote_qpn = remote_qpn & 0x00ff_ffff;
        q.remote_ip = remote_ip;
        q.epsn = remote_psn & 0x00ff_ffff;
        q.state = QpState::Rtr;
        Ok(())
    }

    /// RTR → RTS: our first PSN; work may be sent from now on.
    pub fn to_rts(&mut self, qp: usize, local_psn: u32) -> Result<(), QpError> {
        let q = &mut self.qps[qp];
        if q.state != QpState::Rtr {
            return Err(QpError::Transition(q.state, QpState::Rts));
        }
        q.sq_psn = local_psn & 0x00ff_ffff;
        q.state = QpState::Rts;
        Ok(())
    }

    /// Any state → ERROR: every posted receive and every unfinished send,
    /// write and read completes with `Flushed`.
    pub fn to_error(&mut self, qp: usize) {
        let q = &mut self.qps[qp];
        q.state = QpState::Error;
        let qpn = q.qpn;
        let flushed = q.take_unfinished();
        q.rto_at = None;
        for (wr_id, opcode) in flushed {
            self.staged.push_back(Completion {
                wr_id,
                opcode,
                status: WcStatus::Flushed,
                byte_len: 0,
                imm: None,
                qpn,
                path: PathKind::Software,
            });
        }
        self.notify_cq();
    }

    /// Connects a QP: RESET → INIT → RTR → RTS with the peer's QPN, IP and
    /// starting PSN, and our starting PSN.
    pub fn connect(
        &mut self,
        qp: usize,
        remote_qpn: u32,
        remote_ip: Ipv4Addr,
        remote_psn: u32,
        local_psn: u32,
    ) {
        self.to_init(qp).expect("a new QP is in RESET");
        self.to_rtr(qp, remote_qpn, remote_ip, remote_psn)
            .expect("INIT");
        self.to_rts(qp, local_psn).expect("RTR");
    }

    /// State of a QP.
    pub fn qp_state(&self, qp: usize) -> QpState {
        self.qps[qp].state
    }

    /// Sets the path MTU (256, 512, 1024, 2048 or 4096 bytes).
    pub fn set_mtu(&mut self, qp: usize, mtu: usize) {
        assert!(
            matches!(mtu, 256 | 512 | 1024 | 2048 | 4096),
            "path MTU {mtu}"
        );
        self.qps[qp].mtu = mtu;
    }

    /// Posts a receive buffer. A buffer the QP may not use (an unknown
    /// region, one of another protection domain, one without local write
    /// access, or a range past its end) completes with
    /// `LocalProtectionError` and moves the QP to ERROR, as verbs does
    /// when such a receive is reached; nothing is ever written to it.
    pub fn post_recv(&mut self, qp: usize, wr: RecvWr) {
        self.post_recv_posted(qp, wr.into());
    }

    /// Posts a receive that scatters an incoming message over `sg_list`,
    /// in order (verbs' `ibv_post_recv` with several entries); each entry
    /// is checked as [`Engine::post_recv`] checks its buffer.
    pub fn post_recv_sgl(&mut self, qp: usize, wr_id: u64, sg_list: Vec<Sge>) {
        let len = sg_list.iter().map(|e| e.len).sum();
        self.post_recv_posted(
            qp,
            PostedRecv {
                wr_id,
                sges: sg_list,
                len,
            },
        );
    }

    fn post_recv_posted(&mut self, qp: usize, wr: PostedRecv) {
        let pd = self.qps[qp].pd;
        let usable = wr.sges.iter().all(|e| {
            self.mrs.get(e.mr).is_some_and(|m| {
                m.pd == pd
                    && m.access.local_write
                    && e.offset
                        .checked_add(e.len)
                        .is_some_and(|end| end <= m.buf.len())
            })
        });
        let state = self.qps[qp].state;
        if !usable && !matches!(state, QpState::Reset | QpState::Error) {
            self.refuse(qp, wr.wr_id, WcOpcode::Recv);
            return;
        }
        let q = &mut self.qps[qp];
        if matches!(q.state, QpState::Reset | QpState::Error) {
            // Verbs: a receive posted to a QP in ERROR completes flushed.
            let qpn = q.qpn;
            self.staged.push_back(Completion {
                wr_id: wr.wr_id,
                opcode: WcOpcode::Recv,
                status: WcStatus::Flushed,
                byte_len: 0,
                imm: None,
                qpn,
                path: PathKind::Software,
            });
            self.notify_cq();
            return;
        }
        q.rq.push_back(wr);
    }

    fn check_rts(&self, qp: usize) -> io::Result<()> {
        let s = self.qps[qp].state;
        if s == QpState::Rts {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("QP is in {s:?}, not RTS"),
            ))
        }
    }

    /// Posts a SEND of `len` bytes from a region, in path-MTU packets
    /// (FIRST, MIDDLE..., LAST, or ONLY); the last asks for an ACK.
    pub fn post_send(
        &mut self,
        qp: usize,
        wr_id: u64,
        mr: usize,
        offset: usize,
        len: usize,
    ) -> io::Result<()> {
        self.post(
            qp,
            SendWr {
                wr_id,
                op: SendOp::Send { imm: None },
                sg_list: vec![Sge { mr, offset, len }],
                signaled: true,
            },
        )
    }

    /// Posts an RDMA WRITE of `len` bytes from a local region to the peer's
    /// `remote_va` under `rkey`, with immediate data if given.
    #[allow(clippy::too_many_arguments)]
    pub fn post_write(
        &mut self,
        qp: usize,
        wr_id: u64,
        mr: usize,
        offset: usize,
        len: usize,
        remote_va: u64,
        rkey: u32,
        imm: Option<u32>,
    ) -> io::Result<()> {
        self.post(
            qp,
            SendWr {
                wr_id,
                op: SendOp::Write {
                    remote_va,
                    rkey,
                    imm,
                },
                sg_list: vec![Sge { mr, offset, len }],
                signaled: true,
            },
        )
    }

    /// Posts an RDMA READ of `len` bytes from the peer's `remote_va` under
    /// `rkey` into a local region.
    #[allow(clippy::too_many_arguments)]
    pub fn post_read(
        &mut self,
        qp: usize,
        wr_id: u64,
        mr: usize,
        offset: usize,
        len: usize,
        remote_va: u64,
        rkey: u32,
    ) -> io::Result<()> {
        self.post(
            qp,
            SendWr {
                wr_id,
                op: SendOp::Read { remote_va, rkey },
                sg_list: vec![Sge { mr, offset, len }],
                signaled: true,
            },
        )
    }

    /// Posts an atomic fetch-and-add of `add` to the 8 bytes at the peer's
    /// `remote_va` (8-byte aligned); the original value lands at `offset`
    /// in local region `mr`.
    #[allow(clippy::too_many_arguments)]
    pub fn post_fetch_add(
        &mut self,
        qp: usize,
        wr_id: u64,
        mr: usize,
        offset: usize,
        remote_va: u64,
        rkey: u32,
        add: u64,
    ) -> io::Result<()> {
        self.post(
            qp,
            SendWr {
                wr_id,
                op: SendOp::FetchAdd {
                    remote_va,
                    rkey,
                    add,
                },
                sg_list: vec![Sge { mr, offset, len: 8 }],
                signaled: true,
            },
        )
    }

    /// Posts an atomic compare-and-swap of the 8 bytes at the peer's
    /// `remote_va` (8-byte aligned); the original value lands at `offset`
    /// in local region `mr`.
    #[allow(clippy::too_many_arguments)]
    pub fn post_compare_swap(
        &mut self,
        qp: usize,
        wr_id: u64,
        mr: usize,
        offset: usize,
        remote_va: u64,
        rkey: u32,
        compare: u64,
        swap: u64,
    ) -> io::Result<()> {
        self.post(
            qp,
            SendWr {
                wr_id,
                op: SendOp::CompareSwap {
                    remote_va,
                    rkey,
                    compare,
                    swap,
                },
                sg_list: vec![Sge { mr, offset, len: 8 }],
                signaled: true,
            },
        )
    }

    fn read(
        &mut self,
        qp: usize,
        wr_id: u64,
        sges: Vec<Sge>,
        remote_va: u64,
        rkey: u32,
        quiet: bool,
    ) -> io::Result<()> {
        let len: usize = sges.iter().map(|e| e.len).sum();
        let q = &mut self.qps[qp];
        let psn = q.sq_psn;
        let packets =
            u32::try_from(len.div_ceil(q.mtu).max(1)).map_err(|_| io::ErrorKind::InvalidInput)?;
        q.sq_psn = psn_add(psn, packets);
        let pkt = Packet {
            bth: header(opcode::READ_REQUEST, q.remote_qpn, psn, true),
            reth: Some(Reth {
                va: remote_va,
                rkey,
                dma_len: u32::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?,
            }),
            aeth: None,
            imm: None,
            atomic: None,
            atomic_ack: None,
            payload: &[],
            icrc: 0,
        };
        let buf = encode(&pkt)?;
        q.pending_tx.push_back(Outstanding::whole(
            psn,
            None,
            WcOpcode::RdmaRead,
            quiet,
            buf,
        ));
        q.reads.push_back(PendingRead {
            wr_id,
            kind: WcOpcode::RdmaRead,
            first_psn: psn,
            packets,
            received: 0,
            sges,
            len,
            quiet,
        });
        self.flush_tx(qp)
    }

    /// Posts an atomic request (one packet); its ATOMIC ACKNOWLEDGE
    /// carries the original value into `sges`.
    fn atomic(
        &mut self,
        qp: usize,
        wr_id: u64,
        kind: WcOpcode,
        sges: Vec<Sge>,
        eth: AtomicEth,
        quiet: bool,
    ) -> io::Result<()> {
        let q = &mut self.qps[qp];
        let psn = q.sq_psn;
        q.sq_psn = psn_add(psn, 1);
        let op = if kind == WcOpcode::CompSwap {
            opcode::COMPARE_SWAP
        } else {
            opcode::FETCH_ADD
        };
        let pkt = Packet {
            bth: header(op, q.remote_qpn, psn, true),
            reth: None,
            aeth: None,
            imm: None,
            atomic: Some(eth),
            atomic_ack: None,
            payload: &[],
            icrc: 0,
        };
        let buf = encode(&pkt)?;
        q.pending_tx
            .push_back(Outstanding::whole(psn, None, kind, quiet, buf));
        q.reads.push_back(PendingRead {
            wr_id,
            kind,
            first_psn: psn,
            packets: 1,
            received: 0,
            sges,
            len: 8,
            quiet,
        });
        self.flush_tx(qp)
    }

    /// Sends queued packets while the window has room.
    fn flush_tx(&mut self, qi: usize) -> io::Result<()> {
        let window = self.window;
        let rto = self.rto;
        let q = &mut self.qps[qi];
        let first = q.unacked.len();
        let is_atomic = |o: &Outstanding| matches!(o.kind, WcOpcode::CompSwap | WcOpcode::FetchAdd);
        let mut atomics = q.unacked.iter().filter(|o| is_atomic(o)).count();
        while q.unacked.len() < window {
            // At most MAX_RD_ATOMIC atomics unacknowledged, so that the
            // responder still remembers the answer to any of them that
            // must be sent again (verbs' max_rd_atomic).
            if q.pending_tx
                .front()
                .is_some_and(|o| is_atomic(o) && atomics >= MAX_RD_ATOMIC)
            {
                break;
            }
            let Some(o) = q.pending_tx.pop_front() else {
                break;
            };
            atomics += usize::from(is_atomic(&o));
            q.unacked.push_back(o);
        }
        if q.unacked.len() == first {
            return Ok(());
        }
        if q.rto_at.is_none() {
            q.rto_at = Some(Instant::now() + rto);
        }
        self.send_unacked(qi, first);
        Ok(())
    }

    /// Sends QP `qi`'s unacknowledged packets from index `first` on, in
    /// bursts (a refused send counts as a lost packet).
    fn send_unacked(&mut self, qi: usize, first: usize) {
        let q = &mut self.qps[qi];
        let (ip, port) = (q.remote_ip, q.src_port);
        let mrs = &self.mrs;
        let mut burst: Vec<Piece<'_>> =
            q.unacked.range_mut(first..).map(|o| o.piece(mrs)).collect();
        let sent = self.io.send_burst(ip, port, &mut burst);
        self.stats.note_send(sent);
    }

    /// Go-back-N: sends every unacknowledged packet of QP `qi` again.
    fn resend_unacked(&mut self, qi: usize) {
        self.stats.retransmits += self.qps[qi].unacked.len() as u64;
        self.send_unacked(qi, 0);
    }

    /// Acknowledges `psn`, coalescing: the ACK goes out (at the start of a
    /// poll) once it covers
    /// [`ACK_BATCH`] requests or [`ACK_DELAY`] after the first, whichever
    /// comes first (a later ACK covers every earlier PSN).
    fn schedule_ack(&mut self, qi: usize, psn: u32) -> io::Result<()> {
        let q = &mut self.qps[qi];
        let now = Instant::now();
        let (n, at) = match q.ack_due {
            Some((_, n, at)) => (n + 1, at),
            None => (1, now + ACK_DELAY),
        };
        // A full batch is due now, but goes out at the start of the next
        // poll, not here: the application first gets its completions and
        // can answer (a ping-pong's reply leaves before the ACK does).
        let at = if n >= ACK_BATCH { now } else { at };
        q.ack_due = Some((psn, n, at));
        Ok(())
    }

    /// Sends every coalesced ACK now. The engine makes progress only in
    /// [`Engine::poll`]; an application that stops polling calls this
    /// first so that its peer's requests complete.
    pub fn flush(&mut self) -> io::Result<()> {
        for qi in 0..self.qps.len() {
            if let Some((psn, _, _)) = self.qps[qi].ack_due.take() {
                self.send_ack(qi, psn, ACK_UNLIMITED)?;
            }
        }
        Ok(())
    }

    /// Sends coalesced ACKs whose time has come.
    fn flush_acks(&mut self) -> io::Result<()> {
        let now = Instant::now();
        for qi in 0..self.qps.len() {
            if let Some((psn, _, at)) = self.qps[qi].ack_due {
                if at <= now {
                    self.qps[qi].ack_due = None;
                    self.send_ack(qi, psn, ACK_UNLIMITED)?;
                }
            }
        }
        Ok(())
    }

    /// Resends every unacknowledged packet of QPs whose timer ran out
    /// (go-back-N), or fails their work after `max_retries`.
    fn check_timers(&mut self) -> io::Result<()> {
        let now = Instant::now();
        for qi in 0..self.qps.len() {
            let q = &mut self.qps[qi];
            if q.state == QpState::Error {
                continue;
            }
            if q.rnr_at.is_some_and(|t| t <= now) {
                // The peer's RNR timer ran out: send the refused packets
                // (and what followed) again.
                q.rnr_at = None;
                q.rto_at = Some(now + self.rto);
                self.resend_unacked(qi);
                continue;
            }
            if q.rto_at.is_none_or(|t| t > now) {
                continue;
            }
            if q.retries >= self.max_retries {
                self.fail_outstanding(qi, WcStatus::RetryExceeded);
                continue;
            }
            q.retries += 1;
            q.rto_at = Some(now + self.rto);
            self.resend_unacked(qi);
        }
        Ok(())
    }

    /// Fails every outstanding work request of QP `qi` with `status` and
    /// moves the QP to ERROR.
    fn fail_outstanding(&mut self, qi: usize, status: WcStatus) {
        let q = &mut self.qps[qi];
        q.state = QpState::Error;
        q.rto_at = None;
        q.rnr_at = None;
        let failed: Vec<(u64, WcOpcode)> = q
            .unacked
            .iter()
            .chain(q.pending_tx.iter())
            .filter_map(|o| o.completes.map(|w| (w, o.kind)))
            .chain(q.reads.iter().map(|r| (r.wr_id, r.kind)))
            .collect();
        q.unacked.clear();
        q.pending_tx.clear();
        q.reads.clear();
        let qpn = q.qpn;
        for (wr_id, opcode) in failed {
            self.staged.push_back(Completion {
                wr_id,
                opcode,
                status,
                byte_len: 0,
                imm: None,
                qpn,
                path: PathKind::Software,
            });
        }
        self.to_error(qi);
    }

    /// Sends a SEND or WRITE message in path-MTU packets.
    #[allow(clippy::too_many_arguments)]
    fn message(
        &mut self,
        qp: usize,
        wr_id: u64,
        kind: WcOpcode,
        payload: Payload<'_>,
        reth: Option<Reth>,
        imm: Option<u32>,
        quiet: bool,
    ) -> io::Result<()> {
        use opcode::*;
        let q = &mut self.qps[qp];
        let len = match payload {
            Payload::Bytes(d) => d.len(),
            Payload::Region { len, .. } => len,
        };
        let n = len.div_ceil(q.mtu).max(1);
        let write = kind == WcOpcode::RdmaWrite;
        for i in 0..n {
            let (first, last) = (i == 0, i + 1 == n);
            let op = match (write, first, last, imm.is_some()) {
                (false, true, true, false) => SEND_ONLY,
                (false, true, true, true) => SEND_ONLY_IMM,
                (false, true, false, _) => SEND_FIRST,
                (false, false, true, false) => SEND_LAST,
                (false, false, true, true) => SEND_LAST_IMM,
                (false, false, false, _) => SEND_MIDDLE,
                (true, true, true, false) => WRITE_ONLY,
                (true, true, true, true) => WRITE_ONLY_IMM,
                (true, true, false, _) => WRITE_FIRST,
                (true, false, true, false) => WRITE_LAST,
                (true, false, true, true) => WRITE_LAST_IMM,
                (true, false, false, _) => WRITE_MIDDLE,
            };
            let psn = q.sq_psn;
            q.sq_psn = psn_add(psn, 1);
            let (at, size) = (i * q.mtu, q.mtu.min(len - i * q.mtu));
            let chunk = match payload {
                Payload::Bytes(d) => &d[at..at + size],
                Payload::Region { .. } => &[],
            };
            let pkt = Packet {
                bth: header(op, q.remote_qpn, psn, last || psn % 8 == 7),
                reth: if first { reth } else { None },
                aeth: None,
                imm: if last { imm } else { None },
                atomic: None,
                atomic_ack: None,
                payload: chunk,
                icrc: 0,
            };
            let completes = last.then_some(wr_id);
            let o = match payload {
                Payload::Bytes(_) => Outstanding::whole(psn, completes, kind, quiet, encode(&pkt)?),
                Payload::Region { mr, offset, .. } => {
                    let (buf, split) = headers_only(&pkt, size)?;
                    Outstanding {
                        psn,
                        completes,
                        kind,
                        quiet,
                        packet: buf,
                        split,
                        body: Some((mr, offset + at, size)),
                    }
                }
            };
            q.pending_tx.push_back(o);
        }
        self.flush_tx(qp)
    }

    /// Completes our requests acknowledged up to and including `psn`.
    fn acknowledge(&mut self, qi: usize, psn: u32) -> io::Result<()> {
        let q = &mut self.qps[qi];
        let before = q.unacked.len();
        while let Some(o) = q.unacked.front() {
            if o.psn != psn && !wire::psn_before(o.psn, psn) {
                break;
            }
            let o = q.unacked.pop_front().expect("front exists");
            if let Some(wr_id) = o.completes.filter(|_| !o.quiet) {
                self.staged.push_back(Completion {
                    wr_id,
                    opcode: o.kind,
                    status: WcStatus::Success,
                    byte_len: 0,
                    imm: None,
                    qpn: q.qpn,
                    path: PathKind::Software,
                });
            }
        }
        if q.unacked.len() < before {
            q.retries = 0;
            q.rnr_retries = 0;
            q.rto_at = (!q.unacked.is_empty()).then(|| Instant::now() + self.rto);
        }
        self.flush_tx(qi)
    }

    /// Executes an atomic request (software path): checks the sequence,
    /// the key, the right, the alignment and the bounds, runs it on the
    /// region's 8 bytes (host byte order), and answers with an ATOMIC
    /// ACKNOWLEDGE carrying the original value. A duplicate is answered
    /// from the QP's replay list, never executed again.
    fn respond_atomic(&mut self, qi: usize, pkt: &Packet<'_>) -> io::Result<()> {
        let q = &self.qps[qi];
        let psn = pkt.bth.psn;
        if wire::psn_before(psn, q.epsn) {
            let replay = q
                .atomic_replies
                .iter()
                .find(|(p, _)| *p == psn)
                .map(|(_, orig)| *orig);
            return match replay {
                Some(orig) => {
                    self.stats.atomic_replays += 1;
                    self.send_atomic_ack(qi, psn, orig)
                }
                // Too old to remember: the requester has moved on.
                None => Ok(()),
            };
        }
        if psn != q.epsn {
            let e = q.epsn;
            if self.qps[qi].nak_sent {
                return Ok(());
            }
            self.qps[qi].nak_sent = true;
            return self.send_ack(qi, psn_add(e, 0x00ff_ffff), NAK_PSN_SEQ);
        }
        let Some(eth) = pkt.atomic else {
            return Ok(());
        };
        let pd = q.pd;
        let region = self
            .mrs
            .iter()
            .position(|m| m.rkey == eth.rkey && m.pd == pd && m.access.remote_atomic)
            .and_then(|i| {
                let m = &self.mrs[i];
                let off = usize::try_from(eth.va.checked_sub(m.va)?).ok()?;
                off.checked_add(8)
                    .is_some_and(|e| e <= m.buf.len())
                    .then_some((i, off))
            });
        let e = q.epsn;
        let Some((mi, off)) = region else {
            self.qps[qi].state = QpState::Error;
            return self.send_ack(qi, e, NAK_REMOTE_ACCESS);
        };
        if eth.va % 8 != 0 {
            self.qps[qi].state = QpState::Error;
            return self.send_ack(qi, e, NAK_INVALID_REQUEST);
        }
        let cell = &mut self.mrs[mi].buf[off..off + 8];
        let orig = u64::from_ne_bytes(cell.try_into().expect("8 bytes"));
        let new = if pkt.bth.opcode == opcode::COMPARE_SWAP {
            if orig == eth.compare {
                eth.swap_add
            } else {
                orig
            }
        } else {
            orig.wrapping_add(eth.swap_add)
        };
        cell.copy_from_slice(&new.to_ne_bytes());
        let q = &mut self.qps[qi];
        q.msn = psn_add(q.msn, 1);
        q.epsn = psn_add(q.epsn, 1);
        q.nak_sent = false;
        if q.atomic_replies.len() == ATOMIC_REPLAY {
            q.atomic_replies.pop_front();
        }
        q.atomic_replies.push_back((psn, orig));
        self.stats.atomics += 1;
        self.send_atomic_ack(qi, psn, orig)
    }

    fn send_atomic_ack(&mut self, qi: usize, psn: u32, orig: u64) -> io::Result<()> {
        let q = &self.qps[qi];
        let pkt = Packet {
            bth: header(opcode::ATOMIC_ACKNOWLEDGE, q.remote_qpn, psn, false),
            reth: None,
            aeth: Some(Aeth {
                syndrome: ACK_UNLIMITED,
                msn: q.msn,
            }),
            imm: None,
            atomic: None,
            atomic_ack: Some(orig),
            payload: &[],
            icrc: 0,
        };
        self.send_control(qi, &pkt)
    }

    /// Sends one header-only packet (an ACK, NAK or atomic ACK) to the
    /// QP's peer; a refused send counts as a lost packet.
    fn send_control(&mut self, qi: usize, pkt: &Packet<'_>) -> io::Result<()> {
        let mut buf = encode(pkt)?;
        let q = &self.qps[qi];
        let (ip, port) = (q.remote_ip, q.src_port);
        let sent = self.io.send(ip, port, &mut buf);
        self.stats.note_send(sent);
        Ok(())
    }

    /// Answers an RDMA READ request (software path): checks the key, the
    /// rights and the bounds, then sends the data in path-MTU responses.
    fn respond_read(&mut self, qi: usize, pkt: &Packet<'_>) -> io::Result<()> {
        use opcode::*;
        let q = &self.qps[qi];
        // A duplicate READ (its responses were lost) is executed again;
        // one from the future is a sequence error.
        let duplicate = wire::psn_before(pkt.bth.psn, q.epsn);
        if pkt.bth.psn != q.epsn && !duplicate {
            let e = q.epsn;
            if self.qps[qi].nak_sent {
                return Ok(());
            }
            self.qps[qi].nak_sent = true;
            return self.send_ack(qi, psn_add(e, 0x00ff_ffff), NAK_PSN_SEQ);
        }
        let reth = pkt.reth.unwrap_or(Reth {
            va: 0,
            rkey: 0,
            dma_len: 0,
        });
        let len = reth.dma_len as usize;
        let pd = q.pd;
        let found = self
            .mrs
            .iter()
            .position(|m| m.rkey == reth.rkey && m.pd == pd)
            .and_then(|i| {
                let m = &self.mrs[i];
                let off = usize::try_from(reth.va.checked_sub(m.va)?).ok()?;
                (m.access.remote_read && off.checked_add(len).is_some_and(|e| e <= m.buf.len()))
                    .then_some((i, off))
            });
        let Some((mi, off)) = found else {
            let e = q.epsn;
            self.qps[qi].state = QpState::Error;
            return self.send_ack(qi, e, NAK_REMOTE_ACCESS);
        };
        let q = &mut self.qps[qi];
        let n = len.div_ceil(q.mtu).max(1);
        if !duplicate {
            q.msn = psn_add(q.msn, 1);
            q.epsn = psn_add(q.epsn, n as u32);
            q.nak_sent = false;
        }
        let (mtu, remote_qpn, msn) = (q.mtu, q.remote_qpn, q.msn);
        let (ip, port) = (q.remote_ip, q.src_port);
        // The responses carry their payload straight from the region, a
        // batch at a time: a large READ never holds more than a batch of
        // headers.
        for start in (0..n).step_by(READ_RESPONSE_BATCH) {
            let mut heads = Vec::with_capacity(READ_RESPONSE_BATCH);
            for i in start..(start + READ_RESPONSE_BATCH).min(n) {
                let (first, last) = (i == 0, i + 1 == n);
                let op = match (first, last) {
                    (true, true) => READ_RESPONSE_ONLY,
                    (true, false) => READ_RESPONSE_FIRST,
                    (false, true) => READ_RESPONSE_LAST,
                    (false, false) => READ_RESPONSE_MIDDLE,
                };
                let resp = Packet {
                    bth: header(op, remote_qpn, psn_add(pkt.bth.psn, i as u32), false),
                    reth: None,
                    aeth: (first || last).then_some(Aeth {
                        syndrome: ACK_UNLIMITED,
                        msn,
                    }),
                    imm: None,
                    atomic: None,
                    atomic_ack: None,
                    payload: &[],
                    icrc: 0,
                };
                let (at, size) = (i * mtu, mtu.min(len - i * mtu));
                let (buf, split) = headers_only(&resp, size)?;
                heads.push((buf, split, off + at, size));
            }
            let mrs = &self.mrs;
            let mut burst: Vec<Piece<'_>> = heads
                .iter_mut()
                .map(|(buf, split, at, size)| {
                    let (head, tail) = buf.split_at_mut(*split);
                    Piece {
                        head,
                        body: &mrs[mi].buf[*at..*at + *size],
                        tail,
                    }
                })
                .collect();
            let sent = self.io.send_burst(ip, port, &mut burst);
            self.stats.note_send(sent);
        }
        Ok(())
    }

    fn send_ack(&mut self, qp: usize, psn: u32, syndrome: u8) -> io::Result<()> {
        let q = &self.qps[qp];
        let pkt = Packet {
            bth: header(opcode::ACKNOWLEDGE, q.remote_qpn, psn, false),
            reth: None,
            aeth: Some(Aeth {
                syndrome,
                msn: q.msn,
            }),
            imm: None,
            atomic: None,
            atomic_ack: None,
            payload: &[],
            icrc: 0,
        };
        self.send_control(qp, &pkt)
    }

    /// Runs the retransmission timers, then receives and handles packets:
    /// waits up to `timeout` for the first, then takes what is already
    /// queued (up to 64). Returns whether any packet was handled.
    pub fn poll(&mut self, timeout: Duration) -> io::Result<bool> {
        #[cfg(test)]
        if let Some(kind) = self.fail_poll.take() {
            return Err(io::Error::new(kind, "injected poll failure"));
        }
        self.check_timers()?;
        self.flush_acks()?;
        // Wait no longer than the next coalesced ACK is due.
        let timeout = if self.qps.iter().any(|q| q.ack_due.is_some()) {
            timeout.min(ACK_DELAY)
        } else {
            timeout
        };
        // Nor longer than an RNR wait ends.
        let timeout = match self.qps.iter().filter_map(|q| q.rnr_at).min() {
            Some(t) => timeout.min(t.saturating_duration_since(Instant::now())),
            None => timeout,
        };
        let mut any = false;
        let mut wait = timeout.min(self.rto);
        // Handle what is already there (up to a batch), waiting only for
        // the first.
        for _ in 0..64 {
            if !self.poll_one(wait)? {
                break;
            }
            any = true;
            wait = Duration::ZERO;
        }
        // Datagrams refused below RoCEv2 (IPv4/UDP checks) count as dropped.
        self.stats.dropped += std::mem::take(&mut self.io.malformed);
        let (sent, received, spilled) = std::mem::take(&mut self.io.gso_counts);
        self.stats.gso_segments_sent += sent;
        self.stats.gso_datagrams_received += received;
        self.stats.spilled += spilled;
        self.notify_cq();
        Ok(any)
    }

    fn poll_one(&mut self, timeout: Duration) -> io::Result<bool> {
        let Some(f) = self.io.recv_frame(timeout)? else {
            return Ok(false);
        };
        let mut r = Ok(());
        // SAFETY: the frame is released only below, after the last use of
        // its datagrams; `self.io` (which owns the ring and the spill
        // buffer) is not replaced, dropped or asked for another frame
        // while a packet is handled.
        let datagrams = unsafe { f.datagrams() };
        for (flow, data) in datagrams {
            r = self.handle_packet(&flow, data);
            if r.is_err() {
                break;
            }
        }
        self.io.release(f);
        r.map(|()| true)
    }

    /// Checks, parses and handles one received packet.
    fn handle_packet(&mut self, flow: &wire::Flow, data: &[u8]) -> io::Result<()> {
        if wire::check(flow, data).is_err() {
            self.stats.dropped += 1;
            return Ok(());
        }
        let Ok(pkt) = Packet::parse(data) else {
            self.stats.dropped += 1;
            return Ok(());
        };
        // The packet's metadata selects the queue.
        let Some(qi) = self.qps.iter().position(|q| q.qpn == pkt.bth.dest_qp) else {
            self.stats.dropped += 1;
            return Ok(());
        };
        if matches!(
            pkt.bth.opcode,
            opcode::READ_RESPONSE_FIRST
                | opcode::READ_RESPONSE_MIDDLE
                | opcode::READ_RESPONSE_LAST
                | opcode::READ_RESPONSE_ONLY
        ) {
            let (qps, mrs, cq) = (&mut self.qps, &mut self.mrs, &mut self.staged);
            match place_read_response(&mut qps[qi], mrs, &pkt, cq) {
                Ok(last) => {
                    self.stats.fast_packets += 1;
                    self.stats.fast_bytes += pkt.payload.len() as u64;
                    // A read response acknowledges every earlier request.
                    if let Some(p) = last {
                        self.acknowledge(qi, p)?;
                    }
                }
                Err(_) => self.stats.slow_packets += 1,
            }
            return Ok(());
        }
        if pkt.bth.opcode == opcode::ATOMIC_ACKNOWLEDGE {
            let (qps, mrs, cq) = (&mut self.qps, &mut self.mrs, &mut self.staged);
            match place_atomic_ack(&mut qps[qi], mrs, &pkt, cq) {
                Ok(psn) => {
                    self.stats.fast_packets += 1;
                    self.stats.fast_bytes += 8;
                    // It acknowledges every earlier request too.
                    self.acknowledge(qi, psn)?;
                }
                Err(_) => self.stats.slow_packets += 1,
            }
            return Ok(());
        }
        let (qps, mrs, cq) = (&mut self.qps, &mut self.mrs, &mut self.staged);
        match place(&mut qps[qi], mrs, &pkt, cq) {
            Ok(Placed::Done { psn, ack_req }) => {
                self.stats.fast_packets += 1;
                self.stats.fast_bytes += pkt.payload.len() as u64;
                if ack_req {
                    self.schedule_ack(qi, psn)?;
                }
            }
            Err(why) => {
                self.stats.slow_packets += 1;
                self.software(qi, &pkt, why)?;
            }
        }
        Ok(())
    }

    /// The software path.
    fn software(&mut self, qi: usize, pkt: &Packet<'_>, why: Slow) -> io::Result<()> {
        match (pkt.bth.opcode, why) {
            (opcode::ACKNOWLEDGE, _) => {
                let aeth = pkt.aeth.unwrap_or(Aeth {
                    syndrome: 0,
                    msn: 0,
                });
                let q = &mut self.qps[qi];
                match aeth.syndrome >> 5 {
                    0 => self.acknowledge(qi, pkt.bth.psn)?,
                    3 => {
                        // NAK: sequence error → go back N; others fail.
                        if aeth.syndrome == NAK_PSN_SEQ {
                            self.resend_unacked(qi);
                        } else {
                            let status = if aeth.syndrome == NAK_REMOTE_ACCESS {
                                WcStatus::RemoteAccessError
                            } else {
                                WcStatus::RemoteInvalidRequest
                            };
                            q.state = QpState::Error;
                            let failed = q
                                .unacked
                                .iter()
                                .find_map(|o| o.completes.map(|w| (w, o.kind)))
                                .or_else(|| q.reads.front().map(|r| (r.wr_id, r.kind)));
                            q.unacked.clear();
                            q.reads.clear();
                            if let Some((wr_id, kind)) = failed {
                                self.staged.push_back(Completion {
                                    wr_id,
                                    opcode: kind,
                                    status,
                                    byte_len: 0,
                                    imm: None,
                                    qpn: q.qpn,
                                    path: PathKind::Software,
                                });
                            }
                            // The rest of the QP's work is flushed.
                            self.to_error(qi);
                        }
                    }
                    1 => {
                        // RNR NAK: the packets before its PSN arrived; the
                        // rest goes again after the timer the peer asked
                        // for, up to `rnr_retry` times in a row.
                        self.acknowledge(qi, psn_add(pkt.bth.psn, 0x00ff_ffff))?;
                        self.stats.rnr_naks += 1;
                        let limit = self.rnr_retry;
                        let q = &mut self.qps[qi];
                        if q.unacked.is_empty() {
                            return Ok(());
                        }
                        if limit != 7 && q.rnr_retries >= limit {
                            self.fail_outstanding(qi, WcStatus::RnrRetryExceeded);
                        } else {
                            q.rnr_retries += 1;
                            q.rto_at = None;
                            q.rnr_at = Some(Instant::now() + rnr_delay(aeth.syndrome));
                        }
                    }
                    _ => {}
                }
                Ok(())
            }
            (opcode::READ_REQUEST, _) => self.respond_read(qi, pkt),
            (opcode::COMPARE_SWAP | opcode::FETCH_ADD, _) => self.respond_atomic(qi, pkt),
            (_, Slow::Duplicate) => {
                // Already placed: acknowledge everything received so far
                // again, place nothing.
                let e = self.qps[qi].epsn;
                self.send_ack(qi, psn_add(e, 0x00ff_ffff), ACK_UNLIMITED)
            }
            (_, Slow::OutOfSequence) => {
                // NAK once per expected PSN; the requester goes back.
                if self.qps[qi].nak_sent {
                    return Ok(());
                }
                self.qps[qi].nak_sent = true;
                let e = self.qps[qi].epsn;
                self.send_ack(qi, psn_add(e, 0x00ff_ffff), NAK_PSN_SEQ)
            }
            (_, Slow::NoReceive) => {
                let e = self.qps[qi].epsn;
                self.send_ack(qi, e, RNR_NAK)
            }
            (_, Slow::Access) => {
                let e = self.qps[qi].epsn;
                self.qps[qi].state = QpState::Error;
                self.send_ack(qi, e, NAK_REMOTE_ACCESS)
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qp() -> QueuePair {
        let mut q = QueuePair::new(7, 256);
        q.state = QpState::Rts;
        q.remote_qpn = 9;
        q.remote_ip = Ipv4Addr::LOCALHOST;
        q.epsn = 100;
        q
    }

    fn mr(rkey: u32, len: usize, write: bool) -> MemoryRegion {
        MemoryRegion {
            buf: vec![0; len],
            lkey: rkey,
            rkey,
            access: Access {
                local_write: true,
                remote_write: write,
                remote_read: false,
                remote_atomic: false,
            },
            va: 0x1000,
            pd: Pd::DEFAULT,
        }
    }

    fn pkt<'a>(op: u8, psn: u32, payload: &'a [u8], reth: Option<Reth>) -> Packet<'a> {
        Packet {
            bth: Bth {
                opcode: op,
                solicited: false,
                mig_req: false,
                pad: 0,
                tver: 0,
                pkey: DEFAULT_PKEY,
                fecn: false,
                becn: false,
                dest_qp: 7,
                ack_req: true,
                psn,
            },
            reth,
            aeth: None,
            imm: (op == opcode::WRITE_ONLY_IMM || op == opcode::SEND_ONLY_IMM).then_some(0xabcd),
            atomic: None,
            atomic_ack: None,
            payload,
            icrc: 0,
        }
    }

    #[test]
    fn send_lands_in_the_posted_buffer_and_posts_amended_metadata() {
        let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 64, false)], VecDeque::new());
        q.rq.push_back(
            RecvWr {
                wr_id: 42,
                mr: 0,
                offset: 8,
                len: 32,
            }
            .into(),
        );
        let r = place(
            &mut q,
            &mut mrs,
            &pkt(opcode::SEND_ONLY_IMM, 100, b"hello", None),
            &mut cq,
        );
        assert_eq!(
            r,
            Ok(Placed::Done {
                psn: 100,
                ack_req: true
            })
        );
        assert_eq!(&mrs[0].buf[8..13], b"hello");
        let c = cq.pop_front().unwrap();
        assert_eq!(
            (c.wr_id, c.byte_len, c.imm, c.path),
            (42, 5, Some(0xabcd), PathKind::Fast)
        );
        assert_eq!(q.epsn, 101);
    }

    #[test]
    fn write_is_placed_by_rkey_and_checked() {
        let (mut q, mut mrs, mut cq) = (
            qp(),
            vec![mr(5, 64, true), mr(6, 64, false)],
            VecDeque::new(),
        );
        let ok = Reth {
            va: 0x1000 + 60,
            rkey: 5,
            dma_len: 4,
        };
        assert!(place(
            &mut q,
            &mut mrs,
            &pkt(opcode::WRITE_ONLY, 100, b"abcd", Some(ok)),
            &mut cq
        )
        .is_ok());
        assert_eq!(&mrs[0].buf[60..], b"abcd");
        assert!(
            cq.is_empty(),
            "a plain WRITE completes nothing at the responder"
        );
        // Out of bounds, wrong key, no right: refused, nothing written.
        let before: Vec<Vec<u8>> = mrs.iter().map(|m| m.buf.clone()).collect();
        for reth in [
            Reth {
                va: 0x1000 + 61,
                rkey: 5,
                dma_len: 4,
            },
            Reth {
                va: 0x1000,
                rkey: 99,
                dma_len: 4,
            },
            Reth {
                va: 0x1000,
                rkey: 6,
                dma_len: 4,
            },
            Reth {
                va: 0x0fff,
                rkey: 5,
                dma_len: 4,
            },
        ] {
            assert_eq!(
                place(
                    &mut q,
                    &mut mrs,
                    &pkt(opcode::WRITE_ONLY, 101, b"zzzz", Some(reth)),
                    &mut cq
                ),
                Err(Slow::Access)
            );
        }
        assert_eq!(
            before,
            mrs.iter().map(|m| m.buf.clone()).collect::<Vec<_>>()
        );
        assert_eq!(q.epsn, 101);
    }

    #[test]
    fn a_send_scatters_over_a_receive_list_across_regions() {
        let (mut q, mut mrs, mut cq) = (
            qp(),
            vec![mr(1, 1024, false), mr(2, 1024, false)],
            VecDeque::new(),
        );
        // 100 + 300 + 200 bytes: the packet boundaries (256) fall inside
        // entries, and the message (520) ends inside the last one.
        q.rq.push_back(PostedRecv {
            wr_id: 8,
            sges: vec![
                Sge {
                    mr: 1,
                    offset: 10,
                    len: 100,
                },
                Sge {
                    mr: 0,
                    offset: 500,
                    len: 300,
                },
                Sge {
                    mr: 1,
                    offset: 600,
                    len: 200,
                },
            ],
            len: 600,
        });
        let msg: Vec<u8> = (0..520u32).map(|i| (i % 251) as u8 + 1).collect();
        for (i, (op, part)) in [
            (opcode::SEND_FIRST, &msg[..256]),
            (opcode::SEND_MIDDLE, &msg[256..512]),
            (opcode::SEND_LAST, &msg[512..]),
        ]
        .into_iter()
        .enumerate()
        {
            place(
                &mut q,
                &mut mrs,
                &pkt(op, 100 + i as u32, part, None),
                &mut cq,
            )
            .unwrap();
        }
        let c = cq.pop_front().expect("completed on the last packet");
        assert_eq!((c.wr_id, c.byte_len, c.path), (8, 520, PathKind::Fast));
        assert_eq!(&mrs[1].buf[10..110], &msg[..100]);
        assert_eq!(&mrs[0].buf[500..800], &msg[100..400]);
        assert_eq!(&mrs[1].buf[600..720], &msg[400..]);
        // Nothing outside the entries moved.
        let written = 100 + 300 + 120;
        let nonzero = mrs
            .iter()
            .flat_map(|m| m.buf.iter())
            .filter(|b| **b != 0)
            .count();
        assert_eq!(nonzero, written);
    }

    #[test]
    fn a_receive_a_message_is_arriving_into_is_flushed_first() {
        let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 1024, false)], VecDeque::new());
        for id in [1, 2] {
            q.rq.push_back(
                RecvWr {
                    wr_id: id,
                    mr: 0,
                    offset: 0,
                    len: 512,
                }
                .into(),
            );
        }
        place(
            &mut q,
            &mut mrs,
            &pkt(opcode::SEND_FIRST, 100, &[1; 256], None),
            &mut cq,
        )
        .unwrap();
        assert_eq!(
            q.take_unfinished(),
            vec![(1, WcOpcode::Recv), (2, WcOpcode::Recv)]
        );
        assert!(q.recv_msg.is_none() && q.rq.is_empty());
    }

    #[test]
    fn a_receive_too_small_for_the_message_takes_nothing_of_it() {
        let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 1024, false)], VecDeque::new());
        q.rq.push_back(PostedRecv {
            wr_id: 3,
            sges: vec![
                Sge {
                    mr: 0,
                    offset: 0,
                    len: 100,
                },
                Sge {
                    mr: 0,
                    offset: 200,
                    len: 100,
                },
            ],
            len: 200,
        });
        let big = [7u8; 256];
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::SEND_ONLY, 100, &big, None),
                &mut cq
            ),
            Err(Slow::Access)
        );
        assert!(mrs[0].buf.iter().all(|b| *b == 0));
        assert_eq!(q.rq.len(), 1, "the receive stays posted");
    }

    #[test]
    fn multi_packet_send_fills_one_receive_and_completes_on_last() {
        let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 1024, false)], VecDeque::new());
        q.rq.push_back(
            RecvWr {
                wr_id: 5,
                mr: 0,
                offset: 0,
                len: 1024,
            }
            .into(),
        );
        let a = vec![1u8; 256];
        let b = vec![2u8; 256];
        assert!(place(
            &mut q,
            &mut mrs,
            &pkt(opcode::SEND_FIRST, 100, &a, None),
            &mut cq
        )
        .is_ok());
        assert!(place(
            &mut q,
            &mut mrs,
            &pkt(opcode::SEND_MIDDLE, 101, &b, None),
            &mut cq
        )
        .is_ok());
        assert!(cq.is_empty());
        // A short middle packet is a protocol violation.
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::SEND_MIDDLE, 102, b"xy", None),
                &mut cq
            ),
            Err(Slow::Access)
        );
        assert!(place(
            &mut q,
            &mut mrs,
            &pkt(opcode::SEND_LAST, 102, b"end", None),
            &mut cq
        )
        .is_ok());
        let c = cq.pop_front().unwrap();
        assert_eq!((c.wr_id, c.byte_len), (5, 515));
        assert_eq!(&mrs[0].buf[..256], &a[..]);
        assert_eq!(&mrs[0].buf[256..512], &b[..]);
        assert_eq!(&mrs[0].buf[512..515], b"end");
        assert_eq!(q.msn, 1, "one message, three packets");
        // A MIDDLE with no FIRST is out of sequence.
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::SEND_MIDDLE, 103, &a, None),
                &mut cq
            ),
            Err(Slow::OutOfSequence)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_packets_never_write_out_of_bounds(d in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            fuzz_receive(&d);
        }
    }

    #[test]
    fn sequence_problems_go_to_software() {
        let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 64, false)], VecDeque::new());
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::SEND_ONLY, 100, b"x", None),
                &mut cq
            ),
            Err(Slow::NoReceive)
        );
        q.rq.push_back(
            RecvWr {
                wr_id: 1,
                mr: 0,
                offset: 0,
                len: 64,
            }
            .into(),
        );
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::SEND_ONLY, 99, b"x", None),
                &mut cq
            ),
            Err(Slow::Duplicate)
        );
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::SEND_ONLY, 105, b"x", None),
                &mut cq
            ),
            Err(Slow::OutOfSequence)
        );
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::ACKNOWLEDGE, 100, b"", None),
                &mut cq
            ),
            Err(Slow::NotPlaceable)
        );
        assert!(cq.is_empty());
        assert_eq!(q.rq.len(), 1);
    }
}
