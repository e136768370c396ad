//! An open device's session with the card daemon: one control request
//! and its answer at a time, descriptors both ways (see
//! `softcard_rdma::service` for the protocol).

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;

use softcard_rdma::service::PROTOCOL;
use softcard_rdma::shm;

/// A session on one device.
#[derive(Debug)]
pub(crate) struct Conn {
    sock: Mutex<UnixStream>,
}

/// Whether the library says why the card refused a request
/// (`SOFTCARD_VERBS_DEBUG=1`): verbs itself reports only an errno.
fn debug() -> bool {
    std::env::var_os("SOFTCARD_VERBS_DEBUG").is_some_and(|v| v != "0")
}

impl Conn {
    /// Opens device `name` on the control socket at `path`; returns the
    /// session and the device's doorbell.
    pub fn open(path: &Path, name: &str) -> io::Result<(Self, OwnedFd)> {
        let sock = UnixStream::connect(path)?;
        let c = Conn {
            sock: Mutex::new(sock),
        };
        let (words, mut fds) = c
            .call(&format!("OPEN {name} {PROTOCOL}"), &[])
            .map_err(io::Error::from_raw_os_error)?;
        if !words.is_empty() || fds.len() != 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the card's OPEN answer",
            ));
        }
        Ok((c, fds.pop().expect("one")))
    }

    /// Sends `line` with `fds`; the answer's words after `OK` and its
    /// descriptors, or the errno the card refused it with (`EIO` if the
    /// card is gone).
    pub fn call(
        &self,
        line: &str,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Vec<String>, Vec<OwnedFd>), c_int> {
        let sock = self
            .sock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let gone = |e: io::Error| {
            if debug() {
                eprintln!("softcard verbs: the card's control socket: {e}");
            }
            libc::EIO
        };
        shm::send_with_fds(sock.as_fd(), format!("{line}\n").as_bytes(), fds).map_err(gone)?;
        let mut buf = Vec::new();
        let mut got = Vec::new();
        let mut chunk = [0u8; 512];
        while !buf.ends_with(b"\n") {
            let n = shm::recv_with_fds(sock.as_fd(), &mut chunk, &mut got).map_err(gone)?;
            if n == 0 {
                return Err(gone(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&buf);
        let mut w = text.split_ascii_whitespace();
        match w.next() {
            Some("OK") => Ok((w.map(str::to_owned).collect(), got)),
            Some("ERR") => {
                let errno = w.next().and_then(|e| e.parse().ok()).unwrap_or(libc::EIO);
                if debug() {
                    let verb = line.split(' ').next().unwrap_or("");
                    eprintln!("softcard verbs: {verb}: {}", text.trim_end());
                }
                Err(errno)
            }
            _ => Err(gone(io::Error::new(
                io::ErrorKind::InvalidData,
                text.trim_end().to_owned(),
            ))),
        }
    }
}

/// Word `i` of an answer as a number.
pub(crate) fn word<T: std::str::FromStr>(w: &[String], i: usize) -> Result<T, c_int> {
    w.get(i).and_then(|s| s.parse().ok()).ok_or(libc::EIO)
}
