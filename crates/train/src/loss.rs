//! Losses over a batch's score matrix. Row `i` is a user (or a request), column `j` a candidate
//! item: columns `0..b` are the batch's positives (column `i` is row `i`'s positive), columns
//! `b..c` are sampled negatives. `S = U·Vᵀ` (cosines, for unit vectors). Every loss returns its
//! value (the weighted mean over rows) and `dL/dS`.
//!
//! Negative feedback: the last `feedback` rows (`b..b + feedback`) are negative-feedback
//! examples, and the last `feedback` columns their disliked items (row `b + r`, column
//! `c − feedback + r`, owned by that row: no positive row scores them). Each adds the sigmoid
//! cross-entropy against label 0, weighted as [`NegativeFeedback`] says.
//!
//! Debiasing pairs: `paired` columns just before the feedback ones, each a popular item drawn
//! for one positive row (`pairs[i]`, −1 for none) and scored by no other row: the row adds
//! `weight · softplus(−(s⁺ − s_pop) / temperature)` ([`Debias`]).

use crate::config::{Debias, NegativeFeedback};
use ndarray::ArrayView2;

/// Which candidates a row scores against, and how.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossKind {
    /// Softmax cross-entropy over the row's positive and its candidates: the other rows'
    /// positives (`in_batch`) and/or the shared global negatives; logits `s/τ − ln Q(j)` when
    /// `logq` (Q the expected count of `j` among the candidates).
    Softmax { in_batch: bool, logq: bool },
    /// Sigmoid cross-entropy: the positive against label 1, each of the row's own `negatives`
    /// columns (`b + i·r .. b + (i+1)·r`) against label 0; logits `s/τ`.
    Pointwise,
    /// `max(0, margin − s⁺ + s⁻)` for each of the row's own negatives (cosines, no temperature).
    TripletHinge { margin: f32 },
    /// `ln(1 + exp(−(s⁺ − s⁻)/τ))` for each of the row's own negatives.
    TripletLogistic,
}

impl LossKind {
    /// Whether the global negatives are shared by every row (softmax) or `negatives` per row.
    pub fn per_row_negatives(self) -> bool {
        !matches!(self, LossKind::Softmax { .. })
    }
}

/// One batch's inputs to a loss.
pub struct Scores<'a> {
    /// `b × c`, row-major.
    pub s: &'a [f32],
    pub b: usize,
    pub c: usize,
    /// Per column: ln Q(j) (used by `Softmax { logq: true }`).
    pub logq: &'a [f32],
    /// Per column: the candidate's item (a column equal to the row's positive item is not a
    /// negative of that row: duplicates in the batch and accidental hits are masked).
    pub items: &'a [u32],
    /// Per column: the row it belongs to (a row's own hard negatives, and the per-row
    /// negatives of per-row losses), or -1 for a column every row scores.
    pub owner: &'a [i32],
    /// Per row: the example's weight (positives, then negative-feedback rows).
    pub weights: &'a [f32],
    pub temperature: f32,
    /// Trailing negative-feedback rows and columns (0: none).
    pub feedback: usize,
    pub nf: NegativeFeedback,
    /// Debiasing pair columns (before the feedback ones), and per positive row its pair's
    /// column or −1 (empty: none).
    pub paired: usize,
    pub pairs: &'a [i32],
    pub debias: Option<Debias>,
}

/// The loss and `dL/dS` (`(b + feedback) × c`).
pub fn loss(kind: LossKind, x: &Scores) -> (f64, Vec<f32>) {
    loss_rows(kind, x, 0..x.b + x.feedback)
}

