//! Query-aware links: a graph tuned to the queries it will be asked.
//!
//! A two-tower index is asked with *user* vectors, which lie elsewhere than the items the graph
//! was built from (out-of-distribution queries): a search reaches the right region, but some of
//! a user's true nearest items are linked from nowhere the beam goes. Given a sample of real
//! queries, the tuning finds exactly those items and links them from where the search goes:
//!
//! 1. each sample query's exact `k` nearest items (every item's distance, on the worker
//!    threads);
//! 2. a search of width `max(ef, k)` for each query, as a scan's first round would search; the
//!    true neighbours it misses are the *missed* items;
//! 3. each missed item, nearest to the query first, gets a level-0 link from the item nearest
//!    to it among the true neighbours the search found and the missed ones already linked (the
//!    next two nearest are tried when that one's list is full). The search expands every true
//!    neighbour it found, so the next search for that query reaches the missed item through
//!    its new link;
//! 4. rounds repeat (a new link changes other searches) until one adds no link or `rounds` are
//!    done.
//!
//! The links are added in the sample's order after each round's searches ran on the graph as
//! it was at the round's start (the searches run in parallel; nothing they read changes under
//! them), so the result depends on the graph and the sample only, never on the threads. Every
//! list gets `extra` more slots first (so a full list still takes query-aware links); a list
//! holds at most its old capacity plus `extra`. Links are only added, never removed, so every
//! item the plain graph reached stays reachable; the build's self-check then runs on the tuned
//! graph as on any other.
//!
//! This is the idea of RoarGraph (Chen et al., PVLDB 17(11), 2024: links between the items a
//! query's neighbours share) and NGFix (2025: repair the links of the queries a graph serves
//! badly), done our way: only where a search of the sample fails, from the items it found.

use std::sync::OnceLock;

use crate::build::{Graph, Link, Probe, Scratch};
use crate::error::{AnnError, Result};
use crate::image::Poll;
use crate::metric::{is_zero, validate_vector, Metric};

/// How a graph is tuned to a sample of queries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TuneParams {
    /// Neighbours of each query that a search should find (recall@k).
    pub k: usize,
    /// The search width the tuning holds the graph to (a scan's `ef_search`).
    pub ef: usize,
    /// Level-0 slots added to every node for the query-aware links.
    pub extra: usize,
    /// At most this many rounds of searches and repairs (they stop when one adds no link).
    pub rounds: usize,
}

impl Default for TuneParams {
    fn default() -> Self {
        TuneParams {
            k: 100,
            ef: 100,
            extra: 8,
            rounds: 8,
        }
    }
}

impl TuneParams {
    pub fn validate(&self) -> Result<()> {
        let range = |option: &'static str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(AnnError::InvalidOption {
                    option,
                    reason: format!("{v} is outside {lo}..{hi}"),
                })
            }
        };
        range("query_k", self.k, 1, 1000)?;
        range("query_ef", self.ef, 1, 10_000)?;
        range("query_extra", self.extra, 0, 256)?;
        range("query_rounds", self.rounds, 1, 16)
    }
}

/// What a tuning did (stored in the image's header: `Header::tuning`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Tuning {
    /// Sample queries used (zero vectors of a cosine index are left out).
    pub queries: u32,
    pub k: u32,
    pub ef: u32,
    pub extra: u32,
    /// Query-aware links added.
    pub links: u64,
    /// Mean recall@k of the sample's searches at width max(ef, k), before and after.
    pub recall_before: f32,
    pub recall_after: f32,
}

/// Memory a tuning needs beside the graph, in bytes: the widened level-0 lists (the old ones
/// are held while they are copied), the queries, their exact neighbours and each thread's
/// scratch.
pub fn tune_memory(
    n: usize,
    m: usize,
    queries: usize,
    dims: usize,
    p: &TuneParams,
    threads: usize,
) -> usize {
    let lists = n * (1 + 2 * m.max(2) + p.extra) * 4;
    let per_query = dims * 4 + p.k * 4 + p.k * 16;
    lists + queries * per_query + threads.clamp(1, 64) * (n * 4 + p.k.max(p.ef) * 32)
}

/// One query's plan in a round: how many of its true neighbours the search found, and the
/// links that would make it find the rest (missed item, then its candidate sources).
struct Plan {
    hits: usize,
    links: Vec<(u32, Vec<u32>)>,
}

/// How many sources a missed item is offered (the nearest first; the next when a list is full).
const SOURCES: usize = 3;

