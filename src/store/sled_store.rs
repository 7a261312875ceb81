//! The embedded store: one sled tree, keys laid out by kind.
//!
//! Keys: `h` + name → [`HeadV1`](crate::proto::HeadV1); `r` + name + `\0` + version (8 bytes
//! big-endian) → [`SealedRecordV1`](crate::proto::SealedRecordV1); `w` + master key version
//! (4 bytes big-endian) → wrap count (8 bytes big-endian); `p`, `a`, `m` + key → policies,
//! approvals and bookkeeping that officers manage. Names never contain `\0`, so a
//! name's records are exactly the keys under `r` + name + `\0`.
//!
//! Writes take one process-wide lock for check-and-set, apply one atomic batch, and return
//! after sled's `flush` and a real fsync of the store's files shared with concurrent writers
//! (`StoreSync`). sled is single-process: the directory is locked while open.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use sled::{Batch, IVec};

use super::durable::StoreSync;
use super::{Aux, Head, NameRange, Page, Store, StoreError, VersionConflict};
use crate::proto::HeadV1;
use crate::secret::{SealedRecord, SecretName};

const HEAD: u8 = b'h';
const RECORD: u8 = b'r';
const WRAPS: u8 = b'w';
const POLICY: u8 = b'p';
const APPROVAL: u8 = b'a';
const META: u8 = b'm';
/// Meta keys: the store's random identity and its write counter.
const STORE_ID: &str = "store-id";
const EPOCH: &str = "epoch";

/// The sled-backed store.
pub struct SledStore {
    db: sled::Db,
    sync: StoreSync,
    write_lock: Mutex<()>,
    /// Keys `list` has examined, for the admin plane's status.
    examined: AtomicU64,
}

