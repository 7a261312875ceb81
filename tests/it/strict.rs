//! Strict mode (`protection = "hsm-only"`): the data key is unwrapped only into a sensitive,
//! non-extractable session object and the value is decrypted inside the token; both
//! protections coexist in one store, and a tampered strict record answers DATA_LOSS.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType};
use cryptoki::types::AuthPin;
use prost::Message;
use tonic::Code;

use crate::common::{ADMIN, Output, POLICY, Server, TestEnv, put, run_with_stdin};
use strongroom::envelope::record_aad_v1 as record_aad;
use strongroom::hsm::{self, HsmError, TokenSelector, keys, strict};
use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom::proto::{DescribeSecretRequest, Protection, SealedRecordV1};
use strongroom::secret::SecretName;

const HSM_ONLY: &str = "aes-kw-hsm-only-v1";
const ENVELOPE: &str = "aes-gcm-envelope-v1";

/// A PutSecret request with a protection.
fn put_as(name: &str, value: &[u8], protection: Protection) -> strongroom::proto::PutSecretRequest {
    strongroom::proto::PutSecretRequest {
        protection: protection as i32,
        ..put(name, value)
    }
}

/// The mechanism the service reports for `name` at `version`.
async fn mechanism_of(
    c: &mut SecretServiceClient<tonic::transport::Channel>,
    name: &str,
    version: u64,
) -> String {
    let d = c
        .describe_secret(DescribeSecretRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    d.versions
        .iter()
        .find(|v| v.version == version)
        .unwrap_or_else(|| panic!("{name} v{version} not described: {d:?}"))
        .mechanism
        .clone()
}

async fn read(c: &mut SecretServiceClient<tonic::transport::Channel>, name: &str) -> Vec<u8> {
    c.get_secret(crate::common::get(name))
        .await
        .unwrap_or_else(|e| panic!("{name}: {e:?}"))
        .into_inner()
        .value
}

/// The same token function the service's workers run (`hsm::strict`), called on a session of
/// the test's own: the unwrapped data key reads back sensitive, non-extractable and a session
/// object while it exists, its value is not handed out, and it is gone once dropped.
#[test]
fn the_unwrapped_data_key_is_a_sensitive_non_extractable_session_object() {
    let env = TestEnv::new();
    let pkcs11 = hsm::load_module(&env.module).unwrap();
    let slot = hsm::find_token(&pkcs11, &TokenSelector::Label(env.label.clone())).unwrap();
    let session = pkcs11.open_ro_session(slot).unwrap();
    hsm::login(&session, &AuthPin::new(env.user_pin.clone().into())).unwrap();
    let (trusted, rejected) = keys::find_trusted(&session).unwrap();
    assert!(rejected.is_empty(), "{rejected:?}");
    let (version, master) = trusted[0];

    let name = SecretName::parse("payments/strict/k", 256).unwrap();
    let aad = record_aad(&name, 1, version);
    let sealed = strict::seal(&session, master, &aad, b"strict value").unwrap();
    assert_eq!(sealed.wrapped_dek.len(), strict::KW_WRAPPED_LEN);
    assert_eq!(sealed.nonce.len(), 12);
    assert_eq!(sealed.ciphertext.len(), b"strict value".len() + 16);

    let key = strict::unwrap_dek(&session, master, &sealed.wrapped_dek).unwrap();
    let handle = key.handle();
    assert_eq!(
        key.security_attributes().unwrap(),
        strict::KeySecurity {
            sensitive: Some(true),
            extractable: Some(false),
            token: Some(false),
        },
        "the unwrapped data key's attributes"
    );
    // get_attributes drops sensitive attributes silently (HSM-NOTES 7): CKA_VALUE is absent.
    let value = session
        .get_attributes(handle, &[AttributeType::Value])
        .unwrap();
    assert!(
        !value.iter().any(|a| matches!(a, Attribute::Value(_))),
        "the token handed out the data key's value"
    );
    // It cannot be wrapped out either, not even under the master key.
    let wrapped_out = session.wrap_key(&cryptoki::mechanism::Mechanism::AesKeyWrap, master, handle);
    assert!(
        matches!(
            wrapped_out,
            Err(CkError::Pkcs11(RvError::KeyUnextractable, _))
        ),
        "{wrapped_out:?}"
    );
    drop(key);
    let gone = session.get_attributes(handle, &[AttributeType::Sensitive]);
    assert!(
        matches!(gone, Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _))),
        "the session object outlived its use: {gone:?}"
    );

    // The full open path gives the value back; another identity's AAD, a flipped bit of the
    // wrapped key or of the ciphertext fail as authentication.
    let opened = strict::open(
        &session,
        master,
        &sealed.wrapped_dek,
        &sealed.nonce,
        &aad,
        &sealed.ciphertext,
    )
    .unwrap();
    assert_eq!(opened.as_slice(), b"strict value");
    let other = record_aad(&name, 2, version);
    let mut bad_wrap = sealed.wrapped_dek.clone();
    bad_wrap[5] ^= 1;
    let mut bad_ct = sealed.ciphertext.clone();
    bad_ct[0] ^= 1;
    for (what, wrapped, aad, ct) in [
        ("other AAD", &sealed.wrapped_dek, &other, &sealed.ciphertext),
        ("wrapped key", &bad_wrap, &aad, &sealed.ciphertext),
        ("ciphertext", &sealed.wrapped_dek, &aad, &bad_ct),
    ] {
        let r = strict::open(&session, master, wrapped, &sealed.nonce, aad, ct);
        assert!(
            matches!(r, Err(HsmError::UnwrapAuthentication)),
            "{what}: {:?}",
            r.map(|_| ())
        );
    }
    // No session object is left behind by any of it.
    let left = session
        .find_objects(&[Attribute::Token(false)])
        .unwrap_or_default();
    assert!(left.is_empty(), "session objects left: {}", left.len());
}

