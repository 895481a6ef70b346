//! Property-based robustness: arbitrary and mutated safetensors bytes and spec JSON never panic
//! in `Model::load`, and arbitrary JSON never panics in `encode` / `forward`.

use proptest::prelude::*;
use serde_json::{json, Value};
use twotower_tower::safetensors::write_f32;
use twotower_tower::Model;

/// A small tower using every feature kind, SENet and every layer type.
fn small_tower() -> (String, Vec<u8>) {
    let spec = json!({
        "format": "pg_twotower.tower",
        "spec_version": 1,
        "kind": "user",
        "features": [
            {"name": "uid", "type": "categorical", "embedding": "t.uid", "hash_buckets": 7},
            {"name": "seg", "type": "categorical", "embedding": "t.seg", "vocabulary": ["a", "1", "true"]},
            {"name": "hist", "type": "multi_categorical", "embedding": "t.item", "hash_buckets": 5,
             "pooling": "mean", "max_len": 4},
            {"name": "tags", "type": "multi_categorical", "embedding": "t.item", "hash_buckets": 5,
             "pooling": "max", "weighted": true},
            {"name": "age", "type": "numeric", "transform": "zscore", "mean": 30, "std": 10, "default": 30},
            {"name": "inc", "type": "numeric", "transform": "log1p"},
            {"name": "act", "type": "numeric", "transform": "minmax", "min": 0, "max": 10},
            {"name": "days", "type": "bucketize", "boundaries": [0, 7, 30], "embedding": "t.days"},
            {"name": "vec", "type": "dense", "dim": 3}
        ],
        "senet": {"w1": "se.w1", "b1": "se.b1", "w2": "se.w2", "b2": "se.b2"},
        "layers": [
            {"type": "linear", "weight": "l0.w", "bias": "l0.b"},
            {"type": "batchnorm", "weight": "bn.w", "bias": "bn.b", "running_mean": "bn.m", "running_var": "bn.v"},
            {"type": "relu"},
            {"type": "dropout", "p": 0.1},
            {"type": "gelu"},
            {"type": "layernorm", "weight": "ln.w", "bias": "ln.b", "eps": 1e-5},
            {"type": "tanh"},
            {"type": "sigmoid"},
            {"type": "shortcut", "fields": ["age", "vec"]},
            {"type": "linear", "weight": "l1.w"},
            {"type": "l2_normalize"}
        ],
        "output": {"dim": 4, "metric": "cosine"}
    });
    // Widths: 2 + 2 + 2 + 2 + 1 + 1 + 1 + 2 + 3 = 16; after shortcut 6 + 1 + 3 = 10.
    let f = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 23) as f32 - 11.0) * s)
            .collect()
    };
    let ts: Vec<(&str, Vec<usize>, Vec<f32>)> = vec![
        ("t.uid", vec![8, 2], f(16, 0.1)),
        ("t.seg", vec![4, 2], f(8, 0.1)),
        ("t.item", vec![6, 2], f(12, 0.1)),
        ("t.days", vec![5, 2], f(10, 0.1)),
        ("se.w1", vec![3, 9], f(27, 0.05)),
        ("se.b1", vec![3], f(3, 0.01)),
        ("se.w2", vec![9, 3], f(27, 0.05)),
        ("se.b2", vec![9], f(9, 0.01)),
        ("l0.w", vec![6, 16], f(96, 0.05)),
        ("l0.b", vec![6], f(6, 0.01)),
        ("bn.w", vec![6], vec![1.0; 6]),
        ("bn.b", vec![6], vec![0.1; 6]),
        ("bn.m", vec![6], f(6, 0.01)),
        ("bn.v", vec![6], vec![0.5; 6]),
        ("ln.w", vec![6], vec![1.0; 6]),
        ("ln.b", vec![6], vec![0.0; 6]),
        ("l1.w", vec![4, 10], f(40, 0.1)),
    ];
    let refs: Vec<(&str, &[usize], &[f32])> = ts
        .iter()
        .map(|(n, s, d)| (*n, s.as_slice(), d.as_slice()))
        .collect();
    (spec.to_string(), write_f32(&refs))
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<u64>().prop_map(|i| json!(i)),
        (-50i64..50).prop_map(|i| json!(i)),
        (-50i64..50).prop_map(|i| json!(i as f64)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        "[a-z0-9_]{0,6}".prop_map(Value::String),
        Just(json!("ids")),
        Just(json!("weights")),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("ids".to_string()),
                        Just("weights".to_string()),
                        "[a-z]{0,4}"
                    ],
                    inner
                ),
                0..5
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

const NAMES: [&str; 10] = [
    "uid", "seg", "hist", "tags", "age", "inc", "act", "days", "vec", "zzz",
];

