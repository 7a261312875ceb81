//! Seal and open secret values: the in-process layer of the envelope.
//!
//! A value is encrypted with AES-256-GCM under its own data key (DEK); the DEK is wrapped by
//! the token's master key (see `hsm`). Both layers take the same additional authenticated
//! data: for a v2 record ([`record_aad`]) the canonical encoding of every field that drives a
//! decision (name, version, master key version, mechanism, created_at, created_by,
//! not_before, expires_at); for a v1 record ([`record_aad_v1`]) of name, version and master
//! key version. A record moved to another name or version, given another record's wrapped
//! DEK, or with any bound field edited, fails to open. The two encodings have different
//! domain strings, so a v2 record relabelled v1 fails too.
//!
//! Strict mode (`protection = "hsm-only"`, [`crate::secret::Mechanism::AesKwHsmOnlyV1`])
//! does not use this layer: the value is sealed and opened inside the token under the same
//! AAD ([`record_aad`]), and the DEK never reaches this process (see `hsm::strict`).

use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::secret::{RecordMeta, SecretName, SecretValue};

/// Length of a data key in bytes (AES-256).
pub const DEK_LEN: usize = 32;
/// Length of the AES-GCM nonce.
pub const GCM_NONCE_LEN: usize = NONCE_LEN;
/// Length of the AES-GCM tag.
pub const GCM_TAG_LEN: usize = 16;

/// Domain separation of the v1 AAD encoding (records written before v2).
const AAD_DOMAIN_V1: &[u8] = b"strongroom/record/v1";
/// Domain separation of the v2 AAD encoding; bump if the encoding ever changes.
const AAD_DOMAIN_V2: &[u8] = b"strongroom/record/v2";

/// A data key in the clear: zeroized on drop, never printed or cloned.
pub struct DataKey(Zeroizing<[u8; DEK_LEN]>);

impl DataKey {
    /// Takes a key from bytes the token produced or unwrapped; `None` if the length is wrong.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut key = Zeroizing::new([0u8; DEK_LEN]);
        if bytes.len() != DEK_LEN {
            return None;
        }
        key.copy_from_slice(bytes);
        Some(Self(key))
    }

    /// The key bytes; used only to hand the key to the token for wrapping and to the cipher.
    pub fn expose(&self) -> &[u8; DEK_LEN] {
        &self.0
    }
}

/// The AAD of a v2 record: binds its slot and every field of its metadata.
///
/// Encoding: the domain `strongroom/record/v2`; the name (2-byte big-endian length, bytes);
/// version (8 bytes), master key version (4), mechanism id (4), created_at (8, two's
/// complement); created_by (4-byte length, bytes); not_before and expires_at, each a presence
/// byte (0 or 1) followed, when present, by 8 bytes. All integers big-endian.
pub fn record_aad(meta: &RecordMeta) -> Vec<u8> {
    let name = meta.name.as_str().as_bytes();
    let by = meta.created_by.as_bytes();
    let mut aad = Vec::with_capacity(AAD_DOMAIN_V2.len() + name.len() + by.len() + 54);
    aad.extend_from_slice(AAD_DOMAIN_V2);
    // Names are at most 1024 bytes (MAX_NAME_BYTES_CEILING), so the length fits in u16.
    aad.extend_from_slice(&(name.len() as u16).to_be_bytes());
    aad.extend_from_slice(name);
    aad.extend_from_slice(&meta.version.to_be_bytes());
    aad.extend_from_slice(&meta.master_key_version.to_be_bytes());
    aad.extend_from_slice(&meta.mechanism.id().to_be_bytes());
    aad.extend_from_slice(&meta.created_at_unix.to_be_bytes());
    // Identities are bounded by the certificate they come from; u32 holds any of them.
    aad.extend_from_slice(&u32::try_from(by.len()).unwrap_or(u32::MAX).to_be_bytes());
    aad.extend_from_slice(by);
    for t in [meta.not_before_unix, meta.expires_at_unix] {
        match t {
            None => aad.push(0),
            Some(t) => {
                aad.push(1);
                aad.extend_from_slice(&t.to_be_bytes());
            }
        }
    }
    aad
}

