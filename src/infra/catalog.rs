//! The model catalogue underneath the SQL surfaces: privileges, catalogue access as the
//! extension owner, and the per-backend cache of decoded models.
//!
//! The tables `twotower.model` and `twotower.model_version` are readable and writable by their
//! owner (the role that created the extension) only. Functions run as their caller
//! (no SECURITY DEFINER): they check the caller's rights themselves, then read or write the
//! catalogue as the table owner, with `search_path` pinned to `pg_catalog, pg_temp` for the
//! duration, as PostgreSQL's own maintenance commands do.

use crate::infra::error::{TtError, TtResult};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum};
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use twotower_tower::Model;

/// The role whose members may import, activate and drop every model.
pub const ADMIN_ROLE: &str = "twotower_admin";

// ---------------------------------------------------------------------------------------------
// jsonb arguments

/// A `jsonb` argument as text, parsed when it is used: [`JsonbValue::value`] parses all of it
/// (a spec), [`JsonbValue::features`] only the keys that are features of a model (an item row
/// from `to_jsonb(row)` may carry other columns of any depth). What serde cannot represent (a
/// number beyond double precision, nesting past 128 levels) is an ERROR naming the argument
/// and the cause, not a panic.
pub struct JsonbValue {
    text: String,
}

impl JsonbValue {
    fn bad(what: &'static str, e: serde_json::Error) -> TtError {
        TtError::BadJson {
            what,
            reason: e.to_string(),
        }
    }

    /// The whole value; `what` names the argument in errors ("spec", "features").
    pub fn value(&self, what: &'static str) -> TtResult<serde_json::Value> {
        serde_json::from_str(&self.text).map_err(|e| Self::bad(what, e))
    }

    /// The value for `model`: parsed whole when that works; otherwise (a key nested too deeply
    /// or a number beyond double precision somewhere) with only the keys that are features of
    /// `model` parsed, other keys kept as nulls without reading them (so an unknown key is
    /// still seen by strict encoding), and an error only if a feature's own value is at fault.
    /// Not an object: the whole value's error.
    pub fn features(&self, model: &Model, what: &'static str) -> TtResult<serde_json::Value> {
        // The usual case first: the whole value parses (one pass, as fast as before).
        if let Ok(v) = serde_json::from_str(&self.text) {
            return Ok(v);
        }
        let Ok(top) = serde_json::from_str::<
            std::collections::BTreeMap<String, &serde_json::value::RawValue>,
        >(&self.text) else {
            return self.value(what);
        };
        let names = model.feature_names();
        let mut out = serde_json::Map::with_capacity(top.len());
        for (k, raw) in top {
            let v = if names.contains(&k.as_str()) {
                serde_json::from_str(raw.get()).map_err(|e| Self::bad(what, e))?
            } else {
                serde_json::Value::Null
            };
            out.insert(k, v);
        }
        Ok(serde_json::Value::Object(out))
    }
}

impl FromDatum for JsonbValue {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: the SQL signature guarantees a jsonb datum; jsonb_out returns a palloc'd
        // NUL-terminated string.
        let text = unsafe {
            let cstr = pgrx::fcinfo::direct_function_call::<&std::ffi::CStr>(
                pg_sys::jsonb_out,
                &[Some(datum)],
            );
            cstr?
        };
        let owned = text.to_string_lossy().into_owned();
        // SAFETY: the text was palloc'd by jsonb_out and is not used after this point; the
        // copy is Rust-owned.
        unsafe { pg_sys::pfree(text.as_ptr() as *mut std::ffi::c_void) };
        Some(JsonbValue { text: owned })
    }

    /// The value is Rust-owned: convert in the current context whatever context is asked for
    /// (pgrx's SPI rows ask for the parent context, which would keep every row's text until
    /// the end of the transaction).
    unsafe fn from_datum_in_memory_context(
        _memory_context: pgrx::PgMemoryContexts,
        datum: pg_sys::Datum,
        is_null: bool,
        typoid: pg_sys::Oid,
    ) -> Option<Self> {
        // SAFETY: forwarded contract.
        unsafe { Self::from_polymorphic_datum(datum, is_null, typoid) }
    }
}

