//! The memory of a `ram` device: anonymous, populated up front, and in
//! transparent huge pages wherever the kernel can give them.
//!
//! Random 4 KiB requests over a large device touch a new page each time:
//! with 4 KiB pages each is a TLB miss, and in a VM a two-level page walk.
//! Asking for huge pages (`MADV_HUGEPAGE`) before populating is not enough
//! on a machine whose memory is fragmented: populating a 1 GiB device here
//! left 16 % of it in small pages. `MADV_COLLAPSE` (Linux 6.1) then
//! compacts and collapses what is left, synchronously, at start-up.

use std::io;

/// Size of a transparent huge page on x86-64 (and the alignment a mapping
/// needs for its first bytes to be in one).
const HUGE: usize = 2 << 20;

/// Maps `len` bytes of private anonymous memory at a 2 MiB boundary,
/// populates it and asks for huge pages. The caller owns the mapping
/// (`munmap(base, len)`).
pub(super) fn map_populated(len: usize) -> io::Result<*mut u8> {
    let padded = len
        .checked_add(HUGE)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "ram size too large"))?;
    // SAFETY: a new anonymous private mapping touches no existing memory.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            padded,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let head = (HUGE - raw as usize % HUGE) % HUGE;
    let tail = padded - head - len;
    // SAFETY: `head` bytes from the start and `tail` bytes at the end of
    // the mapping just made are cut off; nothing else uses them.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap(raw.cast::<u8>().add(head + len).cast(), tail);
        }
    }
    // SAFETY: `head < HUGE <= padded - len`: inside the mapping.
    let base = unsafe { raw.cast::<u8>().add(head) };
    // SAFETY: advice on the mapping just made; an error (no THP in this
    // kernel) only leaves small pages.
    unsafe { libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE) };
    // SAFETY: populates the mapping just made, touching nothing else.
    if unsafe { libc::madvise(base.cast(), len, libc::MADV_POPULATE_WRITE) } != 0 {
        let e = io::Error::last_os_error();
        // SAFETY: the mapping just made, unmapped once.
        unsafe { libc::munmap(base.cast(), len) };
        return Err(e);
    }
    // SAFETY: collapses the populated mapping just made into huge pages in
    // place (contents kept). It fails (older kernel, no memory to compact
    // into) without changing anything: the device then has small pages.
    if unsafe { libc::madvise(base.cast(), len, libc::MADV_COLLAPSE) } != 0 {
        log::debug!(
            "MADV_COLLAPSE of the ram device: {}",
            io::Error::last_os_error()
        );
    }
    Ok(base)
}

/// Bytes in huge pages of the mapping that holds `base` (the kernel may
/// have merged it with a neighbour of the same kind), from
/// `/proc/self/smaps`; `None` where the file or the mapping is not found.
pub(super) fn huge_bytes(base: *const u8) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let at = base as usize;
    let holds = |header: &str| {
        let range = header.split_whitespace().next()?;
        let (start, end) = range.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        Some(start <= at && at < end)
    };
    let mut lines = smaps.lines().skip_while(|l| holds(l) != Some(true));
    lines.next()?;
    // A mapping's fields ("AnonHugePages:    2048 kB") start with a capital;
    // the next mapping's header with a hex address.
    lines
        .take_while(|l| l.starts_with(|c: char| c.is_ascii_uppercase()))
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_starts_on_a_huge_page_and_holds_its_bytes() {
        let len = 8 << 20;
        let base = map_populated(len).expect("map");
        assert_eq!(base as usize % HUGE, 0);
        // SAFETY: `base..base+len` is the mapping just made, unmapped below.
        unsafe {
            base.write(7);
            base.add(len - 1).write(9);
            assert_eq!((base.read(), base.add(len - 1).read()), (7, 9));
        }
        // The mapping is found in smaps (how much of it is huge depends on
        // the kernel's THP setting and on other tests' mappings merged
        // with it, so only that it is found).
        assert!(huge_bytes(base).is_some(), "mapping listed in smaps");
        // SAFETY: unmapped once; nothing uses it after.
        unsafe { libc::munmap(base.cast(), len) };
    }
}
