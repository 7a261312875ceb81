//! The results table and the machine description printed above it.

use std::fmt::Write as _;
use std::process::Command;

pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) value: String,
    pub(crate) measured: String,
    pub(crate) baseline: String,
    pub(crate) target: String,
}

pub(crate) fn row(
    name: impl Into<String>,
    value: impl Into<String>,
    measured: impl Into<String>,
    baseline: impl Into<String>,
    target: impl Into<String>,
) -> Row {
    Row {
        name: name.into(),
        value: value.into(),
        measured: measured.into(),
        baseline: baseline.into(),
        target: target.into(),
    }
}

pub(crate) fn verdict(value: f64, target: f64) -> String {
    if value >= target {
        format!("≥ {target} ✔")
    } else {
        format!("≥ {target} ✘")
    }
}

pub(crate) fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| row | ratio / value (median, range over rounds) | measured | baseline (same run) | target |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            r.name, r.value, r.measured, r.baseline, r.target
        );
    }
    s
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let rev = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "{cores} × {cpu}, {:.0} GiB RAM, Linux {}, strongroom {rev}",
        mem as f64 / (1u64 << 20) as f64,
        kernel.trim()
    )
}
