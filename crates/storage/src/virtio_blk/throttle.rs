//! The token buckets of one interface, shared by its queues (and by an
//! NBD export's connections): a request that is over the limits waits,
//! off the ring, until its tokens are there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::qos::{QosError, QosLimits, ShareSlot, Throttle};

/// Throttling state shared by the queues of one interface.
#[derive(Debug)]
pub(crate) struct SharedThrottle {
    epoch: Instant,
    limited: AtomicBool,
    buckets: Mutex<Throttle>,
}

impl SharedThrottle {
    pub(crate) fn new(limits: QosLimits) -> Self {
        let t = SharedThrottle {
            epoch: Instant::now(),
            limited: AtomicBool::new(false),
            buckets: Mutex::new(Throttle::default()),
        };
        t.set(limits);
        t
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Validates and applies an interface's new limits: the buckets (which
    /// start full) and the volume's weight in its device share.
    pub(crate) fn apply(&self, slot: &ShareSlot, qos: QosLimits) -> Result<(), QosError> {
        qos.validate()?;
        self.set(qos);
        slot.set_weight(qos.weight.unwrap_or(1));
        Ok(())
    }

    /// Replaces the limits; the new buckets start full.
    pub(crate) fn set(&self, limits: QosLimits) {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        *b = Throttle::new(limits, self.now_ns());
        self.limited.store(limits.is_limited(), Ordering::Release);
    }

    pub(crate) fn limits(&self) -> QosLimits {
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .limits()
    }

    /// Admits a request of `bytes` data bytes or says how many nanoseconds
    /// to wait.
    pub(crate) fn admit(&self, bytes: u64) -> Result<(), u64> {
        if !self.limited.load(Ordering::Acquire) {
            return Ok(());
        }
        let now = self.now_ns();
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(bytes, now)
    }
}
