//! Merging recall channels. Each channel's list is ranked by its own score (higher is better,
//! ties by item id); excluded items and repeats within a channel are dropped first. Then one of
//! the strategies below picks and orders at most `k` distinct items. Every result carries its
//! provenance: each channel that returned it, with the item's rank and score there.
//!
//! - **Quota with back-fill**: channel c contributes up to q_c items, taken in turns (one from
//!   each channel with quota left, in channel order); slots a short channel leaves unused go to
//!   the others, again in turns, until `k` or every list is spent.
//! - **Round-robin**: in each round channel c gives its next w_c unseen items (weights default
//!   to 1); `snake` reverses the channel order every other round.
//! - **Weighted sum** of per-channel normalised scores: min-max to [0, 1], z-score, or by rank
//!   (1 − (r − 1)/n); an item a channel did not return adds 0 there.
//! - **Reciprocal-rank fusion**: Σ_c w_c / (k₀ + r_c), k₀ = 60 by default.
//!
//! The output score is the strategy's: the fused score (weighted sum, RRF) or, for the
//! selection strategies, 1/position. Ties always go to the smaller item id.

use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum MergeError {
    #[error("{0}")]
    Bad(String),
    #[error("item {item}: score {score} is not finite")]
    NonFinite { item: i64, score: f32 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Index of the channel (into the caller's channel names).
    pub channel: usize,
    pub item: i64,
    pub score: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    MinMax,
    ZScore,
    Rank,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// Per channel, its quota (channels without one get none before back-fill).
    Quota(Vec<usize>),
    /// Per channel, items per round; `snake` alternates the channel order.
    RoundRobin {
        weights: Vec<usize>,
        snake: bool,
    },
    WeightedSum {
        weights: Vec<f64>,
        norm: Norm,
    },
    Rrf {
        weights: Vec<f64>,
        k0: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub item: i64,
    pub score: f64,
    /// 1-based.
    pub rank: usize,
    /// (channel, rank in it, score in it), in channel order.
    pub provenance: Vec<(usize, usize, f32)>,
}

/// A strategy name or option that is not valid: `message` says which (and `strategy` whether it
/// is the name itself).
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{message}")]
pub struct StrategyError {
    pub strategy: bool,
    pub message: String,
}

fn bad<T>(message: String) -> Result<T, StrategyError> {
    Err(StrategyError {
        strategy: false,
        message,
    })
}

/// The option keys each strategy takes.
pub fn strategy_keys(strategy: &str) -> Result<&'static [&'static str], StrategyError> {
    match strategy {
        "quota" => Ok(&["quotas", "order"]),
        "round_robin" => Ok(&["weights", "snake", "order"]),
        "weighted_sum" => Ok(&["weights", "norm", "order"]),
        "rrf" => Ok(&["weights", "k", "order"]),
        other => Err(StrategyError {
            strategy: true,
            message: format!(
                "strategy must be 'quota', 'round_robin', 'weighted_sum' or 'rrf', got '{other}'"
            ),
        }),
    }
}

/// Per channel (in `names` order), the value of `options[key][name]`, or `default`.
fn per_channel<T: Clone>(
    o: &Map<String, Value>,
    key: &str,
    names: &[String],
    default: T,
    get: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>, StrategyError> {
    let m = match o.get(key) {
        None | Some(Value::Null) => return Ok(vec![default; names.len()]),
        Some(Value::Object(m)) => m,
        Some(v) => {
            return bad(format!(
                "merge option \"{key}\" must be an object of channel names, got {v}"
            ))
        }
    };
    names
        .iter()
        .map(|n| match m.get(n) {
            None => Ok(default.clone()),
            Some(v) => get(v).map_or_else(
                || bad(format!("merge option \"{key}\".\"{n}\" is not valid: {v}")),
                Ok,
            ),
        })
        .collect()
}

impl Strategy {
    /// The strategy named `strategy` with its options `o`, for channels `names` (in order).
    /// Options that do not apply to the strategy are refused.
    pub fn parse(
        strategy: &str,
        o: &Map<String, Value>,
        names: &[String],
    ) -> Result<Strategy, StrategyError> {
        let allowed = strategy_keys(strategy)?;
        if let Some(key) = o.keys().find(|key| !allowed.contains(&key.as_str())) {
            return bad(format!(
                "merge option \"{key}\" does not apply to strategy '{strategy}' (it takes {})",
                allowed.join(", ")
            ));
        }
        let weight = |v: &Value| v.as_f64().filter(|x| x.is_finite() && *x >= 0.0);
        Ok(match strategy {
            "quota" => {
                if o.get("quotas").is_none() {
                    return bad(
                        "strategy 'quota' needs option \"quotas\": {\"channel\": n, ...}".into(),
                    );
                }
                Strategy::Quota(per_channel(o, "quotas", names, 0usize, |v| {
                    v.as_u64().map(|n| n.min(100_000) as usize)
                })?)
            }
            "round_robin" => Strategy::RoundRobin {
                weights: per_channel(o, "weights", names, 1usize, |v| {
                    v.as_u64().filter(|&n| n <= 100_000).map(|n| n as usize)
                })?,
                snake: match o.get("snake") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(v) => {
                        return bad(format!(
                            "merge option \"snake\" must be true or false, got {v}"
                        ))
                    }
                },
            },
            "weighted_sum" => Strategy::WeightedSum {
                weights: per_channel(o, "weights", names, 1.0, weight)?,
                norm: match o.get("norm").and_then(Value::as_str).unwrap_or("minmax") {
                    "minmax" => Norm::MinMax,
                    "zscore" => Norm::ZScore,
                    "rank" => Norm::Rank,
                    other => {
                        return bad(format!(
                            "merge option \"norm\" must be minmax, zscore or rank, got \"{other}\""
                        ))
                    }
                },
            },
            _ => Strategy::Rrf {
                weights: per_channel(o, "weights", names, 1.0, weight)?,
                k0: match o.get("k") {
                    None | Some(Value::Null) => 60.0,
                    Some(v) => match v.as_f64().filter(|x| x.is_finite() && *x >= 0.0) {
                        Some(x) => x,
                        None => {
                            return bad(format!(
                                "merge option \"k\" must be a number >= 0, got {v}"
                            ))
                        }
                    },
                },
            },
        })
    }
}

/// Merges `cands` of `channels` channels into at most `k` items (see the module doc).
pub fn merge(
    cands: &[Candidate],
    channels: usize,
    strategy: &Strategy,
    k: usize,
    exclude: &[i64],
) -> Result<Vec<Merged>, MergeError> {
    if let Some(c) = cands.iter().find(|c| c.channel >= channels) {
        return Err(MergeError::Bad(format!(
            "candidate of channel {} of {channels}",
            c.channel
        )));
    }
    if let Some(c) = cands.iter().find(|c| !c.score.is_finite()) {
        return Err(MergeError::NonFinite {
            item: c.item,
            score: c.score,
        });
    }
    let per = |v: usize, what: &str| -> Result<(), MergeError> {
        if v != channels {
            return Err(MergeError::Bad(format!(
                "{what} has {v} entries for {channels} channels"
            )));
        }
        Ok(())
    };
    match strategy {
        Strategy::Quota(q) => per(q.len(), "quotas")?,
        Strategy::RoundRobin { weights, .. } => per(weights.len(), "weights")?,
        Strategy::WeightedSum { weights, .. } | Strategy::Rrf { weights, .. } => {
            per(weights.len(), "weights")?;
            if weights.iter().any(|w| !w.is_finite()) {
                return Err(MergeError::Bad("weights must be finite".into()));
            }
        }
    }
    let excluded: HashSet<i64> = exclude.iter().copied().collect();
    // Per channel: its list, best first, each item once.
    let mut lists: Vec<Vec<(i64, f32)>> = vec![Vec::new(); channels];
    for c in cands {
        if !excluded.contains(&c.item) {
            lists[c.channel].push((c.item, c.score));
        }
    }
    for l in &mut lists {
        l.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut seen = HashSet::with_capacity(l.len());
        l.retain(|x| seen.insert(x.0));
    }
    // Provenance of every item: (channel, rank, score).
    let mut prov: HashMap<i64, Vec<(usize, usize, f32)>> = HashMap::new();
    for (c, l) in lists.iter().enumerate() {
        for (r, &(item, s)) in l.iter().enumerate() {
            prov.entry(item).or_default().push((c, r + 1, s));
        }
    }
    let picked: Vec<(i64, f64)> = match strategy {
        Strategy::Quota(q) => select_quota(&lists, k, q),
        Strategy::RoundRobin { weights, snake } => select_round_robin(&lists, k, weights, *snake),
        Strategy::WeightedSum { weights, norm } => {
            let mut score: HashMap<i64, f64> = HashMap::new();
            for (c, l) in lists.iter().enumerate() {
                let n = l.len() as f64;
                let (lo, hi) = l
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
                        (a.min(x.1 as f64), b.max(x.1 as f64))
                    });
                let mean = l.iter().map(|x| x.1 as f64).sum::<f64>() / n.max(1.0);
                let sd = (l.iter().map(|x| (x.1 as f64 - mean).powi(2)).sum::<f64>() / n.max(1.0))
                    .sqrt();
                for (r, &(item, s)) in l.iter().enumerate() {
                    let s = s as f64;
                    let v = match norm {
                        Norm::MinMax if hi > lo => (s - lo) / (hi - lo),
                        Norm::MinMax => 1.0,
                        Norm::ZScore if sd > 0.0 => (s - mean) / sd,
                        Norm::ZScore => 0.0,
                        Norm::Rank => 1.0 - r as f64 / n,
                    };
                    *score.entry(item).or_insert(0.0) += weights[c] * v;
                }
            }
            top(score, k)
        }
        Strategy::Rrf { weights, k0 } => {
            let mut score: HashMap<i64, f64> = HashMap::new();
            for (c, l) in lists.iter().enumerate() {
                for (r, &(item, _)) in l.iter().enumerate() {
                    *score.entry(item).or_insert(0.0) += weights[c] / (k0 + (r + 1) as f64);
                }
            }
            top(score, k)
        }
    };
    Ok(picked
        .into_iter()
        .enumerate()
        .map(|(i, (item, score))| Merged {
            item,
            score,
            rank: i + 1,
            provenance: prov.remove(&item).unwrap_or_default(),
        })
        .collect())
}

