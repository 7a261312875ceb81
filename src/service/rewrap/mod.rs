//! Re-wrap and master key retirement.
//!
//! **Re-wrap** moves every record sealed under an older master key version (or only
//! `from_version`) to the current one while the service keeps serving. Officers start it under
//! dual control (`Rewrap`); it runs as the once-only job `rewrap` under the job lease
//! (`jobs::run_once`) on whichever replica holds the lock, and its progress — the
//! parameters, a cursor (the store's export position) and counters — is kept in the store's
//! bookkeeping (`m/rewrap`), written under the lock's fence after a page once its records
//! are durable (at most every 250 ms), so a crash or `kill -9` leaves it `running`
//! and the next start (or another replica) resumes at the cursor. Records are re-sealed a batch at a time by `seal::reseal_batch`: each
//! authenticated against its slot as the service's open path does and sealed again as the
//! same version with the same metadata under the current key, with a fresh data key and the
//! value's ciphertext made again under the new AAD (format v2 binds the master key version),
//! the token doing both for a record in one job (one queue trip per job of records, not two
//! per record). The new record replaces the old only if the stored one is still byte for
//! byte what was read ([`Store::replace_records`], in the state commitment's batch), so a
//! concurrent write or delete loses nothing; a batch's store write runs while the token
//! re-seals the next batch, and a page's writes are durable before its cursor is saved. The
//! rate is limited (records/s); `WatchRewrap` streams the progress.
//!
//! A forged progress record can only make the job skip records: retirement counts the
//! references by scanning every record, never from the progress.
//!
//! **Retirement**: a version moves active → decrypt-only → disabled → destroyed, one
//! guarded step at a time (`check_step`); disable and destroy are refused while any record
//! references the version. The states live in the token ([`crate::hsm::lifecycle`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{State, blocking, jobs};
use crate::error::Error;
use crate::hsm::lifecycle::KeyState;
use crate::proto::{KeyReferences, MasterKeyInfo, RewrapProgress};
use crate::secret::{SealedRecord, SecretName};
use crate::store::{Aux, MAX_REPLACE_BATCH, Store, StoreError};

/// The job's name (its lock is `job/rewrap`).
pub(crate) const JOB: &str = "rewrap";
/// The bookkeeping key of the job's progress.
pub(crate) const PROGRESS_KEY: &str = "rewrap";
/// Records per second when the request names no rate.
pub const DEFAULT_RATE: u32 = 1000;
/// Store keys read per page of the scan (the cursor is saved after each page).
const PAGE: usize = 240;
/// Records re-sealed together and replaced in one store batch.
const BATCH: usize = MAX_REPLACE_BATCH;

/// Wakes the supervisor when an officer starts a re-wrap.
static WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();
/// Wakes this replica's progress streams ([`follow`]) whenever the progress is saved here.
static SAVED: tokio::sync::Notify = tokio::sync::Notify::const_new();
/// How often a progress stream reads the stored progress when nothing woke it (a job on
/// another replica saves there, not here).
const POLL: Duration = Duration::from_millis(200);

/// The job's progress as kept in the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Progress {
    pub(crate) state: String,
    pub(crate) from_version: u32,
    pub(crate) to_version: u32,
    pub(crate) rate: u32,
    /// The store's export position after the last page done (hex; empty: the start).
    pub(crate) cursor: String,
    pub(crate) total: u64,
    pub(crate) rewrapped: u64,
    pub(crate) changed: u64,
    pub(crate) failed: u64,
    pub(crate) examined: u64,
    pub(crate) started_at_unix: i64,
    pub(crate) finished_at_unix: i64,
    pub(crate) error: String,
    pub(crate) remaining: BTreeMap<u32, u64>,
    pub(crate) approval_id: String,
}

impl Progress {
    pub(crate) fn to_proto(&self) -> RewrapProgress {
        RewrapProgress {
            state: if self.state.is_empty() {
                "none".into()
            } else {
                self.state.clone()
            },
            from_version: self.from_version,
            to_version: self.to_version,
            total: self.total,
            rewrapped: self.rewrapped,
            changed: self.changed,
            failed: self.failed,
            examined: self.examined,
            rate_limit: self.rate,
            started_at_unix: self.started_at_unix,
            finished_at_unix: self.finished_at_unix,
            error: self.error.clone(),
            remaining: self
                .remaining
                .iter()
                .map(|(v, n)| KeyReferences {
                    version: *v,
                    records: *n,
                })
                .collect(),
            approval_id: self.approval_id.clone(),
        }
    }
}

