//! SQL surface of one-call recall: `twotower.recall(model, index, features, k, exclude)` = user
//! tower + an ordered scan of exactly the named twotower_hnsw index, with exclusions.

use pgrx::prelude::*;

#[pg_schema]
pub mod twotower {
    use crate::infra::catalog::{self, expect_kind, JsonbValue, RegClass};
    use crate::infra::error::{OrReport, TtError};
    use pgrx::prelude::*;
    use std::collections::HashSet;
    use twotower_tower::Kind;

    /// The largest k recall() returns.
    const MAX_K: i32 = 100_000;

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
        let rows = crate::serve::search::search(
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
