//! The audit trail: every access decision, appended to an HMAC-chained JSON-lines file
//! before the response leaves.
//!
//! Each line is one entry; its `mac` is HMAC-SHA256, computed in the token with a key that
//! never leaves it, over the previous entry's MAC followed by the entry's own bytes (the line
//! without its `mac` field). Editing, removing, reordering or inserting an entry breaks the
//! chain. Periodically (and at shutdown) the chain head and entry count are recorded as a
//! checkpoint in the token itself — a private data object that needs the user PIN to change —
//! so a truncated or rolled-back file is detected too.
//!
//! Writes are group-committed: one writer task takes every entry waiting, computes their
//! MACs in one token job, writes them and fsyncs once, then acknowledges them all. If the
//! file cannot be written, every waiting request is refused (fail closed) and health says so.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tonic::Code;

use crate::hsm::Hsm;
use crate::hsm::keys::MacKey;
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
    /// The secret name, policy name or approval id as requested (may be invalid input).
    pub name: Option<&'a str>,
    /// The version served or written, if any.
    pub version: Option<u64>,
    /// The outcome's status code.
    pub status: Code,
    /// The request id.
    pub request_id: u64,
    /// Extra context (e.g. the approval an operation created).
    pub detail: Option<String>,
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
    /// The secret name, policy name or approval id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
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
}

/// The checkpoint kept in the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The log this checkpoint belongs to (from its first entry).
    pub log_id: String,
    /// Entries in the log when the checkpoint was taken.
    pub count: u64,
    /// MAC of the last of them, hex.
    pub head: String,
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
        "the audit log {path} has {found} entries but the token's checkpoint records {expected}: it was truncated or rolled back; run `strongroom-admin audit verify {path}`, archive it, and start with a new audit.path"
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
    pub async fn record(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        tracing::info!(
            target: "strongroom::audit",
            plane = event.plane,
            identity = event.identity.map(Identity::as_str),
            operation = event.operation,
            name = event.name,
            version = event.version,
            status = ?event.status,
            request_id = event.request_id,
        );
        match self {
            Auditor::Chained(log) => log.append(event).await,
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
}

/// Tuning of the audit log.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// The log file.
    pub path: PathBuf,
    /// Most entries in one group commit.
    pub max_batch: usize,
    /// Write a checkpoint after this many entries.
    pub checkpoint_every: u64,
    /// And at least this often while entries arrive.
    pub checkpoint_interval: Duration,
    /// Deadline for the token's MAC computation.
    pub hsm_timeout: Duration,
}

struct Pending {
    entry: PendingEntry,
    done: oneshot::Sender<Result<(), AuditError>>,
}

enum Msg {
    Append(Pending),
    Checkpoint(oneshot::Sender<Result<(), AuditError>>),
}

struct PendingEntry {
    plane: String,
    identity: Option<String>,
    operation: String,
    name: Option<String>,
    version: Option<u64>,
    status: Code,
    request_id: u64,
    detail: Option<String>,
}

