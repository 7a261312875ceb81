//! Bounded input, bounded work: oversized names and requests on every RPC of both planes,
//! from callers with and without rights, are refused with INVALID_ARGUMENT or OUT_OF_RANGE,
//! each such call adds at most a bounded number of bytes to the audit log and the process log,
//! the service keeps serving, and the audit log still verifies, with invalid names recorded
//! cut, with the length and SHA-256 of the whole name.

use std::collections::HashMap;

use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::badinput::{RawCodec, field};
use crate::common::{ADMIN, POLICY, Server, TestEnv};
use strongroom::audit::Entry;
use strongroom::proto::admin_service_client::AdminServiceClient;
use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom::proto::{
    ApproveRequest, CheckPolicyRequest, DeletePolicyRequest, DeleteSecretRequest,
    DescribeSecretRequest, DestroySecretRequest, GetApprovalRequest, GetPolicyRequest,
    GetSecretRequest, ListSecretsRequest, PutPolicyRequest, PutSecretRequest, RejectRequest,
    StatusRequest,
};

const CLIENT_RPCS: [&str; 5] = [
    "PutSecret",
    "GetSecret",
    "DescribeSecret",
    "ListSecrets",
    "DeleteSecret",
];
/// The AdminService RPCs whose request carries a name or an id.
const ADMIN_NAMED_RPCS: [&str; 8] = [
    "PutPolicy",
    "GetPolicy",
    "DeletePolicy",
    "CheckPolicy",
    "DestroySecret",
    "GetApproval",
    "Approve",
    "Reject",
];
/// Every AdminService RPC.
const ADMIN_RPCS: [&str; 14] = [
    "Status",
    "PutPolicy",
    "GetPolicy",
    "ListPolicies",
    "DeletePolicy",
    "CheckPolicy",
    "DestroySecret",
    "RotateMasterKey",
    "RotateAuditLog",
    "AcceptStoreState",
    "ListApprovals",
    "GetApproval",
    "Approve",
    "Reject",
];

/// `limits.max_name_bytes` of the default configuration.
const MAX_NAME: usize = 256;

/// SHA-256 of `s`, hex, computed here with ring rather than by the service's helper.
fn sha256(s: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()))
}

/// Calls a SecretService RPC with `name` as its name (or prefix).
async fn client_call(
    c: &mut SecretServiceClient<Channel>,
    rpc: &str,
    name: &str,
) -> Result<(), Status> {
    let name = name.to_owned();
    match rpc {
        "PutSecret" => c
            .put_secret(PutSecretRequest {
                name,
                value: b"v".to_vec(),
                expected_version: None,
                expires_at_unix: None,
                protection: 0,
                ..Default::default()
            })
            .await
            .map(drop),
        "GetSecret" => c
            .get_secret(GetSecretRequest { name, version: 0 })
            .await
            .map(drop),
        "DescribeSecret" => c
            .describe_secret(DescribeSecretRequest { name })
            .await
            .map(drop),
        "ListSecrets" => c
            .list_secrets(ListSecretsRequest {
                prefix: name,
                page_size: 10,
                page_token: String::new(),
                ..Default::default()
            })
            .await
            .map(drop),
        "DeleteSecret" => c
            .delete_secret(DeleteSecretRequest { name })
            .await
            .map(drop),
        other => panic!("no client RPC {other}"),
    }
}

