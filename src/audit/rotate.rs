//! Starting a new log: rotation (by size, by age, or an officer's `audit rotate`), the
//! archive of the old file, and the states a crash can leave.
//!
//! A rotation from log A (in `audit.log`) to log B takes these steps, each durable before
//! the next:
//!
//! 1. A's last entry, `AuditLogRotated`, names B (its "seal"); A now has `n` entries and
//!    head `h`.
//! 2. The token's checkpoint becomes `{log_id: B, count: 0, previous: {A, n, h}}`: from
//!    here on the token says B is current, and A ended at `n`/`h`. This is the commit point.
//! 3. A is archived: hard-linked as `audit-A.log` next to `audit.log` (a link never
//!    replaces an existing name, so no archive is ever overwritten), then `audit.log` is
//!    unlinked.
//! 4. A new `audit.log` is created; B's first entry, `AuditLogStarted`, names A, `n` and
//!    `h` (`previous log_id=A count=n head=h`).
//! 5. A checkpoint entry, and the token's checkpoint `{B, 2, head, previous: {A, n, h}}`.
//!
//! What a start finds after a crash at each point, and what it does ([`super::recover`]):
//!
//! - before 2 (`audit.log` is A, possibly ending in its seal; the token says A): A is
//!   continued; nothing happened.
//! - after 2, before 3 completes (`audit.log` is A, which must reach `n`/`h`; an
//!   `audit-A.log` may already be the same file): A is archived and B started.
//! - after 3, before 4 (`audit.log` missing, or empty, or a cut first line): B is started.
//! - after 4, before 5 (`audit.log` is B, its first entry naming A; the token's B count is
//!   0): B is verified from its first entry and continued, and checkpointed.
//!
//! No entry is lost in any of them: A is whole in its archive, and every entry acknowledged
//! in B is durable in B. `strongroom-admin audit new-log` (a lost file, the service down)
//! performs step 2 alone, with A's end as the token last recorded it; the next start then
//! does 3 (if A's file is there after all) to 5.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::chain::*;
use super::checkpoint::*;
use super::writer::*;
use super::*;

/// The most bytes of an officer's reason for a new log.
pub const MAX_REASON_BYTES: usize = 200;

/// A log that a rotation sealed and archived, and the log that followed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    /// Where the old log ended.
    pub previous: LogEnd,
    /// Its archive.
    pub archived: PathBuf,
    /// The new log.
    pub log_id: String,
}

/// An officer's (or the writer's) request to rotate now.
pub(super) struct RotateRequest {
    pub(super) reason: String,
    pub(super) done: oneshot::Sender<Result<Rotated, AuditError>>,
}

/// Where the log `log_id` that was at `path` is archived: `audit-<log_id>.log` in the same
/// directory.
pub fn archive_path(path: &Path, log_id: &str) -> PathBuf {
    archived_in(&archive_dir(path), log_id)
}

/// The archive of the log `log_id` in the directory `dir`.
pub fn archived_in(dir: &Path, log_id: &str) -> PathBuf {
    dir.join(format!("audit-{log_id}.log"))
}

/// The directory archived logs of the log at `path` are kept in (its own).
pub fn archive_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether `reason` may be recorded as the reason for a new log: 1 to
/// [`MAX_REASON_BYTES`] bytes of letters, digits, spaces and `. , : - _ / ( ) ' #`. The
/// reason is written into an entry's `k=v; k=v` detail, which must stay unambiguous.
pub fn check_reason(reason: &str) -> Result<(), String> {
    if reason.is_empty() || reason.len() > MAX_REASON_BYTES {
        return Err(format!(
            "a reason is 1 to {MAX_REASON_BYTES} bytes (got {})",
            reason.len()
        ));
    }
    if let Some(c) = reason.chars().find(|c| {
        !(c.is_alphanumeric()
            || matches!(
                c,
                ' ' | '.' | ',' | ':' | '-' | '_' | '/' | '(' | ')' | '\'' | '#'
            ))
    }) {
        return Err(format!(
            "a reason may hold letters, digits, spaces and . , : - _ / ( ) ' # only, not {c:?}"
        ));
    }
    Ok(())
}

