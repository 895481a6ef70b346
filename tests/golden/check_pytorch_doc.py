#!/usr/bin/env python3
"""Check that the PyTorch example in docs/pytorch-export.md matches the golden fixtures.

    python3 tests/golden/check_pytorch_doc.py      (needs torch and safetensors; not run by CI)

Runs the doc's ```python blocks (except those starting with "# example"), then for the user and
the item tower: loads the golden weights into the doc's module, checks its forward pass against
expected.json (float64: 1e-12, float32: 1e-5), exports it with the doc's export() and checks that
the spec is byte-identical to the golden spec.json and that tower_ref reproduces expected.json
from the exported files. Also reports which invalid_inputs.json cases the doc's featurize rejects.
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
    for sub, make in (("", ns["user_tower"]), ("item", ns["item_tower"])):
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
