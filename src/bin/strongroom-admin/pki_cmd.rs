//! `pki`: the officers' own certificate authority, offline: create it once (its key kept
//! with mode 0600), then issue an officer certificate per person by name; client and server
//! certificates from a client or server CA made the same way. For production, the README
//! gives the openssl recipe for a CA whose key lives offline.

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use serde_json::json;

use strongroom_devpki::PkiError;

use crate::{Failure, Format};

#[derive(Subcommand)]
pub(crate) enum PkiCmd {
    /// Create a CA in --dir: `KIND-ca.pem` and its key `KIND-ca-key.pem` (mode 0600).
    /// An existing CA is never replaced.
    InitCa {
        /// Directory of the PKI (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Which CA: admin (officers' certificates), client or server.
        #[arg(long, value_enum, default_value = "admin")]
        kind: CaKind,
        /// The CA's common name (default: "strongroom KIND CA").
        #[arg(long)]
        common_name: Option<String>,
    },
    /// Issue an officer certificate from the admin CA in --dir: NAME (e.g. alice) becomes
    /// the identity `alice.officers.strongroom` (a name with a dot is kept as it is), written
    /// as `alice.pem` and `alice-key.pem` (mode 0600). List the identity in the service's
    /// `[admin] officers`.
    IssueOfficer {
        /// The officer's name: letters, digits and '-', or a full DNS name.
        name: String,
        /// Directory of the PKI holding `admin-ca.pem` and `admin-ca-key.pem`.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a client certificate from the client CA in --dir (`client-ca.pem`), for an
    /// identity (a `spiffe://` URI or a DNS name), written as `<STEM>.pem` and `<STEM>-key.pem`.
    IssueClient {
        /// File stem of the new certificate and key.
        stem: String,
        /// The client's identity, e.g. spiffe://bank/payments.
        identity: String,
        /// Directory of the PKI holding `client-ca.pem` and `client-ca-key.pem`.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a server certificate from the server CA in --dir (`server-ca.pem`) for the DNS
    /// names and IP addresses given, written as `<STEM>.pem` and `<STEM>-key.pem`.
    IssueServer {
        /// File stem of the new certificate and key.
        stem: String,
        /// DNS names and IP addresses the certificate is valid for.
        #[arg(required = true)]
        names: Vec<String>,
        /// Directory of the PKI holding `server-ca.pem` and `server-ca-key.pem`.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum CaKind {
    Admin,
    Client,
    Server,
}

impl CaKind {
    fn stem(self) -> &'static str {
        match self {
            CaKind::Admin => "admin-ca",
            CaKind::Client => "client-ca",
            CaKind::Server => "server-ca",
        }
    }

    fn word(self) -> &'static str {
        match self {
            CaKind::Admin => "admin",
            CaKind::Client => "client",
            CaKind::Server => "server",
        }
    }
}

pub(crate) fn run(format: Format, cmd: &PkiCmd) -> Result<(), Failure> {
    match cmd {
        PkiCmd::InitCa {
            dir,
            kind,
            common_name,
        } => {
            let cn = common_name
                .clone()
                .unwrap_or_else(|| format!("strongroom {} CA", kind.word()));
            let cert = strongroom_devpki::init_ca(dir, kind.stem(), &cn).map_err(failure)?;
            let key = dir.join(format!("{}-key.pem", kind.stem()));
            if format == Format::Json {
                println!(
                    "{}",
                    json!({"ca": cert, "key": key, "common_name": cn, "kind": kind.word()})
                );
            } else {
                println!("created the {} CA '{cn}': {}", kind.word(), cert.display());
                println!(
                    "its private key: {} (mode 0600; keep it offline, it signs every {} certificate)",
                    key.display(),
                    kind.word()
                );
                if let CaKind::Admin = kind {
                    println!(
                        "next: set [admin] ca = \"{}\" in strongroomd's configuration, then issue officers: strongroom-admin pki issue-officer NAME --dir {}",
                        cert.display(),
                        dir.display()
                    );
                }
            }
            Ok(())
        }
        PkiCmd::IssueOfficer { name, dir } => {
            let (identity, cert) = strongroom_devpki::issue_officer(dir, name).map_err(failure)?;
            let key = key_of(&cert);
            if format == Format::Json {
                println!(
                    "{}",
                    json!({"identity": identity, "cert": cert, "key": key})
                );
            } else {
                println!("issued officer '{identity}': {}", cert.display());
                println!("its private key: {} (mode 0600)", key.display());
                println!(
                    "next: add \"{identity}\" to [admin] officers in strongroomd's configuration and restart it; the officer uses --admin-cert {} --admin-key {}",
                    cert.display(),
                    key.display()
                );
            }
            Ok(())
        }
        PkiCmd::IssueClient {
            stem,
            identity,
            dir,
        } => {
            let cert = strongroom_devpki::issue_from(dir, "client-ca", stem, false, &[identity])
                .map_err(failure)?;
            print_issued(format, identity, &cert);
            Ok(())
        }
        PkiCmd::IssueServer { stem, names, dir } => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let cert = strongroom_devpki::issue_from(dir, "server-ca", stem, true, &names)
                .map_err(failure)?;
            print_issued(format, &names.join(","), &cert);
            Ok(())
        }
    }
}

fn key_of(cert: &std::path::Path) -> PathBuf {
    let stem = cert
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    cert.with_file_name(format!("{stem}-key.pem"))
}

fn print_issued(format: Format, names: &str, cert: &std::path::Path) {
    let key = key_of(cert);
    if format == Format::Json {
        println!("{}", json!({"names": names, "cert": cert, "key": key}));
    } else {
        println!("issued '{names}': {}", cert.display());
        println!("its private key: {} (mode 0600)", key.display());
    }
}

fn failure(e: PkiError) -> Failure {
    let hint = match &e {
        PkiError::Io { path, source }
            if source.kind() == std::io::ErrorKind::NotFound
                && path.to_string_lossy().ends_with("-ca-key.pem") =>
        {
            "; this CA's key was not kept: a PKI from an older dev-pki has none (make a new one with `strongroom-admin pki init-ca`)"
        }
        PkiError::Io { path, source }
            if source.kind() == std::io::ErrorKind::NotFound
                && path.to_string_lossy().ends_with("-ca.pem") =>
        {
            "; create the CA first: strongroom-admin pki init-ca --kind KIND --dir DIR"
        }
        _ => "",
    };
    Failure::Local(format!("{e}{hint}"))
}
