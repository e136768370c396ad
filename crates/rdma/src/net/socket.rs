//! The sockets' plumbing: options, filters and `sendmsg`.

use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};

use crate::wire::ROCEV2_PORT;

/// `setsockopt` names this libc build may lack.
pub(super) const UDP_SEGMENT: libc::c_int = 103;
pub(super) const UDP_GRO: libc::c_int = 104;
pub(super) const PACKET_COPY_THRESH: libc::c_int = 7;
pub(super) const PACKET_VNET_HDR: libc::c_int = 15;
/// `struct virtio_net_hdr`: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset.
pub(super) const VNET_HDR: usize = 10;
pub(super) const VNET_GSO_NONE: u8 = 0;
pub(super) const VNET_GSO_UDP_L4: u8 = 5;
/// Most segments in one GSO send (the kernel allows 64 or more) and most
/// UDP payload in one datagram.
pub(super) const GSO_SEGMENTS: usize = 64;
pub(super) const UDP_PAYLOAD_MAX: usize = 65_507;
/// What the probe datagram's segments start with.
pub(super) const PROBE_MAGIC: &[u8; 16] = b"softcard-gso-prb";

pub(super) fn set_int(
    fd: libc::c_int,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt with a valid int option value.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}
pub(super) fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Installs a classic BPF filter on the receive socket so that the kernel
/// passes only RoCEv2 datagrams for `local` (IPv4 destination and UDP
/// destination port 4791; IP options are rare enough to be refused here):
/// on loopback the socket would otherwise see every UDP datagram on the
/// host, its own included.
pub(super) fn attach_filter(fd: &OwnedFd, local: Ipv4Addr) -> io::Result<()> {
    const LD_W_ABS: u16 = 0x20;
    const LD_H_ABS: u16 = 0x28;
    const LD_B_ABS: u16 = 0x30;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let ins = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    // Loads relative to the network header (SKF_NET_OFF), whatever the
    // link layer in front of it.
    const NET: u32 = 0xfff0_0000; // -0x100000 as u32
    let prog = [
        ins(LD_B_ABS, 0, 0, NET),      // version/IHL
        ins(JEQ_K, 0, 5, 0x45),        // IPv4 without options
        ins(LD_W_ABS, 0, 0, NET + 16), // destination address
        ins(JEQ_K, 0, 3, u32::from_be_bytes(local.octets())),
        ins(LD_H_ABS, 0, 0, NET + 22), // UDP destination port
        ins(JEQ_K, 0, 1, u32::from(ROCEV2_PORT)),
        ins(RET_K, 0, 0, 0xffff), // accept
        ins(RET_K, 0, 0, 0),      // drop
    ];
    attach_prog(fd.as_raw_fd(), &prog)
}

/// An iovec for `d` (only read through: sendmsg does not write).
pub(super) fn one_iovec(d: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: d.as_ptr() as *mut libc::c_void,
        iov_len: d.len(),
    }
}

/// `sendmsg` of the bytes `iov` points to, to `dst` (port `port`, 0 for
/// a raw socket), as one UDP GSO datagram of `gso` -byte segments when
/// given.
pub(super) fn send_msg(
    fd: libc::c_int,
    dst: Ipv4Addr,
    port: u16,
    iov: &[libc::iovec],
    gso: Option<u16>,
) -> io::Result<()> {
    let mut sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    // Room for one cmsg carrying a u16, aligned as cmsghdr wants.
    let mut space = [0u64; 4];
    // SAFETY: an all-zero msghdr is valid; every pointer set below refers
    // to a local or to `iov` (whose entries point to live buffers the
    // caller holds), all outliving the sendmsg call, which only reads
    // through them; the cmsg macros stay within `space` (CMSG_SPACE(2) is
    // at most 32 bytes).
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&raw mut sa).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len();
        if let Some(seg) = gso {
            msg.msg_control = space.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(2) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
        }
        libc::sendmsg(fd, &msg, 0)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches a classic BPF program to a socket (the kernel copies it).
pub(super) fn attach_prog(fd: libc::c_int, prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points to `prog`, alive for the call; the kernel
    // copies the program.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Makes `sock` drop every datagram before it is queued (a one-instruction
/// filter): the socket exists only so that port 4791 counts as open.
pub(super) fn drop_all(sock: &UdpSocket) -> io::Result<()> {
    let prog = [libc::sock_filter {
        code: 0x06, // ret #0
        jt: 0,
        jf: 0,
        k: 0,
    }];
    attach_prog(sock.as_raw_fd(), &prog)
}
