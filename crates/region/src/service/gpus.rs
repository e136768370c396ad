//! GPU servers: each registers its physical GPUs as resource providers (GPU
//! memory, traits) under a lease, as hosts do; the region lists them.

use serde_json::{json, Value};

use super::{decode, encode, Region};
use crate::error::{RegionError, Result};
use crate::model::{
    keys, now, valid_name, GpuServer, GpuServerRegistration, GpuUsage, Vgpu, VgpuState,
};
use crate::store::Op;

/// Most adapters one server registers.
const MAX_ADAPTERS: usize = 64;

impl Region {
    /// A GPU server (re-)registers with a fresh lease; returns the lease's
    /// time-to-live.
    pub async fn register_gpu_server(
        &self,
        name: &str,
        offer: GpuServerRegistration,
    ) -> Result<std::time::Duration> {
        if !valid_name(name) {
            return Err(RegionError::Invalid(format!(
                "invalid GPU server name {name:?}"
            )));
        }
        if offer.adapters.is_empty() || offer.adapters.len() > MAX_ADAPTERS {
            return Err(RegionError::Invalid(format!(
                "a GPU server registers 1 to {MAX_ADAPTERS} adapters"
            )));
        }
        if offer.endpoint.len() > 255 || offer.endpoint.parse::<std::net::SocketAddr>().is_err() {
            return Err(RegionError::Invalid(format!(
                "endpoint {:?} is not an address:port",
                offer.endpoint
            )));
        }
        if offer.adapters.iter().any(|a| {
            a.name.len() > 256
                || a.traits.iter().any(|t| t.len() > 64)
                || a.traits.len() > 32
                || a.features.iter().any(|t| t.len() > 64)
                || a.features.len() > 256
                || a.limits.keys().any(|k| k.len() > 64)
                || a.limits.len() > 128
        }) {
            return Err(RegionError::Invalid(
                "adapter name, traits, features or limits too long or too many".into(),
            ));
        }
        let lease = self.store.grant(self.host_lease).await?;
        let g = GpuServer {
            name: name.to_owned(),
            offer,
            registered: now(),
        };
        self.store
            .txn(
                vec![],
                vec![
                    Op::put(keys::gpu_server(name), encode(&g)),
                    Op::Put {
                        key: keys::gpu_alive(name),
                        value: now().to_string().into_bytes(),
                        lease,
                    },
                ],
                vec![],
            )
            .await?;
        log::info!(
            "GPU server {name} registered ({} adapter(s))",
            g.offer.adapters.len()
        );
        Ok(self.host_lease)
    }

    /// A GPU server's heartbeat; NotFound when its lease is gone.
    pub async fn gpu_heartbeat(&self, name: &str) -> Result<()> {
        let kv = self
            .store
            .get(&keys::gpu_alive(name))
            .await?
            .ok_or_else(|| {
                RegionError::NotFound(format!(
                    "GPU server {name} is not registered (lease expired): register again"
                ))
            })?;
        self.store.keep_alive(kv.lease).await.map_err(|_| {
            RegionError::NotFound(format!("GPU server {name}'s lease expired: register again"))
        })
    }

    /// Every GPU server with its state and adapters, their free GPU memory
    /// and the vGPUs attached on them.
    pub async fn gpu_servers(&self) -> Result<Vec<Value>> {
        let (servers, _) = self.store.range(&keys::gpu_servers()).await?;
        let (alive, _) = self.store.range(&keys::gpu_alives()).await?;
        let (usages, _) = self.store.range(&keys::gpu_usages()).await?;
        let (vgpus, _) = self.store.range(&keys::vgpus()).await?;
        let vgpus: Vec<Vgpu> = vgpus.iter().map(decode).collect::<Result<_>>()?;
        servers
            .iter()
            .map(|kv| {
                let g: GpuServer = decode(kv)?;
                let up = alive.iter().any(|a| a.key == keys::gpu_alive(&g.name));
                let usage: GpuUsage = usages
                    .iter()
                    .find(|u| u.key == keys::gpu_usage(&g.name))
                    .map_or(Ok(GpuUsage::default()), decode)?;
                Ok(json!({
                    "name": g.name,
                    "state": if up { "up" } else { "down" },
                    "endpoint": g.offer.endpoint,
                    "frames_endpoint": g.offer.frames_endpoint,
                    "registered": g.registered,
                    "adapters": g.offer.adapters.iter().map(|a| json!({
                        "name": a.name,
                        "backend": a.backend,
                        "device_type": a.device_type,
                        "traits": a.traits,
                        "features": a.features,
                        "limits": a.limits,
                        "memory_bytes": a.memory_bytes,
                        "free_bytes": a.memory_bytes.saturating_sub(
                            usage.adapter_bytes.get(&a.name).copied().unwrap_or(0)),
                        "attachments": vgpus.iter()
                            .filter(|v| v.server == g.name && v.adapter == a.name && v.state != VgpuState::Detached)
                            .map(|v| json!({"id": v.id, "instance": v.instance, "type": v.vgpu_type, "state": v.state}))
                            .collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                }))
            })
            .collect()
    }
}
