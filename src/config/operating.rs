//! `[metrics]` and `[log]`, the PIN as a systemd credential, and what `strongroomd
//! --check-config` and `--print-config` check and print.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, StoreBackend};
use crate::metrics::{DEFAULT_LISTEN, MetricsListen};

/// `[metrics]`: Prometheus text on its own listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the metrics listener. Absent: `127.0.0.1:9464` (loopback; if that port is
    /// taken the service starts without metrics and logs why). `""` or `"off"`: no metrics
    /// listener. Any other address, loopback or not, only when written here.
    pub listen: Option<String>,
}

impl MetricsConfig {
    /// Where metrics are served.
    pub fn listen_at(&self) -> Result<MetricsListen, ConfigError> {
        match self.listen.as_deref().map(str::trim) {
            None => DEFAULT_LISTEN
                .parse()
                .map(MetricsListen::Default)
                .map_err(|e| ConfigError::Invalid(format!("metrics default: {e}"))),
            Some("" | "off") => Ok(MetricsListen::Off),
            Some(a) => a.parse::<SocketAddr>().map(MetricsListen::Explicit).map_err(|e| {
                ConfigError::Invalid(format!(
                    "metrics.listen {a:?}: {e} (an address and port such as \"127.0.0.1:9464\", or \"off\")"
                ))
            }),
        }
    }
}

/// `[log]`: the process log (stderr).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `"text"` (default) or `"json"` (one JSON object per line, with the request's span:
    /// `request_id`, `plane`, `rpc`). `--log-format` / `STRONGROOM_LOG_FORMAT` override it.
    #[serde(default)]
    pub format: LogFormat,
}

/// The process log's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// JSON lines.
    Json,
}

/// The environment variable systemd sets for a unit with `LoadCredential=`.
const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

impl Config {
    /// `hsm.pin_credential`: the PIN file becomes `$CREDENTIALS_DIRECTORY/NAME`. Outside
    /// systemd (no such variable) the PIN file stays unset and the start says why (see
    /// [`Config::pin_credential_missing`]); `--check-config` only notes it.
    pub(super) fn resolve_pin_credential(&mut self) -> Result<(), ConfigError> {
        let Some(name) = &self.hsm.pin_credential else {
            return Ok(());
        };
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(ConfigError::Invalid(format!(
                "hsm.pin_credential {name:?} must be a credential name (LoadCredential=NAME:/path), not a path"
            )));
        }
        if let Some(file) = &self.hsm.pin_file {
            return Err(ConfigError::Invalid(format!(
                "hsm.pin_credential ({name:?}) and hsm.pin_file or STRONGROOM_USER_PIN_FILE ({}) both name the PIN: keep one",
                file.display()
            )));
        }
        if let Some(dir) = std::env::var_os(CREDENTIALS_DIRECTORY).filter(|d| !d.is_empty()) {
            self.hsm.pin_file = Some(PathBuf::from(dir).join(name));
        }
        Ok(())
    }

    /// Why the PIN cannot be read, when `hsm.pin_credential` is set but this process was not
    /// started by systemd with that credential.
    pub fn pin_credential_missing(&self) -> Option<String> {
        let name = self.hsm.pin_credential.as_ref()?;
        self.hsm.pin_file.is_none().then(|| {
            format!(
                "hsm.pin_credential = {name:?} but ${CREDENTIALS_DIRECTORY} is not set: start strongroomd from a systemd unit with LoadCredential={name}:/path/to/pin (see packaging/systemd/strongroomd.service), or use hsm.pin_file outside systemd"
            )
        })
    }
}

