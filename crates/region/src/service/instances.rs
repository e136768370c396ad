//! Instances: placement and claim, the EC2 lifecycle, and what hosts report.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{decode, encode, Region};
use crate::error::{RegionError, Result};
use crate::model::{
    instance_type, keys, new_id, now, valid_name, Instance, InstanceState, Usage, Volume,
    VolumeState, IMAGES,
};
use crate::placement::Request;
use crate::store::{Compare, Op};

/// Claims tried before a create gives up (each failed claim refreshes the
/// view of the host it raced for).
const MAX_CLAIM_ATTEMPTS: usize = 64;
/// Largest boot volume.
pub const MAX_VOLUME_BYTES: u64 = 1 << 40;
/// Smallest boot volume.
pub const MIN_BOOT_VOLUME_BYTES: u64 = 64 << 20;
/// Longest client token (EC2's).
const MAX_CLIENT_TOKEN: usize = 64;
/// Largest console tail kept.
pub const CONSOLE_BYTES: usize = 64 << 10;

/// `POST /v1/instances`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateInstance {
    /// The tenant's name for it.
    pub name: String,
    /// Instance type.
    #[serde(rename = "type")]
    pub instance_type: String,
    /// Image (default: `default`).
    #[serde(default = "default_image")]
    pub image: String,
    /// Boot volume size (`4GiB`).
    pub volume_size: String,
    /// Idempotency token.
    #[serde(default)]
    pub client_token: Option<String>,
    /// Encrypt the boot volume under the tenant's key.
    #[serde(default)]
    pub encrypted: bool,
    /// Keep the boot volume at terminate.
    #[serde(default)]
    pub keep_boot_volume: bool,
    /// A vGPU of this type, claimed with the host (both or neither).
    #[serde(default)]
    pub vgpu: Option<String>,
}

fn default_image() -> String {
    "default".into()
}

/// A record read with its revision, for a compare-and-swap.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    /// The record.
    pub value: T,
    /// Its `mod_revision`.
    pub revision: i64,
}

pub(crate) async fn read<T: serde::de::DeserializeOwned>(
    region: &Region,
    key: &str,
) -> Result<Option<Versioned<T>>> {
    Ok(match region.store.get(key).await? {
        Some(kv) => Some(Versioned {
            value: decode(&kv)?,
            revision: kv.mod_revision,
        }),
        None => None,
    })
}

/// The tenant owns the record (admin owns everything); otherwise it is
/// "not found", so existence is not revealed.
pub(crate) fn visible(tenant: Option<&str>, owner: &str) -> bool {
    tenant.is_none_or(|t| t == owner)
}

