//! The scale part: a million secrets on sled and on etcd, filled through the store API, read
//! through a real strongroomd; GetSecret p50 against a 1K store and the server's VmRSS, and
//! GetSecret / PutSecret on etcd against sled, each pair measured in the same run.
//!
//! The store is filled by a child role (`scale-populate`: C_Initialize happens once per
//! process) that seals every record exactly as PutSecret does — its own data key, wrapped by
//! the token under the master key with the record's AAD (name, version, master key version),
//! AES-GCM with a fresh nonce — and hands the records to [`Store::import_raw`] in batches,
//! then [`Store::rebase_state`] computes the store's commitment, so strongroomd's start check
//! accepts it as its own. What it skips is PutSecret's per-record fsync and RPC.
//!
//! etcd here is one member (`etcd` from Debian's `etcd-server`, mutual TLS from its own CA)
//! on the same machine; the small and the big store share it under different prefixes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use prost::Message;

use strongroom::hsm::keys::{MacKey, derive_key};
use strongroom::hsm::{Hsm, HsmOptions, TokenSelector};
use strongroom::proto::HeadV1;
use strongroom::store::{EtcdOptions, EtcdStore, STATE_KEY_DOMAIN, SledStore, StateKey, Store};
use strongroom_devpki::DevCa;

use crate::big::{seal_records, version_one_keys};
use crate::generator::{Arm, Plan, Ratio, Summary, Workload, interleave, run_load, summarize};
use crate::lab::{Lab, Target, connect, run_child};
use crate::p11::user_pin;
use crate::parts::reads;
use crate::report::{Row, row};
use crate::util::{exit_with_parent, fmt_mib, fmt_rate, runtime, vm_kib};
use crate::{Res, fail};

/// Records per `import_raw` call (two keys each: head and record).
const BATCH: usize = 2000;
/// The RSS a replica must stay within at a million secrets (issue 9).
const RSS_TARGET_MIB: f64 = 256.0;
/// The p50 ratio 1M / 1K the issue asks for.
const P50_TARGET: f64 = 1.2;

#[derive(Args)]
pub(crate) struct ScalePopulateArgs {
    #[arg(long)]
    pub(crate) module: PathBuf,
    #[arg(long)]
    pub(crate) label: String,
    /// `sled:PATH` or `etcd:URL,PREFIX,PKI_DIR`.
    #[arg(long)]
    pub(crate) store: String,
    #[arg(long)]
    pub(crate) count: usize,
    #[arg(long)]
    pub(crate) value_size: usize,
    #[arg(long)]
    pub(crate) prefix: String,
}

/// Opens the store the `--store` argument names (off any async runtime: the etcd client runs
/// its own).
fn open_store(spec: &str, key: StateKey) -> Res<Arc<dyn Store>> {
    if let Some(path) = spec.strip_prefix("sled:") {
        return Ok(Arc::new(SledStore::open_with_cache(
            Path::new(path),
            64,
            key,
        )?));
    }
    let Some(rest) = spec.strip_prefix("etcd:") else {
        return fail(format!("--store {spec}: sled:PATH or etcd:URL,PREFIX,PKI"));
    };
    let parts: Vec<&str> = rest.split(',').collect();
    let [url, prefix, pki] = parts[..] else {
        return fail(format!("--store {spec}: etcd:URL,PREFIX,PKI"));
    };
    let pki = Path::new(pki);
    Ok(Arc::new(EtcdStore::open(
        EtcdOptions {
            endpoints: vec![url.to_owned()],
            ca: pki.join("etcd-ca.pem"),
            cert: pki.join("etcd-client.pem"),
            key: pki.join("etcd-client-key.pem"),
            prefix: prefix.to_owned(),
            timeout: Duration::from_secs(60),
            // strongroomd's default `[limits] max_value_bytes`: it sizes the range calls of
            // the commitment scan (a larger ceiling means fewer records per call).
            max_value_bytes: 64 << 10,
        },
        key,
    )?))
}

