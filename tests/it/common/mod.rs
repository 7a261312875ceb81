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

mod faults;
pub mod officers;
mod watching;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom_devpki::DevCa;
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};

mod cluster;
pub use cluster::*;
pub use watching::*;

/// Points this process's token module at the test's own token (read at C_Initialize):
/// `SOFTHSM2_CONF` or `KRYOPTIC_CONF`.
#[allow(unsafe_code)]
fn set_token_conf(var: &str, conf: &Path) {
    // SAFETY: called from the test's own thread before it loads the PKCS#11 module or starts
    // any other thread that reads the environment; nextest runs each test in its own process.
    unsafe { std::env::set_var(var, conf) };
}

/// The PKCS#11 implementation the suite runs on (`STRONGROOM_TEST_TOKEN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// SoftHSM2 2.6 (Debian's `softhsm2`), the default.
    SoftHsm2,
    /// Kryoptic (the `kryoptic` crate), built by `scripts/kryoptic.sh`.
    Kryoptic,
}

/// The Kryoptic version `scripts/kryoptic.sh` builds (keep the two in step).
pub const KRYOPTIC_VERSION: &str = "1.5.4";

impl Token {
    /// From `STRONGROOM_TEST_TOKEN` (`softhsm2` when unset); an unknown name fails the test.
    pub fn from_env() -> Token {
        match std::env::var("STRONGROOM_TEST_TOKEN").as_deref() {
            Err(_) | Ok("") | Ok("softhsm2") => Token::SoftHsm2,
            Ok("kryoptic") => Token::Kryoptic,
            Ok(other) => {
                panic!("STRONGROOM_TEST_TOKEN={other}: expected softhsm2 or kryoptic")
            }
        }
    }

    /// The module's default path.
    pub fn default_module(self) -> PathBuf {
        match self {
            Token::SoftHsm2 => "/usr/lib/softhsm/libsofthsm2.so".into(),
            Token::Kryoptic => {
                let cache = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
                    .unwrap_or_else(|| PathBuf::from("/root/.cache"));
                cache
                    .join("strongroom")
                    .join(format!("kryoptic-{KRYOPTIC_VERSION}"))
                    .join("libkryoptic_pkcs11.so")
            }
        }
    }

    /// The name people know it by, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Token::SoftHsm2 => "SoftHSM2",
            Token::Kryoptic => "Kryoptic",
        }
    }
}

/// True (and prints why) when the suite runs on Kryoptic: for tests that depend on SoftHSM2's
/// token files or SoftHSM2-only behaviour.
pub fn skip_on_kryoptic(why: &str) -> bool {
    if Token::from_env() == Token::Kryoptic {
        println!("skipped on Kryoptic: {why}");
        true
    } else {
        false
    }
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

/// Writes `<dir>/softhsm2.conf` and `<dir>/kryoptic.conf`, both keeping their token in
/// `tokens` (SoftHSM2: a folder per token; Kryoptic: one sqlite file, `token.sql`). Both are
/// written whatever the token, so a test may name either file.
fn write_token_confs(dir: &Path, tokens: &Path) {
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-config/softhsm2.conf.template"),
    )
    .expect("softhsm template");
    std::fs::write(
        dir.join("softhsm2.conf"),
        template.replace("@TOKENDIR@", tokens.to_str().unwrap()),
    )
    .expect("softhsm conf");
    std::fs::write(
        dir.join("kryoptic.conf"),
        format!(
            "[[slots]]\nslot = 1\ndescription = \"strongroom test token\"\n\
             dbtype = \"sqlite\"\ndbargs = \"{}\"\n",
            tokens.join("token.sql").display()
        ),
    )
    .expect("kryoptic conf");
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
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
        cmd.env("STRONGROOM_ADDR", format!("https://{}", server.addr))
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

/// A running `strongroomd`; killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub admin_addr: Option<String>,
    pub log: PathBuf,
    pki: PathBuf,
}

impl Server {
    /// A gRPC client authenticated as `stem` (a certificate of the test PKI).
    pub async fn client(&self, stem: &str) -> SecretServiceClient<Channel> {
        self.try_client(Some(stem)).await.expect("connect")
    }

