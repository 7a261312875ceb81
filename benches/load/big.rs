//! The big-store part: a child role (`populate`) seals records under the token's master key
//! and writes them straight into sled; GetSecret on that store versus a small one.

use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;

use strongroom::envelope;
use strongroom::hsm::{Hsm, HsmOptions, TokenSelector};
use strongroom::proto::HeadV1;
use strongroom::secret::{Mechanism as RecordMechanism, SealedRecord, SecretName};

use crate::cli::PopulateArgs;
use crate::generator::{Arm, Plan, Ratio, Summary, Workload, interleave, run_load, summarize};
use crate::lab::{Lab, connect, run_child};
use crate::p11::user_pin;
use crate::parts::reads;
use crate::report::{Row, row};
use crate::util::{dir_size, exit_with_parent, fmt_mib, fmt_rate, random_bytes, runtime, vm_kib};
use crate::{CLIENT_ID, Res, fail};

/// Writes `count` secrets (version 1 each) into a sled store with the key layout that
/// `strongroom::store::SledStore` documents, each value sealed under its own data key that
/// the token wrapped (C_Encrypt under the master key): the records are what PutSecret
/// would have stored, minus the per-record fsync.
pub(crate) fn populate(a: PopulateArgs) -> Res<()> {
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
            ..Default::default()
        }
        .encode_to_vec();
        while let Some((name, record)) = rx.blocking_recv() {
            let (hk, rk) = version_one_keys(&name);
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
    seal_records(&rt, &hsm, mk, &a.prefix, a.count, a.value_size, tx)?;
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

pub(crate) async fn part_big(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
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

/// The sled keys of `name`'s head and of its version 1, in the layout `SledStore` documents
/// (etcd's under its prefix): `h` + name, and `r` + name + 0 + the version, big-endian.
pub(crate) fn version_one_keys(name: &str) -> (Vec<u8>, Vec<u8>) {
    let mut hk = vec![b'h'];
    hk.extend_from_slice(name.as_bytes());
    let mut rk = vec![b'r'];
    rk.extend_from_slice(name.as_bytes());
    rk.push(0);
    rk.extend_from_slice(&1u64.to_be_bytes());
    (hk, rk)
}

/// Seals `count` records `prefix/0000000`… (version 1, one random value of `value_size`
/// bytes, each under its own data key that the token wrapped under master key `mk`) on 64
/// tasks, and sends each name with its encoded record to `tx`: the records PutSecret would
/// have stored. Both populate roles write what this sends.
pub(crate) fn seal_records(
    rt: &tokio::runtime::Runtime,
    hsm: &Arc<Hsm>,
    mk: u32,
    prefix: &str,
    count: usize,
    value_size: usize,
    tx: tokio::sync::mpsc::Sender<(String, Vec<u8>)>,
) -> Res<()> {
    let tasks = 64;
    let value = Arc::new(random_bytes(value_size));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    rt.block_on(async {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let (hsm, tx, value, prefix) =
                (hsm.clone(), tx.clone(), value.clone(), prefix.to_owned());
            handles.push(tokio::spawn(async move {
                let mut i = t;
                while i < count {
                    let name = format!("{prefix}/{i:07}");
                    let parsed = SecretName::parse(&name, 1024)?;
                    let aad = envelope::record_aad_v1(&parsed, 1, mk);
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
                        ..Default::default()
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
    Ok(())
}
