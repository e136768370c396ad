//! Files and block devices, driven through io_uring.
//!
//! The device is opened twice: with `O_DIRECT` for requests whose offset,
//! length and buffers meet the device's direct-I/O alignment (the normal
//! case for a guest kernel), and buffered for the rest. Linux keeps the two
//! coherent: a direct read writes back dirty cached pages of its range
//! first, and a direct write invalidates them. Where the filesystem refuses
//! `O_DIRECT` (tmpfs on older kernels), every request goes buffered and a
//! flush is an `fdatasync`, which is what makes it durable. On tmpfs and
//! ramfs the queues copy in their own thread instead ([`super::memfs`]).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    AlignedBuf, DeviceError, DeviceKind, DeviceQueue, IoCompletion, IoOp, IoRequest,
    PhysicalDevice, MAX_SEGMENTS,
};

/// A file or block device.
#[derive(Debug)]
pub struct FileDevice {
    name: String,
    kind: DeviceKind,
    path: String,
    capacity: u64,
    /// `O_DIRECT` descriptor, when the filesystem allows it.
    direct: Option<Arc<File>>,
    /// Buffered descriptor.
    buffered: Arc<File>,
    /// Direct-I/O alignment in bytes (offset, length and memory).
    align: usize,
    /// On tmpfs or ramfs: requests are copies done in the queue's thread
    /// ([`super::memfs`]).
    in_memory: bool,
}

impl FileDevice {
    /// Opens (creating a sparse file of `create_size` bytes when a `file`
    /// device's path does not exist yet).
    pub fn open(
        name: &str,
        kind: DeviceKind,
        path: &Path,
        create_size: Option<u64>,
    ) -> Result<Self, DeviceError> {
        let io_err = |op: &'static str, source: io::Error| DeviceError::Io {
            name: name.to_owned(),
            op,
            path: path.display().to_string(),
            source,
        };
        let exists = path.exists();
        if !exists {
            match (kind, create_size) {
                (DeviceKind::File, Some(size)) => {
                    let f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(path)
                        .map_err(|e| io_err("create", e))?;
                    f.set_len(size).map_err(|e| io_err("set size of", e))?;
                }
                _ => {
                    return Err(io_err(
                        "open",
                        io::Error::new(io::ErrorKind::NotFound, "no such file or device"),
                    ))
                }
            }
        }
        let meta = std::fs::metadata(path).map_err(|e| io_err("stat", e))?;
        let ft = meta.file_type();
        match kind {
            DeviceKind::Block if !ft.is_block_device() => {
                return Err(DeviceError::Config {
                    name: name.into(),
                    reason: format!("{} is not a block device", path.display()),
                })
            }
            DeviceKind::File if !ft.is_file() => {
                return Err(DeviceError::Config {
                    name: name.into(),
                    reason: format!("{} is not a regular file", path.display()),
                })
            }
            _ => {}
        }
        let mut buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err("open", e))?;
        let capacity = buffered
            .seek(SeekFrom::End(0))
            .map_err(|e| io_err("size", e))?;
        if capacity == 0 {
            return Err(DeviceError::Config {
                name: name.into(),
                reason: format!("{} has zero size", path.display()),
            });
        }
        let direct = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => Some(f),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "device {name}: {} does not support O_DIRECT; using buffered I/O, flush = fdatasync",
                    path.display()
                );
                None
            }
            Err(e) => return Err(io_err("open O_DIRECT", e)),
        };
        let align = match &direct {
            Some(f) => probe_alignment(f),
            None => 1,
        };
        lock_waiting(name, path, direct.as_ref().unwrap_or(&buffered)).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
                DeviceError::Config {
                    name: name.into(),
                    reason: format!(
                        "{} is in use by another process (it held the lock for {} s: it \
                         serves the device, or I/O it submitted has not finished)",
                        path.display(),
                        LOCK_WAIT.as_secs()
                    ),
                }
            } else {
                io_err("lock", e)
            }
        })?;
        let in_memory = kind == DeviceKind::File && super::memfs::on_memory_fs(&buffered);
        Ok(FileDevice {
            name: name.to_owned(),
            in_memory,
            kind,
            path: path.display().to_string(),
            capacity,
            direct: direct.map(Arc::new),
            buffered: Arc::new(buffered),
            align,
        })
    }
}

