//! The requester side of the software path: work requests become
//! packets (SEND, WRITE, READ, atomics) in path-MTU pieces inside a send
//! window; acknowledgements retire them; timeouts and sequence NAKs
//! resend them (go-back-N, with a retry limit); RNR NAKs wait the timer
//! they name.

use super::*;

impl Engine {
    /// Posts a SEND of `len` bytes from a region, in path-MTU packets
    /// (FIRST, MIDDLE..., LAST, or ONLY); the last asks for an ACK.
    pub fn post_send(
        &mut self,
        qp: usize,
        wr_id: u64,
        mr: usize,
        offset: usize,
        len: usize,
    ) -> io::Result<()> {
        self.post(
            qp,
            SendWr {
                wr_id,
                op: SendOp::Send { imm: None },
                sg_list: vec![Sge { mr, offset, len }],
                signaled: true,
            },
        )
    }

    /// Posts an RDMA WRITE of `len` bytes from a local region to the peer's
    /// `remote_va` under `rkey`, with immediate data if given.
    #[allow(clippy::too_many_arguments)]
    pub fn post_write(
        &mut self,
        qp: usize,
        wr_id: u64,
        mr: usize,
        offset: usize,
        len: usize,
        remote_va: u64,
        rkey: u32,
        imm: Option<u32>,
    ) -> io::Result<()> {
        self.post(
            qp,
            SendWr {
                wr_id,
                op: SendOp::Write {
                    remote_va,
                    rkey,
                    imm,
                },
                sg_list: vec![Sge { mr, offset, len }],
                signaled: true,
            },
        )
    }

    /// Posts an RDMA READ of `len` bytes from the peer's `remote_va` under
    /// `rkey` into a local region.
    #[allow(clippy::too_many_arguments)]
    pub fn post_read(
        &mut self,
        qp: usize,
        wr_id: u64,
        mr: usize,
        offset: usize,
        len: usize,
        remote_va: u64,
        rkey: u32,
    ) -> io::Result<()> {
        self.post(
            qp,
            SendWr {
                wr_id,
                op: SendOp::Read { remote_va, rkey },
                sg_list: vec![Sge { mr, offset, len }],
                signaled: true,
            },
        )
    }

    /// Posts an atomic fetch-and-add of `add` to the 8 bytes at the peer's
    /// `remote_va` (8-byte aligned); the original value lands at `offset`
    /// in local region `mr`.
    #[allow(clippy::too_many_arguments)]
    pub fn post_fetch_add(
        &mut self,
        qp: usize,
        wr_id: u64,
        mr: usize,
        offset: usize,
        remote_va: u64,
        rkey: u32,
        add: u64,
    ) -> io::Result<()> {
        self.post(
            qp,
            SendWr {
                wr_id,
                op: SendOp::FetchAdd {
                    remote_va,
                    rkey,
                    add,
                },
                sg_list: vec![Sge { mr, offset, len: 8 }],
                signaled: true,
            },
        )
    }

    /// Posts an atomic compare-and-swap of the 8 bytes at the peer's
    /// `remote_va` (8-byte aligned); the original value lands at `offset`
    /// in local region `mr`.
    #[allow(clippy::too_many_arguments)]
    pub fn post_compare_swap(
        &mut self,
        qp: usize,
        wr_id: u64,
        mr: usize,
        offset: usize,
        remote_va: u64,
        rkey: u32,
        compare: u64,
        swap: u64,
    ) -> io::Result<()> {
        self.post(
            qp,
            SendWr {
                wr_id,
                op: SendOp::CompareSwap {
                    remote_va,
                    rkey,
                    compare,
                    swap,
                },
                sg_list: vec![Sge { mr, offset, len: 8 }],
                signaled: true,
            },
        )
    }

