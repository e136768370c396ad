//! Shared receive queues: receives posted once for many RC queue pairs.
//! A queue pair attached to one takes a receive from it when a message
//! that consumes one (SEND, WRITE with immediate) begins at the PSN it
//! expects and it holds none of its own; from there the placement fast
//! path fills it as any other. An empty shared queue is the same as an
//! empty receive queue: the sender is told "receiver not ready" (RNR).

use super::*;

/// A shared receive queue of an [`Engine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SrqId(u32);

/// One shared receive queue.
#[derive(Debug)]
pub(super) struct Srq {
    pd: Pd,
    rq: VecDeque<PostedRecv>,
}

impl Engine {
    /// A new, empty shared receive queue in protection domain `pd`.
    pub fn create_srq(&mut self, pd: Pd) -> SrqId {
        let s = Srq {
            pd,
            rq: VecDeque::new(),
        };
        match self.srqs.iter().position(Option::is_none) {
            Some(i) => {
                self.srqs[i] = Some(s);
                SrqId(u32::try_from(i).expect("fewer than 2^32 queues"))
            }
            None => {
                self.srqs.push(Some(s));
                SrqId(u32::try_from(self.srqs.len() - 1).expect("fewer than 2^32 queues"))
            }
        }
    }

    /// Destroys a shared receive queue: `Busy` while queue pairs use it.
    pub fn destroy_srq(&mut self, srq: SrqId) -> io::Result<()> {
        if self.srqs.get(srq.0 as usize).is_none_or(Option::is_none) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no such shared receive queue",
            ));
        }
        if self.qps.iter().any(|q| q.srq == Some(srq)) {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "queue pairs use it",
            ));
        }
        self.srqs[srq.0 as usize] = None;
        Ok(())
    }

    /// Attaches RC queue pair `qp` (in RESET, with no receives) to `srq`
    /// of its own protection domain.
    pub fn attach_srq(&mut self, qp: usize, srq: SrqId) -> io::Result<()> {
        let pd = self
            .srqs
            .get(srq.0 as usize)
            .and_then(Option::as_ref)
            .map(|s| s.pd);
        let q = &mut self.qps[qp];
        if pd != Some(q.pd) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no such shared receive queue in the domain",
            ));
        }
        q.srq = Some(srq);
        Ok(())
    }

    /// Posts a receive to a shared receive queue. An entry the queue's
    /// domain may not use is kept as one that names no region, as a NIC
    /// finds out only when a message arrives: nothing is written through
    /// it, and the message fails as one over a bad receive does.
    pub fn srq_post_recv(&mut self, srq: SrqId, wr_id: u64, sges: Vec<Sge>) -> io::Result<()> {
        let Some(s) = self.srqs.get(srq.0 as usize).and_then(Option::as_ref) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no such shared receive queue",
            ));
        };
        let sges: Vec<Sge> = sges
            .into_iter()
            .map(|e| {
                let ok = self.mrs.get(e.mr).is_some_and(|m| {
                    m.pd == s.pd
                        && m.access.local_write
                        && e.offset
                            .checked_add(e.len)
                            .is_some_and(|end| end <= m.buf.len())
                });
                if ok {
                    e
                } else {
                    Sge {
                        mr: usize::MAX,
                        ..e
                    }
                }
            })
            .collect();
        let len = sges.iter().map(|e| e.len).sum();
        if let Some(s) = self.srqs[srq.0 as usize].as_mut() {
            s.rq.push_back(PostedRecv { wr_id, sges, len });
        }
        Ok(())
    }

    /// Before placing `pkt` on queue pair `qi`: a message that needs a
    /// receive, on a queue pair fed by a shared queue and holding none,
    /// takes the shared queue's oldest.
    pub(super) fn feed_from_srq(&mut self, qi: usize, pkt: &Packet<'_>) {
        use opcode::*;
        let q = &self.qps[qi];
        let Some(srq) = q.srq else { return };
        let starts = matches!(
            pkt.bth.opcode,
            SEND_FIRST | SEND_ONLY | SEND_ONLY_IMM | WRITE_ONLY_IMM | WRITE_LAST_IMM
        );
        if !starts || !q.rq.is_empty() || q.recv_msg.is_some() || pkt.bth.psn != q.epsn {
            return;
        }
        if let Some(r) = self
            .srqs
            .get_mut(srq.0 as usize)
            .and_then(Option::as_mut)
            .and_then(|s| s.rq.pop_front())
        {
            self.qps[qi].rq.push_back(r);
        }
    }

    /// Whether a receive waiting in a shared queue uses region `mr`.
    pub(super) fn srq_uses_mr(&self, mr: usize) -> bool {
        self.srqs
            .iter()
            .flatten()
            .any(|s| s.rq.iter().any(|r| r.sges.iter().any(|e| e.mr == mr)))
    }
}
