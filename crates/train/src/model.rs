//! From options and data to a tower: vocabularies and statistics from the training data, the
//! spec (the tower crate's format, so a trained model is an ordinary model version), initial
//! parameters, and the export (spec + safetensors) of trained parameters.

use crate::config::{Bucketing, Decay, FeatureSpec, Fusion, NumTransform, TowerSpec};
use crate::data::vocabulary;
use crate::error::{Result, TrainError};
use crate::net::{
    Attention, Combine, FieldKind, Layer, Node, NodeInput, NodeOp, Pooling, Senet, Table, Tower,
};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use twotower_tower::layers::Activation;

/// What the data says about each feature of a tower.
#[derive(Debug, Default)]
pub struct FeatureStats {
    /// Id counts of categorical / multi-categorical / history features.
    pub counts: HashMap<String, HashMap<String, u64>>,
    /// Sum, sum of squares and count of numeric features (after log1p when asked).
    pub moments: HashMap<String, (f64, f64, u64)>,
    /// Values (with their example counts) of bucketize features with quantile boundaries.
    pub values: HashMap<String, Vec<(f64, u64)>>,
}

/// A tower ready to train: its parameters and the spec that serves them.
#[derive(Debug, Clone)]
pub struct Plan {
    pub tower: Tower,
    /// The spec without its weights (tensor names refer to `tensor_names`).
    pub spec: Value,
    /// Per table, then per dense parameter (in `Tower::dense_params` order): tensor name and shape.
    pub table_tensors: Vec<String>,
    pub dense_tensors: Vec<(String, Vec<usize>)>,
    /// Per BatchNorm layer (in order): the tensor names of its running mean and variance.
    pub stat_tensors: Vec<(String, String)>,
}

fn act_name(a: Activation) -> &'static str {
    match a {
        Activation::Relu => "relu",
        Activation::Gelu => "gelu",
        Activation::Tanh => "tanh",
        Activation::Sigmoid => "sigmoid",
    }
}

fn pooling_name(p: Pooling) -> &'static str {
    match p {
        Pooling::Mean => "mean",
        Pooling::Sum => "sum",
        Pooling::Max => "max",
    }
}

/// Plans a tower: `kind` is "user" or "item", `dim` the output width.
pub fn plan(
    kind: &str,
    spec: &TowerSpec,
    dim: usize,
    stats: &FeatureStats,
    min_count: u64,
    max_vocab: usize,
    init_std: f32,
    rng: &mut ChaCha8Rng,
) -> Result<Plan> {
    plan_with(
        kind, spec, dim, 0, stats, min_count, max_vocab, init_std, rng,
    )
}

/// Plans a pre-rank model (kind "prerank", one output, no normalisation): `vector_dim` is the
/// width of the towers' vectors (of the vector-valued cross inputs).
#[allow(clippy::too_many_arguments)]
pub fn plan_prerank(
    spec: &TowerSpec,
    vector_dim: usize,
    stats: &FeatureStats,
    min_count: u64,
    max_vocab: usize,
    init_std: f32,
    rng: &mut ChaCha8Rng,
) -> Result<Plan> {
    let outputs = spec.multitask.as_ref().map_or(1, |m| m.tasks.len().max(1));
    plan_with(
        "prerank", spec, outputs, vector_dim, stats, min_count, max_vocab, init_std, rng,
    )
}

