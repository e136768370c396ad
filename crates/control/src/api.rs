//! The card's management API: JSON over HTTP on a unix socket, served by
//! axum (the region's HTTP stack). [`card_router`] routes the storage
//! function's calls; the daemon merges the other functions' routers (the
//! host agent's instances) and serves them all with [`ApiServer`].
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
//! thing), 405 (method), 409 (conflicts with the current state), 413
//! (body over 1 MiB) or 503 (device unavailable).

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use softcard_storage::crypto::{Kek, KeyError};
use softcard_storage::partition::PartitionError;
use softcard_storage::qos::QosLimits;
use softcard_storage::virtio_blk::BlkError;
use softcard_storage::{AttachOptions, CardError, Interface, StorageCard};

use crate::size::parse_size;

/// Largest request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Default virtqueue count of an attachment.
pub const DEFAULT_QUEUES: u16 = 1;

/// An API error: a status and a message, answered as `{"error": ...}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    /// An error with `status` (a valid HTTP status) and `msg`.
    pub fn new(status: u16, msg: impl Into<String>) -> Self {
        ApiError(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            msg.into(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(status: u16, v: &impl serde::Serialize) -> ApiResult {
    let body = serde_json::to_vec_pretty(v).unwrap_or_else(|_| b"{}".to_vec());
    Ok((
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// Parses a JSON body (after the route matched), or 400.
pub fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, format!("invalid request body: {e}")))
}

/// Runs a card operation off the async threads (it may write and flush
/// the device's metadata), turning a panic into a 500.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|_| Err(ApiError::new(500, "internal error (see the daemon log)")))
}

fn card_error(e: &CardError) -> ApiError {
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
        CardError::Interface(_) | CardError::DuplicateDevice(_) | CardError::State(_) => 500,
    };
    ApiError::new(status, e.to_string())
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

type Card = State<Arc<StorageCard>>;

async fn devices(State(card): Card) -> ApiResult {
    ok(200, &card.devices())
}

async fn volumes(State(card): Card) -> ApiResult {
    ok(200, &card.volumes())
}

async fn create_volume(State(card): Card, body: axum::body::Bytes) -> ApiResult {
    let b: CreateVolume = parse_body(&body)?;
    let size = match b.size {
        SizeArg::Bytes(n) => n,
        SizeArg::Text(t) => parse_size(&t).map_err(|e| ApiError::new(400, e))?,
    };
    let v = blocking(move || {
        match (b.encrypt, &b.tenant) {
            (false, None) => card.create_volume(&b.name, &b.device, size),
            (true, Some(t)) => card.create_encrypted_volume(&b.name, &b.device, size, t),
            (true, None) => return Err(ApiError::new(400, "an encrypted volume needs a tenant")),
            (false, Some(_)) => {
                return Err(ApiError::new(
                    400,
                    "a tenant is only meaningful with encryption",
                ))
            }
        }
        .map_err(|e| card_error(&e))
    })
    .await?;
    ok(201, &v)
}

async fn volume(State(card): Card, UrlPath(name): UrlPath<String>) -> ApiResult {
    ok(200, &card.volume(&name).map_err(|e| card_error(&e))?)
}

async fn delete_volume(State(card): Card, UrlPath(name): UrlPath<String>) -> ApiResult {
    let v = blocking(move || card.delete_volume(&name).map_err(|e| card_error(&e))).await?;
    ok(200, &v)
}

async fn attach(
    State(card): Card,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let b: Attach = parse_body(&body)?;
    if !b.socket.is_absolute() {
        return Err(ApiError::new(400, "socket must be an absolute path"));
    }
    if b.interface == Interface::Nbd && b.queues.is_some() {
        return Err(ApiError::new(
            400,
            "queues apply to vhost-user-blk, not to nbd",
        ));
    }
    let opts = AttachOptions {
        socket: b.socket,
        queues: b.queues.unwrap_or(DEFAULT_QUEUES),
        qos: b.qos,
        interface: b.interface,
    };
    let v = blocking(move || card.attach(&name, &opts).map_err(|e| card_error(&e))).await?;
    ok(200, &v)
}

async fn set_qos(
    State(card): Card,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let q: QosLimits = parse_body(&body)?;
    ok(200, &card.set_qos(&name, q).map_err(|e| card_error(&e))?)
}

async fn detach(State(card): Card, UrlPath(name): UrlPath<String>) -> ApiResult {
    let n = name.clone();
    blocking(move || card.detach(&n).map_err(|e| card_error(&e))).await?;
    ok(200, &json!({ "detached": name }))
}

fn metrics_text(card: &StorageCard) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::prometheus::render(&card.stats()),
    )
        .into_response()
}

