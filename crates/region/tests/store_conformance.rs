//! One conformance suite for both stores: the embedded redb file and a real
//! etcd (Debian's etcd-server, started on loopback by the test). Each case
//! asserts etcd's semantics, so the embedded store cannot drift from them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use softcard_region::store::{self, Compare, Event, Op, Store, StoreError};
use softcard_region::throwaway_etcd::ThrowawayEtcd;

async fn conformance(s: Arc<dyn Store>) {
    versions_and_revisions(&*s).await;
    compare_and_swap(&*s).await;
    prefix_ranges(&*s).await;
    watches(&*s).await;
    leases(&*s).await;
    racing_claims(s.clone()).await;
}

async fn versions_and_revisions(s: &dyn Store) {
    assert!(s.get("/t/a").await.unwrap().is_none());
    let r1 = s.put("/t/a", b"one".to_vec()).await.unwrap();
    let a = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!(a.value, b"one");
    assert_eq!((a.create_revision, a.mod_revision, a.version), (r1, r1, 1));
    let r2 = s.put("/t/a", b"two".to_vec()).await.unwrap();
    assert!(r2 > r1);
    let a = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (r1, r2, 2));
    let r3 = s.delete("/t/a").await.unwrap();
    assert!(r3 > r2);
    assert!(s.get("/t/a").await.unwrap().is_none());
    // Recreated: a new life with version 1.
    let r4 = s.put("/t/a", b"three".to_vec()).await.unwrap();
    let a = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.version), (r4, 1));
    s.delete("/t/a").await.unwrap();
}

async fn compare_and_swap(s: &dyn Store) {
    // Create-if-absent holds once.
    let create = |v: &'static [u8]| {
        (
            vec![Compare::Absent("/t/cas".into())],
            vec![Op::put("/t/cas", v)],
            vec![Op::Get("/t/cas".into())],
        )
    };
    let (c, ok, no) = create(b"first");
    let r = s.txn(c, ok, no).await.unwrap();
    assert!(r.succeeded);
    let (c, ok, no) = create(b"second");
    let r = s.txn(c, ok, no).await.unwrap();
    assert!(!r.succeeded);
    // The failure branch's read shows the winner.
    let current = r.reads[0].clone().unwrap();
    assert_eq!(current.value, b"first");
    // A swap on the revision read succeeds once; a stale one fails and
    // changes nothing.
    let swap = |rev| {
        (
            vec![Compare::ModRevision("/t/cas".into(), rev)],
            vec![
                Op::put("/t/cas", b"swapped".to_vec()),
                Op::put("/t/cas2", b"x".to_vec()),
            ],
        )
    };
    let (c, ok) = swap(current.mod_revision);
    assert!(s.txn(c, ok, vec![]).await.unwrap().succeeded);
    let (c, ok) = swap(current.mod_revision);
    let before = s.range("/t/").await.unwrap();
    let r = s.txn(c, ok, vec![]).await.unwrap();
    assert!(!r.succeeded);
    let after = s.range("/t/").await.unwrap();
    assert_eq!(before.0, after.0, "a failed transaction wrote something");
    assert_eq!(before.1, after.1, "a failed transaction moved the revision");
    // Both puts of one transaction share its revision.
    let a = s.get("/t/cas").await.unwrap().unwrap();
    let b = s.get("/t/cas2").await.unwrap().unwrap();
    assert_eq!(a.mod_revision, b.mod_revision);
    // ModRevision on an absent key never holds.
    let r = s
        .txn(
            vec![Compare::ModRevision("/t/none".into(), a.mod_revision)],
            vec![Op::put("/t/none", b"x".to_vec())],
            vec![],
        )
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert!(s.get("/t/none").await.unwrap().is_none());
    // Too many operations is refused before anything runs.
    let many: Vec<Op> = (0..200)
        .map(|i| Op::put(format!("/t/many/{i}"), b"x".to_vec()))
        .collect();
    assert!(matches!(
        s.txn(vec![], many, vec![]).await,
        Err(StoreError::TooManyOps(_))
    ));
    assert!(s.range("/t/many/").await.unwrap().0.is_empty());
    s.delete("/t/cas").await.unwrap();
    s.delete("/t/cas2").await.unwrap();
}

async fn prefix_ranges(s: &dyn Store) {
    for k in ["/p/a", "/p/b/1", "/p/b/2", "/pz", "/q"] {
        s.put(k, k.as_bytes().to_vec()).await.unwrap();
    }
    let (kvs, rev) = s.range("/p/").await.unwrap();
    let keys: Vec<&str> = kvs.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["/p/a", "/p/b/1", "/p/b/2"]);
    assert!(rev >= kvs.iter().map(|k| k.mod_revision).max().unwrap());
    let (kvs, _) = s.range("/p/b/").await.unwrap();
    assert_eq!(kvs.len(), 2);
    for k in ["/p/a", "/p/b/1", "/p/b/2", "/pz", "/q"] {
        s.delete(k).await.unwrap();
    }
}

async fn next_event(w: &mut store::WatchStream) -> Event {
    tokio::time::timeout(Duration::from_secs(10), w.recv())
        .await
        .expect("no watch event within 10 s")
        .expect("watch stream ended")
}