/// The records of one export page (other keys are skipped).
fn records_of(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<SealedRecord> {
    use prost::Message;
    pairs
        .into_iter()
        .filter(|(k, _)| k.first() == Some(&b'r'))
        .filter_map(|(_, v)| SealedRecord::decode(v.as_slice()).ok())
        .collect()
}

/// The fields of a stored record ([`SealedRecord`]) that counting reads: decoding it skips
/// the bytes fields (the value's ciphertext, the wrapped key, the nonce) without copying
/// them, and refuses exactly what decoding the whole record refuses (the wire format, the
/// UTF-8 of its two strings), so the same records are counted.
#[derive(Clone, PartialEq, prost::Message)]
struct KeyVersionOf {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(uint32, tag = "3")]
    master_key_version: u32,
    #[prost(string, tag = "9")]
    created_by: String,
}

/// How many records reference each master key version: a scan of every record (read in
/// place where the store allows it, [`Store::for_each_record`]).
pub(crate) fn count_references(s: &dyn Store) -> Result<BTreeMap<u32, u64>, StoreError> {
    use prost::Message;
    let mut counts = BTreeMap::new();
    s.for_each_record(&mut |v| {
        if let Ok(r) = KeyVersionOf::decode(v) {
            *counts.entry(r.master_key_version).or_insert(0) += 1;
        }
    })?;
    Ok(counts)
}

/// Whether a record under `mk` is to move to `to` (only `from` when it is not 0).
fn moves(mk: u32, from: u32, to: u32) -> bool {
    mk != to && (from == 0 || mk == from)
}

/// The progress as kept in the store (default: no job ever ran).
pub(crate) async fn load(state: &State) -> Result<Progress, Error> {
    let raw = blocking(state, |s| s.aux_get(Aux::Meta, PROGRESS_KEY)).await?;
    match raw {
        None => Ok(Progress::default()),
        Some(b) => serde_json::from_slice(&b)
            .map_err(|e| Error::DataLoss(format!("the re-wrap progress does not parse: {e}"))),
    }
}

/// Streams the progress to `tx`: `first`, then every change `load` reads, until the job is
/// no longer running or the receiver goes away. A save on this replica wakes it at once (so
/// the end is seen as soon as it is saved); a job on another replica is seen by reading the
/// stored progress every `poll`.
pub(crate) async fn follow<L, F>(
    first: Progress,
    mut load: L,
    poll: Duration,
    tx: tokio::sync::mpsc::Sender<Result<RewrapProgress, tonic::Status>>,
) where
    L: FnMut() -> F,
    F: std::future::Future<Output = Result<Progress, Error>>,
{
    let mut last = first;
    if tx.send(Ok(last.to_proto())).await.is_err() {
        return;
    }
    while last.state == "running" {
        // Registered before the read, so a save after the read still wakes the wait.
        let saved = SAVED.notified();
        let now = match load().await {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(tonic::Status::from(e))).await;
                return;
            }
        };
        if now != last {
            if tx.send(Ok(now.to_proto())).await.is_err() {
                return;
            }
            last = now;
            continue;
        }
        tokio::select! {
            () = saved => {}
            () = tokio::time::sleep(poll) => {}
        }
    }
}

/// Wakes this replica's progress streams: the progress was just saved.
fn announce() {
    SAVED.notify_waiters();
}

/// Follows the stored progress for `WatchRewrap` (see [`follow`]).
pub(crate) async fn watch(
    state: Arc<State>,
    first: Progress,
    tx: tokio::sync::mpsc::Sender<Result<RewrapProgress, tonic::Status>>,
) {
    follow(first, || load(&state), POLL, tx).await;
}

/// What a dry run finds: the records that would move now.
pub(crate) async fn dry_run(state: &State, from: u32) -> Result<Progress, Error> {
    let to = current(state)?;
    let counts = blocking(state, count_references).await?;
    let remaining: BTreeMap<u32, u64> = counts
        .into_iter()
        .filter(|(v, _)| moves(*v, from, to))
        .collect();
    Ok(Progress {
        state: "dry-run".into(),
        from_version: from,
        to_version: to,
        total: remaining.values().sum(),
        remaining,
        ..Progress::default()
    })
}

fn current(state: &State) -> Result<u32, Error> {
    state
        .hsm
        .current_master_key()
        .ok_or(Error::Hsm(crate::hsm::HsmError::NoMasterKey))
}

