//! The secret store: sealed records and per-name bookkeeping, never plaintext.
//!
//! [`Store`] is the seam between the service and its storage engine: [`SledStore`] is the
//! embedded default for one node, [`EtcdStore`] keeps the same records in an etcd cluster
//! (`[store] backend = "etcd"`). Calls may block (writes fsync, etcd calls cross the
//! network): the service runs them off the runtime, except GetSecret's point reads on a
//! store whose reads are local ([`Store::reads_are_local`]), which cost less than the
//! hand-off (`service::read_inline`).

mod commitment;
mod durable;
mod etcd;
mod etcd_endpoints;
mod feed;
mod lease;
pub mod migrate;
mod sled_store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use commitment::{Commitment, STATE_KEY_DOMAIN, StateKey};
pub use etcd::{EtcdOptions, EtcdStore};
pub use feed::{ChangeEvent, ChangeFeed, ChangeKind, FEED_CAPACITY, FeedError};
pub use lease::{Fenced, LocalLocks, Lock, LockHeld, LockKind, lock_name, lock_namespace};
pub use sled_store::SledStore;

use crate::config::{StoreBackend, StoreConfig};
use crate::secret::{NamePrefix, SealedRecord, SecretName};

/// sled's page cache when the configuration names none, in MiB.
///
/// The cache keeps recently used pages of the tree (heads, records, the upper levels of the
/// index) decoded in memory, so a read that hits it costs no system call; pages past the
/// budget are read back from the operating system's file cache. A small store's working set
/// (a thousand secrets is about 2 MiB) fits whole in 16 MiB, so its reads are unchanged. At a
/// million secrets (1.8 GB of files) neither 16 nor 128 MiB holds the working set of random
/// reads: nearly every read pages a node in (about 50–65 µs against 1.5 µs at a thousand,
/// `examples/sled_mem.rs`), and 128 MiB cost about 200 MiB more resident memory than 16
/// (416 against 213 MiB for the store alone, one malloc arena, 8 readers). 16 MiB keeps a
/// replica within the 256 MiB target (BENCHMARKS.md, *Scale*); a larger cache buys reads
/// only once it approaches the store's size.
pub const DEFAULT_CACHE_MB: u64 = 16;

/// Revisions of changes sled's change log keeps when the configuration names none.
pub const DEFAULT_WATCH_HISTORY: u64 = 10_000;
/// The most revisions of changes sled's change log may keep.
pub const MAX_WATCH_HISTORY: u64 = 10_000_000;

/// The most pairs one [`Store::replace_records`] call takes (etcd's default
/// `--max-txn-ops` is 128: each pair is one compare and one put, plus the frame's).
pub const MAX_REPLACE_BATCH: usize = 60;

/// Refuses a `replace_records` batch of more than [`MAX_REPLACE_BATCH`] pairs (either
/// backend).
fn check_replace_batch(pairs: usize) -> Result<(), StoreError> {
    if pairs > MAX_REPLACE_BATCH {
        return Err(StoreError::Corrupt {
            key: "replace_records".into(),
            reason: format!("{pairs} pairs, more than {MAX_REPLACE_BATCH}"),
        });
    }
    Ok(())
}

/// The etcd key namespace when the configuration names none.
pub const DEFAULT_ETCD_PREFIX: &str = "strongroom/";

/// The deadline of one etcd call when the configuration names none, in milliseconds.
pub const DEFAULT_ETCD_TIMEOUT_MS: u64 = 2000;

/// Opens the store the configuration selects; records are committed under `key`.
/// `max_value_bytes` bounds how many records one etcd range may return at once.
pub fn open(
    config: &StoreConfig,
    max_value_bytes: usize,
    key: StateKey,
) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match config.backend {
        StoreBackend::Sled => Arc::new(
            SledStore::open_with_cache(&config.path, config.cache_capacity_mb, key)?
                .with_change_history(config.watch_history),
        ),
        StoreBackend::Etcd => {
            // Validation (config.rs) requires all three with the etcd backend.
            let file = |p: &Option<PathBuf>| p.clone().unwrap_or_default();
            Arc::new(EtcdStore::open(
                EtcdOptions {
                    endpoints: config.endpoints.clone(),
                    ca: file(&config.ca),
                    cert: file(&config.cert),
                    key: file(&config.key),
                    prefix: config.prefix.clone(),
                    timeout: Duration::from_millis(config.etcd_timeout_ms),
                    max_value_bytes,
                },
                key,
            )?)
        }
    })
}

