//! Unit tests of the sled store: its key layout, commits, scans, leases and the
//! commitment it keeps.

use super::*;
use crate::secret::NamePrefix;
use crate::store::ChangeKind;

fn name(s: &str) -> SecretName {
    SecretName::parse(s, 256).unwrap()
}

fn test_key() -> StateKey {
    StateKey::new(&zeroize::Zeroizing::new([9; 32]))
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
        ..Default::default()
    }
}

/// `threads` writers committing `each` records to their own names: (commits/s, syncs).
fn concurrent_commits(threads: usize, each: usize) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(SledStore::open(dir.path(), test_key()).unwrap());
    let before = store.syncs();
    let start = std::time::Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for v in 1..=each as u64 {
                    let n = format!("w{t}/n");
                    let expected = (v > 1).then_some(Head {
                        latest: v - 1,
                        oldest: 1,
                        ..Head::default()
                    });
                    store.commit(&record(&n, v), expected).unwrap().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let rate = (threads * each) as f64 / start.elapsed().as_secs_f64();
    (rate, store.syncs() - before)
}

#[test]
fn every_commit_is_covered_by_a_sync_and_syncs_never_outnumber_commits() {
    let (_, syncs) = concurrent_commits(8, 10);
    assert!((1..=80).contains(&syncs), "{syncs} syncs for 80 commits");
}

/// `cargo test --release --lib measure_group_commit -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a test"]
fn measure_group_commit() {
    for threads in [1, 32] {
        let each = if threads == 1 { 400 } else { 40 };
        let (rate, syncs) = concurrent_commits(threads, each);
        println!(
            "SledStore::commit, {threads} writers: {rate:.0} commits/s, {} commits per sync",
            (threads * each) as f64 / syncs.max(1) as f64
        );
    }
}

#[test]
fn check_and_set_versions_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), test_key()).unwrap();
    let n = name("a/b");
    assert_eq!(store.head(&n).unwrap(), None);
    store.commit(&record("a/b", 1), None).unwrap().unwrap();
    let h1 = store.head(&n).unwrap();
    assert_eq!(
        h1,
        Some(Head {
            latest: 1,
            deleted: false,
            oldest: 1,
            max_versions: 0,
        })
    );
    // A writer that read the head before version 1 loses.
    assert_eq!(
        store.commit(&record("a/b", 1), None).unwrap(),
        Err(VersionConflict { actual: 1 })
    );
    store.commit(&record("a/b", 2), h1).unwrap().unwrap();
    assert_eq!(store.versions(&n).unwrap().len(), 2);
    assert_eq!(store.delete(&n).unwrap(), 2);
    assert_eq!(store.versions(&n).unwrap().len(), 0);
    // Versions are never reused after deletion.
    assert_eq!(
        store.head(&n).unwrap(),
        Some(Head {
            latest: 2,
            deleted: true,
            oldest: 3,
            max_versions: 0,
        })
    );
    assert_eq!(store.head(&n).unwrap().unwrap().live(), 0);
}

#[test]
fn max_versions_destroys_older_versions_in_the_same_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), test_key()).unwrap();
    let n = name("a/b");
    let mut head = None;
    for v in 1..=5 {
        store.commit(&record("a/b", v), head).unwrap().unwrap();
        head = store.head(&n).unwrap();
    }
    store
        .commit_keeping(&record("a/b", 6), head, Some(2))
        .unwrap()
        .unwrap();
    let kept: Vec<u64> = store
        .versions(&n)
        .unwrap()
        .iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(kept, vec![5, 6]);
    let head = store.head(&n).unwrap();
    assert_eq!(head.map(|h| (h.oldest, h.max_versions)), Some((5, 2)));
    store.commit(&record("a/b", 7), head).unwrap().unwrap();
    let kept: Vec<u64> = store
        .versions(&n)
        .unwrap()
        .iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(kept, vec![6, 7]);
    // The commitment followed every destroyed version.
    assert!(store.verify_state().unwrap().matches());
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

