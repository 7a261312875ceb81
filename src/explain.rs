//! Refusals in words: why a command-line tool could not reach strongroomd, or why the server
//! turned its certificate away, and what to do about it.
//!
//! Failures arrive as error chains (tonic → hyper → I/O → rustls). [`cause`] walks a chain
//! with [`std::error::Error::source`], looks inside I/O errors for a [`rustls::Error`], and
//! falls back to the text of links that lost their type on the way (h2 keeps an I/O error's
//! kind and message only). With TLS 1.3 the server judges the client certificate after the
//! client has finished its half of the handshake, so a refusal surfaces on the first RPC,
//! and often only as "connection closed": [`rpc_failure`] then asks [`probe`], which repeats
//! the handshake on a fresh connection, speaks first as HTTP/2 requires, and reads the
//! server's answer — data if the certificate is accepted, the alert if it is not.

use std::error::Error;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError};

/// Which listener a tool talks to; the advice names that listener's flags and settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// The client listener (`strongroom`).
    Client,
    /// The officers' admin listener (`strongroom-admin`).
    Admin,
}

impl Plane {
    fn addr_flag(self) -> &'static str {
        match self {
            Plane::Client => "--addr (STRONGROOM_ADDR)",
            Plane::Admin => "--admin-addr (STRONGROOM_ADMIN_ADDR)",
        }
    }

    fn cert_flags(self) -> &'static str {
        match self {
            Plane::Client => "--cert and --key (STRONGROOM_CLIENT_CERT, STRONGROOM_CLIENT_KEY)",
            Plane::Admin => {
                "--admin-cert and --admin-key (STRONGROOM_ADMIN_CERT, STRONGROOM_ADMIN_KEY)"
            }
        }
    }

    fn cacert_flag(self) -> &'static str {
        match self {
            Plane::Client => "--cacert (STRONGROOM_CACERT)",
            Plane::Admin => "--admin-cacert (STRONGROOM_ADMIN_CACERT)",
        }
    }

    fn server_name_flag(self) -> &'static str {
        match self {
            Plane::Client => "--server-name (STRONGROOM_SERVER_NAME)",
            Plane::Admin => "--admin-server-name (STRONGROOM_ADMIN_SERVER_NAME)",
        }
    }

    fn trusted_ca(self) -> &'static str {
        match self {
            Plane::Client => "the client CA the server trusts (its `[server] client_ca`)",
            Plane::Admin => {
                "the admin CA the server trusts for officers (its `[admin] ca`; not the client CA)"
            }
        }
    }
}

/// What a tool connects to, and with what.
#[derive(Debug, Clone)]
pub struct Target {
    /// The listener.
    pub plane: Plane,
    /// The address as given (`https://host:port`).
    pub addr: String,
    /// The name checked in the server's certificate.
    pub server_name: String,
    /// The CA the server's certificate must chain to.
    pub server_ca: PathBuf,
    /// The tool's certificate and private key; none for a client that presents none.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Connect and request deadline.
    pub deadline: Duration,
}

impl Target {
    /// A target; `identity` is the certificate and key presented; the server name defaults
    /// to the address's host (else `localhost`).
    pub fn new(
        plane: Plane,
        addr: &str,
        server_ca: &Path,
        identity: Option<(&Path, &Path)>,
        server_name: Option<&str>,
        deadline: Duration,
    ) -> Self {
        let server_name = server_name
            .map(str::to_owned)
            .or_else(|| {
                addr.parse::<tonic::transport::Uri>()
                    .ok()
                    .and_then(|u| u.host().map(|h| h.trim_matches(['[', ']']).to_owned()))
            })
            .unwrap_or_else(|| "localhost".into());
        Self {
            plane,
            addr: addr.to_owned(),
            server_name,
            server_ca: server_ca.to_path_buf(),
            identity: identity.map(|(c, k)| (c.to_path_buf(), k.to_path_buf())),
            deadline,
        }
    }