/// Errors of the store itself (not expected outcomes like a version conflict).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O, corruption it detected).
    #[error("store backend error: {0}")]
    Backend(#[from] sled::Error),
    /// A stored record or head did not decode.
    #[error("stored data for {key} is corrupt: {reason}")]
    Corrupt {
        /// Which key.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// The store's files could not be opened.
    #[error("cannot open the store at {path}: {reason}")]
    Open {
        /// The store directory.
        path: String,
        /// What went wrong, with what to check.
        reason: String,
    },
    /// The store's files could not be made durable (fsync failed): no write is
    /// acknowledged from then on.
    #[error("the store's files could not be made durable: {0}")]
    Sync(std::io::Error),
    /// The write lock was poisoned by a panic in another writer.
    #[error("the store's write lock is poisoned")]
    Poisoned,
    /// etcd did not answer within `store.etcd_timeout_ms`, or could not be reached.
    #[error("etcd is unreachable: {0}")]
    Unreachable(String),
    /// etcd answered with an error (e.g. its space quota is exhausted, or a request is
    /// larger than its `--max-request-bytes`).
    #[error("etcd refused the call: {0}")]
    Etcd(String),
}

/// The current latest version did not match the expected one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionConflict {
    /// The latest live version (0 when the secret does not exist).
    pub actual: u64,
}

/// Per-name bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    /// The highest version ever assigned to the name (kept after deletion).
    pub latest: u64,
    /// Whether the secret was deleted since its latest version.
    pub deleted: bool,
    /// The oldest version of the current incarnation still kept: versions below it were
    /// deleted before the name was written again, or destroyed by `max_versions`. 0 in heads
    /// written before it was kept (every version from 1 on is expected then).
    pub oldest: u64,
    /// How many versions the name keeps (0: every one).
    pub max_versions: u32,
}

/// The most versions one commit destroys for `max_versions` (etcd allows 128 operations in
/// one transaction); the rest go with the next commits, and the head's `oldest` says where
/// the kept versions start meanwhile.
pub const MAX_PRUNE_PER_COMMIT: usize = 100;

impl Head {
    /// The latest live version: 0 when the secret does not exist.
    pub fn live(&self) -> u64 {
        if self.deleted { 0 } else { self.latest }
    }

    /// Whether `version` is gone on purpose: deleted with the name, or destroyed by
    /// `max_versions` (it answers NOT_FOUND; a missing version that is not gone is lost).
    pub fn gone(&self, version: u64) -> bool {
        self.deleted || version < self.oldest || version > self.latest
    }

    /// The head after committing `version` over `before` (`None`: a new name), keeping
    /// `max_versions` (`None`: the name's setting as it was), and where to destroy older
    /// versions: `Some(cut)` when versions below `cut` may exist and must go in the same
    /// write. A name written again after a delete starts a new incarnation at `version`.
    pub fn next(
        before: Option<Head>,
        version: u64,
        max_versions: Option<u32>,
    ) -> (Head, Option<u64>) {
        let max = max_versions.unwrap_or(before.map_or(0, |h| h.max_versions));
        let (fresh, was) = match before {
            Some(h) if !h.deleted => (false, h.oldest.max(1)),
            _ => (true, version),
        };
        let mut oldest = was;
        if max > 0 {
            oldest = oldest.max(version.saturating_sub(u64::from(max) - 1));
        }
        let head = Head {
            latest: version,
            deleted: false,
            oldest,
            max_versions: max,
        };
        (head, (!fresh && oldest > was).then_some(oldest))
    }

    /// The head left by deleting the name: nothing of it is kept.
    pub fn deleted(&self) -> Head {
        Head {
            latest: self.latest,
            deleted: true,
            oldest: self.latest.saturating_add(1),
            max_versions: self.max_versions,
        }
    }
}

impl From<Head> for crate::proto::HeadV1 {
    fn from(h: Head) -> Self {
        Self {
            latest_version: h.latest,
            deleted: h.deleted,
            oldest_version: h.oldest,
            max_versions: h.max_versions,
        }
    }
}

impl From<crate::proto::HeadV1> for Head {
    fn from(h: crate::proto::HeadV1) -> Self {
        Self {
            latest: h.latest_version,
            deleted: h.deleted,
            oldest: h.oldest_version,
            max_versions: h.max_versions,
        }
    }
}

/// One page of names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Names, lexically ordered.
    pub names: Vec<SecretName>,
    /// Where the next page starts (exclusive), if there may be one: the last name returned
    /// when the page is full, or the last key examined when the scan's budget ran out.
    pub next_after: Option<String>,
    /// How many keys this call examined (live, deleted and invisible ones alike).
    pub examined: u64,
}

