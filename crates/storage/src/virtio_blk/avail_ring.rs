//! The requests the driver has made available: the avail ring's index and
//! entries, read straight in the region that holds them.
//!
//! virtio-queue's `pop_descriptor_chain` reads the avail index again for
//! every chain it pops, each time through vm-memory's general `load`
//! (a region lookup and a slice); the index shares its cache line with the
//! driver, which writes it for every request, so each of those reads
//! waits for the line to come over from the driver's CPU. A round of the
//! queue worker reads the index once with [`AvailCursor::load`] and pops
//! the entries it announced; it reads the index again only when those are
//! used up, as virtio-queue would find the new ones there too.
//!
//! The rules are virtio-queue's: a queue that is not ready, or whose avail
//! ring lies at 0, has nothing to pop; the index is read with acquire
//! ordering before the entries it covers; an entry that cannot be read
//! pops nothing and leaves the queue where it was. In addition, an index
//! more than the queue's size ahead pops nothing (the worker then marks
//! the ring broken, virtio 1.2, 2.7.13.3).

use std::num::Wrapping;
use std::sync::atomic::{AtomicU16, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::hot_mem::HotMem;

/// Bytes before the first entry of the avail ring (flags, idx), and of one
/// entry.
const AVAIL_HEADER: u64 = 4;
const AVAIL_ENTRY: u64 = 2;

/// Reads the little-endian `u16` at `at` with `order`: straight from the
/// mapping when one region holds it aligned, through vm-memory otherwise.
fn load_u16(mem: &HotMem<'_>, at: GuestAddress, order: Ordering) -> Option<u16> {
    match mem.in_one_region(at, 2) {
        Some(host) if (host as usize).is_multiple_of(2) => {
            // SAFETY: two bytes inside one mapped region of the snapshot
            // (which the borrow keeps alive), 2-byte aligned as an
            // AtomicU16 needs; the driver writes them meanwhile, hence the
            // atomic load.
            let v = unsafe { AtomicU16::from_ptr(host.cast::<u16>()) };
            Some(u16::from_le(v.load(order)))
        }
        _ => mem.load::<u16>(at, order).ok().map(u16::from_le),
    }
}

/// The avail index as one round last read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AvailCursor {
    seen: Wrapping<u16>,
}

impl AvailCursor {
    /// Reads the avail index; `None` when the queue has no avail ring yet
    /// or the index cannot be read.
    pub(crate) fn load(q: &Queue, mem: &HotMem<'_>) -> Option<Self> {
        Some(AvailCursor {
            seen: Wrapping(avail_idx(q, mem)?),
        })
    }

    /// Entries the index announced that the queue has not popped.
    pub(crate) fn waiting(&self, q: &Queue) -> u16 {
        (self.seen - Wrapping(q.next_avail())).0
    }

    /// Reads the index again and returns [`AvailCursor::waiting`]; `None`
    /// (and the old reading kept) when it cannot be read.
    pub(crate) fn refresh(&mut self, q: &Queue, mem: &HotMem<'_>) -> Option<u16> {
        self.seen = Wrapping(avail_idx(q, mem)?);
        Some(self.waiting(q))
    }

    /// The head of the next available chain, with the queue moved past it;
    /// the index is read again only when the entries known are used up.
    /// `None` when nothing more is available, when the index claims more
    /// than the queue holds, or when the entry cannot be read.
    pub(crate) fn pop(&mut self, q: &mut Queue, mem: &HotMem<'_>) -> Option<u16> {
        let mut waiting = self.waiting(q);
        if waiting == 0 {
            waiting = self.refresh(q, mem)?;
        }
        if waiting == 0 || waiting > q.size() {
            return None;
        }
        let next = q.next_avail();
        let slot = u64::from(next.checked_rem(q.size())?);
        let at = q
            .avail_ring()
            .checked_add(AVAIL_HEADER + slot * AVAIL_ENTRY)?;
        let head = load_u16(mem, GuestAddress(at), Ordering::Acquire)?;
        q.set_next_avail(next.wrapping_add(1));
        Some(head)
    }
}

