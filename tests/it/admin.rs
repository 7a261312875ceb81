//! The officers' plane: separation from the client plane, officer authentication, dual
//! control of every guarded operation, policies kept in the store and their authentication.

use std::time::Duration;

use tonic::Code;

use crate::common::{ADMIN, Output, POLICY, TestEnv};
use crate::common::{get, put};
use strongroom::proto::admin_service_client::AdminServiceClient;
use strongroom::proto::{
    ApproveRequest, CheckPolicyRequest, DeletePolicyRequest, DestroySecretRequest,
    GetApprovalRequest, ListPoliciesRequest, ListSecretsRequest, OperationResponse,
    PutPolicyRequest, RejectRequest, RotateMasterKeyRequest, StatusRequest,
};
use tonic::transport::Channel;

type Admin = AdminServiceClient<Channel>;

const STRANGER_HR: &str = r#"
[[rule]]
identity = "spiffe://strongroom.test/stranger"
prefix = "hr"
capabilities = ["read", "write"]
"#;

fn approval_id(r: &OperationResponse) -> String {
    r.approval.as_ref().unwrap().id.clone()
}

#[tokio::test]
async fn the_admin_plane_is_separate_and_for_officers_only() {
    let env = TestEnv::new();
    let server = env.start_admin();
    assert_ne!(server.admin_addr.as_deref(), Some(server.addr.as_str()));

    // An officer gets in.
    let mut alice = server.admin("alice").await;
    let status = alice.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.quorum, 2);
    assert_eq!(status.master_key_versions, vec![1]);
    assert!(status.dangerous_settings.is_empty());
    assert!(status.audit_healthy);

    // A valid admin-CA certificate that is not an officer: refused.
    let mut mallory = server.admin("mallory").await;
    let e = mallory.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Client-CA certificates (even one naming an officer) never pass the admin listener's TLS.
    for stem in [Some("payments"), Some("alice-client-ca"), None] {
        if let Ok(mut c) = server.try_admin(stem).await {
            let e = c.status(StatusRequest {}).await.unwrap_err();
            assert!(
                matches!(
                    e.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ),
                "{stem:?}: {e:?}"
            );
        }
    }

    // An officer's certificate never passes the client listener's TLS.
    if let Ok(mut c) = server.try_client(Some("alice")).await {
        let e = c.get_secret(get("payments/x")).await.unwrap_err();
        assert!(
            matches!(
                e.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{e:?}"
        );
    }

    // The admin API is not served on the client listener at all.
    let channel = server
        .channel(&server.addr, Some("payments"))
        .await
        .unwrap();
    let mut on_client = AdminServiceClient::new(channel);
    let e = on_client.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
}

