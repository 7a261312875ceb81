//! Unit tests of the audit trail's writer, chain and verifier.

use std::time::Duration;

use tokio::sync::oneshot;

use super::*;
use super::{chain::*, checkpoint::*, recover::*, rotate::*, verify::*, writer::*};

/// A queued entry whose detail is `n` bytes.
fn queued(n: usize, id: u64) -> Box<Pending> {
    let mut entry = internal_entry("Test", "d".repeat(n));
    entry.request_id = id;
    let bytes = line_len_bound(&entry);
    Box::new(Pending {
        entry,
        bytes,
        done: oneshot::channel().0,
    })
}

#[test]
fn line_len_bound_covers_the_line_at_any_seq() {
    for seq in [0, 9, 10, 12345, u64::MAX] {
        let p = queued(100, 1);
        let mut e = p.entry.clone();
        e.seq = seq;
        let line = line_with_mac(&serde_json::to_vec(&e).unwrap(), &[7u8; MAC_LEN]);
        assert!(
            line.len() <= p.bytes,
            "seq {seq}: {} > {}",
            line.len(),
            p.bytes
        );
    }
    let mut e = queued(100, 1).entry;
    e.seq = u64::MAX;
    let line = line_with_mac(&serde_json::to_vec(&e).unwrap(), &[7u8; MAC_LEN]);
    assert_eq!(
        line.len(),
        queued(100, 1).bytes,
        "the bound is exact at the widest seq"
    );
}

#[test]
fn group_commits_are_bounded_in_bytes_as_well_as_entries() {
    let (tx, rx) = std::sync::mpsc::channel();
    // 40 entries of about 1 KiB, one of 20 KiB, 10 more of about 1 KiB.
    let sizes: Vec<usize> = (0..40)
        .map(|_| 1000)
        .chain([20_000])
        .chain((0..10).map(|_| 1000))
        .collect();
    for (i, n) in sizes.iter().enumerate() {
        tx.send(Msg::Append(queued(*n, i as u64))).unwrap();
    }
    let limits = BatchLimits {
        max_entries: 512,
        max_bytes: 8 * 1024,
        commit_window: Duration::ZERO,
    };
    let expected = AtomicUsize::new(0);
    let mut carry = None;
    let mut seen = Vec::new();
    let mut batches = Vec::new();
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.try_recv() {
                Ok(Msg::Append(p)) => p,
                _ => break,
            },
        };
        let batch = gather(&rx, first, &mut carry, &limits, &expected);
        let bytes: usize = batch.pending.iter().map(|p| p.bytes).sum();
        let n = batch.pending.len();
        assert!(
            bytes <= limits.max_bytes || n == 1,
            "a batch of {n} entries holds {bytes} bytes"
        );
        seen.extend(batch.pending.iter().map(|p| p.entry.request_id));
        batches.push((n, bytes));
    }
    // Every entry once, in order; the big one alone; the others filled batches up to
    // the bound (as many whole entries as fit in 8 KiB).
    assert_eq!(seen, (0..sizes.len() as u64).collect::<Vec<_>>());
    assert!(
        batches.iter().any(|&(n, b)| n == 1 && b > 20_000),
        "{batches:?}"
    );
    let one = queued(1000, 0).bytes;
    assert_eq!(
        batches[0],
        (8 * 1024 / one, 8 * 1024 / one * one),
        "{batches:?}"
    );
    // The entry bound still holds when entries are small.
    for i in 0..20 {
        tx.send(Msg::Append(queued(10, i))).unwrap();
    }
    let small = BatchLimits {
        max_entries: 8,
        ..limits
    };
    let Ok(Msg::Append(first)) = rx.try_recv() else {
        panic!("queued")
    };
    let batch = gather(&rx, first, &mut carry, &small, &expected);
    assert_eq!(batch.pending.len(), 8);
    assert!(carry.is_none());
}

