#!/usr/bin/env python3
"""Self-checks of the numpy reference (tower_ref.py) and of the golden fixtures.

    python3 tests/golden/test_tower_ref.py        (numpy only; exits non-zero on failure)

Checks hashing and canonical ids, the F16/BF16 decoders against bit-level decodes of all 65536
patterns, the safetensors/spec validation, that expected.json is reproduced by both forward
paths, and the semantic claims of the cases (OOV rows, defaults, buckets, pooling, equal outputs).
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
