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
/// `(chardev options, queues)`; its console is read as it comes.
pub struct Guest {
    qemu: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<String>,
    deadline: Instant,
}

impl Guest {
    pub fn boot(kernel: &Path, initrd: &Path, disks: &[(String, u16)]) -> Guest {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(softcard_testkit::guest_args(kernel, initrd))
            .args([
                "-object",
                "memory-backend-memfd,id=mem,size=512M,share=on",
                "-numa",
                "node,memdev=mem",
            ]);
        for (i, (chardev, queues)) in disks.iter().enumerate() {
            cmd.arg("-chardev").arg(format!("{chardev},id=c{i}")).args([
                "-device",
                &format!("vhost-user-blk-pci,chardev=c{i},num-queues={queues}"),
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
            lines,
            reader,
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

    /// Waits for the guest to power off; its whole console.
    pub fn console(mut self) -> String {
        loop {
            if self.qemu.try_wait().unwrap().is_some() {
                return self.reader.join().unwrap();
            }
            if Instant::now() > self.deadline {
                let _ = self.qemu.kill();
                let _ = self.qemu.wait();
                panic!(
                    "guest did not power off within {} s:\n{}",
                    GUEST_DEADLINE.as_secs(),
                    self.reader.join().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
