//! Typed configuration: a TOML file, overridden by `STRONGROOM_*` environment variables,
//! overridden by flags. Relative paths in the file are relative to the file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hsm::{KeyCopy, TokenSelector};
use crate::policy::RuleConfig;

mod connections;
mod operating;

pub use connections::{ConnectionLimits, FrontLimits};
pub use operating::{LogConfig, LogFormat, MetricsConfig, check_files, effective_toml};

/// The whole configuration of `strongroomd`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The client listener and its TLS.
    pub server: ServerConfig,
    /// The token.
    pub hsm: HsmConfig,
    /// The store.
    pub store: StoreConfig,
    /// Size limits.
    #[serde(default)]
    pub limits: Limits,
    /// The officers' listener; absent: no admin plane.
    pub admin: Option<AdminConfig>,
    /// The audit log.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Authorisation rules (deny by default).
    #[serde(default)]
    pub policy: Vec<RuleConfig>,
    /// Once-only jobs and the leases of their locks.
    #[serde(default)]
    pub jobs: JobsConfig,
    /// The Prometheus metrics listener (`[metrics]`).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The process log (`[log]`).
    #[serde(default)]
    pub log: LogConfig,
    /// The settings a `STRONGROOM_*` variable set over the file's (see [`Config::origin`]).
    #[serde(skip)]
    pub overrides: Vec<Override>,
}

/// A setting the environment gave over the file's.
#[derive(Debug, Clone)]
pub struct Override {
    /// The variable, e.g. `STRONGROOM_TOKEN`.
    pub var: &'static str,
    /// The setting it overrides, e.g. `hsm.token`.
    pub key: &'static str,
    /// The file's value, if it had one.
    pub file_value: Option<String>,
    /// The variable's value.
    pub value: String,
}

impl std::fmt::Display for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={:?} from the environment", self.var, self.value)?;
        match &self.file_value {
            Some(v) => write!(f, ", over {} = {v:?} in the configuration file", self.key),
            None => write!(f, " (sets {})", self.key),
        }
    }
}

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

impl JobsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.into()));
        if !(2..=3600).contains(&self.lease_ttl_secs) {
            return invalid(
                "jobs.lease_ttl_secs must be 2..=3600 (etcd's shortest lease is about 2 s)",
            );
        }
        if self.renew_interval_ms < 100 || self.renew_interval_ms * 2 > self.lease_ttl_secs * 1000 {
            return invalid(
                "jobs.renew_interval_ms must be at least 100 and at most half of jobs.lease_ttl_secs, so one lost renewal does not lose the lease",
            );
        }
        if self.state_report_interval_secs > 86_400 {
            return invalid("jobs.state_report_interval_secs must be 0..=86400 (0: off)");
        }
        if self.expiry_notice_interval_secs > 86_400 {
            return invalid("jobs.expiry_notice_interval_secs must be 0..=86400 (0: off)");
        }
        if self.expiry_notice_window_secs == 0 || self.expiry_notice_window_secs > 366 * 86_400 {
            return invalid(
                "jobs.expiry_notice_window_secs must be 1..=31622400 (at most 366 days)",
            );
        }
        Ok(())
    }
}

