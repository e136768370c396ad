//! Registering an application's own memory: the pages of a region are
//! moved onto memfds (as FreeFlow does), so that the card daemon maps the
//! very pages the application reads and writes. No copy on the data path:
//! the daemon places received data where the application looks, and sends
//! from where it wrote.
//!
//! Registering `addr..addr+len`:
//! 1. The pages it touches are found in `/proc/self/maps`. Pages already
//!    on one of this library's memfds (an earlier registration) are used
//!    as they are.
//! 2. Other pages (private memory: heap, `mmap`, stack) get a new sealed
//!    memfd: their bytes are copied into it, and it is mapped over them
//!    (`MAP_FIXED`) in one step, with their protection.
//! 3. The daemon gets the memfds and where each piece lies in them, and
//!    maps the pieces as one range.
//!
//! System V shared memory (UCX's huge-page memory pools, perftest's
//! `--use_hugepages`) is not moved: the piece names the mapping, and the
//! card opens the segment itself (softcard-rdma's `service::segment`).
//!
//! Limits (docs/rdma.md): the copy and the move are not atomic with other
//! threads writing those pages meanwhile (registration is a control path;
//! applications do not write a buffer they are registering); other memory
//! shared with another process, or a file mapping, cannot be registered
//! (`EOPNOTSUPP`): moving it would break that sharing; pages moved stay on
//! memfds after deregistration; after `fork` the child shares them with
//! the parent instead of copying them.

use std::collections::HashMap;
use std::ffi::c_int;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use softcard_rdma::shm;

/// The name the library's memfds carry (seen in `/proc/self/maps`).
const NAME: &str = "softcard-verbs-mr";

/// This process's memfds, by inode.
static MEMFDS: Mutex<Option<HashMap<u64, Arc<OwnedFd>>>> = Mutex::new(None);

/// Where a piece of a registration lives.
#[derive(Debug)]
pub(crate) enum Source {
    /// One of this library's memfds, handed to the card.
    Memfd(Arc<OwnedFd>),
    /// The System V segment mapped at `start..end` (its maps line), which
    /// the card opens itself.
    Segment { start: usize, end: usize },
}

/// A piece of a registration: `len` bytes from `offset` of its source.
#[derive(Debug)]
pub(crate) struct Piece {
    pub source: Source,
    pub offset: u64,
    pub len: usize,
}

/// One line of `/proc/self/maps`.
struct Line {
    start: usize,
    end: usize,
    read: bool,
    write: bool,
    exec: bool,
    shared: bool,
    offset: u64,
    inode: u64,
    path: String,
}

fn maps() -> Result<Vec<Line>, c_int> {
    let text = std::fs::read_to_string("/proc/self/maps").map_err(|_| libc::EFAULT)?;
    let mut out = Vec::new();
    for l in text.lines() {
        let mut w = l.splitn(6, ' ');
        let (Some(range), Some(perms), Some(off), Some(_dev), Some(inode)) =
            (w.next(), w.next(), w.next(), w.next(), w.next())
        else {
            continue;
        };
        let path = w.next().unwrap_or("").trim_start().to_owned();
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let p = perms.as_bytes();
        out.push(Line {
            start: usize::from_str_radix(s, 16).map_err(|_| libc::EFAULT)?,
            end: usize::from_str_radix(e, 16).map_err(|_| libc::EFAULT)?,
            read: p.first() == Some(&b'r'),
            write: p.get(1) == Some(&b'w'),
            exec: p.get(2) == Some(&b'x'),
            shared: p.get(3) == Some(&b's'),
            offset: u64::from_str_radix(off, 16).map_err(|_| libc::EFAULT)?,
            inode: inode.parse().unwrap_or(0),
            path,
        });
    }
    Ok(out)
}

