//! The inflight region (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): shared
//! memory in which the card records which descriptors of each split ring
//! it has taken and not yet answered, so that the next card process (after
//! an upgrade or a crash) knows them.
//!
//! The card creates the region on `GET_INFLIGHT_FD` (a sealed memfd); the
//! frontend keeps it across reconnections and hands it to every new
//! backend with `SET_INFLIGHT_FD`. Layout, per queue, the one the
//! vhost-user specification gives for split rings (little-endian):
//!
//! ```text
//! offset  0  u64 features         (0)
//!         8  u16 version          (1; 0 = never used)
//!        10  u16 desc_num         (ring size)
//!        12  u16 last_batch_head  (head being put on the used ring)
//!        14  u16 used_idx         (used index after the last put)
//!        16  desc[desc_num]: u8 inflight, 5 bytes padding, u16 next,
//!                            u64 counter (order taken)
//! ```
//!
//! Each queue's part is rounded up to 64 bytes. The layout is versioned
//! and never changes under a running VM: a region of an unknown version is
//! refused, not reinterpreted.
//!
//! The card publishes completions in the order it took requests
//! ([`super::used_order`]), so what the region lists as in flight is always
//! the run of the avail ring just after the used index. [`InflightQueue::restore`]
//! checks exactly that against the ring before the queue starts, and the
//! worker takes those requests again from there, oldest first, once each.
//! A region that says otherwise is refused with the reason.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;
use virtio_queue::{Queue, QueueT};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, VolatileMemory};

/// Layout version this card writes and reads.
pub(crate) const VERSION: u16 = 1;
const HEADER: usize = 16;
const DESC: usize = 16;
const ALIGN: usize = 64;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_INFLIGHT: usize = 0;
const DESC_COUNTER: usize = 8;

/// Why an inflight region was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// Queue count or size outside what the interface offers.
    #[error(
        "inflight region for {num_queues} queue(s) of {queue_size} entries: the interface \
         offers 1..={max_queues} queues of up to {max_size} entries (a power of two)"
    )]
    Shape {
        /// Queues asked for.
        num_queues: u16,
        /// Entries per queue asked for.
        queue_size: u16,
        /// Queues offered.
        max_queues: u16,
        /// Largest queue offered.
        max_size: u16,
    },
    /// `mmap_size` is not what the queues need.
    #[error(
        "inflight region of {got} bytes: {num_queues} queue(s) of {queue_size} entries take \
         {want} bytes in layout version {VERSION}"
    )]
    Size {
        /// Size given.
        got: u64,
        /// Size the layout needs.
        want: u64,
        /// Queues.
        num_queues: u16,
        /// Entries per queue.
        queue_size: u16,
    },
    /// The file is too short, or cannot be checked.
    #[error("inflight file: {0}")]
    File(String),
    /// The file could shrink under the card (a read would fault).
    #[error(
        "inflight file is not sealed against shrinking (F_SEAL_SHRINK); the card accepts the \
         memfd it handed out"
    )]
    NotSealed,
    /// A region's part for one queue that this card cannot use.
    #[error("inflight region of queue {queue}: {reason}")]
    Queue {
        /// Queue index.
        queue: u16,
        /// What is wrong with it.
        reason: String,
    },
    /// `SET_INFLIGHT_FD` while queues run on the current region.
    #[error("SET_INFLIGHT_FD while queues run on an inflight region; stop the queues first")]
    WhileRunning,
    /// mmap or memfd failed.
    #[error("inflight region: {0}")]
    Io(#[from] std::io::Error),
}

/// Bytes of one queue's part of the region.
pub(crate) fn queue_bytes(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(ALIGN)
}

