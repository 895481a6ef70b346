//! pg_twotower's training core: two-tower models trained with explicit backward passes over the
//! tower crate's own layer kernels, the industry's losses and samplers, sparse optimisers for
//! embedding tables, and ranking metrics. Knows nothing of PostgreSQL; `docs/training.md`
//! describes the recipes and options.

#![forbid(unsafe_code)]

pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod loss;
pub mod model;
pub mod net;
pub mod optim;
pub mod prerank;
pub mod train;

pub use config::Config;
pub use data::Data;
pub use error::{Result, TrainError};
pub use prerank::{train_prerank, PrerankConfig, RankLog, TrainedPrerank};
pub use train::{train, train_from, Base, Event, Keys, Progress, Trained};
