//! The run-to-completion loop of one virtqueue: pop a chain, parse it,
//! turn it into a physical request at the volume's offset, submit the
//! batch, reap completions, write status bytes, fill the used ring and
//! notify the guest.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use vhost_user_backend::VringState;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::avail_ring::AvailCursor;
use super::batching::{answer_now, SUBMIT_BATCH, SUBMIT_BATCH_BYTES, SYNC_BATCH};
use super::desc_walk::DescWalk;
use super::hot_mem::HotMem;
use super::inflight::InflightQueue;
use super::iovec::push_iovecs;
use super::metrics::{BlkMetrics, Tally};
use super::notify_timing::NotifyTiming;
use super::request::{self, Refused, Request, RequestError, RequestKind, Segment, ID_BYTES};
use super::throttle::SharedThrottle;
use super::used_order::{Seq, UsedOrder};
use crate::crypto::Xts256;
use crate::device::{AlignedBuf, Crypt, DeviceQueue, IoCompletion, IoOp, IoRequest, MAX_SEGMENTS};
use crate::qos::{DeviceShare, QosLimits, ShareSlot};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

mod bounce;
mod notify;

use bounce::Bounce;

use super::clock::now_ns;

/// How long a queue keeps polling its ring after the last activity.
const POLL_WINDOW_NS: u64 = 50_000;
/// Longest stretch one call stays in the loop before going back to epoll.
const POLL_BUDGET_NS: u64 = 2_000_000;

/// A request handed to the device and not yet completed.
#[derive(Debug)]
struct Inflight {
    head: u16,
    seq: Seq,
    status: GuestAddress,
    kind: RequestKind,
    len: u64,
    /// Keeps the guest memory mapping alive while the device may still
    /// write into it, even if the frontend replaces the memory table.
    /// `None` for devices done with guest memory when `push` returns
    /// ([`DeviceQueue::done_in_push`]) and no bounce buffer to copy back
    /// from: the round's snapshot, borrowed across the `push`, kept it
    /// mapped. (Two atomic operations a request
    /// saved: each is a full barrier, see [`Tally`].)
    mem: Option<Arc<GuestMemoryMmap>>,
    /// Encrypted volumes: the ciphertext buffer the device reads or writes,
    /// and (for reads) the guest buffers the plaintext goes to.
    bounce: Option<Bounce>,
    /// When the request was started (`clock::now_ns`).
    started: u64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What an interface does to requests besides moving them: throttling,
/// encryption, fair sharing of the device.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub throttle: Arc<SharedThrottle>,
    pub cipher: Option<Arc<Xts256>>,
    pub share: Arc<DeviceShare>,
    pub share_slot: Arc<ShareSlot>,
}

/// A parsed request held back by the throttle or the device share.
#[derive(Debug)]
struct Pending {
    req: Request,
    seq: Seq,
    since: Instant,
    /// The throttle already admitted (and charged) it.
    admitted: bool,
}

/// How soon a queue held back by the device share looks again (its own
/// completions usually wake it first).
const SHARE_RETRY_NS: u64 = 100_000;

/// Data bytes a request counts against the byte limit.
fn data_bytes(req: &Request) -> u64 {
    match req.kind {
        RequestKind::Read | RequestKind::Write => req.len,
        _ => 0,
    }
}

/// A request ready for the used ring.
#[derive(Debug, Clone, Copy)]
struct Done {
    head: u16,
    seq: Seq,
    status_addr: GuestAddress,
    status: u8,
    /// Data bytes written into the guest's buffers.
    written: u32,
}

/// Where the volume lies on the device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VolumeRange {
    pub offset: u64,
    pub size: u64,
}

