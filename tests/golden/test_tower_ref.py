#!/usr/bin/env python3
"""Self-checks of the numpy reference (tower_ref.py) and of the golden fixtures.

    python3 tests/golden/test_tower_ref.py        (numpy only; exits non-zero on failure)

Checks hashing and canonical ids, the F16/BF16 decoders against bit-level decodes of all 65536
patterns, the safetensors/spec validation, that expected.json is reproduced by both forward
paths, and the semantic claims of the cases (OOV rows, defaults, buckets, pooling, equal outputs);
the gate and scale graph nodes, pre-rank models and their output tasks, and the multitask/ fixture
(expected.json reproduced, its invalid specs rejected).
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
import make_fixtures as mf  # noqa: E402
import tower_ref as tr  # noqa: E402

FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL:", what)


def load(sub=""):
    d = os.path.join(HERE, sub)
    with open(os.path.join(d, "spec.json"), "rb") as f:
        spec = f.read()
    with open(os.path.join(d, "weights.safetensors"), "rb") as f:
        weights = f.read()
    with open(os.path.join(d, "inputs.json"), encoding="utf-8") as f:
        inputs = json.load(f)
    with open(os.path.join(d, "expected.json"), encoding="utf-8") as f:
        expected = np.array(json.load(f))
    return spec, weights, inputs, expected


def test_hash_and_ids():
    check(tr.fnv1a64("") == 0xCBF29CE484222325, "fnv1a64('')")
    check(tr.fnv1a64("a") == 0xAF63DC4C8601EC8C, "fnv1a64('a')")
    check(tr.fnv1a64("foobar") == 0x85944171F73967E8, "fnv1a64('foobar')")
    for v, s in [(42, "42"), (42.0, "42"), ("42", "42"), (-7, "-7"), (-7.0, "-7"), (0, "0"),
                 (True, "true"), (False, "false"), ("42.0", "42.0"), ("", ""),
                 (9007199254740993, "9007199254740993"), (1e3, "1000")]:
        check(tr.canonical_id(v) == s, f"canonical_id({v!r})")
    for bad in (42.5, [1], {"a": 1}, float("inf")):
        try:
            tr.canonical_id(bad)
            check(False, f"canonical_id({bad!r}) accepted")
        except tr.InputError:
            pass


def manual_f16(bits: int) -> float:
    sign = -1.0 if bits >> 15 else 1.0
    exp = (bits >> 10) & 0x1F
    man = bits & 0x3FF
    if exp == 0:
        return sign * man * 2.0 ** -24
    if exp == 31:
        return sign * math.inf if man == 0 else math.nan
    return sign * (1 + man / 1024) * 2.0 ** (exp - 15)


def manual_bf16(bits: int) -> float:
    sign = -1.0 if bits >> 15 else 1.0
    exp = (bits >> 7) & 0xFF
    man = bits & 0x7F
    if exp == 0:
        return sign * man * 2.0 ** -133
    if exp == 255:
        return sign * math.inf if man == 0 else math.nan
    return sign * (1 + man / 128) * 2.0 ** (exp - 127)


def test_half_decoders():
    allbits = np.arange(65536, dtype="<u2")
    for name, dec, manual in (("F16", "F16", manual_f16), ("BF16", "BF16", manual_bf16)):
        got = tr.decode_tensor(dec, allbits.tobytes())
        want = np.array([manual(int(b)) for b in allbits])
        same = (got == want) | (np.isnan(got) & np.isnan(want))
        check(bool(np.all(same)), f"{name} decode differs from the bit-level decode")
    f16 = tr.decode_tensor("F16", allbits.tobytes())
    check(bool(np.array_equal(f16, allbits.view("<f2").astype(np.float64), equal_nan=True)),
          "F16 decode differs from numpy float16")
    # bf16 encoder of make_fixtures: round to nearest, ties to even
    for x, bits in [(1.0, 0x3F80), (1 + 2 ** -8, 0x3F80), (1 + 3 * 2 ** -8, 0x3F82),
                    (-2.0, 0xC000), (1 + 2 ** -8 + 2 ** -20, 0x3F81), (0.0, 0)]:
        check(int(mf.bf16_bits([x])[0]) == bits, f"bf16 encode {x}")
    # every BF16/F16 tensor of the fixture decodes to what the generator intended (within
    # half-precision rounding), and F32 exactly
    spec, weights, _, _ = load()
    tensors, ignored, meta = tr.read_safetensors(weights)
    check(ignored == ["layers.1.num_batches_tracked"], "num_batches_tracked ignored")
    check(meta == {"format": "pt"}, "__metadata__ read")
    n = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8:8 + n])
    dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    check(dtypes["tables.country.weight"] == "F16", "an F16 embedding table")
    check(dtypes["layers.0.weight"] == "BF16", "a BF16 linear weight")
    check(dtypes["layers.1.num_batches_tracked"] == "I64", "an I64 num_batches_tracked")
    check(header["layers.1.num_batches_tracked"]["shape"] == [], "num_batches_tracked scalar")
    check((8 + n) % 8 == 0, "header padded to 8 bytes")
    bf = tensors["layers.0.weight"]
    check(bool(np.all(bf.astype(np.float32).view(np.uint32) & 0xFFFF == 0)),
          "BF16 values have 8-bit mantissas")


def test_expected_reproduced():
    for sub in ("", "item"):
        spec, weights, inputs, expected = load(sub)
        m = tr.load_model_bytes(spec, weights)
        one = np.array([tr.embed(m, x) for x in inputs])
        batch = tr.embed_batch(m, inputs)
        check(np.array_equal(one, expected), f"{sub or 'user'}: embed reproduces expected.json")
        check(float(np.max(np.abs(batch - expected))) < 1e-12,
              f"{sub or 'user'}: embed_batch matches expected.json")
        check(bool(np.allclose(np.linalg.norm(expected, axis=1), 1, atol=1e-12, rtol=0)),
              f"{sub or 'user'}: unit norms")
        check(expected.shape == (len(inputs), 8), f"{sub or 'user'}: shape")
        f32 = tr.embed_batch(m, inputs, dtype=np.float32)
        check(f32.dtype == np.float32 and float(np.max(np.abs(f32 - expected))) < 1e-6,
              f"{sub or 'user'}: f32 run within 1e-6")
        # batch of one, and batch order independence
        check(float(np.max(np.abs(tr.embed_batch(m, inputs[:1])[0] - expected[0]))) < 1e-12,
              "batch of one")
        rev = tr.embed_batch(m, inputs[::-1])[::-1]
        check(float(np.max(np.abs(rev - expected))) < 1e-12, "batch order independence")


def rows_equal(a, b):
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def test_user_semantics():
    spec, weights, inputs, expected = load()
    m = tr.load_model_bytes(spec, weights)
    names = [f.name for f in m.features]
    F = {n: f for n, f in zip(names, m.features)}

    def fld(i_or_x, name):
        x = inputs[i_or_x] if isinstance(i_or_x, int) else i_or_x
        return tr.fields(m, x)[names.index(name)]

    def row(name, r):
        return F[name].table[r]

    # case 1 (all missing) and 2 (all null): OOV rows, defaults, zeros
    for c in (1, 2):
        for n in ("user_id", "country", "segment", "is_member", "history", "recent", "tags",
                  "tag_scores", "tag_peak", "days"):
            check(rows_equal(fld(c, n), row(n, 0)), f"case {c}: {n} is row 0")
        check(fld(c, "age")[0] == (30 - 35) / 12, f"case {c}: age default")
        check(fld(c, "tenure")[0] == 0, f"case {c}: tenure 0 without default")
        check(fld(c, "income")[0] == 0 and fld(c, "score")[0] == 0, f"case {c}: 0s")
        check(fld(c, "activity")[0] == 0.5, f"case {c}: activity default 50 -> 0.5")
        check(rows_equal(fld(c, "user_vec"), [0, 0, 0, 0]), f"case {c}: dense zeros")

    # ids
    h42 = 1 + tr.fnv1a64("42") % 64
    for c in (0, 3, 4):
        check(rows_equal(fld(c, "user_id"), row("user_id", h42)), f"case {c}: user_id row")
    check(rows_equal(fld(5, "user_id"), row("user_id", 1 + tr.fnv1a64("-7") % 64)), "-7 hash")
    check(rows_equal(fld(5, "segment"), row("segment", 5)), "segment -7 -> vocab row 5")
    check(rows_equal(fld(6, "user_id"),
                     row("user_id", 1 + tr.fnv1a64("9007199254740993") % 64)), "2^53+1")
    check(rows_equal(fld(7, "user_id"), row("user_id", 1 + tr.fnv1a64("usér-日本") % 64)),
          "utf-8 hash")
    check(rows_equal(fld(7, "country"), row("country", 0)), "FR is OOV")
    for c in (8, 9):
        check(rows_equal(fld(c, "segment"), row("segment", 4)), f"case {c}: segment 42 row 4")
    check(rows_equal(fld(10, "segment"), row("segment", 0)), '"42.0" is OOV')
    check(rows_equal(fld(11, "segment"), row("segment", 0)), "99 is OOV")
    check(rows_equal(fld(11, "is_member"), row("is_member", 1)), "false -> row 1")
    check(rows_equal(fld(12, "is_member"), row("is_member", 2)), '"true" -> row 2')
    check(rows_equal(fld(13, "is_member"), row("is_member", 0)), '"yes" -> row 0')
    check(rows_equal(fld(14, "user_id"), row("user_id", 1 + tr.fnv1a64("true") % 64)), "true")
    check(h42 != 1 + tr.fnv1a64("042") % 64, '"042" hashes elsewhere than "42"')

    # pooling
    for c in (16, 19):
        check(rows_equal(fld(c, "history"), row("history", 0)), f"case {c}: history e_0")
        check(rows_equal(fld(c, "recent"), row("recent", 0)), f"case {c}: recent e_0")
    t = F["history"].table
    check(np.allclose(fld(17, "history"), t[10:15].mean(axis=0), atol=1e-15, rtol=0),
          "history truncated to max_len 5")
    check(np.allclose(fld(18, "history"), (t[1] + t[2] + t[3] + t[0]) / 4, atol=1e-15, rtol=0),
          "history mixed ids")
    check(np.allclose(fld(20, "history"), t[4], atol=1e-15, rtol=0), "duplicates")
    check(rows_equal(fld(21, "recent"), t[20:23].max(axis=0)), "recent max over first 3")
    check(rows_equal(fld(0, "recent"), np.maximum(t[5], t[1])), "max pooling")
    tag = F["tags"].table

    def trow(x):
        return 1 + tr.fnv1a64(tr.canonical_id(x)) % 16

    check(rows_equal(fld(22, "tags"), [0, 0, 0]), "zero weight sum -> zeros")
    for n in ("tags", "tag_scores", "tag_peak"):
        check(rows_equal(fld(23, n), [0, 0, 0]), f"all-zero weights -> zeros ({n})")
        check(rows_equal(fld(24, n), tag[0]), f"empty weighted -> e_0 ({n})")
    want = np.max([-1.0 * tag[trow("sport")], -2.0 * tag[trow("news")],
                   0.5 * tag[trow("tech")]], axis=0)
    check(np.allclose(fld(25, "tag_peak"), want, atol=1e-15, rtol=0), "weighted max")
    want = sum(w * tag[trow(x)] for x, w in zip("abcd", (1, 2, 3, 4))) / 10
    check(np.allclose(fld(26, "tags"), want, atol=1e-15, rtol=0), "weighted truncation")
    want = 3 * tag[trow(7)] + 3 * tag[trow(-3)]
    check(np.allclose(fld(27, "tag_scores"), want, atol=1e-15, rtol=0), "7 and '7' alike")
    want = (1 * tag[trow("sport")] + 2 * tag[trow("news")]) / 3
    check(np.allclose(fld(0, "tags"), want, atol=1e-15, rtol=0), "weighted mean")

    # numeric
    for c in (28, 29):
        check(fld(c, "age")[0] == (30 - 35) / 12 and fld(c, "tenure")[0] == 0
              and fld(c, "income")[0] == 0 and fld(c, "activity")[0] == 0.5
              and fld(c, "score")[0] == 0, f"case {c}: numeric missing/null")
    check(fld(0, "income")[0] == math.log1p(52000), "log1p")
    check(fld(30, "income")[0] == 0, "log1p of negative is 0")
    check(fld(30, "tenure")[0] == -1.5, "zscore of 0")
    check(fld(31, "activity")[0] == 0 and fld(32, "activity")[0] == 1, "minmax clamps")
    check(fld(33, "activity")[0] == 0 and fld(34, "activity")[0] == 1, "minmax ends")
    check(fld(33, "age")[0] == fld(34, "age")[0] == 5 / 12, "age 40 and 40.0")

    # buckets: boundaries 0 7 30 90 365
    for c, r in ((0, 4), (35, 2), (36, 3), (37, 4), (38, 5), (39, 6), (40, 1), (41, 2),
                 (32, 6), (42, 0)):
        check(rows_equal(fld(c, "days"), row("days", r)), f"case {c}: days row {r}")
    check(rows_equal(fld(42, "user_vec"), [1, 2, 3, 4]), "dense integers")

    # equal-output claims in the case notes
    for a, b in ((1, 2), (0, 3), (0, 4), (8, 9), (0, 12), (16, 19), (28, 29), (0, 37)):
        check(rows_equal(expected[a], expected[b]), f"cases {a} and {b} equal")
    d = np.abs(expected[:, None, :] - expected[None, :, :]).max(axis=2)
    same = {(a, b) for a, b in ((1, 2), (0, 3), (0, 4), (8, 9), (0, 12), (16, 19), (28, 29),
                                (0, 37), (3, 4), (3, 12), (4, 12), (3, 37), (4, 37), (12, 37))}
    for a in range(len(inputs)):
        for b in range(a + 1, len(inputs)):
            if (a, b) not in same:
                check(d[a, b] > 1e-4, f"cases {a} and {b} differ clearly ({d[a, b]:.2g})")

    # SENet really re-weights (not saturated), so feeding the shortcut the SENet-scaled fields
    # instead of the raw ones would change the output
    w1, b1, w2, b2 = m.senet
    for c in (0, 1, 44):
        z = np.array([f.mean() for f in tr.fields(m, inputs[c])])
        a = 1 / (1 + np.exp(-(w2 @ np.maximum(w1 @ z + b1, 0) + b2)))
        check(bool(np.all((a > 0.02) & (a < 0.98))), f"case {c}: SENet weights in (0.02, 0.98)")

    # every invalid input is rejected
    with open(os.path.join(HERE, "invalid_inputs.json"), encoding="utf-8") as f:
        for case in json.load(f):
            try:
                tr.embed(m, case["features"])
                check(False, f"invalid input accepted: {case['why']}")
            except tr.InputError:
                pass
            try:
                tr.embed_batch(m, [inputs[0], case["features"]])
                check(False, f"invalid input accepted by embed_batch: {case['why']}")
            except tr.InputError:
                pass


def test_item_semantics():
    spec, weights, inputs, expected = load("item")
    m = tr.load_model_bytes(spec, weights)
    check(m.kind == "item" and m.metric == "cosine" and m.dim == 8, "item tower header")
    check(rows_equal(expected[0], expected[8]), "item: string id == numeric id")
    names = [f.name for f in m.features]
    f6, f7 = tr.fields(m, inputs[6]), tr.fields(m, inputs[7])
    check(all(rows_equal(a, b) for n, a, b in zip(names, f6, f7) if n != "item_id"),
          "item: negative price == price 0")
    f3 = tr.fields(m, inputs[3])
    check(rows_equal(f3[names.index("tags")], m.features[2].table[0]), "item: null tags -> e_0")
    check(rows_equal(f3[names.index("img_vec")], [0, 0, 0]), "item: null dense -> zeros")
    t = m.features[2].table
    check(np.allclose(tr.fields(m, inputs[5])[2], 2 * t[5] + t[6], atol=1e-15, rtol=0),
          "item: sum pooling with duplicates")


def expect_model_error(spec, weights, what):
    try:
        tr.load_model_bytes(json.dumps(spec) if isinstance(spec, dict) else spec, weights)
        check(False, f"accepted: {what}")
    except tr.ModelError:
        pass


def test_validation():
    spec_b, weights, _, _ = load()
    spec = json.loads(spec_b)
    tensors, _, _ = tr.read_safetensors(weights)
    n = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8:8 + n])
    buf = weights[8 + n:]

    def rebuild(hdr, data=buf):
        h = json.dumps(hdr).encode()
        h += b" " * (-len(h) % 8)
        return struct.pack("<Q", len(h)) + h + data

    # the file round-trips through our header rebuild
    tr.load_model_bytes(spec_b, rebuild(header))

    def spec_with(path, value=None, delete=False):
        s = copy.deepcopy(spec)
        obj = s
        for k in path[:-1]:
            obj = obj[k]
        if delete:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
        return s

    expect_model_error(spec_with(["spec_version"], 2), weights, "spec_version 2")
    expect_model_error(spec_with(["format"], "x"), weights, "format")
    expect_model_error(spec_with(["kind"], "ranker"), weights, "kind")
    expect_model_error(spec_with(["typo"], 1), weights, "unknown top-level key")
    expect_model_error(spec_with(["features", 0, "hash_bucket"], 64), weights, "feature typo")
    expect_model_error(spec_with(["layers", 2, "p"], 0.5), weights, "key on relu")
    expect_model_error(spec_with(["output", "dim"], 16), weights, "output dim")
    expect_model_error(spec_with(["output", "metric"], "dot"), weights, "metric")
    expect_model_error(spec_with(["features", 0, "hash_buckets"], 63), weights, "rows mismatch")
    expect_model_error(spec_with(["features", 1, "vocabulary"], ["us", "us", "de", "jp", "br"]),
                       weights, "duplicate vocabulary")
    expect_model_error(spec_with(["features", 0, "vocabulary"], ["a"]), weights,
                       "vocabulary and hash_buckets")
    expect_model_error(spec_with(["features", 4, "pooling"], "avg"), weights, "pooling")
    expect_model_error(spec_with(["features", 4, "max_len"], 0), weights, "max_len 0")
    expect_model_error(spec_with(["features", 10, "std"], 0), weights, "std 0")
    expect_model_error(spec_with(["features", 12, "max"], 0.0), weights, "min < max")
    expect_model_error(spec_with(["features", 14, "boundaries"], [0, 7, 7, 90, 365]), weights,
                       "boundaries not strictly increasing")
    expect_model_error(spec_with(["features", 15, "name"], "user_id"), weights, "duplicate name")
    expect_model_error(spec_with(["features", 15, "name"], "9lives"), weights, "bad name")
    expect_model_error(spec_with(["layers", 12, "fields"], ["nope"]), weights, "shortcut field")
    expect_model_error(spec_with(["senet"], None, delete=True), weights, "stray senet tensors")
    expect_model_error(spec_with(["layers", 0, "weight"], "layers.4.weight"), weights,
                       "linear in-width mismatch")
    # weights: stray tensor, missing tensor, non-finite, overlap, bad offsets, bad dtype
    h = dict(header)
    h["extra.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    expect_model_error(spec_b, rebuild(h), "stray tensor (and overlap)")
    h = {k: v for k, v in header.items() if k != "layers.13.bias"}
    expect_model_error(spec_b, rebuild(h), "missing tensor")
    h = dict(header)
    b0, e0 = header["layers.4.bias"]["data_offsets"]
    bad = bytearray(buf)
    bad[b0:b0 + 4] = struct.pack("<f", math.inf)
    expect_model_error(spec_b, rebuild(h, bytes(bad)), "non-finite value")
    h = copy.deepcopy(header)
    h["layers.4.bias"]["data_offsets"] = [b0 + 4, e0 + 4]
    expect_model_error(spec_b, rebuild(h), "overlapping tensors")
    h = copy.deepcopy(header)
    h["layers.4.bias"]["data_offsets"] = [len(buf) - 8, len(buf) + 56]
    expect_model_error(spec_b, rebuild(h), "offsets outside the buffer")
    h = copy.deepcopy(header)
    h["layers.4.bias"]["dtype"] = "F64"
    h["layers.4.bias"]["shape"] = [8]
    expect_model_error(spec_b, rebuild(h), "F64 weight")
    h = copy.deepcopy(header)
    h["layers.4.bias"]["shape"] = [15]
    expect_model_error(spec_b, rebuild(h), "size mismatch")
    # num_batches_tracked may be absent
    h = {k: v for k, v in header.items() if not k.endswith("num_batches_tracked")}
    tr.load_model_bytes(spec_b, rebuild(h))


# ----------------------------------------------------------------------------------------------
# gate and scale nodes, pre-rank models and output tasks

def small_model(spec, tensors):
    """A model from a spec dict and {name: array} (stored as F32)."""
    st = {n: ("F32", np.shape(a), mf.f32_bytes(a)) for n, a in tensors.items()}
    return tr.load_model_bytes(json.dumps(spec), mf.write_safetensors(st))


def gated_spec(kind="user"):
    """Dense features x, y, z (2 wide), g1 (1), g2 (2); mix = gate(x, y, z; gate_inputs g1, g2),
    sc = scale(x, y; gate_inputs g2, g1), out = concat(mix, sc) (6 wide)."""
    feats = [{"name": n, "type": "dense", "dim": d}
             for n, d in (("x", 2), ("y", 2), ("z", 2), ("g1", 1), ("g2", 2))]
    graph = [
        {"name": "mix", "inputs": ["x", "y", "z"], "combine": "gate", "gate_inputs": ["g1", "g2"],
         "weight": "mix.weight", "bias": "mix.bias"},
        {"name": "sc", "inputs": ["x", "y"], "combine": "scale", "gate_inputs": ["g2", "g1"],
         "weight": "sc.weight", "bias": "sc.bias"},
        {"name": "out", "inputs": ["mix", "sc"], "combine": "concat"},
    ]
    out = {"dim": 6, "metric": "ip", "node": "out"}
    return {"format": "pg_twotower.tower", "spec_version": 1, "kind": kind, "features": feats,
            "graph": graph, "output": out}


GATED_INPUT = {"x": [0.5, -1.0], "y": [2.0, 0.25], "z": [-0.75, 1.5], "g1": [0.3],
               "g2": [-1.2, 0.8]}


def test_gate_and_scale():
    rng = np.random.RandomState(7)
    t = {"mix.weight": rng.standard_normal((3, 3)), "mix.bias": rng.standard_normal(3),
         "sc.weight": rng.standard_normal((4, 3)), "sc.bias": rng.standard_normal(4)}
    spec = gated_spec()
    m = small_model(spec, t)
    check(m.dim == 6, "gate/scale: output width")
    T = {n: tr.read_safetensors(mf.write_safetensors(
        {n: ("F32", a.shape, mf.f32_bytes(a))}))[0][n] for n, a in t.items()}
    X = {k: np.array(v, dtype=np.float64) for k, v in GATED_INPUT.items()}
    g = np.concatenate([X["g1"], X["g2"]])
    s = T["mix.weight"] @ g + T["mix.bias"]
    a = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    mix = a[0] * X["x"] + a[1] * X["y"] + a[2] * X["z"]
    xs = np.concatenate([X["x"], X["y"]])
    sc = xs * 2 / (1 + np.exp(-(T["sc.weight"] @ np.concatenate([X["g2"], X["g1"]]) + T["sc.bias"])))
    got = tr.embed(m, GATED_INPUT)
    check(np.allclose(got, np.concatenate([mix, sc]), atol=1e-14, rtol=0),
          "gate/scale: the formulas (gate inputs concatenated in listed order)")
    check(float(np.abs(tr.embed_batch(m, [GATED_INPUT])[0] - got).max()) == 0, "gate/scale: batch")
    # equal gate logits (zero weight, equal biases): the mean of the inputs; zero scale weight
    # and no bias: 2 sigmoid(0) = 1, the identity
    z = {"mix.weight": np.zeros((3, 3)), "mix.bias": np.full(3, 0.7), "sc.weight": np.zeros((4, 3))}
    spec0 = copy.deepcopy(spec)
    del spec0["graph"][1]["bias"]
    got = tr.embed(small_model(spec0, z), GATED_INPUT)
    check(np.allclose(got[:2], (X["x"] + X["y"] + X["z"]) / 3, atol=1e-15, rtol=0),
          "gate with equal logits = mean of its inputs")
    check(rows_equal(got[2:], xs), "scale with zero weight and no bias = identity")
    # no bias on the gate: b = 0
    spec1 = copy.deepcopy(spec)
    del spec1["graph"][0]["bias"]
    t1 = {k: v for k, v in t.items() if k != "mix.bias"}
    s = T["mix.weight"] @ g
    a = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    got = tr.embed(small_model(spec1, t1), GATED_INPUT)
    check(np.allclose(got[:2], a[0] * X["x"] + a[1] * X["y"] + a[2] * X["z"], atol=1e-14, rtol=0),
          "gate without bias")
    # stable softmax: huge logits do not overflow
    big = dict(t, **{"mix.weight": np.zeros((3, 3)), "mix.bias": np.array([1000.0, 999.0, -1000.0])})
    got = tr.embed(small_model(spec, big), GATED_INPUT)
    e = np.exp([0.0, -1.0, -2000.0])
    e /= e.sum()
    check(np.allclose(got[:2], e[0] * X["x"] + e[1] * X["y"], atol=1e-14, rtol=0), "stable softmax")
    # scale with a single input; a node read only through gate_inputs is used
    spec2 = copy.deepcopy(spec)
    spec2["graph"][1]["inputs"] = ["x"]
    spec2["graph"][1]["gate_inputs"] = ["gfeat"]
    spec2["graph"].append({"name": "gfeat", "inputs": ["g1", "g2"],
                           "layers": [{"type": "linear", "weight": "gf.weight"}]})
    spec2["output"]["dim"] = 4
    t2 = dict(t, **{"sc.weight": t["sc.weight"][:2, :2], "sc.bias": t["sc.bias"][:2],
                    "gf.weight": np.array([[1.0, 0.5, -0.5], [0.25, 0.0, 1.0]])})
    m2 = small_model(spec2, t2)
    gf = np.array([[1.0, 0.5, -0.5], [0.25, 0.0, 1.0]]) @ g
    want = X["x"] * 2 / (1 + np.exp(-(tr.read_safetensors(mf.write_safetensors(
        {"w": ("F32", (2, 2), mf.f32_bytes(t["sc.weight"][:2, :2]))}))[0]["w"] @ gf
        + T["sc.bias"][:2])))
    check(np.allclose(tr.embed(m2, GATED_INPUT)[2:], want, atol=1e-14, rtol=0),
          "scale of one input, gated by a node read only through gate_inputs")

    def bad(mutate, what, tensors=t):
        s = copy.deepcopy(spec)
        mutate(s)
        try:
            small_model(s, tensors)
            check(False, f"accepted: {what}")
        except tr.ModelError:
            pass

    def setp(path, value):
        def f(s):
            obj = s
            for k in path[:-1]:
                obj = obj[k]
            if value is KeyError:
                del obj[path[-1]]
            else:
                obj[path[-1]] = value
        return f

    bad(setp(["graph", 0, "inputs"], ["x", "y", "g2", "z"]), "gate: inputs of different widths")
    bad(setp(["graph", 0, "inputs"], ["x"]), "gate: one input")
    bad(setp(["graph", 0, "gate_inputs"], ["g1"]), "gate: weight [3, 3] but g = 1")
    bad(setp(["graph", 0, "gate_inputs"], KeyError), "gate without gate_inputs")
    bad(setp(["graph", 1, "gate_inputs"], KeyError), "scale without gate_inputs")
    bad(setp(["graph", 0, "gate_inputs"], []), "gate_inputs empty")
    bad(setp(["graph", 0, "gate_inputs"], ["g1", "g1", "g2"]), "gate_inputs duplicate")
    bad(setp(["graph", 0, "gate_inputs"], ["g1", "nope"]), "gate_inputs unknown")
    bad(setp(["graph", 0, "gate_inputs"], "g1"), "gate_inputs not a list")
    bad(setp(["graph", 0, "gate_inputs"], ["g1"] * 65), "gate_inputs > 64")
    bad(setp(["graph", 0, "gate_inputs"], ["out"]), "a cycle through gate_inputs")
    bad(setp(["graph", 0, "weight"], KeyError), "gate without weight")
    bad(setp(["graph", 1, "weight"], "mix.weight"), "scale weight of the wrong shape")
    bad(setp(["graph", 1, "bias"], "mix.bias"), "scale bias of the wrong shape")
    bad(setp(["graph", 2, "gate_inputs"], ["g1"]), "gate_inputs on a concat node")
    bad(lambda s: s["graph"].__setitem__(2, {"name": "out", "inputs": ["mix", "x"],
                                            "combine": "sum", "gate_inputs": ["g1"]}),
        "gate_inputs on a sum node")
    bad(lambda s: s["graph"].__setitem__(2, {"name": "out", "inputs": ["mix", "sc"],
                                            "gate_inputs": ["g1"]}),
        "gate_inputs on a stack node")
    bad(setp(["graph", 2, "weight"], "mix.weight"), "a weight on a concat node")
    # g1 and g2 are read only through gate_inputs: without them they are unread
    s = copy.deepcopy(spec)
    s["graph"][0]["gate_inputs"] = ["g2"]
    s["graph"][1]["gate_inputs"] = ["g2"]
    try:
        small_model(s, {**t, "mix.weight": t["mix.weight"][:, 1:], "sc.weight": t["sc.weight"][:, :2]})
        check(False, "accepted: a feature no node reads (g1)")
    except tr.ModelError as e:
        check("g1" in str(e), "unread feature named")


def prerank_spec(tasks=None, dim=None):
    """A small pre-rank model: a user number, an item number and u, v (d = 2), a linear head."""
    out = {"dim": dim if dim is not None else (len(tasks) if tasks else 1)}
    if tasks is not None:
        out["tasks"] = tasks
    return {"format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
            "features": [
                {"name": "a", "type": "numeric", "transform": "none"},
                {"name": "p", "type": "numeric", "transform": "none", "source": "item"},
                {"name": "u", "type": "cross", "of": "user_vector", "dim": 2},
                {"name": "v", "type": "cross", "of": "item_vector", "dim": 2},
                {"name": "uv", "type": "cross", "of": "product", "dim": 2}],
            "layers": [{"type": "linear", "weight": "w", "bias": "b"}],
            "output": out}


def test_tasks():
    W3 = np.arange(24, dtype=np.float64).reshape(3, 8) / 16 - 0.5
    t3 = {"w": W3, "b": np.array([0.25, -0.5, 1.0])}
    tasks = [{"name": "click"}, {"name": "like", "link": "identity", "fuse": -2},
             {"name": "stay", "link": "sigmoid", "fuse": 0.5}]
    m = small_model(prerank_spec(tasks), t3)
    check([t["link"] for t in m.tasks] == ["sigmoid", "identity", "sigmoid"]
          and [t["fuse"] for t in m.tasks] == [1.0, -2.0, 0.5], "task defaults: sigmoid, 1.0")
    user, item, u, v = {"a": 1.5}, {"p": -2.0, "other_column": "x"}, [0.5, 1.0], [2.0, -1.0]
    x = np.array([1.5, -2.0, 0.5, 1.0, 2.0, -1.0, 1.0, -1.0])
    row = tr.prerank_forward(m, user, item, u, v)
    check(np.allclose(row, W3 @ x + t3["b"], atol=1e-15, rtol=0), "prerank forward: fields")
    scores, fused = tr.task_scores(m, row)
    sig = lambda z: 1 / (1 + math.exp(-z))
    check(list(scores) == ["click", "like", "stay"], "task scores in task order")
    check(abs(scores["click"] - sig(row[0])) < 1e-16 and scores["like"] == row[1]
          and abs(scores["stay"] - sig(row[2])) < 1e-16, "task links")
    check(abs(fused - (sig(row[0]) - 2 * row[1] + 0.5 * sig(row[2]))) < 1e-15, "fused score")
    # without tasks: one output, its score as it is
    m1 = small_model(prerank_spec(), {"w": W3[:1], "b": t3["b"][:1]})
    check(m1.tasks is None and tr.task_scores(m1, [0.75]) == ({}, 0.75), "no tasks: raw score")
    try:
        tr.prerank_forward(m, {"a": 1, "p": 2}, item, u, v)
        check(False, "accepted: an item feature in the request's features")
    except tr.InputError:
        pass

    def bad(spec, what, tensors=t3):
        try:
            small_model(spec, tensors)
            check(False, f"accepted: {what}")
        except tr.ModelError:
            pass

    bad(prerank_spec(tasks, dim=2), "dim != number of tasks")
    bad(prerank_spec(), "no tasks but dim 3")
    bad(prerank_spec([]), "no tasks listed", {"w": W3[:0], "b": t3["b"][:0]})
    bad(prerank_spec([tasks[0], tasks[1], {"name": "click"}]), "duplicate task name")
    bad(prerank_spec([tasks[0], tasks[1], {"name": "fused"}]), 'task "fused"')
    bad(prerank_spec([tasks[0], tasks[1], {"name": "9x"}]), "bad task name")
    bad(prerank_spec([tasks[0], tasks[1], {"name": "x" * 64}]), "task name too long")
    bad(prerank_spec([tasks[0], tasks[1], {"name": 7}]), "task name not a string")
    bad(prerank_spec([{"name": n, "fuse": 0} for n in "abc"]), "all fuse weights 0")
    bad(prerank_spec([tasks[0], tasks[1], {"name": "s", "link": "softmax"}]), "unknown link")
    bad(prerank_spec([tasks[0], tasks[1], {"name": "s", "fuse": True}]), "fuse a boolean")
    bad(prerank_spec([tasks[0], tasks[1], {"name": "s", "fuse": "1"}]), "fuse a string")
    bad(prerank_spec([tasks[0], tasks[1], {"name": "s", "weight": 1}]), "unknown task key")
    bad(prerank_spec([tasks[0], tasks[1], "s"]), "a task that is not an object")
    bad(prerank_spec(tasks="click"), "tasks not a list", {"w": W3[:1], "b": t3["b"][:1]})
    many = [{"name": f"t{i}"} for i in range(17)]
    bad(prerank_spec(many), "17 tasks", {"w": np.zeros((17, 8)), "b": np.zeros(17)})
    ok16 = [{"name": f"t{i}"} for i in range(16)]
    small_model(prerank_spec(ok16), {"w": np.zeros((16, 8)), "b": np.zeros(16)})
    # one non-zero fuse is enough
    small_model(prerank_spec([{"name": "a", "fuse": 0}, {"name": "b", "fuse": 0},
                              {"name": "c", "fuse": -1e-3}]), t3)
    s = prerank_spec(tasks)
    s["output"]["metric"] = "ip"
    bad(s, "metric on a prerank model")
    # tasks on a user tower
    s = gated_spec()
    s["output"]["tasks"] = [{"name": f"t{i}"} for i in range(6)]
    bad(s, "tasks on a user tower", {"mix.weight": np.zeros((3, 3)), "mix.bias": np.zeros(3),
                                     "sc.weight": np.zeros((4, 3)), "sc.bias": np.zeros(4)})
    # source and cross features belong to prerank models
    s = gated_spec()
    s["features"][0]["source"] = "user"
    bad(s, "source in a user tower", {"mix.weight": np.zeros((3, 3)), "mix.bias": np.zeros(3),
                                      "sc.weight": np.zeros((4, 3)), "sc.bias": np.zeros(4)})
    s = prerank_spec(tasks)
    s["features"][1]["source"] = "candidate"
    bad(s, "unknown source")
    s = prerank_spec(tasks)
    s["features"][2]["of"] = "user_vec"
    bad(s, "unknown cross input")
    s = prerank_spec(tasks)
    del s["features"][2]["dim"]
    bad(s, "user_vector without dim")


def load_multitask():
    d = os.path.join(HERE, "multitask")
    with open(os.path.join(d, "spec.json"), "rb") as f:
        spec = f.read()
    with open(os.path.join(d, "weights.safetensors"), "rb") as f:
        weights = f.read()
    with open(os.path.join(d, "cases.json"), encoding="utf-8") as f:
        cases = json.load(f)
    with open(os.path.join(d, "expected.json"), encoding="utf-8") as f:
        expected = json.load(f)
    with open(os.path.join(d, "invalid_specs.json"), encoding="utf-8") as f:
        invalid = json.load(f)
    return spec, weights, cases, expected, invalid


def test_multitask_fixture():
    spec_b, weights, cases, expected, _ = load_multitask()
    spec = json.loads(spec_b)
    m = tr.load_model_bytes(spec_b, weights)
    check(m.kind == "prerank" and m.dim == 3 and m.metric is None, "multitask: header")
    check([t["name"] for t in m.tasks] == ["rated", "liked", "minutes"], "multitask: tasks")
    check(len(cases) == len(expected) >= 12, "multitask: case count")
    # the same case shape as attention/
    with open(os.path.join(HERE, "attention", "cases.json"), encoding="utf-8") as f:
        att = json.load(f)
    check(all(set(c) == set(att[0]) for c in cases), "multitask: cases shaped like attention/")
    check(all(set(e) == {"logits", "scores", "fused"} for e in expected), "multitask: expected keys")
    # scene is read only through gate_inputs; every combine kind that is new is present
    graph = spec["graph"]
    check(not any("scene" in n["inputs"] for n in graph)
          and any("scene" in n.get("gate_inputs", []) for n in graph), "scene only gates")
    kinds = [n.get("combine") for n in graph]
    check(kinds.count("gate") == 3 and kinds.count("scale") == 1, "multitask: node kinds")
    check(sum(1 for n in graph if n.get("combine") == "gate" and "bias" not in n) == 1,
          "multitask: one gate without bias")
    tensors, _, _ = tr.read_safetensors(weights)
    rows = []
    for i, (c, e) in enumerate(zip(cases, expected)):
        row = tr.prerank_forward(m, c["user"], c["item"], c["u"], c["v"], c["history"])
        rows.append(row)
        scores, fused = tr.task_scores(m, row)
        check(row.tolist() == e["logits"] and scores == e["scores"] and fused == e["fused"],
              f"multitask case {i}: reproduces expected.json")
        direct = mf.prerank_multitask_ref(tensors, c)
        check(float(np.max(np.abs(row - direct))) < 1e-12, f"multitask case {i}: direct numpy")
        f32 = np.array(mf.prerank_multitask_ref(tensors, c, np.float32), dtype=np.float64)
        check(float(np.max(np.abs(row - f32))) < 1e-5, f"multitask case {i}: f32 within 1e-5")
        sig = lambda z: 1 / (1 + math.exp(-z))
        want = [sig(e["logits"][0]), sig(e["logits"][1]), e["logits"][2]]
        check(np.allclose([e["scores"][k] for k in ("rated", "liked", "minutes")], want,
                          atol=1e-16, rtol=0), f"multitask case {i}: links")
        check(abs(e["fused"] - (want[0] + 0.5 * want[1] - 0.25 * want[2])) < 1e-15,
              f"multitask case {i}: fused")
        check(all(0.05 < s < 0.95 for s in want[:2]), f"multitask case {i}: sigmoids unsaturated")
    L = np.array(rows)
    same = set(mf.MT_SAME)
    for a, b in same:
        check(rows_equal(L[a], L[b]), f"multitask cases {a} and {b} equal")
    for a in range(len(L)):
        for b in range(a + 1, len(L)):
            if (a, b) not in same:
                check(float(np.max(np.abs(L[a] - L[b]))) > 0.1, f"multitask cases {a}, {b} differ")
    # cases 0 and 1 differ only in scene
    check({k: v for k, v in cases[0].items() if k != "user"}
          == {k: v for k, v in cases[1].items() if k != "user"}
          and {k: v for k, v in cases[0]["user"].items() if k != "scene"}
          == {k: v for k, v in cases[1]["user"].items() if k != "scene"}
          and cases[0]["user"]["scene"] != cases[1]["user"]["scene"], "cases 0, 1: only scene")
    # scene OOV and missing use row 0
    names = [f.name for f in m.features]
    for c in (4, 5, 6):
        f = tr.prerank_fields(m, cases[c]["user"], cases[c]["item"], cases[c]["u"], cases[c]["v"])
        check(rows_equal(f[names.index("scene")], m.features[0].table[0]), f"case {c}: scene row 0")
    f = tr.prerank_fields(m, cases[7]["user"], cases[7]["item"], cases[7]["u"], cases[7]["v"])
    check(f[names.index("price")][0] == 0 and f[names.index("duration")][0] == 0.2
          and rows_equal(f[names.index("category")], m.features[3].table[0]),
          "case 7: item features missing")


def test_multitask_invalid_specs():
    spec_b, weights, _, _, invalid = load_multitask()
    bases = {"multitask": (json.loads(spec_b), weights)}
    for sub in ("graph", "item"):
        s, w, _, _ = load(sub)
        bases[sub] = (json.loads(s), w)
    check(len(invalid) >= 10, "invalid specs count")
    for c in invalid:
        check(set(c) == {"why", "base", "patch", "spec"}, f"invalid spec keys ({c.get('why')})")
        base, w = bases[c["base"]]
        tr.load_model_bytes(json.dumps(base), w)  # the base itself is valid
        check(mf.apply_patch(base, c["patch"]) == c["spec"], f"patch gives spec: {c['why']}")
        try:
            tr.load_model_bytes(json.dumps(c["spec"]), w)
            check(False, f"invalid spec accepted: {c['why']}")
        except tr.ModelError:
            pass
    whys = " / ".join(c["why"] for c in invalid)
    for must in ("different widths", "one input", "wrong shape", "sum node", "scale without",
                 "user tower", "2 tasks", "duplicate task", '"fused"', "fuse weight 0",
                 "unknown link"):
        check(must in whys, f"invalid specs include: {must}")


def test_prerank_attention_generic():
    """tower_ref's generic pre-rank path reproduces attention/ (made by prerank_attention_ref)."""
    d = os.path.join(HERE, "attention")
    m = tr.load_model(os.path.join(d, "spec.json"), os.path.join(d, "weights.safetensors"))
    with open(os.path.join(d, "cases.json"), encoding="utf-8") as f:
        cases = json.load(f)
    with open(os.path.join(d, "expected.json"), encoding="utf-8") as f:
        expected = json.load(f)
    for i, (c, e) in enumerate(zip(cases, expected)):
        row = tr.prerank_forward(m, c["user"], c["item"], c["u"], c["v"], c["history"])
        scores, fused = tr.task_scores(m, row)
        check(scores == {} and abs(fused - e) < 1e-12, f"attention case {i}: generic prerank path")


def main():
    for name, fn in sorted(globals().items()):
        if name.startswith("test_") and callable(fn):
            fn()
            print("ok" if not FAILURES else "..", name)
    if FAILURES:
        print(f"{len(FAILURES)} failure(s)")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
