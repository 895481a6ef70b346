//! Variants of a pipeline under one name, with a deterministic traffic split.
//!
//! A split is saved like a pipeline (`save_pipeline`) and called like one (`recommend`); its
//! definition names the variants, each an ordinary pipeline, with its share of the traffic:
//!
//! ```json
//! {
//!   "unit": "user_id",
//!   "salt": "home-2026-12",
//!   "variants": [
//!     {"name": "control", "pipeline": "home_twotower", "share": 90},
//!     {"name": "merged",  "pipeline": "home_merged",   "share": 10}
//!   ]
//! }
//! ```
//!
//! A request's *unit* (the value of the `unit` key in its features, e.g. the user id) falls in
//! one of 10,000 buckets, `hash(salt, unit) mod 10000`; the variants take consecutive ranges of
//! buckets in their listed order, `share` percent each (two decimals). So:
//! - a unit always gets the same variant until the shares, the order or the salt change;
//! - adding or removing a variant with share 0 moves nobody;
//! - raising the last variant's share from 10 to 20 moves units only from the variants before
//!   it into it (ramp a new variant by listing it last);
//! - a new salt assigns everybody afresh (a new experiment).
//!
//! The hash is FNV-1a (64 bit) over the salt's bytes, one zero byte and the unit's bytes,
//! finished with the SplitMix64 mixer; fixed here, so that the assignment is the same on every
//! server and in every release.

use serde_json::Value;
use thiserror::Error;
use twotower_options::{Obj, OptionError};

/// The traffic is split into this many buckets (shares have two decimals).
pub const BUCKETS: u32 = 10_000;
/// The most variants a split may list.
pub const MAX_VARIANTS: usize = 32;
/// The longest unit value (bytes) a request may carry.
pub const MAX_UNIT_BYTES: usize = 1024;

#[derive(Debug, Error, PartialEq)]
pub enum SplitError {
    #[error("invalid split definition at \"{path}\": {reason}")]
    Definition { path: String, reason: String },
    /// The request carries no usable unit.
    #[error("{0}")]
    NoUnit(String),
    #[error("{0}")]
    BadUnit(String),
}

impl From<OptionError> for SplitError {
    fn from(e: OptionError) -> Self {
        SplitError::Definition {
            path: e.path,
            reason: e.reason,
        }
    }
}

fn err<T>(path: impl Into<String>, reason: impl Into<String>) -> Result<T, SplitError> {
    Err(SplitError::Definition {
        path: path.into(),
        reason: reason.into(),
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub name: String,
    pub pipeline: String,
    /// Share of the traffic in buckets (hundredths of a percent).
    pub share: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// The features key whose value is the randomisation unit.
    pub unit: String,
    pub salt: String,
    pub variants: Vec<Variant>,
}

/// The variant a request got.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment<'a> {
    pub variant: &'a Variant,
    pub unit: String,
    pub bucket: u32,
}

fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl Split {
    /// Whether a stored or submitted definition describes a split (it lists variants) rather
    /// than a pipeline.
    pub fn is_split(v: &Value) -> bool {
        v.get("variants").is_some()
    }

    /// Parses and checks a split. `default_salt` is used when the definition has none (the
    /// caller passes the split's name, and stores the salt it used).
    pub fn parse(v: &Value, default_salt: &str) -> Result<Split, SplitError> {
        let o = Obj::new(v, "")?;
        o.allow(&["unit", "salt", "variants"])?;
        let unit = o.string("unit")?;
        if unit.is_empty() || unit.len() > 63 {
            return err("unit", "must be a features key of 1 to 63 bytes");
        }
        let salt = o.string_or("salt", default_salt)?;
        if salt.len() > 256 {
            return err("salt", "must be at most 256 bytes");
        }
        let list = o.array("variants", MAX_VARIANTS)?;
        if list.is_empty() {
            return err("variants", "must list at least one variant");
        }
        let mut variants: Vec<Variant> = Vec::with_capacity(list.len());
        let mut total: u64 = 0;
        for (path, item) in list {
            let vo = Obj::new(item, path.clone())?;
            vo.allow(&["name", "pipeline", "share"])?;
            let name = vo.string("name")?;
            if !plain_name(&name) {
                return err(
                    vo.p("name"),
                    "must be 1 to 63 letters, digits, '_', '.' or '-'",
                );
            }
            if variants.iter().any(|w| w.name == name) {
                return err(vo.p("name"), format!("variant \"{name}\" is listed twice"));
            }
            let pipeline = vo.string("pipeline")?;
            let pct = vo.num("share", 0.0, 100.0)?;
            let share = (pct * 100.0).round();
            if (share - pct * 100.0).abs() > 1e-6 {
                return err(
                    vo.p("share"),
                    format!(
                        "{pct} has more than two decimals (shares are in hundredths of a percent)"
                    ),
                );
            }
            total += share as u64;
            variants.push(Variant {
                name,
                pipeline,
                share: share as u32,
            });
        }
        if total != u64::from(BUCKETS) {
            return err(
                "variants",
                format!(
                    "the shares add up to {}%, not 100% (a stopped variant keeps share 0)",
                    total as f64 / 100.0
                ),
            );
        }
        Ok(Split {
            unit,
            salt,
            variants,
        })
    }

    /// The definition as stored: every key explicit (the salt too).
    pub fn to_value(&self) -> Value {
        serde_json::json!({
            "unit": self.unit,
            "salt": self.salt,
            "variants": self.variants.iter().map(|v| serde_json::json!({
                "name": v.name,
                "pipeline": v.pipeline,
                "share": f64::from(v.share) / 100.0,
            })).collect::<Vec<_>>(),
        })
    }

    /// The bucket of `unit` under this split's salt.
    pub fn bucket(&self, unit: &str) -> u32 {
        bucket(&self.salt, unit)
    }

    /// The variant of the unit `unit`.
    pub fn variant_of(&self, unit: &str) -> &Variant {
        let b = self.bucket(unit);
        let mut upto = 0u32;
        for v in &self.variants {
            upto += v.share;
            if b < upto {
                return v;
            }
        }
        // The shares add up to BUCKETS (checked by parse), so this is not reached.
        self.variants.last().expect("a split has variants")
    }

    /// The unit of a request from its features: a string as it is, an integer in decimal (so
    /// 42 and "42" are the same unit).
    pub fn unit_of(&self, features: &Value) -> Result<String, SplitError> {
        let unit = match features.get(&self.unit) {
            None | Some(Value::Null) => {
                return Err(SplitError::NoUnit(format!(
                    "the features have no \"{}\", the key this split assigns variants by",
                    self.unit
                )))
            }
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            Some(other) => {
                return Err(SplitError::BadUnit(format!(
                    "the split's unit \"{}\" must be a string or an integer, not {}",
                    self.unit,
                    twotower_options::kind(other)
                )))
            }
        };
        if unit.len() > MAX_UNIT_BYTES {
            return Err(SplitError::BadUnit(format!(
                "the split's unit \"{}\" is {} bytes long; at most {MAX_UNIT_BYTES}",
                self.unit,
                unit.len()
            )));
        }
        Ok(unit)
    }

    /// The variant a request with these features gets.
    pub fn assign(&self, features: &Value) -> Result<Assignment<'_>, SplitError> {
        let unit = self.unit_of(features)?;
        let bucket = self.bucket(&unit);
        Ok(Assignment {
            variant: self.variant_of(&unit),
            unit,
            bucket,
        })
    }
}

