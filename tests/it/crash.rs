//! Crash consistency: `strongroomd` is killed with SIGKILL at random points while several
//! writers are busy, and restarted on the same store, token and audit log, many times.
//!
//! After every restart: each acknowledged write reads back exactly, at its version; a write
//! that was not acknowledged is either absent or reads back exactly what was sent (and, once
//! seen, stays); versions have no holes; the service starts and reports no rollback. At the
//! end the audit log holds an entry for every acknowledged write and `audit verify` passes;
//! every intent has an outcome (the restarts reconciled those the kills cut off, and
//! `audit reconcile` reports none left), every version in the store has an intent whose
//! outcome says it was committed, and every committed outcome is a version in the store.
//!
//! `STRONGROOM_CRASH_CYCLES` (default 25) sets the number of kills, `STRONGROOM_CRASH_SEED`
//! the seed (printed, so a failure reproduces).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;

use crate::common::put;
use crate::common::{Server, TestEnv};
use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom::proto::{DescribeSecretRequest, GetSecretRequest};

/// Concurrent writers, each on its own connection.
const WRITERS: usize = 4;
/// Names only one writer writes.
const OWN_NAMES: usize = 3;
/// Names every writer writes (their turns are serialised by the service).
const SHARED_NAMES: usize = 2;
/// Kill after this many milliseconds of writing, at random in the range.
const KILL_AFTER_MS: (u64, u64) = (20, 300);
/// Acknowledged versions re-read at random after each restart (beyond the new ones).
const RESAMPLE: usize = 24;
/// Longest a start may take before the watchdog kills it.
const START_LIMIT: Duration = Duration::from_secs(60);
/// Longest any one RPC may take.
const RPC_LIMIT: Duration = Duration::from_secs(15);

/// xorshift64*: small, seeded, reproducible.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The seed from `var`, or one from the clock; printed either way.
pub(crate) fn seed_from(var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("{var}={seed}");
    seed
}

/// Kills, by pid, the `strongroomd` children of this test process once `limit` passes
/// without being disarmed: a start that hangs becomes a failure with the service's log.
pub(crate) struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

impl Watchdog {
    pub(crate) fn arm(limit: Duration) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                for pid in strongroomd_children() {
                    eprintln!("watchdog: strongroomd {pid} hung for {limit:?}; killing it");
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
        });
        Self(Some(tx))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Pids of the `strongroomd` processes whose parent is this process.
fn strongroomd_children() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = stat[..close].split_once('(').map_or("", |(_, c)| c);
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(me) && comm.starts_with("strongroomd") {
            out.push(pid);
        }
    }
    out
}

/// Starts the service under the watchdog.
pub(crate) fn start_bounded(env: &TestEnv) -> Server {
    let _dog = Watchdog::arm(START_LIMIT);
    env.start()
}

/// `(name, version)` of every successful PutSecret in an audit log's text.
pub(crate) fn audited_puts(audit: &str) -> HashSet<(String, u64)> {
    let mut audited = HashSet::new();
    for line in audit.lines() {
        let (body, _) = strongroom::audit::split_line(line).expect("audit line has a mac");
        let e: strongroom::audit::Entry = serde_json::from_str(&body).expect("audit entry");
        // The request's own entry (an intent, written before the commit, is not).
        if e.operation == "PutSecret" && e.status == "Ok" && e.phase.as_deref() != Some("intent") {
            audited.insert((e.name.unwrap_or_default(), e.version.unwrap_or(0)));
        }
    }
    audited
}

/// Cycles that write the same names; later cycles move on to fresh ones, so that the
/// per-restart check stays bounded however many cycles run.
const GENERATION: usize = 4;

fn own_name(generation: usize, w: usize, i: usize) -> String {
    format!("payments/crash/g{generation}/w{w}/n{i}")
}

fn shared_name(generation: usize, i: usize) -> String {
    format!("payments/crash/g{generation}/shared/{i}")
}

fn names_of(generation: usize) -> Vec<String> {
    let mut names: Vec<String> = (0..WRITERS)
        .flat_map(|w| (0..OWN_NAMES).map(move |i| own_name(generation, w, i)))
        .collect();
    names.extend((0..SHARED_NAMES).map(|i| shared_name(generation, i)));
    names
}

