//! Item-vector refresh throughput and its agreement with embed_item.

use super::harness::copy_field;
use super::*;
use crate::env;
use postgres::Client;
use serde_json::Value;
use std::time::Instant;
use twotower_tower::forward_parallel;

/// Everything the refresh measurement found (printed by `report::refresh`); times in seconds.
pub(crate) struct RefreshRun {
    pub input_width: usize,
    pub n: usize,
    pub load_secs: f64,
    pub t_insert: f64,
    pub t_upsert: f64,
    pub t_sql: f64,
    pub t_item: f64,
    pub t_json: f64,
    pub threads: usize,
    pub t_inproc: f64,
    pub count: i64,
    pub count2: i64,
    pub diff: Option<f32>,
}

impl Towers<'_> {
    /// Item-tower refresh throughput into an empty and then a full target.
    pub(super) fn refresh(&mut self, model: &Model) {
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

        super::report::refresh(&RefreshRun {
            input_width: model.input_width(),
            n,
            load_secs: load.as_secs_f64(),
            t_insert,
            t_upsert,
            t_sql,
            t_item,
            t_json,
            threads,
            t_inproc: t_enc + t_fwd,
            count,
            count2,
            diff,
        });
    }
}
