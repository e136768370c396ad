//! A hostile guest: a raw vhost-user frontend (the `vhost` crate's, driven
//! by hand) puts malformed descriptor chains on the ring of volume `a`.
//! Each gets a clear error status (or, when the chain gives no place for
//! one, an empty used entry), nothing reaches the device outside `a`, the
//! neighbouring volume `b` keeps its bytes and keeps serving, and the
//! daemon stays up.

mod common;

use common::raw_frontend::*;
use common::{file_bytes, pattern, Client, Daemon};
use vhost::VhostBackend;

#[test]
fn malformed_requests_fail_cleanly_and_touch_nothing_else() {
    let mut d = Daemon::start(
        r#"
[[device]]
name = "nvme0"
kind = "file"
path = "@DIR@/nvme0.img"
size = "64MiB"
"#,
    );
    let dev = d.path("nvme0.img");
    d.ok(&[
        "card", "volume", "create", "a", "--device", "nvme0", "--size", "8MiB",
    ]);
    d.ok(&[
        "card", "volume", "create", "b", "--device", "nvme0", "--size", "8MiB",
    ]);
    let (off_a, off_b) = (d.offset_of("a"), d.offset_of("b"));
    let (sock_a, sock_b) = (d.path("a.sock"), d.path("b.sock"));
    d.ok(&[
        "card",
        "volume",
        "attach",
        "a",
        "--vhost-user",
        sock_a.to_str().unwrap(),
    ]);
    d.ok(&[
        "card",
        "volume",
        "attach",
        "b",
        "--vhost-user",
        sock_b.to_str().unwrap(),
    ]);

    // b holds data that must survive everything below.
    let b_data = pattern(42, 8 << 20);
    {
        let mut b = Client::connect(&sock_b, 1).unwrap();
        for (i, chunk) in b_data.chunks(4 << 20).enumerate() {
            assert_eq!(b.write(0, (i as u64) << 22, chunk), 0);
        }
        assert_eq!(b.flush(0), 0);
    }
    let before_a = file_bytes(&dev, off_a, 8 << 20);

    let mut r = Ring::connect(&sock_a);
    let sectors = (8u64 << 20) / 512;

    // A good write first: the ring works.
    r.mem.write(DATA, &pattern(5, 4096));
    r.header(HDR, T_OUT, 8);
    r.reset_status();
    let (id, _) = r.submit(&[
        hdr(),
        D {
            addr: DATA,
            len: 4096,
            flags: F_NEXT,
            next: 2,
        },
        status_desc(2),
    ]);
    assert_eq!((id, r.status()), (0, S_OK));
    assert_eq!(file_bytes(&dev, off_a + 4096, 4096), pattern(5, 4096));

    let expect_status = |r: &mut Ring, chain: &[D], want: u8, what: &str| {
        r.reset_status();
        let (id, len) = r.submit(chain);
        assert_eq!(id, 0, "{what}: wrong head");
        assert_eq!(r.status(), want, "{what}: status");
        assert_eq!(len, 1, "{what}: used length");
    };

    // Write that ends one sector past the end of the volume (into b).
    r.header(HDR, T_OUT, sectors - 1);
    expect_status(
        &mut r,
        &[
            hdr(),
            D {
                addr: DATA,
                len: 1024,
                flags: F_NEXT,
                next: 2,
            },
            status_desc(2),
        ],
        S_IOERR,
        "write past end",
    );
    // Sector number that overflows when turned into bytes.
    r.header(HDR, T_OUT, u64::MAX / 256);
    expect_status(
        &mut r,
        &[
            hdr(),
            D {
                addr: DATA,
                len: 512,
                flags: F_NEXT,
                next: 2,
            },
            status_desc(2),
        ],
        S_IOERR,
        "overflowing sector",
    );
    // Read into memory the guest does not have.
    r.header(HDR, T_IN, 0);
    expect_status(
        &mut r,
        &[
            hdr(),
            D {
                addr: MEM_BYTES as u64 - 512,
                len: 4096,
                flags: F_NEXT | F_WRITE,
                next: 2,
            },
            status_desc(2),
        ],
        S_IOERR,
        "read beyond guest memory",
    );
    // Write from a wild address.
    r.header(HDR, T_OUT, 0);
    expect_status(
        &mut r,
        &[
            hdr(),
            D {
                addr: 1 << 40,
                len: 4096,
                flags: F_NEXT,
                next: 2,
            },
            status_desc(2),
        ],
        S_IOERR,
        "write from wild address",
    );
    // Not a whole number of sectors.
    r.header(HDR, T_OUT, 0);
    expect_status(
        &mut r,
        &[
            hdr(),
            D {
                addr: DATA,
                len: 100,
                flags: F_NEXT,
                next: 2,
            },
            status_desc(2),
        ],
        S_IOERR,
        "partial sector",
    );
    // Write whose data buffer is device-writable (wrong direction).
    r.header(HDR, T_OUT, 0);
    expect_status(
        &mut r,
        &[
            hdr(),
            D {
                addr: DATA,
                len: 512,
                flags: F_NEXT | F_WRITE,
                next: 2,
            },
            status_desc(2),
        ],
        S_IOERR,
        "wrong direction",
    );
    // Readable descriptor after a writable one.
    r.header(HDR, T_IN, 0);
    expect_status(
        &mut r,
        &[
            hdr(),
            D {
                addr: DATA,
                len: 512,
                flags: F_NEXT | F_WRITE,
                next: 2,
            },
            D {
                addr: DATA + 512,
                len: 512,
                flags: F_NEXT,
                next: 3,
            },
            status_desc(3),
        ],
        S_IOERR,
        "readable after writable",
    );
    // Header of 8 bytes only.
    r.header(HDR, T_IN, 0);
    expect_status(
        &mut r,
        &[
            D {
                addr: HDR,
                len: 8,
                flags: F_NEXT,
                next: 1,
            },
            status_desc(1),
        ],
        S_IOERR,
        "short header",
    );
    // Unknown request type.
    r.header(HDR, 99, 0);
    expect_status(&mut r, &[hdr(), status_desc(1)], S_UNSUPP, "unknown type");
    // Write-zeroes with undefined flag bits.
    r.header(HDR, T_WRITE_ZEROES, 0);
    let mut range = [0u8; 16];
    range[8..12].copy_from_slice(&8u32.to_le_bytes());
    range[12..16].copy_from_slice(&0x80u32.to_le_bytes());
    r.mem.write(DATA, &range);
    expect_status(
        &mut r,
        &[
            hdr(),
            D {
                addr: DATA,
                len: 16,
                flags: F_NEXT,
                next: 2,
            },
            status_desc(2),
        ],
        S_UNSUPP,
        "write-zeroes flags",
    );
    // Write-zeroes range reaching into b.
    range[0..8].copy_from_slice(&(sectors - 4).to_le_bytes());
    range[12..16].copy_from_slice(&0u32.to_le_bytes());
    r.mem.write(DATA, &range);
    expect_status(
        &mut r,
        &[
            hdr(),
            D {
                addr: DATA,
                len: 16,
                flags: F_NEXT,
                next: 2,
            },
            status_desc(2),
        ],
        S_IOERR,
        "write-zeroes past end",
    );
    // Indirect table pointing outside guest memory (INDIRECT was not
    // negotiated here, so the flag alone is a violation too).
    r.header(HDR, T_IN, 0);
    r.reset_status();
    let (id, len) = r.submit(&[D {
        addr: 1 << 40,
        len: 64,
        flags: F_INDIRECT,
        next: 0,
    }]);
    assert_eq!(
        (id, len),
        (0, 0),
        "bad indirect table: completed without a status"
    );
    assert_eq!(
        r.status(),
        0xaa,
        "nothing written for a chain without a status byte"
    );

    // Status descriptor that is not device-writable: no status can be
    // given, the chain is returned empty.
    r.header(HDR, T_IN, 0);
    r.reset_status();
    let (_, len) = r.submit(&[
        hdr(),
        D {
            addr: STATUS,
            len: 1,
            flags: 0,
            next: 0,
        },
    ]);
    assert_eq!(len, 0);
    assert_eq!(r.status(), 0xaa);
    // A descriptor loop: 0 -> 1 -> 0 ...
    r.header(HDR, T_OUT, 0);
    let (_, len) = r.submit(&[
        hdr(),
        D {
            addr: DATA,
            len: 512,
            flags: F_NEXT,
            next: 0,
        },
    ]);
    assert_eq!(len, 0, "descriptor loop");

    // Nothing of the above reached the device.
    let mut now_a = before_a.clone();
    now_a[4096..8192].copy_from_slice(&pattern(5, 4096));
    assert!(
        file_bytes(&dev, off_a, 8 << 20) == now_a,
        "volume a changed by refused requests"
    );
    assert!(
        file_bytes(&dev, off_b, 8 << 20) == b_data,
        "volume b changed"
    );

    // Finally the guest breaks the ring itself: avail->idx jumps far ahead.
    // The queue stops (virtio 2.7.13.3 lets the device give up on it);
    // what matters is what follows.
    r.publish(0, 1000);
    drop(r);

    // The daemon is alive, b still serves its data, and a serves again to
    // the next frontend.
    assert!(d.alive());
    let mut b = Client::connect(&sock_b, 1).unwrap();
    assert_eq!(b.read(0, 0, 4096).unwrap(), b_data[..4096]);
    let mut a = Client::connect(&sock_a, 1).unwrap();
    assert_eq!(a.read(0, 4096, 4096).unwrap(), pattern(5, 4096));
    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["card", "volume", "show", "a"])).unwrap();
    assert!(
        v["attachment"]["metrics"]["invalid_requests"]
            .as_u64()
            .unwrap()
            >= 10,
        "{v}"
    );
    assert!(
        v["attachment"]["metrics"]["unsupported_requests"]
            .as_u64()
            .unwrap()
            >= 2,
        "{v}"
    );
    drop((a, b));
    d.stop();
}

