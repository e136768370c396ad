//! Throttling: token buckets for IOPS and bytes per second, with a burst
//! allowance, in exact integer arithmetic.
//!
//! A bucket holds *nano-tokens* (10⁻⁹ token). Refilling over `dt`
//! nanoseconds at `rate` tokens per second adds exactly `dt × rate`
//! nano-tokens, so there is no rounding and no drift however often it is
//! refilled. A request may take the bucket into debt (a request larger than
//! the burst still goes through once the bucket is full); the debt is paid
//! back by later refills, so the long-run rate is exact.

use serde::{Deserialize, Serialize};

const NANO: i128 = 1_000_000_000;

/// One token bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Nano-tokens; negative while in debt.
    level: i128,
    /// Time of the last refill, in nanoseconds of the caller's clock.
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket refilling at `rate` tokens per second up to `burst`
    /// tokens (at least one token, and at least `rate / 10` when zero is
    /// given). `rate` must be positive.
    pub fn new(rate: u64, burst: u64, now_ns: u64) -> Self {
        assert!(rate > 0, "a token bucket needs a positive rate");
        let burst = if burst == 0 {
            (rate / 10).max(1)
        } else {
            burst
        };
        TokenBucket {
            rate,
            burst,
            level: i128::from(burst) * NANO,
            last_ns: now_ns,
        }
    }

    /// Tokens per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Burst allowance in tokens.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    fn refill(&mut self, now_ns: u64) {
        // A clock that goes backwards adds nothing.
        let dt = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        let cap = i128::from(self.burst) * NANO;
        let added = i128::from(dt).saturating_mul(i128::from(self.rate));
        self.level = self.level.saturating_add(added).min(cap);
    }

    /// Takes `cost` tokens if the bucket is not in debt and holds at least
    /// `min(cost, burst)` tokens; otherwise returns how many nanoseconds to
    /// wait before asking again.
    pub fn take(&mut self, cost: u64, now_ns: u64) -> Result<(), u64> {
        self.refill(now_ns);
        let need = i128::from(cost.min(self.burst)) * NANO;
        if self.level >= need {
            self.level = self.level.saturating_sub(i128::from(cost) * NANO);
            return Ok(());
        }
        let missing = need - self.level;
        let rate = i128::from(self.rate);
        let wait = missing.saturating_add(rate - 1) / rate;
        Err(u64::try_from(wait).unwrap_or(u64::MAX).max(1))
    }

    /// Tokens available now (negative in debt), rounded down.
    pub fn available(&mut self, now_ns: u64) -> i64 {
        self.refill(now_ns);
        i64::try_from(self.level.div_euclid(NANO)).unwrap_or(i64::MIN)
    }
}

/// Limits of one interface; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosLimits {
    /// Requests per second.
    #[serde(default)]
    pub iops: Option<u64>,
    /// Burst in requests (default: a tenth of a second's worth).
    #[serde(default)]
    pub iops_burst: Option<u64>,
    /// Data bytes per second (reads and writes).
    #[serde(default)]
    pub bytes_per_sec: Option<u64>,
    /// Burst in bytes (default: a tenth of a second's worth).
    #[serde(default)]
    pub bytes_burst: Option<u64>,
    /// Weight in the fair sharing of the device's queue (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
}

/// Why limits were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QosError {
    /// A limit of zero would stop the volume forever.
    #[error("{0} must be positive (leave it out for no limit)")]
    Zero(&'static str),
    /// A burst without its limit.
    #[error("{0} given without its limit")]
    BurstWithoutLimit(&'static str),
}

impl QosLimits {
    /// Checks the limits make sense.
    pub fn validate(&self) -> Result<(), QosError> {
        if self.iops == Some(0) {
            return Err(QosError::Zero("iops"));
        }
        if self.bytes_per_sec == Some(0) {
            return Err(QosError::Zero("bytes_per_sec"));
        }
        if self.iops.is_none() && self.iops_burst.is_some() {
            return Err(QosError::BurstWithoutLimit("iops_burst"));
        }
        if self.bytes_per_sec.is_none() && self.bytes_burst.is_some() {
            return Err(QosError::BurstWithoutLimit("bytes_burst"));
        }
        if self.weight == Some(0) {
            return Err(QosError::Zero("weight"));
        }
        Ok(())
    }

    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.iops.is_some() || self.bytes_per_sec.is_some()
    }
}

