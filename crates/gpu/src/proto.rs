//! The vGPU wire protocol.
//!
//! One TCP stream per session. Every frame is
//! `[u32 header_len LE][u32 payload_len LE][header][payload]`: the header is
//! a postcard-encoded [`Request`] (client to server) or [`Message`] (server
//! to client); the payload carries bulk bytes (buffer and texture uploads,
//! readbacks, frames) so that they are never re-encoded.
//!
//! Object ids are chosen by the client, so creation calls need no reply and
//! are pipelined; only the requests documented as answered produce a
//! [`Message::Reply`], matched to its request by sequence number (the
//! position of the request in the stream, from 0).

use std::io::{self, Read, Write};
use std::num::{NonZeroU32, NonZeroU64};
use std::ops::Range;

use serde::{Deserialize, Serialize};
use wgpu::wgt;

/// Protocol version; a server refuses any other (3: the hello carries a
/// credential).
pub const VERSION: u32 = 3;
/// Largest header a peer may send.
pub const MAX_HEADER: usize = 16 << 20;
/// Largest payload a peer may send (one upload or readback).
pub const MAX_PAYLOAD: usize = 1 << 30;

/// A client-chosen object id; 0 is never valid.
pub type Id = u64;

/// Label of an object, as the application gave it.
pub type Label = Option<String>;

/// A request from the client. Those marked *answered* get one
/// [`Message::Reply`]; all others are fire-and-forget.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// First request of a session. *Answered* with [`Reply::Hello`]. A
    /// server that admits only credentialed sessions (a region's GPU
    /// server) refuses one without a valid `credential`.
    Hello {
        version: u32,
        credential: Option<String>,
    },
    /// *Answered* with [`Reply::Adapter`].
    RequestAdapter,
    /// *Answered* with [`Reply::FormatFeatures`].
    FormatFeatures {
        format: wgt::TextureFormat,
    },
    /// *Answered* with [`Reply::Device`].
    RequestDevice {
        label: Label,
        features: wgt::Features,
        limits: wgt::Limits,
    },
    CreateBuffer {
        id: Id,
        desc: wgt::BufferDescriptor<Label>,
    },
    CreateTexture {
        id: Id,
        desc: wgt::TextureDescriptor<Label, Vec<wgt::TextureFormat>>,
    },
    CreateView {
        id: Id,
        texture: Id,
        desc: wgt::TextureViewDescriptor<Label>,
    },
    CreateSampler {
        id: Id,
        desc: wgt::SamplerDescriptor<Label>,
    },
    CreateShaderModule {
        id: Id,
        label: Label,
        wgsl: String,
    },
    CreateBindGroupLayout {
        id: Id,
        label: Label,
        entries: Vec<wgt::BindGroupLayoutEntry>,
    },
    CreateBindGroup {
        id: Id,
        label: Label,
        layout: Id,
        entries: Vec<BindGroupEntry>,
    },
    CreatePipelineLayout {
        id: Id,
        label: Label,
        bind_group_layouts: Vec<Option<Id>>,
        immediate_size: u32,
    },
    CreateComputePipeline {
        id: Id,
        label: Label,
        layout: Option<Id>,
        stage: Stage,
    },
    CreateRenderPipeline {
        id: Id,
        desc: Box<RenderPipelineDesc>,
    },
    /// The pipeline's implicit layout for group `index`, named `id`.
    PipelineBindGroupLayout {
        pipeline: Id,
        index: u32,
        id: Id,
    },
    /// A recorded command encoder, finished into command buffer `id`.
    CommandBuffer {
        id: Id,
        label: Label,
        commands: Vec<Command>,
    },
    /// Payload: the bytes.
    WriteBuffer {
        buffer: Id,
        offset: u64,
    },
    /// Payload: the texel data.
    WriteTexture {
        texture: TextureCopy,
        layout: wgt::TexelCopyBufferLayout,
        size: wgt::Extent3d,
    },
    Submit {
        command_buffers: Vec<Id>,
    },
    /// *Answered* with [`Reply::Mapped`], whose payload is the range's
    /// current contents.
    MapAsync {
        buffer: Id,
        write: bool,
        range: Range<u64>,
    },
    /// Ends a mapping. Payload: for a write mapping (or mapped at creation),
    /// the new contents of `range`; empty for a read mapping.
    Unmap {
        buffer: Id,
        range: Range<u64>,
    },
    /// *Answered* with [`Reply::Polled`] once all submitted work is done.
    Poll,
    PushErrorScope {
        filter: ErrorFilter,
    },
    /// *Answered* with [`Reply::ErrorScope`].
    PopErrorScope,
    /// *Answered* with [`Reply::CompilationInfo`].
    CompilationInfo {
        module: Id,
    },
    /// `destroy()` on a buffer, texture or query set.
    Destroy {
        id: Id,
    },
    /// The client dropped its last handle to `id`.
    Drop {
        id: Id,
    },
    /// Make texture `texture` the remote surface's current frame.
    Present {
        texture: Id,
    },
    /// The session's memory use and quota. *Answered* with [`Reply::Usage`].
    Usage,
}

