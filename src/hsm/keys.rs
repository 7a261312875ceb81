//! Master keys: AES-256 token objects born in the token, labelled `strongroom-mk-<version>`.
//!
//! Every master key is created with CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE=true,
//! CKA_EXTRACTABLE=false and CKA_MODIFIABLE=false set explicitly (token defaults differ
//! between implementations and SoftHSM2's are permissive). CKA_COPYABLE is true so the
//! service can make a faster session-object copy, which inherits SENSITIVE and
//! !EXTRACTABLE and can never be made readable.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism as CkMechanism;
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::Session;

use super::HsmError;

/// The label prefix of master keys; the version follows in decimal.
pub const LABEL_PREFIX: &str = "strongroom-mk-";
/// The CKA_ID prefix of master keys; the version follows as 4 big-endian bytes.
pub const ID_PREFIX: &[u8] = b"SRMK";

/// The label of master key `version`.
pub fn label(version: u32) -> String {
    format!("{LABEL_PREFIX}{version}")
}

/// The CKA_ID of master key `version`.
pub fn id(version: u32) -> Vec<u8> {
    let mut id = ID_PREFIX.to_vec();
    id.extend_from_slice(&version.to_be_bytes());
    id
}

/// The template of a new master key.
pub fn template(version: u32) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(true),
        Attribute::Destroyable(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        // For the AES-KW (strict) mechanism to come.
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Label(label(version).into_bytes()),
        Attribute::Id(id(version)),
    ]
}

/// Finds every master key in the token: `(version, handle)`, lowest version first (one
/// handle per version; [`find_trusted`] is what the service uses).
pub fn find(session: &Session) -> Result<Vec<(u32, ObjectHandle)>, HsmError> {
    Ok(find_labelled(session)?
        .into_iter()
        .filter_map(|(v, handles)| handles.first().map(|h| (v, *h)))
        .collect())
}

/// Every AES token key labelled as a master key, grouped by the version in its label.
fn find_labelled(
    session: &Session,
) -> Result<std::collections::BTreeMap<u32, Vec<ObjectHandle>>, HsmError> {
    let handles = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
    ])?;
    let mut by_version: std::collections::BTreeMap<u32, Vec<ObjectHandle>> = Default::default();
    for handle in handles {
        let attrs = session.get_attributes(handle, &[AttributeType::Label])?;
        let version = attrs.iter().find_map(|a| match a {
            Attribute::Label(l) => std::str::from_utf8(l)
                .ok()
                .and_then(|l| l.strip_prefix(LABEL_PREFIX))
                .and_then(|v| v.parse::<u32>().ok()),
            _ => None,
        });
        if let Some(v) = version {
            by_version.entry(v).or_default().push(handle);
        }
    }
    Ok(by_version)
}

/// Master keys the service may use (version, handle), and why others were refused.
pub type TrustedKeys = (Vec<(u32, ObjectHandle)>, Vec<String>);

/// The master keys the service may use: those whose attributes make them unreadable
/// (SENSITIVE, !EXTRACTABLE, ALWAYS_SENSITIVE, NEVER_EXTRACTABLE, PRIVATE) and whose CKA_ID
/// matches their label. A key that fails, or a version held by two objects, is left out and
/// named in the second list: whoever holds the user PIN cannot slip in a readable key.
pub fn find_trusted(session: &Session) -> Result<TrustedKeys, HsmError> {
    let by_version = find_labelled(session)?;
    let mut trusted = Vec::new();
    let mut rejected = Vec::new();
    for (version, handles) in by_version {
        if handles.len() > 1 {
            rejected.push(format!(
                "{}: {} objects carry this label",
                label(version),
                handles.len()
            ));
            continue;
        }
        let handle = handles[0];
        let r = report(session, version, handle)?;
        let mut problems = r.problems();
        // CKA_MODIFIABLE=false is required of keys we generate; an older key without it is
        // still safe to use as long as it cannot be read.
        problems.retain(|p| !p.starts_with("CKA_MODIFIABLE"));
        if r.id != hex::encode(id(version)) {
            problems.push(format!(
                "CKA_ID is {}, expected {}",
                r.id,
                hex::encode(id(version))
            ));
        }
        if problems.is_empty() {
            trusted.push((version, handle));
        } else {
            rejected.push(format!("{}: {}", label(version), problems.join("; ")));
        }
    }
    Ok((trusted, rejected))
}

