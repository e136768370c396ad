//! Fuzzes the RoCEv2 receive path: the wire parser and the placement fast
//! path, checking that nothing is written outside what a packet may touch.
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
});
