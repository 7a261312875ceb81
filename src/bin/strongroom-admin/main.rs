//! `strongroom-admin`: the security officers' tool.
//!
//! Offline commands work directly against the PKCS#11 module on the officer's host (token
//! listing and initialisation, master key generation and inspection, `doctor`, audit
//! verification); online commands talk to the admin listener of `strongroomd` with an
//! officer's certificate (status, policies, approvals, guarded operations). PINs come from
//! files, environment variables or a prompt, never from argv. Exit codes: 0 success, 1 local
//! or usage error, 2 server- or token-side error (and a failed audit verification).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

mod audit_cmd;
mod migrate_cmd;
mod online;
mod pki_cmd;
mod report_cmd;
mod rewrap;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use strongroom::hsm::admin::{self, InitError};
use strongroom::hsm::pin::read_pin;
use strongroom::hsm::{self, HsmError, TokenSelector, keys};

/// strongroom-admin: the security officers' tool for strongroom.
///
/// Offline commands use the PKCS#11 token on this host (tokens, master keys, doctor, audit
/// verification) or files (pki); online commands use an officer's certificate against
/// strongroomd's admin listener (status, policies, approvals). PINs come from files, the
/// environment or a prompt, never from argv. Exit codes: 0 success, 1 local or usage error,
/// 2 server- or token-side error.
#[derive(Parser)]
#[command(name = "strongroom-admin", version)]
pub(crate) struct Cli {
    /// PKCS#11 module.
    #[arg(
        long,
        env = "STRONGROOM_PKCS11_MODULE",
        default_value = "/usr/lib/softhsm/libsofthsm2.so",
        global = true,
        help_heading = GLOBAL
    )]
    pub(crate) module: PathBuf,
    /// Token: label, `serial:<serial>` or an RFC 7512 `pkcs11:` URI.
    #[arg(
        long,
        env = "STRONGROOM_TOKEN",
        default_value = "strongroom",
        global = true,
        help_heading = GLOBAL
    )]
    pub(crate) token: String,
    /// File holding the user PIN (else STRONGROOM_USER_PIN, else a prompt).
    #[arg(long, env = "STRONGROOM_USER_PIN_FILE", global = true, help_heading = GLOBAL)]
    pub(crate) user_pin_file: Option<PathBuf>,
    /// Output format.
    #[arg(
        long,
        value_enum,
        default_value = "table",
        env = "STRONGROOM_FORMAT",
        global = true,
        help_heading = GLOBAL
    )]
    pub(crate) format: Format,
    #[command(flatten)]
    online: online::Connection,
    #[command(subcommand)]
    command: Command,
}

