//! The forward pass of a pre-rank model over the candidates of one request, without an example
//! per candidate.
//!
//! When the first layer is linear on the raw input (no SENet, no shortcut), everything constant
//! within the request is folded into it once per call, so the batched product only sees what
//! varies per candidate:
//! - the user-side fields and `user_vector` become part of the bias:
//!   `b' = b + W_user · x_user + W_u · u`;
//! - `product` (u ⊙ v) joins `item_vector` in one block of weights over v:
//!   `W_v' = W_v + W_p · diag(u)`, since `W_p · (u ⊙ v) = (W_p · diag(u)) · v`.
//!
//! With the realistic model (227 inputs, of which u, u ⊙ v and the user side are 130) the
//! product shrinks to 97 columns. Other models take the unfolded path: one raw row per candidate.

use crate::forward::{run_layers, run_raw};
use crate::graph::{Input, Op};
use crate::layers::linear;
use crate::model::{Layer, Model, Part};
use crate::spec::{Cross, CrossShape, Source};

/// What goes where in a row: `None` for a feature folded into the bias.
#[derive(Clone, Copy)]
enum Put {
    /// An item field: its offset in the row and in the item part's raw values.
    Item(usize, usize),
    Vector(usize),
    Product(usize),
    Scalar(usize, Cross),
    /// The target attention of the candidate over the history (the field's width).
    Attention(usize),
    /// The candidate's attention weights α (`n` columns, the history's length): the folded
    /// first layer reads W·(Σ αᵢhᵢ) as (W·Hᵀ)·α, fewer columns when n ≤ d.
    AttentionWeights(usize, usize),
}

/// The first layer with the request's constants folded in: its weights over the varying
/// columns (row-major `[n_out, width]`) and its bias.
struct Folded {
    width: usize,
    puts: Vec<Option<Put>>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    n_out: usize,
}

/// Candidate `i` of a request: its item part and its item vector.
pub type Row<'a> = (&'a Part, &'a [f32]);

