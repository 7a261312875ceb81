//! SecretService: authenticate, parse, authorise, touch the store, use the token, audit,
//! answer — in that order, for every call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::{Code, Request, Response, Status};
use zeroize::Zeroizing;

use super::page_token::PageTokenKey;
use super::{State, blocking, read_inline};
use crate::audit::reconcile::{halt_point, record_fingerprint};
use crate::audit::{AuditEvent, ChangeMark, Expected, Outcome, RecordedName};
use crate::error::Error;
use crate::hsm::HsmError;
use crate::policy::Capability;
use crate::proto::{
    DeleteSecretRequest, DeleteSecretResponse, DescribeSecretRequest, DescribeSecretResponse,
    GetSecretRequest, GetSecretResponse, ListSecretsRequest, ListSecretsResponse, PutSecretRequest,
    PutSecretResponse, VersionInfo, WatchSecretsRequest, secret_service_server::SecretService,
};
use crate::secret::{
    Mechanism, NamePrefix, Protection, RecordFormat, RecordMeta, SealedRecord, SecretName, Window,
};
use crate::store::{NameRange, StoreError};
use crate::tls::Identity;

/// How many times a write without check-and-set retries after losing a race.
const MAX_WRITE_ATTEMPTS: usize = 8;
/// The ListSecrets page size when the request gives 0.
const DEFAULT_PAGE_SIZE: usize = 100;

/// The SecretService implementation.
pub struct SecretsService(Arc<SecretsServiceInner>);

/// The handlers' shared part; each call runs in its own task so that a caller going away
/// never cuts a request between its effect and its audit entry.
pub(crate) struct SecretsServiceInner {
    state: Arc<State>,
    next_request_id: AtomicU64,
    /// Authenticates ListSecrets page tokens; derived from the token once, at start.
    page_key: tokio::sync::OnceCell<PageTokenKey>,
}

impl SecretsService {
    pub(crate) fn new(state: Arc<State>) -> Self {
        let inner = Arc::new(SecretsServiceInner {
            state,
            next_request_id: AtomicU64::new(1),
            page_key: tokio::sync::OnceCell::new(),
        });
        // Derive the page-token key now, so that no ListSecrets waits for the token; if the
        // token cannot answer yet, the first call that needs the key tries again.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let early = inner.clone();
            runtime.spawn(async move {
                if let Err(e) = early.page_key().await {
                    tracing::warn!(error = %e, "cannot derive the page-token key yet; ListSecrets will try again when it needs it");
                }
            });
        }
        Self(inner)
    }
}

/// What every handler knows about its caller.
struct Ctx {
    /// The request's announcement to the audit log.
    expected: Expected,
    identity: Identity,
    deadline: Duration,
    request_id: u64,
    /// The change this request intended (its intent is durable) and what became of it: the
    /// request's own entry is its outcome.
    change: std::sync::Mutex<Option<(String, Outcome)>>,
}

/// A handler's own work: what it does between authentication and the audited answer.
type Work<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

impl SecretsService {
    /// The skeleton every handler shares: in its own task (so a caller going away never cuts
    /// a request between its effect and its audit entry), authenticate the caller and read
    /// its deadline, do the handler's `work`, then audit the outcome under `audited` (the name
    /// or prefix asked for) and `version`, and only then answer.
    async fn serve<Req, Resp>(
        &self,
        request: Request<Req>,
        operation: &'static str,
        audited: fn(&Req) -> &str,
        version: fn(&Resp) -> Option<u64>,
        work: for<'a> fn(&'a SecretsServiceInner, &'a Ctx, Req) -> Work<'a, Resp>,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Send + Sync + 'static,
        Resp: Send + 'static,
    {
        let this = self.0.clone();
        let deadline = super::call_deadline(request.metadata());
        super::complete(deadline, async move {
            let ctx = this.begin(&request, operation).await?;
            let req = request.into_inner();
            let name = audited(&req).to_owned();
            let result = work(&this, &ctx, req).await;
            this.finish(&ctx, operation, &name, result, version).await
        })
        .await
    }
}

#[tonic::async_trait]
impl SecretService for SecretsService {
    async fn put_secret(
        &self,
        request: Request<PutSecretRequest>,
    ) -> Result<Response<PutSecretResponse>, Status> {
        self.serve(
            request,
            "PutSecret",
            |r| &r.name,
            |r: &PutSecretResponse| Some(r.version),
            |this, ctx, req| Box::pin(put(&this.state, ctx, req)),
        )
        .await
    }

