//! Owners of models, pipelines and channels (owner objects) and model names.

use super::access::*;
use super::privileges::*;
use crate::infra::error::{TtError, TtResult};
use pgrx::pg_sys;
use pgrx::prelude::*;

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

pub(super) fn owner_query(name: &str, lock: bool) -> TtResult<Option<pg_sys::Oid>> {
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
pub(super) const LARGE_OBJECT_CLASS: pg_sys::Oid = pg_sys::Oid::from_u32(2613);

pub(super) fn extension_oid() -> pg_sys::Oid {
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
