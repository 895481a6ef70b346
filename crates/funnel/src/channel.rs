//! Recall channels: the kinds a pipeline can name, each parsed from its JSON object here and
//! asked for its hits through [`crate::request::Sources::channel`] with a [`Query`] built here.
//!
//! Adding a channel kind means a variant of [`ChannelKind`] with its name in [`TYPES`] and its
//! arms in [`ChannelKind::parse`], [`ChannelKind::seeds`], [`ChannelKind::needs_seeds`],
//! [`ChannelKind::request_keys`] and [`ChannelKind::names`] (all in this file; the matches on
//! the enum are exhaustive, so the compiler lists them), and the glue's arms that fetch its hits
//! and check what it names in the database.

use serde_json::Value;
use std::collections::HashSet;
use twotower_options::{Obj, OptionError};

/// The most candidates one channel may return.
pub const MAX_CHANNEL_K: u64 = 10_000;
/// The most history items a channel reads from a request.
pub const MAX_HISTORY: u64 = 10_000;
/// The widest search list a two-tower channel may ask for.
pub const MAX_EF_SEARCH: u64 = 100_000;

/// The most request keys a function channel may declare.
pub const MAX_FEATURE_KEYS: usize = 256;

/// The channel kinds, by their `type` in a pipeline definition.
pub const TYPES: &[&str] = &["twotower", "i2i", "function"];

#[derive(Debug, Clone, PartialEq)]
pub enum ChannelKind {
    /// The user vector against a twotower_hnsw index (its table holds the item vectors).
    TwoTower {
        index: String,
        ef_search: Option<usize>,
    },
    /// An item-to-item channel over the most recent `history_len` history items, the i-th
    /// (0-based, most recent first) weighted `decay^i`.
    I2i {
        channel: String,
        history_len: usize,
        decay: f64,
    },
    /// A SQL function `f(features jsonb, k integer) RETURNS TABLE (item_id bigint, score real)`
    /// of the application's (popular items, new items, an editor's list), called as the caller;
    /// `features` are the request keys it reads (allowed next to a strict user tower's).
    Function {
        function: String,
        features: Vec<String>,
    },
}

/// What reaches a channel for one request: the user tower's vector, the weighted history
/// seeds (item, weight) of an item-to-item channel, the request's features, how many hits it
/// returns at most, and the items it must never return.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub user: &'a [f32],
    pub seeds: &'a [(i64, f32)],
    pub features: &'a Value,
    pub k: usize,
    pub exclude: &'a HashSet<i64>,
}

/// What a channel names in the database (for the dependencies of a pipeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names<'a> {
    Index(&'a str),
    Channel(&'a str),
    Function(&'a str),
}

impl ChannelKind {
    /// The kind `ty` from its channel object `o` (the keys common to every kind, `name`, `type`
    /// and `k`, are read by the caller). `history` says whether the pipeline names a history key.
    pub(crate) fn parse(ty: &str, o: &Obj, history: bool) -> Result<ChannelKind, OptionError> {
        const COMMON: [&str; 3] = ["name", "type", "k"];
        let allow = |own: &[&str]| {
            let keys: Vec<&str> = COMMON.iter().chain(own).copied().collect();
            o.allow(&keys)
        };
        match ty {
            "twotower" => {
                allow(&["index", "ef_search"])?;
                Ok(ChannelKind::TwoTower {
                    index: o.string("index")?,
                    ef_search: o
                        .opt_uint("ef_search", 1, MAX_EF_SEARCH)?
                        .map(|n| n as usize),
                })
            }
            "i2i" => {
                allow(&["channel", "history_len", "decay"])?;
                if !history {
                    return Err(o.error(
                        "type",
                        "an i2i channel needs the pipeline's \"history\" key",
                    ));
                }
                Ok(ChannelKind::I2i {
                    channel: o.string("channel")?,
                    history_len: o.size("history_len", 50, 1, MAX_HISTORY as usize)?,
                    decay: o.number_or(
                        "decay",
                        1.0,
                        |d| d > 0.0 && d <= 1.0,
                        "a number in (0, 1]",
                    )?,
                })
            }
            "function" => {
                allow(&["function", "features"])?;
                let mut features = Vec::new();
                for (path, v) in o.array("features", MAX_FEATURE_KEYS)? {
                    match v.as_str() {
                        Some(k) if !k.is_empty() => features.push(k.to_owned()),
                        _ => {
                            return Err(twotower_options::error(
                                path,
                                format!("must be a feature name, got {v}"),
                            ))
                        }
                    }
                }
                Ok(ChannelKind::Function {
                    function: o.string("function")?,
                    features,
                })
            }
            other => Err(o.error(
                "type",
                format!(
                    "must be one of \"{}\", got \"{other}\"",
                    TYPES.join("\", \"")
                ),
            )),
        }
    }

    /// The history seeds this kind asks with: for an item-to-item channel the most recent
    /// `history_len` items, the i-th weighted `decay^i`; none for the others.
    pub fn seeds(&self, history: &[i64]) -> Vec<(i64, f32)> {
        match self {
            ChannelKind::I2i {
                history_len, decay, ..
            } => history
                .iter()
                .take(*history_len)
                .enumerate()
                .map(|(i, id)| (*id, decay.powi(i as i32) as f32))
                .collect(),
            ChannelKind::TwoTower { .. } | ChannelKind::Function { .. } => Vec::new(),
        }
    }

    /// Whether a request without history seeds can skip this channel (it would return nothing).
    pub fn needs_seeds(&self) -> bool {
        match self {
            ChannelKind::I2i { .. } => true,
            ChannelKind::TwoTower { .. } | ChannelKind::Function { .. } => false,
        }
    }

    /// The request keys this channel reads itself (beyond the towers' features).
    pub fn request_keys(&self) -> &[String] {
        match self {
            ChannelKind::Function { features, .. } => features,
            ChannelKind::TwoTower { .. } | ChannelKind::I2i { .. } => &[],
        }
    }

    /// What this channel names in the database.
    pub fn names(&self) -> Names<'_> {
        match self {
            ChannelKind::TwoTower { index, .. } => Names::Index(index),
            ChannelKind::I2i { channel, .. } => Names::Channel(channel),
            ChannelKind::Function { function, .. } => Names::Function(function),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChannelDef {
    pub name: String,
    pub kind: ChannelKind,
    pub k: usize,
}

/// A channel's name: an identifier of at most 63 characters.
pub(crate) fn check_name(o: &Obj, key: &str, s: &str) -> Result<(), OptionError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(o.error(
            key,
            format!(
                "\"{s}\" is not a channel name ([A-Za-z_][A-Za-z0-9_]*, at most 63 characters)"
            ),
        ))
    }
}
