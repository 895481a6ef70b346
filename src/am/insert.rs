//! `aminsert`: rows added after the build go to the WAL-logged delta area, searchable at once;
//! the insert that fills the delta to its threshold folds it into the delta graph.

use super::pages::{append_delta, read_meta, MAX_INDEX_DIMS};
use crate::infra::error::{OrReport, TtError};
use crate::infra::vector::VecRef;
use pgrx::pg_sys;
use pgrx::prelude::*;
use twotower_ann::{is_zero, Metric, Quantization};

#[pg_guard]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C-unwind" fn aminsert(
    index: pg_sys::Relation,
    values: *mut pg_sys::Datum,
    isnull: *mut bool,
    heap_tid: pg_sys::ItemPointer,
    _heap: pg_sys::Relation,
    _check_unique: pg_sys::IndexUniqueCheck::Type,
    _index_unchanged: bool,
    _info: *mut pg_sys::IndexInfo,
) -> bool {
    // SAFETY: one key column; a NULL vector is simply not indexed.
    if unsafe { *isnull } {
        return false;
    }
    // SAFETY: open index relation.
    let meta = unsafe { read_meta(index) }.or_report();
    let expected = (meta.dims > 0).then_some(meta.dims as usize);
    // SAFETY: the key column is of the operator class's input type, which names the kind.
    let v = unsafe {
        VecRef::checked_kind(
            *values,
            crate::infra::vector::kind_of_index(index).or_report(),
            expected,
        )
    }
    .or_report();
    let s = v.as_slice();
    if s.len() > MAX_INDEX_DIMS {
        TtError::IndexLimit(format!(
            "twotower_hnsw indexes support at most {MAX_INDEX_DIMS} dimensions, this vector has {}",
            s.len()
        ))
        .report();
    }
    if Metric::from_code(meta.metric) == Some(Metric::Cosine) && is_zero(s) {
        return false;
    }
    // Delta items are ranked exactly, but the next build puts them in the graph: refuse now
    // what the graph could not rank.
    Quantization::from_code(meta.quantization)
        .unwrap_or(Quantization::F32)
        .check_vector(s)
        .or_report();
    // SAFETY: validated vector; append_delta re-checks the dimension under the metapage lock.
    unsafe {
        let meta = append_delta(index, &*heap_tid, s);
        super::fold::after_insert(index, &meta);
    }
    false
}
