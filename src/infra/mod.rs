//! What every SQL surface and the access method stand on: errors and their SQLSTATEs
//! (`error`), settings (`gucs`), the model and ownership catalogue (`catalog`), SPI helpers and
//! progress (`spi`, `progress`), relcache invalidation (`relcache`), reading vector datums
//! (`vector`), shard connections and Citus detection (`shard_conn`, `citus`), the DROP
//! EXTENSION guard (`guard`) and the planner's row estimates (`planner`). Nothing here imports
//! the access method, the serving path or a SQL surface.

pub mod catalog;
pub mod citus;
pub mod error;
pub mod guard;
pub mod gucs;
pub mod planner;
pub mod progress;
pub mod relcache;
pub mod shard_conn;
pub mod spi;
pub mod vector;

/// Declares the V1 calling-convention record PostgreSQL looks up for a C function.
macro_rules! pg_function_info_v1 {
    ($($name:ident),* $(,)?) => {
        $(
            #[no_mangle]
            pub extern "C" fn $name() -> &'static ::pgrx::pg_sys::Pg_finfo_record {
                const V1: ::pgrx::pg_sys::Pg_finfo_record = ::pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
                &V1
            }
        )*
    };
}
pub(crate) use pg_function_info_v1;
