//! Placement: which host gets an instance or a volume. The region keeps a
//! view of every host's offer, liveness and usage, followed through store
//! watches, so choosing costs no store round trip; the choice is then
//! claimed with a transaction that compares the host's usage revision
//! (OpenStack Placement's provider generation). A stale view only costs a
//! failed claim, after which the host's usage is refreshed and the next
//! candidate tried, as Nova's scheduler does.
//!
//! Policy: instances spread (the hosts with the most free vCPUs and memory
//! first), picking at random among the best few so that concurrent
//! requests rarely race for one host; a volume goes to the device with the
//! most free bytes. docs/region.md says how to change it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use rand::seq::SliceRandom;

use crate::error::Result;
use crate::model::{
    keys, GpuServer, GpuServerRegistration, GpuUsage, Host, HostRegistration, Usage,
};
use crate::service::{decode, Region};
use crate::store::{Event, KeyValue, Revision, Store};

/// A request picks at random among the candidates whose weight is within
/// this fraction of the best (hosts about as free as the freest), so that
/// concurrent requests rarely race for one host while instances still
/// spread.
const SPREAD_TOLERANCE: f64 = 0.05;

/// What a request needs from one host.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Bytes on one device of the host (0: none).
    pub disk_bytes: u64,
    /// Only this host (a volume near an instance, `--host`).
    pub host: Option<String>,
}

/// A host that can take a request, with the claim to make.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The host.
    pub host: String,
    /// The device for the disk bytes (empty when none were asked for).
    pub device: String,
    /// The host's usage after the claim.
    pub usage: Usage,
    /// The usage record's revision the claim compares.
    pub usage_revision: Revision,
}

#[derive(Debug, Default, Clone)]
struct HostView {
    offer: Option<HostRegistration>,
    alive: bool,
    usage: Usage,
    usage_revision: Revision,
}

#[derive(Debug, Default, Clone)]
struct GpuView {
    offer: Option<GpuServerRegistration>,
    alive: bool,
    usage: GpuUsage,
    usage_revision: Revision,
}

/// An adapter that can take a vGPU, with the claim to make.
#[derive(Debug, Clone)]
pub struct GpuChoice {
    /// The GPU server.
    pub server: String,
    /// Its adapter.
    pub adapter: String,
    /// Where clients connect.
    pub endpoint: String,
    /// The server's usage after the claim.
    pub usage: GpuUsage,
    /// The usage record's revision the claim compares (0: no record yet).
    pub usage_revision: Revision,
}

/// The placement view.
#[derive(Debug, Default)]
pub struct Placement {
    hosts: Mutex<BTreeMap<String, HostView>>,
    gpus: Mutex<BTreeMap<String, GpuView>>,
    /// Claims that lost a race and were retried.
    pub conflicts: std::sync::atomic::AtomicU64,
}

impl Placement {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, HostView>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The view as the store has it now.
    pub async fn load(store: &dyn Store) -> Result<Self> {
        let p = Placement::default();
        p.reload(store).await?;
        Ok(p)
    }

    /// Reads the whole view again from the store (when a request found no
    /// candidate: the watches may not have delivered a host that just
    /// registered).
    pub async fn reload(&self, store: &dyn Store) -> Result<()> {
        let (alive, _) = store.range(&keys::alives()).await?;
        for v in self.lock().values_mut() {
            v.alive = false;
        }
        for kv in alive {
            self.apply(&Event::Put(kv));
        }
        let (alive, _) = store.range(&keys::gpu_alives()).await?;
        for v in self.gpus().values_mut() {
            v.alive = false;
        }
        for kv in alive {
            self.apply(&Event::Put(kv));
        }
        for prefix in [
            keys::hosts(),
            keys::usages(),
            keys::gpu_servers(),
            keys::gpu_usages(),
        ] {
            let (kvs, _) = store.range(&prefix).await?;
            for kv in kvs {
                self.apply(&Event::Put(kv));
            }
        }
        Ok(())
    }

