//! Our HNSW builder: the graph the index stores, built in Rust and serialized in the layout
//! `graph.rs` documents (usearch's dense serialization, which the search reads in place and
//! which usearch itself can still load: the engine tests compare both searches on it).
//!
//! Insertion is the usual HNSW one: a random level per item (from a hash of its key, so a build
//! is repeatable on one thread), a greedy descent through the levels above it, then at each of
//! its own levels a beam search of width `ef_construction`, neighbours chosen by the
//! diversity heuristic (a candidate is kept only if it is nearer to the new item than to every
//! neighbour kept so far; fewer candidates than room are all kept), and reverse links, re-pruned
//! by the same heuristic when a list is full. A new item links to up to m neighbours at every
//! level (as usearch and hnswlib do: 2·m at level 0 was measured no better and slower); lists
//! hold up to 2·m links at level 0 and m above. A link a re-pruning drops because a kept
//! neighbour is nearer to it is handed to that neighbour when its list has room.
//!
//! What makes it cheaper than the engine it replaces: distances are numkong's SIMD kernels;
//! for cosine on a copy of the vectors scaled to unit length in f16 (one dot product, half the
//! memory traffic of the f32 input: insertion at 1M x 64 took 66.7 s instead of 91.2 s in one
//! run, recall@10 at ef 64 0.9515 against 0.9538), every node has
//! its own lock (a reader copies a list out and lets go), and each worker thread has its own
//! visited stamps (no hashing). Items are appended in batches between parallel phases, so the
//! tables are only ever resized while no insertion runs.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, RwLock};

use numkong::{Dot, Euclidean};

use crate::error::{AnnError, Result};
use crate::hnsw::D;
use crate::layout::{u32_at, u64_at, GraphHead};
use crate::metric::{Metric, Quantization};

/// The search width of [`Graph::relink`]: wide, since the items it links are those a search
/// has trouble finding.
const RELINK_EF: usize = 256;
/// How many of its nearest items [`Graph::relink`] makes link to the item, even when their
/// lists are full.
const RELINK_FORCED: usize = 3;

/// The highest level an item may get (usearch's level type is i16; HNSW levels stay far below).
const MAX_LEVEL: usize = 30;

/// The dense head usearch writes before its graph: magic, version, kinds, counts (64 bytes).
const DENSE_HEAD_LEN: usize = 64;
/// usearch 2.26.6, whose loader the tests check this layout against.
const USEARCH_VERSION: [u16; 3] = [2, 26, 6];

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One worker thread's scratch space for searches in the graph being built.
#[derive(Default)]
pub(crate) struct Scratch {
    /// `stamp[slot] == epoch`: visited in the current search.
    stamp: Vec<u32>,
    epoch: u32,
    cand: BinaryHeap<Reverse<(D, u32)>>,
    top: BinaryHeap<(D, u32)>,
    list: Vec<u32>,
    fresh: Vec<u32>,
}

impl Scratch {
    fn begin(&mut self, n: usize) {
        if self.stamp.len() < n {
            self.stamp.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.stamp.iter_mut().for_each(|s| *s = 0);
            self.epoch = 1;
        }
        self.cand.clear();
        self.top.clear();
    }
    /// Marks `slot` visited; false if it was already.
    #[inline]
    fn visit(&mut self, slot: u32) -> bool {
        let s = &mut self.stamp[slot as usize];
        if *s == self.epoch {
            false
        } else {
            *s = self.epoch;
            true
        }
    }
}

/// The graph of an index being built (or extended by a fold).
pub(crate) struct Graph {
    dims: usize,
    metric: Metric,
    quant: Quantization,
    /// Links per node above level 0 (m), and at level 0 (2·m).
    conn: usize,
    conn_base: usize,
    ef: usize,
    /// 1 / ln(m): the level distribution's scale.
    ml: f64,
    keys: Vec<u64>,
    /// Every item's input vector (f32, exactly as given), slot after slot.
    vectors: Vec<f32>,
    /// For cosine: 1 / the norm of each vector (0 for a zero vector).
    inv: Vec<f32>,
    /// For cosine, unless dropped ([`Graph::drop_unit_copy`]): each vector scaled to unit
    /// length (zero stays zero), in f16, slot after slot. The build's distances read these
    /// when present (half the memory traffic of the input vectors, one dot product a
    /// distance), else the f32 input times the two inverse norms.
    unit: Vec<numkong::f16>,
    unit_on: bool,
    levels: Vec<u8>,
    /// Level-0 neighbour lists, one after another: a count, then `conn_base` slots. Readers
    /// copy a list out without a lock (a list being rewritten may be read half old, half new:
    /// every word is a valid slot either way); writers hold the node's lock.
    base: Vec<AtomicU32>,
    /// Upper-level lists of each node (empty for level-0 nodes): per level a count, then
    /// `conn` slots.
    upper: Vec<Box<[AtomicU32]>>,
    /// Each node's writer lock.
    locks: Vec<Mutex<()>>,
    /// The entry point and the graph's top level; `None` while the graph is empty.
    entry: RwLock<Option<(u32, usize)>>,
}

