//! The `strict` part: GetSecret of strict-mode (`hsm-only`) records versus envelope records,
//! on one `strongroomd` holding both, in the same run.

use std::sync::Arc;
use std::time::Instant;

use strongroom::proto::{Protection, PutSecretRequest};

use crate::Res;
use crate::generator::{Arm, Plan, Ratio, Summary, interleave, summarize};
use crate::lab::{Lab, connect};
use crate::parts::reads;
use crate::report::{Row, row};
use crate::util::{fmt_rate, random_bytes};

/// Writes `--secrets` values of `--value-size` under each protection into one server, then
/// reads each set with the same load, the two arms alternating round after round. Strict
/// mode's read is an AES-KW C_UnwrapKey into a session object, C_Decrypt of the value in the
/// token and C_DestroyObject; the envelope's is one C_Decrypt of the data key and AES-GCM in
/// process.
pub(crate) async fn part_strict(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
    let opts = lab.opts.clone();
    eprintln!(
        "\n== GetSecret {} B, {} tasks over {} connections: hsm-only vs envelope records, one server",
        opts.value_size, opts.concurrency, opts.connections
    );
    let server = lab.strongroomd("strict", true, &opts.server_log, None)?;
    let clients = connect(&server.addr, &lab.pki, 4).await?;
    let mut sets = Vec::new();
    for (dir, protection) in [("kw", Protection::HsmOnly), ("env", Protection::Envelope)] {
        let names: Arc<Vec<String>> = Arc::new(
            (0..opts.secrets)
                .map(|i| format!("bench/strict/{dir}/{i:06}"))
                .collect(),
        );
        let started = Instant::now();
        let mut handles = Vec::new();
        for t in 0..8 {
            let mut client = clients[t % clients.len()].clone();
            let mine: Vec<String> = names.iter().skip(t).step_by(8).cloned().collect();
            let value = random_bytes(opts.value_size);
            handles.push(tokio::spawn(async move {
                for name in mine {
                    client
                        .put_secret(PutSecretRequest {
                            name,
                            value: value.clone(),
                            expected_version: None,
                            expires_at_unix: None,
                            protection: protection as i32,
                            ..Default::default()
                        })
                        .await?;
                }
                Res::Ok(())
            }));
        }
        for h in handles {
            h.await??;
        }
        eprintln!(
            "  wrote {} {protection:?} secrets in {:.1} s",
            names.len(),
            started.elapsed().as_secs_f64()
        );
        sets.push(names);
    }
    let mut arms = Vec::new();
    for (label, names) in [
        ("GetSecret hsm-only", &sets[0]),
        ("GetSecret envelope", &sets[1]),
    ] {
        arms.push(
            Arm::new(
                label,
                &server,
                &lab.pki,
                opts.connections,
                reads(names, &opts),
            )
            .await?,
        );
    }
    let samples = interleave(&arms, plan).await?;
    let sums: Vec<Summary> = samples.iter().map(|s| summarize(s)).collect::<Res<_>>()?;
    let [strict, envelope] = sums.as_slice() else {
        return Ok(());
    };
    let r = Ratio::of(&strict.rates, &envelope.rates);
    eprintln!(
        "  hsm-only: {}\n  envelope: {}\n  hsm-only/envelope throughput: {}",
        strict.describe(),
        envelope.describe(),
        r.show()
    );
    rows.push(row(
        "GetSecret hsm-only/envelope ratio",
        r.show(),
        format!("hsm-only: {}", strict.describe()),
        format!("envelope: {}", envelope.describe()),
        format!(
            "(rates {} vs {}; p50 ×{:.2})",
            fmt_rate(strict.rate),
            fmt_rate(envelope.rate),
            strict.p50 / envelope.p50
        ),
    ));
    Ok(())
}
