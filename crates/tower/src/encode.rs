//! Feature encoding: one JSON input object -> an owned [`Encoded`] example.

use crate::error::{json_type, Result, TowerError};
use crate::model::{FeatureKind, Model};
use crate::spec::Lookup;
use serde_json::{Number, Value};
use std::fmt::Write as _;

/// A list input longer than this is rejected, whatever `max_len` says.
pub const MAX_LIST_LEN: usize = 100_000;

/// One feature's encoded input.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Field {
    /// An embedding row (categorical, bucketize; row 0 is OOV / missing).
    Row(u32),
    /// Rows to pool, with weights when the feature is weighted. Never empty: an empty or missing
    /// list is encoded as `rows = [0]`, unweighted.
    Bag {
        rows: Vec<u32>,
        weights: Option<Vec<f32>>,
    },
    /// A numeric field, already transformed.
    Value(f32),
    /// A dense field; `None` means zeros.
    Dense(Option<Vec<f32>>),
}

/// An encoded example: owned, `Send`, produced by [`Model::encode`] and consumed by
/// [`Model::forward`] / [`Model::forward_batch`] of the same model.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub(crate) model_id: u64,
    pub(crate) fields: Vec<Field>,
}

/// A read-only view of one encoded field, for code that computes with the same inputs as the
/// forward pass (the training engine): rows are embedding-table rows (0 = OOV), a bag is never
/// empty, values are already transformed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldRef<'a> {
    Row(u32),
    Bag {
        rows: &'a [u32],
        weights: Option<&'a [f32]>,
    },
    Value(f32),
    Dense(Option<&'a [f32]>),
}

impl Encoded {
    /// The fields, in feature order.
    pub fn fields(&self) -> impl Iterator<Item = FieldRef<'_>> + '_ {
        self.fields.iter().map(|f| match f {
            Field::Row(r) => FieldRef::Row(*r),
            Field::Bag { rows, weights } => FieldRef::Bag {
                rows,
                weights: weights.as_deref(),
            },
            Field::Value(v) => FieldRef::Value(*v),
            Field::Dense(v) => FieldRef::Dense(v.as_deref()),
        })
    }

    /// Number of fields (= features of the model that encoded it).
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Replaces field `i` with a dense value of any length (the training engine hands target
    /// attention its inputs, `[v; h₁; …; hₙ]`, this way; a model's own forward pass reads such
    /// a field as zeros unless its length is the field's width).
    pub fn set_dense(&mut self, i: usize, v: Vec<f32>) {
        if let Some(f) = self.fields.get_mut(i) {
            *f = Field::Dense(Some(v));
        }
    }
}

/// The canonical string of an integral JSON number (`42`, `-7`, `42.0` -> `42`), written to `buf`.
/// `Err` carries the reason when the number is not integral.
pub(crate) fn canonical_number(n: &Number, buf: &mut String) -> std::result::Result<(), String> {
    buf.clear();
    if let Some(i) = n.as_i64() {
        let _ = write!(buf, "{i}");
        return Ok(());
    }
    if let Some(u) = n.as_u64() {
        let _ = write!(buf, "{u}");
        return Ok(());
    }
    // An integer literal beyond 64 bits keeps its exact decimal when serde_json has
    // `arbitrary_precision` (its text is then the literal); otherwise it arrives as an f64.
    let text = n.to_string();
    let digits = text.strip_prefix('-').unwrap_or(&text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if digits.bytes().all(|b| b == b'0') {
            buf.push('0');
        } else {
            buf.push_str(&text);
        }
        return Ok(());
    }
    let Some(f) = n.as_f64().filter(|f| f.is_finite()) else {
        return Err(format!("id {n} is not a finite number"));
    };
    if f.fract() != 0.0 {
        return Err(format!("id {n} is not an integer"));
    }
    if f == 0.0 {
        buf.push('0');
    } else if f.abs() < 9.2e18 {
        let _ = write!(buf, "{}", f as i64);
    } else {
        // Exact decimal expansion of the integral double (what Python's int(x) prints).
        let _ = write!(buf, "{f:.0}");
    }
    Ok(())
}

/// The canonical string of an id value, or `None` for null. Public for tests and tools.
pub fn canonical_id(v: &Value) -> std::result::Result<Option<String>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Bool(b) => Ok(Some(b.to_string())),
        Value::Number(n) => {
            let mut s = String::new();
            canonical_number(n, &mut s)?;
            Ok(Some(s))
        }
        other => Err(format!(
            "an id must be a string or an integer, got {}",
            json_type(other)
        )),
    }
}