#[allow(clippy::too_many_arguments)]
fn plan_with(
    kind: &str,
    spec: &TowerSpec,
    dim: usize,
    vector_dim: usize,
    stats: &FeatureStats,
    min_count: u64,
    max_vocab: usize,
    init_std: f32,
    rng: &mut ChaCha8Rng,
) -> Result<Plan> {
    let prerank = kind == "prerank";
    let mut attention_at: Option<(usize, usize, usize, String)> = None;
    let mut fields = Vec::new();
    let mut tables: Vec<Table> = Vec::new();
    let mut table_tensors = Vec::new();
    let mut features = Vec::new();
    let empty = HashMap::new();
    for (fi, f) in spec.features.iter().enumerate() {
        let name = f.name();
        let features_before = features.len();
        let mut new_table = |rows: usize, dim: usize, ids: bool| -> usize {
            let w = (0..rows * dim).map(|_| normal(rng) * init_std).collect();
            tables.push(Table {
                name: format!("{name}.embedding"),
                rows,
                dim,
                w,
                ids,
            });
            table_tensors.push(format!("{name}.embedding"));
            tables.len() - 1
        };
        let mut table = |dim: usize| -> (usize, Vec<String>) {
            let vocab = vocabulary(
                stats.counts.get(name).unwrap_or(&empty),
                min_count,
                max_vocab,
            );
            (new_table(vocab.len() + 1, dim, true), vocab)
        };
        match f {
            FeatureSpec::Bucketize {
                dim, boundaries, ..
            } => {
                let b = match boundaries {
                    Bucketing::Given(b) => b.clone(),
                    Bucketing::Quantiles(n) => {
                        quantiles(stats.values.get(name).map_or(&[][..], Vec::as_slice), *n)
                    }
                };
                let t = new_table(b.len() + 2, *dim, false);
                fields.push(FieldKind::Embed { table: t });
                features.push(json!({"name": name, "type": "bucketize", "embedding": format!("{name}.embedding"), "boundaries": b}));
            }
            FeatureSpec::Dense { dim, .. } => {
                fields.push(FieldKind::Value { width: *dim });
                features.push(json!({"name": name, "type": "dense", "dim": dim}));
            }
            FeatureSpec::Categorical { dim, .. } => {
                let (t, vocab) = table(*dim);
                fields.push(FieldKind::Embed { table: t });
                features.push(json!({"name": name, "type": "categorical", "embedding": format!("{name}.embedding"), "vocabulary": vocab}));
            }
            FeatureSpec::Multi {
                dim,
                pooling,
                max_len,
                ..
            } => {
                let (t, vocab) = table(*dim);
                fields.push(FieldKind::Pool {
                    table: t,
                    pooling: *pooling,
                });
                features.push(json!({"name": name, "type": "multi_categorical", "embedding": format!("{name}.embedding"),
                    "vocabulary": vocab, "pooling": pooling_name(*pooling), "max_len": max_len}));
            }
            FeatureSpec::History {
                dim,
                pooling,
                max_len,
                decay,
                ..
            } => {
                let (t, vocab) = table(*dim);
                fields.push(FieldKind::Pool {
                    table: t,
                    pooling: *pooling,
                });
                features.push(json!({"name": name, "type": "multi_categorical", "embedding": format!("{name}.embedding"),
                    "vocabulary": vocab, "pooling": pooling_name(*pooling), "max_len": max_len,
                    "weighted": *decay != Decay::None}));
            }
            FeatureSpec::Numeric { transform, .. } => {
                fields.push(FieldKind::Value { width: 1 });
                let (s, s2, n) = stats.moments.get(name).copied().unwrap_or((0.0, 0.0, 0));
                features.push(match transform {
                    NumTransform::None => json!({"name": name, "type": "numeric", "transform": "none"}),
                    NumTransform::Log1p => json!({"name": name, "type": "numeric", "transform": "log1p"}),
                    NumTransform::Zscore => {
                        let n = n.max(1) as f64;
                        let mean = s / n;
                        let var = (s2 / n - mean * mean).max(0.0);
                        let std = if var.sqrt() > 1e-12 { var.sqrt() } else { 1.0 };
                        json!({"name": name, "type": "numeric", "transform": "zscore", "mean": mean, "std": std})
                    }
                });
            }
            FeatureSpec::Cross {
                of, attention_dim, ..
            } => {
                if !prerank {
                    return Err(TrainError::Option {
                        path: name.to_owned(),
                        reason: "a cross input belongs to a pre-rank model".into(),
                    });
                }
                let width = if of.is_vector() { vector_dim } else { 1 };
                if width == 0 {
                    return Err(TrainError::NoData(format!(
                        "cross input \"{name}\" needs the towers' vectors"
                    )));
                }
                fields.push(FieldKind::Value { width });
                if *of == twotower_tower::Cross::TargetAttention {
                    attention_at = Some((fields.len() - 1, *attention_dim, width, name.to_owned()));
                }
                features.push(if *of == twotower_tower::Cross::TargetAttention {
                    json!({"name": name, "type": "cross", "of": of.name(), "dim": width,
                           "attention": {"query": format!("{name}.query"), "key": format!("{name}.key")}})
                } else if of.is_vector() {
                    json!({"name": name, "type": "cross", "of": of.name(), "dim": width})
                } else {
                    json!({"name": name, "type": "cross", "of": of.name()})
                });
            }
        }
        // An item-side feature of a pre-rank model says so.
        if prerank && spec.sources.get(fi) == Some(&twotower_tower::Source::Item) {
            if let Some(Value::Object(m)) = features.get_mut(features_before) {
                m.insert("source".into(), json!("item"));
            }
        }
    }
    let mut width: usize = fields
        .iter()
        .map(|f| match f {
            FieldKind::Embed { table } | FieldKind::Pool { table, .. } => tables[*table].dim,
            FieldKind::Value { width } => *width,
        })
        .sum();
    let mut dense_tensors = Vec::new();
    let mut stat_tensors = Vec::new();
    let senet = (spec.senet > 0).then(|| {
        let (nf, r) = (fields.len(), spec.senet);
        let mut uniform = |fan_in: usize, n: usize| -> Vec<f32> {
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
        };
        let s = Senet {
            w1: uniform(nf, r * nf),
            b1: uniform(nf, r),
            w2: uniform(r, nf * r),
            b2: uniform(r, nf),
            r,
        };
        for (n, shape) in [
            ("senet.fc1.weight", vec![r, nf]),
            ("senet.fc1.bias", vec![r]),
            ("senet.fc2.weight", vec![nf, r]),
            ("senet.fc2.bias", vec![nf]),
        ] {
            dense_tensors.push((n.to_owned(), shape));
        }
        s
    });
    // Target attention's W_q and W_k (after SENet's in the dense parameters).
    let attention = attention_at.map(|(field, r, d, name)| {
        let bound = 1.0 / (d as f32).sqrt();
        let mut uniform =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-bound..bound)).collect() };
        let (wq, wk) = (uniform(r * d), uniform(r * d));
        dense_tensors.push((format!("{name}.query"), vec![r, d]));
        dense_tensors.push((format!("{name}.key"), vec![r, d]));
        Attention {
            field,
            wq,
            wk,
            r,
            d,
        }
    });
    let field_width = |i: usize| match &fields[i] {
        FieldKind::Embed { table } | FieldKind::Pool { table, .. } => tables[*table].dim,
        FieldKind::Value { width } => *width,
    };
    let mut out = Stacks {
        spec,
        rng,
        dense_tensors: &mut dense_tensors,
        stat_tensors: &mut stat_tensors,
    };
    let mut layers = Vec::new();
    let mut layer_specs = Vec::new();
    let mut graph = Vec::new();
    let mut graph_specs = Vec::new();
    if let Some(mt) = spec.multitask.as_ref().filter(|_| prerank) {
        (graph, graph_specs) = multitask_graph(&mut out, mt, fields.len(), width, field_width)?;
        width = dim;
    } else if spec.branches.is_empty() {
        let mut widths: Vec<usize> = spec.hidden.clone();
        // Without hidden layers a tower whose fields are already `dim` wide is used as it is (an
        // id-only tower is matrix factorisation); otherwise a last linear layer maps to `dim`.
        if prerank || !(spec.hidden.is_empty() && width == dim && spec.shortcut.is_empty()) {
            widths.push(dim);
        }
        // Raw fields of the shortcut's features join h before the last linear layer.
        let idx: Vec<usize> = spec
            .shortcut
            .iter()
            .filter_map(|n| spec.features.iter().position(|f| f.name() == n))
            .collect();
        let extra = idx.iter().map(|&f| field_width(f)).sum::<usize>();
        let shortcut = (!idx.is_empty()).then(|| {
            (
                Layer::Shortcut { fields: idx },
                extra,
                json!({"type": "shortcut", "fields": spec.shortcut}),
            )
        });
        (layers, layer_specs, width) = out.mlp("", width, &widths, shortcut);
        // A pre-rank model's output is a score (a logit), not a vector to normalise.
        if !prerank {
            layer_specs.push(json!({"type": "l2_normalize"}));
            layers.push(Layer::L2Normalize);
        }
    } else {
        let k = spec.branches.len();
        let parallel = spec.fusion == Fusion::Parallel;
        let bw = if parallel { dim / k } else { dim };
        for b in &spec.branches {
            let in_width: usize = b.features.iter().map(|&f| field_width(f)).sum();
            let mut widths = b.hidden.clone();
            widths.push(bw);
            let (mut ls, mut specs, _) = out.mlp(&format!("{}.", b.name), in_width, &widths, None);
            if parallel {
                ls.push(Layer::L2Normalize);
                specs.push(json!({"type": "l2_normalize"}));
            }
            let names: Vec<&str> = b
                .features
                .iter()
                .map(|&f| spec.features[f].name())
                .collect();
            graph_specs.push(json!({"name": b.name, "inputs": names, "layers": specs}));
            graph.push(Node {
                name: b.name.clone(),
                inputs: b.features.iter().map(|&f| NodeInput::Field(f)).collect(),
                op: NodeOp::Stack(ls),
            });
        }
        let names: Vec<&str> = spec.branches.iter().map(|b| b.name.as_str()).collect();
        let mut fusion = json!({"name": "fusion", "inputs": names});
        let (combine, fused) = match spec.fusion {
            Fusion::Concat => (Combine::Concat, k * bw),
            Fusion::Sum => (Combine::Sum, bw),
            Fusion::WeightedSum => (Combine::WeightedSum { w: vec![1.0; k] }, bw),
            Fusion::Parallel if kind == "user" => {
                (Combine::WeightedConcat { w: vec![1.0; k] }, k * bw)
            }
            Fusion::Parallel => (Combine::Concat, k * bw),
            Fusion::Attention => {
                let bound = 1.0 / ((k * bw) as f32).sqrt();
                let w = (0..k * k * bw)
                    .map(|_| out.rng.gen_range(-bound..bound))
                    .collect();
                (Combine::Attention { w, b: vec![0.0; k] }, bw)
            }
        };
        let kind_name = match combine {
            Combine::Concat => "concat",
            Combine::Sum => "sum",
            Combine::WeightedSum { .. } => "weighted_sum",
            Combine::WeightedConcat { .. } => "weighted_concat",
            Combine::Attention { .. } => "attention",
            Combine::Gate { .. } | Combine::Scale { .. } => {
                unreachable!("branches are fused without gates")
            }
        };
        fusion["combine"] = json!(kind_name);
        match &combine {
            Combine::WeightedSum { .. } | Combine::WeightedConcat { .. } => {
                fusion["weight"] = json!("fusion.weight");
                out.dense_tensors.push(("fusion.weight".into(), vec![k]));
            }
            Combine::Attention { .. } => {
                fusion["weight"] = json!("fusion.weight");
                fusion["bias"] = json!("fusion.bias");
                out.dense_tensors
                    .push(("fusion.weight".into(), vec![k, k * bw]));
                out.dense_tensors.push(("fusion.bias".into(), vec![k]));
            }
            Combine::Concat | Combine::Sum | Combine::Gate { .. } | Combine::Scale { .. } => {}
        }
        graph_specs.push(fusion);
        graph.push(Node {
            name: "fusion".into(),
            inputs: (0..k).map(NodeInput::Node).collect(),
            op: NodeOp::Combine(combine),
        });
        width = fused;
        if !parallel {
            // The head: hidden layers after the fusion, a linear layer to `dim` when the fusion
            // is not `dim` wide or hidden layers came before, then the normalisation.
            let mut widths = spec.hidden.clone();
            if fused != dim || !widths.is_empty() {
                widths.push(dim);
            }
            let (mut ls, mut specs, w) = out.mlp("head.", width, &widths, None);
            width = w;
            ls.push(Layer::L2Normalize);
            specs.push(json!({"type": "l2_normalize"}));
            graph_specs.push(json!({"name": "head", "inputs": ["fusion"], "layers": specs}));
            graph.push(Node {
                name: "head".into(),
                inputs: vec![NodeInput::Node(k)],
                op: NodeOp::Stack(ls),
            });
        }
    }
    debug_assert_eq!(width, dim);
    let parallel = spec.fusion == Fusion::Parallel && !spec.branches.is_empty();
    let has_senet = senet.is_some();
    let tasks_out = spec.multitask.as_ref().filter(|_| prerank).map(|mt| {
        let tasks: Vec<Value> = mt
            .tasks
            .iter()
            .map(|t| json!({"name": t.name, "link": t.link.name(), "fuse": t.fuse}))
            .collect();
        json!({"dim": tasks.len(), "tasks": tasks})
    });
    let mut spec = json!({
        "format": "pg_twotower.tower",
        "spec_version": 1,
        "kind": kind,
        "features": features,
        "output": if prerank { json!({"dim": 1}) } else { json!({"dim": dim, "metric": if parallel { "ip" } else { "cosine" }}) },
    });
    if let Some(o) = tasks_out {
        spec["output"] = o;
    }
    if graph.is_empty() {
        spec["layers"] = json!(layer_specs);
    } else {
        spec["graph"] = json!(graph_specs);
        spec["output"]["node"] = json!(graph.last().map(|n| n.name.clone()));
    }
    if has_senet {
        spec["senet"] = json!({"w1": "senet.fc1.weight", "b1": "senet.fc1.bias", "w2": "senet.fc2.weight", "b2": "senet.fc2.bias"});
    }
    Ok(Plan {
        tower: Tower {
            fields,
            tables,
            senet,
            attention,
            layers,
            graph,
        },
        spec,
        table_tensors,
        dense_tensors,
        stat_tensors,
    })
}

