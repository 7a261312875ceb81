//! Sealing and opening records: the one place where a record's metadata becomes its AAD.
//!
//! [`seal`] takes a version's whole [`RecordMeta`] and its value and returns the record to
//! store, written in the current format (v2: the AAD binds every field of the metadata).
//! [`open`] takes a stored record and the slot it was read from — the name asked for and
//! the version slot read (for a read of the latest, the version the head names) — and
//! rebuilds the AAD from the slot and the stored fields in the record's own format, so a
//! record copied into another slot, or with any bound field edited, fails to open
//! (DATA_LOSS). Writers (PutSecret, and any re-seal of an existing version) go through
//! [`seal`]; readers through [`open`].

use std::time::Duration;

use zeroize::Zeroizing;

use super::State;
use crate::envelope;
use crate::error::Error;
use crate::secret::{Mechanism, RecordFormat, RecordMeta, SealedRecord, SecretName, SecretValue};

/// Seals `value` as the record `meta` describes, under `meta.master_key_version` with
/// `meta.mechanism`. The caller has counted the wrap.
pub(crate) async fn seal(
    state: &State,
    meta: RecordMeta,
    value: &Zeroizing<Vec<u8>>,
    deadline: Duration,
) -> Result<SealedRecord, Error> {
    let format = written_format();
    let aad = meta.aad(format);
    let mk = meta.master_key_version;
    let (wrapped_dek, nonce, ciphertext) = match meta.mechanism {
        Mechanism::AesGcmEnvelopeV1 => {
            let (dek, wrapped) = state.hsm.new_data_key(mk, aad.clone(), deadline).await?;
            let sealed =
                envelope::seal(&dek, &aad, value).map_err(|e| Error::Internal(e.to_string()))?;
            drop(dek);
            (wrapped, sealed.nonce.to_vec(), sealed.ciphertext)
        }
        Mechanism::AesKwHsmOnlyV1 => {
            // The value goes to the token and is encrypted there; the data key never comes
            // out in the clear.
            let sealed = state
                .hsm
                .strict_seal(mk, aad, value.clone(), deadline)
                .await?;
            (sealed.wrapped_dek, sealed.nonce, sealed.ciphertext)
        }
    };
    Ok(meta.into_record(format, wrapped_dek, nonce, ciphertext))
}

/// Opens `record`, read from the slot `(name, version)`: unwraps its data key in the token
/// and decrypts the value, both under the AAD of the slot and the record's stored fields.
/// Returns the value and the (now authenticated) metadata.
pub(crate) async fn open(
    state: &State,
    record: &SealedRecord,
    name: &SecretName,
    version: u64,
    deadline: Duration,
) -> Result<(SecretValue, RecordMeta), Error> {
    let (meta, format) = RecordMeta::of_slot(record, name, version)
        .map_err(|why| Error::DataLoss(format!("record {name} v{version}: {why}")))?;
    let aad = meta.aad(format);
    let failed = || Error::DataLoss(format!("record {name} v{version} failed authentication"));
    let value = match meta.mechanism {
        Mechanism::AesKwHsmOnlyV1 => {
            // Strict mode: unwrapped into a non-extractable session object and decrypted in
            // the token; only the value comes back.
            let plain = state
                .hsm
                .strict_open(
                    meta.master_key_version,
                    record.wrapped_dek.clone(),
                    record.nonce.clone(),
                    aad,
                    record.ciphertext.clone(),
                    deadline,
                )
                .await?;
            SecretValue::new(plain)
        }
        Mechanism::AesGcmEnvelopeV1 => {
            let dek = state
                .hsm
                .unwrap_data_key(
                    meta.master_key_version,
                    record.wrapped_dek.clone(),
                    aad.clone(),
                    deadline,
                )
                .await?;
            envelope::open(&dek, &record.nonce, &aad, &record.ciphertext).map_err(|_| failed())?
        }
    };
    Ok((value, meta))
}

