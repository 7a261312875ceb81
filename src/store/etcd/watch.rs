//! The change feed: WatchSecrets reads etcd's own history through a watch on the heads' and
//! expiry notices' range, opened again on another member when its member fails.

use std::future::Future;
use std::time::Duration;

use etcd_client::{EventType, KeyValue, WatchClient, WatchOptions, WatchResponse, WatchStream};

use crate::secret::SecretName;
use crate::store::{ChangeEvent, ChangeKind, FeedError, StoreError};

use super::classify;
use super::keys::decode_head;

/// The pause between attempts to open a watch while members fail.
pub(super) const WATCH_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What a watch on the heads watches, so that it can be opened again on another member.
pub(super) struct WatchTarget {
    pub(super) client: WatchClient,
    pub(super) key: Vec<u8>,
    pub(super) end: Vec<u8>,
    /// How long the watch may take to open again after its member failed.
    pub(super) timeout: Duration,
}

impl WatchTarget {
    /// Opens the watch from revision `from` (0: from now) and reads etcd's first answer to
    /// it (created, compacted or refused).
    pub(super) fn open(
        &self,
        from: i64,
    ) -> impl Future<Output = Result<(WatchStream, WatchResponse), etcd_client::Error>> + Send + 'static
    {
        let mut client = self.client.clone();
        let key = self.key.clone();
        let mut options = WatchOptions::new()
            .with_range(self.end.clone())
            .with_prev_key();
        if from > 0 {
            options = options.with_start_revision(from);
        }
        async move {
            let mut stream = client.watch(key, Some(options)).await?;
            match stream.message().await? {
                Some(first) => Ok((stream, first)),
                None => Err(etcd_client::Error::WatchError(
                    "etcd ended the watch as it opened".into(),
                )),
            }
        }
    }
}

