//! Reads: point gets, ranges, and bounded scans (pages of at most [`KEY_PAGE`] keys) at one
//! revision, including the verifying scan of the whole store.

use std::time::Instant;

use etcd_client::{GetOptions, GetResponse, KeyValue};

use crate::secret::SecretName;
use crate::store::commitment::is_frame_key;
use crate::store::{Commitment, Head, StoreError};

use super::EtcdStore;
use super::keys::decode_head;
use super::txn::{Frame, busy};

/// Keys per range call when scanning heads or officers' records.
pub(super) const SCAN_PAGE: i64 = 256;
/// Heads per range call when counting them (a head is a name and a few bytes).
pub(super) const COUNT_PAGE: i64 = 4096;
/// Keys per keys-only range call, which bounds a long scan's value calls (see
/// [`EtcdStore::scan_at`]): a key is at most the prefix, two bytes, a name of at most
/// [`MAX_NAME_BYTES_CEILING`](crate::secret::MAX_NAME_BYTES_CEILING) bytes and a version, so a
/// page stays far below [`MAX_RESPONSE_BYTES`].
pub(super) const KEY_PAGE: i64 = 16_384;
/// How many times a scan of the whole store starts again after etcd compacted its revision.
pub(super) const SCAN_RETRIES: usize = 4;

