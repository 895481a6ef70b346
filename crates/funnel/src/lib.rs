//! The funnel after recall, without Postgres: merging any number of channels' candidate lists
//! into one ranked list with per-item provenance ([`merge`]), and cascade pre-ranking of the merged
//! candidates ([`prerank`]).

#![forbid(unsafe_code)]

pub mod cache;
pub mod merge;
pub mod pipeline;
pub mod prerank;

pub use merge::{merge, Candidate, MergeError, Merged, Norm, Strategy};