/// Runs one guarded operation through the matrix: alone (pending), the same officer again
/// (refused), a second officer (executed). `effect` says whether the operation has taken
/// effect.
async fn dual_control_case<F, Fut>(
    alice: &mut Admin,
    bob: &mut Admin,
    request: impl AsyncFn(&mut Admin) -> OperationResponse,
    effect: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let r = request(alice).await;
    assert!(!r.executed);
    let a = r.approval.clone().unwrap();
    assert_eq!(
        (a.state.as_str(), a.approvers.len(), a.quorum),
        ("pending", 1, 2)
    );
    assert!(!effect().await, "{} ran on one officer's word", a.operation);

    let e = alice
        .approve(ApproveRequest { id: a.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("already approved"), "{}", e.message());
    assert!(
        !effect().await,
        "{} ran on the same officer twice",
        a.operation
    );

    let done = bob
        .approve(ApproveRequest { id: a.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(done.executed, "{done:?}");
    assert_eq!(done.approval.as_ref().unwrap().state, "executed");
    assert!(
        effect().await,
        "{} did not run with two officers",
        a.operation
    );

    // An executed approval cannot run again.
    let e = bob.approve(ApproveRequest { id: a.id }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn every_guarded_operation_needs_two_distinct_officers() {
    let env = TestEnv::new();
    let server = env.start_admin();
    let mut alice = server.admin("alice").await;
    let mut bob = server.admin("bob").await;
    let owner = server.client("payments").await;
    let stranger = server.client("stranger").await;

    // PutPolicy: grants stranger read/write under hr.
    let s = stranger.clone();
    dual_control_case(
        &mut alice,
        &mut bob,
        async |a: &mut Admin| {
            a.put_policy(PutPolicyRequest {
                name: "hr".into(),
                document: STRANGER_HR.into(),
            })
            .await
            .unwrap()
            .into_inner()
        },
        || {
            let mut s = s.clone();
            async move { s.put_secret(put("hr/salaries", b"v")).await.is_ok() }
        },
    )
    .await;

    // DeletePolicy: takes the grant away again.
    let s = stranger.clone();
    dual_control_case(
        &mut alice,
        &mut bob,
        async |a: &mut Admin| {
            a.delete_policy(DeletePolicyRequest { name: "hr".into() })
                .await
                .unwrap()
                .into_inner()
        },
        || {
            let mut s = s.clone();
            async move { s.get_secret(get("hr/salaries")).await.is_err() }
        },
    )
    .await;

    // DestroySecret.
    let mut o = owner.clone();
    o.put_secret(put("payments/doomed", b"v")).await.unwrap();
    let o2 = owner.clone();
    dual_control_case(
        &mut alice,
        &mut bob,
        async |a: &mut Admin| {
            a.destroy_secret(DestroySecretRequest {
                name: "payments/doomed".into(),
            })
            .await
            .unwrap()
            .into_inner()
        },
        || {
            let mut o = o2.clone();
            async move {
                matches!(
                    o.get_secret(get("payments/doomed")).await,
                    Err(e) if e.code() == Code::NotFound
                )
            }
        },
    )
    .await;

    // RotateMasterKey: new writes use version 2.
    let o3 = owner.clone();
    let probe = std::sync::atomic::AtomicU32::new(0);
    let probe = &probe;
    dual_control_case(
        &mut alice,
        &mut bob,
        async |a: &mut Admin| {
            a.rotate_master_key(RotateMasterKeyRequest {})
                .await
                .unwrap()
                .into_inner()
        },
        || {
            let mut o = o3.clone();
            async move {
                let n = probe.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let r = o
                    .put_secret(put(&format!("payments/rot{n}"), b"v"))
                    .await
                    .unwrap()
                    .into_inner();
                r.master_key_version == 2
            }
        },
    )
    .await;
    // Records sealed under version 1 still open after the rotation.
    let mut o = owner.clone();
    o.get_secret(get("payments/rot0")).await.unwrap();
}

#[tokio::test]
async fn rejected_and_expired_requests_never_run() {
    let env = TestEnv::new();
    let config = env.config(&format!(
        "{}\napproval_ttl_secs = 1\n{POLICY}",
        ADMIN.trim_end()
    ));
    let server = env.start_with(&config, &[]);
    let mut alice = server.admin("alice").await;
    let mut bob = server.admin("bob").await;
    let mut carol = server.admin("carol").await;
    let mut owner = server.client("payments").await;
    owner.put_secret(put("payments/keep", b"v")).await.unwrap();

    let destroy = DestroySecretRequest {
        name: "payments/keep".into(),
    };
    // Rejected by bob: carol's approval cannot run it.
    let r = alice
        .destroy_secret(destroy.clone())
        .await
        .unwrap()
        .into_inner();
    let id = approval_id(&r);
    let rej = bob
        .reject(RejectRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rej.state, "rejected");
    assert_eq!(rej.rejected_by, crate::common::BOB);
    let e = carol
        .approve(ApproveRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("rejected"), "{}", e.message());

    // Expired: the TTL is one second.
    let r = alice.destroy_secret(destroy).await.unwrap().into_inner();
    let id2 = approval_id(&r);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let e = bob
        .approve(ApproveRequest { id: id2.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("expired"), "{}", e.message());
    let shown = carol
        .get_approval(GetApprovalRequest { id: id2 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.state, "expired");

    // Neither ran.
    owner.get_secret(get("payments/keep")).await.unwrap();

    // Unknown and malformed ids.
    let e = bob
        .approve(ApproveRequest {
            id: "0123456789abcdef".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = bob
        .approve(ApproveRequest { id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn policy_check_agrees_with_the_real_decision() {
    let env = TestEnv::new();
    let server = env.start_admin();
    let mut alice = server.admin("alice").await;
    let mut bob = server.admin("bob").await;
    // A second stored policy on top of the seeded one.
    let extra = r#"
[[rule]]
identity = "spiffe://strongroom.test/stranger"
prefix = "hr"
capabilities = ["read", "write", "list"]

[[rule]]
identity = "spiffe://strongroom.test/stranger"
prefix = "ops"
capabilities = ["write"]

[[rule]]
identity = "spiffe://strongroom.test/re*"
prefix = "payments/api"
capabilities = ["list", "delete"]
"#;
    let r = alice
        .put_policy(PutPolicyRequest {
            name: "extra".into(),
            document: extra.into(),
        })
        .await
        .unwrap()
        .into_inner();
    bob.approve(ApproveRequest {
        id: approval_id(&r),
    })
    .await
    .unwrap();

    let names = [
        "payments/db/password",
        "payments/api/key",
        "hr/salaries",
        "ops/runbook",
    ];
    // Every name exists, so a refused read or list can only be the policy's doing.
    let recreate = async |name: &str| {
        let mut owner = server.client("payments").await;
        let mut s = server.client("stranger").await;
        let ok = owner.put_secret(put(name, b"v")).await.is_ok()
            || s.put_secret(put(name, b"v")).await.is_ok();
        assert!(ok, "nobody can create {name}");
    };
    for name in names {
        recreate(name).await;
    }
    let identities = [
        ("payments", crate::common::PAYMENTS),
        ("reader", crate::common::READER),
        ("ops", crate::common::OPS),
        ("stranger", crate::common::STRANGER),
    ];
    let mut checked = 0;
    for (stem, identity) in identities {
        let mut c = server.client(stem).await;
        for name in names {
            for capability in ["write", "read", "list", "delete"] {
                let check = alice
                    .check_policy(CheckPolicyRequest {
                        identity: identity.into(),
                        capability: capability.into(),
                        name: name.into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let real = match capability {
                    "write" => c.put_secret(put(name, b"v")).await.is_ok(),
                    "read" => c.get_secret(get(name)).await.is_ok(),
                    "list" => {
                        let prefix = name.split('/').next().unwrap().to_owned();
                        c.list_secrets(ListSecretsRequest {
                            prefix,
                            page_size: 0,
                            page_token: String::new(),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .names
                        .iter()
                        .any(|n| n == name)
                    }
                    _ => c
                        .delete_secret(strongroom::proto::DeleteSecretRequest { name: name.into() })
                        .await
                        .map_or_else(|e| e.code() != Code::PermissionDenied, |_| true),
                };
                assert_eq!(
                    check.allowed, real,
                    "{identity} {capability} {name}: check says {} ({}), service says {real}",
                    check.allowed, check.decided_by
                );
                if check.allowed {
                    assert!(
                        check.decided_by.contains("policy '"),
                        "{}",
                        check.decided_by
                    );
                }
                checked += 1;
                // Keep every name present for the next check.
                if capability == "delete" {
                    recreate(name).await;
                }
            }
        }
    }
    assert_eq!(checked, 64);
}

#[tokio::test]
async fn a_policy_edited_in_the_store_files_is_refused() {
    if crate::common::skip_on_etcd("it edits a policy inside sled's files") {
        return;
    }
    use prost::Message;
    let env = TestEnv::new();
    let server = env.start_admin();
    let mut alice = server.admin("alice").await;
    let mut bob = server.admin("bob").await;
    let mut owner = server.client("payments").await;
    owner
        .put_secret(put("payments/db/password", b"v"))
        .await
        .unwrap();
    server.stop();

    // Whoever can write the store's files rewrites the seeded policy to grant stranger
    // everything, keeping the old MAC.
    {
        let db = sled::open(&env.store).unwrap();
        let key = b"pconfig".to_vec();
        let mut rec =
            strongroom::proto::PolicyRecordV1::decode(db.get(&key).unwrap().unwrap().as_ref())
                .unwrap();
        rec.document.push_str(
            "\n[[rule]]\nidentity = \"spiffe://strongroom.test/stranger\"\nprefix = \"\"\ncapabilities = [\"read\", \"write\", \"list\", \"delete\"]\n",
        );
        db.insert(&key, rec.encode_to_vec()).unwrap();
        // And plants a forged policy of its own.
        let forged = strongroom::proto::PolicyRecordV1 {
            name: "backdoor".into(),
            document: "[[rule]]\nidentity = \"spiffe://strongroom.test/stranger\"\nprefix = \"\"\ncapabilities = [\"read\"]\n".into(),
            revision: 1,
            updated_by: "nobody".into(),
            mac: vec![0; 32],
            ..Default::default()
        };
        db.insert(b"pbackdoor", forged.encode_to_vec()).unwrap();
        db.flush().unwrap();
    }
    let server = env.start_admin();
    // The store's state commitment flags the edit first; once officers accept the store,
    // the edited and forged policies must still grant nothing.
    crate::common::accept_store_state(&server, "does not match its commitment").await;
    let mut stranger = server.client("stranger").await;
    let e = stranger
        .get_secret(get("payments/db/password"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The tampered policy fails closed: its rules grant nothing, even to payments.
    let mut owner = server.client("payments").await;
    let e = owner
        .get_secret(get("payments/db/password"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let status = alice.status(StatusRequest {}).await;
    let mut alice = match status {
        Ok(_) => alice,
        Err(_) => server.admin("alice").await,
    };
    let status = alice.status(StatusRequest {}).await.unwrap().into_inner();
    let mut tampered = status.tampered_policies.clone();
    tampered.sort();
    assert_eq!(tampered, vec!["backdoor", "config"]);
    let listed = alice
        .list_policies(ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner()
        .policies;
    assert!(listed.iter().all(|p| !p.authentic));

    // Officers restore it under dual control.
    let r = alice
        .put_policy(PutPolicyRequest {
            name: "config".into(),
            document: POLICY.replace("[[policy]]", "[[rule]]"),
        })
        .await
        .unwrap()
        .into_inner();
    let mut bob2 = server.admin("bob").await;
    std::mem::swap(&mut bob, &mut bob2);
    bob.approve(ApproveRequest {
        id: approval_id(&r),
    })
    .await
    .unwrap();
    owner.get_secret(get("payments/db/password")).await.unwrap();
}

#[tokio::test]
async fn dangerous_single_officer_runs_at_once_and_says_so() {
    let env = TestEnv::new();
    let admin = ADMIN.replace("quorum = 2", "quorum = 1\ndangerous_single_officer = true");
    let config = env.config(&format!("{admin}\n{POLICY}"));
    let server = env.start_with(&config, &[]);
    let mut alice = server.admin("alice").await;
    let status = alice.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        status.dangerous_settings,
        vec!["admin.dangerous_single_officer"]
    );
    let r = alice
        .rotate_master_key(RotateMasterKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(r.executed);
    assert!(server.log_text().contains("DANGEROUS"));
    let out = Output::of(env.admin_cli(&server, "alice").arg("status"));
    out.assert_ok();
    assert!(
        out.stdout.contains("DANGEROUS SETTING ON"),
        "{}",
        out.stdout
    );
}

#[test]
fn admin_cli_dual_control_round_trip() {
    let env = TestEnv::new();
    let server = env.start_admin();
    let doc = env.dir.path().join("hr.toml");
    std::fs::write(&doc, STRANGER_HR).unwrap();
    let alice = |args: &[&str]| Output::of(env.admin_cli(&server, "alice").args(args));
    let bob = |args: &[&str]| Output::of(env.admin_cli(&server, "bob").args(args));

    let requested = alice(&[
        "policy",
        "put",
        "hr",
        doc.to_str().unwrap(),
        "--format",
        "json",
    ]);
    requested.assert_ok();
    let j: serde_json::Value = serde_json::from_str(requested.stdout.trim()).unwrap();
    assert_eq!(j["executed"], false);
    let id = j["approval"]["id"].as_str().unwrap().to_owned();

    let pending = bob(&["approval", "list"]);
    pending.assert_ok();
    assert!(pending.stdout.contains(&id), "{}", pending.stdout);
    let shown = bob(&["approval", "show", &id]);
    shown.assert_ok();
    assert!(shown.stdout.contains("PutPolicy"));

    let again = alice(&["approve", &id]);
    assert_eq!(again.code, 2, "{}", again.stderr);
    let approved = bob(&["approve", &id]);
    approved.assert_ok();
    assert!(
        approved.stdout.starts_with("executed"),
        "{}",
        approved.stdout
    );

    let check = alice(&["policy", "check", crate::common::STRANGER, "write", "hr/x"]);
    check.assert_ok();
    assert!(
        check.stdout.starts_with("allow: policy 'hr' rule 1"),
        "{}",
        check.stdout
    );
    let deny = alice(&["policy", "check", crate::common::STRANGER, "delete", "hr/x"]);
    deny.assert_ok();
    assert!(deny.stdout.starts_with("deny"), "{}", deny.stdout);

    let listed = alice(&["policy", "list", "--format", "json"]);
    listed.assert_ok();
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(listed.stdout.trim())
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, vec!["config", "hr"]);

    let status = alice(&["status", "--format", "json"]);
    status.assert_ok();
    let s: serde_json::Value = serde_json::from_str(status.stdout.trim()).unwrap();
    assert_eq!(s["pending_approvals"], 0);
    assert_eq!(s["policies"], 2);

    // A bad document is refused before any approval is created (exit 2, INVALID_ARGUMENT).
    std::fs::write(&doc, "[[rule]]\nidentity = \"\"\n").unwrap();
    let bad = alice(&["policy", "put", "bad", doc.to_str().unwrap()]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("InvalidArgument"), "{}", bad.stderr);
    // Mallory is refused.
    let m = Output::of(env.admin_cli(&server, "mallory").arg("status"));
    assert_eq!(m.code, 2);
    assert!(m.stderr.contains("PermissionDenied"), "{}", m.stderr);
}

#[test]
fn the_admin_ca_must_differ_from_the_client_ca() {
    let env = TestEnv::new();
    let config = env.config(&format!(
        "{}\n{POLICY}",
        ADMIN.replace("pki/admin-ca.pem", "pki/client-ca.pem")
    ));
    let out = Output::of(
        std::process::Command::new(env!("CARGO_BIN_EXE_strongroomd"))
            .env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
            .env("STRONGROOM_USER_PIN", &env.user_pin)
            .arg("--config")
            .arg(&config),
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("admin.ca must be a different CA"),
        "{}",
        out.stderr
    );
}
