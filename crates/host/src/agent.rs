//! The host agent inside the card daemon: registers the host with the
//! region and heartbeats under its lease (one thread), and reconciles what
//! the region says should run here with what does (another): volumes on
//! the card's devices, QEMU VMs for instances, hot-plugged volumes, the
//! console tails. A pass compares and moves one step at a time, so a crash
//! or restart at any point heals on the next pass; QEMU processes outlive
//! the daemon and are adopted again.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};
use softcard_region::client::{ClientError, RegionClient};
use softcard_region::model::{
    AttachmentState, HostDevice, HostRegistration, Instance, InstanceState, Volume, VolumeState,
};
use softcard_storage::{AttachOptions, CardError, Interface, StorageCard};

use crate::image;
use crate::vm::{Vm, VmSpec, UNPLUG_TIMEOUT};

/// How long the reconciler waits between passes when the region has no
/// change to report (it long-polls; VMs' liveness and consoles are looked
/// at on every pass).
const PASS_INTERVAL: Duration = Duration::from_millis(200);
/// How long a forced detach waits for the guest before cutting the disk.
const FORCED_UNPLUG_WAIT: Duration = Duration::from_secs(1);
/// Prefix of the volumes the region manages (its volume ids).
const REGION_VOLUME_PREFIX: &str = "vol-";

/// How this host runs instances.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The host's name in the region.
    pub name: String,
    /// vCPUs offered to instances.
    pub vcpus: u32,
    /// Memory offered to instances, MiB.
    pub memory_mib: u64,
    /// Where instances' directories (sockets, console, monitor) and images
    /// live.
    pub data_dir: PathBuf,
    /// QEMU's system emulator.
    pub qemu: PathBuf,
    /// `tcg` or `kvm`.
    pub accel: String,
    /// Stop the VMs when the agent stops (`softcard up`); a card daemon
    /// leaves them running for its next start to adopt.
    pub stop_vms_on_exit: bool,
}

/// A running agent; stopped when dropped.
#[derive(Debug)]
pub struct Agent {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    local: Local,
    _lease: softcard_region::client::Registration,
}

/// What this host runs, as of the reconciler's last pass (for the card's
/// API).
type Local = Arc<std::sync::Mutex<Value>>;