/// A multi-task model's graph over `nf` fields (`width` wide, `field_width(i)` each): the
/// scene gate, the experts, a gate per task over its experts, a head per task, and the tasks'
/// outputs side by side (node `tasks`, or the only head). Node and tensor names are the
/// nodes' (`expert0.mlp.0.weight`, `task1_gate.weight`, …).
fn multitask_graph(
    out: &mut Stacks,
    mt: &crate::config::MultiTask,
    nf: usize,
    width: usize,
    field_width: impl Fn(usize) -> usize,
) -> Result<(Vec<Node>, Vec<Value>)> {
    let spec = out.spec;
    let names: Vec<&str> = spec.features.iter().map(|f| f.name()).collect();
    let (mut graph, mut specs): (Vec<Node>, Vec<Value>) = (Vec::new(), Vec::new());
    let node =
        |graph: &mut Vec<Node>, specs: &mut Vec<Value>, n: Node, js: Value| -> Result<usize> {
            if names.contains(&n.name.as_str()) {
                return Err(TrainError::Option {
                    path: "model.features".into(),
                    reason: format!(
                        "\"{}\" is the name of a node of the multi-task model: rename the feature",
                        n.name
                    ),
                });
            }
            graph.push(n);
            specs.push(js);
            Ok(graph.len() - 1)
        };
    let ref_name = |graph: &[Node], i: NodeInput| -> String {
        match i {
            NodeInput::Field(f) => names[f].to_owned(),
            NodeInput::Node(k) => graph[k].name.clone(),
        }
    };
    let uniform = |out: &mut Stacks, fan_in: usize, n: usize| -> Vec<f32> {
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        (0..n).map(|_| out.rng.gen_range(-bound..bound)).collect()
    };
    let all: Vec<NodeInput> = (0..nf).map(NodeInput::Field).collect();
    // The scene gate over the other fields; the experts read it and the scene.
    let (expert_in, expert_width, gate_in, gate_width) = match mt.scene {
        Some(sc) => {
            let others: Vec<NodeInput> =
                (0..nf).filter(|&f| f != sc).map(NodeInput::Field).collect();
            let n: usize = (0..nf).filter(|&f| f != sc).map(&field_width).sum();
            let g = field_width(sc);
            let w = uniform(out, g, n * g);
            out.dense_tensors
                .push(("scene_gate.weight".into(), vec![n, g]));
            out.dense_tensors.push(("scene_gate.bias".into(), vec![n]));
            let ins: Vec<String> = others.iter().map(|&i| ref_name(&graph, i)).collect();
            let mut inputs = others.clone();
            inputs.push(NodeInput::Field(sc));
            let k = node(
                &mut graph,
                &mut specs,
                Node {
                    name: "scene_gate".into(),
                    inputs,
                    op: NodeOp::Combine(Combine::Scale {
                        w,
                        b: vec![0.0; n],
                        n,
                    }),
                },
                json!({"name": "scene_gate", "combine": "scale", "inputs": ins, "gate_inputs": [names[sc]],
                       "weight": "scene_gate.weight", "bias": "scene_gate.bias"}),
            )?;
            (
                vec![NodeInput::Node(k), NodeInput::Field(sc)],
                n + g,
                vec![NodeInput::Field(sc)],
                g,
            )
        }
        None => (all.clone(), width, all, width),
    };
    let ew = *spec
        .hidden
        .last()
        .expect("checked: a multi-task model has hidden layers");
    let expert = |out: &mut Stacks,
                  graph: &mut Vec<Node>,
                  specs: &mut Vec<Value>,
                  name: String|
     -> Result<usize> {
        let (mut ls, mut js, _) = out.mlp(&format!("{name}."), expert_width, &spec.hidden, None);
        ls.push(Layer::Act(spec.activation));
        js.push(json!({"type": act_name(spec.activation)}));
        let ins: Vec<String> = expert_in.iter().map(|&i| ref_name(graph, i)).collect();
        node(
            graph,
            specs,
            Node {
                name: name.clone(),
                inputs: expert_in.clone(),
                op: NodeOp::Stack(ls),
            },
            json!({"name": name, "inputs": ins, "layers": js}),
        )
    };
    let shared: Vec<usize> = (0..mt.shared)
        .map(|i| expert(out, &mut graph, &mut specs, format!("expert{i}")))
        .collect::<Result<_>>()?;
    let mut heads = Vec::with_capacity(mt.tasks.len());
    for t in 0..mt.tasks.len() {
        let mut experts = shared.clone();
        for j in 0..mt.per_task {
            experts.push(expert(
                out,
                &mut graph,
                &mut specs,
                format!("task{t}_expert{j}"),
            )?);
        }
        let mixed = if experts.len() == 1 {
            experts[0]
        } else {
            let (k, name) = (experts.len(), format!("task{t}_gate"));
            let w = uniform(out, gate_width, k * gate_width);
            out.dense_tensors
                .push((format!("{name}.weight"), vec![k, gate_width]));
            out.dense_tensors.push((format!("{name}.bias"), vec![k]));
            let ins: Vec<String> = experts.iter().map(|&e| graph[e].name.clone()).collect();
            let gins: Vec<String> = gate_in.iter().map(|&i| ref_name(&graph, i)).collect();
            let mut inputs: Vec<NodeInput> = experts.iter().map(|&e| NodeInput::Node(e)).collect();
            inputs.extend(gate_in.iter().copied());
            node(
                &mut graph,
                &mut specs,
                Node {
                    name: name.clone(),
                    inputs,
                    op: NodeOp::Combine(Combine::Gate {
                        w,
                        b: vec![0.0; k],
                        k,
                    }),
                },
                json!({"name": name, "combine": "gate", "inputs": ins, "gate_inputs": gins,
                       "weight": format!("{name}.weight"), "bias": format!("{name}.bias")}),
            )?
        };
        let name = format!("task{t}_head");
        let mut widths = mt.task_hidden.clone();
        widths.push(1);
        let (ls, js, _) = out.mlp(&format!("{name}."), ew, &widths, None);
        let input = graph[mixed].name.clone();
        heads.push(node(
            &mut graph,
            &mut specs,
            Node {
                name: name.clone(),
                inputs: vec![NodeInput::Node(mixed)],
                op: NodeOp::Stack(ls),
            },
            json!({"name": name, "inputs": [input], "layers": js}),
        )?);
    }
    if heads.len() > 1 {
        let ins: Vec<String> = heads.iter().map(|&h| graph[h].name.clone()).collect();
        node(
            &mut graph,
            &mut specs,
            Node {
                name: "tasks".into(),
                inputs: heads.iter().map(|&h| NodeInput::Node(h)).collect(),
                op: NodeOp::Combine(Combine::Concat),
            },
            json!({"name": "tasks", "combine": "concat", "inputs": ins}),
        )?;
    }
    Ok((graph, specs))
}

