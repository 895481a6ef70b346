#!/usr/bin/env python3
"""Generate the golden fixtures for the tower model format (docs/model-format.md).

    python3 tests/golden/make_fixtures.py

Deterministic: weights come from numpy's legacy RandomState (its stream is frozen across numpy
versions) with a fixed seed, files are written with fixed JSON formatting, so re-running
reproduces byte-identical files. Writes, next to this script:

    spec.json, weights.safetensors, inputs.json, expected.json, invalid_inputs.json   (user tower)
    item/spec.json, item/weights.safetensors, item/inputs.json, item/expected.json    (item tower)
    graph/ (a graph user tower), attention/ and multitask/ (pre-rank models; multitask/ also
    has invalid_specs.json)                                      (see README.md)
    README.md                                                        (what each input case tests)

expected.json holds tower_ref.embed() of every input (float64, shortest round-trip repr); the
vectorised tower_ref.embed_batch() is checked against it before anything is written.
Needs only numpy.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, HERE)
import tower_ref  # noqa: E402

SEED = 20251124
DIM = 8

# ----------------------------------------------------------------------------------------------
# safetensors writer (pure Python)

_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}


def f32_bytes(a) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def f16_bytes(a) -> bytes:
    return np.ascontiguousarray(a, dtype="<f2").tobytes()


def bf16_bits(a) -> np.ndarray:
    """float -> bfloat16 bit patterns (via f32, round to nearest, ties to even; finite only)."""
    bits = np.ascontiguousarray(a, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2")


def bf16_bytes(a) -> bytes:
    return bf16_bits(a).tobytes()


def encode(dtype: str, a) -> bytes:
    if dtype == "F32":
        return f32_bytes(a)
    if dtype == "F16":
        return f16_bytes(a)
    if dtype == "BF16":
        return bf16_bytes(a)
    if dtype == "I64":
        return np.ascontiguousarray(a, dtype="<i8").tobytes()
    raise ValueError(dtype)


def write_safetensors(tensors: dict, metadata: dict | None = None) -> bytes:
    """tensors: name -> (dtype, shape, raw bytes). Laid out like the safetensors library does
    (larger element sizes first, then by name), header padded with spaces to 8 bytes."""
    order = sorted(tensors, key=lambda n: (-_SIZE[tensors[n][0]], n))
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    blobs, pos = [], 0
    for name in order:
        dtype, shape, raw = tensors[name]
        assert len(raw) == math.prod(shape) * _SIZE[dtype], name
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    hdr = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hdr += b" " * (-len(hdr) % 8)
    return struct.pack("<Q", len(hdr)) + hdr + b"".join(blobs)


class Weights:
    """Collects generated tensors (drawn in a fixed order from one RandomState)."""

    def __init__(self, seed):
        self.rng = np.random.RandomState(seed)
        self.tensors = {}

    def add(self, name, values, dtype="F32"):
        values = np.asarray(values, dtype=np.float64)
        self.tensors[name] = (dtype, values.shape, encode(dtype, values))
        return name

    def normal(self, name, shape, scale, dtype="F32", loc=0.0):
        return self.add(name, loc + scale * self.rng.standard_normal(shape), dtype)

    def uniform(self, name, shape, lo, hi, dtype="F32"):
        return self.add(name, self.rng.uniform(lo, hi, shape), dtype)

    def linear(self, prefix, n_in, n_out, bias=True, dtype="F32"):
        layer = {"type": "linear",
                 "weight": self.normal(f"{prefix}.weight", (n_out, n_in),
                                       2.0 / math.sqrt(n_in), dtype)}
        if bias:
            layer["bias"] = self.normal(f"{prefix}.bias", (n_out,), 0.1)
        return layer

    def bytes(self, metadata=None):
        return write_safetensors(self.tensors, metadata)


# ----------------------------------------------------------------------------------------------
# the user tower

ITEM_VOCAB = [str(1001 + i) for i in range(24)]


def user_model(w: Weights):
    feats = [
        {"name": "user_id", "type": "categorical",
         "embedding": w.normal("tables.user_id.weight", (65, 4), 1.0), "hash_buckets": 64},
        {"name": "country", "type": "categorical",
         "embedding": w.normal("tables.country.weight", (6, 3), 1.0, "F16"),
         "vocabulary": ["us", "fr", "de", "jp", "br"]},
        {"name": "segment", "type": "categorical",
         "embedding": w.normal("tables.segment.weight", (6, 3), 1.0),
         "vocabulary": ["1", "2", "3", "42", "-7"]},
        {"name": "is_member", "type": "categorical",
         "embedding": w.normal("tables.is_member.weight", (3, 2), 1.0),
         "vocabulary": ["false", "true"]},
        {"name": "history", "type": "multi_categorical",
         "embedding": w.normal("tables.item.weight", (len(ITEM_VOCAB) + 1, 4), 1.0),
         "vocabulary": ITEM_VOCAB, "pooling": "mean", "max_len": 5},
        {"name": "recent", "type": "multi_categorical", "embedding": "tables.item.weight",
         "vocabulary": ITEM_VOCAB, "pooling": "max", "max_len": 3},
        {"name": "tags", "type": "multi_categorical",
         "embedding": w.normal("tables.tag.weight", (17, 3), 1.0),
         "hash_buckets": 16, "pooling": "mean", "max_len": 4, "weighted": True},
        {"name": "tag_scores", "type": "multi_categorical", "embedding": "tables.tag.weight",
         "hash_buckets": 16, "pooling": "sum", "weighted": True},
        {"name": "tag_peak", "type": "multi_categorical", "embedding": "tables.tag.weight",
         "hash_buckets": 16, "pooling": "max", "weighted": True},
        {"name": "age", "type": "numeric", "transform": "zscore", "mean": 35.0, "std": 12.0,
         "default": 30.0},
        {"name": "tenure", "type": "numeric", "transform": "zscore", "mean": 3.0, "std": 2.0},
        {"name": "income", "type": "numeric", "transform": "log1p"},
        {"name": "activity", "type": "numeric", "transform": "minmax", "min": 0.0, "max": 100.0,
         "default": 50.0},
        {"name": "score", "type": "numeric", "transform": "none"},
        {"name": "days", "type": "bucketize",
         "embedding": w.normal("tables.days.weight", (7, 2), 1.0),
         "boundaries": [0.0, 7.0, 30.0, 90.0, 365.0]},
        {"name": "user_vec", "type": "dense", "dim": 4},
    ]
    nf = len(feats)
    senet = {"w1": w.normal("senet.fc1.weight", (4, nf), 0.15),
             "b1": w.normal("senet.fc1.bias", (4,), 0.1),
             "w2": w.normal("senet.fc2.weight", (nf, 4), 0.8),
             "b2": w.normal("senet.fc2.bias", (nf,), 0.1, loc=0.5)}
    width = 4 + 3 + 3 + 2 + 4 + 4 + 3 + 3 + 3 + 1 + 1 + 1 + 1 + 1 + 2 + 4   # 40
    layers = [
        w.linear("layers.0", width, 24, dtype="BF16"),                        # 0
        {"type": "batchnorm",                                                 # 1
         "weight": w.normal("layers.1.weight", (24,), 0.1, loc=1.0),
         "bias": w.normal("layers.1.bias", (24,), 0.1),
         "running_mean": w.normal("layers.1.running_mean", (24,), 0.3),
         "running_var": w.uniform("layers.1.running_var", (24,), 0.5, 2.0),
         "eps": 0.001},
        {"type": "relu"},                                                     # 2
        {"type": "dropout", "p": 0.1},                                        # 3
        w.linear("layers.4", 24, 16),                                         # 4
        {"type": "gelu"},                                                     # 5
        {"type": "layernorm",                                                 # 6
         "weight": w.normal("layers.6.weight", (16,), 0.1, loc=1.0),
         "bias": w.normal("layers.6.bias", (16,), 0.1)},
        w.linear("layers.7", 16, 12, bias=False),                             # 7
        {"type": "tanh"},                                                     # 8
        {"type": "dropout", "p": 0.2},                                        # 9
        w.linear("layers.10", 12, 10),                                        # 10
        {"type": "sigmoid"},                                                  # 11
        {"type": "shortcut", "fields": ["age", "user_vec"]},                  # 12
        w.linear("layers.13", 10 + 1 + 4, DIM),                               # 13
        {"type": "l2_normalize"},                                             # 14
    ]
    # PyTorch BatchNorm bookkeeping: must be ignored by the importer
    w.tensors["layers.1.num_batches_tracked"] = ("I64", (), encode("I64", [1234]))
    spec = {"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
            "features": feats, "senet": senet, "layers": layers,
            "output": {"dim": DIM, "metric": "cosine"}}
    return spec


def graph_model(w: Weights):
    """The user tower's features and SENet under a graph of every node kind: three sub-towers
    over feature subsets, attention fusion, a weighted sum, a plain sum, a weighted
    concatenation, a concatenation with a feature read directly, and a head (listed first: the
    order in the file is free)."""
    base = user_model(w)
    for n in [n for n in w.tensors if n.startswith("layers.")]:
        del w.tensors[n]
    lin = w.linear
    graph = [
        {"name": "out", "inputs": ["cat"], "layers": [
            lin("graph.out.0", 34, DIM),
            {"type": "layernorm", "weight": w.normal("graph.out.1.weight", (DIM,), 0.1, loc=1.0),
             "bias": w.normal("graph.out.1.bias", (DIM,), 0.1)},
            {"type": "l2_normalize"}]},
        {"name": "deep", "inputs": ["user_id", "country", "history", "age", "income"], "layers": [
            lin("graph.deep.0", 13, 12), {"type": "relu"}, lin("graph.deep.2", 12, 8)]},
        {"name": "wide", "inputs": ["segment", "tags", "score", "days"], "layers": [
            lin("graph.wide.0", 9, 8, bias=False), {"type": "tanh"}]},
        {"name": "vec", "inputs": ["user_vec", "is_member", "activity", "tenure"], "layers": [
            lin("graph.vec.0", 8, 8), {"type": "gelu"}]},
        {"name": "fused", "inputs": ["deep", "wide", "vec"], "combine": "attention",
         "weight": w.normal("graph.fused.weight", (3, 24), 0.5),
         "bias": w.normal("graph.fused.bias", (3,), 0.2)},
        {"name": "mix", "inputs": ["deep", "wide"], "combine": "weighted_sum",
         "weight": w.normal("graph.mix.weight", (2,), 0.7, loc=0.5)},
        {"name": "both", "inputs": ["wide", "vec"], "combine": "sum"},
        {"name": "scaled", "inputs": ["mix", "tag_scores", "tag_peak"], "combine": "weighted_concat",
         "weight": w.normal("graph.scaled.weight", (3,), 0.7, loc=0.5)},
        {"name": "cat", "inputs": ["fused", "scaled", "both", "recent"], "combine": "concat"},
    ]
    return {"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
            "features": base["features"], "senet": base["senet"], "graph": graph,
            "output": {"dim": DIM, "metric": "cosine", "node": "out"}}


def attention_model(w: Weights):
    """A pre-rank model reading a user number, an item number, the item vector and target
    attention over the history (d = 8, r = 4), then Linear 18 -> 6, ReLU, Linear 6 -> 1."""
    d, r = 8, 4
    return {
        "format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
        "features": [
            {"name": "age", "type": "numeric", "transform": "zscore", "mean": 40.0, "std": 15.0},
            {"name": "price", "type": "numeric", "transform": "log1p", "source": "item"},
            {"name": "v", "type": "cross", "of": "item_vector", "dim": d},
            {"name": "din", "type": "cross", "of": "target_attention", "dim": d,
             "attention": {"query": w.normal("din.query", (r, d), 1.0),
                           "key": w.normal("din.key", (r, d), 1.0)}},
        ],
        "layers": [w.linear("mlp.0", 1 + 1 + 2 * d, 6), {"type": "relu"}, w.linear("mlp.1", 6, 1)],
        "output": {"dim": 1},
    }


def prerank_attention_ref(tensors, case):
    """The attention model's score of one case in float64: q = Wq v, k_i = Wk h_i,
    alpha = softmax(q.k / sqrt(r)), din = sum alpha_i h_i (zeros without history)."""
    wq, wk = tensors["din.query"], tensors["din.key"]
    v = np.asarray(case["v"], dtype=np.float64)
    hist = [np.asarray(h, dtype=np.float64) for h in case["history"]]
    if hist:
        q = wq @ v
        s = np.array([q @ (wk @ h) for h in hist]) / math.sqrt(wq.shape[0])
        a = np.exp(s - s.max())
        a /= a.sum()
        din = sum(ai * h for ai, h in zip(a, hist))
    else:
        din = np.zeros_like(v)
    x = np.concatenate([[(case["user"]["age"] - 40.0) / 15.0], [math.log1p(max(case["item"]["price"], 0.0))], v, din])
    h = np.maximum(tensors["mlp.0.weight"] @ x + tensors["mlp.0.bias"], 0.0)
    return float((tensors["mlp.1.weight"] @ h + tensors["mlp.1.bias"])[0])


def attention_cases(rng):
    unit = lambda x: (x / np.linalg.norm(x)).round(6).tolist()
    cases = []
    for n in (0, 1, 2, 5, 12):
        v = rng.standard_normal(8)
        hist = [rng.standard_normal(8) for _ in range(n)]
        if n == 5:
            hist[2] = v + 0.05 * rng.standard_normal(8)   # one history item close to the candidate
        cases.append({"user": {"age": float(round(rng.uniform(18, 70), 2))},
                      "item": {"price": float(round(rng.uniform(1, 100), 2))},
                      "u": unit(rng.standard_normal(8)), "v": unit(v), "history": [unit(h) for h in hist]})
    return cases


def build_attention(outdir, w: Weights):
    spec = attention_model(w)
    cases = attention_cases(np.random.RandomState(SEED + 4))
    tensors = {n: np.frombuffer(b, dtype="<f4").astype(np.float64).reshape(shape)
               for n, (dt, shape, b) in w.tensors.items()}
    expected = [prerank_attention_ref(tensors, c) for c in cases]
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "spec.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(spec, indent=2, allow_nan=False) + "\n")
    with open(os.path.join(outdir, "weights.safetensors"), "wb") as f:
        f.write(w.bytes({"format": "pt"}))
    with open(os.path.join(outdir, "cases.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(cases, indent=1) + "\n")
    with open(os.path.join(outdir, "expected.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(expected) + "\n")


# ----------------------------------------------------------------------------------------------
# the multi-task pre-rank model (multitask/): a scene gate, PLE experts, MMoE gates, task heads

MT_TASKS = [{"name": "rated", "link": "sigmoid", "fuse": 1.0},
            {"name": "liked", "link": "sigmoid", "fuse": 0.5},
            {"name": "minutes", "link": "identity", "fuse": -0.25}]
MT_SCENES = ["home", "search", "feed", "detail"]
MT_SHARED = ["user_id", "age", "category", "price", "duration", "u", "v", "uv"]
MT_EXPERT = 8      # width of every expert
MT_HEAD = 6        # hidden width of every task head


def multitask_model(w: Weights):
    """A multi-task pre-rank model (PLE-style, with a scene gate): user features (`scene`, a
    categorical read only through gate_inputs; a hashed `user_id`; `age`), item features
    (`category`, `price`, `duration`) and three cross inputs (u, v, u*v, d = 8).

    shared_in = scale(the shared fields; gate_inputs scene)            x * 2 sigmoid(W s + b)
    expert_s0, expert_s1, expert_<task> = [linear(34 -> 8), relu](shared_in)
    gate_<task> = gate(expert_s0, expert_s1, expert_<task>; gate_inputs scene)   (liked: no bias)
    resid_minutes = sum(gate_minutes, expert_minutes)
    head_<task> = [linear(8 -> 6), relu, linear(6 -> 1)](gate_<task>, or resid_minutes)
    logits = concat(head_rated, head_liked, head_minutes); tasks rated, liked, minutes."""
    d = DIM
    feats = [
        {"name": "scene", "type": "categorical",
         "embedding": w.normal("tables.scene.weight", (len(MT_SCENES) + 1, 4), 1.0),
         "vocabulary": MT_SCENES},
        {"name": "user_id", "type": "categorical", "source": "user",
         "embedding": w.normal("tables.user_id.weight", (33, 4), 0.7), "hash_buckets": 32},
        {"name": "age", "type": "numeric", "transform": "zscore", "mean": 35.0, "std": 12.0},
        {"name": "category", "type": "categorical", "source": "item",
         "embedding": w.normal("tables.category.weight", (6, 3), 0.7),
         "vocabulary": ["news", "sports", "music", "film", "games"]},
        {"name": "price", "type": "numeric", "transform": "log1p", "source": "item"},
        {"name": "duration", "type": "numeric", "transform": "minmax", "min": 0.0, "max": 600.0,
         "default": 120.0, "source": "item"},
        {"name": "u", "type": "cross", "of": "user_vector", "dim": d},
        {"name": "v", "type": "cross", "of": "item_vector", "dim": d},
        {"name": "uv", "type": "cross", "of": "product", "dim": d},
    ]
    n = 4 + 1 + 3 + 1 + 1 + 3 * d          # 34: the shared fields side by side
    names = [t["name"] for t in MT_TASKS]
    graph = [{"name": "shared_in", "inputs": MT_SHARED, "combine": "scale",
              "gate_inputs": ["scene"],
              "weight": w.normal("graph.shared_in.weight", (n, 4), 0.4),
              "bias": w.normal("graph.shared_in.bias", (n,), 0.2)}]
    for e in ["s0", "s1"] + names:
        graph.append({"name": f"expert_{e}", "inputs": ["shared_in"], "layers": [
            {"type": "linear",
             "weight": w.normal(f"graph.expert_{e}.0.weight", (MT_EXPERT, n), 2.0 / math.sqrt(n)),
             "bias": w.normal(f"graph.expert_{e}.0.bias", (MT_EXPERT,), 0.2, loc=0.1)},
            {"type": "relu"}]})
    for t in names:
        node = {"name": f"gate_{t}", "inputs": ["expert_s0", "expert_s1", f"expert_{t}"],
                "combine": "gate", "gate_inputs": ["scene"],
                "weight": w.normal(f"graph.gate_{t}.weight", (3, 4), 0.5)}
        if t != "liked":
            node["bias"] = w.normal(f"graph.gate_{t}.bias", (3,), 0.3)
        graph.append(node)
    graph.append({"name": "resid_minutes", "inputs": ["gate_minutes", "expert_minutes"],
                  "combine": "sum"})
    for t in names:
        graph.append({"name": f"head_{t}",
                      "inputs": ["resid_minutes" if t == "minutes" else f"gate_{t}"], "layers": [
            {"type": "linear",
             "weight": w.normal(f"graph.head_{t}.0.weight", (MT_HEAD, MT_EXPERT),
                                2.0 / math.sqrt(MT_EXPERT)),
             "bias": w.normal(f"graph.head_{t}.0.bias", (MT_HEAD,), 0.1)},
            {"type": "relu"},
            {"type": "linear",
             "weight": w.normal(f"graph.head_{t}.2.weight", (1, MT_HEAD), 1.5 / math.sqrt(MT_HEAD)),
             "bias": w.normal(f"graph.head_{t}.2.bias", (1,), 0.2)}]})
    graph.append({"name": "logits", "inputs": [f"head_{t}" for t in names], "combine": "concat"})
    return {"format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
            "features": feats, "graph": graph,
            "output": {"dim": len(MT_TASKS), "node": "logits", "tasks": MT_TASKS}}


def prerank_multitask_ref(tensors, case, dt=np.float64):
    """The multitask model's logits of one case, written out with numpy matrix products straight
    from the tensors (a second implementation, independent of tower_ref's graph code). dt=float32
    runs it in f32, as an f32 engine would."""
    T = {k: t.astype(dt) for k, t in tensors.items()}
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    relu = lambda z: np.maximum(z, 0.0)
    user, item = case["user"], case["item"]
    u, v = np.asarray(case["u"], dtype=dt), np.asarray(case["v"], dtype=dt)
    scene = T["tables.scene.weight"][{s: i + 1 for i, s in enumerate(MT_SCENES)}.get(
        user.get("scene"), 0)]
    uid = user.get("user_id")
    uid_row = 0 if uid is None else 1 + tower_ref.fnv1a64(tower_ref.canonical_id(uid)) % 32
    cat = {c: i + 1 for i, c in enumerate(["news", "sports", "music", "film", "games"])}
    age = 0.0 if user.get("age") is None else (user["age"] - 35.0) / 12.0
    price = 0.0 if item.get("price") is None else math.log1p(max(item["price"], 0.0))
    dur = 120.0 if item.get("duration") is None else item["duration"]
    x = np.concatenate([T["tables.user_id.weight"][uid_row], np.array([age], dtype=dt),
                        T["tables.category.weight"][cat.get(item.get("category"), 0)],
                        np.array([price, min(max(dur / 600.0, 0.0), 1.0)], dtype=dt), u, v, u * v])
    x = x * 2.0 * sig(T["graph.shared_in.weight"] @ scene + T["graph.shared_in.bias"])
    experts = {e: relu(T[f"graph.expert_{e}.0.weight"] @ x + T[f"graph.expert_{e}.0.bias"])
               for e in ["s0", "s1", "rated", "liked", "minutes"]}
    logits = []
    for t in ("rated", "liked", "minutes"):
        s = T[f"graph.gate_{t}.weight"] @ scene
        if f"graph.gate_{t}.bias" in T:
            s = s + T[f"graph.gate_{t}.bias"]
        a = np.exp(s - s.max())
        a /= a.sum()
        g = a[0] * experts["s0"] + a[1] * experts["s1"] + a[2] * experts[t]
        if t == "minutes":
            g = g + experts["minutes"]
        hdn = relu(T[f"graph.head_{t}.0.weight"] @ g + T[f"graph.head_{t}.0.bias"])
        logits.append(float((T[f"graph.head_{t}.2.weight"] @ hdn + T[f"graph.head_{t}.2.bias"])[0]))
    return logits


def _mt_case(user, item, u, v, history=()):
    return {"user": user, "item": item, "u": u, "v": v, "history": list(history)}


def multitask_cases(rng):
    """(note, case) pairs; a case has the attention/ cases' shape: user (the request's features),
    item (the candidate's row), u, v (unit vectors) and history (item vectors)."""
    unit = lambda x: (x / np.linalg.norm(x)).round(6).tolist()
    u0, v0, v1, u1, v2, v3 = (unit(rng.standard_normal(DIM)) for _ in range(6))
    hist = [unit(rng.standard_normal(DIM)) for _ in range(3)]
    user0 = {"scene": "home", "user_id": 42, "age": 29}
    item0 = {"category": "music", "price": 9.99, "duration": 215}
    item1 = {"category": "sports", "price": 0.5, "duration": 48}
    return [
        ("typical pair, scene home", _mt_case(user0, item0, u0, v0)),
        ("case 0 in scene search: differs from case 0 only in scene",
         _mt_case(dict(user0, scene="search"), item0, u0, v0)),
        ("case 0 in scene feed", _mt_case(dict(user0, scene="feed"), item0, u0, v0)),
        ("case 0 in scene detail", _mt_case(dict(user0, scene="detail"), item0, u0, v0)),
        ("scene OOV (\"checkout\"): scene row 0", _mt_case(dict(user0, scene="checkout"), item0, u0, v0)),
        ("scene missing: row 0, same output as case 4",
         _mt_case({k: x for k, x in user0.items() if k != "scene"}, item0, u0, v0)),
        ("scene null: row 0, same output as case 4", _mt_case(dict(user0, scene=None), item0, u0, v0)),
        ("item with every feature missing: category row 0, price 0, duration default 120 -> 0.2",
         _mt_case(user0, {}, u0, v0)),
        ("unknown category (row 0), price null (0), duration above max clamps to 1",
         _mt_case(user0, {"category": "podcasts", "price": None, "duration": 1800}, u0, v0)),
        ("a history is given but this model reads none: same output as case 0",
         _mt_case(user0, item0, u0, v0, hist)),
        ("another user (string id, age missing -> 0), scene feed, another candidate",
         _mt_case({"scene": "feed", "user_id": "u-981"}, item1, u1, v1)),
        ("the user of case 1 (scene search), another candidate", _mt_case(
            dict(user0, scene="search"), {"category": "film", "price": 3.5, "duration": 5400}, u0, v2)),
        ("candidate vector equal to the user vector (u*v = u squared), scene detail",
         _mt_case(dict(user0, scene="detail", age=71.5), item1, v3, v3)),
    ]


# equal-output claims of the case notes (first, second)
MT_SAME = [(4, 5), (4, 6), (5, 6), (0, 9)]


def _json_pointer(doc, path):
    """(parent container, last key) of an RFC 6901 JSON Pointer into doc."""
    keys = [k.replace("~1", "/").replace("~0", "~") for k in path.split("/")[1:]]
    for k in keys[:-1]:
        doc = doc[int(k)] if isinstance(doc, list) else doc[k]
    return doc, keys[-1]


def apply_patch(doc, patch):
    """An RFC 6902 JSON Patch (operations add, remove, replace) applied to a copy of doc."""
    doc = copy.deepcopy(doc)
    for op in patch:
        parent, key = _json_pointer(doc, op["path"])
        if isinstance(parent, list):
            idx = len(parent) if key == "-" else int(key)
            if op["op"] == "add":
                parent.insert(idx, copy.deepcopy(op["value"]))
            elif op["op"] == "remove":
                del parent[idx]
            elif op["op"] == "replace":
                parent[idx] = copy.deepcopy(op["value"])
            else:
                raise ValueError(op["op"])
        else:
            if op["op"] in ("add", "replace"):
                if op["op"] == "replace" and key not in parent:
                    raise KeyError(op["path"])
                parent[key] = copy.deepcopy(op["value"])
            elif op["op"] == "remove":
                del parent[key]
            else:
                raise ValueError(op["op"])
    return doc


def _add(path, value):
    return {"op": "add", "path": path, "value": value}


def _rep(path, value):
    return {"op": "replace", "path": path, "value": value}


def _rem(path):
    return {"op": "remove", "path": path}


def multitask_invalid(spec):
    """Specs every implementation must reject: (why, base fixture, RFC 6902 patch of the base's
    spec.json, a fragment of tower_ref's error message, checked so that each spec fails for the
    reason given). Graph node indices: 0 shared_in, 1-5 experts, 6 gate_rated, 7 gate_liked,
    8 gate_minutes, 9 resid_minutes, 10-12 heads, 13 logits."""
    idx = {n["name"]: i for i, n in enumerate(spec["graph"])}
    assert (idx["shared_in"], idx["gate_rated"], idx["gate_liked"], idx["resid_minutes"],
            idx["expert_s0"]) == (0, 6, 7, 9, 1)
    eight = [{"name": f"t{i}"} for i in range(8)]
    return [
        ("gate with inputs of different widths (shared_in is 34 wide, the experts 8)", "multitask",
         [_rep("/graph/6/inputs/1", "shared_in")], "one width"),
        ("gate with one input (its [3, 4] weight is then of the wrong shape too)", "multitask",
         [_rep("/graph/6/inputs", ["expert_rated"])], "at least 2 inputs"),
        ("gate weight of the wrong shape ([3, 4], but gate_inputs scene, age are 5 wide)",
         "multitask", [_add("/graph/6/gate_inputs/-", "age")], "has shape"),
        ("scale weight of the wrong shape ([34, 4], but gate_inputs scene, age are 5 wide)",
         "multitask", [_add("/graph/0/gate_inputs/-", "age")], "has shape"),
        ("gate_inputs on a sum node", "multitask",
         [_add("/graph/9/gate_inputs", ["scene"])], "only for gate and scale"),
        ("gate_inputs on a stack node", "multitask",
         [_add("/graph/1/gate_inputs", ["scene"])], "only for gate and scale"),
        ("scale without gate_inputs", "multitask", [_rem("/graph/0/gate_inputs")], "needs gate_inputs"),
        ("gate without gate_inputs", "multitask", [_rem("/graph/7/gate_inputs")], "needs gate_inputs"),
        ("gate_inputs empty (the scale's [34, 4] weight then has the wrong shape too)", "multitask", [_rep("/graph/0/gate_inputs", [])], "1 to 64"),
        ("gate_inputs with a duplicate name (scene twice is 8 wide: the [3, 4] weight is wrong too)",
         "multitask",
         [_rep("/graph/7/gate_inputs", ["scene", "scene"])], "duplicate"),
        ("gate_inputs naming neither a node nor a feature", "multitask",
         [_rep("/graph/7/gate_inputs", ["scenery"])], "unknown input"),
        ("a cycle through gate_inputs (shared_in -> gate_rated -> expert_s0 -> shared_in; "
         "gate_rated is 8 wide, so the [34, 4] weight is wrong too)",
         "multitask", [_rep("/graph/0/gate_inputs", ["gate_rated"])], "cycle"),
        ("tasks on a user tower (dim 8, 8 tasks)", "graph",
         [_add("/output/tasks", eight)], "only a prerank model"),
        ("tasks on an item tower (dim 8, 8 tasks)", "item",
         [_add("/output/tasks", eight)], "only a prerank model"),
        ("dim 3 but 2 tasks", "multitask", [_rem("/output/tasks/2")], "must equal the number"),
        ("a prerank model without tasks has dim 1 (here 3)", "multitask",
         [_rem("/output/tasks")], "has dim 1"),
        ("tasks empty (dim 3 is then not the number of tasks either)", "multitask", [_rep("/output/tasks", [])], "1 to 16"),
        ("duplicate task name", "multitask", [_rep("/output/tasks/1/name", "rated")], "duplicate"),
        ('a task named "fused"', "multitask", [_rep("/output/tasks/2/name", "fused")], '"fused"'),
        ("task name not a feature-style name", "multitask",
         [_rep("/output/tasks/1/name", "liked-it")], "bad task name"),
        ("every fuse weight 0", "multitask",
         [_rep(f"/output/tasks/{t}/fuse", 0) for t in range(3)], "every fuse weight is 0"),
        ("unknown link", "multitask", [_rep("/output/tasks/0/link", "softmax")], "link must be"),
        ("fuse not a number (a string)", "multitask", [_rep("/output/tasks/0/fuse", "1.0")],
         "finite number"),
        ("unknown key in a task", "multitask", [_add("/output/tasks/0/weight", 1.0)], "unknown key"),
    ]


def build_multitask(outdir, w: Weights, others):
    """others: {"graph": (spec, weights bytes), "item": ...}, the bases of some invalid specs."""
    spec = multitask_model(w)
    spec_text = json.dumps(spec, indent=2, allow_nan=False) + "\n"
    wbytes = w.bytes({"format": "pt"})
    model = tower_ref.load_model_bytes(spec_text, wbytes)
    notes_cases = multitask_cases(np.random.RandomState(SEED + 6))
    cases = json.loads(json.dumps([c for _, c in notes_cases]))  # what the file says
    tensors = {n: np.frombuffer(b, dtype="<f4").astype(np.float64).reshape(shape)
               for n, (dt, shape, b) in w.tensors.items()}
    expected, logits, f32err = [], [], 0.0
    for i, c in enumerate(cases):
        row = tower_ref.prerank_forward(model, c["user"], c["item"], c["u"], c["v"], c["history"])
        direct = prerank_multitask_ref(tensors, c)
        diff = float(np.max(np.abs(row - np.array(direct))))
        if diff > 1e-12:
            raise SystemExit(f"multitask case {i}: tower_ref and the direct numpy disagree by {diff}")
        f32err = max(f32err, float(np.max(np.abs(
            np.array(prerank_multitask_ref(tensors, c, np.float32), dtype=np.float64) - row))))
        scores, fused = tower_ref.task_scores(model, row)
        logits.append(row)
        expected.append({"logits": row.tolist(), "scores": scores, "fused": fused})
    # the claims of the notes: equal where said, clearly different elsewhere; sigmoids unsaturated
    L = np.array(logits)
    for a, b in MT_SAME:
        assert np.array_equal(L[a], L[b]), (a, b)
    for a in range(len(L)):
        for b in range(a + 1, len(L)):
            if (a, b) not in MT_SAME:
                assert np.max(np.abs(L[a] - L[b])) > 1e-3, (a, b)
    assert np.all(np.abs(L[:, :2]) < 3.0), L
    # invalid specs, each rejected for its reason
    bases = {"multitask": spec}
    base_w = {"multitask": wbytes}
    for sub, (ospec, ow) in others.items():
        bases[sub] = json.loads(json.dumps(ospec))
        base_w[sub] = ow
    invalid = []
    for why, base, patch, fragment in multitask_invalid(spec):
        bad = apply_patch(bases[base], patch)
        try:
            tower_ref.load_model_bytes(json.dumps(bad), base_w[base])
        except tower_ref.ModelError as e:
            if fragment not in str(e):
                raise SystemExit(f"invalid spec {why!r} rejected for another reason: {e}")
        else:
            raise SystemExit(f"invalid spec accepted: {why}")
        invalid.append({"why": why, "base": base, "patch": patch, "spec": bad})
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "spec.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(spec_text)
    with open(os.path.join(outdir, "weights.safetensors"), "wb") as f:
        f.write(wbytes)
    with open(os.path.join(outdir, "cases.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(cases, indent=1) + "\n")
    dump_json(expected, os.path.join(outdir, "expected.json"))
    dump_json(invalid, os.path.join(outdir, "invalid_specs.json"))
    assert f32err < 1e-5, f32err
    mindiff = min(float(np.max(np.abs(L[a] - L[b]))) for a in range(len(L))
                  for b in range(a + 1, len(L)) if (a, b) not in MT_SAME)
    return model, spec, wbytes, notes_cases, invalid, f32err, math.floor(mindiff * 10) / 10


def W(ids, weights):
    return {"ids": ids, "weights": weights}


FULL = {
    "user_id": 42, "country": "fr", "segment": "2", "is_member": True,
    "history": [1001, 1002, 1003], "recent": [1005, 1001],
    "tags": W(["sport", "news"], [1.0, 2.0]),
    "tag_scores": W(["sport", "tech", "news"], [0.5, 1.5, -0.25]),
    "tag_peak": W(["music", "news"], [1.0, 0.5]),
    "age": 28, "tenure": 4.5, "income": 52000, "activity": 73.5, "score": 0.25,
    "days": 45, "user_vec": [0.1, -0.2, 0.3, 0.05],
}


def with_(**kw):
    d = dict(FULL)
    d.update(kw)
    return d


def without(*keys):
    return {k: v for k, v in FULL.items() if k not in keys}


# (note, features). Indices are stable: the Rust tests may refer to them.
USER_CASES = [
    ("typical user, every feature present", FULL),
    ("empty object: every feature missing (OOV rows, numeric defaults/0, dense zeros)", {}),
    ("every feature null: same output as case 1", {k: None for k in FULL}),
    ('user_id as the string "42": same output as case 0', with_(user_id="42")),
    ("user_id as 42.0 (integral float is the integer 42): same output as case 0",
     with_(user_id=42.0)),
    ("negative ids: user_id -7 hashes \"-7\"; segment -7 is vocabulary \"-7\"",
     with_(user_id=-7, segment=-7)),
    ("user_id 9007199254740993 (2^53+1): canonical string is the exact decimal",
     with_(user_id=9007199254740993)),
    ("non-ASCII hashed id (UTF-8 bytes); country is case-sensitive: \"FR\" is OOV",
     with_(user_id="usér-日本", country="FR")),
    ("segment 42 as a number matches vocabulary \"42\"", with_(segment=42)),
    ("segment 42.0 matches vocabulary \"42\": same output as case 8", with_(segment=42.0)),
    ('segment as the string "42.0" is not "42": OOV row 0', with_(segment="42.0")),
    ("unknown ids: segment 99 and country \"xx\" use row 0; is_member false",
     with_(segment=99, country="xx", is_member=False)),
    ('is_member as the string "true": same row as JSON true, same output as case 0',
     with_(is_member="true")),
    ('is_member "yes" is not in the vocabulary: row 0', with_(is_member="yes")),
    ('user_id true hashes the string "true"', with_(user_id=True)),
    ('user_id "042" is a different string from 42', with_(user_id="042")),
    ("empty history and recent: both give the OOV row e_0 (mean and max alike)",
     with_(history=[], recent=[])),
    ("history longer than max_len 5: only the first 5 ids (the rest includes unknown ids)",
     with_(history=[1010, 1011, 1012, 1013, 1014, 1015, 9999, "abc"])),
    ("history mixing strings, numbers, 1003.0 and an unknown id (row 0 pooled like others)",
     with_(history=["1001", 1002, 1003.0, 5555])),
    ("history and recent of only unknown ids: pooled row 0s = e_0: same output as case 16",
     with_(history=[1, 2, 3], recent=[7])),
    ("duplicate ids: mean of the same row", with_(history=[1004, 1004, 1004])),
    ("recent longer than max_len 3 with max pooling",
     with_(recent=[1020, 1021, 1022, 1023, 1024])),
    ("weighted mean with weights summing to zero (0.5, -0.5): zero vector",
     with_(tags=W(["sport", "news"], [0.5, -0.5]))),
    ("all-zero weights: mean -> zeros, sum -> zeros, max -> max of 0*e = zeros",
     with_(tags=W(["a", "b"], [0, 0]), tag_scores=W(["a"], [0.0]),
           tag_peak=W(["a", "b"], [0, 0]))),
    ("weighted lists with empty ids: OOV row e_0 for mean, sum and max",
     with_(tags=W([], []), tag_scores=W([], []), tag_peak=W([], []))),
    ("weighted max with negative weights: element-wise max of w*e (not w*max e)",
     with_(tag_peak=W(["sport", "news", "tech"], [-1.0, -2.0, 0.5]))),
    ("weighted mean longer than max_len 4: ids and weights truncated together",
     with_(tags=W(["a", "b", "c", "d", "e", "f"], [1, 2, 3, 4, 100, 100]))),
    ("integer weights and integer ids in hashed lists (7 and \"7\" hash alike)",
     with_(tag_scores=W([7, "7", -3], [1, 2, 3]))),
    ("numeric missing: age -> default 30, tenure -> 0 (no default, not (0-3)/2), "
     "income -> 0, activity -> default 50 -> 0.5, score -> 0",
     without("age", "tenure", "income", "activity", "score")),
    ("numeric null: same output as case 28",
     with_(age=None, tenure=None, income=None, activity=None, score=None)),
    ("log1p of a negative income (-100) is ln(1 + 0) = 0; tenure 0 is (0 - 3)/2 = -1.5",
     with_(income=-100, tenure=0)),
    ("minmax below the range clamps to 0", with_(activity=-20)),
    ("minmax above the range clamps to 1; bucketize far above the last boundary -> row 6",
     with_(activity=150.5, days=1000.5)),
    ("minmax exactly at min and integer age 40", with_(activity=0, age=40)),
    ("minmax exactly at max and age 40.0: age same as case 33", with_(activity=100, age=40.0)),
    ("bucketize exactly on b_0 = 0 -> row 2; score negative", with_(days=0, score=-3.5)),
    ("bucketize exactly on 7 -> row 3", with_(days=7)),
    ("bucketize exactly on 30 (given as 30.0) -> row 4, like 45 in case 0: same output as case 0",
     with_(days=30.0)),
    ("bucketize exactly on 90 -> row 5", with_(days=90)),
    ("bucketize exactly on the last boundary 365 -> row 6 (m + 1)", with_(days=365)),
    ("bucketize below b_0 (-1) -> row 1", with_(days=-1)),
    ("bucketize just under 7 (6.999) -> row 2; dense all zeros",
     with_(days=6.999, user_vec=[0, 0, 0, 0])),
    ("dense of integers; days missing -> row 0", without("days") | {"user_vec": [1, 2, 3, 4]}),
    ("dense missing -> zeros", without("user_vec")),
    ("mostly missing: only history and age", {"history": [1007, 1008], "age": 61}),
]

# Inputs every implementation must reject (InputError), one reason each.
INVALID_USER_INPUTS = [
    ("a key that is not a feature (user towers are strict)", {"user_id": 42, "not_a_feature": [1, 2]}),
    ("categorical id 42.5 is not integral", {"user_id": 42.5}),
    ("categorical value is a list", {"segment": [1, 2]}),
    ("categorical value is an object", {"country": {"code": "fr"}}),
    ("non-integral id inside a list", {"history": [1001, 42.5]}),
    ("multi_categorical value is not a list", {"history": 1001}),
    ("nested list inside a list", {"history": [1001, [1002]]}),
    ("weighted feature given a plain list", {"tags": ["a", "b"]}),
    ("weighted ids and weights of different lengths", {"tags": W(["a", "b"], [1.0])}),
    ("weighted weight is a string", {"tags": W(["a"], ["1"])}),
    ("weighted object without weights", {"tags": {"ids": ["a"]}}),
    ("unweighted feature given a weighted object", {"history": W([1001], [1.0])}),
    ("numeric given a string", {"age": "35"}),
    ("numeric given a boolean", {"age": True}),
    ("bucketize given a string", {"days": "7"}),
    ("dense of the wrong length", {"user_vec": [1, 2, 3]}),
    ("dense with a null element", {"user_vec": [1, 2, 3, None]}),
    ("dense given a string", {"user_vec": "1,2,3,4"}),
    ("features is not an object", [1, 2]),
]


# ----------------------------------------------------------------------------------------------
# the item tower

def item_model(w: Weights):
    feats = [
        {"name": "item_id", "type": "categorical",
         "embedding": w.normal("tables.item_id.weight", (33, 4), 1.0), "hash_buckets": 32},
        {"name": "category", "type": "categorical",
         "embedding": w.normal("tables.category.weight", (5, 3), 1.0),
         "vocabulary": ["shoes", "shirts", "hats", "bags"]},
        {"name": "tags", "type": "multi_categorical",
         "embedding": w.normal("tables.tags.weight", (7, 3), 1.0),
         "vocabulary": ["red", "blue", "sale", "new", "eco", "kids"], "pooling": "sum"},
        {"name": "price", "type": "numeric", "transform": "log1p"},
        {"name": "img_vec", "type": "dense", "dim": 3},
    ]
    layers = [
        w.linear("layers.0", 4 + 3 + 3 + 1 + 3, 16),
        {"type": "relu"},
        w.linear("layers.2", 16, DIM),
        {"type": "l2_normalize"},
    ]
    return {"format": "pg_twotower.tower", "spec_version": 1, "kind": "item",
            "features": feats, "layers": layers, "output": {"dim": DIM, "metric": "cosine"}}


def item_row(item_id, category, tags, price, img_vec, title):
    # what to_jsonb(row) gives for: items(item_id bigint, title text, category text,
    #                                   tags text[], price numeric, img_vec real[])
    return {"item_id": item_id, "title": title, "category": category, "tags": tags,
            "price": price, "img_vec": img_vec}


ITEM_CASES = [
    ("typical row", item_row(1001, "shoes", ["red", "sale"], 59.9, [0.2, -0.1, 0.4], "Runner")),
    ("second row", item_row(1002, "hats", ["blue"], 15, [0.0, 0.3, -0.2], "Cap")),
    ("tags empty array -> e_0", item_row(1003, "bags", [], 120.0, [0.1, 0.1, 0.1], "Tote")),
    ("all nullable columns NULL", item_row(1004, None, None, None, None, None)),
    ("unknown category and an unknown tag (row 0, summed)",
     item_row(1005, "socks", ["red", "glitter"], 4.5, [1, 0, 0], "Socks")),
    ("duplicate tags are summed twice", item_row(1006, "shirts", ["eco", "eco", "kids"], 22.0,
                                                 [-0.5, 0.25, 0.125], "Tee")),
    ("price 0 and a negative price behave alike (log1p of max(x,0))",
     item_row(1007, "shirts", ["new"], 0, [0.3, 0.3, 0.3], "Free")),
    ("negative price -> 0: same as case 6 except item_id",
     item_row(1008, "shirts", ["new"], -5, [0.3, 0.3, 0.3], "Refund")),
    ("item_id as a string equals the number: same output as case 0",
     item_row("1001", "shoes", ["red", "sale"], 59.9, [0.2, -0.1, 0.4], "Runner")),
    ("large id and all tags", item_row(9223372036854775807, "bags",
                                       ["red", "blue", "sale", "new", "eco", "kids"],
                                       1999.99, [0.05, 0.9, -0.3], "Trunk")),
]


# ----------------------------------------------------------------------------------------------

def dump_json(obj, path, indent=None):
    """A JSON list with one element per line (compact elements)."""
    text = "[\n" + ",\n".join(json.dumps(x, ensure_ascii=True, allow_nan=False)
                               for x in obj) + "\n]"
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text + "\n")


def build(outdir, spec, weights: Weights, cases, invalid=None):
    os.makedirs(outdir, exist_ok=True)
    spec_text = json.dumps(spec, indent=2, allow_nan=False) + "\n"
    wbytes = weights.bytes({"format": "pt"})
    model = tower_ref.load_model_bytes(spec_text, wbytes)  # validates spec + weights
    inputs = [c for _, c in cases]
    # round-trip the inputs through JSON so the reference sees exactly what the file says
    inputs = json.loads(json.dumps(inputs))
    expected = [tower_ref.embed(model, x) for x in inputs]
    batch = tower_ref.embed_batch(model, inputs)
    diff = float(np.max(np.abs(batch - np.array(expected))))
    if diff > 1e-12:
        raise SystemExit(f"{outdir}: embed and embed_batch disagree by {diff}")
    for i, e in enumerate(expected):
        assert e.shape == (model.dim,) and abs(np.linalg.norm(e) - 1) < 1e-12, i
    if invalid:
        for why, x in invalid:
            try:
                tower_ref.embed(model, x)
            except tower_ref.InputError:
                continue
            raise SystemExit(f"invalid input accepted: {why}")
    with open(os.path.join(outdir, "spec.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(spec_text)
    with open(os.path.join(outdir, "weights.safetensors"), "wb") as f:
        f.write(wbytes)
    dump_json(inputs, os.path.join(outdir, "inputs.json"), indent=1)
    dump_json([e.tolist() for e in expected], os.path.join(outdir, "expected.json"), indent=1)
    if invalid:
        dump_json([{"why": why, "features": x} for why, x in invalid],
                  os.path.join(outdir, "invalid_inputs.json"), indent=1)
    return model


README = """\
# Golden fixtures for the tower model format

Generated by `python3 tests/golden/make_fixtures.py` (numpy only, deterministic: re-running
reproduces these files byte for byte). Do not edit by hand. The format is
[docs/model-format.md](../../docs/model-format.md); `tower_ref.py` is an independent numpy
reference implementation of it (float64 math on the stored weights).

| file | content |
|---|---|
| `spec.json`, `weights.safetensors` | a user tower using every feature kind and every layer type |
| `inputs.json` | {n_user} features objects (the `features jsonb` of `embed_user`) |
| `expected.json` | the output vector of each input (float64, shortest round-trip decimal) |
| `invalid_inputs.json` | {n_invalid} inputs that must be rejected (`why`, `features`) |
| `item/` | an item tower (same files, no invalid inputs); inputs are rows as `to_jsonb(row)` |
| `graph/` | a user tower whose layers are a graph of named nodes (every node kind), the user inputs |
| `attention/` | a pre-rank model with target attention over the history (`cases.json`: request features, item row, u, v, history; `expected.json`: scores, computed in numpy by `prerank_attention_ref` in `make_fixtures.py`) |
| `multitask/` | a multi-task pre-rank model (scene gate, PLE experts, MMoE gates, three output tasks; `cases.json` as in `attention/`; `expected.json`: logits, task scores and fused score; `invalid_specs.json`: {n_mt_invalid} specs that must be rejected); see *Multi-task pre-rank model* below |

Check an implementation with a tolerance: an f32 engine differs from the float64 reference by
about 1e-7 on these unit-norm outputs (`tower_ref.embed_batch(..., dtype=np.float32)` does), so
a bound of 1e-5 absolute per element is comfortable, while every two cases that should differ
differ by more than 1e-4. Cases documented as "same output as case N" must agree with case N to
the same tolerance.

Check the reference against the files: `python3 tests/golden/tower_ref.py tests/golden/spec.json
tests/golden/weights.safetensors tests/golden/inputs.json tests/golden/expected.json`.

## User tower

{user_model}

## User inputs

| # | what it tests |
|---|---|
{user_cases}

## Item tower

{item_model}

## Item inputs

| # | what it tests |
|---|---|
{item_cases}

## Graph tower

The user tower's features and SENet, with a graph instead of a layer stack (same inputs as the
user tower).

{graph_model}

## Multi-task pre-rank model

`multitask/`: a model of kind `"prerank"` whose graph uses the `scale` (scene gate) and `gate`
(MMoE gate) combine nodes and whose output has three tasks. `shared_in` scales the shared
fields by 2·sigmoid(W·scene + b); five experts (two shared, one per task) read it; each task's
`gate` mixes the two shared experts and its own by softmax(W·scene + b) (`gate_liked` has no
bias); `resid_minutes` adds the minutes expert back; each task's head maps its mix to one logit;
`logits` concatenates the three. `scene` is read only through `gate_inputs` (it counts as read).

| file | content |
|---|---|
| `spec.json`, `weights.safetensors` | the model |
| `cases.json` | {n_mt} (request, candidate) pairs, shaped like `attention/cases.json`: `user` (the request's features), `item` (the candidate's row), `u`, `v` (the user and item vectors: the cross inputs `u`, `v` and `uv` = u ⊙ v), `history` (item vectors; this model reads none) |
| `expected.json` | one object per case: `logits` (the output row, [3]), `scores` (task name -> link(logit): sigmoid for rated and liked, identity for minutes), `fused` (Σ fuse_t · score_t) |
| `invalid_specs.json` | {n_mt_invalid} specs that must be rejected, one object per line: `why`, `base` (the fixture directory whose `weights.safetensors` goes with the spec: `multitask`, `graph` or `item`), `patch` (the change, an RFC 6902 JSON Patch of add/remove/replace operations on the base's `spec.json`), `spec` (the patched spec, ready to import) |

`expected.json` is `tower_ref.prerank_forward` and `tower_ref.task_scores` (float64), checked in
the generator against a direct numpy evaluation of the same model (`prerank_multitask_ref` in
`make_fixtures.py`) to 1e-12; that evaluation in f32 differs from it by at most {mt_f32err}, and
the logits of any two cases not said to be equal differ by more than {mt_mindiff}.

{multitask_model}

| # | what it tests |
|---|---|
{multitask_cases}

Invalid specs (each breaks the one rule its `why` names, plus, where `why` says so, a second
rule that the first makes unavoidable; the generator checks that `tower_ref` rejects each for the
reason given):

| # | why | base |
|---|---|---|
{multitask_invalid}
"""


def describe(model, spec, wbytes):
    tensors, ignored, _ = tower_ref.read_safetensors(wbytes)
    header_len = struct.unpack("<Q", wbytes[:8])[0]
    header = json.loads(wbytes[8:8 + header_len])
    def src(f):
        if model.kind != "prerank":
            return ""
        return f" {f.cross}" if f.source == "cross" else f", {f.source}"

    lines = ["Features (field widths): " + ", ".join(
        f"`{f.name}` {f.type}{src(f)} ({f.width})" for f in model.features)
        + f"; concatenated width {model.input_width}."]
    if model.senet is not None:
        lines.append(f"SENet over {len(model.features)} fields, r = {model.senet[0].shape[0]}.")
    if model.tasks is not None:
        head = "tasks " + ", ".join(f"{t['name']} ({t['link']}, fuse {t['fuse']})"
                                    for t in model.tasks)
    else:
        head = f"metric {model.metric}"
    if "graph" in spec:
        lines.append("Graph: " + "; ".join(
            f"`{n['name']}` = {n.get('combine', 'stack of ' + str(len(n.get('layers', []))) + ' layers')}"
            f" of {', '.join(n['inputs'])}"
            + (f" gated by {', '.join(n['gate_inputs'])}" if "gate_inputs" in n else "")
            for n in spec["graph"])
            + f"; output node `{spec['output']['node']}`, dim {model.dim}, {head}.")
    else:
        lines.append("Layers: " + ", ".join(
            f"{i} {ls['type']}" for i, ls in enumerate(spec["layers"]))
            + f"; output dim {model.dim}, metric {model.metric}.")
    lines.append("Tensors: " + ", ".join(
        f"`{n}` {h['dtype']} {h['shape']}" for n, h in header.items() if n != "__metadata__")
        + ".")
    if ignored:
        lines.append("Ignored (must be accepted and skipped): " + ", ".join(ignored) + ".")
    return "\n".join(lines)


def main():
    w = Weights(SEED)
    spec = user_model(w)
    user = build(HERE, spec, w, USER_CASES, INVALID_USER_INPUTS)
    user_w = w.bytes({"format": "pt"})

    wi = Weights(SEED + 1)
    ispec = item_model(wi)
    item = build(os.path.join(HERE, "item"), ispec, wi, ITEM_CASES)

    wg = Weights(SEED + 2)
    gspec = graph_model(wg)
    graph = build(os.path.join(HERE, "graph"), gspec, wg, USER_CASES)

    build_attention(os.path.join(HERE, "attention"), Weights(SEED + 3))

    # SEED + 4 is the attention cases' stream, SEED + 6 the multitask cases'
    mt = build_multitask(os.path.join(HERE, "multitask"), Weights(SEED + 5),
                         {"graph": (gspec, wg.bytes({"format": "pt"})),
                          "item": (ispec, wi.bytes({"format": "pt"}))})

    inputs = json.loads(json.dumps([c for _, c in USER_CASES]))
    f32 = tower_ref.embed_batch(user, inputs, dtype=np.float32).astype(np.float64)
    f64 = np.array([tower_ref.embed(user, x) for x in inputs])
    f32err = float(np.max(np.abs(f32 - f64)))

    def cases_table(cases):
        return "\n".join(f"| {i} | {note.replace('|', '/')} |" for i, (note, _) in enumerate(cases))

    text = README.format(
        n_user=len(USER_CASES), n_invalid=len(INVALID_USER_INPUTS),
        user_model=describe(user, spec, user_w), user_cases=cases_table(USER_CASES),
        item_model=describe(item, ispec, wi.bytes({"format": "pt"})),
        item_cases=cases_table(ITEM_CASES),
        graph_model=describe(graph, gspec, wg.bytes({"format": "pt"})),
        n_mt=len(mt[3]), n_mt_invalid=len(mt[4]), mt_f32err=f"{mt[5]:.1e}", mt_mindiff=mt[6],
        multitask_model=describe(mt[0], mt[1], mt[2]), multitask_cases=cases_table(mt[3]),
        multitask_invalid="\n".join(f"| {i} | {c['why'].replace('|', '/')} | `{c['base']}` |"
                                     for i, c in enumerate(mt[4])))
    with open(os.path.join(HERE, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    total = 0
    for d in (HERE, os.path.join(HERE, "item"), os.path.join(HERE, "graph"), os.path.join(HERE, "attention"),
              os.path.join(HERE, "multitask")):
        for n in sorted(os.listdir(d)):
            p = os.path.join(d, n)
            if os.path.isfile(p) and not n.endswith(".py") and n != "README.md":
                total += os.path.getsize(p)
    print(f"wrote fixtures: {len(USER_CASES)} user inputs, {len(ITEM_CASES)} item inputs, "
          f"{total} bytes of fixture data; f32 vs f64 max |diff| {f32err:.2e}")


if __name__ == "__main__":
    main()
