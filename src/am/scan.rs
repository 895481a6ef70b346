//! Ordered scans: the main graph (iteratively widened, re-ranked from the stored vectors,
//! tombstones skipped) and the delta graph (`fold.rs`) merged with the exactly ranked delta
//! items, by ascending distance, for as long as the executor keeps asking and
//! `twotower.max_scan_tuples` allows.
//!
//! Every row carries its distance in `xs_orderbyvals`. f32 indexes give the exact value of the
//! SQL operator; f16/i8 indexes give a guaranteed lower bound with `xs_recheckorderby`, so the
//! executor recomputes the exact distance from the heap row and re-sorts (as for GiST KNN).
//! Under `twotower.iterative_scan = strict_order` a widened search never returns an item nearer
//! than one already returned, so `ORDER BY ... LIMIT` returns rows in exact distance order.

use super::cache::{self, Loaded};
use super::pages::{
    bit_is_set, for_each_delta, key_to_tid, read_meta, read_tombstones, tid_to_key, Meta,
};
use crate::infra::error::{OrReport, TtError};
use crate::infra::vector::VecRef;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::collections::BinaryHeap;
use std::rc::Rc;
use twotower_ann::{AnnError, GraphCursor, Hit, Metric, Query, ScanOrder};

#[derive(Default)]
struct ScanState {
    /// The ORDER BY argument; None for `ORDER BY col <=> NULL` (rows in index order).
    query: Option<Vec<f32>>,
    prepared: Option<Query>,
    started: bool,
    /// The main graph, then the delta graph (each with its own cursor).
    graphs: Vec<Graph>,
    /// Delta items, nearest on top (a heap: a scan usually takes only a few of them).
    delta: BinaryHeap<Nearest>,
    ef: usize,
    /// A floor for `ef` set by callers that know how many rows they want (recall's k).
    min_ef: usize,
    /// `min_ef` is the caller's own ef_search: it replaces `twotower.ef_search`.
    ef_replaces_setting: bool,
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
    /// Next (graph, position) for unordered scans.
    next_pos: (usize, usize),
}

/// A hit ordered so that the nearest is the greatest (NaN distances last, ties by key).
#[derive(Debug, Clone, Copy)]
struct Nearest(Hit);

