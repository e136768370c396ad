//! Guest segments as host iovecs, and copies between them and host
//! buffers.

use vm_memory::GuestMemoryBackend;

use super::hot_mem::HotMem;

use super::request::{RequestError, Segment};
use crate::device::MAX_SEGMENTS;

/// Whether every buffer holds whole sectors (so each can be encrypted or
/// decrypted on its own).
pub(super) fn sector_aligned(iov: &[libc::iovec]) -> bool {
    iov.iter().all(|v| v.iov_len.is_multiple_of(512))
}

/// Copies between guest buffers and a contiguous host buffer.
///
/// # Safety
///
/// Every iovec must point to `iov_len` bytes of mapped guest memory that
/// stays mapped for the call, and `host` must not overlap them.
pub(super) unsafe fn copy_iov(guest: &[libc::iovec], host: &mut [u8], to_host: bool) {
    let mut at = 0usize;
    for v in guest {
        let n = v.iov_len.min(host.len() - at);
        // SAFETY: per the contract above; `at + n <= host.len()`. Guest
        // memory is only ever copied as bytes, never referenced.
        unsafe {
            if to_host {
                std::ptr::copy_nonoverlapping(
                    v.iov_base.cast::<u8>(),
                    host.as_mut_ptr().add(at),
                    n,
                );
            } else {
                std::ptr::copy_nonoverlapping(host.as_ptr().add(at), v.iov_base.cast::<u8>(), n);
            }
        }
        at += n;
    }
}

/// Appends the host iovecs of one guest segment: one when the segment lies
/// in a single memory region (the common case, without building slice
/// iterators), several when it spans regions.
pub(super) fn push_iovecs(
    iov: &mut Vec<libc::iovec>,
    mem: &HotMem<'_>,
    s: Segment,
) -> Result<(), RequestError> {
    let len = s.len as usize;
    if let Some(host) = mem.in_one_region(s.addr, len) {
        if iov.len() == MAX_SEGMENTS {
            return Err(RequestError::TooLong);
        }
        iov.push(libc::iovec {
            iov_base: host.cast(),
            iov_len: len,
        });
        return Ok(());
    }
    for slice in GuestMemoryBackend::get_slices(mem, s.addr, len) {
        let slice = slice.map_err(|_| RequestError::BadAddress)?;
        if iov.len() == MAX_SEGMENTS {
            return Err(RequestError::TooLong);
        }
        iov.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
    }
    Ok(())
}
