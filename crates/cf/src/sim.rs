//! Item-to-item similarity over an interaction log: the log becomes two compressed lists (each
//! user's items, each item's users); a source item's row of similarities is accumulated in a
//! dense per-thread array over the items its users touched, so no pair table is ever held and
//! memory stays O(interactions + threads × items) whatever the pair count. Rows are computed
//! for ranges of source items (the caller streams them out and checks for cancellation between
//! ranges), each range on `threads` threads; a row depends on nothing but the log and the
//! options, so results are the same for any thread count.

use crate::error::{CfError, Result};
use crate::log::{stable_hash, Log};
use crate::options::{Kind, Options};
use std::ops::Range;

/// One neighbour row: source item id, neighbour item id, score.
pub type Neighbor = (i64, i64, f32);

pub struct Similarity {
    opts: Options,
    /// The time ages are measured from (item-CF with a half-life).
    reference: f64,
    item_ids: Vec<i64>,
    /// Each user's items (sorted by item index) and their weights.
    u_off: Vec<usize>,
    u_items: Vec<u32>,
    u_w: Vec<f32>,
    /// Each item's users (most recent first) and the weights of their interactions.
    i_off: Vec<usize>,
    i_users: Vec<u32>,
    i_w: Vec<f32>,
    /// Swing: each user's weight (|I_u| + α₁)^(−β).
    wu: Vec<f64>,
    /// Item indices in item-id order.
    by_id: Vec<u32>,
    /// Per item, the estimated work of its row (computed once).
    work: Vec<u64>,
    /// Per user: in the sample.
    kept: Vec<bool>,
}

