//! Secret names, secret values and the sealed record the store keeps.
//!
//! `SecretName` is parsed, never validated after the fact: once a value of the type exists,
//! it obeys the grammar below. `SecretValue` and `DataKey` zeroize on drop and print nothing.

use std::fmt;

use zeroize::Zeroizing;

use crate::proto;

/// The hard ceiling on a name's length in bytes; the configured limit may only be lower.
pub const MAX_NAME_BYTES_CEILING: usize = 1024;
/// The longest a single path segment may be.
pub const MAX_SEGMENT_BYTES: usize = 128;

/// A secret's name: path-like segments joined by `/`, e.g. `payments/db/password`.
///
/// Grammar: `segment ("/" segment)*`, each segment 1–128 bytes of `A–Z a–z 0–9 . _ -`, not
/// `.` or `..`; no leading, trailing or doubled `/`; at most the configured maximum length
/// (default 256 bytes, never more than 1024). Names are case-sensitive.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretName(String);

/// Why a name or prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("secret name is empty")]
    Empty,
    /// Longer than the limit.
    #[error("secret name is {len} bytes, longer than max_name_bytes ({max})")]
    TooLong {
        /// The name's length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A segment is empty (leading, trailing or doubled `/`).
    #[error("secret name has an empty segment (leading, trailing or doubled '/')")]
    EmptySegment,
    /// A segment is `.` or `..`.
    #[error("secret name has a '.' or '..' segment")]
    DotSegment,
    /// A segment is longer than [`MAX_SEGMENT_BYTES`].
    #[error("a secret name segment is longer than {MAX_SEGMENT_BYTES} bytes")]
    SegmentTooLong,
    /// A character outside the grammar.
    #[error("secret name has a character outside A-Z a-z 0-9 . _ - / at byte {at}")]
    BadCharacter {
        /// Byte offset of the first bad character.
        at: usize,
    },
}

