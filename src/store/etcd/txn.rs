//! Writes: every change is one etcd transaction that also moves the frame (epoch and
//! commitment), with compare-and-set on the keys it changes; refusals are retried against
//! the frame as it is now.

use std::collections::HashMap;
use std::time::Instant;

use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse};

use crate::store::commitment::{STORE_ID, frame_value, is_frame_key, parse_frame};
use crate::store::{Commitment, FrameStatus, Head, StoreError};

use super::EtcdStore;
use super::keys::{corrupt, decode_epoch, encode_head};

/// How many times a write retries when other writers keep moving the epoch.
pub(super) const EPOCH_RETRIES: usize = 64;

/// The frame (identity, epoch, commitment) as read at one revision.
#[derive(Clone)]
pub(super) struct Frame {
    pub(super) store_id: String,
    pub(super) epoch: u64,
    pub(super) commitment: Commitment,
    pub(super) status: FrameStatus,
    /// Mod revisions of the epoch and state keys (0: absent): a write applies only while
    /// both are as read, so the commitment it moves is the one it read.
    pub(super) revs: (i64, i64),
}

/// A key's value and mod revision as last seen.
#[derive(Clone)]
pub(super) struct Seen {
    pub(super) value: Vec<u8>,
    pub(super) revision: i64,
}

impl From<&KeyValue> for Seen {
    fn from(kv: &KeyValue) -> Self {
        Self {
            value: kv.value().to_vec(),
            revision: kv.mod_revision(),
        }
    }
}

/// What this process's writers share.
#[derive(Default)]
pub(super) struct Writer {
    /// The frame as this process last saw it; `None` after an unknown outcome.
    pub(super) frame: Option<Frame>,
    /// Wrap counters as this process last wrote them, so counting costs one round trip.
    pub(super) wraps: HashMap<Vec<u8>, Seen>,
}

/// One committed key's change: its value before (which the write's compares guarantee) and
/// after (`None`: absent).
pub(super) struct Change {
    pub(super) key: Vec<u8>,
    pub(super) old: Option<Vec<u8>>,
    pub(super) new: Option<Vec<u8>>,
}

/// One write attempt's outcome.
pub(super) enum Attempt {
    /// Applied; the responses of the caller's operations.
    Applied(Vec<TxnOpResponse>),
    /// A compare failed; the keys the caller asked to see, as they are now (and the frame as
    /// it is now in [`Writer::frame`]).
    Refused(Vec<Option<KeyValue>>),
}

/// A key replaced by [`EtcdStore::update`]: its value before and after, and the revision of
/// the write.
pub(super) struct Updated {
    pub(super) old: Option<Vec<u8>>,
    pub(super) new: Option<Vec<u8>>,
    pub(super) revision: i64,
}

impl EtcdStore {
    /// Gives a new store its identity: an empty one (nothing under the prefix) also commits
    /// to nothing at epoch 0, as on sled. One with records but no identity (filled by other
    /// means, or its identity removed) gets no commitment: the start check decides whether
    /// to trust it.
    pub(super) fn init_frame(&self) -> Result<(), StoreError> {
        use ring::rand::SecureRandom;
        let mut id = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| StoreError::Corrupt {
                key: STORE_ID.into(),
                reason: "the system random generator failed".into(),
            })?;
        let id = hex::encode(id);
        let [id_key, _, state_key] = self.frame_keys();
        let deadline = self.deadline();
        // A store with an identity (every start but the first) needs nothing. etcd evaluates
        // a compare over a range by reading every key of it, values too, inside its apply
        // loop: over a whole store of a million records that held every write back past
        // etcd's request timeout, and strongroomd could not start on it.
        if self.fetch(deadline, id_key.clone())?.is_some() {
            return Ok(());
        }
        let (start, end) = self.all_range();
        let empty = self
            .range_with(deadline, start.clone(), end.clone(), 1, None, true)?
            .kvs()
            .is_empty();
        let tag = self.key.frame_tag(&id, 0, &Commitment::EMPTY);
        // Created once, by whichever process gets there first: an empty range's keys all
        // have create revision 0 (compared only when the range was just seen empty, so the
        // compare reads at most what was written since).
        let txn = Txn::new()
            .when([Compare::create_revision(start, CompareOp::Equal, 0).with_range(end)])
            .and_then([
                TxnOp::put(id_key.clone(), id.clone(), None),
                TxnOp::put(state_key, frame_value(&Commitment::EMPTY, &tag), None),
            ]);
        let mut kv = self.kv.clone();
        if empty
            && self
                .call(deadline, async move { kv.txn(txn).await })?
                .succeeded()
        {
            return Ok(());
        }
        let txn = Txn::new()
            .when([Compare::create_revision(
                id_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(id_key, id, None)]);
        let mut kv = self.kv.clone();
        self.call(self.deadline(), async move { kv.txn(txn).await })?;
        Ok(())
    }

