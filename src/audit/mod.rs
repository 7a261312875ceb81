//! The audit trail: every access decision, appended to an HMAC-chained JSON-lines file
//! before the response leaves.
//!
//! Each line is one entry; its `mac` is HMAC-SHA256 over the previous entry's MAC followed by
//! the entry's own bytes (the line without its `mac` field), under a key the token derives
//! for each segment of 4096 entries from the audit key, which never leaves it (see [`Chain`]).
//! Editing, removing, reordering or inserting an entry breaks the chain, and forging one needs
//! the token. Periodically (and at shutdown) the chain head and entry count are recorded as a
//! checkpoint in the token itself — a private data object that needs the user PIN to change —
//! so a truncated or rolled-back file is detected too.
//!
//! Writes are group-committed: one writer thread, which owns the file, takes every entry
//! waiting, chains them, writes them and fsyncs once, then acknowledges them all. The token
//! is asked for a MAC once per segment and for each checkpoint, not once per entry. If the
//! file cannot be written, every waiting request is refused (fail closed) and health says so.
//!
//! The trail's parts, one file each: `writer` (the thread that owns the file and
//! group-commits), `chain` (how entries are MAC'd; the log's header; the line format),
//! `checkpoint` (which log is current, and its chain head, recorded in the token), `recover`
//! (at start: whether the file is the token's current log and reaches its head), `rotate`
//! (starting a new log: rotation, the archive, the states a crash can leave), `verify` (what
//! `strongroom-admin audit verify` checks in one log), `history` (a log and its archived
//! predecessors, end to end) and `reconcile` (pairing the intents of changes with their
//! outcomes).
//!
//! A change to the store is written ahead: its **intent** entry (`"phase":"intent"`, naming
//! what it will write) is durable before the store commit, and its **outcome** entry
//! (`"phase":"outcome"`, `committed`, `failed` or `unknown`) follows it; both carry the same
//! `change` id. A crash between the two leaves an intent without an outcome, which the next
//! start reconciles against the store (see [`reconcile`]).

mod chain;
mod checkpoint;
mod history;
pub mod reconcile;
mod recover;
mod rotate;
#[cfg(test)]
mod tests;
mod verify;
mod writer;

pub use chain::{Chain, ChainFormat, Header, SEGMENT_LEN, split_line};
pub use checkpoint::{Checkpoint, LogEnd};
pub use history::{HistoryReport, LogReport, verify_history};
pub use rotate::{
    MAX_REASON_BYTES, Rotated, archive_dir, archive_path, archived_in, check_reason,
    parse_previous, parse_reason,
};
pub use verify::{Problem, ProblemKind, VerifyReport, read_entries, verify};
pub use writer::{AuditLog, AuditOptions};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use tonic::Code;

use crate::tls::Identity;

/// The length of an entry MAC in bytes.
pub const MAC_LEN: usize = 32;

/// One access decision, as a request handler reports it. Carries no value, data key or PIN.
#[derive(Debug, Clone)]
pub struct AuditEvent<'a> {
    /// `client` or `admin`.
    pub plane: &'static str,
    /// The authenticated caller, if authentication got that far.
    pub identity: Option<&'a Identity>,
    /// The RPC.
    pub operation: &'static str,
    /// The secret name, prefix, policy name or approval id as requested (may be invalid
    /// input), bounded for recording.
    pub name: Option<RecordedName<'a>>,
    /// The version served or written, if any.
    pub version: Option<u64>,
    /// The outcome's status code.
    pub status: Code,
    /// The request id.
    pub request_id: u64,
    /// Extra context (e.g. the approval an operation created).
    pub detail: Option<String>,
    /// For a change to the store: its intent or its outcome (see [`reconcile`]).
    pub change: Option<ChangeMark>,
}

/// What an entry says about a change to the store (written ahead: intent, then outcome).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeMark {
    /// Pairs the intent with its outcome; unique across restarts (see [`new_change_id`]).
    pub id: String,
    /// Intent or outcome.
    pub phase: Phase,
    /// What identifies the change once in the store (a record's digest, an approval id).
    pub fingerprint: Option<String>,
}

/// Whether an entry announces a change or reports what became of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Durable before the store commit.
    Intent,
    /// After it.
    Outcome(Outcome),
}

/// What became of an intended change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The change is in the store.
    Committed,
    /// The change is not in the store.
    Failed,
    /// The store answered with an error: whether the change applied is not known (the next
    /// start reconciles it).
    Unknown,
}

impl Outcome {
    /// As recorded in an entry's `outcome` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Failed => "failed",
            Outcome::Unknown => "unknown",
        }
    }
}

impl ChangeMark {
    /// The intent of change `id`.
    pub fn intent(id: &str, fingerprint: Option<String>) -> Self {
        Self {
            id: id.to_owned(),
            phase: Phase::Intent,
            fingerprint,
        }
    }

