//! The gRPC server: SecretService over mutual TLS, plus health and reflection.
//!
//! [`Server::start`] opens the token and the store (configuration errors surface here, before
//! any port is bound by the caller's listener); [`Server::run`] serves on a listener the
//! caller binds until `shutdown` completes, so tests bind `127.0.0.1:0`.

mod secrets;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cryptoki::types::AuthPin;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::ServerTlsConfig;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use secrets::SecretsService;

use crate::audit::{AuditSink, LogAudit};
use crate::config::Config;
use crate::hsm::{self, Hsm, HsmError, HsmOptions};
use crate::policy::Policy;
use crate::proto::secret_service_server::SecretServiceServer;
use crate::store::{SledStore, Store, StoreError};

/// The smallest cap on a decoded request message.
pub const TRANSPORT_MESSAGE_CAP: usize = 4 * 1024 * 1024;

/// The name health reports under for the secret service.
pub const SECRET_SERVICE_NAME: &str = "strongroom.v1.SecretService";

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The token could not be opened.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// The store could not be opened.
    #[error("store: {0}; is another strongroomd using the same store.path?")]
    Store(#[from] StoreError),
    /// TLS material could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The server failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Everything a request needs, shared by all handlers.
pub(crate) struct State {
    pub(crate) hsm: Hsm,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) policy: Arc<Policy>,
    pub(crate) limits: crate::config::Limits,
    pub(crate) audit: Arc<dyn AuditSink>,
    pub(crate) hsm_timeout: Duration,
    pub(crate) max_wraps: u64,
    pub(crate) health: HealthReporter,
    pub(crate) write_stripes: WriteStripes,
}

/// A fixed set of async locks that serialises writers of the same name.
pub(crate) struct WriteStripes(Vec<tokio::sync::Mutex<()>>);

impl WriteStripes {
    fn new(n: usize) -> Self {
        Self((0..n.max(1)).map(|_| tokio::sync::Mutex::new(())).collect())
    }

    pub(crate) async fn lock(
        &self,
        name: &crate::secret::SecretName,
    ) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(name);
        // The modulo keeps the index below the stripe count, which is at least 1.
        self.0[(hash % self.0.len() as u64) as usize].lock().await
    }
}

/// A started service, ready to serve.
pub struct Server {
    state: Arc<State>,
    tls: ServerTlsConfig,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

impl Server {
    /// Opens the token (logging in with `pin`) and the store, and loads TLS material.
    pub fn start(config: &Config, pin: AuthPin) -> Result<Self, StartError> {
        let tls = crate::tls::server_config(
            &config.server.cert,
            &config.server.key,
            &config.server.client_ca,
        )?;
        let policy = Policy::from_rules(&config.policy, config.limits.max_name_bytes)
            .map_err(|e| crate::config::ConfigError::Invalid(e.to_string()))?;
        let store = SledStore::open(&config.store.path)?;
        let pkcs11 = hsm::load_module(&config.hsm.module)?;
        let options = HsmOptions {
            workers: config.hsm.workers,
            queue_depth: config.hsm.queue_depth,
            key_copy: config.hsm.key_copy,
        };
        let hsm = Hsm::open(pkcs11, &config.token_selector()?, pin, &options)?;
        let (health, _) = tonic_health::server::health_reporter();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        let state = Arc::new(State {
            hsm,
            store: Arc::new(store),
            policy: Arc::new(policy),
            limits: config.limits,
            audit: Arc::new(LogAudit),
            hsm_timeout: Duration::from_millis(config.hsm.request_timeout_ms),
            max_wraps: config.hsm.max_wraps_per_key,
            health,
            write_stripes: WriteStripes::new(256),
        });
        Ok(Self {
            state,
            tls,
            health_service,
        })
    }

    /// Serves on `listener` until `shutdown` completes; in-flight requests are drained.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        let state = self.state;
        secrets::update_health(&state).await;
        let watcher = tokio::spawn(health_watch(state.clone()));

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| crate::config::ConfigError::Invalid(e.to_string()))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| crate::config::ConfigError::Invalid(e.to_string()))?;

        // Room for values well beyond the limit, so that an oversized value reaches the
        // handler and gets an INVALID_ARGUMENT that names the limit; beyond this transport cap
        // tonic refuses the message itself (OUT_OF_RANGE) without reading it into memory.
        let max_message = (state.limits.max_value_bytes + 64 * 1024).max(TRANSPORT_MESSAGE_CAP);
        let secrets = SecretServiceServer::new(SecretsService::new(state.clone()))
            .max_decoding_message_size(max_message);

        let result = tonic::transport::Server::builder()
            .tls_config(self.tls)?
            .add_service(secrets)
            .add_service(self.health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await;
        watcher.abort();
        result.map_err(StartError::from)
    }
}

/// Re-checks the token every few seconds while no master key is present, so health turns
/// SERVING once an officer generates one.
async fn health_watch(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        if state.hsm.current_master_key().is_none() {
            if let Err(e) = state.hsm.reload_keys().await {
                tracing::warn!(error = %e, "cannot look for master keys");
            }
            secrets::update_health(&state).await;
        }
    }
}

pub(crate) async fn set_health(health: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status(SECRET_SERVICE_NAME, status).await;
    health.set_service_status("", status).await;
}