impl Similarity {
    /// Prepares a build: merges repeated (user, item) pairs (the most recent interaction's time
    /// and weight), samples users, caps heavy users to their most recent `max_user_items`, and
    /// lays out both lists. `budget` bounds the bytes the build allocates.
    pub fn new(log: &Log, opts: &Options, budget: usize) -> Result<Similarity> {
        let n_items = log.items();
        let n_users = log.users();
        let pairs = log.len();
        let needed = log.bytes()
            + pairs * (4 + 4 + 8 + 4 + 4 + 4 + 8) * 2
            + (n_users + n_items) * 16
            + opts.threads * n_items * 16
            + opts.threads * opts.top_n * 64;
        if needed > budget {
            return Err(CfError::MemoryBudget { needed, budget });
        }
        // Per user, their rows (in log order), then merged and capped.
        let mut by_user: Vec<Vec<u32>> = vec![Vec::new(); n_users];
        for (k, r) in log.rows.iter().enumerate() {
            by_user[r.user as usize].push(k as u32);
        }
        let t_max = opts.decay_reference.unwrap_or_else(|| {
            log.rows
                .iter()
                .map(|r| r.ts)
                .fold(f64::NEG_INFINITY, f64::max)
        });
        let decay = |ts: f64| match (opts.kind, opts.half_life) {
            (Kind::ItemCf, Some(h)) => 0.5f64.powf((t_max - ts) / h),
            _ => 1.0,
        };
        let kept: Vec<bool> = log
            .user_ids
            .iter()
            .map(|id| {
                opts.user_sample >= 1.0
                    || (stable_hash(id, opts.seed) as f64) < opts.user_sample * u64::MAX as f64
            })
            .collect();
        let mut u_off = Vec::with_capacity(n_users + 1);
        let mut u_items = Vec::new();
        let mut u_w = Vec::new();
        // (item, user, ts, weight) for the item lists.
        let mut entries: Vec<(u32, u32, f64, f32)> = Vec::new();
        u_off.push(0);
        for (u, rows) in by_user.iter_mut().enumerate() {
            if kept[u] {
                // The most recent interaction with each item (ties: the later row).
                rows.sort_by(|&a, &b| {
                    let (ra, rb) = (&log.rows[a as usize], &log.rows[b as usize]);
                    ra.item
                        .cmp(&rb.item)
                        .then(ra.ts.total_cmp(&rb.ts))
                        .then(a.cmp(&b))
                });
                let mut last: Vec<u32> = Vec::with_capacity(rows.len());
                for (k, &r) in rows.iter().enumerate() {
                    let next_same = rows
                        .get(k + 1)
                        .is_some_and(|&n| log.rows[n as usize].item == log.rows[r as usize].item);
                    if !next_same {
                        last.push(r);
                    }
                }
                if last.len() > opts.max_user_items {
                    // Most recent first (ties: the later row), keep the cap, back in item order.
                    last.sort_by(|&a, &b| {
                        log.rows[b as usize]
                            .ts
                            .total_cmp(&log.rows[a as usize].ts)
                            .then(b.cmp(&a))
                    });
                    last.truncate(opts.max_user_items);
                    last.sort_by_key(|&r| log.rows[r as usize].item);
                }
                for &r in &last {
                    let row = &log.rows[r as usize];
                    let w = (row.weight as f64 * decay(row.ts)) as f32;
                    u_items.push(row.item);
                    u_w.push(w);
                    entries.push((row.item, u as u32, row.ts, w));
                }
            }
            u_off.push(u_items.len());
            *rows = Vec::new();
        }
        // Item lists: most recent first (ties: user index), so Swing's cap keeps the recent users.
        entries.sort_by(|a, b| a.0.cmp(&b.0).then(b.2.total_cmp(&a.2)).then(a.1.cmp(&b.1)));
        let mut i_off = vec![0usize; n_items + 1];
        for e in &entries {
            i_off[e.0 as usize + 1] += 1;
        }
        for k in 0..n_items {
            i_off[k + 1] += i_off[k];
        }
        let i_users = entries.iter().map(|e| e.1).collect();
        let mut by_id: Vec<u32> = (0..n_items as u32).collect();
        by_id.sort_by_key(|&i| log.item_ids[i as usize]);
        let wu = (0..n_users)
            .map(|u| ((u_off[u + 1] - u_off[u]) as f64 + opts.alpha1).powf(-opts.beta))
            .collect();
        let i_w = entries.iter().map(|e| e.3).collect();
        let mut sim = Similarity {
            reference: t_max,
            opts: opts.clone(),
            item_ids: log.item_ids.clone(),
            u_off,
            u_items,
            u_w,
            i_off,
            i_users,
            i_w,
            wu,
            by_id,
            work: Vec::new(),
            kept,
        };
        sim.work = (0..n_items).map(|i| sim.estimate(i)).collect();
        Ok(sim)
    }

    pub fn items(&self) -> usize {
        self.item_ids.len()
    }

    /// The time the decay's ages were measured from (the newest interaction, or the options'
    /// `decay_reference`); a refresh must reuse it.
    pub fn reference(&self) -> f64 {
        self.reference
    }

    /// Users kept by the sample.
    pub fn users(&self) -> usize {
        self.kept.iter().filter(|&&k| k).count()
    }

    /// Distinct (user, item) pairs after merging, sampling and caps.
    pub fn pairs(&self) -> usize {
        self.u_items.len()
    }

    fn user_items(&self, u: u32) -> (&[u32], &[f32]) {
        let (a, b) = (self.u_off[u as usize], self.u_off[u as usize + 1]);
        (&self.u_items[a..b], &self.u_w[a..b])
    }

    /// The users of item `i` a row uses (Swing: the `max_item_users` most recent).
    fn item_users(&self, i: usize) -> (&[u32], &[f32]) {
        let (a, mut b) = (self.i_off[i], self.i_off[i + 1]);
        if self.opts.kind == Kind::Swing {
            b = b.min(a + self.opts.max_item_users);
        }
        (&self.i_users[a..b], &self.i_w[a..b])
    }

    /// An estimate of the work of item `i`'s row (pair visits).
    fn estimate(&self, i: usize) -> u64 {
        let (us, _) = self.item_users(i);
        let visits: u64 = us.iter().map(|&u| self.user_items(u).0.len() as u64).sum();
        match self.opts.kind {
            Kind::ItemCf => visits + 1,
            Kind::Swing => visits * us.len().saturating_sub(1) as u64 + 1,
        }
    }

