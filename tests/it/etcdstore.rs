//! The etcd backend in particular (these tests start their own etcd on either pass of the
//! suite): the Store trait's semantics against a real etcd, shared by two store instances as
//! two replicas would share it; a frozen etcd answers UNAVAILABLE within the deadline and
//! turns health NOT_SERVING, and the service recovers by itself when etcd is back; a killed
//! and restarted etcd loses no acknowledged write.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use strongroom::secret::{NamePrefix, SealedRecord, SecretName};
use strongroom::store::{
    Aux, EtcdOptions, EtcdStore, FrameStatus, Head, NameRange, SledStore, StateKey, Store,
    VersionConflict,
};
use tonic::Code;

use crate::common::{Etcd, POLICY, Server, TestEnv, get, put};

fn open_store(dir: &std::path::Path, etcd: &Etcd) -> EtcdStore {
    open_store_keyed(dir, etcd, 9)
}

fn state_key(b: u8) -> StateKey {
    StateKey::new(&zeroize::Zeroizing::new([b; 32]))
}

/// An instance whose records are committed under a key made of `key_byte`.
fn open_store_keyed(dir: &std::path::Path, etcd: &Etcd, key_byte: u8) -> EtcdStore {
    let pki = dir.join("pki");
    EtcdStore::open(
        EtcdOptions {
            endpoints: vec![etcd.url.clone()],
            ca: pki.join("etcd-ca.pem"),
            cert: pki.join("etcd-client.pem"),
            key: pki.join("etcd-client-key.pem"),
            prefix: "strongroom/".into(),
            timeout: Duration::from_secs(2),
            max_value_bytes: 64 * 1024,
        },
        state_key(key_byte),
    )
    .unwrap()
}

fn name(s: &str) -> SecretName {
    SecretName::parse(s, 256).unwrap()
}

fn record(n: &str, version: u64) -> SealedRecord {
    SealedRecord {
        name: n.into(),
        version,
        master_key_version: 1,
        mechanism: 1,
        wrapped_dek: vec![1; 60],
        nonce: vec![2; 12],
        ciphertext: vec![3; 20],
        created_at_unix: 0,
        created_by: "t".into(),
        expires_at_unix: None,
        ..Default::default()
    }
}

fn ranges(prefixes: &[&str]) -> Vec<NameRange> {
    let prefixes: Vec<NamePrefix> = prefixes
        .iter()
        .map(|p| NamePrefix::parse(p, 256).unwrap())
        .collect();
    NameRange::covering(&prefixes)
}

fn texts(names: &[SecretName]) -> Vec<&str> {
    names.iter().map(SecretName::as_str).collect()
}

/// An etcd with its PKI in a directory of its own (no token needed).
fn bare_etcd() -> (tempfile::TempDir, Etcd) {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let etcd = Etcd::start(dir.path(), &pki);
    (dir, etcd)
}

