//! The hsm part: `Hsm::unwrap_data_key` from many tasks versus a raw C_Decrypt loop, run in
//! a child process (`hsm-bench`) with a PKCS#11 context of its own.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use hdrhistogram::Histogram;

use strongroom::envelope;
use strongroom::hsm::{Hsm, HsmOptions, TokenSelector};
use strongroom::secret::SecretName;

use crate::cli::HsmBenchArgs;
use crate::generator::{Plan, Ratio};
use crate::lab::{Lab, run_child};
use crate::p11::{check_dek, find_master_key, find_slot, raw_decrypt, user_pin};
use crate::report::{Row, row, verdict};
use crate::util::{cpu_secs, exit_with_parent, fmt_rate, median, new_hist, runtime};
use crate::{Res, fail};

#[derive(Default)]
pub(crate) struct HsmArm {
    pub(crate) rates: Vec<f64>,
    pub(crate) cpu_per_op_us: Vec<f64>,
    pub(crate) hist: Option<Histogram<u64>>,
}

impl HsmArm {
    pub(crate) fn add(&mut self, ops: u64, secs: f64, cpu: f64, hist: Histogram<u64>) -> Res<()> {
        self.rates.push(ops as f64 / secs);
        self.cpu_per_op_us.push(cpu * 1e6 / ops.max(1) as f64);
        match &mut self.hist {
            Some(h) => h.add(&hist)?,
            None => self.hist = Some(hist),
        }
        Ok(())
    }
}

pub(crate) fn hsm_bench(a: HsmBenchArgs) -> Res<()> {
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
        let aad = envelope::record_aad_v1(&name, 1, mk);
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

pub(crate) async fn part_hsm(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
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
