//! Entry points for the fuzz targets (feature `fuzzing`).

use std::sync::{Arc, OnceLock};

use crate::proto::{self, Request};
use crate::server::{GpuServer, ServerConfig};

fn server() -> &'static Arc<GpuServer> {
    static SERVER: OnceLock<Arc<GpuServer>> = OnceLock::new();
    SERVER.get_or_init(|| {
        GpuServer::new(ServerConfig {
            quota: 64 << 20,
            ..Default::default()
        })
        .expect("a Vulkan adapter for fuzzing")
    })
}

/// The frame that opens a session, so that fuzzed frames reach object
/// handling (the session starts with a shared device).
pub fn preamble() -> Vec<u8> {
    let mut out = Vec::new();
    let hello = Request::Hello {
        version: proto::VERSION,
        credential: None,
    };
    proto::write_frame(&mut out, &hello, &[]).expect("vec write");
    out
}

/// Feeds arbitrary bytes, after the preamble, to a fresh session on a
/// real device. Any outcome but a panic or a hang is fine.
pub fn fuzz_session(data: &[u8]) {
    let mut input = preamble();
    input.extend_from_slice(data);
    let _ = server().run_bytes_shared(&input);
}

/// Feeds arbitrary bytes to the frame decoder alone.
pub fn fuzz_decode(data: &[u8]) {
    let mut r = data;
    while let Ok(Some((h, _))) = proto::read_raw(&mut r) {
        let _ = proto::decode::<Request>(&h);
    }
}
