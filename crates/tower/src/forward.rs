//! The forward pass: gather fields, SENet, layers. Single examples use a vectorisable
//! matrix-vector product; batches use sgemm.

use crate::encode::{Encoded, Field};
use crate::layers::{self, matvec, sigmoid, Activation};
use crate::model::{FeatureKind, Layer, Model, Table};
use crate::spec::Pooling;

#[inline]
fn row<'a>(model: &'a Model, t: &Table, r: u32) -> Option<&'a [f32]> {
    let start = (r as usize).checked_mul(t.dim)?;
    model
        .tensors
        .get(t.tensor)?
        .get(start..start.checked_add(t.dim)?)
}

/// Writes the raw (pre-SENet) fields of `x` into `out` (input_width wide, zeroed).
/// An `Encoded` from another model cannot panic here: out-of-range data gives zeros.
fn gather(model: &Model, x: &Encoded, out: &mut [f32]) {
    debug_assert_eq!(x.model_id, model.id, "Encoded from another model");
    for (f, field) in model.features.iter().zip(&x.fields) {
        write_field(model, f, field, out);
    }
}

/// Writes one feature's field into its place in a raw input row (zeroed there).
pub(crate) fn write_field(
    model: &Model,
    f: &crate::model::Feature,
    field: &Field,
    out: &mut [f32],
) {
    if let Some(dst) = out.get_mut(f.offset..f.offset + f.width) {
        write_field_at(model, f, field, dst);
    }
}

/// Writes one feature's field into `dst`, the field's own slice (`f.width` floats, zeroed).
pub(crate) fn write_field_at(
    model: &Model,
    f: &crate::model::Feature,
    field: &Field,
    dst: &mut [f32],
) {
    match (&f.kind, field) {
        (FeatureKind::Categorical { table, .. }, Field::Row(r))
        | (FeatureKind::Bucketize { table, .. }, Field::Row(r)) => {
            if let Some(e) = row(model, table, *r) {
                if e.len() == dst.len() {
                    dst.copy_from_slice(e);
                }
            }
        }
        (FeatureKind::Multi { table, pooling, .. }, Field::Bag { rows, weights }) => {
            pool(model, table, *pooling, rows, weights.as_deref(), dst);
        }
        (FeatureKind::Numeric { .. }, Field::Value(v)) => {
            if let Some(d) = dst.first_mut() {
                *d = *v;
            }
        }
        (FeatureKind::Dense { .. }, Field::Dense(Some(v))) if v.len() == dst.len() => {
            dst.copy_from_slice(v);
        }
        _ => {}
    }
}

