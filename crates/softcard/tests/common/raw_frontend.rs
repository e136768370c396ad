//! A raw vhost-user frontend (the `vhost` crate's, driven by hand) with
//! its own guest memory and one split ring: for tests that put exactly the
//! descriptors they mean on the ring and send exactly the messages they
//! mean.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const MEM_BYTES: usize = 4 << 20;
pub const QSIZE: u16 = 16;
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const HDR: u64 = 0x3000;
pub const DATA: u64 = 0x10000;
pub const STATUS: u64 = 0x3800;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Guest memory: a shared memfd mapped here and handed to the backend.
pub struct GuestMem {
    pub fd: OwnedFd,
    pub base: *mut u8,
}

impl GuestMem {
    pub fn new() -> Self {
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

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= MEM_BYTES);
        // SAFETY: bounds checked above; the mapping lives as long as self.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(gpa as usize), bytes.len())
        };
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= MEM_BYTES);
        let mut v = vec![0u8; len];
        // SAFETY: bounds checked above.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(gpa as usize), v.as_mut_ptr(), len) };
        v
    }

    pub fn u16_at(&self, gpa: u64) -> u16 {
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
pub struct D {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub struct Ring {
    pub mem: GuestMem,
    pub fe: Frontend,
    pub kick: EventFd,
    pub call: EventFd,
    pub avail_idx: u16,
    pub used_seen: u16,
}

impl Ring {
    /// Connects with fresh guest memory and starts queue 0 from index 0.
    pub fn connect(socket: &std::path::Path) -> Ring {
        Ring::connect_with(
            socket,
            GuestMem::new(),
            VhostUserProtocolFeatures::empty(),
            |_| Ok(()),
        )
        .expect("connect")
    }

    /// Connects with `mem` (a guest that was served before keeps its
    /// rings), negotiates `extra` protocol features besides CONFIG and MQ,
    /// calls `before_start` once the memory table is set (where a
    /// frontend sets up its inflight region), then starts queue 0 at the
    /// used index found in `mem`, as QEMU does after a reconnect.
    pub fn connect_with(
        socket: &std::path::Path,
        mem: GuestMem,
        extra: VhostUserProtocolFeatures,
        before_start: impl FnOnce(&mut Frontend) -> vhost::Result<()>,
    ) -> vhost::Result<Ring> {
        Ring::connect_features(socket, mem, 0, extra, before_start)
    }

    /// [`Ring::connect_with`], also acking the `virtio` feature bits in
    /// `virtio` (such as [`VIRTIO_RING_F_EVENT_IDX`]) where offered.
    pub fn connect_features(
        socket: &std::path::Path,
        mem: GuestMem,
        virtio: u64,
        extra: VhostUserProtocolFeatures,
        before_start: impl FnOnce(&mut Frontend) -> vhost::Result<()>,
    ) -> vhost::Result<Ring> {
        let mut fe = Frontend::connect(socket, 1)?;
        fe.set_owner()?;
        let features = fe.get_features()?;
        assert!(features & VIRTIO_F_VERSION_1 != 0);
        assert_eq!(features & virtio, virtio, "features offered");
        fe.set_features(features & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | virtio))?;
        let pf = fe.get_protocol_features()?;
        let pf = pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ | extra);
        fe.set_protocol_features(pf)?;
        if pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every message is answered: a refusal shows where it happens.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let uaddr = mem.base as u64;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_BYTES as u64,
            userspace_addr: uaddr,
            mmap_offset: 0,
            mmap_handle: mem.fd.as_raw_fd(),
        }])?;
        before_start(&mut fe)?;
        let kick = EventFd::new(0).expect("eventfd");
        let call = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        fe.set_vring_num(0, QSIZE)?;
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
        )?;
        let used = mem.u16_at(USED + 2);
        fe.set_vring_base(0, used)?;
        fe.set_vring_call(0, &call)?;
        fe.set_vring_kick(0, &kick)?;
        fe.set_vring_enable(0, true)?;
        let avail_idx = mem.u16_at(AVAIL + 2);
        Ok(Ring {
            mem,
            fe,
            kick,
            call,
            avail_idx,
            used_seen: used,
        })
    }

    pub fn put_desc(&self, i: u16, d: D) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.mem.write(DESC + u64::from(i) * 16, &b);
    }

    /// Publishes `head` on the avail ring (moving the index by `bump`) and
    /// kicks.
    pub fn publish(&mut self, head: u16, bump: u16) {
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
    pub fn submit(&mut self, chain: &[D]) -> (u32, u32) {
        for (i, d) in chain.iter().enumerate() {
            self.put_desc(i as u16, *d);
        }
        self.publish(0, 1);
        self.wait_used().expect("no used entry within 10 s")
    }

    pub fn wait_used(&mut self) -> Option<(u32, u32)> {
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

    /// With EVENT_IDX: asks to be interrupted once the used index passes
    /// `idx` (the driver's `used_event`, after the avail ring).
    pub fn set_used_event(&self, idx: u16) {
        self.mem
            .write(AVAIL + 4 + 2 * u64::from(QSIZE), &idx.to_le_bytes());
    }

    /// Whether the backend signals the call fd within `limit` (and clears
    /// it).
    pub fn signalled_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.call.read().is_ok() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(at, &h);
    }

    pub fn status(&self) -> u8 {
        self.mem.read(STATUS, 1)[0]
    }

    pub fn reset_status(&self) {
        self.mem.write(STATUS, &[0xaa]);
    }
}

pub fn hdr() -> D {
    D {
        addr: HDR,
        len: 16,
        flags: F_NEXT,
        next: 1,
    }
}
pub fn status_desc(_i: u16) -> D {
    D {
        addr: STATUS,
        len: 1,
        flags: F_WRITE,
        next: 0,
    }
}

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_WRITE_ZEROES: u32 = 13;

/// Posts three 4 KiB writes to sectors 0, 8 and 16 (heads 0, 3 and 6;
/// statuses at `STATUS + k`, set to 0xaa until answered).
pub fn post_three_writes(r: &mut Ring) {
    for k in 0u16..3 {
        let (hdr_at, status_at) = (HDR + u64::from(k) * 16, STATUS + u64::from(k));
        r.header(hdr_at, T_OUT, u64::from(k) * 8);
        r.mem.write(status_at, &[0xaa]);
        r.mem.write(
            DATA + u64::from(k) * 4096,
            &super::pattern(u64::from(k) + 100, 4096),
        );
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
}