impl IntoDatum for JsonbValue {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        pgrx::JsonB(serde_json::from_str(&self.text).unwrap_or(serde_json::Value::Null))
            .into_datum()
    }
    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

/// Declares that a Rust argument type is the SQL type `$sql`.
macro_rules! sql_type {
    ($ty:ty, $sql:literal) => {
        // SAFETY: the type converts from and to datums of exactly this SQL type.
        unsafe impl pgrx::pgrx_sql_entity_graph::metadata::SqlTranslatable for $ty {
            const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!($ty);
            const TYPE_ORIGIN: pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin =
                pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin::External;
            const ARGUMENT_SQL: Result<
                pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef,
                pgrx::pgrx_sql_entity_graph::metadata::ArgumentError,
            > = Ok(pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef::literal($sql));
            const RETURN_SQL: Result<
                pgrx::pgrx_sql_entity_graph::metadata::ReturnsRef,
                pgrx::pgrx_sql_entity_graph::metadata::ReturnsError,
            > = Ok(pgrx::pgrx_sql_entity_graph::metadata::ReturnsRef::One(
                pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef::literal($sql),
            ));
        }
    };
}

/// Lets a type that converts from a datum be a `#[pg_extern]` argument.
macro_rules! arg_type {
    ($ty:ty) => {
        // SAFETY: the SQL signature declares the matching type; conversion is FromDatum's.
        unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for $ty {
            unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
                let index = arg.index();
                // SAFETY: forwarded contract.
                unsafe { arg.unbox_arg_using_from_datum() }.unwrap_or_else(|| {
                    pgrx::ereport!(
                        pgrx::PgLogLevel::ERROR,
                        pgrx::PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                        format!("argument {} must not be NULL", index + 1)
                    );
                    unreachable!("ereport(ERROR) does not return")
                })
            }
            unsafe fn unbox_nullable_arg(
                arg: pgrx::callconv::Arg<'_, 'fcx>,
            ) -> pgrx::nullable::Nullable<Self> {
                // SAFETY: forwarded contract.
                unsafe { arg.unbox_arg_using_from_datum() }.into()
            }
        }
    };
}

sql_type!(JsonbValue, "jsonb");
sql_type!(RegClass, "regclass");
sql_type!(RegRole, "regrole");
arg_type!(JsonbValue);
arg_type!(RegClass);
arg_type!(RegRole);

// SAFETY: jsonb elements of an array are valid jsonb datums.
unsafe impl pgrx::datum::UnboxDatum for JsonbValue {
    type As<'src> = JsonbValue;
    unsafe fn unbox<'src>(d: pgrx::datum::Datum<'src>) -> Self::As<'src>
    where
        Self: 'src,
    {
        // SAFETY: a non-null jsonb datum (array elements are unboxed only when not null).
        unsafe { JsonbValue::from_datum(d.sans_lifetime(), false) }.unwrap_or_else(|| {
            pgrx::ereport!(
                pgrx::PgLogLevel::ERROR,
                pgrx::PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                "a jsonb argument must not be NULL"
            );
            unreachable!("ereport(ERROR) does not return")
        })
    }
}

/// A `regclass` argument.
#[derive(Clone, Copy)]
pub struct RegClass(pub pg_sys::Oid);

impl FromDatum for RegClass {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        (!is_null).then(|| RegClass(pg_sys::Oid::from(datum.value() as u32)))
    }
}

/// A `regrole` argument.
#[derive(Clone, Copy)]
pub struct RegRole(pub pg_sys::Oid);

impl FromDatum for RegRole {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        (!is_null).then(|| RegRole(pg_sys::Oid::from(datum.value() as u32)))
    }
}

impl IntoDatum for RegRole {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(pg_sys::Datum::from(self.0))
    }
    fn type_oid() -> pg_sys::Oid {
        pg_sys::REGROLEOID
    }
}

impl IntoDatum for RegClass {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(pg_sys::Datum::from(self.0))
    }
    fn type_oid() -> pg_sys::Oid {
        pg_sys::REGCLASSOID
    }
}

// ---------------------------------------------------------------------------------------------
// privileges

/// The current user (the caller, since no pg_twotower function is SECURITY DEFINER).
pub fn caller() -> pg_sys::Oid {
    // SAFETY: plain read of the backend's current user.
    unsafe { pg_sys::GetUserId() }
}

