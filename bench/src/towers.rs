//! Towers and recall: `embed_user` latency for a realistic user tower (client round trip, server
//! side, in-process, and numpy on the same weights and inputs), item-tower refresh throughput,
//! and one-call `recall` top-500 latency and quality over the `items` index.
//!
//! Configuration by environment: TT_EMBED_CALLS (2000), TT_RECALL_CALLS (500),
//! TT_ITEMS_REFRESH (200000), TT_OUT (bench/out), TT_PYTHON (the interpreter for
//! bench/numpy_tower.py; default bench/out/venv/bin/python when it exists).

use crate::{env, ground_truth};
use postgres::Client;
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use twotower_testkit::towers as synth;
use twotower_tower::{forward_parallel, Model};

const USER_SEED: u64 = 11;
const ITEM_SEED: u64 = 12;
/// Input streams: embed_user latency, warm-up, recall (disjoint index ranges of one stream).
const INPUT_SEED: u64 = 2024;
const WARMUP_BASE: usize = 1_000_000;
const RECALL_BASE: usize = 2_000_000;
const ITEM_INPUT_SEED: u64 = 7;

const EMBED_P99_TARGET_MS: f64 = 0.2;
const RECALL_P99_TARGET_MS: f64 = 5.0;
const RECALL500_TARGET: f64 = 0.95;

/// Latency summary in milliseconds.
#[derive(Clone, Copy)]
struct Lat {
    p50: f64,
    p99: f64,
    mean: f64,
}

fn lat(mut v: Vec<Duration>) -> Lat {
    assert!(!v.is_empty());
    v.sort();
    let n = v.len();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Lat {
        p50: ms(v[n * 50 / 100]),
        p99: ms(v[(n * 99 / 100).min(n - 1)]),
        mean: v.iter().map(|d| ms(*d)).sum::<f64>() / n as f64,
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "**holds**"
    } else {
        "**missed**"
    }
}

/// Median of `reps` timings of `f` (a whole statement), in seconds.
fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn out_dir() -> PathBuf {
    std::env::var_os("TT_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("out"))
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// One value of a COPY text row: numbers and strings as they are, string lists as array
/// literals, null as \N.
fn copy_field(v: Option<&Value>) -> String {
    fn esc(s: &str) -> String {
        s.replace('\\', "\\\\")
            .replace('\t', "\\t")
            .replace('\n', "\\n")
    }
    match v {
        None | Some(Value::Null) => "\\N".into(),
        Some(Value::String(s)) => esc(s),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Array(a)) => {
            let parts: Vec<String> = a
                .iter()
                .map(|x| match x {
                    Value::String(s) => {
                        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
                    }
                    other => other.to_string(),
                })
                .collect();
            esc(&format!("{{{}}}", parts.join(",")))
        }
        Some(Value::Object(_)) => panic!("object-valued item feature"),
    }
}

pub struct Towers<'a> {
    pub c: &'a mut Client,
    /// Where `c` is connected (for a fresh connection's first-call cost).
    pub host: &'a str,
    pub port: u16,
    /// The item vectors of `items` (ids 1..=n), row-major.
    pub data: &'a [f32],
    pub dims: usize,
}

struct EmbedFigures {
    baseline: Lat,
    server_ms: f64,
}