/// A mapped inflight region, shared by the handler and the queue workers.
#[derive(Debug)]
pub(crate) struct InflightRegion {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

fn check_shape(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
    max_size: u16,
) -> Result<(), InflightError> {
    if num_queues == 0
        || num_queues > max_queues
        || queue_size == 0
        || queue_size > max_size
        || !queue_size.is_power_of_two()
    {
        return Err(InflightError::Shape {
            num_queues,
            queue_size,
            max_queues,
            max_size,
        });
    }
    Ok(())
}

impl InflightRegion {
    /// A fresh, zeroed region for `GET_INFLIGHT_FD`: the memfd (sealed
    /// against resizing), the reply, and the mapping.
    pub(crate) fn create(
        ask: &VhostUserInflight,
        max_queues: u16,
        max_size: u16,
    ) -> Result<(File, VhostUserInflight, Arc<Self>), InflightError> {
        check_shape(ask.num_queues, ask.queue_size, max_queues, max_size)?;
        let size = queue_bytes(ask.queue_size) * usize::from(ask.num_queues);
        // SAFETY: the name is a NUL-terminated literal; memfd_create has no
        // other memory arguments.
        let fd = unsafe {
            libc::memfd_create(
                c"softcard-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else
        // owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own, integer arguments only.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let map = MmapRegion::from_file(FileOffset::new(file.try_clone()?, 0), size)
            .map_err(|e| InflightError::File(e.to_string()))?;
        let reply = VhostUserInflight {
            mmap_size: size as u64,
            mmap_offset: 0,
            num_queues: ask.num_queues,
            queue_size: ask.queue_size,
        };
        let region = Arc::new(InflightRegion {
            map,
            num_queues: ask.num_queues,
            queue_size: ask.queue_size,
        });
        Ok((file, reply, region))
    }

    /// Maps the region a frontend hands over with `SET_INFLIGHT_FD`, after
    /// checking that it has the size the layout needs and cannot shrink.
    pub(crate) fn adopt(
        msg: &VhostUserInflight,
        file: File,
        max_queues: u16,
        max_size: u16,
    ) -> Result<Arc<Self>, InflightError> {
        check_shape(msg.num_queues, msg.queue_size, max_queues, max_size)?;
        let want = (queue_bytes(msg.queue_size) * usize::from(msg.num_queues)) as u64;
        if msg.mmap_size != want {
            return Err(InflightError::Size {
                got: msg.mmap_size,
                want,
                num_queues: msg.num_queues,
                queue_size: msg.queue_size,
            });
        }
        if !msg.mmap_offset.is_multiple_of(4096) {
            return Err(InflightError::File(format!(
                "offset {} is not page aligned",
                msg.mmap_offset
            )));
        }
        // SAFETY: fcntl on a descriptor we own, integer arguments only.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        let len = file.metadata()?.len();
        let end = msg.mmap_offset.checked_add(want);
        if end.is_none_or(|end| end > len) {
            return Err(InflightError::File(format!(
                "{len} bytes, the region ends at {}",
                msg.mmap_offset.saturating_add(want)
            )));
        }
        let map = MmapRegion::from_file(FileOffset::new(file, msg.mmap_offset), want as usize)
            .map_err(|e| InflightError::File(e.to_string()))?;
        Ok(Arc::new(InflightRegion {
            map,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        }))
    }

    /// Queue `i`'s part, if the region covers it.
    pub(crate) fn queue(self: &Arc<Self>, i: u16) -> Option<InflightQueue> {
        (i < self.num_queues).then(|| InflightQueue {
            region: self.clone(),
            base: queue_bytes(self.queue_size) * usize::from(i),
            index: i,
            counter: 1,
        })
    }
}

/// One queue's part of the region, owned by that queue's worker.
#[derive(Debug)]
pub(crate) struct InflightQueue {
    region: Arc<InflightRegion>,
    base: usize,
    index: u16,
    /// Order number of the next request taken.
    counter: u64,
}

/// What [`InflightQueue::restore`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Restored {
    /// Requests a previous process took and did not answer; the worker
    /// takes them again from the used index on.
    pub(crate) resubmit: u16,
}

impl InflightQueue {
    fn store<T: vm_memory::AtomicAccess>(&self, off: usize, v: T, order: Ordering) {
        // In bounds by construction (a head is below the ring size, which
        // restore checked against the region); a failed store is dropped
        // rather than trusted.
        let _ = self
            .region
            .map
            .as_volatile_slice()
            .store(v, self.base + off, order);
    }

