//! Training pre-rank models from logged requests: each objective learns what it should, the
//! exported model serves in the funnel's cascade with the scores training computed, runs are
//! deterministic, and bad options and data are refused.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::sync::Arc;
use twotower_funnel::prerank::{cascade, Candidate, Request, Scorer, Stage};
use twotower_metric::Metric;
use twotower_tower::{Kind, Model, Source};
use twotower_train::prerank::{LogCandidate, LogRequest, Objective};
use twotower_train::{train_prerank, Event, PrerankConfig, RankLog, TrainError};

const DIM: usize = 8;
const CATS: i64 = 5;

fn unit(rng: &mut ChaCha8Rng) -> Vec<f32> {
    let v: Vec<f32> = (0..DIM).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// `requests` requests of 40 candidates from 300 items. Item `i` has category `i % 5`; a user
/// likes one category (the request's `fav`). Labels: 1 for the liked category. The teacher
/// scores 4·cos(u, v) (what the towers think), unrelated to the labels.
fn log(requests: usize, seed: u64) -> RankLog {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let vectors: Vec<Vec<f32>> = (0..300).map(|_| unit(&mut rng)).collect();
    let mut log = RankLog::new(Metric::Cosine);
    for _ in 0..requests {
        let fav = rng.gen_range(0..CATS);
        let user = unit(&mut rng);
        let history: Vec<Vec<f32>> = (0..3)
            .map(|_| vectors[rng.gen_range(0..300)].clone())
            .collect();
        let mut ids: Vec<i64> = (0..300).collect();
        let mut candidates = Vec::new();
        for _ in 0..40 {
            let j = rng.gen_range(0..ids.len());
            let id = ids.swap_remove(j);
            let v = vectors[id as usize].clone();
            let teacher = 4.0 * v.iter().zip(&user).map(|(a, b)| a * b).sum::<f32>();
            let item = log.item(id, || {
                (json!({"cat": id % CATS, "pop": (id % 7) as f64}), v)
            });
            candidates.push(LogCandidate {
                item,
                position: candidates.len() as u32 + 1,
                label: if id % CATS == fav { 1.0 } else { 0.0 },
                teacher: Some(teacher),
            });
        }
        log.requests.push(LogRequest {
            id: log.requests.len().to_string(),
            features: json!({"fav": fav}),
            user,
            history,
            candidates,
            labels: Vec::new(),
        });
    }
    log
}

fn options(objective: Value) -> Value {
    let mut o = json!({
        "model": {"features": [
            {"name": "fav", "type": "categorical", "dim": 4},
            {"name": "cat", "source": "item", "type": "categorical", "dim": 4},
            {"name": "pop", "source": "item", "type": "numeric"},
            {"name": "uv", "type": "cross", "of": "product"},
            {"name": "score", "type": "cross", "of": "score"},
            {"name": "hmax", "type": "cross", "of": "history_max"}
        ], "hidden": [32]},
        "epochs": 8, "batch_size": 128, "lr": 0.01, "k": 10, "validation": 0.2, "seed": 7
    });
    for (k, v) in objective.as_object().unwrap() {
        o[k] = v.clone();
    }
    o
}

fn run(o: &Value, log: &RankLog) -> Result<twotower_train::TrainedPrerank, TrainError> {
    let cfg = PrerankConfig::parse(o)?;
    train_prerank(&cfg, log, 1 << 30, &mut |_| Ok(()))
}

#[test]
fn labels_objective_learns_the_user_item_interaction() {
    let l = log(300, 1);
    let t = run(&options(json!({"objective": "labels"})), &l).unwrap();
    let best = t.epochs.iter().find(|e| e.epoch == t.best_epoch).unwrap();
    let m = best.valid.unwrap();
    // Random order would find about 10/40 of the positives in the top 10.
    assert!(m.recall > 0.85, "validation recall@10 {}", m.recall);
    assert_eq!(t.valid_requests, 60);
    assert_eq!(t.train_examples, 240 * 40);
    let model = Model::load(&t.spec, &t.weights).unwrap();
    assert_eq!(model.kind(), Kind::Prerank);
    assert_eq!(model.output_dim(), 1);
    let item_side: Vec<&str> = model
        .sources()
        .filter(|(_, s)| *s == Source::Item)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(item_side, vec!["cat", "pop"]);
}

#[test]
fn distillation_follows_the_teacher_and_labels_alone_do_not() {
    let l = log(200, 2);
    let distilled = run(
        &options(json!({"objective": "distill", "lambda": 5.0, "ramp_steps": 20})),
        &l,
    )
    .unwrap();
    let plain = run(&options(json!({"objective": "labels"})), &l).unwrap();
    let agree =
        |t: &twotower_train::TrainedPrerank| t.epochs.last().unwrap().teacher_agreement.unwrap();
    // The teacher ranks by the two-tower score, which the labels ignore.
    assert!(
        agree(&distilled) > 0.8,
        "distilled agreement {}",
        agree(&distilled)
    );
    assert!(
        agree(&plain) < agree(&distilled) - 0.2,
        "labels-only agreement {} vs {}",
        agree(&plain),
        agree(&distilled)
    );
}

#[test]
fn cascade_objective_takes_the_teachers_top_n_as_positives() {
    let l = log(200, 3);
    let t = run(&options(json!({"objective": "cascade", "top_n": 5})), &l).unwrap();
    let m = t
        .epochs
        .iter()
        .find(|e| e.epoch == t.best_epoch)
        .unwrap()
        .valid
        .unwrap();
    // The positives are the teacher's top 5: the student finds most of them in its top 10.
    assert!(
        m.recall > 0.8,
        "recall of the teacher's top 5 in the student's top 10: {}",
        m.recall
    );
}

#[test]
fn the_trained_model_serves_in_the_cascade_with_the_scores_training_computed() {
    let l = log(120, 4);
    let t = run(&options(json!({"objective": "labels", "epochs": 3})), &l).unwrap();
    serves_in_the_cascade(&t, &l);
}

#[test]
fn target_attention_trains_and_serves_in_the_cascade() {
    // train_prerank checks the export against the trained tower on a request with history;
    // the cascade (forward_rows, keys computed once per request) scores the same.
    let l = log(300, 4);
    let mut o = options(json!({"objective": "labels"}));
    o["model"]["features"].as_array_mut().unwrap().push(
        json!({"name": "din", "type": "cross", "of": "target_attention", "attention_dim": 4}),
    );
    let t = run(&o, &l).unwrap();
    let spec: Value = serde_json::from_str(&t.spec).unwrap();
    assert_eq!(
        spec["features"][6]["attention"],
        json!({"query": "din.query", "key": "din.key"})
    );
    let m = t
        .epochs
        .iter()
        .find(|e| e.epoch == t.best_epoch)
        .unwrap()
        .valid
        .unwrap();
    assert!(m.recall > 0.85, "validation recall@10 {}", m.recall);
    serves_in_the_cascade(&t, &l);
}

fn serves_in_the_cascade(t: &twotower_train::TrainedPrerank, l: &RankLog) {
    let model = Model::load(&t.spec, &t.weights).unwrap();
    let r = &l.requests[l.requests.len() - 1];
    let user = model.encode_part(&r.features, Source::User, false).unwrap();
    let cands: Vec<Candidate> = r
        .candidates
        .iter()
        .map(|c| Candidate {
            item: l.items[c.item as usize].id,
            vector: Arc::from(l.items[c.item as usize].vector.as_slice()),
        })
        .collect();
    let stages = [Stage {
        scorer: Scorer::Model {
            name: "student",
            model: &model,
            user: &user,
            by: twotower_tower::ScoreBy::Fused,
        },
        keep: 10,
    }];
    let req = Request {
        metric: Metric::Cosine,
        user: &r.user,
        history: &r.history,
        threads: 1,
    };
    let mut parts = |_: usize, idx: &[usize]| {
        Ok(idx
            .iter()
            .map(|&i| {
                Arc::new(
                    model
                        .encode_part(
                            &l.items[r.candidates[i].item as usize].features,
                            Source::Item,
                            false,
                        )
                        .unwrap(),
                )
            })
            .collect())
    };
    let reports =
        cascade::<twotower_funnel::PrerankError>(&req, &cands, &stages, &mut parts, &mut || Ok(()))
            .unwrap();
    // Each kept candidate's cascade score is the model's forward pass of the same inputs.
    let crosses = twotower_funnel::prerank::CrossInputs::new(Metric::Cosine, &r.user, &r.history)
        .with_attention(&model, &r.history);
    for (&i, &s) in reports[0].kept.iter().zip(&reports[0].scores) {
        let it = &l.items[r.candidates[i].item as usize];
        let part = model
            .encode_part(&it.features, Source::Item, false)
            .unwrap();
        let pair = crosses.pair(&it.vector, i + 1, true);
        let x = model.assemble(&user, &part, &mut |c, out| {
            crosses.fill(c, &it.vector, &pair, out)
        });
        assert!((model.forward(&x)[0] - s).abs() < 1e-4);
    }
    assert!(reports[0].scores.windows(2).all(|w| w[0] >= w[1]));
}

#[test]
fn runs_are_deterministic_for_a_seed_and_thread_count() {
    let l = log(80, 5);
    let o = options(json!({"objective": "distill", "epochs": 2, "threads": 2}));
    let (a, b) = (run(&o, &l).unwrap(), run(&o, &l).unwrap());
    assert_eq!(a.weights, b.weights);
    let mut o1 = o.clone();
    o1["seed"] = json!(8);
    assert_ne!(run(&o1, &l).unwrap().weights, a.weights);
}

#[test]
fn cancel_stops_the_run() {
    let l = log(50, 6);
    let cfg = PrerankConfig::parse(&options(json!({}))).unwrap();
    let mut steps = 0;
    let r = train_prerank(&cfg, &l, 1 << 30, &mut |e| {
        if let Event::Step(_) = e {
            steps += 1;
            if steps == 3 {
                return Err(TrainError::Cancelled);
            }
        }
        Ok(())
    });
    assert!(matches!(r, Err(TrainError::Cancelled)));
    assert_eq!(steps, 3);
}

#[test]
fn bad_options_and_data_are_refused() {
    let bad = |o: Value, want: &str| {
        let e = PrerankConfig::parse(&o).unwrap_err().to_string();
        assert!(e.contains(want), "{e} should mention {want}");
    };
    let base = options(json!({}));
    let mut o = base.clone();
    o["lambda"] = json!(1.0);
    bad(o, "lambda");
    let mut o = base.clone();
    o["top_n"] = json!(3);
    bad(o, "top_n");
    let mut o = base.clone();
    o["objective"] = json!("magic");
    bad(o, "objective");
    let mut o = base.clone();
    o["model"]["features"][1]["source"] = json!("elsewhere");
    bad(o, "model.features[1].source");
    let mut o = base.clone();
    o["model"]["features"][3]["of"] = json!("telepathy");
    bad(o, "model.features[3].of");
    let mut o = base.clone();
    o["model"]["features"][4]["source"] = json!("item");
    bad(o, "model.features[4].source");
    let mut o = base.clone();
    o["model"]["features"][4]["of"] = json!("product");
    bad(o, "listed twice");
    let mut o = options(json!({}));
    o["model"]["features"][4]["attention_dim"] = json!(4);
    bad(o, "model.features[4].attention_dim");
    let mut o = options(json!({}));
    o["model"]["features"].as_array_mut().unwrap().push(
        json!({"name": "din", "type": "cross", "of": "target_attention", "attention_dim": 0}),
    );
    bad(o, "model.features[6].attention_dim");
    let mut o = base.clone();
    o["model"]["features"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "h", "type": "history"}));
    bad(o, "multi_categorical");
    let mut o = base.clone();
    o["validation"] = json!(0.9);
    bad(o, "validation");
    // Towers know neither sources nor cross inputs.
    let tower = json!({"user": {"features": [{"name": "u", "type": "categorical", "source": "item"}]},
                       "item": {"features": [{"name": "i", "type": "categorical"}]}});
    assert!(twotower_train::Config::parse(&tower).is_err());
    let tower = json!({"user": {"features": [{"name": "u", "type": "cross", "of": "score"}]},
                       "item": {"features": [{"name": "i", "type": "categorical"}]}});
    assert!(twotower_train::Config::parse(&tower)
        .unwrap_err()
        .to_string()
        .contains("pre-rank"));

    // A distillation needs every candidate's teacher score; labels must be in [0, 1].
    let mut l = log(20, 9);
    l.requests[3].candidates[2].teacher = None;
    let e = run(&options(json!({"objective": "distill"})), &l).unwrap_err();
    assert!(e.to_string().contains("teacher"), "{e}");
    assert!(run(&options(json!({"objective": "labels", "epochs": 1})), &l).is_ok());
    l.requests[1].candidates[0].label = 2.0;
    assert!(run(&options(json!({"objective": "labels"})), &l)
        .unwrap_err()
        .to_string()
        .contains("[0, 1]"));
    let l = RankLog::new(Metric::Cosine);
    assert!(matches!(
        run(&options(json!({})), &l),
        Err(TrainError::NoData(_))
    ));
    // The memory budget.
    let l = log(20, 10);
    let cfg = PrerankConfig::parse(&options(json!({}))).unwrap();
    assert!(matches!(
        train_prerank(&cfg, &l, 1000, &mut |_| Ok(())),
        Err(TrainError::MemoryBudget { .. })
    ));
    let _ = Objective::Labels;
}