/// Calls an AdminService RPC with `name` as its name or id.
async fn admin_call(
    a: &mut AdminServiceClient<Channel>,
    rpc: &str,
    name: &str,
) -> Result<(), Status> {
    let name = name.to_owned();
    match rpc {
        "PutPolicy" => a
            .put_policy(PutPolicyRequest {
                name,
                document: String::new(),
            })
            .await
            .map(drop),
        "GetPolicy" => a.get_policy(GetPolicyRequest { name }).await.map(drop),
        "DeletePolicy" => a
            .delete_policy(DeletePolicyRequest { name })
            .await
            .map(drop),
        "CheckPolicy" => a
            .check_policy(CheckPolicyRequest {
                identity: "spiffe://strongroom.test/payments".into(),
                capability: "read".into(),
                name,
            })
            .await
            .map(drop),
        "DestroySecret" => a
            .destroy_secret(DestroySecretRequest { name })
            .await
            .map(drop),
        "GetApproval" => a
            .get_approval(GetApprovalRequest { id: name })
            .await
            .map(drop),
        "Approve" => a.approve(ApproveRequest { id: name }).await.map(drop),
        "Reject" => a.reject(RejectRequest { id: name }).await.map(drop),
        other => panic!("no admin RPC {other}"),
    }
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Under every small request's decode limit (4 × 256 + 4096 bytes), with room for the rest.
const UNDER_DECODE_LIMIT: usize = 4000;

/// Names just past the limit, up to just under the decode limit, or with characters outside
/// every grammar (some of which JSON or `Debug` escaping makes longer), each unique so its
/// entry can be found.
fn invalid_names(tag: &str) -> Vec<String> {
    let pad = |s: String, fill: &str, len: usize| {
        let mut s = s;
        while s.len() < len {
            s.push_str(fill);
        }
        s
    };
    vec![
        // One byte over max_name_bytes.
        pad(format!("payments/{tag}/"), "z", MAX_NAME + 1),
        // As long as the decode limit lets a name be.
        pad(format!("payments/{tag}/"), "z", UNDER_DECODE_LIMIT),
        // Long, in quotes and backslashes (two bytes each in JSON).
        pad(format!("payments/{tag}/"), "\"\\", UNDER_DECODE_LIMIT),
        // Long, in control characters (six bytes each in JSON).
        pad(format!("payments/{tag}/"), "\u{1}", UNDER_DECODE_LIMIT),
        // Long, in zero-width spaces (eight bytes each in Rust's `Debug`).
        pad(format!("payments/{tag}/"), "\u{200b}", UNDER_DECODE_LIMIT),
        // Short, but with a bad character.
        format!("payments/{tag}/a b"),
    ]
}

/// Several MiB, under the 4 MiB transport cap: refused by the request's decode limit.
fn huge_name() -> String {
    format!("payments/{}", "h".repeat(3 << 20))
}

/// Every refusal must be one of `want`; the mismatches, collected.
fn expect(
    mismatches: &mut Vec<String>,
    case: &str,
    got: Result<(), Status>,
    want: &[Code],
) -> Option<Status> {
    match got {
        Ok(()) => {
            mismatches.push(format!("{case}: succeeded; want {want:?}"));
            None
        }
        Err(s) if !want.contains(&s.code()) => {
            mismatches.push(format!(
                "{case}: {:?} {:?}; want {want:?}",
                s.code(),
                s.message()
            ));
            None
        }
        Err(s) => Some(s),
    }
}

async fn still_serving(server: &Server, after: &str) {
    let mut c = server.client("payments").await;
    let name = "payments/oversize/alive";
    client_call(&mut c, "PutSecret", name)
        .await
        .unwrap_or_else(|e| panic!("a valid PutSecret failed after {after}: {e:?}"));
    client_call(&mut c, "GetSecret", name)
        .await
        .unwrap_or_else(|e| panic!("a valid GetSecret failed after {after}: {e:?}"));
    let mut alice = server.admin("alice").await;
    alice
        .status(StatusRequest {})
        .await
        .unwrap_or_else(|e| panic!("a valid Status failed after {after}: {e:?}"));
}

/// Oversized and invalid names on every RPC of both planes, from callers with rights
/// (payments, alice) and without (stranger: no policy; mallory: an admin-CA certificate that
/// is not an officer's): INVALID_ARGUMENT or OUT_OF_RANGE (or PERMISSION_DENIED for mallory,
/// who is refused before her request is read), and at most `MAX_NAME + 1 KiB` more audit log
/// and `3 × MAX_NAME + 1 KiB` more process log per call. Names of several MiB add nothing to
/// either. Afterwards the log verifies, and every cut name carries the whole name's length
/// and SHA-256.
#[tokio::test]
async fn oversized_names_cost_both_logs_a_bounded_amount_on_every_rpc() {
    let env = TestEnv::new();
    let server = env.start_with(&env.config(&format!("{ADMIN}\n{POLICY}")), &[]);
    let audit = env.audit_log();
    let mut mismatches = Vec::new();
    let invalid = [Code::InvalidArgument, Code::OutOfRange];

    // Names of several MiB: refused by size before they are decoded, so neither log grows.
    let huge = huge_name();
    let (audit_before, log_before) = (file_len(&audit), file_len(&server.log));
    for stem in ["stranger", "payments"] {
        let mut c = server.client(stem).await;
        for rpc in CLIENT_RPCS {
            let got = client_call(&mut c, rpc, &huge).await;
            if let Some(s) = expect(
                &mut mismatches,
                &format!("{rpc} as {stem}, 3 MiB name"),
                got,
                &[Code::OutOfRange],
            ) {
                assert!(s.message().contains("limit of"), "{s:?}");
            }
        }
    }
    for stem in ["mallory", "alice"] {
        let mut a = server.admin(stem).await;
        for rpc in ADMIN_NAMED_RPCS {
            let got = admin_call(&mut a, rpc, &huge).await;
            expect(
                &mut mismatches,
                &format!("{rpc} as {stem}, 3 MiB name"),
                got,
                &[Code::OutOfRange],
            );
        }
    }
    still_serving(&server, "names of several MiB").await;
    let (audit_mid, log_mid) = (file_len(&audit), file_len(&server.log));
    // The liveness check itself adds three entries.
    assert!(
        audit_mid - audit_before <= 3 * 1024,
        "names of several MiB grew the audit log by {} bytes",
        audit_mid - audit_before
    );
    assert!(
        log_mid - log_before <= 3 * 1024,
        "names of several MiB grew the process log by {} bytes",
        log_mid - log_before
    );

    // Names just over the limit, or with bad characters: each call is audited, bounded.
    let mut sent: HashMap<String, String> = HashMap::new();
    let mut calls = 0u64;
    for stem in ["stranger", "payments"] {
        let mut c = server.client(stem).await;
        for rpc in CLIENT_RPCS {
            for name in invalid_names(&format!("{stem}-{rpc}")) {
                let got = client_call(&mut c, rpc, &name).await;
                expect(
                    &mut mismatches,
                    &format!("{rpc} as {stem}, {} bytes", name.len()),
                    got,
                    &invalid,
                );
                calls += 1;
                sent.insert(sha256(&name), name);
            }
        }
    }
    for stem in ["mallory", "alice"] {
        let want: &[Code] = if stem == "mallory" {
            &[Code::PermissionDenied]
        } else {
            &invalid
        };
        let mut a = server.admin(stem).await;
        for rpc in ADMIN_NAMED_RPCS {
            for name in invalid_names(&format!("{stem}-{rpc}")) {
                let got = admin_call(&mut a, rpc, &name).await;
                expect(
                    &mut mismatches,
                    &format!("{rpc} as {stem}, {} bytes", name.len()),
                    got,
                    want,
                );
                calls += 1;
                sent.insert(sha256(&name), name);
            }
        }
    }
    let (audit_after, log_after) = (file_len(&audit), file_len(&server.log));
    let audit_per_call = (audit_after - audit_mid) / calls;
    let log_per_call = (log_after - log_mid) / calls;
    eprintln!(
        "{calls} calls with invalid names: {audit_per_call} audit bytes and {log_per_call} process-log bytes per call"
    );
    assert!(
        audit_after - audit_mid <= calls * (MAX_NAME as u64 + 1024),
        "{calls} calls grew the audit log by {} bytes ({audit_per_call} per call)",
        audit_after - audit_mid
    );
    assert!(
        log_after - log_mid <= calls * (3 * MAX_NAME as u64 + 1024),
        "{calls} calls grew the process log by {} bytes ({log_per_call} per call)",
        log_after - log_mid
    );
    still_serving(&server, "invalid names").await;
    assert!(mismatches.is_empty(), "\n{}", mismatches.join("\n"));

    // Every invalid name that reached a handler as a caller the plane admits is in the log,
    // recorded as at most MAX_NAME bytes of JSON, with the whole name's length and SHA-256.
    let entries: Vec<Entry> = strongroom::audit::read_entries(std::io::BufReader::new(
        std::fs::File::open(&audit).unwrap(),
    ))
    .collect();
    let mut found = 0;
    for e in entries.iter().filter(|e| e.name_sha256.is_some()) {
        let sha = e.name_sha256.as_deref().unwrap();
        let whole = sent
            .get(sha)
            .unwrap_or_else(|| panic!("entry {} records a name that was not sent: {e:?}", e.seq));
        let recorded = e.name.as_deref().unwrap_or("");
        assert!(whole.starts_with(recorded), "entry {}", e.seq);
        assert!(
            serde_json::to_string(recorded).unwrap().len() <= MAX_NAME + 2,
            "entry {} records {} bytes of JSON",
            e.seq,
            serde_json::to_string(recorded).unwrap().len()
        );
        assert_eq!(e.name_len, Some(whole.len() as u64), "entry {}", e.seq);
        assert_eq!(
            e.name_truncated == Some(true),
            recorded.len() < whole.len(),
            "entry {}",
            e.seq
        );
        found += 1;
    }
    // mallory is refused before her request is read: her entries name nothing.
    let admitted = (2 * CLIENT_RPCS.len() + ADMIN_NAMED_RPCS.len()) * invalid_names("x").len();
    assert_eq!(found, admitted, "entries with a recorded invalid name");
    assert!(
        entries
            .iter()
            .all(|e| e.name.as_deref().is_none_or(|n| n.len() <= 3 * MAX_NAME)),
        "an entry records a name longer than the bound"
    );

    // `audit search --name` finds an entry by the whole name; `audit tail` shows it marked.
    let probe = &invalid_names("payments-GetSecret")[0];
    let out = env.admin(&[
        "audit",
        "search",
        audit.to_str().unwrap(),
        "--name",
        probe,
        "--format",
        "json",
    ]);
    out.assert_ok();
    let hits: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(hits.len(), 1, "{}", out.stdout);
    assert_eq!(hits[0]["operation"], "GetSecret");
    assert_eq!(hits[0]["name_sha256"], sha256(probe));
    assert_eq!(hits[0]["name_len"], probe.len());
    assert_eq!(hits[0]["name_truncated"], true);
    let tail = env.admin(&["audit", "tail", audit.to_str().unwrap(), "-n", "100000"]);
    tail.assert_ok();
    assert!(
        tail.stdout.contains(&format!("sha256 {}", sha256(probe))),
        "{}",
        tail.stdout
    );

    // The log verifies.
    server.stop();
    let out = env.admin(&["audit", "verify", audit.to_str().unwrap()]);
    out.assert_ok();
    assert!(out.stdout.starts_with("ok: "), "{}", out.stdout);
}

/// A protobuf message of exactly `total` bytes: `prefix` then an unknown field (number 15)
/// that pads it, which prost skips when it decodes.
fn padded(prefix: &[u8], total: usize) -> Vec<u8> {
    let room = total - prefix.len();
    // 1 tag byte + the length's varint + the bytes.
    let len = (0..=room)
        .rev()
        .find(|&n| 1 + prost::length_delimiter_len(n) + n == room)
        .expect("a padding length");
    let mut out = prefix.to_vec();
    out.extend(field(15, &vec![b'p'; len]));
    assert_eq!(out.len(), total);
    out
}

async fn raw(channel: &Channel, path: &str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(path).unwrap();
    grpc.unary(tonic::Request::new(body), path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// Each request over its own decode limit, on every RPC of both planes, is OUT_OF_RANGE with a
/// message that names the limit, as a caller with no rights and one with rights; at exactly
/// the limit it reaches the handler. After each, a legitimate call succeeds.
#[tokio::test]
async fn requests_over_their_decode_limit_are_out_of_range_on_every_rpc() {
    let env = TestEnv::new();
    let config = env.config(&format!(
        "[limits]\nmax_value_bytes = 1024\nmax_name_bytes = 64\n{ADMIN}\n{POLICY}"
    ));
    let server = env.start_with(&config, &[]);
    // The documented limits: 4 × max_name_bytes + 4096 for small requests; PutSecret adds
    // max_value_bytes, PutPolicy the 256 KiB policy document limit.
    let small = 4 * 64 + 4096;
    let limit_of = |rpc: &str| match rpc {
        "PutSecret" => 1024 + small,
        "PutPolicy" => 256 * 1024 + small,
        _ => small,
    };
    let audit_before = file_len(&env.audit_log());
    let mut mismatches = Vec::new();
    let mut cases = Vec::new();
    for stem in ["stranger", "payments"] {
        for rpc in CLIENT_RPCS {
            cases.push((server.addr.clone(), stem, "SecretService", rpc));
        }
    }
    for stem in ["mallory", "alice"] {
        for rpc in ADMIN_RPCS {
            let addr = server.admin_addr.clone().unwrap();
            cases.push((addr, stem, "AdminService", rpc));
        }
    }
    for (addr, stem, service, rpc) in cases {
        let channel = server.channel(&addr, Some(stem)).await.unwrap();
        let path = format!("/strongroom.v1.{service}/{rpc}");
        let limit = limit_of(rpc);
        // A valid name field first, where the request has one; field 1 is a string in every
        // request that has fields except ListApprovals (bool): there, none.
        let prefix = if rpc == "ListApprovals" {
            Vec::new()
        } else {
            field(1, b"payments/x")
        };
        let case = format!("{rpc} as {stem}, {} bytes", limit + 1);
        let got = raw(&channel, &path, padded(&prefix, limit + 1)).await;
        if let Some(s) = expect(&mut mismatches, &case, got.map(drop), &[Code::OutOfRange]) {
            let named = format!("limit of {limit} bytes");
            if !s.message().contains(&named) {
                mismatches.push(format!("{case}: {:?} does not say {named}", s.message()));
            }
            if rpc == "PutSecret" && !s.message().contains("max_value_bytes (1024)") {
                mismatches.push(format!("{case}: {:?}", s.message()));
            }
        }
        // At the limit exactly, the request is decoded and reaches its handler.
        let at = raw(&channel, &path, padded(&prefix, limit)).await;
        if let Err(s) = &at
            && s.code() == Code::OutOfRange
        {
            mismatches.push(format!("{rpc} as {stem} at its limit: {s:?}"));
        }
        still_serving(&server, &case).await;
    }
    assert!(mismatches.is_empty(), "\n{}", mismatches.join("\n"));
    // Only the calls that reached a handler left entries: bounded, whatever they carried.
    let grown = file_len(&env.audit_log()) - audit_before;
    let handled = 2 * CLIENT_RPCS.len() + 2 * ADMIN_RPCS.len();
    let liveness = 3 * (handled as u64);
    assert!(
        grown <= (handled as u64 + liveness) * (64 + 1024),
        "the audit log grew by {grown} bytes"
    );
}
