//! Gradient checks against central finite differences: every layer, every pooling, every loss
//! and the logQ terms.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use twotower_tower::layers::Activation;
use twotower_tower::{Encoded, Model};
use twotower_train::config::{
    Branch, Bucketing, Debias, Decay, FeatureSpec, Fusion, NegativeFeedback, NumTransform,
    TowerSpec,
};
use twotower_train::loss::{self, LossKind, Scores};
use twotower_train::model::{self, FeatureStats};
use twotower_train::net::{Pooling, Tower};

fn stats() -> FeatureStats {
    let mut s = FeatureStats::default();
    for (f, ids) in [
        ("uid", vec!["1", "2", "3"]),
        ("tags", vec!["a", "b", "c", "d"]),
        ("hist", vec!["x", "y", "z"]),
        ("bag", vec!["p", "q"]),
    ] {
        s.counts.insert(
            f.into(),
            ids.into_iter().map(|i| (i.to_string(), 1)).collect(),
        );
    }
    s.moments.insert("age".into(), (60.0, 1400.0, 3));
    s
}

fn tower_spec(act: Activation, layer_norm: bool, hidden: Vec<usize>) -> TowerSpec {
    TowerSpec {
        features: vec![
            FeatureSpec::Categorical {
                name: "uid".into(),
                dim: 3,
            },
            FeatureSpec::Multi {
                name: "tags".into(),
                dim: 2,
                pooling: Pooling::Mean,
                max_len: 10,
            },
            FeatureSpec::Multi {
                name: "bag".into(),
                dim: 2,
                pooling: Pooling::Sum,
                max_len: 10,
            },
            FeatureSpec::History {
                name: "hist".into(),
                dim: 3,
                max_len: 5,
                pooling: Pooling::Mean,
                decay: Decay::Position(0.7),
                negative: false,
            },
            FeatureSpec::Numeric {
                name: "age".into(),
                transform: NumTransform::Zscore,
            },
        ],
        hidden,
        activation: act,
        layer_norm,
        dropout: 0.0,
        shortcut: Vec::new(),
        senet: 0,
        batch_norm: false,
        sources: Vec::new(),
        branches: Vec::new(),
        fusion: Fusion::Attention,
        multitask: None,
    }
}

fn inputs(m: &Model) -> Vec<Encoded> {
    [
        json!({"uid": 1, "tags": ["a", "b"], "bag": ["p", "q", "p"], "hist": {"ids": ["x", "y"], "weights": [1.0, 0.7]}, "age": 25,
               "price": 3.5, "vec": [0.5, -1.0, 2.0]}),
        json!({"uid": "3", "tags": ["c"], "bag": [], "hist": {"ids": ["z", "x", "y"], "weights": [1.0, 0.7, 0.49]}, "age": 17.5,
               "price": 12, "vec": [1.5, 0.25, -0.5]}),
        json!({"uid": 2, "tags": ["d", "a", "zz"], "bag": ["q"], "hist": {"ids": [], "weights": []}, "price": 0.5}),
        json!({"uid": 1, "tags": ["b"], "bag": ["p"], "hist": {"ids": ["y"], "weights": [1.0]}, "age": 40, "vec": [-0.3, 0.8, 0.1]}),
    ]
    .iter()
    .map(|v| m.encode(v, false).unwrap())
    .collect()
}

/// L = Σ out ⊙ R for a fixed R; returns L in f64 (training mode: dropout masks from seed 5).
fn objective(t: &Tower, xs: &[&Encoded], r: &[f32]) -> f64 {
    t.forward_train(xs, 5)
        .output()
        .iter()
        .zip(r)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum()
}

fn check_tower(act: Activation, layer_norm: bool, hidden: Vec<usize>) {
    check_spec(tower_spec(act, layer_norm, hidden));
}

fn check_spec(spec: TowerSpec) {
    check_kind(spec, "user");
}

fn check_kind(spec: TowerSpec, kind: &str) {
    check_with(spec, kind, 1e-2);
}

