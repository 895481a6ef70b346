//! The maintenance lock.

use super::meta::*;
use pgrx::pg_sys;

// ---------------------------------------------------------------------------------------------
// The maintenance lock: one mover of delta items at a time (inserts that fold, VACUUM).

/// Takes the index's maintenance lock (a heavyweight lock on the metapage's block number, as
/// GIN does for its pending list; released at transaction end at the latest). `wait = false`
/// returns false at once when someone else holds it.
///
/// # Safety
/// `index` must be an open relation.
pub unsafe fn lock_maintenance(index: pg_sys::Relation, wait: bool) -> bool {
    // SAFETY: forwarded.
    unsafe {
        if wait {
            pg_sys::LockPage(index, META_BLKNO, pg_sys::ExclusiveLock as pg_sys::LOCKMODE);
            true
        } else {
            pg_sys::ConditionalLockPage(
                index,
                META_BLKNO,
                pg_sys::ExclusiveLock as pg_sys::LOCKMODE,
            )
        }
    }
}

/// Releases [`lock_maintenance`].
///
/// # Safety
/// The caller holds the lock.
pub unsafe fn unlock_maintenance(index: pg_sys::Relation) {
    // SAFETY: forwarded.
    unsafe { pg_sys::UnlockPage(index, META_BLKNO, pg_sys::ExclusiveLock as pg_sys::LOCKMODE) };
}
