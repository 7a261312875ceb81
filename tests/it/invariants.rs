//! The security invariants of DESIGN.md §4, each with a test that fails if it is broken.

use std::process::Command;

use cryptoki::types::AuthPin;
use prost::Message;
use tonic::Code;

use crate::common::{TestEnv, contains, files_under};
use crate::common::{get_at as get, put};
use strongroom::hsm::{self, TokenSelector, keys};
use strongroom::proto::{PutSecretRequest, SealedRecordV1};

/// §4.1: the master key reads back SENSITIVE, !EXTRACTABLE, ALWAYS_SENSITIVE,
/// NEVER_EXTRACTABLE, PRIVATE, !MODIFIABLE, and CKA_VALUE is refused — with our code and
/// with OpenSC's pkcs11-tool.
#[test]
fn master_key_attributes_and_unreadable_value() {
    let env = TestEnv::new();
    let pkcs11 = hsm::load_module(&env.module).unwrap();
    let slot = hsm::find_token(&pkcs11, &TokenSelector::Label(env.label.clone())).unwrap();
    let session = pkcs11.open_ro_session(slot).unwrap();
    hsm::login(&session, &AuthPin::new(env.user_pin.clone().into())).unwrap();
    let found = keys::find(&session).unwrap();
    assert_eq!(found.len(), 1);
    let (version, handle) = found[0];
    let r = keys::report(&session, version, handle).unwrap();
    assert_eq!(r.sensitive, Some(true));
    assert_eq!(r.extractable, Some(false));
    assert_eq!(r.always_sensitive, Some(true));
    assert_eq!(r.never_extractable, Some(true));
    assert_eq!(r.private, Some(true));
    assert_eq!(r.token, Some(true));
    assert_eq!(r.modifiable, Some(false));
    assert!(!r.value_readable);
    assert!(r.problems().is_empty(), "{:?}", r.problems());
    // The raw call answers CKR_ATTRIBUTE_SENSITIVE, and get_attributes gives no value.
    let info = session
        .get_attribute_info(handle, &[cryptoki::object::AttributeType::Value])
        .unwrap();
    assert!(
        matches!(
            info.as_slice(),
            [cryptoki::object::AttributeInfo::Sensitive]
        ),
        "CKA_VALUE is not reported sensitive: {info:?}"
    );
    let attrs = session
        .get_attributes(handle, &[cryptoki::object::AttributeType::Value])
        .unwrap_or_default();
    assert!(
        !attrs
            .iter()
            .any(|a| matches!(a, cryptoki::object::Attribute::Value(_))),
        "CKA_VALUE came back"
    );
    // The attributes cannot be loosened after the fact.
    let loosen =
        session.update_attributes(handle, &[cryptoki::object::Attribute::Extractable(true)]);
    assert!(
        loosen.is_err(),
        "CKA_EXTRACTABLE could be set on a master key"
    );

    // Independently, with pkcs11-tool.
    let tool = |args: &[&str]| {
        let out = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(&env.module)
            .args([
                "--token-label",
                &env.label,
                "--login",
                "--pin",
                &env.user_pin,
            ])
            .args(args)
            .env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
            .output()
            .expect("pkcs11-tool (apt-get install opensc)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, listing) = tool(&["--list-objects", "--type", "secrkey"]);
    assert!(ok);
    assert!(listing.contains("strongroom-mk-1"), "{listing}");
    let access = listing
        .lines()
        .find(|l| l.trim_start().starts_with("Access:"))
        .unwrap_or_default();
    assert!(access.contains("sensitive"), "{listing}");
    assert!(access.contains("always sensitive"), "{listing}");
    assert!(access.contains("never extractable"), "{listing}");
    assert!(
        !access
            .replace("never extractable", "")
            .contains("extractable"),
        "{listing}"
    );
    let (read_ok, dumped) = tool(&[
        "--read-object",
        "--type",
        "secrkey",
        "--label",
        "strongroom-mk-1",
    ]);
    assert!(!read_ok, "pkcs11-tool read the master key: {dumped}");
}

/// §4.2: the store's files never hold a secret value in the clear.
#[tokio::test]
async fn store_files_hold_no_plaintext() {
    let env = TestEnv::new();
    let server = env.start();
    let mut c = server.client("payments").await;
    let mut canaries = Vec::new();
    for i in 0..200 {
        let canary = format!("CANARY-store-{i:04}-7d1e9a3c5b");
        c.put_secret(put(&format!("payments/c/{i}"), canary.as_bytes()))
            .await
            .unwrap();
        canaries.push(canary);
    }
    // A large value too, in case of a different code path for big records.
    let big = "CANARY-big-".repeat(5000);
    c.put_secret(put("payments/big", big.as_bytes()))
        .await
        .unwrap();
    // Read everything back so reads are exercised too, then stop (flushes everything).
    assert_eq!(
        c.get_secret(get("payments/c/7", 0))
            .await
            .unwrap()
            .into_inner()
            .value,
        canaries[7].as_bytes()
    );
    server.stop();

    // On etcd the store is etcd's data directory (write-ahead log, snapshots, database),
    // read once etcd has stopped.
    if let Some(etcd) = &env.etcd {
        etcd.kill();
    }
    let files = files_under(env.etcd.as_ref().map_or(&env.store, |e| &e.data));
    assert!(!files.is_empty());
    let mut total = 0;
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        total += bytes.len();
        assert!(
            !contains(&bytes, b"CANARY-"),
            "plaintext in {}",
            f.display()
        );
    }
    // The store does hold the names (metadata, not secret): proves the scan read real data.
    let names_seen = files
        .iter()
        .any(|f| contains(&std::fs::read(f).unwrap(), b"payments/c/199"));
    assert!(
        names_seen,
        "scanned {total} bytes and found no record at all"
    );
}

/// §4.4: a record moved to another name or version, or given another record's wrapped data
/// key, is refused and never decrypted.
#[tokio::test]
async fn moved_or_swapped_records_are_refused() {
    if crate::common::skip_on_etcd("it moves records inside sled's files") {
        return;
    }
    let env = TestEnv::new();
    let server = env.start();
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/a", b"value-of-a"))
        .await
        .unwrap();
    c.put_secret(put("payments/b", b"value-of-b"))
        .await
        .unwrap();
    c.put_secret(put("payments/b", b"value-of-b-v2"))
        .await
        .unwrap();
    c.put_secret(put("payments/victim", b"placeholder"))
        .await
        .unwrap();
    server.stop();

    let rkey = |name: &str, v: u64| {
        let mut k = vec![b'r'];
        k.extend_from_slice(name.as_bytes());
        k.push(0);
        k.extend_from_slice(&v.to_be_bytes());
        k
    };
    {
        let db = sled::open(&env.store).unwrap();
        let load = |k: &[u8]| SealedRecordV1::decode(db.get(k).unwrap().unwrap().as_ref()).unwrap();
        let a1 = load(&rkey("payments/a", 1));
        let b1 = load(&rkey("payments/b", 1));
        let victim1 = load(&rkey("payments/victim", 1));

        // 1. a's record copied as the victim's, with its name field rewritten to match.
        let mut moved = a1.clone();
        moved.name = "payments/victim".into();
        db.insert(rkey("payments/victim", 1), moved.encode_to_vec())
            .unwrap();

        // 2. b v1 copied over b v2 with its version field rewritten (a rollback of one version).
        let mut older = b1.clone();
        older.version = 2;
        db.insert(rkey("payments/b", 2), older.encode_to_vec())
            .unwrap();

        // 3. a's own record, but with b's wrapped data key.
        let mut swapped = a1.clone();
        swapped.wrapped_dek = b1.wrapped_dek.clone();
        db.insert(rkey("payments/a", 1), swapped.encode_to_vec())
            .unwrap();

        // 4. b v1 with a's ciphertext and nonce under its own key.
        let mut spliced = b1.clone();
        spliced.ciphertext = a1.ciphertext.clone();
        spliced.nonce = a1.nonce.clone();
        db.insert(rkey("payments/b", 1), spliced.encode_to_vec())
            .unwrap();

        // 5. The victim's record copied unchanged under a new version number key, fields intact.
        db.insert(rkey("payments/victim", 2), victim1.encode_to_vec())
            .unwrap();
        db.flush().unwrap();
    }

    // The store's state commitment flags the whole store first; once officers accept it,
    // each moved or swapped record must still be refused on its own.
    let server = env.start_admin();
    crate::common::accept_store_state(&server, "does not match its commitment").await;
    let mut c = server.client("payments").await;
    for (name, version) in [
        ("payments/victim", 1),
        ("payments/b", 2),
        ("payments/a", 1),
        ("payments/b", 1),
        ("payments/victim", 2),
    ] {
        let e = c.get_secret(get(name, version)).await.unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "{name} v{version}: {e:?}");
        assert!(!e.message().contains("value-of"), "{}", e.message());
    }
    // The service keeps serving after refusing them.
    c.put_secret(put("payments/fresh", b"ok")).await.unwrap();
    assert_eq!(
        c.get_secret(get("payments/fresh", 0))
            .await
            .unwrap()
            .into_inner()
            .value,
        b"ok"
    );
}

