//! Audit commands, offline on the officer's host: `verify` recomputes the HMAC chain with the
//! segment keys the token derives (the audit key never leaves it), checks that the log is
//! the one the token says is current and reaches its checkpoint, and follows the archived
//! predecessors back, naming any gap; `reconcile` pairs the intents of changes with their
//! outcomes and, given strongroomd's configuration, looks in its store for the change of
//! every intent left without one; `new-log` declares a new log in the token when the current
//! file is lost (the service stopped); `tail` and `search` read entries. `rotate` is online
//! (the admin plane, under dual control).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::json;

use strongroom::audit::{self, Checkpoint, Entry, HistoryReport, reconcile};
use strongroom::hsm::{self, HsmError, keys};

use crate::{Cli, Failure, Format};

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    /// Check the whole chain; name the first entry modified, removed, reordered or inserted,
    /// and a tail cut off before the token's last checkpoint; fail if the log is not the one
    /// the token says is current; then verify each archived predecessor its first entry
    /// names (`audit-<log_id>.log`), end to end, naming any gap. Needs the token and PIN.
    Verify {
        /// The audit log.
        file: PathBuf,
        /// Where the archived logs are (default: the log's directory).
        #[arg(long)]
        archive_dir: Option<PathBuf>,
        /// The log is an archived one: do not require it to be the token's current log.
        #[arg(long)]
        archived: bool,
        /// The token object holding the checkpoint of this audit chain.
        #[arg(long, default_value = keys::CHECKPOINT_LABEL)]
        checkpoint_label: String,
    },
    /// Declare a new audit log in the token, for a current log that is lost (offline, with
    /// the PIN, while strongroomd is stopped; online use `audit rotate`). The token records
    /// the new log's id and where the lost log ended as it last recorded it; strongroomd's
    /// next start begins the new log, whose first entry names its predecessor.
    NewLog {
        /// Why (recorded in the token and in the new log's first entry).
        #[arg(long)]
        reason: String,
        /// The token object holding the checkpoint of this audit chain.
        #[arg(long, default_value = keys::CHECKPOINT_LABEL)]
        checkpoint_label: String,
    },
    /// Rotate the audit log now (online, needs approval): the log is sealed and archived as
    /// `audit-<log_id>.log`, and a new log naming it starts.
    Rotate {
        /// Why (recorded in both logs).
        #[arg(long, default_value = "officer request")]
        reason: String,
    },
    /// Pair every intent (the entry written before a change to the store) with its outcome,
    /// and report each intent left without one (a crash between the two) — with `--config`,
    /// saying whether its change is in the store. Exit 2 when one is left: strongroomd
    /// settles them at its next start. With `--config` it needs the token and user PIN and
    /// must run while strongroomd is stopped (it opens the store as strongroomd does).
    Reconcile {
        /// The audit logs, oldest first (an intent's outcome may be in the next one).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// strongroomd's configuration file: its `[store]` is opened to tell whether each
        /// unsettled intent's change is in the store.
        #[arg(long)]
        config: Option<PathBuf>,
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
        /// Only entries at or after this time: RFC 3339 (2026-12-07T05:56:10Z), a duration
        /// back from now (2h, 7d) or Unix seconds.
        #[arg(long)]
        since: Option<String>,
        /// Only entries before this time (same forms as --since).
        #[arg(long)]
        until: Option<String>,
    },
}

