//! Ranking metrics with seen-item masking: each user's items are ranked by score over every
//! item but the masked ones (the user's training items), ties broken by item index.

/// Metrics at one K, averaged over users with at least one target.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Metrics {
    pub k: usize,
    /// Hits in the top K / number of targets.
    pub recall: f64,
    /// 1 when any target is in the top K.
    pub hr: f64,
    /// DCG@K / ideal DCG@K (binary relevance).
    pub ndcg: f64,
    /// 1 / rank of the first target (over the whole ranking, not only the top K).
    pub mrr: f64,
    pub users: usize,
}

/// One user's ranks of `targets` (1-based) among the unmasked items, by descending score.
/// `masked` must be sorted; masked targets are not ranked (`None`).
pub fn ranks(scores: &[f32], targets: &[u32], masked: &[u32]) -> Vec<Option<usize>> {
    targets
        .iter()
        .map(|&t| {
            if masked.binary_search(&t).is_ok() {
                return None;
            }
            let st = scores[t as usize];
            let mut better = 0usize;
            for (j, &s) in scores.iter().enumerate() {
                if j as u32 == t {
                    continue;
                }
                // NaN scores rank last.
                let ahead = s > st || (s == st && (j as u32) < t) || (st.is_nan() && !s.is_nan());
                if ahead && masked.binary_search(&(j as u32)).is_err() {
                    better += 1;
                }
            }
            Some(better + 1)
        })
        .collect()
}

/// Accumulates users' ranks into metrics at each of `ks`.
#[derive(Debug, Clone)]
pub struct Accumulator {
    ks: Vec<usize>,
    sums: Vec<[f64; 4]>,
    users: usize,
}

impl Accumulator {
    pub fn new(ks: &[usize]) -> Accumulator {
        Accumulator {
            ks: ks.to_vec(),
            sums: vec![[0.0; 4]; ks.len()],
            users: 0,
        }
    }

    /// Adds one user's target ranks (`None` = masked target, not counted).
    pub fn add(&mut self, ranks: &[Option<usize>]) {
        let r: Vec<usize> = ranks.iter().flatten().copied().collect();
        if r.is_empty() {
            return;
        }
        self.users += 1;
        let first = *r.iter().min().expect("non-empty");
        for (ki, &k) in self.ks.iter().enumerate() {
            let hits: Vec<usize> = r.iter().copied().filter(|&x| x <= k).collect();
            let dcg: f64 = hits.iter().map(|&x| 1.0 / ((x + 1) as f64).log2()).sum();
            let idcg: f64 = (1..=r.len().min(k))
                .map(|x| 1.0 / ((x + 1) as f64).log2())
                .sum();
            let s = &mut self.sums[ki];
            s[0] += hits.len() as f64 / r.len() as f64;
            s[1] += if hits.is_empty() { 0.0 } else { 1.0 };
            s[2] += if idcg > 0.0 { dcg / idcg } else { 0.0 };
            s[3] += 1.0 / first as f64;
        }
    }

    /// Adds one query whose target's rank is known only within the top `kmax` (`None`: not
    /// there, a miss at every k ≤ kmax and 0 for MRR).
    pub fn add_rank_within(&mut self, rank: Option<usize>, kmax: usize) {
        match rank {
            Some(r) if r <= kmax => self.add(&[Some(r)]),
            _ => self.users += 1,
        }
    }

