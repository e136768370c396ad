//! The region's store: a small trait with etcd's semantics (revisions,
//! compare-and-swap transactions, leases, watches from a revision), with two
//! implementations: [`redb::RedbStore`], an embedded single-file store for
//! one machine, and [`etcd::EtcdStore`], etcd itself for many.
//!
//! Every change bumps the store's revision by one; a key remembers the
//! revision that created it and the one that last changed it, so a
//! transaction can compare a key's `mod_revision` against the one it read
//! (optimistic concurrency, as Kubernetes and OpenStack Placement do).

pub mod etcd;
pub mod redb;

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

/// A store revision: the number of changes the store has made.
pub type Revision = i64;
/// A lease id; 0 means "no lease".
pub type LeaseId = i64;

/// A key with its value and versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the change that created the key.
    pub create_revision: Revision,
    /// Revision of the change that last wrote it.
    pub mod_revision: Revision,
    /// How many times it was written since it was created (1 at first).
    pub version: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: LeaseId,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key was last written at this revision (so it exists).
    ModRevision(String, Revision),
    /// The key exists and is attached to this lease.
    Lease(String, LeaseId),
}

/// An operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write a key, attached to a lease (0: none).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// Lease, 0 for none.
        lease: LeaseId,
    },
    /// Remove a key (no error when it is absent).
    Delete(String),
    /// Read a key; its value is in [`TxnResponse::reads`].
    Get(String),
}

impl Op {
    /// A put without a lease.
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }
}

/// The outcome of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether every comparison held (so the success branch ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
    /// One entry per [`Op::Get`] of the branch that ran, in order.
    pub reads: Vec<Option<KeyValue>>,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A key was written.
    Put(KeyValue),
    /// A key was removed (also by its lease's expiry) at `revision`.
    Delete {
        /// The key.
        key: String,
        /// Revision of the removal.
        revision: Revision,
    },
}

impl Event {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// Events of a watch, in revision order. The stream ends (`recv` gives
/// `None`) when the store can no longer deliver them; the watcher then
/// lists again and watches from the listing's revision.
pub type WatchStream = mpsc::Receiver<Event>;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The lease does not exist (never granted, revoked or expired).
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// A watch asked for history the store no longer keeps.
    #[error("revision {0} is compacted")]
    Compacted(Revision),
    /// A transaction had too many operations.
    #[error("too many operations in one transaction ({0}; at most {MAX_TXN_OPS})")]
    TooManyOps(usize),
    /// The store itself failed (I/O, network, corruption).
    #[error("store: {0}")]
    Backend(String),
}

/// Most operations (comparisons plus either branch) in one transaction:
/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

/// The store the region keeps all its state in.
#[async_trait]
pub trait Store: Send + Sync + Debug {
    /// One key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Every key starting with `prefix`, in key order, and the revision the
    /// listing was taken at (watch from the next one).
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;
    /// Runs `success` if every comparison holds, else `failure`, atomically.
    async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<TxnResponse, StoreError>;
    /// A new lease that expires `ttl` after its last keep-alive; the keys
    /// attached to it are removed when it expires.
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Renews a lease for its time-to-live.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Ends a lease now, removing its keys.
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Changes to keys starting with `prefix` from revision `from` on
    /// (0: from now).
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;

    /// Writes one key (no lease); the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        Ok(self
            .txn(vec![], vec![Op::put(key, value)], vec![])
            .await?
            .revision)
    }

    /// Removes one key; the new revision.
    async fn delete(&self, key: &str) -> Result<Revision, StoreError> {
        Ok(self
            .txn(vec![], vec![Op::Delete(key.into())], vec![])
            .await?
            .revision)
    }
}

/// Opens a store from its URL: `redb:PATH` or `etcd:URL[,URL...]`.
pub async fn open(spec: &str) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if let Some(path) = spec.strip_prefix("redb:") {
        Ok(std::sync::Arc::new(redb::RedbStore::open(
            std::path::Path::new(path),
        )?))
    } else if let Some(urls) = spec.strip_prefix("etcd:") {
        let endpoints: Vec<String> = urls
            .split(',')
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(std::sync::Arc::new(
            etcd::EtcdStore::connect(&endpoints).await?,
        ))
    } else {
        Err(StoreError::Backend(format!(
            "unknown store {spec:?}: use redb:PATH or etcd:URL[,URL...]"
        )))
    }
}

/// The end of the range of keys that start with `prefix` (etcd's
/// `range_end` for a prefix).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn check_ops(compare: &[Compare], success: &[Op], failure: &[Op]) -> Result<(), StoreError> {
    let n = compare.len() + success.len().max(failure.len());
    if n > MAX_TXN_OPS {
        return Err(StoreError::TooManyOps(n));
    }
    Ok(())
}
