//! Mutual TLS: the server's TLS settings, the client's, the caller's identity as read from
//! its verified certificate, and a development PKI.
//!
//! rustls (through tonic) verifies that the client's chain ends at the configured client CA
//! and that the leaf is valid for client authentication; a connection without such a
//! certificate never reaches a handler. The identity is the leaf's URI SAN (SPIFFE style)
//! or, failing that, its first DNS SAN.

use std::fmt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, ClientTlsConfig, ServerTlsConfig};
use x509_parser::extensions::GeneralName;

/// An authenticated caller: the SAN of its verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity(String);

impl Identity {
    /// An identity from text (tests, policy checks).
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The identity as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Reads the identity from a verified leaf certificate (DER).
    pub fn from_certificate(der: &[u8]) -> Result<Self, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        // rustls (webpki) does not check an end entity's key usage; a client certificate
        // whose key may not sign cannot prove possession in the handshake legitimately.
        if let Some(ku) = cert
            .key_usage()
            .map_err(|e| TlsError::Certificate(e.to_string()))?
            && !ku.value.digital_signature()
        {
            return Err(TlsError::KeyUsage);
        }
        let san = cert
            .subject_alternative_name()
            .map_err(|e| TlsError::Certificate(e.to_string()))?
            .ok_or(TlsError::NoIdentity)?;
        let names = &san.value.general_names;
        let uri = names.iter().find_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
        let dns = names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        });
        uri.or(dns)
            .filter(|s| !s.is_empty())
            .map(|s| Self(s.to_owned()))
            .ok_or(TlsError::NoIdentity)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// TLS set-up and identity errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The peer certificate could not be parsed.
    #[error("the client certificate cannot be parsed: {0}")]
    Certificate(String),
    /// The certificate's key usage does not allow digital signatures.
    #[error("the client certificate's key usage does not include digitalSignature")]
    KeyUsage,
    /// The certificate carries neither a URI nor a DNS SAN.
    #[error("the client certificate has no URI or DNS subject alternative name")]
    NoIdentity,
    /// Generating a development certificate failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The server side: its certificate and key, and the CA its clients must chain to.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<ServerTlsConfig, TlsError> {
    let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
    Ok(ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(Certificate::from_pem(read(client_ca)?))
        .client_auth_optional(false))
}

/// The client side: the CA the server must chain to, and the client's certificate and key.
pub fn client_config(
    server_ca: &Path,
    cert: &Path,
    key: &Path,
    server_name: &str,
) -> Result<ClientTlsConfig, TlsError> {
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(server_ca)?))
        .identity(tonic::transport::Identity::from_pem(
            read(cert)?,
            read(key)?,
        ))
        .domain_name(server_name))
}

/// Why a command-line tool could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Local input is wrong (address, files): exit 1.
    #[error("{0}")]
    Local(String),
    /// The server could not be reached or refused the handshake: exit 2.
    #[error("{0}")]
    Remote(String),
}

/// Connects a command-line tool to `target.addr` over mutual TLS: the server must chain to
/// `target.server_ca` and present `target.server_name`; the tool presents
/// `target.identity` (tests also connect without one). The whole connect (name lookup, TCP,
/// TLS handshake) is bounded by `target.deadline`; a remote failure is explained in words
/// ([`crate::explain`]).
pub async fn connect(
    target: &crate::explain::Target,
) -> Result<tonic::transport::Channel, ConnectError> {
    let addr = &target.addr;
    let endpoint = tonic::transport::Endpoint::from_shared(addr.clone())
        .map_err(|e| ConnectError::Local(format!("bad address {addr}: {e}")))?;
    let tls = match &target.identity {
        Some((cert, key)) => client_config(&target.server_ca, cert, key, &target.server_name)
            .map_err(|e| ConnectError::Local(e.to_string()))?,
        None => ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                read(&target.server_ca).map_err(|e| ConnectError::Local(e.to_string()))?,
            ))
            .domain_name(&target.server_name),
    }
    .timeout(target.deadline);
    let endpoint = endpoint
        .tls_config(tls)
        .map_err(|e| ConnectError::Local(format!("TLS: {e}")))?
        .connect_timeout(target.deadline)
        .timeout(target.deadline);
    match tokio::time::timeout(target.deadline, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(ConnectError::Remote(crate::explain::connect_failure(
            &e, target,
        ))),
        Err(elapsed) => Err(ConnectError::Remote(crate::explain::connect_failure(
            &elapsed, target,
        ))),
    }
}