/// Every file `config` names, checked as the service would use it: present, readable, and
/// for the TLS files, loadable together (certificate and key match, CRLs signed by their
/// CA); private files closed to group and others. Returns one line per problem, each naming
/// its configuration key; empty when all is well.
pub fn check_files(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let mut readable = |key: &str, path: &Path| match std::fs::File::open(path) {
        Ok(f) => match f.metadata() {
            Ok(m) if m.is_file() => {}
            Ok(_) => problems.push(format!("{key}: {} is not a file", path.display())),
            Err(e) => problems.push(format!("{key}: {}: {e}", path.display())),
        },
        Err(e) => problems.push(format!("{key}: cannot read {}: {e}", path.display())),
    };
    readable("hsm.module", &config.hsm.module);
    if let Some(pin) = &config.hsm.pin_file {
        readable("hsm.pin_file", pin);
    }
    let s = &config.server;
    readable("server.cert", &s.cert);
    readable("server.key", &s.key);
    readable("server.client_ca", &s.client_ca);
    for crl in &s.client_crls {
        readable("server.client_crls", crl);
    }
    if let Some(a) = &config.admin {
        readable("admin.cert", &a.cert);
        readable("admin.key", &a.key);
        readable("admin.ca", &a.ca);
        for crl in &a.crls {
            readable("admin.crls", crl);
        }
    }
    if config.store.backend == StoreBackend::Etcd {
        for (key, path) in [
            ("store.ca", &config.store.ca),
            ("store.cert", &config.store.cert),
            ("store.key", &config.store.key),
        ] {
            if let Some(p) = path {
                readable(key, p);
            }
        }
    }
    if problems.is_empty() {
        // Only once every file reads: the loaders' own errors name the file.
        let listeners = [(
            "server (cert, key, client_ca, client_crls)",
            crate::tls::ServerTlsFiles {
                cert: s.cert.clone(),
                key: s.key.clone(),
                ca: s.client_ca.clone(),
                crls: s.client_crls.clone(),
            },
        )]
        .into_iter()
        .chain(config.admin.as_ref().map(|a| {
            (
                "admin (cert, key, ca, crls)",
                crate::tls::ServerTlsFiles {
                    cert: a.cert.clone(),
                    key: a.key.clone(),
                    ca: a.ca.clone(),
                    crls: a.crls.clone(),
                },
            )
        }));
        for (what, files) in listeners {
            if let Err(e) = crate::tls::ServerTls::load(files) {
                problems.push(format!("{what}: {e}"));
            }
        }
        if let Err(e) = crate::files::enforce(config) {
            problems.push(e.to_string());
        }
    }
    for (key, path) in [
        ("audit.path", &config.audit.path),
        ("store.path", &config.store.path),
    ] {
        if key == "store.path" && config.store.backend != StoreBackend::Sled {
            continue;
        }
        // Created at start if missing; its parent must be there.
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && !parent.is_dir()
        {
            problems.push(format!(
                "{key}: the directory {} does not exist",
                parent.display()
            ));
        }
    }
    problems
}

/// The effective configuration (file, environment and defaults) as TOML, for
/// `--print-config`. It holds no secret: PINs are never part of the configuration, and the
/// header says where the PIN comes from without its value.
pub fn effective_toml(config: &Config) -> Result<String, ConfigError> {
    let mut shown = config.clone();
    if shown.hsm.pin_credential.is_some() {
        // Resolved from $CREDENTIALS_DIRECTORY: the credential is what the file says.
        shown.hsm.pin_file = None;
    }
    if shown.metrics.listen.is_none() {
        shown.metrics.listen = Some(DEFAULT_LISTEN.to_owned());
    }
    let body = toml::to_string(&shown)
        .map_err(|e| ConfigError::Invalid(format!("cannot print the configuration: {e}")))?;
    let pin = match (&config.hsm.pin_file, config.pin_credential_missing()) {
        (_, Some(_)) => format!(
            "systemd credential {:?} (not available outside the unit)",
            config.hsm.pin_credential.as_deref().unwrap_or_default()
        ),
        (Some(f), None) => format!("file {}", f.display()),
        (None, None) if std::env::var_os("STRONGROOM_USER_PIN").is_some() => {
            "STRONGROOM_USER_PIN (set)".to_owned()
        }
        (None, None) => "a prompt on the terminal (no PIN file or variable set)".to_owned(),
    };
    Ok(format!(
        "# strongroomd: effective configuration (file, STRONGROOM_* variables, defaults)\n\
         # user PIN: from {pin}; its value is never printed\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_listen_on_loopback_by_default_and_off_when_asked() {
        let m = |l: Option<&str>| {
            MetricsConfig {
                listen: l.map(str::to_owned),
            }
            .listen_at()
        };
        assert_eq!(
            m(None).unwrap(),
            MetricsListen::Default("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(m(Some("off")).unwrap(), MetricsListen::Off);
        assert_eq!(m(Some("")).unwrap(), MetricsListen::Off);
        assert_eq!(
            m(Some("0.0.0.0:9100")).unwrap(),
            MetricsListen::Explicit("0.0.0.0:9100".parse().unwrap())
        );
        let e = m(Some("localhost")).unwrap_err().to_string();
        assert!(e.contains("metrics.listen"), "{e}");
    }

    fn load(hsm: &str, rest: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n\
             [hsm]\nmodule = \"m.so\"\ntoken = \"t\"\n{hsm}\n[store]\npath = \"s\"\n{rest}"
        );
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn the_pin_credential_is_a_name_and_excludes_a_pin_file() {
        for (bad, says) in [
            ("pin_credential = \"a/b\"", "not a path"),
            ("pin_credential = \"..\"", "not a path"),
            (
                "pin_credential = \"pin\"\npin_file = \"pin.txt\"",
                "keep one",
            ),
        ] {
            let e = load(bad, "").unwrap_err().to_string();
            assert!(
                e.contains("hsm.pin_credential") && e.contains(says),
                "{bad}: {e}"
            );
        }
        let c = load("pin_credential = \"strongroom-pin\"", "").unwrap();
        assert_eq!(c.hsm.pin_credential.as_deref(), Some("strongroom-pin"));
    }

    #[test]
    fn log_format_is_text_unless_json_is_asked_for() {
        assert_eq!(load("", "").unwrap().log.format, LogFormat::Text);
        let c = load("", "[log]\nformat = \"json\"").unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(load("", "[log]\nformat = \"xml\"").is_err());
    }
}
