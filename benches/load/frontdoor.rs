//! The frontdoor part (issue 8): GetSecret throughput while idle TCP connections are held open
//! and a client with no rights floods the service with oversized names, as a ratio of the
//! same load on the same strongroomd without them, the two alternating round after round.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Code;

use strongroom::proto::{GetSecretRequest, ListSecretsRequest};

use crate::generator::{Plan, Ratio, Sample, run_load, summarize};
use crate::lab::{Client, Lab, connect, connect_as};
use crate::parts::reads;
use crate::report::{Row, row, verdict};
use crate::util::{fmt_rate, fmt_us, median};
use crate::{Res, fail};

/// The strongroomd this part measures (service defaults, audit on).
const SERVER: &str = "front";
/// Calls per kind when measuring what one junk call adds to the logs.
const CALIBRATION_CALLS: u64 = 20;

/// What the idle connections saw, shared by their tasks.
#[derive(Default)]
struct IdleStats {
    /// Connected and not yet seen closed.
    open: AtomicU64,
    /// Closed by the server (EOF or reset on a socket that never sent a byte).
    closed: AtomicU64,
    connect_errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl IdleStats {
    fn error(&self, e: impl std::fmt::Display) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert_with(|| e.to_string());
        }
    }
}

/// What the junk-name flood got back.
#[derive(Default)]
struct JunkStats {
    calls: AtomicU64,
    codes: Mutex<BTreeMap<&'static str, u64>>,
}

impl JunkStats {
    fn codes(&self) -> BTreeMap<&'static str, u64> {
        self.codes.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::Unavailable => "UNAVAILABLE",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::Cancelled => "CANCELLED",
        Code::Internal => "INTERNAL",
        _ => "OTHER",
    }
}

