//! A typed client for SecretService that knows several endpoints (replicas) and fails over.
//!
//! Connections are made lazily, on an endpoint's first use, through [`crate::tls::connect`],
//! and kept. A call starts at the endpoint that answered last and moves to the next one
//! when the attempt fails for the connection's sake or the service answers `UNAVAILABLE`,
//! within the client's overall deadline, a bounded number of attempts, and a small backoff
//! between attempts.
//!
//! # Which calls move to another endpoint
//!
//! A failed attempt is one of three kinds:
//!
//! - **not sent**: the request never reached a service that would act on it. These are
//!   failures to connect (TCP refused or unreachable, the name does not resolve, the
//!   connect deadline passed, the TLS handshake failed either way), and connection errors
//!   on a kept connection whose cause is one that only a connect or handshake produces:
//!   connection refused, an unresolvable name, a server certificate the client rejects, or
//!   a TLS alert refusing the client's certificate. (With TLS 1.3 a client sends its
//!   request right after its half of the handshake; a server that refuses the client's
//!   certificate never reads it. When a write's failure does not say why, [`explain::probe`]
//!   asks the endpoint on a fresh handshake, and a refusal of the certificate counts as not
//!   sent.) Every call, writes included, moves on after such a failure.
//! - **maybe applied**: the connection broke, reset or timed out after the request may
//!   have left, or the service answered `UNAVAILABLE` (a replica may fail after its
//!   write). Idempotent calls move on: `get`, `describe`, `list`, and `put` with
//!   `expected_version` (a check-and-set cannot apply twice). `put` without it and
//!   `delete` do not: they fail with [`ClientError::OutcomeUnknown`] ("outcome unknown:
//!   read back before retrying"). A check-and-set `put` retried after such a failure that
//!   then meets `ABORTED` is also reported as outcome unknown: the first attempt may be the
//!   write that moved the version on.
//! - **an answer**: any other status from the service is returned as it is, at once.
//!
//! # Watches
//!
//! [`Client::watch`] opens a WatchSecrets stream like an idempotent call, and keeps the
//! revision of the last event it returned. When the stream breaks (the connection fails, the
//! replica stops) or the service ends it with `UNAVAILABLE` or `ABORTED` (a watcher too
//! slow), it is opened again from that revision, starting at the next endpoint: every event
//! arrives once, in order, across replicas. `OUT_OF_RANGE` (too far behind: list again) and
//! every other answer end the watch.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::explain::{self, Cause, Plane, Target};
use crate::proto::secret_service_client::SecretServiceClient;
use crate::proto::{
    DeleteSecretRequest, DeleteSecretResponse, DescribeSecretRequest, DescribeSecretResponse,
    GetSecretRequest, ListSecretsRequest, ListSecretsResponse, PutSecretRequest, PutSecretResponse,
    WatchEvent, WatchSecretsRequest,
};
use crate::secret::SecretValue;

/// The words a write that may have been applied is reported with.
pub const OUTCOME_UNKNOWN: &str = "outcome unknown: read back before retrying";

/// The client's TLS settings: the CA the servers' certificates chain to, the client's own
/// certificate and key, and the name checked in the servers' certificates (default: each
/// endpoint's host).
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The CA that issued the servers' certificates (PEM).
    pub server_ca: PathBuf,
    /// The client certificate (PEM).
    pub cert: PathBuf,
    /// The client's private key (PEM).
    pub key: PathBuf,
    /// The name checked in every server's certificate; `None`: the endpoint's host.
    pub server_name: Option<String>,
}

/// Options of a `put`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PutOptions {
    /// Write only if the current version is this (0: the name must not exist). A put with
    /// it is retried on another endpoint; one without it is not.
    pub expected_version: Option<u64>,
    /// Stop serving the new version at this time (Unix seconds).
    pub expires_at_unix: Option<i64>,
    /// Do not serve the new version before this time (Unix seconds).
    pub not_before_unix: Option<i64>,
    /// Keep at most this many versions of the secret from now on (0: every one; `None`:
    /// as it was).
    pub max_versions: Option<u32>,
}

/// One version of a secret, as read. The value zeroizes on drop; `Debug` leaves it out.
pub struct Secret {
    /// The secret's name.
    pub name: String,
    /// The version read.
    pub version: u64,
    /// The value.
    pub value: SecretValue,
    /// When the version was written (Unix seconds).
    pub created_at_unix: i64,
    /// When the version stops being served, if ever (Unix seconds).
    pub expires_at_unix: Option<i64>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("value", &format_args!("<{} bytes>", self.value.len()))
            .field("created_at_unix", &self.created_at_unix)
            .field("expires_at_unix", &self.expires_at_unix)
            .finish()
    }
}

