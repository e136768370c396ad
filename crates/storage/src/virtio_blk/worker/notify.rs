//! Telling the driver: the notification of used buffers, honouring what
//! the driver asked for (EVENT_IDX's `used_event`, or the NO_INTERRUPT
//! flag), and held back briefly for a driver that waits for its answer
//! (`notify_timing`).

use std::sync::atomic::{fence, Ordering};

use log::debug;
use vhost_user_backend::VringState;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::super::avail_ring::avail_idx;
use super::super::clock::now_ns;
use super::super::hot_mem::HotMem;
use super::super::metrics::BlkMetrics;
use super::{Mem, QueueWorker};

impl QueueWorker {
    /// Notifies the driver if it asked for it; returns whether it did.
    pub(super) fn notify(
        &mut self,
        vring: &mut VringState<Mem>,
        mem: &HotMem<'_>,
        event_idx: bool,
    ) -> bool {
        // The answers become visible first, whether or not the driver
        // wants to hear of them (it may poll).
        if let Err(e) = self.order.publish_idx(vring.get_queue(), mem) {
            self.mark_broken(&format!("used index: {e}"));
            return false;
        }
        // Without EVENT_IDX the driver may ask for no interrupts
        // (VRING_AVAIL_F_NO_INTERRUPT) while it works through the used
        // ring. The used index is visible before the flag is read (the
        // driver clears the flag, then looks at the used index, before it
        // sleeps), and a notification the flag held back is owed: the
        // flag is read again each round while the worker polls. A driver
        // that clears the flag and reads the used index without a barrier
        // between them (libblkio's virtio-driver 0.6) could otherwise
        // miss the answer and sleep for good.
        self.owed = false;
        if !event_idx {
            fence(Ordering::SeqCst);
            let flags: u16 = mem
                .read_obj(GuestAddress(vring.get_queue().avail_ring()))
                .unwrap_or(0);
            let polls = flags & 1 != 0;
            self.order.set_driver_polls(polls);
            self.owed = polls;
            if polls {
                return false;
            }
        }
        if !self.order.needs_notification(vring.get_queue(), mem) {
            return false;
        }
        BlkMetrics::inc(&self.metrics.notifications);
        self.hold_notification(vring, mem);
        super::super::crash_point::before_signal();
        if let Err(e) = vring.signal_used_queue() {
            debug!("signal_used_queue: {e}");
        }
        true
    }

    /// Holds the notification back for the time the queue's timing
    /// (`notify_timing`) picks when the driver waits for this answer:
    /// nothing else in flight or held back, nothing more in its ring. A
    /// request arriving meanwhile ends the hold.
    fn hold_notification(&mut self, vring: &VringState<Mem>, mem: &HotMem<'_>) {
        if self.inflight != 0 || self.pending.is_some() {
            return;
        }
        let q = vring.get_queue();
        let next = q.next_avail();
        if avail_idx(q, mem) != Some(next) {
            return;
        }
        let ready = now_ns();
        let hold = self.timing.hold(ready);
        if hold == 0 {
            return;
        }
        loop {
            std::hint::spin_loop();
            let held = now_ns().saturating_sub(ready);
            if held >= hold || avail_idx(q, mem) != Some(next) {
                BlkMetrics::inc(&self.metrics.held_notifications);
                BlkMetrics::add(&self.metrics.held_ns, held);
                return;
            }
        }
    }
}