/// A value nobody else sends: cycle, writer and sequence, then padding of random length
/// (now and then large enough to leave sled's small-value path).
fn value_for(rng: &mut Rng, cycle: usize, writer: usize, seq: u64) -> Vec<u8> {
    let mut v = format!("crash c{cycle} w{writer} s{seq} |").into_bytes();
    let pad = if rng.below(20) == 0 {
        rng.range(4 * 1024, 32 * 1024)
    } else {
        rng.range(0, 200)
    };
    v.extend((0..pad).map(|_| (rng.next() >> 56) as u8));
    v
}

/// What one writer saw.
struct WriterLog {
    acked: Vec<(String, u64, Vec<u8>)>,
    /// The write that failed (the kill), if the writer got that far.
    unacked: Option<(String, Vec<u8>, Code)>,
    /// A failure that arrived before the kill: a bug.
    early: Option<String>,
}

async fn writer(
    mut c: SecretServiceClient<Channel>,
    writer: usize,
    cycle: usize,
    seed: u64,
    killed: Arc<AtomicBool>,
) -> WriterLog {
    let mut rng = Rng::new(seed);
    let mut log = WriterLog {
        acked: Vec::new(),
        unacked: None,
        early: None,
    };
    for seq in 0.. {
        let pick = rng.below(OWN_NAMES + SHARED_NAMES);
        let generation = cycle / GENERATION;
        let name = if pick < OWN_NAMES {
            own_name(generation, writer, pick)
        } else {
            shared_name(generation, pick - OWN_NAMES)
        };
        let value = value_for(&mut rng, cycle, writer, seq);
        let outcome = tokio::time::timeout(RPC_LIMIT, c.put_secret(put(&name, &value))).await;
        match outcome {
            Ok(Ok(r)) => log.acked.push((name, r.into_inner().version, value)),
            Ok(Err(status)) => {
                if !killed.load(Ordering::SeqCst) {
                    log.early = Some(format!("{name}: {status:?}"));
                }
                log.unacked = Some((name, value, status.code()));
                break;
            }
            Err(_) => {
                log.early = Some(format!("{name}: no answer within {RPC_LIMIT:?}"));
                log.unacked = Some((name, value, Code::DeadlineExceeded));
                break;
            }
        }
    }
    log
}

/// What the test knows the store must (or may) hold.
#[derive(Default)]
struct Model {
    /// Versions that must exist with exactly this value: acknowledged writes, and
    /// unacknowledged writes that a restart showed were durable after all.
    known: HashMap<String, BTreeMap<u64, Vec<u8>>>,
    /// Acknowledged by the service (a subset of `known`).
    acked: BTreeSet<(String, u64)>,
    /// Sent but not acknowledged before the last kill; may turn up once, at any version.
    maybe: HashMap<String, HashSet<Vec<u8>>>,
    /// Known versions whose value was already read back after a restart.
    read_back: HashSet<(String, u64)>,
    /// Unacknowledged writes that turned up after a restart.
    survivors: Vec<(String, u64)>,
    /// Unacknowledged writes that did not.
    lost_unacked: usize,
}

/// Reads `(name, version)` pairs, several at a time (the audit log group-commits them).
async fn get_many(
    c: &SecretServiceClient<Channel>,
    wanted: Vec<(String, u64)>,
) -> Vec<((String, u64), Result<(u64, Vec<u8>), tonic::Status>)> {
    const IN_FLIGHT: usize = 16;
    let mut out = Vec::with_capacity(wanted.len());
    let mut pending = wanted.into_iter();
    let mut set = tokio::task::JoinSet::new();
    loop {
        while set.len() < IN_FLIGHT {
            let Some((name, version)) = pending.next() else {
                break;
            };
            let mut c = c.clone();
            set.spawn(async move {
                let r = tokio::time::timeout(
                    RPC_LIMIT,
                    c.get_secret(GetSecretRequest {
                        name: name.clone(),
                        version,
                    }),
                )
                .await
                .unwrap_or_else(|_| panic!("get {name} v{version}: no answer within {RPC_LIMIT:?}"))
                .map(|r| {
                    let r = r.into_inner();
                    (r.version, r.value)
                });
                ((name, version), r)
            });
        }
        match set.join_next().await {
            Some(r) => out.push(r.expect("get task")),
            None => break,
        }
    }
    out
}