/// A certificate authority for development and tests.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM-encoded.
pub struct DevCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

impl DevCa {
    /// A new self-signed CA named `common_name`.
    pub fn new(common_name: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for the given DNS names and IP addresses.
    pub fn issue_server(&self, names: &[&str]) -> Result<DevCert, TlsError> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, names.first().copied().unwrap_or("server"))
    }

    /// A client certificate whose identity is `identity`: a URI SAN when it contains `://`,
    /// else a DNS SAN.
    pub fn issue_client(&self, identity: &str) -> Result<DevCert, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let ia5 = identity.try_into()?;
        params.subject_alt_names = vec![if identity.contains("://") {
            SanType::URI(ia5)
        } else {
            SanType::DnsName(ia5)
        }];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, identity)
    }

    /// Signs arbitrary parameters (tests use this for unusual certificates).
    pub fn sign(
        &self,
        mut params: CertificateParams,
        common_name: &str,
    ) -> Result<DevCert, TlsError> {
        let key = KeyPair::generate()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(DevCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes a development PKI into `dir`: separate server, client and admin CAs; a server
/// certificate for `localhost`/127.0.0.1/::1; one client certificate per identity in
/// `clients` (`<stem>.pem`, `<stem>-key.pem`), and an officer certificate from the admin CA.
/// Private keys are written with mode 0600.
pub fn write_dev_pki(dir: &Path, clients: &[(&str, &str)]) -> Result<(), DevPkiError> {
    std::fs::create_dir_all(dir)?;
    let server_ca = DevCa::new("strongroom dev server CA")?;
    let client_ca = DevCa::new("strongroom dev client CA")?;
    let admin_ca = DevCa::new("strongroom dev admin CA")?;
    write_pem(dir, "server-ca.pem", &server_ca.cert_pem(), false)?;
    write_pem(dir, "client-ca.pem", &client_ca.cert_pem(), false)?;
    write_pem(dir, "admin-ca.pem", &admin_ca.cert_pem(), false)?;
    let server = server_ca.issue_server(&["localhost", "127.0.0.1", "::1"])?;
    write_pair(dir, "server", &server)?;
    for (stem, identity) in clients {
        write_pair(dir, stem, &client_ca.issue_client(identity)?)?;
    }
    write_pair(
        dir,
        "officer",
        &admin_ca.issue_client("officer@strongroom.dev")?,
    )?;
    Ok(())
}

/// Errors writing the development PKI.
#[derive(Debug, thiserror::Error)]
pub enum DevPkiError {
    /// Certificate generation failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Certificate generation failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("cannot write the PKI: {0}")]
    Io(#[from] std::io::Error),
}

fn write_pair(dir: &Path, stem: &str, cert: &DevCert) -> Result<(), std::io::Error> {
    write_pem(dir, &format!("{stem}.pem"), &cert.cert_pem, false)?;
    write_pem(dir, &format!("{stem}-key.pem"), &cert.key_pem, true)
}

fn write_pem(dir: &Path, file: &str, pem: &str, private: bool) -> Result<(), std::io::Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    options.open(dir.join(file))?.write_all(pem.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        pem.contents
    }

    #[test]
    fn identity_prefers_uri_san() {
        let ca = DevCa::new("t").unwrap();
        let c = ca.issue_client("spiffe://bank/payments").unwrap();
        let id = Identity::from_certificate(&der(&c.cert_pem)).unwrap();
        assert_eq!(id.as_str(), "spiffe://bank/payments");
        let d = ca.issue_client("svc.bank.internal").unwrap();
        let id = Identity::from_certificate(&der(&d.cert_pem)).unwrap();
        assert_eq!(id.as_str(), "svc.bank.internal");
    }
}
