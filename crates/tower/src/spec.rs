//! Structural parsing and validation of the JSON spec (everything that does not need the weights).
//! Shapes and width chaining are checked later, when the tensors are bound (`model.rs`).

use crate::error::{json_type, Result, TowerError};
use crate::{Kind, Metric, SPEC_VERSION};
use serde_json::Value;
use std::collections::HashMap;
use twotower_options::Obj;

pub(crate) const FORMAT: &str = "pg_twotower.tower";
pub(crate) const MAX_FEATURES: usize = 256;
pub(crate) const MAX_LAYERS: usize = 64;
/// The widest vector anywhere in a tower: the one vector limit of pg_twotower.
pub(crate) const MAX_WIDTH: usize = twotower_metric::MAX_DIMS;
pub(crate) const MAX_NAME_LEN: usize = 63;
pub(crate) const MAX_MAX_LEN: u64 = 10_000;
pub(crate) const MAX_DENSE_DIM: u64 = 4096;
/// Hash buckets are limited so that every row index fits in a u32.
pub(crate) const MAX_HASH_BUCKETS: u64 = u32::MAX as u64 - 1;

#[derive(Debug, Clone)]
pub(crate) enum Lookup {
    /// id -> row (1-based; row 0 is OOV).
    Vocab(HashMap<String, u32>),
    Hash(u64),
}

impl Lookup {
    pub(crate) fn rows(&self) -> u64 {
        match self {
            Lookup::Vocab(m) => m.len() as u64 + 1,
            Lookup::Hash(b) => b + 1,
        }
    }