/// State of one virtqueue worker.
#[derive(Debug)]
pub(crate) struct QueueWorker {
    dev: Box<dyn DeviceQueue>,
    range: VolumeRange,
    id: [u8; ID_BYTES],
    metrics: Arc<BlkMetrics>,
    /// Request slots, indexed by the tag given to the device.
    slots: Vec<Option<Inflight>>,
    free: Vec<u16>,
    inflight: usize,
    completions: Vec<IoCompletion>,
    segments: Vec<Segment>,
    iov: Vec<libc::iovec>,
    /// Set when the guest broke the queue's invariants; the queue then
    /// stops until the device is reset.
    broken: bool,
    /// Signalled when the worker yields with work pending.
    resume: EventFd,
    throttle: Arc<SharedThrottle>,
    /// A parsed request waiting for tokens, with when it started waiting,
    /// and its data segments.
    pending: Option<Pending>,
    pending_segments: Vec<Segment>,
    /// Fires when the pending request may have its tokens.
    timer: TimerFd,
    /// The volume's cipher, when it is encrypted.
    cipher: Option<Arc<Xts256>>,
    /// The device's queue, shared fairly with the other volumes on it.
    share: Arc<DeviceShare>,
    share_slot: Arc<ShareSlot>,
    bounce_pool: Vec<AlignedBuf>,
    iov_pool: Vec<Vec<libc::iovec>>,
    /// Requests taken from the ring and not yet on the used ring.
    order: UsedOrder,
    /// This queue's part of the frontend's inflight region, if it set one.
    region: Option<InflightQueue>,
    /// [`SUBMIT_BATCH`] or [`SYNC_BATCH`], by the device.
    submit_batch: usize,
    /// Completed reads and writes not yet in `metrics`.
    tally: Tally,
    /// Whether the device completes each request in `push` (and is done
    /// with guest memory when it returns); otherwise a request in flight
    /// keeps the memory table it was started under.
    done_in_push: bool,
    /// Nanoseconds per request of the last batch of large requests (at
    /// least [`SUBMIT_BATCH_BYTES`]), from the start of one batch to the
    /// next.
    pace_ns: u64,
    /// The time of the current step of the loop, read once a round (after
    /// its submission) and after each batch of large requests on a device
    /// done in `push`: the latency counters cost about one clock read per
    /// round rather than two per request (their resolution is a round, a
    /// few microseconds). In `clock::now_ns`'s nanoseconds.
    clock: u64,
    /// How long to hold the notification of an answer the driver waits
    /// for.
    timing: NotifyTiming,
    /// A notification the driver's NO_INTERRUPT flag held back (without
    /// EVENT_IDX): the flag is looked at again each round while polling.
    owed: bool,
}

// SAFETY: the iovec scratch vector holds plain addresses that are only
// dereferenced by the device under the `push` contract.
unsafe impl Send for QueueWorker {}

impl QueueWorker {
    pub(crate) fn new(
        dev: Box<dyn DeviceQueue>,
        depth: u16,
        range: VolumeRange,
        id: [u8; ID_BYTES],
        metrics: Arc<BlkMetrics>,
        policy: Policy,
    ) -> io::Result<Self> {
        let Policy {
            throttle,
            cipher,
            share,
            share_slot,
        } = policy;
        let dev_done_in_push = dev.done_in_push();
        let submit_batch = if dev.completion_fd().is_some() {
            SUBMIT_BATCH
        } else {
            SYNC_BATCH
        };
        Ok(QueueWorker {
            dev,
            range,
            id,
            metrics,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            inflight: 0,
            completions: Vec::with_capacity(usize::from(depth)),
            segments: Vec::with_capacity(request::MAX_DESCRIPTORS),
            iov: Vec::with_capacity(MAX_SEGMENTS),
            broken: false,
            resume: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            throttle,
            pending: None,
            pending_segments: Vec::with_capacity(request::MAX_DESCRIPTORS),
            timer: TimerFd::new()?,
            cipher,
            share,
            share_slot,
            bounce_pool: Vec::new(),
            iov_pool: Vec::new(),
            order: UsedOrder::default(),
            region: None,
            submit_batch,
            tally: Tally::default(),
            done_in_push: dev_done_in_push,
            pace_ns: 0,
            clock: now_ns(),
            timing: NotifyTiming::default(),
            owed: false,
        })
    }