/// How long opening a device waits for another process's lock: a card
/// restarted after a crash opens its devices once its predecessor's last
/// I/O has landed, which takes milliseconds, not seconds.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// [`lock`], retried for [`LOCK_WAIT`] while another process holds it.
fn lock_waiting(name: &str, path: &Path, f: &File) -> io::Result<()> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut said = false;
    loop {
        match lock(f) {
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES))
                    && std::time::Instant::now() < deadline =>
            {
                if !said {
                    log::warn!(
                        "device {name}: {} is locked by another process; waiting up to {} s",
                        path.display(),
                        LOCK_WAIT.as_secs()
                    );
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

/// Takes a write lock on the whole file through `f`'s open file
/// description (an OFD lock). It is released only when the last reference
/// to that description goes: when the process has exited and no I/O it
/// submitted through `f` (io_uring holds the file while a request is in
/// flight) can still land. Another process (or a second device naming the
/// same file) cannot take it meanwhile, so two processes never serve one
/// device's volumes at once.
fn lock(f: &File) -> io::Result<()> {
    // SAFETY: a zeroed flock is valid; the fields are set below.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = libc::F_WRLCK as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start = 0, l_len = 0: the whole file, however it grows.
    // SAFETY: a valid descriptor and a valid flock for the call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &raw mut l) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Smallest of 512 and 4096 that a direct read at offset 0 accepts.
fn probe_alignment(f: &File) -> usize {
    for align in [512usize, 4096] {
        let mut buf = AlignedBuf::new(align, 4096);
        match f.read_at(&mut buf.as_mut_slice()[..align], 0) {
            Ok(_) => return align,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(_) => return 4096,
        }
    }
    4096
}

impl PhysicalDevice for FileDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> DeviceKind {
        self.kind
    }
    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }
    fn describe(&self) -> String {
        if self.in_memory {
            return format!(
                "{}: memory filesystem, copied in the queue's thread",
                self.path
            );
        }
        match self.direct {
            Some(_) => format!(
                "{}: io_uring, O_DIRECT (alignment {} B)",
                self.path, self.align
            ),
            None => format!("{}: io_uring, buffered (no O_DIRECT here)", self.path),
        }
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(f) if is_aligned(offset, buf.len(), self.align) => {
                let mut b = AlignedBuf::new(buf.len(), self.align.max(4096));
                f.read_exact_at(&mut b.as_mut_slice()[..buf.len()], offset)?;
                buf.copy_from_slice(&b.as_slice()[..buf.len()]);
                Ok(())
            }
            _ => self.buffered.read_exact_at(buf, offset),
        }
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(f) if is_aligned(offset, buf.len(), self.align) => {
                let mut b = AlignedBuf::new(buf.len(), self.align.max(4096));
                b.as_mut_slice()[..buf.len()].copy_from_slice(buf);
                f.write_all_at(&b.as_slice()[..buf.len()], offset)
            }
            _ => self.buffered.write_all_at(buf, offset),
        }
    }
    fn sync(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }
    fn open_queue(&self, depth: u16) -> io::Result<Box<dyn DeviceQueue>> {
        if self.in_memory {
            return Ok(Box::new(super::memfs::InlineQueue::new(
                self.buffered.clone(),
                depth,
            )));
        }
        Ok(Box::new(FileQueue::new(self, depth)?))
    }
}

fn is_aligned(offset: u64, len: usize, align: usize) -> bool {
    offset.is_multiple_of(align as u64) && len.is_multiple_of(align)
}

/// Per-request storage that must outlive the submission: io_uring reads
/// the iovec array when it issues the request.
#[derive(Debug)]
struct Slot {
    iov: Vec<libc::iovec>,
    expect: u64,
}

// SAFETY: the iovecs are plain addresses handed to the kernel; the slot
// never dereferences them.
unsafe impl Send for Slot {}

/// One io_uring instance per queue worker.
struct FileQueue {
    direct: Option<Arc<File>>,
    buffered: Arc<File>,
    align: usize,
    block: bool,
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Slot>,
    queued: usize,
}

impl fmt::Debug for FileQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileQueue")
            .field("slots", &self.slots.len())
            .field("queued", &self.queued)
            .finish()
    }
}

