//! Item-to-item recall channels, without Postgres: item-CF with inverse user frequency and
//! Swing similarities built from an interaction log into top-N neighbour lists
//! ([`Similarity`]), and recall from a user's history over such lists ([`i2i`]).

#![forbid(unsafe_code)]

pub mod error;
pub mod log;
pub mod options;
pub mod recall;
pub mod sim;

pub use error::{CfError, Result};
pub use log::Log;
pub use options::{Kind, Options};
pub use recall::{i2i, Hit};
pub use sim::Similarity;
