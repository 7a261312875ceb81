//! How to make an audit line durable most cheaply: the audit writer appends each group
//! commit and calls `fdatasync`; this measures the alternatives the issue asked about on the
//! disk the audit log would live on, as ratios against `write + fdatasync` in the same run.
//!
//! Variants (each writes batches of ~250-byte lines and counts a line once it is durable):
//! - `append + fdatasync`: what the audit writer does (O_APPEND, `write`, `fdatasync`);
//! - `append O_DSYNC`: the same file opened with O_DSYNC, no separate sync call;
//! - `overwrite + fdatasync`: lines written over a zero-filled, preallocated file, so the size
//!   never changes and `fdatasync` has no metadata to write;
//! - `O_DIRECT|O_DSYNC overwrite`: the same preallocated file, written with O_DIRECT|O_DSYNC
//!   in whole 4 KiB blocks (the tail block rewritten with each batch), so each batch is one
//!   device write with FUA and no page cache.
//!
//! `cargo bench --bench dsync -- [DIR] [SECONDS_PER_SLOT] [ROUNDS]` (default: the temp
//! directory, 1.0 s, 5 rounds). Prints the median of each variant's rate per batch size and
//! its ratio to `append + fdatasync`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LINE: usize = 250;
const BLOCK: usize = 4096;
/// Preallocated size of the overwrite variants' files (each slot starts at offset 0).
const PREALLOC: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    AppendFdatasync,
    AppendDsync,
    OverwriteFdatasync,
    DirectDsync,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::AppendFdatasync,
        Variant::AppendDsync,
        Variant::OverwriteFdatasync,
        Variant::DirectDsync,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::AppendFdatasync => "append + fdatasync (today)",
            Variant::AppendDsync => "append O_DSYNC",
            Variant::OverwriteFdatasync => "overwrite preallocated + fdatasync",
            Variant::DirectDsync => "O_DIRECT|O_DSYNC overwrite preallocated",
        }
    }
}

/// A 4 KiB-aligned buffer (O_DIRECT needs aligned memory), without unsafe code.
struct Aligned {
    buf: Vec<u8>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let buf = vec![0u8; len + BLOCK];
        let at = buf.as_ptr().align_offset(BLOCK);
        Self { buf, at, len }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.buf[self.at..self.at + self.len]
    }
}

fn line(i: u64) -> Vec<u8> {
    let mut l = format!("{{\"seq\":{i},\"op\":\"GetSecret\",\"pad\":\"").into_bytes();
    l.resize(LINE - 3, b'x');
    l.extend_from_slice(b"\"}\n");
    l
}

/// Writes zeros over the whole file once, so later overwrites change no metadata.
fn preallocate(path: &Path) -> File {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(path)
        .expect("open");
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(PREALLOC >> 20) {
        f.write_all(&zeros).expect("prealloc");
    }
    f.sync_all().expect("sync");
    f
}

/// Durable lines per second for `variant` with `batch` lines per commit, over `slot`.
fn run(dir: &Path, variant: Variant, batch: usize, slot: Duration) -> f64 {
    let path = dir.join(format!("dsync-{variant:?}.log"));
    let dsync = rustix::fs::OFlags::DSYNC.bits() as i32;
    let direct = rustix::fs::OFlags::DIRECT.bits() as i32;
    let mut lines = 0u64;
    let start = Instant::now();
    match variant {
        Variant::AppendFdatasync | Variant::AppendDsync => {
            let _ = std::fs::remove_file(&path);
            let mut o = OpenOptions::new();
            o.create(true).append(true);
            if variant == Variant::AppendDsync {
                o.custom_flags(dsync);
            }
            let mut f = o.open(&path).expect("open");
            while start.elapsed() < slot {
                let mut out = Vec::with_capacity(batch * LINE);
                for _ in 0..batch {
                    out.extend_from_slice(&line(lines));
                    lines += 1;
                }
                f.write_all(&out).expect("write");
                if variant == Variant::AppendFdatasync {
                    f.sync_data().expect("fdatasync");
                }
            }
        }
        Variant::OverwriteFdatasync => {
            let f = preallocate(&path);
            let mut at = 0u64;
            let begin = Instant::now();
            while begin.elapsed() < slot && at + (batch * LINE) as u64 <= PREALLOC {
                let mut out = Vec::with_capacity(batch * LINE);
                for _ in 0..batch {
                    out.extend_from_slice(&line(lines));
                    lines += 1;
                }
                f.write_all_at(&out, at).expect("write");
                f.sync_data().expect("fdatasync");
                at += out.len() as u64;
            }
            return lines as f64 / begin.elapsed().as_secs_f64();
        }
        Variant::DirectDsync => {
            drop(preallocate(&path));
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(direct | dsync)
                .open(&path)
                .expect("open O_DIRECT");
            let mut buf = Aligned::new(BLOCK * (batch * LINE / BLOCK + 2));
            // Bytes of the block the log ends in, kept to rewrite it whole.
            let mut tail: Vec<u8> = Vec::new();
            let mut block_at = 0u64;
            let begin = Instant::now();
            while begin.elapsed() < slot && block_at + buf.len as u64 <= PREALLOC {
                for _ in 0..batch {
                    tail.extend_from_slice(&line(lines));
                    lines += 1;
                }
                let blocks = tail.len().div_ceil(BLOCK);
                let bytes = buf.bytes();
                bytes[..tail.len()].copy_from_slice(&tail);
                bytes[tail.len()..blocks * BLOCK].fill(0);
                f.write_all_at(&bytes[..blocks * BLOCK], block_at)
                    .expect("write O_DIRECT");
                // Keep only the partial last block for the next batch.
                let full = tail.len() / BLOCK;
                block_at += (full * BLOCK) as u64;
                tail.drain(..full * BLOCK);
            }
            return lines as f64 / begin.elapsed().as_secs_f64();
        }
    }
    lines as f64 / start.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let dir: PathBuf = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let slot = Duration::from_secs_f64(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1.0));
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let work = tempfile::tempdir_in(&dir).expect("tempdir");
    println!(
        "durable audit lines ({LINE} B) on {} ({} rounds x {:.1} s per variant, interleaved)",
        dir.display(),
        rounds,
        slot.as_secs_f64()
    );
    println!(
        "{:>5}  {:<42} {:>12} {:>8}  ratio per round",
        "batch", "variant", "lines/s", "ratio"
    );
    for batch in [1usize, 8, 32] {
        let mut rates = vec![Vec::new(); Variant::ALL.len()];
        for _ in 0..rounds {
            for (i, v) in Variant::ALL.iter().enumerate() {
                rates[i].push(run(work.path(), *v, batch, slot));
            }
        }
        let base: Vec<f64> = rates[0].clone();
        let base_median = median(&mut base.clone());
        for (i, v) in Variant::ALL.iter().enumerate() {
            let mut ratios: Vec<f64> = rates[i].iter().zip(&base).map(|(r, b)| r / b).collect();
            let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            let rate = median(&mut rates[i].clone());
            println!(
                "{batch:>5}  {:<42} {:>12.0} {:>8.3}  {}",
                v.label(),
                rate,
                median(&mut ratios),
                shown.join(" ")
            );
        }
        let _ = base_median;
    }
}
