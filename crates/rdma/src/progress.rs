//! A progress thread: drives an [`Engine`] in the background, so that an
//! application can post work and block until completions arrive (on the
//! completion eventfd) instead of polling, as it would with a NIC.
//!
//! The thread handles what has arrived and what timers say (ACKs,
//! retransmissions, RNR waits), then sleeps in `ppoll` on the receive
//! ring's descriptor until a datagram arrives or the next timer is due.
//! It holds the engine's lock only while it works; an application takes
//! the lock to post work or read completions.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::rc::{CqId, Engine};

/// The longest the thread sleeps without a reason to wake: it bounds how
/// late a timer armed by the application (a retransmission timer for new
/// work) is noticed.
const MAX_SLEEP: Duration = Duration::from_millis(2);

/// Work a progress thread does besides the engine's own: the card
/// daemon's rings of its applications (see [`crate::service`]). Every call
/// runs under the engine's lock.
pub trait Hook: Send {
    /// One round of work; true if there was any.
    fn work(&mut self, engine: &mut Engine) -> bool;

    /// The thread is about to sleep until the engine's descriptor or the
    /// doorbell wakes it: say so where producers look, then look once
    /// more; true if work arrived meanwhile (then the thread does not
    /// sleep).
    fn sleeping(&mut self, _engine: &mut Engine) -> bool {
        false
    }

    /// The thread woke up.
    fn awake(&mut self) {}

    /// The thread starts (it may set its own scheduling).
    fn started(&mut self) {}
}

/// An engine driven by its own thread.
#[derive(Debug)]
pub struct Progress {
    engine: Arc<Mutex<Engine>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
    cq_fd: RawFd,
    /// Why the thread stopped on its own, once it has: waiters get this
    /// error instead of sleeping until their timeout.
    failed: Arc<Mutex<Option<(io::ErrorKind, String)>>>,
}

impl Progress {
    /// Starts driving `engine` on a new thread.
    pub fn spawn(engine: Engine) -> io::Result<Self> {
        Self::spawn_with(engine, None, None)
    }