/// The AAD of a v1 record (written before v2): binds its identity only.
pub fn record_aad_v1(name: &SecretName, version: u64, master_key_version: u32) -> Vec<u8> {
    let name = name.as_str().as_bytes();
    let mut aad = Vec::with_capacity(AAD_DOMAIN_V1.len() + 2 + name.len() + 12);
    aad.extend_from_slice(AAD_DOMAIN_V1);
    // Names are at most 1024 bytes (MAX_NAME_BYTES_CEILING), so the length fits in u16.
    aad.extend_from_slice(&(name.len() as u16).to_be_bytes());
    aad.extend_from_slice(name);
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(&master_key_version.to_be_bytes());
    aad
}

/// Why a value could not be sealed or opened. Deliberately carries no detail: a failed
/// authentication must not say which byte was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Tag mismatch, wrong key, wrong AAD, or a malformed nonce or ciphertext.
    #[error("authentication failed: the record does not match its key or identity")]
    Authentication,
    /// The system random generator failed.
    #[error("the system random generator failed")]
    Random,
    /// Key length not supported.
    #[error("unsupported key length")]
    KeyLength,
}

/// A value sealed under a DEK.
pub struct Sealed {
    /// The random nonce.
    pub nonce: [u8; GCM_NONCE_LEN],
    /// Ciphertext followed by the tag.
    pub ciphertext: Vec<u8>,
}

/// Encrypts `plaintext` under `dek` with a fresh random nonce.
pub fn seal(dek: &DataKey, aad: &[u8], plaintext: &[u8]) -> Result<Sealed, EnvelopeError> {
    let mut nonce = [0u8; GCM_NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| EnvelopeError::Random)?;
    let ciphertext = gcm_encrypt(dek.expose(), &nonce, aad, plaintext)?;
    Ok(Sealed { nonce, ciphertext })
}

/// Decrypts a sealed value; any mismatch is [`EnvelopeError::Authentication`].
pub fn open(
    dek: &DataKey,
    nonce: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<SecretValue, EnvelopeError> {
    gcm_decrypt(dek.expose(), nonce, aad, ciphertext).map(SecretValue::new)
}

/// AES-GCM encryption (AES-128 or AES-256 by key length, 96-bit nonce, 128-bit tag):
/// returns ciphertext || tag. Exposed for the known-answer tests.
pub fn gcm_encrypt(
    key: &[u8],
    nonce: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let key = gcm_key(key)?;
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| EnvelopeError::KeyLength)?;
    let mut buf = plaintext.to_vec();
    key.seal_in_place_append_tag(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| EnvelopeError::Authentication)?;
    Ok(buf)
}

/// AES-GCM decryption of ciphertext || tag into a zeroizing buffer. Exposed for the
/// known-answer tests.
pub fn gcm_decrypt(
    key: &[u8],
    nonce: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    let key = gcm_key(key)?;
    let nonce =
        Nonce::try_assume_unique_for_key(nonce).map_err(|_| EnvelopeError::Authentication)?;
    let mut buf = Zeroizing::new(ciphertext.to_vec());
    let len = key
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| EnvelopeError::Authentication)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

