//! The training loop: examples (point-in-time histories), batches with sampled negatives, the
//! two towers' forward and backward passes over both cores, optimiser steps, validation with
//! early stopping, and the export of the best epoch.
//!
//! Determinism: for a seed and a thread count the run is the same bit for bit (every batch is
//! split into the same contiguous parts, their gradients are added in part order).

use crate::config::{Config, FeatureSpec, NumTransform};
use crate::data::Data;
use crate::error::{Result, TrainError};
use crate::eval::{ranks, Accumulator, Metrics};
use crate::loss::{self, Scores};
use crate::model::{self, add_moment, count_ids, with_id, FeatureStats, Plan};
use crate::net::{Grads, Tower};
use crate::optim::{Adam, SparseState};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Instant;
use twotower_tower::{Encoded, Model};

/// What the caller hears while training runs, always on the calling thread: returning an
/// error stops the run, which then returns that error (a cancel). Steps come at least every
/// batch; `Tick` comes during validation.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    Step(&'a Progress),
    Epoch(&'a Progress),
    Tick,
}

/// Where a run is.
#[derive(Debug, Clone)]
pub struct Progress {
    pub epoch: usize,
    pub epochs: usize,
    pub step: usize,
    pub steps: usize,
    /// Mean loss of the epoch so far.
    pub loss: f64,
    pub examples_per_s: f64,
    /// Set at the end of an epoch with validation.
    pub valid: Option<Metrics>,
}

/// One finished epoch.
#[derive(Debug, Clone)]
pub struct EpochReport {
    pub epoch: usize,
    pub loss: f64,
    pub examples: usize,
    pub seconds: f64,
    pub valid: Option<Metrics>,
}

/// A trained pair of towers, ready to be stored as model versions.
#[derive(Debug, Clone)]
pub struct Trained {
    pub user_spec: String,
    pub user_weights: Vec<u8>,
    pub item_spec: String,
    pub item_weights: Vec<u8>,
    pub best_epoch: usize,
    pub epochs: Vec<EpochReport>,
    pub train_examples: usize,
    pub valid_examples: usize,
    pub user_parameters: usize,
    pub item_parameters: usize,
    /// Per pruned table: its tensor name, rows before, rows removed.
    pub pruned: Vec<(String, usize, usize)>,
}

/// Where the ids go in a feature object: the key under which the user's / item's own id is
/// added when the feature source has no such key (the interactions' column names).
#[derive(Debug, Clone)]
pub struct Keys {
    pub user: String,
    pub item: String,
}

struct Example {
    user: u32,
    item: u32,
    weight: f32,
    /// Index into the encoded user inputs.
    input: usize,
}

/// The input of a user at the moment of interaction `pos` of their timeline: the same function
/// serving uses ([`crate::data::user_input`]) over the interactions before it.
fn user_input(
    cfg: &Config,
    data: &Data,
    keys: &Keys,
    user: u32,
    (timeline, negatives): (&[u32], &[u32]),
    pos: usize,
) -> Value {
    let at = data.interactions[timeline[pos] as usize].ts;
    user_input_at(cfg, data, keys, user, (timeline, negatives), pos, at)
}

/// The input of a user at time `at`, `pos` of their interactions being before it;
/// `negatives` is their negative-feedback timeline (the part strictly before `at` is read).
fn user_input_at(
    cfg: &Config,
    data: &Data,
    keys: &Keys,
    user: u32,
    (timeline, negatives): (&[u32], &[u32]),
    pos: usize,
    at: f64,
) -> Value {
    let u = &data.users[user as usize];
    let past = timeline[..pos].iter().map(|&k| {
        let x = &data.interactions[k as usize];
        (data.items[x.item as usize].id.as_str(), x.ts)
    });
    let before = negatives.partition_point(|&k| data.negative[k as usize].ts < at);
    let past_negative = negatives[..before].iter().map(|&k| {
        let x = &data.negative[k as usize];
        (data.items[x.item as usize].id.as_str(), x.ts)
    });
    crate::data::user_input(
        &u.features,
        Some(&keys.user),
        &u.id,
        &cfg.histories(),
        past,
        past_negative,
        at,
    )
}

pub(crate) fn stats_of(
    features: &[FeatureSpec],
    entities: impl Iterator<Item = (Value, u64)>,
) -> FeatureStats {
    let mut s = FeatureStats::default();
    for (obj, n) in entities {
        for f in features {
            let name = f.name();
            match f {
                FeatureSpec::Categorical { .. }
                | FeatureSpec::Multi { .. }
                | FeatureSpec::History { .. } => count_ids(
                    s.counts.entry(name.to_owned()).or_default(),
                    obj.get(name),
                    n,
                ),
                FeatureSpec::Numeric {
                    transform: NumTransform::Zscore,
                    ..
                } => add_moment(&mut s.moments, name, obj.get(name), n),
                FeatureSpec::Bucketize {
                    boundaries: crate::config::Bucketing::Quantiles(_),
                    ..
                } => {
                    if let Some(x) = obj
                        .get(name)
                        .and_then(Value::as_f64)
                        .filter(|x| x.is_finite())
                    {
                        s.values.entry(name.to_owned()).or_default().push((x, n));
                    }
                }
                FeatureSpec::Numeric { .. }
                | FeatureSpec::Bucketize { .. }
                | FeatureSpec::Dense { .. }
                | FeatureSpec::Cross { .. } => {}
            }
        }
    }
    s
}

pub(crate) fn load(plan: &Plan, tower: &Tower) -> Result<Model> {
    let (spec, st) = model::export(plan, tower)?;
    Ok(Model::load(&spec, &st)?)
}

