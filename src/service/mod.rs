//! The gRPC servers: SecretService for clients and AdminService for officers, each on its
//! own listener with its own CA, plus health and reflection.
//!
//! [`Server::start`] opens the token, the store and the audit log and loads the policies
//! (configuration errors surface here); [`Server::run`] serves on listeners the caller
//! binds until `shutdown` completes, so tests bind `127.0.0.1:0`.

mod admin;
pub mod approvals;
mod expiry;
mod jobs;
mod page_token;
mod policies;
pub mod rewrap;
mod rollback;
mod seal;
mod secrets;
mod watch;

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cryptoki::types::AuthPin;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use admin::AdminApi;
pub use secrets::SecretsService;
pub use watch::{MAX_WATCH_FILTERS, WatchStream};

use crate::audit::{AuditLog, AuditOptions, Auditor};
use crate::config::{AdminConfig, Config, FrontLimits};
use crate::front::{self, Listener};
use crate::hsm::keys::MacKey;
use crate::hsm::{self, Hsm, HsmError, HsmOptions};
use crate::policy::Policy;
use crate::proto::admin_service_server::AdminServiceServer;
use crate::proto::secret_service_server::SecretServiceServer;
use crate::store::{Store, StoreError};

/// The smallest cap on a decoded request message.
pub const TRANSPORT_MESSAGE_CAP: usize = 4 * 1024 * 1024;

/// The name health reports under for the secret service.
pub const SECRET_SERVICE_NAME: &str = "strongroom.v1.SecretService";
/// The name health reports under for the admin service.
pub const ADMIN_SERVICE_NAME: &str = "strongroom.v1.AdminService";
/// Reported SERVING in health while `admin.dangerous_single_officer` is on.
pub const DANGER_SINGLE_OFFICER: &str = "strongroom.DANGEROUS_SINGLE_OFFICER";

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The token could not be opened.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// No token matches a selector the environment gave (not the file).
    #[error("HSM: {error} (the token was chosen by {origin})")]
    Token {
        /// The token's error.
        #[source]
        error: HsmError,
        /// Where the selector came from.
        origin: String,
    },
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The audit log could not be opened.
    #[error("audit: {0}")]
    Audit(#[from] crate::audit::AuditError),
    /// The stored policies could not be loaded.
    #[error("policies: {0}")]
    Policies(#[from] crate::error::Error),
    /// TLS material could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A listener could not be set up.
    #[error("listener: {0}")]
    Listener(String),
    /// The replica id is live in another process.
    #[error("{0}")]
    Replica(String),
}

/// Everything a request needs, shared by all handlers.
pub(crate) struct State {
    pub(crate) hsm: Arc<Hsm>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) policy: RwLock<Arc<Policy>>,
    /// Stored policies whose MAC did not verify: refused (their rules grant nothing).
    pub(crate) tampered_policies: RwLock<Vec<String>>,
    pub(crate) limits: crate::config::Limits,
    pub(crate) audit: Auditor,
    pub(crate) hsm_timeout: Duration,
    pub(crate) max_wraps: u64,
    /// How puts that name no protection are sealed (`store.protection`).
    pub(crate) default_protection: crate::secret::Protection,
    pub(crate) health: HealthReporter,
    /// Serialises health updates: each one reads the state and publishes it as one step, so
    /// an older reading never overwrites a newer one.
    pub(crate) health_update: tokio::sync::Mutex<()>,
    pub(crate) write_stripes: WriteStripes,
    pub(crate) admin: Option<AdminConfig>,
    pub(crate) token_label: String,
    pub(crate) listeners: RwLock<Vec<String>>,
    /// Serialises officers' state changes (approvals, policies).
    pub(crate) admin_lock: tokio::sync::Mutex<()>,
    /// Set when the store failed its rollback check: no secret is served.
    pub(crate) rollback: RwLock<Option<String>>,
    /// How often the store's records are checked against its commitment (zero: at start only).
    pub(crate) store_verify: Duration,
    /// Open WatchSecrets streams, against their caps.
    pub(crate) watches: Arc<watch::Slots>,
    /// This replica's id (`server.replica_id`; empty: a single node).
    pub(crate) replica_id: String,
    /// How this process names itself as a lock's holder (see [`jobs::holder`]).
    pub(crate) holder: String,
    /// The leases and intervals of once-only jobs.
    pub(crate) jobs: JobTimes,
    /// Changes to the store are preceded by a durable intent entry (off only with the
    /// benchmark-only `audit.dangerous_no_write_ahead`).
    pub(crate) write_ahead: bool,
}