impl EtcdStore {
    pub(super) fn fetch(
        &self,
        deadline: Instant,
        key: Vec<u8>,
    ) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self.kv.clone();
        let mut resp = self.call(deadline, async move { kv.get(key, None).await })?;
        self.saw(resp.header().map(|h| h.revision()));
        Ok(resp.take_kvs().into_iter().next())
    }

    /// One range call: keys in `[start, end)`, at most `limit`, at `revision` (`None`: the
    /// latest); `keys_only` leaves the values out.
    pub(super) fn range_with(
        &self,
        deadline: Instant,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: i64,
        revision: Option<i64>,
        keys_only: bool,
    ) -> Result<GetResponse, StoreError> {
        let mut kv = self.kv.clone();
        let mut options = GetOptions::new().with_range(end).with_limit(limit.max(1));
        if let Some(r) = revision {
            options = options.with_revision(r);
        }
        if keys_only {
            options = options.with_keys_only();
        }
        let resp = self.call(deadline, async move { kv.get(start, Some(options)).await })?;
        self.saw(resp.header().map(|h| h.revision()));
        Ok(resp)
    }

    /// [`range_with`](Self::range_with) with the values.
    pub(super) fn range(
        &self,
        deadline: Instant,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: i64,
        revision: Option<i64>,
    ) -> Result<GetResponse, StoreError> {
        self.range_with(deadline, start, end, limit, revision, false)
    }

    /// Every key-value in `[start, end)`, read `page` keys per call.
    pub(super) fn scan(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        page: i64,
        each: impl FnMut(&KeyValue) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.scan_at(start, end, page, None, each)
    }

    /// [`scan`](Self::scan) at one `revision` (`None`: each call at the latest): etcd's MVCC
    /// gives every page as of that revision, however long the scan takes, unless etcd
    /// compacts it meanwhile ([`is_compacted`]).
    ///
    /// etcd 3.4 collects every key from a call's start to its range end in its index before
    /// it applies the call's limit, so paging through `[start, end)` with limited calls costs
    /// the square of the keys (a million records did not finish in 13 minutes). Only the
    /// first page is read that way; if more follow, their keys are read [`KEY_PAGE`] at a
    /// time without values, and the values in ranges bounded by those keys, `page` keys
    /// each: every call's range then holds about as many keys as it returns, but for the
    /// keys-only calls (one per [`KEY_PAGE`] keys, each still walking the rest of the range). The bounded ranges tile `[start, end)`
    /// without gaps, so a key written between the calls of a scan at the latest revision
    /// is read as with unbounded pages.
    pub(super) fn scan_at(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        page: i64,
        revision: Option<i64>,
        mut each: impl FnMut(&KeyValue) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let resp = self.range(self.deadline(), start, end.clone(), page, revision)?;
        for kv in resp.kvs() {
            each(kv)?;
        }
        let Some(mut from) = resume_after(&resp) else {
            return Ok(());
        };
        let step = usize::try_from(page.max(1)).unwrap_or(1);
        loop {
            let keys = self.range_with(
                self.deadline(),
                from.clone(),
                end.clone(),
                self.key_page,
                revision,
                true,
            )?;
            let ks = keys.kvs();
            let next = resume_after(&keys);
            let upto = next.clone().unwrap_or_else(|| end.clone());
            let mut lo = from;
            for i in (0..ks.len()).step_by(step) {
                let hi = ks
                    .get(i + step)
                    .map_or_else(|| upto.clone(), |kv| kv.key().to_vec());
                self.scan_bounded(lo, hi.clone(), page, revision, &mut each)?;
                lo = hi;
            }
            match next {
                Some(n) => from = n,
                None => {
                    // Keys written after the keys-only call (at the latest revision only).
                    if revision.is_none() && lo < end {
                        self.scan_bounded(lo, end, page, revision, &mut each)?;
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Every key-value in `[start, end)`, `page` per call, for a range that holds about
    /// `page` keys (see [`scan_at`](Self::scan_at)).
    pub(super) fn scan_bounded(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        page: i64,
        revision: Option<i64>,
        each: &mut impl FnMut(&KeyValue) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut from = start;
        while from < end {
            let resp = self.range(self.deadline(), from, end.clone(), page, revision)?;
            for kv in resp.kvs() {
                each(kv)?;
            }
            match resume_after(&resp) {
                Some(next) => from = next,
                None => return Ok(()),
            }
        }
        Ok(())
    }

    pub(super) fn read_head(
        &self,
        deadline: Instant,
        name: &SecretName,
    ) -> Result<Option<Head>, StoreError> {
        self.fetch(deadline, self.head_key(name))?
            .map(|kv| decode_head(kv.key(), kv.value()))
            .transpose()
    }

    /// The commitment recomputed from every committed key at `revision`, and how many keys
    /// it hashed.
    pub(super) fn commitment_at(&self, revision: i64) -> Result<(Commitment, u64), StoreError> {
        let (start, end) = self.all_range();
        let mut acc = Commitment::EMPTY;
        let mut records = 0u64;
        self.scan_at(start, end, self.records_per_range, Some(revision), |kv| {
            let k = self.canonical(kv.key());
            if !is_frame_key(&k) {
                acc = acc.add(&self.key.element(&k, kv.value()));
                records += 1;
            }
            Ok(())
        })?;
        Ok((acc, records))
    }

    /// The frame and the commitment recomputed from every record, both at one revision: a
    /// consistent view that holds no writer back.
    pub(super) fn scan_state(&self) -> Result<(Frame, Commitment, u64), StoreError> {
        let mut last = None;
        for _ in 0..SCAN_RETRIES {
            let (frame, _, revision) = self.snapshot(self.deadline(), &[])?;
            match self.commitment_at(revision) {
                Ok((computed, records)) => return Ok((frame, computed, records)),
                // etcd compacted the revision during the scan: start again at a newer one.
                Err(e) if is_compacted(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(busy))
    }
}

/// Where a paged range continues: just after its last key, if etcd said more follow.
pub(super) fn resume_after(resp: &GetResponse) -> Option<Vec<u8>> {
    match resp.kvs().last() {
        Some(last) if resp.more() => {
            let mut from = last.key().to_vec();
            from.push(0);
            Some(from)
        }
        _ => None,
    }
}

/// Whether etcd refused a read at a revision it has compacted away.
pub(super) fn is_compacted(e: &StoreError) -> bool {
    matches!(e, StoreError::Etcd(m) if m.contains("compacted"))
}
