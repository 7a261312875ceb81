//! The approval lifecycle: whose approvals count (officers listed in `admin.officers` now),
//! the digest of an operation and its parameters that audit entries and `approval show`
//! carry, expiry, and the purge of expired and retained approvals.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use ring::digest;
use tonic::Code;

use super::secrets::unix_now;
use super::{State, blocking, policies};
use crate::audit::AuditEvent;
use crate::error::Error;
use crate::proto::ApprovalV1;
use crate::store::Aux;

/// The domain of the parameter digest; a new encoding gets a new domain.
const PARAMS_DOMAIN: &[u8] = b"strongroom/approval-params/v1\0";
/// The audit operation of a purge run.
pub(crate) const PURGE_OPERATION: &str = "PurgeApprovals";
/// At most this many approval ids are named in a purge's audit entry.
const PURGE_IDS_NAMED: usize = 32;

/// SHA-256, hex, over the canonical encoding of a guarded operation and its parameters:
///
/// ```text
/// "strongroom/approval-params/v1\0"
/// u64be(len(operation)) operation
/// u64be(number of parameters)
/// for each parameter, sorted by key then value: u64be(len(key)) key u64be(len(value)) value
/// ```
///
/// Every field is length-prefixed, so no two different operations or parameter sets encode
/// alike. Officers match the digest `approval show` prints with the `params_sha256=` of the
/// audit entries; `strongroom-admin` recomputes it from the parameters it shows.
pub fn params_sha256<'a>(
    operation: &str,
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> String {
    let mut params: Vec<(&str, &str)> = params.into_iter().collect();
    params.sort_unstable();
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(PARAMS_DOMAIN);
    field(&mut ctx, operation.as_bytes());
    ctx.update(&(params.len() as u64).to_be_bytes());
    for (k, v) in params {
        field(&mut ctx, k.as_bytes());
        field(&mut ctx, v.as_bytes());
    }
    hex::encode(ctx.finish())
}

fn field(ctx: &mut digest::Context, bytes: &[u8]) {
    ctx.update(&(bytes.len() as u64).to_be_bytes());
    ctx.update(bytes);
}

/// SHA-256, hex, of one value (how `approval show` names a policy document it does not print).
pub fn value_sha256(value: &str) -> String {
    hex::encode(digest::digest(&digest::SHA256, value.as_bytes()))
}

/// The record's parameter digest: as stored, or computed for records written before it was
/// kept.
pub(crate) fn digest_of(a: &ApprovalV1) -> String {
    if a.params_sha256.is_empty() {
        params_sha256(
            &a.operation,
            a.params.iter().map(|p| (p.key.as_str(), p.value.as_str())),
        )
    } else {
        a.params_sha256.clone()
    }
}

/// One approver and whether their approval counts now.
pub(crate) struct Standing {
    pub(crate) officer: String,
    pub(crate) counts: bool,
    pub(crate) reason: String,
}

/// How an approval stands against the officers listed now.
pub(crate) struct Count {
    /// Each approver, the requester first.
    pub(crate) standing: Vec<Standing>,
    /// Approvals that count.
    pub(crate) counted: u32,
    /// Approvals needed: the quorum recorded with the request or the one configured now,
    /// whichever is higher (raising the quorum applies to pending requests; lowering it does
    /// not let them run on fewer officers than were asked for).
    pub(crate) quorum: u32,
    /// Why it cannot run however many officers approve.
    pub(crate) blocked: Option<String>,
}

impl Count {
    /// Whether the request may run now.
    pub(crate) fn reached(&self) -> bool {
        self.blocked.is_none() && self.counted >= self.quorum
    }
}

/// Counts an approval's approvers against `admin.officers` as configured now: an approval
/// given by an officer since removed does not count, and a request whose requester was
/// removed cannot run.
pub(crate) fn count(state: &State, a: &ApprovalV1) -> Count {
    let (officers, current): (&[String], u32) = match &state.admin {
        Some(admin) => (&admin.officers, admin.effective_quorum()),
        None => (&[], u32::MAX),
    };
    let listed = |o: &str| officers.iter().any(|x| x == o);
    let standing: Vec<Standing> = a
        .approvers
        .iter()
        .map(|o| {
            let counts = listed(o);
            Standing {
                officer: o.clone(),
                counts,
                reason: if counts {
                    String::new()
                } else {
                    "not listed in admin.officers now: removed since it approved".into()
                },
            }
        })
        .collect();
    let counted = standing.iter().filter(|s| s.counts).count();
    let blocked = (!listed(&a.requester)).then(|| {
        format!(
            "its requester {} is not listed in admin.officers now: the request cannot run; an officer may request it again",
            a.requester
        )
    });
    Count {
        standing,
        counted: u32::try_from(counted).unwrap_or(u32::MAX),
        quorum: a.quorum.max(current),
        blocked,
    }
}