pub fn role_oid(name: &str) -> Option<pg_sys::Oid> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: missing_ok = true returns InvalidOid instead of raising.
    let oid = unsafe { pg_sys::get_role_oid(c.as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

pub fn role_name(oid: pg_sys::Oid) -> String {
    // SAFETY: noerr = true returns NULL for a dropped role.
    let p = unsafe { pg_sys::GetUserNameFromId(oid, true) };
    if p.is_null() {
        format!("{}", oid.to_u32())
    } else {
        // SAFETY: a NUL-terminated palloc'd name.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Whether `role` has the privileges of `of` (superusers have every role's).
pub fn has_privs(role: pg_sys::Oid, of: pg_sys::Oid) -> bool {
    // SAFETY: catalogue lookups on valid role oids.
    unsafe { pg_sys::has_privs_of_role(role, of) }
}

pub fn is_admin(role: pg_sys::Oid) -> bool {
    // SAFETY: catalogue lookup.
    let superuser = unsafe { pg_sys::superuser_arg(role) };
    superuser || role_oid(ADMIN_ROLE).is_some_and(|a| has_privs(role, a))
}

/// Whether `role` may import versions of, activate, alter, export or drop a model owned by
/// `owner` (`None`: the model has no owner any more, only administrators manage it).
pub fn may_manage(role: pg_sys::Oid, owner: Option<pg_sys::Oid>) -> bool {
    is_admin(role) || owner.is_some_and(|o| has_privs(role, o))
}

pub fn check_manage(name: &str, owner: Option<pg_sys::Oid>) -> TtResult<()> {
    if may_manage(caller(), owner) {
        return Ok(());
    }
    let who = match owner {
        Some(o) => format!("the model's owner ({})", role_name(o)),
        None => "nobody (its owner was dropped)".to_string(),
    };
    Err(TtError::PermissionDenied {
        action: format!("manage model \"{name}\""),
        hint: format!("Only {who} and members of {ADMIN_ROLE} may import, activate, alter, export or drop its versions."),
    })
}

// ---------------------------------------------------------------------------------------------
// ownership
//
// A model's owner is the owner of one large object, its *owner object* (`model.owner_object`).
// PostgreSQL then does for models what it does for its own objects: the owner is a role oid with
// a shared dependency, so `DROP ROLE` is refused while the role owns models, `REASSIGN OWNED`
// hands them over, `ALTER ROLE … RENAME` is followed, and pg_dump restores the owner by oid
// (large objects keep their oids). The object also depends on the extension, so `DROP
// EXTENSION` without CASCADE is refused while models exist. It holds no data.

/// The owner of model `name`, locking the model's row: `Ok(None)` when its owner object is gone
/// (`DROP OWNED`, `lo_unlink`, a dump restored without large objects); ModelNotFound when there
/// is no such model.
pub fn model_owner(name: &str) -> TtResult<Option<pg_sys::Oid>> {
    owner_query(name, true)
}

/// The owner of model `name` (row locked), after checking that the caller may manage it.
pub fn check_manage_model(name: &str) -> TtResult<Option<pg_sys::Oid>> {
    let owner = model_owner(name)?;
    check_manage(name, owner)?;
    Ok(owner)
}

/// [`model_owner`] without the row lock, for read-only callers (also on a standby).
pub fn model_owner_readonly(name: &str) -> TtResult<Option<pg_sys::Oid>> {
    owner_query(name, false)
}

fn owner_query(name: &str, lock: bool) -> TtResult<Option<pg_sys::Oid>> {
    owner_of(Owned::Model, name, lock)?.ok_or_else(|| TtError::ModelNotFound {
        name: name.to_string(),
        version: None,
    })
}

/// The catalogues whose rows are owned through an owner object.
#[derive(Clone, Copy)]
pub enum Owned {
    Model,
    Pipeline,
}

impl Owned {
    fn table(self) -> &'static str {
        match self {
            Owned::Model => "twotower.model",
            Owned::Pipeline => "twotower.pipeline",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Owned::Model => "model",
            Owned::Pipeline => "pipeline",
        }
    }
}

/// The owner of row `name` of `what`: `None` when there is no such row, `Some(None)` when its
/// owner object is gone. With `lock`, the row is locked.
pub fn owner_of(what: Owned, name: &str, lock: bool) -> TtResult<Option<Option<pg_sys::Oid>>> {
    let sql = format!(
        "SELECT lo.lomowner FROM {} m
           LEFT JOIN pg_catalog.pg_largeobject_metadata lo ON lo.oid = m.owner_object
          WHERE m.name = $1{}",
        what.table(),
        if lock { " FOR UPDATE OF m" } else { "" }
    );
    let row = as_catalog_owner(|| {
        let read =
            |t: pgrx::spi::SpiTupleTable| -> Result<Option<Option<pg_sys::Oid>>, pgrx::spi::Error> {
                if t.is_empty() {
                    return Ok(None);
                }
                t.first().get::<pg_sys::Oid>(1).map(Some)
            };
        if lock {
            Spi::connect_mut(|c| read(c.update(&sql, Some(1), &[name.into()])?))
        } else {
            Spi::connect(|c| read(c.select(&sql, Some(1), &[name.into()])?))
        }
    })?
    .map_err(|e| TtError::Catalog(format!("reading {} \"{name}\": {e}", what.noun())))?;
    Ok(row)
}

/// `LargeObjectRelationId`: the class of large objects in object addresses (not in the
/// bindings).
const LARGE_OBJECT_CLASS: pg_sys::Oid = pg_sys::Oid::from_u32(2613);

fn extension_oid() -> pg_sys::Oid {
    // SAFETY: catalogue lookup; missing_ok returns InvalidOid.
    unsafe { pg_sys::get_extension_oid(c"pg_twotower".as_ptr(), true) }
}

/// Gives model `name` a new owner object owned by `owner`, replacing (and dropping) the old one.
/// The caller's rights are checked by the callers.
pub fn set_model_owner(name: &str, owner: pg_sys::Oid) -> TtResult<()> {
    set_owner(Owned::Model, name, owner)
}

/// Gives row `name` of `what` a new owner object owned by `owner` (see [`set_model_owner`]).
pub fn set_owner(what: Owned, name: &str, owner: pg_sys::Oid) -> TtResult<()> {
    let owner_name = role_name(owner);
    let noun = what.noun();
    let comment = format!(
        "pg_twotower: owner of {noun} \"{name}\" (holds no data; drop the {noun} with twotower.drop_{noun})"
    );
    let (lo, old) = as_catalog_owner(
        || -> Result<(pg_sys::Oid, Option<pg_sys::Oid>), pgrx::spi::Error> {
            let old = Spi::get_one_with_args::<pg_sys::Oid>(
                &format!(
                    "SELECT owner_object FROM {} WHERE name = $1 FOR UPDATE",
                    what.table()
                ),
                &[name.into()],
            )?;
            let lo = Spi::get_one::<pg_sys::Oid>("SELECT pg_catalog.lo_create(0)")?
                .expect("lo_create returns an oid");
            Spi::run(&format!(
                "ALTER LARGE OBJECT {} OWNER TO {}",
                lo.to_u32(),
                pgrx::spi::quote_identifier(&owner_name)
            ))?;
            Spi::run(&format!(
                "COMMENT ON LARGE OBJECT {} IS {}",
                lo.to_u32(),
                pgrx::spi::quote_literal(&comment)
            ))?;
            Spi::run_with_args(
                &format!(
                    "UPDATE {} SET owner_object = $2 WHERE name = $1",
                    what.table()
                ),
                &[name.into(), lo.into()],
            )?;
            Ok((lo, old))
        },
    )?
    .map_err(|e| TtError::Catalog(format!("setting the owner of {noun} \"{name}\": {e}")))?;
    let ext = extension_oid();
    // SAFETY: records a normal dependency of an existing large object on the extension, as
    // CREATE … for a built-in object would (pg_depend row, no privilege involved).
    unsafe {
        if ext != pg_sys::InvalidOid {
            let dependent = pg_sys::ObjectAddress {
                classId: LARGE_OBJECT_CLASS,
                objectId: lo,
                objectSubId: 0,
            };
            let referenced = pg_sys::ObjectAddress {
                classId: pg_sys::ExtensionRelationId,
                objectId: ext,
                objectSubId: 0,
            };
            pg_sys::recordDependencyOn(
                &dependent,
                &referenced,
                pg_sys::DependencyType::DEPENDENCY_NORMAL,
            );
        }
    }
    if let Some(old) = old {
        drop_owner_object(old);
    }
    Ok(())
}

/// Drops a model's owner object if it still exists (with its comment and dependencies).
pub fn drop_owner_object(lo: pg_sys::Oid) {
    let exists = read_row::<bool, bool>(
        "SELECT true, true FROM pg_catalog.pg_largeobject_metadata WHERE oid = $1",
        &[lo.into()],
    )
    .ok()
    .flatten()
    .is_some();
    // SAFETY: performDeletion removes the object, its shared dependency, comment and extension
    // dependency exactly as lo_unlink does (which would also check the caller owns it: the
    // caller's rights on the model were checked).
    unsafe {
        if exists {
            let object = pg_sys::ObjectAddress {
                classId: LARGE_OBJECT_CLASS,
                objectId: lo,
                objectSubId: 0,
            };
            pg_sys::performDeletion(&object, pg_sys::DropBehavior::DROP_RESTRICT, 0);
            pg_sys::CommandCounterIncrement();
        }
    }
}

pub fn check_model_name(name: &str) -> TtResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(TtError::BadModelName(name.to_string()))
    }
}

// ---------------------------------------------------------------------------------------------
// catalogue access as its owner

fn catalog_oid() -> pg_sys::Oid {
    // SAFETY: a namespace-qualified lookup; missing_ok semantics via InvalidOid.
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"twotower".as_ptr(), true);
        if ns == pg_sys::InvalidOid {
            return pg_sys::InvalidOid;
        }
        pg_sys::get_relname_relid(c"model_version".as_ptr(), ns)
    }
}

