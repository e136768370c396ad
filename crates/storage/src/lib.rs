//! The storage function of the softcard.
//!
//! A card owns physical devices ([`device`]), carves them into volumes
//! recorded in an on-device partition map ([`partition`]), and presents
//! each volume to a VM through its own vhost-user-blk interface
//! ([`virtio_blk`]), or to the host system as an NBD export ([`nbd`]).
//! [`card::StorageCard`] ties these together for the control plane.

pub mod card;
pub mod card_state;
pub mod crypto;
pub mod device;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod listen;
pub mod nbd;
pub mod partition;
pub mod placement;
pub mod qos;
pub mod virtio_blk;

pub use card::{AttachOptions, CardError, Interface, StorageCard};