impl Model {
    /// The forward pass of a pre-rank model over the candidates of one request. Row `i` reads
    /// the user part, `items[i]` (its part and its item vector `v`), the user vector `u` for
    /// `user_vector` and `product` (u ⊙ v), the request's history (`history`, from
    /// [`Model::attention_keys`]) for `target_attention`, and `scalar(i, c)` for each
    /// one-number cross input.
    /// A part from another model or side contributes zeros; so do the missing elements of a
    /// vector narrower than its field. Rows are split over `threads` scoped threads (which
    /// only compute). Returns one score per row.
    pub fn forward_rows(
        &self,
        user: &Part,
        u: &[f32],
        items: &[Row],
        history: &crate::attention::HistoryKeys,
        scalar: &mut dyn FnMut(usize, Cross) -> f32,
        threads: usize,
    ) -> Vec<f32> {
        let m = items.len();
        if m == 0 {
            return Vec::new();
        }
        let ok = |p: &Part, s: Source| p.model_id == self.id && p.source == s;
        // The constant part of every row: the user fields and u.
        let mut template = vec![0f32; self.input_width];
        let mut from = 0;
        for (f, s) in self.features.iter().zip(&self.sources) {
            match s {
                Source::User if ok(user, Source::User) => {
                    if let Some(x) = user.raw.get(from..from + f.width) {
                        template[f.offset..f.offset + f.width].copy_from_slice(x);
                    }
                    from += f.width;
                }
                Source::Cross(Cross::UserVector) => {
                    copy_prefix(u, &mut template[f.offset..f.offset + f.width])
                }
                _ => {}
            }
        }
        let folded = self.fold(&template, u, history);
        let folded_graph = match folded {
            None => self.fold_graph(&template, u, history),
            Some(_) => None,
        };
        let unfolded;
        let (width, puts, template): (usize, &[Option<Put>], Option<&[f32]>) =
            match (&folded, &folded_graph) {
                (Some(f), _) => (f.width, &f.puts, None),
                (None, Some(g)) => (g.width, &g.puts, None),
                (None, None) => {
                    unfolded = self.unfolded_puts();
                    (self.input_width, &unfolded, Some(&template))
                }
            };
        // Target attention of every candidate at once (matrix products), the candidates split
        // over the threads: its output (`aw` per candidate), or its weights when folded.
        let vs = || -> Vec<&[f32]> { items.iter().map(|(_, v)| *v).collect() };
        let (attention, aw) = match puts
            .iter()
            .flatten()
            .find(|p| matches!(p, Put::Attention(_) | Put::AttentionWeights(..)))
        {
            Some(Put::Attention(_)) => (
                split_rows(&vs(), threads, m, |c| self.attend_rows(history, c)),
                self.attention.as_ref().map_or(0, |a| a.d),
            ),
            Some(Put::AttentionWeights(_, n)) if *n > 0 => (
                split_rows(&vs(), threads, m, |c| {
                    self.attention_weights_rows(history, c)
                }),
                *n,
            ),
            _ => (Vec::new(), 0),
        };
        // Rows are written straight into one buffer per thread.
        let threads = if width == 0 { 1 } else { threads.clamp(1, m) };
        let per = m.div_ceil(threads);
        let mut bufs: Vec<Vec<f32>> = Vec::with_capacity(threads);
        for (i, (part, v)) in items.iter().enumerate() {
            if i % per == 0 {
                bufs.push(Vec::with_capacity(per.min(m - i) * width));
            }
            let raw = bufs.last_mut().expect("pushed above");
            let start = raw.len();
            match template {
                Some(t) => raw.extend_from_slice(t),
                None => raw.resize(start + width, 0.0),
            }
            let row = &mut raw[start..];
            let item = if ok(part, Source::Item) {
                part.raw.as_slice()
            } else {
                &[]
            };
            for (f, put) in self.features.iter().zip(puts) {
                match put {
                    None => {}
                    Some(Put::Item(o, from)) => {
                        if let Some(x) = item.get(*from..*from + f.width) {
                            row[*o..*o + f.width].copy_from_slice(x);
                        }
                    }
                    Some(Put::Vector(o)) => copy_prefix(v, &mut row[*o..*o + f.width]),
                    Some(Put::Product(o)) => {
                        for ((d, a), b) in row[*o..*o + f.width].iter_mut().zip(u).zip(*v) {
                            *d = a * b;
                        }
                    }
                    Some(Put::Scalar(o, c)) => row[*o] = scalar(i, *c),
                    // aw is the put's width: d for the output, n for the weights.
                    Some(Put::Attention(o) | Put::AttentionWeights(o, _)) => {
                        if let Some(a) = attention.get(i * aw..(i + 1) * aw) {
                            row[*o..*o + aw].copy_from_slice(a);
                        }
                    }
                }
            }
        }
        let run = |b: Vec<f32>| -> Vec<f32> {
            let rows = b.len().checked_div(width).unwrap_or(m);
            match (&folded, &folded_graph, &self.graph) {
                (Some(f), _, _) => {
                    let h = linear(&b, rows, f.width, &f.weight, Some(&f.bias), f.n_out);
                    run_layers(self, h, rows, f.n_out, &[], 1)
                }
                (None, Some(fg), Some(g)) => {
                    crate::graph::run_folded(self, g, &b, fg.width, rows, &fg.nodes, &fg.skip)
                }
                _ => run_raw(self, b, rows),
            }
        };
        if bufs.len() <= 1 {
            return run(bufs.pop().unwrap_or_default());
        }
        std::thread::scope(|sc| {
            let handles: Vec<_> = bufs.into_iter().map(|b| sc.spawn(|| run(b))).collect();
            let mut out = Vec::with_capacity(m * self.output_dim);
            for h in handles {
                match h.join() {
                    Ok(v) => out.extend_from_slice(&v),
                    Err(e) => std::panic::resume_unwind(e),
                }
            }
            out
        })
    }

    /// Whether [`Model::forward_rows`] folds the request's constants for this model, user
    /// vector and history (tests check which path their models take).
    #[doc(hidden)]
    pub fn rows_fold(&self, u: &[f32], history: &crate::attention::HistoryKeys) -> bool {
        let template = vec![0f32; self.input_width];
        self.fold(&template, u, history).is_some()
            || self.fold_graph(&template, u, history).is_some()
    }

    /// Where each feature goes in an unfolded raw row (the user side is in the template).
    fn unfolded_puts(&self) -> Vec<Option<Put>> {
        let mut from = 0;
        self.features
            .iter()
            .zip(&self.sources)
            .map(|(f, s)| match s {
                Source::User => None,
                Source::Item => {
                    from += f.width;
                    Some(Put::Item(f.offset, from - f.width))
                }
                Source::Cross(c) => match c.shape() {
                    CrossShape::UserVector => None,
                    CrossShape::ItemVector => Some(Put::Vector(f.offset)),
                    CrossShape::Product => Some(Put::Product(f.offset)),
                    CrossShape::Attention => Some(Put::Attention(f.offset)),
                    CrossShape::Scalar => Some(Put::Scalar(f.offset, *c)),
                },
            })
            .collect()
    }

