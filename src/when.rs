//! Times as people write them: RFC 3339 instants and durations such as `90d` or `12h`.
//!
//! The service keeps whole Unix seconds; the command-line tools turn what they are given into
//! them ([`instant_or_after`], [`duration_secs`]) and show them back in RFC 3339 ([`rfc3339`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a time or duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WhenError {
    /// Neither an RFC 3339 instant nor a duration.
    #[error(
        "{0:?} is neither an RFC 3339 time (2027-01-31T12:00:00Z) nor a duration (90d, 12h, 30m)"
    )]
    Unparsed(String),
    /// Not a duration.
    #[error("{0:?} is not a duration (90d, 12h, 30m, 45s)")]
    NotDuration(String),
    /// Outside the range of Unix seconds the service keeps.
    #[error("{0:?} is out of range")]
    OutOfRange(String),
}

/// Whole seconds of a duration such as `7d`, `12h`, `90m`, `1w 2d` (humantime's grammar).
pub fn duration_secs(s: &str) -> Result<u64, WhenError> {
    humantime::parse_duration(s.trim())
        .map(|d| d.as_secs())
        .map_err(|_| WhenError::NotDuration(s.to_owned()))
}

/// Unix seconds of `s`: an RFC 3339 instant (`2027-01-31T12:00:00Z`, an offset or
/// fractional seconds allowed), or a duration counted from `now`.
pub fn instant_or_after(s: &str, now: i64) -> Result<i64, WhenError> {
    let t = s.trim();
    // humantime reads `Z` (or no zone); a numeric offset is applied here.
    let (local, offset) = split_offset(t);
    if let Ok(at) = humantime::parse_rfc3339_weak(local) {
        return unix(at)
            .and_then(|u| u.checked_sub(offset))
            .ok_or_else(|| WhenError::OutOfRange(s.to_owned()));
    }
    match humantime::parse_duration(t) {
        Ok(d) => i64::try_from(d.as_secs())
            .ok()
            .and_then(|d| now.checked_add(d))
            .ok_or_else(|| WhenError::OutOfRange(s.to_owned())),
        Err(_) => Err(WhenError::Unparsed(s.to_owned())),
    }
}

/// `unix` seconds in RFC 3339 (UTC, whole seconds); `@<seconds>` when it has no such form.
pub fn rfc3339(unix: i64) -> String {
    let at = u64::try_from(unix)
        .ok()
        .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)));
    match at {
        // humantime formats years up to 9999 only.
        Some(at) if unix < 253_402_300_800 => humantime::format_rfc3339_seconds(at).to_string(),
        _ => format!("@{unix}"),
    }
}

/// An RFC 3339 time without its numeric offset (`+01:00`, `-05:30`), and the offset in
/// seconds; the time itself and 0 when it has none.
fn split_offset(t: &str) -> (&str, i64) {
    let b = t.as_bytes();
    if b.len() > 19 && b[b.len() - 3] == b':' {
        let at = b.len() - 6;
        let sign = match b[at] {
            b'+' => 1,
            b'-' => -1,
            _ => return (t, 0),
        };
        let num = |r: std::ops::Range<usize>| t.get(r).and_then(|d| d.parse::<i64>().ok());
        if let (Some(h), Some(m)) = (num(at + 1..at + 3), num(at + 4..at + 6)) {
            return (&t[..at], sign * (h * 3600 + m * 60));
        }
    }
    (t, 0)
}

/// The Unix seconds of `at`, if it is not before the epoch.
fn unix(at: SystemTime) -> Option<i64> {
    let d = at.duration_since(UNIX_EPOCH).ok()?;
    i64::try_from(d.as_secs()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_and_durations_parse() {
        assert_eq!(
            instant_or_after("2027-01-31T12:00:00Z", 0),
            Ok(1_801_396_800)
        );
        assert_eq!(
            instant_or_after("2027-01-31T13:00:00+01:00", 0),
            Ok(1_801_396_800)
        );
        assert_eq!(
            instant_or_after("2027-01-31T06:30:00-05:30", 0),
            Ok(1_801_396_800)
        );
        assert_eq!(instant_or_after("90d", 1000), Ok(1000 + 90 * 86_400));
        assert_eq!(instant_or_after("12h", 0), Ok(12 * 3600));
        assert_eq!(duration_secs("7d"), Ok(7 * 86_400));
        assert!(matches!(
            instant_or_after("tomorrow", 0),
            Err(WhenError::Unparsed(_))
        ));
        assert!(duration_secs("2027-01-31T12:00:00Z").is_err());
        assert_eq!(rfc3339(1_801_396_800), "2027-01-31T12:00:00Z");
        assert_eq!(rfc3339(-5), "@-5");
    }
}
