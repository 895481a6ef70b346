//! Where the bytes live. An index relation is:
//!
//! ```text
//! block 0                      metapage (Meta)
//! image_start .. +image_nblocks  the image (sorted heap TIDs + HNSW graph), raw bytes
//! tomb_start  .. +tomb_nblocks   tombstone bitmap: bit i set = graph entry i was vacuumed
//! (anywhere after the tombstones)
//!   delta pages                (heap TID, f32 vector) items added after the build, a chain
//!                              from the metapage's dl_head to dl_tail
//!   the delta graph            an f32 image over earlier delta items, a chain of pages (each
//!                              names the next and its generation)
//!   free pages                 in the index's free space map, reused by both
//! ```
//!
//! The delta graph (metapage version 2) keeps scans fast after many inserts: once the delta
//! holds enough items, they are moved into it ([`super::fold`]); its old pages and the delta
//! pages it absorbed go to the index's free space map and are reused by the next one.
//!
//! Build writes everything through shared buffers and WAL-logs it with `log_newpage_range`; every
//! later change (insert, vacuum) is a Generic WAL record, so crash recovery and physical
//! replicas see exactly what the primary wrote.

use crate::error::{OrReport, TtError, TtResult};
use pgrx::pg_sys;
use std::io::Write;

pub const META_BLKNO: pg_sys::BlockNumber = 0;
const META_MAGIC: u32 = 0x5454_4857; // "TTHW"
const META_VERSION: u32 = 2;
/// Metapages of version 1 (no delta graph) are read as version 2 with an empty delta graph.
const META_VERSION_1: u32 = 1;
/// Special space of a delta-graph page: magic, next block, generation.
const CHAIN_SPECIAL: usize = std::mem::size_of::<ChainSpecial>();
const CHAIN_MAGIC: u32 = 0x5454_4447; // "TTDG"
/// Pages of a chain written section by section (`twotower_ann::segment_cuts`): "TTG0" for the
/// first section's pages, "TTG1" for the second's, and so on. Each section starts on a page of
/// its own, so a page may hold less than a full payload before the next section.
const SEG_MAGIC: u32 = 0x5454_4730; // "TTG0"
const MAX_SEGMENTS: u32 = 16;
/// Raw payload bytes of a delta-graph page.
pub const CHAIN_PAYLOAD: usize = PAYLOAD - CHAIN_SPECIAL;
/// Size of the standard page header (MAXALIGN(offsetof(PageHeaderData, pd_linp))).
const PAGE_HEADER: usize = 24;
/// Raw payload bytes of an image or tombstone page.
pub const PAYLOAD: usize = pg_sys::BLCKSZ as usize - PAGE_HEADER;
/// Tombstone bits per page.
pub const TOMB_BITS: usize = PAYLOAD * 8;
/// Largest dimension whose (TID, f32 vector) delta item fits on one page.
pub const MAX_INDEX_DIMS: usize = 2000;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Meta {
    pub magic: u32,
    pub version: u32,
    pub dims: u32,
    pub metric: u32,
    pub quantization: u32,
    pub m: u32,
    pub ef_construction: u32,
    pub _pad: u32,
    /// Identifies one build of this relation's image (cache files are keyed by it).
    pub generation: u64,
    pub image_len: u64,
    pub image_checksum: u64,
    pub image_start: u32,
    pub image_nblocks: u32,
    pub tomb_start: u32,
    pub tomb_nblocks: u32,
    pub graph_count: u64,
    pub graph_dead: u64,
    pub delta_start: u32,
    pub delta_end: u32,
    pub delta_live: u64,
    pub delta_inserted: u64,
    pub delta_tail: u32,
    pub _pad2: u32,
    /// Graph items only reachable through the orphan list (ranked exactly by scans).
    pub graph_orphans: u64,
    /// Wall-clock time of the build, in milliseconds.
    pub build_millis: u64,
    // Version 2: the delta graph (all zero when there is none).
    pub dg_generation: u64,
    pub dg_len: u64,
    pub dg_checksum: u64,
    pub dg_head: u32,
    pub dg_nblocks: u32,
    /// Items in the delta graph.
    pub dg_count: u64,
    /// Times delta items were moved into a new delta graph.
    pub dg_folds: u64,
    /// The delta pages of version 2: a chain from `dl_head` to `dl_tail` (0: none; block 0 is
    /// the metapage). Version-1 indexes keep their first delta pages as the block range
    /// `delta_start..delta_end` until their first fold; new delta pages are chained.
    pub dl_head: u32,
    pub dl_tail: u32,
    /// The last page a running fold takes (0: no fold running): appends start a new page.
    pub dl_sealed: u32,
    pub _pad3: u32,
    /// Changes whenever delta pages are freed (a fold, or VACUUM unlinking emptied pages): a
    /// scan that read the metapage before compares it afterwards and reads again.
    pub dl_epoch: u64,
    /// The delta graph before the current one (0: none), kept as the place the next fold
    /// writes to: its pages take the next graph section by section, and Generic WAL logs only
    /// the bytes that differ (a fold appends items and changes a few neighbour lists; the
    /// rest of the graph stays where it was). Nothing reads it; its pages are not free.
    pub dg_spare_generation: u64,
    pub dg_spare_head: u32,
    pub dg_spare_nblocks: u32,
}

/// Where one image lives: the main image (a contiguous block range) or the delta graph (a chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRef {
    pub level: Level,
    pub generation: u64,
    pub checksum: u64,
    pub len: u64,
    pub start: u32,
    pub nblocks: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Main,
    Delta,
}

impl Meta {
    pub fn has_image(&self) -> bool {
        self.image_len > 0
    }
    pub fn main_ref(&self) -> Option<ImageRef> {
        self.has_image().then_some(ImageRef {
            level: Level::Main,
            generation: self.generation,
            checksum: self.image_checksum,
            len: self.image_len,
            start: self.image_start,
            nblocks: self.image_nblocks,
        })
    }
    pub fn delta_graph_ref(&self) -> Option<ImageRef> {
        (self.dg_len > 0).then_some(ImageRef {
            level: Level::Delta,
            generation: self.dg_generation,
            checksum: self.dg_checksum,
            len: self.dg_len,
            start: self.dg_head,
            nblocks: self.dg_nblocks,
        })
    }
    /// The previous delta graph's chain, kept for the next fold to write over.
    pub fn spare_ref(&self) -> Option<ImageRef> {
        (self.dg_spare_generation != 0 && self.dg_spare_nblocks > 0).then_some(ImageRef {
            level: Level::Delta,
            generation: self.dg_spare_generation,
            checksum: 0,
            len: 0,
            start: self.dg_spare_head,
            nblocks: self.dg_spare_nblocks,
        })
    }
    /// The first block after the build's fixed area (image and tombstones).
    pub fn first_free_area_block(&self) -> u32 {
        self.tomb_start + self.tomb_nblocks
    }
}

