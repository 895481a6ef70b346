//! Training data: users and items with their feature objects, interactions, the point-in-time
//! history of each interaction, the validation split and vocabularies.
//!
//! **The leakage rule.** An interaction's history holds only the user's interactions before it
//! in time order; interactions with equal timestamps keep their input order (the tie rule), so
//! the history of an interaction never holds it or anything after it. Serving builds the
//! history with the same function ([`history`]) from the interactions up to "now".

use crate::config::Decay;
use crate::error::{Result, TrainError};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// One interaction, users and items by index into [`Data::users`] / [`Data::items`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interaction {
    pub user: u32,
    pub item: u32,
    pub ts: f64,
    pub weight: f32,
}

/// Users, items (ids as canonical strings, feature objects) and interactions.
#[derive(Debug, Default)]
pub struct Data {
    pub users: Vec<Entity>,
    pub items: Vec<Entity>,
    pub interactions: Vec<Interaction>,
    /// Negative feedback (items the user disliked: skipped, rated low): trained against by the
    /// negative-feedback term, and read by negative histories only.
    pub negative: Vec<Interaction>,
    /// Per user: hard negatives (e.g. items the ranking stage rejected), item indexes.
    pub hard: HashMap<u32, Vec<u32>>,
    user_index: HashMap<String, u32>,
    item_index: HashMap<String, u32>,
}

#[derive(Debug, Clone)]
pub struct Entity {
    pub id: String,
    /// The feature object (a row of the features source); `{}` when the source has no row.
    pub features: Map<String, Value>,
}

fn intern(index: &mut HashMap<String, u32>, list: &mut Vec<Entity>, id: &str) -> Result<u32> {
    if let Some(&i) = index.get(id) {
        return Ok(i);
    }
    let i = u32::try_from(list.len())
        .ok()
        .filter(|&i| i < u32::MAX - 1)
        .ok_or_else(|| TrainError::NoData("more than 4 billion distinct ids".into()))?;
    list.push(Entity {
        id: id.to_owned(),
        features: Map::new(),
    });
    index.insert(id.to_owned(), i);
    Ok(i)
}

impl Data {
    /// Sets the feature object of a user (creating the user).
    pub fn user_features(&mut self, id: &str, features: Map<String, Value>) -> Result<u32> {
        let i = intern(&mut self.user_index, &mut self.users, id)?;
        self.users[i as usize].features = features;
        Ok(i)
    }

    pub fn item_features(&mut self, id: &str, features: Map<String, Value>) -> Result<u32> {
        let i = intern(&mut self.item_index, &mut self.items, id)?;
        self.items[i as usize].features = features;
        Ok(i)
    }

    /// Adds an interaction (users and items are created when new); `ts` must be finite and
    /// `weight` finite and positive.
    pub fn interaction(&mut self, user: &str, item: &str, ts: f64, weight: f32) -> Result<()> {
        if !ts.is_finite() {
            return Err(TrainError::NoData(format!(
                "interaction ({user}, {item}) has a non-finite timestamp"
            )));
        }
        if !(weight.is_finite() && weight > 0.0) {
            return Err(TrainError::NoData(format!("interaction ({user}, {item}) has weight {weight}: weights must be positive and finite")));
        }
        let u = intern(&mut self.user_index, &mut self.users, user)?;
        let i = intern(&mut self.item_index, &mut self.items, item)?;
        self.interactions.push(Interaction {
            user: u,
            item: i,
            ts,
            weight,
        });
        Ok(())
    }

    /// Adds a negative-feedback interaction (the same rules as [`Data::interaction`]).
    pub fn negative_feedback(
        &mut self,
        user: &str,
        item: &str,
        ts: f64,
        weight: f32,
    ) -> Result<()> {
        let n = self.interactions.len();
        self.interaction(user, item, ts, weight)?;
        let x = self.interactions.pop().expect("just added");
        debug_assert_eq!(self.interactions.len(), n);
        self.negative.push(x);
        Ok(())
    }

    /// Adds a hard negative of a user (users and items are created when new).
    pub fn hard_negative(&mut self, user: &str, item: &str) -> Result<()> {
        let u = intern(&mut self.user_index, &mut self.users, user)?;
        let i = intern(&mut self.item_index, &mut self.items, item)?;
        self.hard.entry(u).or_default().push(i);
        Ok(())
    }

    pub fn item_index(&self, id: &str) -> Option<u32> {
        self.item_index.get(id).copied()
    }

