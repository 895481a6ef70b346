//! Our HNSW search over the stored graph, read in place (`layout.rs`): a greedy descent through
//! the upper levels, then a beam search of width `ef` at level 0. Items for which `skip` is true
//! are walked through but never returned, as usearch's filtered search does. Distances use
//! numkong's SIMD kernels on the stored form of the vectors; for cosine the query is a unit
//! vector and each stored vector's inverse norm comes from the navigation tables, so a distance
//! is one dot product.
//!
//! The distances rank like usearch's (cosine: 1 - cos; inner product: -dot, usearch's 1 - dot
//! shifted; L2: squared distance), which is all a search needs: callers re-rank from the
//! stored vectors.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use numkong::{Dot, Euclidean};

use crate::error::{AnnError, Result};
use crate::layout::{row, u32_at, u64_at, GraphHead, Nav};
use crate::metric::{Metric, Quantization};

#[cfg(target_endian = "big")]
compile_error!("the stored image layout is little-endian");

fn corrupt() -> AnnError {
    AnnError::CorruptImage("the stored graph is damaged (a node or link out of bounds)".into())
}

/// A distance with a total order (NaN never occurs: it is mapped to +inf).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct D(pub f32);
impl Eq for D {}
impl PartialOrd for D {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for D {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// The query in the stored form of the vectors.
enum Form {
    F32(Vec<f32>),
    F16(Vec<numkong::f16>),
    /// The i8 query and the factor that turns an i8 dot product times the stored vector's
    /// inverse (decoded) norm into a cosine.
    I8(Vec<i8>, f32),
}

/// Reinterprets little-endian bytes as `T`s when they are aligned (they are, in images the
/// builder writes: the graph starts on a 64-byte boundary and rows are whole scalars).
fn typed<T>(b: &[u8]) -> Option<&[T]> {
    // SAFETY: T is f32, numkong::f16 (a transparent u16) or i8: every bit pattern is a valid
    // value, and `align_to` only yields properly aligned elements in its middle part.
    let (pre, mid, post) = unsafe { b.align_to::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

pub(crate) struct Searcher<'a> {
    pub bytes: &'a [u8],
    pub graph: &'a [u8],
    pub head: &'a GraphHead,
    pub nav: &'a Nav,
    metric: Metric,
    form: Form,
    quant: Quantization,
    q32: Vec<f32>,
    scratch: std::cell::RefCell<Vec<f32>>,
}

impl<'a> Searcher<'a> {
    /// A searcher for `query` (already the engine form: a unit vector for cosine and inner
    /// product, as [`crate::Query::engine`] gives).
    pub fn new(
        bytes: &'a [u8],
        graph: &'a [u8],
        head: &'a GraphHead,
        nav: &'a Nav,
        metric: Metric,
        quant: Quantization,
        query: &[f32],
    ) -> Searcher<'a> {
        let form = match quant {
            Quantization::F32 => Form::F32(query.to_vec()),
            Quantization::F16 => {
                Form::F16(query.iter().map(|x| numkong::f16::from_f32(*x)).collect())
            }
            Quantization::I8 => {
                // As usearch casts: scaled to unit length, times 127, truncated.
                let n2: f64 = query.iter().map(|x| (*x as f64) * (*x as f64)).sum();
                let mag = n2.sqrt();
                let q8: Vec<i8> = if mag > 0.0 {
                    query
                        .iter()
                        .map(|x| ((*x as f64) * 127.0 / mag).clamp(-127.0, 127.0) as i8)
                        .collect()
                } else {
                    vec![0; query.len()]
                };
                let qn: f64 = q8
                    .iter()
                    .map(|x| (*x as f64 / 127.0).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let scale = if qn > 0.0 {
                    (1.0 / (127.0 * 127.0 * qn)) as f32
                } else {
                    0.0
                };
                Form::I8(q8, scale)
            }
        };
        Searcher {
            bytes,
            graph,
            head,
            nav,
            metric,
            form,
            quant,
            q32: query.to_vec(),
            scratch: std::cell::RefCell::new(Vec::new()),
        }
    }

    fn raw_dot_or_l2(&self, r: &[u8]) -> Option<f64> {
        let l2 = self.metric == Metric::L2;
        match &self.form {
            Form::F32(q) => {
                let v = match typed::<f32>(r) {
                    Some(v) => v,
                    None => return self.unaligned(r),
                };
                if l2 {
                    f32::sqeuclidean(q, v)
                } else {
                    f32::dot(q, v)
                }
            }
            Form::F16(q) => {
                let v = match typed::<numkong::f16>(r) {
                    Some(v) => v,
                    None => return self.unaligned(r),
                };
                if l2 {
                    numkong::f16::sqeuclidean(q, v).map(|x| x as f64)
                } else {
                    numkong::f16::dot(q, v).map(|x| x as f64)
                }
            }
            Form::I8(q, _) => {
                let v = typed::<i8>(r)?;
                i8::dot(q, v).map(|x| x as f64)
            }
        }
    }

    /// The same for a row that is not aligned (an image held in unaligned memory): decoded
    /// to f32 first.
    fn unaligned(&self, r: &[u8]) -> Option<f64> {
        let mut v = self.scratch.try_borrow_mut().ok()?;
        crate::layout::decode(self.quant, r, &mut v);
        if self.metric == Metric::L2 {
            f32::sqeuclidean(&self.q32, &v)
        } else {
            f32::dot(&self.q32, &v)
        }
    }

    /// The search distance of `slot`.
    #[inline]
    pub fn dist(&self, slot: usize) -> Result<f32> {
        let r = row(self.graph, self.head, slot).ok_or_else(corrupt)?;
        let raw = self.raw_dot_or_l2(r);
        let d = match (raw, self.metric, &self.form) {
            (None, ..) => f32::INFINITY,
            (Some(x), Metric::L2, _) => x as f32,
            (Some(x), Metric::InnerProduct, _) => -(x as f32),
            (Some(x), Metric::Cosine, f) => {
                let inv = self.nav.inv_norm(self.bytes, slot).ok_or_else(corrupt)?;
                let scale = match f {
                    Form::I8(_, s) => *s,
                    _ => 1.0,
                };
                1.0 - (x as f32) * inv * scale
            }
        };
        Ok(if d.is_nan() { f32::INFINITY } else { d })
    }

    #[inline]
    fn node(&self, slot: usize) -> Result<usize> {
        if slot >= self.head.size {
            return Err(corrupt());
        }
        self.nav.node_off(self.bytes, slot).ok_or_else(corrupt)
    }

    /// The key of `slot`.
    #[inline]
    pub fn key(&self, slot: usize) -> Result<u64> {
        u64_at(self.graph, self.node(slot)?).ok_or_else(corrupt)
    }

    /// Calls `f` with each neighbour of `slot` at level `l`.
    #[inline]
    /// Reads one byte of each cache line of the stored vectors at `slots` (a portable prefetch:
    /// the loads do not depend on each other, so they are in flight together).
    fn touch(&self, slots: &[usize]) {
        crate::layout::touch_rows(self.graph, self.head, slots.iter().copied());
    }

    fn each_neighbour(
        &self,
        slot: usize,
        l: usize,
        mut f: impl FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        let node = self.node(slot)?;
        let level = i16::from_le_bytes(
            self.graph
                .get(node + 8..node + 10)
                .ok_or_else(corrupt)?
                .try_into()
                .map_err(|_| corrupt())?,
        );
        if level < 0 || (level as usize) < l {
            return Err(corrupt());
        }
        let at = self.head.list_at(node, l);
        let count = u32_at(self.graph, at).ok_or_else(corrupt)? as usize;
        if count > self.head.cap(l) {
            return Err(corrupt());
        }
        let list = self
            .graph
            .get(at + 4..at + 4 + 4 * count)
            .ok_or_else(corrupt)?;
        for c in list.chunks_exact(4) {
            let next = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
            if next >= self.head.size {
                return Err(corrupt());
            }
            f(next)?;
        }
        Ok(())
    }

    /// Approximate top-`k` (key, search distance, slot), nearest first, among items `skip` does
    /// not exclude; `interrupt` is called every few hundred expanded nodes (it may unwind).
    pub fn search(
        &self,
        k: usize,
        ef: usize,
        skip: Option<&dyn Fn(u64) -> bool>,
        interrupt: Option<&dyn Fn()>,
    ) -> Result<Vec<(u64, f32, u32)>> {
        match self.walk(k, ef, skip, interrupt, None)? {
            Walk::Done(r) => Ok(r),
            Walk::Reached => Ok(Vec::new()),
        }
    }

    /// The build's self-check for the item at `target`, whose stored vector is the searcher's
    /// query: whether [`Searcher::search`] with `k` = `ef` = max(`ef`, 10) and no exclusions
    /// ranks it among its first 10, or ties the 10th at its own distance (exact duplicates).
    /// Stops as soon as the search reaches the target (the descent ends on it, or it is among a
    /// node's unseen neighbours at level 0), which decides it: the whole search would compute
    /// its distance `own` in that same step, and then either it is kept (and either ranks among
    /// the first 10 or 10 results sort before it, each at most `own` away), or it is not
    /// (the kept results are full, ef >= 10, all at most `own`, and they only get nearer), or
    /// it is evicted later (as the farthest: the ef left are all at most `own`). Each case
    /// answers yes. This holds whatever the metric (nothing here assumes the target is nearest
    /// to itself), with ties broken by slot as the search breaks them.
    pub fn finds_itself(&self, target: usize, ef: usize) -> Result<bool> {
        let k = ef.max(10);
        match self.walk(k, k, None, None, Some(target))? {
            Walk::Reached => Ok(true),
            Walk::Done(found) => {
                let own = self.dist(target)?;
                let first = &found[..found.len().min(10)];
                Ok(first.iter().any(|h| h.2 as usize == target)
                    || first.len() == 10 && first[9].1 <= own)
            }
        }
    }

    fn walk(
        &self,
        k: usize,
        ef: usize,
        skip: Option<&dyn Fn(u64) -> bool>,
        interrupt: Option<&dyn Fn()>,
        target: Option<usize>,
    ) -> Result<Walk> {
        let h = self.head;
        if k == 0 || h.size == 0 {
            return Ok(Walk::Done(Vec::new()));
        }
        let ef = ef.max(k).max(1);
        let mut cur = h.entry;
        let mut cur_d = self.dist(cur)?;
        for l in (1..=h.max_level).rev() {
            loop {
                let mut moved = false;
                let mut best = (cur, cur_d);
                self.each_neighbour(cur, l, |n| {
                    let d = self.dist(n)?;
                    if d < best.1 {
                        best = (n, d);
                        moved = true;
                    }
                    Ok(())
                })?;
                (cur, cur_d) = best;
                if !moved {
                    break;
                }
            }
        }
        if target == Some(cur) {
            return Ok(Walk::Reached);
        }
        let mut visited = Visited::with_capacity(ef * 8);
        let mut cand: BinaryHeap<Reverse<(D, u32)>> = BinaryHeap::with_capacity(ef * 2);
        let mut top: BinaryHeap<(D, u32)> = BinaryHeap::with_capacity(ef + 1);
        visited.insert(cur as u32);
        cand.push(Reverse((D(cur_d), cur as u32)));
        let keep = |slot: usize| -> Result<bool> {
            Ok(match skip {
                None => true,
                Some(f) => !f(self.key(slot)?),
            })
        };
        if keep(cur)? {
            top.push((D(cur_d), cur as u32));
        }
        let mut expanded = 0usize;
        let mut fresh: Vec<usize> = Vec::with_capacity(self.head.cap(0));
        while let Some(Reverse((D(d), slot))) = cand.pop() {
            if top.len() >= ef && top.peek().is_some_and(|w| d > w.0 .0) {
                break;
            }
            expanded += 1;
            if expanded.is_multiple_of(256) {
                if let Some(f) = interrupt {
                    f();
                }
            }
            // The neighbours not seen yet, their vectors touched first: independent loads the
            // processor overlaps, so the distances below find them in cache (a search is bound
            // by these random reads).
            fresh.clear();
            self.each_neighbour(slot as usize, 0, |n| {
                if visited.insert(n as u32) {
                    fresh.push(n);
                }
                Ok(())
            })?;
            if target.is_some_and(|t| fresh.contains(&t)) {
                return Ok(Walk::Reached);
            }
            self.touch(&fresh);
            for &n in &fresh {
                let dn = self.dist(n)?;
                let worst = top.peek().map_or(f32::INFINITY, |w| w.0 .0);
                if top.len() < ef || dn < worst {
                    cand.push(Reverse((D(dn), n as u32)));
                    if keep(n)? {
                        top.push((D(dn), n as u32));
                        if top.len() > ef {
                            top.pop();
                        }
                    }
                }
            }
        }
        let mut out: Vec<(D, u32)> = top.into_vec();
        out.sort_unstable();
        out.truncate(k);
        Ok(Walk::Done(
            out.into_iter()
                .map(|(D(d), s)| Ok((self.key(s as usize)?, d, s)))
                .collect::<Result<_>>()?,
        ))
    }

    /// Every item with its search distance and slot, nearest first (brute force).
    pub fn exact_all(&self, interrupt: Option<&dyn Fn()>) -> Result<Vec<(u64, f32, u32)>> {
        let mut all = Vec::with_capacity(self.head.size);
        for slot in 0..self.head.size {
            if slot % 4096 == 4095 {
                if let Some(f) = interrupt {
                    f();
                }
            }
            all.push((self.dist(slot)?, self.key(slot)?, slot as u32));
        }
        all.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        Ok(all.into_iter().map(|(d, k, s)| (k, d, s)).collect())
    }
}

/// How a walk ended: its results, or (looking for a target) the target reached.
enum Walk {
    Done(Vec<(u64, f32, u32)>),
    Reached,
}

/// A set of visited slots: open addressing over u32 (slot + 1; 0 is empty), grown at half load.
struct Visited {
    table: Vec<u32>,
    len: usize,
}

impl Visited {
    fn with_capacity(n: usize) -> Visited {
        Visited {
            table: vec![0; (n * 2).next_power_of_two().max(64)],
            len: 0,
        }
    }

    #[inline]
    fn hash(x: u32) -> usize {
        (x.wrapping_mul(0x9E37_79B1)) as usize
    }

    /// Inserts `slot`; false if it was there already.
    #[inline]
    fn insert(&mut self, slot: u32) -> bool {
        if (self.len + 1) * 2 > self.table.len() {
            let old = std::mem::take(&mut self.table);
            self.table = vec![0; old.len() * 2];
            self.len = 0;
            for v in old.into_iter().filter(|v| *v != 0) {
                self.insert(v - 1);
            }
        }
        let mask = self.table.len() - 1;
        let v = slot + 1;
        let mut i = Self::hash(v) & mask;
        loop {
            match self.table[i] {
                0 => {
                    self.table[i] = v;
                    self.len += 1;
                    return true;
                }
                x if x == v => return false,
                _ => i = (i + 1) & mask,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Visited;

    #[test]
    fn visited_set() {
        let mut v = Visited::with_capacity(1);
        for i in 0..10_000u32 {
            assert!(v.insert(i * 7));
        }
        for i in 0..10_000u32 {
            assert!(!v.insert(i * 7));
        }
        assert!(v.insert(u32::MAX - 1));
    }
}
