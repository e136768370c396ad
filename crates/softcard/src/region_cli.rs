//! The region's commands: `region serve`, and the clients of its API
//! (`tenant`, `host`, `instance`, `volume`, `image`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use softcard_control::size::format_size;
use softcard_region::client::RegionClient;
use softcard_region::server::ServeOptions;

/// Where the region listens unless told.
pub const DEFAULT_REGION_LISTEN: &str = "127.0.0.1:7080";

/// The default data directory of the region (the admin credential, the
/// embedded store).
pub fn default_region_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("softcard/region");
    }
    std::env::var_os("HOME").map_or_else(
        || PathBuf::from("/var/lib/softcard/region"),
        |h| PathBuf::from(h).join(".local/share/softcard/region"),
    )
}

/// How a client reaches the region.
#[derive(Debug, Clone, Args)]
pub struct RegionArg {
    /// The region's URL.
    #[arg(long, env = "SOFTCARD_REGION", default_value = "http://127.0.0.1:7080")]
    pub region: String,
    /// A file holding the credential (default: $SOFTCARD_CREDENTIAL, else
    /// the admin credential of a region on this machine).
    #[arg(long, env = "SOFTCARD_CREDENTIAL_FILE")]
    pub credential_file: Option<PathBuf>,
    /// A PEM certificate to trust for an https region.
    #[arg(long, env = "SOFTCARD_REGION_CA")]
    pub ca: Option<PathBuf>,
}

impl RegionArg {
    /// The client.
    pub fn client(&self) -> Result<RegionClient> {
        let secret = match (&self.credential_file, std::env::var("SOFTCARD_CREDENTIAL")) {
            (Some(f), _) => std::fs::read_to_string(f)
                .with_context(|| format!("credential file {}", f.display()))?,
            (None, Ok(s)) if !s.is_empty() => s,
            _ => {
                let f = default_region_dir().join("admin.credential");
                std::fs::read_to_string(&f).with_context(|| {
                    format!(
                        "no credential: set SOFTCARD_CREDENTIAL or --credential-file (and {} is not readable)",
                        f.display()
                    )
                })?
            }
        };
        let ca = self
            .ca
            .as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("CA file {}", p.display())))
            .transpose()?;
        Ok(RegionClient::new(
            &self.region,
            secret.trim(),
            ca.as_deref(),
        )?)
    }
}

