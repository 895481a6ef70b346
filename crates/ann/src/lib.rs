//! pg_twotower's ANN core: the HNSW image (our builder, verify, view, search) and the exact
//! distance functions. Knows nothing of PostgreSQL.

mod build;
pub mod error;
pub mod graph;
mod hnsw;
pub mod image;
mod layout;
pub mod metric;
pub mod tune;

pub use error::{AnnError, Result, MAX_DIMS};
pub use image::{
    build_image, checksum, estimate_build_memory, segment_cuts, sort_for_pop, BuildParams,
    GraphCursor, Header, Hit, Image, ImageBuilder, ImageBytes, Poll, Query, ScanOrder, BUILD_BATCH,
    FOLD_CHECK_EF, SELF_CHECK_EF,
};
pub use metric::{
    check_index_range, cosine_distance, inner_product, is_zero, l2_distance, l2_squared, unit,
    validate_vector, Metric, Quantization,
};
pub use tune::{tune_memory, TuneParams, Tuning};
