//! Mutual TLS, case by case, against a real `strongroomd`: a client without a valid
//! client-authentication certificate from the client CA is refused during the handshake,
//! before any handler runs, so it gets no answer, learns nothing and stores nothing. A valid
//! client of the same CA, on the same server, is served (the positive control).
//!
//! Every refused client carries the identity of `payments`, which may write under
//! `payments/`: if the server ever accepted one of them, its write would succeed and the test
//! would see it.

use std::io::{Read, Write};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};
use tonic::Code;

use crate::common::{PAYMENTS, Server, TestEnv};
use crate::common::{get, list, put};
use strongroom::proto::DescribeSecretRequest;
use strongroom::proto::secret_service_client::SecretServiceClient;

/// Written by the valid client before the refused ones try, read by them if they get through.
const CANARY: &str = "payments/mtls/canary";

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// What a good client certificate of `payments` has: its URI SAN, clientAuth, and a key
/// usage that allows signing the TLS handshake.
fn client_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = common_name(cn);
    params.subject_alt_names = vec![SanType::URI(PAYMENTS.try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params
}

/// The test's own client CA, made with rcgen directly: `strongroom_devpki::DevCa` keeps its
/// key private (the CA-as-client case must present the CA certificate with its key) and
/// overwrites the key usages of what it signs (the key-usage cases need others).
struct ClientCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl ClientCa {
    fn new(cn: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = common_name(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // Everything a client certificate of `payments` has too, so that when the CA
        // certificate is presented as a client certificate only its being a CA can refuse it.
        params.subject_alt_names = vec![SanType::URI(PAYMENTS.try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A client certificate of `payments`, changed by `edit`: (certificate PEM, key PEM).
    fn issue(&self, cn: &str, edit: impl FnOnce(&mut CertificateParams)) -> (String, String) {
        let mut params = client_params(cn);
        edit(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write_pair(env: &TestEnv, stem: &str, (cert, key): (String, String)) {
    std::fs::write(env.pki.join(format!("{stem}.pem")), cert).unwrap();
    std::fs::write(env.pki.join(format!("{stem}-key.pem")), key).unwrap();
}

/// A fresh environment whose client CA is `ca` (written over the fixture's before the server
/// starts), with a valid client `mtls-valid` of that CA, and the server running.
fn start_with_own_client_ca(ca: &ClientCa) -> (TestEnv, Server) {
    let env = TestEnv::new();
    std::fs::write(env.pki.join("client-ca.pem"), ca.cert_pem()).unwrap();
    write_pair(&env, "mtls-valid", ca.issue("valid", |_| {}));
    let server = env.start();
    (env, server)
}

/// The error and its sources, e.g. "... received fatal alert: UnknownCA".
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Codes a call gets when the connection was refused below gRPC. A status from a handler
/// (NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED, ...) means TLS let the client through.
fn refused_below_grpc(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
    )
}

/// How a refusal may look.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Only below gRPC: the TLS handshake refused the certificate.
    Tls,
    /// Below gRPC, or UNAUTHENTICATED from the service (a check after the handshake).
    TlsOrUnauthenticated,
}

impl Refusal {
    fn accepts(self, code: Code) -> bool {
        refused_below_grpc(code)
            || (self == Refusal::TlsOrUnauthenticated && code == Code::Unauthenticated)
    }
}

/// Tries to read, write and list as a client that must be refused. `Ok` says how it was
/// refused; `Err` says what it got through to.
async fn try_as(
    client: Result<SecretServiceClient<tonic::transport::Channel>, tonic::transport::Error>,
    slug: &str,
    refusal: Refusal,
) -> Result<String, String> {
    let mut client = match client {
        Err(e) => return Ok(format!("connect failed: {}", chain(&e))),
        Ok(c) => c,
    };
    let mut seen = Vec::new();
    match client.get_secret(get(CANARY)).await {
        Ok(r) => {
            return Err(format!(
                "GetSecret answered version {}",
                r.get_ref().version
            ));
        }
        Err(s) if refusal.accepts(s.code()) => seen.push(format!("get: {}", chain(&s))),
        Err(s) => return Err(format!("GetSecret reached a handler: {s:?}")),
    }
    match client
        .put_secret(put(&format!("payments/mtls/{slug}"), b"let me in"))
        .await
    {
        Ok(r) => return Err(format!("PutSecret stored version {}", r.get_ref().version)),
        Err(s) if refusal.accepts(s.code()) => seen.push(format!("put: {:?}", s.code())),
        Err(s) => return Err(format!("PutSecret reached a handler: {s:?}")),
    }
    match client.list_secrets(list("payments")).await {
        Ok(r) => return Err(format!("ListSecrets answered {:?}", r.get_ref().names)),
        Err(s) if refusal.accepts(s.code()) => seen.push(format!("list: {:?}", s.code())),
        Err(s) => return Err(format!("ListSecrets reached a handler: {s:?}")),
    }
    Ok(seen.join("; "))
}

/// The positive control and the aftermath: the valid client reads the canary, and nothing
/// any refused client tried to write exists.
async fn assert_nothing_got_through(server: &mut Server) {
    let mut ok = server.client("mtls-valid").await;
    let got = ok.get_secret(get(CANARY)).await.unwrap().into_inner();
    assert_eq!(got.value, b"canary");
    let names = ok
        .list_secrets(list("payments/mtls"))
        .await
        .unwrap()
        .into_inner()
        .names;
    assert_eq!(names, vec![CANARY], "a refused client stored something");
    let d = ok
        .describe_secret(DescribeSecretRequest {
            name: CANARY.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.latest_version, 1, "a refused client overwrote the canary");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "strongroomd exited:\n{}",
        server.log_text()
    );
}

#[tokio::test]
async fn only_valid_client_certificates_from_the_client_ca_get_in() {
    let ca = ClientCa::new("mtls client CA");
    let env = TestEnv::new();
    std::fs::write(env.pki.join("client-ca.pem"), ca.cert_pem()).unwrap();
    write_pair(&env, "mtls-valid", ca.issue("valid", |_| {}));

    // Self-signed, with everything else right.
    let key = KeyPair::generate().unwrap();
    let cert = client_params("self-signed").self_signed(&key).unwrap();
    write_pair(&env, "self-signed", (cert.pem(), key.serialize_pem()));
    // From the right CA, outside its validity period.
    write_pair(
        &env,
        "expired",
        ca.issue("expired", |p| {
            p.not_before = date_time_ymd(2000, 1, 1);
            p.not_after = date_time_ymd(2001, 1, 1);
        }),
    );
    write_pair(
        &env,
        "not-yet-valid",
        ca.issue("not yet valid", |p| {
            p.not_before = date_time_ymd(2100, 1, 1);
            p.not_after = date_time_ymd(2101, 1, 1);
        }),
    );
    // From the right CA, for servers only.
    write_pair(
        &env,
        "server-auth-only",
        ca.issue("server auth only", |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }),
    );
    // The client CA's own certificate and key, presented as a client certificate.
    write_pair(&env, "ca-as-client", (ca.cert_pem(), ca.key_pem()));
    // A certificate signed by a valid client's key, sent with that client's certificate as
    // its intermediate: a leaf acting as a CA.
    let leaf_params = client_params("leaf used as CA");
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca.issuer).unwrap();
    let leaf_issuer = Issuer::new(leaf_params, leaf_key);
    let sub_key = KeyPair::generate().unwrap();
    let sub = client_params("signed by a leaf")
        .signed_by(&sub_key, &leaf_issuer)
        .unwrap();
    write_pair(
        &env,
        "signed-by-leaf",
        (
            format!("{}{}", sub.pem(), leaf.pem()),
            sub_key.serialize_pem(),
        ),
    );

    let mut server = env.start();
    // Positive control, before: the valid client of the same CA is served.
    let mut ok = server.client("mtls-valid").await;
    ok.put_secret(put(CANARY, b"canary")).await.unwrap();

    let cases: &[(&str, Option<&str>)] = &[
        ("no client certificate", None),
        ("self-signed certificate", Some("self-signed")),
        // The fixture's foreign CA (same identity as payments).
        ("certificate from a foreign CA", Some("foreign")),
        // The fixture's own client CA is no longer the one the server trusts.
        ("certificate from the replaced client CA", Some("payments")),
        (
            "the server's certificate (server CA, serverAuth)",
            Some("server"),
        ),
        ("expired certificate from the client CA", Some("expired")),
        (
            "not-yet-valid certificate from the client CA",
            Some("not-yet-valid"),
        ),
        (
            "serverAuth-only certificate from the client CA",
            Some("server-auth-only"),
        ),
        (
            "the client CA's own certificate as a client certificate",
            Some("ca-as-client"),
        ),
        (
            "certificate signed by a client certificate's key",
            Some("signed-by-leaf"),
        ),
    ];
    let mut let_through = Vec::new();
    for (i, (case, stem)) in cases.iter().enumerate() {
        let outcome = try_as(
            server.try_client(*stem).await,
            &format!("case-{i}"),
            Refusal::Tls,
        )
        .await;
        eprintln!("{case}: {outcome:?}");
        if let Err(what) = outcome {
            let_through.push(format!("{case}: {what}"));
        }
    }

    // Cleartext HTTP/2 (h2c, prior knowledge) to the TLS port: tonic's own client...
    let h2c = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map(SecretServiceClient::new);
    let outcome = try_as(h2c, "h2c", Refusal::Tls).await;
    eprintln!("cleartext HTTP/2: {outcome:?}");
    if let Err(what) = outcome {
        let_through.push(format!("cleartext HTTP/2: {what}"));
    }
    // ...and by hand: the connection preface and a SETTINGS frame get no HTTP/2 answer (at
    // most a TLS alert record, content type 21), and the server closes the connection.
    let mut tcp = std::net::TcpStream::connect(&server.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let mut answer = Vec::new();
    let read = tcp.read_to_end(&mut answer);
    eprintln!("raw h2c preface: read {read:?}, answer {answer:02x?}");
    assert!(
        answer.is_empty() || answer[0] == 21,
        "cleartext HTTP/2 got an answer that is not a TLS alert: {answer:02x?}"
    );
    let closed = match &read {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        closed,
        "the server did not close the cleartext connection: {read:?}"
    );

    assert!(
        let_through.is_empty(),
        "clients the server should have refused got through:\n{}",
        let_through.join("\n")
    );
    assert_nothing_got_through(&mut server).await;
}

/// RFC 5280 §4.2.1.3: a key whose key usage does not include digitalSignature may not sign,
/// and a TLS client certificate's key signs the handshake (CertificateVerify). Such a
/// certificate from the right CA, with the right EKU and identity, must still be refused,
/// in the handshake or with UNAUTHENTICATED. (webpki, under rustls, does not check the key
/// usage of end-entity certificates, so the service has to.)
#[tokio::test]
async fn client_certificates_whose_key_usage_forbids_signing_are_refused() {
    let ca = ClientCa::new("mtls client CA");
    let (env, mut server) = start_with_own_client_ca(&ca);
    write_pair(
        &env,
        "ku-key-encipherment",
        ca.issue("key encipherment only", |p| {
            p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        }),
    );
    write_pair(
        &env,
        "ku-cert-sign",
        ca.issue("certificate signing only", |p| {
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        }),
    );
    let mut ok = server.client("mtls-valid").await;
    ok.put_secret(put(CANARY, b"canary")).await.unwrap();

    let mut let_through = Vec::new();
    for (case, stem) in [
        ("keyUsage = keyEncipherment only", "ku-key-encipherment"),
        ("keyUsage = keyCertSign only (not a CA)", "ku-cert-sign"),
    ] {
        let outcome = try_as(
            server.try_client(Some(stem)).await,
            stem,
            Refusal::TlsOrUnauthenticated,
        )
        .await;
        eprintln!("{case}: {outcome:?}");
        if let Err(what) = outcome {
            let_through.push(format!("{case}: {what}"));
        }
    }
    assert!(
        let_through.is_empty(),
        "clients the server should have refused got through:\n{}",
        let_through.join("\n")
    );
    assert_nothing_got_through(&mut server).await;
}
