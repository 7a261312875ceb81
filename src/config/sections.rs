//! The sections' types (`[server]`, `[hsm]`, `[store]`, `[admin]`, `[audit]`, `[limits]`,
//! `[jobs]`) with their defaults and bounds.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::hsm::KeyCopy;

use super::ConnectionLimits;

/// `[jobs]`: jobs that must run on one replica at a time run under a lock with a lease
/// (etcd's, shared by the replicas; this process's on sled) and a fencing token.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Seconds a lock (a job's, and the replica id's) outlives its holder's last renewal:
    /// how long a replica that died keeps its id and its jobs from the others.
    pub lease_ttl_secs: u64,
    /// How often (milliseconds) a holder renews its leases; well below the time to live.
    pub renew_interval_ms: u64,
    /// Seconds between the officer-visible state reports (`m/state-report` in the store),
    /// written by whichever replica holds the `state-report` job lock. 0: no reports.
    pub state_report_interval_secs: u64,
    /// Seconds between the `expiry-notice` job's sweeps, which record one notice (a
    /// WatchSecrets EXPIRING_SOON event) per latest version that entered the window.
    /// 0: no notices.
    pub expiry_notice_interval_secs: u64,
    /// The expiry-notice window: a latest version expiring within this many seconds gets
    /// its notice.
    pub expiry_notice_window_secs: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            lease_ttl_secs: 10,
            renew_interval_ms: 3000,
            state_report_interval_secs: 60,
            expiry_notice_interval_secs: 300,
            expiry_notice_window_secs: 7 * 86_400,
        }
    }
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the client listener (`STRONGROOM_LISTEN`); port 0 picks a free port.
    pub listen: SocketAddr,
    /// Server certificate chain, PEM.
    pub cert: PathBuf,
    /// Server private key, PEM.
    pub key: PathBuf,
    /// CA that client certificates must chain to, PEM.
    pub client_ca: PathBuf,
    /// On SIGTERM, how long in-flight requests may take to finish, in milliseconds.
    #[serde(default = "default_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Certificate revocation lists (PEM) of the client CA: a revoked client certificate is
    /// refused during the handshake. With any CRL named, a client certificate whose issuer
    /// has no CRL here is refused too.
    #[serde(default)]
    pub client_crls: Vec<PathBuf>,
    /// How often (milliseconds) the TLS files of both listeners (certificate, key, CA, CRLs)
    /// are checked for changes; a change takes effect for new connections without a
    /// restart. A file that no longer loads is logged and the previous settings stay.
    #[serde(default = "default_tls_reload_ms")]
    pub tls_reload_ms: u64,
    /// Caps and deadlines of the client listener's connections (`[server.connections]`).
    #[serde(default)]
    pub connections: ConnectionLimits,
    /// DEVELOPMENT ONLY: start even when the PIN file or a private key is readable or
    /// writable by group or others, with a warning instead of a refusal.
    #[serde(default)]
    pub dangerous_allow_loose_file_modes: bool,
    /// This replica's name when several processes share one store and token
    /// (`STRONGROOM_REPLICA_ID`): its token objects (audit and store checkpoints) are its
    /// own, and only one live process may hold it. Empty (the default): a single node,
    /// with the token labels of a single node.
    #[serde(default)]
    pub replica_id: String,
}

/// `[hsm]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// PKCS#11 module path (`STRONGROOM_PKCS11_MODULE`).
    pub module: PathBuf,
    /// Token label, `serial:<serial>` or an RFC 7512 URI (`STRONGROOM_TOKEN`).
    pub token: String,
    /// File holding the user PIN (`STRONGROOM_USER_PIN_FILE`); else `STRONGROOM_USER_PIN`.
    pub pin_file: Option<PathBuf>,
    /// Under systemd: the name of the credential (`LoadCredential=NAME:/path`) holding the
    /// user PIN, read from `$CREDENTIALS_DIRECTORY/NAME`. Instead of `pin_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_credential: Option<String>,
    /// HSM worker threads, one session each (1 is fastest on SoftHSM2).
    #[serde(default = "one")]
    pub workers: usize,
    /// Requests that may queue for a worker.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// Master key object used for operations: `session` copy (faster) or `token` object.
    #[serde(default)]
    pub key_copy: KeyCopy,
    /// Deadline for an HSM call when the request carries none, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Data-key wraps allowed per master key version before writes are refused until a
    /// rotation (AES-GCM with random 96-bit IVs must stay well below 2^32).
    #[serde(default = "default_max_wraps")]
    pub max_wraps_per_key: u64,
}

