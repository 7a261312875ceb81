//! The change feed: one event per change to a secret's head (created, updated, deleted),
//! and one per expiry notice the `expiry-notice` job records ([`Aux::Notice`](super::Aux::Notice)),
//! each at a revision of the store, read by watchers ([`Store::watch`](super::Store::watch)).
//!
//! A feed is a bounded channel: the backend's producer waits while it is full (sled reads
//! its change log at its own pace; etcd's watch stream is held by gRPC flow control), so a
//! slow reader costs no memory beyond the channel. A feed ends after its first error.

use tokio::sync::mpsc;

use super::StoreError;
use crate::secret::SecretName;

/// Events a feed holds before its producer waits.
pub const FEED_CAPACITY: usize = 64;

/// What happened to a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The name has a live version again: its first write, or the first after a delete.
    Created,
    /// A new version of a live secret.
    Updated,
    /// Every version was destroyed.
    Deleted,
    /// The version, the name's latest, entered the expiry-notice window: the creation of
    /// its notice ([`Aux::Notice`](super::Aux::Notice)), a store write like the others, so it
    /// has a revision, is seen by every replica's watchers and is replayed on resume.
    ExpiringSoon,
}

impl ChangeKind {
    /// The kind of a head's change from `old` to `new` (heads as `(latest, deleted)`).
    pub fn of(old: Option<super::Head>, new: super::Head) -> Self {
        if new.deleted {
            ChangeKind::Deleted
        } else if old.is_none_or(|h| h.deleted) {
            ChangeKind::Created
        } else {
            ChangeKind::Updated
        }
    }

    /// The kind's byte in sled's change log.
    pub(crate) fn byte(self) -> u8 {
        match self {
            ChangeKind::Created => b'c',
            ChangeKind::Updated => b'u',
            ChangeKind::Deleted => b'd',
            ChangeKind::ExpiringSoon => b'e',
        }
    }

    /// The kind of a byte of sled's change log.
    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            b'c' => ChangeKind::Created,
            b'u' => ChangeKind::Updated,
            b'd' => ChangeKind::Deleted,
            b'e' => ChangeKind::ExpiringSoon,
            _ => return None,
        })
    }
}

/// One change, as a watcher sees it: never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    /// The store's revision of the change; strictly increasing along a feed.
    pub revision: u64,
    /// The secret.
    pub name: SecretName,
    /// The version written, or the latest version a deleted secret had.
    pub version: u64,
    /// What happened.
    pub kind: ChangeKind,
}

/// Why a feed could not start, or ended.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// Some events after the revision asked for are no longer kept (sled trimmed its change
    /// log; etcd compacted its history): the watcher must list again.
    #[error("the events after revision {after} are no longer kept (the oldest kept is {oldest})")]
    Compacted {
        /// The revision the watcher asked to resume after.
        after: u64,
        /// The oldest revision still available.
        oldest: u64,
    },
    /// The revision asked for lies beyond the store's latest: not a revision of this store.
    #[error("revision {after} is ahead of this store (its latest is {current})")]
    Ahead {
        /// The revision asked for.
        after: u64,
        /// The store's latest revision.
        current: u64,
    },
    /// The backend failed (etcd unreachable, a damaged change log).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The receiving end of a change feed.
pub struct ChangeFeed {
    rx: mpsc::Receiver<Result<ChangeEvent, FeedError>>,
}

impl ChangeFeed {
    /// A feed and the sender its producer fills.
    pub(crate) fn channel() -> (mpsc::Sender<Result<ChangeEvent, FeedError>>, Self) {
        let (tx, rx) = mpsc::channel(FEED_CAPACITY);
        (tx, Self { rx })
    }

    /// The next event, or why the feed ended; `None` once its producer stopped (the store
    /// was closed).
    pub async fn next(&mut self) -> Option<Result<ChangeEvent, FeedError>> {
        self.rx.recv().await
    }
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed").finish_non_exhaustive()
    }
}
