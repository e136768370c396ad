//! The card daemon: `softcard serve` from a configuration file, joining a
//! region as a host when asked.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use softcard_control::api::card_router;
use softcard_control::{ApiServer, CardConfig, MetricsServer};
use softcard_host::HostConfig;
use softcard_storage::crypto::KeyStore;
use softcard_storage::StorageCard;

/// Blocks SIGINT, SIGTERM and SIGUSR2 (upgrade) in this thread and every
/// thread it starts later, so that [`wait_for_signal`] receives them.
pub(crate) fn block_signals() -> Result<libc::sigset_t> {
    // SAFETY: the sigset is initialised by sigemptyset before use, and
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            anyhow::bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

pub(crate) fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is a valid, initialised sigset and `sig` a valid out
    // pointer.
    let rc = unsafe { libc::sigwait(set, &mut sig) };
    if rc != 0 {
        return libc::SIGTERM;
    }
    sig
}

/// Plaintext keys live in this process's memory: no core dumps of it (and
/// no ptrace attach by other unprivileged processes).
fn keep_keys_out_of_core_dumps() {
    // SAFETY: prctl with PR_SET_DUMPABLE takes an integer argument and
    // touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        log::warn!(
            "prctl(PR_SET_DUMPABLE, 0): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// How a card daemon joins a region as a host.
#[derive(Debug, Clone, clap::Args)]
pub struct RegionArgs {
    /// Join the region at this URL as a host: register, heartbeat, run the
    /// instances it places here.
    #[arg(long)]
    pub region: Option<String>,
    /// The host's credential (`softcard host credential NAME`).
    #[arg(long, requires = "region", env = "SOFTCARD_HOST_CREDENTIAL_FILE")]
    pub region_credential: Option<PathBuf>,
    /// A PEM certificate to trust for an https region.
    #[arg(long, requires = "region")]
    pub region_ca: Option<PathBuf>,
}

fn machine_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4 << 30, |kb| kb * 1024)
}

/// The host agent's settings from the configuration, with the machine's
/// defaults.
pub(crate) fn host_config(
    cfg: &CardConfig,
    default_dir: &Path,
    stop_vms_on_exit: bool,
) -> HostConfig {
    let h = &cfg.host;
    HostConfig {
        name: h.name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|n| n.trim().to_lowercase())
                .unwrap_or_else(|_| "host".into())
        }),
        vcpus: h.vcpus.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
        }),
        memory_mib: h.memory_bytes.unwrap_or_else(|| machine_memory_bytes() / 2) >> 20,
        data_dir: h.data_dir.clone().unwrap_or_else(|| default_dir.to_owned()),
        qemu: h
            .qemu
            .clone()
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
        accel: h.accel.clone().unwrap_or_else(|| "tcg".into()),
        stop_vms_on_exit,
    }
}

fn join_region(
    cfg: &CardConfig,
    card: &Arc<StorageCard>,
    args: &RegionArgs,
) -> Result<Option<softcard_host::Agent>> {
    let Some(url) = &args.region else {
        return Ok(None);
    };
    let cred_file = args
        .region_credential
        .as_ref()
        .context("--region needs --region-credential FILE (softcard host credential NAME)")?;
    let secret = std::fs::read_to_string(cred_file)
        .with_context(|| format!("host credential {}", cred_file.display()))?;
    let ca = args
        .region_ca
        .as_ref()
        .map(std::fs::read)
        .transpose()
        .context("region CA file")?;
    let client = softcard_region::client::RegionClient::new(url, secret.trim(), ca.as_deref())?;
    let who = client.get("/v1/whoami")?;
    anyhow::ensure!(
        who["kind"] == "host",
        "the credential in {} is not a host's",
        cred_file.display()
    );
    let mut host = host_config(
        cfg,
        &cfg.api_socket
            .parent()
            .unwrap_or(Path::new("/var/lib/softcard"))
            .join("host"),
        false,
    );
    if let Some(n) = who["name"].as_str() {
        n.clone_into(&mut host.name);
    }
    log::info!(
        "joining region {url} as host {} ({} vCPU, {} MiB, accel {})",
        host.name,
        host.vcpus,
        host.memory_mib,
        host.accel
    );
    Ok(Some(softcard_host::Agent::start(
        host,
        card.clone(),
        client,
    )?))
}

