//! AdminService: the officers' plane. Only identities from the admin CA that are listed in
//! `admin.officers` get in; guarded operations wait for a quorum of distinct officers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Code, Request, Response, Status};

use super::approvals::{self, Count};
use super::policies;
use super::secrets::unix_now;
use super::{State, blocking};
use crate::audit::{AuditEvent, ChangeMark, Outcome, RecordedName};
use crate::error::Error;
use crate::hsm::keys::MacKey;
use crate::policy::{Capability, Decision};
use crate::proto::admin_service_server::AdminService;
use crate::proto::{
    AcceptStoreStateRequest, Approval, ApprovalParam, ApprovalV1, ApproveRequest, ApproverStanding,
    CheckPolicyRequest, CheckPolicyResponse, DeletePolicyRequest, DestroySecretRequest,
    GetApprovalRequest, GetPolicyRequest, ListApprovalsRequest, ListApprovalsResponse,
    ListPoliciesRequest, ListPoliciesResponse, OperationResponse, PolicyInfo, PutPolicyRequest,
    RejectRequest, RotateAuditLogRequest, RotateMasterKeyRequest, StatusRequest, StatusResponse,
};
use crate::proto::{
    ListMasterKeysRequest, ListMasterKeysResponse, RewrapProgress, RewrapRequest, RewrapResponse,
    SetMasterKeyStateRequest, WatchRewrapRequest,
};
use crate::secret::SecretName;
use crate::store::Aux;
use crate::tls::Identity;

/// The operations that need a quorum of officers.
const PUT_POLICY: &str = "PutPolicy";
const DELETE_POLICY: &str = "DeletePolicy";
const DESTROY_SECRET: &str = "DestroySecret";
const ROTATE_MASTER_KEY: &str = "RotateMasterKey";
const ACCEPT_STORE_STATE: &str = "AcceptStoreState";
const ROTATE_AUDIT_LOG: &str = "RotateAuditLog";
/// The audit operation of a guarded operation's execution (its entry precedes the change).
const EXECUTE: &str = "ExecuteApproval";
const REWRAP: &str = "Rewrap";
const SET_MASTER_KEY_STATE: &str = "SetMasterKeyState";
/// The largest policy document accepted (its request's decode limit follows it).
const MAX_POLICY_DOCUMENT: usize = crate::codec::MAX_POLICY_DOCUMENT_BYTES;

/// The AdminService implementation.
pub struct AdminApi(Arc<AdminApiInner>);

/// The handlers' shared part; each call runs in its own task so that a caller going away
/// never cuts a request between its effect and its audit entry.
pub(crate) struct AdminApiInner {
    state: Arc<State>,
    next_request_id: AtomicU64,
}

impl AdminApi {
    pub(crate) fn new(state: Arc<State>) -> Self {
        Self(Arc::new(AdminApiInner {
            state,
            next_request_id: AtomicU64::new(1),
        }))
    }
}

