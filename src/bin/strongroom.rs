//! `strongroom`: the client command line.
//!
//! Exit codes as Vault's: 0 success, 1 local or usage error, 2 server-side error. Values are
//! read from stdin or `@file`, never from the command line.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use strongroom::explain::{Plane, Target};
use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom::proto::{
    DeleteSecretRequest, DescribeSecretRequest, GetSecretRequest, ListSecretsRequest,
    PutSecretRequest,
};

/// Client for the strongroom secret service.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Service address.
    #[arg(
        long,
        env = "STRONGROOM_ADDR",
        default_value = "https://localhost:7443",
        global = true
    )]
    addr: String,
    /// CA certificate the server must chain to (PEM).
    #[arg(long, env = "STRONGROOM_CACERT", global = true)]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, env = "STRONGROOM_CLIENT_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "STRONGROOM_CLIENT_KEY", global = true)]
    key: Option<PathBuf>,
    /// Name to verify in the server certificate (default: the address's host).
    #[arg(long, env = "STRONGROOM_SERVER_NAME", global = true)]
    server_name: Option<String>,
    /// Output format.
    #[arg(
        long,
        value_enum,
        default_value = "table",
        env = "STRONGROOM_FORMAT",
        global = true
    )]
    format: Format,
    /// Request deadline in seconds.
    #[arg(long, default_value_t = 10, env = "STRONGROOM_TIMEOUT", global = true)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

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
        #[arg(long)]
        ttl: Option<u64>,
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
    },
    /// Destroy every version of a secret.
    Delete {
        /// Secret name.
        name: String,
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
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(1),
            };
        }
    };
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
            eprintln!("error: {:?}: {}", status.code(), status.message());
            ExitCode::from(2)
        }
        Err(Failure::Remote(msg)) => {
            eprintln!("error: {msg}");
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
    let target = target(&cli)?;
    let client = connect(&target).await?;
    match execute(cli, client, value).await {
        Err(Failure::Server(status)) => Err(explain_status(status, target).await),
        other => other,
    }
}

/// A failed RPC: the connection's failure in words, or the service's answer as it is.
async fn explain_status(status: tonic::Status, target: Target) -> Failure {
    // The explanation may probe the server with a blocking handshake.
    let explained = tokio::task::spawn_blocking(move || {
        let words = strongroom::explain::rpc_failure(&status, &target);
        (status, words)
    })
    .await;
    match explained {
        Ok((_, Some(words))) => Failure::Remote(words),
        Ok((status, None)) => Failure::Server(status),
        Err(e) => Failure::Local(format!("cannot explain the failure: {e}")),
    }
}

