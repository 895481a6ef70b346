//! Golden fixtures from the independent numpy reference (`tests/golden/`, see its README):
//! every output must match to 1e-5 relative to the largest element of its row, and every
//! invalid input must be rejected.

use serde_json::Value;
use std::path::{Path, PathBuf};
use twotower_tower::{forward_parallel, Encoded, Model};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden")
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn json(p: &Path) -> Value {
    serde_json::from_slice(&read(p)).unwrap_or_else(|e| panic!("parse {}: {e}", p.display()))
}

/// Loads `dir`'s model and checks every input against `expected.json`. User inputs are encoded
/// strictly (as `embed_user` does), item rows leniently (they carry other columns, as
/// `to_jsonb(row)` does).
fn check_dir(dir: &Path, strict: bool) -> Model {
    // Missing fixtures are a failure, not a skip: a test that passes without its data proves
    // nothing (they are committed under tests/golden; make_fixtures.py regenerates them).
    for f in [
        "spec.json",
        "weights.safetensors",
        "inputs.json",
        "expected.json",
    ] {
        assert!(
            dir.join(f).is_file(),
            "golden fixture {} is missing",
            dir.join(f).display()
        );
    }
    let spec = String::from_utf8(read(&dir.join("spec.json"))).expect("spec is UTF-8");
    let model = Model::load(&spec, &read(&dir.join("weights.safetensors")))
        .unwrap_or_else(|e| panic!("{}: load: {e}", dir.display()));
    let inputs = json(&dir.join("inputs.json"));
    let expected = json(&dir.join("expected.json"));
    let inputs = inputs.as_array().expect("inputs.json is an array");
    let expected = expected.as_array().expect("expected.json is an array");
    assert_eq!(inputs.len(), expected.len());
    assert!(!inputs.is_empty());

    let mut encoded: Vec<Encoded> = Vec::new();
    let mut worst = 0f64;
    for (i, (x, e)) in inputs.iter().zip(expected).enumerate() {
        let want: Vec<f64> = e
            .as_array()
            .expect("expected row is an array")
            .iter()
            .map(|v| v.as_f64().expect("expected value is a number"))
            .collect();
        let enc = model
            .encode(x, strict)
            .unwrap_or_else(|err| panic!("{} case {i}: encode: {err}", dir.display()));
        let got = model.forward(&enc);
        assert_eq!(got.len(), want.len(), "case {i}");
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            let diff = (*g as f64 - w).abs();
            worst = worst.max(diff / scale.max(f64::MIN_POSITIVE));
            assert!(
                diff <= 1e-5 * w.abs().max(scale),
                "{} case {i} element {j}: got {g}, expected {w}",
                dir.display()
            );
        }
        encoded.push(enc);
    }
    // Batch and parallel paths agree with the single path.
    let single: Vec<f32> = encoded.iter().flat_map(|x| model.forward(x)).collect();
    for other in [
        model.forward_batch(&encoded),
        forward_parallel(&model, &encoded, 3),
    ] {
        for (a, b) in single.iter().zip(&other) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
    }
    eprintln!(
        "{}: {} cases, worst relative error {worst:.2e}",
        dir.display(),
        inputs.len()
    );
    model
}

#[test]
fn golden_user_tower() {
    let dir = golden_dir();
    let model = check_dir(&dir, true);
    let bad = dir.join("invalid_inputs.json");
    if bad.exists() {
        let cases = json(&bad);
        for c in cases.as_array().expect("invalid_inputs.json is an array") {
            let why = c["why"].as_str().unwrap_or("?");
            let r = model.encode(&c["features"], true);
            assert!(r.is_err(), "accepted an invalid input ({why}): {r:?}");
        }
    }
}

#[test]
fn golden_item_tower() {
    check_dir(&golden_dir().join("item"), false);
}

/// A tower whose layers are a graph of named nodes: every node kind (stacks over feature
/// subsets, attention fusion, sums, weighted concatenation, a feature read directly, a head),
/// after SENet, against the numpy reference.
#[test]
fn golden_graph_tower() {
    check_dir(&golden_dir().join("graph"), true);
}

