//! A blocking client of the region API, for the CLI and for hosts' card
//! daemons (which run no async runtime of their own).

use std::time::Duration;

use serde_json::Value;

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The region answered with an error.
    #[error("{message} (HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The region's message.
        message: String,
    },
    /// The region could not be reached or answered nonsense.
    #[error("region at {url}: {error}")]
    Transport {
        /// The region's URL.
        url: String,
        /// What went wrong.
        error: String,
    },
}

impl ClientError {
    /// The HTTP status, for an answered call.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            ClientError::Transport { .. } => None,
        }
    }
}

/// A region client with one credential.
#[derive(Debug, Clone)]
pub struct RegionClient {
    base: String,
    credential: String,
    http: reqwest::blocking::Client,
}

impl RegionClient {
    /// A client of the region at `base` (`http://host:port` or `https://...`),
    /// trusting `ca_pem` (PEM) in addition to the system's roots when given.
    pub fn new(base: &str, credential: &str, ca_pem: Option<&[u8]>) -> Result<Self, ClientError> {
        let transport = |e: reqwest::Error| ClientError::Transport {
            url: base.to_owned(),
            error: e.to_string(),
        };
        let mut b = reqwest::blocking::Client::builder().timeout(CALL_TIMEOUT);
        if let Some(pem) = ca_pem {
            b = b.add_root_certificate(reqwest::Certificate::from_pem(pem).map_err(transport)?);
        }
        Ok(RegionClient {
            base: base.trim_end_matches('/').to_owned(),
            credential: credential.trim().to_owned(),
            http: b.build().map_err(transport)?,
        })
    }

    /// The region's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// One call: `method` on `path` (under the base URL) with a JSON body.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let method =
            reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| ClientError::Transport {
                url: url.clone(),
                error: e.to_string(),
            })?;
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(&self.credential);
        if let Some(b) = body {
            req = req.json(b);
        }
        self.finish(&url, req)
    }

    /// PUT of raw bytes.
    pub fn put_bytes(&self, path: &str, body: Vec<u8>) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let req = self.http.put(&url).bearer_auth(&self.credential).body(body);
        self.finish(&url, req)
    }

    fn finish(
        &self,
        url: &str,
        req: reqwest::blocking::RequestBuilder,
    ) -> Result<Value, ClientError> {
        let transport = |e: reqwest::Error| ClientError::Transport {
            url: url.to_owned(),
            error: chain(&e),
        };
        let r = req.send().map_err(transport)?;
        let status = r.status().as_u16();
        let text = r.text().map_err(transport)?;
        let v: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|e| ClientError::Transport {
                url: url.to_owned(),
                error: format!("answer is not JSON ({e}): {text:.200}"),
            })?
        };
        if (200..300).contains(&status) {
            Ok(v)
        } else {
            Err(ClientError::Api {
                status,
                message: v["error"].as_str().unwrap_or(&text).to_owned(),
            })
        }
    }

    /// GET.
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call("GET", path, None)
    }

    /// POST with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call("POST", path, Some(body))
    }
}

/// An error with its causes ("sending the request: connecting: invalid
/// peer certificate: UnknownIssuer").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Keeps a provider (a host, a GPU server) registered with the region:
/// registers with the body `offer` makes, heartbeats every third of the
/// lease the region grants, and registers again when the region says the
/// lease is gone. Stops when dropped.
#[derive(Debug)]
pub struct Registration {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    registered: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Registration {
    /// Starts registering with `PUT register` and renewing with `POST
    /// heartbeat`.
    pub fn start(
        client: RegionClient,
        register: &'static str,
        heartbeat: &'static str,
        offer: impl Fn() -> Value + Send + 'static,
    ) -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let registered = std::sync::Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, registered) = (stop.clone(), registered.clone());
            std::thread::Builder::new()
                .name("region-lease".into())
                .spawn(move || {
                    let mut every = Duration::from_secs(1);
                    let mut next = std::time::Instant::now();
                    while !stop.load(Ordering::SeqCst) {
                        if std::time::Instant::now() >= next {
                            if registered.load(Ordering::SeqCst) {
                                match client.post(heartbeat, &serde_json::json!({})) {
                                    Ok(_) => {}
                                    Err(e) if e.status() == Some(404) => {
                                        log::warn!("region: {e}");
                                        registered.store(false, Ordering::SeqCst);
                                    }
                                    Err(e) => log::warn!("heartbeat: {e}"),
                                }
                            }
                            if !registered.load(Ordering::SeqCst) {
                                match client.call("PUT", register, Some(&offer())) {
                                    Ok(r) => {
                                        let lease =
                                            r["lease_seconds"].as_u64().unwrap_or(10).max(1);
                                        every = Duration::from_millis(lease * 1000 / 3);
                                        registered.store(true, Ordering::SeqCst);
                                        log::info!(
                                            "registered with the region at {}",
                                            client.base()
                                        );
                                    }
                                    Err(e) => log::warn!("registering with the region: {e}"),
                                }
                            }
                            next = std::time::Instant::now() + every;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                })?
        };
        Ok(Registration {
            stop,
            registered,
            thread: Some(thread),
        })
    }

    /// Whether the provider holds a lease now.
    pub fn registered(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.registered.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
