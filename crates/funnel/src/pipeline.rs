//! Pipeline definitions: the whole funnel of one `recommend` call as a JSON document, parsed and
//! checked for shape here (keys, types, ranges, stages that never keep more than they get).
//! Whether the models, tables and channels it names exist is checked by the caller, which knows
//! the database.
//!
//! ```json
//! {
//!   "user_model": "ml_user",
//!   "vectors": {"table": "ml_item_vectors", "id_column": "id", "vector_column": "embedding"},
//!   "item_features": {"table": "ml_items", "id_column": "id"},
//!   "history": "history",
//!   "exclude_history": true,
//!   "channels": [
//!     {"name": "twotower", "type": "twotower", "index": "ml_item_vectors_embedding_idx", "k": 300},
//!     {"name": "itemcf", "type": "i2i", "channel": "ml_itemcf", "k": 300, "history_len": 20, "decay": 0.8},
//!     {"name": "popular", "type": "function", "function": "popular_items", "k": 50}
//!   ],
//!   "merge": {"strategy": "rrf", "k": 500, "options": {"weights": {"twotower": 2}}},
//!   "stages": [{"type": "twotower", "keep": 300}, {"type": "model", "model": "ml_prerank", "keep": 100}],
//!   "k": 50
//! }
//! ```

use crate::channel::{self, ChannelDef, ChannelKind, Names};
use crate::merge::{Strategy, StrategyError};
use serde_json::{Map, Value};
use thiserror::Error;
use twotower_options::{Obj, OptionError};

pub use crate::channel::{MAX_CHANNEL_K, MAX_HISTORY};

/// The most channels, stages, and candidates per merge a pipeline may ask for.
pub const MAX_CHANNELS: usize = 16;
pub const MAX_STAGES: usize = 8;
pub const MAX_MERGE_K: u64 = 100_000;

#[derive(Debug, Error, PartialEq)]
#[error("invalid pipeline definition at \"{path}\": {reason}")]
pub struct DefinitionError {
    pub path: String,
    pub reason: String,
}

impl From<OptionError> for DefinitionError {
    fn from(e: OptionError) -> Self {
        DefinitionError {
            path: e.path,
            reason: e.reason,
        }
    }
}

type Result<T> = std::result::Result<T, DefinitionError>;

fn strategy_err(e: StrategyError) -> DefinitionError {
    DefinitionError {
        path: if e.strategy {
            "merge.strategy"
        } else {
            "merge.options"
        }
        .into(),
        reason: e.message,
    }
}