    /// The certificate's path, for messages.
    fn cert(&self) -> String {
        self.identity.as_ref().map_or_else(
            || "(none presented)".into(),
            |(c, _)| c.display().to_string(),
        )
    }

    /// `host:port` of the address (port 443 when absent).
    fn authority(&self) -> Option<String> {
        let uri = self.addr.parse::<tonic::transport::Uri>().ok()?;
        let host = uri.host()?;
        Some(format!("{host}:{}", uri.port_u16().unwrap_or(443)))
    }
}

/// Why a connection failed, as far as an error chain or a [`probe`] tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The server does not trust the CA that issued the tool's certificate (alert
    /// `unknown_ca`).
    ClientCaUnknown,
    /// The server wants a client certificate and got none (alert `certificate_required`).
    CertificateRequired,
    /// The server holds the tool's certificate revoked (alert `certificate_revoked`).
    ClientCertificateRevoked,
    /// The server finds the tool's certificate expired or not yet valid (alert
    /// `certificate_expired`).
    ClientCertificateExpired,
    /// The server refused the tool's certificate for another reason; the alert's name.
    ClientCertificateRefused(String),
    /// The server's certificate does not chain to the CA the tool trusts.
    ServerCaUnknown,
    /// The server's certificate is expired or not yet valid; rustls's account.
    ServerCertificateExpired(String),
    /// The server's certificate is revoked.
    ServerCertificateRevoked,
    /// The server's certificate does not hold the name the tool checks; the names it holds.
    WrongServerName(Vec<String>),
    /// The server's certificate is unacceptable for another reason; rustls's account.
    ServerCertificateBad(String),
    /// Nothing listens at the address.
    ConnectionRefused,
    /// No route to the host or its network.
    Unreachable,
    /// The host name does not resolve.
    NameNotResolved,
    /// No answer within the deadline.
    DeadlinePassed,
}

/// The first cause found along `err`'s chain of sources.
pub fn cause(err: &(dyn Error + 'static)) -> Option<Cause> {
    let mut link = Some(err);
    while let Some(e) = link {
        if let Some(c) = link_cause(e) {
            return Some(c);
        }
        link = e.source();
    }
    None
}

fn link_cause(e: &(dyn Error + 'static)) -> Option<Cause> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return tls_cause(tls);
    }
    if let Some(io) = e.downcast_ref::<io::Error>() {
        // An I/O error's `source()` skips the error it wraps: look at that one directly.
        if let Some(c) = io.get_ref().and_then(|inner| cause(inner)) {
            return Some(c);
        }
        match io.kind() {
            io::ErrorKind::ConnectionRefused => return Some(Cause::ConnectionRefused),
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                return Some(Cause::Unreachable);
            }
            io::ErrorKind::TimedOut => return Some(Cause::DeadlinePassed),
            _ => {}
        }
    }
    if e.is::<tokio::time::error::Elapsed>() {
        return Some(Cause::DeadlinePassed);
    }
    text_cause(&e.to_string())
}

fn tls_cause(e: &rustls::Error) -> Option<Cause> {
    match e {
        rustls::Error::AlertReceived(alert) => alert_cause(&format!("{alert:?}")),
        rustls::Error::InvalidCertificate(c) => Some(match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                Cause::ServerCaUnknown
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => {
                Cause::ServerCertificateExpired(c.to_string())
            }
            CertificateError::Revoked => Cause::ServerCertificateRevoked,
            CertificateError::NotValidForName => Cause::WrongServerName(Vec::new()),
            CertificateError::NotValidForNameContext { presented, .. } => {
                Cause::WrongServerName(presented.iter().map(|n| bare_name(n)).collect())
            }
            other => Cause::ServerCertificateBad(other.to_string()),
        }),
        _ => None,
    }
}

