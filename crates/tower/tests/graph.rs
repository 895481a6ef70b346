//! Towers as graphs of named nodes: the parallel two-tower identity, attention fusion and the
//! other combines against hand computations, SENet before a graph, and every malformed graph
//! rejected with its spec path.

use serde_json::{json, Value};
use twotower_tower::safetensors::write_f32;
use twotower_tower::*;

type T = (&'static str, Vec<usize>, Vec<f32>);

fn weights(ts: &[T]) -> Vec<u8> {
    let refs: Vec<(&str, &[usize], &[f32])> = ts
        .iter()
        .map(|(n, s, d)| (*n, s.as_slice(), d.as_slice()))
        .collect();
    write_f32(&refs)
}

fn load(spec: &Value, ts: &[T]) -> Result<Model> {
    Model::load(&spec.to_string(), &weights(ts))
}

/// Deterministic pseudo-random values in [-1, 1).
fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tower(
    kind: &str,
    features: Value,
    graph: Value,
    dim: usize,
    metric: &str,
    node: Option<&str>,
) -> Value {
    let mut output = json!({"dim": dim, "metric": metric});
    if let Some(n) = node {
        output["node"] = json!(n);
    }
    json!({"format": "pg_twotower.tower", "spec_version": 1, "kind": kind, "features": features,
           "graph": graph, "output": output})
}

fn plain(kind: &str, features: Value, layers: Value, dim: usize) -> Value {
    json!({"format": "pg_twotower.tower", "spec_version": 1, "kind": kind, "features": features,
           "layers": layers, "output": {"dim": dim, "metric": "ip"}})
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Parallel two-towers: the user side's weighted concatenation of its sub-towers, dotted with
/// the item side's concatenation, equals Σ w_i <u_i, v_i>, each sub-tower served on its own.
#[test]
fn parallel_two_towers_score_is_the_weighted_sum_of_sub_tower_scores() {
    let (wa_u, wb_u, wa_i, wb_i) = (vals(12, 1), vals(8, 2), vals(12, 3), vals(12, 4));
    let pw = vec![0.7f32, -1.3];
    let uf = json!([{"name": "q", "type": "dense", "dim": 4}]);
    let user = load(
        &tower("user", uf.clone(), json!([
            {"name": "a", "inputs": ["q"], "layers": [{"type": "linear", "weight": "ua"}]},
            {"name": "b", "inputs": ["q"], "layers": [{"type": "linear", "weight": "ub"}, {"type": "tanh"}]},
            {"name": "u", "inputs": ["a", "b"], "combine": "weighted_concat", "weight": "pw"}]), 5, "ip", None),
        &[("ua", vec![3, 4], wa_u.clone()), ("ub", vec![2, 4], wb_u.clone()), ("pw", vec![2], pw.clone())],
    )
    .unwrap();
    let itf =
        json!([{"name": "v", "type": "dense", "dim": 4}, {"name": "c", "type": "dense", "dim": 2}]);
    let item = load(
        &tower("item", itf.clone(), json!([
            {"name": "a", "inputs": ["v"], "layers": [{"type": "linear", "weight": "ia"}]},
            {"name": "b", "inputs": ["v", "c"], "layers": [{"type": "linear", "weight": "ib"}, {"type": "tanh"}]},
            {"name": "i", "inputs": ["a", "b"], "combine": "concat"}]), 5, "ip", None),
        &[("ia", vec![3, 4], wa_i.clone()), ("ib", vec![2, 6], wb_i.clone())],
    )
    .unwrap();
    // Each sub-tower as a plain tower of its own.
    let ua = load(
        &plain(
            "user",
            uf.clone(),
            json!([{"type": "linear", "weight": "w"}]),
            3,
        ),
        &[("w", vec![3, 4], wa_u)],
    )
    .unwrap();
    let ub = load(
        &plain(
            "user",
            uf,
            json!([{"type": "linear", "weight": "w"}, {"type": "tanh"}]),
            2,
        ),
        &[("w", vec![2, 4], wb_u)],
    )
    .unwrap();
    let itf_v = json!([{"name": "v", "type": "dense", "dim": 4}]);
    let ia = load(
        &plain("item", itf_v, json!([{"type": "linear", "weight": "w"}]), 3),
        &[("w", vec![3, 4], wa_i)],
    )
    .unwrap();
    let ib = load(
        &plain(
            "item",
            itf,
            json!([{"type": "linear", "weight": "w"}, {"type": "tanh"}]),
            2,
        ),
        &[("w", vec![2, 6], wb_i)],
    )
    .unwrap();
    for case in 0..50u64 {
        let u_in = json!({"q": vals(4, 100 + case)});
        let i_in = json!({"v": vals(4, 200 + case), "c": vals(2, 300 + case)});
        let (u, i) = (user.embed(&u_in).unwrap(), item.embed(&i_in).unwrap());
        let want = pw[0] as f64
            * dot(
                &ua.embed(&u_in).unwrap(),
                &ia.embed_with(&i_in, false).unwrap(),
            )
            + pw[1] as f64 * dot(&ub.embed(&u_in).unwrap(), &ib.embed(&i_in).unwrap());
        let got = dot(&u, &i);
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "case {case}: {got} vs {want}"
        );
    }
}

/// Attention fusion: α = softmax(W · [x_1; x_2; x_3] + b), output Σ α_i x_i; then a head.
#[test]
fn attention_fusion_matches_a_hand_computation() {
    let (w1, w2, att, bias, head) = (
        vals(6, 11),
        vals(9, 12),
        vals(27, 13),
        vals(3, 14),
        vals(9, 15),
    );
    let spec = tower(
        "user",
        json!([{"name": "x", "type": "dense", "dim": 2}, {"name": "y", "type": "dense", "dim": 3}, {"name": "n", "type": "numeric", "transform": "none"}]),
        json!([
            {"name": "head", "inputs": ["fused"], "layers": [{"type": "linear", "weight": "head"}]},
            {"name": "deep", "inputs": ["x"], "layers": [{"type": "linear", "weight": "w1"}, {"type": "relu"}]},
            {"name": "wide", "inputs": ["y"], "layers": [{"type": "linear", "weight": "w2"}]},
            {"name": "fused", "inputs": ["deep", "wide", "id3"], "combine": "attention", "weight": "att", "bias": "att_b"},
            {"name": "id3", "inputs": ["x", "n"]}]),
        3,
        "ip",
        Some("head"),
    );
    let m = load(
        &spec,
        &[
            ("w1", vec![3, 2], w1.clone()),
            ("w2", vec![3, 3], w2.clone()),
            ("att", vec![3, 9], att.clone()),
            ("att_b", vec![3], bias.clone()),
            ("head", vec![3, 3], head.clone()),
        ],
    )
    .unwrap();
    let mv = |w: &[f32], x: &[f64], n: usize| -> Vec<f64> {
        (0..n)
            .map(|r| (0..x.len()).map(|c| w[r * x.len() + c] as f64 * x[c]).sum())
            .collect()
    };
    let mut batch = Vec::new();
    let mut want_all = Vec::new();
    for case in 0..20u64 {
        let (x, y, n) = (
            vals(2, 40 + case),
            vals(3, 60 + case),
            vals(1, 80 + case)[0],
        );
        let input = json!({"x": x, "y": y, "n": n});
        let xd: Vec<f64> = x.iter().map(|v| *v as f64).collect();
        let yd: Vec<f64> = y.iter().map(|v| *v as f64).collect();
        let deep: Vec<f64> = mv(&w1, &xd, 3).into_iter().map(|v| v.max(0.0)).collect();
        let wide = mv(&w2, &yd, 3);
        let id3 = vec![xd[0], xd[1], n as f64];
        let cat: Vec<f64> = deep.iter().chain(&wide).chain(&id3).copied().collect();
        let s: Vec<f64> = mv(&att, &cat, 3)
            .iter()
            .zip(&bias)
            .map(|(a, b)| a + *b as f64)
            .collect();
        let mx = s.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
        let z: f64 = e.iter().sum();
        let fused: Vec<f64> = (0..3)
            .map(|j| (e[0] * deep[j] + e[1] * wide[j] + e[2] * id3[j]) / z)
            .collect();
        let want = mv(&head, &fused, 3);
        let got = m.embed(&input).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() <= 1e-5,
                "case {case}: {got:?} vs {want:?}"
            );
        }
        batch.push(m.encode(&input, true).unwrap());
        want_all.extend(got);
    }
    // The batched and parallel paths give the same rows.
    for other in [m.forward_batch(&batch), forward_parallel(&m, &batch, 3)] {
        for (a, b) in want_all.iter().zip(&other) {
            assert!((a - b).abs() <= 1e-6);
        }
    }
}

