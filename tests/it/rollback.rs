//! Rollback: replacing the store's files with an older copy is detected through the epoch the
//! token remembers, reported to officers, and no secret is served until they accept it.

use tonic::Code;

use crate::common::{TestEnv, files_under};
use strongroom::proto::{
    AcceptStoreStateRequest, ApproveRequest, GetSecretRequest, PutSecretRequest, StatusRequest,
};

fn put(name: &str, value: &[u8]) -> PutSecretRequest {
    PutSecretRequest {
        name: name.into(),
        value: value.to_vec(),
        expected_version: None,
        expires_at_unix: None,
    }
}

fn get(name: &str) -> GetSecretRequest {
    GetSecretRequest {
        name: name.into(),
        version: 0,
    }
}

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
    if crate::common::skip_on_etcd("it restores an older copy of sled's directory") {
        return;
    }
    let env = TestEnv::new();
    let server = env.start_admin();
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/key", b"old value"))
        .await
        .unwrap();
    drop(c);
    server.stop();

    // A backup of the store as it is now.
    let backup = env.dir.path().join("store-backup");
    copy_dir(&env.store, &backup);

    // The secret is rotated after the backup.
    let server = env.start_admin();
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/key", b"new value"))
        .await
        .unwrap();
    drop(c);
    server.stop();

    // Someone with access to the files puts the backup back.
    std::fs::remove_dir_all(&env.store).unwrap();
    copy_dir(&backup, &env.store);

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