/// Checks the store against the model after a restart and folds survivors into it: every
/// version of the names of `generations` must be there (and no others), every known
/// version not yet read back must read back exactly (with `full`, every known version),
/// and a random sample of older ones too.
async fn verify(
    c: &SecretServiceClient<Channel>,
    model: &mut Model,
    rng: &mut Rng,
    context: &str,
    generations: &[usize],
    full: bool,
) {
    // Which versions exist, per name (asked several at a time).
    let mut present: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut described = tokio::task::JoinSet::new();
    for name in generations.iter().flat_map(|g| names_of(*g)) {
        let mut c = c.clone();
        described.spawn(async move {
            let r = tokio::time::timeout(
                RPC_LIMIT,
                c.describe_secret(DescribeSecretRequest { name: name.clone() }),
            )
            .await;
            (name, r)
        });
    }
    while let Some(joined) = described.join_next().await {
        let (name, described) = joined.expect("describe task");
        let described = described.unwrap_or_else(|_| panic!("{context}: describe {name} hung"));
        let versions: BTreeSet<u64> = match described {
            Ok(r) => r.into_inner().versions.iter().map(|v| v.version).collect(),
            Err(s) if s.code() == Code::NotFound => BTreeSet::new(),
            Err(s) => panic!("{context}: describe {name}: {s:?}"),
        };
        let known = model.known.entry(name.clone()).or_default();
        for v in known.keys() {
            assert!(
                versions.contains(v),
                "{context}: {name} v{v} was {} and is gone (present: {versions:?})",
                if model.acked.contains(&(name.clone(), *v)) {
                    "acknowledged"
                } else {
                    "seen after an earlier restart"
                }
            );
        }
        // sled recovers a prefix of its log and a write is one atomic batch: no holes.
        if let Some(&max) = versions.iter().next_back() {
            assert_eq!(
                versions,
                (1..=max).collect::<BTreeSet<u64>>(),
                "{context}: {name} has holes in its versions"
            );
        }
        present.insert(name, versions);
    }

    // Versions nobody acknowledged must be writes that were sent, exactly as sent.
    let unexpected: Vec<(String, u64)> = present
        .iter()
        .flat_map(|(n, vs)| {
            let known = &model.known[n];
            vs.iter()
                .filter(|v| !known.contains_key(v))
                .map(move |v| (n.clone(), *v))
        })
        .collect();
    for ((name, v), r) in get_many(c, unexpected).await {
        let (got_v, value) =
            r.unwrap_or_else(|s| panic!("{context}: {name} v{v} (unacknowledged): {s:?}"));
        assert_eq!(got_v, v, "{context}: {name}");
        let maybe = model.maybe.entry(name.clone()).or_default();
        assert!(
            maybe.remove(&value),
            "{context}: {name} v{v} holds a value that was never sent or was already \
             placed ({} bytes, starts {:?})",
            value.len(),
            String::from_utf8_lossy(&value[..value.len().min(40)])
        );
        model.known.get_mut(&name).expect("name").insert(v, value);
        model.read_back.insert((name.clone(), v));
        model.survivors.push((name, v));
    }
    // Whatever was not found now must never turn up later.
    for (name, maybe) in &mut model.maybe {
        assert!(
            maybe.is_empty() || present.contains_key(name),
            "{context}: the check skipped {name}, which has unacknowledged writes"
        );
        model.lost_unacked += maybe.len();
        maybe.clear();
    }

    // Every known version not yet read back (or all of them), the latest of each name, and
    // a random sample of older versions.
    let mut todo: Vec<(String, u64)> = model
        .known
        .iter()
        .flat_map(|(n, vs)| vs.keys().map(move |v| (n.clone(), *v)))
        .filter(|k| full || !model.read_back.contains(k))
        .collect();

    let all: Vec<(String, u64)> = model
        .known
        .iter()
        .flat_map(|(n, vs)| vs.keys().map(move |v| (n.clone(), *v)))
        .collect();
    for _ in 0..RESAMPLE.min(all.len()) {
        todo.push(all[rng.below(all.len())].clone());
    }
    todo.extend(
        present
            .iter()
            .filter(|(_, vs)| !vs.is_empty())
            .map(|(n, _)| (n.clone(), 0)),
    );
    for ((name, v), r) in get_many(c, todo).await {
        let (got_v, value) = r.unwrap_or_else(|s| panic!("{context}: {name} v{v}: {s:?}"));
        let known = &model.known[&name];
        let expect_v = if v == 0 {
            *known.keys().next_back().expect("a version")
        } else {
            v
        };
        assert_eq!(got_v, expect_v, "{context}: {name} v{v}");
        assert!(
            value == known[&expect_v],
            "{context}: {name} v{expect_v} reads back different bytes ({} vs {} expected)",
            value.len(),
            known[&expect_v].len()
        );
        model.read_back.insert((name, expect_v));
    }
}

