//! What expires soon: ListSecrets' `expiring_within_seconds` filter for clients, the
//! officers' report across the whole store (AdminService.ReportExpiring), and the
//! `expiry-notice` job behind WatchSecrets' EXPIRING_SOON events.
//!
//! The job ([`notices`]) runs once at a time across replicas under its lock
//! ([`run_once`](super::jobs::run_once)), every `jobs.expiry_notice_interval_secs`: it pages
//! through every name and records, for each latest live version expiring within
//! `jobs.expiry_notice_window_secs` that has none yet, one notice ([`Aux::Notice`], the
//! version's expiry), written fenced. The notice is a store write like any other: committed
//! (it moves the epoch and the commitment, so the rollback check covers it as it covers the
//! state report), and its creation is an entry of the change feed with its own revision
//! (sled's change log; etcd's history of `P e/`), so every replica's watchers see it, a resumed
//! watch replays it, and it is sent once: the notice's presence, not a memory of the last
//! sweep, is what keeps a later sweep (on any replica, after any restart) from sending it
//! again. A notice whose version is no longer its name's latest live one is removed (no
//! event). Each event is checked against the caller's read permission like the others
//! (watch.rs).
//!
//! Both read each name's head and its latest live version's metadata, never a value, a page
//! of names at a time (at most `max_page_size` names and `max_list_scan` keys per call). The
//! expiry they show is the stored one, not yet authenticated: it informs, and a read still
//! opens the record (whose v2 AAD binds it) before deciding anything by it.

use std::sync::Arc;

use super::jobs::{Held, lost_lock, run_once};
use super::{State, blocking};
use crate::error::Error;
use crate::proto::{
    ExpiringSecret, ExpiringVersion, ReportExpiringRequest, ReportExpiringResponse,
};
use crate::secret::{NamePrefix, SecretName};
use crate::store::{Aux, Fenced, NameRange, Store, StoreError, notice_key, parse_notice_key};

/// The expiry-notice job (its lock: `…locks/job/expiry-notice`).
pub(crate) const NOTICE_JOB: &str = "expiry-notice";

/// The report's page size when the request gives 0.
const DEFAULT_REPORT_PAGE: usize = 100;

/// Of `names`, those whose latest live version expires at or before `horizon`, with that
/// version and its expiry, in the same order.
pub(crate) fn expiring(
    s: &dyn Store,
    names: &[SecretName],
    horizon: i64,
) -> Result<Vec<ExpiringVersion>, StoreError> {
    Ok(expiring_versions(s, names, horizon)?
        .into_iter()
        .map(|(name, version, at)| ExpiringVersion {
            name: name.as_str().to_owned(),
            version,
            expires_at_unix: at,
        })
        .collect())
}

/// Of `names`, those whose latest live version expires at or before `horizon`: the name,
/// that version and its expiry, in the same order.
fn expiring_versions(
    s: &dyn Store,
    names: &[SecretName],
    horizon: i64,
) -> Result<Vec<(SecretName, u64, i64)>, StoreError> {
    let mut out = Vec::new();
    for name in names {
        let Some(head) = s.head(name)? else { continue };
        if head.live() == 0 {
            continue;
        }
        let Some(record) = s.get(name, head.live())? else {
            continue;
        };
        if let Some(at) = record.expires_at_unix
            && at <= horizon
        {
            out.push((name.clone(), head.live(), at));
        }
    }
    Ok(out)
}

/// The end of a window of `within` seconds from `now`.
pub(crate) fn horizon(now: i64, within: u64) -> i64 {
    now.saturating_add(i64::try_from(within).unwrap_or(i64::MAX))
}

/// One page of the officers' report: every name in the store after `after`, whatever the
/// client policy says (officers see names, never values).
pub(crate) async fn report(
    state: &State,
    req: &ReportExpiringRequest,
) -> Result<ReportExpiringResponse, Error> {
    let limit = super::secrets::page_size(
        "limit",
        req.limit,
        DEFAULT_REPORT_PAGE,
        state.limits.max_page_size,
    )?;
    let after = match req.after.as_str() {
        "" => None,
        a => Some(
            SecretName::parse(a, state.limits.max_name_bytes)
                .map_err(|e| Error::InvalidArgument(format!("after: {e}")))?
                .as_str()
                .to_owned(),
        ),
    };
    let now = super::secrets::unix_now();
    let horizon = horizon(now, req.within_seconds);
    let max_scan = state.limits.max_list_scan;
    let (page, found) = blocking(state, move |s| {
        let ranges = NameRange::covering(&[NamePrefix::all()]);
        let page = s.list(&ranges, after.as_deref(), limit, max_scan, &|_| true)?;
        let found = expiring(s, &page.names, horizon)?;
        Ok((page, found))
    })
    .await?;
    Ok(ReportExpiringResponse {
        secrets: found
            .into_iter()
            .map(|e| ExpiringSecret {
                expired: e.expires_at_unix <= now,
                name: e.name,
                version: e.version,
                expires_at_unix: e.expires_at_unix,
            })
            .collect(),
        next_after: page.next_after.unwrap_or_default(),
    })
}

