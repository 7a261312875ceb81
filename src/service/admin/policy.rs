//! Stored policies: putting and deleting them (guarded), showing and listing them, and
//! checking what the policy in force decides.

use tonic::{Request, Response, Status};

use super::approval::approval_detail;
use super::{AdminApi, DELETE_POLICY, PUT_POLICY};
use crate::error::Error;
use crate::policy::{Capability, Decision};
use crate::proto::{
    CheckPolicyRequest, CheckPolicyResponse, DeletePolicyRequest, GetPolicyRequest,
    ListPoliciesRequest, ListPoliciesResponse, OperationResponse, PolicyInfo, PutPolicyRequest,
};
use crate::secret::SecretName;
use crate::service::{self, blocking, policies};
use crate::store::Aux;
use crate::tls::Identity;

/// The largest policy document accepted (its request's decode limit follows it).
const MAX_POLICY_DOCUMENT: usize = crate::codec::MAX_POLICY_DOCUMENT_BYTES;

pub(super) async fn put_policy(
    api: &AdminApi,
    request: Request<PutPolicyRequest>,
) -> Result<Response<OperationResponse>, Status> {
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
        let officer = this.begin(&request, PUT_POLICY).await?;
        let req = request.into_inner();
        let result = async {
            let name = policies::parse_name(&req.name)?;
            if req.document.len() > MAX_POLICY_DOCUMENT {
                return Err(Error::InvalidArgument(format!(
                    "the policy document is larger than {MAX_POLICY_DOCUMENT} bytes"
                )));
            }
            if req.document.trim().is_empty() {
                return Err(Error::InvalidArgument(
                    "the policy document is empty; to take a policy away, use `policy delete`"
                        .into(),
                ));
            }
            let doc = crate::policy::PolicyDocument::parse(
                &req.document,
                this.state.limits.max_name_bytes,
            )
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            if doc.rule.is_empty() {
                return Err(Error::InvalidArgument(
                    "the policy document has no rules; to take a policy away, use `policy delete`"
                        .into(),
                ));
            }
            this.request_guarded(
                &officer,
                PUT_POLICY,
                vec![("name", name), ("document", req.document.clone())],
            )
            .await
        }
        .await;
        let detail = approval_detail(&result);
        this.finish(&officer, PUT_POLICY, Some(&req.name), result, detail)
            .await
    })
    .await
}

pub(super) async fn get_policy(
    api: &AdminApi,
    request: Request<GetPolicyRequest>,
) -> Result<Response<PolicyInfo>, Status> {
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
        let officer = this.begin(&request, "GetPolicy").await?;
        let req = request.into_inner();
        let result = async {
            let name = policies::parse_name(&req.name)?;
            policies::list(&this.state)
                .await?
                .into_iter()
                .find(|(r, _)| r.name == name)
                .map(|(r, ok)| policy_info(r, ok))
                .ok_or_else(|| no_policy(&req.name))
        }
        .await;
        this.finish(&officer, "GetPolicy", Some(&req.name), result, None)
            .await
    })
    .await
}

pub(super) async fn list_policies(
    api: &AdminApi,
    request: Request<ListPoliciesRequest>,
) -> Result<Response<ListPoliciesResponse>, Status> {
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
        let officer = this.begin(&request, "ListPolicies").await?;
        let result = policies::list(&this.state)
            .await
            .map(|all| ListPoliciesResponse {
                policies: all.into_iter().map(|(r, ok)| policy_info(r, ok)).collect(),
            });
        this.finish(&officer, "ListPolicies", None, result, None)
            .await
    })
    .await
}

pub(super) async fn delete_policy(
    api: &AdminApi,
    request: Request<DeletePolicyRequest>,
) -> Result<Response<OperationResponse>, Status> {
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
        let officer = this.begin(&request, DELETE_POLICY).await?;
        let req = request.into_inner();
        let result = async {
            let name = policies::parse_name(&req.name)?;
            // Refused before any approval: there is nothing to delete.
            let key = name.clone();
            blocking(&this.state, move |s| s.aux_get(Aux::Policy, &key))
                .await?
                .ok_or_else(|| no_policy(&req.name))?;
            this.request_guarded(&officer, DELETE_POLICY, vec![("name", name)])
                .await
        }
        .await;
        let detail = approval_detail(&result);
        this.finish(&officer, DELETE_POLICY, Some(&req.name), result, detail)
            .await
    })
    .await
}

pub(super) async fn check_policy(
    api: &AdminApi,
    request: Request<CheckPolicyRequest>,
) -> Result<Response<CheckPolicyResponse>, Status> {
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
        let officer = this.begin(&request, "CheckPolicy").await?;
        let req = request.into_inner();
        let result = (|| {
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
        })();
        this.finish(&officer, "CheckPolicy", Some(&req.name), result, None)
            .await
    })
    .await
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