/// `eps` is the finite difference's step.
fn check_with(spec: TowerSpec, kind: &str, eps: f32) {
    let (act, layer_norm) = (spec.activation, spec.layer_norm);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let plan = model::plan(kind, &spec, 4, &stats(), 1, 100, 0.5, &mut rng).unwrap();
    let (spec, st) = model::export(&plan, &plan.tower).unwrap();
    let m = Model::load(&spec, &st).unwrap();
    let enc = inputs(&m);
    let xs: Vec<&Encoded> = enc.iter().collect();
    check_grads(
        plan.tower.clone(),
        &xs,
        4,
        eps,
        &format!("{act:?}, layer_norm {layer_norm}"),
        &mut rng,
    );
}

/// Central differences against the analytic gradient of L = Σ out ⊙ R, for every dense
/// parameter and every table row, with the parameters moved off their initial values.
fn check_grads(
    mut t: Tower,
    xs: &[&Encoded],
    out_dim: usize,
    eps: f32,
    label: &str,
    rng: &mut ChaCha8Rng,
) -> twotower_train::net::Grads {
    let xs = xs.to_vec();
    // LayerNorm starts at g = 1, b = 0: move it so its gradient is checked at a general point.
    for p in t.dense_params_mut() {
        for x in p.iter_mut() {
            *x += rng.gen_range(-0.3..0.3);
        }
    }
    let r: Vec<f32> = (0..xs.len() * out_dim)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let cache = t.forward_train(&xs, 5);
    let g = t.backward(&cache, &r);

    let close = |num: f64, ana: f64, what: &str| {
        assert!(
            (num - ana).abs() <= 2e-3 + 2e-2 * num.abs().max(ana.abs()),
            "{what}: numeric {num} vs analytic {ana} ({label})"
        );
    };
    let n_dense = t.dense_params().len();
    for pi in 0..n_dense {
        let len = t.dense_params()[pi].len();
        for k in 0..len {
            let orig = t.dense_params()[pi][k];
            t.dense_params_mut()[pi][k] = orig + eps;
            let lp = objective(&t, &xs, &r);
            t.dense_params_mut()[pi][k] = orig - eps;
            let lm = objective(&t, &xs, &r);
            t.dense_params_mut()[pi][k] = orig;
            close(
                (lp - lm) / (2.0 * eps as f64),
                g.dense[pi][k] as f64,
                &format!("dense param {pi}[{k}]"),
            );
        }
    }
    let mut checked_rows = 0;
    for ti in 0..t.tables.len() {
        let dim = t.tables[ti].dim;
        for row in 0..t.tables[ti].rows {
            for k in 0..dim {
                let idx = row * dim + k;
                let orig = t.tables[ti].w[idx];
                t.tables[ti].w[idx] = orig + eps;
                let lp = objective(&t, &xs, &r);
                t.tables[ti].w[idx] = orig - eps;
                let lm = objective(&t, &xs, &r);
                t.tables[ti].w[idx] = orig;
                let num = (lp - lm) / (2.0 * eps as f64);
                let ana = g.rows[ti].get(&(row as u32)).map_or(0.0, |v| v[k] as f64);
                close(
                    num,
                    ana,
                    &format!("table {} row {row}[{k}]", t.tables[ti].name),
                );
                if ana != 0.0 {
                    checked_rows += 1;
                }
            }
        }
    }
    assert!(
        t.tables.is_empty() || checked_rows > 20,
        "the check saw non-zero row gradients"
    );
    g
}

#[test]
fn tower_gradients_tanh_layernorm() {
    check_tower(Activation::Tanh, true, vec![5]);
}

#[test]
fn tower_gradients_gelu_two_hidden() {
    check_tower(Activation::Gelu, false, vec![6, 5]);
}

#[test]
fn tower_gradients_sigmoid() {
    check_tower(Activation::Sigmoid, true, vec![5]);
}

#[test]
fn tower_gradients_relu() {
    // ReLU has kinks: with random weights no pre-activation lands within eps of 0 here (the
    // check would fail loudly if one did).
    check_tower(Activation::Relu, false, vec![7]);
}

