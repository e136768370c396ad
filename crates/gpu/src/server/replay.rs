//! Replays a client's recorded command encoder on the session's device.
//!
//! Ids resolve in the session's own table only. wgpu-core validates the
//! commands themselves; what wgpu's frontend would panic on (buffer slices
//! out of range, empty index buffers, unbalanced passes) is refused here
//! first, and the whole command buffer becomes invalid.

use std::num::NonZeroU64;

use super::objects::{validation, Objects};
use crate::proto::{
    BufferCopy, ColorAttachment, Command, DepthAttachment, GpuError, Id, LoadOp, Ops, TextureCopy,
};

fn tex<'a>(objs: &'a Objects, c: &TextureCopy) -> Result<wgpu::TexelCopyTextureInfo<'a>, GpuError> {
    Ok(wgpu::TexelCopyTextureInfo {
        texture: objs.texture(c.texture)?,
        mip_level: c.mip_level,
        origin: c.origin,
        aspect: c.aspect,
    })
}

fn buf<'a>(objs: &'a Objects, c: &BufferCopy) -> Result<wgpu::TexelCopyBufferInfo<'a>, GpuError> {
    Ok(wgpu::TexelCopyBufferInfo {
        buffer: objs.buffer(c.buffer)?,
        layout: c.layout,
    })
}

/// A checked, non-empty slice of a buffer.
fn slice<'a>(
    objs: &'a Objects,
    id: Id,
    offset: u64,
    size: Option<NonZeroU64>,
) -> Result<wgpu::BufferSlice<'a>, GpuError> {
    let b = objs.buffer(id)?;
    let end = match size {
        Some(s) => offset.checked_add(s.get()),
        None => Some(b.size()),
    };
    match end {
        Some(end) if offset < end && end <= b.size() => Ok(b.slice(offset..end)),
        _ => Err(validation(format!(
            "slice of buffer {id} at {offset} ({size:?} bytes) is empty or outside its {} bytes",
            b.size()
        ))),
    }
}

fn ops<V: Copy>(o: &Ops<V>) -> wgpu::Operations<V> {
    wgpu::Operations {
        load: match o.load {
            LoadOp::Clear(v) => wgpu::LoadOp::Clear(v),
            LoadOp::Load => wgpu::LoadOp::Load,
        },
        store: if o.store {
            wgpu::StoreOp::Store
        } else {
            wgpu::StoreOp::Discard
        },
    }
}

/// Index of the `EndPass` that closes the pass opened at `start`.
fn pass_end(cmds: &[Command], start: usize) -> Result<usize, GpuError> {
    for (i, c) in cmds.iter().enumerate().skip(start + 1) {
        match c {
            Command::EndPass => return Ok(i),
            Command::BeginComputePass { .. } | Command::BeginRenderPass { .. } => break,
            _ => {}
        }
    }
    Err(validation(
        "a pass was not ended before the next one or the end of the encoder".into(),
    ))
}

/// Replays `cmds` into `enc`.
pub(super) fn replay(
    objs: &Objects,
    enc: &mut wgpu::CommandEncoder,
    cmds: &[Command],
) -> Result<(), GpuError> {
    let mut i = 0;
    while i < cmds.len() {
        match &cmds[i] {
            Command::BeginComputePass { label } => {
                let end = pass_end(cmds, i)?;
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: label.as_deref(),
                    timestamp_writes: None,
                });
                for c in &cmds[i + 1..end] {
                    compute(objs, &mut pass, c)?;
                }
                i = end + 1;
                continue;
            }
            Command::BeginRenderPass {
                label,
                color,
                depth,
                multiview_mask,
            } => {
                let end = pass_end(cmds, i)?;
                let colors = color
                    .iter()
                    .map(|c| c.as_ref().map(|c| color_attachment(objs, c)).transpose())
                    .collect::<Result<Vec<_>, _>>()?;
                let depth = depth
                    .as_ref()
                    .map(|d| depth_attachment(objs, d))
                    .transpose()?;
                let mut pass = enc.begin_render_pass(&wgpu::RenderPassDescriptor {
                    label: label.as_deref(),
                    color_attachments: &colors,
                    depth_stencil_attachment: depth,
                    timestamp_writes: None,
                    occlusion_query_set: None,
                    multiview_mask: *multiview_mask,
                });
                for c in &cmds[i + 1..end] {
                    render(objs, &mut pass, c)?;
                }
                i = end + 1;
                continue;
            }
            c => encoder(objs, enc, c)?,
        }
        i += 1;
    }
    Ok(())
}

fn color_attachment<'a>(
    objs: &'a Objects,
    c: &ColorAttachment,
) -> Result<wgpu::RenderPassColorAttachment<'a>, GpuError> {
    Ok(wgpu::RenderPassColorAttachment {
        view: objs.view(c.view)?,
        depth_slice: c.depth_slice,
        resolve_target: c.resolve_target.map(|r| objs.view(r)).transpose()?,
        ops: ops(&Ops {
            load: c.load,
            store: c.store,
        }),
    })
}

fn depth_attachment<'a>(
    objs: &'a Objects,
    d: &DepthAttachment,
) -> Result<wgpu::RenderPassDepthStencilAttachment<'a>, GpuError> {
    Ok(wgpu::RenderPassDepthStencilAttachment {
        view: objs.view(d.view)?,
        depth_ops: d.depth.as_ref().map(ops),
        stencil_ops: d.stencil.as_ref().map(ops),
    })
}

