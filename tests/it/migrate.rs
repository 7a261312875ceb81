//! `strongroom-admin store migrate`: a sled store moved onto etcd is the same store (every
//! secret, the deleted ones still deleted, no rollback alarm), a half-migrated target is
//! refused by the service, and a target already in use is never overwritten.

use tonic::Code;

use crate::common::{Etcd, POLICY, TestEnv, get, put, skip_on_etcd};

/// Secrets written before the move: enough to span several pages of the copy.
const SECRETS: usize = 300;

#[tokio::test]
async fn a_sled_store_moves_to_etcd_whole_and_a_half_migrated_target_is_refused() {
    if skip_on_etcd("the source of this migration is a sled store") {
        return;
    }
    let mut env = TestEnv::new();
    let server = env.start();
    let mut client = server.client("payments").await;
    for i in 0..SECRETS {
        let name = format!("payments/moved/{i:04}");
        client
            .put_secret(put(&name, name.as_bytes()))
            .await
            .unwrap();
    }
    client
        .put_secret(put("payments/moved/0000", b"second version"))
        .await
        .unwrap();
    client
        .delete_secret(strongroom::proto::DeleteSecretRequest {
            name: "payments/moved/0001".into(),
        })
        .await
        .unwrap();
    server.stop();

    // From here on the tests' configuration points at etcd.
    let etcd = Etcd::start(env.dir.path(), &env.pki);
    let to = format!("etcd:{}", etcd.url);
    let from = format!("sled:{}", env.store.display());
    env.etcd = Some(etcd);
    let config = env.config(POLICY);
    let config = config.to_str().unwrap();
    let migrate = |extra: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_strongroom-admin"));
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
            .env("STRONGROOM_PKCS11_MODULE", &env.module)
            .env("STRONGROOM_TOKEN", &env.label)
            .env("STRONGROOM_USER_PIN", &env.user_pin)
            .args([
                "store", "migrate", "--config", config, "--from", &from, "--to", &to,
            ]);
        crate::common::Output::of(&mut cmd)
    };

    // A migration that stops half way (as a crash would) leaves a target the service refuses.
    let stopped = migrate(&[("STRONGROOM_TEST_MIGRATE_STOP_AFTER", "256")]);
    assert_eq!(stopped.code, 3, "{}", stopped.stderr);
    let (code, log) = env.refused_start(&env.config(POLICY), &[]);
    assert_ne!(code, Some(0));
    assert!(log.contains("half-migrated"), "{log}");

    // Run again: the target is emptied and copied whole, then verified.
    let done = migrate(&[]);
    done.assert_ok();
    assert!(done.stdout.contains("verified"), "{}", done.stdout);

    let server = env.start();
    let mut client = server.client("payments").await;
    for i in 2..SECRETS {
        let name = format!("payments/moved/{i:04}");
        let got = client.get_secret(get(&name)).await.unwrap().into_inner();
        assert_eq!(got.value, name.as_bytes());
    }
    let latest = client
        .get_secret(get("payments/moved/0000"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (latest.value.as_slice(), latest.version),
        (&b"second version"[..], 2)
    );
    let deleted = client
        .get_secret(get("payments/moved/0001"))
        .await
        .unwrap_err();
    assert_eq!(deleted.code(), Code::NotFound, "{deleted:?}");
    // The store goes on from where it was: a new write on etcd works and reads back.
    client
        .put_secret(put("payments/moved/after", b"on etcd"))
        .await
        .unwrap();
    server.stop();

    // The target now holds a store: a second migration into it is refused, nothing touched.
    let again = migrate(&[]);
    assert_ne!(again.code, 0);
    assert!(again.stderr.contains("not empty"), "{}", again.stderr);
    let server = env.start();
    let got = server
        .client("payments")
        .await
        .get_secret(get("payments/moved/after"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, b"on etcd");
    server.stop();
}