#[test]
fn tower_gradients_with_shortcut_and_dropout() {
    let mut spec = tower_spec(Activation::Tanh, false, vec![6, 5]);
    // Max pooling too (its kinks, where two rows tie, are not hit by these inputs).
    spec.features[1] = FeatureSpec::Multi {
        name: "tags".into(),
        dim: 2,
        pooling: Pooling::Max,
        max_len: 10,
    };
    spec.dropout = 0.3;
    spec.shortcut = vec!["age".into(), "tags".into()];
    check_spec(spec);
}

#[test]
fn tower_gradients_with_senet() {
    let mut spec = tower_spec(Activation::Tanh, true, vec![5]);
    spec.senet = 3;
    spec.shortcut = vec!["age".into()];
    check_spec(spec);
}

#[test]
fn tower_gradients_with_batch_norm() {
    // Training mode: the batch statistics depend on every row, so each row's gradient has
    // terms through the other rows.
    let mut spec = tower_spec(Activation::Gelu, false, vec![6, 5]);
    spec.batch_norm = true;
    check_spec(spec);
}

#[test]
fn tower_gradients_with_bucketize_and_dense_features() {
    let mut spec = tower_spec(Activation::Tanh, false, vec![5]);
    spec.features.push(FeatureSpec::Bucketize {
        name: "price".into(),
        dim: 2,
        boundaries: Bucketing::Given(vec![1.0, 5.0, 10.0]),
    });
    spec.features.push(FeatureSpec::Dense {
        name: "vec".into(),
        dim: 3,
    });
    // (With 2 or 3 hidden units one SENet pre-activation lies within eps of ReLU's kink.)
    spec.senet = 4;
    spec.shortcut = vec!["vec".into()];
    check_spec(spec);
}

#[test]
fn tower_gradients_without_hidden_layers() {
    check_tower(Activation::Relu, false, vec![]);
}

/// Two branches over overlapping feature subsets (one with hidden layers), joined by `fusion`.
fn branched(fusion: Fusion, act: Activation) -> TowerSpec {
    let mut spec = tower_spec(act, false, vec![]);
    spec.branches = vec![
        Branch {
            name: "deep".into(),
            features: vec![0, 1, 3],
            hidden: vec![5],
        },
        Branch {
            name: "wide".into(),
            features: vec![0, 2, 4],
            hidden: vec![],
        },
    ];
    spec.fusion = fusion;
    spec
}

#[test]
fn graph_gradients_attention_fusion() {
    // The attention's softmax weights, its W and b, and both branches under it.
    check_spec(branched(Fusion::Attention, Activation::Tanh));
}

#[test]
fn graph_gradients_sum_and_weighted_sum() {
    check_spec(branched(Fusion::Sum, Activation::Gelu));
    check_spec(branched(Fusion::WeightedSum, Activation::Tanh));
}

#[test]
fn graph_gradients_concat_with_head_senet_and_norms() {
    let mut spec = branched(Fusion::Concat, Activation::Tanh);
    spec.hidden = vec![3];
    spec.senet = 3;
    spec.layer_norm = true;
    check_spec(spec.clone());
    // BatchNorm and dropout inside the branches and the head. Over 4 rows a batch-normalised
    // column of the head has a small variance, so the loss curves sharply there: a smaller
    // step (with 1e-2 the central difference is off by 15 %, and differs between 1e-2 and
    // 3e-3; it settles from 1e-3 down).
    spec.layer_norm = false;
    spec.batch_norm = true;
    spec.dropout = 0.25;
    spec.senet = 0;
    check_with(spec, "user", 1e-3);
}

#[test]
fn graph_gradients_parallel_two_towers() {
    // The user side: a learned weighted concat of normalised sub-vectors; the item side: a
    // plain concat.
    let mut spec = branched(Fusion::Parallel, Activation::Tanh);
    spec.branches[1].hidden = vec![3];
    check_kind(spec.clone(), "user");
    check_kind(spec, "item");
}