#[tokio::test]
async fn values_round_trip_in_hsm_only_and_both_protections_share_a_store_across_restarts() {
    let env = TestEnv::new();
    let big = vec![0xa5u8; 60 * 1024];
    // (name, value, requested protection, mechanism expected)
    let mut written: Vec<(String, Vec<u8>, String)> = Vec::new();
    {
        // Store default: envelope.
        let server = env.start();
        let mut c = server.client("payments").await;
        let cases: [(&str, &[u8], Protection, &str); 5] = [
            (
                "payments/s/strict",
                b"strict one",
                Protection::HsmOnly,
                HSM_ONLY,
            ),
            ("payments/s/empty", b"", Protection::HsmOnly, HSM_ONLY),
            ("payments/s/big", &big, Protection::HsmOnly, HSM_ONLY),
            (
                "payments/s/default",
                b"default one",
                Protection::Unspecified,
                ENVELOPE,
            ),
            (
                "payments/s/env",
                b"envelope one",
                Protection::Envelope,
                ENVELOPE,
            ),
        ];
        for (name, value, protection, mech) in cases {
            let v = c
                .put_secret(put_as(name, value, protection))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(mechanism_of(&mut c, name, v.version).await, mech, "{name}");
            written.push((name.into(), value.to_vec(), mech.into()));
        }
        for (name, value, _) in &written {
            assert_eq!(&read(&mut c, name).await, value, "{name}");
        }
        // A protection this service does not know is refused, not defaulted.
        let bad = strongroom::proto::PutSecretRequest {
            protection: 7,
            ..put("payments/s/bad", b"x")
        };
        let e = c.put_secret(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("protection"), "{}", e.message());
        server.stop();
    }
    {
        // Restarted with hsm-only as the store's default: everything written before opens,
        // by its own mechanism; new writes follow the new default unless they say otherwise.
        let config = env.config(&format!("protection = \"hsm-only\"\n{POLICY}"));
        let server = env.start_with(&config, &[]);
        let mut c = server.client("payments").await;
        for (name, value, _) in &written {
            assert_eq!(&read(&mut c, name).await, value, "{name} after restart");
        }
        for (name, value, protection, mech) in [
            (
                "payments/s/default2",
                &b"now strict"[..],
                Protection::Unspecified,
                HSM_ONLY,
            ),
            (
                "payments/s/env2",
                &b"still envelope"[..],
                Protection::Envelope,
                ENVELOPE,
            ),
        ] {
            let v = c
                .put_secret(put_as(name, value, protection))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(mechanism_of(&mut c, name, v.version).await, mech, "{name}");
            written.push((name.into(), value.to_vec(), mech.into()));
        }
        // A second version of a strict secret under envelope: each version opens by its own.
        let v2 = c
            .put_secret(put_as(
                "payments/s/strict",
                b"strict two",
                Protection::Envelope,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v2.version, 2);
        assert_eq!(mechanism_of(&mut c, "payments/s/strict", 1).await, HSM_ONLY);
        assert_eq!(mechanism_of(&mut c, "payments/s/strict", 2).await, ENVELOPE);
        let v1 = c
            .get_secret(crate::common::get_at("payments/s/strict", 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v1.value, b"strict one");
        server.stop();
    }
    // Once more, back on the default configuration: every record still opens.
    let server = env.start();
    let mut c = server.client("payments").await;
    for (name, value, mech) in &written {
        if name != "payments/s/strict" {
            assert_eq!(&read(&mut c, name).await, value, "{name} after 2nd restart");
            let latest = c
                .describe_secret(DescribeSecretRequest { name: name.clone() })
                .await
                .unwrap()
                .into_inner()
                .latest_version;
            assert_eq!(&mechanism_of(&mut c, name, latest).await, mech, "{name}");
        }
    }
    assert_eq!(read(&mut c, "payments/s/strict").await, b"strict two");
}

#[tokio::test]
async fn the_cli_puts_with_a_protection() {
    let env = TestEnv::new();
    let server = env.start();
    let put = run_with_stdin(
        env.cli(&server, "payments").args([
            "put",
            "payments/cli/strict",
            "--protection",
            "hsm-only",
        ]),
        b"from-the-cli",
    );
    put.assert_ok();
    let mut c = server.client("payments").await;
    assert_eq!(
        mechanism_of(&mut c, "payments/cli/strict", 1).await,
        HSM_ONLY
    );
    assert_eq!(read(&mut c, "payments/cli/strict").await, b"from-the-cli");
    let bad = Output::of(env.cli(&server, "payments").args([
        "put",
        "payments/cli/strict",
        "--protection",
        "hsm",
    ]));
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    assert!(bad.stderr.contains("hsm-only"), "{}", bad.stderr);
}

/// An edit of a stored record.
type Edit = fn(&mut SealedRecordV1);

/// Applies each edit to the stored record of `(name, version 1)`, on either backend, behind
/// the back of a stopped service.
fn edit_records(env: &TestEnv, edits: &[(String, Edit)]) {
    match &env.etcd {
        None => {
            // One sled handle for every edit: sled releases its file lock from a background
            // thread after the handle is dropped.
            let db = sled::open(&env.store).unwrap();
            for (name, edit) in edits {
                let mut key = vec![b'r'];
                key.extend_from_slice(name.as_bytes());
                key.push(0);
                key.extend_from_slice(&1u64.to_be_bytes());
                let mut r =
                    SealedRecordV1::decode(db.get(&key).unwrap().unwrap().as_ref()).unwrap();
                edit(&mut r);
                db.insert(key, r.encode_to_vec()).unwrap();
            }
            db.flush().unwrap();
            drop(db);
            wait_for_sled_unlocked(&env.store.join("db"));
        }
        Some(etcd) => {
            let stored = etcd.read_prefix(b"strongroom/r");
            for (name, edit) in edits {
                let (key, mut r) = stored
                    .iter()
                    .find_map(|(k, v)| {
                        let r = SealedRecordV1::decode(v.as_slice()).ok()?;
                        (r.name == *name && r.version == 1).then(|| (k.clone(), r))
                    })
                    .unwrap_or_else(|| panic!("no record of {name} v1 in etcd"));
                edit(&mut r);
                etcd.write_raw(&[(key, Some(r.encode_to_vec()))]);
            }
        }
    }
}

/// Waits until nothing holds sled's lock on `db` (the flock sled takes), so that the service
/// started next can open the store.
fn wait_for_sled_unlocked(db: &std::path::Path) {
    use rustix::fs::{FlockOperation, flock};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let file = std::fs::File::open(db).unwrap();
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sled still holds {}",
            db.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[tokio::test]
async fn tampered_hsm_only_records_answer_data_loss() {
    let edits: Vec<(&str, Edit)> = vec![
        ("mechanism: hsm-only -> envelope", |r| r.mechanism = 1),
        ("mechanism: unknown", |r| r.mechanism = 3),
        ("ciphertext: one bit", |r| r.ciphertext[0] ^= 0x01),
        ("ciphertext: tag bit", |r| {
            let last = r.ciphertext.len() - 1;
            r.ciphertext[last] ^= 0x80;
        }),
        ("ciphertext: truncated", |r| r.ciphertext.truncate(8)),
        ("wrapped key: one bit", |r| r.wrapped_dek[9] ^= 0x01),
        ("wrapped key: one byte short", |r| {
            r.wrapped_dek.pop();
        }),
        ("wrapped key: 60 bytes, the envelope's length", |r| {
            r.wrapped_dek = vec![0u8; 60]
        }),
        ("nonce: one bit", |r| r.nonce[0] ^= 0x01),
    ];
    let env = TestEnv::new();
    let server = env.start();
    let mut c = server.client("payments").await;
    let mut names = Vec::new();
    for (i, _) in edits.iter().enumerate() {
        let name = format!("payments/t/strict-{i}");
        c.put_secret(put_as(&name, b"tamper me", Protection::HsmOnly))
            .await
            .unwrap();
        names.push(name);
    }
    // An envelope record relabelled as strict fails too.
    c.put_secret(put_as("payments/t/env", b"envelope", Protection::Envelope))
        .await
        .unwrap();
    c.put_secret(put_as("payments/t/intact", b"intact", Protection::HsmOnly))
        .await
        .unwrap();
    server.stop();

    let mut changes: Vec<(String, Edit)> = edits
        .iter()
        .zip(&names)
        .map(|((_, edit), name)| (name.clone(), *edit))
        .collect();
    changes.push(("payments/t/env".into(), |r| r.mechanism = 2));
    edit_records(&env, &changes);

    let server: Server = env.start_with(&env.config(&format!("{ADMIN}\n{POLICY}")), &[]);
    // Mechanisms are part of the store's state commitment: the store is flagged first.
    crate::common::accept_store_state(&server, "does not match its commitment").await;
    let mut c = server.client("payments").await;
    let mut problems = Vec::new();
    let cases = edits
        .iter()
        .map(|(what, _)| *what)
        .zip(names.iter().map(String::as_str))
        .chain([("envelope record marked hsm-only", "payments/t/env")]);
    for (what, name) in cases {
        match c.get_secret(crate::common::get(name)).await {
            Ok(r) => problems.push(format!(
                "{what}: served {} bytes",
                r.into_inner().value.len()
            )),
            Err(e) if e.code() == Code::DataLoss => {
                assert!(!e.message().contains("tamper me"), "{}", e.message());
            }
            Err(e) => problems.push(format!("{what}: {:?} {}", e.code(), e.message())),
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(read(&mut c, "payments/t/intact").await, b"intact");
    let log = server.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
