//! Arbitrary bytes, after a valid hello and device request, fed to a vGPU
//! server session on a real (lavapipe) device: the server must neither
//! panic nor hang, whatever the client sends.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    softcard_gpu::fuzzing::fuzz_session(data);
});
