//! The API client the CLI uses.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::api::error_message;
use crate::http;

/// Errors calling the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not reachable.
    #[error(
        "cannot reach the softcard daemon at {socket}: {source} (is `softcard serve` running?)"
    )]
    Connect {
        /// Socket.
        socket: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The exchange broke off.
    #[error("API exchange failed: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon refused the request.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The daemon's message.
        message: String,
    },
    /// The answer was not JSON.
    #[error("daemon answered something that is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// A client of one daemon.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// A client for the daemon at `socket`.
    pub fn new(socket: &Path) -> Self {
        ApiClient {
            socket: socket.to_owned(),
        }
    }

    /// Sends one request; returns the JSON answer of a 2xx response.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let mut s = UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            socket: self.socket.clone(),
            source,
        })?;
        let body = body
            .map(serde_json::to_vec)
            .transpose()?
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: softcard\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(&body)?;
        let resp = http::read_response(&s)?;
        if !(200..300).contains(&resp.status) {
            let message = error_message(&resp.body)
                .unwrap_or_else(|| String::from_utf8_lossy(&resp.body).into_owned());
            return Err(ClientError::Api {
                status: resp.status,
                message,
            });
        }
        Ok(serde_json::from_slice(&resp.body)?)
    }
}
