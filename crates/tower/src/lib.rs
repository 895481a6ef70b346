//! pg_twotower's tower core: the model format (JSON spec + safetensors weights), feature encoding
//! from JSON, and the forward pass. Knows nothing of PostgreSQL. The format is specified in
//! `docs/model-format.md`.

pub mod attention;
pub mod encode;
pub mod error;
mod forward;
mod graph;
mod json;
pub mod layers;
mod model;
mod rows;
pub mod safetensors;
mod spec;

pub use encode::{canonical_id, Encoded, FieldRef, MAX_LIST_LEN};
pub use error::{Result, TowerError};
pub use forward::forward_parallel;
pub use model::{Model, Part, ScoreBy};
pub use rows::Row;
pub use spec::{Cross, CrossShape, Link, Source, Task, MAX_NODES as MAX_GRAPH_NODES, MAX_TASKS};

/// The only spec version this build reads.
pub const SPEC_VERSION: u32 = 1;

/// Which side of the two towers a model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    User,
    Item,
    /// A pre-rank DNN: scores (user, candidate item) pairs; its output is one score.
    Prerank,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Item => "item",
            Kind::Prerank => "prerank",
        }
    }
}

/// The metric a tower's output is trained for: the same concept as an index's metric (a model
/// fits an index when they are equal).
pub use twotower_metric::Metric;

/// 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime 0x100000001b3, wrapping).
#[inline]
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
