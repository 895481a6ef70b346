#!/usr/bin/env python3
"""Golden fixture for multi-task pre-rank training: three optimisation steps of a small
multi-task pre-rank model (scene gate, shared and per-task experts, a gate and a head per task,
three tasks), computed in numpy independently of crates/train.

    python3 tests/golden/train_prerank_ref.py   (needs numpy; writes tests/golden/train_prerank/)

The forward pass is tower_ref.prerank_forward (the independent implementation of
docs/model-format.md), in float64. Gradients are central finite differences of the loss in
float64 (no hand-written backward pass), as in train_ref.py, so the fixture checks crates/train's
backward passes through the scale and gate nodes, the task losses with missing labels, and the
optimisers together.

Loss of a batch of m rows: L = (1/m) sum_rows sum_t [label_t given] w_t * l_t, w = (1, 0.5, 0.3);
tasks a and b logistic, l = softplus(s) - y s; task c squared, l = (s - y)^2; a null label adds
nothing (a row whose every label is null still counts in m). Dense parameters take Adam steps
(lr 0.01); embedding tables take lazy Adam steps (lr 0.05) on the rows the batch reads (every
row's categorical inputs, OOV row 0 included, also rows read only by a row without labels:
their gradient is 0 but their moments still decay and move them), bias-corrected with the
global step t, exactly as train_ref.py. Parameters are kept in float64 between steps.
Writes:

    train_prerank/spec.json           the model (crates/train's layout and tensor names)
    train_prerank/init.safetensors    initial weights (f32), keys "prerank/<tensor name>"
    train_prerank/steps.json          options, batches (rows: user, item, u, v, labels), the
                                      per-step losses (before each update), and every
                                      parameter after the last step (float64, flattened)
"""

import json
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "train_prerank")
sys.dont_write_bytecode = True
sys.path.insert(0, HERE)
import tower_ref  # noqa: E402
import train_ref  # noqa: E402

LR, SPARSE_LR = 0.01, 0.05
B1, B2, EPS = 0.9, 0.999, 1e-8
TASKS = [("a", "logistic", 1.0), ("b", "logistic", 0.5), ("c", "squared", 0.3)]
FD_H = 1e-6


def linear(prefix):
    return {"type": "linear", "weight": f"{prefix}.weight", "bias": f"{prefix}.bias"}


def make_spec():
    """crates/train's plan of the model (features: scene, user_id, age, cat, uv; hidden [4],
    tanh, experts shared 2 / per task 1, task_hidden [3], scene gate on scene)."""
    graph = [{"name": "scene_gate", "combine": "scale", "inputs": ["user_id", "age", "cat", "uv"],
              "gate_inputs": ["scene"], "weight": "scene_gate.weight", "bias": "scene_gate.bias"}]
    for e in ("expert0", "expert1"):
        graph.append({"name": e, "inputs": ["scene_gate", "scene"],
                      "layers": [linear(f"{e}.mlp.0"), {"type": "tanh"}]})
    for t in range(len(TASKS)):
        graph.append({"name": f"task{t}_expert0", "inputs": ["scene_gate", "scene"],
                      "layers": [linear(f"task{t}_expert0.mlp.0"), {"type": "tanh"}]})
        graph.append({"name": f"task{t}_gate", "combine": "gate",
                      "inputs": ["expert0", "expert1", f"task{t}_expert0"],
                      "gate_inputs": ["scene"], "weight": f"task{t}_gate.weight",
                      "bias": f"task{t}_gate.bias"})
        graph.append({"name": f"task{t}_head", "inputs": [f"task{t}_gate"],
                      "layers": [linear(f"task{t}_head.mlp.0"), {"type": "tanh"},
                                 linear(f"task{t}_head.mlp.1")]})
    graph.append({"name": "tasks", "combine": "concat",
                  "inputs": [f"task{t}_head" for t in range(len(TASKS))]})
    return {
        "format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
        "features": [
            {"name": "scene", "type": "categorical", "embedding": "scene.embedding",
             "vocabulary": ["home", "search"]},
            {"name": "user_id", "type": "categorical", "embedding": "user_id.embedding",
             "vocabulary": ["1", "2", "3"]},
            {"name": "age", "type": "numeric", "transform": "zscore", "mean": 30.0, "std": 10.0},
            {"name": "cat", "type": "categorical", "source": "item", "embedding": "cat.embedding",
             "vocabulary": ["x", "y", "z"]},
            {"name": "uv", "type": "cross", "of": "product", "dim": 4},
        ],
        "graph": graph,
        "output": {"dim": 3, "node": "tasks", "tasks": [
            {"name": "a", "link": "sigmoid", "fuse": 1.0},
            {"name": "b", "link": "sigmoid", "fuse": -0.5},
            {"name": "c", "link": "identity", "fuse": 0.0}]},
    }