/// The service flagged no rollback of its store (a kill must never look like one).
pub(crate) fn assert_no_rollback(server: &Server, context: &str) {
    let log = server.log_text();
    assert!(
        !log.contains("serving no secrets until officers accept"),
        "{context}: the service reported a rollback:\n{log}"
    );
}

/// Every PutSecret intent of the log with what settled it: `(name, version, committed)`,
/// and the intents nothing settled.
fn put_changes(audit: &str) -> (Vec<(String, u64, bool)>, Vec<strongroom::audit::Entry>) {
    let entries: Vec<strongroom::audit::Entry> = audit
        .lines()
        .map(|l| {
            let (body, _) = strongroom::audit::split_line(l).expect("audit line has a mac");
            serde_json::from_str(&body).expect("audit entry")
        })
        .collect();
    let mut settled: HashMap<String, bool> = HashMap::new();
    for e in &entries {
        if e.phase.as_deref() == Some("outcome")
            && let Some(change) = &e.change
        {
            match e.outcome.as_deref() {
                Some("committed") => {
                    settled.insert(change.clone(), true);
                }
                Some("failed") => {
                    settled.insert(change.clone(), false);
                }
                _ => {}
            }
        }
    }
    let puts = entries
        .iter()
        .filter(|e| e.phase.as_deref() == Some("intent") && e.operation == "PutSecret")
        .filter_map(|e| {
            let committed = settled.get(e.change.as_deref()?)?;
            Some((
                e.name.clone().unwrap_or_default(),
                e.version.unwrap_or(0),
                *committed,
            ))
        })
        .collect();
    let unsettled = strongroom::audit::reconcile::pair(entries).unsettled;
    (puts, unsettled)
}