    /// The outcome of change `id`.
    pub fn outcome(id: &str, outcome: Outcome) -> Self {
        Self {
            id: id.to_owned(),
            phase: Phase::Outcome(outcome),
            fingerprint: None,
        }
    }
}

/// A change id unique across restarts: this process's random boot id and a counter.
pub fn new_change_id() -> String {
    use std::sync::OnceLock;
    static BOOT: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let boot = BOOT.get_or_init(|| {
        use ring::rand::SecureRandom;
        let mut id = [0u8; 8];
        match ring::rand::SystemRandom::new().fill(&mut id) {
            Ok(()) => hex::encode(id),
            // No randomness: the clock in nanoseconds, which a restart does not repeat.
            Err(_) => format!(
                "{:016x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            ),
        }
    });
    format!("{boot}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A requested name as the audit log and the process log record it: whole when it is plain
/// (at most the limit, only bytes some name grammar of the service allows:
/// `A-Z a-z 0-9 . _ - / *`), which every valid secret name, prefix, policy name and approval
/// id is; otherwise at most the limit's worth of it plus its length and SHA-256, so that a
/// caller with no rights cannot make either log grow by more than a bounded amount per call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedName<'a> {
    /// The name, or for a name that is not plain, its longest prefix (cut on a character
    /// boundary) whose JSON form is at most the limit's bytes.
    pub text: &'a str,
    /// For a name that is not plain: what identifies it whole.
    pub invalid: Option<InvalidName>,
}

/// The length and digest of a requested name that is not recorded as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidName {
    /// Its length in bytes.
    pub len: u64,
    /// SHA-256 of its bytes, lowercase hex.
    pub sha256: String,
    /// Whether [`RecordedName::text`] is only a prefix of it.
    pub truncated: bool,
}

impl<'a> RecordedName<'a> {
    /// How `name` is recorded when names of up to `limit` bytes are valid.
    pub fn new(name: &'a str, limit: usize) -> Self {
        let plain = name.len() <= limit
            && name.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b'*')
            });
        if plain {
            return Self {
                text: name,
                invalid: None,
            };
        }
        let mut json = 0usize;
        let mut end = 0usize;
        for (at, c) in name.char_indices() {
            json += json_len(c);
            if json > limit {
                break;
            }
            end = at + c.len_utf8();
        }
        Self {
            text: &name[..end],
            invalid: Some(InvalidName {
                len: name.len() as u64,
                sha256: name_sha256(name),
                truncated: end < name.len(),
            }),
        }
    }
}

/// SHA-256 of a name, lowercase hex, as `name_sha256` records it.
pub fn name_sha256(name: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, name.as_bytes()))
}

/// The bytes `c` takes in a JSON string as serde_json writes it.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// An audit entry as written: the line without its `mac` field. Field order is the byte
/// order of the line, and so part of what the MAC covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the chain, from 0.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// `client`, `admin` or `audit` (the log's own entries).
    pub plane: String,
    /// The caller's identity, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The operation.
    pub operation: String,
    /// The secret name, prefix, policy name or approval id; for a name that is not plain
    /// (see [`RecordedName`]), at most the limit's worth of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A name that is not plain: its whole length in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_len: Option<u64>,
    /// A name that is not plain: the SHA-256 of its whole bytes, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_sha256: Option<String>,
    /// A name that is not plain and was cut: `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_truncated: Option<bool>,
    /// The version served or written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// `allow`, `deny` or `error`.
    pub decision: String,
    /// The gRPC status code.
    pub status: String,
    /// The request id.
    pub request_id: u64,
    /// Extra context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A change to the store: `intent` (durable before the commit) or `outcome`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// A change to the store: the id its intent and outcome share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
    /// An outcome: `committed`, `failed` or `unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// An intent: what identifies the change once in the store (a digest of the record
    /// written, the approval that wrote a policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// A sink could not record an event.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be written or synced.
    #[error("cannot write the audit log {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The token could not compute the MACs.
    #[error("cannot MAC audit entries: {0}")]
    Hsm(#[from] crate::hsm::HsmError),
    /// The log is behind the token's checkpoint: truncated or rolled back.
    #[error(
        "the audit log {path} has {found} entries but the token's checkpoint records {expected}: it was truncated or rolled back; run `strongroom-admin audit verify {path}` and put the whole log back, or keep this file as evidence (move it away) and declare the log lost with `strongroom-admin audit new-log --reason …` while strongroomd is stopped"
    )]
    BehindCheckpoint {
        /// The file.
        path: String,
        /// Entries found.
        found: u64,
        /// Entries the checkpoint records.
        expected: u64,
    },
    /// The existing log does not parse.
    #[error("the audit log {path} is malformed at line {line}: {reason}")]
    Malformed {
        /// The file.
        path: String,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The writer has stopped.
    #[error("the audit writer has stopped")]
    Closed,
    /// The token records entries of a log whose file is missing or empty.
    #[error(
        "the audit log {path} is missing or empty, but the token's checkpoint records log {log_id} with {count} entries: put that log back at {path}, or, if it is lost, declare a new log with `strongroom-admin audit new-log --reason …` while strongroomd is stopped"
    )]
    Missing {
        /// The file.
        path: String,
        /// The log the token says is current.
        log_id: String,
        /// Its entries, as the token last recorded them.
        count: u64,
    },
    /// The file holds a log other than the one the token says is current.
    #[error(
        "the audit log {path} is log {found}, but the token's current log is {expected}: the file was swapped or replaced; keep it as evidence (move it away), run `strongroom-admin audit verify` on the genuine log and put it back at {path}, or, if it is lost, declare a new log with `strongroom-admin audit new-log --reason …` while strongroomd is stopped"
    )]
    NotCurrent {
        /// The file.
        path: String,
        /// The log it holds.
        found: String,
        /// The log the token says is current.
        expected: String,
    },
    /// The file does not reach the token's checkpointed head through valid links.
    #[error(
        "the audit log {path} does not reach the token's checkpointed head through valid links: line {line}: {reason}; it was edited or replaced: run `strongroom-admin audit verify {path}`, keep it as evidence, and put back the genuine log (or declare it lost with `strongroom-admin audit new-log --reason …` while strongroomd is stopped)"
    )]
    Unverified {
        /// The file.
        path: String,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// An archived log of that id exists already and is not this file.
    #[error(
        "cannot archive the audit log {path}: {archive} exists and is another file; archived logs are never overwritten: move it away and restart"
    )]
    ArchiveExists {
        /// The file.
        path: String,
        /// The archive name taken.
        archive: String,
    },
    /// The token's checkpoint does not parse.
    #[error("the token's audit checkpoint does not parse: {0}")]
    BadCheckpoint(String),
    /// An officer's reason for a new log is not acceptable.
    #[error("{0}")]
    BadReason(String),
}