impl Region {
    /// Places and claims an instance for `tenant`: the host's vCPUs,
    /// memory and the boot volume's bytes in one transaction with the
    /// instance, its boot volume and its name. The same client token
    /// returns the same instance.
    /// Returns the instance and its view as the API serves it (built from
    /// what the claim wrote: no further read).
    pub async fn create_instance(
        &self,
        tenant: &str,
        req: &CreateInstance,
    ) -> Result<(Instance, Value)> {
        if !valid_name(&req.name) {
            return Err(RegionError::Invalid(format!(
                "invalid instance name {:?}: 1-63 of a-z, 0-9 and -",
                req.name
            )));
        }
        let ty = instance_type(&req.instance_type).ok_or_else(|| {
            RegionError::Invalid(format!(
                "unknown instance type {:?} (softcard instance types)",
                req.instance_type
            ))
        })?;
        if !IMAGES.iter().any(|i| i.name == req.image) {
            return Err(RegionError::Invalid(format!(
                "unknown image {:?}",
                req.image
            )));
        }
        let bytes = softcard_control::size::parse_size(&req.volume_size)
            .map_err(|e| RegionError::Invalid(format!("volume size: {e}")))?;
        if !(MIN_BOOT_VOLUME_BYTES..=MAX_VOLUME_BYTES).contains(&bytes) || bytes % 4096 != 0 {
            return Err(RegionError::Invalid(format!(
                "volume size must be a multiple of 4 KiB from 64 MiB to 1 TiB, not {bytes} bytes"
            )));
        }
        if let Some(t) = &req.client_token {
            if t.is_empty()
                || t.len() > MAX_CLIENT_TOKEN
                || !t.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(RegionError::Invalid(
                    "client token: 1-64 printable ASCII characters".into(),
                ));
            }
            if let Some(i) = self.by_client_token(tenant, t).await? {
                let v = self.created_view(&i).await?;
                return Ok((i, v));
            }
        }
        let name_key = keys::name(tenant, "instance", &req.name);
        let want = Request {
            vcpus: ty.vcpus,
            memory_mib: ty.memory_mib,
            disk_bytes: bytes,
            host: None,
        };
        let mut reloaded = false;
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let mut best = self.placement.candidates(&want).into_iter().next();
            if best.is_none() && !reloaded {
                reloaded = true;
                self.placement.reload(&*self.store).await?;
                best = self.placement.candidates(&want).into_iter().next();
            }
            let Some(choice) = best else {
                return Err(RegionError::NoCapacity(format!(
                    "no capacity: no host that is up has {} vCPU, {} MiB and {} free bytes on one device",
                    ty.vcpus, ty.memory_mib, bytes
                )));
            };
            let id = new_id("i");
            let vol_id = new_id("vol");
            let created = now();
            let gpu = match &req.vgpu {
                Some(t) => Some(self.vgpu_choice(tenant, &id, t).await?),
                None => None,
            };
            let inst = Instance {
                id: id.clone(),
                name: req.name.clone(),
                tenant: tenant.to_owned(),
                instance_type: ty.name.to_owned(),
                vcpus: ty.vcpus,
                memory_mib: ty.memory_mib,
                image: req.image.clone(),
                host: choice.host.clone(),
                state: InstanceState::Pending,
                state_reason: None,
                boot_volume: vol_id.clone(),
                keep_boot_volume: req.keep_boot_volume,
                encrypted: req.encrypted,
                reboots: 0,
                created,
                client_token: req.client_token.clone(),
                vgpu: gpu.as_ref().map(|(_, v, _)| v.id.clone()),
            };
            let vol = Volume {
                id: vol_id.clone(),
                name: format!("{}-boot", req.name),
                tenant: tenant.to_owned(),
                host: choice.host.clone(),
                device: choice.device.clone(),
                size_bytes: bytes,
                encrypted: req.encrypted,
                state: VolumeState::Creating,
                state_reason: None,
                attachment: None,
                boot_of: Some(id.clone()),
                created,
            };
            let usage_key = keys::usage(&choice.host);
            let mut when = vec![
                Compare::ModRevision(usage_key.clone(), choice.usage_revision),
                Compare::Absent(name_key.clone()),
            ];
            let mut then = vec![
                Op::put(usage_key.clone(), encode(&choice.usage)),
                Op::put(keys::instance(&id), encode(&inst)),
                Op::put(keys::volume(&vol_id), encode(&vol)),
                Op::put(keys::placed(&choice.host, "instance", &id), ""),
                Op::put(keys::placed(&choice.host, "volume", &vol_id), ""),
                Op::put(name_key.clone(), id.clone()),
            ];
            if let Some(t) = &req.client_token {
                let k = keys::client_token(tenant, t);
                when.push(Compare::Absent(k.clone()));
                then.push(Op::put(k, id.clone()));
            }
            let mut reads = vec![Op::Get(usage_key), Op::Get(name_key.clone())];
            if let Some((c, v, secret)) = &gpu {
                // The vGPU's memory in the same transaction: both or neither.
                let (cmp, ops, get) = Self::vgpu_claim_ops(c, v, secret);
                when.push(cmp);
                then.extend(ops);
                reads.push(get);
            }
            let r = self.store.txn(when, then, reads).await?;
            if r.succeeded {
                log::debug!("instance {id} ({}) placed on {}", req.name, choice.host);
                self.placement.claimed(
                    &keys::usage(&choice.host),
                    encode(&choice.usage),
                    r.revision,
                );
                if let Some((c, _, _)) = &gpu {
                    self.placement.claimed(
                        &keys::gpu_usage(&c.server),
                        encode(&c.usage),
                        r.revision,
                    );
                }
                // Placed on a host the view had up, with this boot volume.
                let v = served(&inst, true, std::slice::from_ref(&vol));
                return Ok((inst, v));
            }
            if let Some(t) = &req.client_token {
                if let Some(i) = self.by_client_token(tenant, t).await? {
                    let v = self.created_view(&i).await?;
                    return Ok((i, v));
                }
            }
            if r.reads.get(1).is_some_and(Option::is_some) {
                return Err(RegionError::Conflict(format!(
                    "an instance named {} exists",
                    req.name
                )));
            }
            self.placement
                .conflicts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(Some(kv)) = r.reads.first() {
                self.placement.refresh_usage(kv);
            }
            self.refresh_gpu(r.reads.get(2));
        }
        Err(RegionError::NoCapacity(
            "no capacity: every claim lost its race; try again".into(),
        ))
    }

    async fn by_client_token(&self, tenant: &str, token: &str) -> Result<Option<Instance>> {
        let Some(kv) = self.store.get(&keys::client_token(tenant, token)).await? else {
            return Ok(None);
        };
        let id = String::from_utf8_lossy(&kv.value).into_owned();
        Ok(read::<Instance>(self, &keys::instance(&id))
            .await?
            .map(|v| v.value))
    }

    /// One instance, by id or by its tenant's name for it.
    pub async fn instance(
        &self,
        tenant: Option<&str>,
        id_or_name: &str,
    ) -> Result<Versioned<Instance>> {
        self.owned(tenant, id_or_name).await
    }

    /// Instances the caller may see, as served (with health and volumes).
    pub async fn instances(&self, tenant: Option<&str>) -> Result<Vec<Value>> {
        let (kvs, _) = self.store.range(&keys::instances()).await?;
        let alive = self.alive_hosts().await?;
        let (vols, _) = self.store.range(&keys::volumes()).await?;
        let vols: Vec<Volume> = vols.iter().map(decode).collect::<Result<_>>()?;
        let mut out = Vec::new();
        for kv in &kvs {
            let i: Instance = decode(kv)?;
            if visible(tenant, &i.tenant) {
                out.push(served(&i, alive.contains(&i.host), &vols));
            }
        }
        Ok(out)
    }

    /// One instance as served.
    pub async fn instance_view(&self, tenant: Option<&str>, id_or_name: &str) -> Result<Value> {
        let i = self.instance(tenant, id_or_name).await?.value;
        let up = self.store.get(&keys::alive(&i.host)).await?.is_some();
        // Its volumes are on its host: read them through the host's index.
        let vols: Vec<Volume> = self
            .placed_records(&i.host, "volume")
            .await?
            .iter()
            .map(decode)
            .collect::<Result<_>>()?;
        Ok(served(&i, up, &vols))
    }

    /// A just-created instance as served (its only volume is its boot
    /// volume: no scan of the others).
    pub async fn created_view(&self, i: &Instance) -> Result<Value> {
        let up = self.store.get(&keys::alive(&i.host)).await?.is_some();
        let boot = read::<Volume>(self, &keys::volume(&i.boot_volume)).await?;
        let vols: Vec<Volume> = boot.into_iter().map(|v| v.value).collect();
        Ok(served(i, up, &vols))
    }

    /// EC2's StopInstances.
    pub async fn stop_instance(&self, tenant: Option<&str>, id: &str) -> Result<Instance> {
        self.update(tenant, id, |i: &mut Instance| match i.state {
            InstanceState::Running | InstanceState::Pending => {
                i.state = InstanceState::Stopping;
                i.state_reason = Some("User initiated".into());
                Ok(true)
            }
            InstanceState::Stopping | InstanceState::Stopped => Ok(false),
            s => Err(RegionError::Conflict(format!(
                "instance {} is {} and cannot be stopped",
                i.id,
                s.name()
            ))),
        })
        .await
    }

    /// EC2's StartInstances.
    pub async fn start_instance(&self, tenant: Option<&str>, id: &str) -> Result<Instance> {
        self.update(tenant, id, |i: &mut Instance| match i.state {
            InstanceState::Stopped => {
                i.state = InstanceState::Pending;
                i.state_reason = None;
                Ok(true)
            }
            InstanceState::Pending | InstanceState::Running => Ok(false),
            s => Err(RegionError::Conflict(format!(
                "instance {} is {} and cannot be started",
                i.id,
                s.name()
            ))),
        })
        .await
    }

    /// EC2's RebootInstances: the host resets the VM once per request.
    pub async fn reboot_instance(&self, tenant: Option<&str>, id: &str) -> Result<Instance> {
        self.update(tenant, id, |i: &mut Instance| match i.state {
            InstanceState::Running => {
                i.reboots += 1;
                Ok(true)
            }
            s => Err(RegionError::Conflict(format!(
                "instance {} is {}; only a running instance reboots",
                i.id,
                s.name()
            ))),
        })
        .await
    }

    /// EC2's TerminateInstances (idempotent).
    pub async fn terminate_instance(&self, tenant: Option<&str>, id: &str) -> Result<Instance> {
        self.update(tenant, id, |i: &mut Instance| match i.state {
            InstanceState::ShuttingDown | InstanceState::Terminated => Ok(false),
            _ => {
                i.state = InstanceState::ShuttingDown;
                i.state_reason = Some("User initiated".into());
                Ok(true)
            }
        })
        .await
    }

    /// The captured serial console's tail.
    pub async fn console_output(&self, tenant: Option<&str>, id: &str) -> Result<String> {
        let i = self.instance(tenant, id).await?.value;
        Ok(self
            .store
            .get(&keys::console(&i.id))
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default())
    }

    /// A host reports an instance's state. Allowed: pending -> running,
    /// stopping -> stopped, running or pending -> stopped (its VM died or
    /// could not start: `reason` says why), shutting-down -> terminated
    /// (which releases what the instance held on the host).
    pub async fn report_instance(
        &self,
        host: &str,
        id: &str,
        state: InstanceState,
        reason: Option<String>,
    ) -> Result<()> {
        loop {
            let v = self.instance(None, id).await?;
            let mut i = v.value;
            if i.host != host {
                return Err(RegionError::NotFound(format!("no instance {id} on {host}")));
            }
            use InstanceState as S;
            let ok = matches!(
                (i.state, state),
                (S::Pending, S::Running)
                    | (S::Stopping | S::Running | S::Pending, S::Stopped)
                    | (S::ShuttingDown, S::Terminated)
            );
            if i.state == state {
                return Ok(());
            }
            if !ok {
                return Err(RegionError::Conflict(format!(
                    "instance {id} is {}; a host cannot report it {}",
                    i.state.name(),
                    state.name()
                )));
            }
            i.state = state;
            if reason.is_some() || state != S::Stopped {
                i.state_reason = reason.clone();
            }
            let key = keys::instance(&i.id);
            let mut when = vec![Compare::ModRevision(key.clone(), v.revision)];
            let mut then = vec![Op::put(key, encode(&i))];
            if state == S::Terminated {
                self.release_instance(&i, &mut when, &mut then).await?;
            }
            if self.store.txn(when, then, vec![]).await?.succeeded {
                return Ok(());
            }
        }
    }

    /// The changes that give back what a terminated instance held: its
    /// vCPUs and memory, its boot volume (deleted, with its bytes, unless
    /// kept), its name; its other volumes become available.
    async fn release_instance(
        &self,
        i: &Instance,
        when: &mut Vec<Compare>,
        then: &mut Vec<Op>,
    ) -> Result<()> {
        let usage_key = keys::usage(&i.host);
        let u = read::<Usage>(self, &usage_key).await?;
        let (mut usage, rev) = u.map_or((Usage::default(), 0), |u| (u.value, u.revision));
        usage.vcpus = usage.vcpus.saturating_sub(i.vcpus);
        usage.memory_mib = usage.memory_mib.saturating_sub(i.memory_mib);
        for kv in &self.placed_records(&i.host, "volume").await? {
            let mut vol: Volume = decode(kv)?;
            let boot = vol.boot_of.as_deref() == Some(&i.id);
            let attached = vol.attachment.as_ref().is_some_and(|a| a.instance == i.id);
            if !boot && !attached {
                continue;
            }
            vol.attachment = None;
            if boot && !i.keep_boot_volume {
                vol.state = VolumeState::Deleted;
                then.push(Op::Delete(keys::placed(&i.host, "volume", &vol.id)));
                if let Some(b) = usage.device_bytes.get_mut(&vol.device) {
                    *b = b.saturating_sub(vol.size_bytes);
                }
            } else {
                vol.state = VolumeState::Available;
                if boot {
                    // A kept boot volume becomes an ordinary volume.
                    vol.boot_of = None;
                    then.push(Op::put(
                        keys::name(&vol.tenant, "volume", &vol.name),
                        vol.id.clone(),
                    ));
                }
            }
            when.push(Compare::ModRevision(kv.key.clone(), kv.mod_revision));
            then.push(Op::put(kv.key.clone(), encode(&vol)));
        }
        when.push(Compare::ModRevision(usage_key.clone(), rev));
        then.push(Op::put(usage_key, encode(&usage)));
        then.push(Op::Delete(keys::name(&i.tenant, "instance", &i.name)));
        then.push(Op::Delete(keys::placed(&i.host, "instance", &i.id)));
        if let Some(v) = &i.vgpu {
            self.vgpu_release_ops(v, when, then).await?;
        }
        Ok(())
    }

    /// The records of `kind` on `host`, through the host's index.
    async fn placed_records(&self, host: &str, kind: &str) -> Result<Vec<crate::store::KeyValue>> {
        let prefix = format!("{}{kind}/", keys::placed_on(host));
        let (index, _) = self.store.range(&prefix).await?;
        let mut out = Vec::with_capacity(index.len());
        for e in index {
            let id = &e.key[prefix.len()..];
            let key = if kind == "instance" {
                keys::instance(id)
            } else {
                keys::volume(id)
            };
            if let Some(kv) = self.store.get(&key).await? {
                out.push(kv);
            }
        }
        Ok(out)
    }

    /// A host stores an instance's console tail.
    pub async fn put_console(&self, host: &str, id: &str, text: &[u8]) -> Result<()> {
        let i = self.instance(None, id).await?.value;
        if i.host != host {
            return Err(RegionError::NotFound(format!("no instance {id} on {host}")));
        }
        let tail = &text[text.len().saturating_sub(CONSOLE_BYTES)..];
        self.store.put(&keys::console(&i.id), tail.to_vec()).await?;
        Ok(())
    }

    /// What a host must run: its instances that are not terminated and
    /// its volumes that are not deleted.
    pub async fn host_work(&self, host: &str) -> Result<Value> {
        // The revision first: every record read after it is at least that
        // new, so a long poll from it misses no change.
        let (_, revision) = self.store.range(&keys::placed_on(host)).await?;
        let mut instances = Vec::new();
        for kv in &self.placed_records(host, "instance").await? {
            let i: Instance = decode(kv)?;
            if i.host == host && i.state != InstanceState::Terminated {
                let mut v = serde_json::to_value(&i).unwrap_or_default();
                // The vGPU's endpoint and credential, for the instance.
                if let Some(g) = &i.vgpu {
                    v["vgpu_access"] = self.vgpu_for_instance(g).await?.unwrap_or_default();
                }
                instances.push(v);
            }
        }
        let mut volumes = Vec::new();
        for kv in &self.placed_records(host, "volume").await? {
            let v: Volume = decode(kv)?;
            if v.host == host && v.state != VolumeState::Deleted {
                volumes.push(v);
            }
        }
        Ok(json!({"instances": instances, "volumes": volumes, "revision": revision}))
    }

    /// Waits (at most `timeout`) until one of `host`'s instances or
    /// volumes changes after `revision`: a host's long poll, so that it acts
    /// on a change at once, and only changes on this host wake it.
    pub async fn wait_for_change(
        &self,
        host: &str,
        revision: i64,
        timeout: std::time::Duration,
    ) -> Result<()> {
        let mut w = self.store.watch(crate::model::ROOT, revision + 1).await;
        if let Err(crate::store::StoreError::Compacted(_)) = w {
            return Ok(());
        }
        let w = w
            .as_mut()
            .map_err(|e| RegionError::Store(crate::store::StoreError::Backend(e.to_string())))?;
        let index = keys::placed_on(host);
        let mine = |e: &crate::store::Event| {
            let k = e.key();
            // A vGPU attached or detached changes an instance's metadata
            // (rare: every host reads its work again).
            if k.starts_with(&index) || k.starts_with(&keys::vgpus()) {
                return true;
            }
            if !(k.starts_with(&keys::instances()) || k.starts_with(&keys::volumes())) {
                return false;
            }
            match e {
                crate::store::Event::Put(kv) => {
                    serde_json::from_slice::<Value>(&kv.value).is_ok_and(|v| v["host"] == host)
                }
                crate::store::Event::Delete { .. } => true,
            }
        };
        let _ = tokio::time::timeout(timeout, async {
            while let Some(e) = w.recv().await {
                if mine(&e) {
                    return;
                }
            }
        })
        .await;
        Ok(())
    }
}

/// An instance as the API serves it: the record, EC2's state object, its
/// health (impaired when its host's lease expired) and its volumes.
fn served(i: &Instance, host_up: bool, vols: &[Volume]) -> Value {
    let mut v = serde_json::to_value(i).unwrap_or_default();
    let health = if i.state == InstanceState::Terminated || host_up {
        "ok"
    } else {
        "impaired"
    };
    v["state"] = json!({"code": i.state.code(), "name": i.state.name()});
    v["health"] = json!(health);
    if !host_up && i.state != InstanceState::Terminated {
        v["health_reason"] = json!(format!("host {} is down (lease expired)", i.host));
    }
    v["volumes"] = json!(vols
        .iter()
        .filter(|x| {
            x.state != VolumeState::Deleted
                && (x.boot_of.as_deref() == Some(&i.id)
                    || x.attachment.as_ref().is_some_and(|a| a.instance == i.id))
        })
        .map(|x| json!({
            "id": x.id,
            "name": x.name,
            "boot": x.boot_of.is_some(),
            "attachment": x.attachment.as_ref().map(|a| a.state),
        }))
        .collect::<Vec<_>>());
    v
}
