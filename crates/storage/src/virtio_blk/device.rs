//! The vhost-user-blk backend: features, config space and the glue from
//! the queue threads ([`super::event_loop`]) to the queue workers (one
//! thread and one worker per virtqueue). It implements vhost-user-backend's
//! `VhostUserBackend` trait, which [`super::handler`] drives.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use log::error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringMutex, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::inflight::{InflightError, InflightQueue, Restored};

use super::metrics::BlkMetrics;
use super::request::{ID_BYTES, MAX_RANGES, SECTOR_BYTES};
use super::throttle::SharedThrottle;
use super::worker::{Policy, QueueWorker, VolumeRange};
use crate::crypto::Xts256;
use crate::device::PhysicalDevice;
use crate::qos::{DeviceShare, ShareSlot};

pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Where one started virtqueue stands, read from the ring and the card's
/// own state at one moment: what an operator needs to tell which side a
/// stuck guest disk waits on. Requests offered and not taken:
/// `avail_idx - next_avail`; taken and not answered: `next_avail -
/// used_idx`; an answered request the driver has not been told of:
/// `used_event` (EVENT_IDX) behind `used_idx` while nothing else moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RingPosition {
    /// Queue index.
    pub queue: u16,
    /// The driver's avail index (requests it has offered so far).
    pub avail_idx: u16,
    /// The next avail entry the card takes.
    pub next_avail: u16,
    /// The card's used index (requests answered onto the ring).
    pub used_idx: u16,
    /// Where the driver asked to be interrupted (it has seen the used
    /// ring up to here), when EVENT_IDX was negotiated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_event: Option<u16>,
}

/// Largest virtqueue a frontend may configure; also the number of request
/// slots per queue worker.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most queues one interface offers.
pub const MAX_QUEUES: u16 = 16;
/// Data segments per request the guest may use (a 128-entry queue less
/// header and status); Linux also caps requests with it.
const SEG_MAX: u32 = 126;
/// Largest discard / write-zeroes in sectors (1 GiB).
const MAX_ZERO_SECTORS: u32 = 1 << 21;

/// What one interface serves.
#[derive(Debug, Clone)]
pub struct BlkTarget {
    /// Volume name (becomes the GET_ID serial).
    pub name: String,
    /// Device the volume lives on.
    pub device: Arc<dyn PhysicalDevice>,
    /// First byte of the volume on the device.
    pub offset: u64,
    /// Volume size in bytes.
    pub size: u64,
    /// Cipher of an encrypted volume.
    pub cipher: Option<Arc<Xts256>>,
    /// The device's fair-share state, and this volume's slot in it.
    pub share: Arc<DeviceShare>,
    /// This volume's slot in `share`.
    pub share_slot: Arc<ShareSlot>,
}

struct Inner {
    num_queues: u16,
    /// The volume is encrypted: WRITE_ZEROES is not offered (zeroes on the
    /// device would read back as the decryption of zeroes; the guest
    /// writes zeroed blocks instead, as over dm-crypt).
    encrypted: bool,
    config: Vec<u8>,
    mem: Mem,
    workers: Vec<Mutex<QueueWorker>>,
    /// Each worker's vring, kept from its first event: stopping a queue
    /// (`GET_VRING_BASE`) drains the worker *with* it, so that what the
    /// worker took off the ring is on the used ring before the base is
    /// answered.
    vrings: Vec<OnceLock<VringMutex<Mem>>>,
    /// Quiesced ([`BlkBackend::quiesce`]): the queues take no more
    /// requests.
    quiesced: AtomicBool,
    event_idx: AtomicBool,
    metrics: Arc<BlkMetrics>,
    failed: AtomicBool,
}

/// The backend of one connection, shared by its message handler and its
/// queue threads; cheap to clone.
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("num_queues", &self.inner.num_queues)
            .finish()
    }
}

/// Event id of a worker's device completions (ids up to `num_queues` are
/// the event loop's: the kick, and the exit).
pub(crate) fn completion_event(num_queues: u16) -> u64 {
    u64::from(num_queues) + 1
}

/// Event id of a worker's throttle timer (see [`completion_event`]).
pub(crate) fn timer_event(num_queues: u16) -> u64 {
    u64::from(num_queues) + 3
}

/// Event id of a worker's resume event (see [`completion_event`]).
pub(crate) fn resume_event(num_queues: u16) -> u64 {
    u64::from(num_queues) + 2
}

