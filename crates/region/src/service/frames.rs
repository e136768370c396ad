//! The console's view of a vGPU: its latest frame, read from its GPU
//! server's frames endpoint (HTTPS, verified with the region's own
//! authority) with the attachment's credential, which only the region and
//! the instance hold. The tenant proves ownership to the region; the GPU
//! server never sees a tenant credential, and a viewer URL alone shows
//! nothing.

use std::collections::HashMap;
use std::time::Duration;

use super::instances::read;
use super::Region;
use crate::error::{RegionError, Result};
use crate::model::{keys, GpuServer, Vgpu, VgpuState};

/// One frame: its number on the GPU server, its size and its JPEG.
#[derive(Debug)]
pub struct VgpuFrame {
    pub seq: u64,
    pub size: String,
    pub jpeg: axum::body::Bytes,
}

/// HTTPS clients of GPU servers' frames endpoints, by server and address.
#[derive(Debug, Default)]
pub(crate) struct FrameClients(std::sync::Mutex<HashMap<(String, String), reqwest::Client>>);

impl FrameClients {
    fn get(&self, server: &str, addr: &str, ca_pem: &str) -> Result<reqwest::Client> {
        let key = (server.to_owned(), addr.to_owned());
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get(&key) {
            return Ok(c.clone());
        }
        let bad = |e: String| RegionError::Conflict(format!("GPU server {server}: {e}"));
        let sock: std::net::SocketAddr = addr
            .parse()
            .map_err(|e| bad(format!("frames endpoint {addr:?}: {e}")))?;
        let ca =
            reqwest::Certificate::from_pem(ca_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let c = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .resolve(&crate::ca::gpu_server_name(server), sock)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| bad(e.to_string()))?;
        m.insert(key, c.clone());
        Ok(c)
    }
}

impl Region {
    /// The newest frame of vGPU `id` after `after`, waiting up to a couple
    /// of seconds for one; `None` when none came. `tenant` must own it
    /// (`None`: the admin).
    pub async fn vgpu_frame(
        &self,
        tenant: Option<&str>,
        id: &str,
        after: u64,
    ) -> Result<Option<VgpuFrame>> {
        let not_found = || RegionError::NotFound(format!("no vGPU {id}"));
        let v = read::<Vgpu>(self, &keys::vgpu(id))
            .await?
            .ok_or_else(not_found)?
            .value;
        if tenant.is_some_and(|t| t != v.tenant) {
            return Err(not_found());
        }
        if v.state != VgpuState::Attached {
            return Err(RegionError::Conflict(format!("vGPU {id} is not attached")));
        }
        let server = read::<GpuServer>(self, &keys::gpu_server(&v.server))
            .await?
            .ok_or_else(|| RegionError::Conflict(format!("GPU server {} is gone", v.server)))?
            .value;
        let addr = server.offer.frames_endpoint.ok_or_else(|| {
            RegionError::Conflict(format!("GPU server {} serves no frames", v.server))
        })?;
        let secret = self
            .store
            .get(&keys::vgpu_secret(id))
            .await?
            .ok_or_else(|| RegionError::Conflict(format!("vGPU {id} has no credential")))?;
        let client = self
            .frame_clients
            .get(&v.server, &addr, &self.ca.cert_pem)?;
        let url = format!(
            "https://{}:{}/v1/attachments/{id}/frame?after={after}",
            crate::ca::gpu_server_name(&v.server),
            addr.rsplit(':').next().unwrap_or("0")
        );
        let unreachable =
            |e: String| RegionError::Conflict(format!("GPU server {}: {e}", v.server));
        let r = client
            .get(url)
            .bearer_auth(String::from_utf8_lossy(&secret.value))
            .send()
            .await
            .map_err(|e| unreachable(format!("{e:#}")))?;
        match r.status().as_u16() {
            204 => Ok(None),
            200 => {
                let header = |k: &str| {
                    r.headers()
                        .get(k)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let seq = header("x-frame-seq")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let size = header("x-frame-size").unwrap_or_default();
                let jpeg = r.bytes().await.map_err(|e| unreachable(e.to_string()))?;
                Ok(Some(VgpuFrame { seq, size, jpeg }))
            }
            s => Err(unreachable(format!(
                "frames endpoint answered {s}: {}",
                r.text().await.unwrap_or_default().trim()
            ))),
        }
    }
}
