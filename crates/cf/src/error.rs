//! Errors of the channel builders. The extension maps each variant to a SQLSTATE once.

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum CfError {
    /// A channel option is missing, malformed or contradicts another.
    #[error("invalid channel option {path}: {reason}")]
    Option { path: String, reason: String },
    /// A value of the log or of a request is unusable (NaN weight, lengths that differ, ...).
    #[error("{0}")]
    BadInput(String),
    /// The build would need more memory than its budget.
    #[error("the build needs about {needed} bytes, more than the budget of {budget} bytes")]
    MemoryBudget { needed: usize, budget: usize },
}

pub type Result<T> = std::result::Result<T, CfError>;

pub(crate) fn opt_err(path: impl Into<String>, reason: impl Into<String>) -> CfError {
    CfError::Option {
        path: path.into(),
        reason: reason.into(),
    }
}

impl From<twotower_options::OptionError> for CfError {
    fn from(e: twotower_options::OptionError) -> Self {
        CfError::Option {
            path: e.path,
            reason: e.reason,
        }
    }
}
