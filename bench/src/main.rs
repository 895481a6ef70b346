//! The pg_twotower benchmark: generates clustered unit vectors, loads them, builds the index and
//! measures build time, size, recall@10/100/500 and single-client queries per second at several
//! ef_search values, next to exact search and (when the `vector` extension is installed in the
//! same server) pgvector's HNSW with the same M and ef_construction. Prints ratios.
//!
//! Then (module `towers`) the towers: `embed_user` latency of a realistic user tower next to numpy
//! on the same weights, item-vector refresh throughput, and one-call `recall` top-500 latency and
//! quality over the same index.
//!
//! Configuration by environment: TT_HOST (socket dir), TT_PORT, TT_N (rows, 1000000), TT_DIMS
//! (64), TT_QUERIES (200), TT_CLUSTERS (1000), TT_M (16), TT_EFC (64) (pgvector's build and the equal-parameter build; pg_twotower's main
//! index uses its defaults), TT_OPTIONS (a WITH list for the main index instead of the defaults),
//! TT_ONLY_CURVE=1 (stop after the main index's ef_search sweep), TT_SKIP_LOAD=1 (reuse the
//! `items` table), TT_ONLY_TOWERS=1 (skip exact search, the ef_search sweep and pgvector; the
//! index is still built), TT_ONLY_FRESH=1 (the build and the insert measurement only, with pgvector's build and the
//! same inserts into it when pgvector is installed),
//! TT_ONLY_PGVECTOR=1 (the main build and sweep, then pgvector's hnsw and pg_twotower's index
//! on the same `vector` column only), TT_REUSE_INDEX=1 (with TT_SKIP_LOAD: keep the installed extension and
//! an existing `items_tt_idx` instead of re-creating both; a quick rerun of the towers part),
//! TT_ONLY_CONNECT=1 (a new backend's first query at several sizes only, `connect.rs`), and
//! the variables of `towers.rs`.

#![forbid(unsafe_code)]

use postgres::{Client, NoTls};
use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};
use twotower_testkit::vectors::clustered;

mod connect;

/// An ef_search sweep: (ef_search, recall@10, QPS) rows.
type Curve = Vec<(usize, f64, f64)>;
mod towers;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Exact top-`k` ids (1-based) by cosine distance for each query, on all cores.
fn ground_truth(data: &[f32], queries: &[f32], dims: usize, k: usize) -> Vec<Vec<i64>> {
    let nq = queries.len() / dims;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut out = vec![Vec::new(); nq];
    std::thread::scope(|s| {
        let chunks: Vec<_> = out.chunks_mut(nq.div_ceil(threads)).enumerate().collect();
        for (ci, chunk) in chunks {
            let start = ci * nq.div_ceil(threads);
            s.spawn(move || {
                for (j, slot) in chunk.iter_mut().enumerate() {
                    let q = &queries[(start + j) * dims..(start + j + 1) * dims];
                    let mut d: Vec<(f32, i64)> = data
                        .chunks_exact(dims)
                        .enumerate()
                        .map(|(i, v)| {
                            (
                                1.0 - v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>(),
                                i as i64 + 1,
                            )
                        })
                        .collect();
                    d.select_nth_unstable_by(k, |a, b| a.0.total_cmp(&b.0));
                    d.truncate(k);
                    d.sort_by(|a, b| a.0.total_cmp(&b.0));
                    *slot = d.into_iter().map(|x| x.1).collect();
                }
            });
        }
    });
    out
}

fn literal(v: &[f32]) -> String {
    let mut s = String::with_capacity(v.len() * 12);
    s.push('{');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&x.to_string());
    }
    s.push('}');
    s
}

#[derive(Clone)]
struct Run {
    recall: f64,
    qps: f64,
    p99_ms: f64,
}

/// Runs every query with LIMIT k through `sql` ($1 = query literal) and scores it.
fn run_queries<Q: postgres::types::ToSql + Sync>(
    c: &mut Client,
    sql: &str,
    queries: &[Q],
    truth: &[Vec<i64>],
    k: usize,
) -> Run {
    let stmt = c.prepare(sql).expect("prepare");
    for q in queries.iter().take(5) {
        c.query(&stmt, &[q, &(k as i64)]).expect("warm-up query");
    }
    let mut hits = 0usize;
    let mut lat = Vec::with_capacity(queries.len());
    let t0 = Instant::now();
    for (q, t) in queries.iter().zip(truth) {
        let s = Instant::now();
        let rows = c.query(&stmt, &[q, &(k as i64)]).expect("query");
        lat.push(s.elapsed());
        let got: HashSet<i64> = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
        hits += t.iter().take(k).filter(|id| got.contains(id)).count();
    }
    let total = t0.elapsed();
    lat.sort();
    Run {
        recall: hits as f64 / (queries.len() * k) as f64,
        qps: queries.len() as f64 / total.as_secs_f64(),
        p99_ms: lat[(lat.len() * 99 / 100).min(lat.len() - 1)].as_secs_f64() * 1e3,
    }
}

