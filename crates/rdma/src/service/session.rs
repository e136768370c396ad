//! One application's objects on a device (an open `ibv_context`): its
//! protection domains, memory regions over its own memory, completion
//! queues and channels, queue pairs and their rings; and the control
//! requests that make and destroy them. Handles are per session, so an
//! application can name only its own objects; when its connection ends
//! (it exited or died) everything it had is destroyed, queue pairs first.

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};

use crate::rc::{Access, CqId, Engine, Memory, Pd, QpState, SrqId};
use crate::ring::{self, QpRings, Ring};
use crate::shm::{self, Mapping};

use super::segment::{self, Peer};

/// A control request's failure: the errno the library returns, and why.
#[derive(Debug)]
pub struct Refusal(pub i32, pub String);

impl Refusal {
    fn inval(why: impl Into<String>) -> Self {
        Refusal(libc::EINVAL, why.into())
    }
}

impl From<io::Error> for Refusal {
    fn from(e: io::Error) -> Self {
        let errno = match e.kind() {
            io::ErrorKind::ResourceBusy => libc::EBUSY,
            io::ErrorKind::NotFound => libc::ENOENT,
            io::ErrorKind::InvalidInput => libc::EINVAL,
            io::ErrorKind::OutOfMemory => libc::ENOMEM,
            _ => e.raw_os_error().unwrap_or(libc::EIO),
        };
        Refusal(errno, e.to_string())
    }
}

type Answer = Result<(String, Vec<OwnedFd>), Refusal>;

/// A memory region of the session.
#[derive(Debug)]
pub(super) struct Mr {
    pub index: usize,
    pub pd: u32,
}

/// A completion queue: the engine's queue and the ring it is copied to.
#[derive(Debug)]
pub(super) struct Cq {
    pub cq: CqId,
    pub map: Mapping,
    pub ring: Ring,
    /// The channel its events go to, and the library's cookie for it.
    pub channel: Option<u32>,
    pub cookie: u64,
    /// Completions published (the daemon's own count; the ring's copy is
    /// for the application).
    pub prod: u32,
}

/// A queue pair: its number and its rings.
#[derive(Debug)]
pub(super) struct Qp {
    pub qpn: u32,
    pub pd: u32,
    pub map: Mapping,
    pub rings: QpRings,
    pub send_cq: u32,
    pub recv_cq: u32,
    pub sig_all: bool,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline: u32,
    /// An unreliable datagram queue pair (else reliable connection).
    pub ud: bool,
    /// A UD queue pair's `ibv_qp_state`, as last set.
    pub ud_state: u32,
    /// Work requests taken from each queue (the daemon's own counts).
    pub sq_cons: u32,
    pub rq_cons: u32,
}

/// A shared receive queue: the engine's queue and the ring it is fed
/// from.
#[derive(Debug)]
pub(super) struct Srq {
    pub id: SrqId,
    pub pd: u32,
    pub map: Mapping,
    pub ring: Ring,
    pub max_sge: u32,
    /// Receives taken (the daemon's own count).
    pub cons: u32,
}

/// Everything one application has on a device.
#[derive(Debug, Default)]
pub(super) struct Session {
    pub next: u32,
    pub pds: HashMap<u32, Pd>,
    pub mrs: HashMap<u32, Mr>,
    /// lkey → region handle, for the data path.
    pub lkeys: HashMap<u32, u32>,
    pub cqs: HashMap<u32, Cq>,
    pub channels: HashMap<u32, OwnedFd>,
    pub qps: HashMap<u32, Qp>,
    pub srqs: HashMap<u32, Srq>,
    /// The application broke its rings; its queue pairs are in ERROR and
    /// it is disconnected.
    pub broken: Option<String>,
    /// Its control connection, shut down when it breaks its rings.
    pub conn: Option<OwnedFd>,
    /// The process that connected, for its System V segments.
    pub peer: Option<Peer>,
}

/// Most objects of each kind one application may hold.
const MAX_OBJECTS: usize = 4096;
/// Most entries of a queue pair's queue or a completion queue.
pub const MAX_QUEUE: u32 = 16384;
/// Most completion queue entries.
pub const MAX_CQE: u32 = 65536;

