//! SQL surface of the channel merge: `twotower.merge(channel[], item_id[], score[], k,
//! strategy, options, exclude)` merges candidate lists of any channels (pg_twotower's own or
//! the application's) with the funnel core (`crates/funnel`), returning ranked items with their
//! provenance. The arrays are built with `array_agg` over a UNION of the channels' rows.

use pgrx::prelude::*;

#[pg_schema]
pub mod twotower {
    use crate::infra::catalog::JsonbValue;
    use crate::infra::error::{required, OrReport, TtError};
    use pgrx::prelude::*;
    use serde_json::Value;
    use std::collections::HashMap;
    use twotower_funnel::{Candidate, Strategy};

    /// The most candidates one call merges.
    const MAX_CANDIDATES: usize = 1_000_000;
    /// The most distinct channels one call merges, and the longest channel name (bytes): the
    /// memory of a call stays bounded whatever its arrays hold.
    const MAX_CHANNELS: usize = 1_000;
    const MAX_CHANNEL_NAME: usize = 256;

    fn bad(msg: String) -> ! {
        TtError::BadArgument(msg).report()
    }

    /// The merge strategy `strategy` with its options `o` for channels `names` (22023 on bad
    /// options).
    fn parse_strategy(
        strategy: &str,
        o: &serde_json::Map<String, Value>,
        names: &[String],
    ) -> Strategy {
        Strategy::parse(strategy, o, names).unwrap_or_else(|e| bad(e.message))
    }

    /// Merges candidate lists: `channel[i]`, `item_id[i]`, `score[i]` is one candidate (higher
    /// scores are better within a channel). `strategy`: 'quota' (options `quotas`), 'round_robin'
    /// (`weights`, `snake`), 'weighted_sum' (`weights`, `norm`: minmax | zscore | rank), 'rrf'
    /// (`weights`, `k`, default 60); every strategy takes `order` (the channel order of turns and
    /// ties; default: the order of first appearance). Returns at most `k` items, ranked, each
    /// with the channels that returned it and its rank and score there. See docs/channels.md.
    #[pg_extern(immutable, parallel_safe)]
    #[allow(clippy::type_complexity)]
    fn merge(
        channel: Option<pgrx::datum::Array<'_, &str>>,
        item_id: Option<pgrx::datum::Array<'_, i64>>,
        score: Option<pgrx::datum::Array<'_, f32>>,
        k: default!(Option<i32>, "100"),
        strategy: default!(Option<&str>, "'rrf'"),
        options: default!(Option<JsonbValue>, "'{}'"),
        exclude: default!(Option<Vec<Option<i64>>>, "NULL"),
    ) -> TableIterator<
        'static,
        (
            name!(item_id, i64),
            name!(score, f64),
            name!(rank, i32),
            name!(channels, Vec<String>),
            name!(channel_ranks, Vec<i32>),
            name!(channel_scores, Vec<f32>),
        ),
    > {
        let (channel, item_id, score) = (
            required(channel, "channel"),
            required(item_id, "item_id"),
            required(score, "score"),
        );
        let (k, strategy, options) = (
            required(k, "k"),
            required(strategy, "strategy"),
            required(options, "options"),
        );
        if !(1..=100_000).contains(&k) {
            bad(format!("k must be between 1 and 100000, got {k}"));
        }
        if channel.len() != item_id.len() || channel.len() != score.len() {
            bad(format!(
                "channel, item_id and score must have the same length ({}, {}, {})",
                channel.len(),
                item_id.len(),
                score.len()
            ));
        }
        if channel.len() > MAX_CANDIDATES {
            bad(format!(
                "{} candidates are more than the {MAX_CANDIDATES} one merge takes",
                channel.len()
            ));
        }
        let opts = options.value("options").or_report();
        let Value::Object(o) = &opts else {
            bad(format!("merge options must be a JSON object, got {opts}"))
        };
        // The strategy and its option keys first (the channels are known below).
        parse_strategy(strategy, o, &[]);
        // Channels: the given order first, then the others in order of first appearance.
        let mut names: Vec<String> = Vec::new();
        if let Some(order) = o.get("order") {
            let Some(a) = order.as_array() else {
                bad(format!(
                    "merge option \"order\" must be an array of channel names, got {order}"
                ))
            };
            for v in a {
                let Some(n) = v.as_str() else {
                    bad(format!(
                        "merge option \"order\" has {v}, not a channel name"
                    ))
                };
                if !names.iter().any(|x| x == n) {
                    names.push(n.to_owned());
                }
            }
        }
        if names.len() > MAX_CHANNELS {
            bad(format!("merge option \"order\" names {} channels, more than the {MAX_CHANNELS} one merge takes", names.len()));
        }
        let mut index: HashMap<String, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        let mut cands = Vec::with_capacity(channel.len());
        // The arrays are read in place (their lengths checked above, before anything is
        // copied); only distinct channel names are copied.
        for ((c, i), s) in channel.iter().zip(item_id.iter()).zip(score.iter()) {
            let (Some(c), Some(i), Some(s)) = (c, i, s) else {
                TtError::NullValue("merge: a channel, item_id or score is NULL".into()).report();
            };
            let ch = match index.get(c) {
                Some(&x) => x,
                None => {
                    if c.len() > MAX_CHANNEL_NAME {
                        bad(format!("a channel name of {} bytes is longer than the {MAX_CHANNEL_NAME} merge takes", c.len()));
                    }
                    if names.len() >= MAX_CHANNELS {
                        bad(format!(
                            "more than {MAX_CHANNELS} distinct channels in one merge"
                        ));
                    }
                    names.push(c.to_owned());
                    index.insert(c.to_owned(), names.len() - 1);
                    names.len() - 1
                }
            };
            cands.push(Candidate {
                channel: ch,
                item: i,
                score: s,
            });
        }
        let strat = parse_strategy(strategy, o, &names);
        let exclude: Vec<i64> = exclude.unwrap_or_default().into_iter().flatten().collect();
        let merged = twotower_funnel::merge(&cands, names.len(), &strat, k as usize, &exclude)
            .map_err(TtError::from)
            .or_report();
        TableIterator::new(merged.into_iter().map(move |m| {
            (
                m.item,
                m.score,
                m.rank as i32,
                m.provenance.iter().map(|p| names[p.0].clone()).collect(),
                m.provenance.iter().map(|p| p.1 as i32).collect(),
                m.provenance.iter().map(|p| p.2).collect(),
            )
        }))
    }
}