/// The `scale-populate` child role: seals `count` records (version 1 each) and imports them.
pub(crate) fn scale_populate(a: ScalePopulateArgs) -> Res<()> {
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
    let state_key = rt.block_on(derive_key(
        &hsm,
        MacKey::Store,
        STATE_KEY_DOMAIN,
        Duration::from_secs(30),
    ))?;
    let store = open_store(&a.store, StateKey::new(&state_key))?;
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, Vec<u8>)>(8192);
    let writer_store = store.clone();
    let writer = std::thread::spawn(move || -> Res<()> {
        let head = HeadV1 {
            latest_version: 1,
            deleted: false,
            ..Default::default()
        }
        .encode_to_vec();
        let mut batch: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::with_capacity(2 * BATCH);
        let mut written = 0usize;
        let mut flush = |batch: &mut Vec<(Vec<u8>, Option<Vec<u8>>)>| -> Res<()> {
            writer_store.import_raw(batch)?;
            written += batch.len() / 2;
            batch.clear();
            if written % 100_000 == 0 {
                eprintln!(
                    "  scale-populate: {written} records in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(())
        };
        while let Some((name, record)) = rx.blocking_recv() {
            // The common key layout (sled's own; etcd's under its prefix).
            let (hk, rk) = version_one_keys(&name);
            batch.push((hk, Some(head.clone())));
            batch.push((rk, Some(record)));
            if batch.len() >= 2 * BATCH {
                flush(&mut batch)?;
            }
        }
        if !batch.is_empty() {
            flush(&mut batch)?;
        }
        Ok(())
    });
    seal_records(&rt, &hsm, mk, &a.prefix, a.count, a.value_size, tx)?;
    writer.join().map_err(|_| "the writer panicked")??;
    // The wrap counter the service keeps per master key (`w` + version).
    let mut wk = vec![b'w'];
    wk.extend_from_slice(&mk.to_be_bytes());
    store.import_raw(&[(wk, Some((a.count as u64).to_be_bytes().to_vec()))])?;
    let fill_secs = started.elapsed().as_secs_f64();
    let t = Instant::now();
    let state = store.rebase_state()?;
    let commit_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "  scale-populate: {} records in {fill_secs:.1} s ({}), commitment in {commit_secs:.1} s (epoch {})",
        a.count,
        fmt_rate(a.count as f64 / fill_secs),
        state.epoch
    );
    println!(
        "RESULT {}",
        serde_json::json!({ "count": a.count, "secs": fill_secs, "commit_secs": commit_secs })
    );
    drop(store);
    // As in hsm-bench: no teardown race with SoftHSM2's exit-time destructors.
    std::process::exit(0)
}

/// `STRONGROOM_BENCH_SCALE_BINARIES` (`LABEL=PATH,...`): the strongroomd binaries the sled
/// part measures one after the other on the same 1M store; by default one, `--strongroomd`'s.
fn scale_binaries() -> Res<Vec<(String, Option<PathBuf>)>> {
    let Ok(list) = std::env::var("STRONGROOM_BENCH_SCALE_BINARIES") else {
        return Ok(vec![(String::new(), None)]);
    };
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((label, path)) = item.split_once('=') else {
            return fail(format!(
                "STRONGROOM_BENCH_SCALE_BINARIES: {item}: LABEL=PATH"
            ));
        };
        out.push((label.to_owned(), Some(PathBuf::from(path))));
    }
    Ok(out)
}

