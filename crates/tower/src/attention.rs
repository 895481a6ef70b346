//! Target attention of a pre-rank model (DIN-style; Zhou et al., KDD 2018): the candidate's
//! item vector v attends over the item vectors h₁..hₙ of the user's history,
//!
//!   q = W_q·v,  kᵢ = W_k·hᵢ,  sᵢ = q·kᵢ / √r,  α = softmax(s),  output Σ αᵢ·hᵢ,
//!
//! with learned W_q and W_k (`[r, d]`). DIN scores each pair with a small MLP; the bilinear
//! score here (scaled dot-product attention, as in BST) lets the keys be computed once per
//! request, so a candidate costs r·d + n·(r + d) multiply-adds. The pre-rank stage sees the
//! candidate, so this is allowed there and not in the towers. Serving and training call the
//! same functions.

use crate::layers::{gemm_xwt, matvec, softmax};
use crate::model::Model;

/// Where a model's target attention input and weights are.
#[derive(Debug, Clone)]
pub(crate) struct TargetAttention {
    /// The feature (a `cross` input of `target_attention`).
    pub feature: usize,
    /// Tensor indices of W_q and W_k.
    pub query: usize,
    pub key: usize,
    pub r: usize,
    pub d: usize,
}

/// The most history vectors target attention reads: the first ones given (histories are most
/// recent first), so one request's work and memory stay bounded whatever its history's length.
pub const MAX_ATTENDED: usize = 256;

/// Candidates per block in [`attend_rows`] (bounds its score matrix to
/// `ROWS_PER_BLOCK × MAX_ATTENDED` floats).
const ROWS_PER_BLOCK: usize = 1024;

/// One request's history ready for target attention: the vectors that are `d` wide and
/// finite, and their keys.
#[derive(Debug, Clone, Default)]
pub struct HistoryKeys {
    /// `n × d`.
    pub values: Vec<f32>,
    /// `n × r`.
    pub keys: Vec<f32>,
    pub n: usize,
    pub r: usize,
    pub d: usize,
}

/// The history vectors target attention reads: the first [`MAX_ATTENDED`] that are `d` wide
/// and finite.
pub fn attended<H: AsRef<[f32]>>(history: &[H], d: usize) -> impl Iterator<Item = &[f32]> {
    history
        .iter()
        .map(AsRef::as_ref)
        .filter(move |h| h.len() == d && h.iter().all(|x| x.is_finite()))
        .take(MAX_ATTENDED)
}

/// The keys W_k·hᵢ of the [`attended`] vectors of `history` (`wk` is `[r, d]`).
pub fn history_keys<H: AsRef<[f32]>>(wk: &[f32], r: usize, d: usize, history: &[H]) -> HistoryKeys {
    let mut out = HistoryKeys {
        r,
        d,
        ..HistoryKeys::default()
    };
    for h in attended(history, d) {
        let mut k = vec![0f32; r];
        matvec(wk, None, h, r, &mut k);
        out.values.extend_from_slice(h);
        out.keys.extend_from_slice(&k);
        out.n += 1;
    }
    out
}

/// The attention of `v` over the history into `out` (`d` wide; zeros without history or when
/// `v` is not `d` wide). Returns the query and the weights α (empty when nothing was attended),
/// which a backward pass needs.
pub fn attend(wq: &[f32], keys: &HistoryKeys, v: &[f32], out: &mut [f32]) -> (Vec<f32>, Vec<f32>) {
    out.iter_mut().for_each(|o| *o = 0.0);
    let (r, d, n) = (keys.r, keys.d, keys.n);
    if n == 0 || v.len() != d || out.len() != d {
        return (Vec::new(), Vec::new());
    }
    let mut q = vec![0f32; r];
    matvec(wq, None, v, r, &mut q);
    let scale = 1.0 / (r as f32).sqrt();
    let s: Vec<f32> = keys
        .keys
        .chunks_exact(r)
        .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale)
        .collect();
    let mut alpha = vec![0f32; n];
    softmax(&s, &mut alpha);
    for (a, h) in alpha.iter().zip(keys.values.chunks_exact(d)) {
        for (o, x) in out.iter_mut().zip(h) {
            *o += a * x;
        }
    }
    (q, alpha)
}

