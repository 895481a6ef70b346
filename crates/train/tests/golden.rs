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

#[test]
fn three_steps_equal_the_numpy_reference() {
    let steps: Value = serde_json::from_slice(&fixture("steps.json")).unwrap();
    let user_spec: Value = serde_json::from_slice(&fixture("user_spec.json")).unwrap();
    let item_spec: Value = serde_json::from_slice(&fixture("item_spec.json")).unwrap();
    let init_bytes = fixture("init.safetensors");
    let init = safetensors::SafeTensors::deserialize(&init_bytes).unwrap();
    let o = &steps["options"];
    let cfg = Config::parse(&json!({
        "dim": 3, "threads": 1,
        "lr": o["lr"], "sparse_lr": o["sparse_lr"], "temperature": o["temperature"],
        "user": {"features": [
            {"name": "user_id", "type": "categorical", "dim": 3},
            {"name": "age", "type": "numeric"},
            {"name": "history", "type": "history", "dim": 3, "max_len": 3, "decay": {"position": 0.5}}],
            "hidden": [4], "activation": "tanh"},
        "item": {"features": [{"name": "item_id", "type": "categorical", "dim": 3}], "hidden": [4], "activation": "relu"}
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
    // crates/train lays the towers out exactly as the reference's specs.
    assert_eq!(uplan.spec, user_spec);
    assert_eq!(iplan.spec, item_spec);
    let mut ut = uplan.tower.clone();
    let mut it = iplan.tower.clone();
    set_params(&uplan, &mut ut, "user", &init);
    set_params(&iplan, &mut it, "item", &init);
    let (us, uw) = model::export(&uplan, &ut).unwrap();
    let (is, iw) = model::export(&iplan, &it).unwrap();
    let (um, im) = (
        Model::load(&us, &uw).unwrap(),
        Model::load(&is, &iw).unwrap(),
    );
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
    let after = steps["after"].as_object().unwrap();
    assert_eq!(got.len(), after.len());
    let mut moved = 0;
    for (name, want) in after {
        let g = &got[name];
        let w: Vec<f64> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let init_t = init.tensor(name).unwrap();
        let init_v: Vec<f32> = init_t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        for (k, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!(
                (*a as f64 - b).abs() < 1e-4,
                "{name}[{k}]: {a} vs numpy {b}"
            );
            if (init_v[k] as f64 - b).abs() > 1e-3 {
                moved += 1;
            }
        }
    }
    assert!(moved > 50, "the steps moved the parameters ({moved})");
}