#[test]
fn recall_rank_is_learned_from_the_logged_position() {
    // Labels: the recall stage's first four; only the recall_rank input can tell.
    let mut l = log(150, 11);
    for r in &mut l.requests {
        for c in &mut r.candidates {
            c.label = if c.position <= 4 { 1.0 } else { 0.0 };
        }
    }
    let o = json!({"model": {"features": [{"name": "rr", "type": "cross", "of": "recall_rank"}], "hidden": [8]},
                   "epochs": 8, "batch_size": 64, "lr": 0.02, "k": 4, "validation": 0.2});
    let t = run(&o, &l).unwrap();
    let m = t
        .epochs
        .iter()
        .find(|e| e.epoch == t.best_epoch)
        .unwrap()
        .valid
        .unwrap();
    assert!(m.recall > 0.95, "recall@4 {}", m.recall);
}

#[test]
fn dense_layers_count_against_the_memory_budget() {
    // 16 hidden layers of 4,096: about 270 M parameters, refused by a 1 GB budget at once.
    let l = log(20, 9);
    let mut o = options(json!({"objective": "labels"}));
    o["model"]["hidden"] = json!(vec![4096; 16]);
    let cfg = PrerankConfig::parse(&o).unwrap();
    let t0 = std::time::Instant::now();
    assert!(matches!(
        train_prerank(&cfg, &l, 1 << 30, &mut |_| Ok(())),
        Err(TrainError::MemoryBudget { .. })
    ));
    assert!(
        t0.elapsed().as_secs_f64() < 5.0,
        "refused at once, not after allocating"
    );
}

