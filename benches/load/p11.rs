//! Raw PKCS#11 helpers for the child roles that call the token directly (floor, hsm, populate).

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use crate::{MASTER_KEY_LABEL, Res, fail};

pub(crate) fn pkcs11_init(module: &Path) -> Res<Pkcs11> {
    let pkcs11 = Pkcs11::new(module)?;
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    Ok(pkcs11)
}

pub(crate) fn find_slot(pkcs11: &Pkcs11, label: &str) -> Res<Slot> {
    for slot in pkcs11.get_slots_with_initialized_token()? {
        if pkcs11.get_token_info(slot)?.label() == label {
            return Ok(slot);
        }
    }
    fail(format!("no token labelled {label}"))
}

pub(crate) fn user_pin() -> Res<AuthPin> {
    let pin = std::env::var("STRONGROOM_USER_PIN")
        .map_err(|_| "STRONGROOM_USER_PIN is not set for the child role")?;
    Ok(AuthPin::new(pin.into_boxed_str()))
}

pub(crate) fn login(session: &Session, pin: &AuthPin) -> Res<()> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Finds the master key by label and checks it is what the service uses: a token object,
/// sensitive, not extractable.
pub(crate) fn find_master_key(session: &Session) -> Res<ObjectHandle> {
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(MASTER_KEY_LABEL.as_bytes().to_vec()),
    ])?;
    let [key] = found.as_slice() else {
        return fail(format!("{} keys labelled {MASTER_KEY_LABEL}", found.len()));
    };
    let attrs = session.get_attributes(
        *key,
        &[
            AttributeType::Token,
            AttributeType::Sensitive,
            AttributeType::Extractable,
        ],
    )?;
    let (mut token, mut sensitive, mut extractable) = (None, None, None);
    for a in attrs {
        match a {
            Attribute::Token(b) => token = Some(b),
            Attribute::Sensitive(b) => sensitive = Some(b),
            Attribute::Extractable(b) => extractable = Some(b),
            _ => {}
        }
    }
    if token != Some(true) || sensitive != Some(true) || extractable != Some(false) {
        return fail(format!(
            "{MASTER_KEY_LABEL} is not a sensitive, non-extractable token object \
             (token {token:?}, sensitive {sensitive:?}, extractable {extractable:?})"
        ));
    }
    Ok(*key)
}

/// One raw C_Decrypt of AES-GCM(iv, aad) over ciphertext || tag.
pub(crate) fn raw_decrypt(
    session: &Session,
    key: ObjectHandle,
    iv: &[u8],
    aad: &[u8],
    ct: &[u8],
) -> Res<Vec<u8>> {
    let mut iv = iv.to_vec();
    let params = GcmParams::new(&mut iv, aad, 128.into())?;
    Ok(session.decrypt(&Mechanism::AesGcm(params), key, ct)?)
}

/// A data key unwrapped by the token is 32 bytes.
pub(crate) fn check_dek(plain: &[u8]) -> Res<()> {
    if plain.len() == 32 {
        Ok(())
    } else {
        fail("the token returned a data key of the wrong length")
    }
}
