//! Encrypted volumes on devices that cannot encrypt in line: a request
//! goes through a ciphertext bounce buffer, encrypted from the guest's
//! buffers before a write and decrypted into them after a read; buffers
//! are kept for reuse.

use super::super::iovec::{copy_iov, sector_aligned};
use super::super::request::{self, Request, RequestKind};
use super::QueueWorker;
use crate::device::{AlignedBuf, IoOp};

/// The ciphertext side of a request on an encrypted volume.
#[derive(Debug)]
pub(super) struct Bounce {
    buf: AlignedBuf,
    guest: Vec<libc::iovec>,
    first_sector: u64,
}

/// Bounce buffers kept for reuse are at most this large.
const BOUNCE_KEEP_BYTES: usize = 1 << 20;

impl QueueWorker {
    /// For an encrypted volume: moves the guest iovecs aside and points
    /// the request at a bounce buffer, holding the ciphertext of a write.
    pub(super) fn encrypt_into_bounce(&mut self, op: IoOp, req: &Request) -> Bounce {
        let len = usize::try_from(req.len).expect("request length fits memory");
        let pos = self.bounce_pool.iter().position(|b| b.len() >= len);
        let mut buf = match pos {
            Some(i) => self.bounce_pool.swap_remove(i),
            None => AlignedBuf::new(len.max(4096), 4096),
        };
        let mut guest = self.iov_pool.pop().unwrap_or_default();
        guest.clear();
        guest.extend_from_slice(&self.iov);
        let first_sector = req.offset / request::SECTOR_BYTES;
        if let (IoOp::Write, Some(c)) = (op, &self.cipher) {
            let host = &mut buf.as_mut_slice()[..len];
            if sector_aligned(&guest) {
                // Encrypt straight from guest memory into the bounce buffer.
                let mut at = 0usize;
                for v in &guest {
                    let dst = &mut host[at..at + v.iov_len];
                    // SAFETY: the iovec was built by `push_iovecs` from a
                    // checked guest range kept mapped by the caller's
                    // memory snapshot; `dst` is our own buffer.
                    unsafe {
                        c.encrypt_from(
                            v.iov_base.cast::<u8>(),
                            dst,
                            first_sector + (at / 512) as u64,
                        )
                    };
                    at += v.iov_len;
                }
            } else {
                // SAFETY: as above.
                unsafe { copy_iov(&guest, host, true) };
                c.encrypt(host, first_sector);
            }
        }
        self.iov.clear();
        self.iov.push(libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        });
        Bounce {
            buf,
            guest,
            first_sector,
        }
    }

    /// Decrypts a completed read into the guest's buffers and recycles the
    /// bounce buffer.
    pub(super) fn finish_bounce(&mut self, b: Bounce, kind: RequestKind, len: u64, ok: bool) {
        let Bounce {
            mut buf,
            guest,
            first_sector,
        } = b;
        if let (true, RequestKind::Read, Some(c)) = (ok, kind, &self.cipher) {
            let len = usize::try_from(len).expect("request length fits memory");
            let host = &mut buf.as_mut_slice()[..len];
            if sector_aligned(&guest) {
                // Decrypt straight from the bounce buffer into the guest.
                let mut at = 0usize;
                for v in &guest {
                    let src = &mut host[at..at + v.iov_len];
                    // SAFETY: the iovec points into guest memory kept mapped
                    // by the in-flight request's snapshot, which the caller
                    // still holds; `src` is our own buffer.
                    unsafe {
                        c.decrypt_into(
                            src,
                            v.iov_base.cast::<u8>(),
                            first_sector + (at / 512) as u64,
                        )
                    };
                    at += v.iov_len;
                }
            } else {
                c.decrypt(host, first_sector);
                // SAFETY: as above.
                unsafe { copy_iov(&guest, host, false) };
            }
        }
        if buf.len() <= BOUNCE_KEEP_BYTES && self.bounce_pool.len() < self.slots.len() {
            self.bounce_pool.push(buf);
        }
        self.iov_pool.push(guest);
    }
}
