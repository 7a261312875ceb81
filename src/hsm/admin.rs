//! Officer operations against the token itself: list tokens, initialise one, and check that
//! everything the service needs is in place (`doctor`).

use cryptoki::context::Pkcs11;
use cryptoki::mechanism::MechanismType;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use serde::Serialize;

use super::{HsmError, TokenSelector, keys};

/// A slot and the token in it, as `token list` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct TokenSummary {
    /// The slot id (for information only: tokens are chosen by label).
    pub slot: u64,
    /// Slot description.
    pub slot_description: String,
    /// Whether a token is present.
    pub present: bool,
    /// Whether the token is initialised.
    pub initialized: bool,
    /// Token label.
    pub label: String,
    /// Token serial number.
    pub serial: String,
    /// Token manufacturer and model.
    pub model: String,
    /// Whether the user PIN is set.
    pub user_pin_initialized: bool,
    /// Whether login is required.
    pub login_required: bool,
    /// Whether the user PIN is locked.
    pub user_pin_locked: bool,
}

/// Every slot the module reports, with its token if any.
pub fn list_tokens(pkcs11: &Pkcs11) -> Result<Vec<TokenSummary>, HsmError> {
    let mut out = Vec::new();
    for slot in pkcs11.get_all_slots()? {
        let info = pkcs11.get_slot_info(slot)?;
        let mut summary = TokenSummary {
            slot: slot.id(),
            slot_description: info.slot_description().to_owned(),
            present: info.token_present(),
            initialized: false,
            label: String::new(),
            serial: String::new(),
            model: String::new(),
            user_pin_initialized: false,
            login_required: false,
            user_pin_locked: false,
        };
        if info.token_present() {
            let t = pkcs11.get_token_info(slot)?;
            summary.initialized = t.token_initialized();
            summary.label = t.label().to_owned();
            summary.serial = t.serial_number().to_owned();
            summary.model = format!("{} {}", t.manufacturer_id(), t.model());
            summary.user_pin_initialized = t.user_pin_initialized();
            summary.login_required = t.login_required();
            summary.user_pin_locked = t.user_pin_locked();
        }
        out.push(summary);
    }
    Ok(out)
}

/// Why `token init` refused.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A token with the label exists already.
    #[error("a token labelled '{0}' exists already; choose another label")]
    LabelTaken(String),
    /// No slot has an uninitialised token.
    #[error(
        "no slot holds an uninitialised token; check the module's configuration (SoftHSM2: SOFTHSM2_CONF and its tokendir; Kryoptic: KRYOPTIC_CONF and its [[slots]])"
    )]
    NoFreeSlot,
    /// The label is too long for a token label (32 bytes).
    #[error("the token label must be 1 to 32 bytes")]
    BadLabel,
    /// The token failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
}

/// Initialises a fresh token with `label`, sets its SO PIN and user PIN; returns its serial.
pub fn init_token(
    pkcs11: &Pkcs11,
    label: &str,
    so_pin: &AuthPin,
    user_pin: &AuthPin,
) -> Result<String, InitError> {
    if label.is_empty() || label.len() > 32 {
        return Err(InitError::BadLabel);
    }
    if super::find_token(pkcs11, &TokenSelector::Label(label.to_owned())).is_ok() {
        return Err(InitError::LabelTaken(label.to_owned()));
    }
    let mut free = None;
    for slot in pkcs11.get_slots_with_token().map_err(HsmError::from)? {
        if !pkcs11
            .get_token_info(slot)
            .map_err(HsmError::from)?
            .token_initialized()
        {
            free = Some(slot);
            break;
        }
    }
    let slot = free.ok_or(InitError::NoFreeSlot)?;
    pkcs11
        .init_token(slot, so_pin, label)
        .map_err(HsmError::from)?;
    // SoftHSM2 moves an initialised token to a new slot: find it again by label.
    let slot = super::find_token(pkcs11, &TokenSelector::Label(label.to_owned()))?;
    let session = pkcs11.open_rw_session(slot).map_err(HsmError::from)?;
    session
        .login(UserType::So, Some(so_pin))
        .map_err(HsmError::from)?;
    session.init_pin(user_pin).map_err(HsmError::from)?;
    session.logout().map_err(HsmError::from)?;
    // The MAC keys for the audit chain and officer-managed records are born with the token.
    super::login(&session, user_pin)?;
    keys::ensure_mac_keys(&session)?;
    session.logout().map_err(HsmError::from)?;
    Ok(pkcs11
        .get_token_info(slot)
        .map_err(HsmError::from)?
        .serial_number()
        .to_owned())
}

