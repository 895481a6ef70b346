//! Argument types: jsonb read as text (so that a value serde cannot hold is an error, not a
//! panic), regclass, regrole.

use crate::infra::error::{TtError, TtResult};
use pgrx::pg_sys;
use pgrx::{FromDatum, IntoDatum};
use twotower_tower::Model;

/// A `jsonb` argument as text, parsed when it is used: [`JsonbValue::value`] parses all of it
/// (a spec), [`JsonbValue::features`] only the keys that are features of a model (an item row
/// from `to_jsonb(row)` may carry other columns of any depth). What serde cannot represent (a
/// number beyond double precision, nesting past 128 levels) is an ERROR naming the argument
/// and the cause, not a panic.
pub struct JsonbValue {
    text: String,
}

impl JsonbValue {
    /// The value as JSON text.
    pub fn text(&self) -> &str {
        &self.text
    }

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

    /// The top-level key `key` of an object, parsing only that key's value (the rest may be
    /// nested too deeply to parse whole); None when absent. Not an object: the whole value's error.
    pub fn key(&self, key: &str, what: &'static str) -> TtResult<Option<serde_json::Value>> {
        let Ok(top) = serde_json::from_str::<
            std::collections::BTreeMap<String, &serde_json::value::RawValue>,
        >(&self.text) else {
            return self.value(what).map(|v| v.get(key).cloned());
        };
        top.get(key)
            .map(|raw| serde_json::from_str(raw.get()).map_err(|e| Self::bad(what, e)))
            .transpose()
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