#[test]
fn the_store_trait_holds_on_etcd_across_two_instances() {
    let (dir, etcd) = bare_etcd();
    let a = open_store(dir.path(), &etcd);
    let b = open_store(dir.path(), &etcd);
    assert!(!a.reads_are_local());
    assert!(a.available());
    // One store, one identity, whichever instance created it.
    let (id, e0) = a.epoch().unwrap();
    assert_eq!(b.epoch().unwrap(), (id.clone(), e0));

    let n = name("a/b");
    assert_eq!(a.head(&n).unwrap(), None);
    a.commit(&record("a/b", 1), None).unwrap().unwrap();
    let h1 = b.head(&n).unwrap();
    assert_eq!(
        h1,
        Some(Head {
            latest: 1,
            deleted: false,
            oldest: 1,
            max_versions: 0,
        })
    );
    // A writer in the other instance that read the head before version 1 loses.
    assert_eq!(
        b.commit(&record("a/b", 1), None).unwrap(),
        Err(VersionConflict { actual: 1 })
    );
    b.commit(&record("a/b", 2), h1).unwrap().unwrap();
    // a's cached epoch is now stale: its next write retries against the one b left.
    assert_eq!(
        a.commit(&record("a/b", 2), h1).unwrap(),
        Err(VersionConflict { actual: 2 })
    );
    assert_eq!(a.versions(&n).unwrap().len(), 2);
    assert_eq!(a.get(&n, 2).unwrap().unwrap().version, 2);
    assert_eq!(a.get(&n, 3).unwrap(), None);
    // Every change bumped the epoch, whichever instance made it.
    assert_eq!(a.epoch().unwrap(), (id.clone(), e0 + 2));
    assert_eq!(b.delete(&n).unwrap(), 2);
    assert_eq!(a.versions(&n).unwrap().len(), 0);
    // Versions are never reused after deletion.
    assert_eq!(
        a.head(&n).unwrap(),
        Some(Head {
            latest: 2,
            deleted: true,
            oldest: 3,
            max_versions: 0,
        })
    );
    assert_eq!(a.epoch().unwrap().1, e0 + 3);

    // Officers' records and wrap counts move the epoch too (as on sled).
    a.aux_put(Aux::Policy, "p1", b"one").unwrap();
    assert_eq!(
        b.aux_get(Aux::Policy, "p1").unwrap().as_deref(),
        Some(&b"one"[..])
    );
    assert_eq!(
        b.aux_list(Aux::Policy).unwrap(),
        [("p1".to_owned(), b"one".to_vec())]
    );
    assert!(b.aux_delete(Aux::Policy, "p1").unwrap());
    assert!(!a.aux_delete(Aux::Policy, "p1").unwrap());
    assert_eq!(a.aux_get(Aux::Policy, "p1").unwrap(), None);
    assert_eq!(a.epoch().unwrap().1, e0 + 6);
    assert_eq!(a.count_wraps(1, 1).unwrap(), 1);
    assert_eq!(b.count_wraps(1, 2).unwrap(), 3);
    // a's cached count is stale: etcd's refusal tells it the current one.
    assert_eq!(a.count_wraps(1, 1).unwrap(), 4);
    assert_eq!(a.epoch().unwrap().1, e0 + 9);
    assert!(a.last_revision() > 0);
    assert!(a.size_on_disk().unwrap() > 0);
    a.sync().unwrap();
}