async fn metrics(State(card): Card) -> Response {
    metrics_text(&card)
}

/// Counters of one volume with latency quantiles read off its histograms.
async fn volume_stats(State(card): Card, UrlPath(name): UrlPath<String>) -> ApiResult {
    let info = card.volume(&name).map_err(|e| card_error(&e))?;
    let m = card
        .stats()
        .into_iter()
        .flat_map(|d| d.volumes)
        .find(|(v, _)| *v == name)
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
    ok(
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
    )
}

async fn tenants(State(card): Card) -> ApiResult {
    let t: Vec<Value> = card
        .tenants()
        .into_iter()
        .map(|(name, error)| json!({ "name": name, "error": error }))
        .collect();
    ok(200, &t)
}

async fn rotate_key(
    State(card): Card,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let b: RotateKey = parse_body(&body)?;
    let text = std::fs::read_to_string(&b.new_kek_file).map_err(|e| {
        ApiError::new(
            400,
            format!("cannot read {}: {e}", b.new_kek_file.display()),
        )
    })?;
    let text = zeroize::Zeroizing::new(text);
    let kek = Kek::from_hex(&text).map_err(|e| ApiError::new(400, e.to_string()))?;
    let n2 = name.clone();
    let n = blocking(move || card.rotate_tenant_key(&n2, kek).map_err(|e| card_error(&e))).await?;
    ok(200, &json!({ "tenant": name, "rewrapped": n }))
}

/// The storage function's routes.
pub fn card_router(card: Arc<StorageCard>) -> Router {
    Router::new()
        .route("/v1/devices", get(devices))
        .route("/v1/volumes", get(volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(volume).delete(delete_volume))
        .route("/v1/volumes/{name}/attach", post(attach))
        .route("/v1/volumes/{name}/detach", post(detach))
        .route("/v1/volumes/{name}/qos", post(set_qos))
        .route("/v1/volumes/{name}/stats", get(volume_stats))
        .route("/v1/metrics", get(metrics))
        .route("/v1/tenants", get(tenants))
        .route("/v1/tenants/{name}/rotate-key", post(rotate_key))
        .with_state(card)
}

/// What every API router shares: answers for unknown paths and wrong
/// methods in the API's own error shape, and the body limit.
pub fn finish_router(r: Router) -> Router {
    r.fallback(|uri: axum::http::Uri| async move {
        ApiError::new(404, format!("no endpoint {}", uri.path()))
    })
    .method_not_allowed_fallback(|m: axum::http::Method, uri: axum::http::Uri| async move {
        ApiError::new(405, format!("method {m} not allowed on {}", uri.path()))
    })
    .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
    .layer(axum::middleware::from_fn(refuse_large_bodies))
}

/// A declared body over the limit is refused before anything is read.
async fn refuse_large_bodies(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return ApiError::new(413, format!("request body over {MAX_BODY_BYTES} bytes"))
            .into_response();
    }
    next.run(req).await
}

/// A running API server on a unix socket.
#[derive(Debug)]
pub struct ApiServer {
    socket: PathBuf,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
    /// A duplicate of the listening socket, to hand on to a successor.
    listener: std::os::fd::OwnedFd,
    /// Leave the socket file at stop (a successor serves it).
    keep_socket: bool,
}

