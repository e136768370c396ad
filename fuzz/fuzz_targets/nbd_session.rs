//! Fuzzes an NBD connection: arbitrary bytes from the client, from the
//! first byte of negotiation, against a volume in the middle of a device
//! (see `softcard_storage::nbd::fuzz_connection`); the first byte picks
//! whether the volume is encrypted.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&first, rest)) = data.split_first() {
        softcard_storage::nbd::fuzz_connection(rest, first & 1 == 1);
    }
});
