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

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tonic::Code;
use zeroize::Zeroizing;

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

/// Tuning of the audit log.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// The log file.
    pub path: PathBuf,
    /// Most entries in one group commit.
    pub max_batch: usize,
    /// Most bytes of lines in one group commit (a single larger entry is written alone).
    pub max_batch_bytes: usize,
    /// How long a group commit may wait for requests in their handlers (see
    /// [`Auditor::announce`]) to bring their entries.
    pub commit_window: Duration,
    /// Write a checkpoint after this many entries.
    pub checkpoint_every: u64,
    /// And at least this often while entries arrive.
    pub checkpoint_interval: Duration,
    /// Deadline for the token's MAC computation.
    pub hsm_timeout: Duration,
}

struct Pending {
    entry: Entry,
    /// At most the bytes its line takes (see [`line_len_bound`]).
    bytes: usize,
    done: oneshot::Sender<Result<(), AuditError>>,
}

enum Msg {
    Append(Box<Pending>),
    Checkpoint(oneshot::Sender<Result<(), AuditError>>),
}

struct PendingEntry {
    plane: String,
    identity: Option<String>,
    operation: String,
    name: Option<String>,
    invalid_name: Option<InvalidName>,
    version: Option<u64>,
    status: Code,
    request_id: u64,
    detail: Option<String>,
}

/// The HMAC-chained audit log.
pub struct AuditLog {
    tx: std::sync::mpsc::Sender<Msg>,
    /// The writer thread, joined on drop so that it never outlives the log (its handle on
    /// the token must not be the last one while the process exits: SoftHSM2 tears itself
    /// down in exit handlers, and a thread still using it then crashes the process).
    writer: Option<std::thread::JoinHandle<()>>,
    healthy: Arc<AtomicBool>,
    /// Requests announced whose entries have not arrived yet.
    expected: Arc<AtomicUsize>,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (or starts) the log at `options.path`, checks it against the token's checkpoint
    /// and starts the writer thread. Must be called on a tokio runtime, which the writer
    /// uses for its token calls.
    pub async fn open(hsm: Arc<Hsm>, options: AuditOptions) -> Result<Self, AuditError> {
        let path = options.path.clone();
        let io = |source| AuditError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::durable::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io)?;
        // The log's name is durable only once its directory is synced (entries are
        // fdatasync'd, which does not cover the name of a new file).
        crate::durable::fsync_parent(&path).map_err(io)?;
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
            rt: tokio::runtime::Handle::current(),
            file,
            path: path.clone(),
            options,
            next_seq: 0,
            prev: vec![0u8; MAC_LEN],
            chain: Chain::new(String::new(), ChainFormat::CURRENT),
            since_checkpoint: 0,
            expected: Arc::new(AtomicUsize::new(0)),
            checkpoint_retry_at: None,
        };
        let expected = writer.expected.clone();
        let mut start = None;
        match tail {
            Some(tail) => {
                if let Some(cp) = &checkpoint
                    && cp.log_id == tail.header.log_id
                    && cp.count > tail.count
                {
                    return Err(AuditError::BehindCheckpoint {
                        path: path.display().to_string(),
                        found: tail.count,
                        expected: cp.count,
                    });
                }
                if tail.header.format == ChainFormat::Token {
                    tracing::warn!(
                        path = %path.display(),
                        "this audit log uses the older chain format (every MAC computed in the token, one token operation per entry); start a new audit.path for the segment-keyed format"
                    );
                }
                writer.next_seq = tail.count;
                writer.prev = tail.last_mac;
                writer.chain = Chain::new(tail.header.log_id, tail.header.format);
            }
            None => {
                // A new log. Its first entry names the chain format, and the previous log
                // the token knew of, so a deleted log leaves a trace in its successor.
                let header = Header {
                    log_id: new_log_id()?,
                    format: ChainFormat::CURRENT,
                };
                let mut detail = header.to_detail();
                if let Some(cp) = &checkpoint {
                    detail.push_str(&format!(
                        "; previous log_id={} count={} head={}",
                        cp.log_id, cp.count, cp.head
                    ));
                }
                writer.chain = Chain::new(header.log_id, header.format);
                start = Some(detail);
            }
        }

        let healthy = Arc::new(AtomicBool::new(true));
        let (tx, rx) = std::sync::mpsc::channel();
        let (ready, started) = oneshot::channel();
        let thread_healthy = healthy.clone();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                // Starting a new log: its first entry and a checkpoint, before any request.
                let first = match start {
                    Some(detail) => writer
                        .write_batch(vec![internal_entry("AuditLogStarted", detail)])
                        .and_then(|()| writer.checkpoint()),
                    None => Ok(()),
                };
                let ok = first.is_ok();
                let _ = ready.send(first);
                if ok {
                    writer.run(rx, thread_healthy);
                }
            })
            .map_err(io)?;
        started.await.map_err(|_| AuditError::Closed)??;
        Ok(Self {
            tx,
            writer: Some(thread),
            healthy,
            expected,
            path,
        })
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
    pub async fn append(
        &self,
        event: &AuditEvent<'_>,
        expected: Option<&Expected>,
    ) -> Result<(), AuditError> {
        let (done, rx) = oneshot::channel();
        let entry = to_entry(PendingEntry {
            plane: event.plane.to_owned(),
            identity: event.identity.map(|i| i.as_str().to_owned()),
            operation: event.operation.to_owned(),
            name: event.name.as_ref().map(|n| n.text.to_owned()),
            invalid_name: event.name.as_ref().and_then(|n| n.invalid.clone()),
            version: event.version,
            status: event.status,
            request_id: event.request_id,
            detail: event.detail.clone(),
        });
        // Measured here, in the caller's task, so the writer can bound its batches in bytes.
        let bytes = line_len_bound(&entry);
        // Unbounded, but never long: every sender waits for its entry, so the queue holds
        // at most one entry per request in flight.
        // Counted off before it is queued, so the writer never waits for this entry itself.
        if let Some(e) = expected {
            e.arrived();
        }
        self.tx
            .send(Msg::Append(Box::new(Pending { entry, bytes, done })))
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Records a checkpoint now (after everything sent before), e.g. at shutdown.
    pub async fn checkpoint(&self) -> Result<(), AuditError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Msg::Checkpoint(done))
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        // Disconnect the writer (the only sender is ours), then wait for it to end.
        let (closed, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.tx, closed));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The writer thread's state: it owns the file and the chain.