/// Splits `0..n` into `parts` contiguous ranges (the first ones one longer).
pub(crate) fn split(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    let base = n / parts;
    let extra = n % parts;
    let mut out = Vec::with_capacity(parts);
    let mut s = 0;
    for p in 0..parts {
        let len = base + usize::from(p < extra);
        out.push(s..s + len);
        s += len;
    }
    out
}

/// Runs `f` on each part in its own scoped thread (the first on the calling thread), results
/// in part order.
pub(crate) fn par<T: Send>(
    parts: &[std::ops::Range<usize>],
    f: impl Fn(std::ops::Range<usize>) -> T + Sync,
) -> Vec<T> {
    if parts.len() <= 1 {
        return parts.iter().map(|r| f(r.clone())).collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = parts[1..]
            .iter()
            .map(|r| {
                let r = r.clone();
                let f = &f;
                s.spawn(move || f(r))
            })
            .collect();
        let mut out = vec![f(parts[0].clone())];
        for h in handles {
            match h.join() {
                Ok(v) => out.push(v),
                Err(e) => std::panic::resume_unwind(e),
            }
        }
        out
    })
}

/// Runs `f(0)`, …, `f(n − 1)` in parallel (one scoped thread each but the first), results in
/// order.
pub(crate) fn par_n<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let parts: Vec<std::ops::Range<usize>> = (0..n).map(|i| i..i + 1).collect();
    par(&parts, |r| f(r.start))
}

/// Output vectors of `xs` through `tower` (forward only), over `threads`.
pub fn embed_all(tower: &Tower, xs: &[&Encoded], threads: usize, dim: usize) -> Vec<f32> {
    let parts = split(xs.len(), threads);
    let outs = par(&parts, |r| {
        let mut v = Vec::with_capacity(r.len() * dim);
        for c in r.clone().step_by(1024) {
            let end = (c + 1024).min(r.end);
            v.extend_from_slice(tower.forward(&xs[c..end]).output());
        }
        v
    });
    outs.concat()
}

/// The optimiser state of one tower: Adam per dense parameter, a sparse optimiser per table.
pub struct Optim {
    dense: Vec<Adam>,
    sparse: Vec<SparseState>,
}

impl Optim {
    pub fn new(cfg: &Config, t: &Tower) -> Optim {
        Optim::with(cfg.sparse, t)
    }

    /// Adam for the dense parameters, `sparse` for the tables.
    pub fn with(sparse: crate::optim::Sparse, t: &Tower) -> Optim {
        Optim {
            dense: t
                .dense_params()
                .iter()
                .map(|p| Adam::new(p.len()))
                .collect(),
            sparse: t
                .tables
                .iter()
                .map(|tb| {
                    let mut s = SparseState::new(sparse, tb.rows, tb.dim);
                    s.init_from(&tb.w);
                    s
                })
                .collect(),
        }
    }

    /// Zeroes the rows of `t`'s tables that no step touched.
    fn zero_untouched(&self, t: &mut Tower) {
        for (tb, s) in t.tables.iter_mut().zip(&self.sparse) {
            for (r, row) in tb.w.chunks_exact_mut(tb.dim.max(1)).enumerate() {
                if !s.touched(r) {
                    row.iter_mut().for_each(|x| *x = 0.0);
                }
            }
        }
    }

    fn step(&mut self, cfg: &Config, t: &mut Tower, g: &Grads, step: u64) {
        self.step_with(cfg.lr, cfg.weight_decay, cfg.freeze_dense, t, g, step)
    }

    /// One step: Adam (`lr`, `weight_decay`) on the dense parameters unless `freeze_dense`,
    /// the sparse optimiser on the touched rows.
    pub fn step_with(
        &mut self,
        lr: f32,
        weight_decay: f32,
        freeze_dense: bool,
        t: &mut Tower,
        g: &Grads,
        step: u64,
    ) {
        if !freeze_dense {
            for ((p, a), gd) in t
                .dense_params_mut()
                .into_iter()
                .zip(&mut self.dense)
                .zip(&g.dense)
            {
                a.step(p, gd, lr, step, weight_decay);
            }
        }
        for ((tb, s), rows) in t.tables.iter_mut().zip(&mut self.sparse).zip(&g.rows) {
            // Incremental runs update id embeddings only (bucket tables are frozen too).
            if freeze_dense && !tb.ids {
                continue;
            }
            s.step(&mut tb.w, rows, step);
        }
    }
}

/// Samples items ∝ count^0.75 (the global negatives) from a cumulative table.
struct Sampler {
    cdf: Vec<f64>,
    items: Vec<u32>,
    /// ln q(item) of the sampling distribution, per item index.
    logq: Vec<f32>,
}

impl Sampler {
    fn new(counts: &[u64]) -> Option<Sampler> {
        let mut cdf = Vec::new();
        let mut items = Vec::new();
        let mut acc = 0f64;
        for (i, &c) in counts.iter().enumerate() {
            if c > 0 {
                acc += (c as f64).powf(0.75);
                cdf.push(acc);
                items.push(i as u32);
            }
        }
        if items.is_empty() {
            return None;
        }
        let logq = counts
            .iter()
            .map(|&c| {
                if c > 0 {
                    ((c as f64).powf(0.75) / acc).ln() as f32
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        Some(Sampler { cdf, items, logq })
    }

    fn sample(&self, rng: &mut ChaCha8Rng) -> u32 {
        let total = *self.cdf.last().expect("non-empty");
        let x = rng.gen::<f64>() * total;
        let i = self
            .cdf
            .partition_point(|&c| c <= x)
            .min(self.items.len() - 1);
        self.items[i]
    }
}

/// One batch as the loss sees it: the users' inputs, the candidates' inputs (the positives,
/// column i for row i, then the negatives) and, per candidate, its item, owner row (-1: every
/// row's) and ln Q; per row, its weight.
pub struct Batch<'a> {
    pub users: &'a [&'a Encoded],
    pub items: &'a [&'a Encoded],
    pub cand: &'a [u32],
    pub owner: &'a [i32],
    pub logq: &'a [f32],
    pub weights: &'a [f32],
    /// The last `feedback` users and items are negative-feedback examples (see [`loss`]).
    pub feedback: usize,
    /// Debiasing pair columns (just before the feedback items) and each positive row's pair
    /// column or −1 (empty: none).
    pub paired: usize,
    pub pairs: &'a [i32],
}

