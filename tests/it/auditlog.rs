//! Which audit log is current, against a real token and a real `strongroomd`: the token's
//! checkpoint names the current log, and a start refuses a log swapped for an archived one,
//! for another token's, an emptied or deleted one (each refusal names what is wrong);
//! rotation keeps every entry across archived logs whose history `audit verify` follows end
//! to end, also when the process is killed at each step of a rotation; `audit new-log`
//! (offline) and `audit rotate` (online, dual control) start a new log naming its
//! predecessor.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cryptoki::types::AuthPin;
use serde_json::Value;

use crate::common::{ADMIN, Output, POLICY, Server, TestEnv, put};
use strongroom::audit::{Checkpoint, Entry, Header, LogEnd, parse_previous, split_line};
use strongroom::hsm::{self, TokenSelector, keys};

/// A service configuration that rotates its log after `bytes` bytes.
fn rotating(env: &TestEnv, bytes: u64) -> PathBuf {
    env.config(&format!("{POLICY}\n[audit]\nrotate_bytes = {bytes}\n"))
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .map(str::to_owned)
        .collect()
}

fn entry(line: &str) -> Entry {
    let (body, _) = split_line(line).expect("a line with a MAC");
    serde_json::from_str(&body).expect("an entry")
}

/// The id of the log in `path` (from its first entry).
fn log_id(path: &Path) -> String {
    let first = entry(&lines(path)[0]);
    Header::parse(first.detail.as_deref().unwrap())
        .unwrap()
        .log_id
}

/// Where the log in `path` ends.
fn end_of(path: &Path) -> LogEnd {
    let l = lines(path);
    let (_, mac) = split_line(l.last().unwrap()).unwrap();
    LogEnd {
        log_id: log_id(path),
        count: l.len() as u64,
        head: hex::encode(mac),
    }
}

/// The archived logs next to the current one.
fn archives(env: &TestEnv) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("audit-") && name.ends_with(".log")
        })
        .collect();
    found.sort();
    found
}

/// Every entry of the current log and its archives.
fn all_entries(env: &TestEnv) -> Vec<Entry> {
    let mut files = archives(env);
    if env.audit_log().exists() {
        files.push(env.audit_log());
    }
    files
        .iter()
        .flat_map(|f| lines(f).into_iter().map(|l| entry(&l)))
        .collect()
}

/// The token's audit checkpoint.
fn token_checkpoint(env: &TestEnv) -> Checkpoint {
    let pkcs11 = hsm::load_module(&env.module).unwrap();
    let slot = hsm::find_token(&pkcs11, &TokenSelector::Label(env.label.clone())).unwrap();
    let session = pkcs11.open_ro_session(slot).unwrap();
    hsm::login(&session, &AuthPin::new(env.user_pin.clone().into())).unwrap();
    let v = keys::read_checkpoint(&session)
        .unwrap()
        .expect("a checkpoint");
    serde_json::from_slice(&v).unwrap()
}

/// `audit verify --format json` of `path`: exit code and report.
fn verify(env: &TestEnv, path: &Path) -> (i32, Value) {
    let out = env.admin(&[
        "audit",
        "verify",
        path.to_str().unwrap(),
        "--format",
        "json",
    ]);
    let v = serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no JSON from audit verify ({e}): {}\n{}",
            out.stdout, out.stderr
        )
    });
    (out.code, v)
}

fn problem_kind(v: &Value) -> &str {
    v["problem"]["kind"].as_str().unwrap_or("none")
}

/// Puts `n` secrets named `prefix/i`; their names.
async fn put_many(server: &Server, prefix: &str, n: usize) -> Vec<String> {
    let mut c = server.client("payments").await;
    let mut names = Vec::new();
    for i in 0..n {
        let name = format!("payments/{prefix}/{i}");
        c.put_secret(put(&name, b"v")).await.unwrap();
        names.push(name);
    }
    names
}

/// Each name has an allowed PutSecret entry somewhere in the history.
fn assert_all_audited(env: &TestEnv, names: &[String]) {
    let entries = all_entries(env);
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| {
            !entries
                .iter()
                .any(|e| e.operation == "PutSecret" && e.decision == "allow" && e.is_about(n))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes with no entry: {missing:?}"
    );
}

/// A service that rotated at least once; stopped. The current log's id and an archive.
async fn rotated_history(env: &TestEnv) -> (String, PathBuf) {
    let server = env.start_with(&rotating(env, 4096), &[]);
    let names = put_many(&server, "r", 40).await;
    server.stop();
    let found = archives(env);
    assert!(found.len() >= 2, "no rotation: {found:?}");
    assert_all_audited(env, &names);
    let (code, v) = verify(env, &env.audit_log());
    assert_eq!(code, 0, "{v}");
    (log_id(&env.audit_log()), found[0].clone())
}