struct Writer {
    hsm: Arc<Hsm>,
    rt: tokio::runtime::Handle,
    file: File,
    path: PathBuf,
    options: AuditOptions,
    next_seq: u64,
    prev: Vec<u8>,
    chain: Chain,
    since_checkpoint: u64,
    expected: Arc<AtomicUsize>,
    /// After a failed checkpoint (the token away), no new attempt before this time: each
    /// attempt appends a `Checkpoint` entry, and retrying on every batch would fill the log.
    checkpoint_retry_at: Option<Instant>,
}

/// Marks the audit log unhealthy if the writer thread ends for any reason (a panic included):
/// every append then fails, and health must say so.
struct Stopped(Arc<AtomicBool>);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// `now + d`, or a year from now if that overflows (`checkpoint_interval_secs` is large).
fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// What bounds one group commit.
struct BatchLimits {
    max_entries: usize,
    max_bytes: usize,
    commit_window: Duration,
}

/// One group commit's entries, and a checkpoint request that came after them.
struct Batch {
    pending: Vec<Pending>,
    checkpoint_after: Option<oneshot::Sender<Result<(), AuditError>>>,
}

/// Takes `first` and what is waiting after it, up to `max_entries` entries and `max_bytes`
/// bytes of lines (the first entry is taken whatever its size); an entry that would take the
/// batch over `max_bytes` is left in `carry` for the next one. If requests are in their
/// handlers (`expected`), sleeps once for the commit window and takes what came meanwhile:
/// an fsync costs ~50-60 µs of CPU here (BENCHMARKS.md), so without it batches under load
/// were two or three entries. One sleep, not a wake per arriving entry: each wake is a
/// context switch, which costs as much as the fsync it saves.
fn gather(
    rx: &std::sync::mpsc::Receiver<Msg>,
    first: Box<Pending>,
    carry: &mut Option<Box<Pending>>,
    limits: &BatchLimits,
    expected: &AtomicUsize,
) -> Batch {
    let mut bytes = first.bytes;
    let mut pending = vec![*first];
    let mut checkpoint_after = None;
    let mut slept = limits.commit_window.is_zero();
    while pending.len() < limits.max_entries && bytes < limits.max_bytes {
        match rx.try_recv() {
            Ok(Msg::Append(p)) => {
                if bytes.saturating_add(p.bytes) > limits.max_bytes {
                    *carry = Some(p);
                    break;
                }
                bytes += p.bytes;
                pending.push(*p);
            }
            Ok(Msg::Checkpoint(done)) => {
                checkpoint_after = Some(done);
                break;
            }
            Err(_) if !slept && expected.load(Ordering::Acquire) > 0 => {
                slept = true;
                std::thread::sleep(limits.commit_window);
            }
            Err(_) => break,
        }
    }
    Batch {
        pending,
        checkpoint_after,
    }
}

