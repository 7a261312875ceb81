//! AES-GCM inside the token (C_Encrypt / C_Decrypt with AAD): how data keys are wrapped and
//! unwrapped in the envelope mechanism. The IV is carried in front of the ciphertext.

use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism as CkMechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::{FaultClass, HsmError};

/// The IV lengths passed to the token. SoftHSM2 2.6.1 silently encrypts under a different
/// IV when given an empty IV or one longer than 128 bytes (found by the Wycheproof vectors),
/// so anything outside this range is refused before it reaches the token.
pub const IV_LEN_RANGE: std::ops::RangeInclusive<usize> = 1..=128;

fn check_iv(iv: &[u8]) -> Result<(), HsmError> {
    if IV_LEN_RANGE.contains(&iv.len()) {
        Ok(())
    } else {
        Err(HsmError::InvalidParameter(
            "AES-GCM IV must be 1 to 128 bytes",
        ))
    }
}

/// Encrypts `plaintext` under `key` in the token: returns ciphertext || tag.
pub fn encrypt(
    session: &Session,
    key: ObjectHandle,
    iv: &[u8],
    aad: &[u8],
    tag_bits: u64,
    plaintext: &[u8],
) -> Result<Vec<u8>, HsmError> {
    check_iv(iv)?;
    let mut iv = iv.to_vec();
    let params = GcmParams::new(&mut iv, aad, tag_bits.into())?;
    Ok(session.encrypt(&CkMechanism::AesGcm(params), key, plaintext)?)
}

/// Decrypts ciphertext || tag under `key` in the token into a zeroizing buffer. Any failure
/// to authenticate is [`HsmError::UnwrapAuthentication`]: SoftHSM2 reports a bad tag as
/// CKR_GENERAL_ERROR, Kryoptic as CKR_ENCRYPTED_DATA_INVALID.
pub fn decrypt(
    session: &Session,
    key: ObjectHandle,
    iv: &[u8],
    aad: &[u8],
    tag_bits: u64,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HsmError> {
    check_iv(iv)?;
    let mut iv = iv.to_vec();
    let params = GcmParams::new(&mut iv, aad, tag_bits.into())?;
    match session.decrypt(&CkMechanism::AesGcm(params), key, ciphertext) {
        Ok(p) => Ok(Zeroizing::new(p)),
        Err(e) => Err(match HsmError::from(e) {
            HsmError::Pkcs11 { rv, .. }
                if rv == RvError::GeneralError
                    || super::classify(rv) == FaultClass::Authentication =>
            {
                HsmError::UnwrapAuthentication
            }
            other => other,
        }),
    }
}
