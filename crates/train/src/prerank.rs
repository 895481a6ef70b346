//! Training a pre-rank model (the `"prerank"` model kind) from logged requests: each request
//! carries the user's features, the user tower's vector, the item vectors of the user's history
//! and the candidates the funnel showed the ranking stage, each with its label and, optionally,
//! the ranking model's (the teacher's) score.
//!
//! Objectives (seeds 001 and 004):
//! - `labels`: the logistic loss of each candidate's label (a number in [0, 1]);
//! - `distill`: the labels' loss plus λ·(s − t)², the student's logit `s` pulled toward the
//!   teacher's score `t`, with λ ramped linearly from 0 over the first `ramp_steps` steps;
//! - `cascade`: the teacher's top `top_n` of each request are the positives, the rest of that
//!   request's candidates the negatives (the logistic loss).
//!
//! The cross inputs are computed by the funnel's own [`CrossInputs`], so the trained model sees
//! at serving time exactly the inputs it learned from. Validation: the last requests (in the
//! log's order), ranked by the student; the best epoch is kept.

use crate::config::{tower, Obj, Shared, Side, TowerSpec, PRERANK_DEFAULTS};
use crate::error::{opt_err, Result, TrainError};
use crate::eval::{ranks, Accumulator, Metrics};
use crate::loss::{sigmoid, softplus};
use crate::model::{self, FeatureStats};
use crate::net::{Grads, Tower};
use crate::optim::Sparse;
use crate::train::{load, par, split, stats_of, Event, Optim, Progress};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Instant;
use twotower_funnel::prerank::{CrossInputs, Pair};
use twotower_metric::Metric;
use twotower_tower::{Cross, Encoded, Model, Part, Source};

/// What the student learns from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    Labels,
    Distill { lambda: f32, ramp_steps: usize },
    Cascade { top_n: usize },
}

/// The options of a pre-rank training run (a JSON object; `docs/funnel.md` lists every key).
#[derive(Debug, Clone, PartialEq)]
pub struct PrerankConfig {
    /// The network: features (`"source": "user"|"item"`, or `"type": "cross"`), hidden layers.
    pub model: TowerSpec,
    pub objective: Objective,
    pub min_count: usize,
    pub max_vocab: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub sparse: Sparse,
    pub batch_size: usize,
    pub epochs: usize,
    pub patience: usize,
    pub seed: u64,
    pub threads: usize,
    /// K of the validation metrics (recall of the positives in the student's top K).
    pub k: usize,
    pub init_std: f32,
    /// The share of requests (the last ones) that validate; 0 = none (the last epoch is kept).
    pub validation: f64,
    /// A multi-task model's tasks (empty: one task, the label column); their heads, links and
    /// fuse weights are in `model.multitask`.
    pub tasks: Vec<TaskOption>,
    /// The task whose labels are the validation's positives (ranked by the fused score).
    pub validate_task: usize,
}

/// A task's loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskLoss {
    /// The logistic loss of a label in [0, 1] (link sigmoid).
    Logistic,
    /// The squared error of any finite label (link identity).
    Squared,
}

/// One task of a multi-task run: the column its labels come from, its loss and its weight in
/// the summed loss.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOption {
    pub name: String,
    pub column: String,
    pub loss: TaskLoss,
    pub weight: f32,
}