    /// The row of a canonical id string.
    #[inline]
    pub(crate) fn row(&self, id: &str) -> u32 {
        match self {
            Lookup::Vocab(m) => m.get(id).copied().unwrap_or(0),
            Lookup::Hash(b) => (1 + crate::fnv1a64(id.as_bytes()) % b) as u32,
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            // Key bytes + String header + value + hashbrown control/padding, roughly.
            Lookup::Vocab(m) => m.keys().map(|k| k.len() + 24 + 4 + 8).sum::<usize>(),
            Lookup::Hash(_) => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pooling {
    Mean,
    Sum,
    Max,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Transform {
    None,
    Zscore { mean: f64, std: f64 },
    Log1p,
    Minmax { min: f64, max: f64 },
}

impl Transform {
    /// Applies the transform in f64; the caller checks the f32 result is finite.
    pub(crate) fn apply(self, x: f64) -> f64 {
        match self {
            Transform::None => x,
            Transform::Zscore { mean, std } => (x - mean) / std,
            Transform::Log1p => x.max(0.0).ln_1p(),
            Transform::Minmax { min, max } => ((x - min) / (max - min)).clamp(0.0, 1.0),
        }
    }
}

/// What a feature is, with its embedding table referred to by `T`: the tensor's name in a
/// parsed spec ([`FeatureDraft`]), the bound table in a loaded model (`FeatureKind<Table>`).
/// One definition for both, so the spec and the model cannot drift apart.
#[derive(Debug, Clone)]
pub(crate) enum FeatureKind<T> {
    Categorical {
        table: T,
        lookup: Lookup,
    },
    Multi {
        table: T,
        lookup: Lookup,
        pooling: Pooling,
        max_len: usize,
        weighted: bool,
    },
    Numeric {
        transform: Transform,
        /// The field value used for a missing key / null (already transformed).
        missing: f32,
        /// Whether the spec states a default (otherwise a missing value is 0).
        has_default: bool,
    },
    Bucketize {
        table: T,
        boundaries: Vec<f64>,
    },
    Dense {
        dim: usize,
    },
}

/// A feature as the spec states it (tables by tensor name).
pub(crate) type FeatureDraft = FeatureKind<String>;

impl<T> FeatureKind<T> {
    /// The rows its embedding table must have (None for features without a table).
    pub(crate) fn table_rows(&self) -> Option<u64> {
        match self {
            FeatureKind::Categorical { lookup, .. } | FeatureKind::Multi { lookup, .. } => {
                Some(lookup.rows())
            }
            FeatureKind::Bucketize { boundaries, .. } => Some(boundaries.len() as u64 + 2),
            FeatureKind::Numeric { .. } | FeatureKind::Dense { .. } => None,
        }
    }

    /// The same feature with its table reference mapped by `f(reference, rows)`.
    pub(crate) fn bind<U, E>(
        self,
        mut f: impl FnMut(T, u64) -> std::result::Result<U, E>,
    ) -> std::result::Result<FeatureKind<U>, E> {
        let rows = self.table_rows().unwrap_or(0);
        Ok(match self {
            FeatureKind::Categorical { table, lookup } => FeatureKind::Categorical {
                table: f(table, rows)?,
                lookup,
            },
            FeatureKind::Multi {
                table,
                lookup,
                pooling,
                max_len,
                weighted,
            } => FeatureKind::Multi {
                table: f(table, rows)?,
                lookup,
                pooling,
                max_len,
                weighted,
            },
            FeatureKind::Numeric {
                transform,
                missing,
                has_default,
            } => FeatureKind::Numeric {
                transform,
                missing,
                has_default,
            },
            FeatureKind::Bucketize { table, boundaries } => FeatureKind::Bucketize {
                table: f(table, rows)?,
                boundaries,
            },
            FeatureKind::Dense { dim } => FeatureKind::Dense { dim },
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SenetDraft {
    pub w1: String,
    pub b1: Option<String>,
    pub w2: String,
    pub b2: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) enum LayerDraft {
    Linear {
        weight: String,
        bias: Option<String>,
    },
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
    LayerNorm {
        weight: String,
        bias: String,
        eps: f64,
    },
    BatchNorm {
        weight: String,
        bias: String,
        running_mean: String,
        running_var: String,
        eps: f64,
    },
    Dropout,
    /// Indices of the features whose raw fields are appended.
    Shortcut {
        fields: Vec<usize>,
    },
    L2Normalize,
}

/// Where a pre-rank model's feature comes from. Towers have only [`Source::User`] (a user tower)
/// or [`Source::Item`] (an item tower) features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The request's features object (encoded once per request).
    User,
    /// The candidate item's feature row (encoded once per item).
    Item,
    /// Computed for each (user, candidate) pair by the pre-ranker.
    Cross(Cross),
}

/// The cross inputs a pre-rank model can ask for. `u` is the user tower's vector, `v` the
/// candidate's item vector, `h_1..h_n` the item vectors of the user's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cross {
    /// `u` (width: the tower's dimension).
    UserVector,
    /// `v` (width: the tower's dimension).
    ItemVector,
    /// `u ⊙ v`, element-wise (width: the tower's dimension).
    Product,
    /// The two-tower score of the candidate (cosine similarity, inner product, or negative
    /// Euclidean distance, by the towers' metric); width 1.
    Score,
    /// max_i cos(v, h_i); 0 without history; width 1.
    HistoryMax,
    /// mean_i cos(v, h_i); 0 without history; width 1.
    HistoryMean,
    /// ln(p), p the candidate's 1-based position in the list the pre-rank stages receive (the
    /// merge's order in a pipeline, the caller's order in `prerank`, the logged rank in
    /// training): what the recall stage thought of it; width 1.
    RecallRank,
    /// Target attention (DIN-style) of the candidate over the history: Σ αᵢ·hᵢ with
    /// α = softmax((W_q·v)·(W_k·hᵢ) / √r), learned W_q and W_k `[r, d]` (the feature's
    /// `attention`); zeros without history (width: the tower's dimension).
    TargetAttention,
}

/// The shape of a cross input (see [`Cross::shape`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrossShape {
    /// `u`, the same for every candidate (folded into the request's constants).
    UserVector,
    /// The candidate's `v`.
    ItemVector,
    /// `u ⊙ v`.
    Product,
    /// A vector computed from the history and `v` (target attention).
    Attention,
    /// One number per candidate.
    Scalar,
}

impl Cross {
    pub const ALL: [(&'static str, Cross); 8] = [
        ("user_vector", Cross::UserVector),
        ("item_vector", Cross::ItemVector),
        ("product", Cross::Product),
        ("score", Cross::Score),
        ("history_max", Cross::HistoryMax),
        ("history_mean", Cross::HistoryMean),
        ("recall_rank", Cross::RecallRank),
        ("target_attention", Cross::TargetAttention),
    ];

    pub fn name(self) -> &'static str {
        Cross::ALL
            .iter()
            .find(|(_, c)| *c == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    /// Whether the input is as wide as the tower's vectors (otherwise it is one number).
    /// How the input enters a model's row: each cross input's shape is said here once, and
    /// the row layout (`rows.rs`) and the values (`twotower_funnel::prerank`) follow it.
    pub fn shape(self) -> CrossShape {
        match self {
            Cross::UserVector => CrossShape::UserVector,
            Cross::ItemVector => CrossShape::ItemVector,
            Cross::Product => CrossShape::Product,
            Cross::TargetAttention => CrossShape::Attention,
            Cross::Score | Cross::HistoryMax | Cross::HistoryMean | Cross::RecallRank => {
                CrossShape::Scalar
            }
        }
    }

    /// Whether the input is as wide as the towers' vectors (not one number).
    pub fn is_vector(self) -> bool {
        self.shape() != CrossShape::Scalar
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SpecDraft {
    pub kind: Kind,
    pub names: Vec<String>,
    pub sources: Vec<Source>,
    pub features: Vec<FeatureDraft>,
    pub senet: Option<SenetDraft>,
    pub layers: Vec<LayerDraft>,
    /// The graph of named nodes that replaces `layers` when the spec has one.
    pub graph: Option<GraphDraft>,
    pub output_dim: usize,
    pub metric: Metric,
    /// The target attention input: its feature index and its query and key tensors.
    pub attention: Option<(usize, String, String)>,
    /// A multi-task pre-rank model's tasks (one per output element); empty otherwise.
    pub tasks: Vec<Task>,
}

/// The most tasks a multi-task pre-rank model has.
pub const MAX_TASKS: usize = 16;

/// How a task's output element becomes its score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// σ(logit): a probability (a task trained with the logistic loss).
    Sigmoid,
    /// The output as it is (a task trained with the squared error).
    Identity,
}

impl Link {
    pub fn name(self) -> &'static str {
        match self {
            Link::Sigmoid => "sigmoid",
            Link::Identity => "identity",
        }
    }

    pub fn apply(self, x: f32) -> f32 {
        match self {
            Link::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Link::Identity => x,
        }
    }
}

/// One task of a multi-task pre-rank model: its name, its link, and its weight in the fused
/// score Σ fuse·link(output).
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub name: String,
    pub link: Link,
    pub fuse: f32,
}

/// The output's `tasks`: 1 to [`MAX_TASKS`] objects, names unique and not `fused`, at least one
/// weight not 0.
fn parse_tasks(out: &Obj) -> Result<Vec<Task>> {
    let arr = out.spec_array("tasks")?;
    if arr.is_empty() || arr.len() > MAX_TASKS {
        return Err(spec_err(
            "output.tasks",
            format!("must list 1 to {MAX_TASKS} tasks, got {}", arr.len()),
        ));
    }
    let mut tasks: Vec<Task> = Vec::with_capacity(arr.len());
    for (i, v) in arr.iter().enumerate() {
        let o = Obj::new(v, format!("output.tasks[{i}]"))?;
        o.allow(&["name", "link", "fuse"])?;
        let name = o.req_str("name")?;
        if !valid_name(name) || name == "fused" {
            return Err(spec_err(
                o.p("name"),
                format!("\"{name}\" is not a valid task name (1..=63 characters, [A-Za-z_][A-Za-z0-9_]*, not \"fused\")"),
            ));
        }
        if tasks.iter().any(|t| t.name == name) {
            return Err(spec_err(
                o.p("name"),
                format!("duplicate task name \"{name}\""),
            ));
        }
        let link = match o.get("link") {
            None => Link::Sigmoid,
            Some(_) => match o.req_str("link")? {
                "sigmoid" => Link::Sigmoid,
                "identity" => Link::Identity,
                other => {
                    return Err(spec_err(
                        o.p("link"),
                        format!("must be \"sigmoid\" or \"identity\", got \"{other}\""),
                    ))
                }
            },
        };
        let fuse = o.opt_num("fuse")?.unwrap_or(1.0);
        if !fuse.is_finite() || fuse.abs() > f32::MAX as f64 {
            return Err(spec_err(o.p("fuse"), "must be a finite number"));
        }
        tasks.push(Task {
            name: name.to_owned(),
            link,
            fuse: fuse as f32,
        });
    }
    if tasks.iter().all(|t| t.fuse == 0.0) {
        return Err(spec_err(
            "output.tasks",
            "every \"fuse\" weight is 0: the fused score would be 0 for every item",
        ));
    }
    Ok(tasks)
}

/// How a combine node joins its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CombineKind {
    /// The inputs side by side.
    Concat,
    /// Their element-wise sum (equal widths).
    Sum,
    /// Σ w_i x_i, one learned weight per input (tensor [k]).
    WeightedSum,
    /// The inputs side by side, each scaled by its learned weight (tensor [k]): the user side of
    /// a parallel two-tower, whose dot product with the item side's concatenation is the
    /// weighted sum of the sub-towers' scores.
    WeightedConcat,
    /// Attention fusion: α = softmax(W · concat(x_1..x_k) + b) (W [k, k·d], b [k]), then
    /// Σ α_i x_i (equal widths d).
    Attention,
    /// The MMoE gate: α = softmax(W · g + b) from the node's `gate_inputs` g (W [k, g], b [k]),
    /// then Σ α_i x_i over its inputs (the experts, equal widths d).
    Gate,
    /// The scene gate (EPNet): the inputs side by side (x, width n) scaled element-wise by
    /// 2·σ(W · g + b) from the node's `gate_inputs` g (W [n, g], b [n]).
    Scale,
}

impl CombineKind {
    pub const ALL: [(&'static str, CombineKind); 7] = [
        ("concat", CombineKind::Concat),
        ("sum", CombineKind::Sum),
        ("weighted_sum", CombineKind::WeightedSum),
        ("weighted_concat", CombineKind::WeightedConcat),
        ("attention", CombineKind::Attention),
        ("gate", CombineKind::Gate),
        ("scale", CombineKind::Scale),
    ];

    /// Whether the node reads `gate_inputs` (and has a weight and an optional bias).
    pub fn gated(self) -> bool {
        matches!(self, CombineKind::Gate | CombineKind::Scale)
    }
}

/// An input of a graph node: a feature's field (after SENet) or an earlier node's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InputRef {
    Feature(usize),
    Node(usize),
}

#[derive(Debug, Clone)]
pub(crate) enum OpDraft {
    /// The inputs side by side, through a layer stack (no shortcut layers).
    Stack(Vec<LayerDraft>),
    Combine {
        kind: CombineKind,
        weight: Option<String>,
        bias: Option<String>,
        /// How many of the node's inputs are joined; the rest are its `gate_inputs` (gate and
        /// scale nodes only).
        joined: usize,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct NodeDraft {
    pub name: String,
    /// The node's index in the spec's `graph` array (for error paths).
    pub spec_index: usize,
    /// Its `inputs`, then (gate and scale nodes) its `gate_inputs`.
    pub inputs: Vec<InputRef>,
    pub op: OpDraft,
}

/// A validated graph: nodes in an order where every input comes before its node, and the
/// output node.
#[derive(Debug, Clone)]
pub(crate) struct GraphDraft {
    pub nodes: Vec<NodeDraft>,
    pub output: usize,
}

pub(crate) fn spec_err(path: impl Into<String>, reason: impl Into<String>) -> TowerError {
    TowerError::Spec {
        path: path.into(),
        reason: reason.into(),
    }
}

/// The spec-specific readers over the shared JSON reader (`twotower_options::Obj`): tensor
/// names, numbers that must be finite, integers that may be written 42.0 (as exporters do).
trait SpecRead<'a> {
    fn req_str(&self, key: &str) -> Result<&'a str>;
    fn tensor(&self, key: &str) -> Result<String>;
    fn opt_tensor(&self, key: &str) -> Result<Option<String>>;
    fn spec_num(&self, key: &str) -> Result<f64>;
    fn opt_num(&self, key: &str) -> Result<Option<f64>>;
    fn spec_uint(&self, key: &str, lo: u64, hi: u64) -> Result<u64>;
    fn opt_bool(&self, key: &str, default: bool) -> Result<bool>;
    fn spec_array(&self, key: &str) -> Result<&'a Vec<Value>>;
}

impl<'a> SpecRead<'a> for Obj<'a> {
    fn req_str(&self, key: &str) -> Result<&'a str> {
        let v = self.req(key)?;
        v.as_str().ok_or_else(|| {
            spec_err(
                self.p(key),
                format!("must be a string, got {}", json_type(v)),
            )
        })
    }

    fn tensor(&self, key: &str) -> Result<String> {
        let s = self.req_str(key)?;
        if s.is_empty() {
            return Err(spec_err(self.p(key), "tensor name must not be empty"));
        }
        Ok(s.to_owned())
    }

    fn opt_tensor(&self, key: &str) -> Result<Option<String>> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.tensor(key).map(Some)
    }

    fn spec_num(&self, key: &str) -> Result<f64> {
        let v = self.req(key)?;
        number(v).ok_or_else(|| {
            spec_err(
                self.p(key),
                format!("must be a finite number, got {}", short(v)),
            )
        })
    }

    fn opt_num(&self, key: &str) -> Result<Option<f64>> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.spec_num(key).map(Some)
    }

    fn spec_uint(&self, key: &str, lo: u64, hi: u64) -> Result<u64> {
        let v = self.req(key)?;
        let n = integer(v).ok_or_else(|| {
            spec_err(self.p(key), format!("must be an integer, got {}", short(v)))
        })?;
        if n < lo as i128 || n > hi as i128 {
            return Err(spec_err(
                self.p(key),
                format!("must be between {lo} and {hi}, got {n}"),
            ));
        }
        Ok(n as u64)
    }

    fn opt_bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(spec_err(
                self.p(key),
                format!("must be true or false, got {}", short(v)),
            )),
        }
    }

