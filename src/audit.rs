//! The audit hook: every access decision is recorded before the response leaves.
//!
//! [`AuditSink`] is the seam; this version writes structured entries to the log
//! (target `strongroom::audit`). The HMAC-chained, durable log of the officers' plane plugs
//! in here. If a sink cannot record, the request is refused (fail closed).

use tonic::Code;

use crate::tls::Identity;

/// One access decision. Carries no value, data key or PIN.
#[derive(Debug, Clone)]
pub struct AuditEvent<'a> {
    /// `client` or `admin`.
    pub plane: &'static str,
    /// The authenticated caller, if authentication got that far.
    pub identity: Option<&'a Identity>,
    /// The RPC.
    pub operation: &'static str,
    /// The secret name or prefix as requested (may be invalid input).
    pub name: Option<&'a str>,
    /// The version served or written, if any.
    pub version: Option<u64>,
    /// The outcome's status code.
    pub status: Code,
    /// The request id.
    pub request_id: u64,
}

/// A sink could not record an event.
#[derive(Debug, thiserror::Error)]
#[error("audit sink failed: {0}")]
pub struct AuditError(pub String);

/// Where audit events go.
pub trait AuditSink: Send + Sync + 'static {
    /// Records an event; an error makes the request fail.
    fn record(&self, event: &AuditEvent<'_>) -> Result<(), AuditError>;
}

/// Writes audit events to the log.
#[derive(Debug, Default)]
pub struct LogAudit;

impl AuditSink for LogAudit {
    fn record(&self, e: &AuditEvent<'_>) -> Result<(), AuditError> {
        tracing::info!(
            target: "strongroom::audit",
            plane = e.plane,
            identity = e.identity.map(Identity::as_str),
            operation = e.operation,
            name = e.name,
            version = e.version,
            status = ?e.status,
            decision = if e.status == Code::Ok { "allow" } else { "deny" },
            request_id = e.request_id,
        );
        Ok(())
    }
}