/// `[admin]`: the officers' plane, on its own address with its own CA.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener (`STRONGROOM_ADMIN_LISTEN`): loopback by default, never
    /// the client address.
    pub listen: SocketAddr,
    /// Certificate the admin listener presents, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The admin CA officers' certificates chain to; must not be the client CA.
    pub ca: PathBuf,
    /// Officer identities (URI or DNS SAN of their certificates) allowed on the admin plane.
    pub officers: Vec<String>,
    /// Distinct officers (the requester included) that must approve a guarded operation.
    #[serde(default = "two")]
    pub quorum: u32,
    /// How long a pending approval waits, in seconds; past it, it can no longer be approved
    /// and the purge removes it.
    #[serde(default = "default_approval_ttl")]
    pub approval_ttl_secs: u64,
    /// How long executed, failed and rejected approvals are kept after they finished, in
    /// seconds, before the purge removes them.
    #[serde(default = "default_approval_retention")]
    pub approval_retention_secs: u64,
    /// How often the purge of expired and retained approvals runs, in seconds (at least 1).
    #[serde(default = "default_approval_purge_interval")]
    pub approval_purge_interval_secs: u64,
    /// DEVELOPMENT ONLY: guarded operations run on one officer's word. Shown in status,
    /// health and the log.
    #[serde(default)]
    pub dangerous_single_officer: bool,
    /// Certificate revocation lists (PEM) of the admin CA; see `server.client_crls`.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// Caps and deadlines of the admin listener's connections (`[admin.connections]`).
    #[serde(default)]
    pub connections: ConnectionLimits,
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The HMAC-chained JSON-lines log (`STRONGROOM_AUDIT_PATH`).
    pub path: PathBuf,
    /// Most entries written with one fsync.
    pub max_batch: usize,
    /// Most bytes of entries written with one fsync (an entry larger than this is written
    /// alone).
    pub max_batch_bytes: usize,
    /// How long (microseconds) a group commit sleeps, once, for requests already being
    /// handled to bring their entries, so that one fsync covers them too. Only while other
    /// requests are in their handlers: a lone request never waits. 0 turns the wait off.
    pub commit_window_us: u64,
    /// Record a checkpoint in the token after this many entries.
    pub checkpoint_every: u64,
    /// And at least this often (seconds) while entries arrive.
    pub checkpoint_interval_secs: u64,
    /// Rotate the log once its file holds this many bytes (0: never by size). The old log
    /// is archived as `audit-<log_id>.log` next to `path` and kept.
    pub rotate_bytes: u64,
    /// Rotate the log once it is this many seconds old (0: never by age).
    pub rotate_age_secs: u64,
    /// BENCHMARKS ONLY: write audit events to the process log only, not the durable chain.
    pub dangerous_disable_audit: bool,
    /// BENCHMARKS ONLY: changes to the store get no intent entry before their commit (only
    /// the entry after it), so a crash between the two leaves an unaudited change. Refused
    /// unless the environment says `STRONGROOM_BENCHMARK=1`.
    pub dangerous_no_write_ahead: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("audit.log"),
            max_batch: 512,
            max_batch_bytes: DEFAULT_AUDIT_MAX_BATCH_BYTES,
            commit_window_us: 200,
            checkpoint_every: 1000,
            checkpoint_interval_secs: 10,
            rotate_bytes: DEFAULT_AUDIT_ROTATE_BYTES,
            rotate_age_secs: DEFAULT_AUDIT_ROTATE_AGE_SECS,
            dangerous_disable_audit: false,
            dangerous_no_write_ahead: false,
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Which engine holds the store: the embedded sled (default) or an etcd cluster.
    #[serde(default)]
    pub backend: StoreBackend,
    /// Directory of the sled store (`STRONGROOM_STORE_PATH`); required with sled, unused
    /// with etcd.
    #[serde(default)]
    pub path: PathBuf,
    /// sled's page cache in MiB (default 16). It bounds the cache, not the process: at a
    /// million secrets 128 MiB cost about 200 MiB more resident memory than 16 and made
    /// random reads no faster (BENCHMARKS.md, *Scale*).
    #[serde(default = "default_cache_mb")]
    pub cache_capacity_mb: u64,
    /// etcd: the cluster's client URLs, each `https://host:port`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// etcd: the CA that etcd's server certificates chain to, PEM.
    pub ca: Option<PathBuf>,
    /// etcd: this service's client certificate for etcd, PEM.
    pub cert: Option<PathBuf>,
    /// etcd: the client certificate's private key, PEM (closed to group and others).
    pub key: Option<PathBuf>,
    /// etcd: the key namespace; every key the service writes starts with it.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// etcd: the deadline of each call to etcd, in milliseconds; past it the request answers
    /// UNAVAILABLE.
    #[serde(default = "default_etcd_timeout_ms")]
    pub etcd_timeout_ms: u64,
    /// Seconds between scans that check every record against the store's state commitment
    /// (0: only at start). A scan reads the whole store, holding writers only for short steps
    /// (sled) or none at all (etcd: one revision).
    #[serde(default = "default_verify_interval")]
    pub verify_interval_secs: u64,
    /// sled: how many revisions of changes the change log keeps for WatchSecrets (a watcher
    /// further behind must list again); etcd keeps its own history (its compaction).
    #[serde(default = "default_watch_history")]
    pub watch_history: u64,
    /// How new secret versions are protected unless PutSecret names a protection:
    /// `"envelope"` (default: the token unwraps the data key, the value is decrypted in the
    /// service) or `"hsm-only"` (strict mode: the data key never leaves the token in the
    /// clear; the value is decrypted inside it). Records of both open in one store.
    #[serde(default)]
    pub protection: crate::secret::Protection,
}

