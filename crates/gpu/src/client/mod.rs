//! The vGPU client: a wgpu custom backend whose objects live on a remote
//! GPU server.
//!
//! Object ids are chosen here, so every creation call is one buffered
//! message and the application never waits for it. Command encoders record
//! locally and travel as one message at `finish()`. Only these wait for the
//! server: `request_adapter`/`request_device`, `map_async` (one round trip,
//! the bytes come with the answer), `pop_error_scope`, `poll(Wait)`,
//! `on_submitted_work_done` and shader compilation info.

mod conn;

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

/// Connects to a GPU server (`softcard gpu serve`) and returns a wgpu
/// [`Instance`](wgpu::Instance) whose adapters, devices and every object
/// live there. This is the one line an application changes. The
/// credential a region's GPU server asks for is taken from
/// `SOFTCARD_VGPU_CREDENTIAL` when set.
pub fn remote_instance(addr: &str) -> std::io::Result<wgpu::Instance> {
    let credential = std::env::var("SOFTCARD_VGPU_CREDENTIAL")
        .ok()
        .filter(|c| !c.is_empty());
    remote_instance_with_credential(addr, credential.as_deref())
}

/// As [`remote_instance`], presenting `credential` (a vGPU attachment's,
/// issued by the region) to the server.
pub fn remote_instance_with_credential(
    addr: &str,
    credential: Option<&str>,
) -> std::io::Result<wgpu::Instance> {
    let conn = Conn::connect(addr, credential.map(str::to_owned))?;
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
/// sees its frames.
pub fn viewer_path(instance: &wgpu::Instance) -> Option<String> {
    let ri = instance.as_custom::<RInstance>()?;
    Some(format!("/?s={}", ri.c.viewer_token))
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
        let credential = std::env::var("SOFTCARD_VGPU_CREDENTIAL")
            .ok()
            .filter(|c| !c.is_empty());
        let c = Conn::connect(addr.as_str(), credential)
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

/// Bytes of a mapping, shared by the buffer and the views into it. The
/// bytes are owned through a raw pointer (from `Box::into_raw`) so that views
/// can write through it without aliasing a live `Box`.
struct Shadow {
    ptr: NonNull<[u8]>,
}

// SAFETY: wgpu hands out views of a mapping only for non-overlapping
// ranges (its frontend tracks them), so no two threads touch the same byte
// through them; the buffer reads the whole shadow only in `unmap`, after the
// application has given its views back.
unsafe impl Sync for Shadow {}
// SAFETY: the shadow owns its bytes; see above for shared use.
unsafe impl Send for Shadow {}

impl Shadow {
    fn new(v: Vec<u8>) -> Self {
        let raw = Box::into_raw(v.into_boxed_slice());
        Self {
            ptr: NonNull::new(raw).expect("Box::into_raw is never null"),
        }
    }
    /// The bytes back as a box, for reuse by the next mapping.
    fn into_box(self) -> Box<[u8]> {
        let ptr = self.ptr.as_ptr();
        std::mem::forget(self);
        // SAFETY: the pointer came from `Box::into_raw`; `forget` keeps
        // `Drop` from freeing it, so ownership passes to the new box once.
        unsafe { Box::from_raw(ptr) }
    }
    fn base(&self) -> NonNull<u8> {
        self.ptr.cast()
    }
    fn len(&self) -> usize {
        self.ptr.len()
    }
    /// # Safety
    /// No view may be writing the bytes while the slice lives.
    unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: the pointer came from a live box of `len` bytes; the caller
        // rules out concurrent writers.
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `Box::into_raw` and is freed once.
        drop(unsafe { Box::from_raw(self.ptr.as_ptr()) });
    }
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shadow({} bytes)", self.len())
    }
}

#[derive(Debug)]
struct Mapping {
    range: Range<u64>,
    write: bool,
    shadow: Arc<Shadow>,
}

/// A buffer on the server, with the local copy of its mapped range.
#[derive(Debug)]
pub struct RBuffer {
    c: Arc<Conn>,
    id: Id,
    map: Arc<Mutex<Option<Mapping>>>,
    /// The bytes of the last read mapping, for the next one to land in.
    spare: Mutex<Option<Box<[u8]>>>,
}

