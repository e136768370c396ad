//! Command-line interface.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use softcard_control::config::DEFAULT_API_SOCKET;
use softcard_control::size::{format_size, parse_size};
use softcard_control::ApiClient;

use crate::{bench, daemon, gpu, region_cli};

/// A software peripheral card for cloud hosts: carves physical devices into
/// volumes and presents each one to a VM through its own interface.
#[derive(Debug, Parser)]
#[command(name = "softcard", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct ApiArg {
    /// Management API socket of the daemon.
    #[arg(long, env = "SOFTCARD_API", default_value = DEFAULT_API_SOCKET)]
    api: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the card daemon with a configuration file.
    Serve {
        /// TOML configuration (see docs/configuration.md).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        region: daemon::RegionArgs,
    },
    /// Replace the running card daemon with a new binary while its VMs
    /// run: the new process takes the listening sockets over, the old one
    /// finishes its I/O and exits (docs/live-update.md).
    Upgrade {
        /// The new binary (default: the running daemon's own path).
        #[arg(long)]
        binary: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArg,
    },
    /// The whole provider network on this machine: a region on the
    /// embedded store with its console, this machine's card as a host, the
    /// vGPU server, and one instance booted. Prints the console's address
    /// and a tenant's credential.
    Up(crate::up::UpArgs),
    /// One card's own management API (a card run without a region):
    /// devices, volumes carved from them, tenants' keys.
    #[command(subcommand)]
    Card(CardCmd),
    /// The provider network's control plane.
    #[command(subcommand)]
    Region(region_cli::RegionCmd),
    /// Tenants of the region and their credentials (admin).
    #[command(subcommand)]
    Tenant(region_cli::TenantCmd),
    /// Hosts of the region (admin).
    #[command(subcommand)]
    Host(region_cli::HostCmd),
    /// Instances: VMs the region places on its hosts.
    #[command(subcommand)]
    Instance(region_cli::InstanceCmd),
    /// Volumes of the region's tenants, on its hosts' devices.
    #[command(subcommand)]
    Volume(region_cli::VolumeCmd),
    /// Images instances boot from.
    #[command(subcommand)]
    Image(region_cli::ImageCmd),
    /// vGPUs: GPU memory on the region's GPU servers, attached to instances.
    #[command(subcommand)]
    Vgpu(region_cli::VgpuCmd),
    /// Virtual GPUs: the GPU server and a demo application.
    #[command(subcommand)]
    Gpu(GpuCmd),
    /// Answers one instance-metadata connection on standard input and
    /// output from an instance's metadata file (QEMU runs this for each
    /// guest connection to 169.254.169.254:80).
    #[command(hide = true)]
    Metadata {
        /// The instance's metadata file.
        #[arg(long)]
        file: PathBuf,
    },
    /// Relays one guest connection on standard input and output to the
    /// instance's vGPU (QEMU runs this for each guest connection to
    /// 169.254.169.254:7070).
    #[command(hide = true)]
    Relay {
        /// The instance's metadata file.
        #[arg(long)]
        metadata: PathBuf,
    },
    /// Benchmarks against the peers users run today.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// The card's RDMA devices, and unmodified verbs applications on them.
    #[command(subcommand)]
    Rdma(RdmaCmd),
}

