//! The database behind the funnel core: [`SpiSources`] implements `twotower_funnel::Sources`
//! over SPI for `recommend`, `recommend_explain` and `prerank`, and its reads (item vectors,
//! item feature rows) serve `train_prerank`, so training sees the inputs serving sees.
//!
//! A channel kind's glue is its arm in [`SpiSources::channel`] (its hits) and in
//! [`check_channel`] (what it names), both here.

use crate::infra::catalog::{read_row, JsonbValue, Serving};
use crate::infra::error::{TtError, TtResult};
use crate::infra::spi;
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use rustc_hash::FxHashMap as HashMap;
use serde_json::Value;
use std::sync::Arc;
use twotower_ann::Metric;
use twotower_funnel::channel::{ChannelDef, ChannelKind, Query};
use twotower_funnel::pipeline::Definition;
use twotower_funnel::{Hit, Sources};
use twotower_tower::{Model, Part, Source};

/// The most rows a function channel is asked for.
const MAX_FUNCTION_ROWS: usize = 100_000;

/// A relation named at `path` of the definition, or 22023 naming the path.
pub fn relation(path: &str, name: &str) -> TtResult<pg_sys::Oid> {
    spi::regclass(name).ok_or_else(|| TtError::BadPipeline {
        path: path.to_owned(),
        reason: format!("relation \"{name}\" does not exist"),
    })
}

/// SPI-backed sources of one request through pipeline `d`.
pub struct SpiSources<'a> {
    pub d: &'a Definition,
    /// The user tower's metric (a two-tower channel's index must order by it).
    pub metric: Metric,
    /// Per stage, the cache key of its model's item parts (the model version's checksum).
    pub keys: Vec<u64>,
}

impl SpiSources<'_> {
    /// Whether a search of index `ix` can hand over its hits' vectors: the index is on the
    /// pipeline's vectors column of its vectors table, whose id column is the table's primary
    /// key (the item id a search returns).
    fn index_holds_vectors(&self, ix: pg_sys::Oid) -> TtResult<bool> {
        let Some((table, column)) = crate::am::search::indexed_column(ix) else {
            return Ok(false);
        };
        Ok(column == self.d.vectors.vector_column
            && spi::regclass(&self.d.vectors.table) == Some(table)
            && crate::am::search::primary_key_column(table)?.as_deref()
                == Some(self.d.vectors.id_column.as_str()))
    }
}

