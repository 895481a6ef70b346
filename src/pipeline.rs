//! SQL surface of the funnel in one call: pipelines saved in `twotower.pipeline`
//! (`save_pipeline`, `drop_pipeline`), `recommend` (channels → merge → cascade pre-rank → top k,
//! with provenance), `recommend_explain` (the same run, reported per step), and `prerank` (the
//! pipeline's stages over the caller's own candidates). The definition's shape is checked by the
//! funnel core (`twotower_funnel::pipeline`); this module checks what it names against the
//! database, reads what the stages need in one batch per step, and maps errors.

use pgrx::prelude::*;

/// What a pipeline can depend on.
#[derive(Clone, Copy)]
pub enum Uses {
    Model,
    Channel,
}

/// The pipelines whose definitions name model or channel `name` (so dropping it would break
/// them), by name.
pub fn pipelines_using(what: Uses, name: &str) -> crate::error::TtResult<Vec<String>> {
    let cond = match what {
        Uses::Model => {
            "p.definition ->> 'user_model' = $1 OR EXISTS (SELECT 1 FROM jsonb_array_elements(
               CASE WHEN jsonb_typeof(p.definition -> 'stages') = 'array' THEN p.definition -> 'stages' ELSE '[]' END) s
              WHERE s ->> 'type' = 'model' AND s ->> 'model' = $1)"
        }
        Uses::Channel => {
            "EXISTS (SELECT 1 FROM jsonb_array_elements(
               CASE WHEN jsonb_typeof(p.definition -> 'channels') = 'array' THEN p.definition -> 'channels' ELSE '[]' END) c
              WHERE c ->> 'type' = 'i2i' AND c ->> 'channel' = $1)"
        }
    };
    let names = crate::catalog::as_catalog_owner(|| {
        crate::catalog::read_row::<Vec<String>, bool>(
            &format!("SELECT coalesce(array_agg(p.name ORDER BY p.name), '{{}}'), true FROM twotower.pipeline p WHERE {cond}"),
            &[name.into()],
        )
    })?
    .map_err(|e| crate::error::TtError::Catalog(format!("reading pipelines: {e}")))?;
    Ok(names.and_then(|(n, _)| n).unwrap_or_default())
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
    use crate::spi;
    use pgrx::prelude::*;
    use pgrx::spi::quote_identifier;
    use rustc_hash::FxHashMap as HashMap;
    use serde_json::Value;
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::Instant;
    use twotower_funnel::pipeline::{ChannelKind, Definition, StageKind, MAX_HISTORY};
    use twotower_funnel::prerank::{self, Candidate as Cand, PrerankError, Request, Scorer, Stage};
    use twotower_funnel::Candidate;
    use twotower_tower::{Kind, Part, Source};

    /// The most candidates `prerank` takes in one call.
    const MAX_CANDIDATES: usize = 100_000;

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

    /// The stored definition of `name` (read as the catalogue's owner: the table is not public).
    pub(crate) fn load(name: &str) -> TtResult<Definition> {
        // A read-only query: recommend also runs on hot standbys.
        let text = as_catalog_owner(|| {
            catalog::read_row::<pgrx::JsonB, bool>(
                "SELECT definition, true FROM twotower.pipeline WHERE name = $1",
                &[name.into()],
            )
        })?
        .ok()
        .flatten()
        .and_then(|(d, _)| d)
        .ok_or_else(|| TtError::UnknownPipeline(name.to_owned()))?;
        Definition::parse(&text.0).map_err(bad_def)
    }

    fn relation(path: &str, name: &str) -> TtResult<pg_sys::Oid> {
        spi::regclass(name).ok_or_else(|| bad(path, format!("relation \"{name}\" does not exist")))
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
    /// tables and columns, each channel's index or neighbour table, the merge options, each
    /// stage's pre-rank model and the item features it reads.
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
            }
        }
        let names: Vec<String> = d.channels.iter().map(|c| c.name.clone()).collect();
        crate::merge::twotower::parse_strategy(&d.merge.strategy, &d.merge.options, &names);
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
    /// its shape, and that every model, table, column, index and channel it names exists and
    /// fits. Creating a pipeline needs twotower_admin; replacing one, its owner or
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
        true
    }

    /// One step of a run, for `recommend_explain`.
    struct Step {
        stage: String,
        received: Option<usize>,
        kept: Vec<i64>,
        dropped: Vec<i64>,
        ms: f64,
    }

    struct Outcome {
        /// (item, score, channels, ranks there), in rank order.
        rows: Vec<(i64, f32, Vec<String>, Vec<i32>)>,
        steps: Vec<Step>,
    }

    /// The history ids under the request's `key`: a list of ids, or `{"ids": [...], ...}`.
    pub(crate) fn history_ids(f: &Value, key: &str) -> TtResult<Vec<i64>> {
        let list = match f.get(key) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(a)) => a,
            Some(Value::Object(o)) => match o.get("ids") {
                Some(Value::Array(a)) => a,
                _ => {
                    return Err(TtError::BadArgument(format!(
                        "history \"{key}\" must be a list of item ids or {{\"ids\": [...]}}"
                    )))
                }
            },
            Some(v) => {
                return Err(TtError::BadArgument(format!(
                    "history \"{key}\" must be a list of item ids, got {v}"
                )))
            }
        };
        let mut out = Vec::with_capacity(list.len().min(MAX_HISTORY as usize));
        for v in list.iter().take(MAX_HISTORY as usize) {
            let id = twotower_tower::canonical_id(v)
                .ok()
                .flatten()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| {
                    TtError::BadArgument(format!(
                        "history \"{key}\" has {v}, not an integer item id"
                    ))
                })?;
            out.push(id);
        }
        Ok(out)
    }

    /// Item vectors of `ids` from the pipeline's vectors table (read as the caller): the ones
    /// with a vector, by id.
    pub(crate) fn vectors(d: &Definition, ids: &[i64]) -> TtResult<HashMap<i64, Arc<[f32]>>> {
        if ids.is_empty() {
            return Ok(HashMap::default());
        }
        let rel = relation("vectors.table", &d.vectors.table)?;
        let cached = crate::item_cache::usable(rel);
        let source = crate::item_cache::source(
            &[
                d.vectors.id_column.as_str(),
                d.vectors.vector_column.as_str(),
            ],
            0,
        );
        let (mut hits, ids) = if cached {
            crate::item_cache::vectors(rel, source, ids)
        } else {
            (HashMap::default(), ids.to_vec())
        };
        if ids.is_empty() {
            return Ok(hits);
        }
        let mut out: HashMap<i64, Arc<[f32]>> =
            HashMap::with_capacity_and_hasher(ids.len(), Default::default());
        let table = spi::relation_name(rel)?;
        let (id, vec) = (
            quote_identifier(&d.vectors.id_column),
            quote_identifier(&d.vectors.vector_column),
        );
        Spi::connect(|c| {
            let t = c.select(
                &format!("SELECT {id}::pg_catalog.int8, {vec}::pg_catalog.float4[] FROM {table} WHERE {id} = ANY ($1) AND {vec} IS NOT NULL"),
                None,
                &[ids.clone().into()],
            )?;
            for r in t {
                if let (Some(i), Some(v)) = (r.get::<i64>(1)?, r.get::<Vec<Option<f32>>>(2)?) {
                    if v.iter().all(|x| x.is_some_and(f32::is_finite)) {
                        out.insert(i, v.into_iter().flatten().collect::<Vec<f32>>().into());
                    }
                }
            }
            Ok::<_, pgrx::spi::Error>(())
        })
        .map_err(|e| TtError::BadArgument(format!("reading {table}: {e}")))?;
        if cached {
            crate::item_cache::put_vectors(rel, source, out.iter().map(|(i, v)| (*i, v)));
        }
        hits.extend(out);
        Ok(hits)
    }

    /// Item-side parts of `model` for `items`, from the item features table (only the columns
    /// the model reads; an item without a row gets every feature's missing value).
    fn item_parts(
        d: &Definition,
        model_key: u64,
        model: &twotower_tower::Model,
        items: &[i64],
    ) -> Result<Vec<Arc<Part>>, PrerankError> {
        let cols: Vec<&str> = model
            .sources()
            .filter(|(_, s)| *s == Source::Item)
            .map(|(n, _)| n)
            .collect();
        let empty = Value::Object(Default::default());
        let encode = |v: &Value| {
            model
                .encode_part(v, Source::Item, false)
                .map(Arc::new)
                .map_err(|e| PrerankError::Bad(e.to_string()))
        };
        let (Some(f), false) = (&d.item_features, cols.is_empty()) else {
            return items.iter().map(|_| encode(&empty)).collect();
        };
        let fail = |e: String| PrerankError::Bad(format!("reading item features: {e}"));
        let rel = spi::regclass(&f.table)
            .ok_or_else(|| fail(format!("relation \"{}\" does not exist", f.table)))?;
        let cached = crate::item_cache::usable(rel);
        let source = crate::item_cache::source(&[f.id_column.as_str()], model_key);
        let (mut hits, misses) = if cached {
            crate::item_cache::parts(rel, source, items)
        } else {
            (HashMap::default(), items.to_vec())
        };
        if misses.is_empty() {
            return Ok(items
                .iter()
                .map(|i| hits.remove(i).expect("every item is a hit"))
                .collect());
        }
        let rows = item_rows(rel, &f.id_column, &cols, &misses)
            .map_err(|e| PrerankError::Bad(e.message_text()))?;
        let mut fresh: HashMap<i64, Arc<Part>> =
            HashMap::with_capacity_and_hasher(misses.len(), Default::default());
        for i in &misses {
            fresh.insert(*i, encode(rows.get(i).unwrap_or(&empty))?);
        }
        if cached {
            // Items without a row are cached too (as every feature's missing value): an insert
            // of their row invalidates the cache like any change.
            crate::item_cache::put_parts(rel, source, fresh.iter().map(|(i, p)| (*i, p)));
        }
        hits.extend(fresh);
        Ok(items
            .iter()
            .map(|i| hits.remove(i).expect("every item was read or cached"))
            .collect())
    }

    /// Rows of item feature table `rel` for `ids` (read as the caller) as JSON objects of the
    /// `cols` that exist, by id; ids without a row are absent.
    pub(crate) fn item_rows(
        rel: pg_sys::Oid,
        id_column: &str,
        cols: &[&str],
        ids: &[i64],
    ) -> TtResult<HashMap<i64, Value>> {
        let table = spi::relation_name(rel)?;
        let id = quote_identifier(id_column);
        let select: Vec<String> = cols
            .iter()
            .filter(|c| spi::column_exists(rel, c))
            .map(quote_identifier)
            .collect();
        let mut texts: Vec<(i64, crate::catalog::JsonbValue)> = Vec::with_capacity(ids.len());
        Spi::connect(|c| {
            let t = c.select(
                &format!(
                    "SELECT s.__id, pg_catalog.to_jsonb(s.*) - '__id' FROM (SELECT {id}::pg_catalog.int8 AS __id{}{} FROM {table} WHERE {id} = ANY ($1)) s",
                    if select.is_empty() { "" } else { ", " },
                    select.join(", ")
                ),
                None,
                &[ids.to_vec().into()],
            )?;
            for r in t {
                // Read as text and parsed below: a value serde cannot hold (a number beyond
                // double precision, nesting past 128 levels) is an ERROR, not a panic.
                if let (Some(i), Some(v)) =
                    (r.get::<i64>(1)?, r.get::<crate::catalog::JsonbValue>(2)?)
                {
                    texts.push((i, v));
                }
            }
            Ok::<_, pgrx::spi::Error>(())
        })
        .map_err(|e| TtError::BadArgument(format!("reading item features from {table}: {e}")))?;
        let mut rows: HashMap<i64, Value> =
            HashMap::with_capacity_and_hasher(texts.len(), Default::default());
        for (i, v) in texts {
            rows.insert(i, v.value("item features")?);
        }
        Ok(rows)
    }

    /// With a strict user tower, a request's features may hold only the user tower's features,
    /// the pipeline's history key and the pre-rank models' user-side features (`stage_keys`).
    pub(crate) fn check_request_keys<'a>(
        user: &'a Serving,
        d: &'a Definition,
        stage_keys: impl Iterator<Item = &'a str>,
        f: &Value,
    ) -> TtResult<()> {
        if !user.strict {
            return Ok(());
        }
        let mut known: HashSet<&str> = user.model.feature_names().into_iter().collect();
        known.extend(d.history.as_deref());
        known.extend(stage_keys);
        match f
            .as_object()
            .and_then(|o| o.keys().find(|k| !known.contains(k.as_str())))
        {
            Some(key) => Err(TtError::Tower(twotower_tower::TowerError::UnknownFeature {
                name: key.clone(),
            })),
            None => Ok(()),
        }
    }

    fn ms(t: Instant) -> f64 {
        t.elapsed().as_secs_f64() * 1000.0
    }

    /// One request through pipeline `name`: from the channels (or from `candidates` when
    /// given, for `prerank`) through the stages to the top `k`.
    fn run(
        name: &str,
        features: &JsonbValue,
        k: Option<i32>,
        exclude: &[i64],
        candidates: Option<&[i64]>,
    ) -> TtResult<Outcome> {
        let d = load(name)?;
        let most = d.most();
        let k = match k {
            None => d.k,
            Some(k) if k >= 1 && (k as usize) <= most => k as usize,
            Some(k) => {
                return Err(TtError::BadArgument(format!(
                    "k must be between 1 and {most} (what pipeline \"{name}\" keeps), got {k}"
                )))
            }
        };
        let mut steps = Vec::new();
        let t = Instant::now();
        let user = user_model(&d)?;
        let models: Vec<Option<Serving>> = d
            .stages
            .iter()
            .map(|s| match &s.kind {
                StageKind::Model(m) => stage_model(m).map(Some),
                StageKind::TwoTower => Ok(None),
            })
            .collect::<TtResult<_>>()?;
        // The request may carry the user tower's features, the pre-rank models' user-side
        // features and the history; with a strict user tower any other key is an error.
        let f = features.features(&user.model, "features")?;
        check_request_keys(
            &user,
            &d,
            models.iter().flatten().flat_map(|m| {
                m.model
                    .sources()
                    .filter(|(_, s)| *s == Source::User)
                    .map(|(n, _)| n)
            }),
            &f,
        )?;
        let u = user.model.embed_with(&f, false)?;
        let history = match &d.history {
            Some(key) => history_ids(&f, key)?,
            None => Vec::new(),
        };
        let mut excluded: HashSet<i64> = exclude.iter().copied().collect();
        if d.exclude_history {
            excluded.extend(history.iter().copied());
        }
        steps.push(Step {
            stage: format!("user tower {}", d.user_model),
            received: None,
            kept: Vec::new(),
            dropped: Vec::new(),
            ms: ms(t),
        });

        // Candidates: the channels, merged; or the caller's.
        let mut provenance: HashMap<i64, (Vec<String>, Vec<i32>)> = HashMap::default();
        let pool: Vec<i64> = match candidates {
            Some(c) => {
                let mut seen = HashSet::with_capacity(c.len());
                if let Some(dup) = c.iter().find(|i| !seen.insert(**i)) {
                    return Err(TtError::BadArgument(format!(
                        "candidate {dup} is given twice"
                    )));
                }
                c.iter()
                    .copied()
                    .filter(|i| !excluded.contains(i))
                    .collect()
            }
            None if d.channels.is_empty() => {
                return Err(TtError::BadArgument(format!(
                    "pipeline \"{name}\" has no channels: call twotower.prerank with candidates"
                )));
            }
            None => {
                let mut cands: Vec<Candidate> = Vec::new();
                let ex: Vec<i64> = excluded.iter().copied().collect();
                for (ci, c) in d.channels.iter().enumerate() {
                    check_for_interrupts!();
                    let t = Instant::now();
                    let hits: Vec<(i64, f32)> = match &c.kind {
                        ChannelKind::TwoTower { index, ef_search } => {
                            let ix = relation(&format!("channels[{ci}].index"), index)?;
                            crate::recall::twotower::search(
                                ix,
                                &u,
                                user.model.metric(),
                                c.k,
                                &excluded,
                                ef_search.unwrap_or(0),
                            )?
                        }
                        ChannelKind::I2i {
                            channel,
                            history_len,
                            decay,
                        } => {
                            let h: Vec<(i64, f32)> = history
                                .iter()
                                .take(*history_len)
                                .enumerate()
                                .map(|(i, id)| (*id, decay.powi(i as i32) as f32))
                                .collect();
                            if h.is_empty() {
                                Vec::new()
                            } else {
                                crate::channels::twotower::i2i_hits(channel, &h, c.k, &ex)?
                                    .into_iter()
                                    .map(|x| (x.item, x.score))
                                    .collect()
                            }
                        }
                    };
                    steps.push(Step {
                        stage: format!("channel {}", c.name),
                        received: None,
                        kept: hits.iter().map(|h| h.0).collect(),
                        dropped: Vec::new(),
                        ms: ms(t),
                    });
                    cands.extend(hits.into_iter().map(|(item, score)| Candidate {
                        channel: ci,
                        item,
                        score,
                    }));
                }
                let t = Instant::now();
                let names: Vec<String> = d.channels.iter().map(|c| c.name.clone()).collect();
                let strategy = crate::merge::twotower::parse_strategy(
                    &d.merge.strategy,
                    &d.merge.options,
                    &names,
                );
                let merged = twotower_funnel::merge(&cands, names.len(), &strategy, d.merge.k, &ex)
                    .map_err(|e| TtError::BadArgument(format!("merge: {e}")))?;
                let kept: Vec<i64> = merged.iter().map(|m| m.item).collect();
                let keptset: HashSet<i64> = kept.iter().copied().collect();
                let mut dropped: Vec<i64> = cands
                    .iter()
                    .map(|c| c.item)
                    .filter(|i| !keptset.contains(i))
                    .collect();
                dropped.sort_unstable();
                dropped.dedup();
                for m in &merged {
                    provenance.insert(
                        m.item,
                        (
                            m.provenance.iter().map(|p| names[p.0].clone()).collect(),
                            m.provenance.iter().map(|p| p.1 as i32).collect(),
                        ),
                    );
                }
                steps.push(Step {
                    stage: format!("merge {}", d.merge.strategy),
                    received: Some(cands.len()),
                    kept,
                    dropped,
                    ms: ms(t),
                });
                if d.stages.is_empty() {
                    let rows = merged
                        .into_iter()
                        .take(k)
                        .map(|m| {
                            let (c, r) = provenance.remove(&m.item).unwrap_or_default();
                            (m.item, m.score as f32, c, r)
                        })
                        .collect();
                    return Ok(Outcome { rows, steps });
                }
                merged.into_iter().map(|m| m.item).collect()
            }
        };
        if d.stages.is_empty() {
            return Err(TtError::BadArgument(format!(
                "pipeline \"{name}\" has no pre-rank stages"
            )));
        }

        // The item vectors of the candidates and the history, in one read.
        check_for_interrupts!();
        let t = Instant::now();
        let mut wanted = pool.clone();
        wanted.extend(history.iter().copied());
        let vecs = vectors(&d, &wanted)?;
        let (with, without): (Vec<i64>, Vec<i64>) = pool.iter().partition(|i| vecs.contains_key(i));
        let hist: Vec<Vec<f32>> = history
            .iter()
            .filter_map(|h| vecs.get(h).map(|v| v.to_vec()))
            .collect();
        let cands: Vec<Cand> = with
            .iter()
            .map(|i| Cand {
                item: *i,
                vector: vecs[i].clone(),
            })
            .collect();
        steps.push(Step {
            stage: "item vectors".into(),
            received: Some(pool.len()),
            kept: with.clone(),
            dropped: without,
            ms: ms(t),
        });

        let user_parts: Vec<Option<Part>> = models
            .iter()
            .map(|m| {
                m.as_ref()
                    .map(|m| m.model.encode_part(&f, Source::User, false))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let stages: Vec<Stage> = d
            .stages
            .iter()
            .zip(&models)
            .zip(&user_parts)
            .map(|((s, m), p)| Stage {
                scorer: match (&s.kind, m, p) {
                    (StageKind::Model(n), Some(m), Some(p)) => Scorer::Model {
                        name: n,
                        model: &m.model,
                        user: p,
                    },
                    _ => Scorer::TwoTower,
                },
                keep: s.keep,
            })
            .collect();
        let req = Request {
            metric: user.model.metric(),
            user: &u,
            history: &hist,
            threads: crate::embed::inference_threads(),
        };
        let mut parts = |s: usize, idx: &[usize]| -> Result<Vec<Arc<Part>>, PrerankError> {
            let Some(m) = &models[s] else {
                return Ok(Vec::new());
            };
            let items: Vec<i64> = idx.iter().map(|&i| cands[i].item).collect();
            item_parts(&d, m.checksum as u64, &m.model, &items)
        };
        let mut poll = || -> Result<(), PrerankError> {
            check_for_interrupts!();
            Ok(())
        };
        let reports = prerank::cascade(&req, &cands, &stages, &mut parts, &mut poll)
            .map_err(TtError::Prerank)?;
        for (s, r) in d.stages.iter().zip(&reports) {
            steps.push(Step {
                stage: match &s.kind {
                    StageKind::TwoTower => "pre-rank two-tower".into(),
                    StageKind::Model(m) => format!("pre-rank model {m}"),
                },
                received: Some(r.received),
                kept: r.kept.iter().map(|&i| cands[i].item).collect(),
                dropped: r.dropped.iter().map(|&i| cands[i].item).collect(),
                ms: r.seconds * 1000.0,
            });
        }
        let last = reports.last().expect("at least one stage");
        let rows = last
            .kept
            .iter()
            .zip(&last.scores)
            .take(k)
            .map(|(&i, &s)| {
                let item = cands[i].item;
                let (c, r) = provenance.remove(&item).unwrap_or_default();
                (item, s, c, r)
            })
            .collect();
        Ok(Outcome { rows, steps })
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
    /// pipeline says otherwise) and `exclude` are never returned. Tables, indexes and
    /// neighbour tables are read as the caller.
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
                .map(|(i, (item, s, c, r))| (item, s, i as i32 + 1, c, r)),
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
        if candidates.len() > MAX_CANDIDATES {
            TtError::BadArgument(format!(
                "{} candidates are more than the {MAX_CANDIDATES} prerank takes",
                candidates.len()
            ))
            .report();
        }
        let out = run(pipeline, &features, k, &[], Some(&candidates)).or_report();
        TableIterator::new(
            out.rows
                .into_iter()
                .enumerate()
                .map(|(i, (item, s, _, _))| (item, s, i as i32 + 1)),
        )
    }
}
