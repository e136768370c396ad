//! Entry points for the fuzz targets (feature `fuzzing`).

use std::sync::{Arc, OnceLock};

use crate::proto::{self, Request};
use crate::server::{GpuServer, ServerConfig};

fn server() -> &'static Arc<GpuServer> {
    static SERVER: OnceLock<Arc<GpuServer>> = OnceLock::new();
    SERVER.get_or_init(|| {
        GpuServer::new(ServerConfig { quota: 64 << 20 }).expect("a Vulkan adapter for fuzzing")
    })
}

/// The frames that open a session and create its device, so that fuzzed
/// frames reach object handling.
pub fn preamble() -> Vec<u8> {
    let mut out = Vec::new();
    let hello = Request::Hello {
        version: proto::VERSION,
    };
    proto::write_frame(&mut out, &hello, &[]).expect("vec write");
    let device = Request::RequestDevice {
        label: None,
        features: wgpu::Features::empty(),
        limits: wgpu::Limits::downlevel_defaults(),
    };
    proto::write_frame(&mut out, &device, &[]).expect("vec write");
    out
}

/// Feeds arbitrary bytes, after the preamble, to a fresh session on a
/// real device. Any outcome but a panic or a hang is fine.
pub fn fuzz_session(data: &[u8]) {
    let mut input = preamble();
    input.extend_from_slice(data);
    let _ = server().run_bytes(&input);
}

/// Feeds arbitrary bytes to the frame decoder alone.
pub fn fuzz_decode(data: &[u8]) {
    let mut r = data;
    while let Ok(Some((h, _))) = proto::read_raw(&mut r) {
        let _ = proto::decode::<Request>(&h);
    }
}
