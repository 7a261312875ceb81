//! Online commands: the officer's certificate against the admin listener of `strongroomd`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;
use tonic::transport::Channel;

use strongroom::explain::{Plane, Target};
use strongroom::proto::admin_service_client::AdminServiceClient;
use strongroom::proto::{
    AcceptStoreStateRequest, Approval, ApproveRequest, CheckPolicyRequest, DeletePolicyRequest,
    DestroySecretRequest, GetApprovalRequest, GetPolicyRequest, ListApprovalsRequest,
    ListPoliciesRequest, OperationResponse, PolicyInfo, PutPolicyRequest, RejectRequest,
    RotateAuditLogRequest, RotateMasterKeyRequest, StatusRequest,
};
use strongroom::when;

use crate::audit_cmd::AuditCmd;
use crate::{Command, Failure, Format, GLOBAL, KeyCmd};

/// How to reach the admin listener.
#[derive(Args)]
pub(crate) struct Connection {
    /// Admin listener address.
    #[arg(
        long,
        env = "STRONGROOM_ADMIN_ADDR",
        default_value = "https://localhost:7444",
        global = true,
        help_heading = GLOBAL
    )]
    admin_addr: String,
    /// CA certificate the admin listener must chain to (PEM).
    #[arg(long, env = "STRONGROOM_ADMIN_CACERT", global = true, help_heading = GLOBAL)]
    admin_cacert: Option<PathBuf>,
    /// The officer's certificate from the admin CA (PEM).
    #[arg(long, env = "STRONGROOM_ADMIN_CERT", global = true, help_heading = GLOBAL)]
    admin_cert: Option<PathBuf>,
    /// The officer's private key (PEM).
    #[arg(long, env = "STRONGROOM_ADMIN_KEY", global = true, help_heading = GLOBAL)]
    admin_key: Option<PathBuf>,
    /// Name to verify in the admin listener's certificate (default: the address's host).
    #[arg(long, env = "STRONGROOM_ADMIN_SERVER_NAME", global = true, help_heading = GLOBAL)]
    admin_server_name: Option<String>,
    /// Request deadline in seconds.
    #[arg(long, default_value_t = 30, env = "STRONGROOM_TIMEOUT", global = true, help_heading = GLOBAL)]
    timeout: u64,
}