#[test]
fn names_that_are_not_plain_are_recorded_bounded_with_length_and_digest() {
    // Valid names, prefixes, policy names and approval ids are recorded whole.
    for ok in [
        "payments/db/password",
        "payments/",
        "*",
        "",
        "0123456789abcdef",
    ] {
        assert_eq!(
            RecordedName::new(ok, 256),
            RecordedName {
                text: ok,
                invalid: None
            }
        );
    }
    // Too long: cut to the limit, with the whole name's length and SHA-256.
    let long = "a".repeat(5 << 20);
    let r = RecordedName::new(&long, 256);
    assert_eq!(r.text, &long[..256]);
    let i = r.invalid.unwrap();
    assert_eq!((i.len, i.truncated), (5 << 20, true));
    assert_eq!(
        i.sha256,
        hex::encode(ring::digest::digest(&ring::digest::SHA256, long.as_bytes()))
    );
    // Just over: cut by one byte.
    let over = "b".repeat(257);
    assert_eq!(RecordedName::new(&over, 256).text.len(), 256);
    // Bad characters: recorded with its length and digest; cut only if its JSON form
    // would be longer than the limit, and never inside a character.
    let short = RecordedName::new("a b", 256);
    assert_eq!(short.text, "a b");
    assert!(!short.invalid.as_ref().unwrap().truncated);
    let nuls = "\0".repeat(1000);
    let r = RecordedName::new(&nuls, 256);
    assert_eq!(r.text.len(), 256 / 6);
    assert!(serde_json::to_string(r.text).unwrap().len() <= 256 + 2);
    let wide = "é".repeat(200);
    let r = RecordedName::new(&wide, 255);
    assert_eq!(r.text.len(), 254);
    assert!(r.invalid.unwrap().truncated);
}

#[test]
fn entries_are_found_by_a_name_recorded_whole_or_cut() {
    let long = "x".repeat(300);
    let recorded = RecordedName::new(&long, 256);
    let mut e = internal_entry("Test", String::new());
    e.name = Some(recorded.text.to_owned());
    e.name_sha256 = recorded.invalid.map(|i| i.sha256);
    assert!(e.is_about(&long));
    assert!(!e.is_about(&long[..256]));
    e.name = Some("payments/a".into());
    e.name_sha256 = None;
    assert!(e.is_about("payments/a"));
    assert!(!e.is_about("payments/b"));
}

#[test]
fn lines_split_back_into_body_and_mac() {
    let body = br#"{"seq":3,"name":"a\"mac\":\"x"}"#;
    let mac = [0xabu8; 32];
    let line = line_with_mac(body, &mac);
    let text = std::str::from_utf8(&line).unwrap().trim_end();
    let (b, m) = split_line(text).unwrap();
    assert_eq!(b.as_bytes(), body);
    assert_eq!(m, mac);
}

/// HMAC-SHA256 with a fixed key: stands in for the token's audit key.
fn fake_token(key: &'static [u8]) -> impl FnMut(&[u8]) -> Result<Vec<u8>, ()> {
    move |data| {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        Ok(ring::hmac::sign(&k, data).as_ref().to_vec())
    }
}

/// A log of `n` entries written with `format`, as lines.
fn write_log(format: ChainFormat, n: u64, token_key: &'static [u8]) -> Vec<String> {
    let header = Header {
        log_id: "00ff".into(),
        format,
    };
    let mut chain = Chain::new(header.log_id.clone(), format);
    let mut token = fake_token(token_key);
    let mut prev = vec![0u8; MAC_LEN];
    (0..n)
        .map(|seq| {
            let mut e = internal_entry("Test", header.to_detail());
            if seq > 0 {
                e.detail = Some(format!("entry {seq}"));
            }
            e.seq = seq;
            let body = serde_json::to_vec(&e).unwrap();
            let mac = chain.mac(seq, &prev, &body, &mut token).unwrap();
            let line = String::from_utf8(line_with_mac(&body, &mac)).unwrap();
            prev = mac;
            line
        })
        .collect()
}

fn check(lines: &[String], token_key: &'static [u8]) -> VerifyReport {
    let text = lines.concat();
    verify(text.as_bytes(), fake_token(token_key), None).unwrap()
}

#[test]
fn segment_chains_verify_across_segment_boundaries_and_need_the_token_key() {
    let format = ChainFormat::Segment { len: 4 };
    let lines = write_log(format, 11, b"audit key");
    let ok = check(&lines, b"audit key");
    assert_eq!((ok.verified, ok.problem), (11, None));
    // The same log checked against another token's key fails at its first entry.
    let other = check(&lines, b"another key");
    assert_eq!(other.verified, 0);
    assert_eq!(other.problem.unwrap().kind, ProblemKind::Modified);
}