async fn execute(
    cli: Cli,
    mut client: SecretServiceClient<Channel>,
    value: Option<Zeroizing<Vec<u8>>>,
) -> Result<(), Failure> {
    let deadline = Duration::from_secs(cli.timeout);
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Put {
            name,
            expected_version,
            ttl,
            ..
        } => {
            let expires_at_unix = ttl.map(|t| unix_now().saturating_add(t as i64));
            let mut value = value.unwrap_or_default();
            let resp = client
                .put_secret(req(
                    deadline,
                    PutSecretRequest {
                        name: name.clone(),
                        value: std::mem::take(&mut *value),
                        expected_version,
                        expires_at_unix,
                    },
                ))
                .await
                .map_err(Failure::Server)?
                .into_inner();
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
                .get_secret(req(
                    deadline,
                    GetSecretRequest {
                        name,
                        version: version.unwrap_or(0),
                    },
                ))
                .await
                .map_err(Failure::Server)?
                .into_inner();
            let value = Zeroizing::new(resp.value);
            match field.as_deref() {
                Some("value") => out.write_all(&value).map_err(io)?,
                Some("version") => writeln!(out, "{}", resp.version).map_err(io)?,
                Some(other) => {
                    return Err(Failure::Local(format!(
                        "unknown field '{other}' (value, version)"
                    )));
                }
                None => {
                    let shown = match std::str::from_utf8(&value) {
                        Ok(s) => json!(s),
                        Err(_) => json!({"base64": base64(&value)}),
                    };
                    let text = match std::str::from_utf8(&value) {
                        Ok(s) => s.to_owned(),
                        Err(_) => format!("<{} bytes, not UTF-8; use --field value>", value.len()),
                    };
                    emit(
                        &mut out,
                        cli.format,
                        json!({"name": resp.name, "version": resp.version, "created_at_unix": resp.created_at_unix, "expires_at_unix": resp.expires_at_unix, "value": shown}),
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
            let resp = client
                .describe_secret(req(deadline, DescribeSecretRequest { name }))
                .await
                .map_err(Failure::Server)?
                .into_inner();
            if cli.format == Format::Json {
                let versions: Vec<_> = resp
                    .versions
                    .iter()
                    .map(|v| {
                        json!({"version": v.version, "master_key_version": v.master_key_version,
                        "mechanism": v.mechanism, "created_at_unix": v.created_at_unix,
                        "created_by": v.created_by, "expires_at_unix": v.expires_at_unix,
                        "expired": v.expired})
                    })
                    .collect();
                return print_json(
                    &mut out,
                    json!({"name": resp.name, "latest_version": resp.latest_version, "versions": versions}),
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
                "{:>8}  {:>3}  {:<20}  {:>12}  {:<8}  CREATED BY",
                "VERSION", "MK", "MECHANISM", "CREATED", "EXPIRED"
            )
            .map_err(io)?;
            for v in resp.versions {
                writeln!(
                    out,
                    "{:>8}  {:>3}  {:<20}  {:>12}  {:<8}  {}",
                    v.version,
                    v.master_key_version,
                    v.mechanism,
                    v.created_at_unix,
                    v.expired,
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
        } => {
            let mut names = Vec::new();
            loop {
                let resp = client
                    .list_secrets(req(
                        deadline,
                        ListSecretsRequest {
                            prefix: prefix.clone(),
                            page_size,
                            page_token: page_token.clone(),
                        },
                    ))
                    .await
                    .map_err(Failure::Server)?
                    .into_inner();
                names.extend(resp.names);
                page_token = resp.next_page_token;
                if !all || page_token.is_empty() {
                    break;
                }
            }
            if cli.format == Format::Json {
                return print_json(
                    &mut out,
                    json!({"names": names, "next_page_token": page_token}),
                );
            }
            for n in &names {
                writeln!(out, "{n}").map_err(io)?;
            }
            if !page_token.is_empty() {
                eprintln!("(more: --page-token {page_token}, or --all)");
            }
            Ok(())
        }
        Command::Delete { name } => {
            let resp = client
                .delete_secret(req(deadline, DeleteSecretRequest { name: name.clone() }))
                .await
                .map_err(Failure::Server)?
                .into_inner();
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

fn req<T>(deadline: Duration, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(deadline);
    r
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

/// Where to connect and with what; warns if the private key is open to group or others.
fn target(cli: &Cli) -> Result<Target, Failure> {
    let need = |p: &Option<PathBuf>, flag: &str, env: &str| {
        p.clone()
            .ok_or_else(|| Failure::Local(format!("{flag} (or {env}) is required")))
    };
    let cacert = need(&cli.cacert, "--cacert", "STRONGROOM_CACERT")?;
    let cert = need(&cli.cert, "--cert", "STRONGROOM_CLIENT_CERT")?;
    let key = need(&cli.key, "--key", "STRONGROOM_CLIENT_KEY")?;
    strongroom::files::warn_if_loose(&key, "client private key");
    Ok(Target::new(
        Plane::Client,
        &cli.addr,
        &cacert,
        Some((&cert, &key)),
        cli.server_name.as_deref(),
        Duration::from_secs(cli.timeout),
    ))
}

async fn connect(target: &Target) -> Result<SecretServiceClient<Channel>, Failure> {
    let channel = strongroom::tls::connect(target)
        .await
        .map_err(|e| match e {
            strongroom::tls::ConnectError::Local(m) => Failure::Local(m),
            strongroom::tls::ConnectError::Remote(m) => Failure::Remote(m),
        })?;
    // Room for the largest value a service may be configured to hold.
    Ok(SecretServiceClient::new(channel)
        .max_decoding_message_size(strongroom::config::MAX_VALUE_BYTES_CEILING + 1024 * 1024))
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