struct Officer {
    identity: Identity,
    request_id: u64,
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, "Status").await?;
            let result = this.status_inner().await;
            this.finish(&officer, "Status", None, result, None).await
        })
        .await
    }

    async fn put_policy(
        &self,
        request: Request<PutPolicyRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
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

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<PolicyInfo>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
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

    async fn list_policies(
        &self,
        request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
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

    async fn delete_policy(
        &self,
        request: Request<DeletePolicyRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
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

    async fn check_policy(
        &self,
        request: Request<CheckPolicyRequest>,
    ) -> Result<Response<CheckPolicyResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
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

    async fn destroy_secret(
        &self,
        request: Request<DestroySecretRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, DESTROY_SECRET).await?;
            let req = request.into_inner();
            let result = async {
                let name = SecretName::parse(&req.name, this.state.limits.max_name_bytes)
                    .map_err(|e| Error::InvalidArgument(e.to_string()))?;
                // Refused before any approval: there is nothing to destroy.
                let probe = name.clone();
                let live = blocking(&this.state, move |s| s.head(&probe))
                    .await?
                    .is_some_and(|h| h.live() > 0);
                if !live {
                    return Err(Error::NotFound);
                }
                this.request_guarded(
                    &officer,
                    DESTROY_SECRET,
                    vec![("name", name.as_str().to_owned())],
                )
                .await
            }
            .await;
            let detail = approval_detail(&result);
            this.finish(&officer, DESTROY_SECRET, Some(&req.name), result, detail)
                .await
        })
        .await
    }

    async fn rotate_master_key(
        &self,
        request: Request<RotateMasterKeyRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, ROTATE_MASTER_KEY).await?;
            let result = this
                .request_guarded(&officer, ROTATE_MASTER_KEY, Vec::new())
                .await;
            let detail = approval_detail(&result);
            this.finish(&officer, ROTATE_MASTER_KEY, None, result, detail)
                .await
        })
        .await
    }

    async fn rotate_audit_log(
        &self,
        request: Request<RotateAuditLogRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, ROTATE_AUDIT_LOG).await?;
            let reason = request.into_inner().reason;
            let result = match crate::audit::check_reason(&reason) {
                Ok(()) => {
                    let params = vec![("reason", reason)];
                    this.request_guarded(&officer, ROTATE_AUDIT_LOG, params)
                        .await
                }
                Err(e) => Err(Error::InvalidArgument(e)),
            };
            let detail = approval_detail(&result);
            this.finish(&officer, ROTATE_AUDIT_LOG, None, result, detail)
                .await
        })
        .await
    }

    async fn accept_store_state(
        &self,
        request: Request<AcceptStoreStateRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, ACCEPT_STORE_STATE).await?;
            let result = this
                .request_guarded(&officer, ACCEPT_STORE_STATE, Vec::new())
                .await;
            let detail = approval_detail(&result);
            this.finish(&officer, ACCEPT_STORE_STATE, None, result, detail)
                .await
        })
        .await
    }

    async fn list_approvals(
        &self,
        request: Request<ListApprovalsRequest>,
    ) -> Result<Response<ListApprovalsResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, "ListApprovals").await?;
            let all = request.get_ref().all;
            let result = policies::list_approvals(&this.state).await.map(|list| {
                let now = unix_now();
                let mut approvals: Vec<Approval> = list
                    .into_iter()
                    .map(|a| to_proto(&this.state, a, now))
                    .filter(|a| all || a.state == "pending")
                    .collect();
                approvals.sort_by_key(|a| a.created_at_unix);
                ListApprovalsResponse { approvals }
            });
            this.finish(&officer, "ListApprovals", None, result, None)
                .await
        })
        .await
    }

    async fn get_approval(
        &self,
        request: Request<GetApprovalRequest>,
    ) -> Result<Response<Approval>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, "GetApproval").await?;
            let id = request.into_inner().id;
            let result = async {
                check_id(&id)?;
                Ok(to_proto(
                    &this.state,
                    policies::load_approval(&this.state, &id).await?,
                    unix_now(),
                ))
            }
            .await;
            this.finish(&officer, "GetApproval", Some(&id), result, None)
                .await
        })
        .await
    }

    async fn approve(
        &self,
        request: Request<ApproveRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, "Approve").await?;
            let id = request.into_inner().id;
            let result = this.approve_inner(&officer, &id).await;
            let detail = approval_detail(&result);
            this.finish(&officer, "Approve", Some(&id), result, detail)
                .await
        })
        .await
    }

    async fn reject(&self, request: Request<RejectRequest>) -> Result<Response<Approval>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, "Reject").await?;
            let id = request.into_inner().id;
            let result = async {
                check_id(&id)?;
                let _turn = this.state.admin_lock.lock().await;
                let mut a = policies::load_approval(&this.state, &id).await?;
                let now = unix_now();
                if approvals::expired(&a, now) {
                    return Err(approvals::expired_error(&a, now));
                }
                if a.state != "pending" {
                    return Err(Error::FailedPrecondition(format!(
                        "approval {id} is {}, not pending",
                        a.state
                    )));
                }
                a.state = "rejected".into();
                a.rejected_by = officer.identity.as_str().to_owned();
                a.finished_at_unix = now;
                a.params_sha256 = approvals::digest_of(&a);
                let a = policies::store_approval(&this.state, a).await?;
                Ok(to_proto(&this.state, a, now))
            }
            .await;
            let detail = result.as_ref().ok().map(detail_of);
            this.finish(&officer, "Reject", Some(&id), result, detail)
                .await
        })
        .await
    }

    async fn report_expiring(
        &self,
        request: Request<crate::proto::ReportExpiringRequest>,
    ) -> Result<Response<crate::proto::ReportExpiringResponse>, Status> {
        // Names and expiry times only, never values (src/service/expiry.rs).
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, "ReportExpiring").await?;
            let result = super::expiry::report(&this.state, request.get_ref()).await;
            this.finish(&officer, "ReportExpiring", None, result, None)
                .await
        })
        .await
    }

    async fn rewrap(
        &self,
        request: Request<RewrapRequest>,
    ) -> Result<Response<RewrapResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, REWRAP).await?;
            let req = request.into_inner();
            let result = async {
                if req.dry_run {
                    let p = super::rewrap::dry_run(&this.state, req.from_version).await?;
                    return Ok(RewrapResponse {
                        operation: None,
                        dry_run: Some(p.to_proto()),
                    });
                }
                super::rewrap::check_request(&this.state, req.from_version).await?;
                let op = this
                    .request_guarded(
                        &officer,
                        REWRAP,
                        vec![
                            ("from_version", req.from_version.to_string()),
                            ("rate", req.rate.to_string()),
                        ],
                    )
                    .await?;
                Ok(RewrapResponse {
                    operation: Some(op),
                    dry_run: None,
                })
            }
            .await;
            let detail = result
                .as_ref()
                .ok()
                .and_then(|r| r.operation.as_ref())
                .and_then(|o| o.approval.as_ref().map(detail_of))
                .or(req.dry_run.then(|| "dry run".to_owned()));
            this.finish(&officer, REWRAP, None, result, detail).await
        })
        .await
    }

    type WatchRewrapStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<RewrapProgress, Status>> + Send + 'static>,
    >;

    async fn watch_rewrap(
        &self,
        request: Request<WatchRewrapRequest>,
    ) -> Result<Response<Self::WatchRewrapStream>, Status> {
        let this = self.0.clone();
        let officer = this.begin(&request, "WatchRewrap").await?;
        let first = super::rewrap::load(&this.state).await;
        let first = this
            .finish(&officer, "WatchRewrap", None, first, None)
            .await?
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let state = this.state.clone();
        // Now, then every change, until the job is no longer running (or the officer goes
        // away).
        tokio::spawn(super::rewrap::watch(state, first, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_master_keys(
        &self,
        request: Request<ListMasterKeysRequest>,
    ) -> Result<Response<ListMasterKeysResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, "ListMasterKeys").await?;
            let result = super::rewrap::list_keys(&this.state)
                .await
                .map(|keys| ListMasterKeysResponse { keys });
            this.finish(&officer, "ListMasterKeys", None, result, None)
                .await
        })
        .await
    }

    async fn set_master_key_state(
        &self,
        request: Request<SetMasterKeyStateRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, SET_MASTER_KEY_STATE).await?;
            let req = request.into_inner();
            let result = async {
                // Refused before any approval when the step is not allowed now.
                super::rewrap::check_step(&this.state, req.version, &req.state).await?;
                this.request_guarded(
                    &officer,
                    SET_MASTER_KEY_STATE,
                    vec![
                        ("version", req.version.to_string()),
                        ("state", req.state.clone()),
                    ],
                )
                .await
            }
            .await;
            let detail = approval_detail(&result);
            this.finish(
                &officer,
                SET_MASTER_KEY_STATE,
                Some(&format!("master key version {}", req.version)),
                result,
                detail,
            )
            .await
        })
        .await
    }
}

