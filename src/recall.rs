//! SQL surface of one-call recall: `twotower.recall(model, index, features, k, exclude)` = user
//! tower + an ordered scan of exactly the named twotower_hnsw index, with exclusions.

use pgrx::prelude::*;

#[pg_schema]
pub mod twotower {
    use crate::am::{is_ours, metric_of, pages, scan};
    use crate::catalog::{self, expect_kind, JsonbValue, RegClass};
    use crate::error::{OrReport, TtError, TtResult};
    use pgrx::pg_sys;
    use pgrx::prelude::*;
    use std::collections::HashSet;
    use twotower_ann::Metric;
    use twotower_tower::{Kind, OutMetric};

    /// The largest k recall() returns.
    const MAX_K: i32 = 100_000;

    fn metric_matches(index: Metric, model: OutMetric) -> bool {
        matches!(
            (index, model),
            (Metric::Cosine, OutMetric::Cosine)
                | (Metric::InnerProduct, OutMetric::Ip)
                | (Metric::L2, OutMetric::L2)
        )
    }

    /// Reads attribute `attno` of the tuple in `slot`.
    ///
    /// # Safety
    /// `slot` must hold a tuple of a relation with at least `attno` attributes.
    unsafe fn attr(slot: *mut pg_sys::TupleTableSlot, attno: i16) -> Option<pg_sys::Datum> {
        // SAFETY: forwarded; slot_getsomeattrs_int deforms up to `attno`.
        unsafe {
            if (*slot).tts_nvalid < attno {
                pg_sys::slot_getsomeattrs_int(slot, attno as i32);
            }
            let i = (attno - 1) as usize;
            if *(*slot).tts_isnull.add(i) {
                None
            } else {
                Some(*(*slot).tts_values.add(i))
            }
        }
    }

