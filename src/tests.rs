// In-database tests (`cargo pgrx test`). Each test runs in its own transaction.

use pgrx::prelude::*;

/// Runs `sql` and returns the SQLSTATE it fails with, or "ok".
fn sqlstate(sql: &str) -> String {
    // Created once per session (a later SET ROLE may not replace it, but may call it).
    if Spi::get_one::<bool>("SELECT to_regprocedure('pg_temp.tt_try(text)') IS NULL").unwrap() == Some(true) {
        Spi::run(
            "CREATE FUNCTION pg_temp.tt_try(q text) RETURNS text LANGUAGE plpgsql AS $f$
             BEGIN EXECUTE q; RETURN 'ok'; EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $f$",
        )
        .unwrap();
    }
    Spi::get_one_with_args::<String>("SELECT pg_temp.tt_try($1)", &[sql.into()]).unwrap().unwrap()
}

fn one_f64(sql: &str) -> f64 {
    Spi::get_one::<f64>(sql).unwrap().unwrap()
}

fn one_i64(sql: &str) -> i64 {
    Spi::get_one::<i64>(sql).unwrap().unwrap()
}

fn ids(sql: &str) -> Vec<i64> {
    Spi::connect(|c| {
        c.select(sql, None, &[]).unwrap().map(|r| r.get::<i64>(1).unwrap().unwrap()).collect::<Vec<_>>()
    })
}

