//! HSM faults, injected by the fault module (crates/faultpkcs11) in front of a real SoftHSM2
//! token, and by real means (the token's files moved away): the service never answers with
//! wrong data, answers UNAVAILABLE (RESOURCE_EXHAUSTED for the session cap) within the
//! request's deadline, and recovers by itself once the token is back.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;

use crate::common::put;
use crate::common::{POLICY, TestEnv};
use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom::proto::{GetSecretRequest, StatusRequest};

type Client = SecretServiceClient<Channel>;

fn get(name: &str, deadline: Duration) -> tonic::Request<GetSecretRequest> {
    let mut r = tonic::Request::new(GetSecretRequest {
        name: name.into(),
        version: 0,
    });
    r.set_timeout(deadline);
    r
}

async fn seed(c: &mut Client, n: usize) -> HashMap<String, Vec<u8>> {
    let mut values = HashMap::new();
    for i in 0..n {
        let name = format!("payments/f/{i}");
        let value = format!("value-{i}-{}", i * 7919).into_bytes();
        c.put_secret(put(&name, &value)).await.unwrap();
        values.insert(name, value);
    }
    values
}

/// Waits until a read succeeds again; returns how long it took.
async fn recovered(c: &mut Client, name: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if c.get_secret(get(name, Duration::from_secs(2)))
            .await
            .is_ok()
        {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "no recovery within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn token_removed_and_restored_under_load_never_gives_wrong_data() {
    let env = TestEnv::new();
    let (server, control) = env.start_behind_faults(POLICY);
    let mut c = server.client("payments").await;
    let values = Arc::new(seed(&mut c, 16).await);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let unavailable = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..6u64 {
        let mut c = c.clone();
        let (stop, ok, unavailable, values) = (
            stop.clone(),
            ok.clone(),
            unavailable.clone(),
            values.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let deadline = Duration::from_secs(2);
                let started = Instant::now();
                let (result, expect) = if t == 0 && i % 3 == 0 {
                    // A writer among the readers.
                    let name = format!("payments/w/{i}");
                    let value = format!("written-{i}").into_bytes();
                    let mut req = tonic::Request::new(put(&name, &value));
                    req.set_timeout(deadline);
                    let r = c.put_secret(req).await.map(|_| Vec::new());
                    if r.is_ok() {
                        acked.push((name, value));
                    }
                    (r, None)
                } else {
                    let name = format!("payments/f/{}", (i * 7 + t) % 16);
                    let r = c
                        .get_secret(get(&name, deadline))
                        .await
                        .map(|r| r.into_inner().value);
                    (r, Some(values[&name].clone()))
                };
                let took = started.elapsed();
                match result {
                    Ok(v) => {
                        if let Some(expect) = expect {
                            assert_eq!(v, expect, "WRONG DATA");
                        }
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                        assert!(
                            took < deadline + Duration::from_secs(1),
                            "answered after {took:?}"
                        );
                        unavailable.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            acked
        }));
    }

    let mut probe = server.client("payments").await;
    let mut recoveries = Vec::new();
    for cycle in 0..22 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        control.token_present(false).unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        if cycle == 0 {
            // While the token is away, health says so.
            let status = server.health().await;
            assert_eq!(status, "NotServing");
        }
        control.token_present(true).unwrap();
        recoveries.push(recovered(&mut probe, "payments/f/0", Duration::from_secs(15)).await);
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let ok = ok.load(Ordering::Relaxed);
    let unavailable = unavailable.load(Ordering::Relaxed);
    println!(
        "22 removals: {ok} answers right, {unavailable} UNAVAILABLE, 0 wrong; recovery after return: max {:?}, mean {:?}",
        recoveries.iter().max().unwrap(),
        recoveries.iter().sum::<Duration>() / recoveries.len() as u32
    );
    assert!(
        ok > 0 && unavailable > 0,
        "the faults were not exercised: {ok} ok, {unavailable} unavailable"
    );
    // Every acknowledged write is there.
    for (name, value) in acked {
        let got = c
            .get_secret(get(&name, Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(got.into_inner().value, value);
    }
    // Health follows within the watcher's period (0.5 s).
    let mut status = server.health().await;
    for _ in 0..30 {
        if status == "Serving" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = server.health().await;
    }
    let log = server.log_text();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    assert_eq!(status, "Serving", "log tail (newest first): {tail:#?}");
    // The service logged what happened to the token.
    assert!(log.contains("the token is lost"), "{log}");
    assert!(log.contains("the token is back"));
}

#[tokio::test]
async fn lost_sessions_dropped_logins_and_device_errors_are_repaired() {
    let env = TestEnv::new();
    let (server, control) = env.start_behind_faults(POLICY);
    let mut c = server.client("payments").await;
    let values = seed(&mut c, 4).await;
    let read_all = async |c: &mut Client| {
        for (name, value) in &values {
            let got = c
                .get_secret(get(name, Duration::from_secs(5)))
                .await
                .unwrap();
            assert_eq!(&got.into_inner().value, value);
        }
    };

    // Every open session invalidated: the worker reopens and retries, the caller sees nothing.
    control.invalidate_sessions().unwrap();
    read_all(&mut c).await;
    c.put_secret(put("payments/after-invalidate", b"v"))
        .await
        .unwrap();

    // The login dropped: the pool logs in again and retries.
    control.drop_login().unwrap();
    read_all(&mut c).await;
    c.put_secret(put("payments/after-logout", b"v"))
        .await
        .unwrap();

    // Device errors on 30% of calls: right answers or UNAVAILABLE, never wrong data.
    control.seed(7).unwrap();
    control.device_error_rate(0.3).unwrap();
    let (mut right, mut refused) = (0, 0);
    for i in 0..200 {
        let name = format!("payments/f/{}", i % 4);
        match c.get_secret(get(&name, Duration::from_secs(5))).await {
            Ok(r) => {
                assert_eq!(r.into_inner().value, values[&name]);
                right += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                refused += 1;
            }
        }
    }
    println!("device errors at 30%: {right} right, {refused} UNAVAILABLE");
    // Each request retries once on a fresh session, so most succeed.
    assert!(
        right > refused,
        "{right} right, {refused} refused; log:\n{}",
        server
            .log_text()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    control.device_error_rate(0.0).unwrap();
    read_all(&mut c).await;
}

#[tokio::test]
async fn the_session_cap_answers_resource_exhausted_and_lifts() {
    let env = TestEnv::new();
    let (server, control) = env.start_behind_faults(POLICY);
    let mut c = server.client("payments").await;
    let values = seed(&mut c, 2).await;

    // No session may be opened, and the ones open die: the worker cannot reopen.
    control.max_sessions(Some(0)).unwrap();
    control.invalidate_sessions().unwrap();
    let e = c
        .get_secret(get("payments/f/0", Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::ResourceExhausted | Code::Unavailable),
        "{e:?}"
    );
    assert!(!e.message().contains("value-"), "{}", e.message());

    control.max_sessions(None).unwrap();
    recovered(&mut c, "payments/f/0", Duration::from_secs(15)).await;
    let got = c
        .get_secret(get("payments/f/1", Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(got.into_inner().value, values["payments/f/1"]);
}

#[tokio::test]
async fn a_slow_token_is_answered_within_the_deadline() {
    let env = TestEnv::new();
    let (server, control) = env.start_behind_faults(POLICY);
    let mut c = server.client("payments").await;
    seed(&mut c, 1).await;
    control.latency(Duration::from_millis(800)).unwrap();
    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    let e = c
        .get_secret(get("payments/f/0", deadline))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
        ),
        "{e:?}"
    );
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    control.latency(Duration::ZERO).unwrap();
    recovered(&mut c, "payments/f/0", Duration::from_secs(10)).await;
}

/// A real outage: the token's files move away under the running service and come back.
#[tokio::test]
async fn the_token_directory_moved_away_and_back() {
    let env = TestEnv::new();
    let server = env.start_admin();
    let mut c = server.client("payments").await;
    let values = seed(&mut c, 2).await;
    let tokens = env.dir.path().join("tokens");
    let aside = env.dir.path().join("tokens-aside");
    std::fs::rename(&tokens, &aside).unwrap();
    std::fs::create_dir(&tokens).unwrap();
    let mut failures = 0;
    for _ in 0..10 {
        match c
            .get_secret(get("payments/f/0", Duration::from_secs(3)))
            .await
        {
            Ok(r) => assert_eq!(r.into_inner().value, values["payments/f/0"]),
            Err(e) => {
                assert!(
                    matches!(e.code(), Code::Unavailable | Code::FailedPrecondition),
                    "{e:?}"
                );
                failures += 1;
            }
        }
    }
    std::fs::remove_dir(&tokens).unwrap();
    std::fs::rename(&aside, &tokens).unwrap();
    let start = Instant::now();
    while c
        .get_secret(get("payments/f/1", Duration::from_secs(2)))
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no recovery; log:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut alice = server.admin("alice").await;
    let status = alice.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.hsm_state, "ready");
    println!("token files away: {failures}/10 reads refused, 0 wrong");
}
