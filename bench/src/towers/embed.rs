//! embed_user latency: client round trip, protocol baseline, server side, in-process Rust and
//! numpy on the same weights and inputs.

use super::harness::{lat, median_secs, pin, run_numpy, write, Lat};
use super::*;
use crate::env;
use postgres::Client;
use serde_json::Value;
use std::path::Path;
use std::time::Instant;

/// Everything the embed_user measurement found (printed by `report::embed`).
pub(crate) struct EmbedRun {
    pub input_width: usize,
    pub model_mb: f64,
    pub calls: usize,
    pub warm: usize,
    pub client: Lat,
    pub baseline: Lat,
    /// (embed_user, protocol baseline) with client and backend pinned to one core.
    pub pinned: Option<(Lat, Lat)>,
    pub scan_ms: f64,
    pub server_ms: f64,
    pub batch_ms: f64,
    pub in_text: Lat,
    pub in_value: Lat,
    pub numpy: Result<Value, String>,
    pub worst: f32,
    pub first_call_ms: f64,
    pub second_call_ms: f64,
}

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

        super::report::embed(&EmbedRun {
            input_width: model.input_width(),
            model_mb: model.memory_bytes() as f64 / 1048576.0,
            calls,
            warm,
            client,
            baseline,
            pinned,
            scan_ms: per(scan),
            server_ms,
            batch_ms: per(batch),
            in_text,
            in_value,
            numpy,
            worst,
            first_call_ms: first_call.as_secs_f64() * 1e3,
            second_call_ms: second_call.as_secs_f64() * 1e3,
        });
        EmbedFigures {
            baseline,
            server_ms,
        }
    }
}