impl SecretName {
    /// Parses a name, refusing anything outside the grammar or longer than `max_len` bytes.
    pub fn parse(s: &str, max_len: usize) -> Result<Self, NameError> {
        let max = max_len.min(MAX_NAME_BYTES_CEILING);
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > max {
            return Err(NameError::TooLong { len: s.len(), max });
        }
        if let Some(at) = s.bytes().position(|b| !is_name_byte(b) && b != b'/') {
            return Err(NameError::BadCharacter { at });
        }
        for segment in s.split('/') {
            match segment {
                "" => return Err(NameError::EmptySegment),
                "." | ".." => return Err(NameError::DotSegment),
                s if s.len() > MAX_SEGMENT_BYTES => return Err(NameError::SegmentTooLong),
                _ => {}
            }
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this name lies under `prefix` (see [`NamePrefix`]).
    pub fn is_under(&self, prefix: &NamePrefix) -> bool {
        prefix.matches(self.as_str())
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretName({:?})", self.0)
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// A name prefix for listing and policy: `""` (everything) or a name, optionally ending in `/`.
///
/// Prefixes are segment-aware: `payments` and `payments/` both match `payments/db` and
/// `payments/db/password`; `payments` also matches the name `payments` itself; neither
/// matches `payments-eu/x`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePrefix(String);

impl NamePrefix {
    /// The prefix that matches every name.
    pub fn all() -> Self {
        Self(String::new())
    }

    /// Parses a prefix; `*` is accepted as a synonym for everything.
    pub fn parse(s: &str, max_len: usize) -> Result<Self, NameError> {
        let trimmed = s.strip_suffix('/').unwrap_or(s);
        if trimmed.is_empty() || trimmed == "*" {
            return Ok(Self::all());
        }
        let name = SecretName::parse(trimmed, max_len)?;
        Ok(Self(name.0))
    }

    /// The prefix without a trailing `/` (empty for everything).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` lies under this prefix.
    pub fn matches(&self, name: &str) -> bool {
        if self.0.is_empty() {
            return true;
        }
        match name.strip_prefix(self.0.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

/// A secret value in the clear: zeroized on drop, never printed, cloned or serialised.
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// Takes ownership of plaintext bytes.
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(bytes)
    }

    /// The plaintext. Callers keep it in zeroizing buffers too.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Hands the plaintext over, e.g. to the response that carries it to the client.
    pub fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

/// The encryption scheme of a sealed record. Recorded in every record, so that records of
/// both protections coexist in one store: the record's mechanism decides how it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// DEK wrapped by C_Encrypt AES-GCM (96-bit random IV, 128-bit tag, AAD) under the master
    /// key; value encrypted in process with AES-256-GCM under the DEK with the same AAD.
    AesGcmEnvelopeV1,
    /// Strict mode (`hsm-only`): DEK generated in the token, wrapped with AES-KW
    /// (CKM_AES_KEY_WRAP, RFC 3394) under the master key; value encrypted and decrypted in the
    /// token (C_Encrypt / C_Decrypt AES-GCM, 96-bit IV from the token, 128-bit tag) with the
    /// same AAD as the envelope. The DEK is never in the service's memory.
    AesKwHsmOnlyV1,
}

impl Mechanism {
    /// The id stored in records.
    pub fn id(self) -> u32 {
        match self {
            Mechanism::AesGcmEnvelopeV1 => 1,
            Mechanism::AesKwHsmOnlyV1 => 2,
        }
    }

    /// The mechanism for a stored id.
    pub fn from_id(id: u32) -> Option<Self> {
        match id {
            1 => Some(Mechanism::AesGcmEnvelopeV1),
            2 => Some(Mechanism::AesKwHsmOnlyV1),
            _ => None,
        }
    }

    /// A short human name.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::AesGcmEnvelopeV1 => "aes-gcm-envelope-v1",
            Mechanism::AesKwHsmOnlyV1 => "aes-kw-hsm-only-v1",
        }
    }
}

/// How a secret version is protected: the store's default (`store.protection`), overridable
/// per put.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
pub enum Protection {
    /// The data key is unwrapped by the token into the service's memory (zeroized after
    /// use) and the value is decrypted in process: [`Mechanism::AesGcmEnvelopeV1`].
    #[default]
    #[serde(rename = "envelope")]
    Envelope,
    /// Strict mode: the data key never leaves the token in the clear, the value is
    /// encrypted and decrypted inside it: [`Mechanism::AesKwHsmOnlyV1`].
    #[serde(rename = "hsm-only")]
    HsmOnly,
}

impl Protection {
    /// The mechanism new records of this protection are sealed with.
    pub fn mechanism(self) -> Mechanism {
        match self {
            Protection::Envelope => Mechanism::AesGcmEnvelopeV1,
            Protection::HsmOnly => Mechanism::AesKwHsmOnlyV1,
        }
    }

    /// The protection a PutSecret request asks for: `None` for the store's default, an error
    /// naming the value for one this service does not know.
    pub fn from_request(value: i32) -> Result<Option<Self>, String> {
        match proto::Protection::try_from(value) {
            Ok(proto::Protection::Unspecified) => Ok(None),
            Ok(proto::Protection::Envelope) => Ok(Some(Protection::Envelope)),
            Ok(proto::Protection::HsmOnly) => Ok(Some(Protection::HsmOnly)),
            Err(_) => Err(format!(
                "protection {value} is unknown; use PROTECTION_ENVELOPE (1) or PROTECTION_HSM_ONLY (2)"
            )),
        }
    }

    /// The request field for this protection.
    pub fn to_request(self) -> i32 {
        match self {
            Protection::Envelope => proto::Protection::Envelope as i32,
            Protection::HsmOnly => proto::Protection::HsmOnly as i32,
        }
    }

    /// The configuration spelling (`envelope`, `hsm-only`).
    pub fn name(self) -> &'static str {
        match self {
            Protection::Envelope => "envelope",
            Protection::HsmOnly => "hsm-only",
        }
    }
}

impl std::str::FromStr for Protection {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "envelope" => Ok(Protection::Envelope),
            "hsm-only" => Ok(Protection::HsmOnly),
            other => Err(format!(
                "protection {other:?} is unknown; use \"envelope\" or \"hsm-only\""
            )),
        }
    }
}