/// Builds layer stacks with fresh parameters, naming their tensors.
struct Stacks<'a, 'r> {
    spec: &'a TowerSpec,
    rng: &'r mut ChaCha8Rng,
    dense_tensors: &'a mut Vec<(String, Vec<usize>)>,
    stat_tensors: &'a mut Vec<(String, String)>,
}

impl Stacks<'_, '_> {
    /// Linear layers of `widths` from `width` (each but the last followed by the tower's
    /// normalisation, activation and dropout), the shortcut (its layer, extra width and spec)
    /// before the last one; tensors `{prefix}mlp.{i}.weight` and so on. Returns the layers,
    /// their specs and the output width.
    fn mlp(
        &mut self,
        prefix: &str,
        mut width: usize,
        widths: &[usize],
        shortcut: Option<(Layer, usize, Value)>,
    ) -> (Vec<Layer>, Vec<Value>, usize) {
        let spec = self.spec;
        let mut layers = Vec::new();
        let mut layer_specs = Vec::new();
        let mut shortcut = shortcut;
        let last = widths.len();
        for (i, &n_out) in widths.iter().enumerate() {
            if i + 1 == last {
                if let Some((layer, extra, js)) = shortcut.take() {
                    width += extra;
                    layer_specs.push(js);
                    layers.push(layer);
                }
            }
            let bound = 1.0 / (width as f32).sqrt();
            let w: Vec<f32> = (0..n_out * width)
                .map(|_| self.rng.gen_range(-bound..bound))
                .collect();
            let b: Vec<f32> = (0..n_out)
                .map(|_| self.rng.gen_range(-bound..bound))
                .collect();
            let (wn, bn) = (
                format!("{prefix}mlp.{i}.weight"),
                format!("{prefix}mlp.{i}.bias"),
            );
            layer_specs.push(json!({"type": "linear", "weight": wn, "bias": bn}));
            self.dense_tensors.push((wn, vec![n_out, width]));
            self.dense_tensors.push((bn, vec![n_out]));
            layers.push(Layer::Linear {
                w,
                b,
                n_in: width,
                n_out,
            });
            width = n_out;
            if i + 1 < last {
                if spec.layer_norm {
                    let (gn, bn) = (
                        format!("{prefix}ln.{i}.weight"),
                        format!("{prefix}ln.{i}.bias"),
                    );
                    layer_specs
                        .push(json!({"type": "layernorm", "weight": gn, "bias": bn, "eps": 1e-5}));
                    self.dense_tensors.push((gn, vec![width]));
                    self.dense_tensors.push((bn, vec![width]));
                    layers.push(Layer::LayerNorm {
                        g: vec![1.0; width],
                        b: vec![0.0; width],
                        eps: 1e-5,
                    });
                }
                if spec.batch_norm {
                    let n = |k: &str| format!("{prefix}bn.{i}.{k}");
                    layer_specs.push(json!({"type": "batchnorm", "weight": n("weight"), "bias": n("bias"),
                        "running_mean": n("running_mean"), "running_var": n("running_var"), "eps": 1e-5}));
                    self.dense_tensors.push((n("weight"), vec![width]));
                    self.dense_tensors.push((n("bias"), vec![width]));
                    self.stat_tensors
                        .push((n("running_mean"), n("running_var")));
                    layers.push(Layer::BatchNorm {
                        g: vec![1.0; width],
                        b: vec![0.0; width],
                        running_mean: vec![0.0; width],
                        running_var: vec![1.0; width],
                        eps: 1e-5,
                        momentum: 0.1,
                    });
                }
                layer_specs.push(json!({"type": act_name(spec.activation)}));
                layers.push(Layer::Act(spec.activation));
                if spec.dropout > 0.0 {
                    layer_specs.push(json!({"type": "dropout", "p": spec.dropout}));
                    layers.push(Layer::Dropout { p: spec.dropout });
                }
            }
        }
        (layers, layer_specs, width)
    }
}

