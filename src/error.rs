//! Every error pg_twotower raises, mapped to a SQLSTATE, message, detail and hint in one place.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use twotower_ann::AnnError;

#[derive(Debug)]
pub enum TtError {
    /// An error of the ANN core.
    Ann(AnnError),
    /// The argument is not a usable one-dimensional real[] (nulls, dimensions, element type).
    BadArray(String),
    /// Two vectors of different length were compared.
    LengthMismatch { left: usize, right: usize },
    /// Building needs more memory than maintenance_work_mem allows.
    MemoryBudget { needed: usize, available: usize },
    /// The index pages do not hold what the metapage says.
    IndexCorrupt(String),
    /// An index operation we do not support.
    Unsupported(String),
    /// An I/O failure on a node-local cache file.
    CacheIo(String),
}

impl From<AnnError> for TtError {
    fn from(e: AnnError) -> Self {
        TtError::Ann(e)
    }
}

pub type TtResult<T> = Result<T, TtError>;

fn mib(bytes: usize) -> String {
    format!("{} MB", bytes.div_ceil(1024 * 1024))
}

/// A float as PostgreSQL prints it (NaN, Infinity, -Infinity).
fn pg_float(v: f32) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else {
        v.to_string()
    }
}

impl TtError {
    fn parts(&self) -> (PgSqlErrorCode, String, Option<String>, Option<String>) {
        use PgSqlErrorCode::*;
        match self {
            TtError::Ann(e) => match e {
                AnnError::DimensionMismatch { expected, got } => (
                    ERRCODE_DATA_EXCEPTION,
                    format!("vector has {got} dimensions, the index expects {expected}"),
                    None,
                    Some("Every vector in one index must have the same number of elements.".into()),
                ),
                AnnError::TooManyDimensions(n) => (
                    ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                    format!("vector has {n} dimensions, more than the maximum of {}", twotower_ann::MAX_DIMS),
                    None,
                    None,
                ),
                AnnError::EmptyVector => (
                    ERRCODE_DATA_EXCEPTION,
                    "vector must have at least one element".into(),
                    None,
                    None,
                ),
                AnnError::NonFinite { position, value } => (
                    ERRCODE_DATA_EXCEPTION,
                    format!("vector element {} is {}", position + 1, pg_float(*value)),
                    None,
                    Some("NaN and infinite values are not allowed in vectors.".into()),
                ),
                AnnError::InvalidOption { option, reason } => (
                    ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("invalid value for index option \"{option}\""),
                    Some(reason.clone()),
                    Some("Valid options: m (2..100), ef_construction (4..1000), quantization ('f32', 'f16', 'i8'; i8 with cosine only).".into()),
                ),
                AnnError::CorruptImage(d) => (
                    ERRCODE_DATA_CORRUPTED,
                    "twotower_hnsw index image is corrupt".into(),
                    Some(d.clone()),
                    Some("REINDEX the index.".into()),
                ),
                AnnError::Cancelled => (ERRCODE_QUERY_CANCELED, "canceling index build".into(), None, None),
                AnnError::Engine(d) => (ERRCODE_INTERNAL_ERROR, "HNSW engine failed".into(), Some(d.clone()), None),
            },
            TtError::BadArray(d) => (
                ERRCODE_DATA_EXCEPTION,
                format!("invalid vector: {d}"),
                None,
                Some("Vectors are one-dimensional real[] arrays without NULL elements.".into()),
            ),
            TtError::LengthMismatch { left, right } => (
                ERRCODE_DATA_EXCEPTION,
                format!("vectors have different lengths ({left} and {right})"),
                None,
                None,
            ),
            TtError::MemoryBudget { needed, available } => (
                ERRCODE_OUT_OF_MEMORY,
                "twotower_hnsw index build needs more memory than maintenance_work_mem".into(),
                Some(format!("The build needs about {}, maintenance_work_mem is {}.", mib(*needed), mib(*available))),
                Some(format!("SET maintenance_work_mem = '{}' before CREATE INDEX or REINDEX.", mib(*needed + *needed / 8))),
            ),
            TtError::IndexCorrupt(d) => (
                ERRCODE_INDEX_CORRUPTED,
                "twotower_hnsw index is corrupt".into(),
                Some(d.clone()),
                Some("REINDEX the index.".into()),
            ),
            TtError::Unsupported(d) => (ERRCODE_FEATURE_NOT_SUPPORTED, d.clone(), None, None),
            TtError::CacheIo(d) => (
                ERRCODE_IO_ERROR,
                "could not materialize the twotower_hnsw cache file".into(),
                Some(d.clone()),
                Some("Check free space and permissions of $PGDATA/pg_twotower.".into()),
            ),
        }
    }

    /// Raises this error as a PostgreSQL ERROR. Never returns.
    pub fn report(self) -> ! {
        let (code, msg, detail, hint) = self.parts();
        let mut r = ErrorReport::new(code, msg, "pg_twotower");
        if let Some(d) = detail {
            r = r.set_detail(d);
        }
        if let Some(h) = hint {
            r = r.set_hint(h);
        }
        r.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// Unwraps a result or raises its error.
pub trait OrReport<T> {
    fn or_report(self) -> T;
}

impl<T, E: Into<TtError>> OrReport<T> for Result<T, E> {
    fn or_report(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.into().report(),
        }
    }
}
