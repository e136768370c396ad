//! A session's server-side objects, by the ids its client chose.

use std::collections::HashMap;

use crate::proto::{ErrorFilter, GpuError, Id};

/// A server-side object of a session.
#[derive(Debug)]
pub(super) enum Obj {
    Buffer {
        buffer: wgpu::Buffer,
        bytes: u64,
        /// The range the server holds mapped for a client write mapping.
        mapped: Option<std::ops::Range<u64>>,
    },
    Texture {
        texture: wgpu::Texture,
        bytes: u64,
    },
    View(wgpu::TextureView),
    Sampler(wgpu::Sampler),
    Shader(wgpu::ShaderModule),
    BindGroupLayout(wgpu::BindGroupLayout),
    BindGroup(wgpu::BindGroup),
    PipelineLayout(wgpu::PipelineLayout),
    ComputePipeline(wgpu::ComputePipeline),
    RenderPipeline(wgpu::RenderPipeline),
    CommandBuffer(Option<wgpu::CommandBuffer>),
    /// Creation failed (quota, unknown ids); using it is an error.
    Invalid(&'static str),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::Buffer { .. } => "buffer",
            Obj::Texture { .. } => "texture",
            Obj::View(_) => "texture view",
            Obj::Sampler(_) => "sampler",
            Obj::Shader(_) => "shader module",
            Obj::BindGroupLayout(_) => "bind group layout",
            Obj::BindGroup(_) => "bind group",
            Obj::PipelineLayout(_) => "pipeline layout",
            Obj::ComputePipeline(_) => "compute pipeline",
            Obj::RenderPipeline(_) => "render pipeline",
            Obj::CommandBuffer(_) => "command buffer",
            Obj::Invalid(k) => k,
        }
    }
}

/// The ids of one session, looked up with the kind the caller expects.
#[derive(Debug, Default)]
pub(super) struct Objects(pub(super) HashMap<Id, Obj>);

macro_rules! getter {
    ($name:ident, $variant:ident, $ty:ty, $what:literal) => {
        pub(super) fn $name(&self, id: Id) -> Result<&$ty, GpuError> {
            match self.0.get(&id) {
                Some(Obj::$variant(x)) => Ok(x),
                other => Err(bad_id(id, $what, other)),
            }
        }
    };
}

pub(super) fn bad_id(id: Id, want: &str, got: Option<&Obj>) -> GpuError {
    let description = match got {
        None => format!("{want} {id} does not exist in this session"),
        Some(Obj::Invalid(_)) => format!("{want} {id} is invalid (its creation failed)"),
        Some(o) => format!("id {id} is a {}, not a {want}", o.kind()),
    };
    validation(description)
}

pub(super) fn validation(description: String) -> GpuError {
    GpuError {
        kind: ErrorFilter::Validation,
        description,
    }
}

impl Objects {
    pub(super) fn buffer(&self, id: Id) -> Result<&wgpu::Buffer, GpuError> {
        match self.0.get(&id) {
            Some(Obj::Buffer { buffer, .. }) => Ok(buffer),
            other => Err(bad_id(id, "buffer", other)),
        }
    }
    pub(super) fn texture(&self, id: Id) -> Result<&wgpu::Texture, GpuError> {
        match self.0.get(&id) {
            Some(Obj::Texture { texture, .. }) => Ok(texture),
            other => Err(bad_id(id, "texture", other)),
        }
    }
    getter!(view, View, wgpu::TextureView, "texture view");
    getter!(sampler, Sampler, wgpu::Sampler, "sampler");
    getter!(shader, Shader, wgpu::ShaderModule, "shader module");
    getter!(
        bind_group_layout,
        BindGroupLayout,
        wgpu::BindGroupLayout,
        "bind group layout"
    );
    getter!(bind_group, BindGroup, wgpu::BindGroup, "bind group");
    getter!(
        pipeline_layout,
        PipelineLayout,
        wgpu::PipelineLayout,
        "pipeline layout"
    );
    getter!(
        compute_pipeline,
        ComputePipeline,
        wgpu::ComputePipeline,
        "compute pipeline"
    );
    getter!(
        render_pipeline,
        RenderPipeline,
        wgpu::RenderPipeline,
        "render pipeline"
    );
}
