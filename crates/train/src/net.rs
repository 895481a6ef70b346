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
    /// Rows of ids from a vocabulary (what incremental runs update); false for buckets.
    pub ids: bool,
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
    Dropout {
        p: f32,
    },
    /// Batch normalisation: while training, each forward part's own batch statistics (biased
    /// variance); at inference the running statistics, which a step moves by `momentum` toward
    /// the step's batch statistics (unbiased variance), as PyTorch's `BatchNorm1d` does.
    BatchNorm {
        g: Vec<f32>,
        b: Vec<f32>,
        running_mean: Vec<f32>,
        running_var: Vec<f32>,
        eps: f64,
        momentum: f64,
    },
    /// Appends the raw fields (before any layer) of the given features to h.
    Shortcut {
        fields: Vec<usize>,
    },
    L2Normalize,
}

/// Squeeze-and-excitation over the fields (FiBiNET), as the tower crate serves it:
/// `z_i = mean(field_i)`, `a = σ(W2·relu(W1·z + b1) + b2)`, field i scaled by `a_i`.
/// `w1` is `[r, F]`, `w2` `[F, r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Senet {
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    pub w2: Vec<f32>,
    pub b2: Vec<f32>,
    pub r: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tower {
    pub fields: Vec<FieldKind>,
    pub tables: Vec<Table>,
    pub senet: Option<Senet>,
    /// A pre-rank model's target attention input.
    pub attention: Option<Attention>,
    /// One stack over every field; empty when the tower is a graph.
    pub layers: Vec<Layer>,
    /// A graph of nodes over the fields (after SENet), in an order where every input comes
    /// before its node; the last node is the output. Empty for a one-stack tower.
    pub graph: Vec<Node>,
}

/// Target attention (the tower crate's `attention` module) on field `field`, a `Value` field of
/// width `d` whose encoded input is the dense `[v; h₁; …; hₙ]` (the candidate's vector, then
/// the history's): the field is Σ αᵢ·hᵢ, α = softmax((W_q·v)·(W_k·hᵢ) / √r). W_q, W_k `[r, d]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    pub field: usize,
    pub wq: Vec<f32>,
    pub wk: Vec<f32>,
    pub r: usize,
    pub d: usize,
}

/// Where a graph node reads one of its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeInput {
    /// A field (after SENet).
    Field(usize),
    /// An earlier node's output.
    Node(usize),
}

/// How a combine node joins its inputs (as the tower crate's graph serves them).
#[derive(Debug, Clone, PartialEq)]
pub enum Combine {
    Concat,
    Sum,
    /// Σ wᵢ·xᵢ.
    WeightedSum {
        w: Vec<f32>,
    },
    /// [w₁·x₁; …; w_k·x_k].
    WeightedConcat {
        w: Vec<f32>,
    },
    /// α = softmax(W·[x₁; …; x_k] + b), output Σ αᵢ·xᵢ; `w` is `[k, k·d]`.
    Attention {
        w: Vec<f32>,
        b: Vec<f32>,
    },
    /// The MMoE gate: the node's first `k` inputs are the experts (width d), the rest its gate
    /// input g; α = softmax(W·g + b), output Σ αᵢ·xᵢ; `w` is `[k, g]`.
    Gate {
        w: Vec<f32>,
        b: Vec<f32>,
        k: usize,
    },
    /// The scene gate: the node's first inputs are x (width `n`), the rest its gate input g;
    /// output x ⊙ 2σ(W·g + b); `w` is `[n, g]`.
    Scale {
        w: Vec<f32>,
        b: Vec<f32>,
        n: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeOp {
    Stack(Vec<Layer>),
    Combine(Combine),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub inputs: Vec<NodeInput>,
    pub op: NodeOp,
}

/// What target attention's backward pass needs of one row: the query, the weights α and the
/// history's keys (computed once, in the forward pass).
struct AttnRow {
    q: Vec<f32>,
    alpha: Vec<f32>,
    keys: twotower_tower::attention::HistoryKeys,
}

/// What SENet's backward pass needs of one row: the squeezed fields, the hidden layer after its
/// ReLU, and the gates.
struct SenetRow {
    z: Vec<f32>,
    hidden: Vec<f32>,
    gate: Vec<f32>,
}

/// Batch statistics a BatchNorm layer used in a training forward pass (per column, f64).
#[derive(Debug, Clone)]
pub struct BnStats {
    pub rows: usize,
    pub mean: Vec<f64>,
    /// Biased (divided by `rows`).
    pub var: Vec<f64>,
}

/// What the backward pass needs of one layer stack.
struct StackCache {
    /// The input of every layer, then the output (`layers + 1` matrices of `m` rows).
    acts: Vec<Vec<f32>>,
    widths: Vec<usize>,
    /// Per dropout layer (by layer index): the kept-unit mask of the batch, scaled.
    masks: Vec<Option<Vec<f32>>>,
    /// Per BatchNorm layer in a training pass: the batch statistics it normalised with.
    bn: Vec<Option<BnStats>>,
}

enum NodeCache {
    Stack(StackCache),
    /// A combine node: its inputs side by side (`m × in_width`), its output, and per row the
    /// attention or gate weights α, or the scene gate's factors 2σ(·).
    Combine {
        x: Vec<f32>,
        y: Vec<f32>,
        alphas: Vec<f32>,
    },
}

impl NodeCache {
    fn output(&self) -> &[f32] {
        match self {
            NodeCache::Stack(s) => s.acts.last().map_or(&[], |v| v.as_slice()),
            NodeCache::Combine { y, .. } => y,
        }
    }
}

/// What the backward pass needs of a forward pass.
pub struct Cache<'a> {
    xs: Vec<&'a Encoded>,
    /// The raw gathered fields (before SENet) and SENet's per-row values.
    x0: Vec<f32>,
    senet: Vec<SenetRow>,
    /// Per row, what the target attention computed (when it attended).
    attn: Vec<Option<AttnRow>>,
    /// One entry for a one-stack tower (its layers), else one per graph node.
    nodes: Vec<NodeCache>,
    /// Per graph node, its input and output widths.
    node_widths: Vec<(usize, usize)>,
}

impl Cache<'_> {
    pub fn rows(&self) -> usize {
        self.xs.len()
    }