/// `hash(salt, unit) mod BUCKETS`: FNV-1a 64 over salt, a zero byte and unit, then SplitMix64's
/// finaliser.
pub fn bucket(salt: &str, unit: &str) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in salt.bytes().chain(std::iter::once(0)).chain(unit.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h % u64::from(BUCKETS)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn split(shares: &[(&str, f64)]) -> Split {
        Split::parse(
            &json!({"unit": "user_id", "salt": "s1", "variants": shares.iter().map(|(n, s)|
                json!({"name": n, "pipeline": format!("p_{n}"), "share": s})).collect::<Vec<_>>()}),
            "x",
        )
        .unwrap()
    }

    fn assignments(s: &Split) -> Vec<String> {
        (0..20_000)
            .map(|u| s.variant_of(&format!("u{u}")).name.clone())
            .collect()
    }

    #[test]
    fn hash_is_fixed() {
        // The assignment must not change between releases or machines: FNV-1a 64 of
        // "s1\0u1" is computed by hand below, then mixed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in [b's', b'1', 0, b'u', b'1'] {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        assert_eq!(bucket("s1", "u1"), (z % 10_000) as u32);
        // And literals computed independently (Python, from the formula in the module
        // documentation), so that a change of the code above is seen too.
        assert_eq!(bucket("s1", "u1"), 3124);
        assert_eq!(bucket("home", "42"), 6104);
        assert_ne!(bucket("s1", "u1"), bucket("s2", "u1"));
    }

    #[test]
    fn shares_are_respected() {
        let s = split(&[("a", 50.0), ("b", 30.0), ("c", 20.0)]);
        let a = assignments(&s);
        let count = |n: &str| a.iter().filter(|x| *x == n).count() as f64 / a.len() as f64;
        // 20,000 units: the standard error of a share is below 0.0036.
        assert!((count("a") - 0.5).abs() < 0.015, "{}", count("a"));
        assert!((count("b") - 0.3).abs() < 0.015, "{}", count("b"));
        assert!((count("c") - 0.2).abs() < 0.015, "{}", count("c"));
        // Deterministic.
        assert_eq!(a, assignments(&s));
    }

    #[test]
    fn zero_share_variant_moves_nobody() {
        let before = assignments(&split(&[("a", 60.0), ("b", 40.0)]));
        for shares in [
            vec![("new", 0.0), ("a", 60.0), ("b", 40.0)],
            vec![("a", 60.0), ("new", 0.0), ("b", 40.0)],
            vec![("a", 60.0), ("b", 40.0), ("new", 0.0)],
        ] {
            assert_eq!(assignments(&split(&shares)), before);
        }
    }

    #[test]
    fn ramping_the_last_variant_only_moves_units_into_it() {
        let small = assignments(&split(&[("a", 90.0), ("b", 10.0)]));
        let big = assignments(&split(&[("a", 80.0), ("b", 20.0)]));
        let mut moved = 0;
        for (x, y) in small.iter().zip(&big) {
            if x != y {
                assert_eq!((x.as_str(), y.as_str()), ("a", "b"));
                moved += 1;
            }
        }
        assert!(moved > 1500 && moved < 2500, "{moved}");
        // Stopping it (share 0) sends its units back to the others.
        let stopped = assignments(&split(&[("a", 100.0), ("b", 0.0)]));
        assert!(stopped.iter().all(|x| x == "a"));
    }

    #[test]
    fn salt_reshuffles() {
        let s1 = split(&[("a", 50.0), ("b", 50.0)]);
        let mut s2 = s1.clone();
        s2.salt = "s2".into();
        let same = assignments(&s1)
            .iter()
            .zip(&assignments(&s2))
            .filter(|(x, y)| x == y)
            .count();
        assert!(same > 9_000 && same < 11_000, "{same}");
    }

    #[test]
    fn units_from_features() {
        let s = split(&[("a", 50.0), ("b", 50.0)]);
        assert_eq!(s.unit_of(&json!({"user_id": 42})).unwrap(), "42");
        assert_eq!(s.unit_of(&json!({"user_id": "42"})).unwrap(), "42");
        assert_eq!(
            s.assign(&json!({"user_id": 42})).unwrap().variant,
            s.assign(&json!({"user_id": "42"})).unwrap().variant
        );
        assert!(matches!(
            s.unit_of(&json!({"other": 1})),
            Err(SplitError::NoUnit(_))
        ));
        assert!(matches!(
            s.unit_of(&json!({"user_id": null})),
            Err(SplitError::NoUnit(_))
        ));
        for bad in [json!(1.5), json!(true), json!([1]), json!({"a": 1})] {
            assert!(matches!(
                s.unit_of(&json!({ "user_id": bad })),
                Err(SplitError::BadUnit(_))
            ));
        }
        let long = "x".repeat(MAX_UNIT_BYTES + 1);
        assert!(matches!(
            s.unit_of(&json!({ "user_id": long })),
            Err(SplitError::BadUnit(_))
        ));
    }

    fn bad(v: Value) -> (String, String) {
        match Split::parse(&v, "salt") {
            Err(SplitError::Definition { path, reason }) => (path, reason),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_definitions_name_their_path() {
        let v = |variants: Value| json!({"unit": "user_id", "variants": variants});
        assert_eq!(bad(json!({"variants": []})).0, "unit");
        assert_eq!(bad(v(json!([]))).0, "variants");
        assert_eq!(
            bad(v(json!([{"name": "a", "pipeline": "p", "share": 60}]))).0,
            "variants"
        );
        assert!(bad(v(json!([{"name": "a", "pipeline": "p", "share": 60}])))
            .1
            .contains("60%"));
        assert_eq!(
            bad(v(
                json!([{"name": "a", "pipeline": "p", "share": 50}, {"name": "a", "pipeline": "q", "share": 50}])
            ))
            .0,
            "variants[1].name"
        );
        assert_eq!(
            bad(v(json!([{"name": "a", "pipeline": "p", "share": 100.001}]))).0,
            "variants[0].share"
        );
        assert_eq!(
            bad(v(json!([{"name": "a", "pipeline": "p", "share": 99.995}, {"name": "b", "pipeline": "p", "share": 0.005}]))).0,
            "variants[0].share"
        );
        assert_eq!(
            bad(v(json!([{"name": "a", "pipeline": "p", "share": -1}]))).0,
            "variants[0].share"
        );
        assert_eq!(
            bad(v(json!([{"name": "a b", "pipeline": "p", "share": 100}]))).0,
            "variants[0].name"
        );
        assert_eq!(
            bad(v(json!([{"name": "a", "share": 100}]))).0,
            "variants[0].pipeline"
        );
        assert_eq!(
            bad(v(
                json!([{"name": "a", "pipeline": "p", "share": 100, "x": 1}])
            ))
            .0,
            "variants[0].x"
        );
        assert_eq!(bad(json!({"unit": "u", "variants": [], "k": 5})).0, "k");
        assert_eq!(bad(json!([1])).0, "");
    }

    #[test]
    fn stored_form_round_trips_with_its_salt() {
        let s = Split::parse(
            &json!({"unit": "user_id", "variants": [
                {"name": "a", "pipeline": "p", "share": 33.33},
                {"name": "b", "pipeline": "q", "share": 66.67}]}),
            "home",
        )
        .unwrap();
        assert_eq!(s.salt, "home");
        assert_eq!(Split::parse(&s.to_value(), "other").unwrap(), s);
        assert!(Split::is_split(&s.to_value()));
        assert!(!Split::is_split(&json!({"user_model": "m"})));
    }
}
