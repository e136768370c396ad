//! Fuzzes the virtio-blk request parser with arbitrary descriptor tables
//! and guest memory (see `softcard_storage::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    softcard_storage::fuzzing::parse_request(data);
});
