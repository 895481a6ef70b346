//! Whole requests through pipelines, without Postgres: definitions parsed from JSON, channels,
//! vectors and item features served from plain maps, results checked against hand-computed
//! values.

use rustc_hash::FxHashMap;
use serde_json::{json, Value};
use std::sync::Arc;
use twotower_funnel::channel::{ChannelDef, ChannelKind, Query};
use twotower_funnel::pipeline::{Definition, Uses};
use twotower_funnel::request::{run, FunnelError, Hit, Models, Request, Sources};
use twotower_tower::safetensors::write_f32;
use twotower_tower::{Model, Part, Source};

/// u = (x, y): a linear identity tower, inner product.
fn user_model() -> Model {
    let spec = json!({
        "format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
        "features": [
            {"name": "x", "type": "numeric", "transform": "none", "default": 0},
            {"name": "y", "type": "numeric", "transform": "none", "default": 0}
        ],
        "layers": [{"type": "linear", "weight": "w"}],
        "output": {"dim": 2, "metric": "ip"}
    });
    Model::load(
        &spec.to_string(),
        &write_f32(&[("w", &[2, 2], &[1.0, 0.0, 0.0, 1.0])]),
    )
    .unwrap()
}

/// score = two-tower score + 0.5 · price (an item feature).
fn price_model() -> Model {
    let spec = json!({
        "format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
        "features": [
            {"name": "tt", "type": "cross", "of": "score"},
            {"name": "price", "source": "item", "type": "numeric", "transform": "none", "default": 0}
        ],
        "layers": [{"type": "linear", "weight": "w"}],
        "output": {"dim": 1}
    });
    Model::load(
        &spec.to_string(),
        &write_f32(&[("w", &[1, 2], &[1.0, 0.5])]),
    )
    .unwrap()
}

#[derive(Debug)]
enum E {
    Funnel(FunnelError),
    Mine(&'static str),
}

impl From<FunnelError> for E {
    fn from(e: FunnelError) -> Self {
        E::Funnel(e)
    }
}

/// Channels, vectors and prices from maps; every call recorded.
#[derive(Default)]
struct Fake {
    /// Per channel name, its full ranked list (item, score); handed over with vectors when
    /// `with_vectors`.
    lists: FxHashMap<String, Vec<(i64, f32)>>,
    with_vectors: bool,
    vectors: FxHashMap<i64, Vec<f32>>,
    prices: FxHashMap<i64, f64>,
    /// What each channel was asked with: (name, seeds, k, excluded sorted).
    asked: Vec<(String, Vec<(i64, f32)>, usize, Vec<i64>)>,
    vector_reads: Vec<Vec<i64>>,
    part_reads: Vec<(usize, Vec<i64>)>,
    fail_channel: bool,
    attribute_reads: Vec<(Vec<i64>, Vec<String>)>,
    cancel_after: Option<usize>,
    polls: usize,
}

impl Sources for Fake {
    type Error = E;

    fn channel(&mut self, _at: usize, c: &ChannelDef, q: &Query) -> Result<Vec<Hit>, E> {
        if self.fail_channel {
            return Err(E::Mine("channel failed"));
        }
        let mut ex: Vec<i64> = q.exclude.iter().copied().collect();
        ex.sort_unstable();
        self.asked.push((c.name.clone(), q.seeds.to_vec(), q.k, ex));
        let list = self.lists.get(&c.name).cloned().unwrap_or_default();
        Ok(list
            .into_iter()
            .filter(|(i, _)| !q.exclude.contains(i))
            .take(q.k)
            .map(|(item, score)| Hit {
                item,
                score,
                vector: self
                    .with_vectors
                    .then(|| self.vectors.get(&item).map(|v| v.clone().into()))
                    .flatten(),
            })
            .collect())
    }

    fn vectors(&mut self, ids: &[i64]) -> Result<FxHashMap<i64, Arc<[f32]>>, E> {
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        self.vector_reads.push(sorted);
        Ok(ids
            .iter()
            .filter_map(|i| self.vectors.get(i).map(|v| (*i, v.clone().into())))
            .collect())
    }