impl PartialEq for Nearest {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Nearest {}
impl PartialOrd for Nearest {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Nearest {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .0
            .dist
            .total_cmp(&self.0.dist)
            .then(other.0.key.cmp(&self.0.key))
    }
}

/// One graph a scan reads: the image, its tombstones (main graph only), the scan's cursor and
/// the candidate list size it searches with.
struct Graph {
    image: Rc<Loaded>,
    tombstones: Vec<u8>,
    cursor: GraphCursor,
    ef: usize,
}

/// A graph cursor that services cancellation during long searches.
fn cursor(order: ScanOrder) -> GraphCursor {
    fn interrupt() {
        pgrx::check_for_interrupts!();
    }
    let mut c = GraphCursor::new(order);
    c.interrupt = Some(interrupt);
    c
}

/// The candidate list of the delta graph, which holds `share` of the live items: a search for
/// the scan's nearest rows needs about that share of its candidates from it, so twice that
/// share of `ef`, but at least 64 (or `ef` when smaller), so a row searched by its own vector
/// is found in the delta graph as in the main one. The cursor widens it like any search when
/// the scan reads further.
fn delta_graph_ef(ef: usize, share: f64) -> usize {
    ((2.0 * ef as f64 * share).ceil() as usize)
        .max(ef.min(64))
        .min(ef)
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
        let (min_ef, ef_replaces_setting, min_rows, preset) = (
            st.min_ef,
            st.ef_replaces_setting,
            st.min_rows,
            st.preset.take(),
        );
        *st = ScanState {
            min_ef,
            ef_replaces_setting,
            min_rows,
            ..ScanState::default()
        };
        if let Some(q) = preset {
            st.query = Some(q.clone());
            st.preset = Some(q);
        } else if (*scan).numberOfOrderBys > 0 {
            let key = &*(*scan).orderByData;
            if key.sk_flags & pg_sys::SK_ISNULL as i32 == 0 {
                let kind = crate::infra::vector::kind_of_index((*scan).indexRelation).or_report();
                let v = VecRef::checked_kind(key.sk_argument, kind, None).or_report();
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

/// Loads what the scan reads: metapage, both graphs, tombstones and the delta, ranked.
unsafe fn start(index: pg_sys::Relation, st: &mut ScanState) {
    // SAFETY: open index relation.
    unsafe { count_scan(index) };
    // A fold that switches the delta graph while this scan reads may reuse the pages the scan
    // was about to read: then the metapage has changed, and the scan reads it again. Under
    // steady inserts a fold can come every second or so and a load can take longer than that
    // (a new delta graph is read from the pages by every backend), so a scan may need several
    // rounds: it reads again as long as the lists keep changing (an error of a load whose
    // metapage did not change is reported at once).
    const ATTEMPTS: u32 = 100;
    let mut attempt = 0;
    let meta = loop {
        attempt += 1;
        pgrx::check_for_interrupts!();
        // SAFETY: open index relation.
        let meta = unsafe { read_meta(index) }.or_report();
        // SAFETY: as above.
        match unsafe { load(index, st, &meta) } {
            Ok(()) => {}
            Err(e) if attempt < ATTEMPTS => {
                // SAFETY: as above.
                let now = unsafe { read_meta(index) }.or_report();
                if same_lists(&now, &meta) {
                    e.report();
                }
                continue;
            }
            Err(e) => e.report(),
        }
        // SAFETY: as above.
        let now = unsafe { read_meta(index) }.or_report();
        if same_lists(&now, &meta) || attempt >= ATTEMPTS {
            break meta;
        }
    };
    let _ = meta;
    st.started = true;
}

/// True when no fold or VACUUM freed pages between the two metapage reads.
fn same_lists(a: &Meta, b: &Meta) -> bool {
    a.dg_generation == b.dg_generation && a.dl_epoch == b.dl_epoch
}

/// Reads the graphs and the delta items that `meta` names into `st`.
unsafe fn load(index: pg_sys::Relation, st: &mut ScanState, meta: &Meta) -> Result<(), TtError> {
    let metric = Metric::from_code(meta.metric).unwrap_or(Metric::Cosine);
    if let Some(q) = &st.query {
        if meta.dims > 0 && q.len() != meta.dims as usize {
            TtError::Ann(AnnError::DimensionMismatch {
                expected: meta.dims as usize,
                got: q.len(),
            })
            .report();
        }
        // An f16 graph stores what the engine searches with: an L2 query (searched as it is,
        // unlike cosine and inner-product queries, which are searched as unit vectors) must
        // fit in f16 too, or its graph distances overflow and the search returns wrong rows.
        if metric == Metric::L2
            && twotower_ann::Quantization::from_code(meta.quantization)
                == Some(twotower_ann::Quantization::F16)
        {
            twotower_ann::Quantization::F16
                .check_vector(q)
                .map_err(TtError::Ann)
                .or_report();
        }
        st.prepared = Some(Query::new(metric, q).or_report());
    }
    st.ef = if st.ef_replaces_setting {
        st.min_ef.max(1)
    } else {
        (crate::infra::gucs::EF_SEARCH.get().max(1) as usize).max(st.min_ef)
    };
    st.order = crate::infra::gucs::ITERATIVE_SCAN.get().order();
    st.max_rows = (crate::infra::gucs::MAX_SCAN_TUPLES.get().max(1) as u64).max(st.min_rows);
    st.last = f64::NEG_INFINITY;
    st.graphs.clear();
    if let Some(r) = meta.main_ref() {
        // SAFETY: open index relation and a metapage read from it.
        let image = unsafe { cache::image(index, meta, &r) }?;
        let tombstones = if meta.graph_dead > 0 {
            // SAFETY: as above.
            unsafe { read_tombstones(index, meta) }
        } else {
            Vec::new()
        };
        st.graphs.push(Graph {
            image,
            tombstones,
            cursor: cursor(st.order),
            ef: st.ef,
        });
    }
    if let Some(r) = meta.delta_graph_ref() {
        // SAFETY: as above.
        let image = unsafe { cache::image(index, meta, &r) }?;
        let live =
            (meta.graph_count - meta.graph_dead.min(meta.graph_count) + meta.dg_count).max(1);
        let ef = delta_graph_ef(st.ef, meta.dg_count as f64 / live as f64);
        st.graphs.push(Graph {
            image,
            tombstones: Vec::new(),
            cursor: cursor(st.order),
            ef,
        });
    }
    let q = st.prepared.clone();
    let mut delta = Vec::with_capacity(meta.delta_live as usize);
    // SAFETY: as above.
    unsafe {
        let whole = for_each_delta(index, meta, None, None, |_, tid, v| {
            let dist = match &q {
                Some(q) => q.distance(v),
                None => 0.0,
            };
            delta.push(Nearest(Hit {
                key: tid_to_key(&tid),
                dist,
                exact: true,
            }));
        });
        if !whole {
            return Err(TtError::IndexCorrupt(
                "the chain of delta pages is broken".into(),
            ));
        }
    };
    st.delta = BinaryHeap::from(delta);
    Ok(())
}

/// The nearest remaining item of the graphs and the delta, consumed.
fn next_candidate(st: &mut ScanState) -> Option<Hit> {
    let ScanState {
        prepared,
        graphs,
        delta,
        ..
    } = st;
    let q = prepared.as_ref()?;
    // (source, distance): graphs by index, the delta as graphs.len().
    let mut best: Option<(usize, f64)> = None;
    for (i, g) in graphs.iter_mut().enumerate() {
        let img_ref = &g.image.image;
        let tombstones = &g.tombstones;
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
        let rounds = g.cursor.rounds;
        let head = g
            .cursor
            .peek(img_ref, q, g.ef, skip_dyn)
            .map_err(TtError::from);
        // A mapped file that changed under the search (zeros read, or another file now) makes
        // whatever it returned meaningless: an ERROR, never rows from it.
        g.image
            .check_unchanged(g.cursor.rounds != rounds)
            .or_report();
        let head = head.or_report();
        if let Some(h) = head {
            if best.is_none_or(|(_, d)| h.dist < d || d.is_nan()) {
                best = Some((i, h.dist));
            }
        }
    }
    if let Some(Nearest(d)) = delta.peek() {
        // Ties go to the graphs (as before the delta graph existed).
        if best.is_none_or(|(_, bd)| d.dist < bd || bd.is_nan() && !d.dist.is_nan()) {
            best = Some((graphs.len(), d.dist));
        }
    }
    match best? {
        (i, _) if i < graphs.len() => graphs[i].cursor.pop(),
        _ => delta.pop().map(|n| n.0),
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
    while let Some(g) = st.graphs.get(st.next_pos.0) {
        while st.next_pos.1 < g.image.image.len() {
            let p = st.next_pos.1;
            st.next_pos.1 += 1;
            if !bit_is_set(&g.tombstones, p) {
                return Some(g.image.image.key_at(p));
            }
        }
        st.next_pos = (st.next_pos.0 + 1, 0);
    }
    st.delta.pop().map(|n| n.0.key)
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
/// graph search instead of several widening rounds). With `replace_setting`, `ef` is the
/// candidate list itself (a caller's own `ef_search`), not a floor under `twotower.ef_search`.
/// Call before or after `index_rescan`.
///
/// # Safety
/// `scan` must be an open scan of a twotower_hnsw index.
pub(super) unsafe fn set_minimums(
    scan: pg_sys::IndexScanDesc,
    ef: usize,
    rows: u64,
    replace_setting: bool,
) {
    // SAFETY: opaque was set in ambeginscan.
    let st = unsafe { &mut *((*scan).opaque as *mut ScanState) };
    st.min_ef = ef.min(100_000);
    st.ef_replaces_setting = replace_setting;
    st.min_rows = rows;
}

#[pg_guard]
pub unsafe extern "C-unwind" fn amendscan(scan: pg_sys::IndexScanDesc) {
    // SAFETY: opaque was set in ambeginscan; release the large parts now, the rest goes with
    // the memory context.
    let st = unsafe { &mut *((*scan).opaque as *mut ScanState) };
    *st = ScanState::default();
}