    pub(super) fn read(
        &mut self,
        qp: usize,
        wr_id: u64,
        sges: Vec<Sge>,
        remote_va: u64,
        rkey: u32,
        quiet: bool,
    ) -> io::Result<()> {
        let len: usize = sges.iter().map(|e| e.len).sum();
        let q = &mut self.qps[qp];
        let psn = q.sq_psn;
        let packets =
            u32::try_from(len.div_ceil(q.mtu).max(1)).map_err(|_| io::ErrorKind::InvalidInput)?;
        q.sq_psn = psn_add(psn, packets);
        let pkt = Packet {
            bth: header(opcode::READ_REQUEST, q.remote_qpn, psn, true),
            reth: Some(Reth {
                va: remote_va,
                rkey,
                dma_len: u32::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?,
            }),
            aeth: None,
            imm: None,
            atomic: None,
            atomic_ack: None,
            deth: None,
            payload: &[],
            icrc: 0,
        };
        let buf = encode(&pkt)?;
        q.pending_tx.push_back(Outstanding::whole(
            psn,
            None,
            WcOpcode::RdmaRead,
            quiet,
            buf,
        ));
        q.reads.push_back(PendingRead {
            wr_id,
            kind: WcOpcode::RdmaRead,
            first_psn: psn,
            packets,
            received: 0,
            resume_at: 0,
            remote_va,
            rkey,
            sges,
            len,
            quiet,
        });
        self.flush_tx(qp)
    }

    /// Posts an atomic request (one packet); its ATOMIC ACKNOWLEDGE
    /// carries the original value into `sges`.
    pub(super) fn atomic(
        &mut self,
        qp: usize,
        wr_id: u64,
        kind: WcOpcode,
        sges: Vec<Sge>,
        eth: AtomicEth,
        quiet: bool,
    ) -> io::Result<()> {
        let q = &mut self.qps[qp];
        let psn = q.sq_psn;
        q.sq_psn = psn_add(psn, 1);
        let op = if kind == WcOpcode::CompSwap {
            opcode::COMPARE_SWAP
        } else {
            opcode::FETCH_ADD
        };
        let pkt = Packet {
            bth: header(op, q.remote_qpn, psn, true),
            reth: None,
            aeth: None,
            imm: None,
            atomic: Some(eth),
            atomic_ack: None,
            deth: None,
            payload: &[],
            icrc: 0,
        };
        let buf = encode(&pkt)?;
        q.pending_tx
            .push_back(Outstanding::whole(psn, None, kind, quiet, buf));
        q.reads.push_back(PendingRead {
            wr_id,
            kind,
            first_psn: psn,
            packets: 1,
            received: 0,
            resume_at: 0,
            remote_va: 0,
            rkey: 0,
            sges,
            len: 8,
            quiet,
        });
        self.flush_tx(qp)
    }

    /// Sends queued packets while the window has room.
    pub(super) fn flush_tx(&mut self, qi: usize) -> io::Result<()> {
        if self.corked {
            return Ok(());
        }
        let window = self.window;
        let rto = self.rto_of(qi);
        let q = &mut self.qps[qi];
        let first = q.unacked.len();
        let asks = |o: &Outstanding| {
            matches!(
                o.kind,
                WcOpcode::RdmaRead | WcOpcode::CompSwap | WcOpcode::FetchAdd
            )
        };
        // READs and atomics sent and unanswered (one leaves `unacked`
        // once its responses have all come).
        let mut unanswered = q.unacked.iter().filter(|o| asks(o)).count();
        while q.unacked.len() < window {
            // At most max_rd_atomic READs and atomics unanswered, so that
            // the responder still remembers any of them that must be sent
            // again.
            if q.pending_tx
                .front()
                .is_some_and(|o| asks(o) && unanswered >= q.max_rd_atomic)
            {
                break;
            }
            let Some(o) = q.pending_tx.pop_front() else {
                break;
            };
            unanswered += usize::from(asks(&o));
            q.unacked.push_back(o);
        }
        if q.unacked.len() == first {
            return Ok(());
        }
        if q.rto_at.is_none() {
            q.rto_at = Some(Instant::now() + rto);
        }
        self.send_unacked(qi, first);
        Ok(())
    }

    /// Sends QP `qi`'s unacknowledged packets from index `first` on, in
    /// bursts (a refused send counts as a lost packet).
    pub(super) fn send_unacked(&mut self, qi: usize, first: usize) {
        let q = &mut self.qps[qi];
        let (ip, port) = (q.remote_ip, q.src_port);
        let mrs = &self.mrs;
        let mut burst: Vec<Piece<'_>> =
            q.unacked.range_mut(first..).map(|o| o.piece(mrs)).collect();
        let sent = self.io.send_burst(ip, port, &mut burst);
        self.stats.note_send(sent);
    }

