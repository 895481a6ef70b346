//! Feature kinds, layers, pooling, hashing and every load/encode error, on small hand-built models.

use serde_json::{json, Value};
use twotower_tower::safetensors::{write_f32, write_raw};
use twotower_tower::*;

type T = (&'static str, Vec<usize>, Vec<f32>);

fn weights(ts: &[T]) -> Vec<u8> {
    let refs: Vec<(&str, &[usize], &[f32])> = ts
        .iter()
        .map(|(n, s, d)| (*n, s.as_slice(), d.as_slice()))
        .collect();
    write_f32(&refs)
}

fn spec(features: Value, layers: Value, dim: usize) -> Value {
    json!({
        "format": "pg_twotower.tower",
        "spec_version": 1,
        "kind": "user",
        "features": features,
        "layers": layers,
        "output": {"dim": dim, "metric": "ip"}
    })
}

fn load(spec: &Value, ts: &[T]) -> Result<Model> {
    Model::load(&spec.to_string(), &weights(ts))
}

/// A table whose row r is [r*10 + 0, r*10 + 1, ...] (width d).
fn table(rows: usize, d: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| (0..d).map(move |j| (r * 10 + j) as f32))
        .collect()
}

fn row(r: usize, d: usize) -> Vec<f32> {
    (0..d).map(|j| (r * 10 + j) as f32).collect()
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{a:?} vs {b:?}");
    }
}

// ---------------------------------------------------------------- hashing and ids

#[test]
fn fnv_vectors() {
    assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
    assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
}

#[test]
fn canonical_ids() {
    let c = |v: Value| canonical_id(&v).unwrap().unwrap();
    assert_eq!(c(json!(42)), "42");
    assert_eq!(c(json!(42.0)), "42");
    assert_eq!(c(json!(-7)), "-7");
    assert_eq!(c(json!(-7.0)), "-7");
    assert_eq!(c(json!(-0.0)), "0");
    assert_eq!(c(json!("42")), "42");
    assert_eq!(c(json!(" 42")), " 42");
    assert_eq!(c(json!(true)), "true");
    assert_eq!(c(json!(false)), "false");
    assert_eq!(c(json!(u64::MAX)), "18446744073709551615");
    assert_eq!(c(json!(1e20)), "100000000000000000000");
    assert_eq!(c(json!(9007199254740993u64)), "9007199254740993");
    assert_eq!(c(json!(-9007199254740993i64)), "-9007199254740993");
    assert_eq!(c(serde_json::from_str("-0").unwrap()), "0");
    assert_eq!(c(serde_json::from_str("1E2").unwrap()), "100");
    assert_eq!(canonical_id(&json!(null)), Ok(None));
    assert!(canonical_id(&json!(42.5)).is_err());
    assert!(canonical_id(&json!([1])).is_err());
}

// ---------------------------------------------------------------- categorical

fn vocab_model() -> Model {
    let s = spec(
        json!([{"name": "c", "type": "categorical", "embedding": "e",
                "vocabulary": ["a", "42", "-7", "true"]}]),
        json!([]),
        2,
    );
    load(&s, &[("e", vec![5, 2], table(5, 2))]).unwrap()
}

#[test]
fn categorical_vocabulary() {
    let m = vocab_model();
    let e = |v: Value| m.embed(&json!({ "c": v })).unwrap();
    assert_eq!(e(json!("a")), row(1, 2));
    assert_eq!(e(json!(42)), row(2, 2));
    assert_eq!(e(json!(42.0)), row(2, 2));
    assert_eq!(e(json!("42")), row(2, 2));
    assert_eq!(e(json!(-7)), row(3, 2));
    assert_eq!(e(json!(true)), row(4, 2));
    // OOV: unknown, null, missing.
    assert_eq!(e(json!("zzz")), row(0, 2));
    assert_eq!(e(json!(false)), row(0, 2));
    assert_eq!(e(Value::Null), row(0, 2));
    assert_eq!(m.embed(&json!({})).unwrap(), row(0, 2));
}

#[test]
fn categorical_bad_values() {
    let m = vocab_model();
    assert!(matches!(
        m.embed(&json!({"c": 42.5})),
        Err(TowerError::FeatureValue { ref feature, .. }) if feature == "c"
    ));
    assert!(matches!(
        m.embed(&json!({"c": [1]})),
        Err(TowerError::FeatureType { got: "array", .. })
    ));
    assert!(matches!(
        m.embed(&json!({"c": {"x": 1}})),
        Err(TowerError::FeatureType { got: "object", .. })
    ));
}

#[test]
fn categorical_hashed() {
    let b = 7u64;
    let s = spec(
        json!([{"name": "c", "type": "categorical", "embedding": "e", "hash_buckets": b}]),
        json!([]),
        3,
    );
    let m = load(&s, &[("e", vec![8, 3], table(8, 3))]).unwrap();
    for (v, canon) in [
        (json!("abc"), "abc"),
        (json!(42), "42"),
        (json!(42.0), "42"),
        (json!(-7), "-7"),
        (json!(true), "true"),
        (json!(""), ""),
    ] {
        let r = 1 + (fnv1a64(canon.as_bytes()) % b) as usize;
        assert_eq!(m.embed(&json!({ "c": v })).unwrap(), row(r, 3), "{canon}");
    }
    assert_eq!(m.embed(&json!({"c": null})).unwrap(), row(0, 3));
}

// ---------------------------------------------------------------- multi_categorical

fn multi_model(pooling: &str, weighted: bool, max_len: Option<usize>) -> Model {
    let mut f = json!({"name": "h", "type": "multi_categorical", "embedding": "e",
                       "vocabulary": ["1", "2", "3"], "pooling": pooling, "weighted": weighted});
    if let Some(l) = max_len {
        f["max_len"] = json!(l);
    }
    let s = spec(json!([f]), json!([]), 2);
    // rows: 0 -> [1, -1], 1 -> [2, 0], 2 -> [4, -2], 3 -> [-6, 8]
    load(
        &s,
        &[("e", vec![4, 2], vec![1., -1., 2., 0., 4., -2., -6., 8.])],
    )
    .unwrap()
}

#[test]
fn pooling_mean_sum_max() {
    let mean = multi_model("mean", false, None);
    assert_eq!(mean.embed(&json!({"h": [1, 2]})).unwrap(), vec![3., -1.]);
    assert_eq!(
        mean.embed(&json!({"h": [1, "zz"]})).unwrap(),
        vec![1.5, -0.5]
    );
    let sum = multi_model("sum", false, None);
    assert_eq!(sum.embed(&json!({"h": [1, 2, 3]})).unwrap(), vec![0., 6.]);
    assert_eq!(sum.embed(&json!({"h": [1, 1]})).unwrap(), vec![4., 0.]);
    let max = multi_model("max", false, None);
    assert_eq!(max.embed(&json!({"h": [1, 2, 3]})).unwrap(), vec![4., 8.]);
    assert_eq!(max.embed(&json!({"h": ["3"]})).unwrap(), vec![-6., 8.]);
}

#[test]
fn pooling_empty_missing_null_is_oov_row() {
    for p in ["mean", "sum", "max"] {
        for weighted in [false, true] {
            let m = multi_model(p, weighted, None);
            let empty = if weighted {
                json!({"ids": [], "weights": []})
            } else {
                json!([])
            };
            assert_eq!(
                m.embed(&json!({ "h": empty })).unwrap(),
                vec![1., -1.],
                "{p}"
            );
            assert_eq!(m.embed(&json!({"h": null})).unwrap(), vec![1., -1.], "{p}");
            assert_eq!(m.embed(&json!({})).unwrap(), vec![1., -1.], "{p}");
        }
    }
}

#[test]
fn pooling_weighted() {
    let mean = multi_model("mean", true, None);
    let x = json!({"h": {"ids": [1, 2], "weights": [1.0, 3.0]}});
    assert_eq!(
        mean.embed(&x).unwrap(),
        vec![(2. + 12.) / 4., (0. - 6.) / 4.]
    );
    // Sum of weights 0 -> zero vector.
    let z = json!({"h": {"ids": [1, 2], "weights": [1.0, -1.0]}});
    assert_eq!(mean.embed(&z).unwrap(), vec![0., 0.]);
    let z = json!({"h": {"ids": [3], "weights": [0]}});
    assert_eq!(mean.embed(&z).unwrap(), vec![0., 0.]);
    let sum = multi_model("sum", true, None);
    assert_eq!(sum.embed(&x).unwrap(), vec![14., -6.]);
    let max = multi_model("max", true, None);
    // w*e: [2,0], [12,-6], [-3, 4]
    let y = json!({"h": {"ids": [1, 2, 3], "weights": [1, 3, 0.5]}});
    assert_eq!(max.embed(&y).unwrap(), vec![12., 4.]);
}

