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

/// An engine driven by its own thread.
#[derive(Debug)]
pub struct Progress {
    engine: Arc<Mutex<Engine>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
    cq_fd: RawFd,
}

impl Progress {
    /// Starts driving `engine` on a new thread.
    pub fn spawn(mut engine: Engine) -> io::Result<Self> {
        let cq_fd = engine.cq_eventfd()?.as_raw_fd();
        let engine = Arc::new(Mutex::new(engine));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (engine, stop) = (engine.clone(), stop.clone());
            std::thread::Builder::new()
                .name("rdma-progress".into())
                .spawn(move || run(&engine, &stop))?
        };
        Ok(Progress {
            engine,
            stop,
            thread: Some(thread),
            cq_fd,
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
    /// does.
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

/// The thread: work, then sleep until a datagram or a timer.
fn run(engine: &Mutex<Engine>, stop: &AtomicBool) -> io::Result<()> {
    let fd = lock(engine).wait_fd().as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        let (busy, sleep) = {
            let mut e = lock(engine);
            // What is there now, a batch at a time, letting the
            // application in between batches.
            let busy = e.poll(Duration::ZERO)?;
            (busy, e.next_wakeup().unwrap_or(MAX_SLEEP).min(MAX_SLEEP))
        };
        if busy {
            std::thread::yield_now();
        } else if !sleep.is_zero() {
            sleep_on(fd, sleep)?;
        }
    }
    Ok(())
}

/// Sleeps until `fd` is readable or `timeout` passes; true if readable.
fn sleep_on(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: one valid pollfd and a valid timespec, both live for the
    // call; no signal mask.
    let n = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0)
}
