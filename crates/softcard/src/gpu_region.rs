//! A GPU server in a region (`softcard gpu serve --region`, and the one
//! `softcard up` starts): its certificate from the region's authority, so
//! the vGPU port speaks TLS that instances verify; admission by the
//! credentials of the vGPUs the region attached on it; the frames endpoint
//! the region's console reads; and its registration under a lease.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use softcard_gpu::server::grants::Grants;
use softcard_gpu::server::{Admission, Grant};
use softcard_gpu::tls::ServerTls;
use softcard_gpu::{GpuServer, ServerConfig};
use softcard_region::client::{RegionClient, Registration};

/// How often a region GPU server reads its attachments.
const GRANTS_REFRESH: Duration = Duration::from_millis(500);

/// What the region learns of an adapter: name, backend, kind, the GPU
/// memory offered, the features and limits a vGPU on it gets, and traits
/// (`CUSTOM_<KIND>`, `CUSTOM_<BACKEND>`).
pub fn registration(
    server: &GpuServer,
    endpoint: &str,
    frames_endpoint: &str,
    memory: u64,
) -> Value {
    let info = server.adapter_info();
    let (features, limits) = server.offer();
    let kind = format!("{:?}", info.device_type);
    let backend = format!("{:?}", info.backend);
    json!({
        "endpoint": endpoint,
        "frames_endpoint": frames_endpoint,
        "adapters": [{
            "name": info.name,
            "backend": backend,
            "device_type": kind,
            "memory_bytes": memory,
            "features": features,
            "limits": limits,
            "traits": [
                format!("CUSTOM_{}", kind.to_uppercase()),
                format!("CUSTOM_{}", backend.to_uppercase()),
            ],
        }],
    })
}

/// Where a region GPU server listens and what it offers.
#[derive(Debug, Clone)]
pub struct Options {
    /// The vGPU port (host:port).
    pub listen: String,
    /// The frames endpoint (host:port).
    pub frames_listen: String,
    /// The vGPU address as registered (default: the bound one).
    pub endpoint: Option<String>,
    /// GPU memory offered to vGPUs.
    pub memory: u64,
}

/// A running region GPU server; it leaves the region when dropped.
#[derive(Debug)]
pub struct RegionGpu {
    pub server: Arc<GpuServer>,
    /// Its name in the region.
    pub name: String,
    /// The bound vGPU port.
    pub endpoint: SocketAddr,
    /// The bound frames endpoint.
    pub frames: SocketAddr,
    _lease: Registration,
}

/// A fresh key, and the region's certificate for it:
/// (certificate PEM, key PEM, this server's name).
fn certificate(client: &RegionClient) -> Result<(String, String, String)> {
    let (key, csr) = softcard_region::ca::new_key_and_csr().map_err(|e| anyhow!(e))?;
    let c = client
        .post("/v1/agent/gpu/certificate", &json!({"csr": csr}))
        .context("the region's certificate for this GPU server")?;
    let field = |k: &str| {
        c[k].as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("the region's certificate answer has no {k}"))
    };
    Ok((field("certificate")?, key, field("gpu_server")?))
}

/// Starts a GPU server in the region `client` speaks to.
pub fn start(client: RegionClient, o: &Options) -> Result<RegionGpu> {
    let (cert, key, name) = certificate(&client)?;
    let tls = ServerTls::from_pem(&cert, &key)?;
    let grants = Arc::new(Grants::new(&name));
    let admission: Arc<dyn Admission> = grants.clone();
    let server = GpuServer::new(ServerConfig {
        quota: 0,
        admission: Some(admission.clone()),
        tls: Some(tls.clone()),
    })
    .map_err(|e| anyhow!(e))?;
    let endpoint = server
        .listen(&o.listen)
        .with_context(|| format!("listen on {}", o.listen))?;
    let fl = std::net::TcpListener::bind(&o.frames_listen)
        .with_context(|| format!("frames endpoint on {}", o.frames_listen))?;
    let frames = fl.local_addr()?;
    softcard_gpu::frames::serve(
        fl,
        softcard_gpu::frames::FramesEndpoint {
            hub: server.frames(),
            admission,
            tls: tls.clone(),
        },
    )?;
    follow(client.clone(), grants, Arc::downgrade(&server), tls)?;
    let offer = registration(
        &server,
        &o.endpoint.clone().unwrap_or(endpoint.to_string()),
        &frames.to_string(),
        o.memory,
    );
    let lease = Registration::start(
        client,
        "/v1/agent/gpu/register",
        "/v1/agent/gpu/heartbeat",
        move || offer.clone(),
    )?;
    Ok(RegionGpu {
        server,
        name,
        endpoint,
        frames,
        _lease: lease,
    })
}

/// The grants in the region's answer: credential hash -> grant.
fn grants_of(work: &Value) -> HashMap<String, Grant> {
    work["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            Some((
                a["credential_hash"].as_str()?.to_owned(),
                Grant {
                    attachment: a["id"].as_str()?.to_owned(),
                    quota: a["memory_bytes"].as_u64()?,
                },
            ))
        })
        .collect()
}

/// Tells the region which attachments are now `attached` or `released`
/// on this server (nothing when there are none).
fn report(client: &RegionClient, what: &str, ids: &[&str]) {
    if ids.is_empty() {
        return;
    }
    if let Err(e) = client.post(
        &format!("/v1/agent/gpu/{what}"),
        &json!({ "attachments": ids }),
    ) {
        log::warn!("telling the region attachments are {what}: {e}");
    }
}

/// Keeps the grants in step with the region for as long as `server`
/// lives, ending the sessions of attachments the region revoked, and
/// renews the certificate every [`softcard_region::ca::RENEW_AFTER`].
fn follow(
    client: RegionClient,
    grants: Arc<Grants>,
    server: Weak<GpuServer>,
    tls: Arc<ServerTls>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("vgpu-grants".into())
        .spawn(move || {
            let mut renewed = Instant::now();
            loop {
                let Some(server) = server.upgrade() else {
                    return;
                };
                match client.get("/v1/agent/gpu/work") {
                    Ok(w) => {
                        for a in grants.set(grants_of(&w)) {
                            server.revoke(&a);
                        }
                        // The grants are in place: attaching ones are
                        // attached now.
                        let new: Vec<&str> = w["attachments"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|a| a["state"] == "attaching")
                            .filter_map(|a| a["id"].as_str())
                            .collect();
                        // Detached ones: their sessions are ended (just
                        // above, or earlier); their memory can go back.
                        let released: Vec<&str> = w["releasing"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                            .inspect(|a| {
                                server.revoke(a);
                            })
                            .collect();
                        // Only once their sessions have let go of the
                        // memory (else at the next read).
                        let held = server.attachment_usage();
                        let released: Vec<&str> = released
                            .into_iter()
                            .filter(|a| held.get(*a).copied().unwrap_or(0) == 0)
                            .collect();
                        report(&client, "released", &released);
                        report(&client, "attached", &new);
                    }
                    Err(e) => log::warn!("reading this GPU server's attachments: {e}"),
                }
                if renewed.elapsed() >= softcard_region::ca::RENEW_AFTER {
                    match certificate(&client).and_then(|(c, k, _)| Ok(tls.replace(&c, &k)?)) {
                        Ok(()) => {
                            renewed = Instant::now();
                            log::info!("vGPU certificate renewed");
                        }
                        Err(e) => log::warn!("renewing the vGPU certificate: {e:#}"),
                    }
                }
                drop(server);
                std::thread::sleep(GRANTS_REFRESH);
            }
        })?;
    Ok(())
}
