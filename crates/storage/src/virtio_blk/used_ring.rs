//! Answers onto the used ring, and whether the driver wants to hear of
//! them: virtio-queue's `add_used` and `needs_notification`, with the
//! ring's few bytes read and written straight in the region that holds
//! them (through vm-memory's general path the two were 13 % of the queue
//! worker on `null` 4k reads, `perf`, 2026-12-06).
//!
//! The rules are virtio-queue's, step for step: an element for a head
//! past the queue's size is refused; the element is written before the
//! used index, which is stored with release ordering; with EVENT_IDX the
//! driver is notified when `used_event` lies among the answers added since
//! the last check (virtio 1.2, 2.7.10), and without it always (the
//! worker honours the driver's NO_INTERRUPT flag itself). A ring outside
//! one region, or not aligned, takes vm-memory's path as before.

use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use virtio_queue::{Error, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::hot_mem::HotMem;

/// Bytes before the first element of the used ring (flags, idx), and of
/// one element (id, len).
const USED_HEADER: u64 = 4;
const USED_ELEMENT: u64 = 8;
/// Bytes before the first entry of the avail ring, and of one entry.
const AVAIL_HEADER: u64 = 4;
const AVAIL_ENTRY: u64 = 2;

/// The answers added since the driver's wishes were last checked.
#[derive(Debug, Default)]
pub(crate) struct UsedRing {
    added: Wrapping<u16>,
    /// Elements are on the ring that the used index does not cover yet.
    unpublished: bool,
    /// The driver has stopped listening for notifications: it polls.
    driver_polls: bool,
}

impl UsedRing {
    /// Puts `head` with `len` bytes written on the used ring; with
    /// `publish`, moves the used index past it, otherwise leaves that to
    /// [`UsedRing::publish`].
    pub(crate) fn add(
        &mut self,
        q: &mut Queue,
        mem: &HotMem<'_>,
        head: u16,
        len: u32,
        publish: bool,
    ) -> Result<(), Error> {
        if head >= q.size() {
            log::error!("attempted to add out of bounds descriptor to used ring: {head}");
            return Err(Error::InvalidDescriptorIndex);
        }
        let ring = GuestAddress(q.used_ring());
        let slot = u64::from(q.next_used() % q.size());
        let at = ring
            .0
            .checked_add(USED_HEADER + slot * USED_ELEMENT)
            .map(GuestAddress)
            .ok_or(Error::AddressOverflow)?;
        match mem.in_one_region(at, USED_ELEMENT as usize) {
            Some(host) if (host as usize).is_multiple_of(4) => {
                // SAFETY: 8 bytes inside one mapped region of the snapshot
                // (which the borrow keeps alive), 4-byte aligned; volatile,
                // as the driver reads them meanwhile.
                unsafe {
                    host.cast::<u32>().write_volatile(u32::from(head).to_le());
                    host.cast::<u32>().add(1).write_volatile(len.to_le());
                }
            }
            _ => {
                mem.write_obj(u32::from(head).to_le(), at)
                    .map_err(Error::GuestMemory)?;
                let len_at = at.0.checked_add(4).ok_or(Error::AddressOverflow)?;
                mem.write_obj(len.to_le(), GuestAddress(len_at))
                    .map_err(Error::GuestMemory)?;
            }
        }
        q.set_next_used(q.next_used().wrapping_add(1));
        self.added += Wrapping(1);
        self.unpublished = true;
        if publish {
            self.publish(q, mem)
        } else {
            Ok(())
        }
    }

    /// Moves the used index past every element added (one store, with
    /// release ordering, for all of them).
    pub(crate) fn publish(&mut self, q: &Queue, mem: &HotMem<'_>) -> Result<(), Error> {
        if !std::mem::take(&mut self.unpublished) {
            return Ok(());
        }
        let next = q.next_used();
        let idx_at = q.used_ring().checked_add(2).ok_or(Error::AddressOverflow)?;
        match mem.in_one_region(GuestAddress(idx_at), 2) {
            Some(host) if (host as usize).is_multiple_of(2) => {
                // SAFETY: two bytes inside one mapped region, 2-byte
                // aligned, as an AtomicU16 needs; the mapping outlives the
                // borrow of the snapshot.
                let idx = unsafe { AtomicU16::from_ptr(host.cast::<u16>()) };
                idx.store(next.to_le(), Ordering::Release);
                Ok(())
            }
            _ => mem
                .store(next.to_le(), GuestAddress(idx_at), Ordering::Release)
                .map_err(Error::GuestMemory),
        }
    }

    /// Whether the driver asked to hear of the answers added since the
    /// last call (an unreadable `used_event`: yes). EVENT_IDX is the
    /// queue's own setting, as in virtio-queue.
    pub(crate) fn needs_notification(&mut self, q: &Queue, mem: &HotMem<'_>) -> bool {
        let added = std::mem::take(&mut self.added);
        if !q.event_idx_enabled() {
            return true;
        }
        // The answers are visible before `used_event` is read.
        fence(Ordering::SeqCst);
        let Some(at) = q
            .avail_ring()
            .checked_add(AVAIL_HEADER + u64::from(q.size()) * AVAIL_ENTRY)
        else {
            return true;
        };
        let event = match mem.in_one_region(GuestAddress(at), 2) {
            Some(host) if (host as usize).is_multiple_of(2) => {
                // SAFETY: as in `add`.
                let v = unsafe { AtomicU16::from_ptr(host.cast::<u16>()) };
                u16::from_le(v.load(Ordering::Relaxed))
            }
            _ => match mem.load::<u16>(GuestAddress(at), Ordering::Relaxed) {
                Ok(v) => u16::from_le(v),
                Err(_) => return true,
            },
        };
        let new = Wrapping(q.next_used());
        // A driver that listens keeps `used_event` at most a ring's worth
        // behind (it cannot have more answers waiting); one left further
        // behind belongs to a driver that polls.
        self.driver_polls = (new - Wrapping(event)).0 > q.size();
        let old = new - added;
        new - Wrapping(event) - Wrapping(1) < new - old
    }

    /// Whether the driver polls the used ring rather than waiting for
    /// notifications, as its last `used_event` (EVENT_IDX) or its
    /// NO_INTERRUPT flag ([`UsedRing::set_driver_polls`]) said.
    pub(crate) fn driver_polls(&self) -> bool {
        self.driver_polls
    }

    /// Records the driver's NO_INTERRUPT flag (without EVENT_IDX).
    pub(crate) fn set_driver_polls(&mut self, yes: bool) {
        self.driver_polls = yes;
    }

    /// Forgets the answers counted (the queue starts afresh).
    pub(crate) fn reset(&mut self) {
        self.added = Wrapping(0);
        self.unpublished = false;
        self.driver_polls = false;
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const QSIZE: u16 = 8;
    const AVAIL: u64 = 0x2000;

    // Two regions touch at 0x10000: a ring placed just below it has
    // entries across the boundary.
    use super::super::desc_walk::test_memory as memory;

    fn queue(used: u64, event_idx: bool) -> Queue {
        let mut q = super::super::desc_walk::ready_queue(QSIZE, 0x1000, AVAIL, used);
        q.set_event_idx(event_idx);
        q
    }

    fn used_bytes(mem: &GuestMemoryMmap, used: u64) -> Vec<u8> {
        let mut b = vec![0u8; (USED_HEADER + u64::from(QSIZE) * USED_ELEMENT) as usize];
        mem.read_slice(&mut b, GuestAddress(used))
            .expect("used ring");
        b
    }

    /// Drives virtio-queue's add_used/needs_notification and ours with the
    /// same answers and `used_event` values; the rings' bytes, the used
    /// indices and every notification decision must agree. `batched`: the
    /// used index is published once before each check, not per answer.
    fn agree(used: u64, event_idx: bool, batched: bool) {
        let (theirs_mem, ours_mem) = (memory(), memory());
        let (mut theirs, mut ours) = (queue(used, event_idx), queue(used, event_idx));
        let mut ring = UsedRing::default();
        let event_at = GuestAddress(AVAIL + AVAIL_HEADER + u64::from(QSIZE) * AVAIL_ENTRY);
        // (answers before the check, the driver's used_event then)
        let rounds = [
            (1u16, 0u16),
            (3, 0),
            (2, 5),
            (4, 6),
            (1, 11),
            (5, 9),
            (20, 30),
            (1, 40),
        ];
        let mut head = 0u16;
        for (n, event) in rounds {
            for _ in 0..n {
                let len = u32::from(head) * 512 + 1;
                let t = theirs.add_used(&*theirs_mem, head % QSIZE, len);
                let hot = HotMem::new(&ours_mem);
                let o = ring.add(&mut ours, &hot, head % QSIZE, len, !batched);
                assert_eq!(t.is_ok(), o.is_ok());
                head = head.wrapping_add(3);
            }
            if batched {
                // Nothing is visible to the driver until the index moves.
                let idx: u16 = ours_mem.read_obj(GuestAddress(used + 2)).expect("used idx");
                assert_eq!(idx, ours.next_used().wrapping_sub(n));
                let hot = HotMem::new(&ours_mem);
                ring.publish(&ours, &hot).expect("publish");
            }
            for m in [&theirs_mem, &ours_mem] {
                m.write_obj(event.to_le(), event_at).expect("used_event");
            }
            let want = theirs.needs_notification(&*theirs_mem).expect("check");
            let hot = HotMem::new(&ours_mem);
            assert_eq!(
                ring.needs_notification(&ours, &hot),
                want,
                "after {n} answers, used_event {event}, used {used:#x}, event_idx {event_idx}"
            );
            assert_eq!(ours.next_used(), theirs.next_used());
            assert_eq!(used_bytes(&ours_mem, used), used_bytes(&theirs_mem, used));
        }
    }

    #[test]
    fn answers_and_notifications_match_virtio_queue() {
        // Inside one region; across the boundary (elements, then the index).
        for used in [0x3000u64, 0xfff0, 0xfffc] {
            for batched in [false, true] {
                agree(used, true, batched);
                agree(used, false, batched);
            }
        }
    }

    #[test]
    fn a_driver_that_leaves_used_event_behind_is_taken_to_poll() {
        let mem = memory();
        let used = 0x3000;
        let mut q = queue(used, true);
        let mut ring = UsedRing::default();
        let event_at = GuestAddress(AVAIL + AVAIL_HEADER + u64::from(QSIZE) * AVAIL_ENTRY);
        let hot = HotMem::new(&mem);
        // The driver listens: `used_event` follows what it has read.
        for i in 0..QSIZE {
            ring.add(&mut q, &hot, i, 1, true).expect("add");
            mem.write_obj(q.next_used().to_le(), event_at)
                .expect("used_event");
            ring.needs_notification(&q, &hot);
            assert!(!ring.driver_polls());
        }
        // It stops moving `used_event`: once more than a ring's worth of
        // answers lie past it, the driver polls.
        for i in 0..=QSIZE {
            ring.add(&mut q, &hot, i % QSIZE, 1, true).expect("add");
            ring.needs_notification(&q, &hot);
            assert_eq!(ring.driver_polls(), i == QSIZE, "after {} more", i + 1);
        }
        // It listens again.
        mem.write_obj(q.next_used().to_le(), event_at)
            .expect("used_event");
        ring.needs_notification(&q, &hot);
        assert!(!ring.driver_polls());
    }

    #[test]
    fn a_head_past_the_queue_is_refused() {
        let mem = memory();
        let mut q = queue(0x3000, true);
        let hot = HotMem::new(&mem);
        let mut ring = UsedRing::default();
        assert!(matches!(
            ring.add(&mut q, &hot, QSIZE, 1, true),
            Err(Error::InvalidDescriptorIndex)
        ));
        assert_eq!(q.next_used(), 0);
    }
}
