//! The inflight region (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) driven by a
//! raw frontend: a card killed with requests in flight leaves them listed
//! in the region, and the next card takes exactly those again, in order,
//! once; a region that is the wrong size, unsealed, corrupt, names
//! descriptors that are not on the ring, or is set twice under running
//! queues is refused for that interface alone.

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use common::raw_frontend::*;
use common::{file_bytes, pattern, Client, Daemon};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};

/// Bytes of one queue of 16 entries in layout version 1 (16-byte header,
/// 16 bytes a descriptor, rounded up to 64).
const REGION_BYTES: u64 = 320;

fn inflight_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::INFLIGHT_SHMFD | VhostUserProtocolFeatures::REPLY_ACK
}

fn ask() -> VhostUserInflight {
    VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: QSIZE,
    }
}

/// A frontend's first start: asks for a region and sets it.
fn get_and_set(fe: &mut Frontend) -> vhost::Result<(VhostUserInflight, File)> {
    let (reply, file) = fe.get_inflight_fd(&ask())?;
    fe.set_inflight_fd(&reply, file.as_raw_fd())?;
    Ok((reply, file))
}

fn metric(d: &Daemon, volume: &str, name: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["card", "volume", "show", volume])).unwrap();
    v["attachment"]["metrics"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {v}"))
}

/// Waits until the restarted card serves `volume`'s socket again.
fn wait_listening(d: &Daemon, volume: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&d.ok(&["card", "volume", "show", volume])).unwrap();
        if v["attachment"]["state"] == "listening" {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "never listening: {v}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn u8_at(f: &File, off: u64) -> u8 {
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0]
}

fn u16_at(f: &File, off: u64) -> u16 {
    let mut b = [0u8; 2];
    f.read_exact_at(&mut b, off).unwrap();
    u16::from_le_bytes(b)
}

/// Descriptor `head`'s entry in queue 0's part of the region.
fn desc(head: u64) -> u64 {
    16 + 16 * head
}

#[test]
fn a_killed_card_leaves_its_requests_in_the_region_and_the_next_takes_them_once() {
    let mut d = Daemon::start(
        "state_file = \"@DIR@/attachments.json\"\nrdma_socket = \"@DIR@/rdma.sock\"\n\
         [[device]]\nname = \"f\"\nkind = \"file\"\npath = \"@DIR@/f.img\"\nsize = \"64MiB\"\n",
    );
    d.ok(&[
        "card", "volume", "create", "v", "--device", "f", "--size", "8MiB",
    ]);
    let off = d.offset_of("v");
    let sock = d.path("v.sock");
    // One request a second: the second write is taken off the ring and
    // held back by the throttle when the card dies.
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
    let mut region = None;
    let mut r = Ring::connect_with(&sock, GuestMem::new(), inflight_features(), |fe| {
        region = Some(get_and_set(fe)?);
        Ok(())
    })
    .expect("connect");
    let (reply, file) = region.unwrap();
    assert_eq!(reply.mmap_size, REGION_BYTES);
    assert_eq!(metric(&d, "v", "inflight_regions"), 1);
    post_three_writes(&mut r);
    assert_eq!(r.wait_used(), Some((0, 1)), "the first write completes");
    // The region says what the card holds: head 3 in flight, 0 answered.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while u8_at(&file, desc(3)) != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "head 3 never in flight"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(u16_at(&file, 8), 1, "layout version");
    assert_eq!(u16_at(&file, 10), QSIZE, "desc_num");
    assert_eq!(u16_at(&file, 14), 1, "used_idx");
    assert_eq!(u8_at(&file, desc(0)), 0, "head 0 was answered");
    assert_eq!(u8_at(&file, desc(6)), 0, "head 6 was never taken");

    // The card dies with the second write taken and unanswered. The
    // frontend keeps its memory, its ring and the region.
    let Ring { mem, used_seen, .. } = r;
    d.crash_and_restart();
    wait_listening(&d, "v");
    let mut r = Ring::connect_with(&sock, mem, inflight_features(), |fe| {
        fe.set_inflight_fd(&reply, file.as_raw_fd())
    })
    .expect("reconnect");
    r.used_seen = used_seen;
    // The second write (head 3), then the third (head 6), each once.
    assert_eq!(r.wait_used(), Some((3, 1)));
    assert_eq!(r.wait_used(), Some((6, 1)));
    assert_eq!(r.mem.u16_at(USED + 2), 3);
    for k in 0..3u64 {
        assert_eq!(r.mem.read(STATUS + k, 1)[0], S_OK, "write {k}");
        assert_eq!(
            file_bytes(&d.path("f.img"), off + k * 4096, 4096),
            pattern(k + 100, 4096),
            "write {k} on the device"
        );
    }
    assert_eq!(metric(&d, "v", "resubmitted_requests"), 1);
    assert_eq!(
        metric(&d, "v", "write_ops"),
        2,
        "only writes 2 and 3 ran again"
    );
    assert_eq!(metric(&d, "v", "inflight_regions"), 1);
    assert_eq!(u8_at(&file, desc(3)), 0, "head 3 answered in the region");
    assert_eq!(u16_at(&file, 14), 3, "used_idx");
}