    pub(crate) fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.dev.completion_fd()
    }

    /// Records taken requests in `region` from now on.
    pub(crate) fn set_inflight(&mut self, region: Option<InflightQueue>) {
        self.region = region;
    }

    /// Makes the queue's thread look at the ring.
    pub(crate) fn wake(&self) {
        if let Err(e) = self.resume.write(1) {
            warn!("resume event: {e}");
        }
    }

    /// Event the worker signals itself to continue after yielding.
    pub(crate) fn resume_fd(&self) -> std::os::fd::RawFd {
        self.resume.as_raw_fd()
    }

    /// Throttle timer of this queue.
    pub(crate) fn timer_fd(&self) -> std::os::fd::RawFd {
        self.timer.as_raw_fd()
    }

    /// The throttle timer fired: the pending request may go.
    pub(crate) fn on_timer(
        &mut self,
        vring: &mut VringState<Mem>,
        mem: &Mem,
        event_idx: bool,
    ) -> io::Result<()> {
        if self.timer.is_armed().unwrap_or(false) {
            // Fired early or re-armed since: wait for the next expiry.
            return Ok(());
        }
        let _ = self.timer.clear();
        self.run(vring, mem, event_idx)
    }

    /// Continues after a yield.
    pub(crate) fn on_resume(
        &mut self,
        vring: &mut VringState<Mem>,
        mem: &Mem,
        event_idx: bool,
    ) -> io::Result<()> {
        let _ = self.resume.read();
        self.run(vring, mem, event_idx)
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken
    }

    /// Processes the queue until it is empty (or every slot is busy), with
    /// the EVENT_IDX re-check, and notifies the guest if it asked for it.
    pub(crate) fn run(
        &mut self,
        vring: &mut VringState<Mem>,
        mem: &Mem,
        event_idx: bool,
    ) -> io::Result<()> {
        if self.broken || !vring.get_queue().ready() {
            return Ok(());
        }
        // Counted here and added to the shared counters once, on the way
        // out: the loop itself touches no shared cache line.
        let (mut polls, mut idle_polls) = (0u64, 0u64);
        let r = self.poll_ring(vring, mem, event_idx, &mut polls, &mut idle_polls);
        self.tally.flush(&self.metrics);
        BlkMetrics::inc(&self.metrics.wakeups);
        BlkMetrics::add(&self.metrics.polls, polls);
        BlkMetrics::add(&self.metrics.idle_polls, idle_polls);
        r
    }

    /// [`QueueWorker::run`]'s loop: `polls` counts its rounds, `idle_polls`
    /// those that found neither a new request nor a completion.
    fn poll_ring(
        &mut self,
        vring: &mut VringState<Mem>,
        mem: &Mem,
        event_idx: bool,
        polls: &mut u64,
        idle_polls: &mut u64,
    ) -> io::Result<()> {
        let started = now_ns();
        self.clock = started;
        let mut idle_since = started;
        loop {
            *polls += 1;
            // Reloaded every round: the frontend may add memory regions
            // (ADD_MEM_REG) while this loop polls, and requests may use
            // them as soon as the frontend has its reply.
            let snapshot = mem.memory().into_inner();
            let hot = HotMem::new(&snapshot);
            // While we look at the ring, the driver need not kick.
            let _ = vring.get_queue_mut().disable_notification(&hot);
            let before = vring.get_queue().next_avail();
            let mut used = self.reap(vring, &hot);
            used |= self.pop_all(vring, &hot, event_idx);
            self.dev.submit()?;
            self.clock = now_ns();
            used |= self.reap(vring, &hot);
            if used || self.owed {
                self.notify(vring, &hot, event_idx);
            }
            if self.broken || self.pending.is_some() {
                // Throttled: the timer calls back in; meanwhile the ring
                // keeps its requests (and the driver need not kick).
                break;
            }
            // The clock read after `submit` serves the round's end too:
            // each read costs this loop more than the 16 ns it takes alone.
            let now = self.clock;
            if used || vring.get_queue().next_avail() != before {
                idle_since = now;
            } else {
                *idle_polls += 1;
                // Nothing to do this round: the counters catch up.
                self.tally.flush(&self.metrics);
            }
            // Adaptive polling: keep watching the ring (and the device)
            // for a short while after the last activity, as QEMU's
            // iothreads do, so that a busy driver needs no kicks and a
            // busy device no wake-ups. Bounded so that the control thread
            // gets the vring lock regularly.
            let polling = now.saturating_sub(idle_since) < POLL_WINDOW_NS;
            if polling && now.saturating_sub(started) < POLL_BUDGET_NS {
                std::hint::spin_loop();
                continue;
            }
            if self.free.is_empty() {
                // Slots free up on completion; the completion event calls
                // back in.
                break;
            }
            match vring.get_queue_mut().enable_notification(&hot) {
                Ok(false) => {
                    self.timing.gave_up();
                    break;
                }
                Ok(true) if now.saturating_sub(started) < POLL_BUDGET_NS => continue,
                Ok(true) => {
                    // Work is pending but the budget is spent: wake
                    // ourselves through the epoll loop, after whatever the
                    // control thread is waiting to do.
                    if let Err(e) = self.resume.write(1) {
                        warn!("resume event: {e}");
                    }
                    break;
                }
                Err(e) => {
                    self.mark_broken(&format!("enable_notification: {e}"));
                    break;
                }
            }
        }
        Ok(())
    }

    /// Handles a completion event from the device.
    pub(crate) fn on_completion(
        &mut self,
        vring: &mut VringState<Mem>,
        mem: &Mem,
        event_idx: bool,
    ) -> io::Result<()> {
        let snapshot = mem.memory().into_inner();
        let hot = HotMem::new(&snapshot);
        self.clock = now_ns();
        if self.reap(vring, &hot) {
            self.notify(vring, &hot, event_idx);
        }
        // Requests may have waited for a free slot.
        self.run(vring, mem, event_idx)
    }

    /// Waits until nothing is in flight (before the queue stops or guest
    /// memory goes away).
    pub(crate) fn drain(&mut self, vring: Option<&mut VringState<Mem>>, mem: &Mem) {
        let snapshot = mem.memory().into_inner();
        let hot = HotMem::new(&snapshot);
        let mut vring = vring;
        // A request held back by the throttle was taken off the ring: it
        // must complete before the ring's state is handed back.
        if let Some(p) = self.pending.take() {
            if let Some(vr) = vring.as_deref_mut() {
                std::mem::swap(&mut self.segments, &mut self.pending_segments);
                if p.req.kind != RequestKind::GetId {
                    self.share.force_start(&self.share_slot);
                }
                if self.start(vr, &hot, p.req, p.seq) {
                    self.notify(vr, &hot, true);
                }
            }
        }
        let _ = self.timer.clear();
        let _ = self.dev.submit();
        while self.inflight > 0 {
            self.clock = now_ns();
            self.completions.clear();
            self.dev.reap(&mut self.completions);
            if self.completions.is_empty() {
                if let Err(e) = self.dev.wait() {
                    warn!("waiting for in-flight requests: {e}");
                    break;
                }
                continue;
            }
            let done = std::mem::take(&mut self.completions);
            for c in &done {
                if let Some(done) = self.finish(c) {
                    if let Some(vr) = vring.as_deref_mut() {
                        self.complete(vr, &hot, done);
                    }
                }
            }
            self.completions = done;
        }
        if let Some(vr) = vring {
            // Draining ends the queue: signal what was answered, with
            // EVENT_IDX if the driver asked, without it always (its
            // no-interrupt flag ignored). The next ring start signals
            // once anyway.
            self.notify(vr, &hot, true);
        }
        self.tally.flush(&self.metrics);
        // Whatever was not published goes with the ring.
        self.order.clear();
    }

    fn mark_broken(&mut self, why: &str) {
        if !self.broken {
            warn!("virtqueue marked broken: {why}");
        }
        self.broken = true;
    }

    /// Pops and starts requests while slots are free. Returns whether any
    /// request was completed at once.
    fn pop_all(&mut self, vring: &mut VringState<Mem>, mem: &HotMem<'_>, event_idx: bool) -> bool {
        let mut used = false;
        // The avail index is read once here, and again only when the
        // entries it announced are used up. A frontend that moves it more
        // than a queue's worth ahead of us has broken the ring (virtio
        // 2.7.13.3); stop this queue.
        let mut avail = AvailCursor::load(vring.get_queue(), mem);
        // Requests known to wait in the ring behind the one being started
        // (those seen now; later ones are not counted).
        let mut ahead = 0u16;
        if let Some(c) = &avail {
            let pending = c.waiting(vring.get_queue());
            if pending > vring.get_queue().size() {
                self.mark_broken("avail index moved more than the queue size");
                return false;
            }
            ahead = pending;
        }
        // A request that waited goes first.
        if let Some(mut p) = self.pending.take() {
            if !p.admitted {
                if let Err(wait) = self.throttle.admit(data_bytes(&p.req)) {
                    self.pending = Some(p);
                    self.arm_timer(wait);
                    return used;
                }
                p.admitted = true;
                BlkMetrics::add(&self.metrics.throttled_ns, nanos(p.since.elapsed()));
            }
            if !self.share_try_start(&p.req) {
                self.pending = Some(p);
                self.arm_timer(SHARE_RETRY_NS);
                return used;
            }
            std::mem::swap(&mut self.segments, &mut self.pending_segments);
            used |= self.start(vring, mem, p.req, p.seq);
        }
        let (mut batch, mut batch_bytes) = (0usize, 0u64);
        let mut batch_started = self.clock;
        // Whether `batch_started` is the clock read just before this batch.
        let mut paced = true;
        let mut signalled = false;
        let (table, size) = {
            let q = vring.get_queue();
            (GuestAddress(q.desc_table()), q.size())
        };
        let Some(avail) = avail.as_mut() else {
            return used;
        };
        while !self.free.is_empty() {
            let Some(head) = avail.pop(vring.get_queue_mut(), mem) else {
                break;
            };
            // A request: the driver is back (closes the timing of the
            // answer it may have waited for).
            self.timing.arrived(self.clock);
            ahead = ahead.saturating_sub(1);
            let seq = self.order.take();
            if let Some(r) = &mut self.region {
                r.taken(head);
            }
            let descs = DescWalk::new(mem, table, size, head);
            let parsed = request::parse(descs, head, mem, self.range.size, &mut self.segments);
            match parsed {
                Ok(req) => {
                    if let Err(wait) = self.throttle.admit(data_bytes(&req)) {
                        BlkMetrics::inc(&self.metrics.throttled_requests);
                        std::mem::swap(&mut self.segments, &mut self.pending_segments);
                        self.pending = Some(Pending {
                            req,
                            seq,
                            since: Instant::now(),
                            admitted: false,
                        });
                        self.arm_timer(wait);
                        break;
                    }
                    if !self.share_try_start(&req) {
                        std::mem::swap(&mut self.segments, &mut self.pending_segments);
                        self.pending = Some(Pending {
                            req,
                            seq,
                            since: Instant::now(),
                            admitted: true,
                        });
                        self.arm_timer(SHARE_RETRY_NS);
                        break;
                    }
                    batch_bytes += req.len;
                    used |= self.start(vring, mem, req, seq);
                }
                Err(refused) => {
                    self.refuse(vring, mem, &refused, seq);
                    used = true;
                }
            }
            batch += 1;
            if batch == self.submit_batch
                || self.batch_full(vring, mem, avail, batch_bytes, &mut ahead)
            {
                // Long runs of requests: hand what we have to the device
                // and the finished ones back to the driver, so both start
                // working while we parse the rest.
                let submitted = self.dev.submit().is_ok();
                // The clock is read here only for the pace of large
                // requests on devices done in `push` (ANSWER_AHEAD_NS):
                // each read in this loop costs far more than the 16 ns it
                // takes alone (one per batch of 4 cost `null-untouched` 4k
                // reads at QD32 6-9 %, one per request `null` 128 KiB reads
                // 30 %; `softcard bench storage`, A/Bs). Requests of one
                // round otherwise share its clock reading, so the latency
                // histograms count a small request done in `push` from the
                // round's start to its end (or as 0 when answered within
                // the round).
                if self.done_in_push && batch_bytes >= SUBMIT_BATCH_BYTES {
                    self.clock = now_ns();
                    // The pace from one large batch to the next leaves out
                    // a batch after a notification (one that wakes the
                    // driver takes this thread ~10 us) and one after small
                    // batches (whose time was not read).
                    if paced && !signalled {
                        let ns = self.clock.saturating_sub(batch_started);
                        // One request a batch unless they are slow: no
                        // division in the common case.
                        self.pace_ns = if batch > 1 { ns / batch as u64 } else { ns };
                    }
                    batch_started = self.clock;
                    paced = true;
                } else {
                    paced = false;
                }
                (batch, batch_bytes) = (0, 0);
                signalled =
                    submitted && self.reap(vring, mem) && self.notify(vring, mem, event_idx);
            }
        }
        used
    }

    /// Whether the requests popped since the last batch, `bytes` of data,
    /// should be handed to the device (and, done in `push`, answered) now
    /// rather than with the next ones, with `ahead` more known to wait in
    /// the ring.
    fn batch_full(
        &self,
        vring: &VringState<Mem>,
        mem: &HotMem<'_>,
        avail: &mut AvailCursor,
        bytes: u64,
        ahead: &mut u16,
    ) -> bool {
        if !self.done_in_push {
            return bytes >= SUBMIT_BATCH_BYTES;
        }
        answer_now(bytes, self.pace_ns, ahead, || {
            avail.refresh(vring.get_queue(), mem)
        })
    }

    /// Counts a request that goes to the device against the volume's share;
    /// false when the volume is over its share right now.
    fn share_try_start(&self, req: &Request) -> bool {
        req.kind == RequestKind::GetId || self.share.try_start(&self.share_slot)
    }

    fn arm_timer(&mut self, wait_ns: u64) {
        if let Err(e) = self.timer.reset(Duration::from_nanos(wait_ns), None) {
            // Without a timer the request would wait forever: let it go.
            warn!("throttle timer: {e}; not throttling this request");
            if let Err(e) = self.resume.write(1) {
                warn!("resume event: {e}");
            }
            self.throttle.set(QosLimits::default());
        }
    }

    fn refuse(&mut self, vring: &mut VringState<Mem>, mem: &HotMem<'_>, r: &Refused, seq: Seq) {
        debug!("refused request head {}: {}", r.head, r.error);
        let status = if matches!(r.error, RequestError::Unsupported(_)) {
            BlkMetrics::inc(&self.metrics.unsupported_requests);
            VIRTIO_BLK_S_UNSUPP
        } else {
            BlkMetrics::inc(&self.metrics.invalid_requests);
            VIRTIO_BLK_S_IOERR
        };
        let mut len = 0;
        if let Some(addr) = r.status {
            if mem.write_byte(status as u8, addr) {
                len = 1;
            }
        }
        self.publish(vring, mem, seq, r.head, len);
    }

    /// Puts an answered request on the used ring, after every request
    /// taken before it ([`UsedOrder`]), and in the inflight region.
    fn publish(
        &mut self,
        vring: &mut VringState<Mem>,
        mem: &HotMem<'_>,
        seq: Seq,
        head: u16,
        len: u32,
    ) {
        let region = self.region.as_ref();
        if let Err(e) = self.order.publish(vring, mem, region, seq, head, len) {
            self.mark_broken(&format!("add_used: {e}"));
        }
    }

    /// Starts one valid request. Returns whether it completed at once.
    fn start(
        &mut self,
        vring: &mut VringState<Mem>,
        mem: &HotMem<'_>,
        req: Request,
        seq: Seq,
    ) -> bool {
        let op = match req.kind {
            RequestKind::GetId => {
                let mut written = 0usize;
                for s in &self.segments {
                    if written == ID_BYTES {
                        break;
                    }
                    let take = (ID_BYTES - written).min(s.len as usize);
                    if mem
                        .write_slice(&self.id[written..written + take], s.addr)
                        .is_err()
                    {
                        break;
                    }
                    written += take;
                }
                BlkMetrics::inc(&self.metrics.get_id_ops);
                let done = Done {
                    head: req.head,
                    seq,
                    status_addr: req.status,
                    status: VIRTIO_BLK_S_OK as u8,
                    written: written as u32,
                };
                self.complete(vring, mem, done);
                return true;
            }
            RequestKind::Read => IoOp::Read,
            RequestKind::Write => IoOp::Write,
            RequestKind::Flush => IoOp::Flush,
            RequestKind::Discard => IoOp::Discard,
            RequestKind::WriteZeroes if self.cipher.is_some() => {
                // Not offered on encrypted volumes: raw zeroes would read
                // back as the decryption of zeroes, not as zeroes.
                let refused = Refused {
                    head: req.head,
                    status: Some(req.status),
                    error: RequestError::Unsupported(VIRTIO_BLK_T_WRITE_ZEROES),
                };
                self.refuse(vring, mem, &refused, seq);
                self.share.done(&self.share_slot);
                return true;
            }
            RequestKind::WriteZeroes => IoOp::WriteZeroes,
        };
        // Translate guest segments to host iovecs (a segment may span
        // several memory regions).
        self.iov.clear();
        if matches!(op, IoOp::Read | IoOp::Write) {
            let mut error = None;
            for s in &self.segments {
                if let Err(e) = push_iovecs(&mut self.iov, mem, *s) {
                    error = Some(e);
                    break;
                }
            }
            if let Some(error) = error {
                let refused = Refused {
                    head: req.head,
                    status: Some(req.status),
                    error,
                };
                self.refuse(vring, mem, &refused, seq);
                // It was counted against the device share but never went.
                self.share.done(&self.share_slot);
                return true;
            }
        }
        // Encrypted volumes: devices that can, encrypt in line; for the
        // others the request goes through a ciphertext bounce buffer.
        let inline = self.cipher.is_some() && self.dev.inline_crypto();
        let bounce = match (&self.cipher, op) {
            (Some(_), IoOp::Read | IoOp::Write) if !inline => {
                Some(self.encrypt_into_bounce(op, &req))
            }
            _ => None,
        };
        let tag = self.free.pop().expect("caller checked for a free slot");
        self.slots[usize::from(tag)] = Some(Inflight {
            head: req.head,
            seq,
            status: req.status,
            kind: req.kind,
            len: req.len,
            // A bounce's guest buffers are written after `push` (the
            // plaintext of a read, in `finish`): those keep the table too.
            mem: (!self.done_in_push || bounce.is_some()).then(|| Arc::clone(mem.snapshot())),
            bounce,
            started: self.clock,
        });
        self.inflight += 1;
        let crypt = match (&self.cipher, inline) {
            (Some(c), true) => Some(Crypt {
                cipher: c,
                first_sector: req.offset / request::SECTOR_BYTES,
            }),
            _ => None,
        };
        let io = IoRequest {
            crypt,
            op,
            offset: self.range.offset + req.offset,
            len: req.len,
            segments: &self.iov,
            tag,
        };
        debug_assert!(io.offset + io.len <= self.range.offset + self.range.size);
        // SAFETY: the iovecs point into guest memory kept mapped by the
        // `Arc<GuestMemoryMmap>` stored in the slot until the completion for
        // `tag` is reaped, or, for a device done with them when `push`
        // returns (`done_in_push`, no bounce), by the round's snapshot
        // that `mem` borrows across this call; `parse` checked each range lies in
        // guest memory and that the device-side range lies inside the
        // volume.
        unsafe { self.dev.push(io) };
        false
    }

    /// Takes the slot of a completion. Returns what to complete.
    fn finish(&mut self, c: &IoCompletion) -> Option<Done> {
        let slot = self.slots.get_mut(usize::from(c.tag))?;
        let mut f = slot.take()?;
        self.free.push(c.tag);
        self.inflight -= 1;
        self.share.done(&self.share_slot);
        if let Some(b) = f.bounce.take() {
            self.finish_bounce(b, f.kind, f.len, c.result.is_ok());
        }
        let m = &self.metrics;
        let status = match &c.result {
            Ok(_) => {
                let took_ns = self.clock.saturating_sub(f.started);
                match f.kind {
                    RequestKind::Read => self.tally.read(f.len, took_ns),
                    RequestKind::Write => self.tally.write(f.len, took_ns),
                    RequestKind::Flush => {
                        BlkMetrics::inc(&m.flush_ops);
                        m.flush_latency.record(Duration::from_nanos(took_ns));
                    }
                    RequestKind::Discard => {
                        BlkMetrics::inc(&m.discard_ops);
                        m.discard_latency.record(Duration::from_nanos(took_ns));
                    }
                    RequestKind::WriteZeroes => {
                        BlkMetrics::inc(&m.write_zeroes_ops);
                        m.discard_latency.record(Duration::from_nanos(took_ns));
                    }
                    RequestKind::GetId => {}
                }
                VIRTIO_BLK_S_OK
            }
            Err(e) => {
                warn!("{:?} of {} B failed: {e}", f.kind, f.len);
                BlkMetrics::inc(&m.io_errors);
                VIRTIO_BLK_S_IOERR
            }
        };
        let written = if f.kind == RequestKind::Read && status == VIRTIO_BLK_S_OK {
            u32::try_from(f.len).unwrap_or(u32::MAX)
        } else {
            0
        };
        drop(f.mem);
        Some(Done {
            head: f.head,
            seq: f.seq,
            status_addr: f.status,
            status: status as u8,
            written,
        })
    }

    fn reap(&mut self, vring: &mut VringState<Mem>, mem: &HotMem<'_>) -> bool {
        self.completions.clear();
        self.dev.reap(&mut self.completions);
        if self.completions.is_empty() {
            return false;
        }
        let done = std::mem::take(&mut self.completions);
        for c in &done {
            if let Some(done) = self.finish(c) {
                self.complete(vring, mem, done);
            }
        }
        self.completions = done;
        true
    }

    fn complete(&mut self, vring: &mut VringState<Mem>, mem: &HotMem<'_>, done: Done) {
        // The used length is the number of bytes written into device-writable
        // buffers: the data a read or GET_ID returned, plus the status byte.
        let Done {
            head,
            seq,
            status_addr,
            status,
            written,
        } = done;
        let len = if mem.write_byte(status, status_addr) {
            written.saturating_add(1)
        } else {
            0
        };
        self.publish(vring, mem, seq, head, len);
    }
}
