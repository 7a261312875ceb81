//! The etcd backend: the same records as the sled store, kept in an etcd v3 cluster reached
//! over mutual TLS, so several service processes can share one store.
//!
//! Key layout, every key under `store.prefix` (`P`, default `strongroom/`):
//!
//! | key | value |
//! | --- | --- |
//! | `P h/` name | [`HeadV1`](crate::proto::HeadV1): latest version, deleted flag, oldest kept version, max versions |
//! | `P r/` name `\0` version (20 decimal digits) | [`SealedRecordV1`](crate::proto::SealedRecordV1) |
//! | `P w/` master key version (10 decimal digits) | wrap count, 8 bytes big-endian |
//! | `P p/` key, `P a/` key, `P m/` key | policies, approvals, bookkeeping (as officers wrote them) |
//! | `P e/` name `\0` version (20 decimal digits) | an expiry notice: the version's expiry, 8 bytes big-endian |
//! | `P m/store-id` | the store's random identity (hex) |
//! | `P m/epoch` | the write counter, 8 bytes big-endian |
//! | `P m/state` | the state commitment and its tag (see [`StateKey`]) |
//!
//! Locks (replica ids, once-only jobs) live beside the prefix, outside the commitment:
//! see [`lease`](super::lease).
//!
//! Names never contain `\0`, so a name's records are exactly the keys under `P r/` name `\0`,
//! and heads sort by name as in sled. etcd sees names, ciphertext and wrapped keys, never a
//! value.
//!
//! Every change is one etcd transaction that also moves the frame (`m/epoch` and `m/state`):
//! the epoch plus one, and the commitment plus the elements of the new values minus those of
//! the old, tagged. It applies only if the frame's mod revisions are the ones this process
//! last saw, and each changed key is what the commitment's update assumes (the head as the
//! caller read it, a value compare: a head's `(latest, deleted)` never repeats; a new
//! version's key absent; other keys at the mod revision last seen), so check-and-set holds
//! across processes and the commitment moves by exactly the change. A refused transaction
//! returns the frame and those keys as they are now in the same round trip: a stale frame
//! (another writer) is retried against them, a changed head is a version conflict. A delete
//! first reads the name's versions and the frame at one revision (their old values leave the
//! commitment). A put is acknowledged by etcd only after a quorum committed it to its log, so
//! [`Store::sync`] has nothing to do.
//!
//! The commitment is defined over sled's key layout ([`EtcdStore::canonical`] maps etcd's
//! keys to it), so the same records commit to the same value on either backend. A verifying
//! scan reads the frame and then every key under the prefix at that one revision: etcd's MVCC
//! makes it consistent without holding any writer back.
//!
//! WatchSecrets reads etcd's own history: a watch on the heads' and expiry notices' range
//! (`P e/` to `P h/`, adjacent: no other kind sorts between them) from the revision after
//! the watcher's last (`start_revision`), with each head's previous value to tell a creation
//! from an update, and each notice's creation as an expiring-soon event; an event's revision is the head's mod revision, the same on every
//! replica, so a watcher may resume on any of them. etcd's compaction of that history is
//! [`FeedError::Compacted`]. Nothing is stored for it beside the records.
//!
//! etcd-client is async and the trait is blocking: the client runs on this store's own
//! one-thread runtime, and every call waits for at most `store.etcd_timeout_ms`, after which
//! it fails with [`StoreError::Unreachable`] (UNAVAILABLE to clients). The calls go through
//! [`etcd_endpoints`](super::etcd_endpoints): one connection per member, each call to a
//! member that is up, sent again to the next one only when it was never sent (its connection
//! could not be made). A probe of each member every half second keeps [`Store::available`]
//! current (false only when no member answers), so health follows etcd without traffic.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    GetResponse, Identity, KeyValue, KvClient, LeaseClient, MaintenanceClient, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchClient, WatchOptions, WatchResponse,
    WatchStream,
};
use prost::Message;

use super::commitment::{EPOCH, STATE, STORE_ID, frame_value, is_frame_key, parse_frame};
use super::etcd_endpoints::Members;
use super::{
    Aux, ChangeEvent, ChangeFeed, ChangeKind, Commitment, FeedError, Fenced, FrameStatus, Head,
    Lock, LockHeld, NameRange, Page, StateCheck, StateKey, Store, StoreError, StoreState,
    VersionConflict, lock_namespace,
};
use crate::proto::HeadV1;
use crate::secret::{SealedRecord, SecretName};

/// Keys per range call when scanning heads or officers' records.
const SCAN_PAGE: i64 = 256;
/// Heads per range call when counting them (a head is a name and a few bytes).
const COUNT_PAGE: i64 = 4096;
/// Keys per keys-only range call, which bounds a long scan's value calls (see
/// [`EtcdStore::scan_at`]): a key is at most the prefix, two bytes, a name of at most
/// [`MAX_NAME_BYTES_CEILING`](crate::secret::MAX_NAME_BYTES_CEILING) bytes and a version, so a
/// page stays far below [`MAX_RESPONSE_BYTES`].
const KEY_PAGE: i64 = 16_384;
/// How many times a write retries when other writers keep moving the epoch.
const EPOCH_RETRIES: usize = 64;
/// The pause between attempts to open a watch while members fail.
const WATCH_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How many times a scan of the whole store starts again after etcd compacted its revision.
const SCAN_RETRIES: usize = 4;
/// The first byte of a key outside the layout in the common layout of the commitment: no
/// kind uses it, so such a key never passes for a record the service reads.
const FOREIGN_KIND: u8 = 0xff;
/// The largest response this client decodes: ranges of records are sized to stay below.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs, `https://host:port`.
    pub endpoints: Vec<String>,
    /// The CA of etcd's server certificates, PEM.
    pub ca: PathBuf,
    /// The client certificate, PEM.
    pub cert: PathBuf,
    /// The client certificate's private key, PEM.
    pub key: PathBuf,
    /// The key namespace.
    pub prefix: String,
    /// The deadline of each call.
    pub timeout: Duration,
    /// The largest secret value the service accepts (sizes record ranges).
    pub max_value_bytes: usize,
}