/// Tries to connect to `sock` with `before_start`; the interface must
/// refuse, and count it.
fn refused(
    d: &Daemon,
    sock: &std::path::Path,
    what: &str,
    mem: GuestMem,
    before_start: impl FnOnce(&mut Frontend) -> vhost::Result<()>,
) {
    let before = metric(d, "a", "inflight_refused");
    let r = Ring::connect_with(sock, mem, inflight_features(), before_start);
    assert!(r.is_err(), "{what}: accepted");
    assert_eq!(
        metric(d, "a", "inflight_refused"),
        before + 1,
        "{what}: not counted as refused"
    );
}

/// A region from the card, rewritten by `corrupt` before it is set.
fn set_corrupted(fe: &mut Frontend, corrupt: impl FnOnce(&File)) -> vhost::Result<()> {
    let (reply, file) = fe.get_inflight_fd(&ask())?;
    corrupt(&file);
    fe.set_inflight_fd(&reply, file.as_raw_fd())
}

#[test]
fn a_bad_inflight_region_is_refused_for_its_interface_alone() {
    let mut d = Daemon::start(
        "[[device]]\nname = \"nvme0\"\nkind = \"file\"\npath = \"@DIR@/f.img\"\nsize = \"64MiB\"\n",
    );
    let sock_a = d.volume_on("a", "8MiB", "--vhost-user", "a.sock");
    let sock_b = d.volume_on("b", "8MiB", "--vhost-user", "b.sock");
    let (off_a, off_b) = (d.offset_of("a"), d.offset_of("b"));
    let dev = d.path("f.img");
    let b_data = pattern(7, 1 << 20);
    let mut b = Client::connect(&sock_b, 1).unwrap();
    assert_eq!(b.write(0, 0, &b_data), 0);
    assert_eq!(b.flush(0), 0);
    let before_a = file_bytes(&dev, off_a, 8 << 20);

    refused(
        &d,
        &sock_a,
        "a region of another size",
        GuestMem::new(),
        |fe| {
            let (mut reply, file) = fe.get_inflight_fd(&ask())?;
            reply.mmap_size += 64;
            fe.set_inflight_fd(&reply, file.as_raw_fd())
        },
    );
    refused(
        &d,
        &sock_a,
        "more queues than offered",
        GuestMem::new(),
        |fe| {
            let mut big = ask();
            big.num_queues = 9;
            fe.get_inflight_fd(&big).map(|_| ())
        },
    );
    refused(&d, &sock_a, "an unsealed file", GuestMem::new(), |fe| {
        // SAFETY: memfd_create with a valid C string; the fd is checked.
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), 0) };
        assert!(raw >= 0);
        // SAFETY: a fresh fd we own.
        let f = unsafe { File::from_raw_fd(raw) };
        f.set_len(REGION_BYTES).unwrap();
        let mut m = ask();
        m.mmap_size = REGION_BYTES;
        fe.set_inflight_fd(&m, f.as_raw_fd())
    });
    refused(
        &d,
        &sock_a,
        "an unknown layout version",
        GuestMem::new(),
        |fe| set_corrupted(fe, |f| f.write_all_at(&9u16.to_le_bytes(), 8).unwrap()),
    );
    refused(
        &d,
        &sock_a,
        "an invalid in-flight flag",
        GuestMem::new(),
        |fe| {
            set_corrupted(fe, |f| {
                f.write_all_at(&1u16.to_le_bytes(), 8).unwrap();
                f.write_all_at(&QSIZE.to_le_bytes(), 10).unwrap();
                f.write_all_at(&[0x7f], desc(2)).unwrap();
            })
        },
    );
    // Descriptor 5 in flight, with nothing on the avail ring.
    refused(
        &d,
        &sock_a,
        "a descriptor not on the ring",
        GuestMem::new(),
        |fe| {
            set_corrupted(fe, |f| {
                f.write_all_at(&1u16.to_le_bytes(), 8).unwrap();
                f.write_all_at(&QSIZE.to_le_bytes(), 10).unwrap();
                f.write_all_at(&[1], desc(5)).unwrap();
            })
        },
    );
    // Descriptor 5 in flight, while the ring's next request is head 0 (a
    // good write the card must not run on this region's word).
    let mem = GuestMem::new();
    mem.write(AVAIL + 4, &0u16.to_le_bytes());
    mem.write(AVAIL + 2, &1u16.to_le_bytes());
    refused(
        &d,
        &sock_a,
        "another descriptor than the ring's",
        mem,
        |fe| {
            set_corrupted(fe, |f| {
                f.write_all_at(&1u16.to_le_bytes(), 8).unwrap();
                f.write_all_at(&QSIZE.to_le_bytes(), 10).unwrap();
                f.write_all_at(&[1], desc(5)).unwrap();
            })
        },
    );

    // Set twice while the queue runs: refused, and the connection ends.
    let mut region = None;
    let r = Ring::connect_with(&sock_a, GuestMem::new(), inflight_features(), |fe| {
        region = Some(get_and_set(fe)?);
        Ok(())
    })
    .expect("a good region is accepted");
    let (reply, file) = region.unwrap();
    let Ring { mut fe, .. } = r;
    let before = metric(&d, "a", "inflight_refused");
    assert!(fe.set_inflight_fd(&reply, file.as_raw_fd()).is_err());
    assert_eq!(metric(&d, "a", "inflight_refused"), before + 1);
    drop(fe);

    // Nothing reached a's data; b kept its bytes and its client; the
    // daemon lives; a serves the next frontend, with a region.
    assert!(d.alive());
    assert_eq!(file_bytes(&dev, off_a, 8 << 20), before_a);
    assert_eq!(b.read(0, 0, 1 << 20).unwrap(), b_data);
    assert_eq!(file_bytes(&dev, off_b, 1 << 20), b_data);
    let mut r = Ring::connect_with(&sock_a, GuestMem::new(), inflight_features(), |fe| {
        get_and_set(fe).map(|_| ())
    })
    .expect("a serves again");
    post_three_writes(&mut r);
    for head in [0, 3, 6] {
        assert_eq!(r.wait_used(), Some((head, 1)));
    }
    assert_eq!(file_bytes(&dev, off_a, 4096), pattern(100, 4096));
}