/// Whether a pending approval has passed its expiry.
pub(crate) fn expired(a: &ApprovalV1, now: i64) -> bool {
    // Times are whole seconds: `>` (not `>=`) so that a pending approval lives at least its
    // whole time to live (with `>=`, one made late in a second could expire a moment later).
    a.state == "pending" && now > a.expires_at_unix
}

/// The refusal of an expired approval: when it expired.
pub(crate) fn expired_error(a: &ApprovalV1, now: i64) -> Error {
    Error::FailedPrecondition(format!(
        "approval {} expired at {} ({}s ago; pending approvals wait admin.approval_ttl_secs): request the operation again",
        a.id,
        crate::when::rfc3339(a.expires_at_unix),
        now.saturating_sub(a.expires_at_unix)
    ))
}

/// A pending, unexpired request for the same operation and parameters that can still run,
/// if there is one: a second request is refused in its favour.
pub(crate) async fn pending_duplicate(
    state: &State,
    digest: &str,
    now: i64,
) -> Result<Option<ApprovalV1>, Error> {
    Ok(policies::list_approvals(state)
        .await?
        .into_iter()
        .find(|a| {
            a.state == "pending"
                && !expired(a, now)
                && digest_of(a) == digest
                && count(state, a).blocked.is_none()
        }))
}

/// What one purge run found and removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PurgeSummary {
    /// Approvals examined.
    pub(crate) examined: u64,
    /// Approvals past their expiry (pending, or already marked expired) removed.
    pub(crate) expired: u64,
    /// Executed, failed and rejected approvals past `admin.approval_retention_secs` removed.
    pub(crate) finished: u64,
    /// Records that fail authentication, left in place as evidence (status and the store's
    /// state check report them).
    pub(crate) unauthentic: u64,
    /// Set when the run removed nothing on purpose: why.
    pub(crate) skipped: Option<String>,
}

impl PurgeSummary {
    /// Records removed by this run.
    pub(crate) fn removed(&self) -> u64 {
        self.expired + self.finished
    }
}

/// Removes expired approvals and finished ones past their retention, in one run.
///
/// Self-contained and idempotent: it reads the approvals, picks those to remove by their own
/// timestamps and the configuration, records one audit entry naming them (before removing
/// anything, so no removal goes unaudited), then removes each one only if its record is
/// still the one it read. Two runs at once (two replicas) remove each record at most once
/// and each write their own entry; a record changed meanwhile is left for the next run.
/// Nothing is removed while the store fails its rollback check. Under `lock` (the job's
/// lock, see [`jobs::run_once`](super::jobs::run_once)) every removal is fenced: a run whose
/// lock another replica took meanwhile removes nothing more ([`Error::LostLock`]).
pub(crate) async fn purge_approvals(
    state: &State,
    lock: Option<crate::store::Lock>,
) -> Result<PurgeSummary, Error> {
    let mut summary = PurgeSummary::default();
    if let Err(e) = super::rollback::ensure_trusted(state) {
        summary.skipped = Some(e.to_string());
        return Ok(summary);
    }
    let retention = state.admin.as_ref().map_or(i64::MAX, |a| {
        i64::try_from(a.approval_retention_secs).unwrap_or(i64::MAX)
    });
    // In this process, approvals change only under the officers' lock.
    let _turn = state.admin_lock.lock().await;
    let now = unix_now();
    let all = blocking(state, |s| s.aux_list(Aux::Approval)).await?;
    let mut doomed: Vec<(String, Vec<u8>, bool)> = Vec::new();
    for (key, bytes) in all {
        summary.examined += 1;
        let rec = match ApprovalV1::decode(bytes.as_slice()) {
            Ok(rec) if policies::approval_authentic(state, &key, &rec).await? => rec,
            _ => {
                summary.unauthentic += 1;
                continue;
            }
        };
        let is_expired = rec.state == "expired" || expired(&rec, now);
        let finished = matches!(rec.state.as_str(), "executed" | "failed" | "rejected") && {
            let at = if rec.finished_at_unix > 0 {
                rec.finished_at_unix
            } else {
                // Older records: they finished before their expiry at the latest.
                rec.expires_at_unix
            };
            now >= at.saturating_add(retention)
        };
        if is_expired || finished {
            doomed.push((key, bytes, is_expired));
        }
    }
    if doomed.is_empty() {
        return Ok(summary);
    }
    let expired_n = doomed.iter().filter(|d| d.2).count();
    let mut ids: Vec<&str> = doomed
        .iter()
        .take(PURGE_IDS_NAMED)
        .map(|d| d.0.as_str())
        .collect();
    let more = doomed.len().saturating_sub(ids.len());
    ids.sort_unstable();
    let detail = format!(
        "removing expired={expired_n} finished={} ids={}{}",
        doomed.len() - expired_n,
        ids.join(","),
        if more > 0 {
            format!(",+{more} more")
        } else {
            String::new()
        }
    );
    let event = AuditEvent {
        plane: "admin",
        identity: None,
        operation: PURGE_OPERATION,
        name: None,
        version: None,
        status: Code::Ok,
        request_id: 0,
        detail: Some(detail),
        change: None,
    };
    if let Err(e) = state.audit.record(&event, None).await {
        super::update_health(state).await;
        return Err(Error::Audit(e.to_string()));
    }
    for (key, bytes, is_expired) in doomed {
        let lock = lock.clone();
        let removed = blocking(state, move |s| {
            // Only the record as it was read: one changed since is left for the next run.
            match s.aux_get(Aux::Approval, &key)? {
                Some(now) if now == bytes => match &lock {
                    Some(lock) => Ok(s.aux_delete_fenced(lock, Aux::Approval, &key)?),
                    None => s.aux_delete(Aux::Approval, &key).map(Ok),
                },
                _ => Ok(Ok(false)),
            }
        })
        .await?
        .map_err(super::jobs::lost_lock)?;
        if removed && is_expired {
            summary.expired += 1;
        } else if removed {
            summary.finished += 1;
        }
    }
    Ok(summary)
}

