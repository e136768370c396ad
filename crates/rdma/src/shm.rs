//! Shared memory between the card daemon and applications: sealed memfds,
//! their mappings, and passing descriptors over the control socket.
//!
//! Whoever maps memory another process may resize checks the seals
//! first: a memfd that can still shrink could be truncated under the
//! mapping, and touching it would then kill the daemon with `SIGBUS`.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The page size every mapping is a multiple of.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// A new memfd of `len` bytes (zeroed) whose size is sealed, so that the
/// process it is shared with may map it without fear of truncation.
pub fn sealed_memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, len as u64)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// The size of a memfd that cannot shrink, or an error saying why it is
/// not one (another kind of file, or no `F_SEAL_SHRINK`).
pub fn sealed_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let seals = rustix::fs::fcntl_get_seals(fd)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not a memfd (no seals)"))?;
    if !seals.contains(SealFlags::SHRINK) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the memfd may shrink (F_SEAL_SHRINK is not set)",
        ));
    }
    u64::try_from(rustix::fs::fstat(fd)?.st_size)
        .map_err(|_| io::Error::other("a negative file size"))
}

/// A shared, read-write mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory; every access goes through raw
// pointers (volatile or atomic) or through slices whose users accept that
// the other process may change the bytes at any time.
unsafe impl Send for Mapping {}
// SAFETY: as for Send.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from `offset` (both page multiples,
    /// checked against the file's size by the caller).
    pub fn map(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: a fresh mapping at an address the kernel picks; nothing
        // else refers to that range.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                offset,
            )?
        };
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?,
            len,
        })
    }

    /// Reserves `len` bytes of address space (no access) that pieces are
    /// then mapped into with [`Mapping::map_piece`], so that memory made
    /// of several files is one contiguous range.
    pub fn reserve(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: a fresh anonymous mapping at an address the kernel picks.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )?
        };
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?,
            len,
        })
    }

    /// [`Mapping::reserve`] at an address that leaves `phase` modulo
    /// `align` (a power of two; `phase` a page multiple below it), so that
    /// pieces of huge pages land on huge-page boundaries.
    pub fn reserve_aligned(len: usize, align: usize, phase: usize) -> io::Result<Self> {
        let page = page_size();
        if align <= page {
            return Self::reserve(len);
        }
        if !align.is_power_of_two() || phase >= align || !phase.is_multiple_of(page) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an alignment that is not a power of two",
            ));
        }
        let over = len
            .checked_add(align)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "mapping too long"))?;
        let wide = Self::reserve(over)?;
        let base = wide.ptr.as_ptr() as usize;
        let start = base + (phase.wrapping_sub(base) & (align - 1));
        let (head, tail) = (start - base, over - (start - base) - len);
        let ptr = wide.ptr;
        std::mem::forget(wide);
        // SAFETY: `head` bytes before and `tail` bytes after the aligned
        // range are our own reservation's (page multiples: base, align and
        // len are), unmapped once here and never used.
        unsafe {
            if head > 0 {
                let _ = rustix::mm::munmap(ptr.as_ptr().cast(), head);
            }
            if tail > 0 {
                let _ = rustix::mm::munmap(ptr.as_ptr().add(head + len).cast(), tail);
            }
        }
        Ok(Self {
            // SAFETY: inside the reservation, so not null.
            ptr: unsafe { NonNull::new_unchecked(ptr.as_ptr().add(head)) },
            len,
        })
    }

    /// Maps `len` bytes of `fd` from `offset` at `at` bytes into this
    /// reservation (all page multiples; the range must lie inside it).
    pub fn map_piece(
        &mut self,
        at: usize,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        if at.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a piece outside its reservation",
            ));
        }
        // SAFETY: the target lies inside our own reservation (checked),
        // which nothing else refers to; MAP_FIXED replaces only it.
        unsafe {
            rustix::mm::mmap(
                self.ptr.as_ptr().add(at).cast(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                fd,
                offset,
            )?;
        }
        Ok(())
    }

    /// The mapping's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: mappings have a length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The 32-bit atomic at `offset` (4-byte aligned, inside).
    pub fn atomic(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset.is_multiple_of(4) && offset + 4 <= self.len,
            "atomic at {offset}"
        );
        // SAFETY: aligned and inside the mapping (checked), which lives as
        // long as the returned reference; AtomicU32 has u32's layout and
        // every bit pattern is valid.
        unsafe { &*self.ptr.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    /// A copy of the `T` at `offset`: the other side may change the bytes
    /// at any time, so they are read once and then checked.
    ///
    /// `T` must be plain data (integers and arrays of them) for which
    /// every bit pattern is valid.
    pub fn read<T: Copy>(&self, offset: usize) -> T {
        assert!(
            offset
                .checked_add(size_of::<T>())
                .is_some_and(|e| e <= self.len),
            "read past the mapping"
        );
        // SAFETY: inside the mapping (checked); read_unaligned copies the
        // bytes whatever the alignment; T is plain data (documented
        // contract of this function, upheld by the ring types).
        unsafe { self.ptr.as_ptr().add(offset).cast::<T>().read_unaligned() }
    }

    /// Stores `value` at `offset`.
    pub fn write<T: Copy>(&self, offset: usize, value: T) {
        assert!(
            offset
                .checked_add(size_of::<T>())
                .is_some_and(|e| e <= self.len),
            "write past the mapping"
        );
        // SAFETY: inside the mapping (checked); the memory is shared plain
        // bytes that no Rust reference covers.
        unsafe {
            self.ptr
                .as_ptr()
                .add(offset)
                .cast::<T>()
                .write_unaligned(value);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; nothing refers to it
        // after drop.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The most descriptors one message carries.
pub const MAX_FDS: usize = 64;

/// Sends `bytes` with `fds` attached, in one message.
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors",
        ));
    }
    let mut sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // The descriptors went with the first byte; the rest (rare: a full
    // socket buffer) follows plain.
    while sent < bytes.len() {
        sent += rustix::net::send(sock, &bytes[sent..], SendFlags::NOSIGNAL)?;
    }
    Ok(())
}

