//! Datagram I/O for RoCEv2 from user space.
//!
//! The ICRC covers the IPv4 identification, which the kernel picks for
//! UDP sockets and does not report on receive. So the engine sends whole
//! IPv4 datagrams it builds itself (`IPPROTO_RAW`, DF set, its own ID) and
//! receives whole IPv4 datagrams through a packet socket (`AF_PACKET`,
//! cooked, IPv4 only) with a memory-mapped receive ring (`TPACKET_V2`):
//! the kernel copies each datagram for us into a ring frame and flips the
//! frame's status word, so a busy-polling engine finds packets without a
//! system call, and handles them straight from the ring. A plain UDP
//! socket stays bound to port 4791 only so that the kernel does not answer
//! peers with ICMP port-unreachable; a filter makes it drop everything.
//! Needs `CAP_NET_RAW`.

use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::wire::{self, Flow, ROCEV2_PORT};

/// Seeded faults injected on the way out, for tests: each datagram is
/// dropped, duplicated, held back behind the next one, or has a byte
/// flipped, with the given probabilities (per million).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Seed of the generator.
    pub seed: u64,
    /// Drop probability, per million.
    pub drop_ppm: u32,
    /// Duplicate probability, per million.
    pub dup_ppm: u32,
    /// Reorder probability, per million.
    pub reorder_ppm: u32,
    /// Corruption probability, per million.
    pub corrupt_ppm: u32,
}

/// Raw-socket I/O bound to one local IPv4 address.
#[derive(Debug)]
pub struct RawIo {
    send: OwnedFd,
    rx: RxRing,
    _guard: UdpSocket,
    local: Ipv4Addr,
    next_id: u16,
    faults: Faults,
    rng: u64,
    held: Option<(Ipv4Addr, Vec<u8>)>,
    /// Datagrams the fault injector dropped, duplicated, reordered,
    /// corrupted.
    pub injected: [u64; 4],
    /// Datagrams to port 4791 on our address that were not well-formed
    /// IPv4/UDP (fragments, bad header checksum, truncated, too long for
    /// a ring frame).
    pub malformed: u64,
}

/// A received datagram, still in its ring frame until
/// [`RawIo::release`]: its flow and where its UDP payload lies.
#[derive(Debug)]
pub struct Frame {
    /// Addresses, ports and IPv4 identification.
    pub flow: Flow,
    ptr: NonNull<u8>,
    len: usize,
    slot: usize,
}

