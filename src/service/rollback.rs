//! Rollback detection: the store counts its writes (its epoch) and keeps a commitment to its
//! whole state (a keyed multiset hash over every head, version, policy, approval and piece of
//! bookkeeping, `store::StateKey`), both updated in the same atomic batch as each write. The
//! service records `{store id, epoch, commitment}` in a private token data object at most a
//! second after it changes and at shutdown.
//!
//! At start, the store fails its check when: it is another store; its epoch is below the
//! token's (an older copy); its epoch equals the token's but its commitment does not; its
//! epoch and commitment do not authenticate (edited); or a scan of every record does not
//! add up to the commitment it keeps (one record put back, lost or added outside the
//! service). The scan is repeated every `store.verify_interval_secs`. On a failure the
//! service serves no secret and tells officers, who must accept the store's state under
//! dual control, which re-bases the commitment on the records as they are.
//!
//! Writes in the last second before a copy was taken can be rolled back undetected; that
//! window is the price of not writing the token on every request.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{State, blocking};
use crate::error::Error;
use crate::hsm::keys::{MacKey, STORE_CHECKPOINT_LABEL};
use crate::hsm::{Hsm, HsmError};
use crate::store::{Commitment, FrameStatus, STATE_KEY_DOMAIN, StateKey};

/// The problem a failed scan reports.
pub(crate) const MISMATCH: &str = "the store's state does not match its commitment: records were added, removed or replaced outside the service";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoreCheckpoint {
    store_id: String,
    epoch: u64,
    /// Hex; absent in checkpoints written before state commitments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    commitment: Option<String>,
}

/// Derives the key the store commits its records under: one MAC under the token's store key
/// (as the page-token key is), so it never leaves the process and survives restarts.
pub(crate) async fn state_key(hsm: &Hsm, timeout: Duration) -> Result<StateKey, HsmError> {
    let key = crate::hsm::keys::derive_key(hsm, MacKey::Store, STATE_KEY_DOMAIN, timeout).await?;
    Ok(StateKey::new(&key))
}

/// Compares the store with the token's checkpoint and its records with its commitment;
/// flags a rollback, a replaced store or records changed outside the service.
pub(crate) async fn check(state: &State) -> Result<(), Error> {
    let st = blocking(state, |s| s.state()).await?;
    let recorded = state
        .hsm
        .read_data(STORE_CHECKPOINT_LABEL)
        .await?
        .and_then(|v| serde_json::from_slice::<StoreCheckpoint>(&v).ok());
    let token_commitment = recorded
        .as_ref()
        .and_then(|cp| cp.commitment.as_deref())
        .map(|c| Commitment::from_hex(c).unwrap_or(Commitment([0xff; 32])));
    let mut problems = Vec::new();
    match &recorded {
        None => {}
        Some(cp) if cp.store_id != st.store_id => problems.push(format!(
            "the token last recorded store {} at epoch {}, but this is store {}: the store was replaced",
            cp.store_id, cp.epoch, st.store_id
        )),
        Some(cp) if cp.epoch > st.epoch => problems.push(format!(
            "the store is at epoch {} but the token recorded epoch {}: the store's files were rolled back to an older copy",
            st.epoch, cp.epoch
        )),
        Some(cp) if cp.epoch == st.epoch && token_commitment.is_some_and(|c| c != st.commitment) => {
            problems.push(format!(
                "the store is at the epoch the token recorded ({}) but its commitment is not the token's: records were put back or replaced outside the service",
                st.epoch
            ))
        }
        Some(_) => {}
    }
    match st.frame {
        FrameStatus::Valid => {}
        // A store from before state commitments, on a token that never recorded one: commit
        // to the store as it is (the same trust the epoch alone gave).
        FrameStatus::Missing if token_commitment.is_none() && problems.is_empty() => {
            let now = blocking(state, |s| s.rebase_state()).await?;
            tracing::info!(
                epoch = now.epoch,
                "the store had no state commitment yet: committed to its current records"
            );
        }
        FrameStatus::Missing => problems.push(
            "the store's state commitment is missing: it was removed outside the service".into(),
        ),
        FrameStatus::Forged => problems.push(
            "the store's epoch and state commitment fail authentication: edited outside the service, or written under another token"
                .into(),
        ),
    }
    match blocking(state, |s| s.verify_state()).await {
        Ok(c) if c.matches() => {
            tracing::info!(
                records = c.records,
                "the store's records match its commitment"
            );
        }
        Ok(_) => problems.push(MISMATCH.into()),
        Err(e) => problems.push(format!("the store's state could not be verified: {e}")),
    }
    let problem = (!problems.is_empty()).then(|| problems.join("; "));
    if let Some(p) = &problem {
        flag(state, p);
    }
    if let Ok(mut r) = state.rollback.write() {
        *r = problem;
    }
    Ok(())
}

