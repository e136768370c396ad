//! The hybrid RDMA function of the softcard (issue #4): a user-space
//! RoCEv2 engine that speaks to Linux Soft-RoCE and RoCE NICs.
//!
//! - [`wire`]: the RoCEv2 wire format (base transport header, extended
//!   headers, opcodes) and the invariant CRC, computed exactly as
//!   `rdma_rxe` computes and checks it, including the IPv4 and UDP headers
//!   a user-space engine must reconstruct.
//! - [`net`]: datagram I/O: a memory-mapped packet ring for receiving
//!   (no system call per packet), whole IPv4 datagrams and UDP GSO runs
//!   for sending, and a seeded fault injector for tests.
//! - [`rc`]: the verbs-shaped engine: protection domains, memory regions,
//!   RC queue pairs, work requests with scatter/gather lists, and the
//!   patent's two receive datapaths (placement fast path, software path)
//!   with their own counters.
//! - [`progress`]: a thread that drives an engine so applications can
//!   block on completions.
//! - [`shm`] and [`ring`]: the shared memory and the rings of the data
//!   path between applications and the card daemon.
//! - [`service`]: the card daemon's RDMA devices and the control socket
//!   unmodified verbs applications reach them on (through
//!   `softcard-verbs`, a drop-in `libibverbs.so.1`).

pub mod net;
pub mod progress;
pub mod rc;
pub mod ring;
pub mod service;
pub mod shm;
pub mod wire;
