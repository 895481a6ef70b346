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
