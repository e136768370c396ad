//! A hostile guest: a raw vhost-user frontend (the `vhost` crate's, driven
//! by hand) puts malformed descriptor chains on the ring of volume `a`.
//! Each gets a clear error status (or, when the chain gives no place for
//! one, an empty used entry), nothing reaches the device outside `a`, the
//! neighbouring volume `b` keeps its bytes and keeps serving, and the
//! daemon stays up.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{file_bytes, pattern, Client, Daemon};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM_BYTES: usize = 4 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x3000;
const DATA: u64 = 0x10000;
const STATUS: u64 = 0x3800;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Guest memory: a shared memfd mapped here and handed to the backend.
struct GuestMem {
    fd: OwnedFd,
    base: *mut u8,
}

impl GuestMem {
    fn new() -> Self {
        // SAFETY: memfd_create with a valid C string; the fd is checked.
        let raw = unsafe { libc::memfd_create(c"hostile-guest".as_ptr(), 0) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let f = std::fs::File::from(fd);
        f.set_len(MEM_BYTES as u64).unwrap();
        let fd = OwnedFd::from(f);
        // SAFETY: mapping a file we own, shared, with a size it has.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        GuestMem {
            fd,
            base: base.cast(),
        }
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= MEM_BYTES);
        // SAFETY: bounds checked above; the mapping lives as long as self.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(gpa as usize), bytes.len())
        };
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= MEM_BYTES);
        let mut v = vec![0u8; len];
        // SAFETY: bounds checked above.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(gpa as usize), v.as_mut_ptr(), len) };
        v
    }

    fn u16_at(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.read(gpa, 2).try_into().unwrap())
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.base.cast(), MEM_BYTES) };
    }
}

/// One descriptor.
#[derive(Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

struct Ring {
    mem: GuestMem,
    /// Held so the connection stays open.
    _fe: Frontend,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn connect(socket: &std::path::Path) -> Ring {
        let mem = GuestMem::new();
        let mut fe = Frontend::connect(socket, 1).expect("connect");
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        assert!(features & VIRTIO_F_VERSION_1 != 0);
        fe.set_features(features & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES))
            .unwrap();
        let pf = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
        )
        .unwrap();
        let uaddr = mem.base as u64;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_BYTES as u64,
            userspace_addr: uaddr,
            mmap_offset: 0,
            mmap_handle: mem.fd.as_raw_fd(),
        }])
        .unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_num(0, QSIZE).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: uaddr + DESC,
                used_ring_addr: uaddr + USED,
                avail_ring_addr: uaddr + AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        Ring {
            mem,
            _fe: fe,
            kick,
            call,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn put_desc(&self, i: u16, d: D) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.mem.write(DESC + u64::from(i) * 16, &b);
    }

    /// Publishes `head` on the avail ring (moving the index by `bump`) and
    /// kicks.
    fn publish(&mut self, head: u16, bump: u16) {
        let slot = self.avail_idx % QSIZE;
        self.mem
            .write(AVAIL + 4 + u64::from(slot) * 2, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(bump);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem.write(AVAIL + 2, &self.avail_idx.to_le_bytes());
        self.kick.write(1).unwrap();
    }

    /// Submits a chain laid out from descriptor 0 and waits for its used
    /// entry: (id, len).
    fn submit(&mut self, chain: &[D]) -> (u32, u32) {
        for (i, d) in chain.iter().enumerate() {
            self.put_desc(i as u16, *d);
        }
        self.publish(0, 1);
        self.wait_used().expect("no used entry within 10 s")
    }

    fn wait_used(&mut self) -> Option<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.mem.u16_at(USED + 2) == self.used_seen {
            if Instant::now() > deadline {
                return None;
            }
            let _ = self.call.read();
            std::thread::sleep(Duration::from_millis(1));
        }
        let slot = self.used_seen % QSIZE;
        let e = self.mem.read(USED + 4 + u64::from(slot) * 8, 8);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((
            u32::from_le_bytes(e[0..4].try_into().unwrap()),
            u32::from_le_bytes(e[4..8].try_into().unwrap()),
        ))
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(at, &h);
    }

    fn status(&self) -> u8 {
        self.mem.read(STATUS, 1)[0]
    }

    fn reset_status(&self) {
        self.mem.write(STATUS, &[0xaa]);
    }
}

fn hdr() -> D {
    D {
        addr: HDR,
        len: 16,
        flags: F_NEXT,
        next: 1,
    }
}
fn status_desc(_i: u16) -> D {
    D {
        addr: STATUS,
        len: 1,
        flags: F_WRITE,
        next: 0,
    }
}

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_WRITE_ZEROES: u32 = 13;

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
    for k in 0u16..3 {
        let (hdr_at, status_at) = (HDR + u64::from(k) * 16, STATUS + u64::from(k));
        r.header(hdr_at, T_OUT, u64::from(k) * 8);
        r.mem.write(status_at, &[0xaa]);
        let base = 3 * k;
        r.put_desc(
            base,
            D {
                addr: hdr_at,
                len: 16,
                flags: F_NEXT,
                next: base + 1,
            },
        );
        r.put_desc(
            base + 1,
            D {
                addr: DATA + u64::from(k) * 4096,
                len: 4096,
                flags: F_NEXT,
                next: base + 2,
            },
        );
        r.put_desc(
            base + 2,
            D {
                addr: status_at,
                len: 1,
                flags: F_WRITE,
                next: 0,
            },
        );
        r.publish(base, 1);
    }
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
    let base = r._fe.get_vring_base(0).unwrap();
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
