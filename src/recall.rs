//! SQL surface of one-call recall: `twotower.recall(model, index, features, k, exclude)` = user
//! tower + an ordered scan of exactly the named twotower_hnsw index, with exclusions.

use pgrx::prelude::*;

#[pg_schema]
pub mod twotower {
    use crate::am::search::Target;
    use crate::catalog::{self, expect_kind, JsonbValue, RegClass};
    use crate::error::{OrReport, TtError, TtResult};
    use pgrx::pg_sys;
    use pgrx::prelude::*;
    use std::collections::HashSet;
    use std::sync::Arc;
    use twotower_ann::Metric;
    use twotower_tower::Kind;

    /// The largest k recall() returns.
    const MAX_K: i32 = 100_000;

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
    pub(crate) fn search(
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
            if let Some(shards) = crate::fanout::shards(index_oid)? {
                metric = shards.metric();
                same_metric(model_metric, metric)?;
                let ex: Vec<i64> = exclude.iter().copied().collect();
                let ef_shards = if ef > 0 {
                    ef as i32
                } else {
                    crate::gucs::EF_SEARCH.get()
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

    /// One-call recall: the user tower of `model` applied to `features`, then the `k` nearest
    /// items in `index` (a twotower_hnsw index on a table with a single-column integer primary
    /// key, the item id), leaving out the ids in `exclude` (already seen, blocked). Rows come in
    /// rank order; `score` is the similarity (cosine similarity, inner product, or negated L2
    /// distance, by the index's operator class). `ef_search` sets this call's candidate list
    /// (default: the `twotower.ef_search` setting); it is raised to `k` in any case.
    #[pg_extern(stable, parallel_restricted)]
    fn recall(
        model: Option<&str>,
        index: Option<RegClass>,
        features: Option<JsonbValue>,
        k: default!(Option<i32>, 100),
        exclude: default!(Option<Vec<Option<i64>>>, "NULL"),
        ef_search: default!(Option<i32>, "NULL"),
    ) -> TableIterator<'static, (name!(item_id, i64), name!(score, f32), name!(rank, i32))> {
        let (Some(model), Some(index), Some(features)) = (model, index, features) else {
            return TableIterator::new(Vec::new());
        };
        let Some(k) = k else {
            TtError::NullArgument("k").report();
        };
        if !(1..=MAX_K).contains(&k) {
            TtError::BadArgument(format!("k must be between 1 and {MAX_K}, not {k}")).report();
        }
        let ef = match ef_search {
            None => 0,
            Some(e) if (1..=MAX_K).contains(&e) => e as usize,
            Some(e) => {
                TtError::BadArgument(format!("ef_search must be between 1 and {MAX_K}, not {e}"))
                    .report()
            }
        };
        let l = catalog::active_model(model).or_report();
        expect_kind(&l, Kind::User).or_report();
        let f = features.features(&l.model, "features").or_report();
        let query = l.embed_user(&f).or_report();
        let exclude: HashSet<i64> = exclude.unwrap_or_default().into_iter().flatten().collect();
        let rows = search(
            index.0,
            &query,
            l.model.metric(),
            k as usize,
            &exclude,
            ef,
            false,
        )
        .or_report();
        TableIterator::new(
            rows.into_iter()
                .enumerate()
                .map(|(i, (id, s, _))| (id, s, i as i32 + 1))
                .collect::<Vec<_>>(),
        )
    }
}
