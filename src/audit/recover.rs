//! Reading where an existing log ends, at start.

use std::fs::OpenOptions;
use std::io::Read;
use std::path::Path;

use super::chain::*;
use super::*;

/// The end of an existing log.
pub(super) struct Tail {
    pub(super) header: Header,
    pub(super) count: u64,
    pub(super) last_mac: Vec<u8>,
}

/// Reads where an existing log ends; cuts an unterminated last line (a write that was never
/// acknowledged). `None` for an empty or non-regular file.
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