/// A card killed after putting an answer on the used ring and before
/// signalling it leaves a driver with EVENT_IDX waiting to hear of that
/// answer: no later answer passes its `used_event` again. The next card
/// to start the ring must interrupt it once (here the ring is set up in
/// the state such a card leaves behind).
#[test]
fn a_ring_that_starts_interrupts_a_driver_waiting_on_an_answer_never_signalled() {
    let d = Daemon::start(
        "[[device]]\nname = \"nvme0\"\nkind = \"file\"\npath = \"@DIR@/f.img\"\nsize = \"64MiB\"\n",
    );
    let sock = d.volume_on("v", "8MiB", "--vhost-user", "v.sock");
    let off = d.offset_of("v");
    // The ring as the dead card left it: the driver offered one request
    // (head 0) and asked to hear of used entry 0; the card answered it
    // (used index 1) and died before signalling.
    let mem = GuestMem::new();
    mem.write(AVAIL + 4, &0u16.to_le_bytes());
    mem.write(AVAIL + 2, &1u16.to_le_bytes());
    mem.write(USED + 4, &0u32.to_le_bytes());
    mem.write(USED + 8, &1u32.to_le_bytes());
    mem.write(USED + 2, &1u16.to_le_bytes());
    mem.write(AVAIL + 4 + 2 * u64::from(QSIZE), &0u16.to_le_bytes());
    let mut r = Ring::connect_features(
        &sock,
        mem,
        VIRTIO_RING_F_EVENT_IDX,
        VhostUserProtocolFeatures::empty(),
        |_| Ok(()),
    )
    .expect("connect");
    assert!(
        r.signalled_within(std::time::Duration::from_secs(10)),
        "the card started the ring without interrupting the driver"
    );
    assert_eq!(r.mem.u16_at(USED + 2), 1, "nothing was taken again");

    // From there the driver's requests are answered and signalled as it
    // asks: the next write, with `used_event` 1.
    r.set_used_event(1);
    r.header(HDR, T_OUT, 8);
    r.reset_status();
    r.mem.write(DATA, &pattern(5, 4096));
    r.put_desc(
        3,
        D {
            addr: HDR,
            len: 16,
            flags: F_NEXT,
            next: 4,
        },
    );
    r.put_desc(
        4,
        D {
            addr: DATA,
            len: 4096,
            flags: F_NEXT,
            next: 5,
        },
    );
    r.put_desc(5, status_desc(0));
    r.publish(3, 1);
    // The call fd first: `wait_used` reads it while it waits.
    assert!(
        r.signalled_within(std::time::Duration::from_secs(10)),
        "the answer the driver asked to hear of was not signalled"
    );
    assert_eq!(r.wait_used(), Some((3, 1)));
    assert_eq!(r.status(), S_OK);
    assert_eq!(
        file_bytes(&d.path("f.img"), off + 4096, 4096),
        pattern(5, 4096)
    );
}
