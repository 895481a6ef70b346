//! Ordered scans: the graph (iteratively widened, re-ranked from the stored vectors, tombstones
//! skipped) merged with the exactly ranked delta, by ascending distance, for as long as the
//! executor keeps asking and `twotower.max_scan_tuples` allows.
//!
//! Every row carries its distance in `xs_orderbyvals`. f32 indexes give the exact value of the
//! SQL operator; f16/i8 indexes give a guaranteed lower bound with `xs_recheckorderby`, so the
//! executor recomputes the exact distance from the heap row and re-sorts (as for GiST KNN).
//! Under `twotower.iterative_scan = strict_order` a widened search never returns an item nearer
//! than one already returned, so `ORDER BY ... LIMIT` returns rows in exact distance order.

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
use twotower_ann::{sort_for_pop, AnnError, GraphCursor, Hit, Metric, Query, ScanOrder};

#[derive(Default)]
struct ScanState {
    /// The ORDER BY argument; None for `ORDER BY col <=> NULL` (rows in index order).
    query: Option<Vec<f32>>,
    prepared: Option<Query>,
    started: bool,
    image: Option<Rc<Loaded>>,
    tombstones: Vec<u8>,
    cursor: GraphCursor,
    /// Delta items, by descending distance so the nearest is popped from the end.
    delta: Vec<Hit>,
    ef: usize,
    /// A floor for `ef` set by callers that know how many rows they want (recall's k).
    min_ef: usize,
    order: ScanOrder,
    /// Rows this scan returns at most.
    max_rows: u64,
    /// A floor for `max_rows` set by callers that know how many rows they need.
    min_rows: u64,
    /// A query given directly by a caller of the search interface (no ScanKey datum).
    preset: Option<Vec<f32>>,
    returned: u64,
    /// Distance of the last row returned (strict order drops anything nearer).
    last: f64,
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
    // SAFETY: `scan` was just allocated; the ORDER BY value arrays live as long as it does.
    unsafe {
        (*scan).opaque = st as *mut core::ffi::c_void;
        if norderbys > 0 {
            let n = norderbys as usize;
            (*scan).xs_orderbyvals =
                pg_sys::palloc0(std::mem::size_of::<pg_sys::Datum>() * n) as *mut pg_sys::Datum;
            (*scan).xs_orderbynulls = pg_sys::palloc(n) as *mut bool;
            std::ptr::write_bytes((*scan).xs_orderbynulls, 1, n);
        }
    }
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
        let (min_ef, min_rows, preset) = (st.min_ef, st.min_rows, st.preset.take());
        *st = ScanState {
            min_ef,
            min_rows,
            ..ScanState::default()
        };
        if let Some(q) = preset {
            st.query = Some(q.clone());
            st.preset = Some(q);
        } else if (*scan).numberOfOrderBys > 0 {
            let key = &*(*scan).orderByData;
            if key.sk_flags & pg_sys::SK_ISNULL as i32 == 0 {
                let v = VecRef::checked(key.sk_argument, None).or_report();
                st.query = Some(v.as_slice().to_vec());
            }
        }
    }
}

/// Counts one scan of `index` in pg_stat_user_indexes.idx_scan, as built-in access methods do
/// (the `pgstat_count_index_scan` macro).
///
/// # Safety
/// `index` must be an open relation.
unsafe fn count_scan(index: pg_sys::Relation) {
    // SAFETY: pgstat_info is either NULL or this relation's stats entry for the transaction.
    unsafe {
        if (*index).pgstat_info.is_null() && (*index).pgstat_enabled {
            pg_sys::pgstat_assoc_relation(index);
        }
        if !(*index).pgstat_info.is_null() {
            (*(*index).pgstat_info).t_counts.t_numscans += 1;
        }
    }
}

/// Loads what the scan reads: metapage, image, tombstones and the delta, ranked.
unsafe fn start(index: pg_sys::Relation, st: &mut ScanState) {
    // SAFETY: open index relation.
    unsafe { count_scan(index) };
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
        st.prepared = Some(Query::new(metric, q).or_report());
    }
    st.ef = (crate::EF_SEARCH.get().max(1) as usize).max(st.min_ef);
    st.order = crate::gucs::ITERATIVE_SCAN.get().order();
    st.max_rows = (crate::gucs::MAX_SCAN_TUPLES.get().max(1) as u64).max(st.min_rows);
    st.cursor = GraphCursor::new(st.order);
    st.last = f64::NEG_INFINITY;
    if meta.has_image() {
        // SAFETY: open index relation and its metapage.
        st.image = Some(unsafe { cache::image(index, &meta) }.or_report());
        if meta.graph_dead > 0 {
            // SAFETY: as above.
            st.tombstones = unsafe { read_tombstones(index, &meta) };
        }
    }
    let q = st.prepared.clone();
    let mut delta = Vec::with_capacity(meta.delta_live as usize);
    // SAFETY: as above.
    unsafe {
        for_each_delta(index, &meta, |tid, v| {
            let dist = match &q {
                Some(q) => q.distance(v),
                None => 0.0,
            };
            delta.push(Hit {
                key: tid_to_key(&tid),
                dist,
                exact: true,
            });
        })
    };
    sort_for_pop(&mut delta);
    st.delta = delta;
    st.started = true;
}

