//! The tombstone bitmap: one bit per position of the main graph, set when VACUUM removed it.

use super::meta::*;
use pgrx::pg_sys;

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
