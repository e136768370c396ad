//! The vGPU client: a wgpu custom backend whose objects live on a remote
//! GPU server.
//!
//! Object ids are chosen here, so every creation call is one buffered
//! message and the application never waits for it. Command encoders record
//! locally and travel as one message at `finish()`. Only these wait for the
//! server: `request_adapter`/`request_device`, `map_async` (one round trip,
//! the bytes come with the answer), `pop_error_scope`, `poll(Wait)`,
//! `on_submitted_work_done` and shader compilation info.

mod buffer;
mod conn;
mod encoder;
mod metadata;
mod surface;

pub use buffer::*;
pub use encoder::*;
pub use metadata::{remote_instance_from_metadata, vgpu_from_metadata};
pub use surface::*;

use std::future::ready;
use std::ops::Range;
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use wgpu::custom::*;
use wgpu::wgt;

use crate::proto::{self, Command, Id, Reply, Request};
use conn::Conn;

const FOREIGN: &str = "object does not belong to a softcard vGPU device";

/// Features and surfaces this backend cannot carry panic with this message,
/// as wgpu does for features a device was not created with.
fn unsupported(what: &str) -> ! {
    panic!("softcard vGPU does not support {what}")
}

/// Where a vGPU is and how to prove the right to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// host:port of the GPU server (or of a relay to it).
    pub addr: String,
    /// The vGPU attachment's credential, issued by the region.
    pub credential: Option<String>,
    /// Speak TLS, trusting this authority for this server name.
    pub tls: Option<crate::tls::ClientTls>,
}

impl Endpoint {
    /// `addr`, with the settings of the environment:
    /// `SOFTCARD_VGPU_CREDENTIAL` (the credential),
    /// `SOFTCARD_VGPU_CA` (a PEM file: speak TLS, trusting it) and
    /// `SOFTCARD_VGPU_SERVER_NAME` (the name the server's certificate
    /// carries).
    pub fn from_env(addr: &str) -> std::io::Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|c| !c.is_empty());
        let tls = match var("SOFTCARD_VGPU_CA") {
            None => None,
            Some(path) => Some(crate::tls::ClientTls {
                ca_pem: std::fs::read_to_string(&path)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))?,
                server_name: var("SOFTCARD_VGPU_SERVER_NAME").ok_or_else(|| {
                    std::io::Error::other("SOFTCARD_VGPU_CA needs SOFTCARD_VGPU_SERVER_NAME")
                })?,
            }),
        };
        Ok(Self {
            addr: addr.to_owned(),
            credential: var("SOFTCARD_VGPU_CREDENTIAL"),
            tls,
        })
    }
}

/// Connects to a GPU server (`softcard gpu serve`) and returns a wgpu
/// [`Instance`](wgpu::Instance) whose adapters, devices and every object
/// live there. This is the one line an application changes. Credential
/// and TLS come from the environment ([`Endpoint::from_env`]).
pub fn remote_instance(addr: &str) -> std::io::Result<wgpu::Instance> {
    remote_instance_at(&Endpoint::from_env(addr)?)
}

/// As [`remote_instance`], presenting `credential` (a vGPU attachment's,
/// issued by the region) to the server, over plain TCP.
pub fn remote_instance_with_credential(
    addr: &str,
    credential: Option<&str>,
) -> std::io::Result<wgpu::Instance> {
    remote_instance_at(&Endpoint {
        addr: addr.to_owned(),
        credential: credential.map(str::to_owned),
        tls: None,
    })
}

/// A wgpu instance on the vGPU at `endpoint`.
pub fn remote_instance_at(endpoint: &Endpoint) -> std::io::Result<wgpu::Instance> {
    let conn = Conn::connect(
        endpoint.addr.as_str(),
        endpoint.credential.clone(),
        endpoint.tls.as_ref(),
    )?;
    Ok(wgpu::Instance::from_custom(RInstance { c: conn }))
}

