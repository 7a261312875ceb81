//! Typed configuration: a TOML file, overridden by `STRONGROOM_*` environment variables,
//! overridden by flags. Relative paths in the file are relative to the file's directory.
//!
//! This file holds [`Config`] and its loading; `sections.rs` the sections' types, defaults
//! and bounds, `overrides.rs` the environment's overrides ([`Override`]), `validate.rs` the
//! checks of a loaded configuration, `connections.rs` and `operating.rs` the listeners' caps
//! and the metrics, log and `--check-config` settings.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::hsm::TokenSelector;
use crate::policy::RuleConfig;

mod connections;
mod operating;
mod overrides;
mod sections;
mod validate;

pub use connections::{ConnectionLimits, FrontLimits};
pub use operating::{LogConfig, LogFormat, MetricsConfig, check_files, effective_toml};
pub use overrides::Override;
pub use sections::{
    AUDIT_MAX_BATCH_BYTES_RANGE, AdminConfig, AuditConfig, DEFAULT_AUDIT_MAX_BATCH_BYTES,
    DEFAULT_AUDIT_ROTATE_AGE_SECS, DEFAULT_AUDIT_ROTATE_BYTES, DEFAULT_MAX_LIST_SCAN,
    DEFAULT_MAX_WRAPS, DEFAULT_STORE_VERIFY_INTERVAL_SECS, HsmConfig, JobsConfig, Limits,
    MAX_LIST_SCAN_CEILING, MAX_STORE_VERIFY_INTERVAL_SECS, MAX_VALUE_BYTES_CEILING, ServerConfig,
    StoreBackend, StoreConfig,
};
pub use validate::replica_id_problem;

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

    /// The token selector.
    pub fn token_selector(&self) -> Result<TokenSelector, ConfigError> {
        self.hsm
            .token
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("hsm.token: {e}")))
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
