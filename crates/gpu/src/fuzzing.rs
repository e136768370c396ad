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

/// A GPU server that admits only one credential (the fuzzer's job is to
/// get in without it), and that credential.
fn guarded() -> &'static (Arc<GpuServer>, Arc<crate::server::grants::Grants>, String) {
    use crate::server::grants::{credential_hash, Grants};
    static SERVER: OnceLock<(Arc<GpuServer>, Arc<Grants>, String)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let grants = Arc::new(Grants::new("gpu-a"));
        let good = format!("vg1_gpu-a_egpu-1_{}", "5".repeat(64));
        grants.set(std::collections::HashMap::from([(
            credential_hash(&good),
            crate::server::Grant {
                attachment: "egpu-1".into(),
                quota: 1 << 20,
            },
        )]));
        let server = GpuServer::new(ServerConfig {
            quota: 64 << 20,
            admission: Some(grants.clone()),
            ..Default::default()
        })
        .expect("a Vulkan adapter for fuzzing");
        (server, grants, good)
    })
}

/// A throwaway TLS identity for the server side of the handshake.
fn tls_config() -> &'static Arc<rustls::ServerConfig> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let c = rcgen::generate_simple_self_signed(vec!["gpu-a.vgpu.softcard.internal".into()])
            .expect("a certificate");
        let tls = crate::tls::ServerTls::from_pem(&c.cert.pem(), &c.signing_key.serialize_pem())
            .expect("a TLS identity");
        tls.config().expect("config")
    })
}

/// The vGPU port's front door with arbitrary bytes. The first byte picks
/// what they are: TLS records to a fresh server handshake; a credential
/// for the admission policy (only the one granted may pass, and only as
/// its own attachment); or a session's first frames on a server that
/// admits one credential (no request may run before an admitted hello).
pub fn fuzz_hello(data: &[u8]) {
    use crate::server::Admission;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let mut conn =
                rustls::ServerConnection::new(tls_config().clone()).expect("a connection");
            let mut input = rest;
            while !input.is_empty() {
                match conn.read_tls(&mut input) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if conn.process_new_packets().is_err() {
                    break;
                }
            }
        }
        1 => {
            let (_, grants, good) = guarded();
            let c = String::from_utf8_lossy(rest);
            match grants.admit(Some(&c)) {
                Ok(g) => {
                    assert_eq!(&*c, good.as_str(), "admitted a credential never granted");
                    assert_eq!(g.attachment, "egpu-1");
                }
                Err(why) => assert!(!why.is_empty()),
            }
        }
        _ => {
            let (server, _, _) = guarded();
            // Whatever comes first, nothing but the granted credential's
            // hello opens the session: a refused session ends at once.
            let _ = server.run_bytes(rest);
        }
    }
}

/// Feeds arbitrary bytes to the frame decoder alone.
pub fn fuzz_decode(data: &[u8]) {
    let mut r = data;
    while let Ok(Some((h, _))) = proto::read_raw(&mut r) {
        let _ = proto::decode::<Request>(&h);
    }
}
