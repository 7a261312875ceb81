//! The writer: one thread owns the file, group-commits entries and acknowledges them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tonic::Code;

use super::*;
use super::{chain::*, checkpoint::*, recover::*, rotate::*};
use crate::hsm::Hsm;
use crate::hsm::keys::MacKey;

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
    /// The label of the token data object that holds this log's checkpoint:
    /// [`CHECKPOINT_LABEL`](crate::hsm::keys::CHECKPOINT_LABEL) for a single node, one of its
    /// own per replica ([`replica_label`](crate::hsm::keys::replica_label)).
    pub checkpoint_label: String,
    /// Rotate once the file holds this many bytes (0: never by size).
    pub rotate_bytes: u64,
    /// Rotate once the log is this old (zero: never by age).
    pub rotate_age: Duration,
}

pub(super) struct Pending {
    pub(super) entry: Entry,
    /// At most the bytes its line takes (see [`line_len_bound`]).
    pub(super) bytes: usize,
    pub(super) done: oneshot::Sender<Result<(), AuditError>>,
}

pub(super) enum Msg {
    Append(Box<Pending>),
    Checkpoint(oneshot::Sender<Result<(), AuditError>>),
    Rotate(Box<RotateRequest>),
}

pub(super) struct PendingEntry {
    plane: String,
    identity: Option<String>,
    operation: String,
    name: Option<String>,
    invalid_name: Option<InvalidName>,
    version: Option<u64>,
    status: Code,
    request_id: u64,
    detail: Option<String>,
    change: Option<ChangeMark>,
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
    pub(super) expected: Arc<AtomicUsize>,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (or starts) the log at `options.path`, checks it against the token's checkpoint
    /// (which says which log is current, see [`Checkpoint`]) and starts the writer thread.
    /// Refuses a file that is not the token's current log or does not reach its checkpointed
    /// head; finishes a rotation a crash interrupted (see `rotate`). Must be called on a
    /// tokio runtime, which the writer uses for its token calls.
    pub async fn open(hsm: Arc<Hsm>, options: AuditOptions) -> Result<Self, AuditError> {
        let path = options.path.clone();
        let io = |source| AuditError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::durable::create_dir_all(dir).map_err(io)?;
        }
        let checkpoint = Checkpoint::read(&hsm, &options.checkpoint_label).await?;
        let plan = {
            let (p, cp, hsm) = (path.clone(), checkpoint.clone(), hsm.clone());
            let (rt, timeout) = (tokio::runtime::Handle::current(), options.hsm_timeout);
            tokio::task::spawn_blocking(move || {
                let mut token_mac = |data: &[u8]| {
                    let job =
                        hsm.mac_chain(MacKey::Audit, Vec::new(), vec![data.to_vec()], timeout);
                    rt.block_on(job)?.pop().ok_or(AuditError::Closed)
                };
                resolve(&p, cp.as_ref(), &mut token_mac)
            })
            .await
            .map_err(|_| AuditError::Closed)??
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        // The log's name is durable only once its directory is synced (entries are
        // fdatasync'd, which does not cover the name of a new file).
        crate::durable::fsync_parent(&path).map_err(io)?;

        let mut writer = Writer {
            hsm,
            rt: tokio::runtime::Handle::current(),
            file,
            len,
            path: path.clone(),
            options,
            next_seq: 0,
            prev: vec![0u8; MAC_LEN],
            chain: Chain::new(String::new(), ChainFormat::CURRENT),
            since_checkpoint: 0,
            expected: Arc::new(AtomicUsize::new(0)),
            checkpoint_retry_at: None,
            previous: None,
            started_ms: now_ms(),
            rotate_retry_at: None,
            inflight: None,
        };
        let expected = writer.expected.clone();
        let mut start = None;
        match plan {
            Plan::Continue(tail) => {
                if tail.header.format == ChainFormat::Token {
                    tracing::warn!(
                        path = %path.display(),
                        "this audit log uses the older chain format (every MAC computed in the token, one token operation per entry); rotate it (`strongroom-admin audit rotate`) for the segment-keyed format"
                    );
                }
                writer.next_seq = tail.count;
                writer.prev = tail.last_mac;
                writer.previous = parse_previous(tail.first.detail.as_deref().unwrap_or(""));
                writer.started_ms = tail.first.ts_ms;
                writer.chain = Chain::new(tail.header.log_id, tail.header.format);
                // A log continued after a crash before its first checkpoint (a rotation's
                // step 4, or a first start): checkpoint it before any request.
                if checkpoint
                    .as_ref()
                    .is_none_or(|cp| cp.is_pending() || cp.log_id != writer.chain.log_id)
                {
                    start = Some(None);
                }
            }
            Plan::Start {
                log_id,
                previous,
                reason,
            } => start = Some(Some((log_id, previous, reason))),
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
                    Some(Some((log_id, previous, reason))) => writer
                        .start_log(log_id, previous, reason.as_deref())
                        .and_then(|()| writer.checkpoint()),
                    Some(None) => writer.checkpoint(),
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
            change: event.change.clone(),
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

    /// Rotates now (after everything sent before): seals the log, records the next one in
    /// the token, archives the file and starts the new log. `reason` must pass
    /// [`check_reason`].
    pub async fn rotate(&self, reason: &str) -> Result<Rotated, AuditError> {
        check_reason(reason).map_err(AuditError::BadReason)?;
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Msg::Rotate(Box::new(RotateRequest {
                reason: reason.to_owned(),
                done,
            })))
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
pub(super) struct Writer {
    pub(super) hsm: Arc<Hsm>,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) file: File,
    /// The file's length: what this writer has appended to it (it alone writes the file).
    /// Kept here so that a batch costs no `lseek` and the size check for rotation no
    /// `fstat`.
    pub(super) len: u64,
    pub(super) path: PathBuf,
    pub(super) options: AuditOptions,
    pub(super) next_seq: u64,
    pub(super) prev: Vec<u8>,
    pub(super) chain: Chain,
    pub(super) since_checkpoint: u64,
    pub(super) expected: Arc<AtomicUsize>,
    /// After a failed checkpoint (the token away), no new attempt before this time: each
    /// attempt appends a `Checkpoint` entry, and retrying on every batch would fill the log.
    pub(super) checkpoint_retry_at: Option<Instant>,
    /// The log before this one, as its first entry names it.
    pub(super) previous: Option<LogEnd>,
    /// When this log started (its first entry), ms since the Unix epoch.
    pub(super) started_ms: u64,
    /// After a failed rotation, no automatic attempt before this time.
    pub(super) rotate_retry_at: Option<Instant>,
    /// A periodic checkpoint whose token write is still running (see
    /// [`Writer::start_checkpoint`]).
    pub(super) inflight: Option<InFlight>,
}

/// Marks the audit log unhealthy if the writer thread ends for any reason (a panic included):
/// every append then fails, and health must say so.
pub(super) struct Stopped(Arc<AtomicBool>);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// `now + d`, or a year from now if that overflows (`checkpoint_interval_secs` is large).
pub(super) fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// What bounds one group commit.
pub(super) struct BatchLimits {
    pub(super) max_entries: usize,
    pub(super) max_bytes: usize,
    pub(super) commit_window: Duration,
}

/// One group commit's entries, and a checkpoint request that came after them.
pub(super) struct Batch {
    pub(super) pending: Vec<Pending>,
    pub(super) checkpoint_after: Option<oneshot::Sender<Result<(), AuditError>>>,
    /// A rotation request that came after them.
    pub(super) rotate_after: Option<Box<RotateRequest>>,
}

/// Takes `first` and what is waiting after it, up to `max_entries` entries and `max_bytes`
/// bytes of lines (the first entry is taken whatever its size); an entry that would take the
/// batch over `max_bytes` is left in `carry` for the next one. If requests are in their
/// handlers (`expected`), sleeps once for the commit window and takes what came meanwhile:
/// an fsync costs ~50-60 µs of CPU here (BENCHMARKS.md), so without it batches under load
/// were two or three entries. One sleep, not a wake per arriving entry: each wake is a
/// context switch, which costs as much as the fsync it saves.
pub(super) fn gather(
    rx: &std::sync::mpsc::Receiver<Msg>,
    first: Box<Pending>,
    carry: &mut Option<Box<Pending>>,
    limits: &BatchLimits,
    expected: &AtomicUsize,
) -> Batch {
    let mut bytes = first.bytes;
    let mut pending = vec![*first];
    let mut checkpoint_after = None;
    let mut rotate_after = None;
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
            Ok(Msg::Rotate(r)) => {
                rotate_after = Some(r);
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
        rotate_after,
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
                        // Everything is covered by the checkpoint in flight, if any.
                        self.settle_checkpoint()
                    };
                    let _ = done.send(r);
                    continue;
                }
                Ok(Msg::Rotate(r)) => {
                    if !self.rotate_between_batches(Some(*r), &healthy) {
                        break;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {
                    next_tick = later(interval);
                    self.reap_checkpoint(&healthy);
                    if self.since_checkpoint > 0 && self.may_checkpoint() {
                        self.start_checkpoint(&healthy);
                    }
                    if !self.rotate_between_batches(None, &healthy) {
                        break;
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
                rotate_after,
            } = gather(&rx, first, &mut carry, &limits, &self.expected);
            let (entries, acks): (Vec<_>, Vec<_>) =
                pending.into_iter().map(|p| (p.entry, p.done)).unzip();
            let (count, oldest_ms) = (entries.len(), entries.iter().map(|e| e.ts_ms).min());
            match self.write_batch(entries) {
                Ok(()) => {
                    crate::metrics::audit_batch(count, oldest_ms, now_ms());
                    healthy.store(true, Ordering::Relaxed);
                    for ack in acks {
                        let _ = ack.send(Ok(()));
                    }
                    let due = Instant::now() >= next_tick;
                    if due {
                        next_tick = later(interval);
                    }
                    self.reap_checkpoint(&healthy);
                    if let Some(done) = checkpoint_after.take() {
                        let _ = done.send(self.try_checkpoint(&healthy));
                    } else if self.may_checkpoint()
                        && (due || self.since_checkpoint >= self.options.checkpoint_every)
                    {
                        self.start_checkpoint(&healthy);
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
            // Between batches: an officer's rotation, or one that size or age calls for.
            if !self.rotate_between_batches(rotate_after.map(|r| *r), &healthy) {
                break;
            }
        }
        // The log was dropped. No token call here: the runtime may be shutting down (and a
        // drop on its own thread waits for this one). The service's shutdown takes its final
        // checkpoint through `AuditLog::checkpoint` before that, which also waits for a
        // checkpoint still in flight; one that is still running now is left to finish.
        self.reap_checkpoint(&healthy);
        if let Some(f) = &self.inflight {
            self.since_checkpoint += f.entries;
        }
        if self.since_checkpoint > 0 {
            tracing::warn!(
                entries = self.since_checkpoint,
                "the audit log closed with entries after its last token checkpoint"
            );
        }
    }

    /// Chains, writes and fsyncs `entries` as the next entries of the log. On failure the
    /// file is cut back to where it was and the chain does not advance.
    pub(super) fn write_batch(&mut self, mut entries: Vec<Entry>) -> Result<(), AuditError> {
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
        let writing = Instant::now();
        let appended = append_durably(&mut self.file, self.len, &out);
        crate::metrics::audit_fdatasync(writing.elapsed());
        self.len = appended.map_err(|source| AuditError::Io {
            path: self.path.display().to_string(),
            source,
        })?;
        self.next_seq += entries.len() as u64;
        self.since_checkpoint += entries.len() as u64;
        self.prev = prev;
        Ok(())
    }
}

pub(super) fn to_entry(p: PendingEntry) -> Entry {
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
    let (phase, change, outcome, fingerprint) = match p.change {
        None => (None, None, None, None),
        Some(c) => match c.phase {
            Phase::Intent => (Some("intent"), Some(c.id), None, c.fingerprint),
            Phase::Outcome(o) => (Some("outcome"), Some(c.id), Some(o.as_str()), c.fingerprint),
        },
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
        phase: phase.map(str::to_owned),
        change,
        outcome: outcome.map(str::to_owned),
        fingerprint,
    }
}

pub(super) fn internal_entry(operation: &str, detail: String) -> Entry {
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
        phase: None,
        change: None,
        outcome: None,
        fingerprint: None,
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The bytes [`line_with_mac`] adds to a body: `,"mac":"`, the hex MAC and `"}\n`, less the
/// body's closing `}`.
pub(super) const MAC_SUFFIX_LEN: usize = 8 + 2 * MAC_LEN + 3 - 1;

/// At most the bytes `entry`'s line takes once chained, whatever its `seq` becomes.
pub(super) fn line_len_bound(entry: &Entry) -> usize {
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

/// Appends `bytes` to `file`, which is `len` bytes long (opened for appending), and syncs
/// its data; returns the new length. On failure the file is cut back to `len`.
pub(super) fn append_durably(file: &mut File, len: u64, bytes: &[u8]) -> std::io::Result<u64> {
    let result = file.write_all(bytes).and_then(|()| file.sync_data());
    if let Err(e) = result {
        // Leave no half-written entry behind (not possible on every device; ignore if not).
        let _ = file.set_len(len);
        return Err(e);
    }
    Ok(len + bytes.len() as u64)
}