/// The etcd-backed store.
pub struct EtcdStore {
    /// Runs the client; shut down in the background on drop (a runtime may not be dropped
    /// on another runtime's thread).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    kv: KvClient,
    maintenance: MaintenanceClient,
    watch: WatchClient,
    /// Grants and keeps the leases of locks (see [`lease`](super::lease)).
    lease: LeaseClient,
    prefix: Vec<u8>,
    /// Where lock keys live: beside the prefix, outside the state commitment.
    locks: Vec<u8>,
    timeout: Duration,
    /// The key the store commits its records under.
    key: StateKey,
    /// Held across a write, so this process's writers take turns (other processes are
    /// fenced by the compare on the frame's mod revisions).
    writer: Mutex<Writer>,
    examined: AtomicU64,
    available: Arc<AtomicBool>,
    /// The highest etcd revision this process has seen.
    revision: Arc<AtomicI64>,
    /// Records per range call, so a response stays below [`MAX_RESPONSE_BYTES`].
    records_per_range: i64,
    /// Keys per keys-only call of a long scan ([`KEY_PAGE`]).
    key_page: i64,
    endpoints: String,
    /// The members, their connections and health; the clients above send through them.
    members: Members,
}

/// The frame (identity, epoch, commitment) as read at one revision.
#[derive(Clone)]
struct Frame {
    store_id: String,
    epoch: u64,
    commitment: Commitment,
    status: FrameStatus,
    /// Mod revisions of the epoch and state keys (0: absent): a write applies only while
    /// both are as read, so the commitment it moves is the one it read.
    revs: (i64, i64),
}

/// A key's value and mod revision as last seen.
#[derive(Clone)]
struct Seen {
    value: Vec<u8>,
    revision: i64,
}

impl From<&KeyValue> for Seen {
    fn from(kv: &KeyValue) -> Self {
        Self {
            value: kv.value().to_vec(),
            revision: kv.mod_revision(),
        }
    }
}

/// What this process's writers share.
#[derive(Default)]
struct Writer {
    /// The frame as this process last saw it; `None` after an unknown outcome.
    frame: Option<Frame>,
    /// Wrap counters as this process last wrote them, so counting costs one round trip.
    wraps: HashMap<Vec<u8>, Seen>,
}

/// One committed key's change: its value before (which the write's compares guarantee) and
/// after (`None`: absent).
struct Change {
    key: Vec<u8>,
    old: Option<Vec<u8>>,
    new: Option<Vec<u8>>,
}

/// One write attempt's outcome.
enum Attempt {
    /// Applied; the responses of the caller's operations.
    Applied(Vec<TxnOpResponse>),
    /// A compare failed; the keys the caller asked to see, as they are now (and the frame as
    /// it is now in [`Writer::frame`]).
    Refused(Vec<Option<KeyValue>>),
}

/// A key replaced by [`EtcdStore::update`]: its value before and after, and the revision of
/// the write.
struct Updated {
    old: Option<Vec<u8>>,
    new: Option<Vec<u8>>,
    revision: i64,
}

