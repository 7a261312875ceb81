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
//!
//! # The code
//!
//! This file holds the types and [`Client::connect`]; `calls.rs` the typed calls and
//! [`Pages`], `failover.rs` the attempts across endpoints and the decision to move on,
//! `watch.rs` [`Watch`] and its resumption.

mod calls;
mod failover;
mod watch;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::explain::{self, Cause, Plane, Target};
use crate::proto::secret_service_client::SecretServiceClient;
use crate::secret::SecretValue;

pub use calls::Pages;
pub use watch::{Watch, WatchSpec};

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
}