fn err<T>(path: impl Into<String>, reason: impl Into<String>) -> Result<T> {
    Err(DefinitionError {
        path: path.into(),
        reason: reason.into(),
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct Vectors {
    pub table: String,
    pub id_column: String,
    pub vector_column: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ItemFeatures {
    pub table: String,
    pub id_column: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergeDef {
    /// The strategy's name, as written.
    pub name: String,
    pub strategy: Strategy,
    pub k: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StageKind {
    TwoTower,
    Model(String),
    /// Business rules and diversity over the list (the last stage only).
    Rerank(crate::rerank::Rerank),
}

#[derive(Debug, Clone, PartialEq)]
pub struct StageDef {
    pub kind: StageKind,
    pub keep: usize,
    /// What a model stage ranks by: a multi-task model's task, or `fused` (the default).
    pub score: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub user_model: String,
    pub vectors: Vectors,
    pub item_features: Option<ItemFeatures>,
    /// The key of the request's features holding the user's history (most recent first).
    pub history: Option<String>,
    pub exclude_history: bool,
    pub channels: Vec<ChannelDef>,
    pub merge: MergeDef,
    pub stages: Vec<StageDef>,
    pub k: usize,
}

/// What a pipeline can depend on (and so keeps from being dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uses {
    Model,
    Channel,
}

impl Definition {
    pub fn parse(v: &Value) -> Result<Definition> {
        let o = Obj::new(v, "")?;
        o.allow(&[
            "user_model",
            "vectors",
            "item_features",
            "history",
            "exclude_history",
            "channels",
            "merge",
            "stages",
            "k",
        ])?;
        let user_model = o.string("user_model")?;
        let vo = Obj::new(o.get("vectors").unwrap_or(&Value::Null), "vectors")?;
        vo.allow(&["table", "id_column", "vector_column"])?;
        let vectors = Vectors {
            table: vo.string("table")?,
            id_column: vo.string_or("id_column", "id")?,
            vector_column: vo.string_or("vector_column", "embedding")?,
        };
        let item_features = match o.object("item_features")? {
            None => None,
            Some(fo) => {
                fo.allow(&["table", "id_column"])?;
                Some(ItemFeatures {
                    table: fo.string("table")?,
                    id_column: fo.string_or("id_column", "id")?,
                })
            }
        };
        let history = o.opt_string("history")?;
        let exclude_history = o.bool_or("exclude_history", true)?;

        // No channels: a pipeline for `prerank` over the caller's candidates only.
        let mut channels: Vec<ChannelDef> = Vec::new();
        for (path, c) in o.array("channels", MAX_CHANNELS)? {
            let co = Obj::new(c, path)?;
            let ty = co.string("type")?;
            let kind = ChannelKind::parse(&ty, &co, history.is_some())?;
            let name = co.string_or("name", &ty)?;
            channel::check_name(&co, "name", &name)?;
            if channels.iter().any(|c| c.name == name) {
                return err(co.p("name"), format!("duplicate channel name \"{name}\""));
            }
            let k = co.uint("k", 1, MAX_CHANNEL_K)? as usize;
            channels.push(ChannelDef { name, kind, k });
        }

        let total: u64 = channels.iter().map(|c| c.k as u64).sum();
        let names: Vec<String> = channels.iter().map(|c| c.name.clone()).collect();
        let merge = match o.object("merge")? {
            Some(_) if channels.is_empty() => {
                return err("merge", "a pipeline without channels has nothing to merge")
            }
            None => MergeDef {
                name: "rrf".into(),
                strategy: Strategy::parse("rrf", &Map::new(), &names).map_err(strategy_err)?,
                k: if channels.is_empty() {
                    MAX_MERGE_K as usize
                } else {
                    total as usize
                },
            },
            Some(mo) => {
                mo.allow(&["strategy", "options", "k"])?;
                let empty = Map::new();
                let options = match mo.object("options")? {
                    None => &empty,
                    Some(_) => mo
                        .get("options")
                        .and_then(Value::as_object)
                        .unwrap_or(&empty),
                };
                if options.contains_key("order") {
                    return err(
                        "merge.options.order",
                        "the channels' order in a pipeline is the order of \"channels\"",
                    );
                }
                let name = mo.string_or("strategy", "rrf")?;
                MergeDef {
                    strategy: Strategy::parse(&name, options, &names).map_err(strategy_err)?,
                    name,
                    k: mo.size(
                        "k",
                        total.min(MAX_MERGE_K) as usize,
                        1,
                        MAX_MERGE_K as usize,
                    )?,
                }
            }
        };

        let mut stages: Vec<StageDef> = Vec::new();
        let mut gets = merge.k;
        let listed = o.array("stages", MAX_STAGES)?;
        let last = listed.len().saturating_sub(1);
        for (i, (path, s)) in listed.into_iter().enumerate() {
            let so = Obj::new(s, path)?;
            let mut score = None;
            let kind = match so.string("type")?.as_str() {
                "rerank" => {
                    so.allow(&["type", "keep", "rules"])?;
                    if i != last {
                        return err(so.p("type"), "a rerank stage must be the last stage");
                    }
                    let keep = so.uint("keep", 1, MAX_MERGE_K)? as usize;
                    let rr = crate::rerank::Rerank::parse(&so, keep)?;
                    if !rr.columns().is_empty() && item_features.is_none() {
                        return err(
                            so.p("rules"),
                            format!("the rules read item columns ({}): the pipeline needs \"item_features\"", rr.columns().join(", ")),
                        );
                    }
                    for (ri, r) in rr.rules.iter().enumerate() {
                        if let crate::rerank::Rule::Explore { channel, .. } = r {
                            if !channels.iter().any(|c| &c.name == channel) {
                                return err(
                                    format!("{}[{ri}].channel", so.p("rules")),
                                    format!("the pipeline has no channel \"{channel}\""),
                                );
                            }
                        }
                    }
                    StageKind::Rerank(rr)
                }
                "twotower" => {
                    so.allow(&["type", "keep"])?;
                    StageKind::TwoTower
                }
                "model" => {
                    so.allow(&["type", "model", "keep", "score"])?;
                    if so.get("score").is_some() {
                        let t = so.string("score")?;
                        if t.is_empty() || t.len() > 63 {
                            return err(
                                so.p("score"),
                                "must name a task of the model (or \"fused\")".to_owned(),
                            );
                        }
                        score = Some(t);
                    }
                    StageKind::Model(so.string("model")?)
                }
                other => {
                    return err(
                        so.p("type"),
                        format!("must be \"twotower\", \"model\" or \"rerank\", got \"{other}\""),
                    )
                }
            };
            let keep = so.uint("keep", 1, MAX_MERGE_K)? as usize;
            if keep > gets {
                let from = match (i, channels.is_empty()) {
                    (0, true) => "caller's candidates",
                    (0, false) => "merge",
                    _ => "stage before",
                };
                return err(
                    so.p("keep"),
                    format!("the stage keeps {keep} candidates but gets at most {gets} (from the {from})"),
                );
            }
            gets = keep;
            stages.push(StageDef { kind, keep, score });
        }
        let most = stages.last().map_or(merge.k, |s| s.keep);
        let k = o.size("k", most.min(100), 1, most)?;
        Ok(Definition {
            user_model,
            vectors,
            item_features,
            history,
            exclude_history,
            channels,
            merge,
            stages,
            k,
        })
    }

    /// Whether the pipeline names model or channel `name` (so dropping it would break it).
    pub fn uses(&self, what: Uses, name: &str) -> bool {
        match what {
            Uses::Model => {
                self.user_model == name
                    || self
                        .stages
                        .iter()
                        .any(|s| matches!(&s.kind, StageKind::Model(m) if m == name))
            }
            Uses::Channel => self
                .channels
                .iter()
                .any(|c| c.kind.names() == Names::Channel(name)),
        }
    }

    /// The channels' names, in the pipeline's order.
    pub fn channel_names(&self) -> Vec<String> {
        self.channels.iter().map(|c| c.name.clone()).collect()
    }

    /// The most results a request may ask for: what the last stage (or the merge) keeps.
    pub fn most(&self) -> usize {
        self.stages.last().map_or(self.merge.k, |s| s.keep)
    }
}