#[test]
fn list_is_segment_aware_and_paginated() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), test_key()).unwrap();
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
    let only_b = |n: &SecretName| n.as_str() == "p/b";
    assert_eq!(
        texts(&store.list(&p, None, 10, 100, &only_b).unwrap().names),
        ["p/b"]
    );
    // Several disjoint prefixes come back in name order.
    let mixed = ranges(&["q", "p-x", "p/b"]);
    let page = store.list(&mixed, None, 10, 100, &all).unwrap();
    assert_eq!(texts(&page.names), ["p-x/a", "p/b", "q"]);
    assert_eq!(page.examined, 3);
    let everything = store.list(&ranges(&[""]), None, 100, 100, &all).unwrap();
    assert_eq!(everything.names.len(), 7);
    assert_eq!(store.list_keys_examined(), 3 + 2 + 4 + 3 + 7);
    assert!(
        store
            .list(&[], None, 10, 100, &all)
            .unwrap()
            .names
            .is_empty()
    );
    assert_eq!(store.secret_count().unwrap(), 7);
    assert_eq!(store.count_wraps(1, 1).unwrap(), 1);
    assert_eq!(store.count_wraps(1, 2).unwrap(), 3);
}

#[test]
fn list_stops_at_its_budget_and_resumes_after_the_last_key_examined() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), test_key()).unwrap();
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
    let all = ranges(&["s"]);
    let mut got = Vec::new();
    let mut after = None;
    let mut calls = 0;
    loop {
        let page = store.list(&all, after.as_deref(), 4, 7, &visible).unwrap();
        assert!(page.examined <= 7);
        assert!(page.names.len() <= 4);
        got.extend(page.names.iter().map(|n| n.as_str().to_owned()));
        calls += 1;
        after = page.next_after;
        if after.is_none() {
            break;
        }
    }
    assert_eq!(got, want);
    assert!(calls >= 30 / 7, "{calls}");
    // A budget of one key still makes progress.
    let page = store.list(&all, None, 4, 1, &visible).unwrap();
    assert_eq!(page.examined, 1);
    assert_eq!(page.next_after.as_deref(), Some("s/00"));
}

#[tokio::test]
async fn an_expiry_notice_is_one_logged_committed_event_and_its_removal_none() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), test_key()).unwrap();
    let mut feed = store.watch(0).unwrap();
    store.commit(&record("a", 1), None).unwrap().unwrap();
    let created = feed.next().await.unwrap().unwrap();
    let key = crate::store::notice_key(&name("a"), 1);
    store
        .aux_put(Aux::Notice, &key, &7i64.to_be_bytes())
        .unwrap();
    let e = feed.next().await.unwrap().unwrap();
    assert_eq!(
        (e.name.as_str(), e.version, e.kind),
        ("a", 1, ChangeKind::ExpiringSoon)
    );
    assert!(e.revision > created.revision);
    // In the commitment like any record: a full scan agrees with the kept value.
    assert!(store.verify_state().unwrap().matches());
    // Its removal, and a later write that is no notice, log nothing; the next head
    // change comes next.
    assert!(store.aux_delete(Aux::Notice, &key).unwrap());
    store.aux_put(Aux::Meta, "other", b"x").unwrap();
    let h = store.head(&name("a")).unwrap();
    store.commit(&record("a", 2), h).unwrap().unwrap();
    let next = feed.next().await.unwrap().unwrap();
    assert_eq!((next.version, next.kind), (2, ChangeKind::Updated));
    // A resumed reader replays the notice at its revision.
    let mut again = store.watch(created.revision).unwrap();
    assert_eq!(again.next().await.unwrap().unwrap(), e);
    assert!(store.verify_state().unwrap().matches());
}

#[tokio::test]
async fn the_change_log_keeps_its_history_and_says_when_a_reader_is_too_far_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), test_key())
        .unwrap()
        .with_change_history(3);
    let mut feed = store.watch(0).unwrap();
    store.commit(&record("a", 1), None).unwrap().unwrap();
    let first = feed.next().await.unwrap().unwrap();
    assert_eq!(
        (first.name.as_str(), first.kind),
        ("a", ChangeKind::Created)
    );
    // A reader that keeps up sees every change, however short the history.
    for v in 2..=5 {
        let h = store.head(&name("a")).unwrap();
        store.commit(&record("a", v), h).unwrap().unwrap();
        let e = feed.next().await.unwrap().unwrap();
        assert_eq!((e.version, e.kind), (v, ChangeKind::Updated));
    }
    store.delete(&name("a")).unwrap();
    let e = feed.next().await.unwrap().unwrap();
    assert_eq!((e.version, e.kind), (5, ChangeKind::Deleted));
    // One that lags past the history is told so rather than skipping events.
    let mut slow = store.watch(e.revision).unwrap();
    for v in 6..=10 {
        let h = store.head(&name("a")).unwrap();
        store.commit(&record("a", v), h).unwrap().unwrap();
    }
    assert!(matches!(
        slow.next().await,
        Some(Err(FeedError::Compacted { .. }))
    ));
    // Three revisions kept: a reader at the first event is too far behind.
    match store.watch(first.revision) {
        Err(FeedError::Compacted { oldest, .. }) => assert!(oldest > first.revision + 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.db.scan_prefix([CHANGES]).count(),
        3,
        "trimmed to the history"
    );
    assert!(matches!(store.watch(1 << 40), Err(FeedError::Ahead { .. })));
    assert!(store.verify_state().unwrap().matches());
}

