//! WatchSecrets: a stream of changes to names and prefixes the caller may read, checked
//! against the policy for every event, bounded per identity and in total, and ended (never
//! buffered without bound) when the caller reads too slowly.
//!
//! The handler runs under the SecretService skeleton (`SecretsService::serve`): the caller
//! is authenticated, the subscription is opened (filters parsed, a slot taken, the store's
//! change feed started at `after_revision`) and audited once, and only then does the stream
//! leave. A pump task moves the store's events into the stream's bounded queue
//! (`limits.watch_buffer`); when the queue is full the stream ends with ABORTED naming the
//! revision to resume from. The slot is held by the stream and released when the caller
//! goes away.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::Status;

use super::State;
use crate::config::Limits;
use crate::error::Error;
use crate::policy::Capability;
use crate::proto::watch_event::Kind;
use crate::proto::{WatchEvent, WatchSecretsRequest};
use crate::secret::{NamePrefix, SecretName};
use crate::store::{ChangeEvent, ChangeFeed, ChangeKind, FeedError};
use crate::tls::Identity;

/// The most names and prefixes one WatchSecrets request may give together.
pub const MAX_WATCH_FILTERS: usize = 16;

/// The name or prefix a subscription is audited under: its first name, else its first
/// prefix (the whole list is in the service's log).
pub(crate) fn audited(req: &WatchSecretsRequest) -> &str {
    req.names
        .first()
        .or(req.prefixes.first())
        .map_or("", String::as_str)
}

/// Opens a subscription for `identity`; the stream the caller reads.
pub(crate) async fn open(
    state: Arc<State>,
    identity: Identity,
    req: WatchSecretsRequest,
) -> Result<WatchStream, Error> {
    super::rollback::ensure_trusted(&state)?;
    let filter = Filter::parse(&req, state.limits.max_name_bytes)?;
    let slot = state.watches.take(&identity)?;
    tracing::info!(identity = %identity.as_str(), names = ?req.names, prefixes = ?req.prefixes, after = req.after_revision, "watch opened");
    let (tx, events) = mpsc::channel(state.limits.watch_buffer);
    let (end_tx, end) = oneshot::channel();
    if !filter.may_see_any(&state, &identity) {
        // Nothing here may be read by this caller: like ListSecrets, the answer needs no
        // store access and says the same whatever the store holds — a stream that stays
        // open and never carries an event.
        return Ok(WatchStream {
            events,
            end: None,
            _idle: Some(tx),
            _slot: slot,
        });
    }
    let after = req.after_revision;
    let store = state.store.clone();
    let feed = tokio::task::spawn_blocking(move || store.watch(after))
        .await
        .map_err(|e| Error::Internal(format!("the watch task failed: {e}")))?
        .map_err(|e| feed_error(e, after))?;
    let buffer = state.limits.watch_buffer;
    tokio::spawn(pump(
        state, identity, filter, feed, tx, end_tx, after, buffer,
    ));
    Ok(WatchStream {
        events,
        end: Some(end),
        _idle: None,
        _slot: slot,
    })
}

/// The names and prefixes one subscription asked for.
struct Filter {
    names: Vec<SecretName>,
    prefixes: Vec<NamePrefix>,
}

impl Filter {
    fn parse(req: &WatchSecretsRequest, max_name: usize) -> Result<Self, Error> {
        let n = req.names.len() + req.prefixes.len();
        if n == 0 || n > MAX_WATCH_FILTERS {
            return Err(Error::InvalidArgument(format!(
                "give 1 to {MAX_WATCH_FILTERS} names and prefixes together (\"\" as a prefix watches everything you may read); got {n}"
            )));
        }
        let names = req
            .names
            .iter()
            .map(|n| SecretName::parse(n, max_name))
            .collect::<Result<_, _>>()
            .map_err(|e| Error::InvalidArgument(format!("name: {e}")))?;
        let prefixes = req
            .prefixes
            .iter()
            .map(|p| NamePrefix::parse(p, max_name))
            .collect::<Result<_, _>>()
            .map_err(|e| Error::InvalidArgument(format!("prefix: {e}")))?;
        Ok(Self { names, prefixes })
    }

