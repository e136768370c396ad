//! The management API server: routes HTTP requests to the storage card.
//!
//! Endpoints (see `docs/api/openapi.yaml`):
//!
//! | method | path                         | does                         |
//! |--------|------------------------------|------------------------------|
//! | GET    | /v1/devices                  | list physical devices        |
//! | GET    | /v1/volumes                  | list volumes                 |
//! | POST   | /v1/volumes                  | create a volume              |
//! | GET    | /v1/volumes/{name}           | show one volume              |
//! | DELETE | /v1/volumes/{name}           | delete an unattached volume  |
//! | POST   | /v1/volumes/{name}/attach    | start a vhost-user-blk iface |
//! | POST   | /v1/volumes/{name}/detach    | stop it                      |
//! | POST   | /v1/volumes/{name}/qos       | change throttle limits live  |
//! | GET    | /v1/volumes/{name}/stats     | counters and latency         |
//! | GET    | /v1/metrics                  | Prometheus text format       |
//! | GET    | /v1/tenants                  | list tenants                 |
//! | POST   | /v1/tenants/{name}/rotate-key| re-wrap data keys, new KEK   |
//!
//! Errors are `{"error": "..."}` with 400 (bad request), 404 (no such
//! thing), 409 (conflicts with the current state) or 503 (device
//! unavailable).

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::Deserialize;
use serde_json::{json, Value};
use softcard_storage::crypto::{Kek, KeyError};
use softcard_storage::partition::PartitionError;
use softcard_storage::qos::QosLimits;
use softcard_storage::virtio_blk::BlkError;
use softcard_storage::{AttachOptions, CardError, Interface, StorageCard};

use crate::http::{self, HttpError, Request, Response};
use crate::size::parse_size;

/// Most API connections served at once; more are answered 503.
pub const MAX_CONNECTIONS: usize = 32;
/// Default virtqueue count of an attachment.
pub const DEFAULT_QUEUES: u16 = 1;

/// A running API server.
#[derive(Debug)]
pub struct ApiServer {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The listening socket, to wake the accept loop at shutdown even
    /// when its path is gone.
    listener: UnixListener,
}