/// Checks a request to re-wrap before it is recorded for approval.
pub(crate) async fn check_request(state: &State, from: u32) -> Result<(), Error> {
    let to = current(state)?;
    if from != 0 && from >= to {
        return Err(Error::InvalidArgument(format!(
            "--from-version {from} is not older than the current master key version {to}"
        )));
    }
    let p = load(state).await?;
    if p.state == "running" {
        return Err(Error::FailedPrecondition(format!(
            "a re-wrap to version {} is running ({} of {} done); follow it with `strongroom-admin rewrap --watch`",
            p.to_version, p.rewrapped, p.total
        )));
    }
    Ok(())
}

/// Starts an approved re-wrap: records it as running (so a restart resumes it) and wakes
/// the job. Returns what the approval records as its result.
pub(crate) async fn start(
    state: &State,
    from: u32,
    rate: u32,
    approval_id: &str,
) -> Result<String, Error> {
    check_request(state, from).await?;
    let to = current(state)?;
    let rate = if rate == 0 { DEFAULT_RATE } else { rate };
    let p = Progress {
        state: "running".into(),
        from_version: from,
        to_version: to,
        rate,
        started_at_unix: super::secrets::unix_now(),
        approval_id: approval_id.to_owned(),
        ..Progress::default()
    };
    save(state, &p).await?;
    WAKE.notify_one();
    Ok(format!(
        "re-wrap to master key version {to} started at {rate} records/s; follow it with `strongroom-admin rewrap --watch`"
    ))
}

async fn save(state: &State, p: &Progress) -> Result<(), Error> {
    let bytes = serde_json::to_vec(p).map_err(|e| Error::Internal(e.to_string()))?;
    blocking(state, move |s| s.aux_put(Aux::Meta, PROGRESS_KEY, &bytes)).await?;
    announce();
    Ok(())
}

async fn save_fenced(state: &State, held: &jobs::Held, p: &Progress) -> Result<(), Error> {
    let bytes = serde_json::to_vec(p).map_err(|e| Error::Internal(e.to_string()))?;
    let lock = held.lock.clone();
    blocking(state, move |s| {
        s.aux_put_fenced(&lock, Aux::Meta, PROGRESS_KEY, &bytes)
    })
    .await?
    .map_err(jobs::lost_lock)?;
    announce();
    Ok(())
}

