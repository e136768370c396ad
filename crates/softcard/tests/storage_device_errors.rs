//! A physical device that fails: the device file lives on an 8 MiB tmpfs
//! that the test mounts, so writes past that space fail with ENOSPC. The
//! guest gets an I/O error for those requests, earlier data stays readable,
//! the counters say so, and the daemon carries on.

mod common;

use std::process::Command;

use common::{pattern, Client, Daemon};

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn device_errors_reach_the_guest_as_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(st.success(), "mounting a tmpfs needs root");
    let _m = Mount(mnt.clone());

    let mut d = Daemon::start(&format!(
        "[[device]]\nname = \"small\"\nkind = \"file\"\npath = \"{}/disk.img\"\nsize = \"64MiB\"\n",
        mnt.display()
    ));
    d.ok(&[
        "card", "volume", "create", "v", "--device", "small", "--size", "32MiB",
    ]);
    let sock = d.path("v.sock");
    d.ok(&[
        "card",
        "volume",
        "attach",
        "v",
        "--vhost-user",
        sock.to_str().unwrap(),
    ]);
    let mut c = Client::connect(&sock, 1).unwrap();
    let first = pattern(1, 1 << 20);
    assert_eq!(c.write(0, 0, &first), 0);
    // Keep writing 1 MiB chunks: the 8 MiB filesystem runs out.
    let chunk = pattern(2, 1 << 20);
    let mut failed = None;
    for i in 1..32u64 {
        let rc = c.write(0, i << 20, &chunk);
        if rc != 0 {
            failed = Some((i, rc));
            break;
        }
    }
    let (at, rc) = failed.expect("writes past the filesystem's space must fail");
    assert!(rc < 0, "an error status, got {rc}");
    assert!(at < 8, "failed at {at} MiB");
    // Flush reports the state honestly too, and the volume still serves
    // what it holds.
    let _ = c.flush(0);
    assert_eq!(c.read(0, 0, first.len()).unwrap(), first);
    drop(c);
    assert!(d.alive());
    let s: serde_json::Value =
        serde_json::from_str(&d.ok(&["card", "volume", "stats", "v", "--json"])).unwrap();
    assert!(s["counters"]["io_errors"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(s["counters"]["invalid_requests"], 0, "{s}");
    d.stop();
}
