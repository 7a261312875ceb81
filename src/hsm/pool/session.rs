//! Session setup for the pool: the anchor session and its login, and how many worker
//! sessions the token allows.

use cryptoki::context::Pkcs11;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use crate::hsm::HsmError;

/// Opens the anchor session and logs in. Sessions of the pool are opened "no drop": after a
/// re-initialisation their handles may belong to new sessions, so they are never closed.
pub(super) fn open_anchor(pkcs11: &Pkcs11, slot: Slot, pin: &AuthPin) -> Result<Session, HsmError> {
    // Read-write: officers' operations through the service create token objects.
    let anchor = pkcs11.open_rw_session_no_drop(slot)?;
    crate::hsm::login(&anchor, pin)?;
    Ok(anchor)
}

/// The number of workers that fits the token's session limit (one more session is the
/// anchor).
pub(super) fn fit_workers(pkcs11: &Pkcs11, slot: Slot, wanted: usize) -> Result<usize, HsmError> {
    let info = pkcs11.get_token_info(slot)?;
    let limit = match info.max_session_count() {
        cryptoki::slot::Limit::Max(n) => Some(n as usize),
        _ => None,
    };
    match limit {
        Some(max) if max < 2 => Err(HsmError::InvalidParameter(
            "the token allows fewer than two sessions; strongroom needs an anchor and a worker",
        )),
        Some(max) if wanted + 1 > max => {
            tracing::warn!(
                wanted,
                max,
                "hsm.workers exceeds the token's session limit; using {}",
                max - 1
            );
            Ok(max - 1)
        }
        _ => Ok(wanted),
    }
}
