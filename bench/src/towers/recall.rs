//! One-call recall() latency and quality over the items index.

use super::harness::{lat, median_secs, Lat};
use super::*;
use crate::{env, ground_truth};
use postgres::Client;
use serde_json::Value;
use std::collections::HashSet;
use std::time::Instant;

/// One recall() configuration's latency and quality.
pub(crate) struct Run {
    pub lat: Lat,
    pub qps: f64,
    pub recall: f64,
    pub rows: f64,
    pub results: Vec<Vec<i64>>,
    pub score_err: f32,
    pub bad_order: usize,
    /// Mean score of the last row returned.
    pub last_score: f64,
}

/// Everything the recall() measurement found (printed by `report::recall`).
pub(crate) struct RecallRun {
    pub n_items: usize,
    pub dims: usize,
    pub ef: i32,
    pub calls: usize,
    pub gt_secs: f64,
    pub r500: Run,
    pub r100: Run,
    pub rex: Run,
    /// (ef_search, latency, recall@500) of the ANN search alone.
    pub ann_runs: Vec<(i32, Lat, f64)>,
    pub sql_calls: usize,
    pub sql_runs: Vec<(&'static str, Lat)>,
    pub server_ms: f64,
    pub first_ms: f64,
    pub leaked: usize,
    pub short: bool,
    pub pair: f64,
    pub exact1: f64,
    pub exact500: f64,
    pub got500: f64,
    pub embed_server_ms: f64,
    pub embed_baseline_p50: f64,
}

impl Towers<'_> {
    /// recall() latency (k = 500, 100, 500 with 50 exclusions) and recall@k against exact search
    /// of the same user vectors.
    pub(super) fn recall(&mut self, e: &EmbedFigures) {
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

        super::report::recall(&RecallRun {
            n_items,
            dims,
            ef,
            calls,
            gt_secs: gt.as_secs_f64(),
            r500,
            r100,
            rex,
            ann_runs,
            sql_calls,
            sql_runs,
            server_ms: server / calls as f64 * 1e3,
            first_ms: first.as_secs_f64() * 1e3,
            leaked,
            short,
            pair,
            exact1,
            exact500,
            got500,
            embed_server_ms: e.server_ms,
            embed_baseline_p50: e.baseline.p50,
        });
    }
}
