//! What waking a sleeping thread on another CPU costs on this machine.
//!
//! A vhost-user client that sleeps on its completion eventfd is woken by
//! the card's `write` to it. Where the sleeper's CPU is idle, the wake-up
//! is an inter-processor interrupt; in a VM whose idle vCPUs halt at once
//! that is an exit to the hypervisor for the writer and a halted vCPU to
//! resume for the sleeper. `softcard bench storage` measures both here
//! and prints them in its header, since they set the figure of a sleeping
//! client wherever it has to sleep often.
//!
//! Two threads, each pinned to its own CPU: one sleeps in `poll` on an
//! eventfd and notes the time it runs again; the other, once the first has
//! slept for [`GAP`], writes to the eventfd and times its `write`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Wake-ups measured.
const ROUNDS: usize = 2000;
/// How long the sleeper sleeps before each wake-up: about as long as a
/// client waits for its next answer. Within a guest's idle polling
/// window (`guest_halt_poll_ns`) its vCPU is still polling, not halted.
const GAP: Duration = Duration::from_micros(20);
/// Writes timed with nobody waiting.
const IDLE_WRITES: u32 = 20_000;

/// Medians, in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WakeCost {
    /// A `write` to an eventfd nobody waits on.
    pub(crate) write_idle_ns: u64,
    /// A `write` that wakes a thread asleep on the other CPU.
    pub(crate) write_waking_ns: u64,
    /// From the start of that `write` until the woken thread runs.
    pub(crate) wake_ns: u64,
}

impl std::fmt::Display for WakeCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let us = |ns: u64| ns as f64 / 1000.0;
        write!(
            f,
            "waking a thread asleep for {} us on another CPU: the writer's write {:.1} us ({:.2} us with nobody waiting), the sleeper runs {:.1} us after it starts",
            GAP.as_micros(),
            us(self.write_waking_ns),
            us(self.write_idle_ns),
            us(self.wake_ns)
        )
    }
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin(cpu: usize) -> bool {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t and `cpu` is below CPU_SETSIZE
    // (checked by the caller against the CPUs this process may use).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` outlives the call and its size is passed with it.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// The first two CPUs this process may run on.
pub(crate) fn two_cpus() -> Option<(usize, usize)> {
    // SAFETY: as in `pin`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` outlives the call and its size is passed with it.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return None;
    }
    // SAFETY: `set` was filled in by sched_getaffinity; the index is below
    // CPU_SETSIZE.
    let mut cpus = (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) });
    Some((cpus.next()?, cpus.next()?))
}

/// A non-blocking eventfd.
fn eventfd() -> Option<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    // SAFETY: a new descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_one(fd: RawFd) {
    let mut v = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live local buffer.
    let _ = unsafe { libc::read(fd, v.as_mut_ptr().cast(), v.len()) };
}

fn write_one(fd: RawFd) -> bool {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to an eventfd.
    unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) == 8 }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Measures on the first two CPUs this process may use; `None` where it
/// has only one, or a thread could not be pinned.
pub(crate) fn wake_cost() -> Option<WakeCost> {
    let (sleeper_cpu, waker_cpu) = two_cpus()?;
    let efd = Arc::new(eventfd()?);
    let base = Instant::now();
    // Nanoseconds after `base` at which the sleeper last ran again.
    let woke = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sleeper = {
        let (efd, woke, stop) = (Arc::clone(&efd), Arc::clone(&woke), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("wake-sleeper".into())
            .spawn(move || {
                if !pin(sleeper_cpu) {
                    return false;
                }
                while !stop.load(Ordering::Relaxed) {
                    let mut p = libc::pollfd {
                        fd: efd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, for the duration of the call.
                    let n = unsafe { libc::poll(&mut p, 1, 1000) };
                    if n == 1 {
                        let at = base.elapsed().as_nanos() as u64;
                        read_one(efd.as_raw_fd());
                        woke.store(at, Ordering::Release);
                    }
                }
                true
            })
            .ok()?
    };
    let waker = {
        let (efd, woke) = (Arc::clone(&efd), Arc::clone(&woke));
        std::thread::Builder::new()
            .name("wake-waker".into())
            .spawn(move || -> Option<WakeCost> {
                if !pin(waker_cpu) {
                    return None;
                }
                let idle = eventfd()?;
                let t = Instant::now();
                for _ in 0..IDLE_WRITES {
                    // The counter cannot overflow in this many writes.
                    if !write_one(idle.as_raw_fd()) {
                        return None;
                    }
                }
                let write_idle_ns = t.elapsed().as_nanos() as u64 / u64::from(IDLE_WRITES);
                let (mut writes, mut wakes) = (Vec::new(), Vec::new());
                for _ in 0..ROUNDS {
                    let quiet = Instant::now();
                    while quiet.elapsed() < GAP {
                        std::hint::spin_loop();
                    }
                    let before = woke.load(Ordering::Acquire);
                    let start = base.elapsed().as_nanos() as u64;
                    if !write_one(efd.as_raw_fd()) {
                        return None;
                    }
                    writes.push(base.elapsed().as_nanos() as u64 - start);
                    let waiting = Instant::now();
                    loop {
                        let at = woke.load(Ordering::Acquire);
                        if at != before {
                            wakes.push(at.saturating_sub(start));
                            break;
                        }
                        if waiting.elapsed() > Duration::from_secs(1) {
                            return None;
                        }
                        std::hint::spin_loop();
                    }
                }
                Some(WakeCost {
                    write_idle_ns,
                    write_waking_ns: median(&mut writes),
                    wake_ns: median(&mut wakes),
                })
            })
            .ok()?
    };
    let cost = waker.join().ok().flatten();
    stop.store(true, Ordering::Relaxed);
    write_one(efd.as_raw_fd());
    let pinned = sleeper.join().unwrap_or(false);
    cost.filter(|_| pinned)
}
