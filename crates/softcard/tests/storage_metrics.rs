//! Metrics: every counter moves, per volume and per device, on the
//! Prometheus endpoint named in the configuration, on the API, and in
//! `softcard volume stats`.

mod common;

use std::io::{Read, Write};

use common::{pattern, Client, Daemon};

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // Header names are case-insensitive.
    assert!(
        out.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{out}"
    );
    out
}

/// The value of one series.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series}"))
        .parse()
        .unwrap()
}

/// A daemon with a 64 MiB `ram` device `r` and its Prometheus endpoint
/// on a free loopback port; the daemon and the endpoint's address.
fn ram_card_with_metrics() -> (Daemon, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(&format!(
        "metrics_listen = \"{addr}\"\n[[device]]\nname = \"r\"\nkind = \"ram\"\nsize = \"64MiB\"\n"
    ));
    (d, addr)
}

#[test]
fn counters_move_on_every_surface() {
    let (d, addr) = ram_card_with_metrics();
    d.ok(&[
        "card", "volume", "create", "v", "--device", "r", "--size", "16MiB",
    ]);
    d.ok(&[
        "card", "volume", "create", "idle", "--device", "r", "--size", "4MiB",
    ]);
    let sock = d.path("v.sock");
    d.ok(&[
        "card",
        "volume",
        "attach",
        "v",
        "--vhost-user",
        sock.to_str().unwrap(),
        "--iops",
        "1000",
        "--iops-burst",
        "1",
    ]);

    let before = scrape(&addr);
    let vl = "device=\"r\",volume=\"v\"";
    assert_eq!(
        value(
            &before,
            &format!("softcard_volume_requests_total{{{vl},op=\"read\"}}")
        ),
        0.0
    );

    let mut c = Client::connect(&sock, 1).unwrap();
    let p = pattern(5, 65536);
    for i in 0..5u64 {
        assert_eq!(c.write(0, i * 65536, &p), 0);
    }
    assert_eq!(c.read(0, 0, 4096).unwrap(), p[..4096]);
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.discard(0, 0, 4096), 0);
    assert_eq!(c.write_zeroes(0, 4096, 4096), 0);
    drop(c);

    let after = scrape(&addr);
    for (series, at_least) in [
        (
            format!("softcard_volume_requests_total{{{vl},op=\"write\"}}"),
            5.0,
        ),
        (
            format!("softcard_volume_requests_total{{{vl},op=\"read\"}}"),
            1.0,
        ),
        (
            format!("softcard_volume_requests_total{{{vl},op=\"flush\"}}"),
            1.0,
        ),
        (
            format!("softcard_volume_requests_total{{{vl},op=\"discard\"}}"),
            1.0,
        ),
        (
            format!("softcard_volume_requests_total{{{vl},op=\"write_zeroes\"}}"),
            1.0,
        ),
        (
            format!("softcard_volume_bytes_total{{{vl},op=\"write\"}}"),
            5.0 * 65536.0,
        ),
        (
            format!("softcard_volume_bytes_total{{{vl},op=\"read\"}}"),
            4096.0,
        ),
        (
            format!("softcard_volume_request_duration_seconds_count{{{vl},op=\"write\"}}"),
            5.0,
        ),
        (
            format!("softcard_volume_request_duration_seconds_count{{{vl},op=\"read\"}}"),
            1.0,
        ),
        (
            format!("softcard_volume_request_duration_seconds_count{{{vl},op=\"discard\"}}"),
            2.0,
        ),
        (
            format!("softcard_volume_throttled_requests_total{{{vl}}}"),
            1.0,
        ),
        (
            "softcard_device_requests_total{device=\"r\",op=\"write\"}".into(),
            5.0,
        ),
        (
            "softcard_device_bytes_total{device=\"r\",op=\"read\"}".into(),
            4096.0,
        ),
        (
            "softcard_device_capacity_bytes{device=\"r\"}".into(),
            (64 << 20) as f64,
        ),
    ] {
        let v = value(&after, &series);
        assert!(
            v >= at_least,
            "{series} = {v}, expected at least {at_least}"
        );
    }
    assert!(
        value(
            &after,
            &format!("softcard_volume_request_duration_seconds_sum{{{vl},op=\"write\"}}")
        ) > 0.0
    );
    assert!(
        value(
            &after,
            &format!("softcard_volume_throttled_seconds_total{{{vl}}}")
        ) > 0.0
    );
    // The queue worker was woken for the requests, and each wake-up
    // polled the ring at least once.
    let wakeups = value(
        &after,
        &format!("softcard_volume_queue_wakeups_total{{{vl}}}"),
    );
    let polls = value(
        &after,
        &format!("softcard_volume_queue_polls_total{{{vl}}}"),
    );
    let idle = value(
        &after,
        &format!("softcard_volume_queue_idle_polls_total{{{vl}}}"),
    );
    assert!(
        wakeups >= 1.0 && polls >= wakeups && idle <= polls,
        "{wakeups} {polls} {idle}"
    );
    // The idle volume is listed with zeroes; device totals equal the sum.
    assert_eq!(
        value(
            &after,
            "softcard_volume_requests_total{device=\"r\",volume=\"idle\",op=\"write\"}"
        ),
        0.0
    );
    assert_eq!(
        value(
            &after,
            "softcard_device_requests_total{device=\"r\",op=\"write\"}"
        ),
        value(
            &after,
            &format!("softcard_volume_requests_total{{{vl},op=\"write\"}}")
        )
    );

    // Error counters are exercised by the hostile-guest test.
    let stats = d.ok(&["card", "volume", "stats", "v"]);
    assert!(
        stats.contains("write") && stats.contains("327680"),
        "{stats}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&d.ok(&["card", "volume", "stats", "v", "--json"])).unwrap();
    assert_eq!(j["latency"]["write"]["count"], 5, "{j}");
    assert!(
        j["latency"]["write"]["p99_us_at_most"].as_u64().unwrap() >= 1,
        "{j}"
    );

    // Counters outlive detach and attach.
    d.ok(&["card", "volume", "detach", "v"]);
    let api_text = d.ok(&["card", "volume", "stats", "v", "--json"]);
    assert!(api_text.contains("\"write_ops\": 5"), "{api_text}");

    // The endpoint refuses anything but GET /metrics.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /secret HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
}

