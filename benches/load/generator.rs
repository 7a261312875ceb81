//! The load generator: closed-loop clients, HDR histograms, rounds that alternate the arms
//! of a comparison, and paired per-round ratios.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use strongroom::proto::{GetSecretRequest, PutSecretRequest};

use crate::lab::{Client, Target, connect};
use crate::util::{Rng, cpu_secs, fmt_rate, fmt_us, median, min_max, new_hist, random_bytes};
use crate::{Res, fail};

#[derive(Clone)]
pub(crate) struct Workload {
    pub(crate) concurrency: usize,
    /// Percentage of GetSecret; the rest PutSecret.
    pub(crate) read_pct: u32,
    /// Names read (uniformly at random).
    pub(crate) read_names: Arc<Vec<String>>,
    /// The value length every read must return.
    pub(crate) expect_len: Option<usize>,
    /// Writes go to fresh names under this prefix.
    pub(crate) write_prefix: String,
    pub(crate) value_size: usize,
}

pub(crate) struct Sample {
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) secs: f64,
    pub(crate) hist: Histogram<u64>,
    pub(crate) server_cpu: Option<f64>,
    pub(crate) client_cpu: f64,
}

impl Sample {
    pub(crate) fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }
    pub(crate) fn server_cpu_us(&self) -> Option<f64> {
        self.server_cpu.map(|c| c * 1e6 / self.ok.max(1) as f64)
    }
    pub(crate) fn client_cpu_us(&self) -> f64 {
        self.client_cpu * 1e6 / self.ok.max(1) as f64
    }
}

pub(crate) static SLOT: AtomicU64 = AtomicU64::new(0);

/// Runs `w` against `clients` for `dur` (and at most `max_requests` requests); latencies in
/// microseconds.
pub(crate) async fn run_load(
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
                            protection: 0,
                            ..Default::default()
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
pub(crate) struct Arm {
    pub(crate) label: String,
    pub(crate) clients: Vec<Client>,
    pub(crate) workload: Workload,
    pub(crate) pid: Option<u32>,
}

impl Arm {
    pub(crate) async fn new(
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

pub(crate) struct Plan {
    pub(crate) secs: Duration,
    pub(crate) warmup: Duration,
    pub(crate) rounds: usize,
    pub(crate) requests: Option<u64>,
    pub(crate) perf: Option<PathBuf>,
}

/// Measures every arm once per round, in an order that rotates from round to round.
pub(crate) async fn interleave(arms: &[Arm], plan: &Plan) -> Res<Vec<Vec<Sample>>> {
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

pub(crate) struct Summary {
    pub(crate) rate: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) server_cpu_us: Option<f64>,
    pub(crate) client_cpu_us: f64,
    pub(crate) rates: Vec<f64>,
}

pub(crate) fn summarize(samples: &[Sample]) -> Res<Summary> {
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
    pub(crate) fn describe(&self) -> String {
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
pub(crate) struct Ratio {
    pub(crate) median: f64,
    pub(crate) lo: f64,
    pub(crate) hi: f64,
}

impl Ratio {
    pub(crate) fn of(a: &[f64], b: &[f64]) -> Self {
        let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        let (lo, hi) = min_max(&r);
        Self {
            median: median(&r),
            lo,
            hi,
        }
    }
    pub(crate) fn show(&self) -> String {
        format!("{:.3} ({:.3}–{:.3})", self.median, self.lo, self.hi)
    }
}
