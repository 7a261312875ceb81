//! WatchSecrets in tests: requests, events as text, and awaiting events on a stream.

use std::time::Duration;

use strongroom::proto::WatchEvent;
use strongroom::proto::secret_service_client::SecretServiceClient;
use tonic::transport::Channel;

/// A WatchSecrets request for `prefixes`, after `after` (0: from now).
pub fn watch(prefixes: &[&str], after: u64) -> strongroom::proto::WatchSecretsRequest {
    strongroom::proto::WatchSecretsRequest {
        names: Vec::new(),
        prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
        after_revision: after,
    }
}

/// An event as `(name, version, kind)`, kind as `created`, `updated`, `deleted` or
/// `expiring-soon`.
pub fn event_text(e: &strongroom::proto::WatchEvent) -> (String, u64, &'static str) {
    use strongroom::proto::watch_event::Kind;
    let kind = match Kind::try_from(e.kind) {
        Ok(Kind::Created) => "created",
        Ok(Kind::Updated) => "updated",
        Ok(Kind::Deleted) => "deleted",
        Ok(Kind::ExpiringSoon) => "expiring-soon",
        _ => "unknown",
    };
    (e.name.clone(), e.version, kind)
}

/// The next `n` events of a watch stream (each within 20 s), checking that revisions
/// increase.
pub async fn next_events(
    stream: &mut tonic::Streaming<strongroom::proto::WatchEvent>,
    n: usize,
) -> Vec<strongroom::proto::WatchEvent> {
    let mut out: Vec<strongroom::proto::WatchEvent> = Vec::with_capacity(n);
    for _ in 0..n {
        let e = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .unwrap_or_else(|_| panic!("no event within 20 s after {out:?}"))
            .unwrap_or_else(|s| panic!("the watch ended after {out:?}: {s:?}"))
            .unwrap_or_else(|| panic!("the watch ended without a status after {out:?}"));
        if let Some(prev) = out.last() {
            assert!(e.revision > prev.revision, "{prev:?} then {e:?}");
        }
        out.push(e);
    }
    out
}

/// Opens a watch of `prefixes` after `after` (0: from now) as `client`'s caller.
pub async fn open_watch(
    client: &mut SecretServiceClient<Channel>,
    prefixes: &[&str],
    after: u64,
) -> tonic::Streaming<WatchEvent> {
    client
        .watch_secrets(watch(prefixes, after))
        .await
        .unwrap()
        .into_inner()
}

/// The next `n` events of a watch stream as [`event_text`] shows them ([`next_events`]).
pub async fn next_event_texts(
    stream: &mut tonic::Streaming<WatchEvent>,
    n: usize,
) -> Vec<(String, u64, &'static str)> {
    next_events(stream, n)
        .await
        .iter()
        .map(event_text)
        .collect()
}