/// One sealed secret version, as kept in the store. Contains no plaintext.
pub type SealedRecord = proto::SealedRecordV1;

/// The format of a sealed record: what its AAD binds (see `proto/strongroom/v1/record.proto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFormat {
    /// Records written before v2 (stored format 0): the AAD binds name, version and master
    /// key version ([`crate::envelope::record_aad_v1`]). Still opened; re-wrap upgrades them.
    V1,
    /// The AAD binds every field of [`RecordMeta`] ([`crate::envelope::record_aad`]).
    V2,
}

impl RecordFormat {
    /// The format new records are written in.
    pub const CURRENT: RecordFormat = RecordFormat::V2;

    /// The value of the record's `format` field.
    pub fn stored(self) -> u32 {
        match self {
            RecordFormat::V1 => 0,
            RecordFormat::V2 => 2,
        }
    }

    /// The format a stored `format` field names; `None` for one this service does not know.
    pub fn from_stored(v: u32) -> Option<Self> {
        match v {
            0 | 1 => Some(RecordFormat::V1),
            2 => Some(RecordFormat::V2),
            _ => None,
        }
    }

    /// The number people see (1 or 2).
    pub fn number(self) -> u32 {
        match self {
            RecordFormat::V1 => 1,
            RecordFormat::V2 => 2,
        }
    }
}

/// Everything about a record version but its sealed bytes: the facts that drive decisions
/// (which key and mechanism open it, when it may be served, who wrote it). A v2 record's AAD
/// binds all of it, so none of it can be changed in the store without the record failing to
/// open. Sealing takes one ([`RecordMeta::into_record`]); opening rebuilds it from the slot
/// read and the stored fields ([`RecordMeta::of_slot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    /// The name (on open: the name asked for, not the one the record claims).
    pub name: SecretName,
    /// The version (on open: the version slot read, not the one the record claims).
    pub version: u64,
    /// The master key version that wraps the data key.
    pub master_key_version: u32,
    /// How the record is sealed.
    pub mechanism: Mechanism,
    /// When it was written (Unix seconds).
    pub created_at_unix: i64,
    /// Who wrote it (the caller's identity).
    pub created_by: String,
    /// Not served before this time.
    pub not_before_unix: Option<i64>,
    /// Not served from this time on.
    pub expires_at_unix: Option<i64>,
}

/// Where `now` lies against a version's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Inside: it may be served.
    Open,
    /// Before its `not_before` (the time).
    NotYet(i64),
    /// At or after its `expires_at` (the time).
    Expired(i64),
}

impl RecordMeta {
    /// The metadata of `record` as read from the slot `(name, version)`, with its format.
    /// The slot's identity is used, not the record's claim, so a record copied into another
    /// slot does not open there. An unknown mechanism or format is an error naming it.
    pub fn of_slot(
        record: &SealedRecord,
        name: &SecretName,
        version: u64,
    ) -> Result<(Self, RecordFormat), String> {
        let mechanism = Mechanism::from_id(record.mechanism)
            .ok_or_else(|| format!("unknown mechanism {}", record.mechanism))?;
        let format = RecordFormat::from_stored(record.format)
            .ok_or_else(|| format!("unknown record format {}", record.format))?;
        Ok((
            Self {
                name: name.clone(),
                version,
                master_key_version: record.master_key_version,
                mechanism,
                created_at_unix: record.created_at_unix,
                created_by: record.created_by.clone(),
                not_before_unix: record.not_before_unix,
                expires_at_unix: record.expires_at_unix,
            },
            format,
        ))
    }

    /// The AAD a record of this metadata is sealed under in `format`.
    pub fn aad(&self, format: RecordFormat) -> Vec<u8> {
        match format {
            RecordFormat::V1 => {
                crate::envelope::record_aad_v1(&self.name, self.version, self.master_key_version)
            }
            RecordFormat::V2 => crate::envelope::record_aad(self),
        }
    }

