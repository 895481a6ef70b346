//! Where the bytes live. An index relation is:
//!
//! ```text
//! block 0                      metapage (Meta)
//! image_start .. +image_nblocks  the image (sorted heap TIDs + usearch graph), raw bytes
//! tomb_start  .. +tomb_nblocks   tombstone bitmap: bit i set = graph entry i was vacuumed
//! delta_start .. delta_end       delta pages: (heap TID, f32 vector) items added after the build
//! ```
//!
//! Build writes everything through shared buffers and WAL-logs it with `log_newpage_range`; every
//! later change (insert, vacuum) is a Generic WAL record, so crash recovery and physical
//! replicas see exactly what the primary wrote.

use crate::error::{TtError, TtResult};
use pgrx::pg_sys;
use std::io::Write;

pub const META_BLKNO: pg_sys::BlockNumber = 0;
const META_MAGIC: u32 = 0x5454_4857; // "TTHW"
const META_VERSION: u32 = 1;
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
}

impl Meta {
    pub fn has_image(&self) -> bool {
        self.image_len > 0
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

/// Reads the metapage.
///
/// # Safety
/// `index` must be an open twotower_hnsw index.
pub unsafe fn read_meta(index: pg_sys::Relation) -> TtResult<Meta> {
    // SAFETY: block 0 always exists in a built index.
    let b = unsafe { Locked::read(index, META_BLKNO, false) };
    // SAFETY: the metapage contents hold a Meta written by write_meta_page.
    let m = unsafe { std::ptr::read_unaligned(contents(b.page()) as *const Meta) };
    if m.magic != META_MAGIC || m.version != META_VERSION {
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
        let mut m = std::ptr::read_unaligned(contents(page) as *const Meta);
        m.build_millis = build_millis;
        std::ptr::write_unaligned(contents(page) as *mut Meta, m);
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
            let mut m = std::ptr::read_unaligned(contents(mpage) as *const Meta);
            m.graph_dead += here;
            std::ptr::write_unaligned(contents(mpage) as *mut Meta, m);
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

/// Appends one (TID, vector) item to the delta area, extending it when the tail page is full.
/// The metapage lock serialises appenders; the item and the metapage change are one WAL record.
///
/// # Safety
/// `index` must be an open twotower_hnsw index; `vector` must already be validated against
/// the index dimension.
pub unsafe fn append_delta(index: pg_sys::Relation, tid: &pg_sys::ItemPointerData, vector: &[f32]) {
    let mut item = Vec::with_capacity(delta_item_size(vector.len()));
    item.extend_from_slice(&tid_bytes(tid));
    item.extend_from_slice(&[0, 0]);
    for x in vector {
        item.extend_from_slice(&x.to_ne_bytes());
    }
    // SAFETY: lock order is always metapage, then delta page (vacuum never holds both).
    unsafe {
        let meta_buf = Locked::read(index, META_BLKNO, true);
        let m = std::ptr::read_unaligned(contents(meta_buf.page()) as *const Meta);
        if m.dims != 0 && m.dims as usize != vector.len() {
            TtError::Ann(twotower_ann::AnnError::DimensionMismatch {
                expected: m.dims as usize,
                got: vector.len(),
            })
            .report();
        }
        let mut target: Option<Locked> = None;
        if m.delta_tail != pg_sys::InvalidBlockNumber {
            let b = Locked::read(index, m.delta_tail, true);
            if pg_sys::PageGetFreeSpace(b.page()) >= item.len() + 8 {
                target = Some(b);
            }
        }
        let (b, fresh) = match target {
            Some(b) => (b, false),
            None => (
                Locked::extend(index, pg_sys::ForkNumber::MAIN_FORKNUM),
                true,
            ),
        };
        let blkno = b.blkno();
        let state = pg_sys::GenericXLogStart(index);
        let page = pg_sys::GenericXLogRegisterBuffer(
            state,
            b.buf,
            if fresh {
                pg_sys::GENERIC_XLOG_FULL_IMAGE as i32
            } else {
                0
            },
        );
        if fresh {
            pg_sys::PageInit(page, pg_sys::BLCKSZ as usize, 0);
        }
        let off = pg_sys::PageAddItemExtended(
            page,
            item.as_ptr() as pg_sys::Item,
            item.len(),
            pg_sys::InvalidOffsetNumber,
            0,
        );
        if off == pg_sys::InvalidOffsetNumber {
            pg_sys::GenericXLogAbort(state);
            TtError::IndexCorrupt(format!("could not add a delta item to block {blkno}")).report();
        }
        let mpage = pg_sys::GenericXLogRegisterBuffer(state, meta_buf.buf, 0);
        let mut nm = std::ptr::read_unaligned(contents(mpage) as *const Meta);
        nm.delta_live += 1;
        nm.delta_inserted += 1;
        nm.delta_tail = blkno;
        nm.delta_end = nm.delta_end.max(blkno + 1);
        if nm.dims == 0 {
            nm.dims = vector.len() as u32;
        }
        std::ptr::write_unaligned(contents(mpage) as *mut Meta, nm);
        pg_sys::GenericXLogFinish(state);
        drop(b);
        drop(meta_buf);
    }
}

/// Calls `f(tid, vector)` for every delta item.
///
/// # Safety
/// As for [`read_image_into`].
pub unsafe fn for_each_delta(
    index: pg_sys::Relation,
    meta: &Meta,
    mut f: impl FnMut(pg_sys::ItemPointerData, &[f32]),
) {
    let dims = meta.dims as usize;
    for blk in meta.delta_start..meta.delta_end {
        // SAFETY: blocks in the delta range exist (delta_end only grows after extension).
        unsafe {
            let b = Locked::read(index, blk, false);
            let page = b.page();
            if pg_sys::PageIsNew(page) {
                continue;
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
                f(tid, v);
            }
        }
    }
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
/// delta's start moves past the pages left empty at its front (their space is not reused yet,
/// but scans no longer read them): after many deletes the scans stay as fast as the live delta.
///
/// # Safety
/// As for [`read_image_into`]; `dead` is the bulk-delete callback.
pub unsafe fn vacuum_delta(
    index: pg_sys::Relation,
    meta: &Meta,
    mut dead: impl FnMut(&mut pg_sys::ItemPointerData) -> bool,
) -> (u64, u64) {
    let (mut removed, mut kept) = (0u64, 0u64);
    let mut first_nonempty: Option<pg_sys::BlockNumber> = None;
    for blk in meta.delta_start..meta.delta_end {
        // SAFETY: as in for_each_delta; lock order metapage, then the delta page, as in append_delta.
        unsafe {
            pg_sys::vacuum_delay_point();
            let mb = Locked::read(index, META_BLKNO, true);
            let b = Locked::read(index, blk, true);
            let page = b.page();
            if pg_sys::PageIsNew(page) {
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
            if live_here && first_nonempty.is_none() {
                first_nonempty = Some(blk);
            }
            if !gone.is_empty() {
                let state = pg_sys::GenericXLogStart(index);
                let p = pg_sys::GenericXLogRegisterBuffer(state, b.buf, 0);
                let mpage = pg_sys::GenericXLogRegisterBuffer(state, mb.buf, 0);
                pg_sys::PageIndexMultiDelete(p, gone.as_mut_ptr(), gone.len() as i32);
                let mut m = std::ptr::read_unaligned(contents(mpage) as *const Meta);
                m.delta_live = m.delta_live.saturating_sub(gone.len() as u64);
                std::ptr::write_unaligned(contents(mpage) as *mut Meta, m);
                pg_sys::GenericXLogFinish(state);
                removed += gone.len() as u64;
            }
            drop(b);
            drop(mb);
        }
    }
    // SAFETY: the metapage is locked exclusively for the read-modify-write, WAL-logged as above.
    // Inserts append only to the tail page (the last of the range) or to new pages after it, so
    // every page before the first one found with live items (and before the tail) is empty.
    unsafe {
        let mb = Locked::read(index, META_BLKNO, true);
        let m = std::ptr::read_unaligned(contents(mb.page()) as *const Meta);
        if m.delta_tail != pg_sys::InvalidBlockNumber {
            let start = first_nonempty.unwrap_or(m.delta_tail).min(m.delta_tail);
            if start > m.delta_start {
                let state = pg_sys::GenericXLogStart(index);
                let mpage = pg_sys::GenericXLogRegisterBuffer(state, mb.buf, 0);
                let mut nm = std::ptr::read_unaligned(contents(mpage) as *const Meta);
                nm.delta_start = start;
                std::ptr::write_unaligned(contents(mpage) as *mut Meta, nm);
                pg_sys::GenericXLogFinish(state);
            }
        }
        drop(mb);
    }
    (removed, kept)
}
