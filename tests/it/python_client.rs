//! The Python example (examples/python/strongroom_client.py) against a live strongroomd: its
//! stubs are generated from proto/ by grpcio-tools, it connects over mutual TLS with the
//! test env's client certificates, and its put, get and list agree with the Rust client.
//!
//! The interpreter is the venv `scripts/python-venv.sh` makes (`scripts/deps.sh` runs it), or
//! `STRONGROOM_TEST_PYTHON`. Without one the test skips with a printed reason, except in CI
//! (`CI` set), where the scripts installed it and a skip would hide a broken setup.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{Output, Server, TestEnv, get, put, run_with_stdin};

/// The venv's python, or why there is none.
fn python() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("STRONGROOM_TEST_PYTHON") {
        return Ok(p.into());
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .ok_or("neither XDG_CACHE_HOME nor HOME is set")?;
    let py = cache.join("strongroom/venv/bin/python");
    if py.exists() {
        Ok(py)
    } else {
        Err(format!(
            "no Python venv at {} (run scripts/python-venv.sh; scripts/deps.sh does)",
            py.display()
        ))
    }
}

/// The example as `stem` (a client certificate of the test PKI) against `server`.
fn example(py: &Path, env: &TestEnv, server: &Server, stem: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(py);
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/strongroom_client.py"))
        .args(args);
    env.client_env(&mut cmd, server, stem);
    cmd
}

#[tokio::test]
async fn the_python_example_puts_gets_and_lists_over_mtls() {
    let py = match python() {
        Ok(py) => py,
        Err(why) if std::env::var_os("CI").is_none() => {
            println!("skipped: {why}");
            return;
        }
        Err(why) => panic!("{why}; in CI scripts/deps.sh installs it"),
    };
    let env = TestEnv::new();
    let server = env.start();
    let run = |stem: &str, args: &[&str], stdin: &[u8]| -> Output {
        run_with_stdin(&mut example(&py, &env, &server, stem, args), stdin)
    };

    // Put from stdin (binary, not UTF-8) and from a flag.
    let value: Vec<u8> = (0u8..=255).rev().collect();
    let out = run("payments", &["put", "payments/py/binary"], &value);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stdout.trim(), "stored payments/py/binary version 1");
    run(
        "payments",
        &["put", "payments/py/text", "--value", "one"],
        b"",
    )
    .assert_ok();
    run(
        "payments",
        &["put", "payments/py/text", "--value", "two"],
        b"",
    )
    .assert_ok();

    // What Python stored, Rust reads; and the other way round.
    let mut c = server.client("payments").await;
    let got = c
        .get_secret(get("payments/py/binary"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.version, got.value), (1, value.clone()));
    c.put_secret(put("payments/db/password", b"from rust"))
        .await
        .unwrap();
    let out = run("payments", &["get", "payments/db/password"], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "from rust");
    let out = run(
        "payments",
        &["get", "payments/py/text", "--version", "1"],
        b"",
    );
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "one"),
        "{}",
        out.stderr
    );
    let out = run("payments", &["get", "payments/py/text"], b"");
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "two"),
        "{}",
        out.stderr
    );

    // List walks the names under a prefix, one a line.
    let out = run("payments", &["list", "payments/py"], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["payments/py/binary", "payments/py/text"]
    );
    let out = run("payments", &["list", "payments/none"], b"");
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
    assert!(out.stderr.contains("no secrets under"), "{}", out.stderr);

    // The service's refusals reach the caller as gRPC status codes, exit 2: policy (the
    // reader may not write) and an absent name.
    let out = run(
        "reader",
        &["put", "payments/db/password", "--value", "x"],
        b"",
    );
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("PERMISSION_DENIED"), "{}", out.stderr);
    let out = run("payments", &["get", "payments/py/absent"], b"");
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("NOT_FOUND"), "{}", out.stderr);

    // Without a certificate the service trusts, the handshake fails: no value comes back.
    let out = run("foreign", &["get", "payments/db/password"], b"");
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(!out.stdout.contains("from rust"));
    assert!(out.stderr.contains("UNAVAILABLE"), "{}", out.stderr);
}
