//! Mutual TLS: the server's TLS settings, the client's, the caller's identity as read from
//! its verified certificate. (Certificates are made by `strongroom-admin` with the
//! `strongroom-devpki` crate, which the service never links.)
//!
//! rustls (through tonic) verifies that the client's chain ends at the configured client CA
//! and that the leaf is valid for client authentication; a connection without such a
//! certificate never reaches a handler. The identity is the leaf's URI SAN (SPIFFE style)
//! or, failing that, its first DNS SAN.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

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
        let uris: Vec<&str> = names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        let dns: Vec<&str> = names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(*d),
                _ => None,
            })
            .collect();
        // One certificate, one identity: the single URI SAN, or, without one, the single
        // DNS SAN. Several candidates would let the policy match whichever suits the caller.
        match (uris.as_slice(), dns.as_slice()) {
            ([uri], _) if uri.contains("://") => Ok(Self((*uri).to_owned())),
            ([_], _) => Err(TlsError::BadIdentity(
                "its URI SAN has no scheme (expected e.g. spiffe://domain/path)".into(),
            )),
            ([_, _, ..], _) => Err(TlsError::BadIdentity(format!(
                "it has {} URI SANs; an identity certificate carries exactly one",
                uris.len()
            ))),
            ([], [name]) if is_dns_identity(name) => Ok(Self((*name).to_owned())),
            // A DNS SAN can never look like a URI identity (or anything but a host name).
            ([], [_]) => Err(TlsError::BadIdentity(
                "its DNS SAN is not a host name (letters, digits, '-' and '.')".into(),
            )),
            ([], [_, _, ..]) => Err(TlsError::BadIdentity(format!(
                "it has no URI SAN and {} DNS SANs; an identity certificate carries exactly one",
                dns.len()
            ))),
            ([], []) => Err(TlsError::NoIdentity),
        }
    }
}

/// A DNS SAN usable as an identity: a host name of labels of letters, digits and `-`, so it
/// can never contain `:` or `/` and look like a URI identity, nor a wildcard.
fn is_dns_identity(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
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
    /// The certificate's SANs do not name one identity.
    #[error("the client certificate names no usable identity: {0}")]
    BadIdentity(String),
    /// The connection's certificate was refused as an identity (the reason, as text: it is
    /// read once per connection and shared by its requests).
    #[error("{0}")]
    Peer(String),
    /// A PEM file holds no usable item, or rustls refused the material.
    #[error("{path}: {reason}")]
    Material {
        /// The file (or files).
        path: String,
        /// What is wrong.
        reason: String,
    },
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

/// The TLS files of one listener.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    /// The certificate chain the listener presents, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The CA (or CAs) that peers' certificates must chain to, PEM.
    pub ca: PathBuf,
    /// Revocation lists of that CA, PEM; empty: no revocation check.
    pub crls: Vec<PathBuf>,
}

/// A listener's rustls settings, rebuilt when its files change: the accept loop takes
/// [`ServerTls::current`] for each new connection, so a replaced CRL (or certificate) takes
/// effect without a restart while established connections keep the settings they began with.
pub struct ServerTls {
    files: ServerTlsFiles,
    current: RwLock<Loaded>,
}

struct Loaded {
    config: Arc<rustls::ServerConfig>,
    /// SHA-256 over every file's bytes: what [`ServerTls::reload_if_changed`] compares.
    digest: [u8; 32],
}

impl ServerTls {
    /// Loads the files; any problem (unreadable, empty, unparsable, key not matching the
    /// certificate, a CRL not signed by the CA) is an error naming the file.
    pub fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let (config, digest) = build_server(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(Loaded { config, digest }),
        })
    }

    /// The settings for the next connection.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        match self.current.read() {
            Ok(l) => l.config.clone(),
            Err(poisoned) => poisoned.into_inner().config.clone(),
        }
    }

    /// Reads the files again; when their bytes changed, the new settings replace the old
    /// ones. `Ok(true)` when they were replaced. On an error the old settings stay.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let digest = digest_files(&self.files)?;
        let same = match self.current.read() {
            Ok(l) => l.digest == digest,
            Err(poisoned) => poisoned.into_inner().digest == digest,
        };
        if same {
            return Ok(false);
        }
        let (config, digest) = build_server(&self.files)?;
        let mut slot = match self.current.write() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        *slot = Loaded { config, digest };
        Ok(true)
    }

    /// The files these settings come from.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }
}

