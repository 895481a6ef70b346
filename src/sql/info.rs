//! Health and housekeeping functions: `twotower.index_info(regclass)`, `twotower.cache_cleanup()`.

use pgrx::prelude::*;

/// The extension's schema: every SQL object of pg_twotower lives in `twotower`.
#[pg_schema]
pub mod twotower {
    use crate::infra::error::OrReport;
    use pgrx::pg_sys;
    use pgrx::prelude::*;

    /// One row describing a twotower_hnsw index: its settings, what the graph and the delta hold,
    /// its size, and the state of this node's cache file. For the index of a Citus table, one
    /// such row per shard's index, asked of the workers.
    /// Called through the SQL wrapper `twotower.index_info(regclass)` (sql/pg_twotower.sql).
    #[pg_extern(volatile, parallel_safe, strict)]
    #[allow(clippy::type_complexity)]
    fn index_info_by_oid(
        index: pg_sys::Oid,
    ) -> TableIterator<
        'static,
        (
            name!(dims, i32),
            name!(metric, String),
            name!(quantization, String),
            name!(m, i32),
            name!(ef_construction, i32),
            name!(generation, String),
            name!(graph_items, i64),
            name!(graph_dead, i64),
            name!(graph_orphans, i64),
            name!(delta_items, i64),
            name!(size_bytes, i64),
            name!(image_bytes, i64),
            name!(build_seconds, f64),
            name!(cache_file, Option<String>),
            name!(cache_state, String),
            name!(delta_graph_items, i64),
            name!(delta_pending, i64),
            name!(folds, i64),
            name!(delta_generation, String),
            name!(tuned_queries, Option<i32>),
            name!(tuned_k, Option<i32>),
            name!(tuned_links, Option<i64>),
            name!(tuned_recall_before, Option<f64>),
            name!(tuned_recall_after, Option<f64>),
        ),
    > {
        if crate::infra::citus::is_citus_index(index).or_report() {
            return TableIterator::new(citus_shards(index).or_report());
        }
        let h = crate::am::search::health(index, "index_info()").or_report();
        TableIterator::once((
            h.dims as i32,
            h.metric.to_string(),
            h.quantization.to_string(),
            h.m as i32,
            h.ef_construction as i32,
            format!("{:016x}", h.generation),
            h.graph_items as i64,
            h.graph_dead as i64,
            h.graph_orphans as i64,
            h.delta_items as i64,
            h.size_bytes as i64,
            h.image_bytes as i64,
            h.build_seconds,
            h.cache_file,
            h.cache_state.to_string(),
            h.delta_graph_items as i64,
            h.delta_pending as i64,
            h.folds as i64,
            format!("{:016x}", h.delta_generation),
            h.tuned.as_ref().map(|t| t.queries as i32),
            h.tuned.as_ref().map(|t| t.k as i32),
            h.tuned.as_ref().map(|t| t.links as i64),
            h.tuned.as_ref().map(|t| round4(t.recall_before)),
            h.tuned.as_ref().map(|t| round4(t.recall_after)),
        ))
    }

    type InfoRow = (
        i32,
        String,
        String,
        i32,
        i32,
        String,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        f64,
        Option<String>,
        String,
        i64,
        i64,
        i64,
        String,
        Option<i32>,
        Option<i32>,
        Option<i64>,
        Option<f64>,
        Option<f64>,
    );

    /// A recall as shown: four decimals (an f32 widened to f64 would show its binary tail).
    fn round4(x: f32) -> f64 {
        (x as f64 * 1e4).round() / 1e4
    }

