//! Limits and bad input: each gets a clear status naming the limit, nothing is stored, and
//! the service keeps serving.

use tonic::Code;

use crate::common::TestEnv;
use strongroom::proto::{GetSecretRequest, ListSecretsRequest, PutSecretRequest};

fn put(name: &str, value: Vec<u8>) -> PutSecretRequest {
    PutSecretRequest {
        name: name.into(),
        value,
        expected_version: None,
        expires_at_unix: None,
        protection: 0,
        ..Default::default()
    }
}

#[tokio::test]
async fn sizes_names_and_pages_are_bounded() {
    let env = TestEnv::new();
    let config = env.config(&format!(
        "[limits]\nmax_value_bytes = 1024\nmax_name_bytes = 64\nmax_page_size = 5\n{}",
        crate::common::POLICY
    ));
    let server = env.start_with(&config, &[]);
    let mut c = server.client("payments").await;

    // Exactly at the limit is fine; one byte over is INVALID_ARGUMENT naming the limit.
    c.put_secret(put("payments/max", vec![7; 1024]))
        .await
        .unwrap();
    let e = c
        .put_secret(put("payments/over", vec![7; 1025]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("max_value_bytes (1024)"),
        "{}",
        e.message()
    );
    // Over the request's decode limit (max_value_bytes plus a few KiB for the name and other
    // fields): OUT_OF_RANGE naming the limit, before the message is decoded.
    let e = c
        .put_secret(put("payments/over", vec![7; 2 << 20]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    assert!(
        e.message().contains("max_value_bytes (1024)"),
        "{}",
        e.message()
    );
    // Beyond the transport cap (4 MiB) tonic refuses the message itself, unread.
    let e = c
        .put_secret(put("payments/huge", vec![7; 5 << 20]))
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );

    let long = format!("payments/{}", "n".repeat(64));
    let e = c.put_secret(put(&long, b"v".to_vec())).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("max_name_bytes (64)"),
        "{}",
        e.message()
    );

    for bad in [
        "",
        "/abs",
        "trailing/",
        "a//b",
        "../etc",
        "sp ace",
        "tab\t",
        "nul\0x",
        "ünï",
    ] {
        let e = c.put_secret(put(bad, b"v".to_vec())).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        let e = c
            .get_secret(GetSecretRequest {
                name: bad.into(),
                version: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
    }

    let list = |page_size: u32, page_token: &str| ListSecretsRequest {
        prefix: "payments".into(),
        page_size,
        page_token: page_token.into(),
        ..Default::default()
    };
    let e = c.list_secrets(list(6, "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("max_page_size (5)"), "{}", e.message());
    let e = c.list_secrets(list(u32::MAX, "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c.list_secrets(list(5, "not-a-token")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .list_secrets(ListSecretsRequest {
            prefix: "a//b".into(),
            page_size: 1,
            page_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Nothing was stored by the refused requests, and the service still serves.
    let names = c
        .list_secrets(list(5, ""))
        .await
        .unwrap()
        .into_inner()
        .names;
    assert_eq!(names, vec!["payments/max"]);
    let got = c
        .get_secret(GetSecretRequest {
            name: "payments/max".into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, vec![7; 1024]);
}

#[tokio::test]
async fn wrap_budget_forces_a_rotation() {
    let env = TestEnv::new();
    let config = env.config(&format!("{}\n", crate::common::POLICY));
    // Limit the wraps per master key to 3 through the [hsm] table.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "request_timeout_ms = 5000",
        "request_timeout_ms = 5000\nmax_wraps_per_key = 3",
    );
    std::fs::write(&config, text).unwrap();
    let server = env.start_with(&config, &[]);
    let mut c = server.client("payments").await;
    for i in 0..3 {
        c.put_secret(put(&format!("payments/w{i}"), b"v".to_vec()))
            .await
            .unwrap();
    }
    let e = c
        .put_secret(put("payments/w3", b"v".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("rotate"), "{}", e.message());
    // Reads still work.
    c.get_secret(GetSecretRequest {
        name: "payments/w0".into(),
        version: 0,
    })
    .await
    .unwrap();

    // After an officer generates the next master key (and the service is restarted to pick it
    // up for writes), writes resume under version 2.
    server.stop();
    env.admin(&["key", "generate"]).assert_ok();
    let server = env.start_with(&config, &[]);
    let mut c = server.client("payments").await;
    let r = c
        .put_secret(put("payments/w3", b"v".to_vec()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.master_key_version, 2);
    // Records sealed under version 1 still open.
    c.get_secret(GetSecretRequest {
        name: "payments/w1".into(),
        version: 0,
    })
    .await
    .unwrap();
}
