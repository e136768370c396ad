//! The responder side of the software path: coalesced and delayed ACKs,
//! NAKs, READ responses, and atomics executed once (a duplicate gets the
//! original value replayed).

use super::*;

impl Engine {
    /// Acknowledges `psn`, coalescing: the ACK goes out (at the start of a
    /// poll) once it covers
    /// [`ACK_BATCH`] requests or [`ACK_DELAY`] after the first, whichever
    /// comes first (a later ACK covers every earlier PSN).
    pub(super) fn schedule_ack(&mut self, qi: usize, psn: u32) -> io::Result<()> {
        let q = &mut self.qps[qi];
        let now = Instant::now();
        let (n, at) = match q.ack_due {
            Some((_, n, at)) => (n + 1, at),
            None => (1, now + ACK_DELAY),
        };
        // A full batch is due now, but goes out at the start of the next
        // poll, not here: the application first gets its completions and
        // can answer (a ping-pong's reply leaves before the ACK does).
        let at = if n >= ACK_BATCH { now } else { at };
        q.ack_due = Some((psn, n, at));
        Ok(())
    }

    /// Sends every coalesced ACK now. The engine makes progress only in
    /// [`Engine::poll`]; an application that stops polling calls this
    /// first so that its peer's requests complete.
    pub fn flush(&mut self) -> io::Result<()> {
        for qi in 0..self.qps.len() {
            if let Some((psn, _, _)) = self.qps[qi].ack_due.take() {
                self.send_ack(qi, psn, ACK_UNLIMITED)?;
            }
        }
        Ok(())
    }

    /// Sends coalesced ACKs whose time has come.
    pub(super) fn flush_acks(&mut self) -> io::Result<()> {
        let now = Instant::now();
        for qi in 0..self.qps.len() {
            if let Some((psn, _, at)) = self.qps[qi].ack_due {
                if at <= now {
                    self.qps[qi].ack_due = None;
                    self.send_ack(qi, psn, ACK_UNLIMITED)?;
                }
            }
        }
        Ok(())
    }

    /// Executes an atomic request (software path): checks the sequence,
    /// the key, the right, the alignment and the bounds, runs it on the
    /// region's 8 bytes (host byte order), and answers with an ATOMIC
    /// ACKNOWLEDGE carrying the original value. A duplicate is answered
    /// from the QP's replay list, never executed again.
    pub(super) fn respond_atomic(&mut self, qi: usize, pkt: &Packet<'_>) -> io::Result<()> {
        let q = &self.qps[qi];
        let psn = pkt.bth.psn;
        if wire::psn_before(psn, q.epsn) {
            let replay = q
                .atomic_replies
                .iter()
                .find(|(p, _)| *p == psn)
                .map(|(_, orig)| *orig);
            return match replay {
                Some(orig) => {
                    self.stats.atomic_replays += 1;
                    self.send_atomic_ack(qi, psn, orig)
                }
                // Too old to remember: the requester has moved on.
                None => Ok(()),
            };
        }
        if psn != q.epsn {
            let e = q.epsn;
            if self.qps[qi].nak_sent {
                return Ok(());
            }
            self.qps[qi].nak_sent = true;
            return self.send_ack(qi, psn_add(e, 0x00ff_ffff), NAK_PSN_SEQ);
        }
        let Some(eth) = pkt.atomic else {
            return Ok(());
        };
        let pd = q.pd;
        let region = self
            .mrs
            .iter()
            .position(|m| m.rkey == eth.rkey && m.pd == pd && m.access.remote_atomic)
            .and_then(|i| {
                let m = &self.mrs[i];
                let off = usize::try_from(eth.va.checked_sub(m.va)?).ok()?;
                off.checked_add(8)
                    .is_some_and(|e| e <= m.buf.len())
                    .then_some((i, off))
            });
        let e = q.epsn;
        let Some((mi, off)) = region else {
            self.qps[qi].state = QpState::Error;
            return self.send_ack(qi, e, NAK_REMOTE_ACCESS);
        };
        if eth.va % 8 != 0 {
            self.qps[qi].state = QpState::Error;
            return self.send_ack(qi, e, NAK_INVALID_REQUEST);
        }
        let cell = &mut self.mrs[mi].buf[off..off + 8];
        let orig = u64::from_ne_bytes(cell.try_into().expect("8 bytes"));
        let new = if pkt.bth.opcode == opcode::COMPARE_SWAP {
            if orig == eth.compare {
                eth.swap_add
            } else {
                orig
            }
        } else {
            orig.wrapping_add(eth.swap_add)
        };
        cell.copy_from_slice(&new.to_ne_bytes());
        let q = &mut self.qps[qi];
        q.msn = psn_add(q.msn, 1);
        q.epsn = psn_add(q.epsn, 1);
        q.nak_sent = false;
        if q.atomic_replies.len() == ATOMIC_REPLAY {
            q.atomic_replies.pop_front();
        }
        q.atomic_replies.push_back((psn, orig));
        self.stats.atomics += 1;
        self.send_atomic_ack(qi, psn, orig)
    }

