//! Sessions against each other and against hostile clients: isolation,
//! quotas, memory freed when a client dies, device-lost on disconnect, and
//! malformed or malicious messages that must cost only their sender.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use softcard_gpu::proto::{self, ErrorFilter, Message, Reply, Request};
use softcard_gpu::workloads;
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

/// A client that speaks the protocol by hand.
struct Raw {
    s: TcpStream,
    seq: u64,
    uncaptured: Vec<proto::GpuError>,
}

impl Raw {
    fn connect(addr: &str) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = Self {
            s,
            seq: 0,
            uncaptured: Vec::new(),
        };
        match r.call(
            &Request::Hello {
                version: proto::VERSION,
                credential: None,
            },
            &[],
        ) {
            Ok((Reply::Hello { .. }, _)) => {}
            other => panic!("hello: {other:?}"),
        }
        match r.call(
            &Request::RequestDevice {
                label: None,
                features: wgpu::Features::empty(),
                limits: wgpu::Limits::default(),
            },
            &[],
        ) {
            Ok((Reply::Device(Ok(())), _)) => {}
            other => panic!("device: {other:?}"),
        }
        r
    }

    fn send(&mut self, req: &Request, payload: &[u8]) {
        proto::write_frame(&mut self.s, req, payload).unwrap();
        self.seq += 1;
    }

    /// Sends an answered request; `Err` carries the reason the server closed
    /// the session.
    fn call(&mut self, req: &Request, payload: &[u8]) -> Result<(Reply, Vec<u8>), String> {
        let seq = self.seq;
        self.send(req, payload);
        loop {
            let (h, p) = match proto::read_raw(&mut self.s) {
                Ok(Some(f)) => f,
                Ok(None) => return Err("closed".into()),
                Err(e) => return Err(e.to_string()),
            };
            match proto::decode::<Message>(&h).unwrap() {
                Message::Reply { seq: s, reply } => {
                    assert_eq!(s, seq, "reply to the wrong request");
                    return Ok((reply, p));
                }
                Message::Uncaptured(e) => self.uncaptured.push(e),
                Message::Lost(why) => return Err(why),
            }
        }
    }

    /// Runs `f` inside an error scope and returns what the scope caught.
    fn scoped(
        &mut self,
        filter: ErrorFilter,
        f: impl FnOnce(&mut Self),
    ) -> Option<proto::GpuError> {
        self.send(&Request::PushErrorScope { filter }, &[]);
        f(self);
        match self.call(&Request::PopErrorScope, &[]) {
            Ok((Reply::ErrorScope(e), _)) => e,
            other => panic!("pop: {other:?}"),
        }
    }

    fn usage(&mut self) -> u64 {
        match self.call(&Request::Usage, &[]) {
            Ok((Reply::Usage { used, .. }, _)) => used,
            other => panic!("usage: {other:?}"),
        }
    }
}

fn buffer(id: u64, size: u64, usage: wgpu::BufferUsages) -> Request {
    Request::CreateBuffer {
        id,
        desc: wgpu::wgt::BufferDescriptor {
            label: None,
            size,
            usage,
            mapped_at_creation: false,
        },
    }
}

/// The server still serves a well-behaved client.
fn still_serves(addr: &str) {
    let (d, q) = workloads::open(&remote_instance(addr).unwrap()).unwrap();
    let r = workloads::collatz(&d, &q, &[27, 97]).unwrap();
    assert_eq!(r, [111u32.to_le_bytes(), 118u32.to_le_bytes()].concat());
}

