//! The embedded store: one redb file (ACID, crash-safe, one writer) with
//! etcd's semantics on top. Keys and their versions live in the file;
//! leases are persisted with their time-to-live and get a fresh one when
//! the store is opened again (as etcd extends leases when a leader
//! changes); watch history is kept in memory for this process.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use ::redb::{Database, ReadableTable, TableDefinition};
use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{
    check_ops, Compare, Event, KeyValue, LeaseId, Op, Revision, Store, StoreError, TxnResponse,
    WatchStream,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const LEASES: TableDefinition<i64, i64> = TableDefinition::new("leases");
/// Changes remembered for watches that start in the past; older ones are
/// "compacted".
const HISTORY_EVENTS: usize = 16 << 10;
/// Events a slow watcher may have queued before its stream is ended.
const WATCH_QUEUE: usize = 4096;
/// How often lease deadlines are checked.
const EXPIRY_TICK: Duration = Duration::from_millis(50);
/// Size of the versions in front of a stored value.
const HEADER: usize = 32;

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The store's revision as the `meta` table has it.
fn stored_revision(meta: &impl ReadableTable<&'static str, i64>) -> Result<Revision, StoreError> {
    Ok(meta
        .get("revision")
        .map_err(backend)?
        .map_or(0, |v| v.value()))
}

fn encode(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + kv.value.len());
    for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&kv.value);
    out
}

fn decode(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    if raw.len() < HEADER {
        return Err(backend(format!("record of {key} is truncated")));
    }
    let n = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
        i64::from_le_bytes(b)
    };
    Ok(KeyValue {
        key: key.to_owned(),
        create_revision: n(0),
        mod_revision: n(1),
        version: n(2),
        lease: n(3),
        value: raw[HEADER..].to_vec(),
    })
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

#[derive(Debug)]
struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Event>,
}

#[derive(Debug, Default)]
struct State {
    leases: HashMap<LeaseId, Lease>,
    history: VecDeque<Event>,
    watchers: Vec<Watcher>,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    /// Held across every write transaction, so the in-memory lease and
    /// watch state changes in the order of the file's revisions.
    state: Mutex<State>,
}

/// The embedded store.
#[derive(Debug, Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

impl RedbStore {
    /// Opens (or creates) the store in `path`. One process at a time: redb
    /// locks the file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(backend)?;
        }
        let db = Database::create(path)
            .map_err(|e| backend(format!("opening {}: {e}", path.display())))?;
        let mut state = State::default();
        {
            let w = db.begin_write().map_err(backend)?;
            {
                w.open_table(META).map_err(backend)?;
                let leases = w.open_table(LEASES).map_err(backend)?;
                let kv = w.open_table(KV).map_err(backend)?;
                let now = Instant::now();
                for entry in leases.iter().map_err(backend)? {
                    let (id, ttl_ms) = entry.map_err(backend)?;
                    let ttl = Duration::from_millis(u64::try_from(ttl_ms.value()).unwrap_or(0));
                    state.leases.insert(
                        id.value(),
                        Lease {
                            ttl,
                            deadline: now + ttl,
                            keys: BTreeSet::new(),
                        },
                    );
                }
                for entry in kv.iter().map_err(backend)? {
                    let (k, v) = entry.map_err(backend)?;
                    let kv = decode(k.value(), v.value())?;
                    if let Some(l) = state.leases.get_mut(&kv.lease) {
                        l.keys.insert(kv.key);
                    }
                }
            }
            w.commit().map_err(backend)?;
        }
        let inner = Arc::new(Inner {
            db,
            state: Mutex::new(state),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("store-leases".into())
            .spawn(move || expire_loop(&weak))
            .map_err(backend)?;
        Ok(RedbStore { inner })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(backend)?
    }
}

