//! SQL surface of the funnel in one call: pipelines saved in `twotower.pipeline`
//! (`save_pipeline`, `drop_pipeline`), `recommend` (channels → merge → cascade pre-rank → top k,
//! with provenance), `recommend_explain` (the same run, reported per step), and `prerank` (the
//! pipeline's stages over the caller's own candidates). The funnel core parses definitions and
//! runs the request (`twotower_funnel::run`); `serve::pipelines` checks what a definition names
//! against the database and `serve::sources` reads what the run asks for.

use pgrx::prelude::*;
#[pg_schema]
pub mod twotower {
    use crate::infra::catalog::{
        self, as_catalog_owner, caller, is_admin, owner_of, role_name, JsonbValue, Owned, Serving,
        ADMIN_ROLE,
    };
    use crate::infra::error::{required, OrReport, TtError, TtResult};
    use crate::serve::pipelines::{
        bad_def, check, check_split, load_stored, splits_using, stage_model, user_model, Stored,
    };
    use crate::serve::sources::SpiSources;
    use pgrx::prelude::*;
    use twotower_funnel::channel::ChannelKind;
    use twotower_funnel::pipeline::{Definition, StageKind};
    use twotower_funnel::request::{self, Models, Outcome, Request, Step};
    use twotower_funnel::split::Split;

    /// Saves (creates or replaces) pipeline `name` after checking its definition completely:
    /// its shape, and that every model, table, column, index, channel and function it names
    /// exists and fits. Creating a pipeline needs twotower_admin; replacing one, its owner or
    /// twotower_admin. Transactional like any row change.
    #[pg_extern(volatile, parallel_unsafe)]
    fn save_pipeline(name: &str, definition: JsonbValue) {
        catalog::check_model_name(name).or_report();
        let v = definition.value("definition").or_report();
        let parsed = if Split::is_split(&v) {
            Parsed::Split(Split::parse(&v, name).map_err(TtError::Split).or_report())
        } else {
            Parsed::Pipeline(Box::new(Definition::parse(&v).map_err(bad_def).or_report()))
        };
        let me = caller();
        lock_pipelines();
        match owner_of(Owned::Pipeline, name, true).or_report() {
            Some(owner) if !catalog::may_manage(me, owner) => TtError::PermissionDenied {
                action: format!("replace pipeline \"{name}\""),
                hint: format!("Only its owner and members of {ADMIN_ROLE} may replace or drop it."),
            }
            .report(),
            Some(_) => {}
            None if !is_admin(me) => TtError::PermissionDenied {
                action: format!("create pipeline \"{name}\""),
                hint: format!(
                    "Members of {ADMIN_ROLE} create pipelines: GRANT {ADMIN_ROLE} TO {};",
                    role_name(me)
                ),
            }
            .report(),
            None => {}
        }
        let mut v = v;
        match &parsed {
            Parsed::Pipeline(d) => {
                check(d).or_report();
                // Function channels are stored with the function the check found,
                // schema-qualified: a call runs that function whatever the caller's search path.
                for (i, c) in d.channels.iter().enumerate() {
                    if let ChannelKind::Function { function, .. } = &c.kind {
                        if let Some((_, qualified, _)) =
                            crate::serve::sources::resolve_function(function).or_report()
                        {
                            v["channels"][i]["function"] = serde_json::Value::String(qualified);
                        }
                    }
                }
            }
            Parsed::Split(sp) => {
                check_split(name, sp).or_report();
                let users = splits_using(name).or_report();
                if !users.is_empty() {
                    TtError::BadPipeline {
                        path: "variants".into(),
                        reason: format!(
                            "\"{name}\" is a variant of {}; a split's variants are pipelines",
                            users.join(", ")
                        ),
                    }
                    .report();
                }
                // Stored with every key explicit: the salt stays what it was at the first save
                // even if the default changed.
                v = sp.to_value();
            }
        }
        let who = role_name(me);
        let created = as_catalog_owner(|| {
            Spi::get_one_with_args::<bool>(
                "INSERT INTO twotower.pipeline AS p (name, definition, updated_by) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET definition = EXCLUDED.definition, updated_by = EXCLUDED.updated_by,
                                                  updated_at = pg_catalog.now()
                 RETURNING p.owner_object IS NULL",
                &[name.into(), pgrx::JsonB(v.clone()).into(), who.clone().into()],
            )
            .and_then(|created| {
                Spi::run_with_args(
                    "INSERT INTO twotower.pipeline_history (name, action, definition, changed_by)
                     VALUES ($1, 'save', $2, $3)",
                    &[name.into(), pgrx::JsonB(v).into(), who.into()],
                )
                .map(|_| created)
            })
        })
        .or_report()
        .map_err(|e| TtError::Catalog(format!("saving pipeline \"{name}\": {e}")))
        .or_report()
        .unwrap_or(false);
        if created {
            catalog::set_owner(Owned::Pipeline, name, me).or_report();
        }
        // Every backend parses the pipelines again (from the commit on).
        catalog::invalidate();
    }