/// A half-open range of names in byte order, `start <= name < end` (no end: every name
/// from `start` on), as the store scans them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameRange {
    /// The first name of the range.
    pub start: String,
    /// The first name past the range.
    pub end: Option<String>,
}

impl NameRange {
    /// The ranges that hold exactly the names under the given prefixes, in name order. The
    /// prefixes must not nest (as [`Policy::list_scope`](crate::policy::Policy::list_scope)
    /// returns them), so the ranges are disjoint.
    ///
    /// A prefix `p` covers the name `p` and the names that start with `p/`, which are not
    /// adjacent in byte order (`p-x` and `p.x` lie between them): two ranges, `[p, p\0)` and
    /// `[p/, p0)` (`0` follows `/`), so no name outside the prefix is ever read.
    pub fn covering(prefixes: &[NamePrefix]) -> Vec<NameRange> {
        let mut out = Vec::with_capacity(prefixes.len() * 2);
        for p in prefixes {
            let p = p.as_str();
            if p.is_empty() {
                out.push(NameRange {
                    start: String::new(),
                    end: None,
                });
                continue;
            }
            out.push(NameRange {
                start: p.to_owned(),
                end: Some(format!("{p}\0")),
            });
            out.push(NameRange {
                start: format!("{p}/"),
                end: Some(format!("{p}0")),
            });
        }
        out.sort_by(|a, b| a.start.cmp(&b.start));
        out
    }
}

/// Namespaces of the records officers manage, kept beside the secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aux {
    /// Policies (MAC'd with the token's store key).
    Policy,
    /// Pending and past approvals (MAC'd with the token's store key).
    Approval,
    /// Bookkeeping flags.
    Meta,
    /// Expiry notices: one per `(name, version)` that entered the expiry-notice window,
    /// keyed [`notice_key`], written once by the `expiry-notice` job. Each one's creation
    /// is a change-feed event ([`ChangeKind::ExpiringSoon`]).
    Notice,
}

/// The key of the expiry notice of `name`'s `version` in [`Aux::Notice`]: the name, `\0`
/// and the version in 20 decimal digits (names never contain `\0`).
pub fn notice_key(name: &SecretName, version: u64) -> String {
    format!("{}\0{version:020}", name.as_str())
}

/// The name and version an expiry notice's key names; `None` for any other key.
pub fn parse_notice_key(key: &str, max_name: usize) -> Option<(SecretName, u64)> {
    let (name, version) = key.rsplit_once('\0')?;
    if version.len() != 20 {
        return None;
    }
    let version = version.parse().ok()?;
    Some((SecretName::parse(name, max_name).ok()?, version))
}

/// Whether the store's commitment and epoch carry a valid tag under the state key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameStatus {
    /// Present and authentic.
    Valid,
    /// Absent: a store written before state commitments, or the record was removed.
    Missing,
    /// Present but its tag does not verify: edited, or written under another token's key.
    Forged,
}

/// The store's identity, write counter and state commitment, read at one point in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreState {
    /// The store's random identity.
    pub store_id: String,
    /// Writes so far (see [`Store::epoch`]).
    pub epoch: u64,
    /// The commitment the store keeps, updated with every write.
    pub commitment: Commitment,
    /// Whether the kept epoch and commitment are authentic.
    pub frame: FrameStatus,
}

/// A full scan's commitment beside the one the store keeps, at the same point in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateCheck {
    /// The commitment the store keeps.
    pub stored: Commitment,
    /// The commitment recomputed from every committed record.
    pub computed: Commitment,
    /// How many records the scan hashed.
    pub records: u64,
}

impl StateCheck {
    /// Whether the records are exactly those the kept commitment describes.
    pub fn matches(&self) -> bool {
        self.stored == self.computed
    }
}

