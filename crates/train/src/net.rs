//! A trainable tower: the parameters of one side, its forward pass (the tower crate's own layer
//! kernels, so training and serving compute the same function) and its backward pass.

use ndarray::{ArrayView2, Axis};
use std::collections::BTreeMap;
use twotower_tower::layers::{self, Activation};
use twotower_tower::{Encoded, FieldRef};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Sum,
    /// Element-wise maximum of wᵢ·eᵢ (the gradient goes to the first row reaching it).
    Max,
}

/// How one encoded field becomes part of the input vector.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldKind {
    /// One row of embedding table `table` (categorical, bucketize).
    Embed { table: usize },
    /// Rows of table `table`, weighted and pooled (multi_categorical).
    Pool { table: usize, pooling: Pooling },
    /// A number (width 1) or a dense vector: no parameters.
    Value { width: usize },
}

/// An embedding table, row-major `[rows, dim]`; row 0 is the OOV row.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub name: String,
    pub rows: usize,
    pub dim: usize,
    pub w: Vec<f32>,
}

/// A layer with its parameters. Linear weights are `[out, in]` row-major (PyTorch's layout).
#[derive(Debug, Clone, PartialEq)]
pub enum Layer {
    Linear {
        w: Vec<f32>,
        b: Vec<f32>,
        n_in: usize,
        n_out: usize,
    },
    Act(Activation),
    LayerNorm {
        g: Vec<f32>,
        b: Vec<f32>,
        eps: f64,
    },
    /// Inverted dropout while training (kept units scaled by 1/(1-p)); nothing at inference.
    Dropout { p: f32 },
    /// Appends the raw fields (before any layer) of the given features to h.
    Shortcut { fields: Vec<usize> },
    L2Normalize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tower {
    pub fields: Vec<FieldKind>,
    pub tables: Vec<Table>,
    pub layers: Vec<Layer>,
}

/// What the backward pass needs of a forward pass.
pub struct Cache<'a> {
    xs: Vec<&'a Encoded>,
    /// The input of every layer, then the output (`layers + 1` matrices of `m` rows).
    acts: Vec<Vec<f32>>,
    widths: Vec<usize>,
    /// Per dropout layer (by layer index): the kept-unit mask of the batch, scaled.
    masks: Vec<Option<Vec<f32>>>,
}

impl Cache<'_> {
    pub fn rows(&self) -> usize {
        self.xs.len()
    }

    /// The output, `rows × dim` row-major.
    pub fn output(&self) -> &[f32] {
        self.acts.last().map_or(&[], |v| v.as_slice())
    }
}

/// Gradients of one tower: per dense parameter (in [`Tower::dense_params`] order) and per
/// embedding table the rows touched (sparse, in row order).
#[derive(Debug, Clone, PartialEq)]
pub struct Grads {
    pub dense: Vec<Vec<f32>>,
    pub rows: Vec<BTreeMap<u32, Vec<f32>>>,
}

impl Grads {
    /// Adds `other` (the same tower's gradients of another part of the batch).
    pub fn add(&mut self, other: Grads) {
        for (a, b) in self.dense.iter_mut().zip(other.dense) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        for (a, b) in self.rows.iter_mut().zip(other.rows) {
            for (r, g) in b {
                match a.get_mut(&r) {
                    Some(acc) => acc.iter_mut().zip(g).for_each(|(x, y)| *x += y),
                    None => {
                        a.insert(r, g);
                    }
                }
            }
        }
    }
}

impl Tower {
    /// Width of each field, in order.
    pub fn field_widths(&self) -> Vec<usize> {
        self.fields
            .iter()
            .map(|f| match f {
                FieldKind::Embed { table } | FieldKind::Pool { table, .. } => self.tables[*table].dim,
                FieldKind::Value { width } => *width,
            })
            .collect()
    }

    pub fn input_width(&self) -> usize {
        self.field_widths().iter().sum()
    }

    /// The dense parameters, in a fixed order (Linear: weight, bias; LayerNorm: weight, bias).
    pub fn dense_params(&self) -> Vec<&[f32]> {
        let mut out = Vec::new();
        for l in &self.layers {
            match l {
                Layer::Linear { w, b, .. } | Layer::LayerNorm { g: w, b, .. } => {
                    out.push(w.as_slice());
                    out.push(b.as_slice());
                }
                Layer::Act(_) | Layer::L2Normalize | Layer::Dropout { .. } | Layer::Shortcut { .. } => {}
            }
        }
        out
    }