impl ApiServer {
    /// Listens on `socket` (creating its directory; replacing a stale
    /// socket, never another kind of file or a live socket).
    pub fn start(card: Arc<StorageCard>, socket: &Path) -> io::Result<Self> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(socket) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", socket.display()),
                ));
            }
            if UnixStream::connect(socket).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another daemon is serving {}", socket.display()),
                ));
            }
            std::fs::remove_file(socket)?;
        }
        let listener = UnixListener::bind(socket)?;
        let waker = listener.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("api".into())
                .spawn(move || accept_loop(&listener, &card, &stop))?
        };
        log::info!("management API on {}", socket.display());
        Ok(ApiServer {
            socket: socket.to_owned(),
            stop,
            thread: Some(thread),
            listener: waker,
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops accepting and removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept call: shutting the listening socket down makes
        // accept fail at once, even when the socket's path was removed
        // or replaced (connecting to the path would then wake nothing,
        // and the join below would wait forever).
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown(2) on a descriptor this server owns.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn accept_loop(listener: &UnixListener, card: &Arc<StorageCard>, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = conn else { continue };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = http::write_response(&stream, &error(503, "too many API connections"));
            continue;
        }
        let card = card.clone();
        let active2 = active.clone();
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                serve_connection(stream, &card);
                active2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve_connection(stream: UnixStream, card: &StorageCard) {
    let _ = stream.set_read_timeout(Some(http::READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(http::READ_TIMEOUT));
    let resp = match http::read_request(&stream) {
        Ok(req) => {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(card, &req)));
            r.unwrap_or_else(|_| error(500, "internal error (see the daemon log)"))
        }
        Err(HttpError::Bad(status, msg)) => error(status, &msg),
        Err(HttpError::Io(_)) => return,
    };
    let _ = http::write_response(&stream, &resp);
}

fn json_response(status: u16, v: &impl serde::Serialize) -> Response {
    Response {
        status,
        body: serde_json::to_vec_pretty(v).unwrap_or_else(|_| b"{}".to_vec()),
        text: false,
    }
}

fn metrics_response(card: &StorageCard) -> Response {
    Response {
        status: 200,
        body: crate::prometheus::render(&card.stats()).into_bytes(),
        text: true,
    }
}

/// Counters of one volume with latency quantiles read off its histograms.
fn volume_stats(card: &StorageCard, name: &str) -> Result<Response, Response> {
    let info = card.volume(name).map_err(|e| card_error(&e))?;
    let m = card
        .stats()
        .into_iter()
        .flat_map(|d| d.volumes)
        .find(|(v, _)| v == name)
        .map(|(_, m)| m)
        .unwrap_or_default();
    let q = |h: &softcard_storage::virtio_blk::metrics::HistogramSnapshot| {
        json!({
            "count": h.count(),
            "mean_us": if h.count() > 0 { h.sum_ns as f64 / h.count() as f64 / 1e3 } else { 0.0 },
            "p50_us_at_most": h.quantile_bound_us(500),
            "p99_us_at_most": h.quantile_bound_us(990),
        })
    };
    Ok(json_response(
        200,
        &json!({
            "volume": name,
            "device": info.device,
            "attached": info.attachment.is_some(),
            "counters": m,
            "latency": {
                "read": q(&m.read_latency),
                "write": q(&m.write_latency),
                "flush": q(&m.flush_latency),
                "discard": q(&m.discard_latency),
            },
        }),
    ))
}

/// Serves `GET /metrics` on a TCP address for Prometheus.
#[derive(Debug)]
pub struct MetricsServer {
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `addr` (port 0 picks one; see [`MetricsServer::addr`]).
    pub fn start(card: Arc<StorageCard>, addr: std::net::SocketAddr) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(s) = conn else { continue };
                        let _ = s.set_read_timeout(Some(http::READ_TIMEOUT));
                        let _ = s.set_write_timeout(Some(http::READ_TIMEOUT));
                        let resp = match http::read_request(&s) {
                            Ok(r) if r.method == "GET" && r.path == "/metrics" => {
                                metrics_response(&card)
                            }
                            Ok(_) => error(404, "only GET /metrics is served here"),
                            Err(HttpError::Bad(st, m)) => error(st, &m),
                            Err(HttpError::Io(_)) => continue,
                        };
                        let _ = http::write_response(&s, &resp);
                    }
                })?
        };
        log::info!("Prometheus metrics on http://{addr}/metrics");
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn error(status: u16, msg: &str) -> Response {
    json_response(status, &json!({ "error": msg }))
}

fn card_error(e: &CardError) -> Response {
    let status = match e {
        CardError::UnknownDevice(_) | CardError::UnknownVolume(_) => 404,
        CardError::DeviceUnavailable { .. } => 503,
        CardError::Partition(p) => match p {
            PartitionError::InvalidName(_) | PartitionError::InvalidSize(_) => 400,
            PartitionError::NameTaken(_)
            | PartitionError::NoSpace { .. }
            | PartitionError::Full { .. } => 409,
            _ => 500,
        },
        CardError::Attached(_) | CardError::NotAttached(_) | CardError::SocketInUse(..) => 409,
        CardError::Interface(BlkError::Queues(_) | BlkError::Qos(_)) => 400,
        CardError::Interface(BlkError::Listen { .. }) => 409,
        CardError::Key(KeyError::Invalid(_) | KeyError::TenantName(_)) => 400,
        CardError::Key(KeyError::Missing { .. } | KeyError::WrongKey(_)) => 409,
        CardError::Interface(_) | CardError::DuplicateDevice(_) => 500,
    };
    error(status, &e.to_string())
}

