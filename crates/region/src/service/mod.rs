//! What the region does, over its store: credentials, tenants, hosts
//! (here), instances ([`instances`]) and volumes ([`volumes`]). Every change
//! that touches more than one record is one store transaction guarded by
//! the revisions it read, so concurrent regions and racing requests can
//! never both win.

pub mod frames;
pub mod gpus;
pub mod instances;
pub mod vgpus;
pub mod volumes;

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{RegionError, Result};
use crate::model::{
    keys, now, valid_name, Credential, Host, HostRegistration, Principal, Tenant, Usage,
};
use crate::placement::Placement;
use crate::store::{Compare, KeyValue, Op, Store};

/// How long a host stays up without a heartbeat. Hosts heartbeat every
/// third of it.
pub const HOST_LEASE: Duration = Duration::from_secs(10);

/// The control plane's logic, shared by every API request.
#[derive(Debug)]
pub struct Region {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) placement: Placement,
    pub(crate) host_lease: Duration,
    /// Credentials checked recently: hash -> (principal, when checked).
    credentials:
        std::sync::Mutex<std::collections::HashMap<String, (Principal, std::time::Instant)>>,
    /// The authority GPU servers' certificates are signed by.
    pub(crate) ca: crate::ca::Authority,
    /// Clients of GPU servers' frames endpoints.
    frame_clients: frames::FrameClients,
}

/// How long a checked credential is trusted without asking the store
/// again (a tenant removed from the store loses access within this).
const CREDENTIAL_CACHE: Duration = Duration::from_secs(5);
/// Most credentials remembered.
const CREDENTIAL_CACHE_ENTRIES: usize = 4096;

/// A tenant's record that callers name by id or by the tenant's name.
pub(crate) trait Owned: Serialize + DeserializeOwned {
    /// What it is called in messages and name keys (`instance`).
    const KIND: &'static str;
    /// Its ids' prefix (`i-`).
    const ID_PREFIX: &'static str;
    /// Its store key.
    fn key(id: &str) -> String;
    /// Its id.
    fn id(&self) -> &str;
    /// Its tenant.
    fn tenant(&self) -> &str;
}

impl Owned for crate::model::Instance {
    const KIND: &'static str = "instance";
    const ID_PREFIX: &'static str = "i-";
    fn key(id: &str) -> String {
        keys::instance(id)
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn tenant(&self) -> &str {
        &self.tenant
    }
}

impl Owned for crate::model::Volume {
    const KIND: &'static str = "volume";
    const ID_PREFIX: &'static str = "vol-";
    fn key(id: &str) -> String {
        keys::volume(id)
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn tenant(&self) -> &str {
        &self.tenant
    }
}

/// Decodes a stored record.
pub(crate) fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| {
        RegionError::Store(crate::store::StoreError::Backend(format!(
            "record {}: {e}",
            kv.key
        )))
    })
}

/// Encodes a record.
pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// The SHA-256 of a credential's secret: the key it is stored under.
pub(crate) fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new credential secret: `sc_` and 64 hex digits (256 random bits).
pub(crate) fn new_secret() -> String {
    format!("sc_{}", hex::encode(rand::random::<[u8; 32]>()))
}

impl Region {
    /// A tenant's record by id or by the tenant's name for it; another
    /// tenant's is "not found", as an unknown one is.
    pub(crate) async fn owned<T: Owned>(
        &self,
        tenant: Option<&str>,
        id_or_name: &str,
    ) -> Result<instances::Versioned<T>> {
        let kind = T::KIND;
        let not_found = || RegionError::NotFound(format!("no {kind} {id_or_name}"));
        let id = if id_or_name.starts_with(T::ID_PREFIX) {
            id_or_name.to_owned()
        } else {
            let t = tenant
                .ok_or_else(|| RegionError::Invalid(format!("the admin names {kind}s by id")))?;
            if !valid_name(id_or_name) {
                return Err(not_found());
            }
            let kv = self
                .store
                .get(&keys::name(t, kind, id_or_name))
                .await?
                .ok_or_else(not_found)?;
            String::from_utf8_lossy(&kv.value).into_owned()
        };
        if id.len() > 40 || id.contains('/') {
            return Err(not_found());
        }
        let v = instances::read::<T>(self, &T::key(&id))
            .await?
            .ok_or_else(not_found)?;
        if !instances::visible(tenant, v.value.tenant()) {
            return Err(not_found());
        }
        Ok(v)
    }

    /// Changes a tenant's record by compare-and-swap, retrying when
    /// another change came first; `change` says whether it changed it.
    pub(crate) async fn update<T: Owned>(
        &self,
        tenant: Option<&str>,
        id_or_name: &str,
        change: impl Fn(&mut T) -> Result<bool>,
    ) -> Result<T> {
        loop {
            let v = self.owned::<T>(tenant, id_or_name).await?;
            let mut x = v.value;
            if !change(&mut x)? {
                return Ok(x);
            }
            let key = T::key(x.id());
            let r = self
                .store
                .txn(
                    vec![Compare::ModRevision(key.clone(), v.revision)],
                    vec![Op::put(key, encode(&x))],
                    vec![],
                )
                .await?;
            if r.succeeded {
                return Ok(x);
            }
        }
    }

