//! The change log WatchSecrets reads: the entries a batch adds and trims, and the feed that
//! sends them to a watcher once they are durable (layout in the parent module's documentation).

use sled::IVec;

use super::keys::{corrupt, decode_head};
use super::{CHANGES, Change, FEED_STEP, HEAD, NOTICE, SledStore, TRIM_STEP, Writer};
use crate::secret::SecretName;
use crate::store::{ChangeEvent, FeedError, StoreError};

impl SledStore {
    /// The change-log entries a batch at `epoch` with `changes` adds and removes: one entry
    /// per head it changes, and the entries now older than the history kept.
    pub(super) fn log_changes(
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
                    crate::store::parse_notice_key(key, crate::secret::MAX_NAME_BYTES_CEILING)
                        .ok_or_else(|| corrupt(&ch.key, "not an expiry notice's key"))?;
                let text = &key[..name.as_str().len()];
                (text, crate::store::ChangeKind::ExpiringSoon, version)
            } else {
                let text = std::str::from_utf8(&ch.key[1..]).map_err(|e| corrupt(&ch.key, e))?;
                let name = SecretName::parse(text, crate::secret::MAX_NAME_BYTES_CEILING)
                    .map_err(|e| corrupt(&ch.key, e))?;
                let old = ch.old.as_ref().map(|v| decode_head(&name, v)).transpose()?;
                let new = decode_head(&name, &IVec::from(new.as_slice()))?;
                (text, crate::store::ChangeKind::of(old, new), new.latest)
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
}

/// Sends the change-log entries after `last`, each once it is durable, until the feed's
/// reader goes away or the store closes. Waits while the feed is full: the log is the
/// buffer, so a slow reader costs no memory here (it may fall behind the history kept).
pub(super) async fn feed_changes(
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
pub(super) fn read_changes(
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
        let kind =
            crate::store::ChangeKind::from_byte(rest[0]).ok_or_else(|| bad("unknown kind"))?;
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

pub(super) fn change_key(revision: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(CHANGES);
    k.extend_from_slice(&revision.to_be_bytes());
    k
}

pub(super) fn change_revision(key: &[u8]) -> Result<u64, StoreError> {
    key.get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt(key, "a change-log key is not a revision"))
}