/// The HMAC-chained audit log.
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    healthy: Arc<AtomicBool>,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (or starts) the log at `options.path`, checks it against the token's checkpoint
    /// and starts the writer task.
    pub async fn open(hsm: Arc<Hsm>, options: AuditOptions) -> Result<Self, AuditError> {
        let path = options.path.clone();
        let io = |source| AuditError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io)?;
        let tail = {
            let p = path.clone();
            tokio::task::spawn_blocking(move || recover_tail(&p))
                .await
                .map_err(|_| AuditError::Closed)??
        };
        let checkpoint = hsm
            .read_checkpoint()
            .await?
            .and_then(|v| serde_json::from_slice::<Checkpoint>(&v).ok());

        let mut writer = Writer {
            hsm,
            file: Some(file),
            path: path.clone(),
            options,
            next_seq: 0,
            prev: vec![0u8; MAC_LEN],
            log_id: String::new(),
            since_checkpoint: 0,
        };
        match tail {
            Some(tail) => {
                if let Some(cp) = &checkpoint
                    && cp.log_id == tail.log_id
                    && cp.count > tail.count
                {
                    return Err(AuditError::BehindCheckpoint {
                        path: path.display().to_string(),
                        found: tail.count,
                        expected: cp.count,
                    });
                }
                writer.next_seq = tail.count;
                writer.prev = tail.last_mac;
                writer.log_id = tail.log_id;
            }
            None => {
                // A new log. Its first entry names the previous one the token knew of, so a
                // deleted log leaves a trace in its successor.
                writer.log_id = new_log_id()?;
                let detail = match &checkpoint {
                    Some(cp) => format!(
                        "log_id={}; previous log_id={} count={} head={}",
                        writer.log_id, cp.log_id, cp.count, cp.head
                    ),
                    None => format!("log_id={}", writer.log_id),
                };
                writer
                    .write_batch(vec![internal_entry("AuditLogStarted", detail)])
                    .await?;
                writer.checkpoint().await?;
            }
        }

        let healthy = Arc::new(AtomicBool::new(true));
        let (tx, rx) = mpsc::channel(writer.options.max_batch.max(1) * 16);
        tokio::spawn(writer.run(rx, healthy.clone()));
        Ok(Self { tx, healthy, path })
    }

    /// Whether the last write succeeded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an event; returns once it is durable.
    pub async fn append(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        let (done, rx) = oneshot::channel();
        let entry = PendingEntry {
            plane: event.plane.to_owned(),
            identity: event.identity.map(|i| i.as_str().to_owned()),
            operation: event.operation.to_owned(),
            name: event.name.map(str::to_owned),
            version: event.version,
            status: event.status,
            request_id: event.request_id,
            detail: event.detail.clone(),
        };
        self.tx
            .send(Msg::Append(Pending { entry, done }))
            .await
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Records a checkpoint now (after everything sent before), e.g. at shutdown.
    pub async fn checkpoint(&self) -> Result<(), AuditError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Msg::Checkpoint(done))
            .await
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }
}

