//! Approvals: listing, showing, approving and rejecting them, and requesting a guarded
//! operation (it waits for a quorum of distinct officers); the approvals as the API shows them.

use std::collections::HashMap;

use super::{AdminApiInner, Officer};
use crate::error::Error;
use crate::proto::{
    Approval, ApprovalParam, ApprovalV1, ApproveRequest, ApproverStanding, GetApprovalRequest,
    ListApprovalsRequest, ListApprovalsResponse, OperationResponse, RejectRequest,
};
use crate::service::approvals::{self, Count};
use crate::service::secrets::unix_now;
use crate::service::{self, policies};

pub(super) async fn list_approvals(
    this: &AdminApiInner,
    req: &ListApprovalsRequest,
) -> Result<ListApprovalsResponse, Error> {
    let list = policies::list_approvals(&this.state).await?;
    let now = unix_now();
    let mut approvals: Vec<Approval> = list
        .into_iter()
        .map(|a| to_proto(&this.state, a, now))
        .filter(|a| req.all || a.state == "pending")
        .collect();
    approvals.sort_by_key(|a| a.created_at_unix);
    Ok(ListApprovalsResponse { approvals })
}

pub(super) async fn get_approval(
    this: &AdminApiInner,
    req: &GetApprovalRequest,
) -> Result<Approval, Error> {
    check_id(&req.id)?;
    Ok(to_proto(
        &this.state,
        policies::load_approval(&this.state, &req.id).await?,
        unix_now(),
    ))
}

pub(super) async fn approve(
    this: &AdminApiInner,
    officer: &Officer,
    req: &ApproveRequest,
) -> Result<OperationResponse, Error> {
    let id = &req.id;
    let (_turn, mut a) = decide_on(this, id).await?;
    let now = unix_now();
    if approvals::expired(&a, now) {
        let refusal = approvals::expired_error(&a, now);
        a.state = "expired".into();
        a.finished_at_unix = a.expires_at_unix;
        a.params_sha256 = approvals::digest_of(&a);
        policies::store_approval(&this.state, a).await?;
        return Err(refusal);
    }
    check_pending(&a, id)?;
    if let Some(why) = approvals::count(&this.state, &a).blocked {
        return Err(Error::FailedPrecondition(format!("approval {id}: {why}")));
    }
    if a.approvers.iter().any(|o| o == officer.identity.as_str()) {
        return Err(Error::FailedPrecondition(format!(
            "{} has already approved {id}; a different officer must approve",
            officer.identity
        )));
    }
    a.approvers.push(officer.identity.as_str().to_owned());
    a.params_sha256 = approvals::digest_of(&a);
    if approvals::count(&this.state, &a).reached() {
        this.execute(officer, &mut a).await?;
    }
    let a = policies::store_approval(&this.state, a).await?;
    Ok(operation_response(&this.state, a, now))
}

pub(super) async fn reject(
    this: &AdminApiInner,
    officer: &Officer,
    req: &RejectRequest,
) -> Result<Approval, Error> {
    let id = &req.id;
    let (_turn, mut a) = decide_on(this, id).await?;
    let now = unix_now();
    if approvals::expired(&a, now) {
        return Err(approvals::expired_error(&a, now));
    }
    check_pending(&a, id)?;
    a.state = "rejected".into();
    a.rejected_by = officer.identity.as_str().to_owned();
    a.finished_at_unix = now;
    a.params_sha256 = approvals::digest_of(&a);
    let a = policies::store_approval(&this.state, a).await?;
    Ok(to_proto(&this.state, a, now))
}

