//! The storage card as the control plane sees it: devices, the volumes on
//! them, and the interfaces that present volumes to VMs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::crypto::keys::validate_tenant;
use crate::crypto::{DataKey, Kek, KeyError, KeyStore, WrappedKey, Xts256};
use crate::device::{self, DeviceConfig, PhysicalDevice};
use crate::nbd::NbdExport;
use crate::partition::{PartitionError, PartitionMap, Volume};
use crate::qos::{DeviceShare, QosLimits};
use crate::virtio_blk::{
    Attachment, BlkError, BlkMetrics, BlkMetricsSnapshot, BlkTarget, InterfaceState,
};

/// Errors of card operations; none leaves anything half done.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    /// No device of that name in the configuration.
    #[error("unknown device {0:?}")]
    UnknownDevice(String),
    /// The device is configured but could not be opened or its map is bad.
    #[error("device {name:?} is unavailable: {reason}")]
    DeviceUnavailable {
        /// Device name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Partition-map operation refused.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// No volume of that name.
    #[error("unknown volume {0:?}")]
    UnknownVolume(String),
    /// The volume has an interface.
    #[error("volume {0:?} is attached; detach it first")]
    Attached(String),
    /// The volume has no interface.
    #[error("volume {0:?} is not attached")]
    NotAttached(String),
    /// Another interface uses that socket.
    #[error("socket {0} is already used by volume {1:?}")]
    SocketInUse(String, String),
    /// The interface could not start.
    #[error(transparent)]
    Interface(#[from] BlkError),
    /// Key trouble: missing or wrong key-encryption key, bad tenant.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Two configured devices share a name.
    #[error("device name {0:?} appears twice in the configuration")]
    DuplicateDevice(String),
    /// The record of attachments cannot be read.
    #[error("the card's record of attachments: {0}")]
    State(std::io::Error),
}

/// The kind of virtual interface a volume is presented through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Interface {
    /// vhost-user-blk, for a VM ([`crate::virtio_blk`]).
    #[default]
    VhostUserBlk,
    /// vhost-user-blk with the roles of the socket reversed: the VMM
    /// listens (QEMU's `server=on`) and the card connects, again after
    /// every disconnect, so that a VM takes a restarted or upgraded card
    /// at once.
    VhostUserBlkConnect,
    /// An NBD export, for the host system ([`crate::nbd`]).
    Nbd,
}

/// Options of an attachment.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachOptions {
    /// Socket path the frontend (or NBD client) connects to.
    pub socket: PathBuf,
    /// Virtqueues offered (vhost-user-blk only).
    pub queues: u16,
    /// Throttle limits.
    pub qos: QosLimits,
    /// Which interface.
    pub interface: Interface,
}

/// A running interface of either kind.
#[derive(Debug)]
enum Iface {
    VhostUser(Attachment),
    Nbd(NbdExport),
}

impl Iface {
    fn socket(&self) -> &std::path::Path {
        match self {
            Iface::VhostUser(a) => a.socket(),
            Iface::Nbd(e) => e.socket(),
        }
    }

    fn listener(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self {
            Iface::VhostUser(a) => a.listener(),
            Iface::Nbd(e) => Some(e.listener()),
        }
    }

    fn hand_over(self) {
        match self {
            Iface::VhostUser(a) => a.hand_over(),
            Iface::Nbd(e) => e.hand_over(),
        }
    }

    fn info(&self) -> AttachmentInfo {
        match self {
            Iface::VhostUser(a) => AttachmentInfo {
                interface: if a.connects() {
                    Interface::VhostUserBlkConnect
                } else {
                    Interface::VhostUserBlk
                },
                socket: a.socket().display().to_string(),
                queues: a.queues(),
                clients: None,
                state: a.state(),
                qos: a.qos(),
                metrics: a.metrics(),
                rings: a.rings(),
            },
            Iface::Nbd(e) => AttachmentInfo {
                interface: Interface::Nbd,
                socket: e.socket().display().to_string(),
                queues: 0,
                clients: Some(e.clients()),
                state: e.state(),
                qos: e.qos(),
                metrics: e.metrics(),
                rings: Vec::new(),
            },
        }
    }