/// `store.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// The embedded store in `store.path` (one process).
    #[default]
    Sled,
    /// An etcd v3 cluster over mutual TLS (several replicas may share it).
    Etcd,
}

pub(super) fn default_cache_mb() -> u64 {
    crate::store::DEFAULT_CACHE_MB
}

pub(super) fn default_verify_interval() -> u64 {
    DEFAULT_STORE_VERIFY_INTERVAL_SECS
}

/// Seconds between the store's state scans when the configuration says nothing.
pub const DEFAULT_STORE_VERIFY_INTERVAL_SECS: u64 = 3600;
/// The longest interval between state scans: 30 days.
pub const MAX_STORE_VERIFY_INTERVAL_SECS: u64 = 30 * 24 * 3600;

pub(super) fn default_watch_history() -> u64 {
    crate::store::DEFAULT_WATCH_HISTORY
}

pub(super) fn default_etcd_prefix() -> String {
    crate::store::DEFAULT_ETCD_PREFIX.into()
}

pub(super) fn default_etcd_timeout_ms() -> u64 {
    crate::store::DEFAULT_ETCD_TIMEOUT_MS
}

/// `[limits]`: every size the service accepts.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest secret value in bytes.
    pub max_value_bytes: usize,
    /// Longest secret name in bytes (at most 1024).
    pub max_name_bytes: usize,
    /// Largest ListSecrets page.
    pub max_page_size: usize,
    /// Most keys one ListSecrets call examines; a listing that needs more continues over
    /// several calls with page tokens.
    pub max_list_scan: u64,
    /// WatchSecrets streams open at once, every caller together; past it RESOURCE_EXHAUSTED.
    pub max_watches: usize,
    /// WatchSecrets streams one identity may hold open at once (over all its connections).
    pub max_watches_per_identity: usize,
    /// Events queued for one watcher that reads slowly; when they fill up, its stream ends
    /// with ABORTED and the revision to resume from, instead of buffering more.
    pub watch_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value_bytes: 64 * 1024,
            max_name_bytes: 256,
            max_page_size: 1000,
            max_list_scan: DEFAULT_MAX_LIST_SCAN,
            max_watches: 1024,
            max_watches_per_identity: 16,
            watch_buffer: 256,
        }
    }
}

/// Keys one ListSecrets call examines when the configuration says nothing.
pub const DEFAULT_MAX_LIST_SCAN: u64 = 10_000;
/// The hard ceiling on `max_list_scan`.
pub const MAX_LIST_SCAN_CEILING: u64 = 10_000_000;

/// The default of `audit.rotate_bytes`: 256 MiB (a start reads the current log whole).
pub const DEFAULT_AUDIT_ROTATE_BYTES: u64 = 256 << 20;
/// The default of `audit.rotate_age_secs`: 30 days.
pub const DEFAULT_AUDIT_ROTATE_AGE_SECS: u64 = 30 * 86_400;
/// The default of `audit.max_batch_bytes`: 1 MiB.
pub const DEFAULT_AUDIT_MAX_BATCH_BYTES: usize = 1 << 20;
/// The bounds of `audit.max_batch_bytes`: at least one largest entry of a client request
/// (a name cut to at most 1 KiB, an identity, the other fields), at most 64 MiB.
pub const AUDIT_MAX_BATCH_BYTES_RANGE: std::ops::RangeInclusive<usize> = 4096..=64 << 20;
/// The hard ceiling on `max_value_bytes`.
pub const MAX_VALUE_BYTES_CEILING: usize = 16 * 1024 * 1024;
/// The safe default ceiling on AES-GCM wraps per master key (2^31, half of NIST's 2^32).
pub const DEFAULT_MAX_WRAPS: u64 = 1 << 31;

pub(super) fn one() -> usize {
    1
}
pub(super) fn two() -> u32 {
    2
}
pub(super) fn default_approval_ttl() -> u64 {
    3600
}
pub(super) fn default_approval_retention() -> u64 {
    7 * 24 * 3600
}
pub(super) fn default_approval_purge_interval() -> u64 {
    300
}
pub(super) fn default_queue_depth() -> usize {
    1024
}
pub(super) fn default_timeout_ms() -> u64 {
    5000
}
pub(super) fn default_grace_ms() -> u64 {
    5000
}
pub(super) fn default_tls_reload_ms() -> u64 {
    5000
}
pub(super) fn default_max_wraps() -> u64 {
    DEFAULT_MAX_WRAPS
}

impl AdminConfig {
    /// The number of distinct officers a guarded operation needs.
    pub fn effective_quorum(&self) -> u32 {
        if self.dangerous_single_officer {
            1
        } else {
            self.quorum
        }
    }
}
