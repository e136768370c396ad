//! Deadlines for a test's peers: a test whose peer never answers fails
//! with what the peer printed instead of hanging the suite.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Runs `cmd` to its end, or kills it once `limit` has passed. Either way
/// returns what it printed; a killed command's status is the kill's (not
/// success), and its stderr ends with a line that says it was killed.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let (status, stdout, mut stderr, killed) = wait_within(child, limit);
    if killed {
        stderr.extend_from_slice(format!("\n[test: killed after {limit:?}]\n").as_bytes());
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Waits for `child` (whose stdout and stderr, where piped, are read to
/// their end) until `limit`, then kills it. Returns its status, what it
/// printed, and whether it was killed.
pub fn wait_within(mut child: Child, limit: Duration) -> (ExitStatus, Vec<u8>, Vec<u8>, bool) {
    fn drain<R: Read + Send + 'static>(r: Option<R>) -> JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let mut killed = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for a child") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            killed = true;
            break child.wait().expect("wait for a killed child");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
        killed,
    )
}

/// Makes `accept` on `listener` (and reads on the connections it accepts,
/// which inherit the option) fail with `WouldBlock` after `limit`, so a
/// test whose guest died reports it instead of waiting forever.
pub fn limit_accept(listener: &std::net::TcpListener, limit: Duration) {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(limit.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(limit.subsec_micros()),
    };
    // SAFETY: setsockopt on a valid socket fd with a timeval of the size
    // given; Linux applies SO_RCVTIMEO to accept too.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
}
