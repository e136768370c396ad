//! The card's attachments on disk, so that a restarted card daemon (after a
//! crash, or stopped and started by its supervisor) serves the same
//! volumes on the same sockets, and clients that reconnect (QEMU's NBD
//! `reconnect-delay`, a vhost-user frontend's `reconnect`) find them.
//!
//! The file is JSON, written whole on every change: a temporary file in
//! the same directory, flushed to disk, renamed over the old one, and the
//! directory flushed, so a crash leaves the old version or the new one,
//! never a torn one. An attachment that cannot be restored at start (its
//! device still held by a process that is finishing its I/O, a key
//! missing) stays in the file until it is detached, so a later start can
//! restore it.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::card::AttachOptions;

/// The layout's version: a file of another version is refused, not
/// guessed at.
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    attachments: BTreeMap<String, AttachOptions>,
}

/// Reads the attachments recorded at `path` (none if it does not exist).
pub fn load(path: &Path) -> io::Result<BTreeMap<String, AttachOptions>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let f: File = serde_json::from_str(&text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    if f.version != VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: layout version {} (this card writes {VERSION})",
                path.display(),
                f.version
            ),
        ));
    }
    Ok(f.attachments)
}

/// Records `attachments` at `path`, atomically.
pub fn save(path: &Path, attachments: &BTreeMap<String, AttachOptions>) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(&File {
        version: VERSION,
        attachments: attachments.clone(),
    })
    .map_err(io::Error::other)?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map_or_else(|| "attachments".into(), |n| n.to_string_lossy())
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::Interface;
    use crate::qos::QosLimits;

    #[test]
    fn round_trips_and_refuses_what_it_does_not_know() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/attachments.json");
        assert!(load(&path).unwrap().is_empty());
        let mut a = BTreeMap::new();
        a.insert(
            "v".to_owned(),
            AttachOptions {
                socket: "/run/v.sock".into(),
                queues: 2,
                qos: QosLimits {
                    iops: Some(100),
                    ..QosLimits::default()
                },
                interface: Interface::Nbd,
            },
        );
        save(&path, &a).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back["v"].socket, PathBuf::from("/run/v.sock"));
        assert_eq!(back["v"].queues, 2);
        assert_eq!(back["v"].qos.iops, Some(100));
        assert_eq!(back["v"].interface, Interface::Nbd);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("attachments.json")]);
        for bad in [
            "{",
            r#"{"version":2,"attachments":{}}"#,
            r#"{"version":1,"attachments":{},"extra":1}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            assert_eq!(
                load(&path).unwrap_err().kind(),
                io::ErrorKind::InvalidData,
                "{bad}"
            );
        }
    }
}
