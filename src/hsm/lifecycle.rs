//! The life of a master key version: active → decrypt-only → disabled → destroyed.
//!
//! Each version's state is kept in the token, as one private strongroom data object
//! ([`STATES_LABEL`], written with the user PIN through [`keys::write_data`]), never in the
//! store: whoever can write the store's files cannot bring a disabled key back. A version
//! with no entry is active. Decrypt-only versions open records but never seal (only the
//! newest version seals); disabled versions are left out of the service's keyring, so
//! nothing opens under them; a destroyed version's key object is gone from the token
//! (C_DestroyObject). Which step is allowed when is the service's decision
//! (`service::rewrap`); this module keeps the states and carries them out in the token.

use std::collections::BTreeMap;

use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::Session;
use serde::{Deserialize, Serialize};

use super::{HsmError, keys};

/// The label of the token data object holding every version's state.
pub const STATES_LABEL: &str = "strongroom-master-key-states";

/// Where a master key version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    /// Seals (when newest) and opens.
    Active,
    /// Opens records, never seals.
    DecryptOnly,
    /// Neither: left out of the keyring; its object is still in the token.
    Disabled,
    /// Its object is destroyed in the token.
    Destroyed,
}

impl KeyState {
    /// The name officers type and read.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Disabled => "disabled",
            KeyState::Destroyed => "destroyed",
        }
    }

    /// The state named `s` ([`as_str`](Self::as_str)).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(KeyState::Active),
            "decrypt-only" => Some(KeyState::DecryptOnly),
            "disabled" => Some(KeyState::Disabled),
            "destroyed" => Some(KeyState::Destroyed),
            _ => None,
        }
    }

    /// The one state this one may move to (each step is its own dual-control operation).
    pub fn next(self) -> Option<Self> {
        match self {
            KeyState::Active => Some(KeyState::DecryptOnly),
            KeyState::DecryptOnly => Some(KeyState::Disabled),
            KeyState::Disabled => Some(KeyState::Destroyed),
            KeyState::Destroyed => None,
        }
    }

    /// Whether records may be opened under a version in this state.
    pub fn opens(self) -> bool {
        matches!(self, KeyState::Active | KeyState::DecryptOnly)
    }
}

/// Every version's state as the token keeps it (versions not listed are active).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStates(BTreeMap<u32, KeyState>);

impl KeyStates {
    /// The state of `version`.
    pub fn get(&self, version: u32) -> KeyState {
        self.0.get(&version).copied().unwrap_or(KeyState::Active)
    }

    /// Every version with a recorded state.
    pub fn recorded(&self) -> impl Iterator<Item = (u32, KeyState)> + '_ {
        self.0.iter().map(|(v, s)| (*v, *s))
    }

    /// Reads the states from the token (none recorded: every version active). A data
    /// object that does not parse is an error, never "all active".
    pub fn read(session: &Session) -> Result<Self, HsmError> {
        match keys::read_data(session, STATES_LABEL)? {
            None => Ok(Self::default()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|_| {
                HsmError::InvalidParameter("the master key states in the token do not parse")
            }),
        }
    }

    /// Writes the states into the token (made durable before it returns).
    fn write(&self, session: &Session) -> Result<(), HsmError> {
        let bytes = serde_json::to_vec(self)
            .map_err(|_| HsmError::InvalidParameter("the master key states do not encode"))?;
        keys::write_data(session, STATES_LABEL, &bytes)
    }
}

/// Records `version` as `state` in the token; for [`KeyState::Destroyed`] destroys its key
/// object first (C_DestroyObject; SoftHSM2 removes the object's file), so a crash between
/// the two leaves the version disabled with no key, and the step can be run again.
pub fn set_state(session: &Session, version: u32, state: KeyState) -> Result<(), HsmError> {
    if state == KeyState::Destroyed {
        let handles = session.find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Label(keys::label(version).into_bytes()),
        ])?;
        for h in handles {
            session.destroy_object(h)?;
        }
    }
    let mut states = KeyStates::read(session)?;
    states.0.insert(version, state);
    states.write(session)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_step_forward_only_and_parse_back() {
        let mut s = KeyState::Active;
        let mut seen = vec![s];
        while let Some(n) = s.next() {
            assert!(n > s);
            s = n;
            seen.push(s);
        }
        assert_eq!(seen.len(), 4);
        for s in seen {
            assert_eq!(KeyState::parse(s.as_str()), Some(s));
        }
        assert_eq!(KeyState::parse("retired"), None);
        assert!(KeyState::DecryptOnly.opens() && !KeyState::Disabled.opens());
        let states = KeyStates::default();
        assert_eq!(states.get(7), KeyState::Active);
    }
}