    /// Saves and drops of pipelines and splits one at a time (until the transaction ends), so
    /// that a split never lists a pipeline a concurrent drop removes, nor one a concurrent
    /// save turns into a split. Calls (`recommend`) read on.
    fn lock_pipelines() {
        as_catalog_owner(|| Spi::run("LOCK TABLE twotower.pipeline IN SHARE ROW EXCLUSIVE MODE"))
            .or_report()
            .map_err(|e| TtError::Catalog(format!("locking the pipelines: {e}")))
            .or_report();
    }

    /// Drops pipeline `name` (its owner or twotower_admin); false if there is none.
    #[pg_extern(volatile, parallel_unsafe)]
    fn drop_pipeline(name: &str) -> bool {
        let me = caller();
        lock_pipelines();
        let Some(owner) = owner_of(Owned::Pipeline, name, true).or_report() else {
            return false;
        };
        if !catalog::may_manage(me, owner) {
            TtError::PermissionDenied {
                action: format!("drop pipeline \"{name}\""),
                hint: format!("Only its owner and members of {ADMIN_ROLE} may replace or drop it."),
            }
            .report();
        }
        let splits = splits_using(name).or_report();
        if !splits.is_empty() {
            TtError::UsedByPipelines {
                what: "pipeline",
                name: name.to_owned(),
                pipelines: splits,
            }
            .report();
        }
        let who = role_name(me);
        let lo = as_catalog_owner(|| {
            Spi::run_with_args(
                "INSERT INTO twotower.pipeline_history (name, action, definition, changed_by)
                 VALUES ($1, 'drop', NULL, $2)",
                &[name.into(), who.into()],
            )?;
            Spi::get_one_with_args::<pg_sys::Oid>(
                "DELETE FROM twotower.pipeline WHERE name = $1 RETURNING owner_object",
                &[name.into()],
            )
        })
        .or_report()
        .ok()
        .flatten();
        if let Some(lo) = lo {
            catalog::drop_owner_object(lo);
        }
        catalog::invalidate();
        true
    }

    /// What served a request: the pipeline that ran and, through a split, the variant.
    pub(crate) struct Served {
        /// The pipeline that ran (a split's variant's pipeline).
        pub pipeline: String,
        /// The variant's name, the request's unit and its bucket (through a split).
        pub variant: Option<(String, String, u32)>,
        /// The pipeline's channels, in its order.
        pub channels: Vec<String>,
        /// The split's unit key when the model did not see it (not one of its features).
        pub stripped: Option<String>,
    }

    enum Parsed {
        Pipeline(Box<Definition>),
        Split(Split),
    }

