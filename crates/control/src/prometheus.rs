//! The card's counters in the Prometheus text exposition format (0.0.4),
//! served on `GET /metrics` of the `metrics_listen` address and on
//! `GET /v1/metrics` of the API socket.

use std::fmt::Write;

use softcard_storage::card::DeviceStats;
use softcard_storage::virtio_blk::metrics::{HistogramSnapshot, LATENCY_BOUNDS_US};
use softcard_storage::virtio_blk::BlkMetricsSnapshot;

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn line(&mut self, name: &str, labels: &str, v: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{name}{{{labels}}} {v}");
    }

    fn histogram(&mut self, name: &str, labels: &str, h: &HistogramSnapshot) {
        let mut cum = 0u64;
        for (i, c) in h.buckets.iter().enumerate() {
            cum += c;
            let le = LATENCY_BOUNDS_US
                .get(i)
                .map_or("+Inf".to_owned(), |us| format!("{}", *us as f64 / 1e6));
            self.line(
                &format!("{name}_bucket"),
                &format!("{labels},le=\"{le}\""),
                cum,
            );
        }
        self.line(&format!("{name}_sum"), labels, h.sum_ns as f64 / 1e9);
        self.line(&format!("{name}_count"), labels, cum);
    }
}

/// One family of series, for volumes and devices alike.
fn families(o: &mut Out, scope: &str, rows: &[(String, &BlkMetricsSnapshot)]) {
    let n = |s: &str| format!("softcard_{scope}_{s}");
    o.head(
        &n("requests_total"),
        "counter",
        &format!("Requests completed per {scope}, by operation."),
    );
    for (l, m) in rows {
        for (op, v) in [
            ("read", m.read_ops),
            ("write", m.write_ops),
            ("flush", m.flush_ops),
            ("discard", m.discard_ops),
            ("write_zeroes", m.write_zeroes_ops),
            ("get_id", m.get_id_ops),
        ] {
            o.line(&n("requests_total"), &format!("{l},op=\"{op}\""), v);
        }
    }
    o.head(
        &n("bytes_total"),
        "counter",
        &format!("Data bytes moved per {scope}."),
    );
    for (l, m) in rows {
        o.line(&n("bytes_total"), &format!("{l},op=\"read\""), m.read_bytes);
        o.line(
            &n("bytes_total"),
            &format!("{l},op=\"write\""),
            m.write_bytes,
        );
    }
    o.head(
        &n("errors_total"),
        "counter",
        &format!("Requests failed per {scope}, by kind."),
    );
    for (l, m) in rows {
        o.line(
            &n("errors_total"),
            &format!("{l},kind=\"invalid\""),
            m.invalid_requests,
        );
        o.line(
            &n("errors_total"),
            &format!("{l},kind=\"unsupported\""),
            m.unsupported_requests,
        );
        o.line(&n("errors_total"), &format!("{l},kind=\"io\""), m.io_errors);
    }
    o.head(
        &n("throttled_requests_total"),
        "counter",
        "Requests that waited for the throttle.",
    );
    for (l, m) in rows {
        o.line(&n("throttled_requests_total"), l, m.throttled_requests);
    }
    o.head(
        &n("throttled_seconds_total"),
        "counter",
        "Time requests waited for the throttle.",
    );
    for (l, m) in rows {
        o.line(
            &n("throttled_seconds_total"),
            l,
            m.throttled_ns as f64 / 1e9,
        );
    }
    o.head(
        &n("queue_held_seconds_total"),
        "counter",
        "Time notifications were held back.",
    );
    for (l, m) in rows {
        o.line(&n("queue_held_seconds_total"), l, m.held_ns as f64 / 1e9);
    }
    for (name, help, get) in [
        (
            "queue_wakeups_total",
            "Times a queue worker was woken and looked at its ring.",
            (|m| m.wakeups) as fn(&BlkMetricsSnapshot) -> u64,
        ),
        (
            "queue_polls_total",
            "Rounds of the queue workers' polling loops.",
            |m| m.polls,
        ),
        (
            "queue_idle_polls_total",
            "Polling rounds that found neither a request nor a completion.",
            |m| m.idle_polls,
        ),
        (
            "queue_notifications_total",
            "Notifications sent to the guest's driver.",
            |m| m.notifications,
        ),
        (
            "queue_held_notifications_total",
            "Notifications held back briefly for a driver waiting for its answer.",
            |m| m.held_notifications,
        ),
        (
            "inflight_regions_total",
            "Inflight regions a frontend set up (to survive card restarts).",
            |m| m.inflight_regions,
        ),
        (
            "inflight_refused_total",
            "Inflight regions, or queues starting on one, refused as malformed.",
            |m| m.inflight_refused,
        ),
        (
            "resubmitted_requests_total",
            "Requests an earlier card process left in flight, taken again.",
            |m| m.resubmitted_requests,
        ),
    ] {
        o.head(&n(name), "counter", help);
        for (l, m) in rows {
            o.line(&n(name), l, get(m));
        }
    }
    o.head(
        &n("request_duration_seconds"),
        "histogram",
        "Time from taking a request off the ring to completing it.",
    );
    for (l, m) in rows {
        for (op, h) in [
            ("read", &m.read_latency),
            ("write", &m.write_latency),
            ("flush", &m.flush_latency),
            ("discard", &m.discard_latency),
        ] {
            o.histogram(
                &n("request_duration_seconds"),
                &format!("{l},op=\"{op}\""),
                h,
            );
        }
    }
}