    /// The output, `rows × dim` row-major.
    pub fn output(&self) -> &[f32] {
        self.nodes.last().map_or(&[], NodeCache::output)
    }

    /// Per layer (in [`Tower::all_layers`] order), the batch statistics of its BatchNorm in
    /// this training pass.
    pub fn batch_stats(&self) -> Vec<Option<BnStats>> {
        self.nodes
            .iter()
            .flat_map(|n| match n {
                NodeCache::Stack(s) => s.bn.clone(),
                NodeCache::Combine { .. } => Vec::new(),
            })
            .collect()
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

/// The fields' layout, which shortcuts and graph inputs read.
struct Fields<'c> {
    fw: &'c [usize],
    offsets: &'c [usize],
    w0: usize,
    /// The raw gathered fields (shortcuts append them).
    x0: &'c [f32],
}

fn layer_params(l: &Layer) -> usize {
    match l {
        Layer::Linear { .. } | Layer::LayerNorm { .. } | Layer::BatchNorm { .. } => 2,
        Layer::Act(_) | Layer::L2Normalize | Layer::Dropout { .. } | Layer::Shortcut { .. } => 0,
    }
}

fn node_params(n: &Node) -> usize {
    match &n.op {
        NodeOp::Stack(ls) => ls.iter().map(layer_params).sum(),
        NodeOp::Combine(Combine::WeightedSum { .. } | Combine::WeightedConcat { .. }) => 1,
        NodeOp::Combine(
            Combine::Attention { .. } | Combine::Gate { .. } | Combine::Scale { .. },
        ) => 2,
        NodeOp::Combine(Combine::Concat | Combine::Sum) => 0,
    }
}

impl Tower {
    /// Width of each field, in order.
    pub fn field_widths(&self) -> Vec<usize> {
        self.fields
            .iter()
            .map(|f| match f {
                FieldKind::Embed { table } | FieldKind::Pool { table, .. } => {
                    self.tables[*table].dim
                }
                FieldKind::Value { width } => *width,
            })
            .collect()
    }

    pub fn input_width(&self) -> usize {
        self.field_widths().iter().sum()
    }

    /// Every layer: the one stack's, then each graph stack's in node order.
    pub fn all_layers(&self) -> Vec<&Layer> {
        let mut out: Vec<&Layer> = self.layers.iter().collect();
        for n in &self.graph {
            if let NodeOp::Stack(ls) = &n.op {
                out.extend(ls.iter());
            }
        }
        out
    }

    fn all_layers_mut(&mut self) -> Vec<&mut Layer> {
        let mut out: Vec<&mut Layer> = self.layers.iter_mut().collect();
        for n in &mut self.graph {
            if let NodeOp::Stack(ls) = &mut n.op {
                out.extend(ls.iter_mut());
            }
        }
        out
    }

    /// The dense parameters, in a fixed order (SENet: W1, b1, W2, b2; target attention: W_q,
    /// W_k; then per layer, Linear:
    /// weight, bias; LayerNorm and BatchNorm: weight, bias; then per graph node, its stack's
    /// layers as above, or its combine weight (and the attention's bias)). BatchNorm's running
    /// statistics are not parameters (no gradient; a step moves them).
    pub fn dense_params(&self) -> Vec<&[f32]> {
        let mut out: Vec<&[f32]> = Vec::new();
        if let Some(s) = &self.senet {
            out.extend([
                s.w1.as_slice(),
                s.b1.as_slice(),
                s.w2.as_slice(),
                s.b2.as_slice(),
            ]);
        }
        if let Some(a) = &self.attention {
            out.extend([a.wq.as_slice(), a.wk.as_slice()]);
        }
        fn layer<'a>(l: &'a Layer, out: &mut Vec<&'a [f32]>) {
            if let Layer::Linear { w, b, .. }
            | Layer::LayerNorm { g: w, b, .. }
            | Layer::BatchNorm { g: w, b, .. } = l
            {
                out.push(w);
                out.push(b);
            }
        }
        self.layers.iter().for_each(|l| layer(l, &mut out));
        for n in &self.graph {
            match &n.op {
                NodeOp::Stack(ls) => ls.iter().for_each(|l| layer(l, &mut out)),
                NodeOp::Combine(Combine::WeightedSum { w } | Combine::WeightedConcat { w }) => {
                    out.push(w)
                }
                NodeOp::Combine(
                    Combine::Attention { w, b }
                    | Combine::Gate { w, b, .. }
                    | Combine::Scale { w, b, .. },
                ) => out.extend([w.as_slice(), b.as_slice()]),
                NodeOp::Combine(Combine::Concat | Combine::Sum) => {}
            }
        }
        out
    }

