//! The metrics listener: scraped while the service answers, its counters move with the
//! requests (by RPC and status code), the HSM calls and the audit batches; it listens on
//! loopback unless the configuration names another address; one request id ties a
//! request's process log span to its audit entry.

use std::collections::HashSet;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::common::{POLICY, Server, TestEnv, get, put};

/// The address in the service's "metrics listening" log line.
fn metrics_addr(server: &Server) -> String {
    server.wait_for_log("metrics listening", 1, Duration::from_secs(10));
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("metrics listening"))
        .expect("the line");
    let at = line.find("metrics_addr=").expect("metrics_addr field") + "metrics_addr=".len();
    line[at..]
        .split(|c: char| c.is_whitespace() || c == '"' || c == ',')
        .next()
        .unwrap()
        .to_owned()
}

/// One scrape of `GET /metrics`: the status line and the body.
async fn scrape(addr: &str, path: &str) -> (String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The sum of the series `name` whose labels include every pair of `labels` (0 if none).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| v.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

const GET: &str = "strongroom.v1.SecretService/GetSecret";
const PUT: &str = "strongroom.v1.SecretService/PutSecret";

#[tokio::test]
async fn the_metrics_endpoint_counts_requests_codes_hsm_calls_and_audit_batches() {
    let env = TestEnv::new();
    let config = env.config(&format!("{POLICY}\n[metrics]\nlisten = \"127.0.0.1:0\"\n"));
    let server = env.start_with(&config, &[]);
    let addr = metrics_addr(&server);
    let (status, before) = scrape(&addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        before.contains("# TYPE strongroom_hsm_token_ready gauge"),
        "{before}"
    );
    assert_eq!(value(&before, "strongroom_hsm_token_ready", &[]), 1.0);

    let mut client = server.client("payments").await;
    // Traffic, scraped in between: 3 puts, 5 reads, 2 reads of a name that is not there,
    // 1 put the policy refuses.
    for i in 0..3 {
        client
            .put_secret(put(&format!("payments/k{i}"), b"value"))
            .await
            .unwrap();
    }
    let (_, during) = scrape(&addr, "/metrics").await;
    assert_eq!(
        value(
            &during,
            "strongroom_requests_total",
            &[("rpc", PUT), ("code", "OK")]
        ) - value(
            &before,
            "strongroom_requests_total",
            &[("rpc", PUT), ("code", "OK")]
        ),
        3.0,
        "{during}"
    );
    assert_eq!(
        value(
            &during,
            "strongroom_open_connections",
            &[("plane", "client")]
        ),
        1.0,
        "one client connection is open: {during}"
    );
    for _ in 0..5 {
        client.get_secret(get("payments/k0")).await.unwrap();
    }
    for _ in 0..2 {
        let e = client.get_secret(get("payments/none")).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    let e = client.put_secret(put("other/x", b"v")).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "a write outside the policy"
    );
    let (_, after) = scrape(&addr, "/metrics").await;

    let moved = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    let requests = "strongroom_requests_total";
    assert_eq!(moved(requests, &[("rpc", GET), ("code", "OK")]), 5.0);
    assert_eq!(moved(requests, &[("rpc", GET), ("code", "NOT_FOUND")]), 2.0);
    assert_eq!(
        moved(requests, &[("rpc", PUT), ("code", "PERMISSION_DENIED")]),
        1.0
    );
    assert_eq!(
        moved("strongroom_request_duration_seconds_count", &[("rpc", GET)]),
        7.0
    );
    // Every put wrapped a fresh data key in the token, every read unwrapped one.
    let hsm = "strongroom_hsm_calls_total";
    assert!(
        moved(hsm, &[("operation", "new_data_key")]) >= 3.0,
        "{after}"
    );
    assert!(
        moved(hsm, &[("operation", "unwrap_data_key")]) >= 5.0,
        "{after}"
    );
    assert_eq!(value(&after, "strongroom_hsm_errors_total", &[]), 0.0);
    assert_eq!(value(&after, "strongroom_hsm_queue_depth", &[]), 0.0);
    // Each request's audit entry went through a batch and an fdatasync (writes: two each).
    assert!(
        moved("strongroom_audit_batch_entries_sum", &[]) >= 11.0,
        "{after}"
    );
    assert!(moved("strongroom_audit_fdatasync_seconds_count", &[]) >= 1.0);
    assert!(moved("strongroom_audit_lag_seconds_count", &[]) >= 1.0);
    // Only /metrics is served.
    let (status, _) = scrape(&addr, "/other").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

/// TCP sockets `pid` listens on: their local addresses, from /proc.
fn listening_addresses(pid: u32) -> Vec<String> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_owned)
        })
        .collect();
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, st (0A: LISTEN), inode.
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                out.push(f[1].to_owned());
            }
        }
    }
    out
}

/// Whether a /proc/net address (hex, kernel byte order) is a loopback one.
fn is_loopback(hex: &str) -> bool {
    let ip = hex.split(':').next().unwrap();
    match ip.len() {
        // 127.x.x.x: the last byte of the little-endian word.
        8 => ip.ends_with("7F"),
        // ::1, or ::ffff:127.x.x.x.
        32 => ip == "00000000000000000000000001000000" || ip[24..].ends_with("7F"),
        _ => false,
    }
}

