//! Failover across endpoints: each attempt's connection, whether a failed attempt was sent,
//! and the move to the next endpoint within the deadline and the attempt budget.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use crate::explain::{self, Cause};
use crate::proto::secret_service_client::SecretServiceClient;

use super::{Attempt, AttemptFailure, Client, ClientError, Endpoint, Retry};

impl Client {
    /// Runs `rpc` on the endpoints in turn, as the module documentation says.
    pub(super) async fn call<T, F, Fut>(&self, retry: Retry, rpc: F) -> Result<T, ClientError>
    where
        F: Fn(SecretServiceClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_at(retry, rpc).await.map(|(t, _)| t)
    }

    /// [`call`](Self::call), with the index of the endpoint that answered.
    pub(super) async fn call_at<T, F, Fut>(
        &self,
        retry: Retry,
        rpc: F,
    ) -> Result<(T, usize), ClientError>
    where
        F: Fn(SecretServiceClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.endpoints.len();
        let end = Instant::now() + self.deadline;
        let start = self.preferred.load(Ordering::Relaxed) % n;
        // The last failure per endpoint, in the order first tried.
        let mut failures: Vec<(usize, AttemptFailure)> = Vec::new();
        // The first endpoint where this write may have been applied.
        let mut maybe_applied: Option<(usize, AttemptFailure)> = None;
        for k in 0..self.max_attempts {
            if k > 0 {
                let backoff = Duration::from_millis(25 << (k - 1).min(4));
                tokio::time::sleep_until((Instant::now() + backoff).min(end)).await;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let i = (start + k) % n;
            let endpoint = &self.endpoints[i];
            let client = match self.channel(endpoint, left).await {
                Ok(c) => c,
                Err(crate::tls::ConnectError::Local(m)) => return Err(ClientError::Local(m)),
                Err(crate::tls::ConnectError::Remote(words)) => {
                    // Not sent: nothing left this process for that endpoint.
                    record(&mut failures, i, AttemptFailure::Connect(words));
                    continue;
                }
            };
            let timeout = self.attempt_timeout.min(left);
            let failure = match tokio::time::timeout(timeout, rpc(client, timeout)).await {
                Ok(Ok(resp)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok((resp.into_inner(), i));
                }
                Ok(Err(status)) if std::error::Error::source(&status).is_none() => {
                    if status.code() != Code::Unavailable {
                        // The service's answer.
                        if retry == Retry::CheckAndSet
                            && status.code() == Code::Aborted
                            && let Some((j, first)) = maybe_applied
                        {
                            return Err(self.outcome_unknown(j, first));
                        }
                        return Err(ClientError::Status(status));
                    }
                    // The service's "not now", which a replica may say after its write.
                    Failed::MaybeApplied(AttemptFailure::Call(status))
                }
                Ok(Err(status)) => {
                    *endpoint.channel.lock().await = None;
                    if self.not_sent(&status, endpoint, retry).await {
                        Failed::NotSent(AttemptFailure::Call(status))
                    } else {
                        Failed::MaybeApplied(AttemptFailure::Call(status))
                    }
                }
                Err(_) => {
                    // The connection is kept: a slow answer does not mean a broken one.
                    Failed::MaybeApplied(AttemptFailure::NoAnswer(timeout))
                }
            };
            match failure {
                Failed::NotSent(f) => record(&mut failures, i, f),
                Failed::MaybeApplied(f) => match retry {
                    Retry::Never => return Err(self.outcome_unknown(i, f)),
                    Retry::CheckAndSet if maybe_applied.is_none() => {
                        // Kept for the report; what is recorded is that it failed here.
                        record(&mut failures, i, f.clone());
                        maybe_applied = Some((i, f));
                    }
                    _ => record(&mut failures, i, f),
                },
            }
        }
        if let Some((j, first)) = maybe_applied {
            return Err(self.outcome_unknown(j, first));
        }
        Err(ClientError::Unreachable(
            failures
                .into_iter()
                .map(|(i, failure)| Attempt {
                    target: self.endpoints[i].target.clone(),
                    failure,
                })
                .collect(),
        ))
    }

    pub(super) fn outcome_unknown(&self, i: usize, failure: AttemptFailure) -> ClientError {
        ClientError::OutcomeUnknown(Box::new(Attempt {
            target: self.endpoints[i].target.clone(),
            failure,
        }))
    }

    /// The endpoint's kept connection, or a new one within `left`.
    pub(super) async fn channel(
        &self,
        endpoint: &Endpoint,
        left: Duration,
    ) -> Result<SecretServiceClient<Channel>, crate::tls::ConnectError> {
        let mut kept = endpoint.channel.lock().await;
        if let Some(c) = kept.as_ref() {
            return Ok(c.clone());
        }
        // Bounded by what is left of the call's deadline; the words name the attempt's.
        let target = &endpoint.target;
        let channel = match tokio::time::timeout(left, crate::tls::connect(target)).await {
            Ok(connected) => connected?,
            Err(_) => {
                return Err(crate::tls::ConnectError::Remote(explain::explain(
                    &Cause::DeadlinePassed,
                    target,
                )));
            }
        };
        // Room for the largest value a service may be configured to hold.
        let c = SecretServiceClient::new(channel)
            .max_decoding_message_size(crate::config::MAX_VALUE_BYTES_CEILING + 1024 * 1024);
        *kept = Some(c.clone());
        Ok(c)
    }

    /// Whether a connection failure happened before the request could be acted on. A write
    /// whose failure does not say so is probed (see the module documentation).
    pub(super) async fn not_sent(
        &self,
        status: &tonic::Status,
        endpoint: &Endpoint,
        retry: Retry,
    ) -> bool {
        let Some(source) = std::error::Error::source(status) else {
            return false;
        };
        if let Some(cause) = explain::cause(source) {
            return handshake_cause(&cause);
        }
        if retry == Retry::Idempotent {
            // A read moves on either way; no need to ask.
            return false;
        }
        let target = endpoint.target.clone();
        // Only a refusal of this client's certificate says the request was never read: a
        // probe refused or unanswered says the server is gone now, not that it never acted
        // on the request (a replica killed after its write, before its answer).
        matches!(
            tokio::task::spawn_blocking(move || explain::probe(&target)).await,
            Ok(Some(c)) if client_certificate_refused(&c)
        )
    }
}

/// How an attempt failed, for the decision to move on.
pub(super) enum Failed {
    NotSent(AttemptFailure),
    MaybeApplied(AttemptFailure),
}

/// Causes that only a connect or a TLS handshake produce: the request was not acted on.
pub(super) fn handshake_cause(cause: &Cause) -> bool {
    match cause {
        Cause::ConnectionRefused
        | Cause::NameNotResolved
        | Cause::ClientCaUnknown
        | Cause::CertificateRequired
        | Cause::ClientCertificateRevoked
        | Cause::ClientCertificateExpired
        | Cause::ClientCertificateRefused(_)
        | Cause::ServerCaUnknown
        | Cause::ServerCertificateExpired(_)
        | Cause::ServerCertificateRevoked
        | Cause::WrongServerName(_)
        | Cause::ServerCertificateBad(_) => true,
        // An established connection can time out or lose its route with a request on it.
        Cause::Unreachable | Cause::DeadlinePassed => false,
    }
}

/// Causes that say the server refused this client's certificate in the handshake.
pub(super) fn client_certificate_refused(cause: &Cause) -> bool {
    matches!(
        cause,
        Cause::ClientCaUnknown
            | Cause::CertificateRequired
            | Cause::ClientCertificateRevoked
            | Cause::ClientCertificateExpired
            | Cause::ClientCertificateRefused(_)
    )
}

/// Keeps the last failure per endpoint, in the order endpoints were first tried.
pub(super) fn record(
    failures: &mut Vec<(usize, AttemptFailure)>,
    i: usize,
    failure: AttemptFailure,
) {
    match failures.iter_mut().find(|(j, _)| *j == i) {
        Some(slot) => slot.1 = failure,
        None => failures.push((i, failure)),
    }
}

pub(super) fn request<T>(timeout: Duration, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(timeout);
    r
}