#[derive(Subcommand)]
pub(crate) enum PolicyCmd {
    /// Store a policy from a TOML or JSON file (needs approval).
    Put {
        /// Policy name.
        name: String,
        /// The policy document.
        file: PathBuf,
    },
    /// Show a stored policy.
    Get {
        /// Policy name.
        name: String,
    },
    /// Every stored policy.
    List,
    /// Delete a policy (needs approval).
    Delete {
        /// Policy name.
        name: String,
    },
    /// Dry run: would IDENTITY be allowed CAPABILITY on NAME, and by which rule?
    Check {
        /// Client identity (e.g. spiffe://bank/payments).
        identity: String,
        /// read, write, list or delete.
        capability: String,
        /// Secret name.
        name: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum ApprovalCmd {
    /// Pending approvals (all with --all).
    List {
        /// Include executed, rejected, expired and failed ones.
        #[arg(long)]
        all: bool,
    },
    /// One approval: the operation, its parameters and their digest (the `params_sha256` of
    /// its audit entries), and whose approvals count.
    Show {
        /// Approval id.
        id: String,
        /// Print long parameters (a policy document) whole instead of by size and digest.
        #[arg(long)]
        full: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum StoreCmd {
    /// Accept the store as it is after its rollback check failed (needs approval).
    Accept,
    /// Copy a store (ciphertext and wrapped keys only) to another backend, offline with the
    /// token's PIN, then verify the copy; strongroomd refuses a half-migrated target.
    Migrate {
        /// The service's configuration file: the token, and etcd's TLS files and prefix.
        #[arg(long, env = "STRONGROOM_CONFIG")]
        config: PathBuf,
        /// The store to copy: sled:PATH or etcd:ENDPOINT[,ENDPOINT…].
        #[arg(long)]
        from: crate::migrate_cmd::Side,
        /// The empty store to copy into: sled:PATH or etcd:ENDPOINT[,ENDPOINT…].
        #[arg(long)]
        to: crate::migrate_cmd::Side,
    },
}

#[derive(Subcommand)]
pub(crate) enum SecretCmd {
    /// Destroy every version of a secret (needs approval).
    Destroy {
        /// Secret name.
        name: String,
    },
}

/// Runs an online command.
pub(crate) fn run(conn: &Connection, format: Format, command: &Command) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Local(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async {
        let target = target(conn)?;
        match run_async(&target, format, command).await {
            Err(Failure::Rpc(status)) => Err(explain_status(*status, target).await),
            other => other,
        }
    })
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
        Ok((_, Some(words))) => Failure::Token(words),
        Ok((status, None)) => Failure::Rpc(Box::new(status)),
        Err(e) => Failure::Local(format!("cannot explain the failure: {e}")),
    }
}

async fn run_async(target: &Target, format: Format, command: &Command) -> Result<(), Failure> {
    // Read local input before connecting, so usage errors never reach the server.
    let document = match command {
        Command::Policy(PolicyCmd::Put { file, .. }) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| Failure::Local(format!("cannot read {}: {e}", file.display())))?,
        ),
        _ => None,
    };
    let mut c = connect(target).await?;
    let server = |s: tonic::Status| Failure::Rpc(Box::new(s));
    match command {
        Command::Status => {
            let s = c
                .status(StatusRequest {})
                .await
                .map_err(server)?
                .into_inner();
            if format == Format::Json {
                println!(
                    "{}",
                    json!({
                        "token": s.token, "token_available": s.token_available,
                        "master_key_versions": s.master_key_versions,
                        "current_master_key": s.current_master_key,
                        "mac_keys_missing": s.mac_keys_missing,
                        "store_bytes": s.store_bytes, "secrets": s.secrets,
                        "listeners": s.listeners, "audit_path": s.audit_path,
                        "audit_healthy": s.audit_healthy,
                        "pending_approvals": s.pending_approvals, "quorum": s.quorum,
                        "dangerous_settings": s.dangerous_settings,
                        "tampered_policies": s.tampered_policies, "policies": s.policies,
                        "store_rollback": s.store_rollback, "hsm_state": s.hsm_state,
                        "list_keys_examined": s.list_keys_examined,
                    })
                );
                return Ok(());
            }
            for d in &s.dangerous_settings {
                println!("!!! DANGEROUS SETTING ON: {d}");
            }
            if !s.store_rollback.is_empty() {
                println!("!!! STORE ROLLBACK CHECK FAILED: {}", s.store_rollback);
                println!("!!! no secret is served; review, then: strongroom-admin store accept");
            }
            let rows = [
                ("token", format!("{} ({})", s.token, s.hsm_state)),
                (
                    "master keys",
                    format!(
                        "{:?} (current {})",
                        s.master_key_versions, s.current_master_key
                    ),
                ),
                (
                    "MAC keys missing",
                    if s.mac_keys_missing.is_empty() {
                        "none".into()
                    } else {
                        s.mac_keys_missing.join(", ")
                    },
                ),
                ("secrets", s.secrets.to_string()),
                ("store bytes", s.store_bytes.to_string()),
                ("list keys examined", s.list_keys_examined.to_string()),
                ("policies", s.policies.to_string()),
                (
                    "tampered policies",
                    if s.tampered_policies.is_empty() {
                        "none".into()
                    } else {
                        s.tampered_policies.join(", ")
                    },
                ),
                ("listeners", s.listeners.join("; ")),
                (
                    "audit",
                    format!(
                        "{} ({})",
                        s.audit_path,
                        if s.audit_healthy {
                            "writing"
                        } else {
                            "FAILING: requests refused"
                        }
                    ),
                ),
                ("pending approvals", s.pending_approvals.to_string()),
                ("quorum", s.quorum.to_string()),
            ];
            for (k, v) in rows {
                println!("{k:<18} {v}");
            }
            Ok(())
        }
        Command::Policy(PolicyCmd::Put { name, .. }) => {
            let r = c
                .put_policy(PutPolicyRequest {
                    name: name.clone(),
                    document: document.unwrap_or_default(),
                })
                .await
                .map_err(server)?
                .into_inner();
            print_operation(format, &r)
        }
        Command::Policy(PolicyCmd::Get { name }) => {
            let p = c
                .get_policy(GetPolicyRequest { name: name.clone() })
                .await
                .map_err(server)?
                .into_inner();
            if format == Format::Json {
                println!("{}", policy_json(&p));
            } else {
                println!(
                    "# policy '{}' revision {} at {} by {} (approval {}){}",
                    p.name,
                    p.revision,
                    when::rfc3339(p.updated_at_unix),
                    p.updated_by,
                    if p.approval_id.is_empty() {
                        "-"
                    } else {
                        &p.approval_id
                    },
                    if p.authentic {
                        ""
                    } else {
                        " — FAILED AUTHENTICATION: refused"
                    }
                );
                print!("{}", p.document);
            }
            Ok(())
        }
        Command::Policy(PolicyCmd::List) => {
            let list = c
                .list_policies(ListPoliciesRequest {})
                .await
                .map_err(server)?
                .into_inner()
                .policies;
            if format == Format::Json {
                let v: Vec<_> = list.iter().map(policy_json).collect();
                println!("{}", json!(v));
            } else {
                if list.is_empty() {
                    eprintln!("no policies stored");
                    return Ok(());
                }
                println!(
                    "{:<24} {:>8}  {:<10}  {:<20}  UPDATED BY",
                    "NAME", "REVISION", "AUTHENTIC", "UPDATED"
                );
                for p in list {
                    println!(
                        "{:<24} {:>8}  {:<10}  {:<20}  {}",
                        p.name,
                        p.revision,
                        p.authentic,
                        when::rfc3339(p.updated_at_unix),
                        p.updated_by
                    );
                }
            }
            Ok(())
        }
        Command::Policy(PolicyCmd::Delete { name }) => {
            let r = c
                .delete_policy(DeletePolicyRequest { name: name.clone() })
                .await
                .map_err(server)?
                .into_inner();
            print_operation(format, &r)
        }
        Command::Policy(PolicyCmd::Check {
            identity,
            capability,
            name,
        }) => {
            let r = c
                .check_policy(CheckPolicyRequest {
                    identity: identity.clone(),
                    capability: capability.clone(),
                    name: name.clone(),
                })
                .await
                .map_err(server)?
                .into_inner();
            if format == Format::Json {
                println!(
                    "{}",
                    json!({"allowed": r.allowed, "decided_by": r.decided_by})
                );
            } else {
                println!(
                    "{}: {}",
                    if r.allowed { "allow" } else { "deny" },
                    r.decided_by
                );
            }
            Ok(())
        }
        Command::Approval(ApprovalCmd::List { all }) => {
            let list = c
                .list_approvals(ListApprovalsRequest { all: *all })
                .await
                .map_err(server)?
                .into_inner()
                .approvals;
            if format == Format::Json {
                let v: Vec<_> = list.iter().map(approval_json).collect();
                println!("{}", json!(v));
            } else {
                if list.is_empty() {
                    eprintln!(
                        "{}",
                        if *all {
                            "no approvals"
                        } else {
                            "no pending approvals (--all shows past ones)"
                        }
                    );
                    return Ok(());
                }
                println!(
                    "{:<16}  {:<16}  {:<9}  {:<9}  {:<20}  {:<40}  NOTE",
                    "ID", "OPERATION", "STATE", "APPROVALS", "EXPIRES", "REQUESTER"
                );
                for a in list {
                    println!(
                        "{:<16}  {:<16}  {:<9}  {:<9}  {:<20}  {:<40}  {}",
                        a.id,
                        a.operation,
                        a.state,
                        format!("{}/{}", a.counted, a.quorum),
                        when::rfc3339(a.expires_at_unix),
                        a.requester,
                        list_note(&a)
                    );
                }
            }
            Ok(())
        }
        Command::Approval(ApprovalCmd::Show { id, full }) => {
            let a = c
                .get_approval(GetApprovalRequest { id: id.clone() })
                .await
                .map_err(server)?
                .into_inner();
            print_approval(format, &a, *full)
        }
        Command::Approve { id } => {
            let r = c
                .approve(ApproveRequest { id: id.clone() })
                .await
                .map_err(server)?
                .into_inner();
            print_operation(format, &r)
        }
        Command::Reject { id } => {
            let a = c
                .reject(RejectRequest { id: id.clone() })
                .await
                .map_err(server)?
                .into_inner();
            print_approval(format, &a, false)
        }
        Command::Secret(SecretCmd::Destroy { name }) => {
            let r = c
                .destroy_secret(DestroySecretRequest { name: name.clone() })
                .await
                .map_err(server)?
                .into_inner();
            print_operation(format, &r)
        }
        Command::Store(StoreCmd::Accept) => {
            let r = c
                .accept_store_state(AcceptStoreStateRequest {})
                .await
                .map_err(server)?
                .into_inner();
            print_operation(format, &r)
        }
        Command::Key(KeyCmd::Rotate) => {
            let r = c
                .rotate_master_key(RotateMasterKeyRequest {})
                .await
                .map_err(server)?
                .into_inner();
            print_operation(format, &r)
        }
        Command::Audit(AuditCmd::Rotate { reason }) => {
            let r = c
                .rotate_audit_log(RotateAuditLogRequest {
                    reason: reason.clone(),
                })
                .await
                .map_err(server)?
                .into_inner();
            print_operation(format, &r)
        }
        Command::Report(cmd) => crate::report_cmd::run(&mut c, format, cmd).await,
        Command::Rewrap(args) => crate::rewrap::rewrap(&mut c, format, args).await,
        Command::Key(
            k @ (KeyCmd::List { .. }
            | KeyCmd::DecryptOnly { .. }
            | KeyCmd::Disable { .. }
            | KeyCmd::Destroy { .. }),
        ) => crate::rewrap::key(&mut c, format, k).await,
        _ => Err(Failure::Local("not an online command".into())),
    }
}