/// A surface on `instance` whose presented frames go to the server's
/// viewer instead of a window.
pub fn remote_surface(instance: &wgpu::Instance) -> wgpu::Surface<'static> {
    assert!(
        instance.as_custom::<RInstance>().is_some(),
        "remote_surface needs an instance from remote_instance"
    );
    // A remote instance turns any surface target into a remote surface; a
    // web canvas handle is the one target that needs no window system.
    let target = wgpu::SurfaceTargetUnsafe::RawHandle {
        raw_display_handle: Some(wgpu::rwh::RawDisplayHandle::Web(
            wgpu::rwh::WebDisplayHandle::new(),
        )),
        raw_window_handle: wgpu::rwh::RawWindowHandle::Web(wgpu::rwh::WebWindowHandle::new(1)),
    };
    // SAFETY: the remote instance never dereferences the handles.
    unsafe { instance.create_surface_unsafe(target) }.expect("remote surfaces always succeed")
}

/// The path of this instance's frames on the server's viewer
/// (`/?s=TOKEN`): the secret token names the session, and only who holds it
/// sees its frames. `None` for a vGPU in a region: its frames are on the
/// region's console, for the tenant who owns it.
pub fn viewer_path(instance: &wgpu::Instance) -> Option<String> {
    let ri = instance.as_custom::<RInstance>()?;
    (!ri.c.viewer_token.is_empty()).then(|| format!("/?s={}", ri.c.viewer_token))
}

/// Round trips to GPU servers this process has made so far (requests that
/// waited for an answer); everything else is pipelined.
pub fn round_trips() -> u64 {
    conn::ROUND_TRIPS.load(Ordering::Relaxed)
}

/// The session's memory use on the server: (bytes used, quota, objects).
pub fn usage(device: &wgpu::Device) -> Option<(u64, u64, u64)> {
    let d = device.as_custom::<RDevice>()?;
    match d.c.call(&Request::Usage, &[]) {
        Ok((
            Reply::Usage {
                used,
                quota,
                objects,
            },
            _,
        )) => Some((used, quota, objects)),
        _ => None,
    }
}

macro_rules! remote_object {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug)]
        pub struct $name {
            c: Arc<Conn>,
            id: Id,
        }
        impl Drop for $name {
            fn drop(&mut self) {
                self.c.send(&Request::Drop { id: self.id }, &[]);
            }
        }
    };
}

remote_object!(
    /// A bind group layout on the server.
    RBindGroupLayout
);
remote_object!(
    /// A bind group on the server.
    RBindGroup
);
remote_object!(
    /// A texture view on the server.
    RView
);
remote_object!(
    /// A sampler on the server.
    RSampler
);
remote_object!(
    /// A pipeline layout on the server.
    RPipelineLayout
);
remote_object!(
    /// A finished command buffer on the server.
    RCommandBuffer
);
remote_object!(
    /// A shader module on the server.
    RShader
);
remote_object!(
    /// A compute pipeline on the server.
    RComputePipeline
);
remote_object!(
    /// A render pipeline on the server.
    RRenderPipeline
);

impl BindGroupLayoutInterface for RBindGroupLayout {}
impl BindGroupInterface for RBindGroup {}
impl TextureViewInterface for RView {}
impl SamplerInterface for RSampler {}
impl PipelineLayoutInterface for RPipelineLayout {}
impl CommandBufferInterface for RCommandBuffer {}

impl ShaderModuleInterface for RShader {
    fn get_compilation_info(&self) -> Pin<Box<dyn ShaderCompilationInfoFuture>> {
        let f = self
            .c
            .call_future(&Request::CompilationInfo { module: self.id }, &[]);
        Box::pin(async move {
            let messages = match f.await {
                Ok((Reply::CompilationInfo(m), _)) => m,
                _ => Vec::new(),
            };
            wgpu::CompilationInfo {
                messages: messages
                    .into_iter()
                    .map(|m| wgpu::CompilationMessage {
                        message: m.message,
                        message_type: if m.error {
                            wgpu::CompilationMessageType::Error
                        } else {
                            wgpu::CompilationMessageType::Warning
                        },
                        location: None,
                    })
                    .collect(),
            }
        })
    }
}

