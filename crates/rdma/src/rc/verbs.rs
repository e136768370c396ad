//! The verbs surface of the engine: opening it, protection domains and
//! memory regions, queue pairs and their state machine, completion queues
//! and their event descriptors, posting receives.

use super::*;

impl Engine {
    /// An engine on `local` (UDP 4791; needs CAP_NET_RAW).
    pub fn open(local: Ipv4Addr) -> io::Result<Self> {
        Ok(Engine {
            io: RawIo::open(local)?,
            mrs: Vec::new(),
            qps: Vec::new(),
            cq: VecDeque::new(),
            staged: VecDeque::new(),
            cqs: Vec::new(),
            stats: PathStats::default(),
            next_key: 0x100,
            window: 32,
            rto: Duration::from_millis(20),
            max_retries: 7,
            rnr_retry: 7,
            next_pd: 0,
            cq_event: None,
            free_mrs: Vec::new(),
            free_cqs: Vec::new(),
            uds: Vec::new(),
            srqs: Vec::new(),
            corked: false,
            departed: VecDeque::new(),
            #[cfg(test)]
            fail_poll: None,
        })
    }

    /// Injects seeded faults into this engine's outgoing datagrams (tests).
    pub fn set_faults(&mut self, f: crate::net::Faults) {
        self.io.set_faults(f);
    }

    /// Whether runs of packets go out as UDP GSO datagrams (this kernel
    /// passed the probe at open, and `set_gso(false)` was not called).
    pub fn gso(&self) -> bool {
        self.io.gso()
    }

    /// Sends every packet alone (`false`), or runs of them as GSO
    /// datagrams again where the kernel allows (`true`).
    pub fn set_gso(&mut self, on: bool) {
        self.io.set_gso(on);
    }

    /// Datagrams the fault injector dropped, duplicated, reordered and
    /// corrupted.
    pub fn injected(&self) -> [u64; 4] {
        self.io.injected
    }

    /// Registers `len` zeroed bytes in the default protection domain;
    /// returns the region's index.
    pub fn reg_mr(&mut self, len: usize, access: Access) -> usize {
        self.reg_mr_in(Pd::DEFAULT, len, access)
    }

    /// A new protection domain.
    pub fn alloc_pd(&mut self) -> Pd {
        self.next_pd += 1;
        Pd(self.next_pd)
    }

    /// Registers `len` zeroed bytes in protection domain `pd`; returns the
    /// region's index.
    pub fn reg_mr_in(&mut self, pd: Pd, len: usize, access: Access) -> usize {
        self.next_key += 1;
        let key = self.next_key;
        self.mrs.push(MemoryRegion {
            buf: Memory::Owned(vec![0; len]),
            lkey: key,
            rkey: key,
            access,
            va: 0x1000_0000 * u64::from(key),
            pd,
        });
        self.mrs.len() - 1
    }

    /// A registered region.
    pub fn mr(&self, i: usize) -> &MemoryRegion {
        &self.mrs[i]
    }

    /// Copies `data` into a registered region at `offset` (the
    /// application writing its own memory).
    pub fn fill(&mut self, mr: usize, offset: usize, data: &[u8]) {
        self.mrs[mr].buf[offset..offset + data.len()].copy_from_slice(data);
    }

    /// Queue pairs created on this engine.
    pub fn qp_count(&self) -> usize {
        self.qps.len()
    }

    /// Creates a QP in RESET in the default protection domain; returns its
    /// index.
    pub fn create_qp(&mut self, qpn: u32) -> usize {
        self.create_qp_in(Pd::DEFAULT, qpn)
    }

    /// Creates a QP in RESET in protection domain `pd`.
    pub fn create_qp_in(&mut self, pd: Pd, qpn: u32) -> usize {
        self.create_qp_with(pd, qpn, CqId::DEFAULT, CqId::DEFAULT)
            .expect("the default completion queue exists")
    }

