//! The region's records, as stored (JSON under `/sc/v1/`) and as served,
//! with the names and states users know from EC2 and OpenStack.

use serde::{Deserialize, Serialize};

/// Root of every key the region writes.
pub const ROOT: &str = "/sc/v1/";

/// Store keys, one function per kind of record.
pub mod keys {
    use super::ROOT;

    /// A tenant.
    pub fn tenant(t: &str) -> String {
        format!("{ROOT}tenants/{t}")
    }
    /// A credential, by the SHA-256 of its secret.
    pub fn credential(hash: &str) -> String {
        format!("{ROOT}credentials/{hash}")
    }
    /// A host's registration.
    pub fn host(h: &str) -> String {
        format!("{ROOT}hosts/{h}")
    }
    /// Prefix of every host.
    pub fn hosts() -> String {
        format!("{ROOT}hosts/")
    }
    /// A host's liveness key, attached to its lease.
    pub fn alive(h: &str) -> String {
        format!("{ROOT}alive/{h}")
    }
    /// Prefix of the liveness keys.
    pub fn alives() -> String {
        format!("{ROOT}alive/")
    }
    /// What is allocated on a host: the compare-and-swap target of a claim
    /// (its `mod_revision` is Placement's provider generation).
    pub fn usage(h: &str) -> String {
        format!("{ROOT}usage/{h}")
    }
    /// Prefix of the usage records.
    pub fn usages() -> String {
        format!("{ROOT}usage/")
    }
    /// An instance.
    pub fn instance(id: &str) -> String {
        format!("{ROOT}instances/{id}")
    }
    /// Prefix of every instance.
    pub fn instances() -> String {
        format!("{ROOT}instances/")
    }
    /// An instance's captured serial console (the tail).
    pub fn console(id: &str) -> String {
        format!("{ROOT}console/{id}")
    }
    /// A volume.
    pub fn volume(id: &str) -> String {
        format!("{ROOT}volumes/{id}")
    }
    /// Prefix of every volume.
    pub fn volumes() -> String {
        format!("{ROOT}volumes/")
    }
    /// A tenant's name for a live resource (`instance` or `volume`).
    pub fn name(tenant: &str, kind: &str, name: &str) -> String {
        format!("{ROOT}names/{tenant}/{kind}/{name}")
    }
    /// A tenant's client token.
    pub fn client_token(tenant: &str, token: &str) -> String {
        format!("{ROOT}tokens/{tenant}/{token}")
    }
    /// A GPU server's registration.
    pub fn gpu_server(g: &str) -> String {
        format!("{ROOT}gpu-servers/{g}")
    }
    /// Prefix of every GPU server.
    pub fn gpu_servers() -> String {
        format!("{ROOT}gpu-servers/")
    }
    /// A GPU server's liveness key, attached to its lease.
    pub fn gpu_alive(g: &str) -> String {
        format!("{ROOT}gpu-alive/{g}")
    }
    /// Prefix of the GPU servers' liveness keys.
    pub fn gpu_alives() -> String {
        format!("{ROOT}gpu-alive/")
    }
    /// What is allocated on a GPU server's adapters (the claim's
    /// compare-and-swap target, as a host's usage).
    pub fn gpu_usage(g: &str) -> String {
        format!("{ROOT}gpu-usage/{g}")
    }
    /// Prefix of the GPU usage records.
    pub fn gpu_usages() -> String {
        format!("{ROOT}gpu-usage/")
    }
    /// A vGPU attachment.
    pub fn vgpu(id: &str) -> String {
        format!("{ROOT}vgpus/{id}")
    }
    /// Prefix of the vGPU attachments.
    pub fn vgpus() -> String {
        format!("{ROOT}vgpus/")
    }
    /// A vGPU attachment's credential, for its instance (removed when the
    /// attachment is revoked).
    pub fn vgpu_secret(id: &str) -> String {
        format!("{ROOT}vgpu-secrets/{id}")
    }
    /// An index entry: a `kind` (`instance`, `volume`) with `id` lives on
    /// `host` (what a host's work is read from, without a scan).
    pub fn placed(host: &str, kind: &str, id: &str) -> String {
        format!("{ROOT}placed/{host}/{kind}/{id}")
    }
    /// Prefix of a host's index entries.
    pub fn placed_on(host: &str) -> String {
        format!("{ROOT}placed/{host}/")
    }
    /// The region's certificate authority (certificate and key).
    pub fn ca() -> String {
        format!("{ROOT}ca")
    }
    /// The leader's key, attached to the leader's lease.
    pub fn leader() -> String {
        format!("{ROOT}leader")
    }
}

