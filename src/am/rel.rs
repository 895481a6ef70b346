//! What the access method's files ask of an index relation: whether it is ours, its metric,
//! its table.

use crate::infra::error::TtError;
use pgrx::pg_sys;
use std::ffi::CStr;
use twotower_ann::Metric;

/// The metric of an index, from the name of its operator class's support function 1.
///
/// # Safety
/// `index` must be an open twotower_hnsw index.
pub unsafe fn metric_of(index: pg_sys::Relation) -> Metric {
    // SAFETY: the operator class of every twotower_hnsw index has support function 1.
    let name = unsafe {
        let proc_ = pg_sys::index_getprocid(index, 1, 1);
        let p = pg_sys::get_func_name(proc_);
        if p.is_null() {
            TtError::Unsupported("operator class of this index has no support function 1".into())
                .report();
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    };
    match name.as_str() {
        "hnsw_support_cosine" => Metric::Cosine,
        "hnsw_support_ip" => Metric::InnerProduct,
        "hnsw_support_l2" => Metric::L2,
        other => TtError::Unsupported(format!(
            "unknown twotower_hnsw support function \"{other}\""
        ))
        .report(),
    }
}

/// True if `index` is a twotower_hnsw index.
///
/// # Safety
/// `index` must be an open relation.
pub unsafe fn is_ours(index: pg_sys::Relation) -> bool {
    // SAFETY: rd_rel is valid for an open relation; get_am_oid with missing_ok returns InvalidOid.
    unsafe {
        let am = pg_sys::get_am_oid(c"twotower_hnsw".as_ptr(), true);
        am != pg_sys::InvalidOid && (*(*index).rd_rel).relam == am
    }
}

/// The table of index `index`, read from the catalogue without taking a lock (for privilege
/// checks that must come first): `Ok(None)` when `index` is no index; 0A000 for the index of a
/// partitioned table, which has no storage of its own (`what` names the caller).
pub fn table_of_index(
    index: pg_sys::Oid,
    what: &str,
) -> crate::infra::error::TtResult<Option<pg_sys::Oid>> {
    // SAFETY: catalogue lookups by oid; a missing relation gives relkind 0 and InvalidOid.
    unsafe {
        if pg_sys::get_rel_relkind(index) == pg_sys::RELKIND_PARTITIONED_INDEX as std::ffi::c_char {
            return Err(TtError::Unsupported(format!(
                "{what} needs the index of one table, not of a partitioned table: name a partition's index"
            )));
        }
        let heap = pg_sys::IndexGetRelation(index, true);
        Ok((heap != pg_sys::InvalidOid).then_some(heap))
    }
}
