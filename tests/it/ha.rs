//! High availability with real processes: a 3-member etcd cluster (client mutual TLS),
//! 2–3 strongroomd replicas sharing it and one SoftHSM2 token, and real mTLS clients through
//! the failover client (`strongroom::client`), each scenario under concurrent read and write
//! load: a replica killed with SIGKILL, the etcd leader killed, one member stopped, and
//! everything restarted at once.
//!
//! What every scenario asserts:
//! - no acknowledged write is lost: at the end every acknowledged put (and every put whose
//!   outcome was unknown and that a read-back found) is read back, value and version,
//!   through every replica on its own, and the names listed are exactly those written;
//! - requests in flight see only retryable failures, and each succeeds when retried through
//!   the client (which moves to another replica). Accepted: the service's `UNAVAILABLE`
//!   (a replica whose etcd call failed), no answer within the attempt's time
//!   (`DEADLINE_EXCEEDED`), a connection that could not be made (refused or timed out: a
//!   replica that is down; the request was never sent; a certificate refused is not
//!   accepted) and a connection that broke under the request (a replica killed while it
//!   held the request: whatever the code tonic gives it, the client knows it as a transport
//!   failure, not as the service's answer). For a write whose attempt may have been applied
//!   the client says "outcome unknown": the test reads the name back, and retries the
//!   check-and-set write only if it is absent. Any other status fails the test;
//! - read-your-writes: right after a write is acknowledged, it is read back through every
//!   replica that is up, each on its own, and must be there at that version.
//!
//! These tests start their own etcd cluster whatever `STRONGROOM_TEST_STORE` says, so
//! scripts/test.sh runs them once, in the sled pass.
//!
//! Each replica has its own id (`[server] replica_id = "rN"`), so its own token checkpoint
//! objects and audit chain on the shared token.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use zeroize::Zeroizing;

use strongroom::client::{AttemptFailure, Client, ClientError, ClientTls, PutOptions};
use strongroom::secret::SecretValue;

use crate::common::{EtcdCluster, POLICY, Server, TestEnv};

/// Concurrent writers and readers of the load.
const WRITERS: usize = 3;
const READERS: usize = 2;
/// How long one operation may keep retrying before the test fails it.
const OP_DEADLINE: Duration = Duration::from_secs(60);
/// The failover client's deadline per call (all its attempts together).
const CALL_DEADLINE: Duration = Duration::from_secs(15);
/// Pause between the test's own retries of an operation, so that a cluster that is down
/// entirely is not spun on.
const RETRY_BACKOFF: Duration = Duration::from_millis(50);
/// The longest a wait for the load's progress may take.
const PROGRESS_DEADLINE: Duration = Duration::from_secs(90);

