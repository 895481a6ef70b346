//! Reading `real[]` datums as `&[f32]` without copying, with the input checks every entry point
//! shares: one dimension, no NULL elements, element type real, then the core's checks (length,
//! finite values).

use crate::infra::error::{TtError, TtResult};
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

    /// Reads a pgvector `vector` datum (a varlena of int16 dim, int16 unused, then dim floats),
    /// in place, without linking pgvector.
    ///
    /// # Safety
    /// `datum` must be a non-NULL datum of pgvector's `vector` type.
    pub unsafe fn from_pgvector(datum: pg_sys::Datum) -> TtResult<VecRef> {
        // SAFETY: detoasting returns a 4-byte-header varlena; pgvector writes dim at offset 4
        // and the floats from offset 8 (its `Vector` struct), and the length covers them.
        unsafe {
            let v = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) as *const u8;
            let total = (*(v as *const u32) >> 2) as usize;
            let dim = *(v.add(4) as *const i16);
            if dim < 0 || 8 + dim as usize * 4 > total {
                return Err(TtError::BadArray("the vector datum is malformed".into()));
            }
            Ok(VecRef {
                ptr: v.add(8) as *const f32,
                len: dim as usize,
            })
        }
    }

    /// Reads a datum of either vector type.
    ///
    /// # Safety
    /// `datum` must be a non-NULL datum of the type `kind` names.
    pub unsafe fn of_kind(datum: pg_sys::Datum, kind: VecKind) -> TtResult<VecRef> {
        // SAFETY: forwarded contract.
        unsafe {
            match kind {
                VecKind::RealArray => Self::from_datum(datum),
                VecKind::PgVector => Self::from_pgvector(datum),
            }
        }
    }

    /// [`VecRef::of_kind`], validated as [`VecRef::checked`] does.
    ///
    /// # Safety
    /// As for [`VecRef::of_kind`].
    pub unsafe fn checked_kind(
        datum: pg_sys::Datum,
        kind: VecKind,
        expected: Option<usize>,
    ) -> TtResult<VecRef> {
        // SAFETY: forwarded contract.
        let v = unsafe { Self::of_kind(datum, kind)? };
        validate_vector(v.as_slice(), expected)?;
        Ok(v)
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

/// The two column types a twotower_hnsw index reads: `real[]`, and pgvector's `vector` (its
/// operator classes come with the `pg_twotower_pgvector` extension).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VecKind {
    #[default]
    RealArray,
    PgVector,
}

/// The vector type of type `typ` (42804 for any other type).
pub fn kind_of_type(typ: pg_sys::Oid) -> TtResult<VecKind> {
    if typ == pg_sys::FLOAT4ARRAYOID {
        return Ok(VecKind::RealArray);
    }
    let (mut input, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
    // SAFETY: catalogue lookups by type oid; get_func_name returns NULL for a missing function.
    let name = unsafe {
        pg_sys::getTypeInputInfo(typ, &mut input, &mut ioparam);
        let p = pg_sys::get_func_name(input);
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    if name == "vector_in" {
        return Ok(VecKind::PgVector);
    }
    Err(TtError::BadArray(
        "twotower_hnsw indexes real[] and pgvector's vector only".into(),
    ))
}

/// The vector type of index `index`'s key column.
///
/// # Safety
/// `index` must be an open index relation with one key column.
pub unsafe fn kind_of_index(index: pg_sys::Relation) -> TtResult<VecKind> {
    // SAFETY: rd_opcintype has one entry per key column.
    kind_of_type(unsafe { *(*index).rd_opcintype })
}
