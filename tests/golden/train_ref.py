#!/usr/bin/env python3
"""Golden fixture for the training engine: three optimisation steps of a small two-tower model,
computed in numpy independently of crates/train.

    python3 tests/golden/train_ref.py          (needs numpy; writes tests/golden/train/)

The forward pass is tower_ref (the independent implementation of docs/model-format.md), in
float64. Gradients are central finite differences of the loss in float64 (no hand-written
backward pass), so the fixture checks crates/train's backward passes, loss, logQ, masking and
optimisers together. The loss is the in-batch softmax of crates/train: logits
cos(u_i, v_j)/T - logq_j, columns holding row i's positive item (other than column i) masked,
rows weighted. Dense parameters take Adam steps; embedding tables take lazy Adam steps on the
rows the batch reads (its inputs' rows, OOV row 0 included). Writes:

    train/user_spec.json, train/item_spec.json     the towers (crates/train's layout and names)
    train/init.safetensors                         initial weights (f32, both towers)
    train/steps.json                               batches, options, per-step losses, and every
                                                   parameter after the last step (float64)
"""

import json
import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "train")
sys.dont_write_bytecode = True
sys.path.insert(0, HERE)
import tower_ref  # noqa: E402

LR, SPARSE_LR, T = 0.01, 0.05, 0.2
B1, B2, EPS = 0.9, 0.999, 1e-8

USER_SPEC = {
    "format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
    "features": [
        {"name": "user_id", "type": "categorical", "embedding": "user_id.embedding",
         "vocabulary": ["1", "2", "3", "4"]},
        {"name": "age", "type": "numeric", "transform": "zscore", "mean": 30.0, "std": 10.0},
        {"name": "history", "type": "multi_categorical", "embedding": "history.embedding",
         "vocabulary": ["10", "11", "12", "13", "14"], "pooling": "mean", "max_len": 3,
         "weighted": True},
    ],
    "layers": [
        {"type": "linear", "weight": "mlp.0.weight", "bias": "mlp.0.bias"},
        {"type": "tanh"},
        {"type": "linear", "weight": "mlp.1.weight", "bias": "mlp.1.bias"},
        {"type": "l2_normalize"},
    ],
    "output": {"dim": 3, "metric": "cosine"},
}
ITEM_SPEC = {
    "format": "pg_twotower.tower", "spec_version": 1, "kind": "item",
    "features": [
        {"name": "item_id", "type": "categorical", "embedding": "item_id.embedding",
         "vocabulary": ["10", "11", "12", "13", "14"]},
    ],
    "layers": [
        {"type": "linear", "weight": "mlp.0.weight", "bias": "mlp.0.bias"},
        {"type": "relu"},
        {"type": "linear", "weight": "mlp.1.weight", "bias": "mlp.1.bias"},
        {"type": "l2_normalize"},
    ],
    "output": {"dim": 3, "metric": "cosine"},
}
SHAPES = {
    "user": {"user_id.embedding": (5, 3), "history.embedding": (6, 3),
             "mlp.0.weight": (4, 7), "mlp.0.bias": (4,), "mlp.1.weight": (3, 4), "mlp.1.bias": (3,)},
    "item": {"item_id.embedding": (6, 3), "mlp.0.weight": (4, 3), "mlp.0.bias": (4,),
             "mlp.1.weight": (3, 4), "mlp.1.bias": (3,)},
}
ITEM_VOCAB = ITEM_SPEC["features"][0]["vocabulary"]

# Three batches of four (user input, positive item); item 12 twice in batch 2 (masking), an
# unknown history id (row 0) and an empty history (row 0) in batch 3.
BATCHES = [
    [({"user_id": 1, "age": 25, "history": {"ids": [10, 11], "weights": [1.0, 0.5]}}, 12),
     ({"user_id": 2, "age": 41, "history": {"ids": [12], "weights": [1.0]}}, 13),
     ({"user_id": 3, "age": 33, "history": {"ids": [13, 14, 10], "weights": [1.0, 0.5, 0.25]}}, 10),
     ({"user_id": 4, "age": 19, "history": {"ids": [14], "weights": [1.0]}}, 11)],
    [({"user_id": 2, "age": 41, "history": {"ids": [13, 12], "weights": [1.0, 0.5]}}, 12),
     ({"user_id": 1, "age": 25, "history": {"ids": [12, 10, 11], "weights": [1.0, 0.5, 0.25]}}, 12),
     ({"user_id": 4, "age": 19, "history": {"ids": [11, 14], "weights": [1.0, 0.5]}}, 14),
     ({"user_id": 3, "age": 33, "history": {"ids": [10], "weights": [1.0]}}, 11)],
    [({"user_id": 3, "age": 33, "history": {"ids": [99, 13], "weights": [1.0, 0.5]}}, 14),
     ({"user_id": 1, "age": 25, "history": {"ids": [], "weights": []}}, 10),
     ({"user_id": 2, "age": 41, "history": {"ids": [12, 14], "weights": [1.0, 0.5]}}, 11),
     ({"user_id": 4, "age": 19, "history": {"ids": [14, 11, 10], "weights": [1.0, 0.5, 0.25]}}, 13)],
]
LOGQ = [[-1.2, -0.8, -1.5, -1.0], [-0.9, -0.9, -1.3, -1.1], [-1.4, -1.0, -0.7, -1.2]]
WEIGHTS = [[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0]]


