//! The command lines as people meet them: help texts and common errors locked by trycmd
//! snapshots (tests/cmd/), completions for bash, zsh and fish, man pages, the officers'
//! PKI commands, readable times, errors that name what is missing, and the service binary
//! free of the certificate-making code (rcgen).

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::common::{Output, TestEnv, run_with_stdin, skip_on_etcd};

const BINS: [(&str, &str); 3] = [
    ("strongroom", env!("CARGO_BIN_EXE_strongroom")),
    ("strongroom-admin", env!("CARGO_BIN_EXE_strongroom-admin")),
    ("strongroomd", env!("CARGO_BIN_EXE_strongroomd")),
];

/// Help texts and usage errors, as snapshots (regenerate with `TRYCMD=overwrite`).
#[test]
fn help_texts_and_common_errors_match_their_snapshots() {
    let cases = trycmd::TestCases::new();
    for (name, path) in BINS {
        cases.register_bin(name, std::path::Path::new(path));
    }
    cases.case("tests/cmd/*.toml");
}

#[test]
fn completions_generate_for_bash_zsh_and_fish() {
    for (name, path) in BINS {
        for shell in ["bash", "zsh", "fish"] {
            let mut cmd = Command::new(path);
            if name == "strongroomd" {
                cmd.args(["--completions", shell]);
            } else {
                cmd.args(["completions", shell]);
            }
            let out = Output::of(cmd.env_remove("STRONGROOM_CONFIG"));
            out.assert_ok();
            assert!(
                out.stdout.contains(name),
                "{name} {shell}: the script does not name the binary"
            );
            // Every script knows the binary's own flags and subcommands.
            let needle = match name {
                "strongroom" => "describe",
                "strongroom-admin" => "issue-officer",
                _ => "config",
            };
            assert!(
                out.stdout.contains(needle),
                "{name} {shell}: no {needle} in\n{}",
                out.stdout
            );
        }
    }
    let bad = Output::of(Command::new(BINS[0].1).args(["completions", "tcsh"]));
    assert_eq!(bad.code, 1, "{}", bad.stderr);
}

#[test]
fn man_pages_are_written_for_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = Output::of(
        Command::new(BINS[1].1)
            .args(["man", "--out"])
            .arg(dir.path()),
    );
    out.assert_ok();
    for page in [
        "strongroom-admin.1",
        "strongroom-admin-pki-issue-officer.1",
        "strongroom-admin-audit-search.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
    }
    let out = Output::of(Command::new(BINS[2].1).arg("--man").arg(dir.path()));
    out.assert_ok();
    assert!(dir.path().join("strongroomd.1").exists());
}

/// rcgen (certificate generation) is linked into the admin tool, never into the service.
#[test]
fn strongroomd_does_not_link_rcgen() {
    let linked = |path: &str| {
        let bytes = std::fs::read(path).unwrap();
        // Symbol names and debug info name the crate.
        String::from_utf8_lossy(&bytes).contains("rcgen")
    };
    assert!(
        linked(BINS[1].1),
        "the check cannot see rcgen even in strongroom-admin, which uses it"
    );
    assert!(!linked(BINS[2].1), "strongroomd links rcgen");
    assert!(!linked(BINS[0].1), "strongroom links rcgen");
}

#[test]
fn pki_issues_officers_from_a_kept_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let admin =
        |args: &[&str]| Output::of(Command::new(BINS[1].1).args(args).arg("--dir").arg(&pki));
    admin(&["pki", "init-ca"]).assert_ok();
    let mode = |f: &str| std::fs::metadata(pki.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("admin-ca-key.pem"), 0o600);
    // The CA is never replaced.
    let again = admin(&["pki", "init-ca"]);
    assert_eq!(again.code, 1);
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
    for name in ["alice", "bob"] {
        let out = admin(&["pki", "issue-officer", name, "--format", "json"]);
        out.assert_ok();
        let j: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
        assert_eq!(j["identity"], format!("{name}.officers.strongroom"));
        assert_eq!(mode(&format!("{name}-key.pem")), 0o600);
    }
    let bad = admin(&["pki", "issue-officer", "not a name"]);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("letters, digits"), "{}", bad.stderr);
}

