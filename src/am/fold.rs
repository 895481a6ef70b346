//! The delta graph: rows inserted after the build first land in the delta pages (searchable at
//! once, ranked exactly by every scan); once there are enough of them they are *folded* into a
//! second, smaller HNSW graph beside the main one, so scans stay fast after many inserts
//! without a REINDEX. Scans search both graphs and the few delta items left, and merge.
//!
//! A fold extends the current delta graph with the delta items (a writable copy of its graph,
//! new items inserted on worker threads, then repaired and serialized like a build), writes the
//! result over the pages of the graph before the current one (the spare chain), section by
//! section, and switches the metapage to it in one WAL record; the current graph's pages become
//! the spare, and the absorbed delta pages go to the free space map. A fold appends items and
//! changes a few neighbour lists, and each section keeps its bytes in place, so Generic WAL
//! logs the difference from the spare (about two folds' worth of changes), not the graph. Readers never wait: a scan that read the metapage before a switch keeps the old
//! graph (its cache file), and one that finds its pages reused reads the metapage again.
//!
//! Who folds: the insert that brings the delta to the threshold (unless another fold is
//! running: inserts never wait for one), and VACUUM. VACUUM also rebuilds the delta graph
//! without the rows it removes, so a reused heap TID never matches an old entry.
//!
//! Bounds: a fold needs the memory of building a graph of the delta graph's size; past
//! `maintenance_work_mem` it is skipped (one WARNING per backend) and the delta grows until a
//! REINDEX. It answers cancellation like a build.

use super::build::{build_poll, generation, report_build_error, spill_dir, worker_threads};
use super::cache;
use super::pages::{
    self, for_each_delta, key_to_tid, lock_maintenance, read_meta, tid_to_key, unlock_maintenance,
    ImageRef, Level, Meta,
};
use crate::infra::error::{OrReport, TtError, TtResult};
use pgrx::pg_sys;
use std::cell::Cell;
use twotower_ann::{estimate_build_memory, BuildParams, ImageBuilder, Metric, Quantization};

/// The delta graph is extended once the delta holds at least 1/FOLD_RATIO of its items (and at
/// least the index's `fold_threshold`): each item is then serialized about FOLD_RATIO times
/// over the graph's life (WAL carries only what changed: each item about twice, plus the
/// neighbour lists it joined), and a scan ranks at most that share of it exactly (about 60 ns
/// an item on the benchmark machine).
const FOLD_RATIO: u64 = 32;

thread_local! {
    static WARNED_BUDGET: Cell<bool> = const { Cell::new(false) };
}

/// Delta items at which a fold starts.
///
/// # Safety
/// `index` must be an open twotower_hnsw index.
pub unsafe fn threshold(index: pg_sys::Relation, meta: &Meta) -> u64 {
    // SAFETY: forwarded.
    let min = unsafe { super::options::fold_threshold(index) } as u64;
    min.max(meta.dg_count / FOLD_RATIO)
}

/// After an insert that left the metapage as `meta`: folds when the delta reached the
/// threshold and no fold is running.
///
/// # Safety
/// `index` must be an open twotower_hnsw index.
pub unsafe fn after_insert(index: pg_sys::Relation, meta: &Meta) {
    // SAFETY: forwarded.
    unsafe { fold_when(index, meta, |index, m| threshold(index, m)) }
}

/// Folds when the delta holds at least `min(index, meta)` items and no fold is running (inserts
/// and (auto)vacuum never wait for one). `meta` is the caller's latest metapage; it is read
/// again under the lock, since someone may have folded in between.
///
/// # Safety
/// `index` must be an open twotower_hnsw index.
pub unsafe fn fold_when(
    index: pg_sys::Relation,
    meta: &Meta,
    min: impl Fn(pg_sys::Relation, &Meta) -> u64,
) {
    // SAFETY: forwarded; the maintenance lock is released below or at transaction end.
    unsafe {
        if meta.delta_live < min(index, meta) || !lock_maintenance(index, false) {
            return;
        }
        let meta = read_meta(index).or_report();
        if meta.delta_live >= min(index, &meta) {
            fold_or_warn(index);
        }
        unlock_maintenance(index);
    }
}

/// Folds; over the memory budget, warns once per backend instead (the rows stay in the delta,
/// searchable, only slower).
///
/// # Safety
/// As for [`fold`].
pub unsafe fn fold_or_warn(index: pg_sys::Relation) {
    // SAFETY: forwarded.
    match unsafe { fold(index, None) } {
        Ok(_) => {}
        Err(TtError::MemoryBudget { needed, available }) => {
            if !WARNED_BUDGET.with(|w| w.replace(true)) {
                // SAFETY: an open relation's name.
                let name =
                    unsafe { std::ffi::CStr::from_ptr((*(*index).rd_rel).relname.data.as_ptr()) };
                pgrx::warning!(
                    "twotower_hnsw: rows inserted into index \"{}\" stay in its delta: folding them into its delta graph needs about {} MB, more than maintenance_work_mem ({} MB); scans rank them one by one until a REINDEX, or a VACUUM with more maintenance_work_mem",
                    name.to_string_lossy(),
                    needed.div_ceil(1 << 20),
                    available >> 20
                );
            }
        }
        Err(e) => e.report(),
    }
}

/// What a fold did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Folded {
    /// Items that left the delta pages.
    pub moved: u64,
    /// Items of the new delta graph.
    pub graph_items: u64,
    /// Items left out because `dead` said so.
    pub removed: u64,
}

