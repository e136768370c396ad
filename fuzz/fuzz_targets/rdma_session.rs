//! Fuzzes the card's RDMA sessions: an application's control requests and
//! writes to its shared-memory rings, checking that another application's
//! memory never changes and that nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    softcard_rdma::service::fuzz_session(data);
});
