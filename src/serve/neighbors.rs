//! The item-to-item channels as the serving path reads them: a channel's catalogue row and its
//! neighbour table, turned into hits for a history (`i2i_recall` and the pipelines' i2i
//! channels). Building and refreshing channels is the SQL surface's (`sql/channels.rs`).

use crate::infra::catalog::as_catalog_owner;
use crate::infra::error::{TtError, TtResult};
use crate::infra::spi;
use pgrx::pg_sys;
use pgrx::prelude::*;
use twotower_cf::Kind;

/// What the catalogue holds of a channel.
pub struct Channel {
    pub kind: Kind,
    pub neighbors: pg_sys::Oid,
    pub interactions: pg_sys::Oid,
    pub user_column: String,
    pub item_column: String,
    pub time_column: String,
    pub weight_column: Option<String>,
    pub options: serde_json::Value,
    pub watermark: Option<f64>,
}

pub fn find(name: &str) -> TtResult<Option<Channel>> {
    let row = as_catalog_owner(|| {
        Spi::connect(|c| {
            let t = c.select(
                "SELECT kind, neighbors::pg_catalog.oid, interactions::pg_catalog.oid, user_column, item_column,
                        time_column, weight_column, options, watermark
                   FROM twotower.channel WHERE name = $1",
                Some(1),
                &[name.into()],
            )?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok::<_, pgrx::spi::Error>(Some((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                r.get::<pg_sys::Oid>(3)?.unwrap_or(pg_sys::InvalidOid),
                r.get::<String>(4)?.unwrap_or_default(),
                r.get::<String>(5)?.unwrap_or_default(),
                r.get::<String>(6)?.unwrap_or_default(),
                r.get::<String>(7)?,
                r.get::<pgrx::JsonB>(8)?.map(|j| j.0).unwrap_or(serde_json::Value::Null),
                r.get::<f64>(9)?,
            )))
        })
    })?
    .map_err(|e| TtError::Catalog(format!("reading the channel catalogue: {e}")))?;
    let Some((
        kind,
        neighbors,
        interactions,
        user_column,
        item_column,
        time_column,
        weight_column,
        options,
        watermark,
    )) = row
    else {
        return Ok(None);
    };
    Ok(Some(Channel {
        kind: Kind::parse(&kind).map_err(TtError::Cf)?,
        neighbors,
        interactions,
        user_column,
        item_column,
        time_column,
        weight_column,
        options,
        watermark,
    }))
}

/// The i2i channel: Σ weight_h · score(h, item) over channel `channel`'s neighbours of the
/// `history` (item, weight) pairs, top `k`, leaving out history items and `exclude`. Reads
/// the neighbour table as the caller.
pub fn i2i_hits(
    channel: &str,
    history: &[(i64, f32)],
    k: usize,
    exclude: &[i64],
) -> TtResult<Vec<twotower_cf::Hit>> {
    let ch = find(channel)?.ok_or_else(|| TtError::UnknownChannel(channel.to_owned()))?;
    let table = spi::relation_name(ch.neighbors).map_err(|_| {
        TtError::BadArgument(format!(
            "the neighbour table of channel \"{channel}\" was dropped"
        ))
    })?;
    let mut nb: Vec<(i64, i64, f32)> = Vec::new();
    let ids: Vec<i64> = history.iter().map(|h| h.0).collect();
    if !ids.is_empty() {
        // One row of three arrays: a bulk conversion instead of a row-by-row one.
        Spi::connect(|c| {
            let t = c.select(
                &format!(
                    "SELECT pg_catalog.array_agg(item_id), pg_catalog.array_agg(neighbor_id), pg_catalog.array_agg(score)
                       FROM {table} WHERE item_id = ANY ($1)"
                ),
                Some(1),
                &[ids.clone().into()],
            )?;
            if let Some(r) = t.into_iter().next() {
                let a = r.get::<Vec<Option<i64>>>(1)?.unwrap_or_default();
                let b = r.get::<Vec<Option<i64>>>(2)?.unwrap_or_default();
                let s = r.get::<Vec<Option<f32>>>(3)?.unwrap_or_default();
                nb.reserve(a.len());
                for ((a, b), s) in a.into_iter().zip(b).zip(s) {
                    if let (Some(a), Some(b), Some(s)) = (a, b, s) {
                        nb.push((a, b, s));
                    }
                }
            }
            Ok::<_, pgrx::spi::Error>(())
        })
        .map_err(|e| TtError::BadArgument(format!("reading {table}: {e}")))?;
    }
    twotower_cf::i2i(history, &nb, k, exclude).map_err(TtError::Cf)
}