impl Sources for SpiSources<'_> {
    type Error = TtError;

    fn channel(&mut self, at: usize, c: &ChannelDef, q: &Query) -> TtResult<Vec<Hit>> {
        match &c.kind {
            ChannelKind::TwoTower { index, ef_search } => {
                let ix = relation(&format!("channels[{at}].index"), index)?;
                let hand = self.index_holds_vectors(ix)?;
                Ok(crate::serve::search::search(
                    ix,
                    q.user,
                    self.metric,
                    q.k,
                    q.exclude,
                    ef_search.unwrap_or(0),
                    hand,
                )?
                .into_iter()
                .map(|(item, score, vector)| Hit {
                    item,
                    score,
                    vector,
                })
                .collect())
            }
            ChannelKind::I2i { channel, .. } => {
                let ex: Vec<i64> = q.exclude.iter().copied().collect();
                Ok(
                    crate::serve::neighbors::i2i_hits(channel, q.seeds, q.k, &ex)?
                        .into_iter()
                        .map(|x| Hit {
                            item: x.item,
                            score: x.score,
                            vector: None,
                        })
                        .collect(),
                )
            }
            ChannelKind::Function { function, .. } => {
                function_hits(&format!("channels[{at}].function"), function, q)
            }
        }
    }

    fn vectors(&mut self, ids: &[i64]) -> TtResult<HashMap<i64, Arc<[f32]>>> {
        vectors(self.d, ids)
    }

    fn item_parts(
        &mut self,
        stage: usize,
        model: &Model,
        items: &[i64],
    ) -> TtResult<Vec<Arc<Part>>> {
        item_parts(
            self.d,
            self.keys.get(stage).copied().unwrap_or(0),
            model,
            items,
        )
    }

    fn attributes(
        &mut self,
        ids: &[i64],
        columns: &[String],
    ) -> TtResult<Vec<Arc<serde_json::Map<String, Value>>>> {
        let Some(f) = &self.d.item_features else {
            return Err(TtError::BadPipeline {
                path: "item_features".into(),
                reason: "a rerank rule reads item columns: the pipeline needs item_features".into(),
            });
        };
        let rel = relation("item_features.table", &f.table)?;
        let cols: Vec<&str> = columns.iter().map(String::as_str).collect();
        // Through the hot-item cache when the table has its trigger (rows without a row in
        // the table are cached as empty objects: an insert invalidates them like any change).
        let cached = crate::serve::item_cache::usable(rel);
        let mut key_cols = vec![f.id_column.as_str()];
        key_cols.extend(cols.iter().copied());
        let source = crate::serve::item_cache::source(&key_cols, 0);
        let (mut hits, misses) = if cached {
            crate::serve::item_cache::attributes(rel, source, ids)
        } else {
            (HashMap::default(), ids.to_vec())
        };
        if !misses.is_empty() {
            let mut rows = item_rows(rel, &f.id_column, &cols, &misses)?;
            let fresh: HashMap<i64, Arc<serde_json::Map<String, Value>>> = misses
                .iter()
                .map(|i| {
                    let m = match rows.remove(i) {
                        Some(Value::Object(m)) => m,
                        _ => serde_json::Map::new(),
                    };
                    (*i, Arc::new(m))
                })
                .collect();
            if cached {
                crate::serve::item_cache::put_attributes(
                    rel,
                    source,
                    fresh.iter().map(|(i, a)| (*i, a)),
                );
            }
            hits.extend(fresh);
        }
        Ok(ids
            .iter()
            .map(|i| hits.get(i).cloned().unwrap_or_default())
            .collect())
    }

    fn poll(&mut self) -> TtResult<()> {
        check_for_interrupts!();
        Ok(())
    }

    fn threads(&self) -> usize {
        crate::infra::gucs::inference_threads()
    }
}

/// Whether channel `c` (at `path` of definition `d`, whose user tower is `user`) can run: what
/// it names exists and fits.
pub fn check_channel(path: &str, c: &ChannelDef, d: &Definition, user: &Serving) -> TtResult<()> {
    let bad = |key: &str, reason: String| TtError::BadPipeline {
        path: format!("{path}.{key}"),
        reason,
    };
    match &c.kind {
        ChannelKind::TwoTower { index, ef_search } => {
            let dims = user.model.output_dim();
            let ix = relation(&format!("{path}.index"), index)?;
            if ef_search.is_some() && crate::infra::citus::is_citus_index(ix)? {
                return Err(bad(
                    "ef_search",
                    "cannot reach the shards of a Citus table: set twotower.ef_search on them (docs/scale-out.md)".into(),
                ));
            }
            // The index of a table, or of each leaf of a partitioned table; of a Citus table
            // (a shell on this node), its metric.
            let fits = if crate::infra::citus::is_citus_index(ix)? {
                crate::am::search::index_metric(ix, "a pipeline")? == user.model.metric()
            } else {
                crate::am::search::Target::open_all(ix, "a pipeline")?
                    .into_iter()
                    .fold(true, |ok, t| {
                        let fit = t.metric() == user.model.metric()
                            && t.dims().is_none_or(|n| n == dims);
                        t.close();
                        ok && fit
                    })
            };
            if !fits {
                return Err(bad(
                    "index",
                    format!(
                        "the index does not fit model \"{}\" ({} vectors of {dims} dimensions)",
                        d.user_model,
                        user.model.metric().spec_name()
                    ),
                ));
            }
        }
        ChannelKind::I2i { channel, .. } => {
            if crate::serve::neighbors::find(channel)?.is_none() {
                return Err(TtError::UnknownChannel(channel.clone()));
            }
        }
        ChannelKind::Function { function, .. } => match resolve_function(function)? {
            None => {
                return Err(bad(
                    "function",
                    format!("function {function}(jsonb, integer) does not exist"),
                ))
            }
            Some((_, q, false)) => return Err(bad(
                "function",
                format!("function {q}(jsonb, integer) must return a set of rows with columns item_id and score (RETURNS TABLE (item_id bigint, score real))"),
            )),
            Some(_) => {}
        },
    }
    Ok(())
}

