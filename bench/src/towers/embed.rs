//! embed_user latency: client round trip, protocol baseline, server side, in-process Rust and
//! numpy on the same weights and inputs.

use super::harness::{lat, median_secs, pin, run_numpy, verdict, write};
use super::*;
use crate::env;
use postgres::Client;
use serde_json::Value;
use std::path::Path;
use std::time::Instant;

impl Towers<'_> {
    /// embed_user latency, next to protocol, server-side, in-process and numpy figures.
    pub(super) fn embed_user(&mut self, out: &Path, model: &Model) -> EmbedFigures {
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
}