fn all_files(files: &ServerTlsFiles) -> impl Iterator<Item = &Path> {
    [
        files.cert.as_path(),
        files.key.as_path(),
        files.ca.as_path(),
    ]
    .into_iter()
    .chain(files.crls.iter().map(PathBuf::as_path))
}

fn digest_files(files: &ServerTlsFiles) -> Result<[u8; 32], TlsError> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for path in all_files(files) {
        let bytes = read(path)?;
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(&bytes);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

fn build_server(files: &ServerTlsFiles) -> Result<(Arc<rustls::ServerConfig>, [u8; 32]), TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

    let material = |path: &Path, reason: String| TlsError::Material {
        path: path.display().to_string(),
        reason,
    };
    // Digest first, then parse the same bytes: a file replaced in between is picked up by
    // the next reload, never half-read.
    let digest = digest_files(files)?;
    let pems = |path: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_slice_iter(&read(path)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| material(path, format!("not a PEM certificate file: {e}")))?;
        if certs.is_empty() {
            return Err(material(path, "holds no certificate".into()));
        }
        Ok(certs)
    };
    let chain = pems(&files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|e| material(&files.key, format!("no usable private key: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in pems(&files.ca)? {
        roots
            .add(ca)
            .map_err(|e| material(&files.ca, format!("not a usable CA certificate: {e}")))?;
    }
    let mut crls = Vec::new();
    for path in &files.crls {
        let found = CertificateRevocationListDer::pem_slice_iter(&read(path)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| material(path, format!("not a PEM CRL file: {e}")))?;
        if found.is_empty() {
            return Err(material(path, "holds no CRL".into()));
        }
        crls.extend(found);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    if !crls.is_empty() {
        // The leaf is checked against its issuer's CRL; a leaf whose issuer has no CRL here
        // is refused (rustls' default), so a forgotten CRL fails closed.
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = verifier.build().map_err(|e| TlsError::Material {
        path: all_files(files)
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        reason: format!("cannot build the client verifier: {e}"),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| material(&files.cert, e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| material(&files.key, format!("does not match the certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), digest))
}

/// Whether two CA files share a CA, compared as parsed certificates (subject and public
/// key), not as bytes: `Some(subject)` of the first one found in both.
pub fn shared_ca(a: &Path, b: &Path) -> Result<Option<String>, TlsError> {
    /// Subject (DER), public key (DER), subject (text).
    type CaKey = (Vec<u8>, Vec<u8>, String);
    let keys = |path: &Path| -> Result<Vec<CaKey>, TlsError> {
        let bytes = read(path)?;
        let mut out = Vec::new();
        for pem in x509_parser::pem::Pem::iter_from_buffer(&bytes) {
            let pem = pem.map_err(|e| TlsError::Material {
                path: path.display().to_string(),
                reason: format!("not a PEM file: {e}"),
            })?;
            if pem.label != "CERTIFICATE" {
                continue;
            }
            let cert = pem.parse_x509().map_err(|e| TlsError::Material {
                path: path.display().to_string(),
                reason: format!("a certificate does not parse: {e}"),
            })?;
            out.push((
                cert.subject().as_raw().to_vec(),
                cert.public_key().raw.to_vec(),
                cert.subject().to_string(),
            ));
        }
        Ok(out)
    };
    let left = keys(a)?;
    let right = keys(b)?;
    Ok(left
        .into_iter()
        .find(|(subject, key, _)| right.iter().any(|(s, k, _)| s == subject && k == key))
        .map(|(_, _, name)| name))
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

#[cfg(test)]
mod tests {
    use strongroom_devpki::{DEV_OFFICER, DevCa, write_dev_pki};

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

    #[test]
    fn the_dev_pki_officer_certificates_pass_the_identity_rules() {
        let dir = tempfile::tempdir().unwrap();
        write_dev_pki(dir.path(), &[]).unwrap();
        let pem = std::fs::read_to_string(dir.path().join("officer.pem")).unwrap();
        let id = Identity::from_certificate(&der(&pem)).unwrap();
        assert_eq!(id.as_str(), DEV_OFFICER);
        let (name, path) = strongroom_devpki::issue_officer(dir.path(), "alice").unwrap();
        let pem = std::fs::read_to_string(path).unwrap();
        let id = Identity::from_certificate(&der(&pem)).unwrap();
        assert_eq!(id.as_str(), name);
    }
}