#[test]
fn pooling_max_len_truncates() {
    let m = multi_model("sum", false, Some(2));
    assert_eq!(m.embed(&json!({"h": [1, 2, 3, 3]})).unwrap(), vec![6., -2.]);
    let w = multi_model("sum", true, Some(1));
    let x = json!({"h": {"ids": [2, 3], "weights": [2, 100]}});
    assert_eq!(w.embed(&x).unwrap(), vec![8., -4.]);
    // Every id and weight is validated, also past max_len.
    assert!(m.embed(&json!({"h": [1, 2, 3, [1]]})).is_err());
    assert!(m.embed(&json!({"h": [1, 2, 3, 4.5]})).is_err());
    let x = json!({"h": {"ids": [2, 3], "weights": [2, "x"]}});
    assert!(w.embed(&x).is_err());
    // null is not an id inside a list.
    assert!(matches!(
        m.embed(&json!({"h": [1, null]})),
        Err(TowerError::FeatureType { got: "null", .. })
    ));
}

#[test]
fn multi_bad_inputs() {
    let m = multi_model("mean", false, None);
    assert!(matches!(
        m.embed(&json!({"h": "1"})),
        Err(TowerError::FeatureType { got: "string", .. })
    ));
    assert!(matches!(
        m.embed(&json!({"h": [1, [2]]})),
        Err(TowerError::FeatureType { got: "array", .. })
    ));
    assert!(matches!(
        m.embed(&json!({"h": [1.5]})),
        Err(TowerError::FeatureValue { .. })
    ));
    let huge: Vec<u32> = vec![1; MAX_LIST_LEN + 1];
    assert!(matches!(
        m.embed(&json!({ "h": huge })),
        Err(TowerError::TooLarge { limit: 100_000, .. })
    ));
    let ok: Vec<u32> = vec![1; MAX_LIST_LEN];
    assert_eq!(m.embed(&json!({ "h": ok })).unwrap(), vec![2., 0.]);

    let w = multi_model("mean", true, None);
    for bad in [
        json!({"h": [1, 2]}),
        json!({"h": {"ids": [1, 2], "weights": [1]}}),
        json!({"h": {"ids": [1], "weights": ["1"]}}),
        json!({"h": {"ids": [1]}}),
        json!({"h": {"ids": [1], "weights": [1], "extra": 1}}),
        json!({"h": {"ids": 1, "weights": [1]}}),
        json!({"h": {"ids": [1], "weights": [1e300]}}),
    ] {
        let r = w.embed(&bad);
        assert!(
            matches!(
                r,
                Err(TowerError::FeatureType { .. }) | Err(TowerError::FeatureValue { .. })
            ),
            "{bad}: {r:?}"
        );
    }
    let huge: Vec<u32> = vec![1; MAX_LIST_LEN + 1];
    assert!(matches!(
        w.embed(&json!({"h": {"ids": huge.clone(), "weights": huge}})),
        Err(TowerError::TooLarge { .. })
    ));
}

// ---------------------------------------------------------------- numeric, bucketize, dense

fn numeric_model(f: Value) -> Model {
    let mut f = f;
    f["name"] = json!("x");
    f["type"] = json!("numeric");
    load(&spec(json!([f]), json!([]), 1), &[]).unwrap()
}

#[test]
fn numeric_transforms() {
    let e = |m: &Model, v: Value| m.embed(&json!({ "x": v })).unwrap()[0];
    let none = numeric_model(json!({"transform": "none"}));
    assert_eq!(e(&none, json!(2.5)), 2.5);
    assert_eq!(e(&none, json!(-3)), -3.0);
    assert_eq!(e(&none, Value::Null), 0.0);
    assert_eq!(none.embed(&json!({})).unwrap(), vec![0.0]);
    let z = numeric_model(json!({"transform": "zscore", "mean": 10, "std": 4, "default": 2}));
    assert_eq!(e(&z, json!(18)), 2.0);
    assert_eq!(e(&z, Value::Null), -2.0);
    let l = numeric_model(json!({"transform": "log1p"}));
    assert!((e(&l, json!(std::f64::consts::E - 1.0)) - 1.0).abs() < 1e-6);
    assert_eq!(e(&l, json!(-5)), 0.0);
    let mm = numeric_model(json!({"transform": "minmax", "min": 10, "max": 20}));
    assert_eq!(e(&mm, json!(15)), 0.5);
    assert_eq!(e(&mm, json!(5)), 0.0);
    assert_eq!(e(&mm, json!(50)), 1.0);
    // Without a default the missing field is 0 after the transform, not transform(0).
    assert_eq!(e(&mm, Value::Null), 0.0);
}

#[test]
fn numeric_bad_inputs() {
    let m = numeric_model(json!({"transform": "none"}));
    assert!(matches!(
        m.embed(&json!({"x": "1"})),
        Err(TowerError::FeatureType {
            expected: "a number",
            got: "string",
            ..
        })
    ));
    assert!(matches!(
        m.embed(&json!({"x": true})),
        Err(TowerError::FeatureType { .. })
    ));
    assert!(matches!(
        m.embed(&json!({"x": 1e300})),
        Err(TowerError::FeatureValue { .. })
    ));
}

#[test]
fn bucketize_rows() {
    let s = spec(
        json!([{"name": "b", "type": "bucketize", "boundaries": [0, 10.5, 20], "embedding": "e"}]),
        json!([]),
        1,
    );
    let m = load(&s, &[("e", vec![5, 1], vec![100., 101., 102., 103., 104.])]).unwrap();
    let e = |v: Value| m.embed(&json!({ "b": v })).unwrap()[0];
    assert_eq!(e(Value::Null), 100.);
    assert_eq!(e(json!(-1)), 101.);
    assert_eq!(e(json!(0)), 102.);
    assert_eq!(e(json!(10)), 102.);
    assert_eq!(e(json!(10.5)), 103.);
    assert_eq!(e(json!(19.999)), 103.);
    assert_eq!(e(json!(20)), 104.);
    assert_eq!(e(json!(1e300)), 104.);
    assert!(m.embed(&json!({"b": "3"})).is_err());
    // Shape must be [m + 2, d].
    assert!(matches!(
        load(&s, &[("e", vec![4, 1], vec![0.; 4])]),
        Err(TowerError::TensorShape { .. })
    ));
}

#[test]
fn dense_field() {
    let s = spec(
        json!([{"name": "v", "type": "dense", "dim": 3}]),
        json!([]),
        3,
    );
    let m = load(&s, &[]).unwrap();
    assert_eq!(
        m.embed(&json!({"v": [1, 2.5, -3]})).unwrap(),
        vec![1., 2.5, -3.]
    );
    assert_eq!(m.embed(&json!({})).unwrap(), vec![0., 0., 0.]);
    assert_eq!(m.embed(&json!({"v": null})).unwrap(), vec![0., 0., 0.]);
    assert!(matches!(
        m.embed(&json!({"v": [1, 2]})),
        Err(TowerError::FeatureValue { .. })
    ));
    assert!(matches!(
        m.embed(&json!({"v": [1, 2, "3"]})),
        Err(TowerError::FeatureType { .. })
    ));
    assert!(matches!(
        m.embed(&json!({"v": 1})),
        Err(TowerError::FeatureType { .. })
    ));
    let huge = vec![0.5f32; 1_000_000];
    assert!(m.embed(&json!({ "v": huge })).is_err());
}

// ---------------------------------------------------------------- layers

/// A model over a dense input of width `n` with the given layers and tensors.
fn dense_model(n: usize, layers: Value, out: usize, ts: &[T]) -> Result<Model> {
    load(
        &spec(
            json!([{"name": "v", "type": "dense", "dim": n}]),
            layers,
            out,
        ),
        ts,
    )
}

fn run(m: &Model, x: &[f32]) -> Vec<f32> {
    m.embed(&json!({ "v": x })).unwrap()
}

#[test]
fn linear_with_and_without_bias() {
    let w = vec![1., 2., 3., 4., 5., 6.]; // [2, 3]
    let m = dense_model(
        3,
        json!([{"type": "linear", "weight": "w", "bias": "b"}]),
        2,
        &[("w", vec![2, 3], w.clone()), ("b", vec![2], vec![0.5, -1.])],
    )
    .unwrap();
    assert_eq!(run(&m, &[1., 0., -1.]), vec![-2. + 0.5, -2. - 1.]);
    let m = dense_model(
        3,
        json!([{"type": "linear", "weight": "w"}]),
        2,
        &[("w", vec![2, 3], w)],
    )
    .unwrap();
    assert_eq!(run(&m, &[1., 1., 1.]), vec![6., 15.]);
}