/// Starts (or restarts) the big server on its filled store, reads 200 names back, and
/// measures GetSecret on it against the 1K server in rotating rounds; pushes the p50 and the
/// VmRSS rows under `tag`.
#[allow(clippy::too_many_arguments)]
async fn measure_big(
    lab: &mut Lab,
    plan: &Plan,
    rows: &mut Vec<Row>,
    tag: &str,
    big_name: &str,
    n1: usize,
    vs: usize,
    small: &Target,
    small_names: &Arc<Vec<String>>,
) -> Res<()> {
    let opts = lab.opts.clone();
    let started = Instant::now();
    let big = lab.strongroomd(big_name, true, &opts.server_log, None)?;
    let start_secs = started.elapsed().as_secs_f64();
    let rss_start = vm_kib(big.pid, "VmRSS:").unwrap_or(0);
    let big_names: Arc<Vec<String>> =
        Arc::new((0..n1).map(|i| format!("bench/big/{i:07}")).collect());
    // Records the child imported must read back through the API.
    let check = Workload {
        concurrency: 8,
        expect_len: Some(vs),
        ..reads(&big_names, &opts)
    };
    let clients = connect(&big.addr, &lab.pki, 2).await?;
    let s = run_load(&clients, &check, Duration::from_secs(30), Some(200), None).await?;
    if s.errors > 0 || s.ok == 0 {
        return fail(format!(
            "records imported into the {tag} store do not read back: {:?}",
            s.first_error
        ));
    }
    let mut wl_big = reads(&big_names, &opts);
    wl_big.expect_len = Some(vs);
    let arms = vec![
        Arm::new(
            format!("{tag} GetSecret, {n1}"),
            &big,
            &lab.pki,
            opts.connections,
            wl_big,
        )
        .await?,
        Arm::new(
            format!("{tag} GetSecret, {}", small_names.len()),
            small,
            &lab.pki,
            opts.connections,
            reads(small_names, &opts),
        )
        .await?,
    ];
    let samples = interleave(&arms, plan).await?;
    let sums: Vec<Summary> = samples.iter().map(|s| summarize(s)).collect::<Res<_>>()?;
    let (b, s) = (&sums[0], &sums[1]);
    let rss_big = vm_kib(big.pid, "VmRSS:").unwrap_or(0);
    let hwm_big = vm_kib(big.pid, "VmHWM:").unwrap_or(0);
    let rss_small = vm_kib(small.pid, "VmRSS:").unwrap_or(0);
    let p50 = b.p50 / s.p50;
    let peak_mib = hwm_big as f64 / 1024.0;
    rows.push(row(
        format!(
            "{tag}: GetSecret p50, {n1} vs {} secrets",
            small_names.len()
        ),
        format!(
            "p50 {p50:.2}× p99 {:.2}×; throughput {}",
            b.p99 / s.p99,
            Ratio::of(&b.rates, &s.rates).show()
        ),
        format!("{n1}: {}", b.describe()),
        format!("{}: {}", small_names.len(), s.describe()),
        format!(
            "p50 ≤ {P50_TARGET}× {}",
            if p50 <= P50_TARGET { "✔" } else { "✘" }
        ),
    ));
    rows.push(row(
        format!("{tag}: strongroomd VmRSS at {n1} secrets"),
        format!("{} (peak VmHWM {})", fmt_mib(rss_big), fmt_mib(hwm_big)),
        format!(
            "after the reads; {} just after start (start {start_secs:.2} s)",
            fmt_mib(rss_start)
        ),
        format!("{} secrets: {}", small_names.len(), fmt_mib(rss_small)),
        format!(
            "peak ≤ {RSS_TARGET_MIB} MiB {}",
            if peak_mib <= RSS_TARGET_MIB {
                "✔"
            } else {
                "✘"
            }
        ),
    ));
    Ok(())
}

