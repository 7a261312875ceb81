//! Times as people read and write them: RFC 3339 in UTC for display, and what the
//! command-line tools accept — RFC 3339 instants (`Z` or a numeric offset), durations such
//! as `90d` or `12h`, and (for filters) Unix seconds.
//!
//! The service keeps whole Unix seconds. A duration means "that long from now" where a
//! future time is asked for ([`instant_or_after`]: `--expires-at 90d`) and "that long before
//! now" where a past one is ([`parse_instant`]: `audit search --since 2h`).

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

/// A time given on the command line that is none of the accepted forms.
#[derive(Debug, thiserror::Error)]
#[error(
    "'{0}' is not a time: give RFC 3339 (2026-12-07T05:56:10Z, or with an offset like +01:00), a duration back from now (90s, 2h, 7d, 1h30m), or Unix seconds"
)]
pub struct BadTime(pub String);

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
    if humantime::parse_rfc3339_weak(split_offset(t).0).is_ok() {
        return parse_rfc3339(t).ok_or_else(|| WhenError::OutOfRange(s.to_owned()));
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

/// Milliseconds since the epoch as RFC 3339 in UTC, to the millisecond.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// An expiry for people: RFC 3339, or `never` for none (absent or 0).
pub fn expiry(unix: Option<i64>) -> String {
    match unix {
        None | Some(0) => "never".into(),
        Some(t) => rfc3339(t),
    }
}

/// An expiry for programs: RFC 3339, or null for none (absent or 0).
pub fn expiry_json(unix: Option<i64>) -> serde_json::Value {
    match unix {
        None | Some(0) => serde_json::Value::Null,
        Some(t) => serde_json::Value::String(rfc3339(t)),
    }
}

/// A point in time from the command line, as Unix seconds: RFC 3339 (`Z` or an offset),
/// a duration meaning that long before `now`, or plain Unix seconds.
pub fn parse_instant(s: &str, now: SystemTime) -> Result<i64, BadTime> {
    let bad = || BadTime(s.to_owned());
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map_err(|_| bad());
    }
    if t.len() >= 10 && t.as_bytes()[4] == b'-' {
        return parse_rfc3339(t).ok_or_else(bad);
    }
    let back = humantime::parse_duration(t).map_err(|_| bad())?;
    let at = now.checked_sub(back).ok_or_else(bad)?;
    unix(at).ok_or_else(bad)
}

/// RFC 3339 with `Z` (or no zone) or a `±HH:MM` offset, as Unix seconds.
fn parse_rfc3339(t: &str) -> Option<i64> {
    // humantime reads `Z` (or no zone); a numeric offset is applied here.
    let (local, offset) = split_offset(t);
    let at = humantime::parse_rfc3339_weak(local).ok()?;
    unix(at)?.checked_sub(offset)
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

    #[test]
    fn instants_in_every_accepted_form() {
        let now = UNIX_EPOCH + Duration::from_secs(1_796_622_738);
        let p = |s| parse_instant(s, now).unwrap();
        assert_eq!(p("2026-12-07T05:56:10Z"), 1_796_622_970);
        assert_eq!(rfc3339(p("2026-12-07T05:56:10Z")), "2026-12-07T05:56:10Z");
        assert_eq!(p("2026-12-07T06:56:10+01:00"), p("2026-12-07T05:56:10Z"));
        assert_eq!(p("2026-12-07T00:26:10-05:30"), p("2026-12-07T05:56:10Z"));
        assert_eq!(p("2h"), 1_796_622_738 - 7200);
        assert_eq!(p("7d"), 1_796_622_738 - 7 * 86_400);
        assert_eq!(p("1h 30m"), 1_796_622_738 - 5400);
        assert_eq!(p("1796622738"), 1_796_622_738);
        for bad in ["", "yesterday", "2026-13-07T00:00:00Z", "2h-", "-5"] {
            assert!(parse_instant(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn display_forms() {
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(expiry(None), "never");
        assert_eq!(expiry(Some(0)), "never");
        assert_eq!(expiry(Some(1_700_000_000)), "2023-11-14T22:13:20Z");
        assert_eq!(expiry_json(None), serde_json::Value::Null);
    }
}
