//! Strict mode (`protection = "hsm-only"`): the data key exists only inside the token.
//!
//! Put: the token generates the data key as a session object (sensitive), encrypts the value
//! with it (C_Encrypt AES-GCM, the record's AAD, a 96-bit IV from the token's RNG), wraps it
//! under the master key with AES-KW (CKM_AES_KEY_WRAP, RFC 3394; the same mechanism number on
//! every token, unlike KWP) and destroys it. Get: the token unwraps the data key into a
//! sensitive, non-extractable session object, decrypts the value with it (C_Decrypt AES-GCM,
//! the same AAD) and destroys it. The AAD is the record's, as the envelope uses it (format v2:
//! the slot and every field that drives a decision), built by the service's one seal/open
//! path (`service/seal.rs`). No session object outlives the call that made it: a
//! [`SessionKey`] destroys its object when dropped, on every error path too.
//!
//! C_WrapKey refuses a key with CKA_EXTRACTABLE=false (CKR_KEY_UNEXTRACTABLE), so the key
//! generated on put is sensitive but extractable, which lets it leave the token only wrapped,
//! never in the clear; it lives for one job. The key unwrapped on get is non-extractable.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism as CkMechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::{HsmError, gcm};
use crate::envelope::{DEK_LEN, GCM_NONCE_LEN, GCM_TAG_LEN};

/// Length of an AES-KW (RFC 3394) wrapping of a data key: the key plus one 8-byte block.
pub const KW_WRAPPED_LEN: usize = DEK_LEN + 8;

const TAG_BITS: u64 = GCM_TAG_LEN as u64 * 8;

/// A value sealed in the token.
pub struct StrictSealed {
    /// The data key wrapped with AES-KW under the master key ([`KW_WRAPPED_LEN`] bytes).
    pub wrapped_dek: Vec<u8>,
    /// The AES-GCM IV of the value.
    pub nonce: Vec<u8>,
    /// The value's ciphertext followed by its tag.
    pub ciphertext: Vec<u8>,
}

/// A data key held as a session object in the token; destroyed when dropped.
pub struct SessionKey<'a> {
    session: &'a Session,
    handle: ObjectHandle,
}

impl SessionKey<'_> {
    /// The object's handle (valid until this value is dropped).
    pub fn handle(&self) -> ObjectHandle {
        self.handle
    }

    /// The security attributes the token reports for the object.
    pub fn security_attributes(&self) -> Result<KeySecurity, HsmError> {
        let attrs = self.session.get_attributes(
            self.handle,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Token,
            ],
        )?;
        let mut out = KeySecurity::default();
        for a in attrs {
            match a {
                Attribute::Sensitive(v) => out.sensitive = Some(v),
                Attribute::Extractable(v) => out.extractable = Some(v),
                Attribute::Token(v) => out.token = Some(v),
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Security attributes of a session key as the token reports them (`None`: not reported).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeySecurity {
    /// CKA_SENSITIVE.
    pub sensitive: Option<bool>,
    /// CKA_EXTRACTABLE.
    pub extractable: Option<bool>,
    /// CKA_TOKEN.
    pub token: Option<bool>,
}

impl Drop for SessionKey<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.session.destroy_object(self.handle) {
            // The object is a session object: it goes when its session closes at the latest.
            tracing::warn!(error = %e, "could not destroy a data key session object");
        }
    }
}

/// The attributes every data key session object gets, besides its usage. (SoftHSM2 2.6.1
/// refuses CKA_MODIFIABLE in an unwrap template with CKR_ATTRIBUTE_READ_ONLY; only the
/// generated key sets it.)
fn base_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Copyable(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
    ]
}

/// Generates a data key in the token as a session object: sensitive, for encryption only,
/// extractable only so that C_WrapKey accepts it.
fn generate_dek(session: &Session) -> Result<SessionKey<'_>, HsmError> {
    let mut template = base_template();
    template.extend([
        Attribute::ValueLen((DEK_LEN as u64).into()),
        Attribute::Modifiable(false),
        Attribute::Extractable(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(false),
    ]);
    let handle = session.generate_key(&CkMechanism::AesKeyGen, &template)?;
    Ok(SessionKey { session, handle })
}

/// Unwraps an AES-KW-wrapped data key under `master` into a sensitive, non-extractable
/// session object that may only decrypt. A wrapping that does not authenticate (tampered,
/// wrong length, wrong master key) is [`HsmError::UnwrapAuthentication`].
pub fn unwrap_dek<'a>(
    session: &'a Session,
    master: ObjectHandle,
    wrapped: &[u8],
) -> Result<SessionKey<'a>, HsmError> {
    if wrapped.len() != KW_WRAPPED_LEN {
        return Err(HsmError::UnwrapAuthentication);
    }
    let mut template = base_template();
    template.extend([
        Attribute::Extractable(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(true),
    ]);
    match session.unwrap_key(&CkMechanism::AesKeyWrap, master, wrapped, &template) {
        Ok(handle) => Ok(SessionKey { session, handle }),
        Err(CkError::Pkcs11(rv, _)) if is_unwrap_authentication(rv) => {
            Err(HsmError::UnwrapAuthentication)
        }
        // Kryoptic answers a wrapping that fails AES-KW's integrity check with
        // CKR_DEVICE_ERROR (see `hsm::unwrap_device_error_is_integrity`); on other tokens a
        // device error stays the transient fault it claims to be.
        Err(CkError::Pkcs11(RvError::DeviceError, _))
            if super::unwrap_device_error_is_integrity() =>
        {
            Err(HsmError::UnwrapAuthentication)
        }
        Err(e) => Err(e.into()),
    }
}

/// Return values of C_UnwrapKey that mean "this wrapping does not open under this key".
fn is_unwrap_authentication(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::GeneralError
    )
}

/// Seals `plaintext` in the token under a fresh data key wrapped by `master`.
pub fn seal(
    session: &Session,
    master: ObjectHandle,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<StrictSealed, HsmError> {
    let dek = generate_dek(session)?;
    let mut nonce = vec![0u8; GCM_NONCE_LEN];
    session.generate_random_slice(&mut nonce)?;
    let ciphertext = gcm::encrypt(session, dek.handle(), &nonce, aad, TAG_BITS, plaintext)?;
    let wrapped_dek = session.wrap_key(&CkMechanism::AesKeyWrap, master, dek.handle())?;
    if wrapped_dek.len() != KW_WRAPPED_LEN {
        return Err(HsmError::BadKeyLength);
    }
    drop(dek);
    Ok(StrictSealed {
        wrapped_dek,
        nonce,
        ciphertext,
    })
}

/// Opens a value sealed by [`seal`]: unwraps its data key into a session object, decrypts in
/// the token, destroys the object. Any failure to authenticate is
/// [`HsmError::UnwrapAuthentication`].
pub fn open(
    session: &Session,
    master: ObjectHandle,
    wrapped: &[u8],
    nonce: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HsmError> {
    if nonce.len() != GCM_NONCE_LEN || ciphertext.len() < GCM_TAG_LEN {
        return Err(HsmError::UnwrapAuthentication);
    }
    let dek = unwrap_dek(session, master, wrapped)?;
    gcm::decrypt(session, dek.handle(), nonce, aad, TAG_BITS, ciphertext)
}
