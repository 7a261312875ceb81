//! `strongroomd`: the secret service.
//!
//! Reads its configuration (TOML file, `STRONGROOM_*` env, flags), opens the token and the
//! store, and serves SecretService over mutual TLS until SIGTERM or SIGINT, draining
//! in-flight requests. Prints `listening on ADDR` on stdout once the port is bound, and tells
//! systemd (`READY=1`, `STOPPING=1`) when started by a `Type=notify` unit. Serves metrics on
//! `[metrics] listen`. `--check-config` and `--print-config` check or print a configuration
//! and exit.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use strongroom::config::{Config, LogFormat as ConfigLogFormat};
use strongroom::hsm::pin::read_pin;
use strongroom::metrics::MetricsListen;
use strongroom::service::Server;

/// strongroomd: the strongroom secret service.
///
/// Serves secrets over mutual TLS with master keys in a PKCS#11 token, and the officers'
/// admin plane on its own listener. Stops on SIGTERM or SIGINT, draining in-flight requests.
#[derive(Parser)]
#[command(name = "strongroomd", version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(
        long,
        short,
        env = "STRONGROOM_CONFIG",
        required_unless_present_any = ["check_config", "print_config", "completions", "man"]
    )]
    config: Option<PathBuf>,
    /// Print the shell completion script for SHELL (bash, zsh, fish, …) and exit.
    #[arg(long, value_name = "SHELL", exclusive = true)]
    completions: Option<strongroom::clidoc::Shell>,
    /// Write the man page into DIR and exit.
    #[arg(long, value_name = "DIR", exclusive = true)]
    man: Option<PathBuf>,
    /// Listen address, overriding the file and STRONGROOM_LISTEN.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Log format, overriding `[log] format` (default text).
    #[arg(long, value_enum, env = "STRONGROOM_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Check a configuration (this FILE, else --config) and every file it names, print what
    /// is wrong with which key, and exit: 0 when it is usable, 1 when not.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    check_config: Option<Option<PathBuf>>,
    /// Print the effective configuration (FILE, else --config, with STRONGROOM_* variables
    /// and defaults applied) as TOML and exit. PINs are never printed.
    #[arg(long, value_name = "FILE", num_args = 0..=1, conflicts_with = "check_config")]
    print_config: Option<Option<PathBuf>>,
}

/// glibc's malloc arenas for strongroomd when its environment names none.
///
/// glibc gives each thread that allocates its own arena (up to 8 per core), and the store's
/// calls run on tokio's blocking pool, i.e. on whichever of its threads is free: sled's pages,
/// decoded in one thread and freed in another, stay behind as free but resident memory in
/// every arena. At a million secrets this, not sled's page cache, was most of the process:
/// 585 MiB with glibc's default arenas against 254 MiB with 2 and 213 MiB with 1, the same
/// 16 MiB cache and 8 reading threads (BENCHMARKS.md, *Scale*). The cost: at a million
/// secrets, reads that page nodes in took ~80–100 µs more server CPU with one arena; reads
/// of a store that fits the cache were unchanged.
const MALLOC_ARENAS: &str = "1";

/// Restarts this process (same pid, arguments and environment) with `MALLOC_ARENA_MAX` set,
/// since glibc reads it only as the process starts. An operator's own `MALLOC_ARENA_MAX`
/// (any value) is kept as it is; if the restart fails the service runs with glibc's default.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let mut cmd = std::process::Command::new(exe);
        if let Some(arg0) = args.next() {
            cmd.arg0(arg0);
        }
        let err = cmd.args(args).env("MALLOC_ARENA_MAX", MALLOC_ARENAS).exec();
        eprintln!(
            "strongroomd: could not restart with MALLOC_ARENA_MAX={MALLOC_ARENAS} ({err}); running with glibc's default arenas"
        );
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    // After the re-exec above (an exec makes a process dumpable again), before the PIN is
    // read: no core dumps, no ptrace or /proc/PID/mem from other processes of this user.
    let dumpable = strongroom::systemd::make_non_dumpable();
    let args = Args::parse();
    if let Some(shell) = args.completions {
        let cmd = <Args as clap::CommandFactory>::command();
        return match strongroom::clidoc::completions(cmd, shell, &mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("strongroomd: cannot write the completions: {e}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(dir) = &args.man {
        let cmd = <Args as clap::CommandFactory>::command();
        return match strongroom::clidoc::man_pages(cmd, dir) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "strongroomd: cannot write the man page to {}: {e}",
                    dir.display()
                );
                ExitCode::from(1)
            }
        };
    }
    if let Some(file) = &args.check_config {
        return check_config(file.as_ref().or(args.config.as_ref()));
    }
    if let Some(file) = &args.print_config {
        return print_config(file.as_ref().or(args.config.as_ref()));
    }
    // Required by clap unless one of the two above is given.
    let Some(path) = args.config.clone() else {
        eprintln!("strongroomd: --config FILE is required");
        return ExitCode::from(2);
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("strongroomd: {e}");
            eprintln!(
                "(run `strongroomd --check-config {}` for every problem at once)",
                path.display()
            );
            return ExitCode::from(1);
        }
    };
    let format = match (args.log_format, config.log.format) {
        (Some(f), _) => f,
        (None, ConfigLogFormat::Text) => LogFormat::Text,
        (None, ConfigLogFormat::Json) => LogFormat::Json,
    };
    let filter =
        EnvFilter::try_from_env("STRONGROOM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: in a file or a journal they are noise, and formatting them
    // was a measurable part of each request's CPU (the per-request audit line).
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    if let Err(e) = dumpable {
        tracing::warn!(error = %e, "cannot make the process non-dumpable (prctl PR_SET_DUMPABLE)");
    }
    match run(args, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once, even where a message repeats its source's.
            eprintln!(
                "strongroomd: {}",
                strongroom::explain::tidy(&strongroom::explain::chain_text(e.as_ref()))
            );
            ExitCode::from(1)
        }
    }
}

