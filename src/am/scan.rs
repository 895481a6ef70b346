//! Ordered scans: the graph (iteratively widened, tombstones skipped) merged with the exactly
//! ranked delta, in ascending distance, for as long as the executor keeps asking.

use super::cache::{self, Loaded};
use super::pages::{
    bit_is_set, for_each_delta, key_to_tid, read_meta, read_tombstones, tid_to_key,
};
use crate::error::{OrReport, TtError};
use crate::vector::VecRef;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::rc::Rc;
use twotower_ann::{AnnError, GraphCursor, Metric};

#[derive(Default)]
struct ScanState {
    /// The ORDER BY argument; None for `ORDER BY col <=> NULL` (rows in index order).
    query: Option<Vec<f32>>,
    started: bool,
    image: Option<Rc<Loaded>>,
    tombstones: Vec<u8>,
    cursor: GraphCursor,
    /// Delta items, sorted by descending distance so the nearest is popped from the end.
    delta: Vec<(f32, u64)>,
    ef: usize,
    /// A floor for `ef` set by callers that know how many rows they want (recall's k).
    min_ef: usize,
    /// Next graph position for unordered scans.
    next_pos: usize,
}

#[pg_guard]
pub unsafe extern "C-unwind" fn ambeginscan(
    index: pg_sys::Relation,
    nkeys: i32,
    norderbys: i32,
) -> pg_sys::IndexScanDesc {
    // SAFETY: standard scan descriptor allocation.
    let scan = unsafe { pg_sys::RelationGetIndexScan(index, nkeys, norderbys) };
    // The state lives in the scan's memory context and is dropped with it, even on ERROR.
    let st = PgMemoryContexts::CurrentMemoryContext.leak_and_drop_on_delete(ScanState::default());
    // SAFETY: `scan` was just allocated.
    unsafe { (*scan).opaque = st as *mut core::ffi::c_void };
    scan
}

#[pg_guard]
pub unsafe extern "C-unwind" fn amrescan(
    scan: pg_sys::IndexScanDesc,
    _keys: pg_sys::ScanKey,
    _nkeys: i32,
    orderbys: pg_sys::ScanKey,
    _norderbys: i32,
) {
    // SAFETY: the executor passes our scan and its order-by keys.
    unsafe {
        if !orderbys.is_null() && (*scan).numberOfOrderBys > 0 {
            std::ptr::copy(
                orderbys,
                (*scan).orderByData,
                (*scan).numberOfOrderBys as usize,
            );
        }
        let st = &mut *((*scan).opaque as *mut ScanState);
        *st = ScanState::default();
        if (*scan).numberOfOrderBys > 0 {
            let key = &*(*scan).orderByData;
            if key.sk_flags & pg_sys::SK_ISNULL as i32 == 0 {
                let v = VecRef::checked(key.sk_argument, None).or_report();
                st.query = Some(v.as_slice().to_vec());
            }
        }
    }
}

/// Loads what the scan reads: metapage, image, tombstones and the delta, ranked.
unsafe fn start(index: pg_sys::Relation, st: &mut ScanState) {
    // SAFETY: open index relation.
    let meta = unsafe { read_meta(index) }.or_report();
    let metric = Metric::from_code(meta.metric).unwrap_or(Metric::Cosine);
    if let Some(q) = &st.query {
        if meta.dims > 0 && q.len() != meta.dims as usize {
            TtError::Ann(AnnError::DimensionMismatch {
                expected: meta.dims as usize,
                got: q.len(),
            })
            .report();
        }
    }
    st.ef = (crate::EF_SEARCH.get().max(1) as usize).max(st.min_ef);
    if meta.has_image() {
        // SAFETY: open index relation and its metapage.
        st.image = Some(unsafe { cache::image(index, &meta) }.or_report());
        if meta.graph_dead > 0 {
            // SAFETY: as above.
            st.tombstones = unsafe { read_tombstones(index, &meta) };
        }
    }
    let q = st.query.clone();
    let mut delta = Vec::with_capacity(meta.delta_live as usize);
    // SAFETY: as above.
    unsafe {
        for_each_delta(index, &meta, |tid, v| {
            let d = match &q {
                Some(q) => metric.engine_distance(q, v),
                None => 0.0,
            };
            delta.push((d, tid_to_key(&tid)));
        })
    };
    // Descending, NaN (zero vectors under cosine) first so they come out last.
    delta.sort_by(|a, b| b.0.total_cmp(&a.0));
    st.delta = delta;
    st.started = true;
}

