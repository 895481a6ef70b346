//! Cascade pre-ranking: candidates go through stages, each scores what the previous one kept
//! and keeps its own top `keep`. A stage is the two-tower score (the user vector against each
//! candidate's stored item vector) or a pre-rank model (a `prerank` model kind of
//! `twotower-tower`) over the user's part, the candidate's item part and cross inputs.
//!
//! Ranking is by score (higher first), ties by item id; a later stage re-ranks only what the
//! earlier ones kept. Each stage reports what it received, kept, dropped and how long it took.

use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;
use twotower_metric::Metric;
use twotower_tower::layers::{dot, gemm_xwt};
use twotower_tower::{Cross, CrossShape, Model, Part, Row, ScoreBy};

#[derive(Debug, Error, PartialEq)]
pub enum PrerankError {
    #[error("{0}")]
    Bad(String),
    #[error("pre-rank model \"{model}\" gave a non-finite score for item {item}")]
    NonFinite { model: String, item: i64 },
}

pub type Result<T> = std::result::Result<T, PrerankError>;

/// From this many candidates on, a model stage's forward pass runs on `Request::threads`.
/// Measured on the two-core machine (`examples/cascade_profile.rs`, the realistic model): two
/// threads gained nothing over one from 2,000 to 10,000 candidates (0.82 ms for 2,000 on one
/// thread, 0.82–1.23 on two), so only very large lists are split.
pub const PARALLEL_FROM: usize = 16_384;

/// Gives the item parts of the candidates `idx` for model stage `stage` (failing with the
/// caller's own error type `E`).
pub type ItemParts<'a, E = PrerankError> =
    dyn FnMut(usize, &[usize]) -> std::result::Result<Vec<Arc<Part>>, E> + 'a;

/// What a stage scores with.
pub enum Scorer<'a> {
    /// The towers' own score of each candidate.
    TwoTower,
    /// A pre-rank model, its name (for messages), the request's encoded user part, and what it
    /// ranks by (a multi-task model's task or fused score).
    Model {
        name: &'a str,
        model: &'a Model,
        user: &'a Part,
        by: ScoreBy,
    },
}

pub struct Stage<'a> {
    pub scorer: Scorer<'a>,
    /// How many candidates the stage keeps (at least 1).
    pub keep: usize,
}

/// What one request brings to the cascade.
pub struct Request<'a> {
    /// The towers' metric (how the two-tower score is computed).
    pub metric: Metric,
    /// The user tower's vector.
    pub user: &'a [f32],
    /// Item vectors of the user's history (for the `history_*` cross inputs).
    pub history: &'a [Vec<f32>],
    /// Worker threads for a model stage's forward pass (never touching Postgres).
    pub threads: usize,
}

/// A candidate: its id and its stored item vector (same width as the user vector). The order of
/// the candidates given to [`cascade`] is the recall order (the `recall_rank` cross input).
#[derive(Debug, Clone)]
pub struct Candidate {
    pub item: i64,
    pub vector: Arc<[f32]>,
}

/// One stage's report.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    pub received: usize,
    /// Indices into the candidates, in the stage's rank order.
    pub kept: Vec<usize>,
    /// The stage's score of each kept candidate (same order as `kept`).
    pub scores: Vec<f32>,
    /// Indices of the candidates this stage dropped, best first.
    pub dropped: Vec<usize>,
    pub seconds: f64,
    /// A multi-task model's task scores of the kept candidates (`kept.len() × tasks`, each its
    /// link of the output); empty otherwise.
    pub task_scores: Vec<f32>,
}

/// The two-tower score of `v` for `u`: cosine similarity, inner product, or minus the
/// Euclidean distance (higher is better), in f32 (eight lanes).
pub fn two_tower_score(metric: Metric, u: &[f32], v: &[f32]) -> f32 {
    match metric {
        Metric::InnerProduct => sums(u, v).0,
        Metric::L2 => {
            let (dot, uu, vv) = sums(u, v);
            -(uu + vv - 2.0 * dot).max(0.0).sqrt()
        }
        Metric::Cosine => {
            let (dot, uu, vv) = sums(u, v);
            if uu > 0.0 && vv > 0.0 {
                dot / (uu.sqrt() * vv.sqrt())
            } else {
                0.0
            }
        }
    }
}

