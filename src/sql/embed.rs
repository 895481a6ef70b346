//! SQL surface of tower inference: `embed_user`, `embed_users` (batched), `embed_item`, and the
//! nightly item-vector refresh `refresh_item_vectors`.

use pgrx::prelude::*;

/// The first row of a row-major `[n, dim]` output holding a NaN or an infinity.
fn first_non_finite(out: &[f32], dim: usize) -> Option<usize> {
    out.iter()
        .position(|v| !v.is_finite())
        .map(|i| i / dim.max(1))
}

#[pg_schema]
pub mod twotower {
    use crate::infra::catalog::{self, expect_kind, JsonbValue, RegClass};
    use crate::infra::error::{OrReport, TtError};
    use crate::infra::spi;
    use pgrx::pg_sys;
    use pgrx::prelude::*;
    use pgrx::spi::quote_identifier;
    use twotower_tower::{forward_parallel, Kind};

    /// The user tower of model `model` (its active version) applied to one user's features.
    #[pg_extern(stable, parallel_restricted, strict)]
    fn embed_user(model: &str, features: JsonbValue) -> Vec<f32> {
        let l = catalog::active_model(model).or_report();
        expect_kind(&l, Kind::User).or_report();
        let f = features.features(&l.model, "features").or_report();
        l.embed_user(&f).or_report()
    }

    /// The item tower of model `model` applied to one item's features, typically
    /// `to_jsonb(row)`: keys that are not features of the model (other columns) are ignored.
    #[pg_extern(stable, parallel_restricted, strict)]
    fn embed_item(model: &str, features: JsonbValue) -> Vec<f32> {
        let l = catalog::active_model(model).or_report();
        expect_kind(&l, Kind::Item).or_report();
        let f = features.features(&l.model, "features").or_report();
        l.model.embed_with(&f, false).or_report()
    }

    /// Users one `embed_users` call embeds at most.
    pub const MAX_USERS_PER_CALL: usize = 100_000;
    /// Users encoded and run through the tower between two interrupt checks.
    const FORWARD_CHUNK: usize = 2048;

