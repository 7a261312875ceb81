//! PINs: read from a file, an environment variable or a prompt, never from argv.

use std::path::Path;

use cryptoki::types::AuthPin;

/// Why a PIN could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The PIN file could not be read.
    #[error("cannot read the PIN file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The prompt failed (no terminal).
    #[error("cannot prompt for the {what}: {source}; give a PIN file or set {env}")]
    Prompt {
        /// Which PIN.
        what: &'static str,
        /// The env var that would also do.
        env: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The PIN is empty.
    #[error("the {0} is empty")]
    Empty(&'static str),
}

/// Reads a PIN: from `file` if given, else from the environment variable `env`, else by
/// prompting on the terminal (when `prompt` is true). Trailing newlines in files are dropped.
pub fn read_pin(
    what: &'static str,
    file: Option<&Path>,
    env: &'static str,
    prompt: bool,
) -> Result<AuthPin, PinError> {
    let pin: String = if let Some(path) = file {
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            PinError::File {
                path: path.display().to_string(),
                source,
            }
        })?);
        text.trim_end_matches(['\n', '\r']).to_owned()
    } else if let Ok(v) = std::env::var(env) {
        v
    } else if prompt {
        rpassword::prompt_password(format!("{what}: ")).map_err(|source| PinError::Prompt {
            what,
            env,
            source,
        })?
    } else {
        return Err(PinError::Prompt {
            what,
            env,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no PIN source given"),
        });
    };
    if pin.is_empty() {
        return Err(PinError::Empty(what));
    }
    Ok(AuthPin::new(pin.into_boxed_str()))
}