/// At most `buckets - 1` boundaries splitting the weighted `values` into about equal shares:
/// boundary q is the first value past the q-th share (so bucket q holds the values up to that
/// share); points heavier than a share merge buckets instead of leaving empty ones.
fn quantiles(values: &[(f64, u64)], buckets: usize) -> Vec<f64> {
    let mut v: Vec<(f64, u64)> = values
        .iter()
        .copied()
        .filter(|(x, n)| x.is_finite() && *n > 0)
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Distinct values with inclusive cumulative counts.
    let mut distinct: Vec<(f64, u128)> = Vec::new();
    for (x, n) in v {
        match distinct.last_mut() {
            Some(last) if last.0 == x => last.1 += n as u128,
            _ => {
                let acc = distinct.last().map_or(0, |l| l.1);
                distinct.push((x, acc + n as u128));
            }
        }
    }
    let total = distinct.last().map_or(0, |l| l.1);
    let mut out: Vec<f64> = Vec::new();
    for q in 1..buckets as u128 {
        let i = distinct.partition_point(|d| d.1 * (buckets as u128) < q * total);
        if let Some(&(next, _)) = distinct.get(i + 1) {
            if out.last().is_none_or(|&p| next > p) {
                out.push(next);
            }
        }
    }
    out
}

/// A standard normal draw (Box–Muller), from the run's generator.
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Continues from a trained tower (incremental training): `plan` is planned from the new data
/// (its vocabularies hold the new data's ids, its rows are freshly initialised); the result
/// keeps the base version's vocabularies and rows, appends the ids the base did not know (with
/// the fresh rows), and takes every dense parameter and every numeric statistic from the base.
/// The base must have the architecture the options describe.
pub fn extend(plan: &Plan, base_spec: &str, base_weights: &[u8]) -> Result<Plan> {
    let arch = |why: String| TrainError::Option {
        path: "incremental".into(),
        reason: why,
    };
    let base: Value =
        serde_json::from_str(base_spec).map_err(|e| arch(format!("the base spec: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(base_weights)
        .map_err(|e| arch(format!("the base weights: {e}")))?;
    let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let t = st.tensor(name).map_err(|_| {
            arch(format!(
                "the base version has no tensor {name}: train it anew"
            ))
        })?;
        if t.shape() != shape || t.dtype() != safetensors::Dtype::F32 {
            return Err(arch(format!(
                "tensor {name} is {:?} {:?} in the base version, {:?} F32 in these options",
                t.shape(),
                t.dtype(),
                shape
            )));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    let base_features: Vec<Value> = base
        .get("features")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let base_feature = |name: &str| {
        base_features
            .iter()
            .find(|f| f.get("name").and_then(Value::as_str) == Some(name))
            .cloned()
    };
    let mut out = plan.clone();
    let features = match out.spec.get_mut("features") {
        Some(Value::Array(f)) => f,
        _ => return Err(TrainError::Export("planned spec without features".into())),
    };
    for f in features.iter_mut() {
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let Some(bf) = base_feature(&name) else {
            return Err(arch(format!(
                "feature \"{name}\" is not in the base version: train it anew"
            )));
        };
        if bf.get("type") != f.get("type") {
            return Err(arch(format!(
                "feature \"{name}\" has another type in the base version"
            )));
        }
        for k in ["mean", "std", "boundaries"] {
            if let (Some(v), Some(o)) = (bf.get(k), f.as_object_mut()) {
                o.insert(k.to_owned(), v.clone());
            }
        }
    }
    for (t, name) in plan.table_tensors.iter().enumerate() {
        let fresh = &plan.tower.tables[t];
        let dim = fresh.dim;
        let Some(fi) = features
            .iter()
            .position(|f| f.get("embedding").and_then(Value::as_str) == Some(name.as_str()))
        else {
            continue;
        };
        let fname = features[fi]
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if features[fi].get("type").and_then(Value::as_str) == Some("bucketize") {
            // The base's boundaries (copied above) and its rows.
            let n = features[fi]
                .get("boundaries")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let table = &mut out.tower.tables[t];
            table.w = tensor(name, &[n + 2, dim])?;
            table.rows = n + 2;
            continue;
        }
        let base_vocab: Vec<String> = base_feature(&fname)
            .and_then(|f| f.get("vocabulary").cloned())
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        let new_vocab: Vec<String> = features[fi]
            .get("vocabulary")
            .cloned()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        let base_rows = tensor(name, &[base_vocab.len() + 1, dim])?;
        let known: std::collections::HashSet<&str> =
            base_vocab.iter().map(String::as_str).collect();
        let mut merged = base_vocab.clone();
        let mut w = base_rows;
        for (i, id) in new_vocab.iter().enumerate() {
            if !known.contains(id.as_str()) {
                merged.push(id.clone());
                w.extend_from_slice(&fresh.w[(i + 1) * dim..(i + 2) * dim]);
            }
        }
        let table = &mut out.tower.tables[t];
        table.rows = merged.len() + 1;
        table.w = w;
        for f in features.iter_mut() {
            if f.get("embedding").and_then(Value::as_str) == Some(name.as_str()) {
                if let Some(o) = f.as_object_mut() {
                    o.insert("vocabulary".into(), Value::from(merged.clone()));
                }
            }
        }
    }
    let names: Vec<(String, Vec<usize>)> = plan.dense_tensors.clone();
    for (p, (name, shape)) in out.tower.dense_params_mut().into_iter().zip(&names) {
        *p = tensor(name, shape)?;
    }
    let stats = plan.stat_tensors.clone();
    for ((mean, var), (mn, vn)) in out.tower.running_stats_mut().into_iter().zip(&stats) {
        *mean = tensor(mn, &[mean.len()])?;
        *var = tensor(vn, &[var.len()])?;
    }
    Ok(out)
}

/// `plan` and `tower` without the all-zero rows of their tables: for each table whose OOV row 0
/// is all zero (so an id that loses its row still reads zeros), every other all-zero row is
/// removed and its id dropped from the vocabularies of the features using the table. Returns
/// the pruned plan and tower and, per pruned table, (tensor name, rows before, rows removed).
pub fn prune(plan: &Plan, tower: &Tower) -> (Plan, Tower, Vec<(String, usize, usize)>) {
    let mut plan = plan.clone();
    let mut tower = tower.clone();
    let mut report = Vec::new();
    for (t, name) in plan.table_tensors.iter().enumerate() {
        let tb = &tower.tables[t];
        let zero = |r: usize| tb.w[r * tb.dim..(r + 1) * tb.dim].iter().all(|&x| x == 0.0);
        if tb.rows < 2 || !zero(0) {
            continue;
        }
        let keep: Vec<usize> = (0..tb.rows).filter(|&r| r == 0 || !zero(r)).collect();
        if keep.len() == tb.rows {
            continue;
        }
        let removed = tb.rows - keep.len();
        let mut w = Vec::with_capacity(keep.len() * tb.dim);
        for &r in &keep {
            w.extend_from_slice(&tb.w[r * tb.dim..(r + 1) * tb.dim]);
        }
        report.push((name.clone(), tb.rows, removed));
        let tb = &mut tower.tables[t];
        tb.w = w;
        tb.rows = keep.len();
        if let Some(Value::Array(features)) = plan.spec.get_mut("features") {
            for f in features.iter_mut() {
                if f.get("embedding").and_then(Value::as_str) == Some(name.as_str()) {
                    if let Some(Value::Array(vocab)) = f.get_mut("vocabulary") {
                        // Row r + 1 is vocab[r]: keep the ids of kept rows, in row order.
                        let kept: Vec<Value> = keep
                            .iter()
                            .skip(1)
                            .filter_map(|&r| vocab.get(r - 1).cloned())
                            .collect();
                        *vocab = kept;
                    }
                }
            }
        }
    }
    (plan, tower, report)
}

/// The spec text and safetensors bytes of `tower` trained under `plan`.
pub fn export(plan: &Plan, tower: &Tower) -> Result<(String, Vec<u8>)> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (t, name) in tower.tables.iter().zip(&plan.table_tensors) {
        owned.push((name.clone(), vec![t.rows, t.dim], bytes(&t.w)));
    }
    for (p, (name, shape)) in tower.dense_params().iter().zip(&plan.dense_tensors) {
        owned.push((name.clone(), shape.clone(), bytes(p)));
    }
    for ((mean, var), (mn, vn)) in tower.running_stats().into_iter().zip(&plan.stat_tensors) {
        owned.push((mn.clone(), vec![mean.len()], bytes(mean)));
        owned.push((vn.clone(), vec![var.len()], bytes(var)));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| TrainError::Export(format!("tensor {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let mut meta = HashMap::new();
    meta.insert("producer".to_owned(), "pg_twotower train".to_owned());
    let st = safetensors::serialize(views, &Some(meta))
        .map_err(|e| TrainError::Export(e.to_string()))?;
    Ok((plan.spec.to_string(), st))
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Adds `value`'s ids to `counts` (a single id, a list of ids, or `{"ids": [...]}`), `n` times.
pub fn count_ids(counts: &mut HashMap<String, u64>, value: Option<&Value>, n: u64) {
    let mut one = |v: &Value| {
        if let Ok(Some(id)) = twotower_tower::canonical_id(v) {
            *counts.entry(id).or_insert(0) += n;
        }
    };
    match value {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => a.iter().for_each(&mut one),
        Some(Value::Object(o)) => {
            if let Some(Value::Array(a)) = o.get("ids") {
                a.iter().for_each(&mut one);
            }
        }
        Some(v) => one(v),
    }
}

/// Adds a numeric feature value, `n` times (once per training example that carries it), to
/// the moments; values that are not numbers are left to the encoder to reject.
pub fn add_moment(
    moments: &mut HashMap<String, (f64, f64, u64)>,
    name: &str,
    value: Option<&Value>,
    n: u64,
) {
    if let Some(x) = value.and_then(Value::as_f64).filter(|x| x.is_finite()) {
        let m = moments.entry(name.to_owned()).or_insert((0.0, 0.0, 0));
        m.0 += x * n as f64;
        m.1 += x * x * n as f64;
        m.2 += n;
    }
}

/// The feature object `features` with `key: id` added when the key is absent.
pub fn with_id(features: &Map<String, Value>, key: &str, id: &str) -> Value {
    let mut m = features.clone();
    if !m.contains_key(key) {
        m.insert(key.to_owned(), Value::String(id.to_owned()));
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::quantiles;

    #[test]
    fn quantile_boundaries() {
        assert_eq!(quantiles(&[], 4), Vec::<f64>::new());
        let even: Vec<(f64, u64)> = (1..=8).map(|x| (x as f64, 1)).collect();
        // Bucket 1 holds 1, 2; bucket 2 holds 3, 4; …
        assert_eq!(quantiles(&even, 4), vec![3.0, 5.0, 7.0]);
        // A value holding most of the weight merges buckets instead of leaving empty ones.
        assert_eq!(quantiles(&[(1.0, 1), (5.0, 100), (9.0, 1)], 4), vec![9.0]);
        assert_eq!(quantiles(&[(2.0, 3)], 10), Vec::<f64>::new());
        // NaN and infinities are ignored; order of the input does not matter.
        assert_eq!(
            quantiles(&[(4.0, 1), (f64::NAN, 5), (2.0, 1), (f64::INFINITY, 2)], 2),
            vec![4.0]
        );
    }
}