/// A bind group entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BindGroupEntry {
    pub binding: u32,
    pub resource: Resource,
}

/// What a bind group entry binds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Resource {
    Buffer(BufferBinding),
    BufferArray(Vec<BufferBinding>),
    Sampler(Id),
    SamplerArray(Vec<Id>),
    TextureView(Id),
    TextureViewArray(Vec<Id>),
}

/// A range of a buffer bound to a shader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BufferBinding {
    pub buffer: Id,
    pub offset: u64,
    pub size: Option<NonZeroU64>,
}

/// A shader stage of a pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    pub module: Id,
    pub entry_point: Option<String>,
    pub constants: Vec<(String, f64)>,
    pub zero_initialize_workgroup_memory: bool,
}

/// A vertex buffer layout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VertexBufferLayout {
    pub array_stride: u64,
    pub step_mode: wgt::VertexStepMode,
    pub attributes: Vec<wgt::VertexAttribute>,
}

/// A render pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenderPipelineDesc {
    pub label: Label,
    pub layout: Option<Id>,
    pub vertex: Stage,
    pub buffers: Vec<Option<VertexBufferLayout>>,
    pub primitive: wgt::PrimitiveState,
    pub depth_stencil: Option<wgt::DepthStencilState>,
    pub multisample: wgt::MultisampleState,
    pub fragment: Option<(Stage, Vec<Option<wgt::ColorTargetState>>)>,
    pub multiview_mask: Option<NonZeroU32>,
}

/// One side of a texture copy.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TextureCopy {
    pub texture: Id,
    pub mip_level: u32,
    pub origin: wgt::Origin3d,
    pub aspect: wgt::TextureAspect,
}

/// One side of a buffer/texture copy.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BufferCopy {
    pub buffer: Id,
    pub layout: wgt::TexelCopyBufferLayout,
}

/// A color attachment of a render pass.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ColorAttachment {
    pub view: Id,
    pub depth_slice: Option<u32>,
    pub resolve_target: Option<Id>,
    pub load: LoadOp<wgt::Color>,
    pub store: bool,
}

/// Load operation of an attachment.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum LoadOp<V> {
    Clear(V),
    Load,
}

/// Load and store of one aspect of a depth/stencil attachment.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Ops<V> {
    pub load: LoadOp<V>,
    pub store: bool,
}

/// The depth/stencil attachment of a render pass.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DepthAttachment {
    pub view: Id,
    pub depth: Option<Ops<f32>>,
    pub stencil: Option<Ops<u32>>,
}