/// Renders every device and volume.
pub fn render(stats: &[DeviceStats]) -> String {
    let mut o = Out(String::new());
    o.head(
        "softcard_device_capacity_bytes",
        "gauge",
        "Device capacity.",
    );
    for d in stats {
        o.line(
            "softcard_device_capacity_bytes",
            &format!("device=\"{}\"", esc(&d.device)),
            d.capacity_bytes,
        );
    }
    o.head(
        "softcard_device_free_bytes",
        "gauge",
        "Device space not in any volume.",
    );
    for d in stats {
        o.line(
            "softcard_device_free_bytes",
            &format!("device=\"{}\"", esc(&d.device)),
            d.free_bytes,
        );
    }
    let totals: Vec<BlkMetricsSnapshot> = stats.iter().map(DeviceStats::totals).collect();
    let dev_rows: Vec<(String, &BlkMetricsSnapshot)> = stats
        .iter()
        .zip(&totals)
        .map(|(d, t)| (format!("device=\"{}\"", esc(&d.device)), t))
        .collect();
    families(&mut o, "device", &dev_rows);
    let vol_rows: Vec<(String, &BlkMetricsSnapshot)> = stats
        .iter()
        .flat_map(|d| {
            d.volumes.iter().map(move |(v, m)| {
                (
                    format!("device=\"{}\",volume=\"{}\"", esc(&d.device), esc(v)),
                    m,
                )
            })
        })
        .collect();
    families(&mut o, "volume", &vol_rows);
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_histograms() {
        let mut m = BlkMetricsSnapshot {
            read_ops: 3,
            read_bytes: 12288,
            ..Default::default()
        };
        m.read_latency.buckets[0] = 1;
        m.read_latency.buckets[3] = 2;
        m.read_latency.sum_ns = 17_000;
        let s = render(&[DeviceStats {
            device: "d\"0".into(),
            capacity_bytes: 10,
            free_bytes: 4,
            volumes: vec![("v".into(), m)],
        }]);
        assert!(
            s.contains("softcard_device_capacity_bytes{device=\"d\\\"0\"} 10"),
            "{s}"
        );
        assert!(s.contains(
            "softcard_volume_requests_total{device=\"d\\\"0\",volume=\"v\",op=\"read\"} 3"
        ));
        assert!(s.contains("softcard_device_bytes_total{device=\"d\\\"0\",op=\"read\"} 12288"));
        assert!(s.contains("op=\"read\",le=\"0.000001\"} 1"), "{s}");
        assert!(s.contains("op=\"read\",le=\"0.000008\"} 3"), "{s}");
        assert!(s.contains("op=\"read\",le=\"+Inf\"} 3"), "{s}");
        assert!(s.contains("softcard_volume_request_duration_seconds_count{device=\"d\\\"0\",volume=\"v\",op=\"read\"} 3"));
    }
}
