//! The loaded model: spec bound to its tensors, every shape and width checked.

use crate::encode::Field;
use crate::error::{Result, TowerError};
use crate::graph::{Graph, Input, Node, Op};
use crate::safetensors::{self, TensorView};
pub(crate) use crate::spec::FeatureKind;
use crate::spec::{self, spec_err, LayerDraft, SpecDraft, MAX_WIDTH};
use crate::spec::{CombineKind, GraphDraft, InputRef, OpDraft};
use crate::spec::{Cross, Source};
use crate::{Kind, Metric};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_MODEL_ID: AtomicU64 = AtomicU64::new(1);

/// An embedding table: `rows × dim` floats in tensor `tensor`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Table {
    pub tensor: usize,
    pub dim: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct Feature {
    pub name: String,
    pub kind: FeatureKind<Table>,
    /// Position and width of this feature's field in the concatenated input.
    pub offset: usize,
    pub width: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct Senet {
    pub w1: usize,
    pub b1: Option<usize>,
    pub w2: usize,
    pub b2: Option<usize>,
    pub r: usize,
}

#[derive(Debug, Clone)]
#[allow(clippy::enum_variant_names)]
pub(crate) enum Layer {
    Linear {
        w: usize,
        b: Option<usize>,
        n_in: usize,
        n_out: usize,
    },
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
    LayerNorm {
        w: usize,
        b: usize,
        eps: f64,
    },
    BatchNorm {
        w: usize,
        b: usize,
        mean: usize,
        /// 1/sqrt(running_var + eps), precomputed in f64.
        inv_std: Vec<f32>,
    },
    /// (offset, width) ranges of the raw input appended to h.
    Shortcut {
        ranges: Vec<(usize, usize)>,
    },
    L2Normalize,
}

/// The encoded fields of one side (the request's or one item's) of a pre-rank model's input:
/// made by [`Model::encode_part`], combined by [`Model::assemble`] of the same model.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub(crate) model_id: u64,
    pub(crate) source: Source,
    pub(crate) fields: Vec<Field>,
    /// The fields written out as the model's input reads them, one after the other in
    /// feature order (each its width): what a row copies, without a lookup per field.
    pub(crate) raw: Vec<f32>,
}

impl Part {
    /// Approximate heap size (for caches).
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Part>()
            + self
                .fields
                .iter()
                .map(|f| {
                    std::mem::size_of::<Field>()
                        + match f {
                            Field::Bag { rows, weights } => {
                                rows.len() * 4 + weights.as_ref().map_or(0, |w| w.len() * 4)
                            }
                            Field::Dense(Some(v)) => v.len() * 4,
                            _ => 0,
                        }
                })
                .sum::<usize>()
            + self.raw.len() * 4
    }

    /// Reads one value per 64-byte line of the part's row values (what a forward pass copies
    /// into its rows) and returns their sum. A caller about to score a batch of parts that
    /// lie scattered in memory (a cache's) reads them all this way first: the reads of
    /// different parts overlap, where the forward pass would wait for each in turn.
    pub fn touch(&self) -> f32 {
        self.raw.iter().step_by(16).sum()
    }
}

/// A loaded tower. Immutable after [`Model::load`]; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Model {
    pub(crate) id: u64,
    pub(crate) kind: Kind,
    /// Where each feature's input comes from (in feature order).
    pub(crate) sources: Vec<Source>,
    pub(crate) metric: Metric,
    pub(crate) output_dim: usize,
    pub(crate) features: Vec<Feature>,
    pub(crate) by_name: HashMap<String, usize>,
    pub(crate) input_width: usize,
    pub(crate) senet: Option<Senet>,
    pub(crate) layers: Vec<Layer>,
    /// The graph of nodes that replaces `layers` (which is then empty).
    pub(crate) graph: Option<crate::graph::Graph>,
    pub(crate) has_shortcut: bool,
    /// The target attention input of a pre-rank model.
    pub(crate) attention: Option<crate::attention::TargetAttention>,
    pub(crate) tensors: Vec<Vec<f32>>,
    pub(crate) tensor_names: Vec<String>,
    /// A multi-task pre-rank model's tasks, one per output element (empty: one score).
    pub(crate) tasks: Vec<crate::spec::Task>,
}

/// What a multi-task model's stage ranks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreBy {
    Fused,
    /// A task's index.
    Task(usize),
}

