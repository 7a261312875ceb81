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

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use sled::{Batch, IVec};

use super::commitment::{EPOCH, STATE, STORE_ID, frame_value, is_frame_key, parse_frame};
use super::durable::StoreSync;
use super::{
    Aux, ChangeEvent, ChangeFeed, Commitment, FeedError, Fenced, FrameStatus, Head, LocalLocks,
    Lock, LockHeld, NameRange, Page, StateCheck, StateKey, Store, StoreError, StoreState,
    VersionConflict,
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

    /// The change-log entries a batch at `epoch` with `changes` adds and removes: one entry
    /// per head it changes, and the entries now older than the history kept.
    fn log_changes(
        &self,
        w: &mut Writer,
        epoch: u64,
        changes: &[Change],
    ) -> Result<Vec<Change>, StoreError> {
        let mut out = Vec::new();
        let logged = |c: &&Change| {
            c.key.first() == Some(&HEAD) || (c.key.first() == Some(&NOTICE) && c.old.is_none())
        };
        for ch in changes.iter().filter(logged) {
            let Some(new) = &ch.new else { continue };
            if out.iter().any(|c: &Change| c.new.is_some()) {
                // One head (or notice) per batch is what every writer does; a second one in
                // the same batch would share the revision, so it is refused rather than lost.
                return Err(corrupt(&ch.key, "two logged changes in one batch"));
            }
            let (text, kind, version) = if ch.key[0] == NOTICE {
                // A notice's creation: `e` + name + `\0` + version (see `notice_key`).
                let key = std::str::from_utf8(&ch.key[1..]).map_err(|e| corrupt(&ch.key, e))?;
                let (name, version) =
                    super::parse_notice_key(key, crate::secret::MAX_NAME_BYTES_CEILING)
                        .ok_or_else(|| corrupt(&ch.key, "not an expiry notice's key"))?;
                let text = &key[..name.as_str().len()];
                (text, super::ChangeKind::ExpiringSoon, version)
            } else {
                let text = std::str::from_utf8(&ch.key[1..]).map_err(|e| corrupt(&ch.key, e))?;
                let name = SecretName::parse(text, crate::secret::MAX_NAME_BYTES_CEILING)
                    .map_err(|e| corrupt(&ch.key, e))?;
                let old = ch.old.as_ref().map(|v| decode_head(&name, v)).transpose()?;
                let new = decode_head(&name, &IVec::from(new.as_slice()))?;
                (text, super::ChangeKind::of(old, new), new.latest)
            };
            let mut value = Vec::with_capacity(17 + text.len());
            value.extend_from_slice(&w.last_change.to_be_bytes());
            value.push(kind.byte());
            value.extend_from_slice(&version.to_be_bytes());
            value.extend_from_slice(text.as_bytes());
            out.push(self.change(change_key(epoch), Some(value))?);
            w.last_change = epoch;
        }
        if !out.is_empty() {
            let keep_after = epoch.saturating_sub(self.history);
            for kv in self.db.scan_prefix([CHANGES]).take(TRIM_STEP) {
                let (k, old) = kv?;
                if change_revision(&k)? > keep_after {
                    break;
                }
                out.push(Change {
                    key: k.to_vec(),
                    old: Some(old),
                    new: None,
                });
            }
        }
        Ok(out)
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

    /// The frame as stored, with whether its tag verifies.
    fn read_frame(&self) -> Result<Frame, StoreError> {
        let store_id = self
            .db
            .get(aux_key(Aux::Meta, STORE_ID))?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        let epoch = self.read_epoch()?;
        let stored = self.db.get(aux_key(Aux::Meta, STATE))?;
        let (commitment, status) = parse_frame(&self.key, &store_id, epoch, stored.as_deref());
        Ok(Frame {
            store_id,
            epoch,
            commitment,
            status,
        })
    }

    /// The change of `key` to `new` (`None`: removed), with its current value (the caller
    /// holds the write lock).
    fn change(&self, key: Vec<u8>, new: Option<Vec<u8>>) -> Result<Change, StoreError> {
        let old = self.db.get(&key)?;
        Ok(Change { key, old, new })
    }

    /// The commitment element of one stored pair (sled's keys are the common layout).
    fn element(&self, key: &[u8], value: &[u8]) -> Commitment {
        self.key.element(key, value)
    }

    /// Applies `changes` in one atomic batch with the epoch bump and the updated commitment
    /// (the caller holds the write lock, `w`). Not yet durable.
    fn apply(&self, w: &mut Writer, mut changes: Vec<Change>) -> Result<u64, StoreError> {
        let frame = self.read_frame()?;
        let epoch = frame.epoch + 1;
        let last_change = w.last_change;
        let logged = self.log_changes(w, epoch, &changes);
        match logged {
            Ok(log) => changes.extend(log),
            Err(e) => {
                w.last_change = last_change;
                return Err(e);
            }
        }
        let mut batch = Batch::default();
        let mut c = frame.commitment;
        let mut passed = Commitment::EMPTY;
        for ch in changes {
            if is_frame_key(&ch.key) {
                return Err(corrupt(
                    &ch.key,
                    "the store's frame is not written this way",
                ));
            }
            let mut delta = Commitment::EMPTY;
            if ch.key.first() == Some(&CHANGES) {
                // Outside the commitment (see the module documentation).
                match ch.new {
                    Some(v) => batch.insert(ch.key, v),
                    None => batch.remove(ch.key),
                }
                continue;
            }
            if let Some(old) = &ch.old {
                delta = delta.sub(&self.element(&ch.key, old));
            }
            if let Some(new) = &ch.new {
                delta = delta.add(&self.element(&ch.key, new));
            }
            c = c.add(&delta);
            if w.scan.as_ref().is_some_and(|s| ch.key < s.below) {
                passed = passed.add(&delta);
            }
            match ch.new {
                Some(v) => batch.insert(ch.key, v),
                None => batch.remove(ch.key),
            }
        }
        let tag = match frame.status {
            FrameStatus::Valid => self.key.frame_tag(&frame.store_id, epoch, &c),
            // Keep an unverifiable frame unverifiable: only officers re-base it.
            FrameStatus::Missing | FrameStatus::Forged => [0; 32],
        };
        batch.insert(aux_key(Aux::Meta, EPOCH), epoch.to_be_bytes().to_vec());
        batch.insert(aux_key(Aux::Meta, STATE), frame_value(&c, &tag));
        if let Err(e) = self.db.apply_batch(batch) {
            w.last_change = last_change;
            return Err(e.into());
        }
        if let Some(scan) = w.scan.as_mut() {
            scan.acc = scan.acc.add(&passed);
        }
        Ok(epoch)
    }

    /// Recomputes the commitment over every committed record, a step at a time, and calls
    /// `finish` with the write lock held at the point where the scan is complete.
    fn scan<R>(
        &self,
        finish: impl FnOnce(&mut Writer, &Scan) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let _one = self.scan_lock.lock().map_err(|_| StoreError::Poisoned)?;
        let result = (|| loop {
            let mut w = self.write_lock.lock().map_err(|_| StoreError::Poisoned)?;
            let scan = w.scan.get_or_insert_with(|| Scan {
                below: Vec::new(),
                acc: Commitment::EMPTY,
                records: 0,
            });
            let mut seen = 0;
            let mut last = None;
            for kv in self.db.range(scan.below.clone()..) {
                let (k, v) = kv?;
                if !is_frame_key(&k) && k.first() != Some(&CHANGES) {
                    scan.acc = scan.acc.add(&self.element(&k, &v));
                    scan.records += 1;
                }
                last = Some(k);
                seen += 1;
                if seen >= SCAN_STEP {
                    break;
                }
            }
            if let Some(k) = last {
                // The next possible key after `k`.
                let mut below = k.to_vec();
                below.push(0);
                scan.below = below;
            }
            if seen < SCAN_STEP {
                let done = Scan {
                    below: std::mem::take(&mut scan.below),
                    acc: scan.acc,
                    records: scan.records,
                };
                w.scan = None;
                return Ok((w, done));
            }
        })();
        match result {
            Ok((mut w, done)) => finish(&mut w, &done),
            Err(e) => {
                if let Ok(mut w) = self.write_lock.lock() {
                    w.scan = None;
                }
                Err(e)
            }
        }
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
        Ok(Err(sled::Error::Io(e)))
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.to_string().contains("could not acquire lock") =>
        {
            Err(fail(format!(
                "another process holds the store (the lock on {} is taken): most likely another strongroomd with the same store.path, or strongroom-admin migrate/reconcile; stop it, or give this one its own store.path",
                path.join("db").display()
            )))
        }
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

/// Sends the change-log entries after `last`, each once it is durable, until the feed's
/// reader goes away or the store closes. Waits while the feed is full: the log is the
/// buffer, so a slow reader costs no memory here (it may fall behind the history kept).
async fn feed_changes(
    db: sled::Db,
    mut durable: tokio::sync::watch::Receiver<u64>,
    mut last: u64,
    tx: tokio::sync::mpsc::Sender<Result<ChangeEvent, FeedError>>,
) {
    loop {
        let target = *durable.borrow_and_update();
        if target > last {
            match read_changes(&db, last, target, FEED_STEP) {
                Ok(events) if !events.is_empty() => {
                    for e in events {
                        last = e.revision;
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                // Nothing logged up to the durable revision: `last` stays, so an entry
                // trimmed meanwhile is still noticed through its successor.
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        tokio::select! {
            changed = durable.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tx.closed() => return,
        }
    }
}

/// At most `max` change-log entries after `last` up to `target`, in order; `Compacted`
/// when the first one names a predecessor after `last` (entries in between were trimmed).
fn read_changes(
    db: &sled::Db,
    last: u64,
    target: u64,
    max: usize,
) -> Result<Vec<ChangeEvent>, FeedError> {
    let mut out = Vec::new();
    let (Some(from), Some(to)) = (last.checked_add(1), target.checked_add(1)) else {
        return Ok(out);
    };
    let mut expected_prev = None;
    for kv in db.range(change_key(from)..change_key(to)).take(max) {
        let (k, v) = kv.map_err(StoreError::from)?;
        let revision = change_revision(&k)?;
        let bad = |why: &str| FeedError::Store(corrupt(&k, why));
        if v.len() < 17 {
            return Err(bad("a change-log entry is too short"));
        }
        let (prev, rest) = v.split_at(8);
        let prev = u64::from_be_bytes(prev.try_into().map_err(|_| bad("bad entry"))?);
        match expected_prev {
            None if prev > last => {
                return Err(FeedError::Compacted {
                    after: last,
                    oldest: revision,
                });
            }
            Some(p) if prev != p => {
                return Err(bad("the change log skips an entry"));
            }
            _ => {}
        }
        expected_prev = Some(revision);
        let kind = super::ChangeKind::from_byte(rest[0]).ok_or_else(|| bad("unknown kind"))?;
        let version = u64::from_be_bytes(rest[1..9].try_into().map_err(|_| bad("bad entry"))?);
        let text = std::str::from_utf8(&rest[9..]).map_err(|e| FeedError::Store(corrupt(&k, e)))?;
        let name = SecretName::parse(text, crate::secret::MAX_NAME_BYTES_CEILING)
            .map_err(|e| FeedError::Store(corrupt(&k, e)))?;
        out.push(ChangeEvent {
            revision,
            name,
            version,
            kind,
        });
    }
    Ok(out)
}

fn change_key(revision: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(CHANGES);
    k.extend_from_slice(&revision.to_be_bytes());
    k
}

fn change_revision(key: &[u8]) -> Result<u64, StoreError> {
    key.get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt(key, "a change-log key is not a revision"))
}

fn aux_tag(ns: Aux) -> u8 {
    match ns {
        Aux::Policy => POLICY,
        Aux::Approval => APPROVAL,
        Aux::Meta => META,
        Aux::Notice => NOTICE,
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
    Ok(Head::from(h))
}

/// The version a record key names (its last 8 bytes).
fn record_version(key: &[u8]) -> Result<u64, StoreError> {
    key.len()
        .checked_sub(8)
        .and_then(|at| <[u8; 8]>::try_from(&key[at..]).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt(key, "not a record key"))
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
mod tests;