#[test]
fn sum_weighted_sum_and_concat_combines_and_senet_before_the_graph() {
    let fs =
        json!([{"name": "a", "type": "dense", "dim": 2}, {"name": "b", "type": "dense", "dim": 2}]);
    let g = |combine: &str, w: bool| {
        let mut node = json!({"name": "o", "inputs": ["a", "b"], "combine": combine});
        if w {
            node["weight"] = json!("w");
        }
        json!([node])
    };
    let input = json!({"a": [1.0, 2.0], "b": [10.0, 20.0]});
    let sum = load(
        &tower("user", fs.clone(), g("sum", false), 2, "ip", None),
        &[],
    )
    .unwrap();
    assert_eq!(sum.embed(&input).unwrap(), vec![11.0, 22.0]);
    let ws = load(
        &tower("user", fs.clone(), g("weighted_sum", true), 2, "ip", None),
        &[("w", vec![2], vec![2.0, 0.5])],
    )
    .unwrap();
    assert_eq!(ws.embed(&input).unwrap(), vec![7.0, 14.0]);
    let cat = load(
        &tower("user", fs.clone(), g("concat", false), 4, "ip", None),
        &[],
    )
    .unwrap();
    assert_eq!(cat.embed(&input).unwrap(), vec![1.0, 2.0, 10.0, 20.0]);
    let wc = load(
        &tower(
            "user",
            fs.clone(),
            g("weighted_concat", true),
            4,
            "ip",
            None,
        ),
        &[("w", vec![2], vec![2.0, 0.5])],
    )
    .unwrap();
    assert_eq!(wc.embed(&input).unwrap(), vec![2.0, 4.0, 5.0, 10.0]);
    // SENet weights the fields the graph reads: all-zero SENet weights give gates of 1/2.
    let mut spec = tower("user", fs, g("concat", false), 4, "ip", None);
    spec["senet"] = json!({"w1": "s1", "w2": "s2"});
    let se = load(
        &spec,
        &[
            ("s1", vec![1, 2], vec![0.0; 2]),
            ("s2", vec![2, 1], vec![0.0; 2]),
        ],
    )
    .unwrap();
    assert_eq!(se.embed(&input).unwrap(), vec![0.5, 1.0, 5.0, 10.0]);
}

