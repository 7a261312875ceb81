//! Stored policies: putting and deleting them (guarded), showing and listing them, and
//! checking what the policy in force decides.

use super::{AdminApiInner, DELETE_POLICY, Officer, PUT_POLICY};
use crate::error::Error;
use crate::policy::{Capability, Decision};
use crate::proto::{
    CheckPolicyRequest, CheckPolicyResponse, DeletePolicyRequest, GetPolicyRequest,
    ListPoliciesResponse, OperationResponse, PolicyInfo, PutPolicyRequest,
};
use crate::secret::SecretName;
use crate::service::{blocking, policies};
use crate::store::Aux;
use crate::tls::Identity;

/// The largest policy document accepted (its request's decode limit follows it).
const MAX_POLICY_DOCUMENT: usize = crate::codec::MAX_POLICY_DOCUMENT_BYTES;

pub(super) async fn put_policy(
    this: &AdminApiInner,
    officer: &Officer,
    req: &PutPolicyRequest,
) -> Result<OperationResponse, Error> {
    let name = policies::parse_name(&req.name)?;
    if req.document.len() > MAX_POLICY_DOCUMENT {
        return Err(Error::InvalidArgument(format!(
            "the policy document is larger than {MAX_POLICY_DOCUMENT} bytes"
        )));
    }
    if req.document.trim().is_empty() {
        return Err(Error::InvalidArgument(
            "the policy document is empty; to take a policy away, use `policy delete`".into(),
        ));
    }
    let doc = crate::policy::PolicyDocument::parse(&req.document, this.state.limits.max_name_bytes)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    if doc.rule.is_empty() {
        return Err(Error::InvalidArgument(
            "the policy document has no rules; to take a policy away, use `policy delete`".into(),
        ));
    }
    this.request_guarded(
        officer,
        PUT_POLICY,
        vec![("name", name), ("document", req.document.clone())],
    )
    .await
}

pub(super) async fn get_policy(
    this: &AdminApiInner,
    req: &GetPolicyRequest,
) -> Result<PolicyInfo, Error> {
    let name = policies::parse_name(&req.name)?;
    policies::list(&this.state)
        .await?
        .into_iter()
        .find(|(r, _)| r.name == name)
        .map(|(r, ok)| policy_info(r, ok))
        .ok_or_else(|| no_policy(&req.name))
}

pub(super) async fn list_policies(this: &AdminApiInner) -> Result<ListPoliciesResponse, Error> {
    let all = policies::list(&this.state).await?;
    Ok(ListPoliciesResponse {
        policies: all.into_iter().map(|(r, ok)| policy_info(r, ok)).collect(),
    })
}

pub(super) async fn delete_policy(
    this: &AdminApiInner,
    officer: &Officer,
    req: &DeletePolicyRequest,
) -> Result<OperationResponse, Error> {
    let name = policies::parse_name(&req.name)?;
    // Refused before any approval: there is nothing to delete.
    let key = name.clone();
    blocking(&this.state, move |s| s.aux_get(Aux::Policy, &key))
        .await?
        .ok_or_else(|| no_policy(&req.name))?;
    this.request_guarded(officer, DELETE_POLICY, vec![("name", name)])
        .await
}

/// What the policy in force decides for an identity, a capability and a secret name.
pub(super) fn check_policy(
    this: &AdminApiInner,
    req: &CheckPolicyRequest,
) -> Result<CheckPolicyResponse, Error> {
    let capability = parse_capability(&req.capability)?;
    let name = SecretName::parse(&req.name, this.state.limits.max_name_bytes)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    if req.identity.is_empty() {
        return Err(Error::InvalidArgument("identity is empty".into()));
    }
    let policy = this.state.policy();
    let identity = Identity::new(req.identity.clone());
    Ok(match policy.decide(&identity, capability, &name) {
        Decision::Allow(i) => CheckPolicyResponse {
            allowed: true,
            decided_by: policy.rule_label(i),
        },
        Decision::Deny => CheckPolicyResponse {
            allowed: false,
            decided_by: format!(
                "no rule grants {capability} on {name} to {identity} (deny by default)"
            ),
        },
    })
}

fn parse_capability(s: &str) -> Result<Capability, Error> {
    match s {
        "read" => Ok(Capability::Read),
        "write" => Ok(Capability::Write),
        "list" => Ok(Capability::List),
        "delete" => Ok(Capability::Delete),
        other => Err(Error::InvalidArgument(format!(
            "capability {other:?} is not one of read, write, list, delete"
        ))),
    }
}

fn policy_info(r: crate::proto::PolicyRecordV1, authentic: bool) -> PolicyInfo {
    PolicyInfo {
        name: r.name,
        document: r.document,
        revision: r.revision,
        updated_by: r.updated_by,
        updated_at_unix: r.updated_at_unix,
        approval_id: r.approval_id,
        authentic,
    }
}

/// A stored policy that does not exist, in words.
fn no_policy(name: &str) -> Error {
    Error::Absent(format!(
        "policy '{name}' does not exist: see `strongroom-admin policy list`"
    ))
}
