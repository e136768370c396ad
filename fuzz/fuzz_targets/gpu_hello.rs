//! The vGPU port's front door: TLS handshake records, credentials and a
//! session's first frames, arbitrary. Nothing panics or hangs, and no
//! credential but the one granted is admitted.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    softcard_gpu::fuzzing::fuzz_hello(data);
});
