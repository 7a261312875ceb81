//! Once-only jobs and the replica id's registration: work that must run on one replica at a
//! time runs under a lock with a lease and a fencing token (see [`crate::store::Lock`]).
//!
//! [`run_once`] takes a job's lock (`job/<name>`, a lease of `jobs.lease_ttl_secs`), renews
//! it every `jobs.renew_interval_ms` while the job runs, and lets it go when the job ends.
//! A replica that finds the lock held skips the job: another replica runs it. The job's
//! store writes carry the lock ([`Store::aux_put_fenced`](crate::store::Store::aux_put_fenced)),
//! so etcd itself refuses the write of a holder whose lease lapsed — paused (SIGSTOP), cut
//! off or stalled past its time to live while another replica took the lock over. The
//! fence decides, not the holder's own view of its lease: a job learns it lost the lock
//! when its write is refused ([`Error::LostLock`]), and then stops.
//!
//! Jobs today: `state-report`, which writes the officer-visible record of the store's state
//! (`m/state-report`: which replica, under which fence, when, the store's epoch and secret
//! count) every `jobs.state_report_interval_secs`, from whichever replica holds its lock (not
//! while that replica has flagged the store: officers review it as it is). The per-replica
//! store verification stays per replica (it only reads). The approvals purge
//! (`approvals::purge_task`) runs the same way, as job `approval-purge`: one replica at a time,
//! every removal fenced ([`Store::aux_delete_fenced`](crate::store::Store::aux_delete_fenced),
//! errors through [`lost_lock`]). So does the expiry-notice sweep (`expiry::notices`), as job
//! `expiry-notice`: every notice written and removed fenced.
//!
//! [`register_replica`] holds `replica/<id>` for the life of the process, so a replica id
//! is live in at most one process: a second process with the same id is refused at start.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{State, blocking};
use crate::error::Error;
use crate::store::{Aux, Lock, LockKind, Store, lock_name};

/// The job that writes the officer-visible state report.
pub(crate) const STATE_REPORT_JOB: &str = "state-report";
/// The bookkeeping key of the state report.
pub(crate) const STATE_REPORT_KEY: &str = "state-report";

/// A job's lock while it runs.
pub(crate) struct Held {
    /// The lock, with its fence: pass it to the fenced store writes.
    pub(crate) lock: Lock,
    lost: AtomicBool,
}

impl Held {
    /// Whether a renewal found the lease gone. Advisory: a job may stop early on it, but
    /// only the fence makes its writes safe.
    #[allow(dead_code)] // for jobs that can stop between steps (the approvals purge)
    pub(crate) fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

/// What this process writes as a lock's holder: its replica id, process id and host.
pub(crate) fn holder(replica_id: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let who = if replica_id.is_empty() {
        "single node".to_owned()
    } else {
        format!("replica {replica_id}")
    };
    format!("{who} (pid {} on {host})", std::process::id())
}

/// Runs `job` here unless another replica runs it now (`Ok(None)`): takes the job's lock,
/// keeps its lease renewed while `f` runs, runs `f` with it, and gives it up. `f` passes
/// the lock to [`Store::aux_put_fenced`](crate::store::Store::aux_put_fenced) and maps a
/// [`Fenced`](crate::store::Fenced) refusal to [`Error::LostLock`] ([`lost_lock`]).
pub(crate) async fn run_once<T, F, Fut>(
    state: &Arc<State>,
    job: &str,
    f: F,
) -> Result<Option<T>, Error>
where
    F: FnOnce(Arc<Held>) -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let name = lock_name(LockKind::Job, job);
    let (n, who, ttl) = (name.clone(), state.holder.clone(), state.jobs.ttl);
    let lock = match blocking(state, move |s| s.try_lock(&n, &who, ttl)).await? {
        Ok(lock) => lock,
        Err(held) => {
            tracing::debug!(job, holder = %held.holder, "the job runs elsewhere");
            return Ok(None);
        }
    };
    tracing::info!(job, fence = lock.fence, "took the lock for job {job}");
    let held = Arc::new(Held {
        lock,
        lost: AtomicBool::new(false),
    });
    let renewer = super::AbortOnDrop(tokio::spawn(renew(state.clone(), held.clone())));
    let result = f(held.clone()).await;
    drop(renewer);
    match &result {
        Err(Error::LostLock(why)) => {
            tracing::warn!(
                job,
                fence = held.lock.fence,
                "lost the lock for job {job}: {why}"
            );
        }
        _ => {
            let lock = held.lock.clone();
            if let Err(e) = blocking(state, move |s| s.unlock(&lock)).await {
                tracing::warn!(job, error = %e, "cannot give the job's lock up; its lease will lapse");
            }
        }
    }
    result.map(Some)
}

