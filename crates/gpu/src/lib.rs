//! softcard vGPU: virtual GPUs backed by a physical GPU on another server.
//!
//! - [`server`]: owns the machine's GPU through wgpu and runs one session
//!   per client connection (device, queue, objects, memory quota, a fair
//!   share of GPU time).
//! - [`client`]: a wgpu custom backend, so an unchanged wgpu application runs
//!   on the remote GPU once it creates its instance with
//!   [`remote_instance`].
//! - [`viewer`]: frames the application presents, streamed to a browser.
//! - [`proto`]: the wire format between them.

pub mod client;
pub mod frames;
pub mod proto;
pub mod server;
pub mod tls;
pub mod viewer;
pub mod workloads;

#[cfg(feature = "fuzzing")]
pub mod fuzzing;

pub use client::{
    remote_instance, remote_instance_at, remote_instance_from_metadata,
    remote_instance_with_credential, remote_surface, round_trips, usage, viewer_path, Endpoint,
};
pub use server::{GpuServer, ServerConfig};