#[test]
fn an_entry_chained_under_another_segments_key_is_refused() {
    // Entry 5 (segment 1) re-MAC'd with segment 0's key, as someone holding only the
    // key of an earlier segment would forge it.
    let format = ChainFormat::Segment { len: 4 };
    let mut lines = write_log(format, 8, b"audit key");
    let (_, prev_mac) = split_line(lines[4].trim_end()).unwrap();
    let (body, _) = split_line(lines[5].trim_end()).unwrap();
    let forged_body = body.replace("entry 5", "entry 5, edited");
    let mut segment0 = Chain::new("00ff".into(), format);
    let mut token = fake_token(b"audit key");
    let forged = segment0
        .mac(0, &prev_mac, forged_body.as_bytes(), &mut token)
        .unwrap();
    lines[5] = String::from_utf8(line_with_mac(forged_body.as_bytes(), &forged)).unwrap();
    let report = check(&lines, b"audit key");
    assert_eq!(report.verified, 5);
    let p = report.problem.unwrap();
    assert_eq!((p.line, p.kind), (6, ProblemKind::Modified));
}

#[test]
fn logs_in_the_token_format_still_verify() {
    let lines = write_log(ChainFormat::Token, 5, b"audit key");
    assert!(!lines[0].contains("chain="), "{}", lines[0]);
    let ok = check(&lines, b"audit key");
    assert_eq!((ok.verified, ok.problem), (5, None));
    let mut edited = lines.clone();
    edited[3] = edited[3].replace("entry 3", "entry 4");
    let p = check(&edited, b"audit key").problem.unwrap();
    assert_eq!((p.line, p.kind), (4, ProblemKind::Modified));
}

#[test]
fn headers_name_the_log_and_its_chain_format() {
    let h = Header::parse(
        "log_id=ab; chain=hmac-sha256-segment-v2; segment=4096; previous log_id=cd count=3 head=ef",
    )
    .unwrap();
    assert_eq!(h.log_id, "ab");
    assert_eq!(h.format, ChainFormat::Segment { len: 4096 });
    assert_eq!(
        Header::parse("log_id=ab").unwrap().format,
        ChainFormat::Token
    );
    assert_eq!(Header::parse("log_id=ab; chain=unknown-v9"), None);
    assert_eq!(
        Header::parse("log_id=ab; chain=hmac-sha256-segment-v2; segment=0"),
        None
    );
    assert_eq!(
        Header::parse("chain=hmac-sha256-segment-v2; segment=8"),
        None
    );
    assert_eq!(
        Header::parse(
            &Header {
                log_id: "x".into(),
                format: ChainFormat::CURRENT
            }
            .to_detail()
        )
        .unwrap()
        .format,
        ChainFormat::CURRENT
    );
}

#[test]
fn an_announced_request_counts_until_its_entry_arrives_and_only_once() {
    let counter = Arc::new(AtomicUsize::new(0));
    let announce = || {
        counter.fetch_add(1, Ordering::AcqRel);
        Expected {
            counter: Some(counter.clone()),
            live: AtomicBool::new(true),
        }
    };
    let (a, b) = (announce(), announce());
    assert_eq!(counter.load(Ordering::Acquire), 2);
    a.arrived();
    a.arrived();
    assert_eq!(counter.load(Ordering::Acquire), 1);
    drop(a);
    assert_eq!(counter.load(Ordering::Acquire), 1);
    // A request that ends without an entry (cancelled, panicked) stops counting too.
    drop(b);
    assert_eq!(counter.load(Ordering::Acquire), 0);
    // Without a durable log nothing is counted.
    drop(Auditor::DangerousLogOnly.announce());
}

