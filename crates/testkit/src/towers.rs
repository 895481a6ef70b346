//! Deterministic synthetic towers and inputs, for tests and benchmarks.

use serde_json::{json, Value};
use twotower_tower::safetensors::write_f32;

/// splitmix64: a tiny deterministic PRNG.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    /// Uniform integer in [0, n) (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A skewed (roughly Zipf-like) integer in [0, n): popular ids come up often.
    pub fn skewed(&mut self, n: u64) -> u64 {
        let u = self.f64();
        ((n as f64).powf(u) - 1.0) as u64 % n.max(1)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    /// `n` floats uniform in [-a, a).
    pub fn uniform_vec(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|_| (self.range(-1.0, 1.0) as f32) * a).collect()
    }
}

/// Builds a spec + weights from a spec JSON value and a list of (name, shape, init scale).
/// Embedding tables get scale-`a` uniform values; everything is deterministic in `seed`.
fn build(spec: Value, tensors: &[(&str, Vec<usize>, f32)], seed: u64) -> (String, Vec<u8>) {
    let mut rng = Rng::new(seed);
    let data: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(name, shape, a)| {
            let n = shape.iter().product();
            ((*name).to_owned(), shape.clone(), rng.uniform_vec(n, *a))
        })
        .collect();
    let refs: Vec<(&str, &[usize], &[f32])> = data
        .iter()
        .map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice()))
        .collect();
    (spec.to_string(), write_f32(&refs))
}

fn linear_init(n_in: usize) -> f32 {
    1.0 / (n_in as f32).sqrt()
}

const COUNTRIES: [&str; 20] = [
    "US", "CN", "IN", "BR", "DE", "FR", "GB", "JP", "KR", "MX", "ID", "RU", "TR", "IT", "ES", "CA",
    "AU", "NL", "SE", "PL",
];
const DEVICES: [&str; 4] = ["ios", "android", "web", "tv"];
const D: usize = 16;
const USER_BUCKETS: usize = 50_000;
const ITEM_BUCKETS: usize = 100_000;
const CATEGORIES: usize = 30;
const TAG_BUCKETS: usize = 1000;

fn categories() -> Vec<String> {
    (0..CATEGORIES).map(|c| format!("c{c}")).collect()
}

/// A user tower with 10 fields (hashed and vocabulary categoricals, a mean-pooled history of up to
/// 50 item ids, a weighted sum-pooled category list, zscore/log1p/minmax numerics, a bucketized
/// age), 16-d embeddings, Linear 256 → ReLU → Linear 256 → ReLU → Linear 64 → l2_normalize,
/// cosine. Returns (spec JSON, safetensors bytes).
pub fn realistic_user_tower(seed: u64) -> (String, Vec<u8>) {
    let hours: Vec<String> = (0..24).map(|h| h.to_string()).collect();
    let spec = json!({
        "format": "pg_twotower.tower",
        "spec_version": 1,
        "kind": "user",
        "features": [
            {"name": "user_id", "type": "categorical", "embedding": "emb.user_id", "hash_buckets": USER_BUCKETS},
            {"name": "country", "type": "categorical", "embedding": "emb.country", "vocabulary": COUNTRIES},
            {"name": "device", "type": "categorical", "embedding": "emb.device", "vocabulary": DEVICES},
            {"name": "history", "type": "multi_categorical", "embedding": "emb.item_id",
             "hash_buckets": ITEM_BUCKETS, "pooling": "mean", "max_len": 50},
            {"name": "liked_categories", "type": "multi_categorical", "embedding": "emb.category",
             "vocabulary": categories(), "pooling": "sum", "weighted": true},
            {"name": "age", "type": "bucketize", "boundaries": [18, 25, 35, 45, 55, 65], "embedding": "emb.age"},
            {"name": "days_since_signup", "type": "numeric", "transform": "log1p"},
            {"name": "sessions_7d", "type": "numeric", "transform": "zscore", "mean": 5.0, "std": 3.0, "default": 0},
            {"name": "avg_watch_minutes", "type": "numeric", "transform": "minmax", "min": 0, "max": 120},
            {"name": "hour", "type": "categorical", "embedding": "emb.hour", "vocabulary": hours}
        ],
        "layers": [
            {"type": "linear", "weight": "mlp.0.weight", "bias": "mlp.0.bias"},
            {"type": "relu"},
            {"type": "linear", "weight": "mlp.2.weight", "bias": "mlp.2.bias"},
            {"type": "relu"},
            {"type": "linear", "weight": "mlp.4.weight", "bias": "mlp.4.bias"},
            {"type": "l2_normalize"}
        ],
        "output": {"dim": 64, "metric": "cosine"}
    });
    let w0 = 7 * D + 3;
    let mut tensors = user_tables();
    tensors.extend([
        ("mlp.0.weight", vec![256, w0], linear_init(w0)),
        ("mlp.0.bias", vec![256], linear_init(w0)),
        ("mlp.2.weight", vec![256, 256], linear_init(256)),
        ("mlp.2.bias", vec![256], linear_init(256)),
        ("mlp.4.weight", vec![64, 256], linear_init(256)),
        ("mlp.4.bias", vec![64], linear_init(256)),
    ]);
    build(spec, &tensors, seed)
}