/// A free port on 127.0.0.1 for a replica that must come back on the same address.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The configuration of replica `n`: its own listener (a fixed port, so that it restarts
/// on the address the clients know) and its own audit log; the etcd cluster, the token and
/// the PKI are shared; its id `rN` gives it its own token checkpoint objects.
fn replica_config(env: &TestEnv, etcd: &EtcdCluster, n: usize, port: u16) -> PathBuf {
    let path = env.dir.path().join(format!("replica-r{n}.toml"));
    let endpoints = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/client-ca.pem"
shutdown_grace_ms = 1000
replica_id = "r{n}"

[hsm]
module = "{module}"
token = "{label}"
request_timeout_ms = 5000

[store]
backend = "etcd"
endpoints = [{endpoints}]
ca = "pki/etcd-ca.pem"
cert = "pki/etcd-client.pem"
key = "pki/etcd-client-key.pem"
etcd_timeout_ms = 2000

[audit]
path = "audit-r{n}.log"

{POLICY}
"#,
        module = env.module.display(),
        label = env.label,
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// One replica: its configuration, its address, and the process while it runs.
struct Replica {
    config: PathBuf,
    url: String,
    server: Option<Server>,
}

/// The load's shared state.
struct Load {
    stop: AtomicBool,
    /// Replicas being failed or restarted: a read-your-writes check skips them.
    down: Vec<AtomicBool>,
    /// Writes the service acknowledged: name and value (each is version 1 of a new name).
    acked: Mutex<Vec<(String, Vec<u8>)>>,
    /// Writes whose outcome was unknown and that a read-back found applied.
    resolved: Mutex<Vec<(String, Vec<u8>)>>,
    /// The retryable failures seen, by kind.
    retried: Mutex<BTreeMap<String, usize>>,
    reads: AtomicUsize,
    endpoints: Vec<String>,
    tls: ClientTls,
}

impl Load {
    fn note(&self, kind: String) {
        *self.retried.lock().unwrap().entry(kind).or_default() += 1;
    }

    fn acked_len(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// A failover client over every replica, starting at replica `first`.
    fn client_from(&self, first: usize) -> Client {
        let n = self.endpoints.len();
        let order: Vec<String> = (0..n)
            .map(|k| self.endpoints[(first + k) % n].clone())
            .collect();
        Client::connect(&order, &self.tls, CALL_DEADLINE).unwrap()
    }

    /// A client of replica `i` alone.
    fn client_of(&self, i: usize) -> Client {
        Client::connect(
            std::slice::from_ref(&self.endpoints[i]),
            &self.tls,
            Duration::from_secs(5),
        )
        .unwrap()
    }
}

/// The kind of a retryable failure, or why the failure is not one.
fn retryable(e: &ClientError) -> Result<String, String> {
    fn attempt(f: &AttemptFailure) -> Result<String, String> {
        match f {
            // Not sent; but a certificate refused either way is a mistake, not a failure.
            AttemptFailure::Connect(words) if words.contains("certificate") => {
                Err(format!("connect failed: {words}"))
            }
            AttemptFailure::Connect(words) if words.contains("connection refused") => {
                Ok("connection refused (not sent)".into())
            }
            AttemptFailure::Connect(words) if words.contains("deadline passed") => {
                Ok("connect timed out (not sent)".into())
            }
            AttemptFailure::Connect(words) => Ok(format!("connect failed (not sent): {words}")),
            AttemptFailure::NoAnswer(_) => Ok("no answer in time (DEADLINE_EXCEEDED)".into()),
            AttemptFailure::Call(s) if std::error::Error::source(s).is_some() => {
                Ok(format!("connection broke under the call ({:?})", s.code()))
            }
            AttemptFailure::Call(s) if s.code() == tonic::Code::Unavailable => {
                Ok("UNAVAILABLE".into())
            }
            AttemptFailure::Call(s) => Err(format!("{:?}: {}", s.code(), s.message())),
        }
    }
    match e {
        ClientError::Unreachable(attempts) => {
            let mut kinds = Vec::new();
            for a in attempts {
                kinds.push(attempt(&a.failure)?);
            }
            kinds.sort();
            kinds.dedup();
            Ok(format!("unreachable: {}", kinds.join(" + ")))
        }
        ClientError::OutcomeUnknown(a) => Ok(format!("outcome unknown: {}", attempt(&a.failure)?)),
        ClientError::Status(s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ) =>
        {
            Ok(format!("{:?}", s.code()))
        }
        other => Err(other.to_string()),
    }
}

fn value(bytes: &[u8]) -> SecretValue {
    SecretValue::new(Zeroizing::new(bytes.to_vec()))
}

/// Reads `name` through `client` until it answers; `None` if the service says NotFound.
async fn read_until_answered(load: &Load, client: &Client, name: &str) -> Option<Vec<u8>> {
    let end = Instant::now() + OP_DEADLINE;
    loop {
        match client.get(name, 0).await {
            Ok(s) => {
                assert_eq!(s.version, 1, "{name}: only version 1 is ever written");
                return Some(s.value.expose().to_vec());
            }
            Err(ClientError::Status(s)) if s.code() == tonic::Code::NotFound => return None,
            Err(e) => {
                let kind = retryable(&e).unwrap_or_else(|why| {
                    panic!("reading {name}: a failure that is not retryable: {why}")
                });
                load.note(format!("get: {kind}"));
                assert!(
                    Instant::now() < end,
                    "reading {name} did not succeed within {OP_DEADLINE:?}: {e}"
                );
                tokio::time::sleep(RETRY_BACKOFF).await;
            }
        }
    }
}

/// Writes version 1 of the new name `name` (check-and-set on "absent", so a retry cannot
/// apply twice) until the service acknowledges it or a read-back finds it applied; true if
/// acknowledged.
async fn write_until_done(load: &Load, client: &Client, name: &str, v: &[u8]) -> bool {
    let end = Instant::now() + OP_DEADLINE;
    let options = PutOptions {
        expected_version: Some(0),
        expires_at_unix: None,
        ..Default::default()
    };
    let mut maybe_applied = false;
    loop {
        let outcome = client.put(name, &value(v), options).await;
        let err = match outcome {
            Ok(r) => {
                assert_eq!(r.version, 1, "{name}: a new name starts at version 1");
                return true;
            }
            Err(e) => e,
        };
        let aborted = matches!(&err, ClientError::Status(s) if s.code() == tonic::Code::Aborted);
        if aborted && !maybe_applied {
            panic!("{name}: ABORTED, but no earlier attempt may have written it: {err}");
        }
        if !aborted {
            let kind = retryable(&err).unwrap_or_else(|why| {
                panic!("writing {name}: a failure that is not retryable: {why}")
            });
            load.note(format!("put: {kind}"));
        }
        if aborted || matches!(err, ClientError::OutcomeUnknown(_)) {
            maybe_applied = true;
            if let Some(found) = read_until_answered(load, client, name).await {
                assert_eq!(found, v, "{name}: read back another value");
                return false;
            }
        }
        assert!(
            Instant::now() < end,
            "writing {name} did not succeed within {OP_DEADLINE:?}: {err}"
        );
        tokio::time::sleep(RETRY_BACKOFF).await;
    }
}

/// Reads a just-acknowledged write back through every replica that is up, each on its own.
async fn check_read_your_writes(load: &Load, singles: &[Client], name: &str, v: &[u8]) {
    for (i, single) in singles.iter().enumerate() {
        let end = Instant::now() + OP_DEADLINE;
        loop {
            if load.down[i].load(Ordering::SeqCst) {
                break;
            }
            match single.get(name, 0).await {
                Ok(s) => {
                    assert_eq!(
                        (s.version, s.value.expose()),
                        (1, v),
                        "read-your-writes: replica {i} does not return the acknowledged write of {name}"
                    );
                    break;
                }
                Err(ClientError::Status(s)) if s.code() == tonic::Code::NotFound => {
                    panic!(
                        "read-your-writes: {name} was acknowledged, but replica {i} says NotFound"
                    )
                }
                Err(e) => {
                    let kind = retryable(&e).unwrap_or_else(|why| {
                        panic!("reading back {name} from replica {i}: not retryable: {why}")
                    });
                    load.note(format!("read-back: {kind}"));
                    assert!(
                        Instant::now() < end,
                        "replica {i} did not answer for {name} within {OP_DEADLINE:?}: {e}"
                    );
                    tokio::time::sleep(RETRY_BACKOFF).await;
                }
            }
        }
    }
}

async fn writer(load: Arc<Load>, k: usize) {
    // Every writer starts at replica 0, the one the replica scenario kills, so that writes
    // are in flight there when it dies.
    let client = load.client_from(0);
    let singles: Vec<Client> = (0..load.endpoints.len())
        .map(|i| load.client_of(i))
        .collect();
    let mut i = 0;
    while !load.stop.load(Ordering::SeqCst) {
        let name = format!("payments/ha/w{k}/{i:05}");
        let v = format!("value of {name}").into_bytes();
        if write_until_done(&load, &client, &name, &v).await {
            check_read_your_writes(&load, &singles, &name, &v).await;
            load.acked.lock().unwrap().push((name, v));
        } else {
            load.resolved.lock().unwrap().push((name, v));
        }
        i += 1;
    }
}

async fn reader(load: Arc<Load>, k: usize) {
    let client = load.client_from(k + 1);
    let mut i = k;
    while !load.stop.load(Ordering::SeqCst) {
        let pick = {
            let acked = load.acked.lock().unwrap();
            (!acked.is_empty()).then(|| acked[(i * 7919) % acked.len()].clone())
        };
        let Some((name, v)) = pick else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let found = read_until_answered(&load, &client, &name).await;
        assert_eq!(
            found.as_deref(),
            Some(v.as_slice()),
            "{name}: an acknowledged write read back wrong"
        );
        load.reads.fetch_add(1, Ordering::Relaxed);
        i += 1;
    }
}

/// A cluster of one test: the token, the etcd members, the replicas and the load on them.
struct Ha {
    env: TestEnv,
    etcd: EtcdCluster,
    replicas: Vec<Replica>,
    load: Arc<Load>,
    tasks: Vec<JoinHandle<()>>,
}

impl Ha {
    /// A fresh token, a 3-member etcd cluster and `n` replicas, all serving.
    fn start(n: usize) -> Ha {
        let env = TestEnv::new();
        let etcd = EtcdCluster::start(env.dir.path(), &env.pki, 3);
        let mut replicas = Vec::new();
        for i in 0..n {
            let port = free_port();
            replicas.push(Replica {
                config: replica_config(&env, &etcd, i, port),
                url: format!("https://127.0.0.1:{port}"),
                server: None,
            });
        }
        let tls = env.client_tls("payments");
        let load = Arc::new(Load {
            stop: AtomicBool::new(false),
            down: (0..n).map(|_| AtomicBool::new(false)).collect(),
            acked: Mutex::new(Vec::new()),
            resolved: Mutex::new(Vec::new()),
            retried: Mutex::new(BTreeMap::new()),
            reads: AtomicUsize::new(0),
            endpoints: replicas.iter().map(|r| r.url.clone()).collect(),
            tls,
        });
        let mut ha = Ha {
            env,
            etcd,
            replicas,
            load,
            tasks: Vec::new(),
        };
        for i in 0..n {
            ha.start_replica(i);
        }
        ha
    }

    fn start_replica(&mut self, i: usize) {
        let server = self.env.start_with(&self.replicas[i].config, &[]);
        self.replicas[i].server = Some(server);
        self.load.down[i].store(false, Ordering::SeqCst);
    }

    /// SIGKILL, as a machine or process failure would.
    fn kill_replica(&mut self, i: usize) {
        self.load.down[i].store(true, Ordering::SeqCst);
        if let Some(mut s) = self.replicas[i].server.take() {
            s.child.kill().unwrap();
            s.child.wait().unwrap();
        }
    }

    fn start_load(&mut self) {
        for k in 0..WRITERS {
            self.tasks
                .push(tokio::spawn(writer(Arc::clone(&self.load), k)));
        }
        for k in 0..READERS {
            self.tasks
                .push(tokio::spawn(reader(Arc::clone(&self.load), k)));
        }
    }

    /// Waits until `more` further writes are acknowledged (a load task that failed fails
    /// the test at once).
    async fn await_progress(&mut self, more: usize) {
        let target = self.load.acked_len() + more;
        let end = Instant::now() + PROGRESS_DEADLINE;
        while self.load.acked_len() < target {
            if let Some(i) = self.tasks.iter().position(|t| t.is_finished()) {
                let task = self.tasks.remove(i);
                // The others would fail next, on files the failing test removes.
                for t in &self.tasks {
                    t.abort();
                }
                if let Err(e) = task.await {
                    std::panic::resume_unwind(e.into_panic());
                }
                panic!("a load task ended before the load was stopped");
            }
            assert!(
                Instant::now() < end,
                "the load made no progress: {} of {target} writes acknowledged; logs:\n{}",
                self.load.acked_len(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the load, then checks every write through every replica and the names listed.
    async fn stop_and_verify(mut self) {
        self.load.stop.store(true, Ordering::SeqCst);
        for task in self.tasks.drain(..) {
            if let Err(e) = task.await {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        let load = Arc::clone(&self.load);
        let mut expected: Vec<(String, Vec<u8>)> = load.acked.lock().unwrap().clone();
        let acked = expected.len();
        expected.extend(load.resolved.lock().unwrap().iter().cloned());
        for i in 0..self.replicas.len() {
            let single = load.client_of(i);
            for (name, v) in &expected {
                let found = read_until_answered(&load, &single, name).await;
                assert_eq!(
                    found.as_deref(),
                    Some(v.as_slice()),
                    "{name} was written but replica {i} does not return it"
                );
            }
        }
        let listed: BTreeSet<String> = load
            .client_from(0)
            .pages("payments/ha", 500)
            .collect()
            .await
            .unwrap()
            .into_iter()
            .collect();
        let written: BTreeSet<String> = expected.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(listed, written, "the names listed are not those written");
        // What the replicas complained of (shared token objects until replicas have ids).
        for (i, r) in self.replicas.iter().enumerate() {
            if let Some(server) = &r.server {
                let warned: BTreeSet<String> = server
                    .log_text()
                    .lines()
                    .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                    .filter_map(|l| l.split_once(" strongroom").map(|(_, m)| m.to_owned()))
                    .map(|m| m.chars().take(160).collect())
                    .collect();
                println!("replica {i} warned: {warned:#?}");
            }
        }
        println!(
            "{acked} writes acknowledged, {} resolved by read-back, {} reads; retried: {:#?}",
            expected.len() - acked,
            load.reads.load(Ordering::Relaxed),
            load.retried.lock().unwrap()
        );
    }

    /// Every replica's and member's log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for (i, r) in self.replicas.iter().enumerate() {
            if let Some(s) = &r.server {
                out += &format!("--- replica {i}\n{}\n", s.log_text());
            }
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_loses_no_acknowledged_write() {
    let mut ha = Ha::start(3);
    ha.start_load();
    ha.await_progress(20).await;
    ha.kill_replica(0);
    ha.await_progress(30).await;
    ha.start_replica(0);
    ha.await_progress(20).await;
    ha.stop_and_verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_leader_killed_under_load_loses_no_acknowledged_write() {
    let mut ha = Ha::start(2);
    ha.start_load();
    ha.await_progress(20).await;
    let leader = ha.etcd.leader();
    ha.etcd.members[leader].kill();
    // A new leader among the two left.
    let next = ha.etcd.leader();
    assert_ne!(next, leader);
    ha.await_progress(30).await;
    ha.etcd.members[leader].restart();
    ha.await_progress(20).await;
    ha.stop_and_verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_stopped_under_load_loses_no_acknowledged_write() {
    let mut ha = Ha::start(2);
    ha.start_load();
    ha.await_progress(20).await;
    let leader = ha.etcd.leader();
    let follower = (leader + 1) % ha.etcd.members.len();
    ha.etcd.members[follower].terminate();
    ha.await_progress(30).await;
    ha.etcd.members[follower].restart();
    ha.await_progress(20).await;
    ha.stop_and_verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_restarted_under_load_loses_no_acknowledged_write() {
    let mut ha = Ha::start(2);
    ha.start_load();
    ha.await_progress(20).await;
    for i in 0..ha.replicas.len() {
        ha.kill_replica(i);
    }
    for m in &ha.etcd.members {
        m.kill();
    }
    let all: Vec<usize> = (0..ha.etcd.members.len()).collect();
    assert!(
        ha.etcd.start_together(&all),
        "the etcd cluster did not restart"
    );
    for i in 0..ha.replicas.len() {
        ha.start_replica(i);
    }
    ha.await_progress(30).await;
    ha.stop_and_verify().await;
}

/// How a member is taken down in [`one_member_down_a_replica_serves_every_call`].
#[derive(Clone, Copy, Debug)]
enum MemberDown {
    /// SIGSTOP: its connections stay open and nothing answers on them.
    Paused,
    /// SIGKILL: its connections break and new ones are refused.
    Killed,
}

/// Puts and then gets `n` new names through replica 0 alone, one call at a time, each at
/// its first attempt (the client does not retry).
async fn sequential_calls(ha: &Ha, tag: &str, n: usize) {
    let client = Client::connect(
        std::slice::from_ref(&ha.load.endpoints[0]),
        &ha.load.tls,
        Duration::from_secs(10),
    )
    .unwrap()
    .with_max_attempts(1);
    let options = PutOptions {
        expected_version: Some(0),
        expires_at_unix: None,
        ..Default::default()
    };
    for i in 0..n {
        let name = format!("payments/ha/{tag}/{i:04}");
        let v = format!("value of {name}").into_bytes();
        let put = client.put(&name, &value(&v), options).await;
        let put = put.unwrap_or_else(|e| panic!("{tag}: put {name} failed: {e}"));
        assert_eq!(put.version, 1);
        let got = client.get(&name, 0).await;
        let got = got.unwrap_or_else(|e| panic!("{tag}: get {name} failed: {e}"));
        assert_eq!((got.version, got.value.expose()), (1, v.as_slice()));
    }
}

/// Waits until replica 0 has logged that it takes `url` for down more often than `before`
/// times; the count now.
async fn await_member_down_logged(ha: &Ha, url: &str, before: usize) -> usize {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let n = member_down_lines(ha, url);
        if n > before {
            return n;
        }
        assert!(
            Instant::now() < end,
            "replica 0 did not notice that etcd member {url} is down; its log:\n{}",
            ha.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn member_down_lines(ha: &Ha, url: &str) -> usize {
    let log = ha.replicas[0].server.as_ref().unwrap().log_text();
    log.lines()
        .filter(|l| l.contains("etcd member is down") && l.contains(url))
        .count()
}

/// One of the three members, a follower, goes down as `how` says; once replica 0 has
/// noticed, every put and get through it succeeds at its first attempt: its etcd client
/// sends its calls to the two members that are up, none to the one that is down.
async fn one_member_down_a_replica_serves_every_call(how: MemberDown) {
    const N: usize = 60;
    let ha = Ha::start(1);
    // Calls on every member's connection first, so that the member goes down with its
    // connection open.
    sequential_calls(&ha, "before", 12).await;
    let leader = ha.etcd.leader();
    let down = (leader + 1) % ha.etcd.members.len();
    let url = ha.etcd.members[down].url.clone();
    let before = member_down_lines(&ha, &url);
    match how {
        MemberDown::Paused => ha.etcd.members[down].pause(),
        MemberDown::Killed => ha.etcd.members[down].kill(),
    }
    await_member_down_logged(&ha, &url, before).await;
    sequential_calls(&ha, &format!("{how:?}"), N).await;
    if let MemberDown::Paused = how {
        ha.etcd.members[down].resume();
    }
    println!("{how:?}: {N} puts and {N} gets through one replica, none failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_paused_a_replica_serves_every_call() {
    one_member_down_a_replica_serves_every_call(MemberDown::Paused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_killed_a_replica_serves_every_call() {
    one_member_down_a_replica_serves_every_call(MemberDown::Killed).await;
}

/// A watch through a replica follows its etcd member's death: each member in turn is
/// killed (so the one the replica's etcd watch is on dies at some point) and restarted, and
/// a write made meanwhile arrives on the subscriber's stream, which never ends: the
/// replica's watch opened again on a live member from the revision after its last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_moves_to_a_live_etcd_member_when_its_member_dies() {
    use crate::common::{event_text, next_events, watch};
    let ha = Ha::start(1);
    let server = ha.replicas[0].server.as_ref().unwrap();
    let mut stream = server
        .client("payments")
        .await
        .watch_secrets(watch(&["payments/ha/watch"], 0))
        .await
        .unwrap()
        .into_inner();
    let client = Client::connect(
        std::slice::from_ref(&ha.load.endpoints[0]),
        &ha.load.tls,
        CALL_DEADLINE,
    )
    .unwrap();
    for k in 0..ha.etcd.members.len() {
        let url = ha.etcd.members[k].url.clone();
        let before = member_down_lines(&ha, &url);
        ha.etcd.members[k].kill();
        // A new leader if it led.
        ha.etcd.leader();
        await_member_down_logged(&ha, &url, before).await;
        let name = format!("payments/ha/watch/m{k}");
        let v = format!("value of {name}").into_bytes();
        // The write itself may meet an election: the load's retry rules apply.
        let load = Arc::clone(&ha.load);
        write_until_done(&load, &client, &name, &v).await;
        let events = next_events(&mut stream, 1).await;
        assert_eq!(event_text(&events[0]), (name.clone(), 1, "created"));
        ha.etcd.members[k].restart();
    }
    let moved = server
        .log_text()
        .lines()
        .filter(|l| l.contains("the etcd watch broke"))
        .count();
    assert!(moved >= 1, "the replica's etcd watch never had to move");
}
