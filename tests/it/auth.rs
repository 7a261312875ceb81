//! Authentication and authorisation: who may reach the service, and what each identity may
//! see. A name outside the caller's grants must be indistinguishable from an absent one.

use tonic::Code;

use crate::common::TestEnv;
use crate::common::{get, list, put};
use strongroom::proto::{DeleteSecretRequest, DescribeSecretRequest};

/// A client whose certificate the server must refuse: either the handshake fails or the
/// first call does; never a successful answer.
async fn assert_refused(server: &crate::common::Server, stem: Option<&str>) {
    let client = server.try_client(stem).await;
    let Ok(mut client) = client else {
        return;
    };
    let r = client.get_secret(get("payments/db/password")).await;
    let e = r.expect_err("a client without a valid certificate got an answer");
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        ),
        "unexpected status for {stem:?}: {e:?}"
    );
    let r = client.put_secret(put("payments/evil", b"x")).await;
    assert!(r.is_err());
}

#[tokio::test]
async fn clients_without_a_certificate_from_the_client_ca_are_refused() {
    let env = TestEnv::new();
    let server = env.start();
    let mut ok = server.client("payments").await;
    ok.put_secret(put("payments/db/password", b"v"))
        .await
        .unwrap();

    assert_refused(&server, None).await;
    assert_refused(&server, Some("foreign")).await;

    // A plaintext HTTP/2 connection gets nothing either.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut c = strongroom::proto::secret_service_client::SecretServiceClient::new(channel);
        assert!(c.get_secret(get("payments/db/password")).await.is_err());
    }
    // Nothing the refused clients tried was stored.
    let e = ok.get_secret(get("payments/evil")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn a_certificate_without_an_identity_is_unauthenticated() {
    let env = TestEnv::new();
    // A client certificate from the right CA, but with no SAN: re-issue it from the client CA
    // the fixture wrote, which needs the CA key; build a fresh PKI instead.
    let ca = strongroom_devpki::DevCa::new("client CA with anonymous client").unwrap();
    std::fs::write(env.pki.join("client-ca.pem"), ca.cert_pem()).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let anon = ca.sign(params, "anonymous").unwrap();
    std::fs::write(env.pki.join("anon.pem"), &anon.cert_pem).unwrap();
    std::fs::write(env.pki.join("anon-key.pem"), &anon.key_pem).unwrap();
    let named = ca.issue_client(crate::common::PAYMENTS).unwrap();
    std::fs::write(env.pki.join("payments.pem"), &named.cert_pem).unwrap();
    std::fs::write(env.pki.join("payments-key.pem"), &named.key_pem).unwrap();

    let server = env.start();
    let mut c = server.client("anon").await;
    let e = c.get_secret(get("payments/x")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // The same CA's named client works.
    let mut p = server.client("payments").await;
    p.put_secret(put("payments/x", b"v")).await.unwrap();
}

#[tokio::test]
async fn policy_matrix() {
    let env = TestEnv::new();
    let server = env.start();
    let mut owner = server.client("payments").await;
    for n in ["payments/db/password", "payments/api/key"] {
        owner.put_secret(put(n, b"v")).await.unwrap();
    }
    let mut reader = server.client("reader").await;
    let mut ops = server.client("ops").await;
    let mut stranger = server.client("stranger").await;

    // reader: read under payments/db only; nothing else.
    assert_eq!(
        reader
            .get_secret(get("payments/db/password"))
            .await
            .unwrap()
            .into_inner()
            .value,
        b"v"
    );
    assert_eq!(
        reader
            .get_secret(get("payments/api/key"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        reader
            .put_secret(put("payments/db/password", b"w"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        reader
            .delete_secret(DeleteSecretRequest {
                name: "payments/db/password".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert!(
        reader
            .list_secrets(list("payments"))
            .await
            .unwrap()
            .into_inner()
            .names
            .is_empty()
    );

    // ops: lists every name, reads none.
    let names = ops.list_secrets(list("")).await.unwrap().into_inner().names;
    assert_eq!(names, vec!["payments/api/key", "payments/db/password"]);
    assert_eq!(
        ops.get_secret(get("payments/db/password"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        ops.describe_secret(DescribeSecretRequest {
            name: "payments/db/password".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );

    // stranger (valid certificate, no grants): nothing, and nothing to learn.
    assert!(
        stranger
            .list_secrets(list(""))
            .await
            .unwrap()
            .into_inner()
            .names
            .is_empty()
    );
    assert_eq!(
        stranger
            .put_secret(put("payments/x", b"v"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        stranger
            .put_secret(put("stranger/own", b"v"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // The write that was refused left nothing behind; the secret is unchanged.
    let d = owner
        .describe_secret(DescribeSecretRequest {
            name: "payments/db/password".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.latest_version, 1);
}

#[tokio::test]
async fn forbidden_names_look_exactly_like_absent_ones() {
    let env = TestEnv::new();
    let server = env.start();
    let mut owner = server.client("payments").await;
    owner
        .put_secret(put("payments/api/key", b"v"))
        .await
        .unwrap();

    for stem in ["reader", "stranger", "ops"] {
        let mut c = server.client(stem).await;
        let present = c.get_secret(get("payments/api/key")).await.unwrap_err();
        let absent = c.get_secret(get("payments/api/nothing")).await.unwrap_err();
        assert_eq!(present.code(), Code::NotFound, "{stem}");
        assert_eq!(
            (present.code(), present.message()),
            (absent.code(), absent.message()),
            "{stem}"
        );
        let present = c
            .describe_secret(DescribeSecretRequest {
                name: "payments/api/key".into(),
            })
            .await
            .unwrap_err();
        let absent = c
            .describe_secret(DescribeSecretRequest {
                name: "payments/api/nothing".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (present.code(), present.message()),
            (absent.code(), absent.message()),
            "{stem}"
        );
        let present = c
            .delete_secret(DeleteSecretRequest {
                name: "payments/api/key".into(),
            })
            .await
            .unwrap_err();
        let absent = c
            .delete_secret(DeleteSecretRequest {
                name: "payments/api/nothing".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (present.code(), present.message()),
            (absent.code(), absent.message()),
            "{stem}"
        );
    }
    // Still there after all the refused deletes.
    owner.get_secret(get("payments/api/key")).await.unwrap();
}
