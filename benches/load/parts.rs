//! Parts measured by the load generator alone: audit/floor reads, put, diag and custom.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use strongroom::secret::{Mechanism as RecordMechanism, SealedRecord};

use crate::cli::{CustomTarget, Opts, Part};
use crate::generator::{Arm, Plan, Ratio, Summary, Workload, interleave, summarize};
use crate::lab::Lab;
use crate::report::{Row, row, verdict};
use crate::util::{cpu_secs, fmt_rate};
use crate::{CLIENT_ID, FLOOR_DURABLE, FLOOR_NOTOKEN, FLOOR_TOKEN, FLOOR_WORKER, Res, fail};

pub(crate) fn reads(names: &Arc<Vec<String>>, opts: &Opts) -> Workload {
    Workload {
        concurrency: opts.concurrency,
        read_pct: 100,
        read_names: names.clone(),
        expect_len: Some(opts.value_size),
        write_prefix: "bench/w".into(),
        value_size: opts.value_size,
    }
}

pub(crate) async fn part_reads(
    lab: &mut Lab,
    plan: &Plan,
    parts: &[Part],
    rows: &mut Vec<Row>,
) -> Res<()> {
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
    // A second audited strongroomd (another binary, or other environment), alternated with
    // the others: before/after comparisons in one run.
    let compared = (opts.compare_strongroomd.is_some()
        || !opts.compare_env.is_empty()
        || opts.compare_audit.is_some())
    .then_some(arms.len());
    if compared.is_some() {
        let mut env = Vec::new();
        for pair in &opts.compare_env {
            let Some((k, v)) = pair.split_once('=') else {
                return fail(format!("--compare-env wants NAME=VALUE, not {pair:?}"));
            };
            env.push((k.to_owned(), v.to_owned()));
        }
        lab.launches.insert(
            "cmp".into(),
            crate::lab::Launch {
                bin: opts.compare_strongroomd.clone(),
                env,
                audit_lines: opts.compare_audit.clone().unwrap_or_default(),
            },
        );
        let (cmp, names) = lab.read_server("cmp", true, &opts.server_log, None).await?;
        arms.push(
            Arm::new(
                "strongroomd audit on, compared",
                &cmp,
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
    if let Some(c) = compared {
        let cmp = &sums[c];
        let what = format!(
            "{}{}",
            opts.compare_strongroomd
                .as_ref()
                .map_or("the same binary".into(), |b| b.display().to_string()),
            if opts.compare_env.is_empty() {
                String::new()
            } else {
                format!(" with {}", opts.compare_env.join(" "))
            }
        ) + &opts
            .compare_audit
            .as_ref()
            .map_or(String::new(), |a| format!(", [audit] {a}"));
        rows.push(row(
            "audit on: this build / compared",
            Ratio::of(&on.rates, &cmp.rates).show(),
            format!("this build: {}", on.describe()),
            format!("compared ({what}): {}", cmp.describe()),
            "",
        ));
        if floor {
            let durable = &sums[arms.len() - 1];
            rows.push(row(
                "compared vs durable floor",
                Ratio::of(&cmp.rates, &durable.rates).show(),
                format!("compared ({what})"),
                "floor + durable line",
                verdict(Ratio::of(&cmp.rates, &durable.rates).median, 0.95),
            ));
        }
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
            verdict(rd.median, 0.95),
        ));
        if let (Some(d), Some(o)) = (durable.server_cpu_us, on.server_cpu_us) {
            rows.push(row(
                "durable floor, server CPU per request",
                format!("{:.2}", d / o),
                format!("strongroomd audit on: {o:.0} µs/req"),
                format!("durable floor: {d:.0} µs/req"),
                "(durable floor CPU / strongroomd CPU)",
            ));
        }
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

pub(crate) async fn part_put(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
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
pub(crate) fn store_stage(
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
                    ..Default::default()
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

pub(crate) async fn part_diag(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
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

pub(crate) async fn part_custom(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
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
