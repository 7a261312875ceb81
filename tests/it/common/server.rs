//! A running `strongroomd` of a test: its clients (client plane, admin plane, health), its
//! log, and the officers' acceptance of a flagged store state.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use strongroom::proto::secret_service_client::SecretServiceClient;
use tonic::transport::{Channel, Endpoint};

/// A running `strongroomd`; killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub admin_addr: Option<String>,
    pub log: PathBuf,
    pub(crate) pki: PathBuf,
}

impl Server {
    /// A gRPC client authenticated as `stem` (a certificate of the test PKI).
    pub async fn client(&self, stem: &str) -> SecretServiceClient<Channel> {
        self.try_client(Some(stem)).await.expect("connect")
    }

    /// Officer `stem` approves request `id` on the admin plane: the operation's answer, or
    /// the refusal.
    pub async fn approve(
        &self,
        stem: &str,
        id: impl Into<String>,
    ) -> Result<strongroom::proto::OperationResponse, tonic::Status> {
        let request = strongroom::proto::ApproveRequest { id: id.into() };
        self.admin(stem)
            .await
            .approve(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// SecretService's health as the standard health service reports it (`Serving`,
    /// `NotServing`), asked as payments.
    pub async fn health(&self) -> String {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let channel = self.channel(&self.addr, Some("payments")).await.unwrap();
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "strongroom.v1.SecretService".into(),
            })
            .await
            .unwrap()
            .into_inner();
        format!("{:?}", ServingStatus::try_from(r.status).unwrap())
    }

    /// A client with the given certificate stem, or none; the error if the handshake fails.
    pub async fn try_client(
        &self,
        stem: Option<&str>,
    ) -> Result<SecretServiceClient<Channel>, tonic::transport::Error> {
        let channel = self.channel(&self.addr, stem).await?;
        Ok(SecretServiceClient::new(channel))
    }

    /// An AdminService client authenticated as `stem`.
    pub async fn admin(
        &self,
        stem: &str,
    ) -> strongroom::proto::admin_service_client::AdminServiceClient<Channel> {
        self.try_admin(Some(stem))
            .await
            .expect("connect to the admin listener")
    }

    /// An AdminService client with the given certificate stem, or none.
    pub async fn try_admin(
        &self,
        stem: Option<&str>,
    ) -> Result<
        strongroom::proto::admin_service_client::AdminServiceClient<Channel>,
        tonic::transport::Error,
    > {
        let addr = self
            .admin_addr
            .as_deref()
            .expect("the admin plane is configured");
        let channel = self.channel(addr, stem).await?;
        Ok(strongroom::proto::admin_service_client::AdminServiceClient::new(channel))
    }

    /// A TLS channel to `addr` with the given client certificate stem, or none.
    pub async fn channel(
        &self,
        addr: &str,
        stem: Option<&str>,
    ) -> Result<Channel, tonic::transport::Error> {
        let ca = tonic::transport::Certificate::from_pem(
            std::fs::read(self.pki.join("server-ca.pem")).unwrap(),
        );
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(ca)
            .domain_name("localhost");
        if let Some(stem) = stem {
            let cert = std::fs::read(self.pki.join(format!("{stem}.pem"))).unwrap();
            let key = std::fs::read(self.pki.join(format!("{stem}-key.pem"))).unwrap();
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
    }

    /// The service's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` at least `times` times; panics with the log after
    /// `limit`.
    pub fn wait_for_log(&self, needle: &str, times: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.log_text().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} ×{times} in the log within {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Freezes the process (SIGSTOP): its connections stay open and nothing runs.
    pub fn pause(&self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-STOP", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Thaws a paused process (SIGCONT).
    pub fn resume(&self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-CONT", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Stops the service with SIGTERM and waits for it.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Officers alice and bob accept the store's state under dual control, after checking that
/// its rollback check flagged it for a problem that mentions `problem`.
pub async fn accept_store_state(server: &Server, problem: &str) {
    use strongroom::proto::{AcceptStoreStateRequest, StatusRequest};
    let mut alice = server.admin("alice").await;
    let status = alice.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(
        status.store_rollback.contains(problem),
        "expected the store flagged for {problem:?}: {:?}\n{}",
        status.store_rollback,
        server.log_text()
    );
    let id = alice
        .accept_store_state(AcceptStoreStateRequest {})
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap()
        .id;
    let done = server.approve("bob", id).await.unwrap();
    assert!(done.executed, "{done:?}");
}
