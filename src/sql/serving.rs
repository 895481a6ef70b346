//! SQL surface of serving in production: the impression log that `recommend(...,
//! request_id => ...)` writes (one row a list, in `twotower.impression_log`), `feedback` against
//! a logged list, and `variant_of` (a split's assignment, as `recommend` makes it). The split
//! itself is saved with `save_pipeline` and assigned by the funnel core (`twotower_funnel::split`);
//! the metrics over the log are SQL (`twotower.online_metrics`, sql/pg_twotower.sql).

use crate::infra::catalog::{as_catalog_owner, caller, is_admin, JsonbValue};
use crate::infra::error::{TtError, TtResult};
use crate::infra::gucs;
use crate::sql::pipeline::twotower::Served;
use pgrx::prelude::*;
use twotower_funnel::Ranked;

/// The longest request id (bytes).
pub const MAX_REQUEST_ID: usize = 200;
/// The longest feedback kind.
const MAX_KIND: usize = 32;
/// The most feedback kinds one item of one list takes.
const MAX_KINDS_PER_ITEM: i64 = 16;

/// The log's INSERT: one row, or none when the request id is logged already (counted).
const LOG_INSERT_SQL: &str = "WITH logged AS (
     INSERT INTO twotower.impression_log
            (request_id, logged_by, pipeline, variant, served_by, unit, features,
             items, scores, channels, channel_ranks)
     VALUES ($1, $2, $3, $4, $5, $6,
             CASE WHEN $12 IS NULL THEN $7::pg_catalog.jsonb
                  ELSE $7::pg_catalog.jsonb OPERATOR(pg_catalog.-) $12 END,
             $8, $9, $10, $11)
     ON CONFLICT (logged_by, request_id) DO NOTHING
     RETURNING 1)
 SELECT pg_catalog.count(*) FROM logged";

thread_local! {
    /// The log's INSERT, planned once per backend (the plan cache re-plans it after DDL on
    /// the table). Never freed: a backend keeps it until it exits.
    static LOG_INSERT: std::cell::RefCell<Option<std::mem::ManuallyDrop<pgrx::spi::OwnedPreparedStatement>>> =
        const { std::cell::RefCell::new(None) };
}

/// Plans the log's INSERT once (as the catalogue's owner, with its search path).
fn insert_plan() -> Result<(), pgrx::spi::Error> {
    if LOG_INSERT.with(|p| p.borrow().is_some()) {
        return Ok(());
    }
    use pgrx::pg_sys::{FLOAT4ARRAYOID, INT4ARRAYOID, INT8ARRAYOID, OIDOID, TEXTARRAYOID, TEXTOID};
    let plan = crate::infra::spi::prepare(
        LOG_INSERT_SQL,
        &[
            TEXTOID,
            OIDOID,
            TEXTOID,
            TEXTOID,
            TEXTOID,
            TEXTOID,
            TEXTOID,
            INT8ARRAYOID,
            FLOAT4ARRAYOID,
            TEXTARRAYOID,
            INT4ARRAYOID,
            TEXTOID,
        ],
    )?;
    LOG_INSERT.with(|p| *p.borrow_mut() = Some(std::mem::ManuallyDrop::new(plan)));
    Ok(())
}

/// The log can be written: not in a read-only transaction, nor on a standby (whose
/// transactions are read-only too).
fn writable() -> TtResult<()> {
    // SAFETY: reads of backend globals.
    if unsafe { pg_sys::XactReadOnly || pg_sys::RecoveryInProgress() } {
        return Err(TtError::ReadOnlyLog);
    }
    Ok(())
}

pub fn check_request_id(id: &str) -> TtResult<()> {
    if id.is_empty() || id.len() > MAX_REQUEST_ID {
        return Err(TtError::BadArgument(format!(
            "a request id must be 1 to {MAX_REQUEST_ID} bytes long, not {}",
            id.len()
        )));
    }
    Ok(())
}

