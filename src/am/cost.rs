//! Planner costs: the index is only useful for `ORDER BY col <op> constant`, where its start-up
//! cost is one HNSW search and each further row is cheap.

use pgrx::pg_sys;
use pgrx::prelude::*;

#[pg_guard]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C-unwind" fn amcostestimate(
    _root: *mut pg_sys::PlannerInfo,
    path: *mut pg_sys::IndexPath,
    _loop_count: f64,
    startup: *mut pg_sys::Cost,
    total: *mut pg_sys::Cost,
    selectivity: *mut pg_sys::Selectivity,
    correlation: *mut f64,
    pages: *mut f64,
) {
    // SAFETY: the planner passes valid output pointers and path.
    unsafe {
        *correlation = 0.0;
        if (*path).indexorderbys.is_null() {
            // Without an ORDER BY on our operator the index is useless: never choose it.
            *startup = f64::INFINITY;
            *total = f64::INFINITY;
            *selectivity = 0.0;
            *pages = 0.0;
            return;
        }
        let info = (*path).indexinfo;
        let tuples = (*info).tuples.max(1.0);
        let index_pages = (*info).pages as f64;
        let ef = crate::infra::gucs::EF_SEARCH.get().max(1) as f64;
        // One search visits about ef * log2(n) nodes, M distance computations each.
        let visited = ef * tuples.log2().max(1.0) * 4.0;
        *startup = visited * pg_sys::cpu_operator_cost;
        *total = *startup + tuples * pg_sys::cpu_index_tuple_cost;
        *selectivity = 1.0;
        *pages = index_pages.min(ef);
    }
}