const ID_EXPECTED: &str = "an id (a string, an integer or a boolean)";

/// The row of one id. `null` is the OOV row for a single id (`in_list = false`) but not an id
/// inside a list.
#[inline]
fn id_row(
    lookup: &Lookup,
    v: &Value,
    feature: &str,
    buf: &mut String,
    in_list: bool,
) -> Result<u32> {
    Ok(match v {
        Value::Null if !in_list => 0,
        Value::String(s) => lookup.row(s),
        Value::Bool(true) => lookup.row("true"),
        Value::Bool(false) => lookup.row("false"),
        Value::Number(n) => {
            canonical_number(n, buf).map_err(|reason| TowerError::FeatureValue {
                feature: feature.to_owned(),
                reason,
            })?;
            lookup.row(buf)
        }
        other => {
            return Err(TowerError::FeatureType {
                feature: feature.to_owned(),
                expected: ID_EXPECTED,
                got: json_type(other),
            })
        }
    })
}

/// A finite JSON number that also fits in an f32.
fn real(v: &Value, feature: &str, expected: &'static str) -> Result<f64> {
    let Value::Number(n) = v else {
        return Err(TowerError::FeatureType {
            feature: feature.to_owned(),
            expected,
            got: json_type(v),
        });
    };
    match n.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(TowerError::FeatureValue {
            feature: feature.to_owned(),
            reason: format!("{n} is not a finite number"),
        }),
    }
}

fn to_f32(x: f64, feature: &str, what: &str) -> Result<f32> {
    let v = x as f32;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(TowerError::FeatureValue {
            feature: feature.to_owned(),
            reason: format!("{what} {x} is out of the range of real"),
        })
    }
}

fn check_len(n: usize, feature: &str, what: &str) -> Result<()> {
    if n > MAX_LIST_LEN {
        return Err(TowerError::TooLarge {
            what: format!("feature \"{feature}\": a list of {n} {what}"),
            limit: MAX_LIST_LEN,
        });
    }
    Ok(())
}

/// Parses one input object into an encoded, owned example. With `strict`, keys of `input`
/// that are not features are an error ([`TowerError::UnknownFeature`]); otherwise they are
/// ignored (item rows from `to_jsonb(row)` carry extra columns).
pub(crate) fn encode(model: &Model, input: &Value, strict: bool) -> Result<Encoded> {
    Ok(Encoded {
        model_id: model.id,
        fields: encode_where(model, input, strict, |_| true)?,
    })
}

/// The fields of the features `wanted(feature index)` selects, in feature order. With `strict`,
/// a key of `input` that is not one of those features is an error.
pub(crate) fn encode_where(
    model: &Model,
    input: &Value,
    strict: bool,
    wanted: impl Fn(usize) -> bool,
) -> Result<Vec<Field>> {
    let Value::Object(obj) = input else {
        return Err(TowerError::NotAnObject {
            got: json_type(input),
        });
    };
    if strict {
        if let Some(k) = obj
            .keys()
            .find(|k| !model.by_name.get(k.as_str()).is_some_and(|&i| wanted(i)))
        {
            return Err(TowerError::UnknownFeature { name: k.clone() });
        }
    }
    let mut buf = String::new();
    let mut fields = Vec::with_capacity(model.features.len());
    for (i, f) in model.features.iter().enumerate() {
        if !wanted(i) {
            continue;
        }
        let name = f.name.as_str();
        let v = obj.get(name).unwrap_or(&Value::Null);
        let field = match &f.kind {
            FeatureKind::Categorical { lookup, .. } => {
                Field::Row(id_row(lookup, v, name, &mut buf, false)?)
            }
            FeatureKind::Multi {
                lookup,
                max_len,
                weighted,
                ..
            } => encode_bag(lookup, *max_len, *weighted, v, name, &mut buf)?,
            FeatureKind::Numeric {
                transform, missing, ..
            } => match v {
                Value::Null => Field::Value(*missing),
                _ => {
                    let x = real(v, name, "a number")?;
                    Field::Value(to_f32(transform.apply(x), name, "the transformed value")?)
                }
            },
            FeatureKind::Bucketize { boundaries, .. } => match v {
                Value::Null => Field::Row(0),
                _ => {
                    let x = real(v, name, "a number")?;
                    Field::Row(1 + boundaries.partition_point(|b| *b <= x) as u32)
                }
            },
            FeatureKind::Dense { dim } => match v {
                Value::Null => Field::Dense(None),
                Value::Array(a) => {
                    if a.len() != *dim {
                        return Err(TowerError::FeatureValue {
                            feature: name.to_owned(),
                            reason: format!("expected {dim} numbers, got {}", a.len()),
                        });
                    }
                    let mut out = Vec::with_capacity(*dim);
                    for x in a {
                        let x = real(x, name, "an array of numbers")?;
                        out.push(to_f32(x, name, "value")?);
                    }
                    Field::Dense(Some(out))
                }
                other => {
                    return Err(TowerError::FeatureType {
                        feature: name.to_owned(),
                        expected: "an array of numbers",
                        got: json_type(other),
                    })
                }
            },
        };
        fields.push(field);
    }
    Ok(fields)
}

