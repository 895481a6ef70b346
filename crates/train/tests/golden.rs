//! Three training steps of crates/train against the numpy reference of
//! `tests/golden/train_ref.py` (tower_ref's forward pass, finite-difference gradients, Adam and
//! lazy Adam written out in numpy): the same losses and, after the last step, the same
//! parameters to 1e-4. Missing fixtures fail the test.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::collections::HashMap;
use twotower_tower::{Encoded, Model};
use twotower_train::model::{self, FeatureStats, Plan};
use twotower_train::net::Tower;
use twotower_train::train::{train_step, Batch, Optim};
use twotower_train::Config;

fn fixture(name: &str) -> Vec<u8> {
    let p = format!(
        "{}/../../tests/golden/train/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!("golden fixture {p} is missing ({e}): run tests/golden/train_ref.py")
    })
}

fn set_params(plan: &Plan, tower: &mut Tower, kind: &str, init: &safetensors::SafeTensors) {
    let get = |name: &str| -> Vec<f32> {
        let t = init
            .tensor(&format!("{kind}/{name}"))
            .unwrap_or_else(|_| panic!("{kind}/{name} in init.safetensors"));
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    for (t, name) in tower.tables.iter_mut().zip(&plan.table_tensors) {
        let w = get(name);
        assert_eq!(w.len(), t.w.len(), "{name}");
        t.w = w;
    }
    let names: Vec<String> = plan.dense_tensors.iter().map(|(n, _)| n.clone()).collect();
    for (p, name) in tower.dense_params_mut().into_iter().zip(&names) {
        let w = get(name);
        assert_eq!(w.len(), p.len(), "{name}");
        *p = w;
    }
}

fn params(plan: &Plan, tower: &Tower, kind: &str) -> HashMap<String, Vec<f32>> {
    let mut out = HashMap::new();
    for (t, name) in tower.tables.iter().zip(&plan.table_tensors) {
        out.insert(format!("{kind}/{name}"), t.w.clone());
    }
    for (p, (name, _)) in tower.dense_params().iter().zip(&plan.dense_tensors) {
        out.insert(format!("{kind}/{name}"), p.to_vec());
    }
    out
}

/// The fixtures' two-tower options, with the reference's `keys` of `o` (learning rates,
/// temperature, objectives).
fn two_tower_options(o: &Value, keys: &[&str]) -> Value {
    let mut options = json!({
        "dim": 3, "threads": 1,
        "user": {"features": [
            {"name": "user_id", "type": "categorical", "dim": 3},
            {"name": "age", "type": "numeric"},
            {"name": "history", "type": "history", "dim": 3, "max_len": 3, "decay": {"position": 0.5}}],
            "hidden": [4], "activation": "tanh"},
        "item": {"features": [{"name": "item_id", "type": "categorical", "dim": 3}], "hidden": [4], "activation": "relu"}
    });
    for k in keys {
        options[*k] = o[*k].clone();
    }
    options
}

/// The fixtures' towers: planned from fixed statistics (laid out exactly as the reference's
/// specs), set to the initial weights, and loaded as models to encode the batches.
#[allow(clippy::type_complexity)]
fn two_towers(
    cfg: &Config,
    init: &safetensors::SafeTensors,
) -> (Plan, Plan, Tower, Tower, Model, Model) {
    let user_spec: Value = serde_json::from_slice(&fixture("user_spec.json")).unwrap();
    let item_spec: Value = serde_json::from_slice(&fixture("item_spec.json")).unwrap();
    let mut stats = FeatureStats::default();
    let ids = |v: &[&str]| {
        v.iter()
            .map(|x| (x.to_string(), 1u64))
            .collect::<HashMap<_, _>>()
    };
    stats
        .counts
        .insert("user_id".into(), ids(&["1", "2", "3", "4"]));
    stats
        .counts
        .insert("history".into(), ids(&["10", "11", "12", "13", "14"]));
    stats.moments.insert("age".into(), (30.0, 1000.0, 1));
    let mut istats = FeatureStats::default();
    istats
        .counts
        .insert("item_id".into(), ids(&["10", "11", "12", "13", "14"]));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let uplan = model::plan("user", &cfg.user, 3, &stats, 1, 100, 0.1, &mut rng).unwrap();
    let iplan = model::plan("item", &cfg.item, 3, &istats, 1, 100, 0.1, &mut rng).unwrap();
    assert_eq!(uplan.spec, user_spec);
    assert_eq!(iplan.spec, item_spec);
    let mut ut = uplan.tower.clone();
    let mut it = iplan.tower.clone();
    set_params(&uplan, &mut ut, "user", init);
    set_params(&iplan, &mut it, "item", init);
    let (us, uw) = model::export(&uplan, &ut).unwrap();
    let (is, iw) = model::export(&iplan, &it).unwrap();
    let (um, im) = (
        Model::load(&us, &uw).unwrap(),
        Model::load(&is, &iw).unwrap(),
    );
    (uplan, iplan, ut, it, um, im)
}

#[test]
fn three_steps_equal_the_numpy_reference() {
    let steps: Value = serde_json::from_slice(&fixture("steps.json")).unwrap();
    let init_bytes = fixture("init.safetensors");
    let init = safetensors::SafeTensors::deserialize(&init_bytes).unwrap();
    let cfg = Config::parse(&two_tower_options(
        &steps["options"],
        &["lr", "sparse_lr", "temperature"],
    ))
    .unwrap();
    let (uplan, iplan, mut ut, mut it, um, im) = two_towers(&cfg, &init);
    let mut uopt = Optim::new(&cfg, &ut);
    let mut iopt = Optim::new(&cfg, &it);
    for (t, b) in steps["batches"].as_array().unwrap().iter().enumerate() {
        let users: Vec<Encoded> = b["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| um.encode(u, true).unwrap())
            .collect();
        let item_ids: Vec<u32> = b["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect();
        let items: Vec<Encoded> = item_ids
            .iter()
            .map(|i| im.encode(&json!({ "item_id": i }), true).unwrap())
            .collect();
        let logq: Vec<f32> = b["logq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let weights: Vec<f32> = b["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let (ur, ir): (Vec<&Encoded>, Vec<&Encoded>) =
            (users.iter().collect(), items.iter().collect());
        let owner = vec![-1; ir.len()];
        let batch = Batch {
            users: &ur,
            items: &ir,
            cand: &item_ids,
            owner: &owner,
            logq: &logq,
            weights: &weights,
            feedback: 0,
            paired: 0,
            pairs: &[],
        };
        let l = train_step(
            &cfg,
            (&mut ut, &mut uopt),
            (&mut it, &mut iopt),
            &batch,
            t as u64 + 1,
            1,
        );
        let want = steps["losses"][t].as_f64().unwrap();
        assert!(
            (l - want).abs() < 1e-5,
            "step {}: loss {l}, numpy {want}",
            t + 1
        );
    }
    let mut got = params(&uplan, &ut, "user");
    got.extend(params(&iplan, &it, "item"));
    let moved = compare_after(&got, &steps["after"], &init);
    assert!(moved > 50, "the steps moved the parameters ({moved})");
}

/// Every parameter after the steps equals the reference's to 1e-4; returns how many moved
/// more than 1e-3 from their initial values.
fn compare_after(
    got: &HashMap<String, Vec<f32>>,
    after: &Value,
    init: &safetensors::SafeTensors,
) -> usize {
    let after = after.as_object().unwrap();
    assert_eq!(got.len(), after.len());
    let mut moved = 0;
    for (name, want) in after {
        let g = &got[name];
        let init_v: Vec<f32> = init
            .tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        for (k, (a, b)) in g.iter().zip(want.as_array().unwrap()).enumerate() {
            let b = b.as_f64().unwrap();
            assert!(
                (*a as f64 - b).abs() < 1e-4,
                "{name}[{k}]: {a} vs numpy {b}"
            );
            if (init_v[k] as f64 - b).abs() > 1e-3 {
                moved += 1;
            }
        }
    }
    moved
}

/// The multi-task pre-rank model of `tests/golden/train_prerank_ref.py`: a scene gate, two
/// shared experts and one per task, a gate and a head per task, three tasks (two logistic, one
/// squared) with their loss weights; its plan from fixed statistics.
fn multitask_plan() -> (twotower_train::PrerankConfig, Plan) {
    let cfg = twotower_train::PrerankConfig::parse(&json!({
        "model": {"features": [
            {"name": "scene", "type": "categorical", "dim": 2},
            {"name": "user_id", "type": "categorical", "dim": 3},
            {"name": "age", "type": "numeric"},
            {"name": "cat", "source": "item", "type": "categorical", "dim": 2},
            {"name": "uv", "type": "cross", "of": "product"}],
          "hidden": [4], "activation": "tanh", "experts": {"shared": 2, "per_task": 1},
          "task_hidden": [3], "scene": "scene"},
        "tasks": [{"name": "a"}, {"name": "b", "weight": 0.5, "fuse": -0.5},
                  {"name": "c", "loss": "squared", "weight": 0.3, "fuse": 0}],
        "lr": 0.01, "sparse_lr": 0.05, "threads": 1
    }))
    .unwrap();
    let mut stats = FeatureStats::default();
    let ids = |v: &[&str]| {
        v.iter()
            .map(|x| (x.to_string(), 1u64))
            .collect::<HashMap<_, _>>()
    };
    stats
        .counts
        .insert("scene".into(), ids(&["home", "search"]));
    stats.counts.insert("user_id".into(), ids(&["1", "2", "3"]));
    stats.counts.insert("cat".into(), ids(&["x", "y", "z"]));
    stats.moments.insert("age".into(), (30.0, 1000.0, 1));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let plan = model::plan_prerank(&cfg.model, 4, &stats, 1, 100, 0.1, &mut rng).unwrap();
    (cfg, plan)
}

fn prerank_fixture(name: &str) -> Vec<u8> {
    let p = format!(
        "{}/../../tests/golden/train_prerank/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    if name == "spec.json" && std::env::var_os("TT_GOLDEN_DUMP").is_some() {
        std::fs::write(
            "/tmp/train_prerank_spec.json",
            multitask_plan().1.spec.to_string(),
        )
        .unwrap();
    }
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!("golden fixture {p} is missing ({e}): run tests/golden/train_prerank_ref.py")
    })
}

/// Three training steps of a multi-task pre-rank model against the numpy reference
/// (`tests/golden/train_prerank_ref.py`: tower_ref's forward pass, finite-difference gradients,
/// the tasks' losses with missing labels, Adam and lazy Adam): the same losses, and after the
/// last step the same parameters to 1e-4.
#[test]
fn multitask_three_steps_equal_the_numpy_reference() {
    use twotower_tower::{Cross, Source};
    use twotower_train::prerank::task_loss;
    let spec_fixture = prerank_fixture("spec.json");
    let steps: Value = serde_json::from_slice(&prerank_fixture("steps.json")).unwrap();
    let init_bytes = prerank_fixture("init.safetensors");
    let init = safetensors::SafeTensors::deserialize(&init_bytes).unwrap();
    let (cfg, plan) = multitask_plan();
    let want_spec: Value = serde_json::from_slice(&spec_fixture).unwrap();
    assert_eq!(
        plan.spec, want_spec,
        "crates/train lays the model out as the fixture's spec"
    );
    let mut tower = plan.tower.clone();
    set_params(&plan, &mut tower, "prerank", &init);
    let (s, w) = model::export(&plan, &tower).unwrap();
    let m = Model::load(&s, &w).unwrap();
    let mut opt = Optim::with(cfg.sparse, &tower);
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().map_or(f32::NAN, |x| x as f32))
            .collect()
    };
    let nt = cfg.tasks.len();
    for (t, b) in steps["batches"].as_array().unwrap().iter().enumerate() {
        let rows = b.as_array().unwrap();
        let xs: Vec<Encoded> = rows
            .iter()
            .map(|r| {
                let (u, v) = (floats(&r["u"]), floats(&r["v"]));
                let user = m.encode_part(&r["user"], Source::User, true).unwrap();
                let item = m.encode_part(&r["item"], Source::Item, true).unwrap();
                m.assemble(&user, &item, &mut |c, out| match c {
                    Cross::UserVector => out.copy_from_slice(&u),
                    Cross::ItemVector => out.copy_from_slice(&v),
                    Cross::Product => out
                        .iter_mut()
                        .zip(u.iter().zip(&v))
                        .for_each(|(o, (a, b))| *o = a * b),
                    _ => {}
                })
            })
            .collect();
        let refs: Vec<&Encoded> = xs.iter().collect();
        let cache = tower.forward_train(&refs, 1);
        let mm = rows.len() as f32;
        let mut loss = 0f64;
        let mut dout = Vec::with_capacity(rows.len() * nt);
        for (r, out) in rows.iter().zip(cache.output().chunks_exact(nt)) {
            let ys = floats(&r["labels"]);
            for ((task, &s), &y) in cfg.tasks.iter().zip(out).zip(&ys) {
                let (l, g) = task_loss(task, s, y);
                loss += l;
                dout.push(g / mm);
            }
        }
        let g = tower.backward(&cache, &dout);
        opt.step_with(
            cfg.lr,
            cfg.weight_decay,
            false,
            &mut tower,
            &g,
            t as u64 + 1,
        );
        let want = steps["losses"][t].as_f64().unwrap();
        let got = loss / rows.len() as f64;
        assert!(
            (got - want).abs() < 1e-5,
            "step {}: loss {got}, numpy {want}",
            t + 1
        );
    }
    let got = params(&plan, &tower, "prerank");
    let moved = compare_after(&got, &steps["after"], &init);
    assert!(moved > 100, "the steps moved {moved} parameters");
}

