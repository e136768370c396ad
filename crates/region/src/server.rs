//! `softcard region serve`: the store, the region's logic, the election and
//! the HTTP(S) listener, until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{router, AppState};
use crate::leader::{self, Election};
use crate::service::{Region, HOST_LEASE};
use crate::store;

/// How the region runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// `redb:PATH` or `etcd:URL[,URL...]`.
    pub store: String,
    /// The admin credential's file (created at first start, mode 0600).
    pub admin_credential: PathBuf,
    /// PEM certificate chain and key for HTTPS; plain HTTP without.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Hosts' lease.
    pub host_lease: Duration,
}

impl ServeOptions {
    /// Defaults for `listen` and `store`.
    pub fn new(listen: SocketAddr, store: String, admin_credential: PathBuf) -> Self {
        ServeOptions {
            listen,
            store,
            admin_credential,
            tls: None,
            host_lease: HOST_LEASE,
        }
    }
}

/// Errors of starting the region.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    /// The region could not start.
    #[error("{0}")]
    Region(#[from] crate::error::RegionError),
    /// Listening or TLS failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A started region.
#[derive(Debug)]
pub struct Started {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The region.
    pub region: Arc<Region>,
    /// The admin credential.
    pub admin: String,
    handle: axum_server::Handle,
}

impl Started {
    /// Stops serving (connections in flight get a second to finish).
    pub fn shutdown(&self) {
        self.handle.graceful_shutdown(Some(Duration::from_secs(1)));
    }
}

/// Opens the store and starts serving in the background of the current
/// tokio runtime.
pub async fn start(opts: &ServeOptions) -> Result<Started, ServeError> {
    let store = store::open(&opts.store).await?;
    let region = Region::new(store, opts.host_lease).await?;
    let admin = region
        .ensure_admin_credential(&opts.admin_credential)
        .await?;
    let election = Arc::new(Election::new(format!(
        "region-{:08x}",
        rand::random::<u32>()
    )));
    leader::run(&region, election.clone());
    let app = router(AppState {
        region: region.clone(),
        election,
    });
    let handle = axum_server::Handle::new();
    let listener = std::net::TcpListener::bind(opts.listen)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let h = handle.clone();
    match &opts.tls {
        Some((cert, key)) => {
            // ring rather than aws-lc-rs: no C toolchain beyond what the
            // project builds already; its only lack, post-quantum key
            // exchange, is not needed on this API.
            #[allow(deprecated)]
            let _ = rustls::crypto::ring::default_provider().install_default();
            let cfg = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key).await?;
            let server = axum_server::from_tcp_rustls(listener, cfg).handle(h);
            tokio::spawn(async move { server.serve(app.into_make_service()).await });
        }
        None => {
            let server = axum_server::from_tcp(listener).handle(h);
            tokio::spawn(async move { server.serve(app.into_make_service()).await });
        }
    }
    log::info!(
        "region on {}://{addr} (store {})",
        if opts.tls.is_some() { "https" } else { "http" },
        opts.store
    );
    Ok(Started {
        addr,
        region,
        admin,
        handle,
    })
}

/// A region served from a thread of its own (for tests, benchmarks and
/// `softcard up`, whose other parts are not async); stopped when dropped.
#[derive(Debug)]
pub struct Background {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The admin credential.
    pub admin: String,
    tls: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Starts a region on a runtime of `threads` worker threads.
    pub fn start(opts: ServeOptions, threads: usize) -> Result<Self, ServeError> {
        let tls = opts.tls.is_some();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("region".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads.max(1))
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(ServeError::Io(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    match start(&opts).await {
                        Ok(s) => {
                            let _ = tx.send(Ok((s.addr, s.admin.clone())));
                            let _ = stop_rx.await;
                            s.shutdown();
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            })?;
        let (addr, admin) = rx
            .recv()
            .map_err(|_| std::io::Error::other("region thread died"))??;
        Ok(Background {
            addr,
            admin,
            tls,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The region's URL.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
