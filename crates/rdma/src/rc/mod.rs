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
//!
//! The two datapaths are two parts of this module:
//! - the placement fast path, `placement.rs`'s functions: metadata selects
//!   the queue, payload goes into application memory, amended metadata to
//!   the completion ring;
//! - the software path: `requester.rs` (work requests to packets, send
//!   window, retransmission, RNR waits), `responder.rs` (ACKs and NAKs,
//!   READ responses, atomics) and `receive.rs`, which hands each packet to
//!   one path or the other.
//!
//! This file holds the verbs types and the engine's state; `verbs.rs` the
//! calls that manage them (PDs, MRs, QPs and their states, CQs).

use std::collections::VecDeque;
use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::net::{Piece, RawIo};
use crate::wire::{self, opcode, Aeth, AtomicEth, Bth, Packet, Reth, DEFAULT_PKEY};

mod departed;
mod lifecycle;
mod placement;
mod receive;
mod requester;
mod responder;
mod srq;
mod ud;
mod verbs;

pub use srq::SrqId;
pub use ud::GRH_BYTES;

pub use placement::{fuzz_receive, place};
use placement::{place_atomic_ack, place_read_response, psn_add};

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

/// The bytes behind a memory region.
#[derive(Debug)]
pub enum Memory {
    /// The engine's own buffer (the Rust API's regions).
    Owned(Vec<u8>),
    /// An application's own memory, mapped from the memfds it lives in
    /// (`len` bytes from `offset` in `map`): what the verbs library
    /// registers, so that received data lands where the application reads
    /// it.
    Mapped {
        /// The pages, in the application's order.
        map: crate::shm::Mapping,
        /// Where the region starts in them.
        offset: usize,
        /// Its length.
        len: usize,
    },
}

impl Memory {
    /// An application's memory; `offset + len` must lie inside `map`.
    pub fn mapped(map: crate::shm::Mapping, offset: usize, len: usize) -> io::Result<Self> {
        if offset.checked_add(len).is_none_or(|e| e > map.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a region past its pages",
            ));
        }
        Ok(Memory::Mapped { map, offset, len })
    }
}

impl std::ops::Deref for Memory {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Memory::Owned(v) => v,
            // SAFETY: the range lies inside the mapping (checked when made),
            // which lives as long as `self`. The application may change the
            // bytes while the engine reads them, as it may under a NIC's
            // DMA: the engine copies bytes in and out and never relies on
            // them staying the same between two reads.
            Memory::Mapped { map, offset, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(*offset), *len)
            },
        }
    }
}

impl std::ops::DerefMut for Memory {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Memory::Owned(v) => v,
            // SAFETY: as for Deref; `&mut self` keeps this process from
            // making a second slice of it meanwhile.
            Memory::Mapped { map, offset, len } => unsafe {
                std::slice::from_raw_parts_mut(map.as_ptr().add(*offset), *len)
            },
        }
    }
}

/// A registered memory region.
#[derive(Debug)]
pub struct MemoryRegion {
    buf: Memory,
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
    /// UD receives: the sender's queue pair (their buffer starts with
    /// the 40-byte GRH area).
    pub src_qp: Option<u32>,
}

impl Completion {
    /// A completion the software path makes, with no data counted in it:
    /// an acknowledged send, a refusal, a flush, a retry limit.
    pub(crate) fn software(wr_id: u64, opcode: WcOpcode, status: WcStatus, qpn: u32) -> Self {
        Completion {
            wr_id,
            opcode,
            status,
            byte_len: 0,
            imm: None,
            qpn,
            path: PathKind::Software,
            src_qp: None,
        }
    }
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
    /// The application's local ACK timeout, retry count and RNR retry
    /// count (verbs' `timeout`, `retry_cnt`, `rnr_retry`); the engine's
    /// own where it set none.
    rto: Option<Duration>,
    max_retries: Option<u32>,
    rnr_retry: Option<u32>,
    /// The READ or atomic (by PSN) sent again because an ACK passed it
    /// unanswered, until something moves.
    resent_for: Option<u32>,
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
    /// The first PSN and packet count of the latest READs this QP answered
    /// as responder: a duplicate READ from inside one (its requester got
    /// the first responses and asks for the rest) is answered as that
    /// READ's continuation.
    read_replies: VecDeque<(u32, u32)>,
    /// READs and atomics it may have unanswered at once as requester.
    max_rd_atomic: usize,
    /// Where completions of this QP's send queue go.
    send_cq: CqId,
    /// Where completions of its receive queue go.
    recv_cq: CqId,
    /// The shared receive queue it takes receives from, if any.
    srq: Option<SrqId>,
    /// The RNR NAK timer it asks senders to wait (IBTA encoding).
    min_rnr_timer: u8,
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
            rto: None,
            max_retries: None,
            rnr_retry: None,
            resent_for: None,
            pd: Pd::DEFAULT,
            nak_sent: false,
            ack_due: None,
            atomic_replies: VecDeque::new(),
            read_replies: VecDeque::new(),
            max_rd_atomic: MAX_RD_ATOMIC,
            send_cq: CqId::DEFAULT,
            recv_cq: CqId::DEFAULT,
            srq: None,
            min_rnr_timer: 1,
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
    /// Responses that had come when the READ was last asked for: asked
    /// again, it asks for the rest only, so its responses start there.
    resume_at: u32,
    /// The peer's address and key it reads (to ask for the rest).
    remote_va: u64,
    rkey: u32,
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
    /// READs asked for again from where their data stopped (the rest
    /// only), after some of their responses came.
    pub reads_resumed: u64,
    /// READs a requester asked for the rest of (a duplicate from inside
    /// a READ this QP answered), answered as that READ's continuation.
    pub reads_continued: u64,
    /// SENDs and WRITEs a destroyed queue pair had received, sent again by
    /// a peer whose ACK was lost, acknowledged again (see `departed.rs`).
    pub departed_acks: u64,
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
/// READs a QP remembers the PSNs of as responder, for the same reason.
const READ_REPLAY: usize = 128;
/// READs and atomics a QP has unanswered at most as requester, unless
/// the application asks for fewer (verbs' `max_rd_atomic`): a responder
/// remembers only as many (its `max_dest_rd_atomic`; rdma_rxe recycles
/// the oldest), and a READ or atomic sent again that it no longer
/// remembers is dropped without a word.
const MAX_RD_ATOMIC: usize = 16;
/// RNR NAK syndrome: its low five bits are the timer (verbs'
/// `min_rnr_timer` of the responder's QP; 1, 10 us, unless set).
const RNR_NAK: u8 = 0x20;

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
    /// Slots of deregistered regions, for the next registration.
    free_mrs: Vec<usize>,
    /// Destroyed completion queues, for the next `create_cq`.
    free_cqs: Vec<CqId>,
    /// UD queue pairs.
    uds: Vec<ud::UdQp>,
    /// Shared receive queues (destroyed ones are `None`).
    srqs: Vec<Option<srq::Srq>>,
    /// Posted packets wait for [`Engine::uncork`] (see [`Engine::cork`]).
    corked: bool,
    /// Where recently destroyed queue pairs' receive sides stood.
    departed: VecDeque<departed::Departed>,
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
