//! Volumes: placed on a host's device, attached to an instance on the same
//! host (hot-plugged by the host), with EBS's states.

use serde::Deserialize;

use super::instances::{read, visible, Versioned, MAX_VOLUME_BYTES};
use super::{decode, encode, Region};
use crate::error::{RegionError, Result};
use crate::model::{
    keys, new_id, now, valid_name, Attachment, AttachmentState, InstanceState, Usage, Volume,
    VolumeState,
};
use crate::placement::Request;
use crate::store::{Compare, Op};

/// Claims tried before a create gives up.
const MAX_CLAIM_ATTEMPTS: usize = 64;
/// Smallest volume.
const MIN_VOLUME_BYTES: u64 = 1 << 20;

/// `POST /v1/volumes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// The tenant's name for it.
    pub name: String,
    /// Size (`1GiB`).
    pub size: String,
    /// On this host.
    #[serde(default)]
    pub host: Option<String>,
    /// On the host of this instance (id or name).
    #[serde(default)]
    pub near: Option<String>,
    /// Encrypt under the tenant's key.
    #[serde(default)]
    pub encrypted: bool,
}

/// What a host reports of a volume.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeReport {
    /// `available` (made), `error` (could not be made), `deleted`.
    #[serde(default)]
    pub state: Option<VolumeState>,
    /// `attached` or `busy`.
    #[serde(default)]
    pub attachment: Option<AttachmentState>,
    /// The volume was unplugged from its instance.
    #[serde(default)]
    pub detached: bool,
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
}

