//! The report of the towers part: every table and verdict is printed here, from the figures
//! the measurement files return.

use super::embed::EmbedRun;
use super::harness::{verdict, Lat};
use super::recall::{RecallRun, Run};
use super::refresh::RefreshRun;
use super::{EMBED_P99_TARGET_MS, RECALL500_TARGET, RECALL_P99_TARGET_MS};

/// One row `| what | p50 | p99 | mean |` with `digits` decimals.
fn lat_row(what: &str, l: &Lat, digits: usize) {
    println!(
        "| {what} | {:.d$} | {:.d$} | {:.d$} |",
        l.p50,
        l.p99,
        l.mean,
        d = digits
    );
}

/// The embed_user table and verdicts.
pub(crate) fn embed(r: &EmbedRun) {
    let EmbedRun {
        input_width,
        model_mb,
        calls,
        warm,
        client,
        baseline,
        pinned,
        scan_ms,
        server_ms,
        batch_ms,
        in_text,
        in_value,
        numpy,
        worst,
        first_call_ms,
        second_call_ms,
    } = r;
    println!(
        "\n### embed_user: realistic user tower (10 fields, 16-d embeddings, {} -> 256 -> 256 -> 64, l2-normalised, cosine), {calls} varied inputs, one client, after {warm} warm-up calls",
        input_width
    );
    println!("| what | p50 ms | p99 ms | mean ms |");
    println!("|---|---|---|---|");
    lat_row(
        "client round trip, prepared `SELECT twotower.embed_user($1, $2::jsonb)`",
        client,
        3,
    );
    lat_row("client round trip, same parameters, `SELECT $1::text IS NOT NULL AND $2::jsonb IS NOT NULL` (protocol baseline)", baseline, 3);
    match pinned {
        Some((p, b)) => {
            lat_row("the same embed_user round trip, client and backend pinned to one core (no cross-core wake-ups)", p, 3);
            lat_row("the same protocol baseline, pinned to one core", b, 3);
        }
        None => println!(
            "| pinned round trips: skipped (taskset unavailable or not permitted) | – | – | – |"
        ),
    }
    println!(
        "| server side: `SELECT count(embed_user('bench_user', f))` over {calls} rows of a temp table, total / {calls} (scan alone: {:.4}) | – | – | {:.4} |",
        scan_ms,
        server_ms
    );
    println!(
        "| server side: `embed_users('bench_user', <array of {calls}>)`, both cores, total / {calls} | – | – | {:.4} |",
        batch_ms
    );
    lat_row(
        "in-process Rust (twotower-tower, no PostgreSQL): parse JSON text + encode + forward",
        in_text,
        4,
    );
    lat_row(
        "in-process Rust: encode + forward of a parsed value",
        in_value,
        4,
    );
    match numpy {
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
            .as_ref()
            .map(|(p, _)| format!(" (pinned to one core: p99 {:.3} ms, {})", p.p99, verdict(p.p99 <= EMBED_P99_TARGET_MS)))
            .unwrap_or_default(),
        server_ms,
        baseline.p50
    );
    if let Ok(np) = numpy {
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
        model_mb,
        first_call_ms,
        second_call_ms
    );
}