fn pool(
    model: &Model,
    t: &Table,
    pooling: Pooling,
    rows: &[u32],
    w: Option<&[f32]>,
    dst: &mut [f32],
) {
    let weight = |i: usize| w.and_then(|w| w.get(i)).copied().unwrap_or(1.0);
    match pooling {
        Pooling::Max => {
            dst.iter_mut().for_each(|d| *d = f32::NEG_INFINITY);
            for (i, &r) in rows.iter().enumerate() {
                let wi = weight(i);
                if let Some(e) = row(model, t, r) {
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
                if let Some(e) = row(model, t, r) {
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

/// The forward pass of a batch; `xs.len() * output_dim` floats, row-major (sgemm over the batch
/// for the linear layers, a matrix-vector product for one example).
pub(crate) fn run(model: &Model, xs: &[Encoded]) -> Vec<f32> {
    let m = xs.len();
    if m == 0 {
        return Vec::new();
    }
    let w0 = model.input_width;
    let mut raw = vec![0f32; m * w0];
    for (x, row) in xs.iter().zip(raw.chunks_exact_mut(w0.max(1))) {
        gather(model, x, row);
    }
    run_raw(model, raw, m)
}

/// The forward pass of `m` raw input rows (`m * input_width` floats, row-major).
pub(crate) fn run_raw(model: &Model, mut raw: Vec<f32>, m: usize) -> Vec<f32> {
    if m == 0 {
        return Vec::new();
    }
    let w0 = model.input_width;
    let h = match &model.senet {
        Some(_) => {
            let mut h = raw.clone();
            for row in h.chunks_exact_mut(w0.max(1)) {
                senet_row(model, row);
            }
            h
        }
        None if model.has_shortcut => raw.clone(),
        None => std::mem::take(&mut raw),
    };
    if let Some(g) = &model.graph {
        return crate::graph::run(model, g, &h, m);
    }
    run_layers(model, h, m, w0, &raw, 0)
}

/// Runs `layers` (no shortcut among them) over `h` (`m` rows of `width`).
pub(crate) fn run_stack(
    model: &Model,
    layers: &[Layer],
    h: Vec<f32>,
    m: usize,
    width: usize,
) -> Vec<f32> {
    run_list(model, layers, h, m, width, &[])
}

/// Runs the model's layers from `from` on over `h` (`m` rows of `width`); `raw` is the raw
/// input for shortcut layers (unused, and may be empty, when the model has none).
pub(crate) fn run_layers(
    model: &Model,
    h: Vec<f32>,
    m: usize,
    width: usize,
    raw: &[f32],
    from: usize,
) -> Vec<f32> {
    run_list(
        model,
        model.layers.get(from..).unwrap_or(&[]),
        h,
        m,
        width,
        raw,
    )
}

fn run_list(
    model: &Model,
    list: &[Layer],
    mut h: Vec<f32>,
    m: usize,
    mut width: usize,
    raw: &[f32],
) -> Vec<f32> {
    let w0 = model.input_width;
    for layer in list {
        match layer {
            Layer::Linear { w, b, n_in, n_out } => {
                debug_assert_eq!(*n_in, width);
                let bias = b.map(|b| model.tensors[b].as_slice());
                h = layers::linear(&h, m, *n_in, &model.tensors[*w], bias, *n_out);
                width = *n_out;
            }
            Layer::Relu => layers::activate(Activation::Relu, &mut h),
            Layer::Gelu => layers::activate(Activation::Gelu, &mut h),
            Layer::Tanh => layers::activate(Activation::Tanh, &mut h),
            Layer::Sigmoid => layers::activate(Activation::Sigmoid, &mut h),
            Layer::LayerNorm { w, b, eps } => {
                layers::layer_norm(&mut h, width, &model.tensors[*w], &model.tensors[*b], *eps)
            }
            Layer::BatchNorm {
                w,
                b,
                mean,
                inv_std,
            } => layers::batch_norm(
                &mut h,
                width,
                &model.tensors[*w],
                &model.tensors[*b],
                &model.tensors[*mean],
                inv_std,
            ),
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
            Layer::L2Normalize => layers::l2_normalize(&mut h, width),
        }
    }
    h
}

/// SENet over one row of raw fields, in place.
fn senet_row(model: &Model, row: &mut [f32]) {
    let Some(s) = &model.senet else { return };
    let z: Vec<f32> = model
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
        &model.tensors[s.w1],
        s.b1.map(|b| model.tensors[b].as_slice()),
        &z,
        s.r,
        &mut hidden,
    );
    hidden.iter_mut().for_each(|v| *v = v.max(0.0));
    let mut a = vec![0f32; nf];
    matvec(
        &model.tensors[s.w2],
        s.b2.map(|b| model.tensors[b].as_slice()),
        &hidden,
        nf,
        &mut a,
    );
    for (f, a) in model.features.iter().zip(a) {
        let g = sigmoid(a);
        row[f.offset..f.offset + f.width]
            .iter_mut()
            .for_each(|v| *v *= g);
    }
}

/// Splits `xs` into `threads` contiguous chunks, runs `forward_batch` on each in a scoped thread,
/// and returns the row-major output (`xs.len() * output_dim` floats, in input order).
pub fn forward_parallel(model: &Model, xs: &[Encoded], threads: usize) -> Vec<f32> {
    let threads = threads.clamp(1, xs.len().max(1));
    if threads == 1 {
        return run(model, xs);
    }
    let chunk = xs.len().div_ceil(threads);
    let parts: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = xs
            .chunks(chunk)
            .map(|c| s.spawn(move || run(model, c)))
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