    /// The heap's single-column integer primary key: (attno, type oid).
    ///
    /// # Safety
    /// `heap` must be an open table.
    unsafe fn item_id_column(heap: pg_sys::Relation) -> TtResult<(i16, pg_sys::Oid)> {
        // SAFETY: catalogue lookups on an open relation.
        unsafe {
            let name = std::ffi::CStr::from_ptr((*(*heap).rd_rel).relname.data.as_ptr())
                .to_string_lossy()
                .into_owned();
            let pk = pg_sys::RelationGetPrimaryKeyIndex(heap);
            let none = || TtError::NoItemId(format!("table \"{name}\" has no single-column integer primary key"));
            if pk == pg_sys::InvalidOid {
                return Err(none());
            }
            let pkrel = pg_sys::index_open(pk, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            let ix = (*pkrel).rd_index;
            let (natts, attno) = ((*ix).indnkeyatts, *(*ix).indkey.values.as_ptr());
            pg_sys::index_close(pkrel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            if natts != 1 || attno <= 0 {
                return Err(none());
            }
            let typ = pg_sys::get_atttype((*heap).rd_id, attno);
            if ![pg_sys::INT8OID, pg_sys::INT4OID, pg_sys::INT2OID].contains(&typ) {
                return Err(none());
            }
            Ok((attno, typ))
        }
    }

    fn id_value(d: pg_sys::Datum, typ: pg_sys::Oid) -> i64 {
        match typ {
            pg_sys::INT8OID => d.value() as i64,
            pg_sys::INT4OID => d.value() as i32 as i64,
            _ => d.value() as i16 as i64,
        }
    }

    /// Whether the current user may read both columns of `heap` (table or column privilege).
    fn may_select(heap: pg_sys::Oid, cols: &[i16]) -> bool {
        let me = catalog::caller();
        // SAFETY: ACL lookups on an existing relation and its attributes.
        unsafe {
            pg_sys::pg_class_aclcheck(heap, me, pg_sys::ACL_SELECT as pg_sys::AclMode)
                == pg_sys::AclResult::ACLCHECK_OK
                || cols.iter().all(|&c| {
                    pg_sys::pg_attribute_aclcheck(heap, c, me, pg_sys::ACL_SELECT as pg_sys::AclMode)
                        == pg_sys::AclResult::ACLCHECK_OK
                })
        }
    }

    /// Refuses before any lock is taken when the caller can read neither the table of
    /// `index_oid` nor any of its columns (the exact column check follows once it is open).
    fn precheck_select(index_oid: pg_sys::Oid) -> TtResult<pg_sys::Oid> {
        // SAFETY: ACL lookups by oid without locks.
        unsafe {
            let heap_oid = crate::am::table_of_index(index_oid, "recall()")?
                .ok_or_else(|| TtError::BadArgument("recall() needs an index, not a table".into()))?;
            let me = catalog::caller();
            let table_ok = pg_sys::pg_class_aclcheck(heap_oid, me, pg_sys::ACL_SELECT as pg_sys::AclMode)
                == pg_sys::AclResult::ACLCHECK_OK;
            let any_col = pg_sys::pg_attribute_aclcheck_all(
                heap_oid,
                me,
                pg_sys::ACL_SELECT as pg_sys::AclMode,
                pg_sys::AclMaskHow::ACLMASK_ANY,
            ) == pg_sys::AclResult::ACLCHECK_OK;
            if !table_ok && !any_col {
                let name = pg_sys::get_rel_name(heap_oid);
                let name = if name.is_null() {
                    format!("{}", heap_oid.to_u32())
                } else {
                    std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
                };
                return Err(TtError::PermissionDenied {
                    action: format!("read table \"{name}\""),
                    hint: format!("GRANT SELECT ON {name} TO the role that calls recall()."),
                });
            }
            Ok(heap_oid)
        }
    }

    /// Ranked (item id, score) of the `k` nearest live rows to `query` in `index_oid`,
    /// skipping `exclude`, in exact distance order. Scores are similarities: cosine similarity,
    /// inner product, or the negated Euclidean distance.
    fn search(
        index_oid: pg_sys::Oid,
        query: Vec<f32>,
        model_metric: OutMetric,
        k: usize,
        exclude: &HashSet<i64>,
        ef: usize,
    ) -> TtResult<Vec<(i64, f32)>> {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let heap_oid = precheck_select(index_oid)?;
        // SAFETY: standard open order (table, then index) with the same lock the executor
        // takes; an index scan with the active snapshot; every object is released below.
        unsafe {
            let heap = pg_sys::table_open(heap_oid, lock);
            let index = pg_sys::index_open(index_oid, lock);
            if !is_ours(index) {
                return Err(TtError::WrongIndex("recall()".into()));
            }
            let ix = (*index).rd_index;
            let vec_att = *(*ix).indkey.values.as_ptr();
            if vec_att <= 0 {
                return Err(TtError::Unsupported("recall() does not support expression indexes".into()));
            }
            let (id_att, id_type) = item_id_column(heap)?;
            if !may_select(heap_oid, &[id_att, vec_att]) {
                let name = std::ffi::CStr::from_ptr((*(*heap).rd_rel).relname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                return Err(TtError::PermissionDenied {
                    action: format!("read table \"{name}\""),
                    hint: format!("GRANT SELECT ON {name} TO the role that calls recall()."),
                });
            }
            if pg_sys::check_enable_rls(heap_oid, pg_sys::InvalidOid, false)
                == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32
            {
                return Err(TtError::Unsupported(
                    "recall() does not support tables with row-level security; use ORDER BY ... LIMIT in SQL".into(),
                ));
            }
            if !(*ix).indisvalid || !(*ix).indisready {
                return Err(TtError::Unsupported("the index is not valid (a failed or unfinished CREATE INDEX CONCURRENTLY?): REINDEX it".into()));
            }
            let metric = metric_of(index);
            if !metric_matches(metric, model_metric) {
                return Err(TtError::ModelIndexMismatch {
                    detail: format!(
                        "The model is trained for {} but the index orders by {}.",
                        model_metric.name(),
                        metric.name()
                    ),
                });
            }
            let meta = pages::read_meta(index)?;
            if meta.dims > 0 && meta.dims as usize != query.len() {
                return Err(TtError::ModelIndexMismatch {
                    detail: format!(
                        "The model's vectors have {} dimensions, the index's have {}.",
                        query.len(),
                        meta.dims
                    ),
                });
            }
            let qdatum = query.clone().into_datum().expect("a real[] datum");
            let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
            pg_sys::ScanKeyEntryInitialize(
                &mut key,
                0,
                1,
                1,
                pg_sys::FLOAT4ARRAYOID,
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                qdatum,
            );
            let scan = pg_sys::index_beginscan(heap, index, pg_sys::GetActiveSnapshot(), 0, 1);
            // Room for the excluded rows the scan will return and skip.
            let wanted = k + exclude.len();
            scan::set_minimums(scan, wanted.max(ef), wanted as u64 + 1);
            pg_sys::index_rescan(scan, std::ptr::null_mut(), 0, &mut key, 1);
            let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
            // (distance as the SQL operator computes it, id); the k nearest are kept sorted.
            let mut best: Vec<(f64, i64)> = Vec::with_capacity(k + 1);
            let mut seen = 0usize;
            while pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
                seen += 1;
                if seen.is_multiple_of(256) {
                    check_for_interrupts!();
                }
                // The scan's distance of this row: exact, or a lower bound (quantized storage).
                let bound = f64::from_bits((*(*scan).xs_orderbyvals).value() as u64);
                if best.len() == k && bound > best[k - 1].0 {
                    // Every later row is at least this far: the k nearest are known.
                    break;
                }
                let (Some(idd), Some(vd)) = (attr(slot, id_att), attr(slot, vec_att)) else {
                    continue;
                };
                let id = id_value(idd, id_type);
                if exclude.contains(&id) {
                    continue;
                }
                let v = crate::vector::VecRef::from_datum(vd)?;
                let v = v.as_slice();
                if v.len() != query.len() {
                    continue;
                }
                let d = metric.sql_distance(&query, v);
                let at = best.partition_point(|&(bd, bid)| bd < d || (bd == d && bid < id));
                if at < k {
                    best.insert(at, (d, id));
                    best.truncate(k);
                }
                if best.len() == k && !(*scan).xs_recheckorderby && d >= best[k - 1].0 {
                    // Exact distances come in order: nothing later is nearer.
                    break;
                }
            }
            pg_sys::ExecDropSingleTupleTableSlot(slot);
            pg_sys::index_endscan(scan);
            pg_sys::index_close(index, lock);
            pg_sys::table_close(heap, lock);
            Ok(best
                .into_iter()
                .map(|(d, id)| {
                    let score = match metric {
                        Metric::Cosine => 1.0 - d,
                        Metric::InnerProduct | Metric::L2 => -d,
                    };
                    (id, score as f32)
                })
                .collect())
        }
    }

    /// One-call recall: the user tower of `model` applied to `features`, then the `k` nearest
    /// items in `index` (a twotower_hnsw index on a table with a single-column integer primary
    /// key, the item id), leaving out the ids in `exclude` (already seen, blocked). Rows come in
    /// rank order; `score` is the similarity (cosine similarity, inner product, or negated L2
    /// distance, by the index's operator class). `ef_search` sets this call's candidate list
    /// (default: the `twotower.ef_search` setting); it is raised to `k` in any case.
    #[pg_extern(stable, parallel_restricted)]
    fn recall(
        model: Option<&str>,
        index: Option<RegClass>,
        features: Option<JsonbValue>,
        k: default!(Option<i32>, 100),
        exclude: default!(Option<Vec<Option<i64>>>, "NULL"),
        ef_search: default!(Option<i32>, "NULL"),
    ) -> TableIterator<'static, (name!(item_id, i64), name!(score, f32), name!(rank, i32))> {
        let (Some(model), Some(index), Some(features)) = (model, index, features) else {
            return TableIterator::new(Vec::new());
        };
        let Some(k) = k else {
            TtError::NullArgument("k").report();
        };
        if !(1..=MAX_K).contains(&k) {
            TtError::BadArgument(format!("k must be between 1 and {MAX_K}, not {k}")).report();
        }
        let ef = match ef_search {
            None => 0,
            Some(e) if (1..=MAX_K).contains(&e) => e as usize,
            Some(e) => TtError::BadArgument(format!("ef_search must be between 1 and {MAX_K}, not {e}")).report(),
        };
        let l = catalog::active_model(model).or_report();
        expect_kind(&l, Kind::User).or_report();
        let query = l.embed_user(&features.0).or_report();
        let exclude: HashSet<i64> = exclude.unwrap_or_default().into_iter().flatten().collect();
        let rows = search(index.0, query, l.model.metric(), k as usize, &exclude, ef).or_report();
        TableIterator::new(
            rows.into_iter()
                .enumerate()
                .map(|(i, (id, s))| (id, s, i as i32 + 1))
                .collect::<Vec<_>>(),
        )
    }
}
