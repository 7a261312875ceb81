//! strongroom's load generator and benchmark driver.
//!
//! `cargo bench --bench load -- [OPTIONS]` (release build) provisions, in a temporary
//! directory, fresh SoftHSM2 tokens (`strongroom-admin token init` + `key generate`), a PKI
//! from [`strongroom::tls::DevCa`] and `strongroomd` children, then measures. Every figure is
//! reported as a ratio against a baseline measured in the same run, and the two sides of every
//! ratio are measured alternately, round after round (the order rotating), so that the noise
//! of a shared machine falls on both sides alike. Per-round ratios are paired; the table shows
//! their median and range.
//!
//! Parts (`--parts`, or `STRONGROOM_BENCH_PARTS`; default `audit,floor,hsm,put,big`):
//! - `audit`: GetSecret (1 KiB) with the audit log on versus `dangerous_disable_audit`;
//! - `floor`: GetSecret versus a *floor server* — a bare tonic server on the same mutual TLS
//!   doing one raw C_Decrypt (AES-GCM of a 32-byte key under the token-object master key
//!   `strongroom-mk-1`) per request and answering a fixed payload. The token call is made
//!   either inline (a mutex-held session) or on a worker thread; the floor is the faster of
//!   the two in each round. Also measured: the same server without the token call, served
//!   through a `TcpListenerStream` (which leaves TCP_NODELAY off, as strongroomd once did), and
//!   with one durable line per request (the least a fail-closed audit must pay: a writer thread
//!   group-commits the lines with fdatasync before the answers leave);
//! - `hsm`: `Hsm::unwrap_data_key` from many tasks versus a raw single-thread C_Decrypt loop,
//!   with `workers` = 1 and 2, and the raw loop under a session-object key for comparison;
//! - `put`: durable PutSecret at concurrency 1 and 32 (group commit / fsync sharing), and
//!   `SledStore::commit` alone at the same concurrencies;
//! - `big`: GetSecret on a store of 1M secrets (sealed under the token's master key by a child
//!   process and written straight into sled) versus 1K (written through the API), and the
//!   service's VmRSS;
//! - `diag`: the service with its process log at `warn` instead of `info`, without audit
//!   checkpoints, and audit on/off at `warn`;
//! - `custom`: the load generator alone with `--concurrency`, `--connections`,
//!   `--value-size`, `--read-pct`, `--secs`, `--requests` against a `strongroomd` or the floor.
//!
//! `--quick` runs the default parts in about a minute. `--perf DIR` records a `perf` profile
//! of each server during its last slot. `STRONGROOM_BENCH_AUDIT_EXTRA` adds lines to every
//! strongroomd's `[audit]` section (e.g. `commit_window_us = 0`).
//!
//! Roles that need a PKCS#11 context of their own (C_Initialize happens once per process)
//! run this binary again as a child: `floor-server`, `hsm-bench`, `populate`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use hdrhistogram::Histogram;
use prost::Message;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use strongroom::envelope;
use strongroom::hsm::{Hsm, HsmOptions, TokenSelector};
use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom::proto::secret_service_server::{SecretService, SecretServiceServer};
use strongroom::proto::{
    DeleteSecretRequest, DeleteSecretResponse, DescribeSecretRequest, DescribeSecretResponse,
    GetSecretRequest, GetSecretResponse, HeadV1, ListSecretsRequest, ListSecretsResponse,
    PutSecretRequest, PutSecretResponse,
};
use strongroom::secret::{Mechanism as RecordMechanism, SealedRecord, SecretName};
use strongroom::tls::DevCa;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, Error>;

fn fail<T>(msg: impl Into<String>) -> Res<T> {
    Err(msg.into().into())
}

/// PINs of the throwaway tokens (SoftHSM2 and Kryoptic accept 8+ characters).
const SO_PIN: &str = "bench-so-pin-0000";
const USER_PIN: &str = "bench-user-pin-0000";
/// The load generator's identity (URI SAN of its client certificate).
const CLIENT_ID: &str = "spiffe://strongroom.bench/load";
/// The master key the floor server and the raw loops use (what `key generate` creates).
const MASTER_KEY_LABEL: &str = "strongroom-mk-1";
/// Names the floor server answers, one per behaviour.
const FLOOR_TOKEN: &str = "floor/token";
const FLOOR_WORKER: &str = "floor/worker";
const FLOOR_NOTOKEN: &str = "floor/notoken";
const FLOOR_DURABLE: &str = "floor/durable";

// ------------------------------------------------------------------------------------------
// Command line
// ------------------------------------------------------------------------------------------

#[derive(Parser)]
#[command(
    name = "load",
    about = "strongroom load generator and benchmark driver (cargo bench --bench load -- ...)"
)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Part {
    Audit,
    Floor,
    Hsm,
    Put,
    Big,
    Diag,
    Custom,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CustomTarget {
    /// strongroomd, audit on.
    On,
    /// strongroomd, audit off.
    Off,
    /// The floor server (one C_Decrypt per request).
    Floor,
}

#[derive(Args, Clone, Debug)]
struct Opts {
    /// Parts to run, comma-separated: audit, floor, hsm, put, big, diag, custom, all.
    #[arg(
        long,
        env = "STRONGROOM_BENCH_PARTS",
        value_delimiter = ',',
        default_value = "audit,floor,hsm,put,big"
    )]
    parts: Vec<Part>,
    /// About one minute in all: 1.2 s slots, 2 rounds, a 50k-secret big store.
    #[arg(long, env = "STRONGROOM_BENCH_QUICK")]
    quick: bool,
    /// Seconds measured per slot (one target, one round) [default: 5, quick 1.2].
    #[arg(long, env = "STRONGROOM_BENCH_SECS")]
    secs: Option<f64>,
    /// Seconds of warm-up load before each slot (not measured) [default: 1, quick 0.4].
    #[arg(long)]
    warmup: Option<f64>,
    /// Rounds: each target is measured once per round, in rotating order [default: 3, quick 2].
    #[arg(long, env = "STRONGROOM_BENCH_ROUNDS")]
    rounds: Option<usize>,
    /// At most this many requests per measured slot (the slot also ends after --secs).
    #[arg(long)]
    requests: Option<u64>,
    /// Concurrent request tasks of the load generator (reads).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// HTTP/2 connections the tasks share (round robin).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Secret value size in bytes.
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
    /// Percentage of reads (GetSecret) in the mix; the rest are PutSecret (custom part).
    #[arg(long, default_value_t = 100)]
    read_pct: u32,
    /// Secrets in the read set (and the small store of the big-store comparison).
    #[arg(long, default_value_t = 1000)]
    secrets: usize,
    /// Secrets in the big store [default: 1000000, quick 50000].
    #[arg(long, env = "STRONGROOM_BENCH_BIG")]
    big_secrets: Option<usize>,
    /// Value size of the big store's secrets [default: --value-size].
    #[arg(long)]
    big_value_size: Option<usize>,
    /// PutSecret concurrencies to compare (the first is the baseline).
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    put_concurrency: Vec<usize>,
    /// Async tasks driving Hsm::unwrap_data_key in the hsm part.
    #[arg(long, default_value_t = 64)]
    hsm_tasks: usize,
    /// `workers` values of the HSM pool to try in the hsm part.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    hsm_workers: Vec<usize>,
    /// `[hsm] workers` of the strongroomd children.
    #[arg(long, default_value_t = 1)]
    server_workers: usize,
    /// STRONGROOM_LOG of the strongroomd children (strongroomd's own default is info).
    #[arg(long, default_value = "info")]
    server_log: String,
    /// Target of the custom part.
    #[arg(long, value_enum, default_value = "on")]
    custom_target: CustomTarget,
    /// Also write the results table (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the temporary directory goes [default: the system temp dir].
    #[arg(long, env = "STRONGROOM_BENCH_WORKDIR")]
    workdir: Option<PathBuf>,
    /// Keep the temporary directory (tokens, stores, logs).
    #[arg(long)]
    keep: bool,
    /// Record a `perf` profile (cpu-clock, call graphs) of each server during its last slot,
    /// into this directory.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// The strongroomd binary to measure [default: the one cargo built].
    #[arg(long, env = "STRONGROOM_BENCH_STRONGROOMD")]
    strongroomd: Option<PathBuf>,
    /// The PKCS#11 module.
    #[arg(
        long,
        env = "STRONGROOM_BENCH_PKCS11_MODULE",
        default_value = "/usr/lib/softhsm/libsofthsm2.so"
    )]
    module: PathBuf,
}

#[derive(Subcommand)]
enum Role {
    /// A bare tonic server over mTLS: one raw C_Decrypt per GetSecret (child role).
    #[command(hide = true)]
    FloorServer(FloorArgs),
    /// Hsm::unwrap_data_key from many tasks versus a raw C_Decrypt loop (child role).
    #[command(hide = true)]
    HsmBench(HsmBenchArgs),
    /// Writes sealed records straight into a sled store (child role).
    #[command(hide = true)]
    Populate(PopulateArgs),
}

