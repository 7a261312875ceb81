//! Provisioning: fresh SoftHSM2 tokens, the PKI, `strongroomd` and floor-server children,
//! read sets written through the API, and the clients that connect to them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use strongroom::proto::PutSecretRequest;
use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom_devpki::DevCa;

use crate::cli::Opts;
use crate::util::random_bytes;
use crate::{CLIENT_ID, Res, SO_PIN, STRANGER_ID, USER_PIN, fail};

#[derive(Clone)]
pub(crate) struct Token {
    pub(crate) label: String,
    pub(crate) conf: PathBuf,
}

/// A child process that printed `listening on ADDR`; stopped with SIGTERM on drop.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) addr: String,
    pub(crate) log: PathBuf,
    pub(crate) _stdout: std::io::Lines<BufReader<ChildStdout>>,
}

impl Proc {
    pub(crate) fn spawn(mut cmd: Command, log: PathBuf) -> Res<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        match lines.next() {
            Some(Ok(line)) if line.starts_with("listening on ") => Ok(Self {
                addr: line["listening on ".len()..].to_owned(),
                child,
                log,
                _stdout: lines,
            }),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                fail(format!(
                    "{cmd:?} did not start ({other:?}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ))
            }
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
            }
        }
    }
}

/// A running target of the load generator.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) addr: String,
    pub(crate) pid: u32,
}

/// How a strongroomd child is started, when not as the others are.
#[derive(Clone, Default)]
pub(crate) struct Launch {
    /// Its binary (default: `--strongroomd`, else the one cargo built).
    pub(crate) bin: Option<PathBuf>,
    /// Extra environment.
    pub(crate) env: Vec<(String, String)>,
    /// Lines added to its `[audit]` section.
    pub(crate) audit_lines: String,
}

pub(crate) struct Lab {
    // Children first: they stop before the directory goes.
    pub(crate) procs: BTreeMap<String, Proc>,
    pub(crate) tokens: BTreeMap<String, Token>,
    pub(crate) read_sets: BTreeMap<String, Arc<Vec<String>>>,
    /// `[store]` bodies of strongroomd children by name (default: sled at `store`).
    pub(crate) store_sections: BTreeMap<String, String>,
    /// The binary and extra environment of strongroomd children by name (default: the
    /// `--strongroomd` binary, no extra environment).
    pub(crate) launches: BTreeMap<String, Launch>,
    pub(crate) root: PathBuf,
    pub(crate) pki: PathBuf,
    pub(crate) opts: Opts,
    pub(crate) _tmp: Option<tempfile::TempDir>,
}

