//! Helpers for tests of the officers' plane: an `[admin]` section with a chosen officer list,
//! the audit log as JSON, and awaiting a condition.

use std::path::Path;
use std::time::{Duration, Instant};

/// An `[admin]` section like [`super::ADMIN`] with these officers (certificate stems of the
/// test PKI: alice, bob, carol, mallory), this quorum, and `extra` keys (e.g.
/// `approval_ttl_secs = 1`).
pub fn admin_section(officers: &[&str], quorum: u32, extra: &str) -> String {
    let listed: Vec<String> = officers
        .iter()
        .map(|o| format!("\"{o}.officers.strongroom.test\""))
        .collect();
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"
ca = "pki/admin-ca.pem"
officers = [{}]
quorum = {quorum}
{extra}
"#,
        listed.join(", ")
    )
}

/// Every entry of an audit log, as JSON (each line is one JSON object, its MAC included).
pub fn audit_json(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The `detail` of each audit entry whose detail mentions `needle`, with its operation.
pub fn audit_details(path: &Path, needle: &str) -> Vec<(String, String)> {
    audit_json(path)
        .into_iter()
        .filter_map(|e| {
            let detail = e["detail"].as_str()?.to_owned();
            detail
                .contains(needle)
                .then(|| (e["operation"].as_str().unwrap_or("").to_owned(), detail))
        })
        .collect()
}

/// Polls `check` until it gives a value, for at most `within`; panics naming `what`.
pub async fn eventually<T>(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