impl Region {
    /// Places and claims a volume's bytes on a device.
    pub async fn create_volume(&self, tenant: &str, req: &CreateVolume) -> Result<Volume> {
        if !valid_name(&req.name) {
            return Err(RegionError::Invalid(format!(
                "invalid volume name {:?}: 1-63 of a-z, 0-9 and -",
                req.name
            )));
        }
        let bytes = softcard_control::size::parse_size(&req.size)
            .map_err(|e| RegionError::Invalid(format!("volume size: {e}")))?;
        if !(MIN_VOLUME_BYTES..=MAX_VOLUME_BYTES).contains(&bytes) || bytes % 4096 != 0 {
            return Err(RegionError::Invalid(format!(
                "volume size must be a multiple of 4 KiB from 1 MiB to 1 TiB, not {bytes} bytes"
            )));
        }
        let host = match (&req.host, &req.near) {
            (Some(_), Some(_)) => {
                return Err(RegionError::Invalid(
                    "give --host or --near, not both".into(),
                ))
            }
            (Some(h), None) => Some(h.clone()),
            (None, Some(i)) => Some(self.instance(Some(tenant), i).await?.value.host),
            (None, None) => None,
        };
        let name_key = keys::name(tenant, "volume", &req.name);
        let want = Request {
            disk_bytes: bytes,
            host: host.clone(),
            ..Request::default()
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
                return Err(RegionError::NoCapacity(match &host {
                    Some(h) => format!("no capacity: host {h} is down, unknown or has no device with {bytes} free bytes"),
                    None => format!("no capacity: no host that is up has a device with {bytes} free bytes"),
                }));
            };
            let vol = Volume {
                id: new_id("vol"),
                name: req.name.clone(),
                tenant: tenant.to_owned(),
                host: choice.host.clone(),
                device: choice.device.clone(),
                size_bytes: bytes,
                encrypted: req.encrypted,
                state: VolumeState::Creating,
                state_reason: None,
                attachment: None,
                boot_of: None,
                created: now(),
            };
            let usage_key = keys::usage(&choice.host);
            let r = self
                .store
                .txn(
                    vec![
                        Compare::ModRevision(usage_key.clone(), choice.usage_revision),
                        Compare::Absent(name_key.clone()),
                    ],
                    vec![
                        Op::put(usage_key.clone(), encode(&choice.usage)),
                        Op::put(keys::volume(&vol.id), encode(&vol)),
                        Op::put(keys::placed(&vol.host, "volume", &vol.id), ""),
                        Op::put(name_key.clone(), vol.id.clone()),
                    ],
                    vec![Op::Get(usage_key), Op::Get(name_key.clone())],
                )
                .await?;
            if r.succeeded {
                self.placement.claimed(
                    &keys::usage(&choice.host),
                    encode(&choice.usage),
                    r.revision,
                );
                return Ok(vol);
            }
            if r.reads.get(1).is_some_and(Option::is_some) {
                return Err(RegionError::Conflict(format!(
                    "a volume named {} exists",
                    req.name
                )));
            }
            if let Some(Some(kv)) = r.reads.first() {
                self.placement.refresh_usage(kv);
            }
        }
        Err(RegionError::NoCapacity(
            "no capacity: every claim lost its race; try again".into(),
        ))
    }

    /// One volume, by id or name.
    pub async fn volume(
        &self,
        tenant: Option<&str>,
        id_or_name: &str,
    ) -> Result<Versioned<Volume>> {
        self.owned(tenant, id_or_name).await
    }

    /// Volumes the caller may see.
    pub async fn volumes(&self, tenant: Option<&str>) -> Result<Vec<Volume>> {
        let (kvs, _) = self.store.range(&keys::volumes()).await?;
        let mut out = Vec::new();
        for kv in &kvs {
            let v: Volume = decode(kv)?;
            if visible(tenant, &v.tenant) && v.state != VolumeState::Deleted {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// EC2's AttachVolume: the instance must run on the volume's host.
    pub async fn attach_volume(
        &self,
        tenant: Option<&str>,
        vol: &str,
        instance: &str,
    ) -> Result<Volume> {
        loop {
            let i = self.instance(tenant, instance).await?;
            let iv = i.value;
            if iv.state != InstanceState::Running {
                return Err(RegionError::Conflict(format!(
                    "instance {} is {}: volumes attach to running instances",
                    iv.id,
                    iv.state.name()
                )));
            }
            let v = self.volume(tenant, vol).await?;
            let mut volume = v.value;
            if volume.tenant != iv.tenant {
                return Err(RegionError::NotFound(format!("no volume {vol}")));
            }
            if volume.host != iv.host {
                return Err(RegionError::Invalid(format!(
                    "volume {} is on host {} and instance {} on host {}: a volume attaches only to an instance on its own host (create it with --near {})",
                    volume.id, volume.host, iv.id, iv.host, iv.name
                )));
            }
            if volume.state != VolumeState::Available || volume.attachment.is_some() {
                return Err(RegionError::Conflict(format!(
                    "volume {} is {}: only an available volume attaches",
                    volume.id,
                    serde_json::to_value(volume.state).unwrap_or_default()
                )));
            }
            volume.state = VolumeState::InUse;
            volume.attachment = Some(Attachment {
                instance: iv.id.clone(),
                state: AttachmentState::Attaching,
                force: false,
            });
            let key = keys::volume(&volume.id);
            let r = self
                .store
                .txn(
                    vec![
                        Compare::ModRevision(key.clone(), v.revision),
                        // The instance did not change (stop) meanwhile.
                        Compare::ModRevision(keys::instance(&iv.id), i.revision),
                    ],
                    vec![Op::put(key, encode(&volume))],
                    vec![],
                )
                .await?;
            if r.succeeded {
                return Ok(volume);
            }
        }
    }

    /// EC2's DetachVolume; `force` unplugs even a disk the guest holds.
    pub async fn detach_volume(
        &self,
        tenant: Option<&str>,
        vol: &str,
        force: bool,
    ) -> Result<Volume> {
        self.update(tenant, vol, |v: &mut Volume| {
            if v.boot_of.is_some() {
                return Err(RegionError::Invalid(format!(
                    "volume {} is its instance's boot volume",
                    v.id
                )));
            }
            let Some(a) = &mut v.attachment else {
                return Err(RegionError::Conflict(format!(
                    "volume {} is not attached",
                    v.id
                )));
            };
            if a.state == AttachmentState::Attaching && !force {
                return Err(RegionError::Conflict(format!(
                    "volume {} is still attaching",
                    v.id
                )));
            }
            if a.state == AttachmentState::Detaching && a.force == force {
                return Ok(false);
            }
            a.state = AttachmentState::Detaching;
            a.force = force;
            Ok(true)
        })
        .await
    }

    /// EC2's DeleteVolume: only an available volume.
    pub async fn delete_volume(&self, tenant: Option<&str>, vol: &str) -> Result<Volume> {
        self.update(tenant, vol, |v: &mut Volume| match v.state {
            VolumeState::Available | VolumeState::Error => {
                v.state = VolumeState::Deleting;
                Ok(true)
            }
            VolumeState::Deleting => Ok(false),
            s => Err(RegionError::Conflict(format!(
                "volume {} is {}: only an available volume is deleted",
                v.id,
                serde_json::to_value(s).unwrap_or_default()
            ))),
        })
        .await
    }

    /// A host reports what it did with a volume.
    pub async fn report_volume(&self, host: &str, id: &str, rep: &VolumeReport) -> Result<()> {
        loop {
            let v = self.volume(None, id).await?;
            let mut vol = v.value;
            if vol.host != host {
                return Err(RegionError::NotFound(format!("no volume {id} on {host}")));
            }
            let key = keys::volume(&vol.id);
            let mut when = vec![Compare::ModRevision(key.clone(), v.revision)];
            let mut then = Vec::new();
            if let Some(state) = rep.state {
                match (vol.state, state) {
                    (VolumeState::Creating, VolumeState::Available | VolumeState::Error) => {
                        vol.state = state;
                        vol.state_reason.clone_from(&rep.reason);
                        // A boot volume is its instance's from the start.
                        if let (VolumeState::Available, Some(i)) = (state, &vol.boot_of) {
                            vol.state = VolumeState::InUse;
                            vol.attachment = Some(Attachment {
                                instance: i.clone(),
                                state: AttachmentState::Attached,
                                force: false,
                            });
                        }
                    }
                    (VolumeState::Deleting, VolumeState::Deleted) => {
                        vol.state = state;
                        let usage_key = keys::usage(&vol.host);
                        let u = read::<Usage>(self, &usage_key).await?;
                        let (mut usage, rev) =
                            u.map_or((Usage::default(), 0), |u| (u.value, u.revision));
                        if let Some(b) = usage.device_bytes.get_mut(&vol.device) {
                            *b = b.saturating_sub(vol.size_bytes);
                        }
                        when.push(Compare::ModRevision(usage_key.clone(), rev));
                        then.push(Op::put(usage_key, encode(&usage)));
                        then.push(Op::Delete(keys::name(&vol.tenant, "volume", &vol.name)));
                        then.push(Op::Delete(keys::placed(&vol.host, "volume", &vol.id)));
                    }
                    (a, b) if a == b => {}
                    (a, b) => {
                        return Err(RegionError::Conflict(format!(
                            "volume {id} is {a:?}; a host cannot report it {b:?}"
                        )))
                    }
                }
            }
            if rep.detached {
                if vol.attachment.take().is_some() {
                    vol.state = VolumeState::Available;
                }
            } else if let Some(att) = rep.attachment {
                match (&mut vol.attachment, att) {
                    (Some(a), s @ (AttachmentState::Attached | AttachmentState::Busy)) => {
                        a.state = s;
                    }
                    (cur, s) => {
                        return Err(RegionError::Conflict(format!(
                            "volume {id} attachment is {cur:?}; a host cannot report it {s:?}"
                        )))
                    }
                }
            }
            then.push(Op::put(key, encode(&vol)));
            if self.store.txn(when, then, vec![]).await?.succeeded {
                return Ok(());
            }
        }
    }
}
