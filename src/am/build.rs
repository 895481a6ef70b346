//! Index build: heap scan on the backend's thread, graph insertion on worker threads, the image
//! written into the index's own pages and WAL-logged.

use super::pages::{self, tid_to_key, write_new_index, Meta, MAX_INDEX_DIMS};
use super::rel::metric_of;
use super::{cache, options};
use crate::infra::error::{OrReport, TtError};
use crate::infra::vector::VecRef;
use pgrx::pg_sys;
use pgrx::prelude::*;
use twotower_ann::{
    estimate_build_memory, is_zero, AnnError, BuildParams, ImageBuilder, Metric, Poll,
    Quantization, BUILD_BATCH,
};

const PHASE_LOAD: i64 = 2;
const PHASE_GRAPH: i64 = 3;
const PHASE_WRITE: i64 = 4;
const PHASE_TUNE: i64 = 5;

struct BuildState {
    metric: Metric,
    /// The type of the indexed column (real[] or pgvector's vector).
    kind: crate::infra::vector::VecKind,
    m: usize,
    ef_construction: usize,
    quantization: Quantization,
    dims: Option<usize>,
    /// Items seen (indexed, or counted once the budget is known to be exceeded).
    count: usize,
    /// The graph so far (created at the first vector, when the dimensions are known); None once
    /// the budget is exceeded: the scan then only counts, to report the exact figure once.
    builder: Option<ImageBuilder>,
    over_budget: bool,
    /// A cosine build's distances read an f16 copy of the unit vectors while the budget holds
    /// it (`ImageBuilder::drop_unit_copy`).
    unit_copy: bool,
    /// The batch being collected.
    keys: Vec<u64>,
    vectors: Vec<f32>,
    /// Rows the relation is expected to hold (sizes the graph up front).
    expected: usize,
    heap: pg_sys::Relation,
    budget: usize,
    skipped_zero: u64,
}

impl BuildState {
    fn params(&self) -> BuildParams {
        BuildParams {
            dims: self.dims.unwrap_or(1),
            metric: self.metric,
            quantization: self.quantization,
            m: self.m,
            ef_construction: self.ef_construction,
        }
    }
    fn estimate(&self, n: usize) -> usize {
        self.estimate_with(n, self.unit_copy)
    }
    fn estimate_with(&self, n: usize, unit_copy: bool) -> usize {
        estimate_build_memory(&self.params(), n, worker_threads(), unit_copy)
    }
    /// Gives up the builder's f16 copy of the unit vectors (a cosine build's faster distances)
    /// when the budget holds the build only without it; says so once.
    fn drop_unit_copy(&mut self) {
        self.unit_copy = false;
        if let Some(b) = self.builder.as_mut() {
            b.drop_unit_copy();
        }
        pgrx::notice!(
            "twotower_hnsw: maintenance_work_mem holds this build only without its f16 copy of the vectors; building on the f32 input (slower)"
        );
    }

    /// Adds the collected batch to the graph, or starts counting only when the build would
    /// exceed the budget.
    fn flush(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        // Decided on rows actually seen, never on an extrapolation.
        if !self.over_budget && self.estimate(self.count) > self.budget {
            if self.unit_copy && self.estimate_with(self.count, false) <= self.budget {
                self.drop_unit_copy();
            } else {
                self.over_budget = true;
            }
        }
        if self.over_budget {
            self.builder = None;
            self.keys.clear();
            self.vectors.clear();
            return;
        }
        if self.builder.is_none() {
            // The graph grows from the first batch on: report it as the graph phase, with the
            // relation's expected rows as the total (corrected once the scan has counted).
            progress(pg_sys::PROGRESS_CREATEIDX_SUBPHASE, PHASE_GRAPH);
            progress(
                pg_sys::PROGRESS_CREATEIDX_TUPLES_TOTAL,
                self.expected.max(self.count) as i64,
            );
            let capacity = self.expected.max(self.keys.len());
            self.builder =
                Some(ImageBuilder::new(&self.params(), capacity, worker_threads()).or_report());
            if self.unit_copy && self.estimate_with(capacity, true) > self.budget {
                // The rows expected do not fit with the copy: do without it from the start.
                self.drop_unit_copy();
            }
        }
        let b = self.builder.as_mut().expect("created above");
        let r = b.add_batch(&self.keys, &self.vectors, &mut build_poll);
        report_build_error(r);
        self.keys.clear();
        self.vectors.clear();
    }
}

