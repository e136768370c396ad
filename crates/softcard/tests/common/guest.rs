//! A QEMU guest (TCG) with vhost-user-blk disks, booted on a busybox
//! initramfs built here, its console read line by line.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Builds an initramfs whose init runs `script` (busybox sh) with the
/// virtio-blk modules and the files `pats`.
pub fn build_initramfs(kernel: &Path, out: &Path, script: &str, pats: &[(&str, &[u8])]) {
    let init = format!(
        "#!/bin/busybox sh\n{}{}",
        softcard_testkit::INIT_PRELUDE,
        script
    );
    let mut i = softcard_testkit::Initramfs::new(kernel, &init);
    i.modules(&["virtio_pci", "virtio_blk"]);
    for (name, data) in pats {
        i.file(name, data, 0o644);
    }
    std::fs::write(out, i.finish()).unwrap();
}

/// How long a guest has to boot, do its work and power off.
pub const GUEST_DEADLINE: Duration = Duration::from_secs(240);

/// A QEMU guest (TCG) booted on `initrd`, with one vhost-user-blk disk per
/// `(chardev options, device options)` (`num-queues=2`, `event_idx=off`,
/// ...); its console is read as it comes.
pub struct Guest {
    qemu: std::process::Child,
    qmp: std::path::PathBuf,
    lines: std::sync::mpsc::Receiver<String>,
    /// The console reader; taken when the console is.
    reader: Option<std::thread::JoinHandle<String>>,
    deadline: Instant,
}

impl Guest {
    pub fn boot(kernel: &Path, initrd: &Path, disks: &[(String, String)]) -> Guest {
        let qmp = initrd.with_extension("qmp");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(softcard_testkit::guest_args(kernel, initrd))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args([
                "-object",
                "memory-backend-memfd,id=mem,size=512M,share=on",
                "-numa",
                "node,memdev=mem",
            ]);
        for (i, (chardev, device)) in disks.iter().enumerate() {
            cmd.arg("-chardev").arg(format!("{chardev},id=c{i}")).args([
                "-device",
                &format!("vhost-user-blk-pci,chardev=c{i},{device}"),
            ]);
        }
        let mut qemu = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 (install qemu-system-x86)");
        let stdout = qemu.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for l in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok)
            {
                let _ = tx.send(l.clone());
                all.push_str(&l);
                all.push('\n');
            }
            all
        });
        Guest {
            qemu,
            qmp,
            lines,
            reader: Some(reader),
            deadline: Instant::now() + GUEST_DEADLINE,
        }
    }

    /// Waits for a console line starting with `prefix`.
    pub fn wait_line(&self, prefix: &str) {
        loop {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) if l.starts_with(prefix) => return,
                _ if Instant::now() > self.deadline => {
                    panic!("the guest printed no {prefix} line")
                }
                _ => {}
            }
        }
    }

    /// Runs a QMP command (`stop`, `cont`, ...) and returns its answer.
    pub fn qmp(&self, command: &str) -> serde_json::Value {
        softcard_host::qmp::Qmp::connect(&self.qmp)
            .and_then(|mut q| q.execute(command, serde_json::json!({})))
            .unwrap_or_else(|e| panic!("QMP {command}: {e}"))
    }

    /// QEMU's own view of its vhost-user-blk disks, for a failure
    /// message: each chardev's connection (`query-chardev`) and each
    /// device's virtio and vhost state (`x-query-virtio-status`).
    pub fn frontend_state(&self) -> String {
        use serde_json::json;
        let mut q = match softcard_host::qmp::Qmp::connect(&self.qmp) {
            Ok(q) => q,
            Err(e) => return format!("QMP: {e}"),
        };
        let mut out = String::new();
        match q.execute("query-chardev", json!({})) {
            Ok(v) => {
                for c in v.as_array().into_iter().flatten() {
                    out.push_str(&format!("chardev {c}\n"));
                }
            }
            Err(e) => out.push_str(&format!("query-chardev: {e}\n")),
        }
        let devices = q.execute("x-query-virtio", json!({}));
        for d in devices.iter().filter_map(|v| v.as_array()).flatten() {
            let path = d["path"].clone();
            out.push_str(&format!("virtio {path}:\n"));
            match q.execute("x-query-virtio-status", json!({ "path": path })) {
                Ok(v) => {
                    let vhost = &v["vhost-dev"];
                    out.push_str(&format!(
                        "  started {} vhost-started {} broken {} isr {} driver status {} \
                         vhost nvqs {} mem sections {}\n",
                        v["started"],
                        v["vhost-started"],
                        v["broken"],
                        v["isr"],
                        v["status"]["statuses"].as_array().map_or(0, Vec::len),
                        vhost["nvqs"],
                        vhost["n-mem-sections"],
                    ));
                }
                Err(e) => out.push_str(&format!("  status: {e}\n")),
            }
            // Not `x-query-virtio-queue-status`: on a running vhost device
            // QEMU 7.2 answers it with GET_VRING_BASE, which stops the ring.
            let cmd = "x-query-virtio-vhost-queue-status";
            match q.execute(cmd, json!({ "path": path, "queue": 0 })) {
                Ok(v) => out.push_str(&format!("  {cmd}: {v}\n")),
                Err(e) => out.push_str(&format!("  {cmd}: {e}\n")),
            }
        }
        out
    }

    /// The console lines that came since the last one waited for or
    /// returned here.
    pub fn new_lines(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Everything the console printed, once QEMU has exited.
    fn whole_console(&mut self) -> String {
        self.reader
            .take()
            .map(|r| r.join().unwrap())
            .unwrap_or_default()
    }

    /// Waits for the guest to power off; its whole console.
    pub fn console(mut self) -> String {
        loop {
            if self.qemu.try_wait().unwrap().is_some() {
                return self.whole_console();
            }
            if Instant::now() > self.deadline {
                let _ = self.qemu.kill();
                let _ = self.qemu.wait();
                panic!(
                    "guest did not power off within {} s:\n{}",
                    GUEST_DEADLINE.as_secs(),
                    self.whole_console()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A test that fails while its guest runs leaves no QEMU behind (one
/// would hold the test's output open and keep its disk's sockets busy).
impl Drop for Guest {
    fn drop(&mut self) {
        if matches!(self.qemu.try_wait(), Ok(None)) {
            let _ = self.qemu.kill();
            let _ = self.qemu.wait();
        }
    }
}
