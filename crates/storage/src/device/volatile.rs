//! A volatile write cache in front of a file or block device, for crash
//! tests only.
//!
//! `kill -9` leaves the page cache behind: everything the dead process
//! wrote reaches the file, flushed or not, so a crash test on a plain file
//! cannot show a lost unflushed write. This layer keeps every write in the
//! card's own memory until a flush writes it back and syncs the device,
//! the way a disk's volatile cache does: when the process dies, what was
//! not flushed is gone (LazyFS does the same under a file system).
//!
//! Like a real cache it may also write an unflushed write back early: a
//! seeded generator picks which (about one in eight), so that a checker
//! cannot rely on unflushed data being lost either. The same generator
//! completes requests out of order, as a real device's queue does: it
//! shuffles each batch, and holds about one request in two back for 1 to
//! 16 ms while later ones complete, so that a crash finds the queue with
//! later requests answered and earlier ones not.
//!
//! `flush_acks_early` is a bug on purpose: a flush is answered at once and
//! the cache is written back lazily, by the first flush that comes
//! [`LAZY_WRITE_BACK`] or more after the previous write-back. Crash tests
//! turn it on to show that they catch a flush acknowledged before its data
//! is durable.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{DeviceKind, DeviceQueue, IoCompletion, IoOp, IoRequest, PhysicalDevice};

const SECTOR: u64 = 512;

/// With the deliberate bug, how long answered flushes may wait for their
/// write-back.
pub const LAZY_WRITE_BACK: std::time::Duration = std::time::Duration::from_millis(100);

/// Settings of the crash-test write cache (`volatile_write_cache` of a
/// file or block device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolatileCacheConfig {
    /// Seeds the choice of writes that go back before their flush.
    pub seed: u64,
    /// The deliberate bug: flushes are answered before their data is
    /// written back (see the module's documentation).
    #[serde(default)]
    pub flush_acks_early: bool,
}

/// One cached sector's bytes.
type Dirty = Box<[u8; SECTOR as usize]>;

struct Cache {
    sectors: HashMap<u64, Dirty>,
    /// When the cache was last written back by a flush.
    written_back: std::time::Instant,
    rng: u64,
}