impl Drop for RBuffer {
    fn drop(&mut self) {
        self.c.send(&Request::Drop { id: self.id }, &[]);
    }
}

/// A view into a mapping.
#[derive(Debug)]
pub struct RMapped {
    shadow: Arc<Shadow>,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the pointer is into `shadow`, which the view keeps alive; see
// `Shadow` for why concurrent views do not overlap.
unsafe impl Send for RMapped {}
// SAFETY: as above.
unsafe impl Sync for RMapped {}

impl BufferMappedRangeInterface for RMapped {
    fn len(&self) -> usize {
        self.len
    }

    unsafe fn read_slice(&self) -> &[u8] {
        let _ = &self.shadow;
        // SAFETY: ptr..ptr+len lies inside the shadow (checked when the view
        // was made) and the shadow outlives `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    unsafe fn write_slice(&mut self) -> wgpu::WriteOnly<'_, [u8]> {
        // SAFETY: as in `read_slice`; the caller guarantees a write mapping.
        unsafe { wgpu::WriteOnly::new(NonNull::slice_from_raw_parts(self.ptr, self.len)) }
    }
}

impl BufferInterface for RBuffer {
    fn map_async(
        &self,
        mode: wgpu::MapMode,
        range: Range<wgt::BufferAddress>,
        callback: BufferMapCallback,
    ) {
        let write = matches!(mode, wgpu::MapMode::Write);
        let slot = self.map.clone();
        let want = range.clone();
        let into = self.spare.lock().expect("spare").take();
        self.c.call_async_into(
            &Request::MapAsync {
                buffer: self.id,
                write,
                range,
            },
            &[],
            into,
            move |answer| match answer {
                Ok((Reply::Mapped(Ok(())), data)) if data.len() as u64 == want.end - want.start => {
                    *slot.lock().expect("map") = Some(Mapping {
                        range: want,
                        write,
                        shadow: Arc::new(Shadow::new(data)),
                    });
                    callback(Ok(()));
                }
                Ok((Reply::Mapped(Err(e)), _)) => {
                    log::warn!("vGPU map failed: {e}");
                    callback(Err(wgpu::BufferAsyncError));
                }
                _ => callback(Err(wgpu::BufferAsyncError)),
            },
        );
    }

    fn get_mapped_range(
        &self,
        sub_range: Range<wgt::BufferAddress>,
    ) -> Result<DispatchBufferMappedRange, wgpu::MapRangeError> {
        let map = self.map.lock().expect("map");
        let Some(m) = map.as_ref() else {
            panic!("get_mapped_range on a vGPU buffer that is not mapped");
        };
        if sub_range.start < m.range.start
            || sub_range.end > m.range.end
            || sub_range.start > sub_range.end
        {
            panic!(
                "get_mapped_range {sub_range:?} outside the mapped range {:?}",
                m.range
            );
        }
        let off = usize::try_from(sub_range.start - m.range.start).expect("mapped offset");
        let len = usize::try_from(sub_range.end - sub_range.start).expect("mapped length");
        // SAFETY: off + len <= shadow length, checked above.
        let ptr = unsafe { m.shadow.base().add(off) };
        Ok(DispatchBufferMappedRange::custom(RMapped {
            shadow: m.shadow.clone(),
            ptr,
            len,
        }))
    }

    fn unmap(&self) {
        let Some(m) = self.map.lock().expect("map").take() else {
            return;
        };
        if m.write {
            // SAFETY: the application has dropped its views before
            // unmapping (wgpu requires it), so nothing writes the shadow now.
            let data: &[u8] = unsafe { m.shadow.bytes() };
            self.c.send(
                &Request::Unmap {
                    buffer: self.id,
                    range: m.range.clone(),
                },
                data,
            );
        } else {
            self.c.send(
                &Request::Unmap {
                    buffer: self.id,
                    range: m.range.clone(),
                },
                &[],
            );
            // With no view left, the bytes serve the next readback.
            if let Ok(shadow) = Arc::try_unwrap(m.shadow) {
                *self.spare.lock().expect("spare") = Some(shadow.into_box());
            }
        }
    }