/// What the graph build asks between rounds: progress reported, cancellation answered.
pub(super) fn build_poll(done: usize) -> Poll {
    progress(pg_sys::PROGRESS_CREATEIDX_TUPLES_DONE, done as i64);
    if cancel_pending() {
        Poll::Cancel
    } else {
        Poll::Continue
    }
}

pub(super) fn report_build_error<T>(r: Result<T, AnnError>) -> T {
    match r {
        Ok(v) => v,
        Err(AnnError::Cancelled) => {
            pgrx::check_for_interrupts!();
            TtError::Ann(AnnError::Cancelled).report()
        }
        Err(e) => TtError::Ann(e).report(),
    }
}

/// Rows the heap is expected to hold: `reltuples` when the table has been analysed or vacuumed,
/// otherwise its pages times the rows of `row_bytes` that fit a page.
fn expected_rows(heap: pg_sys::Relation, row_bytes: usize) -> usize {
    // SAFETY: an open relation; rd_rel is its pg_class row.
    let reltuples = unsafe { (*(*heap).rd_rel).reltuples };
    if reltuples >= 0.0 {
        return reltuples as usize;
    }
    // SAFETY: an open relation.
    let blocks =
        unsafe { pg_sys::RelationGetNumberOfBlocksInFork(heap, pg_sys::ForkNumber::MAIN_FORKNUM) }
            as usize;
    blocks * (pg_sys::BLCKSZ as usize - 24) / (row_bytes + 28).max(32)
}

/// Where a build's temporary files go: PostgreSQL's own temporary directory (removed at
/// start-up, so nothing survives a crash; the files are unlinked as soon as they are mapped).
pub(super) fn spill_dir() -> Option<std::path::PathBuf> {
    // SAFETY: DataDir is set for the life of the backend.
    let data = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) };
    Some(std::path::Path::new(&*data.to_string_lossy()).join("base/pgsql_tmp"))
}

fn progress(param: u32, value: i64) {
    // SAFETY: progress reporting is a no-op outside a command that started it.
    unsafe { pg_sys::pgstat_progress_update_param(param as i32, value) };
}

#[pg_guard]
unsafe extern "C-unwind" fn build_callback(
    _index: pg_sys::Relation,
    tid: pg_sys::ItemPointer,
    values: *mut pg_sys::Datum,
    isnull: *mut bool,
    alive: bool,
    state: *mut core::ffi::c_void,
) {
    // SAFETY: `state` is the BuildState passed to table_index_build_scan; one indexed column.
    let st = unsafe { &mut *(state as *mut BuildState) };
    // SAFETY: the scan passes one isnull flag per indexed column (one).
    if unsafe { *isnull } {
        return;
    }
    // SAFETY: the indexed column is of the operator class's input type, `st.kind`.
    let v = match unsafe { VecRef::checked_kind(*values, st.kind, st.dims) } {
        Ok(v) => v,
        // A dead row (kept for older snapshots) with a bad vector can never be returned: skip it.
        Err(_) if !alive => return,
        Err(e) => e.report(),
    };
    let s = v.as_slice();
    if st.dims.is_none() {
        if s.len() > MAX_INDEX_DIMS {
            TtError::IndexLimit(format!(
                "twotower_hnsw indexes support at most {MAX_INDEX_DIMS} dimensions, this column has {}",
                s.len()
            ))
            .report();
        }
        st.dims = Some(s.len());
        st.expected = expected_rows(st.heap, 32 + s.len() * 4);
    }
    if st.metric == Metric::Cosine && is_zero(s) {
        st.skipped_zero += 1;
        return;
    }
    if let Err(e) = st.quantization.check_vector(s) {
        if !alive {
            return;
        }
        TtError::Ann(e).report();
    }
    st.count += 1;
    if st.over_budget {
        return;
    }
    // SAFETY: the scan passes a valid TID.
    st.keys.push(tid_to_key(unsafe { &*tid }));
    st.vectors.extend_from_slice(s);
    if st.keys.len() == BUILD_BATCH {
        st.flush();
    }
}

