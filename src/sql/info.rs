//! Health and housekeeping functions: `twotower.index_info(regclass)`, `twotower.cache_cleanup()`.

use pgrx::prelude::*;

/// The extension's schema: every SQL object of pg_twotower lives in `twotower`.
#[pg_schema]
pub mod twotower {
    use crate::infra::error::OrReport;
    use pgrx::pg_sys;
    use pgrx::prelude::*;

    /// One row describing a twotower_hnsw index: its settings, what the graph and the delta hold,
    /// its size, and the state of this node's cache file.
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
        ),
    > {
        crate::infra::citus::refuse_shell_index(index, "index_info()").or_report();
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
        ))
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
