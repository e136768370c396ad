//! Applications that misbehave on the card's RDMA control socket and
//! rings, spoken to directly (no verbs library): each gets an error or is
//! disconnected, and no other application's memory is read or written.
//! The card's service runs in a network namespace the test creates, on
//! its loopback (needs root for the namespace and the raw socket).

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use softcard_rdma::ring::{self, Cqe, QpRings, RecvWqe, SendWqe};
use softcard_rdma::service::RdmaService;
use softcard_rdma::shm::{self, Mapping};

/// One application's session, spoken to by hand.
struct App {
    sock: UnixStream,
}

impl App {
    fn open(path: &Path) -> App {
        let a = App {
            sock: UnixStream::connect(path).unwrap(),
        };
        let (line, fds) = a.call("OPEN softcard0 1", &[]);
        assert_eq!(line, "OK");
        assert_eq!(fds.len(), 1, "the doorbell");
        a
    }

    fn call(&self, line: &str, fds: &[BorrowedFd<'_>]) -> (String, Vec<OwnedFd>) {
        shm::send_with_fds(self.sock.as_fd(), format!("{line}\n").as_bytes(), fds).unwrap();
        let mut buf = Vec::new();
        let mut got = Vec::new();
        let mut chunk = [0u8; 512];
        while !buf.ends_with(b"\n") {
            let n = shm::recv_with_fds(self.sock.as_fd(), &mut chunk, &mut got).unwrap();
            assert!(n > 0, "the card hung up on {line:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
        (String::from_utf8(buf).unwrap().trim_end().to_owned(), got)
    }

    /// `OK` and its words, or a panic with the answer.
    fn ok(&self, line: &str, fds: &[BorrowedFd<'_>]) -> (Vec<u64>, Vec<OwnedFd>) {
        let (answer, got) = self.call(line, fds);
        let mut w = answer.split(' ');
        assert_eq!(w.next(), Some("OK"), "{line}: {answer}");
        (w.map(|x| x.parse().unwrap()).collect(), got)
    }

    /// The errno a request is refused with.
    fn refused(&self, line: &str, fds: &[BorrowedFd<'_>]) -> i32 {
        let (answer, _) = self.call(line, fds);
        let mut w = answer.split(' ');
        assert_eq!(w.next(), Some("ERR"), "{line} was accepted: {answer}");
        w.next().unwrap().parse().unwrap()
    }

    /// A region of `pages` pages at `va` in domain `pd`: its memory and key.
    fn region(&self, pd: u64, va: u64, pages: usize) -> (Mapping, u32) {
        let len = pages * shm::page_size();
        let fd = shm::sealed_memfd("region", len).unwrap();
        let map = Mapping::map(fd.as_fd(), 0, len).unwrap();
        let (w, _) = self.ok(&format!("MR {pd} {va:x} {len} 7 0:{len}"), &[fd.as_fd()]);
        (map, u32::try_from(w[1]).unwrap())
    }
}

/// A queue pair with its completion queue, connected to itself (RTS).
struct Qp {
    map: Mapping,
    rings: QpRings,
    cq: Mapping,
    cq_ring: ring::Ring,
    sq: u32,
    rq: u32,
    polled: u32,
}

impl Qp {
    fn new(app: &App, pd: u64, cq_entries: u32, connect: bool) -> Qp {
        let (w, mut fds) = app.ok(&format!("CQ {cq_entries} 0 0"), &[]);
        let (cq_h, entries, bytes) = (w[0], w[1] as u32, w[2] as usize);
        let cq = Mapping::map(fds.pop().unwrap().as_fd(), 0, bytes).unwrap();
        let (w, mut fds) = app.ok(&format!("QP {pd} {cq_h} {cq_h} 16 16 1 1 0 1 2"), &[]);
        let (h, qpn) = (w[0], w[1]);
        let rings = QpRings::new(w[2] as u32, w[3] as u32);
        let map = Mapping::map(fds.pop().unwrap().as_fd(), 0, rings.bytes).unwrap();
        let gid = "00000000000000000000ffff7f000001";
        app.ok(&format!("MODIFY {h} 1 0 0 0 0 {gid}"), &[]);
        if connect {
            app.ok(&format!("MODIFY {h} 2 3 {qpn} 0 0 {gid}"), &[]);
            app.ok(&format!("MODIFY {h} 3 0 0 0 0 {gid}"), &[]);
        }
        Qp {
            map,
            rings,
            cq,
            cq_ring: ring::cq_ring(entries).0,
            sq: 0,
            rq: 0,
            polled: 0,
        }
    }

    fn send(&mut self, w: SendWqe) {
        self.map.write(self.rings.sq.slot(self.sq), w);
        self.sq += 1;
        self.rings
            .sq
            .prod(&self.map)
            .store(self.sq, Ordering::Release);
    }

    fn recv(&mut self, wr_id: u64, sge: ring::Sge) {
        let mut w = RecvWqe {
            wr_id,
            num_sge: 1,
            ..RecvWqe::default()
        };
        w.sge[0] = sge;
        self.map.write(self.rings.rq.slot(self.rq), w);
        self.rq += 1;
        self.rings
            .rq
            .prod(&self.map)
            .store(self.rq, Ordering::Release);
    }

    /// The next completion, waiting up to 10 s.
    fn next(&mut self) -> Option<Cqe> {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if self.cq_ring.prod(&self.cq).load(Ordering::Acquire) != self.polled {
                let c: Cqe = self.cq.read(self.cq_ring.slot(self.polled));
                self.polled += 1;
                self.cq_ring
                    .cons(&self.cq)
                    .store(self.polled, Ordering::Release);
                return Some(c);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }
}

fn send_wqe(wr_id: u64, sge: ring::Sge) -> SendWqe {
    let mut w = SendWqe {
        wr_id,
        opcode: 2,
        flags: 2,
        num_sge: 1,
        ..SendWqe::default()
    };
    w.set_sge(0, sge);
    w
}

#[test]
fn hostile_applications_hurt_only_themselves() {
    let ns = softcard_testkit::Netns::new("hostile");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("rdma.sock");
    let svc = {
        let sock = sock.clone();
        std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter();
                RdmaService::start(
                    &[("softcard0".into(), std::net::Ipv4Addr::LOCALHOST)],
                    &sock,
                )
                .expect("the card's engine (needs CAP_NET_RAW)")
            })
            .join()
            .unwrap()
        })
    };

    // A: a region holding a secret.
    let a = App::open(&sock);
    let (pd_a, _) = a.ok("PD", &[]);
    let (mem_a, key_a) = a.region(pd_a[0], 0x7000_0000, 1);
    mem_a.write(0, *b"secret-of-A....");

    // B: its own region and a queue pair connected to itself. A send
    // from its own memory arrives (the control).
    let b = App::open(&sock);
    let (pd_b, _) = b.ok("PD", &[]);
    let pd_b = pd_b[0];
    let (mem_b, key_b) = b.region(pd_b, 0x5000_0000, 1);
    mem_b.write(0, *b"hello-from-B...");
    let mut q = Qp::new(&b, pd_b, 16, true);
    let own = |off: u64, len: u32| ring::Sge {
        addr: 0x5000_0000 + off,
        length: len,
        lkey: key_b,
    };
    q.recv(1, own(1024, 64));
    q.send(send_wqe(2, own(0, 15)));
    let mut got: Vec<Cqe> = (0..2).map(|_| q.next().expect("a completion")).collect();
    got.sort_by_key(|c| c.wr_id);
    assert_eq!(
        (got[0].status, got[0].byte_len, got[0].opcode),
        (0, 15, 128),
        "{got:?}"
    );
    assert_eq!((got[1].status, got[1].opcode), (0, 0), "{got:?}");
    assert_eq!(mem_b.read::<[u8; 15]>(1024), *b"hello-from-B...");

    // B names A's region (A's lkey and address): a protection error, and
    // not a byte of A's is read or written.
    q.recv(
        3,
        ring::Sge {
            addr: 0x7000_0000,
            length: 64,
            lkey: key_a,
        },
    );
    let c = q.next().expect("a completion for the receive");
    assert_eq!((c.wr_id, c.status), (3, 4), "{c:?}");
    q.send(send_wqe(
        4,
        ring::Sge {
            addr: 0x7000_0000,
            length: 15,
            lkey: key_a,
        },
    ));
    let c = q.next().expect("a completion for the send");
    assert_eq!(
        (c.wr_id, c.status),
        (4, 5),
        "flushed: the QP is in ERROR: {c:?}"
    );
    assert_eq!(mem_a.read::<[u8; 15]>(0), *b"secret-of-A....");

    // Regions over memory B does not have, or that could shrink under the
    // card: refused.
    let page = shm::page_size();
    let small = shm::sealed_memfd("small", page).unwrap();
    assert_eq!(
        b.refused(
            &format!("MR {pd_b} 0 {} 7 0:{}", 2 * page, 2 * page),
            &[small.as_fd()]
        ),
        libc::EINVAL
    );
    let loose = rustix::fs::memfd_create("loose", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&loose, page as u64).unwrap();
    assert_eq!(
        b.refused(&format!("MR {pd_b} 0 {page} 7 0:{page}"), &[loose.as_fd()]),
        libc::EINVAL
    );
    let (pipe_r, _pipe_w) = rustix::pipe::pipe().unwrap();
    assert_eq!(
        b.refused(&format!("MR {pd_b} 0 {page} 7 0:{page}"), &[pipe_r.as_fd()]),
        libc::EINVAL
    );
    assert_eq!(
        b.refused(
            &format!("MR {pd_b} 0 {page} 7 0:{page} 0:{page}"),
            &[small.as_fd()]
        ),
        libc::EINVAL
    );
    assert_eq!(
        b.refused(&format!("MR {pd_b} 0 0 7 0:{page}"), &[small.as_fd()]),
        libc::EINVAL
    );
    // Remote write without local write, as verbs forbids.
    assert_eq!(
        b.refused(&format!("MR {pd_b} 0 {page} 2 0:{page}"), &[small.as_fd()]),
        libc::EINVAL
    );
    // A's protection domain is not B's to name (handles are per
    // application).
    assert_eq!(
        b.refused(
            &format!("MR {} 0 {page} 7 0:{page}", pd_a[0] + 100),
            &[small.as_fd()]
        ),
        libc::EINVAL
    );
    assert_eq!(b.refused("FREEQP 999", &[]), libc::EINVAL);
    assert_eq!(b.refused("QP 1 2 3", &[]), libc::EINVAL);
    // Descriptors where none belong.
    assert_eq!(b.refused("PD", &[small.as_fd()]), libc::EINVAL);

    // A completion queue too small for what completes: nothing is lost
    // or doubled, the card waits for room.
    let c_app = App::open(&sock);
    let (pd_c, _) = c_app.ok("PD", &[]);
    let (_mem_c, key_c) = c_app.region(pd_c[0], 0x9000_0000, 1);
    let mut small_cq = Qp::new(&c_app, pd_c[0], 2, false);
    for i in 0..12 {
        small_cq.recv(
            100 + i,
            ring::Sge {
                addr: 0x9000_0000,
                length: 16,
                lkey: key_c,
            },
        );
    }
    std::thread::sleep(Duration::from_millis(100));
    // The QP's handle is the session's third object (PD, MR, CQ, QP).
    let (answer, _) = c_app.call("MODIFY 4 6 0 0 0 0 0", &[]);
    assert_eq!(answer, "OK");
    let mut ids: Vec<u64> = (0..12)
        .map(|_| {
            let c = small_cq.next().expect("every flushed receive completes");
            assert_eq!(c.status, 5, "{c:?}");
            c.wr_id
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (100..112).collect::<Vec<_>>());

    // B scribbles on its ring: a producer counter past what the ring
    // holds. The card disconnects B; A carries on.
    q.rings
        .sq
        .prod(&q.map)
        .store(q.sq + 1000, Ordering::Release);
    let mut sock_b = b.sock.try_clone().unwrap();
    sock_b
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    assert!(
        sock_b.read_to_end(&mut rest).is_ok(),
        "B was not disconnected"
    );
    a.ok("PD", &[]);
    assert_eq!(mem_a.read::<[u8; 15]>(0), *b"secret-of-A....");

    // Garbage on a fresh connection: an error, the card still serves.
    let mut g = UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(&mut g, b"\x00\xff garbage\n").unwrap();
    let mut answer = String::new();
    g.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("ERROR"), "{answer}");
    assert_eq!(
        softcard_rdma::service::query_devices(&sock).unwrap().len(),
        1
    );
    drop(svc);
}
