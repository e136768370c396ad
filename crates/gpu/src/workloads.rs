//! Ordinary wgpu workloads, written against the plain wgpu API, used to
//! prove and measure the vGPU: the same code runs on a local instance and on
//! a [`remote_instance`](crate::remote_instance).

use wgpu::util::DeviceExt;

/// Opens the instance's first adapter and a device with default limits.
pub fn open(instance: &wgpu::Instance) -> Result<(wgpu::Device, wgpu::Queue), String> {
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
            .map_err(|e| e.to_string())?;
    pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("softcard workload"),
        ..Default::default()
    }))
    .map_err(|e| e.to_string())
}

/// A local lavapipe/Vulkan instance.
pub fn local_instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::VULKAN;
    wgpu::Instance::new(desc)
}

/// Maps `buffer` for reading and returns its bytes (one round trip remotely).
pub fn read_buffer(device: &wgpu::Device, buffer: &wgpu::Buffer) -> Result<Vec<u8>, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    buffer.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| e.to_string())?;
    rx.recv()
        .map_err(|_| "map callback never ran".to_string())?
        .map_err(|e| e.to_string())?;
    let out = buffer
        .get_mapped_range(..)
        .map_err(|e| e.to_string())?
        .to_vec();
    buffer.unmap();
    Ok(out)
}

/// A compute pipeline from `wgsl` (entry point `main`, implicit layout)
/// and a bind group with `storage` at group 0, binding 0.
fn storage_pipeline(
    device: &wgpu::Device,
    label: &str,
    wgsl: &str,
    storage: &wgpu::Buffer,
) -> (wgpu::ComputePipeline, wgpu::BindGroup) {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(wgsl.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[wgpu::BindGroupEntry {
            binding: 0,
            resource: storage.as_entire_binding(),
        }],
    });
    (pipeline, group)
}

const COLLATZ: &str = r#"
@group(0) @binding(0) var<storage, read_write> values: array<u32>;

// Steps until n reaches 1; 0xffffffff if n would overflow u32 on the way.
fn steps(start: u32) -> u32 {
    var n = start;
    var count = 0u;
    loop {
        if (n <= 1u) { break; }
        if (n % 2u == 0u) {
            n = n / 2u;
        } else {
            if (n >= 1431655765u) { return 4294967295u; }
            n = 3u * n + 1u;
        }
        count = count + 1u;
    }
    return count;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&values)) {
        values[id.x] = steps(values[id.x]);
    }
}
"#;

/// Collatz step counts of `input`, computed on the GPU.
pub fn collatz(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    input: &[u32],
) -> Result<Vec<u8>, String> {
    let bytes: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
    let size = bytes.len() as u64;
    let storage = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("values"),
        contents: &bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    });
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let (pipeline, group) = storage_pipeline(device, "collatz", COLLATZ, &storage);
    let mut enc = device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups((input.len() as u32).div_ceil(64), 1, 1);
    }
    enc.copy_buffer_to_buffer(&storage, 0, &readback, 0, size);
    queue.submit([enc.finish()]);
    read_buffer(device, &readback)
}

const MATMUL: &str = r#"
struct Dims { n: u32 }
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<uniform> dims: Dims;

@compute @workgroup_size(8, 8)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let n = dims.n;
    if (id.x >= n || id.y >= n) { return; }
    var acc = 0.0;
    for (var k = 0u; k < n; k = k + 1u) {
        acc = acc + a[id.y * n + k] * b[k * n + id.x];
    }
    c[id.y * n + id.x] = acc;
}
"#;