struct Writer {
    hsm: Arc<Hsm>,
    file: Option<File>,
    path: PathBuf,
    options: AuditOptions,
    next_seq: u64,
    prev: Vec<u8>,
    log_id: String,
    since_checkpoint: u64,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, healthy: Arc<AtomicBool>) {
        let mut tick = tokio::time::interval(self.options.checkpoint_interval);
        tick.tick().await;
        loop {
            let first = tokio::select! {
                m = rx.recv() => match m {
                    Some(Msg::Append(p)) => p,
                    Some(Msg::Checkpoint(done)) => {
                        let r = if self.since_checkpoint > 0 { self.checkpoint().await } else { Ok(()) };
                        let _ = done.send(r);
                        continue;
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if self.since_checkpoint > 0 && let Err(e) = self.checkpoint().await {
                        tracing::error!(error = %e, "audit checkpoint failed");
                        healthy.store(false, Ordering::Relaxed);
                    }
                    continue;
                }
            };
            let mut batch = vec![first];
            let mut checkpoint_after = None;
            while batch.len() < self.options.max_batch {
                match rx.try_recv() {
                    Ok(Msg::Append(p)) => batch.push(p),
                    Ok(Msg::Checkpoint(done)) => {
                        checkpoint_after = Some(done);
                        break;
                    }
                    Err(_) => break,
                }
            }
            let (entries, acks): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.entry, p.done)).unzip();
            let entries = entries.into_iter().map(to_entry).collect();
            match self.write_batch(entries).await {
                Ok(()) => {
                    healthy.store(true, Ordering::Relaxed);
                    for ack in acks {
                        let _ = ack.send(Ok(()));
                    }
                    if checkpoint_after.is_some()
                        || self.since_checkpoint >= self.options.checkpoint_every
                    {
                        let r = self.checkpoint().await;
                        if let Err(e) = &r {
                            tracing::error!(error = %e, "audit checkpoint failed");
                            healthy.store(false, Ordering::Relaxed);
                        }
                        if let Some(done) = checkpoint_after.take() {
                            let _ = done.send(r);
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "audit write failed: refusing requests");
                    if let Some(done) = checkpoint_after.take() {
                        let _ = done.send(Err(AuditError::Closed));
                    }
                    healthy.store(false, Ordering::Relaxed);
                    let msg = e.to_string();
                    for ack in acks {
                        let _ = ack.send(Err(AuditError::Io {
                            path: self.path.display().to_string(),
                            source: std::io::Error::other(msg.clone()),
                        }));
                    }
                }
            }
        }
        if self.since_checkpoint > 0
            && let Err(e) = self.checkpoint().await
        {
            tracing::error!(error = %e, "final audit checkpoint failed");
        }
    }

    /// MACs, writes and fsyncs `entries` as the next entries of the chain. On failure the
    /// file is cut back to where it was and the chain does not advance.
    async fn write_batch(&mut self, mut entries: Vec<Entry>) -> Result<(), AuditError> {
        let mut bodies = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter_mut().enumerate() {
            e.seq = self.next_seq + i as u64;
            bodies.push(serde_json::to_vec(e).map_err(|e| AuditError::Io {
                path: self.path.display().to_string(),
                source: std::io::Error::other(e),
            })?);
        }
        let macs = self
            .hsm
            .mac_chain(
                MacKey::Audit,
                self.prev.clone(),
                bodies.clone(),
                self.options.hsm_timeout,
            )
            .await?;
        let mut out = Vec::new();
        for (body, mac) in bodies.iter().zip(&macs) {
            out.extend_from_slice(&line_with_mac(body, mac));
        }
        let mut file = self.file.take().ok_or(AuditError::Closed)?;
        let path = self.path.clone();
        let (file, result) = tokio::task::spawn_blocking(move || {
            let result = append_durably(&mut file, &out);
            (file, result)
        })
        .await
        .map_err(|_| AuditError::Closed)?;
        self.file = Some(file);
        result.map_err(|source| AuditError::Io {
            path: path.display().to_string(),
            source,
        })?;
        self.next_seq += entries.len() as u64;
        self.since_checkpoint += entries.len() as u64;
        if let Some(last) = macs.last() {
            self.prev = last.clone();
        }
        Ok(())
    }

    /// Appends a checkpoint entry and records the chain head in the token.
    async fn checkpoint(&mut self) -> Result<(), AuditError> {
        let detail = format!("log_id={}; count={}", self.log_id, self.next_seq + 1);
        self.write_batch(vec![internal_entry("Checkpoint", detail)])
            .await?;
        let cp = Checkpoint {
            log_id: self.log_id.clone(),
            count: self.next_seq,
            head: hex::encode(&self.prev),
        };
        let value = serde_json::to_vec(&cp).map_err(|e| AuditError::Io {
            path: self.path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        self.hsm.write_checkpoint(value).await?;
        self.since_checkpoint = 0;
        Ok(())
    }
}

fn to_entry(p: PendingEntry) -> Entry {
    let decision = match p.status {
        Code::Ok => "allow",
        Code::NotFound
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::InvalidArgument
        | Code::Aborted
        | Code::FailedPrecondition => "deny",
        _ => "error",
    };
    Entry {
        seq: 0,
        ts_ms: now_ms(),
        plane: p.plane,
        identity: p.identity,
        operation: p.operation,
        name: p.name,
        version: p.version,
        decision: decision.to_owned(),
        status: format!("{:?}", p.status),
        request_id: p.request_id,
        detail: p.detail,
    }
}

fn internal_entry(operation: &str, detail: String) -> Entry {
    Entry {
        seq: 0,
        ts_ms: now_ms(),
        plane: "audit".into(),
        identity: None,
        operation: operation.into(),
        name: None,
        version: None,
        decision: "allow".into(),
        status: "Ok".into(),
        request_id: 0,
        detail: Some(detail),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn new_log_id() -> Result<String, AuditError> {
    use ring::rand::SecureRandom;
    let mut id = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut id)
        .map_err(|_| AuditError::Io {
            path: String::new(),
            source: std::io::Error::other("the system random generator failed"),
        })?;
    Ok(hex::encode(id))
}

/// The line for an entry body (`{...}`) and its MAC: `{...,"mac":"<hex>"}\n`.
fn line_with_mac(body: &[u8], mac: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(body.len() + 80);
    // serde_json always ends an object with '}'.
    line.extend_from_slice(&body[..body.len().saturating_sub(1)]);
    line.extend_from_slice(b",\"mac\":\"");
    line.extend_from_slice(hex::encode(mac).as_bytes());
    line.extend_from_slice(b"\"}\n");
    line
}

/// Splits a line into its body (what the MAC covers) and its MAC.
pub fn split_line(line: &str) -> Option<(String, Vec<u8>)> {
    const MARK: &str = ",\"mac\":\"";
    let at = line.rfind(MARK)?;
    let rest = &line[at + MARK.len()..];
    let mac_hex = rest.strip_suffix("\"}")?;
    let mac = hex::decode(mac_hex).ok()?;
    let mut body = line[..at].to_owned();
    body.push('}');
    Some((body, mac))
}

fn append_durably(file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    let before = file.seek(SeekFrom::End(0))?;
    let result = file.write_all(bytes).and_then(|()| file.sync_data());
    if result.is_err() {
        // Leave no half-written entry behind (not possible on every device; ignore if not).
        let _ = file.set_len(before);
    }
    result
}

/// The end of an existing log.
struct Tail {
    log_id: String,
    count: u64,
    last_mac: Vec<u8>,
}

/// Reads where an existing log ends; cuts an unterminated last line (a write that was never
/// acknowledged). `None` for an empty or non-regular file.
fn recover_tail(path: &Path) -> Result<Option<Tail>, AuditError> {
    let malformed = |line: u64, reason: &str| AuditError::Malformed {
        path: path.display().to_string(),
        line,
        reason: reason.to_owned(),
    };
    let io = |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() || meta.len() == 0 {
        return Ok(None);
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io)?;
    if !text.ends_with('\n') {
        let keep = text.rfind('\n').map_or(0, |i| i + 1);
        tracing::warn!(
            path = %path.display(),
            "cutting an unterminated last audit line (a write that was never acknowledged)"
        );
        file.set_len(keep as u64).map_err(io)?;
        text.truncate(keep);
        if keep == 0 {
            return Ok(None);
        }
    }
    let mut lines = text.lines();
    let first = lines.next().ok_or_else(|| malformed(1, "empty"))?;
    let (first_body, _) = split_line(first).ok_or_else(|| malformed(1, "no mac"))?;
    let first: Entry =
        serde_json::from_str(&first_body).map_err(|e| malformed(1, &e.to_string()))?;
    let log_id = first
        .detail
        .as_deref()
        .and_then(|d| d.strip_prefix("log_id="))
        .map(|d| d.split(';').next().unwrap_or(d).to_owned())
        .ok_or_else(|| malformed(1, "the first entry does not name the log"))?;
    let count = text.lines().count() as u64;
    let last = text
        .lines()
        .last()
        .ok_or_else(|| malformed(count, "empty"))?;
    let (last_body, last_mac) = split_line(last).ok_or_else(|| malformed(count, "no mac"))?;
    let last: Entry =
        serde_json::from_str(&last_body).map_err(|e| malformed(count, &e.to_string()))?;
    if last.seq + 1 != count {
        return Err(malformed(
            count,
            "the last entry's seq does not match the number of lines",
        ));
    }
    Ok(Some(Tail {
        log_id,
        count,
        last_mac,
    }))
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Entries whose chain verified.
    pub verified: u64,
    /// The first problem, if any.
    pub problem: Option<Problem>,
}

/// The first place where the log is not what the service wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// 1-based line in the file.
    pub line: u64,
    /// The entry number the chain expected there.
    pub expected_seq: u64,
    /// What happened.
    pub kind: ProblemKind,
    /// A sentence for the officer.
    pub detail: String,
}

/// Kinds of tampering `audit verify` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// An entry's content was changed.
    Modified,
    /// One or more entries are missing.
    Removed,
    /// Entries are out of order.
    Reordered,
    /// An entry that the service did not write was added.
    Inserted,
    /// The log ends before the token's checkpoint.
    Truncated,
    /// A line does not parse.
    Malformed,
}

