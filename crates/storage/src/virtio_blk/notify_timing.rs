//! When to wake a driver that waits for its answer.
//!
//! A driver with nothing else outstanding sleeps until the card's
//! notification (an eventfd write) wakes it, and what that wake-up costs
//! depends on when it lands, not only on how soon. In a VM whose idle vCPUs
//! halt, a notification that arrives while the driver's vCPU is on its way
//! into the halt is the slowest of all: on this project's machines a 4 KiB
//! `ram` read at queue depth 1 answered at once gave 50-60k I/Os a second,
//! the same answer held back 1 us 68-78k (`softcard bench storage`,
//! docs/benchmarks.md, sessions 15 and 16), while an answer fast enough
//! to land before the driver sleeps (`null`) is best sent at once. Network
//! cards face the same trade with their interrupt moderation, and tune it
//! by measuring (Linux's "dynamic interrupt moderation").
//!
//! So each queue measures. For an answer the driver waits for (nothing
//! else in flight, nothing left in its ring) the notification is held for
//! one of [`HOLD_NS`]: while probing, each in turn; the time from the
//! answer being ready to the driver's next request (the hold included) is
//! that choice's sample. Each hold is tried for runs of answers (the cost
//! of a wake-up depends on the wake-ups before it); after a probe (two
//! runs of each) the fastest on average is kept for [`SETTLED_ANSWERS`]
//! answers, then the queue probes again, so it follows a driver or a host
//! that changes. A driver that
//! sends nothing more before the worker stops polling costs its choice
//! [`SAMPLE_CAP_NS`], so a hold that makes drivers miss their wake-up loses;
//! a driver that never waits is never held. Holding 0 wins wherever a
//! hold does not pay for itself, since the hold counts in the sample.

/// The holds tried, in nanoseconds.
pub(crate) const HOLD_NS: [u64; 4] = [0, 500, 1_000, 2_000];
/// Answers timed in a row with one hold. The cost of a wake-up depends
/// on the ones before it (the hypervisor adapts its own halt polling to
/// them), so a hold is tried for a run of answers and the first
/// [`WARMUP`] of each run are not counted.
pub(crate) const BLOCK: u32 = 64;
pub(crate) const WARMUP: u32 = 16;
/// The order of the runs in one probe: each hold twice, the second pass
/// backwards, so that a drift of the host over the probe weighs on all
/// alike.
const ORDER: [usize; 8] = [0, 1, 2, 3, 3, 2, 1, 0];
/// Answers in one probe.
#[cfg(test)]
pub(crate) const PROBE_ANSWERS: u32 = BLOCK * ORDER.len() as u32;
/// Answers to waiting drivers between two probes.
pub(crate) const SETTLED_ANSWERS: u32 = 32_768;
/// The most one sample counts: a driver that took longer was busy with
/// something else.
pub(crate) const SAMPLE_CAP_NS: u64 = 100_000;

#[derive(Debug)]
enum Phase {
    Probing {
        /// Which run of [`ORDER`].
        step: usize,
        /// Answers timed in this run so far.
        timed: u32,
        sum_ns: [u64; HOLD_NS.len()],
        count: [u32; HOLD_NS.len()],
    },
    Settled {
        choice: usize,
        left: u32,
    },
}

impl Phase {
    fn probing() -> Self {
        Phase::Probing {
            step: 0,
            timed: 0,
            sum_ns: [0; HOLD_NS.len()],
            count: [0; HOLD_NS.len()],
        }
    }
}

/// One queue's notification timing.
#[derive(Debug)]
pub(crate) struct NotifyTiming {
    phase: Phase,
    /// The answer being timed: the hold it got and when it was ready.
    open: Option<(usize, u64)>,
}

impl Default for NotifyTiming {
    fn default() -> Self {
        NotifyTiming {
            phase: Phase::probing(),
            open: None,
        }
    }
}

impl NotifyTiming {
    /// An answer the driver waits for was ready at `ready`: how long to
    /// hold its notification.
    pub(crate) fn hold(&mut self, ready: u64) -> u64 {
        let choice = match self.phase {
            Phase::Probing { step, .. } => ORDER[step],
            Phase::Settled { choice, .. } => choice,
        };
        // An answer timed before and not followed by a request (the
        // driver waits for more than one) is not a sample.
        self.open = Some((choice, ready));
        HOLD_NS[choice]
    }

    /// The driver made a request, seen at `now`.
    pub(crate) fn arrived(&mut self, now: u64) {
        if let Some((choice, ready)) = self.open.take() {
            let took = now.saturating_sub(ready).min(SAMPLE_CAP_NS);
            self.record(choice, took);
        }
    }