    fn load<T: vm_memory::AtomicAccess>(&self, off: usize) -> Option<T> {
        self.region
            .map
            .as_volatile_slice()
            .load(self.base + off, Ordering::Acquire)
            .ok()
    }

    fn desc(head: u16) -> usize {
        HEADER + DESC * usize::from(head)
    }

    fn error(&self, reason: String) -> InflightError {
        InflightError::Queue {
            queue: self.index,
            reason,
        }
    }

    /// Records that the request with descriptor `head` was taken.
    pub(crate) fn taken(&mut self, head: u16) {
        if head >= self.region.queue_size {
            return;
        }
        let d = Self::desc(head);
        self.store(d + DESC_COUNTER, self.counter, Ordering::Relaxed);
        self.store(d + DESC_INFLIGHT, 1u8, Ordering::Release);
        self.counter += 1;
    }

    /// Before `head` goes on the used ring: a crash between the two
    /// stores of the used ring is recognised by the next process.
    pub(crate) fn publishing(&self, head: u16) {
        self.store(OFF_LAST_BATCH_HEAD, head, Ordering::Release);
    }

    /// After `head` went on the used ring, which now has index `used_idx`.
    pub(crate) fn published(&self, head: u16, used_idx: u16) {
        if head < self.region.queue_size {
            self.store(Self::desc(head) + DESC_INFLIGHT, 0u8, Ordering::Release);
        }
        self.store(OFF_USED_IDX, used_idx, Ordering::Release);
    }