/// Writes one recommend call's list to the impression log (unless `twotower.log_impressions`
/// is off): one row with the list's first `twotower.log_max_items` items, their scores and
/// channel ranks, the request's features (without a split's unit key, which is in `unit`;
/// NULL beyond `twotower.log_max_feature_bytes`) and who logged it. One INSERT, no triggers;
/// refused in a read-only transaction (a standby).
pub(crate) fn log_impressions(
    request_id: &str,
    called: &str,
    served: &Served,
    features: &JsonbValue,
    rows: &[Ranked],
) -> TtResult<()> {
    if !gucs::LOG_IMPRESSIONS.get() {
        return Ok(());
    }
    writable()?;
    let n = rows.len().min(gucs::LOG_MAX_ITEMS.get().max(0) as usize);
    let rows = &rows[..n];
    let nc = served.channels.len();
    let mut channel_ranks = vec![0i32; n * nc];
    for (i, r) in rows.iter().enumerate() {
        for (name, rank) in r.channels.iter().zip(&r.ranks) {
            if let Some(c) = served.channels.iter().position(|x| x == name) {
                channel_ranks[i * nc + c] = *rank;
            }
        }
    }
    let items: Vec<i64> = rows.iter().map(|r| r.item).collect();
    let scores: Vec<f32> = rows.iter().map(|r| r.score).collect();
    let (variant, unit) = match &served.variant {
        Some((v, u, _)) => (Some(v.as_str()), Some(u.as_str())),
        None => (None, None),
    };
    let me = caller();
    let logged = as_catalog_owner(|| {
        insert_plan()?;
        LOG_INSERT.with(|p| {
            let p = p.borrow();
            let plan = p.as_ref().expect("prepared above");
            Spi::connect_mut(|c| {
                c.update(
                    &**plan,
                    None,
                    &[
                        request_id.into(),
                        me.into(),
                        called.into(),
                        variant.into(),
                        served.pipeline.as_str().into(),
                        unit.into(),
                        (features.text().len()
                            <= gucs::LOG_MAX_FEATURE_BYTES.get().max(0) as usize)
                            .then(|| features.text())
                            .into(),
                        items.into(),
                        scores.into(),
                        served.channels.clone().into(),
                        channel_ranks.into(),
                        served.stripped.as_deref().into(),
                    ],
                )?
                .first()
                .get_one::<i64>()
            })
        })
    })?
    .map_err(|e| TtError::Catalog(format!("writing the impression log: {e}")))?;
    match logged {
        Some(1) => Ok(()),
        _ => Err(TtError::DuplicateRequest(request_id.to_owned())),
    }
}

#[pg_schema]
pub mod twotower {
    use super::*;
    use crate::infra::error::{required, OrReport};
    use crate::serve::pipelines::{load_stored, Stored};

