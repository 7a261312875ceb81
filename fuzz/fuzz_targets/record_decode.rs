//! The store's records decoded from arbitrary bytes, as a damaged or hostile store would
//! present them: `SealedRecordV1`, `HeadV1`, `PolicyRecordV1`, `ApprovalV1`.
//!
//! Whatever decodes must re-encode to bytes that decode to the same message, with a stable
//! encoding and a truthful `encoded_len`. A decoded sealed record whose name is valid must
//! give an AAD that encodes (name, version, master key version) unambiguously, must never
//! open under a key it was not sealed with, and sealing under its AAD must round-trip.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strongroom::envelope::{self, DataKey, record_aad};
use strongroom::policy::PolicyDocument;
use strongroom::proto::{ApprovalV1, HeadV1, PolicyRecordV1, SealedRecordV1};
use strongroom::secret::{MAX_NAME_BYTES_CEILING, Mechanism, SecretName};

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
    let aad = record_aad(&name, record.version, record.master_key_version);
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
    let moved = record_aad(
        &name,
        record.version.wrapping_add(1),
        record.master_key_version,
    );
    assert!(envelope::open(&dek, &sealed.nonce, &moved, &sealed.ciphertext).is_err());
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