/// `softcard serve --config FILE [--region URL ...]`. Started by a
/// running card as its successor (`softcard upgrade`), it takes that
/// card's listening sockets over ([`crate::upgrade`]).
pub fn serve(config: &Path, region: &RegionArgs) -> Result<()> {
    let set = block_signals()?;
    keep_keys_out_of_core_dumps();
    // The binary an upgrade starts by default: this path, which a package
    // update replaces.
    let binary = std::env::current_exe().context("the daemon's own path")?;
    let mut incoming = crate::upgrade::Incoming::receive().context("taking the hand-over")?;
    let cfg = match CardConfig::load(config) {
        Ok(c) => c,
        Err(e) => {
            if let Some(i) = &mut incoming {
                i.refuse(&format!("configuration: {e}"));
            }
            return Err(e.into());
        }
    };
    if let Some(i) = &mut incoming {
        if let Some((path, _)) = &i.api {
            if path != &cfg.api_socket {
                let why = format!(
                    "the configuration's api_socket {} is not the running card's {}",
                    cfg.api_socket.display(),
                    path.display()
                );
                i.refuse(&why);
                anyhow::bail!(why);
            }
        }
        log::info!("taking over from the card process {}", i.pid);
        i.take_over()?;
    }
    let keys = KeyStore::load(&cfg.tenants);
    softcard_storage::placement::set_queue_cpus(&cfg.queue_cpus)
        .map_err(|e| anyhow::anyhow!("queue_cpus: {e}"))?;
    let card = Arc::new(StorageCard::open_with_keys(&cfg.devices, keys)?);
    if let Some(i) = &mut incoming {
        card.inherit_listeners(std::mem::take(&mut i.interfaces));
    }
    if let Some(state) = &cfg.state_file {
        for (volume, outcome) in card.keep_state(state)? {
            match outcome {
                Ok(()) => log::info!("restored the attachment of volume {volume}"),
                Err(e) => log::error!(
                    "cannot restore the attachment of volume {volume}: {e} (kept on record; \
                     `card volume detach {volume}` forgets it)"
                ),
            }
        }
    }
    for d in card.devices() {
        match &d.error {
            Some(e) => log::warn!("device {} unavailable: {e}", d.name),
            None => log::info!(
                "device {} ({}): {} B, {} volume(s), {}",
                d.name,
                d.kind,
                d.capacity_bytes,
                d.volumes,
                d.detail
            ),
        }
    }
    // The RDMA function: an engine per [[rdma]] device, and the socket
    // unmodified verbs applications reach them on.
    let rdma_socket = cfg
        .rdma_socket
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from(softcard_rdma::service::DEFAULT_SOCKET));
    let devices: Vec<_> = cfg
        .rdma
        .iter()
        .map(|r| (r.name.clone(), r.address))
        .collect();
    let rdma = std::sync::Arc::new(
        softcard_rdma::service::RdmaService::start(&devices, &rdma_socket)
            .with_context(|| format!("starting the RDMA devices ({})", rdma_socket.display()))?,
    );
    for r in &cfg.rdma {
        if let Some(f) = r.faults {
            log::warn!(
                "rdma device {}: injecting faults (tests only): {f:?}",
                r.name
            );
            rdma.set_faults(
                &r.name,
                softcard_rdma::net::Faults {
                    seed: f.seed,
                    drop_ppm: f.drop_ppm,
                    dup_ppm: f.dup_ppm,
                    reorder_ppm: f.reorder_ppm,
                    corrupt_ppm: f.corrupt_ppm,
                },
            )?;
        }
    }
    for d in rdma.status() {
        log::info!(
            "rdma device {} on {} (GID {})",
            d.info.name,
            d.info.address,
            std::net::Ipv6Addr::from(d.info.gid)
        );
    }
    let agent = join_region(&cfg, &card, region)?;
    // One management API for everything the card runs: the storage
    // function's routes, the RDMA devices, and the instances when the
    // card is a host.
    let requests = Arc::new(crate::upgrade::Requests::default());
    let mut routes = card_router(card.clone())
        .merge(crate::rdma::router(rdma.clone()))
        .merge(crate::upgrade::router(requests.clone(), binary.clone()));
    if let Some(a) = &agent {
        routes = routes.merge(a.router());
    }
    let inherited_api = incoming.as_mut().and_then(|i| i.api.take());
    let api = match inherited_api {
        Some((_, l)) => ApiServer::adopt(routes, &cfg.api_socket, l),
        None => ApiServer::start(routes, &cfg.api_socket),
    }
    .with_context(|| format!("starting the API on {}", cfg.api_socket.display()))?;
    let inherited_metrics = incoming.as_mut().and_then(|i| i.metrics.take());
    let metrics = match (cfg.metrics_listen, inherited_metrics) {
        (Some(_), Some(l)) => Some(MetricsServer::adopt(card.clone(), l)?),
        (Some(addr), None) => Some(
            MetricsServer::start(card.clone(), addr)
                .with_context(|| format!("starting the metrics endpoint on {addr}"))?,
        ),
        (None, _) => None,
    };
    drop(incoming);
    crate::upgrade::notify_service_manager();
    log::info!("card daemon ready (pid {})", std::process::id());
    loop {
        let sig = wait_for_signal(&set);
        if sig != libc::SIGUSR2 {
            log::info!("signal {sig}: stopping");
            break;
        }
        let (wanted, reply) = match requests.take() {
            Some((b, r)) => (b, Some(r)),
            None => (None, None),
        };
        let to = wanted.unwrap_or_else(|| binary.clone());
        log::info!("upgrade: starting {}", to.display());
        let out = crate::upgrade::Outgoing {
            api: (&cfg.api_socket, api.listener()),
            metrics: metrics.as_ref().map(|m| (m.addr(), m.listener())),
            interfaces: card.listeners().context("duplicating the listeners")?,
        };
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        match crate::upgrade::hand_over(&to, &args, &out) {
            Ok(pid) => {
                if let Some(r) = reply {
                    let _ = r.send(Ok(pid));
                }
                log::info!("upgrade: pid {pid} takes over; stopping");
                drop(agent);
                api.hand_over();
                drop(metrics);
                drop(rdma);
                card.hand_over();
                return Ok(());
            }
            Err(e) => {
                if let Some(r) = reply {
                    let _ = r.send(Err(format!("{e:#}")));
                }
            }
        }
    }
    // The agent first: it stops using the card (its VMs keep running, to
    // be adopted by the next start).
    drop(agent);
    api.stop();
    drop(metrics);
    drop(rdma);
    card.shutdown();
    Ok(())
}
