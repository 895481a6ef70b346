//! The funnel after the user tower, without Postgres: pipeline definitions ([`pipeline`]) with
//! their channels ([`channel`]), merging any number of channels' candidate lists into one ranked
//! list with per-item provenance ([`merge`]), cascade pre-ranking ([`prerank`]), re-ranking of
//! the final list by business rules and diversity ([`rerank`]), and one whole
//! request through all of them ([`request`]) behind the [`request::Sources`] trait the glue
//! implements over SPI.

#![forbid(unsafe_code)]

pub mod cache;
pub mod channel;
pub mod merge;
pub mod pipeline;
pub mod prerank;
pub mod request;
pub mod rerank;
pub mod split;

pub use merge::{merge, Candidate, MergeError, Merged, Norm, Strategy, StrategyError};
pub use prerank::PrerankError;
pub use request::{run, FunnelError, Hit, Models, Outcome, Ranked, Request, Sources, Step};
