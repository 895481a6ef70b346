//! Layer primitives: pure functions over row-major batches (`m` rows of `width` floats), the
//! same for every model kind (towers today, the pre-rank DNN next) and the functions a
//! backward pass differentiates. No model state: weights come in as slices.

/// Dot product with 8 independent accumulators over `[f32; 8]` blocks (auto-vectorises).
/// Plain built-in indexing in the loop, so it vectorises even when `std`'s iterator adapters
/// would not be inlined (many codegen units in dev builds).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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
pub fn matvec(w: &[f32], bias: Option<&[f32]>, x: &[f32], n_out: usize, out: &mut [f32]) {
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
pub fn gemm_xwt(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
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
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (x * 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

/// Up to this many outputs, a batched linear layer is a dot product per row.
const NARROW: usize = 2;

/// A linear layer over `m` rows of `n_in`: `x · Wᵀ + b`, W row-major `[n_out, n_in]`
/// (a matrix-vector product for one row or a narrow output, sgemm otherwise).
pub fn linear(
    x: &[f32],
    m: usize,
    n_in: usize,
    w: &[f32],
    b: Option<&[f32]>,
    n_out: usize,
) -> Vec<f32> {
    if m == 1 {
        let mut out = vec![0f32; n_out];
        matvec(w, b, &x[..n_in.min(x.len())], n_out, &mut out);
        out
    } else if n_out <= NARROW && n_in > 0 {
        // A narrow output (a score): a dot product per row; sgemm would first copy (pack) the
        // whole input for a product that reads it once.
        let mut out = vec![0f32; m * n_out];
        for (row, o) in x
            .chunks_exact(n_in)
            .zip(out.chunks_exact_mut(n_out))
            .take(m)
        {
            matvec(w, b, row, n_out, o);
        }
        out
    } else {
        gemm_xwt(x, m, n_in, w, n_out, b)
    }
}

/// Element-wise activations, in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
}

pub fn activate(a: Activation, h: &mut [f32]) {
    match a {
        Activation::Relu => h.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Gelu => h.iter_mut().for_each(|v| *v = gelu(*v)),
        Activation::Tanh => h.iter_mut().for_each(|v| *v = v.tanh()),
        Activation::Sigmoid => h.iter_mut().for_each(|v| *v = sigmoid(*v)),
    }
}

/// Layer normalisation of each row (statistics in f64): `(v - mean) / sqrt(var + eps) * g + b`.
pub fn layer_norm(h: &mut [f32], width: usize, g: &[f32], b: &[f32], eps: f64) {
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
        for ((v, g), bb) in row.iter_mut().zip(g).zip(b) {
            *v = ((*v as f64 - mean) * inv * *g as f64 + *bb as f64) as f32;
        }
    }
}

/// Batch normalisation with running statistics (inference): `(v - mean) * inv_std * g + b`.
pub fn batch_norm(
    h: &mut [f32],
    width: usize,
    g: &[f32],
    b: &[f32],
    mean: &[f32],
    inv_std: &[f32],
) {
    for row in h.chunks_exact_mut(width.max(1)) {
        for ((((v, g), bb), mu), s) in row.iter_mut().zip(g).zip(b).zip(mean).zip(inv_std) {
            *v = (*v - mu) * s * g + bb;
        }
    }
}

/// Scales each row to unit Euclidean length (norm in f64); zero rows stay zero.
pub fn l2_normalize(h: &mut [f32], width: usize) {
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

/// Σᵢ weight(i, row) · xᵢ per row, the k inputs of width d side by side in `x` (graph combine
/// nodes; training computes the same sums in the same order).
pub fn combine_rows(
    x: &[f32],
    m: usize,
    k: usize,
    d: usize,
    weight: impl Fn(usize, usize) -> f32,
) -> Vec<f32> {
    let mut y = vec![0f32; m * d];
    for r in 0..m {
        let out = &mut y[r * d..(r + 1) * d];
        for i in 0..k {
            let wi = weight(i, r);
            let xi = &x[(r * k + i) * d..(r * k + i + 1) * d];
            for (o, v) in out.iter_mut().zip(xi) {
                *o += wi * v;
            }
        }
    }
    y
}

/// The MMoE gate over `m` rows of `x` (stride `in_width`): each row is k experts of width d
/// side by side, then the gate input g (the rest of the row). α = softmax(W·g + b) (W `[k, g]`),
/// output Σ αᵢ·xᵢ. Returns the outputs (`m × d`) and the weights (`m × k`); training computes
/// the same.
pub fn gate_rows(
    x: &[f32],
    m: usize,
    in_width: usize,
    (k, d): (usize, usize),
    w: &[f32],
    b: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; m * d];
    let mut alphas = vec![0f32; m * k];
    let mut s = vec![0f32; k];
    for r in 0..m {
        let row = &x[r * in_width..(r + 1) * in_width];
        let a = &mut alphas[r * k..(r + 1) * k];
        matvec(w, b, &row[k * d..], k, &mut s);
        softmax(&s, a);
        let out = &mut y[r * d..(r + 1) * d];
        for (i, ai) in a.iter().enumerate() {
            for (o, v) in out.iter_mut().zip(&row[i * d..(i + 1) * d]) {
                *o += ai * v;
            }
        }
    }
    (y, alphas)
}

/// The scene gate over `m` rows of `x` (stride `in_width`): each row is x (width n), then the
/// gate input g. Output x ⊙ 2·σ(W·g + b) (W `[n, g]`). Returns the outputs (`m × n`) and the
/// factors 2·σ(·) (`m × n`).
pub fn scale_rows(
    x: &[f32],
    m: usize,
    in_width: usize,
    n: usize,
    w: &[f32],
    b: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; m * n];
    let mut gates = vec![0f32; m * n];
    for r in 0..m {
        let row = &x[r * in_width..(r + 1) * in_width];
        let g = &mut gates[r * n..(r + 1) * n];
        matvec(w, b, &row[n..], n, g);
        g.iter_mut().for_each(|v| *v = 2.0 * sigmoid(*v));
        for ((o, v), f) in y[r * n..(r + 1) * n]
            .iter_mut()
            .zip(&row[..n])
            .zip(g.iter())
        {
            *o = v * f;
        }
    }
    (y, gates)
}

