//! The `rewrap` part: the re-wrap job's rate against the raw token's unwrap+wrap rate, and
//! GetSecret's p50 while a re-wrap runs against without, one `strongroomd`, same run.
//!
//! The server gets an admin plane with one officer (`dangerous_single_officer`, allowed under
//! `STRONGROOM_BENCHMARK=1`), so a rotation and a re-wrap run on one request. The raw rate
//! is a loop of C_Decrypt (the old wrapping) + C_Encrypt (the new one) of a 32-byte data key
//! under the server's own master key, on one session of this process, while the server is
//! idle.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, ObjectClass};
use tonic::transport::{Channel, Endpoint};

use strongroom::proto::admin_service_client::AdminServiceClient;
use strongroom::proto::{
    GetSecretRequest, PutSecretRequest, RewrapRequest, RotateMasterKeyRequest, WatchRewrapRequest,
};

use crate::generator::Plan;
use crate::lab::{Lab, connect};
use crate::p11::{find_slot, login, pkcs11_init};
use crate::report::{Row, row, verdict};
use crate::util::{fmt_rate, new_hist, random_bytes};
use crate::{Res, fail};

const NAME: &str = "rewrap";

pub(crate) async fn part_rewrap(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
    let opts = lab.opts.clone();
    let records = opts.secrets.max(10_000);
    eprintln!(
        "\n== re-wrap of {records} records vs raw token unwrap+wrap; GetSecret p50 during re-wrap vs without"
    );
    let admin_pki = lab.root.join("admin-pki");
    std::fs::create_dir_all(&admin_pki)?;
    strongroom_devpki::write_dev_pki(&admin_pki, &[])?;
    let lines = format!(
        "\n[admin]\nlisten = \"127.0.0.1:0\"\ncert = \"{pki}/server.pem\"\nkey = \"{pki}/server-key.pem\"\n\
         ca = \"{a}/admin-ca.pem\"\nofficers = [\"{o}\"]\nquorum = 1\ndangerous_single_officer = true\n",
        pki = lab.pki.display(),
        a = admin_pki.display(),
        o = strongroom_devpki::DEV_OFFICER,
    );
    let server = lab.strongroomd_with(NAME, true, &opts.server_log, None, &lines)?;
    let admin_addr = {
        let proc = lab.procs.get_mut(NAME).ok_or("no server")?;
        match proc._stdout.next() {
            Some(Ok(l)) if l.starts_with("admin listening on ") => {
                l["admin listening on ".len()..].to_owned()
            }
            other => return fail(format!("no admin listener line: {other:?}")),
        }
    };
    let tls = strongroom::tls::client_config(
        &lab.pki.join("server-ca.pem"),
        &admin_pki.join("officer.pem"),
        &admin_pki.join("officer-key.pem"),
        "localhost",
    )?;
    let channel: Channel = Endpoint::from_shared(format!("https://{admin_addr}"))?
        .tls_config(tls)?
        .timeout(Duration::from_secs(120))
        .connect()
        .await?;
    let mut admin = AdminServiceClient::new(channel);
    let clients = connect(&server.addr, &lab.pki, 4).await?;

    // The records, sealed under version 1.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..16usize {
        let mut c = clients[t % clients.len()].clone();
        let value = random_bytes(opts.value_size);
        tasks.spawn(async move {
            for i in (t..records).step_by(16) {
                c.put_secret(PutSecretRequest {
                    name: format!("bench/rw/{i:07}"),
                    value: value.clone(),
                    ..Default::default()
                })
                .await?;
            }
            Res::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    eprintln!(
        "  wrote {records} secrets in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The raw token rate, on the server's token and master key, server idle.
    let token = lab.token(&format!("sr-{NAME}"))?;
    let raw = {
        let conf = token.conf.clone();
        let label = token.label.clone();
        let module = opts.module.clone();
        let secs = plan.secs.as_secs_f64();
        tokio::task::spawn_blocking(move || raw_rate(&module, &conf, &label, secs)).await??
    };
    eprintln!(
        "  raw C_Decrypt + C_Encrypt of a data key: {}",
        fmt_rate(raw)
    );

    // Re-wrap as fast as the job goes (no client load): records per second, end to end.
    admin.rotate_master_key(RotateMasterKeyRequest {}).await?;
    // `--perf DIR`: a profile of the server for the whole unlimited re-wrap.
    let perf = match &plan.perf {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            let p = std::process::Command::new("perf")
                .args(["record", "-e", "cpu-clock", "-F", "999", "-g", "-p"])
                .arg(server.pid.to_string())
                .arg("-o")
                .arg(dir.join("rewrap.data"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            Some(p)
        }
        None => None,
    };
    let rate = rewrap(&mut admin, u32::MAX).await;
    if let Some(mut p) = perf {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &p.id().to_string()])
            .status();
        let _ = p.wait();
    }
    let rate = rate?;
    let ratio = rate / raw;
    eprintln!("  re-wrap: {}, {ratio:.2} of raw", fmt_rate(rate));
    rows.push(row(
        "re-wrap rate / raw token unwrap+wrap",
        format!("{ratio:.2}"),
        format!("re-wrap {records} records: {}", fmt_rate(rate)),
        format!("raw C_Decrypt+C_Encrypt, 1 session: {}", fmt_rate(raw)),
        verdict(ratio, 0.8),
    ));

    // GetSecret p50 without, then during a re-wrap at the default rate.
    let names: Arc<Vec<String>> =
        Arc::new((0..records).map(|i| format!("bench/rw/{i:07}")).collect());
    let window = plan.secs.max(Duration::from_secs(3));
    let base = p50(&clients, &names, opts.concurrency, window).await?;
    admin.rotate_master_key(RotateMasterKeyRequest {}).await?;
    let r = admin
        .rewrap(RewrapRequest {
            from_version: 0,
            dry_run: false,
            rate: 0,
        })
        .await?
        .into_inner();
    if !r.operation.is_some_and(|o| o.executed) {
        return fail("the re-wrap did not start");
    }
    let during = p50(&clients, &names, opts.concurrency, window).await?;
    let finished = wait_finished(&mut admin).await?;
    let slowdown = during / base;
    eprintln!(
        "  GetSecret p50: {base:.0} µs without, {during:.0} µs during a re-wrap at {} records/s (×{slowdown:.2}; {} re-wrapped)",
        strongroom::service::rewrap::DEFAULT_RATE,
        finished.0
    );
    rows.push(row(
        "GetSecret p50 during re-wrap / without",
        format!("×{slowdown:.2}"),
        format!(
            "during (re-wrap at {}/s): p50 {during:.0} µs",
            strongroom::service::rewrap::DEFAULT_RATE
        ),
        format!("without: p50 {base:.0} µs"),
        if slowdown <= 1.2 {
            "≤ 1.2× ✔"
        } else {
            "≤ 1.2× ✘"
        },
    ));
    Ok(())
}

/// Starts a re-wrap at `rate` and follows it; records per second from the first progress
/// message that shows work to the last.
async fn rewrap(admin: &mut AdminServiceClient<Channel>, rate: u32) -> Res<f64> {
    let started = Instant::now();
    let r = admin
        .rewrap(RewrapRequest {
            from_version: 0,
            dry_run: false,
            rate,
        })
        .await?
        .into_inner();
    if !r.operation.is_some_and(|o| o.executed) {
        return fail("the re-wrap did not start");
    }
    let (done, _) = wait_finished(admin).await?;
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

/// Follows the re-wrap to its end: (records re-wrapped, total).
async fn wait_finished(admin: &mut AdminServiceClient<Channel>) -> Res<(u64, u64)> {
    let mut s = admin
        .watch_rewrap(WatchRewrapRequest {})
        .await?
        .into_inner();
    let mut last = None;
    while let Some(p) = s.message().await? {
        last = Some(p);
    }
    match last {
        Some(p) if p.state == "finished" => Ok((p.rewrapped, p.total)),
        other => fail(format!("the re-wrap did not finish: {other:?}")),
    }
}

/// GetSecret p50 (µs) of `tasks` closed-loop readers over `window`.
async fn p50(
    clients: &[crate::lab::Client],
    names: &Arc<Vec<String>>,
    tasks: usize,
    window: Duration,
) -> Res<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks.max(1) {
        let mut c = clients[t % clients.len()].clone();
        let (names, stop) = (names.clone(), stop.clone());
        set.spawn(async move {
            let mut h = new_hist()?;
            let mut i = t * 7919;
            while !stop.load(Ordering::Relaxed) {
                i = (i + 104_729) % names.len();
                let at = Instant::now();
                c.get_secret(GetSecretRequest {
                    name: names[i].clone(),
                    version: 0,
                })
                .await?;
                h.record(at.elapsed().as_micros() as u64)?;
            }
            Res::Ok(h)
        });
    }
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = new_hist()?;
    while let Some(h) = set.join_next().await {
        all.add(&h??)?;
    }
    Ok(all.value_at_quantile(0.5) as f64)
}

/// C_Decrypt + C_Encrypt (AES-GCM, 32-byte data key) per second under master key 1 of the
/// token, on one session, for `secs`.
fn raw_rate(module: &std::path::Path, conf: &std::path::Path, label: &str, secs: f64) -> Res<f64> {
    // The child roles set SOFTHSM2_CONF in their environment; this process reads it once, at
    // C_Initialize, and no other part initialises PKCS#11 in the driver process.
    #[allow(unsafe_code)]
    // SAFETY: set before the library is initialised, from one thread of the driver.
    unsafe {
        std::env::set_var("SOFTHSM2_CONF", conf);
    }
    let pkcs11 = pkcs11_init(module)?;
    let slot = find_slot(&pkcs11, label)?;
    let session = pkcs11.open_rw_session(slot)?;
    login(
        &session,
        &cryptoki::types::AuthPin::new(crate::USER_PIN.into()),
    )?;
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(b"strongroom-mk-1".to_vec()),
    ])?;
    let [key] = found.as_slice() else {
        return fail("no master key 1");
    };
    let aad = b"strongroom bench aad".to_vec();
    let dek = [7u8; 32];
    let mut iv = [1u8; 12];
    let wrapped = session.encrypt(
        &Mechanism::AesGcm(GcmParams::new(&mut iv, &aad, 128.into())?),
        *key,
        &dek,
    )?;
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < secs {
        for _ in 0..64 {
            let mut iv_old = [1u8; 12];
            let plain = session.decrypt(
                &Mechanism::AesGcm(GcmParams::new(&mut iv_old, &aad, 128.into())?),
                *key,
                &wrapped,
            )?;
            let mut iv_new = [2u8; 12];
            session.generate_random_slice(&mut iv_new)?;
            let again = session.encrypt(
                &Mechanism::AesGcm(GcmParams::new(&mut iv_new, &aad, 128.into())?),
                *key,
                &plain,
            )?;
            std::hint::black_box(again);
            n += 1;
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}