    /// SecretService's health as the standard health service reports it (`Serving`,
    /// `NotServing`), asked as payments.
    pub async fn health(&self) -> String {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let channel = self.channel(&self.addr, Some("payments")).await.unwrap();
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "strongroom.v1.SecretService".into(),
            })
            .await
            .unwrap()
            .into_inner();
        format!("{:?}", ServingStatus::try_from(r.status).unwrap())
    }

    /// A client with the given certificate stem, or none; the error if the handshake fails.
    pub async fn try_client(
        &self,
        stem: Option<&str>,
    ) -> Result<SecretServiceClient<Channel>, tonic::transport::Error> {
        let channel = self.channel(&self.addr, stem).await?;
        Ok(SecretServiceClient::new(channel))
    }

    /// An AdminService client authenticated as `stem`.
    pub async fn admin(
        &self,
        stem: &str,
    ) -> strongroom::proto::admin_service_client::AdminServiceClient<Channel> {
        self.try_admin(Some(stem))
            .await
            .expect("connect to the admin listener")
    }

    /// An AdminService client with the given certificate stem, or none.
    pub async fn try_admin(
        &self,
        stem: Option<&str>,
    ) -> Result<
        strongroom::proto::admin_service_client::AdminServiceClient<Channel>,
        tonic::transport::Error,
    > {
        let addr = self
            .admin_addr
            .as_deref()
            .expect("the admin plane is configured");
        let channel = self.channel(addr, stem).await?;
        Ok(strongroom::proto::admin_service_client::AdminServiceClient::new(channel))
    }

    /// A TLS channel to `addr` with the given client certificate stem, or none.
    pub async fn channel(
        &self,
        addr: &str,
        stem: Option<&str>,
    ) -> Result<Channel, tonic::transport::Error> {
        let ca = tonic::transport::Certificate::from_pem(
            std::fs::read(self.pki.join("server-ca.pem")).unwrap(),
        );
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(ca)
            .domain_name("localhost");
        if let Some(stem) = stem {
            let cert = std::fs::read(self.pki.join(format!("{stem}.pem"))).unwrap();
            let key = std::fs::read(self.pki.join(format!("{stem}-key.pem"))).unwrap();
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
    }

    /// The service's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` at least `times` times; panics with the log after
    /// `limit`.
    pub fn wait_for_log(&self, needle: &str, times: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.log_text().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} ×{times} in the log within {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Freezes the process (SIGSTOP): its connections stay open and nothing runs.
    pub fn pause(&self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-STOP", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Thaws a paused process (SIGCONT).
    pub fn resume(&self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-CONT", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Stops the service with SIGTERM and waits for it.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Officers alice and bob accept the store's state under dual control, after checking that
/// its rollback check flagged it for a problem that mentions `problem`.
pub async fn accept_store_state(server: &Server, problem: &str) {
    use strongroom::proto::{AcceptStoreStateRequest, ApproveRequest, StatusRequest};
    let mut alice = server.admin("alice").await;
    let status = alice.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(
        status.store_rollback.contains(problem),
        "expected the store flagged for {problem:?}: {:?}\n{}",
        status.store_rollback,
        server.log_text()
    );
    let id = alice
        .accept_store_state(AcceptStoreStateRequest {})
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap()
        .id;
    let done = server
        .admin("bob")
        .await
        .approve(ApproveRequest { id })
        .await
        .unwrap()
        .into_inner();
    assert!(done.executed, "{done:?}");
}

/// The outcome of a command.
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn of(cmd: &mut Command) -> Self {
        let out = cmd.output().expect("run command");
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn assert_ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "command failed\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs a command with `input` on stdin.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A PutSecret request: `value` under `name`, no check-and-set, no expiry.
pub fn put(name: &str, value: &[u8]) -> strongroom::proto::PutSecretRequest {
    strongroom::proto::PutSecretRequest {
        name: name.into(),
        value: value.to_vec(),
        expected_version: None,
        expires_at_unix: None,
        protection: 0,
        ..Default::default()
    }
}

/// A GetSecret request for the latest version of `name`.
pub fn get(name: &str) -> strongroom::proto::GetSecretRequest {
    get_at(name, 0)
}

/// A GetSecret request for `version` of `name` (0: the latest).
pub fn get_at(name: &str, version: u64) -> strongroom::proto::GetSecretRequest {
    strongroom::proto::GetSecretRequest {
        name: name.into(),
        version,
    }
}

/// A ListSecrets request for the first page under `prefix`, default page size.
pub fn list(prefix: &str) -> strongroom::proto::ListSecretsRequest {
    strongroom::proto::ListSecretsRequest {
        prefix: prefix.into(),
        page_size: 0,
        page_token: String::new(),
        ..Default::default()
    }
}

/// The services a channel's server reflection lists, sorted.
pub async fn reflected_services(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

/// Whether the suite runs on the etcd backend (`STRONGROOM_TEST_STORE=etcd`).
pub fn store_is_etcd() -> bool {
    std::env::var("STRONGROOM_TEST_STORE").is_ok_and(|v| v == "etcd")
}

/// For tests that read or damage sled's files directly: on etcd, prints why the test does
/// not apply and returns true (the caller returns).
pub fn skip_on_etcd(why: &str) -> bool {
    if store_is_etcd() {
        println!("skipped on the etcd backend: {why}");
        return true;
    }
    false
}

/// A free TCP port on 127.0.0.1 (released for the caller to bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A single-member etcd of one test: its own data directory, mutual TLS from its own CA
/// (`pki/etcd-ca.pem`, server `etcd-server*.pem`, client `etcd-client*.pem`), client and
/// peer ports on 127.0.0.1. Killed on drop.
pub struct Etcd {
    pub url: String,
    pub data: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    child: std::sync::Mutex<Option<Child>>,
}

impl Etcd {
    /// Issues the etcd PKI into `pki` and starts etcd under `dir`, waiting until it serves.
    pub fn start(dir: &Path, pki: &Path) -> Etcd {
        Self::start_in(dir, pki, &dir.join("etcd"))
    }

    /// Like [`Etcd::start`], with its data directory at `data` (which may be elsewhere, e.g.
    /// on the power-cut simulator); the log stays `dir/etcd.log`.
    pub fn start_in(dir: &Path, pki: &Path, data: &Path) -> Etcd {
        use std::os::unix::fs::PermissionsExt;
        let ca = DevCa::new("test etcd CA").unwrap();
        let server = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        let client = ca.issue_client("strongroomd.etcd.test").unwrap();
        for (name, body) in [
            ("etcd-ca.pem", ca.cert_pem()),
            ("etcd-server.pem", server.cert_pem),
            ("etcd-server-key.pem", server.key_pem),
            ("etcd-client.pem", client.cert_pem),
            ("etcd-client-key.pem", client.key_pem),
        ] {
            let path = pki.join(name);
            std::fs::write(&path, body).unwrap();
            let mode = if name.ends_with("-key.pem") {
                0o600
            } else {
                0o644
            };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let data = data.to_path_buf();
        let log = dir.join("etcd.log");
        let mut last = String::new();
        // A port taken between probing and binding: try again with others.
        for _ in 0..5 {
            let (client_port, peer_port) = (free_port(), free_port());
            let url = format!("https://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let p = |n: &str| pki.join(n).display().to_string();
            let args: Vec<String> = [
                "--name",
                "test",
                "--data-dir",
                &data.display().to_string(),
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("test={peer}"),
                "--cert-file",
                &p("etcd-server.pem"),
                "--key-file",
                &p("etcd-server-key.pem"),
                "--trusted-ca-file",
                &p("etcd-ca.pem"),
                "--client-cert-auth",
                // Values up to the service's 16 MiB ceiling fit in one request.
                "--max-request-bytes",
                "33554432",
                "--logger",
                "zap",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let etcd = Etcd {
                url,
                data: data.clone(),
                log: log.clone(),
                args,
                child: std::sync::Mutex::new(None),
            };
            if etcd.spawn() {
                return etcd;
            }
            last = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&data);
        }
        panic!("etcd did not start:\n{last}");
    }

    /// Starts the process and waits until it serves clients; false if it exited first.
    fn spawn(&self) -> bool {
        let from = std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new("etcd")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (scripts/deps.sh installs etcd-server)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let text = std::fs::read(&self.log).unwrap_or_default();
            let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
            if text.contains("serving client traffic securely")
                || text.contains("ready to serve client requests")
            {
                *self.child.lock().unwrap() = Some(child);
                return true;
            }
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    fn pid(&self) -> Option<String> {
        self.child
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| c.id().to_string())
    }

    /// Freezes etcd (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self) {
        let pid = self.pid().expect("etcd runs");
        assert!(
            Command::new("kill")
                .args(["-STOP", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Thaws a paused etcd (SIGCONT).
    pub fn resume(&self) {
        let pid = self.pid().expect("etcd runs");
        assert!(
            Command::new("kill")
                .args(["-CONT", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Kills etcd (SIGKILL) and waits for it.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `f` with an etcd client authenticated by the test's client certificate, on a
    /// runtime of its own (callers may be inside a test's runtime).
    pub fn with_client<R: Send + 'static>(
        &self,
        f: impl AsyncFnOnce(etcd_client::Client) -> R + Send + 'static,
    ) -> R {
        let pki = self.log.parent().unwrap().join("pki");
        let url = self.url.clone();
        std::thread::spawn(move || {
            let read = |n: &str| std::fs::read(pki.join(n)).unwrap();
            let tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read("etcd-ca.pem")))
                .identity(etcd_client::Identity::from_pem(
                    read("etcd-client.pem"),
                    read("etcd-client-key.pem"),
                ));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = etcd_client::Client::connect(
                    [url],
                    Some(etcd_client::ConnectOptions::new().with_tls(tls)),
                )
                .await
                .unwrap();
                f(client).await
            })
        })
        .join()
        .unwrap()
    }

    /// Writes raw keys (as a store left by another process would hold them).
    pub fn put_all(&self, kvs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) {
        let kvs: Vec<(Vec<u8>, Vec<u8>)> = kvs.into_iter().collect();
        self.with_client(async move |client| {
            let mut kv = client.kv_client();
            // etcd allows 128 operations per transaction by default.
            for chunk in kvs.chunks(128) {
                let ops: Vec<etcd_client::TxnOp> = chunk
                    .iter()
                    .map(|(k, v)| etcd_client::TxnOp::put(k.clone(), v.clone(), None))
                    .collect();
                kv.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
            }
        })
    }

    /// Every key under `prefix` with its value, as etcd holds them now.
    pub fn read_prefix(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let prefix = prefix.to_vec();
        self.with_client(async move |client| {
            let mut kv = client.kv_client();
            let options = etcd_client::GetOptions::new().with_prefix();
            let mut resp = kv.get(prefix, Some(options)).await.unwrap();
            resp.take_kvs()
                .into_iter()
                .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
                .collect()
        })
    }

    /// Writes (or, for `None`, removes) raw keys behind the service's back, one key at a
    /// time as an editor would.
    pub fn write_raw(&self, changes: &[(Vec<u8>, Option<Vec<u8>>)]) {
        let changes = changes.to_vec();
        self.with_client(async move |client| {
            let mut kv = client.kv_client();
            for (k, v) in changes {
                match v {
                    Some(v) => kv.put(k, v, None).await.map(|_| ()),
                    None => kv.delete(k, None).await.map(|_| ()),
                }
                .unwrap();
            }
        })
    }

    /// Removes every key under `prefix`.
    pub fn delete_prefix(&self, prefix: &[u8]) {
        let prefix = prefix.to_vec();
        self.with_client(async move |client| {
            let options = etcd_client::DeleteOptions::new().with_prefix();
            client
                .kv_client()
                .delete(prefix, Some(options))
                .await
                .unwrap();
        })
    }

    /// Starts etcd again on the same data and ports.
    pub fn restart(&self) {
        self.kill();
        assert!(
            self.spawn(),
            "etcd did not restart:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // A paused etcd ignores SIGKILL until it is continued.
            let _ = Command::new("kill").args(["-CONT", &pid]).status();
        }
        self.kill();
    }
}