    /// The worker stops polling with no request after the answer timed.
    pub(crate) fn gave_up(&mut self) {
        if let Some((choice, _)) = self.open.take() {
            self.record(choice, SAMPLE_CAP_NS);
        }
    }

    /// The hold kept after the last probe; `None` while probing.
    #[cfg(test)]
    pub(crate) fn settled_ns(&self) -> Option<u64> {
        match self.phase {
            Phase::Settled { choice, .. } => Some(HOLD_NS[choice]),
            Phase::Probing { .. } => None,
        }
    }

    fn record(&mut self, choice: usize, took_ns: u64) {
        match &mut self.phase {
            Phase::Probing {
                step,
                timed,
                sum_ns,
                count,
            } => {
                *timed += 1;
                if *timed > WARMUP {
                    sum_ns[choice] += took_ns;
                    count[choice] += 1;
                }
                if *timed == BLOCK {
                    *step += 1;
                    *timed = 0;
                }
                if *step == ORDER.len() {
                    // Fastest mean; the shorter hold on a tie.
                    let mean = |i: usize| sum_ns[i] / u64::from(count[i]);
                    let choice = (0..HOLD_NS.len()).min_by_key(|&i| mean(i)).unwrap_or(0);
                    self.phase = Phase::Settled {
                        choice,
                        left: SETTLED_ANSWERS,
                    };
                }
            }
            Phase::Settled { left, .. } => {
                *left -= 1;
                if *left == 0 {
                    self.phase = Phase::probing();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers `n` waits, the driver coming back `turnaround(hold)` after
    /// each answer is ready.
    fn run(t: &mut NotifyTiming, n: u32, turnaround: impl Fn(u64) -> Option<u64>) {
        let mut now = 1_000_000u64;
        for _ in 0..n {
            let hold = t.hold(now);
            match turnaround(hold) {
                Some(ns) => {
                    now += ns;
                    t.arrived(now);
                }
                None => t.gave_up(),
            }
            now += 1_000;
        }
    }

    #[test]
    fn probes_each_hold_then_keeps_the_fastest() {
        let mut t = NotifyTiming::default();
        // The VM case: answered at once the wake-up costs 12 us, held
        // 1 us it costs 3 us.
        let vm = |hold: u64| Some(hold + if hold >= 1_000 { 3_000 } else { 12_000 });
        run(&mut t, PROBE_ANSWERS - 1, vm);
        assert_eq!(t.settled_ns(), None, "one sample short of a full probe");
        run(&mut t, 1, vm);
        assert_eq!(t.settled_ns(), Some(1_000));
    }

    #[test]
    fn a_hold_that_does_not_pay_for_itself_loses() {
        let mut t = NotifyTiming::default();
        // A driver that wakes at the same cost whenever the answer lands.
        run(&mut t, PROBE_ANSWERS, |hold| Some(hold + 4_000));
        assert_eq!(t.settled_ns(), Some(0));
    }

    #[test]
    fn a_missed_wake_up_counts_as_the_cap() {
        let mut t = NotifyTiming::default();
        // Held 2 us the driver is never back before the worker stops
        // polling; the others are equal.
        run(&mut t, PROBE_ANSWERS, |hold| {
            if hold == 2_000 {
                None
            } else {
                Some(90_000)
            }
        });
        assert_eq!(t.settled_ns(), Some(0));
    }

    #[test]
    fn probes_again_after_a_while_and_follows_a_change() {
        let mut t = NotifyTiming::default();
        run(&mut t, PROBE_ANSWERS, |hold| {
            Some(hold + if hold == 500 { 1_000 } else { 9_000 })
        });
        assert_eq!(t.settled_ns(), Some(500));
        run(&mut t, SETTLED_ANSWERS, |hold| Some(hold + 1_000));
        assert_eq!(t.settled_ns(), None, "probing again");
        run(&mut t, PROBE_ANSWERS, |hold| Some(hold + 1_000));
        assert_eq!(t.settled_ns(), Some(0));
    }

    #[test]
    fn an_answer_followed_by_another_is_not_a_sample() {
        let mut t = NotifyTiming::default();
        let start = 1_000_000u64;
        // The driver waits for two answers: the first is ready, then the
        // second, then the request comes; only the second is timed.
        for _ in 0..PROBE_ANSWERS {
            t.hold(start);
            t.hold(start);
            t.arrived(start + 5_000);
        }
        // Each pair is one sample, and every hold gets its turn.
        assert_eq!(t.settled_ns(), Some(0));
    }
}
