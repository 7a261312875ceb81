//! Damaged store files: flipped or truncated bytes in sled's files, and records edited
//! through sled, never yield wrong plaintext. An affected read fails with DATA_LOSS, or the
//! service flags the whole store (its rollback check), or it refuses to start with a clean
//! exit and a message that names the store; it never hangs or panics. Secrets the damage
//! did not reach still read (sled checks CRCs per node, so a damaged record's neighbours
//! in the same node may fail with DATA_LOSS too); none is silently missing.
//!
//! Each test prints a table of what every kind of damage came to.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::common::put;
use crate::common::{POLICY, TestEnv, files_under};
use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom::proto::{GetSecretRequest, SealedRecordV1};

/// Longest a start (or a refusal to start) may take.
const START_LIMIT: Duration = Duration::from_secs(30);
/// Longest any one RPC may take.
const RPC_LIMIT: Duration = Duration::from_secs(15);

/// How a start went.
enum Launch {
    /// Listening.
    Up(Running),
    /// Exited before listening, with its exit code and everything it logged.
    Refused { code: Option<i32>, log: String },
}

/// A `strongroomd` this file started itself (a start may fail, which the fixture's
/// `start` treats as a test failure).
struct Running {
    child: Child,
    addr: String,
    log: PathBuf,
    pki: PathBuf,
}

impl Running {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait (bounded); SIGKILL if it does not go.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("strongroomd ignored SIGTERM for 10 s:\n{}", self.log_text());
    }

    async fn client(&self) -> SecretServiceClient<Channel> {
        let pki = |f: &str| std::fs::read(self.pki.join(f)).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pki(
                "server-ca.pem",
            )))
            .domain_name("localhost")
            .identity(tonic::transport::Identity::from_pem(
                pki("payments.pem"),
                pki("payments-key.pem"),
            ));
        let channel = Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(RPC_LIMIT)
            .connect()
            .await
            .expect("connect");
        SecretServiceClient::new(channel)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `strongroomd` with the default configuration as the fixture does, but reports a
/// refusal instead of failing, and fails if it neither listens nor exits in time.
fn launch(env: &TestEnv) -> Launch {
    let config = env.config(POLICY);
    let log = env.dir.path().join(format!(
        "strongroomd-corruption-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_strongroomd"))
        .env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
        .env("STRONGROOM_PKCS11_MODULE", &env.module)
        .env("STRONGROOM_TOKEN", &env.label)
        .env("STRONGROOM_USER_PIN", &env.user_pin)
        .env_remove("STRONGROOM_USER_PIN_FILE")
        .env_remove("STRONGROOM_CONFIG")
        .env("STRONGROOM_LOG", "info")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn strongroomd");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        // Keep the pipe drained for as long as the service runs.
        for _ in lines {}
    });
    match rx.recv_timeout(START_LIMIT) {
        Ok(Some(Ok(line))) if line.starts_with("listening on ") => Launch::Up(Running {
            child,
            addr: line["listening on ".len()..].to_owned(),
            log,
            pki: env.pki.clone(),
        }),
        Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // It closed stdout: it must exit, promptly and by itself.
            let deadline = Instant::now() + START_LIMIT;
            let status = loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break s;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "strongroomd stopped talking but did not exit:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            Launch::Refused {
                code: status.code(),
                log: std::fs::read_to_string(&log).unwrap_or_default(),
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "strongroomd neither listened nor exited within {START_LIMIT:?}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
}

/// A refusal must be a clean exit (1, not a panic or a signal) with a last line that says
/// the store is at fault, names it, and does not send the operator after a lock that no
/// other process holds. Returns what is wrong with it.
fn refusal_problems(code: Option<i32>, log: &str, store: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let last = log.lines().last().unwrap_or_default();
    if code != Some(1) || log.contains("panicked") {
        problems.push(format!(
            "exit {code:?} instead of a clean refusal (exit 1): {}",
            exit_reason(log)
        ));
    }
    if !last.starts_with("strongroomd: store") {
        problems.push(format!(
            "the refusal does not say the store is at fault: {last:?}"
        ));
    }
    if !last.contains(&store.display().to_string()) {
        problems.push(format!(
            "the refusal does not name the store ({}): {last:?}",
            store.display()
        ));
    }
    if last.contains("another strongroomd") {
        problems.push(format!(
            "the refusal blames a lock conflict for damaged files: {last:?}"
        ));
    }
    problems
}