/// `n`x`n` matrix product of two deterministic matrices, as raw bytes. The
/// inputs are uploaded with `Queue::write_buffer` and a buffer mapped at
/// creation; the layout is explicit.
pub fn matmul(device: &wgpu::Device, queue: &wgpu::Queue, n: u32) -> Result<Vec<u8>, String> {
    let len = (n * n) as usize;
    let a: Vec<f32> = (0..len)
        .map(|i| ((i * 7 + 3) % 17) as f32 * 0.25 - 2.0)
        .collect();
    let b: Vec<f32> = (0..len)
        .map(|i| ((i * 5 + 1) % 13) as f32 * 0.5 - 3.0)
        .collect();
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let size = (len * 4) as u64;
    let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    let abuf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("a"),
        size,
        usage: storage,
        mapped_at_creation: false,
    });
    queue.write_buffer(&abuf, 0, &bytes(&a));
    let bbuf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("b"),
        size,
        usage: storage,
        mapped_at_creation: true,
    });
    bbuf.get_mapped_range_mut(..)
        .map_err(|e| e.to_string())?
        .copy_from_slice(&bytes(&b));
    bbuf.unmap();
    let cbuf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("c"),
        size,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let dims = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("dims"),
        contents: &n.to_le_bytes(),
        usage: wgpu::BufferUsages::UNIFORM,
    });
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let entry = |binding, ty| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty,
        count: None,
    };
    let sb = |read_only| wgpu::BindingType::Buffer {
        ty: wgpu::BufferBindingType::Storage { read_only },
        has_dynamic_offset: false,
        min_binding_size: None,
    };
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("matmul"),
        entries: &[
            entry(0, sb(true)),
            entry(1, sb(true)),
            entry(2, sb(false)),
            entry(
                3,
                wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
            ),
        ],
    });
    let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("matmul"),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("matmul"),
        source: wgpu::ShaderSource::Wgsl(MATMUL.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("matmul"),
        layout: Some(&pl),
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &layout,
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: abuf.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: bbuf.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 2,
                resource: cbuf.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 3,
                resource: dims.as_entire_binding(),
            },
        ],
    });
    let mut enc = device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(n.div_ceil(8), n.div_ceil(8), 1);
    }
    enc.copy_buffer_to_buffer(&cbuf, 0, &readback, 0, size);
    queue.submit([enc.finish()]);
    read_buffer(device, &readback)
}

const SCENE: &str = r#"
struct Globals { mvp: mat4x4<f32> }
@group(0) @binding(0) var<uniform> globals: Globals;
@group(0) @binding(1) var tex: texture_2d<f32>;
@group(0) @binding(2) var samp: sampler;

struct VsOut {
    @builtin(position) pos: vec4<f32>,
    @location(0) uv: vec2<f32>,
    @location(1) shade: f32,
}

@vertex
fn vs(@location(0) pos: vec3<f32>, @location(1) uv: vec2<f32>, @location(2) shade: f32) -> VsOut {
    var out: VsOut;
    out.pos = globals.mvp * vec4<f32>(pos, 1.0);
    out.uv = uv;
    out.shade = shade;
    return out;
}

@fragment
fn fs(v: VsOut) -> @location(0) vec4<f32> {
    let c = textureSample(tex, samp, v.uv);
    return vec4<f32>(c.rgb * v.shade, 1.0);
}
"#;

/// A textured, depth-tested 3D scene: two interpenetrating cubes with a
/// checkerboard texture, drawn into an offscreen texture.
#[derive(Debug)]
pub struct Scene {
    pub width: u32,
    pub height: u32,
    pub format: wgpu::TextureFormat,
    pipeline: wgpu::RenderPipeline,
    vertices: wgpu::Buffer,
    indices: wgpu::Buffer,
    index_count: u32,
    globals: wgpu::Buffer,
    group: wgpu::BindGroup,
    depth: wgpu::TextureView,
}

