//! `softcard up`: the whole provider network on one machine. A region on
//! the embedded store with its console; this machine's card (a file-backed
//! device in the data directory) joined to it as a host; the vGPU server
//! and its viewer where there is a Vulkan adapter, registered with the
//! region as a GPU server; a tenant `demo` with one
//! instance booted from the default image on a boot volume of the card.
//! It prints the console's address and the tenant's credential. Ctrl-C
//! stops the instance and everything else; the next `up` starts it again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use softcard_control::{ApiServer, CardConfig};
use softcard_region::client::RegionClient;
use softcard_region::server::{Background, ServeOptions};
use softcard_storage::StorageCard;

use crate::daemon::{block_signals, host_config, wait_for_signal};

/// The configuration `softcard up` runs with.
const DEFAULT_CONFIG: &str = include_str!("../default-card.toml");
/// GPU memory the GPU server of `softcard up` offers to vGPUs.
const UP_GPU_MEMORY: u64 = 8 << 30;
/// The demo tenant and its instance.
const TENANT: &str = "demo";
const INSTANCE: &str = "demo1";
/// How long `up` waits for its instance to run, or to stop at exit.
const INSTANCE_WAIT: Duration = Duration::from_secs(60);

/// Options of `softcard up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the device file, sockets, the region's store and credentials
    /// live (default: $XDG_DATA_HOME/softcard or ~/.local/share/softcard).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where the region serves its API and console.
    #[arg(long, default_value = crate::region_cli::DEFAULT_REGION_LISTEN)]
    region_listen: std::net::SocketAddr,
    /// Where the vGPU server takes clients.
    #[arg(long, default_value = "127.0.0.1:7070")]
    gpu_listen: String,
    /// Where the region's console reads vGPU frames from the GPU server.
    #[arg(long, default_value = "127.0.0.1:7071")]
    gpu_frames: String,
}

fn default_data_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("softcard"));
    }
    let home = std::env::var_os("HOME")
        .context("neither XDG_DATA_HOME nor HOME is set; pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/softcard"))
}

/// A credential kept in `file` (mode 0600) while the region still knows
/// it; otherwise a new one from `make`, written there.
fn kept_credential(
    file: &Path,
    url: &str,
    make: impl FnOnce() -> Result<String>,
) -> Result<String> {
    if let Ok(s) = std::fs::read_to_string(file) {
        let s = s.trim().to_owned();
        if RegionClient::new(url, &s, None)?.get("/v1/whoami").is_ok() {
            return Ok(s);
        }
    }
    let s = make()?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(file);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("writing {}", file.display()))?;
    writeln!(f, "{s}")?;
    Ok(s)
}

