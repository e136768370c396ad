//! Nothing a flush acknowledged is lost when the card is killed.
//!
//! The card serves a file through its volatile write cache (the
//! `volatile_write_cache` crash-test layer): writes stay in the card's
//! memory until a flush, so `kill -9` loses what was not flushed, as power
//! loss does to a disk. A libblkio client writes at queue depth 32 with a
//! flush every 16 writes while the card is killed at a random moment; the
//! card is started again and a new client reads everything back. Every
//! sector must hold a version the client wrote, never older than the last
//! one a flush acknowledged.
//!
//! The same checker run against the cache's deliberate bug (flushes
//! answered before their data is durable) must report losses: that is
//! what shows the check can fail.

mod common;

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blkio::{Completion, ReqFlags};
use common::{Client, Daemon};

const BLOCK: usize = 4096;
const BLOCKS: usize = 1024;
const DEPTH: usize = 32;
const WRITES_PER_FLUSH: usize = 16;

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Every 8-byte word of sector `s` of block `b`, version `v`.
fn word(b: usize, v: u32, s: usize) -> u64 {
    (0x5c << 56) | ((b as u64) << 36) | (u64::from(v) << 4) | s as u64
}

fn fill(buf: &mut [u8], b: usize, v: u32) {
    for (s, sector) in buf.chunks_mut(512).enumerate() {
        let w = word(b, v, s).to_le_bytes();
        for c in sector.chunks_mut(8) {
            c.copy_from_slice(&w);
        }
    }
}

/// What the client knows about each block.
#[derive(Clone, Default)]
struct Model {
    /// Per sector, the newest version a flush acknowledged or that was
    /// read back after a crash (0: zeroes). Per sector, since a crash in
    /// the middle of a write-back can leave a block torn, with some
    /// sectors newer than others, as a disk can.
    durable: [u32; BLOCK / 512],
    /// Every version written to it (answered or not).
    written: Vec<u32>,
    /// Newest version whose write was answered.
    answered: u32,
}

#[derive(Default, Debug)]
struct Tally {
    flushes: u64,
    writes: u64,
    /// Sectors older than a flush promised.
    lost: u64,
    /// Sectors holding what no write put there.
    corrupt: u64,
    /// Answered but unflushed writes that the crash took.
    unflushed_gone: u64,
}

/// One slot's request in flight.
#[derive(Clone)]
enum Op {
    Write {
        block: usize,
        version: u32,
    },
    /// The answered writes a flush covers.
    Flush(Vec<(usize, u32)>),
}

/// Writes until the card dies (or `limit` runs out); updates the model.
fn write_until_killed(
    c: &mut Client,
    model: &mut [Model],
    next_version: &mut u32,
    rnd: &mut impl FnMut() -> u64,
    killed: &AtomicBool,
    tally: &mut Tally,
) {
    let base = c.region.addr;
    let mut slots: Vec<Option<Op>> = vec![None; DEPTH];
    // Two writes to one block in flight at once may land in either order:
    // one at a time per block keeps the model exact.
    let mut busy = vec![false; BLOCKS];
    let mut since_flush: Vec<(usize, u32)> = Vec::new();
    let mut unflushed_writes = 0usize;
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
    let mut quiet = 0;
    loop {
        // Fill every free slot.
        for (slot, entry) in slots.iter_mut().enumerate() {
            if entry.is_some() {
                continue;
            }
            if unflushed_writes >= WRITES_PER_FLUSH {
                unflushed_writes = 0;
                *entry = Some(Op::Flush(std::mem::take(&mut since_flush)));
                c.queues[0].flush(slot, ReqFlags::empty());
                continue;
            }
            let block = loop {
                let b = (rnd() % BLOCKS as u64) as usize;
                if !busy[b] {
                    break b;
                }
            };
            busy[block] = true;
            *next_version += 1;
            let version = *next_version;
            // SAFETY: slot `slot` owns BLOCK bytes of the client's region,
            // untouched by the device until this request is submitted.
            let buf =
                unsafe { std::slice::from_raw_parts_mut((base + slot * BLOCK) as *mut u8, BLOCK) };
            fill(buf, block, version);
            model[block].written.push(version);
            *entry = Some(Op::Write { block, version });
            unflushed_writes += 1;
            c.queues[0].write(
                (block * BLOCK) as u64,
                buf.as_ptr(),
                BLOCK,
                slot,
                ReqFlags::empty(),
            );
        }
        let mut timeout = Duration::from_millis(100);
        let n = match c.queues[0].do_io(&mut comps, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            quiet += 1;
            // The card is gone and nothing more will come back.
            if killed.load(Ordering::SeqCst) && quiet >= 3 {
                return;
            }
            continue;
        }
        quiet = 0;
        for comp in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let comp = unsafe { comp.assume_init_ref() };
            let op = slots[comp.user_data]
                .take()
                .expect("a request in that slot");
            if let Op::Write { block, .. } = op {
                busy[block] = false;
            }
            if comp.ret != 0 {
                // The connection went down under it.
                continue;
            }
            match op {
                Op::Write { block, version } => {
                    tally.writes += 1;
                    let m = &mut model[block];
                    m.answered = m.answered.max(version);
                    since_flush.push((block, version));
                }
                Op::Flush(covered) => {
                    tally.flushes += 1;
                    for (block, version) in covered {
                        for d in &mut model[block].durable {
                            *d = (*d).max(version);
                        }
                    }
                }
            }
        }
    }
}

