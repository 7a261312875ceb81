//! The etcd backend: the same records as the sled store, kept in an etcd v3 cluster reached
//! over mutual TLS, so several service processes can share one store.
//!
//! Key layout, every key under `store.prefix` (`P`, default `strongroom/`):
//!
//! | key | value |
//! | --- | --- |
//! | `P h/` name | [`HeadV1`](crate::proto::HeadV1): latest version, deleted flag |
//! | `P r/` name `\0` version (20 decimal digits) | [`SealedRecordV1`](crate::proto::SealedRecordV1) |
//! | `P w/` master key version (10 decimal digits) | wrap count, 8 bytes big-endian |
//! | `P p/` key, `P a/` key, `P m/` key | policies, approvals, bookkeeping (as officers wrote them) |
//! | `P m/store-id` | the store's random identity (hex) |
//! | `P m/epoch` | the write counter, 8 bytes big-endian |
//!
//! Names never contain `\0`, so a name's records are exactly the keys under `P r/` name `\0`,
//! and heads sort by name as in sled. etcd sees names, ciphertext and wrapped keys, never a
//! value.
//!
//! Every change is one etcd transaction that also bumps the epoch: it compares the epoch's
//! mod revision with the one this process last saw and the head with the one the caller read
//! (a value compare: a head's `(latest, deleted)` never repeats), so check-and-set holds
//! across processes. A refused transaction returns the current epoch and head in the same
//! round trip: a stale epoch (another writer) is retried, a changed head is a version
//! conflict. Further state maintained with each change (e.g. a commitment) belongs in the
//! same transaction. A put is acknowledged by etcd only after a quorum committed it to its
//! log, so [`Store::sync`] has nothing to do.
//!
//! etcd-client is async and the trait is blocking: the client runs on this store's own
//! one-thread runtime, and every call waits for at most `store.etcd_timeout_ms`, after which
//! it fails with [`StoreError::Unreachable`] (UNAVAILABLE to clients). A probe every half
//! second keeps [`Store::available`] current, so health follows etcd without traffic.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions,
    GetResponse, Identity, KeyValue, KvClient, MaintenanceClient, TlsOptions, Txn, TxnOp,
    TxnOpResponse, TxnResponse,
};
use prost::Message;

use super::{Aux, Head, NameRange, Page, Store, StoreError, VersionConflict};
use crate::proto::HeadV1;
use crate::secret::{SealedRecord, SecretName};

const STORE_ID: &str = "store-id";
const EPOCH: &str = "epoch";
/// How often the availability probe asks etcd.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Keys per range call when scanning heads or officers' records.
const SCAN_PAGE: i64 = 256;
/// Heads per range call when counting them (a head is a name and a few bytes).
const COUNT_PAGE: i64 = 4096;
/// How many times a write retries when other writers keep moving the epoch.
const EPOCH_RETRIES: usize = 64;
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
    prefix: Vec<u8>,
    timeout: Duration,
    store_id: String,
    /// The epoch's value and mod revision as this process last saw them; `None` after an
    /// unknown outcome. Held across a write, so this process's writers take turns (other
    /// processes are fenced by the compare on the epoch's mod revision).
    epoch: Mutex<Option<(u64, i64)>>,
    /// Serialises this process's wrap counting (a read-modify-write).
    wraps: Mutex<()>,
    examined: AtomicU64,
    available: Arc<AtomicBool>,
    /// The highest etcd revision this process has seen.
    revision: Arc<AtomicI64>,
    /// Records per range call, so a response stays below [`MAX_RESPONSE_BYTES`].
    records_per_range: i64,
    endpoints: String,
}

/// A write transaction's outcome.
enum Written {
    /// Applied; the responses of the caller's operations.
    Applied(Vec<TxnOpResponse>),
    /// A caller's compare failed; the head (if one was asked for) as it is now.
    Refused(Option<Head>),
}