    /// Creates a QP in RESET in protection domain `pd` whose send-queue
    /// completions (SEND, WRITE, READ) go to `send_cq` and receive-queue
    /// completions (receives consumed by SEND or WRITE with immediate) to
    /// `recv_cq`, as verbs' `ibv_create_qp` does. An unknown queue is an
    /// `InvalidInput` error.
    pub fn create_qp_with(
        &mut self,
        pd: Pd,
        qpn: u32,
        send_cq: CqId,
        recv_cq: CqId,
    ) -> io::Result<usize> {
        for cq in [send_cq, recv_cq] {
            if cq.0 as usize > self.cqs.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("no completion queue {}", cq.0),
                ));
            }
        }
        let mut q = QueuePair::new(qpn, 1024);
        q.pd = pd;
        q.send_cq = send_cq;
        q.recv_cq = recv_cq;
        self.forget_departed(q.qpn);
        self.qps.push(q);
        Ok(self.qps.len() - 1)
    }

    /// A new, empty completion queue.
    pub fn create_cq(&mut self) -> CqId {
        if let Some(cq) = self.free_cqs.pop() {
            return cq;
        }
        self.cqs.push(ExtraCq::default());
        CqId(u32::try_from(self.cqs.len()).expect("fewer than 2^32 completion queues"))
    }

    /// The completions waiting in queue `cq`, oldest first (pop them to
    /// consume them). Panics on a queue this engine did not create.
    pub fn cq_of(&mut self, cq: CqId) -> &mut VecDeque<Completion> {
        match cq.0 {
            0 => &mut self.cq,
            i => &mut self.cqs[i as usize - 1].entries,
        }
    }

    /// Completes work request `wr_id` with `LocalProtectionError` and
    /// moves the QP to ERROR (a scatter entry it may not use).
    pub(super) fn refuse(&mut self, qp: usize, wr_id: u64, opcode: WcOpcode) {
        let qpn = self.qps[qp].qpn;
        self.staged.push_back(Completion::software(
            wr_id,
            opcode,
            WcStatus::LocalProtectionError,
            qpn,
        ));
        self.to_error(qp);
        self.notify_cq();
    }

    /// Holds back what posts would send until [`Engine::uncork`], so that
    /// work taken from an application's ring in one round leaves as one
    /// burst (a run of equal packets as one GSO datagram) rather than a
    /// send per message.
    pub fn cork(&mut self) {
        self.corked = true;
    }

    /// Sends what was held back since [`Engine::cork`], as far as each
    /// queue pair's window allows.
    pub fn uncork(&mut self) -> io::Result<()> {
        self.corked = false;
        for qi in 0..self.qps.len() {
            if !self.qps[qi].pending_tx.is_empty() {
                self.flush_tx(qi)?;
            }
        }
        Ok(())
    }

    /// Posts a send-queue work request (verbs' `ibv_post_send`): SEND,
    /// WRITE (both with optional immediate data, gathered from the scatter
    /// list) or READ (scattered over it, in order). A scatter entry the QP
    /// may not use completes the request with `LocalProtectionError` and
    /// moves the QP to ERROR, as verbs does; nothing is sent.
    pub fn post(&mut self, qp: usize, wr: SendWr) -> io::Result<()> {
        let r = self.post_work(qp, wr);
        self.notify_cq();
        r
    }

    pub(super) fn post_work(&mut self, qp: usize, wr: SendWr) -> io::Result<()> {
        self.check_rts(qp)?;
        let pd = self.qps[qp].pd;
        let usable = |e: &Sge, mrs: &[MemoryRegion], write: bool| {
            mrs.get(e.mr).is_some_and(|m| {
                m.pd == pd
                    && e.offset
                        .checked_add(e.len)
                        .is_some_and(|end| end <= m.buf.len())
                    && (!write || m.access.local_write || m.access.remote_write)
            })
        };
        let atomic = matches!(wr.op, SendOp::CompareSwap { .. } | SendOp::FetchAdd { .. });
        let writes_local = atomic || matches!(wr.op, SendOp::Read { .. });
        let mut ok = wr
            .sg_list
            .iter()
            .all(|e| usable(e, &self.mrs, writes_local));
        if atomic {
            // The original value: exactly one 8-byte entry.
            ok &= matches!(wr.sg_list[..], [Sge { len: 8, .. }]);
        }
        let kind = match wr.op {
            SendOp::Send { .. } => WcOpcode::Send,
            SendOp::Write { .. } => WcOpcode::RdmaWrite,
            SendOp::Read { .. } => WcOpcode::RdmaRead,
            SendOp::CompareSwap { .. } => WcOpcode::CompSwap,
            SendOp::FetchAdd { .. } => WcOpcode::FetchAdd,
        };
        if !ok {
            self.refuse(qp, wr.wr_id, kind);
            return Ok(());
        }
        let quiet = !wr.signaled;
        match wr.op {
            SendOp::Read { remote_va, rkey } => {
                self.read(qp, wr.wr_id, wr.sg_list, remote_va, rkey, quiet)
            }
            SendOp::CompareSwap {
                remote_va,
                rkey,
                compare,
                swap,
            } => {
                let eth = AtomicEth {
                    va: remote_va,
                    rkey,
                    swap_add: swap,
                    compare,
                };
                self.atomic(qp, wr.wr_id, kind, wr.sg_list, eth, quiet)
            }
            SendOp::FetchAdd {
                remote_va,
                rkey,
                add,
            } => {
                let eth = AtomicEth {
                    va: remote_va,
                    rkey,
                    swap_add: add,
                    compare: 0,
                };
                self.atomic(qp, wr.wr_id, kind, wr.sg_list, eth, quiet)
            }
            SendOp::Send { imm } | SendOp::Write { imm, .. } => {
                let total: usize = wr.sg_list.iter().map(|e| e.len).sum();
                let reth = match wr.op {
                    SendOp::Write {
                        remote_va, rkey, ..
                    } => Some(Reth {
                        va: remote_va,
                        rkey,
                        dma_len: u32::try_from(total).map_err(|_| io::ErrorKind::InvalidInput)?,
                    }),
                    _ => None,
                };
                if let [e] = wr.sg_list[..] {
                    // One entry: packets keep only their headers; the
                    // payload goes out from the region itself, at every
                    // send (as a NIC would read it).
                    let body = Payload::Region {
                        mr: e.mr,
                        offset: e.offset,
                        len: e.len,
                    };
                    return self.message(qp, wr.wr_id, kind, body, reth, imm, quiet);
                }
                let mut data = Vec::with_capacity(total);
                for e in &wr.sg_list {
                    data.extend_from_slice(&self.mrs[e.mr].buf[e.offset..e.offset + e.len]);
                }
                self.message(qp, wr.wr_id, kind, Payload::Bytes(&data), reth, imm, quiet)
            }
        }
    }

    /// An eventfd that becomes readable whenever completions are added to
    /// the default completion ring (for epoll-based waiting; read it to
    /// reset).
    pub fn cq_eventfd(&mut self) -> io::Result<std::os::fd::BorrowedFd<'_>> {
        self.cq_eventfd_of(CqId::DEFAULT)
    }

    /// Like [`Engine::cq_eventfd`], for completion queue `cq`.
    pub fn cq_eventfd_of(&mut self, cq: CqId) -> io::Result<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        let slot = match cq.0 {
            0 => &mut self.cq_event,
            i => {
                &mut self
                    .cqs
                    .get_mut(i as usize - 1)
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("no completion queue {i}"),
                        )
                    })?
                    .event
            }
        };
        if slot.is_none() {
            *slot = Some(new_eventfd()?);
        }
        Ok(slot.as_ref().expect("just set").as_fd())
    }

    /// The receive ring's descriptor: readable when a datagram waits.
    /// With [`Engine::next_wakeup`], what a thread that drives the engine
    /// needs to sleep instead of spinning (see [`crate::progress`]).
    pub fn wait_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.io.wait_fd()
    }

    /// How long until the engine has timed work to do (a coalesced ACK, an
    /// RNR wait, a retransmission timer), if it has any.
    pub fn next_wakeup(&self) -> Option<Duration> {
        let now = Instant::now();
        self.qps
            .iter()
            .filter(|q| q.state != QpState::Error)
            .flat_map(|q| [q.ack_due.map(|(_, _, at)| at), q.rnr_at, q.rto_at])
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(now))
    }

    /// Moves staged completions to their QP's completion queues (send or
    /// receive side by opcode) and signals the eventfd of every queue that
    /// holds completions. Every public call that can complete work ends
    /// here, so that the application never sees a completion in the wrong
    /// queue.
    pub(super) fn notify_cq(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        if self.cqs.is_empty() {
            // One queue: the staged completions are all its own.
            self.cq.append(&mut self.staged);
            if let Some(fd) = &self.cq_event {
                signal(fd);
            }
            return;
        }
        // Queues that got completions: bit i for CqId(i). Queues past the
        // 64th (rare) are signalled per completion instead.
        let mut got = 0u64;
        while let Some(c) = self.staged.pop_front() {
            let (send, recv) = self
                .qps
                .iter()
                .find(|q| q.qpn == c.qpn)
                .map(|q| (q.send_cq, q.recv_cq))
                .or_else(|| self.ud_cqs(c.qpn))
                .unwrap_or((CqId::DEFAULT, CqId::DEFAULT));
            let target = match c.opcode {
                WcOpcode::Recv | WcOpcode::RecvRdmaWithImm => recv,
                _ => send,
            };
            self.cq_of(target).push_back(c);
            match 1u64.checked_shl(target.0) {
                Some(bit) => got |= bit,
                None => {
                    if let Some(fd) = &self.cqs[target.0 as usize - 1].event {
                        signal(fd);
                    }
                }
            }
        }
        let events = std::iter::once(&self.cq_event).chain(self.cqs.iter().map(|q| &q.event));
        for (i, event) in events.enumerate().take(64) {
            if let (Some(fd), true) = (event, got & (1 << i) != 0) {
                signal(fd);
            }
        }
    }

    /// Signals every completion queue's eventfd, so that whoever sleeps on
    /// one wakes up and looks (a driver that stopped).
    pub(crate) fn wake_all_cqs(&self) {
        let events = std::iter::once(&self.cq_event).chain(self.cqs.iter().map(|q| &q.event));
        for fd in events.flatten() {
            signal(fd);
        }
    }

    /// Drives the engine until a completion is in the default ring or
    /// `timeout` passes; true if there is one.
    pub fn wait_cq(&mut self, timeout: Duration) -> io::Result<bool> {
        self.wait_cq_of(CqId::DEFAULT, timeout)
    }

    /// Drives the engine until completion queue `cq` holds a completion or
    /// `timeout` passes; true if it does.
    pub fn wait_cq_of(&mut self, cq: CqId, timeout: Duration) -> io::Result<bool> {
        let end = Instant::now() + timeout;
        while self.cq_of(cq).is_empty() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.poll(left.min(Duration::from_millis(5)))?;
        }
        Ok(!self.cq_of(cq).is_empty())
    }

    /// RESET → INIT: the QP may take receive buffers.
    pub fn to_init(&mut self, qp: usize) -> Result<(), QpError> {
        let q = &mut self.qps[qp];
        if q.state != QpState::Reset {
            return Err(QpError::Transition(q.state, QpState::Init));
        }
        q.state = QpState::Init;
        Ok(())
    }

    /// INIT → RTR: the peer's QPN, address and first PSN; packets are
    /// placed from now on.
    pub fn to_rtr(
        &mut self,
        qp: usize,
        remote_qpn: u32,
        remote_ip: Ipv4Addr,
        remote_psn: u32,
    ) -> Result<(), QpError> {
        let q = &mut self.qps[qp];
        if q.state != QpState::Init {
            return Err(QpError::Transition(q.state, QpState::Rtr));
        }
        q.remote_qpn = remote_qpn & 0x00ff_ffff;
        q.remote_ip = remote_ip;
        q.epsn = remote_psn & 0x00ff_ffff;
        q.state = QpState::Rtr;
        Ok(())
    }

    /// RTR → RTS: our first PSN; work may be sent from now on.
    pub fn to_rts(&mut self, qp: usize, local_psn: u32) -> Result<(), QpError> {
        let q = &mut self.qps[qp];
        if q.state != QpState::Rtr {
            return Err(QpError::Transition(q.state, QpState::Rts));
        }
        q.sq_psn = local_psn & 0x00ff_ffff;
        q.state = QpState::Rts;
        Ok(())
    }

    /// Any state → ERROR: every posted receive and every unfinished send,
    /// write and read completes with `Flushed`.
    pub fn to_error(&mut self, qp: usize) {
        let q = &mut self.qps[qp];
        q.state = QpState::Error;
        let qpn = q.qpn;
        let flushed = q.take_unfinished();
        q.rto_at = None;
        for (wr_id, opcode) in flushed {
            self.staged
                .push_back(Completion::software(wr_id, opcode, WcStatus::Flushed, qpn));
        }
        self.notify_cq();
    }

    /// Connects a QP: RESET → INIT → RTR → RTS with the peer's QPN, IP and
    /// starting PSN, and our starting PSN.
    pub fn connect(
        &mut self,
        qp: usize,
        remote_qpn: u32,
        remote_ip: Ipv4Addr,
        remote_psn: u32,
        local_psn: u32,
    ) {
        self.to_init(qp).expect("a new QP is in RESET");
        self.to_rtr(qp, remote_qpn, remote_ip, remote_psn)
            .expect("INIT");
        self.to_rts(qp, local_psn).expect("RTR");
    }

    /// State of a QP.
    pub fn qp_state(&self, qp: usize) -> QpState {
        self.qps[qp].state
    }

    /// Sets the path MTU (256, 512, 1024, 2048 or 4096 bytes).
    pub fn set_mtu(&mut self, qp: usize, mtu: usize) {
        assert!(
            matches!(mtu, 256 | 512 | 1024 | 2048 | 4096),
            "path MTU {mtu}"
        );
        self.qps[qp].mtu = mtu;
    }

    /// Posts a receive buffer. A buffer the QP may not use (an unknown
    /// region, one of another protection domain, one without local write
    /// access, or a range past its end) completes with
    /// `LocalProtectionError` and moves the QP to ERROR, as verbs does
    /// when such a receive is reached; nothing is ever written to it.
    pub fn post_recv(&mut self, qp: usize, wr: RecvWr) {
        self.post_recv_posted(qp, wr.into());
    }

    /// Posts a receive that scatters an incoming message over `sg_list`,
    /// in order (verbs' `ibv_post_recv` with several entries); each entry
    /// is checked as [`Engine::post_recv`] checks its buffer.
    pub fn post_recv_sgl(&mut self, qp: usize, wr_id: u64, sg_list: Vec<Sge>) {
        let len = sg_list.iter().map(|e| e.len).sum();
        self.post_recv_posted(
            qp,
            PostedRecv {
                wr_id,
                sges: sg_list,
                len,
            },
        );
    }

    pub(super) fn post_recv_posted(&mut self, qp: usize, wr: PostedRecv) {
        let pd = self.qps[qp].pd;
        let usable = wr.sges.iter().all(|e| {
            self.mrs.get(e.mr).is_some_and(|m| {
                m.pd == pd
                    && m.access.local_write
                    && e.offset
                        .checked_add(e.len)
                        .is_some_and(|end| end <= m.buf.len())
            })
        });
        let state = self.qps[qp].state;
        if !usable && !matches!(state, QpState::Reset | QpState::Error) {
            self.refuse(qp, wr.wr_id, WcOpcode::Recv);
            return;
        }
        let q = &mut self.qps[qp];
        if matches!(q.state, QpState::Reset | QpState::Error) {
            // Verbs: a receive posted to a QP in ERROR completes flushed.
            let qpn = q.qpn;
            self.staged.push_back(Completion::software(
                wr.wr_id,
                WcOpcode::Recv,
                WcStatus::Flushed,
                qpn,
            ));
            self.notify_cq();
            return;
        }
        q.rq.push_back(wr);
    }

    pub(super) fn check_rts(&self, qp: usize) -> io::Result<()> {
        let s = self.qps[qp].state;
        if s == QpState::Rts {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("QP is in {s:?}, not RTS"),
            ))
        }
    }
}