/// How one attempt at one endpoint failed.
#[derive(Debug, Clone)]
pub enum AttemptFailure {
    /// The connection could not be made; the reason in words ([`explain`]).
    Connect(String),
    /// The call failed: a connection error (the status has a source) or the service's
    /// `UNAVAILABLE`.
    Call(tonic::Status),
    /// No answer within the attempt's time.
    NoAnswer(Duration),
}

/// The last failure seen at one endpoint.
#[derive(Debug)]
pub struct Attempt {
    /// The endpoint, with the settings used for it (for [`explain::rpc_failure`]).
    pub target: Target,
    /// What went wrong.
    pub failure: AttemptFailure,
}

impl Attempt {
    /// The failure in words: an explanation when its cause is known, else the error chain
    /// or the service's answer. Never probes.
    pub fn words(&self) -> String {
        let addr = &self.target.addr;
        match &self.failure {
            AttemptFailure::Connect(words) => words.clone(),
            AttemptFailure::NoAnswer(after) => {
                let mut target = self.target.clone();
                target.deadline = *after;
                explain::explain(&Cause::DeadlinePassed, &target)
            }
            AttemptFailure::Call(status) => match std::error::Error::source(status) {
                Some(source) => match explain::cause(source) {
                    Some(c) => explain::explain(&c, &self.target),
                    None => format!(
                        "the connection to {addr} failed: {}",
                        explain::chain_text(source)
                    ),
                },
                None => format!("{addr} answered {:?}: {}", status.code(), status.message()),
            },
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Local settings are wrong: an address that does not parse, a certificate or key that
    /// cannot be read, no endpoint at all.
    #[error("{0}")]
    Local(String),
    /// The service answered with this status (not found, permission denied, aborted, …).
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// No endpoint served the call; the last failure at each endpoint tried, in order.
    #[error("{}", unreachable_words(.0))]
    Unreachable(Vec<Attempt>),
    /// A write may or may not have been applied: read back before retrying.
    #[error("{}; {OUTCOME_UNKNOWN}", .0.words())]
    OutcomeUnknown(Box<Attempt>),
}

fn unreachable_words(attempts: &[Attempt]) -> String {
    match attempts {
        [] => "no endpoint was tried within the deadline".into(),
        [one] => one.words(),
        many => format!(
            "every endpoint failed: {}",
            many.iter()
                .map(|a| format!("{}: {}", a.target.addr, a.words()))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

/// Whether a call may be sent again after it may have been applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads.
    Idempotent,
    /// A check-and-set write: cannot apply twice, but a retry may meet its own write.
    CheckAndSet,
    /// Writes that would apply twice.
    Never,
}

/// A SecretService client over several endpoints. Cheap to share by reference; calls may
/// run concurrently.
pub struct Client {
    endpoints: Vec<Endpoint>,
    /// The endpoint that answered last: where the next call starts.
    preferred: AtomicUsize,
    deadline: Duration,
    attempt_timeout: Duration,
    max_attempts: usize,
}

struct Endpoint {
    target: Target,
    channel: Mutex<Option<SecretServiceClient<Channel>>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field(
                "endpoints",
                &self
                    .endpoints
                    .iter()
                    .map(|e| e.target.addr.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `endpoints` (`https://host:port` each), with mutual TLS as `tls` says;
    /// `deadline` bounds each call, all its attempts together. Nothing is connected yet:
    /// each endpoint is connected on first use and the connection kept. The addresses are
    /// parsed and the certificate files read here, so local mistakes show at once.
    ///
    /// Defaults: each attempt may take the deadline divided by the number of endpoints (at
    /// least 1 s, at most the deadline), so one silent endpoint leaves time for the next;
    /// at most two attempts per endpoint.
    pub fn connect(
        endpoints: &[String],
        tls: &ClientTls,
        deadline: Duration,
    ) -> Result<Self, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::Local("no endpoint given".into()));
        }
        crate::tls::client_config(
            &tls.server_ca,
            &tls.cert,
            &tls.key,
            tls.server_name.as_deref().unwrap_or("localhost"),
        )
        .map_err(|e| ClientError::Local(e.to_string()))?;
        let n = endpoints.len();
        let per_attempt = (deadline / n as u32)
            .max(Duration::from_secs(1))
            .min(deadline);
        let mut list = Vec::with_capacity(n);
        for addr in endpoints {
            let uri = addr
                .parse::<tonic::transport::Uri>()
                .map_err(|e| ClientError::Local(format!("bad address {addr}: {e}")))?;
            if uri.host().is_none() {
                return Err(ClientError::Local(format!(
                    "bad address {addr}: expected https://host:port"
                )));
            }
            list.push(Endpoint {
                target: Target::new(
                    Plane::Client,
                    addr,
                    &tls.server_ca,
                    Some((&tls.cert, &tls.key)),
                    tls.server_name.as_deref(),
                    per_attempt,
                ),
                channel: Mutex::new(None),
            });
        }
        Ok(Self {
            endpoints: list,
            preferred: AtomicUsize::new(0),
            deadline,
            attempt_timeout: per_attempt,
            max_attempts: 2 * n,
        })
    }

    /// Bounds each attempt to `timeout` (and always to what is left of the deadline).
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        for e in &mut self.endpoints {
            e.target.deadline = timeout;
        }
        self
    }

    /// At most `attempts` attempts per call (at least one), over all endpoints.
    pub fn with_max_attempts(mut self, attempts: usize) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The endpoints, in the order given.
    pub fn endpoints(&self) -> impl Iterator<Item = &str> {
        self.endpoints.iter().map(|e| e.target.addr.as_str())
    }

    /// Reads `version` of `name` (0: the latest). Retried on another endpoint.
    pub async fn get(&self, name: &str, version: u64) -> Result<Secret, ClientError> {
        let resp = self
            .call(Retry::Idempotent, |mut c, timeout| {
                let r = request(
                    timeout,
                    GetSecretRequest {
                        name: name.to_owned(),
                        version,
                    },
                );
                async move { c.get_secret(r).await }
            })
            .await?;
        let value = Zeroizing::new(resp.value);
        Ok(Secret {
            name: resp.name,
            version: resp.version,
            value: SecretValue::new(value),
            created_at_unix: resp.created_at_unix,
            expires_at_unix: resp.expires_at_unix,
        })
    }

    /// Writes a new version of `name`. Moved to another endpoint only when the attempt was
    /// not sent, unless `options.expected_version` is set.
    pub async fn put(
        &self,
        name: &str,
        value: &SecretValue,
        options: PutOptions,
    ) -> Result<PutSecretResponse, ClientError> {
        self.put_protected(name, value, options, None).await
    }

    /// [`Client::put`] with a protection for the new version (`None`: the store's default).
    pub async fn put_protected(
        &self,
        name: &str,
        value: &SecretValue,
        options: PutOptions,
        protection: Option<crate::secret::Protection>,
    ) -> Result<PutSecretResponse, ClientError> {
        let protection = protection.map_or(0, crate::secret::Protection::to_request);
        let retry = if options.expected_version.is_some() {
            Retry::CheckAndSet
        } else {
            Retry::Never
        };
        self.call(retry, |mut c, timeout| {
            // The request's copy is encoded and dropped by tonic, unzeroized: the same
            // exposure as any gRPC client that sends the value.
            let r = request(
                timeout,
                PutSecretRequest {
                    name: name.to_owned(),
                    value: value.expose().to_vec(),
                    expected_version: options.expected_version,
                    expires_at_unix: options.expires_at_unix,
                    protection,
                    not_before_unix: options.not_before_unix,
                    max_versions: options.max_versions,
                },
            );
            async move { c.put_secret(r).await }
        })
        .await
    }

    /// Versions and metadata of `name`, never values. Retried on another endpoint.
    pub async fn describe(&self, name: &str) -> Result<DescribeSecretResponse, ClientError> {
        self.call(Retry::Idempotent, |mut c, timeout| {
            let r = request(
                timeout,
                DescribeSecretRequest {
                    name: name.to_owned(),
                },
            );
            async move { c.describe_secret(r).await }
        })
        .await
    }

    /// One page of the names under `prefix` (`page_size` 0: the service's default),
    /// continuing from `page_token` (empty: the first page). Page tokens are accepted by
    /// every replica of the same token. Retried on another endpoint.
    pub async fn list(
        &self,
        prefix: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<ListSecretsResponse, ClientError> {
        self.list_expiring(prefix, page_size, page_token, None)
            .await
    }

    /// [`list`](Self::list), keeping only the names whose latest version expires within
    /// `expiring_within` seconds from now (`None`: every name); their expiry is in the
    /// response's `expiring`. A filtered page may be short or empty while more follow.
    pub async fn list_expiring(
        &self,
        prefix: &str,
        page_size: u32,
        page_token: &str,
        expiring_within: Option<u64>,
    ) -> Result<ListSecretsResponse, ClientError> {
        self.call(Retry::Idempotent, |mut c, timeout| {
            let r = request(
                timeout,
                ListSecretsRequest {
                    prefix: prefix.to_owned(),
                    page_size,
                    page_token: page_token.to_owned(),
                    expiring_within_seconds: expiring_within,
                },
            );
            async move { c.list_secrets(r).await }
        })
        .await
    }

    /// Every page of the names under `prefix`, one call per page, each with the whole
    /// deadline and failover.
    pub fn pages<'a>(&'a self, prefix: &str, page_size: u32) -> Pages<'a> {
        Pages {
            client: self,
            prefix: prefix.to_owned(),
            page_size,
            token: String::new(),
            done: false,
        }
    }

    /// Destroys every version of `name`. Moved to another endpoint only when the attempt
    /// was not sent.
    pub async fn delete(&self, name: &str) -> Result<DeleteSecretResponse, ClientError> {
        self.call(Retry::Never, |mut c, timeout| {
            let r = request(
                timeout,
                DeleteSecretRequest {
                    name: name.to_owned(),
                },
            );
            async move { c.delete_secret(r).await }
        })
        .await
    }

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

    /// Runs `rpc` on the endpoints in turn, as the module documentation says.
    async fn call<T, F, Fut>(&self, retry: Retry, rpc: F) -> Result<T, ClientError>
    where
        F: Fn(SecretServiceClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_at(retry, rpc).await.map(|(t, _)| t)
    }

    /// [`call`](Self::call), with the index of the endpoint that answered.
    async fn call_at<T, F, Fut>(&self, retry: Retry, rpc: F) -> Result<(T, usize), ClientError>
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

    fn outcome_unknown(&self, i: usize, failure: AttemptFailure) -> ClientError {
        ClientError::OutcomeUnknown(Box::new(Attempt {
            target: self.endpoints[i].target.clone(),
            failure,
        }))
    }

    /// The endpoint's kept connection, or a new one within `left`.
    async fn channel(
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
    async fn not_sent(&self, status: &tonic::Status, endpoint: &Endpoint, retry: Retry) -> bool {
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
enum Failed {
    NotSent(AttemptFailure),
    MaybeApplied(AttemptFailure),
}

/// Causes that only a connect or a TLS handshake produce: the request was not acted on.
fn handshake_cause(cause: &Cause) -> bool {
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
fn client_certificate_refused(cause: &Cause) -> bool {
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
fn record(failures: &mut Vec<(usize, AttemptFailure)>, i: usize, failure: AttemptFailure) {
    match failures.iter_mut().find(|(j, _)| *j == i) {
        Some(slot) => slot.1 = failure,
        None => failures.push((i, failure)),
    }
}

fn request<T>(timeout: Duration, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(timeout);
    r
}

/// The pages of a listing, fetched one call at a time ([`Client::pages`]).
pub struct Pages<'a> {
    client: &'a Client,
    prefix: String,
    page_size: u32,
    token: String,
    done: bool,
}

impl Pages<'_> {
    /// The next page's names; `None` after the last page. After an error, the same page
    /// is asked for again on the next call.
    pub async fn next(&mut self) -> Option<Result<Vec<String>, ClientError>> {
        if self.done {
            return None;
        }
        match self
            .client
            .list(&self.prefix, self.page_size, &self.token)
            .await
        {
            Ok(page) => {
                self.token = page.next_page_token;
                self.done = self.token.is_empty();
                Some(Ok(page.names))
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Every remaining name, all pages collected.
    pub async fn collect(mut self) -> Result<Vec<String>, ClientError> {
        let mut names = Vec::new();
        while let Some(page) = self.next().await {
            names.extend(page?);
        }
        Ok(names)
    }

    /// The token of the next page; empty once the last page has been read.
    pub fn next_page_token(&self) -> &str {
        &self.token
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
    async fn open(&self) -> Result<(usize, tonic::Streaming<WatchEvent>), ClientError> {
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
fn resumable(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        || matches!(
            status.code(),
            Code::Unavailable | Code::Aborted | Code::Cancelled | Code::Unknown
        )
}
