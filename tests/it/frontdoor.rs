//! The front door under attack: idle and stalled connections, per-source caps, revoked
//! certificates and CRLs replaced while running, identity rules, CA confusion, and what each
//! listener's reflection reveals. Real processes, real sockets, real TLS.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, SanType};
use strongroom::proto::StatusRequest;
use strongroom_devpki::{DevCa, DevCert};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tonic::Code;

use crate::common::{ADMIN, PAYMENTS, POLICY, Server, TestEnv};
use crate::common::{get, put, reflected_services};

fn write_cert(pki: &Path, stem: &str, cert: &DevCert) {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::write(pki.join(format!("{stem}.pem")), &cert.cert_pem).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(pki.join(format!("{stem}-key.pem")))
        .and_then(|mut f| std::io::Write::write_all(&mut f, cert.key_pem.as_bytes()))
        .unwrap();
}

/// Replaces a file in one step (write beside it, rename over it), as an operator's tooling
/// would, so the reloader never reads half a file.
fn replace(path: &Path, body: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TCP connection from `source` (any 127.0.0.0/8 address) to `to`.
async fn tcp_from(source: &str, to: &str) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0))?;
    socket.connect(to.parse().unwrap()).await
}

/// Whether the server closed the connection (EOF or reset) within `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // Handshake bytes from the server: keep reading until it gives up on us.
            Ok(Ok(_)) => continue,
        }
    }
}

/// The test configuration with `extra` appended and `lines` added to its `[server]` table.
fn server_lines(env: &TestEnv, extra: &str, lines: &str) -> std::path::PathBuf {
    let config = env.config(extra);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "shutdown_grace_ms = 1000\n",
        &format!("shutdown_grace_ms = 1000\n{lines}"),
    );
    assert!(text.contains(lines));
    std::fs::write(&config, text).unwrap();
    config
}

fn open_descriptors(server: &Server) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", server.child.id()))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_descriptor_limit_leave_both_planes_serving() {
    let env = TestEnv::new();
    // Long handshake deadline: room is made by evicting the oldest stalled handshake, not by
    // waiting for deadlines.
    let config = server_lines(
        &env,
        &format!("{ADMIN}[admin.connections]\nhandshake_timeout_ms = 120000\n{POLICY}"),
        "[server.connections]\nhandshake_timeout_ms = 120000\n",
    );
    const LIMIT: usize = 256;
    let server = env.start_under(
        &["prlimit", &format!("--nofile={LIMIT}:{LIMIT}")],
        &config,
        &[],
    );
    let admin_addr = server.admin_addr.clone().unwrap();

    // 450 connections that never send a byte, from eight source addresses, on both
    // listeners: together far beyond the process's 256 descriptors.
    let mut idle = Vec::new();
    for i in 0..450 {
        let source = format!("127.0.0.{}", 2 + i % 8);
        let to = if i % 3 == 0 {
            &admin_addr
        } else {
            &server.addr
        };
        if let Ok(s) = tcp_from(&source, to).await {
            idle.push(s);
        }
    }
    assert!(idle.len() >= 400, "only {} connections opened", idle.len());

    // A legitimate client and an officer still get in, within their deadlines.
    let mut client = tokio::time::timeout(Duration::from_secs(10), server.client("payments"))
        .await
        .expect("the client listener accepts a legitimate client");
    let mut req = tonic::Request::new(put("payments/front", b"door"));
    req.set_timeout(Duration::from_secs(5));
    client.put_secret(req).await.unwrap();
    let mut req = tonic::Request::new(get("payments/front"));
    req.set_timeout(Duration::from_secs(5));
    assert_eq!(
        client.get_secret(req).await.unwrap().into_inner().value,
        b"door"
    );

    let mut admin = tokio::time::timeout(Duration::from_secs(10), server.admin("alice"))
        .await
        .expect("the admin listener accepts an officer");
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(Duration::from_secs(5));
    admin.status(req).await.unwrap();

    // The process never came near its limit, and it logged the limit it runs under.
    let fds = open_descriptors(&server);
    assert!(fds < LIMIT, "{fds} descriptors open of {LIMIT}");
    let log = server.log_text();
    assert!(log.contains("descriptor limit"), "{log}");
    assert!(log.contains("nofile=256"), "{log}");
    assert!(
        !log.contains("accept failed"),
        "accept ran out of descriptors:\n{log}"
    );
    drop(idle);
}

