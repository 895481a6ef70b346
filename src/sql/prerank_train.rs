//! SQL surface of pre-rank training: `twotower.train_prerank(...)` reads logged requests and
//! their candidates as the caller, computes each request's user vector, history vectors and
//! the candidates' item vectors and features exactly as pipeline `pipeline` does when it
//! serves, trains a `prerank` model with the training core (`crates/train`), and stores it as
//! a new version of a model, in the caller's transaction.

use pgrx::prelude::*;

#[pg_schema]
pub mod twotower {
    use crate::infra::catalog::{JsonbValue, RegClass};
    use crate::infra::error::{required, OrReport, TtError};
    use crate::infra::spi::{self, read_rows};
    use crate::serve::pipelines::{load, user_model};
    use crate::serve::sources::{item_rows, SpiSources};
    use crate::sql::models::twotower::{check_can_store, import};
    use pgrx::pg_sys;
    use pgrx::prelude::*;
    use serde_json::Value;
    use std::collections::HashMap;
    use twotower_funnel::request::{check_keys, history_ids};
    use twotower_funnel::Sources;
    use twotower_train::prerank::{LogCandidate, LogRequest};
    use twotower_train::{PrerankConfig, RankLog, TrainError};

    /// Trains a pre-rank model `name` (a new version of it) for pipeline `pipeline` from a log: `requests` has one row per
    /// request (its id and the features object `recommend` received), `candidates` one row per
    /// candidate shown to the ranking stage (request id, item id, label in [0, 1], and the
    /// ranking model's score when `teacher_column` is given, its position in the recall list
    /// when `rank_column` is given: the `recall_rank` input). The last requests in request id
    /// order validate. `options` (jsonb) chooses the network, the objective (`labels`,
    /// `distill`, `cascade`) and the schedule; see docs/funnel.md.
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn train_prerank(
        name: Option<&str>,
        pipeline: Option<&str>,
        requests: Option<RegClass>,
        candidates: Option<RegClass>,
        options: Option<JsonbValue>,
        request_column: default!(Option<&str>, "'request_id'"),
        features_column: default!(Option<&str>, "'features'"),
        item_column: default!(Option<&str>, "'item_id'"),
        label_column: default!(Option<&str>, "'label'"),
        teacher_column: default!(Option<&str>, "NULL"),
        rank_column: default!(Option<&str>, "NULL"),
        activate: default!(Option<bool>, true),
    ) -> TableIterator<
        'static,
        (
            name!(model, String),
            name!(version, i32),
            name!(parameters, i64),
            name!(best_epoch, i32),
            name!(valid_recall, Option<f64>),
            name!(valid_ndcg, Option<f64>),
            name!(teacher_agreement, Option<f64>),
            name!(train_examples, i64),
            name!(valid_requests, i32),
        ),
    > {
        let (model, pipeline) = (required(name, "name"), required(pipeline, "pipeline"));
        let (requests, candidates) = (
            required(requests, "requests"),
            required(candidates, "candidates"),
        );
        let options = required(options, "options").value("options").or_report();
        let (request_column, features_column) = (
            required(request_column, "request_column"),
            required(features_column, "features_column"),
        );
        let (item_column, label_column) = (
            required(item_column, "item_column"),
            required(label_column, "label_column"),
        );
        let activate = required(activate, "activate");
        // Nothing is read or computed for a caller who could not store the result.
        check_can_store(model).or_report();
        let cfg = PrerankConfig::parse(&options)
            .map_err(TtError::Train)
            .or_report();
        if cfg.needs_teacher() && teacher_column.is_none() {
            TtError::Train(TrainError::Option {
                path: "objective".into(),
                reason: "\"distill\" and \"cascade\" learn from the teacher's scores: give teacher_column".into(),
            })
            .report();
        }
        let uses_rank = cfg.model.sources.contains(&twotower_tower::Source::Cross(
            twotower_tower::Cross::RecallRank,
        ));
        if uses_rank && rank_column.is_none() {
            TtError::Train(TrainError::Option {
                path: "model.features".into(),
                reason: "the recall_rank input is the candidate's logged position in the recall list: give rank_column".into(),
            })
            .report();
        }
        let d = load(pipeline).or_report();
        let user = user_model(&d).or_report();
        let metric = user.model.metric();
        // SAFETY: reading a GUC variable of this backend (an int in kB).
        let budget = unsafe { pg_sys::maintenance_work_mem } as usize * 1024;
        let mut run = crate::infra::progress::Run::start(model, None);
        let mut log = RankLog::new(metric);

        // The requests, in request id order: user vector and history per request.
        let rsrc = spi::relation_name(requests.0).or_report();
        let rc = spi::column(requests.0, request_column, "request id").or_report();
        let fc = spi::column(requests.0, features_column, "request features").or_report();
        let select = format!("SELECT t.{rc}::pg_catalog.text, t.{fc}::pg_catalog.jsonb FROM {rsrc} AS t ORDER BY t.{rc}");
        let user_side: Vec<String> = cfg
            .model
            .features
            .iter()
            .zip(&cfg.model.sources)
            .filter(|(_, s)| **s == twotower_tower::Source::User)
            .map(|(f, _)| f.name().to_owned())
            .collect();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut histories: Vec<Vec<i64>> = Vec::new();
        let mut progress = spi::Progress::new("train_prerank: reading requests", "rows");
        let dims = user.model.output_dim();
        let mut bytes = 0usize;
        read_rows(&select, &rsrc, Some(&mut progress), |row| {
            let (Some(id), Some(f)) = (row.get::<String>(1)?, row.get::<JsonbValue>(2)?) else {
                TtError::NullValue(format!("a row of {rsrc} has a NULL request id or features"))
                    .report();
            };
            let f = f.features(&user.model, "features").or_report();
            check_keys(
                &d,
                &user.model,
                user.strict,
                user_side.iter().map(String::as_str),
                &f,
            )
            .map_err(TtError::from)
            .map_err(|e| {
                TtError::BadArgument(format!("request {id} of {rsrc}: {}", e.message_text()))
            })
            .or_report();
            if index.insert(id.clone(), log.requests.len()).is_some() {
                TtError::BadArgument(format!("request {id} appears twice in {rsrc}")).report();
            }
            let u = user.model.embed_with(&f, false).or_report();
            let h = match &d.history {
                Some(key) => history_ids(&f, key).map_err(TtError::from).or_report(),
                None => Vec::new(),
            };
            bytes += 256 + dims * 4 * (1 + h.len()) + f.to_string().len() * 2;
            if bytes > budget {
                TtError::Train(TrainError::MemoryBudget {
                    needed: bytes,
                    budget,
                })
                .report();
            }
            histories.push(h);
            log.requests.push(LogRequest {
                id,
                features: f,
                user: u,
                history: Vec::new(),
                candidates: Vec::new(),
                labels: Vec::new(),
            });
            Ok(())
        })
        .or_report();

        // The candidates.
        let csrc = spi::relation_name(candidates.0).or_report();
        let crc = spi::column(candidates.0, request_column, "request id").or_report();
        let cic = spi::column(candidates.0, item_column, "item id").or_report();
        // A multi-task run reads each task's column (NULL: no label for that task), not the
        // label column.
        let clc = if cfg.tasks.is_empty() {
            format!(
                "t.{}::pg_catalog.float4",
                spi::column(candidates.0, label_column, "label").or_report()
            )
        } else {
            "0::pg_catalog.float4".to_owned()
        };
        let task_cols: String = cfg
            .tasks
            .iter()
            .map(|t| {
                format!(
                    ", t.{}::pg_catalog.float4",
                    spi::column(candidates.0, &t.column, &format!("task {} label", t.name))
                        .or_report()
                )
            })
            .collect();
        let teacher = match teacher_column {
            Some(c) => format!(
                "t.{}::pg_catalog.float4",
                spi::column(candidates.0, c, "teacher score").or_report()
            ),
            None => "NULL::pg_catalog.float4".into(),
        };
        let rank = match rank_column {
            Some(c) => format!(
                "t.{}::pg_catalog.int4",
                spi::column(candidates.0, c, "rank").or_report()
            ),
            None => "0".into(),
        };
        let select = format!(
            "SELECT t.{crc}::pg_catalog.text, t.{cic}::pg_catalog.int8, {clc}, {teacher}, {rank}{task_cols} FROM {csrc} AS t"
        );
        let mut raw: Vec<(usize, i64, f32, Option<f32>, u32, Vec<f32>)> = Vec::new();
        let mut progress = spi::Progress::new("train_prerank: reading candidates", "rows");
        read_rows(&select, &csrc, Some(&mut progress), |row| {
            let (Some(r), Some(item), Some(label)) = (
                row.get::<String>(1)?,
                row.get::<i64>(2)?,
                row.get::<f32>(3)?,
            ) else {
                TtError::NullValue(format!(
                    "a row of {csrc} has a NULL request id, item id or label"
                ))
                .report();
            };
            let t = row.get::<f32>(4)?;
            let position = match row.get::<i32>(5)? {
                Some(p) if p >= 1 => p as u32,
                Some(_) | None if rank_column.is_none() => 0,
                p => TtError::BadArgument(format!(
                    "{csrc}: request {r}, item {item} has rank {}: ranks are positions from 1",
                    p.map_or("NULL".to_owned(), |p| p.to_string())
                ))
                .report(),
            };
            let Some(&ri) = index.get(&r) else {
                TtError::BadArgument(format!(
                    "{csrc} has a candidate of request {r}, which {rsrc} does not have"
                ))
                .report();
            };
            bytes += 72;
            if bytes > budget {
                TtError::Train(TrainError::MemoryBudget {
                    needed: bytes,
                    budget,
                })
                .report();
            }
            // NULL: no label for that task (NaN inside); a stored NaN is an error, not a gap.
            let mut labels = Vec::with_capacity(cfg.tasks.len());
            for (i, task) in cfg.tasks.iter().enumerate() {
                match row.get::<f32>(6 + i)? {
                    None => labels.push(f32::NAN),
                    Some(y) if y.is_nan() => TtError::OutOfRange(format!(
                        "{csrc}: request {r}, item {item} has a NaN label for task \"{}\" (NULL means no label)",
                        task.name
                    ))
                    .report(),
                    Some(y) => labels.push(y),
                }
            }
            bytes += 32 + labels.len() * 4;
            raw.push((ri, item, label, t, position, labels));
            Ok(())
        })
        .or_report();
        drop(index);
        // (request, item) pairs are distinct.
        raw.sort_by_key(|x| (x.0, x.1));
        if let Some(w) = raw
            .windows(2)
            .find(|w| w[0].0 == w[1].0 && w[0].1 == w[1].1)
        {
            TtError::BadArgument(format!(
                "item {} is a candidate of the same request twice in {csrc}",
                w[0].1
            ))
            .report();
        }

        // Item vectors (candidates and histories) and item features, in batches.
        run.phase("reading items");
        let mut ids: Vec<i64> = raw
            .iter()
            .map(|x| x.1)
            .chain(histories.iter().flatten().copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let item_cols: Vec<String> = cfg
            .model
            .features
            .iter()
            .zip(&cfg.model.sources)
            .filter(|(_, s)| **s == twotower_tower::Source::Item)
            .map(|(f, _)| f.name().to_owned())
            .collect();
        let feature_rel = match (&d.item_features, item_cols.is_empty()) {
            (Some(f), false) => Some((
                spi::regclass(&f.table)
                    .ok_or_else(|| TtError::BadPipeline {
                        path: "item_features.table".into(),
                        reason: format!("relation \"{}\" does not exist", f.table),
                    })
                    .or_report(),
                f.id_column.clone(),
            )),
            (None, false) => TtError::Train(TrainError::Option {
                path: "model.features".into(),
                reason: format!(
                    "pipeline \"{pipeline}\" has no item_features table for the item-side features"
                ),
            })
            .report(),
            _ => None,
        };
        let cols: Vec<&str> = item_cols.iter().map(String::as_str).collect();
        let mut vecs: HashMap<i64, Vec<f32>> = HashMap::with_capacity(ids.len());
        let mut feats: HashMap<i64, Value> = HashMap::new();
        // The vectors as a recommend call reads them.
        let mut src = SpiSources {
            d: &d,
            metric,
            keys: Vec::new(),
        };
        for chunk in ids.chunks(10_000) {
            check_for_interrupts!();
            for (i, v) in src.vectors(chunk).or_report() {
                vecs.insert(i, v.to_vec());
            }
            if let Some((rel, idc)) = &feature_rel {
                feats.extend(item_rows(*rel, idc, &cols, chunk).or_report());
            }
            bytes += chunk.len() * (dims * 4 + 64 + cols.len() * 32);
            if bytes > budget {
                TtError::Train(TrainError::MemoryBudget {
                    needed: bytes,
                    budget,
                })
                .report();
            }
        }
        for (r, h) in log.requests.iter_mut().zip(&histories) {
            r.history = h.iter().filter_map(|i| vecs.get(i).cloned()).collect();
        }
        drop(histories);
        // A candidate without a vector cannot reach a pre-rank stage: it is left out.
        let mut missing = 0usize;
        for (ri, item, label, t, position, labels) in raw {
            let Some(v) = vecs.get(&item) else {
                missing += 1;
                continue;
            };
            let empty = Value::Object(Default::default());
            let idx = log.item(item, || {
                (feats.get(&item).cloned().unwrap_or(empty), v.clone())
            });
            log.requests[ri].candidates.push(LogCandidate {
                item: idx,
                position,
                label,
                teacher: t,
            });
            log.requests[ri].labels.extend(labels);
        }
        drop(vecs);
        drop(feats);
        if missing > 0 {
            notice!(
                "train_prerank: {missing} candidates have no item vector in {} and are left out",
                d.vectors.table
            );
        }

        run.phase("training");
        let trained =
            twotower_train::train_prerank(&cfg, &log, budget.saturating_sub(bytes), &mut |e| {
                // On the calling thread, between batches: a cancel or statement_timeout stops here.
                run.event("train_prerank", &e);
                Ok(())
            })
            .map_err(TtError::Train)
            .or_report();
        drop(log);
        run.phase("storing");
        let sources = serde_json::json!({
            "pipeline": pipeline,
            "requests": rsrc,
            "candidates": csrc,
            "request_column": request_column,
            "features_column": features_column,
            "item_column": item_column,
            "label_column": label_column,
            "teacher_column": teacher_column,
            "rank_column": rank_column,
            "options": options,
        });
        let spec: Value = serde_json::from_str(&trained.spec).expect("the core wrote JSON");
        let version = import(model, &spec, &trained.weights, activate, Some(&sources)).or_report();
        let best = trained
            .epochs
            .iter()
            .find(|e| e.epoch == trained.best_epoch);
        let valid = best.and_then(|e| e.valid);
        TableIterator::new(vec![(
            model.to_owned(),
            version,
            trained.parameters as i64,
            trained.best_epoch as i32,
            valid.map(|m| m.recall),
            valid.map(|m| m.ndcg),
            best.and_then(|e| e.teacher_agreement),
            trained.train_examples as i64,
            trained.valid_requests as i32,
        )])
    }
}
