//! Re-wrap and master key retirement against real SoftHSM2 tokens, on sled and on etcd:
//! rotation under live traffic, a re-wrap of thousands of records killed with SIGKILL and
//! resumed, retirement of the old version down to its destruction in the token, and the
//! refusals on the way.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;

use crate::common::officers::eventually;
use crate::common::{ADMIN, POLICY, Server, TestEnv, get, put};
use strongroom::proto::admin_service_client::AdminServiceClient;
use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom::proto::{
    ApproveRequest, DeleteSecretRequest, ListMasterKeysRequest, OperationResponse, RewrapProgress,
    RewrapRequest, RotateMasterKeyRequest, SetMasterKeyStateRequest, WatchRewrapRequest,
};

type Admin = AdminServiceClient<Channel>;

/// Fast job leases, so a restarted service takes the re-wrap over within seconds on etcd
/// (a killed holder's lease lapses after its time to live).
const JOBS: &str = "[jobs]\nlease_ttl_secs = 2\nrenew_interval_ms = 500\n";

fn start(env: &TestEnv) -> Server {
    env.start_with(&env.config(&format!("{JOBS}\n{ADMIN}\n{POLICY}")), &[])
}

/// How many records the kill-and-resume test seals (`STRONGROOM_TEST_REWRAP_RECORDS`, default
/// 2000: what CI affords on two shared cores).
fn record_count() -> usize {
    std::env::var("STRONGROOM_TEST_REWRAP_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Alice asks, bob approves: the operation runs only on the second officer's word.
async fn dual(alice: &mut Admin, bob: &mut Admin, asked: OperationResponse) -> OperationResponse {
    let a = asked.approval.expect("an approval");
    assert_eq!(
        a.state, "pending",
        "{} ran on one officer's word",
        a.operation
    );
    let e = alice
        .approve(ApproveRequest { id: a.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let done = bob
        .approve(ApproveRequest { id: a.id })
        .await
        .unwrap()
        .into_inner();
    assert!(done.executed, "{done:?}");
    done
}

async fn rotate(alice: &mut Admin, bob: &mut Admin) {
    let r = alice
        .rotate_master_key(RotateMasterKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    dual(alice, bob, r).await;
}

async fn rewrap(alice: &mut Admin, bob: &mut Admin, from: u32, rate: u32) -> OperationResponse {
    let r = alice
        .rewrap(RewrapRequest {
            from_version: from,
            dry_run: false,
            rate,
        })
        .await
        .unwrap()
        .into_inner();
    dual(alice, bob, r.operation.expect("a guarded run")).await
}

async fn refs(admin: &mut Admin) -> BTreeMap<u32, (String, u64, bool)> {
    admin
        .list_master_keys(ListMasterKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| (k.version, (k.state, k.references, k.in_token)))
        .collect()
}

/// The progress now (the stream's first message).
async fn progress(admin: &mut Admin) -> RewrapProgress {
    let mut s = admin
        .watch_rewrap(WatchRewrapRequest {})
        .await
        .unwrap()
        .into_inner();
    s.message().await.unwrap().expect("a progress message")
}

/// Follows the stream to the end; its last message.
async fn until_done(admin: &mut Admin) -> RewrapProgress {
    let mut s = admin
        .watch_rewrap(WatchRewrapRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(p) = s.message().await.unwrap() {
        last = Some(p);
    }
    let p = last.expect("progress");
    assert_eq!(p.state, "finished", "{p:?}");
    p
}

async fn step(
    admin: &mut Admin,
    version: u32,
    state: &str,
) -> Result<OperationResponse, tonic::Status> {
    admin
        .set_master_key_state(SetMasterKeyStateRequest {
            version,
            state: state.into(),
        })
        .await
        .map(|r| r.into_inner())
}

fn value_of(i: usize, generation: u64) -> Vec<u8> {
    format!("value-{i}-{generation}").into_bytes()
}

/// Seals `n` records (names payments/r/<i>) with several writers at once.
async fn fill(client: &SecretServiceClient<Channel>, n: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    let writers = 16;
    for w in 0..writers {
        let mut c = client.clone();
        tasks.spawn(async move {
            for i in (w..n).step_by(writers) {
                c.put_secret(put(&format!("payments/r/{i:05}"), &value_of(i, 0)))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

/// A client that writes and reads its own names without pause until told to stop; counts its
/// operations and its errors (any error, with the last kept).
struct Traffic {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Traffic {
    fn start(client: SecretServiceClient<Channel>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let (s, o) = (stop.clone(), ops.clone());
        let task = tokio::spawn(async move {
            let mut c = client;
            let mut errors = Vec::new();
            let mut generation = 0u64;
            while !s.load(Ordering::Relaxed) {
                generation += 1;
                for i in 0..8usize {
                    let name = format!("payments/live/{i}");
                    let value = value_of(i, generation);
                    if let Err(e) = c.put_secret(put(&name, &value)).await {
                        errors.push(format!("put {name}: {e}"));
                        continue;
                    }
                    match c.get_secret(get(&name)).await {
                        Ok(r) if r.get_ref().value == value => {}
                        Ok(_) => errors.push(format!("get {name}: wrong value")),
                        Err(e) => errors.push(format!("get {name}: {e}")),
                    }
                    o.fetch_add(2, Ordering::Relaxed);
                }
            }
            errors
        });
        Traffic { stop, ops, task }
    }

    /// Waits until at least `more` operations ran since `from`.
    async fn past(&self, from: u64, more: u64) {
        let ops = self.ops.clone();
        eventually("client traffic", Duration::from_secs(60), async || {
            (ops.load(Ordering::Relaxed) >= from + more).then_some(())
        })
        .await;
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.task.await.unwrap();
        (self.ops.load(Ordering::Relaxed), errors)
    }
}

#[tokio::test]
async fn rotation_and_rewrap_under_live_traffic_cost_the_client_nothing() {
    let env = TestEnv::new();
    let server = start(&env);
    let client = server.client("payments").await;
    let mut alice = server.admin("alice").await;
    let mut bob = server.admin("bob").await;
    fill(&client, 200).await;

    let traffic = Traffic::start(client.clone());
    traffic.past(0, 50).await;
    rotate(&mut alice, &mut bob).await;
    let seen = traffic.ops.load(Ordering::Relaxed);
    traffic.past(seen, 50).await;
    rewrap(&mut alice, &mut bob, 0, 0).await;
    let done = until_done(&mut alice).await;
    let seen = traffic.ops.load(Ordering::Relaxed);
    traffic.past(seen, 50).await;
    let (ops, errors) = traffic.finish().await;
    assert!(
        errors.is_empty(),
        "{} errors in {ops} operations: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(done.rewrapped >= 200, "{done:?}");
    assert!(done.remaining.is_empty(), "{done:?}");
    // Every record opens under the new key, with its value.
    let mut c = client.clone();
    for i in (0..200).step_by(7) {
        let r = c
            .get_secret(get(&format!("payments/r/{i:05}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.value, value_of(i, 0));
    }
    let keys = refs(&mut alice).await;
    assert_eq!(keys[&1].1, 0, "{keys:?}");
    assert!(keys[&2].1 >= 200, "{keys:?}");
}

#[tokio::test]
async fn a_rewrap_killed_mid_way_resumes_and_the_old_key_is_retired_down_to_the_token() {
    let n = record_count();
    let env = TestEnv::new();
    let server = start(&env);
    let client = server.client("payments").await;
    let mut alice = server.admin("alice").await;
    let mut bob = server.admin("bob").await;
    fill(&client, n).await;
    rotate(&mut alice, &mut bob).await;

    // Retirement is refused while version 1 is referenced, and for the current version.
    let e = step(&mut alice, 2, "decrypt-only").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("current"), "{}", e.message());
    let e = step(&mut alice, 1, "disabled").await.unwrap_err();
    assert!(
        e.message().contains("can only move to decrypt-only"),
        "{}",
        e.message()
    );
    let r = step(&mut alice, 1, "decrypt-only").await.unwrap();
    dual(&mut alice, &mut bob, r).await;
    let e = step(&mut alice, 1, "disabled").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message()
            .contains(&format!("referenced by {n} record(s)"))
            && e.message()
                .contains("strongroom-admin rewrap --from-version 1"),
        "{}",
        e.message()
    );
    // Decrypt-only still opens.
    let mut c = client.clone();
    let r = c
        .get_secret(get("payments/r/00003"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.value, value_of(3, 0));

    // The dry run counts and changes nothing (and needs nobody's approval).
    let dry = env
        .admin_cli(&server, "alice")
        .args(["rewrap", "--dry-run", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let dry: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(dry["total"], n as u64, "{dry}");
    assert_eq!(refs(&mut alice).await[&1].1, n as u64);

    // A re-wrap at a rate slow enough to be caught mid-way, then SIGKILL.
    let rate = 400;
    rewrap(&mut alice, &mut bob, 1, rate).await;
    let before = eventually(
        "a page of the re-wrap saved",
        Duration::from_secs(120),
        async || {
            let p = progress(&mut alice).await;
            (p.rewrapped >= 200).then_some(p)
        },
    )
    .await;
    assert_eq!(before.state, "running", "{before:?}");
    assert!(before.rewrapped < n as u64, "{before:?}");
    // Deleted while the job runs: the re-wrap must not bring it back.
    c.delete_secret(DeleteSecretRequest {
        name: format!("payments/r/{:05}", n - 1),
    })
    .await
    .unwrap();
    let mut server = server;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);

    let server = start(&env);
    server.wait_for_log("re-wrap job resumes", 1, Duration::from_secs(60));
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("re-wrap job resumes"))
        .unwrap();
    assert!(
        !line.contains("cursor=\"\"") && !line.contains("cursor= "),
        "resumed from the start: {line}"
    );
    let mut alice = server.admin("alice").await;
    let mut bob = server.admin("bob").await;
    let done = until_done(&mut alice).await;
    assert!(done.remaining.is_empty(), "{done:?}");
    assert!(
        done.rewrapped >= before.rewrapped,
        "{done:?} after {before:?}"
    );

    // Every record opens under the new key; the deleted one stays deleted.
    let mut c = server.client("payments").await;
    for i in 0..n - 1 {
        let r = c
            .get_secret(get(&format!("payments/r/{i:05}")))
            .await
            .unwrap_or_else(|e| panic!("record {i}: {e}"))
            .into_inner();
        assert_eq!(r.value, value_of(i, 0), "record {i}");
    }
    let gone = c
        .get_secret(get(&format!("payments/r/{:05}", n - 1)))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let keys = refs(&mut alice).await;
    assert_eq!(keys[&1], ("decrypt-only".to_owned(), 0, true), "{keys:?}");
    assert_eq!(keys[&2].1, n as u64 - 1, "{keys:?}");

    // `key list --online` says the same.
    let listed = env
        .admin_cli(&server, "alice")
        .args(["key", "list", "--online"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(
        text.contains("decrypt-only") && text.contains("STATE"),
        "{text}"
    );

    // Disable, then destroy, each under dual control; skipping a step is refused.
    let e = step(&mut alice, 1, "destroyed").await.unwrap_err();
    assert!(
        e.message().contains("can only move to disabled"),
        "{}",
        e.message()
    );
    let r = step(&mut alice, 1, "disabled").await.unwrap();
    dual(&mut alice, &mut bob, r).await;
    let r = step(&mut alice, 1, "destroyed").await.unwrap();
    let done = dual(&mut alice, &mut bob, r).await;
    assert!(done.result.contains("destroyed"), "{done:?}");
    let keys = refs(&mut alice).await;
    assert_eq!(keys[&1], ("destroyed".to_owned(), 0, false), "{keys:?}");
    let e = step(&mut alice, 1, "destroyed").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // The token no longer holds version 1 (pkcs11-tool, independently of strongroom).
    let out = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(&env.module)
        .args([
            "--token-label",
            &env.label,
            "--login",
            "--pin",
            &env.user_pin,
        ])
        .args(["--list-objects", "--type", "secrkey"])
        .env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
        .output()
        .expect("pkcs11-tool (apt-get install opensc)");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listing}");
    assert!(listing.contains("strongroom-mk-2"), "{listing}");
    assert!(!listing.contains("strongroom-mk-1"), "{listing}");

    // Everything still opens, and new writes go on.
    let r = c
        .get_secret(get("payments/r/00000"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.value, value_of(0, 0));
    c.put_secret(put("payments/after", b"x")).await.unwrap();

    // The end of the re-wrap is in the audit log.
    let audit = std::fs::read_to_string(env.audit_log()).unwrap();
    assert!(audit.contains("RewrapFinished"), "no RewrapFinished entry");
}

#[tokio::test]
async fn rewrap_and_retirement_need_two_officers_and_refuse_bad_requests() {
    let env = TestEnv::new();
    let server = start(&env);
    let client = server.client("payments").await;
    let mut alice = server.admin("alice").await;
    let mut bob = server.admin("bob").await;
    fill(&client, 20).await;

    // Nothing older than the current version: nothing to move from.
    let e = alice
        .rewrap(RewrapRequest {
            from_version: 1,
            dry_run: false,
            rate: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let e = step(&mut alice, 1, "retired").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = step(&mut alice, 9, "decrypt-only").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    rotate(&mut alice, &mut bob).await;
    // One officer's request runs nothing: every record stays under version 1.
    let asked = alice
        .rewrap(RewrapRequest {
            from_version: 0,
            dry_run: false,
            rate: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    assert!(!asked.executed);
    assert_eq!(progress(&mut alice).await.state, "none");
    assert_eq!(refs(&mut alice).await[&1].1, 20);
    // A non-officer cannot even ask.
    if let Ok(mut client_cert) = server.try_admin(Some("payments")).await {
        let e = client_cert.list_master_keys(ListMasterKeysRequest {}).await;
        assert!(e.is_err(), "a client certificate listed the master keys");
    }
    dual(&mut alice, &mut bob, asked).await;
    until_done(&mut bob).await;
    assert_eq!(refs(&mut alice).await[&1].1, 0);

    // A second re-wrap with nothing to move finishes at once.
    rewrap(&mut alice, &mut bob, 0, 0).await;
    let p = until_done(&mut alice).await;
    assert_eq!((p.total, p.rewrapped), (0, 0), "{p:?}");
}

/// Records edited through sled (so not on etcd): one whose value's ciphertext, one whose
/// wrapped data key no longer authenticates. The re-wrap leaves both as they are, counts
/// them failed and moves every other record; the value's check (made beside the worker,
/// which only moves the data key) and the key's (made in the token) both hold.
#[tokio::test]
async fn records_that_do_not_open_are_left_counted_and_the_rest_move() {
    use prost::Message;
    use strongroom::proto::SealedRecordV1;
    if crate::common::skip_on_etcd("it edits records through sled") {
        return;
    }
    let n = 40;
    let env = TestEnv::new();
    let server = start(&env);
    fill(&server.client("payments").await, n).await;
    server.stop();
    let key = |i: usize| {
        let mut k = vec![b'r'];
        k.extend_from_slice(format!("payments/r/{i:05}").as_bytes());
        k.push(0);
        k.extend_from_slice(&1u64.to_be_bytes());
        k
    };
    {
        let db = sled::open(&env.store).unwrap();
        type Edit = fn(&mut SealedRecordV1);
        let edits: [(usize, Edit); 2] = [
            (3, |r| r.ciphertext[0] ^= 0x01),
            (17, |r| r.wrapped_dek[20] ^= 0x01),
        ];
        for (i, edit) in edits {
            let mut r = SealedRecordV1::decode(db.get(key(i)).unwrap().unwrap().as_ref()).unwrap();
            edit(&mut r);
            db.insert(key(i), r.encode_to_vec()).unwrap();
        }
        db.flush().unwrap();
    }
    let server = start(&env);
    let mut alice = server.admin("alice").await;
    let mut bob = server.admin("bob").await;
    rotate(&mut alice, &mut bob).await;
    rewrap(&mut alice, &mut bob, 0, 0).await;
    let done = until_done(&mut alice).await;
    assert_eq!((done.rewrapped, done.failed), (n as u64 - 2, 2), "{done:?}");
    assert_eq!(
        done.remaining
            .iter()
            .map(|r| (r.version, r.records))
            .collect::<Vec<_>>(),
        [(1, 2)],
        "{done:?}"
    );
    let keys = refs(&mut alice).await;
    assert_eq!((keys[&1].1, keys[&2].1), (2, n as u64 - 2), "{keys:?}");
    let mut c = server.client("payments").await;
    for i in 0..n {
        let got = c.get_secret(get(&format!("payments/r/{i:05}"))).await;
        match i {
            3 | 17 => assert_eq!(got.unwrap_err().code(), Code::DataLoss, "record {i}"),
            _ => assert_eq!(
                got.unwrap().into_inner().value,
                value_of(i, 0),
                "record {i}"
            ),
        }
    }
}