/// Generates the next master key version inside the token; returns its version.
///
/// SoftHSM2 does not fsync new token objects: the token's files are fsynced here before the
/// version is returned (and so before anything is sealed under it).
pub fn generate(session: &Session) -> Result<u32, HsmError> {
    let next = find(session)?.last().map_or(1, |(v, _)| v + 1);
    session.generate_key(&CkMechanism::AesKeyGen, &template(next))?;
    sync_token()?;
    Ok(next)
}

/// Makes a session-object copy of a master key (CKA_TOKEN=false); it stays sensitive and
/// non-extractable, and lives as long as the session that made it.
pub fn session_copy(session: &Session, key: ObjectHandle) -> Result<ObjectHandle, HsmError> {
    Ok(session.copy_object(key, &[Attribute::Token(false)])?)
}

/// The security attributes of a key as the token reports them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyReport {
    /// Master key version.
    pub version: u32,
    /// CKA_LABEL.
    pub label: String,
    /// CKA_ID in hex.
    pub id: String,
    /// CKA_TOKEN.
    pub token: Option<bool>,
    /// CKA_PRIVATE.
    pub private: Option<bool>,
    /// CKA_SENSITIVE.
    pub sensitive: Option<bool>,
    /// CKA_EXTRACTABLE.
    pub extractable: Option<bool>,
    /// CKA_ALWAYS_SENSITIVE.
    pub always_sensitive: Option<bool>,
    /// CKA_NEVER_EXTRACTABLE.
    pub never_extractable: Option<bool>,
    /// CKA_MODIFIABLE.
    pub modifiable: Option<bool>,
    /// CKA_VALUE_LEN in bytes.
    pub value_len: Option<u64>,
    /// Whether the token would hand out CKA_VALUE (it must not).
    pub value_readable: bool,
}

impl KeyReport {
    /// What is wrong with this key's attributes; empty when it is sound.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut want = |name: &str, got: Option<bool>, want: bool| {
            if got != Some(want) {
                out.push(format!("{name} is {got:?}, must be {want}"));
            }
        };
        want("CKA_TOKEN", self.token, true);
        want("CKA_PRIVATE", self.private, true);
        want("CKA_SENSITIVE", self.sensitive, true);
        want("CKA_EXTRACTABLE", self.extractable, false);
        want("CKA_ALWAYS_SENSITIVE", self.always_sensitive, true);
        want("CKA_NEVER_EXTRACTABLE", self.never_extractable, true);
        want("CKA_MODIFIABLE", self.modifiable, false);
        if self.value_readable {
            out.push("CKA_VALUE is readable".into());
        }
        out
    }
}

/// Reads back the security attributes of a key, and whether CKA_VALUE can be read (asked
/// with a raw C_GetAttributeValue: `get_attributes` silently omits sensitive attributes).
pub fn report(session: &Session, version: u32, key: ObjectHandle) -> Result<KeyReport, HsmError> {
    let attrs = session.get_attributes(
        key,
        &[
            AttributeType::Label,
            AttributeType::Id,
            AttributeType::Token,
            AttributeType::Private,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
            AttributeType::Modifiable,
            AttributeType::ValueLen,
        ],
    )?;
    let mut r = KeyReport {
        version,
        label: String::new(),
        id: String::new(),
        token: None,
        private: None,
        sensitive: None,
        extractable: None,
        always_sensitive: None,
        never_extractable: None,
        modifiable: None,
        value_len: None,
        value_readable: true,
    };
    for a in attrs {
        match a {
            Attribute::Label(l) => r.label = String::from_utf8_lossy(&l).into_owned(),
            Attribute::Id(i) => r.id = hex::encode(i),
            Attribute::Token(b) => r.token = Some(b),
            Attribute::Private(b) => r.private = Some(b),
            Attribute::Sensitive(b) => r.sensitive = Some(b),
            Attribute::Extractable(b) => r.extractable = Some(b),
            Attribute::AlwaysSensitive(b) => r.always_sensitive = Some(b),
            Attribute::NeverExtractable(b) => r.never_extractable = Some(b),
            Attribute::Modifiable(b) => r.modifiable = Some(b),
            Attribute::ValueLen(n) => r.value_len = Some(n.into()),
            _ => {}
        }
    }
    r.value_readable = value_readable(session, key)?;
    Ok(r)
}

