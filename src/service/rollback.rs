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
//! service). The scan and the comparison with the token are repeated every
//! `store.verify_interval_secs`. On a failure the service serves no secret and tells
//! officers, who must accept the store's state under dual control, which re-bases the
//! commitment on the records as they are.
//!
//! Writes in the last second before a copy was taken can be rolled back undetected; that
//! window is the price of not writing the token on every request.
//!
//! # Several replicas
//!
//! Replicas that share one etcd store and one token each record their own checkpoint, in
//! a data object labelled `strongroom-store-checkpoint@<replica id>`
//! ([`replica_label`](crate::hsm::keys::replica_label); a single node keeps the bare label,
//! so its token keeps working), and never write another's. The checks read *every*
//! replica's checkpoint: the private strongroom data objects (CKA_APPLICATION `strongroom`)
//! whose label is the base label or starts with `base@` ([`crate::hsm::keys::list_data`]),
//! so a replica that stopped long ago still counts. The store must be the store each
//! names, at an epoch at least the newest one's, and with the commitment of any checkpoint
//! taken at its very epoch.
//!
//! Why several writers raise no false alarm. etcd orders every write: each one moves the
//! epoch by one in a transaction that compares the frame's revisions, so the epoch is one
//! counter for the whole cluster, it only grows, and one epoch names one state. A replica
//! records a checkpoint only after reading that state from the store (a linearizable read),
//! so every checkpoint describes a state the store has already been in. A check reads the
//! token's checkpoints *first* and the store's state *after*: whatever other replicas wrote
//! meanwhile only moves the store's epoch further ahead of the checkpoints that check read,
//! and a checkpoint at the store's very epoch was taken with no write since, so its
//! commitment is the store's. The other order (store, then token) would let a replica
//! record a newer epoch between the two reads and look like a rollback. [`read_in_order`]
//! holds the order; its unit test lets another replica write and record before each read
//! (and fails with the reads swapped), and the integration test
//! `replicas::two_replicas_write_at_once_without_a_false_rollback` writes through two real
//! replicas at once across both checks. A checkpoint only moves forward: a replica never
//! records an epoch below the one it recorded for the same store.
//!
//! When officers accept a store's state, the replica that runs the acceptance removes every
//! replica's checkpoint (they describe a state the officers have set aside) and records its
//! own; the others record theirs again as the store moves on. A replica that flagged the
//! store keeps refusing until it is accepted there too or restarted.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{State, blocking};
use crate::error::Error;
use crate::hsm::keys::{MacKey, STORE_CHECKPOINT_LABEL};
use crate::hsm::{Hsm, HsmError};
use crate::store::{Commitment, FrameStatus, STATE_KEY_DOMAIN, StateKey, StoreState};

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

/// Every replica's store checkpoint in the token, by label.
async fn recorded(state: &State) -> Result<Vec<(String, StoreCheckpoint)>, Error> {
    Ok(state
        .hsm
        .list_data(STORE_CHECKPOINT_LABEL)
        .await?
        .into_iter()
        .filter_map(|(label, v)| {
            serde_json::from_slice::<StoreCheckpoint>(&v)
                .ok()
                .map(|cp| (label, cp))
        })
        .collect())
}

/// Reads the token's checkpoints, *then* the store's state (futures do nothing until
/// awaited, so this order is the order of the reads): what other replicas write meanwhile
/// only moves the store ahead of the checkpoints read (see the module doc).
async fn read_in_order<T, S>(
    token: T,
    store: S,
) -> Result<(Vec<(String, StoreCheckpoint)>, StoreState), Error>
where
    T: Future<Output = Result<Vec<(String, StoreCheckpoint)>, Error>>,
    S: Future<Output = Result<StoreState, Error>>,
{
    let checkpoints = token.await?;
    let state = store.await?;
    Ok((checkpoints, state))
}

