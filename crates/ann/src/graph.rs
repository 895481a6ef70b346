//! Reachability in a serialized usearch graph: which items no search can ever reach.
//!
//! A search starts at the entry node and only ever follows edges, so an item with no path from
//! the entry point is lost to every search, whatever its `ef` (what usearch issue #735 reports
//! after concurrent insertion). Reading the edges of the serialized graph and walking them from
//! the entry point finds exactly those items, in one pass over the edges: far cheaper than a
//! self-search per item.
//!
//! The dense serialization of usearch 2.x (`index_dense_gt::save_to_stream`, 32-bit slots,
//! 64-bit keys), all little-endian:
//! ```text
//! u32 rows, u32 bytes per vector; rows × bytes per vector       (the vectors)
//! 64-byte head ("usearch" magic, versions, kinds, counts)
//! u64 size, u64 connectivity, u64 connectivity_base, u64 max_level, u64 entry_slot
//! size × i16 level
//! size × node: u64 key, i16 level, then for level 0: u32 count + connectivity_base × u32 slot,
//!              and for each level 1..=level: u32 count + connectivity × u32 slot
//! ```
//! Every length is checked against the buffer, and the node area must end exactly at the end
//! of the buffer; anything else is `None` (the caller then falls back to searching).

/// Keys of the items not reachable from the entry point, or `None` if `blob` is not a graph
/// laid out as documented above.
pub fn unreachable_keys(blob: &[u8]) -> Option<Vec<u64>> {
    analyze(blob, 0).map(|a| a.unreachable)
}

/// What a walk over the graph finds.
#[derive(Debug, Default)]
pub struct Analysis {
    /// Keys of the items no search can reach, ascending.
    pub unreachable: Vec<u64>,
    /// Keys of reachable items with at most `weak_in_links` level-0 in-links, ascending: the
    /// items a search finds only by luck.
    pub weak: Vec<u64>,
}

/// Walks the graph in `blob` from its entry point; `None` if the layout is not the known one.
pub fn analyze(blob: &[u8], weak_in_links: u32) -> Option<Analysis> {
    let mut at = 0usize;
    let u32_at = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            b.get(at..at.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    let u64_at = |b: &[u8], at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            b.get(at..at.checked_add(8)?)?.try_into().ok()?,
        ))
    };
    let rows = u32_at(blob, at)? as usize;
    let row_bytes = u32_at(blob, at + 4)? as usize;
    at = at
        .checked_add(8)?
        .checked_add(rows.checked_mul(row_bytes)?)?;
    if blob.get(at..at + 7)? != b"usearch" {
        return None;
    }
    at += 64;
    let size = usize::try_from(u64_at(blob, at)?).ok()?;
    let conn = usize::try_from(u64_at(blob, at + 8)?).ok()?;
    let conn_base = usize::try_from(u64_at(blob, at + 16)?).ok()?;
    let entry = usize::try_from(u64_at(blob, at + 32)?).ok()?;
    at += 40;
    if size == 0 {
        return Some(Analysis::default());
    }
    if size != rows || entry >= size || conn == 0 || conn_base < conn || conn_base > 4096 {
        return None;
    }
    let levels_end = at.checked_add(size.checked_mul(2)?)?;
    blob.get(at..levels_end)?;
    let base_bytes = 4 + conn_base * 4;
    let upper_bytes = 4 + conn * 4;
    // Node offsets from the level table, checked to end exactly at the end of the buffer.
    let mut offsets = Vec::with_capacity(size);
    let mut off = levels_end;
    for i in 0..size {
        let level = i16::from_le_bytes(blob.get(at + 2 * i..at + 2 * i + 2)?.try_into().ok()?);
        if level < 0 {
            return None;
        }
        offsets.push(off);
        off = off.checked_add(10 + base_bytes + level as usize * upper_bytes)?;
    }
    if off != blob.len() {
        return None;
    }
    // Level-0 in-degrees (the base layer is where a search finds items).
    let mut in_links = vec![0u32; size];
    for &node in &offsets {
        let count = u32_at(blob, node + 10)? as usize;
        if count > conn_base {
            return None;
        }
        for j in 0..count {
            let next = u32_at(blob, node + 14 + 4 * j)? as usize;
            *in_links.get_mut(next)? += 1;
        }
    }
    let mut seen = vec![false; size];
    let mut stack = vec![entry];
    seen[entry] = true;
    while let Some(slot) = stack.pop() {
        let node = offsets[slot];
        let level = i16::from_le_bytes(blob[node + 8..node + 10].try_into().ok()?);
        let mut list = node + 10;
        for l in 0..=level as usize {
            let cap = if l == 0 { conn_base } else { conn };
            let count = u32_at(blob, list)? as usize;
            if count > cap {
                return None;
            }
            for j in 0..count {
                let next = u32_at(blob, list + 4 + 4 * j)? as usize;
                if next >= size {
                    return None;
                }
                if !seen[next] {
                    seen[next] = true;
                    stack.push(next);
                }
            }
            list += 4 + cap * 4;
        }
    }
    let mut a = Analysis::default();
    for (slot, reached) in seen.iter().enumerate() {
        if !reached {
            a.unreachable.push(u64_at(blob, offsets[slot])?);
        } else if in_links[slot] <= weak_in_links {
            a.weak.push(u64_at(blob, offsets[slot])?);
        }
    }
    a.unreachable.sort_unstable();
    a.weak.sort_unstable();
    Some(a)
}