    pub fn dense_params_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut out: Vec<&mut Vec<f32>> = Vec::new();
        if let Some(s) = &mut self.senet {
            out.extend([&mut s.w1, &mut s.b1, &mut s.w2, &mut s.b2]);
        }
        if let Some(a) = &mut self.attention {
            out.extend([&mut a.wq, &mut a.wk]);
        }
        fn layer<'a>(l: &'a mut Layer, out: &mut Vec<&'a mut Vec<f32>>) {
            if let Layer::Linear { w, b, .. }
            | Layer::LayerNorm { g: w, b, .. }
            | Layer::BatchNorm { g: w, b, .. } = l
            {
                out.push(w);
                out.push(b);
            }
        }
        self.layers.iter_mut().for_each(|l| layer(l, &mut out));
        for n in &mut self.graph {
            match &mut n.op {
                NodeOp::Stack(ls) => ls.iter_mut().for_each(|l| layer(l, &mut out)),
                NodeOp::Combine(Combine::WeightedSum { w } | Combine::WeightedConcat { w }) => {
                    out.push(w)
                }
                NodeOp::Combine(
                    Combine::Attention { w, b }
                    | Combine::Gate { w, b, .. }
                    | Combine::Scale { w, b, .. },
                ) => out.extend([w, b]),
                NodeOp::Combine(Combine::Concat | Combine::Sum) => {}
            }
        }
        out
    }

    /// Every BatchNorm layer's running mean and variance, in layer order.
    pub fn running_stats(&self) -> Vec<(&[f32], &[f32])> {
        self.all_layers()
            .into_iter()
            .filter_map(|l| match l {
                Layer::BatchNorm {
                    running_mean,
                    running_var,
                    ..
                } => Some((running_mean.as_slice(), running_var.as_slice())),
                _ => None,
            })
            .collect()
    }

    pub fn running_stats_mut(&mut self) -> Vec<(&mut Vec<f32>, &mut Vec<f32>)> {
        self.all_layers_mut()
            .into_iter()
            .filter_map(|l| match l {
                Layer::BatchNorm {
                    running_mean,
                    running_var,
                    ..
                } => Some((running_mean, running_var)),
                _ => None,
            })
            .collect()
    }

    /// Moves every BatchNorm layer's running statistics toward the batch statistics of a
    /// step's forward parts (`parts[p][layer]`, layers in [`Tower::all_layers`] order, pooled
    /// over the parts): mean and unbiased variance, by the layer's momentum.
    pub fn update_running_stats(&mut self, parts: &[Vec<Option<BnStats>>]) {
        for (li, layer) in self.all_layers_mut().into_iter().enumerate() {
            let Layer::BatchNorm {
                running_mean,
                running_var,
                momentum,
                ..
            } = layer
            else {
                continue;
            };
            let stats: Vec<&BnStats> = parts
                .iter()
                .filter_map(|p| p.get(li).and_then(Option::as_ref))
                .collect();
            let n: usize = stats.iter().map(|s| s.rows).sum();
            if n == 0 {
                continue;
            }
            let nf = n as f64;
            for j in 0..running_mean.len() {
                let mean = stats.iter().map(|s| s.rows as f64 * s.mean[j]).sum::<f64>() / nf;
                let ex2 = stats
                    .iter()
                    .map(|s| s.rows as f64 * (s.var[j] + s.mean[j] * s.mean[j]))
                    .sum::<f64>()
                    / nf;
                let var = (ex2 - mean * mean).max(0.0) * if n > 1 { nf / (nf - 1.0) } else { 1.0 };
                running_mean[j] =
                    ((1.0 - *momentum) * running_mean[j] as f64 + *momentum * mean) as f32;
                running_var[j] =
                    ((1.0 - *momentum) * running_var[j] as f64 + *momentum * var) as f32;
            }
        }
    }

    /// Number of parameters (tables and layers).
    pub fn parameter_count(&self) -> usize {
        self.tables.iter().map(|t| t.w.len()).sum::<usize>()
            + self.dense_params().iter().map(|p| p.len()).sum::<usize>()
    }

    /// The index of the first layer's dense parameter (after SENet's and the attention's).
    fn first_layer_param(&self) -> usize {
        4 * usize::from(self.senet.is_some()) + 2 * usize::from(self.attention.is_some())
    }

    pub fn zero_grads(&self) -> Grads {
        Grads {
            dense: self
                .dense_params()
                .iter()
                .map(|p| vec![0.0; p.len()])
                .collect(),
            rows: vec![BTreeMap::new(); self.tables.len()],
        }
    }

    /// The raw input vectors of `xs` (fields concatenated), as the serving forward pass gathers
    /// them: pooling in f64, an empty bag is the OOV row, a missing dense field is zeros.
    /// Also returns, per row, what the target attention computed.
    fn gather(
        &self,
        xs: &[&Encoded],
        widths: &[usize],
        w0: usize,
    ) -> (Vec<f32>, Vec<Option<AttnRow>>) {
        let mut x0 = vec![0f32; xs.len() * w0];
        let mut attn = Vec::new();
        for (x, out) in xs.iter().zip(x0.chunks_exact_mut(w0.max(1))) {
            let mut off = 0;
            let mut row_attn = None;
            for (fi, ((kind, field), &w)) in
                self.fields.iter().zip(x.fields()).zip(widths).enumerate()
            {
                let dst = &mut out[off..off + w];
                off += w;
                if let (Some(a), FieldRef::Dense(Some(buf))) = (&self.attention, field) {
                    if a.field == fi {
                        if buf.len() >= a.d && (buf.len() - a.d) % a.d.max(1) == 0 {
                            let hs: Vec<&[f32]> = buf[a.d..].chunks_exact(a.d.max(1)).collect();
                            let keys =
                                twotower_tower::attention::history_keys(&a.wk, a.r, a.d, &hs);
                            let (q, alpha) =
                                twotower_tower::attention::attend(&a.wq, &keys, &buf[..a.d], dst);
                            row_attn = (!alpha.is_empty()).then_some(AttnRow { q, alpha, keys });
                        }
                        continue;
                    }
                }
                match (kind, field) {
                    (FieldKind::Embed { table }, FieldRef::Row(r)) => {
                        if let Some(e) = self.tables[*table].row(r) {
                            dst.copy_from_slice(e);
                        }
                    }
                    (
                        FieldKind::Pool {
                            table,
                            pooling: Pooling::Max,
                        },
                        FieldRef::Bag { rows, weights },
                    ) => {
                        let t = &self.tables[*table];
                        dst.iter_mut().for_each(|d| *d = f32::NEG_INFINITY);
                        for (i, &r) in rows.iter().enumerate() {
                            let wi = weights.and_then(|ws| ws.get(i)).copied().unwrap_or(1.0);
                            if let Some(e) = t.row(r) {
                                dst.iter_mut().zip(e).for_each(|(d, e)| *d = d.max(wi * e));
                            }
                        }
                        dst.iter_mut()
                            .filter(|d| **d == f32::NEG_INFINITY)
                            .for_each(|d| *d = 0.0);
                    }
                    (FieldKind::Pool { table, pooling }, FieldRef::Bag { rows, weights }) => {
                        let t = &self.tables[*table];
                        let mut acc = vec![0f64; w];
                        let mut wsum = 0f64;
                        for (i, &r) in rows.iter().enumerate() {
                            let wi =
                                weights.and_then(|ws| ws.get(i)).copied().unwrap_or(1.0) as f64;
                            wsum += wi;
                            if let Some(e) = t.row(r) {
                                acc.iter_mut()
                                    .zip(e)
                                    .for_each(|(a, e)| *a += wi * *e as f64);
                            }
                        }
                        let scale = pool_scale(*pooling, wsum);
                        dst.iter_mut()
                            .zip(&acc)
                            .for_each(|(d, a)| *d = (a * scale) as f32);
                    }
                    (FieldKind::Value { .. }, FieldRef::Value(v)) => dst[0] = v,
                    (FieldKind::Value { .. }, FieldRef::Dense(Some(v))) if v.len() == w => {
                        dst.copy_from_slice(v)
                    }
                    _ => {}
                }
            }
            attn.push(row_attn);
        }
        (x0, attn)
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
        use rand::SeedableRng;
        let mut rng = seed.map(rand_chacha::ChaCha8Rng::seed_from_u64);
        let m = xs.len();
        let fw = self.field_widths();
        let w0: usize = fw.iter().sum();
        let offsets = offsets_of(&fw);
        let (x0, attn) = self.gather(xs, &fw, w0);
        let mut h = x0.clone();
        let mut senet_rows = Vec::new();
        if let Some(s) = &self.senet {
            for row in h.chunks_exact_mut(w0.max(1)) {
                senet_rows.push(senet_forward(s, &fw, &offsets, row));
            }
        }
        let f = Fields {
            fw: &fw,
            offsets: &offsets,
            w0,
            x0: &x0,
        };
        let mut nodes = Vec::with_capacity(self.graph.len().max(1));
        let mut node_widths: Vec<(usize, usize)> = Vec::with_capacity(self.graph.len());
        if self.graph.is_empty() {
            nodes.push(NodeCache::Stack(stack_forward(
                &self.layers,
                h,
                m,
                w0,
                &f,
                &mut rng,
            )));
        } else {
            for node in &self.graph {
                let ws = input_widths(&node.inputs, &fw, &node_widths);
                let x = node_input(&node.inputs, &h, &nodes, &ws, m, &f);
                let in_width: usize = ws.iter().sum();
                let (cache, width) = match &node.op {
                    NodeOp::Stack(ls) => {
                        let sc = stack_forward(ls, x, m, in_width, &f, &mut rng);
                        let width = sc.widths.last().copied().unwrap_or(in_width);
                        (NodeCache::Stack(sc), width)
                    }
                    NodeOp::Combine(c) => combine_forward(c, &ws, x, m),
                };
                nodes.push(cache);
                node_widths.push((in_width, width));
            }
        }
        Cache {
            xs: xs.to_vec(),
            x0,
            senet: senet_rows,
            attn,
            nodes,
            node_widths,
        }
    }

    /// The backward pass: `dout` is d(loss)/d(output), `rows × dim`.
    pub fn backward(&self, cache: &Cache, dout: &[f32]) -> Grads {
        let m = cache.rows();
        let mut grads = self.zero_grads();
        let fw = self.field_widths();
        let w0: usize = fw.iter().sum();
        let offsets = offsets_of(&fw);
        let f = Fields {
            fw: &fw,
            offsets: &offsets,
            w0,
            x0: &cache.x0,
        };
        // Gradients that shortcuts send straight to the raw fields.
        let mut dx0_extra: Option<Vec<f32>> = None;
        let first = self.first_layer_param();
        let mut dh = match cache.nodes.first() {
            Some(NodeCache::Stack(sc)) if self.graph.is_empty() => {
                let end = first + self.layers.iter().map(layer_params).sum::<usize>();
                stack_backward(
                    &self.layers,
                    sc,
                    dout.to_vec(),
                    m,
                    &mut grads,
                    end,
                    &f,
                    &mut dx0_extra,
                )
            }
            _ => self.graph_backward(cache, dout, &mut grads, &f),
        };
        if let Some(s) = &self.senet {
            dh = self.senet_backward(s, cache, &dh, &fw, &offsets, &mut grads);
        }
        if let Some(extra) = dx0_extra {
            dh.iter_mut().zip(extra).for_each(|(a, b)| *a += b);
        }
        if let Some(a) = &self.attention {
            let p = if self.senet.is_some() { 4 } else { 0 };
            for (row, (x, cached)) in cache.xs.iter().zip(&cache.attn).enumerate() {
                let (Some(at), Some(FieldRef::Dense(Some(buf)))) =
                    (cached, x.fields().nth(a.field))
                else {
                    continue;
                };
                let dout = &dh[row * w0 + offsets[a.field]..row * w0 + offsets[a.field] + a.d];
                attention_backward(a, at, &buf[..a.d], dout, &mut grads, p);
            }
        }
        // Into the embedding rows.
        for (x, drow) in cache.xs.iter().zip(dh.chunks_exact(w0.max(1))) {
            let mut off = 0;
            for ((kind, field), &w) in self.fields.iter().zip(x.fields()).zip(&fw) {
                let d = &drow[off..off + w];
                off += w;
                match (kind, field) {
                    (FieldKind::Embed { table }, FieldRef::Row(r))
                        if (r as usize) < self.tables[*table].rows =>
                    {
                        add_row(&mut grads.rows[*table], r, d, 1.0);
                    }
                    (
                        FieldKind::Pool {
                            table,
                            pooling: Pooling::Max,
                        },
                        FieldRef::Bag { rows, weights },
                    ) => {
                        // Each element's gradient goes to the first row reaching the maximum.
                        let t = &self.tables[*table];
                        let wt =
                            |i: usize| weights.and_then(|ws| ws.get(i)).copied().unwrap_or(1.0);
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
                                let acc = grads.rows[*table]
                                    .entry(rows[i])
                                    .or_insert_with(|| vec![0.0; w]);
                                acc[k] += d[k] * wt(i);
                            }
                        }
                    }
                    (FieldKind::Pool { table, pooling }, FieldRef::Bag { rows, weights }) => {
                        let wt = |i: usize| {
                            weights.and_then(|ws| ws.get(i)).copied().unwrap_or(1.0) as f64
                        };
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

    /// The graph's backward pass, nodes in reverse: returns d(loss)/d(the fields after SENet).
    fn graph_backward(
        &self,
        cache: &Cache,
        dout: &[f32],
        grads: &mut Grads,
        f: &Fields,
    ) -> Vec<f32> {
        let m = cache.rows();
        let n = self.graph.len();
        // Each node's first dense parameter.
        let mut start = Vec::with_capacity(n);
        let mut at = self.first_layer_param() + self.layers.iter().map(layer_params).sum::<usize>();
        for node in &self.graph {
            start.push(at);
            at += node_params(node);
        }
        let mut dnode: Vec<Vec<f32>> = cache
            .node_widths
            .iter()
            .map(|&(_, w)| vec![0f32; m * w])
            .collect();
        if let Some(last) = dnode.last_mut() {
            last.iter_mut().zip(dout).for_each(|(a, b)| *a = *b);
        }
        let mut dh0 = vec![0f32; m * f.w0];
        for ni in (0..n).rev() {
            let node = &self.graph[ni];
            let dy = std::mem::take(&mut dnode[ni]);
            let ws = input_widths(&node.inputs, f.fw, &cache.node_widths);
            let in_width = cache.node_widths[ni].0;
            let dx = match (&node.op, &cache.nodes[ni]) {
                (NodeOp::Stack(ls), NodeCache::Stack(sc)) => {
                    let mut none = None;
                    stack_backward(
                        ls,
                        sc,
                        dy,
                        m,
                        grads,
                        start[ni] + node_params(node),
                        f,
                        &mut none,
                    )
                }
                (NodeOp::Combine(c), NodeCache::Combine { x, alphas, .. }) => {
                    combine_backward(c, &ws, x, alphas, &dy, m, grads, start[ni])
                }
                _ => unreachable!("a node's cache has the node's kind"),
            };
            for r in 0..m {
                let mut at = r * in_width;
                for (input, &w) in node.inputs.iter().zip(&ws) {
                    let src = &dx[at..at + w];
                    at += w;
                    let dst = match *input {
                        NodeInput::Field(k) => {
                            &mut dh0[r * f.w0 + f.offsets[k]..r * f.w0 + f.offsets[k] + w]
                        }
                        NodeInput::Node(j) => &mut dnode[j][r * w..(r + 1) * w],
                    };
                    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
                }
            }
        }
        dh0
    }
}

/// Target attention's backward pass for one row (`v` the candidate's vector): `dout` is
/// d(loss)/d(the field); adds W_q's and W_k's gradients (dense parameters `p`, `p + 1`). The
/// vectors are constants.
fn attention_backward(
    a: &Attention,
    at: &AttnRow,
    v: &[f32],
    dout: &[f32],
    grads: &mut Grads,
    p: usize,
) {
    let (r, d) = (a.r, a.d);
    let (q, alpha, keys) = (&at.q, &at.alpha, &at.keys);
    let dot = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum::<f64>()
    };
    // out = Σ αᵢ hᵢ; α = softmax(s); sᵢ = q·kᵢ / √r.
    let da: Vec<f64> = keys.values.chunks_exact(d).map(|h| dot(dout, h)).collect();
    let mean: f64 = alpha.iter().zip(&da).map(|(a, g)| *a as f64 * g).sum();
    let scale = 1.0 / (r as f64).sqrt();
    let mut dq = vec![0f64; r];
    for (i, (h, k)) in keys
        .values
        .chunks_exact(d)
        .zip(keys.keys.chunks_exact(r))
        .enumerate()
    {
        let ds = alpha[i] as f64 * (da[i] - mean) * scale;
        for j in 0..r {
            dq[j] += ds * k[j] as f64;
            let g = ds * q[j] as f64;
            let gk = &mut grads.dense[p + 1][j * d..(j + 1) * d];
            gk.iter_mut()
                .zip(h)
                .for_each(|(x, hv)| *x += (g * *hv as f64) as f32);
        }
    }
    for (j, dqj) in dq.iter().enumerate() {
        let gq = &mut grads.dense[p][j * d..(j + 1) * d];
        gq.iter_mut()
            .zip(v)
            .for_each(|(x, vv)| *x += (dqj * *vv as f64) as f32);
    }
}

fn offsets_of(fw: &[usize]) -> Vec<usize> {
    fw.iter()
        .scan(0, |o, w| {
            let at = *o;
            *o += w;
            Some(at)
        })
        .collect()
}

/// The widths of a node's inputs.
fn input_widths(inputs: &[NodeInput], fw: &[usize], node_widths: &[(usize, usize)]) -> Vec<usize> {
    inputs
        .iter()
        .map(|i| match *i {
            NodeInput::Field(k) => fw[k],
            NodeInput::Node(j) => node_widths[j].1,
        })
        .collect()
}

/// A node's inputs side by side, row by row (`m × Σ ws`).
fn node_input(
    inputs: &[NodeInput],
    h: &[f32],
    nodes: &[NodeCache],
    ws: &[usize],
    m: usize,
    f: &Fields,
) -> Vec<f32> {
    let mut x = Vec::with_capacity(m * ws.iter().sum::<usize>());
    for r in 0..m {
        for (i, &w) in inputs.iter().zip(ws) {
            match *i {
                NodeInput::Field(k) => {
                    x.extend_from_slice(&h[r * f.w0 + f.offsets[k]..r * f.w0 + f.offsets[k] + w])
                }
                NodeInput::Node(j) => x.extend_from_slice(&nodes[j].output()[r * w..(r + 1) * w]),
            }
        }
    }
    x
}

/// A layer stack's forward pass over `m` rows `h` of `width`.
fn stack_forward(
    stack: &[Layer],
    mut h: Vec<f32>,
    m: usize,
    mut width: usize,
    f: &Fields,
    rng: &mut Option<rand_chacha::ChaCha8Rng>,
) -> StackCache {
    use rand::Rng;
    let (fw, offsets, w0, x0) = (f.fw, f.offsets, f.w0, f.x0);
    let training = rng.is_some();
    let mut masks = vec![None; stack.len()];
    let mut bn = vec![None; stack.len()];
    let mut acts = Vec::with_capacity(stack.len() + 1);
    let mut widths = Vec::with_capacity(stack.len() + 1);
    for (li, layer) in stack.iter().enumerate() {
        let input = h.clone();
        widths.push(width);
        match layer {
            Layer::Dropout { p } => {
                if let Some(rng) = rng.as_mut() {
                    let keep = 1.0 - *p;
                    let mask: Vec<f32> = (0..h.len())
                        .map(|_| {
                            if rng.gen::<f32>() < keep {
                                1.0 / keep
                            } else {
                                0.0
                            }
                        })
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
                        next.extend_from_slice(
                            &x0[r * w0 + offsets[f]..r * w0 + offsets[f] + fw[f]],
                        );
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
            Layer::BatchNorm {
                g,
                b,
                running_mean,
                running_var,
                eps,
                ..
            } => {
                if training && m > 0 {
                    let st = column_stats(&h, m, width);
                    let mean: Vec<f32> = st.mean.iter().map(|&v| v as f32).collect();
                    let inv: Vec<f32> = st
                        .var
                        .iter()
                        .map(|&v| (1.0 / (v + eps).sqrt()) as f32)
                        .collect();
                    layers::batch_norm(&mut h, width, g, b, &mean, &inv);
                    bn[li] = Some(st);
                } else {
                    // The serving form: 1/√(running_var + eps) in f64, as the tower crate loads it.
                    let inv: Vec<f32> = running_var
                        .iter()
                        .map(|&v| (1.0 / (v as f64 + eps).sqrt()) as f32)
                        .collect();
                    layers::batch_norm(&mut h, width, g, b, running_mean, &inv);
                }
            }
            Layer::L2Normalize => layers::l2_normalize(&mut h, width),
        }
        acts.push(input);
    }
    widths.push(width);
    acts.push(h);
    StackCache {
        acts,
        widths,
        masks,
        bn,
    }
}

/// A layer stack's backward pass: `dh` is d(loss)/d(its output); its dense parameters end
/// before `pi` (in [`Tower::dense_params`] order). Returns d(loss)/d(its input); shortcuts add
/// to `dx0_extra` (d(loss)/d(the raw fields)).
#[allow(clippy::too_many_arguments)]
fn stack_backward(
    stack: &[Layer],
    sc: &StackCache,
    mut dh: Vec<f32>,
    m: usize,
    grads: &mut Grads,
    mut pi: usize,
    f: &Fields,
    dx0_extra: &mut Option<Vec<f32>>,
) -> Vec<f32> {
    let (fw, offsets, w0) = (f.fw, f.offsets, f.w0);
    for (l, layer) in stack.iter().enumerate().rev() {
        let x = &sc.acts[l];
        let y = &sc.acts[l + 1];
        let width = sc.widths[l];
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
                if let Some(mask) = &sc.masks[l] {
                    dh.iter_mut().zip(mask).for_each(|(d, k)| *d *= k);
                }
            }
            Layer::Shortcut { fields } => {
                let nw = sc.widths[l + 1];
                let mut down = Vec::with_capacity(m * width);
                let extra = dx0_extra.get_or_insert_with(|| vec![0f32; m * w0]);
                for r in 0..m {
                    let row = &dh[r * nw..(r + 1) * nw];
                    down.extend_from_slice(&row[..width]);
                    let mut at = width;
                    for &f in fields {
                        let dst = &mut extra[r * w0 + offsets[f]..r * w0 + offsets[f] + fw[f]];
                        dst.iter_mut()
                            .zip(&row[at..at + fw[f]])
                            .for_each(|(a, b)| *a += b);
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
            Layer::BatchNorm {
                g,
                running_mean,
                running_var,
                eps,
                ..
            } => {
                pi -= 2;
                match &sc.bn[l] {
                    Some(st) => {
                        // Training: the statistics depend on every row of the part.
                        let n = m as f64;
                        for j in 0..width {
                            let inv = 1.0 / (st.var[j] + eps).sqrt();
                            let (mut s1, mut s2) = (0f64, 0f64);
                            for r in 0..m {
                                let xhat = (x[r * width + j] as f64 - st.mean[j]) * inv;
                                let dy = dh[r * width + j] as f64;
                                grads.dense[pi][j] += (dy * xhat) as f32;
                                grads.dense[pi + 1][j] += dy as f32;
                                s1 += dy * g[j] as f64;
                                s2 += dy * g[j] as f64 * xhat;
                            }
                            for r in 0..m {
                                let xhat = (x[r * width + j] as f64 - st.mean[j]) * inv;
                                let dxhat = dh[r * width + j] as f64 * g[j] as f64;
                                dh[r * width + j] = (inv / n * (n * dxhat - s1 - xhat * s2)) as f32;
                            }
                        }
                    }
                    None => {
                        // Inference: an affine map with the running statistics.
                        for r in 0..m {
                            for j in 0..width {
                                let inv = 1.0 / (running_var[j] as f64 + eps).sqrt();
                                let xhat = (x[r * width + j] as f64 - running_mean[j] as f64) * inv;
                                let dy = dh[r * width + j];
                                grads.dense[pi][j] += dy * xhat as f32;
                                grads.dense[pi + 1][j] += dy;
                                dh[r * width + j] = (dy as f64 * g[j] as f64 * inv) as f32;
                            }
                        }
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
                    let yd: f64 = yr
                        .iter()
                        .zip(drow.iter())
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    for (d, &yi) in drow.iter_mut().zip(yr) {
                        *d = ((*d as f64 - yi as f64 * yd) / norm) as f32;
                    }
                }
            }
        }
    }
    dh
}

/// A combine node over `m` rows `x` (its inputs of widths `ws` side by side), as the tower
/// crate serves it; returns its cache and output width.
fn combine_forward(c: &Combine, ws: &[usize], x: Vec<f32>, m: usize) -> (NodeCache, usize) {
    let k = ws.len();
    let in_width: usize = ws.iter().sum();
    let d = ws.first().copied().unwrap_or(0);
    let mut alphas = Vec::new();
    let (y, width) = match c {
        Combine::Concat => (x.clone(), in_width),
        Combine::Sum => (layers::combine_rows(&x, m, k, d, |_, _| 1.0), d),
        Combine::WeightedSum { w } => (layers::combine_rows(&x, m, k, d, |i, _| w[i]), d),
        Combine::WeightedConcat { w } => {
            let mut y = x.clone();
            for row in y.chunks_exact_mut(in_width.max(1)) {
                let mut at = 0;
                for (i, &n) in ws.iter().enumerate() {
                    row[at..at + n].iter_mut().for_each(|v| *v *= w[i]);
                    at += n;
                }
            }
            (y, in_width)
        }
        Combine::Attention { w, b } => {
            let mut scores = vec![0f32; k];
            alphas = vec![0f32; m * k];
            for (r, a) in alphas.chunks_exact_mut(k.max(1)).enumerate() {
                layers::matvec(
                    w,
                    Some(b),
                    &x[r * in_width..(r + 1) * in_width],
                    k,
                    &mut scores,
                );
                layers::softmax(&scores, a);
            }
            (
                layers::combine_rows(&x, m, k, d, |i, r| alphas[r * k + i]),
                d,
            )
        }
        Combine::Gate { w, b, k } => {
            let (y, a) = layers::gate_rows(&x, m, in_width, (*k, d), w, Some(b));
            alphas = a;
            (y, d)
        }
        Combine::Scale { w, b, n } => {
            let (y, f) = layers::scale_rows(&x, m, in_width, *n, w, Some(b));
            alphas = f;
            (y, *n)
        }
    };
    (NodeCache::Combine { x, y, alphas }, width)
}

/// A combine node's backward pass: `dy` is d(loss)/d(its output); its weights are dense
/// parameter `p0` (and the attention's bias `p0 + 1`). Returns d(loss)/d(its inputs).
#[allow(clippy::too_many_arguments)]
fn combine_backward(
    c: &Combine,
    ws: &[usize],
    x: &[f32],
    alphas: &[f32],
    dy: &[f32],
    m: usize,
    grads: &mut Grads,
    p0: usize,
) -> Vec<f32> {
    let k = ws.len();
    let in_width: usize = ws.iter().sum();
    let d = ws.first().copied().unwrap_or(0);
    let mut dx = vec![0f32; m * in_width];
    let dot = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(p, q)| *p as f64 * *q as f64)
            .sum::<f64>()
    };
    for r in 0..m {
        let xr = &x[r * in_width..(r + 1) * in_width];
        let dxr = &mut dx[r * in_width..(r + 1) * in_width];
        match c {
            Combine::Concat => dxr.copy_from_slice(&dy[r * in_width..(r + 1) * in_width]),
            Combine::WeightedConcat { w } => {
                let dyr = &dy[r * in_width..(r + 1) * in_width];
                let mut at = 0;
                for (i, &n) in ws.iter().enumerate() {
                    for j in at..at + n {
                        dxr[j] = w[i] * dyr[j];
                    }
                    grads.dense[p0][i] += dot(&dyr[at..at + n], &xr[at..at + n]) as f32;
                    at += n;
                }
            }
            Combine::Sum => {
                let dyr = &dy[r * d..(r + 1) * d];
                for i in 0..k {
                    dxr[i * d..(i + 1) * d].copy_from_slice(dyr);
                }
            }
            Combine::WeightedSum { w } => {
                let dyr = &dy[r * d..(r + 1) * d];
                for i in 0..k {
                    for j in 0..d {
                        dxr[i * d + j] = w[i] * dyr[j];
                    }
                    grads.dense[p0][i] += dot(dyr, &xr[i * d..(i + 1) * d]) as f32;
                }
            }
            Combine::Attention { w, .. } | Combine::Gate { w, .. } => {
                // y = Σ αᵢ xᵢ, α = softmax(s), s = W·g + b: g is the whole row (attention) or
                // the row after the k experts (gate).
                let (k, at) = match c {
                    Combine::Gate { k, .. } => (*k, *k * d),
                    _ => (k, 0),
                };
                let gwidth = in_width - at;
                let dyr = &dy[r * d..(r + 1) * d];
                let a = &alphas[r * k..(r + 1) * k];
                let da: Vec<f64> = (0..k).map(|i| dot(dyr, &xr[i * d..(i + 1) * d])).collect();
                let mean: f64 = (0..k).map(|i| a[i] as f64 * da[i]).sum();
                for i in 0..k {
                    for j in 0..d {
                        dxr[i * d + j] = a[i] * dyr[j];
                    }
                }
                let g = &xr[at..];
                for j in 0..k {
                    let ds = a[j] as f64 * (da[j] - mean);
                    grads.dense[p0 + 1][j] += ds as f32;
                    let wrow = &w[j * gwidth..(j + 1) * gwidth];
                    let gw = &mut grads.dense[p0][j * gwidth..(j + 1) * gwidth];
                    for t in 0..gwidth {
                        gw[t] += (ds * g[t] as f64) as f32;
                        dxr[at + t] += (ds * wrow[t] as f64) as f32;
                    }
                }
            }
            Combine::Scale { w, n, .. } => {
                // y = x ⊙ f, f = 2σ(z), z = W·g + b: dz = dy ⊙ x ⊙ f(1 − f/2).
                let n = *n;
                let gwidth = in_width - n;
                let dyr = &dy[r * n..(r + 1) * n];
                let f = &alphas[r * n..(r + 1) * n];
                let g = &xr[n..];
                for j in 0..n {
                    dxr[j] = dyr[j] * f[j];
                    let fj = f[j] as f64;
                    let dz = dyr[j] as f64 * xr[j] as f64 * fj * (1.0 - fj / 2.0);
                    grads.dense[p0 + 1][j] += dz as f32;
                    let wrow = &w[j * gwidth..(j + 1) * gwidth];
                    let gw = &mut grads.dense[p0][j * gwidth..(j + 1) * gwidth];
                    for t in 0..gwidth {
                        gw[t] += (dz * g[t] as f64) as f32;
                        dxr[n + t] += (dz * wrow[t] as f64) as f32;
                    }
                }
            }
        }
    }
    dx
}

impl Tower {
    /// SENet's backward pass: `dh` is d(loss)/d(the gated fields); returns d(loss)/d(the raw
    /// fields) and adds W1, b1, W2, b2's gradients (dense parameters 0..4).
    fn senet_backward(
        &self,
        s: &Senet,
        cache: &Cache,
        dh: &[f32],
        fw: &[usize],
        offsets: &[usize],
        grads: &mut Grads,
    ) -> Vec<f32> {
        let w0: usize = fw.iter().sum();
        let nf = fw.len();
        let mut dx = vec![0f32; dh.len()];
        for (r, sr) in cache.senet.iter().enumerate() {
            let x = &cache.x0[r * w0..(r + 1) * w0];
            let d = &dh[r * w0..(r + 1) * w0];
            let out = &mut dx[r * w0..(r + 1) * w0];
            // Through the gates: out_i = a_i · f_i.
            let mut da = vec![0f64; nf];
            for i in 0..nf {
                let (o, w) = (offsets[i], fw[i]);
                let mut dg = 0f64;
                for k in o..o + w {
                    out[k] = d[k] * sr.gate[i];
                    dg += d[k] as f64 * x[k] as f64;
                }
                let a = sr.gate[i] as f64;
                da[i] = dg * a * (1.0 - a);
            }
            // a = W2·hidden + b2; hidden = relu(W1·z + b1).
            let mut dhid = vec![0f64; s.r];
            for i in 0..nf {
                grads.dense[3][i] += da[i] as f32;
                for j in 0..s.r {
                    grads.dense[2][i * s.r + j] += (da[i] * sr.hidden[j] as f64) as f32;
                    dhid[j] += da[i] * s.w2[i * s.r + j] as f64;
                }
            }
            let mut dz = vec![0f64; nf];
            for j in 0..s.r {
                if sr.hidden[j] <= 0.0 {
                    continue;
                }
                grads.dense[1][j] += dhid[j] as f32;
                for i in 0..nf {
                    grads.dense[0][j * nf + i] += (dhid[j] * sr.z[i] as f64) as f32;
                    dz[i] += dhid[j] * s.w1[j * nf + i] as f64;
                }
            }
            // z_i = mean(f_i).
            for i in 0..nf {
                let (o, w) = (offsets[i], fw[i]);
                let share = (dz[i] / w.max(1) as f64) as f32;
                out[o..o + w].iter_mut().for_each(|v| *v += share);
            }
        }
        dx
    }
}

/// SENet over one row of raw fields, in place, computed as the tower crate serves it (the
/// squeeze in f64, then `matvec` and the same sigmoid); returns what the backward pass needs.
fn senet_forward(s: &Senet, fw: &[usize], offsets: &[usize], row: &mut [f32]) -> SenetRow {
    let z: Vec<f32> = fw
        .iter()
        .zip(offsets)
        .map(|(&w, &o)| (row[o..o + w].iter().map(|&x| x as f64).sum::<f64>() / w as f64) as f32)
        .collect();
    let nf = z.len();
    let mut hidden = vec![0f32; s.r];
    layers::matvec(&s.w1, Some(&s.b1), &z, s.r, &mut hidden);
    hidden.iter_mut().for_each(|v| *v = v.max(0.0));
    let mut gate = vec![0f32; nf];
    layers::matvec(&s.w2, Some(&s.b2), &hidden, nf, &mut gate);
    gate.iter_mut().for_each(|a| *a = layers::sigmoid(*a));
    for i in 0..nf {
        row[offsets[i]..offsets[i] + fw[i]]
            .iter_mut()
            .for_each(|v| *v *= gate[i]);
    }
    SenetRow { z, hidden, gate }
}

/// Per-column mean and biased variance of `m` rows (f64).
fn column_stats(h: &[f32], m: usize, width: usize) -> BnStats {
    let mut mean = vec![0f64; width];
    for row in h.chunks_exact(width.max(1)) {
        mean.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64);
    }
    mean.iter_mut().for_each(|a| *a /= m as f64);
    let mut var = vec![0f64; width];
    for row in h.chunks_exact(width.max(1)) {
        var.iter_mut()
            .zip(row)
            .zip(&mean)
            .for_each(|((a, &v), mu)| *a += (v as f64 - mu).powi(2));
    }
    var.iter_mut().for_each(|a| *a /= m as f64);
    BnStats { rows: m, mean, var }
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