#[derive(Args)]
struct FloorArgs {
    #[arg(long)]
    module: PathBuf,
    #[arg(long)]
    label: String,
    #[arg(long)]
    pki: PathBuf,
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Serve the way strongroomd does (a TcpListenerStream given to
    /// `serve_with_incoming`, which leaves TCP_NODELAY off) instead of tonic's default.
    #[arg(long)]
    nagle: bool,
    /// The file `floor/durable` requests append a line to (group commit, fdatasync).
    #[arg(long)]
    journal: PathBuf,
}

#[derive(Args)]
struct HsmBenchArgs {
    #[arg(long)]
    module: PathBuf,
    #[arg(long)]
    label: String,
    #[arg(long)]
    tasks: usize,
    #[arg(long, value_delimiter = ',')]
    workers: Vec<usize>,
    #[arg(long)]
    secs: f64,
    #[arg(long)]
    warmup: f64,
    #[arg(long)]
    rounds: usize,
}

#[derive(Args)]
struct PopulateArgs {
    #[arg(long)]
    module: PathBuf,
    #[arg(long)]
    label: String,
    #[arg(long)]
    store: PathBuf,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    value_size: usize,
    #[arg(long)]
    prefix: String,
}

fn main() -> ExitCode {
    // cargo passes --bench to harness = false benches.
    let args = std::env::args().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    let result = match cli.role {
        Some(Role::FloorServer(a)) => floor_server(a),
        Some(Role::HsmBench(a)) => hsm_bench(a),
        Some(Role::Populate(a)) => populate(a),
        None => driver(cli.opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            ExitCode::FAILURE
        }
    }
}

// ------------------------------------------------------------------------------------------
// Small utilities
// ------------------------------------------------------------------------------------------

/// xorshift64*: names and mixes need no cryptographic randomness.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    use ring::rand::SecureRandom;
    let mut v = vec![0u8; n];
    // ring's SystemRandom only fails if the OS has no randomness at all.
    let _ = ring::rand::SystemRandom::new().fill(&mut v);
    v
}

/// CPU seconds (user + system) of a process so far, from /proc (USER_HZ is 100 on Linux).
fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let s = std::fs::read_to_string(path).ok()?;
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// A `Vm*:` line of /proc/PID/status, in KiB.
fn vm_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn new_hist() -> Res<Histogram<u64>> {
    // Microseconds (network) or nanoseconds (hsm part), 3 significant figures.
    Ok(Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)?)
}

fn fmt_rate(r: f64) -> String {
    let n = r.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{out}/s")
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn fmt_mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

fn pkcs11_init(module: &Path) -> Res<Pkcs11> {
    let pkcs11 = Pkcs11::new(module)?;
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    Ok(pkcs11)
}

fn find_slot(pkcs11: &Pkcs11, label: &str) -> Res<Slot> {
    for slot in pkcs11.get_slots_with_initialized_token()? {
        if pkcs11.get_token_info(slot)?.label() == label {
            return Ok(slot);
        }
    }
    fail(format!("no token labelled {label}"))
}

fn user_pin() -> Res<AuthPin> {
    let pin = std::env::var("STRONGROOM_USER_PIN")
        .map_err(|_| "STRONGROOM_USER_PIN is not set for the child role")?;
    Ok(AuthPin::new(pin.into_boxed_str()))
}

fn login(session: &Session, pin: &AuthPin) -> Res<()> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Finds the master key by label and checks it is what the service uses: a token object,
/// sensitive, not extractable.
fn find_master_key(session: &Session) -> Res<ObjectHandle> {
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(MASTER_KEY_LABEL.as_bytes().to_vec()),
    ])?;
    let [key] = found.as_slice() else {
        return fail(format!("{} keys labelled {MASTER_KEY_LABEL}", found.len()));
    };
    let attrs = session.get_attributes(
        *key,
        &[
            AttributeType::Token,
            AttributeType::Sensitive,
            AttributeType::Extractable,
        ],
    )?;
    let (mut token, mut sensitive, mut extractable) = (None, None, None);
    for a in attrs {
        match a {
            Attribute::Token(b) => token = Some(b),
            Attribute::Sensitive(b) => sensitive = Some(b),
            Attribute::Extractable(b) => extractable = Some(b),
            _ => {}
        }
    }
    if token != Some(true) || sensitive != Some(true) || extractable != Some(false) {
        return fail(format!(
            "{MASTER_KEY_LABEL} is not a sensitive, non-extractable token object \
             (token {token:?}, sensitive {sensitive:?}, extractable {extractable:?})"
        ));
    }
    Ok(*key)
}

/// One raw C_Decrypt of AES-GCM(iv, aad) over ciphertext || tag.
fn raw_decrypt(
    session: &Session,
    key: ObjectHandle,
    iv: &[u8],
    aad: &[u8],
    ct: &[u8],
) -> Res<Vec<u8>> {
    let mut iv = iv.to_vec();
    let params = GcmParams::new(&mut iv, aad, 128.into())?;
    Ok(session.decrypt(&Mechanism::AesGcm(params), key, ct)?)
}

/// Child roles exit when the driver goes away (their stdin closes).
fn exit_with_parent() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}

fn runtime() -> Res<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

// ------------------------------------------------------------------------------------------
// Child role: the floor server
// ------------------------------------------------------------------------------------------

struct FloorJob {
    index: usize,
    reply: tokio::sync::oneshot::Sender<Res<()>>,
}

struct Floor {
    key: ObjectHandle,
    /// Wrapped data keys: (IV, ciphertext || tag).
    wrapped: Arc<Vec<(Vec<u8>, Vec<u8>)>>,
    aad: Arc<Vec<u8>>,
    /// The session used on the runtime's threads (one request at a time holds it).
    inline: Mutex<Session>,
    /// A dedicated thread with its own session, as strongroom's pool has.
    jobs: async_channel::Sender<FloorJob>,
    /// The bare minimum of a durable per-request record: a line handed to a writer thread
    /// that appends everything waiting with one fdatasync, then acknowledges it.
    journal: std::sync::mpsc::Sender<(Vec<u8>, tokio::sync::oneshot::Sender<bool>)>,
    next: AtomicUsize,
    payload: Vec<u8>,
}

fn check_dek(plain: &[u8]) -> Res<()> {
    if plain.len() == 32 {
        Ok(())
    } else {
        fail("the token returned a data key of the wrong length")
    }
}

impl Floor {
    /// One C_Decrypt of data key `index` on the runtime's thread (a mutex-held session).
    fn decrypt_inline(&self, index: usize) -> Result<(), Status> {
        let (iv, ct) = &self.wrapped[index];
        let session = self
            .inline
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        let plain = raw_decrypt(&session, self.key, iv, &self.aad, ct)
            .map_err(|e| Status::internal(e.to_string()))?;
        check_dek(&plain).map_err(|e| Status::internal(e.to_string()))
    }

