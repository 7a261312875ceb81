//! Rollback: replacing the store's files with an older copy is detected through the epoch the
//! token remembers, and putting back, removing or adding any single record through the state
//! commitment; either is reported to officers, and no secret is served until they accept it.
//!
//! The edits are made behind the stopped service's back in whatever holds the store: sled's
//! files, or, when the suite runs on etcd, the test's etcd through its own client (the same
//! records in etcd's key layout).

use std::time::{Duration, Instant};

use tonic::Code;

use crate::common::{Server, TestEnv, accept_store_state, files_under, get, put};
use strongroom::proto::admin_service_client::AdminServiceClient;
use strongroom::proto::{
    AcceptStoreStateRequest, ApproveRequest, DeletePolicyRequest, DeleteSecretRequest,
    ListPoliciesRequest, OperationResponse, PutPolicyRequest, StatusRequest,
};

/// What the start check says when records changed outside the service.
const MISMATCH: &str = "does not match its commitment";

/// A copy of the stopped service's store: sled's directory, or every key under the etcd
/// prefix (as a restored etcd backup would hold them).
enum Backup {
    Dir(std::path::PathBuf),
    Keys(Vec<(Vec<u8>, Vec<u8>)>),
}

fn backup_store(env: &TestEnv) -> Backup {
    match &env.etcd {
        Some(etcd) => Backup::Keys(etcd.read_prefix(ETCD_PREFIX)),
        None => {
            let backup = env.dir.path().join("store-backup");
            copy_dir(&env.store, &backup);
            Backup::Dir(backup)
        }
    }
}

/// Puts a copy back in place of the stopped service's store.
fn restore_store(env: &TestEnv, backup: &Backup) {
    match (backup, &env.etcd) {
        (Backup::Keys(keys), Some(etcd)) => {
            etcd.delete_prefix(ETCD_PREFIX);
            etcd.put_all(keys.clone());
        }
        (Backup::Dir(dir), None) => {
            std::fs::remove_dir_all(&env.store).unwrap();
            copy_dir(dir, &env.store);
        }
        _ => unreachable!("a backup of another backend"),
    }
}

/// The key prefix of the service's etcd store (`store.prefix`'s default).
const ETCD_PREFIX: &[u8] = b"strongroom/";

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for f in files_under(from) {
        let rel = f.strip_prefix(from).unwrap();
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dest).unwrap();
    }
}

