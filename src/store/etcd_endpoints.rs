//! The etcd members one store talks to: one connection per member, each member's health, and
//! a channel for etcd-client that sends every call to a member that answers.
//!
//! Why not etcd-client's own channel: it balances over all endpoints with tower's
//! power-of-two-choices, over lazily reconnecting connections. A member that is down fails
//! its reconnect, and the lazy connection then reports itself *ready* and hands the connect
//! error to the next call it gets, so the balancer keeps giving it calls: about one call in
//! three answered UNAVAILABLE (`tcp connect error … Connection refused`) while two members
//! were up. A paused member (SIGSTOP) keeps its HTTP/2 connection until the keep-alive gives
//! up, and the calls sent over it wait for their deadline.
//!
//! Here each call goes to one member, in turn among the members that are up:
//! - a call that fails before it was sent (the connection, TCP or TLS, could not be made:
//!   tonic's [`ConnectError`]) never reached etcd, so it is sent again to the next member,
//!   even a transaction; the member is marked down;
//! - a call that fails after it was sent (the connection broke under it, no answer) may have
//!   been applied: its error goes back to the caller as before (the store's guarded
//!   transactions and the service's read-back resolve it), and the member is marked down;
//! - a member with a call unanswered for longer than [`Members::stall_after`] (paused,
//!   overloaded) gets no new calls while it lasts, and one dropped unanswered after that
//!   long (the caller's deadline passed) is marked down;
//! - a member that answers UNAVAILABLE itself (no leader: the store asks for one) is marked
//!   down; the call's answer goes back as it is.
//!
//! A member marked down gets calls again once the probe ([`Members::spawn_probe`], a
//! count-only read on each member every half second) finds it answering; until then it is
//! tried only after every member that is up. The caller's deadline bounds all the attempts
//! of a call (the store wraps the whole call in it).
//!
//! Calls that stream their requests (watches, lease keep-alives) cannot be sent twice from
//! here (their body is consumed by the first attempt): they go to a member that is up, and the
//! caller opens them again (the store's watch resumes on another member from its last
//! revision).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions};
use http_body_util::{BodyExt, Full};
use tonic::ConnectError;
use tonic::codegen::http;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tower::{BoxError, ServiceExt};

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;

/// How often the probe asks each member.
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(500);

/// gRPC methods whose requests are a stream (bidirectional): never buffered, never re-sent.
const STREAMING_REQUESTS: [&str; 2] = [
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Lease/LeaseKeepAlive",
];

/// One member: its URL, its connection (dialled when first used, again after it broke) and
/// its health.
struct Member {
    url: String,
    channel: Channel,
    health: Mutex<Health>,
}

/// What this process knows of a member.
#[derive(Default)]
struct Health {
    /// Marked down (a failed connect, a broken call, a stall): calls go to the others until
    /// the probe finds it answering.
    down: bool,
    /// Whether the member's last probe got an answer ([`Members::any_answers`]).
    probe_answered: bool,
    /// Calls (and probes) sent and not answered yet: when each was sent.
    waiting: HashMap<u64, Instant>,
    next_id: u64,
}

impl Health {
    fn stalled(&self, now: Instant, stall_after: Duration) -> bool {
        self.waiting
            .values()
            .any(|&sent| now.saturating_duration_since(sent) >= stall_after)
    }
}

/// The members of one store's etcd cluster; cheap to clone.
#[derive(Clone)]
pub(super) struct Members {
    inner: Arc<Inner>,
}

struct Inner {
    members: Vec<Member>,
    /// Where the next call starts among the members that are up.
    turn: AtomicUsize,
    /// How long a call may wait for its answer before its member gets no new calls.
    stall_after: Duration,
}

