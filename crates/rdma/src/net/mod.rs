//! Datagram I/O for RoCEv2 from user space.
//!
//! The ICRC covers the IPv4 identification, which the kernel picks for
//! UDP sockets and does not report on receive. So the engine sends whole
//! IPv4 datagrams it builds itself (`IPPROTO_RAW`, DF set, its own ID) and
//! receives whole IPv4 datagrams through a packet socket (`AF_PACKET`,
//! IPv4 only) with a memory-mapped receive ring (`TPACKET_V2`):
//! the kernel copies each datagram for us into a ring frame and flips the
//! frame's status word, so a busy-polling engine finds packets without a
//! system call, and handles them straight from the ring. A plain UDP
//! socket stays bound to port 4791 only so that the kernel does not answer
//! peers with ICMP port-unreachable; a filter makes it drop everything.
//! Needs `CAP_NET_RAW`.
//!
//! Runs of equal-sized packets (a message split by the path MTU) go out
//! through that UDP socket as one UDP GSO send (`UDP_SEGMENT`): one
//! system call, one route lookup and one trip through the stack for up to
//! 64 KiB. The kernel gives the segments of an unconnected DF datagram
//! the IPv4 identifications 0, 1, 2, ..., which the ICRC of each packet is
//! sealed with; `open` checks that this kernel does so (a probe to its
//! own address) and otherwise sends every packet alone. Where the
//! segments stay together up to the receiver (loopback, veth), the ring
//! sees one GSO datagram with a virtio-net header saying where it splits
//! (`PACKET_VNET_HDR`); one too big for a ring frame is read from the
//! socket (`TP_STATUS_COPY`). Either way each segment is checked and
//! handled on its own, exactly as if it had arrived alone.

use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::wire::{self, Flow, ROCEV2_PORT};

mod datagram;
mod rx_ring;
mod socket;

use datagram::ip_checksum;
pub use datagram::{parse_datagram, split};
use rx_ring::{RxRing, FRAME_SIZE};
use socket::*;

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
    /// Bound to port 4791 (so the port counts as open), drops all it
    /// receives, and sends the GSO datagrams.
    udp: UdpSocket,
    local: Ipv4Addr,
    next_id: u16,
    faults: Faults,
    rng: u64,
    /// A datagram the reorder fault holds back: destination, GSO segment
    /// size (0 for a whole IPv4 datagram sent raw), bytes.
    held: Option<(Ipv4Addr, usize, Vec<u8>)>,
    /// Datagrams the fault injector dropped, duplicated, reordered,
    /// corrupted.
    pub injected: [u64; 4],
    /// Whether runs of packets go out as UDP GSO sends (see the module
    /// documentation), and whether the kernel passed the probe at open.
    gso: bool,
    gso_ok: bool,
    /// A datagram too big for a ring frame, read from the socket.
    spill: Vec<u8>,
    /// Packets sent as segments of GSO datagrams, GSO datagrams received
    /// (split here), and datagrams too big for a ring frame (read from the
    /// socket), since the engine last took the counts.
    pub gso_counts: (u64, u64, u64),
    /// Datagrams to port 4791 on our address that were not well-formed
    /// IPv4/UDP (fragments, bad header checksum, truncated, too long for
    /// a ring frame).
    pub malformed: u64,
}

/// A received datagram, still in its ring frame until
/// [`RawIo::release`]: its flow and where its UDP payload lies.
#[derive(Debug)]
pub struct Frame {
    /// Addresses, ports and IPv4 identification (of the first segment).
    pub flow: Flow,
    ptr: NonNull<u8>,
    len: usize,
    /// UDP payload bytes per segment: the whole payload unless the
    /// datagram is a GSO one.
    seg: usize,
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

    /// Each datagram in the frame: its flow and its UDP payload (one,
    /// unless the frame holds a GSO datagram, whose segment `i` carries
    /// the first segment's identification plus `i`, as the kernel would
    /// give it when splitting).
    ///
    /// # Safety
    ///
    /// As for [`Frame::payload`].
    pub unsafe fn datagrams<'a>(&self) -> impl Iterator<Item = (Flow, &'a [u8])> + use<'a> {
        // SAFETY: passed on to the caller.
        let data = unsafe { self.payload() };
        split(self.flow, data, self.seg)
    }
}

/// One packet to send, in up to three pieces that go out as they are
/// (gathered by the kernel, not copied here): `head` (the headers, or a
/// whole encoded packet), `body` (payload read straight from a registered
/// region) and `tail` (padding, then the four ICRC bytes, which sealing
/// writes).
#[derive(Debug)]
pub struct Piece<'a> {
    /// Headers (or a whole packet without its ICRC).
    pub head: &'a [u8],
    /// Payload, possibly empty.
    pub body: &'a [u8],
    /// Padding and the ICRC field (at least four bytes).
    pub tail: &'a mut [u8],
}

