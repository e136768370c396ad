//! The placement fast path: the packet's own metadata (destination QP,
//! opcode, PSN, RETH) selects the queue and the memory; the payload is
//! written straight into the registered region; amended metadata (a
//! [`Completion`]) goes to the completion ring. Anything it will not place
//! it hands back as [`Slow`] for the software path.

use super::*;

/// Copies `data` into the scatter list `sges` starting `at` bytes into it,
/// after checking that every piece lies inside its region (nothing is
/// written otherwise).
pub(super) fn scatter(
    mrs: &mut [MemoryRegion],
    sges: &[Sge],
    at: usize,
    data: &[u8],
) -> Result<(), Slow> {
    let mut pieces = Vec::with_capacity(2);
    let (mut skip, mut left) = (at, data.len());
    for e in sges {
        if left == 0 {
            break;
        }
        if skip >= e.len {
            skip -= e.len;
            continue;
        }
        let n = (e.len - skip).min(left);
        let start = e.offset.checked_add(skip).ok_or(Slow::Access)?;
        let mr = mrs.get(e.mr).ok_or(Slow::Access)?;
        if start.checked_add(n).is_none_or(|end| end > mr.buf.len()) {
            return Err(Slow::Access);
        }
        pieces.push((e.mr, start, n));
        skip = 0;
        left -= n;
    }
    if left != 0 {
        return Err(Slow::Access);
    }
    let mut from = 0;
    for (mr, start, n) in pieces {
        mrs[mr].buf[start..start + n].copy_from_slice(&data[from..from + n]);
        from += n;
    }
    Ok(())
}

pub(super) fn psn_add(p: u32, n: u32) -> u32 {
    p.wrapping_add(n) & 0x00ff_ffff
}