    /// Keeps the region's view current from store watches, for as long as
    /// the region lives.
    pub fn follow(region: &Arc<Region>) {
        for prefix in [
            keys::hosts(),
            keys::alives(),
            keys::usages(),
            keys::gpu_servers(),
            keys::gpu_alives(),
            keys::gpu_usages(),
        ] {
            let weak = Arc::downgrade(region);
            tokio::spawn(async move { follow_prefix(weak, prefix).await });
        }
    }

    fn apply(&self, e: &Event) {
        let key = e.key();
        if self.apply_gpu(e) {
            return;
        }
        let mut hosts = self.lock();
        if let Some(h) = key.strip_prefix(&keys::hosts()) {
            let v = hosts.entry(h.to_owned()).or_default();
            v.offer = match e {
                Event::Put(kv) => decode::<Host>(kv).ok().map(|h| h.offer),
                Event::Delete { .. } => None,
            };
        } else if let Some(h) = key.strip_prefix(&keys::alives()) {
            hosts.entry(h.to_owned()).or_default().alive = matches!(e, Event::Put(_));
        } else if let Some(h) = key.strip_prefix(&keys::usages()) {
            if let Event::Put(kv) = e {
                let v = hosts.entry(h.to_owned()).or_default();
                // Events can arrive after a fresher read from a failed
                // claim: never go back.
                if kv.mod_revision >= v.usage_revision {
                    if let Ok(u) = decode(kv) {
                        v.usage = u;
                        v.usage_revision = kv.mod_revision;
                    }
                }
            }
        }
    }

    fn gpus(&self) -> MutexGuard<'_, BTreeMap<String, GpuView>> {
        self.gpus.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies an event about GPU servers; false when it is about
    /// something else.
    fn apply_gpu(&self, e: &Event) -> bool {
        let key = e.key();
        let mut gpus = self.gpus();
        if let Some(g) = key.strip_prefix(&keys::gpu_servers()) {
            gpus.entry(g.to_owned()).or_default().offer = match e {
                Event::Put(kv) => decode::<GpuServer>(kv).ok().map(|g| g.offer),
                Event::Delete { .. } => None,
            };
        } else if let Some(g) = key.strip_prefix(&keys::gpu_alives()) {
            gpus.entry(g.to_owned()).or_default().alive = matches!(e, Event::Put(_));
        } else if let Some(g) = key.strip_prefix(&keys::gpu_usages()) {
            if let Event::Put(kv) = e {
                let v = gpus.entry(g.to_owned()).or_default();
                if kv.mod_revision >= v.usage_revision {
                    if let Ok(u) = decode(kv) {
                        v.usage = u;
                        v.usage_revision = kv.mod_revision;
                    }
                }
            }
        } else {
            return false;
        }
        true
    }

    /// The adapters that can take a vGPU of `memory_bytes`, best first:
    /// vGPUs pack (the adapter with the least free memory that fits
    /// first, so that whole GPUs stay free for large requests), at random
    /// among equals.
    pub fn gpu_candidates(&self, memory_bytes: u64) -> Vec<GpuChoice> {
        let gpus = self.gpus();
        let mut out: Vec<(u64, GpuChoice)> = Vec::new();
        for (name, v) in gpus.iter().filter(|(_, v)| v.alive) {
            let Some(offer) = &v.offer else { continue };
            for a in &offer.adapters {
                let used = v.usage.adapter_bytes.get(&a.name).copied().unwrap_or(0);
                let free = a.memory_bytes.saturating_sub(used);
                if free < memory_bytes {
                    continue;
                }
                let mut usage = v.usage.clone();
                *usage.adapter_bytes.entry(a.name.clone()).or_default() += memory_bytes;
                out.push((
                    free,
                    GpuChoice {
                        server: name.clone(),
                        adapter: a.name.clone(),
                        endpoint: offer.endpoint.clone(),
                        usage,
                        usage_revision: v.usage_revision,
                    },
                ));
            }
        }
        drop(gpus);
        out.shuffle(&mut rand::thread_rng());
        out.sort_by_key(|(free, _)| *free);
        out.into_iter().map(|(_, c)| c).collect()
    }