    /// Each user's negative feedback in time order (ties in input order): indexes into
    /// `negative`.
    pub fn negative_timelines(&self) -> Vec<Vec<u32>> {
        let mut t: Vec<Vec<u32>> = vec![Vec::new(); self.users.len()];
        for (k, x) in self.negative.iter().enumerate() {
            t[x.user as usize].push(k as u32);
        }
        for list in &mut t {
            list.sort_by(|&a, &b| {
                self.negative[a as usize]
                    .ts
                    .total_cmp(&self.negative[b as usize].ts)
            });
        }
        t
    }

    /// Each user's interactions in time order (ties in input order): indexes into
    /// `interactions`.
    pub fn timelines(&self) -> Vec<Vec<u32>> {
        let mut t: Vec<Vec<u32>> = vec![Vec::new(); self.users.len()];
        for (k, x) in self.interactions.iter().enumerate() {
            t[x.user as usize].push(k as u32);
        }
        for list in &mut t {
            // Stable: equal timestamps keep their input order.
            list.sort_by(|&a, &b| {
                self.interactions[a as usize]
                    .ts
                    .total_cmp(&self.interactions[b as usize].ts)
            });
        }
        t
    }
}

/// The history feature value of a user at time `at`: from `past` (the user's earlier
/// interactions as (item id, timestamp), oldest first, none of them after the moment being
/// predicted), the last `max_len`, most recent first, weighted by `decay`. Without decay the
/// value is a plain list of ids; with decay `{"ids": [...], "weights": [...]}`.
pub fn history<'a>(
    past: impl DoubleEndedIterator<Item = (&'a str, f64)>,
    at: f64,
    max_len: usize,
    decay: &Decay,
) -> Value {
    let recent: Vec<(&str, f64)> = past.rev().take(max_len).collect();
    let ids: Vec<Value> = recent
        .iter()
        .map(|(id, _)| Value::String((*id).to_owned()))
        .collect();
    match decay {
        Decay::None => Value::Array(ids),
        Decay::Position(f) => {
            let weights = (0..recent.len())
                .map(|i| json_f32(f.powi(i as i32)))
                .collect();
            let mut m = Map::new();
            m.insert("ids".into(), Value::Array(ids));
            m.insert("weights".into(), Value::Array(weights));
            Value::Object(m)
        }
        Decay::Age(half_life) => {
            let weights = recent
                .iter()
                .map(|(_, ts)| json_f32(0.5f64.powf(((at - ts).max(0.0)) / half_life)))
                .collect();
            let mut m = Map::new();
            m.insert("ids".into(), Value::Array(ids));
            m.insert("weights".into(), Value::Array(weights));
            Value::Object(m)
        }
    }
}

/// A history feature of the user tower: its name, length and weighting.
#[derive(Debug, Clone, PartialEq)]
pub struct HistorySpec {
    pub name: String,
    pub max_len: usize,
    pub decay: Decay,
    /// Of the user's negative feedback instead of their positive interactions.
    pub negative: bool,
}

impl HistorySpec {
    /// As stored with a trained model (`twotower.user_features` reads it back).
    pub fn to_json(&self) -> Value {
        let decay = match self.decay {
            Decay::None => Value::Null,
            Decay::Position(f) => serde_json::json!({ "position": f }),
            Decay::Age(h) => serde_json::json!({ "half_life": h }),
        };
        let mut v =
            serde_json::json!({ "name": self.name, "max_len": self.max_len, "decay": decay });
        if self.negative {
            v["feedback"] = Value::String("negative".into());
        }
        v
    }

    pub fn from_json(v: &Value) -> Option<HistorySpec> {
        let name = v.get("name")?.as_str()?.to_owned();
        let max_len = v.get("max_len")?.as_u64()? as usize;
        let decay = match v.get("decay") {
            None | Some(Value::Null) => Decay::None,
            Some(d) => match (
                d.get("position").and_then(Value::as_f64),
                d.get("half_life").and_then(Value::as_f64),
            ) {
                (Some(f), None) => Decay::Position(f),
                (None, Some(h)) => Decay::Age(h),
                _ => return None,
            },
        };
        let negative = match v.get("feedback") {
            None | Some(Value::Null) => false,
            Some(f) => match f.as_str()? {
                "positive" => false,
                "negative" => true,
                _ => return None,
            },
        };
        Some(HistorySpec {
            name,
            max_len,
            decay,
            negative,
        })
    }
}

