//! The methods of the state the pool's threads share (`Shared`, declared in mod.rs): the
//! anchor session and the keyring it fills, and the recovery of a lost token
//! (re-initialising the library with backoff).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags};
use cryptoki::error::RvError;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use crate::hsm::keys::{self, MacKey};
use crate::hsm::{FaultClass, HsmError};

use super::session::open_anchor;
use super::{KeyCopy, Shared};

impl Shared {
    /// Runs `f` on the anchor session of the current context.
    pub(super) fn with_anchor<R>(
        &self,
        mut f: impl FnMut(&Session) -> Result<R, HsmError>,
    ) -> Result<R, HsmError> {
        if self.lost.load(Ordering::Acquire) {
            return Err(HsmError::Unavailable);
        }
        let ctx = self.ctx.read().map_err(|_| HsmError::Closed)?;
        let mut anchor = ctx.anchor.lock().map_err(|_| HsmError::Closed)?;
        let mut result = f(&anchor);
        if let Err(e) = &result
            && e.class() == FaultClass::SessionLost
        {
            // The anchor itself is gone: open a new one, log in, and retry once. Session
            // copies of master keys died with it, so find the keys again in that mode.
            tracing::warn!(error = %e, "the anchor session is lost; reopening it");
            *anchor = open_anchor(&ctx.pkcs11, ctx.slot, &self.pin)?;
            if self.key_copy == KeyCopy::Session {
                self.reload_keys_on(&anchor)?;
            }
            result = f(&anchor);
        }
        if let Err(e) = &result
            && e.class() == FaultClass::TokenLost
        {
            drop(anchor);
            drop(ctx);
            self.mark_lost(e);
        }
        result
    }

    pub(super) fn reload_keys(&self) -> Result<(), HsmError> {
        self.with_anchor(|anchor| self.reload_keys_on(anchor))
    }

    fn reload_keys_on(&self, anchor: &Session) -> Result<(), HsmError> {
        let mut ring = BTreeMap::new();
        let (trusted, rejected) = keys::find_trusted(anchor)?;
        for why in rejected {
            tracing::error!("refusing a master key: {why}");
        }
        // Disabled and destroyed versions stay out of the keyring (lifecycle.rs).
        let states = crate::hsm::lifecycle::KeyStates::read(anchor)?;
        for (version, handle) in trusted {
            if !states.get(version).opens() {
                continue;
            }
            let working = match self.key_copy {
                KeyCopy::Token => handle,
                KeyCopy::Session => match keys::session_copy(anchor, handle) {
                    Ok(copy) => copy,
                    // Tokens refuse C_CopyObject with a template on a key that has
                    // CKA_MODIFIABLE=false, as our master keys do: SoftHSM2 with
                    // CKR_ATTRIBUTE_READ_ONLY, Kryoptic with CKR_ACTION_PROHIBITED. Use the
                    // token object.
                    Err(HsmError::Pkcs11 {
                        rv: RvError::AttributeReadOnly | RvError::ActionProhibited,
                        ..
                    }) => {
                        tracing::warn!(
                            version,
                            "the token refuses a session copy of this master key; using the token object"
                        );
                        handle
                    }
                    Err(e) => return Err(e),
                },
            };
            ring.insert(version, working);
        }
        let mut macs = BTreeMap::new();
        for kind in MacKey::ALL {
            if let Some(h) = keys::find_mac(anchor, kind)? {
                macs.insert(kind, h);
            }
        }
        *self.macs.write().map_err(|_| HsmError::Closed)? = macs;
        let mut current = self.keyring.write().map_err(|_| HsmError::Closed)?;
        if self.key_copy == KeyCopy::Session {
            // Old session copies are no longer referenced once the ring is replaced; token
            // objects (used where no copy could be made) are never destroyed here.
            let token_objects: Vec<ObjectHandle> =
                keys::find(anchor)?.into_iter().map(|(_, h)| h).collect();
            for old in current.values().filter(|h| !token_objects.contains(h)) {
                let _ = anchor.destroy_object(*old);
            }
        }
        *current = ring;
        Ok(())
    }

    pub(super) fn key(&self, mk: u32) -> Result<ObjectHandle, HsmError> {
        self.keyring
            .read()
            .map_err(|_| HsmError::Closed)?
            .get(&mk)
            .copied()
            .ok_or(HsmError::MasterKeyMissing(mk))
    }

    pub(super) fn keyring_empty(&self) -> bool {
        self.keyring.read().map(|k| k.is_empty()).unwrap_or(true)
    }

    pub(super) fn mac_key(&self, kind: MacKey) -> Result<ObjectHandle, HsmError> {
        self.macs
            .read()
            .map_err(|_| HsmError::Closed)?
            .get(&kind)
            .copied()
            .ok_or(HsmError::MacKeyMissing(kind.label()))
    }

    pub(super) fn relogin(&self) -> Result<(), HsmError> {
        self.with_anchor(|anchor| crate::hsm::login(anchor, &self.pin))
    }

    /// Marks the token lost and wakes the recovery thread.
    pub(super) fn mark_lost(&self, why: &HsmError) {
        if !self.lost.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %why, "the token is lost: answering UNAVAILABLE and re-initialising the PKCS#11 library with backoff");
        }
        if let Ok(mut pending) = self.recover.lock() {
            *pending = true;
        }
        self.recover_signal.notify_all();
    }

    /// Waits for the token to be lost, then re-initialises the library with backoff until
    /// the token is back; the pool then serves again with no process restart.
    pub(super) fn recovery_loop(self: Arc<Self>) {
        loop {
            {
                let Ok(mut pending) = self.recover.lock() else {
                    return;
                };
                while !*pending && !self.closed.load(Ordering::Acquire) {
                    pending = match self.recover_signal.wait(pending) {
                        Ok(p) => p,
                        Err(_) => return,
                    };
                }
                if self.closed.load(Ordering::Acquire) {
                    return;
                }
                *pending = false;
            }
            let mut backoff = Duration::from_millis(50);
            let mut attempt = 0u32;
            loop {
                if self.closed.load(Ordering::Acquire) {
                    return;
                }
                attempt += 1;
                match self.reinitialise() {
                    Ok(generation) => {
                        self.lost.store(false, Ordering::Release);
                        tracing::info!(generation, attempt, "the token is back: serving again");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, retry_in_ms = backoff.as_millis() as u64, "the token is still unavailable");
                        thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    /// Finalises and initialises the library again, finds the token, logs in and finds the
    /// keys. Old sessions are abandoned, never closed: their handles may be reused.
    fn reinitialise(&self) -> Result<u64, HsmError> {
        let mut ctx = self.ctx.write().map_err(|_| HsmError::Closed)?;
        let _ = ctx.pkcs11.clone().finalize();
        ctx.pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
        let slot = crate::hsm::find_token(&ctx.pkcs11, &self.selector)?;
        let anchor = open_anchor(&ctx.pkcs11, slot, &self.pin)?;
        self.reload_keys_on(&anchor)?;
        ctx.slot = slot;
        ctx.anchor = Mutex::new(anchor);
        ctx.generation += 1;
        Ok(ctx.generation)
    }
}