#[tokio::test]
async fn an_older_copy_of_the_store_is_refused_until_officers_accept_it() {
    let env = TestEnv::new();
    let server = env.start_admin();
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/key", b"old value"))
        .await
        .unwrap();
    drop(c);
    server.stop();

    // A backup of the store as it is now.
    let backup = backup_store(&env);

    // The secret is rotated after the backup.
    let server = env.start_admin();
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/key", b"new value"))
        .await
        .unwrap();
    drop(c);
    server.stop();

    // Someone with access to the files puts the backup back.
    restore_store(&env, &backup);

    let server = env.start_admin();
    let mut c = server.client("payments").await;
    let e = match c.get_secret(get("payments/key")).await {
        Ok(_) => panic!(
            "served from a rolled-back store; log:\n{}",
            server.log_text()
        ),
        Err(e) => e,
    };
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("rolled back"), "{}", e.message());
    let e = c.put_secret(put("payments/other", b"v")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // Officers see it, and accept the store as it is under dual control.
    let mut alice = server.admin("alice").await;
    let status = alice.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(status.store_rollback.contains("rolled back"), "{status:?}");
    let r = alice
        .accept_store_state(AcceptStoreStateRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!r.executed);
    assert!(c.get_secret(get("payments/key")).await.is_err());
    let mut bob = server.admin("bob").await;
    let done = bob
        .approve(ApproveRequest {
            id: r.approval.unwrap().id,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(done.executed, "{done:?}");
    let got = c
        .get_secret(get("payments/key"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, b"old value");
    let status = alice.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(status.store_rollback.is_empty());
}

#[tokio::test]
async fn the_current_store_passes_its_rollback_check_across_restarts() {
    let env = TestEnv::new();
    for round in 0..3 {
        let server = env.start();
        let mut c = server.client("payments").await;
        c.put_secret(put(&format!("payments/r{round}"), b"v"))
            .await
            .unwrap();
        for r in 0..=round {
            c.get_secret(get(&format!("payments/r{r}"))).await.unwrap();
        }
        drop(c);
        server.stop();
    }
}

/// Reads keys of the stopped service's store under `prefix` (see [`key`]).
fn store_read(env: &TestEnv, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    if let Some(etcd) = &env.etcd {
        return etcd.read_prefix(prefix);
    }
    let db = sled::open(&env.store).unwrap();
    db.scan_prefix(prefix)
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

/// Writes (or, for `None`, removes) keys in the stopped service's store.
fn store_write(env: &TestEnv, changes: &[(Vec<u8>, Option<Vec<u8>>)]) {
    if let Some(etcd) = &env.etcd {
        return etcd.write_raw(changes);
    }
    let db = sled::open(&env.store).unwrap();
    for (k, v) in changes {
        match v {
            Some(v) => db.insert(k, v.clone()).unwrap(),
            None => db.remove(k).unwrap(),
        };
    }
    db.flush().unwrap();
}

/// A key of the store by kind (`h`, `r`, `p`, `m`...) and what follows it, in the layout of
/// the backend the suite runs on: sled's `kind rest`, etcd's `strongroom/kind/rest`.
fn key(env: &TestEnv, kind: char, rest: &str) -> Vec<u8> {
    match env.etcd {
        Some(_) => format!("strongroom/{kind}/{rest}").into_bytes(),
        None => format!("{kind}{rest}").into_bytes(),
    }
}

fn head_key(env: &TestEnv, name: &str) -> Vec<u8> {
    key(env, 'h', name)
}

fn records_prefix(env: &TestEnv, name: &str) -> Vec<u8> {
    key(env, 'r', &format!("{name}\0"))
}

type Admin = AdminServiceClient<tonic::transport::Channel>;

/// Alice asks, Bob approves: the operation runs.
async fn dual(server: &Server, op: impl AsyncFnOnce(&mut Admin) -> OperationResponse) {
    let mut alice = server.admin("alice").await;
    let id = op(&mut alice).await.approval.unwrap().id;
    let done = server.approve("bob", id).await.unwrap();
    assert!(done.executed, "{done:?}");
}

/// The service refuses secrets naming `problem`, and officers see it.
async fn assert_flagged(server: &Server, name: &str, problem: &str) {
    let mut c = server.client("payments").await;
    let e = match c.get_secret(get(name)).await {
        Ok(_) => panic!(
            "served {name} from a tampered store; log:\n{}",
            server.log_text()
        ),
        Err(e) => e,
    };
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(problem), "{}", e.message());
    let status = server
        .admin("alice")
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.store_rollback.contains(problem), "{status:?}");
}

async fn assert_not_flagged(server: &Server) {
    let status = server
        .admin("alice")
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        status.store_rollback.is_empty(),
        "{status:?}\n{}",
        server.log_text()
    );
}

async fn delete(server: &Server, name: &str) {
    server
        .client("payments")
        .await
        .delete_secret(DeleteSecretRequest { name: name.into() })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_deleted_secrets_head_and_versions_put_back_are_flagged() {
    let env = TestEnv::new();
    let server = env.start_admin();
    let mut c = server.client("payments").await;
    for v in [b"first".as_slice(), b"second"] {
        c.put_secret(put("payments/gone", v)).await.unwrap();
    }
    c.put_secret(put("payments/stays", b"v")).await.unwrap();
    drop(c);
    server.stop();
    let mut saved = store_read(&env, &head_key(&env, "payments/gone"));
    saved.extend(store_read(&env, &records_prefix(&env, "payments/gone")));
    assert_eq!(saved.len(), 3);

    let server = env.start_admin();
    delete(&server, "payments/gone").await;
    server.stop();

    // The deleted secret's head and versions, put back as they were, genuine bytes.
    let back: Vec<_> = saved.into_iter().map(|(k, v)| (k, Some(v))).collect();
    store_write(&env, &back);
    let server = env.start_admin();
    assert_flagged(&server, "payments/stays", MISMATCH).await;
    assert_flagged(&server, "payments/gone", MISMATCH).await;

    // Officers accept the store as it is: served again, and no alarm at the next start.
    accept_store_state(&server, MISMATCH).await;
    let mut c = server.client("payments").await;
    let got = c
        .get_secret(get("payments/gone"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, b"second");
    drop(c);
    server.stop();
    let server = env.start_admin();
    assert_not_flagged(&server).await;
}

#[tokio::test]
async fn an_older_version_of_one_head_put_back_is_flagged() {
    let env = TestEnv::new();
    let server = env.start_admin();
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/key", b"v1")).await.unwrap();
    drop(c);
    server.stop();
    let old_head = store_read(&env, &head_key(&env, "payments/key"));

    let server = env.start_admin();
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/key", b"v2")).await.unwrap();
    drop(c);
    server.stop();

    // The head says version 1 is the latest again (version 2's record stays).
    store_write(
        &env,
        &[(head_key(&env, "payments/key"), Some(old_head[0].1.clone()))],
    );
    let server = env.start_admin();
    assert_flagged(&server, "payments/key", MISMATCH).await;
}

const STRANGER_HR: &str = r#"
[[rule]]
identity = "spiffe://strongroom.test/stranger"
prefix = "hr"
capabilities = ["read", "write"]
"#;

const STRANGER_NOTHING: &str = r#"
[[rule]]
identity = "spiffe://strongroom.test/stranger"
prefix = "hr/none"
capabilities = ["list"]
"#;

async fn put_policy(server: &Server, name: &str, document: &str) {
    let (name, document) = (name.to_owned(), document.to_owned());
    dual(server, async move |a: &mut Admin| {
        a.put_policy(PutPolicyRequest { name, document })
            .await
            .unwrap()
            .into_inner()
    })
    .await;
}

#[tokio::test]
async fn an_older_policy_revision_put_back_is_flagged() {
    let env = TestEnv::new();
    let server = env.start_admin();
    put_policy(&server, "hr", STRANGER_HR).await;
    server.stop();
    // Revision 1, with its genuine MAC: it grants stranger hr.
    let granting = store_read(&env, &key(&env, 'p', "hr"));
    assert_eq!(granting.len(), 1);

    let server = env.start_admin();
    put_policy(&server, "hr", STRANGER_NOTHING).await;
    let mut stranger = server.client("stranger").await;
    assert!(stranger.put_secret(put("hr/x", b"v")).await.is_err());
    drop(stranger);
    server.stop();

    store_write(&env, &[(key(&env, 'p', "hr"), Some(granting[0].1.clone()))]);
    let server = env.start_admin();
    assert_flagged(&server, "payments/x", MISMATCH).await;
    let mut stranger = server.client("stranger").await;
    let e = stranger.put_secret(put("hr/x", b"v")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
}

#[tokio::test]
async fn removing_the_seeded_marker_is_flagged_and_never_brings_the_seeded_rules_back() {
    let env = TestEnv::new();
    let server = env.start_admin();
    server
        .client("payments")
        .await
        .put_secret(put("payments/key", b"v"))
        .await
        .unwrap();
    // Officers delete the rules the configuration file seeded.
    dual(&server, async |a: &mut Admin| {
        a.delete_policy(DeletePolicyRequest {
            name: "config".into(),
        })
        .await
        .unwrap()
        .into_inner()
    })
    .await;
    assert!(
        server
            .client("payments")
            .await
            .get_secret(get("payments/key"))
            .await
            .is_err()
    );
    server.stop();

    store_write(&env, &[(key(&env, 'm', "policy-seeded"), None)]);
    let server = env.start_admin();
    assert_flagged(&server, "payments/key", MISMATCH).await;
    // Even once officers accept the store as it is, the rules stay deleted.
    accept_store_state(&server, MISMATCH).await;
    server.stop();
    let server = env.start_admin();
    assert_not_flagged(&server).await;
    let policies = server
        .admin("alice")
        .await
        .list_policies(ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner()
        .policies;
    assert!(policies.is_empty(), "{policies:?}");
    let e = server
        .client("payments")
        .await
        .get_secret(get("payments/key"))
        .await
        .unwrap_err();
    assert_ne!(e.code(), Code::FailedPrecondition, "{e:?}");
    server.stop();

    // Seeding is audited: the first start recorded what it seeded, and the starts after the
    // marker was removed recorded that they did not seed again.
    let seedings: Vec<String> = std::fs::read_to_string(env.audit_log())
        .unwrap()
        .lines()
        .filter_map(strongroom::audit::split_line)
        .filter_map(|(body, _)| serde_json::from_str::<strongroom::audit::Entry>(&body).ok())
        .filter(|e| e.operation == "SeedPolicies")
        .map(|e| e.detail.unwrap_or_default())
        .collect();
    assert!(
        seedings[0].starts_with("seeding the configuration file's rules: rules="),
        "{seedings:?}"
    );
    assert!(
        seedings.iter().skip(1).all(|d| d.starts_with("not seeded")),
        "{seedings:?}"
    );
    assert!(seedings.len() >= 2, "{seedings:?}");
}

#[tokio::test]
async fn an_older_copy_with_its_epoch_raised_is_flagged() {
    let env = TestEnv::new();
    let server = env.start_admin();
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/key", b"old")).await.unwrap();
    drop(c);
    server.stop();
    let backup = backup_store(&env);

    let server = env.start_admin();
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/key", b"new")).await.unwrap();
    drop(c);
    server.stop();

    // The backup put back, with its write counter raised past the token's.
    restore_store(&env, &backup);
    store_write(
        &env,
        &[(
            key(&env, 'm', "epoch"),
            Some(1_000_000u64.to_be_bytes().to_vec()),
        )],
    );
    let server = env.start_admin();
    assert_flagged(&server, "payments/key", "fail authentication").await;
}

#[tokio::test]
async fn periodic_state_checks_raise_no_false_alarm_while_writes_go_on() {
    let env = TestEnv::new();
    let config = env.config(&format!(
        "verify_interval_secs = 1\n{}\n{}",
        crate::common::ADMIN,
        crate::common::POLICY
    ));
    let server = env.start_with(&config, &[]);
    let mut c = server.client("payments").await;
    let matched = |s: &Server| s.log_text().matches("match its commitment").count();
    // One check at start; wait for three periodic ones while writing and deleting.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0u32;
    while matched(&server) < 4 {
        assert!(Instant::now() < deadline, "{}", server.log_text());
        let name = format!("payments/p{}", i % 50);
        c.put_secret(put(&name, b"v")).await.unwrap();
        if i % 7 == 0 {
            c.delete_secret(DeleteSecretRequest { name }).await.unwrap();
        }
        i += 1;
    }
    assert_not_flagged(&server).await;
    drop(c);
    server.stop();
    let server = env.start_with(&config, &[]);
    assert_not_flagged(&server).await;
}