/// A multi-task pre-rank model: the scene gate (`scale`), shared and task experts, a softmax
/// gate per task, task heads and the tasks' outputs side by side; and MMoE without a scene
/// (gates over every field), and shared-bottom (one expert, no gate).
#[test]
fn multitask_gradients_scene_gate_experts_gates_heads() {
    use twotower_train::config::MultiTask;
    let task = |n: &str| twotower_tower::Task {
        name: n.into(),
        link: twotower_tower::Link::Sigmoid,
        fuse: 1.0,
    };
    let base = tower_spec(Activation::Tanh, false, vec![4]);
    let mut spec = TowerSpec {
        sources: vec![twotower_tower::Source::User; base.features.len()],
        ..base
    };
    spec.features[0] = FeatureSpec::Categorical {
        name: "uid".into(),
        dim: 3,
    };
    for (shared, per_task, scene, hidden) in [
        (2, 1, Some(0), vec![2]),
        (3, 0, None, vec![]),
        (1, 0, Some(0), vec![3]),
    ] {
        spec.multitask = Some(MultiTask {
            tasks: vec![task("a"), task("b"), task("c")],
            shared,
            per_task,
            task_hidden: hidden,
            scene,
        });
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let plan = model::plan_prerank(&spec, 4, &stats(), 1, 100, 0.5, &mut rng).unwrap();
        let (sj, st) = model::export(&plan, &plan.tower).unwrap();
        let m = Model::load(&sj, &st).unwrap();
        assert_eq!(m.output_dim(), 3);
        let enc = inputs(&m);
        let xs: Vec<&Encoded> = enc.iter().collect();
        check_grads(
            plan.tower.clone(),
            &xs,
            3,
            1e-2,
            &format!("multi-task {shared}+{per_task}, scene {scene:?}"),
            &mut rng,
        );
        // The served model computes what the trained network computes.
        let want = plan.tower.forward(&xs);
        for (x, w) in enc.iter().zip(want.output().chunks_exact(3)) {
            let got = m.forward(x);
            for (g, w) in got.iter().zip(w) {
                assert!((g - w).abs() < 1e-5, "{got:?} vs {w}");
            }
        }
    }
}

fn check_loss(kind: LossKind, b: usize, negatives: usize, logq_on: bool) {
    check_loss_feedback(kind, b, negatives, logq_on, 0, 0);
}

