//! Guest memory as the queue worker sees it during one round: a snapshot
//! of the frontend's memory table that remembers the region it found last.
//!
//! A request touches guest memory about ten times (avail ring, descriptors,
//! header, status, used ring) and nearly always in the region of the one
//! before; `vm-memory`'s lookup is a binary search through the regions
//! each time (5-10 % of the worker in `perf` on the memory devices). The
//! view is the same: every address still goes through `find_region` and
//! gets the region that holds it, or none.

use std::cell::Cell;
use std::sync::Arc;

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
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

    fn two_regions() -> Arc<GuestMemoryMmap> {
        Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0x1000), 0x1000),
                (GuestAddress(0x10000), 0x2000),
            ])
            .expect("guest memory"),
        )
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
}
