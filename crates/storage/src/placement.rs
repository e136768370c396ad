//! Where the vhost-user-blk queue workers run.
//!
//! A queue worker polls its ring while there is work, and a driver that
//! sleeps between answers is woken by it. Left to the scheduler, the two
//! trade CPUs: a woken driver may land on the CPU the worker spins on and
//! wait for it, and a halted vCPU may be the one to wake. On the 2-vCPU
//! machines here, 4k reads at depth 1 with libblkio's sleeping client went
//! from 54-59k to 93-125k I/Os a second (p50 14 us to 4-5 us) when the
//! worker was pinned to one CPU and the client to the other
//! (docs/benchmarks.md, session 14). SPDK pins its reactors the same way
//! (`-m`), and QEMU's iothreads can be.
//!
//! The card's operator names the CPUs (`queue_cpus` in the daemon's
//! configuration); each worker started after that is pinned to the next
//! of them in turn. Unset, workers run wherever the scheduler puts them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

use log::warn;

static CPUS: RwLock<Vec<usize>> = RwLock::new(Vec::new());
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The CPUs queue workers are pinned to from now on (empty: none).
/// Fails, changing nothing, on a CPU this process may not run on.
pub fn set_queue_cpus(cpus: &[usize]) -> Result<(), String> {
    let allowed = allowed_cpus().ok_or("cannot read this process's CPU affinity")?;
    if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
        return Err(format!(
            "queue CPU {c} is not one this process may run on ({allowed:?})"
        ));
    }
    *CPUS.write().unwrap_or_else(|e| e.into_inner()) = cpus.to_vec();
    Ok(())
}

/// The CPUs queue workers are pinned to (empty: none).
pub fn queue_cpus() -> Vec<usize> {
    CPUS.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Pins the calling thread (a new queue worker) to the next of the CPUs
/// set, if any.
pub(crate) fn place_this_worker() {
    let cpus = queue_cpus();
    if cpus.is_empty() {
        return;
    }
    let cpu = cpus[NEXT.fetch_add(1, Ordering::Relaxed) % cpus.len()];
    if let Err(e) = pin(cpu) {
        warn!("queue worker: pinning to CPU {cpu}: {e}");
    }
}

fn pin(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` outlives the call and its size is passed with it.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: as in `pin`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` outlives the call and its size is passed with it.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return None;
    }
    // SAFETY: `set` was filled in by sched_getaffinity; each index is below
    // CPU_SETSIZE.
    Some(
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn my_cpu_affinity() -> Vec<usize> {
        allowed_cpus().expect("affinity")
    }

    #[test]
    fn workers_go_to_the_cpus_set_and_bad_cpus_are_refused() {
        let allowed = my_cpu_affinity();
        let last = *allowed.last().expect("a CPU");
        assert!(set_queue_cpus(&[libc::CPU_SETSIZE as usize + 1]).is_err());
        assert!(queue_cpus().is_empty(), "a refused set changes nothing");
        set_queue_cpus(&[last]).expect("an allowed CPU");
        let placed = std::thread::spawn(|| {
            place_this_worker();
            my_cpu_affinity()
        })
        .join()
        .expect("thread");
        assert_eq!(placed, vec![last]);
        set_queue_cpus(&[]).expect("unset");
        let free = std::thread::spawn(|| {
            place_this_worker();
            my_cpu_affinity()
        })
        .join()
        .expect("thread");
        assert_eq!(free, allowed);
    }
}
