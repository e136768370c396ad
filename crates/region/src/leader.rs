//! Leader election among region processes on one store, and the leader's
//! duties. A process leads while it holds the leader key under its own
//! lease; every write it makes as leader is fenced by comparing that key's
//! lease, so a process that lost leadership (a pause, a partition) cannot
//! write as leader any more.
//!
//! Duties: noticing hosts whose lease expired and recording when they
//! were last seen alive.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::model::{keys, now, Host};
use crate::service::{decode, encode, Region};
use crate::store::{Compare, LeaseId, Op};

/// The leader's lease: another process takes over this long after the
/// leader dies.
pub const LEADER_LEASE: Duration = Duration::from_secs(5);
/// How often the leader renews its lease and does its duties.
const TICK: Duration = Duration::from_secs(1);

/// This process's view of the election.
#[derive(Debug, Default)]
pub struct Election {
    /// This process's id (random at start).
    pub me: String,
    leading: Mutex<bool>,
}

impl Election {
    /// A process named `me` that does not lead yet.
    pub fn new(me: String) -> Self {
        Election {
            me,
            leading: Mutex::new(false),
        }
    }

    /// Whether this process leads now.
    pub fn leading(&self) -> bool {
        *self.leading.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, v: bool) {
        *self.leading.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }
}

/// Campaigns, and leads when elected, for as long as the region lives.
pub fn run(region: &Arc<Region>, election: Arc<Election>) {
    let weak = Arc::downgrade(region);
    tokio::spawn(async move {
        loop {
            match campaign(&weak, &election).await {
                Some(lease) => {
                    election.set(true);
                    log::info!("region {} leads", election.me);
                    lead(&weak, lease).await;
                    election.set(false);
                    log::warn!("region {} no longer leads", election.me);
                }
                None if weak.strong_count() == 0 => return,
                None => tokio::time::sleep(TICK).await,
            }
        }
    });
}

async fn campaign(region: &Weak<Region>, election: &Election) -> Option<LeaseId> {
    let r = region.upgrade()?;
    let lease = r.store.grant(LEADER_LEASE).await.ok()?;
    let key = keys::leader();
    let won = r
        .store
        .txn(
            vec![Compare::Absent(key.clone())],
            vec![Op::Put {
                key,
                value: election.me.clone().into_bytes(),
                lease,
            }],
            vec![],
        )
        .await
        .is_ok_and(|t| t.succeeded);
    if won {
        Some(lease)
    } else {
        let _ = r.store.revoke(lease).await;
        None
    }
}

async fn lead(region: &Weak<Region>, lease: LeaseId) {
    // When each host was last seen alive by this leader.
    let seen: Mutex<BTreeMap<String, u64>> = Mutex::default();
    loop {
        let Some(r) = region.upgrade() else { return };
        if r.store.keep_alive(lease).await.is_err() {
            return;
        }
        if let Err(e) = record_down_hosts(&r, lease, &seen).await {
            log::warn!("leader duties: {e}");
        }
        drop(r);
        tokio::time::sleep(TICK).await;
    }
}

/// Hosts seen alive before and not now get their `last_seen` written.
async fn record_down_hosts(
    r: &Region,
    lease: LeaseId,
    seen: &Mutex<BTreeMap<String, u64>>,
) -> crate::error::Result<()> {
    let alive: BTreeSet<String> = r.alive_hosts().await?;
    let t = now();
    let gone: Vec<(String, u64)> = {
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        let gone = seen
            .iter()
            .filter(|(h, _)| !alive.contains(*h))
            .map(|(h, at)| (h.clone(), *at))
            .collect();
        seen.retain(|h, _| alive.contains(h));
        for h in &alive {
            seen.insert(h.clone(), t);
        }
        gone
    };
    for (host, at) in gone {
        let key = keys::host(&host);
        let Some(kv) = r.store.get(&key).await? else {
            continue;
        };
        let mut h: Host = decode(&kv)?;
        h.last_seen = Some(at);
        r.store
            .txn(
                vec![
                    Compare::Lease(keys::leader(), lease),
                    Compare::ModRevision(key.clone(), kv.mod_revision),
                ],
                vec![Op::put(key, encode(&h))],
                vec![],
            )
            .await?;
        log::warn!("host {host} is down (lease expired; last seen at {at})");
    }
    Ok(())
}
