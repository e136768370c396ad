//! The fuzz target's entry: an application's control requests and
//! scribbles on its rings, against a real engine (on loopback, every
//! datagram it would send dropped by the fault injector), next to a
//! second application whose memory must not change.

use std::os::fd::AsFd;
use std::sync::{Mutex, OnceLock};

use crate::rc::Engine;
use crate::shm::{self, Mapping};

use super::session::Session;

/// What the victim's region holds.
const PATTERN: u8 = 0xa5;

fn engine() -> Option<&'static Mutex<Engine>> {
    static E: OnceLock<Option<Mutex<Engine>>> = OnceLock::new();
    E.get_or_init(|| {
        let mut e = Engine::open(std::net::Ipv4Addr::LOCALHOST).ok()?;
        e.set_faults(crate::net::Faults {
            seed: 1,
            drop_ppm: 1_000_000,
            ..Default::default()
        });
        Some(Mutex::new(e))
    })
    .as_ref()
}

/// A session with a protection domain and a region of `PATTERN` bytes.
fn with_region(e: &mut Engine) -> (Session, Mapping) {
    let mut s = Session::default();
    s.request(e, "PD", vec![]).expect("PD");
    let len = shm::page_size();
    let fd = shm::sealed_memfd("fuzz", len).expect("memfd");
    let map = Mapping::map(fd.as_fd(), 0, len).expect("map");
    map.write(0, [PATTERN; 64]);
    s.request(e, &format!("MR 1 10000 {len} 15 0:{len}"), vec![fd])
        .expect("MR");
    (s, map)
}

/// Runs `data` as one application's requests and ring writes: segments
/// split at 0xff; one starting below 0x80 is a control line, one at or
/// above it writes its bytes into the application's ring memory (at the
/// offset its next two bytes give) and lets the data path run. Panics if
/// the other application's memory changed.
pub fn fuzz_session(data: &[u8]) {
    let Some(e) = engine() else { return };
    let mut e = e.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (mut victim, vmem) = with_region(&mut e);
    let (mut s, _own) = with_region(&mut e);
    s.request(&mut e, "CQ 8 0 0", vec![]).expect("CQ");
    let (qp_line, qp_fds) = s
        .request(&mut e, "QP 1 3 3 8 8 4 4 64 0 2", vec![])
        .expect("QP");
    let rings_len: usize = qp_line
        .split(' ')
        .nth(5)
        .and_then(|w| w.parse().ok())
        .expect("ring size");
    let rings = Mapping::map(qp_fds[0].as_fd(), 0, rings_len).expect("map rings");
    for seg in data.split(|b| *b == 0xff) {
        match seg {
            [b, rest @ ..] if *b < 0x80 => {
                let line = String::from_utf8_lossy(rest);
                let _ = s.request(&mut e, &line, vec![]);
            }
            [_, hi, lo, bytes @ ..] => {
                let at = usize::from(u16::from_be_bytes([*hi, *lo])) % rings_len;
                let n = bytes.len().min(rings_len - at);
                for (i, b) in bytes[..n].iter().enumerate() {
                    rings.write(at + i, *b);
                }
                super::datapath::pump(&mut s, &mut e);
                let _ = e.poll(std::time::Duration::ZERO);
            }
            _ => {}
        }
    }
    super::datapath::pump(&mut s, &mut e);
    assert_eq!(
        vmem.read::<[u8; 64]>(0),
        [PATTERN; 64],
        "another application's memory changed"
    );
    s.destroy(&mut e);
    victim.destroy(&mut e);
}
