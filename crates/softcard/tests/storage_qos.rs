//! Throttling through the real interface: token-bucket limits set at
//! attach time and changed live hold over time, throttled requests wait
//! and never fail, and the counters show it.
//!
//! The assertions are upper bounds (a throttle may never let more through
//! than its limit allows), which hold however slow the machine is.

mod common;

use std::time::Duration;

use common::{Client, Daemon};

fn volume_json(d: &Daemon, name: &str) -> serde_json::Value {
    serde_json::from_str(&d.ok(&["card", "volume", "show", name])).unwrap()
}

#[test]
fn limits_hold_over_time_and_change_live() {
    let d = Daemon::start("[[device]]\nname = \"r\"\nkind = \"ram\"\nsize = \"64MiB\"\n");
    d.ok(&[
        "card", "volume", "create", "v", "--device", "r", "--size", "32MiB",
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
        "200",
        "--iops-burst",
        "10",
    ]);
    let v = volume_json(&d, "v");
    assert_eq!(v["attachment"]["qos"]["iops"], 200, "{v}");

    let mut c = Client::connect(&sock, 1).unwrap();
    let (done, elapsed) = c.load(0, 32, 4096, Duration::from_secs(2));
    let allowed = 10.0 + 200.0 * elapsed.as_secs_f64();
    eprintln!("iops limit 200: {done} requests in {elapsed:?}");
    assert!(
        (done as f64) <= allowed,
        "{done} requests in {elapsed:?} with 200 IOPS, burst 10"
    );
    let m = &volume_json(&d, "v")["attachment"]["metrics"];
    assert!(m["throttled_requests"].as_u64().unwrap() > 0, "{m}");
    assert!(m["throttled_ns"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(m["read_ops"].as_u64().unwrap(), done, "{m}");

    // Bytes per second, changed live on the connected interface.
    d.ok(&[
        "card",
        "volume",
        "set-qos",
        "v",
        "--bps",
        "1MiB",
        "--bps-burst",
        "64KiB",
    ]);
    let v = volume_json(&d, "v");
    assert_eq!(v["attachment"]["qos"]["bytes_per_sec"], 1 << 20, "{v}");
    assert!(v["attachment"]["qos"]["iops"].is_null(), "{v}");
    let (done, elapsed) = c.load(0, 8, 65536, Duration::from_secs(2));
    eprintln!("1 MiB/s limit: {} KiB in {elapsed:?}", done * 64);
    let allowed_bytes = 65536.0 + f64::from(1u32 << 20) * elapsed.as_secs_f64() + 65536.0;
    assert!(
        (done * 65536) as f64 <= allowed_bytes,
        "{done} x 64 KiB in {elapsed:?} at 1 MiB/s"
    );

    // Limits lifted: the same load is no longer held back at all.
    let before = volume_json(&d, "v")["attachment"]["metrics"]["throttled_requests"]
        .as_u64()
        .unwrap();
    d.ok(&["card", "volume", "set-qos", "v"]);
    let _ = c.load(0, 32, 4096, Duration::from_millis(300));
    let after = volume_json(&d, "v")["attachment"]["metrics"]["throttled_requests"]
        .as_u64()
        .unwrap();
    assert_eq!(before, after);
    drop(c);

    // Bad limits are refused and change nothing.
    for (args, want) in [
        (
            vec!["card", "volume", "set-qos", "v", "--iops", "0"],
            "must be positive",
        ),
        (
            vec!["card", "volume", "set-qos", "v", "--iops-burst", "5"],
            "without its limit",
        ),
        (
            vec!["card", "volume", "set-qos", "v", "--bps", "lots"],
            "size",
        ),
        (
            vec!["card", "volume", "set-qos", "v", "--weight", "0"],
            "must be positive",
        ),
        (
            vec!["card", "volume", "set-qos", "nope", "--iops", "5"],
            "unknown volume",
        ),
    ] {
        let err = d.fails(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    d.ok(&["card", "volume", "detach", "v"]);
    let err = d.fails(&["card", "volume", "set-qos", "v", "--iops", "5"]);
    assert!(err.contains("not attached"), "{err}");
}