/// [`check_loss`] with `f` negative-feedback rows (and their columns) after the positives, and
/// `p` debiasing pair columns (rows 0, 2, 4, … each get one) before the feedback columns.
fn check_loss_feedback(
    kind: LossKind,
    b: usize,
    negatives: usize,
    logq_on: bool,
    f: usize,
    p: usize,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let c = b + negatives + p + f;
    let s: Vec<f32> = (0..(b + f) * c).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let logq: Vec<f32> = (0..c)
        .map(|_| {
            if logq_on {
                rng.gen_range(-3.0..0.0)
            } else {
                0.0
            }
        })
        .collect();
    // Item 3 appears twice among the positives and once among the negatives (masked columns).
    let mut items: Vec<u32> = (0..c as u32).map(|i| i + 10).collect();
    items[1] = 3;
    items[2] = 3;
    if negatives > 0 {
        items[b] = 3;
    }
    let weights: Vec<f32> = (0..b + f).map(|i| 0.5 + i as f32 * 0.25).collect();
    // Softmax: the two columns before the feedback ones are row 0's own (hard) negatives;
    // others are shared. Feedback column c − f + r belongs to feedback row b + r.
    let owner: Vec<i32> = (0..c)
        .map(|j| {
            if j >= c - f {
                (b + j - (c - f)) as i32
            } else if j >= c - f - p {
                i32::MAX
            } else if !kind.per_row_negatives() && negatives >= 2 && j + 2 >= c - f - p {
                0
            } else {
                -1
            }
        })
        .collect();
    let nf = NegativeFeedback {
        weight: 0.7,
        margin: 0.1,
        temperature: 0.2,
    };
    let pairs: Vec<i32> = (0..b)
        .map(|i| {
            if i % 2 == 0 && i / 2 < p {
                (c - f - p + i / 2) as i32
            } else {
                -1
            }
        })
        .collect();
    let debias = Debias {
        weight: 0.6,
        head: 0.2,
        temperature: 0.25,
    };
    let eval_full = |s: &[f32], f: usize, with_pairs: bool| {
        loss::loss(
            kind,
            &Scores {
                s,
                b,
                c,
                logq: &logq,
                items: &items,
                owner: &owner,
                weights: &weights,
                temperature: 0.3,
                feedback: f,
                nf,
                paired: p,
                pairs: if with_pairs { &pairs } else { &[] },
                debias: with_pairs.then_some(debias),
            },
        )
    };
    let eval_f = |s: &[f32], f: usize| eval_full(s, f, p > 0);
    if p > 0 {
        // The pair term on its own, from its definition: the weighted mean over all positive
        // rows of weight · ln(1 + exp(−(s⁺ − s_pop) / temperature)) (rows without a pair add 0).
        let wp: f64 = weights[..b].iter().map(|&w| w as f64).sum();
        let mut want = 0f64;
        for (i, &j) in pairs.iter().enumerate() {
            if j >= 0 {
                let z = (s[i * c + i] as f64 - s[i * c + j as usize] as f64)
                    / debias.temperature as f64;
                want += debias.weight as f64 * weights[i] as f64 / wp * (1.0 + (-z).exp()).ln();
            }
        }
        let got = eval_full(&s, f, true).0 - eval_full(&s, f, false).0;
        assert!(
            (got - want).abs() < 1e-9,
            "{kind:?}: pair term {got} vs {want}"
        );
    }
    let eval = |s: &[f32]| eval_f(s, f);
    if f > 0 {
        // The feedback term on its own, from its definition: the mean over the feedback rows
        // (weighted) of weight · ln(1 + exp((s − margin) / temperature)).
        let wf: f64 = weights[b..].iter().map(|&w| w as f64).sum();
        let mut want = 0f64;
        for r in 0..f {
            let z = (s[(b + r) * c + c - f + r] as f64 - nf.margin as f64) / nf.temperature as f64;
            want += nf.weight as f64 * weights[b + r] as f64 / wf * (1.0 + z.exp()).ln();
        }
        // Without the feedback rows the positives' loss is the same (their columns are masked
        // out of every positive row by their owner).
        let positives = eval_f(&s[..b * c], 0).0;
        let got = eval(&s).0 - positives;
        assert!(
            (got - want).abs() < 1e-9,
            "{kind:?}: feedback term {got} vs {want}"
        );
    }
    let (_, ds) = eval(&s);
    let eps = 1e-3f32;
    let mut nonzero = 0;
    for k in 0..s.len() {
        let mut sp = s.clone();
        sp[k] += eps;
        let mut sm = s.clone();
        sm[k] -= eps;
        let num = (eval(&sp).0 - eval(&sm).0) / (2.0 * eps as f64);
        let ana = ds[k] as f64;
        assert!(
            (num - ana).abs() <= 1e-4 + 1e-3 * num.abs(),
            "{kind:?} dS[{k}]: numeric {num} vs analytic {ana}"
        );
        if ana != 0.0 {
            nonzero += 1;
        }
    }
    assert!(nonzero > b, "{kind:?}: gradients flow");
    for (i, &j) in pairs.iter().enumerate() {
        // A pair column gets gradient from its own row only.
        if j >= 0 {
            for r in 0..b + f {
                let g = ds[r * c + j as usize];
                assert_eq!(g != 0.0, r == i, "{kind:?}: pair column {j}, row {r}: {g}");
            }
        }
    }
    for r in 0..f {
        let j = c - f + r;
        for i in 0..b + f {
            let g = ds[i * c + j];
            assert_eq!(
                g != 0.0,
                i == b + r,
                "{kind:?}: feedback column {j}, row {i}: {g}"
            );
        }
        let row = &ds[(b + r) * c..(b + r + 1) * c];
        assert_eq!(
            row.iter().filter(|&&g| g != 0.0).count(),
            1,
            "{kind:?}: feedback row {r} scores its own column only"
        );
    }
    if f == 0 && p == 0 && owner.iter().any(|&o| o >= 0) {
        // A row's own columns get gradient from that row only.
        for i in 1..b {
            assert_eq!(
                ds[i * c + c - 1],
                0.0,
                "row {i} does not score row 0's hard negative"
            );
        }
        assert!(ds[c - 1] != 0.0, "row 0 scores its hard negative");
    }
}

