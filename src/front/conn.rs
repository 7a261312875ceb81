//! One connection: the TLS handshake under its deadline (or until evicted), then HTTP/2 with
//! keepalive, stream and header caps, closed when idle or when the listener stops.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::Peer;
use super::table::Admission;
use crate::config::FrontLimits;
use crate::tls::Identity;

/// RST_STREAMs a client may cause before the connection is closed (the HTTP/2 "rapid reset"
/// attack opens and cancels streams faster than the server can notice).
const MAX_PENDING_RESETS: usize = 32;
/// Streams the server may reset for protocol errors before it closes the connection.
const MAX_LOCAL_RESETS: usize = 1024;
/// What a client may send on one stream before the server reads it (HTTP/2's own default;
/// hyper's is 1 MiB): a request refused from its first frame header costs the server at
/// most this much of the client's data, not the whole message.
const STREAM_WINDOW: u32 = 64 * 1024;
/// What a client may send on one connection, all streams together, before the server reads.
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// How long a request refused for its size waits for its answer: the stream is held, not
/// the server, so a flood of oversized requests runs at its concurrency per this delay
/// rather than as fast as the service can refuse.
const REFUSAL_DELAY: Duration = Duration::from_millis(100);

/// What a connection task needs from its listener.
pub(super) struct Context {
    pub(super) plane: &'static str,
    pub(super) tls: Arc<rustls::ServerConfig>,
    pub(super) limits: FrontLimits,
    pub(super) routes: tonic::service::Routes,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) refusals: Arc<super::LogLimit>,
}

/// Serves one accepted connection to its end.
pub(super) async fn run(ctx: Context, tcp: TcpStream, addr: SocketAddr, mut admission: Admission) {
    let Context {
        plane,
        tls,
        limits,
        routes,
        mut stop,
        refusals,
    } = ctx;
    let _open = crate::metrics::connection_open(plane);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake = tokio::select! {
        r = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)) => r,
        () = admission.evicted() => {
            tracing::debug!(plane, %addr, "handshake dropped to make room for a new connection");
            return;
        }
        () = super::stop_requested(&mut stop) => return,
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            // Refused certificates (revoked, expired, unknown CA) are what an operator looks
            // for; anyone can cause them, so they are logged at a bounded rate.
            if refusals.allow() {
                tracing::info!(plane, %addr, error = %e, "TLS handshake refused");
            }
            return;
        }
        Err(_) => {
            tracing::debug!(plane, %addr, "TLS handshake deadline passed; connection dropped");
            return;
        }
    };
    if !admission.handshake_done() {
        return;
    }
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map_or(Err("no client certificate".to_owned()), |leaf| {
            Identity::from_certificate(leaf.as_ref()).map_err(|e| e.to_string())
        });
    let peer = Peer {
        identity: Arc::new(identity),
        addr,
    };

    let activity = Arc::new(Activity::new());
    // A request's first message must begin as soon as a handshake must end.
    let first_message_wait = limits.handshake_timeout;
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(peer.clone());
            // One id per request: in its span in the process log and in its audit entry.
            let id = crate::metrics::next_request_id();
            request.extensions_mut().insert(id);
            let span = tracing::info_span!(
                "request",
                request_id = id.0,
                plane,
                rpc = request.uri().path()
            );
            let mut timer = crate::metrics::RequestTimer::start(plane, request.uri().path());
            let in_flight = activity.begin();
            let routes = routes.clone();
            tracing::Instrument::instrument(
                async move {
                    let response =
                        match super::first_message::check(request, first_message_wait).await {
                            Ok(request) => tower::ServiceExt::oneshot(routes, request).await?,
                            Err(refusal) => {
                                tokio::time::sleep(REFUSAL_DELAY).await;
                                refusal.into_http()
                            }
                        };
                    timer.headers(response.headers());
                    // The request counts as in flight until its answer's body is done, so a
                    // streaming answer is not cut by the idle timeout; it is counted in the
                    // metrics with the status of its trailers (or its headers, if it has none).
                    Ok::<_, Infallible>(response.map(move |body| {
                        body.map_frame(move |frame| {
                            let _in_flight = &in_flight;
                            if let Some(trailers) = frame.trailers_ref() {
                                timer.trailers(trailers);
                            }
                            frame
                        })
                    }))
                },
                span,
            )
        })
    };
    let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http.timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_bytes)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_RESETS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let connection = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        let check_at = activity.idle_since().unwrap_or_else(Instant::now) + limits.idle_timeout;
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(plane, %addr, error = %e, "connection ended with an error");
                }
                break;
            }
            () = super::stop_requested(&mut stop), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep_until(check_at.into()), if !closing => {
                if activity
                    .idle_since()
                    .is_some_and(|since| since.elapsed() >= limits.idle_timeout)
                {
                    tracing::debug!(plane, %addr, "idle connection closed");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
    drop(admission);
}

/// Requests in flight on a connection, and since when it has had none.
struct Activity(Mutex<(usize, Option<Instant>)>);

impl Activity {
    fn new() -> Self {
        Self(Mutex::new((0, Some(Instant::now()))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Option<Instant>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        let mut a = self.lock();
        a.0 += 1;
        a.1 = None;
        InFlight(self.clone())
    }

    /// `None` while a request is in flight.
    fn idle_since(&self) -> Option<Instant> {
        self.lock().1
    }
}

/// One request in flight; counted off when dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut a = self.0.lock();
        a.0 = a.0.saturating_sub(1);
        if a.0 == 0 {
            a.1 = Some(Instant::now());
        }
    }
}