/// Where to connect and with what; warns if the officer's key is open to group or others.
fn target(conn: &Connection) -> Result<Target, Failure> {
    let need = |p: &Option<PathBuf>, flag: &str, env: &str| {
        p.clone()
            .ok_or_else(|| Failure::Local(format!("{flag} (or {env}) is required")))
    };
    let cacert = need(
        &conn.admin_cacert,
        "--admin-cacert",
        "STRONGROOM_ADMIN_CACERT",
    )?;
    let cert = need(&conn.admin_cert, "--admin-cert", "STRONGROOM_ADMIN_CERT")?;
    let key = need(&conn.admin_key, "--admin-key", "STRONGROOM_ADMIN_KEY")?;
    strongroom::files::warn_if_loose(&key, "officer's private key");
    Ok(Target::new(
        Plane::Admin,
        &conn.admin_addr,
        &cacert,
        Some((&cert, &key)),
        conn.admin_server_name.as_deref(),
        Duration::from_secs(conn.timeout),
    ))
}

async fn connect(target: &Target) -> Result<AdminServiceClient<Channel>, Failure> {
    let channel = strongroom::tls::connect(target)
        .await
        .map_err(|e| match e {
            strongroom::tls::ConnectError::Local(m) => Failure::Local(m),
            strongroom::tls::ConnectError::Remote(m) => Failure::Token(m),
        })?;
    Ok(AdminServiceClient::new(channel))
}