    fn matches(&self, name: &SecretName) -> bool {
        self.names.contains(name) || self.prefixes.iter().any(|p| p.matches(name.as_str()))
    }

    /// Whether any name asked for may be read by `identity`, from the rules alone.
    fn may_see_any(&self, state: &State, identity: &Identity) -> bool {
        let policy = state.policy();
        self.names
            .iter()
            .any(|n| policy.allows(identity, Capability::Read, n))
            || self
                .prefixes
                .iter()
                .any(|p| !policy.scope(identity, Capability::Read, p).is_empty())
    }
}

/// Moves the store's events that pass the filter and the policy (as it stands at each
/// event) into the caller's queue; ends the stream with a status when the feed fails or the
/// queue is full, and quietly when the caller goes away.
#[allow(clippy::too_many_arguments)]
async fn pump(
    state: Arc<State>,
    identity: Identity,
    filter: Filter,
    mut feed: ChangeFeed,
    tx: mpsc::Sender<WatchEvent>,
    end: oneshot::Sender<Status>,
    after: u64,
    buffer: usize,
) {
    // The revision of the last event queued: where the caller resumes.
    let mut last = after;
    let status = loop {
        let item = tokio::select! {
            item = feed.next() => item,
            () = tx.closed() => return,
        };
        let event = match item {
            Some(Ok(e)) => e,
            Some(Err(e)) => break Status::from(feed_error(e, last)),
            None => {
                break Status::unavailable(format!(
                    "the service is closing this watch; resume from revision {last}"
                ));
            }
        };
        if !filter.matches(&event.name)
            || !state
                .policy()
                .allows(&identity, Capability::Read, &event.name)
        {
            continue;
        }
        let revision = event.revision;
        match tx.try_send(to_proto(event)) {
            Ok(()) => last = revision,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::info!(identity = %identity.as_str(), resume = last, "a watcher read too slowly; its stream ends");
                break Status::aborted(format!(
                    "too far behind: this watch read too slowly and its {buffer} queued events filled up; resume from revision {last}"
                ));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    };
    let _ = end.send(status);
}

/// A feed's refusal as the caller sees it.
fn feed_error(e: FeedError, after: u64) -> Error {
    match e {
        FeedError::Compacted { oldest, .. } => Error::OutOfRange(format!(
            "too far behind: the events after revision {after} are no longer kept (the oldest revision still available is {oldest}); watch again with after_revision 0, then list the secrets again"
        )),
        FeedError::Ahead { current, .. } => Error::OutOfRange(format!(
            "revision {after} is ahead of this store (its latest is {current}); watch again with after_revision 0, then list the secrets again"
        )),
        FeedError::Store(e) => {
            tracing::warn!(error = %e, resume = after, "a watch's change feed failed");
            Error::Store(e)
        }
    }
}

fn to_proto(e: ChangeEvent) -> WatchEvent {
    let kind = match e.kind {
        ChangeKind::Created => Kind::Created,
        ChangeKind::Updated => Kind::Updated,
        ChangeKind::Deleted => Kind::Deleted,
        ChangeKind::ExpiringSoon => Kind::ExpiringSoon,
    };
    WatchEvent {
        name: e.name.as_str().to_owned(),
        version: e.version,
        kind: kind as i32,
        revision: e.revision,
    }
}

/// The stream a caller reads: the queued events, then the status that ended them, if any.
pub struct WatchStream {
    events: mpsc::Receiver<WatchEvent>,
    end: Option<oneshot::Receiver<Status>>,
    /// Keeps a stream with nothing to see open.
    _idle: Option<mpsc::Sender<WatchEvent>>,
    _slot: Slot,
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.events.poll_recv(cx) {
            Poll::Ready(Some(e)) => return Poll::Ready(Some(Ok(e))),
            Poll::Ready(None) => {}
            Poll::Pending => return Poll::Pending,
        }
        let Some(end) = this.end.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(end).poll(cx) {
            Poll::Ready(r) => {
                this.end = None;
                Poll::Ready(r.ok().map(Err))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Open watches, in total and per identity, against `limits.max_watches` and
/// `limits.max_watches_per_identity`.
pub(crate) struct Slots {
    max_total: usize,
    max_per_identity: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_identity: HashMap<String, usize>,
}

impl Slots {
    pub(crate) fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            max_total: limits.max_watches,
            max_per_identity: limits.max_watches_per_identity,
            held: Mutex::new(Held::default()),
        })
    }

    /// A slot for `identity`, or RESOURCE_EXHAUSTED naming the cap reached.
    fn take(self: &Arc<Self>, identity: &Identity) -> Result<Slot, Error> {
        let mut held = self
            .held
            .lock()
            .map_err(|_| Error::Internal("the watch slots' lock is poisoned".into()))?;
        if held.total >= self.max_total {
            return Err(Error::ResourceExhausted(format!(
                "the service holds its most open watches (limits.max_watches = {}); retry later",
                self.max_total
            )));
        }
        let mine = held
            .by_identity
            .entry(identity.as_str().to_owned())
            .or_default();
        if *mine >= self.max_per_identity {
            return Err(Error::ResourceExhausted(format!(
                "this identity holds its most open watches (limits.max_watches_per_identity = {}); close one first",
                self.max_per_identity
            )));
        }
        *mine += 1;
        held.total += 1;
        Ok(Slot {
            slots: self.clone(),
            identity: identity.as_str().to_owned(),
        })
    }

    /// Open watches in total.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.held.lock().map_or(0, |h| h.total)
    }
}

