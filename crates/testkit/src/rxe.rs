//! Linux Soft-RoCE peers: a QEMU guest (TCG) whose virtio-net NIC sits on
//! a tap device in a network namespace the test creates (host 10.77.0.1,
//! guest 10.77.0.2), with rdma_rxe and rdma-core's tools in its
//! initramfs.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::{Initramfs, Netns};

/// The host's address on the tap device.
pub const HOST: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 77, 0, 1);
/// The guest's.
pub const GUEST: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 77, 0, 2);

/// A namespace with the tap device the guest's NIC attaches to.
pub fn tap_netns(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.exec("ip tuntap add dev tap0 mode tap");
    ns.exec("ip addr add 10.77.0.1/24 dev tap0");
    ns.exec("ip link set tap0 up");
    ns
}

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the guest on `initrd` with its NIC on the namespace's tap device
/// and returns its console output once it powers off, or once `limit` has
/// passed: then QEMU is killed and the console ends with a line that says
/// so (a test that looks for its guest's last line fails, showing it).
pub fn run_guest(ns: &Netns, kernel: &Path, initrd: &Path, mac: &str, limit: Duration) -> String {
    let qemu = ns
        .command("qemu-system-x86_64")
        .args(crate::guest_args(kernel, initrd))
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
        .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64");
    let (_, out, _, killed) = crate::deadline::wait_within(qemu, limit);
    let mut console = String::from_utf8_lossy(&out).into_owned();
    if killed {
        console.push_str(&format!("\n[test: guest killed after {limit:?}]\n"));
    }
    console
}

/// An initramfs for `script` (run after the common prelude): the
/// virtio-net, crc32 and Soft-RoCE modules, rdma-core's `ibv_devinfo` and
/// `rdma` with the rxe provider, and `tools`, written into `dir`.
pub fn rxe_initramfs(kernel: &Path, script: &str, dir: &Path, tools: &[&str]) -> PathBuf {
    let init = format!("#!/bin/busybox sh\n{}{}", crate::INIT_PRELUDE, script);
    let mut ir = Initramfs::new(kernel, &init);
    ir.modules(&[
        "virtio_pci",
        "virtio_net",
        "crc32_generic",
        "rdma_rxe",
        "ib_uverbs",
    ]);
    for p in ["/usr/bin/ibv_devinfo", "/usr/bin/rdma"]
        .iter()
        .chain(tools)
    {
        ir.program(p);
    }
    ir.host_file("/etc/libibverbs.d/rxe.driver");
    ir.program("/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so");
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, ir.finish()).unwrap();
    initrd
}