    /// Gets of the frame's keys, in [`frame_keys`](Self::frame_keys)' order.
    pub(super) fn frame_gets(&self) -> Vec<TxnOp> {
        self.frame_keys()
            .into_iter()
            .map(|k| TxnOp::get(k, None))
            .collect()
    }

    /// The frame from the answers to [`frame_gets`](Self::frame_gets) (the first three
    /// responses), and the keys the other responses got.
    pub(super) fn read_frame(
        &self,
        responses: Vec<TxnOpResponse>,
    ) -> Result<(Frame, Vec<Option<KeyValue>>), StoreError> {
        let mut kvs = responses
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(mut g) => Ok(g.take_kvs().into_iter().next()),
                _ => Err(corrupt(&self.prefix, "etcd answered the wrong operation")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if kvs.len() < 3 {
            return Err(corrupt(&self.prefix, "etcd answered too few operations"));
        }
        let rest = kvs.split_off(3);
        let mut frame = kvs.into_iter();
        let (id, epoch, state) = (
            frame.next().flatten(),
            frame.next().flatten(),
            frame.next().flatten(),
        );
        let store_id = id
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            .unwrap_or_default();
        let (epoch_value, epoch_rev) = epoch
            .as_ref()
            .map_or((0, 0), |kv| (decode_epoch(kv.value()), kv.mod_revision()));
        let (commitment, status) = parse_frame(
            &self.key,
            &store_id,
            epoch_value,
            state.as_ref().map(|kv| kv.value()),
        );
        let frame = Frame {
            store_id,
            epoch: epoch_value,
            commitment,
            status,
            revs: (epoch_rev, state.as_ref().map_or(0, |kv| kv.mod_revision())),
        };
        Ok((frame, rest))
    }

    /// The frame and `keys` at one revision, with that revision.
    pub(super) fn snapshot(
        &self,
        deadline: Instant,
        keys: &[Vec<u8>],
    ) -> Result<(Frame, Vec<Option<KeyValue>>, i64), StoreError> {
        let mut ops = self.frame_gets();
        ops.extend(keys.iter().map(|k| TxnOp::get(k.clone(), None)));
        let txn = Txn::new().and_then(ops);
        let mut kv = self.kv.clone();
        let resp = self.call(deadline, async move { kv.txn(txn).await })?;
        let revision = resp.header().map_or(0, |h| h.revision());
        self.saw(Some(revision));
        let (frame, rest) = self.read_frame(resp.op_responses())?;
        Ok((frame, rest, revision))
    }

    /// The frame as this process last saw it, or as it is now.
    pub(super) fn current_frame(&self, deadline: Instant, w: &Writer) -> Result<Frame, StoreError> {
        match &w.frame {
            Some(f) => Ok(f.clone()),
            None => Ok(self.snapshot(deadline, &[])?.0),
        }
    }

    /// One attempt at a write against `base`, the frame as read: applies `ops` if `compares`
    /// hold and the frame is unchanged, with the epoch bump and the commitment moved by
    /// `changes` in the same transaction. Refused, it returns `watch` as they are now.
    #[allow(clippy::too_many_arguments)] // the parts of one etcd transaction, used once each
    pub(super) fn attempt(
        &self,
        deadline: Instant,
        w: &mut Writer,
        base: Frame,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
        changes: &[Change],
        watch: &[Vec<u8>],
    ) -> Result<Attempt, StoreError> {
        let mut c = base.commitment;
        for ch in changes {
            let k = self.canonical(&ch.key);
            if is_frame_key(&k) {
                return Err(corrupt(
                    &ch.key,
                    "the store's frame is not written this way",
                ));
            }
            if let Some(old) = &ch.old {
                c = c.sub(&self.key.element(&k, old));
            }
            if let Some(new) = &ch.new {
                c = c.add(&self.key.element(&k, new));
            }
        }
        // Keep an unverifiable frame unverifiable: only officers re-base it.
        let valid = base.status == FrameStatus::Valid;
        self.frame_txn(deadline, w, base, c, valid, compares, ops, watch)
    }

    /// The transaction of a write: `ops` and the frame at the next epoch with commitment
    /// `c` (tagged when `tag`, else with a zero tag) if `compares` hold and the frame's keys
    /// are as in `base`. Leaves the frame as it is after the call in `w`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn frame_txn(
        &self,
        deadline: Instant,
        w: &mut Writer,
        base: Frame,
        c: Commitment,
        tag: bool,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
        watch: &[Vec<u8>],
    ) -> Result<Attempt, StoreError> {
        let epoch = base.epoch + 1;
        let tag_bytes = if tag {
            self.key.frame_tag(&base.store_id, epoch, &c)
        } else {
            [0; 32]
        };
        let [_, epoch_key, state_key] = self.frame_keys();
        let mut when = compares;
        when.push(Compare::mod_revision(
            epoch_key.clone(),
            CompareOp::Equal,
            base.revs.0,
        ));
        when.push(Compare::mod_revision(
            state_key.clone(),
            CompareOp::Equal,
            base.revs.1,
        ));
        let mut then = ops;
        let ours = then.len();
        then.push(TxnOp::put(epoch_key, epoch.to_be_bytes().to_vec(), None));
        then.push(TxnOp::put(state_key, frame_value(&c, &tag_bytes), None));
        let mut otherwise = self.frame_gets();
        otherwise.extend(watch.iter().map(|k| TxnOp::get(k.clone(), None)));
        let txn = Txn::new().when(when).and_then(then).or_else(otherwise);
        let mut kv = self.kv.clone();
        // An unknown outcome (deadline, lost connection) leaves the frame unknown too.
        w.frame = None;
        let resp: TxnResponse = self.call(deadline, async move { kv.txn(txn).await })?;
        let revision = resp.header().map(|h| h.revision());
        self.saw(revision);
        let mut responses = resp.op_responses();
        if resp.succeeded() {
            w.frame = revision.map(|r| Frame {
                epoch,
                commitment: c,
                status: if tag { FrameStatus::Valid } else { base.status },
                revs: (r, r),
                store_id: base.store_id,
            });
            responses.truncate(ours);
            return Ok(Attempt::Applied(responses));
        }
        let (now, rest) = self.read_frame(responses)?;
        w.frame = Some(now);
        Ok(Attempt::Refused(rest))
    }