fn pipeline_layout(c: &Arc<Conn>, pipeline: Id, index: u32) -> DispatchBindGroupLayout {
    let id = c.id();
    c.send(
        &Request::PipelineBindGroupLayout {
            pipeline,
            index,
            id,
        },
        &[],
    );
    DispatchBindGroupLayout::custom(RBindGroupLayout { c: c.clone(), id })
}

impl ComputePipelineInterface for RComputePipeline {
    fn get_bind_group_layout(&self, index: u32) -> DispatchBindGroupLayout {
        pipeline_layout(&self.c, self.id, index)
    }
}

impl RenderPipelineInterface for RRenderPipeline {
    fn get_bind_group_layout(&self, index: u32) -> DispatchBindGroupLayout {
        pipeline_layout(&self.c, self.id, index)
    }
}

/// The remote instance: one session with one GPU server.
#[derive(Debug)]
pub struct RInstance {
    c: Arc<Conn>,
}

impl InstanceInterface for RInstance {
    /// wgpu calls this only through `Instance::new`, which never picks a
    /// custom backend; the address comes from `SOFTCARD_GPU` for
    /// completeness.
    fn new(_desc: wgpu::InstanceDescriptor) -> Self {
        let addr = std::env::var("SOFTCARD_GPU").unwrap_or_else(|_| "127.0.0.1:7070".into());
        let c = Endpoint::from_env(&addr)
            .and_then(|e| Conn::connect(addr.as_str(), e.credential, e.tls.as_ref()))
            .unwrap_or_else(|e| panic!("cannot reach the GPU server at {addr}: {e}"));
        Self { c }
    }

    unsafe fn create_surface(
        &self,
        _target: wgpu::SurfaceTargetUnsafe,
    ) -> Result<DispatchSurface, wgpu::CreateSurfaceError> {
        // Every surface of a remote instance is a remote surface: its frames
        // go to the server's viewer, whatever window the target names.
        Ok(DispatchSurface::custom(RSurface {
            c: self.c.clone(),
            state: Mutex::new(None),
        }))
    }

    fn request_adapter(
        &self,
        _options: &wgpu::RequestAdapterOptions<'_, '_>,
    ) -> Pin<Box<dyn RequestAdapterFuture>> {
        let result = match self.c.call(&Request::RequestAdapter, &[]) {
            Ok((Reply::Adapter(Some(desc)), _)) => Ok(DispatchAdapter::custom(RAdapter {
                c: self.c.clone(),
                desc: *desc,
            })),
            _ => Err(wgt::RequestAdapterError::NotFound {
                active_backends: wgt::Backends::empty(),
                requested_backends: wgt::Backends::empty(),
                supported_backends: wgt::Backends::empty(),
                no_fallback_backends: wgt::Backends::empty(),
                no_adapter_backends: wgt::Backends::empty(),
                incompatible_surface_backends: wgt::Backends::empty(),
            }),
        };
        Box::pin(ready(result))
    }

    fn poll_all_devices(&self, force_wait: bool) -> bool {
        if force_wait {
            let _ = self.c.call(&Request::Poll, &[]);
        }
        true
    }

    fn wgsl_language_features(&self) -> wgpu::WgslLanguageFeatures {
        wgpu::WgslLanguageFeatures::empty()
    }

    fn enumerate_adapters(&self, _backends: wgt::Backends) -> Pin<Box<dyn EnumerateAdapterFuture>> {
        let list = match self.c.call(&Request::RequestAdapter, &[]) {
            Ok((Reply::Adapter(Some(desc)), _)) => vec![DispatchAdapter::custom(RAdapter {
                c: self.c.clone(),
                desc: *desc,
            })],
            _ => Vec::new(),
        };
        Box::pin(ready(list))
    }
}

/// The server's physical adapter.
#[derive(Debug)]
pub struct RAdapter {
    c: Arc<Conn>,
    desc: proto::AdapterDesc,
}

