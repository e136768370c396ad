//! Remote command encoders and their compute and render passes: commands are recorded here and sent with the finished command buffer.

use super::*;

/// A command encoder: commands are recorded here and sent at `finish`.
#[derive(Debug)]
pub struct REncoder {
    pub(crate) c: Arc<Conn>,
    pub(crate) label: Option<String>,
    pub(crate) cmds: Arc<Mutex<Vec<Command>>>,
}

impl REncoder {
    pub(crate) fn push(&self, c: Command) {
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

pub(crate) fn load<V: Copy>(l: wgpu::LoadOp<V>) -> proto::LoadOp<V> {
    match l {
        wgpu::LoadOp::Clear(v) => proto::LoadOp::Clear(v),
        _ => proto::LoadOp::Load,
    }
}

/// An open compute pass; commands go straight into the encoder's list.
#[derive(Debug)]
pub struct RComputePass {
    pub(crate) cmds: Arc<Mutex<Vec<Command>>>,
}

impl RComputePass {
    pub(crate) fn push(&self, c: Command) {
        self.cmds.lock().expect("commands").push(c);
    }
}

impl Drop for RComputePass {
    fn drop(&mut self) {
        self.push(Command::EndPass);
    }
}

pub(crate) fn bind_group_cmd(
    index: u32,
    group: Option<&DispatchBindGroup>,
    offsets: &[u32],
) -> Command {
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
    pub(crate) cmds: Arc<Mutex<Vec<Command>>>,
}

impl RRenderPass {
    pub(crate) fn push(&self, c: Command) {
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
