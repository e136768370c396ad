//! The descriptors of one chain, read through the worker's view of guest
//! memory.
//!
//! virtio-queue's `DescriptorChain` reads each 16-byte descriptor with
//! vm-memory's general `read_obj` (a region lookup, a slice iterator and
//! a `memcpy` call); with three descriptors a request, walking chains was
//! 18 % of the queue worker's time on `null` 4k reads, and region lookups
//! another 12 % (`perf`, 2026-12-06).
//! This walker follows the same rules, step for step, and reads a
//! descriptor with two loads when one region holds it (nearly always),
//! falling back to `read_obj` otherwise:
//!
//! - at most `queue size` descriptors (a loop ends there), none past the
//!   table's end, none unreadable: each ends the chain;
//! - an indirect descriptor switches to its table once (length a multiple
//!   of 16, at most 65535 entries; an indirect one inside ends the chain);
//! - the chain ends where its lengths would pass 2^32 bytes.
//!
//! The fuzz target (`fuzzing::parse_request`) checks on every input that
//! both walk the same descriptors.

use std::mem::size_of;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::hot_mem::HotMem;

/// virtio's descriptor flags (virtio 1.2, 2.7.5).
const F_NEXT: u16 = 1;
const F_INDIRECT: u16 = 4;
/// Bytes of one descriptor.
const DESC_BYTES: u64 = size_of::<Descriptor>() as u64;

/// A ready split queue of `size` entries with its rings at the given
/// guest addresses (for the tests and the fuzz target).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn ready_queue(size: u16, desc: u64, avail: u64, used: u64) -> virtio_queue::Queue {
    use virtio_queue::QueueT;
    let mut q = virtio_queue::Queue::new(size).expect("a queue size that is a power of 2");
    q.set_size(size);
    let lo = |a: u64| Some(a as u32);
    let hi = |a: u64| Some((a >> 32) as u32);
    q.set_desc_table_address(lo(desc), hi(desc));
    q.set_avail_ring_address(lo(avail), hi(avail));
    q.set_used_ring_address(lo(used), hi(used));
    q.set_ready(true);
    q
}

/// Guest memory for the ring tests: one region up to 0x10000, a second
/// one right after it (so that 16 bytes at 0xfff8 straddle two regions),
/// a hole up to 0x40000, and one there.
#[cfg(test)]
pub(crate) fn test_memory() -> std::sync::Arc<vm_memory::GuestMemoryMmap> {
    std::sync::Arc::new(
        vm_memory::GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
            (GuestAddress(0x40000), 0x10000),
        ])
        .expect("guest memory"),
    )
}

/// Where the `size` descriptors of the table at `table` are mapped here,
/// when one region holds them all.
fn table_host(mem: &HotMem<'_>, table: GuestAddress, size: u16) -> Option<*mut u8> {
    mem.in_one_region(table, usize::from(size) * size_of::<Descriptor>())
}

/// An iterator over a chain's descriptors, like virtio-queue's.
pub(crate) struct DescWalk<'m, 'a> {
    mem: &'m HotMem<'a>,
    table: GuestAddress,
    /// Where the table is mapped here, when one region holds all of it
    /// (then a descriptor is read without a lookup of its own).
    host: Option<*mut u8>,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'m, 'a> DescWalk<'m, 'a> {
    /// The chain starting at `head` in the queue's descriptor table at
    /// `table`, of `size` entries.
    pub(crate) fn new(mem: &'m HotMem<'a>, table: GuestAddress, size: u16, head: u16) -> Self {
        DescWalk {
            mem,
            table,
            host: table_host(mem, table, size),
            size,
            next: head,
            ttl: size,
            indirect: false,
            bytes: 0,
        }
    }

    /// Entry `index` (< `size`) of the current table.
    fn read(&self, index: u16) -> Option<Descriptor> {
        let host = match self.host {
            // SAFETY: `index` < `size`, so its 16 bytes lie in the table,
            // which one mapped region of the snapshot holds whole.
            Some(table) => unsafe { table.add(usize::from(index) * size_of::<Descriptor>()) },
            None => {
                let addr = GuestAddress(self.table.0.checked_add(u64::from(index) * DESC_BYTES)?);
                match self.mem.in_one_region(addr, size_of::<Descriptor>()) {
                    Some(h) => h,
                    None => return self.mem.read_obj::<Descriptor>(addr).ok(),
                }
            }
        };
        let (lo, hi) = if (host as usize).is_multiple_of(8) {
            // SAFETY: 16 bytes inside one mapped region of the snapshot
            // (which the borrow keeps alive), 8-byte aligned; volatile, as
            // vm-memory reads memory the driver may change meanwhile.
            unsafe {
                (
                    host.cast::<u64>().read_volatile(),
                    host.cast::<u64>().add(1).read_volatile(),
                )
            }
        } else {
            // An indirect table need not be aligned.
            let mut raw = [0u8; 16];
            for (i, b) in raw.iter_mut().enumerate() {
                // SAFETY: as above, byte by byte.
                *b = unsafe { host.add(i).read_volatile() };
            }
            let (l, h) = raw.split_at(8);
            (
                u64::from_ne_bytes(l.try_into().ok()?),
                u64::from_ne_bytes(h.try_into().ok()?),
            )
        };
        // Little-endian in guest memory: addr, len, flags, next.
        let (lo, hi) = (u64::from_le(lo), u64::from_le(hi));
        Some(Descriptor::new(
            lo,
            hi as u32,
            (hi >> 32) as u16,
            (hi >> 48) as u16,
        ))
    }

    /// Switches to the table an indirect descriptor names.
    fn enter_indirect(&mut self, d: &Descriptor) -> Option<()> {
        if self.indirect || !u64::from(d.len()).is_multiple_of(DESC_BYTES) {
            return None;
        }
        let entries = u16::try_from(u64::from(d.len()) / DESC_BYTES).ok()?;
        self.table = d.addr();
        self.host = table_host(self.mem, self.table, entries);
        self.size = entries;
        self.next = 0;
        self.ttl = entries;
        self.indirect = true;
        Some(())
    }
}

impl Iterator for DescWalk<'_, '_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.size {
                return None;
            }
            let d = self.read(self.next)?;
            if d.flags() & F_INDIRECT != 0 {
                self.enter_indirect(&d)?;
                continue;
            }
            self.bytes = self.bytes.checked_add(d.len())?;
            if d.flags() & F_NEXT != 0 {
                self.next = d.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use virtio_queue::QueueT;
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const QSIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    use super::test_memory as memory;

    fn put(mem: &GuestMemoryMmap, at: u64, d: (u64, u32, u16, u16)) {
        mem.write_obj(Descriptor::new(d.0, d.1, d.2, d.3), GuestAddress(at))
            .expect("descriptor in memory");
    }

    /// The descriptors both walkers yield for the chain at `head`.
    fn both(mem: &Arc<GuestMemoryMmap>, head: u16) -> (Vec<(u64, u32, u16, u16)>, usize) {
        mem.write_obj(head, GuestAddress(AVAIL + 4)).expect("avail");
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).expect("avail");
        let mut q = ready_queue(QSIZE, DESC, AVAIL, USED);
        let hot = HotMem::new(mem);
        let chain = q.pop_descriptor_chain(&hot).expect("a chain");
        let fields = |d: Descriptor| (d.addr().0, d.len(), d.flags(), d.next());
        // Bounded, so that a walker that never ends fails instead of hanging.
        let most = 4 * usize::from(QSIZE);
        let ours: Vec<_> = DescWalk::new(&hot, GuestAddress(DESC), QSIZE, head)
            .take(most)
            .map(fields)
            .collect();
        let theirs: Vec<_> = chain.take(most).map(fields).collect();
        assert_eq!(ours, theirs, "chain at {head}");
        let n = ours.len();
        (ours, n)
    }