/// "path: reason" as a spec error renders it (`at "path": reason`); other text as it is.
fn at(want: &str) -> String {
    match want.split_once(": ") {
        Some((p, r)) if !p.contains(' ') => format!("at \"{p}\": {r}"),
        _ => want.to_owned(),
    }
}

/// Every malformed graph is an error naming where it is.
#[test]
fn malformed_graphs_are_rejected_with_their_path() {
    let fs =
        json!([{"name": "a", "type": "dense", "dim": 2}, {"name": "b", "type": "dense", "dim": 3}]);
    let w2 = ("w", vec![2, 2], vec![1.0; 4]);
    let cases: Vec<(Value, Vec<T>, Option<&str>, &str)> = vec![
        (
            json!([{"name": "x", "inputs": ["y", "b"]}, {"name": "y", "inputs": ["x", "a"]}]),
            vec![],
            None,
            "graph: the nodes form a cycle: y -> x -> y",
        ),
        (
            json!([{"name": "x", "inputs": ["x", "a", "b"]}]),
            vec![],
            None,
            "graph: the nodes form a cycle: x -> x",
        ),
        (
            json!([{"name": "x", "inputs": ["nope", "a", "b"]}]),
            vec![],
            None,
            "graph[0].inputs[0]: \"nope\" is neither a feature nor a node",
        ),
        (
            json!([{"name": "x", "inputs": ["a"]}, {"name": "y", "inputs": ["b"]}]),
            vec![],
            None,
            "graph[0]: node \"x\" is not used by the output node \"y\"",
        ),
        (
            json!([{"name": "x", "inputs": ["a"]}]),
            vec![],
            None,
            "features[1]: feature \"b\" is not an input of any graph node",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "b"]}, {"name": "x", "inputs": ["x"]}]),
            vec![],
            None,
            "graph[1].name: duplicate node name \"x\"",
        ),
        (
            json!([{"name": "a", "inputs": ["a", "b"]}]),
            vec![],
            None,
            "graph[0].name: \"a\" is already a feature name",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "b"], "combine": "sum"}]),
            vec![],
            None,
            "graph[0].inputs: the inputs of this combine must have one width",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "b"], "combine": "mean"}]),
            vec![],
            None,
            "graph[0].combine: must be one of concat, sum",
        ),
        (
            json!([{"name": "x", "inputs": ["a"], "combine": "concat"}, {"name": "y", "inputs": ["x", "b"]}]),
            vec![],
            None,
            "graph[0].inputs: a combine node joins at least two inputs",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "b"], "combine": "weighted_sum"}]),
            vec![],
            None,
            "graph[0].weight: required key is missing",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "b"], "layers": [], "combine": "concat"}]),
            vec![],
            None,
            "not both",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "b"], "layers": [{"type": "shortcut", "fields": ["a"]}]}]),
            vec![],
            None,
            "graph[0].layers[0].type: a graph node cannot have a shortcut layer",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "b"], "layers": [{"type": "linear", "weight": "w"}]}]),
            vec![w2.clone()],
            None,
            "tensor \"w\"",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "a", "b"]}]),
            vec![],
            None,
            "graph[0].inputs[1]: \"a\" is listed twice",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "b"]}]),
            vec![],
            Some("z"),
            "output.node: \"z\" is not a node of the graph",
        ),
        (json!([]), vec![], None, "graph: must list 1 to 64 nodes"),
        (
            json!([{"name": "x", "inputs": ["a", "b"], "kind": "mlp"}]),
            vec![],
            None,
            "graph[0].kind: unknown key",
        ),
    ];
    for (graph, ts, node, want) in cases {
        let spec = tower("user", fs.clone(), graph.clone(), 5, "ip", node);
        let err = load(&spec, &ts)
            .err()
            .unwrap_or_else(|| panic!("{graph} was accepted"))
            .to_string();
        assert!(err.contains(&at(want)), "{graph}: {err} (wanted {want})");
    }
    // Output width, layers next to a graph, a node name for a spec without a graph.
    let ok = json!([{"name": "x", "inputs": ["a", "b"]}]);
    let err = load(&tower("user", fs.clone(), ok.clone(), 4, "ip", None), &[])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&at(
            "output.dim: is 4, but the graph's output node produces a vector of width 5"
        )),
        "{err}"
    );
    let mut spec = tower("user", fs.clone(), ok, 5, "ip", None);
    spec["layers"] = json!([{"type": "relu"}]);
    let err = load(&spec, &[]).err().unwrap().to_string();
    assert!(
        err.contains(&at("layers: a spec with a \"graph\"")),
        "{err}"
    );
    let mut spec = plain("user", fs, json!([]), 5);
    spec["output"]["node"] = json!("x");
    let err = load(&spec, &[]).err().unwrap().to_string();
    assert!(
        err.contains(&at("output.node: only a spec with a \"graph\"")),
        "{err}"
    );
}
