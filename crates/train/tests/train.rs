//! End-to-end training on synthetic data with a known structure: it learns, it is deterministic,
//! it stops when asked, it respects its memory budget, and the export serves what it trained.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use twotower_tower::Model;
use twotower_train::{train, train_from, Base, Config, Data, Event, Keys, TrainError};

/// Items 0..n with their id and genre `g{i mod 10}` as features.
fn add_items(d: &mut Data, n: i32) {
    for i in 0..n {
        let mut f = Map::new();
        f.insert("item_id".into(), json!(i));
        f.insert("genre".into(), json!(format!("g{}", i % 10)));
        d.item_features(&i.to_string(), f).unwrap();
    }
}

/// User `u` with their id and age as features (any integer type: the callers' loops keep
/// theirs, which their random draws depend on).
fn add_user<T: Into<Value> + ToString + Copy>(d: &mut Data, u: T, age: impl Into<Value>) {
    let mut f = Map::new();
    f.insert("user_id".into(), u.into());
    f.insert("age".into(), age.into());
    d.user_features(&u.to_string(), f).unwrap();
}

/// 300 users in 10 taste groups, 200 items in the same 10 groups (with a genre feature); each
/// user interacts with 20 items, 90 % from their group, in time order.
fn synthetic() -> Data {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut d = Data::default();
    add_items(&mut d, 200);
    for u in 0..300 {
        let group = u % 10;
        add_user(&mut d, u, 20 + (u % 40));
        for t in 0..20 {
            let item = if rng.gen::<f64>() < 0.9 {
                group + 10 * rng.gen_range(0..20)
            } else {
                rng.gen_range(0..200)
            };
            d.interaction(&u.to_string(), &item.to_string(), (t * 100 + u) as f64, 1.0)
                .unwrap();
        }
    }
    d
}