/// Moves `start..end` (pages of one private mapping) onto a new memfd.
fn move_onto_memfd(l: &Line, start: usize, end: usize) -> Result<(u64, Arc<OwnedFd>), c_int> {
    let len = end - start;
    let fd = shm::sealed_memfd(NAME, len).map_err(|_| libc::ENOMEM)?;
    let tmp = shm::Mapping::map(fd.as_fd(), 0, len).map_err(|_| libc::ENOMEM)?;
    // SAFETY: `start..end` is readable memory of this process (its maps
    // line says so) and `tmp` is a fresh mapping of the same length.
    unsafe { std::ptr::copy_nonoverlapping(start as *const u8, tmp.as_ptr(), len) };
    let mut prot = rustix::mm::ProtFlags::empty();
    prot.set(rustix::mm::ProtFlags::READ, l.read);
    prot.set(rustix::mm::ProtFlags::WRITE, l.write);
    prot.set(rustix::mm::ProtFlags::EXEC, l.exec);
    // SAFETY: maps the memfd, holding a copy of those very bytes, over the
    // application's pages in one step (MAP_FIXED replaces exactly that
    // range, which the application owns and which stays valid memory with
    // the same contents and protection).
    unsafe {
        rustix::mm::mmap(
            start as *mut _,
            len,
            prot,
            rustix::mm::MapFlags::SHARED | rustix::mm::MapFlags::FIXED,
            fd.as_fd(),
            0,
        )
        .map_err(|e| e.raw_os_error())?;
    }
    drop(tmp);
    let inode = rustix::fs::fstat(&fd).map_err(|e| e.raw_os_error())?.st_ino;
    Ok((inode, Arc::new(fd)))
}

/// The memfd pieces `addr..addr+len`'s pages live in, moving them there
/// first where they do not yet.
pub(crate) fn share(addr: usize, len: usize) -> Result<Vec<Piece>, c_int> {
    let page = shm::page_size();
    if len == 0 {
        return Err(libc::EINVAL);
    }
    let start = addr & !(page - 1);
    let end = addr
        .checked_add(len)
        .map(|e| e.next_multiple_of(page))
        .ok_or(libc::EINVAL)?;
    let mut table = MEMFDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let table = table.get_or_insert_with(HashMap::new);
    let lines = maps()?;
    let prefix = format!("/memfd:{NAME}");
    let mut pieces = Vec::new();
    let mut at = start;
    for l in lines.iter().filter(|l| l.end > start && l.start < end) {
        if l.start > at {
            return Err(libc::EFAULT);
        }
        let (s, e) = (at, l.end.min(end));
        if l.shared && l.path.starts_with(&prefix) && table.contains_key(&l.inode) {
            pieces.push(Piece {
                source: Source::Memfd(table[&l.inode].clone()),
                offset: l.offset + (s - l.start) as u64,
                len: e - s,
            });
        } else if l.shared && l.path.starts_with("/SYSV") {
            // The card checks the rest (read-write, still this process's).
            pieces.push(Piece {
                source: Source::Segment {
                    start: l.start,
                    end: l.end,
                },
                offset: l.offset + (s - l.start) as u64,
                len: e - s,
            });
        } else if l.shared || !(l.path.is_empty() || l.path.starts_with('[')) {
            // Shared memory or a file: moving it would break what it is.
            return Err(libc::EOPNOTSUPP);
        } else if !l.read {
            return Err(libc::EFAULT);
        } else {
            let (inode, fd) = move_onto_memfd(l, s, e)?;
            table.insert(inode, fd.clone());
            pieces.push(Piece {
                source: Source::Memfd(fd),
                offset: 0,
                len: e - s,
            });
        }
        at = e;
        if at >= end {
            break;
        }
    }
    if at < end {
        return Err(libc::EFAULT);
    }
    // Forget memfds no mapping uses any more (their memory was unmapped).
    let live: std::collections::HashSet<u64> = lines
        .iter()
        .map(|l| l.inode)
        .chain(pieces.iter().filter_map(|p| match &p.source {
            Source::Memfd(fd) => rustix::fs::fstat(&**fd).ok().map(|s| s.st_ino),
            Source::Segment { .. } => None,
        }))
        .collect();
    table.retain(|inode, _| live.contains(inode));
    let memfds = pieces
        .iter()
        .filter(|p| matches!(p.source, Source::Memfd(_)))
        .count();
    if memfds > shm::MAX_FDS {
        return Err(libc::ENOMEM);
    }
    Ok(pieces)
}
