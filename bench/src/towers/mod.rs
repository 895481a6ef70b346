//! Towers and recall: `embed_user` latency for a realistic user tower (client round trip, server
//! side, in-process, and numpy on the same weights and inputs), item-tower refresh throughput,
//! and one-call `recall` top-500 latency and quality over the `items` index.
//!
//! Configuration by environment: TT_EMBED_CALLS (2000), TT_RECALL_CALLS (500),
//! TT_ITEMS_REFRESH (200000), TT_FUNNEL_CALLS (300), TT_ONLY_FUNNEL=1 (only the funnel part), TT_OUT (bench/out), TT_PYTHON (the interpreter for
//! bench/numpy_tower.py; default bench/out/venv/bin/python when it exists).

//!
//! Layout: `harness.rs` (timing, percentiles, verdicts, files, CPU pinning, the numpy runner),
//! one file per measured thing (`embed.rs`, `refresh.rs`, `recall.rs`), and here the shared
//! setup (models imported once) and the order they run in.

mod arch;
mod embed;
mod funnel;
mod harness;
mod recall;
mod refresh;
mod report;

use harness::{loadavg, out_dir, write, Lat};
use postgres::Client;
use serde_json::Value;
use std::time::Instant;
use twotower_testkit::towers as synth;
use twotower_tower::Model;

pub(crate) const USER_SEED: u64 = 11;
pub(crate) const ITEM_SEED: u64 = 12;
/// Input streams: embed_user latency, warm-up, recall (disjoint index ranges of one stream).
pub(crate) const INPUT_SEED: u64 = 2024;
pub(crate) const WARMUP_BASE: usize = 1_000_000;
pub(crate) const RECALL_BASE: usize = 2_000_000;
pub(crate) const ITEM_INPUT_SEED: u64 = 7;

pub(crate) const EMBED_P99_TARGET_MS: f64 = 0.2;
pub(crate) const RECALL_P99_TARGET_MS: f64 = 5.0;
pub(crate) const RECALL500_TARGET: f64 = 0.95;

pub struct Towers<'a> {
    pub c: &'a mut Client,
    /// Where `c` is connected (for a fresh connection's first-call cost).
    pub host: &'a str,
    pub port: u16,
    /// The item vectors of `items` (ids 1..=n), row-major.
    pub data: &'a [f32],
    pub dims: usize,
}

/// What the embed_user measurement hands to the recall measurement.
pub(crate) struct EmbedFigures {
    pub baseline: Lat,
    pub server_ms: f64,
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
        if std::env::var("TT_ONLY_FUNNEL").is_ok() {
            self.funnel();
            return;
        }
        if std::env::var("TT_ONLY_ARCH").is_ok() {
            self.architectures();
            return;
        }
        let e = self.embed_user(&out, &user_model);
        self.architectures();
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
        self.funnel();
        println!("# load average after: {}", loadavg());
    }
}
