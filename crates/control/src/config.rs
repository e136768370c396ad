//! The card's TOML configuration.
//!
//! ```toml
//! api_socket = "/run/softcard/api.sock"
//!
//! [[device]]
//! name = "nvme0"
//! kind = "block"
//! path = "/dev/nvme0n1"
//!
//! [[device]]
//! name = "scratch"
//! kind = "file"
//! path = "/var/lib/softcard/scratch.img"
//! size = "64GiB"      # creates the file when missing
//!
//! [host]                # how this card runs a region's instances
//! name = "host-a"       # default: the machine's host name
//! vcpus = 8             # default: the machine's CPUs
//! memory = "16GiB"      # default: half the machine's memory
//! accel = "tcg"         # or "kvm"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use softcard_storage::crypto::keys::{validate_tenant, KekSource};
use softcard_storage::device::{DeviceConfig, DeviceKind};

use crate::size::parse_size;

/// Where the API listens when the configuration does not say.
pub const DEFAULT_API_SOCKET: &str = "/run/softcard/api.sock";

/// Errors reading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A size given as a number of bytes or a string such as `"10GiB"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: String,
    kind: DeviceKind,
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    size: Option<SizeValue>,
    #[serde(default)]
    share_depth: Option<u32>,
    #[serde(default)]
    read_zeroes: Option<bool>,
    #[serde(default)]
    volatile_write_cache: Option<softcard_storage::device::VolatileCacheConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: String,
    #[serde(default)]
    kek_file: Option<PathBuf>,
    #[serde(default)]
    kek_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    vcpus: Option<u32>,
    #[serde(default)]
    memory: Option<SizeValue>,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    qemu: Option<PathBuf>,
    #[serde(default)]
    accel: Option<String>,
}

/// How the card runs a region's instances (`[host]`); unset fields take
/// the machine's defaults when the daemon joins a region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSettings {
    /// The host's name in the region.
    pub name: Option<String>,
    /// vCPUs offered to instances.
    pub vcpus: Option<u32>,
    /// Memory offered to instances, bytes.
    pub memory_bytes: Option<u64>,
    /// Directory of instances and images.
    pub data_dir: Option<PathBuf>,
    /// QEMU's system emulator.
    pub qemu: Option<PathBuf>,
    /// `tcg` or `kvm`.
    pub accel: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    host: Option<RawHost>,
    #[serde(default)]
    api_socket: Option<PathBuf>,
    #[serde(default, rename = "device")]
    devices: Vec<RawDevice>,
    #[serde(default, rename = "tenant")]
    tenants: Vec<RawTenant>,
    #[serde(default)]
    metrics_listen: Option<std::net::SocketAddr>,
    #[serde(default)]
    rdma: Vec<RawRdma>,
    #[serde(default)]
    rdma_socket: Option<PathBuf>,
    #[serde(default)]
    state_file: Option<PathBuf>,
    #[serde(default)]
    queue_cpus: Vec<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRdma {
    #[serde(default)]
    name: Option<String>,
    address: std::net::Ipv4Addr,
    #[serde(default)]
    faults: Option<RdmaFaults>,
}

/// Faults the engine injects into the datagrams it sends, to test how the
/// protocol recovers (loss, duplication, reordering, corruption); per
/// million datagrams, from a seeded generator. For tests only: a card in
/// service has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RdmaFaults {
    /// The generator's seed.
    #[serde(default)]
    pub seed: u64,
    /// Datagrams dropped.
    #[serde(default)]
    pub drop_ppm: u32,
    /// Datagrams sent twice.
    #[serde(default)]
    pub dup_ppm: u32,
    /// Datagrams held back behind the next.
    #[serde(default)]
    pub reorder_ppm: u32,
    /// Datagrams with a flipped bit (the receiver's ICRC check drops them).
    #[serde(default)]
    pub corrupt_ppm: u32,
}

/// An RDMA device the card serves: a RoCEv2 engine on one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaConfig {
    /// Its verbs device name (`softcard0`, ...).
    pub name: String,
    /// The IPv4 address it serves (UDP port 4791); its GID is the
    /// IPv4-mapped form.
    pub address: std::net::Ipv4Addr,
    /// Injected faults (tests only).
    pub faults: Option<RdmaFaults>,
}