/// One `doctor` check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do when it failed.
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &str, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Checks, in order, that the module loads, the token exists, login works, the mechanisms
/// are there, and every master key is sound and usable. Stops at the first check that makes
/// the rest meaningless.
pub fn doctor(
    module: &std::path::Path,
    selector: &TokenSelector,
    pin: Option<&AuthPin>,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let pkcs11 = match super::load_module(module) {
        Ok(p) => {
            let desc = p
                .get_library_info()
                .map(|i| format!("{} {}", i.manufacturer_id(), i.library_description()))
                .unwrap_or_default();
            checks.push(Check::pass(
                "module",
                format!("{} loaded ({desc})", module.display()),
            ));
            p
        }
        Err(e) => {
            checks.push(Check::fail(
                "module",
                e.to_string(),
                "install the module (for SoftHSM2: apt-get install softhsm2) or fix --module / STRONGROOM_PKCS11_MODULE",
            ));
            return checks;
        }
    };
    let slot = match super::find_token(&pkcs11, selector) {
        Ok(slot) => {
            checks.push(Check::pass("token", format!("{selector} found")));
            slot
        }
        Err(e) => {
            checks.push(Check::fail(
                "token",
                e.to_string(),
                "run `strongroom-admin token list`, then `token init --label L` or fix --token / STRONGROOM_TOKEN",
            ));
            return checks;
        }
    };
    let mechanisms = pkcs11.get_mechanism_list(slot).unwrap_or_default();
    for (mech, what, required) in [
        (MechanismType::AES_KEY_GEN, "AES key generation", true),
        (
            MechanismType::AES_GCM,
            "AES-GCM (data key wrap and unwrap)",
            true,
        ),
        (
            MechanismType::AES_KEY_WRAP,
            "AES-KW (strict mode, protection = \"hsm-only\")",
            false,
        ),
        (
            MechanismType::SHA256_HMAC,
            "HMAC-SHA256 (audit chain, policy records)",
            true,
        ),
        (
            MechanismType::GENERIC_SECRET_KEY_GEN,
            "generic secret generation (MAC keys)",
            true,
        ),
    ] {
        let name = format!("mechanism {mech}");
        if mechanisms.contains(&mech) {
            checks.push(Check::pass(&name, format!("{what} supported")));
        } else if required {
            checks.push(Check::fail(
                &name,
                format!("{what} is not supported by this token"),
                "use a token that supports it",
            ));
        } else {
            checks.push(Check {
                name,
                ok: true,
                detail: format!(
                    "{what} not supported: envelope records work, hsm-only records cannot be written or read"
                ),
                fix: None,
            });
        }
    }
    let Some(pin) = pin else {
        checks.push(Check::fail(
            "login",
            "no user PIN given",
            "give --user-pin-file or set STRONGROOM_USER_PIN",
        ));
        return checks;
    };
    let session = match pkcs11.open_ro_session(slot).map_err(HsmError::from) {
        Ok(s) => s,
        Err(e) => {
            checks.push(Check::fail(
                "session",
                e.to_string(),
                "check the token's session limit",
            ));
            return checks;
        }
    };
    if let Err(e) = super::login(&session, pin) {
        checks.push(Check::fail("login", e.to_string(), "check the user PIN"));
        return checks;
    }
    checks.push(Check::pass("login", "user login works"));
    let found = match keys::find(&session) {
        Ok(k) => k,
        Err(e) => {
            checks.push(Check::fail("master keys", e.to_string(), "check the token"));
            return checks;
        }
    };
    for kind in keys::MacKey::ALL {
        match keys::find_mac(&session, kind) {
            Ok(Some(_)) => checks.push(Check::pass(kind.label(), "present")),
            Ok(None) => checks.push(Check::fail(
                kind.label(),
                "missing",
                "run `strongroom-admin key generate` (it creates missing MAC keys)",
            )),
            Err(e) => checks.push(Check::fail(kind.label(), e.to_string(), "check the token")),
        }
    }
    if found.is_empty() {
        checks.push(Check::fail(
            "master keys",
            "no strongroom master key in the token",
            "run `strongroom-admin key generate`",
        ));
        return checks;
    }
    for (version, handle) in found {
        let name = format!("master key {version}");
        match keys::report(&session, version, handle) {
            Ok(r) if r.problems().is_empty() => {
                checks.push(Check::pass(&name, "attributes sound; CKA_VALUE unreadable"))
            }
            Ok(r) => checks.push(Check::fail(
                &name,
                r.problems().join("; "),
                "this key is not safe: generate a new version with `strongroom-admin key generate` and retire this one",
            )),
            Err(e) => checks.push(Check::fail(&name, e.to_string(), "check the token")),
        }
        match gcm_round_trip(&session, handle) {
            Ok(()) => checks.push(Check::pass(
                &format!("{name} use"),
                "AES-GCM wrap and unwrap with AAD round-trip",
            )),
            Err(e) => checks.push(Check::fail(
                &format!("{name} use"),
                e.to_string(),
                "the key cannot wrap data keys: check its CKA_ENCRYPT/CKA_DECRYPT",
            )),
        }
    }
    checks
}

fn gcm_round_trip(
    session: &cryptoki::session::Session,
    key: cryptoki::object::ObjectHandle,
) -> Result<(), HsmError> {
    let aad = b"strongroom doctor";
    let data = [0x5au8; 32];
    let mut iv = [0u8; 12];
    session.generate_random_slice(&mut iv)?;
    let ct = super::gcm::encrypt(session, key, &iv, aad, 128, &data)?;
    let pt = super::gcm::decrypt(session, key, &iv, aad, 128, &ct)?;
    if pt.as_slice() != data {
        return Err(HsmError::UnwrapAuthentication);
    }
    Ok(())
}