    fn spec_array(&self, key: &str) -> Result<&'a Vec<Value>> {
        let v = self.req(key)?;
        v.as_array().ok_or_else(|| {
            spec_err(
                self.p(key),
                format!("must be an array, got {}", json_type(v)),
            )
        })
    }
}

/// A finite number.
fn number(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

/// An integral number (42 or 42.0), as i128 so every JSON integer fits.
fn integer(v: &Value) -> Option<i128> {
    let n = v.as_number()?;
    if let Some(i) = n.as_i64() {
        return Some(i as i128);
    }
    if let Some(u) = n.as_u64() {
        return Some(u as i128);
    }
    let f = n.as_f64()?;
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e30 {
        Some(f as i128)
    } else {
        None
    }
}

/// A short rendering of a value for messages.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        let mut end = 40;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

pub(crate) fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

pub(crate) fn parse_spec(spec_json: &str) -> Result<SpecDraft> {
    let root = crate::json::parse_strict(spec_json.as_bytes())
        .map_err(|reason| TowerError::SpecJson { reason })?;
    let root = Obj::new(&root, String::new())?;

    // Format and version first: a newer spec may legitimately have keys this build does not know.
    let format = root.req_str("format")?;
    if format != FORMAT {
        return Err(spec_err(
            "format",
            format!("must be \"{FORMAT}\", got \"{format}\""),
        ));
    }
    let version = root.req("spec_version")?;
    if integer(version) != Some(SPEC_VERSION as i128) {
        return Err(TowerError::SpecVersion {
            got: short(version),
        });
    }
    root.allow(&[
        "format",
        "spec_version",
        "kind",
        "features",
        "senet",
        "layers",
        "graph",
        "output",
    ])?;

    let kind = match root.req_str("kind")? {
        "user" => Kind::User,
        "item" => Kind::Item,
        "prerank" => Kind::Prerank,
        other => {
            return Err(spec_err(
                "kind",
                format!("must be \"user\", \"item\" or \"prerank\", got \"{other}\""),
            ))
        }
    };

    let feats = root.spec_array("features")?;
    if feats.is_empty() || feats.len() > MAX_FEATURES {
        return Err(spec_err(
            "features",
            format!(
                "must list 1 to {MAX_FEATURES} features, got {}",
                feats.len()
            ),
        ));
    }
    let mut names: Vec<String> = Vec::with_capacity(feats.len());
    let mut sources = Vec::with_capacity(feats.len());
    let mut features = Vec::with_capacity(feats.len());
    let mut attention = None;
    for (i, f) in feats.iter().enumerate() {
        let o = Obj::new(f, format!("features[{i}]"))?;
        let name = o.req_str("name")?;
        if !valid_name(name) {
            return Err(spec_err(
                o.p("name"),
                format!("\"{name}\" is not a valid feature name (1..=63 characters, [A-Za-z_][A-Za-z0-9_]*)"),
            ));
        }
        if names.iter().any(|n| n == name) {
            return Err(spec_err(
                o.p("name"),
                format!("duplicate feature name \"{name}\""),
            ));
        }
        names.push(name.to_owned());
        let (source, feature, att) = parse_sourced_feature(&o, kind)?;
        if let Some((q, k)) = att {
            if attention.is_some() {
                return Err(spec_err(
                    o.p("of"),
                    "a model has at most one target_attention input",
                ));
            }
            attention = Some((i, q, k));
        }
        sources.push(source);
        features.push(feature);
    }

    let senet = match root.get("senet") {
        None => None,
        Some(v) => {
            let o = Obj::new(v, "senet")?;
            o.allow(&["w1", "b1", "w2", "b2"])?;
            Some(SenetDraft {
                w1: o.tensor("w1")?,
                b1: o.opt_tensor("b1")?,
                w2: o.tensor("w2")?,
                b2: o.opt_tensor("b2")?,
            })
        }
    };

    let empty = Vec::new();
    let has_graph = root.get("graph").is_some();
    let ls = if has_graph && root.get("layers").is_none() {
        &empty
    } else {
        root.spec_array("layers")?
    };
    if has_graph && !ls.is_empty() {
        return Err(spec_err("layers", "a spec with a \"graph\" has its layers in the graph's nodes (leave \"layers\" out or empty)"));
    }
    if ls.len() > MAX_LAYERS {
        return Err(spec_err(
            "layers",
            format!("at most {MAX_LAYERS} layers, got {}", ls.len()),
        ));
    }
    let mut layers = Vec::with_capacity(ls.len());
    for (i, l) in ls.iter().enumerate() {
        let o = Obj::new(l, format!("layers[{i}]"))?;
        layers.push(parse_layer(&o, &names)?);
    }

    let out = Obj::new(root.req("output")?, "output")?;
    let output_node = match out.get("node") {
        None => None,
        Some(_) if !has_graph => {
            return Err(spec_err(
                "output.node",
                "only a spec with a \"graph\" names an output node",
            ))
        }
        Some(_) => Some(out.req_str("node")?.to_owned()),
    };
    let graph = match root.get("graph") {
        None => None,
        Some(_) => Some(parse_graph(&root, &names, output_node.as_deref())?),
    };
    let mut tasks = Vec::new();
    let (output_dim, metric) = if kind == Kind::Prerank {
        // A pre-rank model outputs one score (higher ranks first), or one per task; it has no
        // index metric.
        out.allow(&["dim", "node", "tasks"])?;
        if out.get("tasks").is_some() {
            tasks = parse_tasks(&out)?;
        }
        let n = tasks.len().max(1) as u64;
        (out.spec_uint("dim", n, n)? as usize, Metric::InnerProduct)
    } else {
        out.allow(&["dim", "metric", "node"])?;
        let output_dim = out.spec_uint("dim", 1, MAX_WIDTH as u64)? as usize;
        let name = out.req_str("metric")?;
        let metric = Metric::from_spec_name(name).ok_or_else(|| {
            spec_err(
                "output.metric",
                format!("must be \"cosine\", \"ip\" or \"l2\", got \"{name}\""),
            )
        })?;
        (output_dim, metric)
    };

    Ok(SpecDraft {
        kind,
        names,
        sources,
        features,
        senet,
        layers,
        graph,
        output_dim,
        metric,
        attention,
        tasks,
    })
}

/// The largest number of nodes of a graph, and of inputs of a node.
pub const MAX_NODES: usize = 64;

/// A node's list `key` of input names: each a feature or a node, none twice.
fn refs(o: &Obj, key: &str, features: &[String], names: &[String]) -> Result<Vec<InputRef>> {
    let ins = o.spec_array(key)?;
    if ins.is_empty() || ins.len() > MAX_NODES {
        return Err(spec_err(
            o.p(key),
            format!("must list 1 to {MAX_NODES} inputs, got {}", ins.len()),
        ));
    }
    let mut inputs = Vec::with_capacity(ins.len());
    for (j, x) in ins.iter().enumerate() {
        let path = format!("{}[{j}]", o.p(key));
        let Some(n) = x.as_str() else {
            return Err(spec_err(
                path,
                format!("must be a feature or node name, got {}", short(x)),
            ));
        };
        let r = if let Some(f) = features.iter().position(|f| f == n) {
            InputRef::Feature(f)
        } else if let Some(k) = names.iter().position(|m| m == n) {
            InputRef::Node(k)
        } else {
            return Err(spec_err(
                path,
                format!("\"{n}\" is neither a feature nor a node of this spec"),
            ));
        };
        if inputs.contains(&r) {
            return Err(spec_err(path, format!("\"{n}\" is listed twice")));
        }
        inputs.push(r);
    }
    Ok(inputs)
}

/// Parses and validates the spec's `graph`: named nodes whose inputs are features or other
/// nodes. Errors: unknown or duplicate names, a node named like a feature, a cycle, a node the
/// output does not use, a feature no node reads, shortcut layers (a graph joins inputs with
/// nodes instead). Shapes are checked when the weights are bound.
fn parse_graph(root: &Obj, features: &[String], output: Option<&str>) -> Result<GraphDraft> {
    let arr = root.spec_array("graph")?;
    if arr.is_empty() || arr.len() > MAX_NODES {
        return Err(spec_err(
            "graph",
            format!("must list 1 to {MAX_NODES} nodes, got {}", arr.len()),
        ));
    }
    // Names first: inputs may name later nodes (the order in the file is free).
    let mut names: Vec<String> = Vec::with_capacity(arr.len());
    for (i, v) in arr.iter().enumerate() {
        let o = Obj::new(v, format!("graph[{i}]"))?;
        let name = o.req_str("name")?;
        if !valid_name(name) {
            return Err(spec_err(o.p("name"), format!("\"{name}\" is not a valid node name (1..=63 characters, [A-Za-z_][A-Za-z0-9_]*)")));
        }
        if features.iter().any(|f| f == name) {
            return Err(spec_err(
                o.p("name"),
                format!("\"{name}\" is already a feature name"),
            ));
        }
        if names.iter().any(|n| n == name) {
            return Err(spec_err(
                o.p("name"),
                format!("duplicate node name \"{name}\""),
            ));
        }
        names.push(name.to_owned());
    }
    let mut nodes = Vec::with_capacity(arr.len());
    for (i, v) in arr.iter().enumerate() {
        let o = Obj::new(v, format!("graph[{i}]"))?;
        o.allow(&[
            "name",
            "inputs",
            "gate_inputs",
            "layers",
            "combine",
            "weight",
            "bias",
        ])?;
        let mut inputs = refs(&o, "inputs", features, &names)?;
        let joined = inputs.len();
        let gated = o
            .get("combine")
            .and_then(Value::as_str)
            .and_then(|c| CombineKind::ALL.iter().find(|(n, _)| *n == c))
            .is_some_and(|(_, k)| k.gated());
        match (o.get("gate_inputs"), gated) {
            (Some(_), true) => inputs.extend(refs(&o, "gate_inputs", features, &names)?),
            (None, true) => return Err(spec_err(
                o.p("gate_inputs"),
                "a \"gate\" or \"scale\" node computes its weights from \"gate_inputs\": give them",
            )),
            (Some(_), false) => {
                return Err(spec_err(
                    o.p("gate_inputs"),
                    "only a \"gate\" or \"scale\" node has gate inputs",
                ))
            }
            (None, false) => {}
        }
        let op = match (o.get("layers"), o.get("combine")) {
            (Some(_), Some(_)) => {
                return Err(spec_err(
                    o.path().to_owned(),
                    "a node has \"layers\" or \"combine\", not both",
                ))
            }
            (_, None) => {
                if o.get("weight").is_some() || o.get("bias").is_some() {
                    return Err(spec_err(
                        o.p("weight"),
                        "only a \"combine\" node has a weight or bias",
                    ));
                }
                let ls = if o.get("layers").is_some() {
                    o.spec_array("layers")?.as_slice()
                } else {
                    &[]
                };
                if ls.len() > MAX_LAYERS {
                    return Err(spec_err(
                        o.p("layers"),
                        format!("at most {MAX_LAYERS} layers, got {}", ls.len()),
                    ));
                }
                let mut layers = Vec::with_capacity(ls.len());
                for (j, l) in ls.iter().enumerate() {
                    let lo = Obj::new(l, format!("{}[{j}]", o.p("layers")))?;
                    let layer = parse_layer(&lo, features)?;
                    if matches!(layer, LayerDraft::Shortcut { .. }) {
                        return Err(spec_err(lo.p("type"), "a graph node cannot have a shortcut layer (list the features among its inputs instead)"));
                    }
                    layers.push(layer);
                }
                OpDraft::Stack(layers)
            }
            (None, Some(_)) => {
                let c = o.req_str("combine")?;
                let Some(kind) = CombineKind::ALL
                    .iter()
                    .find(|(n, _)| *n == c)
                    .map(|(_, k)| *k)
                else {
                    let all: Vec<&str> = CombineKind::ALL.iter().map(|(n, _)| *n).collect();
                    return Err(spec_err(
                        o.p("combine"),
                        format!("must be one of {}, got \"{c}\"", all.join(", ")),
                    ));
                };
                if joined < 2 && kind != CombineKind::Scale {
                    return Err(spec_err(
                        o.p("inputs"),
                        "a combine node joins at least two inputs",
                    ));
                }
                let weighted = kind.gated()
                    || matches!(
                        kind,
                        CombineKind::WeightedSum
                            | CombineKind::WeightedConcat
                            | CombineKind::Attention
                    );
                let weight = if weighted {
                    Some(o.tensor("weight")?)
                } else {
                    None
                };
                if !weighted && o.get("weight").is_some() {
                    return Err(spec_err(
                        o.p("weight"),
                        format!("a \"{c}\" node has no weight"),
                    ));
                }
                let bias = if kind == CombineKind::Attention || kind.gated() {
                    o.opt_tensor("bias")?
                } else if o.get("bias").is_some() {
                    return Err(spec_err(o.p("bias"), format!("a \"{c}\" node has no bias")));
                } else {
                    None
                };
                OpDraft::Combine {
                    kind,
                    weight,
                    bias,
                    joined,
                }
            }
        };
        nodes.push(NodeDraft {
            name: names[i].clone(),
            spec_index: i,
            inputs,
            op,
        });
    }
    let out = match output {
        None => nodes.len() - 1,
        Some(n) => names.iter().position(|m| m == n).ok_or_else(|| {
            spec_err("output.node", format!("\"{n}\" is not a node of the graph"))
        })?,
    };
    // Depth-first from the output: a node met again while on the path closes a cycle; every
    // node reached is used; each node is placed after its inputs.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        n: usize,
        nodes: &[NodeDraft],
        marks: &mut [Mark],
        path: &mut Vec<usize>,
        order: &mut Vec<usize>,
    ) -> Result<()> {
        match marks[n] {
            Mark::Done => return Ok(()),
            Mark::OnPath => {
                let from = path.iter().position(|&p| p == n).unwrap_or(0);
                let mut cycle: Vec<&str> = path[from..]
                    .iter()
                    .map(|&p| nodes[p].name.as_str())
                    .collect();
                cycle.push(&nodes[n].name);
                return Err(spec_err(
                    "graph",
                    format!("the nodes form a cycle: {}", cycle.join(" -> ")),
                ));
            }
            Mark::New => {}
        }
        marks[n] = Mark::OnPath;
        path.push(n);
        for r in &nodes[n].inputs {
            if let InputRef::Node(k) = r {
                visit(*k, nodes, marks, path, order)?;
            }
        }
        path.pop();
        marks[n] = Mark::Done;
        order.push(n);
        Ok(())
    }
    let mut marks = vec![Mark::New; nodes.len()];
    let mut order = Vec::with_capacity(nodes.len());
    visit(out, &nodes, &mut marks, &mut Vec::new(), &mut order)?;
    if let Some(unused) = marks.iter().position(|m| *m != Mark::Done) {
        // A cycle among unused nodes is still a cycle: report it as such.
        let mut scratch = vec![Mark::New; nodes.len()];
        visit(
            unused,
            &nodes,
            &mut scratch,
            &mut Vec::new(),
            &mut Vec::new(),
        )?;
        return Err(spec_err(
            format!("graph[{unused}]"),
            format!(
                "node \"{}\" is not used by the output node \"{}\"",
                nodes[unused].name, nodes[out].name
            ),
        ));
    }
    let used: Vec<bool> = (0..features.len())
        .map(|f| {
            nodes
                .iter()
                .any(|n| n.inputs.contains(&InputRef::Feature(f)))
        })
        .collect();
    if let Some(f) = used.iter().position(|u| !u) {
        return Err(spec_err(
            format!("features[{f}]"),
            format!(
                "feature \"{}\" is not an input of any graph node",
                features[f]
            ),
        ));
    }
    // Renumber in dependency order.
    let mut new_index = vec![0usize; nodes.len()];
    for (pos, &n) in order.iter().enumerate() {
        new_index[n] = pos;
    }
    let mut sorted: Vec<NodeDraft> = order.iter().map(|&n| nodes[n].clone()).collect();
    for node in &mut sorted {
        for r in &mut node.inputs {
            if let InputRef::Node(k) = r {
                *k = new_index[*k];
            }
        }
    }
    Ok(GraphDraft {
        output: new_index[out],
        nodes: sorted,
    })
}