/// What is wrong with the store's state `st` against the token's checkpoints (read before
/// `st`, see the module doc): nothing when each names this store, none is ahead of it, and
/// those at its epoch have its commitment.
fn compare(st: &StoreState, checkpoints: &[(String, StoreCheckpoint)]) -> Vec<String> {
    let mut problems = Vec::new();
    let whose = |label: &str| match label.split_once('@') {
        Some((_, replica)) => format!("replica {replica}'s checkpoint"),
        None => "the token".to_owned(),
    };
    for (label, cp) in checkpoints {
        let token_commitment = cp
            .commitment
            .as_deref()
            .map(|c| Commitment::from_hex(c).unwrap_or(Commitment([0xff; 32])));
        if cp.store_id != st.store_id {
            problems.push(format!(
                "{} last recorded store {} at epoch {}, but this is store {}: the store was replaced",
                whose(label),
                cp.store_id,
                cp.epoch,
                st.store_id
            ));
        } else if cp.epoch > st.epoch {
            problems.push(format!(
                "the store is at epoch {} but {} recorded epoch {}: the store's files were rolled back to an older copy",
                st.epoch,
                whose(label),
                cp.epoch
            ));
        } else if cp.epoch == st.epoch && token_commitment.is_some_and(|c| c != st.commitment) {
            problems.push(format!(
                "the store is at the epoch {} recorded ({}) but its commitment is not the one recorded: records were put back or replaced outside the service",
                whose(label),
                st.epoch
            ));
        }
    }
    problems
}

