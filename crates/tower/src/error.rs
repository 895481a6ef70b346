//! Typed errors of the tower core. The extension maps each variant to a SQLSTATE in one place;
//! every message names the offending spec path, tensor, feature or limit.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum TowerError {
    /// The spec is not well-formed JSON (syntax error, duplicate key, nesting too deep).
    #[error("model spec is not valid JSON: {reason}")]
    SpecJson { reason: String },

    /// The spec is JSON but violates the format. `path` locates the offending value, e.g.
    /// `features[3].pooling`, `layers[2].weight`, `output.dim` (empty for the root).
    #[error("invalid model spec at \"{path}\": {reason}")]
    Spec { path: String, reason: String },

    /// `spec_version` is an integer other than 1. `got` is its JSON text.
    #[error("model spec_version {got} is not supported (this build reads spec_version 1)")]
    SpecVersion { got: String },

    /// The weights are not a well-formed safetensors byte string.
    #[error("weights are not a valid safetensors file: {reason}")]
    Safetensors { reason: String },

    #[error("tensor \"{name}\" named by the spec is missing from the weights")]
    MissingTensor { name: String },

    #[error("tensor \"{name}\" in the weights is not named by the spec")]
    StrayTensor { name: String },

    /// A tensor has a dtype other than F32/F16/BF16 (`num_batches_tracked` tensors excepted).
    #[error("tensor \"{name}\" has dtype {dtype}; only F32, F16 and BF16 are accepted")]
    TensorDtype { name: String, dtype: String },

    /// A tensor's shape differs from the one the spec implies. `expected` is rendered like
    /// `[1001, d]`, with a letter for a dimension the spec leaves free.
    #[error("tensor \"{name}\" has shape {got:?}, but the spec implies {expected}")]
    TensorShape {
        name: String,
        expected: String,
        got: Vec<usize>,
    },

    /// `index` is the flat (row-major) element index.
    #[error("tensor \"{name}\" has a non-finite value at flat index {index}")]
    NonFiniteWeight { name: String, index: usize },

    /// A finite weight that is still unusable (e.g. batchnorm running_var + eps <= 0).
    #[error("tensor \"{name}\" has an invalid value at flat index {index}: {reason}")]
    WeightValue {
        name: String,
        index: usize,
        reason: String,
    },

    /// `strict` encoding saw an input key that is not a feature of the model.
    #[error("input key \"{name}\" is not a feature of this model")]
    UnknownFeature { name: String },

    /// An input value has the wrong JSON type for its feature.
    #[error("feature \"{feature}\" expects {expected}, got {got}")]
    FeatureType {
        feature: String,
        expected: &'static str,
        got: &'static str,
    },

    /// An input value has the right type but an unusable value (non-finite, 42.5 as an id,
    /// weights length mismatch, wrong dense length, ...).
    #[error("feature \"{feature}\": {reason}")]
    FeatureValue { feature: String, reason: String },

    /// An input or file exceeds a fixed limit.
    #[error("{what} exceeds the limit of {limit}")]
    TooLarge { what: String, limit: usize },

    /// The input is not a JSON object.
    #[error("tower input must be a JSON object, got {got}")]
    NotAnObject { got: &'static str },

    /// The forward pass overflowed f32 (only reported by `Model::embed`; `forward` is infallible).
    #[error("tower output has a non-finite value at position {index} (input values or weights too large)")]
    NonFiniteOutput { index: usize },
}

pub type Result<T> = std::result::Result<T, TowerError>;

/// The JSON type name of a value, for error messages.
pub fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

impl From<twotower_options::OptionError> for TowerError {
    fn from(e: twotower_options::OptionError) -> Self {
        TowerError::Spec {
            path: e.path,
            reason: e.reason,
        }
    }
}