    fn item_parts(
        &mut self,
        stage: usize,
        model: &Model,
        items: &[i64],
    ) -> Result<Vec<Arc<Part>>, E> {
        self.part_reads.push((stage, items.to_vec()));
        items
            .iter()
            .map(|i| {
                let row = match self.prices.get(i) {
                    Some(p) => json!({ "price": p }),
                    None => json!({}),
                };
                model
                    .encode_part(&row, Source::Item, false)
                    .map(Arc::new)
                    .map_err(|e| E::Funnel(e.into()))
            })
            .collect()
    }

    fn attributes(
        &mut self,
        ids: &[i64],
        columns: &[String],
    ) -> Result<Vec<Arc<serde_json::Map<String, Value>>>, E> {
        self.attribute_reads.push((ids.to_vec(), columns.to_vec()));
        Ok(ids
            .iter()
            .map(|i| {
                let mut m = serde_json::Map::new();
                if let Some(p) = self.prices.get(i) {
                    m.insert("price".into(), json!(p));
                }
                m.insert("parity".into(), json!(i % 2));
                Arc::new(m)
            })
            .collect())
    }

    fn poll(&mut self) -> Result<(), E> {
        self.polls += 1;
        match self.cancel_after {
            Some(n) if self.polls > n => Err(E::Mine("cancelled")),
            _ => Ok(()),
        }
    }
}

fn fake() -> Fake {
    let mut f = Fake::default();
    // Vectors: item i at (i mod 7, i mod 3), scores under u = (1, 2) are x + 2y.
    for i in 1..=20i64 {
        f.vectors.insert(i, vec![(i % 7) as f32, (i % 3) as f32]);
        f.prices.insert(i, (i % 5) as f64);
    }
    f.vectors.remove(&9); // item 9 has no vector
    f.lists.insert(
        "tt".into(),
        vec![(5, 0.9), (6, 0.8), (2, 0.7), (9, 0.6), (1, 0.5)],
    );
    f.lists
        .insert("cf".into(), vec![(2, 3.0), (7, 2.0), (5, 1.0), (11, 0.5)]);
    f
}

fn def(v: Value) -> Definition {
    Definition::parse(&v).unwrap()
}

fn base() -> Value {
    json!({
        "user_model": "u",
        "vectors": {"table": "items"},
        "item_features": {"table": "items"},
        "history": "history",
        "channels": [
            {"name": "tt", "type": "twotower", "index": "items_idx", "k": 4},
            {"name": "cf", "type": "i2i", "channel": "cf", "k": 4, "history_len": 2, "decay": 0.5}
        ],
        "merge": {"strategy": "rrf", "k": 6}
    })
}

fn request<'a>(features: &'a Value, k: Option<i64>, exclude: &'a [i64]) -> Request<'a> {
    Request {
        pipeline: "p",
        features,
        k,
        exclude,
        candidates: None,
    }
}

#[test]
fn channels_and_an_rrf_merge_give_hand_computed_ranks_and_provenance() {
    let d = def(base());
    let user = user_model();
    let m = Models {
        user: &user,
        strict: false,
        stages: vec![],
    };
    let features = json!({"x": 1, "y": 2, "history": [3, 4, 8]});
    let mut src = fake();
    let out = run(&d, &m, &request(&features, Some(6), &[6]), &mut src).unwrap();

    // tt (excluding 6 and the history 3, 4, 8): 5, 2, 9, 1; cf: 2, 7, 5, 11.
    // RRF, k0 = 60: 2 → 1/62 + 1/61, 5 → 1/61 + 1/63, 7 → 1/62, 9 → 1/63, 1 → 1/64, 11 → 1/64.
    let items: Vec<i64> = out.rows.iter().map(|r| r.item).collect();
    assert_eq!(items, vec![2, 5, 7, 9, 1, 11]);
    let expect = 1.0 / 62.0 + 1.0 / 61.0;
    assert!((out.rows[0].score as f64 - expect).abs() < 1e-6);
    assert_eq!(out.rows[0].channels, vec!["tt", "cf"]);
    assert_eq!(out.rows[0].ranks, vec![2, 1]);
    assert_eq!(out.rows[2].channels, vec!["cf"]);

    // The i2i channel was asked with the two most recent history items, weighted 0.5^i.
    assert_eq!(src.asked[1].1, vec![(3, 1.0), (4, 0.5)]);
    // Both channels were told to leave out the history and the caller's exclusions.
    assert_eq!(src.asked[0].3, vec![3, 4, 6, 8]);
    assert_eq!(src.asked[1].2, 4);
    // Without stages nothing else is read.
    assert!(src.vector_reads.is_empty() && src.part_reads.is_empty());
    assert_eq!(
        out.steps
            .iter()
            .map(|s| s.stage.as_str())
            .collect::<Vec<_>>(),
        vec!["user tower u", "channel tt", "channel cf", "merge rrf"]
    );
    assert_eq!(out.steps[3].received, Some(8));
}

#[test]
fn a_cascade_after_the_merge_ranks_by_the_last_stage_with_item_features() {
    let mut v = base();
    v["stages"] =
        json!([{"type": "twotower", "keep": 4}, {"type": "model", "model": "pm", "keep": 3}]);
    v["k"] = json!(3);
    let d = def(v);
    let (user, pm) = (user_model(), price_model());
    let m = Models {
        user: &user,
        strict: false,
        stages: vec![None, Some(&pm)],
    };
    let features = json!({"x": 1, "y": 2, "history": [3]});
    let mut src = fake();
    let out = run(&d, &m, &request(&features, None, &[]), &mut src).unwrap();

    // Merged pool (history 3 excluded; cf asked with seed 3 only): tt 5, 6, 2, 9; cf 2, 7, 5, 11.
    // Vectors under u = (1, 2): x + 2y with x = i mod 7, y = i mod 3:
    //   5 → 5 + 4 = 9, 6 → 6 + 0 = 6, 2 → 2 + 4 = 6, 7 → 0 + 2 = 2, 11 → 4 + 4 = 8; 9 has none.
    // Two-tower keep 4: 5 (9), 11 (8), 2 (6), 6 (6) (ties by id).
    // Model: tt + 0.5 · (i mod 5): 5 → 9, 11 → 8.5, 2 → 7, 6 → 6.5; keep 3.
    let got: Vec<(i64, f32)> = out.rows.iter().map(|r| (r.item, r.score)).collect();
    assert_eq!(got, vec![(5, 9.0), (11, 8.5), (2, 7.0)]);
    assert_eq!(out.rows[1].channels, vec!["cf"]);
    // One read of the vectors: the pool and the history.
    assert_eq!(src.vector_reads, vec![vec![2, 3, 5, 6, 7, 9, 11]]);
    // Item features only for the model stage's candidates.
    assert_eq!(src.part_reads.len(), 1);
    let mut read = src.part_reads[0].1.clone();
    read.sort_unstable();
    assert_eq!((src.part_reads[0].0, read), (1, vec![2, 5, 6, 11]));
    let vectors = &out.steps[4];
    assert_eq!(vectors.stage, "item vectors");
    assert_eq!(vectors.dropped, vec![9]);
    assert_eq!(out.steps[5].kept, vec![5, 11, 2, 6]);
    assert_eq!(out.steps[6].dropped, vec![6]);
}

#[test]
fn vectors_handed_over_by_the_channels_are_not_read_again() {
    let mut v = base();
    v["stages"] = json!([{"type": "twotower", "keep": 3}]);
    let d = def(v);
    let user = user_model();
    let m = Models {
        user: &user,
        strict: false,
        stages: vec![None],
    };
    let features = json!({"x": 1, "y": 2, "history": [3]});
    let mut a = fake();
    let ra = run(&d, &m, &request(&features, None, &[]), &mut a).unwrap();
    let mut b = fake();
    b.with_vectors = true;
    let rb = run(&d, &m, &request(&features, None, &[]), &mut b).unwrap();
    assert_eq!(ra.rows, rb.rows);
    let kept = |o: &twotower_funnel::Outcome| -> Vec<(String, Vec<i64>, Vec<i64>)> {
        o.steps
            .iter()
            .map(|s| (s.stage.clone(), s.kept.clone(), s.dropped.clone()))
            .collect()
    };
    assert_eq!(kept(&ra), kept(&rb));
    // Only the history (and item 9, which has no vector anywhere) is read.
    assert_eq!(b.vector_reads, vec![vec![3, 9]]);
}

#[test]
fn the_callers_candidates_go_through_the_stages_without_channels() {
    let d = def(json!({
        "user_model": "u", "vectors": {"table": "items"},
        "stages": [{"type": "twotower", "keep": 2}]
    }));
    let user = user_model();
    let m = Models {
        user: &user,
        strict: false,
        stages: vec![None],
    };
    let features = json!({"x": 1, "y": 0});
    let mut src = fake();
    let mut req = request(&features, None, &[4]);
    // x only: 6 → 6, 4 → 4 (excluded), 13 → 6, 1 → 1; ties by id.
    req.candidates = Some(&[1, 4, 13, 6]);
    let out = run(&d, &m, &req, &mut src).unwrap();
    let got: Vec<(i64, f32)> = out.rows.iter().map(|r| (r.item, r.score)).collect();
    assert_eq!(got, vec![(6, 6.0), (13, 6.0)]);
    assert!(src.asked.is_empty());
    assert!(out.rows.iter().all(|r| r.channels.is_empty()));

    req.candidates = Some(&[1, 6, 1]);
    let e = run(&d, &m, &req, &mut src).unwrap_err();
    assert!(
        matches!(e, E::Funnel(FunnelError::BadRequest(m)) if m == "candidate 1 is given twice")
    );
    req.candidates = None;
    let e = run(&d, &m, &req, &mut src).unwrap_err();
    assert!(matches!(e, E::Funnel(FunnelError::BadRequest(m)) if m.contains("has no channels")));
}

#[test]
fn the_sources_errors_reach_the_caller_unchanged_and_cancellation_stops_the_run() {
    let mut v = base();
    v["stages"] = json!([{"type": "model", "model": "pm", "keep": 3}]);
    let d = def(v);
    let (user, pm) = (user_model(), price_model());
    let m = Models {
        user: &user,
        strict: false,
        stages: vec![Some(&pm)],
    };
    let features = json!({"x": 1, "y": 2, "history": [3]});
    let mut src = fake();
    src.fail_channel = true;
    let e = run(&d, &m, &request(&features, None, &[]), &mut src).unwrap_err();
    assert!(matches!(e, E::Mine("channel failed")));

    // Cancelled at each poll in turn: the run stops with the caller's error every time.
    let mut polls = 0;
    let mut src = fake();
    run(&d, &m, &request(&features, None, &[]), &mut src).unwrap();
    let total = src.polls;
    assert!(total >= 4, "{total} polls");
    while polls < total {
        let mut src = fake();
        src.cancel_after = Some(polls);
        let e = run(&d, &m, &request(&features, None, &[]), &mut src).unwrap_err();
        assert!(matches!(e, E::Mine("cancelled")), "at poll {polls}: {e:?}");
        polls += 1;
    }
}

#[test]
fn a_request_that_does_not_fit_is_refused() {
    let mut v = base();
    v["stages"] = json!([{"type": "twotower", "keep": 3}]);
    let d = def(v);
    let user = user_model();
    let m = Models {
        user: &user,
        strict: true,
        stages: vec![None],
    };
    let ok = json!({"x": 1, "y": 2, "history": [3]});
    for k in [0, 4, -1] {
        let e = run(&d, &m, &request(&ok, Some(k), &[]), &mut fake()).unwrap_err();
        assert!(
            matches!(&e, E::Funnel(FunnelError::BadRequest(msg)) if msg == &format!("k must be between 1 and 3 (what pipeline \"p\" keeps), got {k}")),
            "{e:?}"
        );
    }
    let unknown = json!({"x": 1, "colour": "red"});
    let e = run(&d, &m, &request(&unknown, None, &[]), &mut fake()).unwrap_err();
    assert!(matches!(e, E::Funnel(FunnelError::Tower(_))), "{e:?}");
    // A key a function channel declares is known.
    let mut v = base();
    v["channels"] = json!([{"type": "function", "function": "f", "features": ["colour"], "k": 3}]);
    v["stages"] = json!([{"type": "twotower", "keep": 3}]);
    let with_function = def(v);
    assert!(run(
        &with_function,
        &m,
        &request(&unknown, None, &[]),
        &mut fake()
    )
    .is_ok());
    let bad_history = json!({"x": 1, "history": ["a"]});
    let e = run(&d, &m, &request(&bad_history, None, &[]), &mut fake()).unwrap_err();
    assert!(
        matches!(&e, E::Funnel(FunnelError::BadRequest(msg)) if msg.contains("not an integer item id")),
        "{e:?}"
    );
}

#[test]
fn definitions_name_every_bad_key_by_its_path() {
    let cases = [
        (
            json!({"user_model": "u", "vectors": {"table": "t"}, "colour": 1}),
            "colour",
        ),
        (
            json!({"user_model": "u", "vectors": {"table": "t"}, "channels": [{"type": "nope", "k": 1}]}),
            "channels[0].type",
        ),
        (
            json!({"user_model": "u", "vectors": {"table": "t"}, "channels": [{"type": "twotower", "index": "i", "k": 0}]}),
            "channels[0].k",
        ),
        (
            json!({"user_model": "u", "vectors": {"table": "t"}, "channels": [{"type": "i2i", "channel": "c", "k": 1}]}),
            "channels[0].type",
        ),
        (
            json!({"user_model": "u", "vectors": {"table": "t"}, "channels": [{"type": "function", "function": "f", "k": 1, "index": "i"}]}),
            "channels[0].index",
        ),
        (
            json!({"user_model": "u", "vectors": {"table": "t"}, "channels": [{"type": "twotower", "index": "i", "k": 1}], "merge": {"strategy": "borda"}}),
            "merge.strategy",
        ),
        (
            json!({"user_model": "u", "vectors": {"table": "t"}, "channels": [{"type": "twotower", "index": "i", "k": 1}], "merge": {"options": {"weights": {"twotower": -1}}}}),
            "merge.options",
        ),
        (
            json!({"user_model": "u", "vectors": {"table": "t"}, "stages": [{"type": "twotower", "keep": 5}], "k": 6}),
            "k",
        ),
        (json!({"user_model": "u"}), "vectors"),
    ];
    for (v, path) in cases {
        let e = Definition::parse(&v).unwrap_err();
        assert_eq!(e.path, path, "{v}: {e}");
    }
}

#[test]
fn a_function_channel_and_what_a_pipeline_uses() {
    let d = def(json!({
        "user_model": "u", "vectors": {"table": "t"}, "history": "h",
        "channels": [
            {"name": "pop", "type": "function", "function": "popular_items", "k": 5},
            {"type": "i2i", "channel": "swing", "k": 5}
        ],
        "stages": [{"type": "model", "model": "pm", "keep": 3}]
    }));
    assert_eq!(
        d.channels[0].kind,
        ChannelKind::Function {
            function: "popular_items".into(),
            features: vec![]
        }
    );
    assert_eq!(d.channels[1].name, "i2i");
    assert!(d.uses(Uses::Model, "u") && d.uses(Uses::Model, "pm"));
    assert!(d.uses(Uses::Channel, "swing"));
    assert!(!d.uses(Uses::Channel, "popular_items") && !d.uses(Uses::Model, "swing"));
    // The function channel has no seeds and is asked whatever the history.
    assert!(d.channels[0].kind.seeds(&[1, 2]).is_empty());
    assert!(!d.channels[0].kind.needs_seeds());
}

#[test]
fn a_rerank_stage_applies_its_rules_to_the_merged_list_and_reports_them() {
    // The merged list of the first test: 2, 5, 7, 9, 1, 11 (odd: 5, 7, 9, 1, 11).
    let mut v = base();
    v["stages"] = json!([{"type": "rerank", "keep": 6, "rules": [
        {"rule": "cap", "column": "parity", "most": 1, "window": 2},
        {"rule": "filter", "column": "price", "op": "ne", "value": 1}]}]);
    let d = def(v);
    let user = user_model();
    let m = Models {
        user: &user,
        strict: false,
        stages: vec![None],
    };
    let features = json!({"x": 1, "y": 2, "history": [3, 4, 8]});
    let mut src = fake();
    let out = run(&d, &m, &request(&features, Some(5), &[6]), &mut src).unwrap();
    // Prices i % 5: 1 and 11 cost 1 (filtered). Left: 2 (even), 5, 7, 9 (odd). One of each
    // parity per window of two slots: 2 5 | 7 (no even left: relaxed) 9.
    let items: Vec<i64> = out.rows.iter().map(|r| r.item).collect();
    assert_eq!(items, vec![2, 5, 7, 9]);
    // Scores and provenance are the merge's.
    assert_eq!(out.rows[0].channels, vec!["tt", "cf"]);
    let last = out.steps.last().unwrap();
    assert_eq!(
        last.stage,
        "rerank (2 filtered, 0 placed, 0 moved, 1 relaxed)"
    );
    assert_eq!(last.received, Some(6));
    assert_eq!(last.dropped, vec![1, 11]);
    // One read of the two columns, for the six merged items; no vectors (no mmr).
    assert_eq!(
        src.attribute_reads,
        vec![(
            vec![2, 5, 7, 9, 1, 11],
            vec!["parity".to_string(), "price".to_string()]
        )]
    );
    assert!(src.vector_reads.is_empty());
}

#[test]
fn a_rerank_after_the_cascade_reads_the_vectors_mmr_needs() {
    let mut v = base();
    v["stages"] = json!([{"type": "twotower", "keep": 4},
                         {"type": "rerank", "keep": 3, "rules": [{"rule": "mmr", "lambda": 1.0}]}]);
    let d = def(v);
    let user = user_model();
    let m = Models {
        user: &user,
        strict: false,
        stages: vec![None, None],
    };
    let features = json!({"x": 1, "y": 2, "history": [3, 4, 8]});
    let mut src = fake();
    let out = run(&d, &m, &request(&features, None, &[6]), &mut src).unwrap();
    // λ = 1: the cascade's order. The two-tower stage ranks by x + 2y of the vectors
    // (i mod 7, i mod 3) over the merged items with a vector: 2 → 2 + 4 = 6, 5 → 5 + 4 = 9,
    // 7 → 0 + 2 = 2, 1 → 1 + 2 = 3, 11 → 4 + 4 = 8 (9 has none); top 4: 5, 11, 2, 1.
    let items: Vec<i64> = out.rows.iter().map(|r| r.item).collect();
    assert_eq!(items, vec![5, 11, 2]);
    assert_eq!(
        out.steps.last().unwrap().stage,
        "rerank (0 filtered, 0 placed, 0 moved, 0 relaxed)"
    );
    // The cascade read the vectors; mmr found them known (no second read).
    assert_eq!(src.vector_reads.len(), 1);
}

#[test]
fn rerank_definitions_are_checked() {
    let bad = |stages: Value, without_features: bool| {
        let mut v = base();
        v["stages"] = stages;
        if without_features {
            v.as_object_mut().unwrap().remove("item_features");
        }
        Definition::parse(&v).unwrap_err().path
    };
    assert_eq!(
        bad(
            json!([{"type": "rerank", "keep": 3, "rules": []}, {"type": "twotower", "keep": 2}]),
            false
        ),
        "stages[0].type"
    );
    assert_eq!(
        bad(
            json!([{"type": "rerank", "keep": 3, "rules": [{"rule": "cap", "column": "c", "most": 1}]}]),
            true
        ),
        "stages[0].rules"
    );
    assert_eq!(
        bad(json!([{"type": "rerank", "keep": 7, "rules": []}]), false),
        "stages[0].keep"
    );
    assert_eq!(
        bad(
            json!([{"type": "rerank", "keep": 3, "rules": [{"rule": "spacing", "column": "c"}]}]),
            false
        ),
        "stages[0].rules[0].gap"
    );
    assert_eq!(
        bad(
            json!([{"type": "rerank", "keep": 3, "rules": [{"rule": "explore", "channel": "nope", "slots": [2]}]}]),
            false
        ),
        "stages[0].rules[0].channel"
    );
    // MMR reads no column: no item_features needed.
    let mut v = base();
    v.as_object_mut().unwrap().remove("item_features");
    v["stages"] = json!([{"type": "rerank", "keep": 3, "rules": [{"rule": "mmr"}]}]);
    assert!(Definition::parse(&v).is_ok());
}