/// Who a credential speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "lowercase")]
pub enum Principal {
    /// The operator.
    Admin,
    /// A tenant.
    Tenant(String),
    /// A host's card daemon.
    Host(String),
    /// A GPU server.
    #[serde(rename = "gpu-server")]
    GpuServer(String),
}

/// A stored credential (the secret itself is never stored).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credential {
    /// Who it speaks for.
    pub principal: Principal,
    /// When it was made (Unix seconds).
    pub created: u64,
}

/// A tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tenant {
    /// Its name.
    pub name: String,
    /// When it was made (Unix seconds).
    pub created: u64,
}

/// A device a host offers volumes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDevice {
    /// The card's name for it.
    pub name: String,
    /// Bytes the region may place volumes in.
    pub capacity_bytes: u64,
}

/// What a host's card daemon reports when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRegistration {
    /// vCPUs it offers to instances.
    pub vcpus: u32,
    /// Memory it offers to instances, MiB.
    pub memory_mib: u64,
    /// Its devices.
    pub devices: Vec<HostDevice>,
}

/// A host as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    /// Its name.
    pub name: String,
    /// What it offers.
    #[serde(flatten)]
    pub offer: HostRegistration,
    /// When it last registered (Unix seconds).
    pub registered: u64,
    /// When the region last knew it alive, set when its lease expired.
    #[serde(default)]
    pub last_seen: Option<u64>,
}

/// A physical GPU a GPU server offers as a resource provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuAdapter {
    /// The adapter's name (`llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// wgpu's backend (`Vulkan`).
    pub backend: String,
    /// Kind of device (`Cpu`, `DiscreteGpu`, ...).
    pub device_type: String,
    /// GPU memory it offers to vGPUs, bytes.
    pub memory_bytes: u64,
    /// Its class: traits placement may ask for (`CUSTOM_LAVAPIPE`, ...).
    #[serde(default)]
    pub traits: Vec<String>,
    /// The wgpu features a vGPU on it offers (`SHADER_F16`, ...).
    #[serde(default)]
    pub features: Vec<String>,
    /// The limits a vGPU on it offers, by wgpu's names
    /// (`max_buffer_size`, ...).
    #[serde(default)]
    pub limits: std::collections::BTreeMap<String, u64>,
}

/// What a GPU server reports when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuServerRegistration {
    /// Where vGPU clients connect (`host:port`).
    pub endpoint: String,
    /// Where the region reads attachments' frames (`host:port`, HTTPS),
    /// for the console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames_endpoint: Option<String>,
    /// Its adapters.
    pub adapters: Vec<GpuAdapter>,
}

/// A GPU server as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuServer {
    /// Its name.
    pub name: String,
    /// What it offers.
    #[serde(flatten)]
    pub offer: GpuServerRegistration,
    /// When it last registered (Unix seconds).
    pub registered: u64,
}

/// GPU memory allocated on a GPU server, per adapter name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuUsage {
    /// Bytes allocated to vGPUs, per adapter.
    #[serde(default)]
    pub adapter_bytes: std::collections::BTreeMap<String, u64>,
}

/// A vGPU type: GPU memory, in the manner of Elastic GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VgpuType {
    /// Its name (`eg1.medium`).
    pub name: &'static str,
    /// GPU memory, bytes.
    pub memory_bytes: u64,
}

/// The vGPU types the region offers.
pub const VGPU_TYPES: &[VgpuType] = &[
    VgpuType {
        name: "eg1.medium",
        memory_bytes: 1 << 30,
    },
    VgpuType {
        name: "eg1.large",
        memory_bytes: 2 << 30,
    },
    VgpuType {
        name: "eg1.xlarge",
        memory_bytes: 4 << 30,
    },
    VgpuType {
        name: "eg1.2xlarge",
        memory_bytes: 8 << 30,
    },
];

