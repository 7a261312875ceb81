//! Running an approved guarded operation: its audit entry, its intent written ahead, the
//! change itself, and its outcome.

use tonic::Code;

use super::{
    ACCEPT_STORE_STATE, AdminApiInner, DELETE_POLICY, DESTROY_SECRET, EXECUTE, Officer, PUT_POLICY,
    REWRAP, ROTATE_AUDIT_LOG, ROTATE_MASTER_KEY, SET_MASTER_KEY_STATE,
};
use crate::audit::{AuditEvent, ChangeMark, Outcome, RecordedName};
use crate::error::Error;
use crate::proto::ApprovalV1;
use crate::secret::SecretName;
use crate::service::approvals;
use crate::service::secrets::unix_now;
use crate::service::{self, blocking, policies};

impl AdminApiInner {
    /// Runs an approved operation and records the outcome in the approval. Its audit entry
    /// (the operation, its parameter digest and the approvals that counted) is written
    /// first; if it cannot be, the operation does not run. Then it is written ahead: its
    /// intent is durable before it touches the store or the token (if it cannot be written,
    /// the operation fails untried), and its outcome follows.
    pub(super) async fn execute(&self, officer: &Officer, a: &mut ApprovalV1) -> Result<(), Error> {
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
                service::update_health(&self.state).await;
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
            ACCEPT_STORE_STATE => service::rollback::accept(&self.state).await.map(|epoch| {
                format!("the store is accepted at epoch {epoch}; secrets are served again")
            }),
            ROTATE_AUDIT_LOG => service::rotate_audit_log(&self.state, &param("reason")).await,
            REWRAP => {
                service::rewrap::start(
                    &self.state,
                    param("from_version").parse().unwrap_or(0),
                    param("rate").parse().unwrap_or(0),
                    &a.id,
                )
                .await
            }
            SET_MASTER_KEY_STATE => match param("version").parse::<u32>() {
                Ok(v) => service::rewrap::set_state(&self.state, v, &param("state")).await,
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
        service::update_health(&self.state).await;
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
            service::update_health(&self.state).await;
            return Err(Error::Audit(e.to_string()));
        }
        Ok(Some((id, event)))
    }
}
