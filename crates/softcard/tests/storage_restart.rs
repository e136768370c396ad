//! The card daemon restarted underneath its clients: the attachments are
//! recorded (`state_file`), so a daemon started again, after SIGTERM or
//! after SIGKILL, serves the same volumes on the same sockets, and a
//! client that reconnects carries on.
//!
//! QEMU's own NBD client (`qemu-io`, `reconnect-delay`) writes and flushes
//! 1 MiB at a time while the daemon is killed with SIGKILL three times,
//! stopped once with SIGTERM and upgraded three times (`softcard upgrade`:
//! the new process takes the listening socket over); it sees no error,
//! and afterwards every write it was told had completed is on the device. An attachment that
//! cannot be restored (its volume's device gone) stays on record until it
//! is detached.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{file_bytes, Daemon};

const MIB: usize = 1 << 20;
/// A card with a record of attachments and one 64 MiB file device.
const CARD: &str = "state_file = \"@DIR@/attachments.json\"\nrdma_socket = \"@DIR@/rdma.sock\"\n\
     [[device]]\nname = \"nvme0\"\nkind = \"file\"\npath = \"@DIR@/disk.img\"\nsize = \"64MiB\"\n";
const WRITES: usize = 60;

fn pattern_byte(i: usize) -> u8 {
    u8::try_from(i % 250 + 1).unwrap()
}

#[test]
fn an_nbd_client_carries_on_across_crashes_and_restarts_of_the_card() {
    let mut d = Daemon::start(
        "state_file = \"@DIR@/state/attachments.json\"\nrdma_socket = \"@DIR@/rdma.sock\"\n\
         [[device]]\nname = \"nvme0\"\nkind = \"file\"\npath = \"@DIR@/disk.img\"\nsize = \"128MiB\"\n",
    );
    let sock = d.volume_on("v", "64MiB", "--nbd", "v.nbd");
    let offset = d.offset_of("v");

    // One write, a flush and a pause per MiB: about 6 s in all.
    let mut args = vec![
        "--image-opts".to_owned(),
        format!(
            "driver=raw,file.driver=nbd,file.path={},file.export=v,file.reconnect-delay=30",
            sock.display()
        ),
    ];
    for i in 0..WRITES {
        for c in [
            format!("write -P {} {} 1M", pattern_byte(i), i * MIB),
            "flush".to_owned(),
            "sleep 100".to_owned(),
        ] {
            args.push("-c".into());
            args.push(c);
        }
    }
    let client = Command::new("qemu-io")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    enum Event {
        Crash,
        Stop,
        Upgrade,
    }
    let events = [
        (500, Event::Crash),
        (600, Event::Upgrade),
        (900, Event::Crash),
        (500, Event::Upgrade),
        (700, Event::Stop),
        (600, Event::Crash),
        (400, Event::Upgrade),
    ];
    for (after_ms, event) in events {
        std::thread::sleep(Duration::from_millis(after_ms));
        match event {
            Event::Crash => d.crash_and_restart(),
            Event::Stop => d.restart(),
            Event::Upgrade => {
                let line = d.upgrade();
                assert!(line.starts_with("upgraded: pid "), "{line}");
            }
        }
    }
    let out = client.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "{text}"
    );
    assert_eq!(
        text.matches("wrote 1048576/1048576 bytes").count(),
        WRITES,
        "{text}"
    );

    // The restarted daemon serves the volume where the record says.
    let vols = d.ok(&["card", "volume", "list"]);
    assert!(vols.contains("nbd"), "{vols}");
    d.stop();
    let disk = file_bytes(&d.path("disk.img"), offset, WRITES * MIB);
    for i in 0..WRITES {
        let at = i * MIB;
        assert!(
            disk[at..at + MIB].iter().all(|&b| b == pattern_byte(i)),
            "MiB {i} is not what was written and flushed"
        );
    }
}

