//! Replicas: several strongroomd processes on one etcd and one SoftHSM2 token directory, each
//! with its own replica id. Their token objects are their own, concurrent writes through
//! them raise no false rollback at start or in the periodic checks, a replica id is live in
//! one process only, and a once-only job's holder paused past its lease cannot write after
//! another replica took its lock over (the fence).
//!
//! On sled these do not apply (one process opens a sled store; its locks are that process's,
//! tested in `store::lease`): each test prints why and returns.

use std::time::{Duration, Instant};

use cryptoki::types::AuthPin;
use strongroom::hsm::{self, TokenSelector, keys};

use crate::common::{Server, TestEnv, get, put, store_is_etcd};

/// `[store]` keys and `[jobs]` for the replicas of these tests: a state scan every second,
/// leases of 2 s renewed every 0.5 s, a state report every second.
const FAST: &str = "verify_interval_secs = 1\n\n[jobs]\nlease_ttl_secs = 2\nrenew_interval_ms = 500\nstate_report_interval_secs = 1\n";

const LIMIT: Duration = Duration::from_secs(60);

fn skip_on_sled() -> bool {
    if !store_is_etcd() {
        println!(
            "skipped on sled: replicas share an etcd store; a sled store is opened by one process, whose locks are its own (unit tests in store::lease)"
        );
        return true;
    }
    false
}

/// Replica `id`'s configuration: the default policy, FAST timings and `more`.
fn replica(env: &TestEnv, id: &str, more: &str) -> std::path::PathBuf {
    env.replica_config(id, &format!("{FAST}{more}\n{}", crate::common::POLICY))
}

/// The labels of the token's data objects of `base` (every replica's copy).
fn token_labels(env: &TestEnv, base: &str) -> Vec<String> {
    let pkcs11 = hsm::load_module(&env.module).unwrap();
    let slot = hsm::find_token(&pkcs11, &TokenSelector::Label(env.label.clone())).unwrap();
    let session = pkcs11.open_ro_session(slot).unwrap();
    hsm::login(&session, &AuthPin::new(env.user_pin.clone().into())).unwrap();
    keys::list_data(&session, base)
        .unwrap()
        .into_iter()
        .map(|(label, _)| label)
        .collect()
}

fn assert_no_rollback(server: &Server) {
    let log = server.log_text();
    for alarm in [
        "rolled back",
        "was replaced",
        "serving no secrets",
        "put back",
    ] {
        assert!(!log.contains(alarm), "{alarm:?} in the log:\n{log}");
    }
}

