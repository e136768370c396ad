//! Test support for end-to-end tests with real Linux guests: the host's
//! Debian kernel, and an initramfs built on the fly from busybox, kernel
//! modules (with their dependencies, in load order) and host binaries
//! (with the shared libraries they need).

pub mod browser;
pub mod deadline;
pub mod rxe;

use std::path::Path;
use std::process::Command;

pub use softcard_host::initramfs::INIT_PRELUDE;

/// The newest `/boot/vmlinuz-*` (package linux-image-amd64).
pub fn kernel() -> std::path::PathBuf {
    softcard_host::initramfs::host_kernel().expect("a host kernel")
}

/// An initramfs being built ([`softcard_host::initramfs::Initramfs`], with
/// a test's manners: anything missing panics with its name).
#[derive(Debug)]
pub struct Initramfs(softcard_host::initramfs::Initramfs);

impl Initramfs {
    /// An archive for `kernel`, holding busybox as `/bin/busybox`, the
    /// standard directories, and `init` as `/init`.
    pub fn new(kernel: &Path, init: &str) -> Self {
        Initramfs(softcard_host::initramfs::Initramfs::new(kernel, init).expect("initramfs"))
    }

    /// Adds a directory and its parents.
    pub fn dir(&mut self, path: &str) {
        self.0.dir(path).expect("initramfs directory");
    }

    /// Adds a file (its directory too).
    pub fn file(&mut self, path: &str, data: &[u8], perm: u32) {
        self.0.file(path, data, perm).expect("initramfs file");
    }

    /// Copies a host file to the same path in the guest.
    pub fn host_file(&mut self, path: &str) {
        self.0.host_file(path).expect("host file");
    }

    /// Copies a host program and the shared libraries it needs.
    pub fn program(&mut self, path: &str) {
        self.0.program(path).expect("host program");
    }

    /// Copies the shared libraries `ldd` lists for `path`.
    pub fn libraries_of(&mut self, path: &str) {
        self.0.libraries_of(path).expect("shared libraries");
    }

    /// Adds kernel modules by name, after their dependencies.
    pub fn modules(&mut self, names: &[&str]) {
        self.0.modules(names).expect("kernel modules");
    }

    /// The archive.
    pub fn finish(self) -> Vec<u8> {
        self.0.finish().expect("initramfs")
    }
}

/// The QEMU arguments every test guest shares
/// ([`softcard_host::initramfs::guest_args`]). Tests add their devices.
pub fn guest_args(kernel: &Path, initrd: &Path) -> Vec<std::ffi::OsString> {
    softcard_host::initramfs::guest_args(kernel, initrd)
}

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
