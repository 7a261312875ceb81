//! The life of a secret version: record format v2 (its AAD binds every field that drives a
//! decision, and a read binds the slot it read), versions of a deleted-then-recreated name,
//! v1 records, validity windows (`not_before`, `expires_at`), `max_versions`, and what
//! expires soon (ListSecrets' filter, the CLI, the officers' report).
//!
//! Store edits are made behind the stopped service's back in whatever holds the store:
//! sled's files, or, when the suite runs on etcd, the test's etcd through its own client (as
//! tests/it/rollback.rs does). Edits change the store's commitment, so officers accept the
//! state first; each edited record must then still fail closed by itself.

use std::time::{Duration, Instant};

use prost::Message;
use tonic::Code;

use tonic::transport::Channel;

use crate::common::{
    ADMIN, POLICY, Server, TestEnv, accept_store_state, get, get_at, put, unix_now,
};
use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom::proto::{
    DeleteSecretRequest, DescribeSecretRequest, ListSecretsRequest, PutSecretRequest,
    ReportExpiringRequest, SealedRecordV1,
};

/// What the start check says when records changed outside the service.
const MISMATCH: &str = "does not match its commitment";

/// The key of `(name, version)`'s record in the backend the suite runs on.
fn record_key(env: &TestEnv, name: &str, version: u64) -> Vec<u8> {
    match env.etcd {
        Some(_) => format!("strongroom/r/{name}\0{version:020}").into_bytes(),
        None => {
            let mut k = vec![b'r'];
            k.extend_from_slice(name.as_bytes());
            k.push(0);
            k.extend_from_slice(&version.to_be_bytes());
            k
        }
    }
}

/// The stored bytes of `key` in the stopped service's store.
fn store_get(env: &TestEnv, key: &[u8]) -> Vec<u8> {
    if let Some(etcd) = &env.etcd {
        let found = etcd.read_prefix(key);
        let (_, v) = found
            .into_iter()
            .find(|(k, _)| k == key)
            .expect("the record is stored");
        return v;
    }
    let db = sled::open(&env.store).unwrap();
    db.get(key).unwrap().expect("the record is stored").to_vec()
}

/// Writes keys into the stopped service's store.
fn store_put(env: &TestEnv, changes: &[(Vec<u8>, Vec<u8>)]) {
    if let Some(etcd) = &env.etcd {
        let raw: Vec<_> = changes
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        return etcd.write_raw(&raw);
    }
    let db = sled::open(&env.store).unwrap();
    for (k, v) in changes {
        db.insert(k, v.clone()).unwrap();
    }
    db.flush().unwrap();
    drop(db);
}

fn load(env: &TestEnv, name: &str, version: u64) -> SealedRecordV1 {
    SealedRecordV1::decode(store_get(env, &record_key(env, name, version)).as_slice()).unwrap()
}

fn start(env: &TestEnv) -> Server {
    env.start_admin()
}

/// Polls `f` every 50 ms until it holds (at most `limit`); whether it did.
async fn until<F: AsyncFnMut() -> bool>(limit: Duration, mut f: F) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn code_of(server: &Server, stem: &str, name: &str, version: u64) -> Code {
    let mut c = server.client(stem).await;
    match c.get_secret(get_at(name, version)).await {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    }
}