/// (u·v, u·u, v·v) in eight f32 lanes (vectorised), summed at the end.
fn sums(u: &[f32], v: &[f32]) -> (f32, f32, f32) {
    let n = u.len().min(v.len());
    let (uc, ur) = u[..n].as_chunks::<8>();
    let (vc, vr) = v[..n].as_chunks::<8>();
    let (mut d, mut a, mut b) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    for k in 0..uc.len().min(vc.len()) {
        let (x, y) = (&uc[k], &vc[k]);
        for i in 0..8 {
            d[i] += x[i] * y[i];
            a[i] += x[i] * x[i];
            b[i] += y[i] * y[i];
        }
    }
    let (mut dot, mut uu, mut vv) = (
        d.iter().sum::<f32>(),
        a.iter().sum::<f32>(),
        b.iter().sum::<f32>(),
    );
    for (x, y) in ur.iter().zip(vr) {
        dot += x * y;
        uu += x * x;
        vv += y * y;
    }
    (dot, uu, vv)
}

/// The cross inputs of one request (see [`Cross`]): the same code when serving (the cascade)
/// and when training a pre-rank model (`twotower-train`), so a trained model sees at serving
/// time the inputs it learned from (the cascade's batched history similarities differ from
/// the one-vector path only by float rounding).
pub struct CrossInputs<'a> {
    metric: Metric,
    user: &'a [f32],
    /// A model's target attention and the history's keys (see [`CrossInputs::with_attention`]).
    attention: Option<(&'a Model, twotower_tower::attention::HistoryKeys)>,
    /// The history, each vector scaled to unit length (zero, non-finite and mis-sized vectors
    /// left out).
    unit_history: Vec<Vec<f32>>,
}

