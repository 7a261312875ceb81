//! WatchSecrets: events for every change in order with revisions, per-event policy, resuming
//! from the last revision after a disconnect, a restart and (on etcd) the loss of a replica,
//! the too-far-behind status, the subscription caps, `strongroom watch`, and the
//! expiring-soon events of the `expiry-notice` job.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use tonic::Code;

use strongroom::client::{Client, WatchSpec};
use strongroom::proto::DeleteSecretRequest;

use crate::common::{
    POLICY, Server, TestEnv, event_text, next_event_texts, next_events, open_watch, put,
    skip_on_etcd, store_is_etcd, unix_now, watch,
};

async fn write(server: &Server, name: &str, value: &[u8]) -> u64 {
    let mut c = server.client("payments").await;
    c.put_secret(put(name, value))
        .await
        .unwrap()
        .into_inner()
        .version
}

async fn delete(server: &Server, name: &str) {
    let mut c = server.client("payments").await;
    c.delete_secret(DeleteSecretRequest { name: name.into() })
        .await
        .unwrap();
}

#[tokio::test]
async fn put_overwrite_and_delete_arrive_in_order_with_revisions_and_no_values() {
    let env = TestEnv::new();
    let server = env.start();
    let mut w = server.client("payments").await;
    let mut stream = open_watch(&mut w, &["payments/app"], 0).await;
    write(&server, "payments/app/db", b"first-value").await;
    write(&server, "payments/app/db", b"second-value").await;
    write(&server, "payments/elsewhere", b"x").await;
    delete(&server, "payments/app/db").await;
    write(&server, "payments/app/db", b"third-value").await;
    write(&server, "payments/app/api", b"y").await;
    let events = next_events(&mut stream, 5).await;
    let seen: Vec<_> = events.iter().map(event_text).collect();
    assert_eq!(
        seen,
        [
            ("payments/app/db".into(), 1, "created"),
            ("payments/app/db".into(), 2, "updated"),
            ("payments/app/db".into(), 2, "deleted"),
            ("payments/app/db".into(), 3, "created"),
            ("payments/app/api".into(), 1, "created"),
        ]
    );
    assert!(events.iter().all(|e| e.revision > 0));
    // The subscription is audited once, not once per event.
    drop(stream);
    server.stop();
    let audit = std::fs::read_to_string(env.audit_log()).unwrap();
    assert_eq!(audit.matches("WatchSecrets").count(), 1, "{audit}");
    for v in ["first-value", "second-value", "third-value"] {
        assert!(!audit.contains(v));
    }
}

