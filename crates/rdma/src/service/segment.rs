//! An application's System V shared memory segments, mapped here as they
//! are.
//!
//! Memory regions are normally the application's pages moved onto memfds
//! it hands over. Shared memory cannot be moved (that would break the
//! sharing), and System V segments have no descriptor to hand over: UCX
//! puts its memory pools in huge-page segments (`shmget(SHM_HUGETLB)`)
//! wherever huge pages are free, perftest's `--use_hugepages` does the
//! same. For those the library names the mapping (its range in the
//! application's `/proc/PID/maps`), and the card opens the segment itself
//! through `/proc/PID/map_files`, after checking, from the kernel's own
//! account of that process, that the range is a read-write System V
//! mapping of the application that connected (its pid still that process,
//! its user unchanged). A segment cannot be resized, so mapping it is as
//! safe as mapping a sealed memfd.
//!
//! Opening another process's `map_files` needs `CAP_CHECKPOINT_RESTORE`
//! (or `CAP_SYS_ADMIN`); without it the registration is refused with
//! `EPERM` and a message that says so.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::fs::{Mode, OFlags};

use super::session::Refusal;

/// The process at the other end of a session's connection, as it was when
/// it connected.
#[derive(Debug)]
pub(super) struct Peer {
    pid: i32,
    uid: u32,
    /// Readable once that process has exited: its pid is then no longer
    /// its own.
    pidfd: OwnedFd,
}

impl Peer {
    /// The process that opened `conn` (SO_PEERCRED), pinned by a pidfd.
    pub(super) fn of(conn: &std::os::unix::net::UnixStream) -> io::Result<Self> {
        let cred = rustix::net::sockopt::socket_peercred(conn)?;
        let pidfd = rustix::process::pidfd_open(cred.pid, rustix::process::PidfdFlags::empty())?;
        Ok(Peer {
            pid: cred.pid.as_raw_nonzero().get(),
            uid: cred.uid.as_raw(),
            pidfd,
        })
    }

    fn alive(&self) -> bool {
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        matches!(
            poll(&mut fds, Some(&rustix::event::Timespec::default())),
            Ok(0)
        )
    }

    /// Its effective user now, from `/proc/PID/status`.
    fn euid(&self) -> Option<u32> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = status.lines().find(|l| l.starts_with("Uid:"))?;
        line.split_ascii_whitespace().nth(2)?.parse().ok()
    }
}