/// `[jobs]` as durations.
pub(crate) struct JobTimes {
    /// A lock's lease time to live.
    pub(crate) ttl: Duration,
    /// How often a holder renews.
    pub(crate) renew: Duration,
    /// Between state reports (zero: none).
    pub(crate) report: Duration,
    /// Between expiry-notice sweeps (zero: none).
    pub(crate) expiry_notice: Duration,
    /// The expiry-notice window, in seconds.
    pub(crate) expiry_window: u64,
}

impl State {
    /// The label of this replica's store checkpoint in the token.
    pub(crate) fn store_checkpoint_label(&self) -> String {
        hsm::keys::replica_label(hsm::keys::STORE_CHECKPOINT_LABEL, &self.replica_id)
    }

    /// The policy in force.
    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .map(|p| p.clone())
            .unwrap_or_else(|_| Arc::new(Policy::default()))
    }
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
    /// The replica id's lock in force, held from start to stop, and the task that renews
    /// it (which completes if another process took the id).
    replica_lock: Option<(Arc<std::sync::Mutex<crate::store::Lock>>, AbortOnDrop)>,
    tls: Arc<crate::tls::ServerTls>,
    admin_tls: Option<Arc<crate::tls::ServerTls>>,
    limits: FrontLimits,
    admin_limits: Option<FrontLimits>,
    tls_reload: Duration,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    shutdown_grace: Duration,
}

impl Server {
    /// Opens the token (logging in with `pin`), the store and the audit log, and loads TLS
    /// material and the policies.
    pub async fn start(config: &Config, pin: AuthPin) -> Result<Self, StartError> {
        // A sled store this start creates is removed again if the start fails, so a failed
        // start leaves no empty store behind to puzzle the next one.
        let created = config.store.backend == crate::config::StoreBackend::Sled
            && !config.store.path.as_os_str().is_empty()
            && !config.store.path.exists();
        let started = Self::start_inner(config, pin).await;
        if started.is_err() && created && config.store.path.exists() {
            match std::fs::remove_dir_all(&config.store.path) {
                Ok(()) => {
                    tracing::info!(path = %config.store.path.display(), "removed the store this failed start created")
                }
                Err(e) => {
                    tracing::warn!(path = %config.store.path.display(), error = %e, "cannot remove the store this failed start created")
                }
            }
        }
        started
    }

