//! Clients that fail over: the typed client (`strongroom::client`) and the `strongroom` CLI
//! with several endpoints, against real strongroomd processes, closed ports, a killed
//! server, and a TCP relay that can cut a connection after the server has answered.
//!
//! Two strongroomd processes cannot share one sled store at once (sled locks it), so the
//! "second replica" is either the same live server reached directly, or a server started
//! on the store after the first one was killed, reached through a relay that holds
//! connections until its backend is up (as a load balancer in front of a restarting
//! replica would). TLS runs end to end through the relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use zeroize::Zeroizing;

use strongroom::client::{Client, ClientError, OUTCOME_UNKNOWN, PutOptions};
use strongroom::proto::DescribeSecretRequest;
use strongroom::secret::SecretValue;

use crate::common::{Output, Server, TestEnv, get, list, put, run_with_stdin};
use crate::refusals::run_bounded;

/// `https://` and a loopback port nobody listens on (bound, then closed).
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("https://{addr}")
}

fn value(bytes: &[u8]) -> SecretValue {
    SecretValue::new(Zeroizing::new(bytes.to_vec()))
}

/// The `strongroom` CLI as payments with `STRONGROOM_ADDR` set to `addrs`.
fn cli(env: &TestEnv, server: &Server, addrs: &str) -> std::process::Command {
    let mut cmd = env.cli(server, "payments");
    cmd.env("STRONGROOM_ADDR", addrs);
    cmd
}

#[tokio::test]
async fn reads_move_past_a_dead_endpoint_in_the_client_and_the_cli() {
    let env = TestEnv::new();
    let server = env.start();
    let mut direct = server.client("payments").await;
    for (n, v) in [("a", "alpha"), ("b", "bravo"), ("c", "charlie")] {
        direct
            .put_secret(put(&format!("payments/f/{n}"), v.as_bytes()))
            .await
            .unwrap();
    }
    let dead = closed_port();
    let live = format!("https://{}", server.addr);
    let client = Client::connect(
        &[dead.clone(), live.clone()],
        &env.client_tls("payments"),
        Duration::from_secs(20),
    )
    .unwrap();

    let secret = client.get("payments/f/b", 0).await.unwrap();
    assert_eq!(secret.value.expose(), b"bravo");
    assert_eq!(secret.version, 1);
    let shown = format!("{secret:?}");
    assert!(!shown.contains("bravo"), "{shown}");
    assert!(shown.contains("<5 bytes>"), "{shown}");

    let described = client.describe("payments/f/a").await.unwrap();
    assert_eq!(described.latest_version, 1);
    let page = client.list("payments/f", 2, "").await.unwrap();
    assert_eq!(page.names, ["payments/f/a", "payments/f/b"]);
    assert!(!page.next_page_token.is_empty());
    let all = client.pages("payments/f", 2).collect().await.unwrap();
    assert_eq!(all, ["payments/f/a", "payments/f/b", "payments/f/c"]);
    // The service's answers come back as they are, not as failover.
    match client.get("payments/f/none", 0).await {
        Err(ClientError::Status(s)) => assert_eq!(s.code(), tonic::Code::NotFound),
        other => panic!("{other:?}"),
    }

    // The CLI, with the dead endpoint first.
    let addrs = format!("{dead},{live}");
    let got =
        Output::of(cli(&env, &server, &addrs).args(["get", "payments/f/c", "--field", "value"]));
    got.assert_ok();
    assert_eq!(got.stdout, "charlie");
    let listed = Output::of(cli(&env, &server, &addrs).args([
        "list",
        "payments/f",
        "--page-size",
        "1",
        "--all",
        "--format",
        "json",
    ]));
    listed.assert_ok();
    let j: serde_json::Value = serde_json::from_str(listed.stdout.trim()).unwrap();
    assert_eq!(
        j["names"],
        serde_json::json!(["payments/f/a", "payments/f/b", "payments/f/c"])
    );
    let described = Output::of(cli(&env, &server, &addrs).args(["describe", "payments/f/a"]));
    described.assert_ok();
    assert!(
        described.stdout.contains("latest version 1"),
        "{}",
        described.stdout
    );
    // Spaces around the commas are allowed.
    let spaced =
        Output::of(cli(&env, &server, &format!(" {dead} , {live} ")).args(["get", "payments/f/a"]));
    spaced.assert_ok();
}

