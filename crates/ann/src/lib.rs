//! pg_twotower's ANN core: the usearch HNSW image (build, verify, view, search) and the exact
//! distance functions. Knows nothing of PostgreSQL.

pub mod error;
pub mod graph;
pub mod image;
pub mod metric;
pub mod synthetic;

pub use error::{AnnError, Result, MAX_DIMS};
pub use image::{
    build_image, checksum, estimate_build_memory, BuildParams, GraphCursor, Header, Image, Poll,
};
pub use metric::{
    cosine_distance, inner_product, is_zero, l2_distance, l2_squared, validate_vector, Metric,
    Quantization,
};
