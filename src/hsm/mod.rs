//! The PKCS#11 token: loading the module, choosing the token, logging in, and the fault
//! classes of `CKR_*` codes.
//!
//! One `Pkcs11` context per process, initialised with OS locking (SoftHSM2 turns its mutexes
//! off without it). The token is chosen by label, serial or RFC 7512 URI, never by slot
//! number. Master keys live in [`keys`]; the worker pool that serves requests in [`pool`];
//! strict mode's in-token sealing in [`strict`].

pub mod admin;
pub mod gcm;
pub mod keys;
pub mod lifecycle;
pub mod pin;
pub mod pool;
pub mod strict;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

pub use pool::{Hsm, HsmOptions, HsmState, KeyCopy};

/// How a `CKR_*` code should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    /// Retry once on a fresh session.
    Transient,
    /// The session is gone: open a new one and retry.
    SessionLost,
    /// The login is gone: log in again and retry.
    LoginLost,
    /// A cached key handle is stale: find the keys again and retry.
    KeyLost,
    /// The token or device is gone: answer UNAVAILABLE until it returns.
    TokenLost,
    /// Authentication of data failed: the input is not what the key sealed.
    Authentication,
    /// A setting is wrong (PIN, mechanism, template): refuse with a message saying what to fix.
    Configuration,
    /// Not served now (lost token being recovered, deadline passed, pool closed): the
    /// answer is UNAVAILABLE and nothing is repaired by this request.
    Unavailable,
    /// Anything else.
    Other,
}

/// Errors from the token.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The module could not be loaded or initialised.
    #[error("cannot load the PKCS#11 module {path}: {source}; check hsm.module")]
    Load {
        /// The module path.
        path: PathBuf,
        /// The loader's error.
        #[source]
        source: CkError,
    },
    /// No token matches the selector.
    #[error("no initialised token matches {0}; run `strongroom-admin token list`")]
    TokenNotFound(String),
    /// A PKCS#11 function failed.
    #[error("C_{function:?} failed: CKR {rv:?}: {}", explain(*rv))]
    Pkcs11 {
        /// The return value.
        rv: RvError,
        /// The function that returned it.
        function: Function,
    },
    /// Another cryptoki error (conversion, null function pointer, …).
    #[error("PKCS#11 error: {0}")]
    Cryptoki(#[source] CkError),
    /// No master key exists in the token.
    #[error("the token holds no strongroom master key; run `strongroom-admin key generate`")]
    NoMasterKey,
    /// A parameter strongroom refuses to pass to the token.
    #[error("invalid parameter: {0}")]
    InvalidParameter(&'static str),
    /// A MAC key is missing from the token.
    #[error(
        "the token holds no key labelled {0}; run `strongroom-admin key generate` (it creates the MAC keys)"
    )]
    MacKeyMissing(&'static str),
    /// The token's files could not be made durable after a change (SoftHSM2).
    #[error("the token's files could not be made durable: {0}")]
    Durability(String),
    /// The record names a master key version the token does not hold.
    #[error("master key version {0} is not in the token")]
    MasterKeyMissing(u32),
    /// The token refused to authenticate a wrapped data key (tampered, or wrong identity).
    #[error("the token could not authenticate the wrapped data key")]
    UnwrapAuthentication,
    /// The token is lost and being recovered.
    #[error("the token is unavailable; strongroomd is re-initialising it")]
    Unavailable,
    /// No answer from the token within the request's deadline.
    #[error("the HSM did not answer within the deadline")]
    Timeout,
    /// The worker pool is shut down.
    #[error("the HSM worker pool has stopped")]
    Closed,
    /// A worker thread could not be started.
    #[error("cannot start an HSM worker thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The token returned a data key of the wrong length.
    #[error("the token returned a data key of the wrong length")]
    BadKeyLength,
}

impl HsmError {
    /// The fault class of this error.
    pub fn class(&self) -> FaultClass {
        match self {
            HsmError::Pkcs11 { rv, .. } => classify(*rv),
            HsmError::UnwrapAuthentication => FaultClass::Authentication,
            HsmError::Timeout | HsmError::Closed | HsmError::Unavailable => FaultClass::Unavailable,
            HsmError::Load { .. }
            | HsmError::TokenNotFound(_)
            | HsmError::NoMasterKey
            | HsmError::MacKeyMissing(_)
            | HsmError::InvalidParameter(_) => FaultClass::Configuration,
            HsmError::MasterKeyMissing(_) => FaultClass::KeyLost,
            HsmError::Cryptoki(_)
            | HsmError::Thread(_)
            | HsmError::BadKeyLength
            | HsmError::Durability(_) => FaultClass::Other,
        }
    }
}

impl From<CkError> for HsmError {
    fn from(e: CkError) -> Self {
        match e {
            CkError::Pkcs11(rv, function) => HsmError::Pkcs11 { rv, function },
            other => HsmError::Cryptoki(other),
        }
    }
}