/// Where the service's audit events go.
pub enum Auditor {
    /// The HMAC-chained, durable log: requests wait for their entry.
    Chained(AuditLog),
    /// Only the process log (`strongroom::audit` target). For benchmarks measuring the cost
    /// of auditing; never for production (`audit.dangerous_disable_audit`).
    DangerousLogOnly,
}

impl Auditor {
    /// Records an event; returns once it is durable. An error makes the request fail.
    /// `expected` is the request's announcement, if it made one.
    pub async fn record(
        &self,
        event: &AuditEvent<'_>,
        expected: Option<&Expected>,
    ) -> Result<(), AuditError> {
        let invalid = event.name.as_ref().and_then(|n| n.invalid.as_ref());
        tracing::info!(
            target: "strongroom::audit",
            plane = event.plane,
            identity = event.identity.map(Identity::as_str),
            operation = event.operation,
            name = event.name.as_ref().map(|n| n.text),
            name_len = invalid.map(|i| i.len),
            name_sha256 = invalid.map(|i| i.sha256.as_str()),
            name_truncated = invalid.and_then(|i| i.truncated.then_some(true)),
            version = event.version,
            status = ?event.status,
            request_id = event.request_id,
        );
        match self {
            Auditor::Chained(log) => log.append(event, expected).await,
            Auditor::DangerousLogOnly => Ok(()),
        }
    }

    /// Whether audit writes are succeeding.
    pub fn healthy(&self) -> bool {
        match self {
            Auditor::Chained(log) => log.healthy(),
            Auditor::DangerousLogOnly => true,
        }
    }

    /// Announces a request whose entry will follow: while it is in its handler, a group
    /// commit may wait for it (up to the commit window) instead of paying another fsync.
    /// The entry's [`Auditor::record`] (or dropping the guard) ends the announcement.
    pub fn announce(&self) -> Expected {
        let counter = match self {
            Auditor::Chained(log) => {
                log.expected.fetch_add(1, Ordering::AcqRel);
                Some(log.expected.clone())
            }
            Auditor::DangerousLogOnly => None,
        };
        Expected {
            counter,
            live: AtomicBool::new(true),
        }
    }
}

/// A request announced to the audit log (see [`Auditor::announce`]).
pub struct Expected {
    counter: Option<Arc<AtomicUsize>>,
    live: AtomicBool,
}

impl Expected {
    /// The request's entry has been queued (or will never come).
    fn arrived(&self) {
        if self.live.swap(false, Ordering::AcqRel)
            && let Some(c) = &self.counter
        {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.arrived();
    }
}

impl Entry {
    /// Whether this entry is about the name `name`: it records it whole, or records a cut
    /// of it with its SHA-256.
    pub fn is_about(&self, name: &str) -> bool {
        match &self.name_sha256 {
            Some(sha) => *sha == name_sha256(name),
            None => self.name.as_deref() == Some(name),
        }
    }
}
