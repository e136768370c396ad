//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`).
//!
//! [`parse_request`] lays an arbitrary descriptor table and arbitrary
//! guest memory out of the input bytes, pops one chain the way the
//! vhost-user worker does, parses it, and checks the invariants every
//! accepted request must satisfy: it stays inside the volume, its data
//! segments and status byte lie inside guest memory, and GET_ID/flush
//! carry no device range. It also checks that the worker's descriptor
//! walker (`desc_walk`) yields exactly the descriptors virtio-queue's
//! chain does.

use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use virtio_queue::desc::split::Descriptor;

use crate::virtio_blk::desc_walk::{ready_queue, DescWalk};
use crate::virtio_blk::hot_mem::HotMem;
use crate::virtio_blk::request::{self, RequestKind, Segment};

const MEM_BYTES: usize = 64 << 10;
const QSIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;

/// Runs the parser on one fuzz input. Panics when an invariant breaks.
pub fn parse_request(data: &[u8]) {
    if data.len() < 9 {
        return;
    }
    let volume_bytes = u64::from_le_bytes(data[..8].try_into().expect("8 bytes")) % (1 << 40);
    let head = u16::from(data[8]) % QSIZE;
    let rest = &data[9..];
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("guest memory");
    // The descriptor table and the rest of memory come from the input;
    // descriptor addresses are folded so most land near guest memory.
    let table_len = usize::from(QSIZE) * 16;
    let table = &rest[..rest.len().min(table_len)];
    for (i, d) in table.chunks(16).enumerate() {
        let mut raw = [0u8; 16];
        raw[..d.len()].copy_from_slice(d);
        let addr = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let addr = if addr & (1 << 63) != 0 {
            addr
        } else {
            addr % (MEM_BYTES as u64 + 4096)
        };
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        let len =
            u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")) % (MEM_BYTES as u32 * 2);
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(DESC + i as u64 * 16))
            .expect("table is in memory");
    }
    if rest.len() > table_len {
        let body = &rest[table_len..];
        let n = body.len().min(MEM_BYTES - 0x1000);
        mem.write_slice(&body[..n], GuestAddress(0x1000))
            .expect("in memory");
    }
    mem.write_obj(head, GuestAddress(AVAIL + 4))
        .expect("in memory");
    mem.write_obj(1u16, GuestAddress(AVAIL + 2))
        .expect("in memory");

    let mut q = ready_queue(QSIZE, DESC, AVAIL, USED);
    // Parsed through the worker's view of guest memory (its one-region
    // short paths included); the invariants are checked against
    // vm-memory's own.
    let snapshot = Arc::new(mem);
    let mem: &GuestMemoryMmap = &snapshot;
    let hot = HotMem::new(&snapshot);
    let Some(chain) = q.pop_descriptor_chain(&hot) else {
        return;
    };
    // The worker's own walker yields what virtio-queue's chain does.
    let head = chain.head_index();
    let walk = || DescWalk::new(&hot, GuestAddress(DESC), QSIZE, head);
    let fields = |d: Descriptor| (d.addr(), d.len(), d.flags(), d.next());
    assert!(
        walk().map(fields).eq(chain.map(fields)),
        "the descriptor walk differs from virtio-queue's chain"
    );
    let mut segs: Vec<Segment> = Vec::new();
    match request::parse(walk(), head, &hot, volume_bytes, &mut segs) {
        Ok(req) => {
            assert!(mem.check_range(req.status, 1, Permissions::Write));
            match req.kind {
                RequestKind::Read | RequestKind::Write => {
                    assert!(req
                        .offset
                        .checked_add(req.len)
                        .is_some_and(|e| e <= volume_bytes));
                    assert_eq!(req.len % request::SECTOR_BYTES, 0);
                    let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
                    assert_eq!(total, req.len);
                }
                RequestKind::Discard | RequestKind::WriteZeroes => {
                    assert!(req
                        .offset
                        .checked_add(req.len)
                        .is_some_and(|e| e <= volume_bytes));
                }
                RequestKind::Flush | RequestKind::GetId => {}
            }
            for s in &segs {
                assert!(s.len > 0);
                assert!(mem.check_range(s.addr, s.len as usize, Permissions::Read));
                assert!(s.addr.checked_add(u64::from(s.len)).is_some());
            }
        }
        Err(refused) => {
            assert_eq!(refused.head, head);
            if let Some(st) = refused.status {
                assert!(mem.check_range(st, 1, Permissions::Write));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn parser_keeps_its_invariants(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            super::parse_request(&data);
        }
    }
}