/// A feature with its source. Towers' features have none (a user tower reads the request, an item
/// tower the item row). A pre-rank model's feature says `"source": "user"` (the default) or
/// `"item"`, or is of type `"cross"` with `"of"` naming a [`Cross`] input (and `"dim"`, the
/// towers' dimension, for the vector-valued ones).
/// A target attention input also returns its query and key tensor names.
#[allow(clippy::type_complexity)]
fn parse_sourced_feature(
    o: &Obj,
    kind: Kind,
) -> Result<(Source, FeatureDraft, Option<(String, String)>)> {
    let tower_source = if kind == Kind::Item {
        Source::Item
    } else {
        Source::User
    };
    let ty = o.get("type");
    if kind != Kind::Prerank {
        if o.get("source").is_some() {
            return Err(spec_err(
                o.p("source"),
                "only features of a \"prerank\" model have a source",
            ));
        }
        if ty.and_then(Value::as_str) == Some("cross") {
            return Err(spec_err(
                o.p("type"),
                "\"cross\" features are for \"prerank\" models only",
            ));
        }
        return Ok((tower_source, parse_feature(o)?, None));
    }
    if ty.and_then(Value::as_str) == Some("cross") {
        o.allow(&["name", "type", "of", "dim", "attention"])?;
        let of = o.req_str("of")?;
        let Some(cross) = Cross::ALL.iter().find(|(n, _)| *n == of).map(|(_, c)| *c) else {
            let names: Vec<&str> = Cross::ALL.iter().map(|(n, _)| *n).collect();
            return Err(spec_err(
                o.p("of"),
                format!("must be one of {}, got \"{of}\"", names.join(", ")),
            ));
        };
        let dim = if cross.is_vector() {
            o.spec_uint("dim", 1, MAX_WIDTH as u64)? as usize
        } else {
            if o.get("dim").is_some() {
                o.spec_uint("dim", 1, 1)?;
            }
            1
        };
        let att = match (cross, o.get("attention")) {
            (Cross::TargetAttention, Some(v)) => {
                let a = Obj::new(v, o.p("attention"))?;
                a.allow(&["query", "key"])?;
                Some((a.tensor("query")?, a.tensor("key")?))
            }
            (Cross::TargetAttention, None) => {
                return Err(spec_err(
                    o.p("attention"),
                    "target_attention needs its weights: {\"query\": tensor, \"key\": tensor}",
                ))
            }
            (_, Some(_)) => {
                return Err(spec_err(
                    o.p("attention"),
                    "only a target_attention input has attention weights",
                ))
            }
            (_, None) => None,
        };
        return Ok((Source::Cross(cross), FeatureDraft::Dense { dim }, att));
    }
    let source = match o.get("source") {
        None => Source::User,
        Some(Value::String(s)) if s == "user" => Source::User,
        Some(Value::String(s)) if s == "item" => Source::Item,
        Some(other) => {
            return Err(spec_err(
                o.p("source"),
                format!("must be \"user\" or \"item\", got {}", short(other)),
            ))
        }
    };
    let mut rest = o.map().clone();
    rest.remove("source");
    let rest = Value::Object(rest);
    let inner = Obj::new(&rest, o.path())?;
    Ok((source, parse_feature(&inner)?, None))
}

