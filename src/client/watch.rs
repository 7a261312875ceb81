//! Watches that resume: a WatchSecrets stream opened again from the last revision on the
//! next endpoint when it breaks.

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::Code;

use crate::proto::{WatchEvent, WatchSecretsRequest};

use super::{Attempt, AttemptFailure, Client, ClientError, Retry};

impl Client {
    /// Watches the names and prefixes of `spec` from `spec.after_revision` (0: from now);
    /// nothing is sent until the first [`Watch::next`]. Resumes on another endpoint as the
    /// module documentation says.
    pub fn watch(&self, spec: WatchSpec) -> Watch<'_> {
        Watch {
            client: self,
            last: spec.after_revision,
            spec,
            stream: None,
        }
    }
}

/// What a watch follows ([`Client::watch`]).
#[derive(Debug, Clone, Default)]
pub struct WatchSpec {
    /// Exact names.
    pub names: Vec<String>,
    /// Prefixes ("" for everything the caller may read).
    pub prefixes: Vec<String>,
    /// Start after this revision (the last one seen); 0: from now.
    pub after_revision: u64,
}

/// A WatchSecrets stream that resumes on another endpoint ([`Client::watch`]).
pub struct Watch<'a> {
    client: &'a Client,
    spec: WatchSpec,
    /// The revision of the last event returned (or the one the watch started after).
    last: u64,
    /// The open stream and the endpoint serving it.
    stream: Option<(usize, tonic::Streaming<WatchEvent>)>,
}

impl fmt::Debug for Watch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("spec", &self.spec)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl Watch<'_> {
    /// The revision of the last event returned: where the watch resumes.
    pub fn last_revision(&self) -> u64 {
        self.last
    }

    /// The next event. Opens or reopens the stream as needed; fails with the service's
    /// answer (e.g. `OUT_OF_RANGE`: too far behind, list again), or when no endpoint serves
    /// the watch within the client's deadline, or when streams keep breaking before they
    /// carry an event (after as many attempts as a call makes).
    pub async fn next(&mut self) -> Result<WatchEvent, ClientError> {
        let mut fruitless = 0usize;
        loop {
            let (i, stream) = match &mut self.stream {
                Some((i, s)) => (*i, s),
                None => {
                    let opened = self.open().await?;
                    self.stream = Some(opened);
                    continue;
                }
            };
            let failure = match stream.message().await {
                Ok(Some(event)) => {
                    self.last = event.revision;
                    return Ok(event);
                }
                // Ended without a status: the replica went away mid-stream.
                Ok(None) => tonic::Status::unavailable("the stream ended"),
                Err(status) if resumable(&status) => status,
                Err(status) => {
                    self.stream = None;
                    return Err(ClientError::Status(status));
                }
            };
            self.stream = None;
            let n = self.client.endpoints.len();
            if std::error::Error::source(&failure).is_some() {
                *self.client.endpoints[i].channel.lock().await = None;
            }
            // Resume at the next endpoint: this one just failed.
            self.client.preferred.store((i + 1) % n, Ordering::Relaxed);
            fruitless += 1;
            if fruitless > self.client.max_attempts {
                return Err(ClientError::Unreachable(vec![Attempt {
                    target: self.client.endpoints[i].target.clone(),
                    failure: AttemptFailure::Call(failure),
                }]));
            }
            tracing::debug!(endpoint = %self.client.endpoints[i].target.addr, resume = self.last, status = ?failure.code(), "watch stream broke; resuming");
            let backoff = Duration::from_millis(25 << (fruitless - 1).min(4));
            tokio::time::sleep(backoff).await;
        }
    }

    /// Opens the stream after the last revision seen, on the endpoints in turn.
    pub(super) async fn open(&self) -> Result<(usize, tonic::Streaming<WatchEvent>), ClientError> {
        let (stream, i) = self
            .client
            .call_at(Retry::Idempotent, |mut c, _| {
                // No deadline on the stream itself: it lasts as long as the watch.
                let r = tonic::Request::new(WatchSecretsRequest {
                    names: self.spec.names.clone(),
                    prefixes: self.spec.prefixes.clone(),
                    after_revision: self.last,
                });
                async move { c.watch_secrets(r).await }
            })
            .await?;
        Ok((i, stream))
    }
}

/// Whether a watch stream's end is one to resume from on another endpoint.
pub(super) fn resumable(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        || matches!(
            status.code(),
            Code::Unavailable | Code::Aborted | Code::Cancelled | Code::Unknown
        )
}