#[test]
fn linear_long_rows_match_naive() {
    // Exercise the 8-accumulator kernel with remainders.
    for n in [1usize, 7, 8, 9, 17, 100] {
        let w: Vec<f32> = (0..3 * n)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let x: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) / 3.0).collect();
        let m = dense_model(
            n,
            json!([{"type": "linear", "weight": "w"}]),
            3,
            &[("w", vec![3, n], w.clone())],
        )
        .unwrap();
        let naive: Vec<f32> = (0..3)
            .map(|o| {
                (0..n)
                    .map(|i| w[o * n + i] as f64 * x[i] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        close(&run(&m, &x), &naive, 1e-5);
    }
}

#[test]
fn activations() {
    let x = [-2.0f32, -0.5, 0.0, 1.0, 3.0];
    let act = |t: &str| run(&dense_model(5, json!([{"type": t}]), 5, &[]).unwrap(), &x);
    assert_eq!(act("relu"), vec![0., 0., 0., 1., 3.]);
    close(&act("tanh"), &x.map(|v| v.tanh()), 1e-6);
    close(&act("sigmoid"), &x.map(|v| 1.0 / (1.0 + (-v).exp())), 1e-6);
    // Exact GELU reference values x·Φ(x).
    close(
        &act("gelu"),
        &[-0.04550026, -0.15426877, 0.0, 0.8413447, 2.9959502],
        1e-6,
    );
    assert_eq!(act("dropout"), x.to_vec());
    let d = dense_model(5, json!([{"type": "dropout", "p": 0.3}]), 5, &[]).unwrap();
    assert_eq!(run(&d, &x), x.to_vec());
}

#[test]
fn layernorm() {
    let m = dense_model(
        4,
        json!([{"type": "layernorm", "weight": "g", "bias": "b", "eps": 1e-3}]),
        4,
        &[
            ("g", vec![4], vec![1., 2., 1., 1.]),
            ("b", vec![4], vec![0., 0., 1., 0.]),
        ],
    )
    .unwrap();
    let x = [1.0f32, 2., 3., 4.];
    let mean = 2.5f64;
    let var = (2.25 + 0.25 + 0.25 + 2.25) / 4.0; // biased
    let s = 1.0 / (var + 1e-3f64).sqrt();
    let expect = [
        ((1.0 - mean) * s) as f32,
        ((2.0 - mean) * s * 2.0) as f32,
        ((3.0 - mean) * s + 1.0) as f32,
        ((4.0 - mean) * s) as f32,
    ];
    close(&run(&m, &x), &expect, 1e-6);
    // Default eps; constant input gives the bias.
    let m = dense_model(
        2,
        json!([{"type": "layernorm", "weight": "g", "bias": "b"}]),
        2,
        &[("g", vec![2], vec![1., 1.]), ("b", vec![2], vec![3., 4.])],
    )
    .unwrap();
    assert_eq!(run(&m, &[5., 5.]), vec![3., 4.]);
}

#[test]
fn batchnorm_inference() {
    let ts: Vec<T> = vec![
        ("bn.weight", vec![2], vec![2., 1.]),
        ("bn.bias", vec![2], vec![0.5, 0.]),
        ("bn.running_mean", vec![2], vec![1., -1.]),
        ("bn.running_var", vec![2], vec![4., 0.25]),
    ];
    let layer = json!([{"type": "batchnorm", "weight": "bn.weight", "bias": "bn.bias",
                        "running_mean": "bn.running_mean", "running_var": "bn.running_var", "eps": 0}]);
    let m = dense_model(2, layer.clone(), 2, &ts).unwrap();
    close(
        &run(&m, &[3., 0.]),
        &[(3. - 1.) / 2. * 2. + 0.5, (0. + 1.) / 0.5],
        1e-6,
    );
    // PyTorch's num_batches_tracked (I64) is ignored.
    let mut raw: Vec<(String, &str, Vec<usize>, Vec<u8>)> = ts
        .iter()
        .map(|(n, s, d)| {
            (
                n.to_string(),
                "F32",
                s.clone(),
                d.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    raw.push((
        "bn.num_batches_tracked".into(),
        "I64",
        vec![],
        12i64.to_le_bytes().to_vec(),
    ));
    let refs: Vec<(&str, &str, &[usize], &[u8])> = raw
        .iter()
        .map(|(n, t, s, d)| (n.as_str(), *t, s.as_slice(), d.as_slice()))
        .collect();
    let sp = spec(
        json!([{"name": "v", "type": "dense", "dim": 2}]),
        layer.clone(),
        2,
    );
    assert!(Model::load(&sp.to_string(), &write_raw(&refs)).is_ok());
    // running_var + eps <= 0 is rejected.
    let mut bad = ts.clone();
    bad[3].2 = vec![4., -1.];
    assert!(matches!(
        dense_model(2, layer, 2, &bad),
        Err(TowerError::WeightValue { ref name, index: 1, .. }) if name == "bn.running_var"
    ));
}

#[test]
fn l2_normalize() {
    let m = dense_model(2, json!([{"type": "l2_normalize"}]), 2, &[]).unwrap();
    close(&run(&m, &[3., 4.]), &[0.6, 0.8], 1e-7);
    assert_eq!(run(&m, &[0., 0.]), vec![0., 0.]);
}

#[test]
fn shortcut_appends_raw_fields_before_senet() {
    let s = json!({
        "format": "pg_twotower.tower", "spec_version": 1, "kind": "item",
        "features": [
            {"name": "a", "type": "dense", "dim": 2},
            {"name": "b", "type": "numeric", "transform": "none"},
            {"name": "c", "type": "dense", "dim": 1}
        ],
        "senet": {"w1": "s1", "w2": "s2"},
        "layers": [
            {"type": "linear", "weight": "w"},
            {"type": "shortcut", "fields": ["c", "a"]}
        ],
        "output": {"dim": 4, "metric": "cosine"}
    });
    // SENet with zero weights: every field scaled by sigmoid(0) = 0.5.
    let ts: Vec<T> = vec![
        ("s1", vec![2, 3], vec![0.; 6]),
        ("s2", vec![3, 2], vec![0.; 6]),
        ("w", vec![1, 4], vec![1., 1., 1., 1.]),
    ];
    let m = load(&s, &ts).unwrap();
    assert_eq!(m.kind(), Kind::Item);
    assert_eq!(m.metric(), Metric::Cosine);
    assert_eq!(m.feature_names(), vec!["a", "b", "c"]);
    let out = m.embed(&json!({"a": [1, 2], "b": 3, "c": [4]})).unwrap();
    assert_eq!(out, vec![0.5 * 10., 4., 1., 2.]);
}

#[test]
fn senet_reweights_fields() {
    // Fields: f1 = [2, 4] (mean 3), f2 = [-1] (mean -1).
    let s = json!({
        "format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
        "features": [
            {"name": "f1", "type": "dense", "dim": 2},
            {"name": "f2", "type": "numeric", "transform": "none"}
        ],
        "senet": {"w1": "se.w1", "b1": "se.b1", "w2": "se.w2", "b2": "se.b2"},
        "layers": [],
        "output": {"dim": 3, "metric": "ip"}
    });
    let ts: Vec<T> = vec![
        ("se.w1", vec![1, 2], vec![1.0, 2.0]),
        ("se.b1", vec![1], vec![0.5]),
        ("se.w2", vec![2, 1], vec![0.3, -0.2]),
        ("se.b2", vec![2], vec![0.1, 0.0]),
    ];
    let m = load(&s, &ts).unwrap();
    let hidden = (1.0f64 * 3.0 - 2.0 + 0.5).max(0.0); // 1.5
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let a1 = sig(0.3 * hidden + 0.1);
    let a2 = sig(-0.2 * hidden);
    let out = m.embed(&json!({"f1": [2, 4], "f2": -1})).unwrap();
    close(
        &out,
        &[(2.0 * a1) as f32, (4.0 * a1) as f32, (-a2) as f32],
        1e-6,
    );
    assert_eq!(m.parameter_count(), 2 + 1 + 2 + 2);
}

#[test]
fn shared_embedding_table() {
    let s = spec(
        json!([
            {"name": "last", "type": "categorical", "embedding": "items", "hash_buckets": 5},
            {"name": "hist", "type": "multi_categorical", "embedding": "items", "hash_buckets": 5, "pooling": "sum"}
        ]),
        json!([]),
        4,
    );
    let m = load(&s, &[("items", vec![6, 2], table(6, 2))]).unwrap();
    assert_eq!(m.parameter_count(), 12);
    assert!(m.memory_bytes() >= 48);
    let out = m.embed(&json!({"last": "x", "hist": ["x"]})).unwrap();
    assert_eq!(out[..2], out[2..]);
    // Different row counts for one table: one of the uses mismatches.
    let s2 = spec(
        json!([
            {"name": "last", "type": "categorical", "embedding": "items", "hash_buckets": 5},
            {"name": "hist", "type": "multi_categorical", "embedding": "items", "hash_buckets": 6, "pooling": "sum"}
        ]),
        json!([]),
        4,
    );
    assert!(matches!(
        load(&s2, &[("items", vec![6, 2], table(6, 2))]),
        Err(TowerError::TensorShape { .. })
    ));
}

#[test]
fn f16_and_bf16_weights() {
    let h: Vec<u8> = [0.5f32, -1.0, 2.0, 0.25]
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
        .collect();
    let b: Vec<u8> = [1.0f32, 3.0]
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
        .collect();
    let st = write_raw(&[("w", "F16", &[2, 2], &h), ("b", "BF16", &[2], &b)]);
    let sp = spec(
        json!([{"name": "v", "type": "dense", "dim": 2}]),
        json!([{"type": "linear", "weight": "w", "bias": "b"}]),
        2,
    );
    let m = Model::load(&sp.to_string(), &st).unwrap();
    assert_eq!(
        m.embed(&json!({"v": [1, 1]})).unwrap(),
        vec![0.5 - 1.0 + 1.0, 2.25 + 3.0]
    );
    // An F16 infinity is a non-finite weight.
    let inf = half::f16::INFINITY.to_bits().to_le_bytes();
    let mut h2 = h.clone();
    h2[4..6].copy_from_slice(&inf);
    let st = write_raw(&[("w", "F16", &[2, 2], &h2), ("b", "BF16", &[2], &b)]);
    assert_eq!(
        Model::load(&sp.to_string(), &st).unwrap_err(),
        TowerError::NonFiniteWeight {
            name: "w".into(),
            index: 2
        }
    );
}

// ---------------------------------------------------------------- encode errors

#[test]
fn unknown_features_strict_and_lenient() {
    let m = vocab_model();
    assert_eq!(
        m.encode(&json!({"c": "a", "title": "x"}), true)
            .unwrap_err(),
        TowerError::UnknownFeature {
            name: "title".into()
        }
    );
    let a = m.encode(&json!({"c": "a", "title": "x"}), false).unwrap();
    let b = m.encode(&json!({"c": "a"}), true).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 1);
    for v in [json!([1]), json!(1), json!("x"), json!(null), json!(true)] {
        assert!(
            matches!(m.encode(&v, false), Err(TowerError::NotAnObject { .. })),
            "{v}"
        );
    }
}

#[test]
fn error_messages_name_the_culprit() {
    let m = vocab_model();
    let e = m.embed(&json!({"c": 1.5})).unwrap_err().to_string();
    assert!(e.contains("\"c\""), "{e}");
    let e = m.embed(&json!({"zz": 1})).unwrap_err().to_string();
    assert!(e.contains("zz"), "{e}");
}

// ---------------------------------------------------------------- load errors

fn base() -> (Value, Vec<T>) {
    let s = spec(
        json!([
            {"name": "c", "type": "categorical", "embedding": "emb", "hash_buckets": 3},
            {"name": "n", "type": "numeric", "transform": "none"}
        ]),
        json!([
            {"type": "linear", "weight": "l.w", "bias": "l.b"},
            {"type": "relu"}
        ]),
        2,
    );
    let ts = vec![
        ("emb", vec![4, 3], table(4, 3)),
        ("l.w", vec![2, 4], vec![0.1; 8]),
        ("l.b", vec![2], vec![0.0; 2]),
    ];
    (s, ts)
}

#[test]
fn base_loads() {
    let (s, ts) = base();
    let m = load(&s, &ts).unwrap();
    assert_eq!(m.output_dim(), 2);
    assert_eq!(m.input_width(), 4);
    assert_eq!(m.parameter_count(), 12 + 8 + 2);
}

#[test]
fn missing_stray_shape_dtype_nan() {
    let (s, ts) = base();
    assert_eq!(
        load(&s, &ts[..2]).unwrap_err(),
        TowerError::MissingTensor { name: "l.b".into() }
    );
    let mut extra = ts.clone();
    extra.push(("unused", vec![1], vec![0.]));
    assert_eq!(
        load(&s, &extra).unwrap_err(),
        TowerError::StrayTensor {
            name: "unused".into()
        }
    );
    let mut shape = ts.clone();
    shape[1] = ("l.w", vec![2, 5], vec![0.1; 10]);
    assert_eq!(
        load(&s, &shape).unwrap_err(),
        TowerError::TensorShape {
            name: "l.w".into(),
            expected: "[out, 4]".into(),
            got: vec![2, 5]
        }
    );
    let mut emb = ts.clone();
    emb[0] = ("emb", vec![5, 3], table(5, 3));
    assert_eq!(
        load(&s, &emb).unwrap_err(),
        TowerError::TensorShape {
            name: "emb".into(),
            expected: "[4, d]".into(),
            got: vec![5, 3]
        }
    );
    let mut rank = ts.clone();
    rank[2] = ("l.b", vec![1, 2], vec![0.0; 2]);
    assert!(matches!(
        load(&s, &rank),
        Err(TowerError::TensorShape { .. })
    ));
    let mut nan = ts.clone();
    nan[1].2[5] = f32::NAN;
    assert_eq!(
        load(&s, &nan).unwrap_err(),
        TowerError::NonFiniteWeight {
            name: "l.w".into(),
            index: 5
        }
    );
    let mut inf = ts.clone();
    inf[0].2[0] = f32::NEG_INFINITY;
    assert!(matches!(
        load(&s, &inf),
        Err(TowerError::NonFiniteWeight { .. })
    ));
    // Wrong dtype.
    let st = write_raw(&[
        (
            "emb",
            "F32",
            &[4, 3],
            &table(4, 3)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        ),
        ("l.w", "F64", &[2, 4], &[0u8; 64]),
        ("l.b", "F32", &[2], &[0u8; 8]),
    ]);
    assert_eq!(
        Model::load(&s.to_string(), &st).unwrap_err(),
        TowerError::TensorDtype {
            name: "l.w".into(),
            dtype: "F64".into()
        }
    );
}

#[test]
fn truncated_and_corrupted_safetensors() {
    let (s, ts) = base();
    let st = weights(&ts);
    let sj = s.to_string();
    assert!(Model::load(&sj, &st).is_ok());
    for cut in 0..st.len() {
        assert!(Model::load(&sj, &st[..cut]).is_err(), "cut {cut}");
    }
    // Garbage in the header JSON.
    let mut bad = st.clone();
    bad[8] = b'[';
    assert!(matches!(
        Model::load(&sj, &bad),
        Err(TowerError::Safetensors { .. })
    ));
    // Header length pointing past the end.
    let mut bad = st.clone();
    bad[..8].copy_from_slice(&(st.len() as u64).to_le_bytes());
    assert!(matches!(
        Model::load(&sj, &bad),
        Err(TowerError::Safetensors { .. })
    ));
    // Header length above the limit.
    let mut bad = st.clone();
    bad[..8].copy_from_slice(&(200_000_000u64).to_le_bytes());
    assert!(matches!(
        Model::load(&sj, &bad),
        Err(TowerError::TooLarge { .. })
    ));
    // Trailing bytes no tensor covers are refused: the format requires the data buffer to be
    // entirely indexed, without holes (as the `safetensors` crate enforces).
    let mut trailing = st.clone();
    trailing.extend_from_slice(&[0; 3]);
    assert!(matches!(
        Model::load(&sj, &trailing),
        Err(TowerError::Safetensors { .. })
    ));
}

fn spec_err(s: &Value, ts: &[T]) -> (String, String) {
    match load(s, ts) {
        Err(TowerError::Spec { path, reason }) => (path, reason),
        other => panic!("expected a Spec error, got {other:?}"),
    }
}

#[test]
fn bad_specs() {
    let (s, ts) = base();

    assert!(matches!(
        Model::load("{not json", &weights(&ts)),
        Err(TowerError::SpecJson { .. })
    ));
    assert!(matches!(
        Model::load(
            r#"{"format":"pg_twotower.tower","format":"x"}"#,
            &weights(&ts)
        ),
        Err(TowerError::SpecJson { .. })
    ));

    let mut v = s.clone();
    v["spec_version"] = json!(2);
    assert_eq!(
        load(&v, &ts).unwrap_err(),
        TowerError::SpecVersion { got: "2".into() }
    );
    v["spec_version"] = json!("1");
    assert!(matches!(load(&v, &ts), Err(TowerError::SpecVersion { .. })));
    let mut v = s.clone();
    v["spec_version"] = json!(1.0);
    assert!(load(&v, &ts).is_ok());

    type Edit = Box<dyn Fn(&mut Value)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("format", Box::new(|v| v["format"] = json!("onnx"))),
        ("extra", Box::new(|v| v["extra"] = json!(1))),
        ("kind", Box::new(|v| v["kind"] = json!("both"))),
        (
            "features[0].embeddings",
            Box::new(|v| v["features"][0]["embeddings"] = json!("x")),
        ),
        (
            "features[1].mean",
            Box::new(|v| v["features"][1]["mean"] = json!(1)),
        ),
        (
            "features[1].transform",
            Box::new(|v| v["features"][1]["transform"] = json!("log")),
        ),
        (
            "features[0].type",
            Box::new(|v| v["features"][0]["type"] = json!("categorial")),
        ),
        (
            "features[1].name",
            Box::new(|v| v["features"][1]["name"] = json!("c")),
        ),
        (
            "features[1].name",
            Box::new(|v| v["features"][1]["name"] = json!("1x")),
        ),
        (
            "features[1].name",
            Box::new(|v| v["features"][1]["name"] = json!("a".repeat(64))),
        ),
        (
            "features[0]",
            Box::new(|v| v["features"][0]["vocabulary"] = json!(["a"])),
        ),
        ("features", Box::new(|v| v["features"] = json!([]))),
        ("features[0]", Box::new(|v| v["features"][0] = json!(3))),
        (
            "layers[0].weight",
            Box::new(|v| v["layers"][0]["weight"] = json!(3)),
        ),
        (
            "layers[0].weight",
            Box::new(|v| v["layers"][0]["weight"] = json!("")),
        ),
        (
            "layers[1].type",
            Box::new(|v| v["layers"][1]["type"] = json!("swish")),
        ),
        (
            "layers[1].alpha",
            Box::new(|v| v["layers"][1]["alpha"] = json!(0.1)),
        ),
        (
            "layers",
            Box::new(|v| v["layers"] = Value::Array(vec![json!({"type": "relu"}); 65])),
        ),
        ("output.dim", Box::new(|v| v["output"]["dim"] = json!(3))),
        ("output.dim", Box::new(|v| v["output"]["dim"] = json!(0))),
        (
            "output.metric",
            Box::new(|v| v["output"]["metric"] = json!("dot")),
        ),
        (
            "output",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("output");
            }),
        ),
        (
            "layers[2].fields[0]",
            Box::new(|v| {
                v["layers"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"type": "shortcut", "fields": ["nope"]}))
            }),
        ),
        (
            "layers[2].fields",
            Box::new(|v| {
                v["layers"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"type": "shortcut", "fields": []}))
            }),
        ),
        (
            "layers[2].eps",
            Box::new(|v| {
                v["layers"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"type": "layernorm", "weight": "g", "bias": "b", "eps": 0}))
            }),
        ),
        (
            "layers[2].p",
            Box::new(|v| {
                v["layers"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"type": "dropout", "p": 2}))
            }),
        ),
        (
            "senet.w3",
            Box::new(|v| v["senet"] = json!({"w1": "a", "w2": "b", "w3": "c"})),
        ),
        ("senet.w2", Box::new(|v| v["senet"] = json!({"w1": "a"}))),
    ];
    for (path, edit) in edits {
        let mut v = s.clone();
        edit(&mut v);
        let (p, reason) = spec_err(&v, &ts);
        assert_eq!(p, path, "{reason}");
    }
}