#[tokio::test]
async fn a_client_that_stalls_after_its_client_hello_is_dropped_at_the_handshake_deadline() {
    let env = TestEnv::new();
    let config = server_lines(
        &env,
        POLICY,
        "[server.connections]\nhandshake_timeout_ms = 500\n",
    );
    let server = env.start_with(&config, &[]);

    // A real ClientHello, then silence.
    let mut stream = TcpStream::connect(&server.addr).await.unwrap();
    let hello = client_hello();
    tokio::io::AsyncWriteExt::write_all(&mut stream, &hello)
        .await
        .unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut stream, Duration::from_secs(20)).await,
        "a stalled handshake was never dropped"
    );
    // Dropped by the deadline, not at once: the server answered the hello and waited.
    assert!(started.elapsed() >= Duration::from_millis(400));
    // The service is fine for the next client.
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/after", b"v")).await.unwrap();
}

/// The bytes of a TLS 1.3 ClientHello for `localhost`, from a real rustls client.
fn client_hello() -> Vec<u8> {
    use std::sync::Arc;
    let roots = rustls::RootCertStore::empty();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    assert!(!out.is_empty());
    out
}

#[tokio::test]
async fn the_per_source_connection_cap_holds() {
    let env = TestEnv::new();
    let config = server_lines(
        &env,
        POLICY,
        "[server.connections]\nmax_connections_per_ip = 4\n",
    );
    let server = env.start_with(&config, &[]);

    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tcp_from("127.0.0.2", &server.addr).await.unwrap());
    }
    // The fifth from the same source is closed at once.
    let mut fifth = tcp_from("127.0.0.2", &server.addr).await.unwrap();
    assert!(closed_within(&mut fifth, Duration::from_secs(10)).await);
    // The four stay open (they are within their handshake deadline of 10 s)...
    for s in &mut held {
        assert!(!closed_within(s, Duration::from_millis(300)).await);
    }
    // ...and other sources are not affected.
    let mut other = tcp_from("127.0.0.3", &server.addr).await.unwrap();
    assert!(!closed_within(&mut other, Duration::from_millis(300)).await);
    drop(other);
    // A source at its cap is let in again once one of its connections goes.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = tcp_from("127.0.0.2", &server.addr).await.unwrap();
        if !closed_within(&mut again, Duration::from_millis(300)).await {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot never came back");
    }
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/cap", b"v")).await.unwrap();
}

/// The revocation set-up: own client and admin CAs (the tests issue and revoke with them),
/// CRLs named in the configuration and checked often.
struct Revocation {
    env: TestEnv,
    client_ca: DevCa,
    admin_ca: DevCa,
    certs: Vec<(String, DevCert)>,
}

impl Revocation {
    fn new() -> Self {
        let env = TestEnv::new();
        let client_ca = DevCa::new("revocation client CA").unwrap();
        let admin_ca = DevCa::new("revocation admin CA").unwrap();
        std::fs::write(env.pki.join("client-ca.pem"), client_ca.cert_pem()).unwrap();
        std::fs::write(env.pki.join("admin-ca.pem"), admin_ca.cert_pem()).unwrap();
        let mut certs = Vec::new();
        for (stem, id, ca) in [
            ("payments", PAYMENTS, &client_ca),
            ("leaked", PAYMENTS, &client_ca),
            ("alice", crate::common::ALICE, &admin_ca),
            ("bob", crate::common::BOB, &admin_ca),
        ] {
            let cert = ca.issue_client(id).unwrap();
            write_cert(&env.pki, stem, &cert);
            certs.push((stem.to_owned(), cert));
        }
        Self {
            env,
            client_ca,
            admin_ca,
            certs,
        }
    }

    fn cert(&self, stem: &str) -> &str {
        &self
            .certs
            .iter()
            .find(|(s, _)| s == stem)
            .unwrap()
            .1
            .cert_pem
    }

    fn write_crls(&self, client: &[&str], admin: &[&str], number: u64) {
        let pems = |stems: &[&str]| stems.iter().map(|s| self.cert(s)).collect::<Vec<_>>();
        replace(
            &self.env.pki.join("client.crl"),
            &self.client_ca.crl_pem(&pems(client), number).unwrap(),
        );
        replace(
            &self.env.pki.join("admin.crl"),
            &self.admin_ca.crl_pem(&pems(admin), number).unwrap(),
        );
    }

    fn start(&self) -> Server {
        let config = server_lines(
            &self.env,
            &format!("{ADMIN}crls = [\"pki/admin.crl\"]\n{POLICY}"),
            "client_crls = [\"pki/client.crl\"]\ntls_reload_ms = 100\n",
        );
        self.env.start_with(&config, &[])
    }
}