fn cube(center: [f32; 3], half: f32, verts: &mut Vec<f32>, idx: &mut Vec<u16>) {
    // Six faces, each with its own shade so the depth test is visible.
    type Face = ([f32; 3], [f32; 3], [f32; 3], f32);
    let faces: [Face; 6] = [
        ([0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], 1.0),
        ([0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], 0.55),
        ([1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0], 0.8),
        ([-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], 0.65),
        ([0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0], 0.9),
        ([0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], 0.45),
    ];
    for (n, u, v, shade) in faces {
        let base = (verts.len() / 6) as u16;
        for (su, sv, tu, tv) in [
            (-1.0, -1.0, 0.0, 1.0),
            (1.0, -1.0, 1.0, 1.0),
            (1.0, 1.0, 1.0, 0.0),
            (-1.0, 1.0, 0.0, 0.0),
        ] {
            for k in 0..3 {
                verts.push(center[k] + half * (n[k] + su * u[k] + sv * v[k]));
            }
            verts.extend_from_slice(&[tu, tv, shade]);
        }
        idx.extend_from_slice(&[base, base + 1, base + 2, base, base + 2, base + 3]);
    }
}

fn mat_mul(a: &[f32; 16], b: &[f32; 16]) -> [f32; 16] {
    // Column-major 4x4 product a*b.
    let mut out = [0.0; 16];
    for c in 0..4 {
        for r in 0..4 {
            out[c * 4 + r] = (0..4).map(|k| a[k * 4 + r] * b[c * 4 + k]).sum();
        }
    }
    out
}

/// Model-view-projection for frame `t` (column-major, WebGPU depth 0..1).
pub fn mvp(t: u32, aspect: f32) -> [f32; 16] {
    let angle = t as f32 * 0.05;
    let (s, c) = angle.sin_cos();
    let rot_y = [
        c, 0.0, -s, 0.0, 0.0, 1.0, 0.0, 0.0, s, 0.0, c, 0.0, 0.0, 0.0, 0.0, 1.0,
    ];
    let (s2, c2) = 0.4f32.sin_cos();
    let rot_x = [
        1.0, 0.0, 0.0, 0.0, 0.0, c2, s2, 0.0, 0.0, -s2, c2, 0.0, 0.0, 0.0, 0.0, 1.0,
    ];
    let view = [
        1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -4.0, 1.0,
    ];
    let (near, far, fov) = (0.1f32, 20.0f32, 1.0f32);
    let f = 1.0 / (fov / 2.0).tan();
    let proj = [
        f / aspect,
        0.0,
        0.0,
        0.0,
        0.0,
        f,
        0.0,
        0.0,
        0.0,
        0.0,
        far / (near - far),
        -1.0,
        0.0,
        0.0,
        near * far / (near - far),
        0.0,
    ];
    mat_mul(&proj, &mat_mul(&view, &mat_mul(&rot_x, &rot_y)))
}