    /// Before the queue starts: initialise a fresh region, or check what a
    /// previous process left against the ring and set the ring to take
    /// those requests again, oldest first.
    pub(crate) fn restore<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<Restored, InflightError> {
        let size = queue.size();
        if size > self.region.queue_size {
            return Err(self.error(format!(
                "the ring has {size} entries, the region room for {}",
                self.region.queue_size
            )));
        }
        let used = queue
            .used_idx(mem, Ordering::Acquire)
            .map_err(|e| self.error(format!("used ring: {e}")))?
            .0;
        let version: u16 = self.load(OFF_VERSION).unwrap_or(u16::MAX);
        if version == 0 {
            for head in 0..size {
                self.store(Self::desc(head) + DESC_INFLIGHT, 0u8, Ordering::Relaxed);
            }
            self.store(OFF_DESC_NUM, size, Ordering::Relaxed);
            self.store(OFF_USED_IDX, used, Ordering::Relaxed);
            self.store(OFF_VERSION, VERSION, Ordering::Release);
            queue.set_next_avail(used);
            return Ok(Restored { resubmit: 0 });
        }
        if version != VERSION {
            return Err(self.error(format!(
                "layout version {version}; this card reads version {VERSION}"
            )));
        }
        let desc_num: u16 = self.load(OFF_DESC_NUM).unwrap_or(0);
        if desc_num != size {
            return Err(self.error(format!(
                "written for a ring of {desc_num} entries; the ring has {size}"
            )));
        }
        let region_used: u16 = self.load(OFF_USED_IDX).unwrap_or(0);
        if region_used != used {
            // The previous process died between putting an entry on the
            // used ring and clearing it here: the entry is answered.
            if used.wrapping_sub(region_used) != 1 {
                return Err(self.error(format!(
                    "used index {region_used} is out of step with the ring's {used}"
                )));
            }
            let last: u16 = self.load(OFF_LAST_BATCH_HEAD).unwrap_or(u16::MAX);
            if last >= size {
                return Err(self.error(format!("last batch head {last} is not a descriptor")));
            }
            self.store(Self::desc(last) + DESC_INFLIGHT, 0u8, Ordering::Relaxed);
            self.store(OFF_USED_IDX, used, Ordering::Release);
        }
        let mut inflight = Vec::new();
        for head in 0..size {
            let d = Self::desc(head);
            match self.load::<u8>(d + DESC_INFLIGHT) {
                Some(0) => {}
                Some(1) => inflight.push((self.load::<u64>(d + DESC_COUNTER).unwrap_or(0), head)),
                other => {
                    return Err(self.error(format!(
                        "descriptor {head} has in-flight flag {other:?} (0 or 1 expected)"
                    )))
                }
            }
        }
        inflight.sort_unstable();
        let avail = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| self.error(format!("avail ring: {e}")))?
            .0;
        let pending = avail.wrapping_sub(used);
        if pending > size || inflight.len() > usize::from(pending) {
            return Err(self.error(format!(
                "{} descriptor(s) in flight, but the avail ring holds {pending} unanswered",
                inflight.len()
            )));
        }
        let ring = queue.avail_ring();
        for (k, &(_, head)) in inflight.iter().enumerate() {
            let pos = used.wrapping_add(k as u16) % size;
            let at = ring
                .checked_add(4 + 2 * u64::from(pos))
                .ok_or_else(|| self.error("avail ring address overflows".into()))?;
            let on_ring = mem
                .read_obj::<u16>(GuestAddress(at))
                .map(u16::from_le)
                .map_err(|e| self.error(format!("avail ring: {e}")))?;
            if on_ring != head {
                return Err(self.error(format!(
                    "descriptor {head} is in flight but not on the avail ring (entry {k} after \
                     the used index holds {on_ring})"
                )));
            }
        }
        if let Some(&(last, _)) = inflight.last() {
            self.counter = last.saturating_add(1);
        }
        queue.set_next_avail(used);
        Ok(Restored {
            resubmit: inflight.len() as u16,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const QS: u16 = 16;

    fn ask(num_queues: u16, queue_size: u16) -> VhostUserInflight {
        VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    /// A ring with `n` one-descriptor requests on it (heads 0..n).
    fn ring(mem: &GuestMemoryMmap, n: u16) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue) {
        let mq = MockSplitQueue::new(mem, QS);
        for h in 0..n {
            let d = SplitDescriptor::new(0x8000, 0x200, 0, 0);
            mq.desc_table().store(h, RawDescriptor::from(d)).unwrap();
            mq.avail().ring().ref_at(usize::from(h)).unwrap().store(h);
        }
        mq.avail().idx().store(n);
        let q = mq.create_queue::<Queue>().unwrap();
        (mq, q)
    }

    /// Takes `n` requests as the worker does.
    fn take(q: &mut Queue, r: &mut InflightQueue, mem: &GuestMemoryMmap, n: usize) -> Vec<u16> {
        (0..n)
            .map(|_| {
                let c = q.pop_descriptor_chain(mem).unwrap();
                r.taken(c.head_index());
                c.head_index()
            })
            .collect()
    }

    fn answer(q: &mut Queue, r: &InflightQueue, mem: &GuestMemoryMmap, head: u16) {
        r.publishing(head);
        q.add_used(mem, head, 0).unwrap();
        r.published(head, q.next_used());
    }

    fn fresh(mem: &GuestMemoryMmap) -> (File, Arc<InflightRegion>) {
        let (file, reply, region) = InflightRegion::create(&ask(1, QS), 4, 1024).unwrap();
        assert_eq!(reply.mmap_size as usize, queue_bytes(QS));
        let mut q = MockSplitQueue::new(mem, QS)
            .create_queue::<Queue>()
            .unwrap();
        let r = region.queue(0).unwrap().restore(&mut q, mem).unwrap();
        assert_eq!(r.resubmit, 0);
        (file, region)
    }

    #[test]
    fn requests_a_dead_process_took_are_taken_again_in_order_once() {
        let mem = memory();
        let (_file, region) = fresh(&mem);
        let (mq, mut q) = ring(&mem, 4);
        let mut r = region.queue(0).unwrap();
        r.restore(&mut q, &mem).unwrap();
        assert_eq!(take(&mut q, &mut r, &mem, 3), vec![0, 1, 2]);
        answer(&mut q, &r, &mem, 0);
        // The process dies: the next one starts from the region.
        let mut q2 = mq.create_queue::<Queue>().unwrap();
        q2.set_next_avail(0);
        let mut r2 = region.queue(0).unwrap();
        assert_eq!(r2.restore(&mut q2, &mem).unwrap().resubmit, 2);
        assert_eq!(q2.next_avail(), 1);
        // Heads 1 and 2 come again, then 3 (never taken), each once.
        assert_eq!(take(&mut q2, &mut r2, &mem, 3), vec![1, 2, 3]);
        assert!(q2.pop_descriptor_chain(&mem).is_none());
    }

    #[test]
    fn a_crash_between_the_used_ring_and_the_region_is_recognised() {
        let mem = memory();
        let (_file, region) = fresh(&mem);
        let (mq, mut q) = ring(&mem, 3);
        let mut r = region.queue(0).unwrap();
        r.restore(&mut q, &mem).unwrap();
        take(&mut q, &mut r, &mem, 3);
        answer(&mut q, &r, &mem, 0);
        // Head 1 reaches the used ring; the process dies before the region
        // says so.
        r.publishing(1);
        q.add_used(&mem, 1, 0).unwrap();
        let mut q2 = mq.create_queue::<Queue>().unwrap();
        let mut r2 = region.queue(0).unwrap();
        assert_eq!(r2.restore(&mut q2, &mem).unwrap().resubmit, 1);
        assert_eq!(q2.next_avail(), 2);
        assert_eq!(take(&mut q2, &mut r2, &mem, 1), vec![2]);
    }

    fn corrupt(write: &[(u64, &[u8])], fill: u16) -> String {
        let mem = memory();
        let (file, region) = fresh(&mem);
        let (_mq, mut q) = ring(&mem, fill);
        for (off, bytes) in write {
            file.write_all_at(bytes, *off).unwrap();
        }
        region
            .queue(0)
            .unwrap()
            .restore(&mut q, &mem)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_corrupt_region_is_refused_with_the_reason() {
        let desc = |head: u64| 16 + 16 * head;
        let e = corrupt(&[(8, &9u16.to_le_bytes())], 0);
        assert!(e.contains("layout version 9"), "{e}");
        let e = corrupt(&[(10, &8u16.to_le_bytes())], 0);
        assert!(e.contains("ring of 8 entries"), "{e}");
        let e = corrupt(&[(desc(3), &[5])], 0);
        assert!(e.contains("descriptor 3 has in-flight flag Some(5)"), "{e}");
        let e = corrupt(&[(14, &7u16.to_le_bytes())], 0);
        assert!(e.contains("out of step"), "{e}");
        // In flight, but the ring holds nothing unanswered.
        let e = corrupt(&[(desc(2), &[1])], 0);
        assert!(e.contains("avail ring holds 0"), "{e}");
        // In flight, but another descriptor is next on the ring.
        let e = corrupt(&[(desc(9), &[1])], 2);
        assert!(
            e.contains("descriptor 9 is in flight but not on the avail ring"),
            "{e}"
        );
    }

    #[test]
    fn a_region_of_the_wrong_shape_size_or_file_is_refused() {
        let (file, mut reply, _) = InflightRegion::create(&ask(2, QS), 4, 1024).unwrap();
        let adopt = |m: &VhostUserInflight, f: &File| {
            InflightRegion::adopt(m, f.try_clone().unwrap(), 4, 1024)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(adopt(&reply, &file), Ok(()));
        let mut m = reply;
        m.mmap_size += 64;
        assert!(adopt(&m, &file).unwrap_err().contains("take"));
        m = reply;
        m.num_queues = 5;
        assert!(adopt(&m, &file).unwrap_err().contains("1..=4 queues"));
        m = reply;
        m.queue_size = 24;
        assert!(adopt(&m, &file).unwrap_err().contains("power of two"));
        // Sized for bigger queues than the file holds.
        m = reply;
        m.queue_size = 64;
        m.mmap_size = 2 * queue_bytes(64) as u64;
        assert!(adopt(&m, &file).unwrap_err().contains("the region ends at"));
        // A file that could shrink under the card.
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(reply.mmap_size).unwrap();
        assert!(adopt(&reply, &plain).unwrap_err().contains("F_SEAL_SHRINK"));
        reply.mmap_offset = 100;
        assert!(adopt(&reply, &file).unwrap_err().contains("page aligned"));
    }
}
