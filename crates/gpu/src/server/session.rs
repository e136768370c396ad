//! One client's vGPU session.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use wgpu::wgt;

use super::objects::{bad_id, validation, Obj, Objects};
use super::GpuServer;
use crate::proto::{
    self, BindGroupEntry, ErrorFilter, GpuError, Id, Message, Reply, Request, Resource,
    ShaderMessage, Stage,
};

/// A session's memory use, for the operator.
#[derive(Debug, Clone)]
pub struct SessionStats {
    pub session: u64,
    pub used: u64,
    pub quota: u64,
    pub objects: u64,
}

/// The live sessions' figures.
#[derive(Debug, Default)]
pub(super) struct Registry(Mutex<HashMap<u64, SessionStats>>);

impl Registry {
    fn update(&self, s: SessionStats) {
        self.0.lock().expect("registry").insert(s.session, s);
    }
    pub(super) fn remove(&self, id: u64) {
        self.0.lock().expect("registry").remove(&id);
    }
    pub(super) fn snapshot(&self) -> Vec<SessionStats> {
        let mut v: Vec<_> = self.0.lock().expect("registry").values().cloned().collect();
        v.sort_by_key(|s| s.session);
        v
    }
}

/// A reply to send, with its payload.
type Answer = Option<(Reply, Payload)>;

/// The bytes that go with a reply.
pub(super) enum Payload {
    Bytes(Vec<u8>),
    /// A mapped range, written to the socket straight from the mapping;
    /// the buffer is unmapped afterwards unless the client holds a write
    /// mapping.
    Mapped {
        view: wgpu::BufferView,
        buffer: wgpu::Buffer,
        keep_mapped: bool,
    },
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Self {
        Payload::Bytes(v)
    }
}

/// Why a session ends early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Proto(#[from] proto::ProtoError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Violation(String),
}

/// One pushed error scope: wgpu's own, plus errors the session raised itself
/// (quota, bad ids) while it was innermost.
struct Scope {
    guard: wgpu::ErrorScopeGuard,
    filter: ErrorFilter,
    own: Option<GpuError>,
}

pub(super) struct Session {
    id: u64,
    server: Arc<GpuServer>,
    device: Option<(wgpu::Device, wgpu::Queue)>,
    objects: Objects,
    used: u64,
    scopes: Vec<Scope>,
    uncaptured: Arc<Mutex<Vec<GpuError>>>,
    seq: u64,
    /// Names this session's frames on the viewer (its attachment, once
    /// admitted).
    viewer_token: String,
    /// Admitted with a credential.
    admitted: bool,
    /// GPU memory in use by all sessions of its vGPU, when admitted.
    pool: Option<Arc<AtomicU64>>,
    /// GPU memory this session may hold.
    quota: u64,
    /// Its connection, registered under its attachment when admitted (a
    /// revocation shuts it).
    conn: Option<TcpStream>,
    /// Whether the hello (and its admission) is done.
    greeted: bool,
}

fn from_wgpu(e: &wgpu::Error) -> GpuError {
    match e {
        wgpu::Error::OutOfMemory { .. } => GpuError {
            kind: ErrorFilter::OutOfMemory,
            description: e.to_string(),
        },
        wgpu::Error::Validation { description, .. } => GpuError {
            kind: ErrorFilter::Validation,
            description: description.clone(),
        },
        wgpu::Error::Internal { description, .. } => GpuError {
            kind: ErrorFilter::Internal,
            description: description.clone(),
        },
    }
}

fn texture_bytes(desc: &wgt::TextureDescriptor<proto::Label, Vec<wgt::TextureFormat>>) -> u64 {
    let (bw, bh) = desc.format.block_dimensions();
    let block = u64::from(desc.format.block_copy_size(None).unwrap_or(8));
    let layers = u64::from(match desc.dimension {
        wgt::TextureDimension::D3 => 1,
        _ => desc.size.depth_or_array_layers,
    });
    let mut total: u64 = 0;
    for mip in 0..desc.mip_level_count.min(32) {
        let w = u64::from((desc.size.width >> mip).max(1).div_ceil(bw.max(1)));
        let h = u64::from((desc.size.height >> mip).max(1).div_ceil(bh.max(1)));
        let d = match desc.dimension {
            wgt::TextureDimension::D3 => u64::from((desc.size.depth_or_array_layers >> mip).max(1)),
            _ => layers,
        };
        total = total.saturating_add(w.saturating_mul(h).saturating_mul(d).saturating_mul(block));
    }
    total.saturating_mul(u64::from(desc.sample_count.max(1)))
}

impl Session {
    pub(super) fn new(id: u64, server: Arc<GpuServer>) -> Self {
        Self {
            id,
            device: None,
            objects: Objects::default(),
            used: 0,
            scopes: Vec::new(),
            uncaptured: Arc::default(),
            seq: 0,
            viewer_token: format!("{:032x}", rand::random::<u128>()),
            quota: server.config.quota,
            conn: None,
            greeted: false,
            admitted: false,
            pool: None,
            server,
        }
    }

