//! The vGPU against the same workloads run locally on the same adapter
//! (lavapipe here): results must be byte-identical.

use std::sync::Arc;

use softcard_gpu::workloads::{self, Scene};
use softcard_gpu::{remote_instance, GpuServer, ServerConfig};

fn server(quota: u64) -> (Arc<GpuServer>, String) {
    let _ = env_logger::builder().is_test(true).try_init();
    let server = GpuServer::new(ServerConfig {
        quota,
        ..Default::default()
    })
    .expect("a Vulkan adapter (mesa-vulkan-drivers)");
    let addr = server.listen("127.0.0.1:0").unwrap().to_string();
    (server, addr)
}

#[test]
fn compute_workloads_match_local() {
    let (_server, addr) = server(1 << 30);
    let local = workloads::open(&workloads::local_instance()).unwrap();
    let remote = workloads::open(&remote_instance(&addr).unwrap()).unwrap();
    assert!(remote
        .0
        .as_custom::<softcard_gpu::client::RDevice>()
        .is_some());

    let input: Vec<u32> = (1..=10_000)
        .chain([u32::MAX - 1, 77_031, 837_799])
        .collect();
    let l = workloads::collatz(&local.0, &local.1, &input).unwrap();
    let r = workloads::collatz(&remote.0, &remote.1, &input).unwrap();
    assert_eq!(l.len(), input.len() * 4);
    assert!(l == r, "collatz differs");
    // A known value: 27 takes 111 steps.
    assert_eq!(
        u32::from_le_bytes(r[26 * 4..27 * 4].try_into().unwrap()),
        111
    );

    let l = workloads::matmul(&local.0, &local.1, 96).unwrap();
    let r = workloads::matmul(&remote.0, &remote.1, 96).unwrap();
    assert!(l == r, "matmul differs");
    assert!(r.iter().any(|b| *b != 0));
    // The session's memory, as the server counts it against the quota:
    // the workloads' buffers went with them; a live one is counted until
    // dropped.
    let (before, quota, _) = softcard_gpu::usage(&remote.0).expect("a remote device");
    assert_eq!(quota, 1 << 30);
    let held = remote.0.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 1 << 20,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let (during, _, objects) = softcard_gpu::usage(&remote.0).unwrap();
    assert_eq!(during, before + (1 << 20));
    assert!(objects > 0);
    drop(held);
    assert_eq!(softcard_gpu::usage(&remote.0).unwrap().0, before);
    assert!(
        softcard_gpu::usage(&local.0).is_none(),
        "a local device has no vGPU session"
    );
}

#[test]
fn render_matches_local() {
    let (_server, addr) = server(1 << 30);
    let local = workloads::open(&workloads::local_instance()).unwrap();
    let remote = workloads::open(&remote_instance(&addr).unwrap()).unwrap();
    let ls = Scene::new(&local.0, &local.1, 320, 240);
    let rs = Scene::new(&remote.0, &remote.1, 320, 240);
    for t in [0, 17] {
        let l = ls.render_pixels(&local.0, &local.1, t).unwrap();
        let r = rs.render_pixels(&remote.0, &remote.1, t).unwrap();
        assert_eq!(l.len(), 320 * 240 * 4);
        assert!(l == r, "frame {t} differs");
        // The scene is drawn: many distinct colours, not just the clear.
        let mut colours: Vec<&[u8]> = r.chunks(4).collect();
        colours.sort();
        colours.dedup();
        assert!(colours.len() > 50, "only {} colours", colours.len());
    }
}
