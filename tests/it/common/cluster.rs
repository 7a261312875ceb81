//! A multi-member etcd cluster of one test: members `m0..mN` on loopback, each with its own
//! data directory and log, client mutual TLS from the test's etcd CA (the same files as
//! [`Etcd::start`] writes: `pki/etcd-ca.pem`, `etcd-server*.pem`, `etcd-client*.pem`), peers
//! on plain HTTP on 127.0.0.1. Each member is an [`Etcd`], so it pauses, resumes, is killed
//! and restarts as the single-member etcd does; what only a cluster needs is here: starting
//! members together (a fresh member serves only once a quorum is up), a graceful stop, and
//! finding the leader.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strongroom_devpki::DevCa;

use super::{Etcd, free_port};

/// The log lines etcd 3.4 writes once it serves clients (it needs a quorum first).
const READY: [&str; 2] = [
    "serving client traffic securely",
    "ready to serve client requests",
];

/// Issues the etcd CA, a server certificate for localhost and 127.0.0.1, and the client
/// certificate the service presents, into `pki` (private keys 0600).
pub fn write_etcd_pki(pki: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let ca = DevCa::new("test etcd CA").unwrap();
    let server = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
    let client = ca.issue_client("strongroomd.etcd.test").unwrap();
    for (name, body) in [
        ("etcd-ca.pem", ca.cert_pem()),
        ("etcd-server.pem", server.cert_pem),
        ("etcd-server-key.pem", server.key_pem),
        ("etcd-client.pem", client.cert_pem),
        ("etcd-client-key.pem", client.key_pem),
    ] {
        let path = pki.join(name);
        std::fs::write(&path, body).unwrap();
        let mode = if name.ends_with("-key.pem") {
            0o600
        } else {
            0o644
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// Several etcd members forming one cluster; every member is killed on drop.
pub struct EtcdCluster {
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    /// Issues the etcd PKI into `pki` and starts `n` members under `dir` (data in
    /// `dir/etcd-mI`, logs in `dir/etcd-mI.log`), waiting until every one serves.
    pub fn start(dir: &Path, pki: &Path, n: usize) -> EtcdCluster {
        write_etcd_pki(pki);
        let mut last = String::new();
        // A port taken between probing and binding: try again with others.
        for _ in 0..5 {
            let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
            let initial = ports
                .iter()
                .enumerate()
                .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
                .collect::<Vec<_>>()
                .join(",");
            let p = |f: &str| pki.join(f).display().to_string();
            let members: Vec<Etcd> = ports
                .iter()
                .enumerate()
                .map(|(i, (client, peer))| {
                    let url = format!("https://127.0.0.1:{client}");
                    let peer = format!("http://127.0.0.1:{peer}");
                    let data = dir.join(format!("etcd-m{i}"));
                    let args: Vec<String> = [
                        "--name",
                        &format!("m{i}"),
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
                        &initial,
                        "--initial-cluster-state",
                        "new",
                        "--cert-file",
                        &p("etcd-server.pem"),
                        "--key-file",
                        &p("etcd-server-key.pem"),
                        "--trusted-ca-file",
                        &p("etcd-ca.pem"),
                        "--client-cert-auth",
                        "--max-request-bytes",
                        "33554432",
                        "--logger",
                        "zap",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                    Etcd {
                        url,
                        data,
                        log: dir.join(format!("etcd-m{i}.log")),
                        args,
                        child: std::sync::Mutex::new(None),
                    }
                })
                .collect();
            let cluster = EtcdCluster { members };
            let all: Vec<usize> = (0..n).collect();
            if cluster.start_together(&all) {
                return cluster;
            }
            last = cluster
                .members
                .iter()
                .map(|m| std::fs::read_to_string(&m.log).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n---\n");
            for m in &cluster.members {
                m.kill();
                let _ = std::fs::remove_dir_all(&m.data);
                let _ = std::fs::remove_file(&m.log);
            }
        }
        panic!("the etcd cluster did not start:\n{last}");
    }

    /// The members' client URLs, in order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.url.clone()).collect()
    }

    /// Starts the members `which` (stopped ones, on their data) at once and waits until
    /// each serves; false if one exited or none of them got there in 30 s.
    pub fn start_together(&self, which: &[usize]) -> bool {
        let started: Vec<(usize, usize, Child)> = which
            .iter()
            .map(|&i| {
                let m = &self.members[i];
                let from = std::fs::metadata(&m.log).map_or(0, |md| md.len() as usize);
                (i, from, m.launch())
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut pending: Vec<(usize, usize, Child)> = started;
        let mut ok = true;
        while !pending.is_empty() && Instant::now() < deadline {
            let mut still = Vec::new();
            for (i, from, mut child) in pending {
                let m = &self.members[i];
                let text = std::fs::read(&m.log).unwrap_or_default();
                let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
                if READY.iter().any(|r| text.contains(r)) {
                    *m.child.lock().unwrap() = Some(child);
                } else if let Ok(Some(_)) = child.try_wait() {
                    ok = false;
                } else {
                    still.push((i, from, child));
                }
            }
            pending = still;
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for (_, _, mut child) in pending {
            ok = false;
            let _ = child.kill();
            let _ = child.wait();
        }
        ok
    }

    /// The index of the member that leads now, as the live members report it; waits (up to
    /// 30 s) while an election is on.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ids = Vec::new();
            let mut leader = 0;
            for m in &self.members {
                let (id, lead) = m.status().unwrap_or((0, 0));
                ids.push(id);
                if lead != 0 {
                    leader = lead;
                }
            }
            if let Some(i) = ids.iter().position(|&id| id != 0 && id == leader) {
                return i;
            }
            assert!(Instant::now() < deadline, "no etcd leader within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Etcd {
    /// Starts the process on its data and ports without waiting for it to serve (a member
    /// of a cluster serves only once a quorum is up).
    fn launch(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        Command::new("etcd")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (scripts/deps.sh installs etcd-server)")
    }

    /// Whether the process runs (it may be paused).
    pub fn is_running(&self) -> bool {
        self.child.lock().unwrap().is_some()
    }

    /// Stops etcd gracefully (SIGTERM) and waits for it to exit (SIGKILL after 10 s).
    pub fn terminate(&self) {
        let Some(mut child) = self.child.lock().unwrap().take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// This member's id and the leader it knows of (0: none yet), from etcd's maintenance
    /// API; `None` if the member is down or does not answer within 2 s.
    pub fn status(&self) -> Option<(u64, u64)> {
        if !self.is_running() {
            return None;
        }
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
                let options = etcd_client::ConnectOptions::new()
                    .with_tls(tls)
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(2));
                let mut client = etcd_client::Client::connect([url], Some(options))
                    .await
                    .ok()?;
                let status = client.status().await.ok()?;
                Some((status.header()?.member_id(), status.leader()))
            })
        })
        .join()
        .unwrap()
    }
}