    fn set_qos(&self, qos: QosLimits) -> Result<(), BlkError> {
        match self {
            Iface::VhostUser(a) => a.set_qos(qos),
            Iface::Nbd(e) => e.set_qos(qos),
        }
    }

    fn stop(self) {
        match self {
            Iface::VhostUser(a) => a.stop(),
            Iface::Nbd(e) => e.stop(),
        }
    }
}

/// A device as listed by the API.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: device::DeviceKind,
    /// Capacity in bytes (0 when unavailable).
    pub capacity_bytes: u64,
    /// Free bytes.
    pub free_bytes: u64,
    /// Number of volumes.
    pub volumes: usize,
    /// How the device is driven.
    pub detail: String,
    /// Why the device is unavailable, when it is.
    pub error: Option<String>,
}

/// An interface as listed by the API.
#[derive(Debug, Clone, Serialize)]
pub struct AttachmentInfo {
    /// Which interface.
    pub interface: Interface,
    /// Socket path.
    pub socket: String,
    /// Virtqueues (vhost-user-blk; 0 for NBD).
    pub queues: u16,
    /// Clients connected now (NBD).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients: Option<usize>,
    /// State.
    pub state: InterfaceState,
    /// Throttle limits.
    pub qos: QosLimits,
    /// Counters.
    pub metrics: BlkMetricsSnapshot,
    /// Each started virtqueue's position (vhost-user-blk, while a
    /// frontend is connected).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rings: Vec<crate::virtio_blk::RingPosition>,
}

/// Counters of one device and its volumes.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStats {
    /// Device name.
    pub device: String,
    /// Capacity.
    pub capacity_bytes: u64,
    /// Free bytes.
    pub free_bytes: u64,
    /// Each volume's counters (zero for volumes never attached).
    pub volumes: Vec<(String, BlkMetricsSnapshot)>,
}

impl DeviceStats {
    /// The device's totals over its volumes.
    pub fn totals(&self) -> BlkMetricsSnapshot {
        let mut t = BlkMetricsSnapshot::default();
        for (_, m) in &self.volumes {
            t.add(m);
        }
        t
    }
}

/// A volume as listed by the API.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    /// Volume record.
    #[serde(flatten)]
    pub volume: Volume,
    /// Device it lives on.
    pub device: String,
    /// Its interface, when attached.
    pub attachment: Option<AttachmentInfo>,
}

#[derive(Debug)]
struct DeviceSlot {
    config: DeviceConfig,
    open: Result<(Arc<dyn PhysicalDevice>, PartitionMap), String>,
    /// Fair sharing of the device's queue among its volumes.
    share: Arc<DeviceShare>,
}

/// Requests in flight that the volumes of one file or block device share
/// while more than one is active (see [`DeviceShare`]), unless the
/// device's configuration says otherwise (`share_depth`); memory devices
/// have no queue to share. Chosen with `softcard bench fairness` on the
/// test machine's virtio disk: 2 (one each for two volumes) kept a quiet
/// volume's p50 within 1.15x and its p99 within 1.7-1.9x of running alone;
/// 4 gave 1.1-1.4x and 2.1-2.4x with 25-35 % more for the noisy volume;
/// 32 gave 3-4x and 5x.
pub const DEVICE_SHARE_DEPTH: u32 = 2;

#[derive(Debug, Default)]
struct State {
    devices: Vec<DeviceSlot>,
    attachments: BTreeMap<String, Iface>,
    keys: KeyStore,
    /// Counters per volume; they outlive attachments (a volume's totals
    /// keep counting across detach and attach) and go with the volume.
    metrics: BTreeMap<String, Arc<BlkMetrics>>,
    /// Where the attachments are recorded ([`StorageCard::keep_state`]).
    state_file: Option<std::path::PathBuf>,
    /// The options of each live attachment.
    attached: BTreeMap<String, AttachOptions>,
    /// Recorded attachments that could not be restored at start: kept on
    /// record until detached.
    unrestored: BTreeMap<String, AttachOptions>,
    /// Listening sockets handed over by the card process this one
    /// replaced, by path, until an attachment takes them.
    inherited: BTreeMap<std::path::PathBuf, std::os::unix::net::UnixListener>,
}

/// A recorded attachment restored at start, or why it was not (by volume).
pub type Restored = (String, Result<(), CardError>);

