//! pg_twotower: two-tower retrieval in PostgreSQL. This crate is the glue between SQL and the
//! pgrx-free core crates under `crates/`: it converts and validates, calls the core, and maps
//! errors to SQLSTATEs (see `error.rs`).

use pgrx::prelude::*;

pub mod am;
pub mod catalog;
pub mod channels;
pub mod citus;
pub mod embed;
pub mod error;
pub mod fanout;
pub mod guard;
pub mod gucs;
pub mod info;
pub mod item_cache;
pub mod merge;
pub mod models;
pub mod ops;
pub mod pipeline;
pub mod planner;
pub mod prerank_train;
pub mod progress;
pub mod recall;
pub mod relcache;
pub mod shard_conn;
pub mod sources;
pub mod spi;
pub mod train;
pub mod vector;

::pgrx::pg_module_magic!(name, version);

pub use gucs::{BUILD_THREADS, EF_SEARCH, MODEL_CACHE_MB};

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::register();
    am::options::register();
    am::alter::register();
    am::cache::register();
    catalog::register();
    item_cache::register();
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