impl Towers<'_> {
    pub fn run(&mut self) {
        let out = out_dir().join("towers");
        std::fs::create_dir_all(&out).expect("creating the output directory");
        self.c
            .batch_execute("SET search_path = public, twotower; SET max_parallel_workers_per_gather = 0; RESET twotower.ef_search")
            .unwrap();

        let (uspec, uweights) = synth::realistic_user_tower(USER_SEED);
        let (ispec, iweights) = synth::realistic_item_tower(ITEM_SEED);
        write(&out.join("user_spec.json"), uspec.as_bytes());
        write(&out.join("user_weights.safetensors"), &uweights);
        write(&out.join("item_spec.json"), ispec.as_bytes());
        write(&out.join("item_weights.safetensors"), &iweights);
        let user_model = Model::load(&uspec, &uweights).expect("user tower");
        let item_model = Model::load(&ispec, &iweights).expect("item tower");

        let import = "SELECT twotower.import_model($1, $2::jsonb, $3, true)";
        let uspec_v: Value = serde_json::from_str(&uspec).unwrap();
        let ispec_v: Value = serde_json::from_str(&ispec).unwrap();
        let mut import_one = |name: &str, spec: &Value, weights: &Vec<u8>| -> (i32, _) {
            let s = Instant::now();
            let v = self
                .c
                .query_one(import, &[&name, spec, weights])
                .unwrap_or_else(|e| panic!("import_model {name}: {e}"))
                .get(0);
            (v, s.elapsed())
        };
        let (uver, ut) = import_one("bench_user", &uspec_v, &uweights);
        let (iver, it) = import_one("bench_item", &ispec_v, &iweights);
        println!("\n## Towers and recall");
        println!(
            "# models: bench_user v{uver} ({} parameters, {:.1} MB safetensors, import {:.0} ms), bench_item v{iver} ({} parameters, {:.1} MB, import {:.0} ms); spec/weights/inputs in {}",
            user_model.parameter_count(),
            uweights.len() as f64 / 1048576.0,
            ut.as_secs_f64() * 1e3,
            item_model.parameter_count(),
            iweights.len() as f64 / 1048576.0,
            it.as_secs_f64() * 1e3,
            out.display()
        );

        // Background work skews latencies on a small machine: flush the WAL of the index build
        // now, and leave autovacuum nothing to do after the refresh's writes.
        self.c.batch_execute("CHECKPOINT").unwrap();
        println!("# load average before: {}", loadavg());
        let e = self.embed_user(&out, &user_model);
        self.refresh(&item_model);
        for t in [
            "bench_item_features",
            "bench_item_vectors",
            "bench_item_vectors_sql",
        ] {
            self.c
                .batch_execute(&format!("VACUUM ANALYZE {t}"))
                .unwrap();
        }
        self.c.batch_execute("CHECKPOINT").unwrap();
        self.recall(&e);
        println!("# load average after: {}", loadavg());
    }

    /// embed_user latency, next to protocol, server-side, in-process and numpy figures.
    fn embed_user(&mut self, out: &Path, model: &Model) -> EmbedFigures {
        let calls: usize = env("TT_EMBED_CALLS", 2000);
        let warm = 200;
        let inputs: Vec<Value> = (0..calls)
            .map(|i| synth::realistic_user_input(INPUT_SEED, i))
            .collect();
        write(
            &out.join("inputs.json"),
            serde_json::to_string(&inputs).unwrap().as_bytes(),
        );

        // The first embed_user of a new connection reads and decodes the model from the
        // catalogue (then it is cached in the backend).
        let fresh = || {
            let mut c2 = Client::configure()
                .host(self.host)
                .port(self.port)
                .user("postgres")
                .dbname("postgres")
                .connect(postgres::NoTls)
                .expect("connect");
            let s = Instant::now();
            c2.query_one(
                "SELECT twotower.embed_user('bench_user', $1::jsonb)",
                &[&inputs[0]],
            )
            .unwrap();
            let first = s.elapsed();
            let s = Instant::now();
            c2.query_one(
                "SELECT twotower.embed_user('bench_user', $1::jsonb)",
                &[&inputs[1]],
            )
            .unwrap();
            (first, s.elapsed())
        };
        let (first_call, second_call) = fresh();
        let stmt = self
            .c
            .prepare("SELECT twotower.embed_user($1, $2::jsonb)")
            .expect("prepare embed_user");
        for i in 0..warm {
            let x = synth::realistic_user_input(INPUT_SEED, WARMUP_BASE + i);
            self.c
                .query_one(&stmt, &[&"bench_user", &x])
                .expect("embed_user warm-up");
        }
        let mut times = Vec::with_capacity(calls);
        let mut outputs: Vec<Vec<f32>> = Vec::with_capacity(calls);
        for x in &inputs {
            let s = Instant::now();
            let row = self
                .c
                .query_one(&stmt, &[&"bench_user", x])
                .expect("embed_user");
            times.push(s.elapsed());
            outputs.push(row.get(0));
        }
        let client = lat(times);
        // The same vectors as the core crate computes in-process (a check that the import kept
        // the weights; the engines are the same code, so the difference should be zero).
        let mut worst = 0f32;
        for (x, got) in inputs.iter().zip(&outputs) {
            let want = model.embed(x).expect("in-process embed");
            for (a, b) in want.iter().zip(got) {
                worst = worst.max((a - b).abs());
            }
        }
        let n_cmp = outputs.len().min(200);
        write(
            &out.join("pg_outputs.json"),
            serde_json::to_string(&outputs[..n_cmp]).unwrap().as_bytes(),
        );

        // Protocol baseline: the same parameters, a trivial statement.
        let base = self
            .c
            .prepare("SELECT $1::text IS NOT NULL AND $2::jsonb IS NOT NULL")
            .unwrap();
        for x in inputs.iter().take(warm) {
            self.c.query_one(&base, &[&"bench_user", x]).unwrap();
        }
        let mut times = Vec::with_capacity(calls);
        for x in &inputs {
            let s = Instant::now();
            self.c.query_one(&base, &[&"bench_user", x]).unwrap();
            times.push(s.elapsed());
        }
        let baseline = lat(times);

        // The same two loops with this program and its backend pinned to one core: on VMs a
        // cross-core wake-up costs tens of microseconds each way, which dominates a round trip
        // this short. Best effort (needs `taskset` and the right to set the backend's affinity).
        let backend: i32 = self
            .c
            .query_one("SELECT pg_backend_pid()", &[])
            .unwrap()
            .get(0);
        // Computed before pinning: available_parallelism() follows this process's affinity.
        let all = format!(
            "0-{}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                - 1
        );
        let pinned = if pin(backend as u32, "0") && pin(std::process::id(), "0") {
            let mut run = |stmt: &postgres::Statement| {
                for x in inputs.iter().take(warm) {
                    self.c.query_one(stmt, &[&"bench_user", x]).unwrap();
                }
                let mut times = Vec::with_capacity(calls);
                for x in &inputs {
                    let s = Instant::now();
                    self.c.query_one(stmt, &[&"bench_user", x]).unwrap();
                    times.push(s.elapsed());
                }
                lat(times)
            };
            let r = (run(&stmt), run(&base));
            Some(r)
        } else {
            None
        };
        pin(backend as u32, &all);
        pin(std::process::id(), &all);

        // Server side: one statement over the same inputs in a temp table.
        self.c
            .batch_execute(
                "DROP TABLE IF EXISTS tt_user_inputs; CREATE TEMP TABLE tt_user_inputs (i int PRIMARY KEY, f jsonb)",
            )
            .unwrap();
        let arr = Value::Array(inputs.clone());
        self.c
            .execute(
                "INSERT INTO tt_user_inputs SELECT o, f FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS t(f, o)",
                &[&arr],
            )
            .unwrap();
        self.c.batch_execute("ANALYZE tt_user_inputs").unwrap();
        let q_embed = "SELECT count(twotower.embed_user('bench_user', f)) FROM tt_user_inputs";
        let q_scan = "SELECT count(f) FROM tt_user_inputs";
        let q_batch = "SELECT count(embedding) FROM twotower.embed_users('bench_user', ARRAY(SELECT f FROM tt_user_inputs ORDER BY i))";
        self.c.query_one(q_embed, &[]).unwrap();
        let server = median_secs(5, || {
            self.c.query_one(q_embed, &[]).unwrap();
        });
        let scan = median_secs(5, || {
            self.c.query_one(q_scan, &[]).unwrap();
        });
        self.c.query_one(q_batch, &[]).unwrap();
        let batch = median_secs(5, || {
            self.c.query_one(q_batch, &[]).unwrap();
        });
        let per = |s: f64| s / calls as f64 * 1e3;
        let server_ms = per(server);

        // In-process: the same core crate without PostgreSQL, from JSON text (as the server
        // parses it) and from an already parsed value.
        let texts: Vec<String> = inputs.iter().map(|x| x.to_string()).collect();
        let mut t_text = Vec::with_capacity(calls);
        let mut t_value = Vec::with_capacity(calls);
        for _ in 0..2 {
            t_text.clear();
            t_value.clear();
            for (x, s) in inputs.iter().zip(&texts) {
                let t = Instant::now();
                let v: Value = serde_json::from_str(s).unwrap();
                std::hint::black_box(model.embed(&v).unwrap());
                t_text.push(t.elapsed());
                let t = Instant::now();
                std::hint::black_box(model.embed(x).unwrap());
                t_value.push(t.elapsed());
            }
        }
        let in_text = lat(t_text);
        let in_value = lat(t_value);

        let numpy = run_numpy(out, calls);

        println!(
            "\n### embed_user: realistic user tower (10 fields, 16-d embeddings, {} -> 256 -> 256 -> 64, l2-normalised, cosine), {calls} varied inputs, one client, after {warm} warm-up calls",
            model.input_width()
        );
        println!("| what | p50 ms | p99 ms | mean ms |");
        println!("|---|---|---|---|");
        println!(
            "| client round trip, prepared `SELECT twotower.embed_user($1, $2::jsonb)` | {:.3} | {:.3} | {:.3} |",
            client.p50, client.p99, client.mean
        );
        println!(
            "| client round trip, same parameters, `SELECT $1::text IS NOT NULL AND $2::jsonb IS NOT NULL` (protocol baseline) | {:.3} | {:.3} | {:.3} |",
            baseline.p50, baseline.p99, baseline.mean
        );
        match pinned {
            Some((p, b)) => {
                println!(
                    "| the same embed_user round trip, client and backend pinned to one core (no cross-core wake-ups) | {:.3} | {:.3} | {:.3} |",
                    p.p50, p.p99, p.mean
                );
                println!(
                    "| the same protocol baseline, pinned to one core | {:.3} | {:.3} | {:.3} |",
                    b.p50, b.p99, b.mean
                );
            }
            None => println!("| pinned round trips: skipped (taskset unavailable or not permitted) | – | – | – |"),
        }
        println!(
            "| server side: `SELECT count(embed_user('bench_user', f))` over {calls} rows of a temp table, total / {calls} (scan alone: {:.4}) | – | – | {:.4} |",
            per(scan),
            server_ms
        );
        println!(
            "| server side: `embed_users('bench_user', <array of {calls}>)`, both cores, total / {calls} | – | – | {:.4} |",
            per(batch)
        );
        println!(
            "| in-process Rust (twotower-tower, no PostgreSQL): parse JSON text + encode + forward | {:.4} | {:.4} | {:.4} |",
            in_text.p50, in_text.p99, in_text.mean
        );
        println!(
            "| in-process Rust: encode + forward of a parsed value | {:.4} | {:.4} | {:.4} |",
            in_value.p50, in_value.p99, in_value.mean
        );
        match &numpy {
            Ok(np) => {
                let g = |k: &str, f: &str| np[k][f].as_f64().unwrap_or(f64::NAN);
                println!(
                    "| numpy {} f32: `tower_ref.embed_batch(model, [x], np.float32)`, one input per call | {:.4} | {:.4} | {:.4} |",
                    np["numpy"].as_str().unwrap_or("?"),
                    g("f32", "p50_ms"),
                    g("f32", "p99_ms"),
                    g("f32", "mean_ms")
                );
                println!(
                    "| numpy f64 (tower_ref's reference precision), one input per call | {:.4} | {:.4} | {:.4} |",
                    g("f64", "p50_ms"),
                    g("f64", "p99_ms"),
                    g("f64", "mean_ms")
                );
                println!(
                    "| numpy f32, one `embed_batch` over all {calls} inputs, total / {calls} | – | – | {:.4} |",
                    np["batch_f32_ms"].as_f64().unwrap_or(f64::NAN)
                );
            }
            Err(why) => println!("| numpy | – | – | – |\n\nnumpy comparison skipped: {why}"),
        }
        println!();
        println!(
            "embed_user p99 (client round trip) {:.3} ms vs target ≤ {EMBED_P99_TARGET_MS} ms: {}{}; server-side per call {:.4} ms; protocol baseline p50 {:.3} ms.",
            client.p99,
            verdict(client.p99 <= EMBED_P99_TARGET_MS),
            pinned
                .map(|(p, _)| format!(" (pinned to one core: p99 {:.3} ms, {})", p.p99, verdict(p.p99 <= EMBED_P99_TARGET_MS)))
                .unwrap_or_default(),
            server_ms,
            baseline.p50
        );
        if let Ok(np) = &numpy {
            let np50 = np["f32"]["p50_ms"].as_f64().unwrap_or(f64::NAN);
            let np64 = np["f64"]["p50_ms"].as_f64().unwrap_or(f64::NAN);
            println!(
                "numpy f32 p50 / pg_twotower server-side per call = {:.1}x (f64: {:.1}x); numpy f32 p50 / embed_user client p50 = {:.1}x. Same weights and inputs: max |numpy f32 − embed_user| = {:.2e} over {} vectors.",
                np50 / server_ms,
                np64 / server_ms,
                np50 / client.p50,
                np["max_abs_diff"].as_f64().unwrap_or(f64::NAN),
                np["compared"].as_u64().unwrap_or(0)
            );
        }
        println!(
            "embed_user vs the core crate in-process: max |difference| {worst:.2e} over {calls} vectors. First embed_user of a new connection (reads and decodes the {:.1} MB model) {:.1} ms, its second call {:.2} ms (unprepared statements).",
            model.memory_bytes() as f64 / 1048576.0,
            first_call.as_secs_f64() * 1e3,
            second_call.as_secs_f64() * 1e3
        );
        EmbedFigures {
            baseline,
            server_ms,
        }
    }

    /// Item-tower refresh throughput into an empty and then a full target.
    fn refresh(&mut self, model: &Model) {
        let n: usize = env("TT_ITEMS_REFRESH", 200_000);
        let rows: Vec<Value> = (0..n)
            .map(|i| synth::realistic_item_input(ITEM_INPUT_SEED, i))
            .collect();
        let cols = ["item_id", "category", "tags", "price", "popularity"];
        self.c
            .batch_execute(
                "DROP TABLE IF EXISTS bench_item_features, bench_item_vectors;
                 CREATE TABLE bench_item_features (item_id bigint PRIMARY KEY, category text, tags text[], price double precision, popularity bigint);
                 CREATE TABLE bench_item_vectors (id bigint PRIMARY KEY, embedding real[])",
            )
            .unwrap();
        let load = Instant::now();
        crate::copy_lines(
            self.c,
            "COPY bench_item_features (item_id, category, tags, price, popularity) FROM STDIN",
            rows.iter().map(|r| {
                cols.iter()
                    .map(|c| copy_field(r.get(*c)))
                    .collect::<Vec<_>>()
                    .join("\t")
            }),
        );
        self.c
            .batch_execute("VACUUM ANALYZE bench_item_features")
            .unwrap();
        let load = load.elapsed();

        // Every item is counted once: inserted the first time, unchanged the second.
        let sql = "SELECT inserted + updated + unchanged FROM twotower.refresh_item_vectors('bench_item', 'bench_item_features', 'bench_item_vectors', id_column => 'item_id')";
        let run = |c: &mut Client| {
            let s = Instant::now();
            let got: i64 = c.query_one(sql, &[]).expect("refresh_item_vectors").get(0);
            let t = s.elapsed().as_secs_f64();
            assert_eq!(
                got as usize, n,
                "refresh_item_vectors wrote {got} of {n} items"
            );
            t
        };
        let t_insert = run(self.c);
        let count: i64 = self
            .c
            .query_one("SELECT count(*) FROM bench_item_vectors", &[])
            .unwrap()
            .get(0);
        let t_upsert = run(self.c);
        let count2: i64 = self
            .c
            .query_one("SELECT count(*) FROM bench_item_vectors", &[])
            .unwrap()
            .get(0);
        // The written vectors equal embed_item of the same rows (first 100).
        let diff: Option<f32> = self
            .c
            .query_one(
                "SELECT max(abs(a.x - b.x)) FROM
                   (SELECT v.id, u.x, u.o FROM bench_item_vectors v, unnest(v.embedding) WITH ORDINALITY u(x, o) WHERE v.id <= 100) a
                   JOIN (SELECT f.item_id, u.x, u.o FROM bench_item_features f,
                                unnest(twotower.embed_item('bench_item', to_jsonb(f))) WITH ORDINALITY u(x, o)
                          WHERE f.item_id <= 100) b ON a.id = b.item_id AND a.o = b.o",
                &[],
            )
            .unwrap()
            .get(0);
        // The same work as plain SQL, row at a time on one core, into an empty twin target.
        self.c
            .batch_execute(
                "DROP TABLE IF EXISTS bench_item_vectors_sql;
                 CREATE TABLE bench_item_vectors_sql (id bigint PRIMARY KEY, embedding real[])",
            )
            .unwrap();
        let s = Instant::now();
        self.c
            .execute(
                "INSERT INTO bench_item_vectors_sql SELECT item_id, twotower.embed_item('bench_item', to_jsonb(f)) FROM bench_item_features f",
                &[],
            )
            .unwrap();
        let t_sql = s.elapsed().as_secs_f64();
        // Row-at-a-time embed_item (one core, no writes), for scale.
        let q_item = "SELECT count(twotower.embed_item('bench_item', to_jsonb(f))) FROM bench_item_features f";
        let s = Instant::now();
        self.c.query_one(q_item, &[]).unwrap();
        let t_item = s.elapsed().as_secs_f64();
        let q_json = "SELECT count(to_jsonb(f)) FROM bench_item_features f";
        let s = Instant::now();
        self.c.query_one(q_json, &[]).unwrap();
        let t_json = s.elapsed().as_secs_f64();
        // In-process: encode + forward_parallel over all rows, no PostgreSQL.
        let threads = std::thread::available_parallelism()
            .map(|x| x.get())
            .unwrap_or(1);
        let s = Instant::now();
        let enc: Vec<_> = rows
            .iter()
            .map(|r| model.encode(r, false).unwrap())
            .collect();
        let t_enc = s.elapsed().as_secs_f64();
        let s = Instant::now();
        std::hint::black_box(forward_parallel(model, &enc, threads));
        let t_fwd = s.elapsed().as_secs_f64();

        let rate = |t: f64| n as f64 / t;
        println!(
            "\n### item-vector refresh: realistic item tower (5 fields, {} -> 128 -> 64, cosine), {n} items (loaded by COPY in {:.1} s)",
            model.input_width(),
            load.as_secs_f64()
        );
        println!("| what | seconds | items/s |");
        println!("|---|---|---|");
        println!(
            "| `refresh_item_vectors('bench_item', 'bench_item_features', 'bench_item_vectors', id_column => 'item_id')` into an empty target (id bigint PK, embedding real[]) | {t_insert:.2} | {:.0} |",
            rate(t_insert)
        );
        println!(
            "| the same again into the full target (nothing changed: every vector compared, none written) | {t_upsert:.2} | {:.0} |",
            rate(t_upsert)
        );
        println!(
            "| plain SQL into an empty twin target: `INSERT INTO bench_item_vectors_sql SELECT item_id, embed_item('bench_item', to_jsonb(f)) FROM bench_item_features f` (one core) | {t_sql:.2} | {:.0} |",
            rate(t_sql)
        );
        println!(
            "| `SELECT count(embed_item('bench_item', to_jsonb(f))) FROM bench_item_features f` (one core, no writes) | {t_item:.2} | {:.0} |",
            rate(t_item)
        );
        println!(
            "| `SELECT count(to_jsonb(f)) FROM bench_item_features f` (reading the rows as jsonb only) | {t_json:.2} | {:.0} |",
            rate(t_json)
        );
        println!(
            "| in-process Rust: encode (one core) + `forward_parallel` ({threads} threads), no PostgreSQL | {:.2} | {:.0} |",
            t_enc + t_fwd,
            rate(t_enc + t_fwd)
        );
        println!(
            "\nTarget rows after the first run {count}, after the second {count2}; refreshed vectors vs `embed_item` of the same rows (first 100): max |difference| {}.",
            diff.map(|d| format!("{d:.2e}")).unwrap_or_else(|| "n/a (no rows compared)".into())
        );
    }

    /// recall() latency (k = 500, 100, 500 with 50 exclusions) and recall@k against exact search
    /// of the same user vectors.
    fn recall(&mut self, e: &EmbedFigures) {
        let calls: usize = env("TT_RECALL_CALLS", 500);
        let dims = self.dims;
        let n_items = self.data.len() / dims;
        let inputs: Vec<Value> = (0..calls)
            .map(|i| synth::realistic_user_input(INPUT_SEED, RECALL_BASE + i))
            .collect();
        let ef: i32 = self
            .c
            .query_one("SELECT current_setting('twotower.ef_search')::int", &[])
            .unwrap()
            .get(0);

        // The user vectors, for the exact ground truth.
        let emb = self
            .c
            .prepare("SELECT twotower.embed_user('bench_user', $1::jsonb)")
            .unwrap();
        let mut uvecs = Vec::with_capacity(calls * dims);
        for x in &inputs {
            let v: Vec<f32> = self.c.query_one(&emb, &[x]).unwrap().get(0);
            assert_eq!(v.len(), dims, "user tower output width vs items' dims");
            uvecs.extend_from_slice(&v);
        }
        let gt_start = Instant::now();
        // 600 > 500 + 50: the exact top-500 among the items a 50-id exclusion list leaves.
        let truth = ground_truth(self.data, &uvecs, dims, 600.min(n_items - 1));
        let gt = gt_start.elapsed();

        let stmt = self
            .c
            .prepare("SELECT item_id, score, rank FROM twotower.recall('bench_user', 'items_tt_idx', $1::jsonb, $2)")
            .unwrap();
        let stmt_ex = self
            .c
            .prepare("SELECT item_id, score, rank FROM twotower.recall('bench_user', 'items_tt_idx', $1::jsonb, $2, $3)")
            .unwrap();
        // Untimed warm-up: maps the index image into this backend and pages in the parts of
        // the graph these users' searches visit (one pass over all of them).
        let first = Instant::now();
        self.c.query(&stmt, &[&inputs[0], &500i32]).unwrap();
        let first = first.elapsed();
        for x in &inputs {
            self.c.query(&stmt, &[x, &500i32]).unwrap();
        }

        struct Run {
            lat: Lat,
            qps: f64,
            recall: f64,
            rows: f64,
            results: Vec<Vec<i64>>,
            score_err: f32,
            bad_order: usize,
            /// Mean score of the last row returned.
            last_score: f64,
        }
        let data = self.data;
        let measure = |c: &mut Client, k: i32, exclude: Option<&[Vec<i64>]>| -> Run {
            let mut times = Vec::with_capacity(calls);
            let mut results = Vec::with_capacity(calls);
            let mut hits = 0usize;
            let mut wanted = 0usize;
            let mut rows_total = 0usize;
            let mut score_err = 0f32;
            let mut bad_order = 0usize;
            let mut last = 0f64;
            let t0 = Instant::now();
            for (i, x) in inputs.iter().enumerate() {
                let s = Instant::now();
                let rows = match exclude {
                    None => c.query(&stmt, &[x, &k]),
                    Some(ex) => c.query(&stmt_ex, &[x, &k, &ex[i]]),
                }
                .expect("recall");
                times.push(s.elapsed());
                rows_total += rows.len();
                let ids: Vec<i64> = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
                // Scores are cosine similarities of the user vector and the stored item vector.
                let u = &uvecs[i * dims..(i + 1) * dims];
                let mut prev = f32::INFINITY;
                for (j, r) in rows.iter().enumerate() {
                    let (id, score, rank): (i64, f32, i32) = (r.get(0), r.get(1), r.get(2));
                    if rank as usize != j + 1 || score > prev + 1e-6 {
                        bad_order += 1;
                    }
                    prev = score;
                    if j + 1 == rows.len() {
                        last += score as f64;
                    }
                    let v = &data[(id as usize - 1) * dims..id as usize * dims];
                    let want: f32 = u.iter().zip(v).map(|(a, b)| a * b).sum();
                    score_err = score_err.max((want - score).abs());
                }
                // Exact top-k among the items not excluded.
                let skip: HashSet<i64> = exclude
                    .map(|ex| ex[i].iter().copied().collect())
                    .unwrap_or_default();
                let exact: Vec<i64> = truth[i]
                    .iter()
                    .copied()
                    .filter(|id| !skip.contains(id))
                    .take(k as usize)
                    .collect();
                let got: HashSet<i64> = ids.iter().copied().collect();
                hits += exact.iter().filter(|id| got.contains(id)).count();
                wanted += exact.len();
                results.push(ids);
            }
            let total = t0.elapsed().as_secs_f64();
            Run {
                lat: lat(times),
                qps: calls as f64 / total,
                recall: hits as f64 / wanted.max(1) as f64,
                rows: rows_total as f64 / calls as f64,
                results,
                score_err,
                bad_order,
                last_score: last / calls as f64,
            }
        };
        let r500 = measure(self.c, 500, None);
        let r100 = measure(self.c, 100, None);
        // Exclusions that matter: 50 of each user's own top-100 (every other one), as a
        // "seen items" list would be.
        let excl: Vec<Vec<i64>> = r500
            .results
            .iter()
            .map(|ids| ids.iter().take(100).step_by(2).copied().collect())
            .collect();
        let rex = measure(self.c, 500, Some(&excl));
        let leaked = rex
            .results
            .iter()
            .zip(&excl)
            .map(|(ids, ex)| ids.iter().filter(|id| ex.contains(id)).count())
            .sum::<usize>();
        let short = excl.iter().any(|ex| ex.len() != 50);

        // Server side: one statement over the same inputs.
        self.c
            .batch_execute("DROP TABLE IF EXISTS tt_recall_inputs; CREATE TEMP TABLE tt_recall_inputs (i int PRIMARY KEY, f jsonb)")
            .unwrap();
        self.c
            .execute(
                "INSERT INTO tt_recall_inputs SELECT o, f FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS t(f, o)",
                &[&Value::Array(inputs.clone())],
            )
            .unwrap();
        let q_server = "SELECT count(*) FROM tt_recall_inputs r, LATERAL twotower.recall('bench_user', 'items_tt_idx', r.f, 500) x";
        let server = median_secs(3, || {
            self.c.query_one(q_server, &[]).unwrap();
        });
        // The ANN part alone: the index scan with the user vector as a parameter, at the ef
        // recall() uses for k = 500 and above.
        let ann = self
            .c
            .prepare("SELECT id FROM items ORDER BY embedding <=> $1::real[] LIMIT 500")
            .unwrap();
        let mut ann_runs = Vec::new();
        for ann_ef in [ef.max(500), 1000, 2000] {
            self.c
                .batch_execute(&format!("SET twotower.ef_search = {ann_ef}"))
                .unwrap();
            let mut times = Vec::with_capacity(calls);
            let mut hits = 0usize;
            for i in 0..calls {
                let q: Vec<f32> = uvecs[i * dims..(i + 1) * dims].to_vec();
                let s = Instant::now();
                let rows = self.c.query(&ann, &[&q]).unwrap();
                times.push(s.elapsed());
                let got: HashSet<i64> = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
                hits += truth[i]
                    .iter()
                    .take(500)
                    .filter(|id| got.contains(id))
                    .count();
            }
            ann_runs.push((ann_ef, lat(times), hits as f64 / (calls * 500) as f64));
        }
        // What a user might write instead of recall(), at the ef recall() uses for k = 500:
        // the tower call inline in ORDER BY (PostgreSQL evaluates it again for every returned
        // row, in the scan's projection of the sort key) and in a scalar subquery (once).
        self.c
            .batch_execute(&format!("SET twotower.ef_search = {}", ef.max(500)))
            .unwrap();
        let sql_calls = calls.min(100);
        let mut sql_runs = Vec::new();
        for (what, sql) in [
            ("`ORDER BY embedding <=> embed_user('bench_user', $1) LIMIT 500`", "SELECT id FROM items ORDER BY embedding <=> twotower.embed_user('bench_user', $1::jsonb) LIMIT 500"),
            ("`ORDER BY embedding <=> (SELECT embed_user('bench_user', $1)) LIMIT 500`", "SELECT id FROM items ORDER BY embedding <=> (SELECT twotower.embed_user('bench_user', $1::jsonb)) LIMIT 500"),
        ] {
            let st = self.c.prepare(sql).unwrap();
            self.c.query(&st, &[&inputs[0]]).unwrap();
            let mut times = Vec::with_capacity(sql_calls);
            for x in inputs.iter().take(sql_calls) {
                let s = Instant::now();
                let rows = self.c.query(&st, &[x]).unwrap();
                times.push(s.elapsed());
                assert_eq!(rows.len(), 500.min(n_items));
            }
            sql_runs.push((what, lat(times)));
        }
        self.c
            .batch_execute(&format!("SET twotower.ef_search = {ef}"))
            .unwrap();

        // How the user vectors sit among the items: their spread, and the exact similarities
        // at ranks 1 and 500 next to recall()'s 500th score.
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let m = calls.min(100);
        let mut pair = 0f64;
        for i in 0..m {
            for j in i + 1..m {
                pair += dot(
                    &uvecs[i * dims..(i + 1) * dims],
                    &uvecs[j * dims..(j + 1) * dims],
                ) as f64;
            }
        }
        let pair = pair / (m * (m - 1) / 2).max(1) as f64;
        let sim_at = |i: usize, rank: usize| -> f64 {
            let id = truth[i][rank.min(truth[i].len()) - 1] as usize;
            dot(
                &uvecs[i * dims..(i + 1) * dims],
                &self.data[(id - 1) * dims..id * dims],
            ) as f64
        };
        let exact1 = (0..calls).map(|i| sim_at(i, 1)).sum::<f64>() / calls as f64;
        let exact500 = (0..calls).map(|i| sim_at(i, 500)).sum::<f64>() / calls as f64;
        let got500 = r500.last_score;

        println!(
            "\n### recall(): user tower + top-k over `items_tt_idx` ({n_items} items × {dims}, twotower.ef_search = {ef}; recall() raises ef to k + |exclude|), {calls} varied users, one client"
        );
        println!(
            "Note: the `items` vectors are the synthetic clusters of the ANN benchmark, unrelated to the towers; user vectors come from a randomly initialised tower. Fine for latency; recall@k is measured against exact search of the same user vectors ({:.1} s of brute force in this program), but its value reflects this query distribution, not a trained model.",
            gt.as_secs_f64()
        );
        println!("| call | p50 ms | p99 ms | mean ms | QPS | rows/call | recall@k vs exact |");
        println!("|---|---|---|---|---|---|---|");
        let row = |what: &str, r: &Run| {
            println!(
                "| {what} | {:.3} | {:.3} | {:.3} | {:.0} | {:.1} | {:.4} |",
                r.lat.p50, r.lat.p99, r.lat.mean, r.qps, r.rows, r.recall
            )
        };
        row(
            "`recall('bench_user', 'items_tt_idx', $1, 500)`, all rows fetched",
            &r500,
        );
        row("`recall(..., 100)`", &r100);
        row(
            "`recall(..., 500, exclude => 50 ids of the user's top-100)`",
            &rex,
        );
        for (ann_ef, l, r) in &ann_runs {
            println!(
                "| ANN alone: `ORDER BY embedding <=> $1 LIMIT 500`, user vector as parameter, ef_search = {ann_ef} | {:.3} | {:.3} | {:.3} | – | 500 | {:.4} |",
                l.p50, l.p99, l.mean, r
            );
        }
        for (what, l) in &sql_runs {
            println!(
                "| SQL instead of recall(): {what}, ef_search = {}, {sql_calls} users | {:.3} | {:.3} | {:.3} | – | 500 | – |",
                ef.max(500),
                l.p50,
                l.p99,
                l.mean
            );
        }
        println!(
            "| server side: `SELECT count(*) FROM tt_recall_inputs r, LATERAL recall(..., r.f, 500)`, total / {calls} | – | – | {:.3} | – | – | – |",
            server / calls as f64 * 1e3
        );
        println!(
            "\nrecall top-500 p99 {:.3} ms vs target ≤ {RECALL_P99_TARGET_MS} ms: {}; recall@500 {:.4} vs target ≥ {RECALL500_TARGET}: {}. First recall() of the connection (maps the index image): {:.0} ms.",
            r500.lat.p99,
            verdict(r500.lat.p99 <= RECALL_P99_TARGET_MS),
            r500.recall,
            verdict(r500.recall >= RECALL500_TARGET),
            first.as_secs_f64() * 1e3
        );
        println!(
            "Checks: excluded ids returned {leaked}{}; rows out of rank/score order {}; max |score − cosine(user vector, stored item vector)| {:.2e}; embed_user share of a top-500 call ≈ {:.3} ms (server-side) of {:.3} ms (p50), protocol baseline {:.3} ms.",
            if short { " (some exclusion lists shorter than 50)" } else { "" },
            r500.bad_order + r100.bad_order + rex.bad_order,
            r500.score_err.max(r100.score_err).max(rex.score_err),
            e.server_ms,
            r500.lat.p50,
            e.baseline.p50,
        );
        println!(
            "Query distribution: mean pairwise cosine of the user vectors {pair:.3}; exact similarity at rank 1 {exact1:.4} and at rank 500 {exact500:.4} (means over users); recall()'s 500th score {got500:.4}."
        );
    }
}

