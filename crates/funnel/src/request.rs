//! One request through a pipeline, without Postgres: the user tower once, each channel's hits,
//! their merge, the item vectors, and the pre-rank cascade, to the top `k` with provenance and
//! a report per step (for `recommend_explain`).
//!
//! What lives in the database reaches the run through [`Sources`]: a channel's hits (with the
//! item vectors the channel already holds), the vectors of the other candidates and of the
//! history, the item parts of a pre-rank model, and cancellation polls. The glue implements it
//! over SPI; tests implement it over plain maps.

use crate::channel::{ChannelDef, Query};
use crate::merge::{self, MergeError};
use crate::pipeline::{Definition, StageDef, StageKind, MAX_HISTORY};
use crate::prerank::{self, Candidate as Cand, PrerankError, Scorer, Stage};
use crate::rerank::{self, Rerank};
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::Value;
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;
use twotower_tower::{Model, Part, Source, TowerError};

/// The most candidates a caller may hand to a pipeline (`prerank`).
pub const MAX_CANDIDATES: usize = 100_000;

#[derive(Debug, Error)]
pub enum FunnelError {
    /// The request does not fit the pipeline (k out of range, a malformed history, ...).
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Tower(#[from] TowerError),
    #[error(transparent)]
    Prerank(#[from] PrerankError),
    #[error("merge: {0}")]
    Merge(#[from] MergeError),
}

/// One hit of a channel: the item, the channel's score (higher is better) and, when the
/// channel read it anyway, the item's stored vector (saving the run a read).
#[derive(Debug, Clone)]
pub struct Hit {
    pub item: i64,
    pub score: f32,
    pub vector: Option<Arc<[f32]>>,
}

/// What the run asks of the database.
pub trait Sources {
    /// The caller's error type; the run's own errors convert into it.
    type Error: From<FunnelError>;

    /// The hits of channel `at` of the pipeline (`channel`) for `query`, best first, at most
    /// `query.k`, none of `query.exclude`.
    fn channel(
        &mut self,
        at: usize,
        channel: &ChannelDef,
        query: &Query,
    ) -> Result<Vec<Hit>, Self::Error>;

    /// The stored vectors of `ids` (those that have one).
    fn vectors(&mut self, ids: &[i64]) -> Result<FxHashMap<i64, Arc<[f32]>>, Self::Error>;

    /// The item parts of `items` for the model of pre-rank stage `stage`, in `items` order.
    fn item_parts(
        &mut self,
        stage: usize,
        model: &Model,
        items: &[i64],
    ) -> Result<Vec<Arc<Part>>, Self::Error>;

    /// The item attributes `columns` of `ids` (from the pipeline's `item_features`), in `ids`
    /// order (an item without a row: an empty object). Read by a rerank stage's rules.
    fn attributes(
        &mut self,
        ids: &[i64],
        columns: &[String],
    ) -> Result<Vec<Arc<serde_json::Map<String, Value>>>, Self::Error> {
        let _ = (ids, columns);
        Err(FunnelError::BadRequest("these sources hold no item attributes".into()).into())
    }

    /// Fails when the request was cancelled.
    fn poll(&mut self) -> Result<(), Self::Error>;

    /// Worker threads for a model stage's forward pass.
    fn threads(&self) -> usize {
        1
    }
}

/// The models a pipeline names, loaded.
pub struct Models<'a> {
    pub user: &'a Model,
    /// A strict user tower refuses request keys that neither it nor a stage reads.
    pub strict: bool,
    /// Per stage, its pre-rank model (None for a two-tower stage).
    pub stages: Vec<Option<&'a Model>>,
}

/// One request.
pub struct Request<'a> {
    /// The pipeline's name (for messages).
    pub pipeline: &'a str,
    pub features: &'a Value,
    /// How many results (default: the pipeline's `k`).
    pub k: Option<i64>,
    pub exclude: &'a [i64],
    /// The caller's candidates (`prerank`), instead of the channels.
    pub candidates: Option<&'a [i64]>,
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub stage: String,
    pub received: Option<usize>,
    pub kept: Vec<i64>,
    pub dropped: Vec<i64>,
    pub ms: f64,
    /// A model stage's scores of the kept items, by name: the score it ranked by (`score`, or
    /// a multi-task model's `fused` or task), then each task's.
    pub scores: Vec<(String, Vec<f32>)>,
}

/// One result: the item, its final score, and the channels that returned it with its rank
/// there (empty for the caller's candidates).
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    pub item: i64,
    pub score: f32,
    pub channels: Vec<String>,
    pub ranks: Vec<i32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// In rank order.
    pub rows: Vec<Ranked>,
    pub steps: Vec<Step>,
}

