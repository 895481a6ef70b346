//! The funnel after recall, without Postgres: merging any number of channels' candidate lists
//! into one ranked list with per-item provenance ([`merge`]).

pub mod merge;

pub use merge::{merge, Candidate, MergeError, Merged, Norm, Strategy};
