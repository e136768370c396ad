//! The card's RDMA function at the binary's edge: its card API route,
//! `softcard rdma list|stats`, and `softcard rdma exec`, which runs an
//! unmodified verbs application on the card's devices through the
//! drop-in `libibverbs.so.1` (crate `softcard-verbs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use softcard_rdma::service::{DeviceStatus, RdmaService};

/// The card API's view of the RDMA devices.
pub fn status_json(s: &[DeviceStatus]) -> Value {
    json!(s
        .iter()
        .map(|d| {
            let gid = std::net::Ipv6Addr::from(d.info.gid);
            json!({
                "name": d.info.name,
                "address": d.info.address.to_string(),
                "guid": format!("{:016x}", d.info.guid),
                "gid": gid.to_string(),
                "gid_type": "RoCE v2",
                "port_state": "active",
                "mtu": d.info.mtu,
                "qps": d.qps,
                "applications": d.applications.iter().map(|qps| json!({"qps": qps})).collect::<Vec<_>>(),
                "stats": {
                    "fast_packets": d.stats.fast_packets,
                    "fast_bytes": d.stats.fast_bytes,
                    "software_packets": d.stats.slow_packets,
                    "retransmits": d.stats.retransmits,
                    "reads_resumed": d.stats.reads_resumed,
                    "reads_continued": d.stats.reads_continued,
                    "departed_acks": d.stats.departed_acks,
                    "dropped": d.stats.dropped,
                },
            })
        })
        .collect::<Vec<_>>())
}

/// `GET /v1/rdma`: the devices, their QPs and counters.
pub fn router(service: Arc<RdmaService>) -> Router {
    Router::new()
        .route(
            "/v1/rdma",
            get(|State(s): State<Arc<RdmaService>>| async move { Json(status_json(&s.status())) }),
        )
        .with_state(service)
}

/// Prints the devices (`list`) or their counters (`stats`).
pub fn print(v: &Value, stats: bool) {
    let empty = Vec::new();
    let devices = v.as_array().unwrap_or(&empty);
    if stats {
        println!(
            "{:<12} {:>6} {:>14} {:>16} {:>16} {:>10}",
            "DEVICE", "QPS", "FAST PACKETS", "FAST BYTES", "SOFTWARE PKTS", "DROPPED"
        );
        for d in devices {
            let s = &d["stats"];
            let n = |v: &Value| v.as_u64().unwrap_or(0);
            println!(
                "{:<12} {:>6} {:>14} {:>16} {:>16} {:>10}",
                d["name"].as_str().unwrap_or("-"),
                n(&d["qps"]),
                n(&s["fast_packets"]),
                n(&s["fast_bytes"]),
                n(&s["software_packets"]),
                n(&s["dropped"])
            );
        }
    } else {
        println!(
            "{:<12} {:<16} {:<18} {:<8} {:<24} {:>5}",
            "DEVICE", "ADDRESS", "GUID", "PORT", "GID (RoCE v2)", "MTU"
        );
        for d in devices {
            println!(
                "{:<12} {:<16} {:<18} {:<8} {:<24} {:>5}",
                d["name"].as_str().unwrap_or("-"),
                d["address"].as_str().unwrap_or("-"),
                d["guid"].as_str().unwrap_or("-"),
                d["port_state"].as_str().unwrap_or("-"),
                d["gid"].as_str().unwrap_or("-"),
                d["mtu"].as_u64().unwrap_or(0)
            );
        }
    }
}

/// The drop-in library built with this binary: `SOFTCARD_VERBS_LIB`, or
/// `libibverbs.so` beside the executable (or in its `deps/`, where cargo
/// puts a dependency's).
fn verbs_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SOFTCARD_VERBS_LIB").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("this executable's path")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    // Beside the binary (an install, or cargo's copy) or in cargo's deps
    // directory: the newer, as cargo refreshes only one of them when the
    // library is built as softcard's dependency.
    let newest = [dir.join("libibverbs.so"), dir.join("deps/libibverbs.so")]
        .into_iter()
        .filter_map(|c| Some((std::fs::metadata(&c).ok()?.modified().ok()?, c)))
        .max_by_key(|(t, _)| *t);
    if let Some((_, c)) = newest {
        return Ok(c);
    }
    bail!(
        "softcard's libibverbs.so is not beside {} (build it with cargo build, or set \
         SOFTCARD_VERBS_LIB)",
        exe.display()
    )
}

/// A directory whose `libibverbs.so.1` and `libibverbs.so` are `lib`:
/// one per user and library (`$TMPDIR/softcard-verbs-UID/HASH`), owned by
/// the user and closed to others, kept for the next run (an application
/// may open the library by name long after it starts).
fn library_dir(lib: &Path) -> Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let top = std::env::temp_dir().join(format!("softcard-verbs-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&top) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(e).with_context(|| format!("creating {}", top.display()))
        }
        _ => {}
    }
    let m = std::fs::symlink_metadata(&top)?;
    if !m.is_dir() || m.uid() != uid || m.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} is not a directory of yours closed to others: remove it",
            top.display()
        );
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    lib.hash(&mut h);
    let dir = top.join(format!("{:016x}", h.finish()));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(e).with_context(|| format!("creating {}", dir.display()))
        }
        _ => {}
    }
    for name in ["libibverbs.so.1", "libibverbs.so"] {
        let link = dir.join(name);
        if std::fs::read_link(&link).ok().as_deref() == Some(lib) {
            continue;
        }
        // A new link beside it, then renamed over: never a moment without.
        let tmp = dir.join(format!("{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(lib, &tmp).with_context(|| format!("linking {name}"))?;
        std::fs::rename(&tmp, &link).with_context(|| format!("linking {name}"))?;
    }
    Ok(dir)
}

/// `softcard rdma exec -- CMD ARGS...`: becomes CMD (exec), with the
/// drop-in library first on its library path (as `libibverbs.so.1` and
/// `libibverbs.so`) and the card's control socket in its environment; so
/// CMD's pid, signals and exit status are its own.
pub fn exec(socket: &Path, cmd: &[String]) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let Some((prog, args)) = cmd.split_first() else {
        bail!("softcard rdma exec -- COMMAND [ARGS...]");
    };
    let lib = verbs_library()?;
    let lib = lib.canonicalize().unwrap_or(lib);
    let dir = library_dir(&lib)?;
    let mut path = dir.as_os_str().to_owned();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|p| !p.is_empty()) {
        path.push(":");
        path.push(old);
    }
    let err = std::process::Command::new(prog)
        .args(args)
        .env("LD_LIBRARY_PATH", path)
        .env("SOFTCARD_RDMA_SOCKET", socket)
        .exec();
    Err(err).with_context(|| format!("running {prog}"))
}
