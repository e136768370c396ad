//! The `null` and `ram` devices: memory-speed devices for tests and
//! benchmarks. Requests complete synchronously at push time.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use super::{Crypt, DeviceKind, DeviceQueue, IoCompletion, IoOp, IoRequest, PhysicalDevice};

/// Bytes at the start of a `null` device that keep what the control plane
/// writes there, so that its partition map lives as long as the daemon.
/// Covers the 2 MiB metadata area with room to spare.
const NULL_RETAINED_BYTES: u64 = 4 << 20;

fn check_range(capacity: u64, offset: u64, len: usize) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "access beyond the end of the device",
        )),
    }
}

/// Copies a write's data into a `ram` device. Whole cache lines go with
/// non-temporal stores: a random write lands where nothing is cached, and
/// ordinary stores would first read every line they fill (64 reads from
/// memory for a 4 KiB write) only to overwrite it.
///
/// # Safety
///
/// `src` and `dst` must be valid for `len` bytes and must not overlap.
unsafe fn copy_to_device(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if (dst as usize).is_multiple_of(64) && len.is_multiple_of(64) {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        let mut at = 0;
        while at < len {
            // SAFETY: `at + 64 <= len`; `dst + at` is 16-byte aligned (dst
            // is 64-byte aligned, `at` a multiple of 64); SSE2 is part of
            // x86_64.
            unsafe {
                for k in (0..64).step_by(16) {
                    let v = _mm_loadu_si128(src.add(at + k).cast::<__m128i>());
                    _mm_stream_si128(dst.add(at + k).cast::<__m128i>(), v);
                }
            }
            at += 64;
        }
        // The data is visible before whatever the caller stores next (the
        // completion the guest reads).
        // SAFETY: SSE is part of x86_64; a fence touches no memory.
        unsafe { _mm_sfence() };
        return;
    }
    // SAFETY: the caller's promise.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

fn total_len(segments: &[libc::iovec]) -> u64 {
    segments.iter().map(|s| s.iov_len as u64).sum()
}

/// Discards writes and reads zeroes.
#[derive(Debug)]
pub struct NullDevice {
    name: String,
    capacity: u64,
    retained: Mutex<Vec<u8>>,
    /// Reads of volume data zero-fill the buffer (false: leave it).
    read_zeroes: bool,
}

impl NullDevice {
    /// A null device of `capacity` bytes.
    pub fn new(name: &str, capacity: u64) -> Self {
        let retained = usize::try_from(capacity.min(NULL_RETAINED_BYTES)).unwrap_or(0);
        NullDevice {
            name: name.to_owned(),
            capacity,
            retained: Mutex::new(vec![0; retained]),
            read_zeroes: true,
        }
    }

    /// Whether reads of volume data zero-fill the reader's buffer (the
    /// default) or leave it untouched (benchmarks only, as SPDK's null
    /// bdev does). Encrypted volumes still read decrypted zeroes.
    pub fn reading_zeroes(mut self, yes: bool) -> Self {
        self.read_zeroes = yes;
        self
    }
}

impl PhysicalDevice for NullDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> DeviceKind {
        DeviceKind::Null
    }
    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }
    fn describe(&self) -> String {
        if self.read_zeroes {
            "null: writes discarded, reads return zeroes".into()
        } else {
            "null: writes discarded, reads leave the buffer untouched (benchmarks only)".into()
        }
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.capacity, offset, buf.len())?;
        buf.fill(0);
        let kept = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(start) = usize::try_from(offset) {
            if start < kept.len() {
                let n = buf.len().min(kept.len() - start);
                buf[..n].copy_from_slice(&kept[start..start + n]);
            }
        }
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.capacity, offset, buf.len())?;
        let mut kept = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(start) = usize::try_from(offset) {
            if start < kept.len() {
                let n = buf.len().min(kept.len() - start);
                kept[start..start + n].copy_from_slice(&buf[..n]);
            }
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn open_queue(&self, depth: u16) -> io::Result<Box<dyn DeviceQueue>> {
        Ok(Box::new(MemQueue::new(
            MemBacking::Null {
                zeroes: self.read_zeroes,
            },
            depth,
        )))
    }
}

