//! The command lines: `strongroom` against a running service and `strongroom-admin` against
//! the token; exit codes 0 (success), 1 (local or usage error), 2 (server or token error).

use crate::common::{Output, TestEnv, run_with_stdin};

#[test]
fn client_cli_round_trip_formats_and_exit_codes() {
    let env = TestEnv::new();
    let server = env.start();
    let cli = |args: &[&str]| Output::of(env.cli(&server, "payments").args(args));

    let put = run_with_stdin(
        env.cli(&server, "payments").args(["put", "payments/cli"]),
        b"from-stdin",
    );
    put.assert_ok();
    assert!(put.stdout.contains("version"), "{}", put.stdout);

    let file = env.dir.path().join("value.bin");
    std::fs::write(&file, b"from-file\x00\xff").unwrap();
    let at = format!("@{}", file.display());
    let put2 = Output::of(env.cli(&server, "payments").args([
        "put",
        "payments/cli",
        &at,
        "--format",
        "json",
    ]));
    put2.assert_ok();
    let v: serde_json::Value = serde_json::from_str(put2.stdout.trim()).unwrap();
    assert_eq!(v["version"], 2);

    // --field value prints the raw bytes; older versions by --version.
    let raw = env
        .cli(&server, "payments")
        .args(["get", "payments/cli", "--field", "value"])
        .output()
        .unwrap();
    assert!(raw.status.success());
    assert_eq!(raw.stdout, b"from-file\x00\xff");
    let v1 = cli(&["get", "payments/cli", "--version", "1", "--format", "json"]);
    v1.assert_ok();
    let j: serde_json::Value = serde_json::from_str(v1.stdout.trim()).unwrap();
    assert_eq!(j["value"], "from-stdin");
    assert_eq!(j["version"], 1);

    let listed = cli(&["list", "payments", "--format", "json"]);
    listed.assert_ok();
    let j: serde_json::Value = serde_json::from_str(listed.stdout.trim()).unwrap();
    assert_eq!(j["names"], serde_json::json!(["payments/cli"]));
    let described = cli(&["describe", "payments/cli"]);
    described.assert_ok();
    assert!(
        described.stdout.contains("latest version 2"),
        "{}",
        described.stdout
    );
    assert!(!described.stdout.contains("from-stdin"));

    // A value on the command line is refused locally (exit 1) and never sent.
    let argv = cli(&["put", "payments/argv", "s3cret-on-argv"]);
    assert_eq!(argv.code, 1, "{argv:?}", argv = argv.stderr);
    assert!(argv.stderr.contains("never taken from the command line"));
    let absent = cli(&["get", "payments/argv"]);
    assert_eq!(absent.code, 2);
    assert!(absent.stderr.contains("NotFound"), "{}", absent.stderr);

    // Usage errors exit 1; server-side refusals exit 2.
    assert_eq!(cli(&["get"]).code, 1);
    assert_eq!(cli(&["frobnicate"]).code, 1);
    assert_eq!(cli(&["get", "bad//name"]).code, 2);
    let cas = run_with_stdin(
        env.cli(&server, "payments")
            .args(["put", "payments/cli", "--expected-version", "1"]),
        b"x",
    );
    assert_eq!(cas.code, 2);
    assert!(cas.stderr.contains("Aborted"), "{}", cas.stderr);
    assert_eq!(cli(&["--help"]).code, 0);

    // A client the policy does not know sees nothing.
    let stranger = Output::of(env.cli(&server, "stranger").args(["get", "payments/cli"]));
    assert_eq!(stranger.code, 2);
    assert!(stranger.stderr.contains("NotFound"));

    let deleted = cli(&["delete", "payments/cli"]);
    deleted.assert_ok();
    assert!(deleted.stdout.contains('2'), "{}", deleted.stdout);

    // A missing certificate flag is a local error.
    let no_cert = Output::of(
        env.cli(&server, "payments")
            .env_remove("STRONGROOM_CLIENT_CERT")
            .args(["get", "payments/cli"]),
    );
    assert_eq!(no_cert.code, 1);
    assert!(no_cert.stderr.contains("STRONGROOM_CLIENT_CERT"));
}

