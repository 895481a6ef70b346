//! Towers as a small graph of named nodes (the spec's `graph`): sub-towers over feature subsets
//! (each a layer stack), joined by combine nodes (concatenation, sums, attention fusion), in an
//! order where every input comes before its node. Parsed and validated in `spec`, bound to the
//! weights in `model`; the forward pass over a batch is here.

use crate::forward::run_stack;
use crate::layers::{combine_rows, gate_rows, linear, matvec, scale_rows, softmax};
use crate::model::{Layer, Model};

/// Where a node reads one of its inputs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Input {
    /// A feature's field in the (SENet-weighted) input row.
    Field { offset: usize, width: usize },
    /// An earlier node's output.
    Node { index: usize, width: usize },
}

impl Input {
    pub(crate) fn width(&self) -> usize {
        match self {
            Input::Field { width, .. } | Input::Node { width, .. } => *width,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Op {
    Stack(Vec<Layer>),
    Concat,
    Sum,
    WeightedSum {
        w: usize,
    },
    WeightedConcat {
        w: usize,
    },
    Attention {
        w: usize,
        b: Option<usize>,
    },
    /// The MMoE gate: `k` experts of width `d`, then the gate inputs.
    Gate {
        w: usize,
        b: Option<usize>,
        k: usize,
        d: usize,
    },
    /// The scene gate: the scaled inputs (width `n`), then the gate inputs.
    Scale {
        w: usize,
        b: Option<usize>,
        n: usize,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub inputs: Vec<Input>,
    pub op: Op,
    pub in_width: usize,
    pub width: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct Graph {
    pub nodes: Vec<Node>,
    pub output: usize,
}

impl Graph {
    pub(crate) fn output_width(&self) -> usize {
        self.nodes[self.output].width
    }

    pub(crate) fn layers(&self) -> impl Iterator<Item = &Layer> {
        self.nodes.iter().flat_map(|n| match &n.op {
            Op::Stack(l) => l.as_slice(),
            _ => &[],
        })
    }
}

/// The graph over `m` input rows `h` (`m * input_width` floats, after SENet): the output node's
/// `m` rows.
pub(crate) fn run(model: &Model, g: &Graph, h: &[f32], m: usize) -> Vec<f32> {
    let mut outs: Vec<Vec<f32>> = Vec::with_capacity(g.nodes.len());
    for node in &g.nodes {
        let x = node_input(node, Some((h, model.input_width)), &outs, m);
        outs.push(apply(model, node, x, m));
    }
    outs.swap_remove(g.output)
}

/// A node's inputs side by side, row by row: fields from `h` (rows of `w0`), nodes from
/// `outs`. A field input without `h` reads zeros (callers that fold fields never ask).
fn node_input(node: &Node, h: Option<(&[f32], usize)>, outs: &[Vec<f32>], m: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(m * node.in_width);
    for r in 0..m {
        for i in &node.inputs {
            match (*i, h) {
                (Input::Field { offset, width }, Some((h, w0))) => {
                    x.extend_from_slice(&h[r * w0 + offset..r * w0 + offset + width])
                }
                (Input::Field { width, .. }, None) => x.resize(x.len() + width, 0.0),
                (Input::Node { index, width }, _) => {
                    x.extend_from_slice(&outs[index][r * width..(r + 1) * width])
                }
            }
        }
    }
    x
}

/// A node's output over its inputs `x` (`m` rows of `node.in_width`).
fn apply(model: &Model, node: &Node, x: Vec<f32>, m: usize) -> Vec<f32> {
    let k = node.inputs.len();
    let d = node.width;
    match &node.op {
        Op::Stack(layers) => run_stack(model, layers, x, m, node.in_width),
        Op::Concat => x,
        Op::Sum => combine_rows(&x, m, k, d, |_, _| 1.0),
        Op::WeightedSum { w } => {
            let w = &model.tensors[*w];
            combine_rows(&x, m, k, d, |i, _| w[i])
        }
        Op::WeightedConcat { w } => {
            let w = &model.tensors[*w];
            let mut y = x;
            for row in y.chunks_exact_mut(node.in_width.max(1)) {
                let mut at = 0;
                for (i, input) in node.inputs.iter().enumerate() {
                    let n = input.width();
                    row[at..at + n].iter_mut().for_each(|v| *v *= w[i]);
                    at += n;
                }
            }
            y
        }
        Op::Attention { w, b } => {
            let (w, b) = (&model.tensors[*w], b.map(|b| model.tensors[b].as_slice()));
            let mut scores = vec![0f32; k];
            let mut alphas = vec![0f32; m * k];
            for (r, a) in alphas.chunks_exact_mut(k).enumerate() {
                matvec(
                    w,
                    b,
                    &x[r * node.in_width..(r + 1) * node.in_width],
                    k,
                    &mut scores,
                );
                softmax(&scores, a);
            }
            combine_rows(&x, m, k, d, |i, r| alphas[r * k + i])
        }
        Op::Gate { w, b, k, d } => {
            let b = b.map(|b| model.tensors[b].as_slice());
            gate_rows(&x, m, node.in_width, (*k, *d), &model.tensors[*w], b).0
        }
        Op::Scale { w, b, n } => {
            let b = b.map(|b| model.tensors[b].as_slice());
            scale_rows(&x, m, node.in_width, *n, &model.tensors[*w], b).0
        }
    }
}

/// A node's first linear map with a request's constants folded in (`rows.rs`): its weights over
/// the varying columns (`[n_out, width]`) and its bias. For a stack, its first (linear) layer
/// over its field inputs; for a gate, its logits over its field gate inputs.
pub(crate) struct FoldedNode {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub n_out: usize,
}

/// The graph over `m` rows `v` of the varying columns (`width` each) when every node that reads
/// fields is folded (`folded[i]` for node i; the others read only nodes, and `skip` marks the
/// scene gates folded into their readers): a folded stack is its folded first layer then its
/// other layers, a folded gate takes its logits from its folded weights and mixes its experts
/// (nodes) as [`run`] does.
pub(crate) fn run_folded(
    model: &Model,
    g: &Graph,
    v: &[f32],
    width: usize,
    m: usize,
    folded: &[Option<FoldedNode>],
    skip: &[bool],
) -> Vec<f32> {
    let mut outs: Vec<Vec<f32>> = Vec::with_capacity(g.nodes.len());
    for ((node, f), &skip) in g.nodes.iter().zip(folded).zip(skip) {
        let y = match (f, &node.op) {
            // A scene gate folded into its readers.
            _ if skip => Vec::new(),
            (Some(f), Op::Stack(layers)) => {
                let h = linear(v, m, width, &f.weight, Some(&f.bias), f.n_out);
                run_stack(model, layers.get(1..).unwrap_or(&[]), h, m, f.n_out)
            }
            (Some(f), Op::Gate { k, d, .. }) => {
                let s = linear(v, m, width, &f.weight, Some(&f.bias), *k);
                // The experts only: the gate inputs are folded (and may be a scene gate that
                // was not computed).
                let experts = Node {
                    inputs: node.inputs[..*k].to_vec(),
                    op: Op::Concat,
                    in_width: k * d,
                    width: k * d,
                };
                let x = node_input(&experts, None, &outs, m);
                let mut y = vec![0f32; m * d];
                let mut a = vec![0f32; *k];
                for r in 0..m {
                    softmax(&s[r * k..(r + 1) * k], &mut a);
                    let row = &x[r * k * d..(r + 1) * k * d];
                    let out = &mut y[r * d..(r + 1) * d];
                    for (i, ai) in a.iter().enumerate() {
                        for (o, xv) in out.iter_mut().zip(&row[i * d..(i + 1) * d]) {
                            *o += ai * xv;
                        }
                    }
                }
                y
            }
            _ => {
                let x = node_input(node, None, &outs, m);
                apply(model, node, x, m)
            }
        };
        outs.push(y);
    }
    outs.swap_remove(g.output)
}