/// The user tower's input at time `at`, from the user's feature row (`features`, may be empty),
/// the user's id (added under `key`, when given, if the row lacks it), `past`, the user's
/// interactions before the moment (item id, timestamp; oldest first), and `past_negative`,
/// their negative feedback before it (the same; read by `negative` histories only). The one
/// function that builds user inputs, for training (at each interaction) and for serving
/// (`twotower.user_features`).
pub fn user_input<'a, 'b>(
    features: &Map<String, Value>,
    key: Option<&str>,
    id: &str,
    histories: &[HistorySpec],
    past: impl DoubleEndedIterator<Item = (&'a str, f64)> + Clone,
    past_negative: impl DoubleEndedIterator<Item = (&'b str, f64)> + Clone,
    at: f64,
) -> Value {
    let mut m = features.clone();
    if let Some(key) = key {
        if !m.contains_key(key) {
            m.insert(key.to_owned(), Value::String(id.to_owned()));
        }
    }
    for h in histories {
        let v = if h.negative {
            history(past_negative.clone(), at, h.max_len, &h.decay)
        } else {
            history(past.clone(), at, h.max_len, &h.decay)
        };
        m.insert(h.name.clone(), v);
    }
    Value::Object(m)
}

/// A weight as the JSON number of its f32 value (what the tower reads), never NaN.
fn json_f32(x: f64) -> Value {
    // The shortest decimal that reads back as the same f32 (0.8, not 0.800000011920929).
    let shortest: f64 = (x as f32).to_string().parse().unwrap_or(0.0);
    serde_json::Number::from_f64(shortest).map_or(Value::from(0), Value::Number)
}

/// A vocabulary built from counted ids: ids with at least `min_count` occurrences, the most
/// frequent `max_size` of them (ties by id), in that order (row i + 1 is `ids[i]`).
pub fn vocabulary(counts: &HashMap<String, u64>, min_count: u64, max_size: usize) -> Vec<String> {
    let mut v: Vec<(&String, u64)> = counts
        .iter()
        .filter(|(_, &c)| c >= min_count)
        .map(|(k, &c)| (k, c))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v.truncate(max_size);
    v.into_iter().map(|(k, _)| k.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_most_recent_first_truncated_and_weighted() {
        let past = [("a", 1.0), ("b", 2.0), ("c", 3.0)];
        let h = history(past.iter().copied(), 4.0, 2, &Decay::None);
        assert_eq!(h, serde_json::json!(["c", "b"]));
        let h = history(past.iter().copied(), 4.0, 3, &Decay::Position(0.5));
        assert_eq!(
            h,
            serde_json::json!({"ids": ["c", "b", "a"], "weights": [1.0, 0.5, 0.25]})
        );
        let h = history(past.iter().copied(), 5.0, 1, &Decay::Age(2.0));
        assert_eq!(h, serde_json::json!({"ids": ["c"], "weights": [0.5]}));
    }

    #[test]
    fn history_specs_round_trip_through_json() {
        for negative in [false, true] {
            for decay in [Decay::None, Decay::Position(0.9), Decay::Age(86400.0)] {
                let h = HistorySpec {
                    name: "history".into(),
                    max_len: 50,
                    decay,
                    negative,
                };
                assert_eq!(HistorySpec::from_json(&h.to_json()), Some(h));
            }
        }
    }

    #[test]
    fn timelines_keep_equal_timestamps_in_input_order() {
        let mut d = Data::default();
        d.interaction("u", "x", 5.0, 1.0).unwrap();
        d.interaction("u", "y", 1.0, 1.0).unwrap();
        d.interaction("u", "z", 5.0, 1.0).unwrap();
        d.interaction("v", "x", 0.0, 1.0).unwrap();
        let t = d.timelines();
        assert_eq!(t[0], vec![1, 0, 2]);
        assert_eq!(t[1], vec![3]);
        assert!(d.interaction("u", "x", f64::NAN, 1.0).is_err());
        assert!(d.interaction("u", "x", 1.0, 0.0).is_err());
    }

    #[test]
    fn vocabulary_by_count_then_id() {
        let counts: HashMap<String, u64> = [("a", 3), ("b", 5), ("c", 3), ("d", 1)]
            .iter()
            .map(|(k, c)| (k.to_string(), *c))
            .collect();
        assert_eq!(vocabulary(&counts, 2, 10), vec!["b", "a", "c"]);
        assert_eq!(vocabulary(&counts, 1, 2), vec!["b", "a"]);
    }
}