#[tokio::test]
async fn a_write_moves_on_only_when_it_was_not_sent() {
    let env = TestEnv::new();
    let server = env.start();
    let live = format!("https://{}", server.addr);
    let mut direct = server.client("payments").await;

    // Connection refused: the request never left, so even a plain put moves on, once.
    let client = Client::connect(
        &[closed_port(), live.clone()],
        &env.client_tls("payments"),
        Duration::from_secs(20),
    )
    .unwrap();
    let w = client
        .put("payments/w/refused", &value(b"one"), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(w.version, 1);
    let d = client.describe("payments/w/refused").await.unwrap();
    assert_eq!(d.versions.len(), 1);
    // The CLI too, put and delete.
    let addrs = format!("{},{live}", closed_port());
    let put_cli = run_with_stdin(
        cli(&env, &server, &addrs).args(["put", "payments/w/refused", "--format", "json"]),
        b"two",
    );
    put_cli.assert_ok();
    let j: serde_json::Value = serde_json::from_str(put_cli.stdout.trim()).unwrap();
    assert_eq!(j["version"], 2);
    Output::of(cli(&env, &server, &addrs).args(["delete", "payments/w/refused"])).assert_ok();

    // Cut after the server answered: the write was applied, the client cannot know it.
    let relay = Relay::start(Some(server.addr.parse().unwrap())).await;
    let client = Client::connect(
        &[relay.url(), live.clone()],
        &env.client_tls("payments"),
        Duration::from_secs(20),
    )
    .unwrap();
    // Warm up the relayed connection (an answer: NOT_FOUND).
    assert!(matches!(
        client.get("payments/w/none", 0).await,
        Err(ClientError::Status(_))
    ));
    relay.cut_after_next_answer();
    let err = client
        .put("payments/w/plain", &value(b"once"), PutOptions::default())
        .await
        .expect_err("the answer was cut");
    assert!(matches!(err, ClientError::OutcomeUnknown(_)), "{err:?}");
    assert!(err.to_string().contains(OUTCOME_UNKNOWN), "{err}");
    assert!(err.to_string().contains(&relay.url()), "{err}");
    // Applied once, at the first endpoint, and not sent again to the second.
    let d = direct
        .describe_secret(DescribeSecretRequest {
            name: "payments/w/plain".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((d.latest_version, d.versions.len()), (1, 1), "{d:?}");
    let delete_cut = {
        // The broken connection was dropped: connect afresh first, or the cut would fall on
        // the handshake (not sent, so the delete would rightly move on).
        assert!(client.get("payments/w/none", 0).await.is_err());
        relay.cut_after_next_answer();
        client.delete("payments/w/plain").await
    };
    assert!(
        matches!(delete_cut, Err(ClientError::OutcomeUnknown(_))),
        "{delete_cut:?}"
    );

    // A check-and-set put is retried on the next endpoint; there it meets its own first
    // attempt's write (ABORTED), which is an unknown outcome too, not a conflict.
    let client = Client::connect(
        &[relay.url(), live.clone()],
        &env.client_tls("payments"),
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(client.get("payments/w/none", 0).await.is_err());
    relay.cut_after_next_answer();
    let cas = PutOptions {
        expected_version: Some(0),
        expires_at_unix: None,
        ..Default::default()
    };
    let err = client
        .put("payments/w/cas", &value(b"cas"), cas)
        .await
        .expect_err("the first answer was cut and the retry conflicts with it");
    assert!(matches!(err, ClientError::OutcomeUnknown(_)), "{err:?}");
    let d = client.describe("payments/w/cas").await.unwrap();
    assert_eq!((d.latest_version, d.versions.len()), (1, 1), "{d:?}");
    // A get whose answer is cut moves on and succeeds.
    relay.cut_after_next_answer();
    let got = client.get("payments/w/cas", 0).await.unwrap();
    assert_eq!(got.value.expose(), b"cas");
    drop(relay);
}

#[tokio::test]
async fn calls_move_on_when_a_server_is_killed_mid_run() {
    let env = TestEnv::new();
    let first = env.start();
    // The second endpoint: a relay that holds connections until a server is behind it.
    let relay = Relay::start(None).await;
    let client = Arc::new(
        Client::connect(
            &[format!("https://{}", first.addr), relay.url()],
            &env.client_tls("payments"),
            Duration::from_secs(60),
        )
        .unwrap()
        .with_attempt_timeout(Duration::from_secs(30)),
    );
    let cas = |v| PutOptions {
        expected_version: Some(v),
        expires_at_unix: None,
        ..Default::default()
    };
    assert_eq!(
        client
            .put("payments/k/x", &value(b"v1"), cas(0))
            .await
            .unwrap()
            .version,
        1
    );

    // Readers in the background, counting answers; every one must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (client, stop, served) = (client.clone(), stop.clone(), served.clone());
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let s = client.get("payments/k/x", 0).await?;
                assert_eq!(s.value.expose(), b"v1");
                served.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, ClientError>(())
        }));
    }
    wait_for(&served, 5).await;

    let mut first = first;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    // The store is free once the first process is gone; the second server takes it over.
    let second = env.start();
    relay.set_backend(second.addr.parse().unwrap());
    let before = served.load(Ordering::SeqCst);
    wait_for(&served, before + 10).await;
    assert!(
        relay.piped.load(Ordering::SeqCst) > 0,
        "the reads after the kill went through the second endpoint"
    );
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await
            .unwrap()
            .expect("every read succeeded, through one endpoint or the other");
    }

    // Writes with check-and-set go to the second server; read back there directly.
    assert_eq!(
        client
            .put("payments/k/x", &value(b"v2"), cas(1))
            .await
            .unwrap()
            .version,
        2
    );
    let got = second
        .client("payments")
        .await
        .get_secret(get("payments/k/x"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.version, got.value.as_slice()), (2, &b"v2"[..]));
    let names = second
        .client("payments")
        .await
        .list_secrets(list("payments/k"))
        .await
        .unwrap()
        .into_inner()
        .names;
    assert_eq!(names, ["payments/k/x"]);
}