fn config(extra: Value) -> Config {
    let mut base = json!({
        "dim": 16,
        "user": {"features": [
            {"name": "user_id", "type": "categorical"},
            {"name": "age", "type": "numeric"},
            {"name": "history", "type": "history", "max_len": 10, "decay": {"position": 0.8}}
        ], "hidden": [32]},
        "item": {"features": [
            {"name": "item_id", "type": "categorical"},
            {"name": "genre", "type": "categorical", "dim": 4}
        ], "hidden": [32]},
        "epochs": 8, "batch_size": 128, "lr": 0.005, "sparse_lr": 0.05, "k": 10, "temperature": 0.1, "patience": 8
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
        b.extend(e);
    }
    Config::parse(&base).unwrap()
}

fn keys() -> Keys {
    Keys {
        user: "user_id".into(),
        item: "item_id".into(),
    }
}

const BUDGET: usize = 1 << 30;

#[test]
fn every_loss_family_learns_the_groups() {
    let data = synthetic();
    // Random ranking: HR@10 ≈ 10/181 ≈ 0.06 (the user's training items are masked).
    for extra in [
        json!({"loss": "softmax"}),
        json!({"loss": "softmax", "negatives": 64}),
        json!({"loss": "softmax", "in_batch": false, "negatives": 64}),
        json!({"loss": "pointwise", "negatives": 3}),
        json!({"loss": "triplet_logistic", "negatives": 3}),
        json!({"loss": "triplet_hinge", "negatives": 3}),
        json!({"sparse_optimizer": "adagrad", "sparse_lr": 0.1}),
        json!({"sparse_optimizer": "ftrl", "sparse_lr": 0.1}),
        // Max pooling, dropout and a shortcut of raw fields to the top (the export, which
        // train() checks against the trained tower, holds dropout and shortcut layers).
        json!({"user": {"features": [
                  {"name": "user_id", "type": "categorical"},
                  {"name": "age", "type": "numeric"},
                  {"name": "history", "type": "history", "max_len": 10, "pooling": "max"}],
               "hidden": [32], "dropout": 0.1, "shortcut": ["age"]},
               "item": {"features": [
                  {"name": "item_id", "type": "categorical"},
                  {"name": "genre", "type": "categorical", "dim": 4}],
               "hidden": [32], "dropout": 0.1, "shortcut": ["genre"]}}),
    ] {
        let cfg = config(extra.clone());
        let t = train(&cfg, &data, &keys(), BUDGET, &mut |_| Ok(())).unwrap();
        let best = t
            .epochs
            .iter()
            .filter_map(|e| e.valid)
            .map(|m| m.hr)
            .fold(0.0, f64::max);
        println!("{extra}: best validation HR@10 {best:.3}");
        assert!(
            best > 0.6,
            "{extra}: validation HR@10 {best} (random ≈ 0.06)"
        );
        assert_eq!(t.valid_examples, 300);
        assert_eq!(t.train_examples, 300 * 19);
    }
}

#[test]
fn same_seed_same_model_and_the_export_serves_it() {
    let data = synthetic();
    let cfg = config(json!({"epochs": 2}));
    let a = train(&cfg, &data, &keys(), BUDGET, &mut |_| Ok(())).unwrap();
    let b = train(&cfg, &data, &keys(), BUDGET, &mut |_| Ok(())).unwrap();
    assert_eq!(
        a.user_weights, b.user_weights,
        "deterministic for a seed and a thread count"
    );
    assert_eq!(a.item_weights, b.item_weights);
    let c = train(
        &config(json!({"epochs": 2, "seed": 7})),
        &data,
        &keys(),
        BUDGET,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_ne!(
        a.user_weights, c.user_weights,
        "another seed, another model"
    );
    // The exported towers load as ordinary models and embed serving inputs.
    let um = Model::load(&a.user_spec, &a.user_weights).unwrap();
    let im = Model::load(&a.item_spec, &a.item_weights).unwrap();
    let u = um.embed(&json!({"user_id": 3, "age": 30, "history": {"ids": [3, 13, 23], "weights": [1.0, 0.8, 0.64]}})).unwrap();
    let v = im.embed(&json!({"item_id": 33, "genre": "g3"})).unwrap();
    assert_eq!((u.len(), v.len()), (16, 16));
    let norm: f32 = u.iter().map(|x| x * x).sum::<f32>();
    assert!((norm - 1.0).abs() < 1e-4);
}

#[test]
fn ftrl_with_l1_prunes_all_zero_rows_and_the_export_still_serves_what_was_trained() {
    let data = synthetic();
    let plain = train(
        &config(json!({"sparse_optimizer": "ftrl", "sparse_lr": 0.1, "epochs": 3})),
        &data,
        &keys(),
        BUDGET,
        &mut |_| Ok(()),
    )
    .unwrap();
    let l1 = train(
        &config(json!({"sparse_optimizer": "ftrl", "sparse_lr": 0.1, "ftrl_l1": 2.0, "epochs": 3})),
        &data,
        &keys(),
        BUDGET,
        &mut |_| Ok(()),
    )
    .unwrap();
    let removed: usize = l1.pruned.iter().map(|p| p.2).sum();
    assert!(removed > 0, "L1 zeroes rows: {:?}", l1.pruned);
    assert!(
        l1.user_weights.len() + l1.item_weights.len()
            < plain.user_weights.len() + plain.item_weights.len()
    );
    // (train() itself checks that the pruned export computes what was trained.)
    let um = Model::load(&l1.user_spec, &l1.user_weights).unwrap();
    assert_eq!(
        um.embed(&json!({"user_id": 3, "age": 30, "history": {"ids": [3], "weights": [1.0]}}))
            .unwrap()
            .len(),
        16
    );
}

#[test]
fn hard_negatives_are_used_by_per_row_and_softmax_losses() {
    // Contradictory hard negatives (the items of the user's own group) must hurt: proof that
    // they reach the loss.
    let clean = synthetic();
    let mut hard = synthetic();
    for u in 0..300 {
        for k in 0..20 {
            hard.hard_negative(&u.to_string(), &((u % 10) + 10 * k).to_string())
                .unwrap();
        }
    }
    for extra in [
        json!({"loss": "pointwise", "negatives": 3, "hard_ratio": 1.0}),
        json!({"hard_per_row": 64}),
    ] {
        let cfg = config(extra.clone());
        // The mean HR of the last three epochs (the best one may come before the hard negatives
        // took effect).
        let last = |d: &Data| {
            let t = train(&cfg, d, &keys(), BUDGET, &mut |_| Ok(())).unwrap();
            let hrs: Vec<f64> = t
                .epochs
                .iter()
                .rev()
                .take(3)
                .filter_map(|e| e.valid)
                .map(|m| m.hr)
                .collect();
            hrs.iter().sum::<f64>() / hrs.len().max(1) as f64
        };
        let (a, b) = (last(&clean), last(&hard));
        assert!(
            b < a - 0.1,
            "{extra}: HR@10 without hard negatives {a}, with contradictory ones {b}"
        );
    }
}

fn tensor(weights: &[u8], name: &str) -> Vec<u8> {
    safetensors::SafeTensors::deserialize(weights)
        .unwrap()
        .tensor(name)
        .unwrap()
        .data()
        .to_vec()
}

#[test]
fn incremental_updates_keep_dense_layers_and_give_new_ids_useful_vectors() {
    let base_data = synthetic();
    let base = train(
        &config(json!({"epochs": 6})),
        &base_data,
        &keys(),
        BUDGET,
        &mut |_| Ok(()),
    )
    .unwrap();
    // New interactions: 60 new users and 50 new items (200..250, group i % 10), mostly with the
    // new items of their group, some with old ones.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut d = Data::default();
    for i in 0..250 {
        let mut f = Map::new();
        f.insert("item_id".into(), json!(i));
        f.insert("genre".into(), json!(format!("g{}", i % 10)));
        d.item_features(&i.to_string(), f).unwrap();
    }
    for u in 300..360 {
        let g = u % 10;
        add_user(&mut d, u, 20 + (u % 40));
        for t in 0..20 {
            let item = if rng.gen::<f64>() < 0.7 {
                200 + g + 10 * rng.gen_range(0..5)
            } else {
                g + 10 * rng.gen_range(0..20)
            };
            d.interaction(&u.to_string(), &item.to_string(), (t * 100 + u) as f64, 1.0)
                .unwrap();
        }
    }
    let cfg = config(json!({"epochs": 6, "freeze_dense": true}));
    let b = Base {
        user: (&base.user_spec, &base.user_weights),
        item: (&base.item_spec, &base.item_weights),
    };
    let inc = train_from(&cfg, &d, &keys(), BUDGET, Some(b), &mut |_| Ok(())).unwrap();
    // Dense layers are frozen; the base's ids keep their rows' places (their vocabulary first).
    for name in ["mlp.0.weight", "mlp.0.bias", "mlp.1.weight", "mlp.1.bias"] {
        assert_eq!(
            tensor(&inc.user_weights, name),
            tensor(&base.user_weights, name),
            "user {name}"
        );
        assert_eq!(
            tensor(&inc.item_weights, name),
            tensor(&base.item_weights, name),
            "item {name}"
        );
    }
    let vocab = |spec: &str| -> Vec<String> {
        let v: Value = serde_json::from_str(spec).unwrap();
        serde_json::from_value(v["features"][0]["vocabulary"].clone()).unwrap()
    };
    let (old, new) = (vocab(&base.item_spec), vocab(&inc.item_spec));
    assert_eq!(
        &new[..old.len()],
        &old[..],
        "old ids first, in their old rows"
    );
    assert!(new.len() >= old.len() + 50, "the 50 new items were added");
    // New users are served well, and new items land next to their group's old items.
    let hr = inc
        .epochs
        .iter()
        .filter_map(|e| e.valid)
        .map(|m| m.hr)
        .fold(0.0, f64::max);
    assert!(hr > 0.4, "new users' validation HR@10 {hr} (random ≈ 0.04)");
    let im = Model::load(&inc.item_spec, &inc.item_weights).unwrap();
    let emb = |i: usize| {
        im.embed(&json!({"item_id": i, "genre": format!("g{}", i % 10)}))
            .unwrap()
    };
    let olds: Vec<Vec<f32>> = (0..200).map(emb).collect();
    let mut same = 0;
    for i in 200..250 {
        let v = emb(i);
        let mut sims: Vec<(f32, usize)> = olds
            .iter()
            .enumerate()
            .map(|(j, o)| (o.iter().zip(&v).map(|(a, b)| a * b).sum(), j))
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0));
        same += sims[..5].iter().filter(|(_, j)| j % 10 == i % 10).count();
    }
    assert!(
        same as f64 / 250.0 > 0.6,
        "new items' nearest old items share their group: {same} of 250"
    );
}

