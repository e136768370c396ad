//! The data path's shared-memory rings between an application's verbs
//! library and the card daemon: a queue pair's send and receive queues
//! (the application produces work requests, the daemon consumes them) and
//! a completion queue (the daemon produces completions, the application
//! consumes them). No system call per work request or completion: the
//! application rings the device's doorbell (an eventfd) only when the
//! daemon said it is about to sleep.
//!
//! Each ring is a header and a power-of-two array of fixed-size entries.
//! The header's producer and consumer counters are free-running 32-bit
//! numbers (entry `i` lives at slot `i % entries`), each written by one
//! side only, with release stores after the entries and acquire loads
//! before them. The daemon copies each entry out of shared memory before
//! it looks at it, and checks every field it uses against what the
//! application owns, so an application that scribbles on its rings hurts
//! only itself.
//!
//! Version 1 of the layout; the daemon and the library check it at open.

use std::sync::atomic::AtomicU32;

use crate::shm::Mapping;

/// The layout's version.
pub const VERSION: u32 = 1;

/// Bytes of a ring's header (producer and consumer on their own cache
/// lines).
pub const HEADER: usize = 256;
const PROD: usize = 0;
const CONS: usize = 64;
/// Completion queues: nonzero while the application waits for an event
/// (`ibv_req_notify_cq`): 1 for any completion, 2 for solicited ones.
const ARMED: usize = 128;
/// Send queues and completion queues: nonzero while the daemon sleeps (a
/// producer that sees it rings the doorbell after publishing).
const SLEEPING: usize = 192;

/// A scatter/gather entry as `ibv_sge` has it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sge {
    /// Application virtual address.
    pub addr: u64,
    /// Bytes.
    pub length: u32,
    /// The memory region's local key.
    pub lkey: u32,
}

/// Bytes of a send work request's data area: scatter entries or inline
/// bytes.
pub const SEND_DATA: usize = 440;
/// Most scatter entries of a send work request.
pub const MAX_SEND_SGE: usize = SEND_DATA / size_of::<Sge>();
/// Most inline bytes of a send work request.
pub const MAX_INLINE: usize = SEND_DATA;

/// A send work request (512 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SendWqe {
    /// The application's id.
    pub wr_id: u64,
    /// `IBV_WR_*`.
    pub opcode: u32,
    /// `IBV_SEND_*` flags.
    pub flags: u32,
    /// Immediate data, in network order as verbs keeps it.
    pub imm: u32,
    /// Scatter entries in `data` (0 when inline).
    pub num_sge: u32,
    /// RDMA and atomics: the peer's address.
    pub remote_addr: u64,
    /// RDMA and atomics: the peer's key.
    pub rkey: u32,
    /// Inline bytes in `data`.
    pub inline_len: u32,
    /// Atomics: compare (CAS) or add (FAA).
    pub compare_add: u64,
    /// Atomics: swap (CAS).
    pub swap: u64,
    /// UD: the address handle.
    pub ah: u32,
    /// UD: the destination QP.
    pub remote_qpn: u32,
    /// UD: the destination's Q_Key.
    pub remote_qkey: u32,
    /// Reserved (zero).
    pub reserved: u32,
    /// Scatter entries or inline bytes.
    pub data: [u8; SEND_DATA],
}

impl Default for SendWqe {
    fn default() -> Self {
        Self {
            wr_id: 0,
            opcode: 0,
            flags: 0,
            imm: 0,
            num_sge: 0,
            remote_addr: 0,
            rkey: 0,
            inline_len: 0,
            compare_add: 0,
            swap: 0,
            ah: 0,
            remote_qpn: 0,
            remote_qkey: 0,
            reserved: 0,
            data: [0; SEND_DATA],
        }
    }
}

impl SendWqe {
    /// Scatter entry `i` of `data`.
    pub fn sge(&self, i: usize) -> Sge {
        let b = &self.data[i * 16..i * 16 + 16];
        Sge {
            addr: u64::from_ne_bytes(b[..8].try_into().expect("8 bytes")),
            length: u32::from_ne_bytes(b[8..12].try_into().expect("4 bytes")),
            lkey: u32::from_ne_bytes(b[12..].try_into().expect("4 bytes")),
        }
    }

    /// Stores scatter entry `i` in `data`.
    pub fn set_sge(&mut self, i: usize, s: Sge) {
        let b = &mut self.data[i * 16..i * 16 + 16];
        b[..8].copy_from_slice(&s.addr.to_ne_bytes());
        b[8..12].copy_from_slice(&s.length.to_ne_bytes());
        b[12..].copy_from_slice(&s.lkey.to_ne_bytes());
    }
}

/// Most scatter entries of a receive work request.
pub const MAX_RECV_SGE: usize = 15;

/// A receive work request (256 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RecvWqe {
    /// The application's id.
    pub wr_id: u64,
    /// Entries in `sge`.
    pub num_sge: u32,
    /// Reserved (zero).
    pub reserved: u32,
    /// Where the message goes, in order.
    pub sge: [Sge; MAX_RECV_SGE],
}

