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
use crate::proto::{self, ErrorFilter, GpuError, Id, Message, Reply, Request};

mod requests;

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