fn catalog_owner(rel: pg_sys::Oid) -> TtResult<pg_sys::Oid> {
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
const SCHEMA_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The library is replaced before `ALTER EXTENSION … UPDATE` runs: until then the catalogue has
/// the old layout, and model functions say so instead of failing on a missing column. (The
/// index and the operators do not depend on the catalogue and keep working.)
fn check_schema_version() -> TtResult<()> {
    // SAFETY: plain read of a backend global set while an extension script runs.
    if unsafe { pg_sys::creating_extension } {
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
        _ => Ok(()),
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

fn as_owner<R>(check_layout: bool, f: impl FnOnce() -> R) -> TtResult<R> {
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

// ---------------------------------------------------------------------------------------------
// the per-backend model cache

/// Bumped by the relcache callback whenever the catalogue may have changed.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    static MODEL_TABLE: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

#[pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let ours = MODEL_TABLE.with(|t| t.get());
    if relid == pg_sys::InvalidOid || ours == pg_sys::InvalidOid || relid == ours {
        GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The catalogue's generation: it changes whenever a model or pipeline may have changed, in
/// every backend (caches of parsed catalogue rows are valid for one generation).
pub fn generation() -> u64 {
    GENERATION.load(std::sync::atomic::Ordering::Relaxed)
}

/// Registers the invalidation callback (from `_PG_init`).
pub fn register() {
    // SAFETY: registering a callback once per backend, from _PG_init.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0))
    };
}

/// One decoded model version.
pub struct Loaded {
    pub name: String,
    pub version: i32,
    pub checksum: i64,
    pub model: Model,
}

#[derive(Default)]
struct Cache {
    /// The GENERATION `active` is valid for.
    generation: u64,
    /// model name -> its active version, decoded, with the model's settings.
    active: Vec<Serving>,
    /// Decoded versions, least recently used first.
    decoded: Vec<Arc<Loaded>>,
}

fn budget_bytes() -> usize {
    crate::infra::gucs::MODEL_CACHE_MB.get().max(1) as usize * 1024 * 1024
}

impl Cache {
    fn remember(&mut self, l: Arc<Loaded>) {
        self.decoded
            .retain(|d| !(d.name == l.name && d.version == l.version));
        self.decoded.push(l);
        let budget = budget_bytes();
        while self.decoded.len() > 1
            && self
                .decoded
                .iter()
                .map(|d| d.model.memory_bytes())
                .sum::<usize>()
                > budget
        {
            self.decoded.remove(0);
        }
        // A model that left is decoded (and counted) again when it is used: its serving entry
        // must not keep it alive.
        let decoded = &self.decoded;
        self.active
            .retain(|a| decoded.iter().any(|d| Arc::ptr_eq(d, &a.loaded)));
    }
    /// The serving entry of model `name`, if its version is still decoded; using it makes that
    /// version the most recently used.
    fn active_hit(&mut self, name: &str) -> Option<Serving> {
        let a = self.active.iter().position(|l| l.loaded.name == name)?;
        let Some(d) = self
            .decoded
            .iter()
            .position(|d| Arc::ptr_eq(d, &self.active[a].loaded))
        else {
            self.active.remove(a);
            return None;
        };
        let l = self.decoded.remove(d);
        self.decoded.push(l);
        Some(self.active[a].clone())
    }
    fn find(&mut self, name: &str, version: i32, checksum: i64) -> Option<Arc<Loaded>> {
        let i = self
            .decoded
            .iter()
            .position(|d| d.name == name && d.version == version && d.checksum == checksum)?;
        let l = self.decoded.remove(i);
        self.decoded.push(l.clone());
        Some(l)
    }
}

/// The active version of a model as it serves: the decoded version and the model's settings.
pub struct Serving {
    pub loaded: Arc<Loaded>,
    /// `unknown_features = 'error'`: keys that are not features are an error (else ignored).
    pub strict: bool,
    /// The model's owner object, whose large-object SELECT right is the right to run the model.
    pub owner_object: Option<pg_sys::Oid>,
}

impl std::ops::Deref for Serving {
    type Target = Loaded;
    fn deref(&self) -> &Loaded {
        &self.loaded
    }
}

impl Clone for Serving {
    fn clone(&self) -> Self {
        Serving {
            loaded: self.loaded.clone(),
            strict: self.strict,
            owner_object: self.owner_object,
        }
    }
}

impl Serving {
    /// Encodes user features under the model's `unknown_features` setting.
    pub fn encode_user(&self, features: &serde_json::Value) -> TtResult<twotower_tower::Encoded> {
        Ok(self.loaded.model.encode(features, self.strict)?)
    }

    /// The tower output for one user (a non-finite output is an error).
    pub fn embed_user(&self, features: &serde_json::Value) -> TtResult<Vec<f32>> {
        Ok(self.loaded.model.embed_with(features, self.strict)?)
    }
}

/// Whether `role` may run (embed with, recall with, serve in a pipeline) a model whose owner
/// object is `owner_object`: the SELECT right on that large object (its owner and the owner's
/// members have it; `twotower.grant_model_usage` grants it), or `twotower_admin`. A model
/// without an owner object runs for administrators only.
pub fn may_use(role: pg_sys::Oid, owner_object: Option<pg_sys::Oid>) -> bool {
    if is_admin(role) {
        return true;
    }
    let Some(lo) = owner_object else { return false };
    // SAFETY: catalogue lookups by oid; the ACL check runs only on an existing large object
    // (it raises for a missing one), with the current snapshot.
    unsafe {
        large_object_exists(lo)
            && pg_sys::pg_largeobject_aclcheck_snapshot(
                lo,
                role,
                pg_sys::ACL_SELECT as pg_sys::AclMode,
                std::ptr::null_mut(),
            ) == pg_sys::AclResult::ACLCHECK_OK
    }
}

/// Whether large object `lo` exists (PostgreSQL's `LargeObjectExists`, which pgrx does not
/// bind): one index probe of pg_largeobject_metadata.
///
/// # Safety
/// Must run in a transaction.
unsafe fn large_object_exists(lo: pg_sys::Oid) -> bool {
    // pg_largeobject_metadata and its oid index (fixed catalogue oids).
    let (metadata, metadata_oid_index) = (pg_sys::Oid::from(2995u32), pg_sys::Oid::from(2996u32));
    // SAFETY: the standard catalogue index scan with the catalogue snapshot; opened and closed
    // here (an error in between is cleaned up by abort).
    unsafe {
        let rel = pg_sys::table_open(metadata, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            1,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::Oid::from(pg_sys::F_OIDEQ),
            pg_sys::Datum::from(lo),
        );
        let scan = pg_sys::systable_beginscan(
            rel,
            metadata_oid_index,
            true,
            std::ptr::null_mut(),
            1,
            &mut key,
        );
        let found = !pg_sys::systable_getnext(scan).is_null();
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        found
    }
}

fn check_use(l: &Serving) -> TtResult<()> {
    if may_use(caller(), l.owner_object) {
        return Ok(());
    }
    Err(TtError::PermissionDenied {
        action: format!("use model \"{}\"", l.loaded.name),
        hint: "A model runs for its owner, the roles it was granted to (twotower.grant_model_usage) and members of twotower_admin.".into(),
    })
}

/// The active version of model `name`, decoded (from this backend's cache when it is current).
pub fn active_model(name: &str) -> TtResult<Serving> {
    let generation = GENERATION.load(std::sync::atomic::Ordering::Relaxed);
    let hit = CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.generation != generation {
            c.active.clear();
            c.generation = generation;
        }
        c.active_hit(name)
    });
    if let Some(l) = hit {
        check_use(&l)?;
        return Ok(l);
    }
    let head = as_catalog_owner(|| {
        Spi::connect(|c| {
            let t = c.select(
                "SELECT v.version, v.checksum, m.unknown_features OPERATOR(pg_catalog.<>) 'ignore', m.owner_object
                   FROM twotower.model m
                   JOIN twotower.model_version v ON v.model = m.name AND v.version = m.active_version
                  WHERE m.name = $1",
                Some(1),
                &[name.into()],
            )?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok::<_, pgrx::spi::Error>(Some((
                r.get::<i32>(1)?,
                r.get::<i64>(2)?,
                r.get::<bool>(3)?,
                r.get::<pg_sys::Oid>(4)?,
            )))
        })
    })?;
    let (version, checksum, strict, owner_object) = match head {
        Ok(Some((Some(v), Some(c), s, o))) => (v, c, s.unwrap_or(true), o),
        _ => {
            return Err(TtError::ModelNotFound {
                name: name.to_string(),
                version: None,
            })
        }
    };
    let l = Serving {
        loaded: load_version(name, version, checksum)?,
        strict,
        owner_object,
    };
    check_use(&l)?;
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.generation == generation {
            c.active.retain(|a| a.loaded.name != name);
            c.active.push(l.clone());
        }
    });
    Ok(l)
}

