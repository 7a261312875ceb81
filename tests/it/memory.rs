//! Memory: strongroomd runs with one glibc malloc arena unless its operator chose a number.

use crate::common::{POLICY, TestEnv};
use strongroom::proto::{GetSecretRequest, PutSecretRequest};

/// `MALLOC_ARENA_MAX` as the process `pid` sees it (its environment after any exec).
fn arena_max(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("read environ");
    environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"MALLOC_ARENA_MAX="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[tokio::test]
async fn strongroomd_limits_malloc_arenas_and_keeps_an_operators_choice() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        eprintln!("skipped: MALLOC_ARENA_MAX is a glibc setting");
        return;
    }
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        eprintln!("skipped: the test runner sets MALLOC_ARENA_MAX itself, which strongroomd keeps");
        return;
    }
    let env = TestEnv::new();
    let config = env.config(POLICY);
    // Unset: strongroomd restarts itself (same pid) with one arena, and serves.
    let server = env.start_with(&config, &[]);
    assert_eq!(arena_max(server.child.id()).as_deref(), Some("1"));
    let mut c = server.client("payments").await;
    c.put_secret(PutSecretRequest {
        name: "payments/arena".into(),
        value: b"v".to_vec(),
        ..Default::default()
    })
    .await
    .expect("put");
    let got = c
        .get_secret(GetSecretRequest {
            name: "payments/arena".into(),
            version: 0,
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.value, b"v");
    drop(server);
    // Set by the operator: kept as it is.
    let server = env.start_with(&config, &[("MALLOC_ARENA_MAX", "4")]);
    assert_eq!(arena_max(server.child.id()).as_deref(), Some("4"));
}