fn record_key(name: &str, version: u64) -> Vec<u8> {
    let mut k = vec![b'r'];
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// A store with `n` secrets (v1 of each, plus a v2 of the first), stopped cleanly; values
/// are about `size` bytes. Returns `(name, version, value)` of each.
async fn populated(env: &TestEnv, n: usize, size: usize) -> Vec<(String, u64, Vec<u8>)> {
    let server = env.start();
    let mut c = server.client("payments").await;
    // Several writes in flight share the fsyncs.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let name = format!("payments/corrupt/{i:03}");
        // Distinct, recognisable values of a few sizes.
        let value = format!("value-{i:03}-{}", "x".repeat(size + i * 37 % 300)).into_bytes();
        let mut c = c.clone();
        set.spawn(async move {
            let v = c.put_secret(put(&name, &value)).await.unwrap().into_inner();
            assert_eq!(v.version, 1, "{name}");
        });
        if set.len() >= 8 {
            set.join_next().await.unwrap().unwrap();
        }
    }
    set.join_all().await;
    let mut written: Vec<(String, u64, Vec<u8>)> = (0..n)
        .map(|i| {
            let name = format!("payments/corrupt/{i:03}");
            let value = format!("value-{i:03}-{}", "x".repeat(size + i * 37 % 300)).into_bytes();
            (name, 1, value)
        })
        .collect();
    let value = b"value-000-second-version".to_vec();
    let name = written[0].0.clone();
    let v = c.put_secret(put(&name, &value)).await.unwrap().into_inner();
    written.push((name, v.version, value));
    server.stop();
    written
}

/// The stored record of `(name, version)`, through sled, read from a copy of the store so
/// that the files under test stay exactly as the service left them (opening a sled store
/// rewrites parts of it).
fn load(store: &Path, name: &str, version: u64) -> SealedRecordV1 {
    let copy = tempfile::tempdir().unwrap();
    for f in files_under(store) {
        let to = copy.path().join(f.strip_prefix(store).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&f, &to).unwrap();
    }
    let db = sled::open(copy.path()).unwrap();
    let raw = db.get(record_key(name, version)).unwrap().expect("record");
    SealedRecordV1::decode(raw.as_ref()).unwrap()
}

/// Offsets of every occurrence of `needle` in `hay`.
fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// What a read of a secret came to.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    Exact,
    Failed(Code),
}