fn parse_lookup(o: &Obj) -> Result<Lookup> {
    match (o.get("vocabulary"), o.get("hash_buckets")) {
        (Some(_), Some(_)) | (None, None) => Err(spec_err(
            o.path().to_owned(),
            "exactly one of \"vocabulary\" and \"hash_buckets\" must be given",
        )),
        (None, Some(_)) => Ok(Lookup::Hash(o.spec_uint(
            "hash_buckets",
            1,
            MAX_HASH_BUCKETS,
        )?)),
        (Some(_), None) => {
            let vocab = o.spec_array("vocabulary")?;
            if vocab.len() as u64 >= MAX_HASH_BUCKETS {
                return Err(spec_err(o.p("vocabulary"), "too many entries"));
            }
            let mut map = HashMap::with_capacity(vocab.len());
            for (i, v) in vocab.iter().enumerate() {
                let Value::String(s) = v else {
                    return Err(spec_err(
                        format!("{}[{i}]", o.p("vocabulary")),
                        format!(
                            "vocabulary entries must be strings (the canonical id, e.g. \"42\"), got {}",
                            short(v)
                        ),
                    ));
                };
                if map.insert(s.clone(), (i + 1) as u32).is_some() {
                    return Err(spec_err(
                        format!("{}[{i}]", o.p("vocabulary")),
                        format!("duplicate vocabulary entry {}", short(v)),
                    ));
                }
            }
            Ok(Lookup::Vocab(map))
        }
    }
}