/// The predecessor a log's first entry names (`previous log_id=… count=… head=…`).
pub fn parse_previous(detail: &str) -> Option<LogEnd> {
    let field = detail
        .split("; ")
        .find_map(|f| f.strip_prefix("previous "))?;
    let (mut log_id, mut count, mut head) = (None, None, None);
    for part in field.split(' ') {
        match part.split_once('=') {
            Some(("log_id", v)) => log_id = Some(v.to_owned()),
            Some(("count", v)) => count = v.parse().ok(),
            Some(("head", v)) => head = Some(v.to_owned()),
            _ => {}
        }
    }
    Some(LogEnd {
        log_id: log_id?,
        count: count?,
        head: head?,
    })
}

/// The reason a log's first entry records (`reason=…`, its last field), if any.
pub fn parse_reason(detail: &str) -> Option<&str> {
    detail.split("; ").find_map(|f| f.strip_prefix("reason="))
}

/// The detail of a new log's first entry.
pub(super) fn start_detail(
    header: &Header,
    previous: Option<&LogEnd>,
    reason: Option<&str>,
) -> String {
    let mut detail = header.to_detail();
    if let Some(p) = previous {
        detail.push_str(&format!(
            "; previous log_id={} count={} head={}",
            p.log_id, p.count, p.head
        ));
    }
    if let Some(r) = reason {
        detail.push_str(&format!("; reason={r}"));
    }
    detail
}

impl Checkpoint {
    /// Declares a new log after the one this checkpoint tracks (`audit new-log`: its file is
    /// lost): the checkpoint to record in the token. The next start of the service starts
    /// it, naming this log's end as the token recorded it.
    pub fn declare_next(&self, reason: &str) -> Result<Checkpoint, AuditError> {
        check_reason(reason).map_err(AuditError::BadReason)?;
        Ok(Checkpoint {
            log_id: new_log_id()?,
            count: 0,
            head: String::new(),
            previous: Some(LogEnd {
                log_id: self.log_id.clone(),
                count: self.count,
                head: self.head.clone(),
            }),
            reason: Some(reason.to_owned()),
        })
    }
}

/// Archives the log at `path` (whose id is `log_id`) as [`archive_path`], never replacing
/// an existing archive, then removes `path`. A crash between the two leaves both names on
/// one file, which the next call completes.
pub(super) fn archive(path: &Path, log_id: &str) -> Result<PathBuf, AuditError> {
    use std::os::unix::fs::MetadataExt;
    let to = archive_path(path, log_id);
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| AuditError::Io { path: p, source }
    };
    match std::fs::hard_link(path, &to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let (a, b) = (
                std::fs::metadata(path).map_err(io(path))?,
                std::fs::metadata(&to).map_err(io(&to))?,
            );
            if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
                return Err(AuditError::ArchiveExists {
                    path: path.display().to_string(),
                    archive: to.display().to_string(),
                });
            }
        }
        Err(e) => return Err(io(&to)(e)),
    }
    crate::durable::fsync_parent(&to).map_err(io(&to))?;
    std::fs::remove_file(path).map_err(io(path))?;
    crate::durable::fsync_parent(path).map_err(io(path))?;
    Ok(to)
}

/// Test-only fault points: with `STRONGROOM_DANGEROUS_TEST_AUDIT_PAUSE_AT` set to a point's
/// name, the writer stops there for good (and says so in the process log), so that a test
/// can kill the process at exactly that step of a rotation. Unset in production; it can
/// only stop the audit log, which then refuses every request.
fn fault_point(name: &str) {
    if std::env::var_os("STRONGROOM_DANGEROUS_TEST_AUDIT_PAUSE_AT").is_some_and(|v| v == name) {
        tracing::warn!(
            point = name,
            "test fault point reached: the audit writer stops here"
        );
        loop {
            std::thread::park();
        }
    }
}

/// How a rotation ended.
pub(super) enum RotateFailure {
    /// Nothing changed: the old log goes on (its seal, if written, is harmless).
    NotStarted(AuditError),
    /// The token already names the new log, but it could not be started: the writer must
    /// stop (requests are refused) and the next start finishes the rotation.
    Unfinished(AuditError),
}