/// A command recorded in a command encoder, replayed by the server in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    CopyBufferToBuffer {
        src: Id,
        src_offset: u64,
        dst: Id,
        dst_offset: u64,
        size: Option<u64>,
    },
    CopyBufferToTexture {
        src: BufferCopy,
        dst: TextureCopy,
        size: wgt::Extent3d,
    },
    CopyTextureToBuffer {
        src: TextureCopy,
        dst: BufferCopy,
        size: wgt::Extent3d,
    },
    CopyTextureToTexture {
        src: TextureCopy,
        dst: TextureCopy,
        size: wgt::Extent3d,
    },
    ClearBuffer {
        buffer: Id,
        offset: u64,
        size: Option<u64>,
    },
    ClearTexture {
        texture: Id,
        range: wgt::ImageSubresourceRange,
    },
    InsertDebugMarker(String),
    PushDebugGroup(String),
    PopDebugGroup,
    BeginComputePass {
        label: Label,
    },
    BeginRenderPass {
        label: Label,
        color: Vec<Option<ColorAttachment>>,
        depth: Option<DepthAttachment>,
        multiview_mask: Option<NonZeroU32>,
    },
    /// Ends the open compute or render pass.
    EndPass,
    SetComputePipeline(Id),
    SetRenderPipeline(Id),
    SetBindGroup {
        index: u32,
        group: Option<Id>,
        offsets: Vec<u32>,
    },
    SetImmediates {
        offset: u32,
        data: Vec<u8>,
    },
    Dispatch([u32; 3]),
    DispatchIndirect {
        buffer: Id,
        offset: u64,
    },
    SetVertexBuffer {
        slot: u32,
        buffer: Option<Id>,
        offset: u64,
        size: Option<NonZeroU64>,
    },
    SetIndexBuffer {
        buffer: Id,
        format: wgt::IndexFormat,
        offset: u64,
        size: Option<NonZeroU64>,
    },
    SetBlendConstant(wgt::Color),
    SetScissorRect([u32; 4]),
    SetViewport([f32; 6]),
    SetStencilReference(u32),
    Draw {
        vertices: Range<u32>,
        instances: Range<u32>,
    },
    DrawIndexed {
        indices: Range<u32>,
        base_vertex: i32,
        instances: Range<u32>,
    },
    DrawIndirect {
        buffer: Id,
        offset: u64,
    },
    DrawIndexedIndirect {
        buffer: Id,
        offset: u64,
    },
    MultiDrawIndirect {
        buffer: Id,
        offset: u64,
        count: u32,
    },
    MultiDrawIndexedIndirect {
        buffer: Id,
        offset: u64,
        count: u32,
    },
}

/// Which errors an error scope catches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorFilter {
    Validation,
    OutOfMemory,
    Internal,
}

/// An error the server's device (or the session's quota) raised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuError {
    pub kind: ErrorFilter,
    pub description: String,
}

/// A shader compiler message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShaderMessage {
    pub message: String,
    pub error: bool,
    /// Byte offset and length in the source, when known.
    pub location: Option<(u32, u32)>,
}

/// What the server sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Message {
    /// The answer to request number `seq`.
    Reply { seq: u64, reply: Reply },
    /// An error no error scope caught.
    Uncaptured(GpuError),
    /// The session is over (protocol violation or server shutdown).
    Lost(String),
}

/// Answers to the *answered* requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Hello {
        version: u32,
        session: u64,
        quota: u64,
        /// The secret that names this session's frames on the viewer
        /// (`/?s=TOKEN`); only who holds it sees them.
        viewer_token: String,
    },
    Adapter(Option<Box<AdapterDesc>>),
    FormatFeatures(wgt::TextureFormatFeatures),
    Device(Result<(), String>),
    /// Payload: the mapped range's contents when `Ok`.
    Mapped(Result<(), String>),
    Polled,
    ErrorScope(Option<GpuError>),
    CompilationInfo(Vec<ShaderMessage>),
    Usage {
        used: u64,
        quota: u64,
        objects: u64,
    },
}

/// The physical adapter behind a session, as the client reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterDesc {
    pub info: wgt::AdapterInfo,
    pub features: wgt::Features,
    pub limits: wgt::Limits,
    pub downlevel: wgt::DownlevelCapabilities,
}

/// Protocol errors.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("frame too large: header {header} bytes, payload {payload} bytes")]
    TooLarge { header: usize, payload: usize },
    #[error("malformed message: {0}")]
    Decode(#[from] postcard::Error),
}