    /// `index_info` of every shard's index of a Citus table's index, one row per shard (in
    /// shard id order), asked of the workers through Citus (`run_command_on_shards`) as the
    /// caller.
    fn citus_shards(index: pg_sys::Oid) -> crate::infra::error::TtResult<Vec<InfoRow>> {
        use crate::infra::error::TtError;
        // SAFETY: catalogue lookups by oid of an existing index.
        let (table, name) = unsafe {
            let table = pg_sys::IndexGetRelation(index, false);
            let name = pg_sys::get_rel_name(index);
            if name.is_null() {
                return Err(TtError::UndefinedTable("the index no longer exists".into()));
            }
            (
                table,
                std::ffi::CStr::from_ptr(name)
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        // Each shard's index is named after the index and the shard id (Citus's naming).
        let command = format!(
            "SELECT pg_catalog.row_to_json(x)::pg_catalog.text
               FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.indexrelid,
                    twotower.index_info(i.indexrelid::pg_catalog.regclass) x
              WHERE i.indrelid OPERATOR(pg_catalog.=) '%1$s'::pg_catalog.regclass
                AND c.relname OPERATOR(pg_catalog.=) ('{}_' OPERATOR(pg_catalog.||) pg_catalog.regexp_replace('%1$s', '^.*_|[^0-9]', '', 'g'))",
            name.replace('\'', "''")
        );
        let mut rows = Vec::new();
        Spi::connect(|c| {
            for r in c.select(
                "SELECT shardid::pg_catalog.int8, success, result FROM run_command_on_shards($1::pg_catalog.regclass, $2) ORDER BY shardid",
                None,
                &[table.into(), command.into()],
            )? {
                rows.push((
                    r.get::<i64>(1)?.unwrap_or(0),
                    r.get::<bool>(2)?.unwrap_or(false),
                    r.get::<String>(3)?.unwrap_or_default(),
                ));
            }
            Ok::<_, pgrx::spi::Error>(())
        })
        .map_err(|e| TtError::Internal(format!("index_info through Citus: {e}")))?;
        let mut out = Vec::with_capacity(rows.len());
        for (shard, ok, result) in rows {
            if !ok {
                return Err(TtError::BadArgument(format!(
                    "index_info of shard {shard}: {result}"
                )));
            }
            let v: serde_json::Value = serde_json::from_str(&result).map_err(|_| {
                TtError::Internal(format!(
                    "index_info of shard {shard}: the shard has no such index ({result})"
                ))
            })?;
            let int = |k: &str| v.get(k).and_then(serde_json::Value::as_i64).unwrap_or(0);
            let text = |k: &str| {
                v.get(k)
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            out.push((
                int("dims") as i32,
                text("metric"),
                text("quantization"),
                int("m") as i32,
                int("ef_construction") as i32,
                text("generation"),
                int("graph_items"),
                int("graph_dead"),
                int("graph_orphans"),
                int("delta_items"),
                int("size_bytes"),
                int("image_bytes"),
                v.get("build_seconds")
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0),
                v.get("cache_file")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned),
                text("cache_state"),
                int("delta_graph_items"),
                int("delta_pending"),
                int("folds"),
                text("delta_generation"),
                v.get("tuned_queries")
                    .and_then(serde_json::Value::as_i64)
                    .map(|x| x as i32),
                v.get("tuned_k")
                    .and_then(serde_json::Value::as_i64)
                    .map(|x| x as i32),
                v.get("tuned_links").and_then(serde_json::Value::as_i64),
                v.get("tuned_recall_before")
                    .and_then(serde_json::Value::as_f64),
                v.get("tuned_recall_after")
                    .and_then(serde_json::Value::as_f64),
            ));
        }
        Ok(out)
    }

    /// Removes this database's cache files that belong to no existing twotower_hnsw index
    /// (dropped or rebuilt indexes); returns how many were removed.
    #[pg_extern(volatile, parallel_unsafe)]
    fn cache_cleanup() -> i64 {
        let live: Vec<(u32, u32)> = Spi::connect(|c| {
            let rows = c.select(
                "SELECT COALESCE(NULLIF(c.reltablespace, 0), d.dattablespace)::oid::int8,
                    pg_catalog.pg_relation_filenode(c.oid)::oid::int8
               FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_am a ON a.oid = c.relam AND a.amname = 'twotower_hnsw'
               JOIN pg_catalog.pg_database d ON d.datname = pg_catalog.current_database()",
                None,
                &[],
            )?;
            let mut out = Vec::new();
            for r in rows {
                let spc: Option<i64> = r.get(1)?;
                let node: Option<i64> = r.get(2)?;
                if let (Some(s), Some(n)) = (spc, node) {
                    out.push((s as u32, n as u32));
                }
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
        .map_err(|e| crate::infra::error::TtError::Internal(format!("cache_cleanup: {e}")))
        .or_report();
        // SAFETY: MyDatabaseId is set in every backend connected to a database.
        crate::am::search::cleanup_cache(unsafe { pg_sys::MyDatabaseId }.to_u32(), &live)
    }
}
