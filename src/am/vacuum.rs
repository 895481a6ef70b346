//! VACUUM: dead entries of the main graph get tombstones (so a reused TID never matches them),
//! a main graph with nothing but dead entries is retired (its pages freed for reuse), a delta
//! graph with dead entries is rebuilt without them, dead delta items are deleted, and a delta
//! that reached its threshold is folded into the delta graph.

use super::pages::{
    bit_is_set, key_to_tid, lock_maintenance, read_meta, read_tombstones, retire_dead_main,
    set_tombstones, unlock_maintenance, vacuum_delta,
};
use super::{cache, fold, options};
use crate::infra::error::OrReport;
use pgrx::pg_sys;
use pgrx::prelude::*;

unsafe fn alloc_stats(
    stats: *mut pg_sys::IndexBulkDeleteResult,
) -> *mut pg_sys::IndexBulkDeleteResult {
    if stats.is_null() {
        // SAFETY: zeroed allocation of the result struct in the current context.
        unsafe {
            pg_sys::palloc0(std::mem::size_of::<pg_sys::IndexBulkDeleteResult>())
                as *mut pg_sys::IndexBulkDeleteResult
        }
    } else {
        stats
    }
}

#[pg_guard]
pub unsafe extern "C-unwind" fn ambulkdelete(
    info: *mut pg_sys::IndexVacuumInfo,
    stats: *mut pg_sys::IndexBulkDeleteResult,
    callback: pg_sys::IndexBulkDeleteCallback,
    callback_state: *mut core::ffi::c_void,
) -> *mut pg_sys::IndexBulkDeleteResult {
    // SAFETY: VACUUM passes a valid info struct and callback.
    unsafe {
        let stats = alloc_stats(stats);
        let index = (*info).index;
        let Some(cb) = callback else { return stats };
        // No fold runs while VACUUM removes items (released at transaction end on error).
        lock_maintenance(index, true);
        let meta = read_meta(index).or_report();
        if let Some(r) = meta.main_ref() {
            let img = cache::image(index, &meta, &r).or_report();
            let tomb = if meta.graph_dead > 0 {
                read_tombstones(index, &meta)
            } else {
                Vec::new()
            };
            let mut newly_dead = Vec::new();
            for pos in 0..img.image.len() {
                if pos % 4096 == 0 {
                    pg_sys::vacuum_delay_point();
                }
                if bit_is_set(&tomb, pos) {
                    continue;
                }
                let mut tid = key_to_tid(img.image.key_at(pos));
                if cb(&mut tid, callback_state) {
                    newly_dead.push(pos);
                }
            }
            let removed = set_tombstones(index, &meta, &newly_dead);
            (*stats).tuples_removed += removed as f64;
            // Every entry dead (the table was emptied or replaced): the dead graph's pages
            // come back now, not at the next REINDEX.
            drop(img);
            retire_dead_main(index);
        }
        // The delta graph has no tombstones: when any of its items is dead it is rebuilt
        // without them (together with the live delta items), before the heap can reuse a TID.
        let graph_has_dead = match meta.delta_graph_ref() {
            Some(r) => {
                let img = cache::image(index, &meta, &r).or_report();
                (0..img.image.len()).any(|i| {
                    if i % 4096 == 0 {
                        pg_sys::vacuum_delay_point();
                    }
                    let mut tid = key_to_tid(img.image.key_at(i));
                    cb(&mut tid, callback_state)
                })
            }
            None => false,
        };
        let mut dead = |tid: &mut pg_sys::ItemPointerData| cb(tid, callback_state);
        if graph_has_dead {
            // Over the memory budget this is an ERROR: nothing else keeps a dead entry from
            // matching a reused TID.
            let f = fold::fold(index, Some(&mut dead)).or_report();
            (*stats).tuples_removed += f.removed as f64;
        } else {
            let (removed, _) = vacuum_delta(index, &meta, &mut dead);
            (*stats).tuples_removed += removed as f64;
        }
        unlock_maintenance(index);
        fill_counts(index, stats);
        stats
    }
}

/// Live items and pages of the index, from the metapage.
unsafe fn fill_counts(index: pg_sys::Relation, stats: *mut pg_sys::IndexBulkDeleteResult) {
    // SAFETY: an open index and a stats struct of ours.
    unsafe {
        let meta = read_meta(index).or_report();
        (*stats).num_index_tuples = (meta.graph_count - meta.graph_dead.min(meta.graph_count)
            + meta.dg_count
            + meta.delta_live) as f64;
        (*stats).num_pages =
            pg_sys::RelationGetNumberOfBlocksInFork(index, pg_sys::ForkNumber::MAIN_FORKNUM);
    }
}

#[pg_guard]
pub unsafe extern "C-unwind" fn amvacuumcleanup(
    info: *mut pg_sys::IndexVacuumInfo,
    stats: *mut pg_sys::IndexBulkDeleteResult,
) -> *mut pg_sys::IndexBulkDeleteResult {
    // SAFETY: VACUUM passes a valid info struct.
    unsafe {
        if (*info).analyze_only {
            return stats;
        }
        let stats = alloc_stats(stats);
        let index = (*info).index;
        // (Auto)vacuum folds a delta of at least `fold_threshold` rows (whatever its share of the
        // delta graph: VACUUM is where a fold's cost is expected), unless a fold is running.
        let meta = read_meta(index).or_report();
        // (A main graph left all dead by an earlier version, which never retired one.)
        if meta.has_image()
            && meta.graph_count > 0
            && meta.graph_dead >= meta.graph_count
            && lock_maintenance(index, false)
        {
            retire_dead_main(index);
            unlock_maintenance(index);
        }
        let meta = read_meta(index).or_report();
        fold::fold_when(index, &meta, |index, _| {
            options::fold_threshold(index) as u64
        });
        fill_counts(index, stats);
        stats
    }
}
