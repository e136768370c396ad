//! Initramfs images (newc cpio archives) built on the fly from the host's
//! busybox, kernel modules (with their dependencies, in load order) and
//! files: the built-in image's root filesystem, and test guests'.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

fn err(what: impl std::fmt::Display) -> io::Error {
    io::Error::other(what.to_string())
}

/// The newest `/boot/vmlinuz-*` (package linux-image-amd64).
pub fn host_kernel() -> io::Result<PathBuf> {
    let mut k: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map_err(|e| err(format!("/boot: {e} (install linux-image-amd64)")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    k.sort();
    k.pop()
        .ok_or_else(|| err("no /boot/vmlinuz-* (install linux-image-amd64)"))
}

fn module_dir(kernel: &Path) -> io::Result<PathBuf> {
    let name = kernel
        .file_name()
        .ok_or_else(|| err("kernel path has no file name"))?
        .to_string_lossy();
    Ok(PathBuf::from("/lib/modules").join(name.trim_start_matches("vmlinuz-")))
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
    pub fn new(kernel: &Path, init: &str) -> io::Result<Self> {
        let mut i = Initramfs {
            out: Vec::new(),
            ino: 1,
            dirs: BTreeSet::new(),
            files: BTreeSet::new(),
            modules: Vec::new(),
            kernel: kernel.to_owned(),
        };
        for d in ["proc", "sys", "dev", "tmp", "bin", "lib/modules"] {
            i.dir(d)?;
        }
        let bb = std::fs::read("/bin/busybox")
            .map_err(|e| err(format!("/bin/busybox: {e} (install busybox-static)")))?;
        i.file("bin/busybox", &bb, 0o755)?;
        i.file("init", init.as_bytes(), 0o755)?;
        Ok(i)
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).map_err(|_| err(format!("{name}: over 4 GiB")))?,
            0,
            0,
            0,
            0,
            u32::try_from(name.len() + 1).map_err(|_| err("name too long"))?,
            0,
        ];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            write!(self.out, "{f:08x}")?;
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    /// Adds a directory and its parents.
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        let path = path.trim_matches('/');
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            if self.dirs.insert(at.clone()) {
                self.entry(&at.clone(), 0o040_755, &[])?;
            }
        }
        Ok(())
    }

    /// Adds a file (its directory too).
    pub fn file(&mut self, path: &str, data: &[u8], perm: u32) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        if !self.files.insert(path.to_owned()) {
            return Ok(());
        }
        if let Some((dir, _)) = path.rsplit_once('/') {
            self.dir(dir)?;
        }
        self.entry(path, 0o100_000 | perm, data)
    }

    /// Copies a host file to the same path in the guest.
    pub fn host_file(&mut self, path: &str) -> io::Result<()> {
        let data = std::fs::read(path).map_err(|e| err(format!("{path}: {e}")))?;
        self.file(path, &data, 0o755)
    }

    /// Copies a dynamically linked host program and every shared library
    /// `ldd` lists for it (the loader included) to the same paths.
    pub fn program(&mut self, path: &str) -> io::Result<()> {
        self.host_file(path)?;
        self.libraries_of(path)
    }

    /// Copies the shared libraries `ldd` lists for `path`.
    pub fn libraries_of(&mut self, path: &str) -> io::Result<()> {
        let out = Command::new("ldd")
            .arg(path)
            .output()
            .map_err(|e| err(format!("ldd: {e} (package libc-bin)")))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let lib = line
                .split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(str::to_owned);
            if let Some(lib) = lib {
                // The canonical path too, where a link points elsewhere.
                self.host_file(&lib)?;
                if let Ok(real) = std::fs::canonicalize(&lib) {
                    self.host_file(&real.to_string_lossy())?;
                }
            }
        }
        Ok(())
    }

    /// Adds kernel modules by name (`virtio_blk`), after their dependencies
    /// from `modules.dep`, numbered so that `/lib/modules/*.ko` lists them
    /// in load order. A module built into the kernel (not in
    /// `modules.dep` but in `modules.builtin`) needs nothing.
    pub fn modules(&mut self, names: &[&str]) -> io::Result<()> {
        let mdir = module_dir(&self.kernel)?;
        let dep = std::fs::read_to_string(mdir.join("modules.dep"))
            .map_err(|e| err(format!("{}: {e}", mdir.display())))?;
        let builtin = std::fs::read_to_string(mdir.join("modules.builtin")).unwrap_or_default();
        let stem_of = |m: &str| -> Option<String> {
            let base = Path::new(m).file_name()?.to_string_lossy().into_owned();
            Some(base.split(".ko").next()?.replace('-', "_"))
        };
        let find = |name: &str| -> Option<(String, Vec<String>)> {
            dep.lines().find_map(|l| {
                let (m, deps) = l.split_once(':')?;
                (stem_of(m)? == name.replace('-', "_")).then(|| {
                    (
                        m.to_owned(),
                        deps.split_whitespace().map(str::to_owned).collect(),
                    )
                })
            })
        };
        let mut order: Vec<String> = Vec::new();
        for name in names {
            let Some((path, deps)) = find(name) else {
                if builtin
                    .lines()
                    .any(|l| stem_of(l).is_some_and(|s| s == name.replace('-', "_")))
                {
                    continue;
                }
                return Err(err(format!("module {name} not in modules.dep")));
            };
            // modules.dep lists the deepest dependency last.
            for d in deps.iter().rev().chain(std::iter::once(&path)) {
                if !order.contains(d) && !self.modules.contains(d) {
                    order.push(d.clone());
                }
            }
        }
        for m in order {
            let data = std::fs::read(mdir.join(&m)).map_err(|e| err(format!("{m}: {e}")))?;
            let base = Path::new(&m)
                .file_name()
                .ok_or_else(|| err("module path"))?
                .to_string_lossy()
                .into_owned();
            let n = self.modules.len();
            self.file(&format!("lib/modules/{n:03}-{base}"), &data, 0o644)?;
            self.modules.push(m);
        }
        Ok(())
    }

    /// The archive.
    pub fn finish(mut self) -> io::Result<Vec<u8>> {
        self.entry("TRAILER!!!", 0, &[])?;
        Ok(self.out)
    }
}

/// The QEMU arguments of a small guest booted on a kernel and an
/// initramfs (tests and benchmarks): q35 under TCG, 512 MiB, one CPU, the
/// console on the serial port (stdio), no reboot on panic, no default
/// devices. Callers add their devices.
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