/// The function of a function channel: `name(jsonb, integer)`, resolved with the current
/// search path (or as qualified); its oid, its schema-qualified quoted name, and whether it
/// returns rows with `item_id` and `score` columns. `save_pipeline` stores the qualified name,
/// so a call resolves the function the saver checked, whatever the caller's search path.
pub fn resolve_function(name: &str) -> TtResult<Option<(pg_sys::Oid, String, bool)>> {
    let row = read_row::<pg_sys::Oid, String>(
        "SELECT p.oid, pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(p.proname)
           FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
          WHERE p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure($1)",
        &[format!("{name}(pg_catalog.jsonb, pg_catalog.int4)").into()],
    )
    .map_err(|e| TtError::BadArgument(format!("function \"{name}\": {e}")))?;
    let Some((Some(oid), Some(qualified))) = row else {
        return Ok(None);
    };
    // It returns rows with item_id and score columns.
    let shape = read_row::<bool, bool>(
        "SELECT p.proretset,
                p.proargnames IS NOT NULL AND 'item_id' OPERATOR(pg_catalog.=) ANY (p.proargnames)
                  AND 'score' OPERATOR(pg_catalog.=) ANY (p.proargnames)
           FROM pg_catalog.pg_proc p WHERE p.oid OPERATOR(pg_catalog.=) $1",
        &[oid.into()],
    )
    .map_err(|e| TtError::BadArgument(format!("function \"{name}\": {e}")))?;
    let fits = matches!(shape, Some((Some(true), Some(true))));
    Ok(Some((oid, qualified, fits)))
}

/// A function channel's hits: `f(features, k')` called as the caller, where k' leaves room for
/// the excluded items; rows by score (higher first, ties by item id), rows with a NULL item id
/// or score left out, excluded items left out, at most `q.k`.
fn function_hits(path: &str, name: &str, q: &Query) -> TtResult<Vec<Hit>> {
    let Some((_, qualified, _)) = resolve_function(name)? else {
        return Err(TtError::BadPipeline {
            path: path.into(),
            reason: format!("function {name}(jsonb, integer) does not exist"),
        });
    };
    let asked = (q.k + q.exclude.len()).min(MAX_FUNCTION_ROWS) as i32;
    let mut rows: Vec<(i64, f32)> = Vec::new();
    Spi::connect(|c| {
        let t = c.select(
            &format!(
                "SELECT r.item_id::pg_catalog.int8, r.score::pg_catalog.float4 FROM {qualified}($1::pg_catalog.jsonb, $2) AS r"
            ),
            // At most this many rows are held, whatever the function returns.
            Some(MAX_FUNCTION_ROWS as _),
            &[pgrx::JsonB(q.features.clone()).into(), asked.into()],
        )?;
        for r in t {
            if let (Some(i), Some(s)) = (r.get::<i64>(1)?, r.get::<f32>(2)?) {
                rows.push((i, s));
            }
        }
        Ok::<_, pgrx::spi::Error>(())
    })
    .map_err(|e| TtError::BadArgument(format!("calling {qualified}: {e}")))?;
    if let Some((i, s)) = rows.iter().find(|(_, s)| !s.is_finite()) {
        return Err(TtError::OutOfRange(format!(
            "function {qualified} gave item {i} the score {s}: scores must be finite"
        )));
    }
    rows.retain(|(i, _)| !q.exclude.contains(i));
    rows.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // An item the function returned more than once counts once, at its best score.
    let mut seen = rustc_hash::FxHashSet::default();
    rows.retain(|r| seen.insert(r.0));
    rows.truncate(q.k);
    Ok(rows
        .into_iter()
        .map(|(item, score)| Hit {
            item,
            score,
            vector: None,
        })
        .collect())
}

