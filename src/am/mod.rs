//! The `twotower_hnsw` index access method: one file per concern.

pub mod alter;
pub mod build;
pub mod cache;
pub mod cost;
pub mod fold;
pub mod insert;
pub mod mapguard;
pub mod options;
pub mod pages;
pub mod scan;
pub mod search;
pub mod vacuum;

use crate::infra::error::TtError;
use crate::infra::pg_function_info_v1;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;
use twotower_ann::Metric;

pg_function_info_v1!(
    pg_finfo_twotower_hnsw_handler,
    pg_finfo_twotower_hnsw_support
);

/// The AM handler: `twotower.hnsw_handler(internal) RETURNS index_am_handler`.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotower_hnsw_handler(
    _fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: palloc0 returns zeroed memory of the requested size in the current context.
    let r = unsafe { pg_sys::palloc0(std::mem::size_of::<pg_sys::IndexAmRoutine>()) }
        as *mut pg_sys::IndexAmRoutine;
    // SAFETY: `r` is a valid, zeroed IndexAmRoutine.
    unsafe {
        (*r).type_ = pg_sys::NodeTag::T_IndexAmRoutine;
        (*r).amstrategies = 1;
        (*r).amsupport = 1;
        (*r).amoptsprocnum = 0;
        (*r).amcanorder = false;
        (*r).amcanorderbyop = true;
        (*r).amcanbackward = false;
        (*r).amcanunique = false;
        (*r).amcanmulticol = false;
        (*r).amoptionalkey = true;
        (*r).amsearcharray = false;
        (*r).amsearchnulls = false;
        (*r).amstorage = false;
        (*r).amclusterable = false;
        (*r).ampredlocks = false;
        (*r).amcanparallel = false;
        (*r).amcaninclude = false;
        (*r).amusemaintenanceworkmem = false;
        (*r).amparallelvacuumoptions = 0;
        (*r).amkeytype = pg_sys::InvalidOid;
        (*r).ambuild = Some(build::ambuild);
        (*r).ambuildempty = Some(build::ambuildempty);
        (*r).aminsert = Some(insert::aminsert);
        (*r).ambulkdelete = Some(vacuum::ambulkdelete);
        (*r).amvacuumcleanup = Some(vacuum::amvacuumcleanup);
        (*r).amcanreturn = None;
        (*r).amcostestimate = Some(cost::amcostestimate);
        (*r).amoptions = Some(options::amoptions);
        (*r).amproperty = None;
        (*r).ambuildphasename = Some(build::ambuildphasename);
        (*r).amvalidate = Some(amvalidate);
        (*r).amadjustmembers = None;
        (*r).ambeginscan = Some(scan::ambeginscan);
        (*r).amrescan = Some(scan::amrescan);
        (*r).amgettuple = Some(scan::amgettuple);
        (*r).amgetbitmap = None;
        (*r).amendscan = Some(scan::amendscan);
        (*r).ammarkpos = None;
        (*r).amrestrpos = None;
        (*r).amestimateparallelscan = None;
        (*r).aminitparallelscan = None;
        (*r).amparallelrescan = None;
    }
    pg_sys::Datum::from(r)
}

/// Support function 1 of every operator class. It is never called: its name tells the access
/// method which metric the operator class uses.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotower_hnsw_support(
    _fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    pg_sys::Datum::from(0usize)
}

#[pg_guard]
unsafe extern "C-unwind" fn amvalidate(_opclass: pg_sys::Oid) -> bool {
    true
}

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
