//! What a paged scan of a large etcd range costs, without a token or a server (BENCHMARKS.md,
//! *Scale*): why the state commitment's scan of a million records did not finish on etcd 3.4.
//!
//! `etcd_scan URL N` fills N records in the service's key layout under `scan/` on a plain
//! (no TLS) etcd at URL (`h/` heads of a few bytes, `r/` records of 1 150 B: a sealed 1 KiB
//! secret), then reads them all at one revision three ways, printing each one's seconds and
//! calls: `paged`, limited calls of 256 over the rest of the range (the scan before the fix);
//! `bounded`, keys-only calls of 16 384 keys and value calls bounded by them (the scan of
//! `EtcdStore::scan_at`); and the time of one limited call at the start of the range and one
//! near its end. Start etcd with `--quota-backend-bytes` large enough for the records.

// A measuring tool, not the service: any failure ends it with its message.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use etcd_client::{Client, GetOptions, GetResponse, KvClient, Txn, TxnOp};

const PAGE: i64 = 256;
const KEY_PAGE: i64 = 16_384;

async fn range(
    kv: &mut KvClient,
    start: &[u8],
    end: &[u8],
    limit: i64,
    rev: i64,
    keys_only: bool,
) -> GetResponse {
    let mut o = GetOptions::new()
        .with_range(end.to_vec())
        .with_limit(limit)
        .with_revision(rev);
    if keys_only {
        o = o.with_keys_only();
    }
    kv.get(start.to_vec(), Some(o)).await.unwrap()
}

fn after(resp: &GetResponse) -> Option<Vec<u8>> {
    match resp.kvs().last() {
        Some(l) if resp.more() => {
            let mut k = l.key().to_vec();
            k.push(0);
            Some(k)
        }
        _ => None,
    }
}

/// Limited calls over the rest of `[start, end)`: keys read and calls made.
async fn paged(kv: &mut KvClient, start: &[u8], end: &[u8], rev: i64) -> (u64, u64) {
    let (mut keys, mut calls, mut from) = (0, 0, start.to_vec());
    loop {
        let r = range(kv, &from, end, PAGE, rev, false).await;
        calls += 1;
        keys += r.kvs().len() as u64;
        match after(&r) {
            Some(f) => from = f,
            None => return (keys, calls),
        }
    }
}

/// Keys-only pages, values in ranges bounded by them.
async fn bounded(kv: &mut KvClient, start: &[u8], end: &[u8], rev: i64) -> (u64, u64) {
    let (mut keys, mut calls, mut from) = (0, 0, start.to_vec());
    loop {
        let k = range(kv, &from, end, KEY_PAGE, rev, true).await;
        calls += 1;
        let next = after(&k);
        let upto = next.clone().unwrap_or_else(|| end.to_vec());
        let ks = k.kvs();
        let mut lo = from.clone();
        for i in (0..ks.len()).step_by(PAGE as usize) {
            let hi = ks
                .get(i + PAGE as usize)
                .map_or_else(|| upto.clone(), |kv| kv.key().to_vec());
            let r = range(kv, &lo, &hi, PAGE, rev, false).await;
            calls += 1;
            assert!(!r.more(), "a bounded range held more than a page");
            keys += r.kvs().len() as u64;
            lo = hi;
        }
        match next {
            Some(n) => from = n,
            None => return (keys, calls),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n: usize = a[2].parse().unwrap();
    let client = Client::connect([a[1].as_str()], None).await.unwrap();
    let mut kv = client.kv_client();
    let t = Instant::now();
    let head = vec![8u8, 1];
    let record = vec![0x5a_u8; 1150];
    let mut tasks = Vec::new();
    for w in 0..8usize {
        let mut kv = kv.clone();
        let (head, record) = (head.clone(), record.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w * 64;
            while i < n {
                let mut ops = Vec::new();
                for j in i..(i + 64).min(n) {
                    let name = format!("bench/big/{j:07}");
                    ops.push(TxnOp::put(format!("scan/h/{name}"), head.clone(), None));
                    ops.push(TxnOp::put(
                        format!("scan/r/{name}\0{:020}", 1),
                        record.clone(),
                        None,
                    ));
                }
                kv.txn(Txn::new().and_then(ops)).await.unwrap();
                i += 8 * 64;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rev = kv
        .get("scan/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    println!("filled {n} records in {:.1} s", t.elapsed().as_secs_f64());
    let (start, end) = (b"scan/".to_vec(), b"scan0".to_vec());
    let near_end = format!("scan/r/bench/big/{:07}", n.saturating_sub(PAGE as usize)).into_bytes();
    for (what, first) in [("start", start.clone()), ("end", near_end)] {
        let t = Instant::now();
        for _ in 0..5 {
            range(&mut kv, &first, &end, PAGE, rev, false).await;
        }
        println!(
            "one limited call at the range's {what}: {:.1} ms",
            t.elapsed().as_secs_f64() * 1000.0 / 5.0
        );
    }
    if std::env::var_os("SKIP_PAGED").is_none() {
        let t = Instant::now();
        let (keys, calls) = paged(&mut kv, &start, &end, rev).await;
        println!(
            "paged: {keys} keys in {calls} calls, {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let t = Instant::now();
    let (keys, calls) = bounded(&mut kv, &start, &end, rev).await;
    println!(
        "bounded: {keys} keys in {calls} calls, {:.1} s",
        t.elapsed().as_secs_f64()
    );
}