    /// Adds one user with `targets` targets of which those in `found` (1-based ranks) are
    /// known to be within the top `kmax`; the others are misses at every k ≤ kmax (and count
    /// in recall's denominator). MRR counts the first found target only.
    pub fn add_within(&mut self, found: &[usize], targets: usize, kmax: usize) {
        if targets == 0 {
            return;
        }
        self.users += 1;
        let mut r: Vec<usize> = found.iter().copied().filter(|&x| x <= kmax).collect();
        r.sort_unstable();
        for (ki, &k) in self.ks.iter().enumerate() {
            let hits: Vec<usize> = r.iter().copied().filter(|&x| x <= k).collect();
            let dcg: f64 = hits.iter().map(|&x| 1.0 / ((x + 1) as f64).log2()).sum();
            let idcg: f64 = (1..=targets.min(k))
                .map(|x| 1.0 / ((x + 1) as f64).log2())
                .sum();
            let s = &mut self.sums[ki];
            s[0] += hits.len() as f64 / targets as f64;
            s[1] += if hits.is_empty() { 0.0 } else { 1.0 };
            s[2] += if idcg > 0.0 { dcg / idcg } else { 0.0 };
            s[3] += r.first().map_or(0.0, |&f| 1.0 / f as f64);
        }
    }

    pub fn metrics(&self) -> Vec<Metrics> {
        let n = self.users.max(1) as f64;
        self.ks
            .iter()
            .zip(&self.sums)
            .map(|(&k, s)| Metrics {
                k,
                recall: s[0] / n,
                hr: s[1] / n,
                ndcg: s[2] / n,
                mrr: s[3] / n,
                users: self.users,
            })
            .collect()
    }
}

/// The head of a catalogue: the `share` most popular of its `counts.len()` items (by count,
/// ties by index; at least one, items never counted never in it).
pub fn head_items(counts: &[u64], share: f64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] > 0).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    let n = ((counts.len() as f64 * share).ceil() as usize).max(1);
    let mut head = vec![false; counts.len()];
    for &i in order.iter().take(n) {
        head[i] = true;
    }
    head
}

/// The `k` best unmasked items by descending score (ties by index, NaN last). `masked` sorted.
pub fn top_k(scores: &[f32], masked: &[u32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32)
        .filter(|i| masked.binary_search(i).is_err())
        .collect();
    let key = |i: &u32| {
        let s = scores[*i as usize];
        (
            if s.is_nan() { f32::NEG_INFINITY } else { s },
            std::cmp::Reverse(*i),
        )
    };
    let by = |a: &u32, b: &u32| {
        key(b)
            .partial_cmp(&key(a))
            .unwrap_or(std::cmp::Ordering::Equal)
    };
    if idx.len() > k {
        idx.select_nth_unstable_by(k, by);
        idx.truncate(k);
    }
    idx.sort_by(by);
    idx
}

/// What the lists themselves show, at each k: the share of their slots the head takes, and the
/// share of the catalogue they cover (items in some list's top k).
#[derive(Debug, Clone)]
pub struct ListStats {
    ks: Vec<usize>,
    head_slots: Vec<usize>,
    slots: Vec<usize>,
    covered: Vec<std::collections::HashSet<u32>>,
    lists: usize,
}

/// [`ListStats`] at one k.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ListMetrics {
    pub k: usize,
    pub head_share: f64,
    pub coverage: f64,
    pub lists: usize,
}

impl ListStats {
    pub fn new(ks: &[usize]) -> ListStats {
        ListStats {
            ks: ks.to_vec(),
            head_slots: vec![0; ks.len()],
            slots: vec![0; ks.len()],
            covered: vec![Default::default(); ks.len()],
            lists: 0,
        }
    }

    /// Adds one ranked list (best first) with the head of the catalogue.
    pub fn add(&mut self, list: &[u32], head: &[bool]) {
        self.lists += 1;
        for (ki, &k) in self.ks.iter().enumerate() {
            for &i in list.iter().take(k) {
                self.slots[ki] += 1;
                self.head_slots[ki] += usize::from(head.get(i as usize).copied().unwrap_or(false));
                self.covered[ki].insert(i);
            }
        }
    }