/// `--check-config`: the file parses and validates, and every file it names is usable.
fn check_config(path: Option<&PathBuf>) -> ExitCode {
    let Some(path) = path else {
        eprintln!("strongroomd: --check-config needs a FILE (or --config FILE)");
        return ExitCode::from(2);
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("strongroomd: {e}");
            return ExitCode::from(1);
        }
    };
    let problems = strongroom::config::check_files(&config);
    for p in &problems {
        eprintln!("strongroomd: {}: {p}", path.display());
    }
    if !problems.is_empty() {
        eprintln!(
            "strongroomd: {}: {} problem(s); the service would not start",
            path.display(),
            problems.len()
        );
        return ExitCode::from(1);
    }
    if let Some(note) = config.pin_credential_missing() {
        println!("note: {note}");
    }
    match config.metrics.listen_at() {
        Ok(MetricsListen::Explicit(a)) if !a.ip().is_loopback() => {
            println!(
                "note: metrics.listen {a} is not a loopback address: anyone who reaches it can read the metrics"
            );
        }
        _ => {}
    }
    println!("{}: ok", path.display());
    ExitCode::SUCCESS
}

/// `--print-config`: the effective configuration, without secrets.
fn print_config(path: Option<&PathBuf>) -> ExitCode {
    let Some(path) = path else {
        eprintln!("strongroomd: --print-config needs a FILE (or --config FILE)");
        return ExitCode::from(2);
    };
    match Config::load(path).and_then(|c| strongroom::config::effective_toml(&c)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("strongroomd: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args, mut config: Config) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(why) = config.pin_credential_missing() {
        return Err(why.into());
    }
    // The PIN file and private keys must be closed to group and others.
    strongroom::files::enforce(&config)?;
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let pin = read_pin(
        "user PIN",
        config.hsm.pin_file.as_deref(),
        "STRONGROOM_USER_PIN",
        interactive,
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let server = Server::start(&config, pin).await?;
        let listener = TcpListener::bind(config.server.listen).await?;
        let addr = listener.local_addr()?;
        let admin = match &config.admin {
            Some(a) => Some(TcpListener::bind(a.listen).await?),
            None => None,
        };
        let metrics = bind_metrics(config.metrics.listen_at()?).await?;
        tracing::info!(%addr, "strongroomd listening");
        let mut out = std::io::stdout();
        writeln!(out, "listening on {addr}")?;
        if let Some(admin) = &admin {
            let admin_addr = admin.local_addr()?;
            tracing::info!(%admin_addr, "admin plane listening");
            writeln!(out, "admin listening on {admin_addr}")?;
        }
        out.flush()?;
        if let Some(metrics) = metrics {
            tokio::spawn(strongroom::metrics::serve(metrics, std::future::pending()));
        }
        // Type=notify: the listeners are bound (connections queue from now on) and the
        // token, store and audit log are open.
        strongroom::systemd::notify_or_log(&format!("READY=1\nSTATUS=serving on {addr}"));
        server.run(listener, admin, shutdown_signal()).await?;
        tracing::info!("strongroomd stopped");
        // Everything is durable by now (every write and audit entry when it was answered, the
        // final epoch and audit checkpoint in the token); what remains is closing the store,
        // the token and the runtime. Bound it, so a stop never hangs on a damaged store's
        // final flush (seen once: 10 s after "stopped" on a store with flipped bytes).
        exit_watchdog(EXIT_GRACE);
        Ok(())
    })
}

/// Binds the metrics listener. The default address (nothing in `[metrics]`) is best effort:
/// if its port is taken the service starts without metrics and logs why; an address the
/// configuration names must be bound.
async fn bind_metrics(
    at: MetricsListen,
) -> Result<Option<TcpListener>, Box<dyn std::error::Error>> {
    let listener = match at {
        MetricsListen::Off => {
            tracing::info!("metrics off ([metrics] listen = \"off\")");
            return Ok(None);
        }
        MetricsListen::Default(a) => match TcpListener::bind(a).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(metrics_addr = %a, error = %e, "cannot listen for metrics on the default address; running without metrics (set [metrics] listen)");
                return Ok(None);
            }
        },
        MetricsListen::Explicit(a) => TcpListener::bind(a)
            .await
            .map_err(|e| format!("metrics.listen {a}: {e}"))?,
    };
    let metrics_addr = listener.local_addr()?;
    tracing::info!(%metrics_addr, "metrics listening");
    Ok(Some(listener))
}

/// How long closing may take after the service has stopped.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Ends the process if it is still closing after `grace`.
fn exit_watchdog(grace: std::time::Duration) {
    let spawned = std::thread::Builder::new()
        .name("exit-watchdog".into())
        .spawn(move || {
            std::thread::sleep(grace);
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "closing the store, the token and the runtime is taking too long; exiting now (everything was already durable)"
            );
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the exit watchdog");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
    tracing::info!("shutting down: draining in-flight requests");
    strongroom::systemd::notify_or_log("STOPPING=1");
}