async fn watches(s: &dyn Store) {
    let (_, start) = s.range("/w/").await.unwrap();
    let mut w = s.watch("/w/", 0).await.unwrap();
    s.put("/w/1", b"a".to_vec()).await.unwrap();
    s.put("/other", b"not watched".to_vec()).await.unwrap();
    s.put("/w/2", b"b".to_vec()).await.unwrap();
    s.delete("/w/1").await.unwrap();
    let e1 = next_event(&mut w).await;
    assert!(matches!(&e1, Event::Put(kv) if kv.key == "/w/1" && kv.value == b"a"));
    let e2 = next_event(&mut w).await;
    assert!(matches!(&e2, Event::Put(kv) if kv.key == "/w/2"));
    let e3 = next_event(&mut w).await;
    assert!(matches!(&e3, Event::Delete { key, .. } if key == "/w/1"));
    assert!(e1.revision() < e2.revision() && e2.revision() < e3.revision());
    // A watch from a past revision replays what happened since.
    let mut replay = s.watch("/w/", start + 1).await.unwrap();
    assert_eq!(next_event(&mut replay).await, e1);
    assert_eq!(next_event(&mut replay).await, e2);
    assert_eq!(next_event(&mut replay).await, e3);
    s.delete("/w/2").await.unwrap();
}

async fn leases(s: &dyn Store) {
    // A key under a lease that is kept alive stays; it goes when the lease
    // is no longer kept alive, and a watch sees the removal.
    let lease = s.grant(Duration::from_secs(2)).await.unwrap();
    s.txn(
        vec![],
        vec![Op::Put {
            key: "/l/alive".into(),
            value: b"h1".to_vec(),
            lease,
        }],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(s.get("/l/alive").await.unwrap().unwrap().lease, lease);
    let r = s
        .txn(
            vec![Compare::Lease("/l/alive".into(), lease)],
            vec![],
            vec![],
        )
        .await
        .unwrap();
    assert!(r.succeeded, "Compare::Lease on the key's own lease");
    let mut w = s.watch("/l/", 0).await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.keep_alive(lease).await.unwrap();
    }
    assert!(
        s.get("/l/alive").await.unwrap().is_some(),
        "kept-alive key expired"
    );
    let begin = Instant::now();
    let e = next_event(&mut w).await;
    assert!(matches!(&e, Event::Delete { key, .. } if key == "/l/alive"));
    assert!(
        begin.elapsed() >= Duration::from_millis(1000),
        "expired early"
    );
    assert!(s.get("/l/alive").await.unwrap().is_none());
    let r = s.keep_alive(lease).await;
    assert!(matches!(r, Err(StoreError::LeaseNotFound(_))), "{r:?}");
    // A put under an expired lease is refused.
    let r = s
        .txn(
            vec![],
            vec![Op::Put {
                key: "/l/late".into(),
                value: vec![],
                lease,
            }],
            vec![],
        )
        .await;
    assert!(matches!(r, Err(StoreError::LeaseNotFound(_))), "{r:?}");
    assert!(s.get("/l/late").await.unwrap().is_none());
    // Revoking removes the keys at once.
    let lease = s.grant(Duration::from_secs(60)).await.unwrap();
    s.txn(
        vec![],
        vec![Op::Put {
            key: "/l/r".into(),
            value: vec![],
            lease,
        }],
        vec![],
    )
    .await
    .unwrap();
    s.revoke(lease).await.unwrap();
    assert!(s.get("/l/r").await.unwrap().is_none());
}

/// 16 tasks race to take 10 slots of one counter with compare-and-swap:
/// exactly 10 succeed, never more.
async fn racing_claims(s: Arc<dyn Store>) {
    s.put("/race/used", b"0".to_vec()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let cur = s.get("/race/used").await.unwrap().unwrap();
                let used: u32 = std::str::from_utf8(&cur.value).unwrap().parse().unwrap();
                if used >= 10 {
                    return false;
                }
                let r = s
                    .txn(
                        vec![Compare::ModRevision("/race/used".into(), cur.mod_revision)],
                        vec![
                            Op::put("/race/used", (used + 1).to_string()),
                            Op::put(format!("/race/claim/{i}"), b"1".to_vec()),
                        ],
                        vec![],
                    )
                    .await
                    .unwrap();
                if r.succeeded {
                    return true;
                }
            }
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += usize::from(t.await.unwrap());
    }
    assert_eq!(won, 10);
    assert_eq!(s.range("/race/claim/").await.unwrap().0.len(), 10);
    assert_eq!(s.get("/race/used").await.unwrap().unwrap().value, b"10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redb_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region.redb");
    let s = store::open(&format!("redb:{}", path.display()))
        .await
        .unwrap();
    conformance(s.clone()).await;
    // Everything is in the file: a reopened store has the same keys and
    // revision, and its leases get a fresh time-to-live.
    let lease = s.grant(Duration::from_secs(2)).await.unwrap();
    s.txn(
        vec![],
        vec![Op::Put {
            key: "/reopen/leased".into(),
            value: vec![],
            lease,
        }],
        vec![],
    )
    .await
    .unwrap();
    s.put("/reopen/k", b"v".to_vec()).await.unwrap();
    let (before, rev) = s.range("/").await.unwrap();
    drop(s);
    // The expiry thread holds only a weak reference; give it a tick to let
    // go of the file.
    let s = loop {
        match store::open(&format!("redb:{}", path.display())).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let (after, rev2) = s.range("/").await.unwrap();
    assert_eq!(before, after);
    assert_eq!(rev, rev2);
    s.keep_alive(lease).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.get("/reopen/leased").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_store_conforms() {
    let etcd = ThrowawayEtcd::start(false).expect("etcd (package etcd-server)");
    let s = store::open(&format!("etcd:{}", etcd.url)).await.unwrap();
    conformance(s).await;
}

#[tokio::test]
async fn unknown_store_is_a_clear_error() {
    let e = store::open("sqlite:/tmp/x").await.unwrap_err();
    assert!(e.to_string().contains("redb:PATH or etcd:URL"), "{e}");
}