#[tokio::test]
async fn no_event_for_a_name_outside_the_callers_grants() {
    let env = TestEnv::new();
    let server = env.start();
    // reader may read under payments/db only; it watches all of payments.
    let mut r = server.client("reader").await;
    let mut stream = open_watch(&mut r, &["payments"], 0).await;
    // stranger may read nothing: its watch opens (as ListSecrets answers an empty page)
    // and never carries an event.
    let mut s = server.client("stranger").await;
    let mut nothing = open_watch(&mut s, &["payments"], 0).await;
    write(&server, "payments/other", b"hidden").await;
    write(&server, "payments/dbx", b"hidden").await;
    write(&server, "payments/db/x", b"seen").await;
    let events = next_events(&mut stream, 1).await;
    assert_eq!(
        event_text(&events[0]),
        ("payments/db/x".into(), 1, "created")
    );
    // The writes before it were passed over: the next event is the next visible write.
    write(&server, "payments/other", b"hidden").await;
    write(&server, "payments/db/y", b"seen").await;
    let events = next_events(&mut stream, 1).await;
    assert_eq!(
        event_text(&events[0]),
        ("payments/db/y".into(), 1, "created")
    );
    // Absence can only be checked for a while: the stranger's stream has nothing.
    let got = tokio::time::timeout(Duration::from_millis(300), nothing.message()).await;
    assert!(got.is_err(), "stranger saw {got:?}");

    // Bad filters are refused as bad input.
    let e = r.watch_secrets(watch(&[], 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = r
        .watch_secrets(watch(&["bad//prefix"], 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

#[tokio::test]
async fn resuming_from_the_last_revision_misses_none_and_repeats_none() {
    let env = TestEnv::new();
    let server = env.start();
    let mut w = server.client("payments").await;
    let mut stream = open_watch(&mut w, &["payments"], 0).await;
    for i in 0..3 {
        write(&server, &format!("payments/r{i}"), b"v").await;
    }
    let first = next_events(&mut stream, 2).await;
    drop(stream);
    let last = first[1].revision;
    for i in 3..6 {
        write(&server, &format!("payments/r{i}"), b"v").await;
    }
    let mut w = server.client("payments").await;
    let mut stream = open_watch(&mut w, &["payments"], last).await;
    let rest = next_events(&mut stream, 4).await;
    let names: Vec<_> = first.iter().chain(&rest).map(|e| e.name.clone()).collect();
    assert_eq!(
        names,
        (0..6).map(|i| format!("payments/r{i}")).collect::<Vec<_>>()
    );
    assert!(rest[0].revision > last);
    // Nothing more is queued: the next event is a new write.
    write(&server, "payments/r6", b"v").await;
    let next = next_events(&mut stream, 1).await;
    assert_eq!(next[0].name, "payments/r6");
}

#[tokio::test]
async fn a_watch_resumes_across_a_restart_of_the_service() {
    let env = TestEnv::new();
    let server = env.start();
    let mut w = server.client("payments").await;
    let mut stream = open_watch(&mut w, &["payments"], 0).await;
    write(&server, "payments/a", b"v").await;
    write(&server, "payments/b", b"v").await;
    let seen = next_events(&mut stream, 1).await;
    drop((stream, w));
    server.stop();

    let server = env.start();
    write(&server, "payments/c", b"v").await;
    let mut w = server.client("payments").await;
    let mut stream = open_watch(&mut w, &["payments"], seen[0].revision).await;
    let rest = next_events(&mut stream, 2).await;
    let names: Vec<_> = rest.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["payments/b", "payments/c"]);
}

#[tokio::test]
async fn a_watcher_too_far_behind_is_told_to_list_again() {
    let env = TestEnv::new();
    // sled keeps 4 revisions of changes; etcd's history is compacted below.
    let server = env.start_with(&env.config(&format!("watch_history = 4\n{POLICY}")), &[]);
    let mut w = server.client("payments").await;
    let mut stream = open_watch(&mut w, &["payments"], 0).await;
    write(&server, "payments/old", b"v").await;
    let old = next_events(&mut stream, 1).await[0].revision;
    drop(stream);
    for i in 0..6 {
        write(&server, &format!("payments/n{i}"), b"v").await;
    }
    if let Some(etcd) = &env.etcd {
        etcd.with_client(async |mut c| {
            let rev = c.get("x", None).await.unwrap().header().unwrap().revision();
            c.compact(rev, None).await.unwrap();
        });
    }
    let status = match w.watch_secrets(watch(&["payments"], old)).await {
        Err(s) => s,
        // etcd reports its compaction as the stream's first message.
        Ok(resp) => resp
            .into_inner()
            .message()
            .await
            .expect_err("events after a trimmed revision"),
    };
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too far behind"), "{status:?}");
    assert!(
        status.message().contains("list the secrets again"),
        "{status:?}"
    );
    assert!(
        status
            .message()
            .contains("oldest revision still available is"),
        "{status:?}"
    );
    // A revision the store has not reached is refused the same way.
    let status = w
        .watch_secrets(watch(&["payments"], 1 << 40))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("ahead of this store"),
        "{status:?}"
    );
    // Watching from now works.
    let mut stream = open_watch(&mut w, &["payments"], 0).await;
    write(&server, "payments/new", b"v").await;
    assert_eq!(next_events(&mut stream, 1).await[0].name, "payments/new");
}

#[tokio::test]
async fn watches_are_capped_per_identity_and_in_total() {
    let env = TestEnv::new();
    let config = env.config(&format!(
        "[limits]\nmax_watches = 3\nmax_watches_per_identity = 2\n{POLICY}"
    ));
    let server = env.start_with(&config, &[]);
    let mut p = server.client("payments").await;
    let first = p.watch_secrets(watch(&["payments"], 0)).await.unwrap();
    let _second = p.watch_secrets(watch(&["payments"], 0)).await.unwrap();
    let e = p.watch_secrets(watch(&["payments"], 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_watches_per_identity"), "{e:?}");
    let mut r = server.client("reader").await;
    let _third = r.watch_secrets(watch(&["payments/db"], 0)).await.unwrap();
    let mut o = server.client("ops").await;
    let e = o.watch_secrets(watch(&[""], 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("limits.max_watches ="), "{e:?}");
    // A closed watch gives its slot back.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match p.watch_secrets(watch(&["payments"], 0)).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(tokio::time::Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

#[test]
fn strongroom_watch_prints_one_line_per_event_and_takes_after_revision() {
    let env = TestEnv::new();
    let server = env.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The revision of a first write, learnt from a watch opened before it.
    let created = rt.block_on(async {
        let mut w = server.client("payments").await;
        let mut stream = open_watch(&mut w, &["payments/cli"], 0).await;
        write(&server, "payments/cli/a", b"v").await;
        next_events(&mut stream, 1).await.remove(0)
    });
    let run = |after: u64| {
        let mut cmd = env.cli(&server, "payments");
        // The first endpoint is dead: the watch opens on the second.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        cmd.env(
            "STRONGROOM_ADDR",
            format!("https://{dead},https://{}", server.addr),
        )
        .args([
            "watch",
            "payments/cli",
            "--after-revision",
            &after.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines)
    };
    // From just before the write: its line first, then the delete's as it happens.
    let (mut child, mut lines) = run(created.revision - 1);
    let first = lines.next().unwrap().unwrap();
    assert_eq!(
        first,
        format!("{} created payments/cli/a 1", created.revision)
    );
    rt.block_on(delete(&server, "payments/cli/a"));
    let second = lines.next().unwrap().unwrap();
    assert!(second.ends_with(" deleted payments/cli/a 1"), "{second}");
    let _ = child.kill();
    let _ = child.wait();

    // --after-revision replays only what came after.
    let (mut child, mut lines) = run(created.revision);
    assert_eq!(lines.next().unwrap().unwrap(), second);
    let _ = child.kill();
    let _ = child.wait();
}

/// Two strongroomd replicas on one etcd (and one token): a write through one reaches a
/// watcher on the other, and a watcher whose replica is killed resumes on the other through
/// the failover client without missing an event.
#[tokio::test]
async fn on_etcd_watches_reach_every_replica_and_survive_losing_one() {
    if !store_is_etcd() {
        println!("skipped: two replicas share one store only on etcd (STRONGROOM_TEST_STORE=etcd)");
        return;
    }
    let env = TestEnv::new();
    // Each replica with its own id: its own audit log and token checkpoints.
    let a = env.start_with(&env.replica_config("a", POLICY), &[]);
    let b = env.start_with(&env.replica_config("b", POLICY), &[]);
    // A watcher on b sees a write made through a.
    let mut on_b = b.client("payments").await;
    let mut stream = open_watch(&mut on_b, &["payments"], 0).await;
    write(&a, "payments/through-a", b"v").await;
    let e = next_events(&mut stream, 1).await;
    assert_eq!(
        event_text(&e[0]),
        ("payments/through-a".into(), 1, "created")
    );
    drop(stream);

    // The failover client watches through a (first endpoint), which is then killed.
    let client = Client::connect(
        &[format!("https://{}", a.addr), format!("https://{}", b.addr)],
        &env.client_tls("payments"),
        Duration::from_secs(20),
    )
    .unwrap();
    let mut w = client.watch(WatchSpec {
        prefixes: vec!["payments/ha".into()],
        after_revision: e[0].revision,
        ..WatchSpec::default()
    });
    write(&b, "payments/ha/0", b"v").await;
    let first = w.next().await.unwrap();
    assert_eq!(first.name, "payments/ha/0");
    let mut a = a;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    for i in 1..5 {
        write(&b, &format!("payments/ha/{i}"), b"v").await;
    }
    let mut names = Vec::new();
    let mut last = first.revision;
    for _ in 1..5 {
        let e = tokio::time::timeout(Duration::from_secs(30), w.next())
            .await
            .expect("an event within 30 s")
            .unwrap();
        assert!(e.revision > last, "{e:?} after {last}");
        last = e.revision;
        names.push(e.name);
    }
    assert_eq!(
        names,
        (1..5)
            .map(|i| format!("payments/ha/{i}"))
            .collect::<Vec<_>>()
    );
}

/// sled's change log lies outside the state commitment (etcd keeps none, and both backends
/// must commit to the same records): editing it does not flag the store, and what it says
/// still passes the policy before anyone sees it.
#[tokio::test]
async fn the_sled_change_log_drives_no_security_decision() {
    if skip_on_etcd("it edits sled's files") {
        return;
    }
    let env = TestEnv::new();
    let server = env.start();
    let mut w = server.client("reader").await;
    let mut stream = open_watch(&mut w, &[""], 0).await;
    write(&server, "payments/db/a", b"v").await;
    let before = next_events(&mut stream, 1).await[0].revision - 1;
    drop((stream, w));
    server.stop();
    // The entry is rewritten to name a secret the reader may not read.
    {
        let db = sled::open(&env.store).unwrap();
        let (k, v) = db.scan_prefix(b"c").next_back().unwrap().unwrap();
        let mut forged = v[..17].to_vec();
        forged.extend_from_slice(b"payments/other");
        db.insert(k, forged).unwrap();
        db.flush().unwrap();
    }
    let server = env.start();
    let mut c = server.client("payments").await;
    c.get_secret(crate::common::get("payments/db/a"))
        .await
        .expect("not flagged: the log is outside the commitment");
    let mut w = server.client("reader").await;
    let mut stream = open_watch(&mut w, &[""], before).await;
    write(&server, "payments/db/b", b"v").await;
    let e = next_events(&mut stream, 1).await;
    assert_eq!(e[0].name, "payments/db/b", "the forged entry was not sent");
}

/// `[jobs]` for the expiry-notice tests: a sweep every second, a window of an hour.
const NOTICES: &str =
    "\n[jobs]\nexpiry_notice_interval_secs = 1\nexpiry_notice_window_secs = 3600\n";

async fn write_expiring(server: &Server, name: &str, expires_at: Option<i64>) -> u64 {
    let mut c = server.client("payments").await;
    let mut req = put(name, b"value");
    req.expires_at_unix = expires_at;
    c.put_secret(req).await.unwrap().into_inner().version
}

#[tokio::test]
async fn expiring_soon_arrives_once_per_version_in_the_window_only_to_readers_and_replays() {
    let env = TestEnv::new();
    let config = env.config(&format!("{NOTICES}\n{POLICY}"));
    let server = env.start_with(&config, &[]);
    let mut w = server.client("payments").await;
    let mut stream = open_watch(&mut w, &["payments/app"], 0).await;
    // `reader` may read payments/db only; it watches everything it may read.
    let mut r = server.client("reader").await;
    let mut reader = open_watch(&mut r, &[""], 0).await;
    let now = unix_now();
    // Outside the window (30 days) and without an expiry: no notice, ever.
    write_expiring(&server, "payments/app/a-far", Some(now + 30 * 86_400)).await;
    write_expiring(&server, "payments/app/b-none", None).await;
    // Inside the window (10 minutes of an hour's).
    write_expiring(&server, "payments/app/c-cert", Some(now + 600)).await;
    let events = next_events(&mut stream, 4).await;
    let seen: Vec<_> = events.iter().map(event_text).collect();
    assert_eq!(
        seen,
        [
            ("payments/app/a-far".into(), 1, "created"),
            ("payments/app/b-none".into(), 1, "created"),
            ("payments/app/c-cert".into(), 1, "created"),
            ("payments/app/c-cert".into(), 1, "expiring-soon"),
        ]
    );
    let (cert_created, cert_notice) = (events[2].revision, events[3].revision);

    // A later version entering the window after more sweeps: its notice is the next event,
    // with none again for c-cert (or a-far, b-none) in between, though every sweep since
    // saw c-cert in the window (names sort before d-later, so a repeat would come first).
    write_expiring(&server, "payments/db/d-later", Some(now + 900)).await;
    write_expiring(&server, "payments/app/d-later", Some(now + 900)).await;
    let seen: Vec<_> = next_event_texts(&mut stream, 2).await;
    assert_eq!(
        seen,
        [
            ("payments/app/d-later".into(), 1, "created"),
            ("payments/app/d-later".into(), 1, "expiring-soon"),
        ]
    );

    // The reader sees payments/db/d-later's events and nothing of payments/app, whose
    // notices came before (c-cert's) and in the same sweep (d-later's, after db's in order).
    let got: Vec<_> = next_event_texts(&mut reader, 2).await;
    assert_eq!(
        got,
        [
            ("payments/db/d-later".into(), 1, "created"),
            ("payments/db/d-later".into(), 1, "expiring-soon"),
        ]
    );

    // A watch resumed from before the notice replays it, at the same revision.
    let mut resumed = w
        .watch_secrets(strongroom::proto::WatchSecretsRequest {
            names: vec!["payments/app/c-cert".into()],
            prefixes: Vec::new(),
            after_revision: cert_created,
        })
        .await
        .unwrap()
        .into_inner();
    let e = next_events(&mut resumed, 1).await.remove(0);
    assert_eq!(
        (event_text(&e), e.revision),
        (
            ("payments/app/c-cert".into(), 1, "expiring-soon"),
            cert_notice
        )
    );

    // After a restart (on sled: a new lock holder, no memory of past sweeps), still none again.
    drop((stream, resumed, reader));
    server.stop();
    let server = env.start_with(&config, &[]);
    let mut w = server.client("payments").await;
    let mut stream = open_watch(&mut w, &["payments/app"], cert_notice).await;
    let seen: Vec<_> = next_event_texts(&mut stream, 2).await;
    assert_eq!(
        seen,
        [
            ("payments/app/d-later".into(), 1, "created"),
            ("payments/app/d-later".into(), 1, "expiring-soon"),
        ]
    );
    // `strongroom watch` prints the kind.
    let mut cmd = env.cli(&server, "payments");
    cmd.args([
        "watch",
        "--name",
        "payments/app/c-cert",
        "--after-revision",
        &cert_created.to_string(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let line = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        line,
        format!("{cert_notice} expiring-soon payments/app/c-cert 1")
    );

    write_expiring(&server, "payments/app/e-after", Some(unix_now() + 600)).await;
    let seen: Vec<_> = next_event_texts(&mut stream, 2).await;
    assert_eq!(
        seen,
        [
            ("payments/app/e-after".into(), 1, "created"),
            ("payments/app/e-after".into(), 1, "expiring-soon"),
        ]
    );
    server.stop();
}
