//! The front door: every TCP connection of a listener from accept to close, under caps and
//! deadlines that no peer, with or without a certificate, can exhaust.
//!
//! [`serve`] owns the accept loop. Each accepted connection is admitted against the
//! listener's [`Table`] (open connections in total and per source address, handshakes in
//! progress), gets a TLS handshake deadline, and is then served as HTTP/2 by hyper with
//! keepalive pings, stream and header caps and an idle timeout (`conn`); each request's first
//! message is held to its method's size limit from its frame header, before it is read
//! (`first_message`). The caller's
//! verified certificate is read once per connection and handed to every request as a
//! [`Peer`] extension. Accept errors (out of descriptors) back off instead of spinning.

mod conn;
pub mod descriptors;
mod first_message;
mod table;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use table::Table;

use crate::config::FrontLimits;
use crate::tls::{Identity, ServerTls};

/// What a request knows about the connection it came on: added to every request's
/// extensions by the front door.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The caller's identity from its verified certificate, or why there is none.
    pub identity: Arc<Result<Identity, String>>,
    /// The source address.
    pub addr: SocketAddr,
}

/// One listener: its name (for logs), socket, TLS settings and caps.
pub struct Listener {
    /// `client` or `admin`.
    pub plane: &'static str,
    /// The bound socket.
    pub socket: TcpListener,
    /// The TLS settings, reloaded when their files change.
    pub tls: Arc<ServerTls>,
    /// Caps and deadlines.
    pub limits: FrontLimits,
}

