//! Reading the stored graph in place: the serialized usearch graph (laid out as `graph.rs`
//! documents) plus our navigation tables, so that opening an image costs O(1) in the number of
//! items and a search reads only the nodes it visits.
//!
//! Navigation tables (format 2 images store them; for format 1 images they are computed when
//! the image is opened), all little-endian:
//! ```text
//! slot_of:  count × u32   the graph slot of the item at each sorted-key position
//! (padding to 8 bytes)
//! node_off: count × u64   offset of each slot's node record from the start of the graph
//! inv_norm: count × f32   1 / norm of each slot's stored vector (0 for a zero vector)
//! ```
//! Every read is bounds-checked: a damaged image (or one changed under a mapping) gives
//! [`AnnError::CorruptImage`], never a panic or an out-of-bounds read.

use crate::error::{AnnError, Result};
use crate::metric::Quantization;

fn corrupt(what: &str) -> AnnError {
    AnnError::CorruptImage(what.to_string())
}

#[inline]
pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}
#[inline]
pub(crate) fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}
#[inline]
fn i16_at(b: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
#[inline]
fn f32_at(b: &[u8], at: usize) -> Option<f32> {
    u32_at(b, at).map(f32::from_bits)
}

/// The fixed facts of a serialized graph, read from its head in O(1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GraphHead {
    /// Items (slots) in the graph.
    pub size: usize,
    pub row_bytes: usize,
    /// Offset of the first stored vector (slot order) from the start of the graph.
    pub vectors_at: usize,
    pub conn: usize,
    pub conn_base: usize,
    pub max_level: usize,
    pub entry: usize,
    /// Offset of the per-slot level table.
    pub levels_at: usize,
    /// Offset of the first node record.
    pub nodes_at: usize,
}

impl GraphHead {
    /// Parses the head of `graph` for `dims` dimensions stored as `quant`.
    pub fn parse(graph: &[u8], dims: usize, quant: Quantization) -> Result<GraphHead> {
        let bad = || corrupt("the stored graph's head is not the known layout");
        let rows = u32_at(graph, 0).ok_or_else(bad)? as usize;
        let row_bytes = u32_at(graph, 4).ok_or_else(bad)? as usize;
        let mut at = rows
            .checked_mul(row_bytes)
            .and_then(|x| x.checked_add(8))
            .ok_or_else(bad)?;
        if graph.get(at..at + 7) != Some(b"usearch".as_slice()) {
            return Err(bad());
        }
        at += 64;
        let word = |i: usize| -> Result<usize> {
            usize::try_from(u64_at(graph, at + 8 * i).ok_or_else(bad)?).map_err(|_| bad())
        };
        let (size, conn, conn_base, max_level, entry) =
            (word(0)?, word(1)?, word(2)?, word(3)?, word(4)?);
        let levels_at = at + 40;
        let nodes_at = size
            .checked_mul(2)
            .and_then(|x| x.checked_add(levels_at))
            .ok_or_else(bad)?;
        let h = GraphHead {
            size,
            row_bytes,
            vectors_at: 8,
            conn,
            conn_base,
            max_level,
            entry,
            levels_at,
            nodes_at,
        };
        let sane = rows == size
            && row_bytes == dims * quant.bytes_per_scalar()
            && (size == 0 || entry < size)
            && conn >= 1
            && conn_base >= conn
            && conn_base <= 4096
            && max_level <= 64
            && nodes_at <= graph.len();
        if !sane {
            return Err(bad());
        }
        Ok(h)
    }

    /// Bytes of a node record of `level`.
    pub fn node_bytes(&self, level: usize) -> usize {
        10 + 4 + self.conn_base * 4 + level * (4 + self.conn * 4)
    }

    /// Offset of level `l`'s neighbour list (count first) in the node record at `node`.
    #[inline]
    pub fn list_at(&self, node: usize, l: usize) -> usize {
        if l == 0 {
            node + 10
        } else {
            node + 10 + 4 + self.conn_base * 4 + (l - 1) * (4 + self.conn * 4)
        }
    }

