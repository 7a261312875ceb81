//! Typed configuration: a TOML file, overridden by `STRONGROOM_*` environment variables,
//! overridden by flags. Relative paths in the file are relative to the file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::hsm::{KeyCopy, TokenSelector};
use crate::policy::RuleConfig;

/// The whole configuration of `strongroomd`.
#[derive(Debug, Clone, Deserialize)]
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
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
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
    /// DEVELOPMENT ONLY: start even when the PIN file or a private key is readable or
    /// writable by group or others, with a warning instead of a refusal.
    #[serde(default)]
    pub dangerous_allow_loose_file_modes: bool,
}

/// `[hsm]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// PKCS#11 module path (`STRONGROOM_PKCS11_MODULE`).
    pub module: PathBuf,
    /// Token label, `serial:<serial>` or an RFC 7512 URI (`STRONGROOM_TOKEN`).
    pub token: String,
    /// File holding the user PIN (`STRONGROOM_USER_PIN_FILE`); else `STRONGROOM_USER_PIN`.
    pub pin_file: Option<PathBuf>,
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
#[derive(Debug, Clone, Deserialize)]
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
    /// How long a pending approval waits, in seconds.
    #[serde(default = "default_approval_ttl")]
    pub approval_ttl_secs: u64,
    /// DEVELOPMENT ONLY: guarded operations run on one officer's word. Shown in status,
    /// health and the log.
    #[serde(default)]
    pub dangerous_single_officer: bool,
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The HMAC-chained JSON-lines log (`STRONGROOM_AUDIT_PATH`).
    pub path: PathBuf,
    /// Most entries written with one fsync.
    pub max_batch: usize,
    /// How long (microseconds) a group commit sleeps, once, for requests already being
    /// handled to bring their entries, so that one fsync covers them too. Only while other
    /// requests are in their handlers: a lone request never waits. 0 turns the wait off.
    pub commit_window_us: u64,
    /// Record a checkpoint in the token after this many entries.
    pub checkpoint_every: u64,
    /// And at least this often (seconds) while entries arrive.
    pub checkpoint_interval_secs: u64,
    /// BENCHMARKS ONLY: write audit events to the process log only, not the durable chain.
    pub dangerous_disable_audit: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("audit.log"),
            max_batch: 512,
            commit_window_us: 200,
            checkpoint_every: 1000,
            checkpoint_interval_secs: 10,
            dangerous_disable_audit: false,
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Directory of the sled store (`STRONGROOM_STORE_PATH`).
    pub path: PathBuf,
    /// sled's page cache in MiB: the service's memory is about this plus 30-80 MiB at any
    /// store size (BENCHMARKS.md: ~1 GiB resident at a million secrets with the default).
    #[serde(default = "default_cache_mb")]
    pub cache_capacity_mb: u64,
}

fn default_cache_mb() -> u64 {
    crate::store::DEFAULT_CACHE_MB
}

/// `[limits]`: every size the service accepts.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest secret value in bytes.
    pub max_value_bytes: usize,
    /// Longest secret name in bytes (at most 1024).
    pub max_name_bytes: usize,
    /// Largest ListSecrets page.
    pub max_page_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value_bytes: 64 * 1024,
            max_name_bytes: 256,
            max_page_size: 1000,
        }
    }
}

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
fn default_queue_depth() -> usize {
    1024
}
fn default_timeout_ms() -> u64 {
    5000
}
fn default_grace_ms() -> u64 {
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
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    fn apply_env(&mut self) -> Result<(), ConfigError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
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
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = self.hsm.pin_file.as_mut().filter(|p| p.is_relative()) {
            *p = base.join(&*p);
        }
        if let Some(admin) = self.admin.as_mut() {
            for p in [&mut admin.cert, &mut admin.key, &mut admin.ca] {
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
        if let Some(admin) = &self.admin {
            admin.validate(self)?;
        }
        if self.audit.max_batch == 0 || self.audit.checkpoint_every == 0 {
            return Err(ConfigError::Invalid(
                "audit.max_batch and audit.checkpoint_every must be at least 1".into(),
            ));
        }
        if self.audit.commit_window_us > 100_000 {
            return Err(ConfigError::Invalid(
                "audit.commit_window_us must be at most 100000 (0.1 s): every request under load may wait this long".into(),
            ));
        }
        if !(16..=1 << 20).contains(&self.store.cache_capacity_mb) {
            return Err(ConfigError::Invalid(
                "store.cache_capacity_mb must be 16..=1048576 (MiB)".into(),
            ));
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
        let same_ca = match (
            std::fs::read(&self.ca),
            std::fs::read(&config.server.client_ca),
        ) {
            (Ok(a), Ok(c)) => a == c,
            _ => false,
        };
        if same_ca {
            return Err(ConfigError::Invalid(
                "admin.ca must be a different CA from server.client_ca".into(),
            ));
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
    fn the_store_cache_is_sled_default_unless_set_and_must_be_sane() {
        assert_eq!(parse("").unwrap().store.cache_capacity_mb, 1024);
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
}