fn plan(graph: &Graph, probe: &Probe, truth: &[u32], p: &TuneParams, s: &mut Scratch) -> Plan {
    let res = graph.search_probe(probe, p.ef.max(p.k), s);
    let mut found: Vec<u32> = res.iter().take(truth.len()).map(|x| x.1).collect();
    found.sort_unstable();
    let missed: Vec<u32> = truth
        .iter()
        .copied()
        .filter(|t| found.binary_search(t).is_err())
        .collect();
    let hits = truth.len() - missed.len();
    if missed.is_empty() {
        return Plan {
            hits,
            links: Vec::new(),
        };
    }
    // The sources: the true neighbours the search found (it expanded each of them), or when
    // it found none, the nearest items it did find.
    let mut reach: Vec<u32> = truth
        .iter()
        .copied()
        .filter(|t| found.binary_search(t).is_ok())
        .collect();
    if reach.is_empty() {
        reach = res.iter().take(SOURCES).map(|x| x.1).collect();
    }
    let mut links = Vec::with_capacity(missed.len());
    for m in missed {
        let mut by: Vec<(f32, u32)> = reach
            .iter()
            .map(|&r| (graph.item_dist(r as usize, m as usize), r))
            .collect();
        let keep = SOURCES.min(by.len());
        if keep > 0 && keep < by.len() {
            by.select_nth_unstable_by(keep - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        }
        by.truncate(keep);
        by.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        links.push((m, by.into_iter().map(|x| x.1).collect()));
        reach.push(m);
    }
    Plan { hits, links }
}

/// A sample's queries and their exact neighbours: what [`repair`] holds the graph to.
pub(crate) struct Sample {
    params: TuneParams,
    probes: Vec<Probe>,
    truth: Vec<Vec<u32>>,
}

/// Widens `graph`'s lists for the query-aware links and finds the exact neighbours of
/// `queries` (`dims` floats each, row-major). `poll(done)` is called about every 20 ms from
/// the calling thread (see `image::parallel_chunked`).
pub(crate) fn prepare(
    graph: &mut Graph,
    metric: Metric,
    dims: usize,
    queries: &[f32],
    p: &TuneParams,
    threads: usize,
    poll: &mut dyn FnMut(usize) -> Poll,
) -> Result<Sample> {
    p.validate()?;
    if !queries.len().is_multiple_of(dims.max(1)) {
        return Err(AnnError::DimensionMismatch {
            expected: dims,
            got: queries.len() % dims.max(1),
        });
    }
    let mut probes = Vec::new();
    for v in queries.chunks_exact(dims) {
        validate_vector(v, Some(dims))?;
        if metric == Metric::Cosine && is_zero(v) {
            continue;
        }
        probes.push(graph.probe(v));
    }
    let k = p.k.min(graph.len());
    if probes.is_empty() || k == 0 {
        return Ok(Sample {
            params: *p,
            probes: Vec::new(),
            truth: Vec::new(),
        });
    }
    graph.widen(p.extra);
    let graph = &*graph;
    let all: Vec<usize> = (0..probes.len()).collect();
    let truth: Vec<OnceLock<Vec<u32>>> = (0..probes.len()).map(|_| OnceLock::new()).collect();
    // One query a chunk: an exact scan reads every item, so a cancel waits for one scan.
    crate::image::parallel_chunked(&all, 1, threads, poll, |_: &mut (), i| {
        let top = graph.exact_top(&probes[i], k);
        let _ = truth[i].set(top.into_iter().map(|x| x.1).collect());
        Ok(false)
    })?;
    Ok(Sample {
        params: *p,
        probes,
        truth: truth
            .into_iter()
            .map(|c| c.into_inner().unwrap_or_default())
            .collect(),
    })
}

/// What one [`repair`] did: links added, the sample's recall@k before and after.
pub(crate) struct Repair {
    pub links: u64,
    pub before: f32,
    pub after: f32,
}

/// Rounds of searches and repairs (steps 2 to 4 of the module's page), at most the sample's
/// `rounds`.
pub(crate) fn repair(
    graph: &Graph,
    sample: &Sample,
    threads: usize,
    poll: &mut dyn FnMut(usize) -> Poll,
) -> Result<Repair> {
    let p = &sample.params;
    let all: Vec<usize> = (0..sample.probes.len()).collect();
    let total = (sample.truth.iter().map(Vec::len).sum::<usize>()).max(1) as f64;
    let measure = |poll: &mut dyn FnMut(usize) -> Poll| -> Result<Vec<Plan>> {
        let plans: Vec<OnceLock<Plan>> = all.iter().map(|_| OnceLock::new()).collect();
        crate::image::parallel_with(&all, threads, poll, |s: &mut Scratch, i| {
            let _ = plans[i].set(plan(graph, &sample.probes[i], &sample.truth[i], p, s));
            Ok(false)
        })?;
        Ok(plans
            .into_iter()
            .map(|c| {
                c.into_inner().unwrap_or(Plan {
                    hits: 0,
                    links: Vec::new(),
                })
            })
            .collect())
    };
    let recall =
        |plans: &[Plan]| (plans.iter().map(|x| x.hits).sum::<usize>() as f64 / total) as f32;
    let mut plans = measure(poll)?;
    let mut r = Repair {
        links: 0,
        before: recall(&plans),
        after: 0.0,
    };
    for _ in 0..p.rounds {
        let mut added = 0u64;
        for pl in &plans {
            for (m, sources) in &pl.links {
                for &src in sources {
                    match graph.add_link(src as usize, *m) {
                        Link::Added => {
                            added += 1;
                            break;
                        }
                        Link::Present => break,
                        Link::Full => {}
                    }
                }
            }
        }
        r.links += added;
        if added == 0 {
            break;
        }
        plans = measure(poll)?;
    }
    r.after = recall(&plans);
    Ok(r)
}

impl Sample {
    /// The tuning's record, from its first repair.
    pub(crate) fn tuning(&self, first: &Repair) -> Tuning {
        Tuning {
            queries: self.probes.len() as u32,
            k: self.params.k as u32,
            ef: self.params.ef as u32,
            extra: self.params.extra as u32,
            links: first.links,
            recall_before: first.before,
            recall_after: first.after,
        }
    }
}