impl AdminApiInner {
    /// Authenticates the officer: a certificate from the admin CA (checked by TLS) whose
    /// identity is listed in `admin.officers`.
    async fn begin<T>(
        &self,
        request: &Request<T>,
        operation: &'static str,
    ) -> Result<Officer, Status> {
        // The front door's id (also in the request's log span); a counter of our own if
        // the request did not come through it.
        let request_id = crate::metrics::request_id(request.extensions())
            .unwrap_or_else(|| self.next_request_id.fetch_add(1, Ordering::Relaxed));
        let identity = super::peer_identity(request);
        let (status, identity) = match identity {
            Err(e) => (
                Status::unauthenticated(format!("no officer identity: {e}")),
                None,
            ),
            Ok(id) => {
                let listed = self
                    .state
                    .admin
                    .as_ref()
                    .is_some_and(|a| a.officers.iter().any(|o| o == id.as_str()));
                let expired = super::call_deadline(request.metadata())
                    .is_some_and(|d| d < super::MIN_DEADLINE);
                if listed && expired {
                    (
                        Status::deadline_exceeded("the call's deadline has already passed"),
                        Some(id),
                    )
                } else if listed {
                    return Ok(Officer {
                        identity: id,
                        request_id,
                    });
                } else {
                    (
                        Status::permission_denied(format!("{id} is not an officer")),
                        Some(id),
                    )
                }
            }
        };
        self.audit(
            identity.as_ref(),
            operation,
            None,
            status.code(),
            request_id,
            None,
        )
        .await?;
        Err(status)
    }