/// Runs the re-wrap job whenever its progress says `running` (after a start, a restart, or
/// another replica's loss of the lock), on whichever replica takes the lock.
pub(crate) async fn supervise(state: Arc<State>) {
    loop {
        match load(&state).await {
            Ok(p) if p.state == "running" => {
                let s = state.clone();
                match jobs::run_once(&state, JOB, |held| run(s, held)).await {
                    Ok(Some(())) => continue,
                    Ok(None) | Err(Error::LostLock(_)) => {}
                    // Retrying cannot help (the new key's wrap limit, a progress record that
                    // does not parse): the job ends as failed, saying why.
                    Err(e @ (Error::FailedPrecondition(_) | Error::DataLoss(_))) => {
                        tracing::error!(error = %e, "the re-wrap job failed");
                        if let Err(e) = fail(&state, &e.to_string()).await {
                            tracing::warn!(error = %e, "cannot record the re-wrap's failure");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the re-wrap job stopped; it resumes at its cursor")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the re-wrap progress"),
        }
        tokio::select! {
            () = WAKE.notified() => {}
            () = tokio::time::sleep(state.jobs.renew.max(Duration::from_millis(200))) => {}
        }
    }
}

/// Records the running job as failed with `why` (the next `rewrap` may start again).
async fn fail(state: &State, why: &str) -> Result<(), Error> {
    let mut p = load(state).await.unwrap_or_default();
    p.state = "failed".into();
    p.error = why.to_owned();
    p.finished_at_unix = super::secrets::unix_now();
    save(state, &p).await
}

/// The job itself: from the saved cursor, re-seals every record to move, a batch at a
/// time, and saves the cursor as pages are done; ends with a count of what remains.
///
/// Three stages run at once, so the token never waits for the store: the scan (this task)
/// reads a page, counts its wraps and hands its batches to the token, keeping up to
/// [`TOKEN_AHEAD`] batches queued there; as each batch comes back, in scan order, its
/// compare-and-replace goes to the writer ([`write`]), which replaces the batches one after
/// the other and saves the cursor after a page whose batches are all durable (at most every
/// [`SAVE_EVERY`], and not for a page that changed nothing).
async fn run(state: Arc<State>, held: Arc<jobs::Held>) -> Result<(), Error> {
    let mut p = load(&state).await?;
    if p.state != "running" {
        return Ok(());
    }
    tracing::info!(
        to = p.to_version,
        from = p.from_version,
        cursor = %p.cursor,
        "re-wrap job resumes"
    );
    let job_began = Instant::now();
    let to = p.to_version;
    if p.cursor.is_empty() && p.examined == 0 {
        // The estimate of the work, once, at the start (not in the approval's call: a scan
        // of a large store outlasts a deadline).
        let from = p.from_version;
        p.total = blocking(&state, count_references)
            .await?
            .into_iter()
            .filter(|(v, _)| moves(*v, from, to))
            .map(|(_, n)| n)
            .sum();
        save_fenced(&state, &held, &p).await?;
    }
    let counted = job_began.elapsed();
    let cursor = (!p.cursor.is_empty())
        .then(|| hex::decode(&p.cursor))
        .transpose()
        .map_err(|e| Error::DataLoss(format!("the re-wrap cursor does not parse: {e}")))?;
    let (tx, rx) = tokio::sync::mpsc::channel(WRITES_AHEAD);
    let writer = tokio::spawn(write(state.clone(), held.clone(), p.clone(), rx));
    let scanned = scan(&state, &p, cursor, &tx).await;
    drop(tx);
    // The writer ends once it has written what the scan handed it; its error (the lock
    // lost, the store) comes first, since a scan stopped by it only says the writer went.
    let written = writer
        .await
        .map_err(|e| Error::Internal(format!("the re-wrap's writer failed: {e}")))?;
    let mut p = written?;
    scanned?;
    let passed = job_began.elapsed();
    let counts = blocking(&state, count_references).await?;
    p.remaining = counts.into_iter().filter(|(v, _)| *v != to).collect();
    p.state = "finished".into();
    p.finished_at_unix = super::secrets::unix_now();
    save_fenced(&state, &held, &p).await?;
    let detail = format!(
        "approval={} to_version={} rewrapped={} changed={} failed={} remaining={}",
        p.approval_id,
        to,
        p.rewrapped,
        p.changed,
        p.failed,
        p.remaining.values().sum::<u64>()
    );
    tracing::info!(
        %detail,
        count_ms = counted.as_millis() as u64,
        pass_ms = (passed - counted).as_millis() as u64,
        recount_ms = (job_began.elapsed() - passed).as_millis() as u64,
        "re-wrap finished"
    );
    let event = crate::audit::AuditEvent {
        plane: "admin",
        identity: None,
        operation: "RewrapFinished",
        name: None,
        version: Some(u64::from(to)),
        status: tonic::Code::Ok,
        request_id: 0,
        detail: Some(detail),
        change: None,
    };
    if let Err(e) = state.audit.record(&event, None).await {
        tracing::error!(error = %e, "cannot audit the end of the re-wrap");
    }
    Ok(())
}

/// Batches handed to the token ahead of the one the scan waits for: enough that the token
/// always has the next batch queued while a batch's result goes to the writer.
const TOKEN_AHEAD: usize = 2;
/// Steps the writer may lag behind the token (then the scan waits for it).
const WRITES_AHEAD: usize = 8;
/// The cursor is saved at most this often (a crash re-does at most this much work, which
/// is harmless: a record already under the new key is not moved again).
const SAVE_EVERY: Duration = Duration::from_millis(250);

/// What the scan hands the writer, in scan order.
enum Step {
    /// A re-sealed batch: its compare-and-replace pairs, and how many of its records are
    /// left as they are (they do not open).
    Batch {
        pairs: Vec<(SealedRecord, SealedRecord)>,
        failed: u64,
    },
    /// Every record before `next` (the export position; `None`: the end) has been handed
    /// over; the page held `examined` records, `todo` of them to move.
    Page {
        next: Option<Vec<u8>>,
        examined: u64,
        todo: u64,
    },
}

/// A batch at the token, or the end of a page, in scan order.
enum Pending {
    Batch(tokio::task::JoinHandle<Result<Step, Error>>),
    Page(Step),
}

/// The scan: from `cursor`, reads each page, counts its wraps, paces and sends its batches
/// to the token, and hands the results and the page ends to the writer (`tx`) in order.
async fn scan(
    state: &Arc<State>,
    p: &Progress,
    mut cursor: Option<Vec<u8>>,
    tx: &tokio::sync::mpsc::Sender<Step>,
) -> Result<(), Error> {
    let (from, to) = (p.from_version, p.to_version);
    let rate = f64::from(p.rate.max(1));
    let began = Instant::now();
    let mut paced = 0u64;
    let mut pending = std::collections::VecDeque::new();
    loop {
        let c = cursor.clone();
        let page = blocking(state, move |s| s.export_page(c.as_deref(), PAGE)).await?;
        let next = page.next;
        let records = records_of(page.pairs);
        let examined = records.len() as u64;
        let todo: Vec<SealedRecord> = records
            .into_iter()
            .filter(|r| moves(r.master_key_version, from, to))
            .collect();
        // The page's wraps are counted before any of them is made (a crash can only
        // over-count), in one store write rather than one per batch.
        let n = todo.len() as u64;
        if n > 0 {
            let wraps = blocking(state, move |s| s.count_wraps(to, n)).await?;
            if wraps > state.max_wraps {
                return Err(Error::FailedPrecondition(format!(
                    "master key version {to} has reached its wrap limit ({}); rotate, then re-wrap again",
                    state.max_wraps
                )));
            }
        }
        let mut todo = todo.into_iter().peekable();
        while todo.peek().is_some() {
            let chunk: Vec<SealedRecord> = todo.by_ref().take(BATCH).collect();
            // Pace: the records done so far may not run ahead of the rate.
            paced += chunk.len() as u64;
            let due = began + Duration::from_secs_f64(paced as f64 / rate);
            tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
            let s = state.clone();
            pending.push_back(Pending::Batch(tokio::spawn(reseal(s, chunk, to))));
            while pending.len() > TOKEN_AHEAD {
                hand_over(pending.pop_front(), tx).await?;
            }
        }
        let end = next.is_none();
        pending.push_back(Pending::Page(Step::Page {
            next: next.clone(),
            examined,
            todo: n,
        }));
        if end {
            break;
        }
        cursor = next;
    }
    while let Some(p) = pending.pop_front() {
        hand_over(Some(p), tx).await?;
    }
    Ok(())
}

/// Waits for the oldest pending step and gives it to the writer.
async fn hand_over(
    pending: Option<Pending>,
    tx: &tokio::sync::mpsc::Sender<Step>,
) -> Result<(), Error> {
    let step = match pending {
        None => return Ok(()),
        Some(Pending::Page(step)) => step,
        Some(Pending::Batch(job)) => job
            .await
            .map_err(|e| Error::Internal(format!("a re-seal task failed: {e}")))??,
    };
    tx.send(step)
        .await
        .map_err(|_| Error::Internal("the re-wrap's writer stopped".into()))
}

/// Re-seals one batch under `to` (one token trip per job of records, see
/// [`super::seal::reseal_batch`]); a record that does not open is left as it is, counted.
async fn reseal(state: Arc<State>, chunk: Vec<SealedRecord>, to: u32) -> Result<Step, Error> {
    let mut failed = 0u64;
    let mut named = Vec::with_capacity(chunk.len());
    for r in &chunk {
        match SecretName::parse(&r.name, state.limits.max_name_bytes) {
            Ok(name) => named.push((name, r)),
            Err(e) => {
                tracing::warn!(name = %r.name, version = r.version, error = %format!("stored name {}: {e}", r.name), "re-wrap leaves a record it cannot open");
                failed += 1;
            }
        }
    }
    let out = super::seal::reseal_batch(&state, &named, to, state.hsm_timeout).await?;
    let mut pairs = Vec::with_capacity(named.len());
    for ((_, old), new) in named.into_iter().zip(out) {
        match new {
            Ok(new) => pairs.push((old.clone(), new)),
            // Refused as tampered or unreadable: left as it is, counted.
            Err(
                e @ (Error::DataLoss(_) | Error::Hsm(crate::hsm::HsmError::UnwrapAuthentication)),
            ) => {
                tracing::warn!(name = %old.name, version = old.version, error = %e, "re-wrap leaves a record it cannot open");
                failed += 1;
            }
            // The token or store is unavailable: stop; the job resumes at the cursor.
            Err(e) => return Err(e),
        }
    }
    Ok(Step::Batch { pairs, failed })
}

/// The writer: replaces each batch (compare-and-replace under the job's lock, durable on
/// return) in scan order, and saves the cursor after a page once every batch before it is
/// written. Returns the progress as it stands when the scan is done.
async fn write(
    state: Arc<State>,
    held: Arc<jobs::Held>,
    mut p: Progress,
    mut steps: tokio::sync::mpsc::Receiver<Step>,
) -> Result<Progress, Error> {
    let mut saved = Instant::now();
    while let Some(step) = steps.recv().await {
        match step {
            Step::Batch { pairs, failed } => {
                p.failed += failed;
                if !pairs.is_empty() {
                    let lock = held.lock.clone();
                    let replaced = blocking(&state, move |s| s.replace_records(&lock, &pairs))
                        .await?
                        .map_err(jobs::lost_lock)?;
                    tally(&mut p, replaced);
                }
            }
            Step::Page {
                next,
                examined,
                todo,
            } => {
                p.examined += examined;
                crate::audit::reconcile::halt_point("rewrap-after-page").await;
                p.cursor = next.as_ref().map(hex::encode).unwrap_or_default();
                // The last page's cursor is saved with the end; a page that moved nothing
                // is not worth a write of its own.
                if next.is_some() && todo > 0 && saved.elapsed() >= SAVE_EVERY {
                    save_fenced(&state, &held, &p).await?;
                    saved = Instant::now();
                }
            }
        }
    }
    Ok(p)
}

/// Counts the answer of one [`Store::replace_records`]: replaced, or changed since read.
fn tally(p: &mut Progress, replaced: Vec<bool>) {
    let done = replaced.iter().filter(|r| **r).count() as u64;
    p.rewrapped += done;
    p.changed += replaced.len() as u64 - done;
}

/// Every master key version the token holds or has a state for, with its state and
/// references.
pub(crate) async fn list_keys(state: &State) -> Result<Vec<MasterKeyInfo>, Error> {
    let states = state.hsm.key_states().await?;
    let in_token = state.hsm.master_keys_in_token().await?;
    let counts = blocking(state, count_references).await?;
    let current = state.hsm.current_master_key();
    let mut versions: Vec<u32> = in_token.clone();
    versions.extend(states.recorded().map(|(v, _)| v));
    versions.extend(counts.keys().copied());
    versions.sort_unstable();
    versions.dedup();
    Ok(versions
        .into_iter()
        .map(|v| MasterKeyInfo {
            version: v,
            state: states.get(v).as_str().into(),
            references: counts.get(&v).copied().unwrap_or(0),
            current: current == Some(v),
            in_token: in_token.contains(&v),
        })
        .collect())
}

/// Checks that master key `version` may move to `to` now: the next step of its life, not
/// the current version, and (to disable or destroy) referenced by no record.
pub(crate) async fn check_step(state: &State, version: u32, to: &str) -> Result<KeyState, Error> {
    let Some(to) = KeyState::parse(to).filter(|s| *s != KeyState::Active) else {
        return Err(Error::InvalidArgument(format!(
            "unknown master key state {to:?}: give decrypt-only, disabled or destroyed"
        )));
    };
    let states = state.hsm.key_states().await?;
    let in_token = state.hsm.master_keys_in_token().await?;
    let now = states.get(version);
    if !in_token.contains(&version) && now != KeyState::Destroyed {
        return Err(Error::NotFound);
    }
    if state.hsm.current_master_key() == Some(version) {
        return Err(Error::FailedPrecondition(format!(
            "master key version {version} is the current one (new writes use it); rotate first with `strongroom-admin key rotate`"
        )));
    }
    if now.next() != Some(to) {
        return Err(Error::FailedPrecondition(format!(
            "master key version {version} is {}; it can only move to {}",
            now.as_str(),
            now.next()
                .map_or("nothing (it is destroyed)", KeyState::as_str)
        )));
    }
    if matches!(to, KeyState::Disabled | KeyState::Destroyed) {
        let refs = blocking(state, count_references)
            .await?
            .get(&version)
            .copied()
            .unwrap_or(0);
        if refs > 0 {
            return Err(Error::FailedPrecondition(format!(
                "master key version {version} is still referenced by {refs} record(s); move them first with `strongroom-admin rewrap --from-version {version}`"
            )));
        }
    }
    Ok(to)
}

/// Carries out an approved step (checked again: records may have been written since).
pub(crate) async fn set_state(state: &State, version: u32, to: &str) -> Result<String, Error> {
    let to = check_step(state, version, to).await?;
    state.hsm.set_key_state(version, to).await?;
    Ok(match to {
        KeyState::Destroyed => {
            format!("master key version {version} destroyed in the token; back up the token")
        }
        s => format!("master key version {version} is now {}", s.as_str()),
    })
}

#[cfg(test)]
mod tests;