/// What a secret store does.
///
/// Every record but the store's own frame (identity, epoch, commitment) is committed: heads,
/// versions, wrap counts, policies, approvals and bookkeeping. Each write updates the
/// commitment (see [`StateKey`]) and bumps the epoch in the same atomic batch.
pub trait Store: Send + Sync + 'static {
    /// The head of `name`, if it ever existed.
    fn head(&self, name: &SecretName) -> Result<Option<Head>, StoreError>;

    /// Stores `record` as version `record.version` if the head still says `expected`
    /// (the head read before sealing); returns only once the write is durable. The name
    /// keeps its `max_versions` setting.
    fn commit(
        &self,
        record: &SealedRecord,
        expected: Option<Head>,
    ) -> Result<Result<(), VersionConflict>, StoreError> {
        self.commit_keeping(record, expected, None)
    }

    /// [`commit`](Self::commit), setting how many versions the name keeps (`None`: as it
    /// was; 0: every one). The head becomes [`Head::next`]; versions it no longer keeps are
    /// destroyed in the same atomic write (at most [`MAX_PRUNE_PER_COMMIT`] at once).
    fn commit_keeping(
        &self,
        record: &SealedRecord,
        expected: Option<Head>,
        max_versions: Option<u32>,
    ) -> Result<Result<(), VersionConflict>, StoreError>;

    /// One version of a secret.
    fn get(&self, name: &SecretName, version: u64) -> Result<Option<SealedRecord>, StoreError>;

    /// Every live version of a secret, oldest first.
    fn versions(&self, name: &SecretName) -> Result<Vec<SealedRecord>, StoreError>;

    /// Live names in `ranges` (disjoint, in order; see [`NameRange::covering`]) after
    /// `after`, for which `visible` holds: at most `limit` names, and at most `max_examined`
    /// keys read, so no call does unbounded work. Reads nothing outside the ranges.
    fn list(
        &self,
        ranges: &[NameRange],
        after: Option<&str>,
        limit: usize,
        max_examined: u64,
        visible: &dyn Fn(&SecretName) -> bool,
    ) -> Result<Page, StoreError>;

    /// Keys [`list`](Self::list) has examined since the store was opened, every call
    /// together.
    fn list_keys_examined(&self) -> u64;

    /// Destroys every version of `name`; returns how many. Durable on return. The head is
    /// kept ([`Head::deleted`]), so versions are never reused.
    fn delete(&self, name: &SecretName) -> Result<u64, StoreError>;

    /// Replaces each pair's stored record `old` with `new` (the same name and version: a
    /// re-seal) only where the stored record is still exactly `old`, in one atomic batch with
    /// the state commitment and only while `lock` is the caller's (fenced as
    /// [`aux_put_fenced`](Self::aux_put_fenced)). A record written, re-sealed or deleted since
    /// it was read is left as it is: its entry in the answer is `false`. At most
    /// [`MAX_REPLACE_BATCH`] pairs. Durable on return.
    fn replace_records(
        &self,
        lock: &Lock,
        pairs: &[(SealedRecord, SealedRecord)],
    ) -> Result<Result<Vec<bool>, Fenced>, StoreError>;

    /// Counts `n` more data-key wraps under master key `mk`; returns the new total. Called
    /// before the wrap, so a crash can only over-count.
    fn count_wraps(&self, mk: u32, n: u64) -> Result<u64, StoreError>;

    /// Number of live secrets.
    fn secret_count(&self) -> Result<u64, StoreError>;

    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> Result<u64, StoreError>;

    /// An officer-managed record.
    fn aux_get(&self, ns: Aux, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores an officer-managed record; durable on return.
    fn aux_put(&self, ns: Aux, key: &str, value: &[u8]) -> Result<(), StoreError>;

    /// Removes an officer-managed record; durable on return. Whether it existed.
    fn aux_delete(&self, ns: Aux, key: &str) -> Result<bool, StoreError>;

    /// Every record of a namespace, by key.
    fn aux_list(&self, ns: Aux) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// The store's identity and its epoch: a counter bumped by every write, in the same
    /// atomic batch. Kept in the token too (periodically), so an older copy of the store's
    /// files is detected.
    fn epoch(&self) -> Result<(String, u64), StoreError>;

    /// The identity, epoch and commitment as they stand (consistent with each other).
    fn state(&self) -> Result<StoreState, StoreError>;

    /// Recomputes the commitment from every committed record and compares it with the one
    /// the store keeps. Writers are held only for short steps, never for the whole scan.
    fn verify_state(&self) -> Result<StateCheck, StoreError>;

    /// Officers accepted the store as it is: recomputes the commitment from every record and
    /// keeps that (with a new epoch and a valid tag). Durable on return.
    fn rebase_state(&self) -> Result<StoreState, StoreError>;

    /// Makes every write so far durable.
    fn sync(&self) -> Result<(), StoreError>;

    /// Up to `limit` keys of the store with their values, in the common layout the state
    /// commitment is defined over, from the backend's position `cursor` (`None`: the
    /// start). For moving a store to another backend ([`migrate`]).
    fn export_page(
        &self,
        cursor: Option<&[u8]>,
        limit: usize,
    ) -> Result<migrate::ExportPage, StoreError>;

    /// Calls `f` with the stored value of every secret record (the keys that start with
    /// `r` in the common layout), in key order: for counting references without a copy of
    /// each record. The default reads [`export_page`](Self::export_page)s.
    fn for_each_record(&self, f: &mut dyn FnMut(&[u8])) -> Result<(), StoreError> {
        let mut cursor: Option<Vec<u8>> = None;
        loop {
            let page = self.export_page(cursor.as_deref(), 1024)?;
            for (k, v) in &page.pairs {
                if k.first() == Some(&b'r') {
                    f(v);
                }
            }
            match page.next {
                Some(n) => cursor = Some(n),
                None => return Ok(()),
            }
        }
    }

    /// Writes (`Some`) or removes (`None`) keys given in the common layout exactly as they
    /// are, the store's frame (identity, epoch, commitment) included and not updated: only
    /// for [`migrate`], which copies a whole store and verifies it.
    fn import_raw(&self, changes: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StoreError>;

    /// The changes to secrets after revision `after` (0: from now), in revision order, each
    /// once. Starting may block (etcd opens its watch here); `Compacted` when the events
    /// after `after` are no longer kept, `Ahead` when `after` is not yet a revision of the
    /// store. Only durable (sled) or committed (etcd) changes are sent.
    fn watch(&self, after: u64) -> Result<ChangeFeed, FeedError>;
    /// Takes the lock `name` ([`lock_name`]) for `holder` (a description for others'
    /// refusals) under a lease of `ttl`, unless a live holder has it: shared by every
    /// process on the same etcd, this process's own on sled (see [`Lock`]).
    fn try_lock(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Result<Lock, LockHeld>, StoreError>;

    /// Extends `lock`'s lease by its time to live; `false` when the lease is gone (expired
    /// or revoked): the lock is lost.
    fn renew_lock(&self, lock: &Lock) -> Result<bool, StoreError>;

    /// Gives `lock` up (revokes its lease), so another process may take it at once.
    fn unlock(&self, lock: &Lock) -> Result<(), StoreError>;

    /// [`aux_put`](Self::aux_put) only while `lock` is still the caller's: on etcd the
    /// same transaction compares the lock key's create revision with the lock's fence, so a
    /// holder that lost the lock (its lease lapsed while it was paused) writes nothing.
    fn aux_put_fenced(
        &self,
        lock: &Lock,
        ns: Aux,
        key: &str,
        value: &[u8],
    ) -> Result<Result<(), Fenced>, StoreError>;

    /// [`aux_delete`](Self::aux_delete) under `lock`, fenced as
    /// [`aux_put_fenced`](Self::aux_put_fenced).
    fn aux_delete_fenced(
        &self,
        lock: &Lock,
        ns: Aux,
        key: &str,
    ) -> Result<Result<bool, Fenced>, StoreError>;

    /// Whether a point read is served from this process's memory or disk (sled), so it may
    /// run on an async runtime thread; `false` when it crosses the network (etcd).
    fn reads_are_local(&self) -> bool {
        true
    }

    /// Whether the backend answered its last call or probe (etcd); health reports
    /// NOT_SERVING while it does not. An embedded store is always available.
    fn available(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_start_incarnations_and_keep_max_versions() {
        // A new name, and one written again after a delete, start where they are written.
        let (h, cut) = Head::next(None, 1, None);
        assert_eq!((h.oldest, h.max_versions, cut), (1, 0, None));
        let gone = Head { latest: 4, ..h }.deleted();
        assert!(gone.gone(4) && gone.gone(1));
        let (h, cut) = Head::next(Some(gone), 5, None);
        assert_eq!((h.latest, h.oldest, cut), (5, 5, None));
        assert!(h.gone(4) && !h.gone(5) && h.gone(6));
        // Keeping 2: the third version pushes the first out, in the same write.
        let (h, _) = Head::next(Some(h), 6, Some(2));
        assert_eq!((h.oldest, h.max_versions), (5, 2));
        let (h, cut) = Head::next(Some(h), 7, None);
        assert_eq!((h.oldest, h.max_versions, cut), (6, 2, Some(6)));
        // Back to every version: nothing more goes.
        let (h, cut) = Head::next(Some(h), 8, Some(0));
        assert_eq!((h.oldest, h.max_versions, cut), (6, 0, None));
        // Heads from before `oldest` was kept expect every version from 1.
        let legacy = Head {
            latest: 3,
            ..Head::default()
        };
        assert!(!legacy.gone(1));
        let (h, cut) = Head::next(Some(legacy), 4, Some(1));
        assert_eq!((h.oldest, cut), (4, Some(4)));
    }
}