/// The fast path: steer by the packet's metadata, place in order, post the
/// amended metadata. Touches nothing when it returns `Err`.
pub fn place(
    qp: &mut QueuePair,
    mrs: &mut [MemoryRegion],
    pkt: &Packet<'_>,
    cq: &mut VecDeque<Completion>,
) -> Result<Placed, Slow> {
    use opcode::*;
    if !matches!(qp.state, QpState::Rtr | QpState::Rts) {
        return Err(Slow::State);
    }
    let op = pkt.bth.opcode;
    let is_send = matches!(
        op,
        SEND_FIRST | SEND_MIDDLE | SEND_LAST | SEND_LAST_IMM | SEND_ONLY | SEND_ONLY_IMM
    );
    let is_write = matches!(
        op,
        WRITE_FIRST | WRITE_MIDDLE | WRITE_LAST | WRITE_LAST_IMM | WRITE_ONLY | WRITE_ONLY_IMM
    );
    if !is_send && !is_write {
        return Err(Slow::NotPlaceable);
    }
    if pkt.bth.psn != qp.epsn {
        return Err(if wire::psn_before(pkt.bth.psn, qp.epsn) {
            Slow::Duplicate
        } else {
            Slow::OutOfSequence
        });
    }
    let first = matches!(
        op,
        SEND_FIRST | SEND_ONLY | SEND_ONLY_IMM | WRITE_FIRST | WRITE_ONLY | WRITE_ONLY_IMM
    );
    let last = matches!(
        op,
        SEND_LAST
            | SEND_LAST_IMM
            | SEND_ONLY
            | SEND_ONLY_IMM
            | WRITE_LAST
            | WRITE_LAST_IMM
            | WRITE_ONLY
            | WRITE_ONLY_IMM
    );
    let with_imm = matches!(
        op,
        SEND_LAST_IMM | SEND_ONLY_IMM | WRITE_LAST_IMM | WRITE_ONLY_IMM
    );
    let len = pkt.payload.len();
    // A message's middle packets carry exactly one MTU.
    if !last && len != qp.mtu {
        return Err(Slow::Access);
    }
    let mut completion = None;
    if is_send {
        let done = if first {
            if qp.recv_msg.is_some() {
                return Err(Slow::OutOfSequence);
            }
            let wr = qp.rq.front().ok_or(Slow::NoReceive)?;
            if len > wr.len {
                return Err(Slow::Access);
            }
            scatter(mrs, &wr.sges, 0, pkt.payload)?;
            let wr = qp.rq.pop_front().expect("checked above");
            qp.recv_msg = Some((wr, 0));
            0
        } else {
            let (wr, done) = qp.recv_msg.as_ref().ok_or(Slow::OutOfSequence)?;
            if done + len > wr.len {
                return Err(Slow::Access);
            }
            scatter(mrs, &wr.sges, *done, pkt.payload)?;
            *done
        };
        if last {
            let (wr, _) = qp.recv_msg.take().expect("set above");
            completion = Some(Completion {
                wr_id: wr.wr_id,
                opcode: WcOpcode::Recv,
                status: WcStatus::Success,
                byte_len: u32::try_from(done + len).map_err(|_| Slow::Access)?,
                imm: pkt.imm,
                qpn: qp.qpn,
                path: PathKind::Fast,
                src_qp: None,
            });
        } else if let Some((_, d)) = qp.recv_msg.as_mut() {
            *d = done + len;
        }
    } else {
        let (mri, off, left, total) = if first {
            if qp.write_msg.is_some() {
                return Err(Slow::OutOfSequence);
            }
            let reth = pkt.reth.ok_or(Slow::Access)?;
            let total = reth.dma_len as usize;
            if total == 0 {
                // A zero-length WRITE names no memory: its R_Key and VA are
                // not checked (IBTA C9-88).
                if !last || len != 0 {
                    return Err(Slow::Access);
                }
                (None, 0, 0, 0)
            } else {
                let mri = mrs
                    .iter()
                    .position(|m| m.rkey == reth.rkey && m.pd == qp.pd)
                    .ok_or(Slow::Access)?;
                let mr = &mrs[mri];
                if !mr.access.remote_write {
                    return Err(Slow::Access);
                }
                let off = usize::try_from(reth.va.checked_sub(mr.va).ok_or(Slow::Access)?)
                    .map_err(|_| Slow::Access)?;
                if off.checked_add(total).is_none_or(|e| e > mr.buf.len()) {
                    return Err(Slow::Access);
                }
                (Some(mri), off, total, total)
            }
        } else {
            let (mri, off, left, total) = qp.write_msg.ok_or(Slow::OutOfSequence)?;
            (Some(mri), off, left, total)
        };
        if len > left || (last && len != left) {
            return Err(Slow::Access);
        }
        if with_imm && qp.rq.is_empty() {
            return Err(Slow::NoReceive);
        }
        if let Some(mri) = mri {
            mrs[mri].buf[off..off + len].copy_from_slice(pkt.payload);
        }
        if last {
            qp.write_msg = None;
            if with_imm {
                let wr = qp.rq.pop_front().expect("checked above");
                completion = Some(Completion {
                    wr_id: wr.wr_id,
                    opcode: WcOpcode::RecvRdmaWithImm,
                    status: WcStatus::Success,
                    byte_len: u32::try_from(total).map_err(|_| Slow::Access)?,
                    imm: pkt.imm,
                    qpn: qp.qpn,
                    path: PathKind::Fast,
                    src_qp: None,
                });
            }
        } else if let Some(mri) = mri {
            qp.write_msg = Some((mri, off + len, left - len, total));
        }
    }
    if let Some(c) = completion {
        cq.push_back(c);
    }
    qp.epsn = psn_add(qp.epsn, 1);
    qp.nak_sent = false;
    if last {
        qp.msn = psn_add(qp.msn, 1);
    }
    Ok(Placed::Done {
        psn: pkt.bth.psn,
        ack_req: pkt.bth.ack_req,
    })
}

