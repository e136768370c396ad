//! The storage card through its real peers: the `softcard` daemon and CLI,
//! and libblkio's virtio-blk-vhost-user driver as the frontend. Every byte
//! written is checked where it must land on the physical device.

mod common;

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::{file_bytes, pattern, Client, Daemon};

const MIB: u64 = 1 << 20;

fn file_card() -> Daemon {
    Daemon::start(
        r#"
[[device]]
name = "nvme0"
kind = "file"
path = "@DIR@/nvme0.img"
size = "256MiB"

[[device]]
name = "scratch"
kind = "ram"
size = "64MiB"
"#,
    )
}

#[test]
fn volumes_carve_attach_and_land_at_their_offsets() {
    let mut d = file_card();
    let dev = d.path("nvme0.img");
    d.ok(&[
        "card", "volume", "create", "a", "--device", "nvme0", "--size", "64MiB",
    ]);
    d.ok(&[
        "card", "volume", "create", "b", "--device", "nvme0", "--size", "32MiB",
    ]);
    let (off_a, off_b) = (d.offset_of("a"), d.offset_of("b"));
    assert!(
        off_a + 64 * MIB <= off_b || off_b + 32 * MIB <= off_a,
        "volumes overlap"
    );

    let sock_a = d.path("a.sock");
    let sock_b = d.path("b.sock");
    d.ok(&[
        "card",
        "volume",
        "attach",
        "a",
        "--vhost-user",
        sock_a.to_str().unwrap(),
        "--queues",
        "2",
    ]);
    d.ok(&[
        "card",
        "volume",
        "attach",
        "b",
        "--vhost-user",
        sock_b.to_str().unwrap(),
    ]);

    // Volume a, two queues: data lands at the volume's offset on the file.
    let mut a = Client::connect(&sock_a, 2).unwrap();
    assert_eq!(a.capacity, 64 * MIB);
    let first = pattern(1, 64 << 10);
    let last = pattern(2, 4096);
    assert_eq!(a.write(0, 0, &first), 0);
    assert_eq!(a.write(1, 64 * MIB - 4096, &last), 0);
    assert_eq!(a.flush(1), 0);
    assert_eq!(a.read(1, 0, first.len()).unwrap(), first);
    assert_eq!(a.read(0, 64 * MIB - 4096, 4096).unwrap(), last);
    assert_eq!(file_bytes(&dev, off_a, first.len()), first);
    assert_eq!(file_bytes(&dev, off_a + 64 * MIB - 4096, 4096), last);

    // Past the end: refused, nothing written anywhere.
    assert_ne!(a.write(0, 64 * MIB, &pattern(3, 4096)), 0);
    assert_ne!(a.write(0, 64 * MIB - 2048, &pattern(3, 4096)), 0);
    assert!(a.read(0, 64 * MIB, 512).is_err());

    // Write-zeroes and discard read back as zeroes, and only that range.
    assert_eq!(a.write_zeroes(0, 4096, 8192), 0);
    let got = a.read(0, 0, 16384).unwrap();
    assert_eq!(&got[..4096], &first[..4096]);
    assert!(got[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(&got[12288..], &first[12288..16384]);
    assert_eq!(a.discard(0, 32768, 32768), 0);
    assert!(file_bytes(&dev, off_a + 32768, 32768)
        .iter()
        .all(|&b| b == 0));
    assert_eq!(file_bytes(&dev, off_a + 16384, 16384), first[16384..32768]);

    // Volume b is its own disk: its bytes land in its own range and a's
    // data is untouched.
    let mut b = Client::connect(&sock_b, 1).unwrap();
    assert_eq!(b.capacity, 32 * MIB);
    let pb = pattern(7, 1 << 20);
    assert_eq!(b.write(0, 0, &pb), 0);
    assert_eq!(b.flush(0), 0);
    assert_eq!(file_bytes(&dev, off_b, pb.len()), pb);
    assert_eq!(file_bytes(&dev, off_a + 64 * MIB - 4096, 4096), last);
    drop(b);

    // The CLI refuses what would lose data.
    let err = d.fails(&["card", "volume", "delete", "a"]);
    assert!(err.contains("attached"), "{err}");
    let err = d.fails(&[
        "card", "volume", "create", "huge", "--device", "nvme0", "--size", "1GiB",
    ]);
    assert!(err.contains("space") || err.contains("free"), "{err}");
    let err = d.fails(&[
        "card", "volume", "create", "bad/name", "--device", "nvme0", "--size", "1MiB",
    ]);
    assert!(err.contains("invalid volume name"), "{err}");
    let err = d.fails(&[
        "card", "volume", "create", "c", "--device", "nope", "--size", "1MiB",
    ]);
    assert!(err.contains("unknown device"), "{err}");
    let err = d.fails(&[
        "card",
        "volume",
        "create",
        "c",
        "--device",
        "nvme0",
        "--size",
        "12 parsecs",
    ]);
    assert!(err.contains("unit"), "{err}");
    let err = d.fails(&[
        "card", "volume", "create", "a", "--device", "scratch", "--size", "1MiB",
    ]);
    assert!(err.contains("already exists"), "{err}");
    let err = d.fails(&[
        "card",
        "volume",
        "attach",
        "b",
        "--vhost-user",
        d.path("x.sock").to_str().unwrap(),
    ]);
    assert!(err.contains("is attached"), "{err}");
    d.ok(&[
        "card", "volume", "create", "c", "--device", "scratch", "--size", "4MiB",
    ]);
    let err = d.fails(&[
        "card",
        "volume",
        "attach",
        "c",
        "--vhost-user",
        sock_a.to_str().unwrap(),
    ]);
    assert!(err.contains("already used by volume \"a\""), "{err}");
    // An attach aimed at an existing regular file must not replace it.
    let victim = d.path("precious.txt");
    std::fs::write(&victim, b"keep me").unwrap();
    d.ok(&["card", "volume", "detach", "b"]);
    let err = d.fails(&[
        "card",
        "volume",
        "attach",
        "b",
        "--vhost-user",
        victim.to_str().unwrap(),
    ]);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    let err = d.fails(&[
        "card",
        "volume",
        "attach",
        "b",
        "--vhost-user",
        sock_b.to_str().unwrap(),
        "--queues",
        "0",
    ]);
    assert!(err.contains("queue count"), "{err}");

    // Delete frees space; a restart finds the same map on the device.
    d.ok(&["card", "volume", "delete", "b"]);
    let err = d.fails(&["card", "volume", "show", "b"]);
    assert!(err.contains("unknown volume"), "{err}");
    drop(a);
    d.restart();
    let vols = d.volumes();
    let names: Vec<&str> = vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    // (c lived on the ram device, which starts empty by design.)
    assert_eq!(names, ["a"]);
    assert_eq!(d.offset_of("a"), off_a);
    d.ok(&[
        "card", "volume", "create", "b2", "--device", "nvme0", "--size", "128MiB",
    ]);
    assert_eq!(file_bytes(&dev, off_a + 64 * MIB - 4096, 4096), last);
    d.stop();
}

/// A driver that polls the used ring and never asks for a notification
/// (libblkio's poll queue) gets every answer, with its data, across the
/// wrap of the 16-bit ring indices: the card publishes its answers to such
/// a driver once per round rather than one by one.
#[test]
fn a_driver_that_polls_gets_every_answer() {
    const BLOCK: usize = 4096;
    const DEPTH: usize = 32;
    let mut d = file_card();
    let dev = d.path("nvme0.img");
    d.ok(&[
        "card", "volume", "create", "p", "--device", "nvme0", "--size", "32MiB",
    ]);
    let off = d.offset_of("p");
    let sock = d.path("p.sock");
    d.ok(&[
        "card",
        "volume",
        "attach",
        "p",
        "--vhost-user",
        sock.to_str().unwrap(),
    ]);
    let mut c = Client::connect_polled(&sock).unwrap();
    let blocks = usize::try_from(c.capacity).unwrap() / BLOCK;
    let data: Vec<u8> = pattern(11, blocks * BLOCK);
    let base = c.region.addr;
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
    // Runs `DEPTH` requests at a time (slot i: block first + i) and waits
    // for all of them; returns how many were answered.
    let mut round = |c: &mut Client, first: usize, write: bool| -> usize {
        for slot in 0..DEPTH {
            let b = first + slot;
            let buf = (base + slot * BLOCK) as *mut u8;
            let at = (b * BLOCK) as u64;
            if write {
                c.buf()[slot * BLOCK..(slot + 1) * BLOCK]
                    .copy_from_slice(&data[b * BLOCK..(b + 1) * BLOCK]);
                c.queues[0].write(at, buf, BLOCK, slot, ReqFlags::empty());
            } else {
                c.buf()[slot * BLOCK..(slot + 1) * BLOCK].fill(0xee);
                c.queues[0].read(at, buf, BLOCK, slot, ReqFlags::empty());
            }
        }
        let mut seen = [false; DEPTH];
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < DEPTH {
            let n = c.queues[0].do_io(&mut comps, 0, None, None).expect("do_io");
            assert!(
                n > 0 || Instant::now() < deadline,
                "{} of {DEPTH} requests from block {first} never answered",
                DEPTH - got
            );
            for done in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                let done = unsafe { done.assume_init_ref() };
                assert_eq!(done.ret, 0, "request of slot {} failed", done.user_data);
                assert!(
                    !seen[done.user_data],
                    "slot {} answered twice",
                    done.user_data
                );
                seen[done.user_data] = true;
                got += 1;
            }
        }
        if !write {
            for slot in 0..DEPTH {
                let b = first + slot;
                assert!(
                    c.buf()[slot * BLOCK..(slot + 1) * BLOCK] == data[b * BLOCK..(b + 1) * BLOCK],
                    "block {b} read back wrong"
                );
            }
        }
        got
    };
    let mut answered = 0usize;
    for first in (0..blocks).step_by(DEPTH) {
        answered += round(&mut c, first, true);
    }
    // Past 65,536 answers: the used index wraps.
    while answered <= 65_536 + 2 * blocks {
        for first in (0..blocks).step_by(DEPTH) {
            answered += round(&mut c, first, false);
        }
    }
    drop(c);
    assert_eq!(file_bytes(&dev, off, data.len()), data);
    d.stop();
}