/// The periodic purge: every `admin.approval_purge_interval_secs`, from the start. Spawned
/// by [`super::Server::run`] beside the service's other periodic tasks.
/// The purge's once-only job (its lock: `…locks/job/approval-purge`).
const PURGE_JOB: &str = "approval-purge";

pub(crate) async fn purge_task(state: Arc<State>) {
    let Some(admin) = &state.admin else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(
        admin.approval_purge_interval_secs.max(1),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Once at a time across replicas: under the job's lock, every removal fenced.
        let run = super::jobs::run_once(&state, PURGE_JOB, |held| {
            purge_approvals(&state, Some(held.lock.clone()))
        })
        .await;
        match run {
            Ok(None) => tracing::debug!("the approval purge runs on another replica"),
            Ok(Some(s)) if s.removed() > 0 => tracing::info!(
                expired = s.expired,
                finished = s.finished,
                examined = s.examined,
                "approvals purged"
            ),
            Ok(Some(s)) => {
                if let Some(why) = s.skipped {
                    tracing::debug!(reason = %why, "approval purge skipped");
                }
            }
            Err(e) => tracing::warn!(error = %e, "approval purge failed; will try again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_canonical_and_separates_fields() {
        let a = params_sha256("PutPolicy", [("name", "hr"), ("document", "x")]);
        // Order of the parameters does not matter.
        assert_eq!(
            a,
            params_sha256("PutPolicy", [("document", "x"), ("name", "hr")])
        );
        // Moving bytes between fields changes it.
        assert_ne!(
            a,
            params_sha256("PutPolicy", [("name", "hrx"), ("document", "")])
        );
        assert_ne!(
            a,
            params_sha256("DeletePolicy", [("name", "hr"), ("document", "x")])
        );
        assert_ne!(
            params_sha256("RotateMasterKey", []),
            params_sha256("AcceptStoreState", [])
        );
        // A known answer, so the encoding cannot drift silently (README documents it).
        assert_eq!(
            params_sha256("DestroySecret", [("name", "payments/a")]),
            hex::encode(digest::digest(
                &digest::SHA256,
                &[
                    PARAMS_DOMAIN,
                    &13u64.to_be_bytes(),
                    b"DestroySecret",
                    &1u64.to_be_bytes(),
                    &4u64.to_be_bytes(),
                    b"name",
                    &10u64.to_be_bytes(),
                    b"payments/a",
                ]
                .concat()
            ))
        );
    }
}