impl Agent {
    /// Starts registering, heartbeating and reconciling.
    pub fn start(
        cfg: HostConfig,
        card: Arc<StorageCard>,
        client: RegionClient,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(cfg.data_dir.join("instances"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let lease = {
            let (cfg, card) = (cfg.clone(), card.clone());
            softcard_region::client::Registration::start(
                client.clone(),
                "/v1/agent/register",
                "/v1/agent/heartbeat",
                move || json!(registration(&cfg, &card)),
            )?
        };
        let registered = lease.registered();
        let consoles = {
            let (dir, client, stop) =
                (cfg.data_dir.join("instances"), client.clone(), stop.clone());
            std::thread::Builder::new()
                .name("host-consoles".into())
                .spawn(move || console_loop(&dir, &client, &stop))?
        };
        let local: Local = Arc::default();
        let rec = {
            let stop = stop.clone();
            let local = local.clone();
            std::thread::Builder::new()
                .name("host-reconcile".into())
                .spawn(move || {
                    let mut r = Reconciler {
                        cfg,
                        card,
                        client,
                        vms: HashMap::new(),
                        revision: None,
                        local,
                    };
                    while !stop.load(Ordering::SeqCst) {
                        if registered.load(Ordering::SeqCst) {
                            if let Err(e) = r.pass() {
                                log::warn!("host reconcile: {e}");
                            }
                        }
                        std::thread::sleep(PASS_INTERVAL);
                    }
                    if r.cfg.stop_vms_on_exit {
                        for (id, vm) in r.vms.drain() {
                            log::info!("stopping the VM of {id}");
                            vm.kill();
                        }
                    }
                })?
        };
        Ok(Agent {
            stop,
            threads: vec![consoles, rec],
            local,
            _lease: lease,
        })
    }

    /// The card API's routes for what this host runs: `GET /v1/instances`
    /// (each instance the region placed here, with its VM's process, and
    /// the volumes plugged into it).
    pub fn router(&self) -> axum::Router {
        let local = self.local.clone();
        axum::Router::new().route(
            "/v1/instances",
            axum::routing::get(move || {
                let local = local.clone();
                async move {
                    let v = local.lock().map(|v| v.clone()).unwrap_or_default();
                    axum::Json(if v.is_null() { json!([]) } else { v })
                }
            }),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the host offers: its vCPUs and memory, and per device the bytes
/// the region may use (free bytes plus the region's own volumes).
pub fn registration(cfg: &HostConfig, card: &StorageCard) -> HostRegistration {
    let vols = card.volumes();
    HostRegistration {
        vcpus: cfg.vcpus,
        memory_mib: cfg.memory_mib,
        devices: card
            .devices()
            .into_iter()
            .filter(|d| d.error.is_none())
            .map(|d| HostDevice {
                capacity_bytes: d.free_bytes
                    + vols
                        .iter()
                        .filter(|v| {
                            v.device == d.name && v.volume.name.starts_with(REGION_VOLUME_PREFIX)
                        })
                        .map(|v| v.volume.size_bytes)
                        .sum::<u64>(),
                name: d.name,
            })
            .collect(),
    }
}

struct Reconciler {
    cfg: HostConfig,
    card: Arc<StorageCard>,
    client: RegionClient,
    vms: HashMap<String, Vm>,
    /// The store revision of the last work seen (the next long poll waits
    /// for a change after it).
    revision: Option<i64>,
    local: Local,
}

type Outcome = Result<(), String>;

impl Reconciler {
    fn dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("instances").join(id)
    }

    fn report_instance(
        &self,
        id: &str,
        state: InstanceState,
        reason: Option<String>,
    ) -> Result<(), ClientError> {
        if let Some(r) = &reason {
            log::warn!("instance {id}: {} ({r})", state.name());
        }
        self.client
            .post(
                &format!("/v1/agent/instances/{id}/status"),
                &json!({"state": state, "reason": reason}),
            )
            .map(drop)
    }

    fn report_volume(&self, id: &str, body: &Value) -> Result<(), ClientError> {
        self.client
            .post(&format!("/v1/agent/volumes/{id}/status"), body)
            .map(drop)
    }

    fn pass(&mut self) -> Result<(), ClientError> {
        let work = match self.revision {
            Some(r) => self.client.get(&format!("/v1/agent/work?wait={r}"))?,
            None => self.client.get("/v1/agent/work")?,
        };
        self.revision = work["revision"].as_i64();
        let instances: Vec<Instance> =
            serde_json::from_value(work["instances"].clone()).unwrap_or_default();
        // What each instance learns from its metadata service.
        for raw in work["instances"].as_array().into_iter().flatten() {
            let Some(id) = raw["id"].as_str() else {
                continue;
            };
            let dir = self.dir(id);
            if dir.is_dir() || matches!(raw["state"].as_str(), Some("pending")) {
                let access = raw.get("vgpu_access").filter(|v| !v.is_null());
                let doc = crate::metadata::document(id, access);
                let _ = std::fs::create_dir_all(&dir);
                if std::fs::read(dir.join("metadata.json")).ok() != serde_json::to_vec(&doc).ok() {
                    let _ = crate::metadata::write(&dir, &doc);
                }
            }
        }
        let volumes: Vec<Volume> =
            serde_json::from_value(work["volumes"].clone()).unwrap_or_default();
        for v in &volumes {
            self.volume(v)?;
        }
        for i in &instances {
            let attached: Vec<&Volume> = volumes
                .iter()
                .filter(|v| {
                    v.boot_of.is_none() && v.attachment.as_ref().is_some_and(|a| a.instance == i.id)
                })
                .collect();
            self.instance(i, &volumes, &attached)?;
        }
        self.forget_others(&instances);
        self.publish_local(&instances);
        Ok(())
    }

    fn publish_local(&mut self, instances: &[Instance]) {
        let list: Vec<Value> = instances
            .iter()
            .map(|i| {
                let dir = self.dir(&i.id);
                let pid = std::fs::read_to_string(dir.join("qemu.pid"))
                    .ok()
                    .and_then(|p| p.trim().parse::<i64>().ok());
                let plugged: Vec<String> = std::fs::read(dir.join("ports.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<BTreeMap<String, usize>>(&b).ok())
                    .map(|m| m.into_keys().collect())
                    .unwrap_or_default();
                json!({
                    "id": i.id,
                    "name": i.name,
                    "tenant": i.tenant,
                    "state": i.state,
                    "vm_running": self.vms.get(&i.id).is_some_and(Vm::alive),
                    "qemu_pid": pid,
                    "vcpus": i.vcpus,
                    "memory_mib": i.memory_mib,
                    "boot_volume": i.boot_volume,
                    "hotplugged_volumes": plugged,
                    "console": Vm::console_path(&dir),
                    "qmp": dir.join("qmp.sock"),
                })
            })
            .collect();
        if let Ok(mut l) = self.local.lock() {
            *l = Value::Array(list);
        }
    }

    /// Creates and deletes volumes on the card.
    fn volume(&self, v: &Volume) -> Result<(), ClientError> {
        match v.state {
            VolumeState::Creating => {
                let made = match self.card.volume(&v.id) {
                    Ok(_) => Ok(()),
                    Err(CardError::UnknownVolume(_)) => if v.encrypted {
                        self.card
                            .create_encrypted_volume(&v.id, &v.device, v.size_bytes, &v.tenant)
                    } else {
                        self.card.create_volume(&v.id, &v.device, v.size_bytes)
                    }
                    .map(drop),
                    Err(e) => Err(e),
                };
                match made {
                    Ok(()) => self.report_volume(&v.id, &json!({"state": "available"})),
                    Err(e) => self
                        .report_volume(&v.id, &json!({"state": "error", "reason": e.to_string()})),
                }
            }
            VolumeState::Deleting => {
                let _ = self.card.detach(&v.id);
                match self.card.delete_volume(&v.id) {
                    Ok(_) | Err(CardError::UnknownVolume(_)) => {
                        self.report_volume(&v.id, &json!({"state": "deleted"}))
                    }
                    Err(e) => {
                        log::warn!("deleting volume {}: {e}", v.id);
                        Ok(())
                    }
                }
            }
            _ => Ok(()),
        }
    }

    /// Serves volume `vol` on `socket` (again, after a card restart):
    /// connecting to it where the VM's QEMU listens (`connect`), else
    /// listening on it.
    fn serve_volume(&self, vol: &str, socket: &Path, connect: bool) -> Outcome {
        let interface = if connect {
            Interface::VhostUserBlkConnect
        } else {
            Interface::VhostUserBlk
        };
        match self.card.volume(vol) {
            Ok(info) => match info.attachment {
                Some(a) if a.interface == interface => return Ok(()),
                // Left from before, the other way round: QEMU and the card
                // would both wait for the other.
                Some(_) => {
                    self.card
                        .detach(vol)
                        .map_err(|e| format!("serving volume {vol}: {e}"))?;
                }
                None => {}
            },
            Err(e) => return Err(format!("volume {vol}: {e}")),
        }
        self.card
            .attach(
                vol,
                &AttachOptions {
                    socket: socket.to_owned(),
                    queues: 1,
                    qos: Default::default(),
                    interface,
                },
            )
            .map(drop)
            .map_err(|e| format!("serving volume {vol}: {e}"))
    }

    /// Whether the card connects to the volume sockets of instance `id`'s
    /// VM ([`Vm::card_connects`]); VMs not running yet will listen.
    fn card_connects(&mut self, id: &str) -> bool {
        self.vm(id).is_none_or(Vm::card_connects)
    }

    /// The VM of an instance, adopted when this process did not start it.
    fn vm(&mut self, id: &str) -> Option<&Vm> {
        if self.vms.get(id).is_some_and(|vm| !vm.alive()) {
            self.vms.remove(id);
        }
        if !self.vms.contains_key(id) {
            let vm = Vm::adopt(&self.dir(id))?;
            log::info!("adopted the running VM of {id}");
            self.vms.insert(id.to_owned(), vm);
        }
        self.vms.get(id)
    }

    fn start_vm(&mut self, i: &Instance) -> Outcome {
        let dir = self.dir(&i.id);
        let boot = dir.join("boot.sock");
        // The card connects once QEMU listens (QEMU waits for it before
        // the guest starts).
        self.serve_volume(&i.boot_volume, &boot, true)?;
        let img = image::image(&i.image, &self.cfg.data_dir.join("images"))
            .map_err(|e| format!("image {}: {e}", i.image))?;
        let spec = VmSpec {
            qemu: self.cfg.qemu.clone(),
            accel: self.cfg.accel.clone(),
            kernel: img.kernel,
            initrd: img.initrd,
            id: i.id.clone(),
            vcpus: i.vcpus,
            memory_mib: i.memory_mib,
            boot_socket: boot,
            metadata: std::env::current_exe()
                .ok()
                .map(|exe| (exe, dir.join("metadata.json"))),
        };
        let vm = Vm::start(&spec, &dir).map_err(|e| e.to_string())?;
        let _ = std::fs::write(dir.join("reboots"), i.reboots.to_string());
        log::info!("instance {} runs", i.id);
        self.vms.insert(i.id.clone(), vm);
        Ok(())
    }

    fn stop_vm(&mut self, id: &str, vols: &[&Volume]) {
        if self.vm(id).is_some() {
            if let Some(vm) = self.vms.remove(id) {
                vm.kill();
            }
        }
        for v in vols {
            let _ = self.card.detach(&v.id);
        }
    }

    fn instance(
        &mut self,
        i: &Instance,
        volumes: &[Volume],
        attached: &[&Volume],
    ) -> Result<(), ClientError> {
        let boot = volumes.iter().find(|v| v.id == i.boot_volume);
        let mut mine: Vec<&Volume> = attached.to_vec();
        if let Some(b) = boot {
            mine.push(b);
        }
        match i.state {
            InstanceState::Pending => {
                match boot.map(|b| b.state) {
                    Some(VolumeState::Available | VolumeState::InUse) => {}
                    Some(VolumeState::Error) => {
                        let why = boot
                            .and_then(|b| b.state_reason.clone())
                            .unwrap_or_default();
                        return self.report_instance(
                            &i.id,
                            InstanceState::Stopped,
                            Some(format!("Server.InternalError: boot volume: {why}")),
                        );
                    }
                    // Not made yet: the next pass.
                    _ => return Ok(()),
                }
                if self.vm(&i.id).is_none() {
                    if let Err(e) = self.start_vm(i) {
                        self.stop_vm(&i.id, &mine);
                        return self.report_instance(
                            &i.id,
                            InstanceState::Stopped,
                            Some(format!("Server.InternalError: {e}")),
                        );
                    }
                }
                self.report_instance(&i.id, InstanceState::Running, None)
            }
            InstanceState::Running => {
                let boot_sock = self.dir(&i.id).join("boot.sock");
                if self.vm(&i.id).is_none() {
                    let err = std::fs::read_to_string(self.dir(&i.id).join("qemu.stderr"))
                        .unwrap_or_default();
                    self.stop_vm(&i.id, &mine);
                    return self.report_instance(
                        &i.id,
                        InstanceState::Stopped,
                        Some(
                            format!("Server.InternalError: QEMU is not running {}", err.trim())
                                .trim_end()
                                .to_owned(),
                        ),
                    );
                }
                let connect = self.card_connects(&i.id);
                if let Err(e) = self.serve_volume(&i.boot_volume, &boot_sock, connect) {
                    log::warn!("instance {}: {e}", i.id);
                }
                self.apply_reboots(i);
                for v in attached {
                    self.attachment(i, v)?;
                }
                Ok(())
            }
            InstanceState::Stopping => {
                self.stop_vm(&i.id, &mine);
                self.report_instance(&i.id, InstanceState::Stopped, None)
            }
            InstanceState::Stopped => {
                if self.vm(&i.id).is_some() {
                    self.stop_vm(&i.id, &mine);
                }
                // Volumes detaching from a stopped instance are unplugged
                // already.
                for v in attached {
                    if v.attachment
                        .as_ref()
                        .is_some_and(|a| a.state == AttachmentState::Detaching)
                    {
                        self.report_volume(&v.id, &json!({"detached": true}))?;
                    }
                }
                Ok(())
            }
            InstanceState::ShuttingDown => {
                self.stop_vm(&i.id, &mine);
                if !i.keep_boot_volume {
                    match self.card.delete_volume(&i.boot_volume) {
                        Ok(_) | Err(CardError::UnknownVolume(_)) => {}
                        Err(e) => {
                            log::warn!("instance {}: deleting its boot volume: {e}", i.id);
                            return Ok(());
                        }
                    }
                }
                let _ = std::fs::remove_dir_all(self.dir(&i.id));
                self.report_instance(&i.id, InstanceState::Terminated, None)
            }
            InstanceState::Terminated => Ok(()),
        }
    }

    fn apply_reboots(&mut self, i: &Instance) {
        let file = self.dir(&i.id).join("reboots");
        let done: u32 = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if i.reboots > done {
            if let Some(vm) = self.vm(&i.id) {
                match vm.reset() {
                    Ok(()) => {
                        log::info!("instance {} rebooted", i.id);
                        let _ = std::fs::write(&file, i.reboots.to_string());
                    }
                    Err(e) => log::warn!("instance {}: reboot: {e}", i.id),
                }
            }
        }
    }

    /// Moves one data volume's attachment to `i` a step.
    fn attachment(&mut self, i: &Instance, v: &Volume) -> Result<(), ClientError> {
        let Some(a) = &v.attachment else {
            return Ok(());
        };
        let sock = self.dir(&i.id).join(format!("{}.sock", v.id));
        match a.state {
            AttachmentState::Attaching | AttachmentState::Attached => {
                let connect = self.card_connects(&i.id);
                let plugged = self.serve_volume(&v.id, &sock, connect).and_then(|()| {
                    let vm = self.vm(&i.id).ok_or("the VM is not running")?;
                    vm.hotplug(&v.id, &sock).map_err(|e| e.to_string())
                });
                match (plugged, a.state) {
                    (Ok(()), AttachmentState::Attaching) => {
                        self.report_volume(&v.id, &json!({"attachment": "attached"}))
                    }
                    (Ok(()), _) => Ok(()),
                    (Err(e), _) => {
                        let _ = self.card.detach(&v.id);
                        self.report_volume(&v.id, &json!({"detached": true, "reason": e}))
                    }
                }
            }
            AttachmentState::Detaching => {
                let Some(vm) = self.vm(&i.id) else {
                    let _ = self.card.detach(&v.id);
                    return self.report_volume(&v.id, &json!({"detached": true}));
                };
                let wait = if a.force {
                    FORCED_UNPLUG_WAIT
                } else {
                    UNPLUG_TIMEOUT
                };
                let released = vm.unplug(&v.id, wait).unwrap_or(false);
                if released || a.force {
                    if !released {
                        let _ = vm.forget_disk(&v.id);
                    }
                    let _ = self.card.detach(&v.id);
                    self.report_volume(&v.id, &json!({"detached": true}))
                } else {
                    self.report_volume(&v.id, &json!({"attachment": "busy"}))
                }
            }
            AttachmentState::Busy => Ok(()),
        }
    }

    /// VMs and directories of instances the region no longer lists here
    /// (terminated elsewhere, or never placed): stopped and removed.
    fn forget_others(&mut self, instances: &[Instance]) {
        let listed: BTreeMap<&str, ()> = instances.iter().map(|i| (i.id.as_str(), ())).collect();
        let Ok(dirs) = std::fs::read_dir(self.cfg.data_dir.join("instances")) else {
            return;
        };
        for d in dirs.flatten() {
            let id = d.file_name().to_string_lossy().into_owned();
            if listed.contains_key(id.as_str()) {
                continue;
            }
            if let Some(vm) = self.vms.remove(&id).or_else(|| Vm::adopt(&d.path())) {
                log::warn!("stopping the VM of {id}: the region does not list it here");
                vm.kill();
            }
            let _ = std::fs::remove_dir_all(d.path());
        }
    }
}

/// How often instances' consoles are looked at.
const CONSOLE_INTERVAL: Duration = Duration::from_millis(50);

/// Sends the region the tail of every instance console that grew.
fn console_loop(dir: &Path, client: &RegionClient, stop: &AtomicBool) {
    let mut sizes: HashMap<String, u64> = HashMap::new();
    while !stop.load(Ordering::SeqCst) {
        let mut seen = Vec::new();
        for d in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let id = d.file_name().to_string_lossy().into_owned();
            let path = Vm::console_path(&d.path());
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            seen.push(id.clone());
            if sizes.get(&id) == Some(&meta.len()) {
                continue;
            }
            let Ok(text) = std::fs::read(&path) else {
                continue;
            };
            let keep = softcard_region::service::instances::CONSOLE_BYTES;
            let tail = text[text.len().saturating_sub(keep)..].to_vec();
            if client
                .put_bytes(&format!("/v1/agent/instances/{id}/console"), tail)
                .is_ok()
            {
                sizes.insert(id, meta.len());
            }
        }
        sizes.retain(|id, _| seen.contains(id));
        std::thread::sleep(CONSOLE_INTERVAL);
    }
}