fn bad(msg: String) -> FunnelError {
    FunnelError::BadRequest(msg)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// The history ids under the request's `key`: a list of ids, or `{"ids": [...], ...}`; the
/// first [`MAX_HISTORY`].
pub fn history_ids(f: &Value, key: &str) -> Result<Vec<i64>, FunnelError> {
    let list = match f.get(key) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(Value::Object(o)) => match o.get("ids") {
            Some(Value::Array(a)) => a,
            _ => {
                return Err(bad(format!(
                    "history \"{key}\" must be a list of item ids or {{\"ids\": [...]}}"
                )))
            }
        },
        Some(v) => {
            return Err(bad(format!(
                "history \"{key}\" must be a list of item ids, got {v}"
            )))
        }
    };
    list.iter()
        .take(MAX_HISTORY as usize)
        .map(|v| {
            twotower_tower::canonical_id(v)
                .ok()
                .flatten()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| bad(format!("history \"{key}\" has {v}, not an integer item id")))
        })
        .collect()
}

/// With a strict user tower, a request's features may hold only the user tower's features, the
/// pipeline's history key, the keys its function channels declare and the pre-rank models'
/// user-side features.
pub fn check_request_keys(d: &Definition, m: &Models, f: &Value) -> Result<(), FunnelError> {
    check_keys(
        d,
        m.user,
        m.strict,
        m.stages.iter().flatten().flat_map(|s| {
            s.sources()
                .filter(|(_, s)| *s == Source::User)
                .map(|(n, _)| n)
        }),
        f,
    )
}

/// [`check_request_keys`] with the stages' user-side feature names given (`stage_keys`), for a
/// model not loaded yet (pre-rank training).
pub fn check_keys<'a>(
    d: &'a Definition,
    user: &'a Model,
    strict: bool,
    stage_keys: impl IntoIterator<Item = &'a str>,
    f: &Value,
) -> Result<(), FunnelError> {
    if !strict {
        return Ok(());
    }
    let mut known: FxHashSet<&str> = user.feature_names().into_iter().collect();
    known.extend(d.history.as_deref());
    known.extend(stage_keys);
    known.extend(
        d.channels
            .iter()
            .flat_map(|c| c.kind.request_keys().iter().map(String::as_str)),
    );
    match f
        .as_object()
        .and_then(|o| o.keys().find(|k| !known.contains(k.as_str())))
    {
        Some(key) => Err(TowerError::UnknownFeature { name: key.clone() }.into()),
        None => Ok(()),
    }
}