    fn reply(&self, name: String) -> Response<GetSecretResponse> {
        Response::new(GetSecretResponse {
            name,
            version: 1,
            value: self.payload.clone(),
            created_at_unix: 0,
            expires_at_unix: None,
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
}

fn floor_server(a: FloorArgs) -> Res<()> {
    exit_with_parent();
    let pin = user_pin()?;
    let pkcs11 = pkcs11_init(&a.module)?;
    let slot = find_slot(&pkcs11, &a.label)?;
    let anchor = pkcs11.open_rw_session(slot)?;
    login(&anchor, &pin)?;
    let key = find_master_key(&anchor)?;
    // An AAD of the service's shape and size: domain, name, version, master key version.
    let aad = envelope::record_aad(&SecretName::parse("bench/floor/secret", 256)?, 1, 1);
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

// ------------------------------------------------------------------------------------------
// Child role: the HSM module alone
// ------------------------------------------------------------------------------------------

#[derive(Default)]
struct HsmArm {
    rates: Vec<f64>,
    cpu_per_op_us: Vec<f64>,
    hist: Option<Histogram<u64>>,
}

impl HsmArm {
    fn add(&mut self, ops: u64, secs: f64, cpu: f64, hist: Histogram<u64>) -> Res<()> {
        self.rates.push(ops as f64 / secs);
        self.cpu_per_op_us.push(cpu * 1e6 / ops.max(1) as f64);
        match &mut self.hist {
            Some(h) => h.add(&hist)?,
            None => self.hist = Some(hist),
        }
        Ok(())
    }
}

fn hsm_bench(a: HsmBenchArgs) -> Res<()> {
    exit_with_parent();
    let selector: TokenSelector = a.label.parse()?;
    let pkcs11 = strongroom::hsm::load_module(&a.module)?;
    let rt = runtime()?;
    let mut pools = Vec::new();
    for &w in &a.workers {
        let options = HsmOptions {
            workers: w,
            ..HsmOptions::default()
        };
        let pin = user_pin()?;
        let hsm = rt.block_on(async { Hsm::open(pkcs11.clone(), &selector, pin, &options) })?;
        pools.push((w, Arc::new(hsm)));
    }
    let (_, first) = pools.first().ok_or("no --workers")?;
    let mk = first
        .current_master_key()
        .ok_or("the token holds no master key")?;
    // The raw side: its own session of the same (logged-in) process, the same key object.
    let slot = find_slot(&pkcs11, &a.label)?;
    let raw = pkcs11.open_ro_session(slot)?;
    let key = find_master_key(&raw)?;

    // One wrapped data key per task, made by the pool (C_Encrypt AES-GCM with AAD).
    let mut jobs = Vec::new();
    for i in 0..a.tasks.max(1) {
        let name = SecretName::parse(&format!("bench/hsm/{i:04}"), 256)?;
        let aad = envelope::record_aad(&name, 1, mk);
        let (dek, wrapped) =
            rt.block_on(first.new_data_key(mk, aad.clone(), Duration::from_secs(10)))?;
        let (iv, ct) = wrapped.split_at(12);
        if raw_decrypt(&raw, key, iv, &aad, ct)? != dek.expose() {
            return fail("the raw loop and the pool disagree on a data key");
        }
        jobs.push((wrapped, aad));
    }
    // What a session-object copy of the master key would cost (SoftHSM2 refuses to copy a
    // CKA_MODIFIABLE=false key, so the service uses the token object): a session key with
    // the same protection, generated in the token.
    let session_key = raw.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ],
    )?;
    let mut session_jobs = Vec::new();
    for (wrapped, aad) in &jobs {
        let mut iv = wrapped[..12].to_vec();
        let params = GcmParams::new(&mut iv, aad, 128.into())?;
        let ct = raw.encrypt(&Mechanism::AesGcm(params), session_key, &[7u8; 32])?;
        let mut w = wrapped[..12].to_vec();
        w.extend_from_slice(&ct);
        session_jobs.push((w, aad.clone()));
    }
    let jobs = Arc::new(jobs);
    let secs = Duration::from_secs_f64(a.secs);
    let warmup = Duration::from_secs_f64(a.warmup);

    let raw_run = |key: ObjectHandle,
                   jobs: &[(Vec<u8>, Vec<u8>)],
                   d: Duration|
     -> Res<(u64, f64, f64, Histogram<u64>)> {
        let mut hist = new_hist()?;
        let cpu0 = cpu_secs(None).unwrap_or(0.0);
        let start = Instant::now();
        let end = start + d;
        let mut n = 0u64;
        let mut now = start;
        while now < end {
            let (wrapped, aad) = &jobs[n as usize % jobs.len()];
            let (iv, ct) = wrapped.split_at(12);
            let plain = raw_decrypt(&raw, key, iv, aad, ct)?;
            check_dek(&plain)?;
            let t = Instant::now();
            hist.record((t - now).as_nanos().max(1) as u64)?;
            now = t;
            n += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        Ok((n, secs, cpu_secs(None).unwrap_or(0.0) - cpu0, hist))
    };
    let pool_run = |hsm: &Arc<Hsm>, d: Duration| -> Res<(u64, f64, f64, Histogram<u64>)> {
        rt.block_on(async {
            let cpu0 = cpu_secs(None).unwrap_or(0.0);
            let start = Instant::now();
            let end = start + d;
            let mut handles = Vec::new();
            for t in 0..jobs.len() {
                let (hsm, jobs) = (hsm.clone(), jobs.clone());
                handles.push(tokio::spawn(async move {
                    let mut hist = new_hist()?;
                    let mut n = 0u64;
                    let (wrapped, aad) = &jobs[t];
                    loop {
                        let t0 = Instant::now();
                        if t0 >= end {
                            break;
                        }
                        let dek = hsm
                            .unwrap_data_key(
                                mk,
                                wrapped.clone(),
                                aad.clone(),
                                Duration::from_secs(10),
                            )
                            .await?;
                        hist.record(t0.elapsed().as_nanos().max(1) as u64)?;
                        drop(dek);
                        n += 1;
                    }
                    Res::Ok((n, hist))
                }));
            }
            let mut hist = new_hist()?;
            let mut n = 0;
            for h in handles {
                let (k, hh) = h.await??;
                n += k;
                hist.add(&hh)?;
            }
            let secs = start.elapsed().as_secs_f64();
            Ok((n, secs, cpu_secs(None).unwrap_or(0.0) - cpu0, hist))
        })
    };

    let mut arms: Vec<(String, HsmArm)> = vec![
        ("raw".into(), HsmArm::default()),
        ("raw-session".into(), HsmArm::default()),
    ];
    for (w, _) in &pools {
        arms.push((format!("w{w}"), HsmArm::default()));
    }
    for round in 0..a.rounds {
        for k in 0..arms.len() {
            let i = (k + round) % arms.len();
            let (ops, secs, cpu, hist) = match i {
                0 => {
                    raw_run(key, &jobs, warmup)?;
                    raw_run(key, &jobs, secs)?
                }
                1 => {
                    raw_run(session_key, &session_jobs, warmup)?;
                    raw_run(session_key, &session_jobs, secs)?
                }
                _ => {
                    let hsm = &pools[i - 2].1;
                    pool_run(hsm, warmup)?;
                    pool_run(hsm, secs)?
                }
            };
            eprintln!(
                "  [hsm round {}] {:>4}: {} (CPU {:.1} µs/op, p50 {:.1} µs)",
                round + 1,
                arms[i].0,
                fmt_rate(ops as f64 / secs),
                cpu * 1e6 / ops.max(1) as f64,
                hist.value_at_quantile(0.5) as f64 / 1000.0
            );
            arms[i].1.add(ops, secs, cpu, hist)?;
        }
    }
    for (name, arm) in &arms {
        let h = arm.hist.as_ref().ok_or("no samples")?;
        let line = serde_json::json!({
            "arm": name,
            "rates": arm.rates,
            "cpu_per_op_us": arm.cpu_per_op_us,
            "p50_us": h.value_at_quantile(0.5) as f64 / 1000.0,
            "p99_us": h.value_at_quantile(0.99) as f64 / 1000.0,
        });
        println!("RESULT {line}");
    }
    std::io::stdout().flush()?;
    // Leave without tearing down the pools: SoftHSM2's exit-time destructors race with
    // worker threads still closing their sessions (seen as SIGSEGV at exit).
    std::process::exit(0)
}

// ------------------------------------------------------------------------------------------
// Child role: populate a sled store directly
// ------------------------------------------------------------------------------------------

/// Writes `count` secrets (version 1 each) into a sled store with the key layout that
/// `strongroom::store::SledStore` documents, each value sealed under its own data key that
/// the token wrapped (C_Encrypt under the master key): the records are what PutSecret
/// would have stored, minus the per-record fsync.
fn populate(a: PopulateArgs) -> Res<()> {
    exit_with_parent();
    let selector: TokenSelector = a.label.parse()?;
    let pkcs11 = strongroom::hsm::load_module(&a.module)?;
    let rt = runtime()?;
    let pin = user_pin()?;
    let hsm =
        Arc::new(rt.block_on(async { Hsm::open(pkcs11, &selector, pin, &HsmOptions::default()) })?);
    let mk = hsm
        .current_master_key()
        .ok_or("the token holds no master key")?;
    let db = sled::Config::new().path(&a.store).open()?;
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, Vec<u8>)>(8192);
    let writer = std::thread::spawn(move || -> Res<sled::Db> {
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        let mut written = 0usize;
        let head = HeadV1 {
            latest_version: 1,
            deleted: false,
        }
        .encode_to_vec();
        while let Some((name, record)) = rx.blocking_recv() {
            let mut hk = vec![b'h'];
            hk.extend_from_slice(name.as_bytes());
            let mut rk = vec![b'r'];
            rk.extend_from_slice(name.as_bytes());
            rk.push(0);
            rk.extend_from_slice(&1u64.to_be_bytes());
            batch.insert(hk, head.clone());
            batch.insert(rk, record);
            in_batch += 1;
            if in_batch == 2000 {
                db.apply_batch(std::mem::take(&mut batch))?;
                written += in_batch;
                in_batch = 0;
                if written % 100_000 == 0 {
                    eprintln!(
                        "  populate: {written} records in {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        }
        db.apply_batch(batch)?;
        Ok(db)
    });
    let tasks = 64;
    let value = Arc::new(random_bytes(a.value_size));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    rt.block_on(async {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let (hsm, tx, value, prefix) =
                (hsm.clone(), tx.clone(), value.clone(), a.prefix.clone());
            let count = a.count;
            handles.push(tokio::spawn(async move {
                let mut i = t;
                while i < count {
                    let name = format!("{prefix}/{i:07}");
                    let parsed = SecretName::parse(&name, 1024)?;
                    let aad = envelope::record_aad(&parsed, 1, mk);
                    let (dek, wrapped) = hsm
                        .new_data_key(mk, aad.clone(), Duration::from_secs(30))
                        .await?;
                    let sealed = envelope::seal(&dek, &aad, &value)?;
                    let record = SealedRecord {
                        name: name.clone(),
                        version: 1,
                        master_key_version: mk,
                        mechanism: RecordMechanism::AesGcmEnvelopeV1.id(),
                        wrapped_dek: wrapped,
                        nonce: sealed.nonce.to_vec(),
                        ciphertext: sealed.ciphertext,
                        created_at_unix: now,
                        created_by: CLIENT_ID.to_owned(),
                        expires_at_unix: None,
                    };
                    tx.send((name, record.encode_to_vec()))
                        .await
                        .map_err(|_| "the writer stopped")?;
                    i += tasks;
                }
                Res::Ok(())
            }));
        }
        drop(tx);
        for h in handles {
            h.await??;
        }
        Res::Ok(())
    })?;
    let db = writer.join().map_err(|_| "the writer panicked")??;
    // The wrap counter the service keeps per master key (`w` + version).
    let mut wk = vec![b'w'];
    wk.extend_from_slice(&mk.to_be_bytes());
    db.insert(wk, (a.count as u64).to_be_bytes().to_vec())?;
    db.flush()?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "  populate: {} records in {secs:.1} s ({})",
        a.count,
        fmt_rate(a.count as f64 / secs)
    );
    println!(
        "RESULT {}",
        serde_json::json!({ "count": a.count, "secs": secs })
    );
    std::io::stdout().flush()?;
    drop(db);
    // As in hsm-bench: no teardown race with SoftHSM2's exit-time destructors.
    std::process::exit(0)
}

// ------------------------------------------------------------------------------------------
// The lab: tokens, PKI, child processes
// ------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Token {
    label: String,
    conf: PathBuf,
}

/// A child process that printed `listening on ADDR`; stopped with SIGTERM on drop.
struct Proc {
    child: Child,
    addr: String,
    log: PathBuf,
    _stdout: std::io::Lines<BufReader<ChildStdout>>,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Res<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        match lines.next() {
            Some(Ok(line)) if line.starts_with("listening on ") => Ok(Self {
                addr: line["listening on ".len()..].to_owned(),
                child,
                log,
                _stdout: lines,
            }),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                fail(format!(
                    "{cmd:?} did not start ({other:?}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ))
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
            }
        }
    }
}

/// A running target of the load generator.
#[derive(Clone)]
struct Target {
    addr: String,
    pid: u32,
}

struct Lab {
    // Children first: they stop before the directory goes.
    procs: BTreeMap<String, Proc>,
    tokens: BTreeMap<String, Token>,
    read_sets: BTreeMap<String, Arc<Vec<String>>>,
    root: PathBuf,
    pki: PathBuf,
    opts: Opts,
    _tmp: Option<tempfile::TempDir>,
}

impl Lab {
    fn new(opts: &Opts) -> Res<Self> {
        let base = opts.workdir.clone().unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base)?;
        let tmp = tempfile::Builder::new()
            .prefix("strongroom-bench-")
            .tempdir_in(&base)?;
        let root = tmp.path().to_path_buf();
        let tmp = if opts.keep {
            eprintln!("keeping {}", tmp.keep().display());
            None
        } else {
            Some(tmp)
        };
        let pki = root.join("pki");
        std::fs::create_dir_all(&pki)?;
        let server_ca = DevCa::new("bench server CA")?;
        let client_ca = DevCa::new("bench client CA")?;
        let server = server_ca.issue_server(&["localhost", "127.0.0.1"])?;
        let client = client_ca.issue_client(CLIENT_ID)?;
        for (file, body) in [
            ("server-ca.pem", server_ca.cert_pem()),
            ("client-ca.pem", client_ca.cert_pem()),
            ("server.pem", server.cert_pem),
            ("server-key.pem", server.key_pem),
            ("load.pem", client.cert_pem),
            ("load-key.pem", client.key_pem),
        ] {
            std::fs::write(pki.join(file), body)?;
        }
        Ok(Self {
            procs: BTreeMap::new(),
            tokens: BTreeMap::new(),
            read_sets: BTreeMap::new(),
            root,
            pki,
            opts: opts.clone(),
            _tmp: tmp,
        })
    }

    fn token_env(&self, cmd: &mut Command, token: &Token) {
        cmd.env("SOFTHSM2_CONF", &token.conf)
            .env("STRONGROOM_PKCS11_MODULE", &self.opts.module)
            .env("STRONGROOM_TOKEN", &token.label)
            .env("STRONGROOM_SO_PIN", SO_PIN)
            .env("STRONGROOM_USER_PIN", USER_PIN)
            .env_remove("STRONGROOM_USER_PIN_FILE")
            .env_remove("STRONGROOM_SO_PIN_FILE")
            .env_remove("STRONGROOM_CONFIG")
            .env_remove("STRONGROOM_LISTEN")
            .env_remove("STRONGROOM_STORE_PATH")
            .env_remove("STRONGROOM_AUDIT_PATH");
    }

    /// A fresh token in its own directory, with a master key and the MAC keys.
    fn token(&mut self, label: &str) -> Res<Token> {
        if let Some(t) = self.tokens.get(label) {
            return Ok(t.clone());
        }
        let dir = self.root.join(format!("token-{label}"));
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens)?;
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-config/softhsm2.conf.template"),
        )?;
        let conf = dir.join("softhsm2.conf");
        let tokendir = tokens.to_str().ok_or("non-UTF-8 temp path")?;
        std::fs::write(&conf, template.replace("@TOKENDIR@", tokendir))?;
        let token = Token {
            label: label.to_owned(),
            conf,
        };
        for args in [
            &["token", "init", "--label", label][..],
            &["key", "generate"],
        ] {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_strongroom-admin"));
            self.token_env(&mut cmd, &token);
            let out = cmd.args(args).stdin(Stdio::null()).output()?;
            if !out.status.success() {
                return fail(format!(
                    "strongroom-admin {args:?} failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        self.tokens.insert(label.to_owned(), token.clone());
        Ok(token)
    }

    /// Starts `strongroomd` (named `name`) on its own token and store.
    fn strongroomd(
        &mut self,
        name: &str,
        audit: bool,
        log_level: &str,
        checkpoint_every: Option<u64>,
    ) -> Res<Target> {
        if let Some(p) = self.procs.get(name) {
            return Ok(Target {
                addr: p.addr.clone(),
                pid: p.pid(),
            });
        }
        let token = self.token(&format!("sr-{name}"))?;
        let dir = self.root.join(format!("srv-{name}"));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("strongroomd.toml");
        let pki = self.pki.display();
        std::fs::write(
            &config,
            format!(
                r#"[server]
listen = "127.0.0.1:0"
cert = "{pki}/server.pem"
key = "{pki}/server-key.pem"
client_ca = "{pki}/client-ca.pem"
shutdown_grace_ms = 2000

[hsm]
module = "{module}"
token = "{label}"
workers = {workers}

[store]
path = "store"

[audit]
path = "audit.log"
dangerous_disable_audit = {disable}
{checkpoint}
{audit_extra}

[[policy]]
identity = "{CLIENT_ID}"
prefix = "bench"
capabilities = ["read", "write", "list", "delete"]
"#,
                module = self.opts.module.display(),
                label = token.label,
                workers = self.opts.server_workers,
                disable = !audit,
                checkpoint = checkpoint_every
                    .map(|n| format!("checkpoint_every = {n}"))
                    .unwrap_or_default(),
                // For trying audit settings (e.g. "commit_window_us = 200") in every
                // strongroomd of a run.
                audit_extra = std::env::var("STRONGROOM_BENCH_AUDIT_EXTRA").unwrap_or_default(),
            ),
        )?;
        let mut cmd = Command::new(
            self.opts
                .strongroomd
                .as_deref()
                .unwrap_or(Path::new(env!("CARGO_BIN_EXE_strongroomd"))),
        );
        self.token_env(&mut cmd, &token);
        cmd.arg("--config")
            .arg(&config)
            .env("STRONGROOM_LOG", log_level);
        let started = Instant::now();
        let proc = Proc::spawn(cmd, dir.join("strongroomd.log"))?;
        eprintln!(
            "  started strongroomd '{name}' (audit {}, log {log_level}) on {} in {:.2} s",
            if audit { "on" } else { "off" },
            proc.addr,
            started.elapsed().as_secs_f64()
        );
        let target = Target {
            addr: proc.addr.clone(),
            pid: proc.pid(),
        };
        self.procs.insert(name.to_owned(), proc);
        Ok(target)
    }

    /// The floor server child, on the token of strongroomd `on` (shared directory).
    fn floor(&mut self, nagle: bool) -> Res<Target> {
        let name = if nagle { "floor-nagle" } else { "floor" };
        if let Some(p) = self.procs.get(name) {
            return Ok(Target {
                addr: p.addr.clone(),
                pid: p.pid(),
            });
        }
        let token = self.token("sr-on")?;
        let mut cmd = Command::new(std::env::current_exe()?);
        self.token_env(&mut cmd, &token);
        cmd.arg("floor-server")
            .arg("--module")
            .arg(&self.opts.module)
            .args(["--label", &token.label])
            .arg("--pki")
            .arg(&self.pki)
            .args(["--payload", &self.opts.value_size.to_string()])
            .arg("--journal")
            .arg(self.root.join(format!("{name}-journal.log")));
        if nagle {
            cmd.arg("--nagle");
        }
        let proc = Proc::spawn(cmd, self.root.join(format!("{name}.log")))?;
        eprintln!("  started the {name} server on {}", proc.addr);
        let target = Target {
            addr: proc.addr.clone(),
            pid: proc.pid(),
        };
        self.procs.insert(name.into(), proc);
        Ok(target)
    }

    /// A strongroomd holding the read set (`--secrets` values of `--value-size`), written
    /// through the API.
    async fn read_server(
        &mut self,
        name: &str,
        audit: bool,
        log: &str,
        checkpoint_every: Option<u64>,
    ) -> Res<(Target, Arc<Vec<String>>)> {
        let target = self.strongroomd(name, audit, log, checkpoint_every)?;
        if let Some(names) = self.read_sets.get(name) {
            return Ok((target, names.clone()));
        }
        let names: Arc<Vec<String>> = Arc::new(
            (0..self.opts.secrets)
                .map(|i| format!("bench/r/{i:06}"))
                .collect(),
        );
        let clients = connect(&target.addr, &self.pki, 4).await?;
        let started = Instant::now();
        let next = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for t in 0..32 {
            let (mut client, names, next) = (
                clients[t % clients.len()].clone(),
                names.clone(),
                next.clone(),
            );
            let value = random_bytes(self.opts.value_size);
            handles.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(name) = names.get(i) else {
                        return Res::Ok(());
                    };
                    client
                        .put_secret(PutSecretRequest {
                            name: name.clone(),
                            value: value.clone(),
                            expected_version: None,
                            expires_at_unix: None,
                        })
                        .await?;
                }
            }));
        }
        for h in handles {
            h.await??;
        }
        eprintln!(
            "  wrote {} secrets of {} B into '{name}' through PutSecret in {:.1} s",
            names.len(),
            self.opts.value_size,
            started.elapsed().as_secs_f64()
        );
        self.read_sets.insert(name.to_owned(), names.clone());
        Ok((target, names))
    }