    async fn start_inner(config: &Config, pin: AuthPin) -> Result<Self, StartError> {
        let tls = Arc::new(crate::tls::ServerTls::load(crate::tls::ServerTlsFiles {
            cert: config.server.cert.clone(),
            key: config.server.key.clone(),
            ca: config.server.client_ca.clone(),
            crls: config.server.client_crls.clone(),
        })?);
        let admin_tls = match &config.admin {
            Some(a) => Some(Arc::new(crate::tls::ServerTls::load(
                crate::tls::ServerTlsFiles {
                    cert: a.cert.clone(),
                    key: a.key.clone(),
                    ca: a.ca.clone(),
                    crls: a.crls.clone(),
                },
            )?)),
            None => None,
        };
        let (limits, admin_limits) = connection_caps(config);
        // Each request message's decode limit follows these (src/codec.rs).
        crate::codec::set_limits(&config.limits);
        let seed = Policy::from_rules(&config.policy, config.limits.max_name_bytes)
            .map_err(|e| crate::config::ConfigError::Invalid(e.to_string()))?;
        let pkcs11 = hsm::load_module(&config.hsm.module)?;
        let options = HsmOptions {
            workers: config.hsm.workers,
            queue_depth: config.hsm.queue_depth,
            key_copy: config.hsm.key_copy,
        };
        let hsm = Arc::new(
            Hsm::open(pkcs11, &config.token_selector()?, pin, &options).map_err(|e| {
                match (&e, config.origin("hsm.token")) {
                    (HsmError::TokenNotFound(_), Some(origin)) => StartError::Token {
                        error: e,
                        origin: origin.to_string(),
                    },
                    _ => StartError::Hsm(e),
                }
            })?,
        );
        let hsm_timeout = Duration::from_millis(config.hsm.request_timeout_ms);
        // The store commits its records under a key only the token can give (rollback.rs).
        let state_key = rollback::state_key(&hsm, hsm_timeout).await?;
        let store = crate::store::open(&config.store, config.limits.max_value_bytes, state_key)?;
        // A store a migration is still copying into (or stopped half way) is not this one.
        crate::store::migrate::refuse_half_migrated(store.as_ref())?;
        let replica_id = config.server.replica_id.clone();
        let holder = jobs::holder(&replica_id);
        let jobs_times = JobTimes {
            ttl: Duration::from_secs(config.jobs.lease_ttl_secs),
            renew: Duration::from_millis(config.jobs.renew_interval_ms),
            report: Duration::from_secs(config.jobs.state_report_interval_secs),
            expiry_notice: Duration::from_secs(config.jobs.expiry_notice_interval_secs),
            expiry_window: config.jobs.expiry_notice_window_secs,
        };
        // Before any token object of the replica is read or written: one live process per id.
        let replica_lock = if replica_id.is_empty() {
            None
        } else {
            let lock = jobs::register_replica(&store, &replica_id, &holder, jobs_times.ttl)
                .await
                .map_err(|e| StartError::Replica(e.to_string()))?;
            // Renewed from now on: the rest of the start (a scan of a large store) may
            // outlast the lease.
            let current = Arc::new(std::sync::Mutex::new(lock));
            let keeper = AbortOnDrop(tokio::spawn(jobs::keep_replica(
                store.clone(),
                replica_id.clone(),
                holder.clone(),
                (jobs_times.ttl, jobs_times.renew),
                current.clone(),
            )));
            Some((current, keeper))
        };
        let audit = if config.audit.dangerous_disable_audit {
            tracing::warn!(
                "DANGEROUS: audit.dangerous_disable_audit is on: no durable audit trail"
            );
            Auditor::DangerousLogOnly
        } else {
            if !hsm.has_mac_key(MacKey::Audit) {
                return Err(HsmError::MacKeyMissing(MacKey::Audit.label()).into());
            }
            Auditor::Chained(
                AuditLog::open(
                    hsm.clone(),
                    AuditOptions {
                        path: config.audit.path.clone(),
                        max_batch: config.audit.max_batch,
                        max_batch_bytes: config.audit.max_batch_bytes,
                        commit_window: Duration::from_micros(config.audit.commit_window_us),
                        checkpoint_every: config.audit.checkpoint_every,
                        checkpoint_interval: Duration::from_secs(
                            config.audit.checkpoint_interval_secs.max(1),
                        ),
                        hsm_timeout,
                        checkpoint_label: hsm::keys::replica_label(
                            hsm::keys::CHECKPOINT_LABEL,
                            &replica_id,
                        ),
                        rotate_bytes: config.audit.rotate_bytes,
                        rotate_age: Duration::from_secs(config.audit.rotate_age_secs),
                    },
                )
                .await?,
            )
        };
        if let Some(a) = &config.admin
            && a.dangerous_single_officer
        {
            tracing::warn!(
                "DANGEROUS: admin.dangerous_single_officer is on: guarded operations run on one officer's word"
            );
        }
        let (health, _) = tonic_health::server::health_reporter();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        let state = Arc::new(State {
            hsm,
            store,
            policy: RwLock::new(Arc::new(Policy::default())),
            tampered_policies: RwLock::new(Vec::new()),
            limits: config.limits,
            audit,
            hsm_timeout,
            max_wraps: config.hsm.max_wraps_per_key,
            default_protection: config.store.protection,
            health,
            health_update: tokio::sync::Mutex::new(()),
            write_stripes: WriteStripes::new(256),
            admin: config.admin.clone(),
            token_label: config.hsm.token.clone(),
            listeners: RwLock::new(Vec::new()),
            admin_lock: tokio::sync::Mutex::new(()),
            rollback: RwLock::new(None),
            store_verify: Duration::from_secs(config.store.verify_interval_secs),
            watches: watch::Slots::new(&config.limits),
            replica_id,
            holder,
            jobs: jobs_times,
            write_ahead: !config.audit.dangerous_no_write_ahead,
        });
        rollback::check(&state).await?;
        policies::seed(&state, &config.policy, seed.is_empty()).await?;
        policies::reload(&state).await?;
        // Intents a crash left without an outcome: settled before anything is served.
        if config.audit.dangerous_no_write_ahead {
            tracing::warn!(
                "DANGEROUS: audit.dangerous_no_write_ahead is on: a crash can leave a change no audit entry records"
            );
        }
        let settled = crate::audit::reconcile::settle_at_start(
            &state.audit,
            state.store.clone(),
            state.hsm.master_key_versions(),
        )
        .await?;
        if settled > 0 {
            tracing::warn!(
                intents = settled,
                "reconciled intents that a crash left without an outcome (see the audit log's Reconcile entries)"
            );
        }
        let hsm = Arc::downgrade(&state.hsm);
        crate::metrics::on_scrape(move || {
            if let Some(hsm) = hsm.upgrade() {
                crate::metrics::hsm_state(hsm.queued(), hsm.state() == hsm::HsmState::Ready);
            }
        });
        Ok(Self {
            state,
            replica_lock,
            tls,
            admin_tls,
            limits,
            admin_limits,
            tls_reload: Duration::from_millis(config.server.tls_reload_ms),
            health_service,
            shutdown_grace: Duration::from_millis(config.server.shutdown_grace_ms),
        })
    }

