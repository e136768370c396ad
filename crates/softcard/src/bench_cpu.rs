//! The CPU a benchmark cell's serving side spends, and the medians and
//! ranges of repeated cells.
//!
//! CPU time comes from the kernel's own accounting (`/proc/PID/stat`,
//! user plus system time, which counts a polling thread that spins idle as
//! busy). qemu-storage-daemon is its own process; softcard's card runs in
//! the benchmark's process beside the libblkio client, so its share is the
//! process's time less the client thread's (`/proc/self/task/TID/stat`).
//! The process's figure keeps the time of threads that exit meanwhile.

use anyhow::{Context, Result};

/// Whose CPU time a [`Meter`] reads.
#[derive(Debug, Clone, Copy)]
pub enum Server {
    /// Another process.
    Process(u32),
    /// This process, less the calling (client) thread.
    ThisProcessButMe,
}

/// CPU seconds of one `stat` file: utime + stime.
fn stat_seconds(path: &str) -> Result<f64> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    parse_stat(&s, if hz > 0 { hz as f64 } else { 100.0 })
}

/// utime + stime of a `stat` line, in seconds at `hz` ticks a second.
fn parse_stat(s: &str, hz: f64) -> Result<f64> {
    // The command name (field 2) may hold spaces and parentheses; the
    // fields after its last `)` start at field 3 (state), so utime (14)
    // and stime (15) are the 12th and 13th there.
    let rest = s
        .rsplit_once(')')
        .context("a stat line without a command")?
        .1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        f.get(i)
            .context("a short stat line")?
            .parse::<u64>()
            .context("a stat field that is not a number")
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / hz)
}

fn me() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

fn now(server: Server) -> Result<f64> {
    match server {
        Server::Process(pid) => stat_seconds(&format!("/proc/{pid}/stat")),
        Server::ThisProcessButMe => Ok(stat_seconds("/proc/self/stat")?
            - stat_seconds(&format!("/proc/self/task/{}/stat", me()))?),
    }
}

/// CPU seconds the server spends between [`Meter::start`] and
/// [`Meter::stop`] (called on the same thread).
#[derive(Debug)]
pub struct Meter {
    server: Server,
    started: f64,
}

impl Meter {
    /// Starts reading.
    pub fn start(server: Server) -> Result<Self> {
        Ok(Self {
            server,
            started: now(server)?,
        })
    }

    /// CPU seconds since the start.
    pub fn stop(self) -> Result<f64> {
        Ok((now(self.server)? - self.started).max(0.0))
    }
}

/// CPU seconds the calling thread has run (`CLOCK_THREAD_CPUTIME_ID`,
/// nanosecond accounting rather than `stat`'s ticks).
pub fn thread_cpu_seconds() -> Result<f64> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec the call writes.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context("clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    }
    Ok(t.tv_sec as f64 + t.tv_nsec as f64 / 1e9)
}

/// How many times the calling thread has slept (its voluntary context
/// switches), from `/proc/thread-self/status`.
pub fn sleeps_so_far() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/status")
        .context("reading /proc/thread-self/status")?;
    parse_voluntary_switches(&s)
}

fn parse_voluntary_switches(status: &str) -> Result<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .context("no voluntary_ctxt_switches line")?
        .trim()
        .parse()
        .context("voluntary_ctxt_switches is not a number")
}

/// The median and range of some figures (`NaN` for none).
pub fn median_range(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (median, s[0], s[n - 1])
}

/// What an idle CPU of this machine does, for a benchmark's header: where
/// one side sleeps between requests, its wake-up is part of every figure.
/// In a VM whose idle vCPUs halt at once (`guest_halt_poll_ns` 0), each
/// wake-up is an exit to the hypervisor: about 10 us on the machine of
/// docs/benchmarks.md, against well under 1 us when the guest polls first.
pub(crate) fn idle_policy() -> String {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let driver =
        read("/sys/devices/system/cpu/cpuidle/current_driver").unwrap_or_else(|| "none".to_owned());
    let mut line = format!("{cpus} CPUs, cpuidle driver {driver}");
    if let Some(ns) = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") {
        line.push_str(&format!(", guest_halt_poll_ns {ns}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        assert_eq!(median_range(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(median_range(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert!(median_range(&[]).0.is_nan());
    }

    #[test]
    fn voluntary_switches_from_a_status_file() {
        let status = "Name:\tsoftcard\nState:\tR (running)\nvoluntary_ctxt_switches:\t1234\nnonvoluntary_ctxt_switches:\t56\n";
        assert_eq!(parse_voluntary_switches(status).unwrap(), 1234);
        assert!(parse_voluntary_switches("Name:\tx\n").is_err());
        assert!(parse_voluntary_switches("voluntary_ctxt_switches:\tmany\n").is_err());
        // The calling thread's own file parses.
        assert!(sleeps_so_far().is_ok());
    }

    #[test]
    fn stat_lines_with_odd_command_names() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime ...
        let line = "42 (qemu (x) y) S 1 42 42 0 -1 4194560 10 0 0 0 250 50 0 0 20 0 3";
        assert_eq!(parse_stat(line, 100.0).unwrap(), 3.0);
        assert!(parse_stat("42 (x) S 1 2", 100.0).is_err());
        assert!(parse_stat("no command here", 100.0).is_err());
    }
}
