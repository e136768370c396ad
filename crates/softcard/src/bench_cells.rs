//! The figures of `softcard bench storage`'s cells: the medians and
//! ranges over a cell's runs, and the card's queue-worker counters per I/O
//! (polls, wake-ups, notifications), read from the volume's own metrics.

use softcard_storage::virtio_blk::BlkMetricsSnapshot;
use softcard_storage::StorageCard;

use crate::bench::Figures;
use crate::bench_cpu::median_range;

/// The bench volume's counters.
pub(crate) fn counters(card: &StorageCard) -> BlkMetricsSnapshot {
    card.stats()
        .into_iter()
        .flat_map(|d| d.volumes)
        .find(|(v, _)| v == "bench")
        .map(|(_, m)| m)
        .unwrap_or_default()
}

/// The queue worker's counters per I/O over one run.
pub(crate) struct PerIo {
    pub(crate) polls: f64,
    pub(crate) idle_polls: f64,
    pub(crate) wakeups: f64,
    pub(crate) notifications: f64,
}

impl PerIo {
    pub(crate) fn between(a: &BlkMetricsSnapshot, b: &BlkMetricsSnapshot) -> Self {
        let ios = (b.read_ops + b.write_ops).saturating_sub(a.read_ops + a.write_ops) as f64;
        let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / ios;
        PerIo {
            polls: per(a.polls, b.polls),
            idle_polls: per(a.idle_polls, b.idle_polls),
            wakeups: per(a.wakeups, b.wakeups),
            notifications: per(a.notifications, b.notifications),
        }
    }
}

/// Medians (and the IOPS range) of a cell's runs; `NaN` for none.
pub(crate) struct Summary {
    pub(crate) iops: (f64, f64, f64),
    pub(crate) mb_s: f64,
    pub(crate) cpu_per_m: f64,
    pub(crate) iops_per_core: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) client_sleeps_per_io: f64,
    pub(crate) client_asleep: f64,
}

impl Summary {
    pub(crate) fn of(runs: &[Figures]) -> Self {
        let m = |f: fn(&Figures) -> f64| median_range(&runs.iter().map(f).collect::<Vec<_>>()).0;
        Summary {
            iops: median_range(&runs.iter().map(|r| r.iops).collect::<Vec<_>>()),
            mb_s: m(|r| r.mb_s),
            cpu_per_m: m(|r| r.cpu_per_m),
            iops_per_core: m(|r| r.iops_per_core),
            p50_us: m(|r| r.p50_us),
            p99_us: m(|r| r.p99_us),
            client_sleeps_per_io: m(|r| r.client_sleeps_per_io),
            client_asleep: m(|r| r.client_asleep),
        }
    }

    pub(crate) fn iops_text(&self) -> String {
        let (med, lo, hi) = self.iops;
        if med.is_nan() {
            "-".into()
        } else {
            format!("{med:.0} ({lo:.0}-{hi:.0})")
        }
    }

    /// The client's sleeps per I/O and, in brackets, the share of the
    /// cell it spent asleep.
    pub(crate) fn sleeps_text(&self) -> String {
        if self.client_sleeps_per_io.is_nan() {
            "-".into()
        } else {
            format!(
                "{:.3} ({:.0} %)",
                self.client_sleeps_per_io,
                self.client_asleep * 100.0
            )
        }
    }

    pub(crate) fn latency_text(&self) -> String {
        if self.p50_us.is_nan() {
            "-".into()
        } else {
            format!("{:.0}/{:.0}", self.p50_us, self.p99_us)
        }
    }
}

/// A figure with `places` decimals, or `-` where there is none.
pub(crate) fn figure(x: f64, places: usize) -> String {
    if x.is_finite() {
        format!("{x:.places$}")
    } else {
        "-".into()
    }
}