/// A given version, decoded (cached by name, version and checksum).
pub fn load_version(name: &str, version: i32, checksum: i64) -> TtResult<Arc<Loaded>> {
    if let Some(l) = CACHE.with(|c| c.borrow_mut().find(name, version, checksum)) {
        return Ok(l);
    }
    let row = as_catalog_owner(|| {
        read_row::<String, Vec<u8>>(
            "SELECT spec::text, weights FROM twotower.model_version WHERE model = $1 AND version = $2",
            &[name.into(), version.into()],
        )
    })?
    .map_err(|e| TtError::Catalog(format!("reading model \"{name}\": {e}")))?;
    let Some((Some(spec), Some(weights))) = row else {
        return Err(TtError::ModelNotFound {
            name: name.to_string(),
            version: Some(version),
        });
    };
    let model = Model::load(&spec, &weights)?;
    let l = Arc::new(Loaded {
        name: name.to_string(),
        version,
        checksum,
        model,
    });
    CACHE.with(|c| c.borrow_mut().remember(l.clone()));
    Ok(l)
}

/// Checks that a loaded model is of the wanted kind.
pub fn expect_kind(l: &Loaded, kind: twotower_tower::Kind) -> TtResult<()> {
    if l.model.kind() == kind {
        Ok(())
    } else {
        Err(TtError::ModelKind {
            name: l.name.clone(),
            expected: kind.name(),
            got: l.model.kind().name().to_string(),
        })
    }
}

/// Number of decoded models and their bytes in this backend's cache (for model_cache_info).
pub fn cache_stats() -> (i64, i64) {
    CACHE.with(|c| {
        let c = c.borrow();
        (
            c.decoded.len() as i64,
            c.decoded
                .iter()
                .map(|d| d.model.memory_bytes() as i64)
                .sum(),
        )
    })
}