fn show_codes(codes: &BTreeMap<&'static str, u64>) -> String {
    codes
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_size(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

/// One junk call: GetSecret of `name` (even `i`) or ListSecrets under it (odd `i`).
async fn junk_call(client: &mut Client, name: &str, list: bool) -> Code {
    let result = if list {
        client
            .list_secrets(ListSecretsRequest {
                prefix: name.to_owned(),
                page_size: 0,
                page_token: String::new(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    } else {
        client
            .get_secret(GetSecretRequest {
                name: name.to_owned(),
                version: 0,
            })
            .await
            .map(|_| ())
    };
    match result {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Holds one idle connection from `source`: connects, never sends a byte, and when the
/// server closes it, connects again at once; until `stop`.
async fn hold_idle(
    server: SocketAddr,
    source: Ipv4Addr,
    stats: Arc<IdleStats>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = [0u8; 256];
    loop {
        if *stop.borrow() {
            return;
        }
        let socket = match TcpSocket::new_v4()
            .and_then(|s| s.bind(SocketAddr::new(source.into(), 0)).map(|()| s))
        {
            Ok(s) => s,
            Err(e) => {
                stats.error(format!("socket/bind {source}: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let connected = tokio::select! {
            r = socket.connect(server) => Some(r),
            _ = stop.wait_for(|s| *s) => None,
        };
        let mut stream = match connected {
            None => return,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                stats.error(format!("connect from {source}: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        stats.open.fetch_add(1, Ordering::Relaxed);
        let closed = tokio::select! {
            () = async {
                // EOF or an error: the server ended the connection.
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            } => true,
            _ = stop.wait_for(|s| *s) => false,
        };
        stats.open.fetch_sub(1, Ordering::Relaxed);
        if !closed {
            return;
        }
        stats.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The attacker of a "with" slot: idle connections and the junk-name flood.
struct Attack {
    stop: watch::Sender<bool>,
    idle: Arc<IdleStats>,
    junk: Arc<JunkStats>,
    tasks: Vec<JoinHandle<()>>,
}

impl Attack {
    async fn start(
        server: SocketAddr,
        idle_n: usize,
        sources: u8,
        junk_clients: &[Client],
        junk_names: &Arc<Vec<String>>,
    ) -> Self {
        let (stop, rx) = watch::channel(false);
        let idle = Arc::new(IdleStats::default());
        let junk = Arc::new(JunkStats::default());
        let mut tasks = Vec::new();
        for i in 0..idle_n {
            let source = Ipv4Addr::new(127, 0, 0, 2 + (i % sources.max(1) as usize) as u8);
            tasks.push(tokio::spawn(hold_idle(
                server,
                source,
                idle.clone(),
                rx.clone(),
            )));
        }
        for (t, client) in junk_clients.iter().enumerate() {
            let (mut client, names, junk, rx) =
                (client.clone(), junk_names.clone(), junk.clone(), rx.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = t;
                while !*rx.borrow() {
                    let name = &names[(i / 2) % names.len()];
                    let code = junk_call(&mut client, name, i % 2 == 1).await;
                    junk.calls.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut codes) = junk.codes.lock() {
                        *codes.entry(code_name(code)).or_default() += 1;
                    }
                    i += 1;
                }
            }));
        }
        // Until (nearly) all idle connections are open, or 5 s.
        let deadline = Instant::now() + Duration::from_secs(5);
        while (idle.open.load(Ordering::Relaxed) as usize) < idle_n * 95 / 100
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self {
            stop,
            idle,
            junk,
            tasks,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// What the attacker did during one measured "with" slot.
struct WithSlot {
    open_avg: f64,
    closed: u64,
    connect_errors: u64,
    junk_calls: u64,
    junk_codes: BTreeMap<&'static str, u64>,
    audit_bytes: u64,
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The file's length once it has stopped growing (two equal readings 50 ms apart, at most
/// 2 s).
async fn settled_len(path: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = file_len(path);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = file_len(path);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

pub(crate) async fn part_frontdoor(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
    let opts = lab.opts.clone();
    let sizes: Vec<String> = opts.junk_sizes.iter().map(|n| fmt_size(*n)).collect();
    eprintln!(
        "\n== Front door: GetSecret with vs without {} idle connections (from {} source addresses) and a junk-name flood ({} tasks, names of {})",
        opts.idle_connections,
        opts.idle_sources,
        opts.junk_tasks,
        sizes.join(", ")
    );
    if opts.idle_sources == 0 || opts.idle_sources > 250 || opts.junk_sizes.is_empty() {
        return fail("--idle-sources must be 1..=250 and --junk-sizes not empty");
    }
    let (target, names) = lab
        .read_server(SERVER, true, &opts.server_log, None)
        .await?;
    let server: SocketAddr = target.addr.parse()?;
    let audit = lab.audit_log(SERVER);
    let proclog = lab.log_of(SERVER).ok_or("no log of the front server")?;
    let clients = connect(&target.addr, &lab.pki, opts.connections).await?;
    let workload = reads(&names, &opts);
    let junk_clients = connect_as(&target.addr, &lab.pki, opts.junk_tasks, "stranger").await?;
    let junk_names: Arc<Vec<String>> =
        Arc::new(opts.junk_sizes.iter().map(|n| "j".repeat(*n)).collect());

    // What one junk call of each kind costs the logs, alone (no other load).
    let mut calibration = Vec::new();
    for (name, size) in junk_names.iter().zip(&sizes) {
        for list in [false, true] {
            let mut client = junk_clients[0].clone();
            let (a0, p0) = (settled_len(&audit).await, file_len(&proclog));
            let mut codes = BTreeMap::new();
            for _ in 0..CALIBRATION_CALLS {
                *codes
                    .entry(code_name(junk_call(&mut client, name, list).await))
                    .or_insert(0u64) += 1;
            }
            let (a1, p1) = (settled_len(&audit).await, file_len(&proclog));
            let rpc = if list { "ListSecrets" } else { "GetSecret" };
            let per_audit = (a1 - a0) as f64 / CALIBRATION_CALLS as f64;
            let per_log = p1.saturating_sub(p0) as f64 / CALIBRATION_CALLS as f64;
            eprintln!(
                "  junk {rpc} {size}: {}; audit log +{per_audit:.0} B/call, process log +{per_log:.0} B/call",
                show_codes(&codes)
            );
            calibration.push((format!("{rpc} {size}"), codes, per_audit, per_log));
        }
    }

    // The arms: (idle connections, junk flood). The first is the baseline.
    let arms = [
        ("without", false, false),
        ("with idle connections + junk flood", true, true),
        ("with idle connections only", true, false),
        ("with junk flood only", false, true),
    ];
    let mut samples: Vec<Vec<Sample>> = arms.iter().map(|_| Vec::new()).collect();
    let mut stats: Vec<Vec<WithSlot>> = arms.iter().map(|_| Vec::new()).collect();
    let mut without_audit: Vec<f64> = Vec::new();
    for round in 0..plan.rounds {
        for k in 0..arms.len() {
            let i = (k + round) % arms.len();
            let (label, idle_on, junk_on) = arms[i];
            let opened = Instant::now();
            let att = Attack::start(
                server,
                if idle_on { opts.idle_connections } else { 0 },
                opts.idle_sources,
                if junk_on { &junk_clients[..] } else { &[] },
                &junk_names,
            )
            .await;
            let open_at_start = att.idle.open.load(Ordering::Relaxed);
            let open_secs = opened.elapsed().as_secs_f64();
            if !plan.warmup.is_zero() {
                run_load(&clients, &workload, plan.warmup, None, None).await?;
            }
            let closed0 = att.idle.closed.load(Ordering::Relaxed);
            let errors0 = att.idle.connect_errors.load(Ordering::Relaxed);
            let calls0 = att.junk.calls.load(Ordering::Relaxed);
            let codes0 = att.junk.codes();
            let a0 = file_len(&audit);
            // Samples the number of open idle connections while the legit load runs.
            let (sampling, mut sampling_rx) = watch::channel(false);
            let idle = att.idle.clone();
            let sampler = tokio::spawn(async move {
                let (mut sum, mut n) = (0u64, 0u64);
                loop {
                    sum += idle.open.load(Ordering::Relaxed);
                    n += 1;
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                        _ = sampling_rx.wait_for(|s| *s) => break,
                    }
                }
                sum as f64 / n.max(1) as f64
            });
            let s = run_load(
                &clients,
                &workload,
                plan.secs,
                plan.requests,
                Some(target.pid),
            )
            .await?;
            let _ = sampling.send(true);
            let open_avg = sampler.await?;
            let a1 = file_len(&audit);
            let mut junk_codes = att.junk.codes();
            for (c, n) in &codes0 {
                if let Some(v) = junk_codes.get_mut(c) {
                    *v -= n;
                }
            }
            junk_codes.retain(|_, n| *n > 0);
            let slot = WithSlot {
                open_avg,
                closed: att.idle.closed.load(Ordering::Relaxed) - closed0,
                connect_errors: att.idle.connect_errors.load(Ordering::Relaxed) - errors0,
                junk_calls: att.junk.calls.load(Ordering::Relaxed) - calls0,
                junk_codes,
                audit_bytes: a1.saturating_sub(a0),
            };
            let first_error = att
                .idle
                .first_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_default();
            att.stop().await;
            let secs = s.secs;
            let mut line = format!(
                "  [round {}] {:<36} {:>10}  p50 {:>9}  p99 {:>9}  errors {}",
                round + 1,
                label,
                fmt_rate(s.rate()),
                fmt_us(s.hist.value_at_quantile(0.5) as f64),
                fmt_us(s.hist.value_at_quantile(0.99) as f64),
                s.errors,
            );
            if idle_on {
                line += &format!(
                    "; idle: {open_at_start} open after {open_secs:.2} s, {:.0} on average, {} closed by the server ({}), {} connect errors{}",
                    slot.open_avg,
                    slot.closed,
                    fmt_rate(slot.closed as f64 / secs),
                    slot.connect_errors,
                    if first_error.is_empty() {
                        String::new()
                    } else {
                        format!(" (first: {first_error})")
                    },
                );
            }
            if junk_on {
                line += &format!(
                    "; junk: {} ({})",
                    fmt_rate(slot.junk_calls as f64 / secs),
                    show_codes(&slot.junk_codes)
                );
            }
            eprintln!("{line}");
            if i == 0 {
                without_audit.push(slot.audit_bytes as f64 / s.ok.max(1) as f64);
            }
            stats[i].push(slot);
            samples[i].push(s);
        }
    }
    let [without, with_samples, idle_only, junk_only]: [Vec<Sample>; 4] =
        samples.try_into().map_err(|_| "four arms")?;
    let with = std::mem::take(&mut stats[1]);
    let base = summarize(&without)?;
    let attacked = summarize(&with_samples)?;
    let r = Ratio::of(&attacked.rates, &base.rates);
    eprintln!("  frontdoor ratio: {}", r.show());
    let n = with.len().max(1) as f64;
    let secs: f64 = with_samples.iter().map(|s| s.secs).sum();
    let open_avg = with.iter().map(|w| w.open_avg).sum::<f64>() / n;
    let closed: u64 = with.iter().map(|w| w.closed).sum();
    let connect_errors: u64 = with.iter().map(|w| w.connect_errors).sum();
    let junk_calls: u64 = with.iter().map(|w| w.junk_calls).sum();
    let mut junk_codes: BTreeMap<&'static str, u64> = BTreeMap::new();
    for w in &with {
        for (c, k) in &w.junk_codes {
            *junk_codes.entry(c).or_default() += k;
        }
    }
    let legit_errors: u64 = with_samples.iter().map(|s| s.errors).sum();
    let first_legit_error = with_samples
        .iter()
        .find_map(|s| s.first_error.clone())
        .unwrap_or_default();
    // The audit log's growth beyond what the legit calls of the slot wrote (at the per-call
    // figure of the "without" slots), per junk call.
    let legit_audit = median(&without_audit);
    let junk_audit: f64 = with
        .iter()
        .zip(&with_samples)
        .map(|(w, s)| w.audit_bytes as f64 - s.ok as f64 * legit_audit)
        .sum::<f64>()
        / junk_calls.max(1) as f64;
    let attack = format!(
        "{} idle connections from {} source addresses ({open_avg:.0} open on average, {closed} closed by the server: {}; {connect_errors} connect errors) + junk flood from a certificate with no rights, {} tasks, GetSecret/ListSecrets with names of {}: {} ({})",
        opts.idle_connections,
        opts.idle_sources,
        fmt_rate(closed as f64 / secs.max(1e-9)),
        opts.junk_tasks,
        sizes.join(" and "),
        fmt_rate(junk_calls as f64 / secs.max(1e-9)),
        show_codes(&junk_codes),
    );
    rows.push(row(
        "frontdoor ratio (idle connections + junk flood / none)",
        r.show(),
        format!(
            "with attack: {}{}",
            attacked.describe(),
            if legit_errors > 0 {
                format!(", {legit_errors} legit calls failed (first: {first_legit_error})")
            } else {
                String::new()
            }
        ),
        format!("without: {}", base.describe()),
        verdict(r.median, 0.8),
    ));
    rows.push(row(
        "frontdoor: latency with / without",
        format!(
            "p50 {:.2}× p99 {:.2}×",
            attacked.p50 / base.p50,
            attacked.p99 / base.p99
        ),
        attack,
        "",
        "",
    ));
    for (name, arm) in [
        ("frontdoor: idle connections only / none", &idle_only),
        ("frontdoor: junk flood only / none", &junk_only),
    ] {
        let sum = summarize(arm)?;
        rows.push(row(
            name,
            Ratio::of(&sum.rates, &base.rates).show(),
            sum.describe(),
            "without (same run)",
            "",
        ));
    }
    rows.push(row(
        "frontdoor: audit log per junk call, under load",
        format!("{junk_audit:.0} B"),
        format!(
            "audit growth in the attack slots minus the legit calls' share ({legit_audit:.0} B per GetSecret, from the slots without)"
        ),
        "",
        "",
    ));
    for (kind, codes, per_audit, per_log) in calibration {
        rows.push(row(
            format!("frontdoor: junk {kind}, alone"),
            format!("audit +{per_audit:.0} B/call"),
            format!(
                "process log +{per_log:.0} B/call; {} of {CALIBRATION_CALLS} calls",
                show_codes(&codes)
            ),
            "",
            "",
        ));
    }
    Ok(())
}