/// Folds the delta into the delta graph. With `dead` (VACUUM), the graph is rebuilt from its
/// live items and the live delta items, leaving out every item `dead` names; without it, the
/// current graph is extended. `MemoryBudget` when `maintenance_work_mem` does not allow it.
///
/// # Safety
/// `index` must be an open twotower_hnsw index; the caller holds the maintenance lock.
pub unsafe fn fold(
    index: pg_sys::Relation,
    mut dead: Option<&mut dyn FnMut(&mut pg_sys::ItemPointerData) -> bool>,
) -> TtResult<Folded> {
    // SAFETY: forwarded; under the maintenance lock no one else moves or removes delta items,
    // and appends after the seal start new pages after the sealed one.
    unsafe {
        // The budget first: a fold refused for memory leaves the delta as it was.
        let now = read_meta(index)?;
        let metric = Metric::from_code(now.metric).unwrap_or(Metric::Cosine);
        let params = BuildParams {
            dims: now.dims.max(1) as usize,
            metric,
            quantization: Quantization::F32,
            m: now.m as usize,
            ef_construction: now.ef_construction as usize,
        };
        let old_count = if now.delta_graph_ref().is_some() {
            now.dg_count as usize
        } else {
            0
        };
        let need = estimate_build_memory(
            &params,
            old_count + now.delta_live as usize,
            worker_threads(),
            true,
        );
        let budget = pg_sys::maintenance_work_mem as usize * 1024;
        if need > budget {
            return Err(TtError::MemoryBudget {
                needed: need,
                available: budget,
            });
        }
        let sealed = pages::seal_delta(index);
        let old = sealed.delta_graph_ref();

        let mut out = Folded::default();
        let mut absorbed = Vec::new();
        let mut keys = Vec::with_capacity(sealed.delta_live as usize);
        let mut vectors = Vec::with_capacity(sealed.delta_live as usize * params.dims);
        let whole = for_each_delta(
            index,
            &sealed,
            Some(sealed.dl_sealed),
            Some(&mut absorbed),
            |_, mut tid, v| {
                out.moved += 1;
                if dead.as_mut().is_some_and(|d| d(&mut tid)) {
                    out.removed += 1;
                    return;
                }
                keys.push(tid_to_key(&tid));
                vectors.extend_from_slice(v);
            },
        );
        if !whole {
            return Err(TtError::IndexCorrupt(
                "the chain of delta pages is broken".into(),
            ));
        }

        let old_image = old.map(|r| cache::image(index, &sealed, &r).or_report());
        let threads = worker_threads();
        let builder = match (&old_image, dead.is_some()) {
            (Some(img), false) => {
                ImageBuilder::from_image(&params, &img.image, keys.len(), threads).or_report()
            }
            (Some(img), true) => {
                // Rebuilt from the live items: the graph's own vectors are exact (f32).
                let mut b = ImageBuilder::new(&params, old_count + keys.len(), threads).or_report();
                let (mut ok, mut okv) = (Vec::new(), Vec::new());
                let d = dead.as_mut().expect("checked");
                for i in 0..img.image.len() {
                    if i % 1024 == 0 {
                        pg_sys::vacuum_delay_point();
                    }
                    let key = img.image.key_at(i);
                    let mut tid = key_to_tid(key);
                    if d(&mut tid) {
                        out.removed += 1;
                        continue;
                    }
                    if let Some(v) = img.image.vector(key).or_report() {
                        ok.push(key);
                        okv.extend_from_slice(&v);
                    }
                }
                report_build_error(b.add_batch(&ok, &okv, &mut build_poll));
                b
            }
            (None, _) => ImageBuilder::new(&params, keys.len(), threads).or_report(),
        };
        // The build's self-check for the rows this fold adds only (a search each, cheap beside
        // the insertion): what it misses is linked again or ranked exactly as an orphan.
        let mut builder = builder.self_check_from_here();
        report_build_error(builder.add_batch(&keys, &vectors, &mut build_poll));
        drop(vectors);
        let total = builder.len() as u64;
        out.graph_items = total;
        let bytes = if total > 0 {
            let spill = spill_dir();
            Some(report_build_error(
                builder.finish(&mut build_poll, spill.as_deref()),
            ))
        } else {
            None
        };

        // The new graph goes over the spare chain (the graph before the current one), section
        // by section, so that WAL carries what changed since then; the current graph becomes
        // the spare. Without a new graph, both chains are freed.
        let spare = sealed.spare_ref();
        let (new_ref, to_free) = match &bytes {
            Some(b) => {
                let b = b.as_ref();
                let gen = generation((*index).rd_node.relNode.to_u32()) ^ (sealed.dg_folds + 1);
                let cuts = twotower_ann::segment_cuts(b);
                let (blocks, unused) = pages::write_chain(index, gen, b, &cuts, spare.as_ref());
                let r = ImageRef {
                    level: Level::Delta,
                    generation: gen,
                    checksum: twotower_ann::checksum(b),
                    len: b.len() as u64,
                    start: blocks[0],
                    nblocks: blocks.len() as u32,
                };
                (Some((r, total)), unused)
            }
            None => {
                let mut blocks: Vec<pg_sys::BlockNumber> = old
                    .map(|r| pages::chain_blocks(index, &r))
                    .unwrap_or_default();
                if let Some(r) = &spare {
                    blocks.extend(pages::chain_blocks(index, r));
                }
                (None, blocks)
            }
        };
        let next_spare = if new_ref.is_some() { old } else { None };
        let meta = pages::switch_delta_graph(index, new_ref, next_spare, out.moved);
        pages::free_pages(index, &to_free);
        pages::free_delta_pages(index, &absorbed);
        cache::store_delta_graph(index, &meta, bytes.as_ref().map_or(&[][..], |b| b.as_ref()));
        pgrx::debug1!(
            "twotower_hnsw: folded {} delta items ({} removed) into a delta graph of {} items",
            out.moved,
            out.removed,
            out.graph_items
        );
        Ok(out)
    }
}