/// Whether C_GetAttributeValue(CKA_VALUE) answers with a value.
pub fn value_readable(session: &Session, key: ObjectHandle) -> Result<bool, HsmError> {
    match session.get_attribute_info(key, &[AttributeType::Value]) {
        Ok(info) => Ok(matches!(info.first(), Some(AttributeInfo::Available(_)))),
        Err(CkError::Pkcs11(RvError::AttributeSensitive, _)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The HMAC keys the service keeps in the token besides its master keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MacKey {
    /// Chains the audit log.
    Audit,
    /// Authenticates records officers manage in the store (policies, approvals).
    Store,
}

impl MacKey {
    /// Every MAC key.
    pub const ALL: [MacKey; 2] = [MacKey::Audit, MacKey::Store];

    /// The key's label in the token.
    pub fn label(self) -> &'static str {
        match self {
            MacKey::Audit => "strongroom-mac-audit",
            MacKey::Store => "strongroom-mac-store",
        }
    }
}

/// The template of a new HMAC-SHA256 key: a 32-byte generic secret that can only sign and
/// verify, never leaves the token, and cannot be changed.
pub fn mac_template(kind: MacKey) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Destroyable(true),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Label(kind.label().as_bytes().to_vec()),
    ]
}

/// Finds a MAC key.
pub fn find_mac(session: &Session, kind: MacKey) -> Result<Option<ObjectHandle>, HsmError> {
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(true),
        Attribute::Label(kind.label().as_bytes().to_vec()),
    ])?;
    Ok(found.first().copied())
}

/// Creates the MAC keys that are missing; returns the ones it created.
pub fn ensure_mac_keys(session: &Session) -> Result<Vec<MacKey>, HsmError> {
    let mut created = Vec::new();
    for kind in MacKey::ALL {
        if find_mac(session, kind)?.is_none() {
            session.generate_key(&CkMechanism::GenericSecretKeyGen, &mac_template(kind))?;
            created.push(kind);
        }
    }
    if !created.is_empty() {
        sync_token()?;
    }
    Ok(created)
}

/// Makes the token's files durable after a change (SoftHSM2 does not fsync them).
fn sync_token() -> Result<(), HsmError> {
    crate::durable::sync_softhsm_tokens().map_err(|e| HsmError::Durability(e.to_string()))
}

/// The label of the audit checkpoint data object.
pub const CHECKPOINT_LABEL: &str = "strongroom-audit-checkpoint";
/// The label of the store epoch checkpoint data object.
pub const STORE_CHECKPOINT_LABEL: &str = "strongroom-store-checkpoint";

/// The label of a replica's own copy of the data object `base`: `base@<replica id>`, or
/// `base` itself for a single node (no replica id), so a token written before replicas
/// keeps working. Replica ids are `[a-z0-9-]`, so `@` cannot occur in one.
pub fn replica_label(base: &str, replica_id: &str) -> String {
    if replica_id.is_empty() {
        base.to_owned()
    } else {
        format!("{base}@{replica_id}")
    }
}

/// Every replica's copy of the data object `base` ([`replica_label`], the single node's
/// `base` among them): the private strongroom data objects (CKO_DATA, CKA_APPLICATION
/// `strongroom`) whose label is `base` or starts with `base@`, as (label, newest value).
pub fn list_data(session: &Session, base: &str) -> Result<Vec<(String, Vec<u8>)>, HsmError> {
    reread_listing(|| list_data_once(session, base))
}

fn list_data_once(session: &Session, base: &str) -> Result<Vec<(String, Vec<u8>)>, HsmError> {
    let handles = session.find_objects(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Application(b"strongroom".to_vec()),
    ])?;
    let replica_prefix = format!("{base}@");
    let mut newest: std::collections::BTreeMap<String, (u64, Vec<u8>)> = Default::default();
    for h in handles {
        let mut label = None;
        let mut value = None;
        for a in session.get_attributes(h, &[AttributeType::Label, AttributeType::Value])? {
            match a {
                Attribute::Label(l) => label = String::from_utf8(l).ok(),
                Attribute::Value(v) => value = Some(v),
                _ => {}
            }
        }
        let (Some(label), Some(value)) = (label, value) else {
            continue;
        };
        if (label != base && !label.starts_with(&replica_prefix)) || value.len() < 8 {
            continue;
        }
        let (seq, rest) = value.split_at(8);
        let seq = <[u8; 8]>::try_from(seq).map_or(0, u64::from_be_bytes);
        if newest.get(&label).is_none_or(|(s, _)| seq > *s) {
            newest.insert(label, (seq, rest.to_vec()));
        }
    }
    Ok(newest.into_iter().map(|(l, (_, v))| (l, v)).collect())
}

