//! The access method's search interface for SQL surfaces other than the executor's ordered
//! scans (`recall()` today; every later channel): one small API, so the glue never reaches into
//! pages, the cache or the scan state.
//!
//! [`Target::open`] checks the caller's privileges before anything is locked or read, then
//! opens the table and the index; [`Target::nearest`] returns the `k` nearest live rows as
//! (item id, exact distance) in distance order; [`Target::close`] releases both relations.

use super::rel::{is_ours, metric_of, table_of_index};
use super::{pages, scan};
use crate::infra::error::{TtError, TtResult};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashSet;
use std::sync::Arc;
use twotower_ann::Metric;

/// An open twotower_hnsw index and its table, readable by the caller.
pub struct Target {
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    id_att: i16,
    id_type: pg_sys::Oid,
    vec_att: i16,
    /// The type of the vector column (real[] or pgvector's vector).
    kind: crate::infra::vector::VecKind,
    metric: Metric,
    dims: Option<usize>,
}

const LOCK: pg_sys::LOCKMODE = pg_sys::AccessShareLock as pg_sys::LOCKMODE;

fn relation_name(rel: pg_sys::Relation) -> String {
    // SAFETY: an open relation's name.
    unsafe { std::ffi::CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn denied(name: &str, who: &str) -> TtError {
    TtError::PermissionDenied {
        action: format!("read table \"{name}\""),
        hint: format!("GRANT SELECT ON {name} TO the role that calls {who}."),
    }
}

/// Refuses before any lock is taken when the caller can read neither the table of
/// `index_oid` nor any of its columns (the exact column check follows once it is open).
fn precheck_select(index_oid: pg_sys::Oid, who: &str) -> TtResult<pg_sys::Oid> {
    let heap_oid = table_of_index(index_oid, who)?
        .ok_or_else(|| TtError::WrongObject(format!("{who} needs an index, not a table")))?;
    precheck_readable(heap_oid, who)?;
    Ok(heap_oid)
}

/// 42501 unless the caller may read table `rel` or at least one of its columns (ACL lookups
/// by oid, without locks).
fn precheck_readable(rel: pg_sys::Oid, who: &str) -> TtResult<()> {
    let me = crate::infra::catalog::caller();
    // SAFETY: ACL lookups by oid, without locks.
    let (table_ok, any_col) = unsafe {
        (
            pg_sys::pg_class_aclcheck(rel, me, pg_sys::ACL_SELECT as pg_sys::AclMode)
                == pg_sys::AclResult::ACLCHECK_OK,
            pg_sys::pg_attribute_aclcheck_all(
                rel,
                me,
                pg_sys::ACL_SELECT as pg_sys::AclMode,
                pg_sys::AclMaskHow::ACLMASK_ANY,
            ) == pg_sys::AclResult::ACLCHECK_OK,
        )
    };
    if table_ok || any_col {
        Ok(())
    } else {
        Err(denied(&rel_name(rel), who))
    }
}

fn rls_refused(who: &str) -> TtError {
    TtError::Unsupported(format!(
        "{who} does not support tables with row-level security; use ORDER BY ... LIMIT in SQL"
    ))
}

/// Refuses before any lock is taken when the caller can read neither partitioned table
/// `parent` nor any of its columns, or when it has row-level security (the exact column check
/// follows once it is open: [`check_parent_columns`]).
fn precheck_parent(parent: pg_sys::Oid, who: &str) -> TtResult<()> {
    precheck_readable(parent, who)?;
    // SAFETY: a catalogue lookup by oid.
    if unsafe { pg_sys::check_enable_rls(parent, pg_sys::InvalidOid, false) }
        == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32
    {
        return Err(rls_refused(who));
    }
    Ok(())
}

/// With only column privileges on open partitioned table `prel`: SELECT on the indexed column
/// and on the primary key's column.
///
/// # Safety
/// `prel` must be open; `index` its partitioned index.
unsafe fn check_parent_columns(
    prel: pg_sys::Relation,
    index: pg_sys::Oid,
    who: &str,
) -> TtResult<()> {
    // SAFETY: ACL lookups and a primary key lookup on an open relation.
    unsafe {
        let (me, parent) = (crate::infra::catalog::caller(), (*prel).rd_id);
        if pg_sys::pg_class_aclcheck(parent, me, pg_sys::ACL_SELECT as pg_sys::AclMode)
            == pg_sys::AclResult::ACLCHECK_OK
        {
            return Ok(());
        }
        let cols = [
            key_column(index),
            key_column(pg_sys::RelationGetPrimaryKeyIndex(prel)),
        ];
        let ok = cols.iter().all(|c| {
            c.is_some_and(|c| {
                pg_sys::pg_attribute_aclcheck(parent, c, me, pg_sys::ACL_SELECT as pg_sys::AclMode)
                    == pg_sys::AclResult::ACLCHECK_OK
            })
        });
        if ok {
            Ok(())
        } else {
            Err(denied(&relation_name(prel), who))
        }
    }
}

fn rel_name(oid: pg_sys::Oid) -> String {
    // SAFETY: a catalogue lookup by oid (a palloc'd copy, or NULL).
    let n = unsafe { pg_sys::get_rel_name(oid) };
    if n.is_null() {
        oid.to_u32().to_string()
    } else {
        // SAFETY: a NUL-terminated name from get_rel_name.
        unsafe { std::ffi::CStr::from_ptr(n) }
            .to_string_lossy()
            .into_owned()
    }
}

/// The first key column of index `index` (None for an expression or a missing index).
fn key_column(index: pg_sys::Oid) -> Option<i16> {
    if index == pg_sys::InvalidOid {
        return None;
    }
    // SAFETY: a syscache lookup of pg_index by oid, released before returning.
    unsafe {
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::INDEXRELID as i32,
            pg_sys::Datum::from(index),
        );
        if tup.is_null() {
            return None;
        }
        let form = pg_sys::GETSTRUCT(tup) as *const pg_sys::FormData_pg_index;
        let att = *(*form).indkey.values.as_ptr();
        pg_sys::ReleaseSysCache(tup);
        (att > 0).then_some(att)
    }
}

/// The heap's single-column integer primary key: (attno, type oid).
///
/// # Safety
/// `heap` must be an open table.
unsafe fn item_id_column(heap: pg_sys::Relation) -> TtResult<(i16, pg_sys::Oid)> {
    let name = relation_name(heap);
    let none = || {
        TtError::NoItemId(format!(
            "table \"{name}\" has no single-column integer primary key"
        ))
    };
    // SAFETY: catalogue lookups on an open relation.
    unsafe {
        let pk = pg_sys::RelationGetPrimaryKeyIndex(heap);
        if pk == pg_sys::InvalidOid {
            return Err(none());
        }
        let pkrel = pg_sys::index_open(pk, LOCK);
        let ix = (*pkrel).rd_index;
        let (natts, attno) = ((*ix).indnkeyatts, *(*ix).indkey.values.as_ptr());
        pg_sys::index_close(pkrel, LOCK);
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

fn id_value(d: pg_sys::Datum, typ: pg_sys::Oid) -> i64 {
    match typ {
        pg_sys::INT8OID => d.value() as i64,
        pg_sys::INT4OID => d.value() as i32 as i64,
        _ => d.value() as i16 as i64,
    }
}

/// Whether `index` is the index of a partitioned table.
pub fn is_partitioned(index: pg_sys::Oid) -> bool {
    // SAFETY: a catalogue lookup by oid (0 for a missing relation).
    unsafe {
        pg_sys::get_rel_relkind(index) == pg_sys::RELKIND_PARTITIONED_INDEX as std::ffi::c_char
    }
}

/// The metric (operator class) of twotower_hnsw index `index_oid`, partitioned or not (42809
/// for an index of another access method).
pub fn index_metric(index_oid: pg_sys::Oid, who: &str) -> TtResult<Metric> {
    // SAFETY: opening an index with the executor's lock (held to the end of the transaction,
    // as the scans take it) to read its operator class.
    unsafe {
        let index = pg_sys::index_open(index_oid, LOCK);
        let metric = is_ours(index).then(|| metric_of(index));
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        metric.ok_or_else(|| TtError::WrongIndex(who.into()))
    }
}

/// The table and the column (by name) that index `index_oid` is on: a search that hands over
/// its hits' vectors gives the values of that column. None for an expression index or an
/// index that no longer exists.
pub fn indexed_column(index_oid: pg_sys::Oid) -> Option<(pg_sys::Oid, String)> {
    let row = crate::infra::catalog::read_row::<pg_sys::Oid, String>(
        "SELECT i.indrelid, a.attname::pg_catalog.text
           FROM pg_catalog.pg_index i
           JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid
                                         AND a.attnum OPERATOR(pg_catalog.=) i.indkey[0]
          WHERE i.indexrelid OPERATOR(pg_catalog.=) $1",
        &[index_oid.into()],
    )
    .ok()
    .flatten()?;
    match row {
        (Some(rel), Some(col)) => Some((rel, col)),
        _ => None,
    }
}

/// The name of table `table`'s single-column integer primary key (its item id), or None.
pub fn primary_key_column(table: pg_sys::Oid) -> TtResult<Option<String>> {
    Ok(crate::infra::catalog::read_row::<String, bool>(
        "SELECT a.attname::pg_catalog.text, true FROM pg_catalog.pg_index i
           JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid
                                         AND a.attnum OPERATOR(pg_catalog.=) i.indkey[0]
          WHERE i.indrelid OPERATOR(pg_catalog.=) $1 AND i.indisprimary
            AND i.indnkeyatts OPERATOR(pg_catalog.=) 1
            AND a.atttypid OPERATOR(pg_catalog.=) ANY ('{int2,int4,int8}'::pg_catalog.regtype[])",
        &[table.into()],
    )
    .map_err(|e| TtError::Internal(format!("reading the primary key of a table: {e}")))?
    .and_then(|(c, _)| c))
}

/// Who vouches for the caller's right to read a table.
#[derive(Clone, Copy, PartialEq)]
enum Grant {
    /// The table's own privileges (and its row-level security).
    Own,
    /// A partition reached through its partitioned table, whose privileges and row-level
    /// security were checked, as a query of the partitioned table checks them.
    Parent,
}

impl Target {
    /// Opens `index_oid` and its table for `who` (a name for messages, e.g. "recall()"):
    /// privileges first (42501), then the checks that need the relations open: a twotower_hnsw
    /// index (42809) on a column (not an expression) of a table with a single-column integer
    /// primary key (the item id), readable by the caller, without row-level security, valid.
    pub fn open(index_oid: pg_sys::Oid, who: &str) -> TtResult<Target> {
        let heap_oid = precheck_select(index_oid, who)?;
        // SAFETY: the table was found above; opened with the executor's lock.
        unsafe { Self::open_checked(heap_oid, index_oid, who, Grant::Own) }
    }

    /// Opens `index_oid` like [`Target::open`], or, for the index of a partitioned table, the
    /// index of every leaf partition (none when it has no partitions). The partitioned table's
    /// privileges and row-level security are what count, as for a query of it: a role that may
    /// read the partitioned table may search all of it, whatever each partition grants.
    pub fn open_all(index_oid: pg_sys::Oid, who: &str) -> TtResult<Vec<Target>> {
        crate::infra::citus::refuse_shell_index(index_oid, who)?;
        // SAFETY: catalogue lookups by oid, then the executor's locks: the partitioned table,
        // then the partitioned index and its descendants, then each leaf's table and index.
        unsafe {
            if !is_partitioned(index_oid) {
                return Ok(vec![Self::open(index_oid, who)?]);
            }
            let parent = pg_sys::IndexGetRelation(index_oid, false);
            precheck_parent(parent, who)?;
            let prel = pg_sys::table_open(parent, LOCK);
            check_parent_columns(prel, index_oid, who)?;
            let pindex = pg_sys::index_open(index_oid, LOCK);
            let ours = is_ours(pindex);
            let valid = (*(*pindex).rd_index).indisvalid;
            pg_sys::index_close(pindex, pg_sys::NoLock as pg_sys::LOCKMODE);
            pg_sys::table_close(prel, pg_sys::NoLock as pg_sys::LOCKMODE);
            if !ours {
                return Err(TtError::WrongIndex(who.into()));
            }
            if !valid {
                return Err(TtError::InvalidIndex(
                    "the partitioned index is not valid: some partition has no index attached to it".into(),
                ));
            }
            // The leaf indexes (the partitioned table's lock keeps a plain DETACH out until
            // the transaction ends; each leaf is locked as it is opened), read once per backend
            // until a relation of the tree changes (the locks above have taken in the
            // invalidations committed before them).
            crate::infra::relcache::subscribe(forget_leaves);
            let leaves = match LEAVES.with(|c| c.get(index_oid.to_u32())) {
                Some(l) => l,
                None => {
                    let rows: Vec<(pg_sys::Oid, bool)> = Spi::connect(|c| {
                        c.select(
                            "SELECT relid, isleaf FROM pg_catalog.pg_partition_tree($1)
                             UNION ALL SELECT relid, false FROM pg_catalog.pg_partition_tree($2) ORDER BY 1",
                            None,
                            &[index_oid.into(), parent.into()],
                        )?
                        .map(|r| Ok::<_, pgrx::spi::Error>((r.get::<pg_sys::Oid>(1)?, r.get::<bool>(2)?)))
                        .collect::<Result<Vec<_>, _>>()
                        .map(|v| v.into_iter().filter_map(|(o, l)| Some((o?, l?))).collect())
                    })
                    .map_err(|e| TtError::BadArgument(format!("listing the partitions of the index: {e}")))?;
                    let leaves: std::rc::Rc<Vec<pg_sys::Oid>> = std::rc::Rc::new(
                        rows.iter()
                            .filter(|(_, leaf)| *leaf)
                            .map(|(o, _)| *o)
                            .collect(),
                    );
                    let mentions = rows
                        .iter()
                        .map(|(o, _)| o.to_u32())
                        .chain([parent.to_u32()])
                        .collect();
                    LEAVES.with(|c| c.put(index_oid.to_u32(), mentions, leaves.clone()));
                    leaves
                }
            };
            let mut out = Vec::with_capacity(leaves.len());
            for &leaf in leaves.iter() {
                let heap = pg_sys::IndexGetRelation(leaf, false);
                match Self::open_checked(heap, leaf, who, Grant::Parent) {
                    Ok(t) => out.push(t),
                    Err(e) => {
                        out.into_iter().for_each(Target::close);
                        return Err(e);
                    }
                }
            }
            Ok(out)
        }
    }

    /// Opens table `heap_oid` and its index `index_oid` and checks them (see [`Target::open`]).
    ///
    /// # Safety
    /// `heap_oid` must be the table of `index_oid`, and with `Grant::Parent` the caller's
    /// right to read it must have been checked on its partitioned table.
    unsafe fn open_checked(
        heap_oid: pg_sys::Oid,
        index_oid: pg_sys::Oid,
        who: &str,
        grant: Grant,
    ) -> TtResult<Target> {
        // SAFETY: standard open order (table, then index) with the lock the executor takes;
        // on an error below, transaction abort releases both.
        unsafe {
            let heap = pg_sys::table_open(heap_oid, LOCK);
            let index = pg_sys::index_open(index_oid, LOCK);
            if !is_ours(index) {
                return Err(TtError::WrongIndex(who.into()));
            }
            let ix = (*index).rd_index;
            let vec_att = *(*ix).indkey.values.as_ptr();
            if vec_att <= 0 {
                return Err(TtError::Unsupported(format!(
                    "{who} does not support expression indexes"
                )));
            }
            let (id_att, id_type) = item_id_column(heap)?;
            if grant == Grant::Own {
                let me = crate::infra::catalog::caller();
                let readable =
                    pg_sys::pg_class_aclcheck(heap_oid, me, pg_sys::ACL_SELECT as pg_sys::AclMode)
                        == pg_sys::AclResult::ACLCHECK_OK
                        || [id_att, vec_att].iter().all(|&c| {
                            pg_sys::pg_attribute_aclcheck(
                                heap_oid,
                                c,
                                me,
                                pg_sys::ACL_SELECT as pg_sys::AclMode,
                            ) == pg_sys::AclResult::ACLCHECK_OK
                        });
                if !readable {
                    return Err(denied(&relation_name(heap), who));
                }
                if pg_sys::check_enable_rls(heap_oid, pg_sys::InvalidOid, false)
                    == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32
                {
                    return Err(rls_refused(who));
                }
            }
            if !(*ix).indisvalid {
                // REINDEX CONCURRENTLY swapped it out after the caller named it: read the index
                // that replaced it.
                if let Some(next) = replacement(index, heap_oid) {
                    pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
                    pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
                    return Self::open_checked(heap_oid, next, who, grant);
                }
            }
            if !(*ix).indisvalid || !(*ix).indisready {
                return Err(TtError::InvalidIndex(
                    "the index is not valid (a failed or unfinished CREATE INDEX CONCURRENTLY?): REINDEX it".into(),
                ));
            }
            let meta = pages::read_meta(index)?;
            Ok(Target {
                heap,
                index,
                id_att,
                id_type,
                vec_att,
                kind: crate::infra::vector::kind_of_index(index)?,
                metric: metric_of(index),
                dims: (meta.dims > 0).then_some(meta.dims as usize),
            })
        }
    }

    /// The index's metric (its operator class).
    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// The indexed vectors' length (None while the index holds no vector).
    pub fn dims(&self) -> Option<usize> {
        self.dims
    }

    /// The `k` nearest live rows to `query` (visible to the active snapshot), leaving out the
    /// ids in `exclude`, as (item id, distance as the SQL operator computes it), nearest first
    /// (ties by id). `ef` (when not 0) is the search's candidate list, replacing
    /// `twotower.ef_search` (raised to the rows wanted); 0 leaves the setting in force. The scan's own distances
    /// are used as they are when exact (f32 storage); for f16/i8 storage, whose scan gives
    /// lower bounds, each candidate's distance is computed once from its heap vector.
    pub fn nearest(
        &self,
        query: &[f32],
        k: usize,
        exclude: &HashSet<i64>,
        ef: usize,
    ) -> TtResult<Vec<(i64, f64)>> {
        Ok(self
            .nearest_with(query, k, exclude, ef, false)?
            .into_iter()
            .map(|(id, d, _)| (id, d))
            .collect())
    }

    /// [`Target::nearest`], with each hit's stored vector when `vectors` (read from the row the
    /// scan fetched anyway, as `real[]` values; None for a row whose vector is not finite).
    pub fn nearest_with(
        &self,
        query: &[f32],
        k: usize,
        exclude: &HashSet<i64>,
        ef: usize,
        vectors: bool,
    ) -> TtResult<Vec<(i64, f64, Option<Arc<[f32]>>)>> {
        if let Some(d) = self.dims {
            if d != query.len() {
                return Err(TtError::Ann(twotower_ann::AnnError::DimensionMismatch {
                    expected: d,
                    got: query.len(),
                }));
            }
        }
        let mut best: Vec<(f64, i64, Option<Arc<[f32]>>)> = Vec::with_capacity(k + 1);
        // SAFETY: an index scan of the open relations with the active snapshot, ended below.
        unsafe {
            let scan =
                pg_sys::index_beginscan(self.heap, self.index, pg_sys::GetActiveSnapshot(), 0, 1);
            // Room for the excluded rows the scan will return and skip.
            let wanted = k + exclude.len();
            scan::set_minimums(scan, wanted.max(ef), wanted as u64 + 1, ef > 0);
            scan::set_query(scan, query.to_vec());
            // The ORDER BY key is a placeholder (NULL): the query was given above.
            let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
            key.sk_flags = pg_sys::SK_ISNULL as i32;
            key.sk_attno = 1;
            pg_sys::index_rescan(scan, std::ptr::null_mut(), 0, &mut key, 1);
            let slot = pg_sys::table_slot_create(self.heap, std::ptr::null_mut());
            let mut seen = 0usize;
            while pg_sys::index_getnext_slot(
                scan,
                pg_sys::ScanDirection::ForwardScanDirection,
                slot,
            ) {
                seen += 1;
                if seen.is_multiple_of(256) {
                    check_for_interrupts!();
                }
                // The scan's distance of this row: exact, or a lower bound (quantized storage).
                let bound = f64::from_bits((*(*scan).xs_orderbyvals).value() as u64);
                let exact = !(*scan).xs_recheckorderby;
                if best.len() == k && bound > best[k - 1].0 {
                    // Every later row is at least this far: the k nearest are known.
                    break;
                }
                let Some(idd) = attr(slot, self.id_att) else {
                    continue;
                };
                let id = id_value(idd, self.id_type);
                if exclude.contains(&id) {
                    continue;
                }
                let mut stored: Option<Arc<[f32]>> = None;
                let d = if exact && !vectors {
                    bound
                } else {
                    let Some(vd) = attr(slot, self.vec_att) else {
                        continue;
                    };
                    let v = crate::infra::vector::VecRef::of_kind(vd, self.kind)?;
                    if v.as_slice().len() != query.len() {
                        continue;
                    }
                    let d = if exact {
                        bound
                    } else {
                        self.metric.sql_distance(query, v.as_slice())
                    };
                    // Only a row that enters the top k has its vector copied.
                    let enters = k > 0
                        && (best.len() < k || {
                            let (bd, bid, _) = &best[k - 1];
                            d < *bd || (d == *bd && id < *bid)
                        });
                    if vectors && enters && v.as_slice().iter().all(|x| x.is_finite()) {
                        stored = Some(v.as_slice().into());
                    }
                    d
                };
                let at = best.partition_point(|(bd, bid, _)| *bd < d || (*bd == d && *bid < id));
                if at < k {
                    best.insert(at, (d, id, stored));
                    best.truncate(k);
                }
                if best.len() == k && exact && d >= best[k - 1].0 {
                    // Exact distances come in order: nothing later is nearer. (Stopping at the
                    // k-th row, not reading one more: a further row could make the scan widen
                    // its search, which costs as much again.)
                    break;
                }
            }
            pg_sys::ExecDropSingleTupleTableSlot(slot);
            pg_sys::index_endscan(scan);
        }
        Ok(best.into_iter().map(|(d, id, v)| (id, d, v)).collect())
    }

    /// Releases the index and the table.
    pub fn close(self) {
        // SAFETY: opened in `open` with LOCK.
        unsafe {
            pg_sys::index_close(self.index, LOCK);
            pg_sys::table_close(self.heap, LOCK);
        }
    }
}

/// What `index_info()` shows about an index: settings, graph and delta sizes, size on disk,
/// and this node's cache file.
pub struct Health {
    pub dims: u32,
    pub metric: &'static str,
    pub quantization: &'static str,
    pub m: u32,
    pub ef_construction: u32,
    pub generation: u64,
    pub graph_items: u64,
    pub graph_dead: u64,
    pub graph_orphans: u64,
    pub delta_items: u64,
    pub size_bytes: u64,
    pub image_bytes: u64,
    pub build_seconds: f64,
    pub cache_file: Option<String>,
    pub cache_state: &'static str,
    /// Rows folded into the delta graph, rows waiting for the next fold, folds since the last
    /// build, and the delta graph's generation (changes at each fold; 0 before the first).
    pub delta_graph_items: u64,
    pub delta_pending: u64,
    pub folds: u64,
    pub delta_generation: u64,
    /// The main graph's tuning to sample queries, if it was tuned.
    pub tuned: Option<Tuned>,
}

/// What a build's tuning to `query_sample` did (the metapage's record).
pub struct Tuned {
    pub queries: u32,
    pub k: u32,
    pub links: u64,
    pub recall_before: f32,
    pub recall_after: f32,
}

/// The health of index `index_oid`, for `who` (a name for messages). The caller must be
/// allowed to inspect it: SELECT on the table, ownership of the index, or pg_monitor (42501,
/// checked before anything is locked); another kind of index is 42809.
pub fn health(index_oid: pg_sys::Oid, who: &str) -> TtResult<Health> {
    let me = crate::infra::catalog::caller();
    let heap = table_of_index(index_oid, who)?.ok_or_else(|| TtError::WrongIndex(who.into()))?;
    // SAFETY: ACL lookups by oid without locks.
    let allowed = unsafe {
        let monitor = pg_sys::get_role_oid(c"pg_monitor".as_ptr(), true);
        pg_sys::pg_class_aclcheck(heap, me, pg_sys::ACL_SELECT as pg_sys::AclMode)
            == pg_sys::AclResult::ACLCHECK_OK
            || pg_sys::pg_class_ownercheck(index_oid, me)
            || (monitor != pg_sys::InvalidOid && pg_sys::has_privs_of_role(me, monitor))
    };
    if !allowed {
        return Err(TtError::PermissionDenied {
            action: "inspect this index".into(),
            hint: format!("{who} needs SELECT on the indexed table, ownership of the index, or membership in pg_monitor."),
        });
    }
    // SAFETY: index_open raises a proper ERROR for a missing relation or a non-index; the
    // relation is closed before returning (an error in between is cleaned up by abort).
    unsafe {
        let rel = pg_sys::index_open(index_oid, LOCK);
        if !is_ours(rel) {
            return Err(TtError::WrongIndex(who.into()));
        }
        let blocks =
            pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM) as u64;
        if blocks == 0 {
            // The catalogue entry of a CREATE INDEX CONCURRENTLY that failed (or is still in its
            // first phase): no page was ever written.
            pg_sys::index_close(rel, LOCK);
            return Err(TtError::NotBuilt(
                crate::infra::spi::relation_name(index_oid)
                    .unwrap_or_else(|_| format!("{}", index_oid.to_u32())),
            ));
        }
        let meta = pages::read_meta(rel)?;
        let key = super::cache::rel_key(rel);
        let oid = (*rel).rd_id.to_u32();
        let h = Health {
            dims: meta.dims,
            metric: Metric::from_code(meta.metric).map_or("?", |m| m.name()),
            quantization: twotower_ann::Quantization::from_code(meta.quantization)
                .map_or("?", |q| q.name()),
            m: meta.m,
            ef_construction: meta.ef_construction,
            generation: meta.generation,
            graph_items: meta.graph_count,
            graph_dead: meta.graph_dead,
            graph_orphans: meta.graph_orphans,
            delta_items: meta.delta_live + meta.dg_count,
            size_bytes: blocks * pg_sys::BLCKSZ as u64,
            image_bytes: meta.image_len,
            build_seconds: meta.build_millis as f64 / 1000.0,
            cache_file: meta
                .main_ref()
                .map(|r| format!("{}", super::cache::file_path(key, oid, &r).display())),
            cache_state: super::cache::file_state(key, oid, &meta),
            delta_graph_items: meta.dg_count,
            delta_pending: meta.delta_live,
            folds: meta.dg_folds,
            delta_generation: meta.dg_generation,
            tuned: (meta.tuned_queries > 0).then_some(Tuned {
                queries: meta.tuned_queries,
                k: meta.tuned_k,
                links: meta.tuned_links,
                recall_before: meta.tuned_recall_before,
                recall_after: meta.tuned_recall_after,
            }),
        };
        pg_sys::index_close(rel, LOCK);
        Ok(h)
    }
}

/// Removes this database's cache files that belong to none of the `live` (tablespace,
/// relfilenode) pairs; returns how many were removed.
pub fn cleanup_cache(database: u32, live: &[(u32, u32)]) -> i64 {
    super::cache::cleanup(database, live)
}

thread_local! {
    /// The leaf indexes of partitioned indexes, by index oid (see `Target::open_all`).
    static LEAVES: crate::infra::relcache::RelCache<std::rc::Rc<Vec<pg_sys::Oid>>> = const { crate::infra::relcache::RelCache::new() };
}

fn forget_leaves(relid: u32) {
    LEAVES.with(|c| c.forget(relid));
}

/// The index that replaced `index` when REINDEX CONCURRENTLY swapped it out: the old index is
/// renamed `<name>_ccold` (or `_ccold<n>`) and marked invalid before it is dropped, and the new
/// one, valid and of the same access method on the same table, has its name. None for any
/// other invalid index (a failed CREATE INDEX CONCURRENTLY stays an error).
///
/// # Safety
/// `index` must be an open index of table `heap_oid`.
unsafe fn replacement(index: pg_sys::Relation, heap_oid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: reads of an open relation's catalogue data; a syscache lookup released below.
    unsafe {
        let rel = (*index).rd_rel;
        let name = std::ffi::CStr::from_ptr((*rel).relname.data.as_ptr())
            .to_str()
            .ok()?;
        let at = name.rfind("_ccold")?;
        if !name[at + 6..].bytes().all(|b| b.is_ascii_digit()) || at == 0 {
            return None;
        }
        let base = std::ffi::CString::new(&name[..at]).ok()?;
        let next = pg_sys::get_relname_relid(base.as_ptr(), (*rel).relnamespace);
        if next == pg_sys::InvalidOid || next == (*index).rd_id {
            return None;
        }
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::INDEXRELID as i32,
            pg_sys::Datum::from(next),
        );
        if tup.is_null() {
            return None;
        }
        let form = pg_sys::GETSTRUCT(tup) as *const pg_sys::FormData_pg_index;
        let ok = (*form).indrelid == heap_oid && (*form).indisvalid && (*form).indisready;
        pg_sys::ReleaseSysCache(tup);
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(next),
        );
        if tup.is_null() {
            return None;
        }
        let same_am =
            (*(pg_sys::GETSTRUCT(tup) as *const pg_sys::FormData_pg_class)).relam == (*rel).relam;
        pg_sys::ReleaseSysCache(tup);
        (ok && same_am).then_some(next)
    }
}
