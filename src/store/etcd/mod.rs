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
//! [`Store::sync`](super::Store::sync) has nothing to do.
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
//! could not be made). A probe of each member every half second keeps [`Store::available`](super::Store::available)
//! current (false only when no member answers), so health follows etcd without traffic.
//!
//! The code: this file holds the options, the type, opening and the bounded call; [`keys`]
//! the key layout and encodings, [`scan`] the reads (bounded scans), [`txn`] the framed
//! transactions (compare-and-set), [`lease`] locks and fenced writes, [`watch`] the change
//! feed, and [`store_impl`] the [`Store`](super::Store) trait in terms of them.

mod keys;
mod lease;
mod scan;
mod store_impl;
mod txn;
mod watch;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, ConnectOptions, Identity, KvClient, LeaseClient, MaintenanceClient,
    TlsOptions, WatchClient,
};

use super::commitment::STORE_ID;
use super::etcd_endpoints::Members;
// `replace_records` (store_impl.rs) names the batch check as `super::check_replace_batch`.
use super::check_replace_batch;
use super::{Aux, StateKey, StoreError, lock_namespace};

use scan::{KEY_PAGE, SCAN_PAGE};
use txn::Writer;

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

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Runs one etcd call on the client's runtime, bounded by `deadline`; keeps
    /// [`Store::available`](super::Store::available) current.
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

    fn saw(&self, revision: Option<i64>) {
        if let Some(r) = revision {
            self.revision.fetch_max(r, Ordering::Relaxed);
        }
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