    /// The varying columns of a folded row (item fields, one block over v, scalars, the
    /// attention's): their width and where each feature goes (`None`: folded into a bias).
    /// `None` when a vector input is not as wide as `u` (the unfolded path pads it).
    fn varying(
        &self,
        u: &[f32],
        history: &crate::attention::HistoryKeys,
    ) -> Option<(usize, Vec<Option<Put>>)> {
        let vector_ok = self
            .features
            .iter()
            .zip(&self.sources)
            .all(|(f, s)| match s {
                Source::Cross(c) if c.is_vector() => f.width == u.len(),
                _ => true,
            });
        if !vector_ok {
            return None;
        }
        let mut width = 0;
        let mut vblock = None;
        let mut from = 0;
        let mut puts = Vec::with_capacity(self.features.len());
        for (f, s) in self.features.iter().zip(&self.sources) {
            let put = match s {
                Source::User => None,
                Source::Item => {
                    width += f.width;
                    from += f.width;
                    Some(Put::Item(width - f.width, from - f.width))
                }
                Source::Cross(c) => match c.shape() {
                    CrossShape::UserVector => None,
                    CrossShape::ItemVector | CrossShape::Product => {
                        let o = *vblock.get_or_insert_with(|| {
                            width += u.len();
                            width - u.len()
                        });
                        Some(Put::Vector(o))
                    }
                    CrossShape::Attention => {
                        // (W·Hᵀ)·α reads n columns instead of d: folded when that is not more.
                        let n = if self.keys_fit(history) { history.n } else { 0 };
                        if n <= f.width {
                            width += n;
                            Some(Put::AttentionWeights(width - n, n))
                        } else {
                            width += f.width;
                            Some(Put::Attention(width - f.width))
                        }
                    }
                    CrossShape::Scalar => {
                        width += 1;
                        Some(Put::Scalar(width - 1, *c))
                    }
                },
            };
            puts.push(put);
        }
        Some((width, puts))
    }

    /// Folds the weights `src` of one output over feature `fi`'s field into that output's row
    /// `out` of the varying columns and its bias (the request's constants: `template`, `u`,
    /// the history's vectors).
    #[allow(clippy::too_many_arguments)]
    fn fold_feature(
        &self,
        fi: usize,
        put: &Option<Put>,
        src: &[f32],
        template: &[f32],
        u: &[f32],
        history: &crate::attention::HistoryKeys,
        out: &mut [f32],
        bias: &mut f32,
    ) {
        let f = &self.features[fi];
        match (&self.sources[fi], put) {
            (_, None) => {
                let x = &template[f.offset..f.offset + f.width];
                *bias += src.iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
            }
            (Source::Cross(Cross::Product), Some(Put::Vector(at))) => {
                for ((d, a), b) in out[*at..*at + f.width].iter_mut().zip(src).zip(u) {
                    *d += a * b;
                }
            }
            (_, Some(Put::Vector(at))) => {
                for (d, a) in out[*at..*at + f.width].iter_mut().zip(src) {
                    *d += a;
                }
            }
            // Added, not copied: a graph node may read a feature twice (directly and through a
            // scene gate).
            (_, Some(Put::Item(at, _) | Put::Scalar(at, _) | Put::Attention(at))) => out
                [*at..*at + f.width]
                .iter_mut()
                .zip(src)
                .for_each(|(d, a)| *d += a),
            (_, Some(Put::AttentionWeights(at, n))) => {
                // Column j is W·h_j.
                for (j, h) in history
                    .values
                    .chunks_exact(f.width.max(1))
                    .take(*n)
                    .enumerate()
                {
                    out[*at + j] += src.iter().zip(h).map(|(a, b)| a * b).sum::<f32>();
                }
            }
            (_, Some(Put::Product(_))) => unreachable!("a folded row has no product columns"),
        }
    }