/// The recall() table, verdicts and checks.
pub(crate) fn recall(x: &RecallRun) {
    let RecallRun {
        n_items,
        dims,
        ef,
        calls,
        gt_secs,
        r500,
        r100,
        rex,
        ann_runs,
        sql_calls,
        sql_runs,
        server_ms,
        first_ms,
        leaked,
        short,
        pair,
        exact1,
        exact500,
        got500,
        embed_server_ms,
        embed_baseline_p50,
    } = x;
    println!(
        "\n### recall(): user tower + top-k over `items_tt_idx` ({n_items} items × {dims}, twotower.ef_search = {ef}; recall() raises ef to k + |exclude|), {calls} varied users, one client"
    );
    println!(
        "Note: the `items` vectors are the synthetic clusters of the ANN benchmark, unrelated to the towers; user vectors come from a randomly initialised tower. Fine for latency; recall@k is measured against exact search of the same user vectors ({:.1} s of brute force in this program), but its value reflects this query distribution, not a trained model.",
        gt_secs
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
        r500,
    );
    row("`recall(..., 100)`", r100);
    row(
        "`recall(..., 500, exclude => 50 ids of the user's top-100)`",
        rex,
    );
    for (ann_ef, l, r) in ann_runs {
        println!(
            "| ANN alone: `ORDER BY embedding <=> $1 LIMIT 500`, user vector as parameter, ef_search = {ann_ef} | {:.3} | {:.3} | {:.3} | – | 500 | {:.4} |",
            l.p50, l.p99, l.mean, r
        );
    }
    for (what, l) in sql_runs {
        println!(
            "| SQL instead of recall(): {what}, ef_search = {}, {sql_calls} users | {:.3} | {:.3} | {:.3} | – | 500 | – |",
            (*ef).max(500),
            l.p50,
            l.p99,
            l.mean
        );
    }
    println!(
        "| server side: `SELECT count(*) FROM tt_recall_inputs r, LATERAL recall(..., r.f, 500)`, total / {calls} | – | – | {:.3} | – | – | – |",
        server_ms
    );
    println!(
        "\nrecall top-500 p99 {:.3} ms vs target ≤ {RECALL_P99_TARGET_MS} ms: {}; recall@500 {:.4} vs target ≥ {RECALL500_TARGET}: {}. First recall() of the connection (maps the index image): {:.0} ms.",
        r500.lat.p99,
        verdict(r500.lat.p99 <= RECALL_P99_TARGET_MS),
        r500.recall,
        verdict(r500.recall >= RECALL500_TARGET),
        first_ms
    );
    println!(
        "Checks: excluded ids returned {leaked}{}; rows out of rank/score order {}; max |score − cosine(user vector, stored item vector)| {:.2e}; embed_user share of a top-500 call ≈ {:.3} ms (server-side) of {:.3} ms (p50), protocol baseline {:.3} ms.",
        if *short { " (some exclusion lists shorter than 50)" } else { "" },
        r500.bad_order + r100.bad_order + rex.bad_order,
        r500.score_err.max(r100.score_err).max(rex.score_err),
        embed_server_ms,
        r500.lat.p50,
        embed_baseline_p50,
    );
    println!(
        "Query distribution: mean pairwise cosine of the user vectors {pair:.3}; exact similarity at rank 1 {exact1:.4} and at rank 500 {exact500:.4} (means over users); recall()'s 500th score {got500:.4}."
    );
}

/// The refresh throughput table and its check.
pub(crate) fn refresh(r: &RefreshRun) {
    let RefreshRun {
        input_width,
        n,
        load_secs,
        t_insert,
        t_upsert,
        t_sql,
        t_item,
        t_json,
        threads,
        t_inproc,
        count,
        count2,
        diff,
    } = r;
    let rate = |t: f64| *n as f64 / t;
    println!(
        "\n### item-vector refresh: realistic item tower (5 fields, {} -> 128 -> 64, cosine), {n} items (loaded by COPY in {:.1} s)",
        input_width,
        load_secs
    );
    println!("| what | seconds | items/s |");
    println!("|---|---|---|");
    println!(
        "| `refresh_item_vectors('bench_item', 'bench_item_features', 'bench_item_vectors', id_column => 'item_id')` into an empty target (id bigint PK, embedding real[]) | {t_insert:.2} | {:.0} |",
        rate(*t_insert)
    );
    println!(
        "| the same again into the full target (nothing changed: every vector compared, none written) | {t_upsert:.2} | {:.0} |",
        rate(*t_upsert)
    );
    println!(
        "| plain SQL into an empty twin target: `INSERT INTO bench_item_vectors_sql SELECT item_id, embed_item('bench_item', to_jsonb(f)) FROM bench_item_features f` (one core) | {t_sql:.2} | {:.0} |",
        rate(*t_sql)
    );
    println!(
        "| `SELECT count(embed_item('bench_item', to_jsonb(f))) FROM bench_item_features f` (one core, no writes) | {t_item:.2} | {:.0} |",
        rate(*t_item)
    );
    println!(
        "| `SELECT count(to_jsonb(f)) FROM bench_item_features f` (reading the rows as jsonb only) | {t_json:.2} | {:.0} |",
        rate(*t_json)
    );
    println!(
        "| in-process Rust: encode (one core) + `forward_parallel` ({threads} threads), no PostgreSQL | {:.2} | {:.0} |",
        t_inproc,
        rate(*t_inproc)
    );
    println!(
        "\nTarget rows after the first run {count}, after the second {count2}; refreshed vectors vs `embed_item` of the same rows (first 100): max |difference| {}.",
        diff.map(|d| format!("{d:.2e}")).unwrap_or_else(|| "n/a (no rows compared)".into())
    );
}
