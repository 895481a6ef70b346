//! Health and housekeeping functions: `twotower.index_info(regclass)`, `twotower.cache_cleanup()`.

use pgrx::prelude::*;

/// The extension's schema: every SQL object of pg_twotower lives in `twotower`.
#[pg_schema]
pub mod twotower {
    use crate::am::{cache, is_ours, pages};
    use crate::error::{OrReport, TtError, TtResult};
    use pgrx::pg_sys;
    use pgrx::prelude::*;
    use twotower_ann::{Metric, Quantization};

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
        ),
    > {
        check_may_inspect(index).or_report();
        // SAFETY: index_open raises a proper ERROR for a missing relation or a non-index.
        let rel = unsafe { pg_sys::index_open(index, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
        // SAFETY: `rel` is open until index_close below.
        let row = unsafe {
            if !is_ours(rel) {
                TtError::WrongIndex("index_info()".into()).report();
            }
            let meta = pages::read_meta(rel).or_report();
            let key = cache::rel_key(rel);
            let oid = (*rel).rd_id.to_u32();
            let size =
                pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM)
                    as i64
                    * pg_sys::BLCKSZ as i64;
            let row = (
                meta.dims as i32,
                Metric::from_code(meta.metric)
                    .map_or("?", |m| m.name())
                    .to_string(),
                Quantization::from_code(meta.quantization)
                    .map_or("?", |q| q.name())
                    .to_string(),
                meta.m as i32,
                meta.ef_construction as i32,
                format!("{:016x}", meta.generation),
                meta.graph_count as i64,
                meta.graph_dead as i64,
                meta.graph_orphans as i64,
                meta.delta_live as i64,
                size,
                meta.image_len as i64,
                meta.build_millis as f64 / 1000.0,
                meta.has_image()
                    .then(|| format!("{}", cache::file_path(key, oid, &meta).display())),
                cache::file_state(key, oid, &meta).to_string(),
            );
            pg_sys::index_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            row
        };
        TableIterator::once(row)
    }

    /// index_info() shows item counts and paths: only for roles that may read the table, own
    /// the index, or monitor the server (pg_monitor). Checked before anything is locked.
    fn check_may_inspect(index: pg_sys::Oid) -> TtResult<()> {
        let me = crate::catalog::caller();
        // SAFETY: ACL lookups by oid without locks.
        unsafe {
            let heap = crate::am::table_of_index(index, "index_info()")?
                .ok_or_else(|| TtError::WrongIndex("index_info()".into()))?;
            let monitor = pg_sys::get_role_oid(c"pg_monitor".as_ptr(), true);
            let ok = pg_sys::pg_class_aclcheck(heap, me, pg_sys::ACL_SELECT as pg_sys::AclMode)
                == pg_sys::AclResult::ACLCHECK_OK
                || pg_sys::pg_class_ownercheck(index, me)
                || (monitor != pg_sys::InvalidOid && pg_sys::has_privs_of_role(me, monitor));
            if ok {
                Ok(())
            } else {
                Err(TtError::PermissionDenied {
                    action: "inspect this index".into(),
                    hint: "index_info() needs SELECT on the indexed table, ownership of the index, or membership in pg_monitor.".into(),
                })
            }
        }
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
        .unwrap_or_else(|e| pgrx::error!("cache_cleanup: {e}"));
        // SAFETY: MyDatabaseId is set in every backend connected to a database.
        cache::cleanup(unsafe { pg_sys::MyDatabaseId }.to_u32(), &live)
    }
}
