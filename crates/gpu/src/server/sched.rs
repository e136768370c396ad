//! Fair sharing of GPU time between sessions.
//!
//! Every submission holds the physical GPU until it completes, and the
//! sessions waiting for it are served in order of the GPU time they have
//! used so far (the smallest first), the way CFS orders threads. A session
//! that arrives late starts at the smallest time of those present, so it
//! gets no credit for the time it was away.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct State {
    busy: bool,
    /// Used GPU time per registered session, in nanoseconds.
    used: BTreeMap<u64, u128>,
    /// Sessions waiting for the GPU.
    waiting: BTreeMap<u64, ()>,
}

/// The GPU time scheduler shared by all sessions of a server.
#[derive(Debug, Default)]
pub struct Scheduler {
    state: Mutex<State>,
    turn: Condvar,
}

impl Scheduler {
    /// Registers a session.
    pub fn join(&self, session: u64) {
        let mut s = self.state.lock().expect("scheduler lock");
        let floor = s.used.values().copied().min().unwrap_or(0);
        s.used.insert(session, floor);
    }

    /// Forgets a session.
    pub fn leave(&self, session: u64) {
        let mut s = self.state.lock().expect("scheduler lock");
        s.used.remove(&session);
        s.waiting.remove(&session);
        drop(s);
        self.turn.notify_all();
    }

    /// Runs `work` (a submission and the wait for it) when it is this
    /// session's turn, and charges the session for the time it took.
    pub fn run<T>(&self, session: u64, work: impl FnOnce() -> T) -> T {
        let mut s = self.state.lock().expect("scheduler lock");
        s.waiting.insert(session, ());
        loop {
            let first = s
                .waiting
                .keys()
                .map(|k| (s.used.get(k).copied().unwrap_or(0), *k))
                .min()
                .map(|(_, k)| k);
            if !s.busy && first == Some(session) {
                break;
            }
            s = self.turn.wait(s).expect("scheduler lock");
        }
        s.waiting.remove(&session);
        s.busy = true;
        drop(s);
        let start = Instant::now();
        let out = work();
        self.charge(session, start.elapsed());
        out
    }

    fn charge(&self, session: u64, took: Duration) {
        let mut s = self.state.lock().expect("scheduler lock");
        if let Some(u) = s.used.get_mut(&session) {
            *u += took.as_nanos();
        }
        s.busy = false;
        drop(s);
        self.turn.notify_all();
    }

    /// GPU time used by `session` so far.
    pub fn used(&self, session: u64) -> Duration {
        let s = self.state.lock().expect("scheduler lock");
        let ns = s.used.get(&session).copied().unwrap_or(0);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_session_with_least_time_goes_first() {
        let s = Arc::new(Scheduler::default());
        s.join(1);
        s.join(2);
        // Session 1 has used 50 ms.
        s.run(1, || std::thread::sleep(Duration::from_millis(50)));
        // Both wait while session 3 holds the GPU; 2 must be served first.
        s.join(3);
        let order = Arc::new(Mutex::new(Vec::new()));
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let s3 = s.clone();
        let holder = std::thread::spawn(move || {
            s3.run(3, || hold_rx.recv().ok());
        });
        std::thread::sleep(Duration::from_millis(20));
        let mut hs = Vec::new();
        for id in [1u64, 2] {
            let (s, order) = (s.clone(), order.clone());
            hs.push(std::thread::spawn(move || {
                s.run(id, || order.lock().unwrap().push(id));
            }));
            std::thread::sleep(Duration::from_millis(20));
        }
        hold_tx.send(()).unwrap();
        holder.join().unwrap();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![2, 1]);
        assert!(s.used(1) >= Duration::from_millis(50));
    }
}