/// [`attend`] of many candidates at once (`vs`, each `d` wide, else its row is zeros): three
/// matrix products, Q = V·W_qᵀ, S = Q·Kᵀ/√r, O = softmax(S)·H. Returns `vs.len() × d` values,
/// the same as [`attend`] row by row up to the rounding of reordered sums.
pub fn attend_rows(wq: &[f32], keys: &HistoryKeys, vs: &[&[f32]]) -> Vec<f32> {
    let (d, n, m) = (keys.d, keys.n, vs.len());
    if n == 0 || m == 0 || d == 0 {
        return vec![0f32; m * d];
    }
    // Hᵀ (d × n), so that O = A · (Hᵀ)ᵀ; once per call, then block by block.
    let mut ht = vec![0f32; d * n];
    for (i, h) in keys.values.chunks_exact(d).enumerate() {
        for (j, x) in h.iter().enumerate() {
            ht[j * n + i] = *x;
        }
    }
    let mut out = Vec::with_capacity(m * d);
    for block in vs.chunks(ROWS_PER_BLOCK) {
        let alpha = weights_rows(wq, keys, block);
        out.extend_from_slice(&gemm_xwt(&alpha, block.len(), n, &ht, d, None));
    }
    out
}

/// The attention weights α of many candidates (`vs.len() × n`; a row of zeros for a vector
/// that is not `d` wide, or without history): Q = V·W_qᵀ, S = Q·Kᵀ/√r, row-wise softmax, in
/// blocks of candidates.
pub fn weights_rows(wq: &[f32], keys: &HistoryKeys, vs: &[&[f32]]) -> Vec<f32> {
    let (r, d, n, m) = (keys.r, keys.d, keys.n, vs.len());
    if n == 0 || m == 0 || d == 0 {
        return Vec::new();
    }
    if m > ROWS_PER_BLOCK {
        let mut out = Vec::with_capacity(m * n);
        for block in vs.chunks(ROWS_PER_BLOCK) {
            out.extend_from_slice(&weights_rows(wq, keys, block));
        }
        return out;
    }
    let mut x = vec![0f32; m * d];
    for (row, v) in x.chunks_exact_mut(d).zip(vs) {
        if v.len() == d {
            row.copy_from_slice(v);
        }
    }
    let q = gemm_xwt(&x, m, d, wq, r, None);
    let mut s = gemm_xwt(&q, m, r, &keys.keys, n, None);
    let scale = 1.0 / (r as f32).sqrt();
    let mut alpha = vec![0f32; m * n];
    for ((srow, arow), v) in s.chunks_exact_mut(n).zip(alpha.chunks_exact_mut(n)).zip(vs) {
        if v.len() == d {
            srow.iter_mut().for_each(|x| *x *= scale);
            softmax(srow, arow);
        }
    }
    alpha
}

impl Model {
    /// The target attention input of many candidates (see [`attend_rows`]); zeros when the
    /// model has none or the keys are another model's.
    pub fn attend_rows(&self, keys: &HistoryKeys, vs: &[&[f32]]) -> Vec<f32> {
        match &self.attention {
            Some(a) if self.keys_fit(keys) => attend_rows(&self.tensors[a.query], keys, vs),
            _ => vec![0f32; vs.len() * self.attention.as_ref().map_or(0, |a| a.d)],
        }
    }

    /// The attention weights of many candidates (see [`weights_rows`]); empty when the model
    /// has none or the keys are another model's.
    pub(crate) fn attention_weights_rows(&self, keys: &HistoryKeys, vs: &[&[f32]]) -> Vec<f32> {
        match &self.attention {
            Some(a) if self.keys_fit(keys) => weights_rows(&self.tensors[a.query], keys, vs),
            _ => Vec::new(),
        }
    }

    /// Whether `keys` were made for this model's attention (its r and d).
    pub(crate) fn keys_fit(&self, keys: &HistoryKeys) -> bool {
        self.attention
            .as_ref()
            .is_some_and(|a| keys.r == a.r && keys.d == a.d)
    }

    /// The index of the model's target attention input, if it has one.
    pub fn attention_feature(&self) -> Option<usize> {
        self.attention.as_ref().map(|a| a.feature)
    }

    /// The keys of a request's history for this model's target attention (empty when the
    /// model has none).
    pub fn attention_keys(&self, history: &[Vec<f32>]) -> HistoryKeys {
        match &self.attention {
            Some(a) => history_keys(&self.tensors[a.key], a.r, a.d, history),
            None => HistoryKeys::default(),
        }
    }

    /// The target attention input of the candidate with item vector `v` into `out`.
    pub fn attend(&self, keys: &HistoryKeys, v: &[f32], out: &mut [f32]) {
        match &self.attention {
            Some(a) if self.keys_fit(keys) => {
                attend(&self.tensors[a.query], keys, v, out);
            }
            _ => out.iter_mut().for_each(|o| *o = 0.0),
        }
    }
}