fn gcm_key(key: &[u8]) -> Result<LessSafeKey, EnvelopeError> {
    let alg = match key.len() {
        16 => &AES_128_GCM,
        32 => &AES_256_GCM,
        _ => return Err(EnvelopeError::KeyLength),
    };
    let key = UnboundKey::new(alg, key).map_err(|_| EnvelopeError::KeyLength)?;
    Ok(LessSafeKey::new(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> SecretName {
        SecretName::parse(s, 256).unwrap()
    }

    fn record_aad(name: &SecretName, version: u64, mk: u32) -> Vec<u8> {
        record_aad_v1(name, version, mk)
    }

    fn meta() -> RecordMeta {
        RecordMeta {
            name: name("a/b"),
            version: 3,
            master_key_version: 1,
            mechanism: crate::secret::Mechanism::AesGcmEnvelopeV1,
            created_at_unix: 1_800_000_000,
            created_by: "spiffe://x/y".into(),
            not_before_unix: None,
            expires_at_unix: Some(1_900_000_000),
        }
    }

    #[test]
    fn the_v1_aad_is_the_encoding_records_were_written_under() {
        // Pinned: records written before v2 open only under exactly these bytes.
        assert_eq!(
            hex::encode(record_aad_v1(&name("a/b"), 3, 1)),
            "7374726f6e67726f6f6d2f7265636f72642f76310003612f62000000000000000300000001"
        );
    }

    #[test]
    fn the_v2_aad_binds_every_field() {
        use crate::secret::{Mechanism, RecordFormat};
        let base = meta();
        let aad = base.aad(RecordFormat::V2);
        assert!(aad.starts_with(b"strongroom/record/v2"));
        assert_ne!(aad, base.aad(RecordFormat::V1));
        type Edit = fn(&mut RecordMeta);
        let edits: Vec<(&str, Edit)> = vec![
            ("name", |m| m.name = SecretName::parse("a/c", 256).unwrap()),
            ("version", |m| m.version = 4),
            ("master key version", |m| m.master_key_version = 2),
            ("mechanism", |m| m.mechanism = Mechanism::AesKwHsmOnlyV1),
            ("created_at", |m| m.created_at_unix += 1),
            ("created_by", |m| m.created_by.push('z')),
            ("not_before", |m| m.not_before_unix = Some(0)),
            ("expires_at", |m| m.expires_at_unix = Some(1_900_000_001)),
            ("expires_at removed", |m| m.expires_at_unix = None),
        ];
        for (what, edit) in edits {
            let mut m = meta();
            edit(&mut m);
            assert_ne!(m.aad(RecordFormat::V2), aad, "{what} is not bound");
        }
        // Presence bytes keep absent and zero apart, and the two times apart.
        let mut a = meta();
        a.not_before_unix = Some(5);
        a.expires_at_unix = None;
        let mut b = meta();
        b.not_before_unix = None;
        b.expires_at_unix = Some(5);
        assert_ne!(a.aad(RecordFormat::V2), b.aad(RecordFormat::V2));
    }

    #[test]
    fn seal_open_round_trip_and_aad_binding() {
        let dek = DataKey::from_slice(&[7u8; 32]).unwrap();
        let aad = record_aad(&name("a/b"), 3, 1);
        let sealed = seal(&dek, &aad, b"hello").unwrap();
        let opened = open(&dek, &sealed.nonce, &aad, &sealed.ciphertext).unwrap();
        assert_eq!(opened.expose(), b"hello");

        for other in [
            record_aad(&name("a/c"), 3, 1),
            record_aad(&name("a/b"), 4, 1),
            record_aad(&name("a/b"), 3, 2),
        ] {
            assert_eq!(
                open(&dek, &sealed.nonce, &other, &sealed.ciphertext).err(),
                Some(EnvelopeError::Authentication)
            );
        }
        let wrong = DataKey::from_slice(&[8u8; 32]).unwrap();
        assert!(open(&wrong, &sealed.nonce, &aad, &sealed.ciphertext).is_err());
    }

    #[test]
    fn aad_encoding_is_unambiguous() {
        // A name that ends in digits must not collide with a shorter name and another version.
        assert_ne!(record_aad(&name("a1"), 1, 1), record_aad(&name("a"), 1, 1));
        assert_ne!(
            record_aad(&name("ab"), 0x0100, 1),
            record_aad(&name("a"), 0x0100, 1)
        );
    }
}