#[test]
fn segment_keys_and_macs_follow_the_documented_formula() {
    // Recomputed here from README's formula with ring alone, not with `Chain`.
    let token_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"audit key");
    let lines = write_log(ChainFormat::Segment { len: 4 }, 6, b"audit key");
    let mut prev = vec![0u8; 32];
    for (i, line) in lines.iter().enumerate() {
        let segment = i as u64 / 4;
        let mut input = b"strongroom audit segment key v2\0".to_vec();
        input.extend_from_slice(b"00ff");
        input.push(0);
        input.extend_from_slice(&4u64.to_be_bytes());
        input.extend_from_slice(&segment.to_be_bytes());
        let k_s = ring::hmac::sign(&token_key, &input);
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k_s.as_ref());
        let (body, mac) = split_line(line.trim_end()).unwrap();
        let mut data = prev.clone();
        data.extend_from_slice(body.as_bytes());
        assert_eq!(ring::hmac::sign(&k, &data).as_ref(), &mac[..], "entry {i}");
        prev = mac;
    }
}

#[test]
fn a_chain_rewritten_with_a_segment_key_is_caught_by_the_token_checkpoint() {
    let format = ChainFormat::Segment { len: 4 };
    let lines = write_log(format, 4, b"audit key");
    let (_, head) = split_line(lines[3].trim_end()).unwrap();
    let checkpoint = Checkpoint {
        log_id: "00ff".into(),
        count: 4,
        head: hex::encode(&head),
        ..Checkpoint::default()
    };
    let check = |lines: &[String]| {
        verify(
            lines.concat().as_bytes(),
            fake_token(b"audit key"),
            Some(&checkpoint),
        )
        .unwrap()
    };
    assert_eq!(check(&lines).problem, None);
    // Whoever holds segment 0's key rewrites entry 2 and re-chains 2 and 3: every MAC
    // verifies, but entry 3 no longer ends where the token's checkpoint says.
    let mut chain = Chain::new("00ff".into(), format);
    let mut token = fake_token(b"audit key");
    let (_, mut prev) = split_line(lines[1].trim_end()).unwrap();
    let mut forged = lines[..2].to_vec();
    for (i, line) in lines.iter().enumerate().skip(2) {
        let (body, _) = split_line(line.trim_end()).unwrap();
        let body = body.replace("entry 2", "entry 2, rewritten");
        let mac = chain
            .mac(i as u64, &prev, body.as_bytes(), &mut token)
            .unwrap();
        forged.push(String::from_utf8(line_with_mac(body.as_bytes(), &mac)).unwrap());
        prev = mac;
    }
    let report = check(&forged);
    assert_eq!(report.verified, 3);
    let p = report.problem.unwrap();
    assert_eq!((p.line, p.kind), (4, ProblemKind::Modified), "{}", p.detail);
}

/// A log of `n` entries whose first entry names `previous`, written with `log_id`.
fn write_named_log(log_id: &str, n: u64, previous: Option<&LogEnd>) -> Vec<String> {
    let header = Header {
        log_id: log_id.into(),
        format: ChainFormat::Segment { len: 4 },
    };
    let mut chain = Chain::new(header.log_id.clone(), header.format);
    let mut token = fake_token(b"audit key");
    let mut prev = vec![0u8; MAC_LEN];
    (0..n)
        .map(|seq| {
            let detail = if seq == 0 {
                start_detail(&header, previous, Some("size"))
            } else {
                format!("entry {seq}")
            };
            let mut e = internal_entry("Test", detail);
            e.seq = seq;
            let body = serde_json::to_vec(&e).unwrap();
            let mac = chain.mac(seq, &prev, &body, &mut token).unwrap();
            prev = mac.clone();
            String::from_utf8(line_with_mac(&body, &mac)).unwrap()
        })
        .collect()
}

fn end_of(log_id: &str, lines: &[String]) -> LogEnd {
    let (_, mac) = split_line(lines.last().unwrap().trim_end()).unwrap();
    LogEnd {
        log_id: log_id.into(),
        count: lines.len() as u64,
        head: hex::encode(mac),
    }
}

#[test]
fn a_first_entry_names_its_predecessor_and_reason_and_they_parse_back() {
    let p = LogEnd {
        log_id: "aa".into(),
        count: 7,
        head: "0b".repeat(32),
    };
    let header = Header {
        log_id: "bb".into(),
        format: ChainFormat::CURRENT,
    };
    let detail = start_detail(&header, Some(&p), Some("disk lost (host 3)"));
    assert_eq!(Header::parse(&detail), Some(header));
    assert_eq!(parse_previous(&detail), Some(p));
    assert_eq!(parse_reason(&detail), Some("disk lost (host 3)"));
    assert_eq!(parse_previous("log_id=bb; chain=x"), None);
}