    async fn get_secret(
        &self,
        request: Request<GetSecretRequest>,
    ) -> Result<Response<GetSecretResponse>, Status> {
        self.serve(
            request,
            "GetSecret",
            |r| &r.name,
            |r: &GetSecretResponse| Some(r.version),
            |this, ctx, req| Box::pin(async move { get(&this.state, ctx, &req).await }),
        )
        .await
    }

    async fn describe_secret(
        &self,
        request: Request<DescribeSecretRequest>,
    ) -> Result<Response<DescribeSecretResponse>, Status> {
        self.serve(
            request,
            "DescribeSecret",
            |r| &r.name,
            |_| None,
            |this, ctx, req| Box::pin(async move { describe(&this.state, ctx, &req).await }),
        )
        .await
    }

    async fn list_secrets(
        &self,
        request: Request<ListSecretsRequest>,
    ) -> Result<Response<ListSecretsResponse>, Status> {
        self.serve(
            request,
            "ListSecrets",
            |r| &r.prefix,
            |_| None,
            |this, ctx, req| Box::pin(async move { list(this, ctx, &req).await }),
        )
        .await
    }

    async fn delete_secret(
        &self,
        request: Request<DeleteSecretRequest>,
    ) -> Result<Response<DeleteSecretResponse>, Status> {
        self.serve(
            request,
            "DeleteSecret",
            |r| &r.name,
            |_| None,
            |this, ctx, req| Box::pin(async move { delete(&this.state, ctx, &req).await }),
        )
        .await
    }

    type WatchSecretsStream = super::watch::WatchStream;

    async fn watch_secrets(
        &self,
        request: Request<WatchSecretsRequest>,
    ) -> Result<Response<Self::WatchSecretsStream>, Status> {
        // Audited once, when the subscription opens (src/service/watch.rs).
        self.serve(
            request,
            "WatchSecrets",
            super::watch::audited,
            |_| None,
            |this, ctx, req| {
                Box::pin(super::watch::open(
                    this.state.clone(),
                    ctx.identity.clone(),
                    req,
                ))
            },
        )
        .await
    }
}

impl SecretsServiceInner {
    /// The page-token key, derived from the token the first time it is needed.
    async fn page_key(&self) -> Result<&PageTokenKey, Error> {
        self.page_key
            .get_or_try_init(|| PageTokenKey::derive(&self.state))
            .await
    }

    /// Authenticates the caller from its verified certificate and reads the deadline.
    async fn begin<T>(&self, request: &Request<T>, operation: &'static str) -> Result<Ctx, Status> {
        let expected = self.state.audit.announce();
        // The front door's id (also in the request's log span); a counter of our own if
        // the request did not come through it.
        let request_id = crate::metrics::request_id(request.extensions())
            .unwrap_or_else(|| self.next_request_id.fetch_add(1, Ordering::Relaxed));
        let identity = super::peer_identity(request);
        let identity = match identity {
            Ok(id) => id,
            Err(e) => {
                let status = Status::unauthenticated(format!("no client identity: {e}"));
                self.audit(
                    &expected,
                    None,
                    operation,
                    None,
                    None,
                    status.code(),
                    request_id,
                    None,
                )
                .await?;
                return Err(status);
            }
        };
        if let Some(d) = grpc_timeout(request.metadata())
            && d < super::MIN_DEADLINE
        {
            // Expired before it started: nothing is done, and that is audited.
            let status = Status::deadline_exceeded("the call's deadline has already passed");
            self.audit(
                &expected,
                Some(&identity),
                operation,
                None,
                None,
                status.code(),
                request_id,
                None,
            )
            .await?;
            return Err(status);
        }
        // Answer UNAVAILABLE a little before the caller's deadline rather than let the
        // transport cancel the call at it.
        let deadline = grpc_timeout(request.metadata()).map_or(self.state.hsm_timeout, |d| {
            (d * 9 / 10).min(self.state.hsm_timeout)
        });
        Ok(Ctx {
            expected,
            identity,
            deadline,
            request_id,
            change: std::sync::Mutex::new(None),
        })
    }

