//! At start: where an existing log ends, and whether it is the log the token says is current
//! and reaches the token's checkpointed head through valid links.
//!
//! The token's checkpoint is the authority on which log is current (see
//! [`Checkpoint`](super::Checkpoint)). [`resolve`] compares the file with it and decides
//! whether to continue the file, to start the log the token declares (finishing a rotation
//! that a crash interrupted, see [`super::rotate`]), or to refuse to start.

use std::fs::OpenOptions;
use std::io::Read;
use std::path::Path;

use super::chain::*;
use super::checkpoint::*;
use super::rotate::{archive, parse_previous};
use super::*;

/// The end of an existing log.
pub(super) struct Tail {
    pub(super) header: Header,
    /// Its first entry (when it started; which log came before it).
    pub(super) first: Entry,
    pub(super) count: u64,
    pub(super) last_mac: Vec<u8>,
}

/// HMAC-SHA256 of the data with the audit key, computed in the token.
pub(super) type TokenMac<'a> = &'a mut dyn FnMut(&[u8]) -> Result<Vec<u8>, AuditError>;

/// What the writer does with the file at start.
pub(super) enum Plan {
    /// Append to the log in the file.
    Continue(Box<Tail>),
    /// Start the log `log_id` in a new file, naming `previous` in its first entry.
    Start {
        log_id: String,
        previous: Option<LogEnd>,
        reason: Option<String>,
    },
}

/// Decides what to do with the log at `path` given the token's checkpoint `cp`. Every part
/// of the file from the checkpointed entry to its end is re-verified with `token_mac`
/// (HMAC-SHA256 with the audit key, in the token). Refuses (an error naming what is wrong
/// and the officer's way out) a missing or empty file the token knows entries of, a file
/// whose log is not the token's current one, and a file that does not reach the
/// checkpointed head through valid links.
pub(super) fn resolve(
    path: &Path,
    cp: Option<&Checkpoint>,
    token_mac: TokenMac<'_>,
) -> Result<Plan, AuditError> {
    let shown = || path.display().to_string();
    let tail = recover_tail(path)?;
    let Some(cp) = cp else {
        // The token tracks no log yet: its first start, or a crash before its first
        // checkpoint. A file left by that crash must chain under this token's key.
        return match tail {
            None => Ok(Plan::Start {
                log_id: new_log_id()?,
                previous: None,
                reason: None,
            }),
            Some(tail) => {
                verify_tail(path, &tail.header, 0, None, token_mac)?;
                Ok(Plan::Continue(Box::new(tail)))
            }
        };
    };
    let Some(tail) = tail else {
        if cp.is_pending() {
            // A declared log not started yet (a rotation interrupted after its predecessor
            // was archived, or `audit new-log`): start it.
            return Ok(Plan::Start {
                log_id: cp.log_id.clone(),
                previous: cp.previous.clone(),
                reason: cp.reason.clone(),
            });
        }
        return Err(AuditError::Missing {
            path: shown(),
            log_id: cp.log_id.clone(),
            count: cp.count,
        });
    };
    if tail.header.log_id == cp.log_id {
        if cp.is_pending() {
            // A rotation interrupted after the new log's first entry, before its first
            // checkpoint: the whole (short) file must verify and name the predecessor.
            let named = parse_previous(tail.first.detail.as_deref().unwrap_or(""));
            if named.as_ref().map(|p| &p.log_id) != cp.previous.as_ref().map(|p| &p.log_id) {
                return Err(AuditError::Unverified {
                    path: shown(),
                    line: 1,
                    reason: "its first entry does not name the predecessor the token records"
                        .into(),
                });
            }
            verify_tail(path, &tail.header, 0, None, token_mac)?;
            return Ok(Plan::Continue(Box::new(tail)));
        }
        if cp.count > tail.count {
            return Err(AuditError::BehindCheckpoint {
                path: shown(),
                found: tail.count,
                expected: cp.count,
            });
        }
        let head = hex::decode(&cp.head).map_err(|e| AuditError::BadCheckpoint(e.to_string()))?;
        verify_tail(
            path,
            &tail.header,
            cp.count - 1,
            Some((cp.count, &head)),
            token_mac,
        )?;
        return Ok(Plan::Continue(Box::new(tail)));
    }
    if cp.is_pending()
        && let Some(prev) = &cp.previous
        && prev.log_id == tail.header.log_id
    {
        // A rotation interrupted after the token recorded the new log, before the old file
        // was archived (or `audit new-log` while the old file is still there): the old log
        // must reach the head the token recorded for it; it is archived whole, and its real
        // end is what the new log names.
        let head = hex::decode(&prev.head).map_err(|e| AuditError::BadCheckpoint(e.to_string()))?;
        let end = verify_tail(
            path,
            &tail.header,
            prev.count.saturating_sub(1),
            Some((prev.count, &head)),
            token_mac,
        )?;
        if end.count < prev.count {
            return Err(AuditError::BehindCheckpoint {
                path: shown(),
                found: end.count,
                expected: prev.count,
            });
        }
        let to = archive(path, &tail.header.log_id)?;
        tracing::info!(
            log_id = %tail.header.log_id,
            archived = %to.display(),
            "archived the previous audit log to finish the rotation the token records"
        );
        return Ok(Plan::Start {
            log_id: cp.log_id.clone(),
            previous: Some(end),
            reason: cp.reason.clone(),
        });
    }
    Err(AuditError::NotCurrent {
        path: shown(),
        found: tail.header.log_id,
        expected: cp.log_id.clone(),
    })
}

