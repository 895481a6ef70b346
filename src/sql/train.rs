//! SQL surface of training: `twotower.train(...)` reads the interactions and the feature sources
//! as the caller (their SELECT privileges apply), trains both towers in this backend with the
//! training core (`crates/train`), and stores them as new versions of two models, in the
//! caller's transaction: an error or a cancel leaves no version behind.

use pgrx::prelude::*;

#[pg_schema]
pub mod twotower {
    use crate::infra::catalog::{JsonbValue, RegClass};
    use crate::infra::error::{required, OrReport, TtError, TtResult};
    use crate::infra::spi::{self, column_type, is_table, read_rows, time_expr};
    use crate::sql::models::twotower::{check_can_store, import};
    use pgrx::pg_sys;
    use pgrx::prelude::*;
    use twotower_train::{Config, Data, Keys};

    /// Reads `(id, to_jsonb(row))` of a feature source into `set`.
    fn read_features(
        rel: pg_sys::Oid,
        key: &str,
        what: &'static str,
        mut set: impl FnMut(&str, serde_json::Map<String, serde_json::Value>) -> TtResult<()>,
    ) -> TtResult<()> {
        let src = spi::relation_name(rel)?;
        let k = spi::column(rel, key, what)?;
        let select =
            format!("SELECT t.{k}::pg_catalog.text, pg_catalog.to_jsonb(t.*) FROM {src} AS t");
        read_rows(&select, &src, None, |row| {
            let Some(id) = row.get::<String>(1)? else {
                TtError::NullValue(format!("a row of {src} ({what}) has a NULL \"{key}\""))
                    .report();
            };
            if let Some(f) = row.get::<JsonbValue>(2)? {
                if let serde_json::Value::Object(m) = f.value("feature row").or_report() {
                    set(&id, m).or_report();
                }
            }
            Ok(())
        })
    }

