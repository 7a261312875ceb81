//! Known-answer tests of both AES-GCM paths, in-process (`envelope`) and in the token
//! (`hsm::gcm`), against every Wycheproof AES-GCM vector, the ones that must fail included;
//! and of the token's AES-KW (CKM_AES_KEY_WRAP), strict mode's unwrap included, against every
//! Wycheproof AES-KW vector.

use std::collections::BTreeMap;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::AuthPin;
use wycheproof::TestResult;
use wycheproof::aead::{Test, TestGroup, TestName, TestSet};

use crate::common::{TestEnv, Token};
use strongroom::envelope::{self, EnvelopeError};
use strongroom::hsm::{self, HsmError, TokenSelector};

/// Loads the AES-GCM set and checks it is the whole set (the crate verifies `numberOfTests`).
fn aes_gcm_vectors() -> TestSet {
    let set = TestSet::load(TestName::AesGcm).expect("the Wycheproof AES-GCM set loads");
    let total: usize = set.test_groups.iter().map(|g| g.tests.len()).sum();
    assert_eq!(total, set.number_of_tests);
    assert!(
        total >= 300,
        "the Wycheproof AES-GCM set shrank to {total} vectors"
    );
    set
}

/// The vector's ciphertext followed by its tag: what both our paths produce and consume.
fn ct_and_tag(test: &Test) -> Vec<u8> {
    [&test.ct[..], &test.tag[..]].concat()
}

/// A one-line description of a vector for assertion messages.
fn describe(group: &TestGroup, test: &Test) -> String {
    format!(
        "tcId {} ({:?}, key {} bits, IV {} bits, tag {} bits, {:?}: {})",
        test.tc_id,
        test.result,
        group.key_size,
        group.nonce_size,
        group.tag_size,
        test.flags,
        test.comment
    )
}

#[test]
fn in_process_gcm_matches_every_wycheproof_vector() {
    let set = aes_gcm_vectors();
    let (mut valid, mut invalid, mut acceptable, mut refused) = (0usize, 0usize, 0usize, 0usize);

    for group in &set.test_groups {
        for test in &group.tests {
            let what = describe(group, test);
            let expected = ct_and_tag(test);
            let encrypted = envelope::gcm_encrypt(&test.key, &test.nonce, &test.aad, &test.pt);
            let decrypted = envelope::gcm_decrypt(&test.key, &test.nonce, &test.aad, &expected);

            // Documented limits of `envelope`: AES-128/256, 96-bit nonce, 128-bit tag.
            let supported = matches!(test.key.len(), 16 | 32)
                && test.nonce.len() == envelope::GCM_NONCE_LEN
                && test.tag.len() == envelope::GCM_TAG_LEN;
            if !supported {
                assert!(
                    encrypted.is_err(),
                    "encrypt accepted unsupported parameters: {what}"
                );
                assert!(
                    decrypted.is_err(),
                    "decrypt accepted unsupported parameters: {what}"
                );
                refused += 1;
                continue;
            }

            let encrypted = encrypted.unwrap_or_else(|e| panic!("encrypt failed ({e}): {what}"));
            match test.result {
                TestResult::Valid | TestResult::Acceptable => {
                    assert_eq!(encrypted, expected, "wrong ciphertext||tag: {what}");
                    let plaintext =
                        decrypted.unwrap_or_else(|e| panic!("decrypt failed ({e}): {what}"));
                    assert_eq!(
                        plaintext.as_slice(),
                        &test.pt[..],
                        "wrong plaintext: {what}"
                    );
                    if test.result == TestResult::Valid {
                        valid += 1;
                    } else {
                        acceptable += 1;
                    }
                }
                TestResult::Invalid => {
                    assert_eq!(
                        decrypted.err(),
                        Some(EnvelopeError::Authentication),
                        "an invalid vector did not fail authentication: {what}"
                    );
                    // Encrypting the message must give the genuine output, not the vector's.
                    assert_ne!(
                        encrypted, expected,
                        "encrypt produced an invalid vector: {what}"
                    );
                    invalid += 1;
                }
            }
        }
    }

    println!(
        "in-process AES-GCM: {valid} valid, {invalid} invalid, {acceptable} acceptable, \
         {refused} refused as unsupported (of {} vectors)",
        set.number_of_tests
    );
    assert_eq!(valid + invalid + acceptable + refused, set.number_of_tests);
    // 96-bit nonces with 128/256-bit keys are 133 of the 316 vectors of wycheproof 0.7.
    assert!(
        valid + invalid + acceptable >= 130,
        "only {} vectors ran in-process",
        valid + invalid + acceptable
    );
    assert!(
        valid >= 70 && invalid >= 50,
        "too few valid or invalid vectors ran"
    );
}

