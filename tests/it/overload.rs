//! Overload and shutdown: many concurrent clients on loopback for a bounded time get right
//! answers or a deliberate RESOURCE_EXHAUSTED and nothing else, while the service's memory
//! stays bounded; SIGTERM drains in-flight writes, and every write acknowledged before the
//! process exits is there after a restart; requests with very short deadlines get
//! DEADLINE_EXCEEDED or UNAVAILABLE, never a wrong answer, and leave no unaudited write; a
//! few KiB answer is not held back by Nagle's algorithm.
//!
//! `STRONGROOM_LOAD_SECONDS` (default 10) sets how long the mixed load runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::common::{Server, TestEnv};
use crate::common::{get_at as get, put};
use crate::crash::{Rng, audited_puts, seed_from, start_bounded};
use strongroom::proto::DescribeSecretRequest;
use strongroom::proto::secret_service_client::SecretServiceClient;

/// Longest any one RPC may take before the test calls it a hang.
const RPC_LIMIT: Duration = Duration::from_secs(15);

/// A value that names its writer and sequence, padded to a random length.
fn value_for(rng: &mut Rng, tag: &str, max_pad: u64) -> Vec<u8> {
    let mut v = format!("{tag}|").into_bytes();
    let pad = rng.range(0, max_pad);
    v.extend((0..pad).map(|_| b'a' + (rng.next() % 26) as u8));
    v
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `n` connections to the service as payments.
async fn connections(server: &Server, n: usize) -> Vec<SecretServiceClient<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(server.client("payments").await);
    }
    out
}

/// What the load knows about names every task writes.
#[derive(Default)]
struct Shared {
    /// Sent (before the answer), by value.
    sent: HashSet<Vec<u8>>,
    /// Acknowledged, by (name, version).
    acked: HashMap<(String, u64), Vec<u8>>,
}

#[derive(Default)]
struct TaskReport {
    puts: u64,
    gets: u64,
    exhausted: u64,
    /// Anything other than OK or RESOURCE_EXHAUSTED.
    errors: Vec<String>,
    latencies_us: Vec<u64>,
}

const TASKS: usize = 64;
const CONNECTIONS: usize = 8;
const OWN_NAMES: usize = 4;
const SHARED_NAMES: usize = 8;