// ---------------------------------------------------------------------------------------

/// Rotation by size: every acknowledged write is in the history, each log is archived
/// under its own id and never overwritten, each new log names where its predecessor
/// ended, and `audit verify` follows the whole history.
#[tokio::test]
async fn rotation_by_size_keeps_every_entry_and_the_history_verifies() {
    let env = TestEnv::new();
    let server = env.start_with(&rotating(&env, 4096), &[]);
    let names = put_many(&server, "size", 60).await;
    server.stop();
    let found = archives(&env);
    assert!(found.len() >= 3, "{found:?}");
    assert_all_audited(&env, &names);
    for a in &found {
        // Named by the id of the log it holds, which ends in its seal.
        let id = log_id(a);
        assert!(a.ends_with(format!("audit-{id}.log")), "{}", a.display());
        let last = entry(lines(a).last().unwrap());
        assert_eq!(last.operation, "AuditLogRotated", "{}", a.display());
    }
    // The current log names its predecessor exactly as that archive ends, and so on back.
    let mut path = env.audit_log();
    let mut walked = 0;
    while let Some(p) = parse_previous(entry(&lines(&path)[0]).detail.as_deref().unwrap()) {
        let archived = env.dir.path().join(format!("audit-{}.log", p.log_id));
        assert_eq!(end_of(&archived), p);
        path = archived;
        walked += 1;
    }
    assert_eq!(walked, found.len());
    let cp = token_checkpoint(&env);
    assert_eq!(cp.log_id, log_id(&env.audit_log()));
    let (code, v) = verify(&env, &env.audit_log());
    assert_eq!((code, problem_kind(&v)), (0, "none"), "{v}");
    assert_eq!(v["logs"].as_array().unwrap().len(), found.len() + 1, "{v}");

    // A gap in the history is named: an archive cut short, then one removed.
    let middle = &found[found.len() / 2];
    let kept = std::fs::read(middle).unwrap();
    let l = lines(middle);
    std::fs::write(middle, format!("{}\n", l[..l.len() - 1].join("\n"))).unwrap();
    let (code, v) = verify(&env, &env.audit_log());
    assert_eq!((code, problem_kind(&v)), (2, "gap"), "{v}");
    let detail = v["problem"]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&log_id(middle)) && detail.contains("entries"),
        "{detail}"
    );
    std::fs::remove_file(middle).unwrap();
    let (code, v) = verify(&env, &env.audit_log());
    assert_eq!((code, problem_kind(&v)), (2, "gap"), "{v}");
    assert!(
        v["problem"]["detail"]
            .as_str()
            .unwrap()
            .contains("is missing"),
        "{v}"
    );
    std::fs::write(middle, kept).unwrap();
    assert_eq!(verify(&env, &env.audit_log()).0, 0);
}

/// The current log swapped for a prefix of an archived log of the same token: the start is
/// refused naming both logs, `verify` fails, and nothing is overwritten.
#[tokio::test]
async fn a_log_swapped_for_a_prefix_of_an_archived_log_is_refused() {
    let env = TestEnv::new();
    let (current, archived) = rotated_history(&env).await;
    let old = log_id(&archived);
    let l = lines(&archived);
    let prefix = format!("{}\n", l[..l.len() / 2].join("\n"));
    std::fs::write(env.audit_log(), &prefix).unwrap();
    let (code, msg) = env.refused_start(&rotating(&env, 4096), &[]);
    assert_eq!(code, Some(1), "{msg}");
    assert!(
        msg.contains(&format!(
            "is log {old}, but the token's current log is {current}"
        )) && msg.contains("swapped or replaced")
            && msg.contains("audit new-log"),
        "{msg}"
    );
    assert_eq!(std::fs::read_to_string(env.audit_log()).unwrap(), prefix);
    assert_eq!(lines(&archived), l, "the archive is untouched");
    assert_eq!(token_checkpoint(&env).log_id, current);
    let (code, v) = verify(&env, &env.audit_log());
    assert_eq!((code, problem_kind(&v)), (2, "not_current"), "{v}");
}