impl Scene {
    /// Builds the scene's resources for `width`x`height` frames.
    pub fn new(device: &wgpu::Device, queue: &wgpu::Queue, width: u32, height: u32) -> Self {
        let format = wgpu::TextureFormat::Rgba8Unorm;
        let (mut verts, mut idx) = (Vec::new(), Vec::new());
        cube([-0.35, 0.0, 0.0], 0.7, &mut verts, &mut idx);
        cube([0.45, 0.2, 0.3], 0.5, &mut verts, &mut idx);
        let vbytes: Vec<u8> = verts.iter().flat_map(|v| v.to_le_bytes()).collect();
        let ibytes: Vec<u8> = idx.iter().flat_map(|v| v.to_le_bytes()).collect();
        let vertices = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("vertices"),
            contents: &vbytes,
            usage: wgpu::BufferUsages::VERTEX,
        });
        let indices = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("indices"),
            contents: &ibytes,
            usage: wgpu::BufferUsages::INDEX,
        });
        let globals = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("globals"),
            size: 64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        // A 64x64 checkerboard with a gradient, uploaded with write_texture.
        let size = 64u32;
        let texels: Vec<u8> = (0..size * size)
            .flat_map(|i| {
                let (x, y) = (i % size, i / size);
                let on = ((x / 8) + (y / 8)) % 2 == 0;
                if on {
                    [230, (x * 4) as u8, (y * 4) as u8, 255]
                } else {
                    [30, 60, 200 - (x * 2) as u8, 255]
                }
            })
            .collect();
        let texture = device.create_texture(&wgpu::TextureDescriptor {
            label: Some("checker"),
            size: wgpu::Extent3d {
                width: size,
                height: size,
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba8Unorm,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        queue.write_texture(
            texture.as_image_copy(),
            &texels,
            wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(size * 4),
                rows_per_image: Some(size),
            },
            wgpu::Extent3d {
                width: size,
                height: size,
                depth_or_array_layers: 1,
            },
        );
        let sampler = device.create_sampler(&wgpu::SamplerDescriptor {
            label: Some("checker"),
            mag_filter: wgpu::FilterMode::Linear,
            min_filter: wgpu::FilterMode::Linear,
            ..Default::default()
        });
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("scene"),
            source: wgpu::ShaderSource::Wgsl(SCENE.into()),
        });
        let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
            label: Some("scene"),
            layout: None,
            vertex: wgpu::VertexState {
                module: &module,
                entry_point: Some("vs"),
                compilation_options: Default::default(),
                buffers: &[Some(wgpu::VertexBufferLayout {
                    array_stride: 24,
                    step_mode: wgpu::VertexStepMode::Vertex,
                    attributes: &wgpu::vertex_attr_array![0 => Float32x3, 1 => Float32x2, 2 => Float32],
                })],
            },
            primitive: wgpu::PrimitiveState {
                cull_mode: Some(wgpu::Face::Back),
                ..Default::default()
            },
            depth_stencil: Some(wgpu::DepthStencilState {
                format: wgpu::TextureFormat::Depth32Float,
                depth_write_enabled: Some(true),
                depth_compare: Some(wgpu::CompareFunction::Less),
                stencil: Default::default(),
                bias: Default::default(),
            }),
            multisample: Default::default(),
            fragment: Some(wgpu::FragmentState {
                module: &module,
                entry_point: Some("fs"),
                compilation_options: Default::default(),
                targets: &[Some(format.into())],
            }),
            multiview_mask: None,
            cache: None,
        });
        let view = texture.create_view(&Default::default());
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("scene"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: globals.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: wgpu::BindingResource::TextureView(&view),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: wgpu::BindingResource::Sampler(&sampler),
                },
            ],
        });
        let depth = device
            .create_texture(&wgpu::TextureDescriptor {
                label: Some("depth"),
                size: wgpu::Extent3d {
                    width,
                    height,
                    depth_or_array_layers: 1,
                },
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format: wgpu::TextureFormat::Depth32Float,
                usage: wgpu::TextureUsages::RENDER_ATTACHMENT,
                view_formats: &[],
            })
            .create_view(&Default::default());
        Self {
            width,
            height,
            format,
            pipeline,
            vertices,
            indices,
            index_count: idx.len() as u32,
            globals,
            group,
            depth,
        }
    }

    /// Records frame `t` into `target` and submits it.
    pub fn draw(
        &self,
        queue: &wgpu::Queue,
        device: &wgpu::Device,
        target: &wgpu::TextureView,
        t: u32,
    ) {
        let m = mvp(t, self.width as f32 / self.height as f32);
        let bytes: Vec<u8> = m.iter().flat_map(|v| v.to_le_bytes()).collect();
        queue.write_buffer(&self.globals, 0, &bytes);
        let mut enc = device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_render_pass(&wgpu::RenderPassDescriptor {
                label: Some("scene"),
                color_attachments: &[Some(wgpu::RenderPassColorAttachment {
                    view: target,
                    depth_slice: None,
                    resolve_target: None,
                    ops: wgpu::Operations {
                        load: wgpu::LoadOp::Clear(wgpu::Color {
                            r: 0.05,
                            g: 0.07,
                            b: 0.1,
                            a: 1.0,
                        }),
                        store: wgpu::StoreOp::Store,
                    },
                })],
                depth_stencil_attachment: Some(wgpu::RenderPassDepthStencilAttachment {
                    view: &self.depth,
                    depth_ops: Some(wgpu::Operations {
                        load: wgpu::LoadOp::Clear(1.0),
                        store: wgpu::StoreOp::Store,
                    }),
                    stencil_ops: None,
                }),
                ..Default::default()
            });
            pass.set_pipeline(&self.pipeline);
            pass.set_bind_group(0, &self.group, &[]);
            pass.set_vertex_buffer(0, self.vertices.slice(..));
            pass.set_index_buffer(self.indices.slice(..), wgpu::IndexFormat::Uint16);
            pass.draw_indexed(0..self.index_count, 0, 0..1);
        }
        queue.submit([enc.finish()]);
    }

    /// Renders frame `t` offscreen and reads the pixels back (RGBA8, rows
    /// tightly packed).
    pub fn render_pixels(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        t: u32,
    ) -> Result<Vec<u8>, String> {
        let target = device.create_texture(&wgpu::TextureDescriptor {
            label: Some("frame"),
            size: wgpu::Extent3d {
                width: self.width,
                height: self.height,
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: self.format,
            usage: wgpu::TextureUsages::RENDER_ATTACHMENT | wgpu::TextureUsages::COPY_SRC,
            view_formats: &[],
        });
        self.draw(queue, device, &target.create_view(&Default::default()), t);
        let row = self.width * 4;
        let padded =
            row.div_ceil(wgpu::COPY_BYTES_PER_ROW_ALIGNMENT) * wgpu::COPY_BYTES_PER_ROW_ALIGNMENT;
        let readback = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("frame readback"),
            size: u64::from(padded * self.height),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = device.create_command_encoder(&Default::default());
        enc.copy_texture_to_buffer(
            target.as_image_copy(),
            wgpu::TexelCopyBufferInfo {
                buffer: &readback,
                layout: wgpu::TexelCopyBufferLayout {
                    offset: 0,
                    bytes_per_row: Some(padded),
                    rows_per_image: Some(self.height),
                },
            },
            wgpu::Extent3d {
                width: self.width,
                height: self.height,
                depth_or_array_layers: 1,
            },
        );
        queue.submit([enc.finish()]);
        let raw = read_buffer(device, &readback)?;
        Ok(raw
            .chunks(padded as usize)
            .flat_map(|r| r[..row as usize].iter().copied())
            .collect())
    }
}

