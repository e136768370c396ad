//! Unreliable datagram queue pairs, as rdma_rxe speaks them: SEND (with
//! and without immediate) of at most one path MTU, a DETH carrying the
//! Q_Key the receiver checks and the sender's QP; no acknowledgements, no
//! retransmission. A receive gets the 40-byte GRH area first (for RoCE v2
//! over IPv4: 20 undefined bytes, then the datagram's IPv4 header) and
//! the payload after it; its completion names the sender's QP.
//!
//! The same two paths as RC: the packet's DETH and BTH select the queue
//! and the receive, the payload goes straight into the application's
//! memory, and the completion carries the amended metadata.

use super::*;
use crate::wire::Deth;

/// Bytes of the GRH area at the start of every UD receive.
pub const GRH_BYTES: usize = 40;

/// One UD queue pair.
#[derive(Debug)]
pub(super) struct UdQp {
    pub qpn: u32,
    qkey: u32,
    pd: Pd,
    state: QpState,
    rq: VecDeque<PostedRecv>,
    pub send_cq: CqId,
    pub recv_cq: CqId,
    mtu: usize,
}

impl Engine {
    fn ud_index(&self, qpn: u32) -> io::Result<usize> {
        self.uds
            .iter()
            .position(|q| q.qpn == qpn)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such UD queue pair"))
    }