/// The log with three tasks: `liked` (the user's category, as the label), `expensive` (the
/// item's pop ≥ 4, whoever asks) and `minutes` (a squared task: pop / 2 plus 1 when liked,
/// missing for a quarter of the candidates); and a scene (the request's parity).
fn multitask_log(requests: usize, seed: u64) -> RankLog {
    let mut l = log(requests, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 99);
    for (i, r) in l.requests.iter_mut().enumerate() {
        r.features["scene"] = json!(if i % 2 == 0 { "home" } else { "search" });
        r.labels = r
            .candidates
            .iter()
            .flat_map(|c| {
                let pop = (l.items[c.item as usize].id % 7) as f32;
                let minutes = if rng.gen_bool(0.25) {
                    f32::NAN
                } else {
                    pop / 2.0 + c.label
                };
                [c.label, if pop >= 4.0 { 1.0 } else { 0.0 }, minutes]
            })
            .collect();
    }
    l
}

fn multitask_options(model: Value) -> Value {
    let mut o = options(json!({}));
    o["model"]["features"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "scene", "type": "categorical", "dim": 2}));
    for (k, v) in model.as_object().unwrap() {
        o["model"][k] = v.clone();
    }
    o["tasks"] = json!([
        {"name": "liked", "column": "liked"},
        {"name": "expensive", "fuse": 0.2},
        {"name": "minutes", "loss": "squared", "weight": 0.2, "fuse": 0.0}
    ]);
    o
}