    /// A linear map `w` (`[n_out, n_in]`, bias `b`) over fields at `fields` (each a feature
    /// index and its offset among the map's inputs) folded over the varying columns.
    #[allow(clippy::too_many_arguments)]
    fn fold_map(
        &self,
        w: &[f32],
        b: Option<&[f32]>,
        (n_in, n_out): (usize, usize),
        fields: &[Scaled],
        (width, puts): (usize, &[Option<Put>]),
        template: &[f32],
        u: &[f32],
        history: &crate::attention::HistoryKeys,
    ) -> crate::graph::FoldedNode {
        let mut bias = b.map_or_else(|| vec![0f32; n_out], <[f32]>::to_vec);
        let mut weight = vec![0f32; n_out * width];
        let mut scaled = Vec::new();
        for o in 0..n_out {
            let wo = &w[o * n_in..(o + 1) * n_in];
            let out = &mut weight[o * width..(o + 1) * width];
            for (fi, at, factors) in fields {
                let mut src = &wo[*at..*at + self.features[*fi].width];
                // A field through a scene gate: W·(x ⊙ f) = (W·diag(f))·x.
                if let Some(f) = factors {
                    scaled.clear();
                    scaled.extend(src.iter().zip(f).map(|(a, b)| a * b));
                    src = &scaled;
                }
                self.fold_feature(
                    *fi,
                    &puts[*fi],
                    src,
                    template,
                    u,
                    history,
                    out,
                    &mut bias[o],
                );
            }
        }
        crate::graph::FoldedNode {
            weight,
            bias,
            n_out,
        }
    }

    /// The first layer with the request's constants folded in, when the model allows it.
    fn fold(
        &self,
        template: &[f32],
        u: &[f32],
        history: &crate::attention::HistoryKeys,
    ) -> Option<Folded> {
        let (w, b, n_in, n_out) = match self.layers.first() {
            Some(Layer::Linear { w, b, n_in, n_out })
                if self.senet.is_none() && !self.has_shortcut =>
            {
                (*w, *b, *n_in, *n_out)
            }
            _ => return None,
        };
        if n_in != self.input_width {
            return None;
        }
        let (width, puts) = self.varying(u, history)?;
        let fields: Vec<Scaled> = self
            .features
            .iter()
            .enumerate()
            .map(|(i, f)| (i, f.offset, None))
            .collect();
        let fm = self.fold_map(
            &self.tensors[w],
            b.map(|b| self.tensors[b].as_slice()),
            (n_in, n_out),
            &fields,
            (width, &puts),
            template,
            u,
            history,
        );
        Some(Folded {
            width,
            puts,
            weight: fm.weight,
            bias: fm.bias,
            n_out,
        })
    }

