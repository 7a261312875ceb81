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

/// Sets `path`'s permission bits.
fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs strongroomd with `config` until it exits (it must refuse to start; a start fails
/// the test after a minute).
fn start_refused(env: &TestEnv, config: &std::path::Path, extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_strongroomd"));
    cmd.env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
        .env("STRONGROOM_USER_PIN", &env.user_pin)
        .env_remove("STRONGROOM_USER_PIN_FILE")
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    crate::refusals::run_bounded(&mut cmd, std::time::Duration::from_secs(60))
}

#[test]
fn service_refuses_private_files_open_to_group_or_others() {
    let env = TestEnv::new();
    let config = env.config(crate::common::POLICY);
    let pin = env.dir.path().join("user.pin");
    std::fs::write(&pin, format!("{}\n", env.user_pin)).unwrap();
    let pin_env = [("STRONGROOM_USER_PIN_FILE", pin.to_str().unwrap())];

    // A group-readable PIN file.
    chmod(&pin, 0o640);
    let out = start_refused(&env, &config, &pin_env);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("PIN file"), "{}", out.stderr);
    assert!(out.stderr.contains("readable by group"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("chmod 600 {}", pin.display())),
        "{}",
        out.stderr
    );

    // A world-readable server key (the PIN file is private again).
    chmod(&pin, 0o600);
    let key = env.pki.join("server-key.pem");
    chmod(&key, 0o644);
    let out = start_refused(&env, &config, &pin_env);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("server private key"), "{}", out.stderr);
    assert!(
        out.stderr.contains("readable by group and others"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&format!("chmod 600 {}", key.display())),
        "{}",
        out.stderr
    );

    // The admin listener's key too (server key private again, admin key group-writable).
    chmod(&key, 0o600);
    let admin_key = env.dir.path().join("admin-key.pem");
    std::fs::copy(&key, &admin_key).unwrap();
    chmod(&admin_key, 0o620);
    let admin_config = env.config(&format!(
        "{}\n{}",
        crate::common::ADMIN.replace("pki/server-key.pem", "admin-key.pem"),
        crate::common::POLICY
    ));
    let out = start_refused(&env, &admin_config, &pin_env);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("admin listener's private key"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("writable by group"), "{}", out.stderr);

    // With every file private, the same configuration starts.
    chmod(&admin_key, 0o600);
    let server = env.start_with(&admin_config, &pin_env);
    assert!(
        !server.log_text().contains("chmod"),
        "{}",
        server.log_text()
    );
}

#[test]
fn loose_file_modes_are_a_warning_when_dangerously_allowed() {
    let env = TestEnv::new();
    let pin = env.dir.path().join("user.pin");
    std::fs::write(&pin, &env.user_pin).unwrap();
    chmod(&pin, 0o644);
    let key = env.pki.join("server-key.pem");
    chmod(&key, 0o640);
    let config = env.config(crate::common::POLICY);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "shutdown_grace_ms = 1000",
        "shutdown_grace_ms = 1000\ndangerous_allow_loose_file_modes = true",
    );
    std::fs::write(&config, text).unwrap();
    let server = env.start_with(
        &config,
        &[("STRONGROOM_USER_PIN_FILE", pin.to_str().unwrap())],
    );
    let log = server.log_text();
    assert!(log.contains("DANGEROUS"), "{log}");
    assert!(log.contains("dangerous_allow_loose_file_modes"), "{log}");
    assert!(
        log.contains(&format!("chmod 600 {}", pin.display())),
        "{log}"
    );
    assert!(
        log.contains(&format!("chmod 600 {}", key.display())),
        "{log}"
    );

    // And it serves: the tools warn about their own loose key and go on.
    let client_key = env.pki.join("payments-key.pem");
    chmod(&client_key, 0o644);
    let put = run_with_stdin(
        env.cli(&server, "payments").args(["put", "payments/loose"]),
        b"v",
    );
    put.assert_ok();
    assert!(put.stderr.contains("warning:"), "{}", put.stderr);
    assert!(put.stderr.contains("client private key"), "{}", put.stderr);
    assert!(
        put.stderr
            .contains(&format!("chmod 600 {}", client_key.display())),
        "{}",
        put.stderr
    );
    let quiet = Output::of(env.cli(&server, "reader").args(["get", "payments/loose"]));
    assert!(!quiet.stderr.contains("warning:"), "{}", quiet.stderr);
}

#[test]
fn officer_tool_warns_about_a_loose_pin_file_and_goes_on() {
    let env = TestEnv::new();
    let pin = env.dir.path().join("user.pin");
    std::fs::write(&pin, &env.user_pin).unwrap();
    chmod(&pin, 0o604);
    let out = env.admin(&["--user-pin-file", pin.to_str().unwrap(), "key", "list"]);
    out.assert_ok();
    assert!(
        out.stderr.contains("warning: the PIN file"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("readable by others"), "{}", out.stderr);
    assert!(out.stdout.contains("strongroom-mk-1"), "{}", out.stdout);
}