/// The `k` best of `score`, score descending, ties by item id.
fn top(score: HashMap<i64, f64>, k: usize) -> Vec<(i64, f64)> {
    let mut v: Vec<(i64, f64)> = score.into_iter().collect();
    let by = |a: &(i64, f64), b: &(i64, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k == 0 {
        return Vec::new();
    }
    if v.len() > k {
        v.select_nth_unstable_by(k - 1, by);
        v.truncate(k);
    }
    v.sort_by(by);
    v
}

/// The next item of list `c` not taken yet.
fn next(
    lists: &[Vec<(i64, f32)>],
    c: usize,
    pos: &mut [usize],
    taken: &mut HashSet<i64>,
) -> Option<i64> {
    while pos[c] < lists[c].len() {
        let item = lists[c][pos[c]].0;
        pos[c] += 1;
        if taken.insert(item) {
            return Some(item);
        }
    }
    None
}

/// Scores selections by position: 1/1, 1/2, ...
fn by_position(items: Vec<i64>) -> Vec<(i64, f64)> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, x)| (x, 1.0 / (i + 1) as f64))
        .collect()
}

/// Quota phase (turns of one item per channel with quota left), then back-fill (turns of one
/// item over every channel with items left), until `k`.
fn select_quota(lists: &[Vec<(i64, f32)>], k: usize, quotas: &[usize]) -> Vec<(i64, f64)> {
    let n = lists.len();
    let mut pos = vec![0usize; n];
    let mut taken = HashSet::new();
    let mut out = Vec::new();
    let mut left = quotas.to_vec();
    for phase in 0..2 {
        loop {
            let mut any = false;
            for c in 0..n {
                if out.len() >= k {
                    break;
                }
                if phase == 1 || left[c] > 0 {
                    match next(lists, c, &mut pos, &mut taken) {
                        Some(item) => {
                            out.push(item);
                            left[c] = left[c].saturating_sub(1);
                            any = true;
                        }
                        None => left[c] = 0,
                    }
                }
            }
            if !any || out.len() >= k {
                break;
            }
        }
    }
    by_position(out)
}

/// Rounds in which channel c gives its next `weights[c]` items (channel order reversed on odd
/// rounds with `snake`), until `k` or every list is spent.
fn select_round_robin(
    lists: &[Vec<(i64, f32)>],
    k: usize,
    weights: &[usize],
    snake: bool,
) -> Vec<(i64, f64)> {
    let n = lists.len();
    let mut pos = vec![0usize; n];
    let mut taken = HashSet::new();
    let mut out = Vec::new();
    let mut round = 0usize;
    loop {
        let mut any = false;
        let order: Vec<usize> = if snake && round % 2 == 1 {
            (0..n).rev().collect()
        } else {
            (0..n).collect()
        };
        for c in order {
            for _ in 0..weights[c] {
                if out.len() >= k {
                    break;
                }
                match next(lists, c, &mut pos, &mut taken) {
                    Some(item) => {
                        out.push(item);
                        any = true;
                    }
                    None => break,
                }
            }
        }
        if !any || out.len() >= k {
            break;
        }
        round += 1;
    }
    by_position(out)
}
