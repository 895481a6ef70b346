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

fn prerank(features: Value, graph: Value, output: Value) -> Value {
    json!({"format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
           "features": features, "graph": graph, "output": output})
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Multi-task pre-ranking: a scene gate (`scale`) over the shared input, two experts, a `gate`
/// per task over the experts from the scene, a head per task; the outputs, each task's score
/// and the fused score against a hand computation.
#[test]
fn scene_gate_expert_gates_and_tasks_match_a_hand_computation() {
    let fs = json!([{"name": "x", "type": "dense", "dim": 3},
                    {"name": "scene", "type": "dense", "dim": 2}]);
    let graph = json!([
        {"name": "sx", "inputs": ["x"], "gate_inputs": ["scene"], "combine": "scale",
         "weight": "s.w", "bias": "s.b"},
        {"name": "e0", "inputs": ["sx"], "layers": [{"type": "linear", "weight": "e0.w"}]},
        {"name": "e1", "inputs": ["sx"], "layers": [{"type": "linear", "weight": "e1.w"}, {"type": "tanh"}]},
        {"name": "g0", "inputs": ["e0", "e1"], "gate_inputs": ["scene"], "combine": "gate",
         "weight": "g0.w", "bias": "g0.b"},
        {"name": "g1", "inputs": ["e0", "e1"], "gate_inputs": ["scene", "x"], "combine": "gate",
         "weight": "g1.w"},
        {"name": "h0", "inputs": ["g0"], "layers": [{"type": "linear", "weight": "h0.w", "bias": "h0.b"}]},
        {"name": "h1", "inputs": ["g1"], "layers": [{"type": "linear", "weight": "h1.w"}]},
        {"name": "out", "inputs": ["h0", "h1"], "combine": "concat"}]);
    let output = json!({"dim": 2, "node": "out", "tasks": [
        {"name": "click", "fuse": 1.0}, {"name": "minutes", "link": "identity", "fuse": -0.25}]});
    let t: Vec<T> = vec![
        ("s.w", vec![3, 2], vals(6, 11)),
        ("s.b", vec![3], vals(3, 12)),
        ("e0.w", vec![2, 3], vals(6, 13)),
        ("e1.w", vec![2, 3], vals(6, 14)),
        ("g0.w", vec![2, 2], vals(4, 15)),
        ("g0.b", vec![2], vals(2, 16)),
        ("g1.w", vec![2, 5], vals(10, 17)),
        ("h0.w", vec![1, 2], vals(2, 18)),
        ("h0.b", vec![1], vals(1, 19)),
        ("h1.w", vec![1, 2], vals(2, 20)),
    ];
    let model = load(&prerank(fs, graph, output), &t).unwrap();
    assert_eq!(model.output_dim(), 2);
    let names: Vec<&str> = model.tasks().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["click", "minutes"]);
    let w = |n: &str| -> Vec<f64> {
        t.iter()
            .find(|x| x.0 == n)
            .unwrap()
            .2
            .iter()
            .map(|v| *v as f64)
            .collect()
    };
    let mv = |w: &[f64], b: Option<&[f64]>, x: &[f64], n: usize| -> Vec<f64> {
        (0..n)
            .map(|o| {
                let k = x.len();
                (0..k).map(|i| w[o * k + i] * x[i]).sum::<f64>() + b.map_or(0.0, |b| b[o])
            })
            .collect()
    };
    let softmax = |s: &[f64]| -> Vec<f64> {
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    };
    for (x, scene) in [
        ([0.3, -1.2, 0.8], [1.0, 0.0]),
        ([0.3, -1.2, 0.8], [0.0, 1.0]),
    ] {
        let input = json!({"x": x, "scene": scene});
        let got = model.forward(&model.encode(&input, true).unwrap());
        let f = mv(&w("s.w"), Some(&w("s.b")), &scene, 3);
        let sx: Vec<f64> = x
            .iter()
            .zip(&f)
            .map(|(v, f)| v * 2.0 * sigmoid(*f))
            .collect();
        let e0 = mv(&w("e0.w"), None, &sx, 2);
        let e1: Vec<f64> = mv(&w("e1.w"), None, &sx, 2)
            .iter()
            .map(|v| v.tanh())
            .collect();
        let mix = |a: &[f64]| -> Vec<f64> { (0..2).map(|j| a[0] * e0[j] + a[1] * e1[j]).collect() };
        let g0 = mix(&softmax(&mv(&w("g0.w"), Some(&w("g0.b")), &scene, 2)));
        let gin: Vec<f64> = scene.iter().chain(x.iter()).copied().collect();
        let g1 = mix(&softmax(&mv(&w("g1.w"), None, &gin, 2)));
        let h0 = mv(&w("h0.w"), Some(&w("h0.b")), &g0, 1)[0];
        let h1 = mv(&w("h1.w"), None, &g1, 1)[0];
        assert!((got[0] as f64 - h0).abs() < 1e-5, "{got:?} vs {h0}");
        assert!((got[1] as f64 - h1).abs() < 1e-5, "{got:?} vs {h1}");
        let click = model.scores(&got, model.score_by(Some("click")).unwrap());
        let minutes = model.scores(&got, model.score_by(Some("minutes")).unwrap());
        let fused = model.scores(&got, model.score_by(None).unwrap());
        assert!((click[0] as f64 - sigmoid(h0)).abs() < 1e-6);
        assert!((minutes[0] as f64 - h1).abs() < 1e-6);
        let want = sigmoid(h0) - 0.25 * h1;
        assert!((fused[0] as f64 - want).abs() < 1e-6, "{fused:?} vs {want}");
        assert_eq!(model.score_by(Some("fused")), model.score_by(None));
        assert_eq!(model.score_by(Some("nope")), None);
    }
    // The scene changes the output (the gates read it).
    let a = model.forward(
        &model
            .encode(&json!({"x": [0.3, -1.2, 0.8], "scene": [1, 0]}), true)
            .unwrap(),
    );
    let b = model.forward(
        &model
            .encode(&json!({"x": [0.3, -1.2, 0.8], "scene": [0, 1]}), true)
            .unwrap(),
    );
    assert!(
        (a[0] - b[0]).abs() > 1e-4 && (a[1] - b[1]).abs() > 1e-4,
        "{a:?} {b:?}"
    );
}