#[test]
fn negative_feedback_next_to_every_loss() {
    let kinds = [
        (
            LossKind::Softmax {
                in_batch: true,
                logq: true,
            },
            0,
        ),
        (
            LossKind::Softmax {
                in_batch: true,
                logq: true,
            },
            4,
        ),
        (LossKind::Pointwise, 2),
        (LossKind::TripletHinge { margin: 0.3 }, 2),
        (LossKind::TripletLogistic, 2),
    ];
    for (kind, per) in kinds {
        let negatives = if kind.per_row_negatives() {
            per * 5
        } else {
            per
        };
        check_loss_feedback(kind, 5, negatives, true, 3, 0);
        check_loss_feedback(kind, 5, negatives, true, 0, 3);
        check_loss_feedback(kind, 5, negatives, true, 3, 3);
    }
}

#[test]
fn softmax_in_batch_with_logq() {
    check_loss(
        LossKind::Softmax {
            in_batch: true,
            logq: true,
        },
        5,
        0,
        true,
    );
}

#[test]
fn softmax_mixed_in_batch_and_global_with_logq() {
    check_loss(
        LossKind::Softmax {
            in_batch: true,
            logq: true,
        },
        4,
        6,
        true,
    );
}

#[test]
fn sampled_softmax_global_only() {
    check_loss(
        LossKind::Softmax {
            in_batch: false,
            logq: true,
        },
        4,
        6,
        true,
    );
}

#[test]
fn pointwise_sigmoid() {
    check_loss(LossKind::Pointwise, 4, 8, false);
}

#[test]
fn triplet_logistic() {
    check_loss(LossKind::TripletLogistic, 4, 8, false);
}

#[test]
fn triplet_hinge() {
    // Hinge has a kink at margin: with random scores no term lands within eps of it.
    check_loss(LossKind::TripletHinge { margin: 0.2 }, 4, 8, false);
}