/// The options' `tasks`: 1 to 16 objects `{name, column, loss, weight, fuse}`.
fn parse_tasks(v: &Value) -> Result<(Vec<TaskOption>, Vec<twotower_tower::Task>)> {
    let arr = match v {
        Value::Array(a) if (1..=twotower_tower::MAX_TASKS).contains(&a.len()) => a,
        _ => {
            return Err(opt_err(
                "tasks",
                format!(
                    "must be an array of 1 to {} task objects",
                    twotower_tower::MAX_TASKS
                ),
            ))
        }
    };
    let (mut opts, mut heads): (Vec<TaskOption>, Vec<twotower_tower::Task>) = (vec![], vec![]);
    for (i, t) in arr.iter().enumerate() {
        let o = Obj::new(t, format!("tasks[{i}]"))?;
        o.allow(&["name", "column", "loss", "weight", "fuse"])?;
        let name = o.text("name", "")?;
        if !crate::config::valid_name(name) || name == "fused" {
            return Err(opt_err(
                o.p("name"),
                format!("\"{name}\" is not a valid task name ([A-Za-z_][A-Za-z0-9_]*, at most 63, not \"fused\")"),
            ));
        }
        if opts.iter().any(|x| x.name == name) {
            return Err(opt_err(o.p("name"), format!("\"{name}\" is listed twice")));
        }
        let column = o.text("column", name)?;
        if column.is_empty() {
            return Err(opt_err(
                o.p("column"),
                "must name a column of the candidates",
            ));
        }
        let (loss, link) = match o.text("loss", "logistic")? {
            "logistic" => (TaskLoss::Logistic, twotower_tower::Link::Sigmoid),
            "squared" => (TaskLoss::Squared, twotower_tower::Link::Identity),
            other => {
                return Err(opt_err(
                    o.p("loss"),
                    format!("must be \"logistic\" or \"squared\", got \"{other}\""),
                ))
            }
        };
        let weight = o.number("weight", 1.0, 0.0, 1e6)? as f32;
        let fuse = o.number("fuse", 1.0, -1e6, 1e6)? as f32;
        opts.push(TaskOption {
            name: name.to_owned(),
            column: column.to_owned(),
            loss,
            weight,
        });
        heads.push(twotower_tower::Task {
            name: name.to_owned(),
            link,
            fuse,
        });
    }
    if opts.iter().all(|t| t.weight == 0.0) {
        return Err(opt_err(
            "tasks",
            "every task's \"weight\" is 0: nothing would be learned",
        ));
    }
    if heads.iter().all(|t| t.fuse == 0.0) {
        return Err(opt_err(
            "tasks",
            "every task's \"fuse\" is 0: the fused score would rank nothing",
        ));
    }
    Ok((opts, heads))
}

impl PrerankConfig {
    pub fn parse(v: &Value) -> Result<PrerankConfig> {
        let o = Obj::new(v, "")?;
        o.allow(&[
            "model",
            "objective",
            "lambda",
            "ramp_steps",
            "top_n",
            "min_count",
            "max_vocab",
            "lr",
            "weight_decay",
            "sparse_optimizer",
            "sparse_lr",
            "batch_size",
            "epochs",
            "patience",
            "seed",
            "threads",
            "k",
            "init_std",
            "validation",
            "tasks",
            "validate_task",
        ])?;
        let mut model = tower(o.get("model"), "model", 16, Side::Prerank)?;
        let mut tasks = Vec::new();
        let mut validate_task = 0;
        match (o.get("tasks"), &mut model.multitask) {
            (Some(v), mt) => {
                let (opts, heads) = parse_tasks(v)?;
                if model.hidden.is_empty() {
                    return Err(opt_err(
                        "model.hidden",
                        "a multi-task model's experts are its hidden layers: give at least one width",
                    ));
                }
                if !model.shortcut.is_empty() {
                    return Err(opt_err(
                        "model.shortcut",
                        "a multi-task model has no shortcut",
                    ));
                }
                let mt = mt.get_or_insert(crate::config::MultiTask {
                    tasks: Vec::new(),
                    shared: 1,
                    per_task: 0,
                    task_hidden: Vec::new(),
                    scene: None,
                });
                mt.tasks = heads;
                // The graph's nodes: the scene gate, the experts, a gate per task with two or
                // more, a head per task, the output.
                let t = mt.tasks.len();
                let nodes = usize::from(mt.scene.is_some())
                    + mt.shared
                    + mt.per_task * t
                    + if mt.shared + mt.per_task >= 2 { t } else { 0 }
                    + t
                    + usize::from(t > 1);
                if nodes > twotower_tower::MAX_GRAPH_NODES {
                    return Err(opt_err(
                        "model.experts",
                        format!(
                            "a model has at most {} graph nodes; {t} tasks with these experts make {nodes} (the scene gate, the experts, a gate and a head per task, the output)",
                            twotower_tower::MAX_GRAPH_NODES
                        ),
                    ));
                }
                if let Some(v) = o.get("validate_task") {
                    let n = v.as_str().unwrap_or_default();
                    validate_task = opts.iter().position(|t| t.name == n).ok_or_else(|| {
                        opt_err("validate_task", format!("{v} is not one of the tasks"))
                    })?;
                }
                tasks = opts;
            }
            (None, Some(_)) => {
                let k = ["experts", "task_hidden", "scene"]
                    .into_iter()
                    .find(|k| v.get("model").and_then(|m| m.get(k)).is_some())
                    .unwrap_or("experts");
                return Err(opt_err(
                    format!("model.{k}"),
                    "belongs to a multi-task model: give \"tasks\" too",
                ));
            }
            (None, None) => {
                if o.get("validate_task").is_some() {
                    return Err(opt_err("validate_task", "applies with \"tasks\" only"));
                }
            }
        }
        let objective = match o.text("objective", "labels")? {
            "labels" => Objective::Labels,
            "distill" => Objective::Distill {
                lambda: o.number("lambda", 1.0, 0.0, 1e6)? as f32,
                ramp_steps: o.size("ramp_steps", 100, 0, 100_000_000)?,
            },
            "cascade" => Objective::Cascade {
                top_n: o.size("top_n", 10, 1, 100_000)?,
            },
            other => {
                return Err(opt_err(
                    "objective",
                    format!("must be \"labels\", \"distill\" or \"cascade\", got \"{other}\""),
                ))
            }
        };
        if !tasks.is_empty() && objective != Objective::Labels {
            return Err(opt_err(
                "objective",
                "a multi-task model learns from its tasks' labels: leave \"objective\" out (\"labels\")",
            ));
        }
        let distill = matches!(objective, Objective::Distill { .. });
        for k in ["lambda", "ramp_steps"] {
            if o.get(k).is_some() && !distill {
                return Err(opt_err(k, "applies to \"objective\": \"distill\" only"));
            }
        }
        if o.get("top_n").is_some() && !matches!(objective, Objective::Cascade { .. }) {
            return Err(opt_err(
                "top_n",
                "applies to \"objective\": \"cascade\" only",
            ));
        }
        let sparse_lr = o.number("sparse_lr", 0.01, 1e-8, 100.0)? as f32;
        let sparse = match o.text("sparse_optimizer", "lazy_adam")? {
            "lazy_adam" => Sparse::LazyAdam { lr: sparse_lr },
            "adagrad" => Sparse::Adagrad {
                lr: sparse_lr,
                initial: 0.1,
            },
            other => {
                return Err(opt_err(
                    "sparse_optimizer",
                    format!("must be \"lazy_adam\" or \"adagrad\", got \"{other}\""),
                ))
            }
        };
        let shared = Shared::parse(&o, PRERANK_DEFAULTS)?;
        Ok(PrerankConfig {
            model,
            objective,
            min_count: shared.min_count,
            max_vocab: shared.max_vocab,
            lr: shared.lr,
            weight_decay: shared.weight_decay,
            sparse,
            batch_size: shared.batch_size,
            epochs: shared.epochs,
            patience: shared.patience,
            seed: shared.seed,
            threads: shared.threads,
            k: o.size("k", 10, 1, 100_000)?,
            init_std: shared.init_std,
            validation: o.number("validation", 0.2, 0.0, 0.5)?,
            tasks,
            validate_task,
        })
    }