/// Area under the ROC curve of `scores` for binary `labels`.
fn auc(scores: &[f32], labels: &[bool]) -> f64 {
    let mut o: Vec<usize> = (0..scores.len()).collect();
    o.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut pos) = (0f64, 0f64);
    for (r, &i) in o.iter().enumerate() {
        if labels[i] {
            rank_sum += r as f64 + 1.0;
            pos += 1.0;
        }
    }
    let neg = scores.len() as f64 - pos;
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// Each task's head learns its own target (MMoE, PLE with a scene gate, shared-bottom); the
/// squared task regresses; validation ranks by the fused score; the model serves in the
/// cascade ranking by a task or the fused score, with every task's score in the report.
#[test]
fn multitask_models_learn_each_task_and_serve_by_task_or_fused() {
    use twotower_tower::ScoreBy;
    let l = multitask_log(300, 4);
    for model in [
        json!({"hidden": [16], "experts": {"shared": 3}}),
        json!({"hidden": [16], "experts": {"shared": 2, "per_task": 1}, "task_hidden": [8], "scene": "scene"}),
        json!({"hidden": [16]}),
    ] {
        let t = run(&multitask_options(model.clone()), &l).unwrap();
        let m = Model::load(&t.spec, &t.weights).unwrap();
        assert_eq!(m.output_dim(), 3, "{model}");
        let best = t.epochs.iter().find(|e| e.epoch == t.best_epoch).unwrap();
        assert!(
            best.valid.unwrap().recall > 0.8,
            "{model}: {:?}",
            best.valid
        );
        // Score the validation requests' candidates through the served model.
        let (mut out, mut liked, mut expensive, mut minutes) = (vec![], vec![], vec![], vec![]);
        for r in &l.requests[240..] {
            let user = m.encode_part(&r.features, Source::User, false).unwrap();
            for (j, c) in r.candidates.iter().enumerate() {
                let it = &l.items[c.item as usize];
                let part = m.encode_part(&it.features, Source::Item, false).unwrap();
                let crosses =
                    twotower_funnel::prerank::CrossInputs::new(Metric::Cosine, &r.user, &r.history);
                let pair = crosses.pair(&it.vector, c.position as usize, true);
                let x = m.assemble(&user, &part, &mut |x, o| {
                    crosses.fill(x, &it.vector, &pair, o)
                });
                out.extend(m.forward(&x));
                liked.push(r.labels[3 * j] > 0.5);
                expensive.push(r.labels[3 * j + 1] > 0.5);
                minutes.push(r.labels[3 * j + 2]);
            }
        }
        let by = |t: usize| m.scores(&out, ScoreBy::Task(t));
        let (a0, a1) = (auc(&by(0), &liked), auc(&by(1), &expensive));
        assert!(
            a0 > 0.9 && a1 > 0.9,
            "{model}: AUC liked {a0}, expensive {a1}"
        );
        // Each head ranks its own task, not the other's.
        assert!(auc(&by(0), &expensive) < 0.75, "{model}");
        let mins = by(2);
        let (mut se, mut var, n) = (0f64, 0f64, minutes.iter().filter(|y| !y.is_nan()).count());
        let mean = minutes
            .iter()
            .filter(|y| !y.is_nan())
            .map(|y| *y as f64)
            .sum::<f64>()
            / n as f64;
        for (s, y) in mins.iter().zip(&minutes).filter(|(_, y)| !y.is_nan()) {
            se += (*s as f64 - *y as f64).powi(2);
            var += (*y as f64 - mean).powi(2);
        }
        assert!(se / var < 0.3, "{model}: minutes R² {}", 1.0 - se / var);
    }
    // In the cascade: ranking by `expensive` keeps expensive items; the report has each task.
    let t = run(
        &multitask_options(json!({"hidden": [16], "experts": {"shared": 2}})),
        &l,
    )
    .unwrap();
    let m = Model::load(&t.spec, &t.weights).unwrap();
    let r = &l.requests[250];
    let cands: Vec<Candidate> = r
        .candidates
        .iter()
        .map(|c| Candidate {
            item: l.items[c.item as usize].id,
            vector: Arc::from(l.items[c.item as usize].vector.as_slice()),
        })
        .collect();
    let user = m.encode_part(&r.features, Source::User, false).unwrap();
    let req = Request {
        metric: Metric::Cosine,
        user: &r.user,
        history: &r.history,
        threads: 1,
    };
    for (by, want) in [(ScoreBy::Task(1), "expensive"), (ScoreBy::Task(0), "liked")] {
        let stages = [Stage {
            scorer: Scorer::Model {
                name: "mt",
                model: &m,
                user: &user,
                by,
            },
            keep: 5,
        }];
        let mut parts = |_: usize,
                         idx: &[usize]|
         -> Result<
            Vec<Arc<twotower_tower::Part>>,
            twotower_funnel::prerank::PrerankError,
        > {
            Ok(idx
                .iter()
                .map(|&i| {
                    Arc::new(
                        m.encode_part(
                            &l.items[r.candidates[i].item as usize].features,
                            Source::Item,
                            false,
                        )
                        .unwrap(),
                    )
                })
                .collect())
        };
        let rep = cascade(&req, &cands, &stages, &mut parts, &mut || Ok(())).unwrap();
        let kept = &rep[0].kept;
        assert_eq!(rep[0].task_scores.len(), 5 * 3);
        for (j, &i) in kept.iter().enumerate() {
            let id = cands[i].item;
            let ok = match want {
                "expensive" => id % 7 >= 4,
                _ => r.candidates[i].label > 0.5,
            };
            assert!(ok, "{want}: kept item {id}");
            let t = if want == "expensive" { 1 } else { 0 };
            assert_eq!(rep[0].scores[j], rep[0].task_scores[3 * j + t]);
        }
    }
}