/// Compares the store with the token's checkpoints and its records with its commitment;
/// flags a rollback, a replaced store or records changed outside the service.
pub(crate) async fn check(state: &State) -> Result<(), Error> {
    let (checkpoints, st) = read_in_order(recorded(state), blocking(state, |s| s.state())).await?;
    let token_commitment = checkpoints
        .iter()
        .find_map(|(_, cp)| cp.commitment.as_deref());
    let mut problems = compare(&st, &checkpoints);
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

/// Whether the token holds a checkpoint of a store, any replica's (any start but the
/// first).
pub(crate) async fn token_recorded(state: &State) -> Result<bool, Error> {
    Ok(!recorded(state).await?.is_empty())
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
    let label = state.store_checkpoint_label();
    // Only forward: never below what this replica recorded for the same store.
    if let Some(mine) = state
        .hsm
        .read_data(label.clone())
        .await?
        .and_then(|v| serde_json::from_slice::<StoreCheckpoint>(&v).ok())
        && mine.store_id == st.store_id
        && mine.epoch >= st.epoch
    {
        return Ok(mine.epoch);
    }
    let value = serde_json::to_vec(&StoreCheckpoint {
        store_id: st.store_id,
        epoch: st.epoch,
        commitment: Some(st.commitment.to_hex()),
    })
    .map_err(|e| Error::Internal(e.to_string()))?;
    state.hsm.write_data(label, value).await?;
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
    // Every checkpoint describes a state the officers have set aside (see the module doc).
    for (label, _) in recorded(state).await? {
        state.hsm.delete_data(label).await?;
    }
    if let Ok(mut r) = state.rollback.write() {
        *r = None;
    }
    record(state).await
}

/// Compares the store with every replica's checkpoint in the token, then scans it once;
/// flags it if it is behind a checkpoint or its records do not match its commitment.
pub(crate) async fn verify(state: &State) {
    if ensure_trusted(state).is_err() {
        return;
    }
    let compared = read_in_order(recorded(state), blocking(state, |s| s.state()))
        .await
        .map(|(checkpoints, st)| compare(&st, &checkpoints));
    match compared {
        Ok(problems) if problems.is_empty() => {}
        Ok(problems) => {
            flag(state, &problems.join("; "));
            super::update_health(state).await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot compare the store with the token's checkpoints now; will try again");
        }
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

/// Records the epoch at most every second while it changes, and verifies the store's
/// records every `state.store_verify` (never when zero).
pub(crate) async fn watch(state: Arc<State>) {
    let _verifier = (!state.store_verify.is_zero()).then(|| {
        let state = state.clone();
        super::AbortOnDrop(tokio::spawn(async move {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn st(epoch: u64, c: u8) -> StoreState {
        StoreState {
            store_id: "s".into(),
            epoch,
            commitment: Commitment([c; 32]),
            frame: FrameStatus::Valid,
        }
    }

    fn cp(label: &str, store: &str, epoch: u64, c: u8) -> (String, StoreCheckpoint) {
        (
            label.into(),
            StoreCheckpoint {
                store_id: store.into(),
                epoch,
                commitment: Some(Commitment([c; 32]).to_hex()),
            },
        )
    }

    /// Another replica that writes once and records its checkpoint before each of our
    /// reads lands: the worst interleaving for the check.
    struct Busy {
        epoch: u64,
        token: Vec<(String, StoreCheckpoint)>,
    }

    impl Busy {
        fn other_writes_and_records(&mut self) {
            self.epoch += 1;
            let c = u8::try_from(self.epoch % 256).unwrap_or(0);
            self.token = vec![cp(B, "s", self.epoch, c)];
        }
    }

    #[tokio::test]
    async fn reading_the_token_before_the_store_sees_no_rollback_while_another_replica_writes() {
        let busy = std::sync::Mutex::new(Busy {
            epoch: 3,
            token: Vec::new(),
        });
        let token = async {
            let mut b = busy.lock().unwrap();
            b.other_writes_and_records();
            Ok(b.token.clone())
        };
        let store = async {
            let mut b = busy.lock().unwrap();
            b.other_writes_and_records();
            let c = u8::try_from(b.epoch % 256).unwrap_or(0);
            Ok(st(b.epoch, c))
        };
        let (checkpoints, now) = read_in_order(token, store).await.unwrap();
        assert!(compare(&now, &checkpoints).is_empty());
        // The other order, with the same interleaving, would have looked like a rollback.
        let mut b = busy.lock().unwrap();
        b.other_writes_and_records();
        let early = st(b.epoch, 0);
        b.other_writes_and_records();
        assert!(!compare(&early, &b.token).is_empty());
    }

    const A: &str = "strongroom-store-checkpoint@a";
    const B: &str = "strongroom-store-checkpoint@b";

    #[test]
    fn a_store_ahead_of_every_checkpoint_or_at_one_with_its_commitment_passes() {
        // Other replicas wrote after these checkpoints were read: the store is ahead.
        assert!(compare(&st(9, 1), &[cp(A, "s", 5, 7), cp(B, "s", 8, 8)]).is_empty());
        // At the newest one's epoch with its commitment.
        assert!(compare(&st(8, 8), &[cp(A, "s", 5, 7), cp(B, "s", 8, 8)]).is_empty());
        assert!(compare(&st(0, 0), &[]).is_empty());
    }

    #[test]
    fn a_store_behind_the_newest_checkpoint_of_any_replica_is_a_rollback() {
        let p = compare(&st(7, 1), &[cp(A, "s", 5, 7), cp(B, "s", 8, 8)]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("replica b's checkpoint recorded epoch 8"),
            "{p:?}"
        );
        assert!(p[0].contains("rolled back"), "{p:?}");
        // The single node's checkpoint counts as well.
        let p = compare(&st(7, 1), &[cp("strongroom-store-checkpoint", "s", 9, 9)]);
        assert!(p[0].contains("the token recorded epoch 9"), "{p:?}");
    }

    #[test]
    fn another_commitment_at_a_recorded_epoch_or_another_store_is_flagged() {
        let p = compare(&st(8, 1), &[cp(B, "s", 8, 8)]);
        assert!(p[0].contains("put back or replaced"), "{p:?}");
        let p = compare(&st(9, 1), &[cp(A, "s", 5, 7), cp(B, "other", 3, 3)]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("replica b's checkpoint last recorded store other"),
            "{p:?}"
        );
    }
}
