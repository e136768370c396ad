//! The `TPACKET_V2` receive ring a packet socket fills.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use super::socket::*;

/// Frame size of the receive ring: a 4096-byte path MTU packet with every
/// RoCEv2 header and the ring's own header fits.
pub(super) const FRAME_SIZE: usize = 8192;
/// Frames per 64 KiB block, and blocks: 1024 frames (8 MiB) per engine.
const BLOCK_SIZE: usize = 64 << 10;
const BLOCKS: usize = 128;

/// A `TPACKET_V2` receive ring.
#[derive(Debug)]
pub(super) struct RxRing {
    pub(super) fd: OwnedFd,
    pub(super) map: NonNull<u8>,
    pub(super) frames: usize,
    pub(super) head: usize,
}

// SAFETY: the mapping is owned by this ring alone and is only touched
// through `&mut self` or a `Frame` handed out by it; moving the ring to
// another thread moves all access with it.
unsafe impl Send for RxRing {}

impl Drop for RxRing {
    fn drop(&mut self) {
        // SAFETY: `map` is the mapping created in `open`, of this length,
        // and nothing refers to it any more (frames borrow `RawIo`).
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), BLOCK_SIZE * BLOCKS);
        }
    }
}

impl RxRing {
    pub(super) fn open() -> io::Result<Self> {
        // Protocol 0: nothing is received until `bind` names IPv4, after
        // the ring and the filter are in place.
        // SAFETY: plain socket(2); the fd is checked and owned.
        let fd = unsafe {
            OwnedFd::from_raw_fd(check(libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                0,
            ))?)
        };
        let set = |opt: libc::c_int, v: *const libc::c_void, len: usize| -> io::Result<()> {
            // SAFETY: `v` points to `len` readable bytes for the call.
            check(unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    opt,
                    v,
                    len as libc::socklen_t,
                )
            })
            .map(|_| ())
        };
        let version: libc::c_int = 1; // TPACKET_V2
        set(
            libc::PACKET_VERSION,
            (&raw const version).cast(),
            std::mem::size_of::<libc::c_int>(),
        )?;
        // Our own datagrams to a local peer pass the tap twice on
        // loopback; the outgoing copy is not for us.
        let one: libc::c_int = 1;
        set(
            libc::PACKET_IGNORE_OUTGOING,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>(),
        )?;
        // A virtio-net header before each datagram says whether (and
        // where) a GSO datagram splits; datagrams bigger than a frame are
        // queued whole on the socket as well.
        set(
            PACKET_VNET_HDR,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>(),
        )?;
        set(
            PACKET_COPY_THRESH,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>(),
        )?;
        set_int(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            16 << 20,
        )?;
        let req = libc::tpacket_req {
            tp_block_size: BLOCK_SIZE as libc::c_uint,
            tp_block_nr: BLOCKS as libc::c_uint,
            tp_frame_size: FRAME_SIZE as libc::c_uint,
            tp_frame_nr: (BLOCK_SIZE / FRAME_SIZE * BLOCKS) as libc::c_uint,
        };
        set(
            libc::PACKET_RX_RING,
            (&raw const req).cast(),
            std::mem::size_of::<libc::tpacket_req>(),
        )?;
        // SAFETY: maps the ring just configured on `fd`, shared with the
        // kernel; the result is checked.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BLOCK_SIZE * BLOCKS,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(map.cast::<u8>()).ok_or(io::ErrorKind::Other)?;
        Ok(RxRing {
            fd,
            map,
            frames: BLOCK_SIZE / FRAME_SIZE * BLOCKS,
            head: 0,
        })
    }

    pub(super) fn bind(&self) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_ll is valid; fields set below.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as libc::c_ushort;
        sa.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        // Interface index 0: every interface.
        sa.sll_ifindex = 0;
        // SAFETY: `sa` is a valid sockaddr_ll for the length given.
        check(unsafe {
            libc::bind(
                self.fd.as_raw_fd(),
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        Ok(())
    }

    /// The status word of frame `slot`, shared with the kernel.
    pub(super) fn status(&self, slot: usize) -> &AtomicU32 {
        // SAFETY: frames are FRAME_SIZE apart from the start of the
        // mapping (BLOCK_SIZE is a multiple of FRAME_SIZE), each starts
        // with a `tpacket2_hdr` whose first field is the 32-bit aligned
        // status word, which the kernel and we access atomically.
        unsafe { &*self.map.as_ptr().add(slot * FRAME_SIZE).cast::<AtomicU32>() }
    }

    /// The ring header of frame `slot` (meaningful while the frame is
    /// ours).
    pub(super) fn header(&self, slot: usize) -> libc::tpacket2_hdr {
        // SAFETY: as in `status`; the header lies within the frame and is
        // not written by the kernel while the frame's status says it is
        // ours (the caller has seen TP_STATUS_USER with Acquire).
        unsafe {
            std::ptr::read_volatile(
                self.map
                    .as_ptr()
                    .add(slot * FRAME_SIZE)
                    .cast::<libc::tpacket2_hdr>(),
            )
        }
    }

    pub(super) fn release(&self, slot: usize) {
        self.status(slot)
            .store(libc::TP_STATUS_KERNEL, Ordering::Release);
    }
}
