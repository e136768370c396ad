//! Test support for end-to-end tests with real Linux guests: the host's
//! Debian kernel, and an initramfs built on the fly from busybox, kernel
//! modules (with their dependencies, in load order) and host binaries
//! (with the shared libraries they need).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The newest `/boot/vmlinuz-*` (package linux-image-amd64).
pub fn kernel() -> PathBuf {
    let mut k: Vec<PathBuf> = std::fs::read_dir("/boot")
        .expect("/boot (install linux-image-amd64)")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    k.sort();
    k.pop()
        .expect("no /boot/vmlinuz-* (install linux-image-amd64)")
}

fn module_dir(kernel: &Path) -> PathBuf {
    let name = kernel
        .file_name()
        .expect("kernel file name")
        .to_string_lossy();
    PathBuf::from("/lib/modules").join(name.trim_start_matches("vmlinuz-"))
}

/// A newc cpio archive being built: the initramfs format.
#[derive(Debug)]
pub struct Initramfs {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
    files: BTreeSet<String>,
    modules: Vec<String>,
    kernel: PathBuf,
}

impl Initramfs {
    /// An archive for `kernel`, holding busybox as `/bin/busybox`, the
    /// standard directories, and `init` as `/init`.
    pub fn new(kernel: &Path, init: &str) -> Self {
        let mut i = Initramfs {
            out: Vec::new(),
            ino: 1,
            dirs: BTreeSet::new(),
            files: BTreeSet::new(),
            modules: Vec::new(),
            kernel: kernel.to_owned(),
        };
        for d in ["proc", "sys", "dev", "tmp", "bin", "lib/modules"] {
            i.dir(d);
        }
        let bb = std::fs::read("/bin/busybox").expect("/bin/busybox (install busybox-static)");
        i.file("bin/busybox", &bb, 0o755);
        i.file("init", init.as_bytes(), 0o755);
        i
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).expect("file under 4 GiB"),
            0,
            0,
            0,
            0,
            u32::try_from(name.len() + 1).expect("short name"),
            0,
        ];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            write!(self.out, "{f:08x}").expect("write to a Vec");
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    /// Adds a directory and its parents.
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            if self.dirs.insert(at.clone()) {
                self.entry(&at.clone(), 0o040_755, &[]);
            }
        }
    }

    /// Adds a file (its directory too).
    pub fn file(&mut self, path: &str, data: &[u8], perm: u32) {
        let path = path.trim_start_matches('/');
        if !self.files.insert(path.to_owned()) {
            return;
        }
        if let Some((dir, _)) = path.rsplit_once('/') {
            self.dir(dir);
        }
        self.entry(path, 0o100_000 | perm, data);
    }

    /// Copies a host file to the same path in the guest.
    pub fn host_file(&mut self, path: &str) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        self.file(path, &data, 0o755);
    }

    /// Copies a dynamically linked host program and every shared library
    /// `ldd` lists for it (the loader included) to the same paths.
    pub fn program(&mut self, path: &str) {
        self.host_file(path);
        self.libraries_of(path);
    }

    /// Copies the shared libraries `ldd` lists for `path`.
    pub fn libraries_of(&mut self, path: &str) {
        let out = Command::new("ldd").arg(path).output().expect("ldd");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let lib = line
                .split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(str::to_owned);
            if let Some(lib) = lib {
                // The canonical path too, where a link points elsewhere.
                self.host_file(&lib);
                if let Ok(real) = std::fs::canonicalize(&lib) {
                    self.host_file(&real.to_string_lossy());
                }
            }
        }
    }

    /// Adds kernel modules by name (`virtio_blk`), after their dependencies
    /// from `modules.dep`, numbered so that `/lib/modules/*.ko` lists them
    /// in load order.
    pub fn modules(&mut self, names: &[&str]) {
        let mdir = module_dir(&self.kernel);
        let dep = std::fs::read_to_string(mdir.join("modules.dep"))
            .unwrap_or_else(|e| panic!("{}: {e}", mdir.display()));
        let find = |name: &str| -> Option<(String, Vec<String>)> {
            dep.lines().find_map(|l| {
                let (m, deps) = l.split_once(':')?;
                let base = Path::new(m).file_name()?.to_string_lossy().into_owned();
                let stem = base.split(".ko").next()?.replace('-', "_");
                (stem == name.replace('-', "_")).then(|| {
                    (
                        m.to_owned(),
                        deps.split_whitespace().map(str::to_owned).collect(),
                    )
                })
            })
        };
        let mut order: Vec<String> = Vec::new();
        for name in names {
            let (path, deps) =
                find(name).unwrap_or_else(|| panic!("module {name} not in modules.dep"));
            // modules.dep lists the deepest dependency last.
            for d in deps.iter().rev().chain(std::iter::once(&path)) {
                if !order.contains(d) && !self.modules.contains(d) {
                    order.push(d.clone());
                }
            }
        }
        for m in order {
            let data = std::fs::read(mdir.join(&m)).unwrap_or_else(|e| panic!("{m}: {e}"));
            let base = Path::new(&m)
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let n = self.modules.len();
            self.file(&format!("lib/modules/{n:03}-{base}"), &data, 0o644);
            self.modules.push(m);
        }
    }

    /// The archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// The QEMU arguments every test guest shares: q35 under TCG, 512 MiB, one
/// CPU, the kernel and initramfs, the console on the serial port (stdio),
/// no reboot on panic, no default devices. Tests add their devices.
pub fn guest_args(kernel: &Path, initrd: &Path) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = [
        "-machine", "q35", "-accel", "tcg", "-m", "512", "-smp", "1", "-kernel",
    ]
    .iter()
    .map(Into::into)
    .collect();
    a.push(kernel.into());
    a.push("-initrd".into());
    a.push(initrd.into());
    for x in [
        "-append",
        "console=ttyS0 panic=-1 quiet loglevel=3",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-nodefaults",
    ] {
        a.push(x.into());
    }
    a
}

/// Shell lines for `/init`: mount the pseudo filesystems and load every
/// module added with [`Initramfs::modules`], in order.
pub const INIT_PRELUDE: &str = r#"B=/bin/busybox
$B mkdir -p /proc /sys /dev /tmp
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in /lib/modules/*.ko*; do $B insmod "$m" 2>/dev/null || echo "SOFTCARD-WARN insmod $m"; done
"#;

/// A network namespace for a test, removed on drop. Needs root and
/// iproute2.
#[derive(Debug)]
pub struct Netns(String);

impl Netns {
    /// Creates `sc-<tag>-<pid>-<n>` (unique among the tests of one
    /// process, which run in parallel) with its loopback up.
    pub fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("sc-{tag}-{}-{n}", std::process::id());
        let ns = Netns(name);
        ns.ip(&["netns", "add", &ns.0]);
        ns.exec("ip link set lo up");
        ns
    }

    fn ip(&self, args: &[&str]) {
        let st = Command::new("ip")
            .args(args)
            .status()
            .expect("ip (iproute2)");
        assert!(st.success(), "ip {args:?} failed (needs root)");
    }

    /// Runs a command line (split on spaces) inside the namespace.
    pub fn exec(&self, cmd: &str) {
        let mut a = vec!["netns", "exec", &self.0];
        a.extend(cmd.split(' '));
        self.ip(&a);
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    /// Moves the calling thread into the namespace (sockets it opens
    /// afterwards live there).
    pub fn enter(&self) {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.0)).expect("netns file");
        // SAFETY: setns on a valid namespace fd; affects this thread only.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
