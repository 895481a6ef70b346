//! Training options (a JSON object; `docs/training.md` lists every key): the two towers'
//! architecture, the loss, the optimisers and the schedule. Unknown keys are errors.

use crate::error::{opt_err, Result};
use crate::loss::LossKind;
use crate::net::Pooling;
use crate::optim::Sparse;
use serde_json::Value;
use twotower_tower::layers::Activation;
use twotower_tower::{Cross, Source};

#[derive(Debug, Clone, PartialEq)]
pub enum Decay {
    /// Weight 1 for every history item (an unweighted list).
    None,
    /// Weight `factor^i` for the i-th most recent item (i from 0).
    Position(f64),
    /// Weight `0.5^(age / half_life)`, the age in the timestamps' unit (seconds for timestamptz).
    Age(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub enum FeatureSpec {
    /// One id from the entity's features (a vocabulary built from the training data).
    Categorical { name: String, dim: usize },
    /// A list of ids from the entity's features, pooled.
    Multi {
        name: String,
        dim: usize,
        pooling: Pooling,
        max_len: usize,
    },
    /// A number from the entity's features, z-scored with the training data's statistics
    /// (`zscore`), `log1p` or as it is (`none`).
    Numeric {
        name: String,
        transform: NumTransform,
    },
    /// User towers only: the user's last `max_len` items before the interaction, most recent
    /// first, weighted by `decay`: of their positive feedback, or (`negative`) of their
    /// negative feedback (a label column's rows below 0).
    History {
        name: String,
        dim: usize,
        max_len: usize,
        pooling: Pooling,
        decay: Decay,
        negative: bool,
    },
    /// A number put in a bucket, then looked up: the given boundaries, or `buckets` quantile
    /// boundaries of the training examples' values.
    Bucketize {
        name: String,
        dim: usize,
        boundaries: Bucketing,
    },
    /// A fixed-length list of numbers used as it is (a pre-computed vector).
    Dense { name: String, dim: usize },
    /// Pre-rank models only: an input computed per (user, candidate) pair from the towers'
    /// vectors (as wide as the vectors, or one number; see `twotower_tower::Cross`).
    /// `target_attention` has learned weights of `attention_dim` rows (0 for the others).
    Cross {
        name: String,
        of: Cross,
        attention_dim: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Bucketing {
    Given(Vec<f64>),
    Quantiles(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NumTransform {
    None,
    Zscore,
    Log1p,
}

impl FeatureSpec {
    pub fn name(&self) -> &str {
        match self {
            FeatureSpec::Categorical { name, .. }
            | FeatureSpec::Multi { name, .. }
            | FeatureSpec::Numeric { name, .. }
            | FeatureSpec::History { name, .. }
            | FeatureSpec::Bucketize { name, .. }
            | FeatureSpec::Dense { name, .. }
            | FeatureSpec::Cross { name, .. } => name,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TowerSpec {
    pub features: Vec<FeatureSpec>,
    pub hidden: Vec<usize>,
    pub activation: Activation,
    pub layer_norm: bool,
    /// Dropout after each hidden layer's activation (0 = none).
    pub dropout: f32,
    /// Features whose raw fields are appended before the last linear layer.
    pub shortcut: Vec<String>,
    /// SENet over the fields with this hidden width (0 = none).
    pub senet: usize,
    /// BatchNorm after each hidden linear layer (instead of LayerNorm).
    pub batch_norm: bool,
    /// Pre-rank models: where each feature comes from (aligned with `features`); empty for
    /// towers.
    pub sources: Vec<Source>,
    /// Sub-towers over feature subsets (empty: one stack over every feature), joined by
    /// `fusion`; `hidden` then lists the head's hidden layers after the fusion.
    pub branches: Vec<Branch>,
    pub fusion: Fusion,
    /// A multi-task pre-rank model's experts, gates and task heads (`hidden` is then each
    /// expert's layers).
    pub multitask: Option<MultiTask>,
}

/// A multi-task pre-rank model (MMoE, or PLE's customized gate control with task experts):
/// `shared` experts every task's gate mixes, `per_task` experts of each task's own, each expert
/// the tower's `hidden` layers; per task a gate (a softmax over its experts, from the scene
/// feature when there is one, else from every field), a head (`task_hidden`, then one output).
/// With a `scene` feature a scene gate scales the other fields first (2σ(W·scene + b)).
#[derive(Debug, Clone, PartialEq)]
pub struct MultiTask {
    pub tasks: Vec<twotower_tower::Task>,
    pub shared: usize,
    pub per_task: usize,
    pub task_hidden: Vec<usize>,
    /// The scene feature's index.
    pub scene: Option<usize>,
}

/// The most experts of a multi-task model.
pub const MAX_EXPERTS: usize = 16;

/// A sub-tower: its own features (indices into the tower's) and hidden layers, then a linear
/// layer to the fusion's width.
#[derive(Debug, Clone, PartialEq)]
pub struct Branch {
    pub name: String,
    pub features: Vec<usize>,
    pub hidden: Vec<usize>,
}

/// How branches join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fusion {
    /// Side by side, then the head's linear layer.
    Concat,
    Sum,
    /// Learned scalar weights.
    WeightedSum,
    /// Learned attention weights per input (Que2Search's attention fusion).
    Attention,
    /// Parallel two-towers: k L2-normalised sub-vectors of `dim / k`, the user's weighted by
    /// learned weights, side by side; the dot product is the weighted sum of the pairs' scores.
    Parallel,
}

/// Dual augmented two-tower (Meituan): an id feature of each tower whose embedding (of width
/// `dim`) is pulled toward the other tower's output for the positive pair, weighted by
/// `lambda`, with the target's gradient stopped (the adaptive-mimic loss).
#[derive(Debug, Clone, PartialEq)]
pub struct Augmented {
    pub lambda: f32,
    /// The feature indices of the augmented vectors in the user and item towers.
    pub user: usize,
    pub item: usize,
}

/// Which network a feature list describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    User,
    Item,
    /// A pre-rank model: features of the request (`"source": "user"`, the default), of the
    /// candidate item (`"source": "item"`) and cross inputs (`"type": "cross"`).
    Prerank,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub dim: usize,
    pub user: TowerSpec,
    pub item: TowerSpec,
    pub min_count: usize,
    pub max_vocab: usize,
    pub loss: LossKind,
    /// Global negatives: shared by the batch (softmax) or per row (pointwise, triplet).
    pub negatives: usize,
    pub temperature: f32,
    pub lr: f32,
    pub weight_decay: f32,
    pub sparse: Sparse,
    pub batch_size: usize,
    pub epochs: usize,
    pub patience: usize,
    pub seed: u64,
    pub threads: usize,
    /// K of the validation Recall@K that picks the best epoch.
    pub k: usize,
    /// Hot-item down-sampling threshold of positives (0 = off).
    pub subsample: f64,
    pub init_std: f32,
    /// Each user's last interaction validates (early stopping, the best epoch kept).
    pub validate: bool,
    /// Per-row losses: the share of each row's negatives drawn from the user's hard negatives.
    pub hard_ratio: f64,
    /// Softmax: each row's own hard negatives, added to its candidates.
    pub hard_per_row: usize,
    /// Dense layers keep their parameters (incremental updates train embeddings only).
    pub freeze_dense: bool,
    pub augmented: Option<Augmented>,
    /// The negative-feedback term (items the user disliked, pushed down): used when the data
    /// has negative feedback.
    pub negative_feedback: NegativeFeedback,
    /// The popularity-debiasing pairs (Weibo), off without the option.
    pub debias: Option<Debias>,
}

/// The causal debiasing term: for each positive whose item is outside the most popular `head`
/// share of the items (by training count), a popular item the user did not engage with is
/// drawn, and `weight · ln(1 + exp(−(s⁺ − s_pop) / temperature))` (BPR) ranks the tail item
/// above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Debias {
    pub weight: f32,
    pub head: f64,
    pub temperature: f32,
}

/// The negative-feedback loss term (Alibaba's deep recall): for each negative-feedback example
/// (user at that moment, disliked item) `weight · softplus((s − margin) / temperature)`, the
/// sigmoid cross-entropy against label 0, added to the positives' loss (each part the
/// weighted mean over its own examples).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NegativeFeedback {
    pub weight: f32,
    pub margin: f32,
    pub temperature: f32,
}

pub const MAX_DIM: usize = 1024;
pub const MAX_HIDDEN: usize = 4096;
pub const MAX_EPOCHS: usize = 1000;
pub const MAX_BATCH: usize = 65_536;
pub const MAX_NEGATIVES: usize = 65_536;
pub const MAX_THREADS: usize = 64;

/// The options two-tower training (`Config`) and pre-rank training (`PrerankConfig`) share,
/// read by one parser; where their defaults differ, [`TWO_TOWER_DEFAULTS`] and
/// [`PRERANK_DEFAULTS`] say so side by side.
#[derive(Debug, Clone, PartialEq)]
pub struct Shared {
    pub min_count: usize,
    pub max_vocab: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub batch_size: usize,
    pub epochs: usize,
    pub patience: usize,
    pub seed: u64,
    pub threads: usize,
    pub init_std: f32,
}

/// The shared options' defaults that depend on what is trained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedDefaults {
    /// Two-tower vocabularies hold every item and user id of a catalogue; a pre-rank model's
    /// hold the ids of its training log's requests and candidates.
    pub max_vocab: usize,
    /// In-batch negatives grow with the batch; a pre-rank batch is rows of candidates.
    pub batch_size: usize,
}

pub const TWO_TOWER_DEFAULTS: SharedDefaults = SharedDefaults {
    max_vocab: 10_000_000,
    batch_size: 256,
};

pub const PRERANK_DEFAULTS: SharedDefaults = SharedDefaults {
    max_vocab: 1_000_000,
    batch_size: 512,
};

impl Shared {
    pub(crate) fn parse(o: &Obj, d: SharedDefaults) -> Result<Shared> {
        Ok(Shared {
            min_count: o.size("min_count", 1, 1, usize::MAX)?,
            max_vocab: o.size("max_vocab", d.max_vocab, 1, u32::MAX as usize - 2)?,
            lr: o.number("lr", 0.001, 1e-8, 100.0)? as f32,
            weight_decay: o.number("weight_decay", 0.0, 0.0, 1.0)? as f32,
            batch_size: o.size("batch_size", d.batch_size, 2, MAX_BATCH)?,
            epochs: o.size("epochs", 10, 1, MAX_EPOCHS)?,
            patience: o.size("patience", 3, 1, MAX_EPOCHS)?,
            seed: o.size("seed", 42, 0, usize::MAX)? as u64,
            threads: o.size("threads", 2, 1, MAX_THREADS)?,
            init_std: o.number("init_std", 0.05, 0.0, 10.0)? as f32,
        })
    }
}

pub(crate) use twotower_options::Obj;

fn pooling(o: &Obj, k: &str) -> Result<Pooling> {
    match o.text(k, "mean")? {
        "mean" => Ok(Pooling::Mean),
        "sum" => Ok(Pooling::Sum),
        "max" => Ok(Pooling::Max),
        other => Err(opt_err(
            o.p(k),
            format!("must be \"mean\", \"sum\" or \"max\", got \"{other}\""),
        )),
    }
}

pub(crate) fn tower(v: Option<&Value>, path: &str, dim: usize, side: Side) -> Result<TowerSpec> {
    let user = side == Side::User;
    let v = v.ok_or_else(|| opt_err(path, "required key is missing"))?;
    let o = Obj::new(v, path)?;
    o.allow(&[
        "features",
        "hidden",
        "activation",
        "layer_norm",
        "batch_norm",
        "dropout",
        "shortcut",
        "senet",
        "branches",
        "fusion",
        "experts",
        "task_hidden",
        "scene",
    ])?;
    let fs = o.get("features").and_then(Value::as_array).ok_or_else(|| {
        opt_err(
            o.p("features"),
            "must be a non-empty array of feature objects",
        )
    })?;
    if fs.is_empty() || fs.len() > 256 {
        return Err(opt_err(
            o.p("features"),
            format!("must list 1 to 256 features, got {}", fs.len()),
        ));
    }
    let mut features: Vec<FeatureSpec> = Vec::new();
    let mut sources: Vec<Source> = Vec::new();
    for (i, f) in fs.iter().enumerate() {
        let fpath = format!("{}[{i}]", o.p("features"));
        // A pre-rank feature's "source" is read here; the type's own keys are checked below.
        let stripped: Value;
        let f = match (side, f) {
            (Side::Prerank, Value::Object(m)) if m.contains_key("source") => {
                let mut m = m.clone();
                m.remove("source");
                stripped = Value::Object(m);
                &stripped
            }
            _ => f,
        };
        if side == Side::Prerank {
            let source = match fs[i].get("source") {
                None | Some(Value::Null) => Source::User,
                Some(Value::String(s)) if s == "user" => Source::User,
                Some(Value::String(s)) if s == "item" => Source::Item,
                Some(v) => {
                    return Err(opt_err(
                        format!("{fpath}.source"),
                        format!("must be \"user\" or \"item\", got {v}"),
                    ))
                }
            };
            sources.push(source);
        }
        let fo = Obj::new(f, &fpath)?;
        let name = fo.text("name", "")?;
        if !valid_name(name) {
            return Err(opt_err(
                fo.p("name"),
                format!(
                    "\"{name}\" is not a valid feature name ([A-Za-z_][A-Za-z0-9_]*, at most 63)"
                ),
            ));
        }
        if features.iter().any(|x| x.name() == name) {
            return Err(opt_err(
                fo.p("name"),
                format!("duplicate feature \"{name}\""),
            ));
        }
        let name = name.to_owned();
        let spec = match fo.text("type", "")? {
            "categorical" => {
                fo.allow(&["name", "type", "dim"])?;
                FeatureSpec::Categorical { name, dim: fo.size("dim", dim, 1, MAX_DIM)? }
            }
            "multi_categorical" => {
                fo.allow(&["name", "type", "dim", "pooling", "max_len"])?;
                FeatureSpec::Multi {
                    name,
                    dim: fo.size("dim", dim, 1, MAX_DIM)?,
                    pooling: pooling(&fo, "pooling")?,
                    max_len: fo.size("max_len", 100, 1, 10_000)?,
                }
            }
            "numeric" => {
                fo.allow(&["name", "type", "transform"])?;
                let transform = match fo.text("transform", "zscore")? {
                    "zscore" => NumTransform::Zscore,
                    "log1p" => NumTransform::Log1p,
                    "none" => NumTransform::None,
                    other => return Err(opt_err(fo.p("transform"), format!("must be \"zscore\", \"log1p\" or \"none\", got \"{other}\""))),
                };
                FeatureSpec::Numeric { name, transform }
            }
            "history" if user => {
                fo.allow(&["name", "type", "dim", "pooling", "max_len", "decay", "feedback"])?;
                let negative = match fo.text("feedback", "positive")? {
                    "positive" => false,
                    "negative" => true,
                    other => return Err(opt_err(fo.p("feedback"), format!("must be \"positive\" (the items the user engaged with) or \"negative\" (their negative feedback), got \"{other}\""))),
                };
                let decay = match fo.get("decay") {
                    None => Decay::None,
                    Some(d) => {
                        let d = Obj::new(d, fo.p("decay"))?;
                        d.allow(&["position", "half_life"])?;
                        match (d.get("position"), d.get("half_life")) {
                            (Some(_), None) => Decay::Position(d.number("position", 1.0, 1e-6, 1.0)?),
                            (None, Some(_)) => Decay::Age(d.number("half_life", 1.0, 1e-9, 1e15)?),
                            _ => return Err(opt_err(fo.p("decay"), "give exactly one of \"position\" (a factor per position, 0..1] and \"half_life\" (in the timestamps' unit)")),
                        }
                    }
                };
                FeatureSpec::History {
                    name,
                    dim: fo.size("dim", dim, 1, MAX_DIM)?,
                    max_len: fo.size("max_len", 50, 1, 10_000)?,
                    pooling: pooling(&fo, "pooling")?,
                    decay,
                    negative,
                }
            }
            "bucketize" => {
                fo.allow(&["name", "type", "dim", "boundaries", "buckets"])?;
                let boundaries = match (fo.get("boundaries"), fo.get("buckets")) {
                    (Some(Value::Array(a)), None) => {
                        let mut b: Vec<f64> = Vec::with_capacity(a.len());
                        for x in a {
                            let v = x.as_f64().filter(|v| v.is_finite()).ok_or_else(|| {
                                opt_err(fo.p("boundaries"), format!("must be finite numbers, got {x}"))
                            })?;
                            if b.last().is_some_and(|&p| v <= p) {
                                return Err(opt_err(fo.p("boundaries"), "must be strictly increasing"));
                            }
                            b.push(v);
                        }
                        if b.is_empty() || b.len() > 10_000 {
                            return Err(opt_err(fo.p("boundaries"), "must list 1 to 10000 numbers"));
                        }
                        Bucketing::Given(b)
                    }
                    (None, Some(_)) => Bucketing::Quantiles(fo.size("buckets", 10, 2, 10_001)?),
                    (None, None) => Bucketing::Quantiles(10),
                    _ => return Err(opt_err(fo.p("boundaries"), "give \"boundaries\" (an array of numbers) or \"buckets\" (a count of quantile buckets), not both")),
                };
                FeatureSpec::Bucketize { name, dim: fo.size("dim", dim, 1, MAX_DIM)?, boundaries }
            }
            "dense" => {
                fo.allow(&["name", "type", "dim"])?;
                FeatureSpec::Dense { name, dim: fo.size("dim", 1, 1, 4096)? }
            }
            "cross" if side == Side::Prerank => {
                fo.allow(&["name", "type", "of", "attention_dim"])?;
                if fs[i].get("source").is_some() {
                    return Err(opt_err(format!("{fpath}.source"), "a cross input has no source: it is computed per (user, candidate) pair"));
                }
                let of = fo.text("of", "")?;
                let of = Cross::ALL.iter().find(|(n, _)| *n == of).map(|(_, c)| *c).ok_or_else(|| {
                    opt_err(
                        fo.p("of"),
                        format!("must be one of {}, got \"{of}\"", Cross::ALL.iter().map(|(n, _)| format!("\"{n}\"")).collect::<Vec<_>>().join(", ")),
                    )
                })?;
                if features.iter().any(|x| matches!(x, FeatureSpec::Cross { of: o, .. } if *o == of)) {
                    return Err(opt_err(fo.p("of"), format!("the cross input \"{}\" is listed twice", of.name())));
                }
                *sources.last_mut().expect("pushed above") = Source::Cross(of);
                let attention_dim = if of == Cross::TargetAttention {
                    fo.size("attention_dim", 16, 1, 1024)?
                } else if fo.get("attention_dim").is_some() {
                    return Err(opt_err(fo.p("attention_dim"), "applies to the target_attention input only"));
                } else {
                    0
                };
                FeatureSpec::Cross { name, of, attention_dim }
            }
            "cross" => return Err(opt_err(fo.p("type"), "a cross input belongs to a pre-rank model, not a tower")),
            "history" if side == Side::Prerank => {
                return Err(opt_err(
                    fo.p("type"),
                    "a pre-rank model reads the history as given in the request: use \"multi_categorical\" over the history key, or the history_max / history_mean cross inputs",
                ))
            }
            "history" => return Err(opt_err(fo.p("type"), "a history feature belongs to the user tower")),
            other => {
                return Err(opt_err(
                    fo.p("type"),
                    format!(
                        "must be \"categorical\", \"multi_categorical\", \"numeric\", \"bucketize\", \"dense\"{}, got \"{other}\"",
                        match side {
                            Side::User => " or \"history\"",
                            Side::Item => "",
                            Side::Prerank => " or \"cross\"",
                        }
                    ),
                ))
            }
        };
        features.push(spec);
    }
    let hidden = widths(&o, "hidden")?;
    let activation = match o.text("activation", "relu")? {
        "relu" => Activation::Relu,
        "gelu" => Activation::Gelu,
        "tanh" => Activation::Tanh,
        "sigmoid" => Activation::Sigmoid,
        other => {
            return Err(opt_err(
                o.p("activation"),
                format!("must be relu, gelu, tanh or sigmoid, got \"{other}\""),
            ))
        }
    };
    let shortcut: Vec<String> = match o.get("shortcut") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                let n = x.as_str().unwrap_or_default();
                if features.iter().any(|f| f.name() == n) {
                    Ok(n.to_owned())
                } else {
                    Err(opt_err(
                        o.p("shortcut"),
                        format!("{x} is not a feature of this tower"),
                    ))
                }
            })
            .collect::<Result<_>>()?,
        Some(v) => {
            return Err(opt_err(
                o.p("shortcut"),
                format!("must be an array of feature names, got {v}"),
            ))
        }
    };
    let (branches, fusion) = branches(&o, &features, side)?;
    if !branches.is_empty() && !shortcut.is_empty() {
        return Err(opt_err(
            o.p("shortcut"),
            "a tower with branches has no shortcut: list the features among a branch's features",
        ));
    }
    if fusion == Fusion::Parallel && !hidden.is_empty() {
        return Err(opt_err(
            o.p("hidden"),
            "a parallel tower has no head: give each branch its hidden layers",
        ));
    }
    let any_hidden = !hidden.is_empty() || branches.iter().any(|b| !b.hidden.is_empty());
    let dropout = o.number("dropout", 0.0, 0.0, 0.95)? as f32;
    if dropout > 0.0 && !any_hidden {
        return Err(opt_err(
            o.p("dropout"),
            "applies after hidden layers: give \"hidden\" too",
        ));
    }
    let layer_norm = o.bool_or("layer_norm", false)?;
    let batch_norm = o.bool_or("batch_norm", false)?;
    if layer_norm && batch_norm {
        return Err(opt_err(
            o.p("batch_norm"),
            "give \"layer_norm\" or \"batch_norm\", not both",
        ));
    }
    if batch_norm && !any_hidden {
        return Err(opt_err(
            o.p("batch_norm"),
            "applies after hidden layers: give \"hidden\" too",
        ));
    }
    let senet = o.size("senet", 0, 0, 1024)?;
    if senet > 0 && features.len() < 2 {
        return Err(opt_err(
            o.p("senet"),
            "weighs fields against each other: give at least two features",
        ));
    }
    let multitask = multitask(&o, &features, &sources, side)?;
    if multitask.is_some() {
        if hidden.is_empty() {
            return Err(opt_err(
                o.p("hidden"),
                "a multi-task model's experts are its hidden layers: give at least one width",
            ));
        }
        if !shortcut.is_empty() {
            return Err(opt_err(
                o.p("shortcut"),
                "a multi-task model has no shortcut",
            ));
        }
    }
    Ok(TowerSpec {
        features,
        hidden,
        activation,
        layer_norm,
        dropout,
        shortcut,
        senet,
        batch_norm,
        sources,
        branches,
        fusion,
        multitask,
    })
}

/// A pre-rank model's `experts`, `task_hidden` and `scene` (its tasks come from the options'
/// `tasks`): `None` when none is given.
fn multitask(
    o: &Obj,
    features: &[FeatureSpec],
    sources: &[Source],
    side: Side,
) -> Result<Option<MultiTask>> {
    let given: Vec<&str> = ["experts", "task_hidden", "scene"]
        .into_iter()
        .filter(|k| o.get(k).is_some())
        .collect();
    if given.is_empty() {
        return Ok(None);
    }
    if side != Side::Prerank {
        return Err(opt_err(
            o.p(given[0]),
            "applies to a multi-task pre-rank model only",
        ));
    }
    let (mut shared, mut per_task) = (1, 0);
    if let Some(v) = o.get("experts") {
        let e = Obj::new(v, o.p("experts"))?;
        e.allow(&["shared", "per_task"])?;
        shared = e.size("shared", 1, 0, MAX_EXPERTS)?;
        per_task = e.size("per_task", 0, 0, MAX_EXPERTS)?;
        if shared + per_task == 0 {
            return Err(opt_err(
                o.p("experts"),
                "every task needs an expert: give \"shared\" or \"per_task\" at least 1",
            ));
        }
    }
    let task_hidden = widths(o, "task_hidden")?;
    let scene = match o.get("scene") {
        None => None,
        Some(v) => {
            let n = v.as_str().unwrap_or_default();
            let Some(i) = features.iter().position(|f| f.name() == n) else {
                return Err(opt_err(
                    o.p("scene"),
                    format!("{v} is not a feature of this model"),
                ));
            };
            let categorical = matches!(
                features[i],
                FeatureSpec::Categorical { .. } | FeatureSpec::Dense { .. }
            );
            if sources.get(i) != Some(&Source::User) || !categorical {
                return Err(opt_err(
                    o.p("scene"),
                    format!("\"{n}\" must be a categorical or dense feature of the request (\"source\": \"user\")"),
                ));
            }
            if features.len() < 2 {
                return Err(opt_err(
                    o.p("scene"),
                    "the scene gate scales the other features: give at least one more",
                ));
            }
            Some(i)
        }
    };
    Ok(Some(MultiTask {
        tasks: Vec::new(),
        shared,
        per_task,
        task_hidden,
        scene,
    }))
}

pub const MAX_BRANCHES: usize = 8;

impl TowerSpec {
    /// An estimate of the dense layers' size before anything is allocated: (parameters, the
    /// sum of the layers' widths, which bounds a row's activations). `out` is the output width
    /// (`dim`, or 1 for a pre-rank model), `vector_dim` the towers' vectors' (cross inputs).
    pub fn dense_size(&self, out: usize, vector_dim: usize) -> (usize, usize) {
        let width = |f: &FeatureSpec| match f {
            FeatureSpec::Categorical { dim, .. }
            | FeatureSpec::Multi { dim, .. }
            | FeatureSpec::History { dim, .. }
            | FeatureSpec::Bucketize { dim, .. }
            | FeatureSpec::Dense { dim, .. } => *dim,
            FeatureSpec::Numeric { .. } => 1,
            FeatureSpec::Cross { of, .. } => {
                if of.is_vector() {
                    vector_dim
                } else {
                    1
                }
            }
        };
        // Linear layers from `from` through `widths`: (weights and biases, widths).
        let chain = |from: usize, widths: &[usize]| -> (usize, usize) {
            let (mut params, mut sum, mut w) = (0usize, from, from);
            for &n in widths {
                params = params.saturating_add(w.saturating_add(1).saturating_mul(n) + 2 * n);
                sum = sum.saturating_add(n);
                w = n;
            }
            (params, sum)
        };
        let w0: usize = self.features.iter().map(width).sum();
        let nf = self.features.len();
        let mut params = if self.senet > 0 {
            2 * nf * self.senet + self.senet + nf
        } else {
            0
        };
        for f in &self.features {
            if let FeatureSpec::Cross { attention_dim, .. } = f {
                params += 2 * attention_dim * vector_dim;
            }
        }
        let mut sum = w0;
        if let Some(mt) = &self.multitask {
            let t = mt.tasks.len().max(out).max(1);
            let experts = mt.shared + mt.per_task * t;
            let ew = self.hidden.last().copied().unwrap_or(1);
            let (p, s) = chain(w0, &self.hidden);
            params = params.saturating_add(p.saturating_mul(experts));
            sum = sum.saturating_add(s.saturating_mul(experts));
            let mut widths = mt.task_hidden.clone();
            widths.push(1);
            let (p, s) = chain(ew, &widths);
            let k = mt.shared + mt.per_task;
            params = params.saturating_add((p + (k + 1) * w0).saturating_mul(t));
            sum = sum.saturating_add((s + k).saturating_mul(t));
            if mt.scene.is_some() {
                params = params.saturating_add(w0.saturating_mul(w0 + 1));
                sum = sum.saturating_add(w0);
            }
            return (params, sum);
        }
        if self.branches.is_empty() {
            let extra: usize = self
                .features
                .iter()
                .filter(|f| self.shortcut.iter().any(|n| n == f.name()))
                .map(width)
                .sum();
            let mut widths = self.hidden.clone();
            widths.push(out);
            let (p, s) = chain(w0, &widths);
            params = params.saturating_add(p + extra * out);
            sum = sum.saturating_add(s + extra);
        } else {
            let k = self.branches.len();
            let bw = if self.fusion == Fusion::Parallel {
                out / k.max(1)
            } else {
                out
            };
            for b in &self.branches {
                let from: usize = b.features.iter().map(|&i| width(&self.features[i])).sum();
                let mut widths = b.hidden.clone();
                widths.push(bw);
                let (p, s) = chain(from, &widths);
                params = params.saturating_add(p);
                sum = sum.saturating_add(s);
            }
            params += k * k * bw + k;
            let mut widths = self.hidden.clone();
            widths.push(out);
            let (p, s) = chain(k * bw, &widths);
            params = params.saturating_add(p);
            sum = sum.saturating_add(s);
        }
        (params, sum)
    }
}

/// A tower's `branches` and `fusion`.
fn branches(o: &Obj, features: &[FeatureSpec], side: Side) -> Result<(Vec<Branch>, Fusion)> {
    let fusion = match o.text("fusion", "attention")? {
        "concat" => Fusion::Concat,
        "sum" => Fusion::Sum,
        "weighted_sum" => Fusion::WeightedSum,
        "attention" => Fusion::Attention,
        "parallel" if side != Side::Prerank => Fusion::Parallel,
        other => {
            return Err(opt_err(o.p("fusion"), format!("must be \"concat\", \"sum\", \"weighted_sum\", \"attention\" or \"parallel\", got \"{other}\"")))
        }
    };
    let Some(v) = o.get("branches") else {
        if o.get("fusion").is_some() {
            return Err(opt_err(
                o.p("fusion"),
                "joins branches: give \"branches\" too",
            ));
        }
        return Ok((Vec::new(), fusion));
    };
    if side == Side::Prerank {
        return Err(opt_err(o.p("branches"), "a pre-rank model is one stack"));
    }
    let arr = match v {
        Value::Array(a) if (2..=MAX_BRANCHES).contains(&a.len()) => a,
        _ => {
            return Err(opt_err(
                o.p("branches"),
                format!("must be an array of 2 to {MAX_BRANCHES} branch objects"),
            ))
        }
    };
    let mut out: Vec<Branch> = Vec::with_capacity(arr.len());
    for (i, b) in arr.iter().enumerate() {
        let bp = format!("{}[{i}]", o.p("branches"));
        let bo = Obj::new(b, &bp)?;
        bo.allow(&["name", "features", "hidden"])?;
        let name = bo.text("name", "")?;
        if !valid_name(name) {
            return Err(opt_err(
                bo.p("name"),
                format!(
                    "\"{name}\" is not a valid branch name ([A-Za-z_][A-Za-z0-9_]*, at most 63)"
                ),
            ));
        }
        if features.iter().any(|f| f.name() == name)
            || out.iter().any(|x| x.name == name)
            || ["fusion", "head"].contains(&name)
        {
            return Err(opt_err(bo.p("name"), format!("\"{name}\" is taken (by a feature, another branch, or the \"fusion\" and \"head\" nodes)")));
        }
        let fs: Vec<usize> = match bo.get("features") {
            None => (0..features.len()).collect(),
            Some(Value::Array(a)) if !a.is_empty() => {
                let mut idx = Vec::with_capacity(a.len());
                for x in a {
                    let n = x.as_str().unwrap_or_default();
                    let Some(k) = features.iter().position(|f| f.name() == n) else {
                        return Err(opt_err(
                            bo.p("features"),
                            format!("{x} is not a feature of this tower"),
                        ));
                    };
                    if idx.contains(&k) {
                        return Err(opt_err(bo.p("features"), format!("{x} is listed twice")));
                    }
                    idx.push(k);
                }
                idx
            }
            Some(v) => {
                return Err(opt_err(
                    bo.p("features"),
                    format!("must be a non-empty array of feature names, got {v}"),
                ))
            }
        };
        let hidden = widths(&bo, "hidden")?;
        out.push(Branch {
            name: name.to_owned(),
            features: fs,
            hidden,
        });
    }
    if let Some(f) = features
        .iter()
        .enumerate()
        .find(|(i, _)| !out.iter().any(|b| b.features.contains(i)))
    {
        return Err(opt_err(
            o.p("branches"),
            format!("feature \"{}\" is in no branch", f.1.name()),
        ));
    }
    Ok((out, fusion))
}

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .enumerate()
            .all(|(i, c)| c == b'_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()))
}

/// An array of hidden widths under `k` (absent: none).
fn widths(o: &Obj, k: &str) -> Result<Vec<usize>> {
    let w: Vec<usize> = match o.get(k) {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&n| (1..=MAX_HIDDEN as u64).contains(&n))
                    .map(|n| n as usize)
                    .ok_or_else(|| {
                        opt_err(
                            o.p(k),
                            format!("widths must be integers 1..{MAX_HIDDEN}, got {x}"),
                        )
                    })
            })
            .collect::<Result<_>>()?,
        Some(v) => {
            return Err(opt_err(
                o.p(k),
                format!("must be an array of widths, got {v}"),
            ))
        }
    };
    if w.len() > 16 {
        return Err(opt_err(o.p(k), "at most 16 hidden layers"));
    }
    Ok(w)
}