impl SledStore {
    /// Opens (or creates) the store at `path` with the default page cache.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, super::DEFAULT_CACHE_MB)
    }

    /// Opens (or creates) the store at `path` with a page cache of `cache_mb` MiB.
    pub fn open_with_cache(path: &Path, cache_mb: u64) -> Result<Self, StoreError> {
        let db = open_db(path, cache_mb.saturating_mul(1 << 20))?;
        let sync = StoreSync::open(path).map_err(StoreError::Sync)?;
        if db.get(aux_key(Aux::Meta, STORE_ID))?.is_none() {
            // A new store: give it an identity, so the token's epoch checkpoint can tell it
            // from an older copy of another store.
            use ring::rand::SecureRandom;
            let mut id = [0u8; 16];
            ring::rand::SystemRandom::new()
                .fill(&mut id)
                .map_err(|_| StoreError::Corrupt {
                    key: STORE_ID.into(),
                    reason: "the system random generator failed".into(),
                })?;
            db.insert(aux_key(Aux::Meta, STORE_ID), hex::encode(id).as_bytes())?;
            db.flush()?;
            sync.sync().map_err(StoreError::Sync)?;
        }
        Ok(Self {
            db,
            sync,
            write_lock: Mutex::new(()),
            examined: AtomicU64::new(0),
        })
    }

    /// Makes every applied batch durable: sled's flush (`sync_file_range`, which promises
    /// nothing after a power cut), then a real fsync shared with concurrent writers.
    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.sync.sync().map_err(StoreError::Sync)
    }

    /// Syncs run since the store was opened (each may cover several writes).
    pub fn syncs(&self) -> u64 {
        self.sync.syncs.load(Ordering::Relaxed)
    }

    /// Adds the epoch bump to a batch (the caller holds the write lock).
    fn bump_epoch(&self, batch: &mut Batch) -> Result<(), StoreError> {
        let next = self.read_epoch()? + 1;
        batch.insert(aux_key(Aux::Meta, EPOCH), next.to_be_bytes().to_vec());
        Ok(())
    }

    fn read_epoch(&self) -> Result<u64, StoreError> {
        Ok(self
            .db
            .get(aux_key(Aux::Meta, EPOCH))?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    fn read_head(&self, name: &SecretName) -> Result<Option<Head>, StoreError> {
        self.db
            .get(head_key(name))?
            .map(|v| decode_head(name, &v))
            .transpose()
    }
}

impl Store for SledStore {
    fn head(&self, name: &SecretName) -> Result<Option<Head>, StoreError> {
        self.read_head(name)
    }

    fn commit(
        &self,
        record: &SealedRecord,
        expected: Option<Head>,
    ) -> Result<Result<(), VersionConflict>, StoreError> {
        let name = SecretName::parse(&record.name, crate::secret::MAX_NAME_BYTES_CEILING).map_err(
            |e| StoreError::Corrupt {
                key: record.name.clone(),
                reason: e.to_string(),
            },
        )?;
        {
            let _guard = self.write_lock.lock().map_err(|_| StoreError::Poisoned)?;
            let current = self.read_head(&name)?;
            if current != expected {
                return Ok(Err(VersionConflict {
                    actual: current.map_or(0, |h| h.live()),
                }));
            }
            let head = HeadV1 {
                latest_version: record.version,
                deleted: false,
            };
            let mut batch = Batch::default();
            batch.insert(head_key(&name), head.encode_to_vec());
            batch.insert(record_key(&name, record.version), record.encode_to_vec());
            self.bump_epoch(&mut batch)?;
            self.db.apply_batch(batch)?;
        }
        // Acknowledge only once durable. Flushing outside the lock lets concurrent writers
        // share sled's write-out and one fsync (StoreSync).
        self.flush()?;
        Ok(Ok(()))
    }

    fn get(&self, name: &SecretName, version: u64) -> Result<Option<SealedRecord>, StoreError> {
        let key = record_key(name, version);
        self.db
            .get(&key)?
            .map(|v| decode_record(&key, &v))
            .transpose()
    }

    fn versions(&self, name: &SecretName) -> Result<Vec<SealedRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(record_prefix(name)) {
            let (k, v) = kv?;
            out.push(decode_record(&k, &v)?);
        }
        Ok(out)
    }

    fn list(
        &self,
        ranges: &[NameRange],
        after: Option<&str>,
        limit: usize,
        max_examined: u64,
        visible: &dyn Fn(&SecretName) -> bool,
    ) -> Result<Page, StoreError> {
        // A call always makes progress.
        let (limit, max_examined) = (limit.max(1), max_examined.max(1));
        // Resume strictly after `after`: names never contain `\0`, so `after\0` is the next
        // possible name.
        let resume = after.map(|a| {
            let mut k = vec![HEAD];
            k.extend_from_slice(a.as_bytes());
            k.push(0);
            k
        });
        let mut names: Vec<SecretName> = Vec::new();
        let mut examined = 0u64;
        let mut next_after = None;
        'ranges: for range in ranges {
            let mut start = vec![HEAD];
            start.extend_from_slice(range.start.as_bytes());
            if let Some(r) = &resume
                && *r > start
            {
                start.clone_from(r);
            }
            let end = match &range.end {
                Some(e) => {
                    let mut k = vec![HEAD];
                    k.extend_from_slice(e.as_bytes());
                    k
                }
                // Every head: the keys of the next kind start with the next tag.
                None => vec![HEAD + 1],
            };
            if start >= end {
                continue;
            }
            for kv in self.db.range(start..end) {
                let (k, v) = kv?;
                examined += 1;
                self.examined.fetch_add(1, Ordering::Relaxed);
                let text = std::str::from_utf8(&k[1..]).map_err(|e| corrupt(&k, e))?;
                let name = SecretName::parse(text, crate::secret::MAX_NAME_BYTES_CEILING)
                    .map_err(|e| corrupt(&k, e))?;
                if !decode_head(&name, &v)?.deleted && visible(&name) {
                    if names.len() >= limit {
                        // One more name exists: the next page starts after this page's last.
                        next_after = names.last().map(|n| n.as_str().to_owned());
                        break 'ranges;
                    }
                    names.push(name);
                }
                if examined >= max_examined {
                    // The budget is spent: the caller resumes after the last key examined.
                    next_after = Some(text.to_owned());
                    break 'ranges;
                }
            }
        }
        Ok(Page {
            names,
            next_after,
            examined,
        })
    }

    fn list_keys_examined(&self) -> u64 {
        self.examined.load(Ordering::Relaxed)
    }

    fn delete(&self, name: &SecretName) -> Result<u64, StoreError> {
        let destroyed = {
            let _guard = self.write_lock.lock().map_err(|_| StoreError::Poisoned)?;
            let Some(head) = self.read_head(name)? else {
                return Ok(0);
            };
            let mut batch = Batch::default();
            let mut destroyed = 0;
            for k in self.db.scan_prefix(record_prefix(name)).keys() {
                batch.remove(k?);
                destroyed += 1;
            }
            let tomb = HeadV1 {
                latest_version: head.latest,
                deleted: true,
            };
            batch.insert(head_key(name), tomb.encode_to_vec());
            self.bump_epoch(&mut batch)?;
            self.db.apply_batch(batch)?;
            destroyed
        };
        self.flush()?;
        Ok(destroyed)
    }

    fn count_wraps(&self, mk: u32, n: u64) -> Result<u64, StoreError> {
        let mut key = vec![WRAPS];
        key.extend_from_slice(&mk.to_be_bytes());
        let total = self.db.update_and_fetch(&key, |old| {
            let old = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            Some(old.saturating_add(n).to_be_bytes().to_vec())
        })?;
        let total = total
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        Ok(total)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    fn aux_get(&self, ns: Aux, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(aux_key(ns, key))?.map(|v| v.to_vec()))
    }

    fn aux_put(&self, ns: Aux, key: &str, value: &[u8]) -> Result<(), StoreError> {
        {
            let _guard = self.write_lock.lock().map_err(|_| StoreError::Poisoned)?;
            let mut batch = Batch::default();
            batch.insert(aux_key(ns, key), value);
            self.bump_epoch(&mut batch)?;
            self.db.apply_batch(batch)?;
        }
        self.flush()?;
        Ok(())
    }

    fn aux_delete(&self, ns: Aux, key: &str) -> Result<bool, StoreError> {
        let existed = {
            let _guard = self.write_lock.lock().map_err(|_| StoreError::Poisoned)?;
            let existed = self.db.get(aux_key(ns, key))?.is_some();
            let mut batch = Batch::default();
            batch.remove(aux_key(ns, key));
            self.bump_epoch(&mut batch)?;
            self.db.apply_batch(batch)?;
            existed
        };
        self.flush()?;
        Ok(existed)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.flush()?;
        Ok(())
    }

    fn epoch(&self) -> Result<(String, u64), StoreError> {
        let id = self
            .db
            .get(aux_key(Aux::Meta, STORE_ID))?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        Ok((id, self.read_epoch()?))
    }

    fn aux_list(&self, ns: Aux) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix([aux_tag(ns)]) {
            let (k, v) = kv?;
            let key = String::from_utf8(k[1..].to_vec()).map_err(|e| corrupt(&k, e))?;
            out.push((key, v.to_vec()));
        }
        Ok(out)
    }

    fn secret_count(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        for kv in self.db.scan_prefix([HEAD]) {
            let (k, v) = kv?;
            let head = HeadV1::decode(v.as_ref()).map_err(|e| corrupt(&k, e))?;
            if !head.deleted {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Opens sled, turning its failures (and the panics its recovery can raise on some damaged
/// files, e.g. "tried to serialize Uninitialized") into an error that names the store, so the
/// service exits with a message instead of a backtrace and a crash loop.
fn open_db(path: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let fail = |reason: String| StoreError::Open {
        path: path.display().to_string(),
        reason,
    };
    // While sled recovers, a panic is a finding about the files: log it as such (the default
    // hook would print a backtrace that reads like a bug in the service) and turn it into an
    // error below. Opening happens once, at start.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(%what, "sled failed while recovering the store's files");
    }));
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
    }));
    std::panic::set_hook(previous_hook);
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(sled::Error::Io(e))) if e.kind() == std::io::ErrorKind::WouldBlock => Err(fail(
            format!("{e}; is another strongroomd using the same store.path?"),
        )),
        Ok(Err(e @ sled::Error::Corruption { .. })) => Err(fail(format!(
            "{e}: the store's files are damaged; restore them from a backup (the rollback check will ask officers to accept it)"
        ))),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(fail(
            "sled failed while recovering the files: they are damaged; restore them from a backup"
                .into(),
        )),
    }
}

