//! The metapage, the main image's pages and the page helpers every kind of page uses.

use crate::infra::error::{TtError, TtResult};
use pgrx::pg_sys;
use std::io::Write;

pub const META_BLKNO: pg_sys::BlockNumber = 0;
pub(super) const META_MAGIC: u32 = 0x5454_4857; // "TTHW"
pub(super) const META_VERSION: u32 = 2;
/// Metapages of version 1 (no delta graph) are read as version 2 with an empty delta graph.
pub(super) const META_VERSION_1: u32 = 1;
/// Size of the standard page header (MAXALIGN(offsetof(PageHeaderData, pd_linp))).
pub(super) const PAGE_HEADER: usize = 24;
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
    /// The main graph's tuning to sample queries (`WITH (query_sample = ...)`; all zero when
    /// it was not tuned; metapages written before 0.8 read zeros here): sample queries, k,
    /// links added, the sample's recall@k before and after.
    pub tuned_queries: u32,
    pub tuned_k: u32,
    pub tuned_links: u64,
    pub tuned_recall_before: f32,
    pub tuned_recall_after: f32,
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
pub(super) fn contents(page: pg_sys::Page) -> *mut u8 {
    // SAFETY: every page has a PAGE_HEADER-byte header followed by the contents area.
    unsafe { (page as *mut u8).add(PAGE_HEADER) }
}

/// Initialises `page` to hold `data` (at most PAYLOAD bytes) as raw contents, with pd_lower
/// covering the data so full-page images and Generic WAL never treat it as a hole.
///
/// # Safety
/// `page` must point to a writable page buffer of BLCKSZ bytes.
pub(super) unsafe fn init_raw_page(page: pg_sys::Page, data: &[u8]) {
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
pub(super) unsafe fn reinit_page(page: pg_sys::Page, special: usize) {
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

pub(super) fn meta_bytes(m: &Meta) -> &[u8] {
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
