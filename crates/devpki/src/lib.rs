//! Certificates made with rcgen: the development PKI, the officers' PKI of `strongroom-admin
//! pki`, and the certificates tests and benchmarks need.
//!
//! This crate is the only place that depends on rcgen. `strongroomd` never links it: the
//! service only reads certificates (rustls, x509-parser); making them is the admin tool's
//! job. A CA made here can be written out with its key ([`DevCa::write`], key mode 0600) and
//! loaded again ([`DevCa::load`]) to issue more certificates later.

#![forbid(unsafe_code)]

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

pub use rcgen;

/// Errors making, reading or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or the material.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate given as PEM does not parse.
    #[error("the certificate cannot be parsed: {0}")]
    Certificate(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file that must not be replaced already exists.
    #[error("{0} already exists: remove it first, or choose another --dir")]
    Exists(PathBuf),
    /// A name that cannot be a certificate's identity or a file stem.
    #[error("{0}")]
    BadName(String),
}

/// A certificate authority: its certificate and its signing key.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
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
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// A CA from its certificate and private key (PEM), as [`DevCa::write`] left them.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// The CA `<stem>.pem` and `<stem>-key.pem` in `dir`.
    pub fn load(dir: &Path, stem: &str) -> Result<Self, PkiError> {
        let cert = read(&dir.join(format!("{stem}.pem")))?;
        let key = read(&dir.join(format!("{stem}-key.pem")))?;
        Self::from_pem(&cert, &key)
    }

    /// Writes the CA as `<stem>.pem` and `<stem>-key.pem` (mode 0600) in `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(), PkiError> {
        write_pem(dir, &format!("{stem}.pem"), &self.cert_pem, false)?;
        write_pem(
            dir,
            &format!("{stem}-key.pem"),
            &self.issuer.key().serialize_pem(),
            true,
        )
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// A revocation list of this CA naming the given certificates (PEM) as revoked; `number`
    /// is the CRL number (newer lists carry larger ones).
    pub fn crl_pem(&self, revoked: &[&str], number: u64) -> Result<String, PkiError> {
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for pem in revoked {
            let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
                .map_err(|e| PkiError::Certificate(e.to_string()))?;
            let cert = pem
                .parse_x509()
                .map_err(|e| PkiError::Certificate(e.to_string()))?;
            revoked_certs.push(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(cert.raw_serial()),
                revocation_time: rcgen::date_time_ymd(2025, 1, 1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2025, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    /// A server certificate for the given DNS names and IP addresses.
    pub fn issue_server(&self, names: &[&str]) -> Result<DevCert, PkiError> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, names.first().copied().unwrap_or("server"))
    }

    /// A client certificate whose identity is `identity`: a URI SAN when it contains `://`,
    /// else a DNS SAN.
    pub fn issue_client(&self, identity: &str) -> Result<DevCert, PkiError> {
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
    ) -> Result<DevCert, PkiError> {
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

/// Writes a development PKI into `dir`: separate server, client and admin CAs, each kept
/// with its key (`server-ca-key.pem`, `client-ca-key.pem`, `admin-ca-key.pem`, mode 0600)
/// so that more certificates can be issued later (`strongroom-admin pki issue-officer`); a
/// server certificate for `localhost`/127.0.0.1/::1; one client certificate per identity in
/// `clients` (`<stem>.pem`, `<stem>-key.pem`), and an officer certificate from the admin CA
/// (`officer.pem`). Private keys are written with mode 0600.
pub fn write_dev_pki(dir: &Path, clients: &[(&str, &str)]) -> Result<(), PkiError> {
    create_dir(dir)?;
    let server_ca = DevCa::new("strongroom dev server CA")?;
    let client_ca = DevCa::new("strongroom dev client CA")?;
    let admin_ca = DevCa::new("strongroom dev admin CA")?;
    server_ca.write(dir, "server-ca")?;
    client_ca.write(dir, "client-ca")?;
    admin_ca.write(dir, ADMIN_CA)?;
    let server = server_ca.issue_server(&["localhost", "127.0.0.1", "::1"])?;
    write_pair(dir, "server", &server)?;
    for (stem, identity) in clients {
        write_pair(dir, stem, &client_ca.issue_client(identity)?)?;
    }
    write_pair(dir, "officer", &admin_ca.issue_client(DEV_OFFICER)?)?;
    Ok(())
}

/// The identity of the development PKI's officer certificate: a plain host name, as the
/// admin plane's identity rules require of a DNS SAN.
pub const DEV_OFFICER: &str = "officer.strongroom.dev";

/// The file stem of the admin CA in a PKI directory (`admin-ca.pem`, `admin-ca-key.pem`).
pub const ADMIN_CA: &str = "admin-ca";

/// Creates an admin CA in `dir` (`admin-ca.pem`, and `admin-ca-key.pem` with mode 0600); an
/// existing CA is never replaced.
pub fn init_admin_ca(dir: &Path, common_name: &str) -> Result<PathBuf, PkiError> {
    init_ca(dir, ADMIN_CA, common_name)
}

/// Creates a CA in `dir` as `<stem>.pem` and `<stem>-key.pem` (mode 0600); an existing CA
/// is never replaced.
pub fn init_ca(dir: &Path, stem: &str, common_name: &str) -> Result<PathBuf, PkiError> {
    check_stem(stem)?;
    create_dir(dir)?;
    for file in [format!("{stem}.pem"), format!("{stem}-key.pem")] {
        let path = dir.join(file);
        if path.exists() {
            return Err(PkiError::Exists(path));
        }
    }
    DevCa::new(common_name)?.write(dir, stem)?;
    Ok(dir.join(format!("{stem}.pem")))
}

/// Issues an officer certificate from the admin CA in `dir`: the identity is `name` as a DNS
/// SAN (`alice` becomes `alice.officers.strongroom`; a name with a dot is taken as it is),
/// written as `<stem>.pem` and `<stem>-key.pem` (mode 0600), where the stem is the first
/// label. Returns the identity and the certificate's path.
pub fn issue_officer(dir: &Path, name: &str) -> Result<(String, PathBuf), PkiError> {
    let identity = officer_identity(name)?;
    let stem = identity.split('.').next().unwrap_or(&identity).to_owned();
    let ca = DevCa::load(dir, ADMIN_CA)?;
    let cert = ca.issue_client(&identity)?;
    write_new_pair(dir, &stem, &cert)?;
    Ok((identity, dir.join(format!("{stem}.pem"))))
}

/// Issues a certificate from the CA `<ca_stem>` in `dir` as `<stem>.pem`/`<stem>-key.pem`:
/// a client certificate for `identity`, or with `server`, a server certificate for the names.
pub fn issue_from(
    dir: &Path,
    ca_stem: &str,
    stem: &str,
    server: bool,
    names: &[&str],
) -> Result<PathBuf, PkiError> {
    check_stem(stem)?;
    let ca = DevCa::load(dir, ca_stem)?;
    let cert = if server {
        ca.issue_server(names)?
    } else {
        let identity = names
            .first()
            .ok_or_else(|| PkiError::BadName("a client certificate needs an identity".into()))?;
        ca.issue_client(identity)?
    };
    write_new_pair(dir, stem, &cert)?;
    Ok(dir.join(format!("{stem}.pem")))
}

/// The officer identity for a name: DNS labels of letters, digits and `-`.
fn officer_identity(name: &str) -> Result<String, PkiError> {
    let identity = if name.contains('.') {
        name.to_ascii_lowercase()
    } else {
        format!("{}.officers.strongroom", name.to_ascii_lowercase())
    };
    let ok = identity.len() <= 253
        && identity.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !ok {
        return Err(PkiError::BadName(format!(
            "officer name '{name}': use letters, digits and '-' (e.g. alice), or a full DNS name"
        )));
    }
    Ok(identity)
}

fn check_stem(stem: &str) -> Result<(), PkiError> {
    if stem.is_empty()
        || !stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(PkiError::BadName(format!(
            "file name '{stem}': use letters, digits, '-' and '_'"
        )));
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a pair, refusing to replace an existing certificate or key.
fn write_new_pair(dir: &Path, stem: &str, cert: &DevCert) -> Result<(), PkiError> {
    for file in [format!("{stem}.pem"), format!("{stem}-key.pem")] {
        let path = dir.join(file);
        if path.exists() {
            return Err(PkiError::Exists(path));
        }
    }
    write_pair(dir, stem, cert)
}

fn write_pair(dir: &Path, stem: &str, cert: &DevCert) -> Result<(), PkiError> {
    write_pem(dir, &format!("{stem}.pem"), &cert.cert_pem, false)?;
    write_pem(dir, &format!("{stem}-key.pem"), &cert.key_pem, true)
}

fn write_pem(dir: &Path, file: &str, pem: &str, private: bool) -> Result<(), PkiError> {
    let path = dir.join(file);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let io = |source| PkiError::Io {
        path: path.clone(),
        source,
    };
    let mut f = options.open(&path).map_err(io)?;
    if private {
        // A key file that existed before keeps its mode through open(): set it.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    f.write_all(pem.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_ca_written_and_loaded_again_issues_certificates_it_signed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_admin_ca(dir.path(), "test admin CA").unwrap();
        assert_eq!(mode(&dir.path().join("admin-ca-key.pem")), 0o600);
        let (identity, cert) = issue_officer(dir.path(), "alice").unwrap();
        assert_eq!(identity, "alice.officers.strongroom");
        assert_eq!(mode(&dir.path().join("alice-key.pem")), 0o600);
        // The officer's certificate names the CA as its issuer.
        let ca_pem = std::fs::read(ca).unwrap();
        let cert_pem = std::fs::read(cert).unwrap();
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(&ca_pem).unwrap();
        let (_, cert_pem) = x509_parser::pem::parse_x509_pem(&cert_pem).unwrap();
        let ca = ca_pem.parse_x509().unwrap();
        let cert = cert_pem.parse_x509().unwrap();
        assert_eq!(cert.issuer(), ca.subject());
        cert.verify_signature(Some(ca.public_key())).unwrap();
    }

    #[test]
    fn nothing_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        init_admin_ca(dir.path(), "t").unwrap();
        assert!(matches!(
            init_admin_ca(dir.path(), "t"),
            Err(PkiError::Exists(_))
        ));
        issue_officer(dir.path(), "bob").unwrap();
        assert!(matches!(
            issue_officer(dir.path(), "bob"),
            Err(PkiError::Exists(_))
        ));
    }

    #[test]
    fn officer_names_must_be_dns_labels() {
        assert!(officer_identity("al ice").is_err());
        assert!(officer_identity("../x").is_err());
        assert!(officer_identity("-a").is_err());
        assert_eq!(
            officer_identity("Carol").unwrap(),
            "carol.officers.strongroom"
        );
        assert_eq!(
            officer_identity("ops.bank.example").unwrap(),
            "ops.bank.example"
        );
    }

    #[test]
    fn the_dev_pki_keeps_its_ca_keys_private() {
        let dir = tempfile::tempdir().unwrap();
        write_dev_pki(dir.path(), &[("client", "spiffe://t/demo")]).unwrap();
        for key in ["server-ca-key.pem", "client-ca-key.pem", "admin-ca-key.pem"] {
            assert_eq!(mode(&dir.path().join(key)), 0o600, "{key}");
        }
        let (identity, _) = issue_officer(dir.path(), "bob").unwrap();
        assert_eq!(identity, "bob.officers.strongroom");
    }
}
