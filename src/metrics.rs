//! Prometheus metrics on their own listener, and the request id every request carries.
//!
//! One registry for the process ([`prometheus_client`]); the rest of the service reports
//! through the small functions below (`request_done`, `hsm_call`, `audit_batch`, …), so
//! each hook is one line where it happens. [`serve`] answers `GET /metrics` with the text
//! exposition format on the `[metrics] listen` address (loopback by default). Values that
//! are read rather than counted (the HSM queue, the token's state, the store's size) are
//! read when a scrape arrives, through probes registered with [`on_scrape`].
//!
//! Series (all prefixed `strongroom_`):
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `requests_total` | counter | `plane`, `rpc`, `code` |
//! | `request_duration_seconds` | histogram | `plane`, `rpc` |
//! | `open_connections` | gauge | `plane` |
//! | `hsm_calls_total` | counter | `operation` |
//! | `hsm_errors_total` | counter | `operation`, `class` |
//! | `hsm_call_duration_seconds` | histogram | `operation` |
//! | `hsm_queue_depth` | gauge | |
//! | `hsm_token_ready` | gauge (1 ready, 0 recovering) | |
//! | `audit_batch_entries` | histogram | |
//! | `audit_fdatasync_seconds` | histogram | |
//! | `audit_lag_seconds` | histogram | |
//! | `store_size_bytes` | gauge | |
//! | `store_secrets` | gauge | |

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use hyper::http;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The address metrics listen on when `[metrics] listen` is not set.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// A request's id: one counter for the process, both planes; the same number is in the
/// request's span in the process log and in its audit entry (`request_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId(pub u64);

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// The next request id.
pub fn next_request_id() -> RequestId {
    RequestId(NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed))
}

/// The id the front door gave this request, if it came through it.
pub fn request_id(extensions: &http::Extensions) -> Option<u64> {
    extensions.get::<RequestId>().map(|r| r.0)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    plane: &'static str,
    rpc: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    plane: &'static str,
    rpc: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlaneLabels {
    plane: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    operation: &'static str,
    class: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~3.3 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: HistogramFamily<RpcLabels>,
    connections: Family<PlaneLabels, Gauge>,
    hsm_calls: Family<OperationLabels, Counter>,
    hsm_errors: Family<ErrorLabels, Counter>,
    hsm_seconds: HistogramFamily<OperationLabels>,
    hsm_queue: Gauge,
    hsm_ready: Gauge,
    audit_batch: Histogram,
    audit_fdatasync: Histogram,
    audit_lag: Histogram,
    store_bytes: Gauge,
    store_secrets: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Functions run before each scrape to read the gauges that are read, not counted.
type Probe = Box<dyn Fn() + Send + Sync>;
static PROBES: Mutex<Vec<Probe>> = Mutex::new(Vec::new());

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("strongroom");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "gRPC requests answered, by plane, RPC and gRPC status code",
            requests.clone(),
        );
        let request_seconds: HistogramFamily<RpcLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time from a request's arrival to its answer's end, by plane and RPC",
            Unit::Seconds,
            request_seconds.clone(),
        );
        let connections = Family::<PlaneLabels, Gauge>::default();
        registry.register(
            "open_connections",
            "TCP connections open on each listener (handshakes included)",
            connections.clone(),
        );
        let hsm_calls = Family::<OperationLabels, Counter>::default();
        registry.register(
            "hsm_calls",
            "Jobs the HSM workers ran, by operation",
            hsm_calls.clone(),
        );
        let hsm_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "hsm_errors",
            "HSM jobs that failed, by operation and fault class",
            hsm_errors.clone(),
        );
        let hsm_seconds: HistogramFamily<OperationLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "hsm_call_duration",
            "Time an HSM worker spent on a job (repairs and retries included), by operation",
            Unit::Seconds,
            hsm_seconds.clone(),
        );
        let hsm_queue = Gauge::default();
        registry.register(
            "hsm_queue_depth",
            "Jobs waiting for an HSM worker",
            hsm_queue.clone(),
        );
        let hsm_ready = Gauge::default();
        registry.register(
            "hsm_token_ready",
            "1 while the token serves, 0 while the pool recovers a lost token",
            hsm_ready.clone(),
        );
        let audit_batch = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "audit_batch_entries",
            "Audit entries written with one fdatasync",
            audit_batch.clone(),
        );
        let audit_fdatasync = latency_histogram();
        registry.register_with_unit(
            "audit_fdatasync",
            "Time to write one audit batch and fdatasync it",
            Unit::Seconds,
            audit_fdatasync.clone(),
        );
        let audit_lag = latency_histogram();
        registry.register_with_unit(
            "audit_lag",
            "Age of a batch's oldest entry when the batch became durable",
            Unit::Seconds,
            audit_lag.clone(),
        );
        let store_bytes = Gauge::default();
        registry.register(
            "store_size_bytes",
            "Bytes the store occupies (sled: on disk; etcd: the database size), sampled",
            store_bytes.clone(),
        );
        let store_secrets = Gauge::default();
        registry.register(
            "store_secrets",
            "Live secrets, counted with each state report (jobs.state_report_interval_secs)",
            store_secrets.clone(),
        );
        Self {
            registry,
            requests,
            request_seconds,
            connections,
            hsm_calls,
            hsm_errors,
            hsm_seconds,
            hsm_queue,
            hsm_ready,
            audit_batch,
            audit_fdatasync,
            audit_lag,
            store_bytes,
            store_secrets,
        }
    }
}

