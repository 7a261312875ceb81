//! The service and its store: status, destroying a secret (guarded), accepting a rolled-back
//! store (guarded), rotating the audit log (guarded), and the report of what expires soon.

use super::{ACCEPT_STORE_STATE, AdminApiInner, DESTROY_SECRET, Officer, ROTATE_AUDIT_LOG};
use crate::error::Error;
use crate::hsm::keys::MacKey;
use crate::proto::{
    DestroySecretRequest, OperationResponse, ReportExpiringRequest, ReportExpiringResponse,
    RotateAuditLogRequest, StatusResponse,
};
use crate::secret::SecretName;
use crate::service::secrets::unix_now;
use crate::service::{self, blocking, policies};
use crate::store::Aux;

pub(super) async fn status(this: &AdminApiInner) -> Result<StatusResponse, Error> {
    let state = &this.state;
    let (bytes, secrets) = blocking(state, |s| Ok((s.size_on_disk()?, s.secret_count()?))).await?;
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
        quorum: this.quorum(),
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

pub(super) async fn destroy_secret(
    this: &AdminApiInner,
    officer: &Officer,
    req: &DestroySecretRequest,
) -> Result<OperationResponse, Error> {
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
        officer,
        DESTROY_SECRET,
        vec![("name", name.as_str().to_owned())],
    )
    .await
}

pub(super) async fn rotate_audit_log(
    this: &AdminApiInner,
    officer: &Officer,
    req: &RotateAuditLogRequest,
) -> Result<OperationResponse, Error> {
    crate::audit::check_reason(&req.reason).map_err(Error::InvalidArgument)?;
    let params = vec![("reason", req.reason.clone())];
    this.request_guarded(officer, ROTATE_AUDIT_LOG, params)
        .await
}

pub(super) async fn accept_store_state(
    this: &AdminApiInner,
    officer: &Officer,
) -> Result<OperationResponse, Error> {
    this.request_guarded(officer, ACCEPT_STORE_STATE, Vec::new())
        .await
}

pub(super) async fn report_expiring(
    this: &AdminApiInner,
    req: &ReportExpiringRequest,
) -> Result<ReportExpiringResponse, Error> {
    // Names and expiry times only, never values (src/service/expiry.rs).
    service::expiry::report(&this.state, req).await
}
