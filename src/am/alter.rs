//! `ALTER INDEX ... SET (...)` on a twotower_hnsw index is checked against the index's operator
//! class and its data, as `CREATE INDEX` checks them: an option the next REINDEX (or a restore of
//! a dump) would refuse is refused now, while the old options still hold. PostgreSQL validates
//! reloptions without telling the access method which index they are for, so the check runs in
//! a utility hook, after the ALTER, on the index's new options; its ERROR undoes the ALTER.

use super::options;
use super::rel::{is_ours, metric_of};
use crate::infra::error::{OrReport, TtError};
use pgrx::pg_sys;
use pgrx::prelude::*;
use twotower_ann::{AnnError, Metric, Quantization};

static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Installs the hook (from `_PG_init`).
pub fn register() {
    // SAFETY: hooks are installed once per backend from _PG_init, chaining the previous one.
    unsafe {
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: the arguments are PostgreSQL's, passed on unchanged; the statement is read only
    // after the standard processing, from the node PostgreSQL gave us.
    unsafe {
        match PREV_PROCESS_UTILITY {
            Some(prev) => prev(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
        let stmt = (*pstmt).utilityStmt;
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_AlterTableStmt {
            return;
        }
        let alter = stmt as *mut pg_sys::AlterTableStmt;
        if (*alter).relation.is_null() || !sets_options((*alter).cmds) {
            return;
        }
        let oid = pg_sys::RangeVarGetRelidExtended(
            (*alter).relation,
            pg_sys::NoLock as i32,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        );
        if oid == pg_sys::InvalidOid
            || pg_sys::get_rel_relkind(oid) != pg_sys::RELKIND_INDEX as std::ffi::c_char
        {
            return;
        }
        // The new options become visible to this command.
        pg_sys::CommandCounterIncrement();
        check(oid);
    }
}

/// Whether the ALTER's commands set or reset options.
unsafe fn sets_options(cmds: *mut pg_sys::List) -> bool {
    // SAFETY: a List of AlterTableCmd nodes (possibly NIL).
    unsafe {
        crate::infra::spi::list_pointers(cmds).into_iter().any(|c| {
            let c = c as *mut pg_sys::AlterTableCmd;
            matches!(
                (*c).subtype,
                pg_sys::AlterTableType::AT_SetRelOptions
                    | pg_sys::AlterTableType::AT_ResetRelOptions
                    | pg_sys::AlterTableType::AT_ReplaceRelOptions
            )
        })
    }
}

/// Refuses options of index `oid` that its operator class or its rows cannot have.
unsafe fn check(oid: pg_sys::Oid) {
    // SAFETY: the ALTER holds a lock on the index; opened and closed here.
    let (ours, metric, quantization) = unsafe {
        let rel = pg_sys::index_open(oid, pg_sys::AccessShareLock as i32);
        let ours = is_ours(rel);
        let out = if ours {
            (true, metric_of(rel), options::of(rel).2)
        } else {
            (false, Metric::Cosine, Quantization::F32)
        };
        pg_sys::index_close(rel, pg_sys::AccessShareLock as i32);
        out
    };
    if !ours {
        return;
    }
    quantization.check_metric(metric).or_report();
    if quantization == Quantization::F16 {
        // Every indexed vector must fit in half precision (inserts refuse the others).
        let over = crate::infra::catalog::read_row::<String, f64>(
            "SELECT i.indrelid::pg_catalog.regclass::pg_catalog.text, 0::pg_catalog.float8
               FROM pg_catalog.pg_index i WHERE i.indexrelid OPERATOR(pg_catalog.=) $1",
            &[oid.into()],
        )
        .ok()
        .flatten()
        .and_then(|(t, _)| t);
        let key = crate::infra::catalog::read_row::<String, bool>(
            "SELECT pg_catalog.pg_get_indexdef($1, 1, true), true",
            &[oid.into()],
        )
        .ok()
        .flatten()
        .and_then(|(k, _)| k);
        if let (Some(table), Some(key)) = (over, key) {
            let big = crate::infra::catalog::read_row::<f64, bool>(
                &format!(
                    "SELECT x::pg_catalog.float8, true FROM {table} AS t, LATERAL pg_catalog.unnest(({key})::pg_catalog.float4[]) AS x
                      WHERE pg_catalog.abs(x) OPERATOR(pg_catalog.>) 65504 LIMIT 1"
                ),
                &[],
            )
            .map_err(|e| TtError::BadArgument(format!("checking the vectors of {table}: {e}")))
            .or_report();
            if let Some((Some(value), _)) = big {
                TtError::Ann(AnnError::F16Range {
                    position: 0,
                    value: value as f32,
                })
                .report();
            }
        }
    }
}