impl Cache {
    /// xorshift64*: reproducible from the seed, good enough to pick writes.
    fn next(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A device whose writes live in this process until flushed.
pub struct VolatileCache {
    inner: Arc<dyn PhysicalDevice>,
    config: VolatileCacheConfig,
    cache: Arc<Mutex<Cache>>,
}

impl fmt::Debug for VolatileCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolatileCache")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl VolatileCache {
    /// Puts the cache in front of `inner`.
    pub fn new(inner: Arc<dyn PhysicalDevice>, config: VolatileCacheConfig) -> Self {
        VolatileCache {
            inner,
            config,
            cache: Arc::new(Mutex::new(Cache {
                sectors: HashMap::new(),
                written_back: std::time::Instant::now(),
                // xorshift must not start at zero.
                rng: config.seed | 1,
            })),
        }
    }
}

/// The cache and the device under it, shared by the control plane and the
/// queues.
#[derive(Clone)]
struct Shared {
    inner: Arc<dyn PhysicalDevice>,
    cache: Arc<Mutex<Cache>>,
    flush_acks_early: bool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.capacity_bytes() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "access beyond the end of the device",
            )),
        }
    }

    /// Reads from the device, then lays the cached sectors over it.
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.inner.read_exact_at(buf, offset)?;
        let cache = self.lock();
        if cache.sectors.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let mut sector = offset / SECTOR;
        while sector * SECTOR < end {
            if let Some(d) = cache.sectors.get(&sector) {
                let s_start = sector * SECTOR;
                let from = s_start.max(offset);
                let to = (s_start + SECTOR).min(end);
                let (b, e) = ((from - offset) as usize, (to - offset) as usize);
                let (sb, se) = ((from - s_start) as usize, (to - s_start) as usize);
                buf[b..e].copy_from_slice(&d[sb..se]);
            }
            sector += 1;
        }
        Ok(())
    }

    /// Puts `buf` in the cache; now and then (seeded) also on the device.
    fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut cache = self.lock();
        let mut sector = offset / SECTOR;
        while sector * SECTOR < end {
            let s_start = sector * SECTOR;
            let from = s_start.max(offset);
            let to = (s_start + SECTOR).min(end);
            let d = match cache.sectors.entry(sector) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    // A partial sector starts from what the device holds.
                    let mut data = Box::new([0u8; SECTOR as usize]);
                    if to - from < SECTOR {
                        self.inner.read_exact_at(&mut data[..], s_start)?;
                    }
                    v.insert(data)
                }
            };
            let (b, e) = ((from - offset) as usize, (to - offset) as usize);
            d[(from - s_start) as usize..(to - s_start) as usize].copy_from_slice(&buf[b..e]);
            sector += 1;
        }
        if cache.next().is_multiple_of(8) {
            // Written back before any flush asked for it.
            self.write_back(&mut cache, |s| s >= offset / SECTOR && s * SECTOR < end)?;
        }
        Ok(())
    }

    /// Writes the chosen cached sectors to the device and drops them from
    /// the cache.
    fn write_back(&self, cache: &mut Cache, chosen: impl Fn(u64) -> bool) -> io::Result<()> {
        let mut keys: Vec<u64> = cache
            .sectors
            .iter()
            .filter(|(s, _)| chosen(**s))
            .map(|(s, _)| *s)
            .collect();
        keys.sort_unstable();
        for s in keys {
            if let Some(d) = cache.sectors.get(&s) {
                self.inner.write_all_at(&d[..], s * SECTOR)?;
                cache.sectors.remove(&s);
            }
        }
        Ok(())
    }

    /// Makes the writes answered so far durable (with the bug on, a
    /// guest's flush does it only when the last write-back is
    /// [`LAZY_WRITE_BACK`] old; the card's own metadata is always synced).
    fn flush(&self, guest: bool) -> io::Result<()> {
        let mut cache = self.lock();
        if guest && self.flush_acks_early && cache.written_back.elapsed() < LAZY_WRITE_BACK {
            return Ok(());
        }
        self.write_back(&mut cache, |_| true)?;
        cache.written_back = std::time::Instant::now();
        self.inner.sync()
    }
}

impl PhysicalDevice for VolatileCache {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn kind(&self) -> DeviceKind {
        self.inner.kind()
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
    fn describe(&self) -> String {
        format!(
            "{}, volatile write cache for crash tests (seed {}{})",
            self.inner.describe(),
            self.config.seed,
            if self.config.flush_acks_early {
                ", flushes answered early ON PURPOSE"
            } else {
                ""
            }
        )
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.shared().read(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.shared().write(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.shared().flush(false)
    }
    fn open_queue(&self, depth: u16) -> io::Result<Box<dyn DeviceQueue>> {
        Ok(Box::new(CacheQueue {
            shared: self.shared(),
            done: Vec::with_capacity(usize::from(depth)),
            held: Vec::new(),
            timer: vmm_sys_util::timerfd::TimerFd::new()?,
            scratch: Vec::new(),
        }))
    }
}

impl VolatileCache {
    fn shared(&self) -> Shared {
        Shared {
            inner: self.inner.clone(),
            cache: self.cache.clone(),
            flush_acks_early: self.config.flush_acks_early,
        }
    }
}

/// Submission context: requests are carried out at push time; most
/// complete at once, some are held back a little.
struct CacheQueue {
    shared: Shared,
    done: Vec<IoCompletion>,
    /// Completions held back, with when they are released.
    held: Vec<(std::time::Instant, IoCompletion)>,
    /// Fires when the first held completion is due.
    timer: vmm_sys_util::timerfd::TimerFd,
    scratch: Vec<u8>,
}

impl fmt::Debug for CacheQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheQueue").finish_non_exhaustive()
    }
}

impl CacheQueue {
    /// # Safety
    ///
    /// The segments must be valid for the access `req.op` makes.
    unsafe fn execute(&mut self, req: &IoRequest<'_>) -> io::Result<u32> {
        let seg_len: usize = req.segments.iter().map(|s| s.iov_len).sum();
        let done = u32::try_from(seg_len).unwrap_or(u32::MAX);
        match req.op {
            IoOp::Read => {
                self.scratch.resize(seg_len, 0);
                self.shared.read(&mut self.scratch, req.offset)?;
                let mut at = 0;
                for s in req.segments {
                    // SAFETY: the caller promises the segment is writable
                    // for `iov_len` bytes; `scratch` is our own buffer.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.scratch.as_ptr().add(at),
                            s.iov_base.cast::<u8>(),
                            s.iov_len,
                        );
                    }
                    at += s.iov_len;
                }
            }
            IoOp::Write => {
                self.scratch.clear();
                for s in req.segments {
                    // SAFETY: the caller promises the segment is readable
                    // for `iov_len` bytes.
                    let part =
                        unsafe { std::slice::from_raw_parts(s.iov_base.cast::<u8>(), s.iov_len) };
                    self.scratch.extend_from_slice(part);
                }
                self.shared.write(&self.scratch, req.offset)?;
            }
            IoOp::Flush => self.shared.flush(true)?,
            IoOp::Discard | IoOp::WriteZeroes => {
                let len = usize::try_from(req.len)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too long"))?;
                self.scratch.clear();
                self.scratch.resize(len, 0);
                self.shared.write(&self.scratch, req.offset)?;
            }
        }
        Ok(done)
    }
}

