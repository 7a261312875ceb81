//! Operating strongroomd: `--check-config` names what is wrong (and passes a good file),
//! `--print-config` prints the effective configuration without the PIN, `Type=notify`
//! readiness and stopping on `$NOTIFY_SOCKET`, the PIN as a systemd credential, and a
//! process that other processes cannot read.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{Output, POLICY, TestEnv, get, put};

/// `strongroomd` with the test token's environment and `args`.
fn strongroomd(env: &TestEnv, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strongroomd"));
    cmd.env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
        .env("STRONGROOM_PKCS11_MODULE", &env.module)
        .env("STRONGROOM_TOKEN", &env.label)
        .env("STRONGROOM_USER_PIN", &env.user_pin)
        .env_remove("STRONGROOM_USER_PIN_FILE")
        .env_remove("STRONGROOM_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .args(args);
    Output::of(&mut cmd)
}

fn check(env: &TestEnv, config: &Path) -> Output {
    strongroomd(env, &["--check-config", config.to_str().unwrap()])
}

#[test]
fn check_config_passes_a_good_file_and_names_the_key_of_each_problem() {
    let env = TestEnv::new();
    let good = env.config(POLICY);
    let out = check(&env, &good);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains(": ok"), "{}", out.stdout);
    let text = std::fs::read_to_string(&good).unwrap();

    // A loose private key, and a server key that is not the certificate's.
    let loose = env.dir.path().join("pki/loose-key.pem");
    std::fs::copy(env.pki.join("server-key.pem"), &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();

    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "TOML syntax",
            text.replace(
                "shutdown_grace_ms = 1000",
                "shutdown_grace_ms = 1000\nbroken = \"unclosed",
            ),
            &["line", "broken"],
        ),
        (
            "unknown key",
            text.replace("shutdown_grace_ms", "shutdown_grace"),
            &["unknown field `shutdown_grace`", "line"],
        ),
        (
            "out-of-range value",
            format!("{text}\n[audit]\nmax_batch = 0\n"),
            &["audit.max_batch"],
        ),
        (
            "bad metrics address",
            format!("{text}\n[metrics]\nlisten = \"localhost\"\n"),
            &["metrics.listen", "localhost"],
        ),
        (
            "missing certificate",
            text.replace("pki/server.pem", "pki/absent.pem"),
            &["server.cert", "absent.pem"],
        ),
        (
            "missing module",
            text.replace(
                &env.module.display().to_string(),
                "/nonexistent/libpkcs11.so",
            ),
            &["hsm.module", "/nonexistent/libpkcs11.so"],
        ),
        (
            "key not matching the certificate",
            text.replace("pki/server-key.pem", "pki/payments-key.pem"),
            &["server (cert, key, client_ca, client_crls)"],
        ),
        (
            "private key open to others",
            text.replace("pki/server-key.pem", "pki/loose-key.pem"),
            &["loose-key.pem"],
        ),
        (
            "missing audit directory",
            format!("{text}\n[audit]\npath = \"nowhere/audit.log\"\n"),
            &["audit.path", "nowhere"],
        ),
    ];
    for (what, body, says) in cases {
        let path = env.dir.path().join("broken.toml");
        std::fs::write(&path, body).unwrap();
        // The module is named by the environment in these tests; the file's value counts
        // only for the module case.
        let out = if what == "missing module" {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_strongroomd"));
            cmd.env_remove("STRONGROOM_PKCS11_MODULE")
                .env_remove("STRONGROOM_CONFIG")
                .env_remove("CREDENTIALS_DIRECTORY")
                .env("STRONGROOM_TOKEN", &env.label)
                .args(["--check-config", path.to_str().unwrap()]);
            Output::of(&mut cmd)
        } else {
            check(&env, &path)
        };
        assert_eq!(out.code, 1, "{what}: {}{}", out.stdout, out.stderr);
        for s in says {
            assert!(
                out.stderr.contains(s),
                "{what}: no {s:?} in:\n{}",
                out.stderr
            );
        }
        assert!(!out.stdout.contains(": ok"), "{what}");
    }
}

