//! The provider network's control plane ("the region"): tenants and their
//! credentials, hosts that register under a lease, placement that claims a
//! host's capacity atomically, instances (QEMU VMs run by the hosts' card
//! daemons) and volumes, served as a JSON API and a web console, with all
//! state in a [`store::Store`]: an embedded redb file or etcd.

pub mod api;
pub mod ca;
pub mod client;
pub mod console;
pub mod error;
pub mod leader;
pub mod model;
pub mod placement;
pub mod server;
pub mod service;
pub mod store;
pub mod throwaway_etcd;
