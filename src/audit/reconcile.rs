//! Pairing the intents of changes with their outcomes, and telling for an intent left
//! without one (a crash between the two) whether its change is in the store.
//!
//! Every change to the store is written ahead: an `intent` entry, durable before the store
//! commit, names the change (its `change` id, the operation, the name, and what identifies
//! it once written: the version and a digest of the record for PutSecret, the approval for
//! PutPolicy, the next master key version for RotateMasterKey, the epoch before it for
//! AcceptStoreState); an `outcome` entry with the same id follows the commit (`committed`,
//! `failed`, or `unknown` when the store answered with an error). An intent is *settled* by
//! a `committed` or `failed` outcome. At start, strongroomd settles every unsettled intent
//! of its log by looking in the store ([`presence`]) and writing a `Reconcile` outcome that
//! says what it found, before it serves anything; `strongroom-admin audit reconcile` reports
//! the unsettled intents of logs offline.

use std::collections::HashMap;
use std::io::BufRead;

use prost::Message;
use serde::Serialize;

use super::Entry;
use crate::proto::PolicyRecordV1;
use crate::secret::{SealedRecord, SecretName};
use crate::store::{FrameStatus, Store, StoreError};

/// The operation of the outcome entries that reconciliation writes.
pub const RECONCILE: &str = "Reconcile";

/// What pairing a log's intents with their outcomes found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pairing {
    /// Intents read.
    pub intents: u64,
    /// Outcomes read (reconciliation's included).
    pub outcomes: u64,
    /// Intents settled by a `committed` or `failed` outcome.
    pub settled: u64,
    /// Intents with no outcome, or only `unknown` ones, in log order.
    pub unsettled: Vec<Entry>,
}

/// Pairs the intents of `entries` (one log, or several in order) with their outcomes.
pub fn pair(entries: impl IntoIterator<Item = Entry>) -> Pairing {
    let mut pairing = Pairing::default();
    // Intents not settled yet, by change id, with their position for the report's order.
    let mut open: HashMap<String, (u64, Entry)> = HashMap::new();
    let mut position = 0u64;
    for e in entries {
        position += 1;
        let (Some(phase), Some(change)) = (e.phase.as_deref(), e.change.as_deref()) else {
            continue;
        };
        match phase {
            "intent" => {
                pairing.intents += 1;
                open.insert(change.to_owned(), (position, e));
            }
            "outcome" => {
                pairing.outcomes += 1;
                let settles = matches!(e.outcome.as_deref(), Some("committed" | "failed"));
                if settles && open.remove(change).is_some() {
                    pairing.settled += 1;
                }
            }
            _ => {}
        }
    }
    let mut unsettled: Vec<(u64, Entry)> = open.into_values().collect();
    unsettled.sort_by_key(|(at, _)| *at);
    pairing.unsettled = unsettled.into_iter().map(|(_, e)| e).collect();
    pairing
}

/// Pairs the intents of the log `reader` reads (lines that carry no change are skipped
/// before they are parsed).
pub fn pair_log(reader: impl BufRead) -> Pairing {
    pair(reader.lines().map_while(Result::ok).filter_map(|l| {
        if !l.contains("\"phase\":") {
            return None;
        }
        super::split_line(&l).and_then(|(body, _)| serde_json::from_str::<Entry>(&body).ok())
    }))
}

/// Whether an intended change is in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// The store (or the token) holds the change.
    InStore,
    /// It does not.
    NotInStore,
    /// The intent does not say enough to tell.
    Unknown,
}

impl Presence {
    /// The outcome a reconciliation records for it.
    pub fn outcome(self) -> super::Outcome {
        match self {
            Presence::InStore => super::Outcome::Committed,
            Presence::NotInStore => super::Outcome::Failed,
            Presence::Unknown => super::Outcome::Unknown,
        }
    }
}

/// What reconciliation looks at.
pub struct Probe<'a> {
    /// The store the service writes.
    pub store: &'a dyn Store,
    /// The master key versions the token holds (for RotateMasterKey), if known.
    pub master_keys: Option<&'a [u32]>,
}