/// The embedding tables of [`realistic_user_tower`]'s features.
fn user_tables() -> Vec<(&'static str, Vec<usize>, f32)> {
    vec![
        ("emb.user_id", vec![USER_BUCKETS + 1, D], 0.1),
        ("emb.country", vec![COUNTRIES.len() + 1, D], 0.1),
        ("emb.device", vec![DEVICES.len() + 1, D], 0.1),
        ("emb.item_id", vec![ITEM_BUCKETS + 1, D], 0.1),
        ("emb.category", vec![CATEGORIES + 1, D], 0.1),
        ("emb.age", vec![8, D], 0.1),
        ("emb.hour", vec![25, D], 0.1),
    ]
}

/// A plausible input object for [`realistic_user_tower`]: example `i` of a stream seeded by
/// `seed`. Some optional keys are missing or null, some ids are unknown.
pub fn realistic_user_input(seed: u64, i: usize) -> Value {
    let mut r = Rng::new(seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut m = serde_json::Map::new();
    m.insert("user_id".into(), json!(1 + r.below(10_000_000)));
    let country = if r.chance(0.05) {
        "ZZ"
    } else {
        COUNTRIES[r.skewed(COUNTRIES.len() as u64) as usize]
    };
    m.insert("country".into(), json!(country));
    m.insert(
        "device".into(),
        json!(DEVICES[r.below(DEVICES.len() as u64) as usize]),
    );
    let n_hist = r.below(81) as usize;
    let hist: Vec<u64> = (0..n_hist).map(|_| 1 + r.skewed(1_000_000)).collect();
    m.insert("history".into(), json!(hist));
    let n_cat = r.below(6) as usize;
    let ids: Vec<String> = (0..n_cat)
        .map(|_| format!("c{}", r.skewed(CATEGORIES as u64)))
        .collect();
    let weights: Vec<f64> = (0..n_cat)
        .map(|_| (r.range(0.1, 5.0) * 100.0).round() / 100.0)
        .collect();
    m.insert(
        "liked_categories".into(),
        json!({"ids": ids, "weights": weights}),
    );
    if r.chance(0.9) {
        m.insert("age".into(), json!(13 + r.below(68)));
    } else {
        m.insert("age".into(), Value::Null);
    }
    m.insert("days_since_signup".into(), json!(r.below(3000)));
    if r.chance(0.8) {
        m.insert("sessions_7d".into(), json!(r.below(30)));
    }
    m.insert(
        "avg_watch_minutes".into(),
        json!((r.range(0.0, 150.0) * 10.0).round() / 10.0),
    );
    m.insert("hour".into(), json!(r.below(24)));
    Value::Object(m)
}

/// An item tower with 5 fields (hashed item id, category vocabulary, mean-pooled hashed tags,
/// log1p price, bucketized popularity), 16-d embeddings, Linear 128 → ReLU → Linear 64 →
/// l2_normalize, cosine (the same 64-d space as [`realistic_user_tower`]).
pub fn realistic_item_tower(seed: u64) -> (String, Vec<u8>) {
    let spec = json!({
        "format": "pg_twotower.tower",
        "spec_version": 1,
        "kind": "item",
        "features": [
            {"name": "item_id", "type": "categorical", "embedding": "emb.item_id", "hash_buckets": ITEM_BUCKETS},
            {"name": "category", "type": "categorical", "embedding": "emb.category", "vocabulary": categories()},
            {"name": "tags", "type": "multi_categorical", "embedding": "emb.tag",
             "hash_buckets": TAG_BUCKETS, "pooling": "mean", "max_len": 10},
            {"name": "price", "type": "numeric", "transform": "log1p", "default": 0},
            {"name": "popularity", "type": "bucketize", "boundaries": [10, 100, 1000, 10000, 100000], "embedding": "emb.popularity"}
        ],
        "layers": [
            {"type": "linear", "weight": "mlp.0.weight", "bias": "mlp.0.bias"},
            {"type": "relu"},
            {"type": "linear", "weight": "mlp.2.weight", "bias": "mlp.2.bias"},
            {"type": "l2_normalize"}
        ],
        "output": {"dim": 64, "metric": "cosine"}
    });
    let w0 = 4 * D + 1;
    let tensors = [
        ("emb.item_id", vec![ITEM_BUCKETS + 1, D], 0.1),
        ("emb.category", vec![CATEGORIES + 1, D], 0.1),
        ("emb.tag", vec![TAG_BUCKETS + 1, D], 0.1),
        ("emb.popularity", vec![7, D], 0.1),
        ("mlp.0.weight", vec![128, w0], linear_init(w0)),
        ("mlp.0.bias", vec![128], linear_init(w0)),
        ("mlp.2.weight", vec![64, 128], linear_init(128)),
        ("mlp.2.bias", vec![64], linear_init(128)),
    ];
    build(spec, &tensors, seed)
}

/// A plausible input object for [`realistic_item_tower`] (item `i` of the catalogue). Only
/// feature keys; a `to_jsonb(row)` would carry more columns (use `encode(.., strict = false)`).
pub fn realistic_item_input(seed: u64, i: usize) -> Value {
    let mut r = Rng::new(seed ^ (i as u64).wrapping_mul(0x9e6c_63d0_676a_9a99));
    let n_tags = r.below(8) as usize;
    let tags: Vec<String> = (0..n_tags)
        .map(|_| format!("t{}", r.skewed(5000)))
        .collect();
    let mut m = serde_json::Map::new();
    m.insert("item_id".into(), json!(i as u64 + 1));
    m.insert(
        "category".into(),
        json!(format!("c{}", r.skewed(CATEGORIES as u64))),
    );
    m.insert("tags".into(), json!(tags));
    if r.chance(0.95) {
        m.insert(
            "price".into(),
            json!((r.range(0.5, 500.0) * 100.0).round() / 100.0),
        );
    } else {
        m.insert("price".into(), Value::Null);
    }
    m.insert("popularity".into(), json!(r.skewed(1_000_000)));
    Value::Object(m)
}

/// A pre-rank model over the 64-d space of [`realistic_user_tower`]: the request's `device`, the
/// candidate's `category` and log1p `price`, and every cross input (u, v, u⊙v, the two-tower
/// score, max and mean similarity to the history); Linear 64 → ReLU → Linear 1.
pub fn realistic_prerank(seed: u64) -> (String, Vec<u8>) {
    let dims = 64;
    let spec = json!({
        "format": "pg_twotower.tower",
        "spec_version": 1,
        "kind": "prerank",
        "features": [
            {"name": "device", "type": "categorical", "embedding": "emb.device", "vocabulary": DEVICES},
            {"name": "category", "source": "item", "type": "categorical", "embedding": "emb.category", "vocabulary": categories()},
            {"name": "price", "source": "item", "type": "numeric", "transform": "log1p", "default": 0},
            {"name": "u", "type": "cross", "of": "user_vector", "dim": dims},
            {"name": "v", "type": "cross", "of": "item_vector", "dim": dims},
            {"name": "uv", "type": "cross", "of": "product", "dim": dims},
            {"name": "score", "type": "cross", "of": "score"},
            {"name": "hmax", "type": "cross", "of": "history_max"},
            {"name": "hmean", "type": "cross", "of": "history_mean"}
        ],
        "layers": [
            {"type": "linear", "weight": "mlp.0.weight", "bias": "mlp.0.bias"},
            {"type": "relu"},
            {"type": "linear", "weight": "mlp.2.weight", "bias": "mlp.2.bias"}
        ],
        "output": {"dim": 1}
    });
    let w0 = 2 * D + 1 + 3 * dims + 3;
    let tensors = [
        ("emb.device", vec![DEVICES.len() + 1, D], 0.1),
        ("emb.category", vec![CATEGORIES + 1, D], 0.1),
        ("mlp.0.weight", vec![64, w0], linear_init(w0)),
        ("mlp.0.bias", vec![64], linear_init(w0)),
        ("mlp.2.weight", vec![1, 64], linear_init(64)),
        ("mlp.2.bias", vec![1], linear_init(64)),
    ];
    build(spec, &tensors, seed)
}

/// [`realistic_prerank`]'s features as a multi-task model: `shared` experts (w0 → 64, ReLU), a
/// gate per task over them (from every field) when there are two or more, a head per task
/// (64 → 16 → 1), three tasks (fused 1, 0.5, −0.5).
pub fn realistic_prerank_multitask(seed: u64, shared: usize) -> (String, Vec<u8>) {
    let (plain, _) = realistic_prerank(seed);
    let mut spec: Value = serde_json::from_str(&plain).expect("the plain spec is JSON");
    let dims = 64;
    let w0 = 2 * D + 1 + 3 * dims + 3;
    let fields = json!(["device", "category", "price", "u", "v", "uv", "score", "hmax", "hmean"]);
    let mut graph = Vec::new();
    let mut tensors: Vec<(String, Vec<usize>, f32)> = vec![
        ("emb.device".into(), vec![DEVICES.len() + 1, D], 0.1),
        ("emb.category".into(), vec![CATEGORIES + 1, D], 0.1),
    ];
    let experts: Vec<String> = (0..shared).map(|i| format!("expert{i}")).collect();
    for e in &experts {
        graph.push(json!({"name": e, "inputs": fields, "layers": [
            {"type": "linear", "weight": format!("{e}.weight"), "bias": format!("{e}.bias")}, {"type": "relu"}]}));
        tensors.push((format!("{e}.weight"), vec![64, w0], linear_init(w0)));
        tensors.push((format!("{e}.bias"), vec![64], linear_init(w0)));
    }
    let tasks = ["click", "like", "dislike"];
    for t in tasks {
        let input = if shared > 1 {
            let g = format!("{t}_gate");
            graph.push(
                json!({"name": g, "combine": "gate", "inputs": experts, "gate_inputs": fields,
                              "weight": format!("{g}.weight"), "bias": format!("{g}.bias")}),
            );
            tensors.push((format!("{g}.weight"), vec![shared, w0], linear_init(w0)));
            tensors.push((format!("{g}.bias"), vec![shared], linear_init(w0)));
            g
        } else {
            experts[0].clone()
        };
        let h = format!("{t}_head");
        graph.push(json!({"name": h, "inputs": [input], "layers": [
            {"type": "linear", "weight": format!("{h}.0.weight"), "bias": format!("{h}.0.bias")}, {"type": "relu"},
            {"type": "linear", "weight": format!("{h}.2.weight"), "bias": format!("{h}.2.bias")}]}));
        tensors.push((format!("{h}.0.weight"), vec![16, 64], linear_init(64)));
        tensors.push((format!("{h}.0.bias"), vec![16], linear_init(64)));
        tensors.push((format!("{h}.2.weight"), vec![1, 16], linear_init(16)));
        tensors.push((format!("{h}.2.bias"), vec![1], linear_init(16)));
    }
    graph.push(json!({"name": "tasks", "combine": "concat", "inputs": ["click_head", "like_head", "dislike_head"]}));
    if let Some(o) = spec.as_object_mut() {
        o.remove("layers");
        o.insert("graph".into(), json!(graph));
        o.insert("output".into(), json!({"dim": 3, "node": "tasks", "tasks": [
            {"name": "click", "fuse": 1.0}, {"name": "like", "fuse": 0.5}, {"name": "dislike", "fuse": -0.5}]}));
    }
    let refs: Vec<(&str, Vec<usize>, f32)> = tensors
        .iter()
        .map(|(n, s, a)| (n.as_str(), s.clone(), *a))
        .collect();
    build(spec, &refs, seed)
}

/// [`realistic_prerank`] with one more input: target attention (r = 16) of the candidate over
/// the history's vectors.
pub fn realistic_prerank_attention(seed: u64) -> (String, Vec<u8>) {
    let (plain, _) = realistic_prerank(seed);
    let mut spec: Value = serde_json::from_str(&plain).expect("the plain spec is JSON");
    let dims = 64;
    if let Some(Value::Array(f)) = spec.get_mut("features") {
        f.push(
            json!({"name": "din", "type": "cross", "of": "target_attention", "dim": dims,
                      "attention": {"query": "din.query", "key": "din.key"}}),
        );
    }
    let w0 = 2 * D + 1 + 4 * dims + 3;
    let tensors = [
        ("emb.device", vec![DEVICES.len() + 1, D], 0.1),
        ("emb.category", vec![CATEGORIES + 1, D], 0.1),
        ("din.query", vec![16, dims], linear_init(dims)),
        ("din.key", vec![16, dims], linear_init(dims)),
        ("mlp.0.weight", vec![64, w0], linear_init(w0)),
        ("mlp.0.bias", vec![64], linear_init(w0)),
        ("mlp.2.weight", vec![1, 64], linear_init(64)),
        ("mlp.2.bias", vec![1], linear_init(64)),
    ];
    build(spec, &tensors, seed)
}

/// The features of [`realistic_user_tower`] under another architecture, for comparing their
/// cost (`arch`): `"parallel"`, two sub-towers over every field (w0 → 128 → 32 each) joined by
/// `weighted_concat` (metric ip, the parallel two-tower's served vector); `"attention"`, three
/// branches (ids and histories → 256 → 64, context → 128 → 64, numbers → 64) joined by attention
/// fusion, then l2-normalised; `"senet"`, the plain stack with SENet over the 10 fields.
pub fn realistic_user_tower_arch(seed: u64, arch: &str) -> (String, Vec<u8>) {
    let (plain, _) = realistic_user_tower(seed);
    let mut spec: Value = serde_json::from_str(&plain).expect("the plain spec is JSON");
    let w0 = 7 * D + 3;
    let mut tensors: Vec<(String, Vec<usize>, f32)> = Vec::new();
    let mut add = |list: &[(&str, Vec<usize>, f32)]| {
        tensors.extend(
            list.iter()
                .map(|(n, s, a)| ((*n).to_owned(), s.clone(), *a)),
        )
    };
    add(&user_tables());
    let all = json!([
        "user_id",
        "country",
        "device",
        "history",
        "liked_categories",
        "age",
        "days_since_signup",
        "sessions_7d",
        "avg_watch_minutes",
        "hour"
    ]);
    let lin = |w: &str, b: &str| json!({"type": "linear", "weight": w, "bias": b});
    let obj = spec.as_object_mut().expect("object");
    match arch {
        "senet" => {
            obj.insert(
                "senet".into(),
                json!({"w1": "senet.w1", "b1": "senet.b1", "w2": "senet.w2", "b2": "senet.b2"}),
            );
            add(&[
                ("senet.w1", vec![4, 10], 0.3),
                ("senet.b1", vec![4], 0.1),
                ("senet.w2", vec![10, 4], 0.5),
                ("senet.b2", vec![10], 0.1),
                ("mlp.0.weight", vec![256, w0], linear_init(w0)),
                ("mlp.0.bias", vec![256], linear_init(w0)),
                ("mlp.2.weight", vec![256, 256], linear_init(256)),
                ("mlp.2.bias", vec![256], linear_init(256)),
                ("mlp.4.weight", vec![64, 256], linear_init(256)),
                ("mlp.4.bias", vec![64], linear_init(256)),
            ]);
        }
        "parallel" => {
            obj.remove("layers");
            obj.insert("graph".into(), json!([
                {"name": "a", "inputs": all, "layers": [lin("a.0.weight", "a.0.bias"), {"type": "relu"}, lin("a.2.weight", "a.2.bias")]},
                {"name": "b", "inputs": all, "layers": [lin("b.0.weight", "b.0.bias"), {"type": "relu"}, lin("b.2.weight", "b.2.bias")]},
                {"name": "u", "inputs": ["a", "b"], "combine": "weighted_concat", "weight": "pair.weight"}]));
            obj.insert("output".into(), json!({"dim": 64, "metric": "ip"}));
            add(&[
                ("a.0.weight", vec![128, w0], linear_init(w0)),
                ("a.0.bias", vec![128], linear_init(w0)),
                ("a.2.weight", vec![32, 128], linear_init(128)),
                ("a.2.bias", vec![32], linear_init(128)),
                ("b.0.weight", vec![128, w0], linear_init(w0)),
                ("b.0.bias", vec![128], linear_init(w0)),
                ("b.2.weight", vec![32, 128], linear_init(128)),
                ("b.2.bias", vec![32], linear_init(128)),
                ("pair.weight", vec![2], 1.0),
            ]);
        }
        "attention" => {
            obj.remove("layers");
            obj.insert("graph".into(), json!([
                {"name": "ids", "inputs": ["user_id", "history", "liked_categories"],
                 "layers": [lin("ids.0.weight", "ids.0.bias"), {"type": "relu"}, lin("ids.2.weight", "ids.2.bias")]},
                {"name": "context", "inputs": ["country", "device", "age", "hour"],
                 "layers": [lin("ctx.0.weight", "ctx.0.bias"), {"type": "relu"}, lin("ctx.2.weight", "ctx.2.bias")]},
                {"name": "numbers", "inputs": ["days_since_signup", "sessions_7d", "avg_watch_minutes"],
                 "layers": [lin("num.0.weight", "num.0.bias")]},
                {"name": "fused", "inputs": ["ids", "context", "numbers"], "combine": "attention", "weight": "att.weight", "bias": "att.bias"},
                {"name": "out", "inputs": ["fused"], "layers": [{"type": "l2_normalize"}]}]));
            add(&[
                ("ids.0.weight", vec![256, 3 * D], linear_init(3 * D)),
                ("ids.0.bias", vec![256], linear_init(3 * D)),
                ("ids.2.weight", vec![64, 256], linear_init(256)),
                ("ids.2.bias", vec![64], linear_init(256)),
                ("ctx.0.weight", vec![128, 4 * D], linear_init(4 * D)),
                ("ctx.0.bias", vec![128], linear_init(4 * D)),
                ("ctx.2.weight", vec![64, 128], linear_init(128)),
                ("ctx.2.bias", vec![64], linear_init(128)),
                ("num.0.weight", vec![64, 3], linear_init(3)),
                ("num.0.bias", vec![64], linear_init(3)),
                ("att.weight", vec![3, 192], linear_init(192)),
                ("att.bias", vec![3], 0.1),
            ]);
        }
        other => panic!("unknown architecture {other}"),
    }
    let refs: Vec<(&str, Vec<usize>, f32)> = tensors
        .iter()
        .map(|(n, s, a)| (n.as_str(), s.clone(), *a))
        .collect();
    build(spec, &refs, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic() {
        assert_eq!(realistic_user_tower(7), realistic_user_tower(7));
        assert_ne!(realistic_user_tower(7).1, realistic_user_tower(8).1);
        assert_eq!(realistic_user_input(1, 5), realistic_user_input(1, 5));
        assert_ne!(realistic_user_input(1, 5), realistic_user_input(1, 6));
        assert_eq!(realistic_item_input(1, 5), realistic_item_input(1, 5));
    }
}
