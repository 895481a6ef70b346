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
//!     {"name": "itemcf", "type": "i2i", "channel": "ml_itemcf", "k": 300, "history_len": 20, "decay": 0.8}
//!   ],
//!   "merge": {"strategy": "rrf", "k": 500, "options": {"weights": {"twotower": 2}}},
//!   "stages": [{"type": "twotower", "keep": 300}, {"type": "model", "model": "ml_prerank", "keep": 100}],
//!   "k": 50
//! }
//! ```

use serde_json::{Map, Value};
use thiserror::Error;

/// The most channels, stages, and candidates per channel / merge a pipeline may ask for.
pub const MAX_CHANNELS: usize = 16;
pub const MAX_STAGES: usize = 8;
pub const MAX_CHANNEL_K: u64 = 10_000;
pub const MAX_MERGE_K: u64 = 100_000;
/// The most history items a pipeline reads from a request.
pub const MAX_HISTORY: u64 = 10_000;

#[derive(Debug, Error, PartialEq)]
#[error("invalid pipeline definition at \"{path}\": {reason}")]
pub struct DefinitionError {
    pub path: String,
    pub reason: String,
}

type Result<T> = std::result::Result<T, DefinitionError>;

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
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChannelDef {
    pub name: String,
    pub kind: ChannelKind,
    pub k: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergeDef {
    pub strategy: String,
    pub options: Map<String, Value>,
    pub k: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StageKind {
    TwoTower,
    Model(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct StageDef {
    pub kind: StageKind,
    pub keep: usize,
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

struct Obj<'a> {
    m: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, path: &str) -> Result<Obj<'a>> {
        match v {
            Value::Object(m) => Ok(Obj {
                m,
                path: path.to_owned(),
            }),
            other => err(path, format!("must be an object, got {}", kind(other))),
        }
    }

    fn p(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn allow(&self, keys: &[&str]) -> Result<()> {
        match self.m.keys().find(|k| !keys.contains(&k.as_str())) {
            Some(k) => err(
                self.p(k),
                format!("unknown key (allowed here: {})", keys.join(", ")),
            ),
            None => Ok(()),
        }
    }

    fn str_or(&self, key: &str, default: Option<&str>) -> Result<String> {
        match (self.m.get(key), default) {
            (Some(Value::String(s)), _) if !s.is_empty() => Ok(s.clone()),
            (None | Some(Value::Null), Some(d)) => Ok(d.to_owned()),
            (None | Some(Value::Null), None) => err(self.p(key), "is required"),
            (Some(v), _) => err(self.p(key), format!("must be a non-empty string, got {v}")),
        }
    }

    fn uint_or(&self, key: &str, lo: u64, hi: u64, default: Option<u64>) -> Result<u64> {
        match (self.m.get(key), default) {
            (None | Some(Value::Null), Some(d)) => Ok(d),
            (None | Some(Value::Null), None) => err(self.p(key), "is required"),
            (Some(v), _) => match v.as_u64() {
                Some(n) if (lo..=hi).contains(&n) => Ok(n),
                _ => err(
                    self.p(key),
                    format!("must be an integer from {lo} to {hi}, got {v}"),
                ),
            },
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn identifier(path: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        err(
            path,
            format!(
                "\"{s}\" is not a channel name ([A-Za-z_][A-Za-z0-9_]*, at most 63 characters)"
            ),
        )
    }
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
        let user_model = o.str_or("user_model", None)?;
        let vo = Obj::new(o.m.get("vectors").unwrap_or(&Value::Null), "vectors")?;
        vo.allow(&["table", "id_column", "vector_column"])?;
        let vectors = Vectors {
            table: vo.str_or("table", None)?,
            id_column: vo.str_or("id_column", Some("id"))?,
            vector_column: vo.str_or("vector_column", Some("embedding"))?,
        };
        let item_features = match o.m.get("item_features") {
            None | Some(Value::Null) => None,
            Some(f) => {
                let fo = Obj::new(f, "item_features")?;
                fo.allow(&["table", "id_column"])?;
                Some(ItemFeatures {
                    table: fo.str_or("table", None)?,
                    id_column: fo.str_or("id_column", Some("id"))?,
                })
            }
        };
        let history = match o.m.get("history") {
            None | Some(Value::Null) => None,
            Some(_) => Some(o.str_or("history", None)?),
        };
        let exclude_history = match o.m.get("exclude_history") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => return err("exclude_history", format!("must be true or false, got {v}")),
        };

        // No channels: a pipeline for `prerank` over the caller's candidates only.
        let empty = Vec::new();
        let chs = match o.m.get("channels") {
            None | Some(Value::Null) => &empty,
            Some(Value::Array(a)) if a.len() <= MAX_CHANNELS => a,
            Some(v) => {
                return err(
                    "channels",
                    format!("must be an array of at most {MAX_CHANNELS} channels, got {v}"),
                )
            }
        };
        let mut channels: Vec<ChannelDef> = Vec::with_capacity(chs.len());
        for (i, c) in chs.iter().enumerate() {
            let path = format!("channels[{i}]");
            let co = Obj::new(c, &path)?;
            let ty = co.str_or("type", None)?;
            let kind = match ty.as_str() {
                "twotower" => {
                    co.allow(&["name", "type", "index", "k", "ef_search"])?;
                    ChannelKind::TwoTower {
                        index: co.str_or("index", None)?,
                        ef_search: match co.m.get("ef_search") {
                            None | Some(Value::Null) => None,
                            Some(_) => {
                                Some(co.uint_or("ef_search", 1, MAX_MERGE_K, None)? as usize)
                            }
                        },
                    }
                }
                "i2i" => {
                    co.allow(&["name", "type", "channel", "k", "history_len", "decay"])?;
                    if history.is_none() {
                        return err(
                            co.p("type"),
                            "an i2i channel needs the pipeline's \"history\" key",
                        );
                    }
                    let decay = match co.m.get("decay") {
                        None | Some(Value::Null) => 1.0,
                        Some(v) => match v.as_f64() {
                            Some(d) if d > 0.0 && d <= 1.0 => d,
                            _ => {
                                return err(
                                    co.p("decay"),
                                    format!("must be a number in (0, 1], got {v}"),
                                )
                            }
                        },
                    };
                    ChannelKind::I2i {
                        channel: co.str_or("channel", None)?,
                        history_len: co.uint_or("history_len", 1, MAX_HISTORY, Some(50))? as usize,
                        decay,
                    }
                }
                other => {
                    return err(
                        co.p("type"),
                        format!("must be \"twotower\" or \"i2i\", got \"{other}\""),
                    )
                }
            };
            let name = co.str_or("name", Some(&ty))?;
            identifier(&co.p("name"), &name)?;
            if channels.iter().any(|c| c.name == name) {
                return err(co.p("name"), format!("duplicate channel name \"{name}\""));
            }
            let k = co.uint_or("k", 1, MAX_CHANNEL_K, None)? as usize;
            channels.push(ChannelDef { name, kind, k });
        }

        let total: u64 = channels.iter().map(|c| c.k as u64).sum();
        if channels.is_empty() && o.m.get("merge").is_some_and(|m| !m.is_null()) {
            return err("merge", "a pipeline without channels has nothing to merge");
        }
        let merge = match o.m.get("merge") {
            None | Some(Value::Null) if channels.is_empty() => MergeDef {
                strategy: "rrf".into(),
                options: Map::new(),
                k: MAX_MERGE_K as usize,
            },
            None | Some(Value::Null) => MergeDef {
                strategy: "rrf".into(),
                options: Map::new(),
                k: total as usize,
            },
            Some(m) => {
                let mo = Obj::new(m, "merge")?;
                mo.allow(&["strategy", "options", "k"])?;
                let options = match mo.m.get("options") {
                    None | Some(Value::Null) => Map::new(),
                    Some(Value::Object(m)) => m.clone(),
                    Some(v) => return err("merge.options", format!("must be an object, got {v}")),
                };
                if options.contains_key("order") {
                    return err(
                        "merge.options.order",
                        "the channels' order in a pipeline is the order of \"channels\"",
                    );
                }
                MergeDef {
                    strategy: mo.str_or("strategy", Some("rrf"))?,
                    options,
                    k: mo.uint_or("k", 1, MAX_MERGE_K, Some(total.min(MAX_MERGE_K)))? as usize,
                }
            }
        };

        let stages = match o.m.get("stages") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) if a.len() <= MAX_STAGES => {
                let mut out: Vec<StageDef> = Vec::with_capacity(a.len());
                let mut gets = merge.k;
                for (i, s) in a.iter().enumerate() {
                    let so = Obj::new(s, &format!("stages[{i}]"))?;
                    let kind = match so.str_or("type", None)?.as_str() {
                        "twotower" => {
                            so.allow(&["type", "keep"])?;
                            StageKind::TwoTower
                        }
                        "model" => {
                            so.allow(&["type", "model", "keep"])?;
                            StageKind::Model(so.str_or("model", None)?)
                        }
                        other => {
                            return err(
                                so.p("type"),
                                format!("must be \"twotower\" or \"model\", got \"{other}\""),
                            )
                        }
                    };
                    let keep = so.uint_or("keep", 1, MAX_MERGE_K, None)? as usize;
                    if keep > gets {
                        let from = match (i, channels.is_empty()) {
                            (0, true) => "caller's candidates",
                            (0, false) => "merge",
                            _ => "stage before",
                        };
                        return err(so.p("keep"), format!("the stage keeps {keep} candidates but gets at most {gets} (from the {from})"));
                    }
                    gets = keep;
                    out.push(StageDef { kind, keep });
                }
                out
            }
            Some(v) => {
                return err(
                    "stages",
                    format!("must be an array of at most {MAX_STAGES} stages, got {v}"),
                )
            }
        };
        let most = stages.last().map_or(merge.k, |s| s.keep);
        let k = o.uint_or("k", 1, most as u64, Some(most.min(100) as u64))? as usize;
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

    /// The most results a request may ask for: what the last stage (or the merge) keeps.
    pub fn most(&self) -> usize {
        self.stages.last().map_or(self.merge.k, |s| s.keep)
    }
}