    fn stats(&self) -> SessionStats {
        SessionStats {
            session: self.id,
            used: self.used,
            quota: self.quota,
            objects: self.objects.0.len() as u64,
        }
    }

    /// Serves a client over `halves` (plain or TLS) of `conn`.
    pub(super) fn run(
        mut self,
        conn: &TcpStream,
        halves: crate::tls::Halves,
    ) -> Result<(), SessionError> {
        self.conn = conn.try_clone().ok();
        let mut rd = BufReader::with_capacity(1 << 16, halves.0);
        let mut wr = BufWriter::with_capacity(1 << 16, halves.1);
        let result = self.serve(&mut rd, &mut wr);
        if let Err(e) = &result {
            let _ = proto::write_frame(&mut wr, &Message::Lost(e.to_string()), &[]);
            let _ = wr.flush();
        }
        // Everything the session owned goes with it.
        self.server.frames.forget(&self.viewer_token);
        self.drop_scopes();
        self.objects.0.clear();
        self.release_all();
        if let Some((device, _)) = self.device.take() {
            device.destroy();
        }
        result
    }

    /// Runs a session over in-memory bytes (the fuzz target's entry):
    /// `input` is what a client sent, the answers are discarded.
    ///
    /// With `shared`, the session starts with that device (as if it had
    /// requested it) and leaves it alive at the end, so that a fuzzer does
    /// not pay for a device per input; its objects still go with it.
    pub(super) fn run_bytes(
        mut self,
        input: &[u8],
        shared: Option<(wgpu::Device, wgpu::Queue)>,
    ) -> Result<(), SessionError> {
        let keep = shared.is_some();
        self.device = shared;
        let mut rd = BufReader::new(input);
        let mut wr = BufWriter::new(std::io::sink());
        let r = self.serve(&mut rd, &mut wr);
        self.drop_scopes();
        self.objects.0.clear();
        self.release_all();
        if let Some((device, _)) = self.device.take() {
            if keep {
                let _ = device.poll(wgpu::PollType::wait_indefinitely());
            } else {
                device.destroy();
            }
        }
        r
    }

    fn serve<R: std::io::Read, W: Write>(
        &mut self,
        rd: &mut BufReader<R>,
        wr: &mut BufWriter<W>,
    ) -> Result<(), SessionError> {
        loop {
            let Some((header, plen)) = proto::read_head(rd)? else {
                return Ok(());
            };
            let req: Request = proto::decode(&header)?;
            let hello = matches!(req, Request::Hello { .. });
            if hello == self.greeted {
                return Err(SessionError::Violation(
                    if hello {
                        "a second hello"
                    } else {
                        "the first message must be the hello"
                    }
                    .into(),
                ));
            }
            self.greeted = true;
            let seq = self.seq;
            self.seq += 1;
            let answer = if self.write_in_place(&req, plen, rd)? {
                None
            } else {
                let payload = proto::read_payload(rd, plen)?;
                let out = catch_unwind(AssertUnwindSafe(|| self.handle(req, &payload)));
                match out {
                    Ok(answer) => answer?,
                    Err(_) => {
                        return Err(SessionError::Violation(
                            "request made the GPU layer panic; session closed".into(),
                        ))
                    }
                }
            };
            match answer {
                Some((reply, Payload::Bytes(data))) => {
                    proto::write_frame(wr, &Message::Reply { seq, reply }, &data)?;
                }
                Some((
                    reply,
                    Payload::Mapped {
                        view,
                        buffer,
                        keep_mapped,
                    },
                )) => {
                    let r = proto::write_frame(wr, &Message::Reply { seq, reply }, &view);
                    drop(view);
                    if !keep_mapped {
                        buffer.unmap();
                    }
                    r?;
                }
                None => {}
            }
            let errors = std::mem::take(&mut *self.uncaptured.lock().expect("errors"));
            for e in errors {
                proto::write_frame(wr, &Message::Uncaptured(e), &[])?;
            }
            if rd.buffer().is_empty() {
                wr.flush()?;
                self.server.live.update(self.stats());
            }
        }
    }