    /// A graph model folded the same way, when every node that reads fields is a stack over
    /// fields only that starts with a linear layer, or a gate whose gate inputs are fields (its
    /// logits are linear in them): each such node's map is folded over the varying columns.
    fn fold_graph(
        &self,
        template: &[f32],
        u: &[f32],
        history: &crate::attention::HistoryKeys,
    ) -> Option<FoldedGraph> {
        let g = self.graph.as_ref()?;
        if self.senet.is_some() {
            return None;
        }
        // A field input's feature, by its offset.
        let feature_at = |offset: usize| self.features.iter().position(|f| f.offset == offset);
        let constant = |fi: usize| {
            matches!(
                self.sources[fi],
                Source::User | Source::Cross(Cross::UserVector)
            )
        };
        // A scene gate whose gate reads only the request's constants scales its inputs by
        // constant factors: it is not computed, the nodes reading it fold its fields scaled.
        let mut through: Vec<Option<Vec<Scaled>>> = vec![None; g.nodes.len()];
        // The fields of inputs (fields, or scene gates folded away), at their offsets among them.
        let fields_of =
            |inputs: &[Input], through: &[Option<Vec<Scaled>>]| -> Option<Vec<Scaled>> {
                let mut at = 0;
                let mut out = Vec::with_capacity(inputs.len());
                for i in inputs {
                    match *i {
                        Input::Field { offset, width } => {
                            let fi = feature_at(offset)
                                .filter(|&fi| self.features[fi].width == width)?;
                            out.push((fi, at, None));
                            at += width;
                        }
                        Input::Node { index, width } => {
                            for (fi, o, f) in through[index].as_ref()? {
                                out.push((*fi, at + o, f.clone()));
                            }
                            at += width;
                        }
                    }
                }
                Some(out)
            };
        let reads_fields = |inputs: &[Input], through: &[Option<Vec<Scaled>>]| {
            inputs.iter().any(|i| match *i {
                Input::Field { .. } => true,
                Input::Node { index, .. } => through[index].is_some(),
            })
        };
        let (width, puts) = self.varying(u, history)?;
        let mut nodes = Vec::with_capacity(g.nodes.len());
        for (ni, node) in g.nodes.iter().enumerate() {
            if let Op::Scale { w, b, n } = &node.op {
                let (xs, gs) = node
                    .inputs
                    .split_at(node.inputs.len() - gate_count(node, *n));
                let xf = fields_of(xs, &through)?;
                let gf = fields_of(gs, &through)?;
                if ni == g.output
                    || xf.iter().any(|x| x.2.is_some())
                    || gf.iter().any(|(fi, _, f)| f.is_some() || !constant(*fi))
                {
                    return None;
                }
                // f = 2σ(W·g + b), g the gate's constant fields.
                let gv: Vec<f32> = gf
                    .iter()
                    .flat_map(|(fi, _, _)| {
                        let f = &self.features[*fi];
                        template[f.offset..f.offset + f.width].iter().copied()
                    })
                    .collect();
                let mut z = vec![0f32; *n];
                crate::layers::matvec(
                    &self.tensors[*w],
                    b.map(|b| self.tensors[b].as_slice()),
                    &gv,
                    *n,
                    &mut z,
                );
                let factors: Vec<f32> =
                    z.iter().map(|v| 2.0 * crate::layers::sigmoid(*v)).collect();
                through[ni] = Some(
                    xf.into_iter()
                        .map(|(fi, at, _)| {
                            let w = self.features[fi].width;
                            (fi, at, Some(factors[at..at + w].to_vec()))
                        })
                        .collect(),
                );
                nodes.push(None);
                continue;
            }
            if !reads_fields(&node.inputs, &through) {
                nodes.push(None);
                continue;
            }
            let folded = match &node.op {
                Op::Stack(layers) => match layers.first() {
                    Some(Layer::Linear { w, b, n_in, n_out }) if *n_in == node.in_width => {
                        let fields = fields_of(&node.inputs, &through)?;
                        self.fold_map(
                            &self.tensors[*w],
                            b.map(|b| self.tensors[b].as_slice()),
                            (*n_in, *n_out),
                            &fields,
                            (width, &puts),
                            template,
                            u,
                            history,
                        )
                    }
                    _ => return None,
                },
                Op::Gate { w, b, k, d } => {
                    let (experts, gate) = node.inputs.split_at(*k);
                    if reads_fields(experts, &through) {
                        return None;
                    }
                    let fields = fields_of(gate, &through)?;
                    self.fold_map(
                        &self.tensors[*w],
                        b.map(|b| self.tensors[b].as_slice()),
                        (node.in_width - k * d, *k),
                        &fields,
                        (width, &puts),
                        template,
                        u,
                        history,
                    )
                }
                _ => return None,
            };
            nodes.push(Some(folded));
        }
        let skip = through.iter().map(Option::is_some).collect();
        Some(FoldedGraph {
            width,
            puts,
            nodes,
            skip,
        })
    }
}

/// A graph model's folded nodes (`None` for the nodes that read only other nodes) over the
/// varying columns.
struct FoldedGraph {
    width: usize,
    puts: Vec<Option<Put>>,
    nodes: Vec<Option<crate::graph::FoldedNode>>,
    /// The scene gates folded into the nodes that read them (not computed).
    skip: Vec<bool>,
}

/// A field among a map's inputs: its feature, its offset there, and the constant factors a
/// scene gate scales it by.
type Scaled = (usize, usize, Option<Vec<f32>>);

/// How many of a scale node's inputs are its gate inputs (its scaled inputs are `n` wide).
fn gate_count(node: &crate::graph::Node, n: usize) -> usize {
    let mut at = 0;
    for (i, input) in node.inputs.iter().enumerate() {
        if at == n {
            return node.inputs.len() - i;
        }
        at += input.width();
    }
    0
}

/// `f` over the rows `vs` split into `threads` parts on scoped threads (one part: this
/// thread), the parts' outputs concatenated in order.
fn split_rows(
    vs: &[&[f32]],
    threads: usize,
    m: usize,
    f: impl Fn(&[&[f32]]) -> Vec<f32> + Sync,
) -> Vec<f32> {
    let per = m.div_ceil(threads.clamp(1, m.max(1)));
    if per >= m {
        return f(vs);
    }
    std::thread::scope(|sc| {
        let f = &f;
        let hs: Vec<_> = vs.chunks(per).map(|c| sc.spawn(move || f(c))).collect();
        let mut out = Vec::new();
        for h in hs {
            match h.join() {
                Ok(v) => out.extend_from_slice(&v),
                Err(e) => std::panic::resume_unwind(e),
            }
        }
        out
    })
}

/// Copies as much of `src` as fits into `dst` (the rest stays as it is).
fn copy_prefix(src: &[f32], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    dst[..n].copy_from_slice(&src[..n]);
}
