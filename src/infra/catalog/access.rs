//! The catalogue read and written as its owner, with the search path pinned.

use crate::infra::error::{TtError, TtResult};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum};
use std::cell::Cell;

thread_local! {
    /// The catalogue table's oid, once seen (for the model cache's relcache callback).
    pub(super) static MODEL_TABLE: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

pub(super) fn catalog_oid() -> pg_sys::Oid {
    // SAFETY: a namespace-qualified lookup; missing_ok semantics via InvalidOid.
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"twotower".as_ptr(), true);
        if ns == pg_sys::InvalidOid {
            return pg_sys::InvalidOid;
        }
        pg_sys::get_relname_relid(c"model_version".as_ptr(), ns)
    }
}

pub(super) fn catalog_owner(rel: pg_sys::Oid) -> TtResult<pg_sys::Oid> {
    // SAFETY: RelationIdGetRelation returns NULL for a missing relation; the reference is
    // released right after reading the owner.
    unsafe {
        let r = pg_sys::RelationIdGetRelation(rel);
        if r.is_null() {
            return Err(TtError::Damaged(
                "the pg_twotower model catalogue is missing".into(),
            ));
        }
        let owner = (*(*r).rd_rel).relowner;
        pg_sys::RelationClose(r);
        Ok(owner)
    }
}

/// The catalogue layout this library reads and writes.
pub(super) const SCHEMA_VERSION: &str = env!("CARGO_PKG_VERSION");

thread_local! {
    /// The (local transaction, command) in which the layout was last found to be this
    /// library's. An update of the extension is a command of its own (the command counter
    /// moves on, also past a rolled-back savepoint), so the calls of one statement check once.
    static LAYOUT_CHECKED_IN: std::cell::Cell<(u32, u32)> = const { std::cell::Cell::new((0, 0)) };
}

fn local_command() -> (u32, u32) {
    // SAFETY: MyProc is set for every backend before any function runs (lxid is its own
    // backend's field); the command id is the running transaction's.
    unsafe {
        (
            pg_sys::MyProc.as_ref().map_or(0, |p| p.lxid),
            pg_sys::GetCurrentCommandId(false),
        )
    }
}

/// The library is replaced before `ALTER EXTENSION … UPDATE` runs: until then the catalogue has
/// the old layout, and model functions say so instead of failing on a missing column. (The
/// index and the operators do not depend on the catalogue and keep working.)
pub(super) fn check_schema_version() -> TtResult<()> {
    // SAFETY: plain read of a backend global set while an extension script runs.
    if unsafe { pg_sys::creating_extension } {
        return Ok(());
    }
    let now = local_command();
    if now.0 != 0 && LAYOUT_CHECKED_IN.with(|c| c.get()) == now {
        return Ok(());
    }
    let installed = read_row::<String, bool>(
        "SELECT extversion, true FROM pg_catalog.pg_extension WHERE extname = 'pg_twotower'",
        &[],
    )
    .ok()
    .flatten()
    .and_then(|(v, _)| v);
    match installed {
        Some(v) if v != SCHEMA_VERSION => Err(TtError::SchemaVersion {
            installed: v,
            library: SCHEMA_VERSION,
        }),
        Some(_) => {
            LAYOUT_CHECKED_IN.with(|c| c.set(now));
            Ok(())
        }
        None => Ok(()),
    }
}

/// Runs `f` with the privileges of the catalogue's owner and `search_path = pg_catalog, pg_temp`.
/// An ERROR inside `f` is safe: transaction (or subtransaction) abort restores the user and the
/// settings, as for any function with SET clauses.
pub fn as_catalog_owner<R>(f: impl FnOnce() -> R) -> TtResult<R> {
    as_owner(true, f)
}

/// [`as_catalog_owner`] without the check that the catalogue has this library's layout: for a
/// query that reads what every layout has (the DROP EXTENSION guard's counts).
pub fn as_catalog_owner_any_layout<R>(f: impl FnOnce() -> R) -> TtResult<R> {
    as_owner(false, f)
}

pub(super) fn as_owner<R>(check_layout: bool, f: impl FnOnce() -> R) -> TtResult<R> {
    let rel = catalog_oid();
    if rel == pg_sys::InvalidOid {
        return Err(TtError::Damaged(
            "the pg_twotower model catalogue is missing".into(),
        ));
    }
    MODEL_TABLE.with(|t| t.set(rel));
    if check_layout {
        check_schema_version()?;
    }
    let owner = catalog_owner(rel)?;
    let mut save_uid = pg_sys::InvalidOid;
    let mut save_ctx = 0;
    // SAFETY: the GUC nest level and the user switch are undone below, or by (sub)transaction
    // abort if `f` raises an ERROR.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut save_uid, &mut save_ctx);
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        pg_sys::SetUserIdAndSecContext(
            owner,
            save_ctx
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        let r = f();
        pg_sys::SetUserIdAndSecContext(save_uid, save_ctx);
        pg_sys::AtEOXact_GUC(true, nest);
        Ok(r)
    }
}

/// The first row of a read-only query (`Spi::get_*_with_args` run read-write and would assign a
/// transaction id, which a standby refuses).
pub type Row2<A, B> = Option<(Option<A>, Option<B>)>;

pub fn read_row<A: FromDatum + IntoDatum, B: FromDatum + IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Row2<A, B>, pgrx::spi::Error> {
    Spi::connect(|c| {
        let t = c.select(sql, Some(1), args)?;
        if t.is_empty() {
            return Ok(None);
        }
        let row = t.first();
        Ok(Some((row.get::<A>(1)?, row.get::<B>(2)?)))
    })
}

/// The first row of a read-only query with three columns.
pub type Row3<A, B, C> = Option<(Option<A>, Option<B>, Option<C>)>;

pub fn read_row3<A, B, C>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Row3<A, B, C>, pgrx::spi::Error>
where
    A: FromDatum + IntoDatum,
    B: FromDatum + IntoDatum,
    C: FromDatum + IntoDatum,
{
    Spi::connect(|c| {
        let t = c.select(sql, Some(1), args)?;
        if t.is_empty() {
            return Ok(None);
        }
        let row = t.first();
        Ok(Some((row.get::<A>(1)?, row.get::<B>(2)?, row.get::<C>(3)?)))
    })
}

/// Tells every backend (at commit) that the model catalogue changed.
pub fn invalidate() {
    let rel = catalog_oid();
    if rel != pg_sys::InvalidOid {
        // SAFETY: queues a relcache invalidation of an existing relation.
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(rel) };
    }
}