    fn destroy(&self) {
        self.c.send(&Request::Destroy { id: self.id }, &[]);
    }
}

/// A texture on the server.
#[derive(Debug)]
pub struct RTexture {
    c: Arc<Conn>,
    id: Id,
    /// False for a surface's texture, which the surface owns.
    owned: bool,
}

impl Drop for RTexture {
    fn drop(&mut self) {
        if self.owned {
            self.c.send(&Request::Drop { id: self.id }, &[]);
        }
    }
}

impl TextureInterface for RTexture {
    fn create_view(&self, desc: &wgpu::TextureViewDescriptor<'_>) -> DispatchTextureView {
        let id = self.c.id();
        self.c.send(
            &Request::CreateView {
                id,
                texture: self.id,
                desc: desc.map_label(|l| l.map(String::from)),
            },
            &[],
        );
        DispatchTextureView::custom(RView {
            c: self.c.clone(),
            id,
        })
    }

    fn destroy(&self) {
        if self.owned {
            self.c.send(&Request::Destroy { id: self.id }, &[]);
        }
    }
}

/// A command encoder: commands are recorded here and sent at `finish`.
#[derive(Debug)]
pub struct REncoder {
    c: Arc<Conn>,
    label: Option<String>,
    cmds: Arc<Mutex<Vec<Command>>>,
}

impl REncoder {
    fn push(&self, c: Command) {
        self.cmds.lock().expect("commands").push(c);
    }
}

impl CommandEncoderInterface for REncoder {
    fn copy_buffer_to_buffer(
        &self,
        source: &DispatchBuffer,
        source_offset: wgt::BufferAddress,
        destination: &DispatchBuffer,
        destination_offset: wgt::BufferAddress,
        copy_size: Option<wgt::BufferAddress>,
    ) {
        self.push(Command::CopyBufferToBuffer {
            src: dbuf(source),
            src_offset: source_offset,
            dst: dbuf(destination),
            dst_offset: destination_offset,
            size: copy_size,
        });
    }

    fn copy_buffer_to_texture(
        &self,
        source: wgpu::TexelCopyBufferInfo<'_>,
        destination: wgpu::TexelCopyTextureInfo<'_>,
        copy_size: wgt::Extent3d,
    ) {
        self.push(Command::CopyBufferToTexture {
            src: buffer_copy(&source),
            dst: texture_copy(&destination),
            size: copy_size,
        });
    }

    fn copy_texture_to_buffer(
        &self,
        source: wgpu::TexelCopyTextureInfo<'_>,
        destination: wgpu::TexelCopyBufferInfo<'_>,
        copy_size: wgt::Extent3d,
    ) {
        self.push(Command::CopyTextureToBuffer {
            src: texture_copy(&source),
            dst: buffer_copy(&destination),
            size: copy_size,
        });
    }

    fn copy_texture_to_texture(
        &self,
        source: wgpu::TexelCopyTextureInfo<'_>,
        destination: wgpu::TexelCopyTextureInfo<'_>,
        copy_size: wgt::Extent3d,
    ) {
        self.push(Command::CopyTextureToTexture {
            src: texture_copy(&source),
            dst: texture_copy(&destination),
            size: copy_size,
        });
    }

    fn begin_compute_pass(&self, desc: &wgpu::ComputePassDescriptor<'_>) -> DispatchComputePass {
        if desc.timestamp_writes.is_some() {
            unsupported("timestamp queries");
        }
        self.push(Command::BeginComputePass {
            label: desc.label.map(String::from),
        });
        DispatchComputePass::custom(RComputePass {
            cmds: self.cmds.clone(),
        })
    }

