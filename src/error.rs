//! One error type for the request path and its one mapping to gRPC status codes.
//!
//! Clients get a code and a short message that names no secret; details go to the log.

use tonic::{Code, Status};

use crate::hsm::{FaultClass, HsmError};
use crate::store::StoreError;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input; the message names the field or limit.
    #[error("{0}")]
    InvalidArgument(String),
    /// The secret does not exist, or the caller may not learn that it does.
    #[error("secret not found")]
    NotFound,
    /// An officers' object (an approval, a policy) does not exist; the message names it and
    /// says what to do. Only on the admin plane, whose callers may know what exists.
    #[error("{0}")]
    Absent(String),
    /// The caller may not do this (only where the caller may know the name exists, or the
    /// decision is made before the store is touched).
    #[error("permission denied")]
    PermissionDenied,
    /// No usable client identity.
    #[error("{0}")]
    Unauthenticated(String),
    /// Check-and-set failed.
    #[error("version conflict: expected version {expected}, current version is {actual}")]
    VersionConflict {
        /// What the caller expected.
        expected: u64,
        /// What the store holds.
        actual: u64,
    },
    /// Other writers of the same name kept winning; the caller may retry.
    #[error("concurrent writers of this name kept winning; retry")]
    Contention,
    /// A master key is missing, or its wrap budget is spent.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The token failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record failed authentication or does not decode.
    #[error("{0}")]
    DataLoss(String),
    /// The audit entry could not be written; the request is refused.
    #[error("the audit log cannot be written: {0}")]
    Audit(String),
    /// A position the caller gave is outside what the service keeps (a watch too far
    /// behind); the message says what to do.
    #[error("{0}")]
    OutOfRange(String),
    /// A per-caller or total cap is reached (open watches); the caller may retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A once-only job's write was refused for its fence: another process holds the job's
    /// lock now (or nobody: the lease lapsed). Nothing was written.
    #[error("lost the job's lock: {0}")]
    LostLock(String),
    /// A bug or an unexpected runtime failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound | Error::Absent(_) => Code::NotFound,
            Error::PermissionDenied => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::VersionConflict { .. } | Error::Contention => Code::Aborted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Hsm(e) => match e {
                HsmError::NoMasterKey | HsmError::MasterKeyMissing(_) => Code::FailedPrecondition,
                HsmError::UnwrapAuthentication => Code::DataLoss,
                // The token's session cap: the caller may retry when load drops.
                HsmError::Pkcs11 {
                    rv: cryptoki::error::RvError::SessionCount,
                    ..
                } => Code::ResourceExhausted,
                e if e.class() == FaultClass::Authentication => Code::DataLoss,
                // Every other token fault: the answer is "not now", never wrong data.
                _ => Code::Unavailable,
            },
            Error::Store(StoreError::Corrupt { .. })
            | Error::Store(StoreError::Backend(sled::Error::Corruption { .. })) => Code::DataLoss,
            Error::Store(_) => Code::Unavailable,
            Error::DataLoss(_) => Code::DataLoss,
            Error::Audit(_) => Code::Unavailable,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            // Another replica runs the job now; retrying here would be refused again.
            Error::LostLock(_) => Code::Aborted,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// The message the client sees: specific for the caller's own mistakes, generic for
    /// server-side faults (whose detail is logged).
    fn client_message(&self) -> String {
        match self {
            Error::Hsm(HsmError::NoMasterKey) => {
                "no master key in the token; an officer must run `strongroom-admin key generate`"
                    .into()
            }
            Error::Hsm(HsmError::MasterKeyMissing(v)) => {
                format!("master key version {v} is not available in the token")
            }
            Error::Hsm(HsmError::UnwrapAuthentication) | Error::DataLoss(_) => {
                "the stored record failed authentication; it was not decrypted".into()
            }
            Error::Hsm(HsmError::Pkcs11 {
                rv: cryptoki::error::RvError::SessionCount,
                ..
            }) => "the HSM has no free session; retry later".into(),
            Error::Hsm(_) => "the HSM is unavailable; retry later".into(),
            Error::Store(StoreError::Corrupt { .. })
            | Error::Store(StoreError::Backend(sled::Error::Corruption { .. })) => {
                "the stored record is corrupt".into()
            }
            Error::Store(_) => "the store is unavailable; retry later".into(),
            Error::Audit(_) => "the audit log is unavailable; request refused".into(),
            Error::Internal(_) => "internal error".into(),
            other => other.to_string(),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        if matches!(
            code,
            Code::Unavailable | Code::DataLoss | Code::Internal | Code::FailedPrecondition
        ) {
            tracing::warn!(error = %e, ?code, "request failed");
        }
        Status::new(code, e.client_message())
    }
}