    /// Replaces one committed key's value with `f(current)` (`None`: removes it) in one
    /// transaction with the frame. `seen` is the key as last seen (`None`: absent, a guess
    /// a refusal corrects).
    pub(super) fn update(
        &self,
        w: &mut Writer,
        key: &[u8],
        mut seen: Option<Seen>,
        f: impl Fn(Option<&[u8]>) -> Option<Vec<u8>>,
    ) -> Result<Updated, StoreError> {
        let deadline = self.deadline();
        for _ in 0..EPOCH_RETRIES {
            let base = self.current_frame(deadline, w)?;
            let (compare, old) = guard(key, seen.as_ref());
            let new = f(old.as_deref());
            let (op, change) = replacement(key, &old, &new);
            match self.attempt(
                deadline,
                w,
                base,
                vec![compare],
                vec![op],
                &[change],
                &[key.to_vec()],
            )? {
                Attempt::Applied(_) => {
                    let revision = w.frame.as_ref().map_or(0, |f| f.revs.0);
                    return Ok(Updated { old, new, revision });
                }
                Attempt::Refused(mut now) => seen = now.pop().flatten().as_ref().map(Seen::from),
            }
        }
        Err(busy())
    }
}

/// The operation that makes `key` hold `new` (`None`: removes it), and the change it makes
/// to the commitment, from `old`.
pub(super) fn replacement(
    key: &[u8],
    old: &Option<Vec<u8>>,
    new: &Option<Vec<u8>>,
) -> (TxnOp, Change) {
    let op = match new {
        Some(v) => TxnOp::put(key.to_vec(), v.clone(), None),
        None => TxnOp::delete(key.to_vec(), None),
    };
    let change = Change {
        key: key.to_vec(),
        old: old.clone(),
        new: new.clone(),
    };
    (op, change)
}

/// The compare that `key` is still as `seen` (absent for `None`), and its value then.
pub(super) fn guard(key: &[u8], seen: Option<&Seen>) -> (Compare, Option<Vec<u8>>) {
    match seen {
        None => (
            Compare::create_revision(key.to_vec(), CompareOp::Equal, 0),
            None,
        ),
        Some(s) => (
            Compare::mod_revision(key.to_vec(), CompareOp::Equal, s.revision),
            Some(s.value.clone()),
        ),
    }
}

/// The error when other writers keep moving the frame.
pub(super) fn busy() -> StoreError {
    StoreError::Etcd("other writers kept moving the store's epoch; retry".into())
}

/// The compare that the head of `key` is `expected` (absent for `None`).
pub(super) fn head_is(key: &[u8], expected: Option<Head>) -> Compare {
    match expected {
        None => Compare::create_revision(key.to_vec(), CompareOp::Equal, 0),
        Some(h) => Compare::value(key.to_vec(), CompareOp::Equal, encode_head(&h)),
    }
}
