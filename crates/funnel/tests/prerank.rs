//! Cascade pre-ranking against hand-computed cases.

use serde_json::json;
use twotower_funnel::prerank::*;
use twotower_metric::Metric;
use twotower_tower::safetensors::write_f32;
use twotower_tower::{Model, Part, Source};

/// score = tt + 2·history_max + 0.5·price, by a bias-free linear layer.
fn linear_model() -> Model {
    let spec = json!({
        "format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
        "features": [
            {"name": "tt", "type": "cross", "of": "score"},
            {"name": "hmax", "type": "cross", "of": "history_max"},
            {"name": "price", "source": "item", "type": "numeric", "transform": "none"}
        ],
        "layers": [{"type": "linear", "weight": "w"}],
        "output": {"dim": 1}
    });
    Model::load(
        &spec.to_string(),
        &write_f32(&[("w", &[1, 3], &[1.0, 2.0, 0.5])]),
    )
    .unwrap()
}

fn cands() -> Vec<Candidate> {
    vec![
        Candidate {
            item: 10,
            vector: vec![1.0, 0.0].into(),
        },
        Candidate {
            item: 11,
            vector: vec![0.0, 1.0].into(),
        },
        Candidate {
            item: 12,
            vector: vec![1.0, 1.0].into(),
        },
        Candidate {
            item: 13,
            vector: vec![-1.0, 0.0].into(),
        },
        Candidate {
            item: 14,
            vector: vec![2.0, 0.0].into(),
        },
    ]
}

fn never() -> impl FnMut() -> Result<()> {
    || Ok(())
}

#[test]
fn two_tower_scores_follow_the_metric() {
    let (u, v) = ([3.0f32, 4.0], [4.0f32, 3.0]);
    assert!((two_tower_score(Metric::Cosine, &u, &v) - 24.0 / 25.0).abs() < 1e-6);
    assert_eq!(two_tower_score(Metric::InnerProduct, &u, &v), 24.0);
    assert!((two_tower_score(Metric::L2, &u, &v) + 2f32.sqrt()).abs() < 1e-6);
    assert_eq!(two_tower_score(Metric::Cosine, &[0.0, 0.0], &v), 0.0);
}

#[test]
fn a_two_tower_stage_keeps_its_top_with_ties_by_item_id() {
    let user = [1.0f32, 0.0];
    let req = Request {
        metric: Metric::InnerProduct,
        user: &user,
        history: &[],
        threads: 1,
    };
    let stages = [Stage {
        scorer: Scorer::TwoTower,
        keep: 3,
    }];
    let mut none =
        |_: usize, _: &[usize]| -> Result<Vec<std::sync::Arc<Part>>> { panic!("no model stage") };
    let r = cascade(&req, &cands(), &stages, &mut none, &mut never()).unwrap();
    // ip with (1, 0): 10→1, 11→0, 12→1, 13→−1, 14→2. Ties 10/12 by id.
    assert_eq!(r[0].received, 5);
    assert_eq!(r[0].kept, vec![4, 0, 2]);
    assert_eq!(r[0].scores, vec![2.0, 1.0, 1.0]);
    assert_eq!(r[0].dropped, vec![1, 3]);
}

