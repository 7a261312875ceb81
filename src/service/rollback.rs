//! Rollback detection: the store counts its writes (its epoch, bumped in the same atomic
//! batch as each write), and the service records that count in a private token data object
//! at most a second after it changes and at shutdown. A store whose files were replaced by
//! an older copy has a lower epoch than the token remembers: the service then serves no
//! secret and tells officers, who must accept the store's state under dual control.
//!
//! Writes in the last second before a copy was taken can be rolled back undetected; that
//! window is the price of not writing the token on every request.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{State, blocking};
use crate::error::Error;
use crate::hsm::keys::STORE_CHECKPOINT_LABEL;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoreCheckpoint {
    store_id: String,
    epoch: u64,
}

/// Compares the store with the token's checkpoint; flags a rollback or a replaced store.
pub(crate) async fn check(state: &State) -> Result<(), Error> {
    let (store_id, epoch) = blocking(state, |s| s.epoch()).await?;
    let recorded = state
        .hsm
        .read_data(STORE_CHECKPOINT_LABEL)
        .await?
        .and_then(|v| serde_json::from_slice::<StoreCheckpoint>(&v).ok());
    let problem = match recorded {
        None => None,
        Some(cp) if cp.store_id != store_id => Some(format!(
            "the token last recorded store {} at epoch {}, but this is store {store_id}: the store was replaced",
            cp.store_id, cp.epoch
        )),
        Some(cp) if cp.epoch > epoch => Some(format!(
            "the store is at epoch {epoch} but the token recorded epoch {}: the store's files were rolled back to an older copy",
            cp.epoch
        )),
        Some(_) => None,
    };
    if let Some(p) = &problem {
        tracing::error!(
            "{p}; serving no secrets until officers accept the store's state (strongroom-admin store accept)"
        );
    }
    if let Ok(mut r) = state.rollback.write() {
        *r = problem;
    }
    Ok(())
}

/// The refusal while a rollback is flagged.
pub(crate) fn ensure_trusted(state: &State) -> Result<(), Error> {
    match state.rollback.read().ok().and_then(|r| r.clone()) {
        Some(p) => Err(Error::FailedPrecondition(format!(
            "the store failed its rollback check ({p}); officers must review it"
        ))),
        None => Ok(()),
    }
}

/// Records the store's current epoch in the token (not while a rollback is flagged).
pub(crate) async fn record(state: &State) -> Result<u64, Error> {
    if ensure_trusted(state).is_err() {
        return Ok(0);
    }
    // Read the epoch, then make it durable, so the token never remembers a write the store
    // could lose in a crash (which would look like a rollback).
    let (store_id, epoch) = blocking(state, |s| {
        let e = s.epoch()?;
        s.sync()?;
        Ok(e)
    })
    .await?;
    let value = serde_json::to_vec(&StoreCheckpoint { store_id, epoch })
        .map_err(|e| Error::Internal(e.to_string()))?;
    state.hsm.write_data(STORE_CHECKPOINT_LABEL, value).await?;
    Ok(epoch)
}

/// Officers accepted the store as it is: clear the flag and record the current epoch.
pub(crate) async fn accept(state: &State) -> Result<u64, Error> {
    if let Ok(mut r) = state.rollback.write() {
        *r = None;
    }
    record(state).await
}

/// Records the epoch at most every second while it changes.
pub(crate) async fn watch(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = None;
    loop {
        tick.tick().await;
        let current = blocking(&state, |s| s.epoch()).await.ok().map(|(_, e)| e);
        if current.is_some() && current != last {
            match record(&state).await {
                Ok(_) => last = current,
                Err(e) => tracing::warn!(error = %e, "cannot record the store epoch in the token"),
            }
        }
    }
}
