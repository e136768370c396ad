//! vGPUs: GPU memory on a registered GPU server's adapter, claimed for an
//! instance at launch (with the host, in one transaction: both or
//! neither) or attached to it later (our extension), given back at detach
//! and terminate. Placement packs vGPUs onto the fewest GPUs.

use serde_json::{json, Value};

use super::instances::read;
use super::{decode, encode, Region};
use crate::error::{RegionError, Result};
use crate::model::{
    keys, new_id, now, vgpu_type, GpuUsage, Instance, InstanceState, Vgpu, VgpuState,
};
use crate::placement::GpuChoice;
use crate::store::{Compare, Op};

/// Most attachments one acknowledgement names.
const MAX_ACKS: usize = 4096;

/// Claims tried before an attach gives up.
const MAX_CLAIM_ATTEMPTS: usize = 64;

impl Region {
    /// The adapter for a vGPU of type `name`, and the vGPU record to write:
    /// the best candidate of the placement view (read again once when it
    /// has none).
    pub(crate) async fn vgpu_choice(
        &self,
        tenant: &str,
        instance: &str,
        name: &str,
    ) -> Result<(GpuChoice, Vgpu, String)> {
        let ty = vgpu_type(name).ok_or_else(|| {
            RegionError::Invalid(format!(
                "unknown vGPU type {name:?} (eg1.medium, eg1.large, eg1.xlarge, eg1.2xlarge)"
            ))
        })?;
        let mut best = self
            .placement
            .gpu_candidates(ty.memory_bytes)
            .into_iter()
            .next();
        if best.is_none() {
            self.placement.reload(&*self.store).await?;
            best = self
                .placement
                .gpu_candidates(ty.memory_bytes)
                .into_iter()
                .next();
        }
        let c = best.ok_or_else(|| {
            RegionError::NoCapacity(format!(
                "no capacity: no GPU server that is up has an adapter with {} free bytes of GPU memory",
                ty.memory_bytes
            ))
        })?;
        let id = new_id("egpu");
        let secret = vgpu_credential(&c.server, &id);
        let v = Vgpu {
            credential_hash: super::secret_hash(&secret),
            id,
            tenant: tenant.to_owned(),
            instance: instance.to_owned(),
            vgpu_type: ty.name.to_owned(),
            memory_bytes: ty.memory_bytes,
            server: c.server.clone(),
            adapter: c.adapter.clone(),
            endpoint: c.endpoint.clone(),
            // Attached once its GPU server says it admits the credential.
            state: VgpuState::Attaching,
            created: now(),
        };
        Ok((c, v, secret))
    }

    /// The compares and writes of a vGPU claim (its server's usage, the
    /// record), and the read that refreshes the view when it fails.
    pub(crate) fn vgpu_claim_ops(c: &GpuChoice, v: &Vgpu, secret: &str) -> (Compare, Vec<Op>, Op) {
        let key = keys::gpu_usage(&c.server);
        let cmp = if c.usage_revision == 0 {
            Compare::Absent(key.clone())
        } else {
            Compare::ModRevision(key.clone(), c.usage_revision)
        };
        (
            cmp,
            vec![
                Op::put(key.clone(), encode(&c.usage)),
                Op::put(keys::vgpu(&v.id), encode(v)),
                Op::put(keys::vgpu_secret(&v.id), secret),
            ],
            Op::Get(key),
        )
    }

    /// After a failed claim: the view takes the fresh usage read.
    pub(crate) fn refresh_gpu(&self, read: Option<&Option<crate::store::KeyValue>>) {
        if let Some(Some(kv)) = read {
            self.placement.refresh_usage(kv);
        }
    }