impl Config {
    /// The user tower's history features.
    pub fn histories(&self) -> Vec<crate::data::HistorySpec> {
        self.user
            .features
            .iter()
            .filter_map(|f| match f {
                FeatureSpec::History {
                    name,
                    max_len,
                    decay,
                    negative,
                    ..
                } => Some(crate::data::HistorySpec {
                    name: name.clone(),
                    max_len: *max_len,
                    decay: decay.clone(),
                    negative: *negative,
                }),
                _ => None,
            })
            .collect()
    }

    pub fn parse(v: &Value) -> Result<Config> {
        let o = Obj::new(v, "")?;
        o.allow(&[
            "dim",
            "user",
            "item",
            "min_count",
            "max_vocab",
            "loss",
            "negatives",
            "temperature",
            "margin",
            "logq",
            "in_batch",
            "lr",
            "weight_decay",
            "sparse_optimizer",
            "sparse_lr",
            "ftrl_l1",
            "ftrl_l2",
            "ftrl_beta",
            "batch_size",
            "epochs",
            "patience",
            "seed",
            "threads",
            "k",
            "subsample",
            "init_std",
            "validation",
            "hard_ratio",
            "hard_per_row",
            "freeze_dense",
            "dual_augmented",
            "negative_feedback",
            "debias",
        ])?;
        let dim = o.size("dim", 32, 1, MAX_DIM)?;
        let user = tower(o.get("user"), "user", dim, Side::User)?;
        let item = tower(o.get("item"), "item", dim, Side::Item)?;
        let loss_name = o.text("loss", "softmax")?;
        let in_batch = o.bool_or("in_batch", true)?;
        let default_neg = match loss_name {
            "softmax" => 0,
            _ => 2,
        };
        let negatives = o.size("negatives", default_neg, 0, MAX_NEGATIVES)?;
        let loss = match loss_name {
            "softmax" => {
                if !in_batch && negatives == 0 {
                    return Err(opt_err("negatives", "a softmax without in-batch negatives needs global negatives (negatives >= 1)"));
                }
                LossKind::Softmax { in_batch, logq: o.bool_or("logq", true)? }
            }
            "pointwise" | "triplet_hinge" | "triplet_logistic" => {
                if o.get("in_batch").is_some() || o.get("logq").is_some() {
                    return Err(opt_err("in_batch", format!("\"in_batch\" and \"logq\" apply to the softmax loss, not \"{loss_name}\"")));
                }
                if negatives == 0 {
                    return Err(opt_err("negatives", format!("the {loss_name} loss needs negatives >= 1 per positive")));
                }
                match loss_name {
                    "pointwise" => LossKind::Pointwise,
                    "triplet_hinge" => LossKind::TripletHinge { margin: o.number("margin", 0.2, 0.0, 2.0)? as f32 },
                    _ => LossKind::TripletLogistic,
                }
            }
            other => {
                return Err(opt_err("loss", format!("must be \"softmax\", \"pointwise\", \"triplet_hinge\" or \"triplet_logistic\", got \"{other}\"")))
            }
        };
        if o.get("margin").is_some() && !matches!(loss, LossKind::TripletHinge { .. }) {
            return Err(opt_err("margin", "applies to the triplet_hinge loss only"));
        }
        let sparse_lr = o.number("sparse_lr", 0.01, 1e-8, 100.0)? as f32;
        let sparse = match o.text("sparse_optimizer", "lazy_adam")? {
            "lazy_adam" => Sparse::LazyAdam { lr: sparse_lr },
            "adagrad" => Sparse::Adagrad {
                lr: sparse_lr,
                initial: 0.1,
            },
            "ftrl" => Sparse::Ftrl {
                alpha: sparse_lr,
                beta: o.number("ftrl_beta", 1.0, 0.0, 1e6)? as f32,
                l1: o.number("ftrl_l1", 0.0, 0.0, 1e6)? as f32,
                l2: o.number("ftrl_l2", 0.0, 0.0, 1e6)? as f32,
            },
            other => {
                return Err(opt_err(
                    "sparse_optimizer",
                    format!("must be \"lazy_adam\", \"adagrad\" or \"ftrl\", got \"{other}\""),
                ))
            }
        };
        if !matches!(sparse, Sparse::Ftrl { .. })
            && ["ftrl_l1", "ftrl_l2", "ftrl_beta"]
                .iter()
                .any(|k| o.get(k).is_some())
        {
            return Err(opt_err(
                "ftrl_l1",
                "the ftrl_* options need \"sparse_optimizer\": \"ftrl\"",
            ));
        }
        if (user.fusion == Fusion::Parallel) != (item.fusion == Fusion::Parallel)
            && (!user.branches.is_empty() || !item.branches.is_empty())
        {
            let side = if user.fusion == Fusion::Parallel {
                "item"
            } else {
                "user"
            };
            return Err(opt_err(
                format!("{side}.fusion"),
                "parallel two-towers need \"fusion\": \"parallel\" in both towers",
            ));
        }
        if user.fusion == Fusion::Parallel && !user.branches.is_empty() {
            let k = user.branches.len();
            if item.branches.len() != k {
                return Err(opt_err("item.branches", format!("parallel two-towers pair the branches: the user tower has {k}, the item tower {}", item.branches.len())));
            }
            if dim % k != 0 {
                return Err(opt_err("dim", format!("parallel two-towers split dim into {k} equal sub-vectors: {dim} is not a multiple of {k}")));
            }
        }
        let augmented = match o.get("dual_augmented") {
            None => None,
            Some(v) => {
                let a = Obj::new(v, "dual_augmented")?;
                a.allow(&["user", "item", "lambda"])?;
                let pick = |side: &str, t: &TowerSpec| -> Result<usize> {
                    let name = a.text(side, "")?;
                    match t.features.iter().position(|f| f.name() == name) {
                        Some(i) if matches!(t.features[i], FeatureSpec::Categorical { dim: d, .. } if d == dim) => Ok(i),
                        Some(_) => Err(opt_err(a.p(side), format!("\"{name}\" must be a categorical feature of width dim ({dim}): its embedding is the augmented vector"))),
                        None => Err(opt_err(a.p(side), format!("must name a categorical feature of the {side} tower (its id), got \"{name}\""))),
                    }
                };
                Some(Augmented {
                    lambda: a.number("lambda", 0.5, 0.0, 100.0)? as f32,
                    user: pick("user", &user)?,
                    item: pick("item", &item)?,
                })
            }
        };
        let temperature = o.number("temperature", 0.05, 1e-4, 100.0)? as f32;
        let negative_feedback = {
            let empty = Value::Object(Default::default());
            let nf = Obj::new(
                o.get("negative_feedback").unwrap_or(&empty),
                "negative_feedback",
            )?;
            nf.allow(&["weight", "margin", "temperature"])?;
            NegativeFeedback {
                weight: nf.number("weight", 1.0, 0.0, 100.0)? as f32,
                margin: nf.number("margin", 0.0, -1.0, 1.0)? as f32,
                temperature: nf.number("temperature", 0.1, 1e-4, 100.0)? as f32,
            }
        };
        let debias = match o.get("debias") {
            None => None,
            Some(v) => {
                let d = Obj::new(v, "debias")?;
                d.allow(&["weight", "head", "temperature"])?;
                Some(Debias {
                    weight: d.number("weight", 1.0, 0.0, 100.0)? as f32,
                    head: d.number("head", 0.2, 0.001, 0.999)?,
                    temperature: d.number("temperature", 0.1, 1e-4, 100.0)? as f32,
                })
            }
        }
        // Weight 0 is no debiasing: no pairs are drawn (their items would still move by their
        // optimiser's momentum).
        .filter(|d| d.weight > 0.0);
        let shared = Shared::parse(&o, TWO_TOWER_DEFAULTS)?;
        let cfg = Config {
            negative_feedback,
            debias,
            augmented,
            dim,
            user,
            item,
            min_count: shared.min_count,
            max_vocab: shared.max_vocab,
            loss,
            negatives,
            temperature,
            lr: shared.lr,
            weight_decay: shared.weight_decay,
            sparse,
            batch_size: shared.batch_size,
            epochs: shared.epochs,
            patience: shared.patience,
            seed: shared.seed,
            threads: shared.threads,
            k: o.size("k", 50, 1, 10_000)?,
            subsample: o.number("subsample", 0.0, 0.0, 1.0)?,
            init_std: shared.init_std,
            hard_ratio: o.number("hard_ratio", 0.5, 0.0, 1.0)?,
            hard_per_row: o.size("hard_per_row", 2, 0, 1024)?,
            freeze_dense: o.bool_or("freeze_dense", false)?,
            validate: match o.text("validation", "last")? {
                "last" => true,
                "none" => false,
                other => return Err(opt_err("validation", format!("must be \"last\" (each user's last interaction) or \"none\", got \"{other}\""))),
            },
        };
        Ok(cfg)
    }
}
