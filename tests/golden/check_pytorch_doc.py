#!/usr/bin/env python3
"""Check that the PyTorch example in docs/pytorch-export.md matches the golden fixtures.

    python3 tests/golden/check_pytorch_doc.py      (needs torch and safetensors; not run by CI)

Runs the doc's ```python blocks (except those starting with "# example"), then for the user
tower, the item tower and the graph tower (tests/golden/graph): loads the golden weights into the doc's module, checks its forward pass against
expected.json (float64: 1e-12, float32: 1e-5), exports it with the doc's export() and checks that
the spec is byte-identical to the golden spec.json and that tower_ref reproduces expected.json
from the exported files. The same for the multi-task pre-rank model (tests/golden/multitask):
its logits, task scores and fused score (task_scores) against expected.json, the exported spec
byte-identical to the golden one, the exported weights equal to the golden tensors, and tower_ref's
prerank_forward and task_scores on the exported files; and multitask_loss against its formula.
Also checks the parallel two-towers, the mimic loss and the target attention pre-rank model, and
reports which invalid_inputs.json cases the doc's featurize rejects.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(HERE, "..", "..", "docs", "pytorch-export.md")
sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, HERE)
import tower_ref  # noqa: E402


def main():
    try:
        import torch
        from safetensors.torch import load_file
    except ImportError:
        print("torch and safetensors are not installed: skipped")
        return 0
    print("torch", torch.__version__)
    with open(DOC, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    code = "\n".join(b for b in blocks if not b.startswith("# example"))
    ns = {"__name__": "pytorch_export_doc"}
    exec(compile(code, DOC, "exec"), ns)

    ok = True
    for sub, make in (("", ns["user_tower"]), ("item", ns["item_tower"]), ("graph", ns["graph_user_tower"])):
        d = os.path.join(HERE, sub)
        with open(os.path.join(d, "inputs.json"), encoding="utf-8") as f:
            inputs = json.load(f)
        with open(os.path.join(d, "expected.json"), encoding="utf-8") as f:
            expected = np.array(json.load(f))
        state = load_file(os.path.join(d, "weights.safetensors"))
        tower = make()
        tower.load_state_dict(state, strict=True)
        tower.eval()
        out32 = tower.embed(inputs).numpy()
        out64 = tower.double().embed(inputs).numpy()
        e32 = float(np.max(np.abs(out32 - expected)))
        e64 = float(np.max(np.abs(out64 - expected)))
        good = e64 <= 1e-12 and e32 <= 1e-5
        print(f"{sub or 'user'}: torch float64 max |diff| {e64:.2g}, float32 {e32:.2g}",
              "OK" if good else "MISMATCH")
        ok &= good

        with tempfile.TemporaryDirectory() as tmp:
            prefix = os.path.join(tmp, "x_")
            ns["export"](tower.float(), prefix)
            with open(prefix + "spec.json", "rb") as f:
                spec = f.read()
            with open(os.path.join(d, "spec.json"), "rb") as f:
                golden = f.read()
            same = spec == golden
            print(f"{sub or 'user'}: exported spec.json byte-identical to the golden one:", same)
            ok &= same
            model = tower_ref.load_model(prefix + "spec.json", prefix + "weights.safetensors")
            ref = np.array([tower_ref.embed(model, x) for x in inputs])
            err = float(np.max(np.abs(ref - expected)))
            print(f"{sub or 'user'}: tower_ref on the exported files max |diff| {err:.2g}",
                  "OK" if err <= 1e-12 else "MISMATCH")
            ok &= err <= 1e-12

    # Parallel two-towers: random weights, exported, read back by tower_ref; the inner product
    # of the served vectors is the weighted sum of the sub-tower pairs' cosines.
    torch.manual_seed(0)
    user, item = ns["parallel_pair"](
        ns["USER_FEATURES"], ns["ITEM_FEATURES"],
        [("a", ["user_id", "country", "segment", "is_member", "history", "recent"], 20),
         ("b", ["tags", "tag_scores", "tag_peak", "age", "tenure", "income", "activity", "score", "days", "user_vec"], 20)],
        [("a", ["item_id", "category"], 7), ("b", ["tags", "price", "img_vec"], 7)], 4)
    with torch.no_grad():
        user.graph["fusion"].weight.copy_(torch.tensor([0.7, 1.6]))
    user.eval(), item.eval()
    with open(os.path.join(HERE, "inputs.json"), encoding="utf-8") as f:
        uin = json.load(f)
    with open(os.path.join(HERE, "item", "inputs.json"), encoding="utf-8") as f:
        iin = json.load(f)
    u, v = user.embed(uin).numpy(), item.embed(iin).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        for name, t, xs, out in (("user", user, uin, u), ("item", item, iin, v)):
            spec = ns["export"](t, os.path.join(tmp, name + "_"))
            model = tower_ref.load_model(os.path.join(tmp, name + "_spec.json"), os.path.join(tmp, name + "_weights.safetensors"))
            err = float(np.max(np.abs(np.array([tower_ref.embed(model, x) for x in xs]) - out)))
            good = err <= 1e-5 and spec["output"] == {"dim": 8, "metric": "ip", "node": "fusion"}
            print(f"parallel {name}: exported graph, tower_ref max |diff| {err:.2g}", "OK" if good else "MISMATCH")
            ok &= good
    sub = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    identity = 0.7 * sub(u[:, :4] / 0.7) @ sub(v[:, :4]).T + 1.6 * sub(u[:, 4:] / 1.6) @ sub(v[:, 4:]).T
    err = float(np.max(np.abs(u @ v.T - identity)))
    print(f"parallel: <u, v> = sum of weighted pair cosines, max |diff| {err:.2g}", "OK" if err <= 1e-5 else "MISMATCH")
    ok &= err <= 1e-5

    # The dual augmented mimic loss: its value is the documented formula (unknown ids left out)
    # and no gradient reaches a tower through its target.
    Tower = ns["Tower"]
    user = Tower("user", [{"name": "uid", "type": "categorical", "table": "uid", "emb_dim": 3,
                           "vocabulary": ["1", "2", "3"]}], make_layers=lambda w: [torch.nn.Linear(w, 3)])
    item = Tower("item", [{"name": "iid", "type": "categorical", "table": "iid", "emb_dim": 3,
                           "vocabulary": ["7", "8"]}], make_layers=lambda w: [torch.nn.Linear(w, 3)])
    ub, ib = user.featurize([{"uid": 1}, {"uid": 3}, {"uid": 99}]), item.featurize([{"iid": 8}, {"iid": 5}, {"iid": 7}])
    u, v = user(ub), item(ib)
    w = torch.tensor([1.0, 2.0, 0.5])
    loss = ns["mimic_loss"](user, item, ub, ib, u, v, "uid", "iid", 0.3, w)
    a_u, a_v = user.tables["uid"].weight[ub["uid"]].detach().numpy(), item.tables["iid"].weight[ib["iid"]].detach().numpy()
    un, vn, wn = u.detach().numpy(), v.detach().numpy(), (w / w.sum()).numpy()
    ku, kv = np.array([1, 1, 0]), np.array([1, 0, 1])
    want = 0.3 * float(np.sum(wn * (ku * ((a_u - vn) ** 2).sum(1) + kv * ((a_v - un) ** 2).sum(1))))
    loss.backward()
    err = abs(loss.item() - want)
    no_target_grad = all(p.grad is None or float(p.grad.abs().max()) == 0.0
                         for t in (user, item) for n, p in t.named_parameters() if n.startswith("layers."))
    print(f"mimic_loss: |diff| to the formula {err:.2g}, no gradient through the targets: {no_target_grad}",
          "OK" if err <= 1e-6 and no_target_grad else "MISMATCH")
    ok &= err <= 1e-6 and no_target_grad

    # The pre-rank fixture (tests/golden/attention) as the doc's model: its scores are the numpy
    # reference's, and export() writes the fixture's spec (tensor names aside).
    d = os.path.join(HERE, "attention")
    with open(os.path.join(d, "cases.json"), encoding="utf-8") as f:
        cases = json.load(f)
    with open(os.path.join(d, "expected.json"), encoding="utf-8") as f:
        expected = np.array(json.load(f))
    with open(os.path.join(d, "spec.json"), encoding="utf-8") as f:
        aspec = json.load(f)
    state = load_file(os.path.join(d, "weights.safetensors"))
    names = {"din.query": "attention.query.weight", "din.key": "attention.key.weight",
             "mlp.0.weight": "layers.0.weight", "mlp.0.bias": "layers.0.bias",
             "mlp.1.weight": "layers.2.weight", "mlp.1.bias": "layers.2.bias"}
    model = ns["attention_prerank"]()
    model.load_state_dict({names[k]: t for k, t in state.items()}, strict=True)
    model.eval()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        model.to(dtype)
        n = max(1, max(len(c["history"]) for c in cases))
        h = torch.zeros(len(cases), n, 8, dtype=dtype)
        mask = torch.zeros(len(cases), n, dtype=torch.bool)
        for b, c in enumerate(cases):
            for i, x in enumerate(c["history"]):
                h[b, i] = torch.tensor(x, dtype=dtype)
                mask[b, i] = True
        v = torch.tensor([c["v"] for c in cases], dtype=dtype)
        batch = model.featurize([{**c["user"], **c["item"]} for c in cases])
        batch["v"], batch["din"] = v, (v, h, mask)
        with torch.no_grad():
            score = model(batch)[:, 0].numpy()
        err = float(np.max(np.abs(score - expected)))
        print(f"pre-rank with target attention ({dtype}): max |diff| to the numpy reference {err:.2g}",
              "OK" if err <= tol else "MISMATCH")
        ok &= err <= tol
    with tempfile.TemporaryDirectory() as tmp:
        spec = ns["export"](model.float(), os.path.join(tmp, "p_"))
    rename = {v: k for k, v in names.items()}
    renamed = json.loads(json.dumps(spec), object_hook=lambda o: {k: rename.get(v, v) if isinstance(v, str) else v for k, v in o.items()})
    same = renamed == aspec
    print("pre-rank with target attention: export() writes the fixture's spec (tensor names aside):", same)
    ok &= same

    # The multi-task pre-rank fixture (tests/golden/multitask): the doc's model takes the golden
    # weights under their own names; logits, task scores and fused score match expected.json, and
    # export() writes the fixture's spec byte for byte and exactly its tensors.
    d = os.path.join(HERE, "multitask")
    with open(os.path.join(d, "cases.json"), encoding="utf-8") as f:
        cases = json.load(f)
    with open(os.path.join(d, "expected.json"), encoding="utf-8") as f:
        expected = json.load(f)
    with open(os.path.join(d, "spec.json"), encoding="utf-8") as f:
        names = [t["name"] for t in json.load(f)["output"]["tasks"]]
    want = {"logits": np.array([e["logits"] for e in expected]),
            "scores": np.array([[e["scores"][t] for t in names] for e in expected]),
            "fused": np.array([e["fused"] for e in expected])}
    state = load_file(os.path.join(d, "weights.safetensors"))
    model = ns["multitask_prerank"]()
    model.load_state_dict(state, strict=True)
    model.eval()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        model.to(dtype)
        batch = model.featurize([{**c["user"], **c["item"]} for c in cases])
        u = torch.tensor([c["u"] for c in cases], dtype=dtype)
        v = torch.tensor([c["v"] for c in cases], dtype=dtype)
        batch["u"], batch["v"], batch["uv"] = u, v, u * v
        with torch.no_grad():
            logits = model(batch)
            scores, fused = ns["task_scores"](model, logits)
        got = {"logits": logits.numpy(),
               "scores": torch.stack([scores[t] for t in names], dim=1).numpy(),
               "fused": fused.numpy()}
        errs = {k: float(np.max(np.abs(got[k] - want[k]))) for k in want}
        good = list(scores) == names and all(e <= tol for e in errs.values())
        print(f"multi-task pre-rank ({dtype}): max |diff| to expected.json",
              ", ".join(f"{k} {e:.2g}" for k, e in errs.items()), "OK" if good else "MISMATCH")
        ok &= good
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "m_")
        ns["export"](model.float(), prefix)
        with open(prefix + "spec.json", "rb") as f:
            spec = f.read()
        with open(os.path.join(d, "spec.json"), "rb") as f:
            golden = f.read()
        same = spec == golden
        print("multi-task pre-rank: exported spec.json byte-identical to the golden one:", same)
        ok &= same
        exported = load_file(prefix + "weights.safetensors")
        same_w = sorted(exported) == sorted(state) and all(
            exported[k].dtype == state[k].dtype and torch.equal(exported[k], state[k]) for k in state)
        print("multi-task pre-rank: exported tensors equal the golden weights:", same_w)
        ok &= same_w
        ref_model = tower_ref.load_model(prefix + "spec.json", prefix + "weights.safetensors")
        err = 0.0
        for c, e in zip(cases, expected):
            row = tower_ref.prerank_forward(ref_model, c["user"], c["item"], c["u"], c["v"], c["history"])
            sc, fu = tower_ref.task_scores(ref_model, row)
            err = max(err, float(np.max(np.abs(row - np.array(e["logits"])))), abs(fu - e["fused"]),
                      max(abs(sc[t] - e["scores"][t]) for t in names))
        print(f"multi-task pre-rank: tower_ref on the exported files max |diff| {err:.2g}",
              "OK" if err <= 1e-12 else "MISMATCH")
        ok &= err <= 1e-12

    # multitask_loss: the weighted sum of the tasks' logistic / squared losses, NaN labels left
    # out, averaged over the pairs; no NaN in the gradient.
    logits = torch.tensor([[0.3, -1.2, 2.0], [-0.7, 0.4, -0.5], [1.5, 0.1, 0.25]],
                          dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 3.0], [0.0, float("nan"), -1.0], [float("nan"), 1.0, float("nan")]],
                          dtype=torch.float64)
    loss = ns["multitask_loss"](model, logits, labels, weights={"minutes": 0.1})
    loss.backward()
    x, y = logits.detach().numpy(), labels.numpy()
    terms = np.stack([np.logaddexp(0, x[:, 0]) - y[:, 0] * x[:, 0],
                      np.logaddexp(0, x[:, 1]) - y[:, 1] * x[:, 1],
                      0.1 * (x[:, 2] - y[:, 2]) ** 2], axis=1)
    want_loss = float(np.sum(np.where(np.isnan(y), 0.0, terms))) / 3
    err = abs(loss.item() - want_loss)
    finite = bool(torch.isfinite(logits.grad).all()) and bool((logits.grad[np.isnan(y)] == 0).all())
    print(f"multitask_loss: |diff| to the formula {err:.2g}, gradient finite and 0 for missing labels: {finite}",
          "OK" if err <= 1e-12 and finite else "MISMATCH")
    ok &= err <= 1e-12 and finite

    tower = ns["user_tower"]()
    with open(os.path.join(HERE, "invalid_inputs.json"), encoding="utf-8") as f:
        invalid = json.load(f)
    missed = []
    for case in invalid:
        try:
            tower.featurize([case["features"]])
            missed.append(case["why"])
        except (ValueError, TypeError, AttributeError, KeyError):
            pass
    print(f"doc featurize rejects {len(invalid) - len(missed)}/{len(invalid)} invalid inputs",
          f"(accepts: {missed})" if missed else "")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