def safetensors_bytes(tensors):
    header, data, off = {}, b"", 0
    for name in sorted(tensors):
        raw = np.asarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(tensors[name])), "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def param_arrays(model, spec):
    """The float64 arrays the model computes with, by tensor name (mutated in place)."""
    out = {}
    for f, fs in zip(model.features, spec["features"]):
        if "embedding" in fs:
            out[fs["embedding"]] = f.table
    lin = [ls for ls in spec["layers"] if ls["type"] == "linear"]
    for (t, p), ls in zip([l for l in model.layers if l[0] == "linear"], lin):
        out[ls["weight"]] = p["weight"]
        out[ls["bias"]] = p["bias"]
    return out


def adam_step(a, g, m, v, t, lr, rows=None):
    """One bias-corrected Adam step of `a` (step `t`) in place: every element, or (lazy Adam)
    only the rows `rows` (moments of the other rows untouched)."""
    c1, c2 = 1 - B1 ** t, 1 - B2 ** t
    step = lr * np.sqrt(c2) / c1
    if rows is None:
        m[...] = B1 * m + (1 - B1) * g
        v[...] = B2 * v + (1 - B2) * g * g
        a -= step * m / (np.sqrt(v) + EPS)
    else:
        for r in rows:
            m[r] = B1 * m[r] + (1 - B1) * g[r]
            v[r] = B2 * v[r] + (1 - B2) * g[r] * g[r]
            a[r] -= step * m[r] / (np.sqrt(v[r]) + EPS)


def main():
    rs = np.random.RandomState(20261128)
    init = {}
    for kind in ("user", "item"):
        for name, shape in SHAPES[kind].items():
            init[f"{kind}/{name}"] = (rs.standard_normal(shape) * 0.5).astype(np.float32)
    models = {}
    for kind, spec in (("user", USER_SPEC), ("item", ITEM_SPEC)):
        tensors = {n: init[f"{kind}/{n}"] for n in SHAPES[kind]}
        models[kind] = tower_ref.load_model_bytes(spec, safetensors_bytes(tensors))
    arrays = {"user": param_arrays(models["user"], USER_SPEC), "item": param_arrays(models["item"], ITEM_SPEC)}
    for kind in arrays:
        for n, a in arrays[kind].items():
            assert a.dtype == np.float64 and np.array_equal(a, init[f"{kind}/{n}"].astype(np.float64)), n

    def loss(batch, logq, w):
        users = [u for u, _ in batch]
        items = [{"item_id": i} for _, i in batch]
        u = tower_ref.embed_batch(models["user"], users)
        v = tower_ref.embed_batch(models["item"], items)
        logits = u @ v.T / T - np.asarray(logq)[None, :]
        ids = [i for _, i in batch]
        for r in range(len(batch)):
            for c in range(len(batch)):
                if c != r and ids[c] == ids[r]:
                    logits[r, c] = -np.inf
        mx = logits.max(axis=1, keepdims=True)
        lse = (mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1)))
        wn = np.asarray(w) / np.sum(w)
        return float(np.sum(wn * (lse - np.diag(logits))))

    def touched(kind, batch):
        rows = {}
        for u, i in batch:
            if kind == "user":
                rows.setdefault("user_id.embedding", set()).add(USER_SPEC["features"][0]["vocabulary"].index(str(u["user_id"])) + 1)
                ids = u["history"]["ids"][:3]
                hv = USER_SPEC["features"][2]["vocabulary"]
                hist = rows.setdefault("history.embedding", set())
                for x in ids or [None]:
                    hist.add(hv.index(str(x)) + 1 if x is not None and str(x) in hv else 0)
            else:
                rows.setdefault("item_id.embedding", set()).add(ITEM_VOCAB.index(str(i)) + 1)
        return rows

    state = {k: {n: (np.zeros_like(a), np.zeros_like(a)) for n, a in arrays[k].items()} for k in arrays}
    losses = []
    h = 1e-6
    for t, (batch, logq, w) in enumerate(zip(BATCHES, LOGQ, WEIGHTS), start=1):
        losses.append(loss(batch, logq, w))
        grads = {}
        for kind in arrays:
            for n, a in arrays[kind].items():
                g = np.zeros_like(a)
                for idx in np.ndindex(a.shape):
                    orig = a[idx]
                    a[idx] = orig + h
                    lp = loss(batch, logq, w)
                    a[idx] = orig - h
                    lm = loss(batch, logq, w)
                    a[idx] = orig
                    g[idx] = (lp - lm) / (2 * h)
                grads[(kind, n)] = g
        assert all(np.abs(g).max() > 1e-6 for g in grads.values()), "every tensor has a gradient"
        for kind in arrays:
            rows = touched(kind, batch)
            for n, a in arrays[kind].items():
                g = grads[(kind, n)]
                m, v = state[kind][n]
                if n.endswith(".embedding"):
                    lr, sel = SPARSE_LR, sorted(rows[n])
                else:
                    lr, sel = LR, None
                adam_step(a, g, m, v, t, lr, sel)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "user_spec.json"), "w") as f:
        json.dump(USER_SPEC, f, indent=1)
    with open(os.path.join(OUT, "item_spec.json"), "w") as f:
        json.dump(ITEM_SPEC, f, indent=1)
    with open(os.path.join(OUT, "init.safetensors"), "wb") as f:
        f.write(safetensors_bytes(init))
    result = {
        "options": {"lr": LR, "sparse_lr": SPARSE_LR, "temperature": T},
        "batches": [{"users": [u for u, _ in b], "items": [i for _, i in b], "logq": q, "weights": w}
                    for b, q, w in zip(BATCHES, LOGQ, WEIGHTS)],
        "losses": losses,
        "after": {f"{k}/{n}": a.ravel().tolist() for k in arrays for n, a in arrays[k].items()},
    }
    with open(os.path.join(OUT, "steps.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("losses", losses)


if __name__ == "__main__":
    main()