/// Multi-task options that make no sense are refused with their path.
#[test]
fn bad_multitask_options_are_refused() {
    let base = multitask_options(json!({"hidden": [16]}));
    let cases: Vec<(Value, &str)> = vec![
        (json!({"tasks": []}), "tasks"),
        (
            json!({"tasks": [{"name": "a"}, {"name": "a"}]}),
            "tasks[1].name",
        ),
        (json!({"tasks": [{"name": "fused"}]}), "tasks[0].name"),
        (
            json!({"tasks": [{"name": "a", "loss": "hinge"}]}),
            "tasks[0].loss",
        ),
        (json!({"tasks": [{"name": "a", "weight": 0}]}), "tasks"),
        (json!({"tasks": [{"name": "a", "fuse": 0}]}), "tasks"),
        (json!({"tasks": [{"name": "a", "what": 1}]}), "tasks[0]"),
        (json!({"validate_task": "nope"}), "validate_task"),
        (json!({"objective": "distill"}), "objective"),
        (
            json!({"model": {"experts": {"shared": 0}}}),
            "model.experts",
        ),
        (
            json!({"model": {"experts": {"shared": 17}}}),
            "model.experts.shared",
        ),
        (json!({"model": {"scene": "cat"}}), "model.scene"),
        (json!({"model": {"scene": "nope"}}), "model.scene"),
        (json!({"model": {"hidden": []}}), "model.hidden"),
        (json!({"model": {"task_hidden": [0]}}), "model.task_hidden"),
        // 3 tasks × (1 gate + 1 head + 16 own experts) + 16 shared + the output: 71 nodes.
        (
            json!({"model": {"experts": {"shared": 16, "per_task": 16}}}),
            "model.experts",
        ),
    ];
    for (patch, path) in cases {
        let mut o = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            if k == "model" {
                for (mk, mv) in v.as_object().unwrap() {
                    o["model"][mk] = mv.clone();
                }
            } else {
                o[k] = v.clone();
            }
        }
        let err = PrerankConfig::parse(&o)
            .err()
            .unwrap_or_else(|| panic!("{patch} accepted"));
        assert!(
            err.to_string().contains(&format!("\"{path}\"")) || err.to_string().contains(path),
            "{patch}: {err}"
        );
    }
    // Multi-task model keys without tasks.
    let mut o = options(json!({}));
    o["model"]["experts"] = json!({"shared": 2});
    let err = PrerankConfig::parse(&o).err().unwrap().to_string();
    assert!(
        err.contains("model.experts") && err.contains("tasks"),
        "{err}"
    );
    // A logistic task's label outside [0, 1] is refused with the request and item.
    let mut l = multitask_log(20, 5);
    l.requests[3].labels[1] = 2.0;
    let err = run(&multitask_options(json!({"hidden": [8]})), &l)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("request 3") && err.contains("expensive"),
        "{err}"
    );
}