/// `localhost` for rustls's `DnsName("localhost")`, `127.0.0.1` for `IpAddress(127.0.0.1)`.
fn bare_name(presented: &str) -> String {
    ["DnsName(", "IpAddress("]
        .iter()
        .find_map(|p| presented.strip_prefix(p)?.strip_suffix(')'))
        .map_or(presented, |n| n.trim_matches('"'))
        .to_owned()
}

/// A cause from an alert the server sent, by the name rustls gives it
/// ([`AlertDescription`]'s `Debug`).
fn alert_cause(name: &str) -> Option<Cause> {
    let is = |a: AlertDescription| format!("{a:?}") == name;
    if is(AlertDescription::UnknownCA) {
        Some(Cause::ClientCaUnknown)
    } else if is(AlertDescription::CertificateRequired) {
        Some(Cause::CertificateRequired)
    } else if is(AlertDescription::CertificateRevoked) {
        Some(Cause::ClientCertificateRevoked)
    } else if is(AlertDescription::CertificateExpired) {
        Some(Cause::ClientCertificateExpired)
    } else if [
        AlertDescription::BadCertificate,
        AlertDescription::UnsupportedCertificate,
        AlertDescription::CertificateUnknown,
        AlertDescription::DecryptError,
        AlertDescription::AccessDenied,
    ]
    .into_iter()
    .any(is)
    {
        Some(Cause::ClientCertificateRefused(name.to_owned()))
    } else {
        None
    }
}

/// Causes known only by their text: errors whose type is private to a dependency, or that
/// h2 flattened into an I/O error's message.
fn text_cause(text: &str) -> Option<Cause> {
    if let Some(rest) = text.split("received fatal alert: ").nth(1) {
        let name: String = rest
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect();
        if let Some(c) = alert_cause(&name) {
            return Some(c);
        }
    }
    // tonic's handshake and request timeouts; hyper-util's resolver.
    let bare = text.trim_end_matches('.');
    if bare.ends_with("TLS handshake timeout") || bare.ends_with("Timeout expired") {
        return Some(Cause::DeadlinePassed);
    }
    if text == "dns error" || text.contains("failed to lookup address information") {
        return Some(Cause::NameNotResolved);
    }
    None
}