/// The help section of the flags every subcommand takes.
pub(crate) const GLOBAL: &str = "Global options";

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Tokens and slots.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Master keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Check that the module, token, login, mechanisms and master keys are in order.
    Doctor,
    /// The service's state as officers see it (online).
    Status,
    /// Policies kept by the service (online; put and delete need approval).
    #[command(subcommand)]
    Policy(online::PolicyCmd),
    /// Pending and past approvals (online).
    #[command(subcommand)]
    Approval(online::ApprovalCmd),
    /// Approve a pending operation (online).
    Approve {
        /// Approval id.
        id: String,
    },
    /// Reject a pending operation (online).
    Reject {
        /// Approval id.
        id: String,
    },
    /// The store (accept: online, needs approval; migrate: offline, with the PIN).
    #[command(subcommand)]
    Store(online::StoreCmd),
    /// Secrets, as officers manage them (online; destroy needs approval).
    #[command(subcommand)]
    Secret(online::SecretCmd),
    /// The audit log: verify its history, read it, rotate it (online), declare a new log
    /// for a lost file (offline).
    #[command(subcommand)]
    Audit(audit_cmd::AuditCmd),
    /// Reports over the whole store: `report expiring --within 7d` (online).
    #[command(subcommand)]
    Report(report_cmd::ReportCmd),
    /// Re-seal every record under an older master key version under the current one (online,
    /// needs approval; `--dry-run` counts only), with a live progress bar.
    Rewrap(rewrap::RewrapArgs),
    /// The officers' certificate authority: create it, issue officer certificates by name
    /// (offline; no token needed).
    #[command(subcommand)]
    Pki(pki_cmd::PkiCmd),
    /// Write a development PKI (server, client and admin CAs with their keys, and
    /// certificates); more officers: `pki issue-officer NAME --dir OUT`.
    DevPki {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Client certificates to issue, as STEM=IDENTITY (e.g. client=spiffe://strongroom.dev/demo).
        #[arg(long = "client", default_value = "client=spiffe://strongroom.dev/demo")]
        clients: Vec<String>,
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

#[derive(Subcommand)]
pub(crate) enum TokenCmd {
    /// Every slot and token the module reports.
    List,
    /// Initialise a fresh token: SO PIN and user PIN from files, env or prompt.
    Init {
        /// Label of the new token (1–32 bytes).
        #[arg(long)]
        label: String,
        /// File holding the SO PIN (else STRONGROOM_SO_PIN, else a prompt).
        #[arg(long, env = "STRONGROOM_SO_PIN_FILE")]
        so_pin_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeyCmd {
    /// Generate the next master key version inside the token (offline, needs the PIN;
    /// also creates missing MAC keys).
    Generate,
    /// Master key versions with the security attributes the token reports; with
    /// `--online`, each version's state and how many records reference it (from the service).
    List {
        /// Ask the service (state and references) instead of the token.
        #[arg(long)]
        online: bool,
    },
    /// Create the audit and store MAC keys if they are missing (offline).
    InitMac,
    /// Generate the next master key version through the service, under dual control
    /// (online); new writes use it.
    Rotate,
    /// Stop sealing under a master key version; it still opens records (online, needs
    /// approval).
    DecryptOnly {
        /// Master key version.
        version: u32,
    },
    /// Stop using a decrypt-only version at all; refused while records reference it (online,
    /// needs approval).
    Disable {
        /// Master key version.
        version: u32,
    },
    /// Destroy a disabled version's key object in the token; refused while records reference
    /// it (online, needs approval).
    Destroy {
        /// Master key version.
        version: u32,
    },
}

pub(crate) enum Failure {
    /// Local input or usage: exit 1.
    Local(String),
    /// The token or the server: exit 2.
    Token(String),
    /// A failed RPC, before it is put in words (see `online::run`): exit 2.
    Rpc(Box<tonic::Status>),
}

impl From<HsmError> for Failure {
    fn from(e: HsmError) -> Self {
        match e {
            HsmError::Load { .. } => Failure::Local(e.to_string()),
            e => Failure::Token(e.to_string()),
        }
    }
}

fn main() -> ExitCode {
    let cli = match strongroom::clidoc::parse_args::<Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Local(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(1)
        }
        Err(Failure::Token(m)) => {
            eprintln!("error: {}", strongroom::explain::tidy(&m));
            ExitCode::from(2)
        }
        Err(Failure::Rpc(s)) => {
            eprintln!(
                "error: {:?}: {}",
                s.code(),
                strongroom::explain::tidy(s.message())
            );
            ExitCode::from(2)
        }
    }
}

fn interactive() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdin())
}

pub(crate) fn user_pin(cli: &Cli) -> Result<cryptoki::types::AuthPin, Failure> {
    if let Some(file) = &cli.user_pin_file {
        strongroom::files::warn_if_loose(file, "PIN file");
    }
    read_pin(
        "user PIN",
        cli.user_pin_file.as_deref(),
        "STRONGROOM_USER_PIN",
        interactive(),
    )
    .map_err(|e| Failure::Local(e.to_string()))
}

pub(crate) fn selector(cli: &Cli) -> Result<TokenSelector, Failure> {
    cli.token
        .parse()
        .map_err(|e| Failure::Local(format!("--token: {e}")))
}

/// The key the store commits its records under, derived in the token (logged in on
/// `session`) as strongroomd derives it: for the offline commands that open the store.
pub(crate) fn store_state_key(
    session: &cryptoki::session::Session,
) -> Result<zeroize::Zeroizing<[u8; 32]>, Failure> {
    let mac = keys::find_mac(session, keys::MacKey::Store)?.ok_or_else(|| {
        Failure::Token(format!(
            "the token holds no {}: this is not the token of this store",
            keys::MacKey::Store.label()
        ))
    })?;
    let tag = zeroize::Zeroizing::new(keys::hmac(
        session,
        mac,
        strongroom::store::STATE_KEY_DOMAIN,
    )?);
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    if tag.len() != bytes.len() {
        return Err(Failure::Token(
            "the token's HMAC-SHA256 tag is not 32 bytes".into(),
        ));
    }
    bytes.copy_from_slice(&tag);
    Ok(bytes)
}

fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Status
        | Command::Policy(_)
        | Command::Approval(_)
        | Command::Approve { .. }
        | Command::Reject { .. }
        | Command::Secret(_)
        | Command::Report(_)
        | Command::Store(online::StoreCmd::Accept)
        | Command::Key(KeyCmd::Rotate)
        | Command::Key(KeyCmd::List { online: true })
        | Command::Key(KeyCmd::DecryptOnly { .. })
        | Command::Key(KeyCmd::Disable { .. })
        | Command::Key(KeyCmd::Destroy { .. })
        | Command::Rewrap(_)
        | Command::Audit(audit_cmd::AuditCmd::Rotate { .. }) => {
            online::run(&cli.online, cli.format, &cli.command)
        }
        Command::Store(online::StoreCmd::Migrate { config, from, to }) => {
            migrate_cmd::run(&cli, config, from, to)
        }
        Command::Audit(cmd) => audit_cmd::run(&cli, cmd),
        Command::Pki(cmd) => pki_cmd::run(cli.format, cmd),
        Command::Completions { shell } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            strongroom::clidoc::completions(cmd, *shell, &mut std::io::stdout())
                .map_err(|e| Failure::Local(format!("cannot write the completions: {e}")))
        }
        Command::Man { out } => {
            let files =
                strongroom::clidoc::man_pages(<Cli as clap::CommandFactory>::command(), out)
                    .map_err(|e| {
                        Failure::Local(format!(
                            "cannot write the man pages to {}: {e}",
                            out.display()
                        ))
                    })?;
            eprintln!("wrote {} man pages to {}", files.len(), out.display());
            Ok(())
        }
        Command::Token(TokenCmd::List) => {
            let pkcs11 = hsm::load_module(&cli.module)?;
            let tokens = admin::list_tokens(&pkcs11)?;
            if cli.format == Format::Json {
                println!("{}", json!(tokens));
                return Ok(());
            }
            println!(
                "{:>12}  {:<32}  {:<18}  {:<5}  {:<8}  MODEL",
                "SLOT", "LABEL", "SERIAL", "INIT", "USER PIN"
            );
            for t in tokens {
                if !t.present {
                    println!("{:>12}  (no token)", t.slot);
                    continue;
                }
                let pin = if t.user_pin_locked {
                    "locked"
                } else if t.user_pin_initialized {
                    "set"
                } else {
                    "unset"
                };
                println!(
                    "{:>12}  {:<32}  {:<18}  {:<5}  {:<8}  {}",
                    t.slot, t.label, t.serial, t.initialized, pin, t.model
                );
            }
            Ok(())
        }
        Command::Token(TokenCmd::Init { label, so_pin_file }) => {
            if let Some(file) = so_pin_file {
                strongroom::files::warn_if_loose(file, "SO PIN file");
            }
            let so_pin = read_pin(
                "SO PIN",
                so_pin_file.as_deref(),
                "STRONGROOM_SO_PIN",
                interactive(),
            )
            .map_err(|e| Failure::Local(e.to_string()))?;
            let user = user_pin(&cli)?;
            let pkcs11 = hsm::load_module(&cli.module)?;
            let serial =
                admin::init_token(&pkcs11, label, &so_pin, &user).map_err(|e| match e {
                    InitError::Hsm(h) => Failure::from(h),
                    InitError::BadLabel => Failure::Local(e.to_string()),
                    other => Failure::Token(other.to_string()),
                })?;
            if cli.format == Format::Json {
                println!("{}", json!({"label": label, "serial": serial}));
            } else {
                println!("initialised token '{label}' (serial {serial})");
                println!("next: strongroom-admin --token {label} key generate");
            }
            Ok(())
        }
        Command::Key(cmd) => {
            let pin = user_pin(&cli)?;
            let pkcs11 = hsm::load_module(&cli.module)?;
            let slot = hsm::find_token(&pkcs11, &selector(&cli)?)?;
            let session = match cmd {
                KeyCmd::List { .. } => pkcs11.open_ro_session(slot),
                _ => pkcs11.open_rw_session(slot),
            }
            .map_err(HsmError::from)?;
            hsm::login(&session, &pin)?;
            match cmd {
                KeyCmd::Generate => {
                    let created_macs = keys::ensure_mac_keys(&session)?;
                    for m in &created_macs {
                        eprintln!("created MAC key {}", m.label());
                    }
                    let version = keys::generate(&session)?;
                    let handle = keys::find(&session)?
                        .into_iter()
                        .find(|(v, _)| *v == version)
                        .map(|(_, h)| h)
                        .ok_or_else(|| {
                            Failure::Token("the new key is not visible in the token".into())
                        })?;
                    let report = keys::report(&session, version, handle)?;
                    if cli.format == Format::Json {
                        println!("{}", json!(report));
                    } else {
                        println!("generated master key version {version} ({})", report.label);
                        println!(
                            "back up the token now: records sealed under a lost key cannot be read"
                        );
                    }
                    let problems = report.problems();
                    if !problems.is_empty() {
                        return Err(Failure::Token(format!(
                            "the token did not honour the key template: {}",
                            problems.join("; ")
                        )));
                    }
                    Ok(())
                }
                KeyCmd::InitMac => {
                    let created = keys::ensure_mac_keys(&session)?;
                    if cli.format == Format::Json {
                        let labels: Vec<&str> = created.iter().map(|k| k.label()).collect();
                        println!("{}", json!({"created": labels}));
                    } else if created.is_empty() {
                        println!("the MAC keys are present");
                    } else {
                        for k in created {
                            println!("created MAC key {}", k.label());
                        }
                    }
                    Ok(())
                }
                KeyCmd::Rotate
                | KeyCmd::DecryptOnly { .. }
                | KeyCmd::Disable { .. }
                | KeyCmd::Destroy { .. } => Err(Failure::Local(
                    "this key command is an online command".into(),
                )),
                KeyCmd::List { .. } => {
                    let mut reports = Vec::new();
                    for (version, handle) in keys::find(&session)? {
                        reports.push(keys::report(&session, version, handle)?);
                    }
                    if cli.format == Format::Json {
                        println!("{}", json!(reports));
                        return Ok(());
                    }
                    println!(
                        "{:>7}  {:<20}  {:<9}  {:<11}  {:<16}  {:<17}  {:<10}  VALUE",
                        "VERSION",
                        "LABEL",
                        "SENSITIVE",
                        "EXTRACTABLE",
                        "ALWAYS_SENSITIVE",
                        "NEVER_EXTRACTABLE",
                        "MODIFIABLE"
                    );
                    let show = |b: Option<bool>| b.map_or("?".to_owned(), |b| b.to_string());
                    for r in &reports {
                        println!(
                            "{:>7}  {:<20}  {:<9}  {:<11}  {:<16}  {:<17}  {:<10}  {}",
                            r.version,
                            r.label,
                            show(r.sensitive),
                            show(r.extractable),
                            show(r.always_sensitive),
                            show(r.never_extractable),
                            show(r.modifiable),
                            if r.value_readable {
                                "READABLE"
                            } else {
                                "unreadable"
                            }
                        );
                    }
                    if reports.is_empty() {
                        eprintln!("no master keys; run `strongroom-admin key generate`");
                    }
                    Ok(())
                }
            }
        }
        Command::Doctor => {
            let pin = user_pin(&cli).ok();
            let checks = admin::doctor(&cli.module, &selector(&cli)?, pin.as_ref());
            let failed = checks.iter().filter(|c| !c.ok).count();
            if cli.format == Format::Json {
                println!("{}", json!({"ok": failed == 0, "checks": checks}));
            } else {
                for c in &checks {
                    println!(
                        "[{}] {}: {}",
                        if c.ok { " ok " } else { "FAIL" },
                        c.name,
                        c.detail
                    );
                    if let Some(fix) = &c.fix {
                        println!("       fix: {fix}");
                    }
                }
            }
            if failed > 0 {
                return Err(Failure::Token(format!("{failed} check(s) failed")));
            }
            Ok(())
        }
        Command::DevPki { out, clients } => {
            let mut parsed = Vec::new();
            for c in clients {
                let (stem, identity) = c.split_once('=').ok_or_else(|| {
                    Failure::Local(format!("--client {c}: expected STEM=IDENTITY"))
                })?;
                parsed.push((stem, identity));
            }
            strongroom_devpki::write_dev_pki(out, &parsed)
                .map_err(|e| Failure::Local(e.to_string()))?;
            println!("wrote a development PKI to {}", out.display());
            println!(
                "its CA keys are kept there (mode 0600): more officers with `strongroom-admin pki issue-officer NAME --dir {}`",
                out.display()
            );
            Ok(())
        }
    }
}
