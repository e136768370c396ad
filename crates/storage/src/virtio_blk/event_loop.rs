//! One epoll thread per virtqueue: it waits for the driver's kicks, the
//! device's completions, the throttle timer and the worker's own resume
//! event, and hands each to the backend ([`BlkBackend::handle_event`]).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::error;
use vhost_user_backend::{VhostUserBackend, VringMutex, VringT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{BlkBackend, Mem};

/// Event id of the driver's kick (the backend's "queue 0 of this thread").
pub(crate) const KICK: u64 = 0;

/// The epoll set of one queue's thread.
#[derive(Debug)]
pub(crate) struct EventLoop {
    epoll: Epoll,
    exit: EventFd,
    exit_id: u64,
}

impl EventLoop {
    /// Starts the thread serving queue `queue` of `backend`.
    pub(crate) fn spawn(
        backend: BlkBackend,
        vring: VringMutex<Mem>,
        queue: usize,
    ) -> io::Result<(Arc<EventLoop>, JoinHandle<()>)> {
        let exit_id = backend.num_queues() as u64;
        let ev = Arc::new(EventLoop {
            epoll: Epoll::new()?,
            exit: EventFd::new(EFD_NONBLOCK)?,
            exit_id,
        });
        ev.add(ev.exit.as_raw_fd(), exit_id)?;
        let me = ev.clone();
        let thread = std::thread::Builder::new()
            .name("vring_worker".into())
            .spawn(move || {
                crate::placement::place_this_worker();
                me.run(&backend, &vring, queue)
            })?;
        Ok((ev, thread))
    }

    /// Watches `fd` for input, reported as event `id`.
    pub(crate) fn add(&self, fd: RawFd, id: u64) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, id))
    }

    /// Stops watching `fd`.
    pub(crate) fn remove(&self, fd: RawFd, id: u64) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            fd,
            EpollEvent::new(EventSet::IN, id),
        );
    }

    /// Asks the thread to return.
    pub(crate) fn exit(&self) {
        let _ = self.exit.write(1);
    }

    fn run(&self, backend: &BlkBackend, vring: &VringMutex<Mem>, queue: usize) {
        let mut events = vec![EpollEvent::default(); 8];
        let vrings = std::slice::from_ref(vring);
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("queue {queue}: epoll: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let id = ev.data();
                if id == self.exit_id {
                    return;
                }
                if id == KICK {
                    // A kick on a disabled ring waits for the ring's
                    // enabling (which re-arms the kick fd).
                    match vring.read_kick() {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => {
                            error!("queue {queue}: kick: {e}");
                            continue;
                        }
                    }
                }
                let Ok(id) = u16::try_from(id) else { continue };
                let set = EventSet::from_bits_truncate(ev.events);
                if let Err(e) = backend.handle_event(id, set, vrings, queue) {
                    error!("queue {queue}: {e}");
                }
            }
        }
    }
}
