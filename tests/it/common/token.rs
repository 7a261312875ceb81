//! The token of a test env: which PKCS#11 implementation (`STRONGROOM_TEST_TOKEN`), and the
//! configuration files that point SoftHSM2 or Kryoptic at the test's own token directory.

use std::path::{Path, PathBuf};

/// Points this process's token module at the test's own token (read at C_Initialize):
/// `SOFTHSM2_CONF` or `KRYOPTIC_CONF`.
#[allow(unsafe_code)]
pub(crate) fn set_token_conf(var: &str, conf: &Path) {
    // SAFETY: called from the test's own thread before it loads the PKCS#11 module or starts
    // any other thread that reads the environment; nextest runs each test in its own process.
    unsafe { std::env::set_var(var, conf) };
}

/// The PKCS#11 implementation the suite runs on (`STRONGROOM_TEST_TOKEN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// SoftHSM2 2.6 (Debian's `softhsm2`), the default.
    SoftHsm2,
    /// Kryoptic (the `kryoptic` crate), built by `scripts/kryoptic.sh`.
    Kryoptic,
}

/// The Kryoptic version `scripts/kryoptic.sh` builds (keep the two in step).
pub const KRYOPTIC_VERSION: &str = "1.5.4";

impl Token {
    /// From `STRONGROOM_TEST_TOKEN` (`softhsm2` when unset); an unknown name fails the test.
    pub fn from_env() -> Token {
        match std::env::var("STRONGROOM_TEST_TOKEN").as_deref() {
            Err(_) | Ok("") | Ok("softhsm2") => Token::SoftHsm2,
            Ok("kryoptic") => Token::Kryoptic,
            Ok(other) => {
                panic!("STRONGROOM_TEST_TOKEN={other}: expected softhsm2 or kryoptic")
            }
        }
    }

    /// The module's default path.
    pub fn default_module(self) -> PathBuf {
        match self {
            Token::SoftHsm2 => "/usr/lib/softhsm/libsofthsm2.so".into(),
            Token::Kryoptic => {
                let cache = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
                    .unwrap_or_else(|| PathBuf::from("/root/.cache"));
                cache
                    .join("strongroom")
                    .join(format!("kryoptic-{KRYOPTIC_VERSION}"))
                    .join("libkryoptic_pkcs11.so")
            }
        }
    }

    /// The name people know it by, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Token::SoftHsm2 => "SoftHSM2",
            Token::Kryoptic => "Kryoptic",
        }
    }
}

/// True (and prints why) when the suite runs on Kryoptic: for tests that depend on SoftHSM2's
/// token files or SoftHSM2-only behaviour.
pub fn skip_on_kryoptic(why: &str) -> bool {
    if Token::from_env() == Token::Kryoptic {
        println!("skipped on Kryoptic: {why}");
        true
    } else {
        false
    }
}

/// Writes `<dir>/softhsm2.conf` and `<dir>/kryoptic.conf`, both keeping their token in
/// `tokens` (SoftHSM2: a folder per token; Kryoptic: one sqlite file, `token.sql`). Both are
/// written whatever the token, so a test may name either file.
pub(crate) fn write_token_confs(dir: &Path, tokens: &Path) {
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-config/softhsm2.conf.template"),
    )
    .expect("softhsm template");
    std::fs::write(
        dir.join("softhsm2.conf"),
        template.replace("@TOKENDIR@", tokens.to_str().unwrap()),
    )
    .expect("softhsm conf");
    std::fs::write(
        dir.join("kryoptic.conf"),
        format!(
            "[[slots]]\nslot = 1\ndescription = \"strongroom test token\"\n\
             dbtype = \"sqlite\"\ndbargs = \"{}\"\n",
            tokens.join("token.sql").display()
        ),
    )
    .expect("kryoptic conf");
}

pub(crate) fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}
