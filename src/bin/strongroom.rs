//! `strongroom`: the client command line.
//!
//! Exit codes as Vault's: 0 success, 1 local or usage error, 2 server-side error. Values are
//! read from stdin or `@file`, never from the command line. `--addr` may name several
//! endpoints, comma-separated; calls go through [`strongroom::client::Client`] and fail over
//! by its rules.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use zeroize::Zeroizing;

use strongroom::client::{
    Attempt, AttemptFailure, Client, ClientError, ClientTls, PutOptions, WatchSpec,
};
use strongroom::secret::{Protection, SecretValue};
use strongroom::when;

/// strongroom: read and write secrets kept by strongroomd, over mutual TLS.
///
/// Values are read from stdin or `@FILE`, never from the command line. Exit codes: 0
/// success, 1 local or usage error, 2 server-side error.
#[derive(Parser)]
#[command(name = "strongroom", version)]
struct Cli {
    /// Service addresses, comma-separated (replicas): idempotent calls move to the next
    /// when one is unavailable.
    #[arg(
        long,
        env = "STRONGROOM_ADDR",
        default_value = "https://localhost:7443",
        global = true,
        help_heading = GLOBAL
    )]
    addr: String,
    /// CA certificate the server must chain to (PEM).
    #[arg(long, env = "STRONGROOM_CACERT", global = true, help_heading = GLOBAL)]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, env = "STRONGROOM_CLIENT_CERT", global = true, help_heading = GLOBAL)]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "STRONGROOM_CLIENT_KEY", global = true, help_heading = GLOBAL)]
    key: Option<PathBuf>,
    /// Name to verify in the server certificate (default: the address's host).
    #[arg(long, env = "STRONGROOM_SERVER_NAME", global = true, help_heading = GLOBAL)]
    server_name: Option<String>,
    /// Output format.
    #[arg(
        long,
        value_enum,
        default_value = "table",
        env = "STRONGROOM_FORMAT",
        global = true,
        help_heading = GLOBAL
    )]
    format: Format,
    /// Request deadline in seconds.
    #[arg(long, default_value_t = 10, env = "STRONGROOM_TIMEOUT", global = true, help_heading = GLOBAL)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