#[tokio::test]
async fn tampered_metadata_in_the_store_answers_data_loss() {
    type Edit = fn(&mut SealedRecordV1);
    let edits: Vec<(&str, Edit)> = vec![
        ("expires_at extended", |r| {
            r.expires_at_unix = r.expires_at_unix.map(|e| e + 86_400 * 365)
        }),
        ("expires_at removed", |r| r.expires_at_unix = None),
        ("not_before moved", |r| {
            r.not_before_unix = r.not_before_unix.map(|n| n - 1)
        }),
        ("not_before removed", |r| r.not_before_unix = None),
        ("created_by: same length", |r| {
            r.created_by = r.created_by.replace("payments", "paymentz")
        }),
        ("created_by: another identity", |r| {
            r.created_by = "spiffe://strongroom.test/someone-else".into()
        }),
        ("created_at", |r| r.created_at_unix -= 1),
        ("mechanism: envelope to hsm-only", |r| r.mechanism = 2),
        ("format: v2 relabelled v1", |r| r.format = 0),
    ];
    let env = TestEnv::new();
    let server = start(&env);
    let mut c = server.client("payments").await;
    let t = unix_now();
    let name = |i: usize| format!("payments/tamper/{i:02}");
    for i in 0..=edits.len() {
        c.put_secret(PutSecretRequest {
            not_before_unix: Some(t - 3600),
            expires_at_unix: Some(t + 86_400),
            ..put(&name(i), format!("value-{i}").as_bytes())
        })
        .await
        .unwrap();
    }
    drop(c);
    server.stop();

    let mut changes = Vec::new();
    for (i, (_, edit)) in edits.iter().enumerate() {
        let mut r = load(&env, &name(i), 1);
        assert_eq!(r.format, 2, "new records are written as v2");
        edit(&mut r);
        changes.push((record_key(&env, &name(i), 1), r.encode_to_vec()));
    }
    store_put(&env, &changes);

    let server = start(&env);
    accept_store_state(&server, MISMATCH).await;
    let mut c = server.client("payments").await;
    let mut problems = Vec::new();
    for (i, (what, _)) in edits.iter().enumerate() {
        for version in [1, 0] {
            match c.get_secret(get_at(&name(i), version)).await {
                Ok(_) => problems.push(format!("{what} (v{version}): SERVED")),
                Err(e) if e.code() == Code::DataLoss => {}
                Err(e) => problems.push(format!("{what} (v{version}): {e:?}")),
            }
        }
    }
    // The untouched one reads.
    let last = edits.len();
    let got = c.get_secret(get(&name(last))).await.unwrap().into_inner();
    assert_eq!(got.value, format!("value-{last}").as_bytes());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test]
async fn a_record_copied_into_another_slot_or_the_latest_is_refused() {
    let env = TestEnv::new();
    let server = start(&env);
    let mut c = server.client("payments").await;
    for v in [b"one".as_slice(), b"two", b"three", b"four"] {
        c.put_secret(put("payments/copy", v)).await.unwrap();
    }
    for v in [b"old".as_slice(), b"new"] {
        c.put_secret(put("payments/copy-latest", v)).await.unwrap();
    }
    drop(c);
    server.stop();

    let v1 = load(&env, "payments/copy", 1);
    // Version 1 whole into slot 2 (not the latest), and, relabelled as version 3, into
    // slot 3; version 2 relabelled into the latest slot (4).
    let relabelled = |mut r: SealedRecordV1, v: u64| {
        r.version = v;
        r.encode_to_vec()
    };
    let v2 = load(&env, "payments/copy", 2);
    store_put(
        &env,
        &[
            (record_key(&env, "payments/copy", 2), v1.encode_to_vec()),
            (record_key(&env, "payments/copy", 3), relabelled(v1, 3)),
            (record_key(&env, "payments/copy", 4), relabelled(v2, 4)),
            // An older version whole into the latest slot: a read of the latest must not
            // serve it (the head names version 2; the record says 1).
            (
                record_key(&env, "payments/copy-latest", 2),
                load(&env, "payments/copy-latest", 1).encode_to_vec(),
            ),
        ],
    );
    let server = start(&env);
    accept_store_state(&server, MISMATCH).await;
    for (version, what) in [
        (2, "v1 copied whole into slot 2"),
        (3, "v1 relabelled into slot 3"),
        (4, "v2 relabelled into the latest slot"),
        (0, "the latest slot, read as the latest"),
    ] {
        assert_eq!(
            code_of(&server, "payments", "payments/copy", version).await,
            Code::DataLoss,
            "{what}"
        );
    }
    for version in [0, 2] {
        assert_eq!(
            code_of(&server, "payments", "payments/copy-latest", version).await,
            Code::DataLoss,
            "an older version copied whole into the latest slot, read as v{version}"
        );
    }
    let mut c = server.client("payments").await;
    let got = c.get_secret(get_at("payments/copy", 1)).await.unwrap();
    assert_eq!(got.into_inner().value, b"one");
}