/// The 1/5/15-minute load averages (other work on this machine skews latencies).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Sets the CPU affinity of process `pid` (and its threads) to `cpus` with taskset; false when
/// that is not possible.
fn pin(pid: u32, cpus: &str) -> bool {
    Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs bench/numpy_tower.py on the same spec, weights and inputs; its JSON result or why not.
fn run_numpy(out: &Path, calls: usize) -> Result<Value, String> {
    let python = match std::env::var_os("TT_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => {
            let p = out_dir().join("venv/bin/python");
            if !p.exists() {
                return Err(format!(
                    "no Python venv at {} (bench/run.sh creates it with numpy)",
                    p.display()
                ));
            }
            p
        }
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("numpy_tower.py");
    let o = Command::new(&python)
        .arg(&script)
        .arg(out.join("user_spec.json"))
        .arg(out.join("user_weights.safetensors"))
        .arg(out.join("inputs.json"))
        .arg(out.join("pg_outputs.json"))
        .arg(format!("--warmup={}", 200.min(calls)))
        .env("OMP_NUM_THREADS", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        .output()
        .map_err(|e| format!("running {}: {e}", python.display()))?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(format!(
            "{} {} failed ({}): {}",
            python.display(),
            script.display(),
            o.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| format!("numpy_tower.py output: {e}"))
}