    /// Starts driving `engine` and `hook` on a new thread, which also
    /// wakes when `doorbell` (an eventfd) is rung.
    pub fn spawn_with(
        mut engine: Engine,
        hook: Option<Box<dyn Hook>>,
        doorbell: Option<std::os::fd::OwnedFd>,
    ) -> io::Result<Self> {
        let cq_fd = engine.cq_eventfd()?.as_raw_fd();
        let engine = Arc::new(Mutex::new(engine));
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(None));
        let thread = {
            let (engine, stop, failed) = (engine.clone(), stop.clone(), failed.clone());
            std::thread::Builder::new()
                .name("rdma-progress".into())
                .spawn(move || {
                    let r = run(&engine, &stop, hook, doorbell.as_ref());
                    if let Err(e) = &r {
                        *failed
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some((e.kind(), e.to_string()));
                        // Wake every waiter, whichever queue it sleeps on.
                        lock(&engine).wake_all_cqs();
                    }
                    r
                })?
        };
        Ok(Progress {
            engine,
            stop,
            thread: Some(thread),
            cq_fd,
            failed,
        })
    }

    /// The engine, for posting work and reading completions.
    pub fn lock(&self) -> MutexGuard<'_, Engine> {
        lock(&self.engine)
    }

    /// The completion eventfd (non-blocking; readable while completions
    /// were added since it was last read), for an application's epoll.
    pub fn cq_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the eventfd is owned by the engine, which lives in
        // `self.engine` at least as long as `self`.
        unsafe { BorrowedFd::borrow_raw(self.cq_fd) }
    }

    /// Blocks until the default completion ring holds something or
    /// `timeout` passes, sleeping on the completion eventfd; true if it
    /// does. If the thread stops on an error meanwhile, the waiter wakes
    /// and gets that error ([`Progress::error`]).
    pub fn wait_cq(&self, timeout: Duration) -> io::Result<bool> {
        self.wait_on(CqId::DEFAULT, self.cq_fd, timeout)
    }

    /// Like [`Progress::wait_cq`], for completion queue `cq` (made with
    /// [`Engine::create_cq`]).
    pub fn wait_cq_of(&self, cq: CqId, timeout: Duration) -> io::Result<bool> {
        // The queue's eventfd lives as long as the engine, which outlives
        // this call (it is in `self.engine`).
        let fd = self.lock().cq_eventfd_of(cq)?.as_raw_fd();
        self.wait_on(cq, fd, timeout)
    }

    /// The error that stopped the thread on its own, if one did. Nothing
    /// drives the engine after that: waits fail with this error once the
    /// queue they wait on is empty.
    pub fn error(&self) -> Option<io::Error> {
        self.failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|(kind, msg)| {
                io::Error::new(*kind, format!("rdma progress thread stopped: {msg}"))
            })
    }

    fn wait_on(&self, cq: CqId, fd: RawFd, timeout: Duration) -> io::Result<bool> {
        let end = Instant::now() + timeout;
        loop {
            if !self.lock().cq_of(cq).is_empty() {
                return Ok(true);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            if let Some(e) = self.error() {
                return Err(e);
            }
            if sleep_on(fd, left)? {
                let mut count = [0u8; 8];
                // SAFETY: reads 8 bytes into a live buffer from our
                // non-blocking eventfd (resetting it); EAGAIN is harmless.
                let _ = unsafe { libc::read(fd, count.as_mut_ptr().cast(), 8) };
            }
        }
    }

    /// Stops the thread and gives the engine back, with the error that
    /// stopped the thread early, if one did.
    pub fn stop(mut self) -> io::Result<Engine> {
        self.halt()?;
        let engine = self.engine.clone();
        drop(self);
        Arc::try_unwrap(engine)
            .map_err(|_| io::Error::other("engine still shared"))
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            })
    }

    fn halt(&mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| io::Error::other("progress thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

fn lock(engine: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    engine
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long the thread of a device with applications keeps polling the
/// rings and the socket without work before it sleeps
/// (`SOFTCARD_RDMA_SPIN_US`; default 0, sleep at once). Polling saves the
/// wake-up when a core is to spare; on a machine whose cores the
/// applications already spin on, it takes their CPU instead: on this
/// 2-core machine perftest's 64-byte write latency was 6.1 us with 0,
/// 16.3 us with 20 and 57.4 us with 100 (docs/benchmarks.md).
fn spin_time() -> Duration {
    let us = std::env::var("SOFTCARD_RDMA_SPIN_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_micros(us)
}

/// The thread: work, then sleep until a datagram, a doorbell or a timer.
fn run(
    engine: &Mutex<Engine>,
    stop: &AtomicBool,
    mut hook: Option<Box<dyn Hook>>,
    doorbell: Option<&std::os::fd::OwnedFd>,
) -> io::Result<()> {
    let fd = lock(engine).wait_fd().as_raw_fd();
    let bell = doorbell.map(AsRawFd::as_raw_fd);
    if let Some(h) = hook.as_mut() {
        h.started();
    }
    let spin = if hook.is_some() {
        spin_time()
    } else {
        Duration::ZERO
    };
    // Since when the thread has found nothing to do.
    let mut idle: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let (busy, spun, sleep) = {
            let mut e = lock(engine);
            // What is there now, a batch at a time, letting the
            // application in between batches.
            let mut busy = e.poll(Duration::ZERO)?;
            if let Some(h) = hook.as_mut() {
                busy |= h.work(&mut e);
            }
            let spun = !busy && idle.get_or_insert_with(Instant::now).elapsed() >= spin;
            if spun {
                if let Some(h) = hook.as_mut() {
                    busy = h.sleeping(&mut e);
                }
            }
            (
                busy,
                spun,
                e.next_wakeup().unwrap_or(MAX_SLEEP).min(MAX_SLEEP),
            )
        };
        if busy {
            idle = None;
            if let Some(h) = hook.as_mut() {
                h.awake();
            }
            std::thread::yield_now();
        } else if !spun {
            std::hint::spin_loop();
        } else if !sleep.is_zero() {
            sleep_on2(fd, bell, sleep)?;
            if let Some(b) = doorbell {
                crate::shm::drain(b);
            }
            if let Some(h) = hook.as_mut() {
                h.awake();
            }
            idle = None;
        }
    }
    Ok(())
}

/// Sleeps until `fd` is readable or `timeout` passes; true if readable.
fn sleep_on(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    sleep_on2(fd, None, timeout)
}

/// Sleeps until `fd` or `other` is readable or `timeout` passes; true if
/// one is.
fn sleep_on2(fd: RawFd, other: Option<RawFd>, timeout: Duration) -> io::Result<bool> {
    let mut pfd = [fd, other.unwrap_or(-1)].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: two valid pollfds (a negative fd is ignored) and a valid
    // timespec, all live for the call; no signal mask.
    let n = unsafe { libc::ppoll(pfd.as_mut_ptr(), 2, &ts, std::ptr::null()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A thread that stops on an engine error wakes its waiters, on the
    /// default queue and on one of their own, with that error, instead of
    /// leaving them asleep until their timeouts; `stop` still reports it.
    #[test]
    fn a_failed_thread_wakes_its_waiters_with_the_error() {
        let ns = softcard_testkit::Netns::new("lo");
        let t = std::thread::spawn(move || {
            ns.enter();
            let mut e = Engine::open(Ipv4Addr::LOCALHOST).expect("engine (needs CAP_NET_RAW)");
            let cq = e.create_cq();
            let p = Arc::new(Progress::spawn(e).unwrap());
            assert!(p.error().is_none());
            assert!(!p.wait_cq(Duration::from_millis(10)).unwrap());
            let waiter = {
                let p = p.clone();
                // Unwoken, this wait would end in Ok(false) at its
                // timeout.
                std::thread::spawn(move || p.wait_cq_of(cq, Duration::from_secs(5)))
            };
            std::thread::sleep(Duration::from_millis(50));
            p.lock().fail_poll = Some(io::ErrorKind::BrokenPipe);
            let err = waiter
                .join()
                .unwrap()
                .expect_err("the waiter slept through the thread's end");
            assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
            assert!(err.to_string().contains("injected poll failure"), "{err}");
            assert_eq!(
                p.wait_cq(Duration::from_secs(60)).unwrap_err().kind(),
                io::ErrorKind::BrokenPipe
            );
            let p = Arc::try_unwrap(p).unwrap();
            assert_eq!(p.stop().unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        });
        t.join().unwrap();
    }
}