/// An etcd cluster (one member or more) over mutual TLS, killed on drop.
struct Etcd {
    /// The members' client URLs.
    urls: Vec<String>,
    /// The first member's client URL.
    url: String,
    pki: PathBuf,
    children: Vec<Child>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `members` etcd members under `root/dir` (client mutual TLS from their own CA, peers
/// over plain HTTP on loopback) and waits until each serves clients.
fn start_etcd(root: &Path, dir: &str, members: usize) -> Res<Etcd> {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join(dir);
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki)?;
    let ca = DevCa::new("bench etcd CA")?;
    let server = ca.issue_server(&["localhost", "127.0.0.1"])?;
    let client = ca.issue_client("strongroomd.etcd.bench")?;
    for (name, body) in [
        ("etcd-ca.pem", ca.cert_pem()),
        ("etcd-server.pem", server.cert_pem),
        ("etcd-server-key.pem", server.key_pem),
        ("etcd-client.pem", client.cert_pem),
        ("etcd-client-key.pem", client.key_pem),
    ] {
        std::fs::write(pki.join(name), body)?;
        if name.ends_with("-key.pem") {
            std::fs::set_permissions(pki.join(name), std::fs::Permissions::from_mode(0o600))?;
        }
    }
    'attempt: for _ in 0..5 {
        let mut ports = Vec::new();
        for _ in 0..members {
            ports.push((free_port()?, free_port()?));
        }
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, pp))| format!("m{i}=http://127.0.0.1:{pp}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            urls: Vec::new(),
            url: String::new(),
            pki: pki.clone(),
            children: Vec::new(),
        };
        let mut logs = Vec::new();
        for (i, (cp, pp)) in ports.iter().enumerate() {
            let url = format!("https://127.0.0.1:{cp}");
            let peer = format!("http://127.0.0.1:{pp}");
            let log = dir.join(format!("etcd-m{i}.log"));
            let _ = std::fs::remove_dir_all(dir.join(format!("data-m{i}")));
            let p = |n: &str| pki.join(n);
            let child = Command::new("etcd")
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(dir.join(format!("data-m{i}")))
                .args([
                    "--listen-client-urls",
                    &url,
                    "--advertise-client-urls",
                    &url,
                ])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &cluster])
                .arg("--cert-file")
                .arg(p("etcd-server.pem"))
                .arg("--key-file")
                .arg(p("etcd-server-key.pem"))
                .arg("--trusted-ca-file")
                .arg(p("etcd-ca.pem"))
                .arg("--client-cert-auth")
                // A million 1 KiB records are ~1.4 GiB of values: above the default 2 GiB
                // quota once etcd's own overhead is counted.
                .args(["--quota-backend-bytes", "8589934592"])
                .args(["--max-request-bytes", "33554432", "--logger", "zap"])
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&log)?)
                .stderr(std::fs::OpenOptions::new().append(true).open(&log)?)
                .spawn()
                .map_err(|e| format!("spawn etcd (scripts/deps.sh installs etcd-server): {e}"))?;
            etcd.children.push(child);
            etcd.urls.push(url);
            logs.push(log);
        }
        etcd.url = etcd.urls[0].clone();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = logs.iter().all(|log| {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                text.contains("serving client traffic securely")
                    || text.contains("ready to serve client requests")
            });
            if ready {
                eprintln!(
                    "  started etcd ({members} member(s), mutual TLS) on {}",
                    etcd.urls.join(",")
                );
                return Ok(etcd);
            }
            let died = etcd
                .children
                .iter_mut()
                .any(|c| matches!(c.try_wait(), Ok(Some(_))));
            if died || Instant::now() > deadline {
                // Dropped: every member killed; try other ports.
                continue 'attempt;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fail(format!(
        "etcd did not start:\n{}",
        std::fs::read_to_string(dir.join("etcd-m0.log")).unwrap_or_default()
    ))
}

/// The `[store]` body of a strongroomd on `etcd` under `prefix`.
fn etcd_section(etcd: &Etcd, prefix: &str) -> String {
    let pki = etcd.pki.display();
    let endpoints = etcd
        .urls
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "backend = \"etcd\"\nendpoints = [{endpoints}]\nprefix = \"{prefix}\"\nca = \"{pki}/etcd-ca.pem\"\ncert = \"{pki}/etcd-client.pem\"\nkey = \"{pki}/etcd-client-key.pem\"\netcd_timeout_ms = 10000"
    )
}