/// A dimension of an expected shape.
#[derive(Clone, Copy)]
enum Dim {
    Is(usize),
    /// Free, at least 1, with a letter for messages.
    Any(&'static str),
}

/// Binds spec tensor names to the parsed safetensors, checking shapes; shared names are bound once.
struct Binder {
    pending: HashMap<String, TensorView>,
    index: HashMap<String, usize>,
    tensors: Vec<Vec<f32>>,
    shapes: Vec<Vec<usize>>,
    names: Vec<String>,
}

fn render(expected: &[Dim]) -> String {
    let parts: Vec<String> = expected
        .iter()
        .map(|d| match d {
            Dim::Is(n) => n.to_string(),
            Dim::Any(l) => (*l).to_string(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

impl Binder {
    /// Binds `name`, checks its shape, returns (tensor index, actual shape).
    fn bind(&mut self, name: &str, expected: &[Dim]) -> Result<(usize, Vec<usize>)> {
        let idx = match self.index.get(name) {
            Some(&i) => i,
            None => {
                let Some(t) = self.pending.remove(name) else {
                    return Err(TowerError::MissingTensor {
                        name: name.to_owned(),
                    });
                };
                if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                    return Err(TowerError::NonFiniteWeight {
                        name: name.to_owned(),
                        index: i,
                    });
                }
                let i = self.tensors.len();
                self.tensors.push(t.data);
                self.shapes.push(t.shape);
                self.names.push(t.name);
                self.index.insert(name.to_owned(), i);
                i
            }
        };
        let got = &self.shapes[idx];
        let ok = got.len() == expected.len()
            && got.iter().zip(expected).all(|(g, e)| match e {
                Dim::Is(n) => g == n,
                Dim::Any(_) => *g >= 1,
            });
        if !ok {
            return Err(TowerError::TensorShape {
                name: name.to_owned(),
                expected: render(expected),
                got: got.clone(),
            });
        }
        Ok((idx, got.clone()))
    }

    fn table(&mut self, name: &str, lookup_rows: u64) -> Result<Table> {
        let rows = usize::try_from(lookup_rows).unwrap_or(usize::MAX);
        let (tensor, shape) = self.bind(name, &[Dim::Is(rows), Dim::Any("d")])?;
        Ok(Table {
            tensor,
            dim: shape[1],
        })
    }
}

fn width_check(path: String, width: usize) -> Result<()> {
    if width > MAX_WIDTH {
        return Err(spec_err(
            path,
            format!("the vector is {width} wide here, more than the limit of {MAX_WIDTH}"),
        ));
    }
    Ok(())
}

/// Every method of a model is here; the work is done by the functions of `encode`, `forward`
/// and `layers`.
impl Model {
    /// Parses and validates a spec and its safetensors weights. Every error is reported with the
    /// offending spec path, tensor or limit; nothing in the inputs can make this panic.
    pub fn load(spec_json: &str, safetensors_bytes: &[u8]) -> Result<Model> {
        let draft: SpecDraft = spec::parse_spec(spec_json)?;
        let views = safetensors::parse(safetensors_bytes)?;
        let mut pending = HashMap::with_capacity(views.len());
        for v in views {
            pending.insert(v.name.clone(), v);
        }
        let mut b = Binder {
            pending,
            index: HashMap::new(),
            tensors: Vec::new(),
            shapes: Vec::new(),
            names: Vec::new(),
        };

        // Features -> fields.
        let mut features = Vec::with_capacity(draft.features.len());
        let mut offset = 0usize;
        for (name, f) in draft.names.iter().zip(draft.features) {
            let kind = f.bind(|embedding, rows| b.table(&embedding, rows))?;
            let width = match &kind {
                FeatureKind::Categorical { table, .. }
                | FeatureKind::Multi { table, .. }
                | FeatureKind::Bucketize { table, .. } => table.dim,
                FeatureKind::Numeric { .. } => 1,
                FeatureKind::Dense { dim } => *dim,
            };
            features.push(Feature {
                name: name.clone(),
                kind,
                offset,
                width,
            });
            // Each width is <= the file size, so this cannot overflow before the check trips.
            offset = offset.saturating_add(width);
            width_check("features".into(), offset)?;
        }
        let input_width = offset;
        let nf = features.len();

        let senet = match draft.senet {
            None => None,
            Some(s) => {
                let (w1, shape) = b.bind(&s.w1, &[Dim::Any("r"), Dim::Is(nf)])?;
                let r = shape[0];
                let b1 = match &s.b1 {
                    Some(n) => Some(b.bind(n, &[Dim::Is(r)])?.0),
                    None => None,
                };
                let (w2, _) = b.bind(&s.w2, &[Dim::Is(nf), Dim::Is(r)])?;
                let b2 = match &s.b2 {
                    Some(n) => Some(b.bind(n, &[Dim::Is(nf)])?.0),
                    None => None,
                };
                Some(Senet { w1, b1, w2, b2, r })
            }
        };

        let attention = match draft.attention {
            None => None,
            Some((feature, q, k)) => {
                let d = features[feature].width;
                let (query, shape) = b.bind(&q, &[Dim::Any("r"), Dim::Is(d)])?;
                let r = shape[0];
                let (key, _) = b.bind(&k, &[Dim::Is(r), Dim::Is(d)])?;
                Some(crate::attention::TargetAttention {
                    feature,
                    query,
                    key,
                    r,
                    d,
                })
            }
        };

        let (layers, mut width, has_shortcut) =
            bind_layers(&mut b, draft.layers, input_width, &features, "layers")?;
        let graph = match draft.graph {
            None => None,
            Some(g) => {
                let g = bind_graph(&mut b, g, &features)?;
                width = g.output_width();
                Some(g)
            }
        };
        if width != draft.output_dim {
            return Err(spec_err(
                "output.dim",
                format!(
                    "is {}, but the {} produces a vector of width {width}",
                    draft.output_dim,
                    if graph.is_some() {
                        "graph's output node"
                    } else {
                        "layer stack"
                    }
                ),
            ));
        }

        // Anything left in the file that the spec did not name is a stray tensor.
        if let Some(name) = {
            let mut left: Vec<&String> = b.pending.keys().collect();
            left.sort();
            left.first().map(|s| (*s).clone())
        } {
            return Err(TowerError::StrayTensor { name });
        }

        let by_name = features
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), i))
            .collect();
        Ok(Model {
            id: NEXT_MODEL_ID.fetch_add(1, Ordering::Relaxed),
            kind: draft.kind,
            sources: draft.sources,
            metric: draft.metric,
            output_dim: draft.output_dim,
            features,
            by_name,
            input_width,
            senet,
            layers,
            graph,
            has_shortcut,
            attention,
            tensors: b.tensors,
            tensor_names: b.names,
            tasks: draft.tasks,
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// A multi-task pre-rank model's tasks, in output order (empty for a one-score model).
    pub fn tasks(&self) -> &[crate::spec::Task] {
        &self.tasks
    }

    /// What a stage ranks by, from a name: `None` or `"fused"` the fused score (the only
    /// score of a one-score model), else a task's index. `None` back for an unknown task.
    pub fn score_by(&self, name: Option<&str>) -> Option<ScoreBy> {
        match name {
            None | Some("fused") => Some(ScoreBy::Fused),
            Some(n) => self
                .tasks
                .iter()
                .position(|t| t.name == n)
                .map(ScoreBy::Task),
        }
    }

    /// The scores of `m` output rows (`m × output_dim`, as the forward pass returns them):
    /// a one-score model's outputs as they are; a multi-task model's task `t` as its link of
    /// the output, or the fused score Σ fuse·link(output) (in f64).
    pub fn scores(&self, out: &[f32], by: ScoreBy) -> Vec<f32> {
        if self.tasks.is_empty() {
            return out.to_vec();
        }
        let n = self.tasks.len();
        out.chunks_exact(n)
            .map(|row| match by {
                ScoreBy::Task(t) => self.tasks[t].link.apply(row[t]),
                ScoreBy::Fused => self
                    .tasks
                    .iter()
                    .zip(row)
                    .map(|(t, &x)| t.fuse as f64 * t.link.apply(x) as f64)
                    .sum::<f64>() as f32,
            })
            .collect()
    }

    pub fn output_dim(&self) -> usize {
        self.output_dim
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// Width of the concatenated input fields (before SENet and the layers).
    pub fn input_width(&self) -> usize {
        self.input_width
    }

    /// Approximate heap size: weights, vocabulary maps, per-feature and per-layer data.
    pub fn memory_bytes(&self) -> usize {
        let weights: usize = self.tensors.iter().map(|t| t.len() * 4).sum();
        let names: usize = self.tensor_names.iter().map(|n| n.len() + 24).sum();
        let feats: usize = self
            .features
            .iter()
            .map(|f| {
                std::mem::size_of::<Feature>()
                    + f.name.len() * 2
                    + 64
                    + match &f.kind {
                        FeatureKind::Categorical { lookup, .. }
                        | FeatureKind::Multi { lookup, .. } => lookup.heap_bytes(),
                        FeatureKind::Bucketize { boundaries, .. } => boundaries.len() * 8,
                        _ => 0,
                    }
            })
            .sum();
        let layers: usize = self
            .layers
            .iter()
            .chain(self.graph.iter().flat_map(|g| g.layers()))
            .map(|l| {
                std::mem::size_of::<Layer>()
                    + match l {
                        Layer::BatchNorm { inv_std, .. } => inv_std.len() * 4,
                        Layer::Shortcut { ranges } => ranges.len() * 16,
                        _ => 0,
                    }
            })
            .sum();
        std::mem::size_of::<Model>() + weights + names + feats + layers
    }

    /// Feature names in spec order.
    pub fn feature_names(&self) -> Vec<&str> {
        self.features.iter().map(|f| f.name.as_str()).collect()
    }

    /// Whether the spec gives feature `name` an explicit default (only numeric features can
    /// have one). A source that lacks a column for a feature without a default is an error for
    /// a bulk refresh: every item would silently get the same "missing" input.
    pub fn feature_has_default(&self, name: &str) -> bool {
        self.features.iter().any(|f| {
            f.name == name
                && matches!(
                    f.kind,
                    FeatureKind::Numeric {
                        has_default: true,
                        ..
                    }
                )
        })
    }

    /// Number of weights (each distinct tensor counted once).
    pub fn parameter_count(&self) -> usize {
        self.tensors.iter().map(Vec::len).sum()
    }

    /// Parses one input object into an encoded, owned example. With `strict`, keys of `input`
    /// that are not features are an error ([`TowerError::UnknownFeature`]); otherwise they are
    /// ignored (item rows from `to_jsonb(row)` carry extra columns).
    pub fn encode(&self, input: &serde_json::Value, strict: bool) -> Result<crate::Encoded> {
        crate::encode::encode(self, input, strict)
    }

    /// Each feature's name and source, in spec order.
    pub fn sources(&self) -> impl Iterator<Item = (&str, Source)> + '_ {
        self.features
            .iter()
            .zip(&self.sources)
            .map(|(f, s)| (f.name.as_str(), *s))
    }

    /// The width of a cross input `c` the model asks for (`None` if it does not use it).
    pub fn cross_width(&self, c: Cross) -> Option<usize> {
        self.features
            .iter()
            .zip(&self.sources)
            .find(|(_, s)| **s == Source::Cross(c))
            .map(|(f, _)| f.width)
    }

    /// Encodes the features of one side (`Source::User`: the request's features object;
    /// `Source::Item`: an item's row) of a pre-rank model. With `strict`, a key of `input` that
    /// is not a feature of that side is an error. Any other source gives an empty part.
    pub fn encode_part(
        &self,
        input: &serde_json::Value,
        source: Source,
        strict: bool,
    ) -> Result<Part> {
        let fields = match source {
            Source::User | Source::Item => {
                crate::encode::encode_where(self, input, strict, |i| self.sources[i] == source)?
            }
            Source::Cross(_) => Vec::new(),
        };
        let side = self
            .features
            .iter()
            .zip(&self.sources)
            .filter(|(_, s)| **s == source);
        let mut raw = vec![0f32; side.clone().map(|(f, _)| f.width).sum()];
        let mut at = 0;
        for ((f, _), field) in side.zip(&fields) {
            crate::forward::write_field_at(self, f, field, &mut raw[at..at + f.width]);
            at += f.width;
        }
        Ok(Part {
            model_id: self.id,
            source,
            fields,
            raw,
        })
    }

    /// One example of a pre-rank model: the user part, the item part, and each cross input
    /// written by `cross(c, out)` into a zeroed buffer of the input's width. A part from
    /// another model or side contributes nothing (zeros).
    pub fn assemble(
        &self,
        user: &Part,
        item: &Part,
        cross: &mut dyn FnMut(Cross, &mut [f32]),
    ) -> crate::Encoded {
        let ok = |p: &Part, s: Source| p.model_id == self.id && p.source == s;
        let mut u = user.fields.iter().filter(|_| ok(user, Source::User));
        let mut it = item.fields.iter().filter(|_| ok(item, Source::Item));
        let mut fields = Vec::with_capacity(self.features.len());
        for (f, s) in self.features.iter().zip(&self.sources) {
            let field = match s {
                Source::User => u.next().cloned(),
                Source::Item => it.next().cloned(),
                Source::Cross(c) => {
                    let mut buf = vec![0f32; f.width];
                    cross(*c, &mut buf);
                    Some(Field::Dense(Some(buf)))
                }
            };
            fields.push(field.unwrap_or(Field::Dense(None)));
        }
        crate::Encoded {
            model_id: self.id,
            fields,
        }
    }

    /// Forward pass of one encoded example; returns `output_dim` floats.
    pub fn forward(&self, x: &crate::Encoded) -> Vec<f32> {
        crate::forward::run(self, std::slice::from_ref(x))
    }

    /// Forward pass of many examples (sgemm over the batch for the linear layers); returns
    /// `xs.len() * output_dim` floats, row-major.
    pub fn forward_batch(&self, xs: &[crate::Encoded]) -> Vec<f32> {
        crate::forward::run(self, xs)
    }

    /// Convenience: `encode(input, strict = true)` then `forward`; a non-finite output (f32
    /// overflow from extreme inputs or weights) is an error.
    pub fn embed(&self, input: &serde_json::Value) -> Result<Vec<f32>> {
        self.embed_with(input, true)
    }

    /// [`Model::embed`] with the strictness of [`Model::encode`] chosen by the caller (a
    /// model set to ignore unknown feature keys).
    pub fn embed_with(&self, input: &serde_json::Value, strict: bool) -> Result<Vec<f32>> {
        let x = self.encode(input, strict)?;
        let out = self.forward(&x);
        if let Some(index) = out.iter().position(|v| !v.is_finite()) {
            return Err(TowerError::NonFiniteOutput { index });
        }
        Ok(out)
    }
}

/// Binds a layer stack that reads `width` inputs; returns the layers, the output width and
/// whether a shortcut layer is among them. `path` names the stack in errors.
fn bind_layers(
    b: &mut Binder,
    drafts: Vec<LayerDraft>,
    mut width: usize,
    features: &[Feature],
    path: &str,
) -> Result<(Vec<Layer>, usize, bool)> {
    let mut layers = Vec::with_capacity(drafts.len());
    let mut has_shortcut = false;
    for (i, l) in drafts.into_iter().enumerate() {
        let layer = match l {
            LayerDraft::Linear { weight, bias } => {
                let (w, shape) = b.bind(&weight, &[Dim::Any("out"), Dim::Is(width)])?;
                let n_out = shape[0];
                width_check(format!("{path}[{i}].weight"), n_out)?;
                let bi = match &bias {
                    Some(n) => Some(b.bind(n, &[Dim::Is(n_out)])?.0),
                    None => None,
                };
                let l = Layer::Linear {
                    w,
                    b: bi,
                    n_in: width,
                    n_out,
                };
                width = n_out;
                l
            }
            LayerDraft::Relu => Layer::Relu,
            LayerDraft::Gelu => Layer::Gelu,
            LayerDraft::Tanh => Layer::Tanh,
            LayerDraft::Sigmoid => Layer::Sigmoid,
            LayerDraft::L2Normalize => Layer::L2Normalize,
            LayerDraft::Dropout => continue,
            LayerDraft::LayerNorm { weight, bias, eps } => Layer::LayerNorm {
                w: b.bind(&weight, &[Dim::Is(width)])?.0,
                b: b.bind(&bias, &[Dim::Is(width)])?.0,
                eps,
            },
            LayerDraft::BatchNorm {
                weight,
                bias,
                running_mean,
                running_var,
                eps,
            } => {
                let w = b.bind(&weight, &[Dim::Is(width)])?.0;
                let bb = b.bind(&bias, &[Dim::Is(width)])?.0;
                let mean = b.bind(&running_mean, &[Dim::Is(width)])?.0;
                let var = b.bind(&running_var, &[Dim::Is(width)])?.0;
                let mut inv_std = Vec::with_capacity(width);
                for (j, &v) in b.tensors[var].iter().enumerate() {
                    let s = v as f64 + eps;
                    let inv = 1.0 / s.sqrt();
                    if s <= 0.0 || !(inv as f32).is_finite() {
                        return Err(TowerError::WeightValue {
                            name: running_var.clone(),
                            index: j,
                            reason: format!(
                                "running_var + eps = {s} must be positive (and not tiny)"
                            ),
                        });
                    }
                    inv_std.push(inv as f32);
                }
                Layer::BatchNorm {
                    w,
                    b: bb,
                    mean,
                    inv_std,
                }
            }
            LayerDraft::Shortcut { fields } => {
                has_shortcut = true;
                let mut ranges = Vec::with_capacity(fields.len());
                for f in fields {
                    let feat = &features[f];
                    ranges.push((feat.offset, feat.width));
                    width = width.saturating_add(feat.width);
                }
                width_check(format!("{path}[{i}].fields"), width)?;
                Layer::Shortcut { ranges }
            }
        };
        layers.push(layer);
    }
    Ok((layers, width, has_shortcut))
}

/// Binds a validated graph: each node's input width, its layers or combine weights, its output
/// width; combines of equal-width inputs (sum, weighted sum, attention) check the widths.
fn bind_graph(b: &mut Binder, g: GraphDraft, features: &[Feature]) -> Result<Graph> {
    let mut nodes: Vec<Node> = Vec::with_capacity(g.nodes.len());
    for d in g.nodes {
        let path = format!("graph[{}]", d.spec_index);
        let inputs: Vec<Input> = d
            .inputs
            .iter()
            .map(|r| match *r {
                InputRef::Feature(f) => Input::Field {
                    offset: features[f].offset,
                    width: features[f].width,
                },
                InputRef::Node(k) => Input::Node {
                    index: k,
                    width: nodes[k].width,
                },
            })
            .collect();
        let widths: Vec<usize> = inputs.iter().map(Input::width).collect();
        let in_width: usize = widths.iter().sum();
        width_check(format!("{path}.inputs"), in_width)?;
        let k = inputs.len();
        let (op, width) = match d.op {
            OpDraft::Stack(layers) => {
                let (layers, width, _) =
                    bind_layers(b, layers, in_width, features, &format!("{path}.layers"))?;
                (Op::Stack(layers), width)
            }
            OpDraft::Combine {
                kind,
                weight,
                bias,
                joined,
            } => {
                // Gate and scale nodes: the joined inputs, then the gate inputs (width g).
                let (widths, g) = widths.split_at(joined);
                let g: usize = g.iter().sum();
                let same = widths.iter().all(|w| *w == widths[0]);
                if !same
                    && matches!(
                        kind,
                        CombineKind::Sum
                            | CombineKind::WeightedSum
                            | CombineKind::Attention
                            | CombineKind::Gate
                    )
                {
                    return Err(spec_err(
                        format!("{path}.inputs"),
                        format!("the inputs of this combine must have one width, got {widths:?}"),
                    ));
                }
                let d0 = widths[0];
                let bind_bias = |b: &mut Binder, n: usize| -> Result<Option<usize>> {
                    match &bias {
                        Some(name) => Ok(Some(b.bind(name, &[Dim::Is(n)])?.0)),
                        None => Ok(None),
                    }
                };
                let weight = weight.unwrap_or_default();
                match kind {
                    CombineKind::Concat => (Op::Concat, in_width),
                    CombineKind::Sum => (Op::Sum, d0),
                    CombineKind::WeightedSum => (
                        Op::WeightedSum {
                            w: b.bind(&weight, &[Dim::Is(k)])?.0,
                        },
                        d0,
                    ),
                    CombineKind::WeightedConcat => (
                        Op::WeightedConcat {
                            w: b.bind(&weight, &[Dim::Is(k)])?.0,
                        },
                        in_width,
                    ),
                    CombineKind::Attention => {
                        let w = b.bind(&weight, &[Dim::Is(k), Dim::Is(in_width)])?.0;
                        let bias = match &bias {
                            Some(n) => Some(b.bind(n, &[Dim::Is(k)])?.0),
                            None => None,
                        };
                        (Op::Attention { w, b: bias }, d0)
                    }
                    CombineKind::Gate => {
                        let w = b.bind(&weight, &[Dim::Is(joined), Dim::Is(g)])?.0;
                        let bias = bind_bias(b, joined)?;
                        (
                            Op::Gate {
                                w,
                                b: bias,
                                k: joined,
                                d: d0,
                            },
                            d0,
                        )
                    }
                    CombineKind::Scale => {
                        let n = in_width - g;
                        let w = b.bind(&weight, &[Dim::Is(n), Dim::Is(g)])?.0;
                        let bias = bind_bias(b, n)?;
                        (Op::Scale { w, b: bias, n }, n)
                    }
                }
            }
        };
        nodes.push(Node {
            inputs,
            op,
            in_width,
            width,
        });
    }
    Ok(Graph {
        nodes,
        output: g.output,
    })
}
