//! strongroom: a hardware-backed secret service.
//!
//! Master keys are born in a PKCS#11 token and never leave it. Each secret version is
//! encrypted under its own data key; the token wraps that key; the store keeps only the
//! wrapped key and the ciphertext. Clients reach the service over mutual TLS and are
//! authorised by policy, deny by default.
//!
//! # Layout
//!
//! The modules follow the path of a request:
//!
//! - [`front`]: the front door: the accept loop, per-listener caps (connections in total and
//!   per source, handshakes in progress), the TLS handshake deadline, HTTP/2 limits, the idle
//!   timeout, and the descriptor budget; every request gets its connection's [`front::Peer`].
//! - [`tls`]: TLS settings (reloaded when their files change, CRLs included) and the caller's
//!   [`tls::Identity`] from its verified certificate (one URI SAN, or one host-name DNS SAN).
//! - [`secret`]: [`secret::SecretName`] (parsed), [`secret::SecretValue`] (zeroizing, no
//!   `Debug`), the sealed record.
//! - [`policy`]: pure authorisation decisions.
//! - [`store`]: the [`store::Store`] trait, its sled and etcd backends, the change feed
//!   watchers read ([`store::ChangeFeed`]: sled's change log, etcd's watch API), locks under a
//!   lease with a fencing token (shared by replicas on etcd), and [`store::migrate`].
//! - [`hsm`]: the PKCS#11 token, master keys, the worker pool, fault classes, and strict mode
//!   (`hsm-only` records: data keys born, used and destroyed in the token).
//! - [`envelope`]: sealing and opening values under data keys, with AAD.
//! - [`audit`]: the HMAC-chained, group-committed audit log every decision passes through,
//!   and its verifier, and the reconciliation of write-ahead intents (every change to the store
//!   is announced by an intent entry, durable before the commit, and followed by its
//!   outcome).
//! - [`service`]: the tonic services — SecretService for clients (WatchSecrets streams with
//!   per-event policy and caps in `service/watch.rs`; records sealed and opened in one place,
//!   `service/seal.rs`; what expires soon, `service/expiry.rs`), AdminService for officers (policies in
//!   the store, dual control, rollback acceptance, rollback checks against every replica's
//!   checkpoint, once-only jobs under a fenced lock); [`error`]: one error enum and
//!   its gRPC mapping; [`codec`]: the protobuf codec (malformed input is INVALID_ARGUMENT).
//! - [`config`]: typed configuration; [`files`]: private files (PIN file, keys) closed to
//!   group and others.
//! - [`metrics`]: the Prometheus registry, fed by one-line hooks in the front door, the HSM
//!   pool, the audit writer and the jobs, served on its own listener; the request id the
//!   front door gives each request (its log span, its audit entry). [`systemd`]:
//!   `Type=notify` readiness and stopping, and the non-dumpable process.
//! - [`explain`]: TLS and connection failures in words, for the command-line tools;
//!   [`when`]: RFC 3339 times and durations (`90d`) as the tools take and show them.
//! - [`clidoc`]: shell completions and man pages of the command-line tools.
//! - [`client`]: a typed SecretService client over several endpoints that fails over
//!   (idempotent calls on `UNAVAILABLE` and broken connections; writes only when not sent;
//!   watches resume on the next endpoint from the last revision seen).
//!
//! # The path of one GetSecret
//!
//! front door (admitted under the listener's caps; TLS within the handshake deadline; the
//! client certificate chains to the client CA and is not revoked) → identity (read once per
//! connection: one URI SAN, or one DNS SAN) → parse the
//! name → policy (may this identity read it? if not, NOT_FOUND, as for an absent name) →
//! store (load the sealed record from the slot asked for, or the one the head names) → hsm
//! (unwrap the data key under the record's master key version; AAD = the slot and every
//! field that drives a decision, record format v2, built in `service/seal.rs`) → envelope
//! (decrypt with the same AAD;
//! the data key is zeroized; for an `hsm-only` record the token unwraps the key into a
//! non-extractable session object and decrypts the value itself) → the validity window
//! (not before, expires at; decided on the now authenticated metadata) → audit (the entry is
//! MAC'd in the token and fsynced with its batch; if it cannot be written the request is
//! refused) → response. A write is audited twice: its intent, durable before the store
//! commit, and its outcome after.

#![forbid(unsafe_code)]

pub mod audit;
pub mod clidoc;
pub mod client;
pub mod codec;
pub mod config;
pub mod durable;
pub mod envelope;
pub mod error;
pub mod explain;
pub mod files;
pub mod front;
pub mod hsm;
pub mod metrics;
pub mod policy;
pub mod secret;
pub mod service;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod when;

/// Generated protobuf and gRPC types of `strongroom.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("strongroom.v1");

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("strongroom_descriptor");
}