/// One optimisation step (`t` counts from 1): both towers' forward passes over `threads`, the
/// loss, the backward passes, the optimisers. Returns the batch's loss (a non-finite loss
/// leaves the parameters as they were).
pub fn train_step(
    cfg: &Config,
    user: (&mut Tower, &mut Optim),
    item: (&mut Tower, &mut Optim),
    x: &Batch,
    t: u64,
    threads: usize,
) -> f64 {
    let (b, c, d) = (x.users.len(), x.items.len(), cfg.dim);
    // The positives' rows (the negative-feedback rows follow them).
    let bp = b - x.feedback;
    let uparts = split(b, threads);
    let iparts = split(c, threads);
    let (ut, it) = (&*user.0, &*item.0);
    // Forward, both towers, each thread its part of the users and of the candidates.
    // Dropout masks: one seed per step, tower and part (deterministic for a thread count).
    let seed = |tower: u64, part: usize| {
        cfg.seed ^ t.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (tower << 32) ^ part as u64
    };
    let fwd = par_n(uparts.len().max(iparts.len()), |i| {
        let uc = ut.forward_train(&x.users[uparts.get(i).cloned().unwrap_or(0..0)], seed(1, i));
        let ic = it.forward_train(&x.items[iparts.get(i).cloned().unwrap_or(0..0)], seed(2, i));
        (uc, ic)
    });
    let mut u = Vec::with_capacity(b * d);
    let mut v = Vec::with_capacity(c * d);
    for (uc, ic) in &fwd {
        u.extend_from_slice(uc.output());
        v.extend_from_slice(ic.output());
    }
    // The loss by parts of the rows, on the same threads: each part scores its users against
    // every candidate, and returns its loss, its users' gradients and its share of the
    // candidates' (added in part order: deterministic for a thread count).
    let rparts = split(b, threads);
    let parts = par(&rparts, |r| {
        let s = loss::scores(&u[r.start * d..r.end * d], r.len(), &v, c, d);
        let sc = Scores {
            s: &s,
            b: bp,
            c,
            logq: x.logq,
            items: x.cand,
            owner: x.owner,
            weights: x.weights,
            temperature: cfg.temperature,
            feedback: x.feedback,
            nf: cfg.negative_feedback,
            paired: x.paired,
            pairs: x.pairs,
            debias: cfg.debias,
        };
        let (l, ds) = loss::loss_rows(cfg.loss, &sc, r.clone());
        let (du, dv) = loss::backprop_scores(&ds, &u[r.start * d..r.end * d], r.len(), &v, c, d);
        (l, du, dv)
    });
    let l: f64 = parts.iter().map(|p| p.0).sum();
    if !l.is_finite() {
        return l;
    }
    let mut du = Vec::with_capacity(b * d);
    let mut dv = vec![0f32; c * d];
    for (_, pu, pv) in &parts {
        du.extend_from_slice(pu);
        dv.iter_mut().zip(pv).for_each(|(a, b)| *a += b);
    }
    let grads = par_n(fwd.len(), |i| {
        let (uc, ic) = &fwd[i];
        let ur = uparts.get(i).cloned().unwrap_or(0..0);
        let ir = iparts.get(i).cloned().unwrap_or(0..0);
        (
            ut.backward(uc, &du[ur.start * d..ur.end * d]),
            it.backward(ic, &dv[ir.start * d..ir.end * d]),
        )
    });
    let mut parts = grads.into_iter();
    let (mut ug, mut ig) = parts.next().expect("one part at least");
    for (a, bb) in parts {
        ug.add(a);
        ig.add(bb);
    }
    // Dual augmented towers: each side's augmented vector toward the other side's output for
    // the positive pair (the outputs are constants here).
    let mut l = l;
    if let Some(aug) = &cfg.augmented {
        l += mimic_side(
            ut,
            aug.user,
            &x.users[..bp],
            &v[..bp * d],
            d,
            &x.weights[..bp],
            aug.lambda,
            &mut ug,
        );
        l += mimic_side(
            it,
            aug.item,
            &x.items[..bp],
            &u[..bp * d],
            d,
            &x.weights[..bp],
            aug.lambda,
            &mut ig,
        );
    }
    let ustats: Vec<_> = fwd
        .iter()
        .map(|(uc, _)| uc.batch_stats().to_vec())
        .collect();
    let istats: Vec<_> = fwd
        .iter()
        .map(|(_, ic)| ic.batch_stats().to_vec())
        .collect();
    drop(fwd);
    if !cfg.freeze_dense {
        user.0.update_running_stats(&ustats);
        item.0.update_running_stats(&istats);
    }
    if threads > 1 {
        let (uo, ut, io, it) = (user.1, user.0, item.1, item.0);
        std::thread::scope(|s| {
            let h = s.spawn(|| io.step(cfg, it, &ig, t));
            uo.step(cfg, ut, &ug, t);
            if let Err(e) = h.join() {
                std::panic::resume_unwind(e);
            }
        });
    } else {
        user.1.step(cfg, user.0, &ug, t);
        item.1.step(cfg, item.0, &ig, t);
    }
    l
}

