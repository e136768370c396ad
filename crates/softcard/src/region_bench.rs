//! `softcard bench region`: the control plane under load, once on etcd and
//! once on the embedded store, in one run. Registers simulated hosts (no
//! QEMU), then places instances from concurrent clients over the HTTP API:
//! placements per second, API latency p50/p99, claims retried. Then, with
//! one real host (this machine's card and QEMU), the time from create to
//! running and to the guest's first output, and from attach to the guest
//! seeing the disk.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use softcard_region::client::RegionClient;
use softcard_region::server::{Background, ServeOptions};
use softcard_region::throwaway_etcd::ThrowawayEtcd;

/// Options of `softcard bench region`.
#[derive(Debug, clap::Args)]
pub struct RegionBenchArgs {
    /// Simulated hosts.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// Instances placed.
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    /// Concurrent API clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Run etcd with --unsafe-no-fsync (the default is etcd's own: fsync
    /// on every commit).
    #[arg(long)]
    etcd_no_fsync: bool,
    /// Rounds of the real-host measurements (0: skip them).
    #[arg(long, default_value_t = 3)]
    real_rounds: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct Figures {
    placed: usize,
    refused: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    conflicts: u64,
    register_seconds: f64,
}

fn region_on(store: &str, dir: &std::path::Path) -> Result<Background> {
    let mut opts = ServeOptions::new(
        "127.0.0.1:0".parse()?,
        store.to_owned(),
        dir.join(format!("admin-{}.credential", rand::random::<u32>())),
    );
    // The simulated hosts do not heartbeat during the run: a lease longer
    // than the run keeps them up without adding keep-alive traffic.
    opts.host_lease = Duration::from_secs(3600);
    Ok(Background::start(opts, 2)?)
}

fn placement_run(a: &RegionBenchArgs, store: &str, dir: &std::path::Path) -> Result<Figures> {
    let region = region_on(store, dir)?;
    let url = region.url();
    let admin = RegionClient::new(&url, &region.admin, None)?;
    admin.post("/v1/tenants", &json!({"name": "bench"}))?;
    let cred = admin.post("/v1/tenants/bench/credentials", &json!({}))?["credential"]
        .as_str()
        .context("credential")?
        .to_owned();
    // Hosts register in parallel too.
    let begin = Instant::now();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| -> Result<()> {
        let mut joins = Vec::new();
        for _ in 0..a.clients {
            joins.push(s.spawn(|| -> Result<()> {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= a.hosts {
                        return Ok(());
                    }
                    let name = format!("sim{n:05}");
                    let c = admin.post(&format!("/v1/hosts/{name}/credentials"), &json!({}))?;
                    let h = RegionClient::new(&url, c["credential"].as_str().unwrap_or(""), None)?;
                    h.call(
                        "PUT",
                        "/v1/agent/register",
                        Some(&json!({"vcpus": 16, "memory_mib": 65536,
                            "devices": [{"name": "nvme0", "capacity_bytes": 1u64 << 40}]})),
                    )?;
                }
            }));
        }
        for j in joins {
            j.join()
                .map_err(|_| anyhow::anyhow!("a client panicked"))??;
        }
        Ok(())
    })?;
    let register_seconds = begin.elapsed().as_secs_f64();
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(a.instances)));
    let refused = AtomicUsize::new(0);
    let next = AtomicUsize::new(0);
    let begin = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let mut joins = Vec::new();
        for _ in 0..a.clients {
            let t = RegionClient::new(&url, &cred, None)?;
            let (latencies, refused, next) = (latencies.clone(), &refused, &next);
            joins.push(s.spawn(move || -> Result<()> {
                let mut mine = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= a.instances {
                        break;
                    }
                    let t0 = Instant::now();
                    let r = t.post(
                        "/v1/instances",
                        &json!({"name": format!("b{n}"), "type": "sc1.micro", "volume_size": "64MiB"}),
                    );
                    mine.push(t0.elapsed().as_secs_f64() * 1e3);
                    match r {
                        Ok(_) => {}
                        Err(e) if e.status() == Some(503) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                latencies.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.extend(mine);
                Ok(())
            }));
        }
        for j in joins {
            j.join()
                .map_err(|_| anyhow::anyhow!("a client panicked"))??;
        }
        Ok(())
    })?;
    let seconds = begin.elapsed().as_secs_f64();
    let mut l = latencies
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    l.sort_by(f64::total_cmp);
    let conflicts = admin.get("/v1/region")?["placement_conflicts"]
        .as_u64()
        .unwrap_or(0);
    let refused = refused.into_inner();
    Ok(Figures {
        placed: a.instances - refused,
        refused,
        seconds,
        p50_ms: percentile(&l, 0.5),
        p99_ms: percentile(&l, 0.99),
        conflicts,
        register_seconds,
    })
}

