//! Files on memory filesystems (tmpfs, ramfs).
//!
//! There a request is a copy to or from the page cache that never waits
//! for a disk, yet io_uring cannot finish it in the submitting call (tmpfs
//! does not take non-blocking reads) and hands every one to a kernel
//! worker thread (`iou-wrk`): a thread switch each way per request, and
//! CPU on two threads for one copy. Measured on `softcard bench storage
//! --backing tmpfs-file`: three `iou-wrk` threads at about 22 % each
//! beside the queue thread. This queue copies in the queue's own thread
//! instead (`preadv`/`pwritev`), and the completion is ready at once, as
//! on the `ram` device.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use super::{DeviceQueue, IoCompletion, IoOp, IoRequest};

/// `f_type` of ramfs (linux/magic.h; not in the libc crate).
const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;

/// Whether `f` lives on a filesystem held in memory only.
pub(crate) fn on_memory_fs(f: &File) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes at most one statfs into the buffer we own.
    let r = unsafe { libc::fstatfs(f.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return false;
    }
    // SAFETY: fstatfs succeeded, so it filled the struct.
    let st = unsafe { st.assume_init() };
    matches!(st.f_type, libc::TMPFS_MAGIC | RAMFS_MAGIC)
}

/// A queue that performs each request in [`DeviceQueue::push`].
pub(crate) struct InlineQueue {
    file: Arc<File>,
    done: Vec<IoCompletion>,
}

impl fmt::Debug for InlineQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InlineQueue")
            .field("done", &self.done.len())
            .finish()
    }
}

impl InlineQueue {
    pub(crate) fn new(file: Arc<File>, depth: u16) -> Self {
        InlineQueue {
            file,
            done: Vec::with_capacity(usize::from(depth)),
        }
    }

    /// # Safety
    ///
    /// The segments must be valid for the access `op` makes.
    unsafe fn transfer(&self, req: &IoRequest<'_>) -> io::Result<u32> {
        let fd = self.file.as_raw_fd();
        let cnt = libc::c_int::try_from(req.segments.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let off = libc::off_t::try_from(req.offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            let n = match req.op {
                // SAFETY: the caller vouches for the segments; the iovec
                // array outlives the call.
                IoOp::Read => unsafe { libc::preadv(fd, req.segments.as_ptr(), cnt, off) },
                // SAFETY: as above.
                IoOp::Write => unsafe { libc::pwritev(fd, req.segments.as_ptr(), cnt, off) },
                _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // A regular file transfers all of a range inside its size.
            return match u32::try_from(n) {
                Ok(n) if u64::from(n) == req.len => Ok(n),
                _ => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "short transfer",
                )),
            };
        }
    }

    fn fallocate(fd: RawFd, offset: u64, len: u64) -> io::Result<u32> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // A punched hole reads back as zeroes: discard and write-zeroes.
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a descriptor we own, integer arguments.
        if unsafe { libc::fallocate(fd, mode, off, len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(0)
    }
}

impl DeviceQueue for InlineQueue {
    fn done_in_push(&self) -> bool {
        true
    }

    unsafe fn push(&mut self, req: IoRequest<'_>) {
        let result = match req.op {
            // SAFETY: the caller keeps the segments valid for this call.
            IoOp::Read | IoOp::Write => unsafe { self.transfer(&req) },
            IoOp::Flush => self.file.sync_data().map(|()| 0),
            IoOp::Discard | IoOp::WriteZeroes => {
                Self::fallocate(self.file.as_raw_fd(), req.offset, req.len)
            }
        };
        self.done.push(IoCompletion {
            tag: req.tag,
            result,
        });
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<IoCompletion>) {
        out.append(&mut self.done);
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn wait(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::test_iov::iov;

    fn run(q: &mut InlineQueue, op: IoOp, offset: u64, segs: &[libc::iovec]) -> IoCompletion {
        let len = segs.iter().map(|s| s.iov_len as u64).sum();
        run_len(q, op, offset, len, segs)
    }

    fn run_len(
        q: &mut InlineQueue,
        op: IoOp,
        offset: u64,
        len: u64,
        segs: &[libc::iovec],
    ) -> IoCompletion {
        // SAFETY: the segments point at live buffers of the caller.
        unsafe {
            q.push(IoRequest {
                op,
                offset,
                len,
                segments: segs,
                tag: 3,
                crypt: None,
            })
        };
        let mut out = Vec::new();
        q.reap(&mut out);
        assert_eq!(out.len(), 1, "completed in push");
        out.pop().unwrap()
    }

    #[test]
    fn requests_complete_in_push_with_their_results() {
        let f = tempfile::tempfile_in("/dev/shm").unwrap();
        f.set_len(1 << 20).unwrap();
        assert!(on_memory_fs(&f), "/dev/shm is tmpfs");
        assert!(!on_memory_fs(&File::open("/proc/self/stat").unwrap()));
        let mut q = InlineQueue::new(Arc::new(f), 8);
        let (mut a, mut b) = (vec![7u8; 4096], vec![9u8; 512]);
        let c = run(&mut q, IoOp::Write, 8192, &[iov(&mut a), iov(&mut b)]);
        assert_eq!((c.tag, c.result.unwrap()), (3, 4608));
        let mut back = vec![0u8; 4608];
        let c = run(&mut q, IoOp::Read, 8192, &[iov(&mut back)]);
        assert_eq!(c.result.unwrap(), 4608);
        assert_eq!(&back[..4096], &a[..]);
        assert_eq!(&back[4096..], &b[..]);
        assert_eq!(run(&mut q, IoOp::Flush, 0, &[]).result.unwrap(), 0);
        // Discard and write-zeroes punch a hole: it reads back as zeroes.
        assert!(run_len(&mut q, IoOp::Discard, 8192, 4096, &[])
            .result
            .is_ok());
        assert!(run_len(&mut q, IoOp::WriteZeroes, 12288, 512, &[])
            .result
            .is_ok());
        let c = run(&mut q, IoOp::Read, 8192, &[iov(&mut back)]);
        assert_eq!(c.result.unwrap(), 4608);
        assert!(back.iter().all(|&x| x == 0));
        // Past the end of the file: a short transfer is an error.
        let c = run(&mut q, IoOp::Read, (1 << 20) - 512, &[iov(&mut back)]);
        assert_eq!(c.result.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