impl Lab {
    pub(crate) fn new(opts: &Opts) -> Res<Self> {
        let base = opts.workdir.clone().unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base)?;
        let tmp = tempfile::Builder::new()
            .prefix("strongroom-bench-")
            .tempdir_in(&base)?;
        let root = tmp.path().to_path_buf();
        let tmp = if opts.keep {
            eprintln!("keeping {}", tmp.keep().display());
            None
        } else {
            Some(tmp)
        };
        let pki = root.join("pki");
        std::fs::create_dir_all(&pki)?;
        let server_ca = DevCa::new("bench server CA")?;
        let client_ca = DevCa::new("bench client CA")?;
        let server = server_ca.issue_server(&["localhost", "127.0.0.1"])?;
        let client = client_ca.issue_client(CLIENT_ID)?;
        // A valid certificate from the same CA that no policy rule names (frontdoor part).
        let stranger = client_ca.issue_client(STRANGER_ID)?;
        for (file, body) in [
            ("server-ca.pem", server_ca.cert_pem()),
            ("client-ca.pem", client_ca.cert_pem()),
            ("server.pem", server.cert_pem),
            ("server-key.pem", server.key_pem),
            ("load.pem", client.cert_pem),
            ("load-key.pem", client.key_pem),
            ("stranger.pem", stranger.cert_pem),
            ("stranger-key.pem", stranger.key_pem),
        ] {
            std::fs::write(pki.join(file), body)?;
            if file.ends_with("-key.pem") {
                // strongroomd refuses a private key open to group or others.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(pki.join(file), std::fs::Permissions::from_mode(0o600))?;
            }
        }
        Ok(Self {
            procs: BTreeMap::new(),
            tokens: BTreeMap::new(),
            read_sets: BTreeMap::new(),
            store_sections: BTreeMap::new(),
            launches: BTreeMap::new(),
            root,
            pki,
            opts: opts.clone(),
            _tmp: tmp,
        })
    }

    pub(crate) fn token_env(&self, cmd: &mut Command, token: &Token) {
        cmd.env("SOFTHSM2_CONF", &token.conf)
            .env("STRONGROOM_PKCS11_MODULE", &self.opts.module)
            .env("STRONGROOM_TOKEN", &token.label)
            .env("STRONGROOM_SO_PIN", SO_PIN)
            .env("STRONGROOM_USER_PIN", USER_PIN)
            .env_remove("STRONGROOM_USER_PIN_FILE")
            .env_remove("STRONGROOM_SO_PIN_FILE")
            .env_remove("STRONGROOM_CONFIG")
            .env_remove("STRONGROOM_LISTEN")
            .env_remove("STRONGROOM_STORE_PATH")
            .env_remove("STRONGROOM_AUDIT_PATH");
    }

    /// A fresh token in its own directory, with a master key and the MAC keys.
    pub(crate) fn token(&mut self, label: &str) -> Res<Token> {
        if let Some(t) = self.tokens.get(label) {
            return Ok(t.clone());
        }
        let dir = self.root.join(format!("token-{label}"));
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens)?;
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-config/softhsm2.conf.template"),
        )?;
        let conf = dir.join("softhsm2.conf");
        let tokendir = tokens.to_str().ok_or("non-UTF-8 temp path")?;
        std::fs::write(&conf, template.replace("@TOKENDIR@", tokendir))?;
        let token = Token {
            label: label.to_owned(),
            conf,
        };
        for args in [
            &["token", "init", "--label", label][..],
            &["key", "generate"],
        ] {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_strongroom-admin"));
            self.token_env(&mut cmd, &token);
            let out = cmd.args(args).stdin(Stdio::null()).output()?;
            if !out.status.success() {
                return fail(format!(
                    "strongroom-admin {args:?} failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        self.tokens.insert(label.to_owned(), token.clone());
        Ok(token)
    }

    /// Starts `strongroomd` (named `name`) on its own token and store.
    pub(crate) fn strongroomd(
        &mut self,
        name: &str,
        audit: bool,
        log_level: &str,
        checkpoint_every: Option<u64>,
    ) -> Res<Target> {
        self.strongroomd_with(name, audit, log_level, checkpoint_every, "")
    }

    /// Like [`Lab::strongroomd`], with `audit_lines` added to its `[audit]` section (it runs
    /// with `STRONGROOM_BENCHMARK=1`, which the benchmark-only settings require).
    pub(crate) fn strongroomd_with(
        &mut self,
        name: &str,
        audit: bool,
        log_level: &str,
        checkpoint_every: Option<u64>,
        audit_lines: &str,
    ) -> Res<Target> {
        if let Some(p) = self.procs.get(name) {
            return Ok(Target {
                addr: p.addr.clone(),
                pid: p.pid(),
            });
        }
        let launch = self.launches.get(name).cloned().unwrap_or_default();
        let audit_lines = format!("{audit_lines}\n{}", launch.audit_lines);
        let token = self.token(&format!("sr-{name}"))?;
        let dir = self.root.join(format!("srv-{name}"));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("strongroomd.toml");
        let pki = self.pki.display();
        std::fs::write(
            &config,
            format!(
                r#"[server]
listen = "127.0.0.1:0"
cert = "{pki}/server.pem"
key = "{pki}/server-key.pem"
client_ca = "{pki}/client-ca.pem"
shutdown_grace_ms = 2000

[hsm]
module = "{module}"
token = "{label}"
workers = {workers}

[store]
{store}

[audit]
path = "audit.log"
dangerous_disable_audit = {disable}
{checkpoint}
{audit_lines}
{audit_extra}

[[policy]]
identity = "{CLIENT_ID}"
prefix = "bench"
capabilities = ["read", "write", "list", "delete"]
"#,
                module = self.opts.module.display(),
                store = self
                    .store_sections
                    .get(name)
                    .map_or("path = \"store\"", String::as_str),
                label = token.label,
                workers = self.opts.server_workers,
                disable = !audit,
                checkpoint = checkpoint_every
                    .map(|n| format!("checkpoint_every = {n}"))
                    .unwrap_or_default(),
                // For trying audit settings (e.g. "commit_window_us = 200") in every
                // strongroomd of a run.
                audit_extra = std::env::var("STRONGROOM_BENCH_AUDIT_EXTRA").unwrap_or_default(),
            ),
        )?;
        let mut cmd = Command::new(
            launch
                .bin
                .as_deref()
                .or(self.opts.strongroomd.as_deref())
                .unwrap_or(Path::new(env!("CARGO_BIN_EXE_strongroomd"))),
        );
        self.token_env(&mut cmd, &token);
        cmd.arg("--config")
            .arg(&config)
            .env("STRONGROOM_LOG", log_level)
            .env("STRONGROOM_BENCHMARK", "1")
            // Last, so that it may override the above (e.g. STRONGROOM_LOG).
            .envs(launch.env.iter().map(|(k, v)| (k, v)));
        let started = Instant::now();
        let proc = Proc::spawn(cmd, dir.join("strongroomd.log"))?;
        eprintln!(
            "  started strongroomd '{name}' (audit {}, log {log_level}) on {} in {:.2} s",
            if audit { "on" } else { "off" },
            proc.addr,
            started.elapsed().as_secs_f64()
        );
        let target = Target {
            addr: proc.addr.clone(),
            pid: proc.pid(),
        };
        self.procs.insert(name.to_owned(), proc);
        Ok(target)
    }

    /// The floor server child, on the token of strongroomd `on` (shared directory).
    pub(crate) fn floor(&mut self, nagle: bool) -> Res<Target> {
        let name = if nagle { "floor-nagle" } else { "floor" };
        if let Some(p) = self.procs.get(name) {
            return Ok(Target {
                addr: p.addr.clone(),
                pid: p.pid(),
            });
        }
        let token = self.token("sr-on")?;
        let mut cmd = Command::new(std::env::current_exe()?);
        self.token_env(&mut cmd, &token);
        cmd.arg("floor-server")
            .arg("--module")
            .arg(&self.opts.module)
            .args(["--label", &token.label])
            .arg("--pki")
            .arg(&self.pki)
            .args(["--payload", &self.opts.value_size.to_string()])
            .arg("--journal")
            .arg(self.root.join(format!("{name}-journal.log")));
        if nagle {
            cmd.arg("--nagle");
        }
        let proc = Proc::spawn(cmd, self.root.join(format!("{name}.log")))?;
        eprintln!("  started the {name} server on {}", proc.addr);
        let target = Target {
            addr: proc.addr.clone(),
            pid: proc.pid(),
        };
        self.procs.insert(name.into(), proc);
        Ok(target)
    }

    /// A strongroomd holding the read set (`--secrets` values of `--value-size`), written
    /// through the API.
    pub(crate) async fn read_server(
        &mut self,
        name: &str,
        audit: bool,
        log: &str,
        checkpoint_every: Option<u64>,
    ) -> Res<(Target, Arc<Vec<String>>)> {
        let target = self.strongroomd(name, audit, log, checkpoint_every)?;
        if let Some(names) = self.read_sets.get(name) {
            return Ok((target, names.clone()));
        }
        let names: Arc<Vec<String>> = Arc::new(
            (0..self.opts.secrets)
                .map(|i| format!("bench/r/{i:06}"))
                .collect(),
        );
        let clients = connect(&target.addr, &self.pki, 4).await?;
        let started = Instant::now();
        let next = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for t in 0..32 {
            let (mut client, names, next) = (
                clients[t % clients.len()].clone(),
                names.clone(),
                next.clone(),
            );
            let value = random_bytes(self.opts.value_size);
            handles.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(name) = names.get(i) else {
                        return Res::Ok(());
                    };
                    client
                        .put_secret(PutSecretRequest {
                            name: name.clone(),
                            value: value.clone(),
                            expected_version: None,
                            expires_at_unix: None,
                            protection: 0,
                            ..Default::default()
                        })
                        .await?;
                }
            }));
        }
        for h in handles {
            h.await??;
        }
        eprintln!(
            "  wrote {} secrets of {} B into '{name}' through PutSecret in {:.1} s",
            names.len(),
            self.opts.value_size,
            started.elapsed().as_secs_f64()
        );
        self.read_sets.insert(name.to_owned(), names.clone());
        Ok((target, names))
    }

    pub(crate) fn log_of(&self, name: &str) -> Option<PathBuf> {
        self.procs.get(name).map(|p| p.log.clone())
    }

    /// The audit log of strongroomd `name` (its config names `audit.log` beside itself).
    pub(crate) fn audit_log(&self, name: &str) -> PathBuf {
        self.root.join(format!("srv-{name}")).join("audit.log")
    }
}

