//! Encryption at rest: AES-256-XTS per volume ([`xts`]) with a random data
//! key per volume, stored on the device only wrapped (AES-256 key wrap,
//! RFC 3394) by its tenant's key-encryption key ([`keys`]).
//!
//! See `docs/encryption.md` for the on-disk layout.

pub mod keys;
#[cfg(target_arch = "x86_64")]
mod vaes;
pub mod xts;

pub use keys::{DataKey, Kek, KeyError, KeyStore, WrappedKey};
pub use xts::Xts256;