SPEC = make_spec()
# scene [3, 2] (feature widths 2, 3, 1, 2, 4: the scaled fields are 10 wide, the experts read
# them and scene, 12 wide)
SHAPES = {"scene.embedding": (3, 2), "user_id.embedding": (4, 3), "cat.embedding": (4, 2),
          "scene_gate.weight": (10, 2), "scene_gate.bias": (10,)}
for _e in ["expert0", "expert1"] + [f"task{t}_expert0" for t in range(len(TASKS))]:
    SHAPES[f"{_e}.mlp.0.weight"] = (4, 12)
    SHAPES[f"{_e}.mlp.0.bias"] = (4,)
for _t in range(len(TASKS)):
    SHAPES[f"task{_t}_gate.weight"] = (3, 2)
    SHAPES[f"task{_t}_gate.bias"] = (3,)
    SHAPES[f"task{_t}_head.mlp.0.weight"] = (3, 4)
    SHAPES[f"task{_t}_head.mlp.0.bias"] = (3,)
    SHAPES[f"task{_t}_head.mlp.1.weight"] = (1, 3)
    SHAPES[f"task{_t}_head.mlp.1.bias"] = (1,)
TABLES = {f["embedding"]: f for f in SPEC["features"] if "embedding" in f}

N = None  # a missing label
# Three batches of six (user, item, labels); u and v are drawn below. Values are exact in f32
# (ages give dyadic z-scores, labels and vectors are multiples of 1/8) so that the f32 engine
# sees the same inputs. Covered: unknown scene (row 0: "feed", "checkout"), scene missing,
# user_id missing, user_id unknown (9), age missing and null, unknown cat ("w"), a fractional
# logistic label, rows with one and two missing labels, and in batch 3 a row with no label at all
# that alone reads user_id 3 and cat z (rows earlier steps moved: lazy Adam still steps them).
BATCHES = [
    [({"scene": "home", "user_id": 1, "age": 25}, {"cat": "x"}, [1, 0, 1.75]),
     ({"scene": "search", "user_id": 2, "age": 45}, {"cat": "y"}, [0, 1, -0.375]),
     ({"scene": "feed", "user_id": 3, "age": 35}, {"cat": "z"}, [1, N, 0.5]),
     ({"scene": "home", "age": 20}, {"cat": "w"}, [0.75, 0, N]),
     ({"scene": "search", "user_id": 1, "age": None}, {"cat": "x"}, [N, N, 2.25]),
     ({"scene": "home", "user_id": 2, "age": 32.5}, {"cat": "z"}, [0, 1, -1.125])],
    [({"scene": "search", "user_id": 3, "age": 25}, {"cat": "y"}, [1, 1, 0.25]),
     ({"scene": "home", "user_id": 1, "age": 40}, {"cat": "z"}, [0, N, 1.5]),
     ({"user_id": 2, "age": 30}, {"cat": "x"}, [N, 0, -0.75]),
     ({"scene": "home", "user_id": 9, "age": 50}, {"cat": "y"}, [1, 0, N]),
     ({"scene": "search", "user_id": 2, "age": 22.5}, {"cat": "w"}, [0, N, N]),
     ({"scene": "home", "user_id": 3, "age": 27.5}, {"cat": "x"}, [1, 1, 0.875])],
    [({"scene": "home", "user_id": 1, "age": 35}, {"cat": "x"}, [0, 1, 1.25]),
     ({"scene": "search", "user_id": 2, "age": 20}, {"cat": "y"}, [1, 0, -0.5]),
     ({"scene": "checkout"}, {"cat": "y"}, [1, N, 0.625]),
     ({"scene": "search", "user_id": 3, "age": 45}, {"cat": "z"}, [N, N, N]),
     ({"scene": "home", "user_id": 1, "age": 25}, {"cat": "x"}, [0, 0, 2.0]),
     ({"scene": "search", "user_id": 2, "age": 40}, {"cat": "w"}, [N, 1, N])],
]


def param_arrays(model):
    """The float64 arrays the model computes with, by tensor name (mutated in place; call
    sync() after changing them: tower_ref caches tables and linear weights as lists)."""
    out = {}
    for f, fs in zip(model.features, SPEC["features"]):
        if "embedding" in fs:
            out[fs["embedding"]] = f.table
    nodes = dict(model.graph)
    for ns in SPEC["graph"]:
        node = nodes[ns["name"]]
        if "layers" in ns:
            lin = [ls for ls in ns["layers"] if ls["type"] == "linear"]
            for (t, p), ls in zip([l for l in node["layers"] if l[0] == "linear"], lin):
                out[ls["weight"]] = p["weight"]
                out[ls["bias"]] = p["bias"]
        elif "weight" in ns:
            out[ns["weight"]] = node["weight"]
            out[ns["bias"]] = node["bias"]
    assert set(out) == set(SHAPES), sorted(set(out) ^ set(SHAPES))
    return out