pub(super) fn generation(relnode: u32) -> u64 {
    // SAFETY: plain clock read.
    let now = unsafe { pg_sys::GetCurrentTimestamp() } as u64;
    (now ^ ((relnode as u64) << 40)).max(1)
}

fn cancel_pending() -> bool {
    // SAFETY: volatile reads of the backend's interrupt flags (set by signal handlers).
    unsafe {
        std::ptr::read_volatile(&raw const pg_sys::QueryCancelPending) != 0
            || std::ptr::read_volatile(&raw const pg_sys::ProcDiePending) != 0
    }
}

pub(super) fn worker_threads() -> usize {
    let n = crate::infra::gucs::BUILD_THREADS.get();
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

/// `ambuild`.
#[pg_guard]
pub unsafe extern "C-unwind" fn ambuild(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    info: *mut pg_sys::IndexInfo,
) -> *mut pg_sys::IndexBuildResult {
    // SAFETY: PostgreSQL passes open relations; the index uses one of our operator classes.
    let (metric, (m, efc, quantization)) = unsafe { (metric_of(index), options::of(index)) };
    quantization.check_metric(metric).or_report();
    // SAFETY: a plain GUC read.
    let budget = unsafe { pg_sys::maintenance_work_mem } as usize * 1024;
    let mut st = BuildState {
        metric,
        // SAFETY: an open index relation.
        kind: unsafe { crate::infra::vector::kind_of_index(index) }.or_report(),
        m,
        ef_construction: efc,
        quantization,
        dims: None,
        count: 0,
        builder: None,
        over_budget: false,
        unit_copy: metric == Metric::Cosine,
        keys: Vec::with_capacity(BUILD_BATCH),
        vectors: Vec::new(),
        expected: 0,
        heap,
        budget,
        skipped_zero: 0,
    };
    let started = std::time::Instant::now();
    progress(pg_sys::PROGRESS_CREATEIDX_SUBPHASE, PHASE_LOAD);
    // SAFETY: standard heap scan for index builds; the callback only touches `st`.
    let reltuples = unsafe {
        pg_sys::table_index_build_scan(
            heap,
            index,
            info,
            true,
            true,
            Some(build_callback),
            &mut st as *mut BuildState as *mut core::ffi::c_void,
            std::ptr::null_mut(),
        )
    };
    if st.skipped_zero > 0 {
        pgrx::notice!("twotower_hnsw: {} zero vectors were not indexed (cosine distance is undefined for them)", st.skipped_zero);
    }
    st.flush();
    let n = st.count;
    let need = st.estimate(n);
    if st.over_budget || need > budget {
        // The whole relation was counted: this is the exact figure, not an extrapolation.
        TtError::MemoryBudget {
            needed: need,
            available: budget,
        }
        .report();
    }
    let mut meta = Meta {
        dims: st.dims.unwrap_or(0) as u32,
        metric: metric.code(),
        quantization: quantization.code(),
        m: m as u32,
        ef_construction: efc as u32,
        // SAFETY: open relation.
        generation: generation(unsafe { (*index).rd_node.relNode.to_u32() }),
        graph_count: n as u64,
        ..Default::default()
    };
    // SAFETY: an open index of ours.
    let sample = unsafe { options::query_sample(index) };
    let image = match st.builder.take() {
        None => twotower_ann::ImageBytes::Mem(Vec::new()),
        Some(mut builder) => {
            if let Some(sample) = sample {
                let dims = st.dims.unwrap_or(1);
                let queries = read_queries(
                    &sample,
                    dims,
                    |q| {
                        need + twotower_ann::tune_memory(
                            n,
                            m,
                            q,
                            dims,
                            &sample.params,
                            worker_threads(),
                        )
                    },
                    budget,
                );
                progress(pg_sys::PROGRESS_CREATEIDX_SUBPHASE, PHASE_TUNE);
                progress(
                    pg_sys::PROGRESS_CREATEIDX_TUPLES_TOTAL,
                    (queries.len() / dims) as i64,
                );
                let r = builder.tune(&queries, &sample.params, &mut build_poll);
                let t = report_build_error(r);
                pgrx::debug1!(
                    "twotower_hnsw build: tuned to {} sample queries: {} links, recall@{} at ef {} {:.4} -> {:.4}",
                    t.queries, t.links, t.k, t.ef, t.recall_before, t.recall_after
                );
            }
            progress(pg_sys::PROGRESS_CREATEIDX_SUBPHASE, PHASE_GRAPH);
            progress(pg_sys::PROGRESS_CREATEIDX_TUPLES_TOTAL, n as i64);
            let spill = spill_dir();
            let r = builder.finish(&mut build_poll, spill.as_deref());
            report_build_error(r)
        }
    };
    let image = image.as_ref();
    let graph_done = started.elapsed();
    progress(pg_sys::PROGRESS_CREATEIDX_SUBPHASE, PHASE_WRITE);
    meta.image_checksum = if image.is_empty() {
        0
    } else {
        twotower_ann::checksum(image)
    };
    if let Ok(h) = twotower_ann::Header::parse(image) {
        meta.graph_orphans = h.orphans as u64;
        if let Some(t) = h.tuning {
            meta.tuned_queries = t.queries;
            meta.tuned_k = t.k;
            meta.tuned_links = t.links;
            meta.tuned_recall_before = t.recall_before;
            meta.tuned_recall_after = t.recall_after;
        }
    }
    // SAFETY: the index relation is new and empty.
    unsafe {
        write_new_index(index, pg_sys::ForkNumber::MAIN_FORKNUM, &mut meta, image);
        // The pages are the truth; priming this node's cache file saves re-reading them.
        cache::store(index, &meta, image);
    }
    meta.build_millis = started.elapsed().as_millis() as u64;
    // SAFETY: the metapage was just written; record how long the build took.
    unsafe { pages::set_build_stats(index, meta.build_millis) };
    pgrx::debug1!(
        "twotower_hnsw build: {n} items ({} orphans) in {:.1} s to the graph, {:.1} s in all",
        meta.graph_orphans,
        graph_done.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    // SAFETY: palloc0 returns zeroed memory for the result struct.
    unsafe {
        let res = pg_sys::palloc0(std::mem::size_of::<pg_sys::IndexBuildResult>())
            as *mut pg_sys::IndexBuildResult;
        (*res).heap_tuples = reltuples;
        (*res).index_tuples = n as f64;
        res
    }
}

/// The rows of the index's `query_sample` as query vectors (`dims` floats each, row-major):
/// read as the caller of the build (PostgreSQL runs a build as the table's owner), at most
/// `query_limit` rows, through the user tower of `query_model` when one is named; NULL rows
/// are left out. `memory(q)` is what the build and a tuning to `q` queries need: past
/// `budget` the read stops with 53200.
fn read_queries(
    sample: &options::QuerySample,
    dims: usize,
    memory: impl Fn(usize) -> usize,
    budget: usize,
) -> Vec<f32> {
    let inner = sample.sql.trim().trim_end_matches(';');
    let select = match &sample.model {
        Some(model) => format!(
            "SELECT twotower.embed_user({}, s.f) FROM ({inner}\n) AS s(f) LIMIT {}",
            pgrx::spi::quote_literal(model),
            sample.limit
        ),
        None => format!(
            "SELECT s.v::pg_catalog.float4[] FROM ({inner}\n) AS s(v) LIMIT {}",
            sample.limit
        ),
    };
    let read = || {
        let mut out: Vec<f32> = Vec::new();
        let mut rows = 0usize;
        let mut progress = crate::infra::spi::Progress::new("twotower_hnsw query sample", "rows");
        crate::infra::spi::read_rows(&select, "query_sample", Some(&mut progress), |row| {
            rows += 1;
            let Some(v) = row.get::<Vec<Option<f32>>>(1)? else {
                return Ok(());
            };
            if v.len() != dims {
                TtError::Ann(AnnError::DimensionMismatch {
                    expected: dims,
                    got: v.len(),
                })
                .report();
            }
            let q = out.len() / dims + 1;
            if memory(q) > budget {
                TtError::MemoryBudget {
                    needed: memory(q),
                    available: budget,
                }
                .report();
            }
            for x in v {
                match x {
                    Some(x) => out.push(x),
                    None => TtError::BadArgument(format!(
                        "row {rows} of query_sample holds a NULL element"
                    ))
                    .report(),
                }
            }
            Ok(())
        })
        .or_report();
        out
    };
    // A name the sample cannot resolve: say where names come from (a restore runs the build
    // with an empty search_path, as it does for expression indexes).
    pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(read))
        .catch_others(|e| {
            use pgrx::PgSqlErrorCode::*;
            let pg_sys::panic::CaughtError::PostgresError(r) = &e else {
                e.rethrow()
            };
            let unresolved = matches!(
                r.sql_error_code(),
                ERRCODE_UNDEFINED_TABLE
                    | ERRCODE_UNDEFINED_FUNCTION
                    | ERRCODE_UNDEFINED_OBJECT
                    | ERRCODE_INVALID_SCHEMA_NAME
            );
            if !unresolved || r.hint().is_some() {
                e.rethrow()
            }
            let mut report =
                pg_sys::panic::ErrorReport::new(r.sql_error_code(), r.message().to_owned(), "")
                    .set_hint(
                        "query_sample is read with the build's search_path, which is empty during a restore (pg_restore): schema-qualify the names in it",
                    );
            if let Some(d) = r.detail() {
                report = report.set_detail(d.to_owned());
            }
            // (An ERROR does not return.)
            report.report(pgrx::PgLogLevel::ERROR);
            Vec::new()
        })
        .execute()
}

/// `ambuildempty`: the init fork of an unlogged index (an empty metapage).
#[pg_guard]
pub unsafe extern "C-unwind" fn ambuildempty(index: pg_sys::Relation) {
    // SAFETY: open relation with one of our operator classes.
    let (metric, (m, efc, q)) = unsafe { (metric_of(index), options::of(index)) };
    let mut meta = Meta {
        metric: metric.code(),
        quantization: q.code(),
        m: m as u32,
        ef_construction: efc as u32,
        generation: 1,
        ..Default::default()
    };
    // SAFETY: the init fork is new and empty.
    unsafe { write_new_index(index, pg_sys::ForkNumber::INIT_FORKNUM, &mut meta, &[]) };
}

/// Names of the build sub-phases shown in pg_stat_progress_create_index.
#[pg_guard]
pub unsafe extern "C-unwind" fn ambuildphasename(phase: i64) -> *mut core::ffi::c_char {
    let s: &'static std::ffi::CStr = match phase {
        PHASE_LOAD => c"loading tuples",
        PHASE_GRAPH => c"building HNSW graph",
        PHASE_WRITE => c"writing index pages",
        PHASE_TUNE => c"tuning graph to sample queries",
        _ => return std::ptr::null_mut(),
    };
    s.as_ptr() as *mut core::ffi::c_char
}
