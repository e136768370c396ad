//! Receiving: packets from the ring go to the placement fast path
//! (`placement.rs`) when their metadata allows, and to the software
//! path otherwise (acknowledgements, duplicates, sequence errors, missing
//! receive buffers, protection faults).

use super::*;

impl Engine {
    /// Runs the retransmission timers, then receives and handles packets:
    /// waits up to `timeout` for the first, then takes what is already
    /// queued (up to 64). Returns whether any packet was handled.
    pub fn poll(&mut self, timeout: Duration) -> io::Result<bool> {
        #[cfg(test)]
        if let Some(kind) = self.fail_poll.take() {
            return Err(io::Error::new(kind, "injected poll failure"));
        }
        self.check_timers()?;
        self.flush_acks()?;
        // Wait no longer than the next coalesced ACK is due.
        let timeout = if self.qps.iter().any(|q| q.ack_due.is_some()) {
            timeout.min(ACK_DELAY)
        } else {
            timeout
        };
        // Nor longer than an RNR wait ends.
        let timeout = match self.qps.iter().filter_map(|q| q.rnr_at).min() {
            Some(t) => timeout.min(t.saturating_duration_since(Instant::now())),
            None => timeout,
        };
        let mut any = false;
        let mut wait = timeout.min(self.rto);
        // Handle what is already there (up to a batch), waiting only for
        // the first.
        let mut drained = false;
        for _ in 0..64 {
            if !self.poll_one(wait)? {
                drained = true;
                break;
            }
            any = true;
            wait = Duration::ZERO;
        }
        // The burst is over (nothing more queued): its ACKs are due at
        // once rather than after ACK_DELAY, so a requester waiting for one
        // completion is not held back, and they go at the start of the
        // next poll, after the application (or the card's rings) had its
        // turn to answer: a ping-pong's reply still leaves first. A stream
        // still coalesces within its bursts.
        if any && drained {
            let now = Instant::now();
            for q in &mut self.qps {
                if let Some((psn, n, _)) = q.ack_due {
                    q.ack_due = Some((psn, n, now));
                }
            }
        }
        // Datagrams refused below RoCEv2 (IPv4/UDP checks) count as dropped.
        self.stats.dropped += std::mem::take(&mut self.io.malformed);
        let (sent, received, spilled) = std::mem::take(&mut self.io.gso_counts);
        self.stats.gso_segments_sent += sent;
        self.stats.gso_datagrams_received += received;
        self.stats.spilled += spilled;
        self.notify_cq();
        Ok(any)
    }

    pub(super) fn poll_one(&mut self, timeout: Duration) -> io::Result<bool> {
        let Some(f) = self.io.recv_frame(timeout)? else {
            return Ok(false);
        };
        let mut r = Ok(());
        // SAFETY: the frame is released only below, after the last use of
        // its datagrams; `self.io` (which owns the ring and the spill
        // buffer) is not replaced, dropped or asked for another frame
        // while a packet is handled.
        let datagrams = unsafe { f.datagrams() };
        for (flow, data) in datagrams {
            r = self.handle_packet(&flow, data);
            if r.is_err() {
                break;
            }
        }
        self.io.release(f);
        r.map(|()| true)
    }

    /// Checks, parses and handles one received packet.
    pub(super) fn handle_packet(&mut self, flow: &wire::Flow, data: &[u8]) -> io::Result<()> {
        if wire::check(flow, data).is_err() {
            self.stats.dropped += 1;
            return Ok(());
        }
        let Ok(pkt) = Packet::parse(data) else {
            self.stats.dropped += 1;
            return Ok(());
        };
        if pkt.deth.is_some() {
            self.handle_ud(flow, &pkt);
            return Ok(());
        }
        // The packet's metadata selects the queue.
        let Some(qi) = self.qps.iter().position(|q| q.qpn == pkt.bth.dest_qp) else {
            if !self.answer_departed(flow.src, &pkt) {
                self.stats.dropped += 1;
            }
            return Ok(());
        };
        if matches!(
            pkt.bth.opcode,
            opcode::READ_RESPONSE_FIRST
                | opcode::READ_RESPONSE_MIDDLE
                | opcode::READ_RESPONSE_LAST
                | opcode::READ_RESPONSE_ONLY
        ) {
            let (qps, mrs, cq) = (&mut self.qps, &mut self.mrs, &mut self.staged);
            match place_read_response(&mut qps[qi], mrs, &pkt, cq) {
                Ok(last) => {
                    self.stats.fast_packets += 1;
                    self.stats.fast_bytes += pkt.payload.len() as u64;
                    // A read response acknowledges every earlier request.
                    match last {
                        Some(p) => self.acknowledge(qi, p)?,
                        None => self.progress(qi),
                    }
                }
                Err(_) => self.stats.slow_packets += 1,
            }
            return Ok(());
        }
        if pkt.bth.opcode == opcode::ATOMIC_ACKNOWLEDGE {
            let (qps, mrs, cq) = (&mut self.qps, &mut self.mrs, &mut self.staged);
            match place_atomic_ack(&mut qps[qi], mrs, &pkt, cq) {
                Ok(psn) => {
                    self.stats.fast_packets += 1;
                    self.stats.fast_bytes += 8;
                    // It acknowledges every earlier request too.
                    self.acknowledge(qi, psn)?;
                }
                Err(_) => self.stats.slow_packets += 1,
            }
            return Ok(());
        }
        self.feed_from_srq(qi, &pkt);
        let (qps, mrs, cq) = (&mut self.qps, &mut self.mrs, &mut self.staged);
        match place(&mut qps[qi], mrs, &pkt, cq) {
            Ok(Placed::Done { psn, ack_req }) => {
                self.stats.fast_packets += 1;
                self.stats.fast_bytes += pkt.payload.len() as u64;
                if ack_req {
                    self.schedule_ack(qi, psn)?;
                }
            }
            Err(why) => {
                self.stats.slow_packets += 1;
                self.software(qi, &pkt, why)?;
            }
        }
        Ok(())
    }