impl Members {
    /// One connection per endpoint, none dialled yet. `tls` for `https://` endpoints; TCP
    /// connects give up after `timeout`; HTTP/2 pings every 2 s find a connection that went
    /// silent. Must run within a Tokio runtime (each connection's task starts there).
    pub(super) fn new(
        endpoints: &[String],
        tls: Option<ClientTlsConfig>,
        timeout: Duration,
    ) -> Result<Self, String> {
        if endpoints.is_empty() {
            return Err("no etcd endpoints".into());
        }
        let mut members = Vec::with_capacity(endpoints.len());
        for url in endpoints {
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| format!("bad etcd endpoint {url}: {e}"))?
                .connect_timeout(timeout)
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(timeout)
                .keep_alive_while_idle(true)
                .tcp_nodelay(true);
            if url.starts_with("https://") {
                let tls = tls
                    .clone()
                    .ok_or_else(|| format!("{url}: https needs the TLS settings"))?;
                endpoint = endpoint
                    .tls_config(tls)
                    .map_err(|e| format!("etcd endpoint {url}: {e}"))?;
            }
            members.push(Member {
                url: url.clone(),
                channel: endpoint.connect_lazy(),
                health: Mutex::new(Health {
                    probe_answered: true,
                    ..Health::default()
                }),
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                members,
                turn: AtomicUsize::new(0),
                stall_after: (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
            }),
        })
    }

    /// The channel etcd-client's clients send their calls through.
    pub(super) fn channel(&self) -> etcd_client::Channel {
        etcd_client::Channel::Custom(tower::util::BoxCloneSyncService::new(Failover {
            members: self.clone(),
        }))
    }

    /// Whether some member is up (not marked down, not stalled).
    pub(super) fn any_up(&self) -> bool {
        let now = Instant::now();
        (0..self.inner.members.len()).any(|i| self.usable(i, now))
    }

    /// Whether some member answered its last probe.
    pub(super) fn any_answers(&self) -> bool {
        (0..self.inner.members.len()).any(|i| self.health(i).probe_answered)
    }

    fn health(&self, i: usize) -> MutexGuard<'_, Health> {
        // A panic while the lock was held left plain flags: still meaningful.
        self.inner.members[i]
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn usable(&self, i: usize, now: Instant) -> bool {
        let h = self.health(i);
        !h.down && !h.stalled(now, self.inner.stall_after)
    }

    /// The members to try for one call, in order: those up, in turn, then the others (a
    /// member marked down may be back before the probe says so; trying it last costs a
    /// refused connect).
    fn order(&self) -> Vec<usize> {
        let n = self.inner.members.len();
        let start = self.inner.turn.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let (mut up, down): (Vec<usize>, Vec<usize>) = (0..n)
            .map(|k| (start + k) % n)
            .partition(|&i| self.usable(i, now));
        up.extend(down);
        up
    }

    /// Marks member `i` down (logged once, when it goes down).
    fn mark_down(&self, i: usize, why: &dyn std::fmt::Display) {
        let was = std::mem::replace(&mut self.health(i).down, true);
        if !was {
            tracing::warn!(
                member = %self.inner.members[i].url,
                error = %why,
                "etcd member is down; calls go to the other members"
            );
        }
    }

    /// Records a probe's outcome on member `i`: an answer brings a member marked down back.
    fn probed(&self, i: usize, answered: bool, why: &dyn std::fmt::Display) {
        if !answered {
            self.health(i).probe_answered = false;
            self.mark_down(i, why);
            return;
        }
        let was_down = {
            let mut h = self.health(i);
            h.probe_answered = true;
            std::mem::replace(&mut h.down, false)
        };
        if was_down {
            tracing::info!(member = %self.inner.members[i].url, "etcd member answers again");
        }
    }

    /// Notes a call (or probe) sent to member `i`; the guard notes its end.
    fn begin(&self, i: usize) -> Waiting<'_> {
        let mut h = self.health(i);
        let id = h.next_id;
        h.next_id += 1;
        h.waiting.insert(id, Instant::now());
        Waiting {
            members: self,
            member: i,
            id,
            done: false,
        }
    }

    /// Sends `request` to member `i`, keeping its health current.
    async fn attempt(&self, i: usize, request: Request) -> Result<Response, BoxError> {
        let mut waiting = self.begin(i);
        let result = self.inner.members[i]
            .channel
            .clone()
            .oneshot(request)
            .await
            .map_err(BoxError::from);
        waiting.done = true;
        match &result {
            Ok(response) if answers_unavailable(response) => {
                self.mark_down(i, &"it answers UNAVAILABLE (no leader?)");
            }
            Ok(_) => {}
            Err(e) => self.mark_down(i, e),
        }
        result
    }

    /// Sends one call: to the members in [`order`](Self::order), moving on only while the
    /// attempts fail before sending.
    async fn send(&self, request: Request) -> Result<Response, BoxError> {
        let order = self.order();
        if STREAMING_REQUESTS.contains(&request.uri().path()) {
            return self.attempt(order[0], request).await;
        }
        let (parts, body) = request.into_parts();
        // A unary request's body is one message: kept, so that it can be sent again.
        let body = body.collect().await?.to_bytes();
        let mut last = None;
        for i in order {
            let request = Request::from_parts(
                parts.clone(),
                tonic::body::Body::new(Full::new(body.clone())),
            );
            match self.attempt(i, request).await {
                Err(e) if not_sent(&*e) => {
                    tracing::debug!(member = %self.inner.members[i].url, error = %e, "not sent; trying the next etcd member");
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| "no etcd member to send to".into()))
    }

    /// Probes every member every [`PROBE_EVERY`] with a count-only linearizable read of
    /// `key` (with `options`, which ask for a leader), each within `timeout`: an answer
    /// brings a member back, none marks it down. `available` is whether some member
    /// answered; `revision` takes the highest revision seen.
    pub(super) fn spawn_probe(
        &self,
        handle: &tokio::runtime::Handle,
        options: ConnectOptions,
        key: Vec<u8>,
        timeout: Duration,
        available: Arc<AtomicBool>,
        revision: Arc<AtomicI64>,
    ) {
        for i in 0..self.inner.members.len() {
            let members = self.clone();
            let options = options.clone();
            let key = key.clone();
            let available = available.clone();
            let revision = revision.clone();
            handle.spawn(async move {
                let channel = etcd_client::Channel::Tonic(members.inner.members[i].channel.clone());
                let kv = match Client::from_channel(channel, Some(options)).await {
                    Ok(c) => c.kv_client(),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the etcd member probe");
                        return;
                    }
                };
                let mut tick = tokio::time::interval(PROBE_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let mut kv = kv.clone();
                    let options = GetOptions::new().with_count_only();
                    let mut waiting = members.begin(i);
                    let answer =
                        tokio::time::timeout(timeout, kv.get(key.clone(), Some(options))).await;
                    waiting.done = true;
                    drop(waiting);
                    match answer {
                        Ok(Ok(resp)) => {
                            if let Some(h) = resp.header() {
                                revision.fetch_max(h.revision(), Ordering::Relaxed);
                            }
                            members.probed(i, true, &"");
                        }
                        Ok(Err(e)) => members.probed(i, false, &e),
                        Err(_) => members.probed(
                            i,
                            false,
                            &format!("no answer within {} ms", timeout.as_millis()),
                        ),
                    }
                    let up = members.any_answers();
                    if available.swap(up, Ordering::Relaxed) != up {
                        if up {
                            tracing::info!("etcd is reachable again");
                        } else {
                            tracing::warn!("etcd is unreachable: no member answers");
                        }
                    }
                }
            });
        }
    }
}

