//! SQL surface of the funnel in one call: pipelines saved in `twotower.pipeline`
//! (`save_pipeline`, `drop_pipeline`), `recommend` (channels → merge → cascade pre-rank → top k,
//! with provenance), `recommend_explain` (the same run, reported per step), and `prerank` (the
//! pipeline's stages over the caller's own candidates). The definition's shape is checked by the
//! funnel core (`twotower_funnel::pipeline`); this module checks what it names against the
//! database, reads what the stages need in one batch per step, and maps errors.

use pgrx::prelude::*;
pub use twotower_funnel::pipeline::Uses;

/// The pipelines whose definitions name model or channel `name` (so dropping it would break
/// them), by name. A stored definition that no longer parses counts as using it.
pub fn pipelines_using(what: Uses, name: &str) -> crate::error::TtResult<Vec<String>> {
    let rows: Vec<(String, crate::catalog::JsonbValue)> = crate::catalog::as_catalog_owner(|| {
        Spi::connect(|c| {
            c.select(
                "SELECT name, definition FROM twotower.pipeline ORDER BY name",
                None,
                &[],
            )?
            .map(|r| {
                Ok::<_, pgrx::spi::Error>((
                    r.get::<String>(1)?,
                    r.get::<crate::catalog::JsonbValue>(2)?,
                ))
            })
            .filter_map(|r| match r {
                Ok((Some(n), Some(d))) => Some(Ok((n, d))),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<_>, _>>()
        })
    })?
    .map_err(|e| crate::error::TtError::Catalog(format!("reading pipelines: {e}")))?;
    Ok(rows
        .into_iter()
        .filter(|(_, d)| {
            d.value("definition")
                .ok()
                .and_then(|v| twotower_funnel::pipeline::Definition::parse(&v).ok())
                .is_none_or(|d| d.uses(what, name))
        })
        .map(|(n, _)| n)
        .collect())
}

/// Refuses to drop a model or channel that pipelines use (2BP01, naming them).
pub fn check_unused(what: Uses, name: &str) -> crate::error::TtResult<()> {
    let pipelines = pipelines_using(what, name)?;
    if pipelines.is_empty() {
        return Ok(());
    }
    Err(crate::error::TtError::UsedByPipelines {
        what: match what {
            Uses::Model => "model",
            Uses::Channel => "channel",
        },
        name: name.to_owned(),
        pipelines,
    })
}

#[pg_schema]
pub mod twotower {
    use crate::catalog::{
        self, as_catalog_owner, caller, expect_kind, is_admin, owner_of, role_name, JsonbValue,
        Owned, Serving, ADMIN_ROLE,
    };
    use crate::error::{required, OrReport, TtError, TtResult};
    use crate::sources::{relation, SpiSources};
    use crate::spi;
    use pgrx::prelude::*;
    use std::cell::RefCell;
    use std::sync::Arc;
    use twotower_funnel::channel::ChannelKind;
    use twotower_funnel::pipeline::{Definition, StageKind};
    use twotower_funnel::prerank;
    use twotower_funnel::request::{self, Models, Outcome, Request};
    use twotower_tower::{Kind, Source};

    fn bad_def(e: twotower_funnel::pipeline::DefinitionError) -> TtError {
        TtError::BadPipeline {
            path: e.path,
            reason: e.reason,
        }
    }

    fn bad(path: &str, reason: impl Into<String>) -> TtError {
        TtError::BadPipeline {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }

    /// The most definitions a backend keeps parsed.
    const CACHED_DEFINITIONS: usize = 256;

    thread_local! {
        /// Parsed definitions by name, valid for one catalogue generation (saving or dropping
        /// a pipeline starts a new one in every backend).
        static DEFINITIONS: RefCell<(u64, rustc_hash::FxHashMap<String, Arc<Definition>>)> =
            RefCell::new((0, Default::default()));
    }

    /// The stored definition of `name` (read as the catalogue's owner: the table is not
    /// public), parsed once per backend until a pipeline is saved or dropped.
    pub(crate) fn load(name: &str) -> TtResult<Arc<Definition>> {
        let generation = catalog::generation();
        let hit = DEFINITIONS.with(|c| {
            let c = c.borrow();
            (c.0 == generation)
                .then(|| c.1.get(name).cloned())
                .flatten()
        });
        if let Some(d) = hit {
            return Ok(d);
        }
        // A read-only query: recommend also runs on hot standbys.
        let text = as_catalog_owner(|| {
            catalog::read_row::<JsonbValue, bool>(
                "SELECT definition, true FROM twotower.pipeline WHERE name = $1",
                &[name.into()],
            )
        })?
        .ok()
        .flatten()
        .and_then(|(d, _)| d)
        .ok_or_else(|| TtError::UnknownPipeline(name.to_owned()))?;
        let d = Arc::new(Definition::parse(&text.value("definition")?).map_err(bad_def)?);
        DEFINITIONS.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != generation || c.1.len() >= CACHED_DEFINITIONS {
                c.1.clear();
                c.0 = generation;
            }
            c.1.insert(name.to_owned(), d.clone());
        });
        Ok(d)
    }

    fn column(path: &str, rel: pg_sys::Oid, table: &str, col: &str) -> TtResult<()> {
        if spi::column_exists(rel, col) {
            Ok(())
        } else {
            Err(bad(path, format!("\"{table}\" has no column \"{col}\"")))
        }
    }

    pub(crate) fn user_model(d: &Definition) -> TtResult<Serving> {
        let l = catalog::active_model(&d.user_model)?;
        expect_kind(&l, Kind::User)?;
        Ok(l)
    }

    fn stage_model(name: &str) -> TtResult<Serving> {
        let l = catalog::active_model(name)?;
        expect_kind(&l, Kind::Prerank)?;
        Ok(l)
    }

    /// Everything a definition names, checked against the database: the user model, the
    /// tables and columns, what each channel reads (its index, neighbour table or function),
    /// each stage's pre-rank model and the item features it reads. (Its shape, merge options
    /// included, was checked when it was parsed.)
    fn check(d: &Definition) -> TtResult<()> {
        let user = user_model(d)?;
        let dims = user.model.output_dim();
        let vrel = relation("vectors.table", &d.vectors.table)?;
        column(
            "vectors.id_column",
            vrel,
            &d.vectors.table,
            &d.vectors.id_column,
        )?;
        column(
            "vectors.vector_column",
            vrel,
            &d.vectors.table,
            &d.vectors.vector_column,
        )?;
        let features = match &d.item_features {
            Some(f) => {
                let rel = relation("item_features.table", &f.table)?;
                column("item_features.id_column", rel, &f.table, &f.id_column)?;
                Some(rel)
            }
            None => None,
        };
        for (i, c) in d.channels.iter().enumerate() {
            let path = format!("channels[{i}]");
            match &c.kind {
                ChannelKind::TwoTower { index, .. } => {
                    let ix = relation(&format!("{path}.index"), index)?;
                    // The index of a table, or of each leaf of a partitioned table.
                    let fits = crate::am::search::Target::open_all(ix, "a pipeline")?
                        .into_iter()
                        .fold(true, |ok, t| {
                            let fit = t.metric() == user.model.metric()
                                && t.dims().is_none_or(|n| n == dims);
                            t.close();
                            ok && fit
                        });
                    if !fits {
                        return Err(bad(
                            &format!("{path}.index"),
                            format!("the index does not fit model \"{}\" ({} vectors of {dims} dimensions)", d.user_model, user.model.metric().spec_name()),
                        ));
                    }
                }
                ChannelKind::I2i { channel, .. } => {
                    if crate::channels::twotower::find(channel)?.is_none() {
                        return Err(TtError::UnknownChannel(channel.clone()));
                    }
                }
                ChannelKind::Function { function, .. } => {
                    match crate::sources::resolve_function(function)? {
                        None => return Err(bad(
                            &format!("{path}.function"),
                            format!("function {function}(jsonb, integer) does not exist"),
                        )),
                        Some((_, q, false)) => return Err(bad(
                            &format!("{path}.function"),
                            format!("function {q}(jsonb, integer) must return a set of rows with columns item_id and score (RETURNS TABLE (item_id bigint, score real))"),
                        )),
                        Some(_) => {}
                    }
                }
            }
        }
        for (i, s) in d.stages.iter().enumerate() {
            let StageKind::Model(name) = &s.kind else {
                continue;
            };
            let path = format!("stages[{i}].model");
            let m = stage_model(name)?;
            prerank::check_model(name, &m.model, dims).map_err(|e| bad(&path, e.to_string()))?;
            for (feature, source) in m.model.sources() {
                if source != Source::Item {
                    continue;
                }
                let (Some(rel), Some(f)) = (features, &d.item_features) else {
                    return Err(bad(&path, format!("model \"{name}\" reads item feature \"{feature}\": the pipeline needs \"item_features\"")));
                };
                if !spi::column_exists(rel, feature) && !m.model.feature_has_default(feature) {
                    return Err(bad(&path, format!("model \"{name}\" reads item feature \"{feature}\", which \"{}\" has no column for", f.table)));
                }
            }
        }
        Ok(())
    }

    /// Saves (creates or replaces) pipeline `name` after checking its definition completely:
    /// its shape, and that every model, table, column, index, channel and function it names
    /// exists and fits. Creating a pipeline needs twotower_admin; replacing one, its owner or
    /// twotower_admin. Transactional like any row change.
    #[pg_extern(volatile, parallel_unsafe)]
    fn save_pipeline(name: &str, definition: JsonbValue) {
        catalog::check_model_name(name).or_report();
        let v = definition.value("definition").or_report();
        let d = Definition::parse(&v).map_err(bad_def).or_report();
        let me = caller();
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
        check(&d).or_report();
        let who = role_name(me);
        let created = as_catalog_owner(|| {
            Spi::get_one_with_args::<bool>(
                "INSERT INTO twotower.pipeline AS p (name, definition, updated_by) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET definition = EXCLUDED.definition, updated_by = EXCLUDED.updated_by,
                                                  updated_at = pg_catalog.now()
                 RETURNING p.owner_object IS NULL",
                &[name.into(), pgrx::JsonB(v).into(), who.into()],
            )
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

    /// Drops pipeline `name` (its owner or twotower_admin); false if there is none.
    #[pg_extern(volatile, parallel_unsafe)]
    fn drop_pipeline(name: &str) -> bool {
        let me = caller();
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
        let lo = as_catalog_owner(|| {
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

    /// One request through pipeline `name`: from the channels (or from `candidates` when
    /// given, for `prerank`) through the stages to the top `k`, by the funnel core.
    fn run(
        name: &str,
        features: &JsonbValue,
        k: Option<i32>,
        exclude: &[i64],
        candidates: Option<&[i64]>,
    ) -> TtResult<Outcome> {
        let d = load(name)?;
        let user = user_model(&d)?;
        let stages: Vec<Option<Serving>> = d
            .stages
            .iter()
            .map(|s| match &s.kind {
                StageKind::Model(m) => stage_model(m).map(Some),
                StageKind::TwoTower => Ok(None),
            })
            .collect::<TtResult<_>>()?;
        let f = features.features(&user.model, "features")?;
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
            pipeline: name,
            features: &f,
            k: k.map(i64::from),
            exclude,
            candidates,
        };
        request::run(&d, &models, &req, &mut src)
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
    /// tables and channel functions are read as the caller.
    #[pg_extern(stable, parallel_restricted)]
    #[allow(clippy::type_complexity)]
    fn recommend(
        pipeline: Option<&str>,
        features: Option<JsonbValue>,
        k: default!(Option<i32>, "NULL"),
        exclude: default!(Option<Vec<Option<i64>>>, "NULL"),
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
        let out = run(pipeline, &features, k, &exclude, None).or_report();
        TableIterator::new(
            out.rows
                .into_iter()
                .enumerate()
                .map(|(i, r)| (r.item, r.score, i as i32 + 1, r.channels, r.ranks)),
        )
    }

    /// `recommend` reported step by step: the user tower, each channel, the merge, the item
    /// vectors read, each pre-rank stage; with how many candidates each step received and
    /// kept, the items it kept and dropped, and its time in milliseconds.
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
        ),
    > {
        let (pipeline, features) = (
            required(pipeline, "pipeline"),
            required(features, "features"),
        );
        let exclude = ids(exclude, "exclude");
        let out = run(pipeline, &features, k, &exclude, None).or_report();
        TableIterator::new(out.steps.into_iter().enumerate().map(|(i, s)| {
            (
                i as i32 + 1,
                s.stage,
                s.received.map(|r| r as i32),
                s.kept.len() as i32,
                s.ms,
                s.kept,
                s.dropped,
            )
        }))
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
        let out = run(pipeline, &features, k, &[], Some(&candidates)).or_report();
        TableIterator::new(
            out.rows
                .into_iter()
                .enumerate()
                .map(|(i, r)| (r.item, r.score, i as i32 + 1)),
        )
    }
}