/// A number from a request word.
fn num<T: std::str::FromStr>(w: Option<&str>, what: &str) -> Result<T, Refusal> {
    w.and_then(|s| s.parse().ok())
        .ok_or_else(|| Refusal::inval(format!("bad or missing {what}")))
}

/// A hex number from a request word.
fn hex(w: Option<&str>, what: &str) -> Result<u64, Refusal> {
    w.and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or_else(|| Refusal::inval(format!("bad or missing {what}")))
}

impl Session {
    fn handle(&mut self) -> u32 {
        self.next = self.next.wrapping_add(1).max(1);
        self.next
    }

    fn pd(&self, h: u32) -> Result<Pd, Refusal> {
        self.pds
            .get(&h)
            .copied()
            .ok_or_else(|| Refusal::inval(format!("no protection domain {h}")))
    }

    /// Carries out one control request (after `OPEN`).
    pub fn request(&mut self, e: &mut Engine, line: &str, mut fds: Vec<OwnedFd>) -> Answer {
        let mut w = line.split_ascii_whitespace();
        let verb = w.next().unwrap_or("");
        let full = |n: usize| {
            if n >= MAX_OBJECTS {
                Err(Refusal(
                    libc::ENOMEM,
                    format!("more than {MAX_OBJECTS} objects"),
                ))
            } else {
                Ok(())
            }
        };
        if verb != "MR" && verb != "CHANNEL" && !fds.is_empty() {
            return Err(Refusal::inval("descriptors with a request that takes none"));
        }
        match verb {
            "PD" => {
                full(self.pds.len())?;
                let h = self.handle();
                self.pds.insert(h, e.alloc_pd());
                Ok((format!("OK {h}"), vec![]))
            }
            "FREEPD" => {
                let h = num(w.next(), "handle")?;
                self.pd(h)?;
                if self.mrs.values().any(|m| m.pd == h)
                    || self.qps.values().any(|q| q.pd == h)
                    || self.srqs.values().any(|s| s.pd == h)
                {
                    return Err(Refusal(libc::EBUSY, "regions or queue pairs use it".into()));
                }
                self.pds.remove(&h);
                Ok(("OK".into(), vec![]))
            }
            "MR" => {
                full(self.mrs.len())?;
                let pd_h: u32 = num(w.next(), "pd")?;
                let pd = self.pd(pd_h)?;
                let va: u64 = hex(w.next(), "address")?;
                let len: usize = num(w.next(), "length")?;
                let access: u32 = num(w.next(), "access")?;
                let words: Vec<&str> = w.collect();
                if words.len() > MAX_PIECES {
                    return Err(Refusal::inval(format!("more than {MAX_PIECES} pieces")));
                }
                // `OFF:LEN` of the next descriptor's memfd, or `SSTART-END:OFF:LEN`
                // of the System V segment the application maps at START-END.
                let mut fds = fds.into_iter();
                let mut pieces = Vec::with_capacity(words.len());
                for p in words {
                    let (file, rest) = match p.strip_prefix('S') {
                        Some(seg) => {
                            let (range, rest) = seg
                                .split_once(':')
                                .ok_or_else(|| Refusal::inval("bad segment piece"))?;
                            let (a, b) = range
                                .split_once('-')
                                .ok_or_else(|| Refusal::inval("bad segment range"))?;
                            let peer = self.peer.as_ref().ok_or_else(|| {
                                Refusal(libc::EPERM, "the card could not tell who connected".into())
                            })?;
                            let fd = segment::open(
                                peer,
                                hex(Some(a), "segment start")?,
                                hex(Some(b), "segment end")?,
                            )?;
                            (Piece::Segment(fd), rest)
                        }
                        None => {
                            let fd = fds
                                .next()
                                .ok_or_else(|| Refusal::inval("one descriptor per memfd piece"))?;
                            (Piece::Memfd(fd), p)
                        }
                    };
                    let (o, l) = rest
                        .split_once(':')
                        .ok_or_else(|| Refusal::inval("bad piece"))?;
                    pieces.push((
                        file,
                        num(Some(o), "piece offset")?,
                        num(Some(l), "piece length")?,
                    ));
                }
                if fds.next().is_some() || pieces.is_empty() {
                    return Err(Refusal::inval("one descriptor per memfd piece"));
                }
                let memory = map_pieces(va, len, &pieces)?;
                let access = access_of(access)?;
                let (index, key) = e.reg_mr_memory(pd, memory, va, access);
                let h = self.handle();
                self.mrs.insert(h, Mr { index, pd: pd_h });
                self.lkeys.insert(key, h);
                Ok((format!("OK {h} {key}"), vec![]))
            }
            "FREEMR" => {
                let h = num(w.next(), "handle")?;
                let mr = self
                    .mrs
                    .get(&h)
                    .ok_or_else(|| Refusal::inval(format!("no region {h}")))?;
                let key = e.mr_key(mr.index).map(|k| k.0);
                e.dereg_mr(mr.index)?;
                self.mrs.remove(&h);
                if let Some(k) = key {
                    self.lkeys.remove(&k);
                }
                Ok(("OK".into(), vec![]))
            }
            "CHANNEL" => {
                full(self.channels.len())?;
                if fds.len() != 1 {
                    return Err(Refusal::inval("a channel is one socket"));
                }
                let fd = fds.pop().expect("one");
                let st = rustix::fs::fstat(&fd).map_err(io::Error::from)?;
                if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
                    return Err(Refusal::inval("a channel is a socket"));
                }
                rustix::fs::fcntl_setfl(&fd, rustix::fs::OFlags::NONBLOCK)
                    .map_err(io::Error::from)?;
                let h = self.handle();
                self.channels.insert(h, fd);
                Ok((format!("OK {h}"), vec![]))
            }
            "FREECHANNEL" => {
                let h = num(w.next(), "handle")?;
                if self.cqs.values().any(|c| c.channel == Some(h)) {
                    return Err(Refusal(libc::EBUSY, "completion queues use it".into()));
                }
                self.channels
                    .remove(&h)
                    .ok_or_else(|| Refusal::inval(format!("no channel {h}")))?;
                Ok(("OK".into(), vec![]))
            }
            "CQ" => {
                full(self.cqs.len())?;
                let want: u32 = num(w.next(), "entries")?;
                let channel: u32 = num(w.next(), "channel")?;
                let cookie = hex(w.next(), "cookie")?;
                let entries = ring::entries_for(want.saturating_add(1), MAX_CQE)
                    .ok_or_else(|| Refusal::inval(format!("more than {MAX_CQE} entries")))?;
                let channel = match channel {
                    0 => None,
                    c if self.channels.contains_key(&c) => Some(c),
                    c => return Err(Refusal::inval(format!("no channel {c}"))),
                };
                let (r, bytes) = ring::cq_ring(entries);
                let fd = shm::sealed_memfd("softcard-cq", bytes)?;
                let map = Mapping::map(fd.as_fd(), 0, bytes)?;
                let cq = e.create_cq();
                let h = self.handle();
                self.cqs.insert(
                    h,
                    Cq {
                        cq,
                        map,
                        ring: r,
                        channel,
                        cookie,
                        prod: 0,
                    },
                );
                Ok((format!("OK {h} {entries} {bytes}"), vec![fd]))
            }
            "FREECQ" => {
                let h = num(w.next(), "handle")?;
                let cq = self
                    .cqs
                    .get(&h)
                    .ok_or_else(|| Refusal::inval(format!("no completion queue {h}")))?;
                if self.qps.values().any(|q| q.send_cq == h || q.recv_cq == h) {
                    return Err(Refusal(libc::EBUSY, "queue pairs use it".into()));
                }
                e.destroy_cq(cq.cq)?;
                self.cqs.remove(&h);
                Ok(("OK".into(), vec![]))
            }
            "QP" => self.create_qp(e, &mut w),
            "SRQ" => {
                full(self.srqs.len())?;
                let pd_h: u32 = num(w.next(), "pd")?;
                let pd = self.pd(pd_h)?;
                let want: u32 = num(w.next(), "max_wr")?;
                let max_sge: u32 = num(w.next(), "max_sge")?;
                let entries = ring::entries_for(want, MAX_QUEUE)
                    .ok_or_else(|| Refusal::inval(format!("more than {MAX_QUEUE} receives")))?;
                if max_sge as usize > ring::MAX_RECV_SGE {
                    return Err(Refusal::inval("max_sge beyond what the device offers"));
                }
                let r = Ring::new(0, entries, size_of::<ring::RecvWqe>());
                let bytes = r.bytes().next_multiple_of(shm::page_size());
                let fd = shm::sealed_memfd("softcard-srq", bytes)?;
                let map = Mapping::map(fd.as_fd(), 0, bytes)?;
                let id = e.create_srq(pd);
                let h = self.handle();
                self.srqs.insert(
                    h,
                    Srq {
                        id,
                        pd: pd_h,
                        map,
                        ring: r,
                        max_sge: max_sge.max(1),
                        cons: 0,
                    },
                );
                Ok((format!("OK {h} {entries} {bytes}"), vec![fd]))
            }
            "FREESRQ" => {
                let h = num(w.next(), "handle")?;
                let s = self
                    .srqs
                    .get(&h)
                    .ok_or_else(|| Refusal::inval(format!("no shared receive queue {h}")))?;
                e.destroy_srq(s.id)?;
                self.srqs.remove(&h);
                Ok(("OK".into(), vec![]))
            }
            "MODIFY" => self.modify_qp(e, &mut w),
            "QUERYQP" => {
                let h = num(w.next(), "handle")?;
                let qp = self.qp(h)?;
                if qp.ud {
                    let state = qp.ud_state;
                    return Ok((format!("OK {state} 0 0.0.0.0 0 0 3"), vec![]));
                }
                let i = e
                    .qp_index(qp.qpn)
                    .ok_or_else(|| Refusal::inval("queue pair gone"))?;
                let (state, dqpn, ip, sq_psn, rq_psn, mtu) = e.qp_info(i);
                let state = match state {
                    QpState::Reset => 0,
                    QpState::Init => 1,
                    QpState::Rtr => 2,
                    QpState::Rts => 3,
                    QpState::Error => 6,
                };
                let mtu = mtu.trailing_zeros().saturating_sub(7);
                Ok((
                    format!("OK {state} {dqpn} {ip} {sq_psn} {rq_psn} {mtu}"),
                    vec![],
                ))
            }
            "FREEQP" => {
                let h = num(w.next(), "handle")?;
                let qp = self.qp(h)?;
                if qp.ud {
                    e.destroy_ud_qp(qp.qpn)?;
                } else {
                    e.destroy_qp(qp.qpn)?;
                }
                self.qps.remove(&h);
                Ok(("OK".into(), vec![]))
            }
            _ => {
                let shown: String = verb.chars().take(32).collect();
                Err(Refusal::inval(format!("unknown request {shown:?}")))
            }
        }
    }

    fn qp(&self, h: u32) -> Result<&Qp, Refusal> {
        self.qps
            .get(&h)
            .ok_or_else(|| Refusal::inval(format!("no queue pair {h}")))
    }

    /// `QP pd send_cq recv_cq send_wr recv_wr send_sge recv_sge inline
    /// sig_all type`: an RC (type 2) or UD (type 4) queue pair in RESET and
    /// its rings.
    fn create_qp<'a>(&mut self, e: &mut Engine, w: &mut impl Iterator<Item = &'a str>) -> Answer {
        if self.qps.len() >= MAX_OBJECTS {
            return Err(Refusal(libc::ENOMEM, "too many queue pairs".into()));
        }
        let pd_h: u32 = num(w.next(), "pd")?;
        let pd = self.pd(pd_h)?;
        let scq: u32 = num(w.next(), "send cq")?;
        let rcq: u32 = num(w.next(), "recv cq")?;
        let (Some(s), Some(r)) = (self.cqs.get(&scq), self.cqs.get(&rcq)) else {
            return Err(Refusal::inval("no such completion queue"));
        };
        let (send_cq, recv_cq) = (s.cq, r.cq);
        let swr: u32 = num(w.next(), "send_wr")?;
        let rwr: u32 = num(w.next(), "recv_wr")?;
        let ssge: u32 = num(w.next(), "send_sge")?;
        let rsge: u32 = num(w.next(), "recv_sge")?;
        let inline: u32 = num(w.next(), "inline")?;
        let sig_all: u32 = num(w.next(), "sig_all")?;
        let ud = match num::<u32>(w.next(), "type")? {
            2 => false,
            4 => true,
            t => return Err(Refusal(libc::EOPNOTSUPP, format!("queue pair type {t}"))),
        };
        let srq = match w.next().map(str::parse::<u32>) {
            None | Some(Ok(0)) => None,
            Some(Ok(h)) if !ud => Some(
                self.srqs
                    .get(&h)
                    .filter(|s| s.pd == pd_h)
                    .ok_or_else(|| {
                        Refusal::inval(format!("no shared receive queue {h} in the domain"))
                    })?
                    .id,
            ),
            _ => return Err(Refusal::inval("bad shared receive queue")),
        };
        let too = |what: &str| Refusal::inval(format!("{what} beyond what the device offers"));
        let sq = ring::entries_for(swr, MAX_QUEUE).ok_or_else(|| too("max_send_wr"))?;
        let rq = ring::entries_for(rwr, MAX_QUEUE).ok_or_else(|| too("max_recv_wr"))?;
        if ssge as usize > ring::MAX_SEND_SGE {
            return Err(too("max_send_sge"));
        }
        if rsge as usize > ring::MAX_RECV_SGE {
            return Err(too("max_recv_sge"));
        }
        if inline as usize > ring::MAX_INLINE {
            return Err(too("max_inline_data"));
        }
        let rings = QpRings::new(sq, rq);
        let fd = shm::sealed_memfd("softcard-qp", rings.bytes)?;
        let map = Mapping::map(fd.as_fd(), 0, rings.bytes)?;
        // Numbers go round the whole space before one comes back, so that
        // a late packet for a destroyed queue pair finds no new one.
        static LAST: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0x110);
        let qpn = e
            .free_qpn(LAST.load(std::sync::atomic::Ordering::Relaxed))
            .ok_or_else(|| Refusal(libc::ENOMEM, "no queue pair numbers left".into()))?;
        LAST.store(qpn, std::sync::atomic::Ordering::Relaxed);
        if ud {
            e.create_ud_qp(pd, qpn, send_cq, recv_cq)?;
        } else {
            let i = e.create_qp_with(pd, qpn, send_cq, recv_cq)?;
            if let Some(s) = srq {
                e.attach_srq(i, s)?;
            }
        }
        let h = self.handle();
        let (ssge, rsge, inline) = (ssge.max(1), rsge.max(1), inline);
        self.qps.insert(
            h,
            Qp {
                qpn,
                pd: pd_h,
                map,
                rings,
                send_cq: scq,
                recv_cq: rcq,
                sig_all: sig_all != 0,
                max_send_sge: ssge,
                max_recv_sge: rsge,
                max_inline: inline,
                ud,
                ud_state: 0,
                sq_cons: 0,
                rq_cons: 0,
            },
        );
        Ok((
            format!("OK {h} {qpn} {sq} {rq} {} {}", rings.bytes, ring::VERSION),
            vec![fd],
        ))
    }

    /// `MODIFY qp state mtu dest_qpn rq_psn sq_psn dgid [qkey
    /// [min_rnr_timer [timeout retry_cnt rnr_retry [max_rd_atomic]]]]`: the
    /// state transitions of a queue pair (the library sends what the
    /// attribute mask named, zero elsewhere; a UD queue pair takes its
    /// Q_Key going to INIT).
    fn modify_qp<'a>(&mut self, e: &mut Engine, w: &mut impl Iterator<Item = &'a str>) -> Answer {
        let h: u32 = num(w.next(), "handle")?;
        let state: u32 = num(w.next(), "state")?;
        let mtu: u32 = num(w.next(), "mtu")?;
        let dqpn: u32 = num(w.next(), "dest_qp_num")?;
        let rq_psn: u32 = num(w.next(), "rq_psn")?;
        let sq_psn: u32 = num(w.next(), "sq_psn")?;
        let dgid_word = w.next();
        let qkey: Option<u32> = w.next().and_then(|k| k.parse().ok());
        let min_rnr: Option<u8> = w.next().and_then(|k| k.parse().ok()).filter(|t| *t <= 31);
        // `-` (or nothing): the application left it alone.
        let mut setting = || -> Option<u8> { w.next().and_then(|k| k.parse().ok()) };
        let (timeout, retry_cnt, rnr_retry) = (setting(), setting(), setting());
        let max_rd_atomic = setting();
        let qpn = self.qp(h)?.qpn;
        if self.qp(h)?.ud {
            let to = match state {
                0 => QpState::Reset,
                1 => QpState::Init,
                2 => QpState::Rtr,
                3 => QpState::Rts,
                6 => QpState::Error,
                _ => return Err(Refusal(libc::EOPNOTSUPP, format!("QP state {state}"))),
            };
            e.ud_modify(qpn, to, qkey.filter(|_| state == 1))?;
            if let Some(q) = self.qps.get_mut(&h) {
                q.ud_state = state;
            }
            return Ok(("OK".into(), vec![]));
        }
        let i = e
            .qp_index(qpn)
            .ok_or_else(|| Refusal::inval("queue pair gone"))?;
        let now = e.qp_state(i);
        let bad =
            |to: &str| Refusal::inval(format!("the queue pair cannot go from {now:?} to {to}"));
        match state {
            0 => e.to_reset(i),
            1 => {
                if now != QpState::Init {
                    e.to_init(i).map_err(|_| bad("INIT"))?;
                }
            }
            2 => {
                let dgid = hex(dgid_word.map(|g| g.get(16..).unwrap_or("")), "dgid")?;
                // An IPv4-mapped GID: ::ffff:a.b.c.d.
                if dgid >> 32 != 0xffff {
                    return Err(Refusal::inval(
                        "the destination GID is not an IPv4-mapped address (RoCE v2)",
                    ));
                }
                let ip = Ipv4Addr::from((dgid & 0xffff_ffff) as u32);
                if mtu != 0 {
                    let bytes = match mtu {
                        1..=5 => 128usize << mtu,
                        _ => return Err(Refusal::inval("bad path MTU")),
                    };
                    e.set_mtu(i, bytes);
                }
                e.to_rtr(i, dqpn, ip, rq_psn).map_err(|_| bad("RTR"))?;
                if let Some(t) = min_rnr.filter(|t| *t != 0) {
                    e.set_min_rnr_timer(i, t);
                }
            }
            3 => {
                if now != QpState::Rts {
                    e.to_rts(i, sq_psn).map_err(|_| bad("RTS"))?;
                }
                e.set_retry(i, timeout, retry_cnt, rnr_retry);
                if let Some(n) = max_rd_atomic {
                    e.set_max_rd_atomic(i, n);
                }
            }
            6 => e.to_error(i),
            _ => return Err(Refusal(libc::EOPNOTSUPP, format!("QP state {state}"))),
        }
        Ok(("OK".into(), vec![]))
    }

    /// Destroys everything the session has, queue pairs first so that no
    /// work refers to the regions any more.
    pub fn destroy(&mut self, e: &mut Engine) {
        for qp in self.qps.values() {
            let _ = if qp.ud {
                e.destroy_ud_qp(qp.qpn)
            } else {
                e.destroy_qp(qp.qpn)
            };
        }
        self.qps.clear();
        for s in self.srqs.values() {
            let _ = e.destroy_srq(s.id);
        }
        self.srqs.clear();
        for mr in self.mrs.values() {
            if let Err(err) = e.dereg_mr(mr.index) {
                log::warn!("rdma: a region of a departed application: {err}");
            }
        }
        self.mrs.clear();
        self.lkeys.clear();
        for cq in self.cqs.values() {
            let _ = e.destroy_cq(cq.cq);
        }
        self.cqs.clear();
        self.channels.clear();
        self.pds.clear();
    }
}

