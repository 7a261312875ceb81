//! The pool's operations as callers use them: the jobs sent to a worker (data keys, strict
//! seal and open, re-wrap, MACs) and the token operations run on the anchor session
//! (master keys and their states, data objects, the audit checkpoint).

use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use zeroize::Zeroizing;

use crate::envelope::DataKey;
use crate::hsm::HsmError;
use crate::hsm::keys::{self, MacKey};
use crate::hsm::strict::StrictSealed;

use super::job::{Job, Op, Reply};
use super::{Hsm, RewrapItem, Rewrapped, WrappedDek};

impl Hsm {
    /// Finds the master keys again (e.g. after an officer generated one).
    pub async fn reload_keys(&self) -> Result<(), HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.reload_keys())
            .await
            .map_err(|_| HsmError::Closed)?
    }

    /// Makes a fresh data key with the token's RNG and wraps it under master key `mk`
    /// (C_Encrypt AES-GCM with `aad`). Returns the key in the clear and wrapped.
    pub async fn new_data_key(
        &self,
        mk: u32,
        aad: Vec<u8>,
        deadline: Duration,
    ) -> Result<(DataKey, WrappedDek), HsmError> {
        match self.submit(Op::NewDek { mk, aad }, deadline).await? {
            Reply::NewDek(dek, wrapped) => Ok((dek, wrapped)),
            _ => Err(HsmError::Closed),
        }
    }

    /// Unwraps a data key (C_Decrypt AES-GCM with `aad`) under master key `mk`.
    pub async fn unwrap_data_key(
        &self,
        mk: u32,
        wrapped: Vec<u8>,
        aad: Vec<u8>,
        deadline: Duration,
    ) -> Result<DataKey, HsmError> {
        match self
            .submit(Op::Unwrap { mk, wrapped, aad }, deadline)
            .await?
        {
            Reply::Dek(dek) => Ok(dek),
            _ => Err(HsmError::Closed),
        }
    }

    /// Strict mode: seals `plaintext` inside the token (see
    /// [`strict::seal`](crate::hsm::strict::seal)) under master key `mk` with `aad`. The data
    /// key never leaves the token in the clear.
    pub async fn strict_seal(
        &self,
        mk: u32,
        aad: Vec<u8>,
        plaintext: Zeroizing<Vec<u8>>,
        deadline: Duration,
    ) -> Result<StrictSealed, HsmError> {
        match self
            .submit(Op::StrictSeal { mk, aad, plaintext }, deadline)
            .await?
        {
            Reply::StrictSealed(sealed) => Ok(sealed),
            _ => Err(HsmError::Closed),
        }
    }

    /// Strict mode: opens a value inside the token (see
    /// [`strict::open`](crate::hsm::strict::open)); only the plaintext comes out.
    pub async fn strict_open(
        &self,
        mk: u32,
        wrapped: Vec<u8>,
        nonce: Vec<u8>,
        aad: Vec<u8>,
        ciphertext: Vec<u8>,
        deadline: Duration,
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let op = Op::StrictOpen {
            mk,
            wrapped,
            nonce,
            aad,
            ciphertext,
        };
        match self.submit(op, deadline).await? {
            Reply::Plaintext(p) => Ok(p),
            _ => Err(HsmError::Closed),
        }
    }

    /// Re-wraps `items` under master key `to` in one job (one trip to a worker): for each,
    /// opens it under its own master key and AAD and seals it again under `to` and its new
    /// AAD with a fresh data key. Envelope records: the old data key is unwrapped
    /// (C_Decrypt), the value opened and sealed again in the worker under a new data key
    /// from the token's RNG, which is wrapped under `to` (C_Encrypt); every host copy (old
    /// key, new key, value) is zeroized when the record is done. Strict records never leave
    /// the token's keys: the old data key is unwrapped into a sensitive, non-extractable
    /// session object and the value decrypted in the token, then sealed in the token under
    /// a new data key wrapped with AES-KW under `to` (as
    /// [`strict::open`](crate::hsm::strict::open) then
    /// [`strict::seal`](crate::hsm::strict::seal)); only the value passes through host
    /// memory, zeroized at once.
    ///
    /// Each answer is the item's: a record that does not authenticate is
    /// [`HsmError::UnwrapAuthentication`] and the others are still done. Any other fault
    /// fails the whole job (after the pool's usual repair and retry).
    pub async fn rewrap(
        &self,
        to: u32,
        items: Vec<RewrapItem>,
        deadline: Duration,
    ) -> Result<Vec<Result<Rewrapped, HsmError>>, HsmError> {
        let n = items.len();
        match self.submit(Op::Rewrap { to, items }, deadline).await? {
            Reply::Rewrapped(out) if out.len() == n => Ok(out),
            _ => Err(HsmError::Closed),
        }
    }

    /// Computes a chain of HMAC-SHA256 tags in the token under MAC key `kind`:
    /// `m_i = HMAC(m_{i-1} || body_i)` with `m_0 = prev`. One queue hop for the whole batch.
    pub async fn mac_chain(
        &self,
        kind: MacKey,
        prev: Vec<u8>,
        bodies: Vec<Vec<u8>>,
        deadline: Duration,
    ) -> Result<Vec<Vec<u8>>, HsmError> {
        match self
            .submit(Op::MacChain { kind, prev, bodies }, deadline)
            .await?
        {
            Reply::Macs(m) => Ok(m),
            _ => Err(HsmError::Closed),
        }
    }

    /// Verifies an HMAC-SHA256 tag in the token.
    pub async fn mac_verify(
        &self,
        kind: MacKey,
        data: Vec<u8>,
        tag: Vec<u8>,
        deadline: Duration,
    ) -> Result<bool, HsmError> {
        match self
            .submit(Op::Verify { kind, data, tag }, deadline)
            .await?
        {
            Reply::Verified(ok) => Ok(ok),
            _ => Err(HsmError::Closed),
        }
    }

    /// Whether the token holds MAC key `kind`.
    pub fn has_mac_key(&self, kind: MacKey) -> bool {
        self.shared
            .macs
            .read()
            .map(|m| m.contains_key(&kind))
            .unwrap_or(false)
    }

    /// Generates the next master key version in the token and starts using it for new
    /// writes; returns its version.
    pub async fn generate_master_key(&self) -> Result<u32, HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let version = shared.with_anchor(keys::generate)?;
            shared.reload_keys()?;
            Ok(version)
        })
        .await
        .map_err(|_| HsmError::Closed)?
    }

    /// Every master key version's state as the token keeps it (see [`lifecycle`]).
    ///
    /// [`lifecycle`]: crate::hsm::lifecycle
    pub async fn key_states(&self) -> Result<crate::hsm::lifecycle::KeyStates, HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            shared.with_anchor(crate::hsm::lifecycle::KeyStates::read)
        })
        .await
        .map_err(|_| HsmError::Closed)?
    }

    /// Every master key version the token holds (whatever its state), lowest first.
    pub async fn master_keys_in_token(&self) -> Result<Vec<u32>, HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            shared.with_anchor(|a| Ok(keys::find(a)?.into_iter().map(|(v, _)| v).collect()))
        })
        .await
        .map_err(|_| HsmError::Closed)?
    }

    /// Moves master key `version` to `state` in the token (destroying its object for
    /// [`Destroyed`](crate::hsm::lifecycle::KeyState::Destroyed)) and finds the keys again, so a
    /// disabled version leaves the keyring at once.
    pub async fn set_key_state(
        &self,
        version: u32,
        state: crate::hsm::lifecycle::KeyState,
    ) -> Result<(), HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            shared.with_anchor(|a| crate::hsm::lifecycle::set_state(a, version, state))?;
            shared.reload_keys()
        })
        .await
        .map_err(|_| HsmError::Closed)?
    }

    /// Reads a private strongroom data object from the token.
    pub async fn read_data(&self, label: impl Into<String>) -> Result<Option<Vec<u8>>, HsmError> {
        let shared = self.shared.clone();
        let label = label.into();
        tokio::task::spawn_blocking(move || shared.with_anchor(|a| keys::read_data(a, &label)))
            .await
            .map_err(|_| HsmError::Closed)?
    }

    /// Writes a private strongroom data object into the token.
    pub async fn write_data(
        &self,
        label: impl Into<String>,
        value: Vec<u8>,
    ) -> Result<(), HsmError> {
        let shared = self.shared.clone();
        let label = label.into();
        tokio::task::spawn_blocking(move || {
            shared.with_anchor(|a| keys::write_data(a, &label, &value))
        })
        .await
        .map_err(|_| HsmError::Closed)?
    }

    /// Every replica's copy of the data object `base`, as (label, value) (see
    /// [`keys::list_data`]).
    pub async fn list_data(
        &self,
        base: impl Into<String>,
    ) -> Result<Vec<(String, Vec<u8>)>, HsmError> {
        let shared = self.shared.clone();
        let base = base.into();
        tokio::task::spawn_blocking(move || shared.with_anchor(|a| keys::list_data(a, &base)))
            .await
            .map_err(|_| HsmError::Closed)?
    }

    /// Destroys the private data object `label`; whether it existed.
    pub async fn delete_data(&self, label: impl Into<String>) -> Result<bool, HsmError> {
        let shared = self.shared.clone();
        let label = label.into();
        tokio::task::spawn_blocking(move || shared.with_anchor(|a| keys::delete_data(a, &label)))
            .await
            .map_err(|_| HsmError::Closed)?
    }

    /// Reads the audit checkpoint object from the token.
    pub async fn read_checkpoint(&self) -> Result<Option<Vec<u8>>, HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.with_anchor(keys::read_checkpoint))
            .await
            .map_err(|_| HsmError::Closed)?
    }

    /// Writes the audit checkpoint object into the token.
    pub async fn write_checkpoint(&self, value: Vec<u8>) -> Result<(), HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            shared.with_anchor(|anchor| keys::write_checkpoint(anchor, &value))
        })
        .await
        .map_err(|_| HsmError::Closed)?
    }

    async fn submit(&self, op: Op, deadline: Duration) -> Result<Reply, HsmError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            op,
            reply,
            deadline: Instant::now().checked_add(deadline),
        };
        let run = async {
            self.jobs.send(job).await.map_err(|_| HsmError::Closed)?;
            rx.await.map_err(|_| HsmError::Closed)?
        };
        tokio::time::timeout(deadline, run)
            .await
            .map_err(|_| HsmError::Timeout)?
    }
}