pub(crate) fn run(cli: &Cli, cmd: &AuditCmd) -> Result<(), Failure> {
    let open = |f: &PathBuf| {
        File::open(f)
            .map(BufReader::new)
            .map_err(|e| Failure::Local(format!("cannot open {}: {e}", f.display())))
    };
    match cmd {
        AuditCmd::Verify {
            file,
            archive_dir,
            archived,
            checkpoint_label,
        } => {
            drop(open(file)?);
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
            let checkpoint = keys::read_data(&session, checkpoint_label)?
                .and_then(|v| serde_json::from_slice::<Checkpoint>(&v).ok());
            let dir = archive_dir
                .clone()
                .unwrap_or_else(|| audit::archive_dir(file));
            let report = audit::verify_history(
                file,
                &dir,
                |data| keys::hmac(&session, key, data),
                checkpoint.as_ref(),
                !archived,
            )?;
            print_report(cli.format, &report, checkpoint.as_ref(), file);
            match report.problem {
                None => Ok(()),
                Some(p) => Err(Failure::Token(format!(
                    "audit log verification failed: {}",
                    p.detail
                ))),
            }
        }
        AuditCmd::NewLog {
            reason,
            checkpoint_label,
        } => {
            audit::check_reason(reason).map_err(|e| Failure::Local(format!("--reason: {e}")))?;
            let pin = crate::user_pin(cli)?;
            let pkcs11 = hsm::load_module(&cli.module)?;
            let slot = hsm::find_token(&pkcs11, &crate::selector(cli)?)?;
            let session = pkcs11.open_rw_session(slot).map_err(HsmError::from)?;
            hsm::login(&session, &pin)?;
            let current = keys::read_data(&session, checkpoint_label)?
                .map(|v| serde_json::from_slice::<Checkpoint>(&v))
                .transpose()
                .map_err(|e| Failure::Token(format!("the token's audit checkpoint does not parse: {e}")))?
                .ok_or_else(|| {
                    Failure::Token(
                        "the token tracks no audit log yet: strongroomd starts the first one itself".into(),
                    )
                })?;
            if current.is_pending() {
                return Err(Failure::Token(format!(
                    "the token already declares log {}, not started yet: start strongroomd to start it",
                    current.log_id
                )));
            }
            let next = current
                .declare_next(reason)
                .map_err(|e| Failure::Local(e.to_string()))?;
            keys::write_data(&session, checkpoint_label, &next.to_bytes())?;
            if cli.format == Format::Json {
                println!(
                    "{}",
                    json!({"log_id": next.log_id, "previous": next.previous, "reason": reason})
                );
            } else {
                println!(
                    "declared audit log {} after log {} ({} entries as the token last recorded them)",
                    next.log_id, current.log_id, current.count
                );
                println!(
                    "strongroomd starts it at its next start; keep any copy of log {} as audit-{}.log next to the audit log, so that `audit verify` can follow the history",
                    current.log_id, current.log_id
                );
            }
            Ok(())
        }
        AuditCmd::Rotate { .. } => Err(Failure::Local("audit rotate is an online command".into())),
        AuditCmd::Reconcile { files, config } => {
            let mut entries = Vec::new();
            for f in files {
                entries.extend(audit::read_entries(open(f)?));
            }
            let pairing = reconcile::pair(entries);
            let opened = match config {
                Some(c) => Some(open_store(cli, c)?),
                None => None,
            };
            let mut findings = Vec::new();
            for intent in &pairing.unsettled {
                let found = match &opened {
                    Some((store, keys)) => {
                        let probe = reconcile::Probe {
                            store: store.as_ref(),
                            master_keys: Some(keys),
                        };
                        let (p, why) = reconcile::presence(intent, &probe)
                            .map_err(|e| Failure::Token(format!("cannot read the store: {e}")))?;
                        Some((p, why))
                    }
                    None => None,
                };
                findings.push((intent, found));
            }
            if cli.format == Format::Json {
                let unsettled: Vec<_> = findings
                    .iter()
                    .map(|(e, f)| {
                        json!({
                            "change": e.change,
                            "seq": e.seq,
                            "operation": e.operation,
                            "name": e.name,
                            "version": e.version,
                            "identity": e.identity,
                            "in_store": f.as_ref().map(|(p, _)| p),
                            "why": f.as_ref().map(|(_, w)| w),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    json!({
                        "intents": pairing.intents,
                        "outcomes": pairing.outcomes,
                        "settled": pairing.settled,
                        "unsettled": unsettled,
                    })
                );
            } else {
                println!(
                    "{} intents, {} settled by an outcome, {} without one",
                    pairing.intents,
                    pairing.settled,
                    findings.len()
                );
                for (e, f) in &findings {
                    let verdict = match f {
                        Some((reconcile::Presence::InStore, why)) => format!("IN the store: {why}"),
                        Some((reconcile::Presence::NotInStore, why)) => {
                            format!("NOT in the store: {why}")
                        }
                        Some((reconcile::Presence::Unknown, why)) => format!("unknown: {why}"),
                        None => "not checked (give --config to look in the store)".into(),
                    };
                    println!(
                        "UNSETTLED change {} (seq {}): {} {}{} by {}: {verdict}",
                        e.change.as_deref().unwrap_or("-"),
                        e.seq,
                        e.operation,
                        e.name.as_deref().unwrap_or("-"),
                        e.version.map_or(String::new(), |v| format!(" v{v}")),
                        e.identity.as_deref().unwrap_or("-"),
                    );
                }
            }
            if findings.is_empty() {
                Ok(())
            } else {
                Err(Failure::Token(format!(
                    "{} intent(s) without an outcome; strongroomd settles them at its next start",
                    findings.len()
                )))
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
            until,
        } => {
            let now = std::time::SystemTime::now();
            let ms = |flag: &str, v: &Option<String>| -> Result<Option<u64>, Failure> {
                v.as_deref()
                    .map(|t| {
                        strongroom::when::parse_instant(t, now)
                            .map(|s| (s.max(0) as u64).saturating_mul(1000))
                            .map_err(|e| Failure::Local(format!("{flag}: {e}")))
                    })
                    .transpose()
            };
            let since_ms = ms("--since", since)?;
            let until_ms = ms("--until", until)?;
            let found: Vec<Entry> = audit::read_entries(open(file)?)
                .filter(|e| {
                    identity
                        .as_ref()
                        .is_none_or(|i| e.identity.as_ref() == Some(i))
                })
                .filter(|e| name.as_ref().is_none_or(|n| e.is_about(n)))
                .filter(|e| since_ms.is_none_or(|s| e.ts_ms >= s))
                .filter(|e| until_ms.is_none_or(|u| e.ts_ms < u))
                .collect();
            if found.is_empty() {
                eprintln!("no entry matches");
            }
            print_entries(cli.format, &found);
            Ok(())
        }
    }
}

fn print_report(format: Format, report: &HistoryReport, cp: Option<&Checkpoint>, file: &Path) {
    if format == Format::Json {
        println!("{}", json!(report));
        return;
    }
    match &report.problem {
        None => println!(
            "ok: {} entries verified in {}{}",
            report.verified,
            file.display(),
            cp.map_or(String::new(), |c| format!(
                "; the token's checkpoint records {}",
                c.count
            ))
        ),
        Some(p) => println!(
            "FAILED at line {} ({:?}): {}; {} entries verified before it",
            p.line, p.kind, p.detail, report.verified
        ),
    }
    for log in report.logs.iter().skip(1) {
        println!(
            "  predecessor {} ({}): {} entries verified{}",
            log.log_id.as_deref().unwrap_or("?"),
            log.file,
            log.verified,
            if log.problem.is_some() {
                " (with a problem)"
            } else {
                ""
            }
        );
    }
}

/// Opens the store strongroomd's configuration names, under the state key the token derives
/// (as strongroomd does), and reads the token's master key versions.
fn open_store(
    cli: &Cli,
    config: &Path,
) -> Result<(std::sync::Arc<dyn strongroom::store::Store>, Vec<u32>), Failure> {
    let config = strongroom::config::Config::load(config)
        .map_err(|e| Failure::Local(format!("{}: {e}", config.display())))?;
    if config.store.backend == strongroom::config::StoreBackend::Sled && !config.store.path.exists()
    {
        return Err(Failure::Local(format!(
            "there is no store at {}: check [store] path in the configuration",
            config.store.path.display()
        )));
    }
    let pin = crate::user_pin(cli)?;
    let pkcs11 = hsm::load_module(&cli.module)?;
    let slot = hsm::find_token(&pkcs11, &crate::selector(cli)?)?;
    let session = pkcs11.open_ro_session(slot).map_err(HsmError::from)?;
    hsm::login(&session, &pin)?;
    let bytes = crate::store_state_key(&session)?;
    let versions = keys::find(&session)?.into_iter().map(|(v, _)| v).collect();
    let store = strongroom::store::open(
        &config.store,
        config.limits.max_value_bytes,
        strongroom::store::StateKey::new(&bytes),
    )
    .map_err(|e| {
        Failure::Token(format!(
            "cannot open the store (is strongroomd still running on it?): {e}"
        ))
    })?;
    Ok((store, versions))
}

fn print_entries(format: Format, entries: &[Entry]) {
    for e in entries {
        if format == Format::Json {
            let mut v = json!(e);
            if let Some(o) = v.as_object_mut() {
                o.insert("ts".into(), json!(strongroom::when::rfc3339_ms(e.ts_ms)));
            }
            println!("{v}");
        } else {
            println!(
                "{:>6} {:<24} {:<6} {:<9} {:<16} {:<40} {:<6} {}",
                e.seq,
                strongroom::when::rfc3339_ms(e.ts_ms),
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