/// A driver that waits for each answer (queue depth 1, libblkio sleeping
/// on its completion eventfd) gets some notifications held back while the
/// queue probes how long to hold them (`notify_timing`), every request is
/// answered, and the holds are counted.
#[test]
fn notifications_to_a_waiting_driver_are_timed_and_counted() {
    let (d, addr) = ram_card_with_metrics();
    d.ok(&[
        "card", "volume", "create", "q1", "--device", "r", "--size", "16MiB",
    ]);
    let sock = d.path("q1.sock");
    d.ok(&[
        "card",
        "volume",
        "attach",
        "q1",
        "--vhost-user",
        sock.to_str().unwrap(),
    ]);
    let mut c = Client::connect(&sock, 1).unwrap();
    // A probe tries each hold for runs of 64 answers, the first with
    // none: a few hundred answers reach the held ones. A lost wake-up
    // would leave the client asleep, hence the watchdog.
    let (tx, rx) = std::sync::mpsc::channel();
    let load = std::thread::spawn(move || {
        let mut done = 0;
        while done < 1000 {
            done += c.load(0, 1, 4096, std::time::Duration::from_millis(20)).0;
        }
        let p = pattern(9, 8192);
        assert_eq!(c.write(0, 4096, &p), 0);
        assert_eq!(c.read(0, 4096, 8192).unwrap(), p);
        tx.send(done).unwrap();
    });
    let done = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the client is still waiting for an answer");
    load.join().unwrap();

    let text = scrape(&addr);
    let q1 = |family: &str| {
        value(
            &text,
            &format!("softcard_volume_{family}{{device=\"r\",volume=\"q1\"}}"),
        )
    };
    let sent = q1("queue_notifications_total");
    let held = q1("queue_held_notifications_total");
    let held_s = q1("queue_held_seconds_total");
    assert!(
        held >= 1.0 && sent >= held,
        "{held} held of {sent} sent for {done} reads"
    );
    assert!(held_s > 0.0, "{held_s} s over {held} holds");
    // The CLI's stats say the same.
    let stats = d.ok(&["card", "volume", "stats", "q1"]);
    let line = stats
        .lines()
        .find(|l| l.starts_with("notifications: "))
        .unwrap_or_else(|| panic!("{stats}"));
    let cli_held: f64 = line
        .split(", ")
        .nth(1)
        .and_then(|w| w.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(cli_held >= held, "{line} against {held} scraped before");
}