    /// Attaches a vGPU of `type` to a tenant's instance (running or
    /// stopped; one per instance).
    pub async fn attach_vgpu(&self, tenant: &str, instance: &str, name: &str) -> Result<Vgpu> {
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let i = self.instance(Some(tenant), instance).await?;
            if i.value.vgpu.is_some() {
                return Err(RegionError::Conflict(format!(
                    "instance {} has a vGPU already",
                    i.value.id
                )));
            }
            if !matches!(
                i.value.state,
                InstanceState::Running | InstanceState::Stopped | InstanceState::Pending
            ) {
                return Err(RegionError::Conflict(format!(
                    "instance {} is {}",
                    i.value.id,
                    i.value.state.name()
                )));
            }
            let (c, v, secret) = self.vgpu_choice(tenant, &i.value.id, name).await?;
            let (cmp, mut then, get) = Self::vgpu_claim_ops(&c, &v, &secret);
            let mut inst = i.value.clone();
            inst.vgpu = Some(v.id.clone());
            then.push(Op::put(keys::instance(&inst.id), encode(&inst)));
            let r = self
                .store
                .txn(
                    vec![
                        cmp,
                        Compare::ModRevision(keys::instance(&inst.id), i.revision),
                    ],
                    then,
                    vec![get],
                )
                .await?;
            if r.succeeded {
                self.placement
                    .claimed(&keys::gpu_usage(&c.server), encode(&c.usage), r.revision);
                return Ok(v);
            }
            self.refresh_gpu(r.reads.first());
        }
        Err(RegionError::NoCapacity(
            "no capacity: every claim lost its race; try again".into(),
        ))
    }

    /// The writes that give a vGPU's memory back and mark it detached.
    pub(crate) async fn vgpu_release_ops(
        &self,
        vgpu_id: &str,
        when: &mut Vec<Compare>,
        then: &mut Vec<Op>,
    ) -> Result<()> {
        let Some(v) = read::<Vgpu>(self, &keys::vgpu(vgpu_id)).await? else {
            return Ok(());
        };
        let mut vg = v.value;
        if matches!(vg.state, VgpuState::Detached | VgpuState::Detaching) {
            return Ok(());
        }
        // Revoked now: the GPU server no longer admits it, and ends its
        // sessions.
        then.push(Op::Delete(keys::vgpu_secret(&vg.id)));
        when.push(Compare::ModRevision(keys::vgpu(&vg.id), v.revision));
        if self
            .store
            .get(&keys::gpu_alive(&vg.server))
            .await?
            .is_some()
        {
            // Its memory stays claimed until the GPU server says the
            // sessions are gone.
            vg.state = VgpuState::Detaching;
            then.push(Op::put(keys::vgpu(&vg.id), encode(&vg)));
            return Ok(());
        }
        // Its GPU server is down: nothing runs there to wait for.
        self.release_gpu_memory_ops(vg, when, then).await
    }

    /// The writes that give a vGPU's memory back and mark it detached
    /// (`vg` read at a revision already compared in `when`).
    async fn release_gpu_memory_ops(
        &self,
        mut vg: Vgpu,
        when: &mut Vec<Compare>,
        then: &mut Vec<Op>,
    ) -> Result<()> {
        let key = keys::gpu_usage(&vg.server);
        let u = read::<GpuUsage>(self, &key).await?;
        let (mut usage, rev) = u.map_or((GpuUsage::default(), 0), |u| (u.value, u.revision));
        if let Some(b) = usage.adapter_bytes.get_mut(&vg.adapter) {
            *b = b.saturating_sub(vg.memory_bytes);
        }
        when.push(if rev == 0 {
            Compare::Absent(key.clone())
        } else {
            Compare::ModRevision(key.clone(), rev)
        });
        vg.state = VgpuState::Detached;
        then.push(Op::put(key, encode(&usage)));
        then.push(Op::put(keys::vgpu(&vg.id), encode(&vg)));
        Ok(())
    }

    /// GPU server `server` has ended the sessions of `ids`: those of them
    /// detaching are detached and their memory is given back. Returns
    /// how many changed.
    pub async fn gpu_released(&self, server: &str, ids: &[String]) -> Result<usize> {
        let mut n = 0;
        for id in ids.iter().take(MAX_ACKS) {
            loop {
                let Some(v) = read::<Vgpu>(self, &keys::vgpu(id)).await? else {
                    break;
                };
                if v.value.server != server || v.value.state != VgpuState::Detaching {
                    break;
                }
                let mut when = vec![Compare::ModRevision(keys::vgpu(id), v.revision)];
                let mut then = Vec::new();
                self.release_gpu_memory_ops(v.value, &mut when, &mut then)
                    .await?;
                let r = self.store.txn(when, then, vec![]).await?;
                if r.succeeded {
                    n += 1;
                    break;
                }
            }
        }
        Ok(n)
    }

    /// Detaches an instance's vGPU: its memory is given back.
    pub async fn detach_vgpu(&self, tenant: Option<&str>, instance: &str) -> Result<Vgpu> {
        loop {
            let i = self.instance(tenant, instance).await?;
            let Some(id) = i.value.vgpu.clone() else {
                return Err(RegionError::Conflict(format!(
                    "instance {} has no vGPU",
                    i.value.id
                )));
            };
            let mut when = vec![Compare::ModRevision(
                keys::instance(&i.value.id),
                i.revision,
            )];
            let mut then = Vec::new();
            self.vgpu_release_ops(&id, &mut when, &mut then).await?;
            let mut inst: Instance = i.value.clone();
            inst.vgpu = None;
            then.push(Op::put(keys::instance(&inst.id), encode(&inst)));
            if self.store.txn(when, then, vec![]).await?.succeeded {
                let v = read::<Vgpu>(self, &keys::vgpu(&id)).await?;
                return v
                    .map(|v| v.value)
                    .ok_or_else(|| RegionError::NotFound(format!("no vGPU {id}")));
            }
        }
    }

    /// What a GPU server must admit: the attached vGPUs on its adapters,
    /// each with its credential's hash and its GPU memory.
    pub async fn gpu_work(&self, server: &str) -> Result<Value> {
        let (kvs, revision) = self.store.range(&keys::vgpus()).await?;
        let vgpus: Vec<Vgpu> = kvs.iter().map(decode).collect::<Result<_>>()?;
        let mut out = Vec::new();
        for v in &vgpus {
            if v.server == server && matches!(v.state, VgpuState::Attaching | VgpuState::Attached) {
                out.push(json!({
                    "id": v.id,
                    "state": v.state,
                    "adapter": v.adapter,
                    "memory_bytes": v.memory_bytes,
                    "credential_hash": v.credential_hash,
                }));
            }
        }
        let releasing: Vec<&str> = vgpus
            .iter()
            .filter(|v| v.server == server && v.state == VgpuState::Detaching)
            .map(|v| v.id.as_str())
            .collect();
        Ok(json!({"attachments": out, "releasing": releasing, "revision": revision}))
    }

    /// GPU server `server` admits the credentials of `ids` now: those of
    /// them still attaching are attached. Returns how many changed.
    pub async fn gpu_attached(&self, server: &str, ids: &[String]) -> Result<usize> {
        let mut n = 0;
        for id in ids.iter().take(MAX_ACKS) {
            loop {
                let Some(v) = read::<Vgpu>(self, &keys::vgpu(id)).await? else {
                    break;
                };
                if v.value.server != server || v.value.state != VgpuState::Attaching {
                    break;
                }
                let mut vg = v.value;
                vg.state = VgpuState::Attached;
                let key = keys::vgpu(id);
                let r = self
                    .store
                    .txn(
                        vec![Compare::ModRevision(key.clone(), v.revision)],
                        vec![Op::put(key, encode(&vg))],
                        vec![],
                    )
                    .await?;
                if r.succeeded {
                    n += 1;
                    break;
                }
            }
        }
        Ok(n)
    }

    /// An instance's vGPU as its host hands it to the instance: endpoint,
    /// credential and whom to trust; only once its GPU server admits it.
    pub(crate) async fn vgpu_for_instance(&self, id: &str) -> Result<Option<Value>> {
        let Some(v) = read::<Vgpu>(self, &keys::vgpu(id)).await? else {
            return Ok(None);
        };
        if v.value.state != VgpuState::Attached {
            return Ok(None);
        }
        let Some(secret) = self.store.get(&keys::vgpu_secret(id)).await? else {
            return Ok(None);
        };
        Ok(Some(json!({
            "id": v.value.id,
            "type": v.value.vgpu_type,
            "endpoint": v.value.endpoint,
            "server_name": crate::ca::gpu_server_name(&v.value.server),
            "ca": self.ca.cert_pem,
            "credential": String::from_utf8_lossy(&secret.value),
        })))
    }

    /// vGPUs the caller may see, with their health (impaired when their
    /// GPU server's lease expired).
    pub async fn vgpus(&self, tenant: Option<&str>) -> Result<Vec<Value>> {
        let (kvs, _) = self.store.range(&keys::vgpus()).await?;
        let (alive, _) = self.store.range(&keys::gpu_alives()).await?;
        let mut out = Vec::new();
        for kv in &kvs {
            let v: Vgpu = decode(kv)?;
            if tenant.is_some_and(|t| t != v.tenant) {
                continue;
            }
            let up = alive.iter().any(|a| a.key == keys::gpu_alive(&v.server));
            let mut j = json!(v);
            j["health"] = json!(if up || v.state == VgpuState::Detached {
                "ok"
            } else {
                "impaired"
            });
            out.push(j);
        }
        Ok(out)
    }
}

/// A new vGPU attachment credential: `vg1_SERVER_ATTACHMENT_` and 64 hex
/// digits (256 random bits). The names in it let a GPU server say why it
/// refuses one meant for another server; only the whole string, by its
/// hash, admits anything.
pub fn vgpu_credential(server: &str, attachment: &str) -> String {
    format!(
        "vg1_{server}_{attachment}_{}",
        hex::encode(rand::random::<[u8; 32]>())
    )
}