#[test]
fn bad_feature_specs() {
    let one = |f: Value| spec(json!([f]), json!([]), 1);
    let cases = [
        (
            json!({"name": "x", "type": "numeric", "transform": "zscore", "mean": 0, "std": 0}),
            "features[0].std",
        ),
        (
            json!({"name": "x", "type": "numeric", "transform": "zscore", "mean": 0}),
            "features[0].std",
        ),
        (
            json!({"name": "x", "type": "numeric", "transform": "minmax", "min": 1, "max": 1}),
            "features[0].max",
        ),
        (
            json!({"name": "x", "type": "numeric", "transform": "none", "default": "0"}),
            "features[0].default",
        ),
        (
            json!({"name": "x", "type": "numeric", "transform": "none", "default": 1e300}),
            "features[0].default",
        ),
        (
            json!({"name": "x", "type": "bucketize", "boundaries": [1, 1], "embedding": "e"}),
            "features[0].boundaries[1]",
        ),
        (
            json!({"name": "x", "type": "bucketize", "boundaries": [2, 1], "embedding": "e"}),
            "features[0].boundaries[1]",
        ),
        (
            json!({"name": "x", "type": "bucketize", "boundaries": [1, "2"], "embedding": "e"}),
            "features[0].boundaries[1]",
        ),
        (
            json!({"name": "x", "type": "dense", "dim": 0}),
            "features[0].dim",
        ),
        (
            json!({"name": "x", "type": "dense", "dim": 4097}),
            "features[0].dim",
        ),
        (
            json!({"name": "x", "type": "dense", "dim": 1.5}),
            "features[0].dim",
        ),
        (
            json!({"name": "x", "type": "categorical", "embedding": "e", "vocabulary": ["a", "b", "a"]}),
            "features[0].vocabulary[2]",
        ),
        (
            json!({"name": "x", "type": "categorical", "embedding": "e", "vocabulary": [1, 2]}),
            "features[0].vocabulary[0]",
        ),
        (
            json!({"name": "x", "type": "categorical", "embedding": "e", "hash_buckets": 0}),
            "features[0].hash_buckets",
        ),
        (
            json!({"name": "x", "type": "categorical", "embedding": "e"}),
            "features[0]",
        ),
        (
            json!({"name": "x", "type": "categorical", "embedding": "e", "hash_buckets": 3, "pooling": "sum"}),
            "features[0].pooling",
        ),
        (
            json!({"name": "x", "type": "multi_categorical", "embedding": "e", "hash_buckets": 3}),
            "features[0].pooling",
        ),
        (
            json!({"name": "x", "type": "multi_categorical", "embedding": "e", "hash_buckets": 3, "pooling": "avg"}),
            "features[0].pooling",
        ),
        (
            json!({"name": "x", "type": "multi_categorical", "embedding": "e", "hash_buckets": 3, "pooling": "sum", "max_len": 0}),
            "features[0].max_len",
        ),
        (
            json!({"name": "x", "type": "multi_categorical", "embedding": "e", "hash_buckets": 3, "pooling": "sum", "max_len": 10001}),
            "features[0].max_len",
        ),
        (
            json!({"name": "x", "type": "multi_categorical", "embedding": "e", "hash_buckets": 3, "pooling": "sum", "weighted": "yes"}),
            "features[0].weighted",
        ),
    ];
    for (f, path) in cases {
        let (p, reason) = spec_err(&one(f.clone()), &[]);
        assert_eq!(p, path, "{f}: {reason}");
    }
    // 257 features.
    let many: Vec<Value> = (0..257)
        .map(|i| json!({"name": format!("f{i}"), "type": "numeric", "transform": "none"}))
        .collect();
    assert_eq!(
        spec_err(&spec(json!(many), json!([]), 257), &[]).0,
        "features"
    );
}