/// Re-seals records under master key `to`, each as the same version with the same mechanism
/// and metadata, in the current format (v1 records are upgraded to v2): the re-wrap's path.
/// Each `(name, record)` is authenticated against its slot exactly as [`open`] does (the
/// name asked for and the version the record is stored as), and sealed again exactly as
/// [`seal`] would seal it, but the token does both for a record in one job
/// ([`crate::hsm::Hsm::rewrap`]), and the records are sent in jobs of up to
/// [`REWRAP_JOB`]: one trip to a worker per job instead of two per record. The answer holds
/// one result per record, in order: a record that does not parse or authenticate is
/// `DATA_LOSS` (or the token's authentication failure); an unavailable token fails the
/// whole call.
pub(crate) async fn reseal_batch(
    state: &State,
    records: &[(SecretName, &SealedRecord)],
    to: u32,
    deadline: Duration,
) -> Result<Vec<Result<SealedRecord, Error>>, Error> {
    use crate::hsm::pool::{RewrapItem, RewrapKind};
    let format = written_format();
    // Per record: its new metadata (or why it cannot be re-sealed) and its index among the
    // items sent to the token.
    let mut metas: Vec<Result<RecordMeta, Error>> = Vec::with_capacity(records.len());
    let mut items = Vec::with_capacity(records.len());
    for (name, record) in records {
        let version = record.version;
        match RecordMeta::of_slot(record, name, version) {
            Err(why) => metas.push(Err(Error::DataLoss(format!(
                "record {name} v{version}: {why}"
            )))),
            Ok((meta, stored)) => {
                let old_aad = meta.aad(stored);
                let from_mk = meta.master_key_version;
                let mut meta = meta;
                meta.master_key_version = to;
                items.push(RewrapItem {
                    kind: match meta.mechanism {
                        Mechanism::AesGcmEnvelopeV1 => RewrapKind::Envelope,
                        Mechanism::AesKwHsmOnlyV1 => RewrapKind::Strict,
                    },
                    from_mk,
                    old_aad,
                    new_aad: meta.aad(format),
                    wrapped_dek: record.wrapped_dek.clone(),
                    nonce: record.nonce.clone(),
                    ciphertext: record.ciphertext.clone(),
                });
                metas.push(Ok(meta));
            }
        }
    }
    // The jobs go to the queue together, so several workers (a network HSM) share them.
    let mut jobs = Vec::new();
    while !items.is_empty() {
        let rest = items.split_off(items.len().min(REWRAP_JOB));
        let job = std::mem::replace(&mut items, rest);
        let hsm = state.hsm.clone();
        jobs.push(tokio::spawn(
            async move { hsm.rewrap(to, job, deadline).await },
        ));
    }
    let mut sealed = Vec::with_capacity(metas.len());
    for job in jobs {
        sealed.extend(job.await.map_err(|e| Error::Internal(e.to_string()))??);
    }
    let mut sealed = sealed.into_iter();
    let mut out = Vec::with_capacity(metas.len());
    for meta in metas {
        out.push(match meta {
            Err(e) => Err(e),
            Ok(meta) => match sealed.next() {
                Some(Ok(r)) => Ok(meta.into_record(format, r.wrapped_dek, r.nonce, r.ciphertext)),
                Some(Err(e)) => Err(Error::Hsm(e)),
                None => Err(Error::Internal(
                    "the token answered fewer records than sent".into(),
                )),
            },
        });
    }
    Ok(out)
}

/// Records re-sealed per token job by [`reseal_batch`]: small enough that a job holds the
/// worker for well under a millisecond on SoftHSM2, so client requests queued behind it
/// wait little, large enough that the queue hop is paid once for many records.
pub(crate) const REWRAP_JOB: usize = 16;

/// The format new records are written in: v2, or v1 where a debug build's test sets
/// `STRONGROOM_DEBUG_RECORD_FORMAT=v1` to make records as older versions of the service
/// did (release builds ignore it).
fn written_format() -> RecordFormat {
    if !cfg!(debug_assertions) {
        return RecordFormat::CURRENT;
    }
    static FORMAT: std::sync::OnceLock<RecordFormat> = std::sync::OnceLock::new();
    *FORMAT.get_or_init(
        || match std::env::var("STRONGROOM_DEBUG_RECORD_FORMAT").as_deref() {
            Ok("v1") => {
                tracing::warn!("debug build: writing v1 records (STRONGROOM_DEBUG_RECORD_FORMAT)");
                RecordFormat::V1
            }
            _ => RecordFormat::CURRENT,
        },
    )
}