#[derive(Debug, Subcommand)]
enum RdmaCmd {
    /// The card's RDMA devices: address, GUID, port, RoCE v2 GID, MTU.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Queue pairs and fast-path/software-path counters per device.
    Stats {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Runs an unmodified verbs application (ibv_devinfo, perftest, ...)
    /// on the card's devices through softcard's libibverbs.so.1.
    Exec {
        /// The card's RDMA control socket (`rdma_socket` in its
        /// configuration).
        #[arg(long, env = "SOFTCARD_RDMA_SOCKET", default_value = softcard_rdma::service::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CardCmd {
    /// Manage volumes (partitions of physical devices).
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Inspect physical devices.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Tenants and their key-encryption keys.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// The instances this card runs for a region (JSON).
    #[command(subcommand)]
    Instance(CardInstanceCmd),
}

#[derive(Debug, Subcommand)]
enum CardInstanceCmd {
    /// Each instance the region placed here, with its VM's process and
    /// the volumes plugged into it.
    List {
        #[command(flatten)]
        api: ApiArg,
    },
}

#[derive(Debug, Subcommand)]
enum GpuCmd {
    /// Own this machine's GPU and serve vGPU sessions to remote clients
    /// (`--region`: registered with a region as a resource provider).
    Serve(gpu::ServeArgs),
    /// The region's GPU servers, their adapters, free GPU memory and
    /// attachments (admin).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        region: region_cli::RegionArg,
    },
    /// A new credential for a GPU server (admin; printed once).
    Credential {
        /// The GPU server's name.
        name: String,
        #[command(flatten)]
        region: region_cli::RegionArg,
    },
    /// This machine's GPUs and their limits.
    Adapters,
    /// Render a textured 3D scene on a GPU server and present it to the
    /// server's viewer (an ordinary wgpu render loop).
    Demo(gpu::DemoArgs),
}

#[derive(Debug, Subcommand)]
enum VolumeCmd {
    /// Carve a volume out of a device's free space.
    Create {
        /// Volume name.
        name: String,
        /// Device to carve it from.
        #[arg(long)]
        device: String,
        /// Size, such as 10GiB.
        #[arg(long)]
        size: String,
        /// Encrypt with AES-256-XTS under a fresh data key.
        #[arg(long, requires = "tenant")]
        encrypt: bool,
        /// Tenant whose key-encryption key wraps the data key.
        #[arg(long, requires = "encrypt")]
        tenant: Option<String>,
        #[command(flatten)]
        api: ApiArg,
    },
    /// List volumes.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Show one volume with its interface counters.
    Show {
        /// Volume name.
        name: String,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Counters and latency of a volume (kept across detach and attach).
    Stats {
        /// Volume name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Delete a volume that is not attached; frees its space.
    Delete {
        /// Volume name.
        name: String,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Present a volume to a VM as a virtio-blk disk over vhost-user, or to
    /// the host system as an NBD export.
    Attach {
        /// Volume name.
        name: String,
        /// Socket the VMM connects to.
        #[arg(
            long = "vhost-user",
            required_unless_present_any = ["nbd", "connect"],
            conflicts_with_all = ["nbd", "connect"]
        )]
        socket: Option<PathBuf>,
        /// Socket the VMM listens on (QEMU `-chardev socket,server=on`):
        /// the card connects to it, and again after each disconnect, so the
        /// VM takes a restarted or upgraded card at once.
        #[arg(long = "vhost-user-connect", conflicts_with = "nbd")]
        connect: Option<PathBuf>,
        /// Unix socket of an NBD export instead (for qemu-img, qemu-io,
        /// nbdinfo, nbd-client: `nbd+unix:///NAME?socket=PATH`).
        #[arg(long)]
        nbd: Option<PathBuf>,
        /// Virtqueues (vhost-user only).
        #[arg(long, conflicts_with = "nbd")]
        queues: Option<u16>,
        #[command(flatten)]
        qos: QosArgs,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Change an attached volume's throttle limits live (no limits given:
    /// unlimited).
    SetQos {
        /// Volume name.
        name: String,
        #[command(flatten)]
        qos: QosArgs,
        #[command(flatten)]
        api: ApiArg,
    },
    /// End a volume's interface.
    Detach {
        /// Volume name.
        name: String,
        #[command(flatten)]
        api: ApiArg,
    },
}

/// Throttle limits of an interface.
#[derive(Debug, Args)]
struct QosArgs {
    /// Requests per second.
    #[arg(long)]
    iops: Option<u64>,
    /// Burst allowance in requests (default: 0.1 s worth).
    #[arg(long)]
    iops_burst: Option<u64>,
    /// Data bytes per second, such as 100MiB.
    #[arg(long)]
    bps: Option<String>,
    /// Burst allowance in bytes (default: 0.1 s worth).
    #[arg(long)]
    bps_burst: Option<String>,
    /// Weight in the fair sharing of the device's queue (default 1).
    #[arg(long)]
    weight: Option<u32>,
}

impl QosArgs {
    fn to_json(&self) -> Result<Value> {
        let size = |s: &Option<String>| -> Result<Option<u64>> {
            s.as_deref()
                .map(parse_size)
                .transpose()
                .map_err(anyhow::Error::msg)
        };
        Ok(json!({
            "iops": self.iops,
            "iops_burst": self.iops_burst,
            "bytes_per_sec": size(&self.bps)?,
            "bytes_burst": size(&self.bps_burst)?,
            "weight": self.weight,
        }))
    }
}

#[derive(Debug, Subcommand)]
enum TenantCmd {
    /// List tenants and whether their key is available.
    List {
        #[command(flatten)]
        api: ApiArg,
    },
    /// Re-wrap every data key of the tenant with a new key-encryption key
    /// (64 hex digits in a file); the data is not re-encrypted. Point the
    /// tenant's `kek_file` at the new file afterwards.
    RotateKey {
        /// Tenant.
        name: String,
        /// File holding the new key.
        #[arg(long)]
        new_kek_file: PathBuf,
        #[command(flatten)]
        api: ApiArg,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    /// List devices.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArg,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// vhost-user-blk: softcard against qemu-storage-daemon, same client
    /// (libblkio), same machine, same run.
    Storage(bench::StorageBenchArgs),
    /// AES-256-XTS throughput against `openssl speed`, same run.
    Crypto(bench::CryptoBenchArgs),
    /// An encrypted `ram` volume against the same volume unencrypted,
    /// measured in alternating slices.
    Encryption(bench::EncryptionBenchArgs),
    /// The NBD export against qemu-storage-daemon's, same client.
    Nbd(bench::NbdBenchArgs),
    /// A quiet volume's latency alone and next to a noisy one.
    Fairness(crate::bench_qos::FairnessBenchArgs),
    /// How exactly an IOPS limit holds under load.
    Qos(crate::bench_qos::QosBenchArgs),
    /// The RDMA engine against sockperf and iperf3 (needs root).
    Rdma(crate::bench_rdma::RdmaBenchArgs),
    /// The pause I/O sees while the card is upgraded or crash-restarted
    /// underneath libblkio and a QEMU guest.
    Upgrade(crate::bench_upgrade::UpgradeBenchArgs),
    /// Debian's perftest through softcard's libibverbs and the card daemon,
    /// against sockperf, iperf3 and the engine's own API (needs root).
    Verbs(crate::bench_verbs::VerbsBenchArgs),
    /// The vGPU against local wgpu on the same adapter.
    Gpu(crate::gpu_bench::GpuBenchArgs),
    /// The region: placements per second and API latency on etcd and on
    /// the embedded store; create-to-running and attach times on a real
    /// host.
    Region(crate::region_bench::RegionBenchArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let cmd_kind = match &cli.command {
        Command::Rdma(RdmaCmd::Stats { .. }) => Some(true),
        Command::Rdma(RdmaCmd::List { .. }) => Some(false),
        _ => None,
    };
    match cli.command {
        Command::Serve { config, region } => daemon::serve(&config, &region),
        Command::Up(a) => crate::up::up(&a),
        Command::Upgrade { binary, api } => upgrade(binary.as_deref(), &api),
        Command::Metadata { file } => Ok(softcard_host::metadata::serve_stdio(&file)?),
        Command::Relay { metadata } => Ok(softcard_host::metadata::relay_stdio(&metadata)?),
        Command::Region(c) => region_cli::region(c),
        Command::Tenant(c) => region_cli::tenant(c),
        Command::Host(c) => region_cli::host(c),
        Command::Instance(c) => region_cli::instance(c),
        Command::Volume(c) => region_cli::volume(c),
        Command::Image(c) => region_cli::image(c),
        Command::Vgpu(c) => region_cli::vgpu(c),
        Command::Card(CardCmd::Volume(v)) => volume(v),
        Command::Rdma(RdmaCmd::List { json, api })
        | Command::Rdma(RdmaCmd::Stats { json, api }) => {
            let stats = matches!(cmd_kind, Some(true));
            let v = client(&api).call("GET", "/v1/rdma", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                crate::rdma::print(&v, stats);
            }
            Ok(())
        }
        Command::Rdma(RdmaCmd::Exec { socket, cmd }) => {
            std::process::exit(crate::rdma::exec(&socket, &cmd)?);
        }
        Command::Card(CardCmd::Instance(CardInstanceCmd::List { api })) => {
            let v = client(&api).call("GET", "/v1/instances", None)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Command::Card(CardCmd::Device(DeviceCmd::List { json, api })) => {
            let v = client(&api).call("GET", "/v1/devices", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<16} {:<6} {:>10} {:>10} {:>7}  DETAIL",
                "DEVICE", "KIND", "SIZE", "FREE", "VOLUMES"
            );
            for d in v.as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:<6} {:>10} {:>10} {:>7}  {}",
                    s(d, "name"),
                    s(d, "kind"),
                    format_size(u(d, "capacity_bytes")),
                    format_size(u(d, "free_bytes")),
                    u(d, "volumes"),
                    d.get("error")
                        .and_then(Value::as_str)
                        .unwrap_or(&s(d, "detail")),
                );
            }
            Ok(())
        }
        Command::Gpu(GpuCmd::Serve(a)) => gpu::serve(&a),
        Command::Gpu(GpuCmd::List { json, region }) => region_cli::gpu_servers(json, &region),
        Command::Gpu(GpuCmd::Credential { name, region }) => {
            region_cli::gpu_credential(&name, &region)
        }
        Command::Gpu(GpuCmd::Adapters) => gpu::adapters(),
        Command::Gpu(GpuCmd::Demo(a)) => gpu::demo(&a),
        Command::Bench(BenchCmd::Storage(a)) => bench::storage(&a),
        Command::Bench(BenchCmd::Crypto(a)) => bench::crypto(&a),
        Command::Bench(BenchCmd::Encryption(a)) => bench::encryption(&a),
        Command::Bench(BenchCmd::Nbd(a)) => bench::nbd(&a),
        Command::Bench(BenchCmd::Fairness(a)) => crate::bench_qos::fairness(&a),
        Command::Bench(BenchCmd::Qos(a)) => crate::bench_qos::qos(&a),
        Command::Bench(BenchCmd::Rdma(a)) => crate::bench_rdma::rdma(&a),
        Command::Bench(BenchCmd::Upgrade(a)) => crate::bench_upgrade::upgrade(&a),
        Command::Bench(BenchCmd::Verbs(a)) => crate::bench_verbs::verbs(&a),
        Command::Bench(BenchCmd::Gpu(a)) => crate::gpu_bench::gpu(&a),
        Command::Bench(BenchCmd::Region(a)) => crate::region_bench::region(&a),
        Command::Card(CardCmd::Tenant(TenantCmd::List { api })) => {
            let v = client(&api).call("GET", "/v1/tenants", None)?;
            for t in v.as_array().into_iter().flatten() {
                let state = t
                    .get("error")
                    .and_then(Value::as_str)
                    .map_or("key available".to_owned(), |e| format!("unavailable: {e}"));
                println!("{:<32} {state}", s(t, "name"));
            }
            Ok(())
        }
        Command::Card(CardCmd::Tenant(TenantCmd::RotateKey {
            name,
            new_kek_file,
            api,
        })) => {
            let file = absolute(&new_kek_file)?;
            let v = client(&api).call(
                "POST",
                &format!("/v1/tenants/{}/rotate-key", path_seg(&name)?),
                Some(&json!({ "new_kek_file": file })),
            )?;
            println!(
                "tenant {name}: re-wrapped {} data key(s); now point its kek_file at {}",
                u(&v, "rewrapped"),
                file.display()
            );
            Ok(())
        }
    }
}

/// `softcard upgrade`: asks the daemon to hand over, then waits until the
/// new process answers on the API.
fn upgrade(binary: Option<&std::path::Path>, api: &ApiArg) -> Result<()> {
    let binary = binary
        .map(|b| b.canonicalize().with_context(|| format!("{}", b.display())))
        .transpose()?;
    let started = std::time::Instant::now();
    let body = serde_json::json!({ "binary": binary });
    let v = client(api).call("POST", "/v1/upgrade", Some(&body))?;
    let (old, new) = (u(&v, "previous_pid"), u(&v, "pid"));
    let deadline = started + std::time::Duration::from_secs(120);
    loop {
        if let Ok(p) = client(api).call("GET", "/v1/process", None) {
            if u(&p, "pid") == new {
                break;
            }
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "process {new} took the sockets over but does not answer on the API yet"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    println!(
        "upgraded: pid {old} -> {new} in {} ms",
        started.elapsed().as_millis()
    );
    Ok(())
}

fn client(api: &ApiArg) -> ApiClient {
    ApiClient::new(&api.api)
}

fn s(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("-").to_owned()
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_owned());
    }
    Ok(std::env::current_dir()
        .context("current directory")?
        .join(p))
}

fn volume(cmd: VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Create {
            name,
            device,
            size,
            encrypt,
            tenant,
            api,
        } => {
            let bytes = parse_size(&size).map_err(anyhow::Error::msg)?;
            let body = json!({
                "name": name, "device": device, "size": bytes,
                "encrypt": encrypt, "tenant": tenant,
            });
            let v = client(&api).call("POST", "/v1/volumes", Some(&body))?;
            println!(
                "created volume {} on {}: {} at offset {}",
                s(&v, "name"),
                s(&v, "device"),
                format_size(u(&v, "size_bytes")),
                u(&v, "offset_bytes")
            );
        }
        VolumeCmd::List { json, api } => {
            let v = client(&api).call("GET", "/v1/volumes", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<20} {:<12} {:>10} {:>14}  ATTACHMENT",
                "VOLUME", "DEVICE", "SIZE", "OFFSET"
            );
            for vol in v.as_array().into_iter().flatten() {
                let att = match vol.get("attachment") {
                    Some(a) if !a.is_null() && s(a, "interface") == "nbd" => format!(
                        "{} (nbd, {} client(s), {})",
                        s(a, "socket"),
                        u(a, "clients"),
                        s(a, "state")
                    ),
                    Some(a) if !a.is_null() => format!(
                        "{} ({} queue(s), {})",
                        s(a, "socket"),
                        u(a, "queues"),
                        s(a, "state")
                    ),
                    _ => "-".into(),
                };
                println!(
                    "{:<20} {:<12} {:>10} {:>14}  {att}",
                    s(vol, "name"),
                    s(vol, "device"),
                    format_size(u(vol, "size_bytes")),
                    u(vol, "offset_bytes"),
                );
            }
        }
        VolumeCmd::Show { name, api } => {
            let v = client(&api).call("GET", &format!("/v1/volumes/{}", path_seg(&name)?), None)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        VolumeCmd::Delete { name, api } => {
            client(&api).call("DELETE", &format!("/v1/volumes/{}", path_seg(&name)?), None)?;
            println!("deleted volume {name}");
        }
        VolumeCmd::Stats { name, json, api } => {
            let v = client(&api).call(
                "GET",
                &format!("/v1/volumes/{}/stats", path_seg(&name)?),
                None,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let c = &v["counters"];
            println!(
                "volume {name} on {} ({})",
                s(&v, "device"),
                if v["attached"] == true {
                    "attached"
                } else {
                    "not attached"
                }
            );
            println!(
                "{:<8} {:>12} {:>14} {:>10} {:>12} {:>12}",
                "OP", "REQUESTS", "BYTES", "MEAN us", "p50 us <=", "p99 us <="
            );
            for op in ["read", "write", "flush", "discard"] {
                let l = &v["latency"][op];
                let bytes = match op {
                    "read" => u(c, "read_bytes").to_string(),
                    "write" => u(c, "write_bytes").to_string(),
                    _ => "-".into(),
                };
                let opt = |x: &Value| x.as_u64().map_or("-".into(), |n| n.to_string());
                println!(
                    "{op:<8} {:>12} {bytes:>14} {:>10.1} {:>12} {:>12}",
                    u(l, "count"),
                    l["mean_us"].as_f64().unwrap_or(0.0),
                    opt(&l["p50_us_at_most"]),
                    opt(&l["p99_us_at_most"]),
                );
            }
            println!(
                "errors: {} invalid, {} unsupported, {} I/O; throttled: {} requests, {:.3} s",
                u(c, "invalid_requests"),
                u(c, "unsupported_requests"),
                u(c, "io_errors"),
                u(c, "throttled_requests"),
                u(c, "throttled_ns") as f64 / 1e9
            );
            println!(
                "notifications: {} sent, {} held for a waiting driver ({:.3} ms in all)",
                u(c, "notifications"),
                u(c, "held_notifications"),
                u(c, "held_ns") as f64 / 1e6
            );
        }
        VolumeCmd::SetQos { name, qos, api } => {
            let v = client(&api).call(
                "POST",
                &format!("/v1/volumes/{}/qos", path_seg(&name)?),
                Some(&qos.to_json()?),
            )?;
            println!("volume {name}: qos {}", v["attachment"]["qos"]);
        }
        VolumeCmd::Attach {
            name,
            socket,
            connect,
            nbd,
            queues,
            qos,
            api,
        } => {
            let body = match (socket, nbd, connect) {
                (Some(socket), _, _) => json!({
                    "socket": absolute(&socket)?,
                    "queues": queues.unwrap_or(1),
                    "qos": qos.to_json()?,
                }),
                (None, None, Some(connect)) => json!({
                    "socket": absolute(&connect)?,
                    "interface": "vhost-user-blk-connect",
                    "queues": queues.unwrap_or(1),
                    "qos": qos.to_json()?,
                }),
                (None, Some(nbd), _) => json!({
                    "socket": absolute(&nbd)?,
                    "interface": "nbd",
                    "qos": qos.to_json()?,
                }),
                (None, None, None) => {
                    bail!("give --vhost-user PATH, --vhost-user-connect PATH or --nbd PATH")
                }
            };
            let v = client(&api).call(
                "POST",
                &format!("/v1/volumes/{}/attach", path_seg(&name)?),
                Some(&body),
            )?;
            let a = v.get("attachment").cloned().unwrap_or(Value::Null);
            if s(&a, "interface") == "nbd" {
                println!(
                    "volume {name} exported over NBD on {} (nbd+unix:///{name}?socket={})",
                    s(&a, "socket"),
                    s(&a, "socket")
                );
            } else {
                println!(
                    "volume {name} attached on {} ({} queue(s))",
                    s(&a, "socket"),
                    u(&a, "queues")
                );
            }
        }
        VolumeCmd::Detach { name, api } => {
            client(&api).call(
                "POST",
                &format!("/v1/volumes/{}/detach", path_seg(&name)?),
                None,
            )?;
            println!("volume {name} detached");
        }
    }
    Ok(())
}

/// A volume name as a URL path segment. Names the card accepts never need
/// escaping, so anything else is refused here with the card's own rule.
fn path_seg(name: &str) -> Result<&str> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        bail!("invalid volume name {name:?}: use characters from A-Z a-z 0-9 . _ -");
    }
    Ok(name)
}