impl AdapterInterface for RAdapter {
    fn request_device(
        &self,
        desc: &wgpu::DeviceDescriptor<'_>,
    ) -> Pin<Box<dyn RequestDeviceFuture>> {
        let req = Request::RequestDevice {
            label: desc.label.map(String::from),
            features: desc.required_features,
            limits: desc.required_limits.clone(),
        };
        let result = match self.c.call(&req, &[]) {
            Ok((Reply::Device(Ok(())), _)) => Ok((
                DispatchDevice::custom(RDevice {
                    c: self.c.clone(),
                    features: desc.required_features,
                    limits: desc.required_limits.clone(),
                    info: self.desc.info.clone(),
                    scopes: AtomicU32::new(0),
                }),
                DispatchQueue::custom(RQueue {
                    c: self.c.clone(),
                    submissions: AtomicU64::new(0),
                }),
            )),
            Ok((Reply::Device(Err(e)), _)) => Err(wgpu::RequestDeviceError::from_message(e)),
            Ok((other, _)) => Err(wgpu::RequestDeviceError::from_message(format!(
                "unexpected answer {other:?}"
            ))),
            Err(e) => Err(wgpu::RequestDeviceError::from_message(e)),
        };
        Box::pin(ready(result))
    }

    fn is_surface_supported(&self, surface: &DispatchSurface) -> bool {
        surface.as_custom::<RSurface>().is_some()
    }

    fn features(&self) -> wgt::Features {
        self.desc.features
    }

    fn limits(&self) -> wgt::Limits {
        self.desc.limits.clone()
    }

    fn downlevel_capabilities(&self) -> wgt::DownlevelCapabilities {
        self.desc.downlevel.clone()
    }

    fn get_info(&self) -> wgt::AdapterInfo {
        self.desc.info.clone()
    }

    fn get_texture_format_features(
        &self,
        format: wgt::TextureFormat,
    ) -> wgt::TextureFormatFeatures {
        match self.c.call(&Request::FormatFeatures { format }, &[]) {
            Ok((Reply::FormatFeatures(f), _)) => f,
            _ => wgt::TextureFormatFeatures {
                allowed_usages: wgt::TextureUsages::empty(),
                flags: wgt::TextureFormatFeatureFlags::empty(),
            },
        }
    }

    fn get_presentation_timestamp(&self) -> wgt::PresentationTimestamp {
        wgt::PresentationTimestamp::INVALID_TIMESTAMP
    }

    fn cooperative_matrix_properties(&self) -> Vec<wgt::CooperativeMatrixProperties> {
        Vec::new()
    }
}

/// A vGPU device: the session's device on the server.
#[derive(Debug)]
pub struct RDevice {
    c: Arc<Conn>,
    features: wgt::Features,
    limits: wgt::Limits,
    info: wgt::AdapterInfo,
    scopes: AtomicU32,
}

fn stage(
    module: &wgpu::ShaderModule,
    entry: Option<&str>,
    o: &wgpu::PipelineCompilationOptions<'_>,
) -> proto::Stage {
    proto::Stage {
        module: module.as_custom::<RShader>().expect(FOREIGN).id,
        entry_point: entry.map(String::from),
        constants: o
            .constants
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        zero_initialize_workgroup_memory: o.zero_initialize_workgroup_memory,
    }
}

fn buffer_binding(b: &wgpu::BufferBinding<'_>) -> proto::BufferBinding {
    proto::BufferBinding {
        buffer: b.buffer.as_custom::<RBuffer>().expect(FOREIGN).id,
        offset: b.offset,
        size: b.size,
    }
}

fn view_id(v: &wgpu::TextureView) -> Id {
    v.as_custom::<RView>().expect(FOREIGN).id
}

fn sampler_id(s: &wgpu::Sampler) -> Id {
    s.as_custom::<RSampler>().expect(FOREIGN).id
}

fn texture_copy(t: &wgpu::TexelCopyTextureInfo<'_>) -> proto::TextureCopy {
    proto::TextureCopy {
        texture: t.texture.as_custom::<RTexture>().expect(FOREIGN).id,
        mip_level: t.mip_level,
        origin: t.origin,
        aspect: t.aspect,
    }
}