    /// Trains a two-tower model on `interactions` (one row per user–item interaction, with its
    /// time and an optional weight) and stores the towers as new versions of `user_model` and
    /// `item_model`. Feature sources are tables or views with one column per feature, keyed by
    /// the user / item id column. `options` (jsonb) chooses the architecture, the loss and the
    /// schedule; see docs/training.md. Returns one row per tower.
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::too_many_arguments)]
    fn train(
        user_model: Option<&str>,
        item_model: Option<&str>,
        interactions: Option<RegClass>,
        options: Option<JsonbValue>,
        user_features: default!(Option<RegClass>, "NULL"),
        item_features: default!(Option<RegClass>, "NULL"),
        hard_negatives: default!(Option<RegClass>, "NULL"),
        user_column: default!(Option<&str>, "'user_id'"),
        item_column: default!(Option<&str>, "'item_id'"),
        time_column: default!(Option<&str>, "'ts'"),
        weight_column: default!(Option<&str>, "NULL"),
        activate: default!(Option<bool>, true),
        label_column: default!(Option<&str>, "NULL"),
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
        let (user_model, item_model) = (
            required(user_model, "user_model"),
            required(item_model, "item_model"),
        );
        let activate = required(activate, "activate");
        let (interactions, options) = (
            required(interactions, "interactions"),
            required(options, "options"),
        );
        let (user_column, item_column, time_column) = (
            required(user_column, "user_column"),
            required(item_column, "item_column"),
            required(time_column, "time_column"),
        );
        let given = options.value("options").or_report();
        // Nothing is read or computed for a caller who could not store the result.
        check_can_store(user_model).or_report();
        check_can_store(item_model).or_report();
        // Incremental: continue from the active versions, with their options (the given ones
        // override the schedule; the architecture is the base's) and dense layers frozen.
        let incremental = match given.get("incremental") {
            None | Some(serde_json::Value::Bool(false)) => false,
            Some(serde_json::Value::Bool(true)) => true,
            Some(v) => TtError::Train(twotower_train::TrainError::Option {
                path: "incremental".into(),
                reason: format!("must be true or false, got {v}"),
            })
            .report(),
        };
        let base = incremental.then(|| {
            (
                active_version(user_model).or_report(),
                active_version(item_model).or_report(),
            )
        });
        // An incremental run reads the base version's feature sources unless it names others.
        let (user_features, item_features) = match &base {
            Some(((_, _, stored), _)) => (
                user_features.or_else(|| {
                    stored_relation(stored, "user_features")
                        .or_report()
                        .map(RegClass)
                }),
                item_features.or_else(|| {
                    stored_relation(stored, "item_features")
                        .or_report()
                        .map(RegClass)
                }),
            ),
            None => (user_features, item_features),
        };
        let opts = match &base {
            None => given.clone(),
            Some(((_, _, stored), _)) => {
                let mut o = stored
                    .get("options")
                    .cloned()
                    .unwrap_or_else(|| serde_json::json!({}));
                if let (Some(o), Some(g)) = (o.as_object_mut(), given.as_object()) {
                    for (k, v) in g {
                        if k == "user" || k == "item" || k == "dim" {
                            TtError::Train(twotower_train::TrainError::Option {
                                path: k.clone(),
                                reason: "an incremental run keeps the base version's architecture"
                                    .into(),
                            })
                            .report();
                        }
                        if k != "incremental" {
                            o.insert(k.clone(), v.clone());
                        }
                    }
                    o.entry("freeze_dense")
                        .or_insert(serde_json::Value::Bool(true));
                }
                o
            }
        };
        let cfg = Config::parse(&opts).map_err(TtError::Train).or_report();
        if user_model == item_model {
            TtError::BadArgument("user_model and item_model must be two different models".into())
                .report();
        }
        let rel = interactions.0;
        let src = spi::relation_name(rel).or_report();
        let uc = spi::column(rel, user_column, "user id").or_report();
        let ic = spi::column(rel, item_column, "item id").or_report();
        let ts = time_expr(rel, time_column).or_report();
        let w = match weight_column {
            Some(c) => format!(
                "t.{}::pg_catalog.float4",
                spi::column(rel, c, "weight").or_report()
            ),
            None => "1::pg_catalog.float4".into(),
        };
        // Equal timestamps keep the source's order (tables: physical order); the core sorts
        // each user's interactions by time, stably.
        let order = if is_table(rel) {
            " ORDER BY t.ctid"
        } else {
            ""
        };
        if label_column.is_none() && cfg.histories().iter().any(|h| h.negative) {
            TtError::Train(twotower_train::TrainError::Option {
                path: "user.features".into(),
                reason: "a history with \"feedback\": \"negative\" reads the negative feedback of a label_column: give one".into(),
            })
            .report();
        }
        // Feedback: every row is positive without a label column; with one, rows above 0 are
        // positive, below 0 negative feedback (the negative_feedback term), 0 neither.
        let label = match label_column {
            Some(c) => spi::label_expr(rel, c).or_report(),
            None => "1::pg_catalog.float8".into(),
        };
        let select = format!(
            "SELECT t.{uc}::pg_catalog.text, t.{ic}::pg_catalog.text, {ts}, {w}, {label} FROM {src} AS t{order}"
        );
        // Where the run is, for twotower.train_progress (removed when this function returns
        // or unwinds).
        let mut run = crate::infra::progress::Run::start(user_model, Some(item_model));
        let mut data = Data::default();
        let mut interactions_read = 0u64;
        let mut negative_read = 0u64;
        let mut progress = spi::Progress::new("train: reading interactions", "rows");
        read_rows(&select, &src, Some(&mut progress), |row| {
            let (Some(u), Some(i), Some(t), Some(wt), Some(lb)) = (
                row.get::<String>(1)?,
                row.get::<String>(2)?,
                row.get::<f64>(3)?,
                row.get::<f32>(4)?,
                row.get::<f64>(5)?,
            ) else {
                let what = if label_column.is_some() {
                    "time, weight or label"
                } else {
                    "time or weight"
                };
                TtError::NullValue(format!(
                    "a row of {src} has a NULL user id, item id, {what}"
                ))
                .report();
            };
            if lb.is_nan() {
                TtError::OutOfRange(format!("a row of {src} has a NaN label")).report();
            }
            if lb > 0.0 {
                data.interaction(&u, &i, t, wt)
            } else if lb < 0.0 {
                data.negative_feedback(&u, &i, t, wt)
            } else {
                Ok(())
            }
            .map_err(TtError::Train)
            .or_report();
            interactions_read += u64::from(lb > 0.0);
            negative_read += u64::from(lb < 0.0);
            Ok(())
        })
        .or_report();
        let (ukey, ikey) = (user_column.to_owned(), item_column.to_owned());
        if let Some(r) = user_features {
            read_features(r.0, user_column, "user features", |id, m| {
                data.user_features(id, m)
                    .map(|_| ())
                    .map_err(TtError::Train)
            })
            .or_report();
        }
        if let Some(r) = item_features {
            read_features(r.0, item_column, "item features", |id, m| {
                data.item_features(id, m)
                    .map(|_| ())
                    .map_err(TtError::Train)
            })
            .or_report();
        }
        if let Some(r) = hard_negatives {
            // (user, item) pairs: items the user should rank below their positives, e.g. the
            // ones the ranking stage rejected (never mere impressions: docs/training.md).
            let hsrc = spi::relation_name(r.0).or_report();
            let hu = spi::column(r.0, user_column, "hard negatives user id").or_report();
            let hi = spi::column(r.0, item_column, "hard negatives item id").or_report();
            let select =
                format!("SELECT t.{hu}::pg_catalog.text, t.{hi}::pg_catalog.text FROM {hsrc} AS t");
            read_rows(&select, &hsrc, None, |row| {
                if let (Some(u), Some(i)) = (row.get::<String>(1)?, row.get::<String>(2)?) {
                    data.hard_negative(&u, &i)
                        .map_err(TtError::Train)
                        .or_report();
                }
                Ok(())
            })
            .or_report();
        } else if opts.get("hard_ratio").is_some() || opts.get("hard_per_row").is_some() {
            TtError::Train(twotower_train::TrainError::Option {
                path: "hard_ratio".into(),
                reason: "\"hard_ratio\" and \"hard_per_row\" need the hard_negatives argument"
                    .into(),
            })
            .report();
        }
        // Every tower feature must have its column (the same rule as refresh_item_vectors): a
        // misspelt name would train the tower on nothing and give every user one vector.
        // (Checked once the sources are read, so their own errors come first; an empty log is
        // the core's error.)
        for (tower, source, key, side) in [
            (&cfg.user, &user_features, user_column, "user"),
            (&cfg.item, &item_features, item_column, "item"),
        ] {
            if interactions_read == 0 {
                break;
            }
            for f in &tower.features {
                use twotower_train::config::FeatureSpec;
                if matches!(f, FeatureSpec::History { .. } | FeatureSpec::Cross { .. })
                    || f.name() == key
                {
                    continue;
                }
                let found = source
                    .as_ref()
                    .is_some_and(|r| spi::column_exists(r.0, f.name()));
                if !found {
                    TtError::MissingFeatureColumn {
                        relation: match source {
                            Some(r) => spi::relation_name(r.0).or_report(),
                            None => format!("the {side}_features argument (not given)"),
                        },
                        feature: f.name().to_string(),
                        tower: side,
                        training: true,
                    }
                    .report();
                }
            }
        }
        // SAFETY: reading a GUC variable of this backend (an int in kB).
        let budget = unsafe { pg_sys::maintenance_work_mem } as usize * 1024;
        let keys = Keys {
            user: ukey,
            item: ikey,
        };
        let start = base
            .as_ref()
            .map(|((us, uw, _), (is, iw, _))| twotower_train::Base {
                user: (us.as_str(), uw.as_slice()),
                item: (is.as_str(), iw.as_slice()),
            });
        run.phase("preparing");
        let trained = twotower_train::train_from(&cfg, &data, &keys, budget, start, &mut |e| {
            // On the calling thread, between batches: a cancel or statement_timeout stops here.
            run.event("train", &e);
            Ok(())
        })
        .map_err(TtError::Train)
        .or_report();
        drop(data);
        run.phase("storing");
        if negative_read > 0 {
            if cfg.negative_feedback.weight > 0.0 {
                notice!("train: {negative_read} negative-feedback rows (label below 0) trained against with weight {}", cfg.negative_feedback.weight);
            } else {
                notice!("train: {negative_read} negative-feedback rows (label below 0) left out: negative_feedback.weight is 0");
            }
        }
        for (name, before, removed) in &trained.pruned {
            notice!("train: {name}: {removed} of {before} rows were all zero and are pruned (their ids read the zero OOV row)");
        }
        let spec =
            |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("the core wrote JSON");
        // What twotower.user_features needs to build this model's inputs at serving time.
        let name_of = |r: Option<RegClass>| r.map(|r| spi::relation_name(r.0).or_report());
        let sources = serde_json::json!({
            "interactions": src,
            "user_column": user_column,
            "item_column": item_column,
            "time_column": time_column,
            "label_column": label_column,
            "user_features": name_of(user_features),
            "item_features": name_of(item_features),
            "hard_negatives": name_of(hard_negatives),
            "histories": cfg.histories().iter().map(|h| h.to_json()).collect::<Vec<_>>(),
            "options": opts,
        });
        let uv = import(
            user_model,
            &spec(&trained.user_spec),
            &trained.user_weights,
            activate,
            Some(&sources),
        )
        .or_report();
        let iv = import(
            item_model,
            &spec(&trained.item_spec),
            &trained.item_weights,
            activate,
            Some(&sources),
        )
        .or_report();
        let best = trained
            .epochs
            .iter()
            .find(|e| e.epoch == trained.best_epoch)
            .and_then(|e| e.valid);
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

    /// The spec, weights and stored training options of the active version of trained model
    /// `model` (the base of an incremental run).
    fn active_version(model: &str) -> TtResult<(String, Vec<u8>, serde_json::Value)> {
        let sql = "FROM twotower.model m JOIN twotower.model_version v
                     ON v.model = m.name AND v.version = m.active_version WHERE m.name = $1";
        let (spec, weights) = crate::infra::catalog::as_catalog_owner(|| {
            crate::infra::catalog::read_row::<String, Vec<u8>>(
                &format!("SELECT v.spec::text, v.weights {sql}"),
                &[model.into()],
            )
        })?
        .map_err(|e| TtError::Catalog(format!("reading model \"{model}\": {e}")))?
        .and_then(|(s, w)| Some((s?, w?)))
        .ok_or_else(|| TtError::ModelNotFound {
            name: model.to_owned(),
            version: None,
        })?;
        let options = train_sources(model)?;
        Ok((spec, weights, options))
    }

    /// The stored sources of the active version of trained model `model`.
    fn train_sources(model: &str) -> TtResult<serde_json::Value> {
        let row = crate::infra::catalog::as_catalog_owner(|| {
            crate::infra::catalog::read_row::<String, bool>(
                "SELECT v.train_options::text, true FROM twotower.model m
                   JOIN twotower.model_version v ON v.model = m.name AND v.version = m.active_version
                  WHERE m.name = $1",
                &[model.into()],
            )
        })?
        .map_err(|e| TtError::Catalog(format!("reading model \"{model}\": {e}")))?;
        match row {
            None => Err(TtError::ModelNotFound { name: model.to_owned(), version: None }),
            Some((None, _)) => Err(TtError::BadArgument(format!(
                "model \"{model}\" was imported, not trained by twotower.train: its inputs are built by the application"
            ))),
            Some((Some(t), _)) => serde_json::from_str(&t)
                .map_err(|e| TtError::Catalog(format!("model \"{model}\": stored training options: {e}"))),
        }
    }

    fn stored_relation(sources: &serde_json::Value, key: &str) -> TtResult<Option<pg_sys::Oid>> {
        let Some(name) = sources.get(key).and_then(|v| v.as_str()) else {
            return Ok(None);
        };
        let oid = crate::infra::catalog::read_row::<pg_sys::Oid, bool>(
            "SELECT pg_catalog.to_regclass($1)::pg_catalog.oid, true",
            &[name.into()],
        )
        .ok()
        .flatten()
        .and_then(|(o, _)| o)
        .filter(|o| *o != pg_sys::InvalidOid);
        oid.map(Some).ok_or_else(|| {
            TtError::UndefinedTable(format!(
                "{name}, the model's {key} source, no longer exists"
            ))
        })
    }

    /// The input of trained user tower `model` for user `user_id` at time `at` (default: now),
    /// as `embed_user` and `recall` take it: the user's row of the feature source the model was
    /// trained with, plus its history features built from the interactions up to `at`, by the
    /// same function that built them in training. `interactions` replaces the stored
    /// interactions source (e.g. a live table with the same columns).
    #[pg_extern(stable, parallel_restricted)]
    fn user_features(
        model: Option<&str>,
        user_id: Option<&str>,
        at: default!(Option<pgrx::datum::TimestampWithTimeZone>, "NULL"),
        interactions: default!(Option<RegClass>, "NULL"),
    ) -> pgrx::JsonB {
        let (model, user_id) = (required(model, "model"), required(user_id, "user_id"));
        let served = crate::infra::catalog::active_model(model).or_report();
        crate::infra::catalog::expect_kind(&served, twotower_tower::Kind::User).or_report();
        let sources = train_sources(model).or_report();
        let text = |k: &str| {
            sources
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let (ucol, icol, tcol) = (
            text("user_column"),
            text("item_column"),
            text("time_column"),
        );
        let rel = match interactions {
            Some(r) => r.0,
            None => stored_relation(&sources, "interactions")
                .or_report()
                .unwrap_or_else(|| {
                    TtError::BadArgument(format!(
                        "model \"{model}\" has no stored interactions source: pass interactions => 'a_table'"
                    ))
                    .report()
                }),
        };
        let src = spi::relation_name(rel).or_report();
        let uc = spi::column(rel, &ucol, "user id").or_report();
        let ic = spi::column(rel, &icol, "item id").or_report();
        let ts = time_expr(rel, &tcol).or_report();
        let uty = column_type(rel, &ucol).or_report();
        let at_secs: f64 = match at {
            None => Spi::get_one::<f64>(
                "SELECT pg_catalog.date_part('epoch', pg_catalog.now())::pg_catalog.float8",
            )
            .ok()
            .flatten()
            .unwrap_or(f64::INFINITY),
            Some(t) => Spi::get_one_with_args::<f64>(
                "SELECT pg_catalog.date_part('epoch', $1)::pg_catalog.float8",
                &[t.into()],
            )
            .ok()
            .flatten()
            .unwrap_or(f64::INFINITY),
        };
        let histories: Vec<twotower_train::data::HistorySpec> = sources
            .get("histories")
            .and_then(|h| h.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(twotower_train::data::HistorySpec::from_json)
                    .collect()
            })
            .unwrap_or_default();
        // The newest `limit` rows of the user up to `at` that pass `filter`, oldest first.
        let order_desc = if is_table(rel) {
            format!("{ts} DESC, t.ctid DESC")
        } else {
            format!("{ts} DESC")
        };
        // (Negative feedback strictly before the moment, as in training; interactions up to it.)
        let read_past = |filter: &str, until: &str, limit: usize| -> Vec<(String, f64)> {
            let mut past: Vec<(String, f64)> = Vec::new();
            let sql = format!(
                "SELECT t.{ic}::pg_catalog.text, {ts} FROM {src} AS t
                  WHERE t.{uc} OPERATOR(pg_catalog.=) $1::{uty} AND {ts} OPERATOR(pg_catalog.{until}) $2{filter}
                  ORDER BY {order_desc} LIMIT {limit}"
            );
            Spi::connect(|c| -> Result<(), pgrx::spi::Error> {
                for row in c.select(&sql, None, &[user_id.into(), at_secs.into()])? {
                    if let (Some(i), Some(t)) = (row.get::<String>(1)?, row.get::<f64>(2)?) {
                        past.push((i, t));
                    }
                }
                Ok(())
            })
            .map_err(|e| TtError::BadArgument(format!("reading {src}: {e}")))
            .or_report();
            past.reverse();
            past
        };
        // A model trained with a label column: its histories hold positive feedback only, as
        // in training; its negative histories the rows below 0.
        let label = sources
            .get("label_column")
            .and_then(|v| v.as_str())
            .map(|c| spi::label_expr(rel, c).or_report());
        let longest = |negative: bool| {
            histories
                .iter()
                .filter(|h| h.negative == negative)
                .map(|h| h.max_len)
                .max()
        };
        let past = match (longest(false), &label) {
            (None, _) => Vec::new(),
            (Some(n), Some(l)) => read_past(
                &format!(" AND ({l}) OPERATOR(pg_catalog.>) 0 AND ({l}) OPERATOR(pg_catalog.<>) 'NaN'::pg_catalog.float8"),
                "<=",
                n,
            ),
            (Some(n), None) => read_past("", "<=", n),
        };
        let past_negative = match (longest(true), &label) {
            (Some(n), Some(l)) => {
                read_past(&format!(" AND ({l}) OPERATOR(pg_catalog.<) 0"), "<", n)
            }
            _ => Vec::new(),
        };
        let mut row = serde_json::Map::new();
        if let Some(frel) = stored_relation(&sources, "user_features").or_report() {
            let fsrc = spi::relation_name(frel).or_report();
            let fk = spi::column(frel, &ucol, "user id").or_report();
            let fty = column_type(frel, &ucol).or_report();
            let sql = format!(
                "SELECT pg_catalog.to_jsonb(t.*)::text, true FROM {fsrc} AS t WHERE t.{fk} OPERATOR(pg_catalog.=) $1::{fty} LIMIT 1"
            );
            // A user without a row in the source gets every feature's missing value.
            let found = crate::infra::catalog::read_row::<String, bool>(&sql, &[user_id.into()])
                .map_err(|e| TtError::BadArgument(format!("reading {fsrc}: {e}")))
                .or_report()
                .and_then(|(t, _)| t);
            // A value serde cannot hold (a number beyond double precision) is an error naming
            // the source, not a row silently treated as missing.
            if let Some(t) = found {
                match serde_json::from_str(&t) {
                    Ok(serde_json::Value::Object(m)) => row = m,
                    Ok(_) => {}
                    Err(e) => TtError::OutOfRange(format!(
                        "the row of user {user_id} in {fsrc} cannot be read: {e}"
                    ))
                    .report(),
                }
            }
        }
        // Only the model's features: the source row may hold other columns (embed_user and
        // recall refuse keys that are not features, unless the model ignores them).
        let names: std::collections::HashSet<&str> =
            served.model.feature_names().into_iter().collect();
        row.retain(|k, _| names.contains(k.as_str()));
        let key = names.contains(ucol.as_str()).then_some(ucol.as_str());
        let v = twotower_train::data::user_input(
            &row,
            key,
            user_id,
            &histories,
            past.iter().map(|(i, t)| (i.as_str(), *t)),
            past_negative.iter().map(|(i, t)| (i.as_str(), *t)),
            at_secs,
        );
        pgrx::JsonB(v)
    }

    /// `user_features` for an integer user id (the same id as its text: 42 is '42').
    #[pg_extern(stable, parallel_restricted, name = "user_features")]
    fn user_features_bigint(
        model: Option<&str>,
        user_id: Option<i64>,
        at: default!(Option<pgrx::datum::TimestampWithTimeZone>, "NULL"),
        interactions: default!(Option<RegClass>, "NULL"),
    ) -> pgrx::JsonB {
        let id = required(user_id, "user_id").to_string();
        user_features(model, Some(id.as_str()), at, interactions)
    }

    /// Ranking quality of user tower `user_model` over the items of `index` (a twotower_hnsw
    /// index on a table whose single-column integer primary key is the item id). `queries` has
    /// rows `(user_id, features jsonb, target bigint)`; each is ranked among all items but the
    /// user's rows in `seen` `(user_id, item_id)`: exactly (every item scored), and through the
    /// index (`recall`'s search with the seen items excluded, k = the largest of `k`), so the
    /// loss of the approximate search is visible. The rows of one user (with one features
    /// object) are one query with all their targets. Returns Recall, HR, NDCG and MRR at each k
    /// (MRR through the index counts targets within the largest k only); with
    /// `negative_queries` (the same columns, held-out negative-feedback items as targets) also
    /// NEG@k as `neg_recall` (their share in the top k, lower is better) and `neg_hr`; with
    /// `seen`, the popularity metrics `head_share`, `coverage`, `tail_recall` and `tail_hr`
    /// (the head: the 20 % most popular items by their count in `seen`).
    #[pg_extern(stable, parallel_restricted)]
    fn evaluate(
        user_model: Option<&str>,
        index: Option<RegClass>,
        queries: Option<RegClass>,
        seen: default!(Option<RegClass>, "NULL"),
        k: default!(Option<Vec<Option<i32>>>, "'{10,50}'"),
        via_index: default!(Option<bool>, true),
        negative_queries: default!(Option<RegClass>, "NULL"),
    ) -> TableIterator<
        'static,
        (
            name!(method, String),
            name!(metric, String),
            name!(k, i32),
            name!(value, f64),
            name!(queries, i64),
        ),
    > {
        use std::collections::HashMap;
        use twotower_train::eval::{ranks, top_k, Accumulator, ListStats};
        let (user_model, index, queries) = (
            required(user_model, "user_model"),
            required(index, "index"),
            required(queries, "queries"),
        );
        let (k, via_index) = (required(k, "k"), required(via_index, "via_index"));
        let k: Vec<i32> = k
            .into_iter()
            .map(|x| {
                x.unwrap_or_else(|| TtError::NullValue("k has a NULL element".into()).report())
            })
            .collect();
        if k.is_empty() || k.iter().any(|&x| !(1..=10_000).contains(&x)) {
            TtError::BadArgument("k must list values between 1 and 10000".into()).report();
        }
        let ks: Vec<usize> = k.iter().map(|&x| x as usize).collect();
        let kmax = ks.iter().copied().max().unwrap_or(1);
        let l = crate::infra::catalog::active_model(user_model).or_report();
        crate::infra::catalog::expect_kind(&l, twotower_tower::Kind::User).or_report();
        // The index's table, vector column and item id (its single-column integer key). The
        // index of a Citus table is a shell on the coordinator: its shards are searched through
        // Citus (as recall() does), each with its own index.
        let citus = crate::infra::citus::is_citus_index(index.0).or_report();
        let metric = if citus {
            crate::am::search::index_metric(index.0, "evaluate()").or_report()
        } else {
            let target = crate::am::search::Target::open(index.0, "evaluate()").or_report();
            let metric = target.metric();
            target.close();
            metric
        };
        let found = crate::infra::catalog::read_row::<String, String>(
            "SELECT pg_catalog.format('SELECT t.%I::pg_catalog.int8, t.%I::pg_catalog.float4[] FROM %s AS t',
                    (SELECT a.attname FROM pg_catalog.pg_index p JOIN pg_catalog.pg_attribute a
                        ON a.attrelid = p.indrelid AND a.attnum = p.indkey[0]
                      WHERE p.indrelid = i.indrelid AND p.indisprimary AND p.indnkeyatts = 1),
                    (SELECT a.attname FROM pg_catalog.pg_attribute a
                      WHERE a.attrelid = i.indrelid AND a.attnum = i.indkey[0]),
                    i.indrelid::pg_catalog.regclass), 'x'
               FROM pg_catalog.pg_index i WHERE i.indexrelid = $1",
            &[index.0.into()],
        )
        .ok()
        .flatten()
        .and_then(|(s, _)| s);
        // In id order: ties (in rankings and in popularity) go to the smaller id.
        let Some(items_sql) = found
            .filter(|s| s.contains("int8, t."))
            .map(|s| s + " ORDER BY 1")
        else {
            TtError::NoItemId("evaluate() needs the index's table to have a single-column integer primary key (the item id)".into()).report();
        };
        let dims = l.model.output_dim();
        let mut ids: Vec<i64> = Vec::new();
        let mut vecs: Vec<f32> = Vec::new();
        Spi::connect(|c| -> Result<(), pgrx::spi::Error> {
            for row in c.select(&items_sql, None, &[])? {
                check_for_interrupts!();
                // A NULL vector, or one with a NULL element (a row a partial index leaves
                // out), is no item of the index.
                let (Some(id), Some(v)) = (row.get::<i64>(1)?, row.get::<Vec<Option<f32>>>(2)?)
                else {
                    continue;
                };
                if v.len() == dims && v.iter().all(Option::is_some) {
                    ids.push(id);
                    vecs.extend(v.into_iter().flatten());
                }
            }
            Ok(())
        })
        .map_err(|e| TtError::BadArgument(format!("reading the index's table: {e}")))
        .or_report();
        let pos: HashMap<i64, u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i as u32))
            .collect();
        let mut seen_by: HashMap<String, Vec<i64>> = HashMap::new();
        if let Some(sr) = seen {
            let ssrc = spi::relation_name(sr.0).or_report();
            let sql = format!(
                "SELECT t.user_id::pg_catalog.text, t.item_id::pg_catalog.int8 FROM {ssrc} AS t"
            );
            Spi::connect(|c| -> Result<(), pgrx::spi::Error> {
                for row in c.select(&sql, None, &[])? {
                    if let (Some(u), Some(i)) = (row.get::<String>(1)?, row.get::<i64>(2)?) {
                        seen_by.entry(u).or_default().push(i);
                    }
                }
                Ok(())
            })
            .map_err(|e| {
                TtError::BadArgument(format!("reading {ssrc} (columns user_id, item_id): {e}"))
            })
            .or_report();
        }
        // Queries: the rows of one user (and one feature object) are one query with every
        // target they name (Recall@k is the share of them in the top k).
        let read_queries = |rel: RegClass| -> Vec<(String, String, Vec<i64>)> {
            let qsrc = spi::relation_name(rel.0).or_report();
            let qsql = format!(
                "SELECT t.user_id::pg_catalog.text, t.features::pg_catalog.text, t.target::pg_catalog.int8 FROM {qsrc} AS t"
            );
            let mut groups: Vec<(String, String, Vec<i64>)> = Vec::new();
            let mut at: HashMap<(String, String), usize> = HashMap::new();
            Spi::connect(|c| -> Result<(), pgrx::spi::Error> {
                for row in c.select(&qsql, None, &[])? {
                    check_for_interrupts!();
                    if let (Some(u), Some(f), Some(t)) = (
                        row.get::<String>(1)?,
                        row.get::<String>(2)?,
                        row.get::<i64>(3)?,
                    ) {
                        let g = *at.entry((u.clone(), f.clone())).or_insert_with(|| {
                            groups.push((u, f, Vec::new()));
                            groups.len() - 1
                        });
                        if !groups[g].2.contains(&t) {
                            groups[g].2.push(t);
                        }
                    }
                }
                Ok(())
            })
            .map_err(|e| {
                TtError::BadArgument(format!(
                    "reading {qsrc} (columns user_id, features, target): {e}"
                ))
            })
            .or_report();
            groups
        };
        let n = ids.len();
        let mut scores = vec![0f32; n];
        // Metrics of one set of queries, exactly and through the index.
        // Popularity: the head is the 20 % most popular items of the index's table by their
        // count in `seen` (the training interactions); without `seen` there is none.
        let head: Vec<bool> = if seen.is_some() {
            let mut counts = vec![0u64; ids.len()];
            for items in seen_by.values() {
                for i in items {
                    if let Some(&p) = pos.get(i) {
                        counts[p as usize] += 1;
                    }
                }
            }
            twotower_train::eval::head_items(&counts, 0.2)
        } else {
            Vec::new()
        };
        /// One method's metrics: the targets', the lists', the long-tail targets'.
        struct Side {
            targets: Accumulator,
            lists: ListStats,
            tail: Accumulator,
        }
        let side = || Side {
            targets: Accumulator::new(&ks),
            lists: ListStats::new(&ks),
            tail: Accumulator::new(&ks),
        };
        // Metrics of one set of queries, exactly and through the index.
        let mut measure = |groups: &[(String, String, Vec<i64>)]| -> (Side, Side) {
            let (mut exact, mut approx) = (side(), side());
            for (u, f, targets) in groups {
                check_for_interrupts!();
                let tpos: Vec<u32> = targets.iter().filter_map(|t| pos.get(t).copied()).collect();
                if tpos.is_empty() {
                    continue;
                }
                let features: serde_json::Value =
                    serde_json::from_str(f).unwrap_or(serde_json::Value::Null);
                let q = l.embed_user(&features).or_report();
                let seen_ids = seen_by.get(u).cloned().unwrap_or_default();
                let mut masked: Vec<u32> = seen_ids
                    .iter()
                    .filter_map(|i| pos.get(i).copied())
                    .collect();
                masked.sort_unstable();
                masked.dedup();
                for (i, s) in scores.iter_mut().enumerate() {
                    *s = -(metric.sql_distance(&q, &vecs[i * dims..(i + 1) * dims]) as f32);
                }
                exact.targets.add(&ranks(&scores, &tpos, &masked));
                // The targets the rankings count (the unmasked ones): a query without one
                // counts for no metric, in both methods.
                let live: Vec<u32> = tpos
                    .iter()
                    .copied()
                    .filter(|p| masked.binary_search(p).is_err())
                    .collect();
                let is_tail = |p: &u32| !head.is_empty() && !head[*p as usize];
                let tail: Vec<u32> = tpos.iter().copied().filter(is_tail).collect();
                if !head.is_empty() && !live.is_empty() {
                    exact.lists.add(&top_k(&scores, &masked, kmax), &head);
                    exact.tail.add(&ranks(&scores, &tail, &masked));
                }
                if via_index && !live.is_empty() {
                    let exclude: std::collections::HashSet<i64> = seen_ids.into_iter().collect();
                    let rows: Vec<(i64, f64)> = if citus {
                        crate::serve::search::search(index.0, &q, metric, kmax, &exclude, 0, false)
                            .or_report()
                            .into_iter()
                            .map(|(id, s, _)| (id, f64::from(s)))
                            .collect()
                    } else {
                        let target =
                            crate::am::search::Target::open(index.0, "evaluate()").or_report();
                        let rows = target.nearest(&q, kmax, &exclude, 0).or_report();
                        target.close();
                        rows
                    };
                    let list: Vec<u32> = rows
                        .iter()
                        .filter_map(|(id, _)| pos.get(id).copied())
                        .collect();
                    let found = |want: &[u32]| -> Vec<usize> {
                        list.iter()
                            .enumerate()
                            .filter(|(_, p)| want.contains(p))
                            .map(|(r, _)| r + 1)
                            .collect()
                    };
                    // Beyond the largest k the index gives no rank: counted as a miss.
                    approx.targets.add_within(&found(&live), live.len(), kmax);
                    if !head.is_empty() {
                        approx.lists.add(&list, &head);
                        let live_tail: Vec<u32> = live.iter().copied().filter(is_tail).collect();
                        approx
                            .tail
                            .add_within(&found(&live_tail), live_tail.len(), kmax);
                    }
                }
            }
            (exact, approx)
        };
        let (exact, approx) = measure(&read_queries(queries));
        let negative = negative_queries.map(|r| measure(&read_queries(r)));
        let mut out = Vec::new();
        for (method, acc, neg) in [
            ("exact", &exact, negative.as_ref().map(|n| &n.0)),
            ("index", &approx, negative.as_ref().map(|n| &n.1)),
        ] {
            if method == "index" && !via_index {
                continue;
            }
            let mut push = |name: &str, k: usize, v: f64, n: usize| {
                out.push((method.to_owned(), name.to_owned(), k as i32, v, n as i64));
            };
            for m in acc.targets.metrics() {
                for (name, v) in [
                    ("recall", m.recall),
                    ("hr", m.hr),
                    ("ndcg", m.ndcg),
                    ("mrr", m.mrr),
                ] {
                    push(name, m.k, v, m.users);
                }
            }
            // NEG@k: the share of the held-out negative-feedback items in the top k (lower is
            // better), and the users with one of them there.
            if let Some(neg) = neg {
                for m in neg.targets.metrics() {
                    push("neg_recall", m.k, m.recall, m.users);
                    push("neg_hr", m.k, m.hr, m.users);
                }
            }
            // Popularity (with `seen`): the head's share of the lists' slots, the catalogue's
            // share in some list, and recall/HR of the queries' long-tail targets.
            if !head.is_empty() {
                for m in acc.lists.metrics(ids.len()) {
                    push("head_share", m.k, m.head_share, m.lists);
                    push("coverage", m.k, m.coverage, m.lists);
                }
                for m in acc.tail.metrics() {
                    push("tail_recall", m.k, m.recall, m.users);
                    push("tail_hr", m.k, m.hr, m.users);
                }
            }
        }
        TableIterator::new(out)
    }
}