/// A vGPU type by name.
pub fn vgpu_type(name: &str) -> Option<VgpuType> {
    VGPU_TYPES.iter().copied().find(|t| t.name == name)
}

/// A vGPU attachment's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VgpuState {
    /// Being attached.
    Attaching,
    /// Attached: its GPU memory is claimed on an adapter.
    Attached,
    /// Being detached.
    Detaching,
    /// Gone (its memory given back).
    Detached,
}

/// A vGPU attached to an instance, backed by an adapter of a GPU server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vgpu {
    /// `egpu-` and 16 hex digits.
    pub id: String,
    /// Owner.
    pub tenant: String,
    /// The instance.
    pub instance: String,
    /// The vGPU type.
    pub vgpu_type: String,
    /// Its GPU memory, bytes.
    pub memory_bytes: u64,
    /// The GPU server.
    pub server: String,
    /// The adapter of that server.
    pub adapter: String,
    /// Where the instance's application connects.
    pub endpoint: String,
    /// State.
    pub state: VgpuState,
    /// When it was attached (Unix seconds).
    pub created: u64,
    /// SHA-256 of its credential (the GPU server admits a session that
    /// presents the credential; the secret is kept apart, for the instance).
    #[serde(default)]
    pub credential_hash: String,
}

/// What is allocated on a host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// vCPUs allocated to instances.
    pub vcpus: u32,
    /// Memory allocated to instances, MiB.
    pub memory_mib: u64,
    /// Bytes allocated to volumes, per device.
    #[serde(default)]
    pub device_bytes: std::collections::BTreeMap<String, u64>,
}

/// An instance type: vCPUs and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InstanceType {
    /// Its name (`sc1.small`).
    pub name: &'static str,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
}

/// The instance types the region offers.
pub const INSTANCE_TYPES: &[InstanceType] = &[
    InstanceType {
        name: "sc1.micro",
        vcpus: 1,
        memory_mib: 256,
    },
    InstanceType {
        name: "sc1.small",
        vcpus: 1,
        memory_mib: 512,
    },
    InstanceType {
        name: "sc1.medium",
        vcpus: 2,
        memory_mib: 1024,
    },
    InstanceType {
        name: "sc1.large",
        vcpus: 2,
        memory_mib: 2048,
    },
];

/// An instance type by name.
pub fn instance_type(name: &str) -> Option<InstanceType> {
    INSTANCE_TYPES.iter().copied().find(|t| t.name == name)
}

/// An image instances boot from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Image {
    /// Its name.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
}

/// The built-in images: hosts build them from their own kernel.
pub const IMAGES: &[Image] = &[
    Image {
        name: "default",
        description: "the host's Debian kernel and a busybox initramfs built by softcard; \
                      its init reports every virtio disk it sees on the console and stamps \
                      blank ones (docs/region.md)",
    },
    Image {
        name: "gpu-demo",
        description: "as default, with softcard inside: at boot it runs the wgpu demo render \
                      loop on the instance's vGPU, with the endpoint and credential from the \
                      metadata service (give the instance a vGPU)",
    },
];

/// EC2's instance states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Placed; the host is starting it.
    Pending,
    /// Its VM runs.
    Running,
    /// Being terminated.
    ShuttingDown,
    /// Gone (the record stays visible).
    Terminated,
    /// Being stopped.
    Stopping,
    /// Its VM is off; it keeps its host and volumes.
    Stopped,
}

impl InstanceState {
    /// EC2's code for the state.
    pub fn code(self) -> u16 {
        match self {
            InstanceState::Pending => 0,
            InstanceState::Running => 16,
            InstanceState::ShuttingDown => 32,
            InstanceState::Terminated => 48,
            InstanceState::Stopping => 64,
            InstanceState::Stopped => 80,
        }
    }

