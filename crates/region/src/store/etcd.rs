//! The store on etcd itself, through the `etcd-client` crate (etcd's gRPC
//! API): the same trait, mapped one to one.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as ECompare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use super::{
    check_ops, Compare, Event, KeyValue, LeaseId, Op, Revision, Store, StoreError, TxnResponse,
    WatchStream,
};

/// Events a slow watcher may have queued before its stream is ended.
const WATCH_QUEUE: usize = 4096;
/// How long one call to etcd may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn backend(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// `lease` is gone when etcd says so (its words differ between calls).
fn lease_error(lease: LeaseId) -> impl Fn(etcd_client::Error) -> StoreError {
    move |e| {
        let text = e.to_string();
        if text.contains("lease not found") {
            StoreError::LeaseNotFound(lease)
        } else {
            StoreError::Backend(text)
        }
    }
}

fn convert(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

fn op(o: &Op) -> TxnOp {
    match o {
        Op::Put { key, value, lease } => {
            let opts = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
            TxnOp::put(key.as_str(), value.clone(), opts)
        }
        Op::Delete(k) => TxnOp::delete(k.as_str(), None),
        Op::Get(k) => TxnOp::get(k.as_str(), None),
    }
}

/// A store on an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`http://host:port`).
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Backend("no etcd endpoint given".into()));
        }
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT);
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(backend)?;
        Ok(EtcdStore { client })
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let r = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(backend)?;
        Ok(r.kvs().first().map(convert))
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let r = self
            .client
            .kv_client()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(backend)?;
        let rev = r.header().map_or(0, |h| h.revision());
        Ok((r.kvs().iter().map(convert).collect(), rev))
    }

    async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<TxnResponse, StoreError> {
        check_ops(&compare, &success, &failure)?;
        let when: Vec<ECompare> = compare
            .iter()
            .map(|c| match c {
                Compare::Absent(k) => ECompare::create_revision(k.as_str(), CompareOp::Equal, 0),
                Compare::ModRevision(k, r) => {
                    ECompare::mod_revision(k.as_str(), CompareOp::Equal, *r)
                }
                Compare::Lease(k, l) => ECompare::lease(k.as_str(), CompareOp::Equal, *l),
            })
            .collect();
        let txn = Txn::new()
            .when(when)
            .and_then(success.iter().map(op).collect::<Vec<_>>())
            .or_else(failure.iter().map(op).collect::<Vec<_>>());
        let lease = success
            .iter()
            .chain(&failure)
            .find_map(|o| match o {
                Op::Put { lease, .. } if *lease != 0 => Some(*lease),
                _ => None,
            })
            .unwrap_or(0);
        let r = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(lease_error(lease))?;
        let reads = r
            .op_responses()
            .into_iter()
            .filter_map(|o| match o {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map(convert)),
                _ => None,
            })
            .collect();
        Ok(TxnResponse {
            succeeded: r.succeeded(),
            revision: r.header().map_or(0, |h| h.revision()),
            reads,
        })
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let r = self
            .client
            .lease_client()
            .grant(secs, None)
            .await
            .map_err(backend)?;
        Ok(r.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let (mut keeper, mut stream) = self
            .client
            .lease_client()
            .keep_alive(lease)
            .await
            .map_err(lease_error(lease))?;
        keeper.keep_alive().await.map_err(lease_error(lease))?;
        match stream.message().await.map_err(lease_error(lease))? {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.client
            .lease_client()
            .revoke(lease)
            .await
            .map(drop)
            .map_err(lease_error(lease))
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let mut opts = WatchOptions::new().with_prefix();
        if from > 0 {
            opts = opts.with_start_revision(from);
        }
        let mut stream = self
            .client
            .watch_client()
            .watch(prefix, Some(opts))
            .await
            .map_err(backend)?;
        // The first response confirms the watch; a compacted start comes
        // back as a cancellation with the compaction revision.
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let first = stream.message().await.map_err(backend)?;
        if let Some(r) = &first {
            if r.compact_revision() > 0 {
                return Err(StoreError::Compacted(from));
            }
        }
        if let Some(r) = &first {
            if !deliver(&tx, r) {
                return Err(StoreError::Compacted(from));
            }
        }
        tokio::spawn(async move {
            while let Ok(Some(r)) = stream.message().await {
                if r.canceled() || !deliver(&tx, &r) {
                    break;
                }
            }
        });
        Ok(rx)
    }
}

/// Hands a watch response's events to the watcher; false when its queue is
/// full or gone (the stream then ends).
fn deliver(tx: &mpsc::Sender<Event>, r: &etcd_client::WatchResponse) -> bool {
    r.events().iter().all(|e| {
        let Some(kv) = e.kv() else { return true };
        let ev = match e.event_type() {
            EventType::Put => Event::Put(convert(kv)),
            EventType::Delete => Event::Delete {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                revision: kv.mod_revision(),
            },
        };
        tx.try_send(ev).is_ok()
    })
}
