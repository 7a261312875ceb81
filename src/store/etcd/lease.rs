//! Locks under etcd leases (replica ids, once-only jobs), and writes fenced by them.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::store::{Fenced, Lock, LockHeld, StoreError};

use super::EtcdStore;
use super::txn::{Attempt, EPOCH_RETRIES, Seen, Updated, Writer, busy, guard, replacement};

/// Locks under etcd leases, and writes fenced by them (see [`lease`](crate::store::lease)).
impl EtcdStore {
    /// The etcd key of the lock `name`.
    pub(super) fn lock_key(&self, name: &str) -> Vec<u8> {
        let mut k = self.locks.clone();
        k.extend_from_slice(name.as_bytes());
        k
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1; etcd may raise it to its
    /// minimum) and creates the lock key under it if the key is absent, in one
    /// transaction; the key's create revision is the fence. A lease left unused is revoked.
    pub(super) fn lock_take(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Result<Lock, LockHeld>, StoreError> {
        let deadline = self.deadline();
        let key = self.lock_key(name);
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut lease = self.lease.clone();
        let granted = self.call(deadline, async move { lease.grant(secs, None).await })?;
        let id = granted.id();
        let granted_ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(1).max(1));
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                holder.as_bytes().to_vec(),
                Some(PutOptions::new().with_lease(id)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let mut kv = self.kv.clone();
        let resp = match self.call(deadline, async move { kv.txn(txn).await }) {
            Ok(r) => r,
            Err(e) => {
                // An unknown outcome: the revocation removes the key if it was made.
                self.revoke(id);
                return Err(e);
            }
        };
        let revision = resp.header().map_or(0, |h| h.revision());
        self.saw(Some(revision));
        if resp.succeeded() {
            return Ok(Ok(Lock {
                name: name.to_owned(),
                fence: revision,
                lease: id,
                ttl: granted_ttl,
            }));
        }
        self.revoke(id);
        let holder = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(mut g) => g.take_kvs().into_iter().next(),
                _ => None,
            })
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            .unwrap_or_else(|| "another process (it has just let go)".into());
        Ok(Err(LockHeld { holder }))
    }

    /// One keep-alive of the lock's lease: `false` when etcd no longer knows the lease.
    pub(super) fn lock_renew(&self, lock: &Lock) -> Result<bool, StoreError> {
        let mut lease = self.lease.clone();
        let id = lock.lease;
        self.call(self.deadline(), async move {
            match lease.keep_alive(id).await {
                Ok(_) => Ok(true),
                Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    /// Revokes the lock's lease, which removes the lock key.
    pub(super) fn lock_release(&self, lock: &Lock) -> Result<(), StoreError> {
        let mut lease = self.lease.clone();
        let id = lock.lease;
        match self.call(self.deadline(), async move { lease.revoke(id).await }) {
            Ok(_) | Err(StoreError::Etcd(_)) => Ok(()), // already gone
            Err(e) => Err(e),
        }
    }

    /// Revokes a lease, best effort (it expires by itself otherwise).
    pub(super) fn revoke(&self, id: i64) {
        let mut lease = self.lease.clone();
        if let Err(e) = self.call(self.deadline(), async move { lease.revoke(id).await }) {
            tracing::debug!(error = %e, "cannot revoke an unused lock lease; it will expire");
        }
    }

    /// [`update`](Self::update) while `lock` holds: the transaction also compares the lock
    /// key's create revision with the lock's fence, and a refusal that shows another (or no)
    /// holder is [`Fenced`], with nothing written.
    pub(super) fn update_fenced(
        &self,
        w: &mut Writer,
        lock: &Lock,
        key: &[u8],
        f: impl Fn(Option<&[u8]>) -> Option<Vec<u8>>,
    ) -> Result<Result<Updated, Fenced>, StoreError> {
        let deadline = self.deadline();
        let lock_key = self.lock_key(&lock.name);
        let mut seen: Option<Seen> = None;
        for _ in 0..EPOCH_RETRIES {
            let base = self.current_frame(deadline, w)?;
            let (compare, old) = guard(key, seen.as_ref());
            let fence = Compare::create_revision(lock_key.clone(), CompareOp::Equal, lock.fence);
            let new = f(old.as_deref());
            let (op, change) = replacement(key, &old, &new);
            match self.attempt(
                deadline,
                w,
                base,
                vec![compare, fence],
                vec![op],
                &[change],
                &[key.to_vec(), lock_key.clone()],
            )? {
                Attempt::Applied(_) => {
                    let revision = w.frame.as_ref().map_or(0, |f| f.revs.0);
                    return Ok(Ok(Updated { old, new, revision }));
                }
                Attempt::Refused(mut now) => {
                    let holder = now.pop().flatten().map_or(0, |kv| kv.create_revision());
                    if holder != lock.fence {
                        return Ok(Err(Fenced {
                            fence: lock.fence,
                            now: holder,
                        }));
                    }
                    seen = now.pop().flatten().as_ref().map(Seen::from);
                }
            }
        }
        Err(busy())
    }
}
