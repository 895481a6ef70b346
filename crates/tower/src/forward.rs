//! The forward pass: gather fields, SENet, layers. Single examples use a vectorisable
//! matrix-vector product; batches use sgemm.

use crate::encode::{Encoded, Field};
use crate::model::{FeatureKind, Layer, Model, Table};
use crate::spec::Pooling;

/// Dot product with 8 independent accumulators over `[f32; 8]` blocks (auto-vectorises).
/// Plain built-in indexing in the loop, so it vectorises even when `std`'s iterator adapters
/// would not be inlined (many codegen units in dev builds).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (ab, at) = a[..n].as_chunks::<8>();
    let (bb, bt) = b[..n].as_chunks::<8>();
    let mut acc = [0f32; 8];
    for k in 0..ab.len().min(bb.len()) {
        let (x, y) = (&ab[k], &bb[k]);
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut tail = 0f32;
    for j in 0..at.len().min(bt.len()) {
        tail += at[j] * bt[j];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// out[o] = W[o,:]·x + b[o], W row-major [out, in].
fn matvec(w: &[f32], bias: Option<&[f32]>, x: &[f32], n_out: usize, out: &mut [f32]) {
    let n_in = x.len();
    if n_in == 0 {
        out.iter_mut().for_each(|o| *o = 0.0);
    } else {
        for (o, row) in out.iter_mut().zip(w.chunks_exact(n_in)).take(n_out) {
            *o = dot(row, x);
        }
    }
    if let Some(b) = bias {
        for (o, b) in out.iter_mut().zip(b) {
            *o += b;
        }
    }
}

/// C[m, n] = X[m, k] · W[n, k]^T (+ bias per row).
fn gemm_xwt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    assert!(x.len() >= m * k && w.len() >= n * k, "gemm operand sizes");
    if m > 0 && n > 0 && k > 0 {
        // SAFETY: the asserts above guarantee every index the strides describe is in bounds:
        // A[i,l] = x[i*k + l], B[l,j] = w[j*k + l], C[i,j] = c[i*n + j].
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                x.as_ptr(),
                k as isize,
                1,
                w.as_ptr(),
                1,
                k as isize,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    }
    if let Some(b) = bias {
        for row in c.chunks_exact_mut(n) {
            for (o, b) in row.iter_mut().zip(b) {
                *o += b;
            }
        }
    }
    c
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (x * 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

impl Model {
    #[inline]
    fn row<'a>(&'a self, t: &Table, r: u32) -> Option<&'a [f32]> {
        let start = (r as usize).checked_mul(t.dim)?;
        self.tensors
            .get(t.tensor)?
            .get(start..start.checked_add(t.dim)?)
    }

    /// Writes the raw (pre-SENet) fields of `x` into `out` (input_width wide, zeroed).
    /// An `Encoded` from another model cannot panic here: out-of-range data gives zeros.
    fn gather(&self, x: &Encoded, out: &mut [f32]) {
        debug_assert_eq!(x.model_id, self.id, "Encoded from another model");
        for (f, field) in self.features.iter().zip(&x.fields) {
            let Some(dst) = out.get_mut(f.offset..f.offset + f.width) else {
                continue;
            };
            match (&f.kind, field) {
                (FeatureKind::Categorical { table, .. }, Field::Row(r))
                | (FeatureKind::Bucketize { table, .. }, Field::Row(r)) => {
                    if let Some(e) = self.row(table, *r) {
                        dst.copy_from_slice(e);
                    }
                }
                (FeatureKind::Multi { table, pooling, .. }, Field::Bag { rows, weights }) => {
                    self.pool(table, *pooling, rows, weights.as_deref(), dst);
                }
                (FeatureKind::Numeric { .. }, Field::Value(v)) => dst[0] = *v,
                (FeatureKind::Dense { .. }, Field::Dense(Some(v))) if v.len() == dst.len() => {
                    dst.copy_from_slice(v);
                }
                _ => {}
            }
        }
    }

    fn pool(&self, t: &Table, pooling: Pooling, rows: &[u32], w: Option<&[f32]>, dst: &mut [f32]) {
        let weight = |i: usize| w.and_then(|w| w.get(i)).copied().unwrap_or(1.0);
        match pooling {
            Pooling::Max => {
                dst.iter_mut().for_each(|d| *d = f32::NEG_INFINITY);
                for (i, &r) in rows.iter().enumerate() {
                    let wi = weight(i);
                    if let Some(e) = self.row(t, r) {
                        for (d, e) in dst.iter_mut().zip(e) {
                            *d = d.max(wi * e);
                        }
                    }
                }
                dst.iter_mut()
                    .filter(|d| **d == f32::NEG_INFINITY)
                    .for_each(|d| *d = 0.0);
            }
            Pooling::Sum | Pooling::Mean => {
                let mut acc = [0f64; 64];
                let mut big;
                let acc: &mut [f64] = if dst.len() <= 64 {
                    &mut acc[..dst.len()]
                } else {
                    big = vec![0f64; dst.len()];
                    &mut big
                };
                let mut wsum = 0f64;
                for (i, &r) in rows.iter().enumerate() {
                    let wi = weight(i) as f64;
                    wsum += wi;
                    if let Some(e) = self.row(t, r) {
                        for (a, e) in acc.iter_mut().zip(e) {
                            *a += wi * *e as f64;
                        }
                    }
                }
                let scale = match pooling {
                    Pooling::Mean if wsum == 0.0 => 0.0,
                    Pooling::Mean => 1.0 / wsum,
                    _ => 1.0,
                };
                for (d, a) in dst.iter_mut().zip(acc.iter()) {
                    *d = (a * scale) as f32;
                }
            }
        }
    }

    /// Forward pass of one encoded example; returns `output_dim` floats.
    pub fn forward(&self, x: &Encoded) -> Vec<f32> {
        self.run(std::slice::from_ref(x))
    }

    /// Forward pass of many examples (sgemm over the batch for the linear layers); returns
    /// `xs.len() * output_dim` floats, row-major.
    pub fn forward_batch(&self, xs: &[Encoded]) -> Vec<f32> {
        self.run(xs)
    }

    fn run(&self, xs: &[Encoded]) -> Vec<f32> {
        let m = xs.len();
        if m == 0 {
            return Vec::new();
        }
        let w0 = self.input_width;
        let mut raw = vec![0f32; m * w0];
        for (x, row) in xs.iter().zip(raw.chunks_exact_mut(w0.max(1))) {
            self.gather(x, row);
        }
        let mut h = match &self.senet {
            Some(_) => {
                let mut h = raw.clone();
                for row in h.chunks_exact_mut(w0.max(1)) {
                    self.senet_row(row);
                }
                h
            }
            None if self.has_shortcut => raw.clone(),
            None => std::mem::take(&mut raw),
        };
        let mut width = w0;
        for layer in &self.layers {
            match layer {
                Layer::Linear { w, b, n_in, n_out } => {
                    let wt = &self.tensors[*w];
                    let bias = b.map(|b| self.tensors[b].as_slice());
                    debug_assert_eq!(*n_in, width);
                    h = if m == 1 {
                        let mut out = vec![0f32; *n_out];
                        matvec(wt, bias, &h, *n_out, &mut out);
                        out
                    } else {
                        gemm_xwt(&h, m, *n_in, wt, *n_out, bias)
                    };
                    width = *n_out;
                }
                Layer::Relu => h.iter_mut().for_each(|v| *v = v.max(0.0)),
                Layer::Gelu => h.iter_mut().for_each(|v| *v = gelu(*v)),
                Layer::Tanh => h.iter_mut().for_each(|v| *v = v.tanh()),
                Layer::Sigmoid => h.iter_mut().for_each(|v| *v = sigmoid(*v)),
                Layer::LayerNorm { w, b, eps } => {
                    let (wt, bt) = (&self.tensors[*w], &self.tensors[*b]);
                    for row in h.chunks_exact_mut(width.max(1)) {
                        let n = row.len() as f64;
                        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
                        let var = row
                            .iter()
                            .map(|&v| {
                                let d = v as f64 - mean;
                                d * d
                            })
                            .sum::<f64>()
                            / n;
                        let inv = 1.0 / (var + eps).sqrt();
                        for ((v, g), bb) in row.iter_mut().zip(wt).zip(bt) {
                            *v = ((*v as f64 - mean) * inv * *g as f64 + *bb as f64) as f32;
                        }
                    }
                }
                Layer::BatchNorm {
                    w,
                    b,
                    mean,
                    inv_std,
                } => {
                    let (wt, bt, mt) = (&self.tensors[*w], &self.tensors[*b], &self.tensors[*mean]);
                    for row in h.chunks_exact_mut(width.max(1)) {
                        for ((((v, g), bb), mu), s) in
                            row.iter_mut().zip(wt).zip(bt).zip(mt).zip(inv_std)
                        {
                            *v = (*v - mu) * s * g + bb;
                        }
                    }
                }
                Layer::Shortcut { ranges } => {
                    let extra: usize = ranges.iter().map(|r| r.1).sum();
                    let nw = width + extra;
                    let mut next = Vec::with_capacity(m * nw);
                    for i in 0..m {
                        next.extend_from_slice(&h[i * width..(i + 1) * width]);
                        let r0 = &raw[i * w0..(i + 1) * w0];
                        for &(off, len) in ranges {
                            next.extend_from_slice(&r0[off..off + len]);
                        }
                    }
                    h = next;
                    width = nw;
                }
                Layer::L2Normalize => {
                    for row in h.chunks_exact_mut(width.max(1)) {
                        let norm = row
                            .iter()
                            .map(|&v| (v as f64) * (v as f64))
                            .sum::<f64>()
                            .sqrt();
                        if norm > 0.0 {
                            let inv = 1.0 / norm;
                            row.iter_mut().for_each(|v| *v = (*v as f64 * inv) as f32);
                        }
                    }
                }
            }
        }
        h
    }

    /// SENet over one row of raw fields, in place.
    fn senet_row(&self, row: &mut [f32]) {
        let Some(s) = &self.senet else { return };
        let z: Vec<f32> = self
            .features
            .iter()
            .map(|f| {
                let v = &row[f.offset..f.offset + f.width];
                (v.iter().map(|&x| x as f64).sum::<f64>() / f.width as f64) as f32
            })
            .collect();
        let nf = z.len();
        let mut hidden = vec![0f32; s.r];
        matvec(
            &self.tensors[s.w1],
            s.b1.map(|b| self.tensors[b].as_slice()),
            &z,
            s.r,
            &mut hidden,
        );
        hidden.iter_mut().for_each(|v| *v = v.max(0.0));
        let mut a = vec![0f32; nf];
        matvec(
            &self.tensors[s.w2],
            s.b2.map(|b| self.tensors[b].as_slice()),
            &hidden,
            nf,
            &mut a,
        );
        for (f, a) in self.features.iter().zip(a) {
            let g = sigmoid(a);
            row[f.offset..f.offset + f.width]
                .iter_mut()
                .for_each(|v| *v *= g);
        }
    }
}

/// Splits `xs` into `threads` contiguous chunks, runs `forward_batch` on each in a scoped thread,
/// and returns the row-major output (`xs.len() * output_dim` floats, in input order).
pub fn forward_parallel(model: &Model, xs: &[Encoded], threads: usize) -> Vec<f32> {
    let threads = threads.clamp(1, xs.len().max(1));
    if threads == 1 {
        return model.forward_batch(xs);
    }
    let chunk = xs.len().div_ceil(threads);
    let parts: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = xs
            .chunks(chunk)
            .map(|c| s.spawn(move || model.forward_batch(c)))
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(v) => v,
                Err(e) => std::panic::resume_unwind(e),
            })
            .collect()
    });
    let mut out = Vec::with_capacity(xs.len() * model.output_dim());
    for p in parts {
        out.extend_from_slice(&p);
    }
    out
}
