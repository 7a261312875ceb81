//! Locks under a lease with a fencing token: one live holder of a replica id, and one runner
//! of a once-only job, across every process that shares the store.
//!
//! On etcd ([`EtcdStore`](super::EtcdStore)) a lock is a key created under an etcd lease by
//! a transaction that applies only while the key is absent; the holder keeps the lease
//! alive, and the key vanishes when the lease expires (a holder that stopped, crashed or
//! paused past its time to live) or is revoked. The lock's *fence* is the key's create
//! revision: every later holder has a higher one. A write made under a lock
//! ([`Store::aux_put_fenced`](super::Store::aux_put_fenced)) is the same etcd transaction as
//! an ordinary write plus a compare that the lock key's create revision is still the fence,
//! so a holder that lost its lock without noticing (paused with SIGSTOP, cut off by a
//! partition) has its write refused by etcd itself ([`Fenced`]) — never two holders writing.
//!
//! Lock keys live outside `store.prefix`, because every key under the prefix is part of the
//! store's state commitment (a lease expiring would change it behind the service's back):
//! beside it, at the prefix with its final `/` replaced by `.locks/` (`strongroom/` →
//! `strongroom.locks/`, which sorts before `strongroom/` and so is outside its range), as
//! `…locks/replica/<id>` and `…locks/job/<name>` ([`lock_name`]). The value names the holder
//! (replica id, process id, host), for the refusal's message.
//!
//! sled is opened by one process only (it locks its directory), so its locks are this
//! process's ([`LocalLocks`]): the same API, a generation counter as the fence.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::StoreError;

/// What a lock is for: its name under the lock namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// A replica id: held for the life of the process.
    Replica,
    /// A once-only job.
    Job,
}

/// The lock's name under the lock namespace: `replica/<id>` or `job/<name>`.
pub fn lock_name(kind: LockKind, name: &str) -> String {
    match kind {
        LockKind::Replica => format!("replica/{name}"),
        LockKind::Job => format!("job/{name}"),
    }
}

/// A lock this process holds, until its lease lapses. On etcd it is a key (outside
/// `store.prefix`, beside it: [`lock_namespace`]) created under a lease while absent, and its
/// fence is that key's create revision; a write under it
/// ([`Store::aux_put_fenced`](super::Store::aux_put_fenced)) compares that revision in the
/// same transaction, so a holder that lost the lock writes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    /// Its name (see [`lock_name`]).
    pub name: String,
    /// The fencing token: the lock key's create revision on etcd, a generation locally.
    /// Every later holder of the same lock has a higher one.
    pub fence: i64,
    /// The lease that keeps it (etcd's lease id; the generation locally).
    pub lease: i64,
    /// The lease's time to live as granted.
    pub ttl: Duration,
}

/// The lock is held by someone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHeld {
    /// Who holds it, as its holder described itself.
    pub holder: String,
}

/// A write under a lock was refused: the lock is no longer the writer's (its lease lapsed,
/// or another process took it since). Nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced {
    /// The fence the write carried.
    pub fence: i64,
    /// The lock key's create revision now (0: nobody holds it).
    pub now: i64,
}

/// The locks of a store only one process opens: held in memory, with a lease time kept on
/// this process's monotonic clock.
#[derive(Default)]
pub struct LocalLocks {
    inner: Mutex<LocalState>,
}

#[derive(Default)]
struct LocalState {
    next: i64,
    held: HashMap<String, LocalHolder>,
}

struct LocalHolder {
    fence: i64,
    holder: String,
    expires: Instant,
}