#[test]
fn width_chaining() {
    let (s, ts) = base();
    // Linear in mismatch.
    let mut v = s.clone();
    v["layers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "linear", "weight": "l2.w"}));
    v["output"]["dim"] = json!(1);
    let mut t2 = ts.clone();
    t2.push(("l2.w", vec![1, 3], vec![0.; 3]));
    assert!(
        matches!(load(&v, &t2), Err(TowerError::TensorShape { ref name, .. }) if name == "l2.w")
    );
    t2.pop();
    t2.push(("l2.w", vec![1, 2], vec![0.; 2]));
    assert!(load(&v, &t2).is_ok());
    // Norm size mismatch.
    let mut v = s.clone();
    v["layers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "layernorm", "weight": "g", "bias": "b"}));
    let mut t3 = ts.clone();
    t3.push(("g", vec![3], vec![1.; 3]));
    t3.push(("b", vec![3], vec![0.; 3]));
    assert!(matches!(load(&v, &t3), Err(TowerError::TensorShape { ref name, .. }) if name == "g"));
    // Width over 16000.
    let mut v = s.clone();
    v["layers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "linear", "weight": "big"}));
    v["output"]["dim"] = json!(2);
    let mut t4 = ts.clone();
    t4.push(("big", vec![16001, 2], vec![0.; 32002]));
    assert_eq!(spec_err(&v, &t4).0, "layers[2].weight");
    // Shortcut widens; output.dim must follow.
    let mut v = s.clone();
    v["layers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "shortcut", "fields": ["n", "c"]}));
    assert_eq!(spec_err(&v, &ts).0, "output.dim");
    v["output"]["dim"] = json!(2 + 1 + 3);
    let m = load(&v, &ts).unwrap();
    let out = m.embed(&json!({"c": "q", "n": 7})).unwrap();
    assert_eq!(out.len(), 6);
    assert_eq!(out[2], 7.0);
    // Empty layer stack: the concatenated fields are the output.
    let mut v = s.clone();
    v["layers"] = json!([]);
    assert_eq!(spec_err(&v, &ts[..1]).0, "output.dim");
    v["output"]["dim"] = json!(4);
    assert!(load(&v, &ts[..1]).is_ok());
    // Embedding width 0 is a shape error.
    assert!(matches!(
        load(&v, &[("emb", vec![4, 0], vec![])]),
        Err(TowerError::TensorShape { .. })
    ));
}

// ---------------------------------------------------------------- batch and threads

#[test]
fn forward_equals_batch_equals_parallel() {
    let (sj, st) = twotower_testkit::towers::realistic_user_tower(3);
    let m = Model::load(&sj, &st).unwrap();
    assert_eq!(m.output_dim(), 64);
    assert_eq!(m.kind(), Kind::User);
    let xs: Vec<Encoded> = (0..37)
        .map(|i| {
            m.encode(&twotower_testkit::towers::realistic_user_input(9, i), true)
                .unwrap()
        })
        .collect();
    let single: Vec<f32> = xs.iter().flat_map(|x| m.forward(x)).collect();
    let batch = m.forward_batch(&xs);
    let par = forward_parallel(&m, &xs, 4);
    let par1 = forward_parallel(&m, &xs, 1);
    let par_many = forward_parallel(&m, &xs, 100);
    assert_eq!(single.len(), 37 * 64);
    for other in [&batch, &par, &par1, &par_many] {
        assert_eq!(other.len(), single.len());
        for (a, b) in single.iter().zip(other.iter()) {
            assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
        }
    }
    // Unit-norm rows (l2_normalize at the top).
    for r in single.chunks(64) {
        let n: f32 = r.iter().map(|v| v * v).sum();
        assert!((n - 1.0).abs() < 1e-4);
    }
    assert!(m.forward_batch(&[]).is_empty());
    assert!(forward_parallel(&m, &[], 4).is_empty());

    let (sj, st) = twotower_testkit::towers::realistic_item_tower(3);
    let it = Model::load(&sj, &st).unwrap();
    assert_eq!(it.kind(), Kind::Item);
    assert_eq!(it.output_dim(), 64);
    let xs: Vec<Encoded> = (0..10)
        .map(|i| {
            it.encode(&twotower_testkit::towers::realistic_item_input(1, i), false)
                .unwrap()
        })
        .collect();
    let single: Vec<f32> = xs.iter().flat_map(|x| it.forward(x)).collect();
    for (a, b) in single.iter().zip(it.forward_batch(&xs).iter()) {
        assert!((a - b).abs() <= 1e-5);
    }
}

#[test]
fn model_is_send_sync_and_encoded_is_send() {
    fn ss<T: Send + Sync>() {}
    fn s<T: Send>() {}
    ss::<Model>();
    s::<Encoded>();
    assert_eq!(Kind::User.name(), "user");
    assert_eq!(Kind::Item.name(), "item");
    assert_eq!(Metric::Cosine.spec_name(), "cosine");
    assert_eq!(Metric::InnerProduct.spec_name(), "ip");
    assert_eq!(Metric::L2.spec_name(), "l2");
    assert_eq!(SPEC_VERSION, 1);
}

#[test]
fn encoded_from_another_model_does_not_panic() {
    let (s, ts) = base();
    let a = load(&s, &ts).unwrap();
    let m = vocab_model();
    let x = m.encode(&json!({"c": "a"}), true).unwrap();
    // Release builds give garbage-in/garbage-out, never a crash (debug builds assert).
    if !cfg!(debug_assertions) {
        assert_eq!(a.forward(&x).len(), 2);
    }
}

fn prerank_spec(features: Value) -> Value {
    json!({
        "format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
        "features": features,
        "layers": [{"type": "linear", "weight": "w"}],
        "output": {"dim": 1}
    })
}

#[test]
fn a_prerank_model_assembles_user_item_and_cross_fields_in_spec_order() {
    // Fields: device (user, 2-d table), price (item numeric), score (cross), u (cross, 2-d).
    let s = prerank_spec(json!([
        {"name": "device", "type": "categorical", "embedding": "e", "vocabulary": ["ios", "web"]},
        {"name": "price", "source": "item", "type": "numeric", "transform": "none"},
        {"name": "score", "type": "cross", "of": "score"},
        {"name": "u", "type": "cross", "of": "user_vector", "dim": 2}
    ]));
    let m = load(
        &s,
        &[
            ("e", vec![3, 2], vec![0., 0., 1., 2., 3., 4.]),
            ("w", vec![1, 6], vec![1., 10., 100., 1000., 1e4, 1e5]),
        ],
    )
    .unwrap();
    assert_eq!(m.kind(), Kind::Prerank);
    assert_eq!(m.cross_width(Cross::UserVector), Some(2));
    assert_eq!(m.cross_width(Cross::Product), None);
    let names: Vec<(&str, Source)> = m.sources().collect();
    assert_eq!(names[1], ("price", Source::Item));
    assert_eq!(names[2], ("score", Source::Cross(Cross::Score)));
    let user = m
        .encode_part(&json!({"device": "web"}), Source::User, true)
        .unwrap();
    // The user part is strict about its own side only: an item feature is not a request key.
    assert!(matches!(
        m.encode_part(&json!({"price": 1}), Source::User, true),
        Err(TowerError::UnknownFeature { .. })
    ));
    let item = m
        .encode_part(&json!({"price": 0.5, "title": "x"}), Source::Item, false)
        .unwrap();
    let x = m.assemble(&user, &item, &mut |c, out| match c {
        Cross::Score => out[0] = 0.25,
        Cross::UserVector => out.copy_from_slice(&[3.0, 4.0]),
        _ => unreachable!(),
    });
    // [3, 4 | 0.5 | 0.25 | 3, 4] · [1, 10, 100, 1000, 1e4, 1e5]
    let want = 3.0 + 40.0 + 50.0 + 250.0 + 3e4 + 4e5;
    assert_eq!(m.forward(&x), vec![want as f32]);
    // forward_rows: the same scores without an example per row, on one thread or two.
    let items: Vec<Part> = (0..5)
        .map(|i| {
            m.encode_part(&json!({"price": i as f64}), Source::Item, false)
                .unwrap()
        })
        .collect();
    let u = [3.0f32, 1.0];
    let rows: Vec<Row> = items.iter().map(|p| (p, &u[..])).collect();
    let fill = |i: usize, c: Cross, out: &mut [f32]| match c {
        Cross::Score => out[0] = i as f32 / 10.0,
        _ => out.copy_from_slice(&u),
    };
    let want: Vec<f32> = (0..5)
        .map(|i| m.forward(&m.assemble(&user, &items[i], &mut |c, o| fill(i, c, o)))[0])
        .collect();
    assert_eq!(
        m.forward_rows(
            &user,
            &u,
            &rows,
            &Default::default(),
            &mut |i, _| i as f32 / 10.0,
            1
        ),
        want
    );
    assert_eq!(
        m.forward_rows(
            &user,
            &u,
            &rows,
            &Default::default(),
            &mut |i, _| i as f32 / 10.0,
            2
        ),
        want
    );
    // Parts from the wrong side or another model contribute zeros.
    let x = m.assemble(&item, &user, &mut |_, _| {});
    assert_eq!(m.forward(&x), vec![0.0]);
}

#[test]
fn prerank_specs_are_validated() {
    let w = |n: usize| vec![("w", vec![1, n], vec![1.0; n])];
    let bad = |s: Value, ts: &[T], path: &str| match load(&s, ts) {
        Err(TowerError::Spec { path: p, .. }) => assert_eq!(p, path, "{s}"),
        other => panic!("{s}: expected a spec error at {path}, got {other:?}"),
    };
    bad(
        prerank_spec(json!([{"name": "s", "type": "cross", "of": "rank"}])),
        &w(1),
        "features[0].of",
    );
    bad(
        prerank_spec(json!([{"name": "s", "type": "cross", "of": "product"}])),
        &w(1),
        "features[0].dim",
    );
    bad(
        prerank_spec(json!([{"name": "s", "type": "cross", "of": "score", "dim": 3}])),
        &w(1),
        "features[0].dim",
    );
    bad(
        prerank_spec(
            json!([{"name": "s", "type": "numeric", "transform": "none", "source": "cross"}]),
        ),
        &w(1),
        "features[0].source",
    );
    let mut two = prerank_spec(json!([{"name": "s", "type": "cross", "of": "score"}]));
    two["output"] = json!({"dim": 2});
    bad(two, &w(1), "output.dim");
    let mut metric = prerank_spec(json!([{"name": "s", "type": "cross", "of": "score"}]));
    metric["output"] = json!({"dim": 1, "metric": "ip"});
    bad(metric, &w(1), "output.metric");
    // Towers have no sources and no cross features.
    bad(
        spec(
            json!([{"name": "s", "type": "numeric", "transform": "none", "source": "item"}]),
            json!([]),
            1,
        ),
        &[],
        "features[0].source",
    );
    bad(
        spec(
            json!([{"name": "s", "type": "cross", "of": "score"}]),
            json!([]),
            1,
        ),
        &[],
        "features[0].type",
    );
    assert!(load(
        &prerank_spec(json!([{"name": "s", "type": "cross", "of": "score"}])),
        &w(1)
    )
    .is_ok());
    // Target attention: its weights, their shapes, one per model.
    let din = |att: Value| json!({"name": "din", "type": "cross", "of": "target_attention", "dim": 2, "attention": att});
    let qk = |r: usize, rk: usize, d: usize| {
        vec![
            ("w", vec![1, 2], vec![1.0; 2]),
            ("q", vec![r, d], vec![0.5; r * d]),
            ("k", vec![rk, d], vec![0.5; rk * d]),
        ]
    };
    assert!(load(
        &prerank_spec(json!([din(json!({"query": "q", "key": "k"}))])),
        &qk(3, 3, 2)
    )
    .is_ok());
    bad(
        prerank_spec(json!([{"name": "din", "type": "cross", "of": "target_attention", "dim": 2}])),
        &w(2),
        "features[0].attention",
    );
    bad(
        prerank_spec(json!([din(json!({"query": "q"}))])),
        &qk(3, 3, 2),
        "features[0].attention.key",
    );
    bad(
        prerank_spec(json!([din(
            json!({"query": "q", "key": "k", "value": "k"})
        )])),
        &qk(3, 3, 2),
        "features[0].attention.value",
    );
    bad(
        prerank_spec(
            json!([{"name": "s", "type": "cross", "of": "score", "attention": {"query": "q", "key": "k"}}]),
        ),
        &w(1),
        "features[0].attention",
    );
    let mut twice = prerank_spec(
        json!([din(json!({"query": "q", "key": "k"})), {"name": "d2", "type": "cross", "of": "target_attention", "dim": 2, "attention": {"query": "q", "key": "k"}}]),
    );
    twice["layers"] = json!([{"type": "linear", "weight": "w4"}]);
    bad(
        twice,
        &[
            ("w4", vec![1, 4], vec![1.0; 4]),
            ("q", vec![3, 2], vec![0.5; 6]),
            ("k", vec![3, 2], vec![0.5; 6]),
        ],
        "features[1].of",
    );
    for (ts, what) in [
        (qk(3, 3, 4), "a query of the wrong width"),
        (qk(3, 2, 2), "a key with other rows"),
    ] {
        assert!(
            matches!(
                load(
                    &prerank_spec(json!([din(json!({"query": "q", "key": "k"}))])),
                    &ts
                ),
                Err(TowerError::TensorShape { .. })
            ),
            "{what}"
        );
    }
}

/// A pre-rank model reading every kind of input, with or without SENet (which keeps the first
/// layer from being folded), and values spread over [-1, 1). Or the same inputs through a
/// multi-task graph whose field readers fold (`graph` 1): an expert over every field in order,
/// an expert over a subset in another order, a gate over both from three fields, a head per
/// task (one reading a node and an expert), two tasks; (2) the same behind a scene gate over
/// most fields, gated by the request's constants (folded into the experts' weights); (3) a
/// scene gate gated by a candidate's input (not foldable: one raw row per candidate).
fn every_input_prerank_as(senet: bool, graph: u8) -> Model {
    let mut s = prerank_spec(json!([
        {"name": "device", "type": "categorical", "embedding": "ed", "vocabulary": ["ios", "web"]},
        {"name": "category", "source": "item", "type": "categorical", "embedding": "ec", "vocabulary": ["a", "b", "c"]},
        {"name": "price", "source": "item", "type": "numeric", "transform": "log1p", "default": 0},
        {"name": "u", "type": "cross", "of": "user_vector", "dim": 4},
        {"name": "v", "type": "cross", "of": "item_vector", "dim": 4},
        {"name": "uv", "type": "cross", "of": "product", "dim": 4},
        {"name": "score", "type": "cross", "of": "score"},
        {"name": "hmax", "type": "cross", "of": "history_max"},
        {"name": "rank", "type": "cross", "of": "recall_rank"},
        {"name": "din", "type": "cross", "of": "target_attention", "dim": 4, "attention": {"query": "aq", "key": "ak"}}
    ]));
    s["layers"] = json!([
        {"type": "linear", "weight": "w0", "bias": "b0"},
        {"type": "relu"},
        {"type": "linear", "weight": "w1", "bias": "b1"}
    ]);
    let vals = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 37 + seed * 11) % 41) as f32 - 20.0) / 20.0)
            .collect()
    };
    let mut ts: Vec<T> = vec![
        ("ed", vec![3, 2], vals(6, 1)),
        ("ec", vec![4, 2], vals(8, 2)),
        ("w0", vec![5, 24], vals(120, 3)),
        ("aq", vec![3, 4], vals(12, 9)),
        ("ak", vec![3, 4], vals(12, 10)),
        ("b0", vec![5], vals(5, 4)),
        ("w1", vec![1, 5], vals(5, 5)),
        ("b1", vec![1], vals(1, 6)),
    ];
    if senet {
        s["senet"] = json!({"w1": "s1", "w2": "s2"});
        ts.push(("s1", vec![3, 10], vals(30, 7)));
        ts.push(("s2", vec![10, 3], vals(30, 8)));
    }
    if graph >= 2 {
        let gate = if graph == 2 {
            json!(["device", "u"])
        } else {
            json!(["device", "score"])
        };
        let o = s.as_object_mut().unwrap();
        o.remove("layers");
        o.insert("graph".into(), json!([
            {"name": "sg", "combine": "scale", "inputs": ["category", "price", "v", "uv", "score", "hmax", "rank", "din"],
             "gate_inputs": gate, "weight": "sgw", "bias": "sgb"},
            {"name": "e0", "inputs": ["sg", "device"],
             "layers": [{"type": "linear", "weight": "we0", "bias": "b0"}, {"type": "relu"}]},
            {"name": "e1", "inputs": ["din", "sg", "u"],
             "layers": [{"type": "linear", "weight": "we1"}, {"type": "tanh"}]},
            {"name": "g", "combine": "gate", "inputs": ["e0", "e1"], "gate_inputs": ["device", "sg"], "weight": "gw"},
            {"name": "h0", "inputs": ["g"], "layers": [{"type": "linear", "weight": "w1", "bias": "b1"}]},
            {"name": "h1", "inputs": ["g", "e1"], "layers": [{"type": "linear", "weight": "wh"}]},
            {"name": "out", "combine": "concat", "inputs": ["h0", "h1"]}]));
        o.insert(
            "output".into(),
            json!({"dim": 2, "node": "out", "tasks": [
            {"name": "a"}, {"name": "b", "link": "identity", "fuse": 0.5}]}),
        );
        let gw = if graph == 2 { 6 } else { 3 };
        ts.retain(|t| t.0 != "w0");
        ts.push(("sgw", vec![18, gw], vals(18 * gw, 15)));
        ts.push(("sgb", vec![18], vals(18, 16)));
        ts.push(("we0", vec![5, 20], vals(100, 17)));
        ts.push(("we1", vec![5, 26], vals(130, 11)));
        ts.push(("gw", vec![2, 20], vals(40, 12)));
        ts.push(("wh", vec![1, 10], vals(10, 14)));
    }
    if graph == 1 {
        let o = s.as_object_mut().unwrap();
        o.remove("layers");
        o.insert("graph".into(), json!([
            {"name": "e0", "inputs": ["device", "category", "price", "u", "v", "uv", "score", "hmax", "rank", "din"],
             "layers": [{"type": "linear", "weight": "w0", "bias": "b0"}, {"type": "relu"}]},
            {"name": "e1", "inputs": ["din", "price", "uv", "device", "rank"],
             "layers": [{"type": "linear", "weight": "we1"}, {"type": "tanh"}]},
            {"name": "g", "combine": "gate", "inputs": ["e0", "e1"], "gate_inputs": ["score", "category", "v"],
             "weight": "gw", "bias": "gb"},
            {"name": "h0", "inputs": ["g"], "layers": [{"type": "linear", "weight": "w1", "bias": "b1"}]},
            {"name": "h1", "inputs": ["g", "e1"], "layers": [{"type": "linear", "weight": "wh"}]},
            {"name": "out", "combine": "concat", "inputs": ["h0", "h1"]}]));
        o.insert(
            "output".into(),
            json!({"dim": 2, "node": "out", "tasks": [
            {"name": "a"}, {"name": "b", "link": "identity", "fuse": 0.5}]}),
        );
        ts.push(("we1", vec![5, 12], vals(60, 11)));
        ts.push(("gw", vec![2, 7], vals(14, 12)));
        ts.push(("gb", vec![2], vals(2, 13)));
        ts.push(("wh", vec![1, 10], vals(10, 14)));
    }
    load(&s, &ts).unwrap()
}