/// Why a replica id is refused, if it is: 1..=32 bytes of `[a-z0-9-]`, not starting or
/// ending with `-` (it names token objects and etcd keys).
pub fn replica_id_problem(id: &str) -> Option<String> {
    let ok = (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    (!ok).then(|| {
        format!(
            "server.replica_id {id:?} must be 1..=32 characters of a-z, 0-9 and '-', not starting or ending with '-' (or absent for a single node)"
        )
    })
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

fn default_cache_mb() -> u64 {
    crate::store::DEFAULT_CACHE_MB
}

fn default_verify_interval() -> u64 {
    DEFAULT_STORE_VERIFY_INTERVAL_SECS
}

/// Seconds between the store's state scans when the configuration says nothing.
pub const DEFAULT_STORE_VERIFY_INTERVAL_SECS: u64 = 3600;
/// The longest interval between state scans: 30 days.
pub const MAX_STORE_VERIFY_INTERVAL_SECS: u64 = 30 * 24 * 3600;

fn default_watch_history() -> u64 {
    crate::store::DEFAULT_WATCH_HISTORY
}

fn default_etcd_prefix() -> String {
    crate::store::DEFAULT_ETCD_PREFIX.into()
}

fn default_etcd_timeout_ms() -> u64 {
    crate::store::DEFAULT_ETCD_TIMEOUT_MS
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.watch_history == 0 || self.watch_history > crate::store::MAX_WATCH_HISTORY {
            return invalid(format!(
                "store.watch_history must be 1..={} (revisions of changes kept for watchers)",
                crate::store::MAX_WATCH_HISTORY
            ));
        }
        if self.verify_interval_secs > MAX_STORE_VERIFY_INTERVAL_SECS {
            return invalid(format!(
                "store.verify_interval_secs must be 0..={MAX_STORE_VERIFY_INTERVAL_SECS} (0: only at start)"
            ));
        }
        match self.backend {
            StoreBackend::Sled => {
                if self.path.as_os_str().is_empty() {
                    return invalid(
                        "store.path is required with store.backend = \"sled\" (the store's directory)"
                            .into(),
                    );
                }
                let etcd_keys = [
                    (!self.endpoints.is_empty(), "endpoints"),
                    (self.ca.is_some(), "ca"),
                    (self.cert.is_some(), "cert"),
                    (self.key.is_some(), "key"),
                ];
                if let Some((_, k)) = etcd_keys.iter().find(|(set, _)| *set) {
                    return invalid(format!(
                        "store.{k} is an etcd setting but store.backend is \"sled\"; add backend = \"etcd\" to [store]"
                    ));
                }
                if !(16..=1 << 20).contains(&self.cache_capacity_mb) {
                    return invalid("store.cache_capacity_mb must be 16..=1048576 (MiB)".into());
                }
            }
            StoreBackend::Etcd => {
                if self.endpoints.is_empty() {
                    return invalid(
                        "store.endpoints must list etcd's client URLs (https://host:port) with store.backend = \"etcd\""
                            .into(),
                    );
                }
                for e in &self.endpoints {
                    let rest = e.strip_prefix("https://").ok_or_else(|| {
                        ConfigError::Invalid(format!(
                            "store.endpoints: {e:?} must start with https:// (etcd is reached over mutual TLS only)"
                        ))
                    })?;
                    if rest.is_empty() || rest.contains('/') || !rest.contains(':') {
                        return invalid(format!(
                            "store.endpoints: {e:?} must be https://host:port"
                        ));
                    }
                }
                for (set, k, what) in [
                    (
                        self.ca.is_some(),
                        "ca",
                        "the CA of etcd's server certificates",
                    ),
                    (
                        self.cert.is_some(),
                        "cert",
                        "the client certificate for etcd",
                    ),
                    (
                        self.key.is_some(),
                        "key",
                        "the client certificate's private key",
                    ),
                ] {
                    if !set {
                        return invalid(format!(
                            "store.{k} is required with store.backend = \"etcd\" ({what}, PEM): etcd is reached over mutual TLS"
                        ));
                    }
                }
                if self.prefix.is_empty()
                    || !self.prefix.ends_with('/')
                    || self.prefix.contains('\0')
                    || self.prefix.len() > 256
                {
                    return invalid(format!(
                        "store.prefix {:?} must be 1..=256 bytes ending in '/' (e.g. \"strongroom/\")",
                        self.prefix
                    ));
                }
                if !(100..=600_000).contains(&self.etcd_timeout_ms) {
                    return invalid("store.etcd_timeout_ms must be 100..=600000".into());
                }
            }
        }
        Ok(())
    }
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

fn one() -> usize {
    1
}
fn two() -> u32 {
    2
}
fn default_approval_ttl() -> u64 {
    3600
}
fn default_approval_retention() -> u64 {
    7 * 24 * 3600
}
fn default_approval_purge_interval() -> u64 {
    300
}
fn default_queue_depth() -> usize {
    1024
}
fn default_timeout_ms() -> u64 {
    5000
}
fn default_grace_ms() -> u64 {
    5000
}
fn default_tls_reload_ms() -> u64 {
    5000
}
fn default_max_wraps() -> u64 {
    DEFAULT_MAX_WRAPS
}

/// A configuration that cannot be used, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("configuration file {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The parse error.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or malformed.
    #[error("configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads the file, applies `STRONGROOM_*` overrides and checks every value.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })?;
        config.apply_env()?;
        let base = path.parent().unwrap_or(Path::new("."));
        // A path the variable names as the file does (relative to the file) changes nothing.
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        config.overrides.retain(|o| {
            o.file_value
                .as_ref()
                .is_none_or(|f| !same(&base.join(f), Path::new(&o.value)))
        });
        for o in &config.overrides {
            tracing::warn!(variable = o.var, setting = o.key, "configuration: {o}");
        }
        config.resolve_paths(base);
        config.resolve_pin_credential()?;
        config.validate()?;
        Ok(config)
    }

    /// Where a setting overridden by the environment came from (`hsm.token`, …).
    pub fn origin(&self, key: &str) -> Option<&Override> {
        self.overrides.iter().find(|o| o.key == key)
    }

    fn apply_env(&mut self) -> Result<(), ConfigError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let before = |c: &Config, key: &str| -> Option<String> {
            match key {
                "server.listen" => Some(c.server.listen.to_string()),
                "hsm.module" => Some(c.hsm.module.display().to_string()),
                "hsm.token" => Some(c.hsm.token.clone()),
                "hsm.pin_file" => c.hsm.pin_file.as_ref().map(|p| p.display().to_string()),
                "store.path" => Some(c.store.path.display().to_string()),
                "audit.path" => Some(c.audit.path.display().to_string()),
                "server.replica_id" => Some(c.server.replica_id.clone()),
                "admin.listen" => c.admin.as_ref().map(|a| a.listen.to_string()),
                _ => None,
            }
        };
        for (name, key) in [
            ("STRONGROOM_LISTEN", "server.listen"),
            ("STRONGROOM_PKCS11_MODULE", "hsm.module"),
            ("STRONGROOM_TOKEN", "hsm.token"),
            ("STRONGROOM_USER_PIN_FILE", "hsm.pin_file"),
            ("STRONGROOM_STORE_PATH", "store.path"),
            ("STRONGROOM_AUDIT_PATH", "audit.path"),
            ("STRONGROOM_REPLICA_ID", "server.replica_id"),
            ("STRONGROOM_ADMIN_LISTEN", "admin.listen"),
        ] {
            if let Some(value) = var(name) {
                let file_value = before(self, key);
                // Only a variable that changes the file's setting is worth a word.
                if file_value.as_deref() != Some(value.as_str()) {
                    self.overrides.push(Override {
                        var: name,
                        key,
                        file_value,
                        value,
                    });
                }
            }
        }
        if let Some(v) = var("STRONGROOM_LISTEN") {
            self.server.listen = v
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("STRONGROOM_LISTEN={v}: {e}")))?;
        }
        if let Some(v) = var("STRONGROOM_PKCS11_MODULE") {
            self.hsm.module = v.into();
        }
        if let Some(v) = var("STRONGROOM_TOKEN") {
            self.hsm.token = v;
        }
        if let Some(v) = var("STRONGROOM_USER_PIN_FILE") {
            self.hsm.pin_file = Some(v.into());
        }
        if let Some(v) = var("STRONGROOM_STORE_PATH") {
            self.store.path = v.into();
        }
        if let Some(v) = var("STRONGROOM_AUDIT_PATH") {
            self.audit.path = v.into();
        }
        if let Some(v) = var("STRONGROOM_REPLICA_ID") {
            self.server.replica_id = v;
        }
        if let (Some(v), Some(admin)) = (var("STRONGROOM_ADMIN_LISTEN"), self.admin.as_mut()) {
            admin.listen = v
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("STRONGROOM_ADMIN_LISTEN={v}: {e}")))?;
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.server.cert,
            &mut self.server.key,
            &mut self.server.client_ca,
            &mut self.store.path,
            &mut self.audit.path,
        ]
        .into_iter()
        .chain(self.server.client_crls.iter_mut())
        .chain(
            [
                &mut self.store.ca,
                &mut self.store.cert,
                &mut self.store.key,
            ]
            .into_iter()
            .flatten(),
        ) {
            // An empty path is an unset one (store.path with etcd).
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = self.hsm.pin_file.as_mut().filter(|p| p.is_relative()) {
            *p = base.join(&*p);
        }
        if let Some(admin) = self.admin.as_mut() {
            for p in [&mut admin.cert, &mut admin.key, &mut admin.ca]
                .into_iter()
                .chain(admin.crls.iter_mut())
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_value_bytes == 0 || l.max_value_bytes > MAX_VALUE_BYTES_CEILING {
            return Err(ConfigError::Invalid(format!(
                "limits.max_value_bytes must be 1..={MAX_VALUE_BYTES_CEILING}"
            )));
        }
        if l.max_name_bytes == 0 || l.max_name_bytes > crate::secret::MAX_NAME_BYTES_CEILING {
            return Err(ConfigError::Invalid(format!(
                "limits.max_name_bytes must be 1..={}",
                crate::secret::MAX_NAME_BYTES_CEILING
            )));
        }
        if l.max_page_size == 0 || l.max_page_size > 100_000 {
            return Err(ConfigError::Invalid(
                "limits.max_page_size must be 1..=100000".into(),
            ));
        }
        if l.max_list_scan == 0 || l.max_list_scan > MAX_LIST_SCAN_CEILING {
            return Err(ConfigError::Invalid(format!(
                "limits.max_list_scan must be 1..={MAX_LIST_SCAN_CEILING}"
            )));
        }
        if l.max_watches == 0
            || l.max_watches_per_identity == 0
            || l.max_watches_per_identity > l.max_watches
            || l.max_watches > 100_000
        {
            return Err(ConfigError::Invalid(
                "limits.max_watches must be 1..=100000 and limits.max_watches_per_identity 1..=max_watches"
                    .into(),
            ));
        }
        if l.watch_buffer == 0 || l.watch_buffer > 65_536 {
            return Err(ConfigError::Invalid(
                "limits.watch_buffer must be 1..=65536 (events queued per watcher)".into(),
            ));
        }
        if self.hsm.request_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "hsm.request_timeout_ms must be at least 1".into(),
            ));
        }
        if self.hsm.workers == 0 || self.hsm.workers > 256 {
            return Err(ConfigError::Invalid("hsm.workers must be 1..=256".into()));
        }
        if self.hsm.max_wraps_per_key == 0 || self.hsm.max_wraps_per_key > 1 << 32 {
            return Err(ConfigError::Invalid(
                "hsm.max_wraps_per_key must be 1..=2^32 (NIST SP 800-38D)".into(),
            ));
        }
        self.token_selector()?;
        self.server.connections.validate("server")?;
        if !(100..=3_600_000).contains(&self.server.tls_reload_ms) {
            return Err(ConfigError::Invalid(
                "server.tls_reload_ms must be 100..=3600000".into(),
            ));
        }
        if let Some(admin) = &self.admin {
            admin.validate(self)?;
        }
        if self.audit.dangerous_no_write_ahead
            && std::env::var("STRONGROOM_BENCHMARK").as_deref() != Ok("1")
        {
            return Err(ConfigError::Invalid(
                "audit.dangerous_no_write_ahead is for benchmarks only (it lets a crash leave a change no audit entry records): remove it, or set STRONGROOM_BENCHMARK=1 in a benchmark".into(),
            ));
        }
        if self.audit.max_batch == 0 || self.audit.checkpoint_every == 0 {
            return Err(ConfigError::Invalid(
                "audit.max_batch and audit.checkpoint_every must be at least 1".into(),
            ));
        }
        if !AUDIT_MAX_BATCH_BYTES_RANGE.contains(&self.audit.max_batch_bytes) {
            return Err(ConfigError::Invalid(format!(
                "audit.max_batch_bytes must be {}..={} (bytes of entries written with one fsync)",
                AUDIT_MAX_BATCH_BYTES_RANGE.start(),
                AUDIT_MAX_BATCH_BYTES_RANGE.end()
            )));
        }
        if self.audit.commit_window_us > 100_000 {
            return Err(ConfigError::Invalid(
                "audit.commit_window_us must be at most 100000 (0.1 s): every request under load may wait this long".into(),
            ));
        }
        self.store.validate()?;
        self.jobs.validate()?;
        self.metrics.listen_at()?;
        if !self.server.replica_id.is_empty()
            && let Some(p) = replica_id_problem(&self.server.replica_id)
        {
            return Err(ConfigError::Invalid(p));
        }
        crate::policy::Policy::from_rules(&self.policy, l.max_name_bytes)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(())
    }

    /// The token selector.
    pub fn token_selector(&self) -> Result<TokenSelector, ConfigError> {
        self.hsm
            .token
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("hsm.token: {e}")))
    }
}