    fn log_of(&self, name: &str) -> Option<PathBuf> {
        self.procs.get(name).map(|p| p.log.clone())
    }
}

/// Runs a child role to completion; its stdin stays open (it exits when stdin closes), its
/// stderr shows progress; returns its stdout.
fn run_child(mut cmd: Command) -> Res<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdin = child.stdin.take();
    let mut out = String::new();
    child
        .stdout
        .take()
        .ok_or("no stdout")?
        .read_to_string(&mut out)?;
    let status = child.wait()?;
    drop(stdin);
    if !status.success() {
        return fail(format!("{cmd:?} failed ({status})"));
    }
    Ok(out)
}

type Client = SecretServiceClient<Channel>;

async fn connect(addr: &str, pki: &Path, n: usize) -> Res<Vec<Client>> {
    let tls = strongroom::tls::client_config(
        &pki.join("server-ca.pem"),
        &pki.join("load.pem"),
        &pki.join("load-key.pem"),
        "localhost",
    )?;
    let mut clients = Vec::new();
    for _ in 0..n.max(1) {
        let channel = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls.clone())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await?;
        clients.push(SecretServiceClient::new(channel).max_decoding_message_size(64 << 20));
    }
    Ok(clients)
}

// ------------------------------------------------------------------------------------------
// The load generator
// ------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Workload {
    concurrency: usize,
    /// Percentage of GetSecret; the rest PutSecret.
    read_pct: u32,
    /// Names read (uniformly at random).
    read_names: Arc<Vec<String>>,
    /// The value length every read must return.
    expect_len: Option<usize>,
    /// Writes go to fresh names under this prefix.
    write_prefix: String,
    value_size: usize,
}