/// The median run at the default ef_search and 1.2, 1.5, 2, 3 and 4 times it (k = 10), in that order.
fn ef_curve<Q: postgres::types::ToSql + Sync>(
    c: &mut Client,
    sql: &str,
    queries: &[Q],
    truth: &[Vec<i64>],
) -> Vec<(usize, Run)> {
    // From the default ef_search up to 4x it.
    let def = default_ef_search(c);
    let out = [10, 12, 15, 20, 30, 40]
        .into_iter()
        .map(|f| f * def / 10)
        .map(|ef| {
            c.batch_execute(&format!("SET twotower.ef_search = {ef}"))
                .unwrap();
            (ef, median_run(c, sql, queries, truth, 10))
        })
        .collect();
    c.batch_execute("RESET twotower.ef_search").unwrap();
    out
}

/// [`run_queries`] three times, the run of median QPS (these machines are noisy: one slow
/// stretch should not decide a ratio).
fn median_run<Q: postgres::types::ToSql + Sync>(
    c: &mut Client,
    sql: &str,
    queries: &[Q],
    truth: &[Vec<i64>],
    k: usize,
) -> Run {
    let mut runs: Vec<Run> = (0..3)
        .map(|_| run_queries(c, sql, queries, truth, k))
        .collect();
    runs.sort_by(|a, b| a.qps.total_cmp(&b.qps));
    runs.swap_remove(1)
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

/// Sends `lines` (text-format COPY rows, without their newline) to `copy` in 1 MB writes.
fn copy_lines(c: &mut Client, copy: &str, lines: impl Iterator<Item = String>) {
    let mut w = c.copy_in(copy).unwrap();
    let mut buf = String::with_capacity(1 << 20);
    for line in lines {
        buf.push_str(&line);
        buf.push('\n');
        if buf.len() > 1 << 20 {
            w.write_all(buf.as_bytes()).unwrap();
            buf.clear();
        }
    }
    w.write_all(buf.as_bytes()).unwrap();
    w.finish().unwrap();
}

/// The towers part of the benchmark (bench/src/towers.rs) over the loaded `items`.
fn run_towers(c: &mut Client, data: &[f32], dims: usize, host: &str, port: u16) {
    towers::Towers {
        c,
        data,
        dims,
        host,
        port,
    }
    .run();
}

fn main() {
    let host: String = env("TT_HOST", "/tmp/pg_twotower-bench".to_string());
    let port: u16 = env("TT_PORT", 55433);
    let n: usize = env("TT_N", 1_000_000);
    let dims: usize = env("TT_DIMS", 64);
    let nq: usize = env("TT_QUERIES", 200);
    let clusters: usize = env("TT_CLUSTERS", 1000);
    let m: usize = env("TT_M", 16);
    let efc: usize = env("TT_EFC", 64);
    let skip_load = std::env::var("TT_SKIP_LOAD").is_ok();
    let only_towers = flag("TT_ONLY_TOWERS");
    let reuse_index = skip_load && flag("TT_REUSE_INDEX");
    // Only the build and the fresh-insert measurement (a quick check of the delta graph).
    let only_fresh = flag("TT_ONLY_FRESH");

    let mut c = Client::configure()
        .host(&host)
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect(NoTls)
        .expect("connect");
    println!("# pg_twotower benchmark: n={n} dims={dims} queries={nq} clusters={clusters} m={m} ef_construction={efc}{}",
        if only_towers { " (TT_ONLY_TOWERS: towers and recall only)" } else { "" });
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "# machine: {cores} cores; server: {}",
        c.query_one("SELECT version()", &[])
            .unwrap()
            .get::<_, String>(0)
    );

    if flag("TT_ONLY_CONNECT") {
        connect::run(&host, port);
        return;
    }
    let mut all = clustered(n + nq, dims, clusters, 2024);
    let qdata = all.split_off(n * dims);
    let data = all;
    // Query vectors go to the server as binary real[] parameters (evaluated once per query).
    let queries: Vec<Vec<f32>> = qdata.chunks_exact(dims).map(|v| v.to_vec()).collect();

    // A fresh extension, so its SQL matches the installed library (TT_REUSE_INDEX keeps an
    // existing one together with its index on `items`).
    let reuse_index = reuse_index
        && c.query_one(
            "SELECT to_regclass('public.items_tt_idx') IS NOT NULL
                AND EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_twotower')",
            &[],
        )
        .unwrap()
        .get::<_, bool>(0);
    if reuse_index {
        println!("# TT_REUSE_INDEX: keeping the installed extension and the existing items_tt_idx");
    } else {
        c.batch_execute(
            "DROP EXTENSION IF EXISTS pg_twotower CASCADE; CREATE EXTENSION pg_twotower",
        )
        .unwrap();
    }
    if !skip_load {
        c.batch_execute("DROP TABLE IF EXISTS items; CREATE TABLE items (id bigint PRIMARY KEY, embedding real[]) WITH (autovacuum_enabled = off)").unwrap();
        let (_, load) = timed(|| {
            copy_lines(
                &mut c,
                "COPY items (id, embedding) FROM STDIN",
                data.chunks_exact(dims)
                    .enumerate()
                    .map(|(i, v)| format!("{}\t{}", i + 1, literal(v))),
            )
        });
        c.batch_execute("VACUUM ANALYZE items").unwrap();
        println!("# loaded {n} rows in {:.1} s", load.as_secs_f64());
    }
    if only_towers {
        if !reuse_index {
            let (_, build) = timed(|| build_index(&mut c, &env("TT_OPTIONS", String::new())));
            println!("# built items_tt_idx in {:.1} s", build.as_secs_f64());
        }
        run_towers(&mut c, &data, dims, &host, port);
        return;
    }
    let (truth, gt) = timed(|| ground_truth(&data, &qdata, dims, 500));
    println!(
        "# exact ground truth (top-500) computed in {:.1} s",
        gt.as_secs_f64()
    );

    // Exact search in the server (sequential scan), a few queries only.
    c.batch_execute("SET search_path = public, twotower; SET max_parallel_workers_per_gather = 0; SET enable_indexscan = off").unwrap();
    let exact_q: Vec<Vec<f32>> = queries.iter().take(5).cloned().collect();
    let exact = run_queries(
        &mut c,
        "SELECT id FROM items ORDER BY embedding <=> $1::real[] LIMIT $2",
        &exact_q,
        &truth[..5],
        10,
    );
    c.batch_execute("RESET enable_indexscan").unwrap();
    println!(
        "\n## exact search (sequential scan): {:.2} QPS, recall@10 {:.3}",
        exact.qps, exact.recall
    );

    // pg_twotower, at its defaults (TT_OPTIONS overrides them, for probes): the comparison a
    // user makes. The equal-parameter comparison follows pgvector's part.
    let options: String = env("TT_OPTIONS", String::new());
    let (_, build) = timed(|| build_index(&mut c, &options));
    let (size, orphans_note, label): (i64, String, String) = {
        let r = c
            .query_one(
                "SELECT pg_relation_size('items_tt_idx'),
                        format('%s items in graph, %s orphans; %s s in the server', graph_items, graph_orphans, build_seconds),
                        format('m = %s, ef_construction = %s, quantization = %s', m, ef_construction, quantization)
                   FROM index_info('items_tt_idx')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    let first = first_query(&host, port, &queries[0]);
    println!("\n## pg_twotower twotower_hnsw, {} ({label}): build {:.1} s, index {:.1} MB ({orphans_note}); first query of a new backend {:.1} ms (target <= 5 ms)",
        if options.is_empty() { "default options" } else { "TT_OPTIONS" },
        build.as_secs_f64(), size as f64 / 1048576.0, first.as_secs_f64() * 1e3);
    let sql = "SELECT id FROM items ORDER BY embedding <=> $1::real[] LIMIT $2";
    // One untimed pass first: it pages the freshly mapped image in.
    let def_ef = default_ef_search(&mut c);
    run_queries(&mut c, sql, &queries, &truth, 10);
    if only_fresh {
        let ins = fresh_inserts(&mut c, &data, &queries, &qdata, &truth, dims, clusters);
        // pgvector's build and the same COPY into it, for the side-by-side insert figures.
        if let Some(pbuild) = pgvector_table(&mut c, dims, cores, m, efc) {
            println!(
                "\n## pgvector hnsw (m = {m}, ef_construction = {efc}): build {:.1} s (pg_twotower's build at its defaults took {:.2}x pgvector's time; target <= 0.35x)",
                pbuild.as_secs_f64(),
                build.as_secs_f64() / pbuild.as_secs_f64()
            );
            pgvector_inserts(&mut c, dims, &ins);
        }
        return;
    }
    let tt_curve = sweep(&mut c, &queries, &truth, exact.qps, def_ef);
    if flag("TT_ONLY_CURVE") {
        return;
    }
    let only_pgvector = flag("TT_ONLY_PGVECTOR");
    let mut inserted = None;
    if !only_pgvector {
        for ef in [500, 800] {
            c.batch_execute(&format!("SET twotower.ef_search = {ef}"))
                .unwrap();
            let r500 = run_queries(&mut c, sql, &queries, &truth, 500);
            println!(
                "top-500 at ef_search={ef}: recall@500 {:.4}, {:.0} QPS, p99 {:.2} ms",
                r500.recall, r500.qps, r500.p99_ms
            );
        }

        inserted = Some(fresh_inserts(
            &mut c, &data, &queries, &qdata, &truth, dims, clusters,
        ));

        run_towers(&mut c, &data, dims, &host, port);
    }

    let pg_curve = pgvector(
        &mut c,
        PgvectorArgs {
            dims,
            cores,
            m,
            efc,
            build,
            qdata: &qdata,
            truth: &truth,
            inserted: inserted.as_ref(),
        },
    );
    let Some((pbuild, pg_curve)) = pg_curve else {
        return;
    };
    println!("\n### pg_twotower at its defaults ({label}) against pgvector at its defaults (m = 16, ef_construction = 64)");
    compare_curves(&tt_curve, &pg_curve);

    // Equal parameters: pg_twotower WITH (m, ef_construction) as pgvector's build.
    let equal = format!("m = {m}, ef_construction = {efc}");
    if only_pgvector {
        return;
    }
    if !label.starts_with(&equal) || !options.is_empty() {
        let (_, ebuild) = timed(|| build_index(&mut c, &equal));
        println!(
            "\n## pg_twotower at equal parameters ({equal}): build {:.1} s, {:.2}x pgvector's {:.1} s",
            ebuild.as_secs_f64(),
            ebuild.as_secs_f64() / pbuild.as_secs_f64(),
            pbuild.as_secs_f64()
        );
        run_queries(&mut c, sql, &queries, &truth, 10);
        let eq_curve = sweep(&mut c, &queries, &truth, exact.qps, def_ef);
        compare_curves(&eq_curve, &pg_curve);
    } else {
        println!(
            "\n(pg_twotower's defaults are the equal parameters: the comparison above is both)"
        );
    }
}

/// A new connection's first top-10 query (connect included), against the current index.
fn first_query(host: &str, port: u16, q: &[f32]) -> Duration {
    let mut c2 = Client::configure()
        .host(host)
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect(NoTls)
        .unwrap();
    c2.batch_execute("SET search_path = public, twotower")
        .unwrap();
    let q = q.to_vec();
    let t = Instant::now();
    c2.query(
        "SELECT id FROM items ORDER BY embedding <=> $1::real[] LIMIT 10",
        &[&q],
    )
    .unwrap();
    t.elapsed()
}

/// The ef_search sweep of the current pg_twotower index: (ef_search, recall@10, QPS) rows.
fn sweep(
    c: &mut Client,
    queries: &[Vec<f32>],
    truth: &[Vec<i64>],
    exact_qps: f64,
    def_ef: usize,
) -> Vec<(usize, f64, f64)> {
    let sql = "SELECT id FROM items ORDER BY embedding <=> $1::real[] LIMIT $2";
    println!(
        "| ef_search | recall@10 | QPS (k=10) | p99 ms | recall@100 | QPS (k=100) | QPS vs exact |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut efs = vec![10, 20, 40, 64, 100, 150, 200, 400, 800];
    if !efs.contains(&def_ef) {
        efs.push(def_ef);
        efs.sort_unstable();
    }
    let mut curve = Vec::new();
    for ef in efs {
        c.batch_execute(&format!("SET twotower.ef_search = {ef}"))
            .unwrap();
        let r10 = run_queries(c, sql, queries, truth, 10);
        let r100 = run_queries(c, sql, queries, truth, 100);
        println!(
            "| {ef}{} | {:.4} | {:.0} | {:.2} | {:.4} | {:.0} | {:.0}x |",
            if ef == def_ef { " (default)" } else { "" },
            r10.recall,
            r10.qps,
            r10.p99_ms,
            r100.recall,
            r100.qps,
            r10.qps / exact_qps
        );
        curve.push((ef, r10.recall, r10.qps));
    }
    c.batch_execute("RESET twotower.ef_search").unwrap();
    curve
}

/// Prints QPS at equal recall, and whether pg_twotower's curve is above pgvector's at every
/// pgvector point: the best pg_twotower QPS at a recall at least as high.
fn compare_curves(tt: &[(usize, f64, f64)], pg: &[(usize, f64, f64)]) {
    let best = |curve: &[(usize, f64, f64)], target: f64| {
        curve
            .iter()
            .filter(|x| x.1 >= target)
            .map(|x| x.2)
            .fold(0.0f64, f64::max)
    };
    for target in [0.90, 0.95, 0.99] {
        let (a, b) = (best(tt, target), best(pg, target));
        if a > 0.0 && b > 0.0 {
            println!(
                "QPS at recall@10 >= {target}: pg_twotower {a:.0}, pgvector {b:.0}: {:.2}x",
                a / b
            );
        }
    }
    let mut above = true;
    for &(ef, r, q) in pg {
        let ours = best(tt, r);
        let ok = ours > q;
        above &= ok;
        println!(
            "pgvector ef_search {ef} (recall@10 {r:.4}, {q:.0} QPS): pg_twotower at >= that recall {ours:.0} QPS ({:.2}x){}",
            ours / q,
            if ok { "" } else { " — BELOW" }
        );
    }
    println!(
        "curve: pg_twotower {} pgvector's at every pgvector point",
        if above { "above" } else { "NOT above" }
    );
}

/// Rows inserted after the build: 10 % more rows from the same distribution, then top-10
/// latency and recall at the default ef_search against exact search over all rows,
/// compared with the fresh build and with a REINDEX of all the rows (the inserts fold the rows
/// into the delta graph as they go; each measurement is the median of three runs), and after
/// VACUUM. Insert throughput and WAL volume (folds included) are printed. The inserted rows
/// are removed again afterwards. Target (index issue): after +10 % the latency at the same
/// recall stays within 1.5x of a fresh build, without REINDEX.
fn fresh_inserts(
    c: &mut Client,
    data: &[f32],
    queries: &[Vec<f32>],
    qdata: &[f32],
    truth: &[Vec<i64>],
    dims: usize,
    clusters: usize,
) -> Inserted {
    let n = data.len() / dims;
    let extra = (n / 10).max(1);
    let sql = "SELECT id FROM items ORDER BY embedding <=> $1::real[] LIMIT $2";
    let def_ef = default_ef_search(c);
    // The loaded rows' ground truth is the one computed at the start (top-500, of which the
    // first 10 are scored).
    // The fresh build at the default ef_search and wider, to compare at equal recall later.
    let fresh_curve = ef_curve(c, sql, queries, truth);
    let fresh = fresh_curve[0].1.clone();
    // The same distribution as the loaded rows: the generator continued past them and the
    // queries (same seed as main).
    let nq = qdata.len() / dims;
    let added = clustered(n + nq + extra, dims, clusters, 2024).split_off((n + nq) * dims);
    let lsn = |c: &mut Client| -> String {
        c.query_one("SELECT pg_current_wal_lsn()::text", &[])
            .unwrap()
            .get(0)
    };
    let wal_since = |c: &mut Client, from: &str| -> f64 {
        let b: i64 = c
            .query_one(
                "SELECT (pg_current_wal_lsn() - $1::text::pg_lsn)::int8",
                &[&from],
            )
            .unwrap()
            .get(0);
        b as f64 / 1048576.0
    };
    // TT_CHECKPOINT=1: the COPY starts right after a checkpoint (as one in a steady stream of
    // inserts would sooner or later): the first change of each page after it is logged whole.
    if flag("TT_CHECKPOINT") {
        c.batch_execute("CHECKPOINT").unwrap();
    }
    let wal_load = lsn(c);
    let (_, load) = timed(|| {
        copy_lines(
            c,
            "COPY items (id, embedding) FROM STDIN",
            added
                .chunks_exact(dims)
                .enumerate()
                .map(|(i, v)| format!("{}\t{}", n + 1 + i, literal(v))),
        )
    });
    let mut all = data.to_vec();
    all.extend_from_slice(&added);
    let load_wal = wal_since(c, &wal_load);
    let truth1 = ground_truth(&all, qdata, dims, 10);
    // A first pass maps the delta graph's new cache file (once per node and fold).
    run_queries(c, sql, &queries[..queries.len().min(10)], &truth1, 10);
    let after = median_run(c, sql, queries, &truth1, 10);
    let wal0 = lsn(c);
    let (_, vac) = timed(|| c.batch_execute("VACUUM items").unwrap());
    let wal = wal_since(c, &wal0);
    let delta: i64 = c
        .query_one("SELECT delta_items FROM index_info('items_tt_idx')", &[])
        .unwrap()
        .get(0);
    let vacuumed = median_run(c, sql, queries, &truth1, 10);
    // A fresh build of all the rows, measured minutes (not a quarter of an hour) after the
    // inserts: the fairest reference on a noisy machine.
    let (_, rebuild) = timed(|| c.batch_execute("REINDEX INDEX items_tt_idx").unwrap());
    run_queries(c, sql, &queries[..queries.len().min(10)], &truth1, 10);
    let rebuilt_curve = ef_curve(c, sql, queries, &truth1);
    let rebuilt = rebuilt_curve[0].1.clone();
    println!("\n## {extra} rows inserted after the build (+10 %), ef_search {def_ef} (the default), k = 10 (median of 3 runs each)");
    println!("| | recall@10 | QPS | mean ms | p99 ms | mean latency vs fresh build | vs rebuild of all rows |");
    println!("|---|---|---|---|---|---|---|");
    for (label, r) in [
        ("fresh build", &fresh),
        ("after the inserts", &after),
        ("after VACUUM", &vacuumed),
        ("REINDEX of all rows", &rebuilt),
    ] {
        println!(
            "| {label} | {:.4} | {:.0} | {:.2} | {:.2} | {:.2}x | {:.2}x |",
            r.recall,
            r.qps,
            1e3 / r.qps,
            r.p99_ms,
            fresh.qps / r.qps,
            rebuilt.qps / r.qps
        );
    }
    println!(
        "inserts (COPY, folds included): {:.1} s ({:.0} rows/s), {:.1} MB of WAL ({:.1} kB a row); VACUUM {:.1} s, {:.1} MB of WAL; {delta} rows added since the build (target: latency ratio <= 1.5x without REINDEX)",
        load.as_secs_f64(),
        extra as f64 / load.as_secs_f64(),
        load_wal,
        load_wal * 1024.0 / extra as f64,
        vac.as_secs_f64(),
        wal
    );
    println!(
        "REINDEX of the {} rows: {:.1} s",
        n + extra,
        rebuild.as_secs_f64()
    );
    // At equal recall: the smallest ef_search at which a fresh graph reaches the recall the
    // index has after the inserts (at the default ef_search), and its latency.
    for (label, curve) in [
        ("fresh build", &fresh_curve),
        ("REINDEX of all rows", &rebuilt_curve),
    ] {
        let (ef, r) = curve
            .iter()
            .find(|(_, r)| r.recall >= after.recall)
            .unwrap_or_else(|| curve.last().expect("measured"));
        println!(
            "at equal recall: {label} reaches recall@10 {:.4} (>= {:.4} after the inserts) at ef_search {ef}, {:.2} ms: after the inserts / {label} = {:.2}x",
            r.recall,
            after.recall,
            1e3 / r.qps,
            r.qps / after.qps
        );
    }
    c.batch_execute(&format!("DELETE FROM items WHERE id > {n}"))
        .unwrap();
    c.batch_execute("VACUUM items").unwrap();
    // Rebuild, so the parts that follow measure a freshly built index.
    c.batch_execute("REINDEX INDEX items_tt_idx").unwrap();
    Inserted {
        first_id: n + 1,
        rows: added,
        rows_per_s: extra as f64 / load.as_secs_f64(),
        wal_per_row: load_wal * 1048576.0 / extra as f64,
    }
}

/// The rows `fresh_inserts` added after the build, and what adding them cost pg_twotower.
struct Inserted {
    first_id: usize,
    rows: Vec<f32>,
    rows_per_s: f64,
    /// Bytes of WAL per row (table and index).
    wal_per_row: f64,
}

/// The same rows COPYed into pgvector's table after its HNSW build (`items_pgv`, made by
/// [`pgvector_table`]): rows per second and WAL bytes per row, side by side with pg_twotower's
/// figures of the same run; the rows are deleted again afterwards (and VACUUMed).
fn pgvector_inserts(c: &mut Client, dims: usize, ins: &Inserted) {
    let n = ins.rows.len() / dims;
    if flag("TT_CHECKPOINT") {
        c.batch_execute("CHECKPOINT").unwrap();
    }
    let from: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0);
    let (_, load) = timed(|| {
        copy_lines(
            c,
            "COPY items_pgv (id, v) FROM STDIN",
            ins.rows.chunks_exact(dims).enumerate().map(|(i, v)| {
                let text: Vec<String> = v.iter().map(|x| x.to_string()).collect();
                format!("{}\t[{}]", ins.first_id + i, text.join(","))
            }),
        )
    });
    let wal: i64 = c
        .query_one(
            "SELECT (pg_current_wal_lsn() - $1::text::pg_lsn)::int8",
            &[&from],
        )
        .unwrap()
        .get(0);
    let rows_per_s = n as f64 / load.as_secs_f64();
    let wal_per_row = wal as f64 / n as f64;
    println!("\n## {n} rows COPYed after the build: pg_twotower against pgvector's hnsw (the same rows, same run)");
    println!("| | rows/s | WAL a row |");
    println!("|---|---|---|");
    println!(
        "| pg_twotower (folds included) | {:.0} | {:.1} kB |",
        ins.rows_per_s,
        ins.wal_per_row / 1024.0
    );
    println!(
        "| pgvector hnsw | {:.0} | {:.1} kB |",
        rows_per_s,
        wal_per_row / 1024.0
    );
    println!(
        "pg_twotower / pgvector: rows/s {:.2}x (target >= 2x), WAL a row {:.2}x (target <= 0.5x)",
        ins.rows_per_s / rows_per_s,
        ins.wal_per_row / wal_per_row
    );
    c.batch_execute(&format!(
        "DELETE FROM items_pgv WHERE id >= {}",
        ins.first_id
    ))
    .unwrap();
    c.batch_execute("VACUUM items_pgv").unwrap();
}

struct PgvectorArgs<'a> {
    dims: usize,
    cores: usize,
    m: usize,
    efc: usize,
    build: Duration,
    qdata: &'a [f32],
    truth: &'a [Vec<i64>],
    /// The rows pg_twotower took after its build, for the same COPY into pgvector's index.
    inserted: Option<&'a Inserted>,
}

/// pgvector's table `items_pgv` (a `vector` copy of `items`) and its HNSW index built WITH
/// (m, efc): the build time, or `None` when pgvector is not installed.
fn pgvector_table(
    c: &mut Client,
    dims: usize,
    cores: usize,
    m: usize,
    efc: usize,
) -> Option<Duration> {
    let has_pgvector: bool = c
        .query_one(
            "SELECT count(*) > 0 FROM pg_available_extensions WHERE name = 'vector'",
            &[],
        )
        .unwrap()
        .get(0);
    if !has_pgvector {
        println!("\n## pgvector: not installed in this server — comparison skipped");
        return None;
    }
    c.batch_execute(&format!(
        "CREATE EXTENSION IF NOT EXISTS vector; DROP TABLE IF EXISTS items_pgv;
         CREATE TABLE items_pgv AS SELECT id, embedding::vector({dims}) AS v FROM items;
         SET max_parallel_maintenance_workers = {}",
        cores - 1
    ))
    .unwrap();
    // On its own: VACUUM cannot run inside the implicit transaction of a multi-statement batch.
    c.batch_execute("VACUUM ANALYZE items_pgv").unwrap();
    let (_, pbuild) = timed(|| {
        c.batch_execute(&format!("CREATE INDEX items_pgv_idx ON items_pgv USING hnsw (v vector_cosine_ops) WITH (m = {m}, ef_construction = {efc})")).unwrap()
    });
    Some(pbuild)
}

/// pgvector's HNSW on a copy of `items`, built WITH (m, efc) (its defaults at 16 and 64), and
/// its ef_search sweep. `None` when pgvector is not installed.
fn pgvector(c: &mut Client, a: PgvectorArgs) -> Option<(Duration, Curve)> {
    let PgvectorArgs {
        dims,
        cores,
        m,
        efc,
        build,
        qdata,
        truth,
        inserted,
    } = a;
    let pbuild = pgvector_table(c, dims, cores, m, efc)?;
    let psize: i64 = c
        .query_one("SELECT pg_relation_size('items_pgv_idx')", &[])
        .unwrap()
        .get(0);
    println!(
        "\n## pgvector hnsw (m = {m}, ef_construction = {efc}): build {:.1} s (pg_twotower's build at its defaults took {:.2}x pgvector's time; target <= 0.35x), index {:.1} MB",
        pbuild.as_secs_f64(),
        build.as_secs_f64() / pbuild.as_secs_f64(),
        psize as f64 / 1048576.0
    );
    let pq: Vec<String> = qdata
        .chunks_exact(dims)
        .map(|v| {
            format!(
                "[{}]",
                v.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        })
        .collect();
    println!("| hnsw.ef_search | recall@10 | QPS (k=10) | p99 ms |");
    println!("|---|---|---|---|");
    let mut pg_curve = Vec::new();
    for ef in [10, 20, 40, 64, 100, 200, 400, 800] {
        c.batch_execute(&format!("SET hnsw.ef_search = {ef}"))
            .unwrap();
        let r = run_queries(
            c,
            "SELECT id FROM items_pgv ORDER BY v <=> $1::text::vector LIMIT $2",
            &pq,
            truth,
            10,
        );
        println!(
            "| {ef} | {:.4} | {:.0} | {:.2} |",
            r.recall, r.qps, r.p99_ms
        );
        pg_curve.push((ef, r.recall, r.qps));
    }
    // After the sweep: the rows go in, are measured and deleted again before the next part.
    if let Some(ins) = inserted {
        pgvector_inserts(c, dims, ins);
    }
    ours_on_vector(c, &pq, truth, pbuild, &pg_curve);
    Some((pbuild, pg_curve))
}

/// pg_twotower's index on the same pgvector `vector` column (pg_twotower_pgvector, at its
/// defaults), after pgvector's index is dropped: build time and the ef_search sweep with the
/// same query text, side by side with pgvector's curve. The migration a pgvector user makes.
fn ours_on_vector(
    c: &mut Client,
    pq: &[String],
    truth: &[Vec<i64>],
    pbuild: Duration,
    pg_curve: &[(usize, f64, f64)],
) {
    if c.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_twotower_pgvector")
        .is_err()
    {
        println!("\n## pg_twotower on the vector column: pg_twotower_pgvector is not installed — skipped");
        return;
    }
    c.batch_execute("DROP INDEX IF EXISTS items_pgv_idx; SET maintenance_work_mem = '4GB'")
        .unwrap();
    let (_, build) = timed(|| {
        c.batch_execute(
            "CREATE INDEX items_pgv_tt ON items_pgv USING twotower_hnsw (v vector_cosine_ops)",
        )
        .unwrap()
    });
    println!(
        "\n## pg_twotower twotower_hnsw on pgvector's vector column (vector_cosine_ops, defaults): build {:.1} s, {:.2}x pgvector's hnsw on the same column ({:.1} s)",
        build.as_secs_f64(),
        build.as_secs_f64() / pbuild.as_secs_f64(),
        pbuild.as_secs_f64()
    );
    let sql = "SELECT id FROM items_pgv ORDER BY v <=> $1::text::vector LIMIT $2";
    // One untimed pass first: it pages the freshly mapped image in.
    run_queries(c, sql, pq, truth, 10);
    println!("| twotower.ef_search | recall@10 | QPS (k=10) | p99 ms |");
    println!("|---|---|---|---|");
    let mut curve = Vec::new();
    for ef in [10, 20, 40, 64, 100, 200, 400, 800] {
        c.batch_execute(&format!("SET twotower.ef_search = {ef}"))
            .unwrap();
        let r = run_queries(c, sql, pq, truth, 10);
        println!(
            "| {ef} | {:.4} | {:.0} | {:.2} |",
            r.recall, r.qps, r.p99_ms
        );
        curve.push((ef, r.recall, r.qps));
    }
    c.batch_execute("RESET twotower.ef_search; DROP INDEX items_pgv_tt")
        .unwrap();
    println!("\n### on the same vector column: pg_twotower against pgvector's hnsw");
    compare_curves(&curve, pg_curve);
}

/// (Re)builds the pg_twotower index on `items`.
/// `options` is the WITH list ("" = the index's defaults).
fn build_index(c: &mut Client, options: &str) {
    c.batch_execute("SET search_path = public, twotower; DROP INDEX IF EXISTS items_tt_idx; SET maintenance_work_mem = '4GB'")
        .unwrap();
    let with = if options.is_empty() {
        String::new()
    } else {
        format!(" WITH ({options})")
    };
    c.batch_execute(&format!(
        "CREATE INDEX items_tt_idx ON items USING twotower_hnsw (embedding real_cosine_ops){with}"
    ))
    .unwrap();
}

/// The server's `twotower.ef_search` after a RESET (the default a user gets).
fn default_ef_search(c: &mut Client) -> usize {
    c.batch_execute("RESET twotower.ef_search").unwrap();
    c.query_one("SELECT current_setting('twotower.ef_search')::int", &[])
        .unwrap()
        .get::<_, i32>(0) as usize
}

/// An environment flag: set to anything but "" or "0".
fn flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}