/// Serves `routes` on `listener` until `stop` turns true; then stops accepting, asks every
/// connection to finish (HTTP/2 GOAWAY: requests in flight complete) and returns once all
/// have closed. The caller bounds that wait with its grace period.
pub async fn serve(
    listener: Listener,
    routes: tonic::service::Routes,
    mut stop: watch::Receiver<bool>,
) {
    let Listener {
        plane,
        socket,
        tls,
        limits,
    } = listener;
    let table = Arc::new(Table::new(limits));
    let routes = routes.prepare();
    let mut backoff = AcceptBackoff::new(plane);
    let refusals = Arc::new(LogLimit::new(plane, 20, Duration::from_secs(10)));
    let mut connections = tokio::task::JoinSet::new();
    let conn_stop = stop.clone();
    loop {
        tokio::select! {
            biased;
            () = stop_requested(&mut stop) => break,
            accepted = async {
                table.room_for_evictions().await;
                socket.accept().await
            } => match accepted {
                Ok((tcp, addr)) => {
                    backoff.accepted();
                    let Some(admission) = table.admit(addr.ip()) else {
                        // Over the per-source cap, or every slot is an established
                        // connection: closed at once, before any TLS work.
                        drop(tcp);
                        continue;
                    };
                    // Nagle off: without it an answer of a few hundred bytes waits for the
                    // client's delayed ACK (~40 ms).
                    let _ = tcp.set_nodelay(true);
                    let ctx = conn::Context {
                        plane,
                        tls: tls.current(),
                        limits,
                        routes: routes.clone(),
                        stop: conn_stop.clone(),
                        refusals: refusals.clone(),
                    };
                    connections.spawn(conn::run(ctx, tcp, addr, admission));
                }
                Err(e) => backoff.failed(&e).await,
            },
            // Reap finished connection tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(socket);
    tracing::debug!(
        plane,
        open = connections.len(),
        "listener closed; draining connections"
    );
    while connections.join_next().await.is_some() {}
}

/// Watches the TLS files of the listeners and swaps in new settings when they change.
pub async fn reload_tls(sets: Vec<(&'static str, Arc<ServerTls>)>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The error last logged per listener, so a broken file is reported once, not per tick.
    let mut last_error: Vec<Option<String>> = vec![None; sets.len()];
    loop {
        tick.tick().await;
        for ((plane, tls), last) in sets.iter().zip(last_error.iter_mut()) {
            let tls = tls.clone();
            let result = tokio::task::spawn_blocking(move || tls.reload_if_changed()).await;
            match result {
                Ok(Ok(true)) => {
                    *last = None;
                    tracing::info!(plane, "TLS files changed: new connections use them");
                }
                Ok(Ok(false)) => *last = None,
                Ok(Err(e)) => {
                    let text = e.to_string();
                    if last.as_deref() != Some(text.as_str()) {
                        tracing::error!(plane, error = %text, "TLS files changed but do not load; the previous settings stay");
                        *last = Some(text);
                    }
                }
                Err(e) => tracing::error!(plane, error = %e, "TLS reload task failed"),
            }
        }
    }
}

/// At most `burst` log lines per `window` for events any peer can cause; what is held back
/// is counted and reported with the next line allowed.
pub(crate) struct LogLimit {
    plane: &'static str,
    burst: u32,
    window: Duration,
    state: std::sync::Mutex<(Instant, u32, u64)>,
}

impl LogLimit {
    pub(crate) fn new(plane: &'static str, burst: u32, window: Duration) -> Self {
        Self {
            plane,
            burst,
            window,
            state: std::sync::Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// Whether to log this event.
    pub(crate) fn allow(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0.elapsed() >= self.window {
            if s.2 > 0 {
                tracing::info!(
                    plane = self.plane,
                    suppressed = s.2,
                    "more TLS handshakes were refused than logged"
                );
            }
            *s = (Instant::now(), 0, 0);
        }
        if s.1 < self.burst {
            s.1 += 1;
            true
        } else {
            s.2 += 1;
            false
        }
    }
}

/// Backs off after accept errors (EMFILE, ENFILE, ENOBUFS, ...): retrying at once would spin
/// a core while the condition lasts. Logs once per interval with the count.
struct AcceptBackoff {
    plane: &'static str,
    delay: Duration,
    failures: u64,
    last_log: Option<Instant>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(10);

    fn new(plane: &'static str) -> Self {
        Self {
            plane,
            delay: Self::FIRST,
            failures: 0,
            last_log: None,
        }
    }

    fn accepted(&mut self) {
        self.delay = Self::FIRST;
    }

    async fn failed(&mut self, error: &std::io::Error) {
        use std::io::ErrorKind;
        // The peer gave up between SYN and accept: nothing is wrong with the listener.
        if matches!(
            error.kind(),
            ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
        ) {
            return;
        }
        self.failures += 1;
        if self.last_log.is_none_or(|t| t.elapsed() >= Self::LOG_EVERY) {
            tracing::warn!(
                plane = self.plane,
                error = %error,
                failures = self.failures,
                retry_in_ms = self.delay.as_millis() as u64,
                "accept failed; backing off (out of descriptors? see RLIMIT_NOFILE and [*.connections])"
            );
            self.last_log = Some(Instant::now());
            self.failures = 0;
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Self::MAX);
    }
}

/// Completes when the stop signal turns true (or its sender is gone).
pub async fn stopped(mut rx: watch::Receiver<bool>) {
    stop_requested(&mut rx).await
}

/// Completes when `rx` turns true (or its sender is gone); the guard `wait_for` returns is
/// dropped inside, so the future stays `Send`.
async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accept_errors_back_off_up_to_a_second_and_reset_on_success() {
        let mut b = AcceptBackoff::new("test");
        let emfile = std::io::Error::from_raw_os_error(24);
        for _ in 0..3 {
            b.failed(&emfile).await;
        }
        assert_eq!(b.delay, AcceptBackoff::FIRST * 8);
        b.delay = AcceptBackoff::MAX;
        b.failed(&emfile).await;
        assert_eq!(b.delay, AcceptBackoff::MAX, "never beyond the cap");
        b.accepted();
        assert_eq!(b.delay, AcceptBackoff::FIRST);
        // A peer that gave up before accept is not a listener problem: no wait, no growth.
        let aborted = std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        let started = Instant::now();
        b.failed(&aborted).await;
        assert_eq!(b.delay, AcceptBackoff::FIRST);
        assert!(started.elapsed() < AcceptBackoff::FIRST);
    }

    #[test]
    fn log_lines_any_peer_can_cause_are_limited_per_window() {
        let l = LogLimit::new("test", 3, Duration::from_secs(3600));
        let allowed = (0..10).filter(|_| l.allow()).count();
        assert_eq!(allowed, 3);
    }
}