struct Sample {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    secs: f64,
    hist: Histogram<u64>,
    server_cpu: Option<f64>,
    client_cpu: f64,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }
    fn server_cpu_us(&self) -> Option<f64> {
        self.server_cpu.map(|c| c * 1e6 / self.ok.max(1) as f64)
    }
    fn client_cpu_us(&self) -> f64 {
        self.client_cpu * 1e6 / self.ok.max(1) as f64
    }
}

static SLOT: AtomicU64 = AtomicU64::new(0);

/// Runs `w` against `clients` for `dur` (and at most `max_requests` requests); latencies in
/// microseconds.
async fn run_load(
    clients: &[Client],
    w: &Workload,
    dur: Duration,
    max_requests: Option<u64>,
    server_pid: Option<u32>,
) -> Res<Sample> {
    let slot = SLOT.fetch_add(1, Ordering::Relaxed);
    let issued = Arc::new(AtomicU64::new(0));
    let server_cpu0 = server_pid.and_then(|p| cpu_secs(Some(p)));
    let client_cpu0 = cpu_secs(None).unwrap_or(0.0);
    let start = Instant::now();
    let end = start + dur;
    let mut handles = Vec::new();
    for task in 0..w.concurrency.max(1) {
        let mut client = clients[task % clients.len()].clone();
        let w = w.clone();
        let issued = issued.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = Rng::new((slot << 20) ^ task as u64 ^ 0x5eed);
            let mut hist = new_hist()?;
            let value = if w.read_pct < 100 {
                random_bytes(w.value_size)
            } else {
                Vec::new()
            };
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None::<String>);
            let mut seq = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                if let Some(max) = max_requests
                    && issued.fetch_add(1, Ordering::Relaxed) >= max
                {
                    break;
                }
                let read = w.read_pct >= 100 || (rng.below(100) as u32) < w.read_pct;
                let result: Result<(), String> = if read {
                    let name = w.read_names[rng.below(w.read_names.len())].clone();
                    match client
                        .get_secret(GetSecretRequest { name, version: 0 })
                        .await
                    {
                        Ok(r) => match w.expect_len {
                            Some(n) if r.get_ref().value.len() != n => Err(format!(
                                "GetSecret returned {} bytes, expected {n}",
                                r.get_ref().value.len()
                            )),
                            _ => Ok(()),
                        },
                        Err(s) => Err(format!("GetSecret: {s}")),
                    }
                } else {
                    seq += 1;
                    let name = format!("{}/{slot}/{task}/{seq}", w.write_prefix);
                    client
                        .put_secret(PutSecretRequest {
                            name,
                            value: value.clone(),
                            expected_version: None,
                            expires_at_unix: None,
                        })
                        .await
                        .map(|_| ())
                        .map_err(|s| format!("PutSecret: {s}"))
                };
                match result {
                    Ok(()) => {
                        hist.record(t0.elapsed().as_micros().max(1) as u64)?;
                        ok += 1;
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            Res::Ok((ok, errors, first_error, hist))
        }));
    }
    let mut sample = Sample {
        ok: 0,
        errors: 0,
        first_error: None,
        secs: 0.0,
        hist: new_hist()?,
        server_cpu: None,
        client_cpu: 0.0,
    };
    for h in handles {
        let (ok, errors, first, hist) = h.await??;
        sample.ok += ok;
        sample.errors += errors;
        if sample.first_error.is_none() {
            sample.first_error = first;
        }
        sample.hist.add(&hist)?;
    }
    sample.secs = start.elapsed().as_secs_f64();
    sample.server_cpu = match (server_cpu0, server_pid.and_then(|p| cpu_secs(Some(p)))) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    sample.client_cpu = cpu_secs(None).unwrap_or(0.0) - client_cpu0;
    Ok(sample)
}

/// One side of a comparison.
struct Arm {
    label: String,
    clients: Vec<Client>,
    workload: Workload,
    pid: Option<u32>,
}

impl Arm {
    async fn new(
        label: impl Into<String>,
        target: &Target,
        pki: &Path,
        connections: usize,
        workload: Workload,
    ) -> Res<Self> {
        Ok(Self {
            label: label.into(),
            clients: connect(&target.addr, pki, connections).await?,
            workload,
            pid: Some(target.pid),
        })
    }
}

struct Plan {
    secs: Duration,
    warmup: Duration,
    rounds: usize,
    requests: Option<u64>,
    perf: Option<PathBuf>,
}

/// Measures every arm once per round, in an order that rotates from round to round.
async fn interleave(arms: &[Arm], plan: &Plan) -> Res<Vec<Vec<Sample>>> {
    let mut out: Vec<Vec<Sample>> = arms.iter().map(|_| Vec::new()).collect();
    for round in 0..plan.rounds {
        for k in 0..arms.len() {
            let i = (k + round) % arms.len();
            let arm = &arms[i];
            if !plan.warmup.is_zero() {
                run_load(&arm.clients, &arm.workload, plan.warmup, None, None).await?;
            }
            let perf = match (&plan.perf, arm.pid) {
                (Some(dir), Some(pid)) if round + 1 == plan.rounds => {
                    std::fs::create_dir_all(dir)?;
                    let file =
                        dir.join(format!("{}.data", arm.label.replace([' ', '/', '='], "_")));
                    Some(
                        Command::new("perf")
                            .args(["record", "-e", "cpu-clock", "-F", "999", "-g", "-p"])
                            .arg(pid.to_string())
                            .arg("-o")
                            .arg(&file)
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()?,
                    )
                }
                _ => None,
            };
            if perf.is_some() {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let s = run_load(
                &arm.clients,
                &arm.workload,
                plan.secs,
                plan.requests,
                arm.pid,
            )
            .await?;
            if let Some(mut p) = perf {
                let _ = Command::new("kill")
                    .args(["-INT", &p.id().to_string()])
                    .status();
                let _ = p.wait();
            }
            if s.errors > 0 {
                return fail(format!(
                    "{}: {} of {} requests failed; first: {}",
                    arm.label,
                    s.errors,
                    s.errors + s.ok,
                    s.first_error.unwrap_or_default()
                ));
            }
            eprintln!(
                "  [round {}] {:<34} {:>10}  p50 {:>9}  p99 {:>9}  server CPU {:>6} µs/req  client CPU {:>5.0} µs/req",
                round + 1,
                arm.label,
                fmt_rate(s.rate()),
                fmt_us(s.hist.value_at_quantile(0.5) as f64),
                fmt_us(s.hist.value_at_quantile(0.99) as f64),
                s.server_cpu_us().map_or("-".into(), |c| format!("{c:.0}")),
                s.client_cpu_us(),
            );
            out[i].push(s);
        }
    }
    Ok(out)
}

struct Summary {
    rate: f64,
    p50: f64,
    p99: f64,
    server_cpu_us: Option<f64>,
    client_cpu_us: f64,
    rates: Vec<f64>,
}

fn summarize(samples: &[Sample]) -> Res<Summary> {
    let mut hist = new_hist()?;
    for s in samples {
        hist.add(&s.hist)?;
    }
    let rates: Vec<f64> = samples.iter().map(Sample::rate).collect();
    let cpus: Vec<f64> = samples.iter().filter_map(Sample::server_cpu_us).collect();
    Ok(Summary {
        rate: median(&rates),
        p50: hist.value_at_quantile(0.5) as f64,
        p99: hist.value_at_quantile(0.99) as f64,
        server_cpu_us: (!cpus.is_empty()).then(|| median(&cpus)),
        client_cpu_us: median(
            &samples
                .iter()
                .map(Sample::client_cpu_us)
                .collect::<Vec<_>>(),
        ),
        rates,
    })
}

impl Summary {
    fn describe(&self) -> String {
        let mut s = format!(
            "{} p50 {} p99 {}",
            fmt_rate(self.rate),
            fmt_us(self.p50),
            fmt_us(self.p99)
        );
        if let Some(c) = self.server_cpu_us {
            let _ = write!(s, ", server CPU {c:.0} µs/req");
        }
        s
    }
}

/// Paired per-round ratio a/b: median, min, max.
struct Ratio {
    median: f64,
    lo: f64,
    hi: f64,
}

impl Ratio {
    fn of(a: &[f64], b: &[f64]) -> Self {
        let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        let (lo, hi) = min_max(&r);
        Self {
            median: median(&r),
            lo,
            hi,
        }
    }
    fn show(&self) -> String {
        format!("{:.3} ({:.3}–{:.3})", self.median, self.lo, self.hi)
    }
}

// ------------------------------------------------------------------------------------------
// Results table
// ------------------------------------------------------------------------------------------

struct Row {
    name: String,
    value: String,
    measured: String,
    baseline: String,
    target: String,
}

fn row(
    name: impl Into<String>,
    value: impl Into<String>,
    measured: impl Into<String>,
    baseline: impl Into<String>,
    target: impl Into<String>,
) -> Row {
    Row {
        name: name.into(),
        value: value.into(),
        measured: measured.into(),
        baseline: baseline.into(),
        target: target.into(),
    }
}

fn verdict(value: f64, target: f64) -> String {
    if value >= target {
        format!("≥ {target} ✔")
    } else {
        format!("≥ {target} ✘")
    }
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| row | ratio / value (median, range over rounds) | measured | baseline (same run) | target |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            r.name, r.value, r.measured, r.baseline, r.target
        );
    }
    s
}