/// Receives what is there (up to `buf`'s length), with the descriptors
/// that came with it appended to `fds`; 0 bytes is the end of the stream.
/// Descriptors past `MAX_FDS` in one message are closed by the kernel
/// (truncated control data) and the message is refused.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many descriptors in one message",
        ));
    }
    Ok(got.bytes)
}

/// A fresh eventfd (non-blocking).
pub fn eventfd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )?)
}

/// Adds one to an eventfd's counter (a full counter is already readable).
pub fn ring(fd: impl AsFd) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Resets an eventfd's counter.
pub fn drain(fd: impl AsFd) {
    let mut b = [0u8; 8];
    let _ = rustix::io::read(fd, &mut b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_sealed_memfd_is_accepted_and_an_unsealed_one_refused() {
        let fd = sealed_memfd("t", 8192).unwrap();
        assert_eq!(sealed_size(fd.as_fd()).unwrap(), 8192);
        assert!(
            rustix::fs::ftruncate(&fd, 4096).is_err(),
            "a sealed memfd shrank"
        );
        let open = rustix::fs::memfd_create("u", MemfdFlags::CLOEXEC).unwrap();
        assert!(sealed_size(open.as_fd()).is_err());
        let file = tempfile::tempfile().unwrap();
        assert!(sealed_size(file.as_fd()).is_err());
    }

    #[test]
    fn two_mappings_of_one_memfd_share_bytes_and_pieces_make_one_range() {
        let page = page_size();
        let a = sealed_memfd("a", 2 * page).unwrap();
        let b = sealed_memfd("b", page).unwrap();
        let m1 = Mapping::map(a.as_fd(), 0, 2 * page).unwrap();
        m1.write(page + 8, 0xdead_beef_u32);
        let mut r = Mapping::reserve(2 * page).unwrap();
        r.map_piece(0, b.as_fd(), 0, page).unwrap();
        r.map_piece(page, a.as_fd(), page as u64, page).unwrap();
        assert_eq!(r.read::<u32>(page + 8), 0xdead_beef);
        r.write(0, 7u64);
        let m2 = Mapping::map(b.as_fd(), 0, page).unwrap();
        assert_eq!(m2.read::<u64>(0), 7);
        assert!(r.map_piece(page, a.as_fd(), 0, 2 * page).is_err());
    }

    #[test]
    fn an_aligned_reservation_starts_on_its_alignment_and_takes_pieces() {
        let page = page_size();
        let align = 2 << 20;
        for _ in 0..4 {
            let mut r = Mapping::reserve_aligned(3 * page, align, 5 * page).unwrap();
            assert_eq!(r.as_ptr() as usize % align, 5 * page);
            let a = sealed_memfd("a", page).unwrap();
            r.map_piece(2 * page, a.as_fd(), 0, page).unwrap();
            r.write(2 * page, 9u32);
            assert_eq!(Mapping::map(a.as_fd(), 0, page).unwrap().read::<u32>(0), 9);
        }
        assert!(Mapping::reserve_aligned(page, 3 * page, 0).is_err());
        assert!(Mapping::reserve_aligned(page, align, align).is_err());
    }

    #[test]
    fn descriptors_travel_with_their_message() {
        let (x, y) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = eventfd().unwrap();
        send_with_fds(x.as_fd(), b"hello\n", &[e.as_fd()]).unwrap();
        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        let n = recv_with_fds(y.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"hello\n");
        assert_eq!(fds.len(), 1);
        ring(&e);
        let mut c = [0u8; 8];
        assert_eq!(rustix::io::read(&fds[0], &mut c).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(c), 1);
    }
}