#[test]
fn a_model_stage_scores_only_what_the_previous_stage_kept() {
    let m = linear_model();
    let user_part = m.encode_part(&json!({}), Source::User, true).unwrap();
    let user = [1.0f32, 0.0];
    let history = vec![vec![0.0f32, 1.0]];
    let req = Request {
        metric: Metric::Cosine,
        user: &user,
        history: &history,
        threads: 1,
    };
    let prices = [0.0, 4.0, 1.0, 10.0, 0.0];
    let stages = [
        Stage {
            scorer: Scorer::TwoTower,
            keep: 4,
        },
        Stage {
            scorer: Scorer::Model {
                name: "m",
                model: &m,
                user: &user_part,
                by: twotower_tower::ScoreBy::Fused,
            },
            keep: 2,
        },
    ];
    let mut seen = Vec::new();
    let mut parts = |stage: usize, idx: &[usize]| -> Result<Vec<std::sync::Arc<Part>>> {
        seen.push((stage, idx.to_vec()));
        Ok(idx
            .iter()
            .map(|&i| {
                std::sync::Arc::new(
                    m.encode_part(&json!({"price": prices[i]}), Source::Item, false)
                        .unwrap(),
                )
            })
            .collect())
    };
    let r = cascade(&req, &cands(), &stages, &mut parts, &mut never()).unwrap();
    // Stage 1, cosine with (1, 0): 10→1, 14→1, 12→0.7071, 11→0, 13→−1: keeps 10, 14, 12, 11.
    assert_eq!(r[0].kept, vec![0, 4, 2, 1]);
    assert_eq!(seen, vec![(1, vec![0, 4, 2, 1])]);
    // Stage 2 = cos(u, v) + 2·cos(v, h) + 0.5·price with h = (0, 1):
    // 10: 1 + 0 + 0 = 1; 14: 1 + 0 + 0 = 1; 12: 0.7071 + 1.4142 + 0.5 = 2.6213; 11: 0 + 2 + 2 = 4.
    assert_eq!(r[1].received, 4);
    assert_eq!(r[1].kept, vec![1, 2]);
    assert!((r[1].scores[0] - 4.0).abs() < 1e-6);
    assert!((r[1].scores[1] - (0.5f32.sqrt() + 2.0 * 0.5f32.sqrt() + 0.5)).abs() < 1e-5);
    assert_eq!(r[1].dropped, vec![0, 4]);
}

#[test]
fn without_history_the_history_inputs_are_zero() {
    let m = linear_model();
    let user_part = m.encode_part(&json!({}), Source::User, true).unwrap();
    let user = [1.0f32, 0.0];
    let req = Request {
        metric: Metric::InnerProduct,
        user: &user,
        history: &[],
        threads: 1,
    };
    let stages = [Stage {
        scorer: Scorer::Model {
            name: "m",
            model: &m,
            user: &user_part,
            by: twotower_tower::ScoreBy::Fused,
        },
        keep: 5,
    }];
    let mut parts = |_: usize, idx: &[usize]| -> Result<Vec<std::sync::Arc<Part>>> {
        Ok(idx
            .iter()
            .map(|_| std::sync::Arc::new(m.encode_part(&json!({}), Source::Item, false).unwrap()))
            .collect())
    };
    let r = cascade(&req, &cands(), &stages, &mut parts, &mut never()).unwrap();
    assert_eq!(r[0].scores, vec![2.0, 1.0, 1.0, 0.0, -1.0]);
}

#[test]
fn bad_cascades_are_errors() {
    let m = linear_model();
    let up = m.encode_part(&json!({}), Source::User, true).unwrap();
    let user = [1.0f32, 0.0, 0.0];
    let req = Request {
        metric: Metric::Cosine,
        user: &user,
        history: &[],
        threads: 1,
    };
    let mut parts = |_: usize, idx: &[usize]| -> Result<Vec<std::sync::Arc<Part>>> {
        Ok(idx
            .iter()
            .map(|_| std::sync::Arc::new(m.encode_part(&json!({}), Source::Item, false).unwrap()))
            .collect())
    };
    // Vectors of another width than the user's.
    let e = cascade(
        &req,
        &cands(),
        &[Stage {
            scorer: Scorer::TwoTower,
            keep: 1,
        }],
        &mut parts,
        &mut never(),
    );
    assert!(matches!(e, Err(PrerankError::Bad(m)) if m.contains("2-dimensional")));
    let user = [1.0f32, 0.0];
    let req = Request {
        metric: Metric::Cosine,
        user: &user,
        history: &[],
        threads: 1,
    };
    assert!(cascade(&req, &cands(), &[], &mut parts, &mut never()).is_err());
    assert!(cascade(
        &req,
        &cands(),
        &[Stage {
            scorer: Scorer::TwoTower,
            keep: 0
        }],
        &mut parts,
        &mut never()
    )
    .is_err());
    // A cancel request between stages stops the cascade.
    let mut cancel = || Err(PrerankError::Bad("cancelled".into()));
    let stages = [Stage {
        scorer: Scorer::Model {
            name: "m",
            model: &m,
            user: &up,
            by: twotower_tower::ScoreBy::Fused,
        },
        keep: 5,
    }];
    assert_eq!(
        cascade(&req, &cands(), &stages, &mut parts, &mut cancel),
        Err(PrerankError::Bad("cancelled".into()))
    );
    // A model reading u⊙v of another width than the towers'.
    let (spec, w) = twotower_testkit::towers::realistic_prerank(1);
    let big = Model::load(&spec, &w).unwrap();
    let e = check_model("big", &big, 2).unwrap_err();
    assert!(e.to_string().contains("64 wide"), "{e}");
    assert!(check_model("big", &big, 64).is_ok());
}

