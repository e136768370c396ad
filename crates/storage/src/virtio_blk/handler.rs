//! The vhost-user message handler of one connection: memory table, ring
//! setup and teardown, configuration space and the inflight region.
//!
//! rust-vmm's `vhost` crate parses the messages and calls this handler;
//! `vhost-user-backend` provides the ring state ([`VringMutex`]). Its own
//! handler has no inflight region (`GET_INFLIGHT_FD` / `SET_INFLIGHT_FD`),
//! which a card that is restarted under running VMs needs, hence this one.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VhostUserError, GpuBackend, Result as VhostUserResult,
    VhostUserBackendReqHandlerMut,
};
use vhost_user_backend::{VhostUserBackend, VringMutex, VringT};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap, GuestRegionMmap};

use super::device::{BlkBackend, Mem, MAX_QUEUE_SIZE};
use super::event_loop::{EventLoop, KICK};
use super::inflight::InflightRegion;
use super::metrics::BlkMetrics;

/// Memory slots offered with `CONFIGURE_MEM_SLOTS` (QEMU's limit).
const MAX_MEM_SLOTS: u64 = 509;

/// Where a frontend address range lies in guest physical memory.
#[derive(Debug)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

fn refuse(e: impl std::fmt::Display) -> VhostUserError {
    VhostUserError::ReqHandlerError(io::Error::other(e.to_string()))
}

/// Handler of one frontend connection.
pub(crate) struct BlkHandler {
    name: String,
    backend: BlkBackend,
    mem: Mem,
    vrings: Vec<VringMutex<Mem>>,
    loops: Vec<Arc<EventLoop>>,
    threads: Vec<JoinHandle<()>>,
    /// Whether each ring's kick fd is in its thread's epoll set.
    watching: Vec<bool>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    mappings: Vec<AddrMapping>,
    inflight: Option<Arc<InflightRegion>>,
}

impl BlkHandler {
    /// Starts one epoll thread per queue of `backend`.
    pub(crate) fn new(name: &str, backend: BlkBackend, mem: Mem) -> io::Result<Self> {
        let n = backend.num_queues();
        let mut vrings = Vec::with_capacity(n);
        for _ in 0..n {
            vrings.push(
                VringMutex::new(mem.clone(), MAX_QUEUE_SIZE)
                    .map_err(|e| io::Error::other(format!("vring: {e}")))?,
            );
        }
        let mut h = BlkHandler {
            name: name.to_owned(),
            backend: backend.clone(),
            mem,
            vrings,
            loops: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
            watching: vec![false; n],
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            mappings: Vec::new(),
            inflight: None,
        };
        for i in 0..n {
            let (ev, t) = EventLoop::spawn(backend.clone(), h.vrings[i].clone(), i)?;
            h.loops.push(ev);
            h.threads.push(t);
        }
        Ok(h)
    }

    /// Queue `i`'s epoll set, to watch the backend's own descriptors.
    pub(crate) fn event_loop(&self, i: usize) -> &EventLoop {
        &self.loops[i]
    }

    fn vring(&self, index: u32) -> VhostUserResult<&VringMutex<Mem>> {
        self.vrings
            .get(index as usize)
            .ok_or(VhostUserError::InvalidParam)
    }

    fn vmm_va_to_gpa(&self, vmm_va: u64) -> VhostUserResult<u64> {
        self.mappings
            .iter()
            .find(|m| vmm_va >= m.vmm_addr && vmm_va - m.vmm_addr < m.size)
            .map(|m| vmm_va - m.vmm_addr + m.gpa_base)
            .ok_or_else(|| refuse(format!("ring address {vmm_va:#x} is in no memory region")))
    }

    /// Watches ring `i`'s kick fd exactly while the ring is started and
    /// enabled.
    fn update_watch(&mut self, i: usize) -> VhostUserResult<()> {
        let (fd, want) = {
            let v = self.vrings[i].get_ref();
            let fd = v.get_kick().as_ref().map(AsRawFd::as_raw_fd);
            (fd, v.get_queue().ready() && v.is_enabled())
        };
        let Some(fd) = fd else {
            self.watching[i] = false;
            return Ok(());
        };
        if want && !self.watching[i] {
            self.loops[i]
                .add(fd, KICK)
                .map_err(VhostUserError::ReqHandlerError)?;
            self.watching[i] = true;
        } else if !want && self.watching[i] {
            self.loops[i].remove(fd, KICK);
            self.watching[i] = false;
        }
        Ok(())
    }