fn next_ordered(st: &mut ScanState) -> Option<u64> {
    let ScanState {
        query,
        image,
        tombstones,
        cursor,
        delta,
        ef,
        ..
    } = st;
    let q = query.as_ref()?;
    let graph_head = match image {
        Some(img) => {
            let img_ref = &img.image;
            let skip = |key: u64| {
                img_ref
                    .position(key)
                    .is_some_and(|p| bit_is_set(tombstones, p))
            };
            let skip_dyn: Option<&dyn Fn(u64) -> bool> = if tombstones.is_empty() {
                None
            } else {
                Some(&skip)
            };
            cursor
                .peek(img_ref, q, *ef, skip_dyn)
                .map_err(TtError::from)
                .or_report()
        }
        None => None,
    };
    match (graph_head, delta.last()) {
        (Some((gk, gd)), Some(&(dd, _))) if gd <= dd || dd.is_nan() => {
            cursor.pop();
            Some(gk)
        }
        (Some((gk, _)), None) => {
            cursor.pop();
            Some(gk)
        }
        (_, Some(_)) => delta.pop().map(|(_, k)| k),
        (None, None) => None,
    }
}

fn next_unordered(st: &mut ScanState) -> Option<u64> {
    if let Some(img) = &st.image {
        while st.next_pos < img.image.len() {
            let p = st.next_pos;
            st.next_pos += 1;
            if !bit_is_set(&st.tombstones, p) {
                return Some(img.image.key_at(p));
            }
        }
    }
    st.delta.pop().map(|(_, k)| k)
}

#[pg_guard]
pub unsafe extern "C-unwind" fn amgettuple(
    scan: pg_sys::IndexScanDesc,
    dir: pg_sys::ScanDirection::Type,
) -> bool {
    if dir != pg_sys::ScanDirection::ForwardScanDirection {
        TtError::Unsupported("twotower_hnsw indexes only scan forward".into()).report();
    }
    // SAFETY: opaque was set in ambeginscan.
    let st = unsafe { &mut *((*scan).opaque as *mut ScanState) };
    if !st.started {
        // SAFETY: open scan.
        unsafe { start((*scan).indexRelation, st) };
    }
    pgrx::check_for_interrupts!();
    let next = if st.query.is_some() {
        next_ordered(st)
    } else {
        next_unordered(st)
    };
    match next {
        Some(key) => {
            // SAFETY: writing our result into the scan descriptor.
            unsafe {
                (*scan).xs_heaptid = key_to_tid(key);
                (*scan).xs_recheck = false;
                (*scan).xs_recheckorderby = false;
            }
            true
        }
        None => false,
    }
}

/// Makes the scan search with at least `ef` candidates (for a caller that will read `ef` rows:
/// one graph search instead of several widening rounds). Call after `index_rescan`.
///
/// # Safety
/// `scan` must be an open scan of a twotower_hnsw index.
pub unsafe fn set_min_ef(scan: pg_sys::IndexScanDesc, ef: usize) {
    // SAFETY: opaque was set in ambeginscan.
    let st = unsafe { &mut *((*scan).opaque as *mut ScanState) };
    st.min_ef = ef.min(100_000);
}

#[pg_guard]
pub unsafe extern "C-unwind" fn amendscan(scan: pg_sys::IndexScanDesc) {
    // SAFETY: opaque was set in ambeginscan; release the large parts now, the rest goes with
    // the memory context.
    let st = unsafe { &mut *((*scan).opaque as *mut ScanState) };
    *st = ScanState::default();
}