/// The part of the loss from rows `rows` and their `dL/dS`: `x.s` holds those rows only
/// (`rows.len() × c`); weights are normalised over all rows (positives and negative feedback
/// each over their own), so the parts add up to [`loss`].
pub fn loss_rows(kind: LossKind, x: &Scores, rows: std::ops::Range<usize>) -> (f64, Vec<f32>) {
    let (b, c) = (x.b, x.c);
    let mut ds = vec![0f32; rows.len() * c];
    let sum = |w: &[f32]| {
        w.iter()
            .map(|&w| w as f64)
            .sum::<f64>()
            .max(f64::MIN_POSITIVE)
    };
    let wsum = sum(&x.weights[..b]);
    let fsum = sum(&x.weights[b..b + x.feedback]);
    let tau = x.temperature as f64;
    let mut total = 0f64;
    // Per-row losses: row i's negatives are columns b + i·r .. b + (i+1)·r.
    let negatives = (c - b - x.feedback - x.paired).checked_div(b).unwrap_or(0);
    for (li, i) in rows.enumerate() {
        let srow = &x.s[li * c..(li + 1) * c];
        let drow = &mut ds[li * c..(li + 1) * c];
        if i >= b {
            // A negative-feedback row: BCE with logits against label 0 on its own column.
            let j = c - x.feedback + (i - b);
            let w = x.nf.weight as f64 * x.weights[i] as f64 / fsum;
            let t = x.nf.temperature as f64;
            let z = (srow[j] as f64 - x.nf.margin as f64) / t;
            total += w * softplus(z);
            drow[j] = (w * sigmoid(z) / t) as f32;
            continue;
        }
        let wi = x.weights[i] as f64 / wsum;
        let pos = x.items[i];
        let sp = srow[i] as f64;
        match kind {
            LossKind::Softmax { in_batch, logq } => {
                // The row's candidate set: its positive, other rows' positives (in_batch), the
                // global negatives; minus every other column holding the positive item.
                let keep = |j: usize| {
                    j == i
                        || ((j >= b || in_batch)
                            && x.items[j] != pos
                            && (x.owner[j] < 0 || x.owner[j] == i as i32))
                };
                let logit =
                    |j: usize| srow[j] as f64 / tau - if logq { x.logq[j] as f64 } else { 0.0 };
                let mut mx = f64::NEG_INFINITY;
                for j in (0..c).filter(|&j| keep(j)) {
                    mx = mx.max(logit(j));
                }
                let mut z = 0f64;
                for j in (0..c).filter(|&j| keep(j)) {
                    z += (logit(j) - mx).exp();
                }
                let lse = mx + z.ln();
                total += wi * (lse - logit(i));
                for j in (0..c).filter(|&j| keep(j)) {
                    let p = (logit(j) - lse).exp();
                    let g = p - if j == i { 1.0 } else { 0.0 };
                    drow[j] = (wi * g / tau) as f32;
                }
            }
            LossKind::Pointwise => {
                // BCE with logits: softplus(−z) for the positive, softplus(z) for negatives.
                total += wi * softplus(-sp / tau);
                drow[i] = (wi * (sigmoid(sp / tau) - 1.0) / tau) as f32;
                for j in b + i * negatives..b + (i + 1) * negatives {
                    if x.items[j] == pos {
                        continue;
                    }
                    let z = srow[j] as f64 / tau;
                    total += wi * softplus(z);
                    drow[j] = (wi * sigmoid(z) / tau) as f32;
                }
            }
            LossKind::TripletHinge { margin } => {
                let per = 1.0 / negatives.max(1) as f64;
                for j in b + i * negatives..b + (i + 1) * negatives {
                    if x.items[j] == pos {
                        continue;
                    }
                    let v = margin as f64 - sp + srow[j] as f64;
                    if v > 0.0 {
                        total += wi * per * v;
                        drow[i] -= (wi * per) as f32;
                        drow[j] += (wi * per) as f32;
                    }
                }
            }
            LossKind::TripletLogistic => {
                let per = 1.0 / negatives.max(1) as f64;
                for j in b + i * negatives..b + (i + 1) * negatives {
                    if x.items[j] == pos {
                        continue;
                    }
                    let z = (sp - srow[j] as f64) / tau;
                    total += wi * per * softplus(-z);
                    // d softplus(−z)/dz = −sigmoid(−z)
                    let g = -sigmoid(-z) * wi * per / tau;
                    drow[i] += g as f32;
                    drow[j] -= g as f32;
                }
            }
        }
        if let (Some(d), Some(&j)) = (x.debias, x.pairs.get(i)) {
            if j >= 0 {
                let j = j as usize;
                let t = d.temperature as f64;
                let w = d.weight as f64 * wi;
                let z = (sp - srow[j] as f64) / t;
                total += w * softplus(-z);
                let g = w * sigmoid(-z) / t;
                drow[i] -= g as f32;
                drow[j] += g as f32;
            }
        }
    }
    (total, ds)
}

/// `S = U·Vᵀ` for `U` `[b, d]` and `V` `[c, d]`.
pub fn scores(u: &[f32], b: usize, v: &[f32], c: usize, d: usize) -> Vec<f32> {
    let uv = ArrayView2::from_shape((b, d), u).expect("U shape");
    let vv = ArrayView2::from_shape((c, d), v).expect("V shape");
    uv.dot(&vv.t()).into_raw_vec_and_offset().0
}

/// `dU = dS·V` and `dV = dSᵀ·U`.
pub fn backprop_scores(
    ds: &[f32],
    u: &[f32],
    b: usize,
    v: &[f32],
    c: usize,
    d: usize,
) -> (Vec<f32>, Vec<f32>) {
    let dsv = ArrayView2::from_shape((b, c), ds).expect("dS shape");
    let uv = ArrayView2::from_shape((b, d), u).expect("U shape");
    let vv = ArrayView2::from_shape((c, d), v).expect("V shape");
    let du = dsv.dot(&vv).into_raw_vec_and_offset().0;
    let dv = dsv.t().dot(&uv).into_raw_vec_and_offset().0;
    (du, dv)
}

#[inline]
pub(crate) fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// ln(1 + eᶻ), without overflow.
#[inline]
pub(crate) fn softplus(z: f64) -> f64 {
    if z > 30.0 {
        z
    } else {
        z.exp().ln_1p()
    }
}

/// The adaptive-mimic loss of the dual augmented two-tower (Meituan): each row's augmented
/// vector `a` (an id embedding) is pulled toward `target` (the other tower's output for the
/// row's positive pair, a constant: its gradient is stopped), `λ · Σᵢ w̄ᵢ · ‖aᵢ − targetᵢ‖²`
/// with the row weights normalised as the main loss's. Rows without an augmented vector
/// (`None`) add nothing. Returns the loss and `dL/da` per row (zeros for `None`).
pub fn mimic(
    a: &[Option<&[f32]>],
    target: &[f32],
    d: usize,
    weights: &[f32],
    lambda: f32,
) -> (f64, Vec<f32>) {
    let wsum: f64 = weights
        .iter()
        .map(|&w| w as f64)
        .sum::<f64>()
        .max(f64::MIN_POSITIVE);
    let mut total = 0f64;
    let mut da = vec![0f32; a.len() * d];
    for (i, ai) in a.iter().enumerate() {
        let Some(ai) = ai else { continue };
        let wi = lambda as f64 * weights[i] as f64 / wsum;
        let t = &target[i * d..(i + 1) * d];
        let out = &mut da[i * d..(i + 1) * d];
        for j in 0..d {
            let diff = ai[j] as f64 - t[j] as f64;
            total += wi * diff * diff;
            out[j] = (2.0 * wi * diff) as f32;
        }
    }
    (total, da)
}
