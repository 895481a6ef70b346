//! Saved pipelines as the serving path reads them: definitions parsed by the funnel core once per
//! backend (until a pipeline is saved or dropped), their models loaded, everything they name
//! checked against the database, and the pipelines that depend on a model or channel.

use crate::infra::catalog::{self, as_catalog_owner, expect_kind, JsonbValue, Serving};
use crate::infra::error::{TtError, TtResult};
use crate::infra::spi;
use crate::serve::sources::relation;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::sync::Arc;
use twotower_funnel::pipeline::{Definition, StageKind};
use twotower_funnel::prerank;
use twotower_funnel::split::Split;
use twotower_tower::{Kind, Source};

pub use twotower_funnel::pipeline::Uses;

/// The pipelines whose definitions name model or channel `name` (so dropping it would break
/// them), by name. A stored definition that no longer parses counts as using it.
pub fn pipelines_using(what: Uses, name: &str) -> TtResult<Vec<String>> {
    let rows: Vec<(String, catalog::JsonbValue)> = catalog::as_catalog_owner(|| {
        Spi::connect(|c| {
            c.select(
                "SELECT name, definition FROM twotower.pipeline ORDER BY name",
                None,
                &[],
            )?
            .map(|r| {
                Ok::<_, pgrx::spi::Error>((r.get::<String>(1)?, r.get::<catalog::JsonbValue>(2)?))
            })
            .filter_map(|r| match r {
                Ok((Some(n), Some(d))) => Some(Ok((n, d))),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<_>, _>>()
        })
    })?
    .map_err(|e| TtError::Catalog(format!("reading pipelines: {e}")))?;
    Ok(rows
        .into_iter()
        .filter(|(_, d)| {
            let v = d.value("definition").ok();
            match v {
                // A split runs its variants' pipelines, which are checked themselves.
                Some(v) if Split::is_split(&v) => false,
                v => v
                    .and_then(|v| twotower_funnel::pipeline::Definition::parse(&v).ok())
                    .is_none_or(|d| d.uses(what, name)),
            }
        })
        .map(|(n, _)| n)
        .collect())
}

/// The splits that list pipeline `name` as a variant, by name.
pub fn splits_using(name: &str) -> TtResult<Vec<String>> {
    let names: Vec<String> = catalog::as_catalog_owner(|| {
        Spi::connect(|c| {
            c.select(
                "SELECT p.name FROM twotower.pipeline p
                  WHERE p.definition ? 'variants'
                    AND EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(p.definition -> 'variants') v
                                 WHERE v ->> 'pipeline' = $1)
                  ORDER BY p.name",
                None,
                &[name.into()],
            )?
            .map(|r| r.get::<String>(1))
            .filter_map(|r| r.transpose())
            .collect::<Result<Vec<_>, _>>()
        })
    })?
    .map_err(|e| TtError::Catalog(format!("reading splits: {e}")))?;
    Ok(names)
}

/// Checks a split's variants against the database: each names a saved pipeline (not a split)
/// whose user model loads and which the caller may manage.
pub fn check_split(name: &str, s: &Split) -> TtResult<()> {
    for (i, v) in s.variants.iter().enumerate() {
        let path = format!("variants[{i}].pipeline");
        if v.pipeline == name {
            return Err(bad(&path, "a split cannot list itself"));
        }
        let d = match load_stored(&v.pipeline) {
            Ok(Stored::Pipeline(d)) => d,
            Ok(Stored::Split(_)) => {
                return Err(bad(
                    &path,
                    format!(
                        "\"{}\" is a split itself; variants are pipelines",
                        v.pipeline
                    ),
                ))
            }
            Err(TtError::UnknownPipeline(p)) => {
                return Err(bad(&path, format!("pipeline \"{p}\" does not exist")))
            }
            Err(e) => return Err(e),
        };
        // Its user model must load (the check of the pipeline itself was done when it was saved).
        user_model(&d)?;
        // Listing a pipeline keeps its owner from dropping it: only its owner (or
        // twotower_admin) may.
        let me = catalog::caller();
        if let Some(owner) = catalog::owner_of(catalog::Owned::Pipeline, &v.pipeline, false)? {
            if !catalog::may_manage(me, owner) {
                return Err(TtError::PermissionDenied {
                    action: format!("list pipeline \"{}\" in a split", v.pipeline),
                    hint: "A split may list the pipelines its saver owns (members of twotower_admin: any).".into(),
                });
            }
        }
    }
    Ok(())
}

/// Refuses to drop a model or channel that pipelines use (2BP01, naming them).
pub fn check_unused(what: Uses, name: &str) -> TtResult<()> {
    let pipelines = pipelines_using(what, name)?;
    if pipelines.is_empty() {
        return Ok(());
    }
    Err(TtError::UsedByPipelines {
        what: match what {
            Uses::Model => "model",
            Uses::Channel => "channel",
        },
        name: name.to_owned(),
        pipelines,
    })
}

pub fn bad_def(e: twotower_funnel::pipeline::DefinitionError) -> TtError {
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

/// What a name in `twotower.pipeline` stands for: a pipeline, or a split of variants (each a
/// pipeline).
#[derive(Clone)]
pub enum Stored {
    Pipeline(Arc<Definition>),
    Split(Arc<Split>),
}

thread_local! {
    /// Parsed definitions by name, valid for one catalogue generation (saving or dropping
    /// a pipeline starts a new one in every backend).
    static DEFINITIONS: RefCell<(u64, rustc_hash::FxHashMap<String, Stored>)> =
        RefCell::new((0, Default::default()));
}

/// The stored pipeline `name`; a split is refused (name one of its variants).
pub fn load(name: &str) -> TtResult<Arc<Definition>> {
    match load_stored(name)? {
        Stored::Pipeline(d) => Ok(d),
        Stored::Split(s) => Err(TtError::BadArgument(format!(
            "\"{name}\" is a split of {} variants, not a pipeline; name one of its variants' pipelines ({})",
            s.variants.len(),
            s.variants
                .iter()
                .map(|v| v.pipeline.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The stored definition of `name` (read as the catalogue's owner: the table is not
/// public), parsed once per backend until a pipeline is saved or dropped.
pub fn load_stored(name: &str) -> TtResult<Stored> {
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
    .map_err(|e| TtError::Catalog(format!("reading pipeline \"{name}\": {e}")))?
    .and_then(|(d, _)| d)
    .ok_or_else(|| TtError::UnknownPipeline(name.to_owned()))?;
    // A stored definition was checked when saved: one this library cannot parse is damaged
    // (or from a layout an update has not converted yet).
    let v = text.value("definition").map_err(|e| {
        TtError::Catalog(format!("stored pipeline \"{name}\": {}", e.message_text()))
    })?;
    let d = if Split::is_split(&v) {
        Stored::Split(Arc::new(Split::parse(&v, name).map_err(|e| {
            TtError::Catalog(format!("stored split \"{name}\" does not parse: {e}"))
        })?))
    } else {
        Stored::Pipeline(Arc::new(Definition::parse(&v).map_err(|e| {
            TtError::Catalog(format!("stored pipeline \"{name}\" does not parse: {e}"))
        })?))
    };
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

pub fn user_model(d: &Definition) -> TtResult<Serving> {
    let l = catalog::active_model(&d.user_model)?;
    expect_kind(&l, Kind::User)?;
    Ok(l)
}

pub fn stage_model(name: &str) -> TtResult<Serving> {
    let l = catalog::active_model(name)?;
    expect_kind(&l, Kind::Prerank)?;
    Ok(l)
}

/// Everything a definition names, checked against the database: the user model, the
/// tables and columns, what each channel reads (its index, neighbour table or function),
/// each stage's pre-rank model and the item features it reads. (Its shape, merge options
/// included, was checked when it was parsed.)
pub fn check(d: &Definition) -> TtResult<()> {
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
        crate::serve::sources::check_channel(&format!("channels[{i}]"), c, d, &user)?;
    }
    for (i, s) in d.stages.iter().enumerate() {
        // A rerank stage's rules read columns of the item features table (checked at parse:
        // the pipeline has one).
        if let StageKind::Rerank(rr) = &s.kind {
            if let (Some(rel), Some(f)) = (features, &d.item_features) {
                for c in rr.columns() {
                    column(&format!("stages[{i}].rules"), rel, &f.table, &c)?;
                }
            }
            continue;
        }
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