#[test]
fn the_commitment_follows_every_write_and_shows_a_record_put_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), test_key()).unwrap();
    let fresh = store.state().unwrap();
    assert_eq!(fresh.frame, FrameStatus::Valid);
    assert_eq!(fresh.commitment, Commitment::EMPTY);
    assert!(store.verify_state().unwrap().matches());
    store.commit(&record("a", 1), None).unwrap().unwrap();
    let h = store.head(&name("a")).unwrap();
    store.commit(&record("a", 2), h).unwrap().unwrap();
    store.aux_put(Aux::Policy, "p", b"rev1").unwrap();
    store.aux_put(Aux::Policy, "p", b"rev2").unwrap();
    store.aux_put(Aux::Meta, "policy-seeded", b"1").unwrap();
    store.count_wraps(1, 3).unwrap();
    // Enough keys for several scan steps.
    for i in 0..(SCAN_STEP + 10) {
        store
            .commit(&record(&format!("b/{i:04}"), 1), None)
            .unwrap()
            .unwrap();
    }
    let old_head = store.db.get(head_key(&name("a"))).unwrap().unwrap();
    let old_v1 = store.db.get(record_key(&name("a"), 1)).unwrap().unwrap();
    store.delete(&name("a")).unwrap();
    let check = store.verify_state().unwrap();
    assert!(check.matches(), "{check:?}");
    // Each b/ name has a head and a version; then a's tombstone, the policy, the marker and
    // the wrap count (the change log is outside the commitment).
    assert_eq!(check.records, 2 * (SCAN_STEP + 10) as u64 + 4);
    let st = store.state().unwrap();
    assert_eq!(st.frame, FrameStatus::Valid);
    assert_eq!(st.epoch, 6 + (SCAN_STEP + 10) as u64 + 1);

    // Each tampering outside the service shows; putting the value back heals it.
    let k = |key: Vec<u8>| key;
    let cases: Vec<(Vec<u8>, Option<IVec>)> = vec![
        (k(head_key(&name("a"))), Some(old_head)),
        (k(record_key(&name("a"), 1)), Some(old_v1)),
        (k(aux_key(Aux::Policy, "p")), Some(IVec::from(&b"rev1"[..]))),
        (k(aux_key(Aux::Meta, "policy-seeded")), None),
        (k(aux_key(Aux::Meta, "junk")), Some(IVec::from(&b"x"[..]))),
    ];
    for (key, tampered) in cases {
        let before = store.db.get(&key).unwrap();
        match &tampered {
            Some(v) => store.db.insert(&key, v.clone()).unwrap(),
            None => store.db.remove(&key).unwrap(),
        };
        assert!(
            !store.verify_state().unwrap().matches(),
            "{}",
            String::from_utf8_lossy(&key)
        );
        match before {
            Some(v) => store.db.insert(&key, v).unwrap(),
            None => store.db.remove(&key).unwrap(),
        };
        assert!(store.verify_state().unwrap().matches());
    }

    // Editing the epoch alone breaks the frame's tag.
    let epoch = aux_key(Aux::Meta, EPOCH);
    let e = store.read_epoch().unwrap();
    store
        .db
        .insert(&epoch, (e + 5).to_be_bytes().to_vec())
        .unwrap();
    assert_eq!(store.state().unwrap().frame, FrameStatus::Forged);
    // Writes keep it unverifiable, with the commitment still following them...
    store.commit(&record("c", 1), None).unwrap().unwrap();
    assert_eq!(store.state().unwrap().frame, FrameStatus::Forged);
    assert!(store.verify_state().unwrap().matches());
    // ...until it is re-based.
    let rebased = store.rebase_state().unwrap();
    assert_eq!(rebased.frame, FrameStatus::Valid);
    assert_eq!(store.state().unwrap(), rebased);

    // A record put back, then re-based: accepted as the new state.
    store.db.remove(record_key(&name("b/0003"), 1)).unwrap();
    assert!(!store.verify_state().unwrap().matches());
    store.rebase_state().unwrap();
    assert!(store.verify_state().unwrap().matches());

    // Another key sees a forged frame.
    drop(store);
    let other =
        SledStore::open(dir.path(), StateKey::new(&zeroize::Zeroizing::new([1; 32]))).unwrap();
    assert_eq!(other.state().unwrap().frame, FrameStatus::Forged);
}