    /// Serves clients on `listener` and officers on `admin_listener` until `shutdown`
    /// completes; in-flight requests are drained.
    pub async fn run(
        self,
        listener: TcpListener,
        admin_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let state = self.state;
        let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        if let Ok(mut l) = state.listeners.write() {
            l.push(format!("client {}", local(&listener)));
            if let Some(a) = &admin_listener {
                l.push(format!("admin {}", local(a)));
            }
        }
        update_health(&state).await;
        let sampler = tokio::spawn(metrics_sampler(state.clone()));
        let watcher = tokio::spawn(health_watch(state.clone()));
        let epochs = tokio::spawn(rollback::watch(state.clone()));
        // The approval purge (expired and retained approvals), every
        // admin.approval_purge_interval_secs; nothing to do without an admin plane.
        let purge = tokio::spawn(approvals::purge_task(state.clone()));
        let reports = tokio::spawn(jobs::state_reports(state.clone()));
        let notices = tokio::spawn(expiry::notices(state.clone()));
        // A re-wrap recorded as running resumes here (rewrap.rs).
        let rewraps = tokio::spawn(rewrap::supervise(state.clone()));
        // Losing the replica id to another process stops this one (see jobs::keep_replica).
        let (replica_lock, keeper) = match self.replica_lock {
            Some((lock, keeper)) => (Some(lock), Some(keeper)),
            None => (None, None),
        };
        let shutdown = async move {
            match keeper {
                Some(mut keeper) => {
                    tokio::select! {
                        () = shutdown => {}
                        _ = &mut keeper.0 => {}
                    }
                }
                None => shutdown.await,
            }
        };

        // The outer cap: beyond it tonic refuses a message (OUT_OF_RANGE) from its frame
        // header, without reading it into memory. Below it, each request type has its own
        // decode limit (src/codec.rs: a few KiB, PutSecret's from max_value_bytes), checked
        // before the message is decoded.
        let max_message = (state.limits.max_value_bytes + 64 * 1024).max(TRANSPORT_MESSAGE_CAP);
        let secrets = SecretServiceServer::new(SecretsService::new(state.clone()))
            .max_decoding_message_size(max_message);
        // Each listener reflects only the services it serves.
        let client_routes = tonic::service::Routes::new(secrets)
            .add_service(self.health_service.clone())
            .add_service(reflection_v1(&[SECRET_SERVICE_NAME, HEALTH_SERVICE_NAME])?)
            .add_service(reflection_v1alpha(&[
                SECRET_SERVICE_NAME,
                HEALTH_SERVICE_NAME,
            ])?);

        // One shutdown signal for both listeners.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });

        let mut reloads = vec![("client", self.tls.clone())];
        let admin_task = match (admin_listener, self.admin_tls, self.admin_limits) {
            (Some(socket), Some(tls), Some(limits)) => {
                reloads.push(("admin", tls.clone()));
                let routes = tonic::service::Routes::new(AdminServiceServer::new(AdminApi::new(
                    state.clone(),
                )))
                .add_service(self.health_service)
                .add_service(reflection_v1(&[ADMIN_SERVICE_NAME, HEALTH_SERVICE_NAME])?)
                .add_service(reflection_v1alpha(&[
                    ADMIN_SERVICE_NAME,
                    HEALTH_SERVICE_NAME,
                ])?);
                let listener = Listener {
                    plane: "admin",
                    socket,
                    tls,
                    limits,
                };
                Some(tokio::spawn(front::serve(
                    listener,
                    routes,
                    stop_rx.clone(),
                )))
            }
            _ => None,
        };
        let reloader = tokio::spawn(front::reload_tls(reloads, self.tls_reload));
        let serve = front::serve(
            Listener {
                plane: "client",
                socket: listener,
                tls: self.tls,
                limits: self.limits,
            },
            client_routes,
            stop_rx.clone(),
        );
        // In-flight requests get the grace period to finish; idle connections that clients
        // keep open do not hold the shutdown beyond it.
        let grace = self.shutdown_grace;
        let both = async {
            let admin = async {
                if let Some(task) = admin_task
                    && let Err(e) = task.await
                {
                    tracing::error!(error = %e, "admin listener task failed");
                }
            };
            tokio::join!(serve, admin);
        };
        tokio::select! {
            () = both => {}
            () = async move {
                front::stopped(stop_rx).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::info!("shutdown grace period over; closing the remaining connections");
            }
        }
        reloader.abort();
        sampler.abort();
        watcher.abort();
        epochs.abort();
        purge.abort();
        reports.abort();
        notices.abort();
        rewraps.abort();
        if let Err(e) = rollback::record(&state).await {
            tracing::error!(error = %e, "cannot record the final store epoch in the token");
        }
        if let Some(lock) = replica_lock.and_then(|l| l.lock().ok().map(|l| l.clone())) {
            // Let the id go at once, so a successor need not wait for the lease to lapse.
            if let Err(e) = blocking(&state, move |s| s.unlock(&lock)).await {
                tracing::warn!(error = %e, "cannot give the replica id up; its lease will lapse");
            }
        }
        // A final checkpoint, so the token records the whole log as it stands at shutdown.
        if let Auditor::Chained(log) = &state.audit
            && let Err(e) = log.checkpoint().await
        {
            tracing::error!(error = %e, "final audit checkpoint failed");
        }
        Ok(())
    }
}