fn expire_loop(weak: &Weak<Inner>) {
    loop {
        std::thread::sleep(EXPIRY_TICK);
        let Some(inner) = weak.upgrade() else { return };
        let now = Instant::now();
        let expired: Vec<LeaseId> = inner
            .lock()
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Err(e) = inner.revoke(id) {
                log::warn!("expiring lease {id}: {e}");
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        let r = self.db.begin_read().map_err(backend)?;
        stored_revision(&r.open_table(META).map_err(backend)?)
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let r = self.db.begin_read().map_err(backend)?;
        let kv = r.open_table(KV).map_err(backend)?;
        kv.get(key)
            .map_err(backend)?
            .map(|v| decode(key, v.value()))
            .transpose()
    }

    fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let r = self.db.begin_read().map_err(backend)?;
        let rev = stored_revision(&r.open_table(META).map_err(backend)?)?;
        let kv = r.open_table(KV).map_err(backend)?;
        let mut out = Vec::new();
        for entry in kv.range(prefix..).map_err(backend)? {
            let (k, v) = entry.map_err(backend)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push(decode(k.value(), v.value())?);
        }
        Ok((out, rev))
    }

    fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResponse, StoreError> {
        check_ops(compare, success, failure)?;
        let mut state = self.lock();
        let w = self.db.begin_write().map_err(backend)?;
        let mut events = Vec::new();
        let (succeeded, revision, reads) = {
            let mut kv = w.open_table(KV).map_err(backend)?;
            let mut meta = w.open_table(META).map_err(backend)?;
            let rev = stored_revision(&meta)?;
            let read = |kv: &::redb::Table<&str, &[u8]>, key: &str| {
                kv.get(key)
                    .map_err(backend)?
                    .map(|v| decode(key, v.value()))
                    .transpose()
            };
            let mut ok = true;
            for c in compare {
                ok &= match c {
                    Compare::Absent(k) => read(&kv, k)?.is_none(),
                    Compare::ModRevision(k, r) => {
                        read(&kv, k)?.is_some_and(|v| v.mod_revision == *r)
                    }
                    Compare::Lease(k, l) => read(&kv, k)?.is_some_and(|v| v.lease == *l),
                };
            }
            let ops = if ok { success } else { failure };
            let next = rev + 1;
            let mut reads = Vec::new();
            let mut lease_moves: Vec<(LeaseId, LeaseId, String)> = Vec::new();
            for op in ops {
                match op {
                    Op::Get(k) => reads.push(read(&kv, k)?),
                    Op::Put { key, value, lease } => {
                        if *lease != 0 && !state.leases.contains_key(lease) {
                            return Err(StoreError::LeaseNotFound(*lease));
                        }
                        let old = read(&kv, key)?;
                        let new = KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: old.as_ref().map_or(next, |o| o.create_revision),
                            mod_revision: next,
                            version: old.as_ref().map_or(1, |o| o.version + 1),
                            lease: *lease,
                        };
                        kv.insert(key.as_str(), encode(&new).as_slice())
                            .map_err(backend)?;
                        lease_moves.push((old.map_or(0, |o| o.lease), *lease, key.clone()));
                        events.push(Event::Put(new));
                    }
                    Op::Delete(k) => {
                        if let Some(old) = kv.remove(k.as_str()).map_err(backend)? {
                            let old = decode(k, old.value())?;
                            lease_moves.push((old.lease, 0, k.clone()));
                            events.push(Event::Delete {
                                key: k.clone(),
                                revision: next,
                            });
                        }
                    }
                }
            }
            let revision = if events.is_empty() {
                rev
            } else {
                meta.insert("revision", next).map_err(backend)?;
                next
            };
            for (from, to, key) in lease_moves {
                if let Some(l) = state.leases.get_mut(&from) {
                    l.keys.remove(&key);
                }
                if let Some(l) = state.leases.get_mut(&to) {
                    l.keys.insert(key);
                }
            }
            (ok, revision, reads)
        };
        w.commit().map_err(backend)?;
        publish(&mut state, events);
        Ok(TxnResponse {
            succeeded,
            revision,
            reads,
        })
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut state = self.lock();
        let w = self.db.begin_write().map_err(backend)?;
        let id = {
            let mut meta = w.open_table(META).map_err(backend)?;
            let id = meta
                .get("next_lease")
                .map_err(backend)?
                .map_or(1, |v| v.value());
            meta.insert("next_lease", id + 1).map_err(backend)?;
            let mut leases = w.open_table(LEASES).map_err(backend)?;
            let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            leases.insert(id, ttl_ms).map_err(backend)?;
            id
        };
        w.commit().map_err(backend)?;
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    fn keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut state = self.lock();
        let l = state
            .leases
            .get_mut(&id)
            .ok_or(StoreError::LeaseNotFound(id))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(())
    }

    fn revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut state = self.lock();
        let lease = state
            .leases
            .remove(&id)
            .ok_or(StoreError::LeaseNotFound(id))?;
        let w = self.db.begin_write().map_err(backend)?;
        let mut events = Vec::new();
        {
            let mut kv = w.open_table(KV).map_err(backend)?;
            let mut meta = w.open_table(META).map_err(backend)?;
            let rev = stored_revision(&meta)?;
            for key in &lease.keys {
                if kv.remove(key.as_str()).map_err(backend)?.is_some() {
                    events.push(Event::Delete {
                        key: key.clone(),
                        revision: rev + 1,
                    });
                }
            }
            if !events.is_empty() {
                meta.insert("revision", rev + 1).map_err(backend)?;
            }
            w.open_table(LEASES)
                .map_err(backend)?
                .remove(id)
                .map_err(backend)?;
        }
        w.commit().map_err(backend)?;
        publish(&mut state, events);
        Ok(())
    }

    fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let mut state = self.lock();
        let current = self.revision()?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        if from > 0 && from <= current {
            let oldest = state.history.front().map_or(current + 1, Event::revision);
            if from < oldest {
                return Err(StoreError::Compacted(from));
            }
            for e in state.history.iter().filter(|e| e.revision() >= from) {
                if e.key().starts_with(prefix) && tx.try_send(e.clone()).is_err() {
                    return Err(StoreError::Compacted(from));
                }
            }
        }
        state.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            tx,
        });
        Ok(rx)
    }
}

/// Remembers committed events and hands them to the watchers; a watcher
/// whose queue is full or whose receiver is gone is dropped (its stream
/// ends and it re-lists).
fn publish(state: &mut State, events: Vec<Event>) {
    for e in events {
        state
            .watchers
            .retain(|w| !e.key().starts_with(&w.prefix) || w.tx.try_send(e.clone()).is_ok());
        if state.history.len() == HISTORY_EVENTS {
            state.history.pop_front();
        }
        state.history.push_back(e);
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.blocking(move |i| i.get(&key)).await
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |i| i.range(&prefix)).await
    }

    async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<TxnResponse, StoreError> {
        self.blocking(move |i| i.txn(&compare, &success, &failure))
            .await
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.blocking(move |i| i.grant(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.keep_alive(lease)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |i| i.revoke(lease)).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        self.inner.watch(prefix, from)
    }
}