    /// The stored record of this metadata and its sealed parts.
    pub fn into_record(
        self,
        format: RecordFormat,
        wrapped_dek: Vec<u8>,
        nonce: Vec<u8>,
        ciphertext: Vec<u8>,
    ) -> SealedRecord {
        SealedRecord {
            name: self.name.as_str().to_owned(),
            version: self.version,
            master_key_version: self.master_key_version,
            mechanism: self.mechanism.id(),
            wrapped_dek,
            nonce,
            ciphertext,
            created_at_unix: self.created_at_unix,
            created_by: self.created_by,
            expires_at_unix: self.expires_at_unix,
            not_before_unix: self.not_before_unix,
            format: format.stored(),
        }
    }

    /// Where `now` lies against the validity window.
    pub fn window(&self, now: i64) -> Window {
        window(self.not_before_unix, self.expires_at_unix, now)
    }
}

/// Where `now` lies against a window `[not_before, expires_at)`.
pub fn window(not_before: Option<i64>, expires_at: Option<i64>, now: i64) -> Window {
    match (not_before, expires_at) {
        (_, Some(e)) if e <= now => Window::Expired(e),
        (Some(n), _) if now < n => Window::NotYet(n),
        _ => Window::Open,
    }
}

impl fmt::Debug for proto::SealedRecordV1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ciphertext and wrapped keys are not secret, but they are noise in logs.
        f.debug_struct("SealedRecord")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("master_key_version", &self.master_key_version)
            .field("mechanism", &self.mechanism)
            .field("format", &self.format)
            .field("wrapped_dek_len", &self.wrapped_dek.len())
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for proto::PutSecretRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutSecretRequest")
            .field("name", &self.name)
            .field(
                "value",
                &format_args!("<{} bytes redacted>", self.value.len()),
            )
            .field("expected_version", &self.expected_version)
            .field("expires_at_unix", &self.expires_at_unix)
            .field("protection", &self.protection)
            .field("not_before_unix", &self.not_before_unix)
            .field("max_versions", &self.max_versions)
            .finish()
    }
}

impl fmt::Debug for proto::GetSecretResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetSecretResponse")
            .field("name", &self.name)
            .field("version", &self.version)
            .field(
                "value",
                &format_args!("<{} bytes redacted>", self.value.len()),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_grammar() {
        for ok in ["a", "payments/db/password", "A-b_c.d/e", "x/..y"] {
            assert!(SecretName::parse(ok, 256).is_ok(), "{ok}");
        }
        let cases = [
            ("", NameError::Empty),
            ("/a", NameError::EmptySegment),
            ("a/", NameError::EmptySegment),
            ("a//b", NameError::EmptySegment),
            ("a/../b", NameError::DotSegment),
            (".", NameError::DotSegment),
            ("a b", NameError::BadCharacter { at: 1 }),
            ("a\0b", NameError::BadCharacter { at: 1 }),
            ("é", NameError::BadCharacter { at: 0 }),
        ];
        for (bad, want) in cases {
            assert_eq!(SecretName::parse(bad, 256), Err(want), "{bad:?}");
        }
        let long = "a".repeat(257);
        assert_eq!(
            SecretName::parse(&long, 256),
            Err(NameError::TooLong { len: 257, max: 256 })
        );
        assert_eq!(
            SecretName::parse(&"a".repeat(129), 1024),
            Err(NameError::SegmentTooLong)
        );
    }

    #[test]
    fn prefixes_are_segment_aware() {
        let p = NamePrefix::parse("payments/", 256).unwrap();
        assert!(p.matches("payments/db"));
        assert!(p.matches("payments"));
        assert!(!p.matches("payments-eu/db"));
        assert!(!p.matches("pay"));
        assert!(NamePrefix::parse("", 256).unwrap().matches("anything"));
        assert!(NamePrefix::parse("a//", 256).is_err());
    }

    #[test]
    fn redacted_debug_prints_no_value() {
        let req = proto::PutSecretRequest {
            name: "n".into(),
            value: b"canary-7f3a".to_vec(),
            expected_version: None,
            expires_at_unix: None,
            protection: 0,
            ..Default::default()
        };
        let shown = format!("{req:?}");
        assert!(!shown.contains("canary-7f3a"), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
