//! The store's records decoded from arbitrary bytes, as a damaged or hostile store would
//! present them: `SealedRecordV1`, `HeadV1`, `PolicyRecordV1`, `ApprovalV1`.
//!
//! Whatever decodes must re-encode to bytes that decode to the same message, with a stable
//! encoding and a truthful `encoded_len`. A decoded sealed record whose name is valid must
//! give a v1 AAD that encodes (name, version, master key version) unambiguously; its v2 AAD
//! (every field that drives a decision) must change when any bound field changes; it must
//! never open under a key it was not sealed with, and sealing under its AAD must round-trip
//! only under that AAD.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strongroom::envelope::{self, DataKey, record_aad_v1};
use strongroom::policy::PolicyDocument;
use strongroom::proto::{ApprovalV1, HeadV1, PolicyRecordV1, SealedRecordV1};
use strongroom::secret::{MAX_NAME_BYTES_CEILING, Mechanism, RecordFormat, RecordMeta, SecretName};

const AAD_DOMAIN: &[u8] = b"strongroom/record/v1";

fn round_trip<M: Message + Default + PartialEq + Debug>(data: &[u8]) -> Option<M> {
    let message = M::decode(data).ok()?;
    let bytes = message.encode_to_vec();
    assert_eq!(bytes.len(), message.encoded_len(), "encoded_len lies");
    let again = M::decode(bytes.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(again, message, "decode(encode(m)) != m");
    assert_eq!(again.encode_to_vec(), bytes, "the encoding is not stable");
    // Debug output (hand-written and redacting for SealedRecordV1) never panics.
    let _ = format!("{message:?}");
    Some(message)
}

fn check_sealed(record: &SealedRecordV1) {
    if let Some(m) = Mechanism::from_id(record.mechanism) {
        assert_eq!(m.id(), record.mechanism);
    }
    let Ok(name) = SecretName::parse(&record.name, MAX_NAME_BYTES_CEILING) else {
        return;
    };
    let aad = record_aad_v1(&name, record.version, record.master_key_version);
    // The AAD parses back into exactly the identity it binds.
    let n = name.as_str().len();
    assert_eq!(aad.len(), AAD_DOMAIN.len() + 2 + n + 8 + 4);
    let (domain, rest) = aad.split_at(AAD_DOMAIN.len());
    assert_eq!(domain, AAD_DOMAIN);
    let (len, rest) = rest.split_at(2);
    assert_eq!(usize::from(u16::from_be_bytes([len[0], len[1]])), n);
    let (text, rest) = rest.split_at(n);
    assert_eq!(text, name.as_str().as_bytes());
    let (version, mk) = rest.split_at(8);
    assert_eq!(version, record.version.to_be_bytes());
    assert_eq!(mk, record.master_key_version.to_be_bytes());

    // A record never opens under a key the fuzzer does not know the tag for.
    let dek = DataKey::from_slice(&[0x5a; 32]).expect("32-byte key");
    assert!(
        envelope::open(&dek, &record.nonce, &aad, &record.ciphertext).is_err(),
        "an arbitrary record authenticated"
    );
    // Sealing the record's bytes under its AAD round-trips, and only under that AAD.
    let sealed = envelope::seal(&dek, &aad, &record.ciphertext).expect("seal");
    let opened = envelope::open(&dek, &sealed.nonce, &aad, &sealed.ciphertext).expect("open");
    assert_eq!(opened.expose(), record.ciphertext.as_slice());
    let moved = record_aad_v1(
        &name,
        record.version.wrapping_add(1),
        record.master_key_version,
    );
    assert!(envelope::open(&dek, &sealed.nonce, &moved, &sealed.ciphertext).is_err());
    check_v2(record, &name, &dek);
}

/// The v2 AAD of the record read from its own slot differs from the v1 AAD and from the AAD
/// of the same record with any one bound field changed, and a value sealed under it opens
/// under no such variant.
fn check_v2(record: &SealedRecordV1, name: &SecretName, dek: &DataKey) {
    let Ok((meta, _)) = RecordMeta::of_slot(record, name, record.version) else {
        return;
    };
    let aad = meta.aad(RecordFormat::V2);
    assert_ne!(aad, meta.aad(RecordFormat::V1));
    let sealed = envelope::seal(dek, &aad, b"v").expect("seal");
    let mut variants: Vec<RecordMeta> = Vec::new();
    let mut push = |f: &dyn Fn(&mut RecordMeta)| {
        let mut m = meta.clone();
        f(&mut m);
        variants.push(m);
    };
    push(&|m| m.version = m.version.wrapping_add(1));
    push(&|m| m.master_key_version = m.master_key_version.wrapping_add(1));
    push(&|m| {
        m.mechanism = match m.mechanism {
            Mechanism::AesGcmEnvelopeV1 => Mechanism::AesKwHsmOnlyV1,
            Mechanism::AesKwHsmOnlyV1 => Mechanism::AesGcmEnvelopeV1,
        }
    });
    push(&|m| m.created_at_unix = m.created_at_unix.wrapping_add(1));
    push(&|m| m.created_by.push('x'));
    push(&|m| m.not_before_unix = Some(m.not_before_unix.map_or(0, |t| t.wrapping_add(1))));
    push(&|m| m.not_before_unix = m.not_before_unix.xor(Some(0)));
    push(&|m| m.expires_at_unix = Some(m.expires_at_unix.map_or(0, |t| t.wrapping_add(1))));
    push(&|m| m.expires_at_unix = m.expires_at_unix.xor(Some(0)));
    for v in &variants {
        // Every variant changes one bound field (the `xor`s flip presence).
        let other = v.aad(RecordFormat::V2);
        assert_ne!(
            other, aad,
            "a changed field left the v2 AAD unchanged: {v:?}"
        );
        assert!(envelope::open(dek, &sealed.nonce, &other, &sealed.ciphertext).is_err());
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(record) = round_trip::<SealedRecordV1>(data) {
        check_sealed(&record);
    }
    round_trip::<HeadV1>(data);
    if let Some(policy) = round_trip::<PolicyRecordV1>(data) {
        // The service parses a stored document once its MAC verifies; it must never panic.
        let _ = PolicyDocument::parse(&policy.document, 256);
    }
    round_trip::<ApprovalV1>(data);
});
