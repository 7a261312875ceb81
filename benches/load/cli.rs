//! The command line: the driver's options, the parts, and the child roles' arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "load",
    about = "strongroom load generator and benchmark driver (cargo bench --bench load -- ...)"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) role: Option<Role>,
    #[command(flatten)]
    pub(crate) opts: Opts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub(crate) enum Part {
    Audit,
    Floor,
    Hsm,
    Put,
    Big,
    /// 1M secrets on sled and etcd: p50 vs 1K, VmRSS; etcd vs sled (benches/load/scale.rs).
    Scale,
    /// GetSecret of hsm-only (strict mode) records vs envelope records (benches/load/strict.rs).
    Strict,
    /// Re-wrap rate vs raw token unwrap+wrap; GetSecret p50 during re-wrap vs without
    /// (benches/load/rewrap.rs).
    Rewrap,
    Diag,
    Frontdoor,
    Wal,
    Custom,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum CustomTarget {
    /// strongroomd, audit on.
    On,
    /// strongroomd, audit off.
    Off,
    /// The floor server (one C_Decrypt per request).
    Floor,
}

#[derive(Args, Clone, Debug)]
pub(crate) struct Opts {
    /// Parts to run, comma-separated: audit, floor, hsm, put, big, scale, strict, diag,
    /// rewrap, frontdoor, wal, custom, all.
    #[arg(
        long,
        env = "STRONGROOM_BENCH_PARTS",
        value_delimiter = ',',
        default_value = "audit,floor,hsm,put,big"
    )]
    pub(crate) parts: Vec<Part>,
    /// About one minute in all: 1.2 s slots, 2 rounds, a 50k-secret big store.
    #[arg(long, env = "STRONGROOM_BENCH_QUICK")]
    pub(crate) quick: bool,
    /// Seconds measured per slot (one target, one round) [default: 5, quick 1.2].
    #[arg(long, env = "STRONGROOM_BENCH_SECS")]
    pub(crate) secs: Option<f64>,
    /// Seconds of warm-up load before each slot (not measured) [default: 1, quick 0.4].
    #[arg(long)]
    pub(crate) warmup: Option<f64>,
    /// Rounds: each target is measured once per round, in rotating order [default: 3, quick 2].
    #[arg(long, env = "STRONGROOM_BENCH_ROUNDS")]
    pub(crate) rounds: Option<usize>,
    /// At most this many requests per measured slot (the slot also ends after --secs).
    #[arg(long)]
    pub(crate) requests: Option<u64>,
    /// Concurrent request tasks of the load generator (reads).
    #[arg(long, default_value_t = 32)]
    pub(crate) concurrency: usize,
    /// HTTP/2 connections the tasks share (round robin).
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: usize,
    /// Secret value size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub(crate) value_size: usize,
    /// Percentage of reads (GetSecret) in the mix; the rest are PutSecret (custom part).
    #[arg(long, default_value_t = 100)]
    pub(crate) read_pct: u32,
    /// Secrets in the read set (and the small store of the big-store comparison).
    #[arg(long, default_value_t = 1000)]
    pub(crate) secrets: usize,
    /// Secrets in the big store [default: 1000000, quick 50000].
    #[arg(long, env = "STRONGROOM_BENCH_BIG")]
    pub(crate) big_secrets: Option<usize>,
    /// Value size of the big store's secrets [default: --value-size].
    #[arg(long)]
    pub(crate) big_value_size: Option<usize>,
    /// PutSecret concurrencies to compare (the first is the baseline).
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub(crate) put_concurrency: Vec<usize>,
    /// Async tasks driving Hsm::unwrap_data_key in the hsm part.
    #[arg(long, default_value_t = 64)]
    pub(crate) hsm_tasks: usize,
    /// `workers` values of the HSM pool to try in the hsm part.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub(crate) hsm_workers: Vec<usize>,
    /// `[hsm] workers` of the strongroomd children.
    #[arg(long, default_value_t = 1)]
    pub(crate) server_workers: usize,
    /// STRONGROOM_LOG of the strongroomd children (strongroomd's own default is info).
    #[arg(long, default_value = "info")]
    pub(crate) server_log: String,
    /// Idle TCP connections (never a byte sent) held open in the frontdoor part's attack slots.
    #[arg(long, default_value_t = 1000)]
    pub(crate) idle_connections: usize,
    /// Source addresses the idle connections are spread over (127.0.0.2 onwards).
    #[arg(long, default_value_t = 16)]
    pub(crate) idle_sources: u8,
    /// Tasks of the frontdoor part's junk-name flood (a certificate with no rights).
    #[arg(long, default_value_t = 4)]
    pub(crate) junk_tasks: usize,
    /// Name / prefix sizes of the junk-name flood, in bytes (GetSecret and ListSecrets each).
    #[arg(long, value_delimiter = ',', default_value = "65536,1048576")]
    pub(crate) junk_sizes: Vec<usize>,
    /// Target of the custom part.
    #[arg(long, value_enum, default_value = "on")]
    pub(crate) custom_target: CustomTarget,
    /// Also write the results table (markdown) to this file.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Where the temporary directory goes [default: the system temp dir].
    #[arg(long, env = "STRONGROOM_BENCH_WORKDIR")]
    pub(crate) workdir: Option<PathBuf>,
    /// Keep the temporary directory (tokens, stores, logs).
    #[arg(long)]
    pub(crate) keep: bool,
    /// Record a `perf` profile (cpu-clock, call graphs) of each server during its last slot,
    /// into this directory.
    #[arg(long)]
    pub(crate) perf: Option<PathBuf>,
    /// The strongroomd binary to measure [default: the one cargo built].
    #[arg(long, env = "STRONGROOM_BENCH_STRONGROOMD")]
    pub(crate) strongroomd: Option<PathBuf>,
    /// The audit and floor parts also measure a second audited strongroomd, started from
    /// this binary (e.g. a copy of the build before a change), as one more arm alternated
    /// with the others in every round; with --compare-env alone, the same binary.
    #[arg(long, env = "STRONGROOM_BENCH_COMPARE_STRONGROOMD")]
    pub(crate) compare_strongroomd: Option<PathBuf>,
    /// Environment of the compared strongroomd (see --compare-strongroomd), as
    /// `NAME=VALUE` pairs separated by commas (e.g. `TOKIO_WORKER_THREADS=1`).
    #[arg(long, env = "STRONGROOM_BENCH_COMPARE_ENV", value_delimiter = ',')]
    pub(crate) compare_env: Vec<String>,
    /// Lines added to the compared strongroomd's `[audit]` section (e.g.
    /// `commit_window_us = 0`; see --compare-strongroomd).
    #[arg(long, env = "STRONGROOM_BENCH_COMPARE_AUDIT")]
    pub(crate) compare_audit: Option<String>,
    /// The PKCS#11 module.
    #[arg(
        long,
        env = "STRONGROOM_BENCH_PKCS11_MODULE",
        default_value = "/usr/lib/softhsm/libsofthsm2.so"
    )]
    pub(crate) module: PathBuf,
}

