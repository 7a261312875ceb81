//! What expires soon: ListSecrets' `expiring_within_seconds` filter for clients, and the
//! officers' report across the whole store (AdminService.ReportExpiring).
//!
//! Both read each name's head and its latest live version's metadata, never a value, a page
//! of names at a time (at most `max_page_size` names and `max_list_scan` keys per call). The
//! expiry they show is the stored one, not yet authenticated: it informs, and a read still
//! opens the record (whose v2 AAD binds it) before deciding anything by it.

use super::{State, blocking};
use crate::error::Error;
use crate::proto::{
    ExpiringSecret, ExpiringVersion, ReportExpiringRequest, ReportExpiringResponse,
};
use crate::secret::{NamePrefix, SecretName};
use crate::store::{NameRange, Store, StoreError};

/// The report's page size when the request gives 0.
const DEFAULT_REPORT_PAGE: usize = 100;

/// Of `names`, those whose latest live version expires at or before `horizon`, with that
/// version and its expiry, in the same order.
pub(crate) fn expiring(
    s: &dyn Store,
    names: &[SecretName],
    horizon: i64,
) -> Result<Vec<ExpiringVersion>, StoreError> {
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
            out.push(ExpiringVersion {
                name: name.as_str().to_owned(),
                version: head.live(),
                expires_at_unix: at,
            });
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
    let limit = match req.limit as usize {
        0 => DEFAULT_REPORT_PAGE.min(state.limits.max_page_size),
        n if n > state.limits.max_page_size => {
            return Err(Error::InvalidArgument(format!(
                "limit {n} is larger than max_page_size ({})",
                state.limits.max_page_size
            )));
        }
        n => n,
    };
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
