//! An instance's VM: a QEMU process with shared guest memory, its boot
//! volume on a vhost-user-blk socket of this card, spare PCIe root ports
//! for hot-plugged volumes, the serial console in a file and QMP on a unix
//! socket, all in the instance's own directory. The process outlives the
//! card daemon (a restarted daemon adopts it through its pid file and QMP
//! socket; QEMU listens on the volumes' sockets and the new card connects
//! to them).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::qmp::{Qmp, QmpError};

/// Root ports for hot-plugged volumes: at most this many data volumes per
/// instance.
pub const HOTPLUG_PORTS: usize = 8;
/// How long QEMU may take to open its monitor.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// A file in the VM's directory: its QEMU listens on the volume sockets
/// ([`Vm::card_connects`]).
const LISTENS: &str = "volumes-listen";
/// How long a guest has to release an unplugged disk before the detach is
/// reported `busy`.
pub const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Starting QEMU failed.
    #[error("starting QEMU: {0}")]
    Start(String),
    /// A QMP call failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// Files of the instance.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No root port left for another disk.
    #[error("no free PCIe root port (at most {HOTPLUG_PORTS} hot-plugged volumes)")]
    NoPort,
}

/// How to start a VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `tcg` or `kvm`.
    pub accel: String,
    /// Kernel and initramfs of the image.
    pub kernel: PathBuf,
    /// The image's initramfs.
    pub initrd: PathBuf,
    /// The instance id (on the kernel command line too).
    pub id: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// The boot volume's vhost-user socket.
    pub boot_socket: PathBuf,
    /// This program and the instance's metadata file: QEMU runs `PROGRAM
    /// metadata --file FILE` for each guest connection to
    /// 169.254.169.254:80 and `PROGRAM relay --metadata FILE` for each to
    /// 169.254.169.254:7070 (its vGPU); none: no metadata NIC.
    pub metadata: Option<(PathBuf, PathBuf)>,
}

/// A running (or adopted) VM.
#[derive(Debug)]
pub struct Vm {
    dir: PathBuf,
    pid: i32,
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

impl Vm {
    /// The instance's console file.
    pub fn console_path(dir: &Path) -> PathBuf {
        dir.join("console.log")
    }