def sync(model):
    """Refresh tower_ref's list caches of the (mutated) float64 arrays."""
    for f in model.features:
        if f.table is not None:
            f.table_rows = f.table.tolist()
    for _, node in model.graph:
        for t, p in node.get("layers", []):
            if t == "linear":
                p["w_rows"] = p["weight"].tolist()
                p["b_list"] = None if p["bias"] is None else p["bias"].tolist()


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def main():
    rs = np.random.RandomState(20261204)
    init = {f"prerank/{n}": (rs.standard_normal(s) * 0.3).astype(np.float32)
            for n, s in SHAPES.items()}
    # u, v of every row: multiples of 1/8 (exact in f32, and so is u * v)
    uvs = [[(np.round(rs.standard_normal(4) * 8) / 8).tolist() for _ in range(2)]
           for b in BATCHES for _ in b]
    it = iter(uvs)
    batches = [[(user, item, *next(it), labels) for user, item, labels in b] for b in BATCHES]

    model = tower_ref.load_model_bytes(
        SPEC, train_ref.safetensors_bytes({n: init[f"prerank/{n}"] for n in SHAPES}))
    arrays = param_arrays(model)
    for n, a in arrays.items():
        assert a.dtype == np.float64 and np.array_equal(a, init[f"prerank/{n}"].astype(np.float64)), n

    def loss(batch):
        sync(model)
        terms = []
        for user, item, u, v, labels in batch:
            s = tower_ref.prerank_forward(model, user, item, u, v)
            for (_, kind, w), st, y in zip(TASKS, s.tolist(), labels):
                if y is None:
                    continue
                terms.append(w * (softplus(st) - y * st if kind == "logistic" else (st - y) ** 2))
        return math.fsum(terms) / len(batch)

    def touched(batch):
        """The table rows the batch reads (row 0 for unknown and missing values)."""
        rows = {n: set() for n in TABLES}
        for user, item, *_ in batch:
            for n, fs in TABLES.items():
                x = (item if fs.get("source") == "item" else user).get(fs["name"])
                cid = None if x is None else tower_ref.canonical_id(x)
                rows[n].add(fs["vocabulary"].index(cid) + 1 if cid in fs["vocabulary"] else 0)
        return rows

    state = {n: (np.zeros_like(a), np.zeros_like(a)) for n, a in arrays.items()}
    losses, min_grad = [], []
    for t, batch in enumerate(batches, start=1):
        losses.append(loss(batch))
        rows = touched(batch)
        grads = {}
        for n, a in arrays.items():
            g = np.zeros_like(a)
            for idx in np.ndindex(a.shape):
                orig = a[idx]
                a[idx] = orig + FD_H
                lp = loss(batch)
                a[idx] = orig - FD_H
                lm = loss(batch)
                a[idx] = orig
                g[idx] = (lp - lm) / (2 * FD_H)
            grads[n] = g
        sync(model)
        assert all(np.abs(g).max() > 1e-6 for g in grads.values()), "every tensor has a gradient"
        # Adam normalises gradients: a parameter whose gradient is nearly 0 (but not exactly 0)
        # would take an ill-defined step. The smallest nonzero |g| is recorded for the check.
        nz = np.concatenate([np.abs(g[[r for r in sorted(rows[n])]]).ravel() if n in TABLES
                             else np.abs(g).ravel() for n, g in grads.items()])
        min_grad.append(float(nz[nz > 0].min()))
        for n, a in arrays.items():
            g = grads[n]
            m, v = state[n]
            if n in TABLES:
                lr, sel = SPARSE_LR, sorted(rows[n])
            else:
                lr, sel = LR, None
            train_ref.adam_step(a, g, m, v, t, lr, sel)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "spec.json"), "w") as f:
        json.dump(SPEC, f, indent=1)
        f.write("\n")
    with open(os.path.join(OUT, "init.safetensors"), "wb") as f:
        f.write(train_ref.safetensors_bytes(init))
    result = {
        "options": {"lr": LR, "sparse_lr": SPARSE_LR, "beta1": B1, "beta2": B2, "eps": EPS,
                    "tasks": [{"name": n, "loss": k, "weight": w} for n, k, w in TASKS]},
        "batches": [[{"user": user, "item": item, "u": u, "v": v, "labels": labels}
                     for user, item, u, v, labels in b] for b in batches],
        "losses": losses,
        "after": {f"prerank/{n}": a.ravel().tolist() for n, a in arrays.items()},
    }
    with open(os.path.join(OUT, "steps.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print("losses", losses)
    print("smallest nonzero |gradient| per step", min_grad)


if __name__ == "__main__":
    main()
