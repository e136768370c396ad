//! Guest memory as the queue worker sees it during one round: a snapshot
//! of the frontend's memory table with its regions in a flat table.
//!
//! A request touches guest memory about ten times (avail ring, descriptors,
//! header, status, used ring), in two or three regions (libblkio keeps its
//! rings and request headers apart from the data buffers); `vm-memory`'s
//! lookup is a binary search through `Arc`ed regions each time. The
//! worker's small accesses go through a table of up to eight regions
//! (guest start, length, host address side by side, filled on the round's
//! first access) that remembers the entry it found last: the lookup was
//! 13 % of the worker at `null-untouched` 4k QD32 before, 7-10 % after. The
//! view is the same: every address gets the region that holds it, or
//! none; a memory table of more regions takes vm-memory's lookup.
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

/// Regions a round keeps in its flat table; a memory table with more
/// takes vm-memory's lookup for every access.
const FLAT_REGIONS: usize = 8;

/// A region as the flat table holds it: guest start, length and where it
/// is mapped here, side by side (vm-memory's regions are behind an `Arc`
/// each, and their fields behind accessors: a lookup there chases two
/// pointers and reads three lines).
#[derive(Clone, Copy)]
struct Flat {
    start: u64,
    len: u64,
    host: *mut u8,
}

const NO_REGION: Flat = Flat {
    start: 0,
    len: 0,
    host: std::ptr::null_mut(),
};

/// One snapshot of guest memory with its regions in a flat table and the
/// entry last found remembered. Not `Sync` (the caches are `Cell`s): one
/// queue thread's, for one round of its loop.
pub(crate) struct HotMem<'a> {
    snapshot: &'a Arc<GuestMemoryMmap>,
    last: Cell<Option<&'a GuestRegionMmap>>,
    /// The snapshot's regions, in three cache lines, filled on the
    /// first small access of the round (`flat_len` is then set; `None`
    /// before, `Some(0)` when there are more than [`FLAT_REGIONS`]).
    flat: Cell<[Flat; FLAT_REGIONS]>,
    flat_len: Cell<Option<usize>>,
    /// Index in `flat` of the region the last small access found.
    flat_last: Cell<usize>,
}

impl<'a> HotMem<'a> {
    pub(crate) fn new(snapshot: &'a Arc<GuestMemoryMmap>) -> Self {
        HotMem {
            snapshot,
            last: Cell::new(None),
            flat: Cell::new([NO_REGION; FLAT_REGIONS]),
            flat_len: Cell::new(None),
            flat_last: Cell::new(0),
        }
    }

    /// Fills the flat table from the snapshot; returns how many regions it
    /// holds (0: too many, use vm-memory's lookup).
    #[cold]
    fn fill_flat(&self) -> usize {
        let mut flat = [NO_REGION; FLAT_REGIONS];
        let mut n = 0;
        for r in self.snapshot.iter() {
            if n == FLAT_REGIONS {
                n = 0;
                break;
            }
            let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else {
                n = 0;
                break;
            };
            flat[n] = Flat {
                start: r.start_addr().raw_value(),
                len: r.len(),
                host,
            };
            n += 1;
        }
        self.flat.set(flat);
        self.flat_len.set(Some(n));
        n
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
        let n = match self.flat_len.get() {
            Some(n) => n,
            None => self.fill_flat(),
        };
        if n == 0 {
            return self.in_one_region_slow(addr, len);
        }
        let a = addr.raw_value();
        let len = u64::try_from(len).ok()?;
        // SAFETY: `Cell::as_ptr` of a cell this thread alone uses; the
        // table is only read here and written by `fill_flat`, never while
        // this reference lives.
        let flat = unsafe { &*self.flat.as_ptr() };
        let hit = |f: &Flat| {
            let offset = a.wrapping_sub(f.start);
            (offset < f.len).then_some(offset)
        };
        let last = self.flat_last.get();
        let (f, offset) = match hit(&flat[last]) {
            Some(o) => (&flat[last], o),
            None => {
                let (i, o) = flat[..n]
                    .iter()
                    .enumerate()
                    .find_map(|(i, f)| hit(f).map(|o| (i, o)))?;
                self.flat_last.set(i);
                (&flat[i], o)
            }
        };
        if len > f.len - offset {
            return None;
        }
        // SAFETY: `offset` < the region's length, so the address is inside
        // its mapping, which the snapshot this view borrows keeps mapped.
        Some(unsafe { f.host.add(offset as usize) })
    }

    /// [`Self::in_one_region`] through vm-memory's lookup (memory tables
    /// of more than [`FLAT_REGIONS`] regions).
    fn in_one_region_slow(&self, addr: GuestAddress, len: usize) -> Option<*mut u8> {
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
        if let Ok(whole) = <&mut [u8; 16]>::try_from(&mut *dst) {
            // A request header: one 16-byte load instead of sixteen.
            // SAFETY: as below, for the 16 bytes at `host`; `[u8; 16]`
            // needs no alignment.
            *whole = unsafe { host.cast::<[u8; 16]>().read_volatile() };
            return true;
        }
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
                    let _ = hot.in_one_region(GuestAddress(w), 1);
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

    /// Ten regions (more than the flat table holds) and eight: each
    /// address, after each other one, gets vm-memory's answer.
    #[test]
    fn flat_and_general_lookups_agree_on_small_and_large_tables() {
        for count in [8u64, 10] {
            let ranges: Vec<_> = (0..count).map(|i| (0x10000 * i + 0x1000, 0x2000)).collect();
            let snap = regions(
                &ranges
                    .iter()
                    .map(|&(a, l)| (a, l as usize))
                    .collect::<Vec<_>>(),
            );
            let probes: Vec<u64> = ranges
                .iter()
                .flat_map(|&(a, l)| [a - 1, a, a + l - 8, a + l - 1, a + l])
                .collect();
            let hot = HotMem::new(&snap);
            for &before in &probes {
                for &addr in &probes {
                    let _ = hot.in_one_region(GuestAddress(before), 1);
                    for len in [1usize, 8] {
                        let a = GuestAddress(addr);
                        let want = snap
                            .get_slice(a, len)
                            .ok()
                            .map(|s| s.ptr_guard_mut().as_ptr());
                        assert_eq!(
                            hot.in_one_region(a, len),
                            want,
                            "{count} regions: {addr:#x}+{len} after {before:#x}"
                        );
                    }
                }
            }
        }
    }
}
