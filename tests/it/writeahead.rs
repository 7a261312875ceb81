//! Write-ahead audit: a change's intent is durable before its commit and its outcome follows.
//! `strongroomd` is stopped for good at a debug fault point (`STRONGROOM_DEBUG_HALT_AT`)
//! between the intent and the commit, or between the commit and the outcome, and killed with
//! SIGKILL there; `audit reconcile` then names the intent left without an outcome and says
//! whether its change is in the store, and the next start settles it with a `Reconcile`
//! outcome that says the same.

use std::path::Path;
use std::time::{Duration, Instant};

use tonic::Code;

use crate::common::{ADMIN, POLICY, Server, TestEnv, get, put};
use strongroom::audit::Entry;
use strongroom::proto::{DestroySecretRequest, GetSecretRequest};

/// Longest the service may take to reach its fault point.
const HALT_LIMIT: Duration = Duration::from_secs(30);

fn entries(log: &Path) -> Vec<Entry> {
    let text = std::fs::read_to_string(log).expect("audit log");
    text.lines()
        .map(|l| {
            let (body, _) = strongroom::audit::split_line(l).expect("audit line has a mac");
            serde_json::from_str(&body).expect("audit entry")
        })
        .collect()
}

/// Waits until the service logs that it halted at its fault point.
async fn wait_halted(server: &Server) {
    let deadline = Instant::now() + HALT_LIMIT;
    while !server.log_text().contains("halted at a debug fault point") {
        assert!(
            Instant::now() < deadline,
            "the service never reached its fault point:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills the service with SIGKILL where it halted.
fn kill(mut server: Server) {
    server.child.kill().expect("SIGKILL strongroomd");
    server.child.wait().expect("reap strongroomd");
}

/// The one intent of `operation` in the log, which must have no outcome yet.
fn lone_intent(log: &Path, operation: &str) -> Entry {
    let all = entries(log);
    let intents: Vec<&Entry> = all
        .iter()
        .filter(|e| e.phase.as_deref() == Some("intent") && e.operation == operation)
        .collect();
    assert_eq!(intents.len(), 1, "one {operation} intent: {all:#?}");
    let intent = intents[0].clone();
    assert!(
        !all.iter()
            .any(|e| e.phase.as_deref() == Some("outcome") && e.change == intent.change),
        "the kill came before the outcome: {all:#?}"
    );
    intent
}

/// The `Reconcile` outcome of `intent` after a restart.
fn reconciled(log: &Path, intent: &Entry) -> Entry {
    let all = entries(log);
    let found: Vec<&Entry> = all
        .iter()
        .filter(|e| e.operation == "Reconcile" && e.change == intent.change)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one Reconcile outcome for {:?}: {all:#?}",
        intent.change
    );
    assert_eq!(found[0].phase.as_deref(), Some("outcome"));
    found[0].clone()
}

/// `audit reconcile` on the stopped service's log and store.
fn reconcile(env: &TestEnv, config: &Path) -> crate::common::Output {
    env.admin(&[
        "audit",
        "reconcile",
        env.audit_log().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])
}

/// A PutSecret halted at `point` and killed there; returns its intent and what `audit
/// reconcile` said before the restart.
async fn killed_put(env: &TestEnv, point: &str) -> (Entry, crate::common::Output) {
    let config = env.config(POLICY);
    let server = env.start_with(&config, &[("STRONGROOM_DEBUG_HALT_AT", point)]);
    let mut c = server.client("payments").await;
    let call =
        tokio::spawn(async move { c.put_secret(put("payments/wal/halted", b"halted")).await });
    wait_halted(&server).await;
    kill(server);
    let answer = call.await.expect("put task");
    assert!(answer.is_err(), "the killed write was acknowledged");
    let intent = lone_intent(&env.audit_log(), "PutSecret");
    assert_eq!(intent.name.as_deref(), Some("payments/wal/halted"));
    assert_eq!(intent.version, Some(1));
    assert!(intent.fingerprint.is_some(), "{intent:?}");
    let report = reconcile(env, &config);
    (intent, report)
}

/// After the restart: the log verifies and `audit reconcile` reports nothing unsettled.
fn assert_all_settled(env: &TestEnv, server: Server) {
    server.stop();
    env.admin(&["audit", "verify", env.audit_log().to_str().unwrap()])
        .assert_ok();
    let after = reconcile(env, &env.config(POLICY));
    after.assert_ok();
    assert!(after.stdout.contains(" 0 without one"), "{}", after.stdout);
}

#[tokio::test]
async fn a_kill_between_intent_and_commit_is_reconciled_as_not_in_the_store() {
    let env = TestEnv::new();
    let (intent, report) = killed_put(&env, "put-after-intent").await;
    assert_eq!(report.code, 2, "{}\n{}", report.stdout, report.stderr);
    let change = intent.change.clone().unwrap();
    assert!(
        report.stdout.contains(&format!("UNSETTLED change {change}"))
            && report
                .stdout
                .contains("PutSecret payments/wal/halted v1 by spiffe://strongroom.test/payments: NOT in the store"),
        "{}",
        report.stdout
    );

    let server = env.start();
    let settled = reconciled(&env.audit_log(), &intent);
    assert_eq!(settled.outcome.as_deref(), Some("failed"), "{settled:?}");
    let detail = settled.detail.unwrap_or_default();
    assert!(
        detail.contains("the change is not in the store"),
        "{detail}"
    );
    let mut c = server.client("payments").await;
    let read = c.get_secret(get("payments/wal/halted")).await.unwrap_err();
    assert_eq!(read.code(), Code::NotFound);
    // The name's first version is written again, and audited as a new change.
    let v = c
        .put_secret(put("payments/wal/halted", b"again"))
        .await
        .unwrap()
        .into_inner()
        .version;
    assert_eq!(v, 1);
    drop(c);
    assert_all_settled(&env, server);
}

#[tokio::test]
async fn a_kill_between_commit_and_outcome_is_reconciled_as_in_the_store() {
    let env = TestEnv::new();
    let (intent, report) = killed_put(&env, "put-after-commit").await;
    assert_eq!(report.code, 2, "{}\n{}", report.stdout, report.stderr);
    assert!(
        report.stdout.contains(
            "PutSecret payments/wal/halted v1 by spiffe://strongroom.test/payments: IN the store"
        ),
        "{}",
        report.stdout
    );

    let server = env.start();
    let settled = reconciled(&env.audit_log(), &intent);
    assert_eq!(settled.outcome.as_deref(), Some("committed"), "{settled:?}");
    assert!(
        settled
            .detail
            .unwrap_or_default()
            .contains("the change is in the store"),
    );
    let mut c = server.client("payments").await;
    let read = c
        .get_secret(GetSecretRequest {
            name: "payments/wal/halted".into(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.value, b"halted");
    drop(c);
    assert_all_settled(&env, server);
}

#[tokio::test]
async fn writes_pair_an_intent_with_their_outcome_and_reads_keep_one_entry() {
    let env = TestEnv::new();
    let server = env.start();
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/wal/one", b"1")).await.unwrap();
    c.get_secret(get("payments/wal/one")).await.unwrap();
    c.delete_secret(strongroom::proto::DeleteSecretRequest {
        name: "payments/wal/one".into(),
    })
    .await
    .unwrap();
    let absent = c
        .delete_secret(strongroom::proto::DeleteSecretRequest {
            name: "payments/wal/none".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(absent.code(), Code::NotFound);
    drop(c);
    server.stop();

    let all = entries(&env.audit_log());
    let about = |op: &str, name: &str| -> Vec<Entry> {
        all.iter()
            .filter(|e| e.operation == op && e.name.as_deref() == Some(name))
            .cloned()
            .collect()
    };
    let puts = about("PutSecret", "payments/wal/one");
    assert_eq!(puts.len(), 2, "{puts:#?}");
    assert_eq!(puts[0].phase.as_deref(), Some("intent"));
    assert_eq!(puts[1].phase.as_deref(), Some("outcome"));
    assert_eq!(puts[1].outcome.as_deref(), Some("committed"));
    assert_eq!(puts[0].change, puts[1].change);
    assert!(puts[0].seq < puts[1].seq);
    assert_eq!(puts[1].version, Some(1));
    let reads = about("GetSecret", "payments/wal/one");
    assert_eq!(reads.len(), 1, "{reads:#?}");
    assert_eq!(reads[0].phase, None);
    let deletes = about("DeleteSecret", "payments/wal/one");
    assert_eq!(deletes.len(), 2);
    assert_eq!(deletes[1].outcome.as_deref(), Some("committed"));
    let none = about("DeleteSecret", "payments/wal/none");
    assert_eq!(none.len(), 2);
    assert_eq!(none[1].outcome.as_deref(), Some("failed"));
    assert_eq!(none[1].status, "NotFound");
    // Every change id is different, and every intent is settled.
    let pairing = strongroom::audit::reconcile::pair(all.clone());
    assert_eq!(pairing.intents, 3);
    assert_eq!(pairing.settled, 3);
    assert!(pairing.unsettled.is_empty());
}

#[tokio::test]
async fn an_approved_destroy_killed_after_its_commit_is_reconciled_as_in_the_store() {
    let env = TestEnv::new();
    let config = env.config(&format!("{ADMIN}\n{POLICY}"));
    let server = env.start_with(&config, &[]);
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/wal/doomed", b"x"))
        .await
        .unwrap();
    drop(c);
    server.stop();

    let server = env.start_with(
        &config,
        &[("STRONGROOM_DEBUG_HALT_AT", "officer-after-commit")],
    );
    let id = server
        .admin("alice")
        .await
        .destroy_secret(DestroySecretRequest {
            name: "payments/wal/doomed".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap()
        .id;
    let mut bob = server.admin("bob").await;
    let approve =
        tokio::spawn(async move { bob.approve(strongroom::proto::ApproveRequest { id }).await });
    wait_halted(&server).await;
    kill(server);
    assert!(approve.await.expect("approve task").is_err());

    let intent = lone_intent(&env.audit_log(), "DestroySecret");
    assert_eq!(
        intent.identity.as_deref(),
        Some(crate::common::BOB),
        "{intent:?}"
    );
    let report = reconcile(&env, &config);
    assert_eq!(report.code, 2, "{}\n{}", report.stdout, report.stderr);
    assert!(
        report.stdout.contains(
            "DestroySecret payments/wal/doomed by bob.officers.strongroom.test: IN the store"
        ),
        "{}",
        report.stdout
    );
    let server = env.start_with(&config, &[]);
    let settled = reconciled(&env.audit_log(), &intent);
    assert_eq!(settled.outcome.as_deref(), Some("committed"), "{settled:?}");
    let mut c = server.client("payments").await;
    let gone = c.get_secret(get("payments/wal/doomed")).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    drop(c);
    server.stop();
    let after = reconcile(&env, &config);
    after.assert_ok();
}

#[test]
fn dangerous_no_write_ahead_is_refused_outside_benchmarks() {
    let env = TestEnv::new();
    let config = env.config(&format!(
        "{POLICY}\n[audit]\npath = \"audit.log\"\ndangerous_no_write_ahead = true"
    ));
    let out = crate::common::Output::of(
        std::process::Command::new(env!("CARGO_BIN_EXE_strongroomd"))
            .arg("--config")
            .arg(&config)
            .env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
            .env("STRONGROOM_USER_PIN", &env.user_pin)
            .env_remove("STRONGROOM_BENCHMARK")
            .stdin(std::process::Stdio::null()),
    );
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains("audit.dangerous_no_write_ahead is for benchmarks only"),
        "{}",
        out.stderr
    );
}
