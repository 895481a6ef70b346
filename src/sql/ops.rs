//! Distance operators and functions on real[]: `<=>` cosine distance, `<#>` negative inner
//! product, `<->` Euclidean distance. They are plain V1 C functions (declared in
//! `sql/bootstrap.sql`) so they read the arrays in place, without copying.

use crate::infra::error::{OrReport, TtError};
use crate::infra::vector::VecRef;
use pgrx::pg_sys;
use pgrx::prelude::*;
use twotower_ann::{cosine_distance, inner_product, l2_distance};

use crate::infra::pg_function_info_v1;

pg_function_info_v1!(
    pg_finfo_twotower_cosine_distance,
    pg_finfo_twotower_inner_product,
    pg_finfo_twotower_negative_inner_product,
    pg_finfo_twotower_l2_distance,
    pg_finfo_twotower_vector_dims,
    pg_finfo_twotower_vector_norm,
    pg_finfo_twotower_l2_normalize
);

/// The n-th argument of a strict function (never NULL).
///
/// # Safety
/// `fcinfo` must be a valid call with at least `n + 1` arguments.
unsafe fn arg(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> pg_sys::Datum {
    // SAFETY: forwarded contract; `args` is the flexible argument array of the call.
    unsafe { (*(*fcinfo).args.as_ptr().add(n)).value }
}

/// Both vector arguments, checked and of equal length.
unsafe fn two_vectors(fcinfo: pg_sys::FunctionCallInfo) -> (VecRef, VecRef) {
    // SAFETY: called only from the two-argument strict functions below.
    let a = unsafe { VecRef::checked(arg(fcinfo, 0), None) }.or_report();
    // SAFETY: as above, the second argument.
    let b = unsafe { VecRef::checked(arg(fcinfo, 1), None) }.or_report();
    if a.as_slice().len() != b.as_slice().len() {
        TtError::LengthMismatch {
            left: a.as_slice().len(),
            right: b.as_slice().len(),
        }
        .report();
    }
    (a, b)
}

fn f8(v: f64) -> pg_sys::Datum {
    pg_sys::Datum::from(v.to_bits())
}

/// `cosine_distance(real[], real[])`, the `<=>` operator: 1 - cos(a, b), NaN for a zero vector.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotower_cosine_distance(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: PostgreSQL calls this with two non-NULL real[] arguments (STRICT).
    let (a, b) = unsafe { two_vectors(fcinfo) };
    f8(cosine_distance(a.as_slice(), b.as_slice()))
}

/// `inner_product(real[], real[])`.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotower_inner_product(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: as above.
    let (a, b) = unsafe { two_vectors(fcinfo) };
    f8(inner_product(a.as_slice(), b.as_slice()))
}

/// `negative_inner_product(real[], real[])`, the `<#>` operator.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotower_negative_inner_product(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: as above.
    let (a, b) = unsafe { two_vectors(fcinfo) };
    f8(-inner_product(a.as_slice(), b.as_slice()))
}

/// `l2_distance(real[], real[])`, the `<->` operator.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotower_l2_distance(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: as above.
    let (a, b) = unsafe { two_vectors(fcinfo) };
    f8(l2_distance(a.as_slice(), b.as_slice()))
}

/// `vector_dims(real[])`: number of elements of a valid vector.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotower_vector_dims(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: one non-NULL real[] argument (STRICT).
    let a = unsafe { VecRef::checked(arg(fcinfo, 0), None) }.or_report();
    pg_sys::Datum::from(a.as_slice().len() as i32)
}

/// `vector_norm(real[])`: Euclidean norm.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotower_vector_norm(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: one non-NULL real[] argument (STRICT).
    let a = unsafe { VecRef::checked(arg(fcinfo, 0), None) }.or_report();
    f8(inner_product(a.as_slice(), a.as_slice()).sqrt())
}

/// `l2_normalize(real[])`: the vector scaled to unit length (a zero vector stays zero).
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotower_l2_normalize(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: one non-NULL real[] argument (STRICT).
    let a = unsafe { VecRef::checked(arg(fcinfo, 0), None) }.or_report();
    let s = a.as_slice();
    let norm = inner_product(s, s).sqrt();
    let out: Vec<f32> = if norm > 0.0 {
        s.iter().map(|x| (*x as f64 / norm) as f32).collect()
    } else {
        s.to_vec()
    };
    out.into_datum().expect("a Vec<f32> is never NULL")
}
