//! `softcard bench fairness` and `softcard bench qos`: the card's
//! quality of service against noisy neighbours and its own limits.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use softcard_storage::device::{DeviceConfig, DeviceKind};
use softcard_storage::{AttachOptions, StorageCard};

use crate::bench::{drive_card, Workload, MAP_SLACK};

/// Options of `softcard bench fairness`.
#[derive(Debug, clap::Args)]
pub struct FairnessBenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Directory for the device file (a disk-backed filesystem, so that
    /// O_DIRECT reaches a real device queue).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
}

/// `softcard bench fairness`: a quiet volume's latency alone and next to a
/// noisy neighbour on the same physical device.
pub fn fairness(a: &FairnessBenchArgs) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("softcard-fair")
        .tempdir_in(&a.dir)
        .with_context(|| format!("directory {}", a.dir.display()))?;
    let sockets = tempfile::Builder::new().prefix("softcard-fair").tempdir()?;
    // Written through (not sparse), so that reads reach the device; the
    // metadata area stays blank for a fresh partition map.
    const FAIR_VOLUME: u64 = 256 << 20;
    let img = dir.path().join("disk.img");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&img)?;
        f.write_all(&vec![0u8; MAP_SLACK as usize])?;
        let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
        for _ in 0..(2 * FAIR_VOLUME) >> 20 {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
    }
    let dev = DeviceConfig {
        name: "disk".into(),
        kind: DeviceKind::File,
        path: Some(img),
        size_bytes: None,
        share_depth: None,
        read_zeroes: None,
        volatile_write_cache: None,
    };
    let card = StorageCard::open(&[dev])?;
    let mut socks = Vec::new();
    for name in ["noisy", "quiet"] {
        card.create_volume(name, "disk", FAIR_VOLUME)?;
        let s = sockets.path().join(format!("{name}.sock"));
        card.attach(
            name,
            &AttachOptions {
                socket: s.clone(),
                queues: 1,
                qos: Default::default(),
                interface: Default::default(),
            },
        )?;
        socks.push(s);
    }
    let quiet_w = Workload {
        name: "4k-randread-qd1",
        write: false,
        block: 4096,
        depth: 1,
        random: true,
    };
    let noisy_w = Workload {
        name: "4k-randwrite-qd64",
        write: true,
        block: 4096,
        depth: 64,
        random: true,
    };
    let detail = card
        .devices()
        .first()
        .map(|d| d.detail.clone())
        .unwrap_or_default();
    println!(
        "# softcard bench fairness: {detail}; {} s per cell",
        a.seconds
    );
    let alone = drive_card(&socks[1], quiet_w, a.seconds)?;
    let noisy_alone = drive_card(&socks[0], noisy_w, a.seconds)?;
    let noisy_sock = socks[0].clone();
    let secs = a.seconds + 1.0;
    let noisy = std::thread::spawn(move || drive_card(&noisy_sock, noisy_w, secs));
    std::thread::sleep(Duration::from_millis(300));
    let shared = drive_card(&socks[1], quiet_w, a.seconds)?;
    let n = noisy
        .join()
        .map_err(|_| anyhow::anyhow!("noisy client panicked"))??;
    println!("| quiet volume 4k-randread-qd1 | IOPS | p50 us | p99 us |");
    println!("|---|---:|---:|---:|");
    println!(
        "| alone | {:.0} | {:.0} | {:.0} |",
        alone.iops, alone.p50_us, alone.p99_us
    );
    println!(
        "| next to 4k-randwrite-qd64 ({:.0} IOPS) | {:.0} | {:.0} | {:.0} |",
        n.iops, shared.iops, shared.p50_us, shared.p99_us
    );
    println!(
        "| ratio (shared/alone) | {:.2} | {:.2} | {:.2} |",
        shared.iops / alone.iops,
        shared.p50_us / alone.p50_us.max(1.0),
        shared.p99_us / alone.p99_us.max(1.0)
    );
    println!(
        "| (noisy volume: {:.0} IOPS alone, {:.0} next to the quiet one) | | | |",
        noisy_alone.iops, n.iops
    );
    card.shutdown();
    Ok(())
}

/// Options of `softcard bench qos`.
#[derive(Debug, clap::Args)]
pub struct QosBenchArgs {
    /// IOPS limit.
    #[arg(long, default_value_t = 1000)]
    iops: u64,
    /// Burst (requests).
    #[arg(long, default_value_t = 32)]
    burst: u64,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
}

/// `softcard bench qos`: how exactly an IOPS limit holds under
/// queue-depth-32 load.
pub fn qos(a: &QosBenchArgs) -> Result<()> {
    let sockets = tempfile::Builder::new().prefix("softcard-qos").tempdir()?;
    let card = StorageCard::open(&[DeviceConfig {
        name: "r".into(),
        kind: DeviceKind::Ram,
        path: None,
        size_bytes: Some(64 << 20),
        share_depth: None,
        read_zeroes: None,
        volatile_write_cache: None,
    }])?;
    card.create_volume("v", "r", 32 << 20)?;
    let sock = sockets.path().join("v.sock");
    card.attach(
        "v",
        &AttachOptions {
            socket: sock.clone(),
            queues: 1,
            qos: softcard_storage::qos::QosLimits {
                iops: Some(a.iops),
                iops_burst: Some(a.burst),
                ..Default::default()
            },
            interface: Default::default(),
        },
    )?;
    let w = Workload {
        name: "4k-randread-qd32",
        write: false,
        block: 4096,
        depth: 32,
        random: true,
    };
    let begin = Instant::now();
    let f = drive_card(&sock, w, a.seconds)?;
    let elapsed = begin.elapsed().as_secs_f64();
    let done = f.iops * elapsed;
    let expected = a.iops as f64 * a.seconds;
    println!(
        "# softcard bench qos: {} IOPS limit, burst {}, 4 KiB reads at QD32 for {} s",
        a.iops, a.burst, a.seconds
    );
    println!("| completed | expected (limit x time) | ratio | measured IOPS |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {done:.0} | {expected:.0} | {:.4} | {:.1} |",
        done / expected,
        f.iops
    );
    card.shutdown();
    Ok(())
}