/// Item vectors of `ids` from the pipeline's vectors table (read as the caller): the ones
/// with a finite vector, by id.
pub fn vectors(d: &Definition, ids: &[i64]) -> TtResult<HashMap<i64, Arc<[f32]>>> {
    if ids.is_empty() {
        return Ok(HashMap::default());
    }
    let rel = relation("vectors.table", &d.vectors.table)?;
    let cached = crate::serve::item_cache::usable(rel);
    let source = crate::serve::item_cache::source(
        &[
            d.vectors.id_column.as_str(),
            d.vectors.vector_column.as_str(),
        ],
        0,
    );
    let (mut hits, ids) = if cached {
        crate::serve::item_cache::vectors(rel, source, ids)
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
        crate::serve::item_cache::put_vectors(rel, source, out.iter().map(|(i, v)| (*i, v)));
    }
    hits.extend(out);
    Ok(hits)
}

/// Item-side parts of `model` for `items`, from the item features table (only the columns the
/// model reads; an item without a row gets every feature's missing value).
fn item_parts(
    d: &Definition,
    model_key: u64,
    model: &Model,
    items: &[i64],
) -> TtResult<Vec<Arc<Part>>> {
    let cols: Vec<&str> = model
        .sources()
        .filter(|(_, s)| *s == Source::Item)
        .map(|(n, _)| n)
        .collect();
    let empty = Value::Object(Default::default());
    let encode = |id: i64, v: &Value| -> TtResult<Arc<Part>> {
        model
            .encode_part(v, Source::Item, false)
            .map(Arc::new)
            .map_err(|error| TtError::Item { id, error })
    };
    let (Some(f), false) = (&d.item_features, cols.is_empty()) else {
        return items.iter().map(|&i| encode(i, &empty)).collect();
    };
    let rel = relation("item_features.table", &f.table)?;
    let cached = crate::serve::item_cache::usable(rel);
    let source = crate::serve::item_cache::source(&[f.id_column.as_str()], model_key);
    let (hits, misses) = if cached {
        crate::serve::item_cache::parts(rel, source, items)
    } else {
        (vec![None; items.len()], items.to_vec())
    };
    let mut fresh: HashMap<i64, Arc<Part>> = HashMap::default();
    if !misses.is_empty() {
        let rows = item_rows(rel, &f.id_column, &cols, &misses)?;
        fresh.reserve(misses.len());
        for i in &misses {
            fresh.insert(*i, encode(*i, rows.get(i).unwrap_or(&empty))?);
        }
        if cached {
            // Items without a row are cached too (as every feature's missing value): an insert
            // of their row invalidates the cache like any change.
            crate::serve::item_cache::put_parts(rel, source, fresh.iter().map(|(i, p)| (*i, p)));
        }
    }
    items
        .iter()
        .zip(hits)
        .map(|(i, hit)| match hit.or_else(|| fresh.get(i).cloned()) {
            Some(p) => Ok(p),
            // Every item was read or found in the cache; an empty part if not.
            None => encode(*i, &empty),
        })
        .collect()
}

/// Rows of item feature table `rel` for `ids` (read as the caller) as JSON objects of the
/// `cols` that exist, by id; ids without a row are absent.
pub fn item_rows(
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
    let mut texts: Vec<(i64, JsonbValue)> = Vec::with_capacity(ids.len());
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
            if let (Some(i), Some(v)) = (r.get::<i64>(1)?, r.get::<JsonbValue>(2)?) {
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