#[derive(Subcommand)]
pub(crate) enum Role {
    /// A bare tonic server over mTLS: one raw C_Decrypt per GetSecret (child role).
    #[command(hide = true)]
    FloorServer(FloorArgs),
    /// Hsm::unwrap_data_key from many tasks versus a raw C_Decrypt loop (child role).
    #[command(hide = true)]
    HsmBench(HsmBenchArgs),
    /// Writes sealed records straight into a sled store (child role).
    #[command(hide = true)]
    Populate(PopulateArgs),
    /// Seals records and imports them through the Store API (child role of the scale part).
    #[command(hide = true)]
    ScalePopulate(crate::scale::ScalePopulateArgs),
}

#[derive(Args)]
pub(crate) struct FloorArgs {
    #[arg(long)]
    pub(crate) module: PathBuf,
    #[arg(long)]
    pub(crate) label: String,
    #[arg(long)]
    pub(crate) pki: PathBuf,
    #[arg(long, default_value_t = 1024)]
    pub(crate) payload: usize,
    /// Serve the way strongroomd does (a TcpListenerStream given to
    /// `serve_with_incoming`, which leaves TCP_NODELAY off) instead of tonic's default.
    #[arg(long)]
    pub(crate) nagle: bool,
    /// The file `floor/durable` requests append a line to (group commit, fdatasync).
    #[arg(long)]
    pub(crate) journal: PathBuf,
}

#[derive(Args)]
pub(crate) struct HsmBenchArgs {
    #[arg(long)]
    pub(crate) module: PathBuf,
    #[arg(long)]
    pub(crate) label: String,
    #[arg(long)]
    pub(crate) tasks: usize,
    #[arg(long, value_delimiter = ',')]
    pub(crate) workers: Vec<usize>,
    #[arg(long)]
    pub(crate) secs: f64,
    #[arg(long)]
    pub(crate) warmup: f64,
    #[arg(long)]
    pub(crate) rounds: usize,
}

#[derive(Args)]
pub(crate) struct PopulateArgs {
    #[arg(long)]
    pub(crate) module: PathBuf,
    #[arg(long)]
    pub(crate) label: String,
    #[arg(long)]
    pub(crate) store: PathBuf,
    #[arg(long)]
    pub(crate) count: usize,
    #[arg(long)]
    pub(crate) value_size: usize,
    #[arg(long)]
    pub(crate) prefix: String,
}