/// What happened and what to do, in words.
pub fn explain(cause: &Cause, target: &Target) -> String {
    let addr = &target.addr;
    let plane = target.plane;
    let cert = target.cert();
    match cause {
        Cause::ClientCaUnknown => format!(
            "{addr} refused the certificate {cert}: the server does not trust the CA that \
             issued it (TLS alert: unknown CA). Use a certificate issued by {}, given with {}",
            plane.trusted_ca(),
            plane.cert_flags()
        ),
        Cause::CertificateRequired => format!(
            "{addr} requires a client certificate and none was presented (TLS alert: \
             certificate required). Give a certificate and its key with {}",
            plane.cert_flags()
        ),
        Cause::ClientCertificateRevoked => format!(
            "{addr} refused the certificate {cert}: it has been revoked (TLS alert: certificate \
             revoked). Ask the CA's operator for a new certificate"
        ),
        Cause::ClientCertificateExpired => format!(
            "{addr} refused the certificate {cert}: it has expired or is not yet valid{} (TLS \
             alert: certificate expired). Renew the certificate, and check this machine's clock",
            target
                .identity
                .as_ref()
                .and_then(|(c, _)| validity(c))
                .map(|v| format!(" ({v})"))
                .unwrap_or_default()
        ),
        Cause::ClientCertificateRefused(alert) => format!(
            "{addr} refused the certificate {cert} (TLS alert: {alert}). Check that it is a \
             client certificate (extended key usage clientAuth, key usage digitalSignature) \
             from {}, and that {} hold its matching key",
            plane.trusted_ca(),
            plane.cert_flags()
        ),
        Cause::ServerCaUnknown => format!(
            "the certificate presented by {addr} is not issued by the CA in {} (unknown issuer). \
             Give the CA that issued the server's certificate with {}, or check that {addr} is \
             the server you mean",
            target.server_ca.display(),
            plane.cacert_flag()
        ),
        Cause::ServerCertificateExpired(detail) => format!(
            "the certificate presented by {addr} has expired or is not yet valid ({detail}). \
             The server's operator must renew it; check this machine's clock too"
        ),
        Cause::ServerCertificateRevoked => format!(
            "the certificate presented by {addr} has been revoked. Tell the server's operator"
        ),
        Cause::WrongServerName(presented) => format!(
            "the certificate presented by {addr} is not valid for the name {}{} (wrong server \
             name). Connect with a name the certificate holds, or set {} to one",
            target.server_name,
            if presented.is_empty() {
                String::new()
            } else {
                format!("; it holds {}", presented.join(", "))
            },
            plane.server_name_flag()
        ),
        Cause::ServerCertificateBad(detail) => format!(
            "the certificate presented by {addr} is not acceptable: {detail}. Tell the server's \
             operator"
        ),
        Cause::ConnectionRefused => format!(
            "nothing is listening at {addr} (connection refused). Check the address given with \
             {} and that strongroomd is running",
            plane.addr_flag()
        ),
        Cause::Unreachable => format!(
            "{addr} cannot be reached (host or network unreachable). Check the address given \
             with {} and the network between here and the server",
            plane.addr_flag()
        ),
        Cause::NameNotResolved => format!(
            "the host name in {addr} does not resolve (DNS lookup failed). Check the address \
             given with {}",
            plane.addr_flag()
        ),
        Cause::DeadlinePassed => format!(
            "{addr} did not answer within {} s (deadline passed). Check that the address given \
             with {} is strongroomd's, or allow more time with --timeout (STRONGROOM_TIMEOUT)",
            target.deadline.as_secs_f64(),
            plane.addr_flag()
        ),
    }
}

/// The certificate's validity period, for the expired-certificate advice.
fn validity(cert: &Path) -> Option<String> {
    let pem = std::fs::read(cert).ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let v = cert.validity();
    Some(format!("valid from {} to {}", v.not_before, v.not_after))
}

