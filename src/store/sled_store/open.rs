//! Opening sled's files, with its failures and recovery panics turned into errors that name
//! the store.

use std::path::Path;

use crate::store::StoreError;

/// Opens sled, turning its failures (and the panics its recovery can raise on some damaged
/// files, e.g. "tried to serialize Uninitialized") into an error that names the store, so the
/// service exits with a message instead of a backtrace and a crash loop.
pub(super) fn open_db(path: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let fail = |reason: String| StoreError::Open {
        path: path.display().to_string(),
        reason,
    };
    // While sled recovers, a panic is a finding about the files: log it as such (the default
    // hook would print a backtrace that reads like a bug in the service) and turn it into an
    // error below. Opening happens once, at start.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(%what, "sled failed while recovering the store's files");
    }));
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
    }));
    std::panic::set_hook(previous_hook);
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(sled::Error::Io(e)))
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.to_string().contains("could not acquire lock") =>
        {
            Err(fail(format!(
                "another process holds the store (the lock on {} is taken): most likely another strongroomd with the same store.path, or strongroom-admin migrate/reconcile; stop it, or give this one its own store.path",
                path.join("db").display()
            )))
        }
        Ok(Err(e @ sled::Error::Corruption { .. })) => Err(fail(format!(
            "{e}: the store's files are damaged; restore them from a backup (the rollback check will ask officers to accept it)"
        ))),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(fail(
            "sled failed while recovering the files: they are damaged; restore them from a backup"
                .into(),
        )),
    }
}