fn encode_bag(
    lookup: &Lookup,
    max_len: usize,
    weighted: bool,
    v: &Value,
    name: &str,
    buf: &mut String,
) -> Result<Field> {
    const LIST: &str = "an array of ids";
    const WEIGHTED: &str = "an object {\"ids\": [...], \"weights\": [...]}";
    let oov = Field::Bag {
        rows: vec![0],
        weights: None,
    };
    let (ids, weights): (&Vec<Value>, Option<&Vec<Value>>) = match (weighted, v) {
        (_, Value::Null) => return Ok(oov),
        (false, Value::Array(a)) => (a, None),
        (false, other) => {
            return Err(TowerError::FeatureType {
                feature: name.to_owned(),
                expected: LIST,
                got: json_type(other),
            })
        }
        (true, Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| *k != "ids" && *k != "weights") {
                return Err(TowerError::FeatureValue {
                    feature: name.to_owned(),
                    reason: format!(
                        "unknown key \"{k}\" (a weighted list has \"ids\" and \"weights\")"
                    ),
                });
            }
            let get = |key: &str| -> Result<&Vec<Value>> {
                match o.get(key) {
                    Some(Value::Array(a)) => Ok(a),
                    None => Err(TowerError::FeatureValue {
                        feature: name.to_owned(),
                        reason: format!("a weighted list needs \"{key}\""),
                    }),
                    Some(other) => Err(TowerError::FeatureType {
                        feature: name.to_owned(),
                        expected: if key == "ids" {
                            LIST
                        } else {
                            "an array of weights"
                        },
                        got: json_type(other),
                    }),
                }
            };
            (get("ids")?, Some(get("weights")?))
        }
        (true, other) => {
            return Err(TowerError::FeatureType {
                feature: name.to_owned(),
                expected: WEIGHTED,
                got: json_type(other),
            })
        }
    };
    check_len(ids.len(), name, "ids")?;
    if let Some(w) = weights {
        check_len(w.len(), name, "weights")?;
        if w.len() != ids.len() {
            return Err(TowerError::FeatureValue {
                feature: name.to_owned(),
                reason: format!(
                    "{} ids but {} weights (they must have equal lengths)",
                    ids.len(),
                    w.len()
                ),
            });
        }
    }
    // Every id and weight is validated, also past max_len; then both are truncated together.
    let n = ids.len().min(max_len);
    let mut rows = Vec::with_capacity(n);
    for (i, id) in ids.iter().enumerate() {
        let r = id_row(lookup, id, name, buf, true)?;
        if i < n {
            rows.push(r);
        }
    }
    let weights = match weights {
        None => None,
        Some(w) => {
            let mut out = Vec::with_capacity(n);
            for (i, x) in w.iter().enumerate() {
                let x = real(x, name, "an array of numeric weights")?;
                let x = to_f32(x, name, "weight")?;
                if i < n {
                    out.push(x);
                }
            }
            Some(out)
        }
    };
    if rows.is_empty() {
        return Ok(oov);
    }
    Ok(Field::Bag { rows, weights })
}