/// Rotates the audit log (an approved `RotateAuditLog`): the outcome in words.
pub(crate) async fn rotate_audit_log(
    state: &State,
    reason: &str,
) -> Result<String, crate::error::Error> {
    use crate::error::Error;
    match &state.audit {
        Auditor::Chained(log) => log
            .rotate(reason)
            .await
            .map(|r| {
                format!(
                    "audit log {} ({} entries) archived as {}; log {} started",
                    r.previous.log_id,
                    r.previous.count,
                    r.archived.display(),
                    r.log_id
                )
            })
            .map_err(|e| Error::Audit(e.to_string())),
        Auditor::DangerousLogOnly => Err(Error::FailedPrecondition(
            "there is no audit log to rotate (audit.dangerous_disable_audit is on)".into(),
        )),
    }
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The name health and reflection use for the health service.
const HEALTH_SERVICE_NAME: &str = "grpc.health.v1.Health";

fn reflection_builder(services: &[&str]) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for name in services {
        builder = builder.with_service_name(*name);
    }
    builder
}

fn reflection_v1(
    services: &[&str],
) -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    StartError,
> {
    reflection_builder(services)
        .build_v1()
        .map_err(|e| StartError::Listener(format!("reflection: {e}")))
}

fn reflection_v1alpha(
    services: &[&str],
) -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    StartError,
> {
    reflection_builder(services)
        .build_v1alpha()
        .map_err(|e| StartError::Listener(format!("reflection: {e}")))
}