/// A size given as bytes or as text such as `"10GiB"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeArg {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVolume {
    name: String,
    device: String,
    size: SizeArg,
    #[serde(default)]
    encrypt: bool,
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateKey {
    new_kek_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Attach {
    socket: PathBuf,
    /// `vhost-user-blk` (the default) or `nbd`.
    #[serde(default)]
    interface: Interface,
    #[serde(default)]
    queues: Option<u16>,
    #[serde(default)]
    qos: QosLimits,
}

fn parse_body<T: for<'de> Deserialize<'de>>(req: &Request) -> Result<T, Response> {
    serde_json::from_slice(&req.body).map_err(|e| error(400, &format!("invalid request body: {e}")))
}

/// Routes one request.
pub fn handle(card: &StorageCard, req: &Request) -> Response {
    let segs: Vec<&str> = req.path.trim_end_matches('/').split('/').skip(1).collect();
    let m = req.method.as_str();
    let result: Result<Response, Response> = (|| match (m, segs.as_slice()) {
        ("GET", ["v1", "devices"]) => Ok(json_response(200, &card.devices())),
        ("GET", ["v1", "volumes"]) => Ok(json_response(200, &card.volumes())),
        ("POST", ["v1", "volumes"]) => {
            let b: CreateVolume = parse_body(req)?;
            let size = match b.size {
                SizeArg::Bytes(n) => n,
                SizeArg::Text(t) => parse_size(&t).map_err(|e| error(400, &e))?,
            };
            let v = match (b.encrypt, &b.tenant) {
                (false, None) => card.create_volume(&b.name, &b.device, size),
                (true, Some(t)) => card.create_encrypted_volume(&b.name, &b.device, size, t),
                (true, None) => return Err(error(400, "an encrypted volume needs a tenant")),
                (false, Some(_)) => {
                    return Err(error(400, "a tenant is only meaningful with encryption"))
                }
            };
            Ok(json_response(201, &v.map_err(|e| card_error(&e))?))
        }
        ("GET", ["v1", "metrics"]) => Ok(metrics_response(card)),
        ("GET", ["v1", "volumes", name, "stats"]) => volume_stats(card, name),
        ("GET", ["v1", "tenants"]) => {
            let t: Vec<Value> = card
                .tenants()
                .into_iter()
                .map(|(name, error)| json!({ "name": name, "error": error }))
                .collect();
            Ok(json_response(200, &t))
        }
        ("POST", ["v1", "tenants", name, "rotate-key"]) => {
            let b: RotateKey = parse_body(req)?;
            let text = std::fs::read_to_string(&b.new_kek_file).map_err(|e| {
                error(
                    400,
                    &format!("cannot read {}: {e}", b.new_kek_file.display()),
                )
            })?;
            let text = zeroize::Zeroizing::new(text);
            let kek = Kek::from_hex(&text).map_err(|e| error(400, &e.to_string()))?;
            let n = card
                .rotate_tenant_key(name, kek)
                .map_err(|e| card_error(&e))?;
            Ok(json_response(
                200,
                &json!({ "tenant": name, "rewrapped": n }),
            ))
        }
        ("GET", ["v1", "volumes", name]) => card
            .volume(name)
            .map(|v| json_response(200, &v))
            .map_err(|e| card_error(&e)),
        ("DELETE", ["v1", "volumes", name]) => card
            .delete_volume(name)
            .map(|v| json_response(200, &v))
            .map_err(|e| card_error(&e)),
        ("POST", ["v1", "volumes", name, "attach"]) => {
            let b: Attach = parse_body(req)?;
            if !b.socket.is_absolute() {
                return Err(error(400, "socket must be an absolute path"));
            }
            if b.interface == Interface::Nbd && b.queues.is_some() {
                return Err(error(400, "queues apply to vhost-user-blk, not to nbd"));
            }
            let opts = AttachOptions {
                socket: b.socket,
                queues: b.queues.unwrap_or(DEFAULT_QUEUES),
                qos: b.qos,
                interface: b.interface,
            };
            card.attach(name, &opts)
                .map(|v| json_response(200, &v))
                .map_err(|e| card_error(&e))
        }
        ("POST", ["v1", "volumes", name, "qos"]) => {
            let q: QosLimits = parse_body(req)?;
            card.set_qos(name, q)
                .map(|v| json_response(200, &v))
                .map_err(|e| card_error(&e))
        }
        ("POST", ["v1", "volumes", name, "detach"]) => card
            .detach(name)
            .map(|()| json_response(200, &json!({ "detached": name })))
            .map_err(|e| card_error(&e)),
        (
            _,
            ["v1", "devices"]
            | ["v1", "volumes"]
            | ["v1", "volumes", _]
            | ["v1", "volumes", _, "attach" | "detach" | "qos"],
        ) => Err(error(
            405,
            &format!("method {m} not allowed on {}", req.path),
        )),
        _ => Err(error(404, &format!("no endpoint {}", req.path))),
    })();
    result.unwrap_or_else(|e| e)
}

/// The error message of an error response body, for clients.
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("error")?.as_str().map(str::to_owned)
}