    /// Whether the objective reads the teacher's scores.
    pub fn needs_teacher(&self) -> bool {
        !matches!(self.objective, Objective::Labels)
    }
}

/// A candidate item of the log: its feature row (an object, `{}` without one) and its vector.
#[derive(Debug, Clone)]
pub struct LogItem {
    pub id: i64,
    pub features: Value,
    pub vector: Vec<f32>,
}

/// One candidate of a logged request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogCandidate {
    /// Index into [`RankLog::items`].
    pub item: u32,
    /// 1-based position in the list the recall stage produced (the `recall_rank` input).
    pub position: u32,
    pub label: f32,
    pub teacher: Option<f32>,
}

/// One logged request.
#[derive(Debug, Clone)]
pub struct LogRequest {
    /// The request's id (for messages).
    pub id: String,
    /// The request's features object (as `recommend` receives it).
    pub features: Value,
    /// The user tower's vector for these features.
    pub user: Vec<f32>,
    /// The item vectors of the user's history (for the `history_*` cross inputs).
    pub history: Vec<Vec<f32>>,
    pub candidates: Vec<LogCandidate>,
    /// A multi-task run's labels: per candidate, one per task (NaN: none for that task).
    pub labels: Vec<f32>,
}

/// The logged requests and their candidate items.
#[derive(Debug, Default)]
pub struct RankLog {
    pub metric: Option<Metric>,
    pub items: Vec<LogItem>,
    pub requests: Vec<LogRequest>,
    index: HashMap<i64, u32>,
}

impl RankLog {
    pub fn new(metric: Metric) -> RankLog {
        RankLog {
            metric: Some(metric),
            ..RankLog::default()
        }
    }

    /// The index of item `id` (added with `features` and `vector` when new).
    pub fn item(&mut self, id: i64, features: impl FnOnce() -> (Value, Vec<f32>)) -> u32 {
        if let Some(&i) = self.index.get(&id) {
            return i;
        }
        let (features, vector) = features();
        let i = self.items.len() as u32;
        self.items.push(LogItem {
            id,
            features,
            vector,
        });
        self.index.insert(id, i);
        i
    }