/// Runs a child role to completion; its stdin stays open (it exits when stdin closes), its
/// stderr shows progress; returns its stdout.
pub(crate) fn run_child(mut cmd: Command) -> Res<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdin = child.stdin.take();
    let mut out = String::new();
    child
        .stdout
        .take()
        .ok_or("no stdout")?
        .read_to_string(&mut out)?;
    let status = child.wait()?;
    drop(stdin);
    if !status.success() {
        return fail(format!("{cmd:?} failed ({status})"));
    }
    Ok(out)
}

pub(crate) type Client = SecretServiceClient<Channel>;

pub(crate) async fn connect(addr: &str, pki: &Path, n: usize) -> Res<Vec<Client>> {
    connect_as(addr, pki, n, "load").await
}

/// `n` connections as `who` (`load`: the load generator; `stranger`: a valid certificate
/// with no rights).
pub(crate) async fn connect_as(addr: &str, pki: &Path, n: usize, who: &str) -> Res<Vec<Client>> {
    let tls = strongroom::tls::client_config(
        &pki.join("server-ca.pem"),
        &pki.join(format!("{who}.pem")),
        &pki.join(format!("{who}-key.pem")),
        "localhost",
    )?;
    let mut clients = Vec::new();
    for _ in 0..n.max(1) {
        let channel = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls.clone())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await?;
        clients.push(SecretServiceClient::new(channel).max_decoding_message_size(64 << 20));
    }
    Ok(clients)
}
