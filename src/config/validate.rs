//! Checking a loaded configuration: every value in range, and the sections consistent with
//! each other.

use super::{
    AUDIT_MAX_BATCH_BYTES_RANGE, AdminConfig, Config, ConfigError, JobsConfig,
    MAX_LIST_SCAN_CEILING, MAX_STORE_VERIFY_INTERVAL_SECS, MAX_VALUE_BYTES_CEILING, StoreBackend,
    StoreConfig,
};

impl JobsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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

impl Config {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
}

impl AdminConfig {
    pub(super) fn validate(&self, config: &Config) -> Result<(), ConfigError> {
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
}