/// A completion (64 bytes), the fields of `ibv_wc`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cqe {
    /// The work request's id.
    pub wr_id: u64,
    /// `IBV_WC_*` status.
    pub status: u32,
    /// `IBV_WC_*` opcode.
    pub opcode: u32,
    /// Vendor error (0).
    pub vendor_err: u32,
    /// Bytes received or moved.
    pub byte_len: u32,
    /// Immediate data, network order.
    pub imm: u32,
    /// Local QP number.
    pub qp_num: u32,
    /// UD: the sender's QP number.
    pub src_qp: u32,
    /// `IBV_WC_*` flags (`WITH_IMM`, `GRH`).
    pub wc_flags: u32,
    /// Partition index (0).
    pub pkey_index: u16,
    /// Source LID (0 on RoCE).
    pub slid: u16,
    /// Service level: none on RoCE; a UD receive's says what its GRH
    /// area holds (2: IPv4).
    pub sl: u8,
    /// Path bits (0).
    pub dlid_path_bits: u8,
    /// Reserved (zero).
    pub reserved: [u8; 14],
}

/// One side's view of a ring in a mapping: `entries` entries of `stride`
/// bytes after a [`HEADER`] at `base`.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    base: usize,
    entries: u32,
    stride: usize,
}

impl Ring {
    /// A ring of `entries` (a power of two) `stride`-byte entries at
    /// `base`.
    pub fn new(base: usize, entries: u32, stride: usize) -> Self {
        assert!(entries.is_power_of_two(), "ring of {entries}");
        Self {
            base,
            entries,
            stride,
        }
    }

    /// Bytes it takes, header included.
    pub fn bytes(&self) -> usize {
        HEADER + self.entries as usize * self.stride
    }

    /// Its entries.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Where the entry for counter value `i` is.
    pub fn slot(&self, i: u32) -> usize {
        self.base + HEADER + (i & (self.entries - 1)) as usize * self.stride
    }

    /// The producer counter.
    pub fn prod<'a>(&self, m: &'a Mapping) -> &'a AtomicU32 {
        m.atomic(self.base + PROD)
    }

    /// The consumer counter.
    pub fn cons<'a>(&self, m: &'a Mapping) -> &'a AtomicU32 {
        m.atomic(self.base + CONS)
    }

    /// The completion queue's arm word.
    pub fn armed<'a>(&self, m: &'a Mapping) -> &'a AtomicU32 {
        m.atomic(self.base + ARMED)
    }

    /// The daemon's sleeping word.
    pub fn sleeping<'a>(&self, m: &'a Mapping) -> &'a AtomicU32 {
        m.atomic(self.base + SLEEPING)
    }
}

/// Where a queue pair's two rings lie in its memfd.
#[derive(Debug, Clone, Copy)]
pub struct QpRings {
    /// The send queue.
    pub sq: Ring,
    /// The receive queue.
    pub rq: Ring,
    /// The memfd's size.
    pub bytes: usize,
}

impl QpRings {
    /// The rings for `sq` and `rq` entries (powers of two).
    pub fn new(sq: u32, rq: u32) -> Self {
        let page = crate::shm::page_size();
        let sq = Ring::new(0, sq, size_of::<SendWqe>());
        let rq_base = sq.bytes().next_multiple_of(page);
        let rq = Ring::new(rq_base, rq, size_of::<RecvWqe>());
        Self {
            sq,
            rq,
            bytes: (rq_base + rq.bytes()).next_multiple_of(page),
        }
    }
}

/// Where a completion queue's ring lies in its memfd, and the memfd's
/// size.
pub fn cq_ring(entries: u32) -> (Ring, usize) {
    let r = Ring::new(0, entries, size_of::<Cqe>());
    let bytes = r.bytes().next_multiple_of(crate::shm::page_size());
    (r, bytes)
}

/// The smallest power of two at least `n` (and at least 1), or `None` past
/// `max`.
pub fn entries_for(n: u32, max: u32) -> Option<u32> {
    let e = n.max(1).checked_next_power_of_two()?;
    (e <= max).then_some(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn entry_sizes_are_what_the_layout_says() {
        assert_eq!(size_of::<SendWqe>(), 512);
        assert_eq!(size_of::<RecvWqe>(), 256);
        assert_eq!(size_of::<Cqe>(), 64);
        assert_eq!(MAX_SEND_SGE, 27);
    }

    #[test]
    fn rings_do_not_overlap_and_counters_wrap() {
        let q = QpRings::new(4, 8);
        assert!(q.sq.slot(3) + 512 <= q.rq.slot(0) - HEADER);
        assert!(q.rq.slot(7) + 256 <= q.bytes);
        assert_eq!(q.sq.slot(4), q.sq.slot(0));
        let fd = crate::shm::sealed_memfd("q", q.bytes).unwrap();
        let m = Mapping::map(std::os::fd::AsFd::as_fd(&fd), 0, q.bytes).unwrap();
        // The counters are free-running: they wrap, the slots with them.
        q.sq.prod(&m).store(u32::MAX, Ordering::Relaxed);
        assert_eq!(q.sq.prod(&m).load(Ordering::Relaxed).wrapping_add(1), 0);
        assert_eq!(
            q.sq.slot(u32::MAX).wrapping_add(512),
            q.sq.slot(0) + 4 * 512
        );
        let mut w = SendWqe::default();
        w.set_sge(
            26,
            Sge {
                addr: 1,
                length: 2,
                lkey: 3,
            },
        );
        assert_eq!(
            w.sge(26),
            Sge {
                addr: 1,
                length: 2,
                lkey: 3
            }
        );
        assert_eq!(entries_for(5, 16), Some(8));
        assert_eq!(entries_for(0, 16), Some(1));
        assert_eq!(entries_for(17, 16), None);
    }
}
