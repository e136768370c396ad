//! Objects that come and go while the engine runs, as they do when many
//! applications share it through the card daemon: memory regions over an
//! application's own memory, and destroying regions, queue pairs and
//! completion queues without leaving anything that still points at them.
//! Also the few verbs the library needs beyond the Rust API's (RESET,
//! inline sends, queue pair numbers).

use super::*;

/// A slot nothing may match: the protection domain of a freed region.
const DEAD_PD: Pd = Pd(u32::MAX);

impl Engine {
    /// Registers `memory` (an application's, see [`Memory::mapped`]) in
    /// protection domain `pd` at virtual address `va` (what the peer puts
    /// in its RETH); returns the region's index and its key (lkey and rkey
    /// alike). Keys are never reused.
    pub fn reg_mr_memory(
        &mut self,
        pd: Pd,
        memory: Memory,
        va: u64,
        access: Access,
    ) -> (usize, u32) {
        self.next_key = self.next_key.wrapping_add(1).max(0x100);
        let key = self.next_key;
        let mr = MemoryRegion {
            buf: memory,
            lkey: key,
            rkey: key,
            access,
            va,
            pd,
        };
        let i = match self.free_mrs.pop() {
            Some(i) => {
                self.mrs[i] = mr;
                i
            }
            None => {
                self.mrs.push(mr);
                self.mrs.len() - 1
            }
        };
        (i, key)
    }

    /// Whether the work of a queue pair of this engine still refers to
    /// region `mr`: a send whose payload is read from it, a READ or atomic
    /// whose answer lands in it, a posted receive.
    fn mr_in_use(&self, mr: usize) -> bool {
        self.ud_uses_mr(mr)
            || self.srq_uses_mr(mr)
            || self.qps.iter().any(|q| {
                let sge = |s: &Sge| s.mr == mr;
                q.unacked
                    .iter()
                    .chain(q.pending_tx.iter())
                    .any(|o| o.body.is_some_and(|b| b.0 == mr))
                    || q.reads.iter().any(|r| r.sges.iter().any(sge))
                    || q.rq.iter().any(|r| r.sges.iter().any(sge))
                    || q.recv_msg
                        .as_ref()
                        .is_some_and(|(r, _)| r.sges.iter().any(sge))
            })
    }

