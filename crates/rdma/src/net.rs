//! Datagram I/O for RoCEv2 from user space, over raw IPv4 sockets.
//!
//! The ICRC covers the IPv4 identification, which the kernel picks for
//! UDP sockets and does not report on receive. So the engine sends whole
//! IPv4 datagrams it builds itself (`IPPROTO_RAW`, DF set, its own ID) and
//! receives through an `IPPROTO_UDP` raw socket, which delivers the IP
//! header. A plain UDP socket stays bound to port 4791 only so that the
//! kernel does not answer peers with ICMP port-unreachable. Needs
//! `CAP_NET_RAW`.

use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

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
    recv: OwnedFd,
    _guard: UdpSocket,
    local: Ipv4Addr,
    next_id: u16,
    faults: Faults,
    rng: u64,
    held: Option<(Ipv4Addr, Vec<u8>)>,
    /// Datagrams the fault injector dropped, duplicated, reordered,
    /// corrupted.
    pub injected: [u64; 4],
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
        // SAFETY: plain socket(2) calls; the fds are checked and owned.
        let (send, recv) = unsafe {
            let s = check(libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            ))?;
            let send = OwnedFd::from_raw_fd(s);
            let r = check(libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_UDP,
            ))?;
            (send, OwnedFd::from_raw_fd(r))
        };
        // Room for bursts: every datagram on the namespace reaches this
        // socket, and a window of packets may arrive at once.
        let size: libc::c_int = 16 << 20;
        // SAFETY: setsockopt with a valid int option value.
        unsafe {
            libc::setsockopt(
                recv.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        attach_filter(&recv, local)?;
        Ok(RawIo {
            send,
            recv,
            _guard: guard,
            local,
            next_id: 1,
            faults: Faults::default(),
            rng: 1,
            held: None,
            injected: [0; 4],
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

    /// Receives the next RoCEv2 datagram addressed to us into `buf`
    /// (64 KiB: any datagram fits), waiting up to `timeout`: its flow (from
    /// the IP and UDP headers) and where in `buf` its UDP payload is. The
    /// payload is not copied again; the caller's buffer is reused.
    pub fn recv_into(
        &mut self,
        buf: &mut Vec<u8>,
        timeout: Duration,
    ) -> io::Result<Option<(Flow, std::ops::Range<usize>)>> {
        self.release_held()?;
        if buf.len() < 65536 {
            buf.resize(65536, 0);
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // SAFETY: `buf` is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.recv.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    return Err(e);
                }
                // Nothing queued: wait (unless the caller only peeks).
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                let mut pfd = libc::pollfd {
                    fd: self.recv.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
                // SAFETY: one valid pollfd.
                check(unsafe { libc::poll(&mut pfd, 1, ms) })?;
                continue;
            }
            let n = n.unsigned_abs();
            let d = &buf[..n];
            if d.len() < 28 || d[0] >> 4 != 4 {
                continue;
            }
            let ihl = usize::from(d[0] & 0xf) * 4;
            if d.len() < ihl + 8 {
                continue;
            }
            let dst = Ipv4Addr::new(d[16], d[17], d[18], d[19]);
            let dport = u16::from_be_bytes([d[ihl + 2], d[ihl + 3]]);
            if dport != ROCEV2_PORT || dst != self.local {
                continue;
            }
            let flow = Flow {
                src: Ipv4Addr::new(d[12], d[13], d[14], d[15]),
                dst,
                src_port: u16::from_be_bytes([d[ihl], d[ihl + 1]]),
                dst_port: dport,
                ip_id: u16::from_be_bytes([d[4], d[5]]),
            };
            return Ok(Some((flow, ihl + 8..n)));
        }
    }
}