/// A daemon with a ram volume attached at one request a second (no burst
/// beyond one), and a raw frontend that has posted three 4 KiB writes:
/// the first has completed, the second is taken off the ring and held
/// back by the throttle, the third waits on the ring.
fn three_writes_behind_a_throttle() -> (Daemon, Ring) {
    let d = Daemon::start("[[device]]\nname = \"r\"\nkind = \"ram\"\nsize = \"64MiB\"\n");
    d.ok(&[
        "card", "volume", "create", "v", "--device", "r", "--size", "8MiB",
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
        "1",
        "--iops-burst",
        "1",
    ]);
    let mut r = Ring::connect(&sock);
    post_three_writes(&mut r);
    r.wait_used().expect("the first request completes");
    (d, r)
}

/// `GET_VRING_BASE` stops the queue: every request the card took off the
/// ring, the one the throttle holds back included, completes and is put
/// on the used ring before the base is answered. The base and the used
/// index agree, so a frontend that restarts the queue from that base
/// loses no request.
#[test]
fn stopping_a_queue_completes_and_publishes_every_request_it_took() {
    let (_d, r) = three_writes_behind_a_throttle();
    let base = r.fe.get_vring_base(0).unwrap();
    let used = r.mem.u16_at(USED + 2);
    assert!(
        base >= 2,
        "the throttle held a request the card had taken: base {base}"
    );
    assert_eq!(
        u32::from(used),
        base,
        "requests taken off the ring but never put on the used ring"
    );
    for k in 0..used {
        assert_eq!(r.mem.read(STATUS + u64::from(k), 1)[0], S_OK, "request {k}");
    }
}

