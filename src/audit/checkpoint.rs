//! The checkpoint: which log is current, its chain head and entry count, recorded in the
//! token — the authority on which log is current.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::writer::*;
use super::*;
use crate::hsm::Hsm;

/// The checkpoint kept in the token (a private data object, see
/// [`AuditOptions::checkpoint_label`]).
///
/// `count == 0` means a new log has been declared (a rotation, or `strongroom-admin audit
/// new-log` for a lost file) but not started yet: the next start, or the rotating writer,
/// starts the log `log_id` and names `previous` in its first entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The current log (from its first entry).
    pub log_id: String,
    /// Entries in the log when the checkpoint was taken.
    pub count: u64,
    /// MAC of the last of them, hex (empty while `count == 0`).
    pub head: String,
    /// The log before this one, as it ended, when this one was started by a rotation or an
    /// officer (`None` for a token's first log and for checkpoints of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<LogEnd>,
    /// Why the officer declared this log (`audit new-log --reason`), until its first entry
    /// records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where a log ended: its id, its number of entries and the MAC of its last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEnd {
    /// The log's id.
    pub log_id: String,
    /// Entries in it.
    pub count: u64,
    /// MAC of its last entry, hex.
    pub head: String,
}

impl Checkpoint {
    /// Whether this checkpoint declares a log that has not been started yet.
    pub fn is_pending(&self) -> bool {
        self.count == 0
    }

    /// The checkpoint's bytes as the token keeps them.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising strings, integers and options to a Vec does not fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the checkpoint under `label` from the token (`None` if it holds none).
    pub async fn read(hsm: &Hsm, label: &str) -> Result<Option<Checkpoint>, AuditError> {
        match hsm.read_data(label).await? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| AuditError::BadCheckpoint(e.to_string())),
        }
    }
}

/// A periodic checkpoint whose token write runs on the runtime while the writer goes on
/// with the next group commits.
pub(super) struct InFlight {
    /// The token write, within the token deadline.
    pub(super) job: tokio::task::JoinHandle<Result<(), AuditError>>,
    /// The entries it covers that no earlier checkpoint did (counted again if it fails).
    pub(super) entries: u64,
}

impl Writer {
    /// Starts a periodic checkpoint: its entry is written now (one group commit), the
    /// token write runs in the background. Recording the head in the token takes a token
    /// object write and an fsync of the token's files (many ms on a busy disk); done inline
    /// it stalled every request waiting for the next group commit. The token's checkpoint
    /// only ever names entries already durable in the file, so it may lag the log: it then
    /// names a prefix, which is what it does between checkpoints anyway. Every other token
    /// write (an explicit checkpoint, a rotation) first waits for this one
    /// ([`Writer::write_token_checkpoint`]), so an older head never overwrites a newer
    /// record. Does nothing while the previous one is still running.
    pub(super) fn start_checkpoint(&mut self, healthy: &AtomicBool) {
        self.reap_checkpoint(healthy);
        if self.inflight.is_some() {
            return;
        }
        let detail = format!("log_id={}; count={}", self.chain.log_id, self.next_seq + 1);
        if let Err(e) = self.write_batch(vec![internal_entry("Checkpoint", detail)]) {
            self.checkpoint_failed(&e, healthy);
            return;
        }
        let cp = self.current_checkpoint();
        let (hsm, deadline) = (self.hsm.clone(), self.options.hsm_timeout);
        let label = self.options.checkpoint_label.clone();
        let value = cp.to_bytes();
        let job = self.rt.spawn(async move {
            tokio::time::timeout(deadline, hsm.write_data(label, value))
                .await
                .map_err(|_| AuditError::Hsm(crate::hsm::HsmError::Timeout))??;
            Ok(())
        });
        self.inflight = Some(InFlight {
            job,
            entries: std::mem::take(&mut self.since_checkpoint),
        });
    }

    /// Takes the result of a background checkpoint that has finished, if any.
    pub(super) fn reap_checkpoint(&mut self, healthy: &AtomicBool) {
        if self.inflight.as_ref().is_some_and(|f| f.job.is_finished())
            && let Err(e) = self.settle_checkpoint()
        {
            self.checkpoint_failed(&e, healthy);
        }
    }

    /// Waits for the background checkpoint, if any, and returns its result; on failure
    /// its entries count again towards the next checkpoint.
    pub(super) fn settle_checkpoint(&mut self) -> Result<(), AuditError> {
        let Some(f) = self.inflight.take() else {
            return Ok(());
        };
        let r = self
            .rt
            .block_on(f.job)
            .map_err(|_| AuditError::Closed)
            .and_then(|r| r);
        if r.is_err() {
            self.since_checkpoint += f.entries;
        }
        r
    }

    fn checkpoint_failed(&mut self, e: &AuditError, healthy: &AtomicBool) {
        tracing::error!(error = %e, "audit checkpoint failed; retrying in one checkpoint interval");
        healthy.store(false, Ordering::Relaxed);
        self.checkpoint_retry_at = Some(later(self.options.checkpoint_interval));
    }

    fn current_checkpoint(&self) -> Checkpoint {
        Checkpoint {
            log_id: self.chain.log_id.clone(),
            count: self.next_seq,
            head: hex::encode(&self.prev),
            previous: self.previous.clone(),
            reason: None,
        }
    }

    /// Whether a periodic checkpoint may be attempted now.
    pub(super) fn may_checkpoint(&self) -> bool {
        self.checkpoint_retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// A checkpoint whose failure is logged, shows in health until the next good write, and
    /// holds off periodic attempts for one checkpoint interval. The entries are durable and
    /// acknowledged either way; only the token's record of the head waits.
    pub(super) fn try_checkpoint(&mut self, healthy: &AtomicBool) -> Result<(), AuditError> {
        let r = self.checkpoint();
        match &r {
            Ok(()) => self.checkpoint_retry_at = None,
            Err(e) => self.checkpoint_failed(e, healthy),
        }
        r
    }

    /// Appends a checkpoint entry and records the chain head in the token.
    pub(super) fn checkpoint(&mut self) -> Result<(), AuditError> {
        let detail = format!("log_id={}; count={}", self.chain.log_id, self.next_seq + 1);
        self.write_batch(vec![internal_entry("Checkpoint", detail)])?;
        let cp = self.current_checkpoint();
        self.write_token_checkpoint(&cp)?;
        self.since_checkpoint = 0;
        Ok(())
    }

    /// Records `cp` in the token, within the token deadline, after the background
    /// checkpoint (if any) has finished: this record is the newer one.
    pub(super) fn write_token_checkpoint(&mut self, cp: &Checkpoint) -> Result<(), AuditError> {
        // Superseded by `cp` whatever its result.
        let _ = self.settle_checkpoint();
        // A token that hangs must not stop the log: the write gets the token deadline. (The
        // timer is made inside block_on: it needs the runtime's context.)
        let (hsm, deadline) = (&self.hsm, self.options.hsm_timeout);
        let label = self.options.checkpoint_label.as_str();
        let value = cp.to_bytes();
        self.rt
            .block_on(async { tokio::time::timeout(deadline, hsm.write_data(label, value)).await })
            .map_err(|_| AuditError::Hsm(crate::hsm::HsmError::Timeout))??;
        Ok(())
    }
}