/// The mimic loss of one tower's augmented vectors (field `field`, an id embedding) for the
/// batch's positive rows `xs` toward `target` (`xs.len() × d`); adds its gradient to the
/// table's rows in `g`. Returns the loss.
#[allow(clippy::too_many_arguments)]
fn mimic_side(
    t: &Tower,
    field: usize,
    xs: &[&Encoded],
    target: &[f32],
    d: usize,
    weights: &[f32],
    lambda: f32,
    g: &mut Grads,
) -> f64 {
    let crate::net::FieldKind::Embed { table } = t.fields[field] else {
        return 0.0;
    };
    let tb = &t.tables[table];
    // Row 0 is the OOV row, shared by every unknown id: not an id's augmented vector.
    let rows: Vec<Option<u32>> = xs
        .iter()
        .map(|x| match x.fields().nth(field) {
            Some(twotower_tower::FieldRef::Row(r)) if r > 0 && (r as usize) < tb.rows => Some(r),
            _ => None,
        })
        .collect();
    let a: Vec<Option<&[f32]>> = rows.iter().map(|r| r.and_then(|r| tb.row(r))).collect();
    let (loss, da) = loss::mimic(&a, target, d, &weights[..xs.len()], lambda);
    for (i, r) in rows.iter().enumerate() {
        if let Some(r) = *r {
            let acc = g.rows[table].entry(r).or_insert_with(|| vec![0.0; d]);
            acc.iter_mut()
                .zip(&da[i * d..(i + 1) * d])
                .for_each(|(x, y)| *x += y);
        }
    }
    loss
}

/// A batch's candidates for `b` rows: the positives, the global negatives (shared by the rows
/// for a softmax, `negatives` per row otherwise) and, for a softmax, each row's own hard
/// negatives (`hard_per_row`, when there are hard negatives at all).
fn candidates(cfg: &Config, b: usize, hard: bool) -> usize {
    if cfg.loss.per_row_negatives() {
        b.saturating_add(cfg.negatives.saturating_mul(b))
    } else {
        let own = if hard {
            cfg.hard_per_row.saturating_mul(b)
        } else {
            0
        };
        b.saturating_add(cfg.negatives).saturating_add(own)
    }
}

/// The bytes one training step holds at its peak for `b` rows (see [`train_step`] and the
/// batch's making in [`train_from`]); `hard`: whether there are hard negatives; `rows`: the
/// most rows a user and an item table can have.
///
/// - The score matrix `S` and `dL/dS`, `b × c` f32 each (`c` the candidates: shared negatives
///   add `negatives` columns, per-row negatives `negatives · b`).
/// - The vectors: U and V, dU and dV, and each thread's share of dV (`c × d` per thread).
/// - Each tower's activations: every layer keeps its input and the output is kept (about two
///   values per unit of width), and the backward pass as many gradients.
/// - The embedding rows' gradients (one row per id of a row, at most the table's rows).
/// - Per candidate its item, owner, ln Q, sampled flag and input; per row its weight and input.
///
/// `extra`: the step's negative-feedback rows (each with its column) and debiasing columns.
fn step_memory(
    cfg: &Config,
    b: usize,
    hard: bool,
    rows: (usize, usize),
    extra: (usize, usize),
) -> usize {
    let c = candidates(cfg, b, hard) + extra.0 + extra.1;
    let b = b + extra.0;
    let d = cfg.dim;
    let threads = cfg.threads.clamp(1, b.max(1));
    let scores = b.saturating_mul(c).saturating_mul(8);
    let vectors = d
        .saturating_mul(4)
        .saturating_mul((2 * b).saturating_add(c.saturating_mul(2 + threads)));
    let activations = |spec: &crate::config::TowerSpec, n: usize| -> usize {
        let (_, widths) = spec.dense_size(cfg.dim, cfg.dim);
        n.saturating_mul(widths).saturating_mul(16)
    };
    // A row gradient: its f32s, the vector's header and its share of the map's node.
    let row_grads = |spec: &crate::config::TowerSpec, n: usize, table_rows: usize| -> usize {
        spec.features
            .iter()
            .map(|f| {
                let (ids, dim, bound) = match f {
                    FeatureSpec::Categorical { dim, .. } => (1, *dim, table_rows + 1),
                    FeatureSpec::Multi { dim, max_len, .. } => (*max_len, *dim, table_rows + 1),
                    FeatureSpec::History { dim, max_len, .. } => (*max_len, *dim, rows.1 + 1),
                    FeatureSpec::Bucketize {
                        dim, boundaries, ..
                    } => {
                        let n = match boundaries {
                            crate::config::Bucketing::Given(b) => b.len(),
                            crate::config::Bucketing::Quantiles(q) => *q,
                        };
                        (1, *dim, n + 2)
                    }
                    FeatureSpec::Numeric { .. }
                    | FeatureSpec::Dense { .. }
                    | FeatureSpec::Cross { .. } => (0, 0, 0),
                };
                n.saturating_mul(ids)
                    .min(bound.saturating_mul(threads))
                    .saturating_mul(dim * 4 + 64)
            })
            .sum()
    };
    let bookkeeping = c.saturating_mul(24).saturating_add(b.saturating_mul(16));
    scores
        .saturating_add(vectors)
        .saturating_add(activations(&cfg.user, b))
        .saturating_add(activations(&cfg.item, c))
        .saturating_add(row_grads(&cfg.user, b, rows.0))
        .saturating_add(row_grads(&cfg.item, c, rows.1))
        .saturating_add(bookkeeping)
}

/// The steps an epoch of `n` examples in batches of `b` trains (a last batch of one row is
/// skipped).
fn trained_steps(n: usize, b: usize) -> usize {
    let full = n / b.max(1);
    full + usize::from(n % b.max(1) >= 2)
}

/// Trained towers to continue from (incremental training): each tower's spec and weights.
#[derive(Debug, Clone, Copy)]
pub struct Base<'a> {
    pub user: (&'a str, &'a [u8]),
    pub item: (&'a str, &'a [u8]),
}