/// The fast path for RDMA READ responses at the requester: the response's
/// PSN selects the pending read and the place in it; data goes straight
/// into the local region. Returns the PSN of the last response when the
/// read is complete.
pub(super) fn place_read_response(
    qp: &mut QueuePair,
    mrs: &mut [MemoryRegion],
    pkt: &Packet<'_>,
    cq: &mut VecDeque<Completion>,
) -> Result<Option<u32>, Slow> {
    use opcode::*;
    let r = qp.reads.front().ok_or(Slow::NotPlaceable)?;
    if r.kind != WcOpcode::RdmaRead {
        return Err(Slow::OutOfSequence);
    }
    let expect = psn_add(r.first_psn, r.received);
    if pkt.bth.psn != expect {
        return Err(if wire::psn_before(pkt.bth.psn, expect) {
            Slow::Duplicate
        } else {
            Slow::OutOfSequence
        });
    }
    let op = pkt.bth.opcode;
    // A READ asked for again from where its data stopped starts a new run
    // of responses there. A responder that takes the request as a new one
    // (ours) begins it with FIRST or ONLY; Linux's rdma_rxe replays the
    // old message from that PSN on, MIDDLE or LAST: both are the data
    // asked for, at the offset its PSN says.
    let first = r.received == r.resume_at;
    let resumed = first && r.resume_at > 0;
    let last = r.received + 1 == r.packets;
    let ok_op = match (first, last) {
        (true, true) => op == READ_RESPONSE_ONLY || (resumed && op == READ_RESPONSE_LAST),
        (true, false) => op == READ_RESPONSE_FIRST || (resumed && op == READ_RESPONSE_MIDDLE),
        (false, true) => op == READ_RESPONSE_LAST,
        (false, false) => op == READ_RESPONSE_MIDDLE,
    };
    if !ok_op {
        return Err(Slow::OutOfSequence);
    }
    let at = r.received as usize * qp.mtu;
    let len = pkt.payload.len();
    if at.checked_add(len).is_none_or(|e| e > r.len) || (!last && len != qp.mtu) {
        return Err(Slow::Access);
    }
    scatter(mrs, &r.sges, at, pkt.payload)?;
    let front = qp.reads.front_mut().expect("checked above");
    front.received += 1;
    if !last {
        return Ok(None);
    }
    let r = qp.reads.pop_front().expect("checked above");
    if r.quiet {
        return Ok(Some(pkt.bth.psn));
    }
    cq.push_back(Completion {
        wr_id: r.wr_id,
        opcode: WcOpcode::RdmaRead,
        status: WcStatus::Success,
        byte_len: u32::try_from(r.len).map_err(|_| Slow::Access)?,
        imm: None,
        qpn: qp.qpn,
        path: PathKind::Fast,
        src_qp: None,
    });
    Ok(Some(pkt.bth.psn))
}

/// Places an ATOMIC ACKNOWLEDGE: the original value of the atomic at the
/// front of the QP's outstanding READs and atomics (same PSN) goes to its
/// scatter entry, in host byte order. Returns the PSN it acknowledges.
pub(super) fn place_atomic_ack(
    qp: &mut QueuePair,
    mrs: &mut [MemoryRegion],
    pkt: &Packet<'_>,
    cq: &mut VecDeque<Completion>,
) -> Result<u32, Slow> {
    let r = qp.reads.front().ok_or(Slow::NotPlaceable)?;
    if pkt.bth.psn != r.first_psn {
        return Err(if wire::psn_before(pkt.bth.psn, r.first_psn) {
            Slow::Duplicate
        } else {
            Slow::OutOfSequence
        });
    }
    if !matches!(r.kind, WcOpcode::CompSwap | WcOpcode::FetchAdd) {
        return Err(Slow::OutOfSequence);
    }
    let orig = pkt.atomic_ack.ok_or(Slow::NotPlaceable)?;
    let sges = r.sges.clone();
    scatter(mrs, &sges, 0, &orig.to_ne_bytes())?;
    let r = qp.reads.pop_front().expect("checked above");
    if !r.quiet {
        cq.push_back(Completion {
            wr_id: r.wr_id,
            opcode: r.kind,
            status: WcStatus::Success,
            byte_len: 8,
            imm: None,
            qpn: qp.qpn,
            path: PathKind::Fast,
            src_qp: None,
        });
    }
    Ok(pkt.bth.psn)
}

