//! RoCEv2 wire format (IBTA spec, Annex A17): the base transport header
//! (BTH), the extended headers an RC packet may carry, and the invariant
//! CRC (ICRC).
//!
//! A RoCEv2 packet is a UDP datagram to port 4791 whose payload is
//! `BTH | extended headers | payload | pad to 4 bytes | ICRC`. Everything
//! is big-endian except the ICRC, which rdma_rxe stores in host (little-
//! endian) order.
//!
//! Every byte here may come from the network: [`Packet::parse`] checks
//! lengths and opcodes before touching anything and never panics.

use std::net::Ipv4Addr;

/// The RoCEv2 UDP destination port.
pub const ROCEV2_PORT: u16 = 4791;
/// Bytes of the base transport header.
pub const BTH_BYTES: usize = 12;
/// Bytes of the RDMA extended transport header.
pub const RETH_BYTES: usize = 16;
/// Bytes of the ACK extended transport header.
pub const AETH_BYTES: usize = 4;
/// Bytes of immediate data.
pub const IMM_BYTES: usize = 4;
/// Bytes of the atomic extended transport header.
pub const ATOMIC_ETH_BYTES: usize = 28;
/// Bytes of the atomic ACK extended transport header.
pub const ATOMIC_ACK_ETH_BYTES: usize = 8;
/// Bytes of the invariant CRC.
pub const ICRC_BYTES: usize = 4;
/// Datagram extended header (UD): Q_Key and source QP.
pub const DETH_BYTES: usize = 8;
/// The default partition key.
pub const DEFAULT_PKEY: u16 = 0xffff;

/// Reliable-connection opcodes (transport type 000).
#[allow(missing_docs)]
pub mod opcode {
    pub const SEND_FIRST: u8 = 0x00;
    pub const SEND_MIDDLE: u8 = 0x01;
    pub const SEND_LAST: u8 = 0x02;
    pub const SEND_LAST_IMM: u8 = 0x03;
    pub const SEND_ONLY: u8 = 0x04;
    pub const SEND_ONLY_IMM: u8 = 0x05;
    pub const WRITE_FIRST: u8 = 0x06;
    pub const WRITE_MIDDLE: u8 = 0x07;
    pub const WRITE_LAST: u8 = 0x08;
    pub const WRITE_LAST_IMM: u8 = 0x09;
    pub const WRITE_ONLY: u8 = 0x0a;
    pub const WRITE_ONLY_IMM: u8 = 0x0b;
    pub const READ_REQUEST: u8 = 0x0c;
    pub const READ_RESPONSE_FIRST: u8 = 0x0d;
    pub const READ_RESPONSE_MIDDLE: u8 = 0x0e;
    pub const READ_RESPONSE_LAST: u8 = 0x0f;
    pub const READ_RESPONSE_ONLY: u8 = 0x10;
    pub const ACKNOWLEDGE: u8 = 0x11;
    pub const ATOMIC_ACKNOWLEDGE: u8 = 0x12;
    pub const COMPARE_SWAP: u8 = 0x13;
    pub const FETCH_ADD: u8 = 0x14;
    /// UD SEND only.
    pub const UD_SEND_ONLY: u8 = 0x64;
    /// UD SEND only with immediate.
    pub const UD_SEND_ONLY_IMM: u8 = 0x65;
}

/// Which headers and whether a payload an opcode carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// RDMA extended header.
    pub reth: bool,
    /// ACK extended header.
    pub aeth: bool,
    /// Immediate data.
    pub imm: bool,
    /// Atomic extended header.
    pub atomic: bool,
    /// Atomic ACK extended header.
    pub atomic_ack: bool,
    /// Carries data.
    pub payload: bool,
    /// Datagram extended header (UD).
    pub deth: bool,
}