    /// QP `qi`'s retransmission timeout.
    pub(super) fn rto_of(&self, qi: usize) -> Duration {
        self.qps[qi].rto.unwrap_or(self.rto)
    }

    /// A response that makes progress without acknowledging a whole
    /// request (a READ's middle packets) restarts QP `qi`'s timer: a long
    /// READ is not resent while its data streams in.
    pub(super) fn progress(&mut self, qi: usize) {
        let rto = self.rto_of(qi);
        let q = &mut self.qps[qi];
        q.retries = 0;
        q.resent_for = None;
        if q.rto_at.is_some() {
            q.rto_at = Some(Instant::now() + rto);
        }
    }

    /// Go-back-N: sends every unacknowledged packet of QP `qi` again. A
    /// READ whose first responses came asks for the rest only (its
    /// request rewritten: the PSN, address and length where the data
    /// stopped), as IBTA allows, so that what arrived is not sent twice.
    pub(super) fn resend_unacked(&mut self, qi: usize) {
        let mtu = self.qps[qi].mtu;
        let remote_qpn = self.qps[qi].remote_qpn;
        let stats = &mut self.stats;
        let q = &mut self.qps[qi];
        for o in q.unacked.iter_mut() {
            if o.kind != WcOpcode::RdmaRead {
                continue;
            }
            let Some(r) = q.reads.iter_mut().find(|r| r.first_psn == o.psn) else {
                continue;
            };
            if r.received == 0 || r.received >= r.packets {
                continue;
            }
            let done = r.received as usize * mtu;
            let pkt = Packet {
                bth: header(
                    opcode::READ_REQUEST,
                    remote_qpn,
                    psn_add(r.first_psn, r.received),
                    true,
                ),
                reth: Some(Reth {
                    va: r.remote_va + done as u64,
                    rkey: r.rkey,
                    dma_len: u32::try_from(r.len - done).unwrap_or(0),
                }),
                aeth: None,
                imm: None,
                atomic: None,
                atomic_ack: None,
                deth: None,
                payload: &[],
                icrc: 0,
            };
            if let Ok(buf) = encode(&pkt) {
                *o = Outstanding::whole(o.psn, o.completes, o.kind, o.quiet, buf);
                r.resume_at = r.received;
                stats.reads_resumed += 1;
            }
        }
        self.stats.retransmits += self.qps[qi].unacked.len() as u64;
        self.send_unacked(qi, 0);
    }

    /// Resends every unacknowledged packet of QPs whose timer ran out
    /// (go-back-N), or fails their work after `max_retries`.
    pub(super) fn check_timers(&mut self) -> io::Result<()> {
        let now = Instant::now();
        for qi in 0..self.qps.len() {
            let q = &mut self.qps[qi];
            if q.state == QpState::Error {
                continue;
            }
            if q.rnr_at.is_some_and(|t| t <= now) {
                // The peer's RNR timer ran out: send the refused packets
                // (and what followed) again.
                q.rnr_at = None;
                q.rto_at = Some(now + q.rto.unwrap_or(self.rto));
                self.resend_unacked(qi);
                continue;
            }
            if q.rto_at.is_none_or(|t| t > now) {
                continue;
            }
            if q.retries >= q.max_retries.unwrap_or(self.max_retries) {
                self.fail_outstanding(qi, WcStatus::RetryExceeded);
                continue;
            }
            q.retries += 1;
            q.rto_at = Some(now + q.rto.unwrap_or(self.rto));
            self.resend_unacked(qi);
        }
        Ok(())
    }

    /// Fails every outstanding work request of QP `qi` with `status` and
    /// moves the QP to ERROR.
    pub(super) fn fail_outstanding(&mut self, qi: usize, status: WcStatus) {
        let q = &mut self.qps[qi];
        q.state = QpState::Error;
        q.rto_at = None;
        q.rnr_at = None;
        let failed: Vec<(u64, WcOpcode)> = q
            .unacked
            .iter()
            .chain(q.pending_tx.iter())
            .filter_map(|o| o.completes.map(|w| (w, o.kind)))
            .chain(q.reads.iter().map(|r| (r.wr_id, r.kind)))
            .collect();
        q.unacked.clear();
        q.pending_tx.clear();
        q.reads.clear();
        let qpn = q.qpn;
        for (wr_id, opcode) in failed {
            self.staged
                .push_back(Completion::software(wr_id, opcode, status, qpn));
        }
        self.to_error(qi);
    }