    /// Consecutive ranges of positions in item-id order (see [`Similarity::rows`]) of about
    /// `target` work each (at least one item).
    pub fn chunks(&self, target: u64) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut acc = 0u64;
        for (p, &i) in self.by_id.iter().enumerate() {
            acc += self.work[i as usize];
            if acc >= target {
                out.push(start..p + 1);
                start = p + 1;
                acc = 0;
            }
        }
        if start < self.items() {
            out.push(start..self.items());
        }
        out
    }

    /// The neighbour rows of the source items at positions `range` of the item-id order, in
    /// that order; per source, score descending, ties by neighbour id. Writing rows in item-id
    /// order lets a B-tree on (item_id, …) append instead of splitting pages at random.
    pub fn rows(&self, range: Range<usize>) -> Vec<Neighbor> {
        self.rows_of(self.sources(range))
    }

    /// The item indices at positions `range` of the item-id order.
    pub fn sources(&self, range: Range<usize>) -> &[u32] {
        &self.by_id[range]
    }

    /// The neighbour rows of the source items `items` (indices), in that order, computed on
    /// the options' threads in contiguous parts of about equal work.
    pub fn rows_of(&self, items: &[u32]) -> Vec<Neighbor> {
        let threads = self.opts.threads.clamp(1, items.len().max(1));
        if threads == 1 {
            let mut scratch = Scratch::new(self.items());
            return items
                .iter()
                .flat_map(|&i| self.row(i as usize, &mut scratch))
                .collect();
        }
        let total: u64 = items.iter().map(|&i| self.work[i as usize]).sum();
        let mut parts: Vec<&[u32]> = Vec::with_capacity(threads);
        let (mut start, mut acc) = (0usize, 0u64);
        for (p, &i) in items.iter().enumerate() {
            acc += self.work[i as usize];
            if parts.len() + 1 < threads && acc * threads as u64 >= total * (parts.len() as u64 + 1)
            {
                parts.push(&items[start..p + 1]);
                start = p + 1;
            }
        }
        parts.push(&items[start..]);
        let outs: Vec<Vec<Neighbor>> = std::thread::scope(|s| {
            let hs: Vec<_> = parts
                .iter()
                .map(|&part| {
                    s.spawn(move || {
                        let mut scratch = Scratch::new(self.items());
                        part.iter()
                            .flat_map(|&i| self.row(i as usize, &mut scratch))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        outs.concat()
    }

    /// Item `i`'s top-N neighbours.
    fn row(&self, i: usize, s: &mut Scratch) -> Vec<Neighbor> {
        let (users, ws) = self.item_users(i);
        match self.opts.kind {
            Kind::ItemCf => {
                for (&u, &wi) in users.iter().zip(ws) {
                    let (items, wj) = self.user_items(u);
                    let f = if self.opts.iuf {
                        wi as f64 / (1.0 + items.len() as f64).ln()
                    } else {
                        wi as f64
                    };
                    for (&j, &w) in items.iter().zip(wj) {
                        if j as usize != i {
                            s.add(j, f * w as f64);
                        }
                    }
                }
                let a = self.opts.alpha;
                let ni = (self.i_off[i + 1] - self.i_off[i]) as f64;
                for k in 0..s.touched.len() {
                    let j = s.touched[k] as usize;
                    let nj = (self.i_off[j + 1] - self.i_off[j]) as f64;
                    s.acc[j] /= ni.powf(a) * nj.powf(1.0 - a);
                }
            }
            Kind::Swing => {
                let alpha = self.opts.alpha;
                let mut common: Vec<u32> = Vec::new();
                // Longest lists first: each pair scans the shorter of its two lists.
                let mut users: Vec<u32> = users.to_vec();
                users.sort_by_key(|&u| {
                    (
                        std::cmp::Reverse(self.u_off[u as usize + 1] - self.u_off[u as usize]),
                        u,
                    )
                });
                for x in 0..users.len() {
                    // I_x marked once, then each partner's list is filtered by the marks.
                    let (ix, _) = self.user_items(users[x]);
                    for &j in ix {
                        s.mark[j as usize] = true;
                    }
                    let wx = self.wu[users[x] as usize];
                    for &uy in &users[x + 1..] {
                        common.clear();
                        common.extend(
                            self.user_items(uy)
                                .0
                                .iter()
                                .copied()
                                .filter(|&j| s.mark[j as usize]),
                        );
                        // Both orders of the pair (u, v) and (v, u).
                        let c = 2.0 * wx * self.wu[uy as usize] / (alpha + common.len() as f64);
                        for &j in &common {
                            if j as usize != i {
                                s.add(j, c);
                            }
                        }
                    }
                    for &j in ix {
                        s.mark[j as usize] = false;
                    }
                }
            }
        }
        let src = self.item_ids[i];
        let min = self.opts.min_score;
        let mut out: Vec<(f64, i64)> = Vec::with_capacity(s.touched.len());
        for &j in &s.touched {
            let v = s.acc[j as usize];
            if v > min && v.is_finite() {
                out.push((v, self.item_ids[j as usize]));
            }
        }
        s.clear();
        let by = |a: &(f64, i64), b: &(f64, i64)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let n = self.opts.top_n;
        if out.len() > n {
            out.select_nth_unstable_by(n - 1, by);
            out.truncate(n);
        }
        out.sort_by(by);
        out.into_iter().map(|(v, j)| (src, j, v as f32)).collect()
    }

    /// The items (indices, in item-id order) whose rows change when the users `changed` (ids)
    /// have new interactions:
    /// Swing: every item of theirs (their pairs and weights change); item-CF: also every item
    /// sharing a user with one of theirs (its normalisation |N(j)| may change). Recomputing
    /// these rows over the whole log gives exactly what a full build gives (with a half-life:
    /// a build with the same `decay_reference`).
    pub fn affected(&self, log: &Log, changed: &[&str]) -> Vec<u32> {
        let n = self.items();
        let mut mark = vec![false; n];
        // Every item of the changed users in the log (before caps: an item pushed out by the
        // cap loses the user too).
        let mut direct: Vec<u32> = Vec::new();
        let changed: std::collections::HashSet<u32> = changed
            .iter()
            .filter_map(|id| log.user_index.get(*id).copied())
            .collect();
        for r in &log.rows {
            if changed.contains(&r.user) && !mark[r.item as usize] {
                mark[r.item as usize] = true;
                direct.push(r.item);
            }
        }
        if self.opts.kind == Kind::ItemCf {
            for &j in &direct {
                let (a, b) = (self.i_off[j as usize], self.i_off[j as usize + 1]);
                for &u in &self.i_users[a..b] {
                    for &i in self.user_items(u).0 {
                        mark[i as usize] = true;
                    }
                }
            }
        }
        self.by_id
            .iter()
            .copied()
            .filter(|&i| mark[i as usize])
            .collect()
    }

    /// The id of item index `i`.
    pub fn item_id(&self, i: u32) -> i64 {
        self.item_ids[i as usize]
    }
}

/// A dense accumulator over the items with the list of touched ones.
struct Scratch {
    acc: Vec<f64>,
    touched: Vec<u32>,
    seen: Vec<bool>,
    /// Swing: the items of the pair's first user.
    mark: Vec<bool>,
}

impl Scratch {
    fn new(n: usize) -> Scratch {
        Scratch {
            acc: vec![0.0; n],
            touched: Vec::new(),
            seen: vec![false; n],
            mark: vec![false; n],
        }
    }

    #[inline]
    fn add(&mut self, j: u32, v: f64) {
        let k = j as usize;
        if !self.seen[k] {
            self.seen[k] = true;
            self.touched.push(j);
        }
        self.acc[k] += v;
    }

    fn clear(&mut self) {
        for &j in &self.touched {
            self.acc[j as usize] = 0.0;
            self.seen[j as usize] = false;
        }
        self.touched.clear();
    }
}