/// Trains the two towers on `data`. `budget` bounds the memory the run allocates (bytes).
pub fn train(
    cfg: &Config,
    data: &Data,
    keys: &Keys,
    budget: usize,
    progress: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<Trained> {
    train_from(cfg, data, keys, budget, None, progress)
}

/// [`train`], continuing from `base` when given: the base's vocabularies, rows, dense layers and
/// statistics are kept, ids new in `data` get fresh rows (see [`model::extend`]). With
/// `cfg.freeze_dense` only the embedding tables learn.
pub fn train_from(
    cfg: &Config,
    data: &Data,
    keys: &Keys,
    budget: usize,
    base: Option<Base>,
    progress: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<Trained> {
    if data.interactions.is_empty() {
        return Err(TrainError::NoData(
            "the interactions source has no rows".into(),
        ));
    }
    if let Some(h) = cfg.histories().iter().find(|h| h.negative) {
        if data.negative.is_empty() {
            return Err(TrainError::NoData(format!(
                "history \"{}\" reads negative feedback, and the interactions have none (no row with a label below 0)",
                h.name
            )));
        }
    }
    let timelines = data.timelines();
    let neg_timelines = data.negative_timelines();
    // The split: each user's last interaction validates (users with two or more).
    let mut train_pos: Vec<(u32, usize)> = Vec::new();
    let mut valid_pos: Vec<(u32, usize)> = Vec::new();
    for (u, t) in timelines.iter().enumerate() {
        for p in 0..t.len() {
            if cfg.validate && p + 1 == t.len() && t.len() >= 2 {
                valid_pos.push((u as u32, p));
            } else {
                train_pos.push((u as u32, p));
            }
        }
    }
    if train_pos.is_empty() {
        return Err(TrainError::NoData(
            "no training examples after the validation split".into(),
        ));
    }
    // Memory: the estimate before anything large is allocated.
    let hist_len: usize = cfg
        .user
        .features
        .iter()
        .map(|f| match f {
            FeatureSpec::History { max_len, .. } => *max_len,
            _ => 0,
        })
        .sum();
    let dense_len: usize = cfg
        .user
        .features
        .iter()
        .map(|f| match f {
            FeatureSpec::Dense { dim, .. } => *dim,
            _ => 0,
        })
        .sum();
    let per_example = 96 + cfg.user.features.len() * 48 + hist_len.min(64) * 8 + dense_len * 4;
    // Negative-feedback examples (a zero weight leaves them out).
    let feedback_on = cfg.negative_feedback.weight > 0.0 && !data.negative.is_empty();
    let n_feedback = if feedback_on { data.negative.len() } else { 0 };
    let n_inputs = train_pos.len() + valid_pos.len() + n_feedback;
    let mut counts_by_item = vec![0u64; data.items.len()];
    for &(u, p) in &train_pos {
        counts_by_item[data.interactions[timelines[u as usize][p] as usize].item as usize] += 1;
    }
    let estimate_tables = |spec: &crate::config::TowerSpec, rows: usize| -> usize {
        spec.features
            .iter()
            .map(|f| match f {
                FeatureSpec::Categorical { dim, .. }
                | FeatureSpec::Multi { dim, .. }
                | FeatureSpec::History { dim, .. } => (rows + 1) * dim * 4 * 4,
                FeatureSpec::Bucketize {
                    dim, boundaries, ..
                } => {
                    let n = match boundaries {
                        crate::config::Bucketing::Given(b) => b.len(),
                        crate::config::Bucketing::Quantiles(q) => *q,
                    };
                    (n + 2) * dim * 4 * 4
                }
                FeatureSpec::Numeric { .. }
                | FeatureSpec::Dense { .. }
                | FeatureSpec::Cross { .. } => 0,
            })
            .sum()
    };
    // Dense layers: the parameters, a copy for the best epoch, Adam's two moments, and each
    // thread's gradients.
    let dense = |spec: &crate::config::TowerSpec| -> usize {
        let (params, _) = spec.dense_size(cfg.dim, cfg.dim);
        params.saturating_mul(4 * (4 + cfg.threads.max(1)))
    };
    // One step over the largest batch the examples make.
    let b = cfg.batch_size.min(train_pos.len());
    let rows = (data.users.len().max(data.items.len()), data.items.len());
    let needed = (n_inputs * per_example)
        .saturating_add(data.items.len() * (160 + cfg.dim * 8))
        .saturating_add(estimate_tables(&cfg.user, rows.0))
        .saturating_add(estimate_tables(&cfg.item, rows.1))
        .saturating_add(dense(&cfg.user))
        .saturating_add(dense(&cfg.item))
        .saturating_add(step_memory(
            cfg,
            b,
            !data.hard.is_empty(),
            rows,
            (
                n_feedback.div_ceil(trained_steps(train_pos.len(), b).max(1)),
                if cfg.debias.is_some() { b } else { 0 },
            ),
        ));
    if needed > budget {
        return Err(TrainError::MemoryBudget { needed, budget });
    }

    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    // Statistics and vocabularies from the training examples only.
    let user_stats = stats_of(
        &cfg.user.features,
        train_pos.iter().map(|&(u, p)| {
            let t = (&timelines[u as usize][..], &neg_timelines[u as usize][..]);
            (user_input(cfg, data, keys, u, t, p), 1)
        }),
    );
    let item_stats = stats_of(
        &cfg.item.features,
        counts_by_item
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| {
                (
                    with_id(&data.items[i].features, &keys.item, &data.items[i].id),
                    c,
                )
            }),
    );
    let mc = cfg.min_count as u64;
    let mut uplan = model::plan(
        "user",
        &cfg.user,
        cfg.dim,
        &user_stats,
        mc,
        cfg.max_vocab,
        cfg.init_std,
        &mut rng,
    )?;
    let mut iplan = model::plan(
        "item",
        &cfg.item,
        cfg.dim,
        &item_stats,
        mc,
        cfg.max_vocab,
        cfg.init_std,
        &mut rng,
    )?;
    if let Some(b) = base {
        uplan = model::extend(&uplan, b.user.0, b.user.1)?;
        iplan = model::extend(&iplan, b.item.0, b.item.1)?;
    }
    let mut utower = uplan.tower.clone();
    let mut itower = iplan.tower.clone();
    // Encoding through the serving models themselves (the vocabularies are in the specs).
    let umodel = load(&uplan, &utower)?;
    let imodel = load(&iplan, &itower)?;
    let encode = |m: &Model, v: &Value, what: &dyn Fn() -> String| -> Result<Encoded> {
        m.encode(v, false)
            .map_err(|e| TrainError::NoData(format!("{}: {e}", what())))
    };
    let items: Vec<Encoded> = data
        .items
        .iter()
        .map(|it| {
            encode(&imodel, &with_id(&it.features, &keys.item, &it.id), &|| {
                format!("item {}", it.id)
            })
        })
        .collect::<Result<_>>()?;
    // A sample of raw inputs, re-encoded by the exported models for the export check.
    const SAMPLE: usize = 64;
    let item_sample: Vec<Value> = data
        .items
        .iter()
        .take(SAMPLE)
        .map(|it| with_id(&it.features, &keys.item, &it.id))
        .collect();
    let mut user_sample: Vec<Value> = Vec::with_capacity(SAMPLE);
    let mut inputs: Vec<Encoded> = Vec::with_capacity(n_inputs);
    let mut examples = Vec::with_capacity(train_pos.len());
    let mut valid = Vec::with_capacity(valid_pos.len());
    for (list, out) in [(&train_pos, &mut examples), (&valid_pos, &mut valid)] {
        for &(u, p) in list.iter() {
            let t = &timelines[u as usize];
            let x = &data.interactions[t[p] as usize];
            let v = user_input(cfg, data, keys, u, (t, &neg_timelines[u as usize]), p);
            inputs.push(encode(&umodel, &v, &|| {
                format!("user {}", data.users[u as usize].id)
            })?);
            if user_sample.len() < SAMPLE {
                user_sample.push(v);
            }
            out.push(Example {
                user: u,
                item: x.item,
                weight: x.weight,
                input: inputs.len() - 1,
            });
        }
    }
    // Negative feedback: the user as they were at that moment (their positives before it).
    let mut feedback: Vec<Example> = Vec::with_capacity(n_feedback);
    for x in data.negative.iter().take(n_feedback) {
        let t = &timelines[x.user as usize];
        let pos = t.partition_point(|&k| data.interactions[k as usize].ts < x.ts);
        // The leakage rule: nothing at or after a user's validation interaction trains.
        if cfg.validate && t.len() >= 2 && pos >= t.len() - 1 {
            continue;
        }
        let v = user_input_at(
            cfg,
            data,
            keys,
            x.user,
            (t, &neg_timelines[x.user as usize]),
            pos,
            x.ts,
        );
        inputs.push(encode(&umodel, &v, &|| {
            format!("user {}", data.users[x.user as usize].id)
        })?);
        feedback.push(Example {
            user: x.user,
            item: x.item,
            weight: x.weight,
            input: inputs.len() - 1,
        });
    }
    let mut feedback_order: Vec<usize> = (0..feedback.len()).collect();
    // Debiasing: the head (the most popular `head` share of the items with training
    // positives, by count, ties by index) and each user's positive items.
    let (is_head, head_items, engaged) = match &cfg.debias {
        None => (Vec::new(), Vec::new(), HashMap::new()),
        Some(d) => {
            let mut by_count: Vec<u32> = (0..counts_by_item.len() as u32)
                .filter(|&i| counts_by_item[i as usize] > 0)
                .collect();
            by_count.sort_by(|&a, &b| {
                counts_by_item[b as usize]
                    .cmp(&counts_by_item[a as usize])
                    .then(a.cmp(&b))
            });
            let n =
                ((by_count.len() as f64 * d.head).ceil() as usize).clamp(1, by_count.len().max(1));
            by_count.truncate(n);
            let mut is_head = vec![false; counts_by_item.len()];
            for &i in &by_count {
                is_head[i as usize] = true;
            }
            let mut engaged: HashMap<u32, std::collections::HashSet<u32>> = HashMap::new();
            for &(u, p) in &train_pos {
                engaged
                    .entry(u)
                    .or_default()
                    .insert(data.interactions[timelines[u as usize][p] as usize].item);
            }
            (is_head, by_count, engaged)
        }
    };
    // Each validation user's training items are masked when ranking.
    let mut seen: HashMap<u32, Vec<u32>> = HashMap::new();
    if !valid.is_empty() {
        for &(u, p) in &train_pos {
            seen.entry(u)
                .or_default()
                .push(data.interactions[timelines[u as usize][p] as usize].item);
        }
        for v in seen.values_mut() {
            v.sort_unstable();
            v.dedup();
        }
    }

    let total: u64 = counts_by_item.iter().sum();
    let sampler = Sampler::new(&counts_by_item);
    let per_row = cfg.loss.per_row_negatives();
    let b_max = cfg.batch_size.min(examples.len());
    // ln of the expected count of an item among a batch's positives (in-batch logQ).
    let freq_logq: Vec<f32> = counts_by_item
        .iter()
        .map(|&c| {
            if c > 0 {
                ((c as f64 / total as f64) * b_max as f64).ln() as f32
            } else {
                0.0
            }
        })
        .collect();

    let mut uopt = Optim::new(cfg, &utower);
    let mut iopt = Optim::new(cfg, &itower);
    let threads = cfg.threads;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let mut reports: Vec<EpochReport> = Vec::new();
    let mut best: Option<(f64, usize, Tower, Tower)> = None;
    let mut step: u64 = 0;
    let mut since_best = 0;
    for epoch in 1..=cfg.epochs {
        let started = Instant::now();
        order.shuffle(&mut rng);
        // Hot-item down-sampling of positives (word2vec): keep with √(t/f) + t/f.
        let kept: Vec<usize> = if cfg.subsample > 0.0 {
            order
                .iter()
                .copied()
                .filter(|&e| {
                    let f = counts_by_item[examples[e].item as usize] as f64 / total as f64;
                    let r = cfg.subsample / f;
                    let keep = r.sqrt() + r;
                    keep >= 1.0 || rng.gen::<f64>() < keep
                })
                .collect()
        } else {
            order.clone()
        };
        let mut loss_sum = 0f64;
        let mut seen_examples = 0usize;
        let steps = kept.len().div_ceil(b_max);
        // The negative-feedback examples spread evenly over the steps of a full epoch (the
        // steps a batch of two rows or more makes): every one once an epoch, or, when
        // `subsample` keeps fewer positives, the same share of them (the memory estimate's
        // rows per step).
        feedback_order.shuffle(&mut rng);
        let feedback_per_step = feedback
            .len()
            .div_ceil(trained_steps(examples.len(), b_max).max(1));
        for (s, batch) in kept.chunks(b_max).enumerate() {
            let b = batch.len();
            if b < 2 {
                continue;
            }
            step += 1;
            // Candidates: the positives, then the sampled negatives (shared, or `negatives` per
            // row), then (softmax) each row's own hard negatives. A per-row loss draws the first
            // `hard_ratio` of each row's negatives from the user's hard items.
            let n_neg = if per_row {
                cfg.negatives * b
            } else {
                cfg.negatives
            };
            let mut cand: Vec<u32> = batch.iter().map(|&e| examples[e].item).collect();
            let mut owner: Vec<i32> = vec![-1; b];
            let mut sampled = vec![true; b + n_neg];
            sampled[..b].iter_mut().for_each(|x| *x = false);
            let hard_of = |e: usize| data.hard.get(&examples[e].user).filter(|h| !h.is_empty());
            let per_row_hard = ((cfg.negatives as f64) * cfg.hard_ratio).round() as usize;
            if n_neg > 0 {
                let sm = sampler
                    .as_ref()
                    .ok_or_else(|| TrainError::NoData("no item to sample negatives from".into()))?;
                for j in 0..n_neg {
                    let row = j / cfg.negatives.max(1);
                    let hard = if per_row && j % cfg.negatives.max(1) < per_row_hard {
                        hard_of(batch[row])
                    } else {
                        None
                    };
                    match hard {
                        Some(h) => {
                            cand.push(h[rng.gen_range(0..h.len())]);
                            sampled[b + j] = false;
                        }
                        None => cand.push(sm.sample(&mut rng)),
                    }
                    owner.push(if per_row { row as i32 } else { -1 });
                }
            }
            if !per_row && cfg.hard_per_row > 0 {
                for (row, &e) in batch.iter().enumerate() {
                    if let Some(h) = hard_of(e) {
                        for _ in 0..cfg.hard_per_row {
                            cand.push(h[rng.gen_range(0..h.len())]);
                            owner.push(row as i32);
                            sampled.push(false);
                        }
                    }
                }
            }
            let c = cand.len();
            let mut logq = vec![0f32; c];
            for (j, &it) in cand.iter().enumerate() {
                logq[j] = if j < b {
                    freq_logq[it as usize]
                } else if let (true, Some(sm)) = (sampled[j], &sampler) {
                    sm.logq[it as usize] + (n_neg as f32).ln()
                } else {
                    // Hard negatives are chosen, not sampled from a known distribution.
                    0.0
                };
            }
            // Debiasing pairs: a positive outside the head against a head item the user did
            // not engage with (a few draws; none when every draw was engaged with).
            let mut pairs: Vec<i32> = Vec::new();
            let mut paired = 0usize;
            if cfg.debias.is_some() && !head_items.is_empty() {
                pairs = vec![-1; b];
                for (row, &e) in batch.iter().enumerate() {
                    let ex = &examples[e];
                    if is_head[ex.item as usize] {
                        continue;
                    }
                    let mine = engaged.get(&ex.user);
                    for _ in 0..8 {
                        let p = head_items[rng.gen_range(0..head_items.len())];
                        if mine.is_some_and(|m| m.contains(&p)) {
                            continue;
                        }
                        pairs[row] = cand.len() as i32;
                        cand.push(p);
                        // Scored by its row through `pairs` only: no row's candidate.
                        owner.push(i32::MAX);
                        logq.push(0.0);
                        paired += 1;
                        break;
                    }
                }
            }
            let fb: &[usize] = if feedback_per_step > 0 {
                let lo = (s * feedback_per_step).min(feedback.len());
                &feedback_order[lo..(lo + feedback_per_step).min(feedback.len())]
            } else {
                &[]
            };
            for (r, &e) in fb.iter().enumerate() {
                cand.push(feedback[e].item);
                owner.push((b + r) as i32);
                logq.push(0.0);
            }
            let weights: Vec<f32> = batch
                .iter()
                .map(|&e| examples[e].weight)
                .chain(fb.iter().map(|&e| feedback[e].weight))
                .collect();
            let uxs: Vec<&Encoded> = batch
                .iter()
                .map(|&e| &inputs[examples[e].input])
                .chain(fb.iter().map(|&e| &inputs[feedback[e].input]))
                .collect();
            let ixs: Vec<&Encoded> = cand.iter().map(|&i| &items[i as usize]).collect();
            let batch_in = Batch {
                users: &uxs,
                items: &ixs,
                cand: &cand,
                owner: &owner,
                logq: &logq,
                weights: &weights,
                feedback: fb.len(),
                paired,
                pairs: &pairs,
            };
            let l = train_step(
                cfg,
                (&mut utower, &mut uopt),
                (&mut itower, &mut iopt),
                &batch_in,
                step,
                threads,
            );
            if !l.is_finite() {
                return Err(TrainError::Diverged {
                    epoch,
                    step: s + 1,
                    loss: l,
                });
            }
            loss_sum += l * b as f64;
            seen_examples += b;
            progress(Event::Step(&Progress {
                epoch,
                epochs: cfg.epochs,
                step: s + 1,
                steps,
                loss: loss_sum / seen_examples.max(1) as f64,
                examples_per_s: seen_examples as f64 / started.elapsed().as_secs_f64().max(1e-9),
                valid: None,
            }))?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let metric = if valid.is_empty() {
            None
        } else {
            Some(validate(
                cfg, &utower, &itower, &items, &inputs, &valid, &seen, threads, progress,
            )?)
        };
        let report = EpochReport {
            epoch,
            loss: loss_sum / seen_examples.max(1) as f64,
            examples: seen_examples,
            seconds,
            valid: metric,
        };
        progress(Event::Epoch(&Progress {
            epoch,
            epochs: cfg.epochs,
            step: steps,
            steps,
            loss: report.loss,
            examples_per_s: seen_examples as f64 / seconds.max(1e-9),
            valid: metric,
        }))?;
        reports.push(report);
        // The best epoch by validation recall (the last one without validation).
        let score = metric.map_or(epoch as f64, |m| m.recall);
        if best.as_ref().is_none_or(|b| score > b.0) {
            best = Some((score, epoch, utower.clone(), itower.clone()));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= cfg.patience {
                break;
            }
        }
    }
    let (_, best_epoch, mut bu, mut bi) =
        best.ok_or_else(|| TrainError::NoData("no epoch completed".into()))?;
    // FTRL: rows that never received a gradient carry only their initial noise: unused, zero.
    if matches!(cfg.sparse, crate::optim::Sparse::Ftrl { .. }) {
        uopt.zero_untouched(&mut bu);
        iopt.zero_untouched(&mut bi);
    }
    // All-zero rows are pruned from the tables and their ids from the vocabularies.
    let (uplan_p, bu_p, upruned) = model::prune(&uplan, &bu);
    let (iplan_p, bi_p, ipruned) = model::prune(&iplan, &bi);
    let (user_spec, user_weights) = model::export(&uplan_p, &bu_p)?;
    let (item_spec, item_weights) = model::export(&iplan_p, &bi_p)?;
    // The exported models compute what training computed (pruned ids now read the zero OOV
    // row, the value their own row had).
    check_export(
        &user_spec,
        &user_weights,
        &bu,
        &inputs[..user_sample.len()],
        &user_sample,
    )?;
    check_export(
        &item_spec,
        &item_weights,
        &bi,
        &items[..item_sample.len()],
        &item_sample,
    )?;
    Ok(Trained {
        user_spec,
        user_weights,
        item_spec,
        item_weights,
        best_epoch,
        epochs: reports,
        train_examples: examples.len(),
        valid_examples: valid.len(),
        user_parameters: bu_p.parameter_count(),
        item_parameters: bi_p.parameter_count(),
        pruned: upruned.into_iter().chain(ipruned).collect(),
    })
}

/// Loads the exported model, encodes `raw` with it and checks its outputs against the trained
/// tower's on the training encodings of the same inputs (`trained`).
fn check_export(
    spec: &str,
    weights: &[u8],
    tower: &Tower,
    trained: &[Encoded],
    raw: &[Value],
) -> Result<()> {
    let m = Model::load(spec, weights).map_err(|e| TrainError::Export(e.to_string()))?;
    let xs: Vec<&Encoded> = trained.iter().collect();
    let ours = tower.forward(&xs);
    let served: Vec<Encoded> = raw
        .iter()
        .map(|v| m.encode(v, false))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| TrainError::Export(e.to_string()))?;
    let theirs = m.forward_batch(&served);
    for (a, b) in ours.output().iter().zip(&theirs) {
        if (a - b).abs() > 1e-5 {
            return Err(TrainError::Export(format!(
                "served output {b} differs from the trained {a}"
            )));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn validate(
    cfg: &Config,
    utower: &Tower,
    itower: &Tower,
    items: &[Encoded],
    inputs: &[Encoded],
    valid: &[Example],
    seen: &HashMap<u32, Vec<u32>>,
    threads: usize,
    progress: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<Metrics> {
    let d = cfg.dim;
    let ixs: Vec<&Encoded> = items.iter().collect();
    let iv = embed_all(itower, &ixs, threads, d);
    let uxs: Vec<&Encoded> = valid.iter().map(|e| &inputs[e.input]).collect();
    let uv = embed_all(utower, &uxs, threads, d);
    let mut acc = Accumulator::new(&[cfg.k]);
    let empty = Vec::new();
    let n_items = items.len();
    for chunk in (0..valid.len()).collect::<Vec<_>>().chunks(256) {
        let parts = split(chunk.len(), threads);
        let rs = par(&parts, |r| {
            r.map(|j| {
                let e = &valid[chunk[j]];
                let u = &uv[chunk[j] * d..(chunk[j] + 1) * d];
                let scores: Vec<f32> = (0..n_items)
                    .map(|i| twotower_tower::layers::dot(u, &iv[i * d..(i + 1) * d]))
                    .collect();
                ranks(&scores, &[e.item], seen.get(&e.user).unwrap_or(&empty))
            })
            .collect::<Vec<_>>()
        });
        for r in rs.into_iter().flatten() {
            acc.add(&r);
        }
        // A long validation stays cancellable.
        progress(Event::Tick)?;
    }
    Ok(acc.metrics()[0])
}