#[tokio::test]
async fn every_endpoint_dead_is_one_clear_error() {
    let env = TestEnv::with_token();
    let (a, b) = (closed_port(), closed_port());
    let client = Client::connect(
        &[a.clone(), b.clone()],
        &env.client_tls("payments"),
        Duration::from_secs(10),
    )
    .unwrap();
    match client.get("payments/x", 0).await {
        Err(ClientError::Unreachable(attempts)) => {
            let tried: Vec<&str> = attempts.iter().map(|t| t.target.addr.as_str()).collect();
            assert_eq!(tried, [a.as_str(), b.as_str()]);
        }
        other => panic!("{other:?}"),
    }
    // A plain put that was never sent is no unknown outcome.
    let put_err = client
        .put("payments/x", &value(b"v"), PutOptions::default())
        .await
        .expect_err("nothing listens");
    assert!(
        matches!(put_err, ClientError::Unreachable(_)),
        "{put_err:?}"
    );

    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_strongroom"));
    env.client_env_at(&mut cmd, &format!("{a},{b}"), "payments")
        .env_remove("STRONGROOM_TIMEOUT")
        .env_remove("STRONGROOM_FORMAT")
        .args(["get", "payments/x"]);
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    eprintln!("{}", out.stderr);
    assert_eq!(out.code, 2, "{}", out.stderr);
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", out.stderr);
    for w in [
        "every endpoint failed (2 tried)",
        &format!("nothing is listening at {a} (connection refused)"),
        &format!("nothing is listening at {b} (connection refused)"),
        "--addr (STRONGROOM_ADDR)",
    ] {
        assert!(errors[0].contains(w), "missing {w:?} in: {}", out.stderr);
    }
    assert!(out.stdout.is_empty());

    // No endpoint at all is a usage error.
    cmd.env("STRONGROOM_ADDR", " , ");
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("names no endpoint"), "{}", out.stderr);
}

/// Waits until `counter` reaches `n` (bounded: a hang is a failure).
async fn wait_for(counter: &AtomicUsize, n: usize) {
    tokio::time::timeout(Duration::from_secs(120), async {
        while counter.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("fewer than {n} answers"));
}

/// A TCP relay on 127.0.0.1: each connection is held until a backend is set, then piped to
/// it both ways. Armed with [`Relay::cut_after_next_answer`], the next bytes a server sends
/// are dropped and that connection closed: the server has acted on the request, and the
/// client never hears of it.
struct Relay {
    addr: SocketAddr,
    backend: watch::Sender<Option<SocketAddr>>,
    cut: Arc<AtomicBool>,
    /// Connections piped to a backend so far.
    piped: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(backend: Option<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (backend, rx) = watch::channel(backend);
        let cut = Arc::new(AtomicBool::new(false));
        let armed = cut.clone();
        let piped = Arc::new(AtomicUsize::new(0));
        let count = piped.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(pipe(conn, rx.clone(), armed.clone(), count.clone()));
            }
        });
        Relay {
            addr,
            backend,
            cut,
            piped,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn set_backend(&self, addr: SocketAddr) {
        self.backend.send_replace(Some(addr));
    }

    fn cut_after_next_answer(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    client: TcpStream,
    mut backend: watch::Receiver<Option<SocketAddr>>,
    cut: Arc<AtomicBool>,
    piped: Arc<AtomicUsize>,
) {
    let Ok(addr) = backend.wait_for(Option::is_some).await.map(|a| a.unwrap()) else {
        return;
    };
    let Ok(server) = TcpStream::connect(addr).await else {
        return;
    };
    piped.fetch_add(1, Ordering::SeqCst);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if cut.swap(false, Ordering::SeqCst) {
                        return;
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    // Whichever side ends first, both sockets close.
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}