/// The segment mapped at `start..end` in the peer, opened read-write.
pub(super) fn open(peer: &Peer, start: u64, end: u64) -> Result<OwnedFd, Refusal> {
    let refuse = |errno: i32, why: &str| {
        Refusal(
            errno,
            format!("shared memory at {start:#x}-{end:#x}: {why}"),
        )
    };
    if !peer.alive() {
        return Err(refuse(
            libc::ESRCH,
            "the application that connected has exited",
        ));
    }
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", peer.pid))
        .map_err(|e| refuse(libc::ESRCH, &format!("reading its maps: {e}")))?;
    let range = format!("{start:x}-{end:x}");
    let Some(line) = maps.lines().find(|l| l.split(' ').next() == Some(&range)) else {
        return Err(refuse(libc::EFAULT, "no mapping of exactly that range"));
    };
    // range perms offset dev inode path (the path may hold spaces).
    let fields: Vec<&str> = line.splitn(6, ' ').collect();
    let (perms, inode) = (fields.get(1).copied(), fields.get(4).copied());
    let path = fields.get(5).copied().unwrap_or("").trim_start();
    if !path.starts_with("/SYSV") {
        return Err(refuse(
            libc::EOPNOTSUPP,
            "not a System V segment (other shared memory or a file cannot be registered)",
        ));
    }
    if perms != Some("rw-s") {
        return Err(refuse(libc::EACCES, "the segment is not mapped read-write"));
    }
    let inode: u64 = inode
        .and_then(|i| i.parse().ok())
        .ok_or_else(|| refuse(libc::EFAULT, "no inode in its maps line"))?;
    // After reading the maps: the uid and pid checked last, so that a
    // process that exec'd a set-user-ID program, or died, meanwhile is
    // seen.
    if peer.euid() != Some(peer.uid) {
        return Err(refuse(libc::EPERM, "the application's user has changed"));
    }
    let file = rustix::fs::open(
        format!("/proc/{}/map_files/{range}", peer.pid),
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        if e == rustix::io::Errno::PERM {
            refuse(
                libc::EPERM,
                "opening it needs CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN) for the card",
            )
        } else {
            refuse(e.raw_os_error(), &format!("opening it: {e}"))
        }
    })?;
    if !peer.alive() {
        return Err(refuse(
            libc::ESRCH,
            "the application that connected has exited",
        ));
    }
    let st = rustix::fs::fstat(file.as_fd()).map_err(|e| refuse(e.raw_os_error(), "fstat"))?;
    if st.st_ino != inode {
        return Err(refuse(
            libc::EFAULT,
            "the mapping changed while it was opened",
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A System V segment of `len` bytes attached here (read-only when
    /// asked), marked for removal as UCX does, and where it is mapped.
    fn segment(len: usize, read_only: bool) -> (u64, u64) {
        // SAFETY: plain System V calls; the attach stays for the test.
        unsafe {
            let id = libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600);
            assert!(id >= 0, "shmget: {}", io::Error::last_os_error());
            let flags = if read_only { libc::SHM_RDONLY } else { 0 };
            let at = libc::shmat(id, std::ptr::null(), flags);
            assert_ne!(at as isize, -1, "shmat: {}", io::Error::last_os_error());
            assert_eq!(libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()), 0);
            (at as u64, at as u64 + len as u64)
        }
    }

    fn me() -> Peer {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        Peer::of(&a).expect("own credentials")
    }

    #[test]
    fn a_read_write_segment_of_the_peer_opens_as_that_segment() {
        let (start, end) = segment(2 * 4096, false);
        // SAFETY: the segment is attached read-write at `start`.
        unsafe { (start as *mut u8).add(4096).write(0x7e) };
        let fd = open(&me(), start, end).expect("its own segment");
        let st = rustix::fs::fstat(&fd).expect("fstat");
        assert_eq!(st.st_size, 2 * 4096);
        let m = crate::shm::Mapping::map(fd.as_fd(), 0, 2 * 4096).expect("map");
        // SAFETY: the mapping holds 2 pages.
        let byte = unsafe { m.as_ptr().add(4096).read() };
        assert_eq!(byte, 0x7e, "the same pages");
    }

    #[test]
    fn other_memory_is_refused_with_the_reason() {
        let me = me();
        let (start, end) = segment(4096, true);
        let e = open(&me, start, end).expect_err("read-only");
        assert_eq!(e.0, libc::EACCES, "{}", e.1);
        // A range that is no mapping here (another process's segment
        // would be named so), and the heap.
        let e = open(&me, 0x1000, 0x2000).expect_err("no such mapping");
        assert_eq!(e.0, libc::EFAULT, "{}", e.1);
        let heap = Box::new([0u8; 64]);
        let at = heap.as_ptr() as u64;
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        let line = maps
            .lines()
            .find(|l| {
                let (a, b) = l.split(' ').next().unwrap().split_once('-').unwrap();
                let (a, b) = (
                    u64::from_str_radix(a, 16).unwrap(),
                    u64::from_str_radix(b, 16).unwrap(),
                );
                a <= at && at < b
            })
            .expect("the heap's line");
        let (a, b) = line.split(' ').next().unwrap().split_once('-').unwrap();
        let e = open(
            &me,
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        )
        .expect_err("private memory");
        assert_eq!(e.0, libc::EOPNOTSUPP, "{}", e.1);
    }
}