/// The layout of an RC or UD opcode; `None` for opcodes this engine does
/// not speak (other transports, reserved values).
pub fn layout(op: u8) -> Option<Layout> {
    use opcode::*;
    let l = |reth, aeth, imm, atomic, atomic_ack, payload| Layout {
        reth,
        aeth,
        imm,
        atomic,
        atomic_ack,
        payload,
        deth: false,
    };
    Some(match op {
        UD_SEND_ONLY => Layout {
            deth: true,
            ..l(false, false, false, false, false, true)
        },
        UD_SEND_ONLY_IMM => Layout {
            deth: true,
            ..l(false, false, true, false, false, true)
        },
        SEND_FIRST | SEND_MIDDLE | SEND_LAST | SEND_ONLY => {
            l(false, false, false, false, false, true)
        }
        SEND_LAST_IMM | SEND_ONLY_IMM => l(false, false, true, false, false, true),
        WRITE_FIRST | WRITE_ONLY => l(true, false, false, false, false, true),
        WRITE_MIDDLE | WRITE_LAST => l(false, false, false, false, false, true),
        WRITE_LAST_IMM => l(false, false, true, false, false, true),
        WRITE_ONLY_IMM => l(true, false, true, false, false, true),
        READ_REQUEST => l(true, false, false, false, false, false),
        READ_RESPONSE_FIRST | READ_RESPONSE_LAST | READ_RESPONSE_ONLY => {
            l(false, true, false, false, false, true)
        }
        READ_RESPONSE_MIDDLE => l(false, false, false, false, false, true),
        ACKNOWLEDGE => l(false, true, false, false, false, false),
        ATOMIC_ACKNOWLEDGE => l(false, true, false, false, true, false),
        COMPARE_SWAP | FETCH_ADD => l(false, false, false, true, false, false),
        _ => return None,
    })
}

/// The datagram extended header of UD packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deth {
    /// The Q_Key the receiving QP must have.
    pub qkey: u32,
    /// The sending QP (24 bits).
    pub src_qp: u32,
}

/// The base transport header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bth {
    /// Opcode.
    pub opcode: u8,
    /// Solicited event.
    pub solicited: bool,
    /// Migration state.
    pub mig_req: bool,
    /// Pad bytes after the payload (0-3).
    pub pad: u8,
    /// Transport header version (0).
    pub tver: u8,
    /// Partition key.
    pub pkey: u16,
    /// Forward explicit congestion notification.
    pub fecn: bool,
    /// Backward explicit congestion notification.
    pub becn: bool,
    /// Destination queue pair (24 bits).
    pub dest_qp: u32,
    /// Acknowledge request.
    pub ack_req: bool,
    /// Packet sequence number (24 bits).
    pub psn: u32,
}

/// The RDMA extended transport header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reth {
    /// Remote virtual address.
    pub va: u64,
    /// Remote key.
    pub rkey: u32,
    /// Length of the whole operation.
    pub dma_len: u32,
}

/// The ACK extended transport header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aeth {
    /// Syndrome: ACK with credit count, RNR NAK with timer, or NAK code.
    pub syndrome: u8,
    /// Message sequence number (24 bits).
    pub msn: u32,
}

/// The atomic extended transport header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtomicEth {
    /// Remote virtual address (8-byte aligned).
    pub va: u64,
    /// Remote key.
    pub rkey: u32,
    /// Swap or add data.
    pub swap_add: u64,
    /// Compare data.
    pub compare: u64,
}

/// A parsed (or to-be-built) packet; `payload` borrows the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Base transport header.
    pub bth: Bth,
    /// Datagram extended header, when the opcode (UD) has one.
    pub deth: Option<Deth>,
    /// RDMA extended header, when the opcode has one.
    pub reth: Option<Reth>,
    /// ACK extended header, when the opcode has one.
    pub aeth: Option<Aeth>,
    /// Immediate data, when the opcode has it.
    pub imm: Option<u32>,
    /// Atomic extended header.
    pub atomic: Option<AtomicEth>,
    /// Original remote data of an atomic ACK.
    pub atomic_ack: Option<u64>,
    /// Payload without pad.
    pub payload: &'a [u8],
    /// The ICRC as received (parse) — ignored by encode, which computes it.
    pub icrc: u32,
}

