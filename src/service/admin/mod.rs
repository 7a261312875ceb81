//! AdminService: the officers' plane. Only identities from the admin CA that are listed in
//! `admin.officers` get in; guarded operations wait for a quorum of distinct officers.
//!
//! This file holds the service, its officers' check and audit, the skeleton the calls share
//! (`AdminApi::serve`: the officer's check, the work, the audited answer) and the calls'
//! dispatch; each call's own work is in the file of its kind: approvals and requesting a
//! guarded operation (`approval.rs`), running an approved one (`execute.rs`), stored policies
//! (`policy.rs`), master keys and re-wrap (`keys.rs`), and the store, its state and the
//! audit log's rotation (`store.rs`).

mod approval;
mod execute;
mod keys;
mod policy;
mod store;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Code, Request, Response, Status};

use self::approval::approval_detail;
use super::State;
use super::policies;
use crate::audit::{AuditEvent, RecordedName};
use crate::error::Error;
use crate::proto::admin_service_server::AdminService;
use crate::proto::{
    AcceptStoreStateRequest, Approval, ApproveRequest, CheckPolicyRequest, CheckPolicyResponse,
    DeletePolicyRequest, DestroySecretRequest, GetApprovalRequest, GetPolicyRequest,
    ListApprovalsRequest, ListApprovalsResponse, ListPoliciesRequest, ListPoliciesResponse,
    OperationResponse, PolicyInfo, PutPolicyRequest, RejectRequest, RotateAuditLogRequest,
    RotateMasterKeyRequest, StatusRequest, StatusResponse,
};
use crate::proto::{
    ListMasterKeysRequest, ListMasterKeysResponse, ReportExpiringRequest, ReportExpiringResponse,
    RewrapProgress, RewrapRequest, RewrapResponse, SetMasterKeyStateRequest, WatchRewrapRequest,
};
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

/// A handler's own work: what it does between the officer's check and the audited answer.
type Work<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