    pub(super) fn send_atomic_ack(&mut self, qi: usize, psn: u32, orig: u64) -> io::Result<()> {
        let q = &self.qps[qi];
        let pkt = Packet {
            bth: header(opcode::ATOMIC_ACKNOWLEDGE, q.remote_qpn, psn, false),
            reth: None,
            aeth: Some(Aeth {
                syndrome: ACK_UNLIMITED,
                msn: q.msn,
            }),
            imm: None,
            atomic: None,
            atomic_ack: Some(orig),
            deth: None,
            payload: &[],
            icrc: 0,
        };
        self.send_control(qi, &pkt)
    }

    /// Sends one header-only packet (an ACK, NAK or atomic ACK) to the
    /// QP's peer; a refused send counts as a lost packet.
    pub(super) fn send_control(&mut self, qi: usize, pkt: &Packet<'_>) -> io::Result<()> {
        let mut buf = encode(pkt)?;
        let q = &self.qps[qi];
        let (ip, port) = (q.remote_ip, q.src_port);
        let sent = self.io.send(ip, port, &mut buf);
        self.stats.note_send(sent);
        Ok(())
    }

    /// Answers an RDMA READ request (software path): checks the key, the
    /// rights and the bounds, then sends the data in path-MTU responses.
    pub(super) fn respond_read(&mut self, qi: usize, pkt: &Packet<'_>) -> io::Result<()> {
        use opcode::*;
        let q = &self.qps[qi];
        // A duplicate READ (its responses were lost) is executed again;
        // one from the future is a sequence error.
        let duplicate = wire::psn_before(pkt.bth.psn, q.epsn);
        if pkt.bth.psn != q.epsn && !duplicate {
            let e = q.epsn;
            if self.qps[qi].nak_sent {
                return Ok(());
            }
            self.qps[qi].nak_sent = true;
            return self.send_ack(qi, psn_add(e, 0x00ff_ffff), NAK_PSN_SEQ);
        }
        let reth = pkt.reth.unwrap_or(Reth {
            va: 0,
            rkey: 0,
            dma_len: 0,
        });
        let len = reth.dma_len as usize;
        let pd = q.pd;
        // A zero-length READ names no memory: its R_Key and VA are not
        // checked (IBTA C9-88), and its one response carries nothing.
        let found = if len == 0 {
            Some((None, 0))
        } else {
            self.mrs
                .iter()
                .position(|m| m.rkey == reth.rkey && m.pd == pd)
                .and_then(|i| {
                    let m = &self.mrs[i];
                    let off = usize::try_from(reth.va.checked_sub(m.va)?).ok()?;
                    (m.access.remote_read && off.checked_add(len).is_some_and(|e| e <= m.buf.len()))
                        .then_some((Some(i), off))
                })
        };
        let Some((mi, off)) = found else {
            let e = q.epsn;
            self.qps[qi].state = QpState::Error;
            return self.send_ack(qi, e, NAK_REMOTE_ACCESS);
        };
        let q = &mut self.qps[qi];
        let n = len.div_ceil(q.mtu).max(1);
        let psn = pkt.bth.psn;
        // A duplicate from inside an earlier READ asks for that READ's
        // rest: its responses continue it (MIDDLE ... LAST), as rdma_rxe
        // answers and as its requester insists (FIRST is taken there only
        // at the READ's first PSN).
        let mut continues = false;
        if duplicate {
            continues = q.read_replies.iter().any(|&(first, count)| {
                wire::psn_before(first, psn) && wire::psn_before(psn, psn_add(first, count))
            });
            self.stats.reads_continued += u64::from(continues);
        } else {
            q.msn = psn_add(q.msn, 1);
            q.epsn = psn_add(q.epsn, n as u32);
            q.nak_sent = false;
            if q.read_replies.len() == READ_REPLAY {
                q.read_replies.pop_front();
            }
            q.read_replies.push_back((psn, n as u32));
        }
        let (mtu, remote_qpn, msn) = (q.mtu, q.remote_qpn, q.msn);
        let (ip, port) = (q.remote_ip, q.src_port);
        // The responses carry their payload straight from the region, a
        // batch at a time: a large READ never holds more than a batch of
        // headers.
        for start in (0..n).step_by(READ_RESPONSE_BATCH) {
            let mut heads = Vec::with_capacity(READ_RESPONSE_BATCH);
            for i in start..(start + READ_RESPONSE_BATCH).min(n) {
                let (first, last) = (i == 0 && !continues, i + 1 == n);
                let op = match (first, last) {
                    (true, true) => READ_RESPONSE_ONLY,
                    (true, false) => READ_RESPONSE_FIRST,
                    (false, true) => READ_RESPONSE_LAST,
                    (false, false) => READ_RESPONSE_MIDDLE,
                };
                let resp = Packet {
                    bth: header(op, remote_qpn, psn_add(psn, i as u32), false),
                    reth: None,
                    aeth: (first || last).then_some(Aeth {
                        syndrome: ACK_UNLIMITED,
                        msn,
                    }),
                    imm: None,
                    atomic: None,
                    atomic_ack: None,
                    deth: None,
                    payload: &[],
                    icrc: 0,
                };
                let (at, size) = (i * mtu, mtu.min(len - i * mtu));
                let (buf, split) = headers_only(&resp, size)?;
                heads.push((buf, split, off + at, size));
            }
            let mrs = &self.mrs;
            let mut burst: Vec<Piece<'_>> = heads
                .iter_mut()
                .map(|(buf, split, at, size)| {
                    let (head, tail) = buf.split_at_mut(*split);
                    Piece {
                        head,
                        body: mi.map_or(&[][..], |mi| &mrs[mi].buf[*at..*at + *size]),
                        tail,
                    }
                })
                .collect();
            let sent = self.io.send_burst(ip, port, &mut burst);
            self.stats.note_send(sent);
        }
        Ok(())
    }

    pub(super) fn send_ack(&mut self, qp: usize, psn: u32, syndrome: u8) -> io::Result<()> {
        let q = &self.qps[qp];
        let pkt = ack_packet(q.remote_qpn, psn, syndrome, q.msn);
        self.send_control(qp, &pkt)
    }
}

/// An ACKNOWLEDGE to queue pair `remote_qpn`: `psn` and what came before
/// it, with `syndrome` (ACK, NAK or RNR NAK) and the message count `msn`.
pub(super) fn ack_packet(remote_qpn: u32, psn: u32, syndrome: u8, msn: u32) -> Packet<'static> {
    Packet {
        bth: header(opcode::ACKNOWLEDGE, remote_qpn, psn, false),
        reth: None,
        aeth: Some(Aeth { syndrome, msn }),
        imm: None,
        atomic: None,
        atomic_ack: None,
        deth: None,
        payload: &[],
        icrc: 0,
    }
}