/// A pinned and locked buffer, unlocked and released on drop.
pub struct Locked {
    pub buf: pg_sys::Buffer,
}

impl Locked {
    /// Reads and locks block `blkno` of the main fork.
    ///
    /// # Safety
    /// `index` must be an open relation.
    pub unsafe fn read(
        index: pg_sys::Relation,
        blkno: pg_sys::BlockNumber,
        exclusive: bool,
    ) -> Locked {
        // SAFETY: caller guarantees an open relation; ReadBufferExtended errors on a bad block.
        unsafe {
            let buf = pg_sys::ReadBufferExtended(
                index,
                pg_sys::ForkNumber::MAIN_FORKNUM,
                blkno,
                pg_sys::ReadBufferMode::RBM_NORMAL,
                std::ptr::null_mut(),
            );
            pg_sys::LockBuffer(
                buf,
                if exclusive {
                    pg_sys::BUFFER_LOCK_EXCLUSIVE
                } else {
                    pg_sys::BUFFER_LOCK_SHARE
                } as i32,
            );
            Locked { buf }
        }
    }

    /// Extends `fork` by one zeroed page and locks it exclusively.
    ///
    /// # Safety
    /// `index` must be an open relation.
    pub unsafe fn extend(index: pg_sys::Relation, fork: pg_sys::ForkNumber::Type) -> Locked {
        // SAFETY: the relation extension lock serialises concurrent extenders.
        unsafe {
            pg_sys::LockRelationForExtension(index, pg_sys::ExclusiveLock as i32);
            let buf = pg_sys::ReadBufferExtended(
                index,
                fork,
                pg_sys::InvalidBlockNumber,
                pg_sys::ReadBufferMode::RBM_NORMAL,
                std::ptr::null_mut(),
            );
            pg_sys::LockBuffer(buf, pg_sys::BUFFER_LOCK_EXCLUSIVE as i32);
            pg_sys::UnlockRelationForExtension(index, pg_sys::ExclusiveLock as i32);
            Locked { buf }
        }
    }

    pub fn page(&self) -> pg_sys::Page {
        // SAFETY: the buffer is pinned for our lifetime.
        unsafe { pg_sys::BufferGetPage(self.buf) }
    }

    pub fn blkno(&self) -> pg_sys::BlockNumber {
        // SAFETY: the buffer is pinned.
        unsafe { pg_sys::BufferGetBlockNumber(self.buf) }
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        // During an ERROR the resource owner releases buffers itself; only release on normal paths.
        if !std::thread::panicking() {
            // SAFETY: we hold a pin and a lock on `buf`.
            unsafe { pg_sys::UnlockReleaseBuffer(self.buf) };
        }
    }
}

/// Pointer to the contents area of a page.
fn contents(page: pg_sys::Page) -> *mut u8 {
    // SAFETY: every page has a PAGE_HEADER-byte header followed by the contents area.
    unsafe { (page as *mut u8).add(PAGE_HEADER) }
}

/// Initialises `page` to hold `data` (at most PAYLOAD bytes) as raw contents, with pd_lower
/// covering the data so full-page images and Generic WAL never treat it as a hole.
///
/// # Safety
/// `page` must point to a writable page buffer of BLCKSZ bytes.
unsafe fn init_raw_page(page: pg_sys::Page, data: &[u8]) {
    debug_assert!(data.len() <= PAYLOAD);
    // SAFETY: caller guarantees a writable BLCKSZ page.
    unsafe {
        pg_sys::PageInit(page, pg_sys::BLCKSZ as usize, 0);
        std::ptr::copy_nonoverlapping(data.as_ptr(), contents(page), data.len());
        (*(page as *mut pg_sys::PageHeaderData)).pd_lower = (PAGE_HEADER + data.len()) as u16;
    }
}

/// Re-initialises `page` (a page registered with Generic WAL *without* a full image) with
/// `special` bytes of special space, keeping its LSN: Generic WAL copies the whole new page,
/// header included, into the buffer before it inserts the record, and a page whose LSN reads 0
/// there is taken for one not changed since the last checkpoint, so the record would carry a
/// full-page image instead of the difference.
///
/// # Safety
/// `page` must point to a writable page buffer of BLCKSZ bytes holding a valid page header.
unsafe fn reinit_page(page: pg_sys::Page, special: usize) {
    // SAFETY: caller guarantees a writable BLCKSZ page with a header.
    unsafe {
        let h = page as *mut pg_sys::PageHeaderData;
        let lsn = (*h).pd_lsn;
        pg_sys::PageInit(page, pg_sys::BLCKSZ as usize, special);
        (*h).pd_lsn = lsn;
    }
}

/// Reads the metapage.
///
/// # Safety
/// `index` must be an open twotower_hnsw index.
pub unsafe fn read_meta(index: pg_sys::Relation) -> TtResult<Meta> {
    // SAFETY: block 0 always exists in a built index.
    let b = unsafe { Locked::read(index, META_BLKNO, false) };
    // SAFETY: the metapage contents hold a Meta written by write_meta_page.
    let m = unsafe { std::ptr::read_unaligned(contents(b.page()) as *const Meta) };
    if m.magic != META_MAGIC || (m.version != META_VERSION && m.version != META_VERSION_1) {
        return Err(TtError::IndexCorrupt(format!(
            "metapage has magic {:#x} version {}, expected {META_MAGIC:#x} version {META_VERSION}",
            m.magic, m.version
        )));
    }
    Ok(m)
}

fn meta_bytes(m: &Meta) -> &[u8] {
    // SAFETY: Meta is repr(C) plain old data.
    unsafe {
        std::slice::from_raw_parts(m as *const Meta as *const u8, std::mem::size_of::<Meta>())
    }
}

/// Writes `m` into the metapage `page` (a registered Generic WAL page), with `pd_lower` covering
/// all of it: a version-1 metapage was shorter, and bytes past `pd_lower` are not WAL-logged.
///
/// # Safety
/// `page` must be the metapage, writable.
pub unsafe fn put_meta(page: pg_sys::Page, m: &Meta) {
    // SAFETY: the metapage's contents area holds a Meta; the header is the standard one.
    unsafe {
        std::ptr::write_unaligned(contents(page) as *mut Meta, *m);
        let h = page as *mut pg_sys::PageHeaderData;
        let need = (PAGE_HEADER + std::mem::size_of::<Meta>()) as u16;
        if (*h).pd_lower < need {
            (*h).pd_lower = need;
        }
    }
}

/// The metapage as it is in `page`.
///
/// # Safety
/// `page` must be the metapage.
pub unsafe fn get_meta(page: pg_sys::Page) -> Meta {
    // SAFETY: as above.
    unsafe { std::ptr::read_unaligned(contents(page) as *const Meta) }
}