/// Anonymous memory mapping backing a `ram` device.
struct RamMapping {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this struct; concurrent
// access goes through raw-pointer copies only (like guest memory in
// vm-memory), never through Rust references.
unsafe impl Send for RamMapping {}
// SAFETY: as above.
unsafe impl Sync for RamMapping {}

impl Drop for RamMapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` come from a successful mmap in `RamDevice::new`.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Anonymous memory as a device; contents are lost when the daemon stops.
pub struct RamDevice {
    name: String,
    map: Arc<RamMapping>,
}

impl fmt::Debug for RamDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamDevice")
            .field("name", &self.name)
            .field("capacity", &self.map.len)
            .finish()
    }
}

impl RamDevice {
    /// Maps and populates `capacity` bytes of anonymous memory: a ram
    /// device holds its memory from the start, so that first writes do not
    /// pay page faults and running out of memory shows at startup. The
    /// mapping is in transparent huge pages where the kernel can give them
    /// (`huge_map`): random 4 KiB requests over a large device then miss
    /// the TLB far less.
    pub fn new(name: &str, capacity: u64) -> io::Result<Self> {
        let len = usize::try_from(capacity)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ram size too large"))?;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ram size is zero",
            ));
        }
        let base = super::huge_map::map_populated(len)?;
        if let Some(huge) = super::huge_map::huge_bytes(base) {
            log::info!(
                "ram device {name}: {} of {} MiB in huge pages",
                huge.min(len as u64) >> 20,
                len >> 20
            );
        }
        Ok(RamDevice {
            name: name.to_owned(),
            map: Arc::new(RamMapping { base, len }),
        })
    }
}

impl PhysicalDevice for RamDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> DeviceKind {
        DeviceKind::Ram
    }
    fn capacity_bytes(&self) -> u64 {
        self.map.len as u64
    }
    fn describe(&self) -> String {
        "ram: anonymous memory, contents lost on stop".into()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.capacity_bytes(), offset, buf.len())?;
        // SAFETY: the range was checked to lie inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.base.add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.capacity_bytes(), offset, buf.len())?;
        // SAFETY: the range was checked to lie inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                buf.as_ptr(),
                self.map.base.add(offset as usize),
                buf.len(),
            );
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn open_queue(&self, depth: u16) -> io::Result<Box<dyn DeviceQueue>> {
        Ok(Box::new(MemQueue::new(
            MemBacking::Ram(self.map.clone()),
            depth,
        )))
    }
}

enum MemBacking {
    /// Reads zero-fill the buffer when `zeroes`.
    Null {
        zeroes: bool,
    },
    Ram(Arc<RamMapping>),
}

/// Submission context of the memory devices: completes at push time.
struct MemQueue {
    backing: MemBacking,
    done: Vec<IoCompletion>,
}

impl fmt::Debug for MemQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.backing {
            MemBacking::Null { .. } => "null",
            MemBacking::Ram(_) => "ram",
        };
        f.debug_struct("MemQueue").field("kind", &kind).finish()
    }
}

impl MemQueue {
    fn new(backing: MemBacking, depth: u16) -> Self {
        MemQueue {
            backing,
            done: Vec::with_capacity(usize::from(depth)),
        }
    }

    /// # Safety
    ///
    /// The segments must be valid for the access `op` makes.
    unsafe fn execute(&self, req: &IoRequest<'_>) -> io::Result<u32> {
        let seg_len = total_len(req.segments);
        let len = match req.op {
            IoOp::Read | IoOp::Write => seg_len,
            _ => req.len,
        };
        let done = u32::try_from(seg_len).unwrap_or(u32::MAX);
        if let (Some(c), IoOp::Read | IoOp::Write) = (req.crypt, req.op) {
            // SAFETY: forwarded from the caller's promise.
            unsafe { self.execute_crypt(req, c, len) }?;
            return Ok(done);
        }
        match &self.backing {
            MemBacking::Null { zeroes } => {
                if req.op == IoOp::Read && *zeroes {
                    for s in req.segments {
                        // SAFETY: the caller promises the segment is writable.
                        unsafe { std::ptr::write_bytes(s.iov_base.cast::<u8>(), 0, s.iov_len) };
                    }
                }
                Ok(done)
            }
            MemBacking::Ram(map) => {
                check_range(
                    map.len as u64,
                    req.offset,
                    usize::try_from(len).unwrap_or(usize::MAX),
                )?;
                // SAFETY: checked above that [offset, offset+len) is inside the mapping.
                let mut at = unsafe { map.base.add(req.offset as usize) };
                match req.op {
                    IoOp::Read | IoOp::Write => {
                        for s in req.segments {
                            // SAFETY: `at` stays inside the mapping (the segments sum
                            // to `len`); the caller promises the segment is valid.
                            unsafe {
                                if req.op == IoOp::Read {
                                    std::ptr::copy_nonoverlapping(at, s.iov_base.cast(), s.iov_len);
                                } else {
                                    copy_to_device(s.iov_base.cast(), at, s.iov_len);
                                }
                                at = at.add(s.iov_len);
                            }
                        }
                    }
                    IoOp::Discard | IoOp::WriteZeroes => {
                        // SAFETY: the range was checked to lie in the mapping.
                        unsafe { std::ptr::write_bytes(at, 0, len as usize) };
                    }
                    IoOp::Flush => {}
                }
                Ok(done)
            }
        }
    }

    /// A read or write with in-line encryption: ciphertext lives in the
    /// device's memory, plaintext in the caller's segments, and the cipher
    /// moves data straight between them (through a one-sector buffer only
    /// where a segment is not a whole number of sectors).
    ///
    /// # Safety
    ///
    /// The segments must be valid for the access `op` makes.
    unsafe fn execute_crypt(&self, req: &IoRequest<'_>, c: Crypt<'_>, len: u64) -> io::Result<()> {
        const SECTOR: usize = 512;
        let encrypt = req.op == IoOp::Write;
        let zeroes = [0u8; SECTOR];
        // Where sector `i` of the request lives on the device (`None`: the
        // null device, which holds zeroes and drops writes).
        let base = match &self.backing {
            MemBacking::Null { .. } => None,
            MemBacking::Ram(map) => {
                check_range(
                    map.len as u64,
                    req.offset,
                    usize::try_from(len).unwrap_or(usize::MAX),
                )?;
                // SAFETY: checked above that the range is inside the mapping.
                Some(unsafe { map.base.add(req.offset as usize) })
            }
        };
        let dev_at = |byte: usize| -> *mut u8 {
            match base {
                // SAFETY: `byte < len`, inside the checked range.
                Some(b) => unsafe { b.add(byte) },
                None => std::ptr::null_mut(),
            }
        };
        let mut done = 0usize;
        let mut scratch = [0u8; SECTOR];
        let mut partial = 0usize; // bytes of a straddling sector in `scratch`
        for s in req.segments {
            let mut p = s.iov_base.cast::<u8>();
            let mut left = s.iov_len;
            while left > 0 {
                let sector = c.first_sector + (done / SECTOR) as u64;
                if partial == 0 && left >= SECTOR {
                    let whole = left - left % SECTOR;
                    let dev = dev_at(done);
                    // SAFETY: `p` has `whole` bytes of the caller's segment;
                    // the device range was checked; they never overlap.
                    unsafe {
                        match (encrypt, dev.is_null()) {
                            (true, false) => c.cipher.process_raw(p, dev, whole, sector, true),
                            (true, true) => {}
                            (false, false) => c.cipher.process_raw(dev, p, whole, sector, false),
                            (false, true) => {
                                for k in 0..whole / SECTOR {
                                    c.cipher.process_raw(
                                        zeroes.as_ptr(),
                                        p.add(k * SECTOR),
                                        SECTOR,
                                        sector + k as u64,
                                        false,
                                    );
                                }
                            }
                        }
                        p = p.add(whole);
                    }
                    done += whole;
                    left -= whole;
                    continue;
                }
                // A sector split across segments: go through `scratch`.
                let take = (SECTOR - partial).min(left);
                let sector_start = done - partial;
                if !encrypt && partial == 0 {
                    let dev = dev_at(sector_start);
                    let src = if dev.is_null() {
                        zeroes.as_ptr()
                    } else {
                        dev.cast_const()
                    };
                    // SAFETY: one sector inside the checked device range (or
                    // the zero buffer) into our scratch buffer.
                    unsafe {
                        c.cipher
                            .process_raw(src, scratch.as_mut_ptr(), SECTOR, sector, false)
                    };
                }
                // SAFETY: `take` bytes of the caller's segment and of
                // `scratch` at `partial`.
                unsafe {
                    if encrypt {
                        std::ptr::copy_nonoverlapping(p, scratch.as_mut_ptr().add(partial), take);
                    } else {
                        std::ptr::copy_nonoverlapping(scratch.as_ptr().add(partial), p, take);
                    }
                    p = p.add(take);
                }
                partial += take;
                done += take;
                left -= take;
                if partial == SECTOR {
                    let dev = dev_at(sector_start);
                    if encrypt && !dev.is_null() {
                        // SAFETY: one sector inside the checked range.
                        unsafe {
                            c.cipher
                                .process_raw(scratch.as_ptr(), dev, SECTOR, sector, true)
                        };
                    }
                    partial = 0;
                }
            }
        }
        Ok(())
    }
}

impl DeviceQueue for MemQueue {
    fn inline_crypto(&self) -> bool {
        true
    }

    fn done_in_push(&self) -> bool {
        true
    }

    unsafe fn push(&mut self, req: IoRequest<'_>) {
        // SAFETY: forwarded from the caller's promise.
        let result = unsafe { self.execute(&req) };
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
    use crate::crypto::{DataKey, Xts256};
    use crate::device::test_iov::iov;

    #[test]
    fn device_copies_match_for_every_alignment_and_length() {
        let src: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        // A 64-byte aligned destination area, and offsets off it.
        let mut area = vec![0u8; 8192 + 128];
        let base = area.as_ptr().align_offset(64);
        for (off, len) in [(0, 4096), (0, 64), (0, 100), (8, 4096), (64, 512), (0, 0)] {
            area.fill(0);
            let dst = &mut area[base + off..base + off + len];
            // SAFETY: `src` and `dst` are distinct buffers of at least
            // `len` bytes.
            unsafe { copy_to_device(src.as_ptr(), dst.as_mut_ptr(), len) };
            assert_eq!(dst, &src[..len], "offset {off}, length {len}");
            assert!(area[..base + off].iter().all(|&b| b == 0));
            assert!(area[base + off + len..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn ram_round_trip_through_queue() {
        let dev = RamDevice::new("r", 1 << 20).unwrap();
        let mut q = dev.open_queue(4).unwrap();
        let mut a = vec![0xabu8; 4096];
        let mut b = vec![0u8; 4096];
        let mut out = Vec::new();
        let segs = [iov(&mut a)];
        // SAFETY: the buffers outlive the synchronous completion.
        unsafe {
            q.push(IoRequest {
                op: IoOp::Write,
                offset: 8192,
                len: 4096,
                segments: &segs,
                tag: 1,
                crypt: None,
            });
        }
        let segs = [iov(&mut b)];
        // SAFETY: as above.
        unsafe {
            q.push(IoRequest {
                op: IoOp::Read,
                offset: 8192,
                len: 4096,
                segments: &segs,
                tag: 2,
                crypt: None,
            });
        }
        q.reap(&mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|c| matches!(c.result, Ok(4096))));
        assert_eq!(a, b);
        let mut raw = vec![0u8; 4096];
        dev.read_exact_at(&mut raw, 8192).unwrap();
        assert_eq!(raw, a);
    }

    /// Pushes one request with in-line encryption over segments of the
    /// given sizes cut from `buf`.
    fn crypt_io(
        q: &mut Box<dyn DeviceQueue>,
        x: &Xts256,
        op: IoOp,
        offset: u64,
        buf: &mut [u8],
        cuts: &[usize],
    ) {
        let mut segs = Vec::new();
        let mut rest = &mut buf[..];
        for &n in cuts {
            let (a, b) = rest.split_at_mut(n);
            segs.push(iov(a));
            rest = b;
        }
        assert!(rest.is_empty());
        let total: usize = cuts.iter().sum();
        // SAFETY: the buffers outlive the synchronous completion.
        unsafe {
            q.push(IoRequest {
                op,
                offset,
                len: total as u64,
                segments: &segs,
                tag: 0,
                crypt: Some(Crypt {
                    cipher: x,
                    first_sector: 100,
                }),
            });
        }
        let mut out = Vec::new();
        q.reap(&mut out);
        assert!(matches!(out[0].result, Ok(n) if n as usize == total));
    }

    #[test]
    fn ram_inline_crypto_matches_the_cipher_for_any_segmentation() {
        for fast in [true, false] {
            let x = Xts256::with_fast_path(&DataKey::generate(), fast);
            let dev = RamDevice::new("r", 1 << 20).unwrap();
            let mut q = dev.open_queue(4).unwrap();
            let plain: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 255) as u8).collect();
            let mut w = plain.clone();
            // Segments that split sectors, as a guest may.
            crypt_io(
                &mut q,
                &x,
                IoOp::Write,
                65536,
                &mut w,
                &[100, 924, 1024, 1536, 12, 500],
            );
            assert_eq!(w, plain, "the caller's buffer must not change");
            let mut raw = vec![0u8; 4096];
            dev.read_exact_at(&mut raw, 65536).unwrap();
            let mut expect = plain.clone();
            x.encrypt(&mut expect, 100);
            assert_eq!(
                raw, expect,
                "device holds XTS ciphertext, tweak = volume sector"
            );
            let mut r = vec![0u8; 4096];
            crypt_io(
                &mut q,
                &x,
                IoOp::Read,
                65536,
                &mut r,
                &[700, 348, 1000, 2048],
            );
            assert_eq!(r, plain);
            let mut r = vec![0u8; 4096];
            crypt_io(&mut q, &x, IoOp::Read, 65536, &mut r, &[4096]);
            assert_eq!(r, plain);
        }
    }

    #[test]
    fn null_inline_crypto_reads_decrypted_zeroes() {
        let x = Xts256::new(&DataKey::generate());
        let dev = NullDevice::new("n", 64 << 20);
        let mut q = dev.open_queue(4).unwrap();
        let mut r = vec![0x11u8; 1024];
        crypt_io(&mut q, &x, IoOp::Read, 32 << 20, &mut r, &[300, 724]);
        let mut expect = vec![0u8; 1024];
        x.decrypt(&mut expect, 100);
        assert_eq!(r, expect);
    }

    #[test]
    fn ram_rejects_out_of_range() {
        let dev = RamDevice::new("r", 1 << 20).unwrap();
        let mut q = dev.open_queue(4).unwrap();
        let mut a = vec![0u8; 4096];
        let segs = [iov(&mut a)];
        // SAFETY: the buffer outlives the synchronous completion.
        unsafe {
            q.push(IoRequest {
                op: IoOp::Read,
                offset: (1 << 20) - 512,
                len: 4096,
                segments: &segs,
                tag: 0,
                crypt: None,
            });
        }
        let mut out = Vec::new();
        q.reap(&mut out);
        assert!(out[0].result.is_err());
    }

    #[test]
    fn null_reads_zeroes_and_keeps_metadata() {
        let dev = NullDevice::new("n", 1 << 30);
        dev.write_all_at(b"hello", 4096).unwrap();
        let mut got = [0u8; 5];
        dev.read_exact_at(&mut got, 4096).unwrap();
        assert_eq!(&got, b"hello");
        let mut q = dev.open_queue(1).unwrap();
        let mut a = vec![0xffu8; 512];
        let segs = [iov(&mut a)];
        // SAFETY: the buffer outlives the synchronous completion.
        unsafe {
            q.push(IoRequest {
                op: IoOp::Read,
                offset: 1 << 29,
                len: 512,
                segments: &segs,
                tag: 0,
                crypt: None,
            });
        }
        assert!(a.iter().all(|&x| x == 0));
    }

    #[test]
    fn a_null_device_can_leave_read_buffers_untouched() {
        let dev = NullDevice::new("n", 1 << 30).reading_zeroes(false);
        assert!(dev.describe().contains("untouched"));
        // The partition map still round-trips.
        dev.write_all_at(b"map", 0).unwrap();
        let mut got = [0u8; 3];
        dev.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"map");
        let mut q = dev.open_queue(1).unwrap();
        let mut a = vec![0xabu8; 4096];
        let segs = [iov(&mut a)];
        // SAFETY: the buffer outlives the synchronous completion.
        unsafe {
            q.push(IoRequest {
                op: IoOp::Read,
                offset: 1 << 29,
                len: 4096,
                segments: &segs,
                tag: 0,
                crypt: None,
            });
        }
        let mut done = Vec::new();
        q.reap(&mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].result.as_ref().ok(), Some(&4096));
        assert!(a.iter().all(|&x| x == 0xab));
        // Only a null device takes the option.
        let e = crate::device::open(&crate::device::DeviceConfig {
            name: "r".into(),
            kind: DeviceKind::Ram,
            path: None,
            size_bytes: Some(1 << 20),
            share_depth: None,
            read_zeroes: Some(false),
            volatile_write_cache: None,
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("read_zeroes is for null devices"),
            "{e}"
        );
    }
}
