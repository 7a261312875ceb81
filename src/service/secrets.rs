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
use crate::envelope::{self, record_aad};
use crate::error::Error;
use crate::hsm::HsmError;
use crate::policy::Capability;
use crate::proto::{
    DeleteSecretRequest, DeleteSecretResponse, DescribeSecretRequest, DescribeSecretResponse,
    GetSecretRequest, GetSecretResponse, ListSecretsRequest, ListSecretsResponse, PutSecretRequest,
    PutSecretResponse, VersionInfo, WatchSecretsRequest, secret_service_server::SecretService,
};
use crate::secret::{Mechanism, NamePrefix, Protection, SealedRecord, SecretName};
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
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
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
        let aad = record_aad(&name, version, mk);
        let (wrapped_dek, nonce, ciphertext) = match protection {
            Protection::Envelope => {
                let (dek, wrapped) = state
                    .hsm
                    .new_data_key(mk, aad.clone(), ctx.deadline)
                    .await?;
                let sealed = envelope::seal(&dek, &aad, &value)
                    .map_err(|e| Error::Internal(e.to_string()))?;
                drop(dek);
                (wrapped, sealed.nonce.to_vec(), sealed.ciphertext)
            }
            Protection::HsmOnly => {
                // The value goes to the token and is encrypted there; the data key never
                // comes out in the clear.
                let sealed = state
                    .hsm
                    .strict_seal(mk, aad, value.clone(), ctx.deadline)
                    .await?;
                (sealed.wrapped_dek, sealed.nonce, sealed.ciphertext)
            }
        };
        let record = SealedRecord {
            name: name.as_str().to_owned(),
            version,
            master_key_version: mk,
            mechanism: protection.mechanism().id(),
            wrapped_dek,
            nonce,
            ciphertext,
            created_at_unix: now,
            created_by: ctx.identity.as_str().to_owned(),
            expires_at_unix: req.expires_at_unix,
        };
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
        let committed = blocking(state, move |s| s.commit(&record, head)).await;
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
    let record = if state.store.reads_are_local() {
        read_inline(state, |s| lookup(s, &name, wanted))?
    } else {
        let name = name.clone();
        blocking(state, move |s| lookup(s, &name, wanted)).await?
    }
    .ok_or(Error::NotFound)?;

    let version = record.version;
    check_identity(&record, &name, (req.version != 0).then_some(req.version))?;
    if is_expired(&record, unix_now()) {
        return Err(Error::NotFound);
    }
    let value = open_record(state, ctx.deadline, &name, &record).await?;
    let mut value = value.into_inner();
    Ok(GetSecretResponse {
        name: name.as_str().to_owned(),
        version,
        // Moved, not copied, into the response; tonic encodes and drops it.
        value: std::mem::take(&mut *value),
        created_at_unix: record.created_at_unix,
        expires_at_unix: record.expires_at_unix,
    })
}

/// The record GetSecret answers with: `version`, or the latest live one for 0.
fn lookup(
    s: &dyn crate::store::Store,
    name: &SecretName,
    version: u64,
) -> Result<Option<SealedRecord>, StoreError> {
    let version = if version == 0 {
        match s.head(name)? {
            Some(h) if h.live() > 0 => h.live(),
            _ => return Ok(None),
        }
    } else {
        version
    };
    let record = s.get(name, version)?;
    if record.is_none()
        && s.head(name)?
            .is_some_and(|h| !h.deleted && version <= h.latest)
    {
        // The head says this version exists: its record was lost, not deleted.
        return Err(StoreError::Corrupt {
            key: format!("{name} v{version}"),
            reason: "the record of a live version is missing".into(),
        });
    }
    Ok(record)
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
    let records = blocking(state, {
        let name = name.clone();
        move |s| s.versions(&name)
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
            expired: is_expired(r, now),
        });
    }
    Ok(DescribeSecretResponse {
        name: name.as_str().to_owned(),
        latest_version: versions.last().map_or(0, |v| v.version),
        versions,
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
    let page_size = match req.page_size as usize {
        0 => DEFAULT_PAGE_SIZE.min(state.limits.max_page_size),
        n if n > state.limits.max_page_size => {
            return Err(Error::InvalidArgument(format!(
                "page_size {n} is larger than max_page_size ({})",
                state.limits.max_page_size
            )));
        }
        n => n,
    };
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
    let page = blocking(state, move |s| {
        // Defence in depth: the ranges already hold only what the rules grant.
        let visible = |n: &SecretName| {
            under.matches(n.as_str()) && policy.allows(&identity, Capability::List, n)
        };
        s.list(&ranges, after.as_deref(), page_size, max_scan, &visible)
    })
    .await?;
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
            "record stored under {name} claims to be {}",
            record.name
        )));
    }
    Ok(())
}

fn is_expired(record: &SealedRecord, now: i64) -> bool {
    record.expires_at_unix.is_some_and(|e| e <= now)
}

/// Unwraps the data key in the token and decrypts the value, binding both to the identity
/// the caller asked for (not the one the record claims).
pub(crate) async fn open_record(
    state: &State,
    deadline: Duration,
    name: &SecretName,
    record: &SealedRecord,
) -> Result<crate::secret::SecretValue, Error> {
    let aad = record_aad(name, record.version, record.master_key_version);
    match Mechanism::from_id(record.mechanism) {
        Some(Mechanism::AesGcmEnvelopeV1) => {}
        Some(Mechanism::AesKwHsmOnlyV1) => {
            // Strict mode: unwrapped into a non-extractable session object and decrypted in
            // the token; only the value comes back.
            let plain = state
                .hsm
                .strict_open(
                    record.master_key_version,
                    record.wrapped_dek.clone(),
                    record.nonce.clone(),
                    aad,
                    record.ciphertext.clone(),
                    deadline,
                )
                .await?;
            return Ok(crate::secret::SecretValue::new(plain));
        }
        None => {
            return Err(Error::DataLoss(format!(
                "unknown mechanism {} in record {name} v{}",
                record.mechanism, record.version
            )));
        }
    }
    let dek = state
        .hsm
        .unwrap_data_key(
            record.master_key_version,
            record.wrapped_dek.clone(),
            aad.clone(),
            deadline,
        )
        .await?;
    envelope::open(&dek, &record.nonce, &aad, &record.ciphertext).map_err(|_| {
        Error::DataLoss(format!(
            "record {name} v{} failed authentication",
            record.version
        ))
    })
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
