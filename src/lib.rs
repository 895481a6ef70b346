//! pg_twotower: two-tower retrieval in PostgreSQL. This crate is the glue between SQL and the
//! pgrx-free core crates under `crates/`: it converts and validates, calls the core, and maps
//! errors to SQLSTATEs (see `error.rs`).

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

pub mod am;
pub mod catalog;
pub mod embed;
pub mod error;
pub mod info;
pub mod models;
pub mod ops;
pub mod recall;
pub mod vector;

::pgrx::pg_module_magic!(name, version);

/// `twotower.ef_search`: candidate list size of index searches.
pub static EF_SEARCH: GucSetting<i32> = GucSetting::<i32>::new(100);
/// `twotower.build_threads`: worker threads of an index build (0 = all cores).
pub static BUILD_THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);
/// `twotower.model_cache_size`: memory for decoded models per backend, in MB.
pub static MODEL_CACHE_MB: GucSetting<i32> = GucSetting::<i32>::new(256);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    GucRegistry::define_int_guc(
        c"twotower.ef_search",
        c"Size of the dynamic candidate list of twotower_hnsw index searches.",
        c"Larger values give better recall and slower searches. Scans widen it by themselves when filters discard rows.",
        &EF_SEARCH,
        1,
        10_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"twotower.build_threads",
        c"Worker threads used to insert vectors into the graph during an index build (0 = one per core).",
        c"",
        &BUILD_THREADS,
        0,
        64,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"twotower.model_cache_size",
        c"Memory for decoded models kept by each backend, in megabytes.",
        c"The least recently used model versions are dropped first; the one in use is always kept.",
        &MODEL_CACHE_MB,
        1,
        1_048_576,
        GucContext::Userset,
        GucFlags::UNIT_MB,
    );
    am::options::register();
    catalog::register();
}

extension_sql_file!(
    "../sql/pg_twotower.sql",
    name = "pg_twotower_objects",
    finalize
);

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("tests.rs");
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["maintenance_work_mem = '512MB'"]
    }
}