/// A card stopped (SIGTERM: a service restart, an upgrade) while a
/// frontend is connected first completes onto the used ring what its
/// queues took, the request the throttle holds back included, and takes
/// nothing more; then it closes the connection. The frontend, which
/// restarts its queue from the used index when it reconnects, finds each
/// request either done and reported or still waiting on the ring.
#[test]
fn a_stopping_card_reports_what_it_took_and_takes_nothing_more() {
    let (mut d, r) = three_writes_behind_a_throttle();
    d.stop();
    assert_eq!(
        r.mem.u16_at(USED + 2),
        2,
        "what was taken is on the used ring"
    );
    for k in 0..2 {
        assert_eq!(r.mem.read(STATUS + k, 1)[0], S_OK, "request {k}");
    }
    assert_eq!(
        r.mem.read(STATUS + 2, 1)[0],
        0xaa,
        "the third was not taken"
    );
}

/// The API shows where each ring stands, so that an operator can tell
/// which side a stuck disk waits on: with the throttle holding requests
/// back, the driver has offered 3, the card has answered at least the
/// first and taken no more than were offered.
#[test]
fn the_api_shows_where_each_ring_stands() {
    let (d, _r) = three_writes_behind_a_throttle();
    let vols = d.volumes();
    let v = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "v")
        .unwrap();
    let rings = v["attachment"]["rings"].as_array().expect("rings");
    assert_eq!(rings.len(), 1, "{v}");
    let r = &rings[0];
    let at = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert_eq!(at("queue"), 0);
    assert_eq!(at("avail_idx"), 3, "{r}");
    let (next, used) = (at("next_avail"), at("used_idx"));
    assert!((1..=next).contains(&used) && next <= 3, "{r}");
    // This frontend did not negotiate EVENT_IDX.
    assert!(r.get("used_event").is_none(), "{r}");
}
