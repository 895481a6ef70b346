//! A new backend's first query, at several index sizes (`TT_ONLY_CONNECT=1`): what a client
//! without a connection pooler pays. For each size (TT_CONNECT_SIZES, "100000x64,1000000x64,
//! 4000000x32" by default) it loads a table of clustered vectors, builds pg_twotower's index at
//! its defaults, uses it once (the cache file is written and verified), then TT_CONNECT_REPS
//! times (30) side by side:
//! - a new connection and `SELECT 1` (what any query pays),
//! - a new connection, then its first top-10 query alone (library load, image open, search),
//!   the same query again on that connection, and the backend's private memory (RssAnon of
//!   /proc/<pid>/status; the mapped image is shared page cache) before and after,
//! - a new connection, `LOAD 'pg_twotower'` alone, then the first query (the image's open and
//!   the first search without the library's load).
//!
//! Prints medians and 90th percentiles; the target is a first query ≤ 5 ms at 1M, flat in n.

use postgres::{Client, NoTls};
use std::time::{Duration, Instant};
use twotower_testkit::vectors::clustered;

fn connect(host: &str, port: u16) -> Client {
    Client::configure()
        .host(host)
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect(NoTls)
        .expect("connect")
}

fn rss_anon_kb(pid: i32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("RssAnon:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (median, 90th percentile) of `v`.
fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    (v[v.len() / 2], v[(v.len() * 9 / 10).min(v.len() - 1)])
}

pub fn run(host: &str, port: u16) {
    let sizes: String = super::env(
        "TT_CONNECT_SIZES",
        "100000x64,1000000x64,4000000x32".to_string(),
    );
    let reps: usize = super::env("TT_CONNECT_REPS", 30);
    let mut c = connect(host, port);
    c.batch_execute("DROP EXTENSION IF EXISTS pg_twotower CASCADE; CREATE EXTENSION pg_twotower")
        .unwrap();
    println!("\n## A new backend's first query (TT_ONLY_CONNECT), {reps} connections per size");
    println!("| items × dims | build s | new connection + SELECT 1, ms (p50 / p90) | first top-10 query of a new backend, ms (p50 / p90) | LOAD of the library alone, ms (p50) | first query after LOAD, ms (p50 / p90) | second query, ms (p50) | private memory after the first query, kB (p50) |");
    println!("|---|---|---|---|---|---|---|---|");
    for size in sizes.split(',') {
        let Some((n, dims)) = size.split_once('x') else {
            continue;
        };
        let (n, dims): (usize, usize) = (n.trim().parse().unwrap(), dims.trim().parse().unwrap());
        let mut all = clustered(n + 1, dims, 1000, 77);
        let q = all.split_off(n * dims);
        c.batch_execute(
            "DROP TABLE IF EXISTS conn_items; CREATE TABLE conn_items (id bigint, embedding real[]) WITH (autovacuum_enabled = off)",
        )
        .unwrap();
        super::copy_lines(
            &mut c,
            "COPY conn_items (id, embedding) FROM STDIN",
            all.chunks_exact(dims)
                .enumerate()
                .map(|(i, v)| format!("{}\t{}", i + 1, super::literal(v))),
        );
        drop(all);
        c.batch_execute("SET maintenance_work_mem = '8GB'").unwrap();
        let t = Instant::now();
        c.batch_execute(
            "CREATE INDEX conn_items_idx ON conn_items USING twotower_hnsw (embedding)",
        )
        .unwrap();
        let build = t.elapsed();
        c.batch_execute("VACUUM ANALYZE conn_items").unwrap();
        let sql = "SELECT id FROM conn_items ORDER BY embedding <=> $1::real[] LIMIT 10";
        // Written and verified once, as in production after the first query on the node.
        c.query(sql, &[&q]).unwrap();
        let (mut plain, mut first, mut second, mut mem) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut load, mut after_load) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            let mut a = connect(host, port);
            a.query_one("SELECT 1", &[]).unwrap();
            plain.push(ms(t.elapsed()));
            drop(a);
            let mut b = connect(host, port);
            let pid: i32 = b.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
            let before = rss_anon_kb(pid);
            let t = Instant::now();
            let rows = b.query(sql, &[&q]).unwrap();
            first.push(ms(t.elapsed()));
            assert_eq!(rows.len(), 10);
            if let (Some(x), Some(y)) = (before, rss_anon_kb(pid)) {
                mem.push((y - x) as f64);
            }
            let t = Instant::now();
            b.query(sql, &[&q]).unwrap();
            second.push(ms(t.elapsed()));
            drop(b);
            // The same, with the library loaded first: what the image's open and the first
            // search cost on their own.
            let mut d = connect(host, port);
            let t = Instant::now();
            d.batch_execute("LOAD 'pg_twotower'").unwrap();
            load.push(ms(t.elapsed()));
            let t = Instant::now();
            d.query(sql, &[&q]).unwrap();
            after_load.push(ms(t.elapsed()));
        }
        let (p50, p90) = stats(plain);
        let (f50, f90) = stats(first);
        let (s50, _) = stats(second);
        let (m50, _) = stats(mem);
        let (l50, _) = stats(load);
        let (a50, a90) = stats(after_load);
        println!(
            "| {n} × {dims} | {:.1} | {p50:.2} / {p90:.2} | **{f50:.2}** / {f90:.2} | {l50:.2} | {a50:.2} / {a90:.2} | {s50:.2} | {m50:.0} |",
            build.as_secs_f64()
        );
        c.batch_execute("DROP TABLE conn_items").unwrap();
    }
}
