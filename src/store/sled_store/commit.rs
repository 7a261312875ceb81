//! The write path's core: the frame as stored, one key's change, the atomic batch that
//! carries the epoch and the updated state commitment, and the verifying scan that
//! recomputes the commitment while writers go on.

use sled::Batch;

use super::keys::{aux_key, corrupt};
use super::{CHANGES, Change, Frame, SCAN_STEP, Scan, SledStore, Writer};
use crate::store::commitment::{EPOCH, STATE, STORE_ID, frame_value, is_frame_key, parse_frame};
use crate::store::{Aux, Commitment, FrameStatus, StoreError};

impl SledStore {
    /// The frame as stored, with whether its tag verifies.
    pub(super) fn read_frame(&self) -> Result<Frame, StoreError> {
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
    pub(super) fn change(&self, key: Vec<u8>, new: Option<Vec<u8>>) -> Result<Change, StoreError> {
        let old = self.db.get(&key)?;
        Ok(Change { key, old, new })
    }

    /// The commitment element of one stored pair (sled's keys are the common layout).
    pub(super) fn element(&self, key: &[u8], value: &[u8]) -> Commitment {
        self.key.element(key, value)
    }

    /// Applies `changes` in one atomic batch with the epoch bump and the updated commitment
    /// (the caller holds the write lock, `w`). Not yet durable.
    pub(super) fn apply(
        &self,
        w: &mut Writer,
        mut changes: Vec<Change>,
    ) -> Result<u64, StoreError> {
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
    pub(super) fn scan<R>(
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
}