    fn at(i: u64) -> u64 {
        DESC + i * DESC_BYTES
    }

    #[test]
    fn a_plain_chain_of_three() {
        let mem = memory();
        put(&mem, at(2), (0x5000, 16, F_NEXT, 7));
        put(&mem, at(7), (0x6000, 4096, F_NEXT | 2, 9));
        put(&mem, at(9), (0x7000, 1, 2, 0));
        let (d, n) = both(&mem, 2);
        assert_eq!(n, 3);
        assert_eq!(d[1], (0x6000, 4096, F_NEXT | 2, 9));
    }

    #[test]
    fn a_loop_ends_after_queue_size_descriptors() {
        let mem = memory();
        put(&mem, at(0), (0x5000, 1, F_NEXT, 1));
        put(&mem, at(1), (0x5000, 1, F_NEXT, 0));
        assert_eq!(both(&mem, 0).1, usize::from(QSIZE));
    }

    #[test]
    fn an_index_past_the_table_ends_the_chain() {
        let mem = memory();
        put(&mem, at(3), (0x5000, 1, F_NEXT, QSIZE));
        assert_eq!(both(&mem, 3).1, 1);
    }

    #[test]
    fn lengths_past_4_gib_end_the_chain() {
        let mem = memory();
        put(&mem, at(0), (0x5000, u32::MAX, F_NEXT, 1));
        put(&mem, at(1), (0x5000, 1, 0, 0));
        assert_eq!(both(&mem, 0).1, 1);
    }

    #[test]
    fn indirect_tables_aligned_unaligned_and_across_regions() {
        // Each table holds two descriptors: 32 bytes.
        for table in [0x8000u64, 0x8008, 0x8003, 0xfff0, 0xfff8, 0x40000] {
            let mem = memory();
            put(&mem, at(4), (table, 32, F_INDIRECT, 0));
            put(&mem, table, (0x5000, 16, F_NEXT, 1));
            put(&mem, table + 16, (0x6000, 1, 2, 0));
            assert_eq!(both(&mem, 4).1, 2, "table at {table:#x}");
        }
    }

    #[test]
    fn bad_indirect_tables_end_the_chain() {
        let mem = memory();
        // A length that is not a multiple of 16.
        put(&mem, at(0), (0x8000, 24, F_INDIRECT, 0));
        put(&mem, 0x8000, (0x5000, 1, 0, 0));
        assert_eq!(both(&mem, 0).1, 0);
        // An indirect descriptor inside an indirect table.
        put(&mem, at(1), (0x8000, 32, F_INDIRECT, 0));
        put(&mem, 0x8000, (0x9000, 16, F_INDIRECT, 0));
        assert_eq!(both(&mem, 1).1, 0);
        // A table in the hole between regions.
        put(&mem, at(2), (0x30000, 32, F_INDIRECT, 0));
        assert_eq!(both(&mem, 2).1, 0);
        // A table running off the end of guest memory.
        put(&mem, at(3), (0x4fff8, 32, F_INDIRECT, 0));
        assert_eq!(both(&mem, 3).1, 0);
    }
}
