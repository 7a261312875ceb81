//! Verifying a log (`strongroom-admin audit verify`) and reading its entries.

use std::io::BufRead;

use serde::Serialize;

use super::*;
use super::{chain::*, checkpoint::*};

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
    /// The log is not the one the token says is current.
    NotCurrent,
    /// The history has a gap: a predecessor is missing, or does not end where its successor
    /// says it did.
    Gap,
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

/// Reads a log's entries without checking MACs (for `audit tail` and `audit search`).
pub fn read_entries(reader: impl BufRead) -> impl Iterator<Item = Entry> {
    reader.lines().map_while(Result::ok).filter_map(|l| {
        split_line(&l).and_then(|(body, _)| serde_json::from_str::<Entry>(&body).ok())
    })
}