impl AdminApi {
    /// The skeleton every unary call shares: in its own task (so a caller going away never
    /// cuts a request between its effect and its audit entry, see [`super::complete`]),
    /// check the officer (refusals are audited) before the request is read, do the call's
    /// `work`, then audit the outcome as `operation` under the name `audited` picks from the
    /// request and the `detail` drawn from the request and the result, and only then answer.
    async fn serve<Req, Resp>(
        &self,
        request: Request<Req>,
        operation: &'static str,
        audited: fn(&Req) -> Option<String>,
        detail: fn(&Req, &Result<Resp, Error>) -> Option<String>,
        work: for<'a> fn(&'a AdminApiInner, &'a Officer, &'a Req) -> Work<'a, Resp>,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Send + Sync + 'static,
        Resp: Send + 'static,
    {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let officer = this.begin(&request, operation).await?;
            let req = request.into_inner();
            let result = work(&this, &officer, &req).await;
            let detail = detail(&req, &result);
            let name = audited(&req);
            this.finish(&officer, operation, name.as_deref(), result, detail)
                .await
        })
        .await
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.serve(
            request,
            "Status",
            |_| None,
            |_, _| None,
            |this, _, _| Box::pin(store::status(this)),
        )
        .await
    }

    async fn put_policy(
        &self,
        request: Request<PutPolicyRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        self.serve(
            request,
            PUT_POLICY,
            |r| Some(r.name.clone()),
            |_, r| approval_detail(r),
            |this, officer, req| Box::pin(policy::put_policy(this, officer, req)),
        )
        .await
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<PolicyInfo>, Status> {
        self.serve(
            request,
            "GetPolicy",
            |r| Some(r.name.clone()),
            |_, _| None,
            |this, _, req| Box::pin(policy::get_policy(this, req)),
        )
        .await
    }

    async fn list_policies(
        &self,
        request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        self.serve(
            request,
            "ListPolicies",
            |_| None,
            |_, _| None,
            |this, _, _| Box::pin(policy::list_policies(this)),
        )
        .await
    }

    async fn delete_policy(
        &self,
        request: Request<DeletePolicyRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        self.serve(
            request,
            DELETE_POLICY,
            |r| Some(r.name.clone()),
            |_, r| approval_detail(r),
            |this, officer, req| Box::pin(policy::delete_policy(this, officer, req)),
        )
        .await
    }

    async fn check_policy(
        &self,
        request: Request<CheckPolicyRequest>,
    ) -> Result<Response<CheckPolicyResponse>, Status> {
        self.serve(
            request,
            "CheckPolicy",
            |r| Some(r.name.clone()),
            |_, _| None,
            |this, _, req| Box::pin(std::future::ready(policy::check_policy(this, req))),
        )
        .await
    }

    async fn destroy_secret(
        &self,
        request: Request<DestroySecretRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        self.serve(
            request,
            DESTROY_SECRET,
            |r| Some(r.name.clone()),
            |_, r| approval_detail(r),
            |this, officer, req| Box::pin(store::destroy_secret(this, officer, req)),
        )
        .await
    }

    async fn rotate_master_key(
        &self,
        request: Request<RotateMasterKeyRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        self.serve(
            request,
            ROTATE_MASTER_KEY,
            |_| None,
            |_, r| approval_detail(r),
            |this, officer, _| Box::pin(keys::rotate_master_key(this, officer)),
        )
        .await
    }

    async fn rotate_audit_log(
        &self,
        request: Request<RotateAuditLogRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        self.serve(
            request,
            ROTATE_AUDIT_LOG,
            |_| None,
            |_, r| approval_detail(r),
            |this, officer, req| Box::pin(store::rotate_audit_log(this, officer, req)),
        )
        .await
    }

    async fn accept_store_state(
        &self,
        request: Request<AcceptStoreStateRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        self.serve(
            request,
            ACCEPT_STORE_STATE,
            |_| None,
            |_, r| approval_detail(r),
            |this, officer, _| Box::pin(store::accept_store_state(this, officer)),
        )
        .await
    }

    async fn list_approvals(
        &self,
        request: Request<ListApprovalsRequest>,
    ) -> Result<Response<ListApprovalsResponse>, Status> {
        self.serve(
            request,
            "ListApprovals",
            |_| None,
            |_, _| None,
            |this, _, req| Box::pin(approval::list_approvals(this, req)),
        )
        .await
    }

    async fn get_approval(
        &self,
        request: Request<GetApprovalRequest>,
    ) -> Result<Response<Approval>, Status> {
        self.serve(
            request,
            "GetApproval",
            |r| Some(r.id.clone()),
            |_, _| None,
            |this, _, req| Box::pin(approval::get_approval(this, req)),
        )
        .await
    }

    async fn approve(
        &self,
        request: Request<ApproveRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        self.serve(
            request,
            "Approve",
            |r| Some(r.id.clone()),
            |_, r| approval_detail(r),
            |this, officer, req| Box::pin(approval::approve(this, officer, req)),
        )
        .await
    }

    async fn reject(&self, request: Request<RejectRequest>) -> Result<Response<Approval>, Status> {
        self.serve(
            request,
            "Reject",
            |r| Some(r.id.clone()),
            |_, r| r.as_ref().ok().map(approval::detail_of),
            |this, officer, req| Box::pin(approval::reject(this, officer, req)),
        )
        .await
    }

    async fn report_expiring(
        &self,
        request: Request<ReportExpiringRequest>,
    ) -> Result<Response<ReportExpiringResponse>, Status> {
        self.serve(
            request,
            "ReportExpiring",
            |_| None,
            |_, _| None,
            |this, _, req| Box::pin(store::report_expiring(this, req)),
        )
        .await
    }

    async fn rewrap(
        &self,
        request: Request<RewrapRequest>,
    ) -> Result<Response<RewrapResponse>, Status> {
        self.serve(
            request,
            REWRAP,
            |_| None,
            keys::rewrap_detail,
            |this, officer, req| Box::pin(keys::rewrap(this, officer, req)),
        )
        .await
    }

    type WatchRewrapStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<RewrapProgress, Status>> + Send + 'static>,
    >;

    async fn watch_rewrap(
        &self,
        request: Request<WatchRewrapRequest>,
    ) -> Result<Response<Self::WatchRewrapStream>, Status> {
        // Not on `serve`: a stream, audited once as it opens (keys.rs says why).
        keys::watch_rewrap(self, request).await
    }

    async fn list_master_keys(
        &self,
        request: Request<ListMasterKeysRequest>,
    ) -> Result<Response<ListMasterKeysResponse>, Status> {
        self.serve(
            request,
            "ListMasterKeys",
            |_| None,
            |_, _| None,
            |this, _, _| Box::pin(keys::list_master_keys(this)),
        )
        .await
    }

    async fn set_master_key_state(
        &self,
        request: Request<SetMasterKeyStateRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        self.serve(
            request,
            SET_MASTER_KEY_STATE,
            |r| Some(format!("master key version {}", r.version)),
            |_, r| approval_detail(r),
            |this, officer, req| Box::pin(keys::set_master_key_state(this, officer, req)),
        )
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
}