impl Writer {
    /// Takes every entry waiting (up to `max_batch`), chains, writes and fsyncs them at once,
    /// then acknowledges them all; checkpoints every `checkpoint_every` entries and every
    /// `checkpoint_interval` while entries arrive.
    fn run(mut self, rx: std::sync::mpsc::Receiver<Msg>, healthy: Arc<AtomicBool>) {
        use std::sync::mpsc::RecvTimeoutError;
        let _stopped = Stopped(healthy.clone());
        let interval = self.options.checkpoint_interval;
        let mut next_tick = later(interval);
        // An entry taken from the queue that did not fit in the last batch's bytes.
        let mut carry: Option<Box<Pending>> = None;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let received = match carry.take() {
                Some(p) => Ok(Msg::Append(p)),
                None => rx.recv_timeout(wait),
            };
            let first = match received {
                Ok(Msg::Append(p)) => p,
                Ok(Msg::Checkpoint(done)) => {
                    let r = if self.since_checkpoint > 0 {
                        self.checkpoint()
                    } else {
                        Ok(())
                    };
                    let _ = done.send(r);
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {
                    next_tick = later(interval);
                    if self.since_checkpoint > 0 && self.may_checkpoint() {
                        let _ = self.try_checkpoint(&healthy);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let limits = BatchLimits {
                max_entries: self.options.max_batch,
                max_bytes: self.options.max_batch_bytes,
                commit_window: self.options.commit_window,
            };
            let Batch {
                pending,
                mut checkpoint_after,
            } = gather(&rx, first, &mut carry, &limits, &self.expected);
            let (entries, acks): (Vec<_>, Vec<_>) =
                pending.into_iter().map(|p| (p.entry, p.done)).unzip();
            match self.write_batch(entries) {
                Ok(()) => {
                    healthy.store(true, Ordering::Relaxed);
                    for ack in acks {
                        let _ = ack.send(Ok(()));
                    }
                    let due = Instant::now() >= next_tick;
                    if due {
                        next_tick = later(interval);
                    }
                    if checkpoint_after.is_some()
                        || (self.may_checkpoint()
                            && (due || self.since_checkpoint >= self.options.checkpoint_every))
                    {
                        let r = self.try_checkpoint(&healthy);
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
        // The log was dropped. No token call here: the runtime may be shutting down (and a
        // drop on its own thread waits for this one). The service's shutdown takes its final
        // checkpoint through `AuditLog::checkpoint` before that.
        if self.since_checkpoint > 0 {
            tracing::warn!(
                entries = self.since_checkpoint,
                "the audit log closed with entries after its last token checkpoint"
            );
        }
    }

    /// Chains, writes and fsyncs `entries` as the next entries of the log. On failure the
    /// file is cut back to where it was and the chain does not advance.
    fn write_batch(&mut self, mut entries: Vec<Entry>) -> Result<(), AuditError> {
        let mut out = Vec::with_capacity(entries.len() * 320);
        let mut prev = self.prev.clone();
        for (i, e) in entries.iter_mut().enumerate() {
            e.seq = self.next_seq + i as u64;
            let body = serde_json::to_vec(e).map_err(|e| AuditError::Io {
                path: self.path.display().to_string(),
                source: std::io::Error::other(e),
            })?;
            let (hsm, rt, timeout) = (&self.hsm, &self.rt, self.options.hsm_timeout);
            let mac = self.chain.mac(e.seq, &prev, &body, &mut |data: &[u8]| {
                let job = hsm.mac_chain(MacKey::Audit, Vec::new(), vec![data.to_vec()], timeout);
                rt.block_on(job)?.pop().ok_or(AuditError::Closed)
            })?;
            out.extend_from_slice(&line_with_mac(&body, &mac));
            prev = mac;
        }
        append_durably(&mut self.file, &out).map_err(|source| AuditError::Io {
            path: self.path.display().to_string(),
            source,
        })?;
        self.next_seq += entries.len() as u64;
        self.since_checkpoint += entries.len() as u64;
        self.prev = prev;
        Ok(())
    }

    /// Whether a periodic checkpoint may be attempted now.
    fn may_checkpoint(&self) -> bool {
        self.checkpoint_retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// A checkpoint whose failure is logged, shows in health until the next good write, and
    /// holds off periodic attempts for one checkpoint interval. The entries are durable and
    /// acknowledged either way; only the token's record of the head waits.
    fn try_checkpoint(&mut self, healthy: &AtomicBool) -> Result<(), AuditError> {
        let r = self.checkpoint();
        match &r {
            Ok(()) => self.checkpoint_retry_at = None,
            Err(e) => {
                tracing::error!(error = %e, "audit checkpoint failed; retrying in one checkpoint interval");
                healthy.store(false, Ordering::Relaxed);
                self.checkpoint_retry_at = Some(later(self.options.checkpoint_interval));
            }
        }
        r
    }

    /// Appends a checkpoint entry and records the chain head in the token.
    fn checkpoint(&mut self) -> Result<(), AuditError> {
        let detail = format!("log_id={}; count={}", self.chain.log_id, self.next_seq + 1);
        self.write_batch(vec![internal_entry("Checkpoint", detail)])?;
        let cp = Checkpoint {
            log_id: self.chain.log_id.clone(),
            count: self.next_seq,
            head: hex::encode(&self.prev),
        };
        let value = serde_json::to_vec(&cp).map_err(|e| AuditError::Io {
            path: self.path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        // A token that hangs must not stop the log: the write gets the token deadline. (The
        // timer is made inside block_on: it needs the runtime's context.)
        let (hsm, deadline) = (&self.hsm, self.options.hsm_timeout);
        self.rt
            .block_on(async { tokio::time::timeout(deadline, hsm.write_checkpoint(value)).await })
            .map_err(|_| AuditError::Hsm(crate::hsm::HsmError::Timeout))??;
        self.since_checkpoint = 0;
        Ok(())
    }
}

/// How a log's MACs are keyed; its first entry says which (`chain=` in its detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainFormat {
    /// Every MAC computed in the token with the audit key: one token operation per entry.
    /// Logs whose first entry names no chain format.
    Token,
    /// `chain=hmac-sha256-segment-v2`: the entries `seq` with `seq / len == s` are MAC'd in
    /// process under a segment key the token derives with the audit key (see [`Chain`]).
    Segment {
        /// Entries per segment (`segment=` in the first entry).
        len: u64,
    },
}

impl ChainFormat {
    /// What new logs use.
    pub const CURRENT: ChainFormat = ChainFormat::Segment { len: SEGMENT_LEN };
}

/// Entries per segment key in new logs.
pub const SEGMENT_LEN: u64 = 4096;

const SEGMENT_FORMAT: &str = "hmac-sha256-segment-v2";
const SEGMENT_KEY_DOMAIN: &[u8] = b"strongroom audit segment key v2\0";

/// What a log's first entry says about the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The log's random id.
    pub log_id: String,
    /// How its MACs are keyed.
    pub format: ChainFormat,
}

impl Header {
    /// Reads the detail of a log's first entry (`log_id=…; chain=…; segment=…; …`).
    pub fn parse(detail: &str) -> Option<Header> {
        let mut log_id = None;
        let mut chain = None;
        let mut segment = None;
        for field in detail.split("; ") {
            match field.split_once('=') {
                Some(("log_id", v)) => log_id = Some(v.to_owned()),
                Some(("chain", v)) => chain = Some(v),
                Some(("segment", v)) => segment = v.parse::<u64>().ok(),
                _ => {}
            }
        }
        let format = match chain {
            None => ChainFormat::Token,
            Some(SEGMENT_FORMAT) => ChainFormat::Segment {
                len: segment.filter(|&n| n > 0)?,
            },
            Some(_) => return None,
        };
        Some(Header {
            log_id: log_id?,
            format,
        })
    }

    fn to_detail(&self) -> String {
        match self.format {
            ChainFormat::Token => format!("log_id={}", self.log_id),
            ChainFormat::Segment { len } => format!(
                "log_id={}; chain={SEGMENT_FORMAT}; segment={len}",
                self.log_id
            ),
        }
    }
}

/// Computes a log's chain: `m_i = HMAC-SHA256(k, m_{i-1} ‖ body_i)`, `m_{-1}` = 32 zero bytes.
///
/// In the segment format, `k` for entry `i` is the key of its segment `s = i / len`:
/// `k_s = HMAC-SHA256(audit key, domain ‖ log_id ‖ 0 ‖ len ‖ s)`, computed in the token with
/// the audit key, which never leaves it. Forging, editing or re-chaining any entry needs a
/// segment key, so needs the token (or the memory of the running service, which holds only
/// the key of the segment it is writing). One token operation per `len` entries instead of
/// one per entry. In the token format, `k` is the audit key itself and every MAC is a token
/// operation.
pub struct Chain {
    log_id: String,
    format: ChainFormat,
    /// The current segment and its key (ring's key schedule; the derived bytes themselves
    /// are zeroized as soon as it is built).
    key: Option<(u64, ring::hmac::Key)>,
}

impl Chain {
    /// The chain of log `log_id` in `format`.
    pub fn new(log_id: String, format: ChainFormat) -> Self {
        Self {
            log_id,
            format,
            key: None,
        }
    }

    /// The MAC of entry `seq` with body `body` after `prev`. `token_mac(data)` is
    /// HMAC-SHA256 of `data` with the audit key, in the token.
    pub fn mac<E>(
        &mut self,
        seq: u64,
        prev: &[u8],
        body: &[u8],
        token_mac: &mut impl FnMut(&[u8]) -> Result<Vec<u8>, E>,
    ) -> Result<Vec<u8>, E> {
        let len = match self.format {
            ChainFormat::Token => {
                let mut input = Vec::with_capacity(prev.len() + body.len());
                input.extend_from_slice(prev);
                input.extend_from_slice(body);
                return token_mac(&input);
            }
            ChainFormat::Segment { len } => len,
        };
        let segment = seq / len;
        let key = match &self.key {
            Some((s, k)) if *s == segment => k,
            _ => {
                let mut input = SEGMENT_KEY_DOMAIN.to_vec();
                input.extend_from_slice(self.log_id.as_bytes());
                input.push(0);
                input.extend_from_slice(&len.to_be_bytes());
                input.extend_from_slice(&segment.to_be_bytes());
                let bytes = Zeroizing::new(token_mac(&input)?);
                let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes);
                &self.key.insert((segment, k)).1
            }
        };
        let mut ctx = ring::hmac::Context::with_key(key);
        ctx.update(prev);
        ctx.update(body);
        Ok(ctx.sign().as_ref().to_vec())
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
        name_len: p.invalid_name.as_ref().map(|i| i.len),
        name_truncated: p
            .invalid_name
            .as_ref()
            .and_then(|i| i.truncated.then_some(true)),
        name_sha256: p.invalid_name.map(|i| i.sha256),
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
        name_len: None,
        name_sha256: None,
        name_truncated: None,
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

/// The bytes [`line_with_mac`] adds to a body: `,"mac":"`, the hex MAC and `"}\n`, less the
/// body's closing `}`.
const MAC_SUFFIX_LEN: usize = 8 + 2 * MAC_LEN + 3 - 1;

/// At most the bytes `entry`'s line takes once chained, whatever its `seq` becomes.
fn line_len_bound(entry: &Entry) -> usize {
    struct Count(usize);
    impl Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serialising an `Entry` to a writer that cannot fail does not fail (its fields are
    // strings, integers and options); were it to, the entry counts as large.
    if serde_json::to_writer(&mut count, entry).is_err() {
        return usize::MAX;
    }
    // `seq` may take up to 20 digits where it takes 1 now.
    let seq_room = u64::MAX.to_string().len() - entry.seq.to_string().len();
    count.0 + seq_room + MAC_SUFFIX_LEN
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
    header: Header,
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
    let header = first
        .detail
        .as_deref()
        .and_then(Header::parse)
        .ok_or_else(|| {
            malformed(
                1,
                "the first entry does not name the log and its chain format",
            )
        })?;
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
        header,
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

/// Verifies a whole log. `token_mac(data)` is HMAC-SHA256 of `data` with the audit key, in
/// the token (see [`Chain`] for how the log's first entry decides what it is asked);
/// `checkpoint` is the token's checkpoint, if the officer's tool could read it.
pub fn verify<E>(
    reader: impl BufRead,
    mut token_mac: impl FnMut(&[u8]) -> Result<Vec<u8>, E>,
    checkpoint: Option<&Checkpoint>,
) -> Result<VerifyReport, E> {
    struct Line {
        seq: Option<u64>,
        body: String,
        mac: Vec<u8>,
        well_formed: bool,
    }
    let mut lines = Vec::new();
    let mut header = None;
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
                if e.seq == 0 && header.is_none() {
                    header = e.detail.as_deref().and_then(Header::parse);
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

    // Without a readable first entry the chain's keys are unknown: every MAC then fails and
    // the entry numbers alone say what happened.
    let log_id = header.as_ref().map(|h| h.log_id.clone());
    let mut chain = match header {
        Some(h) => Chain::new(h.log_id, h.format),
        None => Chain::new(String::new(), ChainFormat::CURRENT),
    };
    let mut mac = |seq: u64, prev: &[u8], body: &[u8]| chain.mac(seq, prev, body, &mut token_mac);
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
        let computed = mac(expected, &prev, l.body.as_bytes())?;
        let seq = l.seq.unwrap_or(u64::MAX);
        if computed == l.mac && seq == expected {
            // The token's checkpoint names the MAC this entry must have: a chain rebuilt with
            // a leaked segment key verifies, but does not end at the head the token recorded.
            if let Some(cp) = checkpoint
                && log_id.as_deref() == Some(cp.log_id.as_str())
                && cp.count == expected + 1
                && cp.head != hex::encode(&computed)
            {
                return problem(
                    ProblemKind::Modified,
                    format!(
                        "entry {expected} (line {line_no}) is not the one the token's checkpoint records: entries up to it were rewritten"
                    ),
                );
            }
            prev = computed;
            expected += 1;
            continue;
        }
        // Not the entry the chain expects here: name what happened.
        let later_has_expected = lines[i + 1..].iter().any(|o| o.seq == Some(expected));
        let next_fits = match lines.get(i + 1) {
            Some(next) if next.well_formed => {
                next.seq == Some(expected)
                    && mac(expected, &prev, next.body.as_bytes())? == next.mac
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

/// Reads a log's entries without checking MACs (for `audit tail` and `audit search`).
pub fn read_entries(reader: impl BufRead) -> impl Iterator<Item = Entry> {
    reader.lines().map_while(Result::ok).filter_map(|l| {
        split_line(&l).and_then(|(body, _)| serde_json::from_str::<Entry>(&body).ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued entry whose detail is `n` bytes.
    fn queued(n: usize, id: u64) -> Box<Pending> {
        let mut entry = internal_entry("Test", "d".repeat(n));
        entry.request_id = id;
        let bytes = line_len_bound(&entry);
        Box::new(Pending {
            entry,
            bytes,
            done: oneshot::channel().0,
        })
    }

    #[test]
    fn line_len_bound_covers_the_line_at_any_seq() {
        for seq in [0, 9, 10, 12345, u64::MAX] {
            let p = queued(100, 1);
            let mut e = p.entry.clone();
            e.seq = seq;
            let line = line_with_mac(&serde_json::to_vec(&e).unwrap(), &[7u8; MAC_LEN]);
            assert!(
                line.len() <= p.bytes,
                "seq {seq}: {} > {}",
                line.len(),
                p.bytes
            );
        }
        let mut e = queued(100, 1).entry;
        e.seq = u64::MAX;
        let line = line_with_mac(&serde_json::to_vec(&e).unwrap(), &[7u8; MAC_LEN]);
        assert_eq!(
            line.len(),
            queued(100, 1).bytes,
            "the bound is exact at the widest seq"
        );
    }

    #[test]
    fn group_commits_are_bounded_in_bytes_as_well_as_entries() {
        let (tx, rx) = std::sync::mpsc::channel();
        // 40 entries of about 1 KiB, one of 20 KiB, 10 more of about 1 KiB.
        let sizes: Vec<usize> = (0..40)
            .map(|_| 1000)
            .chain([20_000])
            .chain((0..10).map(|_| 1000))
            .collect();
        for (i, n) in sizes.iter().enumerate() {
            tx.send(Msg::Append(queued(*n, i as u64))).unwrap();
        }
        let limits = BatchLimits {
            max_entries: 512,
            max_bytes: 8 * 1024,
            commit_window: Duration::ZERO,
        };
        let expected = AtomicUsize::new(0);
        let mut carry = None;
        let mut seen = Vec::new();
        let mut batches = Vec::new();
        loop {
            let first = match carry.take() {
                Some(p) => p,
                None => match rx.try_recv() {
                    Ok(Msg::Append(p)) => p,
                    _ => break,
                },
            };
            let batch = gather(&rx, first, &mut carry, &limits, &expected);
            let bytes: usize = batch.pending.iter().map(|p| p.bytes).sum();
            let n = batch.pending.len();
            assert!(
                bytes <= limits.max_bytes || n == 1,
                "a batch of {n} entries holds {bytes} bytes"
            );
            seen.extend(batch.pending.iter().map(|p| p.entry.request_id));
            batches.push((n, bytes));
        }
        // Every entry once, in order; the big one alone; the others filled batches up to
        // the bound (as many whole entries as fit in 8 KiB).
        assert_eq!(seen, (0..sizes.len() as u64).collect::<Vec<_>>());
        assert!(
            batches.iter().any(|&(n, b)| n == 1 && b > 20_000),
            "{batches:?}"
        );
        let one = queued(1000, 0).bytes;
        assert_eq!(
            batches[0],
            (8 * 1024 / one, 8 * 1024 / one * one),
            "{batches:?}"
        );
        // The entry bound still holds when entries are small.
        for i in 0..20 {
            tx.send(Msg::Append(queued(10, i))).unwrap();
        }
        let small = BatchLimits {
            max_entries: 8,
            ..limits
        };
        let Ok(Msg::Append(first)) = rx.try_recv() else {
            panic!("queued")
        };
        let batch = gather(&rx, first, &mut carry, &small, &expected);
        assert_eq!(batch.pending.len(), 8);
        assert!(carry.is_none());
    }

    #[test]
    fn names_that_are_not_plain_are_recorded_bounded_with_length_and_digest() {
        // Valid names, prefixes, policy names and approval ids are recorded whole.
        for ok in [
            "payments/db/password",
            "payments/",
            "*",
            "",
            "0123456789abcdef",
        ] {
            assert_eq!(
                RecordedName::new(ok, 256),
                RecordedName {
                    text: ok,
                    invalid: None
                }
            );
        }
        // Too long: cut to the limit, with the whole name's length and SHA-256.
        let long = "a".repeat(5 << 20);
        let r = RecordedName::new(&long, 256);
        assert_eq!(r.text, &long[..256]);
        let i = r.invalid.unwrap();
        assert_eq!((i.len, i.truncated), (5 << 20, true));
        assert_eq!(
            i.sha256,
            hex::encode(ring::digest::digest(&ring::digest::SHA256, long.as_bytes()))
        );
        // Just over: cut by one byte.
        let over = "b".repeat(257);
        assert_eq!(RecordedName::new(&over, 256).text.len(), 256);
        // Bad characters: recorded with its length and digest; cut only if its JSON form
        // would be longer than the limit, and never inside a character.
        let short = RecordedName::new("a b", 256);
        assert_eq!(short.text, "a b");
        assert!(!short.invalid.as_ref().unwrap().truncated);
        let nuls = "\0".repeat(1000);
        let r = RecordedName::new(&nuls, 256);
        assert_eq!(r.text.len(), 256 / 6);
        assert!(serde_json::to_string(r.text).unwrap().len() <= 256 + 2);
        let wide = "é".repeat(200);
        let r = RecordedName::new(&wide, 255);
        assert_eq!(r.text.len(), 254);
        assert!(r.invalid.unwrap().truncated);
    }

    #[test]
    fn entries_are_found_by_a_name_recorded_whole_or_cut() {
        let long = "x".repeat(300);
        let recorded = RecordedName::new(&long, 256);
        let mut e = internal_entry("Test", String::new());
        e.name = Some(recorded.text.to_owned());
        e.name_sha256 = recorded.invalid.map(|i| i.sha256);
        assert!(e.is_about(&long));
        assert!(!e.is_about(&long[..256]));
        e.name = Some("payments/a".into());
        e.name_sha256 = None;
        assert!(e.is_about("payments/a"));
        assert!(!e.is_about("payments/b"));
    }

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

    /// HMAC-SHA256 with a fixed key: stands in for the token's audit key.
    fn fake_token(key: &'static [u8]) -> impl FnMut(&[u8]) -> Result<Vec<u8>, ()> {
        move |data| {
            let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
            Ok(ring::hmac::sign(&k, data).as_ref().to_vec())
        }
    }

    /// A log of `n` entries written with `format`, as lines.
    fn write_log(format: ChainFormat, n: u64, token_key: &'static [u8]) -> Vec<String> {
        let header = Header {
            log_id: "00ff".into(),
            format,
        };
        let mut chain = Chain::new(header.log_id.clone(), format);
        let mut token = fake_token(token_key);
        let mut prev = vec![0u8; MAC_LEN];
        (0..n)
            .map(|seq| {
                let mut e = internal_entry("Test", header.to_detail());
                if seq > 0 {
                    e.detail = Some(format!("entry {seq}"));
                }
                e.seq = seq;
                let body = serde_json::to_vec(&e).unwrap();
                let mac = chain.mac(seq, &prev, &body, &mut token).unwrap();
                let line = String::from_utf8(line_with_mac(&body, &mac)).unwrap();
                prev = mac;
                line
            })
            .collect()
    }

    fn check(lines: &[String], token_key: &'static [u8]) -> VerifyReport {
        let text = lines.concat();
        verify(text.as_bytes(), fake_token(token_key), None).unwrap()
    }

    #[test]
    fn segment_chains_verify_across_segment_boundaries_and_need_the_token_key() {
        let format = ChainFormat::Segment { len: 4 };
        let lines = write_log(format, 11, b"audit key");
        let ok = check(&lines, b"audit key");
        assert_eq!((ok.verified, ok.problem), (11, None));
        // The same log checked against another token's key fails at its first entry.
        let other = check(&lines, b"another key");
        assert_eq!(other.verified, 0);
        assert_eq!(other.problem.unwrap().kind, ProblemKind::Modified);
    }

    #[test]
    fn an_entry_chained_under_another_segments_key_is_refused() {
        // Entry 5 (segment 1) re-MAC'd with segment 0's key, as someone holding only the
        // key of an earlier segment would forge it.
        let format = ChainFormat::Segment { len: 4 };
        let mut lines = write_log(format, 8, b"audit key");
        let (_, prev_mac) = split_line(lines[4].trim_end()).unwrap();
        let (body, _) = split_line(lines[5].trim_end()).unwrap();
        let forged_body = body.replace("entry 5", "entry 5, edited");
        let mut segment0 = Chain::new("00ff".into(), format);
        let mut token = fake_token(b"audit key");
        let forged = segment0
            .mac(0, &prev_mac, forged_body.as_bytes(), &mut token)
            .unwrap();
        lines[5] = String::from_utf8(line_with_mac(forged_body.as_bytes(), &forged)).unwrap();
        let report = check(&lines, b"audit key");
        assert_eq!(report.verified, 5);
        let p = report.problem.unwrap();
        assert_eq!((p.line, p.kind), (6, ProblemKind::Modified));
    }

    #[test]
    fn logs_in_the_token_format_still_verify() {
        let lines = write_log(ChainFormat::Token, 5, b"audit key");
        assert!(!lines[0].contains("chain="), "{}", lines[0]);
        let ok = check(&lines, b"audit key");
        assert_eq!((ok.verified, ok.problem), (5, None));
        let mut edited = lines.clone();
        edited[3] = edited[3].replace("entry 3", "entry 4");
        let p = check(&edited, b"audit key").problem.unwrap();
        assert_eq!((p.line, p.kind), (4, ProblemKind::Modified));
    }

    #[test]
    fn headers_name_the_log_and_its_chain_format() {
        let h = Header::parse("log_id=ab; chain=hmac-sha256-segment-v2; segment=4096; previous log_id=cd count=3 head=ef").unwrap();
        assert_eq!(h.log_id, "ab");
        assert_eq!(h.format, ChainFormat::Segment { len: 4096 });
        assert_eq!(
            Header::parse("log_id=ab").unwrap().format,
            ChainFormat::Token
        );
        assert_eq!(Header::parse("log_id=ab; chain=unknown-v9"), None);
        assert_eq!(
            Header::parse("log_id=ab; chain=hmac-sha256-segment-v2; segment=0"),
            None
        );
        assert_eq!(
            Header::parse("chain=hmac-sha256-segment-v2; segment=8"),
            None
        );
        assert_eq!(
            Header::parse(
                &Header {
                    log_id: "x".into(),
                    format: ChainFormat::CURRENT
                }
                .to_detail()
            )
            .unwrap()
            .format,
            ChainFormat::CURRENT
        );
    }

    #[test]
    fn an_announced_request_counts_until_its_entry_arrives_and_only_once() {
        let counter = Arc::new(AtomicUsize::new(0));
        let announce = || {
            counter.fetch_add(1, Ordering::AcqRel);
            Expected {
                counter: Some(counter.clone()),
                live: AtomicBool::new(true),
            }
        };
        let (a, b) = (announce(), announce());
        assert_eq!(counter.load(Ordering::Acquire), 2);
        a.arrived();
        a.arrived();
        assert_eq!(counter.load(Ordering::Acquire), 1);
        drop(a);
        assert_eq!(counter.load(Ordering::Acquire), 1);
        // A request that ends without an entry (cancelled, panicked) stops counting too.
        drop(b);
        assert_eq!(counter.load(Ordering::Acquire), 0);
        // Without a durable log nothing is counted.
        drop(Auditor::DangerousLogOnly.announce());
    }

    #[test]
    fn segment_keys_and_macs_follow_the_documented_formula() {
        // Recomputed here from README's formula with ring alone, not with `Chain`.
        let token_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"audit key");
        let lines = write_log(ChainFormat::Segment { len: 4 }, 6, b"audit key");
        let mut prev = vec![0u8; 32];
        for (i, line) in lines.iter().enumerate() {
            let segment = i as u64 / 4;
            let mut input = b"strongroom audit segment key v2\0".to_vec();
            input.extend_from_slice(b"00ff");
            input.push(0);
            input.extend_from_slice(&4u64.to_be_bytes());
            input.extend_from_slice(&segment.to_be_bytes());
            let k_s = ring::hmac::sign(&token_key, &input);
            let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k_s.as_ref());
            let (body, mac) = split_line(line.trim_end()).unwrap();
            let mut data = prev.clone();
            data.extend_from_slice(body.as_bytes());
            assert_eq!(ring::hmac::sign(&k, &data).as_ref(), &mac[..], "entry {i}");
            prev = mac;
        }
    }

    #[test]
    fn a_chain_rewritten_with_a_segment_key_is_caught_by_the_token_checkpoint() {
        let format = ChainFormat::Segment { len: 4 };
        let lines = write_log(format, 4, b"audit key");
        let (_, head) = split_line(lines[3].trim_end()).unwrap();
        let checkpoint = Checkpoint {
            log_id: "00ff".into(),
            count: 4,
            head: hex::encode(&head),
        };
        let check = |lines: &[String]| {
            verify(
                lines.concat().as_bytes(),
                fake_token(b"audit key"),
                Some(&checkpoint),
            )
            .unwrap()
        };
        assert_eq!(check(&lines).problem, None);
        // Whoever holds segment 0's key rewrites entry 2 and re-chains 2 and 3: every MAC
        // verifies, but entry 3 no longer ends where the token's checkpoint says.
        let mut chain = Chain::new("00ff".into(), format);
        let mut token = fake_token(b"audit key");
        let (_, mut prev) = split_line(lines[1].trim_end()).unwrap();
        let mut forged = lines[..2].to_vec();
        for (i, line) in lines.iter().enumerate().skip(2) {
            let (body, _) = split_line(line.trim_end()).unwrap();
            let body = body.replace("entry 2", "entry 2, rewritten");
            let mac = chain
                .mac(i as u64, &prev, body.as_bytes(), &mut token)
                .unwrap();
            forged.push(String::from_utf8(line_with_mac(body.as_bytes(), &mac)).unwrap());
            prev = mac;
        }
        let report = check(&forged);
        assert_eq!(report.verified, 3);
        let p = report.problem.unwrap();
        assert_eq!((p.line, p.kind), (4, ProblemKind::Modified), "{}", p.detail);
    }
}
