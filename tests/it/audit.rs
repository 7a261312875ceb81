//! The audit trail against a real token and a real `strongroomd`: every request leaves an
//! HMAC-chained entry before its response, `strongroom-admin audit verify` names each kind of
//! tampering at the right line, writes that cannot be made refuse the request (fail closed),
//! no secret value reaches the log, and the chain survives restarts.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use cryptoki::types::AuthPin;
use serde_json::Value;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::common::{OPS, PAYMENTS, POLICY, READER, STRANGER, Server, TestEnv, contains};
use crate::common::{get_at as get, put};
use strongroom::audit::{Checkpoint, Entry, split_line};
use strongroom::hsm::{self, TokenSelector, keys};
use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom::proto::{DeleteSecretRequest, DescribeSecretRequest, ListSecretsRequest};

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The lines of a log, without their newlines.
fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// One line as the entry it claims to be (its MAC unchecked).
fn parse(line: &str) -> Entry {
    let (body, _) = split_line(line).unwrap_or_else(|| panic!("no mac in {line}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn entries(path: &Path) -> Vec<Entry> {
    read_lines(path).iter().map(|l| parse(l)).collect()
}

/// What a request handler reported, as the log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    identity: Option<String>,
    operation: String,
    name: Option<String>,
    version: Option<u64>,
    decision: String,
    status: String,
}

fn seen(e: &Entry) -> Seen {
    Seen {
        identity: e.identity.clone(),
        operation: e.operation.clone(),
        name: e.name.clone(),
        version: e.version,
        decision: e.decision.clone(),
        status: e.status.clone(),
    }
}

fn want(
    identity: &str,
    operation: &str,
    name: &str,
    version: Option<u64>,
    decision: &str,
    status: &str,
) -> Seen {
    Seen {
        identity: Some(identity.into()),
        operation: operation.into(),
        name: Some(name.into()),
        version,
        decision: decision.into(),
        status: status.into(),
    }
}

/// Records `w` as expected and checks it is already in the file, as the newest client
/// entry and one more than before: the entry is written before the response leaves. (A
/// write's intent, written before its commit, is not the request's entry; a write's entry
/// must follow its intent.)
fn logged(log: &Path, expected: &mut Vec<Seen>, w: Seen) {
    let all = entries(log);
    let client: Vec<Entry> = all
        .iter()
        .filter(|e| e.plane == "client" && e.phase.as_deref() != Some("intent"))
        .cloned()
        .collect();
    if let Some(last) = client.last()
        && last.phase.as_deref() == Some("outcome")
    {
        assert!(
            all.iter().any(|e| e.phase.as_deref() == Some("intent")
                && e.change == last.change
                && e.seq < last.seq),
            "a write's entry without an intent before it: {last:?}"
        );
    }
    assert_eq!(
        client.len(),
        expected.len() + 1,
        "the log does not hold one entry per answered request; expected {w:?}"
    );
    assert_eq!(
        seen(client.last().unwrap()),
        w,
        "the newest entry is not the request just answered"
    );
    expected.push(w);
}

/// Sends SIGTERM and waits; panics if the process does not exit in time.
fn terminate_child(child: &mut Child) -> ExitStatus {
    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success(), "kill -TERM {pid}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "strongroomd did not exit within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A graceful stop that must succeed (it writes the final checkpoint).
fn terminate(mut server: Server) {
    let status = terminate_child(&mut server.child);
    assert!(
        status.success(),
        "strongroomd exited with {status} after SIGTERM:\n{}",
        server.log_text()
    );
}

/// What `audit verify --format json` said.
#[derive(Debug)]
struct Verdict {
    code: i32,
    verified: u64,
    /// `(kind, line, expected_seq)` of the problem, if any.
    problem: Option<(String, u64, u64)>,
    raw: String,
}

fn verify(env: &TestEnv, path: &Path) -> Verdict {
    let out = env.admin(&["audit", "verify", path_str(path), "--format", "json"]);
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "audit verify --format json printed no JSON ({e})\nstdout: {}\nstderr: {}",
            out.stdout, out.stderr
        )
    });
    let problem = match &v["problem"] {
        Value::Null => None,
        p => Some((
            p["kind"].as_str().expect("kind").to_owned(),
            p["line"].as_u64().expect("line"),
            p["expected_seq"].as_u64().expect("expected_seq"),
        )),
    };
    Verdict {
        code: out.code,
        verified: v["verified"].as_u64().expect("verified"),
        problem,
        raw: format!("{}{}", out.stdout, out.stderr),
    }
}

fn assert_clean(env: &TestEnv, path: &Path) -> usize {
    let n = read_lines(path).len();
    let v = verify(env, path);
    assert_eq!(v.code, 0, "{v:?}");
    assert_eq!(v.problem, None, "{v:?}");
    assert_eq!(v.verified, n as u64, "every line verifies: {v:?}");
    n
}

/// The token's audit checkpoint, read in this process.
fn token_checkpoint(env: &TestEnv) -> Option<Checkpoint> {
    let pkcs11 = hsm::load_module(&env.module).unwrap();
    let slot = hsm::find_token(&pkcs11, &TokenSelector::Label(env.label.clone())).unwrap();
    let session = pkcs11.open_ro_session(slot).unwrap();
    hsm::login(&session, &AuthPin::new(env.user_pin.clone().into())).unwrap();
    keys::read_checkpoint(&session)
        .unwrap()
        .map(|v| serde_json::from_slice(&v).unwrap())
}