impl<'a> CrossInputs<'a> {
    pub fn new(metric: Metric, user: &'a [f32], history: &[Vec<f32>]) -> CrossInputs<'a> {
        let dims = user.len();
        let unit_history = history
            .iter()
            .filter(|h| h.len() == dims)
            .filter_map(|h| {
                let n = h.iter().map(|x| x * x).sum::<f32>().sqrt();
                (n > 0.0 && n.is_finite()).then(|| h.iter().map(|x| x / n).collect())
            })
            .collect();
        CrossInputs {
            metric,
            user,
            unit_history,
            attention: None,
        }
    }

    /// The same, with `model`'s target attention over `history` (the history's raw vectors;
    /// `fill` of `target_attention` writes zeros without it).
    pub fn with_attention(mut self, model: &'a Model, history: &[Vec<f32>]) -> CrossInputs<'a> {
        self.attention = Some((model, model.attention_keys(history)));
        self
    }

    /// The two-tower score of item vector `v`.
    pub fn score(&self, v: &[f32]) -> f32 {
        two_tower_score(self.metric, self.user, v)
    }

    /// (max, mean) cosine of `v` to the history's vectors; (0, 0) without history or for a
    /// zero vector.
    pub fn history(&self, v: &[f32]) -> (f32, f32) {
        if self.unit_history.is_empty() {
            return (0.0, 0.0);
        }
        let norm = dot(v, v).sqrt();
        if norm == 0.0 || !norm.is_finite() {
            return (0.0, 0.0);
        }
        max_mean(self.unit_history.iter().map(|h| dot(h, v)), norm)
    }

    /// [`CrossInputs::history`] of the `rows` vectors laid out one after the other in `x`, each
    /// as wide as the user vector, at once (one matrix product of the vectors by the history's;
    /// the same values up to rounding).
    pub fn history_rows(&self, x: &[f32], rows: usize) -> Vec<(f32, f32)> {
        let (n, dims) = (self.unit_history.len(), self.user.len());
        if n == 0 || dims == 0 || x.len() != rows * dims {
            return (0..rows)
                .map(|j| self.history(x.get(j * dims..(j + 1) * dims).unwrap_or(&[])))
                .collect();
        }
        let h: Vec<f32> = self.unit_history.iter().flatten().copied().collect();
        let c = gemm_xwt(x, rows, dims, &h, n, None);
        x.chunks_exact(dims)
            .zip(c.chunks_exact(n))
            .map(|(v, cs)| {
                let norm = dot(v, v).sqrt();
                if norm == 0.0 || !norm.is_finite() {
                    return (0.0, 0.0);
                }
                max_mean(cs.iter().copied(), norm)
            })
            .collect()
    }

    /// The per-candidate inputs of the candidate with vector `v` at 1-based `position` in the
    /// list the stages receive (the history similarities only when `history` is asked).
    pub fn pair(&self, v: &[f32], position: usize, history: bool) -> Pair {
        Pair {
            score: self.score(v),
            history: if history { self.history(v) } else { (0.0, 0.0) },
            position,
        }
    }

    /// Writes cross input `c` of the candidate with vector `v` into `out` (as wide as the
    /// input), given its [`Pair`] (computed once per candidate).
    pub fn fill(&self, c: Cross, v: &[f32], pair: &Pair, out: &mut [f32]) {
        match c.shape() {
            CrossShape::UserVector => out.copy_from_slice(self.user),
            CrossShape::ItemVector => out.copy_from_slice(v),
            CrossShape::Product => {
                for ((o, a), b) in out.iter_mut().zip(self.user).zip(v) {
                    *o = a * b;
                }
            }
            CrossShape::Attention => match &self.attention {
                Some((m, keys)) => m.attend(keys, v, out),
                None => out.iter_mut().for_each(|o| *o = 0.0),
            },
            CrossShape::Scalar => out[0] = pair.scalar(c),
        }
    }
}

/// (max, mean) of the cosines `dots / norm` (the history's unit vectors against a vector of
/// length `norm`); at least one dot product.
fn max_mean(dots: impl Iterator<Item = f32>, norm: f32) -> (f32, f32) {
    let (mut mx, mut sum, mut n) = (f32::NEG_INFINITY, 0f32, 0usize);
    for d in dots {
        let c = d / norm;
        mx = mx.max(c);
        sum += c;
        n += 1;
    }
    (mx, sum / n as f32)
}

/// The inputs of one (request, candidate) pair that cost more than a copy: the two-tower score,
/// the history similarities (max, mean), and the candidate's 1-based position in the list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    pub score: f32,
    pub history: (f32, f32),
    pub position: usize,
}

impl Pair {
    /// The value of a one-number cross input (0 for a vector input).
    pub fn scalar(&self, c: Cross) -> f32 {
        match c {
            Cross::Score => self.score,
            Cross::HistoryMax => self.history.0,
            Cross::HistoryMean => self.history.1,
            Cross::RecallRank => (self.position.max(1) as f32).ln(),
            Cross::UserVector | Cross::ItemVector | Cross::Product | Cross::TargetAttention => 0.0,
        }
    }
}

/// Checks a model stage against the request before anything runs: every cross input the model
/// reads must have the width the towers produce.
pub fn check_model(name: &str, model: &Model, dims: usize) -> Result<()> {
    for (_, c) in Cross::ALL {
        if let Some(w) = model.cross_width(c) {
            if c.is_vector() && w != dims {
                return Err(PrerankError::Bad(format!(
                    "pre-rank model \"{name}\" reads the cross input \"{}\" {w} wide, but the towers' vectors have {dims} dimensions",
                    c.name()
                )));
            }
        }
    }
    Ok(())
}

/// Indices `idx` ordered by `score` (higher first), ties by item id; returns (kept, their
/// scores, dropped).
fn top(
    cands: &[Candidate],
    idx: &[usize],
    score: &[f32],
    keep: usize,
) -> (Vec<usize>, Vec<f32>, Vec<usize>) {
    let mut order: Vec<usize> = (0..idx.len()).collect();
    order.sort_by(|&a, &b| {
        score[b]
            .total_cmp(&score[a])
            .then(cands[idx[a]].item.cmp(&cands[idx[b]].item))
    });
    let n = keep.min(order.len());
    let kept = order[..n].iter().map(|&o| idx[o]).collect();
    let scores = order[..n].iter().map(|&o| score[o]).collect();
    let dropped = order[n..].iter().map(|&o| idx[o]).collect();
    (kept, scores, dropped)
}

/// Runs the stages over `cands`. `item_part(stage, i)` gives the item part of candidate `i` for
/// model stage `stage` (the caller fetches item features for the survivors only). Candidates
/// must be distinct items with vectors as wide as the user's. Returns one report per stage;
/// the last stage's `kept` and `scores` are the result.
///
/// The callbacks fail with the caller's error type, which the cascade's own errors convert into.
pub fn cascade<E: From<PrerankError>>(
    req: &Request,
    cands: &[Candidate],
    stages: &[Stage],
    item_part: &mut ItemParts<E>,
    poll: &mut dyn FnMut() -> std::result::Result<(), E>,
) -> std::result::Result<Vec<StageReport>, E> {
    if stages.is_empty() {
        return Err(PrerankError::Bad("a cascade needs at least one stage".into()).into());
    }
    let dims = req.user.len();
    if let Some(c) = cands.iter().find(|c| c.vector.len() != dims) {
        return Err(PrerankError::Bad(format!(
            "item {} has a {}-dimensional vector, the user vector has {dims}",
            c.item,
            c.vector.len()
        ))
        .into());
    }
    let crosses = CrossInputs::new(req.metric, req.user, req.history);
    let mut alive: Vec<usize> = (0..cands.len()).collect();
    let mut reports = Vec::with_capacity(stages.len());
    for (s, stage) in stages.iter().enumerate() {
        poll()?;
        let t = Instant::now();
        if stage.keep == 0 {
            return Err(PrerankError::Bad(format!("stage {} keeps 0 candidates", s + 1)).into());
        }
        // The vectors of the candidates alive, gathered once into one matrix that every step
        // below reads: the candidates' own vectors may lie scattered over memory (a cache's),
        // and each step would wait for them again.
        let mut x = Vec::with_capacity(alive.len() * dims);
        for &i in &alive {
            x.extend_from_slice(&cands[i].vector);
        }
        let vector = |j: usize| &x[j * dims..(j + 1) * dims];
        let tt: Vec<f32> = (0..alive.len()).map(|j| crosses.score(vector(j))).collect();
        let mut tasks = Vec::new();
        // What a sigmoid task's stage shows (its probability) when it ranks by the logit.
        let mut shown: Option<Vec<f32>> = None;
        let score = match &stage.scorer {
            Scorer::TwoTower => tt,
            Scorer::Model {
                name,
                model,
                user,
                by,
            } => {
                check_model(name, model, dims).map_err(E::from)?;
                let parts = item_part(s, &alive)?;
                if parts.len() != alive.len() {
                    return Err(
                        PrerankError::Bad("item parts do not match the candidates".into()).into(),
                    );
                }
                let wants_history = model.cross_width(Cross::HistoryMax).is_some()
                    || model.cross_width(Cross::HistoryMean).is_some();
                let history = if wants_history {
                    crosses.history_rows(&x, alive.len())
                } else {
                    vec![(0.0, 0.0); alive.len()]
                };
                let pairs: Vec<Pair> = alive
                    .iter()
                    .zip(tt.iter().zip(history))
                    .map(|(&i, (&score, history))| Pair {
                        score,
                        history,
                        position: i + 1,
                    })
                    .collect();
                let rows: Vec<Row> = parts
                    .iter()
                    .enumerate()
                    .map(|(j, p)| (&**p, vector(j)))
                    .collect();
                let keys = model.attention_keys(req.history);
                poll()?;
                let threads = if alive.len() >= PARALLEL_FROM {
                    req.threads.max(1)
                } else {
                    1
                };
                let out = model.forward_rows(
                    user,
                    req.user,
                    &rows,
                    &keys,
                    &mut |j, c| pairs[j].scalar(c),
                    threads,
                );
                let nt = model.output_dim().max(1);
                if let Some(j) = out.iter().position(|x| !x.is_finite()) {
                    return Err(PrerankError::NonFinite {
                        model: (*name).to_owned(),
                        item: cands[alive[j / nt]].item,
                    }
                    .into());
                }
                if model.tasks().is_empty() {
                    out
                } else {
                    let ts = model.tasks();
                    tasks = out
                        .chunks_exact(nt)
                        .flat_map(|row| ts.iter().zip(row).map(|(t, &x)| t.link.apply(x)))
                        .collect();
                    let s = model.scores(&out, *by);
                    // The fused sum can overflow where no output did.
                    if let Some(j) = s.iter().position(|x| !x.is_finite()) {
                        return Err(PrerankError::NonFinite {
                            model: (*name).to_owned(),
                            item: cands[alive[j]].item,
                        }
                        .into());
                    }
                    match by {
                        // σ rounds confident logits to 1.0 in f32: rank by the logit (the same
                        // order, without the ties) and show σ.
                        ScoreBy::Task(t) if ts[*t].link == twotower_tower::Link::Sigmoid => {
                            shown = Some(s);
                            out.iter().skip(*t).step_by(nt).copied().collect()
                        }
                        _ => s,
                    }
                }
            }
        };
        let (kept, mut scores, dropped) = top(cands, &alive, &score, stage.keep);
        if let Some(shown) = shown {
            let at: std::collections::HashMap<usize, usize> =
                alive.iter().enumerate().map(|(j, &i)| (i, j)).collect();
            scores = kept.iter().map(|i| shown[at[i]]).collect();
        }
        // The kept candidates' task scores, in the kept order.
        let task_scores = if tasks.is_empty() {
            Vec::new()
        } else {
            let nt = tasks.len() / alive.len().max(1);
            let at: std::collections::HashMap<usize, usize> =
                alive.iter().enumerate().map(|(j, &i)| (i, j)).collect();
            kept.iter()
                .flat_map(|i| tasks[at[i] * nt..(at[i] + 1) * nt].iter().copied())
                .collect()
        };
        reports.push(StageReport {
            received: alive.len(),
            kept: kept.clone(),
            scores,
            dropped,
            seconds: t.elapsed().as_secs_f64(),
            task_scores,
        });
        alive = kept;
    }
    Ok(reports)
}