/// Why a datagram is not a packet this engine accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than its headers and ICRC.
    #[error("truncated packet ({0} bytes)")]
    Truncated(usize),
    /// An opcode this engine does not speak.
    #[error("unsupported opcode {0:#04x}")]
    Opcode(u8),
    /// Transport version other than 0.
    #[error("unsupported transport version {0}")]
    Version(u8),
    /// Pad count larger than the payload, or a payload where none belongs.
    #[error("bad pad count or payload length")]
    Length,
    /// The invariant CRC does not match.
    #[error("ICRC mismatch")]
    Icrc,
    /// The output buffer is too small.
    #[error("buffer too small: need {0} bytes")]
    Space(usize),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

impl<'a> Packet<'a> {
    /// Length of the headers for this packet's opcode.
    fn header_len(l: &Layout) -> usize {
        BTH_BYTES
            + if l.deth { DETH_BYTES } else { 0 }
            + if l.reth { RETH_BYTES } else { 0 }
            + if l.aeth { AETH_BYTES } else { 0 }
            + if l.imm { IMM_BYTES } else { 0 }
            + if l.atomic { ATOMIC_ETH_BYTES } else { 0 }
            + if l.atomic_ack {
                ATOMIC_ACK_ETH_BYTES
            } else {
                0
            }
    }

    /// Parses a UDP payload. Does not check the ICRC (see [`icrc`]).
    pub fn parse(d: &'a [u8]) -> Result<Self, WireError> {
        if d.len() < BTH_BYTES + ICRC_BYTES {
            return Err(WireError::Truncated(d.len()));
        }
        let op = d[0];
        let l = layout(op).ok_or(WireError::Opcode(op))?;
        let tver = d[1] & 0x0f;
        if tver != 0 {
            return Err(WireError::Version(tver));
        }
        let bth = Bth {
            opcode: op,
            solicited: d[1] & 0x80 != 0,
            mig_req: d[1] & 0x40 != 0,
            pad: (d[1] >> 4) & 0x3,
            tver,
            pkey: be16(d, 2),
            fecn: d[4] & 0x80 != 0,
            becn: d[4] & 0x40 != 0,
            dest_qp: be32(d, 4) & 0x00ff_ffff,
            ack_req: d[8] & 0x80 != 0,
            psn: be32(d, 8) & 0x00ff_ffff,
        };
        let hlen = Self::header_len(&l);
        if d.len() < hlen + ICRC_BYTES {
            return Err(WireError::Truncated(d.len()));
        }
        let mut at = BTH_BYTES;
        let mut take = |n: usize| {
            let s = at;
            at += n;
            s
        };
        let deth = l.deth.then(|| {
            let s = take(DETH_BYTES);
            Deth {
                qkey: be32(d, s),
                src_qp: be32(d, s + 4) & 0x00ff_ffff,
            }
        });
        let reth = l.reth.then(|| {
            let s = take(RETH_BYTES);
            Reth {
                va: be64(d, s),
                rkey: be32(d, s + 8),
                dma_len: be32(d, s + 12),
            }
        });
        let aeth = l.aeth.then(|| {
            let s = take(AETH_BYTES);
            Aeth {
                syndrome: d[s],
                msn: be32(d, s) & 0x00ff_ffff,
            }
        });
        let imm = l.imm.then(|| be32(d, take(IMM_BYTES)));
        let atomic = l.atomic.then(|| {
            let s = take(ATOMIC_ETH_BYTES);
            AtomicEth {
                va: be64(d, s),
                rkey: be32(d, s + 8),
                swap_add: be64(d, s + 12),
                compare: be64(d, s + 20),
            }
        });
        let atomic_ack = l.atomic_ack.then(|| be64(d, take(ATOMIC_ACK_ETH_BYTES)));
        let body = &d[hlen..d.len() - ICRC_BYTES];
        let pad = usize::from(bth.pad);
        if pad > body.len() || (!l.payload && !body.is_empty()) {
            return Err(WireError::Length);
        }
        let icrc_at = d.len() - ICRC_BYTES;
        let icrc = u32::from_le_bytes([d[icrc_at], d[icrc_at + 1], d[icrc_at + 2], d[icrc_at + 3]]);
        Ok(Packet {
            bth,
            deth,
            reth,
            aeth,
            imm,
            atomic,
            atomic_ack,
            payload: &body[..body.len() - pad],
            icrc,
        })
    }