impl Graph {
    pub fn new(
        dims: usize,
        metric: Metric,
        quant: Quantization,
        m: usize,
        ef: usize,
        capacity: usize,
        unit_copy: bool,
    ) -> Graph {
        let conn = m.max(2);
        // Never reserve more than a million items up front: `capacity` is an estimate (a
        // table's reltuples can be stale); the tables grow by half as items arrive.
        let capacity = capacity.min(1 << 20);
        Graph {
            dims,
            metric,
            quant,
            conn,
            conn_base: conn * 2,
            ef: ef.max(conn),
            ml: 1.0 / (conn as f64).ln(),
            keys: Vec::with_capacity(capacity),
            vectors: Vec::with_capacity(capacity * dims),
            inv: Vec::with_capacity(if metric == Metric::Cosine {
                capacity
            } else {
                0
            }),
            unit: Vec::with_capacity(if metric == Metric::Cosine && unit_copy {
                capacity * dims
            } else {
                0
            }),
            unit_on: metric == Metric::Cosine && unit_copy,
            levels: Vec::with_capacity(capacity),
            base: Vec::with_capacity(capacity * (1 + conn * 2)),
            upper: Vec::with_capacity(capacity),
            locks: Vec::with_capacity(capacity),
            entry: RwLock::new(None),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn key(&self, slot: usize) -> u64 {
        self.keys[slot]
    }

    pub fn vector(&self, slot: usize) -> &[f32] {
        &self.vectors[slot * self.dims..(slot + 1) * self.dims]
    }

    /// Bytes the graph holds now (vectors, links, keys, levels; allocator overhead estimated).
    pub fn memory(&self) -> usize {
        let upper: usize = self
            .upper
            .iter()
            .map(|u| if u.is_empty() { 0 } else { u.len() * 4 + 16 })
            .sum();
        self.vectors.capacity() * 4
            + self.inv.capacity() * 4
            + self.unit.capacity() * 2
            + self.keys.capacity() * 8
            + self.levels.capacity()
            + self.base.capacity() * 4
            + self.upper.capacity() * std::mem::size_of::<Box<[AtomicU32]>>()
            + self.locks.capacity() * std::mem::size_of::<Mutex<()>>()
            + upper
    }

    /// Frees the f16 unit copy: distances read the f32 input from here on (a build whose
    /// memory budget cannot hold the copy). Call between insertion phases only.
    pub fn drop_unit_copy(&mut self) {
        self.unit_on = false;
        self.unit = Vec::new();
    }

    fn record_words(&self, level: usize) -> usize {
        1 + self.conn_base + level * (1 + self.conn)
    }

    /// Level `l`'s list of `slot`: its count, then its capacity of slots.
    #[inline]
    fn list(&self, slot: usize, l: usize) -> &[AtomicU32] {
        if l == 0 {
            let w = 1 + self.conn_base;
            &self.base[slot * w..(slot + 1) * w]
        } else {
            let w = 1 + self.conn;
            self.upper[slot].get((l - 1) * w..l * w).unwrap_or(&[])
        }
    }

    #[inline]
    fn cap(&self, l: usize) -> usize {
        if l == 0 {
            self.conn_base
        } else {
            self.conn
        }
    }

    /// A level for a new item, drawn from a hash of its key (repeatable).
    fn level_of(&self, key: u64) -> usize {
        let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let u = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        ((-u.ln() * self.ml) as usize).min(MAX_LEVEL)
    }

    /// Appends items (not yet linked: [`Graph::insert`] links each). Returns the first new slot.
    pub fn push(&mut self, keys: &[u64], vectors: &[f32]) -> usize {
        let first = self.keys.len();
        let need = first + keys.len();
        if need > self.keys.capacity() {
            // Grow by half (not double): the tables are most of a build's memory.
            let to = need.max(self.keys.capacity() * 3 / 2);
            let more = to - first;
            self.keys.reserve_exact(more);
            self.vectors.reserve_exact(more * self.dims);
            if self.metric == Metric::Cosine {
                self.inv.reserve_exact(more);
                if self.unit_on {
                    self.unit.reserve_exact(more * self.dims);
                }
            }
            self.levels.reserve_exact(more);
            self.base.reserve_exact(more * (1 + self.conn_base));
            self.upper.reserve_exact(more);
            self.locks.reserve_exact(more);
        }
        self.keys.extend_from_slice(keys);
        self.vectors.extend_from_slice(vectors);
        for (i, &k) in keys.iter().enumerate() {
            if self.metric == Metric::Cosine {
                let v = &vectors[i * self.dims..(i + 1) * self.dims];
                self.inv.push(crate::layout::inv_norm(v));
                if self.unit_on {
                    push_unit(&mut self.unit, v);
                }
            }
            let level = self.level_of(k);
            self.levels.push(level as u8);
            self.base
                .extend((0..1 + self.conn_base).map(|_| AtomicU32::new(0)));
            self.upper.push(
                (0..level * (1 + self.conn))
                    .map(|_| AtomicU32::new(0))
                    .collect(),
            );
            self.locks.push(Mutex::new(()));
        }
        first
    }

    /// The build distance between two items (ranks like the search's distance).
    #[inline]
    fn dist(&self, a: usize, b: usize) -> f32 {
        let d = self.dims;
        let r = match self.metric {
            Metric::Cosine if self.unit_on => numkong::f16::dot(
                &self.unit[a * d..(a + 1) * d],
                &self.unit[b * d..(b + 1) * d],
            )
            .map(|x| 1.0 - x),
            Metric::Cosine => f32::dot(self.vector(a), self.vector(b))
                .map(|x| 1.0 - (x as f32) * self.inv[a] * self.inv[b]),
            Metric::InnerProduct => f32::dot(self.vector(a), self.vector(b)).map(|x| -(x as f32)),
            Metric::L2 => f32::sqeuclidean(self.vector(a), self.vector(b)).map(|x| x as f32),
        };
        match r {
            Some(x) if !x.is_nan() => x,
            _ => f32::INFINITY,
        }
    }

    /// Copies `slot`'s level-`l` list into `out`.
    #[inline]
    fn read_list(&self, slot: usize, l: usize, out: &mut Vec<u32>) {
        out.clear();
        let list = self.list(slot, l);
        if let Some((count, links)) = list.split_first() {
            let count = (count.load(Ordering::Acquire) as usize).min(links.len());
            out.extend(links[..count].iter().map(|x| x.load(Ordering::Relaxed)));
        }
    }

    /// Reads one value of each cache line of the vectors of `slots` (their loads overlap).
    fn touch(&self, slots: &[u32]) {
        let d = self.dims;
        let mut acc = 0f32;
        if self.unit_on {
            for &s in slots {
                let v = &self.unit[s as usize * d..(s as usize + 1) * d];
                for i in (0..d).step_by(32) {
                    acc += v[i].to_f32();
                }
            }
        } else {
            for &s in slots {
                let v = &self.vectors[s as usize * d..(s as usize + 1) * d];
                for i in (0..d).step_by(16) {
                    acc += v[i];
                }
            }
        }
        std::hint::black_box(acc);
    }

    /// Greedy descent at level `l` from `(cur, d)` towards `q`.
    fn greedy(&self, q: usize, cur: usize, d: f32, l: usize, s: &mut Scratch) -> (usize, f32) {
        self.greedy_by(|n| self.dist(q, n), Some(q as u32), cur, d, l, s)
    }

    /// Greedy descent at level `l` from `(cur, d)` by the distance `dist` (to an item or a
    /// query), never stepping onto `skip`.
    fn greedy_by(
        &self,
        dist: impl Fn(usize) -> f32,
        skip: Option<u32>,
        mut cur: usize,
        mut d: f32,
        l: usize,
        s: &mut Scratch,
    ) -> (usize, f32) {
        loop {
            let mut moved = false;
            let mut list = std::mem::take(&mut s.list);
            self.read_list(cur, l, &mut list);
            for &n in &list {
                if Some(n) == skip {
                    continue;
                }
                let dn = dist(n as usize);
                if dn < d {
                    (cur, d, moved) = (n as usize, dn, true);
                }
            }
            s.list = list;
            if !moved {
                return (cur, d);
            }
        }
    }

    /// Beam search of width `ef` at level `l` for item `q` from `eps`; the result, nearest
    /// first, excludes `q`.
    fn search_layer(
        &self,
        q: usize,
        eps: &[(f32, u32)],
        ef: usize,
        l: usize,
        s: &mut Scratch,
    ) -> Vec<(f32, u32)> {
        self.search_layer_by(|n| self.dist(q, n), Some(q as u32), eps, ef, l, s)
    }

    /// Beam search of width `ef` at level `l` by the distance `dist` from `eps`; the result,
    /// nearest first (ties by slot), never holds `skip`.
    fn search_layer_by(
        &self,
        dist: impl Fn(usize) -> f32,
        skip: Option<u32>,
        eps: &[(f32, u32)],
        ef: usize,
        l: usize,
        s: &mut Scratch,
    ) -> Vec<(f32, u32)> {
        s.begin(self.keys.len());
        if let Some(q) = skip {
            s.visit(q);
        }
        for &(d, e) in eps {
            if s.visit(e) {
                s.cand.push(Reverse((D(d), e)));
                s.top.push((D(d), e));
                if s.top.len() > ef {
                    s.top.pop();
                }
            }
        }
        let mut list = std::mem::take(&mut s.list);
        let mut fresh = std::mem::take(&mut s.fresh);
        while let Some(Reverse((D(d), c))) = s.cand.pop() {
            if s.top.len() >= ef && s.top.peek().is_some_and(|w| d > w.0 .0) {
                break;
            }
            self.read_list(c as usize, l, &mut list);
            fresh.clear();
            for &n in &list {
                if s.visit(n) {
                    fresh.push(n);
                }
            }
            self.touch(&fresh);
            for &n in &fresh {
                let dn = dist(n as usize);
                if s.top.len() < ef || s.top.peek().is_some_and(|w| dn < w.0 .0) {
                    s.cand.push(Reverse((D(dn), n)));
                    s.top.push((D(dn), n));
                    if s.top.len() > ef {
                        s.top.pop();
                    }
                }
            }
        }
        s.list = list;
        s.fresh = fresh;
        let mut out: Vec<(f32, u32)> = s.top.drain().map(|(D(d), n)| (d, n)).collect();
        out.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        out
    }

    /// The diversity heuristic: from `cands` (distances to the base item, nearest first) keeps
    /// each candidate nearer to the base than to every one kept before it, up to `cap`; fewer
    /// candidates than `cap` are all kept.
    fn select(&self, cands: &[(f32, u32)], cap: usize) -> Vec<(f32, u32)> {
        self.select_with(cands, cap, None)
    }

    /// [`Graph::select`], also naming for each candidate left out the kept one nearer to it
    /// than the base is (`passed_over`: (left out, kept)).
    fn select_with(
        &self,
        cands: &[(f32, u32)],
        cap: usize,
        mut passed_over: Option<&mut Vec<(u32, u32)>>,
    ) -> Vec<(f32, u32)> {
        if cands.len() < cap {
            // Fewer candidates than room (the sparse upper levels, a young graph): all of
            // them, as usearch does.
            return cands.to_vec();
        }
        let mut kept: Vec<(f32, u32)> = Vec::with_capacity(cap);
        for &(d, c) in cands {
            if kept.len() >= cap {
                break;
            }
            match kept
                .iter()
                .find(|&&(_, k)| self.dist(c as usize, k as usize) < d)
            {
                None => kept.push((d, c)),
                Some(&(_, k)) => {
                    if let Some(p) = passed_over.as_deref_mut() {
                        p.push((c, k));
                    }
                }
            }
        }
        kept
    }

    /// Adds `new` (distances to `base`) to `base`'s level-`l` list; a list that would overflow
    /// is re-chosen by the heuristic from its links and the new ones.
    fn link(&self, base: usize, l: usize, new: &[(f32, u32)]) {
        let _g = lock(&self.locks[base]);
        let Some((cnt, links)) = self.list(base, l).split_first() else {
            return;
        };
        let cap = links.len();
        let have = current(cnt, links);
        let count = have.len();
        let fits: Vec<u32> = new
            .iter()
            .map(|x| x.1)
            .filter(|n| *n as usize != base && !have.contains(n))
            .collect();
        if fits.is_empty() {
            return;
        }
        if count + fits.len() <= cap {
            for (i, n) in fits.iter().enumerate() {
                links[count + i].store(*n, Ordering::Relaxed);
            }
            cnt.store((count + fits.len()) as u32, Ordering::Release);
            return;
        }
        let mut all: Vec<(f32, u32)> = have
            .iter()
            .map(|&n| (self.dist(base, n as usize), n))
            .collect();
        all.extend(new.iter().filter(|x| fits.contains(&x.1)).copied());
        all.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut passed_over = Vec::new();
        let kept = self.select_with(&all, cap, Some(&mut passed_over));
        for (i, (_, n)) in kept.iter().enumerate() {
            links[i].store(*n, Ordering::Relaxed);
        }
        cnt.store(kept.len() as u32, Ordering::Release);
        drop(_g);
        // A link dropped because a kept neighbour is nearer to it goes to that neighbour when
        // its list has room (no lock is held here, so waiting for that one is safe): the
        // dropped item keeps an in-link from its own neighbourhood, so it stays easy to find
        // (at 1M clustered items: recall@10 at ef 64 0.90 -> 0.957, own vector missed at
        // ef 256 1.6 % -> 0.8 %, for no measurable time).
        for (gone, via) in passed_over {
            self.offer(via as usize, l, gone);
        }
    }

    /// Appends `n` to `base`'s level-`l` list if it has room. The caller holds no lock.
    fn offer(&self, base: usize, l: usize, n: u32) {
        if base == n as usize {
            return;
        }
        let _g = lock(&self.locks[base]);
        let Some((cnt, links)) = self.list(base, l).split_first() else {
            return;
        };
        let count = (cnt.load(Ordering::Relaxed) as usize).min(links.len());
        if count < links.len()
            && !links[..count]
                .iter()
                .any(|x| x.load(Ordering::Relaxed) == n)
        {
            links[count].store(n, Ordering::Relaxed);
            cnt.store((count + 1) as u32, Ordering::Release);
        }
    }

    /// Links item `q` (pushed already) into the graph. Safe to call from several threads at
    /// once for different items.
    pub fn insert(&self, q: usize, s: &mut Scratch) {
        let lq = self.levels[q] as usize;
        let start = *self.entry.read().unwrap_or_else(|p| p.into_inner());
        let Some((ep, top)) = start else {
            let mut e = self.entry.write().unwrap_or_else(|p| p.into_inner());
            match *e {
                None => {
                    *e = Some((q as u32, lq));
                    return;
                }
                Some(_) => {
                    drop(e);
                    return self.insert(q, s);
                }
            }
        };
        if ep as usize == q {
            return;
        }
        let (mut cur, mut d) = (ep as usize, self.dist(q, ep as usize));
        for l in (lq + 1..=top).rev() {
            (cur, d) = self.greedy(q, cur, d, l, s);
        }
        let mut eps = vec![(d, cur as u32)];
        for l in (0..=lq.min(top)).rev() {
            let w = self.search_layer(q, &eps, self.ef, l, s);
            let chosen = self.select(&w, self.conn);
            self.link(q, l, &chosen);
            for &(dn, n) in &chosen {
                self.link(n as usize, l, &[(dn, q as u32)]);
            }
            if let Some(&nearest) = w.first() {
                eps = vec![nearest];
            }
        }
        if lq > top {
            let mut e = self.entry.write().unwrap_or_else(|p| p.into_inner());
            if e.is_none_or(|(_, t)| lq > t) {
                *e = Some((q as u32, lq));
            }
        }
    }

    /// Links an item the graph does not reach: its nearest items (from a search for its own
    /// vector) link to it, the nearest ones even when their lists are full (their farthest
    /// link gives way), and it links to them.
    pub fn relink(&self, q: usize, s: &mut Scratch) {
        let Some((ep, top)) = *self.entry.read().unwrap_or_else(|p| p.into_inner()) else {
            return;
        };
        if ep as usize == q {
            return;
        }
        let (mut cur, mut d) = (ep as usize, self.dist(q, ep as usize));
        for l in (1..=top).rev() {
            (cur, d) = self.greedy(q, cur, d, l, s);
        }
        let w = self.search_layer(q, &[(d, cur as u32)], self.ef.max(RELINK_EF), 0, s);
        let chosen = self.select(&w, self.conn_base);
        self.link(q, 0, &chosen);
        for (i, &(dn, n)) in chosen.iter().enumerate() {
            if i < RELINK_FORCED {
                self.force_link(n as usize, q as u32, dn);
            } else {
                self.link(n as usize, 0, &[(dn, q as u32)]);
            }
        }
    }

    /// Puts `q` into `base`'s level-0 list, in place of its farthest link if the list is full.
    fn force_link(&self, base: usize, q: u32, dq: f32) {
        let _g = lock(&self.locks[base]);
        let Some((cnt, links)) = self.list(base, 0).split_first() else {
            return;
        };
        let have = current(cnt, links);
        let count = have.len();
        if have.contains(&q) {
            return;
        }
        if count < links.len() {
            links[count].store(q, Ordering::Relaxed);
            cnt.store((count + 1) as u32, Ordering::Release);
            return;
        }
        let (far, fd) = have
            .iter()
            .enumerate()
            .map(|(i, n)| (i, self.dist(base, *n as usize)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("a full list");
        if fd > dq {
            links[far].store(q, Ordering::Relaxed);
        }
    }

    /// Slots no search can reach: not connected to the entry point by any level's links.
    pub fn unreachable(&self) -> Vec<usize> {
        let n = self.keys.len();
        let Some((ep, _)) = *self.entry.read().unwrap_or_else(|p| p.into_inner()) else {
            return (0..n).collect();
        };
        let mut seen = vec![false; n];
        let mut stack = vec![ep as usize];
        seen[ep as usize] = true;
        let mut list = Vec::new();
        while let Some(x) = stack.pop() {
            for l in 0..=self.levels[x] as usize {
                self.read_list(x, l, &mut list);
                for &y in &list {
                    if !seen[y as usize] {
                        seen[y as usize] = true;
                        stack.push(y as usize);
                    }
                }
            }
        }
        (0..n).filter(|i| !seen[*i]).collect()
    }

    /// A query vector in the form [`Graph::dist_to`] reads: f32 (the tuning's exact
    /// neighbours must rank as a scan ranks them, so not on the f16 unit copy).
    pub fn probe(&self, v: &[f32]) -> Probe {
        Probe(v.to_vec(), crate::layout::inv_norm(v))
    }

    /// The distance from a query to item `b` in f32, ranked as the search of an f32 image
    /// ranks it.
    #[inline]
    pub fn dist_to(&self, p: &Probe, b: usize) -> f32 {
        let v = self.vector(b);
        let r = match self.metric {
            Metric::Cosine => f32::dot(&p.0, v).map(|x| 1.0 - (x as f32) * p.1 * self.inv[b]),
            Metric::InnerProduct => f32::dot(&p.0, v).map(|x| -(x as f32)),
            Metric::L2 => f32::sqeuclidean(&p.0, v).map(|x| x as f32),
        };
        match r {
            Some(x) if !x.is_nan() => x,
            _ => f32::INFINITY,
        }
    }

    /// A search for a query: the greedy descent through the upper levels, then a beam of width
    /// `ef` at level 0; nearest first, ties by slot.
    pub fn search_probe(&self, p: &Probe, ef: usize, s: &mut Scratch) -> Vec<(f32, u32)> {
        let Some((ep, top)) = *self.entry.read().unwrap_or_else(|e| e.into_inner()) else {
            return Vec::new();
        };
        let dist = |n: usize| self.dist_to(p, n);
        let (mut cur, mut d) = (ep as usize, dist(ep as usize));
        for l in (1..=top).rev() {
            (cur, d) = self.greedy_by(dist, None, cur, d, l, s);
        }
        self.search_layer_by(dist, None, &[(d, cur as u32)], ef.max(1), 0, s)
    }

    /// The exact `k` nearest items of a query (every item's distance), nearest first, ties by
    /// slot.
    pub fn exact_top(&self, p: &Probe, k: usize) -> Vec<(f32, u32)> {
        let mut top: BinaryHeap<(D, u32)> = BinaryHeap::with_capacity(k + 1);
        for b in 0..self.keys.len() {
            let d = self.dist_to(p, b);
            if top.len() < k {
                top.push((D(d), b as u32));
            } else if top.peek().is_some_and(|w| (D(d), b as u32) < *w) {
                top.pop();
                top.push((D(d), b as u32));
            }
        }
        let mut out: Vec<(f32, u32)> = top.into_iter().map(|(D(d), n)| (d, n)).collect();
        out.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        out
    }

    /// The build distance between two items (for the tuning's choice of a link's source).
    #[inline]
    pub fn item_dist(&self, a: usize, b: usize) -> f32 {
        self.dist(a, b)
    }

    /// Room for `extra` more links in every level-0 list (the query-aware links of
    /// `tune.rs`). Call between phases only: the lists are copied.
    pub fn widen(&mut self, extra: usize) {
        if extra == 0 {
            return;
        }
        let (old, new) = (1 + self.conn_base, 1 + self.conn_base + extra);
        let n = self.keys.len();
        let mut base = Vec::with_capacity(n * new);
        for slot in 0..n {
            base.extend(
                self.base[slot * old..(slot + 1) * old]
                    .iter()
                    .map(|w| AtomicU32::new(w.load(Ordering::Relaxed))),
            );
            base.extend((0..extra).map(|_| AtomicU32::new(0)));
        }
        self.base = base;
        self.conn_base += extra;
    }

    /// Appends `to` to `from`'s level-0 list when it has room and does not hold it already.
    pub fn add_link(&self, from: usize, to: u32) -> Link {
        if from == to as usize {
            return Link::Present;
        }
        let _g = lock(&self.locks[from]);
        let Some((cnt, links)) = self.list(from, 0).split_first() else {
            return Link::Full;
        };
        let count = (cnt.load(Ordering::Relaxed) as usize).min(links.len());
        if links[..count]
            .iter()
            .any(|x| x.load(Ordering::Relaxed) == to)
        {
            return Link::Present;
        }
        if count == links.len() {
            return Link::Full;
        }
        links[count].store(to, Ordering::Relaxed);
        cnt.store((count + 1) as u32, Ordering::Release);
        Link::Added
    }

    /// Level-0 links of `slot`.
    pub fn base_links(&self, slot: usize) -> Vec<u32> {
        let mut out = Vec::new();
        self.read_list(slot, 0, &mut out);
        out
    }

    fn row_bytes(&self) -> usize {
        self.dims * self.quant.bytes_per_scalar()
    }

    fn node_bytes(&self, level: usize) -> usize {
        10 + 4 * self.record_words(level)
    }

    /// Bytes of the serialized graph.
    pub fn serialized_length(&self) -> usize {
        let n = self.keys.len();
        let nodes: usize = self
            .levels
            .iter()
            .map(|l| self.node_bytes(*l as usize))
            .sum();
        8 + n * self.row_bytes() + DENSE_HEAD_LEN + 40 + 2 * n + nodes
    }

    /// Writes the serialized graph into `out` (exactly [`Graph::serialized_length`] bytes).
    pub fn serialize_into(&self, out: &mut [u8]) -> Result<()> {
        let n = self.keys.len();
        if out.len() != self.serialized_length() {
            return Err(AnnError::Engine(
                "serialization buffer of the wrong size".into(),
            ));
        }
        let rb = self.row_bytes();
        out[0..4].copy_from_slice(&(n as u32).to_le_bytes());
        out[4..8].copy_from_slice(&(rb as u32).to_le_bytes());
        let mut at = 8;
        for slot in 0..n {
            store(self.quant, self.vector(slot), &mut out[at..at + rb]);
            at += rb;
        }
        let head = &mut out[at..at + DENSE_HEAD_LEN];
        head.fill(0);
        head[0..7].copy_from_slice(b"usearch");
        for (i, v) in USEARCH_VERSION.iter().enumerate() {
            head[7 + 2 * i..9 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        head[13] = match self.metric {
            Metric::Cosine => b'c',
            Metric::InnerProduct => b'i',
            Metric::L2 => b'e',
        };
        head[14] = match self.quant {
            Quantization::F32 => 11,
            Quantization::F16 => 12,
            Quantization::I8 => 23,
        };
        head[15] = 14; // keys: u64
        head[16] = 15; // slots: u32
        head[17..25].copy_from_slice(&(n as u64).to_le_bytes());
        head[33..41].copy_from_slice(&(self.dims as u64).to_le_bytes());
        at += DENSE_HEAD_LEN;
        let entry = *self.entry.read().unwrap_or_else(|p| p.into_inner());
        let (entry_slot, max_level) = match entry {
            Some((e, t)) if n > 0 => (e as u64, t as u64),
            // (usearch writes level -1 for an empty graph, which no reader needs: 0 parses.)
            _ => (0, 0),
        };
        for w in [
            n as u64,
            self.conn as u64,
            self.conn_base as u64,
            max_level,
            entry_slot,
        ] {
            out[at..at + 8].copy_from_slice(&w.to_le_bytes());
            at += 8;
        }
        for &l in &self.levels {
            out[at..at + 2].copy_from_slice(&(l as i16).to_le_bytes());
            at += 2;
        }
        for slot in 0..n {
            let level = self.levels[slot] as usize;
            let len = self.node_bytes(level);
            let rec = &mut out[at..at + len];
            rec[0..8].copy_from_slice(&self.keys[slot].to_le_bytes());
            rec[8..10].copy_from_slice(&(level as i16).to_le_bytes());
            let words = self.list(slot, 0).iter().chain(self.upper[slot].iter());
            for (i, w) in words.enumerate() {
                rec[10 + 4 * i..14 + 4 * i]
                    .copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
            }
            at += len;
        }
        debug_assert_eq!(at, out.len());
        Ok(())
    }

    /// The graph of a serialized f32 graph (`graph.rs`'s layout), ready to be extended.
    pub fn load(
        graph: &[u8],
        dims: usize,
        metric: Metric,
        m: usize,
        ef: usize,
        extra: usize,
    ) -> Result<Graph> {
        let bad = || AnnError::CorruptImage("the stored graph cannot be loaded".into());
        let h = GraphHead::parse(graph, dims, Quantization::F32)?;
        let n = h.size;
        let mut g = Graph::new(dims, metric, Quantization::F32, m, ef, n + extra, true);
        if h.conn != g.conn || h.conn_base != g.conn_base {
            return Err(AnnError::Engine(format!(
                "the stored graph has {} links a node, the index asks for {}",
                h.conn, g.conn
            )));
        }
        let mut at = h.nodes_at;
        let mut vecs = Vec::with_capacity(dims);
        for slot in 0..n {
            let key = u64_at(graph, at).ok_or_else(bad)?;
            let level = i16::from_le_bytes(
                graph
                    .get(at + 8..at + 10)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?,
            );
            if level < 0 || level as usize > h.max_level.min(255) {
                return Err(bad());
            }
            let row = crate::layout::row(graph, &h, slot).ok_or_else(bad)?;
            crate::layout::decode(Quantization::F32, row, &mut vecs);
            g.keys.push(key);
            g.vectors.extend_from_slice(&vecs);
            if metric == Metric::Cosine {
                g.inv.push(crate::layout::inv_norm(&vecs));
                if g.unit_on {
                    push_unit(&mut g.unit, &vecs);
                }
            }
            g.levels.push(level as u8);
            let words = g.record_words(level as usize);
            let mut rec = vec![0u32; words];
            for (i, w) in rec.iter_mut().enumerate() {
                *w = u32_at(graph, at + 10 + 4 * i).ok_or_else(bad)?;
            }
            let mut a = 0;
            for l in 0..=level as usize {
                let count = rec[a] as usize;
                if count > g.cap(l) || rec[a + 1..a + 1 + count].iter().any(|s| *s as usize >= n) {
                    return Err(bad());
                }
                a += 1 + g.cap(l);
            }
            let (b, u) = rec.split_at(1 + g.conn_base);
            g.base.extend(b.iter().map(|w| AtomicU32::new(*w)));
            g.upper.push(u.iter().map(|w| AtomicU32::new(*w)).collect());
            g.locks.push(Mutex::new(()));
            at += g.node_bytes(level as usize);
        }
        if at != graph.len() {
            return Err(bad());
        }
        if n > 0 {
            if h.entry >= n {
                return Err(bad());
            }
            *g.entry.write().unwrap_or_else(|p| p.into_inner()) =
                Some((h.entry as u32, h.max_level));
        }
        Ok(g)
    }
}

/// A query as [`Graph::dist_to`] reads it: the f32 vector and its inverse norm.
pub(crate) struct Probe(Vec<f32>, f32);

/// What [`Graph::add_link`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    Added,
    Present,
    Full,
}

/// Appends `v` scaled to unit length (a zero vector as is), in f16.
fn push_unit(out: &mut Vec<numkong::f16>, v: &[f32]) {
    let inv = crate::layout::inv_norm(v);
    out.extend(v.iter().map(|x| numkong::f16::from_f32(x * inv)));
}

/// The links of a list (its count word, then its slots), read by its lock's holder.
fn current(cnt: &AtomicU32, links: &[AtomicU32]) -> Vec<u32> {
    let count = (cnt.load(Ordering::Relaxed) as usize).min(links.len());
    links[..count]
        .iter()
        .map(|x| x.load(Ordering::Relaxed))
        .collect()
}

/// Writes `v` in the stored form of `quant` (f16: rounded to nearest; i8: as usearch casts for
/// cosine, scaled to unit length times 127 and truncated).
fn store(quant: Quantization, v: &[f32], out: &mut [u8]) {
    match quant {
        Quantization::F32 => {
            for (i, x) in v.iter().enumerate() {
                out[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes());
            }
        }
        Quantization::F16 => {
            for (i, x) in v.iter().enumerate() {
                out[2 * i..2 * i + 2].copy_from_slice(&numkong::f16::from_f32(*x).0.to_le_bytes());
            }
        }
        Quantization::I8 => {
            let mag = v
                .iter()
                .map(|x| (*x as f64) * (*x as f64))
                .sum::<f64>()
                .sqrt();
            for (i, x) in v.iter().enumerate() {
                out[i] = if mag > 0.0 {
                    ((*x as f64) * 127.0 / mag).clamp(-127.0, 127.0) as i8 as u8
                } else {
                    0
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twotower_testkit::vectors::clustered;

    fn built(n: usize, dims: usize, threads: usize, metric: Metric) -> Graph {
        let data = clustered(n, dims, 20, 5);
        let keys: Vec<u64> = (0..n as u64).map(|k| k * 3 + 1).collect();
        let mut g = Graph::new(dims, metric, Quantization::F32, 8, 32, n, true);
        g.push(&keys, &data);
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    let mut scratch = Scratch::default();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        g.insert(i, &mut scratch);
                    }
                });
            }
        });
        g
    }

    fn bytes(g: &Graph) -> Vec<u8> {
        let mut out = vec![0u8; g.serialized_length()];
        g.serialize_into(&mut out).unwrap();
        out
    }

    #[test]
    fn a_one_thread_build_is_repeatable_and_reloads_to_the_same_bytes() {
        for metric in [Metric::Cosine, Metric::InnerProduct, Metric::L2] {
            let a = bytes(&built(3000, 16, 1, metric));
            let b = bytes(&built(3000, 16, 1, metric));
            assert!(a == b, "{metric:?}: two one-thread builds differ");
            let g = Graph::load(&a, 16, metric, 8, 32, 0).unwrap();
            assert_eq!(g.len(), 3000);
            assert!(
                bytes(&g) == a,
                "{metric:?}: load + serialize changed the graph"
            );
        }
    }

    #[test]
    fn lists_stay_within_capacity_and_levels_follow_the_distribution() {
        let g = built(20_000, 16, 2, Metric::Cosine);
        let mut per_level = [0usize; 8];
        let mut list = Vec::new();
        for slot in 0..g.len() {
            let level = g.levels[slot] as usize;
            per_level[level.min(7)] += 1;
            for l in 0..=level {
                g.read_list(slot, l, &mut list);
                assert!(list.len() <= g.cap(l));
                assert!(!list.contains(&(slot as u32)), "a self-loop at {slot}");
                for &n in &list {
                    assert!(
                        g.levels[n as usize] as usize >= l,
                        "a link to a missing level"
                    );
                }
            }
        }
        // P(level >= 1) = 1/m = 1/8: 2500 expected of 20 000.
        let upper: usize = per_level[1..].iter().sum();
        assert!((2000..3000).contains(&upper), "{per_level:?}");
        assert!(g.unreachable().len() < 20, "{:?}", g.unreachable().len());
    }

    #[test]
    fn an_unlinked_item_is_found_unreachable_and_relinked() {
        let g = built(5000, 16, 1, Metric::Cosine);
        assert!(g.unreachable().is_empty());
        // Cut every link to item 1234 (as a lost race or a pruning could).
        let lost = 1234u32;
        for slot in 0..g.len() {
            for l in 0..=g.levels[slot] as usize {
                let Some((cnt, links)) = g.list(slot, l).split_first() else {
                    continue;
                };
                let count = cnt.load(Ordering::Relaxed) as usize;
                let kept: Vec<u32> = links[..count]
                    .iter()
                    .map(|x| x.load(Ordering::Relaxed))
                    .filter(|x| *x != lost)
                    .collect();
                for (i, x) in kept.iter().enumerate() {
                    links[i].store(*x, Ordering::Relaxed);
                }
                cnt.store(kept.len() as u32, Ordering::Relaxed);
            }
        }
        let entry = g.entry.read().unwrap().unwrap().0;
        if entry != lost {
            assert_eq!(g.unreachable(), vec![lost as usize]);
            g.relink(lost as usize, &mut Scratch::default());
            assert!(g.unreachable().is_empty(), "relinking left it unreachable");
        }
    }

    #[test]
    fn stored_forms_round_trip_within_their_precision() {
        let v = [0.5f32, -0.25, 3.0, 0.0];
        let mut out = vec![0u8; 16];
        store(Quantization::F32, &v, &mut out);
        let mut back = Vec::new();
        crate::layout::decode(Quantization::F32, &out, &mut back);
        assert_eq!(back, v);
        store(Quantization::F16, &v, &mut out[..8]);
        crate::layout::decode(Quantization::F16, &out[..8], &mut back);
        assert_eq!(back, v);
        store(Quantization::I8, &v, &mut out[..4]);
        crate::layout::decode(Quantization::I8, &out[..4], &mut back);
        let norm = (0.25f32 + 0.0625 + 9.0).sqrt();
        for (a, b) in back.iter().zip(&v) {
            assert!((a - b / norm).abs() <= 1.0 / 127.0, "{back:?}");
        }
        store(Quantization::I8, &[0.0; 4], &mut out[..4]);
        assert_eq!(&out[..4], &[0u8; 4]);
    }

    #[test]
    fn a_graph_of_other_connectivity_or_a_damaged_one_is_not_loaded() {
        let a = bytes(&built(500, 16, 1, Metric::L2));
        assert!(Graph::load(&a, 16, Metric::L2, 12, 32, 0).is_err());
        let mut cut = a.clone();
        cut.truncate(a.len() - 3);
        assert!(Graph::load(&cut, 16, Metric::L2, 8, 32, 0).is_err());
        // A link pointing past the last item.
        let h = GraphHead::parse(&a, 16, Quantization::F32).unwrap();
        let mut bad = a.clone();
        let first_link = h.nodes_at + 10 + 4;
        bad[first_link..first_link + 4].copy_from_slice(&9999u32.to_le_bytes());
        bad[h.nodes_at + 10..h.nodes_at + 14].copy_from_slice(&1u32.to_le_bytes());
        assert!(Graph::load(&bad, 16, Metric::L2, 8, 32, 0).is_err());
    }
}