fn buffer_copy(b: &wgpu::TexelCopyBufferInfo<'_>) -> proto::BufferCopy {
    proto::BufferCopy {
        buffer: b.buffer.as_custom::<RBuffer>().expect(FOREIGN).id,
        layout: b.layout,
    }
}

fn dbuf(b: &DispatchBuffer) -> Id {
    b.as_custom::<RBuffer>().expect(FOREIGN).id
}

impl DeviceInterface for RDevice {
    fn features(&self) -> wgt::Features {
        self.features
    }

    fn limits(&self) -> wgt::Limits {
        self.limits.clone()
    }

    fn adapter_info(&self) -> wgt::AdapterInfo {
        self.info.clone()
    }

    fn create_shader_module(
        &self,
        desc: wgpu::ShaderModuleDescriptor<'_>,
        _checks: wgt::ShaderRuntimeChecks,
    ) -> DispatchShaderModule {
        let wgsl = match desc.source {
            wgpu::ShaderSource::Wgsl(s) => s.into_owned(),
            _ => unsupported("shader sources other than WGSL"),
        };
        let id = self.c.id();
        self.c.send(
            &Request::CreateShaderModule {
                id,
                label: desc.label.map(String::from),
                wgsl,
            },
            &[],
        );
        DispatchShaderModule::custom(RShader {
            c: self.c.clone(),
            id,
        })
    }

    unsafe fn create_shader_module_passthrough(
        &self,
        _desc: &wgpu::ShaderModuleDescriptorPassthrough<'_>,
    ) -> DispatchShaderModule {
        unsupported("passthrough shaders")
    }

    fn create_bind_group_layout(
        &self,
        desc: &wgpu::BindGroupLayoutDescriptor<'_>,
    ) -> DispatchBindGroupLayout {
        let id = self.c.id();
        self.c.send(
            &Request::CreateBindGroupLayout {
                id,
                label: desc.label.map(String::from),
                entries: desc.entries.to_vec(),
            },
            &[],
        );
        DispatchBindGroupLayout::custom(RBindGroupLayout {
            c: self.c.clone(),
            id,
        })
    }

    fn create_bind_group(&self, desc: &wgpu::BindGroupDescriptor<'_>) -> DispatchBindGroup {
        let entries = desc
            .entries
            .iter()
            .map(|e| proto::BindGroupEntry {
                binding: e.binding,
                resource: match &e.resource {
                    wgpu::BindingResource::Buffer(b) => proto::Resource::Buffer(buffer_binding(b)),
                    wgpu::BindingResource::BufferArray(v) => {
                        proto::Resource::BufferArray(v.iter().map(buffer_binding).collect())
                    }
                    wgpu::BindingResource::Sampler(s) => proto::Resource::Sampler(sampler_id(s)),
                    wgpu::BindingResource::SamplerArray(v) => {
                        proto::Resource::SamplerArray(v.iter().map(|s| sampler_id(s)).collect())
                    }
                    wgpu::BindingResource::TextureView(v) => {
                        proto::Resource::TextureView(view_id(v))
                    }
                    wgpu::BindingResource::TextureViewArray(v) => {
                        proto::Resource::TextureViewArray(v.iter().map(|v| view_id(v)).collect())
                    }
                    _ => unsupported("acceleration structures and external textures"),
                },
            })
            .collect();
        let id = self.c.id();
        self.c.send(
            &Request::CreateBindGroup {
                id,
                label: desc.label.map(String::from),
                layout: desc
                    .layout
                    .as_custom::<RBindGroupLayout>()
                    .expect(FOREIGN)
                    .id,
                entries,
            },
            &[],
        );
        DispatchBindGroup::custom(RBindGroup {
            c: self.c.clone(),
            id,
        })
    }

    fn create_pipeline_layout(
        &self,
        desc: &wgpu::PipelineLayoutDescriptor<'_>,
    ) -> DispatchPipelineLayout {
        let id = self.c.id();
        self.c.send(
            &Request::CreatePipelineLayout {
                id,
                label: desc.label.map(String::from),
                bind_group_layouts: desc
                    .bind_group_layouts
                    .iter()
                    .map(|l| l.map(|l| l.as_custom::<RBindGroupLayout>().expect(FOREIGN).id))
                    .collect(),
                immediate_size: desc.immediate_size,
            },
            &[],
        );
        DispatchPipelineLayout::custom(RPipelineLayout {
            c: self.c.clone(),
            id,
        })
    }

