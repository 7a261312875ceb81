//! The token implementation under test (`STRONGROOM_TEST_TOKEN`: SoftHSM2 or Kryoptic) and
//! the places where the two differ: session copies of master keys, and a device error that is
//! a failed integrity check (Kryoptic) versus one that is a failing device.

use std::time::{Duration, Instant};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::Attribute;
use cryptoki::types::AuthPin;
use tonic::Code;

use crate::common::{POLICY, Server, TestEnv, Token, get, put};
use strongroom::hsm::{self, TokenSelector, keys};
use strongroom::proto::Protection;

/// The suite runs on the token `STRONGROOM_TEST_TOKEN` names: the module reports itself as
/// that implementation, so a Kryoptic pass cannot silently be a second SoftHSM2 pass.
#[test]
fn the_suite_runs_on_the_token_it_names() {
    let env = TestEnv::with_token();
    let out = env.admin(&["--format", "json", "token", "list"]);
    out.assert_ok();
    let tokens: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let mine = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["label"] == env.label.as_str())
        .unwrap_or_else(|| panic!("token {} not listed: {tokens}", env.label));
    let model = mine["model"].as_str().unwrap().to_lowercase();
    let expected = match env.token {
        Token::SoftHsm2 => "softhsm",
        Token::Kryoptic => "kryoptic",
    };
    assert!(
        model.contains(expected),
        "STRONGROOM_TEST_TOKEN names {} but the module reports model {model:?}",
        env.token.name()
    );
    println!("token under test: {} ({model})", env.token.name());
}

/// The configuration with `hsm.key_copy = "session"` and the default policy.
fn session_copy_config(env: &TestEnv) -> std::path::PathBuf {
    let config = env.config(POLICY);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "request_timeout_ms = 5000",
        "request_timeout_ms = 5000\nkey_copy = \"session\"",
    );
    assert!(text.contains("key_copy = \"session\""));
    std::fs::write(&config, text).unwrap();
    config
}

/// Puts and reads back a value under each protection.
async fn round_trips(server: &Server) {
    let mut c = server.client("payments").await;
    for protection in [Protection::Envelope, Protection::HsmOnly] {
        let name = format!("payments/copy/{}", protection.as_str_name());
        c.put_secret(strongroom::proto::PutSecretRequest {
            protection: protection as i32,
            ..put(&name, b"served")
        })
        .await
        .unwrap();
        let got = c.get_secret(get(&name)).await.unwrap().into_inner();
        assert_eq!(got.value, b"served");
    }
}

const REFUSED: &str = "the token refuses a session copy of this master key; using the token object";

/// `hsm.key_copy = "session"` with master keys as `key generate` makes them (CKA_COPYABLE
/// true, CKA_MODIFIABLE false): SoftHSM2 refuses the copy (CKR_ATTRIBUTE_READ_ONLY, its
/// reading of a template on a read-only key) and the service says so and serves from the token
/// object; Kryoptic makes the copy, and the service serves from it.
#[tokio::test]
async fn session_copies_serve_where_the_token_allows_them() {
    let env = TestEnv::new();
    let server = env.start_with(&session_copy_config(&env), &[]);
    round_trips(&server).await;
    match env.token {
        Token::SoftHsm2 => server.wait_for_log(REFUSED, 1, Duration::from_secs(5)),
        Token::Kryoptic => assert!(
            !server.log_text().contains(REFUSED),
            "Kryoptic refused the copy: {}",
            server.log_text()
        ),
    }
}

/// A master key that forbids copies (CKA_COPYABLE false, as another tool may make one): both
/// tokens refuse C_CopyObject with CKR_ACTION_PROHIBITED, and the service falls back to the
/// token object instead of failing to start.
#[tokio::test]
async fn a_refused_session_copy_falls_back_to_the_token_object() {
    let env = TestEnv::with_token();
    {
        let pkcs11 = hsm::load_module(&env.module).unwrap();
        let slot = hsm::find_token(&pkcs11, &TokenSelector::Label(env.label.clone())).unwrap();
        let session = pkcs11.open_rw_session(slot).unwrap();
        hsm::login(&session, &AuthPin::new(env.user_pin.clone().into())).unwrap();
        let template: Vec<Attribute> = keys::template(1)
            .into_iter()
            .map(|a| match a {
                Attribute::Copyable(_) => Attribute::Copyable(false),
                a => a,
            })
            .collect();
        let key = session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .unwrap();
        let copy = session.copy_object(key, &[Attribute::Token(false)]);
        assert!(
            matches!(copy, Err(CkError::Pkcs11(RvError::ActionProhibited, _))),
            "{} answered {copy:?} to a copy of an uncopyable key",
            env.token.name()
        );
    }
    let server = env.start_with(&session_copy_config(&env), &[]);
    round_trips(&server).await;
    server.wait_for_log(REFUSED, 1, Duration::from_secs(5));
}

/// A device that fails every call is not mistaken for a tampered record: strict (hsm-only)
/// reads answer UNAVAILABLE, never DATA_LOSS, and serve the value once the device recovers.
/// (On Kryoptic, a CKR_DEVICE_ERROR from C_UnwrapKey is its answer to a failed integrity
/// check, and the fault module forwards Kryoptic's identity: there the injected errors read
/// as integrity failures, so this test is about the other tokens.)
#[tokio::test]
async fn a_failing_device_is_unavailable_not_data_loss() {
    if crate::common::skip_on_kryoptic(
        "Kryoptic reports a failed AES-KW integrity check as CKR_DEVICE_ERROR, so an \
         injected device error on unwrap reads as one there",
    ) {
        return;
    }
    let env = TestEnv::new();
    let (server, control) = env.start_behind_faults(POLICY);
    let mut c = server.client("payments").await;
    c.put_secret(strongroom::proto::PutSecretRequest {
        protection: Protection::HsmOnly as i32,
        ..put("payments/strict/device", b"strict value")
    })
    .await
    .unwrap();

    control.device_error_rate(1.0).unwrap();
    for _ in 0..3 {
        let e = c
            .get_secret(get("payments/strict/device"))
            .await
            .expect_err("a failing device served a value");
        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    }
    control.device_error_rate(0.0).unwrap();
    // The pool repairs its sessions in the background: await the first good read.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.get_secret(get("payments/strict/device")).await {
            Ok(got) => {
                assert_eq!(got.into_inner().value, b"strict value");
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
                assert!(Instant::now() < deadline, "no recovery: {}", e.message());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