#[test]
fn sessions_are_isolated_and_quotas_are_per_session() {
    let (server, addr) = server(64 << 20);
    let rw = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;

    // Session A: a buffer with known contents.
    let mut a = Raw::connect(&addr);
    a.send(&buffer(10, 256, rw), &[]);
    a.send(
        &Request::WriteBuffer {
            buffer: 10,
            offset: 0,
        },
        &[0xAA; 256],
    );

    // Session B names A's id: it does not exist there, and A's bytes stay.
    let mut b = Raw::connect(&addr);
    let e = b
        .scoped(ErrorFilter::Validation, |b| {
            b.send(
                &Request::WriteBuffer {
                    buffer: 10,
                    offset: 0,
                },
                &[0x55; 256],
            );
        })
        .expect("B's write to A's id is an error");
    assert!(
        e.description.contains("does not exist in this session"),
        "{e:?}"
    );
    match b.call(
        &Request::MapAsync {
            buffer: 10,
            write: false,
            range: 0..256,
        },
        &[],
    ) {
        Ok((Reply::Mapped(Err(m)), _)) => assert!(m.contains("does not exist"), "{m}"),
        other => panic!("B mapped A's buffer: {other:?}"),
    }
    match a.call(
        &Request::MapAsync {
            buffer: 10,
            write: false,
            range: 0..256,
        },
        &[],
    ) {
        Ok((Reply::Mapped(Ok(())), data)) => assert_eq!(data, vec![0xAA; 256]),
        other => panic!("A's map: {other:?}"),
    }

    // A goes over its quota: an out-of-memory error to A only.
    let e = a
        .scoped(ErrorFilter::OutOfMemory, |a| {
            a.send(&buffer(11, 100 << 20, wgpu::BufferUsages::STORAGE), &[]);
        })
        .expect("over quota");
    assert_eq!(e.kind, ErrorFilter::OutOfMemory);
    assert!(e.description.contains("quota"), "{e:?}");
    // Using the failed buffer is a validation error, not a crash.
    let e = a
        .scoped(ErrorFilter::Validation, |a| {
            a.send(
                &Request::WriteBuffer {
                    buffer: 11,
                    offset: 0,
                },
                &[1; 16],
            );
        })
        .expect("invalid buffer");
    assert!(e.description.contains("invalid"), "{e:?}");
    // B carries on with 48 MiB of its own.
    let none = b.scoped(ErrorFilter::OutOfMemory, |b| {
        b.send(&buffer(20, 48 << 20, wgpu::BufferUsages::STORAGE), &[]);
    });
    assert_eq!(none, None);
    assert_eq!(b.usage(), 48 << 20);
    still_serves(&addr);

    // Killing B (an abrupt close) frees everything it held.
    let before: Vec<_> = server
        .sessions()
        .iter()
        .map(|s| (s.session, s.used))
        .collect();
    assert!(
        before.iter().any(|(_, used)| *used == 48 << 20),
        "{before:?}"
    );
    b.s.shutdown(Shutdown::Both).unwrap();
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.sessions().iter().any(|s| s.used == 48 << 20) {
        assert!(Instant::now() < deadline, "B's session outlived its client");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A is untouched.
    assert_eq!(a.usage(), 256);
}

#[test]
fn hostile_messages_cost_only_their_sender() {
    let (_server, addr) = server(256 << 20);

    // Bytes that are no message at all.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&[3, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff])
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let msg: Message = proto::decode(&proto::read_raw(&mut &rest[..]).unwrap().unwrap().0).unwrap();
    assert!(
        matches!(msg, Message::Lost(ref w) if w.contains("malformed")),
        "{msg:?}"
    );

    // An absurd frame length: refused before any allocation.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let msg: Message = proto::decode(&proto::read_raw(&mut &rest[..]).unwrap().unwrap().0).unwrap();
    assert!(
        matches!(msg, Message::Lost(ref w) if w.contains("too large")),
        "{msg:?}"
    );

    // A frame cut short, then the client vanishes.
    let mut s = TcpStream::connect(&addr).unwrap();
    let mut frame = Vec::new();
    proto::write_frame(&mut frame, &Request::Poll, &[0; 64]).unwrap();
    s.write_all(&frame[..frame.len() - 10]).unwrap();
    drop(s);

    // Requests before a device; a wrong protocol version.
    let mut r = Raw {
        s: TcpStream::connect(&addr).unwrap(),
        seq: 0,
        uncaptured: Vec::new(),
    };
    let why = r
        .call(
            &Request::Hello {
                version: 999,
                credential: None,
            },
            &[],
        )
        .unwrap_err();
    assert!(why.contains("version"), "{why}");

    let mut r = Raw::connect(&addr);
    // Absurd sizes are quota errors, not allocations.
    let e = r
        .scoped(ErrorFilter::OutOfMemory, |r| {
            r.send(&buffer(5, u64::MAX, wgpu::BufferUsages::STORAGE), &[]);
        })
        .expect("u64::MAX buffer");
    assert_eq!(e.kind, ErrorFilter::OutOfMemory);
    let e = r
        .scoped(ErrorFilter::OutOfMemory, |r| {
            r.send(
                &Request::CreateTexture {
                    id: 6,
                    desc: wgpu::wgt::TextureDescriptor {
                        label: None,
                        size: wgpu::Extent3d {
                            width: 16384,
                            height: 16384,
                            depth_or_array_layers: 2048,
                        },
                        mip_level_count: 1,
                        sample_count: 1,
                        dimension: wgpu::TextureDimension::D2,
                        format: wgpu::TextureFormat::Rgba32Float,
                        usage: wgpu::TextureUsages::COPY_DST,
                        view_formats: vec![],
                    },
                },
                &[],
            );
        })
        .expect("huge texture");
    assert_eq!(e.kind, ErrorFilter::OutOfMemory);

    // An invalid shader: a validation error and compiler messages.
    let e = r
        .scoped(ErrorFilter::Validation, |r| {
            r.send(
                &Request::CreateShaderModule {
                    id: 7,
                    label: None,
                    wgsl: "fn main( { this is not wgsl".into(),
                },
                &[],
            );
        })
        .expect("bad shader");
    assert!(!e.description.is_empty());
    match r.call(&Request::CompilationInfo { module: 7 }, &[]) {
        Ok((Reply::CompilationInfo(m), _)) => assert!(m.iter().any(|m| m.error), "{m:?}"),
        other => panic!("{other:?}"),
    }

    // More bind group layouts than any device allows (wgpu's frontend
    // asserts on this; the server must answer it as an error).
    let e = r
        .scoped(ErrorFilter::Validation, |r| {
            r.send(
                &Request::CreatePipelineLayout {
                    id: 70,
                    label: None,
                    bind_group_layouts: vec![None; 16],
                    immediate_size: 0,
                },
                &[],
            );
        })
        .expect("too many bind group layouts");
    assert!(e.description.contains("bind group layouts"), "{e:?}");

    // Out-of-range writes and maps, wrong kinds, unbalanced passes.
    r.send(
        &buffer(
            8,
            64,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        ),
        &[],
    );
    let e = r
        .scoped(ErrorFilter::Validation, |r| {
            r.send(
                &Request::WriteBuffer {
                    buffer: 8,
                    offset: u64::MAX - 3,
                },
                &[1; 8],
            );
        })
        .expect("write past the end");
    assert!(e.description.contains("outside"), "{e:?}");
    match r.call(
        &Request::MapAsync {
            buffer: 8,
            write: false,
            range: 32..4096,
        },
        &[],
    ) {
        Ok((Reply::Mapped(Err(m)), _)) => assert!(m.contains("outside"), "{m}"),
        other => panic!("{other:?}"),
    }
    match r.call(
        &Request::MapAsync {
            buffer: 8,
            write: false,
            #[allow(clippy::reversed_empty_ranges)]
            range: 40..8,
        },
        &[],
    ) {
        Ok((Reply::Mapped(Err(_)), _)) => {}
        other => panic!("{other:?}"),
    }
    let e = r
        .scoped(ErrorFilter::Validation, |r| {
            r.send(
                &Request::CommandBuffer {
                    id: 9,
                    label: None,
                    commands: vec![
                        proto::Command::BeginComputePass { label: None },
                        proto::Command::SetComputePipeline(8),
                        proto::Command::Dispatch([1, 1, 1]),
                    ],
                },
                &[],
            );
            r.send(
                &Request::Submit {
                    command_buffers: vec![9, 9, 12345],
                },
                &[],
            );
        })
        .expect("bad command buffer");
    assert!(!e.description.is_empty());
    let e = r
        .scoped(ErrorFilter::Validation, |r| {
            r.send(
                &Request::CommandBuffer {
                    id: 13,
                    label: None,
                    commands: vec![proto::Command::SetVertexBuffer {
                        slot: 0,
                        buffer: Some(8),
                        offset: 1 << 40,
                        size: None,
                    }],
                },
                &[],
            );
        })
        .expect("vertex buffer outside a pass");
    assert!(e.description.contains("outside a pass"), "{e:?}");
    let e = r
        .scoped(ErrorFilter::Validation, |r| {
            r.send(
                &Request::CommandBuffer {
                    id: 14,
                    label: None,
                    commands: vec![
                        proto::Command::BeginRenderPass {
                            label: None,
                            color: vec![],
                            depth: None,
                            multiview_mask: None,
                        },
                        proto::Command::SetIndexBuffer {
                            buffer: 8,
                            format: wgpu::IndexFormat::Uint16,
                            offset: 64,
                            size: None,
                        },
                        proto::Command::EndPass,
                    ],
                },
                &[],
            );
        })
        .expect("empty index buffer slice");
    assert!(
        e.description.contains("outside") || e.description.contains("empty"),
        "{e:?}"
    );
    // The session itself is still usable.
    r.send(
        &Request::WriteBuffer {
            buffer: 8,
            offset: 0,
        },
        &[7; 64],
    );
    match r.call(
        &Request::MapAsync {
            buffer: 8,
            write: false,
            range: 0..64,
        },
        &[],
    ) {
        Ok((Reply::Mapped(Ok(())), data)) => assert_eq!(data, vec![7; 64]),
        other => panic!("{other:?}"),
    }
    // Reusing a live id closes the session.
    r.send(&buffer(8, 64, wgpu::BufferUsages::COPY_DST), &[]);
    let why = r.call(&Request::Poll, &[]).unwrap_err();
    assert!(why.contains("already in use"), "{why}");

    still_serves(&addr);
}

#[test]
fn error_scopes_and_device_lost_through_wgpu() {
    let (_server, addr) = server(256 << 20);

    // A proxy between client and server that the test can cut.
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let paddr = proxy.local_addr().unwrap().to_string();
    let (cut_tx, cut_rx) = mpsc::channel::<()>();
    let upstream = addr.clone();
    std::thread::spawn(move || {
        let (down, _) = proxy.accept().unwrap();
        let up = TcpStream::connect(&upstream).unwrap();
        for (mut from, mut to) in [
            (down.try_clone().unwrap(), up.try_clone().unwrap()),
            (up.try_clone().unwrap(), down.try_clone().unwrap()),
        ] {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
            });
        }
        let _ = cut_rx.recv();
        let _ = down.shutdown(Shutdown::Both);
        let _ = up.shutdown(Shutdown::Both);
    });

    let instance = remote_instance(&paddr).unwrap();
    let (device, queue) = workloads::open(&instance).unwrap();

    // An invalid shader inside an error scope: the scope catches it.
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let _bad = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("bad"),
        source: wgpu::ShaderSource::Wgsl("@compute fn main( {".into()),
    });
    let err = pollster::block_on(scope.pop());
    assert!(
        matches!(err, Some(wgpu::Error::Validation { .. })),
        "{err:?}"
    );
    // A clean scope is clean.
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let _ok = workloads::collatz(&device, &queue, &[1, 2, 3]).unwrap();
    assert!(pollster::block_on(scope.pop()).is_none());
    // Errors outside any scope reach the application's handler.
    let (etx, erx) = mpsc::channel();
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        let _ = etx.send(e.to_string());
    }));
    let _ = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 4,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::MAP_WRITE,
        mapped_at_creation: false,
    });
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let msg = erx
        .recv_timeout(Duration::from_secs(10))
        .expect("uncaptured error");
    assert!(!msg.is_empty());

    // Cutting the connection loses the device.
    let (ltx, lrx) = mpsc::channel();
    device.set_device_lost_callback(move |reason, why| {
        let _ = ltx.send((reason, why));
    });
    cut_tx.send(()).unwrap();
    let (reason, why) = lrx
        .recv_timeout(Duration::from_secs(10))
        .expect("device lost");
    assert_eq!(reason, wgpu::DeviceLostReason::Unknown);
    assert!(why.contains("GPU server"), "{why}");
    // After that, maps fail instead of hanging.
    let b = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: wgpu::BufferUsages::MAP_READ,
        mapped_at_creation: false,
    });
    assert!(workloads::read_buffer(&device, &b).is_err());
}