// ------------------------------------------------------------------------------------------
// Parts
// ------------------------------------------------------------------------------------------

fn reads(names: &Arc<Vec<String>>, opts: &Opts) -> Workload {
    Workload {
        concurrency: opts.concurrency,
        read_pct: 100,
        read_names: names.clone(),
        expect_len: Some(opts.value_size),
        write_prefix: "bench/w".into(),
        value_size: opts.value_size,
    }
}

async fn part_reads(lab: &mut Lab, plan: &Plan, parts: &[Part], rows: &mut Vec<Row>) -> Res<()> {
    let opts = lab.opts.clone();
    let audit = parts.contains(&Part::Audit);
    let floor = parts.contains(&Part::Floor);
    eprintln!(
        "\n== GetSecret {} B, {} tasks over {} connections: {}",
        opts.value_size,
        opts.concurrency,
        opts.connections,
        match (audit, floor) {
            (true, true) => "audit on vs off, and vs the floor server",
            (true, false) => "audit on vs off",
            _ => "vs the floor server",
        }
    );
    let (on, names) = lab.read_server("on", true, &opts.server_log, None).await?;
    let mut arms = vec![
        Arm::new(
            "strongroomd audit on",
            &on,
            &lab.pki,
            opts.connections,
            reads(&names, &opts),
        )
        .await?,
    ];
    if audit {
        let (off, names) = lab
            .read_server("off", false, &opts.server_log, None)
            .await?;
        arms.push(
            Arm::new(
                "strongroomd audit off",
                &off,
                &lab.pki,
                opts.connections,
                reads(&names, &opts),
            )
            .await?,
        );
    }
    let floor_base = arms.len();
    if floor {
        let f = lab.floor(false)?;
        let nagle = lab.floor(true)?;
        for (label, target, name) in [
            ("floor: 1 C_Decrypt inline", &f, FLOOR_TOKEN),
            ("floor: no token call", &f, FLOOR_NOTOKEN),
            ("floor: 1 C_Decrypt, worker thread", &f, FLOOR_WORKER),
            ("floor, strongroomd's listener", &nagle, FLOOR_TOKEN),
            ("floor: 1 C_Decrypt + durable line", &f, FLOOR_DURABLE),
        ] {
            let w = reads(&Arc::new(vec![name.to_owned()]), &opts);
            arms.push(Arm::new(label, target, &lab.pki, opts.connections, w).await?);
        }
    }
    let samples = interleave(&arms, plan).await?;
    let sums: Vec<Summary> = samples.iter().map(|s| summarize(s)).collect::<Res<_>>()?;
    eprintln!();
    for (arm, s) in arms.iter().zip(&sums) {
        eprintln!(
            "  {:<34} {} (client CPU {:.0} µs/req)",
            arm.label,
            s.describe(),
            s.client_cpu_us
        );
    }
    let on = &sums[0];
    if audit {
        let off = &sums[1];
        let r = Ratio::of(&on.rates, &off.rates);
        eprintln!("  audit on/off throughput ratio: {}", r.show());
        rows.push(row(
            "audit on/off ratio",
            r.show(),
            format!("audit on: {}", on.describe()),
            format!("audit off: {}", off.describe()),
            "(cost of fail-closed audit)",
        ));
        rows.push(row(
            "audit on/off p50 latency",
            format!("{:.2}×", on.p50 / off.p50),
            format!("p99 {:.2}×", on.p99 / off.p99),
            "",
            "",
        ));
    }
    if floor {
        let (inline, notok, worker, nagle, durable) = (
            &sums[floor_base],
            &sums[floor_base + 1],
            &sums[floor_base + 2],
            &sums[floor_base + 3],
            &sums[floor_base + 4],
        );
        // The floor is the faster of the two ways of making the one token call (inline on
        // the runtime's thread, or on a worker thread), round by round.
        let floor_rates: Vec<f64> = inline
            .rates
            .iter()
            .zip(&worker.rates)
            .map(|(a, b)| a.max(*b))
            .collect();
        let (best, how) = if worker.rate > inline.rate {
            (worker, "worker thread")
        } else {
            (inline, "inline")
        };
        let r = Ratio::of(&on.rates, &floor_rates);
        eprintln!("  floor ratio: {}", r.show());
        rows.push(row(
            "floor ratio",
            r.show(),
            format!("strongroomd audit on: {}", on.describe()),
            format!(
                "floor, 1 C_Decrypt/request (faster of inline / worker thread per round; {how} here): {}",
                best.describe()
            ),
            verdict(r.median, 0.85),
        ));
        if let (Some(f), Some(o)) = (best.server_cpu_us, on.server_cpu_us) {
            rows.push(row(
                "floor ratio, server CPU per request",
                format!("{:.2}", f / o),
                format!("strongroomd audit on: {o:.0} µs/req"),
                format!("floor: {f:.0} µs/req"),
                "(floor CPU / strongroomd CPU: less noisy than rates)",
            ));
        }
        rows.push(row(
            "floor ratio, latency",
            format!(
                "p50 {:.2}× p99 {:.2}×",
                on.p50 / best.p50,
                on.p99 / best.p99
            ),
            "strongroomd / floor",
            "",
            "",
        ));
        if audit {
            let off = &sums[1];
            let r5 = Ratio::of(&off.rates, &floor_rates);
            rows.push(row(
                "floor ratio, audit off",
                r5.show(),
                format!("strongroomd audit off: {}", off.describe()),
                "floor (1 C_Decrypt)",
                "",
            ));
        }
        // What a durable record per request costs a bare server: the least that any
        // fail-closed audit must pay, whatever it writes.
        let rd = Ratio::of(&on.rates, &durable.rates);
        rows.push(row(
            "floor ratio vs durable floor",
            rd.show(),
            "strongroomd audit on",
            format!(
                "floor (inline C_Decrypt) + one ~250-byte line per request, group-committed with fdatasync by a writer thread: {}",
                durable.describe()
            ),
            "",
        ));
        let rdf = Ratio::of(&durable.rates, &floor_rates);
        rows.push(row(
            "floor: durable line / none",
            rdf.show(),
            "floor + durable line",
            "floor (faster of inline / worker thread)",
            "(the cost of making each request durable before answering)",
        ));
        let r2 = Ratio::of(&on.rates, &notok.rates);
        rows.push(row(
            "floor ratio vs no-token floor",
            r2.show(),
            "strongroomd audit on",
            format!("floor without the token call: {}", notok.describe()),
            "",
        ));
        let r3 = Ratio::of(&floor_rates, &notok.rates);
        rows.push(row(
            "floor: token call cost",
            r3.show(),
            "floor with 1 C_Decrypt",
            "floor without",
            "",
        ));
        let r4 = Ratio::of(&worker.rates, &inline.rates);
        rows.push(row(
            "floor: worker thread / inline",
            r4.show(),
            format!("C_Decrypt on a worker thread: {}", worker.describe()),
            format!(
                "C_Decrypt inline (a mutex-held session): {}",
                inline.describe()
            ),
            "",
        ));
        let r6 = Ratio::of(&on.rates, &nagle.rates);
        rows.push(row(
            "floor ratio vs floor on strongroomd's listener",
            r6.show(),
            "strongroomd audit on",
            format!(
                "floor (inline) served like strongroomd (TcpListenerStream: no TCP_NODELAY): {}",
                nagle.describe()
            ),
            "",
        ));
        let r7 = Ratio::of(&nagle.rates, &inline.rates);
        rows.push(row(
            "floor: strongroomd's listener / tonic default",
            r7.show(),
            "no TCP_NODELAY",
            "TCP_NODELAY",
            "",
        ));
    }
    Ok(())
}