    fn qmp_path(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// Starts QEMU for `spec` in `dir` (created), and waits for its
    /// monitor.
    pub fn start(spec: &VmSpec, dir: &Path) -> Result<Vm, VmError> {
        std::fs::create_dir_all(dir)?;
        for f in ["qmp.sock", "qemu.pid", "ports.json"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        std::fs::write(dir.join(LISTENS), "")?;
        let mem = format!("{}M", spec.memory_mib);
        let mut cmd = Command::new(&spec.qemu);
        cmd.arg("-name")
            .arg(&spec.id)
            .args(["-machine", &format!("q35,accel={}", spec.accel)])
            .args(["-m", &mem, "-smp", &spec.vcpus.to_string()])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
                "-numa",
                "node,memdev=mem",
            ])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initrd)
            .args([
                "-append",
                &format!(
                    "console=ttyS0 panic=-1 quiet loglevel=3 softcard.instance={}",
                    spec.id
                ),
            ])
            .arg("-chardev")
            .arg(format!(
                "socket,id=boot,path={},server=on,wait=off",
                spec.boot_socket.display()
            ))
            .args([
                "-device",
                "vhost-user-blk-pci,chardev=boot,num-queues=1,id=boot-disk",
            ]);
        for n in 0..HOTPLUG_PORTS {
            cmd.args([
                "-device",
                &format!("pcie-root-port,id=rp{n},chassis={}", n + 1),
            ]);
        }
        if let Some((exe, file)) = &spec.metadata {
            let (exe, file) = (exe.display().to_string(), file.display().to_string());
            // Commas separate QEMU's options: such paths get no metadata.
            if !exe.contains(',') && !file.contains(',') {
                // User networking restricted to two forwards: the guest
                // reaches the metadata service and its vGPU, nothing else.
                let port = crate::metadata::GUEST_VGPU_PORT;
                cmd.args([
                    "-netdev",
                    &format!(
                        "user,id=md,restrict=on,net=169.254.169.0/24,host=169.254.169.2,\
                         guestfwd=tcp:169.254.169.254:80-cmd:{exe} metadata --file {file},\
                         guestfwd=tcp:169.254.169.254:{port}-cmd:{exe} relay --metadata {file}"
                    ),
                    "-device",
                    "virtio-net-pci,netdev=md",
                ]);
            }
        }
        cmd.arg("-chardev")
            .arg(format!(
                "file,id=serial0,path={}",
                Self::console_path(dir).display()
            ))
            .args(["-serial", "chardev:serial0"])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join("qmp.sock").display()
            ))
            .arg("-pidfile")
            .arg(dir.join("qemu.pid"))
            .args(["-display", "none", "-nodefaults"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.stderr"))?);
        // SAFETY: setsid and close_range in the child between fork and
        // exec touch no memory of the parent. The VM gets a session of its
        // own, so a terminal's Ctrl-C to the card daemon does not reach
        // it; and it keeps no descriptor of the daemon beyond its standard
        // streams. (An inherited vhost-user listening socket outlives a
        // crashed daemon inside QEMU: QEMU then reconnects to it, nobody
        // ever accepts, and QEMU's main loop and monitor hang.)
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| VmError::Start(format!("{}: {e}", spec.qemu.display())))?;
        let pid = i32::try_from(child.id()).unwrap_or(0);
        let vm = Vm {
            dir: dir.to_owned(),
            pid,
        };
        let begin = Instant::now();
        loop {
            if let Some(st) = child.try_wait()? {
                let err = std::fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default();
                return Err(VmError::Start(format!(
                    "QEMU exited ({st}): {}",
                    err.trim()
                )));
            }
            if vm.qmp_path().exists() {
                if let Ok(mut q) = Qmp::connect(&vm.qmp_path()) {
                    let st = q.execute("query-status", json!({}))?;
                    if st["status"] == "running" {
                        // The child is reaped by whoever outlives it: a
                        // thread waits for it so it never lingers as a
                        // zombie of this daemon.
                        std::thread::spawn(move || {
                            let _ = child.wait();
                        });
                        return Ok(vm);
                    }
                }
            }
            if begin.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(VmError::Start(
                    "QEMU did not open its monitor in time".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The VM of an instance directory, if its QEMU still runs and answers
    /// on its monitor.
    pub fn adopt(dir: &Path) -> Option<Vm> {
        let pid: i32 = std::fs::read_to_string(dir.join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let vm = Vm {
            dir: dir.to_owned(),
            pid,
        };
        (pid_alive(pid) && Qmp::connect(&vm.qmp_path()).is_ok()).then_some(vm)
    }

    /// Whether QEMU listens on this VM's volume sockets and the card
    /// connects to them: VMs this version starts. A restarted card is
    /// then taken at once, where QEMU 7.2 connecting itself retries once a
    /// second (docs/live-update.md); VMs an older version started keep
    /// connecting.
    pub fn card_connects(&self) -> bool {
        self.dir.join(LISTENS).exists()
    }

    /// Whether QEMU still runs.
    pub fn alive(&self) -> bool {
        pid_alive(self.pid) && !is_zombie(self.pid)
    }

    /// A monitor connection.
    pub fn qmp(&self) -> Result<Qmp, VmError> {
        Ok(Qmp::connect(&self.qmp_path())?)
    }

    /// Resets the guest (EC2's reboot).
    pub fn reset(&self) -> Result<(), VmError> {
        self.qmp()?.execute("system_reset", json!({}))?;
        Ok(())
    }

    /// Ends QEMU: `quit` on the monitor, then SIGKILL if it lingers.
    pub fn kill(self) {
        if let Ok(mut q) = self.qmp() {
            let _ = q.execute_within("quit", json!({}), Duration::from_secs(2));
        }
        let begin = Instant::now();
        while self.alive() && begin.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.alive() {
            // SAFETY: signalling a process this host started.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
            while self.alive() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn ports(&self) -> BTreeMap<String, usize> {
        std::fs::read(self.dir.join("ports.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_ports(&self, p: &BTreeMap<String, usize>) -> Result<(), VmError> {
        std::fs::write(
            self.dir.join("ports.json"),
            serde_json::to_vec(p).unwrap_or_default(),
        )?;
        Ok(())
    }

    /// Whether volume `vol` is plugged in.
    pub fn has_disk(&self, vol: &str) -> bool {
        self.ports().contains_key(vol)
    }

    /// Hot-plugs volume `vol` on `socket`. QEMU's monitor blocks in
    /// `device_add` until the card is connected: the card must be
    /// connecting to `socket` already ([`Vm::card_connects`]), or, for an
    /// older VM, listening on it.
    pub fn hotplug(&self, vol: &str, socket: &Path) -> Result<(), VmError> {
        let mut ports = self.ports();
        if ports.contains_key(vol) {
            return Ok(());
        }
        let port = (0..HOTPLUG_PORTS)
            .find(|p| !ports.values().any(|x| x == p))
            .ok_or(VmError::NoPort)?;
        let addr = json!({"type": "unix", "data": {"path": socket.to_string_lossy()}});
        let backend = if self.card_connects() {
            json!({"addr": addr, "server": true, "wait": false})
        } else {
            std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
                VmError::Start(format!(
                    "volume socket {} does not answer: {e}",
                    socket.display()
                ))
            })?;
            json!({"addr": addr, "server": false, "reconnect": 1})
        };
        let mut q = self.qmp()?;
        let chardev = format!("chr-{vol}");
        q.execute(
            "chardev-add",
            json!({"id": chardev, "backend": {"type": "socket", "data": backend}}),
        )?;
        let added = q.execute(
            "device_add",
            json!({"driver": "vhost-user-blk-pci", "id": format!("disk-{vol}"),
                   "chardev": chardev, "num-queues": 1, "bus": format!("rp{port}")}),
        );
        if let Err(e) = added {
            let _ = q.execute("chardev-remove", json!({"id": chardev}));
            return Err(e.into());
        }
        ports.insert(vol.to_owned(), port);
        self.save_ports(&ports)
    }

    /// Unplugs volume `vol`: `device_del`, the guest's release
    /// (`DEVICE_DELETED`) within `timeout`, `chardev-remove`. Returns false
    /// when the guest did not release the disk in time (`busy`).
    pub fn unplug(&self, vol: &str, timeout: Duration) -> Result<bool, VmError> {
        let mut ports = self.ports();
        if !ports.contains_key(vol) {
            return Ok(true);
        }
        let mut q = self.qmp()?;
        let dev = format!("disk-{vol}");
        match q.execute("device_del", json!({"id": dev})) {
            Ok(_) => {}
            // Already gone (an earlier unplug that timed out completed).
            Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {}
            Err(e) => return Err(e.into()),
        }
        let released = q
            .wait_event("DEVICE_DELETED", timeout, |d| d["device"] == dev.as_str())
            .is_ok()
            || !device_present(&mut q, &dev);
        if !released {
            return Ok(false);
        }
        let _ = q.execute("chardev-remove", json!({"id": format!("chr-{vol}")}));
        ports.remove(vol);
        self.save_ports(&ports)?;
        Ok(true)
    }

    /// Forgets a disk whose backend was cut (a forced detach): the guest's
    /// device stays until it releases it or the VM restarts.
    pub fn forget_disk(&self, vol: &str) -> Result<(), VmError> {
        let mut ports = self.ports();
        ports.remove(vol);
        self.save_ports(&ports)
    }
}

fn device_present(q: &mut Qmp, dev: &str) -> bool {
    q.execute(
        "qom-get",
        json!({"path": format!("/machine/peripheral/{dev}"), "property": "type"}),
    )
    .is_ok()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('Z')))
        .unwrap_or(false)
}
