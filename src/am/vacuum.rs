//! VACUUM: dead graph entries get tombstones (so a reused TID never matches them), dead delta
//! items are deleted.

use super::cache;
use super::pages::{
    bit_is_set, key_to_tid, read_meta, read_tombstones, set_tombstones, vacuum_delta,
};
use crate::error::OrReport;
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
        let meta = read_meta(index).or_report();
        let mut live = 0u64;
        if meta.has_image() {
            let img = cache::image(index, &meta).or_report();
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
                } else {
                    live += 1;
                }
            }
            let removed = set_tombstones(index, &meta, &newly_dead);
            (*stats).tuples_removed += removed as f64;
        }
        let (removed, kept) = vacuum_delta(index, &meta, |tid| cb(tid, callback_state));
        (*stats).tuples_removed += removed as f64;
        (*stats).num_index_tuples = (live + kept) as f64;
        (*stats).num_pages =
            pg_sys::RelationGetNumberOfBlocksInFork(index, pg_sys::ForkNumber::MAIN_FORKNUM);
        stats
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
        if !stats.is_null() {
            return stats;
        }
        let stats = alloc_stats(stats);
        let index = (*info).index;
        let meta = read_meta(index).or_report();
        (*stats).num_index_tuples =
            (meta.graph_count - meta.graph_dead.min(meta.graph_count) + meta.delta_live) as f64;
        (*stats).num_pages =
            pg_sys::RelationGetNumberOfBlocksInFork(index, pg_sys::ForkNumber::MAIN_FORKNUM);
        stats
    }
}