fn encoder(objs: &Objects, enc: &mut wgpu::CommandEncoder, c: &Command) -> Result<(), GpuError> {
    match c {
        Command::CopyBufferToBuffer {
            src,
            src_offset,
            dst,
            dst_offset,
            size,
        } => enc.copy_buffer_to_buffer(
            objs.buffer(*src)?,
            *src_offset,
            objs.buffer(*dst)?,
            *dst_offset,
            *size,
        ),
        Command::CopyBufferToTexture { src, dst, size } => {
            enc.copy_buffer_to_texture(buf(objs, src)?, tex(objs, dst)?, *size)
        }
        Command::CopyTextureToBuffer { src, dst, size } => {
            enc.copy_texture_to_buffer(tex(objs, src)?, buf(objs, dst)?, *size)
        }
        Command::CopyTextureToTexture { src, dst, size } => {
            enc.copy_texture_to_texture(tex(objs, src)?, tex(objs, dst)?, *size)
        }
        Command::ClearBuffer {
            buffer,
            offset,
            size,
        } => enc.clear_buffer(objs.buffer(*buffer)?, *offset, *size),
        Command::ClearTexture { texture, range } => {
            enc.clear_texture(objs.texture(*texture)?, range)
        }
        Command::InsertDebugMarker(s) => enc.insert_debug_marker(s),
        Command::PushDebugGroup(s) => enc.push_debug_group(s),
        Command::PopDebugGroup => enc.pop_debug_group(),
        other => {
            return Err(validation(format!(
                "{} outside a pass",
                command_name(other)
            )))
        }
    }
    Ok(())
}

fn compute(objs: &Objects, pass: &mut wgpu::ComputePass<'_>, c: &Command) -> Result<(), GpuError> {
    match c {
        Command::SetComputePipeline(p) => pass.set_pipeline(objs.compute_pipeline(*p)?),
        Command::SetBindGroup {
            index,
            group,
            offsets,
        } => {
            let g = group.map(|g| objs.bind_group(g)).transpose()?;
            pass.set_bind_group(*index, g, offsets)
        }
        Command::SetImmediates { offset, data } => pass.set_immediates(*offset, data),
        Command::Dispatch([x, y, z]) => pass.dispatch_workgroups(*x, *y, *z),
        Command::DispatchIndirect { buffer, offset } => {
            pass.dispatch_workgroups_indirect(objs.buffer(*buffer)?, *offset)
        }
        Command::InsertDebugMarker(s) => pass.insert_debug_marker(s),
        Command::PushDebugGroup(s) => pass.push_debug_group(s),
        Command::PopDebugGroup => pass.pop_debug_group(),
        other => {
            return Err(validation(format!(
                "{} inside a compute pass",
                command_name(other)
            )))
        }
    }
    Ok(())
}

fn render(objs: &Objects, pass: &mut wgpu::RenderPass<'_>, c: &Command) -> Result<(), GpuError> {
    match c {
        Command::SetRenderPipeline(p) => pass.set_pipeline(objs.render_pipeline(*p)?),
        Command::SetBindGroup {
            index,
            group,
            offsets,
        } => {
            let g = group.map(|g| objs.bind_group(g)).transpose()?;
            pass.set_bind_group(*index, g, offsets)
        }
        Command::SetImmediates { offset, data } => pass.set_immediates(*offset, data),
        Command::SetVertexBuffer {
            slot,
            buffer,
            offset,
            size,
        } => match buffer {
            Some(b) => pass.set_vertex_buffer(*slot, slice(objs, *b, *offset, *size)?),
            None => pass.set_vertex_buffer(*slot, None),
        },
        Command::SetIndexBuffer {
            buffer,
            format,
            offset,
            size,
        } => pass.set_index_buffer(slice(objs, *buffer, *offset, *size)?, *format),
        Command::SetBlendConstant(c) => pass.set_blend_constant(*c),
        Command::SetScissorRect([x, y, w, h]) => pass.set_scissor_rect(*x, *y, *w, *h),
        Command::SetViewport([x, y, w, h, min, max]) => {
            pass.set_viewport(*x, *y, *w, *h, *min, *max)
        }
        Command::SetStencilReference(r) => pass.set_stencil_reference(*r),
        Command::Draw {
            vertices,
            instances,
        } => pass.draw(vertices.clone(), instances.clone()),
        Command::DrawIndexed {
            indices,
            base_vertex,
            instances,
        } => pass.draw_indexed(indices.clone(), *base_vertex, instances.clone()),
        Command::DrawIndirect { buffer, offset } => {
            pass.draw_indirect(objs.buffer(*buffer)?, *offset)
        }
        Command::DrawIndexedIndirect { buffer, offset } => {
            pass.draw_indexed_indirect(objs.buffer(*buffer)?, *offset)
        }
        Command::MultiDrawIndirect {
            buffer,
            offset,
            count,
        } => pass.multi_draw_indirect(objs.buffer(*buffer)?, *offset, *count),
        Command::MultiDrawIndexedIndirect {
            buffer,
            offset,
            count,
        } => pass.multi_draw_indexed_indirect(objs.buffer(*buffer)?, *offset, *count),
        Command::InsertDebugMarker(s) => pass.insert_debug_marker(s),
        Command::PushDebugGroup(s) => pass.push_debug_group(s),
        Command::PopDebugGroup => pass.pop_debug_group(),
        other => {
            return Err(validation(format!(
                "{} inside a render pass",
                command_name(other)
            )))
        }
    }
    Ok(())
}

fn command_name(c: &Command) -> String {
    let s = format!("{c:?}");
    s.split([' ', '(', '{'])
        .next()
        .unwrap_or("command")
        .to_string()
}