/// Classifies a `CKR_*` code.
pub fn classify(rv: RvError) -> FaultClass {
    use RvError::*;
    match rv {
        SessionHandleInvalid | SessionClosed => FaultClass::SessionLost,
        UserNotLoggedIn => FaultClass::LoginLost,
        KeyHandleInvalid | ObjectHandleInvalid => FaultClass::KeyLost,
        DeviceRemoved
        | TokenNotPresent
        | TokenNotRecognized
        | CryptokiNotInitialized
        | SlotIdInvalid => FaultClass::TokenLost,
        // A device error on one call is retried on a fresh session; a token that keeps
        // failing answers UNAVAILABLE request by request.
        DeviceError | SessionCount | OperationActive | FunctionCanceled | DeviceMemory
        | HostMemory | CantLock => FaultClass::Transient,
        // SoftHSM2 reports a failed GCM tag as CKR_GENERAL_ERROR; Kryoptic as
        // CKR_ENCRYPTED_DATA_INVALID. Only decrypt paths consult this class.
        EncryptedDataInvalid | EncryptedDataLenRange => FaultClass::Authentication,
        PinIncorrect
        | PinInvalid
        | PinLenRange
        | PinExpired
        | PinLocked
        | MechanismInvalid
        | MechanismParamInvalid
        | KeyTypeInconsistent
        | KeyFunctionNotPermitted
        | TemplateIncomplete
        | TemplateInconsistent
        | AttributeValueInvalid
        | TokenWriteProtected
        | UserPinNotInitialized
        | UserTypeInvalid
        | FunctionNotSupported => FaultClass::Configuration,
        _ => FaultClass::Other,
    }
}

/// A sentence an operator can act on for a `CKR_*` code.
pub fn explain(rv: RvError) -> &'static str {
    use RvError::*;
    match rv {
        PinIncorrect => "the PIN is wrong; check the PIN file or STRONGROOM_USER_PIN",
        PinLocked => {
            "the PIN is locked after too many wrong tries; the security officer must reset it"
        }
        PinLenRange | PinInvalid => "the PIN has a length or characters the token does not accept",
        UserPinNotInitialized => {
            "the token's user PIN was never set; run `strongroom-admin token init`"
        }
        UserNotLoggedIn => "the session is not logged in (the login was dropped)",
        UserAlreadyLoggedIn => "already logged in",
        SessionHandleInvalid | SessionClosed => {
            "the session is gone (token restarted or session closed)"
        }
        SessionCount => "the token has no free sessions; lower hsm.workers or close other clients",
        DeviceRemoved | TokenNotPresent => {
            "the token is not present (removed, or the HSM is unreachable)"
        }
        DeviceError => "the token reported a device error",
        DeviceMemory => "the token is out of memory",
        TokenNotRecognized => "the module does not recognise the token",
        SlotIdInvalid => {
            "the slot no longer exists (tokens are chosen by label; the module renumbered slots)"
        }
        MechanismInvalid => "the token does not support this mechanism",
        MechanismParamInvalid => "the token refused the mechanism's parameters",
        KeyHandleInvalid | ObjectHandleInvalid => {
            "the key handle is stale (key destroyed or token reloaded)"
        }
        KeyFunctionNotPermitted => "the key's attributes do not permit this operation",
        KeyTypeInconsistent => "the key type does not fit the mechanism",
        TemplateIncomplete | TemplateInconsistent => {
            "the object template is incomplete or inconsistent"
        }
        AttributeSensitive => {
            "the attribute is sensitive and cannot be read (as intended for master keys)"
        }
        AttributeValueInvalid => "an attribute value is invalid",
        EncryptedDataInvalid | EncryptedDataLenRange => "the ciphertext failed to authenticate",
        GeneralError => {
            "the token reported a general error (on SoftHSM2 this is also a failed GCM tag)"
        }
        TokenWriteProtected => "the token is write-protected",
        CryptokiNotInitialized => "the PKCS#11 library is not initialised",
        FunctionNotSupported => "the module does not implement this function",
        OperationActive => "another operation is active on this session",
        _ => "see the PKCS#11 specification for this return value",
    }
}

/// Which token to use: by label, by serial number, or by RFC 7512 URI (`pkcs11:token=…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// `CKA_LABEL` of the token (`token_info.label()`, trimmed).
    Label(String),
    /// The token's serial number.
    Serial(String),
    /// An RFC 7512 URI; the `token` and `serial` attributes are matched.
    Uri {
        /// `token=` attribute.
        label: Option<String>,
        /// `serial=` attribute.
        serial: Option<String>,
    },
}