    /// Bytes [`Packet::encode`] writes.
    pub fn wire_len(&self) -> usize {
        let l = layout(self.bth.opcode).unwrap_or(Layout {
            reth: false,
            aeth: false,
            imm: false,
            atomic: false,
            atomic_ack: false,
            payload: false,
            deth: false,
        });
        Self::header_len(&l) + self.payload.len().next_multiple_of(4) + ICRC_BYTES
    }

    /// Writes the packet (the pad count from the payload length, the ICRC
    /// left zero: see [`seal`]). Returns the length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let l = layout(self.bth.opcode).ok_or(WireError::Opcode(self.bth.opcode))?;
        let n = self.wire_len();
        if out.len() < n {
            return Err(WireError::Space(n));
        }
        let pad = (4 - self.payload.len() % 4) % 4;
        let b = &self.bth;
        out[0] = b.opcode;
        out[1] = (u8::from(b.solicited) << 7)
            | (u8::from(b.mig_req) << 6)
            | ((pad as u8) << 4)
            | (b.tver & 0xf);
        out[2..4].copy_from_slice(&b.pkey.to_be_bytes());
        let qpn = (u32::from(b.fecn) << 31) | (u32::from(b.becn) << 30) | (b.dest_qp & 0x00ff_ffff);
        out[4..8].copy_from_slice(&qpn.to_be_bytes());
        let apsn = (u32::from(b.ack_req) << 31) | (b.psn & 0x00ff_ffff);
        out[8..12].copy_from_slice(&apsn.to_be_bytes());
        let mut at = BTH_BYTES;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        if l.deth {
            let d = self.deth.unwrap_or(Deth { qkey: 0, src_qp: 0 });
            put(&d.qkey.to_be_bytes());
            put(&(d.src_qp & 0x00ff_ffff).to_be_bytes());
        }
        if l.reth {
            let r = self.reth.unwrap_or(Reth {
                va: 0,
                rkey: 0,
                dma_len: 0,
            });
            put(&r.va.to_be_bytes());
            put(&r.rkey.to_be_bytes());
            put(&r.dma_len.to_be_bytes());
        }
        if l.aeth {
            let a = self.aeth.unwrap_or(Aeth {
                syndrome: 0,
                msn: 0,
            });
            put(&((u32::from(a.syndrome) << 24) | (a.msn & 0x00ff_ffff)).to_be_bytes());
        }
        if l.imm {
            put(&self.imm.unwrap_or(0).to_be_bytes());
        }
        if l.atomic {
            let a = self.atomic.unwrap_or(AtomicEth {
                va: 0,
                rkey: 0,
                swap_add: 0,
                compare: 0,
            });
            put(&a.va.to_be_bytes());
            put(&a.rkey.to_be_bytes());
            put(&a.swap_add.to_be_bytes());
            put(&a.compare.to_be_bytes());
        }
        if l.atomic_ack {
            put(&self.atomic_ack.unwrap_or(0).to_be_bytes());
        }
        put(self.payload);
        put(&[0u8; 3][..pad]);
        put(&[0u8; ICRC_BYTES]);
        Ok(n)
    }
}