    fn begin_render_pass(&self, desc: &wgpu::RenderPassDescriptor<'_>) -> DispatchRenderPass {
        if desc.timestamp_writes.is_some() || desc.occlusion_query_set.is_some() {
            unsupported("query sets");
        }
        let color = desc
            .color_attachments
            .iter()
            .map(|a| {
                a.as_ref().map(|a| proto::ColorAttachment {
                    view: view_id(a.view),
                    depth_slice: a.depth_slice,
                    resolve_target: a.resolve_target.map(view_id),
                    load: load(a.ops.load),
                    store: matches!(a.ops.store, wgpu::StoreOp::Store),
                })
            })
            .collect();
        let depth = desc
            .depth_stencil_attachment
            .as_ref()
            .map(|d| proto::DepthAttachment {
                view: view_id(d.view),
                depth: d.depth_ops.map(|o| proto::Ops {
                    load: load(o.load),
                    store: matches!(o.store, wgpu::StoreOp::Store),
                }),
                stencil: d.stencil_ops.map(|o| proto::Ops {
                    load: load(o.load),
                    store: matches!(o.store, wgpu::StoreOp::Store),
                }),
            });
        self.push(Command::BeginRenderPass {
            label: desc.label.map(String::from),
            color,
            depth,
            multiview_mask: desc.multiview_mask,
        });
        DispatchRenderPass::custom(RRenderPass {
            cmds: self.cmds.clone(),
        })
    }

    fn finish(&mut self) -> DispatchCommandBuffer {
        let id = self.c.id();
        let commands = std::mem::take(&mut *self.cmds.lock().expect("commands"));
        self.c.send(
            &Request::CommandBuffer {
                id,
                label: self.label.clone(),
                commands,
            },
            &[],
        );
        DispatchCommandBuffer::custom(RCommandBuffer {
            c: self.c.clone(),
            id,
        })
    }

    fn clear_texture(&self, texture: &DispatchTexture, range: &wgt::ImageSubresourceRange) {
        self.push(Command::ClearTexture {
            texture: texture.as_custom::<RTexture>().expect(FOREIGN).id,
            range: *range,
        });
    }

    fn clear_buffer(
        &self,
        buffer: &DispatchBuffer,
        offset: wgt::BufferAddress,
        size: Option<wgt::BufferAddress>,
    ) {
        self.push(Command::ClearBuffer {
            buffer: dbuf(buffer),
            offset,
            size,
        });
    }

    fn insert_debug_marker(&self, label: &str) {
        self.push(Command::InsertDebugMarker(label.into()));
    }

    fn push_debug_group(&self, label: &str) {
        self.push(Command::PushDebugGroup(label.into()));
    }

    fn pop_debug_group(&self) {
        self.push(Command::PopDebugGroup);
    }

    fn write_timestamp(&self, _query_set: &DispatchQuerySet, _query_index: u32) {
        unsupported("timestamp queries")
    }

    fn resolve_query_set(
        &self,
        _query_set: &DispatchQuerySet,
        _first_query: u32,
        _query_count: u32,
        _destination: &DispatchBuffer,
        _destination_offset: wgt::BufferAddress,
    ) {
        unsupported("query sets")
    }

    fn mark_acceleration_structures_built<'a>(
        &self,
        _blas: &mut dyn Iterator<Item = &'a wgpu::Blas>,
        _tlas: &mut dyn Iterator<Item = &'a wgpu::Tlas>,
    ) {
        unsupported("ray tracing")
    }

    fn build_acceleration_structures<'a>(
        &self,
        _blas: &mut dyn Iterator<Item = &'a wgpu::BlasBuildEntry<'a>>,
        _tlas: &mut dyn Iterator<Item = &'a wgpu::Tlas>,
    ) {
        unsupported("ray tracing")
    }

    fn transition_resources<'a>(
        &mut self,
        _buffers: &mut dyn Iterator<Item = wgt::BufferTransition<&'a DispatchBuffer>>,
        _textures: &mut dyn Iterator<Item = wgt::TextureTransition<&'a DispatchTexture>>,
    ) {
        // Transitions are hints; the server's wgpu places its own barriers.
    }
}

fn load<V: Copy>(l: wgpu::LoadOp<V>) -> proto::LoadOp<V> {
    match l {
        wgpu::LoadOp::Clear(v) => proto::LoadOp::Clear(v),
        _ => proto::LoadOp::Load,
    }
}

/// An open compute pass; commands go straight into the encoder's list.
#[derive(Debug)]
pub struct RComputePass {
    cmds: Arc<Mutex<Vec<Command>>>,
}

impl RComputePass {
    fn push(&self, c: Command) {
        self.cmds.lock().expect("commands").push(c);
    }
}

impl Drop for RComputePass {
    fn drop(&mut self) {
        self.push(Command::EndPass);
    }
}

