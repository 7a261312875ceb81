//! strongroom's load generator and benchmark driver.
//!
//! `cargo bench --bench load -- [OPTIONS]` (release build) provisions, in a temporary
//! directory, fresh SoftHSM2 tokens (`strongroom-admin token init` + `key generate`), a PKI
//! from [`strongroom_devpki::DevCa`] and `strongroomd` children, then measures. Every figure is
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
//! - `scale` (not in the default parts): a million secrets sealed per record and imported
//!   through the Store API on sled and on a 1-member etcd; GetSecret p50 against a 1K store
//!   and the server's VmRSS/VmHWM, and GetSecret/PutSecret on etcd versus sled
//!   (`STRONGROOM_BENCH_SCALE_BACKENDS=sled` for sled alone);
//! - `rewrap` (not in the default parts): the re-wrap job's rate versus the raw token's
//!   unwrap+wrap rate, and GetSecret p50 during a re-wrap versus without.
//! - `strict` (not in the default parts): GetSecret of strict-mode (`hsm-only`) records versus
//!   envelope records, both written into one server, the two read alternately;
//! - `diag`: the service with its process log at `warn` instead of `info`, without audit
//!   checkpoints, and audit on/off at `warn`;
//! - `frontdoor` (not in the default parts: about 90 s): GetSecret while 1,000 idle TCP
//!   connections (from 127.0.0.2–17, re-opened as soon as the server closes them) are held
//!   open and a certificate with no rights floods GetSecret/ListSecrets with 64 KiB and 1 MiB
//!   names, versus the same load without them; also each attack alone, and what one junk call
//!   adds to the audit and process logs;
//! - `wal` (not in the default parts: about a minute): PutSecret with the write-ahead audit
//!   (an intent entry durable before the store commit, the outcome after it) versus
//!   `audit.dangerous_no_write_ahead` (one entry after the commit), at the `put`
//!   concurrencies;
//! - `custom`: the load generator alone with `--concurrency`, `--connections`,
//!   `--value-size`, `--read-pct`, `--secs`, `--requests` against a `strongroomd` or the floor.
//!
//! `--quick` runs the default parts in about a minute. `--perf DIR` records a `perf` profile
//! of each server during its last slot. `STRONGROOM_BENCH_AUDIT_EXTRA` adds lines to every
//! strongroomd's `[audit]` section (e.g. `commit_window_us = 0`).
//!
//! Roles that need a PKCS#11 context of their own (C_Initialize happens once per process)
//! run this binary again as a child: `floor-server`, `hsm-bench`, `populate`,
//! `scale-populate`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

mod big;
mod cli;
mod floor;
mod frontdoor;
mod generator;
mod hsm;
mod lab;
mod p11;
mod parts;
mod report;
mod rewrap;
mod scale;
mod strict;
mod util;
mod wal;

use crate::big::{part_big, populate};
use crate::cli::{Cli, Opts, Part, Role};
use crate::floor::floor_server;
use crate::frontdoor::part_frontdoor;
use crate::generator::Plan;
use crate::hsm::{hsm_bench, part_hsm};
use crate::lab::Lab;
use crate::parts::{part_custom, part_diag, part_put, part_reads};
use crate::report::{machine, table};
use crate::rewrap::part_rewrap;
use crate::scale::{part_scale, scale_populate};
use crate::strict::part_strict;
use crate::util::runtime;
use crate::wal::part_wal;

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
/// An identity with a valid certificate and no policy rule (the frontdoor part's attacker).
const STRANGER_ID: &str = "spiffe://strongroom.bench/stranger";
/// The master key the floor server and the raw loops use (what `key generate` creates).
const MASTER_KEY_LABEL: &str = "strongroom-mk-1";
/// Names the floor server answers, one per behaviour.
const FLOOR_TOKEN: &str = "floor/token";
const FLOOR_WORKER: &str = "floor/worker";
const FLOOR_NOTOKEN: &str = "floor/notoken";
const FLOOR_DURABLE: &str = "floor/durable";

fn main() -> ExitCode {
    // cargo passes --bench to harness = false benches.
    let args = std::env::args().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    let result = match cli.role {
        Some(Role::FloorServer(a)) => floor_server(a),
        Some(Role::HsmBench(a)) => hsm_bench(a),
        Some(Role::Populate(a)) => populate(a),
        Some(Role::ScalePopulate(a)) => scale_populate(a),
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
            Part::Frontdoor,
            Part::Wal,
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
        if parts.contains(&Part::Scale) {
            part_scale(&mut lab, &plan, &mut rows).await?;
        }
        if parts.contains(&Part::Strict) {
            part_strict(&mut lab, &plan, &mut rows).await?;
        }
        if parts.contains(&Part::Rewrap) {
            part_rewrap(&mut lab, &plan, &mut rows).await?;
        }
        if parts.contains(&Part::Diag) {
            part_diag(&mut lab, &plan, &mut rows).await?;
        }
        if parts.contains(&Part::Frontdoor) {
            part_frontdoor(&mut lab, &plan, &mut rows).await?;
        }
        if parts.contains(&Part::Wal) {
            part_wal(&mut lab, &plan, &mut rows).await?;
        }
        if parts.contains(&Part::Custom) {
            part_custom(&mut lab, &plan, &mut rows).await?;
        }
        Res::Ok(())
    });
    if let Err(e) = &result {
        for name in ["on", "off", "put", "big", "wal-on", "wal-off"] {
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
