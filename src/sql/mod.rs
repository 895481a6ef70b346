//! One module per SQL surface: distance operators (`ops`), models (`models`), embedding and
//! refresh (`embed`), one-call recall (`recall`), training (`train`, `prerank_train`), item-to-item
//! channels (`channels`), the channel merge (`merge`), pipelines and `recommend` (`pipeline`), the
//! impression log, feedback and splits (`serving`),
//! and index information (`info`). Each converts and validates its arguments, calls the core
//! crates through `serve` and `am`, and maps errors once (`infra::error`).

pub mod channels;
pub mod embed;
pub mod info;
pub mod merge;
pub mod models;
pub mod ops;
pub mod pipeline;
pub mod prerank_train;
pub mod recall;
pub mod serving;
pub mod train;
