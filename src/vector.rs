//! Reading `real[]` datums as `&[f32]` without copying, with the input checks every entry point
//! shares: one dimension, no NULL elements, element type real, then the core's checks (length,
//! finite values).

use crate::error::{TtError, TtResult};
use pgrx::pg_sys;
use twotower_ann::validate_vector;

/// A detoasted one-dimensional real[] array.
pub struct VecRef {
    ptr: *const f32,
    len: usize,
}

impl VecRef {
    /// Reads a real[] datum. The returned view borrows memory of the current memory context
    /// (or of the datum itself when it was not toasted), so it must not outlive the call.
    ///
    /// # Safety
    /// `datum` must be a non-NULL datum of type `real[]` (guaranteed by the SQL signatures and the
    /// operator classes, which only accept `real[]`).
    pub unsafe fn from_datum(datum: pg_sys::Datum) -> TtResult<VecRef> {
        // SAFETY: the caller guarantees an array datum; detoasting returns a valid varlena.
        let arr =
            unsafe { pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) } as *const pg_sys::ArrayType;
        // SAFETY: `arr` points to a detoasted ArrayType header.
        let (ndim, dataoffset, elemtype) =
            unsafe { ((*arr).ndim, (*arr).dataoffset, (*arr).elemtype) };
        if elemtype != pg_sys::FLOAT4OID {
            return Err(TtError::BadArray(
                "array elements must be of type real".into(),
            ));
        }
        if ndim == 0 {
            return Err(TtError::Ann(twotower_ann::AnnError::EmptyVector));
        }
        if ndim != 1 {
            return Err(TtError::BadArray(format!(
                "array has {ndim} dimensions, expected 1"
            )));
        }
        if dataoffset != 0 {
            return Err(TtError::BadArray("array contains NULL elements".into()));
        }
        // SAFETY: for a one-dimensional array the dimensions follow the fixed 16-byte header;
        // without a null bitmap the data starts at MAXALIGN(16 + 2 * 4) = 24.
        let len = unsafe { *((arr as *const u8).add(16) as *const i32) } as usize;
        // SAFETY: as above: the data of a one-dimensional array without nulls starts at 24.
        let ptr = unsafe { (arr as *const u8).add(24) } as *const f32;
        Ok(VecRef { ptr, len })
    }

    /// Reads and validates (finite, 1..=16000 elements, and `expected` length when given).
    ///
    /// # Safety
    /// As for [`VecRef::from_datum`].
    pub unsafe fn checked(datum: pg_sys::Datum, expected: Option<usize>) -> TtResult<VecRef> {
        // SAFETY: forwarded contract.
        let v = unsafe { Self::from_datum(datum)? };
        validate_vector(v.as_slice(), expected)?;
        Ok(v)
    }

    pub fn as_slice(&self) -> &[f32] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` points to `len` floats inside the detoasted array (see from_datum).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}
