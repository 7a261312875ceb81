//! `strongroom-admin report`: what officers should know about the store's secrets, online.
//!
//! `report expiring --within 7d` lists every secret whose latest version expires within the
//! window (or has expired), across the whole store, a page at a time
//! (AdminService.ReportExpiring): names, versions and times only, never values.

use clap::Subcommand;
use serde_json::json;
use tonic::transport::Channel;

use strongroom::proto::ReportExpiringRequest;
use strongroom::proto::admin_service_client::AdminServiceClient;

use crate::{Failure, Format};

#[derive(Subcommand)]
pub(crate) enum ReportCmd {
    /// Secrets whose latest version expires within a window (or has expired).
    Expiring {
        /// The window from now: 7d, 12h, 90m.
        #[arg(long, default_value = "7d")]
        within: String,
    },
}

/// Runs a report over the connected admin client.
pub(crate) async fn run(
    c: &mut AdminServiceClient<Channel>,
    format: Format,
    cmd: &ReportCmd,
) -> Result<(), Failure> {
    let ReportCmd::Expiring { within } = cmd;
    let within_seconds =
        strongroom::when::duration_secs(within).map_err(|e| Failure::Local(e.to_string()))?;
    let mut rows = Vec::new();
    let mut after = String::new();
    loop {
        let page = c
            .report_expiring(ReportExpiringRequest {
                within_seconds,
                after: after.clone(),
                limit: 0,
            })
            .await
            .map_err(|s| Failure::Rpc(Box::new(s)))?
            .into_inner();
        rows.extend(page.secrets);
        if page.next_after.is_empty() {
            break;
        }
        after = page.next_after;
    }
    if format == Format::Json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({"name": r.name, "version": r.version, "expires_at_unix": r.expires_at_unix,
                    "expires_at": strongroom::when::rfc3339(r.expires_at_unix), "expired": r.expired})
            })
            .collect();
        println!("{}", json!({ "within": within, "expiring": rows }));
        return Ok(());
    }
    if rows.is_empty() {
        println!("no secret expires within {within}");
        return Ok(());
    }
    println!("{:<40}  {:>8}  {:<20}  STATE", "NAME", "VERSION", "EXPIRES");
    for r in &rows {
        let state = if r.expired { "expired" } else { "expiring" };
        println!(
            "{:<40}  {:>8}  {:<20}  {state}",
            r.name,
            r.version,
            strongroom::when::rfc3339(r.expires_at_unix)
        );
    }
    Ok(())
}