#[derive(Debug, Subcommand)]
pub enum RegionCmd {
    /// Run the control plane: API, console, placement, on a store.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = DEFAULT_REGION_LISTEN)]
        listen: std::net::SocketAddr,
        /// `redb:PATH` (embedded, one file) or `etcd:URL[,URL...]`
        /// (default: redb in the region's data directory).
        #[arg(long)]
        store: Option<String>,
        /// The admin credential's file, created at first start, mode 0600.
        #[arg(long)]
        admin_credential: Option<PathBuf>,
        /// PEM certificate chain for HTTPS.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for HTTPS.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Seconds a host stays up without a heartbeat.
        #[arg(long, default_value_t = 10)]
        host_lease_seconds: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// Create a tenant.
    Create {
        /// Name.
        name: String,
        #[command(flatten)]
        region: RegionArg,
    },
    /// List tenants.
    List {
        #[command(flatten)]
        region: RegionArg,
    },
    /// A new API credential for a tenant (printed once).
    Credential {
        /// Tenant.
        name: String,
        #[command(flatten)]
        region: RegionArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// Hosts with their state, capacity and allocations.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        region: RegionArg,
    },
    /// A new credential for a host's card daemon (printed once).
    Credential {
        /// Host name.
        name: String,
        #[command(flatten)]
        region: RegionArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
    /// Place and start an instance.
    Create {
        /// Name.
        name: String,
        /// Instance type (`softcard image list` shows images; types:
        /// sc1.micro, sc1.small, sc1.medium, sc1.large).
        #[arg(long = "type", default_value = "sc1.small")]
        instance_type: String,
        /// Image.
        #[arg(long, default_value = "default")]
        image: String,
        /// Boot volume size.
        #[arg(long, default_value = "1GiB")]
        volume_size: String,
        /// Idempotency token: the same token returns the same instance.
        #[arg(long)]
        client_token: Option<String>,
        /// Encrypt the boot volume under the tenant's key.
        #[arg(long)]
        encrypted: bool,
        /// Keep the boot volume when the instance is terminated.
        #[arg(long)]
        keep_boot_volume: bool,
        /// A vGPU of this type (eg1.medium 1 GiB, eg1.large 2 GiB,
        /// eg1.xlarge 4 GiB, eg1.2xlarge 8 GiB), placed with the instance.
        #[arg(long)]
        vgpu: Option<String>,
        #[command(flatten)]
        region: RegionArg,
    },
    /// List instances.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        region: RegionArg,
    },
    /// One instance (JSON).
    Show {
        /// Id or name.
        id: String,
        #[command(flatten)]
        region: RegionArg,
    },
    /// Stop a running instance.
    Stop {
        /// Id or name.
        id: String,
        #[command(flatten)]
        region: RegionArg,
    },
    /// Start a stopped instance.
    Start {
        /// Id or name.
        id: String,
        #[command(flatten)]
        region: RegionArg,
    },
    /// Reset a running instance.
    Reboot {
        /// Id or name.
        id: String,
        #[command(flatten)]
        region: RegionArg,
    },
    /// Terminate an instance (its boot volume goes too unless kept).
    Terminate {
        /// Id or name.
        id: String,
        #[command(flatten)]
        region: RegionArg,
    },
    /// The serial console's captured output.
    ConsoleOutput {
        /// Id or name.
        id: String,
        #[command(flatten)]
        region: RegionArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume on a host's device.
    Create {
        /// Name.
        name: String,
        /// Size.
        #[arg(long)]
        size: String,
        /// On this host.
        #[arg(long, conflicts_with = "near")]
        host: Option<String>,
        /// On the host of this instance (volumes attach only on their host).
        #[arg(long)]
        near: Option<String>,
        /// Encrypt under the tenant's key.
        #[arg(long)]
        encrypted: bool,
        #[command(flatten)]
        region: RegionArg,
    },
    /// List volumes.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        region: RegionArg,
    },
    /// One volume (JSON).
    Show {
        /// Id or name.
        id: String,
        #[command(flatten)]
        region: RegionArg,
    },
    /// Hot-plug a volume into a running instance on its host.
    Attach {
        /// Volume id or name.
        id: String,
        /// Instance id or name.
        #[arg(long)]
        instance: String,
        #[command(flatten)]
        region: RegionArg,
    },
    /// Unplug a volume (`--force`: even if the guest holds it).
    Detach {
        /// Volume id or name.
        id: String,
        /// Cut the disk even when the guest does not release it.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        region: RegionArg,
    },
    /// Delete an available volume.
    Delete {
        /// Volume id or name.
        id: String,
        #[command(flatten)]
        region: RegionArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum VgpuCmd {
    /// Attach a vGPU to an instance (a softcard extension: Elastic GPUs
    /// attach only at launch).
    Attach {
        /// Instance id or name.
        #[arg(long)]
        instance: String,
        /// vGPU type.
        #[arg(long = "type")]
        vgpu_type: String,
        #[command(flatten)]
        region: RegionArg,
    },
    /// Detach an instance's vGPU.
    Detach {
        /// Instance id or name.
        #[arg(long)]
        instance: String,
        #[command(flatten)]
        region: RegionArg,
    },
    /// vGPU attachments with their state and health.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        region: RegionArg,
    },
}

/// `softcard vgpu ...`.
pub fn vgpu(c: VgpuCmd) -> Result<()> {
    match c {
        VgpuCmd::Attach {
            instance,
            vgpu_type,
            region,
        } => {
            let v = region.client()?.post(
                &format!("/v1/instances/{}/vgpu", seg(&instance)?),
                &json!({"type": vgpu_type}),
            )?;
            println!(
                "{} {} on {}/{}: {}",
                s(&v, "id"),
                s(&v, "vgpu_type"),
                s(&v, "server"),
                s(&v, "adapter"),
                s(&v, "state")
            );
        }
        VgpuCmd::Detach { instance, region } => {
            let v = region.client()?.call(
                "DELETE",
                &format!("/v1/instances/{}/vgpu", seg(&instance)?),
                None,
            )?;
            println!("{}: {}", s(&v, "id"), s(&v, "state"));
        }
        VgpuCmd::List { json, region } => {
            let v = region.client()?.get("/v1/vgpus")?;
            if json {
                return print_json(&v);
            }
            println!(
                "{:<22} {:<20} {:<12} {:<10} {:<9} {:<16} ENDPOINT",
                "VGPU", "INSTANCE", "TYPE", "STATE", "HEALTH", "SERVER/ADAPTER"
            );
            for x in v.as_array().into_iter().flatten() {
                println!(
                    "{:<22} {:<20} {:<12} {:<10} {:<9} {:<16} {}",
                    s(x, "id"),
                    s(x, "instance"),
                    s(x, "vgpu_type"),
                    s(x, "state"),
                    s(x, "health"),
                    format!("{}/{}", s(x, "server"), s(x, "adapter")),
                    s(x, "endpoint")
                );
            }
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// The images instances boot from.
    List {
        #[command(flatten)]
        region: RegionArg,
    },
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    }
}

fn seg(x: &str) -> Result<&str> {
    anyhow::ensure!(
        !x.is_empty()
            && x.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'),
        "invalid name {x:?}"
    );
    Ok(x)
}

/// `softcard region ...`.
pub fn region(c: RegionCmd) -> Result<()> {
    let RegionCmd::Serve {
        listen,
        store,
        admin_credential,
        tls_cert,
        tls_key,
        host_lease_seconds,
    } = c;
    let dir = default_region_dir();
    let store = store.unwrap_or_else(|| format!("redb:{}", dir.join("region.redb").display()));
    let mut opts = ServeOptions::new(
        listen,
        store,
        admin_credential.unwrap_or_else(|| dir.join("admin.credential")),
    );
    opts.tls = tls_cert.zip(tls_key);
    opts.host_lease = std::time::Duration::from_secs(host_lease_seconds.max(1));
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let started = softcard_region::server::start(&opts).await?;
        println!(
            "region on {}://{} (store {}); admin credential in {}",
            if opts.tls.is_some() { "https" } else { "http" },
            started.addr,
            opts.store,
            opts.admin_credential.display()
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        started.shutdown();
        anyhow::Ok(())
    })
}

/// `softcard tenant ...`.
pub fn tenant(c: TenantCmd) -> Result<()> {
    match c {
        TenantCmd::Create { name, region } => {
            region
                .client()?
                .post("/v1/tenants", &json!({"name": name}))?;
            println!("created tenant {name}");
        }
        TenantCmd::List { region } => {
            for t in region
                .client()?
                .get("/v1/tenants")?
                .as_array()
                .into_iter()
                .flatten()
            {
                println!("{}", s(t, "name"));
            }
        }
        TenantCmd::Credential { name, region } => {
            let v = region.client()?.post(
                &format!("/v1/tenants/{}/credentials", seg(&name)?),
                &json!({}),
            )?;
            println!("{}", s(&v, "credential"));
        }
    }
    Ok(())
}

/// `softcard host ...`.
pub fn host(c: HostCmd) -> Result<()> {
    match c {
        HostCmd::List { json, region } => {
            let v = region.client()?.get("/v1/hosts")?;
            if json {
                return print_json(&v);
            }
            println!(
                "{:<16} {:<28} {:>9} {:>15}  DEVICES (used/capacity)",
                "HOST", "STATE", "VCPUS", "MEMORY MiB"
            );
            for h in v.as_array().into_iter().flatten() {
                let state = match h["last_seen"].as_u64() {
                    Some(t) if h["state"] == "down" => format!("down (last seen {t})"),
                    _ => s(h, "state"),
                };
                let devices: Vec<String> = h["devices"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| {
                        format!(
                            "{} {}/{}",
                            s(d, "name"),
                            format_size(d["used_bytes"].as_u64().unwrap_or(0)),
                            format_size(d["capacity_bytes"].as_u64().unwrap_or(0))
                        )
                    })
                    .collect();
                println!(
                    "{:<16} {:<28} {:>9} {:>15}  {}",
                    s(h, "name"),
                    state,
                    format!("{}/{}", h["vcpus_used"], h["vcpus"]),
                    format!("{}/{}", h["memory_mib_used"], h["memory_mib"]),
                    devices.join(", ")
                );
            }
        }
        HostCmd::Credential { name, region } => {
            let v = region.client()?.post(
                &format!("/v1/hosts/{}/credentials", seg(&name)?),
                &json!({}),
            )?;
            println!("{}", s(&v, "credential"));
        }
    }
    Ok(())
}

fn print_instance_line(i: &Value) {
    let vols: Vec<String> = i["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| s(v, "name"))
        .collect();
    println!(
        "{:<20} {:<20} {:<18} {:<9} {:<12} {:<11} {}",
        s(i, "name"),
        s(i, "id"),
        format!("{} ({})", s(&i["state"], "name"), i["state"]["code"]),
        s(i, "health"),
        s(i, "host"),
        s(i, "instance_type"),
        vols.join(",")
    );
}

/// `softcard instance ...`.
pub fn instance(c: InstanceCmd) -> Result<()> {
    let action = |region: &RegionArg, id: &str, a: &str| -> Result<()> {
        let v = region
            .client()?
            .post(&format!("/v1/instances/{}/{a}", seg(id)?), &json!({}))?;
        println!(
            "{} {}: {}",
            s(&v, "id"),
            s(&v, "name"),
            s(&v["state"], "name")
        );
        Ok(())
    };
    match c {
        InstanceCmd::Create {
            name,
            instance_type,
            image,
            volume_size,
            client_token,
            encrypted,
            keep_boot_volume,
            vgpu,
            region,
        } => {
            let v = region.client()?.post(
                "/v1/instances",
                &json!({"name": name, "type": instance_type, "image": image,
                        "volume_size": volume_size, "client_token": client_token,
                        "encrypted": encrypted, "keep_boot_volume": keep_boot_volume,
                        "vgpu": vgpu}),
            )?;
            println!(
                "{} {}: {} on host {}",
                s(&v, "id"),
                s(&v, "name"),
                s(&v["state"], "name"),
                s(&v, "host")
            );
        }
        InstanceCmd::List { json, region } => {
            let v = region.client()?.get("/v1/instances")?;
            if json {
                return print_json(&v);
            }
            println!(
                "{:<20} {:<20} {:<18} {:<9} {:<12} {:<11} VOLUMES",
                "NAME", "ID", "STATE", "HEALTH", "HOST", "TYPE"
            );
            for i in v.as_array().into_iter().flatten() {
                print_instance_line(i);
            }
        }
        InstanceCmd::Show { id, region } => {
            print_json(
                &region
                    .client()?
                    .get(&format!("/v1/instances/{}", seg(&id)?))?,
            )?;
        }
        InstanceCmd::Stop { id, region } => action(&region, &id, "stop")?,
        InstanceCmd::Start { id, region } => action(&region, &id, "start")?,
        InstanceCmd::Reboot { id, region } => action(&region, &id, "reboot")?,
        InstanceCmd::Terminate { id, region } => action(&region, &id, "terminate")?,
        InstanceCmd::ConsoleOutput { id, region } => {
            let v = region
                .client()?
                .get(&format!("/v1/instances/{}/console", seg(&id)?))?;
            print!("{}", v["output"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}

/// `softcard volume ...`.
pub fn volume(c: VolumeCmd) -> Result<()> {
    match c {
        VolumeCmd::Create {
            name,
            size,
            host,
            near,
            encrypted,
            region,
        } => {
            let v = region.client()?.post(
                "/v1/volumes",
                &json!({"name": name, "size": size, "host": host, "near": near, "encrypted": encrypted}),
            )?;
            println!(
                "{} {}: {} on {}/{}",
                s(&v, "id"),
                s(&v, "name"),
                s(&v, "state"),
                s(&v, "host"),
                s(&v, "device")
            );
        }
        VolumeCmd::List { json, region } => {
            let v = region.client()?.get("/v1/volumes")?;
            if json {
                return print_json(&v);
            }
            println!(
                "{:<20} {:<22} {:<10} {:>10} {:<20} ATTACHMENT",
                "NAME", "ID", "STATE", "SIZE", "HOST/DEVICE"
            );
            for x in v.as_array().into_iter().flatten() {
                let att = match x.get("attachment") {
                    Some(a) if !a.is_null() => format!("{} ({})", s(a, "instance"), s(a, "state")),
                    _ => "-".into(),
                };
                println!(
                    "{:<20} {:<22} {:<10} {:>10} {:<20} {att}",
                    s(x, "name"),
                    s(x, "id"),
                    s(x, "state"),
                    format_size(x["size_bytes"].as_u64().unwrap_or(0)),
                    format!("{}/{}", s(x, "host"), s(x, "device")),
                );
            }
        }
        VolumeCmd::Show { id, region } => {
            print_json(
                &region
                    .client()?
                    .get(&format!("/v1/volumes/{}", seg(&id)?))?,
            )?;
        }
        VolumeCmd::Attach {
            id,
            instance,
            region,
        } => {
            let v = region.client()?.post(
                &format!("/v1/volumes/{}/attach", seg(&id)?),
                &json!({"instance": instance}),
            )?;
            println!(
                "{} {}: {}",
                s(&v, "id"),
                s(&v, "name"),
                s(&v["attachment"], "state")
            );
        }
        VolumeCmd::Detach { id, force, region } => {
            let v = region.client()?.post(
                &format!("/v1/volumes/{}/detach", seg(&id)?),
                &json!({"force": force}),
            )?;
            println!(
                "{} {}: {}",
                s(&v, "id"),
                s(&v, "name"),
                s(&v["attachment"], "state")
            );
        }
        VolumeCmd::Delete { id, region } => {
            let v = region
                .client()?
                .call("DELETE", &format!("/v1/volumes/{}", seg(&id)?), None)?;
            println!("{} {}: {}", s(&v, "id"), s(&v, "name"), s(&v, "state"));
        }
    }
    Ok(())
}

/// `softcard image list`.
pub fn image(c: ImageCmd) -> Result<()> {
    let ImageCmd::List { region } = c;
    for i in region
        .client()?
        .get("/v1/images")?
        .as_array()
        .into_iter()
        .flatten()
    {
        println!("{:<12} {}", s(i, "name"), s(i, "description"));
    }
    Ok(())
}

/// `softcard gpu list`: the region's GPU servers.
pub fn gpu_servers(json: bool, region: &RegionArg) -> Result<()> {
    let v = region.client()?.get("/v1/gpu-servers")?;
    if json {
        return print_json(&v);
    }
    println!(
        "{:<16} {:<6} {:<22} {:<40} {:>10} {:>10}  ATTACHMENTS",
        "SERVER", "STATE", "ENDPOINT", "ADAPTER", "MEMORY", "FREE"
    );
    for g in v.as_array().into_iter().flatten() {
        for a in g["adapters"].as_array().into_iter().flatten() {
            println!(
                "{:<16} {:<6} {:<22} {:<40} {:>10} {:>10}  {}",
                s(g, "name"),
                s(g, "state"),
                s(g, "endpoint"),
                s(a, "name"),
                format_size(a["memory_bytes"].as_u64().unwrap_or(0)),
                format_size(a["free_bytes"].as_u64().unwrap_or(0)),
                a["attachments"].as_array().map_or(0, Vec::len)
            );
        }
    }
    Ok(())
}

/// `softcard gpu credential NAME`.
pub fn gpu_credential(name: &str, region: &RegionArg) -> Result<()> {
    let v = region.client()?.post(
        &format!("/v1/gpu-servers/{}/credentials", seg(name)?),
        &json!({}),
    )?;
    println!("{}", s(&v, "credential"));
    Ok(())
}
