//! `STRONGROOM_*` environment variables over the file's settings, each recorded as an
//! [`Override`].

use super::{Config, ConfigError};

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

impl Config {
    pub(super) fn apply_env(&mut self) -> Result<(), ConfigError> {
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
}