    /// Metrics over a catalogue of `items` items.
    pub fn metrics(&self, items: usize) -> Vec<ListMetrics> {
        self.ks
            .iter()
            .enumerate()
            .map(|(ki, &k)| ListMetrics {
                k,
                head_share: self.head_slots[ki] as f64 / self.slots[ki].max(1) as f64,
                coverage: self.covered[ki].len() as f64 / items.max(1) as f64,
                lists: self.lists,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_skip_masked_items_and_break_ties_by_index() {
        let scores = [0.9f32, 0.5, 0.7, 0.7, 0.1];
        // item 3 ties with item 2 (lower index ahead); item 0 is masked.
        assert_eq!(ranks(&scores, &[3], &[0]), vec![Some(2)]);
        assert_eq!(ranks(&scores, &[3], &[]), vec![Some(3)]);
        assert_eq!(ranks(&scores, &[0], &[0]), vec![None]);
        let mut acc = Accumulator::new(&[1, 2]);
        acc.add(&[Some(2)]);
        acc.add(&[Some(1)]);
        let m = acc.metrics();
        assert_eq!(m[0].hr, 0.5);
        assert_eq!(m[1].hr, 1.0);
        assert!((m[1].ndcg - (1.0 + 1.0 / 3f64.log2()) / 2.0).abs() < 1e-12);
        assert!((m[0].mrr - 0.75).abs() < 1e-12);
    }

    #[test]
    fn head_top_k_and_list_stats() {
        // Counts: item 3 most popular, then 0 and 4 (tie: lower index first), 1 never seen.
        let counts = [5u64, 0, 1, 9, 5, 2, 0, 0, 0, 0];
        assert_eq!(
            head_items(&counts, 0.2),
            vec![true, false, false, true, false, false, false, false, false, false]
        );
        // A share past the counted items keeps only counted ones.
        assert_eq!(head_items(&counts, 1.0).iter().filter(|&&h| h).count(), 5);
        let scores = [0.1f32, 0.9, f32::NAN, 0.5, 0.5, 0.7];
        assert_eq!(top_k(&scores, &[1], 3), vec![5, 3, 4]);
        assert_eq!(top_k(&scores, &[], 10), vec![1, 5, 3, 4, 0, 2]);
        let head = head_items(&counts, 0.2);
        let mut st = ListStats::new(&[1, 2]);
        st.add(&[3, 5], &head);
        st.add(&[4, 0], &head);
        let m = st.metrics(10);
        assert_eq!(m[0].head_share, 0.5); // 3 is head, 4 is not
        assert_eq!(m[1].head_share, 0.5); // 3, 0 of 3, 5, 4, 0
        assert_eq!(m[0].coverage, 0.2);
        assert_eq!(m[1].coverage, 0.4);
        assert_eq!(m[1].lists, 2);
    }

    #[test]
    fn targets_beyond_the_known_top_count_as_misses() {
        // Two targets, one at rank 3 within the top 5, the other not found.
        let mut acc = Accumulator::new(&[2, 5]);
        acc.add_within(&[3], 2, 5);
        // Every target found: the same as add().
        acc.add_within(&[1, 2], 2, 5);
        let m = acc.metrics();
        assert_eq!(m[0].users, 2);
        assert_eq!(m[0].recall, 0.5); // (0 + 1) / 2
        assert_eq!(m[1].recall, 0.75); // (1/2 + 1) / 2
        assert_eq!(m[0].hr, 0.5);
        assert_eq!(m[1].hr, 1.0);
        assert!((m[1].mrr - (1.0 / 3.0 + 1.0) / 2.0).abs() < 1e-12);
        let idcg2 = 1.0 + 1.0 / 3f64.log2();
        let want = ((1.0 / 4f64.log2()) / idcg2 + 1.0) / 2.0;
        assert!((m[1].ndcg - want).abs() < 1e-12, "{}", m[1].ndcg);
        let mut plain = Accumulator::new(&[2, 5]);
        plain.add(&[Some(1), Some(2)]);
        let mut within = Accumulator::new(&[2, 5]);
        within.add_within(&[2, 1], 2, 5);
        assert_eq!(plain.metrics(), within.metrics());
    }
}