/// The addressing the ICRC covers besides the UDP payload. A user-space
/// engine sees only these fields of the IPv4 and UDP headers; the others
/// are fixed by how RoCEv2 senders build packets (see [`icrc`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// IPv4 source address.
    pub src: Ipv4Addr,
    /// IPv4 destination address.
    pub dst: Ipv4Addr,
    /// UDP source port.
    pub src_port: u16,
    /// UDP destination port (4791).
    pub dst_port: u16,
    /// IPv4 identification. Covered by the ICRC and chosen by the sending
    /// kernel (rdma_rxe on Linux 6.1 sends varying IDs with DF set), so a
    /// receiver must read it from the IP header: a plain UDP socket cannot.
    pub ip_id: u16,
}

/// The ICRC of a RoCEv2-over-IPv4 datagram whose UDP payload is `udp`
/// (the ICRC field itself excluded or zero: only `udp[..len-4]` counts).
///
/// As the IBTA spec and rdma_rxe define it: CRC-32 (the Ethernet one) over
/// 8 bytes of ones, the IPv4 header with TOS, TTL and checksum set to ones,
/// the UDP header with the checksum set to ones, the BTH with its FECN,
/// BECN and reserved bits set to ones, then the rest of the packet. The
/// IPv4 flags are those of a DF datagram (as RoCEv2 senders set); the
/// identification comes from [`Flow::ip_id`].
pub fn icrc(flow: &Flow, udp: &[u8]) -> u32 {
    icrc_parts(
        flow,
        &[&udp[..udp.len().saturating_sub(ICRC_BYTES)]],
        udp.len(),
    )
}

/// [`icrc`] of a packet given in pieces: `parts` are the UDP payload
/// without the ICRC field, in order; `udp_len` is the whole UDP payload's
/// length (the ICRC field included), which the IPv4 and UDP lengths in
/// the covered headers come from.
pub fn icrc_parts(flow: &Flow, parts: &[&[u8]], udp_len: usize) -> u32 {
    let udp_len = u16::try_from(udp_len + 8).unwrap_or(u16::MAX);
    let ip_len = udp_len.saturating_add(20);
    // Ones, the masked IPv4 and UDP headers and the masked BTH, hashed in
    // one piece.
    let mut pre = [0u8; 8 + 20 + 8 + BTH_BYTES];
    pre[..8].fill(0xff);
    let ip = &mut pre[8..28];
    ip[0] = 0x45;
    ip[1] = 0xff; // TOS, masked
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&flow.ip_id.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
    ip[8] = 0xff; // TTL, masked
    ip[9] = 17; // UDP
    ip[10..12].copy_from_slice(&[0xff, 0xff]); // checksum, masked
    ip[12..16].copy_from_slice(&flow.src.octets());
    ip[16..20].copy_from_slice(&flow.dst.octets());
    let u = &mut pre[28..36];
    u[0..2].copy_from_slice(&flow.src_port.to_be_bytes());
    u[2..4].copy_from_slice(&flow.dst_port.to_be_bytes());
    u[4..6].copy_from_slice(&udp_len.to_be_bytes());
    u[6..8].copy_from_slice(&[0xff, 0xff]); // checksum, masked
                                            // The BTH: the packet's first bytes, wherever the pieces split them.
    let mut taken = 0;
    for p in parts {
        let n = (BTH_BYTES - taken).min(p.len());
        pre[36 + taken..36 + taken + n].copy_from_slice(&p[..n]);
        taken += n;
        if taken == BTH_BYTES {
            break;
        }
    }
    if taken == BTH_BYTES {
        pre[36 + 4] = 0xff; // FECN, BECN, reserved: masked
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&pre[..36 + taken]);
    let mut skip = taken;
    for p in parts {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        h.update(&p[skip..]);
        skip = 0;
    }
    h.finalize()
}

