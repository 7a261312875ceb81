//! SecretService round trips against a real token, real mTLS and a real store.

use std::time::Duration;

use tonic::Code;

use crate::common::TestEnv;
use crate::common::{get_at as get, put};
use strongroom::proto::{
    DeleteSecretRequest, DescribeSecretRequest, ListSecretsRequest, PutSecretRequest,
};

#[tokio::test]
async fn put_get_versions_describe_list_delete() {
    let env = TestEnv::new();
    let server = env.start();
    let mut c = server.client("payments").await;

    let v1 = c
        .put_secret(put("payments/db/password", b"first"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((v1.version, v1.master_key_version), (1, 1));
    let v2 = c
        .put_secret(put("payments/db/password", b"second"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.version, 2);

    let latest = c
        .get_secret(get("payments/db/password", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (latest.version, latest.value.as_slice()),
        (2, &b"second"[..])
    );
    let first = c
        .get_secret(get("payments/db/password", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.value, b"first");
    let missing = c
        .get_secret(get("payments/db/password", 3))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Binary values and the empty value round-trip exactly.
    let binary: Vec<u8> = (0..=255u8).collect();
    c.put_secret(put("payments/bin", &binary)).await.unwrap();
    assert_eq!(
        c.get_secret(get("payments/bin", 0))
            .await
            .unwrap()
            .into_inner()
            .value,
        binary
    );
    c.put_secret(put("payments/empty", b"")).await.unwrap();
    assert!(
        c.get_secret(get("payments/empty", 0))
            .await
            .unwrap()
            .into_inner()
            .value
            .is_empty()
    );

    let d = c
        .describe_secret(DescribeSecretRequest {
            name: "payments/db/password".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.latest_version, 2);
    let versions: Vec<u64> = d.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, vec![1, 2]);
    assert!(
        d.versions
            .iter()
            .all(|v| v.created_by == crate::common::PAYMENTS)
    );
    assert!(
        d.versions
            .iter()
            .all(|v| v.mechanism == "aes-gcm-envelope-v1")
    );

    let names = c
        .list_secrets(ListSecretsRequest {
            prefix: "payments".into(),
            page_size: 0,
            page_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .names;
    assert_eq!(
        names,
        vec!["payments/bin", "payments/db/password", "payments/empty"]
    );

    let del = c
        .delete_secret(DeleteSecretRequest {
            name: "payments/db/password".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(del.versions_destroyed, 2);
    for v in [0, 1, 2] {
        let e = c
            .get_secret(get("payments/db/password", v))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "version {v} after delete");
    }
    let again = c
        .delete_secret(DeleteSecretRequest {
            name: "payments/db/password".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);

    // Versions are never reused after a delete.
    let v3 = c
        .put_secret(put("payments/db/password", b"third"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v3.version, 3);
}

#[tokio::test]
async fn check_and_set() {
    let env = TestEnv::new();
    let server = env.start();
    let mut c = server.client("payments").await;
    let cas = |expected: u64, value: &[u8]| PutSecretRequest {
        expected_version: Some(expected),
        ..put("payments/cas", value)
    };
    // 0: must not exist.
    assert_eq!(
        c.put_secret(cas(0, b"a"))
            .await
            .unwrap()
            .into_inner()
            .version,
        1
    );
    let e = c.put_secret(cas(0, b"b")).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    assert!(
        e.message().contains("current version is 1"),
        "{}",
        e.message()
    );
    assert_eq!(
        c.put_secret(cas(1, b"c"))
            .await
            .unwrap()
            .into_inner()
            .version,
        2
    );
    let stale = c.put_secret(cas(1, b"d")).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    // The losing writes stored nothing.
    let latest = c
        .get_secret(get("payments/cas", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((latest.version, latest.value.as_slice()), (2, &b"c"[..]));
}

#[tokio::test]
async fn concurrent_writers_get_distinct_versions_and_one_cas_winner() {
    let env = TestEnv::new();
    let server = env.start();
    let c = server.client("payments").await;

    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.put_secret(put("payments/race", &[i]))
                .await
                .map(|r| r.into_inner().version)
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.unwrap().unwrap());
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=16).collect::<Vec<u64>>());

    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.put_secret(PutSecretRequest {
                expected_version: Some(0),
                ..put("payments/once", &[i])
            })
            .await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.into_inner().version, 1);
                won += 1;
            }
            Err(e) => assert_eq!(e.code(), Code::Aborted),
        }
    }
    assert_eq!(won, 1);
}

#[tokio::test]
async fn pagination_walks_every_name_once() {
    let env = TestEnv::new();
    let server = env.start();
    let mut c = server.client("payments").await;
    let mut want = Vec::new();
    for i in 0..25 {
        let n = format!("payments/p/{i:03}");
        c.put_secret(put(&n, b"x")).await.unwrap();
        want.push(n);
    }
    let mut got = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_secrets(ListSecretsRequest {
                prefix: "payments/p/".into(),
                page_size: 10,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.names.len() <= 10);
        got.extend(page.names);
        pages += 1;
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(got, want);
}

#[tokio::test]
async fn expired_versions_are_not_served() {
    let env = TestEnv::new();
    let server = env.start();
    let mut c = server.client("payments").await;
    let now = crate::common::unix_now();
    c.put_secret(put("payments/ttl", b"old")).await.unwrap();
    // Two seconds ahead: one second could already be "now" when the service checks it.
    c.put_secret(PutSecretRequest {
        expires_at_unix: Some(now + 2),
        ..put("payments/ttl", b"short-lived")
    })
    .await
    .unwrap();
    let past = c
        .put_secret(PutSecretRequest {
            expires_at_unix: Some(now - 10),
            ..put("payments/ttl", b"x")
        })
        .await
        .unwrap_err();
    assert_eq!(past.code(), Code::InvalidArgument);

    // Wait for the expiry to pass (the service compares whole seconds).
    tokio::time::sleep(Duration::from_millis(3100)).await;
    // A caller who may read the name is told why (tests/it/lifecycle.rs has the rest).
    let e = c.get_secret(get("payments/ttl", 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("expired at"), "{}", e.message());
    let e = c.get_secret(get("payments/ttl", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        c.get_secret(get("payments/ttl", 1))
            .await
            .unwrap()
            .into_inner()
            .value,
        b"old"
    );
    let d = c
        .describe_secret(DescribeSecretRequest {
            name: "payments/ttl".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let expired: Vec<bool> = d.versions.iter().map(|v| v.expired).collect();
    assert_eq!(expired, vec![false, true]);
}

#[tokio::test]
async fn health_follows_the_master_key_and_reflection_lists_services() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    // A token without a master key: the service starts, says NOT_SERVING, refuses writes.
    let env = TestEnv::with_token();
    let server = env.start();
    let channel = server.try_client(Some("payments")).await.unwrap();
    let mut c = channel.clone();
    let e = c.put_secret(put("payments/x", b"v")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("key generate"), "{}", e.message());

    let tls_channel = server
        .channel(&server.addr, Some("payments"))
        .await
        .unwrap();
    let mut health = HealthClient::new(tls_channel.clone());
    let status = |s: i32| ServingStatus::try_from(s).unwrap();
    let check = HealthCheckRequest {
        service: "strongroom.v1.SecretService".into(),
    };
    let r = health.check(check.clone()).await.unwrap().into_inner();
    assert_eq!(status(r.status), ServingStatus::NotServing);

    // An officer generates a master key; the service notices without a restart.
    env.admin(&["key", "generate"]).assert_ok();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = health.check(check.clone()).await.unwrap().into_inner();
        if status(r.status) == ServingStatus::Serving {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health never became SERVING"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.put_secret(put("payments/x", b"v")).await.unwrap();

    // Reflection (v1) lists the services, so grpcurl works.
    let names = crate::common::reflected_services(tls_channel).await;
    assert!(
        names.contains(&"strongroom.v1.SecretService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}
