//! Child role `floor-server`: a bare tonic server over the same mutual TLS doing one raw
//! C_Decrypt per GetSecret (inline, on a worker thread, none, or plus a durable line).

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use strongroom::envelope;
use strongroom::proto::secret_service_server::{SecretService, SecretServiceServer};
use strongroom::proto::{
    DeleteSecretRequest, DeleteSecretResponse, DescribeSecretRequest, DescribeSecretResponse,
    GetSecretRequest, GetSecretResponse, ListSecretsRequest, ListSecretsResponse, PutSecretRequest,
    PutSecretResponse,
};
use strongroom::secret::SecretName;

use crate::cli::FloorArgs;
use crate::p11::{
    check_dek, find_master_key, find_slot, login, pkcs11_init, raw_decrypt, user_pin,
};
use crate::util::{exit_with_parent, random_bytes, runtime};
use crate::{FLOOR_DURABLE, FLOOR_NOTOKEN, FLOOR_TOKEN, FLOOR_WORKER, Res, fail};

pub(crate) struct FloorJob {
    pub(crate) index: usize,
    pub(crate) reply: tokio::sync::oneshot::Sender<Res<()>>,
}

pub(crate) struct Floor {
    pub(crate) key: ObjectHandle,
    /// Wrapped data keys: (IV, ciphertext || tag).
    pub(crate) wrapped: Arc<Vec<(Vec<u8>, Vec<u8>)>>,
    pub(crate) aad: Arc<Vec<u8>>,
    /// The session used on the runtime's threads (one request at a time holds it).
    pub(crate) inline: Mutex<Session>,
    /// A dedicated thread with its own session, as strongroom's pool has.
    pub(crate) jobs: async_channel::Sender<FloorJob>,
    /// The bare minimum of a durable per-request record: a line handed to a writer thread
    /// that appends everything waiting with one fdatasync, then acknowledges it.
    pub(crate) journal: std::sync::mpsc::Sender<(Vec<u8>, tokio::sync::oneshot::Sender<bool>)>,
    pub(crate) next: AtomicUsize,
    pub(crate) payload: Vec<u8>,
}

impl Floor {
    /// One C_Decrypt of data key `index` on the runtime's thread (a mutex-held session).
    pub(crate) fn decrypt_inline(&self, index: usize) -> Result<(), Status> {
        let (iv, ct) = &self.wrapped[index];
        let session = self
            .inline
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        let plain = raw_decrypt(&session, self.key, iv, &self.aad, ct)
            .map_err(|e| Status::internal(e.to_string()))?;
        check_dek(&plain).map_err(|e| Status::internal(e.to_string()))
    }

    pub(crate) fn reply(&self, name: String) -> Response<GetSecretResponse> {
        Response::new(GetSecretResponse {
            name,
            version: 1,
            value: self.payload.clone(),
            created_at_unix: 0,
            expires_at_unix: None,
            ..Default::default()
        })
    }
}

#[tonic::async_trait]
impl SecretService for Floor {
    async fn get_secret(
        &self,
        request: Request<GetSecretRequest>,
    ) -> Result<Response<GetSecretResponse>, Status> {
        let name = request.into_inner().name;
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.wrapped.len();
        match name.as_str() {
            FLOOR_TOKEN => self.decrypt_inline(index)?,
            FLOOR_WORKER => {
                let (reply, rx) = tokio::sync::oneshot::channel();
                self.jobs
                    .send(FloorJob { index, reply })
                    .await
                    .map_err(|_| Status::internal("worker gone"))?;
                rx.await
                    .map_err(|_| Status::internal("worker gone"))?
                    .map_err(|e| Status::internal(e.to_string()))?;
            }
            FLOOR_NOTOKEN => {}
            FLOOR_DURABLE => {
                self.decrypt_inline(index)?;
                // About the size of an audit entry.
                let line = format!(
                    "{{\"seq\":{index},\"operation\":\"GetSecret\",\"name\":\"{name}\",\"status\":\"Ok\",\"pad\":\"{}\"}}\n",
                    "0".repeat(180)
                );
                let (done, rx) = tokio::sync::oneshot::channel();
                self.journal
                    .send((line.into_bytes(), done))
                    .map_err(|_| Status::internal("journal gone"))?;
                if !rx.await.unwrap_or(false) {
                    return Err(Status::unavailable("journal write failed"));
                }
            }
            _ => return Err(Status::not_found("the floor server knows four names")),
        }
        Ok(self.reply(name))
    }

    async fn put_secret(
        &self,
        _: Request<PutSecretRequest>,
    ) -> Result<Response<PutSecretResponse>, Status> {
        Err(Status::unimplemented("floor server"))
    }