    /// The state's name.
    pub fn name(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::ShuttingDown => "shutting-down",
            InstanceState::Terminated => "terminated",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
        }
    }

    /// Whether the state is on its way to another.
    pub fn transitional(self) -> bool {
        matches!(
            self,
            InstanceState::Pending | InstanceState::ShuttingDown | InstanceState::Stopping
        )
    }
}

/// An instance as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    /// `i-` and 16 hex digits.
    pub id: String,
    /// The tenant's name for it.
    pub name: String,
    /// Owner.
    pub tenant: String,
    /// Instance type.
    pub instance_type: String,
    /// vCPUs (from the type).
    pub vcpus: u32,
    /// Memory, MiB (from the type).
    pub memory_mib: u64,
    /// Image name.
    pub image: String,
    /// The host it was placed on.
    pub host: String,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Why it is in that state, when not by request (EC2's StateReason).
    #[serde(default)]
    pub state_reason: Option<String>,
    /// Its boot volume's id.
    pub boot_volume: String,
    /// Keep the boot volume when terminated.
    #[serde(default)]
    pub keep_boot_volume: bool,
    /// Encrypt the boot volume under the tenant's key.
    #[serde(default)]
    pub encrypted: bool,
    /// Reboots asked for; the host applies each once.
    #[serde(default)]
    pub reboots: u32,
    /// When it was made (Unix seconds).
    pub created: u64,
    /// The client token it was made with.
    #[serde(default)]
    pub client_token: Option<String>,
    /// Its vGPU attachment's id.
    #[serde(default)]
    pub vgpu: Option<String>,
}

/// EBS's volume states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// The host is making it.
    Creating,
    /// Made, attached to nothing.
    Available,
    /// Attached to an instance.
    InUse,
    /// The host is removing it.
    Deleting,
    /// Gone.
    Deleted,
    /// The host could not make it.
    Error,
}

/// EBS's attachment states (and `busy`: the guest holds the disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachmentState {
    /// Being plugged in.
    Attaching,
    /// Plugged in; the guest sees it.
    Attached,
    /// Being unplugged.
    Detaching,
    /// The guest did not release it; a forced detach removes it.
    Busy,
}

/// A volume's attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The instance.
    pub instance: String,
    /// Its state.
    pub state: AttachmentState,
    /// Unplug even if the guest does not release it.
    #[serde(default)]
    pub force: bool,
}

/// A volume as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Volume {
    /// `vol-` and 16 hex digits; also its name on the card.
    pub id: String,
    /// The tenant's name for it.
    pub name: String,
    /// Owner.
    pub tenant: String,
    /// Host it lives on.
    pub host: String,
    /// Device of that host.
    pub device: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Encrypted under the tenant's key.
    #[serde(default)]
    pub encrypted: bool,
    /// State.
    pub state: VolumeState,
    /// Why it is in `error`.
    #[serde(default)]
    pub state_reason: Option<String>,
    /// The instance it is attached to.
    #[serde(default)]
    pub attachment: Option<Attachment>,
    /// The boot volume of this instance.
    #[serde(default)]
    pub boot_of: Option<String>,
    /// When it was made (Unix seconds).
    pub created: u64,
}

/// Names users give: 1 to 63 of `a-z 0-9 -`, starting with a letter or
/// digit (a DNS label).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

/// Now, in Unix seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A new id: `prefix-` and 16 random hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("web1"));
        assert!(valid_name("a-b-c"));
        for bad in ["", "-x", "Web", "a_b", "a b", "../x", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn ec2_codes() {
        let s: Vec<(u16, &str)> = [
            InstanceState::Pending,
            InstanceState::Running,
            InstanceState::ShuttingDown,
            InstanceState::Terminated,
            InstanceState::Stopping,
            InstanceState::Stopped,
        ]
        .iter()
        .map(|s| (s.code(), s.name()))
        .collect();
        assert_eq!(
            s,
            [
                (0, "pending"),
                (16, "running"),
                (32, "shutting-down"),
                (48, "terminated"),
                (64, "stopping"),
                (80, "stopped")
            ]
        );
        assert_eq!(
            serde_json::to_string(&InstanceState::ShuttingDown).unwrap(),
            "\"shutting-down\""
        );
    }
}
