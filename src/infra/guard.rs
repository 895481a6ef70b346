//! `DROP EXTENSION pg_twotower` without CASCADE is refused while the catalogue holds models,
//! pipelines or channels, in every database: the owner objects' dependency on the extension
//! refuses it in the database where the models were made, but a restored database has no such
//! dependency (pg_restore does not recreate an extension's dependencies), and the drop would
//! delete the catalogue. An event trigger at `ddl_command_start` checks the statement itself;
//! with CASCADE it unlinks the owner objects first, so none is left behind.

use crate::infra::error::TtError;
use pgrx::pg_sys;
use pgrx::prelude::*;

crate::infra::pg_function_info_v1!(pg_finfo_twotower_drop_guard);

/// The event trigger function (declared in `sql/pg_twotower.sql`).
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotower_drop_guard(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: an event trigger is called with EventTriggerData as its context; the parse tree
    // is PostgreSQL's node for the statement, read only.
    let cascade = unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_EventTriggerData {
            return pg_sys::Datum::from(0);
        }
        let stmt = (*(ctx as *mut pg_sys::EventTriggerData)).parsetree;
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_DropStmt {
            return pg_sys::Datum::from(0);
        }
        let drop = stmt as *mut pg_sys::DropStmt;
        if (*drop).removeType != pg_sys::ObjectType::OBJECT_EXTENSION || !names_us((*drop).objects)
        {
            return pg_sys::Datum::from(0);
        }
        (*drop).behavior == pg_sys::DropBehavior::DROP_CASCADE
    };
    let held = crate::infra::catalog::as_catalog_owner_any_layout(|| {
        // The impression log exists from 0.8.0 on (a library ahead of its catalogue's update
        // must still guard the rest).
        let log = crate::infra::catalog::read_row::<bool, bool>(
            "SELECT pg_catalog.to_regclass('twotower.impression_log') IS NOT NULL, true",
            &[],
        )?
        .and_then(|(l, _)| l)
        .unwrap_or(false);
        crate::infra::catalog::read_row::<String, bool>(
            &format!(
                "SELECT pg_catalog.concat_ws(', ',
                        CASE WHEN m > 0 THEN m || ' models' END,
                        CASE WHEN p > 0 THEN p || ' pipelines' END,
                        CASE WHEN c > 0 THEN c || ' channels' END,
                        CASE WHEN i > 0 THEN i || ' logged impression lists' END), true
                   FROM (SELECT (SELECT pg_catalog.count(*) FROM twotower.model) AS m,
                                (SELECT pg_catalog.count(*) FROM twotower.pipeline) AS p,
                                (SELECT pg_catalog.count(*) FROM twotower.channel) AS c,
                                {} AS i) AS x",
                if log {
                    "(SELECT pg_catalog.count(*) FROM twotower.impression_log)"
                } else {
                    "0"
                }
            ),
            &[],
        )
    });
    // Fails closed: a catalogue that cannot be counted refuses a plain DROP (CASCADE says the
    // definitions may go).
    let held = match held {
        Ok(Ok(Some((Some(h), _)))) if !h.is_empty() => h,
        Ok(Ok(_)) => return pg_sys::Datum::from(0),
        Ok(Err(e)) if !cascade => TtError::ExtensionUnreadable(e.to_string()).report(),
        Err(e) if !cascade => TtError::ExtensionUnreadable(e.message_text()).report(),
        Ok(Err(_)) | Err(_) => return pg_sys::Datum::from(0),
    };
    if !cascade {
        TtError::ExtensionInUse(held).report();
    }
    // CASCADE: the owner objects go too (in a restored database nothing else removes them).
    let _ = crate::infra::catalog::as_catalog_owner_any_layout(|| {
        Spi::run(
            "SELECT pg_catalog.lo_unlink(o.oid) FROM pg_catalog.pg_largeobject_metadata o
              WHERE o.oid IN (SELECT owner_object FROM twotower.model UNION SELECT owner_object FROM twotower.pipeline)",
        )
    });
    pg_sys::Datum::from(0)
}

/// Whether a DROP EXTENSION's list of names (String nodes) names pg_twotower.
unsafe fn names_us(objects: *mut pg_sys::List) -> bool {
    // SAFETY: a List of String nodes (possibly NIL).
    unsafe {
        crate::infra::spi::list_pointers(objects)
            .into_iter()
            .any(|n| {
                let node = n as *mut pg_sys::Node;
                !node.is_null()
                    && (*node).type_ == pg_sys::NodeTag::T_String
                    && std::ffi::CStr::from_ptr((*(node as *mut pg_sys::String)).sval).to_bytes()
                        == b"pg_twotower"
            })
    }
}