impl<'a> Piece<'a> {
    /// A contiguous encoded packet (ICRC space included) as one piece.
    pub fn whole(packet: &'a mut [u8]) -> Self {
        let n = packet.len().saturating_sub(wire::ICRC_BYTES);
        let (head, tail) = packet.split_at_mut(n);
        Piece {
            head,
            body: &[],
            tail,
        }
    }

    /// Bytes on the wire (the UDP payload).
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len() + self.tail.len()
    }

    /// Whether the packet is empty (never, for a real one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the ICRC for `flow` into the tail's last four bytes.
    fn seal(&mut self, flow: &Flow) {
        let len = self.len();
        let t = self.tail.len().saturating_sub(wire::ICRC_BYTES);
        let c = wire::icrc_parts(flow, &[self.head, self.body, &self.tail[..t]], len);
        if self.tail.len() >= wire::ICRC_BYTES {
            self.tail[t..].copy_from_slice(&c.to_le_bytes());
        }
    }

    /// The packet in one buffer (for the fault injector, which alters
    /// copies only).
    fn to_vec(&self) -> Vec<u8> {
        [self.head, self.body, &*self.tail].concat()
    }

    fn iovecs(&self, out: &mut Vec<libc::iovec>) {
        for part in [self.head, self.body, &*self.tail] {
            if !part.is_empty() {
                out.push(libc::iovec {
                    iov_base: part.as_ptr() as *mut libc::c_void,
                    iov_len: part.len(),
                });
            }
        }
    }
}

impl RawIo {
    /// Opens the sockets for `local` (UDP port 4791).
    pub fn open(local: Ipv4Addr) -> io::Result<Self> {
        let guard = UdpSocket::bind((local, ROCEV2_PORT))?;
        drop_all(&guard)?;
        let g = guard.as_raw_fd();
        // GSO sends carry DF, as RoCEv2 wants; GSO datagrams that stay
        // whole up to this socket are dropped whole, not split first.
        set_int(
            g,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )?;
        set_int(g, libc::SOL_UDP, UDP_GRO, 1)?;
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
        let mut io = RawIo {
            send,
            rx,
            udp: guard,
            local,
            next_id: 1,
            faults: Faults::default(),
            rng: 1,
            held: None,
            injected: [0; 4],
            gso: false,
            gso_ok: false,
            spill: vec![0; VNET_HDR + 128 + 65_536],
            gso_counts: (0, 0, 0),
            malformed: 0,
        };
        io.gso_ok = io.probe_gso();
        io.gso = io.gso_ok;
        io.gso_counts = (0, 0, 0);
        Ok(io)
    }