#[test]
fn concurrent_writers_in_two_instances_get_one_winner_per_version() {
    let (dir, etcd) = bare_etcd();
    let stores = [
        Arc::new(open_store(dir.path(), &etcd)),
        Arc::new(open_store(dir.path(), &etcd)),
    ];
    let (_, e0) = stores[0].epoch().unwrap();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let s = stores[i % 2].clone();
            std::thread::spawn(move || {
                let n = name("race/x");
                let mut won = 0u64;
                // Each thread commits 5 versions, rereading the head after each conflict.
                while won < 5 {
                    let head = s.head(&n).unwrap();
                    let next = head.map_or(1, |h| h.latest + 1);
                    if s.commit(&record("race/x", next), head).unwrap().is_ok() {
                        won += 1;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let versions: Vec<u64> = stores[1]
        .versions(&name("race/x"))
        .unwrap()
        .iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(versions, (1..=40).collect::<Vec<_>>());
    assert_eq!(stores[0].epoch().unwrap().1, e0 + 40);
}

#[test]
fn list_on_etcd_is_segment_aware_paginated_and_bounded() {
    let (dir, etcd) = bare_etcd();
    let store = open_store(dir.path(), &etcd);
    for n in ["p", "p/a", "p/b", "p/c", "p-x/a", "p.y", "q"] {
        store.commit(&record(n, 1), None).unwrap().unwrap();
    }
    let p = ranges(&["p"]);
    let all = |_: &SecretName| true;
    let page = store.list(&p, None, 2, 100, &all).unwrap();
    assert_eq!(texts(&page.names), ["p", "p/a"]);
    // Only the prefix's own keys were read: "p-x/a" and "p.y" lie between "p" and "p/a".
    assert_eq!(page.examined, 3);
    let page2 = store
        .list(&p, page.next_after.as_deref(), 2, 100, &all)
        .unwrap();
    assert_eq!(texts(&page2.names), ["p/b", "p/c"]);
    assert_eq!(page2.next_after, None);
    let mixed = ranges(&["q", "p-x", "p/b"]);
    let page = store.list(&mixed, None, 10, 100, &all).unwrap();
    assert_eq!(texts(&page.names), ["p-x/a", "p/b", "q"]);
    let everything = store.list(&ranges(&[""]), None, 100, 100, &all).unwrap();
    assert_eq!(everything.names.len(), 7);
    assert_eq!(store.list_keys_examined(), 3 + 2 + 3 + 7);
    assert_eq!(store.secret_count().unwrap(), 7);

    // The scan budget: at most `max_examined` keys per call, resumed after the last one.
    let mut want = Vec::new();
    for i in 0..30 {
        let n = format!("s/{i:02}");
        store.commit(&record(&n, 1), None).unwrap().unwrap();
        if i % 3 == 0 {
            want.push(n);
        }
    }
    store.delete(&name("s/03")).unwrap();
    want.retain(|n| n != "s/03");
    let visible = |n: &SecretName| n.as_str()[2..].parse::<u32>().unwrap() % 3 == 0;
    let s = ranges(&["s"]);
    let (mut got, mut after) = (Vec::new(), None);
    loop {
        let page = store.list(&s, after.as_deref(), 4, 7, &visible).unwrap();
        assert!(page.examined <= 7);
        assert!(page.names.len() <= 4);
        got.extend(page.names.iter().map(|n| n.as_str().to_owned()));
        after = page.next_after;
        if after.is_none() {
            break;
        }
    }
    assert_eq!(got, want);
    let page = store.list(&s, None, 4, 1, &visible).unwrap();
    assert_eq!(page.examined, 1);
    assert_eq!(page.next_after.as_deref(), Some("s/00"));
}

/// A service on etcd with calls bounded at 1 s.
fn start_on_etcd(env: &TestEnv) -> Server {
    env.start_with(&env.config(POLICY).with_etcd_timeout(1000), &[])
}

trait WithTimeout {
    fn with_etcd_timeout(self, ms: u64) -> Self;
}

impl WithTimeout for std::path::PathBuf {
    /// Rewrites the configuration's etcd deadline.
    fn with_etcd_timeout(self, ms: u64) -> Self {
        let text = std::fs::read_to_string(&self).unwrap();
        std::fs::write(
            &self,
            text.replace("etcd_timeout_ms = 2000", &format!("etcd_timeout_ms = {ms}")),
        )
        .unwrap();
        self
    }
}

/// Waits (up to 30 s) until health reports `want`.
async fn await_health(server: &Server, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = server.health().await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health stayed {now}, wanted {want}:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn with_deadline<T>(msg: T, d: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(d);
    r
}

#[tokio::test]
async fn a_frozen_etcd_answers_unavailable_within_the_deadline_and_the_service_recovers() {
    let env = TestEnv::on_etcd();
    let etcd = env.etcd.as_ref().unwrap();
    let server = start_on_etcd(&env);
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/a", b"before")).await.unwrap();
    await_health(&server, "Serving").await;

    etcd.pause();
    // Reads, writes and lists answer UNAVAILABLE (the store's 1 s deadline), not
    // DEADLINE_EXCEEDED (the caller's 8 s).
    let e = c
        .get_secret(with_deadline(get("payments/a"), Duration::from_secs(8)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("store is unavailable"), "{e:?}");
    let e = c
        .put_secret(with_deadline(
            put("payments/b", b"during"),
            Duration::from_secs(8),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e = c
        .list_secrets(with_deadline(
            crate::common::list("payments"),
            Duration::from_secs(8),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    await_health(&server, "NotServing").await;

    etcd.resume();
    // No restart: health and requests come back by themselves.
    await_health(&server, "Serving").await;
    c.put_secret(put("payments/b", b"after")).await.unwrap();
    let v = c.get_secret(get("payments/a")).await.unwrap().into_inner();
    assert_eq!(v.value, b"before");
    let v = c.get_secret(get("payments/b")).await.unwrap().into_inner();
    assert_eq!(v.value, b"after");
    assert!(server.log_text().contains("etcd is unreachable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_and_restarted_etcd_loses_no_acknowledged_write() {
    let env = TestEnv::on_etcd();
    let etcd = env.etcd.as_ref().unwrap();
    let server = start_on_etcd(&env);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Four writers, each its own names; every acknowledged write is remembered.
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let mut c = server.client("payments").await;
        let stop = stop.clone();
        writers.spawn(async move {
            let mut acked = BTreeMap::new();
            let mut codes = Vec::new();
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 100_000 {
                let n = format!("payments/w{w}/{i}");
                let value = format!("value {w} {i}");
                match c
                    .put_secret(with_deadline(
                        put(&n, value.as_bytes()),
                        Duration::from_secs(8),
                    ))
                    .await
                {
                    Ok(_) => {
                        acked.insert(n, value);
                    }
                    Err(e) => {
                        codes.push(e.code());
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                i += 1;
            }
            (acked, codes)
        });
    }
    let mut probe = server.client("payments").await;
    // At least one write went through before the kill.
    let wait = Instant::now() + Duration::from_secs(30);
    while probe.get_secret(get("payments/w0/0")).await.is_err() {
        assert!(Instant::now() < wait, "no write went through");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    etcd.kill();
    await_health(&server, "NotServing").await;
    etcd.restart();
    await_health(&server, "Serving").await;
    // Writes go through again without restarting the service.
    let wait = Instant::now() + Duration::from_secs(30);
    while probe.put_secret(put("payments/after", b"x")).await.is_err() {
        assert!(Instant::now() < wait, "writes did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    while let Some(r) = writers.join_next().await {
        let (acked, codes) = r.unwrap();
        // Only "not now" answers while etcd was away.
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, Code::Unavailable | Code::DeadlineExceeded)),
            "{codes:?}"
        );
        for (n, value) in acked {
            let got = probe.get_secret(get(&n)).await.unwrap().into_inner();
            assert_eq!(got.value, value.as_bytes(), "{n}");
            total += 1;
        }
    }
    assert!(total > 0);
    println!("{total} acknowledged writes all read back after the etcd restart");
}

/// The same writes on any store, spread over `stores` (instances of one store) in turn: two
/// versions of `a` then deleted, a policy in two revisions, the seeded marker, wrap counts and
/// `n` more names, enough for several pages of a scan.
fn fill(stores: &[&dyn Store], n: usize) {
    let s = |i: usize| stores[i % stores.len()];
    s(0).commit(&record("a", 1), None).unwrap().unwrap();
    let h = s(1).head(&name("a")).unwrap();
    s(1).commit(&record("a", 2), h).unwrap().unwrap();
    s(0).aux_put(Aux::Policy, "p", b"rev1").unwrap();
    s(1).aux_put(Aux::Policy, "p", b"rev2").unwrap();
    s(0).aux_put(Aux::Meta, "policy-seeded", b"1").unwrap();
    s(1).count_wraps(1, 3).unwrap();
    for i in 0..n {
        s(i).commit(&record(&format!("b/{i:04}"), 1), None)
            .unwrap()
            .unwrap();
    }
}

#[test]
fn the_commitment_on_etcd_follows_every_write_and_shows_each_record_edited_behind_its_back() {
    let (dir, etcd) = bare_etcd();
    let a = open_store(dir.path(), &etcd);
    let b = open_store(dir.path(), &etcd);
    let fresh = a.state().unwrap();
    assert_eq!(fresh.frame, FrameStatus::Valid);
    assert_eq!(fresh.epoch, 0);
    assert!(a.verify_state().unwrap().matches());
    const N: usize = 300;
    fill(&[&a, &b], N);
    let raw = |k: &str| k.as_bytes().to_vec();
    let old_head = etcd.read_prefix(&raw("strongroom/h/a"));
    let old_v1 = etcd.read_prefix(&raw("strongroom/r/a\0"));
    assert_eq!((old_head.len(), old_v1.len()), (1, 2));
    b.delete(&name("a")).unwrap();
    for s in [&a, &b] {
        let check = s.verify_state().unwrap();
        assert!(check.matches(), "{check:?}");
        // Each b/ name has a head and a version; then a's tombstone, the policy, the marker
        // and the wrap count.
        assert_eq!(check.records, 2 * N as u64 + 4);
    }
    let st = a.state().unwrap();
    assert_eq!(st.frame, FrameStatus::Valid);
    assert_eq!(st.epoch, 6 + N as u64 + 1);
    assert_eq!(b.state().unwrap(), st);

    // The same records give the same commitment on sled: one definition, one key layout.
    let sled_dir = tempfile::tempdir().unwrap();
    let sled = SledStore::open(sled_dir.path(), state_key(9)).unwrap();
    fill(&[&sled], N);
    sled.delete(&name("a")).unwrap();
    let on_sled = sled.state().unwrap();
    assert_eq!(
        (on_sled.commitment, on_sled.epoch),
        (st.commitment, st.epoch)
    );

    // Each edit made straight in etcd shows; putting the value back heals it.
    let cases: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![
        // A deleted secret's head and a version put back, genuine bytes.
        (old_head[0].0.clone(), Some(old_head[0].1.clone())),
        (old_v1[0].0.clone(), Some(old_v1[0].1.clone())),
        // An older policy revision; the seeded marker removed; a key outside the layout.
        (raw("strongroom/p/p"), Some(b"rev1".to_vec())),
        (raw("strongroom/m/policy-seeded"), None),
        (raw("strongroom/x/junk"), Some(b"x".to_vec())),
        (raw("strongroom/hjunk"), Some(b"x".to_vec())),
    ];
    for (key, tampered) in cases {
        let before = etcd.read_prefix(&key).into_iter().find(|(k, _)| *k == key);
        etcd.write_raw(&[(key.clone(), tampered)]);
        let check = a.verify_state().unwrap();
        assert!(!check.matches(), "{}", String::from_utf8_lossy(&key));
        etcd.write_raw(&[(key.clone(), before.map(|(_, v)| v))]);
        assert!(a.verify_state().unwrap().matches());
    }
    // A damaged ciphertext is the record's own AAD's to catch, not the store's.
    let (k, v) = etcd.read_prefix(&raw("strongroom/r/b/0007\0")).remove(0);
    let mut damaged = SealedRecord::decode(v.as_slice()).unwrap();
    damaged.ciphertext[0] ^= 1;
    etcd.write_raw(&[(k, Some(damaged.encode_to_vec()))]);
    assert!(a.verify_state().unwrap().matches());

    // Editing the epoch alone breaks the frame's tag.
    let e = a.epoch().unwrap().1;
    etcd.write_raw(&[(
        raw("strongroom/m/epoch"),
        Some((e + 5).to_be_bytes().to_vec()),
    )]);
    assert_eq!(b.state().unwrap().frame, FrameStatus::Forged);
    // Writes (from an instance whose view of the frame is stale) keep it unverifiable,
    // with the commitment still following them...
    a.commit(&record("c", 1), None).unwrap().unwrap();
    assert_eq!(a.state().unwrap().frame, FrameStatus::Forged);
    assert!(b.verify_state().unwrap().matches());
    // ...until it is re-based.
    let rebased = b.rebase_state().unwrap();
    assert_eq!(rebased.frame, FrameStatus::Valid);
    assert_eq!(a.state().unwrap(), rebased);
    a.commit(&record("d", 1), None).unwrap().unwrap();
    assert_eq!(a.state().unwrap().frame, FrameStatus::Valid);
    assert!(a.verify_state().unwrap().matches());

    // A record removed, then re-based: accepted as the new state.
    etcd.write_raw(&[(raw("strongroom/h/b/0003"), None)]);
    assert!(!a.verify_state().unwrap().matches());
    a.rebase_state().unwrap();
    assert!(b.verify_state().unwrap().matches());

    // Another key sees a forged frame; a frame removed is missing.
    let other = open_store_keyed(dir.path(), &etcd, 1);
    assert_eq!(other.state().unwrap().frame, FrameStatus::Forged);
    etcd.write_raw(&[(raw("strongroom/m/state"), None)]);
    assert_eq!(a.state().unwrap().frame, FrameStatus::Missing);
}

#[test]
fn scans_and_rebases_on_etcd_count_writes_made_meanwhile_by_another_instance() {
    let (dir, etcd) = bare_etcd();
    let a = Arc::new(open_store(dir.path(), &etcd));
    let b = Arc::new(open_store(dir.path(), &etcd));
    for i in 0..600 {
        a.commit(&record(&format!("s/{i:05}"), 1), None)
            .unwrap()
            .unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (b, stop) = (b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Early keys (already scanned), late keys (not yet) and deletions.
                let n = format!("s/{:05}", (i * 7919) % 600);
                let h = b.head(&name(&n)).unwrap();
                let next = h.map_or(1, |h| h.latest + 1);
                b.commit(&record(&n, next), h).unwrap().unwrap();
                if i % 5 == 0 {
                    b.delete(&name(&format!("s/{:05}", (i * 31) % 600)))
                        .unwrap();
                }
                i += 1;
            }
            i
        })
    };
    let writes_before = b.epoch().unwrap().1;
    for _ in 0..3 {
        let check = a.verify_state().unwrap();
        assert!(check.matches(), "{check:?}");
        // A re-base while the other instance writes keeps every write it missed.
        a.rebase_state().unwrap();
    }
    // Wait until the other instance wrote during the checks.
    while b.epoch().unwrap().1 < writes_before + 20 {
        std::thread::yield_now();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);
    assert!(a.verify_state().unwrap().matches());
    assert_eq!(a.state().unwrap().frame, FrameStatus::Valid);
}

/// Scans longer than one keys-only page (small pages here, so a few hundred records cross
/// many page bounds): every key is read once, at one revision, so the commitment, the record
/// count, the secret count and the officers' records are those of the same writes on sled,
/// and an edit made behind the store's back in any page shows.
#[test]
fn scans_cut_in_bounded_pages_read_every_key_once_as_on_sled() {
    let (dir, etcd) = bare_etcd();
    // 7 records per value call, 50 keys per keys-only call: a scan of the ~700 keys below
    // takes 14 keys-only pages, most cut into 8 bounded value calls, the last one short.
    let small = open_store(dir.path(), &etcd).with_scan_pages(7, 50);
    let default = open_store(dir.path(), &etcd);
    const N: usize = 330;
    fill(&[&small, &default], N);
    for i in 0..60 {
        small
            .aux_put(Aux::Policy, &format!("q{i:02}"), b"rule")
            .unwrap();
    }
    // One name with more versions than a value call holds.
    for v in 1..=20 {
        let h = small.head(&name("many")).unwrap();
        small.commit(&record("many", v), h).unwrap().unwrap();
    }

    let sled_dir = tempfile::tempdir().unwrap();
    let sled = SledStore::open(sled_dir.path(), state_key(9)).unwrap();
    fill(&[&sled], N);
    for i in 0..60 {
        sled.aux_put(Aux::Policy, &format!("q{i:02}"), b"rule")
            .unwrap();
    }
    for v in 1..=20 {
        let h = sled.head(&name("many")).unwrap();
        sled.commit(&record("many", v), h).unwrap().unwrap();
    }
    let on_sled = sled.verify_state().unwrap();
    assert!(on_sled.matches());

    for s in [&small, &default] {
        let check = s.verify_state().unwrap();
        assert!(check.matches(), "{check:?}");
        assert_eq!(check.computed, on_sled.computed);
        assert_eq!(check.records, on_sled.records);
        assert_eq!(s.secret_count().unwrap(), sled.secret_count().unwrap());
        assert_eq!(
            s.aux_list(Aux::Policy).unwrap(),
            sled.aux_list(Aux::Policy).unwrap()
        );
        let versions: Vec<u64> = s
            .versions(&name("many"))
            .unwrap()
            .iter()
            .map(|r| r.version)
            .collect();
        assert_eq!(versions, (1..=20).collect::<Vec<u64>>());
    }
    assert_eq!(small.state().unwrap().commitment, on_sled.computed);

    // A record changed, removed or added behind the store's back, in the first page, in the
    // middle of the scan and in its last page: each shows, and putting it back heals it.
    let raw = |k: &str| k.as_bytes().to_vec();
    let mut cases: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    for n in ["b/0000", "b/0164", "b/0329"] {
        let (k, v) = etcd
            .read_prefix(&raw(&format!("strongroom/r/{n}\0")))
            .remove(0);
        let mut other = SealedRecord::decode(v.as_slice()).unwrap();
        other.created_by = "someone else".into();
        cases.push((k.clone(), Some(other.encode_to_vec())));
        cases.push((k, None));
        cases.push((raw(&format!("strongroom/h/{n}")), None));
    }
    cases.push((raw("strongroom/h/b/0164x"), Some(b"x".to_vec())));
    cases.push((raw("strongroom/p/q59"), None));
    for (key, tampered) in cases {
        let before = etcd.read_prefix(&key).into_iter().find(|(k, _)| *k == key);
        etcd.write_raw(&[(key.clone(), tampered)]);
        let check = small.verify_state().unwrap();
        assert!(!check.matches(), "{}", String::from_utf8_lossy(&key));
        etcd.write_raw(&[(key.clone(), before.map(|(_, v)| v))]);
        assert!(small.verify_state().unwrap().matches());
    }
}

/// Opening a store that has its identity changes nothing (and sends etcd no compare over the
/// whole store, which etcd would evaluate by reading every key); a filled store whose identity
/// was removed gets a new one and no commitment, so the start check decides whether to trust
/// it, as on sled.
#[test]
fn opening_keeps_an_identity_and_gives_a_filled_store_without_one_no_commitment() {
    let (dir, etcd) = bare_etcd();
    let a = open_store(dir.path(), &etcd);
    assert_eq!(a.state().unwrap().frame, FrameStatus::Valid);
    fill(&[&a], 3);
    let before = a.state().unwrap();
    drop(a);
    let b = open_store(dir.path(), &etcd);
    assert_eq!(b.state().unwrap(), before);
    assert!(b.verify_state().unwrap().matches());
    drop(b);

    let raw = |k: &str| k.as_bytes().to_vec();
    etcd.write_raw(&[
        (raw("strongroom/m/store-id"), None),
        (raw("strongroom/m/state"), None),
    ]);
    let c = open_store(dir.path(), &etcd);
    let st = c.state().unwrap();
    assert!(!st.store_id.is_empty());
    assert_ne!(st.store_id, before.store_id);
    assert_eq!(st.frame, FrameStatus::Missing);
    assert_eq!(c.get(&name("b/0002"), 1).unwrap().unwrap().version, 1);
}