#[test]
fn forward_rows_scores_every_input_as_the_per_example_pass_does() {
    // With the first layer linear, the request's constants (user fields, u) are folded into its
    // bias and u ⊙ v into its weights over v; with SENet, one raw row per candidate. Both must
    // score as an example per candidate does (up to the rounding of a reordered sum).
    // A multi-task graph folds each node that reads fields (its first linear map, a gate's
    // logits) the same way, and scores as the per-example pass does too.
    for (senet, mmoe) in [
        (false, 0),
        (true, 0),
        (false, 1),
        (true, 1),
        (false, 2),
        (false, 3),
        (true, 2),
    ] {
        let m = every_input_prerank_as(senet, mmoe);
        let nt = m.output_dim();
        let user = m
            .encode_part(&json!({"device": "web"}), Source::User, true)
            .unwrap();
        let u = [0.5f32, -1.0, 0.25, 2.0];
        let cats = ["a", "b", "c", "zz"];
        let items: Vec<Part> = (0..40)
            .map(|i| {
                m.encode_part(
                    &json!({"category": cats[i % 4], "price": i as f64}),
                    Source::Item,
                    false,
                )
                .unwrap()
            })
            .collect();
        let vs: Vec<Vec<f32>> = (0..40)
            .map(|i| {
                (0..4)
                    .map(|j| (((i * 7 + j * 3) % 9) as f32 - 4.0) / 4.0)
                    .collect()
            })
            .collect();
        let scalar = |i: usize, c: Cross| match c {
            Cross::Score => i as f32 / 40.0,
            Cross::HistoryMax => 1.0 - i as f32 / 20.0,
            Cross::RecallRank => ((i + 1) as f32).ln(),
            _ => f32::NAN,
        };
        // Target attention over a history of three vectors (one of the wrong width, left out).
        let history = vec![
            vec![1.0f32, 0.0, 0.5, -0.5],
            vec![-0.25, 0.75, 0.0, 1.0],
            vec![1.0, 2.0],
            vec![0.5, 0.5, 0.5, 0.5],
        ];
        let keys = m.attention_keys(&history);
        assert_eq!(keys.n, 3);
        // The path taken: folded unless SENet or a scene gate reading a candidate's input.
        assert_eq!(
            m.rows_fold(&u, &keys),
            !senet && mmoe != 3,
            "senet {senet}, graph {mmoe}"
        );
        let want: Vec<f32> = (0..40)
            .flat_map(|i| {
                let x = m.assemble(&user, &items[i], &mut |c, out| match c {
                    Cross::UserVector => out.copy_from_slice(&u),
                    Cross::ItemVector => out.copy_from_slice(&vs[i]),
                    Cross::Product => out
                        .iter_mut()
                        .enumerate()
                        .for_each(|(j, o)| *o = u[j] * vs[i][j]),
                    Cross::TargetAttention => m.attend(&keys, &vs[i], out),
                    c => out[0] = scalar(i, c),
                });
                m.forward(&x)
            })
            .collect();
        let rows: Vec<Row> = items.iter().zip(&vs).map(|(p, v)| (p, &v[..])).collect();
        for threads in [1, 2] {
            let got = m.forward_rows(&user, &u, &rows, &keys, &mut |i, c| scalar(i, c), threads);
            assert_eq!(got.len(), 40 * nt);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "senet {senet}, mmoe {mmoe}, threads {threads}, row {}, output {}: {g} vs {w}",
                    i / nt,
                    i % nt
                );
            }
        }
        // A narrower vector than the field reads as zeros past its end, as in an example.
        let short = [1.0f32];
        let got = m.forward_rows(
            &user,
            &u,
            &[(&items[0], &short[..])],
            &Default::default(),
            &mut |i, c| scalar(i, c),
            1,
        );
        let x = m.assemble(&user, &items[0], &mut |c, out| match c {
            Cross::UserVector => out.copy_from_slice(&u),
            Cross::ItemVector => out[0] = 1.0,
            Cross::Product => out[0] = u[0],
            // No history (and a vector of the wrong width): the attention reads zeros.
            Cross::TargetAttention => {}
            c => out[0] = scalar(0, c),
        });
        for (g, w) in got.iter().zip(m.forward(&x)) {
            assert!(
                (g - w).abs() <= 1e-5,
                "senet {senet}, mmoe {mmoe}: a short vector"
            );
        }
    }
}