/// The driver's avail index, read with acquire ordering so that the
/// entries and descriptors it covers are seen as the driver wrote them.
pub(crate) fn avail_idx(q: &Queue, mem: &HotMem<'_>) -> Option<u16> {
    if !q.ready() || q.avail_ring() == 0 {
        return None;
    }
    let at = q.avail_ring().checked_add(2)?;
    load_u16(mem, GuestAddress(at), Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const QSIZE: u16 = 8;

    // Two regions touch at 0x10000: a ring placed just below it has
    // entries across the boundary.
    use super::super::desc_walk::test_memory as memory;

    fn queue(avail: u64) -> Queue {
        super::super::desc_walk::ready_queue(QSIZE, 0x1000, avail, 0x3000)
    }

    /// The driver publishes `heads` (ring entries from where it left off)
    /// and then moves its index to `idx`.
    fn publish(mem: &GuestMemoryMmap, avail: u64, from: u16, heads: &[u16], idx: u16) {
        for (i, h) in heads.iter().enumerate() {
            let slot = u64::from(from.wrapping_add(i as u16) % QSIZE);
            mem.write_obj(h.to_le(), GuestAddress(avail + AVAIL_HEADER + slot * 2))
                .expect("entry");
        }
        mem.write_obj(idx.to_le(), GuestAddress(avail + 2))
            .expect("idx");
    }

    /// Pops with virtio-queue and with the cursor over the same rings,
    /// the driver adding entries between the pops, across the index's
    /// wrap at 2^16: the same heads in the same order, the same position.
    fn agree(avail: u64, start: u16) {
        let (theirs_mem, ours_mem) = (memory(), memory());
        let (mut theirs, mut ours) = (queue(avail), queue(avail));
        theirs.set_next_avail(start);
        ours.set_next_avail(start);
        let mut idx = start;
        let mut head = 5u16;
        // (entries the driver adds, pops the device tries before the next)
        for (add, pops) in [(1u16, 2usize), (3, 1), (0, 3), (8, 8), (2, 1), (4, 6)] {
            let heads: Vec<u16> = (0..add).map(|i| (head + i * 3) % QSIZE).collect();
            head += add;
            let new_idx = idx.wrapping_add(add);
            for m in [&theirs_mem, &ours_mem] {
                publish(m, avail, idx, &heads, new_idx);
            }
            idx = new_idx;
            let hot = HotMem::new(&ours_mem);
            let mut cursor = AvailCursor::load(&ours, &hot).expect("index");
            for _ in 0..pops {
                let t = theirs
                    .pop_descriptor_chain(&*theirs_mem)
                    .map(|c| c.head_index());
                let o = cursor.pop(&mut ours, &hot);
                assert_eq!(o, t, "avail {avail:#x}, start {start}");
                assert_eq!(ours.next_avail(), theirs.next_avail());
            }
        }
    }

    #[test]
    fn pops_match_virtio_queue() {
        // Inside one region; entries across the boundary; the index itself
        // across it is not possible (2-byte aligned rings), but entries
        // past it are.
        for avail in [0x2000u64, 0xfff8, 0xfffc] {
            for start in [0u16, 65533] {
                agree(avail, start);
            }
        }
    }

    #[test]
    fn entries_added_after_the_load_are_found() {
        let mem = memory();
        let mut q = queue(0x2000);
        publish(&mem, 0x2000, 0, &[3], 1);
        let hot = HotMem::new(&mem);
        let mut cursor = AvailCursor::load(&q, &hot).expect("index");
        assert_eq!(cursor.waiting(&q), 1);
        publish(&mem, 0x2000, 1, &[6], 2);
        assert_eq!(cursor.pop(&mut q, &hot), Some(3));
        assert_eq!(cursor.pop(&mut q, &hot), Some(6));
        assert_eq!(cursor.pop(&mut q, &hot), None);
        assert_eq!(q.next_avail(), 2);
    }

    #[test]
    fn an_index_past_the_queue_size_pops_nothing() {
        let mem = memory();
        let mut q = queue(0x2000);
        publish(&mem, 0x2000, 0, &[1; 8], QSIZE + 1);
        let hot = HotMem::new(&mem);
        let mut cursor = AvailCursor::load(&q, &hot).expect("index");
        assert_eq!(cursor.waiting(&q), QSIZE + 1);
        assert_eq!(cursor.pop(&mut q, &hot), None);
        assert_eq!(q.next_avail(), 0);
    }

    #[test]
    fn a_queue_without_an_avail_ring_has_nothing() {
        let mem = memory();
        let hot = HotMem::new(&mem);
        let q = super::super::desc_walk::ready_queue(QSIZE, 0x1000, 0, 0x3000);
        assert!(AvailCursor::load(&q, &hot).is_none());
        let mut q = queue(0x2000);
        q.set_ready(false);
        assert!(AvailCursor::load(&q, &hot).is_none());
    }

    #[test]
    fn an_unreadable_entry_leaves_the_queue_where_it_was() {
        // The ring's index is in memory, its entries past the end of it.
        let mem = memory();
        let avail = 0x1fffc;
        let mut q = queue(avail);
        mem.write_obj(1u16.to_le(), GuestAddress(avail + 2))
            .expect("idx");
        let hot = HotMem::new(&mem);
        let mut cursor = AvailCursor::load(&q, &hot).expect("index");
        assert_eq!(cursor.pop(&mut q, &hot), None);
        assert_eq!(q.next_avail(), 0);
    }
}