impl AdminApiInner {
    /// Records a request for a guarded operation; runs it at once only if one officer is a
    /// quorum (development setting). A pending request for the same operation and parameters
    /// is refused in favour of the one that exists.
    pub(super) async fn request_guarded(
        &self,
        officer: &Officer,
        operation: &str,
        params: Vec<(&str, String)>,
    ) -> Result<OperationResponse, Error> {
        let _turn = self.state.admin_lock.lock().await;
        let now = unix_now();
        let digest =
            approvals::params_sha256(operation, params.iter().map(|(k, v)| (*k, v.as_str())));
        if let Some(existing) = approvals::pending_duplicate(&self.state, &digest, now).await? {
            return Err(Error::FailedPrecondition(format!(
                "approval {} (requested by {}) already asks for this {operation} with the same parameters (params_sha256 {digest}); approve it with `strongroom-admin approve {}`, or reject it first",
                existing.id, existing.requester, existing.id
            )));
        }
        let mut approval = ApprovalV1 {
            id: new_id()?,
            operation: operation.to_owned(),
            params: params
                .into_iter()
                .map(|(k, v)| ApprovalParam {
                    key: k.to_owned(),
                    value: v,
                })
                .collect(),
            requester: officer.identity.as_str().to_owned(),
            approvers: vec![officer.identity.as_str().to_owned()],
            quorum: self.quorum(),
            created_at_unix: now,
            expires_at_unix: now.saturating_add(self.approval_ttl()),
            state: "pending".into(),
            result: String::new(),
            rejected_by: String::new(),
            params_sha256: digest,
            finished_at_unix: 0,
            mac: Vec::new(),
        };
        if approvals::count(&self.state, &approval).reached() {
            self.execute(officer, &mut approval).await?;
        }
        let approval = policies::store_approval(&self.state, approval).await?;
        Ok(operation_response(&self.state, approval, now))
    }
}

/// Approval `id` for an officer's decision, loaded under the admin lock: the guard keeps
/// the lock until the decision is stored.
async fn decide_on<'a>(
    this: &'a AdminApiInner,
    id: &str,
) -> Result<(tokio::sync::MutexGuard<'a, ()>, ApprovalV1), Error> {
    check_id(id)?;
    let turn = this.state.admin_lock.lock().await;
    let a = policies::load_approval(&this.state, id).await?;
    Ok((turn, a))
}

/// Refuses a decision on approval `id` once it is no longer pending.
fn check_pending(a: &ApprovalV1, id: &str) -> Result<(), Error> {
    if a.state != "pending" {
        return Err(Error::FailedPrecondition(format!(
            "approval {id} is {}, not pending",
            a.state
        )));
    }
    Ok(())
}

fn check_id(id: &str) -> Result<(), Error> {
    if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(
            "an approval id is 16 hexadecimal characters".into(),
        ))
    }
}

fn new_id() -> Result<String, Error> {
    use ring::rand::SecureRandom;
    let mut id = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut id)
        .map_err(|_| Error::Internal("the system random generator failed".into()))?;
    Ok(hex::encode(id))
}

fn to_proto(state: &service::State, a: ApprovalV1, now: i64) -> Approval {
    let Count {
        standing,
        counted,
        quorum,
        blocked,
    } = approvals::count(state, &a);
    let params_sha256 = approvals::digest_of(&a);
    let pending = a.state == "pending";
    let state_name = if approvals::expired(&a, now) {
        "expired".to_owned()
    } else {
        a.state
    };
    Approval {
        id: a.id,
        operation: a.operation,
        parameters: a
            .params
            .into_iter()
            .map(|p| (p.key, p.value))
            .collect::<HashMap<_, _>>(),
        requester: a.requester,
        approvers: a.approvers,
        quorum,
        created_at_unix: a.created_at_unix,
        expires_at_unix: a.expires_at_unix,
        state: state_name,
        result: a.result,
        rejected_by: a.rejected_by,
        params_sha256,
        standing: standing
            .into_iter()
            .map(|s| ApproverStanding {
                officer: s.officer,
                counts: s.counts,
                reason: s.reason,
            })
            .collect(),
        counted,
        blocked: if pending {
            blocked.unwrap_or_default()
        } else {
            String::new()
        },
        finished_at_unix: a.finished_at_unix,
    }
}

fn operation_response(state: &service::State, a: ApprovalV1, now: i64) -> OperationResponse {
    let approval = to_proto(state, a, now);
    OperationResponse {
        executed: approval.state == "executed",
        result: approval.result.clone(),
        approval: Some(approval),
    }
}

/// The audit detail of a call about an approval: which approval, its state, and the
/// operation with its parameter digest, so an entry can be matched to `approval show`.
pub(super) fn detail_of(a: &Approval) -> String {
    format!(
        "approval={} state={} op={} params_sha256={}",
        a.id, a.state, a.operation, a.params_sha256
    )
}

pub(super) fn approval_detail(result: &Result<OperationResponse, Error>) -> Option<String> {
    result
        .as_ref()
        .ok()
        .and_then(|r| r.approval.as_ref().map(detail_of))
}
