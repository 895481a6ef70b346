//! One reader for the JSON objects users write: pipeline definitions, channel options,
//! training options, model specs. Every error names the key's path (`channels[1].k`) and says
//! what was expected and what was given; unknown keys are errors, never ignored. Each crate
//! turns an [`OptionError`] into its own error type (and the glue into SQLSTATE 22023).

#![forbid(unsafe_code)]

use serde_json::{Map, Value};
use std::fmt;

/// A key that is missing, unknown, of the wrong type or out of range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    /// Where: keys joined by dots, array positions in brackets.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\": {}", self.path, self.reason)
    }
}

impl std::error::Error for OptionError {}

pub type Result<T> = std::result::Result<T, OptionError>;

/// The error for `path`.
pub fn error(path: impl Into<String>, reason: impl Into<String>) -> OptionError {
    OptionError {
        path: path.into(),
        reason: reason.into(),
    }
}

/// `path.key`, or `key` at the top.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// What kind of JSON value `v` is, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `v` for a message, cut to 60 characters.
pub fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() <= 60 {
        s
    } else {
        format!("{}...", s.chars().take(57).collect::<String>())
    }
}

/// A JSON object being read, with its path.
#[derive(Debug, Clone)]
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    /// `v` read as an object at `path` (an error if it is anything else).
    pub fn new(v: &'a Value, path: impl Into<String>) -> Result<Obj<'a>> {
        let path = path.into();
        match v {
            Value::Object(map) => Ok(Obj { map, path }),
            other => Err(error(
                path,
                format!("must be an object, got {}", kind(other)),
            )),
        }
    }

    /// The object's keys and values.
    pub fn map(&self) -> &'a Map<String, Value> {
        self.map
    }

    /// The object's own path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path of `key` in this object.
    pub fn p(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// An error at `key` of this object.
    pub fn error(&self, key: &str, reason: impl Into<String>) -> OptionError {
        error(self.p(key), reason)
    }

    /// The keys present (in the object's order).
    pub fn keys(&self) -> impl Iterator<Item = &'a str> {
        self.map.keys().map(String::as_str)
    }

    /// Whether `key` holds a value other than null.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Refuses any key not in `keys`.
    pub fn allow(&self, keys: &[&str]) -> Result<()> {
        match self.map.keys().find(|k| !keys.contains(&k.as_str())) {
            Some(k) => Err(self.error(
                k,
                format!("unknown key (allowed here: {})", keys.join(", ")),
            )),
            None => Ok(()),
        }
    }

    /// The value of `key` unless absent or null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// The value of a required `key`.
    pub fn req(&self, key: &str) -> Result<&'a Value> {
        self.get(key)
            .ok_or_else(|| self.error(key, "required key is missing"))
    }

    /// A required non-empty string.
    pub fn string(&self, key: &str) -> Result<String> {
        match self.req(key)? {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            v => Err(self.error(key, format!("must be a non-empty string, got {}", short(v)))),
        }
    }

    /// A non-empty string, or `default` when absent.
    pub fn string_or(&self, key: &str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_owned()),
            Some(_) => self.string(key),
        }
    }

    /// A non-empty string, or None when absent.
    pub fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.string(key).map(Some),
        }
    }

    /// One of `choices`, or `default` when absent.
    pub fn choice<'c>(&self, key: &str, choices: &[&'c str], default: &'c str) -> Result<&'c str> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        v.as_str()
            .and_then(|s| choices.iter().copied().find(|c| *c == s))
            .ok_or_else(|| {
                self.error(
                    key,
                    format!(
                        "must be one of \"{}\", got {}",
                        choices.join("\", \""),
                        short(v)
                    ),
                )
            })
    }

    /// A required integer from `lo` to `hi`.
    pub fn uint(&self, key: &str, lo: u64, hi: u64) -> Result<u64> {
        let v = self.req(key)?;
        match v.as_u64() {
            Some(n) if (lo..=hi).contains(&n) => Ok(n),
            _ => Err(self.error(
                key,
                format!("must be an integer from {lo} to {hi}, got {}", short(v)),
            )),
        }
    }

    /// An integer from `lo` to `hi`, or None when absent.
    pub fn opt_uint(&self, key: &str, lo: u64, hi: u64) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.uint(key, lo, hi).map(Some),
        }
    }

    /// An integer from `lo` to `hi`, or `default` when absent, as a size.
    pub fn size(&self, key: &str, default: usize, lo: usize, hi: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.uint(key, lo as u64, hi as u64).map(|n| n as usize),
        }
    }

    /// A finite number from `lo` to `hi`, or `default` when absent.
    pub fn number(&self, key: &str, default: f64, lo: f64, hi: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.num(key, lo, hi),
        }
    }

    /// A string (possibly empty), or `default` when absent.
    pub fn text(&self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.error(key, format!("must be a string, got {}", short(v)))),
        }
    }

    /// A required finite number from `lo` to `hi`.
    pub fn num(&self, key: &str, lo: f64, hi: f64) -> Result<f64> {
        let v = self.req(key)?;
        match v.as_f64() {
            Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(x),
            _ => Err(self.error(
                key,
                format!("must be a number from {lo} to {hi}, got {}", short(v)),
            )),
        }
    }

    /// A finite number for which `ok` holds (`what` says which, for the message), or
    /// `default` when absent.
    pub fn number_or(
        &self,
        key: &str,
        default: f64,
        ok: impl Fn(f64) -> bool,
        what: &str,
    ) -> Result<f64> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        match v.as_f64() {
            Some(x) if x.is_finite() && ok(x) => Ok(x),
            _ => Err(self.error(key, format!("must be {what}, got {}", short(v)))),
        }
    }

    /// true or false, or `default` when absent.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.error(key, format!("must be true or false, got {}", short(v)))),
        }
    }

    /// The object under `key`, or None when absent.
    pub fn object(&self, key: &str) -> Result<Option<Obj<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => Obj::new(v, self.p(key)).map(Some),
        }
    }

    /// The object under a required `key`.
    pub fn req_object(&self, key: &str) -> Result<Obj<'a>> {
        Obj::new(self.req(key)?, self.p(key))
    }

    /// The array under `key` (empty when absent), of at most `most` elements, each with its
    /// path (`key[i]`).
    pub fn array(&self, key: &str, most: usize) -> Result<Vec<(String, &'a Value)>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) if a.len() <= most => Ok(a
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{}[{i}]", self.p(key)), v))
                .collect()),
            Some(v) => Err(self.error(
                key,
                format!(
                    "must be an array of at most {most} elements, got {}",
                    short(v)
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_error_names_its_path_and_what_was_given() {
        let v = json!({"a": {"b": [1, {"c": "x"}]}, "n": 5, "s": "", "f": 1e300, "t": "yes"});
        let o = Obj::new(&v, "").unwrap();
        let a = o.req_object("a").unwrap();
        let b = a.array("b", 4).unwrap();
        assert_eq!(b[1].0, "a.b[1]");
        let c = Obj::new(b[1].1, b[1].0.clone()).unwrap();
        assert_eq!(c.uint("c", 0, 9).unwrap_err().path, "a.b[1].c");
        assert_eq!(
            o.uint("n", 1, 4).unwrap_err().reason,
            "must be an integer from 1 to 4, got 5"
        );
        assert_eq!(o.size("missing", 3, 1, 4), Ok(3));
        assert!(o.size("n", 3, 1, 4).is_err());
        assert!(o
            .uint("missing", 1, 4)
            .unwrap_err()
            .reason
            .contains("required"));
        assert!(o.string("s").is_err());
        assert!(o.num("f", 0.0, 1.0).is_err());
        assert_eq!(o.number("missing", 0.5, 0.0, 1.0), Ok(0.5));
        assert!(o.number("f", 0.5, 0.0, 1.0).is_err());
        assert!(o.bool_or("t", false).is_err());
        assert_eq!(o.choice("missing", &["p", "q"], "q"), Ok("q"));
        assert!(o.choice("t", &["p", "q"], "q").is_err());
        assert!(a.array("b", 1).is_err());
        let e = o.allow(&["a", "n", "s", "f"]).unwrap_err();
        assert_eq!(
            (e.path.as_str(), e.reason.as_str()),
            ("t", "unknown key (allowed here: a, n, s, f)")
        );
        assert!(Obj::new(&json!([1]), "x")
            .unwrap_err()
            .reason
            .contains("an array"));
    }

    #[test]
    fn null_is_absent() {
        let v = json!({"k": null});
        let o = Obj::new(&v, "p").unwrap();
        assert!(!o.has("k"));
        assert_eq!(o.size("k", 1, 1, 2), Ok(1));
        assert_eq!(o.opt_string("k"), Ok(None));
    }
}