/// The longest GCM IV the token handles, in bytes. SoftHSM2's OpenSSL 3 backend caps GCM IVs
/// at 128 bytes and, instead of refusing a longer or an empty IV, encrypts under another IV.
const TOKEN_MAX_IV: usize = 128;

/// What the token made of one vector.
enum Outcome {
    /// Every operation the vector calls for gave the expected answer; the note, if any,
    /// records an operation the token should have refused but ran.
    Checked(Option<String>),
    /// The token refused the vector's parameters; the refusal, as `function: CKR code`.
    Refused(String),
    /// The IV is outside `1..=TOKEN_MAX_IV` and the token gave a wrong answer instead of
    /// refusing; what it did.
    Mishandled(String),
}

/// A refusal of the vector's parameters (as opposed to a wrong answer or a broken session).
fn refusal(e: &HsmError) -> Option<String> {
    match e {
        HsmError::Pkcs11 { rv, function }
            if matches!(
                rv,
                RvError::MechanismParamInvalid
                    | RvError::MechanismInvalid
                    | RvError::KeySizeRange
                    | RvError::ArgumentsBad
            ) =>
        {
            Some(format!("{function:?}: {rv:?}"))
        }
        // strongroom's own guard for IV lengths SoftHSM2 mishandles (src/hsm/gcm.rs).
        HsmError::InvalidParameter(why) => Some(format!("refused by strongroom: {why}")),
        _ => None,
    }
}

/// A short account of what one token operation returned.
fn summary<T>(result: &Result<T, HsmError>, expected: impl FnOnce(&T) -> bool) -> String {
    match result {
        Ok(out) if expected(out) => "right answer".to_owned(),
        Ok(_) => "WRONG answer".to_owned(),
        Err(HsmError::Pkcs11 { rv, function }) => format!("{function:?}: {rv:?}"),
        Err(HsmError::UnwrapAuthentication) => {
            "authentication failure (CKR_GENERAL_ERROR on SoftHSM2)".to_owned()
        }
        Err(e) => e.to_string(),
    }
}

/// Imports the vector's key as a sensitive, non-extractable session object.
fn import_key(session: &Session, key: &[u8]) -> Result<ObjectHandle, CkError> {
    session.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Value(key.to_vec()),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ])
}

/// Runs one vector through `hsm::gcm`; panics on any wrong answer the token is not allowed to
/// give. `mandatory` vectors (the parameters strongroom itself uses) must be right.
fn check_in_token(
    session: &Session,
    key: ObjectHandle,
    group: &TestGroup,
    test: &Test,
    mandatory: bool,
) -> Outcome {
    let what = describe(group, test);
    let tag_bits = group.tag_size as u64;
    let expected = ct_and_tag(test);
    let iv_in_range = (1..=TOKEN_MAX_IV).contains(&test.nonce.len());
    let encrypted = hsm::gcm::encrypt(session, key, &test.nonce, &test.aad, tag_bits, &test.pt);
    let decrypted = hsm::gcm::decrypt(session, key, &test.nonce, &test.aad, tag_bits, &expected);
    let enc_summary = summary(&encrypted, |out| *out == expected);
    let dec_summary = summary(&decrypted, |pt| pt.as_slice() == &test.pt[..]);

    if test.result == TestResult::Invalid {
        // Whatever the parameters, an invalid vector never decrypts, and encrypting its
        // message never reproduces it.
        let err = match decrypted {
            Ok(_) => panic!("the token decrypted an invalid vector: {what}"),
            Err(e) => e,
        };
        if let Ok(out) = &encrypted {
            assert_ne!(
                out, &expected,
                "the token produced an invalid vector: {what}"
            );
        }
        if let Some(why) = refusal(&err) {
            assert!(!mandatory, "the token refused ({why}): {what}");
            return Outcome::Refused(why);
        }
        assert!(
            matches!(err, HsmError::UnwrapAuthentication),
            "an invalid vector failed with something other than authentication ({err}): {what}"
        );
        let note = (encrypted.is_ok() && !iv_in_range).then(|| {
            format!(
                "tcId {}: C_Encrypt accepted a {}-byte IV",
                test.tc_id,
                test.nonce.len()
            )
        });
        return Outcome::Checked(note);
    }

    // Valid (the AES-GCM set has no acceptable vectors; one would be held to the same rule):
    // right answers both ways, or an explicit refusal of the parameters both ways.
    if let Ok(plaintext) = &decrypted {
        assert_eq!(
            plaintext.as_slice(),
            &test.pt[..],
            "the token decrypted to a wrong plaintext: {what}"
        );
    }
    match (&encrypted, &decrypted) {
        (Ok(out), Ok(_)) if *out == expected => Outcome::Checked(None),
        (Err(enc), Err(dec)) if !mandatory && refusal(enc).is_some() && refusal(dec).is_some() => {
            Outcome::Refused(refusal(enc).unwrap_or_default())
        }
        _ if !mandatory && !iv_in_range => Outcome::Mishandled(format!(
            "tcId {} ({}-byte IV): encrypt {enc_summary}; decrypt {dec_summary}",
            test.tc_id,
            test.nonce.len()
        )),
        _ => panic!(
            "the token failed a valid vector (encrypt: {enc_summary}; decrypt: {dec_summary}): \
             {what}"
        ),
    }
}