/// The error of a job whose fenced write was refused.
pub(crate) fn lost_lock(f: crate::store::Fenced) -> Error {
    Error::LostLock(format!(
        "its write under fence {} was refused: {}",
        f.fence,
        if f.now == 0 {
            "nobody holds the lock now (its lease lapsed)".to_owned()
        } else {
            format!("another holder took the lock (fence {})", f.now)
        }
    ))
}

/// Renews a held lock's lease until it is gone (then marks it lost) or the task is aborted.
async fn renew(state: Arc<State>, held: Arc<Held>) {
    let every = state.jobs.renew;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let lock = held.lock.clone();
        match blocking(&state, move |s| s.renew_lock(&lock)).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    lock = %held.lock.name,
                    fence = held.lock.fence,
                    "the lock's lease expired; writes under it will be refused"
                );
                held.lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                tracing::warn!(lock = %held.lock.name, error = %e, "cannot renew the lock's lease now")
            }
        }
    }
}

/// The state report officers read (`m/state-report` in the store).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StateReport {
    /// The replica that wrote it (empty: a single node).
    pub(crate) replica: String,
    /// The fence of the lock it was written under.
    pub(crate) fence: i64,
    /// When, in seconds since the Unix epoch.
    pub(crate) at_unix: u64,
    /// The store's epoch before the report.
    pub(crate) epoch: u64,
    /// Live secrets.
    pub(crate) secrets: u64,
}

/// Runs the state-report job on whichever replica holds its lock: every
/// `jobs.state_report_interval_secs` the holder writes the report under the lock; the
/// others try to take the lock every renew interval.
pub(crate) async fn state_reports(state: Arc<State>) {
    let every = state.jobs.report;
    if every.is_zero() {
        return;
    }
    loop {
        let s = state.clone();
        match run_once(&state, STATE_REPORT_JOB, |held| {
            report_while_held(s, held, every)
        })
        .await
        {
            Ok(_) | Err(Error::LostLock(_)) => {}
            Err(e) => tracing::warn!(error = %e, "the state-report job failed; will try again"),
        }
        tokio::time::sleep(state.jobs.renew).await;
    }
}

/// Writes a report every `every` (the first one interval after taking the lock, so a
/// start changes nothing in the store), until a write is refused (the lock is lost:
/// [`Error::LostLock`]) or fails. Asks nothing else before writing: the fence decides
/// whether this replica still holds the lock. Writes nothing while this replica has
/// flagged the store (officers review it as it is).
async fn report_while_held(
    state: Arc<State>,
    held: Arc<Held>,
    every: Duration,
) -> Result<(), Error> {
    loop {
        tokio::time::sleep(every).await;
        if super::rollback::ensure_trusted(&state).is_err() {
            continue;
        }
        let (epoch, secrets) = blocking(&state, |s: &dyn Store| {
            Ok((s.epoch()?.1, s.secret_count()?))
        })
        .await?;
        crate::metrics::store_secrets(secrets);
        let report = StateReport {
            replica: state.replica_id.clone(),
            fence: held.lock.fence,
            at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            epoch,
            secrets,
        };
        let value = serde_json::to_vec(&report).map_err(|e| Error::Internal(e.to_string()))?;
        let lock = held.lock.clone();
        blocking(&state, move |s| {
            s.aux_put_fenced(&lock, Aux::Meta, STATE_REPORT_KEY, &value)
        })
        .await?
        .map_err(lost_lock)?;
        tracing::info!(fence = held.lock.fence, epoch, "wrote the state report");
    }
}

