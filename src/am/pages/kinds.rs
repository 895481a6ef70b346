//! Page kinds: the special space that names what a page is (a delta page, a freed page, a page
//! of a graph chain), and pages taken from the free space map (checked before reuse) or added
//! at the end of the relation.

use super::meta::*;
use pgrx::pg_sys;

/// Special space of a delta-graph page: magic, next block, generation.
pub(super) const CHAIN_SPECIAL: usize = std::mem::size_of::<ChainSpecial>();
pub(super) const CHAIN_MAGIC: u32 = 0x5454_4447; // "TTDG"
/// Pages of a chain written section by section (`twotower_ann::segment_cuts`): "TTG0" for the
/// first section's pages, "TTG1" for the second's, and so on. Each section starts on a page of
/// its own, so a page may hold less than a full payload before the next section.
pub(super) const SEG_MAGIC: u32 = 0x5454_4730; // "TTG0"
pub(super) const MAX_SEGMENTS: u32 = 16;
/// Raw payload bytes of a delta-graph page.
pub const CHAIN_PAYLOAD: usize = PAYLOAD - CHAIN_SPECIAL;

// ---------------------------------------------------------------------------------------------
// Page kinds. Delta pages of version 1 have no special space; every later page has one that
// names its kind, so a page taken from the free space map can be checked before reuse.

pub(super) const DELTA_MAGIC: u32 = 0x5454_444C; // "TTDL"
pub(super) const FREE_MAGIC: u32 = 0x5454_4652; // "TTFR"
/// Special space of a delta page (and of a freed one): magic, next block (0: none).
pub(super) const LINK_SPECIAL: usize = std::mem::size_of::<LinkSpecial>();

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct LinkSpecial {
    pub(super) magic: u32,
    pub(super) next: u32,
}

/// The special space of `page` as a `T`, when it has exactly `T`'s size.
///
/// # Safety
/// `page` must be a locked page of the index; `T` plain old data.
pub(super) unsafe fn special<T: Copy>(page: pg_sys::Page) -> Option<T> {
    // SAFETY: forwarded; the special area is read only when it has T's size.
    unsafe {
        if pg_sys::PageIsNew(page)
            || pg_sys::PageGetSpecialSize(page) as usize != std::mem::size_of::<T>()
        {
            return None;
        }
        Some(std::ptr::read_unaligned(
            pg_sys::PageGetSpecialPointer(page) as *const T,
        ))
    }
}

/// # Safety
/// `page` must be a locked page of the index.
pub(super) unsafe fn link_special(page: pg_sys::Page) -> Option<LinkSpecial> {
    // SAFETY: forwarded.
    unsafe { special(page) }
}

/// # Safety
/// `page` must be an exclusively locked (registered) page with a link special space.
pub(super) unsafe fn set_link(page: pg_sys::Page, magic: u32, next: u32) {
    // SAFETY: forwarded.
    unsafe {
        std::ptr::write_unaligned(
            pg_sys::PageGetSpecialPointer(page) as *mut LinkSpecial,
            LinkSpecial { magic, next },
        )
    };
}

/// True for a delta page: a chained one, or one of a version-1 delta range (no special space).
///
/// # Safety
/// `page` must be a locked page of the index.
pub(super) unsafe fn is_delta_page(page: pg_sys::Page) -> bool {
    // SAFETY: forwarded.
    unsafe {
        !pg_sys::PageIsNew(page)
            && (pg_sys::PageGetSpecialSize(page) == 0
                || link_special(page).is_some_and(|s| s.magic == DELTA_MAGIC))
    }
}

/// Adds `item` to `page`; false when it does not fit.
///
/// # Safety
/// `page` must be a registered Generic WAL page of the delta.
pub(super) unsafe fn add_item(page: pg_sys::Page, item: &[u8]) -> bool {
    // SAFETY: forwarded.
    unsafe {
        pg_sys::PageAddItemExtended(
            page,
            item.as_ptr() as pg_sys::Item,
            item.len(),
            pg_sys::InvalidOffsetNumber,
            0,
        ) != pg_sys::InvalidOffsetNumber
    }
}

/// A free page of the index, exclusively locked, if the free space map offers one that really
/// is free (the map is not crash-safe, and two backends may be offered one block, so each offer
/// is checked under the page's lock): new, marked free, or (for a fold, `building` ≠ 0) a delta
/// graph page of neither the current, the spare nor the `building` generation. An appender
/// (`building` = 0) takes new and freed pages only: a graph page of no generation the metapage
/// names may be one a running fold is writing (its generation is in no metapage yet), so it is
/// given back to the map for folds.
///
/// # Safety
/// `index` must be an open twotower_hnsw index and `meta` its current metapage.
pub(super) unsafe fn take_free_page(
    index: pg_sys::Relation,
    meta: &Meta,
    building: u64,
) -> Option<Locked> {
    // SAFETY: forwarded; pages are checked under their exclusive lock before reuse.
    unsafe {
        let nblocks =
            pg_sys::RelationGetNumberOfBlocksInFork(index, pg_sys::ForkNumber::MAIN_FORKNUM);
        // Dead graph pages an appender passed over, given back once it has its page (giving
        // one back at once would have the map offer it again).
        let mut passed = Vec::new();
        let give_back = |passed: &[pg_sys::BlockNumber]| {
            for &b in passed {
                pg_sys::RecordFreeIndexPage(index, b);
            }
        };
        loop {
            let blk = pg_sys::GetFreeIndexPage(index);
            if blk == pg_sys::InvalidBlockNumber {
                give_back(&passed);
                return None;
            }
            // (The delta's tail is locked by an appender calling this: never lock it twice.)
            if blk < meta.first_free_area_block()
                || blk >= nblocks
                || (meta.delta_start..meta.delta_end).contains(&blk)
                || blk == meta.dl_tail
                || blk == meta.dl_head
            {
                continue;
            }
            let b = Locked::read(index, blk, true);
            let page = b.page();
            if pg_sys::PageIsNew(page) || link_special(page).is_some_and(|s| s.magic == FREE_MAGIC)
            {
                give_back(&passed);
                return Some(b);
            }
            let dead_graph = chain_special(page).is_some_and(|s| {
                s.generation != meta.dg_generation
                    && s.generation != building
                    && s.generation != meta.dg_spare_generation
            });
            if dead_graph {
                if building != 0 {
                    return Some(b);
                }
                passed.push(blk);
            }
        }
    }
}

/// A page for new contents, exclusively locked: a free one or a new one.
///
/// # Safety
/// As for [`take_free_page`].
pub(super) unsafe fn alloc_page(index: pg_sys::Relation, meta: &Meta, building: u64) -> Locked {
    // SAFETY: forwarded.
    unsafe {
        take_free_page(index, meta, building)
            .unwrap_or_else(|| Locked::extend(index, pg_sys::ForkNumber::MAIN_FORKNUM))
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct ChainSpecial {
    pub(super) magic: u32,
    pub(super) next: u32,
    pub(super) generation: u64,
}

/// # Safety
/// `page` must be a locked page of the index.
pub(super) unsafe fn chain_special(page: pg_sys::Page) -> Option<ChainSpecial> {
    // SAFETY: forwarded.
    unsafe { special::<ChainSpecial>(page) }.filter(|s| {
        s.magic == CHAIN_MAGIC || (SEG_MAGIC..SEG_MAGIC + MAX_SEGMENTS).contains(&s.magic)
    })
}