#[tokio::test]
async fn a_deleted_then_recreated_names_old_versions_are_not_found() {
    let env = TestEnv::new();
    let server = start(&env);
    let mut c = server.client("payments").await;
    for v in [b"a".as_slice(), b"b"] {
        c.put_secret(put("payments/again", v)).await.unwrap();
    }
    c.delete_secret(DeleteSecretRequest {
        name: "payments/again".into(),
    })
    .await
    .unwrap();
    let v = c
        .put_secret(put("payments/again", b"c"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.version, 3, "versions are never reused");
    for old in [1, 2] {
        assert_eq!(
            code_of(&server, "payments", "payments/again", old).await,
            Code::NotFound,
            "v{old} of the earlier incarnation"
        );
    }
    assert_eq!(
        code_of(&server, "payments", "payments/again", 4).await,
        Code::NotFound
    );
    let got = c
        .get_secret(get("payments/again"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.version, got.value.as_slice()), (3, b"c".as_slice()));
    // Across a restart too (the head keeps where the incarnation starts).
    drop(c);
    server.stop();
    let server = start(&env);
    assert_eq!(
        code_of(&server, "payments", "payments/again", 2).await,
        Code::NotFound
    );
    assert_eq!(
        code_of(&server, "payments", "payments/again", 3).await,
        Code::Ok
    );
}

#[tokio::test]
async fn v1_records_still_open_beside_v2_records() {
    let env = TestEnv::new();
    // A debug build's hook writes records as the service did before v2.
    let config = env.config(&format!("{ADMIN}\n{POLICY}"));
    let old = env.start_with(&config, &[("STRONGROOM_DEBUG_RECORD_FORMAT", "v1")]);
    let mut c = old.client("payments").await;
    c.put_secret(put("payments/legacy", b"from v1"))
        .await
        .unwrap();
    c.put_secret(PutSecretRequest {
        protection: strongroom::proto::Protection::HsmOnly as i32,
        ..put("payments/legacy-strict", b"strict v1")
    })
    .await
    .unwrap();
    drop(c);
    old.stop();
    assert_eq!(load(&env, "payments/legacy", 1).format, 0);
    assert_eq!(load(&env, "payments/legacy-strict", 1).format, 0);

    let server = start(&env);
    let mut c = server.client("payments").await;
    let got = c
        .get_secret(get("payments/legacy"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, b"from v1");
    let got = c
        .get_secret(get("payments/legacy-strict"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, b"strict v1");
    c.put_secret(put("payments/legacy", b"now v2"))
        .await
        .unwrap();
    let d = c
        .describe_secret(DescribeSecretRequest {
            name: "payments/legacy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let formats: Vec<u32> = d.versions.iter().map(|v| v.record_format).collect();
    assert_eq!(formats, vec![1, 2]);
    for (v, want) in [(1, b"from v1".as_slice()), (2, b"now v2")] {
        let got = c.get_secret(get_at("payments/legacy", v)).await.unwrap();
        assert_eq!(got.into_inner().value, want);
    }
    drop(c);
    server.stop();
    assert_eq!(load(&env, "payments/legacy", 2).format, 2);

    // A v1 record copied into another slot still fails: its AAD binds the slot's version.
    let v1 = load(&env, "payments/legacy", 1);
    store_put(
        &env,
        &[(record_key(&env, "payments/legacy", 2), {
            let mut r = v1;
            r.version = 2;
            r.encode_to_vec()
        })],
    );
    let server = start(&env);
    accept_store_state(&server, MISMATCH).await;
    assert_eq!(
        code_of(&server, "payments", "payments/legacy", 0).await,
        Code::DataLoss
    );
}

#[tokio::test]
async fn validity_windows_are_enforced_and_explained_only_to_readers() {
    let env = TestEnv::new();
    let server = start(&env);
    let mut c = server.client("payments").await;
    let t = unix_now();
    // A window whose end is before its start is refused.
    let e = c
        .put_secret(PutSecretRequest {
            not_before_unix: Some(t + 100),
            expires_at_unix: Some(t + 50),
            ..put("payments/db/window", b"x")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Not yet valid: two seconds ahead (whole seconds; one could already be now).
    c.put_secret(PutSecretRequest {
        not_before_unix: Some(t + 2),
        ..put("payments/db/window", b"staged")
    })
    .await
    .unwrap();
    let e = c.get_secret(get("payments/db/window")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("not valid before"), "{}", e.message());
    assert!(e.message().contains('T') && e.message().contains('Z'));
    // reader may read payments/db: told the same; ops may only list, stranger nothing:
    // NOT_FOUND, as for an absent name.
    assert_eq!(
        code_of(&server, "reader", "payments/db/window", 0).await,
        Code::FailedPrecondition
    );
    for stem in ["ops", "stranger"] {
        assert_eq!(
            code_of(&server, stem, "payments/db/window", 1).await,
            Code::NotFound,
            "{stem}"
        );
    }
    assert!(
        until(Duration::from_secs(10), async || {
            code_of(&server, "payments", "payments/db/window", 1).await == Code::Ok
        })
        .await,
        "the staged version was never served"
    );

    // Expiring: served until its time, then refused saying when.
    let t = unix_now();
    c.put_secret(PutSecretRequest {
        expires_at_unix: Some(t + 2),
        ..put("payments/db/window", b"short")
    })
    .await
    .unwrap();
    assert!(
        until(Duration::from_secs(10), async || {
            code_of(&server, "payments", "payments/db/window", 2).await == Code::FailedPrecondition
        })
        .await,
        "the expired version was still served"
    );
    let e = c.get_secret(get("payments/db/window")).await.unwrap_err();
    assert!(e.message().contains("expired at"), "{}", e.message());
    for stem in ["ops", "stranger"] {
        assert_eq!(
            code_of(&server, stem, "payments/db/window", 2).await,
            Code::NotFound,
            "{stem}"
        );
    }
    // The earlier version is still served by number.
    let got = c.get_secret(get_at("payments/db/window", 1)).await.unwrap();
    assert_eq!(got.into_inner().value, b"staged");
    let d = c
        .describe_secret(DescribeSecretRequest {
            name: "payments/db/window".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.versions[0].not_before_unix.is_some() && !d.versions[0].not_yet_valid);
    assert_eq!(d.versions[1].expires_at_unix, Some(t + 2));
    assert!(d.versions[1].expired);
}

/// The versions `payments/kept` keeps, and its max_versions.
async fn versions(c: &mut SecretServiceClient<Channel>) -> (Vec<u64>, u32) {
    let d = c
        .describe_secret(DescribeSecretRequest {
            name: "payments/kept".into(),
        })
        .await
        .unwrap()
        .into_inner();
    (
        d.versions.iter().map(|v| v.version).collect(),
        d.max_versions,
    )
}

#[tokio::test]
async fn max_versions_keeps_only_the_newest() {
    let env = TestEnv::new();
    let server = start(&env);
    let mut c = server.client("payments").await;
    for i in 1..=4 {
        c.put_secret(put("payments/kept", format!("v{i}").as_bytes()))
            .await
            .unwrap();
    }
    c.put_secret(PutSecretRequest {
        max_versions: Some(2),
        ..put("payments/kept", b"v5")
    })
    .await
    .unwrap();
    assert_eq!(versions(&mut c).await, (vec![4, 5], 2));
    for gone in 1..=3 {
        assert_eq!(
            code_of(&server, "payments", "payments/kept", gone).await,
            Code::NotFound,
            "v{gone}"
        );
    }
    // The setting stays; check-and-set still holds.
    c.put_secret(PutSecretRequest {
        expected_version: Some(5),
        ..put("payments/kept", b"v6")
    })
    .await
    .unwrap();
    let e = c
        .put_secret(PutSecretRequest {
            expected_version: Some(5),
            ..put("payments/kept", b"late")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    assert_eq!(versions(&mut c).await, (vec![5, 6], 2));
    // Back to keeping every version.
    c.put_secret(PutSecretRequest {
        max_versions: Some(0),
        ..put("payments/kept", b"v7")
    })
    .await
    .unwrap();
    c.put_secret(put("payments/kept", b"v8")).await.unwrap();
    assert_eq!(versions(&mut c).await, (vec![5, 6, 7, 8], 0));
    let got = c.get_secret(get_at("payments/kept", 5)).await.unwrap();
    assert_eq!(got.into_inner().value, b"v5");
    drop(c);
    server.stop();
    // The store's commitment followed the destroyed versions: no alarm at the next start.
    let server = start(&env);
    let status = server
        .admin("alice")
        .await
        .status(strongroom::proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.store_rollback.is_empty(), "{status:?}");
}

#[tokio::test]
async fn what_expires_soon_is_listed_and_reported() {
    let env = TestEnv::new();
    let server = start(&env);
    // Through the CLI: --expires-at takes a duration or an RFC 3339 time.
    let cli_put = |name: &str, flags: &[&str]| {
        let mut cmd = env.cli(&server, "payments");
        cmd.arg("put").arg(name).args(flags);
        crate::common::run_with_stdin(&mut cmd, b"v").assert_ok();
    };
    cli_put("payments/soon", &["--expires-at", "3d"]);
    cli_put("payments/later", &["--expires-at", "30d"]);
    cli_put("payments/never", &[]);
    let at = strongroom::when::rfc3339(unix_now() + 5 * 86_400);
    cli_put(
        "payments/db/soon",
        &["--expires-at", &at, "--not-before", "1h"],
    );
    cli_put("payments/later", &[]);

    let out = crate::common::Output::of(env.cli(&server, "payments").args([
        "list",
        "payments",
        "--expiring-within",
        "7d",
    ]));
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    assert!(lines[0].starts_with("payments/db/soon"), "{}", out.stdout);
    assert!(lines[1].starts_with("payments/soon"), "{}", out.stdout);
    let bad = crate::common::Output::of(env.cli(&server, "payments").args([
        "list",
        "--expiring-within",
        "soon",
    ]));
    assert_eq!(bad.code, 1, "{}", bad.stderr);

    // The RPC: names and their expiry; reader sees only what it may list (nothing).
    let mut c = server.client("payments").await;
    let page = c
        .list_secrets(ListSecretsRequest {
            prefix: "payments".into(),
            expiring_within_seconds: Some(7 * 86_400),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.names, vec!["payments/db/soon", "payments/soon"]);
    assert_eq!(page.expiring.len(), 2);
    assert!(page.expiring.iter().all(|e| e.expires_at_unix > unix_now()));
    let ops = server
        .client("ops")
        .await
        .list_secrets(ListSecretsRequest {
            prefix: "payments/db".into(),
            expiring_within_seconds: Some(7 * 86_400),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ops.names, vec!["payments/db/soon"]);

    // The officers' report, over the RPC and the admin tool.
    let report = server
        .admin("alice")
        .await
        .report_expiring(ReportExpiringRequest {
            within_seconds: 7 * 86_400,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = report.secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["payments/db/soon", "payments/soon"]);
    let out = crate::common::Output::of(
        env.admin_cli(&server, "alice")
            .args(["report", "expiring", "--within", "7d"]),
    );
    out.assert_ok();
    assert!(out.stdout.contains("payments/soon"), "{}", out.stdout);
    assert!(!out.stdout.contains("payments/later"), "{}", out.stdout);
    let out = crate::common::Output::of(
        env.admin_cli(&server, "alice")
            .args(["report", "expiring", "--within", "40d"]),
    );
    out.assert_ok();
    // payments/later's latest version has no expiry any more.
    assert!(!out.stdout.contains("payments/later"), "{}", out.stdout);
    // Not an officer: refused.
    let e = server
        .admin("mallory")
        .await
        .report_expiring(ReportExpiringRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}