#[test]
fn admin_token_key_and_doctor() {
    let env = TestEnv::with_token();

    let listed = env.admin(&["token", "list", "--format", "json"]);
    listed.assert_ok();
    let tokens: serde_json::Value = serde_json::from_str(listed.stdout.trim()).unwrap();
    let ours = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["label"] == env.label.as_str())
        .expect("our token is listed");
    assert_eq!(ours["initialized"], true);
    assert_eq!(ours["user_pin_initialized"], true);

    // A second token with the same label is refused.
    let dup = env.admin(&["token", "init", "--label", &env.label]);
    assert_eq!(dup.code, 2, "{}", dup.stderr);
    assert!(dup.stderr.contains("exists already"));

    // Without a master key, doctor fails and says what to do.
    let doc = env.admin(&["doctor"]);
    assert_eq!(doc.code, 2);
    assert!(doc.stdout.contains("key generate"), "{}", doc.stdout);

    let generated = env.admin(&["key", "generate", "--format", "json"]);
    generated.assert_ok();
    let r: serde_json::Value = serde_json::from_str(generated.stdout.trim()).unwrap();
    assert_eq!(r["version"], 1);
    assert_eq!(r["label"], "strongroom-mk-1");
    env.admin(&["key", "generate"]).assert_ok();

    let keys = env.admin(&["key", "list", "--format", "json"]);
    keys.assert_ok();
    let keys: serde_json::Value = serde_json::from_str(keys.stdout.trim()).unwrap();
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.len(), 2);
    for k in keys {
        assert_eq!(k["sensitive"], true);
        assert_eq!(k["extractable"], false);
        assert_eq!(k["always_sensitive"], true);
        assert_eq!(k["never_extractable"], true);
        assert_eq!(k["modifiable"], false);
        assert_eq!(k["value_readable"], false);
    }

    let doc = env.admin(&["doctor", "--format", "json"]);
    doc.assert_ok();
    let j: serde_json::Value = serde_json::from_str(doc.stdout.trim()).unwrap();
    assert_eq!(j["ok"], true);
    assert!(j["checks"].as_array().unwrap().len() >= 8);

    // A wrong PIN: token-side failure (2) and a sentence the officer can act on.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_strongroom-admin"));
    cmd.env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
        .env("STRONGROOM_PKCS11_MODULE", &env.module)
        .env("STRONGROOM_TOKEN", &env.label)
        .env("STRONGROOM_USER_PIN", "wrong-pin-999")
        .args(["key", "list"]);
    let wrong = Output::of(&mut cmd);
    assert_eq!(wrong.code, 2);
    assert!(wrong.stderr.contains("PIN is wrong"), "{}", wrong.stderr);

    // An unknown token: exit 2 and a pointer to `token list`.
    let unknown = env.admin(&["--token", "no-such-token", "key", "list"]);
    assert_eq!(unknown.code, 2);
    assert!(unknown.stderr.contains("token list"), "{}", unknown.stderr);

    // A module that does not exist: local error (1).
    let nomod = env.admin(&["--module", "/nonexistent/libnothing.so", "token", "list"]);
    assert_eq!(nomod.code, 1);
    assert!(nomod.stderr.contains("/nonexistent/libnothing.so"));
}

#[test]
fn service_refuses_to_start_on_configuration_errors() {
    let env = TestEnv::new();
    let start = |config: &std::path::Path, extra_env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_strongroomd"));
        cmd.env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
            .env("STRONGROOM_USER_PIN", &env.user_pin)
            .arg("--config")
            .arg(config)
            .stdin(std::process::Stdio::null());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        Output::of(&mut cmd)
    };
    let good = env.config(crate::common::POLICY);
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("STRONGROOM_TOKEN", "missing-token")], "token list"),
        (&[("STRONGROOM_USER_PIN", "wrong-pin-999")], "PIN is wrong"),
        (
            &[("STRONGROOM_PKCS11_MODULE", "/nonexistent.so")],
            "hsm.module",
        ),
    ];
    for (extra, want) in cases {
        let out = start(&good, extra);
        assert_eq!(out.code, 1, "{extra:?}");
        assert!(out.stderr.contains(want), "{extra:?}: {}", out.stderr);
    }
    let bad = env.config("[limits]\nmax_value_bytes = 0\n");
    let out = start(&bad, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("max_value_bytes"), "{}", out.stderr);
    let bad_window = env.config("[audit]\ncommit_window_us = 200000\n");
    let out = start(&bad_window, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("commit_window_us"), "{}", out.stderr);
    let bad_policy =
        env.config("[[policy]]\nidentity = \"a*b\"\nprefix = \"x\"\ncapabilities = [\"read\"]\n");
    let out = start(&bad_policy, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("identity pattern"), "{}", out.stderr);
}