impl FromStr for TokenSelector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("pkcs11:") {
            let mut label = None;
            let mut serial = None;
            for attr in rest.split(['?', ';']) {
                let Some((k, v)) = attr.split_once('=') else {
                    continue;
                };
                let v = percent_decode(v).ok_or_else(|| format!("bad %-escape in {s}"))?;
                match k {
                    "token" => label = Some(v),
                    "serial" => serial = Some(v),
                    _ => {}
                }
            }
            if label.is_none() && serial.is_none() {
                return Err(format!("{s} names neither token= nor serial="));
            }
            Ok(TokenSelector::Uri { label, serial })
        } else if let Some(serial) = s.strip_prefix("serial:") {
            Ok(TokenSelector::Serial(serial.to_owned()))
        } else if s.is_empty() {
            Err("the token label is empty".into())
        } else {
            Ok(TokenSelector::Label(s.to_owned()))
        }
    }
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "label '{l}'"),
            TokenSelector::Serial(s) => write!(f, "serial '{s}'"),
            TokenSelector::Uri { label, serial } => {
                write!(f, "URI (token={label:?}, serial={serial:?})")
            }
        }
    }
}

impl TokenSelector {
    fn matches(&self, label: &str, serial: &str) -> bool {
        match self {
            TokenSelector::Label(l) => l == label,
            TokenSelector::Serial(s) => s == serial,
            TokenSelector::Uri {
                label: l,
                serial: s,
            } => {
                l.as_deref().is_none_or(|l| l == label) && s.as_deref().is_none_or(|s| s == serial)
            }
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Loads and initialises a PKCS#11 module (once per process).
pub fn load_module(path: &Path) -> Result<Pkcs11, HsmError> {
    let load = |source| HsmError::Load {
        path: path.to_owned(),
        source,
    };
    let pkcs11 = Pkcs11::new(path).map_err(load)?;
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(load)?;
    let kryoptic = pkcs11
        .get_library_info()
        .is_ok_and(|i| i.manufacturer_id().trim() == "Kryoptic");
    UNWRAP_DEVICE_ERROR_IS_INTEGRITY.store(kryoptic, Ordering::Relaxed);
    Ok(pkcs11)
}

/// Set by [`load_module`] when the module is Kryoptic: it answers a C_UnwrapKey whose AES-KW
/// integrity check fails with CKR_DEVICE_ERROR (its OpenSSL call failed), where SoftHSM2 and
/// hardware tokens answer CKR_WRAPPED_KEY_INVALID or CKR_ENCRYPTED_DATA_INVALID. (One module
/// per process: PKCS#11 initialises once per process.)
static UNWRAP_DEVICE_ERROR_IS_INTEGRITY: AtomicBool = AtomicBool::new(false);

/// Whether CKR_DEVICE_ERROR from C_UnwrapKey means "this wrapping does not open" on the
/// loaded module (Kryoptic) rather than a failing device.
pub fn unwrap_device_error_is_integrity() -> bool {
    UNWRAP_DEVICE_ERROR_IS_INTEGRITY.load(Ordering::Relaxed)
}

/// Finds the slot holding the initialised token that `selector` names.
pub fn find_token(pkcs11: &Pkcs11, selector: &TokenSelector) -> Result<Slot, HsmError> {
    let mut found = Vec::new();
    for slot in pkcs11.get_slots_with_initialized_token()? {
        let info = pkcs11.get_token_info(slot)?;
        if selector.matches(info.label(), info.serial_number()) {
            found.push(slot);
        }
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(HsmError::TokenNotFound(selector.to_string())),
        // Two tokens with one label: refuse rather than pick one by slot order.
        _ => Err(HsmError::TokenNotFound(format!(
            "{selector} (ambiguous: {} tokens match; select by serial)",
            found.len()
        ))),
    }
}

/// Logs the user in on `session`; an existing login of this process counts as success.
///
/// SoftHSM2 rewrites its `token.object` in place at every login (truncate, then write, no
/// fsync): the token's files are fsynced right after, so that the rewrite is durable before
/// anything else happens. (A power cut inside the rewrite itself is SoftHSM2's to survive.)
pub fn login(session: &Session, pin: &AuthPin) -> Result<(), HsmError> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) => {
            crate::durable::sync_softhsm_tokens().map_err(|e| HsmError::Durability(e.to_string()))
        }
        Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse() {
        assert_eq!(
            "strongroom".parse::<TokenSelector>(),
            Ok(TokenSelector::Label("strongroom".into()))
        );
        assert_eq!(
            "pkcs11:token=my%20token;serial=42".parse::<TokenSelector>(),
            Ok(TokenSelector::Uri {
                label: Some("my token".into()),
                serial: Some("42".into())
            })
        );
        assert!("pkcs11:model=x".parse::<TokenSelector>().is_err());
        assert!("".parse::<TokenSelector>().is_err());
        let uri: TokenSelector = "pkcs11:token=a".parse().unwrap();
        assert!(uri.matches("a", "1"));
        assert!(!uri.matches("b", "1"));
    }

    #[test]
    fn fault_classes() {
        assert_eq!(
            classify(RvError::SessionHandleInvalid),
            FaultClass::SessionLost
        );
        assert_eq!(classify(RvError::DeviceRemoved), FaultClass::TokenLost);
        assert_eq!(classify(RvError::PinIncorrect), FaultClass::Configuration);
        assert_eq!(classify(RvError::UserNotLoggedIn), FaultClass::LoginLost);
    }
}