/// Registers a function run before every scrape (e.g. to read the HSM queue's length).
pub fn on_scrape(probe: impl Fn() + Send + Sync + 'static) {
    if let Ok(mut p) = PROBES.lock() {
        p.push(Box::new(probe));
    }
}

/// The text exposition of every series, after running the probes.
pub fn render() -> String {
    if let Ok(probes) = PROBES.lock() {
        for p in probes.iter() {
            p();
        }
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &METRICS.registry) {
        tracing::warn!(error = %e, "cannot encode the metrics");
    }
    out
}

/// The RPC label of a request path: the path for the services this process serves, else
/// `other`, so that a peer cannot add series by inventing paths.
fn rpc_label(path: &str) -> String {
    const SERVED: [&str; 5] = [
        "/strongroom.v1.SecretService/",
        "/strongroom.v1.AdminService/",
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1.ServerReflection/",
        "/grpc.reflection.v1alpha.ServerReflection/",
    ];
    let method = SERVED.iter().find_map(|s| path.strip_prefix(s));
    match method {
        Some(m) if (1..=64).contains(&m.len()) && m.bytes().all(|b| b.is_ascii_alphanumeric()) => {
            path.trim_start_matches('/').to_owned()
        }
        _ => "other".to_owned(),
    }
}

/// The name of a gRPC status code as a label.
fn code_name(code: Option<&[u8]>) -> &'static str {
    let n = code
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| c.parse::<i32>().ok());
    match n {
        Some(0) => "OK",
        Some(1) => "CANCELLED",
        Some(2) => "UNKNOWN",
        Some(3) => "INVALID_ARGUMENT",
        Some(4) => "DEADLINE_EXCEEDED",
        Some(5) => "NOT_FOUND",
        Some(6) => "ALREADY_EXISTS",
        Some(7) => "PERMISSION_DENIED",
        Some(8) => "RESOURCE_EXHAUSTED",
        Some(9) => "FAILED_PRECONDITION",
        Some(10) => "ABORTED",
        Some(11) => "OUT_OF_RANGE",
        Some(12) => "UNIMPLEMENTED",
        Some(13) => "INTERNAL",
        Some(14) => "UNAVAILABLE",
        Some(15) => "DATA_LOSS",
        Some(16) => "UNAUTHENTICATED",
        Some(_) => "UNKNOWN",
        // No status at all: the answer ended without one (the client went away).
        None => "NONE",
    }
}

/// One request from arrival to the end of its answer; counted once, when its status is
/// known (trailers, or headers for a trailers-only answer) or when it is dropped.
pub struct RequestTimer {
    plane: &'static str,
    path: String,
    started: Instant,
    header_code: Option<Vec<u8>>,
    done: bool,
}

impl RequestTimer {
    /// Starts timing a request to `path` on `plane`.
    pub fn start(plane: &'static str, path: &str) -> Self {
        Self {
            plane,
            path: path.to_owned(),
            started: Instant::now(),
            header_code: None,
            done: false,
        }
    }

    /// The answer's headers: a trailers-only answer (an error) carries its status here.
    pub fn headers(&mut self, headers: &http::HeaderMap) {
        self.header_code = headers.get("grpc-status").map(|v| v.as_bytes().to_vec());
    }

    /// The answer's trailers: counts the request with their status.
    pub fn trailers(&mut self, trailers: &http::HeaderMap) {
        let code = trailers.get("grpc-status").map(|v| v.as_bytes().to_vec());
        self.finish(code);
    }

