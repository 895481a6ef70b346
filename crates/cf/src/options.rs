//! Channel options (a JSON object; `docs/channels.md` lists every key). Unknown keys, and keys
//! of the other kind, are errors.

use crate::error::{opt_err, Result};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Item-CF with inverse user frequency: Σ_u w_ui·w_uj / ln(1 + |N(u)|), normalised by
    /// |N(i)|^α · |N(j)|^(1−α).
    ItemCf,
    /// Swing: Σ over ordered pairs u ≠ v of users of both items of w_u·w_v / (α + |I_u ∩ I_v|),
    /// w_u = (|I_u| + α₁)^(−β).
    Swing,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind> {
        match s {
            "itemcf" => Ok(Kind::ItemCf),
            "swing" => Ok(Kind::Swing),
            other => Err(opt_err(
                "kind",
                format!("must be \"itemcf\" or \"swing\", got \"{other}\""),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::ItemCf => "itemcf",
            Kind::Swing => "swing",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub kind: Kind,
    /// Neighbours kept per item.
    pub top_n: usize,
    /// Users with more items keep their most recent `max_user_items` (heavy users would
    /// dominate the pair count).
    pub max_user_items: usize,
    /// Swing: each item keeps its `max_item_users` most recent users (the pair work per item is
    /// quadratic in its users).
    pub max_item_users: usize,
    /// The share of users kept (a hash of the user id and `seed`: the same users every build).
    pub user_sample: f64,
    pub seed: u64,
    /// Neighbours scoring at most this are left out.
    pub min_score: f64,
    pub threads: usize,
    /// Item-CF: the exponent of the source item's count in the normalisation (0.5: cosine).
    /// Swing: α of the denominator.
    pub alpha: f64,
    /// Item-CF: divide by ln(1 + |N(u)|).
    pub iuf: bool,
    /// Item-CF: interaction weights decay as 0.5^(age / half_life), the age measured from the
    /// newest interaction of the log (in the timestamps' unit).
    pub half_life: Option<f64>,
    /// Item-CF with `half_life`: ages are measured from this time (default: the newest
    /// interaction of the log). A refresh keeps its build's reference, so that the weights of
    /// old interactions stay what they were.
    pub decay_reference: Option<f64>,
    /// Swing: α₁ and β of the user weight (|I_u| + α₁)^(−β).
    pub alpha1: f64,
    pub beta: f64,
}

pub const MAX_TOP_N: usize = 10_000;

use twotower_options::Obj;

impl Options {
    pub fn parse(kind: Kind, v: &Value) -> Result<Options> {
        let Value::Object(m) = v else {
            return Err(opt_err("options", "must be a JSON object"));
        };
        let common = [
            "top_n",
            "max_user_items",
            "user_sample",
            "seed",
            "min_score",
            "threads",
            "alpha",
        ];
        let own: &[&str] = match kind {
            Kind::ItemCf => &["iuf", "half_life", "decay_reference"],
            Kind::Swing => &["alpha1", "beta", "max_item_users"],
        };
        if let Some(k) = m
            .keys()
            .find(|k| !common.contains(&k.as_str()) && !own.contains(&k.as_str()))
        {
            let other = [
                "iuf",
                "half_life",
                "decay_reference",
                "alpha1",
                "beta",
                "max_item_users",
            ]
            .contains(&k.as_str());
            return Err(opt_err(
                k.clone(),
                if other {
                    format!("does not apply to a {} channel", kind.name())
                } else {
                    format!(
                        "unknown key (allowed: {}, {})",
                        common.join(", "),
                        own.join(", ")
                    )
                },
            ));
        }
        let o = Obj::new(v, "")?;
        let half_life = match o.get("half_life") {
            None => None,
            Some(_) => Some(o.number("half_life", 1.0, 1e-9, 1e18)?),
        };
        let decay_reference = match o.get("decay_reference") {
            None => None,
            Some(_) if half_life.is_none() => {
                return Err(opt_err(
                    "decay_reference",
                    "applies with \"half_life\" only",
                ))
            }
            // Any finite time: a build stores the newest interaction's time here, which for a
            // bigint column of epoch nanoseconds is about 1.7e18.
            Some(_) => Some(o.number("decay_reference", 0.0, -f64::MAX, f64::MAX)?),
        };
        Ok(Options {
            kind,
            decay_reference,
            top_n: o.size("top_n", 100, 1, MAX_TOP_N)?,
            max_user_items: o.size("max_user_items", 1000, 2, 1_000_000)?,
            max_item_users: o.size("max_item_users", 500, 2, 100_000)?,
            user_sample: {
                let s = o.number("user_sample", 1.0, 0.0, 1.0)?;
                if s == 0.0 {
                    return Err(opt_err(
                        "user_sample",
                        "must be above 0 (the share of users kept)",
                    ));
                }
                s
            },
            seed: o.size("seed", 0, 0, usize::MAX)? as u64,
            min_score: o.number("min_score", 0.0, 0.0, f64::MAX)?,
            threads: o.size("threads", 2, 1, 64)?,
            alpha: match kind {
                Kind::ItemCf => o.number("alpha", 0.5, 0.0, 1.0)?,
                Kind::Swing => o.number("alpha", 1.0, 0.0, 1e9)?,
            },
            iuf: o.bool_or("iuf", true)?,
            half_life,
            alpha1: o.number("alpha1", 5.0, 0.0, 1e9)?,
            beta: o.number("beta", 0.3, 0.0, 10.0)?,
        })
    }
}