async fn load_task(
    mut c: SecretServiceClient<Channel>,
    task: usize,
    seed: u64,
    until: Instant,
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Shared>>,
) -> TaskReport {
    let mut rng = Rng::new(seed);
    let mut report = TaskReport::default();
    // This task's own names: it is their only writer, so it knows every version exactly.
    let mut own: Vec<BTreeMap<u64, Vec<u8>>> = vec![BTreeMap::new(); OWN_NAMES];
    let own_name = |i: usize| format!("payments/load/t{task}/k{i}");
    let shared_name = |i: usize| format!("payments/load/shared/{i}");
    let mut seq = 0u64;
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        seq += 1;
        let write = rng.below(10) < 4;
        let on_shared = rng.below(4) == 0;
        let started = Instant::now();
        let outcome: Result<(), tonic::Status> = if write {
            let (name, slot) = if on_shared {
                (shared_name(rng.below(SHARED_NAMES)), None)
            } else {
                let i = rng.below(OWN_NAMES);
                (own_name(i), Some(i))
            };
            let value = value_for(&mut rng, &format!("{name}|t{task}|s{seq}"), 1500);
            if slot.is_none() {
                shared.lock().unwrap().sent.insert(value.clone());
            }
            let r = tokio::time::timeout(RPC_LIMIT, c.put_secret(put(&name, &value)))
                .await
                .unwrap_or_else(|_| panic!("put {name} hung"));
            r.map(|r| {
                let v = r.into_inner().version;
                report.puts += 1;
                match slot {
                    Some(i) => {
                        let prev = own[i].keys().next_back().copied().unwrap_or(0);
                        assert_eq!(v, prev + 1, "{name}: versions of a single writer");
                        own[i].insert(v, value);
                    }
                    None => {
                        let mut s = shared.lock().unwrap();
                        assert!(
                            s.acked.insert((name.clone(), v), value).is_none(),
                            "{name} v{v} acknowledged twice"
                        );
                    }
                }
            })
        } else if on_shared {
            let name = shared_name(rng.below(SHARED_NAMES));
            let r = tokio::time::timeout(RPC_LIMIT, c.get_secret(get(&name, 0)))
                .await
                .unwrap_or_else(|_| panic!("get {name} hung"));
            match r {
                Ok(r) => {
                    let r = r.into_inner();
                    report.gets += 1;
                    let s = shared.lock().unwrap();
                    match s.acked.get(&(name.clone(), r.version)) {
                        Some(v) => assert!(*v == r.value, "{name} v{}: wrong value", r.version),
                        // Acknowledged to its writer a moment from now.
                        None => assert!(
                            s.sent.contains(&r.value) && r.value.starts_with(name.as_bytes()),
                            "{name} v{}: a value nobody sent",
                            r.version
                        ),
                    }
                    Ok(())
                }
                // Nobody has written it yet.
                Err(e) if e.code() == Code::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        } else {
            let i = rng.below(OWN_NAMES);
            let name = own_name(i);
            match own[i].keys().next_back().copied() {
                None => continue,
                Some(latest) => {
                    let version = if rng.below(2) == 0 {
                        0
                    } else {
                        rng.range(1, latest)
                    };
                    let r = tokio::time::timeout(RPC_LIMIT, c.get_secret(get(&name, version)))
                        .await
                        .unwrap_or_else(|_| panic!("get {name} hung"));
                    r.map(|r| {
                        let r = r.into_inner();
                        report.gets += 1;
                        let want = if version == 0 { latest } else { version };
                        assert_eq!(r.version, want, "{name}");
                        assert!(r.value == own[i][&want], "{name} v{want}: wrong value");
                    })
                }
            }
        };
        report
            .latencies_us
            .push(started.elapsed().as_micros() as u64);
        if let Err(e) = outcome {
            if e.code() == Code::ResourceExhausted {
                report.exhausted += 1;
            } else if report.errors.len() < 5 {
                report
                    .errors
                    .push(format!("{:?}: {}", e.code(), e.message()));
            } else {
                report.errors.push(String::new());
            }
        }
    }
    report
}