#[test]
fn token_gcm_matches_every_wycheproof_vector() {
    let env = TestEnv::with_token();
    let pkcs11 = hsm::load_module(&env.module).unwrap();
    let slot = hsm::find_token(&pkcs11, &TokenSelector::Label(env.label.clone())).unwrap();
    let session = pkcs11.open_rw_session(slot).unwrap();
    hsm::login(&session, &AuthPin::new(env.user_pin.clone().into())).unwrap();

    let set = aes_gcm_vectors();
    let (mut valid, mut invalid, mut acceptable) = (0usize, 0usize, 0usize);
    let mut mandatory_checked = 0usize;
    let mut refusals: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut mishandled = Vec::new();
    let mut notes = Vec::new();

    for group in &set.test_groups {
        for test in &group.tests {
            // strongroom's own parameters: the token must get these right.
            let mandatory = matches!(test.key.len(), 16 | 24 | 32)
                && test.nonce.len() == 12
                && test.tag.len() == 16;
            let outcome = match import_key(&session, &test.key) {
                Ok(key) => {
                    let outcome = check_in_token(&session, key, group, test, mandatory);
                    session.destroy_object(key).unwrap();
                    outcome
                }
                Err(CkError::Pkcs11(rv, function)) if !mandatory => {
                    Outcome::Refused(format!("{function:?}: {rv:?}"))
                }
                Err(e) => panic!("cannot import the key ({e}): {}", describe(group, test)),
            };
            match outcome {
                Outcome::Checked(note) => {
                    notes.extend(note);
                    if mandatory {
                        mandatory_checked += 1;
                    }
                    match test.result {
                        TestResult::Valid => valid += 1,
                        TestResult::Invalid => invalid += 1,
                        TestResult::Acceptable => acceptable += 1,
                    }
                }
                Outcome::Refused(why) => refusals.entry(why).or_default().push(format!(
                    "tcId {} (key {} / IV {} / tag {} bits)",
                    test.tc_id, group.key_size, group.nonce_size, group.tag_size
                )),
                Outcome::Mishandled(what) => mishandled.push(what),
            }
        }
    }

    let refused: usize = refusals.values().map(Vec::len).sum();
    println!(
        "token AES-GCM: {valid} valid, {invalid} invalid, {acceptable} acceptable, \
         {refused} refused by the token, {} mishandled outside 1..={TOKEN_MAX_IV}-byte IVs \
         (of {} vectors; {mandatory_checked} checked with 96-bit IV and 128-bit tag)",
        mishandled.len(),
        set.number_of_tests
    );
    for (why, tests) in &refusals {
        println!("  refused with {why}: {}", tests.join(", "));
    }
    for what in &mishandled {
        println!("  mishandled, not refused: {what}");
    }
    for note in &notes {
        println!("  rejected on decrypt, but {note}");
    }
    assert_eq!(
        valid + invalid + acceptable + refused + mishandled.len(),
        set.number_of_tests
    );
    let checked = valid + invalid + acceptable;
    assert!(
        checked >= 300,
        "only {checked} vectors were checked on the token"
    );
    assert!(
        mandatory_checked >= 190,
        "only {mandatory_checked} 96-bit-IV vectors ran"
    );
    assert!(
        valid >= 200 && invalid >= 80,
        "too few valid or invalid vectors ran"
    );
}