/// The listeners' connection caps from the configuration, fitted under the descriptor limit
/// (raised to its hard limit first); both figures are logged.
fn connection_caps(config: &Config) -> (FrontLimits, Option<FrontLimits>) {
    let client = config.server.connections.resolve(FrontLimits::client());
    let admin = config
        .admin
        .as_ref()
        .map(|a| a.connections.resolve(FrontLimits::admin()));
    let limit = front::descriptors::raise_limit();
    let (client, admin, lowered) = front::descriptors::fit(limit.soft, client, admin);
    tracing::info!(
        nofile = limit.soft,
        hard = limit.hard,
        raised = limit.raised,
        client_max_connections = client.max_connections,
        admin_max_connections = admin.map(|a| a.max_connections),
        "descriptor limit"
    );
    if lowered {
        tracing::warn!(
            nofile = limit.soft,
            client_max_connections = client.max_connections,
            admin_max_connections = admin.map(|a| a.max_connections),
            "connection caps lowered to fit the descriptor limit; raise LimitNOFILE to serve more"
        );
    }
    (client, admin)
}

/// Re-checks the token every few seconds while something is missing, so health turns
/// SERVING once an officer generates a master key or the audit log recovers.
async fn health_watch(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if state.hsm.state() == crate::hsm::HsmState::Ready
            && state.hsm.current_master_key().is_none()
            && let Err(e) = state.hsm.reload_keys().await
        {
            tracing::warn!(error = %e, "cannot look for master keys");
        }
        update_health(&state).await;
    }
}

/// Reports SERVING when the token holds a master key, the audit log is writable and the
/// store's backend answers (etcd).
pub(crate) async fn update_health(state: &State) {
    let _one_at_a_time = state.health_update.lock().await;
    let serving = state.hsm.state() == crate::hsm::HsmState::Ready
        && state.hsm.current_master_key().is_some()
        && state.audit.healthy()
        && state.store.available()
        && rollback::ensure_trusted(state).is_ok();
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    state
        .health
        .set_service_status(SECRET_SERVICE_NAME, status)
        .await;
    state.health.set_service_status("", status).await;
    if let Some(admin) = &state.admin {
        state
            .health
            .set_service_status(ADMIN_SERVICE_NAME, status)
            .await;
        if admin.dangerous_single_officer {
            state
                .health
                .set_service_status(DANGER_SINGLE_OFFICER, ServingStatus::Serving)
                .await;
        }
    }
}