    fn create_render_pipeline(
        &self,
        desc: &wgpu::RenderPipelineDescriptor<'_>,
    ) -> DispatchRenderPipeline {
        let id = self.c.id();
        let v = &desc.vertex;
        let d = proto::RenderPipelineDesc {
            label: desc.label.map(String::from),
            layout: desc
                .layout
                .map(|l| l.as_custom::<RPipelineLayout>().expect(FOREIGN).id),
            vertex: stage(v.module, v.entry_point, &v.compilation_options),
            buffers: v
                .buffers
                .iter()
                .map(|b| {
                    b.as_ref().map(|b| proto::VertexBufferLayout {
                        array_stride: b.array_stride,
                        step_mode: b.step_mode,
                        attributes: b.attributes.to_vec(),
                    })
                })
                .collect(),
            primitive: desc.primitive,
            depth_stencil: desc.depth_stencil.clone(),
            multisample: desc.multisample,
            fragment: desc.fragment.as_ref().map(|f| {
                (
                    stage(f.module, f.entry_point, &f.compilation_options),
                    f.targets.to_vec(),
                )
            }),
            multiview_mask: desc.multiview_mask,
        };
        self.c.send(
            &Request::CreateRenderPipeline {
                id,
                desc: Box::new(d),
            },
            &[],
        );
        DispatchRenderPipeline::custom(RRenderPipeline {
            c: self.c.clone(),
            id,
        })
    }

    fn create_mesh_pipeline(
        &self,
        _desc: &wgpu::MeshPipelineDescriptor<'_>,
    ) -> DispatchRenderPipeline {
        unsupported("mesh shaders")
    }

    fn create_compute_pipeline(
        &self,
        desc: &wgpu::ComputePipelineDescriptor<'_>,
    ) -> DispatchComputePipeline {
        let id = self.c.id();
        self.c.send(
            &Request::CreateComputePipeline {
                id,
                label: desc.label.map(String::from),
                layout: desc
                    .layout
                    .map(|l| l.as_custom::<RPipelineLayout>().expect(FOREIGN).id),
                stage: stage(desc.module, desc.entry_point, &desc.compilation_options),
            },
            &[],
        );
        DispatchComputePipeline::custom(RComputePipeline {
            c: self.c.clone(),
            id,
        })
    }

    unsafe fn create_pipeline_cache(
        &self,
        _desc: &wgpu::PipelineCacheDescriptor<'_>,
    ) -> DispatchPipelineCache {
        unsupported("pipeline caches")
    }

    fn create_buffer(&self, desc: &wgpu::BufferDescriptor<'_>) -> DispatchBuffer {
        let id = self.c.id();
        self.c.send(
            &Request::CreateBuffer {
                id,
                desc: desc.map_label(|l| l.map(String::from)),
            },
            &[],
        );
        let map = desc.mapped_at_creation.then(|| Mapping {
            range: 0..desc.size,
            write: true,
            shadow: Arc::new(Shadow::new(vec![
                0;
                usize::try_from(desc.size).unwrap_or(0)
            ])),
        });
        DispatchBuffer::custom(RBuffer {
            c: self.c.clone(),
            id,
            map: Arc::new(Mutex::new(map)),
            spare: Mutex::new(None),
        })
    }

    fn create_texture(&self, desc: &wgpu::TextureDescriptor<'_>) -> DispatchTexture {
        let id = self.c.id();
        self.c.send(
            &Request::CreateTexture {
                id,
                desc: desc.map_label_and_view_formats(|l| l.map(String::from), |v| v.to_vec()),
            },
            &[],
        );
        DispatchTexture::custom(RTexture {
            c: self.c.clone(),
            id,
            owned: true,
        })
    }

    fn create_external_texture(
        &self,
        _desc: &wgpu::ExternalTextureDescriptor<'_>,
        _planes: &[&wgpu::TextureView],
    ) -> DispatchExternalTexture {
        unsupported("external textures")
    }