/// Writes a fresh index: metapage, image pages and zeroed tombstone pages, into `fork`, then
/// WAL-logs all of them. `meta` is completed here (block ranges, magic).
///
/// # Safety
/// `index` must be an open, empty index relation.
pub unsafe fn write_new_index(
    index: pg_sys::Relation,
    fork: pg_sys::ForkNumber::Type,
    meta: &mut Meta,
    image: &[u8],
) {
    meta.magic = META_MAGIC;
    meta.version = META_VERSION;
    meta.image_len = image.len() as u64;
    meta.image_start = 1;
    meta.image_nblocks = image.len().div_ceil(PAYLOAD) as u32;
    meta.tomb_start = meta.image_start + meta.image_nblocks;
    meta.tomb_nblocks = (meta.graph_count as usize).div_ceil(TOMB_BITS) as u32;
    meta.delta_start = meta.tomb_start + meta.tomb_nblocks;
    meta.delta_end = meta.delta_start;
    meta.delta_tail = pg_sys::InvalidBlockNumber;

    // SAFETY: the relation is new and ours; each page is written under its exclusive lock.
    unsafe {
        let write = |data: &[u8]| {
            let b = Locked::extend(index, fork);
            init_raw_page(b.page(), data);
            pg_sys::MarkBufferDirty(b.buf);
        };
        write(meta_bytes(meta));
        for (i, chunk) in image.chunks(PAYLOAD).enumerate() {
            if i % 1024 == 0 {
                pgrx::check_for_interrupts!();
            }
            write(chunk);
        }
        let zero = vec![0u8; PAYLOAD];
        for _ in 0..meta.tomb_nblocks {
            write(&zero);
        }
        let nblocks = pg_sys::RelationGetNumberOfBlocksInFork(index, fork);
        debug_assert_eq!(nblocks, meta.delta_start);
        if fork == pg_sys::ForkNumber::INIT_FORKNUM
            || (*(*index).rd_rel).relpersistence
                == pg_sys::RELPERSISTENCE_PERMANENT as core::ffi::c_char
        {
            pg_sys::log_newpage_range(index, fork, 0, nblocks, true);
        }
    }
}

/// Records the build's duration in the metapage of a freshly built index (WAL-logged).
///
/// # Safety
/// `index` must be an open twotower_hnsw index.
pub unsafe fn set_build_stats(index: pg_sys::Relation, build_millis: u64) {
    // SAFETY: block 0 is the metapage; changed under its exclusive lock with one WAL record.
    unsafe {
        let b = Locked::read(index, META_BLKNO, true);
        let state = pg_sys::GenericXLogStart(index);
        let page = pg_sys::GenericXLogRegisterBuffer(state, b.buf, 0);
        let mut m = get_meta(page);
        m.build_millis = build_millis;
        put_meta(page, &m);
        pg_sys::GenericXLogFinish(state);
    }
}

/// Streams the image bytes from the pages into `out`.
///
/// # Safety
/// `index` must be an open twotower_hnsw index and `meta` its current metapage.
pub unsafe fn read_image_into(
    index: pg_sys::Relation,
    meta: &Meta,
    out: &mut dyn Write,
) -> TtResult<()> {
    let mut remaining = meta.image_len as usize;
    for i in 0..meta.image_nblocks {
        if i % 1024 == 0 {
            pgrx::check_for_interrupts!();
        }
        // SAFETY: image blocks were written by write_new_index.
        let b = unsafe { Locked::read(index, meta.image_start + i, false) };
        let n = remaining.min(PAYLOAD);
        // SAFETY: the page holds at least `n` payload bytes (pd_lower checked below).
        let lower = unsafe { (*(b.page() as *const pg_sys::PageHeaderData)).pd_lower } as usize;
        if lower != PAGE_HEADER + n {
            return Err(TtError::IndexCorrupt(format!(
                "image block {} holds {} bytes, expected {n}",
                meta.image_start + i,
                lower.saturating_sub(PAGE_HEADER)
            )));
        }
        // SAFETY: as above.
        let data = unsafe { std::slice::from_raw_parts(contents(b.page()), n) };
        out.write_all(data)
            .map_err(|e| TtError::CacheIo(e.to_string()))?;
        remaining -= n;
    }
    if remaining != 0 {
        return Err(TtError::IndexCorrupt(
            "image is shorter than the metapage says".into(),
        ));
    }
    Ok(())
}

/// Reads the tombstone bitmap (one bit per graph position).
///
/// # Safety
/// As for [`read_image_into`].
pub unsafe fn read_tombstones(index: pg_sys::Relation, meta: &Meta) -> Vec<u8> {
    let mut bits = Vec::with_capacity(meta.tomb_nblocks as usize * PAYLOAD);
    for i in 0..meta.tomb_nblocks {
        // SAFETY: tombstone blocks were written by write_new_index.
        let b = unsafe { Locked::read(index, meta.tomb_start + i, false) };
        // SAFETY: tombstone pages hold PAYLOAD bytes.
        bits.extend_from_slice(unsafe { std::slice::from_raw_parts(contents(b.page()), PAYLOAD) });
    }
    bits
}

