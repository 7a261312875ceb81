//! The embedded store: one sled tree, keys laid out by kind.
//!
//! Keys: `h` + name → [`HeadV1`](crate::proto::HeadV1); `r` + name + `\0` + version (8 bytes
//! big-endian) → [`SealedRecordV1`](crate::proto::SealedRecordV1); `w` + master key version
//! (4 bytes big-endian) → wrap count (8 bytes big-endian); `p`, `a`, `m` + key → policies,
//! approvals and bookkeeping that officers manage; `e` + name + `\0` + version (20 decimal
//! digits) → an expiry notice (its expiry, 8 bytes big-endian); `c` + revision (8 bytes big-endian) → one
//! entry of the change log WatchSecrets reads (see below). Names never contain `\0`, so a
//! name's records are exactly the keys under `r` + name + `\0`.
//!
//! Writes take one process-wide lock for check-and-set, apply one atomic batch, and return
//! after sled's `flush` and a real fsync of the store's files shared with concurrent writers
//! (`StoreSync`). sled is single-process: the directory is locked while open.
//!
//! The frame, `m` + `store-id`, `epoch` and `state`, is the only part not committed: every
//! batch also carries the epoch plus one and `state` = commitment (32 bytes) ‖ tag (32 bytes)
//! updated by the batch's own changes (see [`StateKey`]). While the kept tag does not verify
//! (a store from before commitments, or an edited frame), writes keep a zero tag, so the
//! fault stays visible until officers accept the state ([`Store::rebase_state`]).
//!
//! The change log: a batch that changes a head, or creates an expiry notice (kind `e`), also
//! writes `c` + its epoch → the revision of
//! the previous entry (8 bytes big-endian), the kind (`c`, `u`, `d`), the version (8 bytes
//! big-endian) and the name, and removes entries older than `store.watch_history` revisions.
//! The log is written in the same batch as the head it describes, so a crash never keeps one
//! without the other, but it lies outside the commitment, like the frame: etcd keeps no such
//! log (it watches its own history), and the same records must commit to the same value on
//! both backends. It therefore drives no security decision: an event carries no value, every
//! event is checked against the policy in force before it is sent, and a watcher acts on it
//! only by reading the secret through the checked path. Each entry names its predecessor, so a reader that finds the first entry
//! after its position naming a later predecessor knows entries were trimmed in between:
//! it is too far behind. Watchers read only entries up to the durable revision (published
//! after each write's fsync), so no event describes a write a crash could still undo.
//!
//! Files: this one holds the store's state and the [`Store`] implementation; `keys.rs` the key
//! layout, `commit.rs` the frame, the atomic batch and the verifying scan, `changes.rs` the
//! change log and its feed, `open.rs` opening sled's files; `tests.rs` the unit tests.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use sled::{Batch, IVec};

use super::commitment::{EPOCH, STATE, STORE_ID, frame_value};
use super::durable::StoreSync;
use super::{
    Aux, ChangeFeed, Commitment, FeedError, Fenced, FrameStatus, Head, LocalLocks, Lock, LockHeld,
    NameRange, Page, StateCheck, StateKey, Store, StoreError, StoreState, VersionConflict,
};
use crate::proto::HeadV1;
use crate::secret::{SealedRecord, SecretName};

const HEAD: u8 = b'h';
const RECORD: u8 = b'r';
const WRAPS: u8 = b'w';
const POLICY: u8 = b'p';
const APPROVAL: u8 = b'a';
const META: u8 = b'm';
const NOTICE: u8 = b'e';
const CHANGES: u8 = b'c';
/// Change-log entries a batch removes at most while trimming (a batch adds at most one).
const TRIM_STEP: usize = 4;
/// Change-log entries a watcher reads per step.
const FEED_STEP: usize = 64;
/// Keys a verifying scan hashes per step while it holds the write lock.
const SCAN_STEP: usize = 512;

/// A verifying scan in progress: keys below `below` are counted in `acc`; writers add their
/// changes to keys already passed, so the scan ends with the state as it is then.
struct Scan {
    below: Vec<u8>,
    acc: Commitment,
    records: u64,
}

/// What the write lock guards besides the check-and-set.
#[derive(Default)]
struct Writer {
    scan: Option<Scan>,
    /// The revision of the newest change-log entry (0: none).
    last_change: u64,
}

/// One key's change in a batch.
struct Change {
    key: Vec<u8>,
    old: Option<IVec>,
    new: Option<Vec<u8>>,
}

/// The frame as stored.
struct Frame {
    store_id: String,
    epoch: u64,
    commitment: Commitment,
    status: FrameStatus,
}