    fn finish(&mut self, code: Option<Vec<u8>>) {
        if self.done {
            return;
        }
        self.done = true;
        let code = code_name(code.as_deref());
        // An unknown method is answered UNIMPLEMENTED: its path is not a label.
        let rpc = if code == "UNIMPLEMENTED" {
            "other".to_owned()
        } else {
            rpc_label(&self.path)
        };
        let m = &*METRICS;
        m.requests
            .get_or_create(&RequestLabels {
                plane: self.plane,
                rpc: rpc.clone(),
                code,
            })
            .inc();
        m.request_seconds
            .get_or_create(&RpcLabels {
                plane: self.plane,
                rpc,
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        let code = self.header_code.take();
        self.finish(code);
    }
}

/// Counts an open connection on `plane` until the guard is dropped.
pub fn connection_open(plane: &'static str) -> ConnectionGuard {
    METRICS
        .connections
        .get_or_create(&PlaneLabels { plane })
        .inc();
    ConnectionGuard(plane)
}

/// See [`connection_open`].
pub struct ConnectionGuard(&'static str);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        METRICS
            .connections
            .get_or_create(&PlaneLabels { plane: self.0 })
            .dec();
    }
}

/// An HSM job finished: `error` is its fault class when it failed.
pub fn hsm_call(operation: &'static str, took: Duration, error: Option<String>) {
    let m = &*METRICS;
    let labels = OperationLabels { operation };
    m.hsm_calls.get_or_create(&labels).inc();
    m.hsm_seconds
        .get_or_create(&labels)
        .observe(took.as_secs_f64());
    if let Some(class) = error {
        m.hsm_errors
            .get_or_create(&ErrorLabels { operation, class })
            .inc();
    }
}

/// The HSM pool's state as read at a scrape.
pub fn hsm_state(queued: usize, ready: bool) {
    METRICS.hsm_queue.set(queued as i64);
    METRICS.hsm_ready.set(i64::from(ready));
}

/// An audit batch became durable: its size and the age of its oldest entry.
pub fn audit_batch(entries: usize, oldest_ms: Option<u64>, now_ms: u64) {
    METRICS.audit_batch.observe(entries as f64);
    if let Some(oldest) = oldest_ms {
        METRICS
            .audit_lag
            .observe(now_ms.saturating_sub(oldest) as f64 / 1000.0);
    }
}

/// One audit write and its fdatasync took `took`.
pub fn audit_fdatasync(took: Duration) {
    METRICS.audit_fdatasync.observe(took.as_secs_f64());
}

/// The store's size in bytes, as last sampled.
pub fn store_size(bytes: u64) {
    METRICS
        .store_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
}

/// The number of live secrets, as last counted.
pub fn store_secrets(n: u64) {
    METRICS
        .store_secrets
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// Where metrics are served, from `[metrics] listen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// Off (`listen = ""` or `"off"`).
    Off,
    /// The default loopback address: if it is taken, the service starts without metrics
    /// and says so.
    Default(SocketAddr),
    /// An address the configuration names: if it cannot be bound, the service refuses to
    /// start.
    Explicit(SocketAddr),
}

/// Largest request head the metrics listener reads.
const MAX_HEAD: usize = 8192;
/// How long a scraper has to send its request.
const READ_DEADLINE: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until `stop` completes: one request per connection
/// (HTTP/1.1 with `Connection: close`), at most 64 connections at a time.
pub async fn serve(listener: TcpListener, stop: impl std::future::Future<Output = ()>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((mut tcp, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = tokio::time::timeout(READ_DEADLINE, answer(&mut tcp)).await;
                });
            }
        }
    }
}

async fn answer(tcp: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, target) = (parts.next(), parts.next());
    let (status, kind, body) = match (method, target) {
        (Some(b"GET"), Some(b"/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        (Some(b"GET"), _) => (
            "404 Not Found",
            "text/plain",
            "only /metrics is served here\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(response.as_bytes()).await?;
    tcp.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_rpcs_become_labels() {
        assert_eq!(
            rpc_label("/strongroom.v1.SecretService/GetSecret"),
            "strongroom.v1.SecretService/GetSecret"
        );
        for other in [
            "/x.Y/Z",
            "/strongroom.v1.SecretService/",
            "/strongroom.v1.SecretService/a/b",
            "/strongroom.v1.SecretService/Ünïcode",
        ] {
            assert_eq!(rpc_label(other), "other", "{other}");
        }
    }

    #[test]
    fn a_request_is_counted_once_with_its_status() {
        let mut t = RequestTimer::start("client", "/strongroom.v1.SecretService/PutSecret");
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("5"));
        t.trailers(&trailers);
        drop(t);
        let text = render();
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("strongroom_requests_total{")
                    && l.contains("PutSecret")
                    && l.contains("NOT_FOUND")
            })
            .expect("the request's series");
        assert!(line.ends_with(" 1"), "{line}");
    }
}