    /// Starts ring `i` once it has its kick fd: restores what the inflight
    /// region records, then watches the kick.
    fn start_if_ready(&mut self, i: usize) -> VhostUserResult<()> {
        let needs_start = {
            let v = self.vrings[i].get_ref();
            !v.get_queue().ready() && v.get_kick().is_some()
        };
        if !needs_start {
            return Ok(());
        }
        let queue = self.inflight.as_ref().and_then(|r| r.queue(i as u16));
        if self.inflight.is_some() && queue.is_none() {
            return Err(refuse(format!(
                "{}: queue {i} starts, but the inflight region does not cover it",
                self.name
            )));
        }
        let metrics = self.backend.metrics().clone();
        let restored = self
            .backend
            .start_queue(i, &self.vrings[i], queue)
            .map_err(|e| {
                warn!("{}: queue {i} not started: {e}", self.name);
                BlkMetrics::inc(&metrics.inflight_refused);
                refuse(e)
            })?;
        if restored.resubmit > 0 {
            BlkMetrics::add(&metrics.resubmitted_requests, u64::from(restored.resubmit));
            info!(
                "{}: queue {i}: taking {} request(s) in flight again",
                self.name, restored.resubmit
            );
        } else {
            info!("{}: queue {i} started", self.name);
        }
        self.vrings[i].set_queue_ready(true);
        self.update_watch(i)?;
        // Requests may wait on the ring (a previous process took them, or
        // the driver kicked the old one): look without waiting for a kick.
        self.backend.wake(i);
        self.signal_started(i);
        Ok(())
    }

    /// Interrupts the driver once on a ring that starts, or on a running
    /// ring's new call fd, whatever it asked for. The process before may
    /// have put answers on the used ring and died before it signalled
    /// them; with EVENT_IDX the driver asked to hear of the first of
    /// them, which no later answer reaches, so it would wait for ever
    /// (the live-update guest test caught a guest so, after a SIGKILL).
    /// A driver checks the used ring on an interrupt and ignores one with
    /// nothing new. SPDK's vhost target signals every queue when a device
    /// starts for the same reason; Linux's vhost and libvhost-user make
    /// their first notification after a ring is set up unconditional.
    fn signal_started(&self, i: usize) {
        let v = &self.vrings[i];
        if !v.get_ref().get_queue().ready() || v.get_ref().get_call().is_none() {
            return;
        }
        BlkMetrics::inc(&self.backend.metrics().notifications);
        if let Err(e) = v.signal_used_queue() {
            warn!("{}: queue {i}: signalling the driver: {e}", self.name);
        }
    }

    fn any_started(&self) -> bool {
        self.vrings.iter().any(|v| v.get_ref().get_queue().ready())
    }

    fn install(&mut self, mem: GuestMemoryMmap, mappings: Vec<AddrMapping>) {
        // Workers load the table per round; in-flight requests keep their
        // snapshot of the old one.
        self.mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(mem);
        self.mappings = mappings;
    }
}

impl Drop for BlkHandler {
    fn drop(&mut self) {
        for l in &self.loops {
            l.exit();
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                warn!("{}: a queue thread panicked", self.name);
            }
        }
    }
}