fn assert_no_panic(server: &Server, context: &str) {
    let log = server.log_text();
    assert!(
        !log.contains("panicked"),
        "{context}: the service panicked:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_no_acknowledged_write() {
    let cycles: usize = std::env::var("STRONGROOM_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let seed = seed_from("STRONGROOM_CRASH_SEED");
    let mut rng = Rng::new(seed);
    let env = TestEnv::new();
    let mut model = Model::default();
    let started = Instant::now();
    let mut kill_points = Vec::with_capacity(cycles);

    for cycle in 0..cycles {
        let context = format!("cycle {cycle} (seed {seed})");
        let server = start_bounded(&env);
        let checker = server.client("payments").await;
        // The generation being written, the one before, and one older at random.
        let current = cycle / GENERATION;
        let mut generations = vec![current];
        if current > 0 {
            generations.push(current - 1);
        }
        if current > 1 {
            generations.push(rng.below(current - 1));
        }
        verify(
            &checker,
            &mut model,
            &mut rng,
            &context,
            &generations,
            false,
        )
        .await;
        drop(checker);

        let killed = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let c = server.client("payments").await;
            tasks.push(tokio::spawn(writer(
                c,
                w,
                cycle,
                rng.next(),
                killed.clone(),
            )));
        }
        let delay = rng.range(KILL_AFTER_MS.0, KILL_AFTER_MS.1);
        kill_points.push(delay);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let mut server = server;
        killed.store(true, Ordering::SeqCst);
        server.child.kill().expect("SIGKILL strongroomd");
        server.child.wait().expect("reap strongroomd");
        assert_no_panic(&server, &context);
        assert_no_rollback(&server, &context);

        for t in tasks {
            let log = tokio::time::timeout(RPC_LIMIT * 2, t)
                .await
                .unwrap_or_else(|_| panic!("{context}: a writer hung after the kill"))
                .expect("writer task");
            assert!(
                log.early.is_none(),
                "{context}: a write failed before the kill: {}",
                log.early.unwrap_or_default()
            );
            for (name, version, value) in log.acked {
                let known = model.known.entry(name.clone()).or_default();
                assert!(
                    !known.contains_key(&version),
                    "{context}: {name} v{version} acknowledged twice"
                );
                known.insert(version, value);
                model.acked.insert((name, version));
            }
            if let Some((name, value, _code)) = log.unacked {
                model.maybe.entry(name).or_default().insert(value);
            }
        }
    }

    // A last restart: full check of every value, then a clean stop.
    let server = start_bounded(&env);
    let c = server.client("payments").await;
    let all: Vec<usize> = (0..=cycles.saturating_sub(1) / GENERATION).collect();
    verify(
        &c,
        &mut model,
        &mut rng,
        &format!("final (seed {seed})"),
        &all,
        true,
    )
    .await;
    drop(c);
    assert_no_panic(&server, "final");
    assert_no_rollback(&server, "final");
    server.stop();

    // Every acknowledged write was audited before it was acknowledged.
    let audit = std::fs::read_to_string(env.audit_log()).expect("audit log");
    let audited = audited_puts(&audit);
    let unaudited: Vec<_> = model
        .acked
        .iter()
        .filter(|a| !audited.contains(*a))
        .collect();
    assert!(
        unaudited.is_empty(),
        "acknowledged writes without an audit entry: {unaudited:?}"
    );
    let verify = env.admin(&["audit", "verify", env.audit_log().to_str().unwrap()]);
    verify.assert_ok();

    // Write-ahead: every intent settled (the kills' by the restarts' reconciliation), and
    // the log explains every version in the store and claims no other.
    let (changes, unsettled) = put_changes(&audit);
    assert!(
        unsettled.is_empty(),
        "intents without an outcome after the restarts: {unsettled:#?}"
    );
    let reconcile = env.admin(&[
        "audit",
        "reconcile",
        env.audit_log().to_str().unwrap(),
        "--config",
        env.config(crate::common::POLICY).to_str().unwrap(),
    ]);
    reconcile.assert_ok();
    assert!(
        reconcile.stdout.contains(" 0 without one"),
        "{}",
        reconcile.stdout
    );
    let committed: HashSet<(String, u64)> = changes
        .iter()
        .filter(|(_, _, c)| *c)
        .map(|(n, v, _)| (n.clone(), *v))
        .collect();
    let in_store: HashSet<(String, u64)> = model
        .known
        .iter()
        .flat_map(|(n, vs)| vs.keys().map(move |v| (n.clone(), *v)))
        .collect();
    let unexplained: Vec<_> = in_store.difference(&committed).collect();
    assert!(
        unexplained.is_empty(),
        "versions in the store with no committed intent: {unexplained:?}"
    );
    let phantom: Vec<_> = committed.difference(&in_store).collect();
    assert!(
        phantom.is_empty(),
        "intents settled as committed whose version is not in the store: {phantom:?}"
    );
    let reconciled = audit
        .lines()
        .filter(|l| l.contains("\"operation\":\"Reconcile\""))
        .count();
    let survivors_unaudited = model
        .survivors
        .iter()
        .filter(|s| !audited.contains(*s))
        .count();

    let acked = model.acked.len();
    println!(
        "crash: seed {seed}, {cycles} SIGKILLs (after {:?} ms of writing, mean {} ms), \
         {acked} acknowledged writes, {} unacknowledged writes survived ({survivors_unaudited} \
         of them without their request's entry, all with a committed intent), {} were lost, \
         {reconciled} intents reconciled at restarts, {} audit lines, {:.1} s",
        (
            kill_points.iter().min().copied().unwrap_or(0),
            kill_points.iter().max().copied().unwrap_or(0)
        ),
        kill_points.iter().sum::<u64>() / kill_points.len().max(1) as u64,
        model.survivors.len(),
        model.lost_unacked,
        audit.lines().count(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        acked >= cycles,
        "too few acknowledged writes ({acked}) for {cycles} cycles to mean anything"
    );
}