fn explain(sql: &str) -> String {
    Spi::connect(|c| {
        c.select(&format!("EXPLAIN (COSTS OFF) {sql}"), None, &[])
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// `n` rows of `dims`-dimensional vectors shaped like learned embeddings (deterministic): one of
/// 20 cluster centres plus a mix of 8 latent directions plus small isotropic noise, ids 1..n.
fn make_items(n: i64, dims: i32) {
    Spi::run("SET search_path = public, twotower").unwrap();
    Spi::run("SELECT setseed(0.42)").unwrap();
    Spi::run(&format!(
        "CREATE TEMP TABLE centres AS SELECT c, j, (random()*2-1)::real AS x
           FROM generate_series(1, 20) c, generate_series(1, {dims}) j;
         CREATE TEMP TABLE dirs AS SELECT k, j, (random()*2-1)::real AS x
           FROM generate_series(1, 8) k, generate_series(1, {dims}) j;
         CREATE TEMP TABLE weights AS SELECT i, k, ((random()*2-1)*0.5)::real AS w
           FROM generate_series(1, {n}) i, generate_series(1, 8) k;
         CREATE TEMP TABLE mix AS SELECT w.i, d.j, sum(w.w * d.x)::real AS x
           FROM weights w JOIN dirs d USING (k) GROUP BY w.i, d.j;
         CREATE TABLE items AS
           SELECT m.i::bigint AS id, (m.i % 10)::int AS category,
                  array_agg((m.x + c.x + (random()-0.5)*0.1)::real ORDER BY m.j) AS embedding
             FROM mix m JOIN centres c ON c.c = 1 + (m.i % 20) AND c.j = m.j
            GROUP BY m.i"
    ))
    .unwrap();
}

#[pg_test]
fn operators_compute_distances() {
    Spi::run("SET search_path = public, twotower").unwrap();
    assert!((one_f64("SELECT ARRAY[1,0]::real[] <=> ARRAY[0,1]::real[]") - 1.0).abs() < 1e-9);
    assert!((one_f64("SELECT ARRAY[3,0]::real[] <-> ARRAY[0,4]::real[]") - 5.0).abs() < 1e-9);
    assert!((one_f64("SELECT ARRAY[1,2]::real[] <#> ARRAY[3,4]::real[]") + 11.0).abs() < 1e-9);
    assert!((one_f64("SELECT inner_product(ARRAY[1,2]::real[], ARRAY[3,4]::real[])") - 11.0).abs() < 1e-9);
    assert!((one_f64("SELECT vector_norm(l2_normalize(ARRAY[3,4]::real[]))") - 1.0).abs() < 1e-6);
    assert_eq!(Spi::get_one::<i32>("SELECT vector_dims(ARRAY[1,2,3]::real[])").unwrap(), Some(3));
    assert!(Spi::get_one::<f64>("SELECT ARRAY[0,0]::real[] <=> ARRAY[0,1]::real[]").unwrap().unwrap().is_nan());
    assert_eq!(Spi::get_one::<f64>("SELECT NULL::real[] <=> ARRAY[0,1]::real[]").unwrap(), None);
}

#[pg_test]
fn bad_vectors_raise_sqlstates() {
    Spi::run("SET search_path = public, twotower").unwrap();
    assert_eq!(sqlstate("SELECT ARRAY[1,2]::real[] <=> ARRAY[1,2,3]::real[]"), "22000");
    assert_eq!(sqlstate("SELECT ARRAY['NaN',1]::real[] <=> ARRAY[1,2]::real[]"), "22000");
    assert_eq!(sqlstate("SELECT ARRAY['Infinity',1]::real[] <-> ARRAY[1,2]::real[]"), "22000");
    assert_eq!(sqlstate("SELECT ARRAY[NULL,1]::real[] <#> ARRAY[1,2]::real[]"), "22000");
    assert_eq!(sqlstate("SELECT ARRAY[[1,2],[3,4]]::real[] <=> ARRAY[1,2,3,4]::real[]"), "22000");
    assert_eq!(sqlstate("SELECT '{}'::real[] <=> '{}'::real[]"), "22000");
    assert_eq!(sqlstate("SELECT array_fill(1::real, ARRAY[16001]) <=> array_fill(1::real, ARRAY[16001])"), "54000");
    assert_eq!(sqlstate("SELECT array_fill(1::real, ARRAY[16000]) <=> array_fill(1::real, ARRAY[16000])"), "ok");
}

#[pg_test]
fn bad_index_options_raise_sqlstates() {
    make_items(100, 8);
    assert_eq!(sqlstate("CREATE INDEX ON items USING twotower_hnsw (embedding) WITH (m = 1)"), "22023");
    assert_eq!(sqlstate("CREATE INDEX ON items USING twotower_hnsw (embedding) WITH (ef_construction = 2000)"), "22023");
    assert_eq!(sqlstate("CREATE INDEX ON items USING twotower_hnsw (embedding) WITH (quantization = 'f8')"), "22023");
    assert_eq!(sqlstate("CREATE INDEX ON items USING twotower_hnsw (embedding real_l2_ops) WITH (quantization = 'i8')"), "22023");
    assert_eq!(sqlstate("CREATE INDEX ON items USING twotower_hnsw (embedding) WITH (nonsense = 1)"), "22023");
    assert_eq!(sqlstate("CREATE INDEX ON items USING twotower_hnsw (embedding real_cosine_ops) WITH (quantization = 'i8', m = 8)"), "ok");
}

#[pg_test]
fn wrong_dimension_rows_fail_build_and_insert() {
    make_items(100, 8);
    Spi::run("INSERT INTO items VALUES (999, 0, ARRAY[1,2,3]::real[])").unwrap();
    assert_eq!(sqlstate("CREATE INDEX ON items USING twotower_hnsw (embedding)"), "22000");
    Spi::run("DELETE FROM items WHERE id = 999").unwrap();
    // The deleted row is still in the heap (not vacuumed); a dead row never fails a build.
    Spi::run("CREATE INDEX items_idx ON items USING twotower_hnsw (embedding)").unwrap();
    assert_eq!(sqlstate("INSERT INTO items VALUES (1000, 0, ARRAY[1,2,3]::real[])"), "22000");
    assert_eq!(sqlstate("INSERT INTO items VALUES (1000, 0, ARRAY[1,2,3,4,5,6,7,'NaN']::real[])"), "22000");
    // The index scan itself refuses the query (the plan is an index scan, so no operator runs).
    Spi::run("SET enable_seqscan = off").unwrap();
    let sql = "SELECT id FROM items ORDER BY embedding <=> ARRAY[1,2]::real[] LIMIT 3";
    assert!(explain(sql).contains("Index Scan using items_idx"), "{}", explain(sql));
    assert_eq!(sqlstate(sql), "22000");
    Spi::run("RESET enable_seqscan").unwrap();
    // NULL vectors are allowed and simply not indexed.
    Spi::run("INSERT INTO items VALUES (1001, 0, NULL)").unwrap();
}

#[pg_test]
fn index_is_used_and_matches_exact_search() {
    make_items(2000, 16);
    for (ops, op) in [("real_cosine_ops", "<=>"), ("real_ip_ops", "<#>"), ("real_l2_ops", "<->")] {
        Spi::run(&format!("CREATE INDEX items_idx ON items USING twotower_hnsw (embedding {ops})")).unwrap();
        let q = "(SELECT embedding FROM items WHERE id = 7)";
        let sql = format!("SELECT id FROM items ORDER BY embedding {op} {q} LIMIT 10");
        Spi::run("SET enable_seqscan = off").unwrap();
        let plan = explain(&sql);
        assert!(plan.contains("Index Scan using items_idx"), "{plan}");
        let got = ids(&sql);
        Spi::run("SET enable_indexscan = off; SET enable_seqscan = on").unwrap();
        let exact = ids(&sql);
        Spi::run("RESET enable_indexscan; RESET enable_seqscan").unwrap();
        let hits = got.iter().filter(|g| exact.contains(g)).count();
        assert!(hits >= 9, "{ops}: {got:?} vs {exact:?}");
        Spi::run("DROP INDEX items_idx").unwrap();
    }
}

#[pg_test]
fn planner_uses_index_for_top_k_without_hints() {
    make_items(5000, 16);
    Spi::run("CREATE INDEX items_idx ON items USING twotower_hnsw (embedding)").unwrap();
    Spi::run("ANALYZE items").unwrap();
    let plan = explain("SELECT id FROM items ORDER BY embedding <=> (SELECT embedding FROM items WHERE id = 3) LIMIT 10");
    assert!(plan.contains("Index Scan using items_idx"), "{plan}");
    // Without ORDER BY the index is never chosen.
    let plan = explain("SELECT id FROM items WHERE id < 10");
    assert!(!plan.contains("items_idx"), "{plan}");
}

#[pg_test]
fn inserts_are_searchable_deletes_never_return() {
    make_items(1000, 8);
    Spi::run("CREATE INDEX items_idx ON items USING twotower_hnsw (embedding real_l2_ops)").unwrap();
    // Reading every row: relaxed order returns each live row once (strict order may skip a
    // row the first searches missed rather than return it out of order).
    Spi::run("SET enable_seqscan = off; SET twotower.iterative_scan = relaxed_order").unwrap();
    // A new far-away row is the nearest neighbour of itself at once.
    Spi::run("INSERT INTO items VALUES (5000, 0, array_fill(50::real, ARRAY[8]))").unwrap();
    let got = ids("SELECT id FROM items ORDER BY embedding <-> array_fill(50::real, ARRAY[8]) LIMIT 1");
    assert_eq!(got, vec![5000]);
    assert_eq!(one_i64("SELECT delta_items FROM twotower.index_info('items_idx')"), 1);
    // Deleted rows (graph and delta) never come back.
    Spi::run("DELETE FROM items WHERE id IN (5000, 1, 2, 3)").unwrap();
    let got = ids("SELECT id FROM items ORDER BY embedding <-> array_fill(50::real, ARRAY[8]) LIMIT 2000");
    assert_eq!(got.len(), 997);
    assert!(!got.iter().any(|i| [5000, 1, 2, 3].contains(i)));
}

#[pg_test]
fn filtered_queries_return_k_rows() {
    make_items(3000, 16);
    Spi::run("CREATE INDEX items_idx ON items USING twotower_hnsw (embedding)").unwrap();
    Spi::run("SET enable_seqscan = off; SET twotower.ef_search = 20").unwrap();
    let q = "(SELECT embedding FROM items WHERE id = 11)";
    // category = 3 keeps 10% of the rows; the scan must widen until it has 100.
    let got = ids(&format!("SELECT id FROM items WHERE category = 3 ORDER BY embedding <=> {q} LIMIT 100"));
    assert_eq!(got.len(), 100);
    // A filter matching 5 rows in total still returns all 5.
    let got = ids(&format!("SELECT id FROM items WHERE id % 600 = 0 ORDER BY embedding <=> {q} LIMIT 100"));
    assert_eq!(got.len(), 5);
}

#[pg_test]
fn deleted_rows_of_a_whole_page_are_skipped() {
    make_items(500, 8);
    Spi::run("ALTER TABLE items SET (autovacuum_enabled = off)").unwrap();
    Spi::run("CREATE INDEX items_idx ON items USING twotower_hnsw (embedding real_l2_ops)").unwrap();
    Spi::run("SET enable_seqscan = off; SET twotower.iterative_scan = relaxed_order").unwrap();
    let far = "array_fill(100::real, ARRAY[8])";
    // Remember where row 1 lives, delete it and every other row on its page, vacuum, refill.
    Spi::run("DELETE FROM items WHERE (ctid::text::point)[0] = 0").unwrap();
    let removed = 500 - one_i64("SELECT count(*) FROM items");
    assert!(removed > 0);
    // VACUUM cannot run inside a transaction block: tombstones and TID reuse are tested by the
    // cluster tests (tests/t/). Here the executor's visibility check hides the deleted rows.
    let got = ids(&format!("SELECT id FROM items ORDER BY embedding <-> {far} LIMIT 1000"));
    assert_eq!(got.len() as i64, 500 - removed);
}

#[pg_test]
fn index_info_reports_health() {
    make_items(300, 8);
    Spi::run("CREATE INDEX items_idx ON items USING twotower_hnsw (embedding) WITH (m = 8, ef_construction = 40, quantization = 'f16')").unwrap();
    let row = Spi::get_three::<i32, String, String>("SELECT dims, metric, quantization FROM twotower.index_info('items_idx')").unwrap();
    assert_eq!(row, (Some(8), Some("cosine".into()), Some("f16".into())));
    assert_eq!(one_i64("SELECT graph_items FROM twotower.index_info('items_idx')"), 300);
    assert!(one_i64("SELECT size_bytes FROM twotower.index_info('items_idx')") > 8192);
    assert_eq!(sqlstate("SELECT * FROM twotower.index_info('items'::regclass)"), "42809");
}

#[pg_test]
fn empty_index_then_inserts() {
    Spi::run("SET search_path = public, twotower").unwrap();
    Spi::run("CREATE TABLE e (id bigint, v real[])").unwrap();
    Spi::run("CREATE INDEX e_idx ON e USING twotower_hnsw (v real_l2_ops)").unwrap();
    Spi::run("SET enable_seqscan = off").unwrap();
    assert!(ids("SELECT id FROM e ORDER BY v <-> ARRAY[1,2]::real[] LIMIT 5").is_empty());
    Spi::run("INSERT INTO e SELECT i, ARRAY[i, i]::real[] FROM generate_series(1, 50) i").unwrap();
    let sql = "SELECT id FROM e ORDER BY v <-> ARRAY[10.2,10.2]::real[] LIMIT 5";
    assert!(explain(sql).contains("Index Scan using e_idx"), "{}", explain(sql));
    // Rows inserted into an empty index come back exactly as a sequential scan ranks them.
    assert_eq!(ids(sql), vec![10, 11, 9, 12, 8]);
    assert_eq!(ids("SELECT id FROM e ORDER BY v <-> ARRAY[10,10]::real[] LIMIT 1"), vec![10]);
    assert_eq!(sqlstate("INSERT INTO e VALUES (99, ARRAY[1,2,3]::real[])"), "22000");
}

#[pg_test]
fn sql_level_recall_at_default_settings() {
    make_items(20_000, 32);
    Spi::run("CREATE INDEX items_idx ON items USING twotower_hnsw (embedding)").unwrap();
    let mut hits = 0usize;
    let queries = 20;
    for qid in 1..=queries {
        let q = format!("(SELECT embedding FROM items WHERE id = {})", qid * 97);
        let sql = format!("SELECT id FROM items ORDER BY embedding <=> {q} LIMIT 10");
        Spi::run("SET enable_seqscan = off; SET enable_indexscan = on").unwrap();
        let got = ids(&sql);
        Spi::run("SET enable_seqscan = on; SET enable_indexscan = off").unwrap();
        let exact = ids(&sql);
        hits += got.iter().filter(|g| exact.contains(g)).count();
    }
    let recall = hits as f64 / (queries * 10) as f64;
    assert!(recall >= 0.95, "recall@10 = {recall}");
}

#[pg_test]
fn memory_budget_is_enforced_with_a_clear_error() {
    make_items(20_000, 32);
    Spi::run("SET maintenance_work_mem = '1MB'").unwrap();
    assert_eq!(sqlstate("CREATE INDEX ON items USING twotower_hnsw (embedding)"), "53200");
}

#[pg_test]
fn build_100k_by_64_fits_the_default_maintenance_work_mem_and_the_hint_is_exact() {
    Spi::run("SET search_path = public, twotower").unwrap();
    Spi::run(
        "SELECT setseed(0.5);
         CREATE TABLE big (id bigint PRIMARY KEY, v real[]);
         INSERT INTO big SELECT i, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 64) WHERE i > 0)
           FROM generate_series(1, 100000) i",
    )
    .unwrap();
    // PostgreSQL's default; the build streams the heap into the graph and writes the image
    // through a temporary file, so 100k x 64 fits.
    Spi::run("SET maintenance_work_mem = '64MB'").unwrap();
    Spi::run("CREATE INDEX big_idx ON big USING twotower_hnsw (v)").unwrap();
    assert_eq!(
        Spi::get_one::<i64>("SELECT graph_items FROM twotower.index_info('big_idx')").unwrap(),
        Some(100_000)
    );
    // Too small a budget: the figure comes from every row (the scan goes on counting once the
    // budget is exceeded), so following the hint works the first time.
    Spi::run("DROP INDEX big_idx; SET maintenance_work_mem = '16MB'").unwrap();
    Spi::run(
        "CREATE TEMP TABLE hint_out (state text, hint text);
         DO $$ DECLARE s text; h text; BEGIN
             CREATE INDEX big_idx ON big USING twotower_hnsw (v);
         EXCEPTION WHEN OTHERS THEN
             GET STACKED DIAGNOSTICS s = RETURNED_SQLSTATE, h = PG_EXCEPTION_HINT;
             INSERT INTO hint_out VALUES (s, h);
         END $$",
    )
    .unwrap();
    let state = Spi::get_one::<String>("SELECT state FROM hint_out").unwrap();
    assert_eq!(state.as_deref(), Some("53200"));
    let set = Spi::get_one::<String>("SELECT substring(hint from '^(SET maintenance_work_mem = ''[0-9]+ MB'')') FROM hint_out")
        .unwrap()
        .expect("the hint names a setting");
    Spi::run(&set).unwrap();
    Spi::run("CREATE INDEX big_idx ON big USING twotower_hnsw (v)").unwrap();
    // No temporary file is left behind.
    assert_eq!(
        Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_ls_tmpdir() WHERE name LIKE 'pgsql_tmp%twotower%'"
        )
        .unwrap(),
        Some(0)
    );
}