    /// Sends a SEND or WRITE message in path-MTU packets.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn message(
        &mut self,
        qp: usize,
        wr_id: u64,
        kind: WcOpcode,
        payload: Payload<'_>,
        reth: Option<Reth>,
        imm: Option<u32>,
        quiet: bool,
    ) -> io::Result<()> {
        use opcode::*;
        let q = &mut self.qps[qp];
        let len = match payload {
            Payload::Bytes(d) => d.len(),
            Payload::Region { len, .. } => len,
        };
        let n = len.div_ceil(q.mtu).max(1);
        let write = kind == WcOpcode::RdmaWrite;
        for i in 0..n {
            let (first, last) = (i == 0, i + 1 == n);
            let op = match (write, first, last, imm.is_some()) {
                (false, true, true, false) => SEND_ONLY,
                (false, true, true, true) => SEND_ONLY_IMM,
                (false, true, false, _) => SEND_FIRST,
                (false, false, true, false) => SEND_LAST,
                (false, false, true, true) => SEND_LAST_IMM,
                (false, false, false, _) => SEND_MIDDLE,
                (true, true, true, false) => WRITE_ONLY,
                (true, true, true, true) => WRITE_ONLY_IMM,
                (true, true, false, _) => WRITE_FIRST,
                (true, false, true, false) => WRITE_LAST,
                (true, false, true, true) => WRITE_LAST_IMM,
                (true, false, false, _) => WRITE_MIDDLE,
            };
            let psn = q.sq_psn;
            q.sq_psn = psn_add(psn, 1);
            let (at, size) = (i * q.mtu, q.mtu.min(len - i * q.mtu));
            let chunk = match payload {
                Payload::Bytes(d) => &d[at..at + size],
                Payload::Region { .. } => &[],
            };
            let pkt = Packet {
                bth: header(op, q.remote_qpn, psn, last || psn % 8 == 7),
                reth: if first { reth } else { None },
                aeth: None,
                imm: if last { imm } else { None },
                atomic: None,
                atomic_ack: None,
                deth: None,
                payload: chunk,
                icrc: 0,
            };
            let completes = last.then_some(wr_id);
            let o = match payload {
                Payload::Bytes(_) => Outstanding::whole(psn, completes, kind, quiet, encode(&pkt)?),
                Payload::Region { mr, offset, .. } => {
                    let (buf, split) = headers_only(&pkt, size)?;
                    Outstanding {
                        psn,
                        completes,
                        kind,
                        quiet,
                        packet: buf,
                        split,
                        body: Some((mr, offset + at, size)),
                    }
                }
            };
            q.pending_tx.push_back(o);
        }
        self.flush_tx(qp)
    }

    /// Completes our requests acknowledged up to and including `psn`.
    pub(super) fn acknowledge(&mut self, qi: usize, psn: u32) -> io::Result<()> {
        let q = &mut self.qps[qi];
        let before = q.unacked.len();
        let mut unanswered = None;
        while let Some(o) = q.unacked.front() {
            if o.psn != psn && !wire::psn_before(o.psn, psn) {
                break;
            }
            // A READ or an atomic is answered by its response alone: an
            // ACK past one whose response has not all come means the
            // response was lost on the way (an implicit NAK).
            if q.reads.iter().any(|r| r.first_psn == o.psn) {
                unanswered = Some(o.psn);
                break;
            }
            let o = q.unacked.pop_front().expect("front exists");
            if let Some(wr_id) = o.completes.filter(|_| !o.quiet) {
                self.staged.push_back(Completion::software(
                    wr_id,
                    o.kind,
                    WcStatus::Success,
                    q.qpn,
                ));
            }
        }
        if q.unacked.len() < before {
            q.retries = 0;
            q.rnr_retries = 0;
            q.resent_for = None;
            let rto = q.rto.unwrap_or(self.rto);
            q.rto_at = (!q.unacked.is_empty()).then(|| Instant::now() + rto);
        }
        // The lost response's request goes again (once until something
        // moves: later ACKs that say the same are not new news).
        if let Some(p) = unanswered.filter(|p| q.resent_for != Some(*p)) {
            q.resent_for = Some(p);
            self.resend_unacked(qi);
        }
        self.flush_tx(qi)
    }
}