/// A gate whose logits are equal averages its experts; a scale with zero weights and bias is
/// the identity; a one-score pre-rank model's score is its output.
#[test]
fn gate_and_scale_limits() {
    let fs = json!([{"name": "a", "type": "dense", "dim": 2}, {"name": "b", "type": "dense", "dim": 2},
                    {"name": "g", "type": "dense", "dim": 1}]);
    let graph = json!([
        {"name": "s", "inputs": ["a", "b"], "gate_inputs": ["g"], "combine": "scale", "weight": "sw"},
        {"name": "m", "inputs": ["a", "b"], "gate_inputs": ["g"], "combine": "gate", "weight": "gw"},
        {"name": "out", "inputs": ["s", "m"], "combine": "concat"}]);
    let model = load(
        &tower("user", fs, graph, 6, "ip", None),
        &[
            ("sw", vec![4, 1], vec![0.0; 4]),
            ("gw", vec![2, 1], vec![0.5, 0.5]),
        ],
    )
    .unwrap();
    let y = model.forward(
        &model
            .encode(&json!({"a": [1, 2], "b": [3, -5], "g": [7]}), true)
            .unwrap(),
    );
    let want = [1.0, 2.0, 3.0, -5.0, 2.0, -1.5];
    for (g, w) in y.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{y:?}");
    }
}

