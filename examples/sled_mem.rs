//! Where a large sled store's memory goes, without a token or a server (BENCHMARKS.md, *Scale*).
//!
//! `sled_mem fill DIR CACHE_MB N` imports N records of 1 150 B (the size of a sealed 1 KiB
//! secret) and their heads in the service's key layout and commits to them;
//! `sled_mem open DIR CACHE_MB GETS` opens the store, runs the start check's commitment scan
//! (skipped with `SKIP_SCAN=1`) and GETS random reads on `THREADS` threads (`LOCK=1`
//! serialises them, `RANGE` is how many names exist, `MODE` is what each read reads:
//! `record` (default), `head`, or `both` as GetSecret does), printing VmRSS after each step.
//! Run it with and without `MALLOC_ARENA_MAX`.

// A measuring tool, not the service: any failure ends it with its message.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use strongroom::secret::SecretName;
use strongroom::store::{SledStore, StateKey, Store};

fn rss() -> String {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let f = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            / 1024
    };
    format!("RSS {} MiB HWM {} MiB", f("VmRSS:"), f("VmHWM:"))
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let key = StateKey::new(&zeroize::Zeroizing::new([7u8; 32]));
    let path = std::path::Path::new(&a[2]);
    let cache: u64 = a.get(3).map_or(128, |s| s.parse().unwrap());
    let t = Instant::now();
    let store = SledStore::open_with_cache(path, cache, key).unwrap();
    println!("open {:.1}s {}", t.elapsed().as_secs_f64(), rss());
    match a[1].as_str() {
        "fill" => {
            let n: usize = a[4].parse().unwrap();
            let rec = vec![0x5au8; 1150];
            let mut batch = Vec::new();
            for i in 0..n {
                let name = format!("bench/big/{i:07}");
                let mut hk = vec![b'h'];
                hk.extend_from_slice(name.as_bytes());
                let mut rk = vec![b'r'];
                rk.extend_from_slice(name.as_bytes());
                rk.push(0);
                rk.extend_from_slice(&1u64.to_be_bytes());
                let mut r = rec.clone();
                r[..8].copy_from_slice(&(i as u64).to_be_bytes());
                batch.push((hk, Some(vec![8u8, 1])));
                batch.push((rk, Some(r)));
                if batch.len() >= 4000 {
                    store.import_raw(&batch).unwrap();
                    batch.clear();
                }
            }
            store.import_raw(&batch).unwrap();
            store.rebase_state().unwrap();
            println!("filled {:.1}s {}", t.elapsed().as_secs_f64(), rss());
        }
        "open" => {
            let skip = std::env::var("SKIP_SCAN").is_ok();
            if !skip {
                let t = Instant::now();
                let c = store.verify_state().unwrap();
                println!(
                    "scan {:.1}s records {} {}",
                    t.elapsed().as_secs_f64(),
                    c.records,
                    rss()
                );
            }
            let n: usize = a.get(4).map_or(0, |s| s.parse().unwrap());
            let t = Instant::now();
            let threads: u64 = std::env::var("THREADS").map_or(1, |s| s.parse().unwrap());
            let lock = std::sync::Mutex::new(());
            let use_lock = std::env::var("LOCK").is_ok();
            let mode = std::env::var("MODE").unwrap_or_else(|_| "record".into());
            std::thread::scope(|sc| {
                for th in 0..threads {
                    let store = &store;
                    let lock = &lock;
                    let mode = &mode;
                    sc.spawn(move || {
                        let mut x: u64 = 12345 + th;
                        for _ in 0..n / threads as usize {
                            x = x
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            let i = (x >> 33)
                                % std::env::var("RANGE").map_or(1_000_000, |s| s.parse().unwrap());
                            let name =
                                SecretName::parse(&format!("bench/big/{i:07}"), 1024).unwrap();
                            let _g = if use_lock {
                                Some(lock.lock().unwrap())
                            } else {
                                None
                            };
                            match mode.as_str() {
                                "head" => {
                                    let _ = store.head(&name);
                                }
                                "record" => {
                                    let _ = store.get(&name, 1);
                                }
                                // What GetSecret reads: the head, then the live version.
                                _ => {
                                    if let Ok(Some(h)) = store.head(&name) {
                                        let _ = store.get(&name, h.live());
                                    }
                                }
                            }
                        }
                    });
                }
            });
            if n > 0 {
                println!(
                    "{n} gets {:.1} us/get {}",
                    t.elapsed().as_secs_f64() * 1e6 / n as f64,
                    rss()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(1500));
            println!("after 1.5s {}", rss());
        }
        _ => {}
    }
}
