//! The host side of the provider network: the agent in a host's card
//! daemon that registers the host with the region, heartbeats under its
//! lease, and runs the region's instances as QEMU VMs on the card's own
//! volumes (boot volume on a vhost-user-blk socket, data volumes
//! hot-plugged over QMP), with the built-in images they boot.

pub mod agent;
pub mod image;
pub mod initramfs;
pub mod metadata;
pub mod qmp;
pub mod vm;

pub use agent::{Agent, HostConfig};