    fn create_blas(
        &self,
        _desc: &wgpu::CreateBlasDescriptor<'_>,
        _sizes: wgpu::BlasGeometrySizeDescriptors,
    ) -> (Option<u64>, DispatchBlas) {
        unsupported("ray tracing")
    }

    fn create_tlas(&self, _desc: &wgpu::CreateTlasDescriptor<'_>) -> DispatchTlas {
        unsupported("ray tracing")
    }

    fn create_sampler(&self, desc: &wgpu::SamplerDescriptor<'_>) -> DispatchSampler {
        let id = self.c.id();
        self.c.send(
            &Request::CreateSampler {
                id,
                desc: desc.map_label(|l| l.map(String::from)),
            },
            &[],
        );
        DispatchSampler::custom(RSampler {
            c: self.c.clone(),
            id,
        })
    }

    fn create_query_set(&self, _desc: &wgpu::QuerySetDescriptor<'_>) -> DispatchQuerySet {
        unsupported("query sets")
    }

    fn create_command_encoder(
        &self,
        desc: &wgpu::CommandEncoderDescriptor<'_>,
    ) -> DispatchCommandEncoder {
        DispatchCommandEncoder::custom(REncoder {
            c: self.c.clone(),
            label: desc.label.map(String::from),
            cmds: Arc::default(),
        })
    }

    fn create_render_bundle_encoder(
        &self,
        _desc: &wgpu::RenderBundleEncoderDescriptor<'_>,
    ) -> DispatchRenderBundleEncoder {
        unsupported("render bundles")
    }

    fn set_device_lost_callback(&self, cb: BoxDeviceLostCallback) {
        match self.c.lost() {
            Some(why) => cb(wgpu::DeviceLostReason::Unknown, why),
            None => *self.c.shared.on_lost.lock().expect("on_lost") = Some(cb),
        }
    }

    fn on_uncaptured_error(&self, handler: Arc<dyn wgpu::UncapturedErrorHandler>) {
        *self.c.shared.on_error.lock().expect("on_error") = Some(handler);
    }

    fn push_error_scope(&self, filter: wgpu::ErrorFilter) -> u32 {
        let filter = match filter {
            wgpu::ErrorFilter::Validation => proto::ErrorFilter::Validation,
            wgpu::ErrorFilter::OutOfMemory => proto::ErrorFilter::OutOfMemory,
            wgpu::ErrorFilter::Internal => proto::ErrorFilter::Internal,
        };
        self.c.send(&Request::PushErrorScope { filter }, &[]);
        self.scopes.fetch_add(1, Ordering::Relaxed)
    }

    fn pop_error_scope(&self, _index: u32) -> Pin<Box<dyn PopErrorScopeFuture>> {
        self.scopes.fetch_sub(1, Ordering::Relaxed);
        let f = self.c.call_future(&Request::PopErrorScope, &[]);
        Box::pin(async move {
            match f.await {
                Ok((Reply::ErrorScope(e), _)) => e.map(conn::to_wgpu_error),
                Ok(_) => None,
                Err(why) => Some(conn::to_wgpu_error(proto::GpuError {
                    kind: proto::ErrorFilter::Internal,
                    description: why,
                })),
            }
        })
    }

    unsafe fn start_graphics_debugger_capture(&self) {}

    unsafe fn stop_graphics_debugger_capture(&self) {}

    fn poll(&self, poll_type: wgt::PollType<u64>) -> Result<wgpu::PollStatus, wgpu::PollError> {
        match poll_type {
            wgt::PollType::Poll => {
                self.c.flush();
                Ok(wgpu::PollStatus::Poll)
            }
            wgt::PollType::Wait { .. } => {
                // A readback's own answer already proves the queue idle;
                // only otherwise does the wait cost a round trip.
                let r = if self.c.wait_if_last_answered() {
                    Ok(())
                } else {
                    self.c.call(&Request::Poll, &[]).map(|_| ())
                };
                match (r, self.c.lost()) {
                    (Ok(()), None) => Ok(wgpu::PollStatus::QueueEmpty),
                    _ => Err(wgpu::PollError::Timeout),
                }
            }
        }
    }