    /// Takes a claim this process just made into the view at once (the
    /// watch would bring it a moment later), so that the next request
    /// sees it: vGPUs pack and instances spread even when requests follow
    /// each other closely.
    pub fn claimed(&self, key: &str, usage: Vec<u8>, revision: Revision) {
        self.apply(&Event::Put(KeyValue {
            key: key.to_owned(),
            value: usage,
            create_revision: 0,
            mod_revision: revision,
            version: 0,
            lease: 0,
        }));
    }

    /// Updates a host's usage from a fresh read (after a failed claim).
    pub fn refresh_usage(&self, kv: &KeyValue) {
        self.apply(&Event::Put(kv.clone()));
    }

    /// The hosts that can take `req`, best first.
    pub fn candidates(&self, req: &Request) -> Vec<Choice> {
        let hosts = self.lock();
        let mut scored: Vec<(f64, Choice)> = hosts
            .iter()
            .filter(|(name, v)| v.alive && req.host.as_ref().is_none_or(|h| h == *name))
            .filter_map(|(name, v)| {
                let offer = v.offer.as_ref()?;
                let vcpus = v.usage.vcpus.checked_add(req.vcpus)?;
                let memory = v.usage.memory_mib.checked_add(req.memory_mib)?;
                if vcpus > offer.vcpus || memory > offer.memory_mib {
                    return None;
                }
                let mut usage = v.usage.clone();
                usage.vcpus = vcpus;
                usage.memory_mib = memory;
                let mut device = String::new();
                if req.disk_bytes > 0 {
                    let (d, free) = offer
                        .devices
                        .iter()
                        .map(|d| {
                            let used = v.usage.device_bytes.get(&d.name).copied().unwrap_or(0);
                            (d, d.capacity_bytes.saturating_sub(used))
                        })
                        .filter(|(_, free)| *free >= req.disk_bytes)
                        .max_by_key(|(_, free)| *free)?;
                    let _ = free;
                    device.clone_from(&d.name);
                    *usage.device_bytes.entry(d.name.clone()).or_default() += req.disk_bytes;
                }
                let free_cpu = f64::from(offer.vcpus - vcpus) / f64::from(offer.vcpus.max(1));
                #[allow(clippy::cast_precision_loss)]
                let free_mem = (offer.memory_mib - memory) as f64 / offer.memory_mib.max(1) as f64;
                Some((
                    free_cpu + free_mem,
                    Choice {
                        host: name.clone(),
                        device,
                        usage,
                        usage_revision: v.usage_revision,
                    },
                ))
            })
            .collect();
        drop(hosts);
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let best = scored.first().map_or(0.0, |s| s.0);
        let head = scored
            .iter()
            .take_while(|s| s.0 >= best - SPREAD_TOLERANCE * 2.0)
            .count();
        let mut out: Vec<Choice> = scored.into_iter().map(|(_, c)| c).collect();
        out[..head].shuffle(&mut rand::thread_rng());
        out
    }
}

async fn follow_prefix(region: Weak<Region>, prefix: String) {
    loop {
        let Some(r) = region.upgrade() else { return };
        let listed = r.store.range(&prefix).await;
        let stream = match listed {
            Ok((kvs, rev)) => {
                if prefix == keys::alives() {
                    // A re-list after a lost watch: keys absent now are
                    // hosts that went down meanwhile.
                    for v in r.placement.lock().values_mut() {
                        v.alive = false;
                    }
                }
                if prefix == keys::gpu_alives() {
                    for v in r.placement.gpus().values_mut() {
                        v.alive = false;
                    }
                }
                for kv in kvs {
                    r.placement.apply(&Event::Put(kv));
                }
                r.store.watch(&prefix, rev + 1).await
            }
            Err(e) => Err(e),
        };
        drop(r);
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("placement view of {prefix}: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(e) = stream.recv().await {
            let Some(r) = region.upgrade() else { return };
            r.placement.apply(&e);
        }
    }
}