fn flag(state: &State, problem: &str) {
    tracing::error!(
        "{problem}; serving no secrets until officers accept the store's state (strongroom-admin store accept)"
    );
    if let Ok(mut r) = state.rollback.write()
        && r.is_none()
    {
        *r = Some(problem.to_owned());
    }
}

/// Whether the token holds a checkpoint of a store (any start but the first).
pub(crate) async fn token_recorded(state: &State) -> Result<bool, Error> {
    Ok(state.hsm.read_data(STORE_CHECKPOINT_LABEL).await?.is_some())
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

/// Records the store's current epoch and commitment in the token (not while a rollback is
/// flagged).
pub(crate) async fn record(state: &State) -> Result<u64, Error> {
    if ensure_trusted(state).is_err() {
        return Ok(0);
    }
    // Read the state, then make it durable, so the token never remembers a write the store
    // could lose in a crash (which would look like a rollback).
    let st = blocking(state, |s| {
        let st = s.state()?;
        s.sync()?;
        Ok(st)
    })
    .await?;
    if st.frame != FrameStatus::Valid {
        // Only reachable if the frame broke after the start check: never record it.
        return Err(Error::Internal(
            "the store's state commitment does not authenticate; not recording it".into(),
        ));
    }
    let value = serde_json::to_vec(&StoreCheckpoint {
        store_id: st.store_id,
        epoch: st.epoch,
        commitment: Some(st.commitment.to_hex()),
    })
    .map_err(|e| Error::Internal(e.to_string()))?;
    state.hsm.write_data(STORE_CHECKPOINT_LABEL, value).await?;
    Ok(st.epoch)
}

/// Officers accepted the store as it is: commit to its records as they are now, clear the
/// flag and record the new state in the token.
pub(crate) async fn accept(state: &State) -> Result<u64, Error> {
    let st = blocking(state, |s| s.rebase_state()).await?;
    tracing::warn!(
        epoch = st.epoch,
        "officers accepted the store's state: its commitment is re-based on the records as they are"
    );
    if let Ok(mut r) = state.rollback.write() {
        *r = None;
    }
    record(state).await
}

/// Scans the store once and flags it if its records do not match its commitment.
pub(crate) async fn verify(state: &State) {
    if ensure_trusted(state).is_err() {
        return;
    }
    match blocking(state, |s| s.verify_state()).await {
        Ok(c) if c.matches() => {
            tracing::info!(
                records = c.records,
                "the store's records match its commitment"
            );
        }
        Ok(_) => {
            flag(state, MISMATCH);
            super::update_health(state).await;
        }
        Err(e) => tracing::warn!(error = %e, "cannot verify the store's state now; will try again"),
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Records the epoch at most every second while it changes, and verifies the store's
/// records every `state.store_verify` (never when zero).
pub(crate) async fn watch(state: Arc<State>) {
    let _verifier = (!state.store_verify.is_zero()).then(|| {
        let state = state.clone();
        AbortOnDrop(tokio::spawn(async move {
            let every = state.store_verify;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                verify(&state).await;
            }
        }))
    });
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
