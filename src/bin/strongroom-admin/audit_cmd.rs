//! Audit commands, offline on the officer's host: `verify` recomputes the HMAC chain with the
//! segment keys the token derives (the audit key never leaves it) and compares the log's end
//! with the token's checkpoint; `tail` and `search` read entries.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use strongroom::audit::{self, Checkpoint, Entry};
use strongroom::hsm::{self, HsmError, keys};

use crate::{Cli, Failure, Format};

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    /// Check the whole chain; name the first entry modified, removed, reordered or inserted,
    /// and a tail cut off before the token's last checkpoint. Needs the token and user PIN.
    Verify {
        /// The audit log.
        file: PathBuf,
    },
    /// The last entries.
    Tail {
        /// The audit log.
        file: PathBuf,
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
    /// Entries matching every filter given.
    Search {
        /// The audit log.
        file: PathBuf,
        /// Caller identity, exactly.
        #[arg(long)]
        identity: Option<String>,
        /// Secret, policy or approval name, exactly (an invalid name recorded cut is found by
        /// its SHA-256).
        #[arg(long)]
        name: Option<String>,
        /// Only entries at or after this time (Unix seconds).
        #[arg(long)]
        since: Option<u64>,
    },
}

pub(crate) fn run(cli: &Cli, cmd: &AuditCmd) -> Result<(), Failure> {
    let open = |f: &PathBuf| {
        File::open(f)
            .map(BufReader::new)
            .map_err(|e| Failure::Local(format!("cannot open {}: {e}", f.display())))
    };
    match cmd {
        AuditCmd::Verify { file } => {
            let reader = open(file)?;
            let pin = crate::user_pin(cli)?;
            let pkcs11 = hsm::load_module(&cli.module)?;
            let slot = hsm::find_token(&pkcs11, &crate::selector(cli)?)?;
            let session = pkcs11.open_ro_session(slot).map_err(HsmError::from)?;
            hsm::login(&session, &pin)?;
            let key = keys::find_mac(&session, keys::MacKey::Audit)?.ok_or_else(|| {
                Failure::Token(format!(
                    "the token holds no {}: this is not the token that wrote the log",
                    keys::MacKey::Audit.label()
                ))
            })?;
            let checkpoint = keys::read_checkpoint(&session)?
                .and_then(|v| serde_json::from_slice::<Checkpoint>(&v).ok());
            let report = audit::verify(
                reader,
                |data| keys::hmac(&session, key, data),
                checkpoint.as_ref(),
            )?;
            if cli.format == Format::Json {
                println!("{}", json!(report));
            } else {
                match &report.problem {
                    None => println!(
                        "ok: {} entries verified{}",
                        report.verified,
                        checkpoint.as_ref().map_or(String::new(), |c| format!(
                            "; the token's checkpoint records {}",
                            c.count
                        ))
                    ),
                    Some(p) => println!(
                        "FAILED at line {} ({:?}): {}; {} entries verified before it",
                        p.line, p.kind, p.detail, report.verified
                    ),
                }
            }
            match report.problem {
                None => Ok(()),
                Some(p) => Err(Failure::Token(format!(
                    "audit log verification failed: {}",
                    p.detail
                ))),
            }
        }
        AuditCmd::Tail { file, lines } => {
            let entries: Vec<Entry> = audit::read_entries(open(file)?).collect();
            let start = entries.len().saturating_sub(*lines);
            print_entries(cli.format, &entries[start..]);
            Ok(())
        }
        AuditCmd::Search {
            file,
            identity,
            name,
            since,
        } => {
            let since_ms = since.map(|s| s.saturating_mul(1000));
            let found: Vec<Entry> = audit::read_entries(open(file)?)
                .filter(|e| {
                    identity
                        .as_ref()
                        .is_none_or(|i| e.identity.as_ref() == Some(i))
                })
                .filter(|e| name.as_ref().is_none_or(|n| e.is_about(n)))
                .filter(|e| since_ms.is_none_or(|s| e.ts_ms >= s))
                .collect();
            print_entries(cli.format, &found);
            Ok(())
        }
    }
}

fn print_entries(format: Format, entries: &[Entry]) {
    for e in entries {
        if format == Format::Json {
            println!("{}", json!(e));
        } else {
            println!(
                "{:>6} {:>13} {:<6} {:<9} {:<16} {:<40} {:<6} {}",
                e.seq,
                e.ts_ms,
                e.plane,
                e.decision,
                e.operation,
                e.identity.as_deref().unwrap_or("-"),
                e.status,
                shown_name(e)
            );
        }
    }
}

/// The name column: as recorded, or for an invalid name (recorded with its length and
/// SHA-256) escaped, marked when cut, with its length.
fn shown_name(e: &Entry) -> String {
    let name = e.name.as_deref().unwrap_or("");
    match (&e.name_sha256, e.name_len) {
        (Some(sha), Some(len)) => format!(
            "{:?}{} (invalid, {len} bytes, sha256 {sha})",
            name,
            if e.name_truncated == Some(true) {
                "…"
            } else {
                ""
            }
        ),
        _ => name.to_owned(),
    }
}
