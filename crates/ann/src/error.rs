//! Typed errors of the ANN core. The extension maps each variant to a SQLSTATE in one place.

use thiserror::Error;

/// The largest vector dimension accepted anywhere in pg_twotower (one constant, shared with the
/// towers).
pub use twotower_metric::MAX_DIMS;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum AnnError {
    #[error("vector has {got} dimensions, expected {expected}")]
    DimensionMismatch { expected: usize, got: usize },
    #[error("vector has {0} dimensions, more than the maximum of 16000")]
    TooManyDimensions(usize),
    #[error("vector must have at least one dimension")]
    EmptyVector,
    #[error("vector contains a non-finite value ({value}) at position {position}")]
    NonFinite { position: usize, value: f32 },
    #[error("vector norm {norm:e} is outside the range an index can rank exactly")]
    OutOfRange { norm: f64 },
    #[error("vector element {position} ({value}) does not fit in f16 storage")]
    F16Range { position: usize, value: f32 },
    #[error("invalid value for option \"{option}\": {reason}")]
    InvalidOption {
        option: &'static str,
        reason: String,
    },
    #[error("index image is corrupt: {0}")]
    CorruptImage(String),
    #[error("index build was cancelled")]
    Cancelled,
    /// A temporary file of a build could not be made or written (`disk_full`: no space left).
    #[error("{detail}")]
    Io { detail: String, disk_full: bool },
    #[error("HNSW engine error: {0}")]
    Engine(String),
}

pub type Result<T> = std::result::Result<T, AnnError>;