    /// The receive ring's descriptor (readable when a datagram waits).
    pub fn wait_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.rx.fd.as_fd()
    }

    /// Whether runs of packets go out as UDP GSO sends.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Turns GSO sends off (or back on, where the probe allowed them).
    pub fn set_gso(&mut self, on: bool) {
        self.gso = on && self.gso_ok;
    }

    /// Sends a two-segment GSO datagram to our own address and checks
    /// that it arrives with the identifications the ICRC is sealed with
    /// (0 for the first segment, 1 for the second).
    fn probe_gso(&mut self) -> bool {
        let seg = 24usize;
        let mut probe = Vec::new();
        for i in 0..2u8 {
            probe.extend_from_slice(PROBE_MAGIC);
            probe.extend_from_slice(&[i; 8]);
        }
        if self.send_gso_bytes(self.local, seg, &probe).is_err() {
            return false;
        }
        let mut ids = Vec::new();
        let deadline = Instant::now() + Duration::from_millis(500);
        while ids.len() < 2 {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(f)) = self.recv_frame(left) else {
                return false;
            };
            let mine = f.flow.src == self.local && f.flow.src_port == ROCEV2_PORT;
            // SAFETY: the frame is released right after, below.
            for (flow, d) in unsafe { f.datagrams() } {
                if mine && d.len() == seg && d.starts_with(PROBE_MAGIC) {
                    ids.push((flow.ip_id, d[seg - 1]));
                }
            }
            self.release(f);
        }
        ids == [(0, 0), (1, 1)]
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
        self.transmit_iov(dst, &[one_iovec(d)])
    }

    /// Sends the bytes `iov` points to as one datagram (sendmsg).
    fn transmit_iov(&self, dst: Ipv4Addr, iov: &[libc::iovec]) -> io::Result<()> {
        send_msg(self.send.as_raw_fd(), dst, 0, iov, None)
    }

    /// Sends a datagram held back by the reorder fault.
    fn release_held(&mut self) -> io::Result<()> {
        match self.held.take() {
            Some((dst, 0, d)) => self.transmit(dst, &d),
            Some((dst, seg, d)) => self.send_gso_bytes(dst, seg, &d),
            None => Ok(()),
        }
    }

    /// The local address.
    pub fn local(&self) -> Ipv4Addr {
        self.local
    }

    /// Sends one RoCEv2 packet (already encoded, ICRC space included) to
    /// `dst`, sealing its ICRC for the header built here.
    pub fn send(&mut self, dst: Ipv4Addr, src_port: u16, packet: &mut [u8]) -> io::Result<()> {
        self.send_piece(dst, src_port, &mut Piece::whole(packet))
    }

    /// Sends one packet as a whole IPv4 datagram built here (raw socket),
    /// sealing its ICRC for that datagram's identification.
    fn send_piece(&mut self, dst: Ipv4Addr, src_port: u16, p: &mut Piece<'_>) -> io::Result<()> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let flow = Flow {
            src: self.local,
            dst,
            src_port,
            dst_port: ROCEV2_PORT,
            ip_id: id,
        };
        p.seal(&flow);
        let udp_len = u16::try_from(8 + p.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
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
            // No fault injection: the headers and the packet's pieces go
            // out as one datagram, without copying the packet.
            let mut iov = vec![libc::iovec {
                iov_base: d.as_ptr() as *mut libc::c_void,
                iov_len: d.len(),
            }];
            p.iovecs(&mut iov);
            return self.transmit_iov(dst, &iov);
        }
        d.extend_from_slice(&p.to_vec());
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
            self.held = Some((dst, 0, d));
            return Ok(());
        }
        self.transmit(dst, &d)?;
        if self.roll(f.dup_ppm) {
            self.injected[1] += 1;
            self.transmit(dst, &d)?;
        }
        self.release_held()
    }

    /// Sends a run of packets to `dst` in order: equal-sized neighbours
    /// (and a shorter last one) as one GSO datagram where the probe allowed
    /// it, the rest one by one. Each packet's ICRC is sealed here.
    pub fn send_burst(
        &mut self,
        dst: Ipv4Addr,
        src_port: u16,
        packets: &mut [Piece<'_>],
    ) -> io::Result<()> {
        let f = self.faults;
        let faults = f.drop_ppm | f.dup_ppm | f.reorder_ppm | f.corrupt_ppm != 0;
        let mut i = 0;
        while i < packets.len() {
            let seg = packets[i].len();
            let most = (UDP_PAYLOAD_MAX / seg.max(1)).min(GSO_SEGMENTS);
            let mut j = i + 1;
            while j < packets.len() && j - i < most && packets[j].len() == seg {
                j += 1;
            }
            if j < packets.len() && j - i < most && packets[j].len() < seg {
                j += 1;
            }
            if !self.gso || j - i == 1 {
                for p in &mut packets[i..j] {
                    self.send_piece(dst, src_port, p)?;
                }
                i = j;
                continue;
            }
            for (k, p) in packets[i..j].iter_mut().enumerate() {
                p.seal(&Flow {
                    src: self.local,
                    dst,
                    src_port: ROCEV2_PORT,
                    dst_port: ROCEV2_PORT,
                    ip_id: k as u16,
                });
            }
            if faults {
                // The injector works on the whole GSO datagram, on a copy
                // (the packets are kept for retransmission).
                let d: Vec<u8> = packets[i..j].iter().flat_map(Piece::to_vec).collect();
                self.inject_gso(dst, seg, d)?;
            } else {
                // The pieces go out from where they are, gathered by the
                // kernel.
                let mut iov = Vec::with_capacity(3 * (j - i));
                for p in &packets[i..j] {
                    p.iovecs(&mut iov);
                }
                self.send_gso(dst, seg, &iov)?;
            }
            self.gso_counts.0 += (j - i) as u64;
            i = j;
        }
        Ok(())
    }

    /// A GSO datagram through the fault injector: dropped, corrupted (one
    /// byte of one segment), held back behind the next datagram, or
    /// duplicated, as a whole.
    fn inject_gso(&mut self, dst: Ipv4Addr, seg: usize, mut d: Vec<u8>) -> io::Result<()> {
        let f = self.faults;
        if self.roll(f.drop_ppm) {
            self.injected[0] += 1;
            return self.release_held();
        }
        if self.roll(f.corrupt_ppm) && !d.is_empty() {
            self.injected[3] += 1;
            let i = (self.rng as usize) % d.len();
            d[i] ^= 0x10;
        }
        if self.held.is_none() && self.roll(f.reorder_ppm) {
            self.injected[2] += 1;
            self.held = Some((dst, seg, d));
            return Ok(());
        }
        self.send_gso_bytes(dst, seg, &d)?;
        if self.roll(f.dup_ppm) {
            self.injected[1] += 1;
            self.send_gso_bytes(dst, seg, &d)?;
        }
        self.release_held()
    }

    fn send_gso_bytes(&self, dst: Ipv4Addr, seg: usize, d: &[u8]) -> io::Result<()> {
        self.send_gso(dst, seg, &[one_iovec(d)])
    }

    /// Sends the bytes `iov` points to, from the UDP socket to `dst`, as
    /// one GSO datagram that the kernel splits into datagrams of `seg`
    /// bytes.
    fn send_gso(&self, dst: Ipv4Addr, seg: usize, iov: &[libc::iovec]) -> io::Result<()> {
        let seg = u16::try_from(seg).map_err(|_| io::ErrorKind::InvalidInput)?;
        send_msg(self.udp.as_raw_fd(), dst, ROCEV2_PORT, iov, Some(seg))
    }

    /// The next RoCEv2 datagram addressed to us, waiting up to
    /// `timeout` for one (zero: only what is already there). It stays in
    /// its ring frame (or the spill buffer), read in place, until
    /// [`RawIo::release`], which must come before the next call.
    pub fn recv_frame(&mut self, timeout: Duration) -> io::Result<Option<Frame>> {
        self.release_held()?;
        let mut deadline = None;
        loop {
            let slot = self.rx.head;
            let status = self.rx.status(slot).load(Ordering::Acquire);
            if status & libc::TP_STATUS_USER == 0 {
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
            let f = if status & libc::TP_STATUS_COPY != 0 {
                self.gso_counts.2 += 1;
                self.parse_spill(slot)
            } else {
                self.parse_frame(slot)
            };
            match f {
                Some(f) => {
                    if f.seg < f.len {
                        self.gso_counts.1 += 1;
                    }
                    return Ok(Some(f));
                }
                None => {
                    self.malformed += 1;
                    self.rx.release(slot);
                }
            }
        }
    }

    /// The datagram of ring frame `slot`, in place. The frame holds the
    /// virtio-net header, then the link-layer header (`tp_mac`), then the
    /// IPv4 datagram (`tp_net`).
    fn parse_frame(&self, slot: usize) -> Option<Frame> {
        let h = self.rx.header(slot);
        let (mac, net) = (usize::from(h.tp_mac), usize::from(h.tp_net));
        let snap = h.tp_snaplen as usize;
        if h.tp_len as usize != snap
            || mac < VNET_HDR
            || net < mac
            || mac.checked_add(snap)? > FRAME_SIZE
        {
            return None; // truncated to the frame
        }
        // SAFETY: `mac-VNET_HDR..mac+snap` lies inside frame `slot`
        // (checked just above), which is ours until released.
        let (vnet, d) = unsafe {
            let base = self.rx.map.as_ptr().add(slot * FRAME_SIZE);
            (
                std::slice::from_raw_parts(base.add(mac - VNET_HDR), VNET_HDR),
                std::slice::from_raw_parts(base.add(net), mac + snap - net),
            )
        };
        self.parse(vnet, d, slot)
    }

    /// The datagram of ring frame `slot` that did not fit a frame: the
    /// kernel queued it whole on the socket as well (virtio-net header,
    /// link-layer header, datagram; the frame says how long the
    /// link-layer header is).
    fn parse_spill(&mut self, slot: usize) -> Option<Frame> {
        let h = self.rx.header(slot);
        let l2 = usize::from(h.tp_net).checked_sub(usize::from(h.tp_mac))?;
        // SAFETY: `spill` is valid for its length.
        let n = unsafe {
            libc::recv(
                self.rx.fd.as_raw_fd(),
                self.spill.as_mut_ptr().cast(),
                self.spill.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        let n = usize::try_from(n).ok()?;
        if n > self.spill.len() || n < VNET_HDR + l2 {
            return None;
        }
        let (vnet, rest) = self.spill[..n].split_at(VNET_HDR);
        self.parse(vnet, &rest[l2..], slot)
    }

    /// Checks the virtio-net, IPv4 and UDP headers of a datagram.
    fn parse(&self, vnet: &[u8], d: &[u8], slot: usize) -> Option<Frame> {
        let (flow, len, seg) = parse_datagram(self.local, vnet, d)?;
        Some(Frame {
            flow,
            ptr: NonNull::from(&d[28..]).cast::<u8>(),
            len,
            seg,
            slot,
        })
    }

    /// Gives frame `f` back to the kernel.
    pub fn release(&mut self, f: Frame) {
        self.rx.release(f.slot);
    }
}