#[test]
fn a_cancel_stops_the_run_with_no_model() {
    let data = synthetic();
    let cfg = config(json!({}));
    let mut steps = 0;
    let r = train(&cfg, &data, &keys(), BUDGET, &mut |e| {
        if let Event::Step(_) = e {
            steps += 1;
            if steps == 5 {
                return Err(TrainError::Cancelled);
            }
        }
        Ok(())
    });
    assert!(matches!(r, Err(TrainError::Cancelled)), "{r:?}");
    assert_eq!(steps, 5);
}

#[test]
fn the_memory_budget_is_checked_before_anything_large() {
    let data = synthetic();
    let r = train(&config(json!({})), &data, &keys(), 100_000, &mut |_| Ok(()));
    match r {
        Err(TrainError::MemoryBudget { needed, budget }) => assert!(needed > budget),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_options_and_data_are_errors() {
    for (bad, what) in [
        (json!({"dim": 0}), "dim"),
        (json!({"loss": "listwise"}), "loss"),
        (json!({"loss": "pointwise", "negatives": 0}), "negatives"),
        (json!({"in_batch": false}), "negatives"),
        (json!({"margin": 0.3}), "margin"),
        (json!({"ftrl_l1": 1.0}), "ftrl_l1"),
        (json!({"epochs": 1.5}), "epochs"),
        (json!({"unknown": 1}), "unknown"),
        (json!({"user": {"features": []}}), "user.features"),
        (
            json!({"item": {"features": [{"name": "h", "type": "history"}]}}),
            "item.features[0].type",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}, {"name": "a", "type": "numeric"}]}}),
            "user.features[1].name",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}, {"name": "b", "type": "numeric"}], "hidden": [8], "layer_norm": true, "batch_norm": true}}),
            "user.batch_norm",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "batch_norm": true}}),
            "user.batch_norm",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "senet": 4}}),
            "user.senet",
        ),
        (
            json!({"item": {"features": [{"name": "p", "type": "bucketize", "boundaries": [1, 2], "buckets": 3}]}}),
            "item.features[0].boundaries",
        ),
        (
            json!({"item": {"features": [{"name": "p", "type": "bucketize", "boundaries": [2, 1]}]}}),
            "item.features[0].boundaries",
        ),
        (
            json!({"item": {"features": [{"name": "p", "type": "bucketize", "buckets": 1}]}}),
            "item.features[0].buckets",
        ),
        (
            json!({"item": {"features": [{"name": "v", "type": "dense", "dim": 0}]}}),
            "item.features[0].dim",
        ),
        // Branches and fusion.
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "fusion": "sum"}}),
            "user.fusion",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "x"}]}}),
            "user.branches",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "x"}, {"name": "x"}]}}),
            "user.branches[1].name",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "a"}, {"name": "y"}]}}),
            "user.branches[0].name",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "head"}, {"name": "y"}]}}),
            "user.branches[0].name",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "x", "features": ["b"]}, {"name": "y"}]}}),
            "user.branches[0].features",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "x", "features": []}, {"name": "y"}]}}),
            "user.branches[0].features",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}, {"name": "b", "type": "numeric"}],
                "branches": [{"name": "x", "features": ["a"]}, {"name": "y", "features": ["a"]}]}}),
            "user.branches",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "x", "hidden": [0]}, {"name": "y"}]}}),
            "user.branches[0].hidden",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "x", "depth": 2}, {"name": "y"}]}}),
            "user.branches[0].depth",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "x"}, {"name": "y"}], "fusion": "max"}}),
            "user.fusion",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "x"}, {"name": "y"}], "shortcut": ["a"]}}),
            "user.shortcut",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "x"}, {"name": "y"}], "fusion": "parallel"}}),
            "item.fusion",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "x"}, {"name": "y"}], "fusion": "parallel", "hidden": [4]}}),
            "user.hidden",
        ),
        (
            json!({"user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "x"}, {"name": "y"}], "fusion": "parallel"},
                "item": {"features": [{"name": "b", "type": "categorical"}], "branches": [{"name": "x"}, {"name": "y"}, {"name": "z"}], "fusion": "parallel"}}),
            "item.branches",
        ),
        (
            json!({"dim": 15, "user": {"features": [{"name": "a", "type": "categorical"}], "branches": [{"name": "x"}, {"name": "y"}], "fusion": "parallel"},
                "item": {"features": [{"name": "b", "type": "categorical"}], "branches": [{"name": "x"}, {"name": "y"}], "fusion": "parallel"}}),
            "dim",
        ),
        // Dual augmented vectors.
        (
            json!({"dual_augmented": {"user": "nope", "item": "item_id"}}),
            "dual_augmented.user",
        ),
        (
            json!({"dual_augmented": {"user": "user_id", "item": "item_id", "lambda": -1}}),
            "dual_augmented.lambda",
        ),
        (
            json!({"dual_augmented": {"user": "user_id", "item": "item_id", "beta": 1}}),
            "dual_augmented.beta",
        ),
        (
            json!({"dual_augmented": {"user": "user_id", "item": "genre"},
                "item": {"features": [{"name": "item_id", "type": "categorical"}, {"name": "genre", "type": "categorical", "dim": 4}]}}),
            "dual_augmented.item",
        ),
    ] {
        let mut base = json!({
            "user": {"features": [{"name": "user_id", "type": "categorical"}]},
            "item": {"features": [{"name": "item_id", "type": "categorical"}]}
        });
        if let (Value::Object(b), Value::Object(e)) = (&mut base, bad.clone()) {
            b.extend(e);
        }
        match Config::parse(&base) {
            Err(TrainError::Option { path, .. }) => assert!(
                path.starts_with(what),
                "{bad}: error at {path}, expected {what}"
            ),
            other => panic!("{bad}: {other:?}"),
        }
    }
    let cfg = config(json!({}));
    let empty = Data::default();
    assert!(matches!(
        train(&cfg, &empty, &keys(), BUDGET, &mut |_| Ok(())),
        Err(TrainError::NoData(_))
    ));
    // A feature value of the wrong type names the entity.
    let mut d = synthetic();
    let mut f = Map::new();
    f.insert("age".into(), json!("old"));
    d.user_features("5", f).unwrap();
    match train(&cfg, &d, &keys(), BUDGET, &mut |_| Ok(())) {
        Err(TrainError::NoData(m)) => assert!(m.contains("user 5"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// The synthetic data with a numeric item feature (price, by group) and a dense one (a noisy
/// 3-vector of the group).
fn synthetic_with_values() -> Data {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut d = synthetic();
    for i in 0..200usize {
        let g = (i % 10) as f64;
        let mut f = Map::new();
        f.insert("item_id".into(), json!(i));
        f.insert("genre".into(), json!(format!("g{}", i % 10)));
        f.insert("price".into(), json!(g * 10.0 + rng.gen_range(0.0..5.0)));
        f.insert(
            "vec".into(),
            json!([(g / 3.0).cos(), (g / 3.0).sin(), rng.gen_range(-0.1..0.1)]),
        );
        d.item_features(&i.to_string(), f).unwrap();
    }
    d
}

#[test]
fn senet_batch_norm_bucketize_and_dense_features_learn_and_serve_what_was_trained() {
    let data = synthetic_with_values();
    let towers = json!({
        "user": {"features": [
            {"name": "user_id", "type": "categorical"},
            {"name": "age", "type": "bucketize", "buckets": 4, "dim": 4},
            {"name": "history", "type": "history", "max_len": 10, "decay": {"position": 0.8}}],
            "hidden": [32], "senet": 2, "batch_norm": true},
        "item": {"features": [
            {"name": "item_id", "type": "categorical"},
            {"name": "price", "type": "bucketize", "boundaries": [20, 40, 60, 80], "dim": 4},
            {"name": "vec", "type": "dense", "dim": 3}],
            "hidden": [32], "senet": 2, "batch_norm": true, "shortcut": ["vec"]}
    });
    // train() checks that the exported towers serve what was trained (BatchNorm with its
    // running statistics, SENet, the buckets, the dense field).
    let t = train(&config(towers.clone()), &data, &keys(), BUDGET, &mut |_| {
        Ok(())
    })
    .unwrap();
    let best = t
        .epochs
        .iter()
        .filter_map(|e| e.valid)
        .map(|m| m.hr)
        .fold(0.0, f64::max);
    assert!(best > 0.6, "validation HR@10 {best} (random ≈ 0.06)");
    let spec: Value = serde_json::from_str(&t.user_spec).unwrap();
    assert!(spec["senet"].is_object(), "{spec}");
    let age = &spec["features"][1];
    assert_eq!(age["type"], "bucketize");
    // Ages 20..39 belong to 8 users each, 40..59 to 7 (300 users, age 20 + u % 40), each with
    // 19 training examples: the weighted quartiles end at 29, 38 and 49.
    assert_eq!(age["boundaries"], json!([30.0, 39.0, 50.0]), "{age}");
    let layers: Vec<&str> = spec["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        layers,
        ["linear", "batchnorm", "relu", "linear", "l2_normalize"]
    );
    // The running statistics moved from their start (mean 0, variance 1).
    let f32s = |b: Vec<u8>| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let var = f32s(tensor(&t.item_weights, "bn.0.running_var"));
    assert!(
        var.iter().all(|v| v.is_finite() && *v > 0.0) && var.iter().any(|v| (v - 1.0).abs() > 0.05),
        "{var:?}"
    );
    let im = Model::load(&t.item_spec, &t.item_weights).unwrap();
    assert_eq!(
        im.embed(&json!({"item_id": 3, "price": 35.5, "vec": [0.1, 0.2, 0.3]}))
            .unwrap()
            .len(),
        16
    );

    // Incremental: dense layers, SENet, BatchNorm statistics and bucket boundaries are the base's.
    let cfg = config(
        json!({"epochs": 2, "freeze_dense": true, "user": towers["user"], "item": towers["item"]}),
    );
    let b = Base {
        user: (&t.user_spec, &t.user_weights),
        item: (&t.item_spec, &t.item_weights),
    };
    let inc = train_from(&cfg, &data, &keys(), BUDGET, Some(b), &mut |_| Ok(())).unwrap();
    for name in [
        "senet.fc1.weight",
        "senet.fc2.bias",
        "bn.0.weight",
        "bn.0.running_mean",
        "bn.0.running_var",
        "age.embedding",
    ] {
        assert_eq!(
            tensor(&inc.user_weights, name),
            tensor(&t.user_weights, name),
            "user {name}"
        );
    }
    assert_ne!(
        tensor(&inc.user_weights, "user_id.embedding"),
        tensor(&t.user_weights, "user_id.embedding")
    );
    let ispec: Value = serde_json::from_str(&inc.user_spec).unwrap();
    assert_eq!(ispec["features"][1]["boundaries"], age["boundaries"]);
}

/// The served vectors of every item and of each user at the end of their timeline.
fn served(t: &twotower_train::Trained) -> (Model, Model) {
    (
        Model::load(&t.user_spec, &t.user_weights).unwrap(),
        Model::load(&t.item_spec, &t.item_weights).unwrap(),
    )
}

#[test]
fn graph_towers_learn_and_serve_what_was_trained() {
    let data = synthetic();
    let user_features = json!([
        {"name": "user_id", "type": "categorical"},
        {"name": "age", "type": "numeric"},
        {"name": "history", "type": "history", "max_len": 10, "decay": {"position": 0.8}}]);
    let item_features = json!([
        {"name": "item_id", "type": "categorical"},
        {"name": "genre", "type": "categorical", "dim": 4}]);
    let user_branches = json!([
        {"name": "deep", "features": ["user_id", "history"], "hidden": [32]},
        {"name": "wide", "features": ["user_id", "age"]}]);
    let item_branches = json!([
        {"name": "deep", "features": ["item_id", "genre"], "hidden": [32]},
        {"name": "wide", "features": ["item_id"]}]);
    for fusion in ["attention", "concat", "sum", "weighted_sum", "parallel"] {
        let mut towers = json!({
            "user": {"features": user_features, "branches": user_branches, "fusion": fusion, "senet": 2},
            "item": {"features": item_features, "branches": item_branches, "fusion": fusion}
        });
        if fusion == "concat" {
            towers["user"]["hidden"] = json!([16]);
            towers["user"]["layer_norm"] = json!(true);
        }
        // train() checks that the exported graphs serve what was trained.
        let t = train(&config(towers.clone()), &data, &keys(), BUDGET, &mut |_| {
            Ok(())
        })
        .unwrap();
        let best = t
            .epochs
            .iter()
            .filter_map(|e| e.valid)
            .map(|m| m.hr)
            .fold(0.0, f64::max);
        println!("{fusion}: best validation HR@10 {best:.3}");
        assert!(
            best > 0.6,
            "{fusion}: validation HR@10 {best} (random ≈ 0.06)"
        );
        let spec: Value = serde_json::from_str(&t.user_spec).unwrap();
        assert!(
            spec.get("layers").is_none() && spec["graph"].is_array(),
            "{spec}"
        );
        let (um, im) = served(&t);
        let u = um.embed(&json!({"user_id": 3, "age": 30, "history": {"ids": [3, 13, 23], "weights": [1.0, 0.8, 0.64]}})).unwrap();
        let v = im.embed(&json!({"item_id": 33, "genre": "g3"})).unwrap();
        assert_eq!((u.len(), v.len()), (16, 16));
        let f32s = |b: Vec<u8>| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        match fusion {
            "parallel" => {
                // Two sub-vectors of 8, each of unit length: the user's scaled by the learned
                // weights, the item's as they are; the metric is the inner product.
                assert_eq!(spec["output"]["metric"], "ip");
                let w = f32s(tensor(&t.user_weights, "fusion.weight"));
                assert!(
                    w.iter().any(|x| (x - 1.0).abs() > 1e-3),
                    "the pair weights were trained: {w:?}"
                );
                for (half, wi) in w.iter().enumerate() {
                    let n_u: f32 = u[half * 8..(half + 1) * 8]
                        .iter()
                        .map(|x| x * x)
                        .sum::<f32>()
                        .sqrt();
                    let n_v: f32 = v[half * 8..(half + 1) * 8]
                        .iter()
                        .map(|x| x * x)
                        .sum::<f32>()
                        .sqrt();
                    assert!(
                        (n_u - wi.abs()).abs() < 1e-4 && (n_v - 1.0).abs() < 1e-4,
                        "{n_u} {n_v} {wi}"
                    );
                }
            }
            _ => {
                assert_eq!(spec["output"]["metric"], "cosine");
                let n: f32 = u.iter().map(|x| x * x).sum();
                assert!((n - 1.0).abs() < 1e-4);
            }
        }
        if fusion == "attention" {
            // Incremental training keeps a graph's dense parameters.
            let cfg = config(
                json!({"epochs": 1, "freeze_dense": true, "user": towers["user"], "item": towers["item"]}),
            );
            let b = Base {
                user: (&t.user_spec, &t.user_weights),
                item: (&t.item_spec, &t.item_weights),
            };
            let inc = train_from(&cfg, &data, &keys(), BUDGET, Some(b), &mut |_| Ok(())).unwrap();
            for name in [
                "fusion.weight",
                "fusion.bias",
                "deep.mlp.0.weight",
                "deep.mlp.1.bias",
                "wide.mlp.0.bias",
                "senet.fc1.weight",
            ] {
                assert_eq!(
                    tensor(&inc.user_weights, name),
                    tensor(&t.user_weights, name),
                    "user {name}"
                );
            }
        }
    }
}

#[test]
fn dual_augmented_vectors_mimic_the_other_tower() {
    let data = synthetic();
    // The augmented vectors are the id embeddings (width dim) of user_id and item_id.
    let towers = |aug: Option<f64>| {
        let mut t = json!({
            "user": {"features": [
                {"name": "user_id", "type": "categorical"},
                {"name": "age", "type": "numeric"},
                {"name": "history", "type": "history", "max_len": 10, "decay": {"position": 0.8}}], "hidden": [32]},
            "item": {"features": [
                {"name": "item_id", "type": "categorical"},
                {"name": "genre", "type": "categorical", "dim": 4}], "hidden": [32]}
        });
        if let Some(l) = aug {
            t["dual_augmented"] = json!({"user": "user_id", "item": "item_id", "lambda": l});
        }
        t
    };
    let f32s = |b: Vec<u8>| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let cosine = |a: &[f32], b: &[f32]| {
        let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        d / (a.iter().map(|x| x * x).sum::<f32>().sqrt()
            * b.iter().map(|x| x * x).sum::<f32>().sqrt())
        .max(1e-12)
    };
    let mut closeness = Vec::new();
    for aug in [None, Some(1.0)] {
        let t = train(
            &config(towers(aug)),
            &data,
            &keys(),
            BUDGET,
            &mut |_| Ok(()),
        )
        .unwrap();
        let best = t
            .epochs
            .iter()
            .filter_map(|e| e.valid)
            .map(|m| m.hr)
            .fold(0.0, f64::max);
        assert!(best > 0.6, "{aug:?}: validation HR@10 {best}");
        // Served as an ordinary id embedding: the spec has nothing new.
        let spec: Value = serde_json::from_str(&t.user_spec).unwrap();
        assert_eq!(spec["features"][0]["type"], "categorical");
        // How close each item's augmented vector is to the vectors of the users who chose it
        // (their group's direction): the mimic loss pulls them together.
        let (um, _) = served(&t);
        let rows = f32s(tensor(&t.item_weights, "item_id.embedding"));
        let vocab: Vec<String> = serde_json::from_value(
            serde_json::from_str::<Value>(&t.item_spec).unwrap()["features"][0]["vocabulary"]
                .clone(),
        )
        .unwrap();
        let mut sum = 0f32;
        for (r, id) in vocab.iter().enumerate() {
            let item: usize = id.parse().unwrap();
            let group = item % 10;
            let mut mean = vec![0f32; 16];
            for u in (group..300).step_by(10).take(10) {
                let hist: Vec<usize> = (0..5).map(|k| group + 10 * ((u + k) % 20)).collect();
                let v = um.embed(&json!({"user_id": u, "age": 20 + u % 40, "history": {"ids": hist, "weights": [1.0, 0.8, 0.64, 0.51, 0.41]}})).unwrap();
                mean.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
            }
            sum += cosine(&rows[(r + 1) * 16..(r + 2) * 16], &mean);
        }
        closeness.push(sum / vocab.len() as f32);
    }
    println!(
        "mean cosine of item augmented vectors to their users: without {:.3}, with {:.3}",
        closeness[0], closeness[1]
    );
    assert!(closeness[1] > closeness[0] + 0.1, "{closeness:?}");
}

#[test]
fn dense_layers_count_against_the_memory_budget() {
    // 16 hidden layers of 4,096 in each tower: about 270 M parameters per tower, 1 GB of f32
    // before gradients and optimiser state. A 1 GB budget refuses it at once, before any
    // parameter is drawn; so it does for 8 branches of 8 such layers.
    let data = synthetic();
    let deep = json!(vec![4096; 16]);
    let tower = |features: Value| json!({"features": features, "hidden": deep});
    let branched = |features: Value| {
        let b: Vec<Value> = (0..8)
            .map(|i| json!({"name": format!("b{i}"), "hidden": vec![4096; 8]}))
            .collect();
        json!({"features": features, "branches": b, "fusion": "sum"})
    };
    let uf =
        json!([{"name": "user_id", "type": "categorical"}, {"name": "age", "type": "numeric"}]);
    let itf = json!([{"name": "item_id", "type": "categorical"}]);
    for towers in [
        json!({"user": tower(uf.clone()), "item": tower(itf.clone())}),
        json!({"user": branched(uf.clone()), "item": branched(itf.clone())}),
    ] {
        let t0 = std::time::Instant::now();
        match train(&config(towers.clone()), &data, &keys(), BUDGET, &mut |_| {
            Ok(())
        }) {
            Err(TrainError::MemoryBudget { needed, budget }) => assert!(needed > budget),
            other => panic!("{towers}: {:?}", other.map(|t| t.user_parameters)),
        }
        assert!(
            t0.elapsed().as_secs_f64() < 5.0,
            "refused at once, not after allocating"
        );
    }
}

/// [`synthetic`]'s groups, each split by age: the young half likes all 20 of the group's items,
/// the old half only the last 15 and dislikes the first 5 (3 negative-feedback events each,
/// between their positives). Collaborative signal alone brings the first 5 (liked by the young
/// half of the group) to the old half too; their feedback says otherwise.
fn synthetic_feedback() -> Data {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut d = Data::default();
    add_items(&mut d, 200);
    for u in 0..300 {
        let group = u % 10;
        let old = (u / 10) % 2 == 1;
        add_user(&mut d, u, if old { 60 } else { 20 });
        for t in 0..20 {
            let first = if old { 5 } else { 0 };
            let item = if rng.gen::<f64>() < 0.9 {
                group + 10 * rng.gen_range(first..20)
            } else {
                rng.gen_range(0..200)
            };
            d.interaction(&u.to_string(), &item.to_string(), (t * 100 + u) as f64, 1.0)
                .unwrap();
            if old && t % 6 == 3 {
                let bad = group + 10 * rng.gen_range(0..5);
                d.negative_feedback(
                    &u.to_string(),
                    &bad.to_string(),
                    (t * 100 + u) as f64 + 0.5,
                    1.0,
                )
                .unwrap();
            }
        }
    }
    d
}

#[test]
fn negative_feedback_pushes_disliked_items_out_of_the_top_and_keeps_the_liked_ones() {
    let data = synthetic_feedback();
    assert_eq!(data.negative.len(), 150 * 3);
    // Per old user (with the served towers): the share of their 5 disliked items in the top 20
    // of the 200, and the share of their 15 liked ones there.
    let measure = |extra: Value| {
        let t = train(&config(extra), &data, &keys(), BUDGET, &mut |_| Ok(())).unwrap();
        let (um, im) = served(&t);
        let items: Vec<Vec<f32>> = (0..200)
            .map(|i| {
                im.embed(&json!({"item_id": i, "genre": format!("g{}", i % 10)}))
                    .unwrap()
            })
            .collect();
        let (mut neg, mut pos, mut n) = (0f64, 0f64, 0f64);
        for u in (0..300usize).filter(|u| (u / 10) % 2 == 1) {
            let group = u % 10;
            let hist: Vec<usize> = (0..5).map(|k| group + 10 * (5 + (u + k) % 15)).collect();
            let v = um
                .embed(&json!({"user_id": u, "age": 60, "history": {"ids": hist, "weights": [1.0, 0.8, 0.64, 0.51, 0.41]}}))
                .unwrap();
            let mut scored: Vec<(f32, usize)> = items
                .iter()
                .enumerate()
                .map(|(i, w)| (v.iter().zip(w).map(|(a, b)| a * b).sum(), i))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            let top: Vec<usize> = scored.iter().take(20).map(|x| x.1).collect();
            neg += top
                .iter()
                .filter(|&&i| i % 10 == group && i / 10 < 5)
                .count() as f64
                / 5.0;
            pos += top
                .iter()
                .filter(|&&i| i % 10 == group && i / 10 >= 5)
                .count() as f64
                / 15.0;
            n += 1.0;
        }
        (neg / n, pos / n, t.train_examples)
    };
    let (neg_off, pos_off, n_off) = measure(json!({"negative_feedback": {"weight": 0.0}}));
    let (neg_on, pos_on, n_on) = measure(json!({"negative_feedback": {"weight": 1.0}}));
    println!("old users, disliked in top 20: without {neg_off:.3}, with {neg_on:.3}; liked: {pos_off:.3} / {pos_on:.3}");
    // The positives are the same examples either way.
    assert_eq!(n_off, n_on);
    assert!(
        neg_off > 0.3,
        "without the term the group brings the disliked items up: {neg_off}"
    );
    assert!(
        neg_on < neg_off - 0.25,
        "disliked share {neg_off} -> {neg_on}"
    );
    assert!(
        pos_on > pos_off - 0.05 && pos_on > 0.6,
        "liked share {pos_off} -> {pos_on}"
    );
}

/// Options `o` (over id-only towers) are refused naming `path`.
fn assert_option_path(o: Value, path: &str) {
    let mut base = json!({"user": {"features": [{"name": "user_id", "type": "categorical"}]},
                          "item": {"features": [{"name": "item_id", "type": "categorical"}]}});
    base.as_object_mut()
        .unwrap()
        .extend(o.as_object().unwrap().clone());
    match Config::parse(&base) {
        Err(TrainError::Option { path: p, .. }) => assert_eq!(p, path, "{o}"),
        other => panic!("{o}: {other:?}"),
    }
}

#[test]
fn negative_feedback_options_are_checked_with_their_paths() {
    for (o, path) in [
        (json!({"negative_feedback": 1}), "negative_feedback"),
        (
            json!({"negative_feedback": {"weight": -1}}),
            "negative_feedback.weight",
        ),
        (
            json!({"negative_feedback": {"margin": 2}}),
            "negative_feedback.margin",
        ),
        (
            json!({"negative_feedback": {"temperature": 0}}),
            "negative_feedback.temperature",
        ),
        (
            json!({"negative_feedback": {"wieght": 1}}),
            "negative_feedback.wieght",
        ),
    ] {
        assert_option_path(o, path);
    }
}

/// [`synthetic`]'s groups and 20 global hits (items 200..219) that every group picks: each
/// interaction is a hit with probability 0.4, an item of the user's group 0.55, any item 0.05.
fn synthetic_hits() -> Data {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut d = Data::default();
    for i in 0..220 {
        let mut f = Map::new();
        f.insert("item_id".into(), json!(i));
        f.insert(
            "genre".into(),
            json!(if i < 200 {
                format!("g{}", i % 10)
            } else {
                "hit".into()
            }),
        );
        d.item_features(&i.to_string(), f).unwrap();
    }
    for u in 0..300 {
        let group = u % 10;
        add_user(&mut d, u, 20 + (u % 40));
        for t in 0..20 {
            let x = rng.gen::<f64>();
            let item = if x < 0.4 {
                200 + rng.gen_range(0..20)
            } else if x < 0.95 {
                group + 10 * rng.gen_range(0..20)
            } else {
                rng.gen_range(0..200)
            };
            d.interaction(&u.to_string(), &item.to_string(), (t * 100 + u) as f64, 1.0)
                .unwrap();
        }
    }
    d
}

#[test]
fn debiasing_pairs_lift_the_tail_in_the_top() {
    let data = synthetic_hits();
    // Each user's items in time order (ids).
    let mut mine: Vec<Vec<usize>> = vec![Vec::new(); 300];
    for x in &data.interactions {
        let u: usize = data.users[x.user as usize].id.parse().unwrap();
        mine[u].push(data.items[x.item as usize].id.parse().unwrap());
    }
    // Per user (served towers, their last 5 items as history, their own items masked): the
    // share of hits in the top 10, and of their group's items.
    let measure = |extra: Value| {
        let t = train(&config(extra), &data, &keys(), BUDGET, &mut |_| Ok(())).unwrap();
        let (um, im) = served(&t);
        let items: Vec<Vec<f32>> = (0..220)
            .map(|i| {
                let genre = if i < 200 {
                    format!("g{}", i % 10)
                } else {
                    "hit".into()
                };
                im.embed(&json!({"item_id": i, "genre": genre})).unwrap()
            })
            .collect();
        let (mut hits, mut own) = (0f64, 0f64);
        for u in 0..300usize {
            let group = u % 10;
            let hist: Vec<usize> = mine[u].iter().rev().take(5).copied().collect();
            let v = um
                .embed(&json!({"user_id": u, "age": 20 + u % 40, "history": {"ids": hist, "weights": [1.0, 0.8, 0.64, 0.51, 0.41]}}))
                .unwrap();
            let mut scored: Vec<(f32, usize)> = items
                .iter()
                .enumerate()
                .filter(|(i, _)| !mine[u].contains(i))
                .map(|(i, w)| (v.iter().zip(w).map(|(a, b)| a * b).sum(), i))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            let top: Vec<usize> = scored.iter().take(10).map(|x| x.1).collect();
            hits += top.iter().filter(|&&i| i >= 200).count() as f64 / 10.0;
            own += top.iter().filter(|&&i| i < 200 && i % 10 == group).count() as f64 / 10.0;
        }
        (hits / 300.0, own / 300.0)
    };
    let (hits_off, own_off) = measure(json!({}));
    let (hits_on, own_on) = measure(json!({"debias": {"weight": 1.0, "head": 0.2}}));
    println!("hits in the top 10: without {hits_off:.3}, with {hits_on:.3}; own group: {own_off:.3} / {own_on:.3}");
    assert!(
        hits_on < hits_off - 0.1,
        "hit share {hits_off} -> {hits_on}"
    );
    assert!(own_on > own_off, "own-group share {own_off} -> {own_on}");
}

#[test]
fn debias_options_are_checked_with_their_paths() {
    for (o, path) in [
        (json!({"debias": true}), "debias"),
        (json!({"debias": {"head": 0}}), "debias.head"),
        (json!({"debias": {"head": 1}}), "debias.head"),
        (json!({"debias": {"weight": -1}}), "debias.weight"),
        (json!({"debias": {"temperature": 0}}), "debias.temperature"),
        (json!({"debias": {"heads": 0.2}}), "debias.heads"),
    ] {
        assert_option_path(o, path);
    }
    // Weight 0 is no debiasing at all (no pairs drawn).
    let base = |d: Value| {
        let mut o = json!({"user": {"features": [{"name": "user_id", "type": "categorical"}]},
                           "item": {"features": [{"name": "item_id", "type": "categorical"}]}});
        if !d.is_null() {
            o["debias"] = d;
        }
        twotower_train::Config::parse(&o).unwrap().debias
    };
    assert!(base(json!({"weight": 0})).is_none());
    assert!(base(json!({"weight": 0.5})).is_some());
    assert!(base(Value::Null).is_none());
}

#[test]
fn a_negative_history_holds_the_disliked_items_before_the_moment() {
    use twotower_train::config::Decay;
    use twotower_train::data::{user_input, HistorySpec};
    let hs = [
        HistorySpec {
            name: "liked".into(),
            max_len: 3,
            decay: Decay::None,
            negative: false,
        },
        HistorySpec {
            name: "disliked".into(),
            max_len: 3,
            decay: Decay::None,
            negative: true,
        },
    ];
    let v = user_input(
        &Map::new(),
        Some("user_id"),
        "7",
        &hs,
        [("1", 1.0), ("2", 2.0)].into_iter(),
        [("9", 1.5)].into_iter(),
        3.0,
    );
    assert_eq!(v["liked"], json!(["2", "1"]));
    assert_eq!(v["disliked"], json!(["9"]));
    // Stored with the model and read back.
    assert_eq!(
        HistorySpec::from_json(&hs[1].to_json()),
        Some(hs[1].clone())
    );
    assert_eq!(hs[1].to_json()["feedback"], "negative");
}

#[test]
fn a_negative_history_trains_and_serves_and_needs_negative_feedback() {
    let towers = json!({
        "user": {"features": [
            {"name": "user_id", "type": "categorical"},
            {"name": "history", "type": "history", "max_len": 10},
            {"name": "disliked", "type": "history", "max_len": 5, "feedback": "negative"}], "hidden": [16]},
        "item": {"features": [{"name": "item_id", "type": "categorical"}]},
        "epochs": 2
    });
    let t = train(
        &config(towers.clone()),
        &synthetic_feedback(),
        &keys(),
        BUDGET,
        &mut |_| Ok(()),
    )
    .unwrap();
    let (um, _) = served(&t);
    let a = um
        .embed(&json!({"user_id": 11, "history": ["55", "65"], "disliked": []}))
        .unwrap();
    let b = um
        .embed(&json!({"user_id": 11, "history": ["55", "65"], "disliked": ["1", "11", "21"]}))
        .unwrap();
    assert_ne!(a, b, "the negative history is an input of the served tower");
    match train(&config(towers), &synthetic(), &keys(), BUDGET, &mut |_| {
        Ok(())
    }) {
        Err(TrainError::NoData(m)) => assert!(m.contains("negative feedback"), "{m}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    match Config::parse(
        &json!({"user": {"features": [{"name": "h", "type": "history", "feedback": "bad"}]},
                                "item": {"features": [{"name": "item_id", "type": "categorical"}]}}),
    ) {
        Err(TrainError::Option { path, .. }) => assert_eq!(path, "user.features[0].feedback"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn negative_feedback_at_or_after_the_validation_interaction_does_not_train() {
    // The same data plus, for some users, a dislike after their last (validation) interaction:
    // with validation on, the run is the same bit for bit.
    let base = synthetic_feedback();
    let mut late = synthetic_feedback();
    for u in (0..300).step_by(7) {
        late.negative_feedback(&u.to_string(), &((u + 3) % 200).to_string(), 1e6, 1.0)
            .unwrap();
    }
    let cfg = config(json!({"epochs": 2}));
    let a = train(&cfg, &base, &keys(), BUDGET, &mut |_| Ok(())).unwrap();
    let b = train(&cfg, &late, &keys(), BUDGET, &mut |_| Ok(())).unwrap();
    assert_eq!(a.user_weights, b.user_weights);
    assert_eq!(a.item_weights, b.item_weights);
    // Without validation they train.
    let cfg = config(json!({"epochs": 2, "validation": "none"}));
    let a = train(&cfg, &base, &keys(), BUDGET, &mut |_| Ok(())).unwrap();
    let b = train(&cfg, &late, &keys(), BUDGET, &mut |_| Ok(())).unwrap();
    assert_ne!(a.user_weights, b.user_weights);
}