async fn part_hsm(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
    let opts = lab.opts.clone();
    eprintln!(
        "\n== HSM module alone: Hsm::unwrap_data_key from {} tasks (workers {:?}) vs a raw C_Decrypt loop",
        opts.hsm_tasks, opts.hsm_workers
    );
    let token = lab.token("hsm")?;
    let mut cmd = Command::new(std::env::current_exe()?);
    lab.token_env(&mut cmd, &token);
    let workers: Vec<String> = opts.hsm_workers.iter().map(|w| w.to_string()).collect();
    cmd.arg("hsm-bench")
        .arg("--module")
        .arg(&opts.module)
        .args(["--label", &token.label])
        .args(["--tasks", &opts.hsm_tasks.to_string()])
        .args(["--workers", &workers.join(",")])
        .args(["--secs", &plan.secs.as_secs_f64().to_string()])
        .args(["--warmup", &plan.warmup.as_secs_f64().to_string()])
        .args(["--rounds", &plan.rounds.to_string()]);
    let out = run_child(cmd)?;
    let mut arms: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for line in out.lines() {
        if let Some(json) = line.strip_prefix("RESULT ") {
            let v: serde_json::Value = serde_json::from_str(json)?;
            let arm = v["arm"].as_str().unwrap_or_default().to_owned();
            arms.insert(arm, v);
        }
    }
    let rates = |v: &serde_json::Value| -> Vec<f64> {
        v["rates"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default()
    };
    let describe = |v: &serde_json::Value| {
        let cpu = v["cpu_per_op_us"]
            .as_array()
            .map(|a| {
                median(
                    &a.iter()
                        .filter_map(serde_json::Value::as_f64)
                        .collect::<Vec<_>>(),
                )
            })
            .unwrap_or(f64::NAN);
        format!(
            "{} p50 {:.1} µs p99 {:.1} µs, process CPU {cpu:.1} µs/op",
            fmt_rate(median(&rates(v))),
            v["p50_us"].as_f64().unwrap_or(f64::NAN),
            v["p99_us"].as_f64().unwrap_or(f64::NAN),
        )
    };
    let cpu = |v: &serde_json::Value| {
        v["cpu_per_op_us"]
            .as_array()
            .map(|a| {
                median(
                    &a.iter()
                        .filter_map(serde_json::Value::as_f64)
                        .collect::<Vec<_>>(),
                )
            })
            .unwrap_or(f64::NAN)
    };
    let raw = arms.get("raw").ok_or("no raw result")?.clone();
    let raw_rates = rates(&raw);
    let mut best: Option<(usize, Ratio, String, f64)> = None;
    for w in &opts.hsm_workers {
        let v = arms.get(&format!("w{w}")).ok_or("missing pool result")?;
        let r = Ratio::of(&rates(v), &raw_rates);
        eprintln!("  hsm ratio workers={w}: {}", r.show());
        rows.push(row(
            format!("hsm ratio, workers={w}"),
            r.show(),
            format!("Hsm pool, {} tasks: {}", opts.hsm_tasks, describe(v)),
            format!("raw 1-thread C_Decrypt: {}", describe(&raw)),
            "",
        ));
        if best.as_ref().is_none_or(|(_, b, _, _)| r.median > b.median) {
            best = Some((*w, r, describe(v), cpu(v)));
        }
    }
    if let Some(session) = arms.get("raw-session") {
        let r = Ratio::of(&rates(session), &raw_rates);
        rows.push(row(
            "hsm: session-object key / token-object key",
            r.show(),
            format!("raw loop, session-object key: {}", describe(session)),
            format!("raw loop, token-object key: {}", describe(&raw)),
            "(what key_copy = session would give)",
        ));
    }
    if let Some((w, r, d, pool_cpu)) = best {
        rows.push(row(
            "hsm ratio",
            r.show(),
            format!("best: workers={w}: {d}"),
            format!("raw 1-thread C_Decrypt loop: {}", describe(&raw)),
            verdict(r.median, 0.9),
        ));
        rows.push(row(
            "hsm ratio, CPU per operation",
            format!("{:.2}", cpu(&raw) / pool_cpu),
            format!("pool (workers={w}): {pool_cpu:.1} µs/op"),
            format!("raw loop: {:.1} µs/op", cpu(&raw)),
            "(raw CPU / pool CPU: less noisy than rates)",
        ));
    }
    Ok(())
}

async fn part_put(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
    let opts = lab.opts.clone();
    eprintln!(
        "\n== PutSecret {} B (durable: sled fsync + audit fsync), concurrency {:?}",
        opts.value_size, opts.put_concurrency
    );
    let target = lab.strongroomd("put", true, &opts.server_log, None)?;
    let mut arms = Vec::new();
    for &c in &opts.put_concurrency {
        let w = Workload {
            concurrency: c,
            read_pct: 0,
            read_names: Arc::new(Vec::new()),
            expect_len: None,
            write_prefix: "bench/w".into(),
            value_size: opts.value_size,
        };
        arms.push(
            Arm::new(
                format!("PutSecret c={c}"),
                &target,
                &lab.pki,
                opts.connections.min(c),
                w,
            )
            .await?,
        );
    }
    let samples = interleave(&arms, plan).await?;
    let sums: Vec<Summary> = samples.iter().map(|s| summarize(s)).collect::<Res<_>>()?;
    let base = &sums[0];
    let c0 = opts.put_concurrency[0];
    rows.push(row(
        format!("put throughput c={c0}"),
        fmt_rate(base.rate),
        base.describe(),
        "",
        "",
    ));
    for (c, s) in opts.put_concurrency.iter().zip(&sums).skip(1) {
        let r = Ratio::of(&s.rates, &base.rates);
        eprintln!("  put c={c} / c={c0}: {}", r.show());
        rows.push(row(
            format!("put throughput c={c}/c={c0} ratio"),
            r.show(),
            format!("c={c}: {}", s.describe()),
            format!("c={c0}: {}", base.describe()),
            "(> 1: writers share fsyncs)",
        ));
    }
    // One stage alone: the store's durable commit (SledStore::commit: one atomic batch, then
    // flush = fsync), from as many threads, in this process.
    let dir = lab.root.join("store-stage");
    // Any key: the stage measures the commit, not the token.
    let key = strongroom::store::StateKey::new(&zeroize::Zeroizing::new([0x5a; 32]));
    let store = Arc::new(strongroom::store::SledStore::open(&dir, key)?);
    for &c in &opts.put_concurrency {
        let (ops, secs, cpu) = store_stage(&store, c, plan.secs, opts.value_size)?;
        eprintln!(
            "  SledStore::commit alone, {c} threads: {} (CPU {:.0} µs/commit)",
            fmt_rate(ops as f64 / secs),
            cpu * 1e6 / ops.max(1) as f64
        );
        rows.push(row(
            format!("put stage: SledStore::commit alone, {c} threads"),
            fmt_rate(ops as f64 / secs),
            format!("CPU {:.0} µs/commit", cpu * 1e6 / ops.max(1) as f64),
            "(in process, no gRPC, token or audit)",
            "",
        ));
    }
    if let Some(top) = sums.last() {
        let big = lab.opts.big_secrets.unwrap_or(1_000_000) as f64;
        rows.push(row(
            "1M puts through the API (extrapolated)",
            format!("{:.1} min", big / top.rate / 60.0),
            format!(
                "at the c={} rate",
                opts.put_concurrency.last().copied().unwrap_or(1)
            ),
            "",
            "",
        ));
    }
    Ok(())
}

/// Durable commits of fresh names from `threads` threads for `dur`: (commits, seconds, CPU
/// seconds of this process).
fn store_stage(
    store: &Arc<strongroom::store::SledStore>,
    threads: usize,
    dur: Duration,
    value_size: usize,
) -> Res<(u64, f64, f64)> {
    use strongroom::store::Store;
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let cpu0 = cpu_secs(None).unwrap_or(0.0);
    let start = Instant::now();
    let end = start + dur;
    let mut handles = Vec::new();
    for t in 0..threads.max(1) {
        let store = store.clone();
        handles.push(std::thread::spawn(move || -> Res<u64> {
            let mut n = 0u64;
            while Instant::now() < end {
                let record = SealedRecord {
                    name: format!("bench/stage/{run}/{t}/{n}"),
                    version: 1,
                    master_key_version: 1,
                    mechanism: RecordMechanism::AesGcmEnvelopeV1.id(),
                    wrapped_dek: vec![1; 60],
                    nonce: vec![2; 12],
                    ciphertext: vec![3; value_size + 16],
                    created_at_unix: 0,
                    created_by: CLIENT_ID.into(),
                    expires_at_unix: None,
                };
                if store.commit(&record, None)?.is_err() {
                    return fail("unexpected version conflict");
                }
                n += 1;
            }
            Ok(n)
        }));
    }
    let mut ops = 0;
    for h in handles {
        ops += h.join().map_err(|_| "a store thread panicked")??;
    }
    Ok((
        ops,
        start.elapsed().as_secs_f64(),
        cpu_secs(None).unwrap_or(0.0) - cpu0,
    ))
}

async fn part_big(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
    let opts = lab.opts.clone();
    let n1 = opts
        .big_secrets
        .unwrap_or(if opts.quick { 50_000 } else { 1_000_000 });
    let vs = opts.big_value_size.unwrap_or(opts.value_size);
    eprintln!(
        "\n== GetSecret on a store of {n1} secrets vs {} (values {vs} B)",
        opts.secrets
    );
    // The small store: the read set of strongroomd 'on', written through the API.
    let (small, small_names) = lab.read_server("on", true, &opts.server_log, None).await?;
    // The big store: sealed in a child process (the pool's C_Encrypt per record, the
    // envelope's AES-GCM), written straight into sled before strongroomd opens it.
    let token = lab.token("sr-big")?;
    let store = lab.root.join("srv-big").join("store");
    std::fs::create_dir_all(&store)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    lab.token_env(&mut cmd, &token);
    cmd.arg("populate")
        .arg("--module")
        .arg(&opts.module)
        .args(["--label", &token.label])
        .arg("--store")
        .arg(&store)
        .args(["--count", &n1.to_string()])
        .args(["--value-size", &vs.to_string()])
        .args(["--prefix", "bench/big"]);
    let started = Instant::now();
    run_child(cmd)?;
    let populate_secs = started.elapsed().as_secs_f64();
    let disk = dir_size(&store);
    let started = Instant::now();
    let big = lab.strongroomd("big", true, &opts.server_log, None)?;
    let start_secs = started.elapsed().as_secs_f64();
    let rss_idle = vm_kib(big.pid, "VmRSS:").unwrap_or(0);
    let big_names: Arc<Vec<String>> =
        Arc::new((0..n1).map(|i| format!("bench/big/{i:07}")).collect());
    // Every record the child wrote must read back through the API.
    let check = Workload {
        concurrency: 8,
        expect_len: Some(vs),
        ..reads(&big_names, &opts)
    };
    let clients = connect(&big.addr, &lab.pki, 2).await?;
    let s = run_load(&clients, &check, Duration::from_secs(30), Some(200), None).await?;
    if s.errors > 0 || s.ok == 0 {
        return fail(format!(
            "records written into the big store do not read back: {:?}",
            s.first_error
        ));
    }
    let mut wl_big = reads(&big_names, &opts);
    wl_big.expect_len = Some(vs);
    let arms = vec![
        Arm::new(
            format!("GetSecret, {n1} secrets"),
            &big,
            &lab.pki,
            opts.connections,
            wl_big,
        )
        .await?,
        Arm::new(
            format!("GetSecret, {} secrets", small_names.len()),
            &small,
            &lab.pki,
            opts.connections,
            reads(&small_names, &opts),
        )
        .await?,
    ];
    let samples = interleave(&arms, plan).await?;
    let sums: Vec<Summary> = samples.iter().map(|s| summarize(s)).collect::<Res<_>>()?;
    let (b, s) = (&sums[0], &sums[1]);
    let rss_big = vm_kib(big.pid, "VmRSS:").unwrap_or(0);
    let hwm_big = vm_kib(big.pid, "VmHWM:").unwrap_or(0);
    let rss_small = vm_kib(small.pid, "VmRSS:").unwrap_or(0);
    let r = Ratio::of(&b.rates, &s.rates);
    eprintln!(
        "  big/small throughput {}; VmRSS {} vs {}",
        r.show(),
        fmt_mib(rss_big),
        fmt_mib(rss_small)
    );
    rows.push(row(
        format!("big-store read latency ({n1} vs {})", small_names.len()),
        format!("p50 {:.2}× p99 {:.2}×", b.p50 / s.p50, b.p99 / s.p99),
        format!("{n1}: {}", b.describe()),
        format!("{}: {}", small_names.len(), s.describe()),
        "",
    ));
    rows.push(row(
        "big-store read throughput ratio",
        r.show(),
        format!("{n1} secrets"),
        format!("{} secrets", small_names.len()),
        "",
    ));
    rows.push(row(
        format!("big-store memory (VmRSS at {n1})"),
        fmt_mib(rss_big),
        format!(
            "after the reads; {} just after start; peak (VmHWM) {}",
            fmt_mib(rss_idle),
            fmt_mib(hwm_big)
        ),
        format!("{} secrets: {}", small_names.len(), fmt_mib(rss_small)),
        "",
    ));
    rows.push(row(
        "big store: size and set-up",
        format!("{:.2} GiB on disk", disk as f64 / (1u64 << 30) as f64),
        format!(
            "sealed and written directly in {populate_secs:.0} s ({}); strongroomd start {start_secs:.2} s",
            fmt_rate(n1 as f64 / populate_secs)
        ),
        "",
        "",
    ));
    Ok(())
}

async fn part_diag(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
    let opts = lab.opts.clone();
    eprintln!(
        "\n== Where the time goes: the per-request log line (info) and the audit checkpoints"
    );
    let (on, names) = lab.read_server("on", true, &opts.server_log, None).await?;
    let (on_warn, names_w) = lab.read_server("on-warn", true, "warn", None).await?;
    let (on_nocp, names_n) = lab
        .read_server("on-nocp", true, "warn", Some(1_000_000_000))
        .await?;
    let (off_warn, names_ow) = lab.read_server("off-warn", false, "warn", None).await?;
    let specs = [
        (format!("audit on, log {}", opts.server_log), &on, &names),
        ("audit on, log warn".to_owned(), &on_warn, &names_w),
        (
            "audit on, log warn, no checkpoints".to_owned(),
            &on_nocp,
            &names_n,
        ),
        ("audit off, log warn".to_owned(), &off_warn, &names_ow),
    ];
    let mut arms = Vec::new();
    for (label, target, names) in specs {
        arms.push(
            Arm::new(
                label,
                target,
                &lab.pki,
                opts.connections,
                reads(names, &opts),
            )
            .await?,
        );
    }
    let samples = interleave(&arms, plan).await?;
    let sums: Vec<Summary> = samples.iter().map(|s| summarize(s)).collect::<Res<_>>()?;
    let pairs = [
        (
            format!("diag: log warn / log {}", opts.server_log),
            1,
            0,
            "(cost of the per-request log line)",
        ),
        (
            "diag: no checkpoints / checkpoint_every 1000".to_owned(),
            2,
            1,
            "(cost of the token checkpoint writes; both log warn)",
        ),
        (
            "diag: audit on/off, both log warn".to_owned(),
            1,
            3,
            "(audit without its log line)",
        ),
        (
            "diag: audit without checkpoints / audit off".to_owned(),
            2,
            3,
            "(chain, JSON, fsync, hand-offs)",
        ),
    ];
    for (name, a, b, note) in pairs {
        let r = Ratio::of(&sums[a].rates, &sums[b].rates);
        rows.push(row(
            name,
            r.show(),
            format!("{}: {}", arms[a].label, sums[a].describe()),
            format!("{}: {}", arms[b].label, sums[b].describe()),
            note,
        ));
    }
    Ok(())
}

async fn part_custom(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
    let opts = lab.opts.clone();
    eprintln!(
        "\n== custom: {:?}, {} tasks, {} connections, {} B values, {}% reads",
        opts.custom_target, opts.concurrency, opts.connections, opts.value_size, opts.read_pct
    );
    let (target, mut w) = match opts.custom_target {
        CustomTarget::On | CustomTarget::Off => {
            let audit = opts.custom_target == CustomTarget::On;
            let name = if audit { "on" } else { "off" };
            let (t, names) = lab.read_server(name, audit, &opts.server_log, None).await?;
            (t, reads(&names, &opts))
        }
        CustomTarget::Floor => {
            let t = lab.floor(false)?;
            (t, reads(&Arc::new(vec![FLOOR_TOKEN.to_owned()]), &opts))
        }
    };
    w.read_pct = opts.read_pct.min(100);
    let arms = vec![
        Arm::new(
            format!("custom {:?}", opts.custom_target),
            &target,
            &lab.pki,
            opts.connections,
            w,
        )
        .await?,
    ];
    let samples = interleave(&arms, plan).await?;
    let s = summarize(&samples[0])?;
    rows.push(row(
        format!(
            "custom {:?} c={} conns={} {} B {}% reads",
            opts.custom_target, opts.concurrency, opts.connections, opts.value_size, opts.read_pct
        ),
        fmt_rate(s.rate),
        s.describe(),
        "",
        "",
    ));
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let rev = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "{cores} × {cpu}, {:.0} GiB RAM, Linux {}, strongroom {rev}",
        mem as f64 / (1u64 << 20) as f64,
        kernel.trim()
    )
}

