//! The shared fixture: a fresh PKCS#11 token (its own directory), a provisioned master key,
//! a test PKI, a sled store directory, and `strongroomd` as a real process on 127.0.0.1:0.
//!
//! `STRONGROOM_TEST_TOKEN` chooses the token implementation: `softhsm2` (the default) or
//! `kryoptic` (built and cached by `scripts/kryoptic.sh`). Either way every test env has its
//! own token under `<dir>/tokens`: SoftHSM2 through `SOFTHSM2_CONF` (`<dir>/softhsm2.conf`),
//! Kryoptic through `KRYOPTIC_CONF` (`<dir>/kryoptic.conf`, one sqlite slot). Both variables
//! are set in the test process and for every binary it starts, so tests use the same API on
//! either token. Tests that depend on one implementation's files or quirks skip on the
//! other with a printed reason ([`skip_on_kryoptic`]).
//!
//! The PKCS#11 module, PINs and token label can be overridden from the environment:
//! `STRONGROOM_TEST_PKCS11_MODULE` (default: the chosen token's module),
//! `STRONGROOM_TEST_TOKEN_LABEL`, `STRONGROOM_TEST_SO_PIN`, `STRONGROOM_TEST_USER_PIN`.
//!
//! `STRONGROOM_TEST_STORE=etcd` runs the same suite on the etcd backend: each test env starts
//! its own single-member etcd over mutual TLS (see [`Etcd`]) and the configuration's `[store]`
//! names it; tests that read sled's files directly skip with a printed reason
//! ([`skip_on_etcd`]).

#![allow(dead_code, unreachable_pub)]

mod cluster;
mod etcd;
mod faults;
pub mod officers;
mod process;
mod requests;
mod server;
mod token;
mod watching;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strongroom_devpki::DevCa;
use tempfile::TempDir;

pub use cluster::*;
pub use etcd::*;
pub use process::*;
pub use requests::*;
pub use server::*;
pub use token::*;
pub use watching::*;

/// The time now in Unix seconds, as the service stamps records.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Identities of the test PKI, by certificate file stem.
pub const PAYMENTS: &str = "spiffe://strongroom.test/payments";
pub const READER: &str = "spiffe://strongroom.test/reader";
pub const OPS: &str = "spiffe://strongroom.test/ops";
pub const STRANGER: &str = "spiffe://strongroom.test/stranger";
/// Officers of the admin CA; alice, bob and carol are listed in `admin.officers`, mallory
/// holds a valid admin-CA certificate but is not an officer.
pub const ALICE: &str = "alice.officers.strongroom.test";
pub const BOB: &str = "bob.officers.strongroom.test";
pub const CAROL: &str = "carol.officers.strongroom.test";
pub const MALLORY: &str = "mallory.officers.strongroom.test";

/// The admin section of the tests: three officers, quorum 2.
pub const ADMIN: &str = r#"
[admin]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"
ca = "pki/admin-ca.pem"
officers = ["alice.officers.strongroom.test", "bob.officers.strongroom.test", "carol.officers.strongroom.test"]
quorum = 2
"#;

/// The default policy of the tests:
/// - payments: everything under `payments`;
/// - reader: read under `payments/db`;
/// - ops: list everything, read nothing;
/// - stranger: nothing.
pub const POLICY: &str = r#"
[[policy]]
identity = "spiffe://strongroom.test/payments"
prefix = "payments"
capabilities = ["read", "write", "list", "delete"]

[[policy]]
identity = "spiffe://strongroom.test/reader"
prefix = "payments/db"
capabilities = ["read"]

[[policy]]
identity = "spiffe://strongroom.test/ops"
prefix = ""
capabilities = ["list"]
"#;

pub struct TestEnv {
    pub dir: TempDir,
    /// The token implementation (`STRONGROOM_TEST_TOKEN`).
    pub token: Token,
    pub module: PathBuf,
    pub label: String,
    pub so_pin: String,
    pub user_pin: String,
    pub pki: PathBuf,
    pub store: PathBuf,
    /// The test's own etcd, when the suite runs on etcd.
    pub etcd: Option<Etcd>,
}

impl TestEnv {
    /// A fresh token with one master key, and a fresh PKI.
    pub fn new() -> Self {
        let env = Self::with_token();
        env.admin(&["key", "generate"]).assert_ok();
        env
    }