fn bind_group_cmd(index: u32, group: Option<&DispatchBindGroup>, offsets: &[u32]) -> Command {
    Command::SetBindGroup {
        index,
        group: group.map(|g| g.as_custom::<RBindGroup>().expect(FOREIGN).id),
        offsets: offsets.to_vec(),
    }
}

impl ComputePassInterface for RComputePass {
    fn set_pipeline(&mut self, pipeline: &DispatchComputePipeline) {
        self.push(Command::SetComputePipeline(
            pipeline.as_custom::<RComputePipeline>().expect(FOREIGN).id,
        ));
    }

    fn set_bind_group(&mut self, index: u32, group: Option<&DispatchBindGroup>, offsets: &[u32]) {
        self.push(bind_group_cmd(index, group, offsets));
    }

    fn set_immediates(&mut self, offset: u32, data: &[u8]) {
        self.push(Command::SetImmediates {
            offset,
            data: data.to_vec(),
        });
    }

    fn insert_debug_marker(&mut self, label: &str) {
        self.push(Command::InsertDebugMarker(label.into()));
    }

    fn push_debug_group(&mut self, label: &str) {
        self.push(Command::PushDebugGroup(label.into()));
    }

    fn pop_debug_group(&mut self) {
        self.push(Command::PopDebugGroup);
    }

    fn write_timestamp(&mut self, _query_set: &DispatchQuerySet, _query_index: u32) {
        unsupported("timestamp queries")
    }

    fn begin_pipeline_statistics_query(
        &mut self,
        _query_set: &DispatchQuerySet,
        _query_index: u32,
    ) {
        unsupported("pipeline statistics queries")
    }

    fn end_pipeline_statistics_query(&mut self) {
        unsupported("pipeline statistics queries")
    }

    fn dispatch_workgroups(&mut self, x: u32, y: u32, z: u32) {
        self.push(Command::Dispatch([x, y, z]));
    }

    fn dispatch_workgroups_indirect(
        &mut self,
        buffer: &DispatchBuffer,
        offset: wgt::BufferAddress,
    ) {
        self.push(Command::DispatchIndirect {
            buffer: dbuf(buffer),
            offset,
        });
    }

    fn transition_resources<'a>(
        &mut self,
        _buffers: &mut dyn Iterator<Item = wgt::BufferTransition<&'a DispatchBuffer>>,
        _textures: &mut dyn Iterator<Item = wgt::TextureTransition<&'a DispatchTextureView>>,
    ) {
        // Hints only, as on the encoder.
    }
}

/// An open render pass.
#[derive(Debug)]
pub struct RRenderPass {
    cmds: Arc<Mutex<Vec<Command>>>,
}

impl RRenderPass {
    fn push(&self, c: Command) {
        self.cmds.lock().expect("commands").push(c);
    }
}

impl Drop for RRenderPass {
    fn drop(&mut self) {
        self.push(Command::EndPass);
    }
}

impl RenderPassInterface for RRenderPass {
    fn set_pipeline(&mut self, pipeline: &DispatchRenderPipeline) {
        self.push(Command::SetRenderPipeline(
            pipeline.as_custom::<RRenderPipeline>().expect(FOREIGN).id,
        ));
    }

    fn set_bind_group(&mut self, index: u32, group: Option<&DispatchBindGroup>, offsets: &[u32]) {
        self.push(bind_group_cmd(index, group, offsets));
    }

    fn set_index_buffer(
        &mut self,
        buffer: &DispatchBuffer,
        format: wgt::IndexFormat,
        offset: wgt::BufferAddress,
        size: Option<wgt::BufferSize>,
    ) {
        self.push(Command::SetIndexBuffer {
            buffer: dbuf(buffer),
            format,
            offset,
            size,
        });
    }

    fn set_vertex_buffer(
        &mut self,
        slot: u32,
        buffer: Option<&DispatchBuffer>,
        offset: wgt::BufferAddress,
        size: Option<wgt::BufferSize>,
    ) {
        self.push(Command::SetVertexBuffer {
            slot,
            buffer: buffer.map(dbuf),
            offset,
            size,
        });
    }

    fn set_immediates(&mut self, offset: u32, data: &[u8]) {
        self.push(Command::SetImmediates {
            offset,
            data: data.to_vec(),
        });
    }