impl EtcdStore {
    /// Connects to etcd and reads (or creates) the store's identity; records are committed
    /// under `key`. Fails with a message
    /// naming the endpoints when etcd cannot be reached within the deadline.
    pub fn open(options: EtcdOptions, key: StateKey) -> Result<Self, StoreError> {
        let endpoints = options.endpoints.join(",");
        let fail = |reason: String| StoreError::Open {
            path: format!("etcd {endpoints}"),
            reason,
        };
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).map_err(|e| fail(format!("cannot read {what} {}: {e}", p.display())))
        };
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&options.ca, "store.ca")?))
            .identity(Identity::from_pem(
                read(&options.cert, "store.cert")?,
                read(&options.key, "store.key")?,
            ));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| fail(format!("cannot start the etcd client's runtime: {e}")))?;
        let handle = runtime.handle().clone();
        // One connection per member, each call to a member that answers (see
        // `etcd_endpoints`); the connections' tasks run on this store's runtime.
        let members = {
            let _on = handle.enter();
            Members::new(&options.endpoints, Some(tls), options.timeout).map_err(fail)?
        };
        // A member cut off from its leader answers at once instead of waiting.
        let connect = ConnectOptions::new().with_require_leader(true);
        let channel = members.channel();
        let deadline = Instant::now() + options.timeout;
        let client = run(&handle, deadline, {
            let connect = connect.clone();
            async move { Client::from_channel(channel, Some(connect)).await }
        })
        .map_err(|e| {
            fail(format!(
                "{e}; check store.endpoints, store.ca, store.cert and store.key"
            ))
        })?;
        let per_record = options.max_value_bytes.saturating_add(16 << 10).max(1);
        let records_per_range = i64::try_from((MAX_RESPONSE_BYTES / 2) / per_record)
            .unwrap_or(1)
            .clamp(1, SCAN_PAGE);
        let store = Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            maintenance: client.maintenance_client(),
            watch: client.watch_client(),
            lease: client.lease_client(),
            runtime: Some(runtime),
            handle,
            locks: lock_namespace(&options.prefix).into_bytes(),
            prefix: options.prefix.into_bytes(),
            timeout: options.timeout,
            key,
            writer: Mutex::new(Writer::default()),
            examined: AtomicU64::new(0),
            available: Arc::new(AtomicBool::new(true)),
            revision: Arc::new(AtomicI64::new(0)),
            records_per_range,
            key_page: KEY_PAGE,
            endpoints: endpoints.clone(),
            members,
        };
        store
            .init_frame()
            .map_err(|e| fail(format!("{e}; check store.endpoints and that etcd is running, and its TLS (store.ca, store.cert, store.key)")))?;
        store.members.spawn_probe(
            &store.handle,
            connect,
            store.aux_key(Aux::Meta, STORE_ID),
            store.timeout,
            store.available.clone(),
            store.revision.clone(),
        );
        Ok(store)
    }

    /// The same store with scans paged `records` records and `keys` keys per call (both at
    /// least 1): tests use small pages to cross page bounds with few records.
    #[doc(hidden)]
    pub fn with_scan_pages(mut self, records: i64, keys: i64) -> Self {
        self.records_per_range = records.max(1);
        self.key_page = keys.max(1);
        self
    }

    /// The highest etcd revision this process has seen in a response: a position in etcd's
    /// history (for watches and rollback checks that span processes).
    pub fn last_revision(&self) -> i64 {
        self.revision.load(Ordering::Relaxed)
    }

    /// The etcd key of a kind (`h`, `r`, `w`, `p`, `a`, `m`) and a suffix.
    fn key(&self, tag: u8, rest: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + 2 + rest.len());
        k.extend_from_slice(&self.prefix);
        k.push(tag);
        k.push(b'/');
        k.extend_from_slice(rest);
        k
    }

    /// Where the keys of a kind start (`P tag/`) and end (`P tag0`).
    fn kind_range(&self, tag: u8) -> (Vec<u8>, Vec<u8>) {
        let start = self.key(tag, b"");
        let mut end = start.clone();
        // The last byte is '/': '0' follows it.
        if let Some(last) = end.last_mut() {
            *last = b'0';
        }
        (start, end)
    }

    fn head_key(&self, name: &SecretName) -> Vec<u8> {
        self.key(b'h', name.as_str().as_bytes())
    }

    fn record_prefix(&self, name: &SecretName) -> Vec<u8> {
        let mut k = self.key(b'r', name.as_str().as_bytes());
        k.push(0);
        k
    }

    fn record_key(&self, name: &SecretName, version: u64) -> Vec<u8> {
        let mut k = self.record_prefix(name);
        k.extend_from_slice(format!("{version:020}").as_bytes());
        k
    }

    /// The version a record key names (its last 20 decimal digits).
    fn record_version(&self, key: &[u8]) -> Result<u64, StoreError> {
        key.len()
            .checked_sub(20)
            .and_then(|at| decimal(&key[at..], 20))
            .ok_or_else(|| corrupt(key, "not a record key"))
    }

    fn aux_key(&self, ns: Aux, key: &str) -> Vec<u8> {
        self.key(aux_tag(ns), key.as_bytes())
    }

    /// The frame's keys: identity, epoch, commitment with its tag.
    fn frame_keys(&self) -> [Vec<u8>; 3] {
        [STORE_ID, EPOCH, STATE].map(|k| self.aux_key(Aux::Meta, k))
    }

    /// Every key of the store: `[P, P')` where `P'` follows the prefix's final `/`.
    fn all_range(&self) -> (Vec<u8>, Vec<u8>) {
        let start = self.prefix.clone();
        let mut end = start.clone();
        // Validation (config.rs) requires the prefix to end in '/': '0' follows it.
        if let Some(last) = end.last_mut() {
            *last = b'0';
        }
        (start, end)
    }

    /// `key` (under the prefix) in the common layout the commitment is defined over (see
    /// [`commitment`](super::commitment)): the kind byte, then the name or key, with
    /// versions and master key versions as big-endian integers. A key that fits no kind
    /// keeps its bytes behind [`FOREIGN_KIND`].
    fn canonical(&self, key: &[u8]) -> Vec<u8> {
        let rest = key.strip_prefix(self.prefix.as_slice()).unwrap_or(key);
        let foreign = || {
            let mut k = vec![FOREIGN_KIND];
            k.extend_from_slice(rest);
            k
        };
        let (Some(&kind), Some(b'/')) = (rest.first(), rest.get(1)) else {
            return foreign();
        };
        let body = &rest[2..];
        let mut k = Vec::with_capacity(body.len() + 1);
        k.push(kind);
        match kind {
            b'h' | b'p' | b'a' | b'm' | b'e' => k.extend_from_slice(body),
            b'r' => {
                let Some(nul) = body.iter().rposition(|&b| b == 0) else {
                    return foreign();
                };
                let Some(version) = decimal(&body[nul + 1..], 20) else {
                    return foreign();
                };
                k.extend_from_slice(&body[..=nul]);
                k.extend_from_slice(&version.to_be_bytes());
            }
            b'w' => {
                let Some(mk) = decimal(body, 10).and_then(|v| u32::try_from(v).ok()) else {
                    return foreign();
                };
                k.extend_from_slice(&mk.to_be_bytes());
            }
            _ => return foreign(),
        }
        k
    }

    /// The etcd key of a key in the common layout: the inverse of
    /// [`canonical`](Self::canonical).
    fn etcd_key_of(&self, key: &[u8]) -> Result<Vec<u8>, StoreError> {
        let bad = || corrupt(key, "not a key in the common layout");
        let (&kind, body) = key.split_first().ok_or_else(bad)?;
        Ok(match kind {
            FOREIGN_KIND => {
                let mut k = self.prefix.clone();
                k.extend_from_slice(body);
                k
            }
            b'h' | b'p' | b'a' | b'm' | b'e' => self.key(kind, body),
            b'r' => {
                let at = body.len().checked_sub(8).ok_or_else(bad)?;
                let (name, version) = body.split_at(at);
                let version = u64::from_be_bytes(version.try_into().map_err(|_| bad())?);
                let mut rest = name.to_vec();
                rest.extend_from_slice(format!("{version:020}").as_bytes());
                self.key(kind, &rest)
            }
            b'w' => {
                let mk = u32::from_be_bytes(body.try_into().map_err(|_| bad())?);
                self.key(kind, format!("{mk:010}").as_bytes())
            }
            _ => return Err(bad()),
        })
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Runs one etcd call on the client's runtime, bounded by `deadline`; keeps
    /// [`Store::available`] current.
    fn call<T: Send + 'static>(
        &self,
        deadline: Instant,
        fut: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let result = run(&self.handle, deadline, fut);
        match &result {
            Ok(_) => self.available.store(true, Ordering::Relaxed),
            // A call that failed on one member while others are up leaves health alone.
            Err(StoreError::Unreachable(e)) if !self.members.any_up() => {
                if self.available.swap(false, Ordering::Relaxed) {
                    tracing::warn!(endpoints = %self.endpoints, error = %e, "etcd is unreachable");
                }
            }
            Err(_) => {}
        }
        result
    }

    fn fetch(&self, deadline: Instant, key: Vec<u8>) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self.kv.clone();
        let mut resp = self.call(deadline, async move { kv.get(key, None).await })?;
        self.saw(resp.header().map(|h| h.revision()));
        Ok(resp.take_kvs().into_iter().next())
    }

    /// One range call: keys in `[start, end)`, at most `limit`, at `revision` (`None`: the
    /// latest); `keys_only` leaves the values out.
    fn range_with(
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
    fn range(
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
    fn scan(
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
    fn scan_at(
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
    fn scan_bounded(
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

    fn saw(&self, revision: Option<i64>) {
        if let Some(r) = revision {
            self.revision.fetch_max(r, Ordering::Relaxed);
        }
    }

    fn read_head(&self, deadline: Instant, name: &SecretName) -> Result<Option<Head>, StoreError> {
        self.fetch(deadline, self.head_key(name))?
            .map(|kv| decode_head(kv.key(), kv.value()))
            .transpose()
    }

    /// Gives a new store its identity: an empty one (nothing under the prefix) also commits
    /// to nothing at epoch 0, as on sled. One with records but no identity (filled by other
    /// means, or its identity removed) gets no commitment: the start check decides whether
    /// to trust it.
    fn init_frame(&self) -> Result<(), StoreError> {
        use ring::rand::SecureRandom;
        let mut id = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| StoreError::Corrupt {
                key: STORE_ID.into(),
                reason: "the system random generator failed".into(),
            })?;
        let id = hex::encode(id);
        let [id_key, _, state_key] = self.frame_keys();
        let deadline = self.deadline();
        // A store with an identity (every start but the first) needs nothing. etcd evaluates
        // a compare over a range by reading every key of it, values too, inside its apply
        // loop: over a whole store of a million records that held every write back past
        // etcd's request timeout, and strongroomd could not start on it.
        if self.fetch(deadline, id_key.clone())?.is_some() {
            return Ok(());
        }
        let (start, end) = self.all_range();
        let empty = self
            .range_with(deadline, start.clone(), end.clone(), 1, None, true)?
            .kvs()
            .is_empty();
        let tag = self.key.frame_tag(&id, 0, &Commitment::EMPTY);
        // Created once, by whichever process gets there first: an empty range's keys all
        // have create revision 0 (compared only when the range was just seen empty, so the
        // compare reads at most what was written since).
        let txn = Txn::new()
            .when([Compare::create_revision(start, CompareOp::Equal, 0).with_range(end)])
            .and_then([
                TxnOp::put(id_key.clone(), id.clone(), None),
                TxnOp::put(state_key, frame_value(&Commitment::EMPTY, &tag), None),
            ]);
        let mut kv = self.kv.clone();
        if empty
            && self
                .call(deadline, async move { kv.txn(txn).await })?
                .succeeded()
        {
            return Ok(());
        }
        let txn = Txn::new()
            .when([Compare::create_revision(
                id_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(id_key, id, None)]);
        let mut kv = self.kv.clone();
        self.call(self.deadline(), async move { kv.txn(txn).await })?;
        Ok(())
    }

    /// Gets of the frame's keys, in [`frame_keys`](Self::frame_keys)' order.
    fn frame_gets(&self) -> Vec<TxnOp> {
        self.frame_keys()
            .into_iter()
            .map(|k| TxnOp::get(k, None))
            .collect()
    }

    /// The frame from the answers to [`frame_gets`](Self::frame_gets) (the first three
    /// responses), and the keys the other responses got.
    fn read_frame(
        &self,
        responses: Vec<TxnOpResponse>,
    ) -> Result<(Frame, Vec<Option<KeyValue>>), StoreError> {
        let mut kvs = responses
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(mut g) => Ok(g.take_kvs().into_iter().next()),
                _ => Err(corrupt(&self.prefix, "etcd answered the wrong operation")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if kvs.len() < 3 {
            return Err(corrupt(&self.prefix, "etcd answered too few operations"));
        }
        let rest = kvs.split_off(3);
        let mut frame = kvs.into_iter();
        let (id, epoch, state) = (
            frame.next().flatten(),
            frame.next().flatten(),
            frame.next().flatten(),
        );
        let store_id = id
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            .unwrap_or_default();
        let (epoch_value, epoch_rev) = epoch
            .as_ref()
            .map_or((0, 0), |kv| (decode_epoch(kv.value()), kv.mod_revision()));
        let (commitment, status) = parse_frame(
            &self.key,
            &store_id,
            epoch_value,
            state.as_ref().map(|kv| kv.value()),
        );
        let frame = Frame {
            store_id,
            epoch: epoch_value,
            commitment,
            status,
            revs: (epoch_rev, state.as_ref().map_or(0, |kv| kv.mod_revision())),
        };
        Ok((frame, rest))
    }

    /// The frame and `keys` at one revision, with that revision.
    fn snapshot(
        &self,
        deadline: Instant,
        keys: &[Vec<u8>],
    ) -> Result<(Frame, Vec<Option<KeyValue>>, i64), StoreError> {
        let mut ops = self.frame_gets();
        ops.extend(keys.iter().map(|k| TxnOp::get(k.clone(), None)));
        let txn = Txn::new().and_then(ops);
        let mut kv = self.kv.clone();
        let resp = self.call(deadline, async move { kv.txn(txn).await })?;
        let revision = resp.header().map_or(0, |h| h.revision());
        self.saw(Some(revision));
        let (frame, rest) = self.read_frame(resp.op_responses())?;
        Ok((frame, rest, revision))
    }

    /// The frame as this process last saw it, or as it is now.
    fn current_frame(&self, deadline: Instant, w: &Writer) -> Result<Frame, StoreError> {
        match &w.frame {
            Some(f) => Ok(f.clone()),
            None => Ok(self.snapshot(deadline, &[])?.0),
        }
    }

    /// One attempt at a write against `base`, the frame as read: applies `ops` if `compares`
    /// hold and the frame is unchanged, with the epoch bump and the commitment moved by
    /// `changes` in the same transaction. Refused, it returns `watch` as they are now.
    #[allow(clippy::too_many_arguments)] // the parts of one etcd transaction, used once each
    fn attempt(
        &self,
        deadline: Instant,
        w: &mut Writer,
        base: Frame,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
        changes: &[Change],
        watch: &[Vec<u8>],
    ) -> Result<Attempt, StoreError> {
        let mut c = base.commitment;
        for ch in changes {
            let k = self.canonical(&ch.key);
            if is_frame_key(&k) {
                return Err(corrupt(
                    &ch.key,
                    "the store's frame is not written this way",
                ));
            }
            if let Some(old) = &ch.old {
                c = c.sub(&self.key.element(&k, old));
            }
            if let Some(new) = &ch.new {
                c = c.add(&self.key.element(&k, new));
            }
        }
        // Keep an unverifiable frame unverifiable: only officers re-base it.
        let valid = base.status == FrameStatus::Valid;
        self.frame_txn(deadline, w, base, c, valid, compares, ops, watch)
    }

    /// The transaction of a write: `ops` and the frame at the next epoch with commitment
    /// `c` (tagged when `tag`, else with a zero tag) if `compares` hold and the frame's keys
    /// are as in `base`. Leaves the frame as it is after the call in `w`.
    #[allow(clippy::too_many_arguments)]
    fn frame_txn(
        &self,
        deadline: Instant,
        w: &mut Writer,
        base: Frame,
        c: Commitment,
        tag: bool,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
        watch: &[Vec<u8>],
    ) -> Result<Attempt, StoreError> {
        let epoch = base.epoch + 1;
        let tag_bytes = if tag {
            self.key.frame_tag(&base.store_id, epoch, &c)
        } else {
            [0; 32]
        };
        let [_, epoch_key, state_key] = self.frame_keys();
        let mut when = compares;
        when.push(Compare::mod_revision(
            epoch_key.clone(),
            CompareOp::Equal,
            base.revs.0,
        ));
        when.push(Compare::mod_revision(
            state_key.clone(),
            CompareOp::Equal,
            base.revs.1,
        ));
        let mut then = ops;
        let ours = then.len();
        then.push(TxnOp::put(epoch_key, epoch.to_be_bytes().to_vec(), None));
        then.push(TxnOp::put(state_key, frame_value(&c, &tag_bytes), None));
        let mut otherwise = self.frame_gets();
        otherwise.extend(watch.iter().map(|k| TxnOp::get(k.clone(), None)));
        let txn = Txn::new().when(when).and_then(then).or_else(otherwise);
        let mut kv = self.kv.clone();
        // An unknown outcome (deadline, lost connection) leaves the frame unknown too.
        w.frame = None;
        let resp: TxnResponse = self.call(deadline, async move { kv.txn(txn).await })?;
        let revision = resp.header().map(|h| h.revision());
        self.saw(revision);
        let mut responses = resp.op_responses();
        if resp.succeeded() {
            w.frame = revision.map(|r| Frame {
                epoch,
                commitment: c,
                status: if tag { FrameStatus::Valid } else { base.status },
                revs: (r, r),
                store_id: base.store_id,
            });
            responses.truncate(ours);
            return Ok(Attempt::Applied(responses));
        }
        let (now, rest) = self.read_frame(responses)?;
        w.frame = Some(now);
        Ok(Attempt::Refused(rest))
    }

    /// Replaces one committed key's value with `f(current)` (`None`: removes it) in one
    /// transaction with the frame. `seen` is the key as last seen (`None`: absent, a guess
    /// a refusal corrects).
    fn update(
        &self,
        w: &mut Writer,
        key: &[u8],
        mut seen: Option<Seen>,
        f: impl Fn(Option<&[u8]>) -> Option<Vec<u8>>,
    ) -> Result<Updated, StoreError> {
        let deadline = self.deadline();
        for _ in 0..EPOCH_RETRIES {
            let base = self.current_frame(deadline, w)?;
            let (compare, old) = guard(key, seen.as_ref());
            let new = f(old.as_deref());
            let op = match &new {
                Some(v) => TxnOp::put(key.to_vec(), v.clone(), None),
                None => TxnOp::delete(key.to_vec(), None),
            };
            let change = Change {
                key: key.to_vec(),
                old: old.clone(),
                new: new.clone(),
            };
            match self.attempt(
                deadline,
                w,
                base,
                vec![compare],
                vec![op],
                &[change],
                &[key.to_vec()],
            )? {
                Attempt::Applied(_) => {
                    let revision = w.frame.as_ref().map_or(0, |f| f.revs.0);
                    return Ok(Updated { old, new, revision });
                }
                Attempt::Refused(mut now) => seen = now.pop().flatten().as_ref().map(Seen::from),
            }
        }
        Err(busy())
    }

    /// The commitment recomputed from every committed key at `revision`, and how many keys
    /// it hashed.
    fn commitment_at(&self, revision: i64) -> Result<(Commitment, u64), StoreError> {
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
    fn scan_state(&self) -> Result<(Frame, Commitment, u64), StoreError> {
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
fn resume_after(resp: &GetResponse) -> Option<Vec<u8>> {
    match resp.kvs().last() {
        Some(last) if resp.more() => {
            let mut from = last.key().to_vec();
            from.push(0);
            Some(from)
        }
        _ => None,
    }
}

/// The compare that `key` is still as `seen` (absent for `None`), and its value then.
fn guard(key: &[u8], seen: Option<&Seen>) -> (Compare, Option<Vec<u8>>) {
    match seen {
        None => (
            Compare::create_revision(key.to_vec(), CompareOp::Equal, 0),
            None,
        ),
        Some(s) => (
            Compare::mod_revision(key.to_vec(), CompareOp::Equal, s.revision),
            Some(s.value.clone()),
        ),
    }
}

/// The error when other writers keep moving the frame.
fn busy() -> StoreError {
    StoreError::Etcd("other writers kept moving the store's epoch; retry".into())
}

/// Whether etcd refused a read at a revision it has compacted away.
fn is_compacted(e: &StoreError) -> bool {
    matches!(e, StoreError::Etcd(m) if m.contains("compacted"))
}

/// `digits` ASCII digits exactly, as a number.
fn decimal(d: &[u8], digits: usize) -> Option<u64> {
    if d.len() != digits || !d.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(d).ok()?.parse().ok()
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `fut` on `handle` and waits for it on this thread, at most until `deadline`.
fn run<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    deadline: Instant,
    fut: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
) -> Result<T, StoreError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(tokio::time::timeout(left, fut).await);
    });
    // The task answers by the deadline; the margin covers a runtime too busy to wake it.
    match rx.recv_timeout(left + Duration::from_millis(250)) {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(classify(e)),
        Ok(Err(_)) | Err(_) => Err(StoreError::Unreachable(format!(
            "no answer within {} ms",
            left.as_millis()
        ))),
    }
}

/// Transport failures and etcd's "not now" answers are [`StoreError::Unreachable`]; the
/// rest (quota, request size, bad arguments) [`StoreError::Etcd`].
fn classify(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    use tonic::Code;
    match e {
        E::TransportError(_) | E::IoError(_) => {
            StoreError::Unreachable(crate::explain::tidy(&crate::explain::chain_text(&e)))
        }
        E::GRpcStatus(ref s)
            if matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
            ) =>
        {
            StoreError::Unreachable(e.to_string())
        }
        other => StoreError::Etcd(other.to_string()),
    }
}

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
                let limit = super::MAX_PRUNE_PER_COMMIT as i64 + 1;
                let resp = self.range(deadline, start, end, limit, None)?;
                for kv in resp.kvs() {
                    if pruned.len() == super::MAX_PRUNE_PER_COMMIT {
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
    ) -> Result<super::migrate::ExportPage, StoreError> {
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
        Ok(super::migrate::ExportPage { pairs, next })
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

/// Locks under etcd leases, and writes fenced by them (see [`lease`](super::lease)).
impl EtcdStore {
    /// The etcd key of the lock `name`.
    fn lock_key(&self, name: &str) -> Vec<u8> {
        let mut k = self.locks.clone();
        k.extend_from_slice(name.as_bytes());
        k
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1; etcd may raise it to its
    /// minimum) and creates the lock key under it if the key is absent, in one
    /// transaction; the key's create revision is the fence. A lease left unused is revoked.
    fn lock_take(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Result<Lock, LockHeld>, StoreError> {
        let deadline = self.deadline();
        let key = self.lock_key(name);
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut lease = self.lease.clone();
        let granted = self.call(deadline, async move { lease.grant(secs, None).await })?;
        let id = granted.id();
        let granted_ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(1).max(1));
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                holder.as_bytes().to_vec(),
                Some(PutOptions::new().with_lease(id)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let mut kv = self.kv.clone();
        let resp = match self.call(deadline, async move { kv.txn(txn).await }) {
            Ok(r) => r,
            Err(e) => {
                // An unknown outcome: the revocation removes the key if it was made.
                self.revoke(id);
                return Err(e);
            }
        };
        let revision = resp.header().map_or(0, |h| h.revision());
        self.saw(Some(revision));
        if resp.succeeded() {
            return Ok(Ok(Lock {
                name: name.to_owned(),
                fence: revision,
                lease: id,
                ttl: granted_ttl,
            }));
        }
        self.revoke(id);
        let holder = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(mut g) => g.take_kvs().into_iter().next(),
                _ => None,
            })
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            .unwrap_or_else(|| "another process (it has just let go)".into());
        Ok(Err(LockHeld { holder }))
    }

    /// One keep-alive of the lock's lease: `false` when etcd no longer knows the lease.
    fn lock_renew(&self, lock: &Lock) -> Result<bool, StoreError> {
        let mut lease = self.lease.clone();
        let id = lock.lease;
        self.call(self.deadline(), async move {
            match lease.keep_alive(id).await {
                Ok(_) => Ok(true),
                Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    /// Revokes the lock's lease, which removes the lock key.
    fn lock_release(&self, lock: &Lock) -> Result<(), StoreError> {
        let mut lease = self.lease.clone();
        let id = lock.lease;
        match self.call(self.deadline(), async move { lease.revoke(id).await }) {
            Ok(_) | Err(StoreError::Etcd(_)) => Ok(()), // already gone
            Err(e) => Err(e),
        }
    }

    /// Revokes a lease, best effort (it expires by itself otherwise).
    fn revoke(&self, id: i64) {
        let mut lease = self.lease.clone();
        if let Err(e) = self.call(self.deadline(), async move { lease.revoke(id).await }) {
            tracing::debug!(error = %e, "cannot revoke an unused lock lease; it will expire");
        }
    }

    /// [`update`](Self::update) while `lock` holds: the transaction also compares the lock
    /// key's create revision with the lock's fence, and a refusal that shows another (or no)
    /// holder is [`Fenced`], with nothing written.
    fn update_fenced(
        &self,
        w: &mut Writer,
        lock: &Lock,
        key: &[u8],
        f: impl Fn(Option<&[u8]>) -> Option<Vec<u8>>,
    ) -> Result<Result<Updated, Fenced>, StoreError> {
        let deadline = self.deadline();
        let lock_key = self.lock_key(&lock.name);
        let mut seen: Option<Seen> = None;
        for _ in 0..EPOCH_RETRIES {
            let base = self.current_frame(deadline, w)?;
            let (compare, old) = guard(key, seen.as_ref());
            let fence = Compare::create_revision(lock_key.clone(), CompareOp::Equal, lock.fence);
            let new = f(old.as_deref());
            let op = match &new {
                Some(v) => TxnOp::put(key.to_vec(), v.clone(), None),
                None => TxnOp::delete(key.to_vec(), None),
            };
            let change = Change {
                key: key.to_vec(),
                old: old.clone(),
                new: new.clone(),
            };
            match self.attempt(
                deadline,
                w,
                base,
                vec![compare, fence],
                vec![op],
                &[change],
                &[key.to_vec(), lock_key.clone()],
            )? {
                Attempt::Applied(_) => {
                    let revision = w.frame.as_ref().map_or(0, |f| f.revs.0);
                    return Ok(Ok(Updated { old, new, revision }));
                }
                Attempt::Refused(mut now) => {
                    let holder = now.pop().flatten().map_or(0, |kv| kv.create_revision());
                    if holder != lock.fence {
                        return Ok(Err(Fenced {
                            fence: lock.fence,
                            now: holder,
                        }));
                    }
                    seen = now.pop().flatten().as_ref().map(Seen::from);
                }
            }
        }
        Err(busy())
    }
}

/// What a watch on the heads watches, so that it can be opened again on another member.
struct WatchTarget {
    client: WatchClient,
    key: Vec<u8>,
    end: Vec<u8>,
    /// How long the watch may take to open again after its member failed.
    timeout: Duration,
}

impl WatchTarget {
    /// Opens the watch from revision `from` (0: from now) and reads etcd's first answer to
    /// it (created, compacted or refused).
    fn open(
        &self,
        from: i64,
    ) -> impl Future<Output = Result<(WatchStream, WatchResponse), etcd_client::Error>> + Send + 'static
    {
        let mut client = self.client.clone();
        let key = self.key.clone();
        let mut options = WatchOptions::new()
            .with_range(self.end.clone())
            .with_prev_key();
        if from > 0 {
            options = options.with_start_revision(from);
        }
        async move {
            let mut stream = client.watch(key, Some(options)).await?;
            match stream.message().await? {
                Some(first) => Ok((stream, first)),
                None => Err(etcd_client::Error::WatchError(
                    "etcd ended the watch as it opened".into(),
                )),
            }
        }
    }
}

/// The compare that the head of `key` is `expected` (absent for `None`).
/// Sends the events of an etcd watch on the heads, as changes, until the feed's reader goes
/// away. When the watch's member fails (the stream breaks or ends, or it lost its leader),
/// the watch opens again on another member from the revision after `last` (the last one
/// delivered), so the reader misses nothing; an error ends the feed when no member takes
/// it within the store's timeout, on compaction, or on any other error. Waits while the
/// feed is full: gRPC flow control then holds etcd's stream.
async fn forward_watch(
    target: WatchTarget,
    mut stream: WatchStream,
    mut last: u64,
    tx: tokio::sync::mpsc::Sender<Result<ChangeEvent, FeedError>>,
) {
    let mut pending: Option<WatchResponse> = None;
    loop {
        let message = match pending.take() {
            Some(r) => Ok(Some(r)),
            None => tokio::select! {
                m = stream.message() => m,
                () = tx.closed() => return,
            },
        };
        let broke = match message {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(StoreError::Unreachable("etcd ended the watch".into())),
            Err(e) => Err(classify(e)),
        };
        let response = match broke {
            Ok(r) => r,
            Err(StoreError::Unreachable(why)) => {
                match reopen_watch(&target, last, &why, &tx).await {
                    Some((s, first)) => {
                        stream = s;
                        pending = Some(first);
                        continue;
                    }
                    None => return,
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        if response.compact_revision() > 0 {
            let oldest = u64::try_from(response.compact_revision()).unwrap_or(0);
            let _ = tx
                .send(Err(FeedError::Compacted {
                    after: last,
                    oldest,
                }))
                .await;
            return;
        }
        if response.canceled() {
            let reason = format!("etcd cancelled the watch: {}", response.cancel_reason());
            let _ = tx.send(Err(StoreError::Etcd(reason).into())).await;
            return;
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let change = if kv.key().get(prefix_len(&target) - 2) == Some(&b'e') {
                notice_change(kv, event.event_type(), event.prev_kv(), prefix_len(&target))
            } else {
                head_change(kv, event.event_type(), event.prev_kv(), prefix_len(&target))
            };
            match change {
                Ok(Some(c)) => {
                    last = c.revision;
                    if tx.send(Ok(c)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
    }
}

/// The length of the kind's prefix (`P e/` or `P h/`, the same), which an event's key
/// starts with.
fn prefix_len(target: &WatchTarget) -> usize {
    target.key.len()
}

/// The expiring-soon event of a notice's creation; `None` for its removal or rewrite (the
/// job never rewrites one) and for a key that names no notice.
fn notice_change(
    kv: &KeyValue,
    kind: EventType,
    prev: Option<&KeyValue>,
    prefix_len: usize,
) -> Result<Option<ChangeEvent>, StoreError> {
    if kind != EventType::Put || prev.is_some() {
        return Ok(None);
    }
    let parsed = kv
        .key()
        .get(prefix_len..)
        .and_then(|k| std::str::from_utf8(k).ok())
        .and_then(|k| super::parse_notice_key(k, crate::secret::MAX_NAME_BYTES_CEILING));
    let Some((name, version)) = parsed else {
        tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "a notice's key names no version; no event");
        return Ok(None);
    };
    Ok(Some(ChangeEvent {
        revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
        name,
        version,
        kind: ChangeKind::ExpiringSoon,
    }))
}

/// Opens a watch that broke (`why`) again from the revision after `last`, on whichever
/// member takes it within the target's timeout; `None` (the feed told why) if none did or
/// the reader went away.
async fn reopen_watch(
    target: &WatchTarget,
    last: u64,
    why: &str,
    tx: &tokio::sync::mpsc::Sender<Result<ChangeEvent, FeedError>>,
) -> Option<(WatchStream, WatchResponse)> {
    let from = i64::try_from(last).ok().and_then(|l| l.checked_add(1));
    let Some(from) = from else {
        let _ = tx
            .send(Err(StoreError::Unreachable(why.to_owned()).into()))
            .await;
        return None;
    };
    tracing::info!(from, error = %why, "the etcd watch broke; opening it again on another member");
    let deadline = tokio::time::Instant::now() + target.timeout;
    let mut failure = why.to_owned();
    loop {
        if tx.is_closed() {
            return None;
        }
        match tokio::time::timeout_at(deadline, target.open(from)).await {
            Ok(Ok(opened)) => return Some(opened),
            Ok(Err(e)) => match classify(e) {
                StoreError::Unreachable(w) => failure = w,
                other => {
                    let _ = tx.send(Err(other.into())).await;
                    return None;
                }
            },
            Err(_) => {}
        }
        if tokio::time::Instant::now() + WATCH_RETRY_PAUSE >= deadline {
            let _ = tx
                .send(Err(StoreError::Unreachable(format!(
                    "the watch broke and no etcd member took it again: {failure}"
                ))
                .into()))
                .await;
            return None;
        }
        tokio::time::sleep(WATCH_RETRY_PAUSE).await;
    }
}

/// The change a watch event on a head describes; `None` for a key that names no secret.
fn head_change(
    kv: &KeyValue,
    kind: EventType,
    prev: Option<&KeyValue>,
    prefix_len: usize,
) -> Result<Option<ChangeEvent>, StoreError> {
    let Some(text) = kv
        .key()
        .get(prefix_len..)
        .and_then(|k| std::str::from_utf8(k).ok())
    else {
        return Ok(None);
    };
    let Ok(name) = SecretName::parse(text, crate::secret::MAX_NAME_BYTES_CEILING) else {
        tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "a head's key names no secret; no event");
        return Ok(None);
    };
    let old = prev.map(|p| decode_head(p.key(), p.value())).transpose()?;
    let (kind, version) = match kind {
        EventType::Put => {
            let new = decode_head(kv.key(), kv.value())?;
            (ChangeKind::of(old, new), new.latest)
        }
        // The service never removes a head; someone did: the name is gone.
        EventType::Delete => (ChangeKind::Deleted, old.map_or(0, |h| h.latest)),
    };
    Ok(Some(ChangeEvent {
        revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
        name,
        version,
        kind,
    }))
}

/// The compare that the head of `key` is `expected` (absent for `None`).
fn head_is(key: &[u8], expected: Option<Head>) -> Compare {
    match expected {
        None => Compare::create_revision(key.to_vec(), CompareOp::Equal, 0),
        Some(h) => Compare::value(key.to_vec(), CompareOp::Equal, encode_head(&h)),
    }
}

fn encode_head(h: &Head) -> Vec<u8> {
    HeadV1::from(*h).encode_to_vec()
}

fn aux_tag(ns: Aux) -> u8 {
    match ns {
        Aux::Policy => b'p',
        Aux::Approval => b'a',
        Aux::Meta => b'm',
        Aux::Notice => b'e',
    }
}

fn decode_epoch(v: &[u8]) -> u64 {
    <[u8; 8]>::try_from(v).map_or(0, u64::from_be_bytes)
}

fn decode_head(key: &[u8], v: &[u8]) -> Result<Head, StoreError> {
    let h = HeadV1::decode(v).map_err(|e| corrupt(key, e))?;
    Ok(Head::from(h))
}

fn decode_record(key: &[u8], v: &[u8]) -> Result<SealedRecord, StoreError> {
    SealedRecord::decode(v).map_err(|e| corrupt(key, e))
}

fn corrupt(key: &[u8], e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    }
}