/// Words for a failed connect: the explanation if the cause is known, else the error chain
/// without repeated links.
pub fn connect_failure(err: &(dyn Error + 'static), target: &Target) -> String {
    match cause(err) {
        Some(c) => explain(&c, target),
        None => format!("cannot connect to {}: {}", target.addr, chain_text(err)),
    }
}

/// Words for a failed RPC, when the failure is the connection's rather than an answer from
/// the service (those return `None` and keep their status). Blocks for a [`probe`] when the
/// chain does not say why the connection ended; call it off the async threads.
pub fn rpc_failure(status: &tonic::Status, target: &Target) -> Option<String> {
    let source = status.source()?;
    if let Some(c) = cause(source) {
        return Some(explain(&c, target));
    }
    if !is_transport(source) {
        return None;
    }
    if let Some(c) = probe(target) {
        return Some(explain(&c, target));
    }
    Some(format!(
        "the connection to {} failed: {}",
        target.addr,
        chain_text(source)
    ))
}

fn is_transport(err: &(dyn Error + 'static)) -> bool {
    let mut link = Some(err);
    while let Some(e) = link {
        if e.is::<tonic::transport::Error>() || e.is::<io::Error>() {
            return true;
        }
        link = e.source();
    }
    false
}

/// The links of an error chain joined by ": ", leaving out a link whose words the message
/// already holds (tonic and hyper repeat their sources' messages).
pub fn chain_text(err: &(dyn Error + 'static)) -> String {
    let mut text = String::new();
    let mut link = Some(err);
    while let Some(e) = link {
        let part = e.to_string();
        if !part.is_empty() && !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        link = e.source();
    }
    text
}

/// A message with any link said twice in a row said once (`tcp connect error: tcp connect
/// error: refused` becomes `tcp connect error: refused`): messages built from error chains
/// elsewhere (a peer's, a library's) repeat their sources.
pub fn tidy(message: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in message.split(": ") {
        if parts.last() != Some(&part) {
            parts.push(part);
        }
    }
    parts.join(": ")
}

/// Connects to the target afresh with the tool's TLS settings, sends the HTTP/2 preface and
/// reads the server's first answer: `None` if data comes (the server accepts this
/// certificate) or if the probe cannot tell; the cause if an error or alert comes.
/// Blocking, bounded by the target's deadline.
pub fn probe(target: &Target) -> Option<Cause> {
    let config = probe_config(target)?;
    let name = ServerName::try_from(target.server_name.clone()).ok()?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
    let addr = target.authority()?.to_socket_addrs().ok()?.next()?;
    let sock = match TcpStream::connect_timeout(&addr, target.deadline) {
        Ok(s) => s,
        Err(e) => return cause(&e),
    };
    sock.set_read_timeout(Some(target.deadline)).ok()?;
    sock.set_write_timeout(Some(target.deadline)).ok()?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    // The client preface and an empty SETTINGS frame: a server that waits for the client
    // to speak first (HTTP/1 or HTTP/2 autodetection) answers too.
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    if let Err(e) = tls.write_all(PREFACE).and_then(|()| tls.flush()) {
        return cause(&e);
    }
    let mut buf = [0u8; 64];
    loop {
        match tls.read(&mut buf) {
            Ok(_) => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return cause(&e),
        }
    }
}

fn probe_config(target: &Target) -> Option<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&target.server_ca).ok()? {
        roots.add(ca.ok()?).ok()?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots);
    let mut config = match &target.identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .ok()?
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            let key = PrivateKeyDer::from_pem_file(key).ok()?;
            builder.with_client_auth_cert(chain, key).ok()?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Some(config)
}

#[cfg(test)]
mod tests {

    #[test]
    fn tonics_handshake_timeout_is_a_deadline_with_or_without_its_full_stop() {
        // tonic 0.14.5 writes "TLS handshake timeout." (with the stop).
        for text in [
            "TLS handshake timeout.",
            "TLS handshake timeout",
            "Timeout expired",
        ] {
            assert!(
                matches!(text_cause(text), Some(Cause::DeadlinePassed)),
                "{text}"
            );
        }
    }

    use super::*;

    fn target() -> Target {
        Target::new(
            Plane::Client,
            "https://127.0.0.1:7443",
            Path::new("/pki/server-ca.pem"),
            Some((
                Path::new("/pki/client.pem"),
                Path::new("/pki/client-key.pem"),
            )),
            Some("localhost"),
            Duration::from_secs(3),
        )
    }

    /// As tokio-rustls hands a rustls error to hyper.
    fn wrapped(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn alerts_from_the_server_name_the_client_certificate() {
        let cases = [
            (AlertDescription::UnknownCA, Cause::ClientCaUnknown),
            (
                AlertDescription::CertificateRequired,
                Cause::CertificateRequired,
            ),
            (
                AlertDescription::CertificateRevoked,
                Cause::ClientCertificateRevoked,
            ),
            (
                AlertDescription::CertificateExpired,
                Cause::ClientCertificateExpired,
            ),
            (
                AlertDescription::BadCertificate,
                Cause::ClientCertificateRefused("BadCertificate".into()),
            ),
        ];
        for (alert, want) in cases {
            let err = wrapped(rustls::Error::AlertReceived(alert));
            assert_eq!(
                cause(&err),
                Some(want.clone()),
                "{alert:?} as a rustls error"
            );
            // h2 keeps only the message of the I/O error: the text says the same.
            let flat = io::Error::new(io::ErrorKind::InvalidData, err.to_string());
            assert_eq!(cause(&flat), Some(want), "{alert:?} as text");
        }
        let other = wrapped(rustls::Error::AlertReceived(
            AlertDescription::HandshakeFailure,
        ));
        assert_eq!(cause(&other), None);
    }

    #[test]
    fn revoked_client_certificate_is_said_in_words() {
        let err = wrapped(rustls::Error::AlertReceived(
            AlertDescription::CertificateRevoked,
        ));
        let c = cause(&err).unwrap();
        let text = explain(&c, &target());
        assert!(text.contains("revoked"), "{text}");
        assert!(text.contains("/pki/client.pem"), "{text}");
        assert!(text.contains("new certificate"), "{text}");
    }

    #[test]
    fn the_servers_certificate_as_the_client_judges_it() {
        let name = |presented: Vec<String>| {
            wrapped(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForNameContext {
                    expected: ServerName::try_from("wrong.example").unwrap(),
                    presented,
                },
            ))
        };
        assert_eq!(
            cause(&name(vec![
                "DnsName(\"localhost\")".into(),
                "IpAddress(127.0.0.1)".into()
            ])),
            Some(Cause::WrongServerName(vec![
                "localhost".into(),
                "127.0.0.1".into()
            ]))
        );
        let cases = [
            (CertificateError::UnknownIssuer, "not issued by the CA"),
            (CertificateError::Expired, "expired"),
            (CertificateError::Revoked, "revoked"),
            (CertificateError::NotValidForName, "wrong server name"),
            (CertificateError::BadEncoding, "not acceptable"),
        ];
        for (e, words) in cases {
            let c = cause(&wrapped(rustls::Error::InvalidCertificate(e))).unwrap();
            let text = explain(&c, &target());
            assert!(text.contains(words), "{c:?}: {text}");
        }
    }

    #[test]
    fn connection_failures_by_kind() {
        let cases = [
            (io::ErrorKind::ConnectionRefused, Cause::ConnectionRefused),
            (io::ErrorKind::HostUnreachable, Cause::Unreachable),
            (io::ErrorKind::NetworkUnreachable, Cause::Unreachable),
            (io::ErrorKind::TimedOut, Cause::DeadlinePassed),
        ];
        for (kind, want) in cases {
            assert_eq!(cause(&io::Error::from(kind)), Some(want));
        }
        assert_eq!(cause(&io::Error::other("something else")), None);
        let dns =
            io::Error::other("failed to lookup address information: Name or service not known");
        assert_eq!(cause(&dns), Some(Cause::NameNotResolved));
        let text = explain(&Cause::DeadlinePassed, &target());
        assert!(text.contains("within 3 s"), "{text}");
        assert!(text.contains("deadline passed"), "{text}");
    }

    /// An error whose source repeats its own words, as tonic's and hyper's do.
    #[derive(Debug)]
    struct Link(&'static str, Option<Box<Link>>);

    impl std::fmt::Display for Link {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Link {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn repeated_links_are_said_once() {
        assert_eq!(
            tidy("transport error: tcp connect error: tcp connect error: Connection refused"),
            "transport error: tcp connect error: Connection refused"
        );
        assert_eq!(tidy("a: b: a"), "a: b: a");
        assert_eq!(tidy(""), "");
    }

    #[test]
    fn chains_are_told_once() {
        let e = Link(
            "transport error",
            Some(Box::new(Link(
                "tcp connect error",
                Some(Box::new(Link(
                    "tcp connect error",
                    Some(Box::new(Link("Broken pipe (os error 32)", None))),
                ))),
            ))),
        );
        assert_eq!(
            chain_text(&e),
            "transport error: tcp connect error: Broken pipe (os error 32)"
        );
    }

    #[test]
    fn the_server_name_defaults_to_the_host() {
        let t = Target::new(
            Plane::Admin,
            "https://[::1]:7444",
            Path::new("ca"),
            None,
            None,
            Duration::from_secs(1),
        );
        assert_eq!(t.server_name, "::1");
        assert_eq!(t.authority().as_deref(), Some("[::1]:7444"));
    }
}