    pub fn cap(&self, l: usize) -> usize {
        if l == 0 {
            self.conn_base
        } else {
            self.conn
        }
    }
}

/// Navigation tables held in memory (computed for format 1 images, and by the writer).
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct NavTables {
    pub slot_of: Vec<u32>,
    pub node_off: Vec<u64>,
    pub inv_norm: Vec<f32>,
}

/// Byte length of the stored navigation tables of `count` items.
pub(crate) fn nav_len(count: usize) -> usize {
    pad8(count * 4) + count * 8 + count * 4
}

pub(crate) fn pad8(x: usize) -> usize {
    (x + 7) & !7
}

impl NavTables {
    /// Computes the tables from `graph` and the image's ascending `sorted_keys`: one pass over
    /// the level table and one over the node keys, then a sort of (key, slot) pairs.
    pub fn compute(
        graph: &[u8],
        h: &GraphHead,
        quant: Quantization,
        sorted_keys: &[u64],
    ) -> Result<NavTables> {
        let n = h.size;
        if sorted_keys.len() != n {
            return Err(corrupt("graph size differs from the key count"));
        }
        let bad = || corrupt("the stored graph's node table is not the known layout");
        let mut node_off = Vec::with_capacity(n);
        let mut off = h.nodes_at;
        for slot in 0..n {
            let level = i16_at(graph, h.levels_at + 2 * slot).ok_or_else(bad)?;
            if level < 0 || level as usize > h.max_level {
                return Err(bad());
            }
            node_off.push(off as u64);
            off = off
                .checked_add(h.node_bytes(level as usize))
                .ok_or_else(bad)?;
        }
        if off != graph.len() {
            return Err(bad());
        }
        let mut pairs: Vec<(u64, u32)> = Vec::with_capacity(n);
        for (slot, &o) in node_off.iter().enumerate() {
            pairs.push((u64_at(graph, o as usize).ok_or_else(bad)?, slot as u32));
        }
        pairs.sort_unstable();
        let mut slot_of = Vec::with_capacity(n);
        for (i, (key, slot)) in pairs.into_iter().enumerate() {
            if key != sorted_keys[i] {
                return Err(corrupt("the graph's keys differ from the image's keys"));
            }
            slot_of.push(slot);
        }
        let mut inv_norm = Vec::with_capacity(n);
        let mut buf = Vec::new();
        for slot in 0..n {
            let row = row(graph, h, slot).ok_or_else(bad)?;
            decode(quant, row, &mut buf);
            inv_norm.push(self::inv_norm(&buf));
        }
        Ok(NavTables {
            slot_of,
            node_off,
            inv_norm,
        })
    }

    /// Writes the tables into `out` (exactly [`nav_len`] bytes).
    pub fn write(&self, out: &mut [u8]) {
        let n = self.slot_of.len();
        for (i, s) in self.slot_of.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&s.to_le_bytes());
        }
        let base = pad8(n * 4);
        for (i, o) in self.node_off.iter().enumerate() {
            out[base + 8 * i..base + 8 * i + 8].copy_from_slice(&o.to_le_bytes());
        }
        let base = base + n * 8;
        for (i, v) in self.inv_norm.iter().enumerate() {
            out[base + 4 * i..base + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// 1 / the norm of `v` (0 for a zero vector): the navigation table's inverse norm, and the
/// builder's, computed the same way so both rank alike.
pub(crate) fn inv_norm(v: &[f32]) -> f32 {
    let n2: f64 = v.iter().map(|x| (*x as f64) * (*x as f64)).sum();
    if n2 > 0.0 {
        (1.0 / n2.sqrt()) as f32
    } else {
        0.0
    }
}

/// The stored vector bytes of `slot`.
#[inline]
pub(crate) fn row<'a>(graph: &'a [u8], h: &GraphHead, slot: usize) -> Option<&'a [u8]> {
    let at = h.vectors_at.checked_add(slot.checked_mul(h.row_bytes)?)?;
    graph.get(at..at.checked_add(h.row_bytes)?)
}