/// verbs' access flags.
fn access_of(flags: u32) -> Result<Access, Refusal> {
    let a = Access {
        local_write: flags & 1 != 0,
        remote_write: flags & 2 != 0,
        remote_read: flags & 4 != 0,
        remote_atomic: flags & 8 != 0,
    };
    if (a.remote_write || a.remote_atomic) && !a.local_write {
        return Err(Refusal::inval(
            "remote write or atomic access needs local write",
        ));
    }
    Ok(a)
}

/// Where a piece of a memory region lives.
#[derive(Debug)]
enum Piece {
    /// A memfd the application handed over (its size sealed).
    Memfd(OwnedFd),
    /// A System V segment the card opened ([`segment::open`]).
    Segment(OwnedFd),
}

/// Most pieces one region may have.
const MAX_PIECES: usize = 256;

/// The application's pages `va..va+len` from the files they live in
/// (`pieces`: the file, offset and length of each, in order, covering the
/// page-aligned range), mapped as one range here.
fn map_pieces(va: u64, len: usize, pieces: &[(Piece, u64, usize)]) -> Result<Memory, Refusal> {
    let page = shm::page_size();
    if len == 0 {
        return Err(Refusal::inval("an empty region"));
    }
    let lead = (va % page as u64) as usize;
    let total: usize = pieces
        .iter()
        .try_fold(0usize, |t, p| t.checked_add(p.2))
        .ok_or_else(|| Refusal::inval("pieces too long"))?;
    let need = lead
        .checked_add(len)
        .map(|n| n.next_multiple_of(page))
        .ok_or_else(|| Refusal::inval("region too long"))?;
    if total != need {
        return Err(Refusal::inval(format!(
            "pieces of {total} bytes for {need} bytes of pages"
        )));
    }
    // A huge-page segment maps in whole huge pages (its st_blksize is its
    // page size).
    let mut spans = Vec::with_capacity(pieces.len());
    for (file, off, plen) in pieces {
        let (size, unit) = match file {
            Piece::Memfd(fd) => (shm::sealed_size(fd.as_fd())?, page),
            Piece::Segment(fd) => {
                let st = rustix::fs::fstat(fd).map_err(io::Error::from)?;
                let unit = usize::try_from(st.st_blksize).unwrap_or(page).max(page);
                (u64::try_from(st.st_size).unwrap_or(0), unit)
            }
        };
        if off % page as u64 != 0 || plen % page != 0 || *plen == 0 {
            return Err(Refusal::inval("pieces are whole pages"));
        }
        if !unit.is_power_of_two() {
            return Err(Refusal::inval(format!("pages of {unit} bytes")));
        }
        spans.push((*off, *plen, unit, size));
    }
    let l = layout(va - lead as u64, &spans)?;
    let mapped: usize = l.spans.iter().map(|s| s.1).sum();
    let mut map = Mapping::reserve_aligned(mapped, l.align, l.phase)?;
    let mut at = 0;
    for ((file, ..), (off, plen)) in pieces.iter().zip(&l.spans) {
        let (Piece::Memfd(fd) | Piece::Segment(fd)) = file;
        map.map_piece(at, fd.as_fd(), *off, *plen)?;
        at += plen;
    }
    Ok(Memory::mapped(map, l.head + lead, len)?)
}