/// §4.5: canary values never appear in the service's logs at trace level, nor in the CLI's
/// error output, nor in `Debug` output of the request and record types.
#[tokio::test]
async fn canaries_never_reach_logs_or_debug_output() {
    let env = TestEnv::new();
    let config = env.config(crate::common::POLICY);
    let server = env.start_with(&config, &[("STRONGROOM_LOG", "trace")]);
    let canary = "CANARY-log-5f2b8e91c4";
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/logged", canary.as_bytes()))
        .await
        .unwrap();
    let got = c
        .get_secret(get("payments/logged", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, canary.as_bytes());
    // Failures too: a refused CAS write and a denied write carry the value.
    let _ = c
        .put_secret(PutSecretRequest {
            expected_version: Some(9),
            ..put("payments/logged", canary.as_bytes())
        })
        .await
        .unwrap_err();
    let mut stranger = server.client("stranger").await;
    let _ = stranger
        .put_secret(put("payments/logged", canary.as_bytes()))
        .await
        .unwrap_err();
    let log = server.log_text();
    server.stop();
    assert!(
        log.contains("payments/logged"),
        "trace log too thin to mean anything:\n{log}"
    );
    for form in [
        canary.to_owned(),
        hex_of(canary.as_bytes()),
        base64_of(canary.as_bytes()),
        format!("{:?}", canary.as_bytes()),
    ] {
        assert!(!log.contains(&form), "canary ({form}) in the service log");
    }
    // The user PIN never appears either.
    assert!(!log.contains(&env.user_pin));

    // Debug of the types that carry values or sealed data.
    let req = put("payments/logged", canary.as_bytes());
    assert!(!format!("{req:?}").contains("CANARY"));
    assert!(!format!("{got:?}").contains("CANARY"));
    assert!(!format!("{:?}", req.value.len()).contains("CANARY"));
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A key planted under a master key label but readable (or with the wrong CKA_ID) is never
/// used: whoever holds the user PIN cannot make the service seal under a key they can read.
#[tokio::test]
async fn a_planted_readable_master_key_is_refused() {
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    let env = TestEnv::new();
    {
        let pkcs11 = hsm::load_module(&env.module).unwrap();
        let slot = hsm::find_token(&pkcs11, &TokenSelector::Label(env.label.clone())).unwrap();
        let session = pkcs11.open_rw_session(slot).unwrap();
        hsm::login(&session, &AuthPin::new(env.user_pin.clone().into())).unwrap();
        session
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Value(vec![0x41; 32]),
                Attribute::Label(keys::label(2).into_bytes()),
                Attribute::Id(keys::id(2)),
            ])
            .unwrap();
        let (trusted, rejected) = keys::find_trusted(&session).unwrap();
        assert_eq!(trusted.iter().map(|(v, _)| *v).collect::<Vec<_>>(), vec![1]);
        assert!(rejected[0].contains("strongroom-mk-2"), "{rejected:?}");
    }
    let server = env.start();
    let mut c = server.client("payments").await;
    let r = c
        .put_secret(put("payments/x", b"v"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.master_key_version, 1, "sealed under the planted key");
    assert!(server.log_text().contains("refusing a master key"));
}