    /// Records feedback on an item of a logged list (on the primary): `kind` (click, like, dislike, dwell, or
    /// any lower-case name) with an optional `value` (e.g. dwell seconds). Only the role that
    /// logged the list (or twotower_admin) records feedback on it; the item must have been in
    /// the list. One row per (list, item, kind) in `twotower.feedback_log` (recorded again:
    /// the value and time are replaced), at most 16 kinds per item.
    #[pg_extern(volatile, parallel_unsafe)]
    fn feedback(
        request_id: Option<&str>,
        item_id: Option<i64>,
        kind: default!(Option<&str>, "'click'"),
        value: default!(Option<f32>, "NULL"),
    ) {
        let (request_id, item_id, kind) = (
            required(request_id, "request_id"),
            required(item_id, "item_id"),
            required(kind, "kind"),
        );
        check_request_id(request_id).or_report();
        writable().or_report();
        let ok_kind = !kind.is_empty()
            && kind.len() <= MAX_KIND
            && kind.starts_with(|c: char| c.is_ascii_lowercase())
            && kind
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok_kind {
            TtError::BadArgument(format!(
                "feedback kind \"{kind}\" is not a lower-case name of at most {MAX_KIND} letters, digits and '_' (click, like, dislike, dwell, ...)"
            ))
            .report();
        }
        if let Some(v) = value {
            if !v.is_finite() {
                TtError::OutOfRange(format!("feedback value {v} is not finite")).report();
            }
        }
        let me = caller();
        // The caller's own list; for twotower_admin, the one list under this id whoever
        // logged it. Another role's list reads as no list at all: feedback reveals nothing.
        let admin = is_admin(me);
        let found = as_catalog_owner(|| {
            Spi::connect(|c| {
                c.select(
                    "SELECT logged_by, $2 = ANY (items) FROM twotower.impression_log
                      WHERE request_id = $1 AND ($3 OR logged_by = $4)
                      ORDER BY logged_by = $4 DESC LIMIT 2",
                    None,
                    &[request_id.into(), item_id.into(), admin.into(), me.into()],
                )?
                .map(|r| Ok::<_, pgrx::spi::Error>((r.get::<pg_sys::Oid>(1)?, r.get::<bool>(2)?)))
                .collect::<Result<Vec<_>, _>>()
            })
        })
        .or_report()
        .map_err(|e| TtError::Catalog(format!("reading the impression log: {e}")))
        .or_report();
        let (by, shown) = match found.as_slice() {
            [(Some(by), Some(shown)), ..] if *by == me => (*by, *shown),
            [(Some(by), Some(shown))] => (*by, *shown),
            [] => TtError::UnknownRequest(request_id.to_owned()).report(),
            _ => TtError::BadArgument(format!(
                "request id \"{request_id}\" was logged by several roles; record its feedback as the role that logged it"
            ))
            .report(),
        };
        if !shown {
            TtError::BadArgument(format!(
                "item {item_id} is not in the list logged under request id \"{request_id}\""
            ))
            .report();
        }
        let kinds = as_catalog_owner(|| {
            Spi::get_one_with_args::<i64>(
                "SELECT pg_catalog.count(*) FROM twotower.feedback_log
                  WHERE logged_by = $1 AND request_id = $2 AND item_id = $3 AND kind <> $4",
                &[by.into(), request_id.into(), item_id.into(), kind.into()],
            )
        })
        .or_report()
        .map_err(|e| TtError::Catalog(format!("reading the feedback log: {e}")))
        .or_report()
        .unwrap_or(0);
        if kinds >= MAX_KINDS_PER_ITEM {
            TtError::BadArgument(format!(
                "item {item_id} of request \"{request_id}\" has feedback of {kinds} kinds already; at most {MAX_KINDS_PER_ITEM}"
            ))
            .report();
        }
        // One row per (list, item, kind): recorded again, the value and time are replaced.
        as_catalog_owner(|| {
            Spi::run_with_args(
                "INSERT INTO twotower.feedback_log (logged_by, request_id, item_id, kind, value, recorded_by)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (logged_by, request_id, item_id, kind)
                 DO UPDATE SET value = EXCLUDED.value, recorded_at = pg_catalog.now(), recorded_by = EXCLUDED.recorded_by",
                &[
                    by.into(),
                    request_id.into(),
                    item_id.into(),
                    kind.into(),
                    value.into(),
                    me.into(),
                ],
            )
        })
        .or_report()
        .map_err(|e| TtError::Catalog(format!("writing the feedback log: {e}")))
        .or_report();
    }

    /// The variant split `split` assigns to unit `unit` (e.g. a user id), as `recommend` does:
    /// the variant, its pipeline, and the unit's bucket (0 to 9999).
    #[pg_extern(stable, parallel_restricted, strict)]
    fn variant_of(
        split: &str,
        unit: &str,
    ) -> TableIterator<
        'static,
        (
            name!(variant, String),
            name!(pipeline, String),
            name!(bucket, i32),
        ),
    > {
        let sp = match load_stored(split).or_report() {
            Stored::Split(sp) => sp,
            Stored::Pipeline(_) => TtError::BadArgument(format!(
                "\"{split}\" is a pipeline, not a split of variants"
            ))
            .report(),
        };
        if unit.len() > twotower_funnel::split::MAX_UNIT_BYTES {
            TtError::BadArgument(format!(
                "a unit is at most {} bytes long",
                twotower_funnel::split::MAX_UNIT_BYTES
            ))
            .report();
        }
        let v = sp.variant_of(unit);
        TableIterator::once((v.name.clone(), v.pipeline.clone(), sp.bucket(unit) as i32))
    }
}
