//! Who the caller is and what roles it has.

use crate::infra::error::{TtError, TtResult};
use pgrx::pg_sys;

/// The role whose members may import, activate and drop every model.
pub const ADMIN_ROLE: &str = "twotower_admin";

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