impl Writer {
    /// Whether a size or age rotation is due.
    pub(super) fn rotation_due(&self) -> Option<&'static str> {
        if self.rotate_retry_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let bytes = self.options.rotate_bytes;
        if bytes > 0 && self.len >= bytes {
            return Some("size");
        }
        let age = self.options.rotate_age;
        let started = Duration::from_millis(self.started_ms);
        let now = Duration::from_millis(now_ms());
        if !age.is_zero() && now.saturating_sub(started) >= age {
            return Some("age");
        }
        None
    }

    /// Between batches: runs an officer's rotation, or one that size or age calls for.
    /// `false` if the writer must stop (see [`RotateFailure::Unfinished`]).
    pub(super) fn rotate_between_batches(
        &mut self,
        request: Option<RotateRequest>,
        healthy: &AtomicBool,
    ) -> bool {
        let (reason, done) = match request {
            Some(r) => (r.reason, Some(r.done)),
            None => match self.rotation_due() {
                Some(why) => (why.to_owned(), None),
                None => return true,
            },
        };
        match self.rotate(&reason) {
            Ok(r) => {
                self.rotate_retry_at = None;
                tracing::info!(
                    previous = %r.previous.log_id,
                    entries = r.previous.count,
                    archived = %r.archived.display(),
                    log_id = %r.log_id,
                    %reason,
                    "audit log rotated"
                );
                if let Some(done) = done {
                    let _ = done.send(Ok(r));
                }
                true
            }
            Err(RotateFailure::NotStarted(e)) => {
                tracing::error!(error = %e, "audit log rotation failed; the current log goes on");
                self.rotate_retry_at = Some(later(self.options.checkpoint_interval));
                if let Some(done) = done {
                    let _ = done.send(Err(e));
                }
                true
            }
            Err(RotateFailure::Unfinished(e)) => {
                tracing::error!(
                    error = %e,
                    "audit log rotation could not finish: refusing requests until a restart finishes it"
                );
                healthy.store(false, Ordering::Relaxed);
                if let Some(done) = done {
                    let _ = done.send(Err(e));
                }
                false
            }
        }
    }

    /// Seals the current log, records the next one in the token, archives the old file
    /// and starts the new log (steps 1–5 above).
    pub(super) fn rotate(&mut self, reason: &str) -> Result<Rotated, RotateFailure> {
        use RotateFailure::*;
        let next = new_log_id().map_err(NotStarted)?;
        let seal = format!(
            "log_id={}; next log_id={next}; reason={reason}",
            self.chain.log_id
        );
        self.write_batch(vec![internal_entry("AuditLogRotated", seal)])
            .map_err(NotStarted)?;
        fault_point("rotate-after-seal");
        let end = LogEnd {
            log_id: self.chain.log_id.clone(),
            count: self.next_seq,
            head: hex::encode(&self.prev),
        };
        let declared = Checkpoint {
            log_id: next.clone(),
            count: 0,
            head: String::new(),
            previous: Some(end.clone()),
            reason: Some(reason.to_owned()),
        };
        self.write_token_checkpoint(&declared).map_err(NotStarted)?;
        fault_point("rotate-after-token");
        let archived = archive(&self.path, &end.log_id).map_err(Unfinished)?;
        fault_point("rotate-after-archive");
        self.start_log(next.clone(), Some(end.clone()), Some(reason))
            .map_err(Unfinished)?;
        fault_point("rotate-after-first-entry");
        self.checkpoint().map_err(Unfinished)?;
        Ok(Rotated {
            previous: end,
            archived,
            log_id: next,
        })
    }

    /// Opens a new file at the log's path and starts the log `log_id` in it with its first
    /// entry, naming `previous` (step 4 above; the caller checkpoints next).
    pub(super) fn start_log(
        &mut self,
        log_id: String,
        previous: Option<LogEnd>,
        reason: Option<&str>,
    ) -> Result<(), AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.display().to_string(),
            source,
        };
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)
            .map_err(io)?;
        self.len = self.file.metadata().map_err(io)?.len();
        crate::durable::fsync_parent(&self.path).map_err(io)?;
        let header = Header {
            log_id,
            format: ChainFormat::CURRENT,
        };
        let detail = start_detail(&header, previous.as_ref(), reason);
        self.chain = Chain::new(header.log_id, header.format);
        self.next_seq = 0;
        self.prev = vec![0u8; MAC_LEN];
        self.previous = previous;
        self.started_ms = now_ms();
        self.write_batch(vec![internal_entry("AuditLogStarted", detail)])
    }
}