/// The expiry-notice job: every `jobs.expiry_notice_interval_secs` (the first one interval
/// after start), a sweep on whichever replica takes the job's lock; nothing while this
/// replica has flagged the store (officers review it as it is). Spawned by
/// [`super::Server::run`] beside the other periodic tasks.
pub(crate) async fn notices(state: Arc<State>) {
    let every = state.jobs.expiry_notice;
    if every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if super::rollback::ensure_trusted(&state).is_err() {
            continue;
        }
        let run = run_once(&state, NOTICE_JOB, |held| sweep(&state, held)).await;
        match run {
            Ok(None) => tracing::debug!("the expiry-notice sweep runs on another replica"),
            Ok(Some(s)) if s.written + s.removed > 0 => tracing::info!(
                written = s.written,
                removed = s.removed,
                examined = s.examined,
                "expiry notices recorded"
            ),
            Ok(Some(_)) | Err(Error::LostLock(_)) => {}
            Err(e) => tracing::warn!(error = %e, "the expiry-notice sweep failed; will try again"),
        }
    }
}

/// What one sweep did.
#[derive(Debug, Default)]
pub(crate) struct Sweep {
    /// Names examined.
    pub(crate) examined: u64,
    /// Notices recorded (each an EXPIRING_SOON event).
    pub(crate) written: u64,
    /// Notices removed: their version is no longer the latest live one.
    pub(crate) removed: u64,
}

/// One sweep under the job's lock: a notice for each latest live version expiring within
/// the window that has none, then the removal of notices whose version is no longer its
/// name's latest live one. Every write fenced; a refused one ends the sweep
/// ([`Error::LostLock`]).
async fn sweep(state: &Arc<State>, held: Arc<Held>) -> Result<Sweep, Error> {
    let horizon = horizon(super::secrets::unix_now(), state.jobs.expiry_window);
    let limit = state.limits.max_page_size.max(1);
    let max_scan = state.limits.max_list_scan;
    let mut summary = Sweep::default();
    let mut after: Option<String> = None;
    loop {
        let (lock, from) = (held.lock.clone(), after.take());
        let step = blocking(state, move |s| {
            let ranges = NameRange::covering(&[NamePrefix::all()]);
            let page = s.list(&ranges, from.as_deref(), limit, max_scan, &|_| true)?;
            let mut written = 0;
            for (name, version, at) in expiring_versions(s, &page.names, horizon)? {
                let key = notice_key(&name, version);
                if s.aux_get(Aux::Notice, &key)?.is_some() {
                    continue;
                }
                if let Err(f) = s.aux_put_fenced(&lock, Aux::Notice, &key, &at.to_be_bytes())? {
                    return Ok(Err(f));
                }
                written += 1;
            }
            Ok(Ok((page.names.len() as u64, written, page.next_after)))
        })
        .await?
        .map_err(lost_lock)?;
        let (examined, written, next) = step;
        summary.examined += examined;
        summary.written += written;
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let max_name = state.limits.max_name_bytes;
    let lock = held.lock.clone();
    summary.removed = blocking(state, move |s| {
        let mut removed = 0;
        for (key, _) in s.aux_list(Aux::Notice)? {
            let current = match parse_notice_key(&key, max_name) {
                Some((name, version)) => s.head(&name)?.is_some_and(|h| h.live() == version),
                // Not a notice this job wrote: not one to keep.
                None => false,
            };
            if current {
                continue;
            }
            match s.aux_delete_fenced(&lock, Aux::Notice, &key)? {
                Ok(_) => removed += 1,
                Err(f) => return Ok(Err::<u64, Fenced>(f)),
            }
        }
        Ok(Ok(removed))
    })
    .await?
    .map_err(lost_lock)?;
    Ok(summary)
}