#[test]
fn a_huge_input_is_a_non_finite_score_error_naming_the_item() {
    let m = linear_model();
    let up = m.encode_part(&json!({}), Source::User, true).unwrap();
    let user = [1.0f32, 0.0];
    let req = Request {
        metric: Metric::InnerProduct,
        user: &user,
        history: &[],
        threads: 1,
    };
    let mut parts = |_: usize, idx: &[usize]| -> Result<Vec<std::sync::Arc<Part>>> {
        Ok(idx
            .iter()
            .map(|&i| {
                std::sync::Arc::new(
                    m.encode_part(
                        &json!({"price": if i == 2 { 3e38 } else { 1.0 }}),
                        Source::Item,
                        false,
                    )
                    .unwrap(),
                )
            })
            .collect())
    };
    let stages = [Stage {
        scorer: Scorer::Model {
            name: "m",
            model: &m,
            user: &up,
            by: twotower_tower::ScoreBy::Fused,
        },
        keep: 5,
    }];
    // 0.5 · 3e38 + 1 is finite; make it overflow through a second huge term instead.
    let r = cascade(&req, &cands(), &stages, &mut parts, &mut never());
    assert!(r.is_ok());
    let mut parts2 = |_: usize, idx: &[usize]| -> Result<Vec<std::sync::Arc<Part>>> {
        Ok(idx
            .iter()
            .map(|_| {
                std::sync::Arc::new(
                    m.encode_part(&json!({"price": 3.4e38}), Source::Item, false)
                        .unwrap(),
                )
            })
            .collect())
    };
    let wide = [Candidate {
        item: 7,
        vector: vec![3e38, 0.0].into(),
    }];
    let user = [3e38f32, 0.0];
    let req = Request {
        metric: Metric::InnerProduct,
        user: &user,
        history: &[],
        threads: 1,
    };
    let e = cascade(&req, &wide, &stages, &mut parts2, &mut never()).unwrap_err();
    assert_eq!(
        e,
        PrerankError::NonFinite {
            model: "m".into(),
            item: 7
        }
    );
}

#[test]
fn the_realistic_model_scores_in_parallel_as_it_does_alone() {
    let (spec, w) = twotower_testkit::towers::realistic_prerank(3);
    let m = Model::load(&spec, &w).unwrap();
    let up = m
        .encode_part(&json!({"device": "ios"}), Source::User, true)
        .unwrap();
    let user: Vec<f32> = (0..64)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0)
        .collect();
    let cands: Vec<Candidate> = (0..2000)
        .map(|i| Candidate {
            item: i,
            vector: (0..64)
                .map(|j| (((i * 31 + j * 17) % 23) as f32 - 11.0) / 10.0)
                .collect::<Vec<f32>>()
                .into(),
        })
        .collect();
    let history: Vec<Vec<f32>> = cands[..5].iter().map(|c| c.vector.to_vec()).collect();
    let mut parts = |_: usize, idx: &[usize]| -> Result<Vec<std::sync::Arc<Part>>> {
        Ok(idx
            .iter()
            .map(|&i| {
                std::sync::Arc::new(
                    m.encode_part(
                        &json!({"category": format!("c{}", i % 30), "price": i as f64, "other": 1}),
                        Source::Item,
                        false,
                    )
                    .unwrap(),
                )
            })
            .collect())
    };
    let run = |threads: usize, parts: &mut ItemParts| {
        let req = Request {
            metric: Metric::Cosine,
            user: &user,
            history: &history,
            threads,
        };
        let stages = [
            Stage {
                scorer: Scorer::TwoTower,
                keep: 1500,
            },
            Stage {
                scorer: Scorer::Model {
                    name: "p",
                    model: &m,
                    user: &up,
                    by: twotower_tower::ScoreBy::Fused,
                },
                keep: 100,
            },
        ];
        cascade(&req, &cands, &stages, parts, &mut || Ok(())).unwrap()
    };
    let one = run(1, &mut parts);
    let two = run(2, &mut parts);
    assert_eq!(one[1].kept, two[1].kept);
    assert_eq!(one[1].scores, two[1].scores);
    assert_eq!(one[1].kept.len(), 100);
    assert_eq!(one[1].dropped.len(), 1400);
}