    /// Audits the outcome, then answers. If the audit entry cannot be written, the request
    /// fails and nothing it produced leaves.
    async fn finish<T>(
        &self,
        ctx: &Ctx,
        operation: &'static str,
        name: &str,
        result: Result<T, Error>,
        version: impl Fn(&T) -> Option<u64>,
    ) -> Result<Response<T>, Status> {
        let (code, v) = match &result {
            Ok(r) => (Code::Ok, version(r)),
            Err(e) => (e.code(), None),
        };
        if code == Code::Unavailable {
            // The token (or the audit log) just failed this request: health says so now,
            // not at the watcher's next tick.
            super::update_health(&self.state).await;
        }
        // A change's outcome: its id and what became of it ride on the request's entry.
        let change = ctx
            .change
            .lock()
            .ok()
            .and_then(|mut c| c.take())
            .map(|(id, outcome)| ChangeMark::outcome(&id, outcome));
        self.audit(
            &ctx.expected,
            Some(&ctx.identity),
            operation,
            Some(name),
            v,
            code,
            ctx.request_id,
            change,
        )
        .await?;
        result.map(Response::new).map_err(Status::from)
    }

    #[allow(clippy::too_many_arguments)]
    async fn audit(
        &self,
        expected: &Expected,
        identity: Option<&Identity>,
        operation: &'static str,
        name: Option<&str>,
        version: Option<u64>,
        status: Code,
        request_id: u64,
        change: Option<ChangeMark>,
    ) -> Result<(), Status> {
        let event = AuditEvent {
            plane: "client",
            identity,
            operation,
            // An invalid name is recorded bounded: at most max_name_bytes of it, its length
            // and its SHA-256.
            name: name.map(|n| RecordedName::new(n, self.state.limits.max_name_bytes)),
            version,
            status,
            request_id,
            detail: None,
            change,
        };
        let recorded = self.state.audit.record(&event, Some(expected)).await;
        if let Err(e) = recorded {
            super::update_health(&self.state).await;
            return Err(Status::from(Error::Audit(e.to_string())));
        }
        Ok(())
    }
}

async fn put(state: &State, ctx: &Ctx, req: PutSecretRequest) -> Result<PutSecretResponse, Error> {
    super::rollback::ensure_trusted(state)?;
    // Own the plaintext in a zeroizing buffer from here on.
    let value = Zeroizing::new(req.value);
    let name = parse_name(state, &req.name)?;
    if value.len() > state.limits.max_value_bytes {
        return Err(Error::InvalidArgument(format!(
            "secret value is {} bytes, larger than max_value_bytes ({})",
            value.len(),
            state.limits.max_value_bytes
        )));
    }
    let protection = Protection::from_request(req.protection)
        .map_err(Error::InvalidArgument)?
        .unwrap_or(state.default_protection);
    let now = unix_now();
    if let Some(exp) = req.expires_at_unix
        && exp <= now
    {
        return Err(Error::InvalidArgument(
            "expires_at_unix must be in the future".into(),
        ));
    }
    if let (Some(nb), Some(exp)) = (req.not_before_unix, req.expires_at_unix)
        && nb >= exp
    {
        return Err(Error::InvalidArgument(format!(
            "not_before_unix ({}) must be before expires_at_unix ({})",
            crate::when::rfc3339(nb),
            crate::when::rfc3339(exp)
        )));
    }
    if !state
        .policy()
        .allows(&ctx.identity, Capability::Write, &name)
    {
        return Err(Error::PermissionDenied);
    }
    let mk = current_master_key(state).await?;

    // Writers of one name take turns (versions are assigned before sealing, since the AAD
    // binds them); writers of different names proceed together and share fsyncs.
    let _turn = state.write_stripes.lock(&name).await;
    for _ in 0..MAX_WRITE_ATTEMPTS {
        let head = blocking(state, {
            let name = name.clone();
            move |s| s.head(&name)
        })
        .await?;
        let live = head.map_or(0, |h| h.live());
        if let Some(expected) = req.expected_version
            && expected != live
        {
            return Err(Error::VersionConflict {
                expected,
                actual: live,
            });
        }
        let version = head.map_or(0, |h| h.latest) + 1;

        // Count the wrap before it happens: a crash can only over-count.
        let wraps = blocking(state, move |s| s.count_wraps(mk, 1)).await?;
        if wraps > state.max_wraps {
            return Err(Error::FailedPrecondition(format!(
                "master key version {mk} has reached its wrap limit ({}); an officer must rotate the master key",
                state.max_wraps
            )));
        }
        let meta = RecordMeta {
            name: name.clone(),
            version,
            master_key_version: mk,
            mechanism: protection.mechanism(),
            created_at_unix: now,
            created_by: ctx.identity.as_str().to_owned(),
            not_before_unix: req.not_before_unix,
            expires_at_unix: req.expires_at_unix,
        };
        let record = super::seal::seal(state, meta, &value, ctx.deadline).await?;
        let fingerprint = record_fingerprint(&record);
        write_ahead(
            state,
            ctx,
            "PutSecret",
            &name,
            Some(version),
            Some(fingerprint),
        )
        .await?;
        halt_point("put-after-intent").await;
        let keep = req.max_versions;
        let committed = blocking(state, move |s| s.commit_keeping(&record, head, keep)).await;
        settle(
            ctx,
            match &committed {
                Ok(Ok(())) => Outcome::Committed,
                Ok(Err(_)) => Outcome::Failed,
                Err(_) => Outcome::Unknown,
            },
        );
        halt_point("put-after-commit").await;
        match committed? {
            Ok(()) => {
                return Ok(PutSecretResponse {
                    version,
                    master_key_version: mk,
                });
            }
            Err(conflict) => {
                if let Some(expected) = req.expected_version {
                    return Err(Error::VersionConflict {
                        expected,
                        actual: conflict.actual,
                    });
                }
                // Another writer won the race: seal again under the next version.
            }
        }
    }
    Err(Error::Contention)
}

async fn get(state: &State, ctx: &Ctx, req: &GetSecretRequest) -> Result<GetSecretResponse, Error> {
    super::rollback::ensure_trusted(state)?;
    let name = parse_name(state, &req.name)?;
    // A name the caller may not read looks exactly like an absent one.
    if !state
        .policy()
        .allows(&ctx.identity, Capability::Read, &name)
    {
        return Err(Error::NotFound);
    }
    let wanted = req.version;
    // Inline only where a read never waits on the network (sled); etcd's reads go through
    // the blocking pool, so a slow or absent etcd never holds a runtime thread.
    let (version, record) = if state.store.reads_are_local() {
        read_inline(state, |s| lookup(s, &name, wanted))?
    } else {
        let name = name.clone();
        blocking(state, move |s| lookup(s, &name, wanted)).await?
    }
    .ok_or(Error::NotFound)?;

    check_identity(&record, &name, Some(version))?;
    // Opened first, so the window below is decided on authenticated metadata (v2): an
    // edited expiry or not-before fails here with DATA_LOSS instead of being obeyed.
    let (value, meta) = super::seal::open(state, &record, &name, version, ctx.deadline).await?;
    outside_window(&meta, unix_now())?;
    let mut value = value.into_inner();
    Ok(GetSecretResponse {
        name: name.as_str().to_owned(),
        version,
        // Moved, not copied, into the response; tonic encodes and drops it.
        value: std::mem::take(&mut *value),
        created_at_unix: meta.created_at_unix,
        expires_at_unix: meta.expires_at_unix,
        not_before_unix: meta.not_before_unix,
    })
}

/// A version outside its validity window is not served: FAILED_PRECONDITION saying which
/// bound and when (only callers who may read the name get this far; others had NOT_FOUND).
fn outside_window(meta: &RecordMeta, now: i64) -> Result<(), Error> {
    let (name, v) = (&meta.name, meta.version);
    match meta.window(now) {
        Window::Open => Ok(()),
        Window::NotYet(t) => Err(Error::FailedPrecondition(format!(
            "version {v} of {name} is not valid before {} (not_before)",
            crate::when::rfc3339(t)
        ))),
        Window::Expired(t) => Err(Error::FailedPrecondition(format!(
            "version {v} of {name} expired at {} (expires_at)",
            crate::when::rfc3339(t)
        ))),
    }
}

/// The record GetSecret answers with and the version slot it was read from: `version`, or
/// for 0 the latest live one the head names. A version deleted with its name (before the
/// name was written again) or destroyed by max_versions is absent (NOT_FOUND); one the head
/// says is kept but whose record is missing was lost (DATA_LOSS).
fn lookup(
    s: &dyn crate::store::Store,
    name: &SecretName,
    version: u64,
) -> Result<Option<(u64, SealedRecord)>, StoreError> {
    let version = if version == 0 {
        match s.head(name)? {
            Some(h) if h.live() > 0 => h.live(),
            _ => return Ok(None),
        }
    } else {
        version
    };
    if let Some(record) = s.get(name, version)? {
        return Ok(Some((version, record)));
    }
    // Missing: gone on purpose, or lost? The head says (read only now, so a read of a kept
    // version costs one store access, as before).
    match s.head(name)? {
        Some(h) if !h.gone(version) => Err(StoreError::Corrupt {
            key: format!("{name} v{version}"),
            reason: "the record of a live version is missing".into(),
        }),
        _ => Ok(None),
    }
}

async fn describe(
    state: &State,
    ctx: &Ctx,
    req: &DescribeSecretRequest,
) -> Result<DescribeSecretResponse, Error> {
    super::rollback::ensure_trusted(state)?;
    let name = parse_name(state, &req.name)?;
    if !state
        .policy()
        .allows(&ctx.identity, Capability::Read, &name)
    {
        return Err(Error::NotFound);
    }
    // A scan over every version of the name: off the runtime.
    let (head, records) = blocking(state, {
        let name = name.clone();
        move |s| Ok::<_, StoreError>((s.head(&name)?, s.versions(&name)?))
    })
    .await?;
    if records.is_empty() {
        return Err(Error::NotFound);
    }
    let now = unix_now();
    let mut versions = Vec::with_capacity(records.len());
    for r in &records {
        check_identity(r, &name, None)?;
        versions.push(VersionInfo {
            version: r.version,
            master_key_version: r.master_key_version,
            mechanism: Mechanism::from_id(r.mechanism).map_or_else(
                || format!("unknown({})", r.mechanism),
                |m| m.name().to_owned(),
            ),
            created_at_unix: r.created_at_unix,
            created_by: r.created_by.clone(),
            expires_at_unix: r.expires_at_unix,
            not_before_unix: r.not_before_unix,
            expired: matches!(
                crate::secret::window(None, r.expires_at_unix, now),
                Window::Expired(_)
            ),
            not_yet_valid: matches!(
                crate::secret::window(r.not_before_unix, None, now),
                Window::NotYet(_)
            ),
            record_format: RecordFormat::from_stored(r.format).map_or(r.format, |f| f.number()),
        });
    }
    Ok(DescribeSecretResponse {
        name: name.as_str().to_owned(),
        latest_version: versions.last().map_or(0, |v| v.version),
        versions,
        max_versions: head.map_or(0, |h| h.max_versions),
    })
}

/// ListSecrets: decided from the caller's grants before the store is touched. A caller whose
/// list rules do not meet the prefix gets an empty page without a store access; otherwise
/// only the overlap of the prefix with the grants is scanned, at most `max_list_scan` keys per
/// call, and each name still passes the policy.
async fn list(
    inner: &SecretsServiceInner,
    ctx: &Ctx,
    req: &ListSecretsRequest,
) -> Result<ListSecretsResponse, Error> {
    let state = &inner.state;
    super::rollback::ensure_trusted(state)?;
    let max_name = state.limits.max_name_bytes;
    let prefix = NamePrefix::parse(&req.prefix, max_name)
        .map_err(|e| Error::InvalidArgument(format!("prefix: {e}")))?;
    let page_size = page_size(
        "page_size",
        req.page_size,
        DEFAULT_PAGE_SIZE,
        state.limits.max_page_size,
    )?;
    let after = match req.page_token.as_str() {
        "" => None,
        token => Some(
            inner
                .page_key()
                .await?
                .open(token, &ctx.identity, &prefix)?,
        ),
    };
    let policy = state.policy();
    let scope = policy.list_scope(&ctx.identity, &prefix);
    if scope.is_empty() {
        // Nothing here may be listed by this caller: the answer needs no store access, so it
        // costs the same and says the same whatever the store holds.
        return Ok(ListSecretsResponse::default());
    }
    let ranges = NameRange::covering(&scope);
    let max_scan = state.limits.max_list_scan;
    let (identity, under) = (ctx.identity.clone(), prefix.clone());
    let horizon = req
        .expiring_within_seconds
        .map(|w| super::expiry::horizon(unix_now(), w));
    let (mut page, expiring) = blocking(state, move |s| {
        // Defence in depth: the ranges already hold only what the rules grant.
        let visible = |n: &SecretName| {
            under.matches(n.as_str()) && policy.allows(&identity, Capability::List, n)
        };
        let page = s.list(&ranges, after.as_deref(), page_size, max_scan, &visible)?;
        let expiring = match horizon {
            Some(h) => Some(super::expiry::expiring(s, &page.names, h)?),
            None => None,
        };
        Ok((page, expiring))
    })
    .await?;
    if let Some(e) = &expiring {
        // Filtered: only the names that expire within the window; the cursor is unchanged.
        page.names = e
            .iter()
            .filter_map(|v| SecretName::parse(&v.name, max_name).ok())
            .collect();
    }
    let next_page_token = match &page.next_after {
        Some(resume) => inner
            .page_key()
            .await?
            .issue(&ctx.identity, &prefix, resume),
        None => String::new(),
    };
    Ok(ListSecretsResponse {
        names: page
            .names
            .into_iter()
            .map(|n| n.as_str().to_owned())
            .collect(),
        next_page_token,
        expiring: expiring.unwrap_or_default(),
    })
}

async fn delete(
    state: &State,
    ctx: &Ctx,
    req: &DeleteSecretRequest,
) -> Result<DeleteSecretResponse, Error> {
    super::rollback::ensure_trusted(state)?;
    let name = parse_name(state, &req.name)?;
    // Decided before the store is touched, so the answer says nothing about existence.
    if !state
        .policy()
        .allows(&ctx.identity, Capability::Delete, &name)
    {
        return Err(Error::PermissionDenied);
    }
    write_ahead(state, ctx, "DeleteSecret", &name, None, None).await?;
    let destroyed = blocking(state, move |s| s.delete(&name)).await;
    settle(
        ctx,
        match &destroyed {
            Ok(0) => Outcome::Failed,
            Ok(_) => Outcome::Committed,
            Err(_) => Outcome::Unknown,
        },
    );
    let destroyed = destroyed?;
    if destroyed == 0 {
        return Err(Error::NotFound);
    }
    Ok(DeleteSecretResponse {
        versions_destroyed: destroyed,
    })
}

/// Writes the intent of a change to `name` and waits until it is durable: only then may the
/// store be touched (if it cannot be written, the request fails and the store is not
/// touched). The request's own entry, at its end, is the outcome. An earlier intent of the
/// same request (a write that lost a race and tries again) gets its outcome first.
async fn write_ahead(
    state: &State,
    ctx: &Ctx,
    operation: &'static str,
    name: &SecretName,
    version: Option<u64>,
    fingerprint: Option<String>,
) -> Result<(), Error> {
    if !state.write_ahead {
        return Ok(());
    }
    let earlier = ctx.change.lock().ok().and_then(|mut c| c.take());
    let event = |change: ChangeMark, version: Option<u64>, status: Code| AuditEvent {
        plane: "client",
        identity: Some(&ctx.identity),
        operation,
        name: Some(RecordedName::new(
            name.as_str(),
            state.limits.max_name_bytes,
        )),
        version,
        status,
        request_id: ctx.request_id,
        detail: None,
        change: Some(change),
    };
    let audit_failed = |e: crate::audit::AuditError| Error::Audit(e.to_string());
    if let Some((id, outcome)) = earlier {
        let ended = event(ChangeMark::outcome(&id, outcome), None, Code::Aborted);
        state
            .audit
            .record(&ended, None)
            .await
            .map_err(audit_failed)?;
    }
    let id = crate::audit::new_change_id();
    // The request's announcement ends here: its outcome follows a store commit, which takes
    // longer than any group commit should wait.
    let intent = event(ChangeMark::intent(&id, fingerprint), version, Code::Ok);
    if let Err(e) = state.audit.record(&intent, Some(&ctx.expected)).await {
        super::update_health(state).await;
        return Err(audit_failed(e));
    }
    if let Ok(mut c) = ctx.change.lock() {
        // Until the commit says otherwise, the change did not happen.
        *c = Some((id, Outcome::Failed));
    }
    Ok(())
}

/// Records what became of the request's intended change (its entry reports it).
fn settle(ctx: &Ctx, outcome: Outcome) {
    if let Ok(mut c) = ctx.change.lock()
        && let Some((_, o)) = c.as_mut()
    {
        *o = outcome;
    }
}

fn parse_name(state: &State, name: &str) -> Result<SecretName, Error> {
    SecretName::parse(name, state.limits.max_name_bytes)
        .map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// The master key for new writes; looks in the token again if none was known.
async fn current_master_key(state: &State) -> Result<u32, Error> {
    if let Some(mk) = state.hsm.current_master_key() {
        return Ok(mk);
    }
    state.hsm.reload_keys().await?;
    super::update_health(state).await;
    state
        .hsm
        .current_master_key()
        .ok_or(Error::Hsm(HsmError::NoMasterKey))
}

/// A record must be the one its key says it is; the AAD check would refuse it anyway, but a
/// mismatch here is reported as what it is: a moved or altered record.
fn check_identity(
    record: &SealedRecord,
    name: &SecretName,
    version: Option<u64>,
) -> Result<(), Error> {
    if record.name != name.as_str() || version.is_some_and(|v| v != record.version) {
        return Err(Error::DataLoss(format!(
            "record stored under {name} v{} claims to be {} v{}",
            version.map_or_else(|| "?".into(), |v| v.to_string()),
            record.name,
            record.version
        )));
    }
    Ok(())
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Parses the `grpc-timeout` header (e.g. `100m`, `5S`).
pub(crate) fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A page size asked for (`what`: the request's field): 0 takes `default` (at most `max`);
/// more than `max` is refused, naming both.
pub(crate) fn page_size(
    what: &str,
    asked: u32,
    default: usize,
    max: usize,
) -> Result<usize, Error> {
    match asked as usize {
        0 => Ok(default.min(max)),
        n if n > max => Err(Error::InvalidArgument(format!(
            "{what} {n} is larger than max_page_size ({max})"
        ))),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        m.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_secs(2)));
        m.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }
}