#[test]
fn target_attention_reads_a_bounded_history_and_scores_candidates_in_blocks() {
    use twotower_tower::attention::{attend, attend_rows, history_keys, MAX_ATTENDED};
    let (r, d) = (3, 4);
    let val = |i: usize, j: usize, a: usize, b: usize| (((i * a + j * b) % 17) as f32 - 8.0) / 8.0;
    let wq: Vec<f32> = (0..r * d).map(|i| val(i, 0, 7, 1)).collect();
    let wk: Vec<f32> = (0..r * d).map(|i| val(i, 0, 5, 1)).collect();
    // A history longer than the bound: its first MAX_ATTENDED usable vectors are read (a
    // non-finite one and one of the wrong width are skipped).
    let mut hist: Vec<Vec<f32>> = (0..300)
        .map(|i| (0..d).map(|j| val(i, j, 13, 5)).collect())
        .collect();
    hist[3] = vec![f32::NAN, 0.0, 0.0, 0.0];
    hist[7] = vec![1.0];
    let keys = history_keys(&wk, r, d, &hist);
    assert_eq!(keys.n, MAX_ATTENDED);
    let usable: Vec<&Vec<f32>> = hist
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 7)
        .map(|(_, h)| h)
        .take(MAX_ATTENDED)
        .collect();
    assert_eq!(
        keys.values,
        usable
            .iter()
            .flat_map(|h| h.iter().copied())
            .collect::<Vec<f32>>()
    );
    // More candidates than one block: the batched products equal one candidate at a time.
    let vs: Vec<Vec<f32>> = (0..2500)
        .map(|i| (0..d).map(|j| val(i, j, 11, 3)).collect())
        .collect();
    let refs: Vec<&[f32]> = vs.iter().map(|v| v.as_slice()).collect();
    let rows = attend_rows(&wq, &keys, &refs);
    assert_eq!(rows.len(), 2500 * d);
    for i in (0..2500).step_by(97).chain([1023, 1024, 2499]) {
        let mut one = vec![0f32; d];
        attend(&wq, &keys, &vs[i], &mut one);
        for (a, b) in rows[i * d..(i + 1) * d].iter().zip(&one) {
            assert!((a - b).abs() < 1e-5, "candidate {i}: {a} vs {b}");
        }
    }
}
