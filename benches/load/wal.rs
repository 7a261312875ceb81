//! The `wal` part: what the write-ahead audit costs a durable PutSecret.

use std::sync::Arc;

use crate::Res;
use crate::generator::{Arm, Plan, Ratio, Summary, Workload, interleave, summarize};
use crate::lab::Lab;
use crate::report::{Row, row};
use crate::util::fmt_rate;

/// PutSecret with the write-ahead audit (an intent entry durable before the store commit, the
/// request's entry after it: two group-committed audit fsyncs and the store's fsync) versus
/// `audit.dangerous_no_write_ahead` (only the entry after the commit), at each of the `put`
/// part's concurrencies; the two servers are measured alternately, round after round.
pub(crate) async fn part_wal(lab: &mut Lab, plan: &Plan, rows: &mut Vec<Row>) -> Res<()> {
    let opts = lab.opts.clone();
    eprintln!(
        "\n== PutSecret {} B with the write-ahead audit vs without, concurrency {:?}",
        opts.value_size, opts.put_concurrency
    );
    let on = lab.strongroomd_with("wal-on", true, &opts.server_log, None, "")?;
    let off = lab.strongroomd_with(
        "wal-off",
        true,
        &opts.server_log,
        None,
        "dangerous_no_write_ahead = true",
    )?;
    let mut arms = Vec::new();
    for &c in &opts.put_concurrency {
        let w = || Workload {
            concurrency: c,
            read_pct: 0,
            read_names: Arc::new(Vec::new()),
            expect_len: None,
            write_prefix: "bench/w".into(),
            value_size: opts.value_size,
        };
        let conns = opts.connections.min(c);
        arms.push(
            Arm::new(
                format!("PutSecret write-ahead c={c}"),
                &on,
                &lab.pki,
                conns,
                w(),
            )
            .await?,
        );
        arms.push(
            Arm::new(
                format!("PutSecret no write-ahead c={c}"),
                &off,
                &lab.pki,
                conns,
                w(),
            )
            .await?,
        );
    }
    let samples = interleave(&arms, plan).await?;
    let sums: Vec<Summary> = samples.iter().map(|s| summarize(s)).collect::<Res<_>>()?;
    for (c, pair) in opts.put_concurrency.iter().zip(sums.chunks(2)) {
        let [with, without] = pair else {
            continue;
        };
        let r = Ratio::of(&with.rates, &without.rates);
        eprintln!("  put c={c}: write-ahead / none: {}", r.show());
        rows.push(row(
            format!("put c={c}: write-ahead audit / none ratio"),
            r.show(),
            format!("write-ahead: {}", with.describe()),
            format!("none: {}", without.describe()),
            format!(
                "(rates {} vs {})",
                fmt_rate(with.rate),
                fmt_rate(without.rate)
            ),
        ));
    }
    Ok(())
}