/// Where a region's pieces go in the card's mapping of it.
#[derive(Debug, PartialEq)]
struct Layout {
    /// The file range to map for each piece: its own, widened to whole
    /// pages of its kind at the region's two ends (a region may start or
    /// end inside a huge page).
    spans: Vec<(u64, usize)>,
    /// Bytes mapped before the region's first page.
    head: usize,
    /// The largest page size, and the remainder modulo it that the
    /// mapping's base must have: the application's address of the
    /// mapping's first byte, so that every piece lies on the same page
    /// boundaries here as there (huge pages map only at addresses aligned
    /// to them).
    align: usize,
    phase: usize,
}

/// The layout of pieces `(file offset, length, page size, file size)`
/// whose pages the application maps one after the other from `start`.
fn layout(start: u64, pieces: &[(u64, usize, usize, u64)]) -> Result<Layout, Refusal> {
    let (Some(first), Some(last)) = (pieces.first(), pieces.last()) else {
        return Err(Refusal::inval("no pieces"));
    };
    let head = (first.0 % first.2 as u64) as usize;
    let end = last.0 + last.1 as u64;
    let tail = (last.2 - (end % last.2 as u64) as usize) % last.2;
    let mut spans: Vec<(u64, usize)> = pieces.iter().map(|p| (p.0, p.1)).collect();
    spans[0] = (first.0 - head as u64, spans[0].1 + head);
    let n = spans.len();
    spans[n - 1].1 += tail;
    let align = pieces.iter().map(|p| p.2).max().unwrap_or(1);
    let base = start
        .checked_sub(head as u64)
        .ok_or_else(|| Refusal::inval("a region at address 0"))?;
    let phase = (base % align as u64) as usize;
    let mut at = 0usize;
    for ((off, len), p) in spans.iter().zip(pieces) {
        let unit = p.2;
        if !off.is_multiple_of(unit as u64)
            || !len.is_multiple_of(unit)
            || !(phase + at).is_multiple_of(unit)
        {
            return Err(Refusal::inval(format!(
                "a piece of {unit}-byte pages that is not whole pages where the application maps it"
            )));
        }
        if off.checked_add(*len as u64).is_none_or(|e| e > p.3) {
            return Err(Refusal::inval("a piece past the end of its file"));
        }
        at += len;
    }
    Ok(Layout {
        spans,
        head,
        align,
        phase,
    })
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    const K4: usize = 4096;
    const M2: usize = 2 << 20;

    #[test]
    fn a_region_inside_a_huge_page_maps_the_whole_page() {
        // perftest --use_hugepages: 128 KiB at the start of a 2 MiB
        // segment, and a page further in.
        let l = layout(0x7f4f_2d40_0000, &[(0, 128 << 10, M2, M2 as u64)]).unwrap();
        assert_eq!(
            (l.spans, l.head, l.align, l.phase),
            (vec![(0, M2)], 0, M2, 0)
        );
        let l = layout(0x7f4f_2d42_1000, &[(0x21000, K4, M2, M2 as u64)]).unwrap();
        assert_eq!((l.spans, l.head, l.phase), (vec![(0, M2)], 0x21000, 0));
    }

    #[test]
    fn pieces_keep_the_applications_page_boundaries() {
        // A memfd page just below a huge mapping, then 2 MiB of it, then
        // half of the next huge page of another segment.
        let l = layout(
            0x7000_001f_f000,
            &[
                (0, K4, K4, K4 as u64),
                (0, M2, M2, 4 * M2 as u64),
                (M2 as u64, M2 / 2, M2, 2 * M2 as u64),
            ],
        )
        .unwrap();
        assert_eq!(l.spans, vec![(0, K4), (0, M2), (M2 as u64, M2)]);
        assert_eq!((l.head, l.align, l.phase), (0, M2, 0x1f_f000));
    }

    #[test]
    fn pieces_that_break_huge_pages_are_refused() {
        // A huge piece in the middle that does not start on a huge page,
        // one whose page lies past its file, one at an odd place.
        let e = layout(
            0x7000_0000_0000,
            &[(0, K4, K4, K4 as u64), (K4 as u64, M2, M2, 4 * M2 as u64)],
        );
        assert!(e.is_err());
        let e = layout(0x7000_0000_0000, &[(0, K4, M2, K4 as u64)]);
        assert!(e.is_err());
        let e = layout(
            0x7000_0000_1000,
            &[(0, K4, K4, K4 as u64), (0, M2, M2, M2 as u64)],
        );
        assert!(e.is_err());
    }
}