/// Fuzzing entry: feeds arbitrary bytes to the parser and, when they
/// parse, to the fast path of a connected QP with posted receives and a
/// writable region, and checks that nothing lands outside the region or
/// the receive buffers.
#[doc(hidden)]
pub fn fuzz_receive(data: &[u8]) {
    let Ok(pkt) = Packet::parse(data) else {
        return;
    };
    let mut qp = QueuePair::new(pkt.bth.dest_qp, 256);
    qp.state = QpState::Rts;
    qp.remote_qpn = 1;
    qp.epsn = pkt.bth.psn;
    qp.rq.push_back(
        RecvWr {
            wr_id: 1,
            mr: 0,
            offset: 16,
            len: 64,
        }
        .into(),
    );
    let mut mrs = vec![MemoryRegion {
        buf: Memory::Owned(vec![0; 4096]),
        lkey: 7,
        rkey: 7,
        access: Access {
            remote_write: true,
            remote_read: true,
            local_write: true,
            remote_atomic: false,
        },
        va: 0x10000,
        pd: Pd::DEFAULT,
    }];
    let mut cq = VecDeque::new();
    let before = mrs[0].buf.to_vec();
    match place(&mut qp, &mut mrs, &pkt, &mut cq) {
        Ok(_) => {
            let changed: Vec<usize> = (0..4096).filter(|&i| mrs[0].buf[i] != before[i]).collect();
            if let (Some(&lo), Some(&hi)) = (changed.first(), changed.last()) {
                let send = pkt.reth.is_none();
                if send {
                    assert!(
                        lo >= 16 && hi < 16 + 64,
                        "SEND placed outside its receive buffer"
                    );
                } else {
                    let r = pkt.reth.expect("write has RETH");
                    let off = usize::try_from(r.va - 0x10000).expect("in range");
                    assert!(
                        lo >= off && hi < off + r.dma_len as usize,
                        "WRITE placed outside its range"
                    );
                }
            }
        }
        Err(_) => assert_eq!(
            mrs[0].buf.to_vec(),
            before,
            "a refused packet changed memory"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qp() -> QueuePair {
        let mut q = QueuePair::new(7, 256);
        q.state = QpState::Rts;
        q.remote_qpn = 9;
        q.remote_ip = Ipv4Addr::LOCALHOST;
        q.epsn = 100;
        q
    }

    fn mr(rkey: u32, len: usize, write: bool) -> MemoryRegion {
        MemoryRegion {
            buf: Memory::Owned(vec![0; len]),
            lkey: rkey,
            rkey,
            access: Access {
                local_write: true,
                remote_write: write,
                remote_read: false,
                remote_atomic: false,
            },
            va: 0x1000,
            pd: Pd::DEFAULT,
        }
    }

    fn pkt<'a>(op: u8, psn: u32, payload: &'a [u8], reth: Option<Reth>) -> Packet<'a> {
        Packet {
            bth: Bth {
                opcode: op,
                solicited: false,
                mig_req: false,
                pad: 0,
                tver: 0,
                pkey: DEFAULT_PKEY,
                fecn: false,
                becn: false,
                dest_qp: 7,
                ack_req: true,
                psn,
            },
            reth,
            aeth: None,
            imm: (op == opcode::WRITE_ONLY_IMM || op == opcode::SEND_ONLY_IMM).then_some(0xabcd),
            atomic: None,
            atomic_ack: None,
            deth: None,
            payload,
            icrc: 0,
        }
    }

    /// A READ of 4 path-MTU packets at PSN 500 into region 0, of which
    /// `received` have come; asked again from there when `resumed`.
    fn read_of_four(received: u32, resumed: bool) -> PendingRead {
        PendingRead {
            wr_id: 5,
            kind: WcOpcode::RdmaRead,
            first_psn: 500,
            packets: 4,
            received,
            resume_at: if resumed { received } else { 0 },
            remote_va: 0x9000,
            rkey: 3,
            sges: vec![Sge {
                mr: 0,
                offset: 0,
                len: 4 * 256,
            }],
            len: 4 * 256,
            quiet: false,
        }
    }

    #[test]
    fn a_resumed_read_takes_the_rest_as_a_new_run_or_as_rdma_rxe_replays_it() {
        let data = [7u8; 256];
        // Ours: the rest of the message as a new one (FIRST ... LAST).
        // rdma_rxe's: the old message replayed from the PSN asked for
        // (MIDDLE ... LAST).
        for op in [opcode::READ_RESPONSE_FIRST, opcode::READ_RESPONSE_MIDDLE] {
            let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 1024, false)], VecDeque::new());
            q.reads.push_back(read_of_four(2, true));
            let r = place_read_response(&mut q, &mut mrs, &pkt(op, 502, &data, None), &mut cq);
            assert_eq!(r, Ok(None), "opcode {op:#x}");
            assert_eq!(&mrs[0].buf[512..768], &data[..]);
            let r = place_read_response(
                &mut q,
                &mut mrs,
                &pkt(opcode::READ_RESPONSE_LAST, 503, &data, None),
                &mut cq,
            );
            assert_eq!(r, Ok(Some(503)));
            assert_eq!(cq.pop_front().map(|c| c.status), Some(WcStatus::Success));
        }
        // The last packet alone, asked for again: ONLY or LAST.
        for op in [opcode::READ_RESPONSE_ONLY, opcode::READ_RESPONSE_LAST] {
            let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 1024, false)], VecDeque::new());
            q.reads.push_back(read_of_four(3, true));
            let r = place_read_response(&mut q, &mut mrs, &pkt(op, 503, &data, None), &mut cq);
            assert_eq!(r, Ok(Some(503)), "opcode {op:#x}");
        }
    }

    #[test]
    fn a_read_not_asked_again_wants_its_opcodes_in_order() {
        let data = [7u8; 256];
        let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 1024, false)], VecDeque::new());
        q.reads.push_back(read_of_four(0, false));
        // Its first response must say FIRST.
        let r = place_read_response(
            &mut q,
            &mut mrs,
            &pkt(opcode::READ_RESPONSE_MIDDLE, 500, &data, None),
            &mut cq,
        );
        assert_eq!(r, Err(Slow::OutOfSequence));
        // A run that is under way takes no new FIRST in its middle.
        q.reads[0] = read_of_four(2, false);
        let r = place_read_response(
            &mut q,
            &mut mrs,
            &pkt(opcode::READ_RESPONSE_FIRST, 502, &data, None),
            &mut cq,
        );
        assert_eq!(r, Err(Slow::OutOfSequence));
        assert_eq!(mrs[0].buf[512], 0, "nothing placed");
    }

    #[test]
    fn send_lands_in_the_posted_buffer_and_posts_amended_metadata() {
        let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 64, false)], VecDeque::new());
        q.rq.push_back(
            RecvWr {
                wr_id: 42,
                mr: 0,
                offset: 8,
                len: 32,
            }
            .into(),
        );
        let r = place(
            &mut q,
            &mut mrs,
            &pkt(opcode::SEND_ONLY_IMM, 100, b"hello", None),
            &mut cq,
        );
        assert_eq!(
            r,
            Ok(Placed::Done {
                psn: 100,
                ack_req: true
            })
        );
        assert_eq!(&mrs[0].buf[8..13], b"hello");
        let c = cq.pop_front().unwrap();
        assert_eq!(
            (c.wr_id, c.byte_len, c.imm, c.path),
            (42, 5, Some(0xabcd), PathKind::Fast)
        );
        assert_eq!(q.epsn, 101);
    }

    #[test]
    fn a_zero_length_write_names_no_memory() {
        let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 64, true)], VecDeque::new());
        // UCX ends bursts with these: no region has this R_Key or VA.
        let nothing = Some(Reth {
            va: 0,
            rkey: 0xdead,
            dma_len: 0,
        });
        let r = place(
            &mut q,
            &mut mrs,
            &pkt(opcode::WRITE_ONLY, 100, b"", nothing),
            &mut cq,
        );
        assert_eq!(
            r,
            Ok(Placed::Done {
                psn: 100,
                ack_req: true
            })
        );
        assert_eq!((q.epsn, cq.len()), (101, 0));
        assert!(mrs[0].buf.iter().all(|b| *b == 0));
        // A zero DMA length with data, or on a first packet, is refused.
        for (op, data) in [
            (opcode::WRITE_ONLY, &b"x"[..]),
            (opcode::WRITE_FIRST, &[0; 256][..]),
        ] {
            assert_eq!(
                place(&mut q, &mut mrs, &pkt(op, 101, data, nothing), &mut cq),
                Err(Slow::Access)
            );
        }
        assert!(mrs[0].buf.iter().all(|b| *b == 0));
    }

    #[test]
    fn write_is_placed_by_rkey_and_checked() {
        let (mut q, mut mrs, mut cq) = (
            qp(),
            vec![mr(5, 64, true), mr(6, 64, false)],
            VecDeque::new(),
        );
        let ok = Reth {
            va: 0x1000 + 60,
            rkey: 5,
            dma_len: 4,
        };
        assert!(place(
            &mut q,
            &mut mrs,
            &pkt(opcode::WRITE_ONLY, 100, b"abcd", Some(ok)),
            &mut cq
        )
        .is_ok());
        assert_eq!(&mrs[0].buf[60..], b"abcd");
        assert!(
            cq.is_empty(),
            "a plain WRITE completes nothing at the responder"
        );
        // Out of bounds, wrong key, no right: refused, nothing written.
        let before: Vec<Vec<u8>> = mrs.iter().map(|m| m.buf.to_vec()).collect();
        for reth in [
            Reth {
                va: 0x1000 + 61,
                rkey: 5,
                dma_len: 4,
            },
            Reth {
                va: 0x1000,
                rkey: 99,
                dma_len: 4,
            },
            Reth {
                va: 0x1000,
                rkey: 6,
                dma_len: 4,
            },
            Reth {
                va: 0x0fff,
                rkey: 5,
                dma_len: 4,
            },
        ] {
            assert_eq!(
                place(
                    &mut q,
                    &mut mrs,
                    &pkt(opcode::WRITE_ONLY, 101, b"zzzz", Some(reth)),
                    &mut cq
                ),
                Err(Slow::Access)
            );
        }
        assert_eq!(
            before,
            mrs.iter().map(|m| m.buf.to_vec()).collect::<Vec<_>>()
        );
        assert_eq!(q.epsn, 101);
    }

    #[test]
    fn a_send_scatters_over_a_receive_list_across_regions() {
        let (mut q, mut mrs, mut cq) = (
            qp(),
            vec![mr(1, 1024, false), mr(2, 1024, false)],
            VecDeque::new(),
        );
        // 100 + 300 + 200 bytes: the packet boundaries (256) fall inside
        // entries, and the message (520) ends inside the last one.
        q.rq.push_back(PostedRecv {
            wr_id: 8,
            sges: vec![
                Sge {
                    mr: 1,
                    offset: 10,
                    len: 100,
                },
                Sge {
                    mr: 0,
                    offset: 500,
                    len: 300,
                },
                Sge {
                    mr: 1,
                    offset: 600,
                    len: 200,
                },
            ],
            len: 600,
        });
        let msg: Vec<u8> = (0..520u32).map(|i| (i % 251) as u8 + 1).collect();
        for (i, (op, part)) in [
            (opcode::SEND_FIRST, &msg[..256]),
            (opcode::SEND_MIDDLE, &msg[256..512]),
            (opcode::SEND_LAST, &msg[512..]),
        ]
        .into_iter()
        .enumerate()
        {
            place(
                &mut q,
                &mut mrs,
                &pkt(op, 100 + i as u32, part, None),
                &mut cq,
            )
            .unwrap();
        }
        let c = cq.pop_front().expect("completed on the last packet");
        assert_eq!((c.wr_id, c.byte_len, c.path), (8, 520, PathKind::Fast));
        assert_eq!(&mrs[1].buf[10..110], &msg[..100]);
        assert_eq!(&mrs[0].buf[500..800], &msg[100..400]);
        assert_eq!(&mrs[1].buf[600..720], &msg[400..]);
        // Nothing outside the entries moved.
        let written = 100 + 300 + 120;
        let nonzero = mrs
            .iter()
            .flat_map(|m| m.buf.iter())
            .filter(|b| **b != 0)
            .count();
        assert_eq!(nonzero, written);
    }

    #[test]
    fn a_receive_a_message_is_arriving_into_is_flushed_first() {
        let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 1024, false)], VecDeque::new());
        for id in [1, 2] {
            q.rq.push_back(
                RecvWr {
                    wr_id: id,
                    mr: 0,
                    offset: 0,
                    len: 512,
                }
                .into(),
            );
        }
        place(
            &mut q,
            &mut mrs,
            &pkt(opcode::SEND_FIRST, 100, &[1; 256], None),
            &mut cq,
        )
        .unwrap();
        assert_eq!(
            q.take_unfinished(),
            vec![(1, WcOpcode::Recv), (2, WcOpcode::Recv)]
        );
        assert!(q.recv_msg.is_none() && q.rq.is_empty());
    }

    #[test]
    fn a_receive_too_small_for_the_message_takes_nothing_of_it() {
        let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 1024, false)], VecDeque::new());
        q.rq.push_back(PostedRecv {
            wr_id: 3,
            sges: vec![
                Sge {
                    mr: 0,
                    offset: 0,
                    len: 100,
                },
                Sge {
                    mr: 0,
                    offset: 200,
                    len: 100,
                },
            ],
            len: 200,
        });
        let big = [7u8; 256];
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::SEND_ONLY, 100, &big, None),
                &mut cq
            ),
            Err(Slow::Access)
        );
        assert!(mrs[0].buf.iter().all(|b| *b == 0));
        assert_eq!(q.rq.len(), 1, "the receive stays posted");
    }

    #[test]
    fn multi_packet_send_fills_one_receive_and_completes_on_last() {
        let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 1024, false)], VecDeque::new());
        q.rq.push_back(
            RecvWr {
                wr_id: 5,
                mr: 0,
                offset: 0,
                len: 1024,
            }
            .into(),
        );
        let a = vec![1u8; 256];
        let b = vec![2u8; 256];
        assert!(place(
            &mut q,
            &mut mrs,
            &pkt(opcode::SEND_FIRST, 100, &a, None),
            &mut cq
        )
        .is_ok());
        assert!(place(
            &mut q,
            &mut mrs,
            &pkt(opcode::SEND_MIDDLE, 101, &b, None),
            &mut cq
        )
        .is_ok());
        assert!(cq.is_empty());
        // A short middle packet is a protocol violation.
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::SEND_MIDDLE, 102, b"xy", None),
                &mut cq
            ),
            Err(Slow::Access)
        );
        assert!(place(
            &mut q,
            &mut mrs,
            &pkt(opcode::SEND_LAST, 102, b"end", None),
            &mut cq
        )
        .is_ok());
        let c = cq.pop_front().unwrap();
        assert_eq!((c.wr_id, c.byte_len), (5, 515));
        assert_eq!(&mrs[0].buf[..256], &a[..]);
        assert_eq!(&mrs[0].buf[256..512], &b[..]);
        assert_eq!(&mrs[0].buf[512..515], b"end");
        assert_eq!(q.msn, 1, "one message, three packets");
        // A MIDDLE with no FIRST is out of sequence.
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::SEND_MIDDLE, 103, &a, None),
                &mut cq
            ),
            Err(Slow::OutOfSequence)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_packets_never_write_out_of_bounds(d in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            fuzz_receive(&d);
        }
    }

    #[test]
    fn sequence_problems_go_to_software() {
        let (mut q, mut mrs, mut cq) = (qp(), vec![mr(1, 64, false)], VecDeque::new());
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::SEND_ONLY, 100, b"x", None),
                &mut cq
            ),
            Err(Slow::NoReceive)
        );
        q.rq.push_back(
            RecvWr {
                wr_id: 1,
                mr: 0,
                offset: 0,
                len: 64,
            }
            .into(),
        );
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::SEND_ONLY, 99, b"x", None),
                &mut cq
            ),
            Err(Slow::Duplicate)
        );
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::SEND_ONLY, 105, b"x", None),
                &mut cq
            ),
            Err(Slow::OutOfSequence)
        );
        assert_eq!(
            place(
                &mut q,
                &mut mrs,
                &pkt(opcode::ACKNOWLEDGE, 100, b"", None),
                &mut cq
            ),
            Err(Slow::NotPlaceable)
        );
        assert!(cq.is_empty());
        assert_eq!(q.rq.len(), 1);
    }
}