/// Whether a fresh connection with `stem`'s certificate gets an answer on the client plane.
async fn client_gets_in(server: &Server, stem: &str) -> Result<(), String> {
    let mut c = server
        .try_client(Some(stem))
        .await
        .map_err(|e| format!("{e:?}"))?;
    c.get_secret(get("payments/revocation"))
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

async fn officer_gets_in(server: &Server, stem: &str) -> Result<(), String> {
    let mut a = server
        .try_admin(Some(stem))
        .await
        .map_err(|e| format!("{e:?}"))?;
    a.status(StatusRequest {})
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn revoked_client_and_officer_certificates_are_refused_and_a_new_crl_takes_effect_while_running()
 {
    let r = Revocation::new();
    r.write_crls(&["leaked"], &["alice"], 1);
    let server = r.start();

    let mut c = server.client("payments").await;
    c.put_secret(put("payments/revocation", b"v"))
        .await
        .unwrap();
    client_gets_in(&server, "payments").await.unwrap();
    client_gets_in(&server, "leaked").await.unwrap_err();
    officer_gets_in(&server, "bob").await.unwrap();
    officer_gets_in(&server, "alice").await.unwrap_err();
    // Refused in the handshake, for being revoked, on both planes. (The client sees the
    // alert, or a broken pipe when its request was already on the way.)
    let revoked = |log: &str, plane: &str| {
        log.lines().any(|l| {
            l.contains("TLS handshake refused") && l.contains("Revoked") && l.contains(plane)
        })
    };
    // The server logs after its alert has left, so the client can be told first: wait for
    // the lines.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = server.log_text();
        if revoked(&log, "client") && revoked(&log, "admin") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no 'TLS handshake refused … Revoked' line for both planes:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The client tool says so in words.
    let out = crate::common::Output::of(
        r.env
            .cli(&server, "leaked")
            .args(["get", "payments/revocation"]),
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("revoked"), "{}", out.stderr);

    // New lists: payments revoked, alice reinstated. No restart.
    r.write_crls(&["leaked", "payments"], &[], 2);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let payments = client_gets_in(&server, "payments").await;
        let alice = officer_gets_in(&server, "alice").await;
        if payments.is_err() && alice.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new CRLs never took effect: payments {payments:?}, alice {alice:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.log_text().contains("TLS files changed"));

    // A CRL file that no longer parses keeps the last good lists, and says so.
    replace(&r.env.pki.join("client.crl"), "not a CRL\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log_text().contains("do not load") {
        assert!(Instant::now() < deadline, "the broken CRL was not reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(client_gets_in(&server, "payments").await.is_err());
    officer_gets_in(&server, "bob").await.unwrap();
}

#[tokio::test]
async fn a_crl_that_does_not_load_refuses_the_start() {
    let r = Revocation::new();
    r.write_crls(&[], &[], 1);
    // A CRL file that holds no CRL: the service would not know whom to refuse.
    std::fs::write(r.env.pki.join("client.crl"), "garbage").unwrap();
    let config = server_lines(&r.env, POLICY, "client_crls = [\"pki/client.crl\"]\n");
    let out = crate::common::Output::of(
        std::process::Command::new(env!("CARGO_BIN_EXE_strongroomd"))
            .arg("--config")
            .arg(&config)
            .env("SOFTHSM2_CONF", r.env.dir.path().join("softhsm2.conf"))
            .env("STRONGROOM_USER_PIN", &r.env.user_pin),
    );
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("client.crl"), "{}", out.stderr);
}

/// Issues a client certificate with arbitrary SANs from the test's client CA.
fn odd_client(env: &TestEnv, stem: &str, sans: Vec<SanType>) -> DevCa {
    let ca = DevCa::new("identity rules client CA").unwrap();
    std::fs::write(env.pki.join("client-ca.pem"), ca.cert_pem()).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    write_cert(&env.pki, stem, &ca.sign(params, stem).unwrap());
    ca
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

#[tokio::test]
async fn certificates_with_several_uri_sans_or_uri_looking_dns_sans_name_no_identity() {
    let env = TestEnv::new();
    let ca = odd_client(
        &env,
        "two-uris",
        vec![uri(PAYMENTS), uri("spiffe://strongroom.test/ops")],
    );
    let issue = |stem: &str, sans: Vec<SanType>| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        write_cert(&env.pki, stem, &ca.sign(params, stem).unwrap());
    };
    issue("dns-uri", vec![dns(PAYMENTS)]);
    issue(
        "two-dns",
        vec![dns("a.strongroom.test"), dns("b.strongroom.test")],
    );
    issue("good", vec![uri(PAYMENTS), dns("svc.strongroom.test")]);
    let server = env.start();

    for stem in ["two-uris", "dns-uri", "two-dns"] {
        // The handshake may refuse a malformed name already; otherwise the call is refused.
        let refused = match server.try_client(Some(stem)).await {
            Err(_) => continue,
            Ok(mut c) => c.put_secret(put("payments/x", b"v")).await.unwrap_err(),
        };
        assert!(
            matches!(
                refused.code(),
                Code::Unauthenticated | Code::Unavailable | Code::Unknown
            ),
            "{stem}: {refused:?}"
        );
        if refused.code() == Code::Unauthenticated {
            assert!(
                refused.message().contains("identity"),
                "{stem}: {refused:?}"
            );
        }
    }
    // One URI SAN beside a DNS SAN: the URI is the identity.
    let mut c = server.client("good").await;
    c.put_secret(put("payments/x", b"v")).await.unwrap();
}

#[tokio::test]
async fn an_admin_ca_equal_to_the_client_ca_up_to_whitespace_or_comments_is_refused_at_start() {
    let env = TestEnv::new();
    let client_ca = std::fs::read_to_string(env.pki.join("client-ca.pem")).unwrap();
    std::fs::write(
        env.pki.join("admin-ca.pem"),
        format!(
            "# the officers' CA (really the client CA)\n\n{}\n\n",
            client_ca.replace('\n', "\r\n")
        ),
    )
    .unwrap();
    let config = env.config(&format!("{ADMIN}\n{POLICY}"));
    let out = crate::common::Output::of(
        std::process::Command::new(env!("CARGO_BIN_EXE_strongroomd"))
            .arg("--config")
            .arg(&config)
            .env("SOFTHSM2_CONF", env.dir.path().join("softhsm2.conf"))
            .env("STRONGROOM_USER_PIN", &env.user_pin),
    );
    assert_ne!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("admin.ca must be a different CA"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn each_listener_reflects_only_the_services_it_serves() {
    let env = TestEnv::new();
    let server = env.start_admin();
    let client = server
        .channel(&server.addr, Some("payments"))
        .await
        .unwrap();
    assert_eq!(
        reflected_services(client).await,
        ["grpc.health.v1.Health", "strongroom.v1.SecretService"]
    );
    let admin_addr = server.admin_addr.clone().unwrap();
    let admin = server.channel(&admin_addr, Some("alice")).await.unwrap();
    assert_eq!(
        reflected_services(admin).await,
        ["grpc.health.v1.Health", "strongroom.v1.AdminService"]
    );
}

#[tokio::test]
async fn idle_connections_are_closed_and_clients_reconnect() {
    let env = TestEnv::new();
    let config = server_lines(
        &env,
        POLICY,
        "[server.connections]\nidle_timeout_secs = 1\n",
    );
    let server = env.start_with(
        &config,
        &[("STRONGROOM_LOG", "info,strongroom::front=debug")],
    );
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/idle", b"v")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log_text().contains("idle connection closed") {
        assert!(
            Instant::now() < deadline,
            "the idle connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The channel connects again for the next call.
    let mut req = tonic::Request::new(get("payments/idle"));
    req.set_timeout(Duration::from_secs(5));
    let got = match c.get_secret(req).await {
        Ok(r) => r,
        // A call racing the GOAWAY may fail once as retryable (UNAVAILABLE, or CANCELLED
        // when it was written to the connection as it closed); the next one goes through.
        Err(e) if matches!(e.code(), Code::Unavailable | Code::Cancelled) => {
            c.get_secret(get("payments/idle")).await.unwrap()
        }
        Err(e) => panic!("{e:?}"),
    };
    assert_eq!(got.into_inner().value, b"v");
}

#[tokio::test]
async fn header_lists_over_the_cap_are_refused_and_the_connection_serves_on() {
    let env = TestEnv::new();
    let server = env.start();
    let mut c = server.client("payments").await;
    c.put_secret(put("payments/headers", b"v")).await.unwrap();
    // 20 KiB of metadata against the default 16 KiB cap.
    let mut req = tonic::Request::new(get("payments/headers"));
    req.metadata_mut()
        .insert("x-junk", "a".repeat(20 * 1024).parse().unwrap());
    let refused = c.get_secret(req).await.unwrap_err();
    assert_ne!(refused.code(), Code::Ok);
    // Just under the cap is served.
    let mut req = tonic::Request::new(get("payments/headers"));
    req.metadata_mut()
        .insert("x-junk", "a".repeat(8 * 1024).parse().unwrap());
    assert_eq!(c.get_secret(req).await.unwrap().into_inner().value, b"v");
}