fn approval_json(a: &Approval) -> serde_json::Value {
    // JSON is for programs: the parameters are given whole.
    json!({
        "id": a.id, "operation": a.operation, "parameters": a.parameters,
        "params_sha256": a.params_sha256,
        "requester": a.requester, "approvers": a.approvers, "quorum": a.quorum,
        "counted": a.counted,
        "standing": a.standing.iter().map(|s| json!({
            "officer": s.officer, "counts": s.counts, "reason": s.reason,
        })).collect::<Vec<_>>(),
        "blocked": a.blocked,
        "created_at": when::rfc3339(a.created_at_unix), "created_at_unix": a.created_at_unix,
        "expires_at": when::rfc3339(a.expires_at_unix), "expires_at_unix": a.expires_at_unix,
        "finished_at": (a.finished_at_unix > 0).then(|| when::rfc3339(a.finished_at_unix)),
        "finished_at_unix": a.finished_at_unix,
        "state": a.state, "result": a.result, "rejected_by": a.rejected_by,
    })
}

/// What `approval list` flags about an approval: approvals that do not count, or why it
/// cannot run.
fn list_note(a: &Approval) -> String {
    let not_counting: Vec<&str> = a
        .standing
        .iter()
        .filter(|s| !s.counts)
        .map(|s| s.officer.as_str())
        .collect();
    let mut note = Vec::new();
    if !a.blocked.is_empty() {
        note.push("blocked: requester is not an officer now".to_owned());
    }
    if !not_counting.is_empty() {
        note.push(format!(
            "not counting (not officers now): {}",
            not_counting.join(", ")
        ));
    }
    note.join("; ")
}

/// Parameters longer than this, or on several lines, are shown by size and digest unless
/// `--full`.
const SHOWN_WHOLE: usize = 200;

