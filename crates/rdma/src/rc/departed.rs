//! Queue pairs destroyed a moment ago still acknowledge what they
//! received.
//!
//! An application may destroy its queue pair as soon as it has its last
//! message (`ibv_rc_pingpong` does). If the ACK for that message was lost,
//! the peer sends the message again, and a destroyed queue pair answers
//! nothing: the peer retries until its retry count runs out, and rdma_rxe
//! takes a `retry_cnt` of 7 for "without limit", so it never stops. For a
//! few seconds after `destroy_qp` the engine therefore remembers where each
//! queue pair's receive side stood, and answers a resent SEND or WRITE it
//! had already received with the ACK the queue pair would have sent. It
//! places nothing, and answers nothing new: a request past what the queue
//! pair received is dropped, as for any unknown queue pair.

use super::*;

/// How long a destroyed queue pair's receive side is remembered: many of
/// a peer's retransmission timeouts (rdma_rxe's are 67 ms at the `timeout`
/// 14 perftest and the pingpong tools ask for).
const REMEMBERED_FOR: Duration = Duration::from_secs(5);
/// Destroyed queue pairs remembered at most (the oldest are forgotten).
const REMEMBERED: usize = 256;

/// Where a destroyed queue pair's receive side stood.
#[derive(Debug, Clone)]
pub(super) struct Departed {
    qpn: u32,
    remote_ip: Ipv4Addr,
    remote_qpn: u32,
    src_port: u16,
    /// The next PSN it expected: everything before it was received.
    epsn: u32,
    msn: u32,
    until: Instant,
}

impl Engine {
    /// Remembers queue pair `q`'s receive side as it is destroyed, if it
    /// was connected.
    pub(super) fn remember_departed(&mut self, q: &QueuePair) {
        if !matches!(q.state, QpState::Rtr | QpState::Rts) {
            return;
        }
        if self.departed.len() == REMEMBERED {
            self.departed.pop_front();
        }
        self.departed.push_back(Departed {
            qpn: q.qpn,
            remote_ip: q.remote_ip,
            remote_qpn: q.remote_qpn,
            src_port: q.src_port,
            epsn: q.epsn,
            msn: q.msn,
            until: Instant::now() + REMEMBERED_FOR,
        });
    }

    /// Forgets destroyed queue pair `qpn` (its number is in use again).
    pub(super) fn forget_departed(&mut self, qpn: u32) {
        self.departed.retain(|d| d.qpn != qpn);
    }

    /// A packet for no live queue pair: acknowledges it again if it is a
    /// SEND or WRITE that destroyed queue pair received before it went.
    /// Returns whether it did.
    pub(super) fn answer_departed(&mut self, from: Ipv4Addr, pkt: &Packet<'_>) -> bool {
        use opcode::*;
        let now = Instant::now();
        self.departed.retain(|d| d.until > now);
        let Some(d) = self.departed.iter().find(|d| {
            d.qpn == pkt.bth.dest_qp && d.remote_ip == from && wire::psn_before(pkt.bth.psn, d.epsn)
        }) else {
            return false;
        };
        let resent = matches!(
            pkt.bth.opcode,
            SEND_FIRST
                | SEND_MIDDLE
                | SEND_LAST
                | SEND_LAST_IMM
                | SEND_ONLY
                | SEND_ONLY_IMM
                | WRITE_FIRST
                | WRITE_MIDDLE
                | WRITE_LAST
                | WRITE_LAST_IMM
                | WRITE_ONLY
                | WRITE_ONLY_IMM
        );
        if !resent {
            return false;
        }
        let ack = super::responder::ack_packet(
            d.remote_qpn,
            psn_add(d.epsn, 0x00ff_ffff),
            ACK_UNLIMITED,
            d.msn,
        );
        let (ip, port) = (d.remote_ip, d.src_port);
        if let Ok(mut buf) = encode(&ack) {
            let sent = self.io.send(ip, port, &mut buf);
            self.stats.note_send(sent);
            self.stats.departed_acks += 1;
        }
        true
    }
}