const SCALE: &str = r#"
@group(0) @binding(0) var<storage, read_write> v: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.y * 65535u * 64u + id.x;
    if (i < arrayLength(&v)) {
        v[i] = v[i] * 2u + 1u;
    }
}
"#;

/// Upload `len` bytes, run a dispatch over them, read them back: the
/// round trip of a typical GPGPU offload. Resources are made once.
#[derive(Debug)]
pub struct Offload {
    len: u64,
    storage: wgpu::Buffer,
    readback: wgpu::Buffer,
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
}

impl Offload {
    /// Prepares buffers of `len` bytes (a multiple of 4).
    pub fn new(device: &wgpu::Device, len: u64) -> Self {
        let storage = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("offload"),
            size: len,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("offload readback"),
            size: len,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let (pipeline, group) = storage_pipeline(device, "scale", SCALE, &storage);
        Self {
            len,
            storage,
            readback,
            pipeline,
            group,
        }
    }

    /// One upload, dispatch and readback of `data` (`len` bytes).
    pub fn run(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        data: &[u8],
    ) -> Result<Vec<u8>, String> {
        queue.write_buffer(&self.storage, 0, data);
        let words = (self.len / 4) as u32;
        let groups = words.div_ceil(64);
        let (x, y) = (groups.min(65535), groups.div_ceil(65535));
        let mut enc = device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.pipeline);
            pass.set_bind_group(0, &self.group, &[]);
            pass.dispatch_workgroups(x, y, 1);
        }
        enc.copy_buffer_to_buffer(&self.storage, 0, &self.readback, 0, self.len);
        queue.submit([enc.finish()]);
        read_buffer(device, &self.readback)
    }
}