#[tokio::test]
async fn metrics_listen_on_loopback_unless_an_address_is_written() {
    let env = TestEnv::new();
    // Nothing in [metrics]: 127.0.0.1:9464 (or nothing, if another process has that port).
    let server = env.start();
    server.wait_for_log("metrics", 1, Duration::from_secs(10));
    let log = server.log_text();
    assert!(
        log.contains("metrics listening metrics_addr=127.0.0.1:9464")
            || log.contains("cannot listen for metrics on the default address"),
        "{log}"
    );
    let listening = listening_addresses(server.child.id());
    assert!(!listening.is_empty());
    assert!(
        listening.iter().all(|a| is_loopback(a)),
        "every listener on loopback: {listening:?}"
    );
    server.stop();

    // Written explicitly, any address is used: the check above can fail.
    let config = env.config(&format!("{POLICY}\n[metrics]\nlisten = \"0.0.0.0:0\"\n"));
    let server = env.start_with(&config, &[]);
    let addr = metrics_addr(&server);
    assert!(addr.starts_with("0.0.0.0:"), "{addr}");
    let listening = listening_addresses(server.child.id());
    assert!(
        listening.iter().any(|a| !is_loopback(a)),
        "the metrics listener on every address: {listening:?}"
    );
    server.stop();

    // Off: no metrics listener.
    let config = env.config(&format!("{POLICY}\n[metrics]\nlisten = \"off\"\n"));
    let server = env.start_with(&config, &[]);
    server.wait_for_log("metrics off", 1, Duration::from_secs(10));
    assert_eq!(
        listening_addresses(server.child.id()).len(),
        1,
        "the client listener only"
    );
}

#[tokio::test]
async fn one_request_id_is_in_the_json_log_span_and_the_audit_entry() {
    let env = TestEnv::new();
    let config = env.config(&format!(
        "{POLICY}\n[metrics]\nlisten = \"off\"\n[log]\nformat = \"json\"\n"
    ));
    let server = env.start_with(&config, &[]);
    let mut client = server.client("payments").await;
    client
        .put_secret(put("payments/traced", b"v"))
        .await
        .unwrap();
    client.get_secret(get("payments/traced")).await.unwrap();
    server.wait_for_log("\"operation\":\"GetSecret\"", 1, Duration::from_secs(10));

    // The process log: JSON lines; the audit event of the read carries its request's span.
    let log = server.log_text();
    let event: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["operation"] == "GetSecret")
        .unwrap_or_else(|| panic!("a JSON audit line for GetSecret:\n{log}"));
    let span_id = event["span"]["request_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("the request span: {event}"));
    assert_eq!(
        event["span"]["rpc"],
        "/strongroom.v1.SecretService/GetSecret"
    );
    assert_eq!(event["fields"]["request_id"].as_u64(), Some(span_id));

    // The audit log: the read's entry has the same id.
    let audit = std::fs::read_to_string(env.audit_log()).unwrap();
    let entry: serde_json::Value = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["operation"] == "GetSecret")
        .expect("the read's audit entry");
    assert_eq!(entry["request_id"].as_u64(), Some(span_id), "{entry}");
    // Ids are per process, not per plane or RPC: the put's are different.
    let put_ids: Vec<u64> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["operation"] == "PutSecret")
        .filter_map(|v| v["request_id"].as_u64())
        .collect();
    assert!(!put_ids.is_empty() && !put_ids.contains(&span_id));
    drop(client);
    server.stop();
    // The log still verifies with the ids the front door gave.
    env.admin(&["audit", "verify", env.audit_log().to_str().unwrap()])
        .assert_ok();
}

/// Scrapes until `ok` holds for the text (at most 20 s); returns that text.
async fn scrape_until(addr: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = scrape(addr, "/metrics").await;
        if ok(&text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within 20 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_lost_token_shows_in_the_hsm_metrics_and_its_return_too() {
    let env = TestEnv::new();
    // The fault module in front of the test's token.
    let (server, control) =
        env.start_behind_faults(&format!("{POLICY}\n[metrics]\nlisten = \"127.0.0.1:0\"\n"));
    let addr = metrics_addr(&server);
    let mut client = server.client("payments").await;
    client.put_secret(put("payments/f", b"v")).await.unwrap();
    let (_, before) = scrape(&addr, "/metrics").await;
    assert_eq!(value(&before, "strongroom_hsm_token_ready", &[]), 1.0);
    assert_eq!(value(&before, "strongroom_hsm_errors_total", &[]), 0.0);

    control.token_present(false).unwrap();
    let e = client.get_secret(get("payments/f")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let lost = scrape_until(&addr, "the token reported lost", |t| {
        value(t, "strongroom_hsm_token_ready", &[]) == 0.0
    })
    .await;
    assert!(
        value(
            &lost,
            "strongroom_hsm_errors_total",
            &[("operation", "unwrap_data_key")]
        ) >= 1.0,
        "{lost}"
    );
    assert!(
        value(
            &lost,
            "strongroom_requests_total",
            &[("rpc", GET), ("code", "UNAVAILABLE")]
        ) >= 1.0,
        "{lost}"
    );

    control.token_present(true).unwrap();
    scrape_until(&addr, "the token back", |t| {
        value(t, "strongroom_hsm_token_ready", &[]) == 1.0
    })
    .await;
}