fn wait_state(t: &RegionClient, want: &str) -> Result<Value> {
    let begin = Instant::now();
    loop {
        let i = t.get(&format!("/v1/instances/{INSTANCE}"))?;
        if i["state"]["name"] == want {
            return Ok(i);
        }
        if begin.elapsed() > INSTANCE_WAIT {
            anyhow::bail!(
                "instance {INSTANCE} is {} after {INSTANCE_WAIT:?}, not {want} ({})",
                i["state"]["name"],
                i["state_reason"]
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `softcard up`.
pub fn up(a: &UpArgs) -> Result<()> {
    let set = block_signals()?;
    let data = match &a.data_dir {
        Some(d) => d.clone(),
        None => default_data_dir()?,
    };
    std::fs::create_dir_all(data.join("region"))
        .with_context(|| format!("creating {}", data.display()))?;
    let data = data.canonicalize()?;
    let data_str = data
        .to_str()
        .context("the data directory path is not UTF-8")?;
    let cfg = CardConfig::parse(&DEFAULT_CONFIG.replace("@DATA@", data_str))
        .context("embedded default configuration")?;
    let card = Arc::new(StorageCard::open(&cfg.devices)?);
    if let Some(e) = card.devices().into_iter().find_map(|d| d.error) {
        anyhow::bail!("the card's device is unavailable: {e}");
    }

    // The region, on the embedded store.
    let rdir = data.join("region");
    let region = Background::start(
        ServeOptions::new(
            a.region_listen,
            format!("redb:{}", rdir.join("region.redb").display()),
            rdir.join("admin.credential"),
        ),
        2,
    )
    .with_context(|| format!("starting the region on {}", a.region_listen))?;
    let url = region.url();
    let admin = RegionClient::new(&url, &region.admin, None)?;

    // This machine as a host.
    let host = host_config(&cfg, &data.join("host"), true);
    let host_cred = kept_credential(&rdir.join("host.credential"), &url, || {
        let v = admin.post(&format!("/v1/hosts/{}/credentials", host.name), &json!({}))?;
        Ok(v["credential"].as_str().unwrap_or_default().to_owned())
    })?;
    let agent = softcard_host::Agent::start(
        host.clone(),
        card.clone(),
        RegionClient::new(&url, &host_cred, None)?,
    )?;
    let api = ApiServer::start(
        softcard_control::api::card_router(card.clone()).merge(agent.router()),
        &cfg.api_socket,
    )?;

    // The demo tenant and its instance.
    match admin.post("/v1/tenants", &json!({"name": TENANT})) {
        Ok(_) => {}
        Err(e) if e.status() == Some(409) => {}
        Err(e) => return Err(e.into()),
    }
    let tenant_cred = kept_credential(&rdir.join("demo.credential"), &url, || {
        let v = admin.post(&format!("/v1/tenants/{TENANT}/credentials"), &json!({}))?;
        Ok(v["credential"].as_str().unwrap_or_default().to_owned())
    })?;
    let t = RegionClient::new(&url, &tenant_cred, None)?;
    let begin = Instant::now();
    while !admin.get("/v1/hosts")?.as_array().is_some_and(|h| {
        h.iter()
            .any(|h| h["name"] == host.name.as_str() && h["state"] == "up")
    }) {
        anyhow::ensure!(
            begin.elapsed() < INSTANCE_WAIT,
            "this host never registered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    match t.get(&format!("/v1/instances/{INSTANCE}")) {
        Ok(i) if i["state"]["name"] == "stopped" => {
            t.post(&format!("/v1/instances/{INSTANCE}/start"), &json!({}))?;
        }
        Ok(_) => {}
        Err(e) if e.status() == Some(404) => {
            t.post(
                "/v1/instances",
                &json!({"name": INSTANCE, "type": "sc1.small", "volume_size": "1GiB"}),
            )?;
        }
        Err(e) => return Err(e.into()),
    }
    let instance = wait_state(&t, "running");

    println!("softcard is up: a provider network on this machine.");
    println!("  console  {url}/  (log in with the credential below)");
    println!("  tenant   {TENANT}: credential {tenant_cred}");
    println!(
        "  admin    credential in {}",
        rdir.join("admin.credential").display()
    );
    println!(
        "  host     {}: {} vCPU, {} MiB, card API {}",
        host.name,
        host.vcpus,
        host.memory_mib,
        cfg.api_socket.display()
    );
    match &instance {
        Ok(i) => println!(
            "  instance {INSTANCE} ({}): running, boot volume {} (softcard instance console-output {INSTANCE})",
            i["id"].as_str().unwrap_or("-"),
            i["boot_volume"].as_str().unwrap_or("-")
        ),
        Err(e) => println!("  instance {INSTANCE}: not running: {e:#}"),
    }
    // The GPU function, where the machine has a Vulkan adapter (lavapipe
    // counts); the rest works without it.
    // Registered with the region as this machine's GPU server.
    // The GPU function, where the machine has a Vulkan adapter (lavapipe
    // counts): this machine's GPU server in the region, speaking TLS with
    // the region's certificate and admitting only the region's vGPUs.
    let gpu = (|| {
        let cred = kept_credential(&rdir.join("gpu.credential"), &url, || {
            let v = admin.post(
                &format!("/v1/gpu-servers/{}/credentials", host.name),
                &json!({}),
            )?;
            Ok(v["credential"].as_str().unwrap_or_default().to_owned())
        })?;
        crate::gpu::start_in_background(
            RegionClient::new(&url, &cred, None)?,
            &a.gpu_listen,
            &a.gpu_frames,
            UP_GPU_MEMORY,
        )
    })();
    let gpu = match gpu {
        Ok(g) => {
            println!("  vGPU     {}", g.description);
            println!(
                "           try: softcard instance create gfx1 --image gpu-demo --vgpu eg1.medium \
                 (its frames are on the console)"
            );
            Some(g)
        }
        Err(e) => {
            println!("  vGPU     not started: {e:#}");
            None
        }
    };
    println!();
    println!("The CLI as the tenant:");
    println!("  export SOFTCARD_REGION={url} SOFTCARD_CREDENTIAL={tenant_cred}");
    println!("  softcard instance list");
    println!();
    println!("Press Ctrl-C to stop.");

    let sig = wait_for_signal(&set);
    log::info!("signal {sig}: stopping");
    // The instance stops cleanly (its record says stopped, so the next
    // `up` starts it); the agent, the region and the card follow.
    if t.post(&format!("/v1/instances/{INSTANCE}/stop"), &json!({}))
        .is_ok()
    {
        let _ = wait_state(&t, "stopped");
    }
    drop(gpu);
    drop(agent);
    drop(region);
    api.stop();
    card.shutdown();
    Ok(())
}