/// (a) 64 tasks over 8 connections, 60% reads and 40% writes, for a bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_load_gets_right_answers_and_memory_stays_bounded() {
    let seconds: u64 = std::env::var("STRONGROOM_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed = seed_from("STRONGROOM_LOAD_SEED");
    let mut rng = Rng::new(seed);
    let env = TestEnv::new();
    let server = start_bounded(&env);
    let pid = server.child.id();
    let conns = connections(&server, CONNECTIONS).await;
    let shared = Arc::new(Mutex::new(Shared::default()));
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);

    // Memory, sampled while the load runs.
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        while Instant::now() < until {
            if let Some(kib) = rss_kib(pid) {
                samples.push((started.elapsed(), kib));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        samples
    });
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            tokio::spawn(load_task(
                conns[t % CONNECTIONS].clone(),
                t,
                rng.next(),
                until,
                Arc::new(AtomicBool::new(false)),
                shared.clone(),
            ))
        })
        .collect();
    let mut total = TaskReport::default();
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(seconds) + RPC_LIMIT * 2, t)
            .await
            .expect("a load task hung")
            .expect("load task");
        total.puts += r.puts;
        total.gets += r.gets;
        total.exhausted += r.exhausted;
        total.errors.extend(r.errors);
        total.latencies_us.extend(r.latencies_us);
    }
    let elapsed = started.elapsed();
    let samples = sampler.await.unwrap();
    let log = server.log_text();
    assert!(
        !log.contains("panicked"),
        "the service panicked under load:\n{log}"
    );

    let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for l in &total.latencies_us {
        let _ = hist.record(*l);
    }
    let third = samples.len() / 3;
    let max_of = |s: &[(Duration, u64)]| s.iter().map(|(_, k)| *k).max().unwrap_or(0);
    let first = max_of(&samples[..third.max(1)]);
    let last = max_of(&samples[samples.len() - third.max(1)..]);
    let peak = max_of(&samples);
    println!(
        "load: seed {seed}, {seconds} s ({:.1} s), {TASKS} tasks over {CONNECTIONS} connections: \
         {} puts, {} gets ({:.0}/s), {} RESOURCE_EXHAUSTED, {} other errors; latency p50 {} ms \
         p99 {} ms max {} ms; VmRSS first third max {} MiB, last third max {} MiB, peak {} MiB \
         ({} samples)",
        elapsed.as_secs_f64(),
        total.puts,
        total.gets,
        (total.puts + total.gets) as f64 / elapsed.as_secs_f64(),
        total.exhausted,
        total.errors.len(),
        hist.value_at_quantile(0.5) / 1000,
        hist.value_at_quantile(0.99) / 1000,
        hist.max() / 1000,
        first / 1024,
        last / 1024,
        peak / 1024,
        samples.len()
    );
    let named: Vec<&String> = total.errors.iter().filter(|e| !e.is_empty()).collect();
    assert!(
        total.errors.is_empty(),
        "{} errors other than RESOURCE_EXHAUSTED, e.g. {named:?}",
        total.errors.len()
    );
    assert!(
        total.puts > 0 && total.gets > 0,
        "the load did nothing: {} puts, {} gets",
        total.puts,
        total.gets
    );
    assert!(samples.len() >= 6, "too few memory samples: {samples:?}");
    // Growth the store explains (sled caches what it holds) is fine; growth with the
    // number of requests is not.
    assert!(
        last <= first * 2,
        "VmRSS grew from {first} KiB (first third) to {last} KiB (last third): {samples:?}"
    );

    // What was acknowledged on the shared names reads back after the load.
    let acked = std::mem::take(&mut shared.lock().unwrap().acked);
    let mut set = tokio::task::JoinSet::new();
    for ((name, v), value) in acked.into_iter().take(400) {
        let mut c = conns[set.len() % CONNECTIONS].clone();
        set.spawn(async move {
            let r = c.get_secret(get(&name, v)).await.unwrap().into_inner();
            assert!(r.value == value, "{name} v{v}");
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    server.stop();
    let store_bytes: u64 =
        crate::common::files_under(env.etcd.as_ref().map_or(&env.store, |e| &e.data))
            .iter()
            .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
            .sum();
    println!(
        "load: the store holds {} MiB on disk after the run",
        store_bytes / (1024 * 1024)
    );
}

/// A writer that runs until its first failure; what it saw, and when.
struct Drained {
    acked: Vec<(String, u64, Vec<u8>, Instant)>,
    failure: Option<(Code, String, Instant)>,
}

async fn writer_until_failure(
    mut c: SecretServiceClient<Channel>,
    task: usize,
    seed: u64,
) -> Drained {
    let mut rng = Rng::new(seed);
    let mut out = Drained {
        acked: Vec::new(),
        failure: None,
    };
    for seq in 0u64.. {
        let name = format!("payments/term/t{task}/k{}", rng.below(3));
        let value = value_for(&mut rng, &format!("{name}|s{seq}"), 400);
        match tokio::time::timeout(RPC_LIMIT, c.put_secret(put(&name, &value))).await {
            Ok(Ok(r)) => out
                .acked
                .push((name, r.into_inner().version, value, Instant::now())),
            Ok(Err(e)) => {
                out.failure = Some((e.code(), e.message().to_owned(), Instant::now()));
                break;
            }
            Err(_) => panic!("put {name} hung through the shutdown"),
        }
    }
    out
}

/// (b) SIGTERM while writers are busy: in-flight writes drain, the process exits 0 within
/// the grace period, and every acknowledged write is there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_writes_and_loses_none() {
    const WRITERS: usize = 24;
    let seed = seed_from("STRONGROOM_TERM_SEED");
    let mut rng = Rng::new(seed);
    let env = TestEnv::new();
    let mut server = start_bounded(&env);
    let conns = connections(&server, 4).await;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|t| tokio::spawn(writer_until_failure(conns[t % 4].clone(), t, rng.next())))
        .collect();
    tokio::time::sleep(Duration::from_millis(rng.range(500, 1500))).await;

    let pid = server.child.id().to_string();
    let term_at = Instant::now();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    // The configuration's grace is 1 s: the process must be gone well within 10.
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            term_at.elapsed() < Duration::from_secs(10),
            "strongroomd still running 10 s after SIGTERM:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let exited_after = term_at.elapsed();
    let log = server.log_text();
    assert!(
        status.success(),
        "strongroomd exited {status:?} after SIGTERM:\n{log}"
    );
    assert!(
        !log.contains("panicked"),
        "the service panicked on SIGTERM:\n{log}"
    );

    let mut acked = Vec::new();
    let mut after_term = 0;
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        let d = tokio::time::timeout(RPC_LIMIT * 2, t)
            .await
            .expect("a writer hung")
            .unwrap();
        after_term += d.acked.iter().filter(|a| a.3 > term_at).count();
        acked.extend(d.acked.into_iter().map(|(n, v, val, _)| (n, v, val)));
        let (code, msg, at) = d.failure.expect("every writer stops with a failure");
        assert!(
            at > term_at,
            "a write failed before SIGTERM: {code:?} {msg}"
        );
        // A request the service did not take, or a connection it closed: never an answer
        // that claims something about the data. tonic's client reports a stream its server
        // refused with HTTP/2 GOAWAY (opened after the server's last stream id, so never
        // processed) as INTERNAL "h2 protocol error"; the service's own INTERNAL says
        // "internal error" and stays refused here.
        let refused_by_goaway = code == Code::Internal && msg.starts_with("h2 protocol error");
        assert!(
            matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)
                || refused_by_goaway,
            "a write failed during shutdown with {code:?}: {msg}"
        );
        *failures
            .entry(format!(
                "{code:?}: {}",
                msg.chars().take(60).collect::<String>()
            ))
            .or_default() += 1;
    }
    drop(server);
    println!(
        "sigterm: seed {seed}, {} writes acknowledged, {after_term} of them after SIGTERM; \
         exited 0 after {exited_after:?}; writers stopped with {failures:?}",
        acked.len()
    );
    // Writers had requests in flight when the signal came: the drain answered some.
    assert!(
        after_term > 0,
        "no write in flight at SIGTERM was answered: the shutdown did not drain"
    );

    let server = start_bounded(&env);
    let c = server.client("payments").await;
    // Every version in the store, to check against the audit log below.
    let mut stored = Vec::new();
    for t in 0..WRITERS {
        for k in 0..3 {
            let name = format!("payments/term/t{t}/k{k}");
            match c
                .clone()
                .describe_secret(DescribeSecretRequest { name: name.clone() })
                .await
            {
                Ok(r) => stored.extend(
                    r.into_inner()
                        .versions
                        .into_iter()
                        .map(|v| (name.clone(), v.version)),
                ),
                Err(e) if e.code() == Code::NotFound => {}
                Err(e) => panic!("describe {name}: {e:?}"),
            }
        }
    }
    let mut set = tokio::task::JoinSet::new();
    for (name, v, value) in acked {
        let mut c = c.clone();
        set.spawn(async move {
            let r = c
                .get_secret(get(&name, v))
                .await
                .unwrap_or_else(|e| panic!("{name} v{v} acknowledged before exit, lost: {e:?}"))
                .into_inner();
            assert!(
                r.value == value,
                "{name} v{v}: different bytes after restart"
            );
        });
        if set.len() >= 16 {
            set.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    server.stop();
    env.admin(&["audit", "verify", env.audit_log().to_str().unwrap()])
        .assert_ok();
    // A write the shutdown cut off after its commit must not be in the store unaudited.
    let audited = audited_puts(&std::fs::read_to_string(env.audit_log()).unwrap());
    let unaudited: Vec<&(String, u64)> = stored.iter().filter(|k| !audited.contains(*k)).collect();
    assert!(
        unaudited.is_empty(),
        "{} of {} stored versions have no audit entry: {unaudited:?}",
        unaudited.len(),
        stored.len()
    );
}

/// What requests with short deadlines came to.
struct DeadlineRun {
    /// (deadline ms, "get"/"put", outcome) -> count; an outcome is `OK` or a code (with the
    /// message for CANCELLED, to tell tonic's own timeout from anything else).
    outcomes: BTreeMap<(u64, &'static str, String), usize>,
    /// Answers that were not the stored value.
    wrong: Vec<String>,
    /// Probe versions in the store without a successful PutSecret audit entry.
    unaudited: Vec<(String, u64)>,
    /// The audit log's entries for the first unaudited name.
    unaudited_entries: String,
    acked: usize,
    stored: usize,
}

/// Sends `probes` requests with deadlines of 1 to 50 ms (a third of them writes) while 16
/// tasks keep the service busy, checks every answer, then every probe version against the
/// audit log.
async fn deadline_probes(probes: usize) -> DeadlineRun {
    const DEADLINES_MS: [u64; 6] = [1, 2, 5, 10, 20, 50];
    let seed = seed_from("STRONGROOM_DEADLINE_SEED");
    let mut rng = Rng::new(seed);
    let env = TestEnv::new();
    let server = start_bounded(&env);
    let conns = connections(&server, 4).await;

    // Known values, small and large (a large answer takes longer to send).
    let mut known = Vec::new();
    let mut c = conns[0].clone();
    for i in 0..16 {
        let name = format!("payments/deadline/known/{i}");
        let value = value_for(&mut rng, &name, if i % 2 == 0 { 64 } else { 16 * 1024 });
        let v = c.put_secret(put(&name, &value)).await.unwrap().into_inner();
        known.push((name, v.version, value));
    }

    // Background load until the probes are done.
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Mutex::new(Shared::default()));
    let until = Instant::now() + Duration::from_secs(120);
    let background: Vec<_> = (0..16)
        .map(|t| {
            tokio::spawn(load_task(
                conns[t % 4].clone(),
                t,
                rng.next(),
                until,
                stop.clone(),
                shared.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut run = DeadlineRun {
        outcomes: BTreeMap::new(),
        wrong: Vec::new(),
        unaudited: Vec::new(),
        unaudited_entries: String::new(),
        acked: 0,
        stored: 0,
    };
    let outcome = |e: &tonic::Status| match e.code() {
        Code::Cancelled => format!("Cancelled ({})", e.message()),
        code => format!("{code:?}"),
    };
    let mut probe_puts: Vec<String> = Vec::new();
    let mut acked_probe: HashMap<(String, u64), Vec<u8>> = HashMap::new();
    for i in 0..probes {
        let ms = DEADLINES_MS[(i / 3) % DEADLINES_MS.len()];
        let mut c = conns[i % 4].clone();
        if i % 3 == 0 {
            let name = format!("payments/deadline/probe/{}", i % 12);
            let value = value_for(&mut rng, &format!("{name}|{i}"), 2000);
            let mut req = Request::new(put(&name, &value));
            req.set_timeout(Duration::from_millis(ms));
            let r = tokio::time::timeout(RPC_LIMIT, c.put_secret(req))
                .await
                .expect("a put with a short deadline hung");
            probe_puts.push(name.clone());
            let key = match &r {
                Ok(r) => {
                    acked_probe.insert((name, r.get_ref().version), value);
                    "OK".to_owned()
                }
                Err(e) => outcome(e),
            };
            *run.outcomes.entry((ms, "put", key)).or_default() += 1;
        } else {
            let (name, v, value) = &known[i % known.len()];
            let mut req = Request::new(get(name, if i % 2 == 0 { 0 } else { *v }));
            req.set_timeout(Duration::from_millis(ms));
            let r = tokio::time::timeout(RPC_LIMIT, c.get_secret(req))
                .await
                .expect("a get with a short deadline hung");
            let key = match &r {
                Ok(r) => {
                    let r = r.get_ref();
                    if r.version != *v || r.value != *value {
                        run.wrong
                            .push(format!("{name}: v{} {} bytes", r.version, r.value.len()));
                    }
                    "OK".to_owned()
                }
                Err(e) => outcome(e),
            };
            *run.outcomes.entry((ms, "get", key)).or_default() += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for b in background {
        let r = tokio::time::timeout(RPC_LIMIT * 2, b)
            .await
            .expect("background load hung")
            .unwrap();
        let named: Vec<&String> = r.errors.iter().filter(|e| !e.is_empty()).collect();
        assert!(r.errors.is_empty(), "background load failed: {named:?}");
    }
    println!("deadlines (ms, op, outcome) -> count: {:?}", run.outcomes);

    // Every probe write acknowledged reads back.
    let mut c = conns[0].clone();
    for ((name, v), value) in &acked_probe {
        let r = c.get_secret(get(name, *v)).await.unwrap().into_inner();
        assert!(r.value == *value, "{name} v{v}");
    }
    // Let writes that outlived their callers finish and their audit entries land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut stored = Vec::new();
    probe_puts.sort();
    probe_puts.dedup();
    for name in &probe_puts {
        match c
            .describe_secret(DescribeSecretRequest { name: name.clone() })
            .await
        {
            Ok(r) => stored.extend(
                r.into_inner()
                    .versions
                    .into_iter()
                    .map(|v| (name.clone(), v.version)),
            ),
            Err(e) if e.code() == Code::NotFound => {}
            Err(e) => panic!("describe {name}: {e:?}"),
        }
    }
    server.stop();
    let audit = std::fs::read_to_string(env.audit_log()).unwrap();
    let audited = audited_puts(&audit);
    run.unaudited = stored
        .iter()
        .filter(|k| !audited.contains(*k))
        .cloned()
        .collect();
    if let Some((name, _)) = run.unaudited.first() {
        run.unaudited_entries = audit
            .lines()
            .filter(|l| l.contains(&format!("\"name\":\"{name}\"")))
            .collect::<Vec<_>>()
            .join("\n");
    }
    run.acked = acked_probe.len();
    run.stored = stored.len();
    println!(
        "deadline probes: seed {seed}, {} writes acknowledged, {} versions stored, {} of them \
         without an audit entry",
        run.acked,
        run.stored,
        run.unaudited.len()
    );
    run
}

/// (c) Requests with deadlines of 1 to 50 ms under load never get a wrong answer and never
/// leave a write in the store without its audit entry; they end OK, DEADLINE_EXCEEDED,
/// UNAVAILABLE, or (tonic's own grpc-timeout layer, which the service cannot intercept)
/// CANCELLED "Timeout expired", and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_deadlines_under_load_never_give_wrong_answers() {
    let run = deadline_probes(240).await;
    assert!(
        run.wrong.is_empty(),
        "wrong answers under deadline: {:?}",
        run.wrong
    );
    if let Some((name, v)) = run.unaudited.first() {
        panic!(
            "{} of {} probe writes in the store have no audit entry (cut off by their \
             deadline after the commit), e.g. {name} v{v}; the log's entries for {name}:\n{}",
            run.unaudited.len(),
            run.stored,
            run.unaudited_entries
        );
    }
    let unexpected: Vec<_> = run
        .outcomes
        .iter()
        .filter(|((_, _, k), _)| {
            !matches!(
                k.as_str(),
                "OK" | "DeadlineExceeded" | "Unavailable" | "Cancelled (Timeout expired)"
            )
        })
        .collect();
    assert!(unexpected.is_empty(), "unexpected outcomes: {unexpected:?}");
}
