//! `strongroom-admin store migrate`: copies a store to another backend (offline, with the
//! token's PIN), with a progress bar and a verification pass (see `strongroom::store::migrate`).

use std::path::{Path, PathBuf};

use serde_json::json;

use strongroom::config::{Config, StoreBackend, StoreConfig};
use strongroom::hsm::{self, HsmError};
use strongroom::store::{self, StateKey, Store};

use crate::{Cli, Failure, Format};

/// One side of a migration: `sled:PATH` or `etcd:ENDPOINT[,ENDPOINT…]`.
#[derive(Debug, Clone)]
pub(crate) enum Side {
    Sled(PathBuf),
    Etcd(Vec<String>),
}

impl std::str::FromStr for Side {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("sled", path)) if !path.is_empty() => Ok(Side::Sled(PathBuf::from(path))),
            Some(("etcd", endpoints)) if !endpoints.is_empty() => Ok(Side::Etcd(
                endpoints.split(',').map(str::to_owned).collect(),
            )),
            _ => Err(format!(
                "'{s}' is not sled:PATH or etcd:ENDPOINT[,ENDPOINT…] (e.g. etcd:https://127.0.0.1:2379)"
            )),
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Side::Sled(p) => write!(f, "sled:{}", p.display()),
            Side::Etcd(e) => write!(f, "etcd:{}", e.join(",")),
        }
    }
}

/// The store settings of `config` pointed at `side` (etcd's TLS files and prefix, sled's
/// cache, come from the configuration file).
fn settings(config: &StoreConfig, side: &Side) -> StoreConfig {
    let mut s = config.clone();
    match side {
        Side::Sled(path) => {
            s.backend = StoreBackend::Sled;
            s.path = path.clone();
        }
        Side::Etcd(endpoints) => {
            s.backend = StoreBackend::Etcd;
            s.endpoints = endpoints.clone();
        }
    }
    s
}

/// The bytes of the key the store commits its records under, derived in the token as the
/// service does.
fn state_key(cli: &Cli) -> Result<zeroize::Zeroizing<[u8; 32]>, Failure> {
    let pin = crate::user_pin(cli)?;
    let pkcs11 = hsm::load_module(&cli.module)?;
    let slot = hsm::find_token(&pkcs11, &crate::selector(cli)?)?;
    let session = pkcs11.open_ro_session(slot).map_err(HsmError::from)?;
    hsm::login(&session, &pin)?;
    crate::store_state_key(&session)
}

fn open(
    config: &Config,
    side: &Side,
    key: &zeroize::Zeroizing<[u8; 32]>,
) -> Result<std::sync::Arc<dyn Store>, Failure> {
    if let Side::Sled(path) = side
        && !path.exists()
    {
        return Err(Failure::Local(format!("{} does not exist", path.display())));
    }
    store::open(
        &settings(&config.store, side),
        config.limits.max_value_bytes,
        StateKey::new(key),
    )
    .map_err(|e| Failure::Token(format!("{side}: {e}")))
}

/// Runs `store migrate`.
pub(crate) fn run(cli: &Cli, config: &Path, from: &Side, to: &Side) -> Result<(), Failure> {
    let config = Config::load(config).map_err(|e| Failure::Local(e.to_string()))?;
    let key = state_key(cli)?;
    let source = open(&config, from, &key)?;
    let target = open(&config, to, &key)?;
    let bar = if cli.format == Format::Table {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {pos} keys copied ({per_sec})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let stop_after = test_stop_after();
    let report =
        store::migrate::migrate(source.as_ref(), target.as_ref(), &from.to_string(), |n| {
            bar.set_position(n);
            if stop_after.is_some_and(|s| n >= s) {
                // Test-only: stop here, as a crash would, leaving the target half-migrated.
                std::process::exit(3);
            }
        })
        .map_err(|e| Failure::Token(e.to_string()))?;
    bar.finish_and_clear();
    if cli.format == Format::Json {
        println!(
            "{}",
            json!({
                "keys": report.keys,
                "store_id": report.state.store_id,
                "epoch": report.state.epoch,
                "verified": true,
            })
        );
    } else {
        println!(
            "copied {} keys from {from} to {to}; verified: the same keys, identity (store {}) and epoch ({}), and the records add up to the commitment",
            report.keys, report.state.store_id, report.state.epoch
        );
        println!("next: point [store] in the configuration at {to} and start strongroomd");
    }
    Ok(())
}

/// `STRONGROOM_TEST_MIGRATE_STOP_AFTER=N`: stop after N keys, in debug builds only (the
/// tests' way to leave a half-migrated target).
fn test_stop_after() -> Option<u64> {
    if !cfg!(debug_assertions) {
        return None;
    }
    std::env::var("STRONGROOM_TEST_MIGRATE_STOP_AFTER")
        .ok()?
        .parse()
        .ok()
}