/// Three training steps with the two extra objectives, negative feedback and the debiasing
/// pairs (and one shared global negative), against `tests/golden/train_objectives_ref.py`:
/// the towers and initial weights of `three_steps_equal_the_numpy_reference`, each batch laid
/// out as `train_from` lays it out (rows: the positives, then the negative-feedback users;
/// columns: the positives, the global negative, the pair items, the disliked items).
#[test]
fn objectives_three_steps_equal_the_numpy_reference() {
    let steps: Value = serde_json::from_slice(&fixture("steps_objectives.json")).unwrap();
    let init_bytes = fixture("init.safetensors");
    let init = safetensors::SafeTensors::deserialize(&init_bytes).unwrap();
    let keys: Vec<&str> = steps["options"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let options = two_tower_options(&steps["options"], &keys);
    let cfg = Config::parse(&options).unwrap();
    let o = &steps["options"];
    let f = |v: &Value| v.as_f64().unwrap() as f32;
    let nf = &o["negative_feedback"];
    assert_eq!(cfg.negative_feedback.weight, f(&nf["weight"]));
    assert_eq!(cfg.negative_feedback.margin, f(&nf["margin"]));
    assert_eq!(cfg.negative_feedback.temperature, f(&nf["temperature"]));
    let db = cfg.debias.expect("debias is on");
    assert_eq!(db.weight, f(&o["debias"]["weight"]));
    assert_eq!(db.temperature, f(&o["debias"]["temperature"]));
    let (uplan, iplan, mut ut, mut it, um, im) = two_towers(&cfg, &init);
    let mut uopt = Optim::new(&cfg, &ut);
    let mut iopt = Optim::new(&cfg, &it);
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let ints = |v: &Value| -> Vec<i32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| i32::try_from(x.as_i64().unwrap()).unwrap())
            .collect()
    };
    for (t, b) in steps["batches"].as_array().unwrap().iter().enumerate() {
        let users: Vec<Encoded> = b["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| um.encode(u, true).unwrap())
            .collect();
        let item_ids: Vec<u32> = b["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect();
        // Item 15 (batch 3, a disliked item) is outside the vocabulary: row 0.
        let items: Vec<Encoded> = item_ids
            .iter()
            .map(|i| im.encode(&json!({ "item_id": i }), true).unwrap())
            .collect();
        let (logq, weights) = (floats(&b["logq"]), floats(&b["weights"]));
        let (owner, pairs) = (ints(&b["owner"]), ints(&b["pairs"]));
        let feedback = b["feedback"].as_u64().unwrap() as usize;
        let paired = b["paired"].as_u64().unwrap() as usize;
        // The fixture's layout is train_from's (checked, so that a fixture mistake is not
        // taken for a training one).
        let (rows, c) = (users.len() - feedback, items.len());
        assert_eq!(weights.len(), users.len());
        assert_eq!((logq.len(), owner.len()), (c, c));
        assert_eq!(pairs.len(), rows);
        let pair_cols = c - feedback - paired..c - feedback;
        assert!(pair_cols.clone().all(|j| owner[j] == i32::MAX));
        assert!((0..feedback).all(|r| owner[c - feedback + r] == (rows + r) as i32));
        assert!(pairs
            .iter()
            .all(|&j| j < 0 || pair_cols.contains(&(j as usize))));
        let (ur, ir): (Vec<&Encoded>, Vec<&Encoded>) =
            (users.iter().collect(), items.iter().collect());
        let batch = Batch {
            users: &ur,
            items: &ir,
            cand: &item_ids,
            owner: &owner,
            logq: &logq,
            weights: &weights,
            feedback,
            paired,
            pairs: &pairs,
        };
        let l = train_step(
            &cfg,
            (&mut ut, &mut uopt),
            (&mut it, &mut iopt),
            &batch,
            t as u64 + 1,
            1,
        );
        let want = steps["losses"][t].as_f64().unwrap();
        assert!(
            (l - want).abs() < 1e-5,
            "step {}: loss {l}, numpy {want}",
            t + 1
        );
    }
    let mut got = params(&uplan, &ut, "user");
    got.extend(params(&iplan, &it, "item"));
    // 122 of the 129 parameters move by more than 1e-3 in the reference.
    let moved = compare_after(&got, &steps["after"], &init);
    assert!(moved > 100, "the steps moved {moved} parameters");
}