mod pipeline {
    use serde_json::json;
    use twotower_funnel::channel::ChannelKind;
    use twotower_funnel::pipeline::*;

    fn base() -> serde_json::Value {
        json!({
            "user_model": "u",
            "vectors": {"table": "iv"},
            "history": "history",
            "channels": [
                {"type": "twotower", "index": "iv_idx", "k": 300},
                {"name": "cf", "type": "i2i", "channel": "itemcf", "k": 200, "history_len": 20, "decay": 0.8}
            ],
            "merge": {"strategy": "rrf", "k": 400},
            "stages": [{"type": "twotower", "keep": 300}, {"type": "model", "model": "p", "keep": 100}],
            "k": 50
        })
    }

    #[test]
    fn a_definition_parses_with_its_defaults() {
        let d = Definition::parse(&base()).unwrap();
        assert_eq!(
            d.vectors,
            Vectors {
                table: "iv".into(),
                id_column: "id".into(),
                vector_column: "embedding".into()
            }
        );
        assert_eq!(d.channels[0].name, "twotower");
        assert_eq!(
            d.channels[1].kind,
            ChannelKind::I2i {
                channel: "itemcf".into(),
                history_len: 20,
                decay: 0.8
            }
        );
        assert!(d.exclude_history);
        assert_eq!(d.merge.k, 400);
        assert_eq!(
            d.stages[1],
            StageDef {
                kind: StageKind::Model("p".into()),
                keep: 100,
                score: None,
            }
        );
        assert_eq!((d.k, d.most()), (50, 100));
        // Without a merge, RRF over everything the channels return; without k, min(100, most).
        let mut v = base();
        v.as_object_mut().unwrap().remove("merge");
        v.as_object_mut().unwrap().remove("stages");
        v.as_object_mut().unwrap().remove("k");
        let d = Definition::parse(&v).unwrap();
        assert_eq!((d.merge.name.as_str(), d.merge.k, d.k), ("rrf", 500, 100));
        // Without channels: stages over the caller's candidates (prerank), up to 100,000.
        let d = Definition::parse(&json!({"user_model": "u", "vectors": {"table": "iv"},
            "stages": [{"type": "twotower", "keep": 5000}]}))
        .unwrap();
        assert!(d.channels.is_empty());
        assert_eq!((d.most(), d.k), (5000, 100));
    }

    #[test]
    fn bad_definitions_name_the_path() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (json!([1]), ""),
            (
                json!({"user_model": "u", "vectors": {"table": "iv"}, "channels": {}}),
                "channels",
            ),
            (
                json!({"user_model": "u", "vectors": {"table": "iv"}, "channels": [], "merge": {"k": 5}}),
                "merge",
            ),
            (
                json!({"user_model": "u", "vectors": {"table": "iv"}, "channels": [{"type": "i2i", "channel": "c", "k": 5}]}),
                "channels[0].type",
            ),
            (
                json!({"user_model": "u", "vectors": {"table": "iv"}, "channels": [{"type": "twotower", "index": "x", "k": 0}]}),
                "channels[0].k",
            ),
            (
                json!({"user_model": "u", "vectors": {"table": "iv"}, "channels": [{"type": "twotower", "index": "x", "k": 5}, {"type": "twotower", "index": "y", "k": 5}]}),
                "channels[1].name",
            ),
            (
                json!({"user_model": "u", "vectors": {"table": "iv"}, "channels": [{"type": "twotower", "index": "x", "k": 5, "extra": 1}]}),
                "channels[0].extra",
            ),
            (
                json!({"user_model": "u", "vectors": {"table": "iv"}, "channels": [{"type": "twotower", "index": "x", "k": 5}], "stages": [{"type": "twotower", "keep": 6}]}),
                "stages[0].keep",
            ),
            (
                json!({"user_model": "u", "vectors": {"table": "iv"}, "channels": [{"type": "twotower", "index": "x", "k": 50}], "stages": [{"type": "twotower", "keep": 10}, {"type": "model", "model": "m", "keep": 20}]}),
                "stages[1].keep",
            ),
            (
                json!({"user_model": "u", "vectors": {"table": "iv"}, "channels": [{"type": "twotower", "index": "x", "k": 50}], "stages": [{"type": "twotower", "keep": 10}], "k": 11}),
                "k",
            ),
            (
                json!({"user_model": "u", "vectors": {"table": "iv"}, "channels": [{"type": "twotower", "index": "x", "k": 50}], "merge": {"options": {"order": ["a"]}}}),
                "merge.options.order",
            ),
            (
                json!({"vectors": {"table": "iv"}, "channels": [{"type": "twotower", "index": "x", "k": 50}]}),
                "user_model",
            ),
            (
                json!({"user_model": "u", "channels": [{"type": "twotower", "index": "x", "k": 50}]}),
                "vectors",
            ),
            (
                json!({"user_model": "u", "vectors": {"table": "iv"}, "channels": [{"type": "bm25", "k": 50}]}),
                "channels[0].type",
            ),
            (
                json!({"user_model": "u", "vectors": {"table": "iv"}, "history": "h", "channels": [{"type": "i2i", "channel": "c", "k": 5, "decay": 0}]}),
                "channels[0].decay",
            ),
        ];
        for (v, path) in cases {
            let e = Definition::parse(&v).unwrap_err();
            assert_eq!(e.path, path, "{v}: {e}");
        }
    }
}