    async fn finish<T>(
        &self,
        officer: &Officer,
        operation: &'static str,
        name: Option<&str>,
        result: Result<T, Error>,
        detail: Option<String>,
    ) -> Result<Response<T>, Status> {
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(e) => e.code(),
        };
        self.audit(
            Some(&officer.identity),
            operation,
            name,
            code,
            officer.request_id,
            detail,
        )
        .await?;
        result.map(Response::new).map_err(Status::from)
    }

    async fn audit(
        &self,
        identity: Option<&Identity>,
        operation: &'static str,
        name: Option<&str>,
        status: Code,
        request_id: u64,
        detail: Option<String>,
    ) -> Result<(), Status> {
        // Names here are secret names, policy names or approval ids: an invalid one is
        // recorded bounded (at most the longer name limit's worth of it, its length and its
        // SHA-256).
        let limit = self
            .state
            .limits
            .max_name_bytes
            .max(policies::MAX_POLICY_NAME);
        let event = AuditEvent {
            plane: "admin",
            identity,
            operation,
            name: name.map(|n| RecordedName::new(n, limit)),
            version: None,
            status,
            request_id,
            detail,
            change: None,
        };
        if let Err(e) = self.state.audit.record(&event, None).await {
            super::update_health(&self.state).await;
            return Err(Status::from(Error::Audit(e.to_string())));
        }
        Ok(())
    }

    fn quorum(&self) -> u32 {
        self.state
            .admin
            .as_ref()
            .map_or(u32::MAX, |a| a.effective_quorum())
    }

    fn approval_ttl(&self) -> i64 {
        self.state.admin.as_ref().map_or(3600, |a| {
            i64::try_from(a.approval_ttl_secs).unwrap_or(i64::MAX)
        })
    }

    /// Records a request for a guarded operation; runs it at once only if one officer is a
    /// quorum (development setting). A pending request for the same operation and parameters
    /// is refused in favour of the one that exists.
    async fn request_guarded(
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

    async fn approve_inner(&self, officer: &Officer, id: &str) -> Result<OperationResponse, Error> {
        check_id(id)?;
        let _turn = self.state.admin_lock.lock().await;
        let mut a = policies::load_approval(&self.state, id).await?;
        let now = unix_now();
        if approvals::expired(&a, now) {
            let refusal = approvals::expired_error(&a, now);
            a.state = "expired".into();
            a.finished_at_unix = a.expires_at_unix;
            a.params_sha256 = approvals::digest_of(&a);
            policies::store_approval(&self.state, a).await?;
            return Err(refusal);
        }
        if a.state != "pending" {
            return Err(Error::FailedPrecondition(format!(
                "approval {id} is {}, not pending",
                a.state
            )));
        }
        if let Some(why) = approvals::count(&self.state, &a).blocked {
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
        if approvals::count(&self.state, &a).reached() {
            self.execute(officer, &mut a).await?;
        }
        let a = policies::store_approval(&self.state, a).await?;
        Ok(operation_response(&self.state, a, now))
    }

    /// Runs an approved operation and records the outcome in the approval. Its audit entry
    /// (the operation, its parameter digest and the approvals that counted) is written
    /// first; if it cannot be, the operation does not run. Then it is written ahead: its
    /// intent is durable before it touches the store or the token (if it cannot be written,
    /// the operation fails untried), and its outcome follows.
    async fn execute(&self, officer: &Officer, a: &mut ApprovalV1) -> Result<(), Error> {
        let counted: Vec<String> = approvals::count(&self.state, a)
            .standing
            .into_iter()
            .filter(|s| s.counts)
            .map(|s| s.officer)
            .collect();
        self.audit(
            Some(&officer.identity),
            EXECUTE,
            Some(&a.id),
            Code::Ok,
            officer.request_id,
            Some(format!(
                "approval={} op={} params_sha256={} approved_by={}",
                a.id,
                a.operation,
                approvals::digest_of(a),
                counted.join(",")
            )),
        )
        .await
        .map_err(|s| Error::Audit(s.message().to_owned()))?;
        let param = |k: &str| {
            a.params
                .iter()
                .find(|p| p.key == k)
                .map(|p| p.value.clone())
                .unwrap_or_default()
        };
        let by = counted.join(", ");
        let target = param("name");
        let change = match self.write_ahead(officer, a, &target).await {
            Ok(change) => change,
            Err(e) => {
                tracing::warn!(approval = %a.id, operation = %a.operation, error = %e, "guarded operation not run: its intent could not be audited");
                a.state = "failed".into();
                a.result = format!("not run: {e}");
                a.finished_at_unix = unix_now();
                super::update_health(&self.state).await;
                return Ok(());
            }
        };
        crate::audit::reconcile::halt_point("officer-after-intent").await;
        let outcome: Result<String, Error> = match a.operation.as_str() {
            PUT_POLICY => {
                policies::put(&self.state, &param("name"), &param("document"), &by, &a.id)
                    .await
                    .map(|r| format!("policy '{}' stored at revision {}", r.name, r.revision))
            }
            DELETE_POLICY => policies::delete(&self.state, &param("name"))
                .await
                .map(|existed| {
                    if existed {
                        format!("policy '{}' deleted", param("name"))
                    } else {
                        format!("policy '{}' did not exist", param("name"))
                    }
                }),
            DESTROY_SECRET => {
                let name = param("name");
                match SecretName::parse(&name, self.state.limits.max_name_bytes) {
                    Ok(n) => blocking(&self.state, move |s| s.delete(&n))
                        .await
                        .map(|n| format!("secret '{name}': {n} version(s) destroyed")),
                    Err(e) => Err(Error::InvalidArgument(e.to_string())),
                }
            }
            ROTATE_MASTER_KEY => self
                .state
                .hsm
                .generate_master_key()
                .await
                .map(|v| {
                    format!(
                        "master key version {v} generated; new writes use it; back up the token"
                    )
                })
                .map_err(Error::from),
            ACCEPT_STORE_STATE => super::rollback::accept(&self.state).await.map(|epoch| {
                format!("the store is accepted at epoch {epoch}; secrets are served again")
            }),
            ROTATE_AUDIT_LOG => super::rotate_audit_log(&self.state, &param("reason")).await,
            REWRAP => {
                super::rewrap::start(
                    &self.state,
                    param("from_version").parse().unwrap_or(0),
                    param("rate").parse().unwrap_or(0),
                    &a.id,
                )
                .await
            }
            SET_MASTER_KEY_STATE => match param("version").parse::<u32>() {
                Ok(v) => super::rewrap::set_state(&self.state, v, &param("state")).await,
                Err(_) => Err(Error::InvalidArgument("no master key version".into())),
            },
            other => Err(Error::Internal(format!("unknown operation {other}"))),
        };
        crate::audit::reconcile::halt_point("officer-after-commit").await;
        if let Some((id, event)) = change {
            // Refused before the store was touched: failed; any other error may have come
            // after it was (the next start reconciles an unknown outcome).
            let ended = match &outcome {
                Ok(_) => Outcome::Committed,
                Err(
                    Error::InvalidArgument(_)
                    | Error::FailedPrecondition(_)
                    | Error::NotFound
                    | Error::Absent(_),
                ) => Outcome::Failed,
                Err(_) => Outcome::Unknown,
            };
            let detail = format!(
                "approval={} op={} params_sha256={} {}",
                a.id,
                a.operation,
                approvals::digest_of(a),
                ended.as_str()
            );
            let event = AuditEvent {
                detail: Some(detail),
                change: Some(ChangeMark::outcome(&id, ended)),
                status: outcome.as_ref().map_or_else(|e| e.code(), |_| Code::Ok),
                version: None,
                ..event
            };
            if let Err(e) = self.state.audit.record(&event, None).await {
                // The change stands; the next start reconciles its intent.
                tracing::error!(approval = %a.id, error = %e, "cannot audit a guarded operation's outcome");
            }
        }
        match outcome {
            Ok(result) => {
                tracing::info!(approval = %a.id, operation = %a.operation, %result, "guarded operation executed");
                a.state = "executed".into();
                a.result = result;
            }
            Err(e) => {
                tracing::warn!(approval = %a.id, operation = %a.operation, error = %e, "guarded operation failed");
                a.state = "failed".into();
                a.result = e.to_string();
            }
        }
        a.finished_at_unix = unix_now();
        super::update_health(&self.state).await;
        Ok(())
    }

    /// Writes the intent of an approved operation and waits until it is durable; returns its
    /// change id and the event its outcome reuses (none with the benchmark-only
    /// `audit.dangerous_no_write_ahead`).
    async fn write_ahead<'a>(
        &'a self,
        officer: &'a Officer,
        a: &ApprovalV1,
        name: &'a str,
    ) -> Result<Option<(String, AuditEvent<'a>)>, Error> {
        if !self.state.write_ahead {
            return Ok(None);
        }
        let (operation, version, fingerprint): (&'static str, _, _) = match a.operation.as_str() {
            PUT_POLICY => (PUT_POLICY, None, Some(a.id.clone())),
            DELETE_POLICY => (DELETE_POLICY, None, None),
            DESTROY_SECRET => (DESTROY_SECRET, None, None),
            ROTATE_MASTER_KEY => {
                let next = self.state.hsm.master_key_versions().into_iter().max();
                (
                    ROTATE_MASTER_KEY,
                    Some(u64::from(next.unwrap_or(0)) + 1),
                    None,
                )
            }
            ACCEPT_STORE_STATE => {
                let (_, epoch) = blocking(&self.state, |s| s.epoch()).await?;
                (ACCEPT_STORE_STATE, Some(epoch), None)
            }
            // Not a change to the store: the log records its own rotation (the old log's
            // last entry seals it, the new log's first names it).
            ROTATE_AUDIT_LOG => return Ok(None),
            // The intent names the version the records move to; each record's re-seal is
            // a compare-and-replace, and the job's end is audited (rewrap.rs).
            REWRAP => (
                REWRAP,
                self.state.hsm.current_master_key().map(u64::from),
                None,
            ),
            SET_MASTER_KEY_STATE => (
                SET_MASTER_KEY_STATE,
                a.params
                    .iter()
                    .find(|p| p.key == "version")
                    .and_then(|p| p.value.parse().ok()),
                None,
            ),
            other => {
                return Err(Error::Internal(format!("unknown operation {other}")));
            }
        };
        let limit = self
            .state
            .limits
            .max_name_bytes
            .max(policies::MAX_POLICY_NAME);
        let id = crate::audit::new_change_id();
        let event = AuditEvent {
            plane: "admin",
            identity: Some(&officer.identity),
            operation,
            name: (!name.is_empty()).then(|| RecordedName::new(name, limit)),
            version,
            status: Code::Ok,
            request_id: officer.request_id,
            detail: Some(format!(
                "approval={} op={} params_sha256={} approvers={}",
                a.id,
                a.operation,
                approvals::digest_of(a),
                a.approvers.join(",")
            )),
            change: Some(ChangeMark::intent(&id, fingerprint)),
        };
        if let Err(e) = self.state.audit.record(&event, None).await {
            super::update_health(&self.state).await;
            return Err(Error::Audit(e.to_string()));
        }
        Ok(Some((id, event)))
    }

    async fn status_inner(&self) -> Result<StatusResponse, Error> {
        let state = &self.state;
        let (bytes, secrets) =
            blocking(state, |s| Ok((s.size_on_disk()?, s.secret_count()?))).await?;
        let approvals = policies::list_approvals(state).await?;
        let now = unix_now();
        let pending = approvals
            .iter()
            .filter(|a| a.state == "pending" && a.expires_at_unix > now)
            .count();
        let policies = blocking(state, |s| s.aux_list(Aux::Policy)).await?.len();
        let mut dangerous = Vec::new();
        if state
            .admin
            .as_ref()
            .is_some_and(|a| a.dangerous_single_officer)
        {
            dangerous.push("admin.dangerous_single_officer".to_owned());
        }
        if !state.write_ahead {
            dangerous.push("audit.dangerous_no_write_ahead".to_owned());
        }
        if matches!(state.audit, crate::audit::Auditor::DangerousLogOnly) {
            dangerous.push("audit.dangerous_disable_audit".to_owned());
        }
        let versions = state.hsm.master_key_versions();
        Ok(StatusResponse {
            token: state.token_label.clone(),
            token_available: state.hsm.state() == crate::hsm::HsmState::Ready,
            current_master_key: state.hsm.current_master_key().unwrap_or(0),
            master_key_versions: versions,
            mac_keys_missing: MacKey::ALL
                .iter()
                .filter(|k| !state.hsm.has_mac_key(**k))
                .map(|k| k.label().to_owned())
                .collect(),
            store_bytes: bytes,
            secrets,
            listeners: state
                .listeners
                .read()
                .map(|l| l.clone())
                .unwrap_or_default(),
            audit_path: match &state.audit {
                crate::audit::Auditor::Chained(log) => log.path().display().to_string(),
                crate::audit::Auditor::DangerousLogOnly => String::new(),
            },
            audit_healthy: state.audit.healthy(),
            pending_approvals: pending as u32,
            quorum: self.quorum(),
            dangerous_settings: dangerous,
            tampered_policies: state
                .tampered_policies
                .read()
                .map(|t| t.clone())
                .unwrap_or_default(),
            policies: policies as u32,
            store_rollback: state
                .rollback
                .read()
                .ok()
                .and_then(|r| r.clone())
                .unwrap_or_default(),
            hsm_state: match state.hsm.state() {
                crate::hsm::HsmState::Ready => "ready".into(),
                crate::hsm::HsmState::Recovering => "recovering".into(),
            },
            list_keys_examined: state.store.list_keys_examined(),
        })
    }
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

fn to_proto(state: &super::State, a: ApprovalV1, now: i64) -> Approval {
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

fn operation_response(state: &super::State, a: ApprovalV1, now: i64) -> OperationResponse {
    let approval = to_proto(state, a, now);
    OperationResponse {
        executed: approval.state == "executed",
        result: approval.result.clone(),
        approval: Some(approval),
    }
}

/// The audit detail of a call about an approval: which approval, its state, and the
/// operation with its parameter digest, so an entry can be matched to `approval show`.
fn detail_of(a: &Approval) -> String {
    format!(
        "approval={} state={} op={} params_sha256={}",
        a.id, a.state, a.operation, a.params_sha256
    )
}

fn approval_detail(result: &Result<OperationResponse, Error>) -> Option<String> {
    result
        .as_ref()
        .ok()
        .and_then(|r| r.approval.as_ref().map(detail_of))
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