impl LocalLocks {
    /// Takes `name` for `holder` for `ttl`, unless a live holder has it.
    pub fn try_lock(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Result<Lock, LockHeld>, StoreError> {
        let mut s = self.inner.lock().map_err(|_| StoreError::Poisoned)?;
        let now = Instant::now();
        if let Some(h) = s.held.get(name)
            && h.expires > now
        {
            return Ok(Err(LockHeld {
                holder: h.holder.clone(),
            }));
        }
        s.next += 1;
        let fence = s.next;
        s.held.insert(
            name.to_owned(),
            LocalHolder {
                fence,
                holder: holder.to_owned(),
                expires: now + ttl,
            },
        );
        Ok(Ok(Lock {
            name: name.to_owned(),
            fence,
            lease: fence,
            ttl,
        }))
    }

    /// Extends the lease; `false` when the lock is no longer `lock`'s.
    pub fn renew(&self, lock: &Lock) -> Result<bool, StoreError> {
        let mut s = self.inner.lock().map_err(|_| StoreError::Poisoned)?;
        let now = Instant::now();
        match s.held.get_mut(&lock.name) {
            Some(h) if h.fence == lock.fence && h.expires > now => {
                h.expires = now + lock.ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Gives the lock up (if it is still `lock`'s).
    pub fn unlock(&self, lock: &Lock) -> Result<(), StoreError> {
        let mut s = self.inner.lock().map_err(|_| StoreError::Poisoned)?;
        if s.held
            .get(&lock.name)
            .is_some_and(|h| h.fence == lock.fence)
        {
            s.held.remove(&lock.name);
        }
        Ok(())
    }

    /// Runs `write` only while `lock` is held, with no other holder possible until it
    /// returns (the check and the write happen under this table's mutex).
    pub fn fenced<T>(
        &self,
        lock: &Lock,
        write: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<Result<T, Fenced>, StoreError> {
        let s = self.inner.lock().map_err(|_| StoreError::Poisoned)?;
        match s.held.get(&lock.name) {
            Some(h) if h.fence == lock.fence && h.expires > Instant::now() => Ok(Ok(write()?)),
            other => Ok(Err(Fenced {
                fence: lock.fence,
                now: other
                    .filter(|h| h.expires > Instant::now())
                    .map_or(0, |h| h.fence),
            })),
        }
    }
}

/// The etcd key namespace of locks for a store under `prefix` (which ends in `/`): the
/// prefix with its final `/` replaced by `.locks/`.
pub fn lock_namespace(prefix: &str) -> String {
    format!("{}.locks/", prefix.strip_suffix('/').unwrap_or(prefix))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_lock_namespace_is_outside_the_store_prefix() {
        let p = "strongroom/";
        let ns = lock_namespace(p);
        assert_eq!(ns, "strongroom.locks/");
        // The store's keys are [p, "strongroom0"): the namespace sorts before them all.
        assert!(ns.as_str() < p && !ns.starts_with(p));
        assert_eq!(lock_namespace("a/b/"), "a/b.locks/");
    }

    #[test]
    fn a_local_lock_has_one_holder_and_a_later_holder_a_higher_fence() {
        let locks = LocalLocks::default();
        let ttl = Duration::from_secs(60);
        let a = locks.try_lock("job/x", "a", ttl).unwrap().unwrap();
        assert_eq!(
            locks.try_lock("job/x", "b", ttl).unwrap(),
            Err(LockHeld { holder: "a".into() })
        );
        assert_eq!(locks.fenced(&a, || Ok(7)).unwrap(), Ok(7));
        assert!(locks.renew(&a).unwrap());
        locks.unlock(&a).unwrap();
        assert!(!locks.renew(&a).unwrap());
        let b = locks.try_lock("job/x", "b", ttl).unwrap().unwrap();
        assert!(b.fence > a.fence);
        // The old holder's write is refused, and says who holds the lock now.
        assert_eq!(
            locks.fenced(&a, || Ok(())).unwrap(),
            Err(Fenced {
                fence: a.fence,
                now: b.fence
            })
        );
    }

    #[test]
    fn an_expired_local_lock_can_be_taken_and_fences_its_old_holder() {
        let locks = LocalLocks::default();
        let a = locks
            .try_lock("job/x", "a", Duration::from_millis(0))
            .unwrap()
            .unwrap();
        assert!(!locks.renew(&a).unwrap());
        assert!(locks.fenced(&a, || Ok(())).unwrap().is_err());
        let b = locks
            .try_lock("job/x", "b", Duration::from_secs(60))
            .unwrap()
            .unwrap();
        assert!(b.fence > a.fence);
    }
}
