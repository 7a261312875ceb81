//! AdminService: the officers' plane. Only identities from the admin CA that are listed in
//! `admin.officers` get in; guarded operations wait for a quorum of distinct officers.
//!
//! This file holds the service, its officers' check and audit, and the calls' dispatch;
//! each call is handled in the file of its kind: approvals and requesting a guarded
//! operation (`approval.rs`), running an approved one (`execute.rs`), stored policies
//! (`policy.rs`), master keys and re-wrap (`keys.rs`), and the store, its state and the
//! audit log's rotation (`store.rs`).

mod approval;
mod execute;
mod keys;
mod policy;
mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Code, Request, Response, Status};

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
    ListMasterKeysRequest, ListMasterKeysResponse, RewrapProgress, RewrapRequest, RewrapResponse,
    SetMasterKeyStateRequest, WatchRewrapRequest,
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

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        store::status(self, request).await
    }

    async fn put_policy(
        &self,
        request: Request<PutPolicyRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        policy::put_policy(self, request).await
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<PolicyInfo>, Status> {
        policy::get_policy(self, request).await
    }

    async fn list_policies(
        &self,
        request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        policy::list_policies(self, request).await
    }

    async fn delete_policy(
        &self,
        request: Request<DeletePolicyRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        policy::delete_policy(self, request).await
    }

    async fn check_policy(
        &self,
        request: Request<CheckPolicyRequest>,
    ) -> Result<Response<CheckPolicyResponse>, Status> {
        policy::check_policy(self, request).await
    }

    async fn destroy_secret(
        &self,
        request: Request<DestroySecretRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        store::destroy_secret(self, request).await
    }

    async fn rotate_master_key(
        &self,
        request: Request<RotateMasterKeyRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        keys::rotate_master_key(self, request).await
    }

    async fn rotate_audit_log(
        &self,
        request: Request<RotateAuditLogRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        store::rotate_audit_log(self, request).await
    }

    async fn accept_store_state(
        &self,
        request: Request<AcceptStoreStateRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        store::accept_store_state(self, request).await
    }

    async fn list_approvals(
        &self,
        request: Request<ListApprovalsRequest>,
    ) -> Result<Response<ListApprovalsResponse>, Status> {
        approval::list_approvals(self, request).await
    }

    async fn get_approval(
        &self,
        request: Request<GetApprovalRequest>,
    ) -> Result<Response<Approval>, Status> {
        approval::get_approval(self, request).await
    }

    async fn approve(
        &self,
        request: Request<ApproveRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        approval::approve(self, request).await
    }

    async fn reject(&self, request: Request<RejectRequest>) -> Result<Response<Approval>, Status> {
        approval::reject(self, request).await
    }

    async fn report_expiring(
        &self,
        request: Request<crate::proto::ReportExpiringRequest>,
    ) -> Result<Response<crate::proto::ReportExpiringResponse>, Status> {
        store::report_expiring(self, request).await
    }

    async fn rewrap(
        &self,
        request: Request<RewrapRequest>,
    ) -> Result<Response<RewrapResponse>, Status> {
        keys::rewrap(self, request).await
    }

    type WatchRewrapStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<RewrapProgress, Status>> + Send + 'static>,
    >;

    async fn watch_rewrap(
        &self,
        request: Request<WatchRewrapRequest>,
    ) -> Result<Response<Self::WatchRewrapStream>, Status> {
        keys::watch_rewrap(self, request).await
    }

    async fn list_master_keys(
        &self,
        request: Request<ListMasterKeysRequest>,
    ) -> Result<Response<ListMasterKeysResponse>, Status> {
        keys::list_master_keys(self, request).await
    }

    async fn set_master_key_state(
        &self,
        request: Request<SetMasterKeyStateRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        keys::set_master_key_state(self, request).await
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