/// Verifies a whole log. `mac(prev, body)` computes the chain MAC (in the token, with the
/// audit key); `checkpoint` is the token's checkpoint, if the officer's tool could read it.
pub fn verify<E>(
    reader: impl BufRead,
    mut mac: impl FnMut(&[u8], &[u8]) -> Result<Vec<u8>, E>,
    checkpoint: Option<&Checkpoint>,
) -> Result<VerifyReport, E> {
    struct Line {
        seq: Option<u64>,
        body: String,
        mac: Vec<u8>,
        well_formed: bool,
    }
    let mut lines = Vec::new();
    let mut log_id = None;
    for raw in reader.lines() {
        let Ok(raw) = raw else {
            lines.push(Line {
                seq: None,
                body: String::new(),
                mac: Vec::new(),
                well_formed: false,
            });
            continue;
        };
        let parsed = split_line(&raw).and_then(|(body, mac)| {
            serde_json::from_str::<Entry>(&body)
                .ok()
                .map(|e| (e, body, mac))
        });
        match parsed {
            Some((e, body, mac)) => {
                if e.seq == 0 && log_id.is_none() {
                    log_id = e
                        .detail
                        .as_deref()
                        .and_then(|d| d.strip_prefix("log_id="))
                        .map(|d| d.split(';').next().unwrap_or(d).to_owned());
                }
                lines.push(Line {
                    seq: Some(e.seq),
                    body,
                    mac,
                    well_formed: true,
                })
            }
            None => lines.push(Line {
                seq: None,
                body: raw,
                mac: Vec::new(),
                well_formed: false,
            }),
        }
    }

    let mut prev = vec![0u8; MAC_LEN];
    let mut expected = 0u64;
    for (i, l) in lines.iter().enumerate() {
        let line_no = i as u64 + 1;
        let problem = |kind, detail: String| {
            Ok(VerifyReport {
                verified: expected,
                problem: Some(Problem {
                    line: line_no,
                    expected_seq: expected,
                    kind,
                    detail,
                }),
            })
        };
        if !l.well_formed {
            return problem(
                ProblemKind::Malformed,
                format!("line {line_no} is not an audit entry"),
            );
        }
        let computed = mac(&prev, l.body.as_bytes())?;
        let seq = l.seq.unwrap_or(u64::MAX);
        if computed == l.mac && seq == expected {
            prev = computed;
            expected += 1;
            continue;
        }
        // Not the entry the chain expects here: name what happened.
        let later_has_expected = lines[i + 1..].iter().any(|o| o.seq == Some(expected));
        let next_fits = match lines.get(i + 1) {
            Some(next) if next.well_formed => {
                next.seq == Some(expected) && mac(&prev, next.body.as_bytes())? == next.mac
            }
            _ => false,
        };
        // A later entry standing before the one expected here: reordered (an adjacent swap
        // included, where the expected entry follows right after).
        if seq > expected && later_has_expected {
            return problem(
                ProblemKind::Reordered,
                format!(
                    "entry {seq} stands at line {line_no}, before entry {expected}: entries were reordered"
                ),
            );
        }
        if next_fits {
            return problem(
                ProblemKind::Inserted,
                format!("line {line_no} was inserted: the chain continues on the next line"),
            );
        }
        if seq == expected {
            return problem(
                ProblemKind::Modified,
                format!("entry {expected} (line {line_no}) was modified"),
            );
        }
        if seq > expected {
            return problem(
                ProblemKind::Removed,
                format!(
                    "entries {expected}..{} are missing before line {line_no}",
                    seq - 1
                ),
            );
        }
        return problem(
            ProblemKind::Inserted,
            format!("line {line_no} repeats or precedes entry {seq}: it was inserted or replayed"),
        );
    }
    if let Some(cp) = checkpoint
        && log_id.as_deref() == Some(cp.log_id.as_str())
        && cp.count > expected
    {
        return Ok(VerifyReport {
            verified: expected,
            problem: Some(Problem {
                line: lines.len() as u64 + 1,
                expected_seq: expected,
                kind: ProblemKind::Truncated,
                detail: format!(
                    "the log ends after {expected} entries but the token's checkpoint records {}: its tail was removed",
                    cp.count
                ),
            }),
        });
    }
    Ok(VerifyReport {
        verified: expected,
        problem: None,
    })
}

/// Reads a log's entries without checking MACs (for `audit tail` and `audit search`).
pub fn read_entries(reader: impl BufRead) -> impl Iterator<Item = Entry> {
    reader.lines().map_while(Result::ok).filter_map(|l| {
        split_line(&l).and_then(|(body, _)| serde_json::from_str::<Entry>(&body).ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_back_into_body_and_mac() {
        let body = br#"{"seq":3,"name":"a\"mac\":\"x"}"#;
        let mac = [0xabu8; 32];
        let line = line_with_mac(body, &mac);
        let text = std::str::from_utf8(&line).unwrap().trim_end();
        let (b, m) = split_line(text).unwrap();
        assert_eq!(b.as_bytes(), body);
        assert_eq!(m, mac);
    }
}