/// The pre-rank model with target attention (`tests/golden/attention`): scores of the numpy
/// reference, through `forward_rows` (the cascade's path) and through `assemble` + `forward`
/// (the per-example path), to 1e-5.
#[test]
fn golden_target_attention() {
    use twotower_tower::{Cross, Source};
    let dir = golden_dir().join("attention");
    let model = Model::load(
        std::str::from_utf8(&read(&dir.join("spec.json"))).unwrap(),
        &read(&dir.join("weights.safetensors")),
    )
    .unwrap();
    let cases = json(&dir.join("cases.json"));
    let expected = json(&dir.join("expected.json"));
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 5);
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    for (i, (c, want)) in cases.iter().zip(expected.as_array().unwrap()).enumerate() {
        let want = want.as_f64().unwrap();
        let (u, v) = (floats(&c["u"]), floats(&c["v"]));
        let history: Vec<Vec<f32>> = c["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        let user = model.encode_part(&c["user"], Source::User, true).unwrap();
        let item = model.encode_part(&c["item"], Source::Item, true).unwrap();
        let keys = model.attention_keys(&history);
        assert_eq!(keys.n, history.len());
        let rows = model.forward_rows(&user, &u, &[(&item, &v)], &keys, &mut |_, _| 0.0, 1);
        let x = model.assemble(&user, &item, &mut |cross, out| match cross {
            Cross::ItemVector => out.copy_from_slice(&v),
            Cross::TargetAttention => model.attend(&keys, &v, out),
            _ => {}
        });
        let one = model.forward(&x)[0];
        for (path, got) in [("forward_rows", rows[0]), ("assemble", one)] {
            assert!(
                (got as f64 - want).abs() < 1e-5,
                "case {i} ({} history items), {path}: {got} vs {want}",
                history.len()
            );
        }
    }
}

/// The multi-task pre-rank model (`tests/golden/multitask`): a scene gate, shared and task
/// experts, a gate per task, heads, three tasks with their links and fuse weights. Logits,
/// task scores and the fused score of the numpy reference, through `forward_rows` and through
/// `assemble` + `forward`, to 1e-5; every spec of `invalid_specs.json` refused.
#[test]
fn golden_multitask() {
    use twotower_tower::{Cross, ScoreBy, Source};
    let dir = golden_dir().join("multitask");
    let model = Model::load(
        std::str::from_utf8(&read(&dir.join("spec.json"))).unwrap(),
        &read(&dir.join("weights.safetensors")),
    )
    .unwrap();
    let names: Vec<&str> = model.tasks().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["rated", "liked", "minutes"]);
    let cases = json(&dir.join("cases.json"));
    let expected = json(&dir.join("expected.json"));
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 13);
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let close = |got: f32, want: &Value, what: &str| {
        let want = want.as_f64().unwrap();
        assert!((got as f64 - want).abs() < 1e-5, "{what}: {got} vs {want}");
    };
    for (i, (c, want)) in cases.iter().zip(expected.as_array().unwrap()).enumerate() {
        let (u, v) = (floats(&c["u"]), floats(&c["v"]));
        let history: Vec<Vec<f32>> = c["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        let user = model.encode_part(&c["user"], Source::User, true).unwrap();
        let item = model.encode_part(&c["item"], Source::Item, true).unwrap();
        let keys = model.attention_keys(&history);
        let rows = model.forward_rows(&user, &u, &[(&item, &v)], &keys, &mut |_, _| 0.0, 1);
        let x = model.assemble(&user, &item, &mut |cross, out| match cross {
            Cross::UserVector => out.copy_from_slice(&u),
            Cross::ItemVector => out.copy_from_slice(&v),
            Cross::Product => out
                .iter_mut()
                .zip(u.iter().zip(&v))
                .for_each(|(o, (a, b))| *o = a * b),
            _ => {}
        });
        let one = model.forward(&x);
        for (path, out) in [("forward_rows", &rows), ("assemble", &one)] {
            assert_eq!(out.len(), 3);
            for (t, w) in want["logits"].as_array().unwrap().iter().enumerate() {
                close(out[t], w, &format!("case {i} {path} logit {t}"));
                let s = model.scores(out, ScoreBy::Task(t))[0];
                close(
                    s,
                    &want["scores"][names[t]],
                    &format!("case {i} {path} {}", names[t]),
                );
            }
            let fused = model.scores(out, model.score_by(Some("fused")).unwrap())[0];
            close(fused, &want["fused"], &format!("case {i} {path} fused"));
        }
    }
    // Every malformed spec is refused (with the weights of the fixture it was derived from).
    let text = std::fs::read_to_string(dir.join("invalid_specs.json")).unwrap();
    let invalid: Vec<Value> = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(a)) => a,
        _ => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    };
    assert!(invalid.len() >= 20, "{}", invalid.len());
    for case in &invalid {
        let base = case["base"].as_str().unwrap();
        let w = read(&golden_dir().join(base).join("weights.safetensors"));
        let r = Model::load(&case["spec"].to_string(), &w);
        assert!(r.is_err(), "accepted: {}", case["why"]);
    }
}
