//! Delta pages: (heap TID, f32 vector) items inserted after the build, a chain from the
//! metapage's head to its tail.

use super::chain::*;
use super::kinds::*;
use super::meta::*;
use crate::infra::error::TtError;
use pgrx::pg_sys;

/// Size of a delta item for `dims` dimensions: heap TID (6 bytes) + 2 bytes padding + floats.
pub fn delta_item_size(dims: usize) -> usize {
    8 + 4 * dims
}

pub(super) fn tid_bytes(tid: &pg_sys::ItemPointerData) -> [u8; 6] {
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
    let count = || unsafe {
        pg_sys::RelationGetNumberOfBlocksInFork(index, pg_sys::ForkNumber::MAIN_FORKNUM)
    };
    let mut nblocks = count();
    let (mut blk, mut steps) = (meta.dl_head, 0u32);
    while blk != 0 {
        // An append may have extended the relation since the count (the tail this walk read
        // links to the new block): count again before calling the chain broken.
        if blk >= nblocks {
            nblocks = count();
        }
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

pub(super) unsafe fn read_tid(p: *const u8) -> pg_sys::ItemPointerData {
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