    /// The region over `store`, with its placement view loaded.
    pub async fn new(store: Arc<dyn Store>, host_lease: Duration) -> Result<Arc<Self>> {
        let placement = Placement::load(&*store).await?;
        let ca = Self::load_ca(&*store).await?;
        let region = Arc::new(Region {
            store,
            placement,
            host_lease,
            credentials: std::sync::Mutex::default(),
            ca,
            frame_clients: frames::FrameClients::default(),
        });
        Placement::follow(&region);
        Ok(region)
    }

    /// The region's certificate authority from the store; the first
    /// region to start makes it (one transaction: concurrent first starts
    /// agree on one).
    async fn load_ca(store: &dyn Store) -> Result<crate::ca::Authority> {
        let key = keys::ca();
        loop {
            if let Some(kv) = store.get(&key).await? {
                return decode(&kv);
            }
            let ca = crate::ca::Authority::generate()
                .map_err(|e| RegionError::Store(crate::store::StoreError::Backend(e)))?;
            store
                .txn(
                    vec![Compare::Absent(key.clone())],
                    vec![Op::put(key.clone(), encode(&ca))],
                    vec![],
                )
                .await?;
        }
    }

    /// The PEM certificate instances trust for their vGPUs.
    pub fn ca_certificate(&self) -> &str {
        &self.ca.cert_pem
    }