#[test]
fn an_attachment_that_cannot_be_restored_stays_on_record_until_detached() {
    let mut d = Daemon::start(CARD);
    d.volume_on("v", "8MiB", "--nbd", "v.nbd");
    let state = d.path("attachments.json");
    assert!(std::fs::read_to_string(&state).unwrap().contains("v.nbd"));
    // The device goes away while the card is down.
    d.stop();
    std::fs::rename(d.path("disk.img"), d.path("elsewhere.img")).unwrap();
    // (The configured size makes a new, blank file there: no volume v.)
    d.restart();
    let vols = d.ok(&["card", "volume", "list"]);
    assert!(!vols.contains("nbd"), "{vols}");
    assert!(
        std::fs::read_to_string(&state).unwrap().contains("v.nbd"),
        "the record was dropped"
    );
    // Back in place: the next start restores it.
    d.stop();
    std::fs::rename(d.path("elsewhere.img"), d.path("disk.img")).unwrap();
    d.restart();
    let vols = d.ok(&["card", "volume", "list"]);
    assert!(vols.contains("nbd"), "{vols}");
    // Detached, it is forgotten.
    d.ok(&["card", "volume", "detach", "v"]);
    assert!(!std::fs::read_to_string(&state).unwrap().contains("v.nbd"));
    d.restart();
    let vols = d.ok(&["card", "volume", "list"]);
    assert!(!vols.contains("nbd"), "{vols}");
}

#[test]
fn an_upgrade_the_new_binary_cannot_take_leaves_the_running_card_serving() {
    let mut d = Daemon::start(CARD);
    let sock = d.volume_on("v", "8MiB", "--vhost-user", "v.sock");
    let pid = d.pid();
    let mut c = common::Client::connect(&sock, 1).unwrap();
    assert_eq!(c.write(0, 0, &[5u8; 4096]), 0);

    // Not a softcard: it exits without taking the sockets.
    let e = d.fails(&["upgrade", "--binary", "/bin/false"]);
    assert!(e.contains("exited before taking the sockets"), "{e}");
    // No such file.
    let e = d.fails(&["upgrade", "--binary", "/nonexistent/softcard"]);
    assert!(e.contains("No such file"), "{e}");
    // A configuration the new process cannot load.
    let good = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, format!("{good}\nno_such_setting = 1\n")).unwrap();
    let e = d.fails(&["upgrade"]);
    assert!(e.contains("refused: configuration"), "{e}");
    std::fs::write(&d.config, good).unwrap();

    // The same process still serves, and the connected client never
    // noticed.
    assert!(d.alive());
    assert_eq!(d.pid(), pid);
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![5u8; 4096]);
    drop(c);
    // A good upgrade still works afterwards.
    let line = d.upgrade();
    assert!(line.contains(&format!("pid {pid} -> ")), "{line}");
    let mut c = common::Client::connect(&sock, 1).unwrap();
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![5u8; 4096]);
}

#[test]
fn an_attachment_that_connects_waits_for_its_frontend_and_detaches_at_once() {
    let mut d = Daemon::start(CARD);
    d.ok(&[
        "card", "volume", "create", "v", "--device", "nvme0", "--size", "8MiB",
    ]);
    // Nobody listens there: the card keeps trying, and says so.
    let sock = d.path("vm.sock");
    let out = d.ok(&[
        "card",
        "volume",
        "attach",
        "v",
        "--vhost-user-connect",
        sock.to_str().unwrap(),
    ]);
    assert!(out.contains("attached"), "{out}");
    let v = d.volumes();
    assert_eq!(v[0]["attachment"]["interface"], "vhost-user-blk-connect");
    assert_eq!(v[0]["attachment"]["state"], "listening");
    // Both flags at once are refused by the CLI.
    let e = d.fails(&[
        "card",
        "volume",
        "attach",
        "v",
        "--vhost-user",
        "/tmp/x.sock",
        "--vhost-user-connect",
        "/tmp/y.sock",
    ]);
    assert!(e.contains("cannot be used with"), "{e}");
    // The record keeps the mode across an upgrade.
    d.upgrade();
    let v = d.volumes();
    assert_eq!(v[0]["attachment"]["interface"], "vhost-user-blk-connect");
    // Detaching stops the retries at once, and leaves no socket file (the
    // path was never the card's).
    let started = std::time::Instant::now();
    d.ok(&["card", "volume", "detach", "v"]);
    eprintln!("detach took {:?}", started.elapsed());
    assert!(!sock.exists());
}