/// Runs a store call off the async runtime.
/// How often the store's size is sampled for the metrics.
const STORE_SIZE_EVERY: Duration = Duration::from_secs(30);

/// Feeds the metrics with the store's size every [`STORE_SIZE_EVERY`] (sled walks its files,
/// etcd answers a status call: not per scrape). The HSM pool's queue and state are read at
/// each scrape (see [`Server::start`]).
async fn metrics_sampler(state: Arc<State>) {
    let mut tick = tokio::time::interval(STORE_SIZE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match blocking(&state, |s| s.size_on_disk()).await {
            Ok(bytes) => crate::metrics::store_size(bytes),
            Err(e) => tracing::debug!(error = %e, "cannot read the store's size for the metrics"),
        }
    }
}

pub(crate) async fn blocking<R: Send + 'static>(
    state: &State,
    f: impl FnOnce(&dyn Store) -> Result<R, StoreError> + Send + 'static,
) -> Result<R, crate::error::Error> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .map_err(|e| {
            if e.is_panic() {
                store_panic()
            } else {
                crate::error::Error::Internal(format!("store task failed: {e}"))
            }
        })?
        .map_err(crate::error::Error::from)
}

/// Runs a short store read on the calling thread: a lookup in sled's in-memory tree (a page
/// cache read on a miss) costs less than the two thread hand-offs of [`blocking`], about
/// 12 µs per request here (BENCHMARKS.md). Only for point reads (GetSecret); scans, writes and
/// flushes go through [`blocking`].
pub(crate) fn read_inline<R>(
    state: &State,
    f: impl FnOnce(&dyn Store) -> Result<R, StoreError>,
) -> Result<R, crate::error::Error> {
    let store = state.store.as_ref();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(store)))
        .map_err(|_| store_panic())?
        .map_err(crate::error::Error::from)
}

/// sled 0.34 panics on some damaged pages instead of returning an error; the panic is
/// contained and the read answers DATA_LOSS.
fn store_panic() -> crate::error::Error {
    crate::error::Error::DataLoss(
        "the store engine failed reading this data: its files may be damaged".into(),
    )
}

/// Calls with a deadline shorter than this are refused before anything is done.
pub(crate) const MIN_DEADLINE: Duration = Duration::from_millis(1);

/// The caller's deadline (`grpc-timeout`), if it sent one.
pub(crate) fn call_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    secrets::grpc_timeout(metadata)
}

/// Runs a handler in its own task, so that a caller going away (or the transport cancelling
/// at the deadline) never cuts a request between its effect and its audit entry, and
/// answers DEADLINE_EXCEEDED a little before the caller's deadline. A request answered so
/// may still complete; it is audited either way.
pub(crate) async fn complete<T: Send + 'static>(
    deadline: Option<Duration>,
    work: impl Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
) -> Result<tonic::Response<T>, tonic::Status> {
    // In the request's span (its request id), like the rest of the request.
    let task = tokio::spawn(tracing::Instrument::in_current_span(work));
    let wait = async {
        task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "a request handler failed");
            Err(tonic::Status::internal("internal error"))
        })
    };
    match deadline {
        Some(d) => tokio::time::timeout(d * 9 / 10, wait)
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(
                    "the deadline passed before the answer; the request is audited either way",
                ))
            }),
        None => wait.await,
    }
}

/// The caller's identity, read once per connection by the front door from the leaf of the
/// certificate chain rustls verified.
pub(crate) fn peer_identity<T>(
    request: &tonic::Request<T>,
) -> Result<crate::tls::Identity, crate::tls::TlsError> {
    match request.extensions().get::<front::Peer>() {
        Some(peer) => match peer.identity.as_ref() {
            Ok(id) => Ok(id.clone()),
            Err(why) => Err(crate::tls::TlsError::Peer(why.clone())),
        },
        None => Err(crate::tls::TlsError::NoIdentity),
    }
}