impl EtcdStore {
    /// Connects to etcd and reads (or creates) the store's identity; fails with a message
    /// naming the endpoints when etcd cannot be reached within the deadline.
    pub fn open(options: EtcdOptions) -> Result<Self, StoreError> {
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
        let connect = ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(options.timeout)
            .with_keep_alive(Duration::from_secs(2), options.timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from its leader answers at once instead of waiting.
            .with_require_leader(true);
        let urls = options.endpoints.clone();
        let deadline = Instant::now() + options.timeout;
        let client = run(&handle, deadline, async move {
            Client::connect(urls, Some(connect)).await
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
        let mut store = Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            maintenance: client.maintenance_client(),
            runtime: Some(runtime),
            handle,
            prefix: options.prefix.into_bytes(),
            timeout: options.timeout,
            store_id: String::new(),
            epoch: Mutex::new(None),
            wraps: Mutex::new(()),
            examined: AtomicU64::new(0),
            available: Arc::new(AtomicBool::new(true)),
            revision: Arc::new(AtomicI64::new(0)),
            records_per_range,
            endpoints: endpoints.clone(),
        };
        store.store_id = store
            .init_store_id()
            .map_err(|e| fail(format!("{e}; check store.endpoints and that etcd is running, and its TLS (store.ca, store.cert, store.key)")))?;
        store.spawn_probe();
        Ok(store)
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

    fn aux_key(&self, ns: Aux, key: &str) -> Vec<u8> {
        self.key(aux_tag(ns), key.as_bytes())
    }

    fn epoch_key(&self) -> Vec<u8> {
        self.aux_key(Aux::Meta, EPOCH)
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
            Err(StoreError::Unreachable(e)) => {
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

    /// One range call: keys in `[start, end)`, at most `limit`.
    fn range(
        &self,
        deadline: Instant,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: i64,
    ) -> Result<GetResponse, StoreError> {
        let mut kv = self.kv.clone();
        let options = GetOptions::new().with_range(end).with_limit(limit.max(1));
        let resp = self.call(deadline, async move { kv.get(start, Some(options)).await })?;
        self.saw(resp.header().map(|h| h.revision()));
        Ok(resp)
    }

    /// Every key-value in `[start, end)`, read `page` keys per call.
    fn scan(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        page: i64,
        mut each: impl FnMut(&KeyValue) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut from = start;
        loop {
            let resp = self.range(self.deadline(), from.clone(), end.clone(), page)?;
            for kv in resp.kvs() {
                each(kv)?;
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(()),
            }
        }
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

    fn init_store_id(&self) -> Result<String, StoreError> {
        use ring::rand::SecureRandom;
        let mut id = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| StoreError::Corrupt {
                key: STORE_ID.into(),
                reason: "the system random generator failed".into(),
            })?;
        let id = hex::encode(id);
        let key = self.aux_key(Aux::Meta, STORE_ID);
        // Created once, by whichever process gets there first.
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), id.clone(), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut kv = self.kv.clone();
        let resp = self.call(self.deadline(), async move { kv.txn(txn).await })?;
        if resp.succeeded() {
            return Ok(id);
        }
        match resp.op_responses().into_iter().next() {
            Some(TxnOpResponse::Get(g)) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                .ok_or_else(|| corrupt(&key, "the store id vanished while it was read")),
            _ => Err(corrupt(&key, "etcd answered the wrong operation")),
        }
    }

    /// Answers [`Store::available`] from a cheap linearizable read every half second, so
    /// health turns NOT_SERVING while etcd is away and SERVING when it is back, with no
    /// request needed.
    fn spawn_probe(&self) {
        let kv = self.kv.clone();
        let key = self.aux_key(Aux::Meta, STORE_ID);
        let available = self.available.clone();
        let revision = self.revision.clone();
        let timeout = self.timeout;
        let endpoints = self.endpoints.clone();
        self.handle.spawn(async move {
            let mut tick = tokio::time::interval(PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let mut kv = kv.clone();
                let options = GetOptions::new().with_count_only();
                let answer =
                    tokio::time::timeout(timeout, kv.get(key.clone(), Some(options))).await;
                let up = match answer {
                    Ok(Ok(resp)) => {
                        if let Some(h) = resp.header() {
                            revision.fetch_max(h.revision(), Ordering::Relaxed);
                        }
                        true
                    }
                    _ => false,
                };
                let was = available.swap(up, Ordering::Relaxed);
                if was != up {
                    if up {
                        tracing::info!(%endpoints, "etcd is reachable again");
                    } else {
                        tracing::warn!(%endpoints, "etcd is unreachable");
                    }
                }
            }
        });
    }

    /// Applies `ops` if `compares` hold, bumping the epoch in the same transaction. With
    /// `head`, a refusal reports that head as it is now.
    fn write(
        &self,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
        head: Option<&[u8]>,
    ) -> Result<Written, StoreError> {
        let deadline = self.deadline();
        let epoch_key = self.epoch_key();
        let mut cache = self.epoch.lock().map_err(|_| StoreError::Poisoned)?;
        for _ in 0..EPOCH_RETRIES {
            let (value, rev) = match *cache {
                Some(c) => c,
                None => match self.fetch(deadline, epoch_key.clone())? {
                    Some(kv) => (decode_epoch(kv.value()), kv.mod_revision()),
                    None => (0, 0),
                },
            };
            let mut when = compares.clone();
            when.push(Compare::mod_revision(
                epoch_key.clone(),
                CompareOp::Equal,
                rev,
            ));
            let mut then = ops.clone();
            then.push(TxnOp::put(
                epoch_key.clone(),
                (value + 1).to_be_bytes().to_vec(),
                None,
            ));
            let mut otherwise = vec![TxnOp::get(epoch_key.clone(), None)];
            if let Some(h) = head {
                otherwise.push(TxnOp::get(h.to_vec(), None));
            }
            let txn = Txn::new().when(when).and_then(then).or_else(otherwise);
            let mut kv = self.kv.clone();
            // An unknown outcome (deadline, lost connection) leaves the epoch unknown too.
            *cache = None;
            let resp: TxnResponse = self.call(deadline, async move { kv.txn(txn).await })?;
            let revision = resp.header().map(|h| h.revision());
            self.saw(revision);
            let mut responses = resp.op_responses();
            if resp.succeeded() {
                *cache = revision.map(|r| (value + 1, r));
                responses.pop();
                return Ok(Written::Applied(responses));
            }
            let mut responses = responses.into_iter();
            let now = match responses.next() {
                Some(TxnOpResponse::Get(g)) => g
                    .kvs()
                    .first()
                    .map_or((0, 0), |kv| (decode_epoch(kv.value()), kv.mod_revision())),
                _ => return Err(corrupt(&epoch_key, "etcd answered the wrong operation")),
            };
            *cache = Some(now);
            if now.1 == rev {
                // The epoch was as expected: the caller's compare failed.
                let current = match responses.next() {
                    Some(TxnOpResponse::Get(g)) => g
                        .kvs()
                        .first()
                        .map(|kv| decode_head(kv.key(), kv.value()))
                        .transpose()?,
                    _ => None,
                };
                return Ok(Written::Refused(current));
            }
            // Another process wrote in between: try again against the epoch it left.
        }
        Err(StoreError::Etcd(
            "other writers kept moving the store's epoch; retry".into(),
        ))
    }
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
        E::TransportError(_) | E::IoError(_) => StoreError::Unreachable(e.to_string()),
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
        let head_key = self.head_key(&name);
        let head = HeadV1 {
            latest_version: record.version,
            deleted: false,
        };
        let ops = vec![
            TxnOp::put(head_key.clone(), head.encode_to_vec(), None),
            TxnOp::put(
                self.record_key(&name, record.version),
                record.encode_to_vec(),
                None,
            ),
        ];
        match self.write(vec![head_is(&head_key, expected)], ops, Some(&head_key))? {
            Written::Applied(_) => Ok(Ok(())),
            Written::Refused(current) => Ok(Err(VersionConflict {
                actual: current.map_or(0, |h| h.live()),
            })),
        }
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
                let resp = self.range(deadline, start.clone(), end.clone(), want)?;
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
        let mut head = self.read_head(self.deadline(), name)?;
        for _ in 0..EPOCH_RETRIES {
            let Some(h) = head else {
                return Ok(0);
            };
            let tomb = HeadV1 {
                latest_version: h.latest,
                deleted: true,
            };
            let ops = vec![
                TxnOp::delete(
                    self.record_prefix(name),
                    Some(DeleteOptions::new().with_prefix()),
                ),
                TxnOp::put(head_key.clone(), tomb.encode_to_vec(), None),
            ];
            match self.write(vec![head_is(&head_key, Some(h))], ops, Some(&head_key))? {
                Written::Applied(responses) => {
                    return Ok(match responses.first() {
                        Some(TxnOpResponse::Delete(d)) => u64::try_from(d.deleted()).unwrap_or(0),
                        _ => 0,
                    });
                }
                // Another process wrote the name in between: delete what is there now.
                Written::Refused(current) => head = current,
            }
        }
        Err(StoreError::Etcd(
            "other writers kept changing this name while it was deleted; retry".into(),
        ))
    }

    fn count_wraps(&self, mk: u32, n: u64) -> Result<u64, StoreError> {
        let key = self.key(b'w', format!("{mk:010}").as_bytes());
        let _turn = self.wraps.lock().map_err(|_| StoreError::Poisoned)?;
        let deadline = self.deadline();
        for _ in 0..EPOCH_RETRIES {
            let (old, rev) = self
                .fetch(deadline, key.clone())?
                .map_or((0, 0), |kv| (decode_epoch(kv.value()), kv.mod_revision()));
            let total = old.saturating_add(n);
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                .and_then([TxnOp::put(key.clone(), total.to_be_bytes().to_vec(), None)]);
            let mut kv = self.kv.clone();
            if self
                .call(deadline, async move { kv.txn(txn).await })?
                .succeeded()
            {
                return Ok(total);
            }
        }
        Err(StoreError::Etcd(
            "other processes kept counting wraps at the same time; retry".into(),
        ))
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
        let ops = vec![TxnOp::put(self.aux_key(ns, key), value.to_vec(), None)];
        match self.write(Vec::new(), ops, None)? {
            Written::Applied(_) => Ok(()),
            Written::Refused(_) => Err(StoreError::Etcd(
                "etcd refused an unconditional write".into(),
            )),
        }
    }

    fn aux_delete(&self, ns: Aux, key: &str) -> Result<bool, StoreError> {
        let ops = vec![TxnOp::delete(self.aux_key(ns, key), None)];
        match self.write(Vec::new(), ops, None)? {
            Written::Applied(responses) => Ok(matches!(
                responses.first(),
                Some(TxnOpResponse::Delete(d)) if d.deleted() > 0
            )),
            Written::Refused(_) => Err(StoreError::Etcd(
                "etcd refused an unconditional write".into(),
            )),
        }
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
        let epoch = self
            .fetch(self.deadline(), self.epoch_key())?
            .map_or(0, |kv| decode_epoch(kv.value()));
        Ok((self.store_id.clone(), epoch))
    }

    fn state(&self) -> Result<super::StoreState, StoreError> {
        Err(StoreError::Etcd("no state commitment on etcd yet".into()))
    }

    fn verify_state(&self) -> Result<super::StateCheck, StoreError> {
        Err(StoreError::Etcd("no state commitment on etcd yet".into()))
    }

    fn rebase_state(&self) -> Result<super::StoreState, StoreError> {
        Err(StoreError::Etcd("no state commitment on etcd yet".into()))
    }

    /// etcd acknowledges a write only once a quorum has it in its log: nothing to flush.
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn reads_are_local(&self) -> bool {
        false
    }

    fn available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }
}

/// The compare that the head of `key` is `expected` (absent for `None`).
fn head_is(key: &[u8], expected: Option<Head>) -> Compare {
    match expected {
        None => Compare::create_revision(key.to_vec(), CompareOp::Equal, 0),
        Some(h) => Compare::value(
            key.to_vec(),
            CompareOp::Equal,
            HeadV1 {
                latest_version: h.latest,
                deleted: h.deleted,
            }
            .encode_to_vec(),
        ),
    }
}

fn aux_tag(ns: Aux) -> u8 {
    match ns {
        Aux::Policy => b'p',
        Aux::Approval => b'a',
        Aux::Meta => b'm',
    }
}

fn decode_epoch(v: &[u8]) -> u64 {
    <[u8; 8]>::try_from(v).map_or(0, u64::from_be_bytes)
}

fn decode_head(key: &[u8], v: &[u8]) -> Result<Head, StoreError> {
    let h = HeadV1::decode(v).map_err(|e| corrupt(key, e))?;
    Ok(Head {
        latest: h.latest_version,
        deleted: h.deleted,
    })
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