/// Whether the change `intent` names is in the store, and why, in words.
pub fn presence(intent: &Entry, probe: &Probe<'_>) -> Result<(Presence, String), StoreError> {
    let name = intent.name.as_deref().unwrap_or("");
    let secret = || SecretName::parse(name, usize::MAX).ok();
    let unknown = |why: &str| Ok((Presence::Unknown, why.to_owned()));
    let found = |present: bool, yes: String, no: String| {
        Ok(if present {
            (Presence::InStore, yes)
        } else {
            (Presence::NotInStore, no)
        })
    };
    match intent.operation.as_str() {
        "PutSecret" => {
            let (Some(n), Some(v)) = (secret(), intent.version) else {
                return unknown("the intent names no secret version");
            };
            let record = probe.store.get(&n, v)?;
            let written = record
                .as_ref()
                .is_some_and(|r| intent.fingerprint.as_deref() == Some(&*record_fingerprint(r)));
            found(
                written,
                format!("{name} v{v} is in the store, the record the intent named"),
                match record {
                    Some(_) => format!("{name} v{v} is in the store but is another record"),
                    None => format!("{name} v{v} is not in the store"),
                },
            )
        }
        "DeleteSecret" | "DestroySecret" => {
            let Some(n) = secret() else {
                return unknown("the intent names no secret");
            };
            let gone = probe.store.head(&n)?.is_none_or(|h| h.deleted);
            found(
                gone,
                format!("{name} has no live version in the store"),
                format!("{name} still has live versions in the store"),
            )
        }
        "PutPolicy" => {
            let Some(approval) = intent.fingerprint.as_deref() else {
                return unknown("the intent names no approval");
            };
            let record = probe
                .store
                .aux_get(crate::store::Aux::Policy, name)?
                .and_then(|b| PolicyRecordV1::decode(b.as_slice()).ok());
            found(
                record.as_ref().is_some_and(|r| r.approval_id == approval),
                format!("policy {name} is stored by approval {approval}"),
                format!("policy {name} in the store is not the one approval {approval} wrote"),
            )
        }
        "DeletePolicy" => {
            let gone = probe
                .store
                .aux_get(crate::store::Aux::Policy, name)?
                .is_none();
            found(
                gone,
                format!("policy {name} is not in the store"),
                format!("policy {name} is still in the store"),
            )
        }
        "RotateMasterKey" => {
            let (Some(keys), Some(v)) = (probe.master_keys, intent.version) else {
                return unknown("the token's master keys were not read");
            };
            found(
                keys.contains(&u32::try_from(v).unwrap_or(u32::MAX)),
                format!("the token holds master key version {v}"),
                format!("the token holds no master key version {v}"),
            )
        }
        "AcceptStoreState" => {
            let Some(before) = intent.version else {
                return unknown("the intent names no epoch");
            };
            let st = probe.store.state()?;
            let rebased = st.epoch > before
                && st.frame == FrameStatus::Valid
                && probe.store.verify_state()?.matches();
            found(
                rebased,
                format!(
                    "the store is at epoch {} (the intent's was {before}) and its records match its commitment",
                    st.epoch
                ),
                format!(
                    "the store's commitment was not re-based (epoch {}, the intent's was {before})",
                    st.epoch
                ),
            )
        }
        other => Ok((
            Presence::Unknown,
            format!("no store check is known for {other}"),
        )),
    }
}

/// What identifies a sealed record in a PutSecret intent: the first 16 bytes of the SHA-256
/// of its nonce and ciphertext, hex (public, and unique per seal since the nonce is).
pub fn record_fingerprint(record: &SealedRecord) -> String {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(&record.nonce);
    h.update(&record.ciphertext);
    hex::encode(&h.finish().as_ref()[..16])
}