/// Reads one byte of each cache line of the stored vectors at `slots` (a portable prefetch:
/// the loads do not depend on each other, so they are in flight together).
pub(crate) fn touch_rows(graph: &[u8], h: &GraphHead, slots: impl Iterator<Item = usize>) {
    let mut acc = 0u8;
    for s in slots {
        if let Some(r) = row(graph, h, s) {
            for i in (0..r.len()).step_by(64) {
                acc ^= r[i];
            }
        }
    }
    std::hint::black_box(acc);
}

/// Decodes a stored row into f32 (as usearch decodes it: f16 exactly, i8 as x / 127).
pub(crate) fn decode(quant: Quantization, row: &[u8], out: &mut Vec<f32>) {
    out.clear();
    match quant {
        Quantization::F32 => out.extend(
            row.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        Quantization::F16 => out.extend(
            row.chunks_exact(2)
                .map(|c| numkong::f16(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
        Quantization::I8 => out.extend(row.iter().map(|b| (*b as i8) as f32 * (1.0f32 / 127.0))),
    }
}

/// Where the navigation tables are: in the image bytes (format 2) or in memory (format 1).
#[derive(Debug)]
pub(crate) enum Nav {
    /// Offset of the stored tables in the image bytes, and the item count.
    Stored {
        at: usize,
        count: usize,
    },
    Owned(NavTables),
}

impl Nav {
    #[inline]
    pub fn slot_of(&self, bytes: &[u8], i: usize) -> Option<usize> {
        match self {
            Nav::Stored { at, .. } => u32_at(bytes, at + 4 * i).map(|s| s as usize),
            Nav::Owned(t) => t.slot_of.get(i).map(|s| *s as usize),
        }
    }
    #[inline]
    pub fn node_off(&self, bytes: &[u8], slot: usize) -> Option<usize> {
        match self {
            Nav::Stored { at, count } => {
                u64_at(bytes, at + pad8(count * 4) + 8 * slot).map(|s| s as usize)
            }
            Nav::Owned(t) => t.node_off.get(slot).map(|s| *s as usize),
        }
    }
    #[inline]
    pub fn inv_norm(&self, bytes: &[u8], slot: usize) -> Option<f32> {
        match self {
            Nav::Stored { at, count } => f32_at(bytes, at + pad8(count * 4) + count * 8 + 4 * slot),
            Nav::Owned(t) => t.inv_norm.get(slot).copied(),
        }
    }

    /// Checks the stored tables against the graph in one O(n) pass (no sort): node offsets
    /// follow the level table, `slot_of` maps each sorted key to the node holding it.
    pub fn verify(
        &self,
        bytes: &[u8],
        graph: &[u8],
        h: &GraphHead,
        sorted_key: impl Fn(usize) -> u64,
    ) -> Result<()> {
        let bad = || corrupt("the navigation tables do not match the graph");
        let mut off = h.nodes_at;
        for slot in 0..h.size {
            let level = i16_at(graph, h.levels_at + 2 * slot).ok_or_else(bad)?;
            if level < 0 || level as usize > h.max_level {
                return Err(bad());
            }
            if self.node_off(bytes, slot) != Some(off) {
                return Err(bad());
            }
            off = off
                .checked_add(h.node_bytes(level as usize))
                .ok_or_else(bad)?;
        }
        if off != graph.len() {
            return Err(bad());
        }
        for i in 0..h.size {
            let slot = self.slot_of(bytes, i).ok_or_else(bad)?;
            if slot >= h.size {
                return Err(bad());
            }
            let node = self.node_off(bytes, slot).ok_or_else(bad)?;
            if u64_at(graph, node) != Some(sorted_key(i)) {
                return Err(bad());
            }
        }
        Ok(())
    }
}