/// Reads `(name, version)`; any value other than `expected` fails the test at once.
async fn read(
    c: &mut SecretServiceClient<Channel>,
    name: &str,
    version: u64,
    expected: &[u8],
) -> Read {
    let r = tokio::time::timeout(
        RPC_LIMIT,
        c.get_secret(GetSecretRequest {
            name: name.into(),
            version,
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("get {name} v{version} hung"));
    match r {
        Ok(r) => {
            let r = r.into_inner();
            assert!(
                r.value == expected && (version == 0 || r.version == version),
                "{name} v{version}: WRONG DATA served: v{} {:?}",
                r.version,
                String::from_utf8_lossy(&r.value)
            );
            Read::Exact
        }
        Err(s) => {
            assert!(
                expected.is_empty()
                    || !s
                        .message()
                        .as_bytes()
                        .windows(expected.len())
                        .any(|w| w == expected),
                "{name}: the error carries the value"
            );
            Read::Failed(s.code())
        }
    }
}

/// Reads many `(name, version, expected)` at once (each checked as [`read`] does).
async fn read_many(
    c: &SecretServiceClient<Channel>,
    wanted: Vec<(String, u64, Vec<u8>)>,
) -> Vec<(String, u64, Read)> {
    let mut set = tokio::task::JoinSet::new();
    let mut out = Vec::with_capacity(wanted.len());
    for (name, version, value) in wanted {
        let mut c = c.clone();
        set.spawn(async move {
            let r = read(&mut c, &name, version, &value).await;
            (name, version, r)
        });
        if set.len() >= 16 {
            out.push(set.join_next().await.unwrap().unwrap());
        }
    }
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    out
}

/// The token, store and audit log of an environment, saved so that each kind of damage
/// starts from the same state (the service records the store's epoch in the token and
/// appends to the audit log on every start).
struct Pristine {
    dir: tempfile::TempDir,
}

impl Pristine {
    const PARTS: [&str; 3] = ["tokens", "store", "audit.log"];

    fn save(env: &TestEnv) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for part in Self::PARTS {
            copy_tree(&env.dir.path().join(part), &dir.path().join(part));
        }
        Self { dir }
    }

    fn restore(&self, env: &TestEnv) {
        for part in Self::PARTS {
            let to = env.dir.path().join(part);
            if to.is_dir() {
                std::fs::remove_dir_all(&to).unwrap();
            } else if to.exists() {
                std::fs::remove_file(&to).unwrap();
            }
            copy_tree(&self.dir.path().join(part), &to);
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for f in files_under(from) {
            let dest = to.join(f.strip_prefix(from).unwrap());
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(&f, &dest).unwrap();
        }
    } else if from.exists() {
        std::fs::copy(from, to).unwrap();
    }
}

/// Opens and closes the store with sled itself, as an offline tool or backup job would:
/// sled then writes a snapshot file (the service, which is stopped by signal, never does).
fn open_offline(store: &Path) {
    drop(sled::open(store).unwrap());
}

/// The line that says why the service exited: its own last word, or the panic.
fn exit_reason(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    if let Some(i) = lines.iter().position(|l| l.contains("panicked at")) {
        let at = lines[i].split("panicked at").nth(1).unwrap_or_default();
        let what = lines.get(i + 1).copied().unwrap_or_default();
        return format!("PANIC at{at} {what}");
    }
    lines.last().copied().unwrap_or_default().to_owned()
}

/// What one kind of damage came to, for the table the tests print.
struct Outcome {
    damage: String,
    result: String,
    /// Broken rules other than wrong data (which fails at once).
    problems: Vec<String>,
}

/// Starts the service on a damaged store and checks the rules that always hold: no wrong
/// data, no hang, no crash; either a clean refusal, or each read is exact or an explicit
/// refusal. `target` (if any) is a record whose every stored copy was damaged: it must not
/// read. Every other secret reads exactly, or fails with DATA_LOSS, or the service flagged
/// the whole store (rollback check); a secret that is simply gone (NOT_FOUND) or "retry
/// later" (UNAVAILABLE) for good would be silent loss.
async fn check_damaged(
    env: &TestEnv,
    damage: &str,
    written: &[(String, u64, Vec<u8>)],
    target: Option<(&str, u64)>,
) -> Outcome {
    match launch(env) {
        Launch::Refused { code, log } => Outcome {
            damage: damage.into(),
            result: format!("exited {code:?}: {}", exit_reason(&log)),
            problems: refusal_problems(code, &log, &env.store),
        },
        Launch::Up(mut running) => {
            let c = running.client().await;
            // Each version, and the latest of each name (the head is read on that path).
            let mut wanted: Vec<(String, u64, Vec<u8>)> = written.to_vec();
            for (name, version, value) in written {
                let newest = written
                    .iter()
                    .filter(|(n, _, _)| n == name)
                    .map(|(_, v, _)| *v)
                    .max()
                    .unwrap();
                if *version == newest {
                    wanted.push((name.clone(), 0, value.clone()));
                }
            }
            let mut tally: std::collections::BTreeMap<String, usize> = Default::default();
            let mut results = Vec::new();
            for (name, version, r) in read_many(&c, wanted).await {
                *tally.entry(format!("{r:?}")).or_default() += 1;
                if version != 0 {
                    results.push((name, version, r));
                }
            }
            let log = running.log_text();
            assert!(
                running.child.try_wait().unwrap().is_none(),
                "{damage}: the service died serving reads:\n{log}"
            );
            // sled 0.34 panics on some damaged pages; such a panic must stay inside the store
            // task (the service keeps serving, asserted above, and the read answers
            // DATA_LOSS, checked below). A panic anywhere else is a bug.
            let foreign_panic = log
                .lines()
                .filter(|l| l.contains("panicked at"))
                .any(|l| !l.contains("/sled-0.34"));
            assert!(!foreign_panic, "{damage}: the service panicked:\n{log}");
            let flagged = log.contains("serving no secrets until officers accept");
            let mut problems = Vec::new();
            for (name, version, r) in &results {
                let hit = target == Some((name.as_str(), *version));
                // sled keeps many records in one node and checks a whole node's CRC, so
                // the damaged record's neighbours may fail with it (DATA_LOSS); a record
                // that is simply gone (NOT_FOUND) without the store being flagged would be
                // silent loss.
                let allowed: &[Read] = match (hit, flagged) {
                    (true, true) => &[
                        Read::Failed(Code::DataLoss),
                        Read::Failed(Code::FailedPrecondition),
                    ],
                    (true, false) => &[Read::Failed(Code::DataLoss)],
                    (false, true) => &[
                        Read::Exact,
                        Read::Failed(Code::DataLoss),
                        Read::Failed(Code::FailedPrecondition),
                    ],
                    (false, false) => &[Read::Exact, Read::Failed(Code::DataLoss)],
                };
                if !allowed.contains(r) {
                    problems.push(format!(
                        "{name} v{version} {} came to {r:?} (rollback check {}); allowed: \
                         {allowed:?}",
                        if hit {
                            "(the damaged record)"
                        } else {
                            "(untouched)"
                        },
                        if flagged {
                            "flagged the store"
                        } else {
                            "silent"
                        },
                    ));
                }
            }
            running.stop();
            Outcome {
                damage: damage.into(),
                result: format!(
                    "started{}; reads: {tally:?}",
                    if flagged {
                        ", rollback check flagged the store"
                    } else {
                        ""
                    }
                ),
                problems,
            }
        }
    }
}

/// Prints what each kind of damage came to, then fails with every broken rule.
fn report(title: &str, outcomes: &[Outcome]) {
    println!("{title}");
    for o in outcomes {
        println!("  {:<62} -> {}", o.damage, o.result);
    }
    let problems: Vec<String> = outcomes
        .iter()
        .flat_map(|o| o.problems.iter().map(move |p| format!("{}: {p}", o.damage)))
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Flips one bit in the middle of `bytes` wherever they occur in the store's `db` file
/// (`newest_only`: only in the last copy). Returns how many copies were hit, of how many.
fn flip_in_db(store: &Path, bytes: &[u8], newest_only: bool) -> (usize, usize) {
    let file = store.join("db");
    let mut raw = std::fs::read(&file).unwrap();
    let hits = find_all(&raw, bytes);
    assert!(!hits.is_empty(), "the bytes are not in {}", file.display());
    let chosen = if newest_only {
        &hits[hits.len() - 1..]
    } else {
        &hits[..]
    };
    for at in chosen {
        raw[at + bytes.len() / 2] ^= 0x01;
    }
    std::fs::write(&file, &raw).unwrap();
    (chosen.len(), hits.len())
}

/// (a) A bit flipped inside a record's ciphertext or wrapped key, in sled's own file: in a
/// small store as the service leaves it, in one an offline tool opened (sled then writes a
/// snapshot), and in a store of several sled segments, with and without a snapshot, in
/// every copy of a record and in single (older or newer) copies of several records.
/// `STRONGROOM_CORRUPTION_SWEEP` sets how many records get single-copy flips (default 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_in_a_stored_record_never_yield_wrong_data() {
    if crate::common::skip_on_etcd("it flips bytes in sled's files") {
        return;
    }
    let mut outcomes = Vec::new();

    let env = TestEnv::new();
    let written = populated(&env, 20, 0).await;
    let pristine = Pristine::save(&env);
    let (target, tv) = (written[7].0.clone(), written[7].1);
    let rec = load(&env.store, &target, tv);
    for (field, bytes) in [
        ("ciphertext", &rec.ciphertext),
        ("wrapped DEK", &rec.wrapped_dek),
    ] {
        for (newest_only, offline) in [(false, false), (true, false), (false, true)] {
            pristine.restore(&env);
            if offline {
                open_offline(&env.store);
            }
            let (n, of) = flip_in_db(&env.store, bytes, newest_only);
            let damage = format!(
                "small store, {target} {field}: 1 bit in {n} of {of} copies{}",
                if offline { ", opened offline" } else { "" }
            );
            let hit = (n == of).then_some((target.as_str(), tv));
            outcomes.push(check_damaged(&env, &damage, &written, hit).await);
        }
    }
    drop(env);

    // About 1 MiB: several of sled's 512 KiB segments, so that a snapshot covers old ones
    // and copies of a record lie in different segments.
    let env = TestEnv::new();
    let written = populated(&env, 300, 3000).await;
    let pristine = Pristine::save(&env);
    let (target, tv) = (written[150].0.clone(), written[150].1);
    let rec = load(&env.store, &target, tv);
    for offline in [true, false] {
        pristine.restore(&env);
        if offline {
            open_offline(&env.store);
        }
        let (n, of) = flip_in_db(&env.store, &rec.ciphertext, false);
        let damage = format!(
            "1 MiB store, {target} ciphertext: 1 bit in {n} of {of} copies{}",
            if offline { ", opened offline" } else { "" }
        );
        outcomes.push(check_damaged(&env, &damage, &written, Some((&target, tv))).await);
    }
    let sweep: usize = std::env::var("STRONGROOM_CORRUPTION_SWEEP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    for k in 0..sweep {
        let idx = (5 + k * 293 / sweep.max(1)) % 300;
        let (name, v) = (written[idx].0.clone(), written[idx].1);
        let rec = load(&pristine.dir.path().join("store"), &name, v);
        for oldest in [true, false] {
            pristine.restore(&env);
            let file = env.store.join("db");
            let mut raw = std::fs::read(&file).unwrap();
            let hits = find_all(&raw, &rec.ciphertext);
            let at = if oldest {
                hits[0]
            } else {
                hits[hits.len() - 1]
            };
            raw[at + rec.ciphertext.len() / 2] ^= 0x01;
            std::fs::write(&file, &raw).unwrap();
            let damage = format!(
                "1 MiB store, {name} ciphertext: 1 bit in copy {} of {} (offset {at})",
                if oldest { 1 } else { hits.len() },
                hits.len()
            );
            let hit = (hits.len() == 1).then_some((name.as_str(), v));
            outcomes.push(check_damaged(&env, &damage, &written, hit).await);
        }
    }
    report("flipped bits in sled's db file:", &outcomes);
}

/// (b) sled's files cut short at several points.
#[tokio::test]
async fn truncated_store_files_never_yield_wrong_data_or_hang() {
    if crate::common::skip_on_etcd("it truncates sled's files") {
        return;
    }
    let env = TestEnv::new();
    let written = populated(&env, 20, 0).await;
    let pristine = Pristine::save(&env);
    let mut outcomes = Vec::new();
    for offline in [false, true] {
        pristine.restore(&env);
        if offline {
            open_offline(&env.store);
        }
        let files: Vec<PathBuf> = files_under(&env.store);
        // Where the data ends: sled pads `db` to whole segments with zeroes.
        for file in files {
            let raw = std::fs::read(&file).unwrap();
            let data_len = raw.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            let stem = file.file_name().unwrap().to_string_lossy().into_owned();
            let points: Vec<usize> = if stem == "db" {
                vec![
                    0,
                    data_len / 4,
                    data_len / 2,
                    data_len * 3 / 4,
                    data_len - 1,
                ]
            } else {
                vec![0, raw.len() / 2, raw.len() - 1]
            };
            for at in points {
                pristine.restore(&env);
                if offline {
                    open_offline(&env.store);
                }
                // The snapshot's name depends on its contents, which are the same each time.
                assert!(file.exists(), "{} is gone after restore", file.display());
                let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
                f.set_len(at as u64).unwrap();
                drop(f);
                let damage = format!(
                    "{}{stem} cut to {at} of {} bytes (data {data_len})",
                    if offline {
                        "offline-opened store, "
                    } else {
                        ""
                    },
                    raw.len()
                );
                outcomes.push(check_damaged(&env, &damage, &written, None).await);
            }
        }
    }
    report("truncated sled files:", &outcomes);
}

/// (c) Records edited through sled, one field at a time: each read fails closed with
/// DATA_LOSS (FAILED_PRECONDITION for a master key the token does not hold) and names
/// nothing of the value; the untouched secrets still read; the service stays up.
#[tokio::test]
async fn records_edited_through_sled_fail_closed() {
    if crate::common::skip_on_etcd("it edits records through sled") {
        return;
    }
    type Edit = fn(&mut SealedRecordV1);
    let edits: Vec<(&str, Edit, Code)> = vec![
        (
            "ciphertext: one bit flipped",
            |r| r.ciphertext[0] ^= 0x01,
            Code::DataLoss,
        ),
        (
            "ciphertext: tag bit flipped",
            |r| {
                let last = r.ciphertext.len() - 1;
                r.ciphertext[last] ^= 0x80;
            },
            Code::DataLoss,
        ),
        (
            "ciphertext: one byte short",
            |r| {
                r.ciphertext.pop();
            },
            Code::DataLoss,
        ),
        (
            "ciphertext: shorter than a tag",
            |r| r.ciphertext.truncate(5),
            Code::DataLoss,
        ),
        (
            "ciphertext: empty",
            |r| r.ciphertext.clear(),
            Code::DataLoss,
        ),
        (
            "ciphertext: one byte longer",
            |r| r.ciphertext.push(0),
            Code::DataLoss,
        ),
        (
            "nonce: one bit flipped",
            |r| r.nonce[0] ^= 0x01,
            Code::DataLoss,
        ),
        (
            "nonce: 11 bytes",
            |r| {
                r.nonce.pop();
            },
            Code::DataLoss,
        ),
        (
            "nonce: 16 bytes",
            |r| r.nonce.extend_from_slice(&[0; 4]),
            Code::DataLoss,
        ),
        ("nonce: empty", |r| r.nonce.clear(), Code::DataLoss),
        (
            "wrapped DEK: one bit flipped (IV)",
            |r| r.wrapped_dek[0] ^= 0x01,
            Code::DataLoss,
        ),
        (
            "wrapped DEK: one bit flipped (key)",
            |r| r.wrapped_dek[20] ^= 0x01,
            Code::DataLoss,
        ),
        (
            "wrapped DEK: one bit flipped (tag)",
            |r| {
                let last = r.wrapped_dek.len() - 1;
                r.wrapped_dek[last] ^= 0x01;
            },
            Code::DataLoss,
        ),
        (
            "wrapped DEK: one byte short",
            |r| {
                r.wrapped_dek.pop();
            },
            Code::DataLoss,
        ),
        (
            "wrapped DEK: IV only",
            |r| r.wrapped_dek.truncate(12),
            Code::DataLoss,
        ),
        (
            "wrapped DEK: empty",
            |r| r.wrapped_dek.clear(),
            Code::DataLoss,
        ),
        (
            "wrapped DEK: zeroes",
            |r| r.wrapped_dek.iter_mut().for_each(|b| *b = 0),
            Code::DataLoss,
        ),
        ("mechanism: 0", |r| r.mechanism = 0, Code::DataLoss),
        ("mechanism: 2", |r| r.mechanism = 2, Code::DataLoss),
        (
            "mechanism: u32::MAX",
            |r| r.mechanism = u32::MAX,
            Code::DataLoss,
        ),
        (
            "master key version: 0",
            |r| r.master_key_version = 0,
            Code::FailedPrecondition,
        ),
        (
            "master key version: 2 (not in the token)",
            |r| r.master_key_version = 2,
            Code::FailedPrecondition,
        ),
        (
            "master key version: u32::MAX",
            |r| r.master_key_version = u32::MAX,
            Code::FailedPrecondition,
        ),
    ];

    let env = TestEnv::new();
    // Secret 000 has two versions; the edits go to 001.., which have one each.
    let written = populated(&env, edits.len() + 4, 0).await;
    let (edited, rest) = written[1..].split_at(edits.len());
    let (garbled, untouched) = rest.split_first().unwrap();
    let (bad_head, untouched) = untouched.split_first().unwrap();
    {
        let db = sled::open(&env.store).unwrap();
        for ((_, edit, _), (name, version, _)) in edits.iter().zip(edited) {
            let key = record_key(name, *version);
            let mut r = SealedRecordV1::decode(db.get(&key).unwrap().unwrap().as_ref()).unwrap();
            edit(&mut r);
            db.insert(key, r.encode_to_vec()).unwrap();
        }
        // Bytes that are not a record at all, and a head that is not a head.
        let (name, version, _) = garbled;
        db.insert(
            record_key(name, *version),
            b"\xff\xff\xff not protobuf".to_vec(),
        )
        .unwrap();
        let (name, _, _) = bad_head;
        let mut head = vec![b'h'];
        head.extend_from_slice(name.as_bytes());
        db.insert(head, b"\xff\xff\xff".to_vec()).unwrap();
        db.flush().unwrap();
    }

    let mut running = env.start_admin();
    // Records changed outside the service: the store's state commitment flags the whole
    // store first. Officers accept it; each edited record must still fail closed.
    crate::common::accept_store_state(&running, "does not match its commitment").await;
    let mut c = running.client("payments").await;
    let mut problems = Vec::new();
    let mut table = Vec::new();
    let mut check = |what: String, got: Read, want: Code, table: &mut Vec<String>| {
        table.push(format!("  {what:<48} -> {got:?}"));
        if got != Read::Failed(want) {
            problems.push(format!("{what}: {got:?}, expected {want:?}"));
        }
    };
    for ((what, _, want), (name, version, value)) in edits.iter().zip(edited) {
        let got = read(&mut c, name, *version, value).await;
        check(what.to_string(), got, *want, &mut table);
        // The latest-version path reads the same record.
        let got = read(&mut c, name, 0, value).await;
        check(format!("{what} (latest)"), got, *want, &mut table);
    }
    let (name, version, value) = garbled;
    let got = read(&mut c, name, *version, value).await;
    check(
        "record: not protobuf".into(),
        got,
        Code::DataLoss,
        &mut table,
    );
    let (name, _, value) = bad_head;
    let got = read(&mut c, name, 0, value).await;
    check(
        "head: not protobuf (latest)".into(),
        got,
        Code::DataLoss,
        &mut table,
    );
    // The rest is untouched and reads exactly.
    for (name, version, value) in untouched.iter().chain(&written[..1]) {
        assert_eq!(
            read(&mut c, name, *version, value).await,
            Read::Exact,
            "{name}"
        );
    }
    let log = running.log_text();
    assert!(!log.contains("panicked"), "the service panicked:\n{log}");
    assert!(
        running.child.try_wait().unwrap().is_none(),
        "the service died:\n{log}"
    );
    // Still serving writes and reads.
    c.put_secret(put("payments/corrupt/after", b"still-serving"))
        .await
        .unwrap();
    assert_eq!(
        read(&mut c, "payments/corrupt/after", 0, b"still-serving").await,
        Read::Exact
    );
    running.stop();
    println!("records edited through sled:\n{}", table.join("\n"));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