    /// Creates a UD queue pair numbered `qpn` in RESET.
    pub fn create_ud_qp(
        &mut self,
        pd: Pd,
        qpn: u32,
        send_cq: CqId,
        recv_cq: CqId,
    ) -> io::Result<()> {
        for cq in [send_cq, recv_cq] {
            if cq.0 as usize > self.cqs.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "no such completion queue",
                ));
            }
        }
        if self.qp_index(qpn).is_some() || self.ud_index(qpn).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "queue pair number in use",
            ));
        }
        self.uds.push(UdQp {
            qpn: qpn & 0x00ff_ffff,
            qkey: 0,
            pd,
            state: QpState::Reset,
            rq: VecDeque::new(),
            send_cq,
            recv_cq,
            mtu: 1024,
        });
        Ok(())
    }

    /// Whether `qpn` is one of this engine's UD queue pairs.
    pub fn is_ud(&self, qpn: u32) -> bool {
        self.ud_index(qpn).is_ok()
    }

    /// Destroys UD queue pair `qpn` and what was posted to it.
    pub fn destroy_ud_qp(&mut self, qpn: u32) -> io::Result<()> {
        let i = self.ud_index(qpn)?;
        self.uds.remove(i);
        self.staged.retain(|c| c.qpn != qpn);
        Ok(())
    }

    /// Moves UD queue pair `qpn` to `state` (INIT sets its Q_Key; ERROR
    /// flushes its receives; RESET drops them).
    pub fn ud_modify(&mut self, qpn: u32, state: QpState, qkey: Option<u32>) -> io::Result<()> {
        let i = self.ud_index(qpn)?;
        let q = &mut self.uds[i];
        let ok = matches!(
            (q.state, state),
            (_, QpState::Reset | QpState::Error)
                | (QpState::Reset | QpState::Init, QpState::Init)
                | (QpState::Init | QpState::Rtr, QpState::Rtr)
                | (QpState::Rtr | QpState::Rts, QpState::Rts)
        );
        if !ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the queue pair cannot go from {:?} to {state:?}", q.state),
            ));
        }
        if let Some(k) = qkey {
            q.qkey = k;
        }
        q.state = state;
        match state {
            QpState::Reset => q.rq.clear(),
            QpState::Error => {
                let flushed: Vec<u64> = q.rq.drain(..).map(|r| r.wr_id).collect();
                for wr_id in flushed {
                    self.stage_ud(qpn, wr_id, WcOpcode::Recv, WcStatus::Flushed, 0, None, None);
                }
                self.notify_cq();
            }
            _ => {}
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn stage_ud(
        &mut self,
        qpn: u32,
        wr_id: u64,
        opcode: WcOpcode,
        status: WcStatus,
        byte_len: u32,
        imm: Option<u32>,
        src_qp: Option<u32>,
    ) {
        self.staged.push_back(Completion {
            wr_id,
            opcode,
            status,
            byte_len,
            imm,
            qpn,
            path: PathKind::Fast,
            src_qp,
        });
    }

    /// Posts a receive to UD queue pair `qpn` (entries as for RC; one the
    /// queue pair may not use completes with a protection error).
    pub fn ud_post_recv(&mut self, qpn: u32, wr_id: u64, sges: Vec<Sge>) -> io::Result<()> {
        let i = self.ud_index(qpn)?;
        let pd = self.uds[i].pd;
        let usable = sges.iter().all(|e| {
            self.mrs.get(e.mr).is_some_and(|m| {
                m.pd == pd
                    && m.access.local_write
                    && e.offset
                        .checked_add(e.len)
                        .is_some_and(|end| end <= m.buf.len())
            })
        });
        let q = &mut self.uds[i];
        if !usable || matches!(q.state, QpState::Reset | QpState::Error) {
            let status = if usable {
                WcStatus::Flushed
            } else {
                WcStatus::LocalProtectionError
            };
            self.stage_ud(qpn, wr_id, WcOpcode::Recv, status, 0, None, None);
            self.notify_cq();
            return Ok(());
        }
        let len = sges.iter().map(|e| e.len).sum();
        q.rq.push_back(PostedRecv { wr_id, sges, len });
        Ok(())
    }

    /// Sends one datagram from UD queue pair `qpn` to queue pair
    /// `dest_qpn` at `dest` with Q_Key `qkey`: the bytes of `sges`, or
    /// `inline`. At most one path MTU. Completes (when `signaled`) once it
    /// is handed to the network.
    #[allow(clippy::too_many_arguments)]
    pub fn ud_send(
        &mut self,
        qpn: u32,
        wr_id: u64,
        dest: Ipv4Addr,
        dest_qpn: u32,
        qkey: u32,
        sges: &[Sge],
        inline: Option<&[u8]>,
        imm: Option<u32>,
        signaled: bool,
    ) -> io::Result<()> {
        let i = self.ud_index(qpn)?;
        let q = &self.uds[i];
        let mut data = Vec::new();
        let mut status = WcStatus::Success;
        if q.state != QpState::Rts {
            status = WcStatus::Flushed;
        } else if let Some(b) = inline {
            data.extend_from_slice(b);
        } else {
            for e in sges {
                match self
                    .mrs
                    .get(e.mr)
                    .filter(|m| m.pd == q.pd)
                    .and_then(|m| m.buf.get(e.offset..e.offset.checked_add(e.len)?))
                {
                    Some(b) => data.extend_from_slice(b),
                    None => {
                        status = WcStatus::LocalProtectionError;
                        break;
                    }
                }
            }
        }
        if status == WcStatus::Success && data.len() > q.mtu {
            status = WcStatus::LocalProtectionError;
        }
        if status == WcStatus::Success {
            // A controlled Q_Key (high bit set) means the QP's own.
            let qkey = if qkey & 0x8000_0000 != 0 {
                q.qkey
            } else {
                qkey
            };
            let op = if imm.is_some() {
                opcode::UD_SEND_ONLY_IMM
            } else {
                opcode::UD_SEND_ONLY
            };
            let pkt = Packet {
                bth: header(op, dest_qpn & 0x00ff_ffff, 0, false),
                deth: Some(Deth { qkey, src_qp: qpn }),
                reth: None,
                aeth: None,
                imm,
                atomic: None,
                atomic_ack: None,
                payload: &data,
                icrc: 0,
            };
            let mut buf = encode(&pkt)?;
            let port = 0xc000 | u16::try_from(qpn & 0x3fff).unwrap_or(0);
            let sent = self.io.send(dest, port, &mut buf);
            self.stats.note_send(sent);
        }
        if signaled || status != WcStatus::Success {
            let n = u32::try_from(data.len()).unwrap_or(0);
            self.stage_ud(qpn, wr_id, WcOpcode::Send, status, n, None, None);
        }
        self.notify_cq();
        Ok(())
    }

    /// A UD packet: its queue pair by the BTH, the Q_Key checked, the
    /// oldest receive filled with the GRH area and the payload. Dropped
    /// (counted) when nothing matches, as UD does: no NAK.
    pub(super) fn handle_ud(&mut self, flow: &wire::Flow, pkt: &Packet<'_>) {
        let Some(deth) = pkt.deth else { return };
        let Ok(i) = self.ud_index(pkt.bth.dest_qp) else {
            self.stats.dropped += 1;
            return;
        };
        let q = &mut self.uds[i];
        if !matches!(q.state, QpState::Rtr | QpState::Rts) || deth.qkey != q.qkey {
            self.stats.dropped += 1;
            return;
        }
        let Some(r) = q.rq.pop_front() else {
            self.stats.dropped += 1;
            return;
        };
        let qpn = q.qpn;
        let total = GRH_BYTES + pkt.payload.len();
        if total > r.len {
            self.stage_ud(
                qpn,
                r.wr_id,
                WcOpcode::Recv,
                WcStatus::LocalProtectionError,
                0,
                None,
                None,
            );
            self.notify_cq();
            return;
        }
        let mut grh = [0u8; GRH_BYTES];
        // The IPv4 header in the GRH area's last 20 bytes, as rxe leaves
        // it: version and length, total length, TTL, protocol UDP,
        // addresses.
        let ip = &mut grh[20..];
        ip[0] = 0x45;
        let len =
            u16::try_from(20 + 8 + wire::BTH_BYTES + 8 + pkt.payload.len()).unwrap_or(u16::MAX);
        ip[2..4].copy_from_slice(&len.to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&flow.src.octets());
        ip[16..20].copy_from_slice(&flow.dst.octets());
        let placed = placement::scatter(&mut self.mrs, &r.sges, 0, &grh)
            .and_then(|()| placement::scatter(&mut self.mrs, &r.sges, GRH_BYTES, pkt.payload));
        let status = match placed {
            Ok(()) => {
                self.stats.fast_packets += 1;
                self.stats.fast_bytes += pkt.payload.len() as u64;
                WcStatus::Success
            }
            Err(_) => WcStatus::LocalProtectionError,
        };
        let n = u32::try_from(total).unwrap_or(u32::MAX);
        self.stage_ud(
            qpn,
            r.wr_id,
            WcOpcode::Recv,
            status,
            n,
            pkt.imm,
            Some(deth.src_qp),
        );
        self.notify_cq();
    }

    /// Where a UD queue pair's completions go: (send, receive) queues.
    pub(super) fn ud_cqs(&self, qpn: u32) -> Option<(CqId, CqId)> {
        self.uds
            .iter()
            .find(|q| q.qpn == qpn)
            .map(|q| (q.send_cq, q.recv_cq))
    }

    /// Whether a receive posted to a UD queue pair uses region `mr`.
    pub(super) fn ud_uses_mr(&self, mr: usize) -> bool {
        self.uds
            .iter()
            .any(|q| q.rq.iter().any(|r| r.sges.iter().any(|s| s.mr == mr)))
    }
}