fn parse_feature(o: &Obj) -> Result<FeatureDraft> {
    let ty = o.req_str("type")?;
    Ok(match ty {
        "categorical" => {
            o.allow(&["name", "type", "embedding", "vocabulary", "hash_buckets"])?;
            FeatureDraft::Categorical {
                table: o.tensor("embedding")?,
                lookup: parse_lookup(o)?,
            }
        }
        "multi_categorical" => {
            o.allow(&[
                "name",
                "type",
                "embedding",
                "vocabulary",
                "hash_buckets",
                "pooling",
                "max_len",
                "weighted",
            ])?;
            let pooling = match o.req_str("pooling")? {
                "mean" => Pooling::Mean,
                "sum" => Pooling::Sum,
                "max" => Pooling::Max,
                other => {
                    return Err(spec_err(
                        o.p("pooling"),
                        format!("must be \"mean\", \"sum\" or \"max\", got \"{other}\""),
                    ))
                }
            };
            let max_len = match o.get("max_len") {
                None => usize::MAX,
                Some(_) => o.spec_uint("max_len", 1, MAX_MAX_LEN)? as usize,
            };
            FeatureDraft::Multi {
                table: o.tensor("embedding")?,
                lookup: parse_lookup(o)?,
                pooling,
                max_len,
                weighted: o.opt_bool("weighted", false)?,
            }
        }
        "numeric" => {
            let transform = match o.req_str("transform")? {
                "none" => {
                    o.allow(&["name", "type", "transform", "default"])?;
                    Transform::None
                }
                "log1p" => {
                    o.allow(&["name", "type", "transform", "default"])?;
                    Transform::Log1p
                }
                "zscore" => {
                    o.allow(&["name", "type", "transform", "default", "mean", "std"])?;
                    let mean = o.spec_num("mean")?;
                    let std = o.spec_num("std")?;
                    if std <= 0.0 {
                        return Err(spec_err(o.p("std"), format!("must be > 0, got {std}")));
                    }
                    Transform::Zscore { mean, std }
                }
                "minmax" => {
                    o.allow(&["name", "type", "transform", "default", "min", "max"])?;
                    let min = o.spec_num("min")?;
                    let max = o.spec_num("max")?;
                    if min >= max || !(max - min).is_finite() {
                        return Err(spec_err(
                            o.p("max"),
                            format!("min ({min}) must be less than max ({max}), with a finite difference"),
                        ));
                    }
                    Transform::Minmax { min, max }
                }
                other => {
                    return Err(spec_err(
                        o.p("transform"),
                        format!(
                            "must be \"none\", \"zscore\", \"log1p\" or \"minmax\", got \"{other}\""
                        ),
                    ))
                }
            };
            let default = o.opt_num("default")?;
            let missing = match default {
                None => 0.0,
                Some(d) => {
                    let v = transform.apply(d) as f32;
                    if !v.is_finite() {
                        return Err(spec_err(
                            o.p("default"),
                            format!("the transformed default {} does not fit in a real", transform.apply(d)),
                        ));
                    }
                    v
                }
            };
            FeatureDraft::Numeric {
                transform,
                missing,
                has_default: default.is_some(),
            }
        }
        "bucketize" => {
            o.allow(&["name", "type", "boundaries", "embedding"])?;
            let arr = o.spec_array("boundaries")?;
            let mut boundaries = Vec::with_capacity(arr.len());
            for (i, b) in arr.iter().enumerate() {
                let path = format!("{}[{i}]", o.p("boundaries"));
                let x = number(b).ok_or_else(|| {
                    spec_err(path.clone(), format!("must be a finite number, got {}", short(b)))
                })?;
                if let Some(&prev) = boundaries.last() {
                    if x <= prev {
                        return Err(spec_err(
                            path,
                            format!("boundaries must be strictly increasing ({x} follows {prev})"),
                        ));
                    }
                }
                boundaries.push(x);
            }
            FeatureDraft::Bucketize {
                table: o.tensor("embedding")?,
                boundaries,
            }
        }
        "dense" => {
            o.allow(&["name", "type", "dim"])?;
            FeatureDraft::Dense {
                dim: o.spec_uint("dim", 1, MAX_DENSE_DIM)? as usize,
            }
        }
        other => {
            return Err(spec_err(
                o.p("type"),
                format!("unknown feature type \"{other}\" (categorical, multi_categorical, numeric, bucketize, dense)"),
            ))
        }
    })
}

