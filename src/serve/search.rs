//! The search of one twotower_hnsw index as the serving path sees it: the index of a table,
//! of each leaf of a partitioned table, or of each shard (foreign partitions, asked at once),
//! merged to the `k` nearest with their similarity; used by `recall()` and the pipelines'
//! two-tower channels.

use crate::am::search::Target;
use crate::infra::error::{TtError, TtResult};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashSet;
use std::sync::Arc;
use twotower_ann::Metric;

fn same_metric(model: Metric, index: Metric) -> TtResult<()> {
    if model == index {
        return Ok(());
    }
    Err(TtError::ModelIndexMismatch {
        detail: format!(
            "The model is trained for {} but the index orders by {}.",
            model.spec_name(),
            index.name()
        ),
    })
}

/// The recall channel: ranked (item id, score) of the `k` nearest live rows to the user
/// vector `query` in `index_oid`, skipping `exclude`, through the access method's search
/// interface (privileges are checked there before anything is opened). The index of a
/// partitioned table is searched in each leaf partition, and the leaves' top `k` merged.
/// With `vectors`, each hit of a local table carries its stored vector (hits from shards
/// carry none).
pub fn search(
    index_oid: pg_sys::Oid,
    query: &[f32],
    model_metric: Metric,
    k: usize,
    exclude: &HashSet<i64>,
    ef: usize,
    vectors: bool,
) -> TtResult<Vec<(i64, f32, Option<Arc<[f32]>>)>> {
    let targets = Target::open_all(index_oid, "recall()")?;
    let mut best: Vec<(f64, i64, Option<Arc<[f32]>>)> = Vec::new();
    let mut metric = model_metric;
    for target in targets {
        check_for_interrupts!();
        metric = target.metric();
        same_metric(model_metric, metric)?;
        if let Some(d) = target.dims() {
            if d != query.len() {
                return Err(TtError::ModelIndexMismatch {
                    detail: format!(
                        "The model's vectors have {} dimensions, the index's have {d}.",
                        query.len()
                    ),
                });
            }
        }
        best.extend(
            target
                .nearest_with(query, k, exclude, ef, vectors)?
                .into_iter()
                .map(|(id, d, v)| (d, id, v)),
        );
        target.close();
    }
    // Foreign partitions (shards), all asked at once (twotower.shard_protocol).
    if crate::am::search::is_partitioned(index_oid) {
        if let Some(shards) = crate::serve::fanout::shards(index_oid)? {
            metric = shards.metric();
            same_metric(model_metric, metric)?;
            let ex: Vec<i64> = exclude.iter().copied().collect();
            let ef_shards = if ef > 0 {
                ef as i32
            } else {
                crate::infra::gucs::EF_SEARCH.get()
            };
            best.extend(
                shards
                    .nearest(query, k, &ex, ef_shards)?
                    .into_iter()
                    .map(|(id, d)| (d, id, None)),
            );
        }
    }
    // Distance order, ties by id (as each leaf orders them). The partition key is part of
    // a partitioned table's primary key (or is the item id), so an id is in one leaf only.
    best.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    best.truncate(k);
    Ok(best
        .into_iter()
        .map(|(d, id, v)| (id, metric.similarity(d) as f32, v))
        .collect())
}
