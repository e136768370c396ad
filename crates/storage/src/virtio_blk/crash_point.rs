//! A crash at the worst moment, on purpose, for crash tests: with
//! `SOFTCARD_TEST_DIE_BEFORE_SIGNAL=N` in its environment the card kills
//! itself (SIGKILL) just before its N-th interrupt to a driver, with the
//! answers that interrupt was for already on the used ring. The next card
//! must still get the driver to see them (docs/live-update.md, "A ring
//! that starts interrupts the driver once"). Unset, this costs one load
//! per interrupt.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable, read once per process.
const DIE_BEFORE_SIGNAL_ENV: &str = "SOFTCARD_TEST_DIE_BEFORE_SIGNAL";

fn countdown() -> Option<&'static AtomicU64> {
    static LEFT: OnceLock<Option<AtomicU64>> = OnceLock::new();
    LEFT.get_or_init(|| {
        let n = std::env::var(DIE_BEFORE_SIGNAL_ENV)
            .ok()?
            .parse::<u64>()
            .ok()?;
        log::warn!("{DIE_BEFORE_SIGNAL_ENV}={n}: this card kills itself before interrupt {n}");
        Some(AtomicU64::new(n))
    })
    .as_ref()
}

/// Called before each interrupt to a driver; kills the process at the
/// chosen one.
#[inline]
pub(super) fn before_signal() {
    if let Some(left) = countdown() {
        if left.fetch_sub(1, Ordering::SeqCst) == 1 {
            // SAFETY: kill(2) on our own pid with a constant signal.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}