/// A client that leaves several error scopes open and goes away: the
/// session pops them innermost first (wgpu panics on any other order; the
/// fuzz target found it) and the server carries on.
#[test]
fn error_scopes_left_open_are_popped_in_order() {
    let (server, addr) = server(64 << 20);
    let mut input = Vec::new();
    proto::write_frame(
        &mut input,
        &Request::Hello {
            version: proto::VERSION,
            credential: None,
        },
        &[],
    )
    .unwrap();
    proto::write_frame(
        &mut input,
        &Request::RequestDevice {
            label: None,
            features: wgpu::Features::empty(),
            limits: wgpu::Limits::downlevel_defaults(),
        },
        &[],
    )
    .unwrap();
    let mut scopes = Vec::new();
    for filter in [
        ErrorFilter::Validation,
        ErrorFilter::OutOfMemory,
        ErrorFilter::Internal,
    ] {
        proto::write_frame(&mut scopes, &Request::PushErrorScope { filter }, &[]).unwrap();
    }
    input.extend_from_slice(&scopes);
    assert_eq!(server.run_bytes(&input), Ok(()));
    // Nothing runs before the hello (admission happens there), and there
    // is one hello.
    let e = server.run_bytes(&scopes).unwrap_err();
    assert!(e.contains("first message must be the hello"), "{e}");
    let mut twice = input[..input.len() - scopes.len()].to_vec();
    let hello_len = twice.len();
    twice.extend_from_slice(&input[..hello_len]);
    let e = server.run_bytes(&twice).unwrap_err();
    assert!(e.contains("second hello"), "{e}");
    // The fuzz target's way in: a hello, then the session has a device.
    let mut shared = Vec::new();
    proto::write_frame(
        &mut shared,
        &Request::Hello {
            version: proto::VERSION,
            credential: None,
        },
        &[],
    )
    .unwrap();
    shared.extend_from_slice(&scopes);
    assert_eq!(server.run_bytes_shared(&shared), Ok(()));
    assert_eq!(server.run_bytes_shared(&shared), Ok(()));
    // Over the network too: scopes left open, then a disconnect.
    let mut r = Raw::connect(&addr);
    for filter in [ErrorFilter::Validation, ErrorFilter::Validation] {
        r.send(&Request::PushErrorScope { filter }, &[]);
    }
    assert_eq!(r.usage(), 0);
    drop(r);
    still_serves(&addr);
}