/// Writes the ICRC into the last four bytes of an encoded packet.
pub fn seal(flow: &Flow, udp: &mut [u8]) {
    let c = icrc(flow, udp);
    let n = udp.len();
    if n >= ICRC_BYTES {
        udp[n - ICRC_BYTES..].copy_from_slice(&c.to_le_bytes());
    }
}

/// Whether a received datagram's ICRC is right.
pub fn check(flow: &Flow, udp: &[u8]) -> Result<(), WireError> {
    if udp.len() < BTH_BYTES + ICRC_BYTES {
        return Err(WireError::Truncated(udp.len()));
    }
    let n = udp.len();
    let got = u32::from_le_bytes([udp[n - 4], udp[n - 3], udp[n - 2], udp[n - 1]]);
    if got == icrc(flow, udp) {
        Ok(())
    } else {
        Err(WireError::Icrc)
    }
}

/// PSNs are 24-bit and wrap: `a` is before `b` when the forward distance
/// from `a` to `b` is below half the space.
pub fn psn_before(a: u32, b: u32) -> bool {
    let d = b.wrapping_sub(a) & 0x00ff_ffff;
    d != 0 && d < 0x0080_0000
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn crc_of_the_ones_prefix_is_rxes_seed() {
        // rdma_rxe seeds its raw CRC state with 0xdebb20e3: the state after
        // the 8 bytes of ones, which this engine feeds explicitly.
        let mut h = crc32fast::Hasher::new();
        h.update(&[0xff; 8]);
        assert_eq!(!h.finalize(), 0xdebb_20e3);
    }

    fn flow() -> Flow {
        Flow {
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            src_port: 49152,
            dst_port: ROCEV2_PORT,
            ip_id: 0x3a20,
        }
    }

    #[test]
    fn write_only_imm_round_trips_with_a_valid_icrc() {
        let data = b"hello, remote memory";
        let p = Packet {
            bth: Bth {
                opcode: opcode::WRITE_ONLY_IMM,
                solicited: true,
                mig_req: false,
                pad: 0,
                tver: 0,
                pkey: DEFAULT_PKEY,
                fecn: false,
                becn: false,
                dest_qp: 0x12,
                ack_req: true,
                psn: 0xabcdef,
            },
            reth: Some(Reth {
                va: 0x7f00_0000_1000,
                rkey: 0x1234,
                dma_len: data.len() as u32,
            }),
            aeth: None,
            imm: Some(0xdead_beef),
            atomic: None,
            atomic_ack: None,
            deth: None,
            payload: data,
            icrc: 0,
        };
        let mut buf = [0u8; 128];
        let n = p.encode(&mut buf).unwrap();
        assert_eq!(n, 12 + 16 + 4 + 20 + 4);
        seal(&flow(), &mut buf[..n]);
        check(&flow(), &buf[..n]).unwrap();
        let q = Packet::parse(&buf[..n]).unwrap();
        assert_eq!(q.bth, Bth { pad: 0, ..p.bth });
        assert_eq!(q.reth, p.reth);
        assert_eq!(q.imm, p.imm);
        assert_eq!(q.payload, data);
        // Any flipped bit outside the masked fields breaks the ICRC.
        for i in 0..n - 4 {
            if i == 4 {
                continue; // FECN/BECN/reserved are masked
            }
            let mut bad = buf;
            bad[i] ^= 1;
            assert_eq!(check(&flow(), &bad[..n]), Err(WireError::Icrc), "byte {i}");
        }
        // The masked byte does not change it (congestion marking in flight).
        let mut marked = buf;
        marked[4] |= 0x80;
        check(&flow(), &marked[..n]).unwrap();
        // Nor do other addresses give the same ICRC.
        let other = Flow {
            src_port: 49153,
            ..flow()
        };
        assert_eq!(check(&other, &buf[..n]), Err(WireError::Icrc));
    }

    #[test]
    fn padding_is_counted_and_stripped() {
        let p = Packet {
            bth: Bth {
                opcode: opcode::SEND_ONLY,
                solicited: false,
                mig_req: false,
                pad: 0,
                tver: 0,
                pkey: DEFAULT_PKEY,
                fecn: false,
                becn: false,
                dest_qp: 1,
                ack_req: false,
                psn: 0,
            },
            reth: None,
            aeth: None,
            imm: None,
            atomic: None,
            atomic_ack: None,
            deth: None,
            payload: b"abcde",
            icrc: 0,
        };
        let mut buf = [0u8; 64];
        let n = p.encode(&mut buf).unwrap();
        assert_eq!(n, 12 + 8 + 4);
        assert_eq!((buf[1] >> 4) & 3, 3);
        assert_eq!(Packet::parse(&buf[..n]).unwrap().payload, b"abcde");
    }

    #[test]
    fn psn_order_wraps() {
        assert!(psn_before(0xff_fffe, 1));
        assert!(!psn_before(1, 0xff_fffe));
        assert!(!psn_before(5, 5));
    }

    proptest! {
        #[test]
        fn icrc_of_pieces_is_icrc_of_the_whole(
            d in proptest::collection::vec(any::<u8>(), 4..300),
            cut1 in 0usize..300,
            cut2 in 0usize..300,
            id in any::<u16>(),
        ) {
            let flow = Flow {
                src: std::net::Ipv4Addr::new(10, 0, 0, 1),
                dst: std::net::Ipv4Addr::new(10, 0, 0, 2),
                src_port: 49152,
                dst_port: ROCEV2_PORT,
                ip_id: id,
            };
            let body = &d[..d.len() - ICRC_BYTES];
            let (a, b) = (cut1.min(body.len()), cut2.min(body.len()));
            let (a, b) = (a.min(b), a.max(b));
            prop_assert_eq!(
                icrc_parts(&flow, &[&body[..a], &body[a..b], &body[b..]], d.len()),
                icrc(&flow, &d)
            );
        }

        #[test]
        fn parse_never_panics(d in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Packet::parse(&d);
            let _ = check(&flow(), &d);
        }

        #[test]
        fn encode_parse_round_trip(op in 0u8..0x15, qp in 0u32..0x100_0000, psn in 0u32..0x100_0000, len in 0usize..300) {
            let data = vec![0x5au8; len];
            let l = layout(op).unwrap();
            let p = Packet {
                bth: Bth { opcode: op, solicited: false, mig_req: false, pad: 0, tver: 0, pkey: DEFAULT_PKEY, fecn: false, becn: false, dest_qp: qp, ack_req: true, psn },
                reth: l.reth.then_some(Reth { va: 1, rkey: 2, dma_len: 3 }),
                aeth: l.aeth.then_some(Aeth { syndrome: 0x1f, msn: 9 }),
                imm: l.imm.then_some(7),
                atomic: l.atomic.then_some(AtomicEth { va: 8, rkey: 9, swap_add: 10, compare: 11 }),
                atomic_ack: l.atomic_ack.then_some(12),
                deth: None,
                payload: if l.payload { &data } else { &[] },
                icrc: 0,
            };
            let mut buf = vec![0u8; p.wire_len()];
            let n = p.encode(&mut buf).unwrap();
            seal(&flow(), &mut buf[..n]);
            prop_assert!(check(&flow(), &buf[..n]).is_ok());
            let q = Packet::parse(&buf[..n]).unwrap();
            prop_assert_eq!(q.payload, p.payload);
            prop_assert_eq!(q.bth.dest_qp, qp);
            prop_assert_eq!(q.bth.psn, psn);
            prop_assert_eq!(q.reth, p.reth);
            prop_assert_eq!(q.aeth, p.aeth);
            prop_assert_eq!(q.atomic, p.atomic);
        }
    }
}