#[tokio::test]
async fn two_replicas_write_at_once_without_a_false_rollback() {
    if skip_on_sled() {
        return;
    }
    let env = TestEnv::new();
    let a = env.start_with(&replica(&env, "a", ""), &[]);
    let b = env.start_with(&replica(&env, "b", ""), &[]);
    let (mut ca, mut cb) = (a.client("payments").await, b.client("payments").await);
    let checks = |s: &Server| s.log_text().matches("match its commitment").count();
    // Write through both at once until each replica has run three periodic checks (one
    // check at start) and recorded its checkpoint meanwhile.
    let deadline = Instant::now() + LIMIT;
    let mut i = 0u32;
    while checks(&a) < 4 || checks(&b) < 4 {
        assert!(
            Instant::now() < deadline,
            "{}\n{}",
            a.log_text(),
            b.log_text()
        );
        // Both replicas write the same names too, so their writes interleave in etcd.
        let (na, nb) = (
            format!("payments/r{}", i % 20),
            format!("payments/r{}", (i + 10) % 20),
        );
        let (ra, rb) = tokio::join!(
            ca.put_secret(put(&na, b"from a")),
            cb.put_secret(put(&nb, b"from b"))
        );
        ra.unwrap();
        rb.unwrap();
        i += 1;
    }
    // A write through one is read back through the other.
    cb.put_secret(put("payments/last", b"through b"))
        .await
        .unwrap();
    let got = ca
        .get_secret(get("payments/last"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, b"through b");
    assert_no_rollback(&a);
    assert_no_rollback(&b);

    // Each replica's token objects are its own: no single-node label, one per replica.
    let want = |base: &str| vec![format!("{base}@a"), format!("{base}@b")];
    assert_eq!(
        token_labels(&env, keys::STORE_CHECKPOINT_LABEL),
        want(keys::STORE_CHECKPOINT_LABEL)
    );
    assert_eq!(
        token_labels(&env, keys::CHECKPOINT_LABEL),
        want(keys::CHECKPOINT_LABEL)
    );
    // And each keeps its own audit log.
    for id in ["a", "b"] {
        let log = std::fs::read_to_string(env.dir.path().join(format!("audit-{id}.log"))).unwrap();
        assert!(log.contains("PutSecret"), "audit-{id}.log: {log}");
    }

    // Stop both while the other still writes, then start both again: the start checks
    // compare the store with both checkpoints and flag nothing.
    let writer = tokio::spawn(async move {
        for j in 0..20u32 {
            let _ = cb.put_secret(put(&format!("payments/w{j}"), b"v")).await;
        }
    });
    a.stop();
    writer.await.unwrap();
    b.stop();
    let a = env.start_with(&replica(&env, "a", ""), &[]);
    let b = env.start_with(&replica(&env, "b", ""), &[]);
    for s in [&a, &b] {
        let got = s
            .client("payments")
            .await
            .get_secret(get("payments/last"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.value, b"through b");
        assert_no_rollback(s);
    }
}

#[tokio::test]
async fn a_second_process_with_a_live_replica_id_is_refused() {
    if skip_on_sled() {
        return;
    }
    let env = TestEnv::new();
    let a = env.start_with(&replica(&env, "a", ""), &[]);
    // The same id from another configuration (its own audit log): refused once the lease
    // would have lapsed had its holder died, naming the holder.
    let twin = env.config_file(
        "twin.toml",
        "replica_id = \"a\"\n",
        &format!(
            "{FAST}\n[audit]\npath = \"audit-twin.log\"\n{}",
            crate::common::POLICY
        ),
    );
    let out = env.refused_start_within(&twin, LIMIT);
    assert_ne!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("replica id \"a\" is live in another process")
            && out.stderr.contains(&format!("pid {}", a.child.id())),
        "{}",
        out.stderr
    );
    // The live replica is untouched and its id is its own.
    a.client("payments")
        .await
        .put_secret(put("payments/x", b"v"))
        .await
        .unwrap();
    // A stopped replica gives its id up at once: its successor starts (on the id's own audit
    // log, which the token's checkpoint for that id names).
    a.stop();
    let again = env.start_with(&replica(&env, "a", ""), &[]);
    again
        .client("payments")
        .await
        .get_secret(get("payments/x"))
        .await
        .unwrap();
}

/// The state report's history in etcd, oldest first: (replica, fence) of each version of
/// the key.
fn report_history(env: &TestEnv) -> Vec<(String, i64)> {
    let etcd = env.etcd.as_ref().unwrap();
    etcd.with_client(async move |client| {
        let mut kv = client.kv_client();
        let key = b"strongroom/m/state-report".to_vec();
        let mut out = Vec::new();
        let mut at: Option<i64> = None;
        loop {
            let options = at.map(|r| etcd_client::GetOptions::new().with_revision(r));
            let resp = kv.get(key.clone(), options).await.unwrap();
            let Some(k) = resp.kvs().first() else { break };
            let v: serde_json::Value = serde_json::from_slice(k.value()).unwrap();
            out.push((
                v["replica"].as_str().unwrap().to_owned(),
                v["fence"].as_i64().unwrap(),
            ));
            at = Some(k.mod_revision() - 1);
            if k.mod_revision() <= 1 {
                break;
            }
        }
        out.reverse();
        out
    })
}

#[tokio::test]
async fn a_paused_job_holder_is_fenced_after_its_lease() {
    if skip_on_sled() {
        return;
    }
    let env = TestEnv::new();
    let a = env.start_with(&replica(&env, "a", ""), &[]);
    a.wait_for_log("took the lock for job state-report", 1, LIMIT);
    a.wait_for_log("wrote the state report", 1, LIMIT);
    let b = env.start_with(&replica(&env, "b", ""), &[]);
    // A holds the job; B waits for it. Freeze A past its lease: B takes over and reports.
    a.pause();
    b.wait_for_log("took the lock for job state-report", 1, LIMIT);
    b.wait_for_log("wrote the state report", 1, LIMIT);
    let taken = report_history(&env);
    assert_eq!(taken.last().unwrap().0, "b", "{taken:?}");
    // Thawed, A still believes it holds the job; its next write carries its old fence and
    // etcd refuses it.
    a.resume();
    a.wait_for_log(
        "lost the lock for job state-report: its write under fence",
        1,
        LIMIT,
    );
    assert!(
        a.log_text().contains("another holder took the lock"),
        "{}",
        a.log_text()
    );
    // B still holds the job and keeps reporting after A came back.
    let before = b.log_text().matches("wrote the state report").count();
    b.wait_for_log("wrote the state report", before + 2, LIMIT);
    // Never two holders writing: in etcd's history of the report, every write carries a
    // fence at least that of the write before (an old holder's write after a newer one
    // would show as a smaller fence), A's writes all come before B's, and B's is the last.
    let history = report_history(&env);
    assert!(history.windows(2).all(|w| w[0].1 <= w[1].1), "{history:?}");
    let first_b = history.iter().position(|(r, _)| r == "b").unwrap();
    assert!(
        history[first_b..].iter().all(|(r, _)| r == "b"),
        "{history:?}"
    );
    assert!(
        history[..first_b].iter().all(|(r, _)| r == "a"),
        "{history:?}"
    );
    assert!(first_b > 0, "A reported before it was paused: {history:?}");
    assert_no_rollback(&a);
    assert_no_rollback(&b);
}