/// Which backends the part measures: `STRONGROOM_BENCH_SCALE_BACKENDS` (`sled,etcd` by
/// default).
fn backends() -> Vec<String> {
    std::env::var("STRONGROOM_BENCH_SCALE_BACKENDS")
        .unwrap_or_else(|_| "sled,etcd".into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

struct Side {
    small: Target,
    small_names: Arc<Vec<String>>,
}

pub(crate) async fn part_scale(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
    let opts = lab.opts.clone();
    let n1 = opts
        .big_secrets
        .unwrap_or(if opts.quick { 50_000 } else { 1_000_000 });
    let vs = opts.big_value_size.unwrap_or(opts.value_size);
    let mut etcd: Option<Etcd> = None;
    let mut sides: Vec<(String, Side)> = Vec::new();
    for backend in backends() {
        let (small_name, big_name) = (format!("{backend}-1k"), format!("{backend}-big"));
        let spec = match backend.as_str() {
            "sled" => {
                // STRONGROOM_BENCH_SCALE_CACHE_MB: the big server's cache_capacity_mb (default:
                // strongroomd's own).
                if let Ok(mb) = std::env::var("STRONGROOM_BENCH_SCALE_CACHE_MB") {
                    lab.store_sections.insert(
                        big_name.clone(),
                        format!("path = \"store\"\ncache_capacity_mb = {mb}"),
                    );
                }
                let store = lab.root.join(format!("srv-{big_name}")).join("store");
                std::fs::create_dir_all(&store)?;
                format!("sled:{}", store.display())
            }
            "etcd" => {
                let e = tokio::task::block_in_place(|| start_etcd(&lab.root, "etcd", 1))?;
                lab.store_sections
                    .insert(small_name.clone(), etcd_section(&e, "small/"));
                lab.store_sections
                    .insert(big_name.clone(), etcd_section(&e, "big/"));
                let spec = format!("etcd:{},big/,{}", e.url, e.pki.display());
                etcd = Some(e);
                spec
            }
            other => return fail(format!("STRONGROOM_BENCH_SCALE_BACKENDS: unknown {other}")),
        };
        eprintln!(
            "\n== scale on {backend}: GetSecret on {n1} secrets vs {}, VmRSS",
            opts.secrets
        );
        // The 1K store, written through PutSecret before the big store is filled.
        lab.read_server(&small_name, true, &opts.server_log, None)
            .await?;
        let token = lab.token(&format!("sr-{big_name}"))?;
        let mut cmd = Command::new(std::env::current_exe()?);
        lab.token_env(&mut cmd, &token);
        cmd.arg("scale-populate")
            .arg("--module")
            .arg(&opts.module)
            .args(["--label", &token.label])
            .args(["--store", &spec])
            .args(["--count", &n1.to_string()])
            .args(["--value-size", &vs.to_string()])
            .args(["--prefix", "bench/big"]);
        let started = Instant::now();
        tokio::task::block_in_place(|| run_child(cmd))?;
        let populate_secs = started.elapsed().as_secs_f64();
        // STRONGROOM_BENCH_SCALE_BINARIES=LABEL=PATH,...: measure each strongroomd binary
        // (e.g. two allocators) on the same filled store and token, one after the other,
        // each against its own binary's 1K server (restarted on the same 1K store).
        let binaries = scale_binaries()?;
        for (i, (label, bin)) in binaries.iter().enumerate() {
            lab.procs.remove(&big_name);
            if let Some(bin) = bin {
                lab.procs.remove(&small_name);
                lab.opts.strongroomd = Some(bin.clone());
            }
            let tag = if label.is_empty() {
                backend.clone()
            } else {
                format!("{backend} [{label}]")
            };
            let (small, small_names) = lab
                .read_server(&small_name, true, &opts.server_log, None)
                .await?;
            measure_big(
                lab,
                plan,
                rows,
                &tag,
                &big_name,
                n1,
                vs,
                &small,
                &small_names,
            )
            .await?;
            if i == 0 {
                rows.push(row(
                    format!("{backend}: filling {n1} secrets"),
                    format!(
                        "{populate_secs:.0} s ({})",
                        fmt_rate(n1 as f64 / populate_secs)
                    ),
                    "sealed per record (token-wrapped data key), Store::import_raw + rebase_state",
                    "",
                    "",
                ));
            }
        }
        if binaries.iter().any(|(_, b)| b.is_some()) {
            lab.procs.remove(&small_name);
            lab.opts.strongroomd = opts.strongroomd.clone();
        }
        let (small, small_names) = lab
            .read_server(&small_name, true, &opts.server_log, None)
            .await?;
        // The big server is done: free its memory (and sled's files) for what follows.
        lab.procs.remove(&big_name);
        sides.push((backend, Side { small, small_names }));
    }
    // etcd versus sled, same run: reads and durable writes on the two 1K servers.
    let (Some((_, sled)), Some((_, et))) = (
        sides.iter().find(|(b, _)| b == "sled"),
        sides.iter().find(|(b, _)| b == "etcd"),
    ) else {
        return Ok(());
    };
    // The same on a 3-member cluster (STRONGROOM_BENCH_SCALE_ETCD_MEMBERS), whose writes are
    // committed by a quorum: what a replica set pays.
    let members: usize = std::env::var("STRONGROOM_BENCH_SCALE_ETCD_MEMBERS")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(3);
    let cluster = tokio::task::block_in_place(|| start_etcd(&lab.root, "etcd-cluster", members))?;
    let cluster_name = format!("etcd{members}-1k");
    lab.store_sections
        .insert(cluster_name.clone(), etcd_section(&cluster, "small/"));
    let (cl_small, cl_names) = lab
        .read_server(&cluster_name, true, &opts.server_log, None)
        .await?;
    eprintln!("\n== etcd (1 member, {members} members) vs sled: GetSecret and PutSecret");
    let put = |prefix: &str| Workload {
        read_pct: 0,
        write_prefix: prefix.into(),
        ..reads(&sled.small_names, &opts)
    };
    let arms = vec![
        Arm::new(
            "etcd GetSecret",
            &et.small,
            &lab.pki,
            opts.connections,
            reads(&et.small_names, &opts),
        )
        .await?,
        Arm::new(
            format!("etcd ({members}) GetSecret"),
            &cl_small,
            &lab.pki,
            opts.connections,
            reads(&cl_names, &opts),
        )
        .await?,
        Arm::new(
            "sled GetSecret",
            &sled.small,
            &lab.pki,
            opts.connections,
            reads(&sled.small_names, &opts),
        )
        .await?,
        Arm::new(
            "etcd PutSecret",
            &et.small,
            &lab.pki,
            opts.connections,
            put("bench/w/etcd"),
        )
        .await?,
        Arm::new(
            format!("etcd ({members}) PutSecret"),
            &cl_small,
            &lab.pki,
            opts.connections,
            put("bench/w/etcd3"),
        )
        .await?,
        Arm::new(
            "sled PutSecret",
            &sled.small,
            &lab.pki,
            opts.connections,
            put("bench/w/sled"),
        )
        .await?,
    ];
    let samples = interleave(&arms, plan).await?;
    let sums: Vec<Summary> = samples.iter().map(|s| summarize(s)).collect::<Res<_>>()?;
    for (what, e, s) in [
        ("etcd (1 member) / sled: GetSecret", &sums[0], &sums[2]),
        (
            &format!("etcd ({members} members) / sled: GetSecret") as &str,
            &sums[1],
            &sums[2],
        ),
        ("etcd (1 member) / sled: PutSecret", &sums[3], &sums[5]),
        (
            &format!("etcd ({members} members) / sled: PutSecret"),
            &sums[4],
            &sums[5],
        ),
    ] {
        rows.push(row(
            format!("{what}, c={}", opts.concurrency),
            format!(
                "throughput {}; p50 {:.2}×",
                Ratio::of(&e.rates, &s.rates).show(),
                e.p50 / s.p50
            ),
            format!("etcd: {}", e.describe()),
            format!("sled: {}", s.describe()),
            "",
        ));
    }
    lab.procs.remove(&cluster_name);
    drop(cluster);
    drop(etcd);
    Ok(())
}