    pub fn item_index(&self, id: i64) -> Option<u32> {
        self.index.get(&id).copied()
    }
}

/// One finished epoch.
#[derive(Debug, Clone)]
pub struct PrerankEpoch {
    pub epoch: usize,
    pub loss: f64,
    pub seconds: f64,
    pub valid: Option<Metrics>,
    /// Of the teacher's top K per validation request, the share in the student's top K.
    pub teacher_agreement: Option<f64>,
}

/// A trained pre-rank model, ready to be stored as a model version.
#[derive(Debug, Clone)]
pub struct TrainedPrerank {
    pub spec: String,
    pub weights: Vec<u8>,
    pub best_epoch: usize,
    pub epochs: Vec<PrerankEpoch>,
    pub train_examples: usize,
    pub valid_requests: usize,
    pub parameters: usize,
}

/// Each request's targets: the labels, or (cascade) 1 for the teacher's top `top_n`.
fn targets(cfg: &PrerankConfig, log: &RankLog, r: &LogRequest) -> Vec<f32> {
    match cfg.objective {
        Objective::Cascade { top_n } => {
            let mut order: Vec<usize> = (0..r.candidates.len()).collect();
            order.sort_by(|&a, &b| {
                let (ca, cb) = (&r.candidates[a], &r.candidates[b]);
                cb.teacher
                    .unwrap_or(f32::NEG_INFINITY)
                    .total_cmp(&ca.teacher.unwrap_or(f32::NEG_INFINITY))
                    .then(
                        log.items[ca.item as usize]
                            .id
                            .cmp(&log.items[cb.item as usize].id),
                    )
            });
            let mut t = vec![0f32; r.candidates.len()];
            for &i in order.iter().take(top_n) {
                t[i] = 1.0;
            }
            t
        }
        _ if !cfg.tasks.is_empty() => r.labels.clone(),
        _ => r.candidates.iter().map(|c| c.label).collect(),
    }
}

/// The loss of one output `s` of task `t` for label `y` (NaN: none) and its gradient.
pub fn task_loss(t: &TaskOption, s: f32, y: f32) -> (f64, f32) {
    if y.is_nan() || t.weight == 0.0 {
        return (0.0, 0.0);
    }
    let (s64, y64, w) = (s as f64, y as f64, t.weight as f64);
    match t.loss {
        TaskLoss::Logistic => (
            w * (softplus(s64) - y64 * s64),
            (w * (sigmoid(s64) - y64)) as f32,
        ),
        TaskLoss::Squared => {
            let d = s64 - y64;
            (w * d * d, (w * 2.0 * d) as f32)
        }
    }
}

/// The encoded, ready-to-assemble log.
struct Encodings {
    users: Vec<Part>,
    items: Vec<Part>,
    pre: Vec<Vec<Pair>>,
}

fn assemble(
    model: &Model,
    log: &RankLog,
    enc: &Encodings,
    metric: Metric,
    r: usize,
    c: usize,
) -> Encoded {
    let req = &log.requests[r];
    let cand = req.candidates[c];
    let v = &log.items[cand.item as usize].vector;
    let pair = &enc.pre[r][c];
    let crosses = CrossInputs::new(metric, &req.user, &[]);
    let mut x = model.assemble(
        &enc.users[r],
        &enc.items[cand.item as usize],
        &mut |x, out| crosses.fill(x, v, pair, out),
    );
    // Target attention is computed by the trained tower from the candidate's vector and the
    // history's (its weights change every step).
    if let Some(fi) = model.attention_feature() {
        // (The vectors serving reads, no more.)
        let mut buf = v.clone();
        twotower_tower::attention::attended(&req.history, v.len())
            .for_each(|h| buf.extend_from_slice(h));
        x.set_dense(fi, buf);
    }
    x
}

/// The loss of one row and its gradient with respect to the logit `s`.
fn row_loss(s: f32, y: f32, teacher: Option<f32>, lambda: f32) -> (f64, f32) {
    let (s64, y64) = (s as f64, y as f64);
    let mut l = softplus(s64) - y64 * s64;
    let mut g = sigmoid(s64) - y64;
    if let (Some(t), true) = (teacher, lambda > 0.0) {
        let d = s64 - t as f64;
        l += lambda as f64 * d * d;
        g += 2.0 * lambda as f64 * d;
    }
    (l, g as f32)
}