    /// Deregisters region `mr`: `Busy` while this side's own work still
    /// refers to it (destroy or drain the queue pairs first). A peer's
    /// multi-packet WRITE arriving into it stops there: its remaining
    /// packets are refused. The slot is reused, the key never.
    pub fn dereg_mr(&mut self, mr: usize) -> io::Result<()> {
        if self.mrs.get(mr).is_none_or(|m| m.pd == DEAD_PD) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such region"));
        }
        if self.mr_in_use(mr) {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "work requests still use the region",
            ));
        }
        for q in &mut self.qps {
            if q.write_msg.is_some_and(|w| w.0 == mr) {
                q.write_msg = None;
            }
        }
        self.mrs[mr] = MemoryRegion {
            buf: Memory::Owned(Vec::new()),
            lkey: 0,
            rkey: 0,
            access: Access::default(),
            va: 0,
            pd: DEAD_PD,
        };
        self.free_mrs.push(mr);
        Ok(())
    }

    /// The index of the queue pair numbered `qpn`.
    pub fn qp_index(&self, qpn: u32) -> Option<usize> {
        self.qps.iter().position(|q| q.qpn == qpn)
    }

    /// A queue pair number in 0x100..0x1000000 no queue pair of this
    /// engine has, starting after `hint`.
    pub fn free_qpn(&self, hint: u32) -> Option<u32> {
        let mut n = hint;
        for _ in 0..0x0100_0000 {
            n = if !(0x100..0x00ff_ffff).contains(&n) {
                0x100
            } else {
                n + 1
            };
            if self.qp_index(n).is_none() && !self.is_ud(n) {
                return Some(n);
            }
        }
        None
    }

    /// Destroys the queue pair numbered `qpn` with its work (no
    /// completions, as verbs' `ibv_destroy_qp`); packets for it are dropped
    /// from now on, so a peer's requests time out as RC prescribes, except
    /// that for a few seconds a SEND or WRITE it had received, sent again,
    /// is acknowledged again (`departed.rs`).
    pub fn destroy_qp(&mut self, qpn: u32) -> io::Result<()> {
        let i = self
            .qp_index(qpn)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such queue pair"))?;
        let q = self.qps.remove(i);
        self.remember_departed(&q);
        self.staged.retain(|c| c.qpn != qpn);
        Ok(())
    }

    /// Any state → RESET: unfinished work is dropped without completions,
    /// and the queue pair starts again as new (its number, domain and
    /// queues kept), as verbs' `IBV_QPS_RESET`.
    pub fn to_reset(&mut self, qp: usize) {
        let q = &mut self.qps[qp];
        let fresh = QueuePair {
            pd: q.pd,
            send_cq: q.send_cq,
            recv_cq: q.recv_cq,
            srq: q.srq,
            min_rnr_timer: q.min_rnr_timer,
            ..QueuePair::new(q.qpn, q.mtu)
        };
        *q = fresh;
    }

    /// The number, peer and expected PSNs of queue pair `qp` (for
    /// `ibv_query_qp`): (state, remote QPN, remote address, next PSN to
    /// send, next PSN expected, path MTU).
    pub fn qp_info(&self, qp: usize) -> (QpState, u32, Ipv4Addr, u32, u32, usize) {
        let q = &self.qps[qp];
        (q.state, q.remote_qpn, q.remote_ip, q.sq_psn, q.epsn, q.mtu)
    }

    /// A registered region's key, virtual address, length and domain.
    pub fn mr_key(&self, mr: usize) -> Option<(u32, u64, usize, Pd)> {
        self.mrs
            .get(mr)
            .filter(|m| m.pd != DEAD_PD)
            .map(|m| (m.lkey, m.va, m.buf.len(), m.pd))
    }

    /// Posts a SEND or WRITE whose payload is `data` itself (verbs'
    /// `IBV_SEND_INLINE`: the bytes were copied when the request was
    /// posted, so no region is read).
    pub fn post_inline(
        &mut self,
        qp: usize,
        wr_id: u64,
        op: SendOp,
        data: &[u8],
        signaled: bool,
    ) -> io::Result<()> {
        self.check_rts(qp)?;
        let (kind, reth, imm) = match op {
            SendOp::Send { imm } => (WcOpcode::Send, None, imm),
            SendOp::Write {
                remote_va,
                rkey,
                imm,
            } => (
                WcOpcode::RdmaWrite,
                Some(Reth {
                    va: remote_va,
                    rkey,
                    dma_len: u32::try_from(data.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
                }),
                imm,
            ),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "only SEND and WRITE carry inline data",
                ))
            }
        };
        let r = self.message(qp, wr_id, kind, Payload::Bytes(data), reth, imm, !signaled);
        self.notify_cq();
        r
    }

    /// A completion queue made by [`Engine::create_cq`] goes away with
    /// what it holds: `Busy` while a queue pair still uses it.
    pub fn destroy_cq(&mut self, cq: CqId) -> io::Result<()> {
        if cq.0 == 0 || cq.0 as usize > self.cqs.len() || self.free_cqs.contains(&cq) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no such completion queue",
            ));
        }
        if self.qps.iter().any(|q| q.send_cq == cq || q.recv_cq == cq)
            || self.uds.iter().any(|q| q.send_cq == cq || q.recv_cq == cq)
        {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "queue pairs still use the completion queue",
            ));
        }
        self.cqs[cq.0 as usize - 1] = ExtraCq::default();
        self.free_cqs.push(cq);
        Ok(())
    }

    /// Completes work request `wr_id` of queue pair `qp` with `Flushed`
    /// (work posted to a queue pair that cannot take it: verbs flushes
    /// work posted in ERROR).
    pub fn complete_flushed(&mut self, qp: usize, wr_id: u64, opcode: WcOpcode) {
        let qpn = self.qps[qp].qpn;
        self.staged
            .push_back(Completion::software(wr_id, opcode, WcStatus::Flushed, qpn));
        self.notify_cq();
    }

    /// Sets the RNR NAK timer queue pair `qp` sends when it has no
    /// receive (verbs' `min_rnr_timer`, IBTA encoding 0-31).
    pub fn set_min_rnr_timer(&mut self, qp: usize, timer: u8) {
        self.qps[qp].min_rnr_timer = timer & 0x1f;
    }

    /// Sets how many READs and atomics queue pair `qp` may have
    /// unanswered at once (verbs' `max_rd_atomic`: what the peer's
    /// `max_dest_rd_atomic` lets it remember), 1 to the engine's 16.
    pub fn set_max_rd_atomic(&mut self, qp: usize, n: u8) {
        self.qps[qp].max_rd_atomic = usize::from(n).clamp(1, MAX_RD_ATOMIC);
    }

    /// Sets queue pair `qp`'s local ACK timeout (verbs' `timeout`, IBTA
    /// encoding: 4.096 us << `timeout`; 0, infinite, keeps the engine's so
    /// that a lost packet is still recovered), its retry count and its RNR
    /// retry count (7: without limit). `None` leaves one as it is.
    pub fn set_retry(
        &mut self,
        qp: usize,
        timeout: Option<u8>,
        retry_cnt: Option<u8>,
        rnr_retry: Option<u8>,
    ) {
        let q = &mut self.qps[qp];
        if let Some(t) = timeout.filter(|t| (1..=31).contains(t)) {
            q.rto = Some(Duration::from_nanos(4096 << t));
        }
        if let Some(n) = retry_cnt {
            q.max_retries = Some(u32::from(n.min(7)));
        }
        if let Some(n) = rnr_retry {
            q.rnr_retry = Some(u32::from(n.min(7)));
        }
    }
}
