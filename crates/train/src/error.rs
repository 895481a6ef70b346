//! Errors of the training engine. The extension maps each variant to a SQLSTATE once.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    /// A training option is missing, malformed or contradicts another.
    #[error("invalid training option {path}: {reason}")]
    Option { path: String, reason: String },
    /// The data cannot train anything (no interactions, no items, ...).
    #[error("no training data: {0}")]
    NoData(String),
    /// The run would need more memory than its budget.
    #[error("training needs about {needed} bytes, more than the budget of {budget} bytes")]
    MemoryBudget { needed: usize, budget: usize },
    /// The caller asked to stop (the database's cancel or statement timeout).
    #[error("training cancelled")]
    Cancelled,
    /// The loss or a parameter became NaN or infinite (a learning rate too high, usually).
    #[error("training diverged at epoch {epoch}, step {step}: the loss is {loss}")]
    Diverged {
        epoch: usize,
        step: usize,
        loss: f64,
    },
    /// The exported model does not load, or does not compute what training computed.
    #[error("exported model check failed: {0}")]
    Export(String),
    #[error(transparent)]
    Tower(#[from] twotower_tower::TowerError),
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn opt_err(path: impl Into<String>, reason: impl Into<String>) -> TrainError {
    TrainError::Option {
        path: path.into(),
        reason: reason.into(),
    }
}

impl From<twotower_options::OptionError> for TrainError {
    fn from(e: twotower_options::OptionError) -> Self {
        TrainError::Option {
            path: e.path,
            reason: e.reason,
        }
    }
}