#[test]
fn reasons_that_could_forge_detail_fields_are_refused() {
    assert!(check_reason("disk lost").is_ok());
    for bad in ["", "x; log_id=evil", "a=b", "line\nbreak", &"x".repeat(201)] {
        assert!(check_reason(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn the_tail_is_verified_from_the_checkpointed_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let lines = write_named_log("c0", 10, None);
    std::fs::write(&path, lines.concat()).unwrap();
    let header = Header::parse(&format!("log_id=c0; chain={SEGMENT_FORMAT}; segment=4")).unwrap();
    let mut mac =
        |d: &[u8]| -> Result<Vec<u8>, AuditError> { Ok(fake_token(b"audit key")(d).unwrap()) };
    let at6 = end_of("c0", &lines[..6]);
    let head = hex::decode(&at6.head).unwrap();
    let end = verify_tail(&path, &header, 5, Some((6, &head)), &mut mac).unwrap();
    assert_eq!(end, end_of("c0", &lines));
    // Another head at 6 (the file is not the one the token checkpointed).
    let other = vec![1u8; MAC_LEN];
    let e = verify_tail(&path, &header, 5, Some((6, &other)), &mut mac).unwrap_err();
    assert!(e.to_string().contains("line 6"), "{e}");
    // An entry after the checkpoint edited.
    let mut edited = lines.clone();
    edited[8] = edited[8].replace("entry 8", "entry 9");
    std::fs::write(&path, edited.concat()).unwrap();
    let e = verify_tail(&path, &header, 5, Some((6, &head)), &mut mac).unwrap_err();
    assert!(e.to_string().contains("line 9"), "{e}");
    // Under another token's key nothing verifies.
    std::fs::write(&path, lines.concat()).unwrap();
    let mut other_token =
        |d: &[u8]| -> Result<Vec<u8>, AuditError> { Ok(fake_token(b"other key")(d).unwrap()) };
    assert!(verify_tail(&path, &header, 0, None, &mut other_token).is_err());
}

#[test]
fn a_history_verifies_end_to_end_and_names_each_gap() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_named_log("a1", 6, None);
    let b = write_named_log("b2", 5, Some(&end_of("a1", &a)));
    let c = write_named_log("c3", 4, Some(&end_of("b2", &b)));
    let current = dir.path().join("audit.log");
    std::fs::write(&current, c.concat()).unwrap();
    std::fs::write(archived_in(dir.path(), "a1"), a.concat()).unwrap();
    std::fs::write(archived_in(dir.path(), "b2"), b.concat()).unwrap();
    let cp = Checkpoint {
        log_id: "c3".into(),
        count: 4,
        head: end_of("c3", &c).head,
        previous: Some(end_of("b2", &b)),
        reason: None,
    };
    let run = |cp: &Checkpoint| {
        verify_history(
            &current,
            dir.path(),
            fake_token(b"audit key"),
            Some(cp),
            true,
        )
        .unwrap()
    };
    let r = run(&cp);
    assert_eq!(r.problem, None, "{r:?}");
    assert_eq!(r.logs.len(), 3);
    assert_eq!(r.verified, 4);

    // Not the token's current log.
    let other = Checkpoint {
        log_id: "d4".into(),
        ..cp.clone()
    };
    assert_eq!(run(&other).problem.unwrap().kind, ProblemKind::NotCurrent);

    // A predecessor cut short.
    std::fs::write(archived_in(dir.path(), "b2"), b[..4].concat()).unwrap();
    let p = run(&cp).problem.unwrap();
    assert_eq!(p.kind, ProblemKind::Gap);
    assert!(
        p.detail.contains("audit-b2.log") && p.detail.contains("names 5 entries"),
        "{p:?}"
    );

    // A predecessor missing.
    std::fs::write(archived_in(dir.path(), "b2"), b.concat()).unwrap();
    std::fs::remove_file(archived_in(dir.path(), "a1")).unwrap();
    let p = run(&cp).problem.unwrap();
    assert_eq!(p.kind, ProblemKind::Gap);
    assert!(
        p.detail.contains("audit-a1.log") && p.detail.contains("missing"),
        "{p:?}"
    );
}
