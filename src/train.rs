//! SQL surface of training: `twotower.train(...)` reads the interactions and the feature sources
//! as the caller (their SELECT privileges apply), trains both towers in this backend with the
//! training core (`crates/train`), and stores them as new versions of two models, in the
//! caller's transaction: an error or a cancel leaves no version behind.

use pgrx::prelude::*;

#[pg_schema]
pub mod twotower {
    use crate::catalog::{JsonbValue, RegClass};
    use crate::error::{OrReport, TtError, TtResult};
    use crate::models::twotower::{check_can_store, import};
    use crate::spi;
    use pgrx::pg_sys;
    use pgrx::prelude::*;
    use twotower_train::{Config, Data, Event, Keys};

    /// Rows read per SPI batch.
    const BATCH: usize = 10_000;

    /// The expression giving column `col` of `rel` as seconds (timestamps) or as it is
    /// (numbers), as double precision.
    fn time_expr(rel: pg_sys::Oid, col: &str) -> TtResult<String> {
        let q = spi::column(rel, col, "time")?;
        let ty = crate::catalog::read_row::<String, bool>(
            "SELECT pg_catalog.format_type(atttypid, NULL), true FROM pg_catalog.pg_attribute
              WHERE attrelid = $1 AND attname = $2",
            &[rel.into(), col.into()],
        )
        .ok()
        .flatten()
        .and_then(|(t, _)| t)
        .unwrap_or_default();
        Ok(match ty.as_str() {
            "timestamp with time zone" | "timestamp without time zone" | "date" => {
                format!("pg_catalog.date_part('epoch', t.{q})::pg_catalog.float8")
            }
            "smallint" | "integer" | "bigint" | "real" | "double precision" | "numeric" => {
                format!("t.{q}::pg_catalog.float8")
            }
            other => {
                return Err(TtError::BadArgument(format!(
                    "time column \"{col}\" is of type {other}; it must be a timestamp, a date or a number"
                )))
            }
        })
    }

    /// Reads `(id, to_jsonb(row))` of a feature source into `set`.
    fn read_features(
        rel: pg_sys::Oid,
        key: &str,
        what: &'static str,
        mut set: impl FnMut(&str, serde_json::Map<String, serde_json::Value>) -> TtResult<()>,
    ) -> TtResult<()> {
        let src = spi::relation_name(rel)?;
        let k = spi::column(rel, key, what)?;
        let select = format!("SELECT t.{k}::pg_catalog.text, pg_catalog.to_jsonb(t) FROM {src} AS t");
        let batches = spi::Batches::open(&select).map_err(|e| TtError::BadArgument(format!("reading {src}: {e}")))?;
        loop {
            let n = batches
                .next(BATCH, |_, rows| {
                    let mut n = 0usize;
                    for row in rows {
                        n += 1;
                        let Some(id) = row.get::<String>(1)? else {
                            TtError::NullValue(format!("a row of {src} ({what}) has a NULL \"{key}\"")).report();
                        };
                        let Some(f) = row.get::<JsonbValue>(2)? else { continue };
                        match f.value("feature row").or_report() {
                            serde_json::Value::Object(m) => set(&id, m).or_report(),
                            _ => continue,
                        }
                    }
                    Ok(n)
                })
                .map_err(|e| TtError::BadArgument(format!("reading {src}: {e}")))?;
            if n == 0 {
                return Ok(());
            }
        }
    }

