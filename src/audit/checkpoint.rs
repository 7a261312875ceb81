//! The checkpoint: the chain head and entry count recorded in the token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::writer::*;
use super::*;

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

impl Writer {
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
            Err(e) => {
                tracing::error!(error = %e, "audit checkpoint failed; retrying in one checkpoint interval");
                healthy.store(false, Ordering::Relaxed);
                self.checkpoint_retry_at = Some(later(self.options.checkpoint_interval));
            }
        }
        r
    }

    /// Appends a checkpoint entry and records the chain head in the token.
    pub(super) fn checkpoint(&mut self) -> Result<(), AuditError> {
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
        let label = self.options.checkpoint_label.clone();
        self.rt
            .block_on(async { tokio::time::timeout(deadline, hsm.write_data(label, value)).await })
            .map_err(|_| AuditError::Hsm(crate::hsm::HsmError::Timeout))??;
        self.since_checkpoint = 0;
        Ok(())
    }
}
