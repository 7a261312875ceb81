//! Refusals people can read: the tools explain TLS and connection failures in words, with
//! what to do, against real strongroomd processes and real sockets; exit code 2 throughout.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strongroom::explain::{Plane, Target};
use strongroom::proto::GetSecretRequest;
use strongroom::proto::secret_service_client::SecretServiceClient;

use crate::common::{Output, TestEnv};

/// Runs `cmd`, killing it if it has not finished within `limit` (a hang is a failure here,
/// not a slow run).
pub(crate) fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Exit 2, one error line holding every one of `words`, and none of the transport jargon
/// the tools used to print.
fn assert_refused(out: &Output, words: &[&str]) {
    eprintln!("{}", out.stderr);
    assert_eq!(
        out.code, 2,
        "stdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", out.stderr);
    for w in words {
        assert!(out.stderr.contains(w), "missing {w:?} in: {}", out.stderr);
    }
    for jargon in [
        "transport error",
        "operation was canceled",
        "Cancelled",
        "Unknown:",
        "tcp connect error: tcp connect error",
    ] {
        assert!(
            !out.stderr.contains(jargon),
            "{jargon:?} in: {}",
            out.stderr
        );
    }
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn certificate_from_a_ca_the_server_does_not_trust() {
    let env = TestEnv::new();
    let server = env.start();
    let out = run_bounded(
        env.cli(&server, "foreign").args(["get", "payments/x"]),
        LIMIT,
    );
    assert_refused(
        &out,
        &[
            "refused the certificate",
            "foreign.pem",
            "does not trust the CA that issued it",
            "unknown CA",
            "[server] client_ca",
            "--cert",
        ],
    );
    // The same tool with a certificate the server trusts is served: the words came from the
    // refusal, not from the tool.
    let ok = run_bounded(
        env.cli(&server, "payments").args(["get", "payments/x"]),
        LIMIT,
    );
    assert_eq!(ok.code, 2);
    assert!(ok.stderr.contains("NotFound"), "{}", ok.stderr);
}

#[test]
fn expired_client_certificate() {
    let env = TestEnv::new();
    let server = env.start();
    let out = run_bounded(
        env.cli(&server, "expired-client")
            .args(["list", "payments"]),
        LIMIT,
    );
    assert_refused(
        &out,
        &[
            "expired-client.pem",
            "has expired or is not yet valid",
            "certificate expired",
            "2001",
            "Renew",
        ],
    );
}

#[test]
fn wrong_server_name() {
    let env = TestEnv::new();
    let server = env.start();
    let out = run_bounded(
        env.cli(&server, "payments")
            .env("STRONGROOM_SERVER_NAME", "vault.example")
            .args(["get", "payments/x"]),
        LIMIT,
    );
    assert_refused(
        &out,
        &[
            "not valid for the name vault.example; it holds localhost, 127.0.0.1",
            "wrong server name",
            "--server-name",
        ],
    );
}

#[test]
fn server_not_issued_by_the_trusted_ca() {
    let env = TestEnv::new();
    let server = env.start();
    // The tool trusts the client CA instead of the server CA.
    let out = run_bounded(
        env.cli(&server, "payments")
            .env("STRONGROOM_CACERT", env.pki.join("client-ca.pem"))
            .args(["get", "payments/x"]),
        LIMIT,
    );
    assert_refused(
        &out,
        &["not issued by the CA in", "client-ca.pem", "--cacert"],
    );
}

#[test]
fn closed_port_and_silent_listener() {
    let env = TestEnv::with_token();
    // A port nobody listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let out = run_bounded(
        cli_at(&env, &format!("https://{closed_addr}")).args(["get", "payments/x"]),
        LIMIT,
    );
    assert_refused(
        &out,
        &["nothing is listening", "connection refused", "--addr"],
    );

    // A listener that completes TCP handshakes (the kernel does, from the backlog) and never
    // says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let out = run_bounded(
        cli_at(&env, &format!("https://{silent_addr}"))
            .env("STRONGROOM_TIMEOUT", "1")
            .args(["get", "payments/x"]),
        LIMIT,
    );
    assert_refused(
        &out,
        &["did not answer within 1 s", "deadline passed", "--timeout"],
    );
    drop(silent);
}

/// The `strongroom` tool as payments, at an address of the test's choosing.
fn cli_at(env: &TestEnv, addr: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strongroom"));
    env.client_env_at(&mut cmd, addr, "payments")
        .env_remove("STRONGROOM_TIMEOUT")
        .env_remove("STRONGROOM_FORMAT");
    cmd
}

#[tokio::test]
async fn no_client_certificate() {
    let env = TestEnv::new();
    let server = env.start();
    // The tools insist on a certificate; a client without one is built here, through the
    // same connect the tools use.
    let target = Target::new(
        Plane::Client,
        &format!("https://{}", server.addr),
        &env.pki.join("server-ca.pem"),
        None,
        Some("localhost"),
        Duration::from_secs(10),
    );
    let channel = strongroom::tls::connect(&target)
        .await
        .expect("TLS 1.3: the client's half of the handshake succeeds");
    let status = SecretServiceClient::new(channel)
        .get_secret(GetSecretRequest {
            name: "payments/x".into(),
            version: 0,
        })
        .await
        .expect_err("no certificate, no answer");
    let words =
        tokio::task::spawn_blocking(move || strongroom::explain::rpc_failure(&status, &target))
            .await
            .unwrap()
            .expect("a connection failure is explained");
    assert!(
        words.contains("requires a client certificate and none was presented"),
        "{words}"
    );
    assert!(words.contains("certificate required"), "{words}");
    assert!(words.contains("--cert and --key"), "{words}");
}

#[test]
fn officer_tool_with_a_client_ca_certificate() {
    let env = TestEnv::new();
    let server = env.start_admin();
    let out = run_bounded(
        env.admin_cli(&server, "alice-client-ca").arg("status"),
        LIMIT,
    );
    assert_refused(
        &out,
        &[
            "alice-client-ca.pem",
            "does not trust the CA that issued it",
            "unknown CA",
            "[admin] ca",
            "not the client CA",
            "--admin-cert",
        ],
    );
    // And the officer's own certificate works.
    let ok = run_bounded(env.admin_cli(&server, "alice").arg("status"), LIMIT);
    ok.assert_ok();
}

#[test]
fn officer_tool_against_a_closed_port() {
    let env = TestEnv::with_token();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strongroom-admin"));
    cmd.env("STRONGROOM_ADMIN_ADDR", format!("https://{addr}"))
        .env("STRONGROOM_ADMIN_CACERT", env.pki.join("server-ca.pem"))
        .env("STRONGROOM_ADMIN_CERT", env.pki.join("alice.pem"))
        .env("STRONGROOM_ADMIN_KEY", env.pki.join("alice-key.pem"))
        .env_remove("STRONGROOM_TIMEOUT")
        .arg("status");
    let out = run_bounded(&mut cmd, LIMIT);
    assert_refused(
        &out,
        &["nothing is listening", "connection refused", "--admin-addr"],
    );
}