    /// Trains a two-tower model on `interactions` (one row per user–item interaction, with its
    /// time and an optional weight) and stores the towers as new versions of `user_model` and
    /// `item_model`. Feature sources are tables or views with one column per feature, keyed by
    /// the user / item id column. `options` (jsonb) chooses the architecture, the loss and the
    /// schedule; see docs/training.md. Returns one row per tower.
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::too_many_arguments)]
    fn train(
        user_model: &str,
        item_model: &str,
        interactions: RegClass,
        options: JsonbValue,
        user_features: default!(Option<RegClass>, "NULL"),
        item_features: default!(Option<RegClass>, "NULL"),
        user_column: default!(&str, "'user_id'"),
        item_column: default!(&str, "'item_id'"),
        time_column: default!(&str, "'ts'"),
        weight_column: default!(Option<&str>, "NULL"),
        activate: default!(bool, true),
    ) -> TableIterator<
        'static,
        (
            name!(model, String),
            name!(version, i32),
            name!(kind, String),
            name!(parameters, i64),
            name!(best_epoch, i32),
            name!(valid_recall, Option<f64>),
            name!(valid_ndcg, Option<f64>),
            name!(train_examples, i64),
        ),
    > {
        let opts = options.value("options").or_report();
        let cfg = Config::parse(&opts).map_err(TtError::Train).or_report();
        // Nothing is read or computed for a caller who could not store the result.
        check_can_store(user_model).or_report();
        check_can_store(item_model).or_report();
        if user_model == item_model {
            TtError::BadArgument("user_model and item_model must be two different models".into()).report();
        }
        let rel = interactions.0;
        let src = spi::relation_name(rel).or_report();
        let uc = spi::column(rel, user_column, "user id").or_report();
        let ic = spi::column(rel, item_column, "item id").or_report();
        let ts = time_expr(rel, time_column).or_report();
        let w = match weight_column {
            Some(c) => format!("t.{}::pg_catalog.float4", spi::column(rel, c, "weight").or_report()),
            None => "1::pg_catalog.float4".into(),
        };
        // Equal timestamps keep the source's order (tables: physical order).
        let is_table = crate::catalog::read_row::<bool, bool>(
            "SELECT relkind IN ('r', 'm'), true FROM pg_catalog.pg_class WHERE oid = $1",
            &[rel.into()],
        )
        .ok()
        .flatten()
        .and_then(|(t, _)| t)
        .unwrap_or(false);
        let order = if is_table { " ORDER BY t.ctid" } else { "" };
        let select = format!(
            "SELECT t.{uc}::pg_catalog.text, t.{ic}::pg_catalog.text, {ts}, {w} FROM {src} AS t{order}"
        );
        let mut data = Data::default();
        let mut progress = spi::Progress::new("train: reading interactions", "rows");
        let batches = spi::Batches::open(&select)
            .map_err(|e| TtError::BadArgument(format!("reading {src}: {e}")))
            .or_report();
        loop {
            let n = batches
                .next(BATCH, |_, rows| {
                    let mut n = 0usize;
                    for row in rows {
                        n += 1;
                        let (Some(u), Some(i), Some(t), Some(wt)) =
                            (row.get::<String>(1)?, row.get::<String>(2)?, row.get::<f64>(3)?, row.get::<f32>(4)?)
                        else {
                            TtError::NullValue(format!(
                                "a row of {src} has a NULL user id, item id, time or weight"
                            ))
                            .report();
                        };
                        data.interaction(&u, &i, t, wt).map_err(TtError::Train).or_report();
                    }
                    Ok(n)
                })
                .map_err(|e| TtError::BadArgument(format!("reading {src}: {e}")))
                .or_report();
            if n == 0 {
                break;
            }
            progress.add(n);
        }
        let (ukey, ikey) = (user_column.to_owned(), item_column.to_owned());
        if let Some(r) = user_features {
            read_features(r.0, user_column, "user features", |id, m| {
                data.user_features(id, m).map(|_| ()).map_err(TtError::Train)
            })
            .or_report();
        }
        if let Some(r) = item_features {
            read_features(r.0, item_column, "item features", |id, m| {
                data.item_features(id, m).map(|_| ()).map_err(TtError::Train)
            })
            .or_report();
        }
        // SAFETY: reading a GUC variable of this backend (an int in kB).
        let budget = unsafe { pg_sys::maintenance_work_mem } as usize * 1024;
        let keys = Keys { user: ukey, item: ikey };
        let mut last_notice = std::time::Instant::now();
        let trained = twotower_train::train(&cfg, &data, &keys, budget, &mut |e| {
            // On the calling thread, between batches: a cancel or statement_timeout stops here.
            check_for_interrupts!();
            match e {
                Event::Epoch(p) => {
                    let valid = p.valid.map_or(String::new(), |m| {
                        format!(", validation Recall@{} {:.4}, NDCG@{} {:.4}", m.k, m.recall, m.k, m.ndcg)
                    });
                    notice!(
                        "train: epoch {}/{}: loss {:.5}, {:.0} examples/s{valid}",
                        p.epoch, p.epochs, p.loss, p.examples_per_s
                    );
                    last_notice = std::time::Instant::now();
                }
                Event::Step(p) if last_notice.elapsed().as_secs() >= 10 => {
                    notice!(
                        "train: epoch {}/{}: step {}/{}, loss {:.5}, {:.0} examples/s",
                        p.epoch, p.epochs, p.step, p.steps, p.loss, p.examples_per_s
                    );
                    last_notice = std::time::Instant::now();
                }
                _ => {}
            }
            Ok(())
        })
        .map_err(TtError::Train)
        .or_report();
        drop(data);
        let spec = |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("the core wrote JSON");
        let uv = import(user_model, &spec(&trained.user_spec), &trained.user_weights, activate).or_report();
        let iv = import(item_model, &spec(&trained.item_spec), &trained.item_weights, activate).or_report();
        let best = trained.epochs.iter().find(|e| e.epoch == trained.best_epoch).and_then(|e| e.valid);
        let row = |model: &str, v: i32, kind: &str, parameters: usize| {
            (
                model.to_owned(),
                v,
                kind.to_owned(),
                parameters as i64,
                trained.best_epoch as i32,
                best.map(|m| m.recall),
                best.map(|m| m.ndcg),
                trained.train_examples as i64,
            )
        };
        TableIterator::new(vec![
            row(user_model, uv, "user", trained.user_parameters),
            row(item_model, iv, "item", trained.item_parameters),
        ])
    }
}