/// Runs `req` through pipeline `d` (its models `m`), reading through `src`.
pub fn run<S: Sources>(
    d: &Definition,
    m: &Models,
    req: &Request,
    src: &mut S,
) -> Result<Outcome, S::Error> {
    let name = req.pipeline;
    let most = d.most();
    let k = match req.k {
        None => d.k,
        Some(k) if k >= 1 && (k as u64) <= most as u64 => k as usize,
        Some(k) => {
            return Err(bad(format!(
                "k must be between 1 and {most} (what pipeline \"{name}\" keeps), got {k}"
            ))
            .into())
        }
    };
    if m.stages.len() != d.stages.len() {
        return Err(bad("the stages' models do not match the pipeline".into()).into());
    }
    // The pre-rank stages, and the rerank stage that may end the pipeline.
    let (pre, rer) = match d.stages.last() {
        Some(StageDef {
            kind: StageKind::Rerank(r),
            ..
        }) => (&d.stages[..d.stages.len() - 1], Some(r)),
        _ => (&d.stages[..], None),
    };
    let mut steps = Vec::new();
    let t = Instant::now();
    let f = req.features;
    check_request_keys(d, m, f)?;
    let u = m.user.embed_with(f, false).map_err(FunnelError::from)?;
    let history = match &d.history {
        Some(key) => history_ids(f, key)?,
        None => Vec::new(),
    };
    let mut excluded: FxHashSet<i64> = req.exclude.iter().copied().collect();
    if d.exclude_history {
        excluded.extend(history.iter().copied());
    }
    steps.push(Step {
        stage: format!("user tower {}", d.user_model),
        received: None,
        kept: Vec::new(),
        dropped: Vec::new(),
        ms: ms(t),
        scores: Vec::new(),
    });

    // Candidates: the channels, merged; or the caller's.
    let mut provenance: FxHashMap<i64, (Vec<String>, Vec<i32>)> = FxHashMap::default();
    let mut known: FxHashMap<i64, Arc<[f32]>> = FxHashMap::default();
    let pool: Vec<i64> = match req.candidates {
        Some(c) => {
            if c.len() > MAX_CANDIDATES {
                return Err(bad(format!(
                    "{} candidates are more than the {MAX_CANDIDATES} prerank takes",
                    c.len()
                ))
                .into());
            }
            let mut seen = FxHashSet::with_capacity_and_hasher(c.len(), Default::default());
            if let Some(dup) = c.iter().find(|i| !seen.insert(**i)) {
                return Err(bad(format!("candidate {dup} is given twice")).into());
            }
            c.iter()
                .copied()
                .filter(|i| !excluded.contains(i))
                .collect()
        }
        None if d.channels.is_empty() => {
            return Err(bad(format!(
                "pipeline \"{name}\" has no channels: call twotower.prerank with candidates"
            ))
            .into());
        }
        None => {
            let mut cands: Vec<merge::Candidate> = Vec::new();
            let std_excluded: std::collections::HashSet<i64> = excluded.iter().copied().collect();
            for (ci, c) in d.channels.iter().enumerate() {
                src.poll()?;
                let t = Instant::now();
                let seeds = c.kind.seeds(&history);
                let hits = if c.kind.needs_seeds() && seeds.is_empty() {
                    Vec::new()
                } else {
                    let q = Query {
                        user: &u,
                        seeds: &seeds,
                        features: f,
                        k: c.k,
                        exclude: &std_excluded,
                    };
                    src.channel(ci, c, &q)?
                };
                steps.push(Step {
                    stage: format!("channel {}", c.name),
                    received: None,
                    kept: hits.iter().map(|h| h.item).collect(),
                    dropped: Vec::new(),
                    ms: ms(t),
                    scores: Vec::new(),
                });
                for h in hits {
                    if let Some(v) = h.vector {
                        known.insert(h.item, v);
                    }
                    cands.push(merge::Candidate {
                        channel: ci,
                        item: h.item,
                        score: h.score,
                    });
                }
            }
            let t = Instant::now();
            let names = d.channel_names();
            let ex: Vec<i64> = excluded.iter().copied().collect();
            let merged = merge::merge(&cands, names.len(), &d.merge.strategy, d.merge.k, &ex)
                .map_err(FunnelError::from)?;
            let kept: Vec<i64> = merged.iter().map(|m| m.item).collect();
            let keptset: FxHashSet<i64> = kept.iter().copied().collect();
            let mut dropped: Vec<i64> = cands
                .iter()
                .map(|c| c.item)
                .filter(|i| !keptset.contains(i))
                .collect();
            dropped.sort_unstable();
            dropped.dedup();
            for mm in &merged {
                provenance.insert(
                    mm.item,
                    (
                        mm.provenance.iter().map(|p| names[p.0].clone()).collect(),
                        mm.provenance.iter().map(|p| p.1 as i32).collect(),
                    ),
                );
            }
            steps.push(Step {
                stage: format!("merge {}", d.merge.name),
                received: Some(cands.len()),
                kept,
                dropped,
                ms: ms(t),
                scores: Vec::new(),
            });
            if pre.is_empty() {
                let list: Vec<(i64, f32)> =
                    merged.iter().map(|mm| (mm.item, mm.score as f32)).collect();
                return finish(rer, list, k, provenance, known, steps, src);
            }
            merged.into_iter().map(|mm| mm.item).collect()
        }
    };
    if pre.is_empty() && rer.is_none() {
        return Err(bad(format!("pipeline \"{name}\" has no pre-rank stages")).into());
    }
    if pre.is_empty() {
        // The caller's candidates straight to the rerank stage, in their order.
        let n = pool.len() as f32;
        let list = pool
            .iter()
            .enumerate()
            .map(|(r, &i)| (i, n - r as f32))
            .collect();
        return finish(rer, list, k, provenance, known, steps, src);
    }

    // The item vectors of the candidates and the history: those the channels did not hand
    // over, in one read.
    src.poll()?;
    let t = Instant::now();
    let wanted: Vec<i64> = pool
        .iter()
        .chain(history.iter())
        .copied()
        .filter(|i| !known.contains_key(i))
        .collect();
    if !wanted.is_empty() {
        let read = src.vectors(&wanted)?;
        if known.is_empty() {
            known = read;
        } else {
            known.extend(read);
        }
    }
    let hist: Vec<Vec<f32>> = history
        .iter()
        .filter_map(|h| known.get(h).map(|v| v.to_vec()))
        .collect();
    let (mut with, mut without) = (Vec::with_capacity(pool.len()), Vec::new());
    let mut cands: Vec<Cand> = Vec::with_capacity(pool.len());
    for &item in &pool {
        match known.get(&item) {
            Some(v) => {
                with.push(item);
                cands.push(Cand {
                    item,
                    vector: v.clone(),
                });
            }
            None => without.push(item),
        }
    }
    steps.push(Step {
        stage: "item vectors".into(),
        received: Some(pool.len()),
        kept: with,
        dropped: without,
        ms: ms(t),
        scores: Vec::new(),
    });

    let user_parts: Vec<Option<Part>> = m.stages[..pre.len()]
        .iter()
        .map(|s| s.map(|s| s.encode_part(f, Source::User, false)).transpose())
        .collect::<Result<_, _>>()
        .map_err(FunnelError::from)?;
    // A stage that ranks by a task reads a model that has it.
    for (i, (s, model)) in pre.iter().zip(&m.stages).enumerate() {
        if let (StageKind::Model(n), Some(t), Some(model)) = (&s.kind, &s.score, model) {
            if model.score_by(Some(t)).is_none() {
                let tasks: Vec<&str> = model.tasks().iter().map(|t| t.name.as_str()).collect();
                return Err(bad(format!(
                    "stage {} of pipeline \"{name}\" ranks by \"{t}\", but pre-rank model \"{n}\" {}",
                    i + 1,
                    if tasks.is_empty() {
                        "has one score (give no \"score\", or \"fused\")".to_owned()
                    } else {
                        format!("has the tasks {} (and \"fused\")", tasks.join(", "))
                    }
                ))
                .into());
            }
        }
    }
    let stages: Vec<Stage> = pre
        .iter()
        .zip(&m.stages)
        .zip(&user_parts)
        .map(|((s, model), p)| Stage {
            scorer: match (&s.kind, model, p) {
                (StageKind::Model(n), Some(model), Some(p)) => Scorer::Model {
                    name: n,
                    model,
                    user: p,
                    by: model
                        .score_by(s.score.as_deref())
                        .unwrap_or(twotower_tower::ScoreBy::Fused),
                },
                _ => Scorer::TwoTower,
            },
            keep: s.keep,
        })
        .collect();
    let cascade_req = prerank::Request {
        metric: m.user.metric(),
        user: &u,
        history: &hist,
        threads: src.threads(),
    };
    let reports = {
        let src = std::cell::RefCell::new(&mut *src);
        let mut parts = |s: usize, idx: &[usize]| -> Result<Vec<Arc<Part>>, Outer<S::Error>> {
            let Some(model) = m.stages[s] else {
                return Ok(Vec::new());
            };
            let items: Vec<i64> = idx.iter().map(|&i| cands[i].item).collect();
            src.borrow_mut().item_parts(s, model, &items).map_err(Outer)
        };
        let mut poll = || -> Result<(), Outer<S::Error>> { src.borrow_mut().poll().map_err(Outer) };
        prerank::cascade(&cascade_req, &cands, &stages, &mut parts, &mut poll).map_err(|e| e.0)?
    };
    for ((s, r), model) in pre.iter().zip(&reports).zip(&m.stages) {
        steps.push(Step {
            stage: match &s.kind {
                StageKind::Model(model) => format!("pre-rank model {model}"),
                _ => "pre-rank two-tower".into(),
            },
            received: Some(r.received),
            kept: r.kept.iter().map(|&i| cands[i].item).collect(),
            dropped: r.dropped.iter().map(|&i| cands[i].item).collect(),
            ms: r.seconds * 1000.0,
            scores: stage_scores(s, model, r),
        });
    }
    let Some(last) = reports.last() else {
        return Err(bad(format!("pipeline \"{name}\" has no pre-rank stages")).into());
    };
    let list: Vec<(i64, f32)> = last
        .kept
        .iter()
        .zip(&last.scores)
        .map(|(&i, &score)| (cands[i].item, score))
        .collect();
    finish(rer, list, k, provenance, known, steps, src)
}