/// How long a stopping server lets requests in flight finish before it
/// drops the connections left (a client that never finishes its request
/// cannot hold the daemon up).
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a client may take to send a request's header.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A listening socket a server takes connections on.
#[derive(Debug)]
enum Listener {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

enum L {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl L {
    async fn accept(&self) -> io::Result<Conn> {
        match self {
            L::Unix(u) => u.accept().await.map(|(s, _)| Conn::Unix(s)),
            L::Tcp(t) => t.accept().await.map(|(s, _)| Conn::Tcp(s)),
        }
    }
}

/// One connection: hyper's HTTP/1.1 with a deadline on the request
/// header, answering half-closed connections too.
async fn serve_connection<I>(io: I, app: Router)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let _ = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .serve_connection(io, svc)
        .await;
}

/// Serves `app` on `listener` in a thread with a runtime of its own (one
/// thread: the control plane's, never the data path's), until the
/// returned sender is used. Each connection is hyper's HTTP/1.1 with a
/// deadline on the request header, and half-closed connections (a client
/// that shuts its side after sending) still get their answer.
fn spawn_server(
    name: &str,
    listener: Listener,
    app: Router,
) -> io::Result<(tokio::sync::watch::Sender<bool>, JoinHandle<()>)> {
    use hyper_util::rt::TokioIo;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            rt.block_on(async move {
                let l = match listener {
                    Listener::Unix(u) => tokio::net::UnixListener::from_std(u).map(L::Unix),
                    Listener::Tcp(t) => tokio::net::TcpListener::from_std(t).map(L::Tcp),
                };
                let Ok(l) = l else { return };
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    let accepted = tokio::select! {
                        a = l.accept() => a,
                        _ = stopped.changed() => break,
                        Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                    };
                    match accepted {
                        Ok(Conn::Unix(s)) => {
                            conns.spawn(serve_connection(TokioIo::new(s), app.clone()));
                        }
                        Ok(Conn::Tcp(s)) => {
                            conns.spawn(serve_connection(TokioIo::new(s), app.clone()));
                        }
                        Err(e) => log::warn!("accepting a connection: {e}"),
                    }
                }
                let _ = tokio::time::timeout(STOP_GRACE, async {
                    while conns.join_next().await.is_some() {}
                })
                .await;
            });
        })?;
    Ok((stop, thread))
}

impl ApiServer {
    /// Serves `router` on `socket` (creating its directory; replacing a
    /// stale socket, never another kind of file or a live socket).
    pub fn start(router: Router, socket: &Path) -> io::Result<Self> {
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
        let listener = std::os::unix::net::UnixListener::bind(socket)?;
        Self::adopt(router, socket, listener)
    }

    /// Serves `router` on `listener`, the socket at `socket` that the card
    /// process this one replaces handed over.
    pub fn adopt(
        router: Router,
        socket: &Path,
        listener: std::os::unix::net::UnixListener,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let dup = std::os::fd::OwnedFd::from(listener.try_clone()?);
        let (stop, thread) = spawn_server("api", Listener::Unix(listener), finish_router(router))?;
        log::info!("management API on {}", socket.display());
        Ok(ApiServer {
            socket: socket.to_owned(),
            stop: Some(stop),
            thread: Some(thread),
            listener: dup,
            keep_socket: false,
        })
    }

    /// The listening socket.
    pub fn listener(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }

    /// Stops serving (requests in flight finish) and leaves the socket to
    /// the successor that holds a duplicate of it.
    pub fn hand_over(mut self) {
        self.keep_socket = true;
        self.shutdown();
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops serving and removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if !self.keep_socket {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serves `GET /metrics` on a TCP address for Prometheus.
#[derive(Debug)]
pub struct MetricsServer {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
    /// A duplicate of the listening socket, to hand on to a successor.
    listener: std::os::fd::OwnedFd,
}

impl MetricsServer {
    /// Listens on `addr` (port 0 picks one; see [`MetricsServer::addr`]).
    pub fn start(card: Arc<StorageCard>, addr: std::net::SocketAddr) -> io::Result<Self> {
        Self::adopt(card, std::net::TcpListener::bind(addr)?)
    }

    /// Serves on `listener`, handed over by the card process this one
    /// replaces.
    pub fn adopt(card: Arc<StorageCard>, listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let dup = std::os::fd::OwnedFd::from(listener.try_clone()?);
        let app = finish_router(
            Router::new()
                .route(
                    "/metrics",
                    get(|State(c): Card| async move { metrics_text(&c) }),
                )
                .with_state(card),
        );
        let (stop, thread) = spawn_server("metrics", Listener::Tcp(listener), app)?;
        log::info!("Prometheus metrics on http://{addr}/metrics");
        Ok(MetricsServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
            listener: dup,
        })
    }

    /// The listening socket.
    pub fn listener(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }

    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