/// A parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardConfig {
    /// Unix socket of the management API.
    pub api_socket: PathBuf,
    /// Physical devices.
    pub devices: Vec<DeviceConfig>,
    /// Tenants and where their key-encryption keys come from.
    pub tenants: Vec<(String, KekSource)>,
    /// Address of the Prometheus endpoint, if any.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How instances run here.
    pub host: HostSettings,
    /// RDMA devices (`[[rdma]]`).
    pub rdma: Vec<RdmaConfig>,
    /// Unix socket the verbs library reaches the RDMA devices on (unset:
    /// the RDMA function's default, `/run/softcard/rdma.sock`).
    pub rdma_socket: Option<PathBuf>,
    /// Where the card records its attachments, so that a restarted daemon
    /// serves the same volumes on the same sockets (unset: not recorded).
    pub state_file: Option<PathBuf>,
    /// CPUs the vhost-user-blk queue workers are pinned to, in turn
    /// (empty: wherever the scheduler puts them).
    pub queue_cpus: Vec<usize>,
}

impl CardConfig {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let mut devices = Vec::with_capacity(raw.devices.len());
        for d in raw.devices {
            let size_bytes = match d.size {
                None => None,
                Some(SizeValue::Bytes(n)) => Some(n),
                Some(SizeValue::Text(t)) => Some(
                    parse_size(&t)
                        .map_err(|e| ConfigError::Invalid(format!("device {}: {e}", d.name)))?,
                ),
            };
            if devices.iter().any(|x: &DeviceConfig| x.name == d.name) {
                return Err(ConfigError::Invalid(format!(
                    "device name {:?} appears twice",
                    d.name
                )));
            }
            devices.push(DeviceConfig {
                name: d.name,
                kind: d.kind,
                path: d.path,
                size_bytes,
                share_depth: d.share_depth,
                read_zeroes: d.read_zeroes,
                volatile_write_cache: d.volatile_write_cache,
            });
        }
        let mut tenants: Vec<(String, KekSource)> = Vec::new();
        for t in raw.tenants {
            validate_tenant(&t.name).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if tenants.iter().any(|(n, _)| *n == t.name) {
                return Err(ConfigError::Invalid(format!(
                    "tenant {:?} appears twice",
                    t.name
                )));
            }
            let src = match (t.kek_file, t.kek_env) {
                (Some(f), None) => KekSource::File(f),
                (None, Some(e)) => KekSource::Env(e),
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "tenant {}: give exactly one of kek_file and kek_env",
                        t.name
                    )))
                }
            };
            tenants.push((t.name, src));
        }
        let h = raw.host.unwrap_or_default();
        if let Some(a) = &h.accel {
            if a != "tcg" && a != "kvm" {
                return Err(ConfigError::Invalid(format!(
                    "host accel {a:?}: tcg or kvm"
                )));
            }
        }
        let host = HostSettings {
            memory_bytes: match h.memory {
                None => None,
                Some(SizeValue::Bytes(n)) => Some(n),
                Some(SizeValue::Text(t)) => Some(
                    parse_size(&t)
                        .map_err(|e| ConfigError::Invalid(format!("host memory: {e}")))?,
                ),
            },
            name: h.name,
            vcpus: h.vcpus,
            data_dir: h.data_dir,
            qemu: h.qemu,
            accel: h.accel,
        };
        let mut rdma: Vec<RdmaConfig> = Vec::with_capacity(raw.rdma.len());
        for (i, r) in raw.rdma.into_iter().enumerate() {
            let name = r.name.unwrap_or_else(|| format!("softcard{i}"));
            let ok = !name.is_empty()
                && name.len() < 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "rdma device name {name:?}: 1 to 63 letters, digits, '-' or '_'"
                )));
            }
            if rdma
                .iter()
                .any(|o| o.name == name || o.address == r.address)
            {
                return Err(ConfigError::Invalid(format!(
                    "rdma device {name} ({}): name or address used twice",
                    r.address
                )));
            }
            if r.faults.is_some_and(|f| {
                [f.drop_ppm, f.dup_ppm, f.reorder_ppm, f.corrupt_ppm]
                    .iter()
                    .any(|p| *p > 1_000_000)
            }) {
                return Err(ConfigError::Invalid(format!(
                    "rdma device {name}: fault rates are per million (at most 1000000)"
                )));
            }
            rdma.push(RdmaConfig {
                name,
                address: r.address,
                faults: r.faults,
            });
        }
        Ok(CardConfig {
            host,
            tenants,
            rdma,
            rdma_socket: raw.rdma_socket,
            state_file: raw.state_file,
            queue_cpus: raw.queue_cpus,
            metrics_listen: raw.metrics_listen,
            api_socket: raw
                .api_socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCKET)),
            devices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_sizes() {
        let c = CardConfig::parse(
            r#"
            api_socket = "/tmp/x.sock"
            [[device]]
            name = "a"
            kind = "file"
            path = "/tmp/a.img"
            size = "2GiB"
            share_depth = 8
            [[device]]
            name = "n"
            kind = "null"
            size = 4096
            read_zeroes = false
            "#,
        )
        .unwrap();
        assert_eq!(c.api_socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.devices[0].size_bytes, Some(2 << 30));
        assert_eq!(c.devices[0].share_depth, Some(8));
        assert_eq!(c.devices[1].share_depth, None);
        assert_eq!(c.devices[1].kind, DeviceKind::Null);
        assert_eq!(c.devices[1].size_bytes, Some(4096));
        assert_eq!(c.devices[1].read_zeroes, Some(false));
        assert_eq!(c.devices[0].read_zeroes, None);
    }

    #[test]
    fn queue_cpus_are_optional() {
        assert!(CardConfig::parse("").unwrap().queue_cpus.is_empty());
        let c = CardConfig::parse("queue_cpus = [1, 3]").unwrap();
        assert_eq!(c.queue_cpus, vec![1, 3]);
        assert!(CardConfig::parse("queue_cpus = [-1]").is_err());
        assert!(CardConfig::parse("queue_cpus = 1").is_err());
    }

    #[test]
    fn refuses_bad_configs() {
        for bad in [
            "[[device]]\nname='a'\nkind='floppy'",
            "[[device]]\nname='a'\nkind='null'\nsize='3 bananas'",
            "[[device]]\nname='a'\nkind='null'\nsize=1\nbogus=1",
            "[[device]]\nname='a'\nkind='null'\nsize=1\nshare_depth=-1",
            "[[device]]\nname='a'\nkind='null'\n[[device]]\nname='a'\nkind='ram'",
            "api_socket = 5",
            "[[tenant]]\nname='t'",
            "[[tenant]]\nname='t'\nkek_file='/a'\nkek_env='B'",
            "[[tenant]]\nname='bad/name'\nkek_env='B'",
            "[host]\naccel='hvf'",
            "[host]\nmemory='lots'",
            "[host]\nsurprise=1",
            "[[rdma]]\naddress='10.0.0.1'\nfaults={drop_ppm=1000001}",
            "[[rdma]]\naddress='10.0.0.1'\nfaults={lose=1}",
            "[[rdma]]\naddress='10.0.0.1'\n[[rdma]]\naddress='10.0.0.1'",
        ] {
            assert!(CardConfig::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn rdma_devices_take_test_faults() {
        let c = CardConfig::parse(
            "[[rdma]]\naddress='10.0.0.1'\nfaults={seed=3, drop_ppm=10, corrupt_ppm=20}\n[[rdma]]\naddress='10.0.0.2'",
        )
        .unwrap();
        assert_eq!(c.rdma[0].name, "softcard0");
        assert_eq!(
            c.rdma[0].faults,
            Some(RdmaFaults {
                seed: 3,
                drop_ppm: 10,
                corrupt_ppm: 20,
                ..RdmaFaults::default()
            })
        );
        assert_eq!(
            (c.rdma[1].name.as_str(), c.rdma[1].faults),
            ("softcard1", None)
        );
    }
}