    /// The software path.
    pub(super) fn software(&mut self, qi: usize, pkt: &Packet<'_>, why: Slow) -> io::Result<()> {
        match (pkt.bth.opcode, why) {
            (opcode::ACKNOWLEDGE, _) => {
                let aeth = pkt.aeth.unwrap_or(Aeth {
                    syndrome: 0,
                    msn: 0,
                });
                let q = &mut self.qps[qi];
                match aeth.syndrome >> 5 {
                    0 => self.acknowledge(qi, pkt.bth.psn)?,
                    3 => {
                        // NAK: sequence error → go back N; others fail.
                        if aeth.syndrome == NAK_PSN_SEQ {
                            self.resend_unacked(qi);
                        } else {
                            let status = if aeth.syndrome == NAK_REMOTE_ACCESS {
                                WcStatus::RemoteAccessError
                            } else {
                                WcStatus::RemoteInvalidRequest
                            };
                            q.state = QpState::Error;
                            let failed = q
                                .unacked
                                .iter()
                                .find_map(|o| o.completes.map(|w| (w, o.kind)))
                                .or_else(|| q.reads.front().map(|r| (r.wr_id, r.kind)));
                            q.unacked.clear();
                            q.reads.clear();
                            if let Some((wr_id, kind)) = failed {
                                self.staged
                                    .push_back(Completion::software(wr_id, kind, status, q.qpn));
                            }
                            // The rest of the QP's work is flushed.
                            self.to_error(qi);
                        }
                    }
                    1 => {
                        // RNR NAK: the packets before its PSN arrived; the
                        // rest goes again after the timer the peer asked
                        // for, up to `rnr_retry` times in a row.
                        self.acknowledge(qi, psn_add(pkt.bth.psn, 0x00ff_ffff))?;
                        self.stats.rnr_naks += 1;
                        let limit = self.qps[qi].rnr_retry.unwrap_or(self.rnr_retry);
                        let q = &mut self.qps[qi];
                        if q.unacked.is_empty() {
                            return Ok(());
                        }
                        if limit != 7 && q.rnr_retries >= limit {
                            self.fail_outstanding(qi, WcStatus::RnrRetryExceeded);
                        } else {
                            q.rnr_retries += 1;
                            q.rto_at = None;
                            q.rnr_at = Some(Instant::now() + rnr_delay(aeth.syndrome));
                        }
                    }
                    _ => {}
                }
                Ok(())
            }
            (opcode::READ_REQUEST, _) => self.respond_read(qi, pkt),
            (opcode::COMPARE_SWAP | opcode::FETCH_ADD, _) => self.respond_atomic(qi, pkt),
            (_, Slow::Duplicate) => {
                // Already placed: acknowledge everything received so far
                // again, place nothing.
                let e = self.qps[qi].epsn;
                self.send_ack(qi, psn_add(e, 0x00ff_ffff), ACK_UNLIMITED)
            }
            (_, Slow::OutOfSequence) => {
                // NAK once per expected PSN; the requester goes back.
                if self.qps[qi].nak_sent {
                    return Ok(());
                }
                self.qps[qi].nak_sent = true;
                let e = self.qps[qi].epsn;
                self.send_ack(qi, psn_add(e, 0x00ff_ffff), NAK_PSN_SEQ)
            }
            (_, Slow::NoReceive) => {
                let e = self.qps[qi].epsn;
                let timer = self.qps[qi].min_rnr_timer & 0x1f;
                self.send_ack(qi, e, RNR_NAK | timer)
            }
            (_, Slow::Access) => {
                let e = self.qps[qi].epsn;
                self.qps[qi].state = QpState::Error;
                self.send_ack(qi, e, NAK_REMOTE_ACCESS)
            }
            _ => Ok(()),
        }
    }
}