/// Sends the events of an etcd watch on the heads, as changes, until the feed's reader goes
/// away. When the watch's member fails (the stream breaks or ends, or it lost its leader),
/// the watch opens again on another member from the revision after `last` (the last one
/// delivered), so the reader misses nothing; an error ends the feed when no member takes
/// it within the store's timeout, on compaction, or on any other error. Waits while the
/// feed is full: gRPC flow control then holds etcd's stream.
pub(super) async fn forward_watch(
    target: WatchTarget,
    mut stream: WatchStream,
    mut last: u64,
    tx: tokio::sync::mpsc::Sender<Result<ChangeEvent, FeedError>>,
) {
    let mut pending: Option<WatchResponse> = None;
    loop {
        let message = match pending.take() {
            Some(r) => Ok(Some(r)),
            None => tokio::select! {
                m = stream.message() => m,
                () = tx.closed() => return,
            },
        };
        let broke = match message {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(StoreError::Unreachable("etcd ended the watch".into())),
            Err(e) => Err(classify(e)),
        };
        let response = match broke {
            Ok(r) => r,
            Err(StoreError::Unreachable(why)) => {
                match reopen_watch(&target, last, &why, &tx).await {
                    Some((s, first)) => {
                        stream = s;
                        pending = Some(first);
                        continue;
                    }
                    None => return,
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        if response.compact_revision() > 0 {
            let oldest = u64::try_from(response.compact_revision()).unwrap_or(0);
            let _ = tx
                .send(Err(FeedError::Compacted {
                    after: last,
                    oldest,
                }))
                .await;
            return;
        }
        if response.canceled() {
            let reason = format!("etcd cancelled the watch: {}", response.cancel_reason());
            let _ = tx.send(Err(StoreError::Etcd(reason).into())).await;
            return;
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let change = if kv.key().get(prefix_len(&target) - 2) == Some(&b'e') {
                notice_change(kv, event.event_type(), event.prev_kv(), prefix_len(&target))
            } else {
                head_change(kv, event.event_type(), event.prev_kv(), prefix_len(&target))
            };
            match change {
                Ok(Some(c)) => {
                    last = c.revision;
                    if tx.send(Ok(c)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
    }
}

/// The length of the kind's prefix (`P e/` or `P h/`, the same), which an event's key
/// starts with.
pub(super) fn prefix_len(target: &WatchTarget) -> usize {
    target.key.len()
}

/// The expiring-soon event of a notice's creation; `None` for its removal or rewrite (the
/// job never rewrites one) and for a key that names no notice.
pub(super) fn notice_change(
    kv: &KeyValue,
    kind: EventType,
    prev: Option<&KeyValue>,
    prefix_len: usize,
) -> Result<Option<ChangeEvent>, StoreError> {
    if kind != EventType::Put || prev.is_some() {
        return Ok(None);
    }
    let parsed = kv
        .key()
        .get(prefix_len..)
        .and_then(|k| std::str::from_utf8(k).ok())
        .and_then(|k| crate::store::parse_notice_key(k, crate::secret::MAX_NAME_BYTES_CEILING));
    let Some((name, version)) = parsed else {
        tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "a notice's key names no version; no event");
        return Ok(None);
    };
    Ok(Some(ChangeEvent {
        revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
        name,
        version,
        kind: ChangeKind::ExpiringSoon,
    }))
}

/// Opens a watch that broke (`why`) again from the revision after `last`, on whichever
/// member takes it within the target's timeout; `None` (the feed told why) if none did or
/// the reader went away.
pub(super) async fn reopen_watch(
    target: &WatchTarget,
    last: u64,
    why: &str,
    tx: &tokio::sync::mpsc::Sender<Result<ChangeEvent, FeedError>>,
) -> Option<(WatchStream, WatchResponse)> {
    let from = i64::try_from(last).ok().and_then(|l| l.checked_add(1));
    let Some(from) = from else {
        let _ = tx
            .send(Err(StoreError::Unreachable(why.to_owned()).into()))
            .await;
        return None;
    };
    tracing::info!(from, error = %why, "the etcd watch broke; opening it again on another member");
    let deadline = tokio::time::Instant::now() + target.timeout;
    let mut failure = why.to_owned();
    loop {
        if tx.is_closed() {
            return None;
        }
        match tokio::time::timeout_at(deadline, target.open(from)).await {
            Ok(Ok(opened)) => return Some(opened),
            Ok(Err(e)) => match classify(e) {
                StoreError::Unreachable(w) => failure = w,
                other => {
                    let _ = tx.send(Err(other.into())).await;
                    return None;
                }
            },
            Err(_) => {}
        }
        if tokio::time::Instant::now() + WATCH_RETRY_PAUSE >= deadline {
            let _ = tx
                .send(Err(StoreError::Unreachable(format!(
                    "the watch broke and no etcd member took it again: {failure}"
                ))
                .into()))
                .await;
            return None;
        }
        tokio::time::sleep(WATCH_RETRY_PAUSE).await;
    }
}

/// The change a watch event on a head describes; `None` for a key that names no secret.
pub(super) fn head_change(
    kv: &KeyValue,
    kind: EventType,
    prev: Option<&KeyValue>,
    prefix_len: usize,
) -> Result<Option<ChangeEvent>, StoreError> {
    let Some(text) = kv
        .key()
        .get(prefix_len..)
        .and_then(|k| std::str::from_utf8(k).ok())
    else {
        return Ok(None);
    };
    let Ok(name) = SecretName::parse(text, crate::secret::MAX_NAME_BYTES_CEILING) else {
        tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "a head's key names no secret; no event");
        return Ok(None);
    };
    let old = prev.map(|p| decode_head(p.key(), p.value())).transpose()?;
    let (kind, version) = match kind {
        EventType::Put => {
            let new = decode_head(kv.key(), kv.value())?;
            (ChangeKind::of(old, new), new.latest)
        }
        // The service never removes a head; someone did: the name is gone.
        EventType::Delete => (ChangeKind::Deleted, old.map_or(0, |h| h.latest)),
    };
    Ok(Some(ChangeEvent {
        revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
        name,
        version,
        kind,
    }))
}
