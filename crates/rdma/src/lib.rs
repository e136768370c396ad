//! The hybrid RDMA function of the softcard (issue #4, in progress).
//!
//! So far: the RoCEv2 wire format ([`wire`]): base transport header,
//! extended headers, opcodes, and the invariant CRC computed exactly as
//! Linux's Soft-RoCE (`rdma_rxe`) computes and checks it, including the
//! IPv4 and UDP headers that a user-space engine never sees and must
//! reconstruct. The transport (queue pairs, the placement fast path and
//! the software path) builds on it.

pub mod net;
pub mod progress;
pub mod rc;
pub mod wire;