pub fn bit_is_set(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Sets tombstone bits for graph positions `positions` (ascending). Each tombstone page and the
/// metapage's dead count change in one Generic WAL record, so a crash never separates them.
/// Returns how many bits were newly set.
///
/// # Safety
/// As for [`read_image_into`].
pub unsafe fn set_tombstones(index: pg_sys::Relation, meta: &Meta, positions: &[usize]) -> u64 {
    let mut i = 0;
    let mut newly = 0u64;
    while i < positions.len() {
        let page_no = positions[i] / TOMB_BITS;
        // SAFETY: page_no < tomb_nblocks because positions < graph_count; lock order is
        // metapage first, as everywhere else.
        unsafe {
            pgrx::check_for_interrupts!();
            let mb = Locked::read(index, META_BLKNO, true);
            let b = Locked::read(index, meta.tomb_start + page_no as u32, true);
            let state = pg_sys::GenericXLogStart(index);
            let page = pg_sys::GenericXLogRegisterBuffer(state, b.buf, 0);
            let mpage = pg_sys::GenericXLogRegisterBuffer(state, mb.buf, 0);
            let data = contents(page);
            let mut here = 0u64;
            while i < positions.len() && positions[i] / TOMB_BITS == page_no {
                let bit = positions[i] % TOMB_BITS;
                let byte = data.add(bit / 8);
                if *byte & (1 << (bit % 8)) == 0 {
                    *byte |= 1 << (bit % 8);
                    here += 1;
                }
                i += 1;
            }
            let mut m = get_meta(mpage);
            m.graph_dead += here;
            put_meta(mpage, &m);
            pg_sys::GenericXLogFinish(state);
            newly += here;
            drop(b);
            drop(mb);
        }
    }
    newly
}

/// Size of a delta item for `dims` dimensions: heap TID (6 bytes) + 2 bytes padding + floats.
pub fn delta_item_size(dims: usize) -> usize {
    8 + 4 * dims
}

fn tid_bytes(tid: &pg_sys::ItemPointerData) -> [u8; 6] {
    let mut out = [0u8; 6];
    out[0..2].copy_from_slice(&tid.ip_blkid.bi_hi.to_ne_bytes());
    out[2..4].copy_from_slice(&tid.ip_blkid.bi_lo.to_ne_bytes());
    out[4..6].copy_from_slice(&tid.ip_posid.to_ne_bytes());
    out
}

/// Heap TID <-> the u64 key used inside the graph: block << 16 | offset.
pub fn tid_to_key(tid: &pg_sys::ItemPointerData) -> u64 {
    let blk = ((tid.ip_blkid.bi_hi as u64) << 16) | tid.ip_blkid.bi_lo as u64;
    (blk << 16) | tid.ip_posid as u64
}

pub fn key_to_tid(key: u64) -> pg_sys::ItemPointerData {
    let blk = (key >> 16) as u32;
    pg_sys::ItemPointerData {
        ip_blkid: pg_sys::BlockIdData {
            bi_hi: (blk >> 16) as u16,
            bi_lo: (blk & 0xffff) as u16,
        },
        ip_posid: (key & 0xffff) as u16,
    }
}

// ---------------------------------------------------------------------------------------------
// Page kinds. Delta pages of version 1 have no special space; every later page has one that
// names its kind, so a page taken from the free space map can be checked before reuse.

const DELTA_MAGIC: u32 = 0x5454_444C; // "TTDL"
const FREE_MAGIC: u32 = 0x5454_4652; // "TTFR"
/// Special space of a delta page (and of a freed one): magic, next block (0: none).
const LINK_SPECIAL: usize = std::mem::size_of::<LinkSpecial>();

#[repr(C)]
#[derive(Clone, Copy)]
struct LinkSpecial {
    magic: u32,
    next: u32,
}

/// The special space of `page` as a `T`, when it has exactly `T`'s size.
///
/// # Safety
/// `page` must be a locked page of the index; `T` plain old data.
unsafe fn special<T: Copy>(page: pg_sys::Page) -> Option<T> {
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
unsafe fn link_special(page: pg_sys::Page) -> Option<LinkSpecial> {
    // SAFETY: forwarded.
    unsafe { special(page) }
}

/// # Safety
/// `page` must be an exclusively locked (registered) page with a link special space.
unsafe fn set_link(page: pg_sys::Page, magic: u32, next: u32) {
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
unsafe fn is_delta_page(page: pg_sys::Page) -> bool {
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
unsafe fn add_item(page: pg_sys::Page, item: &[u8]) -> bool {
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
/// is free (the map is not crash-safe, so each offer is checked under the page's lock): new,
/// marked free, or a delta graph page of neither the current generation nor `building`.
///
/// # Safety
/// `index` must be an open twotower_hnsw index and `meta` its current metapage.
unsafe fn take_free_page(index: pg_sys::Relation, meta: &Meta, building: u64) -> Option<Locked> {
    // SAFETY: forwarded; pages are checked under their exclusive lock before reuse.
    unsafe {
        let nblocks =
            pg_sys::RelationGetNumberOfBlocksInFork(index, pg_sys::ForkNumber::MAIN_FORKNUM);
        loop {
            let blk = pg_sys::GetFreeIndexPage(index);
            if blk == pg_sys::InvalidBlockNumber {
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
            let free = pg_sys::PageIsNew(page)
                || link_special(page).is_some_and(|s| s.magic == FREE_MAGIC)
                || chain_special(page).is_some_and(|s| {
                    s.generation != meta.dg_generation
                        && s.generation != building
                        && s.generation != meta.dg_spare_generation
                });
            if free {
                return Some(b);
            }
        }
    }
}

/// A page for new contents, exclusively locked: a free one or a new one.
///
/// # Safety
/// As for [`take_free_page`].
unsafe fn alloc_page(index: pg_sys::Relation, meta: &Meta, building: u64) -> Locked {
    // SAFETY: forwarded.
    unsafe {
        take_free_page(index, meta, building)
            .unwrap_or_else(|| Locked::extend(index, pg_sys::ForkNumber::MAIN_FORKNUM))
    }
}

/// Appends one (TID, vector) item to the delta: to the tail page while it has room, otherwise
/// to a free or new page linked after it. The metapage lock serialises appenders; the item, the
/// link and the metapage change are one WAL record. Returns the metapage as the append left it.
///
/// # Safety
/// `index` must be an open twotower_hnsw index; `vector` must already be validated against
/// the index dimension.
pub unsafe fn append_delta(
    index: pg_sys::Relation,
    tid: &pg_sys::ItemPointerData,
    vector: &[f32],
) -> Meta {
    let mut item = Vec::with_capacity(delta_item_size(vector.len()));
    item.extend_from_slice(&tid_bytes(tid));
    item.extend_from_slice(&[0, 0]);
    for x in vector {
        item.extend_from_slice(&x.to_ne_bytes());
    }
    // SAFETY: lock order is always metapage, then delta pages (tail, then a new one).
    unsafe {
        let meta_buf = Locked::read(index, META_BLKNO, true);
        let m = get_meta(meta_buf.page());
        if m.dims != 0 && m.dims as usize != vector.len() {
            TtError::Ann(twotower_ann::AnnError::DimensionMismatch {
                expected: m.dims as usize,
                got: vector.len(),
            })
            .report();
        }
        let fits = |b: &Locked| pg_sys::PageGetFreeSpace(b.page()) >= item.len() + 8;
        let finish = |state: *mut pg_sys::GenericXLogState, f: &dyn Fn(&mut Meta)| {
            let mpage = pg_sys::GenericXLogRegisterBuffer(state, meta_buf.buf, 0);
            let mut nm = get_meta(mpage);
            nm.delta_live += 1;
            nm.delta_inserted += 1;
            if nm.dims == 0 {
                nm.dims = vector.len() as u32;
            }
            f(&mut nm);
            put_meta(mpage, &nm);
            pg_sys::GenericXLogFinish(state);
            nm
        };
        // Adds the item to an existing page, with the metapage, in one record.
        let add_to = |b: &Locked| {
            let state = pg_sys::GenericXLogStart(index);
            let page = pg_sys::GenericXLogRegisterBuffer(state, b.buf, 0);
            if !add_item(page, &item) {
                pg_sys::GenericXLogAbort(state);
                TtError::IndexCorrupt(format!("could not add a delta item to block {}", b.blkno()))
                    .report();
            }
            finish(state, &|_| {})
        };
        // A version-1 delta range takes items while its last page has room.
        if m.delta_tail != pg_sys::InvalidBlockNumber && m.delta_tail != 0 && m.dl_sealed == 0 {
            let b = Locked::read(index, m.delta_tail, true);
            if fits(&b) {
                return add_to(&b);
            }
        }
        let tail = (m.dl_tail != 0).then(|| Locked::read(index, m.dl_tail, true));
        if let Some(t) = &tail {
            if m.dl_tail != m.dl_sealed && fits(t) {
                return add_to(t);
            }
        }
        let b = alloc_page(index, &m, 0);
        let blkno = b.blkno();
        let state = pg_sys::GenericXLogStart(index);
        let page =
            pg_sys::GenericXLogRegisterBuffer(state, b.buf, pg_sys::GENERIC_XLOG_FULL_IMAGE as i32);
        pg_sys::PageInit(page, pg_sys::BLCKSZ as usize, LINK_SPECIAL);
        set_link(page, DELTA_MAGIC, 0);
        if !add_item(page, &item) {
            pg_sys::GenericXLogAbort(state);
            TtError::IndexCorrupt(format!("could not add a delta item to new block {blkno}"))
                .report();
        }
        if let Some(t) = &tail {
            let tpage = pg_sys::GenericXLogRegisterBuffer(state, t.buf, 0);
            set_link(tpage, DELTA_MAGIC, blkno);
        }
        let nm = finish(state, &|nm: &mut Meta| {
            if nm.dl_head == 0 {
                nm.dl_head = blkno;
            }
            nm.dl_tail = blkno;
        });
        drop(b);
        drop(tail);
        drop(meta_buf);
        nm
    }
}

/// Calls `f(block, tid, vector)` for every delta item: the version-1 range, then the chain
/// (up to and including `upto` when given), and adds every delta page it reads, empty ones
/// too, to `pages` when given (what a fold absorbs). Returns false when the chain led to a
/// page that is no delta page (the caller's metapage is outdated, or the index is corrupt).
///
/// # Safety
/// As for [`read_image_into`].
pub unsafe fn for_each_delta(
    index: pg_sys::Relation,
    meta: &Meta,
    upto: Option<pg_sys::BlockNumber>,
    mut pages: Option<&mut Vec<pg_sys::BlockNumber>>,
    mut f: impl FnMut(pg_sys::BlockNumber, pg_sys::ItemPointerData, &[f32]),
) -> bool {
    let dims = meta.dims as usize;
    let mut visit = |blk: pg_sys::BlockNumber, chained: bool| -> Option<u32> {
        // SAFETY: forwarded; each page is read under its share lock, items within its bounds.
        unsafe {
            let b = Locked::read(index, blk, false);
            let page = b.page();
            if !is_delta_page(page) {
                return if chained { None } else { Some(0) };
            }
            if let Some(p) = pages.as_mut() {
                p.push(blk);
            }
            let max = pg_sys::PageGetMaxOffsetNumber(page);
            for off in 1..=max {
                let iid = pg_sys::PageGetItemId(page, off);
                if (*iid).lp_flags() != pg_sys::LP_NORMAL {
                    continue;
                }
                let p = pg_sys::PageGetItem(page, iid) as *const u8;
                let tid = read_tid(p);
                let v = std::slice::from_raw_parts(p.add(8) as *const f32, dims);
                f(blk, tid, v);
            }
            Some(link_special(page).map_or(0, |s| s.next))
        }
    };
    for blk in meta.delta_start..meta.delta_end {
        visit(blk, false);
    }
    // SAFETY: an open relation.
    let nblocks =
        unsafe { pg_sys::RelationGetNumberOfBlocksInFork(index, pg_sys::ForkNumber::MAIN_FORKNUM) };
    let (mut blk, mut steps) = (meta.dl_head, 0u32);
    while blk != 0 {
        if blk >= nblocks || steps > nblocks {
            return false;
        }
        steps += 1;
        match visit(blk, true) {
            None => return false,
            Some(next) => {
                if upto == Some(blk) {
                    break;
                }
                blk = next;
            }
        }
    }
    true
}

unsafe fn read_tid(p: *const u8) -> pg_sys::ItemPointerData {
    // SAFETY: delta items start with the 6 TID bytes written by append_delta.
    let b = unsafe { std::slice::from_raw_parts(p, 6) };
    pg_sys::ItemPointerData {
        ip_blkid: pg_sys::BlockIdData {
            bi_hi: u16::from_ne_bytes([b[0], b[1]]),
            bi_lo: u16::from_ne_bytes([b[2], b[3]]),
        },
        ip_posid: u16::from_ne_bytes([b[4], b[5]]),
    }
}

/// Removes delta items whose TID `dead` says are gone; returns (removed, kept). Each page's
/// deletions and the metapage's live count change in one Generic WAL record. Afterwards the
/// pages left empty at the front of the chain (and of a version-1 range) are unlinked and
/// freed: after many deletes the scans stay as fast as the live delta.
///
/// # Safety
/// As for [`read_image_into`]; the caller holds the maintenance lock ([`lock_maintenance`]).
pub unsafe fn vacuum_delta(
    index: pg_sys::Relation,
    meta: &Meta,
    mut dead: impl FnMut(&mut pg_sys::ItemPointerData) -> bool,
) -> (u64, u64) {
    let (mut removed, mut kept) = (0u64, 0u64);
    // Every delta page, in order, and whether it kept live items.
    let mut pages: Vec<(pg_sys::BlockNumber, bool)> = Vec::new();
    let mut blocks: Vec<pg_sys::BlockNumber> = (meta.delta_start..meta.delta_end).collect();
    let legacy = blocks.len();
    let mut blk = meta.dl_head;
    // SAFETY: an open relation.
    let nblocks =
        unsafe { pg_sys::RelationGetNumberOfBlocksInFork(index, pg_sys::ForkNumber::MAIN_FORKNUM) };
    let mut i = 0;
    while i < blocks.len() || blk != 0 {
        let b_no = if i < blocks.len() {
            blocks[i]
        } else {
            if blk >= nblocks || blocks.len() > nblocks as usize {
                break;
            }
            blocks.push(blk);
            blk
        };
        i += 1;
        // SAFETY: lock order metapage, then the delta page, as in append_delta.
        unsafe {
            pg_sys::vacuum_delay_point();
            let mb = Locked::read(index, META_BLKNO, true);
            let b = Locked::read(index, b_no, true);
            let page = b.page();
            if i > legacy {
                blk = link_special(page).map_or(0, |s| s.next);
            }
            if !is_delta_page(page) {
                if i > legacy {
                    break;
                }
                continue;
            }
            let max = pg_sys::PageGetMaxOffsetNumber(page);
            let mut gone: Vec<pg_sys::OffsetNumber> = Vec::new();
            let mut live_here = false;
            for off in 1..=max {
                let iid = pg_sys::PageGetItemId(page, off);
                if (*iid).lp_flags() != pg_sys::LP_NORMAL {
                    continue;
                }
                let mut tid = read_tid(pg_sys::PageGetItem(page, iid) as *const u8);
                if dead(&mut tid) {
                    gone.push(off);
                } else {
                    kept += 1;
                    live_here = true;
                }
            }
            pages.push((b_no, live_here));
            if !gone.is_empty() {
                let state = pg_sys::GenericXLogStart(index);
                let p = pg_sys::GenericXLogRegisterBuffer(state, b.buf, 0);
                let mpage = pg_sys::GenericXLogRegisterBuffer(state, mb.buf, 0);
                pg_sys::PageIndexMultiDelete(p, gone.as_mut_ptr(), gone.len() as i32);
                let mut m = get_meta(mpage);
                m.delta_live = m.delta_live.saturating_sub(gone.len() as u64);
                put_meta(mpage, &m);
                pg_sys::GenericXLogFinish(state);
                removed += gone.len() as u64;
            }
            drop(b);
            drop(mb);
        }
    }
    // Unlink the emptied pages at the front. Appends only add to the chain's tail (kept) and
    // to a version-1 range's last page, so pages found empty above are still empty.
    // SAFETY: the metapage is locked exclusively for the read-modify-write, WAL-logged.
    let freed = unsafe {
        let mb = Locked::read(index, META_BLKNO, true);
        let m = get_meta(mb.page());
        let mut nm = m;
        let mut freed = Vec::new();
        let legacy_pages: Vec<_> = pages
            .iter()
            .filter(|(b, _)| (m.delta_start..m.delta_end).contains(b))
            .collect();
        let legacy_last = if m.delta_tail != pg_sys::InvalidBlockNumber && m.delta_tail != 0 {
            m.delta_tail
        } else {
            m.delta_end
        };
        for (b, live) in legacy_pages {
            if *live || *b >= legacy_last {
                break;
            }
            freed.push(*b);
            nm.delta_start = *b + 1;
        }
        if nm.delta_start >= nm.delta_end {
            nm.delta_start = nm.delta_end;
            nm.delta_tail = pg_sys::InvalidBlockNumber;
        }
        for (b, live) in pages
            .iter()
            .filter(|(b, _)| !(m.delta_start..m.delta_end).contains(b))
        {
            if *live || *b == m.dl_tail || *b != nm.dl_head {
                break;
            }
            let next = {
                let pb = Locked::read(index, *b, false);
                link_special(pb.page()).map_or(0, |s| s.next)
            };
            freed.push(*b);
            nm.dl_head = next;
        }
        if !freed.is_empty() {
            nm.dl_epoch += 1;
            let state = pg_sys::GenericXLogStart(index);
            let mpage = pg_sys::GenericXLogRegisterBuffer(state, mb.buf, 0);
            put_meta(mpage, &nm);
            pg_sys::GenericXLogFinish(state);
        }
        drop(mb);
        freed
    };
    // SAFETY: the pages are out of every list the metapage names.
    unsafe { free_delta_pages(index, &freed) };
    (removed, kept)
}

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

// ---------------------------------------------------------------------------------------------
// Delta-graph pages: a chain, allocated from the free space map.

#[repr(C)]
#[derive(Clone, Copy)]
struct ChainSpecial {
    magic: u32,
    next: u32,
    generation: u64,
}

/// # Safety
/// `page` must be a locked page of the index.
unsafe fn chain_special(page: pg_sys::Page) -> Option<ChainSpecial> {
    // SAFETY: forwarded.
    unsafe { special::<ChainSpecial>(page) }.filter(|s| {
        s.magic == CHAIN_MAGIC || (SEG_MAGIC..SEG_MAGIC + MAX_SEGMENTS).contains(&s.magic)
    })
}

/// Records `blocks` as free in the index's free space map and makes them findable.
///
/// # Safety
/// `index` must be an open relation; no list of the current metapage may name the blocks.
pub unsafe fn free_pages(index: pg_sys::Relation, blocks: &[pg_sys::BlockNumber]) {
    if blocks.is_empty() {
        return;
    }
    // SAFETY: forwarded.
    unsafe {
        for &b in blocks {
            pg_sys::RecordFreeIndexPage(index, b);
        }
        pg_sys::IndexFreeSpaceMapVacuum(index);
    }
}

/// Marks delta pages free (WAL-logged: a free page is recognisable as such, whatever the free
/// space map says after a crash) and records them in the free space map.
///
/// # Safety
/// As for [`free_pages`].
pub unsafe fn free_delta_pages(index: pg_sys::Relation, blocks: &[pg_sys::BlockNumber]) {
    for (i, &blk) in blocks.iter().enumerate() {
        if i % 256 == 0 {
            pgrx::check_for_interrupts!();
        }
        // SAFETY: a page no list names any more, rewritten under its exclusive lock.
        unsafe {
            let b = Locked::read(index, blk, true);
            let state = pg_sys::GenericXLogStart(index);
            let page = pg_sys::GenericXLogRegisterBuffer(state, b.buf, 0);
            reinit_page(page, LINK_SPECIAL);
            set_link(page, FREE_MAGIC, 0);
            pg_sys::GenericXLogFinish(state);
        }
    }
    // SAFETY: forwarded.
    unsafe { free_pages(index, blocks) };
}

/// Retires a main image every entry of which is dead (VACUUM after the whole table was deleted
/// or replaced): the metapage stops naming it and its tombstones, and their pages are marked
/// free for the delta and the delta graph to reuse, so the space of the dead graph comes back
/// without a REINDEX and scans no longer walk through it. The metapage change bumps `dl_epoch`:
/// a scan that read the old metapage and finds those pages reused reads it again. Returns the
/// blocks freed (none when the image is gone or still has a live entry).
///
/// # Safety
/// As for [`read_image_into`]; the caller holds the maintenance lock.
pub unsafe fn retire_dead_main(index: pg_sys::Relation) -> usize {
    // SAFETY: the metapage changes under its exclusive lock in one Generic WAL record; the
    // pages it stopped naming are then marked free with interrupts held off (an interrupt in
    // between would leave them unusable until a REINDEX).
    unsafe {
        let blocks: Vec<pg_sys::BlockNumber> = {
            let mb = Locked::read(index, META_BLKNO, true);
            let m = get_meta(mb.page());
            if !m.has_image() || m.graph_count == 0 || m.graph_dead < m.graph_count {
                return 0;
            }
            let state = pg_sys::GenericXLogStart(index);
            let mpage = pg_sys::GenericXLogRegisterBuffer(state, mb.buf, 0);
            let mut m = get_meta(mpage);
            let blocks = (m.image_start..m.tomb_start + m.tomb_nblocks).collect();
            m.image_len = 0;
            m.image_checksum = 0;
            m.image_start = 1;
            m.image_nblocks = 0;
            m.tomb_start = 1;
            m.tomb_nblocks = 0;
            m.graph_count = 0;
            m.graph_dead = 0;
            m.graph_orphans = 0;
            m.dl_epoch += 1;
            put_meta(mpage, &m);
            pg_sys::GenericXLogFinish(state);
            blocks
        };
        pg_sys::InterruptHoldoffCount += 1;
        free_delta_pages(index, &blocks);
        pg_sys::InterruptHoldoffCount -= 1;
        blocks.len()
    }
}

/// Writes `image` as a chain of pages of generation `generation`, section by section (each
/// section, as `cuts` divides the image, starts on a page of its own), last page first (so each
/// page is written whole, with the block of the one after it, as soon as it is taken); returns
/// its blocks in order, and the blocks of `over` it did not take.
///
/// With `over` (the spare chain: the delta graph before the current one), page i of section s
/// goes to the block that held page i of section s there, and is WAL-logged as its difference
/// from what that block held: for a graph extended by a fold, little more than the appended
/// items and the changed neighbour lists. Other pages go to free or new blocks, logged whole.
/// Nothing refers to the chain until the metapage does.
///
/// # Safety
/// As for [`read_image_into`]; the caller holds the maintenance lock.
pub unsafe fn write_chain(
    index: pg_sys::Relation,
    generation: u64,
    image: &[u8],
    cuts: &[usize],
    over: Option<&ImageRef>,
) -> (Vec<pg_sys::BlockNumber>, Vec<pg_sys::BlockNumber>) {
    // (section, bytes) of each page, in chain order.
    let mut pieces: Vec<(u32, &[u8])> = Vec::new();
    let mut bounds: Vec<usize> = vec![0];
    bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < image.len()));
    bounds.push(image.len());
    bounds.dedup();
    let segmented = bounds.len() > 2 && bounds.len() - 1 <= MAX_SEGMENTS as usize;
    if segmented {
        for (s, w) in bounds.windows(2).enumerate() {
            for chunk in image[w[0]..w[1]].chunks(CHAIN_PAYLOAD) {
                pieces.push((s as u32, chunk));
            }
        }
    } else {
        pieces.extend(image.chunks(CHAIN_PAYLOAD).map(|c| (u32::MAX, c)));
    }
    // The spare chain's blocks by (section, position), and the rest (pages of an unsectioned
    // chain) as a pool.
    let mut by_section: Vec<Vec<pg_sys::BlockNumber>> = vec![Vec::new(); MAX_SEGMENTS as usize];
    let mut pool: Vec<pg_sys::BlockNumber> = Vec::new();
    if let Some(r) = over {
        // SAFETY: forwarded.
        for (blk, magic) in unsafe { chain_pages(index, r) } {
            match magic.checked_sub(SEG_MAGIC) {
                Some(s) if s < MAX_SEGMENTS => by_section[s as usize].push(blk),
                _ => pool.push(blk),
            }
        }
    }
    let mut next_index: Vec<usize> = vec![0; MAX_SEGMENTS as usize];
    // Which spare block each page takes (None: a free or new one).
    let mut target: Vec<Option<pg_sys::BlockNumber>> = Vec::with_capacity(pieces.len());
    for &(s, _) in &pieces {
        let t = if s == u32::MAX {
            None
        } else {
            let i = next_index[s as usize];
            next_index[s as usize] += 1;
            by_section[s as usize].get(i).copied()
        };
        target.push(t);
    }
    let mut unused: Vec<pg_sys::BlockNumber> = by_section
        .iter()
        .zip(&next_index)
        .flat_map(|(v, &n)| v.iter().skip(n).copied())
        .collect();
    // Pages without a place of their own take the spare's unused blocks first.
    unused.append(&mut pool);
    for t in target.iter_mut() {
        if t.is_none() {
            *t = unused.pop();
        }
    }
    // SAFETY: forwarded.
    let meta = unsafe { read_meta(index) }.or_report();
    let spare_generation = over.map(|r| r.generation);
    let mut blocks = Vec::with_capacity(pieces.len());
    let mut next = pg_sys::InvalidBlockNumber;
    let mut reused_count = 0usize;
    for (i, &(s, chunk)) in pieces.iter().enumerate().rev() {
        if i % 256 == 0 {
            pgrx::check_for_interrupts!();
        }
        // SAFETY: the page is ours: a block of the spare chain (exclusively locked, checked to
        // still be one of its pages) or a free or new one; written whole in one Generic WAL
        // record (as a difference from its old contents when it was the spare's).
        unsafe {
            let reused = target[i].and_then(|blk| {
                let b = Locked::read(index, blk, true);
                let ours =
                    chain_special(b.page()).is_some_and(|c| Some(c.generation) == spare_generation);
                ours.then_some(b)
            });
            let diff = reused.is_some();
            reused_count += usize::from(diff);
            let b = reused.unwrap_or_else(|| alloc_page(index, &meta, generation));
            let state = pg_sys::GenericXLogStart(index);
            let page = pg_sys::GenericXLogRegisterBuffer(
                state,
                b.buf,
                if diff {
                    0
                } else {
                    pg_sys::GENERIC_XLOG_FULL_IMAGE as i32
                },
            );
            if diff {
                reinit_page(page, CHAIN_SPECIAL);
            } else {
                pg_sys::PageInit(page, pg_sys::BLCKSZ as usize, CHAIN_SPECIAL);
            }
            std::ptr::copy_nonoverlapping(chunk.as_ptr(), contents(page), chunk.len());
            (*(page as *mut pg_sys::PageHeaderData)).pd_lower = (PAGE_HEADER + chunk.len()) as u16;
            let sp = pg_sys::PageGetSpecialPointer(page) as *mut ChainSpecial;
            std::ptr::write_unaligned(
                sp,
                ChainSpecial {
                    magic: if s == u32::MAX {
                        CHAIN_MAGIC
                    } else {
                        SEG_MAGIC + s
                    },
                    next,
                    generation,
                },
            );
            pg_sys::GenericXLogFinish(state);
            next = b.blkno();
            blocks.push(next);
        }
    }
    blocks.reverse();
    pgrx::debug1!(
        "twotower_hnsw: wrote a chain of {} pages ({} sections), {} of them over the spare chain's pages",
        blocks.len(),
        bounds.len() - 1,
        reused_count
    );
    // Blocks given to pages are no longer unused (a spare block that failed the check above
    // was simply not written: it stays with the spare's leftovers only if still unclaimed).
    let taken: std::collections::HashSet<pg_sys::BlockNumber> = blocks.iter().copied().collect();
    unused.retain(|b| !taken.contains(b));
    (blocks, unused)
}

/// The blocks of chain `r` with each page's kind (magic), following its links while its pages
/// are its own.
///
/// # Safety
/// As for [`read_image_into`].
unsafe fn chain_pages(index: pg_sys::Relation, r: &ImageRef) -> Vec<(pg_sys::BlockNumber, u32)> {
    let mut out = Vec::with_capacity(r.nblocks as usize);
    let mut blk = r.start;
    while blk != pg_sys::InvalidBlockNumber && out.len() < r.nblocks as usize {
        // SAFETY: forwarded; the page's kind is checked before its special space is trusted.
        let s = unsafe {
            let b = Locked::read(index, blk, false);
            chain_special(b.page())
        };
        match s {
            Some(s) if s.generation == r.generation => {
                out.push((blk, s.magic));
                blk = s.next;
            }
            _ => break,
        }
    }
    out
}

/// The blocks of the chain `r` (for freeing it); stops early on a page that is no longer its.
///
/// # Safety
/// As for [`read_image_into`].
pub unsafe fn chain_blocks(index: pg_sys::Relation, r: &ImageRef) -> Vec<pg_sys::BlockNumber> {
    // SAFETY: forwarded.
    unsafe { chain_pages(index, r) }
        .into_iter()
        .map(|(b, _)| b)
        .collect()
}

/// Streams the bytes of image `r` into `out`: the main image's block range, or the delta
/// graph's chain (each page checked to belong to it: a chain freed and reused since the caller
/// read the metapage is `IndexCorrupt`, and the caller reads the metapage again).
///
/// # Safety
/// As for [`read_image_into`].
pub unsafe fn read_ref_into(
    index: pg_sys::Relation,
    meta: &Meta,
    r: &ImageRef,
    out: &mut dyn Write,
) -> TtResult<()> {
    if r.level == Level::Main {
        // SAFETY: forwarded.
        return unsafe { read_image_into(index, meta, out) };
    }
    let mut remaining = r.len as usize;
    let mut blk = r.start;
    for i in 0..r.nblocks {
        if i % 1024 == 0 {
            pgrx::check_for_interrupts!();
        }
        let stale = || {
            TtError::IndexCorrupt(format!(
                "delta graph page {i} (block {blk}) does not belong to generation {:016x}",
                r.generation
            ))
        };
        if blk == pg_sys::InvalidBlockNumber {
            return Err(stale());
        }
        // SAFETY: forwarded; the page's kind and generation are checked before it is read.
        unsafe {
            let b = Locked::read(index, blk, false);
            let page = b.page();
            let Some(s) = chain_special(page) else {
                return Err(stale());
            };
            if s.generation != r.generation {
                return Err(stale());
            }
            let lower = (*(page as *const pg_sys::PageHeaderData)).pd_lower as usize;
            // A sectioned chain's page ends where its section does; an unsectioned chain's
            // pages are full but the last.
            let n = if s.magic == CHAIN_MAGIC {
                remaining.min(CHAIN_PAYLOAD)
            } else {
                lower.saturating_sub(PAGE_HEADER)
            };
            if lower != PAGE_HEADER + n || n == 0 || n > remaining || n > CHAIN_PAYLOAD {
                return Err(stale());
            }
            out.write_all(std::slice::from_raw_parts(contents(page), n))
                .map_err(|e| TtError::CacheIo(e.to_string()))?;
            remaining -= n;
            blk = s.next;
        }
    }
    if remaining != 0 {
        return Err(TtError::IndexCorrupt(
            "delta graph is shorter than the metapage says".into(),
        ));
    }
    Ok(())
}

/// Stops appends to the delta's current pages: the next item starts a new page. Returns the
/// metapage as it is then; every delta page up to its `dl_sealed` (and the version-1 range) is
/// final (only VACUUM, which takes the maintenance lock, changes them later).
///
/// # Safety
/// As for [`read_image_into`]; the caller holds the maintenance lock.
pub unsafe fn seal_delta(index: pg_sys::Relation) -> Meta {
    // SAFETY: the metapage changes under its exclusive lock in one Generic WAL record.
    unsafe {
        let mb = Locked::read(index, META_BLKNO, true);
        let state = pg_sys::GenericXLogStart(index);
        let mpage = pg_sys::GenericXLogRegisterBuffer(state, mb.buf, 0);
        let mut nm = get_meta(mpage);
        nm.dl_sealed = nm.dl_tail;
        // A version-1 range takes no more items either: appends go to the chain from now on.
        nm.delta_tail = pg_sys::InvalidBlockNumber;
        put_meta(mpage, &nm);
        pg_sys::GenericXLogFinish(state);
        nm
    }
}

/// The switch to a new delta graph: the metapage names `new` (or no delta graph) and `spare`
/// (the chain the next fold writes over, or none), the sealed delta pages leave the chain (and
/// the version-1 range empties), and `moved` items left the delta, in one WAL record. Returns
/// the new metapage.
///
/// # Safety
/// As for [`read_image_into`]; the caller holds the maintenance lock and sealed the delta.
pub unsafe fn switch_delta_graph(
    index: pg_sys::Relation,
    new: Option<(ImageRef, u64)>,
    spare: Option<ImageRef>,
    moved: u64,
) -> Meta {
    // SAFETY: the metapage changes under its exclusive lock in one Generic WAL record; the
    // sealed page is only read (appends after the seal linked their pages from it).
    unsafe {
        let mb = Locked::read(index, META_BLKNO, true);
        let m = get_meta(mb.page());
        let rest = if m.dl_sealed != 0 {
            let sb = Locked::read(index, m.dl_sealed, false);
            link_special(sb.page()).map_or(0, |s| s.next)
        } else {
            m.dl_head
        };
        let state = pg_sys::GenericXLogStart(index);
        let mpage = pg_sys::GenericXLogRegisterBuffer(state, mb.buf, 0);
        let mut m = get_meta(mpage);
        m.version = META_VERSION;
        match new {
            Some((r, count)) => {
                m.dg_generation = r.generation;
                m.dg_checksum = r.checksum;
                m.dg_len = r.len;
                m.dg_head = r.start;
                m.dg_nblocks = r.nblocks;
                m.dg_count = count;
            }
            None => {
                m.dg_generation = 0;
                m.dg_checksum = 0;
                m.dg_len = 0;
                m.dg_head = 0;
                m.dg_nblocks = 0;
                m.dg_count = 0;
            }
        }
        match spare {
            Some(r) => {
                m.dg_spare_generation = r.generation;
                m.dg_spare_head = r.start;
                m.dg_spare_nblocks = r.nblocks;
            }
            None => {
                m.dg_spare_generation = 0;
                m.dg_spare_head = 0;
                m.dg_spare_nblocks = 0;
            }
        }
        m.dg_folds += 1;
        m.dl_head = rest;
        if rest == 0 {
            m.dl_tail = 0;
        }
        m.dl_sealed = 0;
        m.dl_epoch += 1;
        m.delta_start = m.delta_end;
        m.delta_tail = pg_sys::InvalidBlockNumber;
        m.delta_live = m.delta_live.saturating_sub(moved);
        put_meta(mpage, &m);
        pg_sys::GenericXLogFinish(state);
        m
    }
}
