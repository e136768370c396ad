//! IPv4/UDP datagrams: checking what arrives, splitting GSO ones.

use std::net::Ipv4Addr;

use crate::wire::{self, Flow, ROCEV2_PORT};

use super::socket::*;

pub(super) fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Checks a received IPv4 datagram `d` (header without options first)
/// and the virtio-net header `vnet` the kernel put before it: the flow
/// (of the first segment), the UDP payload's length (it starts at byte 28)
/// and how many payload bytes each segment has (the whole payload unless
/// the datagram is a UDP GSO one). `None` for anything that is not a
/// well-formed, unfragmented UDP datagram to `local`, port 4791.
pub fn parse_datagram(local: Ipv4Addr, vnet: &[u8], d: &[u8]) -> Option<(Flow, usize, usize)> {
    if vnet.len() < VNET_HDR || d.len() < 28 || d[0] != 0x45 || ip_checksum(&d[..20]) != 0 {
        return None;
    }
    // The tap sees datagrams before IP reassembly and trimming: refuse
    // fragments (RoCEv2 sets DF) and use the IP length, not the frame's
    // (Ethernet may have padded it).
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
    if dport != ROCEV2_PORT || dst != local {
        return None;
    }
    let len = total - 28;
    let seg = match vnet[1] & 0x7f {
        VNET_GSO_NONE => len,
        // Segments shorter than the smallest RoCEv2 packet (a BTH and the
        // ICRC) cannot be valid: refusing them keeps a hostile sender from
        // making one datagram cost tens of thousands of checks.
        VNET_GSO_UDP_L4 => match usize::from(u16::from_le_bytes([vnet[4], vnet[5]])) {
            s if s < wire::BTH_BYTES + wire::ICRC_BYTES => return None,
            s => s,
        },
        _ => return None,
    };
    let flow = Flow {
        src: Ipv4Addr::new(d[12], d[13], d[14], d[15]),
        dst,
        src_port: u16::from_be_bytes([d[20], d[21]]),
        dst_port: dport,
        ip_id: u16::from_be_bytes([d[4], d[5]]),
    };
    Some((flow, len, seg))
}