/// Trains a pre-rank model on `log`. `budget` bounds the memory the run allocates (bytes).
pub fn train_prerank(
    cfg: &PrerankConfig,
    log: &RankLog,
    budget: usize,
    progress: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<TrainedPrerank> {
    let metric = log
        .metric
        .ok_or_else(|| TrainError::NoData("the log has no metric".into()))?;
    if log.requests.is_empty() {
        return Err(TrainError::NoData("no logged requests".into()));
    }
    let dim = log.requests[0].user.len();
    if dim == 0 {
        return Err(TrainError::NoData("the user vectors are empty".into()));
    }
    for r in &log.requests {
        if r.user.len() != dim || r.user.iter().any(|x| !x.is_finite()) {
            return Err(TrainError::NoData(format!("request {} has a user vector of {} dimensions (or a non-finite one); the first has {dim}", r.id, r.user.len())));
        }
        let nt = cfg.tasks.len();
        if r.labels.len() != r.candidates.len() * nt {
            return Err(TrainError::NoData(format!(
                "request {}: {} task labels for {} candidates and {nt} tasks",
                r.id,
                r.labels.len(),
                r.candidates.len()
            )));
        }
        for (i, y) in r.labels.iter().enumerate() {
            let t = &cfg.tasks[i % nt.max(1)];
            let ok = match t.loss {
                TaskLoss::Logistic => y.is_nan() || (0.0..=1.0).contains(y),
                TaskLoss::Squared => !y.is_infinite(),
            };
            if !ok {
                return Err(TrainError::NoData(format!(
                    "request {}: item {} has label {y} for task \"{}\"{}",
                    r.id,
                    log.items[r.candidates[i / nt].item as usize].id,
                    t.name,
                    if t.loss == TaskLoss::Logistic {
                        ", a logistic task's labels must be in [0, 1] (or NULL)"
                    } else {
                        ", a squared task's labels must be finite (or NULL)"
                    }
                )));
            }
        }
        for c in &r.candidates {
            if nt == 0 && !(c.label.is_finite() && (0.0..=1.0).contains(&c.label)) {
                return Err(TrainError::NoData(format!(
                    "request {}: item {} has label {}, labels must be in [0, 1]",
                    r.id, log.items[c.item as usize].id, c.label
                )));
            }
            match c.teacher {
                None if cfg.needs_teacher() => {
                    return Err(TrainError::NoData(format!(
                        "request {}: item {} has no teacher score, which this objective needs",
                        r.id, log.items[c.item as usize].id
                    )))
                }
                Some(t) if !t.is_finite() => {
                    return Err(TrainError::NoData(format!(
                        "request {}: item {} has a non-finite teacher score",
                        r.id, log.items[c.item as usize].id
                    )))
                }
                _ => {}
            }
        }
    }
    if let Some(it) = log
        .items
        .iter()
        .find(|it| it.vector.len() != dim || it.vector.iter().any(|x| !x.is_finite()))
    {
        return Err(TrainError::NoData(format!(
            "item {} has a vector of {} dimensions (or a non-finite one), the users' have {dim}",
            it.id,
            it.vector.len()
        )));
    }
    // The split: the last requests validate.
    let n = log.requests.len();
    let n_valid = if cfg.validation > 0.0 && n >= 2 {
        ((n as f64 * cfg.validation).round() as usize).clamp(1, n - 1)
    } else {
        0
    };
    let n_train = n - n_valid;
    let tg: Vec<Vec<f32>> = log.requests.iter().map(|r| targets(cfg, log, r)).collect();
    let examples: Vec<(u32, u32)> = (0..n_train)
        .flat_map(|r| (0..log.requests[r].candidates.len()).map(move |c| (r as u32, c as u32)))
        .collect();
    if examples.is_empty() {
        return Err(TrainError::NoData(
            "the training requests have no candidates".into(),
        ));
    }
    // Memory: the examples, the per-candidate cross inputs, the parts, a batch's activations.
    let widest = cfg
        .model
        .hidden
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(4 * dim + 64);
    let cands: usize = log.requests.iter().map(|r| r.candidates.len()).sum();
    // Target attention: each example of a step carries its history's vectors.
    let attention = cfg.model.features.iter().any(|f| {
        matches!(
            f,
            crate::config::FeatureSpec::Cross {
                of: Cross::TargetAttention,
                ..
            }
        )
    });
    // The dense layers' size: parameters, and the sum of their widths (a row's activations:
    // every expert of a multi-task model keeps its input and each layer's output).
    let (params, widths) = cfg.model.dense_size(cfg.tasks.len().max(1), dim);
    let activations = (widest * (cfg.model.hidden.len() + 3)).max(widths);
    let needed = examples.len() * 8
        + cands * (16 + 8 * cfg.tasks.len())
        + (n + log.items.len()) * (64 + cfg.model.features.len() * 48)
        + cfg
            .batch_size
            .saturating_mul(activations)
            .saturating_mul(4 * 3)
        + if attention {
            cfg.batch_size * (twotower_tower::attention::MAX_ATTENDED + 1) * dim * 4 * 2
        } else {
            0
        };
    // The parameters, the best epoch's copy, Adam's moments, each thread's gradients.
    let needed = needed.saturating_add(params.saturating_mul(4 * (4 + cfg.threads.max(1))));
    if needed > budget {
        return Err(TrainError::MemoryBudget { needed, budget });
    }
    progress(Event::Tick)?;

    // Statistics: user-side features over the training requests, item-side ones over the
    // candidates of the training requests.
    let side = |s: Source| -> Vec<crate::config::FeatureSpec> {
        cfg.model
            .features
            .iter()
            .zip(&cfg.model.sources)
            .filter(|(_, x)| **x == s)
            .map(|(f, _)| f.clone())
            .collect()
    };
    let mut item_uses = vec![0u64; log.items.len()];
    for r in &log.requests[..n_train] {
        for c in &r.candidates {
            item_uses[c.item as usize] += 1;
        }
    }
    let mut stats = stats_of(
        &side(Source::User),
        log.requests[..n_train]
            .iter()
            .map(|r| (r.features.clone(), 1)),
    );
    let istats = stats_of(
        &side(Source::Item),
        log.items
            .iter()
            .zip(&item_uses)
            .filter(|(_, &u)| u > 0)
            .map(|(it, &u)| (it.features.clone(), u)),
    );
    merge_stats(&mut stats, istats);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let plan = model::plan_prerank(
        &cfg.model,
        dim,
        &stats,
        cfg.min_count as u64,
        cfg.max_vocab,
        cfg.init_std,
        &mut rng,
    )?;
    let mut tower = plan.tower.clone();
    let enc_model = load(&plan, &tower)?;
    progress(Event::Tick)?;
    let mut enc = Encodings {
        users: Vec::with_capacity(n),
        items: Vec::with_capacity(log.items.len()),
        pre: Vec::with_capacity(n),
    };
    for (i, r) in log.requests.iter().enumerate() {
        if i % 4096 == 4095 {
            progress(Event::Tick)?;
        }
        enc.users
            .push(enc_model.encode_part(&r.features, Source::User, false)?);
        let crosses = CrossInputs::new(metric, &r.user, &r.history);
        enc.pre.push(
            r.candidates
                .iter()
                .map(|c| {
                    crosses.pair(
                        &log.items[c.item as usize].vector,
                        c.position as usize,
                        true,
                    )
                })
                .collect(),
        );
    }
    for (i, it) in log.items.iter().enumerate() {
        if i % 4096 == 4095 {
            progress(Event::Tick)?;
        }
        enc.items
            .push(enc_model.encode_part(&it.features, Source::Item, false)?);
    }
    progress(Event::Tick)?;

    let mut opt = Optim::with(cfg.sparse, &tower);
    let threads = cfg.threads.max(1);
    let steps = examples.len().div_ceil(cfg.batch_size);
    let mut order = examples.clone();
    let mut t: u64 = 0;
    let mut epochs = Vec::new();
    let mut best: Option<(f64, usize, Tower)> = None;
    let mut since_best = 0;
    for epoch in 1..=cfg.epochs {
        let started = Instant::now();
        order.shuffle(&mut rng);
        let mut loss_sum = 0f64;
        let mut seen = 0usize;
        for (step, batch) in order.chunks(cfg.batch_size).enumerate() {
            t += 1;
            let lambda = match cfg.objective {
                Objective::Distill { lambda, ramp_steps } => {
                    lambda
                        * if ramp_steps == 0 {
                            1.0
                        } else {
                            ((t - 1) as f32 / ramp_steps as f32).min(1.0)
                        }
                }
                _ => 0.0,
            };
            let parts = split(batch.len(), threads);
            let tw = &tower;
            let seed = cfg.seed ^ t.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let m = batch.len() as f32;
            let outs = par(&parts, |range| {
                let xs: Vec<Encoded> = batch[range.clone()]
                    .iter()
                    .map(|&(r, c)| assemble(&enc_model, log, &enc, metric, r as usize, c as usize))
                    .collect();
                let refs: Vec<&Encoded> = xs.iter().collect();
                let cache = tw.forward_train(&refs, seed ^ range.start as u64);
                let mut l = 0f64;
                let dout: Vec<f32> = if cfg.tasks.is_empty() {
                    batch[range.clone()]
                        .iter()
                        .zip(cache.output())
                        .map(|(&(r, c), &s)| {
                            let cand = log.requests[r as usize].candidates[c as usize];
                            let (lr, g) =
                                row_loss(s, tg[r as usize][c as usize], cand.teacher, lambda);
                            l += lr;
                            g / m
                        })
                        .collect()
                } else {
                    let nt = cfg.tasks.len();
                    batch[range.clone()]
                        .iter()
                        .zip(cache.output().chunks_exact(nt))
                        .flat_map(|(&(r, c), out)| {
                            let ys = &tg[r as usize][c as usize * nt..(c as usize + 1) * nt];
                            cfg.tasks
                                .iter()
                                .zip(out.iter().zip(ys))
                                .map(|(t, (&s, &y))| {
                                    let (lr, g) = task_loss(t, s, y);
                                    l += lr;
                                    g / m
                                })
                                .collect::<Vec<f32>>()
                        })
                        .collect()
                };
                let grads = tw.backward(&cache, &dout);
                let stats = cache.batch_stats().to_vec();
                (l, grads, stats)
            });
            let l: f64 = outs.iter().map(|o| o.0).sum();
            if !l.is_finite() {
                return Err(TrainError::Diverged {
                    epoch,
                    step: step + 1,
                    loss: l,
                });
            }
            let mut stats = Vec::with_capacity(outs.len());
            let mut total: Option<Grads> = None;
            for (_, g, s) in outs {
                stats.push(s);
                match &mut total {
                    None => total = Some(g),
                    Some(tg) => tg.add(g),
                }
            }
            tower.update_running_stats(&stats);
            if let Some(g) = total {
                opt.step_with(cfg.lr, cfg.weight_decay, false, &mut tower, &g, t);
            }
            loss_sum += l;
            seen += batch.len();
            let p = Progress {
                epoch,
                epochs: cfg.epochs,
                step: step + 1,
                steps,
                loss: loss_sum / seen.max(1) as f64,
                examples_per_s: seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
                valid: None,
            };
            progress(Event::Step(&p))?;
        }
        let (valid, agreement) = if n_valid > 0 {
            let (m, a) = validate(
                cfg, log, &enc_model, &enc, metric, &tower, &tg, n_train, progress,
            )?;
            (Some(m), a)
        } else {
            (None, None)
        };
        let loss = loss_sum / seen.max(1) as f64;
        let p = Progress {
            epoch,
            epochs: cfg.epochs,
            step: steps,
            steps,
            loss,
            examples_per_s: seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
            valid,
        };
        progress(Event::Epoch(&p))?;
        epochs.push(PrerankEpoch {
            epoch,
            loss,
            seconds: started.elapsed().as_secs_f64(),
            valid,
            teacher_agreement: agreement,
        });
        let score = valid.map_or(epoch as f64, |m| m.recall);
        if best.as_ref().is_none_or(|b| score > b.0) {
            best = Some((score, epoch, tower.clone()));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= cfg.patience {
                break;
            }
        }
    }
    let (_, best_epoch, best_tower) = best.expect("at least one epoch ran");
    let (spec, weights) = model::export(&plan, &best_tower)?;
    check_export(&spec, &weights, &best_tower, log, &enc_model, &enc, metric)?;
    Ok(TrainedPrerank {
        spec,
        weights,
        best_epoch,
        epochs,
        train_examples: examples.len(),
        valid_requests: n_valid,
        parameters: best_tower.parameter_count(),
    })
}

fn merge_stats(into: &mut FeatureStats, from: FeatureStats) {
    into.counts.extend(from.counts);
    into.moments.extend(from.moments);
    into.values.extend(from.values);
}

/// The student's scores of every candidate of request `r`.
fn score_request(
    log: &RankLog,
    enc_model: &Model,
    enc: &Encodings,
    metric: Metric,
    tower: &Tower,
    r: usize,
) -> Vec<f32> {
    let xs: Vec<Encoded> = (0..log.requests[r].candidates.len())
        .map(|c| assemble(enc_model, log, enc, metric, r, c))
        .collect();
    let mut out = Vec::with_capacity(xs.len());
    for chunk in xs.chunks(1024) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        out.extend_from_slice(tower.forward(&refs).output());
    }
    out
}