#[test]
fn score_backprop() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (b, c, d) = (3, 5, 4);
    let u: Vec<f32> = (0..b * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let v: Vec<f32> = (0..c * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let r: Vec<f32> = (0..b * c).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let f = |u: &[f32], v: &[f32]| -> f64 {
        loss::scores(u, b, v, c, d)
            .iter()
            .zip(&r)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    let (du, dv) = loss::backprop_scores(&r, &u, b, &v, c, d);
    let eps = 1e-2;
    for k in 0..u.len() {
        let (mut p, mut m) = (u.clone(), u.clone());
        p[k] += eps;
        m[k] -= eps;
        let num = (f(&p, &v) - f(&m, &v)) / (2.0 * eps as f64);
        assert!((num - du[k] as f64).abs() < 1e-3, "dU[{k}]");
    }
    for k in 0..v.len() {
        let (mut p, mut m) = (v.clone(), v.clone());
        p[k] += eps;
        m[k] -= eps;
        let num = (f(&u, &p) - f(&u, &m)) / (2.0 * eps as f64);
        assert!((num - dv[k] as f64).abs() < 1e-3, "dV[{k}]");
    }
}

#[test]
fn mimic_loss_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (b, d) = (5, 4);
    let mut a: Vec<f32> = (0..b * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let target: Vec<f32> = (0..b * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let weights = [1.0, 0.5, 2.0, 1.0, 0.25];
    // Row 3 has no augmented vector (an unknown id): no loss, no gradient.
    let run = |a: &[f32]| {
        let rows: Vec<Option<&[f32]>> = (0..b)
            .map(|i| (i != 3).then(|| &a[i * d..(i + 1) * d]))
            .collect();
        loss::mimic(&rows, &target, d, &weights, 0.7)
    };
    let (l, g) = run(&a);
    assert!(l > 0.0);
    assert!(g[3 * d..4 * d].iter().all(|&x| x == 0.0));
    let eps = 1e-3f32;
    for k in 0..b * d {
        let orig = a[k];
        a[k] = orig + eps;
        let lp = run(&a).0;
        a[k] = orig - eps;
        let lm = run(&a).0;
        a[k] = orig;
        let num = (lp - lm) / (2.0 * eps as f64);
        assert!(
            (num - g[k] as f64).abs() < 1e-3,
            "a[{k}]: numeric {num} vs analytic {}",
            g[k]
        );
    }
    // The target is a constant (its gradient is stopped): moving it changes the loss, and the
    // function returns no gradient for it by construction; a equal to the target costs nothing.
    let rows: Vec<Option<&[f32]>> = (0..b).map(|i| Some(&target[i * d..(i + 1) * d])).collect();
    assert_eq!(loss::mimic(&rows, &target, d, &weights, 0.7).0, 0.0);
}

#[test]
fn prerank_target_attention_gradients() {
    use twotower_tower::{Cross, Source};
    // A pre-rank model: a user number, the item vector, and target attention (r = 3) over the
    // history; one hidden layer.
    let spec = TowerSpec {
        features: vec![
            FeatureSpec::Numeric {
                name: "age".into(),
                transform: NumTransform::Zscore,
            },
            FeatureSpec::Cross {
                name: "v".into(),
                of: Cross::ItemVector,
                attention_dim: 0,
            },
            FeatureSpec::Cross {
                name: "din".into(),
                of: Cross::TargetAttention,
                attention_dim: 3,
            },
        ],
        hidden: vec![5],
        activation: Activation::Tanh,
        layer_norm: false,
        dropout: 0.0,
        shortcut: Vec::new(),
        senet: 0,
        batch_norm: false,
        sources: vec![
            Source::User,
            Source::Cross(Cross::ItemVector),
            Source::Cross(Cross::TargetAttention),
        ],
        branches: Vec::new(),
        fusion: Fusion::Attention,
        multitask: None,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let d = 4;
    let plan = model::plan_prerank(&spec, d, &stats(), 1, 100, 0.5, &mut rng).unwrap();
    let (sj, st) = model::export(&plan, &plan.tower).unwrap();
    let m = Model::load(&sj, &st).unwrap();
    let fi = m.attention_feature().expect("an attention input");
    let vec =
        |rng: &mut ChaCha8Rng| -> Vec<f32> { (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect() };
    // Histories of 0, 1, 3 and 6 vectors.
    let mut enc = Vec::new();
    for (i, n) in [0usize, 1, 3, 6].into_iter().enumerate() {
        let user = m
            .encode_part(&json!({"age": 20 + 10 * i}), Source::User, true)
            .unwrap();
        let item = m.encode_part(&json!({}), Source::Item, true).unwrap();
        let v = vec(&mut rng);
        let mut x = m.assemble(&user, &item, &mut |c, out| {
            if c == Cross::ItemVector {
                out.copy_from_slice(&v)
            }
        });
        let mut buf = v.clone();
        for _ in 0..n {
            buf.extend(vec(&mut rng));
        }
        x.set_dense(fi, buf);
        enc.push(x);
    }
    let xs: Vec<&Encoded> = enc.iter().collect();
    assert_eq!(
        plan.dense_tensors[0].0, "din.query",
        "W_q and W_k come first"
    );
    let g = check_grads(
        plan.tower.clone(),
        &xs,
        1,
        1e-2,
        "target attention",
        &mut rng,
    );
    assert!(
        g.dense[0].iter().any(|x| x.abs() > 1e-4) && g.dense[1].iter().any(|x| x.abs() > 1e-4),
        "W_q and W_k get gradients"
    );
}
