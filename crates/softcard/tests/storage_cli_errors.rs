//! Bad input at the CLI and the API: clear messages, non-zero exits, and
//! nothing changed on disk.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use common::{file_bytes, pattern, Daemon};

const MAP_AREA: usize = 2 << 20;

#[test]
fn refused_changes_leave_the_devices_untouched() {
    let d = Daemon::start_with(
        r#"
[[device]]
name = "good"
kind = "file"
path = "@DIR@/good.img"
size = "64MiB"

[[device]]
name = "bad"
kind = "file"
path = "@DIR@/bad.img"
"#,
        |dir| {
            // A device whose metadata area holds foreign, non-blank bytes.
            let mut img = pattern(9, MAP_AREA);
            img.resize(32 << 20, 0);
            std::fs::write(dir.join("bad.img"), img).unwrap();
        },
    );
    let good = d.path("good.img");
    let bad = d.path("bad.img");
    let bad_before = std::fs::read(&bad).unwrap();

    // The corrupt device is listed as unavailable with its reason.
    let devs: serde_json::Value =
        serde_json::from_str(&d.ok(&["card", "device", "list", "--json"])).unwrap();
    let bad_dev = devs
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "bad")
        .unwrap();
    assert!(
        bad_dev["error"].as_str().unwrap().contains("corrupt"),
        "{bad_dev}"
    );
    let err = d.fails(&[
        "card", "volume", "create", "v", "--device", "bad", "--size", "1MiB",
    ]);
    assert!(
        err.contains("corrupt") && err.contains("unavailable"),
        "{err}"
    );
    assert!(
        std::fs::read(&bad).unwrap() == bad_before,
        "corrupt device was written"
    );

    // The good device works, and refused requests change nothing on it.
    d.ok(&[
        "card", "volume", "create", "v", "--device", "good", "--size", "16MiB",
    ]);
    let map_before = file_bytes(&good, 0, MAP_AREA);
    for (args, want) in [
        (
            vec![
                "card", "volume", "create", "big", "--device", "good", "--size", "60MiB",
            ],
            "space",
        ),
        (
            vec![
                "card", "volume", "create", "v", "--device", "good", "--size", "1MiB",
            ],
            "already exists",
        ),
        (
            vec![
                "card", "volume", "create", "w", "--device", "nope", "--size", "1MiB",
            ],
            "unknown device",
        ),
        (
            vec![
                "card", "volume", "create", "w", "--device", "good", "--size", "1000",
            ],
            "multiple of 4096",
        ),
        (
            vec![
                "card", "volume", "create", "w", "--device", "good", "--size", "0",
            ],
            "multiple of 4096",
        ),
        (
            vec![
                "card", "volume", "create", "-w", "--device", "good", "--size", "1MiB",
            ],
            "unexpected argument",
        ),
        (vec!["card", "volume", "delete", "nope"], "unknown volume"),
        (vec!["card", "volume", "detach", "v"], "not attached"),
    ] {
        let err = d.fails(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(
        file_bytes(&good, 0, MAP_AREA) == map_before,
        "map changed by a refused request"
    );

    // No daemon: a clear message.
    let out = std::process::Command::new(common::BIN)
        .args(["card", "volume", "list", "--api", "/nonexistent/api.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the softcard daemon"));
}

fn raw_api(d: &Daemon, request: &[u8]) -> String {
    let mut s = UnixStream::connect(&d.api).unwrap();
    s.write_all(request).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn api_answers_malformed_requests_with_errors_and_stays_up() {
    let mut d = Daemon::start(
        r#"
[[device]]
name = "r"
kind = "ram"
size = "32MiB"
"#,
    );
    let status = |resp: &str| resp.split(' ').nth(1).unwrap_or("").to_owned();
    assert_eq!(
        status(&raw_api(&d, b"GET /v1/volumes HTTP/1.1\r\n\r\n")),
        "200"
    );
    assert_eq!(status(&raw_api(&d, b"garbage\r\n\r\n")), "400");
    assert_eq!(status(&raw_api(&d, b"GET /v2/x HTTP/1.1\r\n\r\n")), "404");
    assert_eq!(
        status(&raw_api(&d, b"PUT /v1/volumes HTTP/1.1\r\n\r\n")),
        "405"
    );
    let body = b"{\"name\": 5}";
    let req = format!(
        "POST /v1/volumes HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let resp = raw_api(&d, &[req.as_bytes(), body].concat());
    assert_eq!(status(&resp), "400", "{resp}");
    assert!(resp.contains("invalid request body"), "{resp}");
    let resp = raw_api(
        &d,
        b"POST /v1/volumes HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
    );
    assert_eq!(status(&resp), "413");
    let body = b"{\"name\":\"x\",\"device\":\"r\",\"size\":\"1MiB\",\"extra\":1}";
    let req = format!(
        "POST /v1/volumes HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    assert_eq!(
        status(&raw_api(&d, &[req.as_bytes(), body].concat())),
        "400"
    );
    let body = b"{\"socket\":\"relative.sock\"}";
    d.ok(&[
        "card", "volume", "create", "x", "--device", "r", "--size", "1MiB",
    ]);
    let req = format!(
        "POST /v1/volumes/x/attach HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let resp = raw_api(&d, &[req.as_bytes(), body].concat());
    assert_eq!(status(&resp), "400", "{resp}");
    // A client that sends half a request and keeps the connection open
    // holds nothing up.
    let mut slow = UnixStream::connect(&d.api).unwrap();
    slow.write_all(b"POST /v1/volumes HTTP/1.1\r\nContent-Le")
        .unwrap();
    assert_eq!(d.volumes().as_array().unwrap().len(), 1);
    drop(slow);
    // A client that sends half a request and hangs up.
    {
        let mut s = UnixStream::connect(&d.api).unwrap();
        s.write_all(b"POST /v1/volumes HTTP/1.1\r\nContent-Le")
            .unwrap();
    }
    assert!(d.alive());
    let v = d.volumes();
    assert_eq!(v.as_array().unwrap().len(), 1);
    d.stop();
}

/// A second card daemon configured with a device another daemon serves
/// (a stale process, a mistaken configuration, or an upgrade started too
/// early) lists it as unavailable with the reason and writes nothing to
/// it; the first keeps serving it.
#[test]
fn a_device_another_daemon_serves_is_unavailable_not_shared() {
    let first = Daemon::start(
        "[[device]]\nname = \"nvme0\"\nkind = \"file\"\npath = \"@DIR@/shared.img\"\nsize = \"64MiB\"\n",
    );
    let shared = first.path("shared.img");
    first.ok(&[
        "card", "volume", "create", "v", "--device", "nvme0", "--size", "1MiB",
    ]);
    let before = std::fs::read(&shared).unwrap();
    let second = Daemon::start(&format!(
        "[[device]]\nname = \"nvme0\"\nkind = \"file\"\npath = \"{}\"\n",
        shared.display()
    ));
    let devs: serde_json::Value =
        serde_json::from_str(&second.ok(&["card", "device", "list", "--json"])).unwrap();
    let err = devs[0]["error"].as_str().unwrap_or_default();
    assert!(err.contains("in use by another process"), "{devs}");
    let refused = second.fails(&[
        "card", "volume", "create", "w", "--device", "nvme0", "--size", "1MiB",
    ]);
    assert!(refused.contains("unavailable"), "{refused}");
    assert!(
        std::fs::read(&shared).unwrap() == before,
        "the second daemon wrote to it"
    );
    let vols = first.ok(&["card", "volume", "list"]);
    assert!(vols.contains('v'), "{vols}");
}