#[test]
fn recall_rank_is_the_log_of_the_position_in_the_list_received() {
    // score = −ln(position) + 0·tt: the recall order survives; a two-tower stage first keeps
    // the candidates' own positions (not their positions after stage 1).
    let spec = json!({
        "format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
        "features": [{"name": "rr", "type": "cross", "of": "recall_rank"}, {"name": "tt", "type": "cross", "of": "score"}],
        "layers": [{"type": "linear", "weight": "w"}], "output": {"dim": 1}
    });
    let m = Model::load(
        &spec.to_string(),
        &write_f32(&[("w", &[1, 2], &[-1.0, 0.0])]),
    )
    .unwrap();
    let user_part = m.encode_part(&json!({}), Source::User, true).unwrap();
    let user = [1.0f32, 0.0];
    let req = Request {
        metric: Metric::InnerProduct,
        user: &user,
        history: &[],
        threads: 1,
    };
    let mut parts = |_: usize, idx: &[usize]| -> Result<Vec<std::sync::Arc<Part>>> {
        Ok(idx
            .iter()
            .map(|_| std::sync::Arc::new(m.encode_part(&json!({}), Source::Item, false).unwrap()))
            .collect())
    };
    let stages = [
        Stage {
            scorer: Scorer::TwoTower,
            keep: 3,
        },
        Stage {
            scorer: Scorer::Model {
                name: "m",
                model: &m,
                user: &user_part,
                by: twotower_tower::ScoreBy::Fused,
            },
            keep: 3,
        },
    ];
    let r = cascade(&req, &cands(), &stages, &mut parts, &mut never()).unwrap();
    // Stage 1 keeps 14, 10, 12 (inner products 2, 1, 1); stage 2 orders them by position.
    assert_eq!(r[0].kept, vec![4, 0, 2]);
    assert_eq!(r[1].kept, vec![0, 2, 4]);
    let want: Vec<f32> = [1f32, 3.0, 5.0].iter().map(|p| -p.ln()).collect();
    assert_eq!(r[1].scores, want);
}

/// A multi-task model over the item's price: task `a` is σ(price) (sigmoid), `b` the price
/// itself (identity) with fuse weight `fuse_b`.
fn two_task_model(fuse_b: f32) -> Model {
    let spec = json!({
        "format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
        "features": [{"name": "price", "source": "item", "type": "numeric", "transform": "none"}],
        "graph": [
            {"name": "a", "inputs": ["price"], "layers": [{"type": "linear", "weight": "w"}]},
            {"name": "b", "inputs": ["price"], "layers": [{"type": "linear", "weight": "w"}]},
            {"name": "out", "combine": "concat", "inputs": ["a", "b"]}],
        "output": {"dim": 2, "node": "out", "tasks": [{"name": "a"}, {"name": "b", "link": "identity", "fuse": fuse_b}]}
    });
    Model::load(&spec.to_string(), &write_f32(&[("w", &[1, 1], &[1.0])])).unwrap()
}

