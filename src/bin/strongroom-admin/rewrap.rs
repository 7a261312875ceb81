//! `rewrap` and master key retirement (`key list --online`, `key decrypt-only`, `key disable`,
//! `key destroy`): online commands, the guarded ones under dual control.

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tonic::transport::Channel;

use strongroom::proto::admin_service_client::AdminServiceClient;
use strongroom::proto::{
    ListMasterKeysRequest, RewrapProgress, RewrapRequest, SetMasterKeyStateRequest,
    WatchRewrapRequest,
};

use crate::{Failure, Format, KeyCmd};

/// `strongroom-admin rewrap`.
#[derive(Args, Clone)]
pub(crate) struct RewrapArgs {
    /// Move only the records under this master key version (default: every older version).
    #[arg(long)]
    pub(crate) from_version: Option<u32>,
    /// Count what would move, change nothing (needs no approval).
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Records per second (default: the service's, 1000).
    #[arg(long)]
    pub(crate) rate: Option<u32>,
    /// Only follow the running re-wrap (a progress bar, then its summary).
    #[arg(long, conflicts_with_all = ["dry_run", "from_version", "rate"])]
    pub(crate) watch: bool,
}

fn server(s: tonic::Status) -> Failure {
    Failure::Rpc(Box::new(s))
}

/// Runs `rewrap`.
pub(crate) async fn rewrap(
    c: &mut AdminServiceClient<Channel>,
    format: Format,
    args: &RewrapArgs,
) -> Result<(), Failure> {
    if !args.watch {
        let r = c
            .rewrap(RewrapRequest {
                from_version: args.from_version.unwrap_or(0),
                dry_run: args.dry_run,
                rate: args.rate.unwrap_or(0),
            })
            .await
            .map_err(server)?
            .into_inner();
        if let Some(p) = &r.dry_run {
            print_summary(format, p);
            return Ok(());
        }
        let Some(op) = r.operation else {
            return Err(Failure::Token("the service answered nothing".into()));
        };
        crate::online::print_operation(format, &op)?;
        if !op.executed {
            // Pending another officer's approval: nothing runs yet.
            return Ok(());
        }
    }
    watch(c, format).await
}

/// Follows the running re-wrap with a progress bar (table format), then prints its summary.
async fn watch(c: &mut AdminServiceClient<Channel>, format: Format) -> Result<(), Failure> {
    let mut stream = c
        .watch_rewrap(WatchRewrapRequest {})
        .await
        .map_err(server)?
        .into_inner();
    let bar = (format == Format::Table && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "re-wrap to v{msg} [{bar:40}] {pos}/{len} records ({per_sec}, eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
    let mut last = None;
    while let Some(p) = stream.message().await.map_err(server)? {
        if let Some(bar) = &bar {
            bar.set_length(p.total.max(p.rewrapped + p.changed + p.failed));
            bar.set_position(p.rewrapped + p.changed + p.failed);
            bar.set_message(p.to_version.to_string());
        } else if format == Format::Json && p.state == "running" {
            println!("{}", progress_json(&p));
        }
        last = Some(p);
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let Some(p) = last else {
        return Err(Failure::Token("the service sent no progress".into()));
    };
    print_summary(format, &p);
    if p.state == "failed" {
        return Err(Failure::Token(format!("the re-wrap failed: {}", p.error)));
    }
    Ok(())
}

fn progress_json(p: &RewrapProgress) -> serde_json::Value {
    json!({
        "state": p.state, "from_version": p.from_version, "to_version": p.to_version,
        "total": p.total, "rewrapped": p.rewrapped, "changed": p.changed, "failed": p.failed,
        "examined": p.examined, "rate_limit": p.rate_limit,
        "started_at_unix": p.started_at_unix, "finished_at_unix": p.finished_at_unix,
        "error": p.error, "approval_id": p.approval_id,
        "remaining": p.remaining.iter().map(|r| json!({"version": r.version, "records": r.records})).collect::<Vec<_>>(),
    })
}

fn print_summary(format: Format, p: &RewrapProgress) {
    if format == Format::Json {
        println!("{}", progress_json(p));
        return;
    }
    let remaining: u64 = p.remaining.iter().map(|r| r.records).sum();
    let by_version = p
        .remaining
        .iter()
        .map(|r| format!("v{}: {}", r.version, r.records))
        .collect::<Vec<_>>()
        .join(", ");
    match p.state.as_str() {
        "dry-run" => println!(
            "dry run: {} record(s) would move to master key version {}{}",
            p.total,
            p.to_version,
            if by_version.is_empty() {
                String::new()
            } else {
                format!(" ({by_version})")
            }
        ),
        "none" => println!("no re-wrap has run"),
        state => {
            let secs = (p.finished_at_unix - p.started_at_unix).max(0);
            println!(
                "re-wrap to master key version {} {state}: {} re-sealed, {} changed by others meanwhile, {} could not be opened, in {secs} s",
                p.to_version, p.rewrapped, p.changed, p.failed
            );
            if !p.error.is_empty() {
                println!("error: {}", p.error);
            }
            if remaining == 0 {
                if state == "finished" {
                    println!("no record references an older master key version");
                }
            } else {
                println!(
                    "still under older versions: {remaining} ({by_version}); run `strongroom-admin rewrap` again"
                );
            }
        }
    }
}

/// Runs the online `key` commands of retirement.
pub(crate) async fn key(
    c: &mut AdminServiceClient<Channel>,
    format: Format,
    cmd: &KeyCmd,
) -> Result<(), Failure> {
    let (version, state) = match cmd {
        KeyCmd::List { .. } => {
            let keys = c
                .list_master_keys(ListMasterKeysRequest {})
                .await
                .map_err(server)?
                .into_inner()
                .keys;
            if format == Format::Json {
                let rows: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        json!({"version": k.version, "state": k.state, "references": k.references,
                               "current": k.current, "in_token": k.in_token})
                    })
                    .collect();
                println!("{}", json!(rows));
                return Ok(());
            }
            println!(
                "{:>7}  {:<12}  {:>10}  {:<7}  IN TOKEN",
                "VERSION", "STATE", "REFERENCES", "CURRENT"
            );
            for k in &keys {
                println!(
                    "{:>7}  {:<12}  {:>10}  {:<7}  {}",
                    k.version,
                    k.state,
                    k.references,
                    if k.current { "yes" } else { "" },
                    if k.in_token { "yes" } else { "no" }
                );
            }
            return Ok(());
        }
        KeyCmd::DecryptOnly { version } => (*version, "decrypt-only"),
        KeyCmd::Disable { version } => (*version, "disabled"),
        KeyCmd::Destroy { version } => (*version, "destroyed"),
        _ => return Err(Failure::Local("not an online key command".into())),
    };
    let r = c
        .set_master_key_state(SetMasterKeyStateRequest {
            version,
            state: state.into(),
        })
        .await
        .map_err(server)?
        .into_inner();
    crate::online::print_operation(format, &r)
}