    /// One request through pipeline `name` (through a split: its variant for this request):
    /// from the channels (or from `candidates` when given, for `prerank`) through the stages
    /// to the top `k`, by the funnel core.
    fn run(
        name: &str,
        features: &JsonbValue,
        k: Option<i32>,
        exclude: &[i64],
        candidates: Option<&[i64]>,
    ) -> TtResult<(Outcome, Served)> {
        let (d, pipeline, variant, unit_key) = match load_stored(name)? {
            Stored::Pipeline(d) => (d, name.to_owned(), None, None),
            Stored::Split(sp) => {
                let unit = features.key(&sp.unit, "features")?.unwrap_or_default();
                let a = sp
                    .assign(&serde_json::json!({ sp.unit.clone(): unit }))
                    .map_err(TtError::Split)?;
                let d = match load_stored(&a.variant.pipeline)? {
                    Stored::Pipeline(d) => d,
                    Stored::Split(_) => {
                        return Err(TtError::Catalog(format!(
                            "split \"{name}\" names split \"{}\" as a variant",
                            a.variant.pipeline
                        )))
                    }
                };
                (
                    d,
                    a.variant.pipeline.clone(),
                    Some((a.variant.name.clone(), a.unit, a.bucket)),
                    Some(sp.unit.clone()),
                )
            }
        };
        let user = user_model(&d)?;
        let stages: Vec<Option<Serving>> = d
            .stages
            .iter()
            .map(|s| match &s.kind {
                StageKind::Model(m) => stage_model(m).map(Some),
                StageKind::TwoTower | StageKind::Rerank(_) => Ok(None),
            })
            .collect::<TtResult<_>>()?;
        let mut f = features.features(&user.model, "features")?;
        // A split's unit key is the split's: the model sees it only if it is one of its
        // features (a strict model would refuse it otherwise).
        let mut stripped = None;
        if let Some(key) = unit_key {
            if !user.model.feature_names().contains(&key.as_str()) {
                if let Some(o) = f.as_object_mut() {
                    o.remove(&key);
                }
                stripped = Some(key);
            }
        }
        let models = Models {
            user: &user.model,
            strict: user.strict,
            stages: stages
                .iter()
                .map(|s| s.as_ref().map(|s| &s.model))
                .collect(),
        };
        let mut src = SpiSources {
            d: &d,
            metric: user.model.metric(),
            keys: stages
                .iter()
                .map(|s| s.as_ref().map_or(0, |s| s.checksum as u64))
                .collect(),
        };
        let req = Request {
            pipeline: &pipeline,
            features: &f,
            k: k.map(i64::from),
            exclude,
            candidates,
        };
        let out = request::run(&d, &models, &req, &mut src)?;
        let served = Served {
            channels: d.channels.iter().map(|c| c.name.clone()).collect(),
            pipeline,
            variant,
            stripped,
        };
        Ok((out, served))
    }

    fn ids(v: Option<Vec<Option<i64>>>, what: &str) -> Vec<i64> {
        v.unwrap_or_default()
            .into_iter()
            .map(|x| {
                x.unwrap_or_else(|| {
                    TtError::NullValue(format!("{what} has a NULL element")).report()
                })
            })
            .collect()
    }