/// Holds this process's replica id (`replica/<id>`) for its whole life. At start, a holder
/// that died has its lease lapse within the time to live, so a taken id is retried for that
/// long before the start is refused. Returns the lock; [`keep_replica`] keeps it.
pub(crate) async fn register_replica(
    store: &Arc<dyn Store>,
    replica_id: &str,
    holder: &str,
    ttl: Duration,
) -> Result<Lock, Error> {
    let name = lock_name(LockKind::Replica, replica_id);
    // A holder that died lets its lease lapse within one time to live, but etcd gives every
    // lease its whole time to live again when its leader changes (a restart of the cluster
    // included): wait for two, so that a replica restarted with its etcd is not refused for
    // its own dead predecessor.
    let give_up = Instant::now() + 2 * ttl + Duration::from_secs(1);
    let mut logged = false;
    loop {
        let (s, n, h) = (store.clone(), name.clone(), holder.to_owned());
        let taken = off_runtime(&s, move |s| s.try_lock(&n, &h, ttl)).await?;
        match taken {
            Ok(lock) => {
                tracing::info!(
                    replica_id,
                    fence = lock.fence,
                    "registered replica id {replica_id}"
                );
                return Ok(lock);
            }
            Err(held) if Instant::now() >= give_up => {
                return Err(Error::FailedPrecondition(format!(
                    "replica id {replica_id:?} is live in another process: {}; give each replica its own server.replica_id",
                    held.holder
                )));
            }
            Err(held) => {
                if !logged {
                    tracing::warn!(
                        replica_id,
                        holder = %held.holder,
                        "replica id {replica_id} is held by another process; waiting up to twice jobs.lease_ttl_secs for its lease to lapse"
                    );
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Keeps the replica id's lease alive from registration on (`current` is the lock in
/// force); if it lapsed (this process was paused or cut off past the time to live) takes
/// the id again, and if another process holds it by then, completes: the caller stops
/// serving, since two live processes must not share an id.
pub(crate) async fn keep_replica(
    store: Arc<dyn Store>,
    replica_id: String,
    holder: String,
    (ttl, every): (Duration, Duration),
    current: Arc<std::sync::Mutex<Lock>>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(lock) = current.lock().map(|l| l.clone()) else {
            return;
        };
        match off_runtime(&store, move |s| s.renew_lock(&lock)).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the replica id's lease now");
                continue;
            }
        }
        let (n, h) = (lock_name(LockKind::Replica, &replica_id), holder.clone());
        match off_runtime(&store, move |s| s.try_lock(&n, &h, ttl)).await {
            Ok(Ok(again)) => {
                tracing::warn!(
                    fence = again.fence,
                    "the replica id's lease had lapsed; registered it again"
                );
                if let Ok(mut l) = current.lock() {
                    *l = again;
                }
            }
            Ok(Err(held)) => {
                tracing::error!(
                    %replica_id,
                    holder = %held.holder,
                    "lost replica id {replica_id} to another process while this one was paused or cut off; stopping"
                );
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot register the replica id again now"),
        }
    }
}

/// Runs a store call off the async runtime (before there is a [`State`]).
async fn off_runtime<R: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<R, crate::store::StoreError> + Send + 'static,
) -> Result<R, Error> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .map_err(|e| Error::Internal(format!("store task failed: {e}")))?
        .map_err(Error::from)
}
