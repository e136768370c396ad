//! Counters of one vhost-user-blk interface: lock-free, updated by the
//! queue workers, read by the control plane.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one attachment.
#[derive(Debug, Default)]
pub struct BlkMetrics {
    /// Completed reads.
    pub read_ops: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Completed writes.
    pub write_ops: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Completed flushes.
    pub flush_ops: AtomicU64,
    /// Completed discards.
    pub discard_ops: AtomicU64,
    /// Completed write-zeroes.
    pub write_zeroes_ops: AtomicU64,
    /// Completed GET_ID requests.
    pub get_id_ops: AtomicU64,
    /// Requests refused as malformed or out of range (`VIRTIO_BLK_S_IOERR`).
    pub invalid_requests: AtomicU64,
    /// Requests of an unsupported type (`VIRTIO_BLK_S_UNSUPP`).
    pub unsupported_requests: AtomicU64,
    /// Physical requests that failed (`VIRTIO_BLK_S_IOERR`).
    pub io_errors: AtomicU64,
    /// Queue notifications sent to the guest.
    pub notifications: AtomicU64,
    /// Requests that had to wait for the throttle.
    pub throttled_requests: AtomicU64,
    /// Total time requests waited for the throttle, in nanoseconds.
    pub throttled_ns: AtomicU64,
}

/// A copy of [`BlkMetrics`] at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[allow(missing_docs)]
pub struct BlkMetricsSnapshot {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flush_ops: u64,
    pub discard_ops: u64,
    pub write_zeroes_ops: u64,
    pub get_id_ops: u64,
    pub invalid_requests: u64,
    pub unsupported_requests: u64,
    pub io_errors: u64,
    pub notifications: u64,
    pub throttled_requests: u64,
    pub throttled_ns: u64,
}

impl BlkMetrics {
    /// Adds one to a counter.
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> BlkMetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlkMetricsSnapshot {
            read_ops: g(&self.read_ops),
            read_bytes: g(&self.read_bytes),
            write_ops: g(&self.write_ops),
            write_bytes: g(&self.write_bytes),
            flush_ops: g(&self.flush_ops),
            discard_ops: g(&self.discard_ops),
            write_zeroes_ops: g(&self.write_zeroes_ops),
            get_id_ops: g(&self.get_id_ops),
            invalid_requests: g(&self.invalid_requests),
            unsupported_requests: g(&self.unsupported_requests),
            io_errors: g(&self.io_errors),
            notifications: g(&self.notifications),
            throttled_requests: g(&self.throttled_requests),
            throttled_ns: g(&self.throttled_ns),
        }
    }
}