/// How many times a listing of data objects is read before a failed read of one of them is
/// an error.
const LISTING_ATTEMPTS: u32 = 5;

/// Runs `list` (a C_FindObjects, then C_GetAttributeValue on each object found) again when
/// reading one of the objects failed as it does when the object was destroyed in between:
/// replicas share the token, and another one replaces its checkpoint (a new object, then the
/// old one destroyed) whenever it records one. SoftHSM2 answers the read of the destroyed
/// object with CKR_OBJECT_HANDLE_INVALID, Kryoptic with CKR_GENERAL_ERROR; the next listing
/// no longer finds it. After [`LISTING_ATTEMPTS`] the error stands (fail closed: an object
/// that cannot be read is never skipped, so a checkpoint is never overlooked).
fn reread_listing<T>(mut list: impl FnMut() -> Result<T, HsmError>) -> Result<T, HsmError> {
    let mut attempt = 1;
    loop {
        match list() {
            Err(HsmError::Pkcs11 {
                rv: RvError::ObjectHandleInvalid | RvError::GeneralError,
                function: cryptoki::context::Function::GetAttributeValue,
            }) if attempt < LISTING_ATTEMPTS => {
                std::thread::sleep(std::time::Duration::from_millis(5 << attempt));
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Destroys every copy of the private data object `label`; whether there was one.
pub fn delete_data(session: &Session, label: &str) -> Result<bool, HsmError> {
    let existing = find_data(session, label)?;
    let any = !existing.is_empty();
    for (_, h, _) in existing {
        session.destroy_object(h)?;
    }
    if any {
        sync_token()?;
    }
    Ok(any)
}

/// Reads the audit checkpoint kept in the token (a private data object), if any.
pub fn read_checkpoint(session: &Session) -> Result<Option<Vec<u8>>, HsmError> {
    read_data(session, CHECKPOINT_LABEL)
}

/// Writes the audit checkpoint into the token.
pub fn write_checkpoint(session: &Session, value: &[u8]) -> Result<(), HsmError> {
    write_data(session, CHECKPOINT_LABEL, value)
}

/// Reads a private strongroom data object from the token, if it exists.
pub fn read_data(session: &Session, label: &str) -> Result<Option<Vec<u8>>, HsmError> {
    Ok(find_data(session, label)?
        .into_iter()
        .max_by_key(|(seq, _, _)| *seq)
        .map(|(_, _, value)| value))
}

/// Writes a private strongroom data object. Changing it needs the user PIN, which whoever
/// edits the service's files does not have.
///
/// SoftHSM2 refuses C_SetAttributeValue on a data object's CKA_VALUE, so each write creates
/// a new object (its value prefixed with the next 8-byte sequence number) and then destroys
/// the older ones; a crash in between leaves two, and readers take the highest sequence.
pub fn write_data(session: &Session, label: &str, value: &[u8]) -> Result<(), HsmError> {
    let existing = find_data(session, label)?;
    let next = existing
        .iter()
        .map(|(seq, _, _)| *seq)
        .max()
        .map_or(1, |s| s.saturating_add(1));
    let mut stored = next.to_be_bytes().to_vec();
    stored.extend_from_slice(value);
    session.create_object(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Modifiable(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Application(b"strongroom".to_vec()),
        Attribute::Value(stored),
    ])?;
    for (_, old, _) in existing {
        session.destroy_object(old)?;
    }
    sync_token()
}

/// The data objects carrying `label`: (sequence, handle, value without the sequence).
fn find_data(
    session: &Session,
    label: &str,
) -> Result<Vec<(u64, ObjectHandle, Vec<u8>)>, HsmError> {
    reread_listing(|| find_data_once(session, label))
}

fn find_data_once(
    session: &Session,
    label: &str,
) -> Result<Vec<(u64, ObjectHandle, Vec<u8>)>, HsmError> {
    // Only private objects: creating one needs the user PIN, so whoever can only reach the
    // token's files or a public session cannot plant a checkpoint.
    let handles = session.find_objects(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        let value = session
            .get_attributes(h, &[AttributeType::Value])?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            })
            .unwrap_or_default();
        if value.len() < 8 {
            continue;
        }
        let (seq, rest) = value.split_at(8);
        let seq = <[u8; 8]>::try_from(seq).map_or(0, u64::from_be_bytes);
        out.push((seq, h, rest.to_vec()));
    }
    Ok(out)
}

/// HMAC-SHA256 in the token.
pub fn hmac(session: &Session, key: ObjectHandle, data: &[u8]) -> Result<Vec<u8>, HsmError> {
    Ok(session.sign(&CkMechanism::Sha256Hmac, key, data)?)
}

/// Verifies an HMAC-SHA256 in the token; `false` when it does not match.
pub fn hmac_verify(
    session: &Session,
    key: ObjectHandle,
    data: &[u8],
    tag: &[u8],
) -> Result<bool, HsmError> {
    match session.verify(&CkMechanism::Sha256Hmac, key, data, tag) {
        Ok(()) => Ok(true),
        Err(CkError::Pkcs11(RvError::SignatureInvalid | RvError::SignatureLenRange, _)) => {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// A 32-byte key derived in the token: HMAC-SHA256 under MAC key `kind` of `domain`, a
/// string no other MAC under that key starts with. One token call; the result lives in
/// process (zeroized on drop) and is the same on every replica of the same token and across
/// restarts. The store's state commitment and the ListSecrets page tokens use keys so made.
pub async fn derive_key(
    hsm: &super::Hsm,
    kind: MacKey,
    domain: &[u8],
    timeout: std::time::Duration,
) -> Result<zeroize::Zeroizing<[u8; 32]>, HsmError> {
    if !hsm.has_mac_key(kind) {
        return Err(HsmError::MacKeyMissing(kind.label()));
    }
    let macs = hsm
        .mac_chain(kind, Vec::new(), vec![domain.to_vec()], timeout)
        .await?;
    let tag = zeroize::Zeroizing::new(macs.into_iter().next().unwrap_or_default());
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    if tag.len() != key.len() {
        return Err(HsmError::InvalidParameter(
            "the token's HMAC-SHA256 tag is not 32 bytes",
        ));
    }
    key.copy_from_slice(&tag);
    Ok(key)
}

#[cfg(test)]
mod tests {
    use cryptoki::context::Function;

    use super::*;

    fn failed(rv: RvError, function: Function) -> HsmError {
        HsmError::Pkcs11 { rv, function }
    }

    #[test]
    fn a_listing_whose_object_vanished_is_read_again_and_other_errors_stand() {
        // An object destroyed between C_FindObjects and C_GetAttributeValue (either token's
        // answer): read again until the listing no longer finds it.
        for rv in [RvError::ObjectHandleInvalid, RvError::GeneralError] {
            let mut calls = 0;
            let got = reread_listing(|| {
                calls += 1;
                if calls < 3 {
                    Err(failed(rv, Function::GetAttributeValue))
                } else {
                    Ok(calls)
                }
            });
            assert_eq!(got.ok(), Some(3), "{rv:?}");
        }
        // Never readable: the error stands after the last attempt.
        let mut calls = 0;
        let got: Result<(), _> = reread_listing(|| {
            calls += 1;
            Err(failed(RvError::GeneralError, Function::GetAttributeValue))
        });
        assert!(got.is_err());
        assert_eq!(calls, LISTING_ATTEMPTS);
        // Any other failure is not a vanished object: returned at once.
        for err in [
            failed(RvError::UserNotLoggedIn, Function::GetAttributeValue),
            failed(RvError::GeneralError, Function::FindObjects),
        ] {
            let mut calls = 0;
            let mut err = Some(err);
            let got: Result<(), _> = reread_listing(|| {
                calls += 1;
                Err(err.take().unwrap_or(HsmError::Closed))
            });
            assert!(got.is_err());
            assert_eq!(calls, 1);
        }
    }
}