    fn set_blend_constant(&mut self, color: wgt::Color) {
        self.push(Command::SetBlendConstant(color));
    }

    fn set_scissor_rect(&mut self, x: u32, y: u32, width: u32, height: u32) {
        self.push(Command::SetScissorRect([x, y, width, height]));
    }

    fn set_viewport(
        &mut self,
        x: f32,
        y: f32,
        width: f32,
        height: f32,
        min_depth: f32,
        max_depth: f32,
    ) {
        self.push(Command::SetViewport([
            x, y, width, height, min_depth, max_depth,
        ]));
    }

    fn set_stencil_reference(&mut self, reference: u32) {
        self.push(Command::SetStencilReference(reference));
    }

    fn draw(&mut self, vertices: Range<u32>, instances: Range<u32>) {
        self.push(Command::Draw {
            vertices,
            instances,
        });
    }

    fn draw_indexed(&mut self, indices: Range<u32>, base_vertex: i32, instances: Range<u32>) {
        self.push(Command::DrawIndexed {
            indices,
            base_vertex,
            instances,
        });
    }

    fn draw_mesh_tasks(&mut self, _x: u32, _y: u32, _z: u32) {
        unsupported("mesh shaders")
    }

    fn draw_indirect(&mut self, buffer: &DispatchBuffer, offset: wgt::BufferAddress) {
        self.push(Command::DrawIndirect {
            buffer: dbuf(buffer),
            offset,
        });
    }

    fn draw_indexed_indirect(&mut self, buffer: &DispatchBuffer, offset: wgt::BufferAddress) {
        self.push(Command::DrawIndexedIndirect {
            buffer: dbuf(buffer),
            offset,
        });
    }

    fn draw_mesh_tasks_indirect(&mut self, _buffer: &DispatchBuffer, _offset: wgt::BufferAddress) {
        unsupported("mesh shaders")
    }

    fn multi_draw_indirect(
        &mut self,
        buffer: &DispatchBuffer,
        offset: wgt::BufferAddress,
        count: u32,
    ) {
        self.push(Command::MultiDrawIndirect {
            buffer: dbuf(buffer),
            offset,
            count,
        });
    }

    fn multi_draw_indexed_indirect(
        &mut self,
        buffer: &DispatchBuffer,
        offset: wgt::BufferAddress,
        count: u32,
    ) {
        self.push(Command::MultiDrawIndexedIndirect {
            buffer: dbuf(buffer),
            offset,
            count,
        });
    }

    fn multi_draw_indirect_count(
        &mut self,
        _buffer: &DispatchBuffer,
        _offset: wgt::BufferAddress,
        _count_buffer: &DispatchBuffer,
        _count_offset: wgt::BufferAddress,
        _max_count: u32,
    ) {
        unsupported("indirect draw counts")
    }

    fn multi_draw_mesh_tasks_indirect(
        &mut self,
        _buffer: &DispatchBuffer,
        _offset: wgt::BufferAddress,
        _count: u32,
    ) {
        unsupported("mesh shaders")
    }

    fn multi_draw_indexed_indirect_count(
        &mut self,
        _buffer: &DispatchBuffer,
        _offset: wgt::BufferAddress,
        _count_buffer: &DispatchBuffer,
        _count_offset: wgt::BufferAddress,
        _max_count: u32,
    ) {
        unsupported("indirect draw counts")
    }

    fn multi_draw_mesh_tasks_indirect_count(
        &mut self,
        _buffer: &DispatchBuffer,
        _offset: wgt::BufferAddress,
        _count_buffer: &DispatchBuffer,
        _count_offset: wgt::BufferAddress,
        _max_count: u32,
    ) {
        unsupported("mesh shaders")
    }

    fn insert_debug_marker(&mut self, label: &str) {
        self.push(Command::InsertDebugMarker(label.into()));
    }

    fn push_debug_group(&mut self, label: &str) {
        self.push(Command::PushDebugGroup(label.into()));
    }

    fn pop_debug_group(&mut self) {
        self.push(Command::PopDebugGroup);
    }

    fn write_timestamp(&mut self, _query_set: &DispatchQuerySet, _query_index: u32) {
        unsupported("timestamp queries")
    }

