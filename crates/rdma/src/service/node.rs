//! The device's node in `/dev/infiniband`.
//!
//! Some verbs applications look for a device's character device before
//! they use it: UCX lists a device only when `/dev/infiniband/<dev_name>`
//! (the `dev_name` of `struct ibv_device`) is a character device it may
//! read and write. Softcard's devices have no kernel driver, so the daemon
//! makes that node with the numbers of `/dev/null`, mode 0666 (as
//! rdma-core's udev rules make uverbs nodes). Nothing goes through it: the
//! library talks to the daemon on the control socket. A node left behind
//! by a daemon that stopped is harmless, since applications look for the
//! node only of a device the library lists, and the library lists the
//! running daemon's devices.

use std::io;
use std::path::PathBuf;

use rustix::fs::{FileType, Mode};

/// The device's `dev_name`, as the library reports it.
pub fn dev_name(device: &str) -> String {
    format!("uverbs-{device}")
}

/// Where the device's node is.
pub fn node_path(device: &str) -> PathBuf {
    PathBuf::from("/dev/infiniband").join(dev_name(device))
}

/// Makes the device's node (or keeps one that is already a character
/// device).
pub fn make_node(device: &str) -> io::Result<PathBuf> {
    let path = node_path(device);
    if let Ok(st) = rustix::fs::stat(&path) {
        if FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice {
            return Ok(path);
        }
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a character device", path.display()),
        ));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let null = rustix::fs::stat("/dev/null")?;
    let mode = Mode::from_raw_mode(0o666);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &path,
        FileType::CharacterDevice,
        mode,
        null.st_rdev,
    )?;
    // The umask took bits away.
    rustix::fs::chmod(&path, mode)?;
    Ok(path)
}