/// A call sent to a member and not answered yet. Dropped unanswered after the member's
/// stall time (the caller gave up), it marks the member down.
struct Waiting<'a> {
    members: &'a Members,
    member: usize,
    id: u64,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let sent = self.members.health(self.member).waiting.remove(&self.id);
        if !self.done && sent.is_some_and(|s| s.elapsed() >= self.members.inner.stall_after) {
            self.members
                .mark_down(self.member, &"a call went unanswered");
        }
    }
}

/// Whether a call's error happened before anything was sent: the connection could not be
/// made.
pub(super) fn not_sent(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<ConnectError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Whether a response is gRPC's UNAVAILABLE without a body (etcd without a leader).
fn answers_unavailable(response: &Response) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"14")
}

/// The tower service behind [`Members::channel`].
#[derive(Clone)]
struct Failover {
    members: Members,
}

impl tower::Service<Request> for Failover {
    type Response = Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each attempt waits for its member's connection to take it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let members = self.members.clone();
        Box::pin(async move { members.send(request).await })
    }
}

#[cfg(test)]
mod tests {
    //! Members that are real HTTP/2 servers on loopback (plain text, so no certificates):
    //! one that answers and counts what it got, one that takes a call and then drops its
    //! connection (a member killed under the call), one that never answers (a paused one),
    //! and a port nothing listens on (a member that is down).

    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tonic::codegen::Bytes;

    use super::*;

    #[derive(Clone, Copy)]
    enum Behaviour {
        Answer,
        DropConnection,
        NeverAnswer,
    }

