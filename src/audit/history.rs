//! Verifying a log's whole history (`strongroom-admin audit verify`): the log, then each
//! archived predecessor its first entry names, end to end, naming any gap.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::Serialize;

use super::chain::*;
use super::checkpoint::*;
use super::rotate::{archived_in, parse_previous};
use super::*;

/// What `audit verify` found in a log and its predecessors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryReport {
    /// Entries of the log itself whose chain verified.
    pub verified: u64,
    /// The first problem: the log is not the token's current one, a problem in its chain,
    /// a gap in its history, or a problem in an archived predecessor's chain.
    pub problem: Option<Problem>,
    /// The log and its predecessors, newest first, as far as they were found.
    pub logs: Vec<LogReport>,
}

/// One log of a history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogReport {
    /// Its file.
    pub file: String,
    /// Its id, from its first entry.
    pub log_id: Option<String>,
    /// Entries whose chain verified.
    pub verified: u64,
    /// The predecessor its first entry names.
    pub previous: Option<LogEnd>,
    /// The first problem in its chain, if any.
    pub problem: Option<Problem>,
}

/// Verifies the log at `path` and every archived predecessor (in `archive_dir`, as
/// `audit-<log_id>.log`) that the first entries name, back to a log that names none.
/// `token_mac` is HMAC-SHA256 with the audit key, in the token; `checkpoint` the token's
/// checkpoint, if the officer's tool could read it. With `current`, the log at `path` must
/// be the one the token says is current.
pub fn verify_history<E>(
    path: &Path,
    archive_dir: &Path,
    mut token_mac: impl FnMut(&[u8]) -> Result<Vec<u8>, E>,
    checkpoint: Option<&Checkpoint>,
    current: bool,
) -> Result<HistoryReport, E> {
    let gap = |line: u64, detail: String| Problem {
        line,
        expected_seq: line.saturating_sub(1),
        kind: ProblemKind::Gap,
        detail,
    };
    let mut report = HistoryReport {
        verified: 0,
        problem: None,
        logs: Vec::new(),
    };
    let Some(head) = verify_one(path, &mut token_mac, checkpoint)? else {
        report.problem = Some(gap(1, format!("{} cannot be read", path.display())));
        return Ok(report);
    };
    report.verified = head.verified;
    let mut first_problem = None;
    if current && let Some(cp) = checkpoint {
        let found = head.log_id.as_deref().unwrap_or("(unknown)");
        let not_current = if cp.is_pending() {
            Some(format!(
                "this is log {found}, but the token's current log is {}, declared by a rotation or `audit new-log` and not started yet: start strongroomd to start it",
                cp.log_id
            ))
        } else if head.log_id.as_deref() != Some(cp.log_id.as_str()) {
            Some(format!(
                "this is log {found}, but the token's current log is {}: the file was swapped or replaced",
                cp.log_id
            ))
        } else {
            None
        };
        if let Some(detail) = not_current {
            first_problem = Some(Problem {
                line: 1,
                expected_seq: 0,
                kind: ProblemKind::NotCurrent,
                detail,
            });
        } else if let Some(tp) = &cp.previous
            && head.previous.as_ref() != Some(tp)
        {
            first_problem = Some(gap(
                1,
                format!(
                    "the token records that log {} follows log {} ({} entries, head {}), but its first entry names {}",
                    cp.log_id,
                    tp.log_id,
                    tp.count,
                    tp.head,
                    head.previous
                        .as_ref()
                        .map_or("no predecessor".into(), |p| format!(
                            "log {} ({} entries, head {})",
                            p.log_id, p.count, p.head
                        ))
                ),
            ));
        }
    }
    if first_problem.is_none() {
        first_problem = head.problem.clone();
    }
    let mut next = head.previous.clone();
    let mut successor = head.log_id.clone().unwrap_or_default();
    let mut seen = HashSet::from([successor.clone()]);
    report.logs.push(head);
    while let Some(named) = next.take() {
        let file = archived_in(archive_dir, &named.log_id);
        let mut found_gap = |detail: String| {
            if first_problem.is_none() {
                first_problem = Some(gap(1, detail));
            }
        };
        if !seen.insert(named.log_id.clone()) {
            found_gap(format!(
                "log {successor} names log {} as its predecessor, which the history already holds: the history loops",
                named.log_id
            ));
            break;
        }
        let Some(log) = verify_one(&file, &mut token_mac, None)? else {
            found_gap(format!(
                "the archived log {} (log {}, {} entries), which log {successor} names as its predecessor, is missing",
                file.display(),
                named.log_id,
                named.count
            ));
            break;
        };
        if log.log_id.as_deref() != Some(named.log_id.as_str()) {
            found_gap(format!(
                "{} holds log {}, not log {}, which log {successor} names as its predecessor",
                file.display(),
                log.log_id.as_deref().unwrap_or("(unknown)"),
                named.log_id
            ));
        } else if let Some(p) = &log.problem {
            if first_problem.is_none() {
                let mut p = p.clone();
                p.detail = format!("in the archived log {}: {}", file.display(), p.detail);
                first_problem = Some(p);
            }
        } else {
            let head_mac = last_mac(&file);
            if log.verified != named.count || head_mac.as_deref() != Some(named.head.as_str()) {
                found_gap(format!(
                    "the archived log {} (log {}) has {} entries ending at head {}, but its successor {successor} names {} entries ending at head {}: entries are missing or were added",
                    file.display(),
                    named.log_id,
                    log.verified,
                    head_mac.as_deref().unwrap_or("(none)"),
                    named.count,
                    named.head
                ));
            }
        }
        successor = named.log_id.clone();
        next = log.previous.clone();
        report.logs.push(log);
    }
    report.problem = first_problem;
    Ok(report)
}

/// Verifies one log file; `None` if it cannot be opened.
fn verify_one<E>(
    path: &Path,
    token_mac: &mut impl FnMut(&[u8]) -> Result<Vec<u8>, E>,
    checkpoint: Option<&Checkpoint>,
) -> Result<Option<LogReport>, E> {
    let Ok(file) = File::open(path) else {
        return Ok(None);
    };
    let first = BufReader::new(&file)
        .lines()
        .next()
        .and_then(Result::ok)
        .and_then(|l| split_line(&l))
        .and_then(|(body, _)| serde_json::from_str::<Entry>(&body).ok());
    let detail = first
        .as_ref()
        .and_then(|e| e.detail.clone())
        .unwrap_or_default();
    let Ok(file) = File::open(path) else {
        return Ok(None);
    };
    let r = verify(BufReader::new(file), &mut *token_mac, checkpoint)?;
    Ok(Some(LogReport {
        file: path.display().to_string(),
        log_id: Header::parse(&detail).map(|h| h.log_id),
        verified: r.verified,
        previous: parse_previous(&detail),
        problem: r.problem,
    }))
}

/// The stored MAC of a file's last line, hex.
fn last_mac(path: &Path) -> Option<String> {
    let file = File::open(path).ok()?;
    let last = BufReader::new(file).lines().map_while(Result::ok).last()?;
    split_line(&last).map(|(_, mac)| hex::encode(mac))
}