#[test]
fn print_config_shows_the_effective_values_and_never_the_pin() {
    let env = TestEnv::new();
    let pin_file = env.dir.path().join("pin");
    std::fs::write(&pin_file, format!("{}\n", env.user_pin)).unwrap();
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = env.config(POLICY);
    // The PIN in the environment: said to be set, not shown.
    let out = strongroomd(&env, &["--print-config", config.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("STRONGROOM_USER_PIN (set)"),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains(&env.user_pin),
        "the PIN leaked:\n{}",
        out.stdout
    );
    // Defaults are shown, the metrics address among them; paths are absolute.
    for s in [
        "[metrics]",
        "listen = \"127.0.0.1:9464\"",
        "max_batch = 512",
        &format!("token = \"{}\"", env.label),
        &format!("cert = \"{}\"", env.pki.join("server.pem").display()),
    ] {
        assert!(out.stdout.contains(s), "no {s:?} in:\n{}", out.stdout);
    }
    // The PIN in a file: its path, never its contents.
    let with_file = env.dir.path().join("with-pin-file.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[hsm]\n", "[hsm]\npin_file = \"pin\"\n");
    std::fs::write(&with_file, text).unwrap();
    let out = strongroomd(&env, &["--print-config", with_file.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("from file {}", pin_file.display()))
    );
    assert!(
        !out.stdout.contains(&env.user_pin),
        "the PIN leaked:\n{}",
        out.stdout
    );
    // What it prints is a configuration that checks.
    let printed = env.dir.path().join("printed.toml");
    std::fs::write(&printed, &out.stdout).unwrap();
    let out = check(&env, &printed);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
}

/// Receives one notification on `socket`, within 20 s.
fn notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn readiness_and_stopping_are_notified_and_the_pin_comes_from_a_credential() {
    let env = TestEnv::new();
    let path = env.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // The PIN as systemd hands a credential over: a file in $CREDENTIALS_DIRECTORY.
    let creds = env.dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("strongroom-pin"), &env.user_pin).unwrap();
    std::fs::set_permissions(
        creds.join("strongroom-pin"),
        std::fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    let text = std::fs::read_to_string(env.config(POLICY))
        .unwrap()
        .replace("[hsm]\n", "[hsm]\npin_credential = \"strongroom-pin\"\n");
    let config = env.dir.path().join("systemd.toml");
    std::fs::write(&config, text).unwrap();

    // Outside systemd the start says what is missing.
    let out = strongroomd(&env, &["--config", config.to_str().unwrap()]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("CREDENTIALS_DIRECTORY"),
        "{}",
        out.stderr
    );

    let server = env.start_with(
        &config,
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("CREDENTIALS_DIRECTORY", creds.to_str().unwrap()),
            // Not the PIN source any more: a wrong value here must not matter.
            ("STRONGROOM_USER_PIN", "not-the-pin"),
        ],
    );
    let ready = notification(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready.contains(&format!("STATUS=serving on {}", server.addr)),
        "{ready}"
    );
    // Ready means serving: a request succeeds at once.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = server.client("payments").await;
        client.put_secret(put("payments/a", b"v")).await.unwrap();
        client.get_secret(get("payments/a")).await.unwrap();
    });
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(notification(&socket), "STOPPING=1");
    server.stop();
}

/// Whether a process without capabilities can read `/proc/PID/environ` of `pid` (started
/// without capabilities too, as the same user): yes for a dumpable process, no for one that
/// is not.
fn environ_readable_without_capabilities(pid: u32) -> bool {
    let out = Command::new("setpriv")
        .args([
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            "cat",
            &format!("/proc/{pid}/environ"),
        ])
        .output()
        .unwrap();
    out.status.success()
}

#[test]
fn the_service_process_is_not_dumpable() {
    let env = TestEnv::new();
    let no_caps = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"];
    if Command::new("setpriv").arg("--version").output().is_err() {
        println!("SKIP: setpriv (util-linux) is not installed");
        return;
    }
    // The control: a dumpable process under the same conditions is readable, so the check
    // below can fail.
    let mut sleeper = Command::new("setpriv")
        .args(no_caps)
        .args(["sleep", "60"])
        .spawn()
        .unwrap();
    // setpriv execs sleep in place: same pid. Wait for the exec.
    let comm = format!("/proc/{}/comm", sleeper.id());
    for _ in 0..500 {
        if std::fs::read_to_string(&comm).unwrap_or_default().trim() == "sleep" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let control = environ_readable_without_capabilities(sleeper.id());
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(
        control,
        "a dumpable process must be readable: the check cannot work here"
    );

    let server = env.start_under(&no_caps, &env.config(POLICY), &[]);
    assert!(
        !environ_readable_without_capabilities(server.child.id()),
        "strongroomd's memory and environment must be closed to other processes"
    );
}