/// The nearest remaining item of the graph and the delta, consumed.
fn next_candidate(st: &mut ScanState) -> Option<Hit> {
    let ScanState {
        prepared,
        image,
        tombstones,
        cursor,
        delta,
        ef,
        ..
    } = st;
    let q = prepared.as_ref()?;
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
        (Some(g), Some(d)) if g.dist <= d.dist || d.dist.is_nan() => cursor.pop(),
        (Some(_), None) => cursor.pop(),
        (_, Some(_)) => delta.pop(),
        (None, None) => None,
    }
}

fn next_ordered(st: &mut ScanState) -> Option<Hit> {
    let mut dropped = 0u32;
    loop {
        let h = next_candidate(st)?;
        if st.order == ScanOrder::Strict && h.dist < st.last {
            // A widened search found an item nearer than a row already returned.
            dropped += 1;
            if dropped.is_multiple_of(256) {
                pgrx::check_for_interrupts!();
            }
            continue;
        }
        if !h.dist.is_nan() {
            st.last = st.last.max(h.dist);
        }
        return Some(h);
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
    st.delta.pop().map(|h| h.key)
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
    if st.query.is_some() {
        if st.returned >= st.max_rows {
            return false;
        }
        let Some(h) = next_ordered(st) else {
            return false;
        };
        st.returned += 1;
        // SAFETY: writing our result into the scan descriptor; the ORDER BY arrays were
        // allocated in ambeginscan for numberOfOrderBys (>= 1 here) entries.
        unsafe {
            (*scan).xs_heaptid = key_to_tid(h.key);
            (*scan).xs_recheck = false;
            (*scan).xs_recheckorderby = !h.exact;
            *(*scan).xs_orderbyvals = pg_sys::Datum::from(h.dist.to_bits());
            *(*scan).xs_orderbynulls = false;
        }
        true
    } else {
        match next_unordered(st) {
            Some(key) => {
                // SAFETY: as above; the rows come in no particular order and carry no value.
                unsafe {
                    (*scan).xs_heaptid = key_to_tid(key);
                    (*scan).xs_recheck = false;
                    (*scan).xs_recheckorderby = false;
                    if (*scan).numberOfOrderBys > 0 {
                        *(*scan).xs_orderbynulls = true;
                    }
                }
                true
            }
            None => false,
        }
    }
}

/// Gives the scan its query vector directly (the search interface: no datum round trip);
/// it takes effect at the next `index_rescan`, whatever ORDER BY keys that passes.
///
/// # Safety
/// `scan` must be an open scan of a twotower_hnsw index begun with one ORDER BY.
pub(super) unsafe fn set_query(scan: pg_sys::IndexScanDesc, query: Vec<f32>) {
    // SAFETY: opaque was set in ambeginscan.
    let st = unsafe { &mut *((*scan).opaque as *mut ScanState) };
    st.preset = Some(query);
}

/// Makes the scan search with at least `ef` candidates and return at least `rows` rows before
/// `twotower.max_scan_tuples` ends it (for a caller that knows how many rows it will read: one
/// graph search instead of several widening rounds). Call before or after `index_rescan`.
///
/// # Safety
/// `scan` must be an open scan of a twotower_hnsw index.
pub(super) unsafe fn set_minimums(scan: pg_sys::IndexScanDesc, ef: usize, rows: u64) {
    // SAFETY: opaque was set in ambeginscan.
    let st = unsafe { &mut *((*scan).opaque as *mut ScanState) };
    st.min_ef = ef.min(100_000);
    st.min_rows = rows;
}

#[pg_guard]
pub unsafe extern "C-unwind" fn amendscan(scan: pg_sys::IndexScanDesc) {
    // SAFETY: opaque was set in ambeginscan; release the large parts now, the rest goes with
    // the memory context.
    let st = unsafe { &mut *((*scan).opaque as *mut ScanState) };
    *st = ScanState::default();
}