/// The storage function: owns devices, maps and interfaces.
#[derive(Debug)]
pub struct StorageCard {
    state: Mutex<State>,
}

impl StorageCard {
    /// Opens every configured device and loads its partition map. A device
    /// that fails to open (or whose map is corrupt) is kept as unavailable
    /// with its reason; the others work.
    pub fn open(configs: &[DeviceConfig]) -> Result<Self, CardError> {
        Self::open_with_keys(configs, KeyStore::default())
    }

    /// Like [`StorageCard::open`], with the tenants' key-encryption keys.
    pub fn open_with_keys(configs: &[DeviceConfig], keys: KeyStore) -> Result<Self, CardError> {
        let mut devices: Vec<DeviceSlot> = Vec::new();
        for config in configs {
            if devices.iter().any(|d| d.config.name == config.name) {
                return Err(CardError::DuplicateDevice(config.name.clone()));
            }
            let open = device::open(config)
                .map_err(|e| e.to_string())
                .and_then(|dev| {
                    let map = PartitionMap::load(dev.as_ref()).map_err(|e| e.to_string())?;
                    Ok((dev, map))
                });
            if let Err(reason) = &open {
                log::error!("{reason}");
            }
            let depth = match config.kind {
                device::DeviceKind::File | device::DeviceKind::Block => {
                    config.share_depth.unwrap_or(DEVICE_SHARE_DEPTH)
                }
                device::DeviceKind::Null | device::DeviceKind::Ram => 0,
            };
            devices.push(DeviceSlot {
                config: config.clone(),
                open,
                share: Arc::new(DeviceShare::new(depth)),
            });
        }
        // Volume names are card-wide: a clash across devices hides the later.
        let mut seen = BTreeMap::new();
        for d in &devices {
            if let Ok((_, map)) = &d.open {
                for v in map.volumes() {
                    if let Some(first) = seen.insert(v.name.clone(), d.config.name.clone()) {
                        log::warn!(
                            "volume {:?} exists on devices {first} and {}; using {first}",
                            v.name,
                            d.config.name
                        );
                        seen.insert(v.name, first);
                    }
                }
            }
        }
        Ok(StorageCard {
            state: Mutex::new(State {
                devices,
                attachments: BTreeMap::new(),
                keys,
                metrics: BTreeMap::new(),
                state_file: None,
                attached: BTreeMap::new(),
                unrestored: BTreeMap::new(),
                inherited: BTreeMap::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the card's attachments in the file at `path`
    /// ([`crate::card_state`]): restores those recorded there (each one's
    /// outcome is returned, by volume), then records every attach, detach
    /// and throttle change. Stopping the card keeps the record, so the next
    /// start serves the same volumes on the same sockets.
    pub fn keep_state(&self, path: &std::path::Path) -> Result<Vec<Restored>, CardError> {
        let recorded = crate::card_state::load(path).map_err(CardError::State)?;
        self.lock().state_file = Some(path.to_owned());
        let mut outcome = Vec::new();
        for (name, opts) in recorded {
            let r = self.attach(&name, &opts).map(|_| ());
            if r.is_err() {
                self.lock().unrestored.insert(name.clone(), opts);
            }
            outcome.push((name, r));
        }
        let mut st = self.lock();
        // Listeners no restored attachment took are closed; their paths
        // are rebound if those volumes attach again.
        st.inherited.clear();
        Self::persist(&st);
        Ok(outcome)
    }

    /// Listening sockets from the card process this one replaces
    /// (`softcard upgrade`): an attachment on one of these paths serves
    /// the inherited socket instead of binding a new one, so frontends
    /// that connect during the hand-over wait in its queue. Call before
    /// [`StorageCard::keep_state`].
    pub fn inherit_listeners(
        &self,
        listeners: impl IntoIterator<Item = (std::path::PathBuf, std::os::unix::net::UnixListener)>,
    ) {
        self.lock().inherited.extend(listeners);
    }

    /// Duplicates of every interface's listening socket, by path, for a
    /// successor.
    pub fn listeners(&self) -> std::io::Result<Vec<(std::path::PathBuf, std::os::fd::OwnedFd)>> {
        self.lock()
            .attachments
            .values()
            .filter_map(|a| Some((a.socket().to_owned(), a.listener()?)))
            .map(|(path, fd)| Ok((path, fd.try_clone_to_owned()?)))
            .collect()
    }

    /// Stops every interface like [`StorageCard::shutdown`], leaving the
    /// listening sockets to the successor that holds duplicates of them.
    pub fn hand_over(&self) {
        let all = std::mem::take(&mut self.lock().attachments);
        for (_, a) in all {
            a.hand_over();
        }
    }

    /// Writes the record, if the card keeps one.
    fn persist(st: &State) {
        let Some(path) = &st.state_file else { return };
        let mut all = st.unrestored.clone();
        all.extend(st.attached.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Err(e) = crate::card_state::save(path, &all) {
            log::error!(
                "cannot record the attachments in {}: {e}; a restarted card will not restore them",
                path.display()
            );
        }
    }

    /// Lists devices.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        let st = self.lock();
        st.devices
            .iter()
            .map(|d| match &d.open {
                Ok((dev, map)) => DeviceInfo {
                    name: d.config.name.clone(),
                    kind: d.config.kind,
                    capacity_bytes: dev.capacity_bytes(),
                    free_bytes: map.free_bytes(),
                    volumes: map.volumes().len(),
                    detail: dev.describe(),
                    error: None,
                },
                Err(e) => DeviceInfo {
                    name: d.config.name.clone(),
                    kind: d.config.kind,
                    capacity_bytes: 0,
                    free_bytes: 0,
                    volumes: 0,
                    detail: String::new(),
                    error: Some(e.clone()),
                },
            })
            .collect()
    }

    fn find_volume(st: &State, name: &str) -> Option<(usize, Volume)> {
        st.devices.iter().enumerate().find_map(|(i, d)| {
            d.open
                .as_ref()
                .ok()
                .and_then(|(_, m)| m.get(name))
                .map(|v| (i, v))
        })
    }

    fn info(st: &State, device: &str, v: Volume) -> VolumeInfo {
        let attachment = st.attachments.get(&v.name).map(Iface::info);
        VolumeInfo {
            volume: v,
            device: device.to_owned(),
            attachment,
        }
    }

    /// Lists volumes of every available device.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let st = self.lock();
        let mut out = Vec::new();
        for d in &st.devices {
            if let Ok((_, map)) = &d.open {
                for v in map.volumes() {
                    out.push(Self::info(&st, &d.config.name, v));
                }
            }
        }
        out
    }

    /// One volume.
    pub fn volume(&self, name: &str) -> Result<VolumeInfo, CardError> {
        let st = self.lock();
        let (i, v) =
            Self::find_volume(&st, name).ok_or_else(|| CardError::UnknownVolume(name.into()))?;
        Ok(Self::info(&st, &st.devices[i].config.name, v))
    }

    /// Creates a volume of `size_bytes` on `device`.
    pub fn create_volume(
        &self,
        name: &str,
        device: &str,
        size_bytes: u64,
    ) -> Result<VolumeInfo, CardError> {
        self.create_inner(name, device, size_bytes, None)
    }

    fn create_inner(
        &self,
        name: &str,
        device: &str,
        size_bytes: u64,
        key: Option<&WrappedKey>,
    ) -> Result<VolumeInfo, CardError> {
        let mut st = self.lock();
        let taken: Vec<String> = st
            .devices
            .iter()
            .filter_map(|d| d.open.as_ref().ok())
            .flat_map(|(_, m)| m.volumes().into_iter().map(|v| v.name))
            .collect();
        let slot = st
            .devices
            .iter_mut()
            .find(|d| d.config.name == device)
            .ok_or_else(|| CardError::UnknownDevice(device.into()))?;
        let (dev, map) = slot
            .open
            .as_mut()
            .map_err(|reason| CardError::DeviceUnavailable {
                name: device.into(),
                reason: reason.clone(),
            })?;
        let v = map.create_with(
            dev.as_ref(),
            name,
            size_bytes,
            |n| taken.iter().any(|t| t == n),
            key,
        )?;
        log::info!(
            "created volume {name} on {device}: {} B at offset {}",
            v.size_bytes,
            v.offset_bytes
        );
        Ok(Self::info(&st, device, v))
    }

    /// Creates a volume encrypted with AES-256-XTS under a fresh random
    /// data key, stored wrapped by `tenant`'s key-encryption key.
    pub fn create_encrypted_volume(
        &self,
        name: &str,
        device: &str,
        size_bytes: u64,
        tenant: &str,
    ) -> Result<VolumeInfo, CardError> {
        validate_tenant(tenant)?;
        let record = {
            let st = self.lock();
            let kek = st.keys.current(tenant)?;
            let dk = DataKey::generate();
            WrappedKey {
                tenant: tenant.to_owned(),
                kek_check: kek.check_value(),
                wrapped: kek.wrap(&dk),
            }
        };
        self.create_inner(name, device, size_bytes, Some(&record))
    }

    /// Re-wraps the data keys of every volume of `tenant` with `new`, without
    /// touching their data, and makes `new` the tenant's key. Returns how
    /// many volumes were re-wrapped. If a device fails midway, the volumes
    /// already re-wrapped use the new key and the others the old one; both
    /// keys stay known, so every volume still attaches.
    pub fn rotate_tenant_key(&self, tenant: &str, new: Kek) -> Result<usize, CardError> {
        let mut st = self.lock();
        let new_check = new.check_value();
        st.keys.push_current(tenant, new)?;
        let mut count = 0;
        let State { devices, keys, .. } = &mut *st;
        for d in devices.iter_mut() {
            let Ok((dev, map)) = &mut d.open else {
                continue;
            };
            let mut updates = Vec::new();
            for v in map.volumes() {
                let Some(w) = map.wrapped_key(&v.name) else {
                    continue;
                };
                if w.tenant != tenant || w.kek_check == new_check {
                    continue;
                }
                let dk = keys.unwrap(&w)?;
                let kek = keys.current(tenant)?;
                updates.push((
                    v.name.clone(),
                    WrappedKey {
                        tenant: tenant.to_owned(),
                        kek_check: new_check,
                        wrapped: kek.wrap(&dk),
                    },
                ));
            }
            if !updates.is_empty() {
                map.rewrap(dev.as_ref(), &updates)?;
                count += updates.len();
            }
        }
        keys.retire_old(tenant);
        log::info!(
            "tenant {tenant}: re-wrapped {count} data key(s) with the new key-encryption key"
        );
        Ok(count)
    }

    /// Counters of every volume that has been attached since the daemon
    /// started, by device: `(device, [(volume, counters)])`, and the
    /// device's capacity and free bytes.
    pub fn stats(&self) -> Vec<DeviceStats> {
        let st = self.lock();
        st.devices
            .iter()
            .map(|d| {
                let (capacity_bytes, free_bytes, volumes) = match &d.open {
                    Ok((dev, map)) => (
                        dev.capacity_bytes(),
                        map.free_bytes(),
                        map.volumes()
                            .into_iter()
                            .map(|v| {
                                let m = st
                                    .metrics
                                    .get(&v.name)
                                    .map(|m| m.snapshot())
                                    .unwrap_or_default();
                                (v.name, m)
                            })
                            .collect(),
                    ),
                    Err(_) => (0, 0, Vec::new()),
                };
                DeviceStats {
                    device: d.config.name.clone(),
                    capacity_bytes,
                    free_bytes,
                    volumes,
                }
            })
            .collect()
    }

    /// Tenants, with the reason for those whose key is unavailable.
    pub fn tenants(&self) -> Vec<(String, Option<String>)> {
        self.lock().keys.tenants()
    }

    /// Deletes a volume that is not attached.
    pub fn delete_volume(&self, name: &str) -> Result<Volume, CardError> {
        let mut st = self.lock();
        if st.attachments.contains_key(name) {
            return Err(CardError::Attached(name.into()));
        }
        let (i, _) =
            Self::find_volume(&st, name).ok_or_else(|| CardError::UnknownVolume(name.into()))?;
        let (dev, map) = st.devices[i]
            .open
            .as_mut()
            .expect("found on an open device");
        let v = map.delete(dev.as_ref(), name)?;
        st.metrics.remove(name);
        log::info!("deleted volume {name}");
        Ok(v)
    }

    /// Presents a volume through a new vhost-user-blk interface.
    pub fn attach(&self, name: &str, opts: &AttachOptions) -> Result<VolumeInfo, CardError> {
        let mut st = self.lock();
        if st.attachments.contains_key(name) {
            return Err(CardError::Attached(name.into()));
        }
        if let Some((other, _)) = st
            .attachments
            .iter()
            .find(|(_, a)| a.socket() == opts.socket)
        {
            return Err(CardError::SocketInUse(
                opts.socket.display().to_string(),
                other.clone(),
            ));
        }
        let (i, v) =
            Self::find_volume(&st, name).ok_or_else(|| CardError::UnknownVolume(name.into()))?;
        let (dev, _) = st.devices[i]
            .open
            .as_ref()
            .expect("found on an open device");
        // An encrypted volume attaches only with its tenant's key; a wrong
        // or missing key stops here, before anything can be written.
        let cipher = match st.devices[i]
            .open
            .as_ref()
            .ok()
            .and_then(|(_, m)| m.wrapped_key(name))
        {
            Some(w) => Some(Arc::new(Xts256::new(&st.keys.unwrap(&w)?))),
            None if v.encrypted => {
                return Err(CardError::Key(KeyError::Invalid(format!(
                    "volume {name:?} is marked encrypted but its key record is unreadable"
                ))))
            }
            None => None,
        };
        let target = BlkTarget {
            name: v.name.clone(),
            device: dev.clone(),
            offset: v.offset_bytes,
            size: v.size_bytes,
            cipher,
            share: st.devices[i].share.clone(),
            share_slot: st.devices[i].share.register(),
        };
        let metrics = st.metrics.entry(name.to_owned()).or_default().clone();
        let inherited = st.inherited.remove(&opts.socket);
        let a = match opts.interface {
            Interface::VhostUserBlk | Interface::VhostUserBlkConnect => {
                Iface::VhostUser(Attachment::start(
                    target,
                    &opts.socket,
                    opts.queues,
                    opts.qos,
                    metrics,
                    if opts.interface == Interface::VhostUserBlkConnect {
                        crate::virtio_blk::Source::Connect
                    } else {
                        crate::virtio_blk::Source::Listen(inherited)
                    },
                )?)
            }
            Interface::Nbd => Iface::Nbd(NbdExport::start(
                target,
                &opts.socket,
                opts.qos,
                metrics,
                inherited,
            )?),
        };
        st.attachments.insert(name.to_owned(), a);
        st.attached.insert(name.to_owned(), opts.clone());
        st.unrestored.remove(name);
        Self::persist(&st);
        let device = st.devices[i].config.name.clone();
        Ok(Self::info(&st, &device, v))
    }

    /// Changes the throttle limits of an attached volume, live.
    pub fn set_qos(&self, name: &str, qos: QosLimits) -> Result<VolumeInfo, CardError> {
        let mut st = self.lock();
        let (i, v) =
            Self::find_volume(&st, name).ok_or_else(|| CardError::UnknownVolume(name.into()))?;
        let a = st
            .attachments
            .get(name)
            .ok_or_else(|| CardError::NotAttached(name.into()))?;
        a.set_qos(qos)?;
        if let Some(o) = st.attached.get_mut(name) {
            o.qos = qos;
        }
        Self::persist(&st);
        Ok(Self::info(&st, &st.devices[i].config.name, v))
    }

    /// Ends a volume's interface.
    pub fn detach(&self, name: &str) -> Result<(), CardError> {
        let a = {
            let mut st = self.lock();
            // A recorded attachment that could not be restored: forget it.
            if st.unrestored.remove(name).is_some() {
                Self::persist(&st);
                log::info!("forgot the unrestored attachment of volume {name}");
                return Ok(());
            }
            if Self::find_volume(&st, name).is_none() {
                return Err(CardError::UnknownVolume(name.into()));
            }
            let a = st
                .attachments
                .remove(name)
                .ok_or_else(|| CardError::NotAttached(name.into()))?;
            st.attached.remove(name);
            Self::persist(&st);
            a
        };
        // Stop outside the lock: draining may take a moment.
        a.stop();
        log::info!("detached volume {name}");
        Ok(())
    }

    /// Stops every interface.
    pub fn shutdown(&self) {
        let all = std::mem::take(&mut self.lock().attachments);
        for (_, a) in all {
            a.stop();
        }
    }
}
