//! Private files — the PIN file and private keys — must be closed to group and others.
//!
//! strongroomd refuses to start when one is readable or writable by group or others
//! ([`enforce`]), unless `[server] dangerous_allow_loose_file_modes` turns the refusal into a
//! warning for development; the command-line tools only warn ([`warn_if_loose`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// Mode bits that open a file to group or others for reading or writing.
const LOOSE: u32 = 0o066;

/// Why a private file is not safe to use.
#[derive(Debug, thiserror::Error)]
pub enum FileModeError {
    /// Group or others may read or write it.
    #[error("the {what} {path} is {access} (mode {mode:03o}); run `chmod 600 {path}`")]
    Loose {
        /// What the file is ("PIN file", "server private key").
        what: &'static str,
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
        /// Who may do what, in words.
        access: String,
    },
    /// Its mode cannot be read.
    #[error("cannot inspect the {what} {path}: {source}")]
    Stat {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `path` (following symbolic links) is neither readable nor writable by group
/// or others.
pub fn check_private(path: &Path, what: &'static str) -> Result<(), FileModeError> {
    let meta = std::fs::metadata(path).map_err(|source| FileModeError::Stat {
        what,
        path: path.display().to_string(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & LOOSE == 0 {
        return Ok(());
    }
    Err(FileModeError::Loose {
        what,
        path: path.display().to_string(),
        mode,
        access: access(mode),
    })
}

/// "readable by group and others", "readable and writable by group", …
fn access(mode: u32) -> String {
    let who = |read: u32, write: u32| match (mode & read != 0, mode & write != 0) {
        (true, true) => Some("readable and writable"),
        (true, false) => Some("readable"),
        (false, true) => Some("writable"),
        (false, false) => None,
    };
    match (who(0o040, 0o020), who(0o004, 0o002)) {
        (Some(g), Some(o)) if g == o => format!("{g} by group and others"),
        (Some(g), Some(o)) => format!("{g} by group and {o} by others"),
        (Some(g), None) => format!("{g} by group"),
        (None, Some(o)) => format!("{o} by others"),
        (None, None) => "private".into(),
    }
}

/// The private files of a service configuration: the PIN file, the server key, the
/// admin key and the etcd client key.
pub fn private_files(config: &Config) -> Vec<(PathBuf, &'static str)> {
    let mut files = Vec::new();
    if let Some(pin) = &config.hsm.pin_file {
        files.push((pin.clone(), "PIN file"));
    }
    files.push((config.server.key.clone(), "server private key"));
    if let Some(admin) = &config.admin {
        files.push((admin.key.clone(), "admin listener's private key"));
    }
    if let Some(key) = &config.store.key {
        files.push((key.clone(), "etcd client private key"));
    }
    files
}

/// At service start: every private file of `config` must be closed to group and others.
/// With `server.dangerous_allow_loose_file_modes` a loose file is logged as a warning
/// instead; a file that cannot be inspected is an error either way.
pub fn enforce(config: &Config) -> Result<(), FileModeError> {
    for (path, what) in private_files(config) {
        match check_private(&path, what) {
            Ok(()) => {}
            Err(e @ FileModeError::Loose { .. })
                if config.server.dangerous_allow_loose_file_modes =>
            {
                tracing::warn!(
                    "DANGEROUS: {e} (allowed by server.dangerous_allow_loose_file_modes)"
                );
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// For the command-line tools: a warning on stderr if `path` is open to group or others;
/// the tool goes on (a missing file is reported when it is read).
pub fn warn_if_loose(path: &Path, what: &'static str) {
    if let Err(e @ FileModeError::Loose { .. }) = check_private(path, what) {
        eprintln!("warning: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_mode(dir: &Path, mode: u32) -> PathBuf {
        let p = dir.join(format!("f{mode:o}"));
        std::fs::write(&p, b"secret").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn only_owner_modes_pass() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400, 0o700, 0o611] {
            check_private(&with_mode(dir.path(), mode), "PIN file").unwrap();
        }
        let cases = [
            (0o640, "readable by group"),
            (0o644, "readable by group and others"),
            (0o620, "writable by group"),
            (0o606, "readable and writable by others"),
            (
                0o664,
                "readable and writable by group and readable by others",
            ),
        ];
        for (mode, words) in cases {
            let p = with_mode(dir.path(), mode);
            let e = check_private(&p, "PIN file").unwrap_err().to_string();
            assert!(e.contains(words), "{mode:o}: {e}");
            assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
            assert!(e.contains(&format!("{mode:03o}")), "{e}");
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = check_private(Path::new("/nonexistent/pin"), "PIN file").unwrap_err();
        assert!(matches!(e, FileModeError::Stat { .. }));
        assert!(e.to_string().contains("/nonexistent/pin"));
    }
}