/// Numerically stable softmax of `s` into `out` (the sum in f64).
pub fn softmax(s: &[f32], out: &mut [f32]) {
    let max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f64;
    for (o, &v) in out.iter_mut().zip(s) {
        *o = (v - max).exp();
        sum += *o as f64;
    }
    let inv = (1.0 / sum) as f32;
    out.iter_mut().for_each(|o| *o *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_one_row_equals_the_batch_path() {
        let (n_in, n_out) = (19, 7);
        let w: Vec<f32> = (0..n_in * n_out)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let b: Vec<f32> = (0..n_out).map(|i| i as f32 * 0.01).collect();
        let x: Vec<f32> = (0..3 * n_in)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.2)
            .collect();
        let batch = linear(&x, 3, n_in, &w, Some(&b), n_out);
        for r in 0..3 {
            let one = linear(&x[r * n_in..(r + 1) * n_in], 1, n_in, &w, Some(&b), n_out);
            for (a, c) in one.iter().zip(&batch[r * n_out..(r + 1) * n_out]) {
                assert!((a - c).abs() < 1e-5, "{a} vs {c}");
            }
        }
    }

    #[test]
    fn normalisations() {
        let mut h = vec![3.0f32, 4.0, 0.0, 0.0];
        l2_normalize(&mut h, 2);
        assert_eq!(h, vec![0.6, 0.8, 0.0, 0.0]);
        let mut h = vec![1.0f32, 2.0, 3.0, 4.0];
        layer_norm(&mut h, 4, &[1.0; 4], &[0.0; 4], 0.0);
        let mean: f32 = h.iter().sum::<f32>() / 4.0;
        let var: f32 = h.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);
        let mut h = vec![-1.0f32, 0.0, 2.0];
        activate(Activation::Relu, &mut h);
        assert_eq!(h, vec![0.0, 0.0, 2.0]);
    }
}