    /// A member on 127.0.0.1 behaving as `how`; its URL and how many calls reached it.
    async fn member(how: Behaviour) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let got = Arc::new(AtomicUsize::new(0));
        let count = got.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let count = count.clone();
                let broken = Arc::new(tokio::sync::Notify::new());
                let service = {
                    let broken = broken.clone();
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let count = count.clone();
                        let broken = broken.clone();
                        async move {
                            // The whole request arrived: it was sent.
                            let _ = req.into_body().collect().await;
                            count.fetch_add(1, Ordering::SeqCst);
                            match how {
                                Behaviour::Answer => {}
                                Behaviour::DropConnection => {
                                    broken.notify_one();
                                    std::future::pending::<()>().await;
                                }
                                Behaviour::NeverAnswer => std::future::pending::<()>().await,
                            }
                            let response = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .header("grpc-status", "0")
                                .body(Full::new(Bytes::new()))
                                .unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    })
                };
                tokio::spawn(async move {
                    let http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    let connection = http.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        // Dropping the connection closes its socket under the call.
                        () = broken.notified() => {}
                    }
                });
            }
        });
        (url, got)
    }

    /// A URL nothing listens on: connects are refused.
    fn refused() -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("http://127.0.0.1:{port}")
    }

    fn unary() -> Request {
        http::Request::builder()
            .method("POST")
            .uri("/etcdserverpb.KV/Txn")
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::new(Full::new(Bytes::from_static(
                b"\0\0\0\0\x02hi",
            ))))
            .unwrap()
    }

    fn members(urls: &[String]) -> Members {
        Members::new(urls, None, Duration::from_secs(2)).unwrap()
    }

    #[tokio::test]
    async fn a_call_refused_at_connect_is_sent_to_the_next_member() {
        let (live, got) = member(Behaviour::Answer).await;
        let m = members(&[refused(), live]);
        // The first call starts at the member that is down.
        let response = m
            .send(unary())
            .await
            .expect("sent again to the live member");
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(got.load(Ordering::SeqCst), 1);
        assert!(m.health(0).down, "the member that refused is marked down");
        // Later calls go to the live member first, however the turn falls.
        for _ in 0..4 {
            m.send(unary()).await.unwrap();
        }
        assert_eq!(got.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_call_that_broke_after_it_was_sent_is_not_sent_again() {
        let (breaking, got_there) = member(Behaviour::DropConnection).await;
        let (live, got_live) = member(Behaviour::Answer).await;
        let m = members(&[breaking, live]);
        let e = m
            .send(unary())
            .await
            .expect_err("the connection broke under the call");
        assert!(
            !not_sent(&*e),
            "a call that reached its member counts as sent: {e}"
        );
        assert_eq!(got_there.load(Ordering::SeqCst), 1);
        assert_eq!(
            got_live.load(Ordering::SeqCst),
            0,
            "a call that may have been applied is never sent twice"
        );
        assert!(m.health(0).down, "the member is marked down");
        // The next call goes to the live member.
        m.send(unary()).await.unwrap();
        assert_eq!(got_live.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_member_with_a_stalled_call_gets_no_new_calls() {
        let (paused, got_paused) = member(Behaviour::NeverAnswer).await;
        let (live, got_live) = member(Behaviour::Answer).await;
        let m = members(&[paused, live]);
        let stuck = {
            let m = m.clone();
            tokio::spawn(async move { m.send(unary()).await })
        };
        // Until the call has waited past the stall time.
        let deadline = Instant::now() + Duration::from_secs(10);
        while m.usable(0, Instant::now()) {
            assert!(
                Instant::now() < deadline,
                "the stalled call was not noticed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(got_paused.load(Ordering::SeqCst), 1);
        for _ in 0..3 {
            m.send(unary()).await.unwrap();
        }
        assert_eq!(
            got_live.load(Ordering::SeqCst),
            3,
            "every new call went to the live member"
        );
        assert_eq!(got_paused.load(Ordering::SeqCst), 1);
        // The caller gives up (its deadline): the member is marked down.
        stuck.abort();
        let _ = stuck.await;
        assert!(m.health(0).down);
        assert!(m.any_up());
    }

    #[test]
    fn only_a_connect_error_counts_as_not_sent() {
        let connect = ConnectError("connection refused".into());
        assert!(not_sent(&connect));
        let status = tonic::Status::unavailable("etcdserver: no leader");
        assert!(!not_sent(&status));
    }
}