/// An object keyed mostly by feature names, with arbitrary values.
fn arb_input() -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(NAMES.to_vec()), arb_json()), 0..10)
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// Replaces (or, with `delete`, removes) the value reached by following `path` (each step picks
/// child `i % len`) with `with`.
fn mutate(v: &mut Value, path: &[usize], with: Value, delete: bool) {
    let Some((&i, rest)) = path.split_first() else {
        *v = with;
        return;
    };
    match v {
        Value::Array(a) if !a.is_empty() => {
            let k = i % a.len();
            if rest.is_empty() && delete {
                a.remove(k);
            } else {
                mutate(&mut a[k], rest, with, delete);
            }
        }
        Value::Object(m) if !m.is_empty() => {
            let Some(key) = m.keys().nth(i % m.len()).cloned() else {
                return;
            };
            if rest.is_empty() && delete {
                m.remove(&key);
            } else if let Some(child) = m.get_mut(&key) {
                mutate(child, rest, with, delete);
            }
        }
        _ => *v = with,
    }
}

fn header_of(st: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&st[8..8 + n]).unwrap(),
        st[8 + n..].to_vec(),
    )
}

fn with_header(h: &Value, data: &[u8]) -> Vec<u8> {
    let h = h.to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn small_tower_loads_and_runs() {
    let (spec, st) = small_tower();
    let m = Model::load(&spec, &st).unwrap();
    let out = m
        .embed(&json!({"uid": 3, "hist": [1, 2], "tags": {"ids": ["x"], "weights": [2]}, "vec": [1, 2, 3]}))
        .unwrap();
    assert_eq!(out.len(), 4);
}

proptest! {
    // 500 cases per property by default (about a second in all); PROPTEST_CASES=100000 for a
    // longer campaign.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(500),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_safetensors_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let (spec, _) = small_tower();
        let _ = Model::load(&spec, &bytes);
        let _ = twotower_tower::safetensors::parse(&bytes);
    }

    #[test]
    fn arbitrary_safetensors_after_valid_length(len in 0u64..400, body in prop::collection::vec(any::<u8>(), 0..400)) {
        let (spec, _) = small_tower();
        let mut b = len.to_le_bytes().to_vec();
        b.extend_from_slice(&body);
        let _ = Model::load(&spec, &b);
    }

    #[test]
    fn mutated_safetensors(
        flips in prop::collection::vec((any::<usize>(), 0u8..8), 0..6),
        cut in prop::option::of(any::<usize>()),
    ) {
        let (spec, mut st) = small_tower();
        for (pos, bit) in flips {
            let p = pos % st.len();
            st[p] ^= 1 << bit;
        }
        if let Some(c) = cut {
            st.truncate(c % (st.len() + 1));
        }
        let _ = Model::load(&spec, &st);
    }

    #[test]
    fn edited_safetensors_header(
        path in prop::collection::vec(any::<usize>(), 1..4),
        with in prop_oneof![arb_json(), any::<u64>().prop_map(|u| json!(u)), (0u64..2000).prop_map(|u| json!(u))],
        delete in any::<bool>(),
    ) {
        let (spec, st) = small_tower();
        let (mut h, data) = header_of(&st);
        mutate(&mut h, &path, with, delete);
        let _ = Model::load(&spec, &with_header(&h, &data));
    }

    #[test]
    fn arbitrary_spec_text(s in ".{0,300}") {
        let (_, st) = small_tower();
        let _ = Model::load(&s, &st);
    }

    #[test]
    fn mutated_spec_bytes(
        flips in prop::collection::vec((any::<usize>(), 0u8..7), 1..5),
        cut in prop::option::of(any::<usize>()),
    ) {
        let (spec, st) = small_tower();
        let mut b = spec.into_bytes();
        for (pos, bit) in flips {
            let p = pos % b.len();
            b[p] ^= 1 << bit; // bits 0..6 keep ASCII bytes ASCII
        }
        if let Some(c) = cut {
            b.truncate(c % (b.len() + 1));
        }
        if let Ok(s) = String::from_utf8(b) {
            let _ = Model::load(&s, &st);
        }
    }

    #[test]
    fn edited_spec_json(
        edits in prop::collection::vec(
            (prop::collection::vec(any::<usize>(), 1..5), arb_json(), any::<bool>()), 1..3),
    ) {
        let (spec, st) = small_tower();
        let mut v: Value = serde_json::from_str(&spec).unwrap();
        for (path, with, delete) in edits {
            mutate(&mut v, &path, with, delete);
        }
        if let Ok(m) = Model::load(&v.to_string(), &st) {
            // Whatever still loads must run.
            if let Ok(x) = m.encode(&json!({}), true) {
                prop_assert_eq!(m.forward(&x).len(), m.output_dim());
            }
        }
    }

    #[test]
    fn arbitrary_json_inputs(v in arb_json(), obj in arb_input(), strict in any::<bool>()) {
        let (spec, st) = small_tower();
        let m = Model::load(&spec, &st).unwrap();
        for input in [&v, &obj] {
            if let Ok(x) = m.encode(input, strict) {
                let out = m.forward(&x);
                prop_assert_eq!(out.len(), 4);
                let b = m.forward_batch(&[x.clone(), x]);
                prop_assert_eq!(b.len(), 8);
            }
            let _ = m.embed(input);
        }
    }
}