/// Every malformed gate, scale and task list is an error naming where it is.
#[test]
fn malformed_gates_and_tasks_are_rejected_with_their_path() {
    let fs = json!([{"name": "a", "type": "dense", "dim": 2}, {"name": "b", "type": "dense", "dim": 3},
                    {"name": "g", "type": "dense", "dim": 1}]);
    let gw = ("gw", vec![2, 1], vec![0.1, 0.2]);
    let cases: Vec<(Value, Vec<T>, &str)> = vec![
        (
            json!([{"name": "x", "inputs": ["a", "b"], "gate_inputs": ["g"], "combine": "gate", "weight": "gw"}]),
            vec![gw.clone()],
            "graph[0].inputs: the inputs of this combine must have one width, got [2, 3]",
        ),
        (
            json!([{"name": "x", "inputs": ["a"], "gate_inputs": ["g"], "combine": "gate", "weight": "gw"},
                   {"name": "y", "inputs": ["x", "b"], "combine": "concat"}]),
            vec![gw.clone()],
            "graph[0].inputs: a combine node joins at least two inputs",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "b"], "gate_inputs": ["g"], "combine": "sum"}]),
            vec![],
            "graph[0].gate_inputs: only a \"gate\" or \"scale\" node has gate inputs",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "b", "g"], "combine": "scale", "weight": "gw"}]),
            vec![gw.clone()],
            "graph[0].gate_inputs: a \"gate\" or \"scale\" node computes its weights from \"gate_inputs\"",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "b"], "gate_inputs": ["g", "g"], "combine": "scale", "weight": "gw"}]),
            vec![gw.clone()],
            "graph[0].gate_inputs[1]: \"g\" is listed twice",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "b"], "gate_inputs": ["g"], "combine": "scale", "weight": "gw"}]),
            vec![gw.clone()],
            "tensor \"gw\" has shape [2, 1]",
        ),
        (
            json!([{"name": "x", "inputs": ["a", "b"], "gate_inputs": ["x"], "combine": "scale", "weight": "gw"},
                   {"name": "y", "inputs": ["x", "g"], "combine": "concat"}]),
            vec![gw.clone()],
            "graph: the nodes form a cycle: x -> x",
        ),
    ];
    for (graph, ts, want) in &cases {
        let err = load(&tower("user", fs.clone(), graph.clone(), 6, "ip", None), ts)
            .err()
            .unwrap_or_else(|| panic!("{graph} loaded"))
            .to_string();
        assert!(
            err.contains(&at(want)) || err.contains(want),
            "{graph}: {err} (wanted {want})"
        );
    }
    // Tasks.
    let graph = json!([{"name": "h", "inputs": ["a", "b", "g"], "layers": [{"type": "linear", "weight": "hw"}]}]);
    let hw = |n: usize| vec![("hw", vec![n, 6], vec![0.1; n * 6])];
    let task = |name: &str| json!({"name": name});
    let outputs: Vec<(Value, usize, &str)> = vec![
        (
            json!({"dim": 2, "tasks": [task("a"), task("a")]}),
            2,
            "output.tasks[1].name: duplicate task name \"a\"",
        ),
        (
            json!({"dim": 1, "tasks": [task("fused")]}),
            1,
            "output.tasks[0].name: \"fused\" is not a valid task name",
        ),
        (
            json!({"dim": 2, "tasks": [task("a"), task("b c")]}),
            2,
            "output.tasks[1].name: \"b c\" is not a valid task name",
        ),
        (
            json!({"dim": 3, "tasks": [task("a"), task("b")]}),
            3,
            "output.dim: must be",
        ),
        (json!({"dim": 2}), 2, "output.dim: must be"),
        (
            json!({"dim": 1, "tasks": []}),
            1,
            "output.tasks: must list 1 to 16 tasks, got 0",
        ),
        (
            json!({"dim": 2, "tasks": [{"name": "a", "fuse": 0}, {"name": "b", "fuse": 0.0}]}),
            2,
            "output.tasks: every \"fuse\" weight is 0",
        ),
        (
            json!({"dim": 1, "tasks": [{"name": "a", "link": "softmax"}]}),
            1,
            "output.tasks[0].link: must be \"sigmoid\" or \"identity\", got \"softmax\"",
        ),
        (
            json!({"dim": 1, "tasks": [{"name": "a", "fuse": "1"}]}),
            1,
            "output.tasks[0].fuse",
        ),
        (
            json!({"dim": 1, "tasks": [{"name": "a", "weight": 1}]}),
            1,
            "output.tasks[0]",
        ),
    ];
    for (output, n, want) in outputs {
        let err = load(&prerank(fs.clone(), graph.clone(), output.clone()), &hw(n))
            .err()
            .unwrap_or_else(|| panic!("{output} loaded"))
            .to_string();
        assert!(
            err.contains(&at(want)) || err.contains(want),
            "{output}: {err} (wanted {want})"
        );
    }
    // Tasks belong to pre-rank models only.
    let mut spec = tower("user", fs.clone(), graph.clone(), 2, "ip", None);
    spec["output"]["tasks"] = json!([task("a"), task("b")]);
    let err = load(&spec, &hw(2)).err().unwrap().to_string();
    assert!(err.contains("tasks"), "{err}");
    // One task is a valid multi-task model (its fused score is fuse·link).
    let m = load(
        &prerank(
            fs,
            graph,
            json!({"dim": 1, "tasks": [{"name": "a", "fuse": 2}]}),
        ),
        &hw(1),
    )
    .unwrap();
    let s = m.scores(&[0.0], m.score_by(None).unwrap());
    assert!((s[0] - 1.0).abs() < 1e-7, "{s:?}");
}