/// A log written by a real service: requests of four identities, allowed and denied, then a
/// SIGTERM stop. Returns its lines, after checking that it verifies as written.
async fn good_log(env: &TestEnv) -> Vec<String> {
    let server = env.start();
    let mut pay = server.client("payments").await;
    let mut stranger = server.client("stranger").await;
    let mut reader = server.client("reader").await;
    for i in 0..6 {
        let name = format!("payments/db/k{i}");
        pay.put_secret(put(&name, format!("value {i}").as_bytes()))
            .await
            .unwrap();
        let e = stranger.get_secret(get(&name, 0)).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        reader.get_secret(get(&name, 0)).await.unwrap();
    }
    let e = stranger
        .put_secret(put("payments/db/k0", b"forged"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    terminate(server);
    let lines = read_lines(&env.audit_log());
    assert!(lines.len() >= 20, "{} lines", lines.len());
    assert_clean(env, &env.audit_log());
    lines
}

/// Writes `lines` to a copy next to the log and verifies the copy.
fn verify_copy(env: &TestEnv, name: &str, lines: &[String]) -> Verdict {
    let copy = env.dir.path().join(name);
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&copy, text).unwrap();
    verify(env, &copy)
}

/// The verdict must be exit 2 with a problem of `kind` at 1-based `line`.
fn assert_found(v: &Verdict, kind: &str, line: usize) {
    assert_eq!(v.code, 2, "tampering must fail verification: {v:?}");
    let Some((k, l, seq)) = &v.problem else {
        panic!("no problem reported: {v:?}");
    };
    assert_eq!((k.as_str(), *l), (kind, line as u64), "{}", v.raw);
    // Everything before the problem line verified, and the chain expected the entry whose
    // seq is its position.
    assert_eq!(*seq, line as u64 - 1, "{}", v.raw);
    assert_eq!(v.verified, line as u64 - 1, "{}", v.raw);
}

/// The index of a line near the middle that satisfies `pred`, with room on both sides.
fn middle_line(lines: &[String], pred: impl Fn(&Entry) -> bool) -> usize {
    let mid = lines.len() / 2;
    (0..lines.len())
        .filter(|&i| i >= 3 && i + 3 < lines.len())
        .filter(|&i| pred(&parse(&lines[i])))
        .min_by_key(|&i| i.abs_diff(mid))
        .expect("a suitable middle line")
}

/// Replaces `from` by `to` once in `line`; the text must change.
fn edit(line: &str, from: &str, to: &str) -> String {
    assert!(line.contains(from), "{from} not in {line}");
    line.replacen(from, to, 1)
}

/// A `strongroomd` spawned through `sh` with SIGXFSZ ignored (the disposition survives
/// `exec`), so a file-size limit set with `prlimit` makes its writes fail with EFBIG
/// instead of killing it. `addr` is `None` if it did not start.
struct Daemon {
    child: Child,
    addr: Option<String>,
    log: PathBuf,
    copier: Option<std::thread::JoinHandle<std::io::Result<u64>>>,
}

impl Daemon {
    /// Its stderr so far.
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for it to exit; its exit status and all of its stderr.
    fn exit(&mut self) -> (ExitStatus, String) {
        let status = self.child.wait().unwrap();
        if let Some(copier) = self.copier.take() {
            let _ = copier.join();
        }
        (status, self.log_text())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_daemon(env: &TestEnv, config: &Path) -> Daemon {
    let log = env.dir.path().join(format!(
        "strongroomd-audit-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"trap '' XFSZ; exec "$0" --config "$1""#)
        .arg(env!("CARGO_BIN_EXE_strongroomd"))
        .arg(config)
        .env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
        .env("STRONGROOM_PKCS11_MODULE", &env.module)
        .env("STRONGROOM_TOKEN", &env.label)
        .env("STRONGROOM_USER_PIN", &env.user_pin)
        .env("STRONGROOM_LOG", "info")
        .env_remove("STRONGROOM_USER_PIN_FILE")
        .env_remove("STRONGROOM_CONFIG")
        .env_remove("STRONGROOM_AUDIT_PATH")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // A pipe, not a file: a lowered file-size limit must fail only the audit log's
        // writes (tracing-subscriber panics the writing task when stderr cannot be written).
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strongroomd");
    let mut stderr = child.stderr.take().unwrap();
    let mut copy = std::fs::File::create(&log).unwrap();
    let copier = Some(std::thread::spawn(move || {
        std::io::copy(&mut stderr, &mut copy)
    }));
    let stdout = child.stdout.take().unwrap();
    let addr = match BufReader::new(stdout).lines().next() {
        Some(Ok(line)) => line.strip_prefix("listening on ").map(str::to_owned),
        _ => None,
    };
    Daemon {
        child,
        addr,
        log,
        copier,
    }
}

/// A mutual-TLS channel to `addr` as the client `stem`.
async fn channel(env: &TestEnv, addr: &str, stem: &str) -> Channel {
    let read = |f: &str| std::fs::read(env.pki.join(f)).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(
            "server-ca.pem",
        )))
        .identity(tonic::transport::Identity::from_pem(
            read(&format!("{stem}.pem")),
            read(&format!("{stem}-key.pem")),
        ))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap()
}

async fn secret_health(health: &mut HealthClient<Channel>) -> ServingStatus {
    let r = health
        .check(HealthCheckRequest {
            service: "strongroom.v1.SecretService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

/// Sets the soft file-size limit of a running process (`None`: unlimited).
fn limit_file_size(pid: u32, bytes: Option<u64>) {
    let limit = bytes.map_or_else(|| "unlimited".to_owned(), |b| b.to_string());
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--fsize={limit}:"))
        .output()
        .expect("run prlimit (util-linux)");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_clean_log_records_every_request_before_answering_and_verifies() {
    let env = TestEnv::new();
    let server = env.start();
    let log = env.audit_log();
    let mut expected = Vec::new();
    let mut pay = server.client("payments").await;
    let mut stranger = server.client("stranger").await;
    let mut reader = server.client("reader").await;
    let mut ops = server.client("ops").await;
    let name = "payments/db/password";

    let r = pay
        .put_secret(put(name, b"first"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, 1);
    let w = want(PAYMENTS, "PutSecret", name, Some(1), "allow", "Ok");
    logged(&log, &mut expected, w);

    let r = pay.get_secret(get(name, 0)).await.unwrap().into_inner();
    assert_eq!(r.value, b"first");
    let w = want(PAYMENTS, "GetSecret", name, Some(1), "allow", "Ok");
    logged(&log, &mut expected, w);

    pay.put_secret(put(name, b"second")).await.unwrap();
    let w = want(PAYMENTS, "PutSecret", name, Some(2), "allow", "Ok");
    logged(&log, &mut expected, w);

    let r = pay.get_secret(get(name, 1)).await.unwrap().into_inner();
    assert_eq!(r.value, b"first");
    let w = want(PAYMENTS, "GetSecret", name, Some(1), "allow", "Ok");
    logged(&log, &mut expected, w);

    let e = pay
        .get_secret(get("payments/missing", 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let w = want(
        PAYMENTS,
        "GetSecret",
        "payments/missing",
        None,
        "deny",
        "NotFound",
    );
    logged(&log, &mut expected, w);

    // A stranger reading a payments name: NOT_FOUND, recorded as a denial.
    let e = stranger.get_secret(get(name, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let w = want(STRANGER, "GetSecret", name, None, "deny", "NotFound");
    logged(&log, &mut expected, w);

    let e = stranger.put_secret(put(name, b"forged")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let w = want(
        STRANGER,
        "PutSecret",
        name,
        None,
        "deny",
        "PermissionDenied",
    );
    logged(&log, &mut expected, w);

    let e = stranger
        .delete_secret(DeleteSecretRequest { name: name.into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let w = want(
        STRANGER,
        "DeleteSecret",
        name,
        None,
        "deny",
        "PermissionDenied",
    );
    logged(&log, &mut expected, w);

    let r = reader.get_secret(get(name, 0)).await.unwrap().into_inner();
    assert_eq!((r.version, r.value.as_slice()), (2, &b"second"[..]));
    let w = want(READER, "GetSecret", name, Some(2), "allow", "Ok");
    logged(&log, &mut expected, w);

    ops.list_secrets(ListSecretsRequest {
        prefix: String::new(),
        page_size: 0,
        page_token: String::new(),
        ..Default::default()
    })
    .await
    .unwrap();
    let w = want(OPS, "ListSecrets", "", None, "allow", "Ok");
    logged(&log, &mut expected, w);

    pay.describe_secret(DescribeSecretRequest { name: name.into() })
        .await
        .unwrap();
    let w = want(PAYMENTS, "DescribeSecret", name, None, "allow", "Ok");
    logged(&log, &mut expected, w);

    let e = pay
        .put_secret(put("payments//bad", b"x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let w = want(
        PAYMENTS,
        "PutSecret",
        "payments//bad",
        None,
        "deny",
        "InvalidArgument",
    );
    logged(&log, &mut expected, w);

    terminate(server);

    // The table form and the JSON form agree: every line verifies.
    let lines = read_lines(&log);
    let n = lines.len();
    let out = env.admin(&["audit", "verify", path_str(&log)]);
    out.assert_ok();
    assert!(
        out.stdout.contains(&format!("ok: {n} entries verified")),
        "{}",
        out.stdout
    );
    assert_clean(&env, &log);

    // Every line is a JSON object with the fields of an entry and its MAC.
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap();
        for field in [
            "seq",
            "ts_ms",
            "plane",
            "operation",
            "decision",
            "status",
            "request_id",
            "mac",
        ] {
            assert!(v.get(field).is_some(), "{field} missing in {line}");
        }
        assert_eq!(v["mac"].as_str().unwrap().len(), 64, "{line}");
    }

    let all = entries(&log);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.seq, i as u64, "seq numbers follow the lines");
    }
    let first = &all[0];
    assert_eq!(
        (first.plane.as_str(), first.operation.as_str()),
        ("audit", "AuditLogStarted")
    );
    let header = first
        .detail
        .as_deref()
        .and_then(strongroom::audit::Header::parse)
        .expect("the first entry names the log and its chain format");
    assert_eq!(header.log_id.len(), 32, "{header:?}");
    assert_eq!(header.format, strongroom::audit::ChainFormat::CURRENT);
    assert!(all.iter().any(|e| e.operation == "Checkpoint"));
    // The final checkpoint, written at SIGTERM, counts every line, itself included.
    let last = all.last().unwrap();
    assert_eq!(
        (last.plane.as_str(), last.operation.as_str()),
        ("audit", "Checkpoint"),
        "the last entry after a SIGTERM stop is the final checkpoint"
    );
    assert!(
        last.detail
            .as_deref()
            .unwrap()
            .ends_with(&format!("count={n}")),
        "{last:?}"
    );
    // And the token holds the same log, count and chain head.
    let cp = token_checkpoint(&env).expect("a checkpoint in the token");
    assert_eq!(
        (cp.log_id.as_str(), cp.count),
        (header.log_id.as_str(), n as u64)
    );
    let (_, last_mac) = split_line(lines.last().unwrap()).unwrap();
    assert_eq!(cp.head, hex::encode(last_mac));
    // Exactly one client entry per request (a write's intent aside), in order, with a
    // distinct request id.
    let client: Vec<&Entry> = all
        .iter()
        .filter(|e| e.plane == "client" && e.phase.as_deref() != Some("intent"))
        .collect();
    assert_eq!(client.iter().map(|e| seen(e)).collect::<Vec<_>>(), expected);
    let mut ids: Vec<u64> = client.iter().map(|e| e.request_id).collect();
    assert!(ids.iter().all(|&id| id > 0), "{ids:?}");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), client.len(), "request ids are distinct");
    // Nothing else but the log's own entries and the first start's seeding of the
    // configuration file's rules.
    assert!(
        all.iter().all(|e| e.plane == "client"
            || e.plane == "audit"
            || (e.plane == "admin" && e.operation == "SeedPolicies")),
        "{all:?}"
    );
}

#[tokio::test]
async fn a_modified_entry_is_found_at_its_line() {
    let env = TestEnv::new();
    let lines = good_log(&env).await;

    // Who asked: a payments request made to look like the reader's.
    let k = middle_line(&lines, |e| e.identity.as_deref() == Some(PAYMENTS));
    let mut copy = lines.clone();
    copy[k] = edit(
        &copy[k],
        &format!("\"identity\":\"{PAYMENTS}\""),
        &format!("\"identity\":\"{READER}\""),
    );
    let v = verify_copy(&env, "modified-identity.log", &copy);
    assert_found(&v, "modified", k + 1);

    // The outcome: a denial made to look allowed.
    let k = middle_line(&lines, |e| e.status == "NotFound");
    let mut copy = lines.clone();
    copy[k] = edit(&copy[k], "\"status\":\"NotFound\"", "\"status\":\"Ok\"");
    copy[k] = edit(&copy[k], "\"decision\":\"deny\"", "\"decision\":\"allow\"");
    let v = verify_copy(&env, "modified-status.log", &copy);
    assert_found(&v, "modified", k + 1);

    // The table form names the line and the kind, and exits 2 too.
    let path = env.dir.path().join("modified-status.log");
    let out = env.admin(&["audit", "verify", path_str(&path)]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains(&format!("FAILED at line {} (Modified)", k + 1)),
        "{}",
        out.stdout
    );

    // A whitespace-only change is a modification as well: the MAC covers the bytes.
    let k = middle_line(&lines, |_| true);
    let mut copy = lines.clone();
    copy[k] = edit(&copy[k], "\"plane\":", "\"plane\": ");
    let v = verify_copy(&env, "modified-space.log", &copy);
    assert_found(&v, "modified", k + 1);
}

#[tokio::test]
async fn a_removed_entry_is_found_where_the_gap_is() {
    let env = TestEnv::new();
    let lines = good_log(&env).await;

    let k = middle_line(&lines, |_| true);
    let mut copy = lines.clone();
    copy.remove(k);
    let v = verify_copy(&env, "removed-one.log", &copy);
    assert_found(&v, "removed", k + 1);

    // Several consecutive entries: the same line, where the gap starts.
    let mut copy = lines.clone();
    copy.drain(k..k + 3);
    let v = verify_copy(&env, "removed-three.log", &copy);
    assert_found(&v, "removed", k + 1);

    // The very first entry (the log's start).
    let mut copy = lines.clone();
    copy.remove(0);
    let v = verify_copy(&env, "removed-first.log", &copy);
    assert_found(&v, "removed", 1);
}

#[tokio::test]
async fn a_log_past_its_first_segment_verifies_and_an_edit_there_is_found() {
    // More than one segment key (4096 entries each), all derived by the real token, in the
    // writer and again in `audit verify`.
    let env = TestEnv::new();
    let server = env.start();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut c = server.client("payments").await;
        tasks.push(tokio::spawn(async move {
            for i in 0..540 {
                let e = c
                    .get_secret(get(&format!("payments/absent/{t}/{i}"), 0))
                    .await
                    .unwrap_err();
                assert_eq!(e.code(), Code::NotFound);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    terminate(server);
    let log = env.audit_log();
    let n = assert_clean(&env, &log);
    assert!(
        n > 4096 + 100,
        "{n} entries: the log must reach its second segment"
    );

    // An entry of the second segment, edited: found at its line.
    let lines = read_lines(&log);
    let k = (4096 + 50..lines.len())
        .find(|&i| lines[i].contains("payments/absent/"))
        .unwrap();
    let mut copy = lines.clone();
    copy[k] = edit(&copy[k], "payments/absent/", "payments/absent-x/");
    let v = verify_copy(&env, "second-segment-edited.log", &copy);
    assert_found(&v, "modified", k + 1);
}

#[tokio::test]
async fn entries_moved_earlier_are_reported_as_reordered() {
    let env = TestEnv::new();
    let lines = good_log(&env).await;
    let k = middle_line(&lines, |_| true);

    // Two adjacent entries swap places.
    let mut copy = lines.clone();
    copy.swap(k, k + 1);
    let v = verify_copy(&env, "reordered-adjacent.log", &copy);
    assert_found(&v, "reordered", k + 1);

    // An entry moved two places earlier.
    let mut copy = lines.clone();
    let moved = copy.remove(k + 2);
    copy.insert(k, moved);
    let v = verify_copy(&env, "reordered-earlier.log", &copy);
    assert_found(&v, "reordered", k + 1);
}

#[tokio::test]
async fn non_adjacent_swaps_and_later_moves_are_reported_as_reordered() {
    let env = TestEnv::new();
    let lines = good_log(&env).await;
    let k = middle_line(&lines, |_| true);

    // Two entries one apart swap places.
    let mut copy = lines.clone();
    copy.swap(k, k + 2);
    let v = verify_copy(&env, "reordered-swap.log", &copy);
    assert_found(&v, "reordered", k + 1);

    // An entry moved two places later: the gap it leaves is where the order breaks.
    let mut copy = lines.clone();
    let moved = copy.remove(k);
    copy.insert(k + 2, moved);
    let v = verify_copy(&env, "reordered-later.log", &copy);
    assert_found(&v, "reordered", k + 1);
}

#[tokio::test]
async fn an_inserted_entry_is_found_at_its_line() {
    let env = TestEnv::new();
    let lines = good_log(&env).await;
    let k = middle_line(&lines, |_| true);

    // A genuine entry from later in the log, renumbered to fit in at line k + 1.
    let donor = lines.len() - 3;
    let donor_seq = parse(&lines[donor]).seq;
    let forged = edit(
        &lines[donor],
        &format!("{{\"seq\":{donor_seq},"),
        &format!("{{\"seq\":{k},"),
    );
    assert_eq!(parse(&forged).seq, k as u64);
    let mut copy = lines.clone();
    copy.insert(k, forged);
    let v = verify_copy(&env, "inserted-copy.log", &copy);
    assert_found(&v, "inserted", k + 1);

    // A made-up entry with a random MAC: a stranger allowed to read a payments secret.
    let made_up = Entry {
        seq: k as u64,
        ts_ms: parse(&lines[k]).ts_ms,
        plane: "client".into(),
        identity: Some(STRANGER.into()),
        operation: "GetSecret".into(),
        name: Some("payments/db/k0".into()),
        name_len: None,
        name_sha256: None,
        name_truncated: None,
        version: Some(1),
        decision: "allow".into(),
        status: "Ok".into(),
        request_id: 4242,
        detail: None,
        phase: None,
        change: None,
        outcome: None,
        fingerprint: None,
    };
    let mut mac = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut mac).unwrap();
    let body = serde_json::to_string(&made_up).unwrap();
    let line = format!(
        "{},\"mac\":\"{}\"}}",
        body.strip_suffix('}').unwrap(),
        hex::encode(mac)
    );
    assert_eq!(parse(&line), made_up);
    let mut copy = lines.clone();
    copy.insert(k, line);
    let v = verify_copy(&env, "inserted-made-up.log", &copy);
    assert_found(&v, "inserted", k + 1);

    // A replay: an earlier entry, unchanged, repeated after the entry that follows it.
    let mut copy = lines.clone();
    copy.insert(k + 1, lines[k - 1].clone());
    let v = verify_copy(&env, "inserted-replay.log", &copy);
    assert_found(&v, "inserted", k + 2);
}

/// Puts the first `keep` lines in place of the log and starts the service on it: it must
/// refuse, naming the log and the rollback, and leave the file as it is.
fn assert_refuses_rolled_back_log(env: &TestEnv, lines: &[String], keep: usize) {
    let mut text = lines[..keep].join("\n");
    text.push('\n');
    std::fs::write(env.audit_log(), text).unwrap();
    let mut d = spawn_daemon(env, &env.config(POLICY));
    assert_eq!(d.addr, None, "strongroomd started on a truncated log");
    let (status, msg) = d.exit();
    assert!(!status.success(), "{msg}");
    assert!(
        msg.contains("truncated or rolled back") && msg.contains(path_str(&env.audit_log())),
        "{msg}"
    );
    // The evidence is left as it was.
    assert_eq!(read_lines(&env.audit_log()).len(), keep);
}

/// Even the first checkpoint of a log counts two entries (its start and the checkpoint
/// itself): a log cut to its first line is behind any checkpoint the token holds.
#[tokio::test]
async fn a_log_cut_before_the_token_checkpoint_is_truncated_and_not_reopened() {
    let env = TestEnv::new();
    let lines = good_log(&env).await;
    let cp = token_checkpoint(&env).expect("a checkpoint in the token");
    assert_eq!(cp.log_id.len(), 32);
    assert!(cp.count >= 2, "{cp:?}");
    let v = verify_copy(&env, "truncated-first.log", &lines[..1]);
    assert_found(&v, "truncated", 2);
    let out = env.admin(&[
        "audit",
        "verify",
        path_str(&env.dir.path().join("truncated-first.log")),
    ]);
    assert_eq!(out.code, 2);
    assert!(
        out.stdout.contains("FAILED at line 2 (Truncated)"),
        "{}",
        out.stdout
    );
    assert_refuses_rolled_back_log(&env, &lines, 1);
}

#[tokio::test]
async fn a_truncated_tail_is_found_against_the_token_checkpoint() {
    let env = TestEnv::new();
    let lines = good_log(&env).await;
    let n = lines.len();
    let cp = token_checkpoint(&env).expect("a checkpoint in the token");
    assert_eq!(cp.count, n as u64, "the SIGTERM stop recorded every entry");

    // Keep the first third: every kept line verifies, but the token counted more.
    let keep = n / 3;
    let v = verify_copy(&env, "truncated-third.log", &lines[..keep]);
    assert_found(&v, "truncated", keep + 1);

    // Only the last few entries (the final checkpoint among them) cut off.
    let keep = n - 3;
    let v = verify_copy(&env, "truncated-tail.log", &lines[..keep]);
    assert_found(&v, "truncated", keep + 1);

    // Just the final checkpoint line.
    let v = verify_copy(&env, "truncated-last.log", &lines[..n - 1]);
    assert_found(&v, "truncated", n);

    // And the service will not append to a rolled-back log: it refuses to start.
    assert_refuses_rolled_back_log(&env, &lines, n / 3);
}

/// Checkpoints reach the token while the service runs (every `checkpoint_every` entries and
/// every `checkpoint_interval_secs`) and at a SIGTERM stop, and recording them keeps health
/// SERVING.
#[tokio::test]
async fn the_token_checkpoint_follows_the_log() {
    let env = TestEnv::new();
    let log = env.audit_log();
    let config = env.config(&format!(
        "{POLICY}\n[audit]\ncheckpoint_every = 5\ncheckpoint_interval_secs = 1\n"
    ));
    let server = env.start_with(&config, &[]);
    let mut c = server.client("payments").await;
    for i in 0..12 {
        c.put_secret(put(&format!("payments/cp/{i}"), b"v"))
            .await
            .unwrap();
    }
    // Let the interval checkpoint run: recording it keeps health SERVING.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ch = server
        .channel(&server.addr, Some("payments"))
        .await
        .unwrap();
    let mut health = HealthClient::new(ch);
    assert_eq!(
        secret_health(&mut health).await,
        ServingStatus::Serving,
        "{}",
        server.log_text()
    );
    assert!(
        !server.log_text().contains("checkpoint failed"),
        "{}",
        server.log_text()
    );
    // An idle service adds nothing to its log once its checkpoint is recorded.
    let lines = read_lines(&log);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(read_lines(&log), lines, "an idle service kept appending");
    // The token holds the newest checkpoint entry of the file.
    let last_cp = lines
        .iter()
        .rposition(|l| parse(l).operation == "Checkpoint")
        .unwrap();
    assert!(last_cp > 1, "no checkpoint after the log's start");
    let cp = token_checkpoint(&env).expect("a checkpoint in the token");
    assert_eq!(cp.count, last_cp as u64 + 1, "{cp:?}");
    let (_, mac) = split_line(&lines[last_cp]).unwrap();
    assert_eq!(cp.head, hex::encode(mac));
    drop((c, health));

    // The SIGTERM stop records the whole log, chain head included.
    terminate(server);
    let lines = read_lines(&log);
    let cp = token_checkpoint(&env).unwrap();
    assert_eq!(cp.count, lines.len() as u64);
    let (_, mac) = split_line(lines.last().unwrap()).unwrap();
    assert_eq!(cp.head, hex::encode(mac));
    assert_eq!(
        Some(cp.log_id),
        parse(&lines[0])
            .detail
            .as_deref()
            .and_then(strongroom::audit::Header::parse)
            .map(|h| h.log_id)
    );
}

#[tokio::test]
async fn an_unwritable_audit_log_keeps_the_service_from_starting() {
    // A secret is stored first, with a working log.
    let env = TestEnv::new();
    let server = env.start();
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/canary", b"CANARY-audit-devfull"))
        .await
        .unwrap();
    drop(c);
    terminate(server);

    // The same store and token, the log on a device where every write fails. The token
    // tracks the log just written, which /dev/full is not: the service refuses at once.
    let config = env.config(&format!("{POLICY}\n[audit]\npath = \"/dev/full\"\n"));
    let mut d = spawn_daemon(&env, &config);
    assert_eq!(d.addr, None, "strongroomd listened without its log");
    let (status, msg) = d.exit();
    assert_eq!(status.code(), Some(1), "{msg}");
    assert!(msg.contains("/dev/full is missing or empty"), "{msg}");
    // An officer declares a new log (offline): now writing its first entry fails, so the
    // service never listens and the secret stays unread.
    env.admin(&["audit", "new-log", "--reason", "moved to a new device"])
        .assert_ok();
    let mut d = spawn_daemon(&env, &config);
    assert_eq!(
        d.addr, None,
        "strongroomd listened with /dev/full as its audit log"
    );
    let (status, msg) = d.exit();
    assert_eq!(status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("cannot write the audit log /dev/full"),
        "the refusal names the audit log: {msg}"
    );
    assert!(!msg.contains("CANARY-audit-devfull"));

    // The same through STRONGROOM_AUDIT_PATH, with the file configuration untouched.
    let out = Command::new(env!("CARGO_BIN_EXE_strongroomd"))
        .arg("--config")
        .arg(env.config(POLICY))
        .env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
        .env("STRONGROOM_PKCS11_MODULE", &env.module)
        .env("STRONGROOM_TOKEN", &env.label)
        .env("STRONGROOM_USER_PIN", &env.user_pin)
        .env("STRONGROOM_AUDIT_PATH", "/dev/full")
        .env_remove("STRONGROOM_USER_PIN_FILE")
        .env_remove("STRONGROOM_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "it must not listen");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot write the audit log /dev/full"),
        "{stderr}"
    );
}

/// A running service whose audit writes start failing (the file-size limit of the process
/// is lowered to the log's current size, so the next append fails with EFBIG).
#[tokio::test]
async fn audit_write_failures_refuse_requests_and_turn_health_not_serving() {
    let env = TestEnv::new();
    let log = env.audit_log();
    // No periodic checkpoint during the test: only requests write to the log.
    let config = env.config(&format!(
        "{POLICY}\n[audit]\ncheckpoint_interval_secs = 3600\n"
    ));
    let d = spawn_daemon(&env, &config);
    let addr = d
        .addr
        .clone()
        .unwrap_or_else(|| panic!("strongroomd did not start:\n{}", d.log_text()));
    let pid = d.child.id();
    let ch = channel(&env, &addr, "payments").await;
    let mut c = SecretServiceClient::new(ch.clone());
    let mut health = HealthClient::new(ch);
    let canary = b"CANARY-audit-failclosed-7d1f";
    c.put_secret(put("payments/canary", canary)).await.unwrap();
    assert_eq!(secret_health(&mut health).await, ServingStatus::Serving);

    // Writes fail: a stored secret is not served, and nothing of it leaves.
    let size = std::fs::metadata(&log).unwrap().len();
    limit_file_size(pid, Some(size));
    let e = c
        .get_secret(get("payments/canary", 0))
        .await
        .expect_err("a read was answered although its audit entry could not be written");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("audit log"), "{}", e.message());
    assert!(!contains(e.message().as_bytes(), canary));
    assert!(!contains(e.details(), canary));
    assert!(!contains(format!("{:?}", e.metadata()).as_bytes(), canary));
    assert_eq!(
        secret_health(&mut health).await,
        ServingStatus::NotServing,
        "health must say NOT_SERVING while the audit log cannot be written"
    );
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ServingStatus::try_from(overall.status).unwrap(),
        ServingStatus::NotServing
    );
    // No half-written entry was left behind.
    assert_eq!(std::fs::metadata(&log).unwrap().len(), size);

    // The log becomes writable again: requests are served and health recovers.
    limit_file_size(pid, None);
    let got = c
        .get_secret(get("payments/canary", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, canary);
    let deadline = Instant::now() + Duration::from_secs(10);
    while secret_health(&mut health).await != ServingStatus::Serving {
        assert!(
            Instant::now() < deadline,
            "health never became SERVING again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // And fails again: a write cannot be acknowledged.
    let size = std::fs::metadata(&log).unwrap().len();
    limit_file_size(pid, Some(size));
    let e = c
        .put_secret(put("payments/new", b"never acknowledged"))
        .await
        .expect_err("a write was acknowledged although its audit entry could not be written");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("audit log"), "{}", e.message());
    assert_eq!(secret_health(&mut health).await, ServingStatus::NotServing);
    assert_eq!(std::fs::metadata(&log).unwrap().len(), size);

    // The refusals did not break the chain: after a graceful stop the whole log verifies,
    // and holds exactly the requests that were answered.
    limit_file_size(pid, None);
    drop((c, health));
    let mut d = d;
    let status = terminate_child(&mut d.child);
    assert!(status.success(), "{status}\n{}", d.log_text());
    assert_clean(&env, &log);
    // The requests' entries (a write's intent is not one).
    let client: Vec<Seen> = entries(&log)
        .iter()
        .filter(|e| e.plane == "client" && e.phase.as_deref() != Some("intent"))
        .map(seen)
        .collect();
    assert_eq!(
        client,
        vec![
            want(
                PAYMENTS,
                "PutSecret",
                "payments/canary",
                Some(1),
                "allow",
                "Ok"
            ),
            want(
                PAYMENTS,
                "GetSecret",
                "payments/canary",
                Some(1),
                "allow",
                "Ok"
            ),
        ]
    );
}

#[tokio::test]
async fn no_secret_value_reaches_the_audit_log() {
    let env = TestEnv::new();
    let server = env.start();
    let mut pay = server.client("payments").await;
    let mut stranger = server.client("stranger").await;
    let canary = b"CANARY-audit-5b0e9c1a-value";
    let other = b"CANARY-audit-5b0e9c1a-denied";

    pay.put_secret(put("payments/canary", canary))
        .await
        .unwrap();
    let got = pay
        .get_secret(get("payments/canary", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, canary);
    pay.describe_secret(DescribeSecretRequest {
        name: "payments/canary".into(),
    })
    .await
    .unwrap();
    // Values in refused writes are not recorded either.
    let e = stranger
        .put_secret(put("payments/canary", other))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = pay.put_secret(put("payments//x", other)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let process_log = server.log_text();
    terminate(server);

    let log = std::fs::read(env.audit_log()).unwrap();
    let text = String::from_utf8(log.clone()).unwrap();
    assert!(
        text.contains("payments/canary"),
        "the requests were audited"
    );
    let b64 = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    for value in [&canary[..], &other[..]] {
        let mut forms = vec![
            value.to_vec(),
            hex::encode(value).into_bytes(),
            hex::encode_upper(value).into_bytes(),
        ];
        forms.extend(b64.iter().map(|e| e.encode(value).into_bytes()));
        // The value as a JSON array of byte numbers (a serialised Vec<u8>).
        forms.push(
            serde_json::to_vec(value)
                .unwrap()
                .strip_prefix(b"[")
                .unwrap()
                .to_vec(),
        );
        for form in &forms {
            assert!(
                !contains(&log, form),
                "{} found in the audit log",
                String::from_utf8_lossy(form)
            );
            assert!(
                !contains(process_log.as_bytes(), form),
                "{} found in the process log",
                String::from_utf8_lossy(form)
            );
        }
    }
    assert_clean(&env, &env.audit_log());
}

#[tokio::test]
async fn the_chain_continues_across_sigterm_and_sigkill_restarts() {
    let env = TestEnv::new();
    let log = env.audit_log();

    async fn round(server: &Server, tag: &str) {
        let mut c = server.client("payments").await;
        let name = format!("payments/{tag}");
        c.put_secret(put(&name, tag.as_bytes())).await.unwrap();
        let got = c.get_secret(get(&name, 0)).await.unwrap().into_inner();
        assert_eq!(got.value, tag.as_bytes());
    }

    // Run 1, stopped gracefully.
    let server = env.start();
    round(&server, "run1").await;
    terminate(server);
    let after_run1 = assert_clean(&env, &log);

    // Run 2 continues the same log; SIGKILL: no final checkpoint.
    let mut server = env.start();
    round(&server, "run2").await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);
    let after_run2 = assert_clean(&env, &log);
    assert_eq!(
        after_run2,
        after_run1 + 3,
        "three entries (the write's intent and outcome, the read's), no checkpoint"
    );
    let cp = token_checkpoint(&env).unwrap();
    assert_eq!(
        cp.count, after_run1 as u64,
        "the token still has run 1's count"
    );

    // Run 3 picks up after the killed run.
    let server = env.start();
    round(&server, "run3").await;
    terminate(server);
    let n = assert_clean(&env, &log);

    let all = entries(&log);
    assert_eq!(all.len(), n);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.seq, i as u64);
    }
    let started: Vec<&Entry> = all
        .iter()
        .filter(|e| e.operation == "AuditLogStarted")
        .collect();
    assert_eq!(started.len(), 1, "one log, continued: {started:?}");
    let log_id = started[0]
        .detail
        .as_deref()
        .and_then(strongroom::audit::Header::parse)
        .unwrap()
        .log_id;
    for e in all.iter().filter(|e| e.operation == "Checkpoint") {
        assert!(
            e.detail
                .as_deref()
                .unwrap()
                .starts_with(&format!("log_id={log_id};")),
            "{e:?}"
        );
    }
    let names: Vec<&str> = all
        .iter()
        .filter(|e| e.plane == "client" && e.phase.as_deref() != Some("intent"))
        .map(|e| e.name.as_deref().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "payments/run1",
            "payments/run1",
            "payments/run2",
            "payments/run2",
            "payments/run3",
            "payments/run3"
        ]
    );
    // Run 3's first entry directly follows run 2's last.
    assert_eq!(all[after_run2].name.as_deref(), Some("payments/run3"));
    // Each graceful stop ended with a checkpoint entry; the killed run did not.
    assert_eq!(all[after_run1 - 1].operation, "Checkpoint");
    assert_eq!(all[after_run2 - 1].operation, "GetSecret");
    assert_eq!(all[n - 1].operation, "Checkpoint");
    let cp = token_checkpoint(&env).unwrap();
    assert_eq!((cp.log_id, cp.count), (log_id, n as u64));
}

#[tokio::test]
async fn tail_and_search_show_the_entries_asked_for() {
    let env = TestEnv::new();
    let server = env.start();
    let mut pay = server.client("payments").await;
    let mut stranger = server.client("stranger").await;
    pay.put_secret(put("payments/db/a", b"a")).await.unwrap();
    pay.put_secret(put("payments/db/b", b"b")).await.unwrap();
    pay.get_secret(get("payments/db/a", 0)).await.unwrap();
    for _ in 0..2 {
        let e = stranger
            .get_secret(get("payments/db/a", 0))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    let e = stranger
        .put_secret(put("payments/db/b", b"x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    terminate(server);

    let log = env.audit_log();
    let file = path_str(&log);
    let all = entries(&log);
    let json_entries = |out: &crate::common::Output| -> Vec<Entry> {
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        out.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };

    // tail: the last three entries, in order.
    let out = env.admin(&["audit", "tail", file, "-n", "3"]);
    out.assert_ok();
    let seqs: Vec<&str> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    let n = all.len();
    let last3: Vec<String> = (n - 3..n).map(|s| s.to_string()).collect();
    assert_eq!(seqs, last3, "{}", out.stdout);
    let out = env.admin(&["audit", "tail", file, "-n", "3", "--format", "json"]);
    assert_eq!(json_entries(&out), all[n - 3..]);
    // More than there are: all of them.
    let out = env.admin(&["audit", "tail", file, "-n", "1000", "--format", "json"]);
    assert_eq!(json_entries(&out), all);

    // search --identity: only the stranger's three requests.
    let out = env.admin(&["audit", "search", file, "--identity", STRANGER]);
    out.assert_ok();
    assert_eq!(out.stdout.lines().count(), 3, "{}", out.stdout);
    assert!(
        out.stdout.lines().all(|l| l.contains(STRANGER)),
        "{}",
        out.stdout
    );
    let out = env.admin(&[
        "audit",
        "search",
        file,
        "--identity",
        STRANGER,
        "--format",
        "json",
    ]);
    let found = json_entries(&out);
    let expect: Vec<Entry> = all
        .iter()
        .filter(|e| e.identity.as_deref() == Some(STRANGER))
        .cloned()
        .collect();
    assert_eq!(found, expect);
    assert_eq!(found.len(), 3);

    // search --name: every request for that name, whoever asked; none for another name.
    let out = env.admin(&[
        "audit",
        "search",
        file,
        "--name",
        "payments/db/a",
        "--format",
        "json",
    ]);
    let found = json_entries(&out);
    assert_eq!(
        found.len(),
        5,
        "put (its intent and its outcome), get, and two denied reads: {found:?}"
    );
    assert!(
        found
            .iter()
            .all(|e| e.name.as_deref() == Some("payments/db/a"))
    );
    // Both filters at once.
    let out = env.admin(&[
        "audit",
        "search",
        file,
        "--name",
        "payments/db/b",
        "--identity",
        STRANGER,
        "--format",
        "json",
    ]);
    let found = json_entries(&out);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].operation.as_str(), found[0].status.as_str()),
        ("PutSecret", "PermissionDenied")
    );
    // An identity that made no request, and a name nobody asked for.
    let out = env.admin(&["audit", "search", file, "--identity", READER]);
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "");
    let out = env.admin(&["audit", "search", file, "--name", "payments/db"]);
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "");

    // --since: from the epoch everything, from the far future nothing.
    let out = env.admin(&["audit", "search", file, "--since", "0", "--format", "json"]);
    assert_eq!(json_entries(&out), all);
    let out = env.admin(&["audit", "search", file, "--since", "4102444800"]);
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "");
}