impl AdminConfig {
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        if self.listen == config.server.listen && self.listen.port() != 0 {
            return Err(ConfigError::Invalid(
                "admin.listen must differ from server.listen: the admin plane has its own address"
                    .into(),
            ));
        }
        self.connections.validate("admin")?;
        // Compared as parsed certificates (subject and public key), so two files that differ
        // only in whitespace, comments or order cannot make one CA serve both planes.
        if let Some(shared) = crate::tls::shared_ca(&self.ca, &config.server.client_ca)
            .map_err(|e| ConfigError::Invalid(format!("admin.ca / server.client_ca: {e}")))?
        {
            return Err(ConfigError::Invalid(format!(
                "admin.ca must be a different CA from server.client_ca: both files hold the CA \"{shared}\" (same subject and public key)"
            )));
        }
        if self.officers.is_empty() {
            return Err(ConfigError::Invalid(
                "admin.officers lists no officer identities".into(),
            ));
        }
        if self.quorum == 0 || (self.quorum < 2 && !self.dangerous_single_officer) {
            return Err(ConfigError::Invalid(
                "admin.quorum must be at least 2 (or set admin.dangerous_single_officer for development)"
                    .into(),
            ));
        }
        if self.approval_ttl_secs == 0 || self.approval_purge_interval_secs == 0 {
            return Err(ConfigError::Invalid(
                "admin.approval_ttl_secs and admin.approval_purge_interval_secs must be at least 1"
                    .into(),
            ));
        }
        if self.quorum as usize > self.officers.len() && !self.dangerous_single_officer {
            return Err(ConfigError::Invalid(format!(
                "admin.quorum is {} but only {} officers are listed",
                self.quorum,
                self.officers.len()
            )));
        }
        Ok(())
    }

    /// The number of distinct officers a guarded operation needs.
    pub fn effective_quorum(&self) -> u32 {
        if self.dangerous_single_officer {
            1
        } else {
            self.quorum
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(store: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n\
             [hsm]\nmodule = \"m.so\"\ntoken = \"t\"\n[store]\npath = \"s\"\n{store}"
        );
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn audit_batches_are_bounded_in_bytes_by_default_and_the_bound_must_be_sane() {
        assert_eq!(parse("").unwrap().audit.max_batch_bytes, 1 << 20);
        assert_eq!(
            parse("[audit]\nmax_batch_bytes = 65536")
                .unwrap()
                .audit
                .max_batch_bytes,
            65536
        );
        for bad in [
            "max_batch_bytes = 0",
            "max_batch_bytes = 4095",
            "max_batch_bytes = 67108865",
        ] {
            let e = parse(&format!("[audit]\n{bad}")).unwrap_err().to_string();
            assert!(e.contains("audit.max_batch_bytes"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_store_cache_is_128_mib_unless_set_and_must_be_sane() {
        assert_eq!(parse("").unwrap().store.cache_capacity_mb, 16);
        assert_eq!(
            parse("cache_capacity_mb = 64")
                .unwrap()
                .store
                .cache_capacity_mb,
            64
        );
        for bad in ["cache_capacity_mb = 0", "cache_capacity_mb = 2000000"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("store.cache_capacity_mb"), "{bad}: {e}");
        }
    }

    fn parse_etcd(store: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n\
             [hsm]\nmodule = \"m.so\"\ntoken = \"t\"\n[store]\n{store}"
        );
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn the_store_backend_is_sled_by_default_and_etcd_needs_mutual_tls() {
        let sled = parse("").unwrap();
        assert_eq!(sled.store.backend, StoreBackend::Sled);
        let etcd = "backend = \"etcd\"\nendpoints = [\"https://127.0.0.1:2379\"]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let c = parse_etcd(etcd).unwrap();
        assert_eq!(c.store.backend, StoreBackend::Etcd);
        assert_eq!(c.store.prefix, "strongroom/");
        assert_eq!(c.store.etcd_timeout_ms, 2000);
        // Relative files are relative to the configuration's directory.
        assert!(c.store.key.as_ref().unwrap().is_absolute());
        for (bad, says) in [
            ("", "store.path is required"),
            ("backend = \"etcd\"\n", "store.endpoints must list"),
            (
                "backend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
                "must start with https://",
            ),
            (
                "backend = \"etcd\"\nendpoints = [\"https://127.0.0.1\"]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
                "must be https://host:port",
            ),
            (
                "backend = \"etcd\"\nendpoints = [\"https://h:1\"]\nca = \"a\"\ncert = \"b\"\n",
                "store.key is required",
            ),
            (&format!("{etcd}prefix = \"noslash\"\n"), "store.prefix"),
            (
                &format!("{etcd}etcd_timeout_ms = 5\n"),
                "store.etcd_timeout_ms",
            ),
            ("backend = \"zookeeper\"\n", "unknown variant"),
            (
                "path = \"s\"\nendpoints = [\"https://h:1\"]\n",
                "add backend = \"etcd\"",
            ),
        ] {
            let e = parse_etcd(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn replica_ids_are_short_and_plain_and_absent_by_default() {
        assert_eq!(parse("").unwrap().server.replica_id, "");
        for ok in ["a", "r1", "eu-west-2", &"x".repeat(32)] {
            assert_eq!(replica_id_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "R1",
            "r_1",
            "r/1",
            "r@1",
            "-r",
            "r-",
            "r 1",
            &"x".repeat(33),
        ] {
            assert!(replica_id_problem(bad).is_some(), "{bad:?}");
        }
        // Through the file: an id in [server] is checked too.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let text = |id: &str| {
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n\
                 replica_id = \"{id}\"\n[hsm]\nmodule = \"m.so\"\ntoken = \"t\"\n[store]\npath = \"s\"\n"
            )
        };
        std::fs::write(&path, text("r1")).unwrap();
        assert_eq!(Config::load(&path).unwrap().server.replica_id, "r1");
        std::fs::write(&path, text("R1")).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("server.replica_id"), "{e}");
    }

    #[test]
    fn job_leases_default_to_ten_seconds_and_renewals_fit_in_them() {
        let j = parse("").unwrap().jobs;
        assert_eq!((j.lease_ttl_secs, j.renew_interval_ms), (10, 3000));
        assert_eq!(j.state_report_interval_secs, 60);
        assert_eq!(
            (j.expiry_notice_interval_secs, j.expiry_notice_window_secs),
            (300, 604_800)
        );
        let jobs = |t: &str| parse(&format!("[jobs]\n{t}"));
        assert!(jobs("lease_ttl_secs = 2\nrenew_interval_ms = 1000").is_ok());
        for bad in [
            "lease_ttl_secs = 1",
            "lease_ttl_secs = 2\nrenew_interval_ms = 1001",
            "renew_interval_ms = 99",
            "state_report_interval_secs = 86401",
            "expiry_notice_interval_secs = 86401",
            "expiry_notice_window_secs = 0",
        ] {
            let e = jobs(bad).unwrap_err().to_string();
            assert!(e.contains("jobs."), "{bad}: {e}");
        }
    }

    #[test]
    fn the_store_verify_interval_defaults_to_an_hour_and_must_be_sane() {
        assert_eq!(parse("").unwrap().store.verify_interval_secs, 3600);
        for ok in [0, 1, MAX_STORE_VERIFY_INTERVAL_SECS] {
            assert_eq!(
                parse(&format!("verify_interval_secs = {ok}"))
                    .unwrap()
                    .store
                    .verify_interval_secs,
                ok
            );
        }
        for bad in [
            "verify_interval_secs = 2592001",
            "verify_interval_secs = -1",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("verify_interval_secs"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_list_scan_cap_defaults_and_must_be_sane() {
        assert_eq!(parse("").unwrap().limits.max_list_scan, 10_000);
        assert_eq!(
            parse("[limits]\nmax_list_scan = 50")
                .unwrap()
                .limits
                .max_list_scan,
            50
        );
        for bad in ["max_list_scan = 0", "max_list_scan = 10000001"] {
            let e = parse(&format!("[limits]\n{bad}")).unwrap_err().to_string();
            assert!(e.contains("limits.max_list_scan"), "{bad}: {e}");
        }
    }
}
