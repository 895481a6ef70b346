//! Recall from a user's history over neighbour lists: each candidate's score is the weighted
//! sum of its similarities to the history items, Σ_h w_h · sim(h, j).

use crate::error::{CfError, Result};
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub item: i64,
    pub score: f32,
    /// 1-based, in score order (ties by item id).
    pub rank: usize,
    /// The history item contributing most to the score (ties: the earlier in the history).
    pub via: i64,
}

/// The top `k` items by Σ_h w_h·sim(h, j) over `neighbors` (source, neighbour, score) rows of
/// the history items. History items and `exclude` are never returned; a history item given
/// twice weighs the sum of its weights. Weights must be finite and non-negative.
pub fn i2i(
    history: &[(i64, f32)],
    neighbors: &[(i64, i64, f32)],
    k: usize,
    exclude: &[i64],
) -> Result<Vec<Hit>> {
    let mut weight: HashMap<i64, (f64, usize)> = HashMap::with_capacity(history.len());
    for (pos, &(h, w)) in history.iter().enumerate() {
        if !w.is_finite() || w < 0.0 {
            return Err(CfError::BadInput(format!(
                "history weight {w} (item {h}) must be finite and >= 0"
            )));
        }
        weight.entry(h).or_insert((0.0, pos)).0 += w as f64;
    }
    let skip: HashSet<i64> = exclude
        .iter()
        .copied()
        .chain(weight.keys().copied())
        .collect();
    // item -> (score, best contribution, its history position, via)
    let mut acc: HashMap<i64, (f64, f64, usize, i64)> = HashMap::new();
    for &(src, j, s) in neighbors {
        let Some(&(w, pos)) = weight.get(&src) else {
            continue;
        };
        if skip.contains(&j) || !s.is_finite() {
            continue;
        }
        let c = w * s as f64;
        let e = acc
            .entry(j)
            .or_insert((0.0, f64::NEG_INFINITY, usize::MAX, src));
        e.0 += c;
        if c > e.1 || (c == e.1 && pos < e.2) {
            e.1 = c;
            e.2 = pos;
            e.3 = src;
        }
    }
    let mut out: Vec<(f64, i64, i64)> = acc
        .into_iter()
        .filter(|(_, v)| v.0 > 0.0)
        .map(|(j, v)| (v.0, j, v.3))
        .collect();
    let by = |a: &(f64, i64, i64), b: &(f64, i64, i64)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if k == 0 {
        return Ok(Vec::new());
    }
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, by);
        out.truncate(k);
    }
    out.sort_by(by);
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(r, (s, item, via))| Hit {
            item,
            score: s as f32,
            rank: r + 1,
            via,
        })
        .collect())
}
