//! A session's requests, each turned into wgpu calls on its own objects.

use super::*;
use crate::proto::{BindGroupEntry, Resource, ShaderMessage, Stage};

impl Session {
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

    pub(super) fn handle(&mut self, req: Request, payload: &[u8]) -> Result<Answer, SessionError> {
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
                let made = crate::server::replay::replay(&self.objects, &mut encoder, &commands)
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