/// Reads where an existing log ends; cuts an unterminated last line (a write that was never
/// acknowledged). `None` for a missing, empty or non-regular file.
pub(super) fn recover_tail(path: &Path) -> Result<Option<Tail>, AuditError> {
    let malformed = |line: u64, reason: &str| AuditError::Malformed {
        path: path.display().to_string(),
        line,
        reason: reason.to_owned(),
    };
    let io = |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
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
        file.sync_data().map_err(io)?;
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
        first,
        count,
        last_mac,
    }))
}

/// Re-verifies the log at `path` from entry `from` (0-based) to its end: every entry's seq
/// and MAC (recomputed with `token_mac`, chained from the stored MAC of the entry before
/// `from`), and, with `head = Some((count, mac))`, that entry `count - 1` has exactly the MAC
/// the token recorded. Returns where the file ends.
pub(super) fn verify_tail(
    path: &Path,
    header: &Header,
    from: u64,
    head: Option<(u64, &[u8])>,
    token_mac: TokenMac<'_>,
) -> Result<LogEnd, AuditError> {
    let unverified = |line: u64, reason: String| AuditError::Unverified {
        path: path.display().to_string(),
        line,
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|source| AuditError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut chain = Chain::new(header.log_id.clone(), header.format);
    let mut token_mac = |data: &[u8]| token_mac(data);
    let mut prev = vec![0u8; MAC_LEN];
    let mut count = 0u64;
    let mut head_seen = head.is_none();
    for (i, line) in text.lines().enumerate() {
        let seq = i as u64;
        let line_no = seq + 1;
        count = seq + 1;
        if seq + 1 < from {
            continue;
        }
        let (body, mac) =
            split_line(line).ok_or_else(|| unverified(line_no, "it has no MAC".into()))?;
        if seq + 1 == from {
            // The entry before the first one re-verified: only its MAC is needed.
            prev = mac;
            continue;
        }
        let entry: Entry = serde_json::from_str(&body)
            .map_err(|e| unverified(line_no, format!("it is not an audit entry ({e})")))?;
        if entry.seq != seq {
            return Err(unverified(
                line_no,
                format!("it holds entry {} where entry {seq} belongs", entry.seq),
            ));
        }
        let computed = chain.mac(seq, &prev, body.as_bytes(), &mut token_mac)?;
        if computed != mac {
            return Err(unverified(
                line_no,
                format!(
                    "entry {seq}'s MAC does not verify (modified, or not chained by this token)"
                ),
            ));
        }
        if let Some((n, h)) = head
            && n == seq + 1
        {
            if computed != h {
                return Err(unverified(
                    line_no,
                    format!(
                        "entry {seq} is not the one the token's checkpoint records (the checkpointed head differs)"
                    ),
                ));
            }
            head_seen = true;
        }
        prev = computed;
    }
    if !head_seen {
        return Err(unverified(
            count + 1,
            "the file ends before the checkpointed head".into(),
        ));
    }
    Ok(LogEnd {
        log_id: header.log_id.clone(),
        count,
        head: hex::encode(&prev),
    })
}