    /// Many users at once (both cores): one row per element of `features`, in order
    /// (`ord` is the 1-based position). A NULL element gives a NULL embedding.
    ///
    /// Bounded: at most 100 000 users per call (54000 past it); elements are converted and
    /// encoded one at a time (multi-valued features cut to their `max_len` as they are
    /// encoded), so a call holds one element's JSON at a time, never the whole input; cancel
    /// and `statement_timeout` are answered between elements and between forward chunks.
    #[pg_extern(stable, parallel_restricted, strict)]
    fn embed_users(
        model: &str,
        features: pgrx::datum::Array<'_, JsonbValue>,
    ) -> TableIterator<'static, (name!(ord, i32), name!(embedding, Option<Vec<f32>>))> {
        let n = features.len();
        if n > MAX_USERS_PER_CALL {
            TtError::TooMany(format!(
                "embed_users() embeds at most {MAX_USERS_PER_CALL} users per call, not {n}"
            ))
            .report();
        }
        let l = catalog::active_model(model).or_report();
        expect_kind(&l, Kind::User).or_report();
        let dim = l.model.output_dim();
        let mut rows = Vec::with_capacity(n);
        let mut batch = Vec::with_capacity(FORWARD_CHUNK.min(n));
        let mut batch_ords = Vec::with_capacity(FORWARD_CHUNK.min(n));
        let flush = |batch: &mut Vec<_>,
                     ords: &mut Vec<i32>,
                     rows: &mut Vec<(i32, Option<Vec<f32>>)>| {
            if batch.is_empty() {
                return;
            }
            check_for_interrupts!();
            let out = forward_parallel(&l.model, batch, crate::infra::gucs::inference_threads());
            if let Some(row) = super::first_non_finite(&out, dim) {
                TtError::OutOfRange(format!(
                    "the tower output of features element {} is not finite (input values or weights too large)",
                    ords[row]
                ))
                .report();
            }
            for (j, ord) in ords.iter().enumerate() {
                rows.push((*ord, Some(out[j * dim..(j + 1) * dim].to_vec())));
            }
            batch.clear();
            ords.clear();
        };
        for (i, f) in features.iter().enumerate() {
            check_for_interrupts!();
            match f {
                Some(f) => {
                    let f = f.features(&l.model, "features").or_report();
                    batch.push(l.encode_user(&f).or_report());
                    batch_ords.push(i as i32 + 1);
                    if batch.len() == FORWARD_CHUNK {
                        flush(&mut batch, &mut batch_ords, &mut rows);
                    }
                }
                None => {
                    flush(&mut batch, &mut batch_ords, &mut rows);
                    rows.push((i as i32 + 1, None));
                }
            }
        }
        flush(&mut batch, &mut batch_ords, &mut rows);
        TableIterator::new(rows)
    }

    /// The nightly item-vector refresh: runs the item tower of `model` over every row of `items`
    /// (its columns are the features) and makes `target` hold exactly `(id, embedding)` for
    /// those items, in batches of `batch_size`, the forward passes on every core:
    /// - a feature of the model without a column in `items` is an error, unless the spec gives
    ///   it a default (then a NOTICE), so a wrong source cannot write one constant vector over
    ///   every item;
    /// - only new or changed vectors are written (unchanged rows are not touched, so they do
    ///   not go through the indexes again);
    /// - with `delete_missing` (the default), rows of `target` whose id is no longer in `items`
    ///   are deleted, so recall never returns an item that left the catalogue.
    ///
    /// Existing rows are found by id (an `ON CONFLICT` upsert when `target` has a unique index
    /// on its id column). Cancellable; progress as NOTICEs every 10 seconds. Returns how many
    /// rows were inserted, updated, deleted and left unchanged.
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::too_many_arguments)]
    fn refresh_item_vectors(
        model: &str,
        items: RegClass,
        target: RegClass,
        id_column: default!(&str, "'id'"),
        target_id_column: default!(&str, "'id'"),
        target_vector_column: default!(&str, "'embedding'"),
        batch_size: default!(i32, 1000),
        delete_missing: default!(bool, true),
    ) -> TableIterator<
        'static,
        (
            name!(inserted, i64),
            name!(updated, i64),
            name!(deleted, i64),
            name!(unchanged, i64),
        ),
    > {
        if !(1..=100_000).contains(&batch_size) {
            TtError::BadArgument(format!(
                "batch_size must be between 1 and 100000, not {batch_size}"
            ))
            .report();
        }
        let (items, target) = (items.0, target.0);
        let l = catalog::active_model(model).or_report();
        expect_kind(&l, Kind::Item).or_report();
        let src = spi::relation_name(items).or_report();
        let dst = spi::relation_name(target).or_report();
        let idc = spi::column(items, id_column, "item id").or_report();
        let tid = spi::column(target, target_id_column, "target id").or_report();
        let tvec = spi::column(target, target_vector_column, "target vector").or_report();
        let unique = spi::unique_column(target, target_id_column);
        // One row per item: a source without a unique index on its id column is checked first
        // (two rows for one id would write two target rows, or fail inside ON CONFLICT).
        let source_unique = spi::unique_column(items, id_column);
        if !source_unique {
            let dup = catalog::read_row::<i64, i64>(
                &format!(
                    "SELECT t.{idc}::pg_catalog.int8, 0::pg_catalog.int8 FROM {src} AS t WHERE t.{idc} IS NOT NULL
                      GROUP BY 1 HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 1 ORDER BY 1 LIMIT 1"
                ),
                &[],
            )
            .map_err(|e| TtError::BadArgument(format!("reading {src}: {e}")))
            .or_report();
            if let Some((Some(id), _)) = dup {
                TtError::DuplicateItem {
                    relation: src.clone(),
                    id,
                }
                .report();
            }
        }
        let batch_rows = "SELECT $1[i] AS id, $2[(i - 1) * $3 + 1 : i * $3] AS v
                            FROM pg_catalog.generate_series(1, pg_catalog.cardinality($1)) AS i";
        // One statement per batch returning (inserted, updated); unchanged rows are not written.
        let write = if unique {
            format!(
                "WITH w AS (
                   INSERT INTO {dst} AS t ({tid}, {tvec}) SELECT x.id, x.v FROM ({batch_rows}) AS x
                   ON CONFLICT ({tid}) DO UPDATE SET {tvec} = EXCLUDED.{tvec}
                    WHERE t.{tvec} IS DISTINCT FROM EXCLUDED.{tvec}
                   RETURNING (t.xmax OPERATOR(pg_catalog.=) '0'::pg_catalog.xid) AS ins)
                 SELECT pg_catalog.count(*) FILTER (WHERE ins), pg_catalog.count(*) FILTER (WHERE NOT ins) FROM w"
            )
        } else {
            format!(
                "WITH x AS ({batch_rows}),
                 u AS (UPDATE {dst} AS t SET {tvec} = x.v FROM x
                        WHERE t.{tid} OPERATOR(pg_catalog.=) x.id AND t.{tvec} IS DISTINCT FROM x.v
                        RETURNING 1),
                 n AS (INSERT INTO {dst} ({tid}, {tvec}) SELECT x.id, x.v FROM x
                        WHERE NOT EXISTS (SELECT 1 FROM {dst} AS t WHERE t.{tid} OPERATOR(pg_catalog.=) x.id)
                        RETURNING 1)
                 SELECT (SELECT pg_catalog.count(*) FROM n), (SELECT pg_catalog.count(*) FROM u)"
            )
        };
        let dim = l.model.output_dim() as i32;
        // Read only the columns that are features (wide rows stay cheap).
        let mut cols = Vec::new();
        for f in l.model.feature_names() {
            if spi::column_exists(items, f) {
                cols.push(format!(
                    "{}, t.{}",
                    pgrx::spi::quote_literal(f),
                    quote_identifier(f)
                ));
            } else if l.model.feature_has_default(f) {
                notice!("refresh_item_vectors: {src} has no column \"{f}\"; every item gets the feature's default");
            } else {
                TtError::MissingFeatureColumn {
                    relation: src.clone(),
                    feature: f.to_string(),
                    tower: "item",
                    training: false,
                }
                .report();
            }
        }
        // The features as one jsonb object built from named pairs (not `to_jsonb` of a row:
        // Citus rewrites a row of a distributed table's columns into one whose keys are f1,
        // f2, …, which read as missing features). At most 50 pairs a call (a function takes
        // at most 100 arguments), the objects concatenated.
        let select = if cols.is_empty() {
            format!("SELECT t.{idc}::pg_catalog.int8, '{{}}'::jsonb FROM {src} AS t")
        } else {
            let objects: Vec<String> = cols
                .chunks(50)
                .map(|c| format!("pg_catalog.jsonb_build_object({})", c.join(", ")))
                .collect();
            format!(
                "SELECT t.{idc}::pg_catalog.int8, {} FROM {src} AS t",
                objects.join(" OPERATOR(pg_catalog.||) ")
            )
        };
        // With a Citus table on either side, Citus cannot join a distributed table with a local
        // one inside a DELETE: the ids that are gone are computed first (each side read through
        // the coordinator), then deleted.
        let citus = crate::infra::citus::is_citus_table(items).or_report()
            || crate::infra::citus::is_citus_table(target).or_report();
        let delete = if citus {
            format!(
                "WITH gone AS MATERIALIZED (
                     SELECT t.{tid}::pg_catalog.int8 AS id FROM {dst} AS t
                     EXCEPT SELECT s.{idc}::pg_catalog.int8 FROM {src} AS s),
                 d AS (DELETE FROM {dst} AS t
                        WHERE t.{tid}::pg_catalog.int8 OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT g.id FROM gone AS g))
                        RETURNING 1)
                 SELECT pg_catalog.count(*) FROM d"
            )
        } else {
            format!(
                "WITH d AS (DELETE FROM {dst} AS t
                             WHERE NOT EXISTS (SELECT 1 FROM {src} AS s
                                                WHERE s.{idc}::pg_catalog.int8 OPERATOR(pg_catalog.=) t.{tid}::pg_catalog.int8)
                             RETURNING 1)
                 SELECT pg_catalog.count(*) FROM d"
            )
        };
        // Both tables distributed by Citus and co-located on their ids, the target unique on
        // its id: one statement that Citus runs on the workers, each shard's rows through the
        // item tower there (the model shipped with the statement), nothing through here.
        if citus
            && unique
            && crate::infra::citus::colocated_on(items, id_column, target, target_id_column)
                .or_report()
        {
            if let Some((inserted, updated, done)) =
                shipped_refresh(&l, &src, &dst, &idc, &tid, &tvec, &select_features(&cols))
            {
                let deleted = if delete_missing {
                    check_for_interrupts!();
                    Spi::get_one::<i64>(&delete)
                        .map_err(|e| TtError::Internal(format!("refresh_item_vectors: {e}")))
                        .or_report()
                        .unwrap_or(0)
                } else {
                    0
                };
                return TableIterator::once((
                    inserted,
                    updated,
                    deleted,
                    done - inserted - updated,
                ));
            }
        }
        let threads = crate::infra::gucs::inference_threads();
        let mut progress = spi::Progress::new("refresh_item_vectors", "items");
        let (mut inserted, mut updated) = (0i64, 0i64);
        let mut run = || -> Result<(), pgrx::spi::Error> {
            let batches = spi::Batches::open(&select)?;
            let plan = spi::prepare(
                &write,
                &[
                    pg_sys::INT8ARRAYOID,
                    pg_sys::FLOAT4ARRAYOID,
                    pg_sys::INT4OID,
                ],
            )?;
            loop {
                let n = batches.next(batch_size as usize, |client, rows| {
                    let mut ids = Vec::with_capacity(batch_size as usize);
                    let mut encoded = Vec::with_capacity(batch_size as usize);
                    for row in rows {
                        let Some(id) = row.get::<i64>(1)? else {
                            TtError::NullValue(format!("a row of {src} has a NULL {idc}")).report();
                        };
                        let Some(features) = row.get::<JsonbValue>(2)? else {
                            continue;
                        };
                        let x = l
                            .model
                            .encode(
                                &features.features(&l.model, "item features").or_report(),
                                false,
                            )
                            .map_err(|e| TtError::Item { id, error: e })
                            .or_report();
                        ids.push(id);
                        encoded.push(x);
                    }
                    if ids.is_empty() {
                        return Ok(0);
                    }
                    let out = forward_parallel(&l.model, &encoded, threads);
                    drop(encoded);
                    if let Some(row) = super::first_non_finite(&out, dim as usize) {
                        let d = dim as usize;
                        let index = out[row * d..(row + 1) * d]
                            .iter()
                            .position(|v| !v.is_finite())
                            .unwrap_or(0);
                        TtError::Item {
                            id: ids[row],
                            error: twotower_tower::TowerError::NonFiniteOutput { index },
                        }
                        .report();
                    }
                    let n = ids.len();
                    let t = client.update(&plan, None, &[ids.into(), out.into(), dim.into()])?;
                    let r = t.first();
                    inserted += r.get::<i64>(1)?.unwrap_or(0);
                    updated += r.get::<i64>(2)?.unwrap_or(0);
                    Ok(n)
                })?;
                if n == 0 {
                    return Ok(());
                }
                progress.add(n);
            }
        };
        run()
            .map_err(|e| {
                crate::infra::error::TtError::Internal(format!("refresh_item_vectors: {e}"))
            })
            .or_report();
        let done = progress.done as i64;
        let deleted = if delete_missing {
            check_for_interrupts!();
            Spi::get_one::<i64>(&delete)
                .map_err(|e| {
                    crate::infra::error::TtError::Internal(format!("refresh_item_vectors: {e}"))
                })
                .or_report()
                .unwrap_or(0)
        } else {
            0
        };
        TableIterator::once((inserted, updated, deleted, done - inserted - updated))
    }

    /// The features expression of a source row `s` (named pairs, as the batched path reads).
    fn select_features(cols: &[String]) -> String {
        if cols.is_empty() {
            return "'{}'::jsonb".to_owned();
        }
        cols.chunks(50)
            .map(|c| {
                format!(
                    "pg_catalog.jsonb_build_object({})",
                    c.join(", ").replace("t.", "s.")
                )
            })
            .collect::<Vec<_>>()
            .join(" OPERATOR(pg_catalog.||) ")
    }

    /// Models up to this size (spec and weights) are shipped with a distributed refresh's
    /// statement; larger ones take the batched path through the coordinator.
    const MAX_SHIPPED_BYTES: usize = 64 << 20;

    /// The distributed refresh: one `INSERT … SELECT … ON CONFLICT` over the co-located tables,
    /// which Citus runs on every shard pair on its worker, `embed_item_shipped` computing each
    /// row's vector there. Returns (inserted, updated, rows read), or `None` (with a NOTICE)
    /// when the model is too large to ship.
    #[allow(clippy::too_many_arguments)]
    fn shipped_refresh(
        l: &crate::infra::catalog::Serving,
        src: &str,
        dst: &str,
        idc: &str,
        tid: &str,
        tvec: &str,
        features: &str,
    ) -> Option<(i64, i64, i64)> {
        let (spec, weights) = catalog::model_blobs(&l.loaded.name, l.loaded.version).or_report();
        if spec.len() + weights.len() > MAX_SHIPPED_BYTES {
            notice!(
                "refresh_item_vectors: model \"{}\" ({} bytes) is too large to ship to the workers; its rows are read through the coordinator",
                l.loaded.name,
                spec.len() + weights.len()
            );
            return None;
        }
        let err = |e: pgrx::spi::Error| TtError::Internal(format!("refresh_item_vectors: {e}"));
        let nulls = Spi::get_one::<i64>(&format!(
            "SELECT pg_catalog.count(*) FROM {src} AS s WHERE s.{idc} IS NULL"
        ))
        .map_err(err)
        .or_report()
        .unwrap_or(0);
        if nulls > 0 {
            TtError::NullValue(format!("a row of {src} has a NULL {idc}")).report();
        }
        let count = |rel: &str| -> i64 {
            Spi::get_one::<i64>(&format!("SELECT pg_catalog.count(*) FROM {rel}"))
                .map_err(err)
                .or_report()
                .unwrap_or(0)
        };
        let rows = count(src);
        let before = count(dst);
        // The model as literals: Citus writes each shard's statement with them, and every
        // worker decodes the model once per statement (cached by the checksum of what is
        // shipped).
        let checksum = (twotower_ann::checksum(&weights)
            ^ twotower_ann::checksum(spec.as_bytes()).rotate_left(1)) as i64;
        let hex = spi::hex(&weights);
        let sql = format!(
            "INSERT INTO {dst} AS t ({tid}, {tvec})
             SELECT s.{idc}::pg_catalog.int8,
                    twotower.embed_item_shipped({}::pg_catalog.int8, {}::pg_catalog.text, '\\x{hex}'::pg_catalog.bytea,
                                                s.{idc}::pg_catalog.int8, {features})
               FROM {src} AS s
             ON CONFLICT ({tid}) DO UPDATE SET {tvec} = EXCLUDED.{tvec}
              WHERE t.{tvec} IS DISTINCT FROM EXCLUDED.{tvec}",
            checksum,
            pgrx::spi::quote_literal(&spec),
        );
        drop(hex);
        check_for_interrupts!();
        let processed = Spi::connect_mut(|c| c.update(&sql, None, &[]).map(|t| t.len() as i64))
            .map_err(err)
            .or_report();
        let inserted = count(dst) - before;
        Some((inserted, processed - inserted, rows))
    }

    /// One item's vector by a model shipped with the statement (`refresh_item_vectors` over
    /// Citus tables calls it on the workers): `spec` and `weights` are the model's files,
    /// `checksum` theirs (xxh3 of the weights, xor the spec's rotated by one bit), `id` the
    /// item's (for messages). The model is decoded once per
    /// statement and backend (checked against its checksum). It reads no table: any role may
    /// call it; it only computes.
    #[pg_extern(immutable, parallel_safe, strict)]
    fn embed_item_shipped(
        checksum: i64,
        spec: &str,
        weights: &[u8],
        id: i64,
        features: JsonbValue,
    ) -> Vec<f32> {
        let model = shipped::model(checksum, spec, weights).or_report();
        let f = features.features(&model, "item features").or_report();
        let x = model
            .encode(&f, false)
            .map_err(|e| TtError::Item { id, error: e })
            .or_report();
        let out = model.forward(&x);
        if let Some(index) = out.iter().position(|v| !v.is_finite()) {
            TtError::Item {
                id,
                error: twotower_tower::TowerError::NonFiniteOutput { index },
            }
            .report();
        }
        out
    }

    mod shipped {
        use crate::infra::error::{TtError, TtResult};
        use std::cell::RefCell;
        use std::sync::Arc;
        use twotower_tower::{Kind, Model};

        /// The last shipped model of this backend: its checksum, where its files were when it
        /// was checked (a statement passes the same constants to every row), and the model.
        struct Shipped {
            checksum: i64,
            at: (usize, usize, usize, usize),
            model: Arc<Model>,
        }

        thread_local! {
            static LAST: RefCell<Option<Shipped>> = const { RefCell::new(None) };
        }

        pub(super) fn model(checksum: i64, spec: &str, weights: &[u8]) -> TtResult<Arc<Model>> {
            let at = (
                spec.as_ptr() as usize,
                spec.len(),
                weights.as_ptr() as usize,
                weights.len(),
            );
            if let Some(m) = LAST.with(|l| {
                l.borrow()
                    .as_ref()
                    .filter(|s| s.checksum == checksum && s.at == at)
                    .map(|s| s.model.clone())
            }) {
                return Ok(m);
            }
            // New constants: their checksum must be the one given (as import computes it).
            let c = (twotower_ann::checksum(weights)
                ^ twotower_ann::checksum(spec.as_bytes()).rotate_left(1))
                as i64;
            if c != checksum {
                return Err(TtError::BadArgument(
                    "embed_item_shipped: the model's files do not match its checksum".into(),
                ));
            }
            let cached = LAST.with(|l| {
                l.borrow()
                    .as_ref()
                    .filter(|s| s.checksum == checksum)
                    .map(|s| s.model.clone())
            });
            let model = match cached {
                Some(m) => m,
                None => {
                    let m = Model::load(spec, weights)?;
                    if m.kind() != Kind::Item {
                        return Err(TtError::BadArgument(format!(
                            "embed_item_shipped: the model is a {} model, not an item tower",
                            m.kind().name()
                        )));
                    }
                    Arc::new(m)
                }
            };
            LAST.with(|l| {
                *l.borrow_mut() = Some(Shipped {
                    checksum,
                    at,
                    model: model.clone(),
                })
            });
            Ok(model)
        }
    }
}