    /// Signs GPU server `name`'s certificate signing request: a server
    /// certificate for [`crate::ca::gpu_server_name`]`(name)`.
    pub fn sign_gpu_server(&self, name: &str, csr_pem: &str) -> Result<Value> {
        let server_name = crate::ca::gpu_server_name(name);
        let cert = self
            .ca
            .sign_server(csr_pem, &server_name, crate::ca::SERVER_CERT_LIFETIME)
            .map_err(RegionError::Invalid)?;
        Ok(json!({
            "certificate": cert,
            "ca": self.ca.cert_pem,
            "server_name": server_name,
            "gpu_server": name,
            "lifetime_seconds": crate::ca::SERVER_CERT_LIFETIME.as_secs(),
        }))
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    // ----- credentials -----

    /// Who `secret` speaks for.
    pub async fn authenticate(&self, secret: &str) -> Result<Principal> {
        if !secret.starts_with("sc_") || secret.len() != 67 {
            return Err(RegionError::Unauthenticated);
        }
        let hash = secret_hash(secret);
        let cached = {
            let cache = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .get(&hash)
                .filter(|(_, at)| at.elapsed() < CREDENTIAL_CACHE)
                .map(|(p, _)| p.clone())
        };
        if let Some(p) = cached {
            return Ok(p);
        }
        let kv = self
            .store
            .get(&keys::credential(&hash))
            .await?
            .ok_or(RegionError::Unauthenticated)?;
        let c: Credential = decode(&kv)?;
        if let Principal::Tenant(t) = &c.principal {
            // A deleted tenant's credentials die with it.
            if self.store.get(&keys::tenant(t)).await?.is_none() {
                return Err(RegionError::Unauthenticated);
            }
        }
        let mut cache = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CREDENTIAL_CACHE_ENTRIES {
            cache.retain(|_, (_, at)| at.elapsed() < CREDENTIAL_CACHE);
            if cache.len() >= CREDENTIAL_CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(hash, (c.principal.clone(), std::time::Instant::now()));
        Ok(c.principal)
    }

    /// A new credential for `principal`; the secret is returned once and
    /// only its hash is kept.
    pub async fn create_credential(&self, principal: Principal) -> Result<String> {
        match &principal {
            Principal::Tenant(t) if self.store.get(&keys::tenant(t)).await?.is_none() => {
                return Err(RegionError::NotFound(format!("no tenant {t}")));
            }
            Principal::Host(h) | Principal::Tenant(h) | Principal::GpuServer(h)
                if !valid_name(h) =>
            {
                return Err(RegionError::Invalid(format!("invalid name {h:?}")));
            }
            _ => {}
        }
        let secret = new_secret();
        let c = Credential {
            principal,
            created: now(),
        };
        self.store
            .put(&keys::credential(&secret_hash(&secret)), encode(&c))
            .await?;
        Ok(secret)
    }

    /// Makes sure the admin credential in `path` exists and is known:
    /// created (and written to a file only its owner can read) at first
    /// start, registered again if the store is new.
    pub async fn ensure_admin_credential(&self, path: &std::path::Path) -> Result<String> {
        let io = |e: std::io::Error| RegionError::Invalid(format!("{}: {e}", path.display()));
        let secret = match std::fs::read_to_string(path) {
            Ok(s) => s.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = new_secret();
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                writeln!(f, "{secret}").map_err(io)?;
                secret
            }
            Err(e) => return Err(io(e)),
        };
        let key = keys::credential(&secret_hash(&secret));
        let c = Credential {
            principal: Principal::Admin,
            created: now(),
        };
        self.store
            .txn(
                vec![Compare::Absent(key.clone())],
                vec![Op::put(key, encode(&c))],
                vec![],
            )
            .await?;
        Ok(secret)
    }

    // ----- tenants -----

    /// Creates a tenant.
    pub async fn create_tenant(&self, name: &str) -> Result<Tenant> {
        if !valid_name(name) {
            return Err(RegionError::Invalid(format!(
                "invalid tenant name {name:?}: 1-63 of a-z, 0-9 and -"
            )));
        }
        let t = Tenant {
            name: name.to_owned(),
            created: now(),
        };
        let key = keys::tenant(name);
        let r = self
            .store
            .txn(
                vec![Compare::Absent(key.clone())],
                vec![Op::put(key, encode(&t))],
                vec![],
            )
            .await?;
        if !r.succeeded {
            return Err(RegionError::Conflict(format!("tenant {name} exists")));
        }
        Ok(t)
    }

    /// Every tenant.
    pub async fn tenants(&self) -> Result<Vec<Tenant>> {
        let (kvs, _) = self.store.range(&keys::tenant("")).await?;
        kvs.iter().map(decode).collect()
    }

    // ----- hosts -----

    /// A host (re-)registers: its record, a fresh lease with its liveness
    /// key, and its usage record if it has none. Returns the lease's
    /// time-to-live.
    pub async fn register_host(&self, name: &str, offer: HostRegistration) -> Result<Duration> {
        if !valid_name(name) {
            return Err(RegionError::Invalid(format!("invalid host name {name:?}")));
        }
        if offer
            .devices
            .iter()
            .any(|d| d.name.is_empty() || d.name.len() > 64)
        {
            return Err(RegionError::Invalid("invalid device name".into()));
        }
        let lease = self.store.grant(self.host_lease).await?;
        let host = Host {
            name: name.to_owned(),
            offer,
            registered: now(),
            last_seen: None,
        };
        // The usage record is created once and kept: it is what the
        // host's instances and volumes hold.
        let usage_key = keys::usage(name);
        let mut ops = vec![
            Op::put(keys::host(name), encode(&host)),
            Op::Put {
                key: keys::alive(name),
                value: now().to_string().into_bytes(),
                lease,
            },
        ];
        if self.store.get(&usage_key).await?.is_none() {
            ops.push(Op::put(usage_key, encode(&Usage::default())));
        }
        self.store.txn(vec![], ops, vec![]).await?;
        log::info!("host {name} registered");
        Ok(self.host_lease)
    }

    /// A host's heartbeat: renews its lease. NotFound when the lease is
    /// gone (the host must register again).
    pub async fn heartbeat(&self, name: &str) -> Result<()> {
        let kv = self.store.get(&keys::alive(name)).await?.ok_or_else(|| {
            RegionError::NotFound(format!(
                "host {name} is not registered (lease expired): register again"
            ))
        })?;
        self.store.keep_alive(kv.lease).await.map_err(|_| {
            RegionError::NotFound(format!("host {name}'s lease expired: register again"))
        })
    }

    /// Every host with its state, capacity and allocations.
    pub async fn hosts(&self) -> Result<Vec<Value>> {
        let (hosts, _) = self.store.range(&keys::hosts()).await?;
        let alive = self.alive_hosts().await?;
        let (usages, _) = self.store.range(&keys::usages()).await?;
        let usage_of = |h: &str| -> Result<Usage> {
            usages
                .iter()
                .find(|kv| kv.key == keys::usage(h))
                .map_or(Ok(Usage::default()), decode)
        };
        hosts
            .iter()
            .map(|kv| {
                let h: Host = decode(kv)?;
                let u = usage_of(&h.name)?;
                let up = alive.contains(&h.name);
                Ok(json!({
                    "name": h.name,
                    "state": if up { "up" } else { "down" },
                    "last_seen": if up { None } else { h.last_seen },
                    "registered": h.registered,
                    "vcpus": h.offer.vcpus,
                    "memory_mib": h.offer.memory_mib,
                    "vcpus_used": u.vcpus,
                    "memory_mib_used": u.memory_mib,
                    "devices": h.offer.devices.iter().map(|d| json!({
                        "name": d.name,
                        "capacity_bytes": d.capacity_bytes,
                        "used_bytes": u.device_bytes.get(&d.name).copied().unwrap_or(0),
                    })).collect::<Vec<_>>(),
                }))
            })
            .collect()
    }

    /// Names of the hosts whose lease is alive.
    pub async fn alive_hosts(&self) -> Result<std::collections::BTreeSet<String>> {
        let (alive, _) = self.store.range(&keys::alives()).await?;
        Ok(alive
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(&keys::alives()).map(str::to_owned))
            .collect())
    }
}