/// The buckets of one interface, shared by its queues.
#[derive(Debug, Clone, Default)]
pub struct Throttle {
    limits: QosLimits,
    iops: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl Throttle {
    /// Buckets for `limits`, full.
    pub fn new(limits: QosLimits, now_ns: u64) -> Self {
        Throttle {
            limits,
            iops: limits
                .iops
                .map(|r| TokenBucket::new(r, limits.iops_burst.unwrap_or(0), now_ns)),
            bytes: limits
                .bytes_per_sec
                .map(|r| TokenBucket::new(r, limits.bytes_burst.unwrap_or(0), now_ns)),
        }
    }

    /// Current limits.
    pub fn limits(&self) -> QosLimits {
        self.limits
    }

    /// Admits one request of `bytes` data bytes, or says how long to wait.
    /// Both buckets must admit it; neither is charged otherwise.
    pub fn admit(&mut self, bytes: u64, now_ns: u64) -> Result<(), u64> {
        let mut wait = 0u64;
        if let Some(b) = &mut self.iops {
            b.refill(now_ns);
            if b.level < NANO {
                wait = wait.max(b.take(1, now_ns).err().unwrap_or(1));
            }
        }
        if let Some(b) = &mut self.bytes {
            b.refill(now_ns);
            let need = i128::from(bytes.min(b.burst)) * NANO;
            if b.level < need {
                wait = wait.max(b.take(bytes, now_ns).err().unwrap_or(1));
            }
        }
        if wait > 0 {
            return Err(wait);
        }
        if let Some(b) = &mut self.iops {
            let taken = b.take(1, now_ns);
            debug_assert!(taken.is_ok());
        }
        if let Some(b) = &mut self.bytes {
            let taken = b.take(bytes, now_ns);
            debug_assert!(taken.is_ok());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn starts_full_and_refills_at_the_rate() {
        let mut b = TokenBucket::new(1000, 10, 0);
        for _ in 0..10 {
            assert!(b.take(1, 0).is_ok());
        }
        assert_eq!(b.take(1, 0), Err(1_000_000));
        assert!(b.take(1, 1_000_000).is_ok());
        assert!(b.take(1, 1_000_000).is_err());
    }

    #[test]
    fn large_requests_go_into_debt_and_pay_it_back() {
        let mut b = TokenBucket::new(100, 10, 0);
        assert!(b.take(50, 0).is_ok()); // full bucket admits a big one
        assert_eq!(b.available(0), -40);
        // 0.4 s to pay the debt, then 0.01 s for the next token.
        assert_eq!(b.take(1, 0), Err(410_000_000));
        assert!(b.take(1, 410_000_000).is_ok());
    }

    #[test]
    fn clock_going_backwards_adds_nothing() {
        let mut b = TokenBucket::new(1000, 1, 5_000_000);
        assert!(b.take(1, 5_000_000).is_ok());
        assert!(b.take(1, 1_000_000).is_err());
        assert!(b.take(1, 6_000_000).is_ok());
    }

    #[test]
    fn throttle_charges_neither_bucket_when_one_refuses() {
        let limits = QosLimits {
            iops: Some(1000),
            iops_burst: Some(100),
            bytes_per_sec: Some(4096),
            bytes_burst: Some(4096),
            weight: None,
        };
        let mut t = Throttle::new(limits, 0);
        assert!(t.admit(4096, 0).is_ok());
        assert_eq!(t.admit(4096, 0), Err(1_000_000_000));
        assert_eq!(t.iops.as_mut().unwrap().available(0), 99);
    }

    #[test]
    fn validation() {
        assert!(QosLimits {
            iops: Some(0),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(QosLimits {
            iops_burst: Some(5),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(QosLimits::default().validate().is_ok());
    }

    proptest! {
        /// Over any schedule of requests, what a bucket admits never
        /// exceeds burst + rate × elapsed, and a greedy client that asks
        /// exactly when told gets the full rate (within one request).
        #[test]
        fn admitted_work_is_exact_over_time(
            rate in 1u64..10_000_000,
            burst in 1u64..1_000_000,
            costs in proptest::collection::vec(1u64..100_000, 1..400),
        ) {
            let mut b = TokenBucket::new(rate, burst, 0);
            let mut now = 0u64;
            let mut admitted: u128 = 0;
            for cost in costs {
                loop {
                    match b.take(cost, now) {
                        Ok(()) => { admitted += u128::from(cost); break; }
                        Err(wait) => { prop_assert!(wait > 0); now = now.checked_add(wait).unwrap(); }
                    }
                }
                // Upper bound: burst + refill, plus the debt of the last request.
                let bound = u128::from(burst) + u128::from(now) * u128::from(rate) / 1_000_000_000 + u128::from(cost);
                prop_assert!(admitted <= bound, "admitted {} > bound {}", admitted, bound);
            }
            // Lower bound: a greedy client is never held back by more than
            // rounding of one wait (1 ns) per request plus one burst.
            let earned = u128::from(now) * u128::from(rate) / 1_000_000_000;
            prop_assert!(admitted + u128::from(burst) + 1 >= earned, "admitted {} earned {}", admitted, earned);
        }

        #[test]
        fn no_overflow_at_extremes(rate in 1u64..=u64::MAX, burst in 1u64..=u64::MAX, t in 0u64..=u64::MAX, cost in 0u64..=u64::MAX) {
            let mut b = TokenBucket::new(rate, burst, 0);
            let _ = b.take(cost, t);
            let _ = b.take(cost, t);
            let _ = b.available(u64::MAX);
        }
    }
}

/// Fair sharing of one physical device's queue between the volumes on it.
///
/// A volume alone on the device is never held back. While several volumes
/// are active (a request in flight, or one within the last
/// [`ACTIVE_WINDOW`]), each may have at most its weight's share of `depth`
/// requests in flight (`depth × weight / Σ active weights`, at least one;
/// weights default to 1), so a volume flooding the device keeps the device
/// queue short for the others instead of filling it. Requests over
/// the cap wait in their own ring until one of the volume's requests
/// completes; they never fail.
#[derive(Debug)]
pub struct DeviceShare {
    depth: u32,
    epoch: std::time::Instant,
    slots: std::sync::RwLock<Vec<std::sync::Weak<ShareSlot>>>,
}

/// How long after its last request a volume still counts as active.
pub const ACTIVE_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

/// One volume's place in a [`DeviceShare`].
#[derive(Debug, Default)]
pub struct ShareSlot {
    inflight: std::sync::atomic::AtomicU32,
    last_ns: std::sync::atomic::AtomicU64,
    /// Relative share while volumes compete (0 counts as 1).
    weight: std::sync::atomic::AtomicU32,
}

impl ShareSlot {
    /// Sets the volume's weight (at least 1).
    pub fn set_weight(&self, w: u32) {
        self.weight
            .store(w.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    fn weight(&self) -> u32 {
        self.weight
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1)
    }
}

impl DeviceShare {
    /// A share of `depth` requests in flight (0: no sharing).
    pub fn new(depth: u32) -> Self {
        DeviceShare {
            depth,
            epoch: std::time::Instant::now(),
            slots: std::sync::RwLock::new(Vec::new()),
        }
    }

    /// The depth budget.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Adds a volume; it leaves when the returned slot is dropped.
    pub fn register(&self) -> std::sync::Arc<ShareSlot> {
        let slot = std::sync::Arc::new(ShareSlot::default());
        let mut v = self.slots.write().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(std::sync::Arc::downgrade(&slot));
        slot
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether `slot` may start one more request now; counts it if so.
    pub fn try_start(&self, slot: &ShareSlot) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.depth == 0 {
            return true;
        }
        // Zero means "never active".
        let now = self.now_ns().max(1);
        slot.last_ns.store(now, Relaxed);
        let window = u64::try_from(ACTIVE_WINDOW.as_nanos()).unwrap_or(u64::MAX);
        let (active, weights) = {
            let v = self.slots.read().unwrap_or_else(|e| e.into_inner());
            v.iter()
                .filter_map(std::sync::Weak::upgrade)
                .filter(|s| {
                    let last = s.last_ns.load(Relaxed);
                    s.inflight.load(Relaxed) > 0 || (last != 0 && now.saturating_sub(last) < window)
                })
                .fold((0u32, 0u64), |(n, w), s| (n + 1, w + u64::from(s.weight())))
        };
        if active <= 1 {
            // Alone on the device: no reason to hold anything back.
            slot.inflight.fetch_add(1, Relaxed);
            return true;
        }
        // The volume's share of the depth, by weight.
        let share = u64::from(self.depth) * u64::from(slot.weight()) / weights.max(1);
        let cap = u32::try_from(share).unwrap_or(u32::MAX).max(1);
        if slot.inflight.load(Relaxed) >= cap {
            return false;
        }
        slot.inflight.fetch_add(1, Relaxed);
        true
    }

    /// Counts a request that must start regardless (draining a queue).
    pub fn force_start(&self, slot: &ShareSlot) {
        if self.depth > 0 {
            slot.inflight
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A request of `slot` completed.
    pub fn done(&self, slot: &ShareSlot) {
        if self.depth > 0 {
            slot.inflight
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod share_tests {
    use super::*;

    #[test]
    fn alone_gets_the_budget_and_neighbours_split_it() {
        let share = DeviceShare::new(8);
        let a = share.register();
        let b = share.register();
        // b has never been active: a alone is not held back.
        for _ in 0..8 {
            assert!(share.try_start(&a));
        }
        // b becomes active: it gets in, and a may not add more until it
        // is back under its half.
        assert!(share.try_start(&b));
        for _ in 0..4 {
            share.done(&a);
            assert!(!share.try_start(&a), "a over its half");
        }
        share.done(&a);
        assert!(share.try_start(&a));
        drop(b);
    }

    #[test]
    fn weights_split_the_depth() {
        let share = DeviceShare::new(8);
        let heavy = share.register();
        let light = share.register();
        heavy.set_weight(3);
        assert!(share.try_start(&light)); // light is active now
        let mut n = 0;
        while share.try_start(&heavy) {
            n += 1;
        }
        assert_eq!(n, 6, "8 x 3/4");
        // light may have 8 x 1/4 = 2 in flight.
        assert!(share.try_start(&light));
        assert!(!share.try_start(&light));
    }

    #[test]
    fn zero_depth_never_holds_back() {
        let share = DeviceShare::new(0);
        let a = share.register();
        for _ in 0..10_000 {
            assert!(share.try_start(&a));
        }
    }
}