    /// A `WriteBuffer` whose target is valid is read from the socket
    /// straight into wgpu's staging memory, saving a copy of the payload.
    /// Returns false (nothing read) when the request takes the general path,
    /// which also reports whatever makes the write invalid.
    fn write_in_place<R: std::io::Read>(
        &mut self,
        req: &Request,
        len: usize,
        rd: &mut BufReader<R>,
    ) -> Result<bool, SessionError> {
        let Request::WriteBuffer { buffer, offset } = *req else {
            return Ok(false);
        };
        let (Some((_, queue)), Ok(b)) = (self.device.as_ref(), self.objects.buffer(buffer)) else {
            return Ok(false);
        };
        let Some(size) = std::num::NonZeroU64::new(len as u64) else {
            return Ok(false);
        };
        if offset
            .checked_add(size.get())
            .is_none_or(|end| end > b.size())
        {
            return Ok(false);
        }
        let Some(mut view) = queue.write_buffer_with(b, offset, size) else {
            return Ok(false);
        };
        let mut dst = view.slice(..);
        if dst.len() != len {
            return Ok(false);
        }
        let ptr = dst.as_raw_element_ptr();
        // SAFETY: `ptr` points at `len` bytes of staging memory that wgpu
        // handed out for writing and keeps alive until `view` drops, after
        // this slice's last use; the bytes are mapped host memory (valid to
        // hold any value), and `read_exact` only writes through the slice.
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len) };
        rd.read_exact(dst)?;
        // Dropping the view schedules the copy into the buffer.
        drop(view);
        Ok(true)
    }

    /// Pops the error scopes the client left open, innermost first (wgpu
    /// panics on any other order, which a plain `Vec` drop would use).
    fn drop_scopes(&mut self) {
        while let Some(scope) = self.scopes.pop() {
            drop(scope);
        }
    }

    /// Records an error the session itself found: into the innermost scope
    /// that catches it, or reported as uncaptured.
    fn raise(&mut self, e: GpuError) {
        log::debug!("vgpu session {}: {}", self.id, e.description);
        if let Some(scope) = self.scopes.iter_mut().rev().find(|s| s.filter == e.kind) {
            if scope.own.is_none() {
                scope.own = Some(e);
            }
            return;
        }
        self.uncaptured.lock().expect("errors").push(e);
    }

    fn device(&self) -> Result<&(wgpu::Device, wgpu::Queue), SessionError> {
        self.device
            .as_ref()
            .ok_or_else(|| SessionError::Violation("request before RequestDevice".into()))
    }

    /// Inserts a new object under a client id, which must be fresh.
    fn insert(&mut self, id: Id, obj: Obj) -> Result<(), SessionError> {
        if id == 0 || self.objects.0.contains_key(&id) {
            return Err(SessionError::Violation(format!(
                "object id {id} is zero or already in use"
            )));
        }
        self.objects.0.insert(id, obj);
        Ok(())
    }

    /// Inserts `made`, or records its error and an invalid placeholder.
    fn insert_or_raise(
        &mut self,
        id: Id,
        kind: &'static str,
        made: Result<Obj, GpuError>,
    ) -> Result<(), SessionError> {
        match made {
            Ok(o) => self.insert(id, o),
            Err(e) => {
                self.raise(e);
                self.insert(id, Obj::Invalid(kind))
            }
        }
    }

    fn charge(&mut self, bytes: u64, what: &str) -> Result<(), GpuError> {
        let quota = self.quota;
        if self.used.saturating_add(bytes) > quota {
            return Err(GpuError {
                kind: ErrorFilter::OutOfMemory,
                description: format!(
                    "vGPU memory quota exceeded: {what} of {bytes} bytes, {} of {quota} bytes in use",
                    self.used
                ),
            });
        }
        if let Some(pool) = &self.pool {
            // All sessions of one vGPU share its memory.
            pool.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(bytes).filter(|n| *n <= quota)
            })
            .map_err(|in_use| GpuError {
                kind: ErrorFilter::OutOfMemory,
                description: format!(
                    "vGPU memory quota exceeded: {what} of {bytes} bytes, {in_use} of {quota} bytes in use by this vGPU's sessions"
                ),
            })?;
        }
        self.used += bytes;
        Ok(())
    }

    /// Gives back `bytes` of GPU memory.
    fn release(&mut self, bytes: u64) {
        self.used -= bytes;
        if let Some(pool) = &self.pool {
            pool.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    /// Gives back everything (the session's objects are gone).
    fn release_all(&mut self) {
        let all = self.used;
        self.release(all);
    }

    fn stage<'a>(
        &'a self,
        stage: &'a Stage,
        constants: &'a [(&'a str, f64)],
    ) -> Result<(&'a wgpu::ShaderModule, wgpu::PipelineCompilationOptions<'a>), GpuError> {
        Ok((
            self.objects.shader(stage.module)?,
            wgpu::PipelineCompilationOptions {
                constants,
                zero_initialize_workgroup_memory: stage.zero_initialize_workgroup_memory,
            },
        ))
    }

    fn handle(&mut self, req: Request, payload: &[u8]) -> Result<Answer, SessionError> {
        match req {
            Request::Hello {
                version,
                credential,
            } => {
                if version != proto::VERSION {
                    return Err(SessionError::Violation(format!(
                        "protocol version {version}, server speaks {}",
                        proto::VERSION
                    )));
                }
                if let Some(policy) = &self.server.config.admission {
                    let grant = policy
                        .admit(credential.as_deref())
                        .map_err(|why| SessionError::Violation(format!("not admitted: {why}")))?;
                    self.quota = grant.quota;
                    self.pool = Some(self.server.admitted.pool(&grant.attachment));
                    if let Some(c) = self.conn.as_ref().and_then(|c| c.try_clone().ok()) {
                        self.server.admitted.add(&grant.attachment, self.id, c);
                    }
                    // An admitted session's frames are its attachment's:
                    // the region's console reads them with the
                    // attachment's credential, and no viewer URL shows them.
                    self.viewer_token = grant.attachment;
                    self.admitted = true;
                }
                Ok(Some((
                    Reply::Hello {
                        version: proto::VERSION,
                        session: self.id,
                        quota: self.quota,
                        viewer_token: if self.admitted {
                            String::new()
                        } else {
                            self.viewer_token.clone()
                        },
                    },
                    Payload::Bytes(Vec::new()),
                )))
            }
            Request::RequestAdapter => {
                let a = &self.server.adapter;
                let desc = proto::AdapterDesc {
                    info: a.get_info(),
                    features: a.features() & supported_features(),
                    limits: a.limits(),
                    downlevel: a.get_downlevel_capabilities(),
                };
                Ok(Some((
                    Reply::Adapter(Some(Box::new(desc))),
                    Payload::Bytes(Vec::new()),
                )))
            }
            Request::FormatFeatures { format } => {
                let f = self.server.adapter.get_texture_format_features(format);
                Ok(Some((Reply::FormatFeatures(f), Payload::Bytes(Vec::new()))))
            }
            Request::RequestDevice {
                label,
                features,
                limits,
            } => {
                if self.device.is_some() {
                    return Err(SessionError::Violation("one device per session".into()));
                }
                let desc = wgpu::DeviceDescriptor {
                    label: label.as_deref(),
                    required_features: features & supported_features(),
                    required_limits: limits,
                    ..Default::default()
                };
                match pollster::block_on(self.server.adapter.request_device(&desc)) {
                    Ok((d, q)) => {
                        let sink = self.uncaptured.clone();
                        d.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                            sink.lock().expect("errors").push(from_wgpu(&e));
                        }));
                        self.device = Some((d, q));
                        Ok(Some((Reply::Device(Ok(())), Payload::Bytes(Vec::new()))))
                    }
                    Err(e) => Ok(Some((
                        Reply::Device(Err(e.to_string())),
                        Payload::Bytes(Vec::new()),
                    ))),
                }
            }
            Request::CreateBuffer { id, desc } => {
                let (device, _) = self.device()?;
                let device = device.clone();
                let made = self.charge(desc.size, "buffer").map(|()| {
                    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
                        label: desc.label.as_deref(),
                        size: desc.size,
                        usage: desc.usage,
                        mapped_at_creation: desc.mapped_at_creation,
                    });
                    Obj::Buffer {
                        buffer,
                        bytes: desc.size,
                        mapped: desc.mapped_at_creation.then_some(0..desc.size),
                    }
                });
                self.insert_or_raise(id, "buffer", made)?;
                Ok(None)
            }
            Request::CreateTexture { id, desc } => {
                let device = self.device()?.0.clone();
                let bytes = texture_bytes(&desc);
                let made = self.charge(bytes, "texture").map(|()| Obj::Texture {
                    texture: device.create_texture(&wgpu::TextureDescriptor {
                        label: desc.label.as_deref(),
                        size: desc.size,
                        mip_level_count: desc.mip_level_count,
                        sample_count: desc.sample_count,
                        dimension: desc.dimension,
                        format: desc.format,
                        usage: desc.usage,
                        view_formats: &desc.view_formats,
                    }),
                    bytes,
                });
                self.insert_or_raise(id, "texture", made)?;
                Ok(None)
            }
            Request::CreateView { id, texture, desc } => {
                let made = self.objects.texture(texture).map(|t| {
                    Obj::View(t.create_view(&wgpu::TextureViewDescriptor {
                        label: desc.label.as_deref(),
                        format: desc.format,
                        dimension: desc.dimension,
                        usage: desc.usage,
                        aspect: desc.aspect,
                        base_mip_level: desc.base_mip_level,
                        mip_level_count: desc.mip_level_count,
                        base_array_layer: desc.base_array_layer,
                        array_layer_count: desc.array_layer_count,
                    }))
                });
                self.insert_or_raise(id, "texture view", made)?;
                Ok(None)
            }
            Request::CreateSampler { id, desc } => {
                let device = &self.device()?.0;
                let s = device.create_sampler(&wgpu::SamplerDescriptor {
                    label: desc.label.as_deref(),
                    address_mode_u: desc.address_mode_u,
                    address_mode_v: desc.address_mode_v,
                    address_mode_w: desc.address_mode_w,
                    mag_filter: desc.mag_filter,
                    min_filter: desc.min_filter,
                    mipmap_filter: desc.mipmap_filter,
                    lod_min_clamp: desc.lod_min_clamp,
                    lod_max_clamp: desc.lod_max_clamp,
                    compare: desc.compare,
                    anisotropy_clamp: desc.anisotropy_clamp,
                    border_color: desc.border_color,
                });
                self.insert(id, Obj::Sampler(s))?;
                Ok(None)
            }
            Request::CreateShaderModule { id, label, wgsl } => {
                let device = &self.device()?.0;
                let m = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: label.as_deref(),
                    source: wgpu::ShaderSource::Wgsl(wgsl.into()),
                });
                self.insert(id, Obj::Shader(m))?;
                Ok(None)
            }
            Request::CreateBindGroupLayout { id, label, entries } => {
                let device = &self.device()?.0;
                let l = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: label.as_deref(),
                    entries: &entries,
                });
                self.insert(id, Obj::BindGroupLayout(l))?;
                Ok(None)
            }
            Request::CreateBindGroup {
                id,
                label,
                layout,
                entries,
            } => {
                let made = self.bind_group(label.as_deref(), layout, &entries);
                self.insert_or_raise(id, "bind group", made)?;
                Ok(None)
            }
            Request::CreatePipelineLayout {
                id,
                label,
                bind_group_layouts,
                immediate_size,
            } => {
                let device = self.device()?.0.clone();
                // wgpu's frontend asserts this bound instead of reporting it.
                let max = device.limits().max_bind_groups.min(8) as usize;
                let made = if bind_group_layouts.len() > max {
                    Err(validation(format!(
                        "{} bind group layouts, the device allows {max}",
                        bind_group_layouts.len()
                    )))
                } else {
                    Ok(())
                };
                let made = made
                    .and_then(|()| {
                        bind_group_layouts
                            .iter()
                            .map(|l| l.map(|l| self.objects.bind_group_layout(l)).transpose())
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .map(|layouts| {
                        Obj::PipelineLayout(device.create_pipeline_layout(
                            &wgpu::PipelineLayoutDescriptor {
                                label: label.as_deref(),
                                bind_group_layouts: &layouts,
                                immediate_size,
                            },
                        ))
                    });
                self.insert_or_raise(id, "pipeline layout", made)?;
                Ok(None)
            }
            Request::CreateComputePipeline {
                id,
                label,
                layout,
                stage,
            } => {
                let device = self.device()?.0.clone();
                let constants: Vec<(&str, f64)> = stage
                    .constants
                    .iter()
                    .map(|(k, v)| (k.as_str(), *v))
                    .collect();
                let made = (|| {
                    let layout = layout
                        .map(|l| self.objects.pipeline_layout(l))
                        .transpose()?;
                    let (module, compilation_options) = self.stage(&stage, &constants)?;
                    Ok(Obj::ComputePipeline(device.create_compute_pipeline(
                        &wgpu::ComputePipelineDescriptor {
                            label: label.as_deref(),
                            layout,
                            module,
                            entry_point: stage.entry_point.as_deref(),
                            compilation_options,
                            cache: None,
                        },
                    )))
                })();
                self.insert_or_raise(id, "compute pipeline", made)?;
                Ok(None)
            }
            Request::CreateRenderPipeline { id, desc } => {
                let device = self.device()?.0.clone();
                let made = self.render_pipeline(&device, &desc);
                self.insert_or_raise(id, "render pipeline", made)?;
                Ok(None)
            }
            Request::PipelineBindGroupLayout {
                pipeline,
                index,
                id,
            } => {
                let made = match self.objects.0.get(&pipeline) {
                    Some(Obj::ComputePipeline(p)) => {
                        Ok(Obj::BindGroupLayout(p.get_bind_group_layout(index)))
                    }
                    Some(Obj::RenderPipeline(p)) => {
                        Ok(Obj::BindGroupLayout(p.get_bind_group_layout(index)))
                    }
                    other => Err(bad_id(pipeline, "pipeline", other)),
                };
                self.insert_or_raise(id, "bind group layout", made)?;
                Ok(None)
            }
            Request::CommandBuffer {
                id,
                label,
                commands,
            } => {
                let device = self.device()?.0.clone();
                let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: label.as_deref(),
                });
                let made = super::replay::replay(&self.objects, &mut encoder, &commands)
                    .map(|()| Obj::CommandBuffer(Some(encoder.finish())));
                self.insert_or_raise(id, "command buffer", made)?;
                Ok(None)
            }
            Request::WriteBuffer { buffer, offset } => {
                let queue = self.device()?.1.clone();
                match self.objects.buffer(buffer) {
                    Ok(b) => {
                        let in_range = offset
                            .checked_add(payload.len() as u64)
                            .is_some_and(|end| end <= b.size());
                        if in_range {
                            queue.write_buffer(b, offset, payload);
                        } else {
                            let e = validation(format!(
                                "write of {} bytes at {offset} is outside buffer {buffer} ({} bytes)",
                                payload.len(),
                                b.size()
                            ));
                            self.raise(e);
                        }
                    }
                    Err(e) => self.raise(e),
                }
                Ok(None)
            }
            Request::WriteTexture {
                texture,
                layout,
                size,
            } => {
                let queue = self.device()?.1.clone();
                match self.objects.texture(texture.texture) {
                    Ok(t) => queue.write_texture(
                        wgpu::TexelCopyTextureInfo {
                            texture: t,
                            mip_level: texture.mip_level,
                            origin: texture.origin,
                            aspect: texture.aspect,
                        },
                        payload,
                        layout,
                        size,
                    ),
                    Err(e) => self.raise(e),
                }
                Ok(None)
            }
            Request::Submit { command_buffers } => {
                let (device, queue) = self.device()?.clone();
                let mut cbs = Vec::with_capacity(command_buffers.len());
                let mut failed = None;
                for id in &command_buffers {
                    match self.objects.0.get_mut(id) {
                        Some(Obj::CommandBuffer(cb)) => match cb.take() {
                            Some(cb) => cbs.push(cb),
                            None => {
                                failed = Some(validation(format!(
                                    "command buffer {id} was already submitted"
                                )))
                            }
                        },
                        other => failed = Some(bad_id(*id, "command buffer", other.map(|o| &*o))),
                    }
                }
                if let Some(e) = failed {
                    // A submit with a bad buffer runs none of them, as in WebGPU.
                    self.raise(e);
                    return Ok(None);
                }
                self.server.sched.run(self.id, || {
                    let idx = queue.submit(cbs);
                    let _ = device.poll(wgpu::PollType::Wait {
                        submission_index: Some(idx),
                        timeout: None,
                    });
                });
                Ok(None)
            }
            Request::MapAsync {
                buffer,
                write,
                range,
            } => {
                let device = self.device()?.0.clone();
                let reply = self.map(&device, buffer, write, range);
                Ok(Some(match reply {
                    Ok(data) => (Reply::Mapped(Ok(())), data),
                    Err(e) => (Reply::Mapped(Err(e)), Vec::new().into()),
                }))
            }
            Request::Unmap { buffer, range } => {
                if let Err(e) = self.unmap(buffer, range, payload) {
                    self.raise(e);
                }
                Ok(None)
            }
            Request::Poll => {
                let device = &self.device()?.0;
                let _ = device.poll(wgpu::PollType::wait_indefinitely());
                Ok(Some((Reply::Polled, Payload::Bytes(Vec::new()))))
            }
            Request::PushErrorScope { filter } => {
                let device = &self.device()?.0;
                let guard = device.push_error_scope(match filter {
                    ErrorFilter::Validation => wgpu::ErrorFilter::Validation,
                    ErrorFilter::OutOfMemory => wgpu::ErrorFilter::OutOfMemory,
                    ErrorFilter::Internal => wgpu::ErrorFilter::Internal,
                });
                self.scopes.push(Scope {
                    guard,
                    filter,
                    own: None,
                });
                Ok(None)
            }
            Request::PopErrorScope => {
                let Some(scope) = self.scopes.pop() else {
                    return Ok(Some((
                        Reply::ErrorScope(Some(validation("no error scope to pop".into()))),
                        Payload::Bytes(Vec::new()),
                    )));
                };
                let theirs = pollster::block_on(scope.guard.pop()).map(|e| from_wgpu(&e));
                Ok(Some((
                    Reply::ErrorScope(theirs.or(scope.own)),
                    Payload::Bytes(Vec::new()),
                )))
            }
            Request::CompilationInfo { module } => {
                let messages = match self.objects.shader(module) {
                    Ok(m) => pollster::block_on(m.get_compilation_info())
                        .messages
                        .into_iter()
                        .map(|m| ShaderMessage {
                            message: m.message,
                            error: m.message_type == wgpu::CompilationMessageType::Error,
                            location: m.location.map(|l| (l.offset, l.length)),
                        })
                        .collect(),
                    Err(e) => vec![ShaderMessage {
                        message: e.description,
                        error: true,
                        location: None,
                    }],
                };
                Ok(Some((
                    Reply::CompilationInfo(messages),
                    Payload::Bytes(Vec::new()),
                )))
            }
            Request::Destroy { id } => {
                match self.objects.0.get_mut(&id) {
                    Some(Obj::Buffer { buffer, bytes, .. }) => {
                        buffer.destroy();
                        let b = std::mem::take(bytes);
                        self.release(b);
                    }
                    Some(Obj::Texture { texture, bytes }) => {
                        texture.destroy();
                        let b = std::mem::take(bytes);
                        self.release(b);
                    }
                    _ => {}
                }
                Ok(None)
            }
            Request::Drop { id } => {
                match self.objects.0.remove(&id) {
                    Some(Obj::Buffer { bytes, .. }) | Some(Obj::Texture { bytes, .. }) => {
                        self.release(bytes);
                    }
                    Some(_) => {}
                    None => {
                        return Err(SessionError::Violation(format!("drop of unknown id {id}")))
                    }
                }
                Ok(None)
            }
            Request::Present { texture } => {
                let (device, queue) = self.device()?.clone();
                match self.objects.texture(texture) {
                    Ok(t) => {
                        let t = t.clone();
                        match crate::viewer::capture(&device, &queue, &t) {
                            Ok(frame) => self.server.frames.publish(&self.viewer_token, frame),
                            Err(e) => self.raise(validation(e)),
                        }
                    }
                    Err(e) => self.raise(e),
                }
                Ok(None)
            }
            Request::Usage => Ok(Some((
                Reply::Usage {
                    used: self.used,
                    quota: self.quota,
                    objects: self.objects.0.len() as u64,
                },
                Payload::Bytes(Vec::new()),
            ))),
        }
    }

    fn bind_group(
        &self,
        label: Option<&str>,
        layout: Id,
        entries: &[BindGroupEntry],
    ) -> Result<Obj, GpuError> {
        let device = &self.device.as_ref().expect("device checked").0;
        let layout = self.objects.bind_group_layout(layout)?;
        // Arrays are resolved first so that the entries can borrow them.
        let mut buffers: Vec<Vec<wgpu::BufferBinding<'_>>> = Vec::new();
        let mut samplers: Vec<Vec<&wgpu::Sampler>> = Vec::new();
        let mut views: Vec<Vec<&wgpu::TextureView>> = Vec::new();
        let buffer_binding =
            |b: &proto::BufferBinding| -> Result<wgpu::BufferBinding<'_>, GpuError> {
                let buffer = self.objects.buffer(b.buffer)?;
                let end = b
                    .size
                    .map_or(Some(b.offset), |s| b.offset.checked_add(s.get()));
                if b.offset > buffer.size() || end.is_none_or(|e| e > buffer.size()) {
                    return Err(validation(format!(
                        "binding of buffer {} at {} is out of its bounds",
                        b.buffer, b.offset
                    )));
                }
                Ok(wgpu::BufferBinding {
                    buffer,
                    offset: b.offset,
                    size: b.size,
                })
            };
        for e in entries {
            match &e.resource {
                Resource::BufferArray(v) => {
                    buffers.push(v.iter().map(buffer_binding).collect::<Result<_, _>>()?)
                }
                Resource::SamplerArray(v) => samplers.push(
                    v.iter()
                        .map(|s| self.objects.sampler(*s))
                        .collect::<Result<_, _>>()?,
                ),
                Resource::TextureViewArray(v) => views.push(
                    v.iter()
                        .map(|s| self.objects.view(*s))
                        .collect::<Result<_, _>>()?,
                ),
                _ => {}
            }
        }
        let (mut bi, mut si, mut vi) = (0, 0, 0);
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let resource = match &e.resource {
                Resource::Buffer(b) => wgpu::BindingResource::Buffer(buffer_binding(b)?),
                Resource::Sampler(s) => wgpu::BindingResource::Sampler(self.objects.sampler(*s)?),
                Resource::TextureView(v) => {
                    wgpu::BindingResource::TextureView(self.objects.view(*v)?)
                }
                Resource::BufferArray(_) => {
                    bi += 1;
                    wgpu::BindingResource::BufferArray(&buffers[bi - 1])
                }
                Resource::SamplerArray(_) => {
                    si += 1;
                    wgpu::BindingResource::SamplerArray(&samplers[si - 1])
                }
                Resource::TextureViewArray(_) => {
                    vi += 1;
                    wgpu::BindingResource::TextureViewArray(&views[vi - 1])
                }
            };
            out.push(wgpu::BindGroupEntry {
                binding: e.binding,
                resource,
            });
        }
        Ok(Obj::BindGroup(device.create_bind_group(
            &wgpu::BindGroupDescriptor {
                label,
                layout,
                entries: &out,
            },
        )))
    }

    fn render_pipeline(
        &self,
        device: &wgpu::Device,
        desc: &proto::RenderPipelineDesc,
    ) -> Result<Obj, GpuError> {
        let layout = desc
            .layout
            .map(|l| self.objects.pipeline_layout(l))
            .transpose()?;
        let vconst: Vec<(&str, f64)> = desc
            .vertex
            .constants
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        let (vmodule, vopts) = self.stage(&desc.vertex, &vconst)?;
        let buffers: Vec<Option<wgpu::VertexBufferLayout<'_>>> = desc
            .buffers
            .iter()
            .map(|b| {
                b.as_ref().map(|b| wgpu::VertexBufferLayout {
                    array_stride: b.array_stride,
                    step_mode: b.step_mode,
                    attributes: &b.attributes,
                })
            })
            .collect();
        let fconst: Vec<(&str, f64)> = desc
            .fragment
            .as_ref()
            .map(|(s, _)| s.constants.iter().map(|(k, v)| (k.as_str(), *v)).collect())
            .unwrap_or_default();
        let fragment = match &desc.fragment {
            Some((stage, targets)) => {
                let (module, compilation_options) = self.stage(stage, &fconst)?;
                Some(wgpu::FragmentState {
                    module,
                    entry_point: stage.entry_point.as_deref(),
                    compilation_options,
                    targets,
                })
            }
            None => None,
        };
        Ok(Obj::RenderPipeline(device.create_render_pipeline(
            &wgpu::RenderPipelineDescriptor {
                label: desc.label.as_deref(),
                layout,
                vertex: wgpu::VertexState {
                    module: vmodule,
                    entry_point: desc.vertex.entry_point.as_deref(),
                    compilation_options: vopts,
                    buffers: &buffers,
                },
                primitive: desc.primitive,
                depth_stencil: desc.depth_stencil.clone(),
                multisample: desc.multisample,
                fragment,
                multiview_mask: desc.multiview_mask,
                cache: None,
            },
        )))
    }

    fn map(
        &mut self,
        device: &wgpu::Device,
        id: Id,
        write: bool,
        range: std::ops::Range<u64>,
    ) -> Result<Payload, String> {
        let (buffer, mapped) = match self.objects.0.get_mut(&id) {
            Some(Obj::Buffer { buffer, mapped, .. }) => (buffer.clone(), mapped),
            other => return Err(bad_id(id, "buffer", other.map(|o| &*o)).description),
        };
        if mapped.is_some() {
            return Err(format!("buffer {id} is already mapped"));
        }
        if range.start > range.end || range.end > buffer.size() {
            return Err(format!(
                "map range {range:?} is outside buffer {id} ({} bytes)",
                buffer.size()
            ));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let mode = if write {
            wgpu::MapMode::Write
        } else {
            wgpu::MapMode::Read
        };
        buffer.map_async(mode, range.clone(), move |r| {
            let _ = tx.send(r);
        });
        let _ = device.poll(wgpu::PollType::wait_indefinitely());
        match rx.try_recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("map of buffer {id} failed: {e}")),
            Err(_) => return Err(format!("map of buffer {id} did not complete")),
        }
        match buffer.get_mapped_range(range.clone()) {
            Ok(view) => {
                if write {
                    *mapped = Some(range);
                }
                Ok(Payload::Mapped {
                    view,
                    buffer: buffer.clone(),
                    keep_mapped: write,
                })
            }
            Err(e) => {
                buffer.unmap();
                Err(e.to_string())
            }
        }
    }

    fn unmap(&mut self, id: Id, range: std::ops::Range<u64>, data: &[u8]) -> Result<(), GpuError> {
        let (buffer, mapped) = match self.objects.0.get_mut(&id) {
            Some(Obj::Buffer { buffer, mapped, .. }) => (buffer, mapped),
            // Unmapping a buffer whose creation failed is not an error.
            Some(Obj::Invalid(_)) => return Ok(()),
            other => return Err(bad_id(id, "buffer", other.map(|o| &*o))),
        };
        let Some(held) = mapped.take() else {
            // A read mapping: the server let go when it sent the bytes.
            return Ok(());
        };
        let fits = range.start >= held.start
            && range.end <= held.end
            && range.end.checked_sub(range.start) == Some(data.len() as u64);
        let result = if data.is_empty() {
            Ok(())
        } else if !fits {
            Err(validation(format!(
                "unmap of buffer {id} with {} bytes for {range:?}, mapped {held:?}",
                data.len()
            )))
        } else {
            match buffer.get_mapped_range_mut(range) {
                Ok(mut view) => {
                    view.copy_from_slice(data);
                    Ok(())
                }
                Err(e) => Err(validation(e.to_string())),
            }
        };
        buffer.unmap();
        result
    }
}

/// Features a session may use: those the protocol carries.
pub(super) fn supported_features() -> wgt::Features {
    wgt::Features::DEPTH_CLIP_CONTROL
        | wgt::Features::DEPTH32FLOAT_STENCIL8
        | wgt::Features::TEXTURE_COMPRESSION_BC
        | wgt::Features::INDIRECT_FIRST_INSTANCE
        | wgt::Features::SHADER_F16
        | wgt::Features::RG11B10UFLOAT_RENDERABLE
        | wgt::Features::BGRA8UNORM_STORAGE
        | wgt::Features::FLOAT32_FILTERABLE
        | wgt::Features::TEXTURE_ADAPTER_SPECIFIC_FORMAT_FEATURES
        | wgt::Features::IMMEDIATES
        | wgt::Features::TEXTURE_BINDING_ARRAY
        | wgt::Features::BUFFER_BINDING_ARRAY
        | wgt::Features::STORAGE_RESOURCE_BINDING_ARRAY
        | wgt::Features::SAMPLED_TEXTURE_AND_STORAGE_BUFFER_ARRAY_NON_UNIFORM_INDEXING
}