impl VhostUserBackendReqHandlerMut for BlkHandler {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        if self.owned {
            return Err(VhostUserError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        for i in 0..self.vrings.len() {
            self.vrings[i].set_enabled(false);
            self.update_watch(i)?;
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        if features & !self.backend.features() != 0 {
            return Err(VhostUserError::InvalidParam);
        }
        self.acked_features = features;
        // Without VHOST_USER_F_PROTOCOL_FEATURES the rings are enabled at
        // once; with it they keep their state until SET_VRING_ENABLE.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for i in 0..self.vrings.len() {
                self.vrings[i].set_enabled(true);
                self.update_watch(i)?;
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        info!(
            "{}: driver features {features:#x} (EVENT_IDX {})",
            self.name,
            if event_idx { "on" } else { "off" }
        );
        for v in &self.vrings {
            v.set_queue_event_idx(event_idx);
        }
        self.backend.set_event_idx(event_idx);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<Vec<u64>>> {
        if postcopy_listening.is_some() {
            return Err(VhostUserError::InvalidOperation("postcopy not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            let r = GuestRegionMmap::new(
                region.mmap_region(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or_else(|| refuse("memory region wraps the address space"))?;
            mappings.push(AddrMapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
            regions.push(r);
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(refuse)?;
        self.install(mem, mappings);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        let v = self.vring(index)?;
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) {
            return Err(VhostUserError::InvalidParam);
        }
        v.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostUserResult<()> {
        self.vring(index)?;
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let avail = self.vmm_va_to_gpa(available)?;
        let used = self.vmm_va_to_gpa(used)?;
        let v = self.vring(index)?;
        v.set_queue_info(desc, avail, used)
            .map_err(|_| VhostUserError::InvalidParam)?;
        // A ring that restarts (the driver was reset, or a new process
        // serves it) carries on from the used index in guest memory.
        let idx = v
            .queue_used_idx()
            .map_err(|_| VhostUserError::BackendInternalError)?;
        v.set_queue_next_used(idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        let base = u16::try_from(base).map_err(|_| VhostUserError::InvalidParam)?;
        self.vring(index)?.set_queue_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        self.vring(index)?;
        let i = index as usize;
        // Stop the ring, then complete what the worker took onto the used
        // ring before answering where the ring stands.
        self.vrings[i].set_queue_ready(false);
        self.update_watch(i)?;
        self.backend
            .stop_vring(index)
            .map_err(VhostUserError::ReqHandlerError)?;
        let v = &self.vrings[i];
        let next_avail = v.queue_next_avail();
        v.set_kick(None);
        v.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, file: Option<File>) -> VhostUserResult<()> {
        let i = usize::from(index);
        self.vring(u32::from(index))?;
        // The old fd leaves the epoll set before it is closed.
        if self.watching[i] {
            if let Some(fd) = self.vrings[i].get_ref().get_kick().as_ref() {
                self.loops[i].remove(fd.as_raw_fd(), KICK);
            }
            self.watching[i] = false;
        }
        self.vrings[i].set_kick(file);
        self.start_if_ready(i)?;
        self.update_watch(i)
    }

    fn set_vring_call(&mut self, index: u8, file: Option<File>) -> VhostUserResult<()> {
        let i = usize::from(index);
        let v = self.vring(u32::from(index))?;
        let running = v.get_ref().get_queue().ready();
        v.set_call(file);
        if running {
            // A signal sent to the old fd as it was replaced may be lost.
            self.signal_started(i);
            return Ok(());
        }
        self.start_if_ready(i)
    }

    fn set_vring_err(&mut self, index: u8, file: Option<File>) -> VhostUserResult<()> {
        self.vring(u32::from(index))?.set_err(file);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        Ok(self.backend.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VhostUserError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.vring(index)?.set_enabled(enable);
        self.update_watch(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        // Nothing in the offered configuration space is writable (no
        // CONFIG_WCE): a write is ignored, as a device ignores writes to
        // read-only fields.
        self.backend
            .set_config(offset, buf)
            .map_err(VhostUserError::ReqHandlerError)
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        Err(VhostUserError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        ask: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        if self.any_started() {
            return Err(refuse(super::inflight::InflightError::WhileRunning));
        }
        let max_queues = self.vrings.len() as u16;
        let (file, reply, region) = InflightRegion::create(ask, max_queues, MAX_QUEUE_SIZE)
            .map_err(|e| {
                warn!("{}: GET_INFLIGHT_FD refused: {e}", self.name);
                BlkMetrics::inc(&self.backend.metrics().inflight_refused);
                refuse(e)
            })?;
        BlkMetrics::inc(&self.backend.metrics().inflight_regions);
        self.inflight = Some(region);
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VhostUserResult<()> {
        let adopted = if self.any_started() {
            Err(super::inflight::InflightError::WhileRunning)
        } else {
            InflightRegion::adopt(msg, file, self.vrings.len() as u16, MAX_QUEUE_SIZE)
        };
        match adopted {
            Ok(r) => {
                // The region this connection asked for is not counted
                // twice when the frontend sets it.
                if self.inflight.is_none() {
                    BlkMetrics::inc(&self.backend.metrics().inflight_regions);
                }
                self.inflight = Some(r);
                Ok(())
            }
            Err(e) => {
                warn!("{}: SET_INFLIGHT_FD refused: {e}", self.name);
                BlkMetrics::inc(&self.backend.metrics().inflight_refused);
                Err(refuse(e))
            }
        }
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<u64>> {
        if postcopy_listening.is_some() {
            return Err(VhostUserError::InvalidOperation("postcopy not supported"));
        }
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(refuse("every memory slot is in use"));
        }
        let r = Arc::new(
            GuestRegionMmap::new(
                region.mmap_region(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or_else(|| refuse("memory region wraps the address space"))?,
        );
        let mem = self.mem.memory().insert_region(r).map_err(refuse)?;
        let mut mappings = std::mem::take(&mut self.mappings);
        mappings.push(AddrMapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        });
        self.install(mem, mappings);
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(refuse)?;
        let mut mappings = std::mem::take(&mut self.mappings);
        mappings.retain(|m| m.gpa_base != region.guest_phys_addr);
        self.install(mem, mappings);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _file: File,
    ) -> VhostUserResult<Option<File>> {
        Err(VhostUserError::InvalidOperation(
            "device state transfer is not offered",
        ))
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation(
            "device state transfer is not offered",
        ))
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        Err(VhostUserError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation(
            "dirty logging is not offered",
        ))
    }
}