impl FileQueue {
    fn new(dev: &FileDevice, depth: u16) -> io::Result<Self> {
        // The ring holds every request a full virtqueue can have in flight.
        let entries = u32::from(depth.max(1)).next_power_of_two();
        let ring = IoUring::new(entries)?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let slots = (0..depth)
            .map(|_| Slot {
                iov: Vec::with_capacity(MAX_SEGMENTS),
                expect: 0,
            })
            .collect();
        Ok(FileQueue {
            direct: dev.direct.clone(),
            buffered: dev.buffered.clone(),
            align: dev.align,
            block: dev.kind == DeviceKind::Block,
            ring,
            eventfd,
            slots,
            queued: 0,
        })
    }

    fn fd_for(&self, req: &IoRequest<'_>) -> RawFd {
        if let Some(direct) = &self.direct {
            let a = self.align;
            let aligned = is_aligned(req.offset, usize::try_from(req.len).unwrap_or(1), a)
                && req
                    .segments
                    .iter()
                    .all(|s| (s.iov_base as usize).is_multiple_of(a) && s.iov_len % a == 0);
            if aligned {
                return direct.as_raw_fd();
            }
        }
        self.buffered.as_raw_fd()
    }
}

impl DeviceQueue for FileQueue {
    unsafe fn push(&mut self, req: IoRequest<'_>) {
        let tag = usize::from(req.tag);
        assert!(tag < self.slots.len(), "tag beyond queue depth");
        assert!(req.segments.len() <= MAX_SEGMENTS, "too many segments");
        let fd = types::Fd(self.fd_for(&req));
        let slot = &mut self.slots[tag];
        slot.iov.clear();
        slot.iov.extend_from_slice(req.segments);
        slot.expect = match req.op {
            IoOp::Read | IoOp::Write => req.len,
            _ => 0,
        };
        // At most MAX_SEGMENTS iovecs: fits u32.
        let iovcnt = slot.iov.len() as u32;
        let entry = match req.op {
            IoOp::Read => opcode::Readv::new(fd, slot.iov.as_ptr(), iovcnt)
                .offset(req.offset)
                .build(),
            IoOp::Write => opcode::Writev::new(fd, slot.iov.as_ptr(), iovcnt)
                .offset(req.offset)
                .build(),
            IoOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoOp::Discard | IoOp::WriteZeroes => {
                let mode = if req.op == IoOp::WriteZeroes && self.block {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    // On a file a punched hole reads back as zeroes, which
                    // serves both discard and write-zeroes.
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(fd, req.len)
                    .offset(req.offset)
                    .mode(mode)
                    .build()
            }
        }
        .user_data(u64::from(req.tag));
        let entry: squeue::Entry = entry;
        loop {
            // SAFETY: the iovec array lives in `self.slots[tag]` until the
            // completion for `tag` is reaped, and the caller promises the
            // buffers it points to stay valid as long.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // Submission queue full: hand the batch to the kernel.
            if let Err(e) = self.ring.submit() {
                log::error!("io_uring submit failed: {e}");
            }
        }
        self.queued += 1;
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.queued > 0 {
            self.ring.submit()?;
            self.queued = 0;
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<IoCompletion>) {
        // Reset the eventfd before draining so that a completion posted
        // after the drain raises it again.
        let _ = self.eventfd.read();
        for cqe in self.ring.completion() {
            let Ok(tag) = u16::try_from(cqe.user_data()) else {
                continue;
            };
            let res = cqe.result();
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                let expect = self.slots.get(usize::from(tag)).map_or(0, |s| s.expect);
                let got = res.unsigned_abs();
                if expect != 0 && u64::from(got) != expect {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "short transfer",
                    ))
                } else {
                    Ok(got)
                }
            };
            out.push(IoCompletion { tag, result });
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.eventfd.as_raw_fd())
    }

    fn wait(&mut self) -> io::Result<()> {
        self.queued = 0;
        self.ring.submit_and_wait(1).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::test_iov::iov;

    fn reap_all(q: &mut Box<dyn DeviceQueue>, n: usize) -> Vec<IoCompletion> {
        let mut out = Vec::new();
        q.submit().unwrap();
        while out.len() < n {
            q.reap(&mut out);
            if out.len() < n {
                q.wait().unwrap();
            }
        }
        out
    }

    #[test]
    fn a_device_is_served_by_one_opener_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let first = FileDevice::open("d", DeviceKind::File, &path, Some(1 << 20)).unwrap();
        let e = FileDevice::open("d2", DeviceKind::File, &path, None).unwrap_err();
        assert!(e.to_string().contains("in use by another process"), "{e}");
        // Another process sees it too: a POSIX record lock (Python's
        // lockf) conflicts with the OFD lock.
        let other = |p: &Path| {
            std::process::Command::new("python3")
                .args([
                    "-c",
                    "import fcntl,sys; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB)",
                ])
                .arg(p)
                .output()
                .unwrap()
        };
        let o = other(&path);
        assert!(!o.status.success(), "another process took the lock");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("Resource temporarily unavailable"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        drop(first);
        // A process that holds the lock briefly (a predecessor finishing
        // its I/O) is waited for.
        let mut holder = std::process::Command::new("python3")
            .args([
                "-c",
                "import fcntl,sys,time; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(0.3)",
            ])
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "held\n");
        let waited = FileDevice::open("d4", DeviceKind::File, &path, None);
        assert!(holder.wait().unwrap().success());
        drop(waited.expect("the lock, once the holder exited"));
        // Released with the last reference to the description.
        assert!(other(&path).status.success());
        FileDevice::open("d3", DeviceKind::File, &path, None).unwrap();
    }

    #[test]
    fn creates_sparse_file_and_round_trips_aligned_and_unaligned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let dev = FileDevice::open("d", DeviceKind::File, &path, Some(8 << 20)).unwrap();
        assert_eq!(dev.capacity_bytes(), 8 << 20);
        let mut q = dev.open_queue(8).unwrap();

        let mut w = AlignedBuf::new(8192, 4096);
        w.as_mut_slice().fill(0x5a);
        // An unaligned buffer takes the buffered path.
        let mut odd = vec![0u8; 1001];
        odd.fill(0x17);
        let segs_w = [iov(w.as_mut_slice())];
        let segs_odd = [iov(&mut odd)];
        // SAFETY: buffers outlive the completions reaped below.
        unsafe {
            q.push(IoRequest {
                op: IoOp::Write,
                offset: 1 << 20,
                len: 8192,
                segments: &segs_w,
                tag: 0,
                crypt: None,
            });
            q.push(IoRequest {
                op: IoOp::Write,
                offset: (2 << 20) + 3,
                len: 1001,
                segments: &segs_odd,
                tag: 1,
                crypt: None,
            });
        }
        let done = reap_all(&mut q, 2);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");

        let mut r = AlignedBuf::new(8192, 4096);
        let segs_r = [iov(r.as_mut_slice())];
        // SAFETY: as above.
        unsafe {
            q.push(IoRequest {
                op: IoOp::Read,
                offset: 1 << 20,
                len: 8192,
                segments: &segs_r,
                tag: 2,
                crypt: None,
            });
            q.push(IoRequest {
                op: IoOp::Flush,
                offset: 0,
                len: 0,
                segments: &[],
                tag: 3,
                crypt: None,
            });
        }
        let done = reap_all(&mut q, 2);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        assert!(r.as_slice().iter().all(|&b| b == 0x5a));

        let mut raw = vec![0u8; 1001];
        dev.read_exact_at(&mut raw, (2 << 20) + 3).unwrap();
        assert_eq!(raw, odd);

        // SAFETY: no segments.
        unsafe {
            q.push(IoRequest {
                op: IoOp::WriteZeroes,
                offset: 1 << 20,
                len: 4096,
                segments: &[],
                tag: 4,
                crypt: None,
            });
        }
        let done = reap_all(&mut q, 1);
        assert!(done[0].result.is_ok(), "{done:?}");
        let mut raw = vec![1u8; 8192];
        dev.read_exact_at(&mut raw, 1 << 20).unwrap();
        assert!(raw[..4096].iter().all(|&b| b == 0));
        assert!(raw[4096..].iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn missing_file_without_size_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileDevice::open("d", DeviceKind::File, &dir.path().join("x"), None).unwrap_err();
        assert!(err.to_string().contains("no such file"), "{err}");
    }
}
