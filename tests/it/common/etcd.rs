//! The etcd backend of the suite (`STRONGROOM_TEST_STORE=etcd`): a single-member etcd per
//! test over mutual TLS, and the skips of tests that read sled's files.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether the suite runs on the etcd backend (`STRONGROOM_TEST_STORE=etcd`).
pub fn store_is_etcd() -> bool {
    std::env::var("STRONGROOM_TEST_STORE").is_ok_and(|v| v == "etcd")
}

/// For tests that read or damage sled's files directly: on etcd, prints why the test does
/// not apply and returns true (the caller returns).
pub fn skip_on_etcd(why: &str) -> bool {
    if store_is_etcd() {
        println!("skipped on the etcd backend: {why}");
        return true;
    }
    false
}

/// A free TCP port on 127.0.0.1 (released for the caller to bind).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A single-member etcd of one test: its own data directory, mutual TLS from its own CA
/// (`pki/etcd-ca.pem`, server `etcd-server*.pem`, client `etcd-client*.pem`), client and
/// peer ports on 127.0.0.1. Killed on drop.
pub struct Etcd {
    pub url: String,
    pub data: PathBuf,
    pub log: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) child: std::sync::Mutex<Option<Child>>,
}

impl Etcd {
    /// Issues the etcd PKI into `pki` and starts etcd under `dir`, waiting until it serves.
    pub fn start(dir: &Path, pki: &Path) -> Etcd {
        Self::start_in(dir, pki, &dir.join("etcd"))
    }

    /// Like [`Etcd::start`], with its data directory at `data` (which may be elsewhere, e.g.
    /// on the power-cut simulator); the log stays `dir/etcd.log`.
    pub fn start_in(dir: &Path, pki: &Path, data: &Path) -> Etcd {
        super::write_etcd_pki(pki);
        let data = data.to_path_buf();
        let log = dir.join("etcd.log");
        let mut last = String::new();
        // A port taken between probing and binding: try again with others.
        for _ in 0..5 {
            let (client_port, peer_port) = (free_port(), free_port());
            let url = format!("https://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let p = |n: &str| pki.join(n).display().to_string();
            let args: Vec<String> = [
                "--name",
                "test",
                "--data-dir",
                &data.display().to_string(),
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("test={peer}"),
                "--cert-file",
                &p("etcd-server.pem"),
                "--key-file",
                &p("etcd-server-key.pem"),
                "--trusted-ca-file",
                &p("etcd-ca.pem"),
                "--client-cert-auth",
                // Values up to the service's 16 MiB ceiling fit in one request.
                "--max-request-bytes",
                "33554432",
                "--logger",
                "zap",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let etcd = Etcd {
                url,
                data: data.clone(),
                log: log.clone(),
                args,
                child: std::sync::Mutex::new(None),
            };
            if etcd.spawn() {
                return etcd;
            }
            last = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&data);
        }
        panic!("etcd did not start:\n{last}");
    }

    /// Starts the process and waits until it serves clients; false if it exited first.
    fn spawn(&self) -> bool {
        let from = std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new("etcd")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (scripts/deps.sh installs etcd-server)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let text = std::fs::read(&self.log).unwrap_or_default();
            let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
            if text.contains("serving client traffic securely")
                || text.contains("ready to serve client requests")
            {
                *self.child.lock().unwrap() = Some(child);
                return true;
            }
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    fn pid(&self) -> Option<String> {
        self.child
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| c.id().to_string())
    }

    /// Freezes etcd (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self) {
        let pid = self.pid().expect("etcd runs");
        assert!(
            Command::new("kill")
                .args(["-STOP", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Thaws a paused etcd (SIGCONT).
    pub fn resume(&self) {
        let pid = self.pid().expect("etcd runs");
        assert!(
            Command::new("kill")
                .args(["-CONT", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Kills etcd (SIGKILL) and waits for it.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `f` with an etcd client authenticated by the test's client certificate, on a
    /// runtime of its own (callers may be inside a test's runtime).
    pub fn with_client<R: Send + 'static>(
        &self,
        f: impl AsyncFnOnce(etcd_client::Client) -> R + Send + 'static,
    ) -> R {
        let pki = self.log.parent().unwrap().join("pki");
        let url = self.url.clone();
        std::thread::spawn(move || {
            let read = |n: &str| std::fs::read(pki.join(n)).unwrap();
            let tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read("etcd-ca.pem")))
                .identity(etcd_client::Identity::from_pem(
                    read("etcd-client.pem"),
                    read("etcd-client-key.pem"),
                ));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = etcd_client::Client::connect(
                    [url],
                    Some(etcd_client::ConnectOptions::new().with_tls(tls)),
                )
                .await
                .unwrap();
                f(client).await
            })
        })
        .join()
        .unwrap()
    }

    /// Writes raw keys (as a store left by another process would hold them).
    pub fn put_all(&self, kvs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) {
        let kvs: Vec<(Vec<u8>, Vec<u8>)> = kvs.into_iter().collect();
        self.with_client(async move |client| {
            let mut kv = client.kv_client();
            // etcd allows 128 operations per transaction by default.
            for chunk in kvs.chunks(128) {
                let ops: Vec<etcd_client::TxnOp> = chunk
                    .iter()
                    .map(|(k, v)| etcd_client::TxnOp::put(k.clone(), v.clone(), None))
                    .collect();
                kv.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
            }
        })
    }

    /// Every key under `prefix` with its value, as etcd holds them now.
    pub fn read_prefix(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let prefix = prefix.to_vec();
        self.with_client(async move |client| {
            let mut kv = client.kv_client();
            let options = etcd_client::GetOptions::new().with_prefix();
            let mut resp = kv.get(prefix, Some(options)).await.unwrap();
            resp.take_kvs()
                .into_iter()
                .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
                .collect()
        })
    }

    /// Writes (or, for `None`, removes) raw keys behind the service's back, one key at a
    /// time as an editor would.
    pub fn write_raw(&self, changes: &[(Vec<u8>, Option<Vec<u8>>)]) {
        let changes = changes.to_vec();
        self.with_client(async move |client| {
            let mut kv = client.kv_client();
            for (k, v) in changes {
                match v {
                    Some(v) => kv.put(k, v, None).await.map(|_| ()),
                    None => kv.delete(k, None).await.map(|_| ()),
                }
                .unwrap();
            }
        })
    }

    /// Removes every key under `prefix`.
    pub fn delete_prefix(&self, prefix: &[u8]) {
        let prefix = prefix.to_vec();
        self.with_client(async move |client| {
            let options = etcd_client::DeleteOptions::new().with_prefix();
            client
                .kv_client()
                .delete(prefix, Some(options))
                .await
                .unwrap();
        })
    }

    /// Starts etcd again on the same data and ports.
    pub fn restart(&self) {
        self.kill();
        assert!(
            self.spawn(),
            "etcd did not restart:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // A paused etcd ignores SIGKILL until it is continued.
            let _ = Command::new("kill").args(["-CONT", &pid]).status();
        }
        self.kill();
    }
}