/// One open watch's share of the caps; given back on drop.
struct Slot {
    slots: Arc<Slots>,
    identity: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut held) = self.slots.held.lock() {
            held.total = held.total.saturating_sub(1);
            if let Some(n) = held.by_identity.get_mut(&self.identity) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    held.by_identity.remove(&self.identity);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        Identity::new(s)
    }

    #[test]
    fn slots_cap_per_identity_and_in_total_and_come_back_on_drop() {
        let limits = Limits {
            max_watches: 3,
            max_watches_per_identity: 2,
            ..Limits::default()
        };
        let slots = Slots::new(&limits);
        let a1 = slots.take(&id("a")).unwrap();
        let _a2 = slots.take(&id("a")).unwrap();
        let e = slots.take(&id("a")).err().unwrap();
        assert!(e.to_string().contains("max_watches_per_identity"), "{e}");
        let _b1 = slots.take(&id("b")).unwrap();
        let e = slots.take(&id("c")).err().unwrap();
        assert!(e.to_string().contains("limits.max_watches ="), "{e}");
        drop(a1);
        assert_eq!(slots.open(), 2);
        slots.take(&id("c")).unwrap();
    }

    #[tokio::test]
    async fn a_full_queue_ends_the_stream_after_its_events_with_the_resume_revision() {
        let limits = Limits {
            max_watches: 1,
            max_watches_per_identity: 1,
            ..Limits::default()
        };
        let slots = Slots::new(&limits);
        let (tx, events) = mpsc::channel(2);
        let (end_tx, end) = oneshot::channel();
        let mut stream = WatchStream {
            events,
            end: Some(end),
            _idle: None,
            _slot: slots.take(&id("a")).unwrap(),
        };
        for r in [5, 7] {
            tx.try_send(WatchEvent {
                revision: r,
                ..Default::default()
            })
            .unwrap();
        }
        assert!(tx.try_send(WatchEvent::default()).is_err(), "bounded");
        end_tx
            .send(Status::aborted("resume from revision 7"))
            .unwrap();
        drop(tx);
        use tokio_stream::StreamExt;
        assert_eq!(stream.next().await.unwrap().unwrap().revision, 5);
        assert_eq!(stream.next().await.unwrap().unwrap().revision, 7);
        let s = stream.next().await.unwrap().unwrap_err();
        assert_eq!(s.code(), tonic::Code::Aborted);
        assert!(stream.next().await.is_none());
        drop(stream);
        assert_eq!(slots.open(), 0);
    }
}
