//! The etcd key layout: keys of each kind under the prefix, their mapping to the common
//! layout the commitment is defined over, and the values' encodings.

use prost::Message;

use crate::proto::HeadV1;
use crate::secret::{SealedRecord, SecretName};
use crate::store::commitment::{EPOCH, STATE, STORE_ID};
use crate::store::{Aux, Head, StoreError};

use super::EtcdStore;

/// The first byte of a key outside the layout in the common layout of the commitment: no
/// kind uses it, so such a key never passes for a record the service reads.
pub(super) const FOREIGN_KIND: u8 = 0xff;

impl EtcdStore {
    /// The etcd key of a kind (`h`, `r`, `w`, `p`, `a`, `m`) and a suffix.
    pub(super) fn key(&self, tag: u8, rest: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + 2 + rest.len());
        k.extend_from_slice(&self.prefix);
        k.push(tag);
        k.push(b'/');
        k.extend_from_slice(rest);
        k
    }

    /// Where the keys of a kind start (`P tag/`) and end (`P tag0`).
    pub(super) fn kind_range(&self, tag: u8) -> (Vec<u8>, Vec<u8>) {
        let start = self.key(tag, b"");
        let mut end = start.clone();
        // The last byte is '/': '0' follows it.
        if let Some(last) = end.last_mut() {
            *last = b'0';
        }
        (start, end)
    }

    pub(super) fn head_key(&self, name: &SecretName) -> Vec<u8> {
        self.key(b'h', name.as_str().as_bytes())
    }

    pub(super) fn record_prefix(&self, name: &SecretName) -> Vec<u8> {
        let mut k = self.key(b'r', name.as_str().as_bytes());
        k.push(0);
        k
    }

    pub(super) fn record_key(&self, name: &SecretName, version: u64) -> Vec<u8> {
        let mut k = self.record_prefix(name);
        k.extend_from_slice(format!("{version:020}").as_bytes());
        k
    }

    /// The version a record key names (its last 20 decimal digits).
    pub(super) fn record_version(&self, key: &[u8]) -> Result<u64, StoreError> {
        key.len()
            .checked_sub(20)
            .and_then(|at| decimal(&key[at..], 20))
            .ok_or_else(|| corrupt(key, "not a record key"))
    }

    pub(super) fn aux_key(&self, ns: Aux, key: &str) -> Vec<u8> {
        self.key(aux_tag(ns), key.as_bytes())
    }

    /// The frame's keys: identity, epoch, commitment with its tag.
    pub(super) fn frame_keys(&self) -> [Vec<u8>; 3] {
        [STORE_ID, EPOCH, STATE].map(|k| self.aux_key(Aux::Meta, k))
    }

    /// Every key of the store: `[P, P')` where `P'` follows the prefix's final `/`.
    pub(super) fn all_range(&self) -> (Vec<u8>, Vec<u8>) {
        let start = self.prefix.clone();
        let mut end = start.clone();
        // Validation (config.rs) requires the prefix to end in '/': '0' follows it.
        if let Some(last) = end.last_mut() {
            *last = b'0';
        }
        (start, end)
    }

    /// `key` (under the prefix) in the common layout the commitment is defined over (see
    /// [`commitment`](crate::store::commitment)): the kind byte, then the name or key, with
    /// versions and master key versions as big-endian integers. A key that fits no kind
    /// keeps its bytes behind [`FOREIGN_KIND`].
    pub(super) fn canonical(&self, key: &[u8]) -> Vec<u8> {
        let rest = key.strip_prefix(self.prefix.as_slice()).unwrap_or(key);
        let foreign = || {
            let mut k = vec![FOREIGN_KIND];
            k.extend_from_slice(rest);
            k
        };
        let (Some(&kind), Some(b'/')) = (rest.first(), rest.get(1)) else {
            return foreign();
        };
        let body = &rest[2..];
        let mut k = Vec::with_capacity(body.len() + 1);
        k.push(kind);
        match kind {
            b'h' | b'p' | b'a' | b'm' | b'e' => k.extend_from_slice(body),
            b'r' => {
                let Some(nul) = body.iter().rposition(|&b| b == 0) else {
                    return foreign();
                };
                let Some(version) = decimal(&body[nul + 1..], 20) else {
                    return foreign();
                };
                k.extend_from_slice(&body[..=nul]);
                k.extend_from_slice(&version.to_be_bytes());
            }
            b'w' => {
                let Some(mk) = decimal(body, 10).and_then(|v| u32::try_from(v).ok()) else {
                    return foreign();
                };
                k.extend_from_slice(&mk.to_be_bytes());
            }
            _ => return foreign(),
        }
        k
    }

    /// The etcd key of a key in the common layout: the inverse of
    /// [`canonical`](Self::canonical).
    pub(super) fn etcd_key_of(&self, key: &[u8]) -> Result<Vec<u8>, StoreError> {
        let bad = || corrupt(key, "not a key in the common layout");
        let (&kind, body) = key.split_first().ok_or_else(bad)?;
        Ok(match kind {
            FOREIGN_KIND => {
                let mut k = self.prefix.clone();
                k.extend_from_slice(body);
                k
            }
            b'h' | b'p' | b'a' | b'm' | b'e' => self.key(kind, body),
            b'r' => {
                let at = body.len().checked_sub(8).ok_or_else(bad)?;
                let (name, version) = body.split_at(at);
                let version = u64::from_be_bytes(version.try_into().map_err(|_| bad())?);
                let mut rest = name.to_vec();
                rest.extend_from_slice(format!("{version:020}").as_bytes());
                self.key(kind, &rest)
            }
            b'w' => {
                let mk = u32::from_be_bytes(body.try_into().map_err(|_| bad())?);
                self.key(kind, format!("{mk:010}").as_bytes())
            }
            _ => return Err(bad()),
        })
    }
}

/// `digits` ASCII digits exactly, as a number.
pub(super) fn decimal(d: &[u8], digits: usize) -> Option<u64> {
    if d.len() != digits || !d.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(d).ok()?.parse().ok()
}

pub(super) fn encode_head(h: &Head) -> Vec<u8> {
    HeadV1::from(*h).encode_to_vec()
}

pub(super) fn aux_tag(ns: Aux) -> u8 {
    match ns {
        Aux::Policy => b'p',
        Aux::Approval => b'a',
        Aux::Meta => b'm',
        Aux::Notice => b'e',
    }
}

pub(super) fn decode_epoch(v: &[u8]) -> u64 {
    <[u8; 8]>::try_from(v).map_or(0, u64::from_be_bytes)
}

pub(super) fn decode_head(key: &[u8], v: &[u8]) -> Result<Head, StoreError> {
    let h = HeadV1::decode(v).map_err(|e| corrupt(key, e))?;
    Ok(Head::from(h))
}

pub(super) fn decode_record(key: &[u8], v: &[u8]) -> Result<SealedRecord, StoreError> {
    SealedRecord::decode(v).map_err(|e| corrupt(key, e))
}

pub(super) fn corrupt(key: &[u8], e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    }
}