fn driver(opts: Opts) -> Res<()> {
    let mut parts = opts.parts.clone();
    if parts.contains(&Part::All) {
        parts = vec![
            Part::Audit,
            Part::Floor,
            Part::Hsm,
            Part::Put,
            Part::Big,
            Part::Diag,
        ];
    }
    let plan = Plan {
        secs: Duration::from_secs_f64(opts.secs.unwrap_or(if opts.quick { 1.2 } else { 5.0 })),
        warmup: Duration::from_secs_f64(opts.warmup.unwrap_or(if opts.quick { 0.4 } else { 1.0 })),
        rounds: opts.rounds.unwrap_or(if opts.quick { 2 } else { 3 }).max(1),
        requests: opts.requests,
        perf: opts.perf.clone(),
    };
    let started = Instant::now();
    let header = format!(
        "machine: {}\nrun: parts {:?}, {} rounds × {:.1} s slots (+{:.1} s warm-up), GetSecret {} tasks over {} connections, {} B values, strongroomd log {}, [hsm] workers {}",
        machine(),
        parts,
        plan.rounds,
        plan.secs.as_secs_f64(),
        plan.warmup.as_secs_f64(),
        opts.concurrency,
        opts.connections,
        opts.value_size,
        opts.server_log,
        opts.server_workers,
    );
    let header = match &opts.strongroomd {
        Some(bin) => format!("{header}\nstrongroomd binary: {}", bin.display()),
        None => header,
    };
    eprintln!("{header}");
    let rt = runtime()?;
    let mut lab = Lab::new(&opts)?;
    let mut rows = Vec::new();
    let result = rt.block_on(async {
        if parts.contains(&Part::Audit) || parts.contains(&Part::Floor) {
            part_reads(&mut lab, &plan, &parts, &mut rows).await?;
        }
        if parts.contains(&Part::Hsm) {
            part_hsm(&mut lab, &plan, &mut rows).await?;
        }
        if parts.contains(&Part::Put) {
            part_put(&mut lab, &plan, &mut rows).await?;
        }
        if parts.contains(&Part::Big) {
            part_big(&mut lab, &plan, &mut rows).await?;
        }
        if parts.contains(&Part::Diag) {
            part_diag(&mut lab, &plan, &mut rows).await?;
        }
        if parts.contains(&Part::Custom) {
            part_custom(&mut lab, &plan, &mut rows).await?;
        }
        Res::Ok(())
    });
    if let Err(e) = &result {
        for name in ["on", "off", "put", "big"] {
            if let Some(log) = lab.log_of(name) {
                eprintln!("(log of strongroomd '{name}': {})", log.display());
            }
        }
        eprintln!("load: {e}");
    }
    let text = format!(
        "{header}\ntotal time {:.0} s\n\n{}",
        started.elapsed().as_secs_f64(),
        table(&rows)
    );
    println!("\n{text}");
    if let Some(out) = &opts.out {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(out, &text)?;
    }
    drop(lab);
    result
}