    async fn describe_secret(
        &self,
        _: Request<DescribeSecretRequest>,
    ) -> Result<Response<DescribeSecretResponse>, Status> {
        Err(Status::unimplemented("floor server"))
    }

    async fn list_secrets(
        &self,
        _: Request<ListSecretsRequest>,
    ) -> Result<Response<ListSecretsResponse>, Status> {
        Err(Status::unimplemented("floor server"))
    }

    async fn delete_secret(
        &self,
        _: Request<DeleteSecretRequest>,
    ) -> Result<Response<DeleteSecretResponse>, Status> {
        Err(Status::unimplemented("floor server"))
    }

    type WatchSecretsStream = tokio_stream::Empty<Result<strongroom::proto::WatchEvent, Status>>;

    async fn watch_secrets(
        &self,
        _: Request<strongroom::proto::WatchSecretsRequest>,
    ) -> Result<Response<Self::WatchSecretsStream>, Status> {
        Err(Status::unimplemented("floor server"))
    }
}

pub(crate) fn floor_server(a: FloorArgs) -> Res<()> {
    exit_with_parent();
    let pin = user_pin()?;
    let pkcs11 = pkcs11_init(&a.module)?;
    let slot = find_slot(&pkcs11, &a.label)?;
    let anchor = pkcs11.open_rw_session(slot)?;
    login(&anchor, &pin)?;
    let key = find_master_key(&anchor)?;
    // An AAD of the service's shape and size: domain, name, version, master key version.
    let aad = envelope::record_aad_v1(&SecretName::parse("bench/floor/secret", 256)?, 1, 1);
    let mut wrapped = Vec::new();
    for _ in 0..16 {
        let mut iv = vec![0u8; 12];
        anchor.generate_random_slice(&mut iv)?;
        let mut dek = [0u8; 32];
        anchor.generate_random_slice(&mut dek)?;
        let mut iv_param = iv.clone();
        let params = GcmParams::new(&mut iv_param, &aad, 128.into())?;
        let ct = anchor.encrypt(&Mechanism::AesGcm(params), key, &dek)?;
        if raw_decrypt(&anchor, key, &iv, &aad, &ct)? != dek {
            return fail("the token did not round-trip a data key");
        }
        wrapped.push((iv, ct));
    }
    let wrapped = Arc::new(wrapped);
    let aad = Arc::new(aad);

    let (jobs, rx) = async_channel::bounded::<FloorJob>(1024);
    let worker_session = pkcs11.open_ro_session(slot)?;
    {
        let (wrapped, aad) = (wrapped.clone(), aad.clone());
        std::thread::Builder::new()
            .name("floor-worker".into())
            .spawn(move || {
                while let Ok(job) = rx.recv_blocking() {
                    let (iv, ct) = &wrapped[job.index];
                    let r =
                        raw_decrypt(&worker_session, key, iv, &aad, ct).and_then(|p| check_dek(&p));
                    let _ = job.reply.send(r);
                }
            })?;
    }
    let (journal, lines) =
        std::sync::mpsc::channel::<(Vec<u8>, tokio::sync::oneshot::Sender<bool>)>();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.journal)?;
    std::thread::Builder::new()
        .name("floor-journal".into())
        .spawn(move || {
            while let Ok(first) = lines.recv() {
                let mut batch = vec![first];
                batch.extend(lines.try_iter().take(511));
                let mut out = Vec::new();
                for (line, _) in &batch {
                    out.extend_from_slice(line);
                }
                let ok = file.write_all(&out).and_then(|()| file.sync_data()).is_ok();
                for (_, done) in batch {
                    let _ = done.send(ok);
                }
            }
        })?;
    let floor = Floor {
        key,
        wrapped,
        aad,
        inline: Mutex::new(pkcs11.open_ro_session(slot)?),
        jobs,
        journal,
        next: AtomicUsize::new(0),
        payload: random_bytes(a.payload),
    };
    let tls = strongroom::tls::server_config(
        &a.pki.join("server.pem"),
        &a.pki.join("server-key.pem"),
        &a.pki.join("client-ca.pem"),
    )?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut out = std::io::stdout();
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
        let server = tonic::transport::Server::builder()
            .tls_config(tls)?
            .add_service(SecretServiceServer::new(floor));
        if a.nagle {
            // strongroomd's listener: tonic ignores its tcp_nodelay setting here.
            server
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await?;
        } else {
            // What `Server::serve` does by default: TCP_NODELAY on accepted connections.
            server
                .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
                .await?;
        }
        drop(anchor);
        Ok(())
    })
}