/// The datagrams a (GSO) payload stands for: chunks of `seg` bytes (the
/// last may be shorter), segment `i` with the first one's IPv4
/// identification plus `i`, as the kernel numbers them when it splits.
pub fn split(first: Flow, payload: &[u8], seg: usize) -> impl Iterator<Item = (Flow, &[u8])> {
    payload
        .chunks(seg.max(1))
        .enumerate()
        .map(move |(i, chunk)| {
            let mut flow = first;
            flow.ip_id = first.ip_id.wrapping_add(i as u16);
            (flow, chunk)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    /// An IPv4/UDP datagram to `LOCAL`:4791 carrying `payload`.
    fn datagram(id: u16, frag: u16, payload: &[u8]) -> Vec<u8> {
        let total = u16::try_from(28 + payload.len()).unwrap();
        let mut d = vec![0x45, 0];
        d.extend_from_slice(&total.to_be_bytes());
        d.extend_from_slice(&id.to_be_bytes());
        d.extend_from_slice(&frag.to_be_bytes());
        d.extend_from_slice(&[64, 17, 0, 0, 10, 0, 0, 1]);
        d.extend_from_slice(&LOCAL.octets());
        let sum = ip_checksum(&d[..20]);
        d[10..12].copy_from_slice(&sum.to_be_bytes());
        d.extend_from_slice(&50000u16.to_be_bytes());
        d.extend_from_slice(&ROCEV2_PORT.to_be_bytes());
        d.extend_from_slice(&(total - 20).to_be_bytes());
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(payload);
        d
    }

    fn vnet(gso_type: u8, gso_size: u16) -> [u8; VNET_HDR] {
        let mut v = [0u8; VNET_HDR];
        v[1] = gso_type;
        v[4..6].copy_from_slice(&gso_size.to_le_bytes());
        v
    }

    #[test]
    fn a_plain_datagram_is_one_segment() {
        let d = datagram(77, 0x4000, &[9; 100]);
        let (flow, len, seg) = parse_datagram(LOCAL, &vnet(VNET_GSO_NONE, 0), &d).unwrap();
        assert_eq!((flow.src, flow.dst), (Ipv4Addr::new(10, 0, 0, 1), LOCAL));
        assert_eq!(
            (flow.src_port, flow.dst_port, flow.ip_id),
            (50000, 4791, 77)
        );
        assert_eq!((len, seg), (100, 100));
        // Ethernet padding after the IP length is not payload.
        let mut padded = d.clone();
        padded.extend_from_slice(&[0; 20]);
        assert_eq!(
            parse_datagram(LOCAL, &vnet(0, 0), &padded).map(|p| p.1),
            Some(100)
        );
    }

    #[test]
    fn a_gso_datagram_splits_with_consecutive_ids() {
        let payload: Vec<u8> = (0..250u8).collect();
        let d = datagram(0xfffe, 0x4000, &payload);
        let (flow, len, seg) = parse_datagram(LOCAL, &vnet(VNET_GSO_UDP_L4, 100), &d).unwrap();
        let parts: Vec<(u16, Vec<u8>)> = split(flow, &d[28..28 + len], seg)
            .map(|(f, c)| (f.ip_id, c.to_vec()))
            .collect();
        assert_eq!(
            parts,
            vec![
                (0xfffe, payload[..100].to_vec()),
                (0xffff, payload[100..200].to_vec()),
                (0, payload[200..].to_vec()),
            ]
        );
    }

    #[test]
    fn what_is_not_ours_or_not_whole_is_refused() {
        let good = datagram(1, 0x4000, &[1; 64]);
        let v = vnet(0, 0);
        assert!(parse_datagram(LOCAL, &v, &good).is_some());
        assert!(parse_datagram(Ipv4Addr::new(10, 0, 0, 3), &v, &good).is_none());
        // A fragment (more fragments set, or an offset).
        assert!(parse_datagram(LOCAL, &v, &datagram(1, 0x2000, &[1; 64])).is_none());
        assert!(parse_datagram(LOCAL, &v, &datagram(1, 0x0001, &[1; 64])).is_none());
        // A bad header checksum.
        let mut bad = good.clone();
        bad[8] = 1;
        assert!(parse_datagram(LOCAL, &v, &bad).is_none());
        // Truncated below the IP length.
        assert!(parse_datagram(LOCAL, &v, &good[..good.len() - 1]).is_none());
        // Another port, a UDP length that disagrees.
        let mut port = good.clone();
        port[23] ^= 1;
        assert!(parse_datagram(LOCAL, &v, &port).is_none());
        let mut ulen = good.clone();
        ulen[25] ^= 1;
        assert!(parse_datagram(LOCAL, &v, &ulen).is_none());
        // GSO of another kind, with no segment size, or with segments too
        // short to be RoCEv2 packets.
        assert!(parse_datagram(LOCAL, &vnet(1, 100), &good).is_none());
        assert!(parse_datagram(LOCAL, &vnet(VNET_GSO_UDP_L4, 0), &good).is_none());
        assert!(parse_datagram(LOCAL, &vnet(VNET_GSO_UDP_L4, 15), &good).is_none());
        assert!(parse_datagram(LOCAL, &vnet(VNET_GSO_UDP_L4, 16), &good).is_some());
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic_and_split_exactly(
            v in proptest::collection::vec(any::<u8>(), VNET_HDR),
            d in proptest::collection::vec(any::<u8>(), 0..400),
            seg in 16u16..300,
        ) {
            parse_datagram(LOCAL, &v, &d);
            let payload = vec![7u8; 28 + usize::from(seg) * 2];
            let g = datagram(5, 0x4000, &payload);
            let (flow, len, s) = parse_datagram(LOCAL, &vnet(VNET_GSO_UDP_L4, seg), &g).unwrap();
            prop_assert!(28 + len <= g.len());
            let total: usize = split(flow, &g[28..28 + len], s).map(|(_, c)| c.len()).sum();
            prop_assert_eq!(total, len);
        }
    }
}