fn aux_tag(ns: Aux) -> u8 {
    match ns {
        Aux::Policy => POLICY,
        Aux::Approval => APPROVAL,
        Aux::Meta => META,
    }
}

fn aux_key(ns: Aux, key: &str) -> Vec<u8> {
    let mut k = vec![aux_tag(ns)];
    k.extend_from_slice(key.as_bytes());
    k
}

fn head_key(name: &SecretName) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.as_str().len());
    k.push(HEAD);
    k.extend_from_slice(name.as_str().as_bytes());
    k
}

fn record_prefix(name: &SecretName) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + name.as_str().len());
    k.push(RECORD);
    k.extend_from_slice(name.as_str().as_bytes());
    k.push(0);
    k
}

fn record_key(name: &SecretName, version: u64) -> Vec<u8> {
    let mut k = record_prefix(name);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn decode_head(name: &SecretName, v: &IVec) -> Result<Head, StoreError> {
    let h = HeadV1::decode(v.as_ref()).map_err(|e| corrupt(&head_key(name), e))?;
    Ok(Head {
        latest: h.latest_version,
        deleted: h.deleted,
    })
}

fn decode_record(key: &[u8], v: &IVec) -> Result<SealedRecord, StoreError> {
    SealedRecord::decode(v.as_ref()).map_err(|e| corrupt(key, e))
}

fn corrupt(key: &[u8], e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::NamePrefix;

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
        }
    }

    /// `threads` writers committing `each` records to their own names: (commits/s, syncs).
    fn concurrent_commits(threads: usize, each: usize) -> (f64, u64) {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
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
                            deleted: false,
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
        let store = SledStore::open(dir.path()).unwrap();
        let n = name("a/b");
        assert_eq!(store.head(&n).unwrap(), None);
        store.commit(&record("a/b", 1), None).unwrap().unwrap();
        let h1 = store.head(&n).unwrap();
        assert_eq!(
            h1,
            Some(Head {
                latest: 1,
                deleted: false
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
                deleted: true
            })
        );
        assert_eq!(store.head(&n).unwrap().unwrap().live(), 0);
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
        let store = SledStore::open(dir.path()).unwrap();
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
        let store = SledStore::open(dir.path()).unwrap();
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
}