/// A model stage's scores of its kept items: what it ranked by, then each task's.
fn stage_scores(
    s: &StageDef,
    model: &Option<&Model>,
    r: &prerank::StageReport,
) -> Vec<(String, Vec<f32>)> {
    let Some(model) = model.filter(|_| matches!(s.kind, StageKind::Model(_))) else {
        return Vec::new();
    };
    let tasks = model.tasks();
    let by = match (&s.score, tasks.is_empty()) {
        (_, true) => "score".to_owned(),
        (Some(t), false) => t.clone(),
        (None, false) => "fused".to_owned(),
    };
    let mut out = vec![(by, r.scores.clone())];
    let nt = tasks.len();
    for (t, task) in tasks.iter().enumerate() {
        let v: Vec<f32> = r.task_scores.iter().skip(t).step_by(nt).copied().collect();
        out.push((task.name.clone(), v));
    }
    out
}

/// The end of a run: `list` (ranked, with scores) through the rerank stage when there is one,
/// then its top `k` with provenance.
fn finish<S: Sources>(
    rer: Option<&Rerank>,
    list: Vec<(i64, f32)>,
    k: usize,
    mut provenance: FxHashMap<i64, (Vec<String>, Vec<i32>)>,
    mut known: FxHashMap<i64, Arc<[f32]>>,
    mut steps: Vec<Step>,
    src: &mut S,
) -> Result<Outcome, S::Error> {
    let list = match rer {
        None => list,
        Some(rr) => {
            src.poll()?;
            let t = Instant::now();
            let ids: Vec<i64> = list.iter().map(|x| x.0).collect();
            let columns = rr.columns();
            let attrs = if columns.is_empty() {
                Vec::new()
            } else {
                src.attributes(&ids, &columns)?
            };
            if rr.needs_vectors() {
                let wanted: Vec<i64> = ids
                    .iter()
                    .copied()
                    .filter(|i| !known.contains_key(i))
                    .collect();
                if !wanted.is_empty() {
                    known.extend(src.vectors(&wanted)?);
                }
            }
            let with_channels = rr.needs_channels();
            let cands: Vec<rerank::Candidate> = list
                .iter()
                .map(|&(item, score)| rerank::Candidate {
                    item,
                    score: score as f64,
                    vector: known.get(&item).cloned(),
                    channels: if with_channels {
                        provenance
                            .get(&item)
                            .map(|p| p.0.clone())
                            .unwrap_or_default()
                    } else {
                        Vec::new()
                    },
                })
                .collect();
            let (out, rep) = rerank::rerank(rr, &cands, &attrs, &mut || src.poll())?;
            let kept: Vec<i64> = out.iter().map(|&(i, _)| cands[i].item).collect();
            let keptset: FxHashSet<i64> = kept.iter().copied().collect();
            steps.push(Step {
                stage: format!(
                    "rerank ({} filtered, {} placed, {} moved, {} relaxed)",
                    rep.filtered.len(),
                    rep.placed.len(),
                    rep.moved.len(),
                    rep.relaxed
                ),
                received: Some(list.len()),
                kept,
                dropped: ids
                    .iter()
                    .copied()
                    .filter(|i| !keptset.contains(i))
                    .collect(),
                ms: ms(t),
                scores: Vec::new(),
            });
            out.iter()
                .map(|&(i, score)| (cands[i].item, score as f32))
                .collect()
        }
    };
    let rows = list
        .into_iter()
        .take(k)
        .map(|(item, score)| {
            let (channels, ranks) = provenance.remove(&item).unwrap_or_default();
            Ranked {
                item,
                score,
                channels,
                ranks,
            }
        })
        .collect();
    Ok(Outcome { rows, steps })
}

/// The caller's error inside the cascade (which converts its own errors into it).
struct Outer<E>(E);

impl<E: From<FunnelError>> From<PrerankError> for Outer<E> {
    fn from(e: PrerankError) -> Self {
        Outer(FunnelError::Prerank(e).into())
    }
}
