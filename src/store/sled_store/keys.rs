//! The store's key layout (see the parent module's documentation): how each kind of key is
//! made and read back, and the error a malformed one gives.

use prost::Message;
use sled::IVec;

use super::{APPROVAL, HEAD, META, NOTICE, POLICY, RECORD};
use crate::proto::HeadV1;
use crate::secret::{SealedRecord, SecretName};
use crate::store::{Aux, Head, StoreError};

pub(super) fn aux_tag(ns: Aux) -> u8 {
    match ns {
        Aux::Policy => POLICY,
        Aux::Approval => APPROVAL,
        Aux::Meta => META,
        Aux::Notice => NOTICE,
    }
}

pub(super) fn aux_key(ns: Aux, key: &str) -> Vec<u8> {
    let mut k = vec![aux_tag(ns)];
    k.extend_from_slice(key.as_bytes());
    k
}

pub(super) fn head_key(name: &SecretName) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.as_str().len());
    k.push(HEAD);
    k.extend_from_slice(name.as_str().as_bytes());
    k
}

pub(super) fn record_prefix(name: &SecretName) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + name.as_str().len());
    k.push(RECORD);
    k.extend_from_slice(name.as_str().as_bytes());
    k.push(0);
    k
}

pub(super) fn record_key(name: &SecretName, version: u64) -> Vec<u8> {
    let mut k = record_prefix(name);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

pub(super) fn decode_head(name: &SecretName, v: &IVec) -> Result<Head, StoreError> {
    let h = HeadV1::decode(v.as_ref()).map_err(|e| corrupt(&head_key(name), e))?;
    Ok(Head::from(h))
}

/// The version a record key names (its last 8 bytes).
pub(super) fn record_version(key: &[u8]) -> Result<u64, StoreError> {
    key.len()
        .checked_sub(8)
        .and_then(|at| <[u8; 8]>::try_from(&key[at..]).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt(key, "not a record key"))
}

pub(super) fn decode_record(key: &[u8], v: &IVec) -> Result<SealedRecord, StoreError> {
    SealedRecord::decode(v.as_ref()).map_err(|e| corrupt(key, e))
}

pub(super) fn corrupt(key: &[u8], e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    }
}
