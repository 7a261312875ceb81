//! The [`Store`] trait on etcd: each operation in terms of the reads ([`scan`](super::scan)),
//! writes ([`txn`](super::txn)), locks ([`lease`](super::lease)) and watches
//! ([`watch`](super::watch)) of the modules beside it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp, TxnOpResponse};
use prost::Message;

use crate::proto::HeadV1;
use crate::secret::{SealedRecord, SecretName};
use crate::store::{
    Aux, ChangeFeed, FeedError, Fenced, FrameStatus, Head, Lock, LockHeld, NameRange, Page,
    StateCheck, Store, StoreError, StoreState, VersionConflict,
};

use super::EtcdStore;
use super::keys::{aux_tag, corrupt, decode_epoch, decode_head, decode_record, encode_head};
use super::scan::{COUNT_PAGE, SCAN_PAGE, is_compacted};
use super::txn::{Attempt, Change, EPOCH_RETRIES, Seen, busy, guard, head_is};
use super::watch::{WATCH_RETRY_PAUSE, WatchTarget, forward_watch};

impl Store for EtcdStore {
    fn head(&self, name: &SecretName) -> Result<Option<Head>, StoreError> {
        self.read_head(self.deadline(), name)
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
        let head_key = self.head_key(&name);
        let record_key = self.record_key(&name, record.version);
        let (next, cut) = Head::next(expected, record.version, max_versions);
        let value = record.encode_to_vec();
        let deadline = self.deadline();
        let mut w = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        // The head and the version's key as the transaction requires them: first as the
        // caller read the head (and no record at this version, the usual case: one round
        // trip), then as etcd reported them when it refused.
        let mut head_now: Option<Option<Seen>> = None;
        let mut record_now: Option<Seen> = None;
        for _ in 0..EPOCH_RETRIES {
            let base = self.current_frame(deadline, &w)?;
            let (head_compare, head_old) = match &head_now {
                None => (
                    head_is(&head_key, expected),
                    expected.map(|h| encode_head(&h)),
                ),
                Some(seen) => guard(&head_key, seen.as_ref()),
            };
            let (record_compare, record_old) = guard(&record_key, record_now.as_ref());
            // Versions the name no longer keeps (max_versions) go in the same transaction,
            // each as read (its mod revision compared), so the commitment moves exactly.
            let mut head = next;
            let mut pruned = Vec::new();
            if let Some(cut) = cut {
                let (start, end) = (self.record_key(&name, 0), self.record_key(&name, cut));
                let limit = crate::store::MAX_PRUNE_PER_COMMIT as i64 + 1;
                let resp = self.range(deadline, start, end, limit, None)?;
                for kv in resp.kvs() {
                    if pruned.len() == crate::store::MAX_PRUNE_PER_COMMIT {
                        head.oldest = self.record_version(kv.key())?;
                        break;
                    }
                    pruned.push((kv.key().to_vec(), Seen::from(kv)));
                }
            }
            let head = HeadV1::from(head).encode_to_vec();
            let mut compares = vec![head_compare, record_compare];
            let mut changes = Vec::with_capacity(2 + pruned.len());
            let mut ops = Vec::with_capacity(2 + pruned.len());
            for (key, seen) in pruned {
                let (compare, old) = guard(&key, Some(&seen));
                compares.push(compare);
                ops.push(TxnOp::delete(key.clone(), None));
                changes.push(Change {
                    key,
                    old,
                    new: None,
                });
            }
            changes.push(Change {
                key: head_key.clone(),
                old: head_old,
                new: Some(head.clone()),
            });
            changes.push(Change {
                key: record_key.clone(),
                old: record_old,
                new: Some(value.clone()),
            });
            ops.push(TxnOp::put(head_key.clone(), head.clone(), None));
            ops.push(TxnOp::put(record_key.clone(), value.clone(), None));
            let watch = [head_key.clone(), record_key.clone()];
            match self.attempt(deadline, &mut w, base, compares, ops, &changes, &watch)? {
                Attempt::Applied(_) => return Ok(Ok(())),
                Attempt::Refused(mut now) => {
                    record_now = now.pop().flatten().as_ref().map(Seen::from);
                    let head_kv = now.pop().flatten();
                    let current = head_kv
                        .as_ref()
                        .map(|kv| decode_head(kv.key(), kv.value()))
                        .transpose()?;
                    if current != expected {
                        return Ok(Err(VersionConflict {
                            actual: current.map_or(0, |h| h.live()),
                        }));
                    }
                    // Another writer moved the frame, or the version's key exists: again,
                    // against the keys as they are.
                    head_now = Some(head_kv.as_ref().map(Seen::from));
                }
            }
        }
        Err(busy())
    }