    fn get_internal_counters(&self) -> wgt::InternalCounters {
        wgt::InternalCounters::default()
    }

    fn generate_allocator_report(&self) -> Option<wgt::AllocatorReport> {
        None
    }

    fn destroy(&self) {
        self.c.flush();
        if let Some(cb) = self.c.shared.on_lost.lock().expect("on_lost").take() {
            cb(wgpu::DeviceLostReason::Destroyed, "device destroyed".into());
        }
    }
}

/// The session's queue.
#[derive(Debug)]
pub struct RQueue {
    c: Arc<Conn>,
    submissions: AtomicU64,
}

/// A staging buffer for `Queue::write_buffer_with`, sent at write time.
#[derive(Debug)]
pub struct RStaging {
    data: Vec<u8>,
}

impl QueueWriteBufferInterface for RStaging {
    fn len(&self) -> usize {
        self.data.len()
    }

    unsafe fn write_slice(&mut self) -> wgpu::WriteOnly<'_, [u8]> {
        wgpu::WriteOnly::from_mut(&mut self.data[..])
    }
}

impl QueueInterface for RQueue {
    fn write_buffer(&self, buffer: &DispatchBuffer, offset: wgt::BufferAddress, data: &[u8]) {
        self.c.send(
            &Request::WriteBuffer {
                buffer: dbuf(buffer),
                offset,
            },
            data,
        );
    }

    fn create_staging_buffer(&self, size: wgt::BufferSize) -> Option<DispatchQueueWriteBuffer> {
        let len = usize::try_from(size.get()).ok()?;
        Some(DispatchQueueWriteBuffer::custom(RStaging {
            data: vec![0; len],
        }))
    }

    fn validate_write_buffer(
        &self,
        _buffer: &DispatchBuffer,
        _offset: wgt::BufferAddress,
        _size: wgt::BufferSize,
    ) -> Option<()> {
        // The server validates the write when it arrives.
        Some(())
    }

    fn write_staging_buffer(
        &self,
        buffer: &DispatchBuffer,
        offset: wgt::BufferAddress,
        staging: &DispatchQueueWriteBuffer,
    ) {
        let s = staging.as_custom::<RStaging>().expect(FOREIGN);
        self.write_buffer(buffer, offset, &s.data);
    }

    fn write_texture(
        &self,
        texture: wgpu::TexelCopyTextureInfo<'_>,
        data: &[u8],
        layout: wgt::TexelCopyBufferLayout,
        size: wgt::Extent3d,
    ) {
        self.c.send(
            &Request::WriteTexture {
                texture: texture_copy(&texture),
                layout,
                size,
            },
            data,
        );
    }

    fn submit(&self, command_buffers: &mut dyn Iterator<Item = DispatchCommandBuffer>) -> u64 {
        // The handles live until the submit is sent: dropping one sends a
        // Drop that must follow the Submit.
        let held: Vec<DispatchCommandBuffer> = command_buffers.collect();
        let ids: Vec<Id> = held
            .iter()
            .map(|cb| cb.as_custom::<RCommandBuffer>().expect(FOREIGN).id)
            .collect();
        self.c.send(
            &Request::Submit {
                command_buffers: ids,
            },
            &[],
        );
        drop(held);
        self.c.flush();
        self.submissions.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn get_timestamp_period(&self) -> f32 {
        1.0
    }

    fn on_submitted_work_done(&self, callback: BoxSubmittedWorkDoneCallback) {
        self.c.call_async(&Request::Poll, &[], move |_| callback());
    }

    fn compact_blas(&self, _blas: &DispatchBlas) -> (Option<u64>, DispatchBlas) {
        unsupported("ray tracing")
    }

    fn present(&self, detail: &DispatchSurfaceOutputDetail) {
        let d = detail.as_custom::<RSurfaceOutput>().expect(FOREIGN);
        self.c.send(&Request::Present { texture: d.texture }, &[]);
        self.c.flush();
    }
}