    /// The funnel in one call: pipeline `pipeline`'s channels (the user tower once, then each
    /// channel's top k), their merge, and its pre-rank stages, for the user described by
    /// `features`; the top `k` (default: the pipeline's) with the final score, rank, and the
    /// channels that returned each item with its rank there. History items (unless the
    /// pipeline says otherwise) and `exclude` are never returned. Tables, indexes, neighbour
    /// tables and channel functions are read as the caller. Through a split, the request's
    /// variant serves it. With `request_id`, the list is written to the impression log
    /// (`twotower.impressions`; feedback with `twotower.feedback`).
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::type_complexity)]
    fn recommend(
        pipeline: Option<&str>,
        features: Option<JsonbValue>,
        k: default!(Option<i32>, "NULL"),
        exclude: default!(Option<Vec<Option<i64>>>, "NULL"),
        request_id: default!(Option<&str>, "NULL"),
    ) -> TableIterator<
        'static,
        (
            name!(item_id, i64),
            name!(score, f32),
            name!(rank, i32),
            name!(channels, Vec<String>),
            name!(channel_ranks, Vec<i32>),
        ),
    > {
        let (pipeline, features) = (
            required(pipeline, "pipeline"),
            required(features, "features"),
        );
        let exclude = ids(exclude, "exclude");
        if let Some(id) = request_id {
            crate::sql::serving::check_request_id(id).or_report();
        }
        let (out, served) = run(pipeline, &features, k, &exclude, None).or_report();
        if let Some(id) = request_id {
            crate::sql::serving::log_impressions(id, pipeline, &served, &features, &out.rows)
                .or_report();
        }
        TableIterator::new(
            out.rows
                .into_iter()
                .enumerate()
                .map(|(i, r)| (r.item, r.score, i as i32 + 1, r.channels, r.ranks)),
        )
    }

    /// `recommend` reported step by step: the user tower, each channel, the merge, the item
    /// vectors read, each pre-rank stage; with how many candidates each step received and
    /// kept, the items it kept and dropped, and its time in milliseconds; a model stage's
    /// scores of the kept items (`scores`: what it ranked by, and a multi-task model's every
    /// task, each an array aligned with `kept_items`).
    #[pg_extern(stable, parallel_restricted)]
    #[allow(clippy::type_complexity)]
    fn recommend_explain(
        pipeline: Option<&str>,
        features: Option<JsonbValue>,
        k: default!(Option<i32>, "NULL"),
        exclude: default!(Option<Vec<Option<i64>>>, "NULL"),
    ) -> TableIterator<
        'static,
        (
            name!(step, i32),
            name!(stage, String),
            name!(received, Option<i32>),
            name!(kept, i32),
            name!(ms, f64),
            name!(kept_items, Vec<i64>),
            name!(dropped_items, Vec<i64>),
            name!(scores, Option<pgrx::JsonB>),
        ),
    > {
        let (pipeline, features) = (
            required(pipeline, "pipeline"),
            required(features, "features"),
        );
        let exclude = ids(exclude, "exclude");
        let (mut out, served) = run(pipeline, &features, k, &exclude, None).or_report();
        if let Some((variant, unit, bucket)) = &served.variant {
            out.steps.insert(
                0,
                Step {
                    stage: format!(
                        "split {pipeline}: variant {variant} (pipeline {}) for unit {unit}, bucket {bucket}",
                        served.pipeline
                    ),
                    received: None,
                    kept: Vec::new(),
                    dropped: Vec::new(),
                    ms: 0.0,
                    scores: Vec::new(),
                },
            );
        }
        TableIterator::new(out.steps.into_iter().enumerate().map(|(i, s)| {
            (
                i as i32 + 1,
                s.stage,
                s.received.map(|r| r as i32),
                s.kept.len() as i32,
                s.ms,
                s.kept,
                s.dropped,
                (!s.scores.is_empty()).then(|| {
                    pgrx::JsonB(serde_json::Value::Object(
                        s.scores
                            .into_iter()
                            .map(|(k, v)| (k, short_floats(&v)))
                            .collect(),
                    ))
                }),
            )
        }))
    }

    /// Scores as a JSON array of their shortest decimals (the f32's, not its f64 widening).
    fn short_floats(v: &[f32]) -> serde_json::Value {
        v.iter()
            .map(|x| {
                x.to_string()
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map_or(serde_json::Value::Null, serde_json::Value::Number)
            })
            .collect()
    }

    /// Pipeline `pipeline`'s pre-rank stages over the caller's `candidates` (distinct item ids,
    /// e.g. from the application's own recall): the top `k` by the last stage's score.
    /// Candidates without an item vector are left out.
    #[pg_extern(stable, parallel_restricted)]
    fn prerank(
        pipeline: Option<&str>,
        features: Option<JsonbValue>,
        candidates: Option<Vec<Option<i64>>>,
        k: default!(Option<i32>, "NULL"),
    ) -> TableIterator<'static, (name!(item_id, i64), name!(score, f32), name!(rank, i32))> {
        let (pipeline, features) = (
            required(pipeline, "pipeline"),
            required(features, "features"),
        );
        let candidates = ids(Some(required(candidates, "candidates")), "candidates");
        if candidates.len() > request::MAX_CANDIDATES {
            TtError::BadArgument(format!(
                "{} candidates are more than the {} prerank takes",
                candidates.len(),
                request::MAX_CANDIDATES
            ))
            .report();
        }
        let (out, _) = run(pipeline, &features, k, &[], Some(&candidates)).or_report();
        TableIterator::new(
            out.rows
                .into_iter()
                .enumerate()
                .map(|(i, r)| (r.item, r.score, i as i32 + 1)),
        )
    }
}
