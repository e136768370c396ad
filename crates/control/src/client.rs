//! The API client the CLI uses: HTTP/1.1 over the daemon's unix socket,
//! with hyper (the stack the daemon serves with).

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::Value;

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

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
    Io(String),
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

fn io(e: impl std::fmt::Display) -> ClientError {
    ClientError::Io(e.to_string())
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
        let body = body
            .map(serde_json::to_vec)
            .transpose()?
            .unwrap_or_default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io)?;
        let (status, answer) = rt.block_on(async {
            tokio::time::timeout(CALL_TIMEOUT, self.exchange(method, path, body))
                .await
                .map_err(|_| io("the daemon did not answer in time"))?
        })?;
        if !(200..300).contains(&status) {
            let message = error_message(&answer)
                .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
            return Err(ClientError::Api { status, message });
        }
        Ok(serde_json::from_slice(&answer)?)
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes), ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(io)?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "softcard")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(io)?;
        let resp = sender.send_request(req).await.map_err(io)?;
        let status = resp.status().as_u16();
        let answer = resp.into_body().collect().await.map_err(io)?.to_bytes();
        Ok((status, answer))
    }
}

/// The error message of an error response body.
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("error")?.as_str().map(str::to_owned)
}
