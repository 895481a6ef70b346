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
    if crate::infra::citus::is_citus_index(index_oid)? {
        return citus_search(index_oid, query, model_metric, k, exclude, ef);
    }
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

/// The search of an index on a Citus table, whose rows and index entries are in the shards on
/// the workers: the ordered query `ORDER BY vector <op> q LIMIT k` on the table, which Citus
/// sends to every shard (each an ordered scan of its own index, exclusions pushed down) and
/// merges by distance; run as the caller (the distributed table's privileges). The shards use
/// their own `twotower.ef_search` (propagated by Citus as it propagates settings): an explicit
/// `ef` cannot reach them and is refused.
fn citus_search(
    index_oid: pg_sys::Oid,
    query: &[f32],
    model_metric: Metric,
    k: usize,
    exclude: &HashSet<i64>,
    ef: usize,
) -> TtResult<Vec<(i64, f32, Option<Arc<[f32]>>)>> {
    if ef > 0 {
        return Err(TtError::Unsupported(
            "ef_search cannot be passed to the shards of a Citus table: SET LOCAL twotower.ef_search with citus.propagate_set_commands = 'local' (docs/scale-out.md)".into(),
        ));
    }
    let metric = crate::am::search::index_metric(index_oid, "recall()")?;
    same_metric(model_metric, metric)?;
    let (table, vector) = crate::am::search::indexed_column(index_oid)
        .ok_or_else(|| TtError::WrongIndex("recall()".into()))?;
    let id = crate::am::search::primary_key_column(table)?;
    let name = crate::infra::spi::relation_name(table)?;
    let Some(id) = id else {
        return Err(TtError::NoItemId(format!(
            "table \"{name}\" has no single-column integer primary key"
        )));
    };
    let op = crate::serve::fanout::distance_operator(metric)?;
    let (id, vector) = (
        pgrx::spi::quote_identifier(&id),
        pgrx::spi::quote_identifier(&vector),
    );
    let ex: Vec<i64> = exclude.iter().copied().collect();
    let sql = format!(
        "SELECT t.{id}::pg_catalog.int8, (t.{vector} {op} $1::pg_catalog.float4[])::pg_catalog.float8
           FROM {name} AS t WHERE NOT (t.{id} OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.int8[]))
          ORDER BY t.{vector} {op} $1::pg_catalog.float4[] LIMIT {k}"
    );
    let mut best: Vec<(f64, i64)> = Vec::with_capacity(k);
    Spi::connect(|c| {
        for r in c.select(&sql, None, &[query.to_vec().into(), ex.into()])? {
            if let (Some(i), Some(d)) = (r.get::<i64>(1)?, r.get::<f64>(2)?) {
                best.push((d, i));
            }
        }
        Ok::<_, pgrx::spi::Error>(())
    })
    .map_err(|e| TtError::BadArgument(format!("searching {name} through Citus: {e}")))?;
    // Distance order, ties by id (as the index scans order them).
    best.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    Ok(best
        .into_iter()
        .map(|(d, id)| (id, metric.similarity(d) as f32, None))
        .collect())
}
