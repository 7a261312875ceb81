//! The service and its store: status, destroying a secret (guarded), accepting a rolled-back
//! store (guarded), rotating the audit log (guarded), and the report of what expires soon.

use tonic::{Request, Response, Status};

use super::approval::approval_detail;
use super::{ACCEPT_STORE_STATE, AdminApi, AdminApiInner, DESTROY_SECRET, ROTATE_AUDIT_LOG};
use crate::error::Error;
use crate::hsm::keys::MacKey;
use crate::proto::{
    AcceptStoreStateRequest, DestroySecretRequest, OperationResponse, RotateAuditLogRequest,
    StatusRequest, StatusResponse,
};
use crate::secret::SecretName;
use crate::service::secrets::unix_now;
use crate::service::{self, blocking, policies};
use crate::store::Aux;

pub(super) async fn status(
    api: &AdminApi,
    request: Request<StatusRequest>,
) -> Result<Response<StatusResponse>, Status> {
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
        let officer = this.begin(&request, "Status").await?;
        let result = this.status_inner().await;
        this.finish(&officer, "Status", None, result, None).await
    })
    .await
}

pub(super) async fn destroy_secret(
    api: &AdminApi,
    request: Request<DestroySecretRequest>,
) -> Result<Response<OperationResponse>, Status> {
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
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

pub(super) async fn rotate_audit_log(
    api: &AdminApi,
    request: Request<RotateAuditLogRequest>,
) -> Result<Response<OperationResponse>, Status> {
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
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

pub(super) async fn accept_store_state(
    api: &AdminApi,
    request: Request<AcceptStoreStateRequest>,
) -> Result<Response<OperationResponse>, Status> {
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
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

pub(super) async fn report_expiring(
    api: &AdminApi,
    request: Request<crate::proto::ReportExpiringRequest>,
) -> Result<Response<crate::proto::ReportExpiringResponse>, Status> {
    // Names and expiry times only, never values (src/service/expiry.rs).
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
        let officer = this.begin(&request, "ReportExpiring").await?;
        let result = service::expiry::report(&this.state, request.get_ref()).await;
        this.finish(&officer, "ReportExpiring", None, result, None)
            .await
    })
    .await
}

impl AdminApiInner {
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
