//! Moving a store to another backend (`strongroom-admin store migrate`): every key is copied
//! as it is, in the common layout the state commitment is defined over, so the target is the
//! same store — the same identity, epoch, commitment and records, only ciphertext and wrapped
//! keys — and the token's checkpoint recognises it without an officer accepting anything.
//!
//! A target is marked as migrating before the first key is copied and unmarked only after
//! the last; the service refuses to start on a marked store ([`refuse_half_migrated`]). A
//! migration that stopped half way is started over by running it again: the marked target is
//! emptied first. A target holding anything but a fresh store's identity is never touched.
//! The end is a verification pass: the target's keys must equal the source's (count and an
//! order-independent digest of every key and value) and its records must add up to its
//! commitment.

use super::commitment::{EPOCH, STATE, STORE_ID};
use super::{Aux, Store, StoreError, StoreState};

/// The meta key that marks a store being migrated into.
pub const MIGRATING: &str = "migrating";

/// Keys copied per page.
const PAGE: usize = 256;

/// One page of a store's keys in the common layout (see [`Store::export_page`]).
#[derive(Debug, Default)]
pub struct ExportPage {
    /// Keys (in the common layout) and values.
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Where the next page starts (the backend's own position); `None` after the last.
    pub next: Option<Vec<u8>>,
}

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A store call failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The target holds a store already.
    #[error(
        "the target is not empty ({keys} keys, not a half-migrated store): it holds a store already; migrate into an empty target"
    )]
    TargetInUse {
        /// Keys found there.
        keys: u64,
    },
    /// The source does not add up to its own commitment: copying it would carry the damage.
    #[error(
        "the source store does not match its state commitment ({records} records scanned): run strongroomd on it and resolve its rollback check first"
    )]
    SourceInconsistent {
        /// Records the scan counted.
        records: u64,
    },
    /// The verification pass found a difference.
    #[error("verification failed: {0}")]
    Verify(String),
}

/// What a migration copied.
#[derive(Debug, Clone)]
pub struct MigrateReport {
    /// Keys copied (the store's frame included).
    pub keys: u64,
    /// The target's state after the copy, as the token's checkpoint will see it.
    pub state: StoreState,
}

/// Refuses a store that a migration is still writing (or stopped writing half way).
pub fn refuse_half_migrated(store: &dyn Store) -> Result<(), StoreError> {
    match store.aux_get(Aux::Meta, MIGRATING)? {
        Some(from) => Err(StoreError::Open {
            path: "the store".into(),
            reason: format!(
                "it is half-migrated ({}): run `strongroom-admin store migrate` again to finish, or start on the source",
                String::from_utf8_lossy(&from)
            ),
        }),
        None => Ok(()),
    }
}

/// The common-layout key of a meta key.
fn meta_key(key: &str) -> Vec<u8> {
    let mut k = vec![b'm'];
    k.extend_from_slice(key.as_bytes());
    k
}

/// Copies every key of `from` into `to`, then verifies the copy. `from_name` is recorded in
/// the target's marker; `progress(done)` is called after each page.
pub fn migrate(
    from: &dyn Store,
    to: &dyn Store,
    from_name: &str,
    mut progress: impl FnMut(u64),
) -> Result<MigrateReport, MigrateError> {
    let check = from.verify_state()?;
    if !check.matches() {
        return Err(MigrateError::SourceInconsistent {
            records: check.records,
        });
    }
    // The target: a fresh store (its frame only) or a half-migrated one (emptied again).
    let frame: [Vec<u8>; 3] = [STORE_ID, EPOCH, STATE].map(meta_key);
    let marker = meta_key(MIGRATING);
    let existing = all_keys(to)?;
    let half_migrated = existing.contains(&marker);
    let foreign = existing.iter().filter(|k| !frame.contains(k)).count() as u64;
    if foreign > 0 && !half_migrated {
        return Err(MigrateError::TargetInUse { keys: foreign });
    }
    let mark = format!("from {from_name}");
    to.import_raw(&[(marker.clone(), Some(mark.into_bytes()))])?;
    let stale: Vec<_> = existing
        .into_iter()
        .filter(|k| *k != marker)
        .map(|k| (k, None))
        .collect();
    for chunk in stale.chunks(PAGE) {
        to.import_raw(chunk)?;
    }

    let mut copied = 0u64;
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let page = from.export_page(cursor.as_deref(), PAGE)?;
        let changes: Vec<_> = page.pairs.into_iter().map(|(k, v)| (k, Some(v))).collect();
        to.import_raw(&changes)?;
        copied += changes.len() as u64;
        progress(copied);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    to.import_raw(&[(marker, None)])?;
    to.sync()?;
    verify(from, to)?;
    Ok(MigrateReport {
        keys: copied,
        state: to.state()?,
    })
}

/// Every key of `store`, in the common layout.
fn all_keys(store: &dyn Store) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut keys = Vec::new();
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let page = store.export_page(cursor.as_deref(), PAGE)?;
        keys.extend(page.pairs.into_iter().map(|(k, _)| k));
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(keys),
        }
    }
}

/// A store's keys and values as a count and an order-independent digest (the sum of each
/// pair's SHA-256, mod 2^256), so two backends that order keys differently compare equal.
fn digest(store: &dyn Store) -> Result<(u64, [u8; 32]), StoreError> {
    let mut sum = [0u8; 32];
    let mut count = 0u64;
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let page = store.export_page(cursor.as_deref(), PAGE)?;
        for (k, v) in &page.pairs {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(&(k.len() as u64).to_be_bytes());
            ctx.update(k);
            ctx.update(v);
            add(&mut sum, ctx.finish().as_ref());
            count += 1;
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok((count, sum)),
        }
    }
}

/// `sum += x` mod 2^256, big-endian.
fn add(sum: &mut [u8; 32], x: &[u8]) {
    let mut carry = 0u16;
    for i in (0..32).rev() {
        let s = u16::from(sum[i]) + u16::from(x.get(i).copied().unwrap_or(0)) + carry;
        sum[i] = (s & 0xff) as u8;
        carry = s >> 8;
    }
}

/// The verification pass: the same keys and values on both sides, the same store identity,
/// epoch and commitment, and the target's records adding up to its commitment.
pub fn verify(from: &dyn Store, to: &dyn Store) -> Result<(), MigrateError> {
    let (a, b) = (digest(from)?, digest(to)?);
    if a.0 != b.0 {
        return Err(MigrateError::Verify(format!(
            "the source has {} keys, the target {}",
            a.0, b.0
        )));
    }
    if a.1 != b.1 {
        return Err(MigrateError::Verify(
            "the target's keys or values differ from the source's".into(),
        ));
    }
    let (sa, sb) = (from.state()?, to.state()?);
    if sa != sb {
        return Err(MigrateError::Verify(format!(
            "the target's identity, epoch or commitment differs (source epoch {}, target epoch {})",
            sa.epoch, sb.epoch
        )));
    }
    let check = to.verify_state()?;
    if !check.matches() {
        return Err(MigrateError::Verify(
            "the target's records do not add up to its commitment".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_sum_carries_across_bytes_and_wraps() {
        let mut s = [0u8; 32];
        s[31] = 0xff;
        let mut one = [0u8; 32];
        one[31] = 1;
        add(&mut s, &one);
        assert_eq!(s[30..], [1, 0]);
        let mut max = [0xffu8; 32];
        add(&mut max, &one);
        assert_eq!(max, [0u8; 32]);
    }
}