impl DeviceQueue for CacheQueue {
    unsafe fn push(&mut self, req: IoRequest<'_>) {
        // SAFETY: forwarded from the caller's promise.
        let result = unsafe { self.execute(&req) };
        let c = IoCompletion {
            tag: req.tag,
            result,
        };
        let draw = self.shared.lock().next();
        if draw.is_multiple_of(2) {
            let hold = std::time::Duration::from_millis(1 + (draw >> 8) % 16);
            self.held.push((std::time::Instant::now() + hold, c));
        } else {
            self.done.push(c);
        }
    }
    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn reap(&mut self, out: &mut Vec<IoCompletion>) {
        let now = std::time::Instant::now();
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].0 <= now {
                self.done.push(self.held.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
        // Re-arming also resets the timer's readiness.
        let first = self.held.iter().map(|(t, _)| *t).min();
        let armed = match first {
            Some(t) => {
                let wait = t
                    .saturating_duration_since(now)
                    .max(std::time::Duration::from_micros(1));
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = armed {
            // Without the timer nothing would wake the queue: release all.
            log::warn!("volatile cache timer: {e}");
            self.done.extend(self.held.drain(..).map(|(_, c)| c));
        }
        if self.done.len() > 1 {
            let mut cache = self.shared.lock();
            for i in (1..self.done.len()).rev() {
                let j = usize::try_from(cache.next() % (i as u64 + 1)).unwrap_or(0);
                self.done.swap(i, j);
            }
        }
        out.append(&mut self.done);
    }
    fn completion_fd(&self) -> Option<RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.timer.as_raw_fd())
    }
    fn wait(&mut self) -> io::Result<()> {
        if self.done.is_empty() {
            if let Some(t) = self.held.iter().map(|(t, _)| *t).min() {
                std::thread::sleep(t.saturating_duration_since(std::time::Instant::now()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::FileDevice;

    fn file(dir: &std::path::Path) -> Arc<dyn PhysicalDevice> {
        Arc::new(
            FileDevice::open("d", DeviceKind::File, &dir.join("disk.img"), Some(1 << 20)).unwrap(),
        )
    }

    fn on_disk(dir: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(dir.join("disk.img")).unwrap();
        let mut b = vec![0; len];
        f.read_exact_at(&mut b, offset).unwrap();
        b
    }

    /// Reaps until `n` completions came back (some are held back a while).
    fn reap_all(q: &mut Box<dyn DeviceQueue>, n: usize) -> Vec<IoCompletion> {
        let mut done = Vec::new();
        while done.len() < n {
            q.wait().unwrap();
            q.reap(&mut done);
        }
        done
    }

    fn cache(dir: &std::path::Path, seed: u64, early: bool) -> VolatileCache {
        VolatileCache::new(
            file(dir),
            VolatileCacheConfig {
                seed,
                flush_acks_early: early,
            },
        )
    }

    #[test]
    fn writes_are_read_back_and_reach_the_file_only_when_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), 3, false);
        let mut lost = 0;
        for i in 0..64u64 {
            // Unaligned on purpose: partial sectors keep their neighbours.
            let data = vec![i as u8 + 1; 700];
            c.write_all_at(&data, i * 4096 + 100).unwrap();
            let mut back = vec![0; 700];
            c.read_exact_at(&mut back, i * 4096 + 100).unwrap();
            assert_eq!(back, data);
            if on_disk(dir.path(), i * 4096 + 100, 700) != data {
                lost += 1;
            }
        }
        // Most wait for the flush; a few went back early (seeded).
        assert!(lost > 32 && lost < 64, "{lost} of 64 not yet on the file");
        c.sync().unwrap();
        for i in 0..64u64 {
            assert_eq!(
                on_disk(dir.path(), i * 4096 + 100, 700),
                vec![i as u8 + 1; 700]
            );
            assert_eq!(on_disk(dir.path(), i * 4096 + 99, 1), vec![0]);
        }
    }

    #[test]
    fn the_deliberate_bug_answers_a_flush_before_its_data_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        // A seed whose first draws write nothing back early.
        let seed = (1..1000)
            .find(|s| {
                let mut c = Cache {
                    sectors: HashMap::new(),
                    written_back: std::time::Instant::now(),
                    rng: s | 1,
                };
                (0..2).all(|_| !c.next().is_multiple_of(8))
            })
            .unwrap();
        let c = cache(dir.path(), seed, true);
        let mut q = c.open_queue(1).unwrap();
        let mut flush = || {
            // SAFETY: a flush carries no buffers.
            unsafe {
                q.push(IoRequest {
                    op: IoOp::Flush,
                    offset: 0,
                    len: 0,
                    segments: &[],
                    tag: 0,
                    crypt: None,
                });
            }
            let done = reap_all(&mut q, 1);
            assert!(done[0].result.is_ok());
        };
        c.write_all_at(&[7; 512], 0).unwrap();
        flush();
        // Answered, yet not on the device.
        assert_eq!(on_disk(dir.path(), 0, 512), vec![0; 512]);
        std::thread::sleep(LAZY_WRITE_BACK);
        c.write_all_at(&[8; 512], 512).unwrap();
        flush();
        // A later flush writes everything back.
        assert_eq!(on_disk(dir.path(), 0, 512), vec![7; 512]);
        assert_eq!(on_disk(dir.path(), 512, 512), vec![8; 512]);
    }

    #[test]
    fn queues_share_the_cache_with_the_control_plane() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), 5, false);
        let mut q = c.open_queue(4).unwrap();
        let mut data = vec![9u8; 4096];
        let iov = [libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        }];
        for (tag, op) in [(0, IoOp::Write), (1, IoOp::Flush)] {
            // SAFETY: `data` outlives the request, completed at push time.
            unsafe {
                q.push(IoRequest {
                    op,
                    offset: 8192,
                    len: if op == IoOp::Write { 4096 } else { 0 },
                    segments: if op == IoOp::Write { &iov } else { &[] },
                    tag,
                    crypt: None,
                });
            }
        }
        q.submit().unwrap();
        let done = reap_all(&mut q, 2);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|d| d.result.is_ok()));
        assert_eq!(on_disk(dir.path(), 8192, 4096), vec![9; 4096]);
        let mut back = vec![0; 4096];
        c.read_exact_at(&mut back, 8192).unwrap();
        assert_eq!(back, vec![9; 4096]);
        let e = c.write_all_at(&[1], 1 << 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