/// Create-to-running, create-to-first-guest-output and attach-to-disk-seen
/// on this machine's card with QEMU, `rounds` times.
fn real_host(rounds: usize, dir: &std::path::Path) -> Result<Vec<(f64, f64, f64)>> {
    use softcard_storage::device::{DeviceConfig, DeviceKind};
    let region = region_on(&format!("redb:{}", dir.join("real.redb").display()), dir)?;
    let url = region.url();
    let admin = RegionClient::new(&url, &region.admin, None)?;
    admin.post("/v1/tenants", &json!({"name": "real"}))?;
    let cred = admin.post("/v1/tenants/real/credentials", &json!({}))?["credential"]
        .as_str()
        .context("credential")?
        .to_owned();
    let host_cred = admin.post("/v1/hosts/real-host/credentials", &json!({}))?["credential"]
        .as_str()
        .context("credential")?
        .to_owned();
    let card = Arc::new(softcard_storage::StorageCard::open(&[DeviceConfig {
        name: "disk0".into(),
        kind: DeviceKind::File,
        path: Some(dir.join("disk0.img")),
        size_bytes: Some(4 << 30),
        share_depth: None,
        read_zeroes: None,
        volatile_write_cache: None,
    }])?);
    let _agent = softcard_host::Agent::start(
        softcard_host::HostConfig {
            name: "real-host".into(),
            vcpus: 4,
            memory_mib: 4096,
            data_dir: dir.join("host"),
            qemu: "qemu-system-x86_64".into(),
            accel: "tcg".into(),
            stop_vms_on_exit: true,
        },
        card.clone(),
        RegionClient::new(&url, &host_cred, None)?,
    )?;
    let t = RegionClient::new(&url, &cred, None)?;
    let wait = |what: &str, f: &dyn Fn() -> Result<bool>| -> Result<()> {
        let begin = Instant::now();
        while !f()? {
            anyhow::ensure!(
                begin.elapsed() < Duration::from_secs(120),
                "{what}: no result in 120 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    };
    let console = |name: &str| -> Result<String> {
        Ok(t.get(&format!("/v1/instances/{name}/console"))?["output"]
            .as_str()
            .unwrap_or("")
            .to_owned())
    };
    wait("the host registers", &|| {
        Ok(admin
            .get("/v1/hosts")?
            .as_array()
            .is_some_and(|h| h.iter().any(|h| h["state"] == "up")))
    })?;
    let mut out = Vec::new();
    for r in 0..rounds {
        let name = format!("real{r}");
        let t0 = Instant::now();
        t.post(
            "/v1/instances",
            &json!({"name": name, "type": "sc1.small", "volume_size": "128MiB"}),
        )?;
        wait("running", &|| {
            Ok(t.get(&format!("/v1/instances/{name}"))?["state"]["name"] == "running")
        })?;
        let running = t0.elapsed().as_secs_f64();
        wait("the guest's output", &|| {
            Ok(console(&name)?.contains("disk vda stamped"))
        })?;
        let booted = t0.elapsed().as_secs_f64();
        let vol = format!("v{r}");
        t.post(
            "/v1/volumes",
            &json!({"name": vol, "size": "16MiB", "near": name}),
        )?;
        wait("volume available", &|| {
            Ok(t.get(&format!("/v1/volumes/{vol}"))?["state"] == "available")
        })?;
        let t1 = Instant::now();
        t.post(
            &format!("/v1/volumes/{vol}/attach"),
            &json!({"instance": name}),
        )?;
        wait("the guest sees the disk", &|| {
            Ok(console(&name)?.contains("disk vdb appeared"))
        })?;
        let attach = t1.elapsed().as_secs_f64();
        t.post(&format!("/v1/instances/{name}/terminate"), &json!({}))?;
        out.push((running, booted, attach));
    }
    Ok(out)
}

/// `softcard bench region`.
pub fn region(a: &RegionBenchArgs) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("softcard-bench-region")
        .tempdir()?;
    let etcd = ThrowawayEtcd::start(!a.etcd_no_fsync).context("etcd (scripts/deps.sh bench)")?;
    println!(
        "# softcard bench region: {} simulated hosts (16 vCPU, 64 GiB, 1 TiB each), {} instances (sc1.micro, 64 MiB boot volume) from {} concurrent API clients over HTTP",
        a.hosts, a.instances, a.clients
    );
    println!(
        "# etcd: Debian's etcd-server on loopback, {}; embedded: redb, fsync on every commit",
        if a.etcd_no_fsync {
            "--unsafe-no-fsync"
        } else {
            "fsync on every commit (etcd's default)"
        }
    );
    println!();
    println!("| store | hosts registered in | placed | refused | placements/s | create p50 ms | create p99 ms | claims retried |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, store) in [
        ("etcd", format!("etcd:{}", etcd.url)),
        (
            "embedded (redb)",
            format!("redb:{}", dir.path().join("bench.redb").display()),
        ),
    ] {
        let f = placement_run(a, &store, dir.path())?;
        println!(
            "| {name} | {:.1} s | {} | {} | {:.0} | {:.1} | {:.1} | {} |",
            f.register_seconds,
            f.placed,
            f.refused,
            f.placed as f64 / f.seconds,
            f.p50_ms,
            f.p99_ms,
            f.conflicts
        );
    }
    if a.real_rounds > 0 {
        println!();
        println!("One real host (this machine's card, QEMU under TCG, the default image):");
        println!();
        println!("| round | create -> running (QEMU up) | create -> guest wrote its boot disk | attach -> guest sees the disk |");
        println!("|---:|---:|---:|---:|");
        for (n, (running, booted, attach)) in
            real_host(a.real_rounds, dir.path())?.iter().enumerate()
        {
            println!("| {n} | {running:.2} s | {booted:.2} s | {attach:.3} s |");
        }
    }
    Ok(())
}