/// Reads every block back and checks it against the model; what is on the
/// device becomes the new durable state.
fn check(c: &mut Client, model: &mut [Model], tally: &mut Tally) {
    let chunk = 32 * BLOCK;
    for first in (0..BLOCKS).step_by(chunk / BLOCK) {
        let data = c
            .read(0, (first * BLOCK) as u64, chunk)
            .expect("reading back after the restart");
        for (i, blk) in data.chunks(BLOCK).enumerate() {
            let b = first + i;
            let m = &mut model[b];
            let mut newest = 0;
            for (s, sector) in blk.chunks(512).enumerate() {
                let w = u64::from_le_bytes(sector[..8].try_into().unwrap());
                let uniform = sector.chunks(8).all(|c| c == &sector[..8]);
                let version = if w == 0 && sector.iter().all(|&x| x == 0) {
                    Some(0)
                } else {
                    let v = u32::try_from((w >> 4) & 0xffff_ffff).unwrap();
                    (uniform && w == word(b, v, s) && m.written.contains(&v)).then_some(v)
                };
                match version {
                    None => tally.corrupt += 1,
                    Some(v) if v < m.durable[s] => tally.lost += 1,
                    Some(v) => {
                        if v < m.answered {
                            tally.unflushed_gone += 1;
                        }
                        m.durable[s] = v;
                        newest = newest.max(v);
                    }
                }
            }
            m.answered = newest;
        }
    }
}

fn config(seed: u64, early: bool) -> String {
    format!(
        "state_file = \"@DIR@/state.json\"\nrdma_socket = \"@DIR@/rdma.sock\"\n\
         [[device]]\nname = \"nvme0\"\nkind = \"file\"\npath = \"@DIR@/disk.img\"\n\
         size = \"64MiB\"\nvolatile_write_cache = {{ seed = {seed}, flush_acks_early = {early} }}\n"
    )
}

/// Runs `trials` kill trials; returns what the checker saw.
fn trials(seed: u64, early: bool, trials: usize) -> Tally {
    let mut d = Daemon::start(&config(seed, early));
    let sock = d.volume_on("v", "16MiB", "--vhost-user", "v.sock");
    let mut model = vec![Model::default(); BLOCKS];
    let mut tally = Tally::default();
    let mut rnd = rng(seed);
    let mut version = 0u32;
    for _ in 0..trials {
        common::wait_for_socket(&sock, None);
        let mut c = Client::connect(&sock, 1).expect("connecting to the card");
        let killed = Arc::new(AtomicBool::new(false));
        let delay = Duration::from_millis(20 + rnd() % 230);
        let pid = d.pid();
        let killer = {
            let killed = killed.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                // SAFETY: a signal to the daemon process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed.store(true, Ordering::SeqCst);
            })
        };
        write_until_killed(
            &mut c,
            &mut model,
            &mut version,
            &mut rnd,
            &killed,
            &mut tally,
        );
        killer.join().unwrap();
        drop(c);
        d.crash_and_restart();
        common::wait_for_socket(&sock, None);
        let mut c = Client::connect(&sock, 1).expect("connecting after the restart");
        check(&mut c, &mut model, &mut tally);
    }
    eprintln!("seed {seed}, flush_acks_early {early}, {trials} trials: {tally:?}");
    tally
}

#[test]
fn no_flushed_write_is_lost_over_a_hundred_kills() {
    let t = trials(11, false, 100);
    assert_eq!(t.lost, 0, "flushed writes lost: {t:?}");
    assert_eq!(t.corrupt, 0, "sectors nobody wrote: {t:?}");
    // The trials did what they claim: many flushes answered, and the
    // cache really dropped unflushed writes when the card died.
    assert!(t.flushes >= 100, "{t:?}");
    assert!(t.unflushed_gone > 0, "{t:?}");
}

#[test]
fn the_checker_catches_a_flush_answered_before_its_data_is_durable() {
    let t = trials(12, true, 10);
    assert!(t.lost > 0, "the deliberate bug went unnoticed: {t:?}");
    assert_eq!(t.corrupt, 0, "{t:?}");
}
