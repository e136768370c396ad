//! Completions reach the used ring in the order their requests left the
//! avail ring.
//!
//! The device may finish requests out of order (io_uring does), but a
//! frontend that loses its backend without a goodbye (the card was killed)
//! cannot ask where the backend stood: QEMU then restarts the ring at the
//! used index it finds in guest memory, and the next backend takes every
//! request from there again. That is exact only when the used ring holds a
//! prefix of what was taken: every request before the used index answered,
//! none after it. Publishing in order keeps it so, and a request that a
//! crash interrupted is taken again, once, by the next process (a write of
//! the same data to the same place; the guest never saw it complete).
//!
//! Devices that complete in order (memory, most single-queue files) never
//! hold anything back.
//!
//! A frontend with an inflight region ([`super::inflight`]) also tells the
//! next process which requests were taken; in this order they are always
//! the ones just after the used index, which the next process checks.

use std::collections::VecDeque;

use vhost_user_backend::VringState;
use virtio_queue::{Queue, QueueT};

use super::device::Mem;
use super::hot_mem::HotMem;
use super::inflight::InflightQueue;
use super::used_ring::UsedRing;

/// Place of a request in the order it was taken from the ring.
pub(crate) type Seq = u64;

/// Requests taken and not yet published, oldest first.
#[derive(Debug, Default)]
pub(crate) struct UsedOrder {
    /// Sequence number of the front entry.
    base: Seq,
    /// `Some((head, used length))` once the request is answered.
    waiting: VecDeque<Option<(u16, u32)>>,
    /// The used ring's writer, and the answers the driver has not been
    /// asked about yet.
    ring: UsedRing,
}

impl UsedOrder {
    /// Records that a request was taken from the avail ring; returns its
    /// place.
    pub(crate) fn take(&mut self) -> Seq {
        let seq = self.base + self.waiting.len() as u64;
        self.waiting.push_back(None);
        seq
    }

    /// Marks request `seq` answered, then hands every answered request at
    /// the front to `publish`, in order. Returns whether any was published.
    pub(crate) fn answer(
        &mut self,
        seq: Seq,
        head: u16,
        len: u32,
        mut publish: impl FnMut(u16, u32),
    ) -> bool {
        let at = seq
            .checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok());
        match at.and_then(|i| self.waiting.get_mut(i)) {
            Some(slot @ None) => *slot = Some((head, len)),
            // Not taken, or answered twice: a bug of ours, never the
            // guest's; publishing it would corrupt the ring.
            _ => {
                log::error!("request {seq} answered out of turn; not published");
                return false;
            }
        }
        let mut any = false;
        while let Some(Some((head, len))) = self.waiting.front().copied() {
            publish(head, len);
            self.waiting.pop_front();
            self.base += 1;
            any = true;
        }
        any
    }

    /// [`UsedOrder::answer`] onto `vring`'s used ring, recording each
    /// entry in the frontend's inflight `region` around it.
    pub(crate) fn publish(
        &mut self,
        vring: &mut VringState<Mem>,
        mem: &HotMem<'_>,
        region: Option<&InflightQueue>,
        seq: Seq,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        let mut error = None;
        let mut ring = std::mem::take(&mut self.ring);
        self.answer(seq, head, len, |head, len| {
            if error.is_some() {
                return;
            }
            if let Some(r) = region {
                r.publishing(head);
            }
            // A driver that waits for notifications picks answers up while
            // it works, so each goes out at once; for one that polls, the
            // index moves once for all in [`UsedOrder::publish_idx`] (a
            // store per answer costs the ring's cache line a trip between
            // the two CPUs each time). With a region, its record of the
            // used index must follow the ring's answer by answer
            // (`InflightQueue::restore` recognises a crash between the two
            // by a difference of one).
            let at_once = region.is_some() || !ring.driver_polls();
            match ring.add(vring.get_queue_mut(), mem, head, len, at_once) {
                Ok(()) => {
                    if let Some(r) = region {
                        r.published(head, vring.get_queue().next_used());
                    }
                }
                Err(e) => error = Some(e),
            }
        });
        self.ring = ring;
        error.map_or(Ok(()), Err)
    }

    /// Moves the used index past the answers put on the ring (before the
    /// driver is told, and whenever the worker leaves the ring).
    pub(crate) fn publish_idx(
        &mut self,
        q: &Queue,
        mem: &HotMem<'_>,
    ) -> Result<(), virtio_queue::Error> {
        self.ring.publish(q, mem)
    }

    /// Records whether the driver asked for no notifications
    /// (NO_INTERRUPT, without EVENT_IDX).
    pub(crate) fn set_driver_polls(&mut self, yes: bool) {
        self.ring.set_driver_polls(yes);
    }

    /// Requests taken and not yet published.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Forgets what is waiting (the ring is gone or restarts).
    pub(crate) fn clear(&mut self) {
        self.base += self.waiting.len() as u64;
        self.waiting.clear();
        self.ring.reset();
    }

    /// Whether the driver asked to hear of the answers published since
    /// the last call ([`UsedRing::needs_notification`]).
    pub(crate) fn needs_notification(&mut self, q: &Queue, mem: &HotMem<'_>) -> bool {
        self.ring.needs_notification(q, mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_out_of_order_are_published_in_order() {
        let mut o = UsedOrder::default();
        let seqs: Vec<Seq> = (0..4).map(|_| o.take()).collect();
        let mut out = Vec::new();
        // The third and second finish first: nothing goes out.
        assert!(!o.answer(seqs[2], 12, 1, |h, l| out.push((h, l))));
        assert!(!o.answer(seqs[1], 11, 1, |h, l| out.push((h, l))));
        assert!(out.is_empty());
        // The first releases the three.
        assert!(o.answer(seqs[0], 10, 513, |h, l| out.push((h, l))));
        assert_eq!(out, vec![(10, 513), (11, 1), (12, 1)]);
        assert_eq!(o.len(), 1);
        assert!(o.answer(seqs[3], 13, 1, |h, l| out.push((h, l))));
        assert_eq!(out.last(), Some(&(13, 1)));
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn clearing_starts_a_fresh_order() {
        let mut o = UsedOrder::default();
        let old = o.take();
        o.take();
        o.clear();
        let new = o.take();
        assert!(new > old);
        let mut out = Vec::new();
        assert!(o.answer(new, 7, 1, |h, l| out.push((h, l))));
        assert_eq!(out, vec![(7, 1)]);
    }
}