    /// Like [`TestEnv::new`], on its own etcd whatever `STRONGROOM_TEST_STORE` says.
    pub fn on_etcd() -> Self {
        let mut env = Self::new();
        if env.etcd.is_none() {
            env.etcd = Some(Etcd::start(env.dir.path(), &env.pki));
        }
        env
    }

    /// A fresh, initialised token without a master key.
    pub fn with_token() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).expect("token dir");
        write_token_confs(dir.path(), &tokens);
        // This process may load the module too (invariant tests): point it at our token.
        set_token_conf("SOFTHSM2_CONF", &dir.path().join("softhsm2.conf"));
        set_token_conf("KRYOPTIC_CONF", &dir.path().join("kryoptic.conf"));
        let token = Token::from_env();
        let module: PathBuf = std::env::var_os("STRONGROOM_TEST_PKCS11_MODULE")
            .map(PathBuf::from)
            .unwrap_or_else(|| token.default_module());
        assert!(
            module.exists(),
            "{} module {} is missing (for Kryoptic run scripts/kryoptic.sh; for SoftHSM2 \
             scripts/deps.sh)",
            token.name(),
            module.display()
        );
        let mut env = TestEnv {
            token,
            module,
            label: env_or("STRONGROOM_TEST_TOKEN_LABEL", "strongroom-test"),
            so_pin: env_or("STRONGROOM_TEST_SO_PIN", "so-pin-0000"),
            user_pin: env_or("STRONGROOM_TEST_USER_PIN", "user-pin-0000"),
            pki: dir.path().join("pki"),
            store: dir.path().join("store"),
            etcd: None,
            dir,
        };
        env.write_pki();
        if store_is_etcd() {
            env.etcd = Some(Etcd::start(env.dir.path(), &env.pki));
        }
        env.admin(&["token", "init", "--label", &env.label])
            .assert_ok();
        env
    }

    /// Moves the token's storage to `tokens` (a directory the caller filled, e.g. on a
    /// simulated disk): rewrites both token configurations to point there.
    pub fn point_tokens_at(&self, tokens: &Path) {
        write_token_confs(self.dir.path(), tokens);
    }

    /// Writes the test PKI; every private key (`*-key.pem`) with mode 0600, as strongroomd
    /// requires of its own key.
    fn write_pki(&self) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(&self.pki).unwrap();
        let server_ca = DevCa::new("test server CA").unwrap();
        let client_ca = DevCa::new("test client CA").unwrap();
        let foreign_ca = DevCa::new("foreign CA").unwrap();
        let admin_ca = DevCa::new("test admin CA").unwrap();
        let write = |name: &str, body: &str| {
            let mode = if name.ends_with("-key.pem") {
                0o600
            } else {
                0o644
            };
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(self.pki.join(name))
                .unwrap()
                .write_all(body.as_bytes())
                .unwrap();
        };
        write("server-ca.pem", &server_ca.cert_pem());
        write("client-ca.pem", &client_ca.cert_pem());
        write("admin-ca.pem", &admin_ca.cert_pem());
        let server = server_ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        write("server.pem", &server.cert_pem);
        write("server-key.pem", &server.key_pem);
        for (stem, id, ca) in [
            ("payments", PAYMENTS, &client_ca),
            ("reader", READER, &client_ca),
            ("ops", OPS, &client_ca),
            ("stranger", STRANGER, &client_ca),
            // Same identity as payments, issued by a CA the server does not trust.
            ("foreign", PAYMENTS, &foreign_ca),
            ("alice", ALICE, &admin_ca),
            ("bob", BOB, &admin_ca),
            ("carol", CAROL, &admin_ca),
            ("mallory", MALLORY, &admin_ca),
            // An officer's identity, but from the client CA.
            ("alice-client-ca", ALICE, &client_ca),
        ] {
            let c = ca.issue_client(id).unwrap();
            write(&format!("{stem}.pem"), &c.cert_pem);
            write(&format!("{stem}-key.pem"), &c.key_pem);
        }
        // Payments' identity from the client CA, valid only in 2000.
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(PAYMENTS.try_into().unwrap())];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let expired = client_ca.sign(params, "expired payments").unwrap();
        write("expired-client.pem", &expired.cert_pem);
        write("expired-client-key.pem", &expired.key_pem);
    }

    /// Environment shared by the binaries.
    fn apply_env(&self, cmd: &mut Command) {
        cmd.env("SOFTHSM2_CONF", self.dir.path().join("softhsm2.conf"))
            .env("KRYOPTIC_CONF", self.dir.path().join("kryoptic.conf"))
            .env("STRONGROOM_PKCS11_MODULE", &self.module)
            .env("STRONGROOM_TOKEN", &self.label)
            .env("STRONGROOM_SO_PIN", &self.so_pin)
            .env("STRONGROOM_USER_PIN", &self.user_pin)
            .env_remove("STRONGROOM_USER_PIN_FILE")
            .env_remove("STRONGROOM_CONFIG")
            .stdin(Stdio::null());
    }

    /// Runs `strongroom-admin` with `args`.
    pub fn admin(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strongroom-admin"));
        self.apply_env(&mut cmd);
        Output::of(cmd.args(args))
    }

    /// Writes a service configuration with `extra` appended (policy, limits).
    pub fn config(&self, extra: &str) -> PathBuf {
        self.config_file("strongroomd.toml", "", extra)
    }

    /// The configuration of replica `id` (`server.replica_id`), with its own audit log
    /// (`audit-<id>.log`) and `extra` appended after `[store]` (store keys first, then
    /// sections); written to `strongroomd-<id>.toml`.
    pub fn replica_config(&self, id: &str, extra: &str) -> PathBuf {
        self.config_file(
            &format!("strongroomd-{id}.toml"),
            &format!("replica_id = \"{id}\"\n"),
            &format!("{extra}\n[audit]\npath = \"audit-{id}.log\"\n"),
        )
    }

    /// Writes `file` (in the test's directory): `[server]` with `server_extra` keys, the
    /// token, the store, then `extra`.
    pub fn config_file(&self, file: &str, server_extra: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/client-ca.pem"
shutdown_grace_ms = 1000
{server_extra}

[hsm]
module = "{module}"
token = "{label}"
request_timeout_ms = 5000

{store}
{extra}
"#,
            module = self.module.display(),
            label = self.label,
            store = self.store_section(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The `[store]` section of the test's backend (extra keys may follow it).
    pub fn store_section(&self) -> String {
        match &self.etcd {
            None => "[store]\npath = \"store\"".into(),
            Some(etcd) => format!(
                "[store]\nbackend = \"etcd\"\nendpoints = [\"{}\"]\nca = \"pki/etcd-ca.pem\"\n\
                 cert = \"pki/etcd-client.pem\"\nkey = \"pki/etcd-client-key.pem\"\n\
                 etcd_timeout_ms = 2000",
                etcd.url
            ),
        }
    }

    /// Starts `strongroomd` with the default policy.
    pub fn start(&self) -> Server {
        self.start_with(&self.config(POLICY), &[])
    }

    /// Starts `strongroomd` with the default policy and the admin plane.
    pub fn start_admin(&self) -> Server {
        self.start_with(&self.config(&format!("{ADMIN}\n{POLICY}")), &[])
    }

    /// The audit log of the default configuration.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// A `strongroom-admin` command for the admin plane of `server`, as officer `stem`.
    pub fn admin_cli(&self, server: &Server, stem: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strongroom-admin"));
        self.apply_env(&mut cmd);
        cmd.env(
            "STRONGROOM_ADMIN_ADDR",
            format!("https://{}", server.admin_addr.as_deref().unwrap_or("")),
        )
        .env("STRONGROOM_ADMIN_CACERT", self.pki.join("server-ca.pem"))
        .env(
            "STRONGROOM_ADMIN_CERT",
            self.pki.join(format!("{stem}.pem")),
        )
        .env(
            "STRONGROOM_ADMIN_KEY",
            self.pki.join(format!("{stem}-key.pem")),
        )
        .env("STRONGROOM_ADMIN_SERVER_NAME", "localhost")
        .env_remove("STRONGROOM_FORMAT");
        cmd
    }

    /// Runs `strongroomd` with `config` expecting it to refuse to start: its exit code and
    /// output (within `limit`, else a panic: a hang is a failure here).
    pub fn refused_start_within(&self, config: &Path, limit: Duration) -> Output {
        let mut child = {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_strongroomd"));
            self.apply_env(&mut cmd);
            cmd.arg("--config")
                .arg(config)
                .env("STRONGROOM_LOG", "info")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn strongroomd")
        };
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > limit {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "strongroomd still running after {limit:?}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
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

    /// Starts `strongroomd` with a configuration and extra environment.
    pub fn start_with(&self, config: &Path, env: &[(&str, &str)]) -> Server {
        self.start_under(&[], config, env)
    }

    /// Starts `strongroomd` as the last argument of `wrapper` (e.g. `prlimit --nofile=…`).
    pub fn start_under(&self, wrapper: &[&str], config: &Path, env: &[(&str, &str)]) -> Server {
        let log = self.dir.path().join(format!(
            "strongroomd-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(env!("CARGO_BIN_EXE_strongroomd"));
                cmd
            }
            None => Command::new(env!("CARGO_BIN_EXE_strongroomd")),
        };
        self.apply_env(&mut cmd);
        cmd.arg("--config")
            .arg(config)
            .env("STRONGROOM_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn strongroomd");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let addr = match lines.next() {
            Some(Ok(line)) if line.starts_with("listening on ") => {
                line["listening on ".len()..].to_owned()
            }
            other => {
                let _ = child.wait();
                panic!(
                    "strongroomd did not start ({other:?}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let has_admin = std::fs::read_to_string(config)
            .unwrap_or_default()
            .contains("[admin]");
        let admin_addr = if has_admin {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("admin listening on ") => {
                    Some(line["admin listening on ".len()..].to_owned())
                }
                other => panic!("no admin listener line: {other:?}"),
            }
        } else {
            None
        };
        Server {
            child,
            addr,
            admin_addr,
            log,
            pki: self.pki.clone(),
        }
    }

    /// Starts `strongroomd` with `config` where it must refuse to start: panics if it
    /// listens; returns its exit code and everything it logged.
    pub fn refused_start(&self, config: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
        let log = self.dir.path().join(format!(
            "strongroomd-refused-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strongroomd"));
        self.apply_env(&mut cmd);
        cmd.arg("--config")
            .arg(config)
            .env("STRONGROOM_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn strongroomd");
        let stdout = child.stdout.take().unwrap();
        // The first line is "listening on …" if it started; end of file if it exited.
        let first = BufReader::new(stdout).lines().next();
        if let Some(Ok(line)) = first {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "strongroomd started ({line}) where it must refuse:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let status = child.wait().unwrap();
        (
            status.code(),
            std::fs::read_to_string(&log).unwrap_or_default(),
        )
    }

    /// A `strongroom` CLI command for `server`, as the client `stem`.
    pub fn cli(&self, server: &Server, stem: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strongroom"));
        self.client_env(&mut cmd, server, stem)
            .env_remove("STRONGROOM_FORMAT");
        cmd
    }

    /// The failover client's TLS settings as the client certificate `stem` of the test PKI.
    pub fn client_tls(&self, stem: &str) -> strongroom::client::ClientTls {
        strongroom::client::ClientTls {
            server_ca: self.pki.join("server-ca.pem"),
            cert: self.pki.join(format!("{stem}.pem")),
            key: self.pki.join(format!("{stem}-key.pem")),
            server_name: Some("localhost".into()),
        }
    }

    /// The client environment of the `strongroom` tool and the examples, on `cmd`: `server`'s
    /// address, the test PKI's server CA, and the client certificate `stem`.
    pub fn client_env<'c>(
        &self,
        cmd: &'c mut Command,
        server: &Server,
        stem: &str,
    ) -> &'c mut Command {
        self.client_env_at(cmd, &format!("https://{}", server.addr), stem)
    }

    /// [`TestEnv::client_env`] with `STRONGROOM_ADDR` set to `addr` as given (one address or
    /// several, comma-separated; reachable or not).
    pub fn client_env_at<'c>(
        &self,
        cmd: &'c mut Command,
        addr: &str,
        stem: &str,
    ) -> &'c mut Command {
        cmd.env("STRONGROOM_ADDR", addr)
            .env("STRONGROOM_CACERT", self.pki.join("server-ca.pem"))
            .env(
                "STRONGROOM_CLIENT_CERT",
                self.pki.join(format!("{stem}.pem")),
            )
            .env(
                "STRONGROOM_CLIENT_KEY",
                self.pki.join(format!("{stem}-key.pem")),
            )
            .env("STRONGROOM_SERVER_NAME", "localhost")
    }
}