/// The sled-backed store.
pub struct SledStore {
    db: sled::Db,
    key: StateKey,
    write_lock: Mutex<Writer>,
    /// One verifying scan at a time.
    scan_lock: Mutex<()>,
    sync: StoreSync,
    /// Keys `list` has examined, for the admin plane's status.
    examined: AtomicU64,
    /// Revisions of changes the change log keeps.
    history: u64,
    /// The highest epoch known durable: watchers read the change log up to it.
    durable: tokio::sync::watch::Sender<u64>,
    /// One process opens a sled store: its locks are this process's.
    locks: LocalLocks,
}

impl SledStore {
    /// Opens (or creates) the store at `path` with the default page cache; records are
    /// committed under `key`.
    pub fn open(path: &Path, key: StateKey) -> Result<Self, StoreError> {
        Self::open_with_cache(path, super::DEFAULT_CACHE_MB, key)
    }

    /// Opens (or creates) the store at `path` with a page cache of `cache_mb` MiB; records
    /// are committed under `key`.
    pub fn open_with_cache(path: &Path, cache_mb: u64, key: StateKey) -> Result<Self, StoreError> {
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
            let id = hex::encode(id);
            let mut batch = Batch::default();
            batch.insert(aux_key(Aux::Meta, STORE_ID), id.as_bytes());
            // An empty store commits to nothing. One with records but no identity (filled by
            // other means, or its identity removed) gets no commitment: the start check
            // decides whether to trust it (a token that never recorded one does, as for a
            // store from before commitments; one that did flags it).
            if db.iter().next().is_none() {
                let tag = key.frame_tag(&id, 0, &Commitment::EMPTY);
                batch.insert(
                    aux_key(Aux::Meta, STATE),
                    frame_value(&Commitment::EMPTY, &tag),
                );
            }
            db.apply_batch(batch)?;
            db.flush()?;
            sync.sync().map_err(StoreError::Sync)?;
        }
        let last_change = match db.scan_prefix([CHANGES]).next_back() {
            Some(kv) => change_revision(&kv?.0)?,
            None => 0,
        };
        let epoch = db
            .get(aux_key(Aux::Meta, EPOCH))?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        Ok(Self {
            db,
            key,
            write_lock: Mutex::new(Writer {
                scan: None,
                last_change,
            }),
            scan_lock: Mutex::new(()),
            sync,
            examined: AtomicU64::new(0),
            history: super::DEFAULT_WATCH_HISTORY,
            durable: tokio::sync::watch::Sender::new(epoch),
            locks: LocalLocks::default(),
        })
    }

    /// Keeps `revisions` revisions of changes in the change log (at least one).
    pub fn with_change_history(mut self, revisions: u64) -> Self {
        self.history = revisions.max(1);
        self
    }

    /// Tells watchers that every batch up to `epoch` is durable.
    fn publish(&self, epoch: u64) {
        self.durable.send_if_modified(|d| {
            let newer = epoch > *d;
            if newer {
                *d = epoch;
            }
            newer
        });
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

    fn commit_keeping(
        &self,
        record: &SealedRecord,
        expected: Option<Head>,
        max_versions: Option<u32>,
    ) -> Result<Result<(), VersionConflict>, StoreError> {
        let name = SecretName::parse(&record.name, crate::secret::MAX_NAME_BYTES_CEILING).map_err(
            |e| StoreError::Corrupt {
                key: record.name.clone(),
                reason: e.to_string(),
            },
        )?;
        let epoch = {
            let mut w = self.write_lock.lock().map_err(|_| StoreError::Poisoned)?;
            let current = self.read_head(&name)?;
            if current != expected {
                return Ok(Err(VersionConflict {
                    actual: current.map_or(0, |h| h.live()),
                }));
            }
            let (mut head, cut) = Head::next(expected, record.version, max_versions);
            let mut changes = Vec::new();
            if let Some(cut) = cut {
                // Versions the name no longer keeps go in the same batch.
                let range = record_key(&name, 0)..record_key(&name, cut);
                for kv in self.db.range(range) {
                    let (k, old) = kv?;
                    if changes.len() == super::MAX_PRUNE_PER_COMMIT {
                        head.oldest = record_version(&k)?;
                        break;
                    }
                    changes.push(Change {
                        key: k.to_vec(),
                        old: Some(old),
                        new: None,
                    });
                }
            }
            changes.push(self.change(head_key(&name), Some(HeadV1::from(head).encode_to_vec()))?);
            changes.push(self.change(
                record_key(&name, record.version),
                Some(record.encode_to_vec()),
            )?);
            self.apply(&mut w, changes)?
        };
        // Acknowledge only once durable. Flushing outside the lock lets concurrent writers
        // share sled's write-out and one fsync (StoreSync).
        self.flush()?;
        self.publish(epoch);
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
            let mut w = self.write_lock.lock().map_err(|_| StoreError::Poisoned)?;
            let Some(head) = self.read_head(name)? else {
                return Ok(0);
            };
            let mut changes = Vec::new();
            for kv in self.db.scan_prefix(record_prefix(name)) {
                let (k, old) = kv?;
                changes.push(Change {
                    key: k.to_vec(),
                    old: Some(old),
                    new: None,
                });
            }
            let destroyed = changes.len() as u64;
            let tomb = HeadV1::from(head.deleted());
            changes.push(self.change(head_key(name), Some(tomb.encode_to_vec()))?);
            (destroyed, self.apply(&mut w, changes)?)
        };
        self.flush()?;
        self.publish(destroyed.1);
        Ok(destroyed.0)
    }

    fn replace_records(
        &self,
        lock: &Lock,
        pairs: &[(SealedRecord, SealedRecord)],
    ) -> Result<Result<Vec<bool>, Fenced>, StoreError> {
        super::check_replace_batch(pairs.len())?;
        self.locks.fenced(lock, || {
            let (replaced, epoch) = {
                let mut w = self.write_lock.lock().map_err(|_| StoreError::Poisoned)?;
                let mut replaced = Vec::with_capacity(pairs.len());
                let mut changes = Vec::new();
                for (old, new) in pairs {
                    let name = SecretName::parse(&old.name, crate::secret::MAX_NAME_BYTES_CEILING)
                        .map_err(|e| corrupt(old.name.as_bytes(), e))?;
                    if new.name != old.name || new.version != old.version {
                        return Err(corrupt(
                            old.name.as_bytes(),
                            "a re-seal must keep the record's name and version",
                        ));
                    }
                    let key = record_key(&name, old.version);
                    let change = self.change(key, Some(new.encode_to_vec()))?;
                    // Unchanged since it was read: byte for byte the record the caller opened.
                    let same = change
                        .old
                        .as_ref()
                        .is_some_and(|v| v.as_ref() == old.encode_to_vec().as_slice());
                    replaced.push(same);
                    if same {
                        changes.push(change);
                    }
                }
                if changes.is_empty() {
                    return Ok(replaced);
                }
                (replaced, self.apply(&mut w, changes)?)
            };
            self.flush()?;
            self.publish(epoch);
            Ok(replaced)
        })
    }

    fn count_wraps(&self, mk: u32, n: u64) -> Result<u64, StoreError> {
        let mut key = vec![WRAPS];
        key.extend_from_slice(&mk.to_be_bytes());
        let mut w = self.write_lock.lock().map_err(|_| StoreError::Poisoned)?;
        let change = self.change(key, None)?;
        let old = change
            .old
            .as_ref()
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let total = old.saturating_add(n);
        let change = Change {
            new: Some(total.to_be_bytes().to_vec()),
            ..change
        };
        self.apply(&mut w, vec![change])?;
        Ok(total)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    fn aux_get(&self, ns: Aux, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(aux_key(ns, key))?.map(|v| v.to_vec()))
    }

    fn aux_put(&self, ns: Aux, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let epoch = {
            let mut w = self.write_lock.lock().map_err(|_| StoreError::Poisoned)?;
            let change = self.change(aux_key(ns, key), Some(value.to_vec()))?;
            self.apply(&mut w, vec![change])?
        };
        self.flush()?;
        // An expiry notice's creation is a change-log entry: watchers may read it now.
        self.publish(epoch);
        Ok(())
    }

    fn try_lock(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Result<Lock, LockHeld>, StoreError> {
        self.locks.try_lock(name, holder, ttl)
    }

    fn renew_lock(&self, lock: &Lock) -> Result<bool, StoreError> {
        self.locks.renew(lock)
    }

    fn unlock(&self, lock: &Lock) -> Result<(), StoreError> {
        self.locks.unlock(lock)
    }

    fn aux_put_fenced(
        &self,
        lock: &Lock,
        ns: Aux,
        key: &str,
        value: &[u8],
    ) -> Result<Result<(), Fenced>, StoreError> {
        self.locks.fenced(lock, || self.aux_put(ns, key, value))
    }

    fn aux_delete_fenced(
        &self,
        lock: &Lock,
        ns: Aux,
        key: &str,
    ) -> Result<Result<bool, Fenced>, StoreError> {
        self.locks.fenced(lock, || self.aux_delete(ns, key))
    }

    fn aux_delete(&self, ns: Aux, key: &str) -> Result<bool, StoreError> {
        let (existed, epoch) = {
            let mut w = self.write_lock.lock().map_err(|_| StoreError::Poisoned)?;
            let change = self.change(aux_key(ns, key), None)?;
            let existed = change.old.is_some();
            (existed, self.apply(&mut w, vec![change])?)
        };
        self.flush()?;
        self.publish(epoch);
        Ok(existed)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.flush()?;
        Ok(())
    }

    fn export_page(
        &self,
        cursor: Option<&[u8]>,
        limit: usize,
    ) -> Result<super::migrate::ExportPage, StoreError> {
        use std::ops::Bound;
        // sled keeps its keys in the common layout already. The change log (outside the
        // commitment: this process's history for watchers) does not move with the store.
        let from = match cursor {
            Some(c) => Bound::Excluded(c.to_vec()),
            None => Bound::Unbounded,
        };
        let mut pairs = Vec::with_capacity(limit.min(4096));
        for kv in self.db.range::<Vec<u8>, _>((from, Bound::Unbounded)) {
            let (k, v) = kv?;
            if k.first() == Some(&CHANGES) {
                continue;
            }
            pairs.push((k.to_vec(), v.to_vec()));
            if pairs.len() >= limit.max(1) {
                break;
            }
        }
        let next = (pairs.len() >= limit.max(1))
            .then(|| pairs.last().map(|(k, _)| k.clone()))
            .flatten();
        Ok(super::migrate::ExportPage { pairs, next })
    }

    fn for_each_record(&self, f: &mut dyn FnMut(&[u8])) -> Result<(), StoreError> {
        // sled's keys are the common layout: the records are the keys under `r`, read in
        // place.
        for kv in self.db.scan_prefix([RECORD]) {
            let (_, v) = kv?;
            f(&v);
        }
        Ok(())
    }

    fn import_raw(&self, changes: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let _w = self.write_lock.lock().map_err(|_| StoreError::Poisoned)?;
        let mut batch = Batch::default();
        for (k, v) in changes {
            match v {
                Some(v) => batch.insert(k.as_slice(), v.as_slice()),
                None => batch.remove(k.as_slice()),
            }
        }
        self.db.apply_batch(batch)?;
        self.flush()
    }

    fn watch(&self, after: u64) -> Result<ChangeFeed, FeedError> {
        let current = *self.durable.borrow();
        if after > current {
            return Err(FeedError::Ahead { after, current });
        }
        let start = if after == 0 { current } else { after };
        // Too far behind already? Found now rather than as the feed's first item.
        read_changes(&self.db, start, current, 1)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Unreachable("a change feed needs an async runtime to run on".into())
        })?;
        let (tx, feed) = ChangeFeed::channel();
        runtime.spawn(feed_changes(
            self.db.clone(),
            self.durable.subscribe(),
            start,
            tx,
        ));
        Ok(feed)
    }

    fn epoch(&self) -> Result<(String, u64), StoreError> {
        let id = self
            .db
            .get(aux_key(Aux::Meta, STORE_ID))?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        Ok((id, self.read_epoch()?))
    }

    fn state(&self) -> Result<StoreState, StoreError> {
        let _w = self.write_lock.lock().map_err(|_| StoreError::Poisoned)?;
        let f = self.read_frame()?;
        Ok(StoreState {
            store_id: f.store_id,
            epoch: f.epoch,
            commitment: f.commitment,
            frame: f.status,
        })
    }

    fn verify_state(&self) -> Result<StateCheck, StoreError> {
        self.scan(|_, scan| {
            Ok(StateCheck {
                stored: self.read_frame()?.commitment,
                computed: scan.acc,
                records: scan.records,
            })
        })
    }

    fn rebase_state(&self) -> Result<StoreState, StoreError> {
        let state = self.scan(|_, scan| {
            let f = self.read_frame()?;
            let epoch = f.epoch + 1;
            let tag = self.key.frame_tag(&f.store_id, epoch, &scan.acc);
            let mut batch = Batch::default();
            batch.insert(aux_key(Aux::Meta, EPOCH), epoch.to_be_bytes().to_vec());
            batch.insert(aux_key(Aux::Meta, STATE), frame_value(&scan.acc, &tag));
            self.db.apply_batch(batch)?;
            Ok(StoreState {
                store_id: f.store_id,
                epoch,
                commitment: scan.acc,
                frame: FrameStatus::Valid,
            })
        })?;
        self.flush()?;
        Ok(state)
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
            match HeadV1::decode(v.as_ref()) {
                Ok(head) if !head.deleted => n += 1,
                Ok(_) => {}
                // A damaged head is no readable secret; it must not take the officers'
                // status down with it (its reads answer DATA_LOSS).
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(&k), error = %e, "a stored head does not decode; not counted")
                }
            }
        }
        Ok(n)
    }
}

mod changes;
mod commit;
mod keys;
mod open;

use changes::{change_revision, feed_changes, read_changes};
use keys::{
    aux_key, aux_tag, corrupt, decode_head, decode_record, head_key, record_key, record_prefix,
    record_version,
};
use open::open_db;

#[cfg(test)]
mod tests;
