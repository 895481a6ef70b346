//! Chains of pages holding a graph image (the delta graph, and a main graph retired by
//! VACUUM), allocated from the free space map.

use super::kinds::*;
use super::meta::*;
use crate::infra::error::{OrReport, TtError, TtResult};
use pgrx::pg_sys;
use std::io::Write;

// ---------------------------------------------------------------------------------------------
// Delta-graph pages: a chain, allocated from the free space map.

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
pub(super) unsafe fn chain_pages(
    index: pg_sys::Relation,
    r: &ImageRef,
) -> Vec<(pg_sys::BlockNumber, u32)> {
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