#[test]
fn a_scan_counts_writes_made_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(SledStore::open(dir.path(), test_key()).unwrap());
    for i in 0..1200 {
        store
            .commit(&record(&format!("s/{i:05}"), 1), None)
            .unwrap()
            .unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Early keys (already scanned), late keys (not yet) and deletions.
                let n = format!("s/{:05}", (i * 7919) % 1200);
                let h = store.head(&name(&n)).unwrap();
                let next = h.map_or(1, |h| h.latest + 1);
                store.commit(&record(&n, next), h).unwrap().unwrap();
                if i % 5 == 0 {
                    store
                        .delete(&name(&format!("s/{:05}", (i * 31) % 1200)))
                        .unwrap();
                }
                i += 1;
            }
            i
        })
    };
    for _ in 0..5 {
        let check = store.verify_state().unwrap();
        assert!(check.matches(), "{check:?}");
    }
    stop.store(true, Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);
    assert!(store.verify_state().unwrap().matches());
}

#[test]
fn replace_records_replaces_only_what_is_unchanged_and_keeps_the_commitment() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), test_key()).unwrap();
    let lock = store
        .try_lock("job/rewrap", "test", Duration::from_secs(30))
        .unwrap()
        .unwrap();
    store.commit(&record("a/x", 1), None).unwrap().unwrap();
    store.commit(&record("a/y", 1), None).unwrap().unwrap();
    let resealed = |r: &SealedRecord| SealedRecord {
        master_key_version: 2,
        ..r.clone()
    };
    let x = store.get(&name("a/x"), 1).unwrap().unwrap();
    // y as a reader saw it before someone else changed it.
    let stale_y = SealedRecord {
        ciphertext: vec![9; 20],
        ..record("a/y", 1)
    };
    let done = store
        .replace_records(
            &lock,
            &[
                (x.clone(), resealed(&x)),
                (stale_y.clone(), resealed(&stale_y)),
            ],
        )
        .unwrap()
        .unwrap();
    assert_eq!(done, vec![true, false]);
    assert_eq!(
        store
            .get(&name("a/x"), 1)
            .unwrap()
            .unwrap()
            .master_key_version,
        2
    );
    assert_eq!(
        store.get(&name("a/y"), 1).unwrap().unwrap(),
        record("a/y", 1)
    );
    // A deleted record is not brought back.
    let y = record("a/y", 1);
    store.delete(&name("a/y")).unwrap();
    let done = store
        .replace_records(&lock, &[(y.clone(), resealed(&y))])
        .unwrap()
        .unwrap();
    assert_eq!(done, vec![false]);
    assert!(store.get(&name("a/y"), 1).unwrap().is_none());
    assert!(store.verify_state().unwrap().matches());
    // A record may not change identity, and a lock given up fences the write.
    let moved = SealedRecord {
        version: 2,
        ..resealed(&x)
    };
    assert!(store.replace_records(&lock, &[(x.clone(), moved)]).is_err());
    store.unlock(&lock).unwrap();
    assert!(
        store
            .replace_records(&lock, &[(x.clone(), resealed(&x))])
            .unwrap()
            .is_err()
    );
}

/// The records read in place are exactly the records an export reads (heads, aux and
/// the change log left out), in the same order, byte for byte.
#[test]
fn for_each_record_reads_every_record_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), test_key()).unwrap();
    for (n, v) in [("a/x", 1), ("a/z", 1), ("b/y", 1), ("c", 1)] {
        store.commit(&record(n, v), None).unwrap().unwrap();
    }
    store.aux_put(Aux::Meta, "rewrap", b"{}").unwrap();
    let mut seen = Vec::new();
    store
        .for_each_record(&mut |v| seen.push(v.to_vec()))
        .unwrap();
    let mut exported = Vec::new();
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let page = store.export_page(cursor.as_deref(), 2).unwrap();
        exported.extend(
            page.pairs
                .into_iter()
                .filter(|(k, _)| k.first() == Some(&RECORD))
                .map(|(_, v)| v),
        );
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, exported);
    let names: Vec<(String, u64)> = seen
        .iter()
        .map(|v| {
            let r = SealedRecord::decode(v.as_slice()).unwrap();
            (r.name, r.version)
        })
        .collect();
    assert_eq!(
        names,
        [("a/x", 1), ("a/z", 1), ("b/y", 1), ("c", 1)].map(|(n, v)| (n.to_owned(), v))
    );
}
