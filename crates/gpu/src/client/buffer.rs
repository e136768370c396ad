//! Remote buffers (with their mapping shadows) and textures.

use super::*;

/// Bytes of a mapping, shared by the buffer and the views into it. The
/// bytes are owned through a raw pointer (from `Box::into_raw`) so that views
/// can write through it without aliasing a live `Box`.
pub(crate) struct Shadow {
    pub(crate) ptr: NonNull<[u8]>,
}

// SAFETY: wgpu hands out views of a mapping only for non-overlapping
// ranges (its frontend tracks them), so no two threads touch the same byte
// through them; the buffer reads the whole shadow only in `unmap`, after the
// application has given its views back.
unsafe impl Sync for Shadow {}
// SAFETY: the shadow owns its bytes; see above for shared use.
unsafe impl Send for Shadow {}

impl Shadow {
    pub(crate) fn new(v: Vec<u8>) -> Self {
        let raw = Box::into_raw(v.into_boxed_slice());
        Self {
            ptr: NonNull::new(raw).expect("Box::into_raw is never null"),
        }
    }
    /// The bytes back as a box, for reuse by the next mapping.
    pub(crate) fn into_box(self) -> Box<[u8]> {
        let ptr = self.ptr.as_ptr();
        std::mem::forget(self);
        // SAFETY: the pointer came from `Box::into_raw`; `forget` keeps
        // `Drop` from freeing it, so ownership passes to the new box once.
        unsafe { Box::from_raw(ptr) }
    }
    pub(crate) fn base(&self) -> NonNull<u8> {
        self.ptr.cast()
    }
    pub(crate) fn len(&self) -> usize {
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
pub(crate) struct Mapping {
    pub(crate) range: Range<u64>,
    pub(crate) write: bool,
    pub(crate) shadow: Arc<Shadow>,
}

/// A buffer on the server, with the local copy of its mapped range.
#[derive(Debug)]
pub struct RBuffer {
    pub(crate) c: Arc<Conn>,
    pub(crate) id: Id,
    pub(crate) map: Arc<Mutex<Option<Mapping>>>,
    /// The bytes of the last read mapping, for the next one to land in.
    pub(crate) spare: Mutex<Option<Box<[u8]>>>,
}

impl Drop for RBuffer {
    fn drop(&mut self) {
        self.c.send(&Request::Drop { id: self.id }, &[]);
    }
}

/// A view into a mapping.
#[derive(Debug)]
pub struct RMapped {
    pub(crate) shadow: Arc<Shadow>,
    pub(crate) ptr: NonNull<u8>,
    pub(crate) len: usize,
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
    pub(crate) c: Arc<Conn>,
    pub(crate) id: Id,
    /// False for a surface's texture, which the surface owns.
    pub(crate) owned: bool,
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
