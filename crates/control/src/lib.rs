//! The control function of the softcard: the card's configuration, the
//! management API (JSON over HTTP/1.1 on a unix socket, served by axum and
//! described in `docs/api/openapi.yaml`) and the client the CLI uses to
//! call it.

pub mod api;
pub mod client;
pub mod config;
pub mod prometheus;
pub mod size;

pub use api::{ApiServer, MetricsServer};
pub use client::{ApiClient, ClientError};
pub use config::{CardConfig, ConfigError};