/// Imports the core's synthetic realistic user tower as model `name`.
fn import_synth_user(name: &str, seed: u64) -> (String, Vec<u8>) {
    let (spec, weights) = twotower_testkit::towers::realistic_user_tower(seed);
    let v = Spi::get_one_with_args::<i32>(
        "SELECT twotower.import_model($1, $2::jsonb, $3)",
        &[name.into(), spec.as_str().into(), weights.as_slice().into()],
    )
    .unwrap();
    assert_eq!(v, Some(1));
    (spec, weights)
}

#[pg_test]
fn embed_user_equals_the_core_forward_pass() {
    let (spec, weights) = import_synth_user("synth", 7);
    let model = twotower_tower::Model::load(&spec, &weights).unwrap();
    for i in 0..25 {
        let input = twotower_testkit::towers::realistic_user_input(7, i);
        let got = Spi::get_one_with_args::<Vec<f32>>(
            "SELECT twotower.embed_user('synth', $1::jsonb)",
            &[input.to_string().as_str().into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(got, model.embed(&input).unwrap(), "input {i}");
        assert_eq!(got.len(), 64);
    }
    // A wrong key, a wrong type and an unknown model are SQLSTATE errors, not crashes.
    assert_eq!(sqlstate("SELECT twotower.embed_user('synth', '{\"nope\": 1}')"), "22023");
    assert_eq!(sqlstate("SELECT twotower.embed_user('synth', '\"text\"')"), "22023");
    assert_eq!(sqlstate("SELECT twotower.embed_user('missing', '{}')"), "42704");
    assert_eq!(sqlstate("SELECT twotower.import_model('x', '{}', '\\x'::bytea)"), "22023");
}

#[pg_test]
fn recall_returns_k_nearest_live_items_with_exclusions() {
    import_synth_user("synth", 3);
    Spi::run("SELECT setseed(0.7)").unwrap();
    Spi::run(
        "CREATE TABLE vecs (id bigint PRIMARY KEY, embedding real[]);
         CREATE TEMP TABLE centre AS SELECT c, j, (random() - 0.5)::real AS x
           FROM generate_series(0, 29) c, generate_series(1, 64) j;
         INSERT INTO vecs SELECT i, twotower.l2_normalize(ARRAY(
                  SELECT (x + (random() - 0.5) * 0.6)::real FROM centre WHERE c = i % 30 ORDER BY j))
           FROM generate_series(1, 3000) i;
         CREATE INDEX vecs_idx ON vecs USING twotower_hnsw (embedding real_cosine_ops)",
    )
    .unwrap();
    let features = twotower_testkit::towers::realistic_user_input(3, 1).to_string();
    let recall = |k: i32, exclude: &str| -> Vec<i64> {
        Spi::connect(|c| {
            c.select(
                &format!("SELECT item_id FROM twotower.recall('synth', 'vecs_idx', $1::jsonb, {k}, {exclude}) ORDER BY rank"),
                None,
                &[features.as_str().into()],
            )
            .unwrap()
            .map(|r| r.get::<i64>(1).unwrap().unwrap())
            .collect()
        })
    };
    // recall() searches with ef >= k; ask for twice that, as a caller wanting high recall on
    // this (deliberately hard, noisy) data would.
    Spi::run("SET twotower.ef_search = 200").unwrap();
    let got = recall(100, "NULL");
    assert_eq!(got.len(), 100);
    let exact: Vec<i64> = Spi::connect(|c| {
        c.select(
            "SELECT id FROM vecs ORDER BY twotower.cosine_distance(embedding,
                    twotower.embed_user('synth', $1::jsonb)) LIMIT 100",
            None,
            &[features.as_str().into()],
        )
        .unwrap()
        .map(|r| r.get::<i64>(1).unwrap().unwrap())
        .collect()
    });
    let common = got.iter().filter(|id| exact.contains(id)).count();
    assert!(common >= 95, "recall@100 of recall() = {common}/100");
    // Excluding the first 50 still yields 100 rows, none of them excluded.
    let ex: Vec<String> = got[..50].iter().map(|i| i.to_string()).collect();
    let got2 = recall(100, &format!("ARRAY[{}]::bigint[]", ex.join(",")));
    assert_eq!(got2.len(), 100);
    assert!(got2.iter().all(|id| !got[..50].contains(id)));
    // Deleted rows never come back; a new row is found at once.
    Spi::run(&format!("DELETE FROM vecs WHERE id IN ({})", ex.join(","))).unwrap();
    assert!(recall(100, "NULL").iter().all(|id| !got[..50].contains(id)));
    Spi::run_with_args(
        "INSERT INTO vecs VALUES (424242, twotower.embed_user('synth', $1::jsonb))",
        &[features.as_str().into()],
    )
    .unwrap();
    assert_eq!(recall(1, "NULL"), vec![424242]);
}


/// Distances of an ordered query in the order its rows come back; the plan must be an index
/// scan of `index`.
fn ordered_dists(sql: &str, index: &str) -> Vec<f64> {
    let plan = explain(sql);
    assert!(plan.contains(&format!("Index Scan using {index}")), "{plan}");
    Spi::connect(|c| {
        c.select(sql, None, &[]).unwrap().map(|r| r.get::<f64>(1).unwrap().unwrap()).collect()
    })
}

#[pg_test]
fn order_by_limit_is_distance_order_for_every_storage() {
    make_items(8000, 32);
    // A small ef_search and a 5% filter make every scan widen several times.
    Spi::run("SET enable_seqscan = off; SET twotower.ef_search = 10").unwrap();
    for (quant, ops, op) in [
        ("f32", "real_cosine_ops", "<=>"),
        ("f16", "real_cosine_ops", "<=>"),
        ("i8", "real_cosine_ops", "<=>"),
        ("f16", "real_l2_ops", "<->"),
        ("f32", "real_ip_ops", "<#>"),
    ] {
        Spi::run(&format!(
            "CREATE INDEX items_q_idx ON items USING twotower_hnsw (embedding {ops}) WITH (quantization = '{quant}')"
        ))
        .unwrap();
        for qid in [5, 77, 301, 999, 4321, 7777] {
            let q = format!("(SELECT embedding FROM items WHERE id = {qid})");
            for (filter, limit) in [("id % 20 = 3", 50), ("true", 20)] {
                let sql = format!(
                    "SELECT embedding {op} {q} FROM items WHERE {filter} ORDER BY embedding {op} {q} LIMIT {limit}"
                );
                let d = ordered_dists(&sql, "items_q_idx");
                assert_eq!(d.len(), limit as usize, "{quant}/{ops}: {sql}");
                let inverted = d.windows(2).filter(|w| w[1] < w[0]).count();
                assert_eq!(inverted, 0, "{quant}/{ops} query {qid} filter {filter}: {d:?}");
            }
        }
        Spi::run("DROP INDEX items_q_idx").unwrap();
    }
    // relaxed_order and off are accepted; off never widens past one search.
    Spi::run("CREATE INDEX items_q_idx ON items USING twotower_hnsw (embedding)").unwrap();
    Spi::run("SET twotower.iterative_scan = relaxed_order").unwrap();
    let q = "(SELECT embedding FROM items WHERE id = 5)";
    let sql = format!("SELECT embedding <=> {q} FROM items WHERE id % 20 = 3 ORDER BY embedding <=> {q} LIMIT 50");
    assert_eq!(ordered_dists(&sql, "items_q_idx").len(), 50);
    Spi::run("SET twotower.iterative_scan = off").unwrap();
    assert!(ordered_dists(&sql, "items_q_idx").len() < 50);
    assert_eq!(sqlstate("SET twotower.iterative_scan = sideways"), "22023");
}

#[pg_test]
fn scan_tuple_cap_ends_hopeless_filtered_scans() {
    make_items(3000, 16);
    Spi::run("CREATE INDEX items_idx ON items USING twotower_hnsw (embedding)").unwrap();
    Spi::run("SET enable_seqscan = off").unwrap();
    let q = "(SELECT embedding FROM items WHERE id = 11)";
    let all = format!("SELECT id FROM items ORDER BY embedding <=> {q} LIMIT 1000");
    assert_eq!(ids(&all).len(), 1000);
    Spi::run("SET twotower.max_scan_tuples = 200").unwrap();
    assert!(explain(&all).contains("Index Scan using items_idx"));
    // At the cap the scan ends: fewer rows than asked, never more work.
    assert_eq!(ids(&all).len(), 200);
    let filtered = ids(&format!("SELECT id FROM items WHERE id % 2 = 0 ORDER BY embedding <=> {q} LIMIT 1000"));
    assert!(filtered.len() >= 10 && filtered.len() <= 200, "{} rows", filtered.len());
    // A filter that matches nothing ends after 200 rows instead of walking the whole graph.
    assert!(ids(&format!("SELECT id FROM items WHERE id < 0 ORDER BY embedding <=> {q} LIMIT 10")).is_empty());
    assert_eq!(sqlstate("SET twotower.max_scan_tuples = 0"), "22023");
}

#[pg_test]
fn index_scans_are_counted_in_pg_stat() {
    make_items(500, 8);
    Spi::run("CREATE INDEX items_idx ON items USING twotower_hnsw (embedding)").unwrap();
    Spi::run("SET enable_seqscan = off").unwrap();
    let before = one_i64("SELECT pg_stat_get_xact_numscans('items_idx'::regclass)");
    for i in 1..=3 {
        ids(&format!("SELECT id FROM items ORDER BY embedding <=> (SELECT embedding FROM items WHERE id = {i}) LIMIT 5"));
    }
    assert_eq!(one_i64("SELECT pg_stat_get_xact_numscans('items_idx'::regclass)"), before + 3);
}

/// recall() reads exactly the rows it needs from the index: k (plus the excluded ones it skips)
/// for f32 storage, whose scan distances are exact. One more row would make the scan widen its
/// search, which costs as much as the search itself (a regression the benchmark caught).
#[pg_test]
fn recall_reads_no_more_index_rows_than_it_returns() {
    import_synth_user("synth", 5);
    Spi::run(
        "SELECT setseed(0.2);
         CREATE TABLE vecs (id bigint PRIMARY KEY, embedding real[]);
         INSERT INTO vecs SELECT i, twotower.l2_normalize(ARRAY(SELECT (random() - 0.5)::real
                                    FROM generate_series(1, 64) WHERE i > 0))
           FROM generate_series(1, 2000) i;
         CREATE INDEX vecs_idx ON vecs USING twotower_hnsw (embedding real_cosine_ops)",
    )
    .unwrap();
    let features = twotower_testkit::towers::realistic_user_input(5, 1).to_string();
    let read = |k: i32, exclude: &str| -> (i64, i64) {
        let before = one_i64("SELECT pg_stat_get_xact_tuples_returned('vecs_idx'::regclass)");
        let n = Spi::get_one_with_args::<i64>(
            &format!("SELECT count(*) FROM twotower.recall('synth', 'vecs_idx', $1::jsonb, {k}, {exclude})"),
            &[features.as_str().into()],
        )
        .unwrap()
        .unwrap();
        (n, one_i64("SELECT pg_stat_get_xact_tuples_returned('vecs_idx'::regclass)") - before)
    };
    assert_eq!(read(10, "NULL"), (10, 10));
    assert_eq!(read(100, "NULL"), (100, 100));
    // Excluding three of the top 10: they are read and skipped, nothing else.
    let top: Vec<i64> = Spi::connect(|c| {
        c.select(
            "SELECT item_id FROM twotower.recall('synth', 'vecs_idx', $1::jsonb, 3)",
            None,
            &[features.as_str().into()],
        )
        .unwrap()
        .map(|r| r.get::<i64>(1).unwrap().unwrap())
        .collect()
    });
    let exclude = format!("ARRAY[{}]::bigint[]", top.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    assert_eq!(read(10, &exclude), (10, 13));
}

#[pg_test]
fn alter_index_options_are_validated_as_on_create() {
    make_items(100, 8);
    Spi::run("CREATE INDEX items_idx ON items USING twotower_hnsw (embedding) WITH (m = 8, ef_construction = 10)").unwrap();
    assert_eq!(sqlstate("ALTER INDEX items_idx SET (m = 20)"), "22023");
    assert_eq!(sqlstate("CREATE INDEX ON items USING twotower_hnsw (embedding) WITH (m = 20, ef_construction = 10)"), "22023");
    assert_eq!(sqlstate("ALTER INDEX items_idx SET (ef_construction = 40)"), "ok");
    assert_eq!(sqlstate("ALTER INDEX items_idx SET (m = 20)"), "ok");
    assert_eq!(sqlstate("REINDEX INDEX items_idx"), "ok");
}

#[pg_test]
fn extreme_finite_values_give_exact_distances_or_clear_errors() {
    Spi::run("SET search_path = public, twotower").unwrap();
    assert!(one_f64("SELECT '{2e19,2e19}'::real[] <=> '{1,1}'").abs() < 1e-12);
    assert!(one_f64("SELECT '{1e-23,1e-23}'::real[] <=> '{1,1}'").abs() < 1e-12);
    assert!((one_f64("SELECT '{2e19,2e19}'::real[] <-> '{0,0}'") - 2e19 * 2f64.sqrt()).abs() < 1e13);
    let n = Spi::get_one::<Vec<f32>>("SELECT l2_normalize('{2e19,2e19}')").unwrap().unwrap();
    assert!((n[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6, "{n:?}");
    Spi::run("CREATE TABLE x (id int, v real[]); INSERT INTO x VALUES (1, '{1,2}'), (2, '{3,1}')").unwrap();
    Spi::run("CREATE INDEX x_idx ON x USING twotower_hnsw (v)").unwrap();
    // What the graph could not rank is refused with a clear error, never mis-ordered.
    assert_eq!(sqlstate("INSERT INTO x VALUES (3, '{2e19,2e19}')"), "22003");
    assert_eq!(sqlstate("INSERT INTO x VALUES (3, '{1e-23,1e-23}')"), "22003");
    assert_eq!(sqlstate("CREATE INDEX ON x USING twotower_hnsw (v) WITH (quantization = 'f16')"), "ok");
    assert_eq!(sqlstate("INSERT INTO x VALUES (5, '{70000,1}')"), "22003");
    // A huge query under cosine is ranked exactly (normalised in f64).
    Spi::run("SET enable_seqscan = off").unwrap();
    assert_eq!(ids("SELECT id::bigint FROM x ORDER BY v <=> '{3e19,1e19}' LIMIT 1"), vec![2]);
}

#[pg_test]
fn index_info_needs_select_and_names_the_wrong_index_kind() {
    make_items(100, 8);
    Spi::run("CREATE INDEX items_idx ON items USING twotower_hnsw (embedding)").unwrap();
    Spi::run("CREATE INDEX items_btree ON items (id)").unwrap();
    assert_eq!(sqlstate("SELECT * FROM twotower.index_info('items_btree')"), "42809");
    // The parent index of a partitioned table has no storage: refused cleanly.
    Spi::run("CREATE TABLE p (id bigint, v real[]) PARTITION BY RANGE (id);
              CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100);
              CREATE INDEX p_idx ON p USING twotower_hnsw (v)").unwrap();
    assert_eq!(sqlstate("SELECT * FROM twotower.index_info('p_idx')"), "0A000");
    assert_eq!(sqlstate("SELECT * FROM twotower.index_info('p1_v_idx')"), "ok");
    Spi::run("CREATE ROLE tt_outsider").unwrap();
    Spi::run("SET ROLE tt_outsider").unwrap();
    assert_eq!(sqlstate("SELECT * FROM twotower.index_info('items_idx')"), "42501");
    Spi::run("RESET ROLE; GRANT SELECT ON items TO tt_outsider; SET ROLE tt_outsider").unwrap();
    assert_eq!(sqlstate("SELECT * FROM twotower.index_info('items_idx')"), "ok");
    Spi::run("RESET ROLE").unwrap();
}

#[pg_test]
fn recall_null_arguments_are_clear_errors() {
    import_synth_user("synth", 3);
    Spi::run("CREATE TABLE vecs (id bigint PRIMARY KEY, embedding real[])").unwrap();
    Spi::run("CREATE INDEX vecs_idx ON vecs USING twotower_hnsw (embedding real_cosine_ops)").unwrap();
    assert_eq!(sqlstate("SELECT * FROM twotower.recall('synth', 'vecs_idx', '{}', NULL)"), "22004");
    // A table where an index is needed: 42809 wrong_object_type, as index_info on a btree.
    assert_eq!(sqlstate("SELECT * FROM twotower.recall('synth', 'vecs', '{}', 5)"), "42809");
    // No SELECT on the table: refused before anything about the index is revealed.
    Spi::run("CREATE ROLE tt_outsider; SET ROLE tt_outsider").unwrap();
    assert_eq!(sqlstate("SELECT * FROM twotower.recall('synth', 'vecs_idx', '{}', 5)"), "42501");
    Spi::run("RESET ROLE").unwrap();
}

#[pg_test]
fn embed_users_is_bounded_in_size_and_memory() {
    import_synth_user("synth", 5);
    assert_eq!(
        sqlstate("SELECT count(*) FROM twotower.embed_users('synth', array_fill('{}'::jsonb, ARRAY[100001]))"),
        "54000"
    );
    // 300 users with 20 000-id histories: the call holds one user's JSON at a time.
    Spi::run(
        "CREATE TEMP TABLE big AS SELECT array_agg(jsonb_build_object('user_id', i, 'history', h)) AS a
           FROM generate_series(1, 300) i, (SELECT jsonb_agg(j) AS h FROM generate_series(1, 20000) j) x",
    )
    .unwrap();
    let hwm = || one_i64(r"SELECT (regexp_match(pg_read_file('/proc/self/status'), 'VmHWM:\s+(\d+)'))[1]::bigint");
    assert_eq!(one_i64("SELECT count(*) FROM big WHERE cardinality(a) = 300"), 1);
    let before = hwm();
    assert_eq!(one_i64("SELECT count(embedding) FROM twotower.embed_users('synth', (SELECT a FROM big))"), 300);
    let grew_kb = hwm() - before;
    assert!(grew_kb < 120_000, "embed_users raised the backend's peak memory by {grew_kb} kB");
}
