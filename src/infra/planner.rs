//! Row estimates for the set-returning functions whose row count follows their `k`: a planner
//! support function (`SupportRequestRows`) answers `k` when it is a constant in the call, the
//! pipeline's own `k` for `recommend`/`prerank` without one, and never more than a constant
//! candidate list for `prerank`. Without it every call is planned as 1000 rows.

use pgrx::pg_sys;
use pgrx::prelude::*;

crate::infra::pg_function_info_v1!(pg_finfo_twotower_rows_support);

/// The support function (declared in `sql/pg_twotower.sql`).
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotower_rows_support(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: a support function is called with one internal argument, a support request
    // node; only a SupportRequestRows on a FuncExpr is read, and its `rows` set.
    unsafe {
        let req = (*(*fcinfo).args.as_ptr())
            .value
            .cast_mut_ptr::<pg_sys::Node>();
        if req.is_null() || (*req).type_ != pg_sys::NodeTag::T_SupportRequestRows {
            return pg_sys::Datum::from(0);
        }
        let req = req as *mut pg_sys::SupportRequestRows;
        let node = (*req).node;
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_FuncExpr {
            return pg_sys::Datum::from(0);
        }
        let f = node as *mut pg_sys::FuncExpr;
        let name = pg_sys::get_func_name((*f).funcid);
        if name.is_null() {
            return pg_sys::Datum::from(0);
        }
        let name = std::ffi::CStr::from_ptr(name)
            .to_string_lossy()
            .into_owned();
        let args: Vec<*mut pg_sys::Node> = crate::infra::spi::list_pointers((*f).args)
            .into_iter()
            .map(|p| p as *mut pg_sys::Node)
            .collect();
        // The position of `k` (and of a pipeline name and candidate list) in each function.
        let (k_at, pipeline_at, candidates_at) = match name.as_str() {
            "recall" | "i2i_recall" | "merge" => (3, None, None),
            "recommend" => (2, Some(0), None),
            "prerank" => (3, Some(0), Some(2)),
            _ => return pg_sys::Datum::from(0),
        };
        let mut rows = const_arg(&args, k_at).map(|d| d.value() as i32 as f64);
        if rows.is_none() && is_null_const(&args, k_at) {
            if let Some(p) = pipeline_at.and_then(|i| const_arg(&args, i)) {
                let text: Option<String> = String::from_datum(p, false);
                rows = text.and_then(|t| pipeline_k(&t));
            }
        }
        if let Some(c) = candidates_at.and_then(|i| const_arg(&args, i)) {
            if let Some(a) = pgrx::datum::Array::<i64>::from_datum(c, false) {
                let count = a.len() as f64;
                rows = Some(rows.map_or(count, |r| r.min(count)));
            }
        }
        match rows {
            Some(r) if r >= 1.0 => {
                (*req).rows = r;
                pg_sys::Datum::from(req)
            }
            _ => pg_sys::Datum::from(0),
        }
    }
}

/// The value of argument `i` when it is a non-NULL constant.
unsafe fn const_arg(args: &[*mut pg_sys::Node], i: usize) -> Option<pg_sys::Datum> {
    // SAFETY: planner nodes of the call's argument list.
    unsafe {
        let a = *args.get(i)?;
        if a.is_null() || (*a).type_ != pg_sys::NodeTag::T_Const {
            return None;
        }
        let c = a as *mut pg_sys::Const;
        (!(*c).constisnull).then_some((*c).constvalue)
    }
}

unsafe fn is_null_const(args: &[*mut pg_sys::Node], i: usize) -> bool {
    // SAFETY: as above.
    unsafe {
        args.get(i).is_some_and(|&a| {
            !a.is_null()
                && (*a).type_ == pg_sys::NodeTag::T_Const
                && (*(a as *mut pg_sys::Const)).constisnull
        })
    }
}

/// The `k` a saved pipeline returns (None when it cannot be read).
fn pipeline_k(name: &str) -> Option<f64> {
    crate::infra::catalog::read_row::<i32, bool>(
        "SELECT (p.definition OPERATOR(pg_catalog.->>) 'k')::pg_catalog.int4, true FROM twotower.pipelines p
          WHERE p.name OPERATOR(pg_catalog.=) $1",
        &[name.into()],
    )
    .ok()
    .flatten()
    .and_then(|(k, _)| k)
    .map(f64::from)
}
