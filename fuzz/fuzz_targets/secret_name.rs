//! `SecretName::parse` and `NamePrefix::parse` on arbitrary text, under several limits.
//!
//! Checks every accepted name against an independent statement of the grammar (segments of
//! `A-Z a-z 0-9 . _ -`, 1–128 bytes, not `.` or `..`, joined by single `/`, at most
//! min(limit, 1024) bytes), that it re-parses to itself, and that each refusal names the first
//! rule the text breaks, in the order the parser checks them. Prefixes must be segment-aware.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strongroom::secret::{
    MAX_NAME_BYTES_CEILING, MAX_SEGMENT_BYTES, NameError, NamePrefix, SecretName,
};

fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// The grammar, written independently of the parser: the error the parser must give, if any.
fn expected(s: &str, limit: usize) -> Result<(), NameError> {
    let max = limit.min(MAX_NAME_BYTES_CEILING);
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > max {
        return Err(NameError::TooLong { len: s.len(), max });
    }
    if let Some(at) = s.bytes().position(|b| b != b'/' && !name_byte(b)) {
        return Err(NameError::BadCharacter { at });
    }
    for segment in s.split('/') {
        if segment.is_empty() {
            return Err(NameError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(NameError::DotSegment);
        }
        if segment.len() > MAX_SEGMENT_BYTES {
            return Err(NameError::SegmentTooLong);
        }
    }
    Ok(())
}

fn check_name(s: &str, limit: usize) {
    let parsed = SecretName::parse(s, limit);
    assert_eq!(
        parsed.as_ref().map(|_| ()).map_err(Clone::clone),
        expected(s, limit),
        "SecretName::parse({s:?}, {limit}) disagrees with the grammar"
    );
    let Ok(name) = parsed else { return };
    let text = name.as_str();
    assert_eq!(text, s, "a parsed name is the text it was parsed from");
    assert_eq!(name.to_string(), s);
    assert!(text.len() <= limit.min(MAX_NAME_BYTES_CEILING));
    assert!(!text.contains("//") && !text.starts_with('/') && !text.ends_with('/'));
    assert!(
        !text.contains('\0'),
        "names never contain NUL (the store's key separator)"
    );
    for segment in text.split('/') {
        assert!(segment != "." && segment != "..", "{text:?}");
        assert!(
            !segment.is_empty() && segment.len() <= MAX_SEGMENT_BYTES,
            "{text:?}"
        );
    }
    // Re-parsing gives the same name, under the same limit and under the ceiling.
    assert_eq!(SecretName::parse(text, limit).as_ref(), Ok(&name));
    assert_eq!(
        SecretName::parse(text, MAX_NAME_BYTES_CEILING).as_ref(),
        Ok(&name)
    );
    // A name lies under itself, under everything, and under its own parents.
    assert!(name.is_under(&NamePrefix::all()));
    let own = NamePrefix::parse(text, limit).expect("a valid name is a valid prefix");
    assert!(name.is_under(&own));
    let mut parent = text;
    while let Some((p, _)) = parent.rsplit_once('/') {
        let prefix = NamePrefix::parse(p, limit).expect("a name's parent is a valid prefix");
        assert!(name.is_under(&prefix), "{text:?} under {p:?}");
        let slashed = format!("{p}/");
        let prefix = NamePrefix::parse(&slashed, limit).expect("parent/ is a valid prefix");
        assert!(name.is_under(&prefix), "{text:?} under {slashed:?}");
        parent = p;
    }
}

fn check_prefix(s: &str, limit: usize) {
    let parsed = NamePrefix::parse(s, limit);
    let trimmed = s.strip_suffix('/').unwrap_or(s);
    let everything = trimmed.is_empty() || trimmed == "*";
    assert_eq!(
        parsed.is_ok(),
        everything || expected(trimmed, limit).is_ok(),
        "NamePrefix::parse({s:?}, {limit})"
    );
    let Ok(prefix) = parsed else { return };
    let p = prefix.as_str();
    assert!(!p.ends_with('/'));
    if everything {
        assert_eq!(p, "");
        assert!(prefix.matches("anything/at/all"));
        return;
    }
    assert_eq!(p, trimmed);
    assert!(SecretName::parse(p, limit).is_ok());
    // Segment-aware: the prefix itself and names below it match; siblings that merely share
    // the leading bytes do not.
    assert!(prefix.matches(p));
    assert!(prefix.matches(&format!("{p}/x")));
    assert!(!prefix.matches(&format!("{p}x")), "{p:?} matched {p:?}x");
    assert!(!prefix.matches(&format!("{p}-eu/x")));
    if let Some((parent, _)) = p.rsplit_once('/') {
        assert!(!prefix.matches(parent), "{p:?} matched its parent");
    }
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();
    for limit in [
        0,
        1,
        64,
        256,
        MAX_NAME_BYTES_CEILING,
        MAX_NAME_BYTES_CEILING + 1,
        usize::MAX,
        s.len(),
        s.len().saturating_sub(1),
    ] {
        check_name(s, limit);
        check_prefix(s, limit);
    }
});