/// Sizes a connection's socket buffers for bulk transfers, so that a 4 MiB
/// upload or readback moves in a few large copies rather than many small
/// wake-ups. Failure only costs speed.
pub fn tune_socket(s: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 8 << 20;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: a valid socket descriptor, and a pointer to a c_int with
        // its exact length, as setsockopt(2) expects.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            log::debug!("setsockopt({opt}): {}", std::io::Error::last_os_error());
        }
    }
    let _ = s.set_nodelay(true);
}

/// Writes one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T, payload: &[u8]) -> io::Result<()> {
    let header = postcard::to_stdvec(msg).map_err(io::Error::other)?;
    let hl = u32::try_from(header.len()).map_err(io::Error::other)?;
    let pl = u32::try_from(payload.len()).map_err(io::Error::other)?;
    let mut prefix = [0u8; 8];
    prefix[..4].copy_from_slice(&hl.to_le_bytes());
    prefix[4..].copy_from_slice(&pl.to_le_bytes());
    w.write_all(&prefix)?;
    w.write_all(&header)?;
    w.write_all(payload)
}

/// A frame's undecoded header and its payload.
pub type RawFrame = (Vec<u8>, Vec<u8>);

/// Reads one frame's raw header and payload. `Ok(None)` on a clean end of
/// stream before the frame starts.
pub fn read_raw<R: Read>(r: &mut R) -> Result<Option<RawFrame>, ProtoError> {
    match read_head(r)? {
        Some((header, pl)) => Ok(Some((header, read_payload(r, pl)?))),
        None => Ok(None),
    }
}

/// Reads a frame's prefix and header, leaving the payload (whose length is
/// returned) in the stream. `Ok(None)` on a clean end of stream.
pub fn read_head<R: Read>(r: &mut R) -> Result<Option<(Vec<u8>, usize)>, ProtoError> {
    let mut prefix = [0u8; 8];
    match r.read_exact(&mut prefix[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut prefix[1..])?;
    let hl = u32::from_le_bytes(prefix[..4].try_into().expect("4 bytes")) as usize;
    let pl = u32::from_le_bytes(prefix[4..].try_into().expect("4 bytes")) as usize;
    if hl > MAX_HEADER || pl > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge {
            header: hl,
            payload: pl,
        });
    }
    let mut header = vec![0u8; hl];
    r.read_exact(&mut header)?;
    Ok(Some((header, pl)))
}

/// Reads a payload of `len` bytes (at most [`MAX_PAYLOAD`]).
pub fn read_payload<R: Read>(r: &mut R, len: usize) -> Result<Vec<u8>, ProtoError> {
    // Up to 64 MiB is reserved at once (so a readback lands without
    // re-allocation); beyond that the buffer grows as the bytes arrive, so
    // a lying length costs the peer the bytes it claims.
    let mut payload = Vec::with_capacity(len.min(64 << 20));
    r.take(len as u64).read_to_end(&mut payload)?;
    if payload.len() != len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(payload)
}

/// Decodes a header.
pub fn decode<'a, T: Deserialize<'a>>(header: &'a [u8]) -> Result<T, ProtoError> {
    Ok(postcard::from_bytes(header)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let req = Request::CreateBuffer {
            id: 7,
            desc: wgt::BufferDescriptor {
                label: Some("b".into()),
                size: 1024,
                usage: wgt::BufferUsages::STORAGE | wgt::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            },
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &req, b"abc").unwrap();
        let (h, p) = read_raw(&mut &buf[..]).unwrap().unwrap();
        assert_eq!(p, b"abc");
        match decode::<Request>(&h).unwrap() {
            Request::CreateBuffer { id, desc } => {
                assert_eq!(id, 7);
                assert_eq!(desc.size, 1024);
                assert_eq!(
                    desc.usage,
                    wgt::BufferUsages::STORAGE | wgt::BufferUsages::COPY_SRC
                );
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&(u32::MAX).to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            read_raw(&mut &buf[..]),
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_payload_is_an_error() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Request::Poll, &[1, 2, 3, 4]).unwrap();
        buf.truncate(buf.len() - 2);
        assert!(read_raw(&mut &buf[..]).is_err());
    }
}
