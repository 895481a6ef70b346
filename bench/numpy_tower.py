#!/usr/bin/env python3
"""numpy baseline for the benchmark's embed_user figures (run by the benchmark program).

Loads the same spec + safetensors the benchmark imported into PostgreSQL, through the independent
numpy reference implementation tests/golden/tower_ref.py, and times single-input forward passes
on the same inputs: one call = one features dict -> one 64-d vector, as embed_user does.

    numpy_tower.py SPEC.json WEIGHTS.safetensors INPUTS.json [PG_OUTPUTS.json] [--warmup N]

Prints one JSON object on stdout:
  numpy          numpy version
  f32 / f64      per-call latency of tower_ref.embed_batch(model, [x], dtype) in ms
                 (p50, p99, mean, calls): the feature parsing is Python, the arithmetic numpy
  batch_f32_ms   per-input cost of one embed_batch call over all inputs (f32), ms
  max_abs_diff   max |numpy f32 - pg_twotower| over the inputs of PG_OUTPUTS.json (a list of
                 vectors for the first inputs), a check that both ran the same weights
"""

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "golden"))

import numpy as np  # noqa: E402
import tower_ref  # noqa: E402


def stats(times):
    t = sorted(times)
    n = len(t)
    return {
        "p50_ms": t[n * 50 // 100] * 1e3,
        "p99_ms": t[min(n * 99 // 100, n - 1)] * 1e3,
        "mean_ms": sum(t) / n * 1e3,
        "calls": n,
    }


def time_single(model, inputs, dtype, warmup):
    for x in inputs[:warmup]:
        tower_ref.embed_batch(model, [x], dtype=dtype)
    out = []
    clock = time.perf_counter
    for x in inputs:
        s = clock()
        tower_ref.embed_batch(model, [x], dtype=dtype)
        out.append(clock() - s)
    return stats(out)


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    warmup = 200
    for a in argv[1:]:
        if a.startswith("--warmup="):
            warmup = int(a.split("=", 1)[1])
    if len(args) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    model = tower_ref.load_model(args[0], args[1])
    with open(args[2], encoding="utf-8") as f:
        inputs = json.load(f)
    result = {"numpy": np.__version__, "model": repr(model)}
    result["f32"] = time_single(model, inputs, np.float32, warmup)
    result["f64"] = time_single(model, inputs, np.float64, warmup)
    s = time.perf_counter()
    tower_ref.embed_batch(model, inputs, dtype=np.float32)
    result["batch_f32_ms"] = (time.perf_counter() - s) / len(inputs) * 1e3
    if len(args) == 4:
        with open(args[3], encoding="utf-8") as f:
            pg = np.array(json.load(f), dtype=np.float64)
        ours = tower_ref.embed_batch(model, inputs[: len(pg)], dtype=np.float32)
        result["max_abs_diff"] = float(np.max(np.abs(ours.astype(np.float64) - pg)))
        result["compared"] = int(len(pg))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