fn parse_eps(o: &Obj) -> Result<f64> {
    Ok(o.opt_num("eps")?.unwrap_or(1e-5))
}

fn parse_layer(o: &Obj, names: &[String]) -> Result<LayerDraft> {
    let ty = o.req_str("type")?;
    Ok(match ty {
        "linear" => {
            o.allow(&["type", "weight", "bias"])?;
            LayerDraft::Linear {
                weight: o.tensor("weight")?,
                bias: o.opt_tensor("bias")?,
            }
        }
        "relu" | "gelu" | "tanh" | "sigmoid" | "l2_normalize" => {
            o.allow(&["type"])?;
            match ty {
                "relu" => LayerDraft::Relu,
                "gelu" => LayerDraft::Gelu,
                "tanh" => LayerDraft::Tanh,
                "sigmoid" => LayerDraft::Sigmoid,
                _ => LayerDraft::L2Normalize,
            }
        }
        "layernorm" => {
            o.allow(&["type", "weight", "bias", "eps"])?;
            let eps = parse_eps(o)?;
            if eps <= 0.0 {
                return Err(spec_err(o.p("eps"), format!("must be > 0, got {eps}")));
            }
            LayerDraft::LayerNorm {
                weight: o.tensor("weight")?,
                bias: o.tensor("bias")?,
                eps,
            }
        }
        "batchnorm" => {
            o.allow(&[
                "type",
                "weight",
                "bias",
                "running_mean",
                "running_var",
                "eps",
            ])?;
            let eps = parse_eps(o)?;
            if eps < 0.0 {
                return Err(spec_err(o.p("eps"), format!("must be >= 0, got {eps}")));
            }
            LayerDraft::BatchNorm {
                weight: o.tensor("weight")?,
                bias: o.tensor("bias")?,
                running_mean: o.tensor("running_mean")?,
                running_var: o.tensor("running_var")?,
                eps,
            }
        }
        "dropout" => {
            o.allow(&["type", "p"])?;
            if let Some(p) = o.opt_num("p")? {
                if !(0.0..=1.0).contains(&p) {
                    return Err(spec_err(o.p("p"), format!("must be in [0, 1], got {p}")));
                }
            }
            LayerDraft::Dropout
        }
        "shortcut" => {
            o.allow(&["type", "fields"])?;
            let arr = o.spec_array("fields")?;
            if arr.is_empty() {
                return Err(spec_err(o.p("fields"), "must list at least one feature"));
            }
            let mut fields = Vec::with_capacity(arr.len());
            for (i, v) in arr.iter().enumerate() {
                let path = format!("{}[{i}]", o.p("fields"));
                let Some(s) = v.as_str() else {
                    return Err(spec_err(path, format!("must be a feature name, got {}", short(v))));
                };
                let Some(idx) = names.iter().position(|n| n == s) else {
                    return Err(spec_err(path, format!("\"{s}\" is not a feature of this spec")));
                };
                fields.push(idx);
            }
            LayerDraft::Shortcut { fields }
        }
        other => {
            return Err(spec_err(
                o.p("type"),
                format!("unknown layer type \"{other}\" (linear, relu, gelu, tanh, sigmoid, layernorm, batchnorm, dropout, shortcut, l2_normalize)"),
            ))
        }
    })
}
