//! Times as people read and write them, for the command-line tools: RFC 3339 in UTC for
//! display, and RFC 3339, a duration back from now (`2h`, `7d`) or Unix seconds for filters.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A time given on the command line that is none of the accepted forms.
#[derive(Debug, thiserror::Error)]
#[error(
    "'{0}' is not a time: give RFC 3339 (2026-12-07T05:56:10Z, or with an offset like +01:00), a duration back from now (90s, 2h, 7d, 1h30m), or Unix seconds"
)]
pub struct BadTime(pub String);

/// Unix seconds as RFC 3339 in UTC, to the second (`2026-12-07T05:56:10Z`).
pub fn rfc3339(unix: i64) -> String {
    crate::service::approvals::utc(unix)
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
    Ok(unix(at))
}

/// RFC 3339 with `Z` or a `±HH:MM` offset (humantime reads only UTC).
fn parse_rfc3339(t: &str) -> Option<i64> {
    let (utc, offset_secs) = match t.as_bytes().get(t.len().wrapping_sub(6)) {
        Some(b'+' | b'-') if t.len() > 19 && t.as_bytes()[t.len() - 3] == b':' => {
            let (base, off) = t.split_at(t.len() - 6);
            let sign = if off.starts_with('-') { -1 } else { 1 };
            let h: i64 = off[1..3].parse().ok()?;
            let m: i64 = off[4..6].parse().ok()?;
            (format!("{base}Z"), sign * (h * 3600 + m * 60))
        }
        _ => (t.to_owned(), 0),
    };
    let at = humantime::parse_rfc3339_weak(&utc).ok()?;
    Some(unix(at) - offset_secs)
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
