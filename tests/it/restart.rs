//! Durability: every acknowledged write survives a crash of `strongroomd`.

use crate::common::TestEnv;
use strongroom::proto::{GetSecretRequest, PutSecretRequest};

#[tokio::test]
async fn a_killed_service_serves_every_acknowledged_secret_after_restart() {
    let env = TestEnv::new();
    let mut acknowledged = Vec::new();
    for round in 0..3 {
        let mut server = env.start();
        let mut c = server.client("payments").await;
        // Everything acknowledged in earlier rounds is there.
        for (name, value) in &acknowledged {
            let got = c
                .get_secret(GetSecretRequest {
                    name: String::clone(name),
                    version: 0,
                })
                .await
                .unwrap_or_else(|e| panic!("round {round}: {name} lost: {e:?}"))
                .into_inner();
            assert_eq!(&got.value, value, "round {round}: {name}");
        }
        for i in 0..30 {
            let name = format!("payments/r{round}/{i}");
            let value = format!("value {round}/{i}").into_bytes();
            c.put_secret(PutSecretRequest {
                name: name.clone(),
                value: value.clone(),
                expected_version: None,
                expires_at_unix: None,
                protection: 0,
                ..Default::default()
            })
            .await
            .unwrap();
            acknowledged.push((name, value));
        }
        // SIGKILL: no graceful shutdown, no final flush.
        server.child.kill().unwrap();
        server.child.wait().unwrap();
    }
    let server = env.start();
    let mut c = server.client("payments").await;
    for (name, value) in &acknowledged {
        let got = c
            .get_secret(GetSecretRequest {
                name: name.clone(),
                version: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&got.value, value);
    }
    assert_eq!(acknowledged.len(), 90);
}