/// The item parts of candidates whose price is `prices[i]`.
fn priced<'a>(
    m: &'a Model,
    prices: &'a [f64],
) -> impl FnMut(usize, &[usize]) -> Result<Vec<std::sync::Arc<Part>>> + 'a {
    move |_, idx| {
        Ok(idx
            .iter()
            .map(|&i| {
                std::sync::Arc::new(
                    m.encode_part(&json!({ "price": prices[i] }), Source::Item, false)
                        .unwrap(),
                )
            })
            .collect())
    }
}

/// Ranking by a sigmoid task goes by its logit: σ(20) and σ(30) are both 1.0 in f32, and the
/// larger logit still ranks first (it tied, and the smaller item id won); the stage shows σ.
/// A fused score that overflows is an error naming the item, not an infinite score.
#[test]
fn a_sigmoid_task_ranks_by_its_logit_and_a_fused_overflow_is_an_error() {
    let m = two_task_model(1.0);
    let up = m.encode_part(&json!({}), Source::User, true).unwrap();
    let user = [1.0f32, 0.0];
    let req = Request {
        metric: Metric::InnerProduct,
        user: &user,
        history: &[],
        threads: 1,
    };
    let prices = [20.0, 30.0, -3.0, -4.0, -5.0];
    let mut parts = priced(&m, &prices);
    let stages = [Stage {
        scorer: Scorer::Model {
            name: "m",
            model: &m,
            user: &up,
            by: twotower_tower::ScoreBy::Task(0),
        },
        keep: 3,
    }];
    let r = cascade(&req, &cands(), &stages, &mut parts, &mut never()).unwrap();
    assert_eq!(r[0].kept, vec![1, 0, 2], "by logit: 30, 20, -3");
    assert_eq!(r[0].scores[..2], [1.0, 1.0], "σ shown");
    assert!((r[0].scores[2] - 1.0 / (1.0 + 3f32.exp())).abs() < 1e-6);
    assert_eq!(r[0].task_scores[1], 30.0, "task b of the first kept");
    // Fused with a huge weight on the identity task: Σ overflows f32.
    let big = two_task_model(1e30);
    let up = big.encode_part(&json!({}), Source::User, true).unwrap();
    let huge = [1e10, 1.0, 2.0, 3.0, 4.0];
    let mut parts = priced(&big, &huge);
    let stages = [Stage {
        scorer: Scorer::Model {
            name: "big",
            model: &big,
            user: &up,
            by: twotower_tower::ScoreBy::Fused,
        },
        keep: 3,
    }];
    assert_eq!(
        cascade(&req, &cands(), &stages, &mut parts, &mut never()),
        Err(PrerankError::NonFinite {
            model: "big".into(),
            item: 10
        })
    );
}

#[test]
fn the_batched_history_similarities_are_the_per_vector_ones() {
    let user = [0.5, -1.0, 2.0];
    let history = vec![vec![1.0, 0.0, 0.0], vec![0.0, 3.0, 4.0], vec![0.0; 3]];
    let vs: [[f32; 3]; 4] = [
        [1.0, 2.0, 3.0],
        [0.0, 0.0, 0.0],
        [-2.0, 0.5, 1.0],
        [4.0, -4.0, 0.25],
    ];
    let x: Vec<f32> = vs.iter().flatten().copied().collect();
    let c = CrossInputs::new(Metric::Cosine, &user, &history);
    let got = c.history_rows(&x, vs.len());
    assert_eq!(got.len(), vs.len());
    for (v, (mx, mean)) in vs.iter().zip(&got) {
        let (wmx, wmean) = c.history(v);
        assert!(
            (mx - wmx).abs() < 1e-6 && (mean - wmean).abs() < 1e-6,
            "{v:?}: {mx} {mean} against {wmx} {wmean}"
        );
    }
    assert_eq!(got[1], (0.0, 0.0), "a zero vector has no similarity");
    // The first vector against the unit history [1,0,0] and [0,0.6,0.8] (the zero one left out).
    let n = 14f32.sqrt();
    assert!((got[0].0 - 3.6 / n).abs() < 1e-6 && (got[0].1 - 4.6 / 2.0 / n).abs() < 1e-6);
    // Without history, one (0, 0) per row.
    let none = CrossInputs::new(Metric::Cosine, &user, &[]);
    assert_eq!(none.history_rows(&x, 4), vec![(0.0, 0.0); 4]);
}