    fn begin_occlusion_query(&mut self, _query_index: u32) {
        unsupported("occlusion queries")
    }

    fn end_occlusion_query(&mut self) {
        unsupported("occlusion queries")
    }

    fn begin_pipeline_statistics_query(
        &mut self,
        _query_set: &DispatchQuerySet,
        _query_index: u32,
    ) {
        unsupported("pipeline statistics queries")
    }

    fn end_pipeline_statistics_query(&mut self) {
        unsupported("pipeline statistics queries")
    }

    fn execute_bundles(&mut self, _bundles: &mut dyn Iterator<Item = &DispatchRenderBundle>) {
        unsupported("render bundles")
    }
}

/// The configuration and frame texture of a remote surface.
#[derive(Debug)]
struct SurfaceState {
    texture: Id,
}

/// A surface whose frames go to the server's viewer.
#[derive(Debug)]
pub struct RSurface {
    c: Arc<Conn>,
    state: Mutex<Option<SurfaceState>>,
}

impl Drop for RSurface {
    fn drop(&mut self) {
        if let Some(s) = self.state.lock().expect("surface").take() {
            self.c.send(&Request::Drop { id: s.texture }, &[]);
        }
    }
}

const SURFACE_FORMATS: [wgt::TextureFormat; 4] = [
    wgt::TextureFormat::Rgba8Unorm,
    wgt::TextureFormat::Rgba8UnormSrgb,
    wgt::TextureFormat::Bgra8Unorm,
    wgt::TextureFormat::Bgra8UnormSrgb,
];

impl SurfaceInterface for RSurface {
    fn get_capabilities(&self, _adapter: &DispatchAdapter) -> wgt::SurfaceCapabilities {
        wgt::SurfaceCapabilities {
            formats: SURFACE_FORMATS.to_vec(),
            present_modes: vec![wgt::PresentMode::Fifo],
            alpha_modes: vec![wgt::CompositeAlphaMode::Opaque],
            usages: wgt::TextureUsages::RENDER_ATTACHMENT
                | wgt::TextureUsages::COPY_SRC
                | wgt::TextureUsages::COPY_DST,
            ..Default::default()
        }
    }

    fn configure(&self, _device: &DispatchDevice, config: &wgpu::SurfaceConfiguration) {
        if !SURFACE_FORMATS.contains(&config.format) {
            unsupported("surface formats other than 8-bit RGBA or BGRA");
        }
        let id = self.c.id();
        self.c.send(
            &Request::CreateTexture {
                id,
                desc: wgt::TextureDescriptor {
                    label: Some("remote surface".into()),
                    size: wgt::Extent3d {
                        width: config.width,
                        height: config.height,
                        depth_or_array_layers: 1,
                    },
                    mip_level_count: 1,
                    sample_count: 1,
                    dimension: wgt::TextureDimension::D2,
                    format: config.format,
                    usage: config.usage | wgt::TextureUsages::COPY_SRC,
                    view_formats: config.view_formats.clone(),
                },
            },
            &[],
        );
        let old = self
            .state
            .lock()
            .expect("surface")
            .replace(SurfaceState { texture: id });
        if let Some(old) = old {
            self.c.send(&Request::Drop { id: old.texture }, &[]);
        }
    }

    fn get_current_texture(
        &self,
    ) -> (
        Option<DispatchTexture>,
        wgt::SurfaceStatus,
        DispatchSurfaceOutputDetail,
    ) {
        let texture = self
            .state
            .lock()
            .expect("surface")
            .as_ref()
            .map(|s| s.texture)
            .expect("remote surface used before configure()");
        (
            Some(DispatchTexture::custom(RTexture {
                c: self.c.clone(),
                id: texture,
                owned: false,
            })),
            wgt::SurfaceStatus::Good,
            DispatchSurfaceOutputDetail::custom(RSurfaceOutput { texture }),
        )
    }
}

/// The frame handed out by `get_current_texture`.
#[derive(Debug)]
pub struct RSurfaceOutput {
    texture: Id,
}

impl SurfaceOutputDetailInterface for RSurfaceOutput {
    fn texture_discard(&self) {}
    fn texture_release(&self) {}
}