/// The AES-KW (RFC 3394) set, whole (the crate verifies `numberOfTests`).
fn aes_kw_vectors() -> wycheproof::keywrap::TestSet {
    use wycheproof::keywrap::{TestName, TestSet};
    let set = TestSet::load(TestName::AesKeyWrap).expect("the Wycheproof AES-KW set loads");
    let total: usize = set.test_groups.iter().map(|g| g.tests.len()).sum();
    assert_eq!(total, set.number_of_tests);
    assert!(total >= 150, "the Wycheproof AES-KW set shrank to {total}");
    set
}

/// Imports a key-encryption key as a sensitive, non-extractable session object that may
/// wrap and unwrap, as strongroom's master keys may.
fn import_kek(session: &Session, key: &[u8]) -> Result<ObjectHandle, CkError> {
    session.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Value(key.to_vec()),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
    ])
}

/// Every Wycheproof AES-KW vector through the token's CKM_AES_KEY_WRAP:
/// - C_UnwrapKey into a readable generic secret: valid vectors give the vector's key, invalid
///   ones are refused; C_WrapKey of a valid vector's key gives its ciphertext;
/// - strongroom's own strict-mode unwrap (`hsm::strict::unwrap_dek`, a sensitive,
///   non-extractable AES session key) for every vector under a 256-bit key, as the master
///   keys are: a valid 32-byte key opens and encrypts exactly as the vector's key does in
///   process; anything else is an authentication failure, never another key.
#[test]
fn token_aes_kw_matches_every_wycheproof_vector() {
    use cryptoki::mechanism::Mechanism as CkMechanism;
    use cryptoki::object::AttributeType;

    let env = TestEnv::with_token();
    let pkcs11 = hsm::load_module(&env.module).unwrap();
    let slot = hsm::find_token(&pkcs11, &TokenSelector::Label(env.label.clone())).unwrap();
    let session = pkcs11.open_rw_session(slot).unwrap();
    hsm::login(&session, &AuthPin::new(env.user_pin.clone().into())).unwrap();

    let set = aes_kw_vectors();
    // A generic secret the test may read back.
    let readable = || {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ]
    };
    let (mut valid, mut invalid, mut acceptable) = (0usize, 0usize, 0usize);
    let mut strict_opened = 0usize;
    let mut strict_refused = 0usize;
    let mut refusals: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut empty_accepted: Vec<u64> = Vec::new();
    let gcm_iv = [7u8; 12];
    let gcm_aad = b"strongroom/wycheproof/kw";
    let gcm_msg = b"a value sealed under the unwrapped key";

    for group in &set.test_groups {
        for test in &group.tests {
            let what = format!(
                "tcId {} ({:?}, key {} bits, key data {} bytes, wrapped {} bytes, {:?}: {})",
                test.tc_id,
                test.result,
                group.key_size,
                test.pt.len(),
                test.ct.len(),
                test.flags,
                test.comment
            );
            let mandatory = test.key.len() == 32 && test.pt.len() == 32;
            let kek = match import_kek(&session, &test.key) {
                Ok(k) => k,
                Err(CkError::Pkcs11(rv, f)) if !mandatory => {
                    refusals
                        .entry(format!("{f:?}: {rv:?}"))
                        .or_default()
                        .push(test.tc_id as u64);
                    continue;
                }
                Err(e) => panic!("cannot import the key ({e}): {what}"),
            };

            // The token's C_UnwrapKey.
            let unwrapped =
                session.unwrap_key(&CkMechanism::AesKeyWrap, kek, &test.ct, &readable());
            match (test.result, unwrapped) {
                // Kryoptic 1.5.4 "unwraps" an empty wrapping into an empty key (RFC 3394
                // wrappings are at least 16 bytes). strongroom never hands it one: the strict
                // unwrap below checks the length first, and must refuse it.
                (TestResult::Invalid, Ok(h))
                    if env.token == Token::Kryoptic && test.ct.is_empty() =>
                {
                    session.destroy_object(h).unwrap();
                    empty_accepted.push(test.tc_id as u64);
                }
                (TestResult::Invalid, Ok(h)) => {
                    panic!("the token unwrapped an invalid vector (handle {h}): {what}")
                }
                (TestResult::Invalid, Err(_)) => invalid += 1,
                (_, Ok(h)) => {
                    let attrs = session.get_attributes(h, &[AttributeType::Value]).unwrap();
                    let value = attrs.iter().find_map(|a| match a {
                        Attribute::Value(v) => Some(v.clone()),
                        _ => None,
                    });
                    assert_eq!(value.as_deref(), Some(&test.pt[..]), "wrong key: {what}");
                    session.destroy_object(h).unwrap();
                    // And C_WrapKey of that key gives the vector's ciphertext.
                    let mut t = readable();
                    t.push(Attribute::Value(test.pt.to_vec()));
                    let plain = session.create_object(&t).unwrap();
                    let wrapped = session
                        .wrap_key(&CkMechanism::AesKeyWrap, kek, plain)
                        .unwrap_or_else(|e| panic!("wrap failed ({e}): {what}"));
                    assert_eq!(wrapped, &test.ct[..], "wrong wrapping: {what}");
                    session.destroy_object(plain).unwrap();
                    if test.result == TestResult::Valid {
                        valid += 1;
                    } else {
                        acceptable += 1;
                    }
                }
                (_, Err(CkError::Pkcs11(rv, f))) if !mandatory => {
                    refusals
                        .entry(format!("{f:?}: {rv:?} ({:?} vector)", test.result))
                        .or_default()
                        .push(test.tc_id as u64);
                }
                (_, Err(e)) => panic!("the token refused a valid vector ({e}): {what}"),
            }

            // strongroom's strict-mode unwrap, under 256-bit keys as the master keys are.
            if test.key.len() == 32 {
                match hsm::strict::unwrap_dek(&session, kek, &test.ct) {
                    Ok(dek) => {
                        assert!(
                            test.result != TestResult::Invalid && test.pt.len() == 32,
                            "strict unwrap accepted: {what}"
                        );
                        let in_token = hsm::gcm::encrypt(
                            &session,
                            dek.handle(),
                            &gcm_iv,
                            gcm_aad,
                            128,
                            gcm_msg,
                        );
                        // The unwrapped key may only decrypt: encrypting under it is refused,
                        // so compare by decrypting what the vector's key sealed in process.
                        assert!(in_token.is_err(), "the data key may encrypt: {what}");
                        let sealed =
                            envelope::gcm_encrypt(&test.pt, &gcm_iv, gcm_aad, gcm_msg).unwrap();
                        let opened = hsm::gcm::decrypt(
                            &session,
                            dek.handle(),
                            &gcm_iv,
                            gcm_aad,
                            128,
                            &sealed,
                        )
                        .unwrap_or_else(|e| {
                            panic!("the unwrapped key is not the vector's ({e}): {what}")
                        });
                        assert_eq!(opened.as_slice(), gcm_msg, "{what}");
                        strict_opened += 1;
                    }
                    Err(HsmError::UnwrapAuthentication) => {
                        assert!(
                            test.result == TestResult::Invalid || test.pt.len() != 32,
                            "strict unwrap refused a valid data key: {what}"
                        );
                        strict_refused += 1;
                    }
                    Err(e) => {
                        panic!("strict unwrap failed with {e} instead of authentication: {what}")
                    }
                }
            }
            session.destroy_object(kek).unwrap();
        }
    }

    let refused: usize = refusals.values().map(Vec::len).sum();
    if !empty_accepted.is_empty() {
        println!(
            "the token (Kryoptic) unwrapped empty wrappings of invalid vectors: tcId \
             {empty_accepted:?} (strongroom's strict unwrap checks the length first)"
        );
    }
    let invalid = invalid + empty_accepted.len();
    println!(
        "token AES-KW: {valid} valid, {invalid} invalid, {acceptable} acceptable, {refused} \
         refused (of {}); strict unwrap: {strict_opened} opened, {strict_refused} refused as \
         authentication failures",
        set.number_of_tests
    );
    for (why, ids) in &refusals {
        println!("  refused with {why}: tcId {ids:?}");
    }
    assert_eq!(valid + invalid + acceptable + refused, set.number_of_tests);
    assert!(valid >= 30 && invalid >= 60, "too few vectors ran");
    assert!(
        strict_opened >= 4,
        "only {strict_opened} 32-byte keys opened"
    );
    assert!(strict_refused >= 30, "only {strict_refused} refusals");
}