impl Frame {
    /// The UDP payload (the RoCEv2 packet, ICRC included), read in place.
    ///
    /// # Safety
    ///
    /// The slice must not be used after the frame is released or its
    /// `RawIo` is dropped: the kernel reuses released frames, and dropping
    /// unmaps the ring.
    pub unsafe fn payload<'a>(&self) -> &'a [u8] {
        // SAFETY: `ptr..ptr+len` lies inside the ring mapping (checked
        // against the frame when it was taken); the kernel does not write
        // a frame whose status is TP_STATUS_USER, which this one keeps
        // until released; the caller keeps the mapping alive.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

/// Frame size of the receive ring: a 4096-byte path MTU packet with every
/// RoCEv2 header and the ring's own header fits.
const FRAME_SIZE: usize = 8192;
/// Frames per 64 KiB block, and blocks: 1024 frames (8 MiB) per engine.
const BLOCK_SIZE: usize = 64 << 10;
const BLOCKS: usize = 128;

/// A `TPACKET_V2` receive ring.
#[derive(Debug)]
struct RxRing {
    fd: OwnedFd,
    map: NonNull<u8>,
    frames: usize,
    head: usize,
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
    fn open() -> io::Result<Self> {
        // Protocol 0: nothing is received until `bind` names IPv4, after
        // the ring and the filter are in place.
        // SAFETY: plain socket(2); the fd is checked and owned.
        let fd = unsafe {
            OwnedFd::from_raw_fd(check(libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
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

    fn bind(&self) -> io::Result<()> {
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
    fn status(&self, slot: usize) -> &AtomicU32 {
        // SAFETY: frames are FRAME_SIZE apart from the start of the
        // mapping (BLOCK_SIZE is a multiple of FRAME_SIZE), each starts
        // with a `tpacket2_hdr` whose first field is the 32-bit aligned
        // status word, which the kernel and we access atomically.
        unsafe { &*self.map.as_ptr().add(slot * FRAME_SIZE).cast::<AtomicU32>() }
    }

    /// The ring header of frame `slot` (meaningful while the frame is
    /// ours).
    fn header(&self, slot: usize) -> libc::tpacket2_hdr {
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

    fn release(&self, slot: usize) {
        self.status(slot)
            .store(libc::TP_STATUS_KERNEL, Ordering::Release);
    }
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Installs a classic BPF filter on the receive socket so that the kernel
/// passes only RoCEv2 datagrams for `local` (IPv4 destination and UDP
/// destination port 4791; IP options are rare enough to be refused here):
/// on loopback the socket would otherwise see every UDP datagram on the
/// host, its own included.
fn attach_filter(fd: &OwnedFd, local: Ipv4Addr) -> io::Result<()> {
    const LD_W_ABS: u16 = 0x20;
    const LD_H_ABS: u16 = 0x28;
    const LD_B_ABS: u16 = 0x30;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let ins = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let prog = [
        ins(LD_B_ABS, 0, 0, 0),  // version/IHL
        ins(JEQ_K, 0, 5, 0x45),  // IPv4 without options
        ins(LD_W_ABS, 0, 0, 16), // destination address
        ins(JEQ_K, 0, 3, u32::from_be_bytes(local.octets())),
        ins(LD_H_ABS, 0, 0, 22), // UDP destination port
        ins(JEQ_K, 0, 1, u32::from(ROCEV2_PORT)),
        ins(RET_K, 0, 0, 0xffff), // accept
        ins(RET_K, 0, 0, 0),      // drop
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points to `prog`, alive for the call; the kernel
    // copies the program.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

impl RawIo {
    /// Opens the sockets for `local` (UDP port 4791).
    pub fn open(local: Ipv4Addr) -> io::Result<Self> {
        let guard = UdpSocket::bind((local, ROCEV2_PORT))?;
        drop_all(&guard)?;
        // SAFETY: plain socket(2) call; the fd is checked and owned.
        let send = unsafe {
            OwnedFd::from_raw_fd(check(libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            ))?)
        };
        let rx = RxRing::open()?;
        attach_filter(&rx.fd, local)?;
        rx.bind()?;
        Ok(RawIo {
            send,
            rx,
            _guard: guard,
            local,
            next_id: 1,
            faults: Faults::default(),
            rng: 1,
            held: None,
            injected: [0; 4],
            malformed: 0,
        })
    }

    /// Injects faults from now on (tests).
    pub fn set_faults(&mut self, f: Faults) {
        self.faults = f;
        self.rng = f.seed | 1;
    }

    fn roll(&mut self, ppm: u32) -> bool {
        if ppm == 0 {
            return false;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 1_000_000) < u64::from(ppm)
    }

    fn transmit(&self, dst: Ipv4Addr, d: &[u8]) -> io::Result<()> {
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `d` and `sa` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.send.as_raw_fd(),
                d.as_ptr().cast(),
                d.len(),
                0,
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends `head` and `body` as one datagram (sendmsg with two iovecs).
    fn transmit_parts(&self, dst: Ipv4Addr, head: &[u8], body: &[u8]) -> io::Result<()> {
        let mut sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        let mut iov = [
            libc::iovec {
                iov_base: head.as_ptr() as *mut libc::c_void,
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: body.as_ptr() as *mut libc::c_void,
                iov_len: body.len(),
            },
        ];
        // SAFETY: an all-zero msghdr is valid; the fields set below point
        // at `sa` and `iov`, which outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&raw mut sa).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        // SAFETY: `msg` describes valid memory for the kernel to read; the
        // iovecs are only read (sendmsg does not write through them).
        let n = unsafe { libc::sendmsg(self.send.as_raw_fd(), &msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends a datagram held back by the reorder fault.
    fn release_held(&mut self) -> io::Result<()> {
        if let Some((dst, d)) = self.held.take() {
            self.transmit(dst, &d)?;
        }
        Ok(())
    }

    /// The local address.
    pub fn local(&self) -> Ipv4Addr {
        self.local
    }

    /// Sends one RoCEv2 packet (already encoded, ICRC space included) to
    /// `dst`, sealing its ICRC for the header built here.
    pub fn send(&mut self, dst: Ipv4Addr, src_port: u16, packet: &mut [u8]) -> io::Result<()> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let flow = Flow {
            src: self.local,
            dst,
            src_port,
            dst_port: ROCEV2_PORT,
            ip_id: id,
        };
        wire::seal(&flow, packet);
        let udp_len = u16::try_from(8 + packet.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        let total = udp_len + 20;
        let mut d = Vec::with_capacity(28);
        d.extend_from_slice(&[0x45, 0]);
        d.extend_from_slice(&total.to_be_bytes());
        d.extend_from_slice(&id.to_be_bytes());
        d.extend_from_slice(&0x4000u16.to_be_bytes());
        d.extend_from_slice(&[64, 17, 0, 0]);
        d.extend_from_slice(&self.local.octets());
        d.extend_from_slice(&dst.octets());
        let sum = ip_checksum(&d[..20]);
        d[10..12].copy_from_slice(&sum.to_be_bytes());
        d.extend_from_slice(&src_port.to_be_bytes());
        d.extend_from_slice(&ROCEV2_PORT.to_be_bytes());
        d.extend_from_slice(&udp_len.to_be_bytes());
        d.extend_from_slice(&[0, 0]); // no UDP checksum (allowed on IPv4)
        let f = self.faults;
        if f.drop_ppm == 0 && f.dup_ppm == 0 && f.reorder_ppm == 0 && f.corrupt_ppm == 0 {
            // No fault injection: the headers and the packet go out as two
            // pieces of one datagram, without copying the packet.
            return self.transmit_parts(dst, &d, packet);
        }
        d.extend_from_slice(packet);
        if self.roll(f.drop_ppm) {
            self.injected[0] += 1;
            return self.release_held();
        }
        if self.roll(f.corrupt_ppm) {
            self.injected[3] += 1;
            let i = 28 + (self.rng as usize) % (d.len() - 28);
            d[i] ^= 0x10;
        }
        if self.held.is_none() && self.roll(f.reorder_ppm) {
            self.injected[2] += 1;
            self.held = Some((dst, d));
            return Ok(());
        }
        self.transmit(dst, &d)?;
        if self.roll(f.dup_ppm) {
            self.injected[1] += 1;
            self.transmit(dst, &d)?;
        }
        self.release_held()
    }

    /// The next RoCEv2 datagram addressed to us, waiting up to
    /// `timeout` for one (zero: only what is already there). It stays in
    /// its ring frame, read in place, until [`RawIo::release`]; frames
    /// must be released in the order they were taken.
    pub fn recv_frame(&mut self, timeout: Duration) -> io::Result<Option<Frame>> {
        self.release_held()?;
        let mut deadline = None;
        loop {
            let slot = self.rx.head;
            if self.rx.status(slot).load(Ordering::Acquire) & libc::TP_STATUS_USER == 0 {
                // Nothing queued: wait (unless the caller only peeks).
                if timeout.is_zero() {
                    return Ok(None);
                }
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                let mut pfd = libc::pollfd {
                    fd: self.rx.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
                // SAFETY: one valid pollfd.
                check(unsafe { libc::poll(&mut pfd, 1, ms) })?;
                continue;
            }
            self.rx.head = (slot + 1) % self.rx.frames;
            match self.parse_frame(slot) {
                Some(f) => return Ok(Some(f)),
                None => {
                    self.malformed += 1;
                    self.rx.release(slot);
                }
            }
        }
    }

    /// Checks the IPv4 and UDP headers of the datagram in frame `slot`.
    fn parse_frame(&self, slot: usize) -> Option<Frame> {
        let h = self.rx.header(slot);
        let net = usize::from(h.tp_net);
        let snap = h.tp_snaplen as usize;
        if h.tp_len as usize != snap || net.checked_add(snap)? > FRAME_SIZE {
            return None; // truncated to the frame
        }
        // SAFETY: `net..net+snap` lies inside frame `slot` (checked just
        // above), which is ours until released.
        let d = unsafe {
            std::slice::from_raw_parts(self.rx.map.as_ptr().add(slot * FRAME_SIZE + net), snap)
        };
        if d.len() < 28 || d[0] != 0x45 || ip_checksum(&d[..20]) != 0 {
            return None;
        }
        // The tap sees datagrams before IP reassembly and trimming:
        // refuse fragments (RoCEv2 sets DF) and use the IP length, not
        // the frame's (Ethernet may have padded it).
        let total = usize::from(u16::from_be_bytes([d[2], d[3]]));
        if u16::from_be_bytes([d[6], d[7]]) & 0x3fff != 0 || total < 28 || total > d.len() {
            return None;
        }
        let udp_len = usize::from(u16::from_be_bytes([d[24], d[25]]));
        if udp_len != total - 20 || d[9] != 17 {
            return None;
        }
        let dst = Ipv4Addr::new(d[16], d[17], d[18], d[19]);
        let dport = u16::from_be_bytes([d[22], d[23]]);
        if dport != ROCEV2_PORT || dst != self.local {
            return None;
        }
        let flow = Flow {
            src: Ipv4Addr::new(d[12], d[13], d[14], d[15]),
            dst,
            src_port: u16::from_be_bytes([d[20], d[21]]),
            dst_port: dport,
            ip_id: u16::from_be_bytes([d[4], d[5]]),
        };
        Some(Frame {
            flow,
            ptr: NonNull::from(&d[28..]).cast::<u8>(),
            len: total - 28,
            slot,
        })
    }

    /// Gives frame `f` back to the kernel.
    pub fn release(&mut self, f: Frame) {
        self.rx.release(f.slot);
    }
}

/// Makes `sock` drop every datagram before it is queued (a one-instruction
/// filter): the socket exists only so that port 4791 counts as open.
fn drop_all(sock: &UdpSocket) -> io::Result<()> {
    let prog = [libc::sock_filter {
        code: 0x06, // ret #0
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points to `prog`, alive for the call; the kernel
    // copies the program.
    check(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    })?;
    Ok(())
}