/// At start, before anything is served: settles every unsettled intent of the log
/// `auditor` writes by looking in `store` (and at the token's `master_keys`) and appending
/// a `Reconcile` outcome that says whether the change is in the store. Returns how many it
/// settled. An intent the store cannot be asked about now is left for the next start.
pub async fn settle_at_start(
    auditor: &super::Auditor,
    store: std::sync::Arc<dyn Store>,
    master_keys: Vec<u32>,
) -> Result<u64, super::AuditError> {
    let super::Auditor::Chained(log) = auditor else {
        return Ok(0);
    };
    let path = log.path().to_owned();
    let io = |source| super::AuditError::Io {
        path: path.display().to_string(),
        source,
    };
    let found = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path)?;
            let pairing = pair_log(std::io::BufReader::new(file));
            let probe = Probe {
                store: store.as_ref(),
                master_keys: Some(&master_keys),
            };
            Ok::<_, std::io::Error>(
                pairing
                    .unsettled
                    .into_iter()
                    .map(|intent| {
                        let found = presence(&intent, &probe);
                        (intent, found)
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .await
        .map_err(|_| super::AuditError::Closed)?
        .map_err(io)?
    };
    let mut settled = 0;
    for (intent, found) in found {
        let change = intent.change.clone().unwrap_or_default();
        let (presence, why) = match found {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(change, error = %e, "cannot reconcile an intent without an outcome now (the store did not answer); the next start tries again");
                continue;
            }
        };
        let detail = reconciled_detail(&intent, presence, &why);
        tracing::warn!(change, seq = intent.seq, "{detail}");
        let event = super::AuditEvent {
            plane: "audit",
            identity: None,
            operation: RECONCILE,
            name: intent
                .name
                .as_deref()
                .map(|n| super::RecordedName::new(n, usize::MAX)),
            version: intent.version,
            status: tonic::Code::Ok,
            request_id: intent.request_id,
            detail: Some(detail),
            change: Some(super::ChangeMark::outcome(&change, presence.outcome())),
        };
        auditor.record(&event, None).await?;
        settled += 1;
    }
    Ok(settled)
}

/// A test-only fault point: in a debug build whose `STRONGROOM_DEBUG_HALT_AT` names `at`,
/// the request stops here for good (logging that it did), so that a test can kill the
/// process at exactly this point of a write. Does nothing in release builds.
pub async fn halt_point(at: &str) {
    if !cfg!(debug_assertions) {
        return;
    }
    static HALT_AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = HALT_AT.get_or_init(|| std::env::var("STRONGROOM_DEBUG_HALT_AT").ok());
    if armed.as_deref() == Some(at) {
        tracing::warn!(point = at, "halted at a debug fault point");
        std::future::pending::<()>().await;
    }
}

/// The words a reconciliation outcome records for `intent`.
pub fn reconciled_detail(intent: &Entry, presence: Presence, why: &str) -> String {
    let verdict = match presence {
        Presence::InStore => "the change is in the store",
        Presence::NotInStore => "the change is not in the store",
        Presence::Unknown => "whether the change is in the store is not known",
    };
    format!(
        "intent seq {} ({} by {}) had no outcome: {verdict}: {why}",
        intent.seq,
        intent.operation,
        intent.identity.as_deref().unwrap_or("-")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, phase: &str, change: &str, outcome: Option<&str>) -> Entry {
        Entry {
            seq,
            ts_ms: 0,
            plane: "client".into(),
            identity: None,
            operation: "PutSecret".into(),
            name: Some("a/b".into()),
            name_len: None,
            name_sha256: None,
            name_truncated: None,
            version: Some(1),
            decision: "allow".into(),
            status: "Ok".into(),
            request_id: seq,
            detail: None,
            phase: Some(phase.into()),
            change: Some(change.into()),
            outcome: outcome.map(str::to_owned),
            fingerprint: None,
        }
    }

    #[test]
    fn intents_pair_with_settling_outcomes_only() {
        let p = pair(vec![
            entry(0, "intent", "x-1", None),
            entry(1, "intent", "x-2", None),
            entry(2, "intent", "x-3", None),
            entry(3, "outcome", "x-2", Some("committed")),
            entry(4, "outcome", "x-3", Some("unknown")),
            entry(5, "outcome", "x-9", Some("failed")),
            entry(6, "intent", "x-4", None),
            entry(7, "outcome", "x-4", Some("failed")),
        ]);
        assert_eq!(p.intents, 4);
        assert_eq!(p.outcomes, 4);
        assert_eq!(p.settled, 2);
        let open: Vec<_> = p.unsettled.iter().map(|e| e.seq).collect();
        assert_eq!(open, vec![0, 2]);
    }

    #[test]
    fn entries_without_a_change_are_left_alone() {
        let mut read = entry(0, "intent", "x-1", None);
        read.phase = None;
        read.change = None;
        assert_eq!(pair(vec![read]).intents, 0);
    }
}
