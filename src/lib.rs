//! pg_twotower: two-tower retrieval in PostgreSQL. This crate is the glue between SQL and the
//! pgrx-free core crates under `crates/`: it converts and validates, calls the core, and maps
//! errors to SQLSTATEs (see `infra/error.rs`). `infra` is what everything stands on, `am` the index
//! access method, `serve` the search and funnel sources between them and the SQL surfaces in
//! `sql` (one module per surface).

use pgrx::prelude::*;

pub mod am;
pub mod infra;
pub mod serve;
pub mod sql;

::pgrx::pg_module_magic!(name, version);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    infra::gucs::register();
    am::options::register();
    am::alter::register();
    am::cache::register();
    infra::catalog::register();
    serve::item_cache::register();
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