/// A multi-task model's experts count against the budget before anything is allocated (16
/// experts of 2 × 4,096 and 16 tasks: over 500 M parameters), and a cancel stops its run.
#[test]
fn multitask_memory_budget_and_cancel() {
    let mut l = multitask_log(20, 9);
    for r in &mut l.requests {
        r.labels = r.candidates.iter().flat_map(|c| [c.label; 16]).collect();
    }
    let mut o = multitask_options(json!({"hidden": [4096, 4096], "experts": {"shared": 16}}));
    o["tasks"] = json!((0..16)
        .map(|i| json!({"name": format!("t{i}"), "column": format!("t{i}")}))
        .collect::<Vec<_>>());
    let cfg = PrerankConfig::parse(&o).unwrap();
    let t0 = std::time::Instant::now();
    match train_prerank(&cfg, &l, 1 << 30, &mut |_| Ok(())) {
        Err(TrainError::MemoryBudget { needed, .. }) => assert!(needed > 2_000_000_000, "{needed}"),
        other => panic!("{:?}", other.map(|t| t.parameters)),
    }
    assert!(t0.elapsed().as_secs_f64() < 5.0, "refused at once");
    // Few parameters but 48 experts' activations over batches of 65,536 rows: refused too
    // (the budget counted one stack's activations).
    o["model"]["hidden"] = json!([64]);
    o["model"]["experts"] = json!({"shared": 16, "per_task": 8});
    o["tasks"] = json!((0..4)
        .map(|i| json!({"name": format!("t{i}"), "column": format!("t{i}")}))
        .collect::<Vec<_>>());
    o["batch_size"] = json!(65536);
    for r in &mut l.requests {
        r.labels = r.candidates.iter().flat_map(|c| [c.label; 4]).collect();
    }
    let cfg = PrerankConfig::parse(&o).unwrap();
    match train_prerank(&cfg, &l, 1 << 30, &mut |_| Ok(())) {
        Err(TrainError::MemoryBudget { needed, .. }) => assert!(needed > 1 << 30, "{needed}"),
        other => panic!("{:?}", other.map(|t| t.parameters)),
    }
    // The same experts at 1 × 64 fit; a cancel after 3 steps stops the run.
    let l = multitask_log(20, 9);
    let cfg = PrerankConfig::parse(&multitask_options(
        json!({"hidden": [64], "experts": {"shared": 4}}),
    ))
    .unwrap();
    let mut steps = 0;
    let r = train_prerank(&cfg, &l, 1 << 30, &mut |e| {
        if let Event::Step(_) = e {
            steps += 1;
            if steps == 3 {
                return Err(TrainError::Cancelled);
            }
        }
        Ok(())
    });
    assert!(
        matches!(r, Err(TrainError::Cancelled)),
        "{:?}",
        r.map(|t| t.parameters)
    );
}