/// The current log swapped for a whole log of another token (a valid chain, under another
/// audit key): refused at start, and by `verify`.
#[tokio::test]
async fn a_log_of_another_token_is_refused() {
    let env = TestEnv::new();
    let server = env.start();
    put_many(&server, "mine", 3).await;
    server.stop();
    let mine = log_id(&env.audit_log());
    // (From here on, this process's SoftHSM2 configuration points at the other token.)
    let other = TestEnv::new();
    let server = other.start();
    put_many(&server, "theirs", 3).await;
    server.stop();
    std::fs::copy(other.audit_log(), env.audit_log()).unwrap();
    let (code, msg) = env.refused_start(&env.config(POLICY), &[]);
    assert_eq!(code, Some(1), "{msg}");
    let theirs = log_id(&other.audit_log());
    assert!(
        msg.contains(&format!("is log {theirs}, but the token's current log is"))
            && msg.contains(env.audit_log().to_str().unwrap()),
        "{msg}"
    );
    let (code, v) = verify(&env, &env.audit_log());
    assert_eq!((code, problem_kind(&v)), (2, "not_current"), "{v}");

    // Even given the other log's id, the chain does not verify under this token's key: a
    // start re-verifies from the checkpointed entry, it does not count lines.
    let forged: Vec<String> = lines(&other.audit_log())
        .into_iter()
        .map(|l| l.replace(&theirs, &mine))
        .collect();
    let mut text = forged.join("\n");
    text.push('\n');
    std::fs::write(env.audit_log(), text).unwrap();
    let (code, msg) = env.refused_start(&env.config(POLICY), &[]);
    assert_eq!(code, Some(1), "{msg}");
    assert!(
        msg.contains("does not reach the token's checkpointed head through valid links")
            || msg.contains("truncated or rolled back"),
        "{msg}"
    );
}