/// The help section of the flags every subcommand takes.
const GLOBAL: &str = "Global options";

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Store a new version: the value comes from stdin, or from a file given as `@PATH`.
    Put {
        /// Secret name, e.g. payments/db/password.
        name: String,
        /// `@PATH` to read the value from a file; default stdin.
        source: Option<String>,
        /// Only write if the current version is this (0: must not exist).
        #[arg(long)]
        expected_version: Option<u64>,
        /// Stop serving this version after so many seconds.
        #[arg(long, conflicts_with = "expires_at")]
        ttl: Option<u64>,
        /// Stop serving this version at this time: RFC 3339 (2027-01-31T12:00:00Z) or a
        /// duration from now (90d, 12h).
        #[arg(long)]
        expires_at: Option<String>,
        /// Do not serve this version before this time: RFC 3339 or a duration from now.
        #[arg(long)]
        not_before: Option<String>,
        /// Keep at most this many versions of the secret from now on, destroying older ones
        /// (0: every version).
        #[arg(long)]
        max_versions: Option<u32>,
        /// How to protect this version: envelope, or hsm-only (strict mode: the data key
        /// never leaves the token in the clear). Default: the store's setting.
        #[arg(long)]
        protection: Option<Protection>,
    },
    /// Read a secret (latest version unless --version).
    Get {
        /// Secret name.
        name: String,
        /// Version to read.
        #[arg(long)]
        version: Option<u64>,
        /// Print only this field, raw (`value`, `version`).
        #[arg(long)]
        field: Option<String>,
    },
    /// Versions and metadata of a secret (never values).
    Describe {
        /// Secret name.
        name: String,
    },
    /// Names under a prefix.
    List {
        /// Prefix (default: everything you may list).
        #[arg(default_value = "")]
        prefix: String,
        /// Names per page.
        #[arg(long, default_value_t = 0)]
        page_size: u32,
        /// Continue from this token.
        #[arg(long, default_value = "")]
        page_token: String,
        /// Fetch every page.
        #[arg(long)]
        all: bool,
        /// Only names whose latest version expires within this long (7d, 12h), with when.
        #[arg(long)]
        expiring_within: Option<String>,
    },
    /// Destroy every version of a secret.
    Delete {
        /// Secret name.
        name: String,
    },
    /// Print one line per change (created, updated, deleted, expiring-soon) under the prefixes, never
    /// values: `REVISION KIND NAME VERSION`. Runs until interrupted; resumes on another
    /// endpoint of --addr from the last revision printed when one fails.
    Watch {
        /// Prefixes to watch ("" for everything you may read).
        #[arg(required_unless_present = "name")]
        prefixes: Vec<String>,
        /// An exact name to watch (repeatable).
        #[arg(long)]
        name: Vec<String>,
        /// Print the changes after this revision (the last one printed before); 0: from now.
        #[arg(long, default_value_t = 0)]
        after_revision: u64,
    },
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: strongroom::clidoc::Shell,
    },
    /// Write man pages (this command and each subcommand) into a directory.
    Man {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

/// A failure and its exit code.
enum Failure {
    /// Local input or output: exit 1.
    Local(String),
    /// The service's answer: exit 2.
    Server(tonic::Status),
    /// The server could not be reached or refused the connection, in words: exit 2.
    Remote(String),
    /// A call failed; [`explain_failure`] sorts it into one of the above.
    Client(ClientError),
}

fn main() -> ExitCode {
    let cli = match strongroom::clidoc::parse_args::<Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match &cli.command {
        Command::Completions { shell } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            return match strongroom::clidoc::completions(cmd, *shell, &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write the completions: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Command::Man { out } => {
            return match strongroom::clidoc::man_pages(
                <Cli as clap::CommandFactory>::command(),
                out,
            ) {
                Ok(files) => {
                    eprintln!("wrote {} man pages to {}", files.len(), out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "error: cannot write the man pages to {}: {e}",
                        out.display()
                    );
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Local(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
        Err(Failure::Server(status)) => {
            eprintln!(
                "error: {:?}: {}",
                status.code(),
                strongroom::explain::tidy(status.message())
            );
            ExitCode::from(2)
        }
        Err(Failure::Remote(msg)) => {
            eprintln!("error: {}", strongroom::explain::tidy(&msg));
            ExitCode::from(2)
        }
        Err(Failure::Client(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // Read local input before connecting, so usage errors never reach the server.
    let value = match &cli.command {
        Command::Put { source, .. } => Some(read_value(source.as_deref())?),
        _ => None,
    };
    let client = client(&cli)?;
    match execute(cli, &client, value).await {
        Err(Failure::Client(e)) => Err(explain_failure(e).await),
        other => other,
    }
}

/// A failed call in words: the service's answer as it is; with one endpoint, its failure
/// as the tools have always explained it; with several, each endpoint's failure briefly.
async fn explain_failure(err: ClientError) -> Failure {
    match err {
        ClientError::Local(m) => Failure::Local(m),
        ClientError::Status(status) => Failure::Server(status),
        ClientError::Unreachable(mut attempts) if attempts.len() == 1 => {
            match attempt_words(attempts.remove(0)).await {
                Ok(words) => Failure::Remote(words),
                Err(status) => Failure::Server(status),
            }
        }
        ClientError::Unreachable(attempts) => {
            let mut briefs = Vec::with_capacity(attempts.len());
            let mut advice: Vec<String> = Vec::new();
            for a in attempts {
                let words = attempt_words(a)
                    .await
                    .unwrap_or_else(|s| format!("{:?}: {}", s.code(), s.message()));
                let (brief, rest) = match words.split_once(". ") {
                    Some((b, r)) => (b.to_owned(), r.to_owned()),
                    None => (words, String::new()),
                };
                briefs.push(brief);
                if !rest.is_empty() && !advice.contains(&rest) {
                    advice.push(rest);
                }
            }
            let mut text = format!(
                "every endpoint failed ({} tried): {}",
                briefs.len(),
                briefs.join("; ")
            );
            if advice.len() == 1 {
                text.push_str(". ");
                text.push_str(&advice[0]);
            }
            Failure::Remote(text)
        }
        ClientError::OutcomeUnknown(attempt) => {
            let words = attempt_words(*attempt)
                .await
                .unwrap_or_else(|s| format!("{:?}: {}", s.code(), s.message()));
            Failure::Remote(format!("{words}; {}", strongroom::client::OUTCOME_UNKNOWN))
        }
    }
}

/// One endpoint's failure in words, or the service's own answer (`UNAVAILABLE`).
async fn attempt_words(attempt: Attempt) -> Result<String, tonic::Status> {
    let AttemptFailure::Call(status) = &attempt.failure else {
        return Ok(attempt.words());
    };
    if std::error::Error::source(status).is_none() {
        return Err(status.clone());
    }
    // The explanation may probe the server with a blocking handshake.
    let status = status.clone();
    let target = attempt.target.clone();
    let explained =
        tokio::task::spawn_blocking(move || strongroom::explain::rpc_failure(&status, &target))
            .await;
    match explained {
        Ok(Some(words)) => Ok(words),
        _ => Ok(attempt.words()),
    }
}

async fn execute(
    cli: Cli,
    client: &Client,
    value: Option<Zeroizing<Vec<u8>>>,
) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Put {
            name,
            expected_version,
            ttl,
            expires_at,
            not_before,
            max_versions,
            protection,
            ..
        } => {
            let at = |s: &str| {
                strongroom::when::instant_or_after(s, unix_now())
                    .map_err(|e| Failure::Local(e.to_string()))
            };
            let expires_at_unix = match expires_at {
                Some(s) => Some(at(&s)?),
                None => ttl.map(|t| unix_now().saturating_add(t as i64)),
            };
            let not_before_unix = not_before.as_deref().map(at).transpose()?;
            let value = SecretValue::new(value.unwrap_or_default());
            let resp = client
                .put_protected(
                    &name,
                    &value,
                    PutOptions {
                        expected_version,
                        expires_at_unix,
                        not_before_unix,
                        max_versions,
                    },
                    protection,
                )
                .await
                .map_err(Failure::Client)?;
            emit(
                &mut out,
                cli.format,
                json!({"name": name, "version": resp.version, "master_key_version": resp.master_key_version}),
                &[
                    ("name", name.clone()),
                    ("version", resp.version.to_string()),
                ],
            )
        }
        Command::Get {
            name,
            version,
            field,
        } => {
            let resp = client
                .get(&name, version.unwrap_or(0))
                .await
                .map_err(Failure::Client)?;
            let value = resp.value.expose();
            match field.as_deref() {
                Some("value") => out.write_all(value).map_err(io)?,
                Some("version") => writeln!(out, "{}", resp.version).map_err(io)?,
                Some(other) => {
                    return Err(Failure::Local(format!(
                        "unknown field '{other}' (value, version)"
                    )));
                }
                None => {
                    let shown = match std::str::from_utf8(value) {
                        Ok(s) => json!(s),
                        Err(_) => json!({"base64": base64(value)}),
                    };
                    let text = match std::str::from_utf8(value) {
                        Ok(s) => s.to_owned(),
                        Err(_) => format!("<{} bytes, not UTF-8; use --field value>", value.len()),
                    };
                    emit(
                        &mut out,
                        cli.format,
                        json!({"name": resp.name, "version": resp.version,
                            "created_at": when::rfc3339(resp.created_at_unix),
                            "created_at_unix": resp.created_at_unix,
                            "expires_at": when::expiry_json(resp.expires_at_unix),
                            "expires_at_unix": resp.expires_at_unix, "value": shown}),
                        &[
                            ("name", resp.name.clone()),
                            ("version", resp.version.to_string()),
                            ("value", text),
                        ],
                    )?;
                }
            }
            Ok(())
        }
        Command::Describe { name } => {
            let resp = client.describe(&name).await.map_err(Failure::Client)?;
            if cli.format == Format::Json {
                let versions: Vec<_> = resp
                    .versions
                    .iter()
                    .map(|v| {
                        json!({"version": v.version, "master_key_version": v.master_key_version,
                        "mechanism": v.mechanism,
                        "created_at": when::rfc3339(v.created_at_unix),
                        "created_at_unix": v.created_at_unix,
                        "created_by": v.created_by,
                        "expires_at": when::expiry_json(v.expires_at_unix),
                        "expires_at_unix": v.expires_at_unix,
                        "expired": v.expired,
                        "not_before": when::expiry_json(v.not_before_unix),
                        "not_before_unix": v.not_before_unix,
                        "not_yet_valid": v.not_yet_valid,
                        "record_format": v.record_format})
                    })
                    .collect();
                return print_json(
                    &mut out,
                    json!({"name": resp.name, "latest_version": resp.latest_version, "max_versions": resp.max_versions, "versions": versions}),
                );
            }
            writeln!(
                out,
                "{}  (latest version {})",
                resp.name, resp.latest_version
            )
            .map_err(io)?;
            writeln!(
                out,
                "{:>8}  {:>3}  {:<20}  {:<20}  {:<29}  CREATED BY",
                "VERSION", "MK", "MECHANISM", "CREATED", "EXPIRES"
            )
            .map_err(io)?;
            for v in resp.versions {
                let expires = when::expiry(v.expires_at_unix);
                let expires = if v.expired {
                    format!("{expires} (expired)")
                } else {
                    expires
                };
                writeln!(
                    out,
                    "{:>8}  {:>3}  {:<20}  {:<20}  {:<29}  {}",
                    v.version,
                    v.master_key_version,
                    v.mechanism,
                    when::rfc3339(v.created_at_unix),
                    expires,
                    v.created_by
                )
                .map_err(io)?;
            }
            Ok(())
        }
        Command::List {
            prefix,
            page_size,
            mut page_token,
            all,
            expiring_within,
        } => {
            let within = expiring_within
                .as_deref()
                .map(strongroom::when::duration_secs)
                .transpose()
                .map_err(|e| Failure::Local(e.to_string()))?;
            let mut names = Vec::new();
            let mut expiring = Vec::new();
            loop {
                let resp = client
                    .list_expiring(&prefix, page_size, &page_token, within)
                    .await
                    .map_err(Failure::Client)?;
                names.extend(resp.names);
                expiring.extend(resp.expiring);
                page_token = resp.next_page_token;
                if !all || page_token.is_empty() {
                    break;
                }
            }
            if within.is_some() {
                if cli.format == Format::Json {
                    let rows: Vec<_> = expiring
                        .iter()
                        .map(|e| json!({"name": e.name, "version": e.version, "expires_at_unix": e.expires_at_unix, "expires_at": strongroom::when::rfc3339(e.expires_at_unix)}))
                        .collect();
                    return print_json(
                        &mut out,
                        json!({"expiring": rows, "next_page_token": page_token}),
                    );
                }
                for e in &expiring {
                    let at = strongroom::when::rfc3339(e.expires_at_unix);
                    writeln!(out, "{}  {:>8}  {at}", e.name, e.version).map_err(io)?;
                }
            } else if cli.format == Format::Json {
                return print_json(
                    &mut out,
                    json!({"names": names, "next_page_token": page_token}),
                );
            }
            let empty = if within.is_some() {
                expiring.is_empty()
            } else {
                names.is_empty()
            };
            if empty {
                let what = if within.is_some() {
                    "no secrets expiring in that window"
                } else {
                    "no secrets"
                };
                if prefix.is_empty() {
                    eprintln!("{what} that you may list");
                } else {
                    eprintln!("{what} under '{prefix}' that you may list");
                }
            }
            for n in names.iter().filter(|_| within.is_none()) {
                writeln!(out, "{n}").map_err(io)?;
            }
            if !page_token.is_empty() {
                eprintln!("(more: --page-token {page_token}, or --all)");
            }
            Ok(())
        }
        Command::Watch {
            prefixes,
            name,
            after_revision,
        } => {
            let mut watch = client.watch(WatchSpec {
                names: name,
                prefixes,
                after_revision,
            });
            loop {
                let e = watch.next().await.map_err(|e| {
                    eprintln!("(last revision seen: {})", watch.last_revision());
                    Failure::Client(e)
                })?;
                let kind =
                    strongroom::proto::watch_event::Kind::try_from(e.kind).map_or("unknown", |k| {
                        match k {
                            strongroom::proto::watch_event::Kind::Created => "created",
                            strongroom::proto::watch_event::Kind::Updated => "updated",
                            strongroom::proto::watch_event::Kind::Deleted => "deleted",
                            strongroom::proto::watch_event::Kind::ExpiringSoon => "expiring-soon",
                            strongroom::proto::watch_event::Kind::Unspecified => "unknown",
                        }
                    });
                if cli.format == Format::Json {
                    print_json(
                        &mut out,
                        json!({"revision": e.revision, "kind": kind, "name": e.name, "version": e.version}),
                    )?;
                } else {
                    writeln!(out, "{} {kind} {} {}", e.revision, e.name, e.version).map_err(io)?;
                }
                out.flush().map_err(io)?;
            }
        }
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
        Command::Delete { name } => {
            let resp = client.delete(&name).await.map_err(Failure::Client)?;
            emit(
                &mut out,
                cli.format,
                json!({"name": name, "versions_destroyed": resp.versions_destroyed}),
                &[
                    ("name", name.clone()),
                    ("versions_destroyed", resp.versions_destroyed.to_string()),
                ],
            )
        }
    }
}

fn read_value(source: Option<&str>) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let mut buf = Zeroizing::new(Vec::new());
    match source {
        None | Some("-") => {
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| Failure::Local(format!("cannot read the value from stdin: {e}")))?;
        }
        Some(s) if s.starts_with('@') => {
            let path = &s[1..];
            let mut f = std::fs::File::open(path)
                .map_err(|e| Failure::Local(format!("cannot open {path}: {e}")))?;
            f.read_to_end(&mut buf)
                .map_err(|e| Failure::Local(format!("cannot read {path}: {e}")))?;
        }
        Some(_) => {
            return Err(Failure::Local(
                "values are never taken from the command line: pipe them on stdin or give @FILE"
                    .into(),
            ));
        }
    }
    Ok(buf)
}

/// The client for the endpoints given (comma-separated); warns if the private key is open
/// to group or others. Nothing is connected yet.
fn client(cli: &Cli) -> Result<Client, Failure> {
    let need = |p: &Option<PathBuf>, flag: &str, env: &str| {
        p.clone()
            .ok_or_else(|| Failure::Local(format!("{flag} (or {env}) is required")))
    };
    let cacert = need(&cli.cacert, "--cacert", "STRONGROOM_CACERT")?;
    let cert = need(&cli.cert, "--cert", "STRONGROOM_CLIENT_CERT")?;
    let key = need(&cli.key, "--key", "STRONGROOM_CLIENT_KEY")?;
    strongroom::files::warn_if_loose(&key, "client private key");
    let endpoints: Vec<String> = cli
        .addr
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    if endpoints.is_empty() {
        return Err(Failure::Local(
            "--addr (or STRONGROOM_ADDR) names no endpoint".into(),
        ));
    }
    let tls = ClientTls {
        server_ca: cacert,
        cert,
        key,
        server_name: cli.server_name.clone(),
    };
    Client::connect(&endpoints, &tls, Duration::from_secs(cli.timeout)).map_err(|e| match e {
        ClientError::Local(m) => Failure::Local(m),
        other => Failure::Local(other.to_string()),
    })
}

fn emit(
    out: &mut impl Write,
    format: Format,
    json_value: serde_json::Value,
    rows: &[(&str, String)],
) -> Result<(), Failure> {
    match format {
        Format::Json => print_json(out, json_value),
        Format::Table => {
            for (k, v) in rows {
                writeln!(out, "{k:<20} {v}").map_err(io)?;
            }
            Ok(())
        }
    }
}

fn print_json(out: &mut impl Write, v: serde_json::Value) -> Result<(), Failure> {
    writeln!(out, "{v}").map_err(io)
}

fn io(e: std::io::Error) -> Failure {
    Failure::Local(format!("cannot write output: {e}"))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