    pub fn dense_params_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut out = Vec::new();
        for l in &mut self.layers {
            match l {
                Layer::Linear { w, b, .. } | Layer::LayerNorm { g: w, b, .. } => {
                    out.push(w);
                    out.push(b);
                }
                Layer::Act(_) | Layer::L2Normalize | Layer::Dropout { .. } | Layer::Shortcut { .. } => {}
            }
        }
        out
    }

    /// Number of parameters (tables and layers).
    pub fn parameter_count(&self) -> usize {
        self.tables.iter().map(|t| t.w.len()).sum::<usize>()
            + self.dense_params().iter().map(|p| p.len()).sum::<usize>()
    }

    pub fn zero_grads(&self) -> Grads {
        Grads {
            dense: self.dense_params().iter().map(|p| vec![0.0; p.len()]).collect(),
            rows: vec![BTreeMap::new(); self.tables.len()],
        }
    }

    /// The raw input vectors of `xs` (fields concatenated), as the serving forward pass gathers
    /// them: pooling in f64, an empty bag is the OOV row, a missing dense field is zeros.
    fn gather(&self, xs: &[&Encoded], widths: &[usize], w0: usize) -> Vec<f32> {
        let mut x0 = vec![0f32; xs.len() * w0];
        for (x, out) in xs.iter().zip(x0.chunks_exact_mut(w0.max(1))) {
            let mut off = 0;
            for ((kind, field), &w) in self.fields.iter().zip(x.fields()).zip(widths) {
                let dst = &mut out[off..off + w];
                off += w;
                match (kind, field) {
                    (FieldKind::Embed { table }, FieldRef::Row(r)) => {
                        if let Some(e) = self.tables[*table].row(r) {
                            dst.copy_from_slice(e);
                        }
                    }
                    (FieldKind::Pool { table, pooling: Pooling::Max }, FieldRef::Bag { rows, weights }) => {
                        let t = &self.tables[*table];
                        dst.iter_mut().for_each(|d| *d = f32::NEG_INFINITY);
                        for (i, &r) in rows.iter().enumerate() {
                            let wi = weights.and_then(|ws| ws.get(i)).copied().unwrap_or(1.0);
                            if let Some(e) = t.row(r) {
                                dst.iter_mut().zip(e).for_each(|(d, e)| *d = d.max(wi * e));
                            }
                        }
                        dst.iter_mut().filter(|d| **d == f32::NEG_INFINITY).for_each(|d| *d = 0.0);
                    }
                    (FieldKind::Pool { table, pooling }, FieldRef::Bag { rows, weights }) => {
                        let t = &self.tables[*table];
                        let mut acc = vec![0f64; w];
                        let mut wsum = 0f64;
                        for (i, &r) in rows.iter().enumerate() {
                            let wi = weights.and_then(|ws| ws.get(i)).copied().unwrap_or(1.0) as f64;
                            wsum += wi;
                            if let Some(e) = t.row(r) {
                                acc.iter_mut().zip(e).for_each(|(a, e)| *a += wi * *e as f64);
                            }
                        }
                        let scale = pool_scale(*pooling, wsum);
                        dst.iter_mut().zip(&acc).for_each(|(d, a)| *d = (a * scale) as f32);
                    }
                    (FieldKind::Value { .. }, FieldRef::Value(v)) => dst[0] = v,
                    (FieldKind::Value { .. }, FieldRef::Dense(Some(v))) if v.len() == w => {
                        dst.copy_from_slice(v)
                    }
                    _ => {}
                }
            }
        }
        x0
    }

    /// The forward pass of a batch at inference (the output is `cache.output()`).
    pub fn forward<'a>(&self, xs: &[&'a Encoded]) -> Cache<'a> {
        self.forward_with(xs, None)
    }

    /// The forward pass while training: dropout draws its masks from `seed`.
    pub fn forward_train<'a>(&self, xs: &[&'a Encoded], seed: u64) -> Cache<'a> {
        self.forward_with(xs, Some(seed))
    }

    fn forward_with<'a>(&self, xs: &[&'a Encoded], seed: Option<u64>) -> Cache<'a> {
        use rand::{Rng, SeedableRng};
        let mut rng = seed.map(rand_chacha::ChaCha8Rng::seed_from_u64);
        let mut masks = vec![None; self.layers.len()];
        let m = xs.len();
        let fw = self.field_widths();
        let w0: usize = fw.iter().sum();
        let mut acts = Vec::with_capacity(self.layers.len() + 1);
        let mut widths = Vec::with_capacity(self.layers.len() + 1);
        let mut h = self.gather(xs, &fw, w0);
        let x0 = h.clone();
        let offsets: Vec<usize> = fw.iter().scan(0, |o, w| {
            let at = *o;
            *o += w;
            Some(at)
        }).collect();
        let mut width = w0;
        for (li, layer) in self.layers.iter().enumerate() {
            let input = h.clone();
            widths.push(width);
            match layer {
                Layer::Dropout { p } => {
                    if let Some(rng) = rng.as_mut() {
                        let keep = 1.0 - *p;
                        let mask: Vec<f32> = (0..h.len())
                            .map(|_| if rng.gen::<f32>() < keep { 1.0 / keep } else { 0.0 })
                            .collect();
                        h.iter_mut().zip(&mask).for_each(|(v, k)| *v *= k);
                        masks[li] = Some(mask);
                    }
                }
                Layer::Shortcut { fields } => {
                    let extra: usize = fields.iter().map(|&f| fw[f]).sum();
                    let nw = width + extra;
                    let mut next = Vec::with_capacity(m * nw);
                    for r in 0..m {
                        next.extend_from_slice(&h[r * width..(r + 1) * width]);
                        for &f in fields {
                            next.extend_from_slice(&x0[r * w0 + offsets[f]..r * w0 + offsets[f] + fw[f]]);
                        }
                    }
                    h = next;
                    width = nw;
                }
                Layer::Linear { w, b, n_in, n_out } => {
                    debug_assert_eq!(*n_in, width);
                    h = layers::linear(&input, m, *n_in, w, Some(b), *n_out);
                    width = *n_out;
                }
                Layer::Act(a) => layers::activate(*a, &mut h),
                Layer::LayerNorm { g, b, eps } => layers::layer_norm(&mut h, width, g, b, *eps),
                Layer::L2Normalize => layers::l2_normalize(&mut h, width),
            }
            acts.push(input);
        }
        widths.push(width);
        acts.push(h);
        Cache {
            xs: xs.to_vec(),
            acts,
            widths,
            masks,
        }
    }

    /// The backward pass: `dout` is d(loss)/d(output), `rows × dim`.
    pub fn backward(&self, cache: &Cache, dout: &[f32]) -> Grads {
        let m = cache.rows();
        let mut grads = self.zero_grads();
        let mut dh = dout.to_vec();
        let mut pi = self.dense_params().len();
        let fw = self.field_widths();
        let w0: usize = fw.iter().sum();
        let offsets: Vec<usize> = fw.iter().scan(0, |o, w| {
            let at = *o;
            *o += w;
            Some(at)
        }).collect();
        // Gradients that shortcuts send straight to the raw fields.
        let mut dx0_extra: Option<Vec<f32>> = None;
        for (l, layer) in self.layers.iter().enumerate().rev() {
            let x = &cache.acts[l];
            let y = &cache.acts[l + 1];
            let width = cache.widths[l];
            match layer {
                Layer::Linear { w, n_in, n_out, .. } => {
                    pi -= 2;
                    let dy = ArrayView2::from_shape((m, *n_out), &dh).expect("dy shape");
                    let xv = ArrayView2::from_shape((m, *n_in), x).expect("x shape");
                    let wv = ArrayView2::from_shape((*n_out, *n_in), w).expect("w shape");
                    let dw = dy.t().dot(&xv);
                    grads.dense[pi]
                        .iter_mut()
                        .zip(dw.iter())
                        .for_each(|(g, d)| *g += d);
                    let db = dy.sum_axis(Axis(0));
                    grads.dense[pi + 1]
                        .iter_mut()
                        .zip(db.iter())
                        .for_each(|(g, d)| *g += d);
                    dh = dy.dot(&wv).into_raw_vec_and_offset().0;
                }
                Layer::Act(a) => {
                    for ((d, &xi), &yi) in dh.iter_mut().zip(x).zip(y) {
                        *d *= act_grad(*a, xi, yi);
                    }
                }
                Layer::Dropout { .. } => {
                    if let Some(mask) = &cache.masks[l] {
                        dh.iter_mut().zip(mask).for_each(|(d, k)| *d *= k);
                    }
                }
                Layer::Shortcut { fields } => {
                    let nw = cache.widths[l + 1];
                    let mut down = Vec::with_capacity(m * width);
                    let extra = dx0_extra.get_or_insert_with(|| vec![0f32; m * w0]);
                    for r in 0..m {
                        let row = &dh[r * nw..(r + 1) * nw];
                        down.extend_from_slice(&row[..width]);
                        let mut at = width;
                        for &f in fields {
                            let dst = &mut extra[r * w0 + offsets[f]..r * w0 + offsets[f] + fw[f]];
                            dst.iter_mut().zip(&row[at..at + fw[f]]).for_each(|(a, b)| *a += b);
                            at += fw[f];
                        }
                    }
                    dh = down;
                }
                Layer::LayerNorm { g, eps, .. } => {
                    pi -= 2;
                    let n = width as f64;
                    for (r, drow) in dh.chunks_exact_mut(width).enumerate() {
                        let xr = &x[r * width..(r + 1) * width];
                        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / n;
                        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                        let inv = 1.0 / (var + eps).sqrt();
                        let xhat: Vec<f64> = xr.iter().map(|&v| (v as f64 - mean) * inv).collect();
                        let mut dxhat = vec![0f64; width];
                        for j in 0..width {
                            grads.dense[pi][j] += drow[j] * xhat[j] as f32;
                            grads.dense[pi + 1][j] += drow[j];
                            dxhat[j] = drow[j] as f64 * g[j] as f64;
                        }
                        let s1: f64 = dxhat.iter().sum();
                        let s2: f64 = dxhat.iter().zip(&xhat).map(|(a, b)| a * b).sum();
                        for j in 0..width {
                            drow[j] = (inv / n * (n * dxhat[j] - s1 - xhat[j] * s2)) as f32;
                        }
                    }
                }
                Layer::L2Normalize => {
                    for (r, drow) in dh.chunks_exact_mut(width).enumerate() {
                        let xr = &x[r * width..(r + 1) * width];
                        let yr = &y[r * width..(r + 1) * width];
                        let norm = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
                        if norm == 0.0 {
                            drow.iter_mut().for_each(|d| *d = 0.0);
                            continue;
                        }
                        let yd: f64 = yr.iter().zip(drow.iter()).map(|(a, b)| *a as f64 * *b as f64).sum();
                        for (d, &yi) in drow.iter_mut().zip(yr) {
                            *d = ((*d as f64 - yi as f64 * yd) / norm) as f32;
                        }
                    }
                }
            }
        }
        if let Some(extra) = dx0_extra {
            dh.iter_mut().zip(extra).for_each(|(a, b)| *a += b);
        }
        // Into the embedding rows.
        for (x, drow) in cache.xs.iter().zip(dh.chunks_exact(w0.max(1))) {
            let mut off = 0;
            for ((kind, field), &w) in self.fields.iter().zip(x.fields()).zip(&fw) {
                let d = &drow[off..off + w];
                off += w;
                match (kind, field) {
                    (FieldKind::Embed { table }, FieldRef::Row(r)) => {
                        if (r as usize) < self.tables[*table].rows {
                            add_row(&mut grads.rows[*table], r, d, 1.0);
                        }
                    }
                    (FieldKind::Pool { table, pooling: Pooling::Max }, FieldRef::Bag { rows, weights }) => {
                        // Each element's gradient goes to the first row reaching the maximum.
                        let t = &self.tables[*table];
                        let wt = |i: usize| weights.and_then(|ws| ws.get(i)).copied().unwrap_or(1.0);
                        for k in 0..w {
                            let mut best: Option<(usize, f32)> = None;
                            for (i, &r) in rows.iter().enumerate() {
                                if let Some(e) = t.row(r) {
                                    let v = wt(i) * e[k];
                                    if best.is_none_or(|(_, b)| v > b) {
                                        best = Some((i, v));
                                    }
                                }
                            }
                            if let Some((i, _)) = best {
                                let acc = grads.rows[*table].entry(rows[i]).or_insert_with(|| vec![0.0; w]);
                                acc[k] += d[k] * wt(i);
                            }
                        }
                    }
                    (FieldKind::Pool { table, pooling }, FieldRef::Bag { rows, weights }) => {
                        let wt = |i: usize| weights.and_then(|ws| ws.get(i)).copied().unwrap_or(1.0) as f64;
                        let wsum: f64 = (0..rows.len()).map(wt).sum();
                        let scale = pool_scale(*pooling, wsum);
                        for (i, &r) in rows.iter().enumerate() {
                            if (r as usize) < self.tables[*table].rows {
                                add_row(&mut grads.rows[*table], r, d, (wt(i) * scale) as f32);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        grads
    }
}

impl Table {
    #[inline]
    pub fn row(&self, r: u32) -> Option<&[f32]> {
        let s = (r as usize).checked_mul(self.dim)?;
        self.w.get(s..s + self.dim)
    }
}

fn pool_scale(p: Pooling, wsum: f64) -> f64 {
    match p {
        Pooling::Sum | Pooling::Max => 1.0,
        Pooling::Mean if wsum == 0.0 => 0.0,
        Pooling::Mean => 1.0 / wsum,
    }
}

fn add_row(map: &mut BTreeMap<u32, Vec<f32>>, r: u32, d: &[f32], scale: f32) {
    let acc = map.entry(r).or_insert_with(|| vec![0.0; d.len()]);
    acc.iter_mut().zip(d).for_each(|(a, d)| *a += scale * d);
}

/// d(activation)/d(input) at input `x` with output `y`.
fn act_grad(a: Activation, x: f32, y: f32) -> f32 {
    match a {
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Tanh => 1.0 - y * y,
        Activation::Sigmoid => y * (1.0 - y),
        Activation::Gelu => {
            let x = x as f64;
            let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            (cdf + x * pdf) as f32
        }
    }
}