/// Recall / HR / NDCG at `k` of each validation request's positives (targets > 0.5) ranked
/// by the student, and (with teacher scores) the share of the teacher's top K in the
/// student's top K.
#[allow(clippy::too_many_arguments)]
fn validate(
    cfg: &PrerankConfig,
    log: &RankLog,
    enc_model: &Model,
    enc: &Encodings,
    metric: Metric,
    tower: &Tower,
    tg: &[Vec<f32>],
    n_train: usize,
    progress: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<(Metrics, Option<f64>)> {
    let mut acc = Accumulator::new(&[cfg.k]);
    let (mut agree, mut agree_n) = (0f64, 0usize);
    let rs: Vec<usize> = (n_train..log.requests.len()).collect();
    for chunk in rs.chunks(64) {
        progress(Event::Tick)?;
        let parts = split(chunk.len(), cfg.threads.max(1));
        let scored = par(&parts, |range| {
            chunk[range]
                .iter()
                .map(|&r| score_request(log, enc_model, enc, metric, tower, r))
                .collect::<Vec<_>>()
        });
        for (&r, s) in chunk.iter().zip(scored.into_iter().flatten()) {
            let req = &log.requests[r];
            // A multi-task model: the fused score ranks, the validated task's labels are the
            // positives.
            let nt = cfg.tasks.len().max(1);
            let s = enc_model.scores(&s, twotower_tower::ScoreBy::Fused);
            let pos: Vec<u32> = tg[r]
                .iter()
                .skip(cfg.validate_task)
                .step_by(nt)
                .enumerate()
                .filter(|(_, &y)| y > 0.5)
                .map(|(i, _)| i as u32)
                .collect();
            if !pos.is_empty() {
                acc.add(&ranks(&s, &pos, &[]));
            }
            if req.candidates.iter().all(|c| c.teacher.is_some()) && !req.candidates.is_empty() {
                let teacher: Vec<f32> = req
                    .candidates
                    .iter()
                    .map(|c| c.teacher.unwrap_or(0.0))
                    .collect();
                let k = cfg.k.min(req.candidates.len());
                let top = |sc: &[f32]| -> Vec<usize> {
                    let mut o: Vec<usize> = (0..sc.len()).collect();
                    o.sort_by(|&a, &b| sc[b].total_cmp(&sc[a]).then(a.cmp(&b)));
                    o.truncate(k);
                    o.sort_unstable();
                    o
                };
                let (a, b) = (top(&s), top(&teacher));
                agree += a.iter().filter(|i| b.binary_search(i).is_ok()).count() as f64 / k as f64;
                agree_n += 1;
            }
        }
    }
    let m = acc.metrics().pop().expect("one k");
    Ok((m, (agree_n > 0).then(|| agree / agree_n as f64)))
}

/// The exported model loads and scores what training scored.
fn check_export(
    spec: &str,
    weights: &[u8],
    tower: &Tower,
    log: &RankLog,
    enc_model: &Model,
    enc: &Encodings,
    metric: Metric,
) -> Result<()> {
    let exported = Model::load(spec, weights)?;
    // A request with a history, when there is one (target attention reads it).
    let r = log
        .requests
        .iter()
        .position(|r| !r.history.is_empty())
        .unwrap_or(0);
    let req = &log.requests[r];
    let n = req.candidates.len().min(8);
    if n == 0 {
        return Ok(());
    }
    let trained = score_request(log, enc_model, enc, metric, tower, r);
    let user = exported.encode_part(&req.features, Source::User, false)?;
    let crosses =
        CrossInputs::new(metric, &req.user, &req.history).with_attention(&exported, &req.history);
    let nt = exported.output_dim();
    for (c, want) in req.candidates.iter().zip(trained.chunks_exact(nt)).take(n) {
        let it = &log.items[c.item as usize];
        let part = exported.encode_part(&it.features, Source::Item, false)?;
        let pair = crosses.pair(&it.vector, c.position as usize, true);
        let x = exported.assemble(&user, &part, &mut |x, out| {
            crosses.fill(x, &it.vector, &pair, out)
        });
        for (&got, &want) in exported.forward(&x).iter().zip(want) {
            if (got - want).abs() > 1e-3 * (1.0 + want.abs()) {
                return Err(TrainError::Export(format!(
                    "item {}: the exported model scores {got}, training scored {want}",
                    it.id
                )));
            }
        }
    }
    Ok(())
}
