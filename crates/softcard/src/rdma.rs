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
    for c in [dir.join("libibverbs.so"), dir.join("deps/libibverbs.so")] {
        if c.exists() {
            return Ok(c);
        }
    }
    bail!(
        "softcard's libibverbs.so is not beside {} (build it with cargo build, or set \
         SOFTCARD_VERBS_LIB)",
        exe.display()
    )
}

/// `softcard rdma exec -- CMD ARGS...`: runs CMD with the drop-in library
/// first on its library path (as `libibverbs.so.1` and `libibverbs.so`)
/// and the card's control socket in its environment; exits with CMD's
/// status.
pub fn exec(socket: &Path, cmd: &[String]) -> Result<i32> {
    let Some((prog, args)) = cmd.split_first() else {
        bail!("softcard rdma exec -- COMMAND [ARGS...]");
    };
    let lib = verbs_library()?;
    let dir = tempfile::Builder::new()
        .prefix("softcard-verbs")
        .tempdir()
        .context("a directory for the library's names")?;
    for name in ["libibverbs.so.1", "libibverbs.so"] {
        std::os::unix::fs::symlink(&lib, dir.path().join(name))
            .with_context(|| format!("linking {name}"))?;
    }
    let mut path = dir.path().as_os_str().to_owned();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|p| !p.is_empty()) {
        path.push(":");
        path.push(old);
    }
    let status = std::process::Command::new(prog)
        .args(args)
        .env("LD_LIBRARY_PATH", path)
        .env("SOFTCARD_RDMA_SOCKET", socket)
        .status()
        .with_context(|| format!("running {prog}"))?;
    Ok(status.code().unwrap_or(128))
}