fn policy_json(p: &PolicyInfo) -> serde_json::Value {
    json!({
        "name": p.name, "document": p.document, "revision": p.revision,
        "updated_by": officers(&p.updated_by),
        "updated_at": when::rfc3339(p.updated_at_unix), "updated_at_unix": p.updated_at_unix,
        "approval_id": p.approval_id, "authentic": p.authentic,
    })
}

/// The officers who approved a policy change, as the service joins them (`a, b`).
fn officers(joined: &str) -> Vec<&str> {
    joined
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Prints an approval; its parameter digest is recomputed from the parameters shown, and a
/// digest that does not match them is an error.
fn print_approval(format: Format, a: &Approval, full: bool) -> Result<(), Failure> {
    let computed = strongroom::service::approvals::params_sha256(
        &a.operation,
        a.parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let matches = computed == a.params_sha256;
    if format == Format::Json {
        println!("{}", approval_json(a));
    } else {
        print_approval_text(a, full, matches);
    }
    if matches {
        Ok(())
    } else {
        Err(Failure::Token(format!(
            "approval {}: the service's params_sha256 {} does not match the parameters it sent (they hash to {computed}); do not approve it",
            a.id, a.params_sha256
        )))
    }
}

fn print_approval_text(a: &Approval, full: bool, matches: bool) {
    let when = when::rfc3339;
    println!("approval   {}", a.id);
    println!("operation  {}", a.operation);
    let mut params: Vec<_> = a.parameters.iter().collect();
    params.sort();
    for (k, v) in params {
        let long = k == "document" || v.len() > SHOWN_WHOLE || v.contains('\n');
        let v = if long && !full {
            format!(
                "{} bytes, sha256 {} (--full prints it)",
                v.len(),
                strongroom::service::approvals::value_sha256(v)
            )
        } else if v.contains('\n') {
            format!("\n{v}")
        } else {
            v.clone()
        };
        println!("  {k}: {v}");
    }
    println!(
        "params     sha256 {} ({}; audit entries carry it as params_sha256=)",
        a.params_sha256,
        if matches {
            "matches the parameters above"
        } else {
            "DOES NOT match the parameters above"
        }
    );
    println!("requester  {}", a.requester);
    let counting: Vec<&str> = a
        .standing
        .iter()
        .filter(|s| s.counts)
        .map(|s| s.officer.as_str())
        .collect();
    println!(
        "approvals  {}/{}: {}",
        a.counted,
        a.quorum,
        counting.join(", ")
    );
    for s in a.standing.iter().filter(|s| !s.counts) {
        println!("  not counting: {} ({})", s.officer, s.reason);
    }
    if !a.blocked.is_empty() {
        println!("blocked    {}", a.blocked);
    }
    println!("state      {}", a.state);
    println!("created    {}", when(a.created_at_unix));
    if a.state == "pending" || a.state == "expired" {
        println!("expires    {}", when(a.expires_at_unix));
    }
    if a.finished_at_unix > 0 {
        println!("finished   {}", when(a.finished_at_unix));
    }
    if !a.rejected_by.is_empty() {
        println!("rejected   by {}", a.rejected_by);
    }
    if !a.result.is_empty() {
        println!("result     {}", a.result);
    }
}

/// Prints the outcome of a guarded operation; an approved operation that failed is an error.
pub(crate) fn print_operation(format: Format, r: &OperationResponse) -> Result<(), Failure> {
    let failed = r.approval.as_ref().is_some_and(|a| a.state == "failed");
    print_operation_text(format, r);
    if failed {
        return Err(Failure::Token(format!(
            "the operation failed: {}",
            r.result
        )));
    }
    Ok(())
}

fn print_operation_text(format: Format, r: &OperationResponse) {
    if format == Format::Json {
        println!(
            "{}",
            json!({
                "executed": r.executed, "result": r.result,
                "approval": r.approval.as_ref().map(approval_json),
            })
        );
        return;
    }
    let Some(a) = &r.approval else {
        return;
    };
    if r.executed {
        println!(
            "executed ({} of {} officers): {}",
            a.counted, a.quorum, r.result
        );
    } else if a.state == "failed" {
        println!("approved but failed: {}", a.result);
    } else {
        println!(
            "pending approval {} ({} of {} officers; params_sha256 {}); another officer runs: strongroom-admin approve {}",
            a.id, a.counted, a.quorum, a.params_sha256, a.id
        );
    }
}
