//! When a queue worker hands the requests it has popped to the device,
//! and, for devices that complete them in `push` (memory, files on tmpfs),
//! when it answers them: every few small requests, so that a driver finds
//! answers while it still looks; large slow ones together while enough
//! work is left to cover the driver's wake-up.

/// Requests popped between two submissions to the device within one run,
/// for devices that complete asynchronously (io_uring: one system call per
/// batch).
pub(super) const SUBMIT_BATCH: usize = 8;
/// The same for devices that complete in `push` (memory): answers go out
/// every few requests, so that the driver finds them while it still looks
/// rather than going to sleep; 1 costs a notification per request, 8 and
/// more leave the driver waiting (`softcard bench storage`, ram and null:
/// 4 gave the most I/Os per second).
pub(super) const SYNC_BATCH: usize = 4;
/// Data bytes popped between two submissions within one run.
pub(super) const SUBMIT_BATCH_BYTES: u64 = 128 << 10;
/// For devices that complete in `push`: data bytes after which the
/// answers go out even while more requests wait.
pub(super) const SYNC_BATCH_BYTES: u64 = 512 << 10;
/// For devices that complete in `push`: once a batch holds
/// [`SUBMIT_BATCH_BYTES`], its answers wait for the next requests only
/// while those still in the ring take at least this long to serve (at the
/// batch's pace so far). Each answer to a driver that sleeps costs a
/// wake-up: where idle vCPUs halt, ~10 us of this thread and ~30 us
/// before the driver runs (`softcard bench storage`'s header). Answering
/// slow requests together saves wake-ups, and with this much work left
/// the driver's next requests arrive before this thread runs out.
pub(super) const ANSWER_AHEAD_NS: u64 = 40_000;

/// For a device that completes in `push`: whether a batch of `bytes`
/// should be answered now, at `pace_ns` per large request, with `ahead`
/// requests known to wait in the ring; `count_ahead` reads the ring again
/// when that is zero (and updates `ahead`). Small batches go by count
/// alone ([`SYNC_BATCH`]).
// Inlined into the worker's loop: called out of line, `null` 128 KiB reads
// (2.4M a second) lost 20 % (`softcard bench storage`, A/B of two builds).
#[inline(always)]
pub(super) fn answer_now(
    bytes: u64,
    pace_ns: u64,
    ahead: &mut u16,
    count_ahead: impl FnOnce() -> Option<u16>,
) -> bool {
    if bytes < SUBMIT_BATCH_BYTES {
        return false;
    }
    if bytes >= SYNC_BATCH_BYTES || pace_ns < ANSWER_AHEAD_NS / 10 {
        // Enough held, or fast requests (no copy, or a short one), for
        // which waiting would not save a wake-up.
        return true;
    }
    if *ahead == 0 {
        match count_ahead() {
            Some(n) => *ahead = n,
            None => return true,
        }
    }
    pace_ns.saturating_mul(u64::from(*ahead)) < ANSWER_AHEAD_NS
}

#[cfg(test)]
mod tests {
    use super::*;

    const LARGE: u64 = 128 << 10;

    fn decide(bytes: u64, pace_ns: u64, ahead: u16, counted: Option<u16>) -> (bool, u16) {
        let mut ahead = ahead;
        let now = answer_now(bytes, pace_ns, &mut ahead, || counted);
        (now, ahead)
    }

    #[test]
    fn small_batches_go_by_count() {
        assert!(!decide(4096, 50_000, 0, Some(0)).0);
        assert!(!decide(LARGE - 1, 0, 0, None).0);
    }

    #[test]
    fn fast_large_requests_are_answered_at_once() {
        // 1 us each: even 100 waiting are less work than a wake-up.
        assert_eq!(decide(LARGE, 1_000, 100, Some(100)), (true, 100));
    }

    #[test]
    fn slow_large_requests_wait_while_enough_work_is_left() {
        // 20 us each: three waiting are 60 us of work, one is 20 us.
        assert_eq!(decide(LARGE, 20_000, 3, None), (false, 3));
        assert_eq!(decide(LARGE, 20_000, 1, None), (true, 1));
        // None known: the ring is read again.
        assert_eq!(decide(LARGE, 20_000, 0, Some(5)), (false, 5));
        assert_eq!(decide(LARGE, 20_000, 0, Some(0)), (true, 0));
        // An unreadable ring: answer.
        assert_eq!(decide(LARGE, 20_000, 0, None), (true, 0));
    }

    #[test]
    fn held_answers_go_out_at_the_byte_limit() {
        assert!(decide(SYNC_BATCH_BYTES, 20_000, 30, None).0);
        assert!(!decide(SYNC_BATCH_BYTES - 1, 20_000, 30, None).0);
    }
}
