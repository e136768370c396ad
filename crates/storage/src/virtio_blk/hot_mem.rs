//! Guest memory as the queue worker sees it during one round: a snapshot
//! of the frontend's memory table that remembers the region it found last.
//!
//! A request touches guest memory about ten times (avail ring, descriptors,
//! header, status, used ring) and nearly always in the region of the one
//! before; `vm-memory`'s lookup is a binary search through the regions
//! each time (5-10 % of the worker in `perf` on the memory devices). The
//! view is the same: every address still goes through `find_region` and
//! gets the region that holds it, or none.
//!
//! The worker's own small accesses (request header, status byte, the
//! bounds of data segments) also skip vm-memory's slice iterators when
//! one region holds the whole range, which is checked first; a range over
//! two adjacent regions takes vm-memory's general path.

use std::cell::Cell;
use std::sync::Arc;

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

/// One snapshot of guest memory with a one-entry cache of the region last
/// found. Not `Sync` (the cache is a `Cell`): one queue thread's, for one
/// round of its loop.
pub(crate) struct HotMem<'a> {
    snapshot: &'a Arc<GuestMemoryMmap>,
    last: Cell<Option<&'a GuestRegionMmap>>,
}

impl<'a> HotMem<'a> {
    pub(crate) fn new(snapshot: &'a Arc<GuestMemoryMmap>) -> Self {
        HotMem {
            snapshot,
            last: Cell::new(None),
        }
    }

    /// The snapshot itself, for what must outlive the round (a request
    /// in flight keeps the mappings it points into).
    pub(crate) fn snapshot(&self) -> &'a Arc<GuestMemoryMmap> {
        self.snapshot
    }

    /// The host address of the `len` bytes at `addr` when one region holds
    /// them all; `None` otherwise (a hole, or a range over two regions,
    /// which the general path below handles).
    pub(crate) fn in_one_region(&self, addr: GuestAddress, len: usize) -> Option<*mut u8> {
        let r = self.find_region(addr)?;
        let offset = addr.raw_value() - r.start_addr().raw_value();
        let end = offset.checked_add(u64::try_from(len).ok()?)?;
        if end > r.len() {
            return None;
        }
        r.get_host_address(MemoryRegionAddress(offset)).ok()
    }

    /// Whether the `len` bytes at `addr` are all guest memory: the same
    /// answer as vm-memory's `check_range`, without its walk over slices
    /// when one region holds them (nearly always).
    pub(crate) fn holds(&self, addr: GuestAddress, len: usize) -> bool {
        self.in_one_region(addr, len).is_some() || self.check_range(addr, len)
    }

    /// Reads the few bytes of `dst` (a request header) from `addr`: the
    /// same as `read_slice`, byte by byte from the region's mapping when
    /// one region holds them.
    pub(crate) fn read_small(&self, dst: &mut [u8], addr: GuestAddress) -> bool {
        let Some(host) = self.in_one_region(addr, dst.len()) else {
            return self.read_slice(dst, addr).is_ok();
        };
        for (i, b) in dst.iter_mut().enumerate() {
            // SAFETY: `host..host + dst.len()` lies in one mapped region of
            // the snapshot, which this borrow keeps alive; a volatile read
            // of memory the driver may change meanwhile, as vm-memory's own.
            *b = unsafe { host.add(i).read_volatile() };
        }
        true
    }

    /// Writes one byte (a status byte) at `addr`: the same as `write_obj`,
    /// straight into the region's mapping.
    pub(crate) fn write_byte(&self, v: u8, addr: GuestAddress) -> bool {
        let Some(host) = self.in_one_region(addr, 1) else {
            return false;
        };
        // SAFETY: `host` is one byte inside a mapped region of the
        // snapshot, which this borrow keeps alive; volatile, as above.
        unsafe { host.write_volatile(v) };
        true
    }
}

