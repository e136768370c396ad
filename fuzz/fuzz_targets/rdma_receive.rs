//! Fuzzes the RoCEv2 receive path: the IPv4/UDP/GSO datagram checks of the
//! receive ring, the wire parser and the placement fast path, checking
//! that nothing is written outside what a packet may touch.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    softcard_rdma::wire::check(
        &softcard_rdma::wire::Flow {
            src: std::net::Ipv4Addr::LOCALHOST,
            dst: std::net::Ipv4Addr::LOCALHOST,
            src_port: 1,
            dst_port: 4791,
            ip_id: 0,
        },
        data,
    )
    .ok();
    softcard_rdma::rc::fuzz_receive(data);
    // The same bytes as a virtio-net header and a datagram from the ring.
    if data.len() >= 10 {
        let (vnet, d) = data.split_at(10);
        let local = std::net::Ipv4Addr::new(
            d.get(16).copied().unwrap_or(0),
            d.get(17).copied().unwrap_or(0),
            d.get(18).copied().unwrap_or(0),
            d.get(19).copied().unwrap_or(0),
        );
        if let Some((flow, len, seg)) = softcard_rdma::net::parse_datagram(local, vnet, d) {
            assert!(28 + len <= d.len());
            let mut covered = 0;
            for (f, chunk) in softcard_rdma::net::split(flow, &d[28..28 + len], seg) {
                covered += chunk.len();
                softcard_rdma::wire::check(&f, chunk).ok();
                softcard_rdma::wire::Packet::parse(chunk).ok();
            }
            assert_eq!(covered, len);
        }
    }
});