fn config_space(size: u64, num_queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&(size / SECTOR_BYTES).to_le_bytes()); // capacity
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
    c[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size
    c[24] = 3; // physical_block_exp: 4 KiB physical blocks
    c[26..28].copy_from_slice(&8u16.to_le_bytes()); // min_io_size (sectors)
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes()); // max_discard_sectors
    c[40..44].copy_from_slice(&(MAX_RANGES as u32).to_le_bytes()); // max_discard_seg
    c[44..48].copy_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment
    c[48..52].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    c[52..56].copy_from_slice(&(MAX_RANGES as u32).to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

/// Serial number for GET_ID: the volume name, zero padded to 20 bytes.
fn serial(name: &str) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let n = name.len().min(ID_BYTES);
    id[..n].copy_from_slice(&name.as_bytes()[..n]);
    id
}

impl BlkBackend {
    /// Builds the backend with one worker (and device queue) per virtqueue.
    pub(crate) fn new(
        target: &BlkTarget,
        num_queues: u16,
        mem: Mem,
        metrics: Arc<BlkMetrics>,
        throttle: Arc<SharedThrottle>,
    ) -> io::Result<Self> {
        let range = VolumeRange {
            offset: target.offset,
            size: target.size,
        };
        let mut workers = Vec::with_capacity(usize::from(num_queues));
        for _ in 0..num_queues {
            let dq = target.device.open_queue(MAX_QUEUE_SIZE)?;
            workers.push(Mutex::new(QueueWorker::new(
                dq,
                MAX_QUEUE_SIZE,
                range,
                serial(&target.name),
                metrics.clone(),
                Policy {
                    throttle: throttle.clone(),
                    cipher: target.cipher.clone(),
                    share: target.share.clone(),
                    share_slot: target.share_slot.clone(),
                },
            )?));
        }
        Ok(BlkBackend {
            inner: Arc::new(Inner {
                num_queues,
                encrypted: target.cipher.is_some(),
                config: config_space(target.size, num_queues),
                mem,
                vrings: (0..workers.len()).map(|_| OnceLock::new()).collect(),
                workers,
                quiesced: AtomicBool::new(false),
                event_idx: AtomicBool::new(false),
                metrics,
                failed: AtomicBool::new(false),
            }),
        })
    }

    /// Each started ring's position ([`RingPosition`]). Takes each ring's
    /// lock (not its worker's), which a worker holds for at most one
    /// polling budget.
    pub(crate) fn ring_positions(&self) -> Vec<RingPosition> {
        let mem = self.inner.mem.memory();
        let event_idx = self.inner.event_idx.load(Ordering::Relaxed);
        let mut out = Vec::new();
        for (i, slot) in self.inner.vrings.iter().enumerate() {
            let Some(v) = slot.get() else { continue };
            let state = v.get_ref();
            let q = state.get_queue();
            if !q.ready() {
                continue;
            }
            let Ok(avail) = q.avail_idx(&*mem, Ordering::Acquire) else {
                continue;
            };
            out.push(RingPosition {
                queue: u16::try_from(i).unwrap_or(u16::MAX),
                avail_idx: avail.0,
                next_avail: q.next_avail(),
                used_idx: q.next_used(),
                // After the avail ring's entries (virtio 2.7.10).
                used_event: if event_idx {
                    q.avail_ring()
                        .checked_add(4 + 2 * u64::from(q.size()))
                        .and_then(|a| mem.read_obj::<u16>(GuestAddress(a)).ok())
                        .map(u16::from_le)
                } else {
                    None
                },
            });
        }
        out
    }