    fn get(&self, name: &SecretName, version: u64) -> Result<Option<SealedRecord>, StoreError> {
        self.fetch(self.deadline(), self.record_key(name, version))?
            .map(|kv| decode_record(kv.key(), kv.value()))
            .transpose()
    }

    fn versions(&self, name: &SecretName) -> Result<Vec<SealedRecord>, StoreError> {
        let start = self.record_prefix(name);
        let mut end = start.clone();
        // The prefix ends in `\0`: `\x01` follows every record of the name.
        if let Some(last) = end.last_mut() {
            *last = 1;
        }
        let mut out = Vec::new();
        self.scan(start, end, self.records_per_range, |kv| {
            out.push(decode_record(kv.key(), kv.value())?);
            Ok(())
        })?;
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
            let mut k = self.key(b'h', a.as_bytes());
            k.push(0);
            k
        });
        let (_, heads_end) = self.kind_range(b'h');
        let deadline = self.deadline();
        let mut names: Vec<SecretName> = Vec::new();
        let mut examined = 0u64;
        let mut next_after = None;
        'ranges: for range in ranges {
            let mut start = self.key(b'h', range.start.as_bytes());
            if let Some(r) = &resume
                && *r > start
            {
                start.clone_from(r);
            }
            let end = match &range.end {
                Some(e) => self.key(b'h', e.as_bytes()),
                None => heads_end.clone(),
            };
            while start < end {
                // Never fetch more keys than the budget has left.
                let want = (max_examined - examined).min(SCAN_PAGE as u64) as i64;
                let resp = self.range(deadline, start.clone(), end.clone(), want, None)?;
                for kv in resp.kvs() {
                    examined += 1;
                    self.examined.fetch_add(1, Ordering::Relaxed);
                    let k = kv.key();
                    let text = k
                        .get(self.prefix.len() + 2..)
                        .and_then(|t| std::str::from_utf8(t).ok())
                        .ok_or_else(|| corrupt(k, "not a head key"))?;
                    let name = SecretName::parse(text, crate::secret::MAX_NAME_BYTES_CEILING)
                        .map_err(|e| corrupt(k, e))?;
                    if !decode_head(k, kv.value())?.deleted && visible(&name) {
                        if names.len() >= limit {
                            // One more name exists: the next page starts after this page's
                            // last.
                            next_after = names.last().map(|n| n.as_str().to_owned());
                            break 'ranges;
                        }
                        names.push(name);
                    }
                    if examined >= max_examined {
                        // The budget is spent: the caller resumes after the last key
                        // examined.
                        next_after = Some(text.to_owned());
                        break 'ranges;
                    }
                }
                match resp.kvs().last() {
                    Some(last) if resp.more() => {
                        start = last.key().to_vec();
                        start.push(0);
                    }
                    _ => break,
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
        let head_key = self.head_key(name);
        let start = self.record_prefix(name);
        let mut end = start.clone();
        // The prefix ends in `\0`: `\x01` follows every record of the name.
        if let Some(last) = end.last_mut() {
            *last = 1;
        }
        let deadline = self.deadline();
        let mut w = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        for _ in 0..EPOCH_RETRIES {
            // The head, the frame and the versions at one revision: the versions' values
            // leave the commitment.
            let (base, mut now, revision) =
                self.snapshot(deadline, std::slice::from_ref(&head_key))?;
            let Some(head_kv) = now.pop().flatten() else {
                return Ok(0);
            };
            let head = decode_head(head_kv.key(), head_kv.value())?;
            let mut changes = Vec::new();
            let read = self.scan_at(
                start.clone(),
                end.clone(),
                self.records_per_range,
                Some(revision),
                |kv| {
                    changes.push(Change {
                        key: kv.key().to_vec(),
                        old: Some(kv.value().to_vec()),
                        new: None,
                    });
                    Ok(())
                },
            );
            match read {
                Ok(()) => {}
                Err(e) if is_compacted(&e) => continue,
                Err(e) => return Err(e),
            }
            let tomb = HeadV1::from(head.deleted()).encode_to_vec();
            changes.push(Change {
                key: head_key.clone(),
                old: Some(head_kv.value().to_vec()),
                new: Some(tomb.clone()),
            });
            let compares = vec![
                Compare::mod_revision(head_key.clone(), CompareOp::Equal, head_kv.mod_revision()),
                // No version of the name was written since the snapshot (writers through
                // the service also move the frame).
                Compare::mod_revision(start.clone(), CompareOp::Less, revision + 1)
                    .with_range(end.clone()),
            ];
            let ops = vec![
                TxnOp::delete(
                    start.clone(),
                    Some(DeleteOptions::new().with_range(end.clone())),
                ),
                TxnOp::put(head_key.clone(), tomb, None),
            ];
            // Another writer moved the frame or the name: read again.
            if let Attempt::Applied(responses) =
                self.attempt(deadline, &mut w, base, compares, ops, &changes, &[])?
            {
                return Ok(match responses.first() {
                    Some(TxnOpResponse::Delete(d)) => u64::try_from(d.deleted()).unwrap_or(0),
                    _ => 0,
                });
            }
        }
        Err(StoreError::Etcd(
            "other writers kept changing this name while it was deleted; retry".into(),
        ))
    }

    fn replace_records(
        &self,
        lock: &Lock,
        pairs: &[(SealedRecord, SealedRecord)],
    ) -> Result<Result<Vec<bool>, Fenced>, StoreError> {
        super::check_replace_batch(pairs.len())?;
        let mut parts = Vec::with_capacity(pairs.len());
        for (old, new) in pairs {
            let name = SecretName::parse(&old.name, crate::secret::MAX_NAME_BYTES_CEILING)
                .map_err(|e| corrupt(old.name.as_bytes(), e))?;
            if new.name != old.name || new.version != old.version {
                return Err(corrupt(
                    old.name.as_bytes(),
                    "a re-seal must keep the record's name and version",
                ));
            }
            parts.push((
                self.record_key(&name, old.version),
                old.encode_to_vec(),
                new.encode_to_vec(),
            ));
        }
        let deadline = self.deadline();
        let lock_key = self.lock_key(&lock.name);
        // Which pairs may still be replaced: a record found changed drops out, and the rest
        // are tried again (the transaction is all or nothing).
        let mut live = vec![true; parts.len()];
        let mut w = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        for _ in 0..EPOCH_RETRIES {
            let idx: Vec<usize> = (0..parts.len()).filter(|&i| live[i]).collect();
            if idx.is_empty() {
                return Ok(Ok(live));
            }
            let base = self.current_frame(deadline, &w)?;
            let mut compares = Vec::with_capacity(idx.len() + 1);
            let mut ops = Vec::with_capacity(idx.len());
            let mut changes = Vec::with_capacity(idx.len());
            let mut watch = Vec::with_capacity(idx.len() + 1);
            for &i in &idx {
                let (key, old, new) = &parts[i];
                // Byte for byte the record the caller opened.
                compares.push(Compare::value(key.clone(), CompareOp::Equal, old.clone()));
                ops.push(TxnOp::put(key.clone(), new.clone(), None));
                changes.push(Change {
                    key: key.clone(),
                    old: Some(old.clone()),
                    new: Some(new.clone()),
                });
                watch.push(key.clone());
            }
            compares.push(Compare::create_revision(
                lock_key.clone(),
                CompareOp::Equal,
                lock.fence,
            ));
            watch.push(lock_key.clone());
            match self.attempt(deadline, &mut w, base, compares, ops, &changes, &watch)? {
                Attempt::Applied(_) => return Ok(Ok(live)),
                Attempt::Refused(mut now) => {
                    let holder = now.pop().flatten().map_or(0, |kv| kv.create_revision());
                    if holder != lock.fence {
                        return Ok(Err(Fenced {
                            fence: lock.fence,
                            now: holder,
                        }));
                    }
                    for (j, &i) in idx.iter().enumerate() {
                        let same = now
                            .get(j)
                            .and_then(|kv| kv.as_ref())
                            .is_some_and(|kv| kv.value() == parts[i].1.as_slice());
                        if !same {
                            live[i] = false;
                        }
                    }
                }
            }
        }
        Err(busy())
    }

    fn count_wraps(&self, mk: u32, n: u64) -> Result<u64, StoreError> {
        let key = self.key(b'w', format!("{mk:010}").as_bytes());
        let mut w = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let seen = w.wraps.get(&key).cloned();
        let add = |old: Option<&[u8]>| {
            Some(
                old.map_or(0, decode_epoch)
                    .saturating_add(n)
                    .to_be_bytes()
                    .to_vec(),
            )
        };
        let done = self.update(&mut w, &key, seen, add)?;
        let total = done.new.as_deref().map_or(0, decode_epoch);
        if let Some(value) = done.new {
            w.wraps.insert(
                key,
                Seen {
                    value,
                    revision: done.revision,
                },
            );
        }
        Ok(total)
    }

    fn secret_count(&self) -> Result<u64, StoreError> {
        let (start, end) = self.kind_range(b'h');
        let mut n = 0;
        self.scan(start, end, COUNT_PAGE, |kv| {
            if !decode_head(kv.key(), kv.value())?.deleted {
                n += 1;
            }
            Ok(())
        })?;
        Ok(n)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        let mut m = self.maintenance.clone();
        let status = self.call(self.deadline(), async move { m.status().await })?;
        Ok(u64::try_from(status.db_size()).unwrap_or(0))
    }

    fn aux_get(&self, ns: Aux, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .fetch(self.deadline(), self.aux_key(ns, key))?
            .map(|kv| kv.value().to_vec()))
    }

    fn aux_put(&self, ns: Aux, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut w = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        self.update(&mut w, &self.aux_key(ns, key), None, |_| {
            Some(value.to_vec())
        })?;
        Ok(())
    }

    fn aux_delete(&self, ns: Aux, key: &str) -> Result<bool, StoreError> {
        let mut w = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(self
            .update(&mut w, &self.aux_key(ns, key), None, |_| None)?
            .old
            .is_some())
    }

    fn aux_list(&self, ns: Aux) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let (start, end) = self.kind_range(aux_tag(ns));
        let skip = start.len();
        let mut out = Vec::new();
        self.scan(start, end, SCAN_PAGE, |kv| {
            let k = kv.key();
            let key = k
                .get(skip..)
                .and_then(|t| String::from_utf8(t.to_vec()).ok())
                .ok_or_else(|| corrupt(k, "not an officers' record key"))?;
            out.push((key, kv.value().to_vec()));
            Ok(())
        })?;
        Ok(out)
    }

    fn epoch(&self) -> Result<(String, u64), StoreError> {
        let st = self.state()?;
        Ok((st.store_id, st.epoch))
    }

    fn state(&self) -> Result<StoreState, StoreError> {
        let (f, _, _) = self.snapshot(self.deadline(), &[])?;
        Ok(StoreState {
            store_id: f.store_id,
            epoch: f.epoch,
            commitment: f.commitment,
            frame: f.status,
        })
    }

    /// Reads every record at one etcd revision and the frame at the same revision, so the
    /// scan is consistent without holding any writer back.
    fn verify_state(&self) -> Result<StateCheck, StoreError> {
        let (frame, computed, records) = self.scan_state()?;
        Ok(StateCheck {
            stored: frame.commitment,
            computed,
            records,
        })
    }

    fn rebase_state(&self) -> Result<StoreState, StoreError> {
        let (mut base, mut c, _) = self.scan_state()?;
        let deadline = self.deadline();
        let mut w = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        for _ in 0..EPOCH_RETRIES {
            let store_id = base.store_id.clone();
            let epoch = base.epoch + 1;
            let before = base.commitment;
            match self.frame_txn(deadline, &mut w, base, c, true, Vec::new(), Vec::new(), &[])? {
                Attempt::Applied(_) => {
                    return Ok(StoreState {
                        store_id,
                        epoch,
                        commitment: c,
                        frame: FrameStatus::Valid,
                    });
                }
                Attempt::Refused(_) => {
                    // Writes since the scan moved the kept commitment by exactly their own
                    // changes: carry them over instead of scanning again.
                    let Some(now) = w.frame.clone() else {
                        return Err(busy());
                    };
                    c = c.add(&now.commitment.sub(&before));
                    base = now;
                }
            }
        }
        Err(busy())
    }

    fn try_lock(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Result<Lock, LockHeld>, StoreError> {
        self.lock_take(name, holder, ttl)
    }

    fn renew_lock(&self, lock: &Lock) -> Result<bool, StoreError> {
        self.lock_renew(lock)
    }

    fn unlock(&self, lock: &Lock) -> Result<(), StoreError> {
        self.lock_release(lock)
    }

    fn aux_put_fenced(
        &self,
        lock: &Lock,
        ns: Aux,
        key: &str,
        value: &[u8],
    ) -> Result<Result<(), Fenced>, StoreError> {
        let mut w = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(self
            .update_fenced(&mut w, lock, &self.aux_key(ns, key), |_| {
                Some(value.to_vec())
            })?
            .map(|_| ()))
    }

    fn aux_delete_fenced(
        &self,
        lock: &Lock,
        ns: Aux,
        key: &str,
    ) -> Result<Result<bool, Fenced>, StoreError> {
        let mut w = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(self
            .update_fenced(&mut w, lock, &self.aux_key(ns, key), |_| None)?
            .map(|u| u.old.is_some()))
    }

    /// etcd acknowledges a write only once a quorum has it in its log: nothing to flush.
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn export_page(
        &self,
        cursor: Option<&[u8]>,
        limit: usize,
    ) -> Result<crate::store::migrate::ExportPage, StoreError> {
        let (start, end) = self.all_range();
        let from = match cursor {
            Some(c) => {
                let mut k = c.to_vec();
                k.push(0);
                k
            }
            None => start,
        };
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        let resp = self.range(self.deadline(), from, end, limit, None)?;
        let pairs: Vec<_> = resp
            .kvs()
            .iter()
            .map(|kv| (self.canonical(kv.key()), kv.value().to_vec()))
            .collect();
        let next = resp
            .more()
            .then(|| resp.kvs().last().map(|kv| kv.key().to_vec()))
            .flatten();
        Ok(crate::store::migrate::ExportPage { pairs, next })
    }

    fn import_raw(&self, changes: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let _w = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        // etcd takes at most 128 operations per transaction by default.
        for chunk in changes.chunks(100) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| {
                    let key = self.etcd_key_of(k)?;
                    Ok(match v {
                        Some(v) => TxnOp::put(key, v.clone(), None),
                        None => TxnOp::delete(key, None),
                    })
                })
                .collect::<Result<_, StoreError>>()?;
            let txn = Txn::new().and_then(ops);
            let mut kv = self.kv.clone();
            self.call(self.deadline(), async move { kv.txn(txn).await })?;
        }
        Ok(())
    }

    fn watch(&self, after: u64) -> Result<ChangeFeed, FeedError> {
        // Notices (`e/`) and heads (`h/`): no kind sorts between them.
        let (start, _) = self.kind_range(b'e');
        let (_, end) = self.kind_range(b'h');
        let mut from = 0;
        if after > 0 {
            let next = i64::try_from(after).ok().and_then(|a| a.checked_add(1));
            let Some(next) = next else {
                return Err(FeedError::Ahead {
                    after,
                    current: u64::try_from(self.last_revision()).unwrap_or(0),
                });
            };
            from = next;
        }
        let watch = WatchTarget {
            client: self.watch.clone(),
            key: start,
            end,
            timeout: self.timeout,
        };
        let deadline = self.deadline();
        let (stream, first) = loop {
            let open = watch.open(from);
            match self.call(deadline, open) {
                Ok(opened) => break opened,
                // Its member is marked down now: the next attempt goes to another.
                Err(StoreError::Unreachable(_))
                    if Instant::now() + WATCH_RETRY_PAUSE < deadline =>
                {
                    std::thread::sleep(WATCH_RETRY_PAUSE);
                }
                Err(e) => return Err(e.into()),
            }
        };
        let current = first.header().map_or(0, |h| h.revision());
        self.saw(Some(current));
        let current = u64::try_from(current).unwrap_or(0);
        if first.compact_revision() > 0 {
            return Err(FeedError::Compacted {
                after,
                oldest: u64::try_from(first.compact_revision()).unwrap_or(0),
            });
        }
        if first.canceled() {
            return Err(StoreError::Etcd(format!(
                "etcd refused the watch: {}",
                first.cancel_reason()
            ))
            .into());
        }
        if after > current {
            // etcd would wait for that revision: it is not one of this store's yet.
            return Err(FeedError::Ahead { after, current });
        }
        let (tx, feed) = ChangeFeed::channel();
        // Delivered so far: up to `after`, or (from now) everything up to the revision the
        // watch started at.
        let last = if after > 0 { after } else { current };
        self.handle.spawn(forward_watch(watch, stream, last, tx));
        Ok(feed)
    }

    fn reads_are_local(&self) -> bool {
        false
    }

    fn available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }
}
