//! The listening sockets of the interfaces: bound here, or inherited from
//! the card process this one replaces (`softcard upgrade`), and left alone
//! when handed on. A thread waiting for a client is woken by an event of
//! its own, never by shutting the socket, which a successor may share.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use vmm_sys_util::eventfd::EventFd;

use crate::virtio_blk::BlkError;

/// Listens on `socket`: the inherited listener when there is one, else a
/// new one, replacing a stale socket file (never another kind of file, nor
/// a socket some process listens on).
pub(crate) fn bind_or_adopt(
    socket: &Path,
    inherited: Option<UnixListener>,
) -> Result<UnixListener, BlkError> {
    let listen_err = |reason: String| BlkError::Listen {
        path: socket.display().to_string(),
        reason,
    };
    if let Some(l) = inherited {
        // The predecessor may have left it non-blocking.
        l.set_nonblocking(false)
            .map_err(|e| listen_err(e.to_string()))?;
        return Ok(l);
    }
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(listen_err(
                "the path exists and is not a socket; refusing to replace it".into(),
            ));
        }
        if UnixStream::connect(socket).is_ok() {
            return Err(listen_err(
                "another process is listening on this socket".into(),
            ));
        }
        std::fs::remove_file(socket).map_err(|e| listen_err(e.to_string()))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| listen_err(e.to_string()))?;
    }
    UnixListener::bind(socket).map_err(|e| listen_err(e.to_string()))
}

/// A stop event for a thread that waits for clients.
#[derive(Debug)]
pub(crate) struct Wake(EventFd);

impl Wake {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Wake(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?))
    }

    /// Wakes the waiting thread (and every later wait).
    pub(crate) fn wake(&self) {
        let _ = self.0.write(1);
    }

    /// Sleeps for `d` unless the event fires first (false).
    pub(crate) fn sleep(&self, d: std::time::Duration) -> bool {
        let mut fd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the call.
        let n = unsafe { libc::poll(&mut fd, 1, ms) };
        !(n > 0 && fd.revents != 0)
    }

    /// Blocks until `listener` has a client waiting (true) or the event
    /// fired (false).
    pub(crate) fn wait_for_client(&self, listener: &impl AsRawFd) -> bool {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a valid array of two pollfd for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return false;
            }
            if fds[1].revents != 0 {
                return false;
            }
            if fds[0].revents != 0 {
                return true;
            }
        }
    }
}