#[test]
fn times_are_rfc3339_and_filters_take_rfc3339_or_durations() {
    let env = TestEnv::new();
    let server = env.start();
    let cli = |args: &[&str]| Output::of(env.cli(&server, "payments").args(args));
    let sent = crate::common::unix_now();
    run_with_stdin(
        env.cli(&server, "payments")
            .args(["put", "payments/t", "--ttl", "3600"]),
        b"v",
    )
    .assert_ok();
    let answered = crate::common::unix_now();
    let described = cli(&["describe", "payments/t"]);
    described.assert_ok();
    let row = described.stdout.lines().nth(2).unwrap();
    // CREATED and EXPIRES are RFC 3339.
    let times: Vec<&str> = row
        .split_whitespace()
        .filter(|w| w.len() == 20 && w.ends_with('Z') && w.as_bytes()[10] == b'T')
        .collect();
    assert_eq!(times.len(), 2, "{}", described.stdout);
    let j = cli(&["describe", "payments/t", "--format", "json"]);
    let j: serde_json::Value = serde_json::from_str(j.stdout.trim()).unwrap();
    let v = &j["versions"][0];
    assert_eq!(v["created_at"], times[0]);
    assert_eq!(v["expires_at"], times[1]);
    // The server stamps the creation; `--ttl` counts from the tool's clock when it sent the
    // put, so the two can fall on either side of a second's boundary: both lie within the
    // call, the expiry exactly an hour after a moment of it.
    let (created, expires) = (
        v["created_at_unix"].as_i64().unwrap(),
        v["expires_at_unix"].as_i64().unwrap(),
    );
    assert!(
        (sent..=answered).contains(&created),
        "{created} not in {sent}..={answered}"
    );
    assert!(
        (sent + 3600..=answered + 3600).contains(&expires),
        "{expires} not an hour after {sent}..={answered}"
    );
    // An empty listing says so on stderr, exit 0.
    let empty = cli(&["list", "payments/none/"]);
    empty.assert_ok();
    assert_eq!(empty.stdout, "");
    assert!(
        empty.stderr.contains("no secrets under"),
        "{}",
        empty.stderr
    );
    let created = v["created_at"].as_str().unwrap().to_owned();
    drop(server);

    let log = env.audit_log();
    let search = |since: &str| {
        let out = env.admin(&[
            "audit",
            "search",
            log.to_str().unwrap(),
            "--name",
            "payments/t",
            "--since",
            since,
        ]);
        out.assert_ok();
        out
    };
    // The put's entry: found from its own second on, and from an hour ago.
    let found = search(&created);
    assert!(found.stdout.contains("payments/t"), "{}", found.stdout);
    assert!(
        found.stdout.contains(&created[..17]),
        "entries show RFC 3339: {}",
        found.stdout
    );
    assert!(search("1h").stdout.contains("payments/t"));
    let none = search("2099-01-01T00:00:00+01:00");
    assert_eq!(none.stdout, "");
    assert!(none.stderr.contains("no entry"), "{}", none.stderr);
    let bad = env.admin(&["audit", "search", log.to_str().unwrap(), "--until", "soon"]);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("RFC 3339"), "{}", bad.stderr);
}

#[tokio::test]
async fn admin_errors_name_what_is_missing() {
    let env = TestEnv::new();
    let server = env.start_admin();
    let admin = |args: &[&str]| Output::of(env.admin_cli(&server, "alice").args(args));
    let unknown = admin(&["approve", "0123456789abcdef"]);
    assert_eq!(unknown.code, 2);
    assert!(
        unknown
            .stderr
            .contains("approval 0123456789abcdef does not exist"),
        "{}",
        unknown.stderr
    );
    assert!(!unknown.stderr.contains("secret"), "{}", unknown.stderr);
    let policy = admin(&["policy", "get", "nope"]);
    assert_eq!(policy.code, 2);
    assert!(
        policy.stderr.contains("policy 'nope' does not exist"),
        "{}",
        policy.stderr
    );
    let empty = admin(&["approval", "list"]);
    empty.assert_ok();
    assert_eq!(empty.stdout, "");
    assert!(
        empty.stderr.contains("no pending approvals"),
        "{}",
        empty.stderr
    );
    let json = admin(&["approval", "list", "--format", "json"]);
    json.assert_ok();
    assert_eq!(json.stdout.trim(), "[]");
}

#[test]
fn a_second_service_on_the_same_sled_store_is_told_who_holds_it() {
    if skip_on_etcd("sled's lock on its files") {
        return;
    }
    let env = TestEnv::new();
    let _first = env.start();
    let config = env.config(crate::common::POLICY);
    let out = env.refused_start_within(&config, std::time::Duration::from_secs(30));
    assert!(
        out.stderr.contains("another process holds the store") && out.stderr.contains("db"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("WouldBlock"), "{}", out.stderr);
}

#[test]
fn environment_overrides_are_reported_and_a_failed_start_leaves_no_store() {
    let env = TestEnv::new();
    let config = env.config(crate::common::POLICY);
    let (code, text) = env.refused_start(&config, &[("STRONGROOM_TOKEN", "no-such-token")]);
    assert_ne!(code, Some(0));
    assert!(
        text.contains("STRONGROOM_TOKEN") && text.contains("hsm.token"),
        "the log and the error name the variable: {text}"
    );
    assert!(
        text.contains("the token was chosen by STRONGROOM_TOKEN"),
        "{text}"
    );
    if skip_on_etcd("a sled store's directory") {
        return;
    }
    // A start that fails after the store was created (the audit log cannot be opened).
    let config = env.config(&format!(
        "{}\n[audit]\npath = \"/proc/strongroom-no-such-dir/audit.log\"\n",
        crate::common::POLICY
    ));
    let (code, text) = env.refused_start(&config, &[]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("audit"), "{text}");
    let store = env.dir.path().join("store");
    assert!(
        !store.exists(),
        "a failed start left {}: {text}",
        store.display()
    );
}
