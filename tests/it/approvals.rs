//! The approval lifecycle on a real service: only officers listed now count (the service is
//! restarted with a smaller officer list), expiry and the purge, the operation's parameter
//! digest in the audit entries and in `approval show`, and requests refused before approval.

use std::time::Duration;

use tonic::Code;

use crate::common::officers::{admin_section, audit_details, eventually};
use crate::common::{BOB, Output, POLICY, Server, TestEnv, get, put};
use strongroom::proto::{
    Approval, DeletePolicyRequest, DeleteSecretRequest, DestroySecretRequest, GetApprovalRequest,
    ListApprovalsRequest, PutPolicyRequest, RejectRequest, RotateMasterKeyRequest,
};
use strongroom::service::approvals::params_sha256;

const HR: &str = r#"
[[rule]]
identity = "spiffe://strongroom.test/stranger"
prefix = "hr"
capabilities = ["read"]
"#;

/// Starts the service with these officers, quorum and extra `[admin]` keys.
fn start(env: &TestEnv, officers: &[&str], quorum: u32, extra: &str) -> Server {
    let config = env.config(&format!(
        "{}\n{POLICY}",
        admin_section(officers, quorum, extra)
    ));
    env.start_with(&config, &[])
}

async fn show(server: &Server, stem: &str, id: &str) -> Approval {
    server
        .admin(stem)
        .await
        .get_approval(GetApprovalRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn approval_count(server: &Server) -> usize {
    server
        .admin("alice")
        .await
        .list_approvals(ListApprovalsRequest { all: true })
        .await
        .unwrap()
        .into_inner()
        .approvals
        .len()
}

#[tokio::test]
async fn an_approval_by_an_officer_removed_from_the_configuration_does_not_count() {
    let env = TestEnv::new();
    let server = start(&env, &["alice", "bob", "carol", "mallory"], 3, "");
    let mut owner = server.client("payments").await;
    owner
        .put_secret(put("payments/doomed", b"v"))
        .await
        .unwrap();
    let asked = server
        .admin("alice")
        .await
        .destroy_secret(DestroySecretRequest {
            name: "payments/doomed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let id = asked.approval.unwrap().id;
    let r = server.approve("bob", id.clone()).await.unwrap();
    assert!(!r.executed);
    assert_eq!(r.approval.as_ref().map(|a| a.counted), Some(2));
    server.stop();

    // Bob leaves the officers; the service restarts with the smaller list.
    let server = start(&env, &["alice", "carol", "mallory"], 3, "");
    let a = show(&server, "carol", &id).await;
    assert_eq!((a.counted, a.quorum, a.approvers.len()), (1, 3, 2));
    let bob = a.standing.iter().find(|s| s.officer == BOB).unwrap();
    assert!(!bob.counts);
    assert!(bob.reason.contains("admin.officers"), "{}", bob.reason);
    assert!(a.blocked.is_empty(), "{}", a.blocked);

    // Carol's approval makes three approvers, two of them officers: it does not run.
    let r = server.approve("carol", id.clone()).await.unwrap();
    assert!(
        !r.executed,
        "ran with an approval of a removed officer: {r:?}"
    );
    assert_eq!(r.approval.as_ref().map(|a| a.counted), Some(2));
    let mut owner = server.client("payments").await;
    owner.get_secret(get("payments/doomed")).await.unwrap();

    // What `approval show` and `approval list` tell an officer.
    let text = Output::of(
        env.admin_cli(&server, "alice")
            .args(["approval", "show", &id]),
    );
    text.assert_ok();
    assert!(
        text.stdout.contains("approvals  2/3")
            && text.stdout.contains(&format!(
                "not counting: {BOB} (not listed in admin.officers"
            )),
        "{}",
        text.stdout
    );
    let listed = Output::of(env.admin_cli(&server, "alice").args(["approval", "list"]));
    listed.assert_ok();
    let line = listed.stdout.lines().find(|l| l.contains(&id)).unwrap();
    assert!(
        line.contains("2/3") && line.contains("not counting") && line.contains(BOB),
        "{line}"
    );

    // A third listed officer completes the quorum.
    let r = server.approve("mallory", id).await.unwrap();
    assert!(r.executed, "{r:?}");
    let e = owner.get_secret(get("payments/doomed")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn a_request_whose_requester_was_removed_cannot_run() {
    let env = TestEnv::new();
    let server = start(&env, &["alice", "bob", "carol"], 2, "");
    let mut owner = server.client("payments").await;
    owner.put_secret(put("payments/keep", b"v")).await.unwrap();
    let destroy = DestroySecretRequest {
        name: "payments/keep".into(),
    };
    let id = server
        .admin("alice")
        .await
        .destroy_secret(destroy.clone())
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap()
        .id;
    server.stop();

    // Alice leaves; bob's approval alone would reach the quorum of two if hers counted.
    let server = start(&env, &["bob", "carol"], 2, "");
    let a = show(&server, "bob", &id).await;
    assert!(a.blocked.contains("requester"), "{a:?}");
    assert_eq!(a.counted, 0);
    let e = server.approve("bob", id.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("requester") && e.message().contains("admin.officers"),
        "{}",
        e.message()
    );
    let mut owner = server.client("payments").await;
    owner.get_secret(get("payments/keep")).await.unwrap();
    let a = show(&server, "carol", &id).await;
    assert_eq!((a.state.as_str(), a.approvers.len()), ("pending", 1));

    // The blocked request does not stand in the way of a new one by a listed officer.
    let r = server
        .admin("bob")
        .await
        .destroy_secret(destroy)
        .await
        .unwrap()
        .into_inner();
    let done = server
        .approve("carol", r.approval.unwrap().id)
        .await
        .unwrap();
    assert!(done.executed, "{done:?}");
    let e = owner.get_secret(get("payments/keep")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn an_expired_approval_is_refused_and_the_purge_removes_it() {
    let env = TestEnv::new();
    let officers = ["alice", "bob", "carol"];
    // An executed approval, kept (default retention) across the next start.
    let server = start(&env, &officers, 2, "approval_purge_interval_secs = 3600");
    let executed = server
        .admin("alice")
        .await
        .put_policy(PutPolicyRequest {
            name: "hr".into(),
            document: HR.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap()
        .id;
    assert!(
        server
            .approve("bob", executed.clone())
            .await
            .unwrap()
            .executed
    );
    let mut owner = server.client("payments").await;
    owner.put_secret(put("payments/keep", b"v")).await.unwrap();
    server.stop();

    // Pending approvals wait one second; the purge ran at start and not again for an hour.
    let server = start(
        &env,
        &officers,
        2,
        "approval_ttl_secs = 1\napproval_purge_interval_secs = 3600",
    );
    let r = server
        .admin("alice")
        .await
        .destroy_secret(DestroySecretRequest {
            name: "payments/keep".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let pending = r.approval.unwrap().id;
    eventually(
        "the approval to expire",
        Duration::from_secs(30),
        async || (show(&server, "carol", &pending).await.state == "expired").then_some(()),
    )
    .await;
    let e = server.approve("bob", pending.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("expired at") && e.message().contains("request the operation again"),
        "{}",
        e.message()
    );
    let e = server
        .admin("carol")
        .await
        .reject(RejectRequest {
            id: pending.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let mut owner = server.client("payments").await;
    owner.get_secret(get("payments/keep")).await.unwrap();
    // The executed approval is still kept.
    assert_eq!(show(&server, "alice", &executed).await.state, "executed");
    server.stop();

    // The purge every second, executed approvals kept for no time: both go, in one audited
    // run; a fresh pending request stays.
    let server = start(
        &env,
        &officers,
        2,
        "approval_purge_interval_secs = 1\napproval_retention_secs = 0",
    );
    let fresh = server
        .admin("alice")
        .await
        .rotate_master_key(RotateMasterKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap()
        .id;
    let mut alice = server.admin("alice").await;
    eventually("the purge", Duration::from_secs(30), async || {
        let gone = |id: &str| {
            let id = id.to_owned();
            let mut alice = alice.clone();
            async move {
                matches!(
                    alice.get_approval(GetApprovalRequest { id }).await,
                    Err(e) if e.code() == Code::NotFound
                )
            }
        };
        (gone(&pending).await && gone(&executed).await).then_some(())
    })
    .await;
    let runs = audit_details(&env.audit_log(), "removing ");
    let removed: Vec<&(String, String)> = runs
        .iter()
        .filter(|(op, d)| op == "PurgeApprovals" && (d.contains(&pending) || d.contains(&executed)))
        .collect();
    assert!(!removed.is_empty(), "no purge entry: {runs:?}");
    let named = |id: &str| removed.iter().filter(|(_, d)| d.contains(id)).count();
    assert_eq!((named(&pending), named(&executed)), (1, 1), "{removed:?}");
    if removed.len() == 1 {
        assert!(removed[0].1.contains("expired=1 finished=1"), "{removed:?}");
    }
    // Every purge entry removed something: runs with nothing to remove write none.
    assert!(
        runs.iter()
            .all(|(_, d)| !d.contains("expired=0 finished=0")),
        "{runs:?}"
    );
    let kept = alice
        .get_approval(GetApprovalRequest { id: fresh })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.state, "pending");
}

#[tokio::test]
async fn audit_entries_and_approval_show_carry_the_operation_and_its_parameter_digest() {
    let env = TestEnv::new();
    let server = start(&env, &["alice", "bob", "carol"], 2, "");
    let asked = server
        .admin("alice")
        .await
        .put_policy(PutPolicyRequest {
            name: "hr".into(),
            document: HR.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let a = asked.approval.unwrap();
    let digest = params_sha256("PutPolicy", [("name", "hr"), ("document", HR)]);
    assert_eq!(a.params_sha256, digest);

    // `approval show`: the operation, the document by size and digest, the parameter digest.
    let text = Output::of(
        env.admin_cli(&server, "carol")
            .args(["approval", "show", &a.id]),
    );
    text.assert_ok();
    let doc_digest = strongroom::service::approvals::value_sha256(HR);
    assert!(
        text.stdout.contains("operation  PutPolicy"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains(&format!(
            "document: {} bytes, sha256 {doc_digest}",
            HR.len()
        )),
        "{}",
        text.stdout
    );
    assert!(
        !text.stdout.contains("spiffe://strongroom.test/stranger"),
        "{}",
        text.stdout
    );
    let shown = text
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("params     sha256 "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no digest line:\n{}", text.stdout));
    assert_eq!(shown, digest);
    let full = Output::of(
        env.admin_cli(&server, "carol")
            .args(["approval", "show", &a.id, "--full"]),
    );
    full.assert_ok();
    assert!(
        full.stdout.contains("spiffe://strongroom.test/stranger"),
        "{}",
        full.stdout
    );
    let json = Output::of(
        env.admin_cli(&server, "carol")
            .args(["approval", "show", &a.id, "--format", "json"]),
    );
    json.assert_ok();
    let j: serde_json::Value = serde_json::from_str(json.stdout.trim()).unwrap();
    assert_eq!(j["params_sha256"], digest.as_str());

    let done = server.approve("bob", a.id.clone()).await.unwrap();
    assert!(done.executed);

    // A rejected request of another operation carries its own digest.
    let rejected = server
        .admin("alice")
        .await
        .delete_policy(DeletePolicyRequest { name: "hr".into() })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    server
        .admin("carol")
        .await
        .reject(RejectRequest {
            id: rejected.id.clone(),
        })
        .await
        .unwrap();

    let log = env.audit_log();
    let entries = audit_details(&log, &format!("approval={}", a.id));
    let ops: Vec<&str> = entries.iter().map(|(op, _)| op.as_str()).collect();
    // The request, the execution's decision, its write-ahead intent and outcome, then the
    // approval that completed the quorum: every one names the operation and its digest.
    assert_eq!(
        ops,
        [
            "PutPolicy",
            "ExecuteApproval",
            "PutPolicy",
            "PutPolicy",
            "Approve"
        ],
        "{entries:?}"
    );
    for (op, detail) in &entries {
        assert!(
            detail.contains("op=PutPolicy") && detail.contains(&format!("params_sha256={digest}")),
            "{op}: {detail}"
        );
    }
    let delete_digest = params_sha256("DeletePolicy", [("name", "hr")]);
    assert_ne!(delete_digest, digest);
    let entries = audit_details(&log, &format!("approval={}", rejected.id));
    let ops: Vec<&str> = entries.iter().map(|(op, _)| op.as_str()).collect();
    assert_eq!(ops, ["DeletePolicy", "Reject"], "{entries:?}");
    for (op, detail) in &entries {
        assert!(
            detail.contains("op=DeletePolicy")
                && detail.contains(&format!("params_sha256={delete_digest}")),
            "{op}: {detail}"
        );
    }
    assert!(entries[1].1.contains("state=rejected"), "{entries:?}");
}

#[tokio::test]
async fn requests_that_cannot_be_right_are_refused_before_any_approval() {
    let env = TestEnv::new();
    let server = start(&env, &["alice", "bob", "carol"], 2, "");
    let mut alice = server.admin("alice").await;
    let mut bob = server.admin("bob").await;
    let mut owner = server.client("payments").await;

    // Destroying a secret that never existed, or that was deleted.
    let e = alice
        .destroy_secret(DestroySecretRequest {
            name: "payments/never".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    owner.put_secret(put("payments/gone", b"v")).await.unwrap();
    owner
        .delete_secret(DeleteSecretRequest {
            name: "payments/gone".into(),
        })
        .await
        .unwrap();
    let e = alice
        .destroy_secret(DestroySecretRequest {
            name: "payments/gone".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Empty policy documents, and documents without rules.
    for document in ["", "  \n", "# nothing but a comment\n", "{\"rule\": []}"] {
        let e = alice
            .put_policy(PutPolicyRequest {
                name: "empty".into(),
                document: document.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{document:?}: {e:?}");
        assert!(
            e.message().contains("empty") || e.message().contains("no rules"),
            "{}",
            e.message()
        );
    }
    // Deleting a policy that does not exist.
    let e = alice
        .delete_policy(DeletePolicyRequest {
            name: "absent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(approval_count(&server).await, 0, "an approval was created");

    // A second pending request for the same operation and parameters, by anyone: refused,
    // naming the one to approve.
    owner.put_secret(put("payments/here", b"v")).await.unwrap();
    let destroy = DestroySecretRequest {
        name: "payments/here".into(),
    };
    let first = alice
        .destroy_secret(destroy.clone())
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap()
        .id;
    for officer in [&mut alice, &mut bob] {
        let e = officer.destroy_secret(destroy.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains(&first), "{}", e.message());
    }
    assert_eq!(approval_count(&server).await, 1);
    // Once it is rejected, a new request may be made.
    bob.reject(RejectRequest { id: first }).await.unwrap();
    let second = alice.destroy_secret(destroy).await.unwrap().into_inner();
    assert!(!second.executed);
    assert_eq!(approval_count(&server).await, 2);
}

#[test]
fn approval_timings_of_zero_are_refused_at_start() {
    let env = TestEnv::new();
    for (extra, key) in [
        ("approval_ttl_secs = 0", "approval_ttl_secs"),
        (
            "approval_purge_interval_secs = 0",
            "approval_purge_interval_secs",
        ),
    ] {
        let config = env.config(&format!(
            "{}\n{POLICY}",
            admin_section(&["alice", "bob"], 2, extra)
        ));
        let out = Output::of(
            std::process::Command::new(env!("CARGO_BIN_EXE_strongroomd"))
                .env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
                .env("STRONGROOM_USER_PIN", &env.user_pin)
                .arg("--config")
                .arg(&config),
        );
        assert_eq!(out.code, 1, "{extra}: {}", out.stderr);
        assert!(out.stderr.contains(key), "{extra}: {}", out.stderr);
    }
}