/// An emptied or deleted log is refused (no new log starts silently); `audit new-log` with
/// the PIN, the service down, records a new log in the token, and the next start begins it,
/// naming its predecessor as the token last recorded it. `verify` names the lost log as a
/// gap until it is found again.
#[tokio::test]
async fn an_empty_or_deleted_log_is_refused_until_an_officer_declares_a_new_log() {
    let env = TestEnv::new();
    let server = env.start();
    put_many(&server, "before", 4).await;
    server.stop();
    let before = token_checkpoint(&env);
    let saved = std::fs::read(env.audit_log()).unwrap();
    let config = env.config(POLICY);

    std::fs::write(env.audit_log(), b"").unwrap();
    let (code, msg) = env.refused_start(&config, &[]);
    assert_eq!(code, Some(1), "{msg}");
    let want = format!(
        "is missing or empty, but the token's checkpoint records log {} with {} entries",
        before.log_id, before.count
    );
    assert!(
        msg.contains(&want) && msg.contains("audit new-log"),
        "{msg}"
    );
    std::fs::remove_file(env.audit_log()).unwrap();
    let (code, msg) = env.refused_start(&config, &[]);
    assert_eq!(code, Some(1), "{msg}");
    assert!(msg.contains(&want), "{msg}");
    assert!(!env.audit_log().exists(), "a refused start created a log");
    assert_eq!(token_checkpoint(&env), before);

    // The officer's way out, offline.
    let bad = env.admin(&["audit", "new-log", "--reason", "x; log_id=forged"]);
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    env.admin(&["audit", "new-log", "--reason", "disk lost"])
        .assert_ok();
    let declared = token_checkpoint(&env);
    assert_eq!(declared.count, 0);
    assert_ne!(declared.log_id, before.log_id);
    let again = env.admin(&["audit", "new-log", "--reason", "disk lost"]);
    assert_eq!(again.code, 2, "declared twice: {}", again.stdout);

    let server = env.start();
    let names = put_many(&server, "after", 2).await;
    server.stop();
    assert_eq!(log_id(&env.audit_log()), declared.log_id);
    let first = entry(&lines(&env.audit_log())[0]);
    let detail = first.detail.unwrap();
    assert_eq!(
        parse_previous(&detail),
        Some(LogEnd {
            log_id: before.log_id.clone(),
            count: before.count,
            head: before.head.clone(),
        })
    );
    assert!(detail.ends_with("reason=disk lost"), "{detail}");
    assert_all_audited(&env, &names);
    assert_eq!(token_checkpoint(&env).log_id, declared.log_id);

    // The lost log is a gap in the history until it is put back as its archive.
    let (code, v) = verify(&env, &env.audit_log());
    assert_eq!((code, problem_kind(&v)), (2, "gap"), "{v}");
    assert!(
        v["problem"]["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("audit-{}.log", before.log_id)),
        "{v}"
    );
    std::fs::write(
        env.dir.path().join(format!("audit-{}.log", before.log_id)),
        saved,
    )
    .unwrap();
    let (code, v) = verify(&env, &env.audit_log());
    assert_eq!((code, problem_kind(&v)), (0, "none"), "{v}");
}

/// Waits until the server's log says it reached the test fault point.
fn wait_for_fault_point(server: &Server) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if server.log_text().contains("test fault point reached") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A rotation killed with SIGKILL at each of its steps (a test fault point holds the writer
/// there): the next start finishes or abandons it, every acknowledged write is in the
/// history, the token names the current log, and the history verifies.
#[tokio::test]
async fn a_rotation_killed_at_each_step_recovers_with_nothing_lost() {
    for point in [
        "rotate-after-seal",
        "rotate-after-token",
        "rotate-after-archive",
        "rotate-after-first-entry",
    ] {
        let env = TestEnv::new();
        let config = rotating(&env, 3000);
        let mut server = env.start_with(
            &config,
            &[("STRONGROOM_DANGEROUS_TEST_AUDIT_PAUSE_AT", point)],
        );
        let mut acked = Vec::new();
        let mut c = server.client("payments").await;
        for i in 0.. {
            let name = format!("payments/kill/{i}");
            let mut c2 = c.clone();
            let req = put(&name, b"v");
            let call = tokio::spawn(async move { c2.put_secret(req).await });
            // Whichever comes first: the answer, or the writer stopping at the point.
            let reached = loop {
                if call.is_finished() {
                    break false;
                }
                if server.log_text().contains("test fault point reached") {
                    break true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            if reached {
                call.abort();
                break;
            }
            call.await.unwrap().unwrap();
            acked.push(name);
            assert!(i < 200, "{point}: no rotation after 200 writes");
        }
        assert!(wait_for_fault_point(&server), "{point}");
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        drop(c);
        // The state the kill left, as the rotation's steps say.
        let cp = token_checkpoint(&env);
        match point {
            "rotate-after-seal" => {
                assert_eq!(cp.log_id, log_id(&env.audit_log()));
                let last = entry(lines(&env.audit_log()).last().unwrap());
                assert_eq!(last.operation, "AuditLogRotated");
            }
            "rotate-after-token" => {
                assert_eq!(cp.count, 0);
                assert_eq!(cp.previous.unwrap(), end_of(&env.audit_log()));
            }
            "rotate-after-archive" => {
                assert_eq!(cp.count, 0);
                assert!(!env.audit_log().exists());
            }
            _ => {
                assert_eq!(cp.count, 0);
                assert_eq!(cp.log_id, log_id(&env.audit_log()));
            }
        }

        let server = env.start_with(&config, &[]);
        c = server.client("payments").await;
        c.put_secret(put("payments/kill/after", b"v"))
            .await
            .unwrap();
        acked.push("payments/kill/after".into());
        drop(c);
        server.stop();
        assert_all_audited(&env, &acked);
        let cp = token_checkpoint(&env);
        assert_eq!(cp.log_id, log_id(&env.audit_log()), "{point}");
        assert!(!archives(&env).is_empty(), "{point}");
        let (code, v) = verify(&env, &env.audit_log());
        assert_eq!((code, problem_kind(&v)), (0, "none"), "{point}: {v}");
    }
}

/// `audit rotate` on the admin plane needs a second officer; once approved, the log is
/// archived and the new one names it; the history verifies.
#[tokio::test]
async fn an_officer_rotation_needs_approval_and_starts_a_log_naming_its_predecessor() {
    let env = TestEnv::new();
    let server = env.start_with(&env.config(&format!("{ADMIN}\n{POLICY}")), &[]);
    let names = put_many(&server, "online", 3).await;
    let before = log_id(&env.audit_log());
    let alice = Output::of(env.admin_cli(&server, "alice").args([
        "audit",
        "rotate",
        "--reason",
        "quarterly",
        "--format",
        "json",
    ]));
    alice.assert_ok();
    let j: Value = serde_json::from_str(alice.stdout.trim()).unwrap();
    assert_eq!(j["executed"], false, "one officer rotated the log");
    assert!(archives(&env).is_empty());
    let id = j["approval"]["id"].as_str().unwrap().to_owned();
    let bob = Output::of(env.admin_cli(&server, "bob").args(["approve", &id]));
    bob.assert_ok();
    assert!(bob.stdout.starts_with("executed"), "{}", bob.stdout);
    let archived = env.dir.path().join(format!("audit-{before}.log"));
    assert!(
        bob.stdout.contains(archived.to_str().unwrap()),
        "{}",
        bob.stdout
    );
    let after = log_id(&env.audit_log());
    assert_ne!(after, before);
    let named = parse_previous(
        entry(&lines(&env.audit_log())[0])
            .detail
            .as_deref()
            .unwrap(),
    );
    assert_eq!(named, Some(end_of(&archived)));
    server.stop();
    assert_all_audited(&env, &names);
    assert_eq!(token_checkpoint(&env).log_id, after);
    let (code, v) = verify(&env, &env.audit_log());
    assert_eq!((code, problem_kind(&v)), (0, "none"), "{v}");
    // An archived log verified on its own is not the current one, unless said so.
    let (code, v) = verify(&env, &archived);
    assert_eq!((code, problem_kind(&v)), (2, "not_current"), "{v}");
    let ok = env.admin(&["audit", "verify", archived.to_str().unwrap(), "--archived"]);
    ok.assert_ok();
}