    fn worker(&self, i: usize) -> MutexGuard<'_, QueueWorker> {
        self.inner.workers[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Completion eventfd of worker `i`, if its device completes
    /// asynchronously.
    pub(crate) fn completion_fd(&self, i: usize) -> Option<std::os::fd::RawFd> {
        self.worker(i).completion_fd()
    }

    pub(crate) fn timer_fd(&self, i: usize) -> std::os::fd::RawFd {
        self.worker(i).timer_fd()
    }

    pub(crate) fn resume_fd(&self, i: usize) -> std::os::fd::RawFd {
        self.worker(i).resume_fd()
    }

    /// Waits for every request in flight, on every queue.
    pub(crate) fn drain(&self) {
        for i in 0..self.inner.workers.len() {
            self.worker(i).drain(None, &self.inner.mem);
        }
    }

    /// Stops taking requests and completes every request taken onto the
    /// used rings, notifying the driver (before the card closes the
    /// connection on its own: a stop or an upgrade).
    pub(crate) fn quiesce(&self) {
        self.inner.quiesced.store(true, Ordering::SeqCst);
        for i in 0..self.inner.workers.len() {
            let _ = self.stop_vring(u32::try_from(i).unwrap_or(u32::MAX));
        }
    }

    /// Before queue `i` starts: hands its worker its part of the inflight
    /// region (if the frontend set one up) after restoring what a previous
    /// process left there onto the ring.
    pub(crate) fn start_queue(
        &self,
        i: usize,
        vring: &VringMutex<Mem>,
        inflight: Option<InflightQueue>,
    ) -> Result<Restored, InflightError> {
        let Some(slot) = self.inner.workers.get(i) else {
            return Ok(Restored { resubmit: 0 });
        };
        if let Some(v) = self.inner.vrings.get(i) {
            v.get_or_init(|| vring.clone());
        }
        // Worker, then vring: the order handle_event takes them in.
        let mut w = slot.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut q) = inflight else {
            w.set_inflight(None);
            return Ok(Restored { resubmit: 0 });
        };
        let mem = self.inner.mem.memory();
        let restored = q.restore(vring.get_mut().get_queue_mut(), &*mem)?;
        w.set_inflight(Some(q));
        Ok(restored)
    }

    /// Makes queue `i`'s thread look at its ring.
    pub(crate) fn wake(&self, i: usize) {
        if i < self.inner.workers.len() {
            self.worker(i).wake();
        }
    }

    /// Whether a worker panicked or a queue was marked broken.
    pub fn failed(&self) -> bool {
        self.inner.failed.load(Ordering::Relaxed)
            || (0..self.inner.workers.len()).any(|i| self.worker(i).is_broken())
    }

    /// The interface's counters.
    pub fn metrics(&self) -> &Arc<BlkMetrics> {
        &self.inner.metrics
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringMutex<Mem>;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_DISCARD
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if !self.inner.encrypted {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if self.inner.num_queues > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = &self.inner.config;
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        let mut out = c[start..end].to_vec();
        // The frontend expects exactly `size` bytes back.
        out.resize(size.min(256) as usize, 0);
        out
    }

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        // `mem` is the same GuestMemoryAtomic the workers hold; in-flight
        // requests keep their own snapshot of the old table alive.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.num_queues).map(|i| 1u64 << i).collect()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let i = queue_index as usize;
        if let Some(w) = self.inner.workers.get(i) {
            // Worker, then vring: the order handle_event takes them in.
            let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
            match self.inner.vrings.get(i).and_then(OnceLock::get) {
                // Everything taken completes onto the used ring (a request
                // the throttle holds back is started now), and the driver
                // is notified.
                Some(v) => w.drain(Some(&mut v.get_mut()), &self.inner.mem),
                // Never woken: nothing was taken.
                None => w.drain(None, &self.inner.mem),
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // One queue per thread: `vrings` holds this thread's queue only
        // (kicks arrive as device_event 0), and the worker is the queue
        // with the thread's index.
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        if let Some(slot) = self.inner.vrings.get(thread_id) {
            slot.get_or_init(|| vring.clone());
        }

        let event_idx = self.inner.event_idx.load(Ordering::Relaxed);
        let completion = u64::from(device_event) == completion_event(self.inner.num_queues);
        let resume = u64::from(device_event) == resume_event(self.inner.num_queues);
        let timer = u64::from(device_event) == timer_event(self.inner.num_queues);
        // A panic stays in this interface: it is logged, the interface is
        // marked failed, and the daemon and other volumes carry on.
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut w = self.worker(thread_id);
            // Quiesced (checked under the worker's lock, which quiesce
            // drains under): kicks wait on the ring for the next
            // connection.
            if self.inner.quiesced.load(Ordering::SeqCst) {
                return Ok(());
            }
            let mut vr = vring.get_mut();
            if completion {
                w.on_completion(&mut vr, &self.inner.mem, event_idx)
            } else if timer {
                w.on_timer(&mut vr, &self.inner.mem, event_idx)
            } else if resume {
                w.on_resume(&mut vr, &self.inner.mem, event_idx)
            } else {
                w.run(&mut vr, &self.inner.mem, event_idx)
            }
        }));
        match outcome {
            Ok(r) => r,
            Err(_) => {
                error!("queue {thread_id} worker panicked; interface marked failed");
                self.inner.failed.store(true, Ordering::Relaxed);
                Ok(())
            }
        }
    }
}