impl GuestMemoryBackend for HotMem<'_> {
    type R = GuestRegionMmap;

    fn num_regions(&self) -> usize {
        self.snapshot.num_regions()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&GuestRegionMmap> {
        if let Some(r) = self.last.get() {
            if addr >= r.start_addr() && addr <= r.last_addr() {
                return Some(r);
            }
        }
        let snapshot: &GuestMemoryMmap = self.snapshot;
        let r = snapshot.find_region(addr)?;
        self.last.set(Some(r));
        Some(r)
    }

    fn iter(&self) -> impl Iterator<Item = &GuestRegionMmap> {
        self.snapshot.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// Guest memory of regions `(start, length)`.
    fn regions(ranges: &[(u64, usize)]) -> Arc<GuestMemoryMmap> {
        let ranges: Vec<_> = ranges
            .iter()
            .map(|&(start, len)| (GuestAddress(start), len))
            .collect();
        Arc::new(GuestMemoryMmap::from_ranges(&ranges).expect("guest memory"))
    }

    /// Two regions with a hole between them.
    fn two_regions() -> Arc<GuestMemoryMmap> {
        regions(&[(0x1000, 0x1000), (0x10000, 0x2000)])
    }

    #[test]
    fn finds_the_same_regions_as_the_snapshot() {
        let snap = two_regions();
        let hot = HotMem::new(&snap);
        for addr in [
            0u64,
            0xfff,
            0x1000,
            0x1fff,
            0x2000,
            0xffff,
            0x10000,
            0x11fff,
            0x12000,
            0x10000,
            0x1000,
            0x11fff,
            0x1fff,
            0x12000,
            u64::MAX,
        ] {
            let a = GuestAddress(addr);
            let want = snap.find_region(a).map(|r| r.start_addr());
            let got = hot.find_region(a).map(|r| r.start_addr());
            assert_eq!(got, want, "address {addr:#x}");
        }
    }

    #[test]
    fn reads_and_writes_reach_the_snapshot() {
        let snap = two_regions();
        let hot = HotMem::new(&snap);
        hot.write_obj(0xabcd_u16, GuestAddress(0x10ffe))
            .expect("write");
        assert_eq!(
            snap.read_obj::<u16>(GuestAddress(0x10ffe)).expect("read"),
            0xabcd
        );
        // A range that leaves the region ends in the hole after it.
        assert!(hot.write_obj(0u32, GuestAddress(0x1ffe)).is_err());
        assert!(hot.read_obj::<u8>(GuestAddress(0x3000)).is_err());
    }

    /// Two regions that touch (0x1000-0x1fff, 0x2000-0x2fff) and one after
    /// a hole (0x10000-0x11fff).
    fn touching_regions() -> Arc<GuestMemoryMmap> {
        regions(&[(0x1000, 0x1000), (0x2000, 0x1000), (0x10000, 0x2000)])
    }

    #[test]
    fn the_short_paths_agree_with_vm_memory_at_every_edge() {
        let snap = touching_regions();
        for i in 0..0x40u8 {
            snap.write_obj(i, GuestAddress(0x1fe0 + u64::from(i)))
                .expect("fill");
        }
        let edges = [
            0u64,
            0xff8,
            0x1000,
            0x1ff0,
            0x1ff8,
            0x1ffc,
            0x1fff,
            0x2000,
            0x2ff8,
            0x2ffc,
            0x2fff,
            0x3000,
            0xfff8,
            0x10000,
            0x11ff0,
            0x11ffc,
            0x11fff,
            0x12000,
            u64::MAX - 8,
            u64::MAX,
        ];
        for &addr in &edges {
            // A fresh view and a warm one (its cache on another region).
            for warm in [None, Some(0x10000u64), Some(0x1000)] {
                let hot = HotMem::new(&snap);
                if let Some(w) = warm {
                    let _ = hot.find_region(GuestAddress(w));
                }
                let a = GuestAddress(addr);
                for len in [1usize, 4, 8, 16] {
                    assert_eq!(
                        hot.holds(a, len),
                        snap.check_range(a, len),
                        "holds {addr:#x}+{len} (warm {warm:?})"
                    );
                    let (mut got, mut want) = ([0u8; 16], [0u8; 16]);
                    let ok = hot.read_small(&mut got[..len], a);
                    let want_ok = snap.read_slice(&mut want[..len], a).is_ok();
                    assert_eq!(ok, want_ok, "read {addr:#x}+{len}");
                    if ok {
                        assert_eq!(got, want, "bytes at {addr:#x}+{len}");
                    }
                }
                let in_memory = snap.check_range(a, 1);
                assert_eq!(hot.write_byte(0x5a, a), in_memory, "write {addr:#x}");
                if in_memory {
                    assert_eq!(snap.read_obj::<u8>(a).expect("read back"), 0x5a);
                }
            }
        }
    }
}
