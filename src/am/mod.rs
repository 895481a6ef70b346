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
pub mod rel;
pub mod scan;
pub mod search;
pub mod vacuum;

use crate::infra::pg_function_info_v1;
use pgrx::pg_sys;
use pgrx::prelude::*;

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
