#!/usr/bin/env python3
"""Reference implementation of the pg_twotower tower model format (spec_version 1).

Written from docs/model-format.md alone, independently of the Rust implementation, so that the
two can be checked against each other (tests/golden/*.json). Needs only numpy and the standard
library; the `safetensors` package is NOT required.

All arithmetic is done in float64 on the stored weights (F32, F16 and BF16 are widened to float64
exactly), so the results are the "true" values the f32 implementation approximates.

API
    load_model(spec_path, weights_path) -> Model
    load_model_bytes(spec, weights_bytes) -> Model     (spec: dict, str or bytes)
    embed(model, features) -> np.ndarray [dim]         (one input; plain per-element math,
                                                        exactly-rounded sums via math.fsum)
    embed_batch(model, rows, dtype=np.float64) -> np.ndarray [len(rows), dim]
                                                       (vectorised numpy over the batch)
    fields(model, features) -> list of np.ndarray      (the raw fields, before SENet)
    prerank_forward(model, user, item, u, v, history, scalars) -> np.ndarray [dim]
                                                       (a pre-rank model's output row for one
                                                        (request, candidate) pair: its logits)
    task_scores(model, row) -> ({task: score}, fused)  (a pre-rank output row's task scores
                                                        link(logit_t) and their fused score)
    fnv1a64(s), canonical_id(v), read_safetensors(data)

Errors: ModelError (bad spec or weights), InputError (bad features input). Both are ValueError.

Command line:
    python3 tower_ref.py SPEC.json WEIGHTS.safetensors INPUTS.json [EXPECTED.json]
prints one embedding per input (a JSON list), or, with EXPECTED.json, compares against it.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys

import numpy as np

__all__ = [
    "ModelError", "InputError", "Model", "Feature",
    "fnv1a64", "canonical_id", "read_safetensors", "decode_tensor",
    "load_model", "load_model_bytes", "embed", "embed_batch", "fields",
    "prerank_forward", "prerank_fields", "task_scores",
]


class ModelError(ValueError):
    """The spec or the weights file is invalid."""


class InputError(ValueError):
    """A features input is invalid for the model."""


# ----------------------------------------------------------------------------------------------
# ids and hashing

FNV_OFFSET_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK64 = 0xFFFFFFFFFFFFFFFF


def fnv1a64(s: str) -> int:
    """64-bit FNV-1a over the UTF-8 bytes of s (wrapping multiplication)."""
    try:
        data = s.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates cannot be UTF-8
        raise InputError(f"id {s!r} is not valid unicode") from e
    h = FNV_OFFSET_BASIS
    for b in data:
        h ^= b
        h = (h * FNV_PRIME) & _MASK64
    return h


def canonical_id(v) -> str:
    """The canonical string of a JSON id (string, integral number or boolean).

    A string is itself; an integral number is its decimal form ('-' for negatives, 42.0 -> '42');
    booleans are 'true'/'false'. Anything else (non-integral numbers, lists, objects) is an error.
    JSON null is not an id: callers handle it before calling this.
    """
    if isinstance(v, bool):  # before int: bool is an int subclass in Python
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isfinite(v) and v == math.floor(v):
            return str(int(v))
        raise InputError(f"id {v!r} is not an integral number")
    if isinstance(v, str):
        return v
    raise InputError(f"id must be a string, an integral number or a boolean, not {_jtype(v)}")


def _jtype(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ----------------------------------------------------------------------------------------------
# safetensors

# Element sizes of the safetensors dtypes (needed to check offsets of every tensor, even the
# ignored ones). Only F32/F16/BF16 are accepted as model weights.
_DTYPE_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_WEIGHT_DTYPES = ("F32", "F16", "BF16")
_MAX_HEADER = 100 * 1024 * 1024
_MAX_FILE = 1024 * 1024 * 1024
IGNORED_SUFFIX = "num_batches_tracked"


def decode_tensor(dtype: str, raw: bytes) -> np.ndarray:
    """Little-endian raw bytes of an F32/F16/BF16/I64 tensor -> flat float64 (int64 for I64)."""
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float64)
    if dtype == "BF16":
        # bfloat16 is the upper half of an IEEE binary32
        bits = np.frombuffer(raw, dtype="<u2").astype("<u4") << np.uint32(16)
        with np.errstate(invalid="ignore"):  # NaN patterns (rejected later) cast quietly
            return bits.view("<f4").astype(np.float64)
    if dtype == "I64":
        return np.frombuffer(raw, dtype="<i8").copy()
    raise ModelError(f"unsupported dtype {dtype}")


def read_safetensors(data: bytes):
    """Parse and validate a safetensors file.

    Returns (tensors, ignored, metadata): tensors maps name -> float64 ndarray of its shape for
    every F32/F16/BF16 tensor; ignored lists the names ending in num_batches_tracked (any dtype;
    their offsets are still checked); metadata is the __metadata__ dict or None.
    """
    data = bytes(data)
    if len(data) > _MAX_FILE:
        raise ModelError("weights file larger than 1 GB")
    if len(data) < 8:
        raise ModelError("weights file shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER:
        raise ModelError(f"safetensors header of {n} bytes exceeds 100 MB")
    if 8 + n > len(data):
        raise ModelError("safetensors header runs past the end of the file")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"safetensors header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise ModelError("safetensors header is not a JSON object")
    buf = data[8 + n:]

    metadata = None
    spans = []
    tensors = {}
    ignored = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ModelError("__metadata__ must be an object of strings")
            metadata = info
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ModelError(f"tensor {name!r}: header entry must have dtype, shape, data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPE_SIZE:
            raise ModelError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ModelError(f"tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= len(buf)):
            raise ModelError(f"tensor {name!r}: data_offsets {offs!r} outside the data buffer")
        count = math.prod(shape)
        if offs[1] - offs[0] != count * _DTYPE_SIZE[dtype]:
            raise ModelError(f"tensor {name!r}: data_offsets do not match shape x element size")
        spans.append((offs[0], offs[1], name))
        if name.endswith(IGNORED_SUFFIX):
            ignored.append(name)
            continue
        if dtype not in _WEIGHT_DTYPES:
            raise ModelError(f"tensor {name!r}: dtype {dtype} not accepted (F32, F16, BF16 only)")
        arr = decode_tensor(dtype, buf[offs[0]:offs[1]])
        if not np.all(np.isfinite(arr)):
            raise ModelError(f"tensor {name!r}: non-finite value")
        tensors[name] = arr.reshape(shape)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ModelError(f"tensors {n0!r} and {n1!r} overlap")
    return tensors, ignored, metadata


# ----------------------------------------------------------------------------------------------
# spec

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CROSS_VECTOR = ("user_vector", "item_vector", "product", "target_attention")
_CROSS_SCALAR = ("score", "history_max", "history_mean", "recall_rank")
_ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid")
MAX_FEATURES = 256
MAX_LAYERS = 64
MAX_WIDTH = 16000
MAX_LIST = 100000


def _keys(obj, where, required, optional=()):
    if not isinstance(obj, dict):
        raise ModelError(f"{where}: must be an object")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ModelError(f"{where}: missing key(s) {missing}")
    unknown = [k for k in obj if k not in required and k not in optional]
    if unknown:
        raise ModelError(f"{where}: unknown key(s) {unknown}")


def _finite(v, where):
    if not _is_number(v) or not math.isfinite(v):
        raise ModelError(f"{where}: must be a finite number")
    return float(v)


class Feature:
    """One compiled feature definition."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.name = spec["name"]
        self.type = spec["type"]
        self.width = 0
        self.table = None          # float64 [rows, d]
        self.table_rows = None     # same as nested lists (for the per-element path)
        self.vocab = None          # id string -> row
        self.hash_buckets = None
        self.pooling = None
        self.max_len = None
        self.weighted = False
        self.transform = None
        self.mean = self.std = self.min = self.max = None
        self.default = None
        self.boundaries = None     # float64 [m]
        self.dim = None
        self.source = "user"       # pre-rank models: "user", "item" or "cross"
        self.cross = None          # a cross feature's "of"
        self.attention = None      # target_attention: (W_q, W_k) float64 [r, dim]

    def row_of(self, cid: str) -> int:
        if self.vocab is not None:
            return self.vocab.get(cid, 0)
        return 1 + fnv1a64(cid) % self.hash_buckets


class Model:
    def __init__(self):
        self.spec = None
        self.kind = None
        self.metric = None
        self.dim = None
        self.features = []
        self.by_name = {}
        self.senet = None          # (W1, b1, W2, b2) float64 arrays
        self.graph = None          # [(name, node)] in dependency order, when the spec has a graph
        self.layers = []           # list of (type, params dict)
        self.input_width = 0
        self.column_field = None   # field index of each concatenated column
        self.field_mean = None     # [W, F] averaging matrix
        self.tasks = None          # pre-rank output tasks: [{"name", "link", "fuse"}], or None
        self._cast_cache = {}

    def cast(self, arr: np.ndarray, dt) -> np.ndarray:
        """arr in dtype dt (float64 arrays as they are; other dtypes converted once, cached)."""
        dt = np.dtype(dt)
        if arr.dtype == dt:
            return arr
        key = (id(arr), dt.str)
        hit = self._cast_cache.get(key)
        if hit is None:
            hit = self._cast_cache[key] = arr.astype(dt)
        return hit

    def __repr__(self):
        return (f"<tower kind={self.kind} features={len(self.features)} "
                f"layers={len(self.layers)} {self.input_width}->{self.dim} {self.metric}>")


def load_model(spec_path, weights_path) -> Model:
    with open(spec_path, "rb") as f:
        spec = f.read()
    with open(weights_path, "rb") as f:
        weights = f.read()
    return load_model_bytes(spec, weights)


def load_model_bytes(spec, weights: bytes) -> Model:
    if isinstance(spec, (bytes, bytearray)):
        spec = spec.decode("utf-8")
    if isinstance(spec, str):
        spec = json.loads(spec)
    tensors, _ignored, _meta = read_safetensors(weights)
    used = set()

    def tensor(name, shape, where):
        """Fetch a named tensor; shape entries of None are free (returned)."""
        if not isinstance(name, str):
            raise ModelError(f"{where}: tensor name must be a string")
        if name not in tensors:
            raise ModelError(f"{where}: tensor {name!r} not in the weights file")
        t = tensors[name]
        if t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = ["?" if s is None else s for s in shape]
            raise ModelError(f"{where}: tensor {name!r} has shape {list(t.shape)}, expected {want}")
        used.add(name)
        return t

    m = Model()
    m.spec = spec
    _keys(spec, "spec", ("format", "spec_version", "kind", "features", "output"),
          ("senet", "layers", "graph"))
    if spec["format"] != "pg_twotower.tower":
        raise ModelError('spec: format must be "pg_twotower.tower"')
    if not (_is_int(spec["spec_version"]) and spec["spec_version"] == 1):
        raise ModelError("spec: spec_version must be 1")
    if spec["kind"] not in ("user", "item", "prerank"):
        raise ModelError('spec: kind must be "user", "item" or "prerank"')
    m.kind = spec["kind"]
    prerank = m.kind == "prerank"

    feats = spec["features"]
    if not isinstance(feats, list) or not 1 <= len(feats) <= MAX_FEATURES:
        raise ModelError(f"spec: features must be a list of 1..={MAX_FEATURES} definitions")
    for i, fs in enumerate(feats):
        where = f"features[{i}]"
        if not isinstance(fs, dict) or "name" not in fs or "type" not in fs:
            raise ModelError(f"{where}: needs name and type")
        name, typ = fs["name"], fs["type"]
        if not isinstance(name, str) or not 1 <= len(name) <= 63 or not _NAME_RE.match(name):
            raise ModelError(f"{where}: bad name {name!r}")
        if name in m.by_name:
            raise ModelError(f"{where}: duplicate name {name!r}")
        where = f"feature {name!r}"
        source = "user"
        if "source" in fs or typ == "cross":
            if not prerank:
                raise ModelError(f"{where}: source and cross features are for prerank models only")
        if "source" in fs:
            if typ == "cross":
                raise ModelError(f"{where}: a cross feature has no source")
            source = fs["source"]
            if source not in ("user", "item"):
                raise ModelError(f'{where}: source must be "user" or "item"')
            fs = {k: v for k, v in fs.items() if k != "source"}
        f = Feature(fs)
        f.source = source
        if typ == "cross":
            _keys(fs, where, ("name", "type", "of"), ("dim", "attention"))
            of = fs["of"]
            if of not in _CROSS_VECTOR + _CROSS_SCALAR:
                raise ModelError(f"{where}: unknown cross input {of!r}")
            f.source, f.cross = "cross", of
            if of in _CROSS_VECTOR:
                if "dim" not in fs:
                    raise ModelError(f"{where}: a {of} input needs dim")
                if not (_is_int(fs["dim"]) and 1 <= fs["dim"] <= MAX_WIDTH):
                    raise ModelError(f"{where}: dim must be an integer in 1..={MAX_WIDTH}")
                f.dim = fs["dim"]
            else:
                if "dim" in fs and not (_is_int(fs["dim"]) and fs["dim"] == 1):
                    raise ModelError(f"{where}: a {of} input has width 1")
                f.dim = 1
            f.width = f.dim
            if of == "target_attention":
                if "attention" not in fs:
                    raise ModelError(f"{where}: target_attention needs attention weights")
                if any(g.cross == "target_attention" for g in m.features):
                    raise ModelError(f"{where}: at most one target_attention input")
                _keys(fs["attention"], f"{where}.attention", ("query", "key"))
                wq = tensor(fs["attention"]["query"], (None, f.dim), f"{where}.attention")
                wk = tensor(fs["attention"]["key"], (wq.shape[0], f.dim), f"{where}.attention")
                if wq.shape[0] < 1:
                    raise ModelError(f"{where}: attention r must be >= 1")
                f.attention = (wq, wk)
            elif "attention" in fs:
                raise ModelError(f"{where}: only target_attention has attention weights")
        elif typ in ("categorical", "multi_categorical"):
            opt = ("vocabulary", "hash_buckets")
            if typ == "multi_categorical":
                _keys(fs, where, ("name", "type", "embedding", "pooling"),
                      opt + ("max_len", "weighted"))
                if fs["pooling"] not in ("mean", "sum", "max"):
                    raise ModelError(f'{where}: pooling must be "mean", "sum" or "max"')
                f.pooling = fs["pooling"]
                if "max_len" in fs:
                    if not (_is_int(fs["max_len"]) and 1 <= fs["max_len"] <= 10000):
                        raise ModelError(f"{where}: max_len must be an integer in 1..=10000")
                    f.max_len = fs["max_len"]
                if "weighted" in fs:
                    if not isinstance(fs["weighted"], bool):
                        raise ModelError(f"{where}: weighted must be a boolean")
                    f.weighted = fs["weighted"]
            else:
                _keys(fs, where, ("name", "type", "embedding"), opt)
            if ("vocabulary" in fs) == ("hash_buckets" in fs):
                raise ModelError(f"{where}: exactly one of vocabulary and hash_buckets")
            if "vocabulary" in fs:
                voc = fs["vocabulary"]
                if not isinstance(voc, list) or not all(isinstance(v, str) for v in voc):
                    raise ModelError(f"{where}: vocabulary must be a list of strings")
                if len(set(voc)) != len(voc):
                    raise ModelError(f"{where}: vocabulary entries must be distinct")
                f.vocab = {v: i + 1 for i, v in enumerate(voc)}
                rows = len(voc) + 1
            else:
                hb = fs["hash_buckets"]
                if not (_is_int(hb) and hb >= 1):
                    raise ModelError(f"{where}: hash_buckets must be an integer >= 1")
                f.hash_buckets = hb
                rows = hb + 1
            f.table = tensor(fs["embedding"], (rows, None), where)
            f.width = f.table.shape[1]
        elif typ == "numeric":
            tr = fs.get("transform")
            need = {"none": (), "zscore": ("mean", "std"), "log1p": (), "minmax": ("min", "max")}
            if tr not in need:
                raise ModelError(f"{where}: transform must be none, zscore, log1p or minmax")
            _keys(fs, where, ("name", "type", "transform") + need[tr], ("default",))
            f.transform = tr
            if tr == "zscore":
                f.mean = _finite(fs["mean"], f"{where}.mean")
                f.std = _finite(fs["std"], f"{where}.std")
                if not f.std > 0:
                    raise ModelError(f"{where}: std must be > 0")
            if tr == "minmax":
                f.min = _finite(fs["min"], f"{where}.min")
                f.max = _finite(fs["max"], f"{where}.max")
                if not f.min < f.max:
                    raise ModelError(f"{where}: min must be < max")
            if "default" in fs:
                f.default = _finite(fs["default"], f"{where}.default")
            f.width = 1
        elif typ == "bucketize":
            _keys(fs, where, ("name", "type", "boundaries", "embedding"))
            b = fs["boundaries"]
            if not isinstance(b, list):
                raise ModelError(f"{where}: boundaries must be a list")
            b = [_finite(x, f"{where}.boundaries") for x in b]
            if any(not x < y for x, y in zip(b, b[1:])):
                raise ModelError(f"{where}: boundaries must be strictly increasing")
            f.boundaries = np.array(b, dtype=np.float64)
            f.table = tensor(fs["embedding"], (len(b) + 2, None), where)
            f.width = f.table.shape[1]
        elif typ == "dense":
            _keys(fs, where, ("name", "type", "dim"))
            if not (_is_int(fs["dim"]) and 1 <= fs["dim"] <= 4096):
                raise ModelError(f"{where}: dim must be an integer in 1..=4096")
            f.dim = f.width = fs["dim"]
        else:
            raise ModelError(f"{where}: unknown type {typ!r}")
        if f.table is not None:
            if f.width < 1:
                raise ModelError(f"{where}: embedding width must be >= 1")
            f.table_rows = f.table.tolist()
        m.features.append(f)
        m.by_name[name] = f

    nf = len(m.features)
    if "senet" in spec:
        s = spec["senet"]
        _keys(s, "senet", ("w1", "b1", "w2", "b2"))
        w1 = tensor(s["w1"], (None, nf), "senet.w1")
        r = w1.shape[0]
        if r < 1:
            raise ModelError("senet: r must be >= 1")
        b1 = tensor(s["b1"], (r,), "senet.b1")
        w2 = tensor(s["w2"], (nf, r), "senet.w2")
        b2 = tensor(s["b2"], (nf,), "senet.b2")
        m.senet = (w1, b1, w2, b2)

    width = sum(f.width for f in m.features)
    m.input_width = width
    # for the vectorised SENet: which field each concatenated column belongs to, and the
    # [W, F] matrix whose product with the concatenated fields gives the field means
    m.column_field = np.repeat(np.arange(nf), [f.width for f in m.features])
    m.field_mean = np.zeros((width, nf))
    m.field_mean[np.arange(width), m.column_field] = 1.0 / np.array(
        [m.features[i].width for i in m.column_field], dtype=np.float64)
    if width > MAX_WIDTH:
        raise ModelError(f"concatenated fields are {width} wide (max {MAX_WIDTH})")
    if "graph" in spec:
        if spec.get("layers", []) != []:
            raise ModelError("spec: a spec with a graph has its layers in the graph's nodes")
        width = _parse_graph(m, spec["graph"], spec["output"].get("node"), tensor, width)
    else:
        layers = spec["layers"]
        if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
            raise ModelError(f"spec: layers must be a list of at most {MAX_LAYERS}")
        m.layers, width = _parse_layers(m, layers, width, tensor, "layers", True)

    out = spec["output"]
    if prerank:
        _keys(out, "output", ("dim",), ("node", "tasks"))
        if "tasks" in out:
            m.tasks = _parse_tasks(out["tasks"])
            if not (_is_int(out["dim"]) and out["dim"] == len(m.tasks)):
                raise ModelError(f"output: dim {out['dim']!r} must equal the number of tasks "
                                 f"({len(m.tasks)})")
        elif not (_is_int(out["dim"]) and out["dim"] == 1):
            raise ModelError("output: a prerank model without tasks has dim 1")
    else:
        if isinstance(out, dict) and "tasks" in out:
            raise ModelError("output.tasks: only a prerank model has tasks")
        _keys(out, "output", ("dim", "metric"), ("node",))
        if out["metric"] not in ("cosine", "ip", "l2"):
            raise ModelError('output: metric must be "cosine", "ip" or "l2"')
        m.metric = out["metric"]
    if not (_is_int(out["dim"]) and out["dim"] == width):
        raise ModelError(f"output: dim {out['dim']!r} does not match the layer stack ({width})")
    m.dim = width

    stray = sorted(set(tensors) - used)
    if stray:
        raise ModelError(f"weights file has tensors the spec does not name: {stray}")
    return m


MAX_TASKS = 16
TASK_LINKS = ("sigmoid", "identity")


def _parse_tasks(tasks):
    """A pre-rank model's output.tasks -> [{"name", "link", "fuse"}] (defaults filled in)."""
    if not isinstance(tasks, list) or not 1 <= len(tasks) <= MAX_TASKS:
        raise ModelError(f"output.tasks: must list 1 to {MAX_TASKS} tasks")
    out = []
    for t, task in enumerate(tasks):
        where = f"output.tasks[{t}]"
        _keys(task, where, ("name",), ("link", "fuse"))
        name = task["name"]
        if not isinstance(name, str) or not 1 <= len(name) <= 63 or not _NAME_RE.match(name):
            raise ModelError(f"{where}: bad task name {name!r}")
        if name == "fused":
            raise ModelError(f'{where}: "fused" is not a task name (it is the fused score)')
        if any(o["name"] == name for o in out):
            raise ModelError(f"{where}: duplicate task name {name!r}")
        link = task.get("link", "sigmoid")
        if link not in TASK_LINKS:
            raise ModelError(f'{where}: link must be "sigmoid" or "identity", got {link!r}')
        fuse = _finite(task.get("fuse", 1.0), f"{where}.fuse")
        out.append({"name": name, "link": link, "fuse": fuse})
    if all(o["fuse"] == 0 for o in out):
        raise ModelError("output.tasks: every fuse weight is 0 (the fused score would be 0)")
    return out


def _parse_layers(m, layers, width, tensor, path, allow_shortcut):
    """Parses a layer stack reading `width` inputs; returns (layers, output width)."""
    out_layers = []
    for i, ls in enumerate(layers):
        where = f"{path}[{i}]"
        if not isinstance(ls, dict) or "type" not in ls:
            raise ModelError(f"{where}: needs a type")
        t = ls["type"]
        where = f"{path}[{i}] ({t})"
        if t == "linear":
            _keys(ls, where, ("type", "weight"), ("bias",))
            w = tensor(ls["weight"], (None, width), where)
            out = w.shape[0]
            if out < 1:
                raise ModelError(f"{where}: out must be >= 1")
            b = tensor(ls["bias"], (out,), where) if "bias" in ls else None
            out_layers.append(("linear", {"weight": w, "bias": b,
                                        "w_rows": w.tolist(),
                                        "b_list": None if b is None else b.tolist()}))
            width = out
        elif t in _ACTIVATIONS or t == "l2_normalize":
            _keys(ls, where, ("type",))
            out_layers.append((t, {}))
        elif t == "layernorm":
            _keys(ls, where, ("type", "weight", "bias"), ("eps",))
            eps = _finite(ls.get("eps", 1e-5), f"{where}.eps")
            if eps < 0:
                raise ModelError(f"{where}: eps must be >= 0")
            out_layers.append(("layernorm", {"weight": tensor(ls["weight"], (width,), where),
                                           "bias": tensor(ls["bias"], (width,), where),
                                           "eps": eps}))
        elif t == "batchnorm":
            _keys(ls, where, ("type", "weight", "bias", "running_mean", "running_var"), ("eps",))
            eps = _finite(ls.get("eps", 1e-5), f"{where}.eps")
            if eps < 0:
                raise ModelError(f"{where}: eps must be >= 0")
            p = {k: tensor(ls[k], (width,), where)
                 for k in ("weight", "bias", "running_mean", "running_var")}
            if np.any(p["running_var"] + eps <= 0):
                raise ModelError(f"{where}: running_var + eps must be > 0")
            p["eps"] = eps
            out_layers.append(("batchnorm", p))
        elif t == "dropout":
            _keys(ls, where, ("type",), ("p",))
            if "p" in ls:
                p = _finite(ls["p"], f"{where}.p")
                if not 0 <= p <= 1:
                    raise ModelError(f"{where}: p must be in [0, 1]")
            out_layers.append(("dropout", {}))
        elif t == "shortcut":
            if not allow_shortcut:
                raise ModelError(f"{where}: a graph node cannot have a shortcut layer")
            _keys(ls, where, ("type", "fields"))
            names = ls["fields"]
            if not isinstance(names, list) or not names:
                raise ModelError(f"{where}: fields must be a non-empty list of feature names")
            idx = []
            for n in names:
                if not isinstance(n, str) or n not in m.by_name:
                    raise ModelError(f"{where}: {n!r} is not a feature")
                idx.append(m.features.index(m.by_name[n]))
                width += m.by_name[n].width
            out_layers.append(("shortcut", {"fields": idx}))
        else:
            raise ModelError(f"{where}: unknown layer type {t!r}")
        if width > MAX_WIDTH:
            raise ModelError(f"{where}: width {width} exceeds {MAX_WIDTH}")
    return out_layers, width


_COMBINES = ("concat", "sum", "weighted_sum", "weighted_concat", "attention", "gate", "scale")
_GATED = ("gate", "scale")          # the combine nodes that read gate_inputs
# the keys each combine has besides name, inputs and combine: (required, optional)
_COMBINE_KEYS = {
    "concat": ((), ()), "sum": ((), ()),
    "weighted_sum": (("weight",), ()), "weighted_concat": (("weight",), ()),
    "attention": (("weight",), ("bias",)),
    "gate": (("weight", "gate_inputs"), ("bias",)),
    "scale": (("weight", "gate_inputs"), ("bias",)),
}
MAX_NODES = 64
MAX_GATE_INPUTS = 64


def _parse_graph(m, graph, output, tensor, input_width):
    """Parses the spec's graph (named nodes over features and other nodes); returns the output
    node's width. Nodes are evaluated in dependency order (m.graph: list of node dicts).
    A node's references are its inputs and, for gate and scale nodes, its gate_inputs: both
    count for the dependency order, cycles and the every-node-used / every-feature-read rules."""
    if not isinstance(graph, list) or not 1 <= len(graph) <= MAX_NODES:
        raise ModelError(f"graph: must list 1 to {MAX_NODES} nodes")
    names = [n.get("name") if isinstance(n, dict) else None for n in graph]
    feats = [f.name for f in m.features]
    for i, n in enumerate(names):
        if not isinstance(n, str) or n in feats or names.count(n) > 1:
            raise ModelError(f"graph[{i}]: bad, duplicate or feature-named node name {n!r}")
    for i, n in enumerate(graph):
        if "inputs" not in n:
            raise ModelError(f"graph[{i}]: missing key(s) ['inputs']")
        for key in ("inputs", "gate_inputs"):
            if key in n and (not isinstance(n[key], list)
                             or not all(isinstance(x, str) for x in n[key])):
                raise ModelError(f"graph[{i}].{key}: must be a list of names")
    by_name = {n: i for i, n in enumerate(names)}
    if output is not None and output not in by_name:
        raise ModelError(f"output.node: {output!r} is not a node of the graph")
    out = by_name[output] if output is not None else len(graph) - 1

    def refs(n):
        return n["inputs"] + n.get("gate_inputs", [])

    order, state = [], {}

    def visit(i, path):
        if state.get(i) == "done":
            return
        if state.get(i) == "on":
            cyc = path[path.index(i):] + [i]
            raise ModelError("graph: the nodes form a cycle: "
                             + " -> ".join(names[j] for j in cyc))
        state[i] = "on"
        for x in refs(graph[i]):
            if x in by_name:
                visit(by_name[x], path + [i])
            elif x not in feats:
                raise ModelError(f"graph[{i}]: unknown input {x!r}")
        state[i] = "done"
        order.append(i)

    visit(out, [])
    if len(order) != len(graph):
        raise ModelError("graph: a node is not used by the output node")
    used = {x for n in graph for x in refs(n)}
    for f in feats:
        if f not in used:
            raise ModelError(f"feature {f!r} is not an input of any graph node")
    offsets, o = {}, 0
    for f in m.features:
        offsets[f.name] = (o, f.width)
        o += f.width
    widths, nodes = {}, {}

    def ref(x):
        return ("field", offsets[x]) if x in offsets else ("node", x)

    def width_of(x):
        return offsets[x][1] if x in offsets else widths[x]

    for i in order:
        n = graph[i]
        where = f"graph[{i}]"
        _keys(n, where, ("name", "inputs"), ("layers", "combine", "weight", "bias", "gate_inputs"))
        ins = [ref(x) for x in n["inputs"]]
        iw = [width_of(x) for x in n["inputs"]]
        in_width = sum(iw)
        k = len(ins)
        if "combine" in n:
            c = n["combine"]
            if c not in _COMBINES or "layers" in n:
                raise ModelError(f"{where}: bad combine node")
            if k < (1 if c == "scale" else 2):
                raise ModelError(f"{where}: a {c} node needs at least {1 if c == 'scale' else 2} "
                                 f"inputs, has {k}")
            req, opt = _COMBINE_KEYS[c]
            for key in ("weight", "bias", "gate_inputs"):
                if key in n and key not in req + opt:
                    if key == "gate_inputs":
                        raise ModelError(f"{where}: gate_inputs are only for gate and scale "
                                         f"nodes, not {c}")
                    raise ModelError(f"{where}: a {c} node has no {key}")
                if key in req and key not in n:
                    raise ModelError(f"{where}: a {c} node needs {key}")
            if c in ("sum", "weighted_sum", "attention", "gate") and len(set(iw)) != 1:
                raise ModelError(f"{where}: the inputs of this combine must have one width")
            node = {"inputs": ins, "combine": c}
            if c in ("weighted_sum", "weighted_concat"):
                node["weight"] = tensor(n["weight"], (k,), where)
            if c == "attention":
                node["weight"] = tensor(n["weight"], (k, in_width), where)
                node["bias"] = tensor(n["bias"], (k,), where) if "bias" in n else None
            if c in _GATED:
                gin = n["gate_inputs"]
                if not 1 <= len(gin) <= MAX_GATE_INPUTS:
                    raise ModelError(f"{where}: gate_inputs must list 1 to {MAX_GATE_INPUTS} names")
                if len(set(gin)) != len(gin):
                    raise ModelError(f"{where}: gate_inputs has a duplicate name")
                g = sum(width_of(x) for x in gin)
                rows = k if c == "gate" else in_width
                node["gate"] = [ref(x) for x in gin]
                node["weight"] = tensor(n["weight"], (rows, g), where)
                node["bias"] = tensor(n["bias"], (rows,), where) if "bias" in n else None
            width = iw[0] if c in ("sum", "weighted_sum", "attention", "gate") else in_width
        else:
            for key in ("weight", "bias", "gate_inputs"):
                if key in n:
                    raise ModelError(f"{where}: a stack node has no {key}"
                                     + (" (gate_inputs are only for gate and scale nodes)"
                                        if key == "gate_inputs" else ""))
            layers, width = _parse_layers(m, n.get("layers", []), in_width, tensor, f"{where}.layers", False)
            node = {"inputs": ins, "layers": layers}
        widths[n["name"]] = width
        nodes[n["name"]] = node
    m.graph = [(graph[i]["name"], nodes[graph[i]["name"]]) for i in order]
    return widths[graph[out]["name"]]


# ----------------------------------------------------------------------------------------------
# input parsing (shared by both forward paths)


def _number(v, where) -> float:
    if not _is_number(v):
        raise InputError(f"{where}: expected a number, got {_jtype(v)}")
    x = float(v)
    if not math.isfinite(x):
        raise InputError(f"{where}: not a finite number")
    return x


def _id_row(f: Feature, v, where) -> int:
    if v is None:
        # a JSON null inside a list: the spec only defines null for the whole value; we treat
        # it like an unknown id (row 0). The golden fixtures never contain this case.
        return 0
    try:
        return f.row_of(canonical_id(v))
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def _parse(f: Feature, features: dict):
    """Validate and normalise one feature's input.

    categorical -> row; multi_categorical -> (rows, weights); numeric, bucketize -> float or None;
    dense -> list of floats or None.
    """
    v = features.get(f.name)
    where = f"feature {f.name!r}"
    t = f.type
    if t == "categorical":
        if v is None:
            return 0
        return _id_row(f, v, where)
    if t == "multi_categorical":
        if v is None:
            return [0], [1.0]
        if f.weighted:
            if not isinstance(v, dict) or "ids" not in v or "weights" not in v:
                raise InputError(f'{where}: expected {{"ids": [...], "weights": [...]}}')
            ids, ws = v["ids"], v["weights"]
            if not isinstance(ids, list) or not isinstance(ws, list):
                raise InputError(f"{where}: ids and weights must be lists")
            if len(ids) != len(ws):
                raise InputError(f"{where}: ids and weights have different lengths")
        else:
            if not isinstance(v, list):
                raise InputError(f"{where}: expected a list of ids, got {_jtype(v)}")
            ids, ws = v, None
        if len(ids) > MAX_LIST:
            raise InputError(f"{where}: list longer than {MAX_LIST}")
        # validate everything given (also past max_len), then truncate
        rows = [_id_row(f, x, f"{where}[{i}]") for i, x in enumerate(ids)]
        if ws is None:
            weights = [1.0] * len(rows)
        else:
            weights = [_number(w, f"{where}.weights[{i}]") for i, w in enumerate(ws)]
        if not rows:
            return [0], [1.0]  # empty list: the OOV row, unweighted
        if f.max_len is not None:
            rows, weights = rows[:f.max_len], weights[:f.max_len]
        return rows, weights
    if t in ("numeric", "bucketize"):
        if v is None:
            return None
        return _number(v, where)
    if t == "dense":
        if v is None:
            return None
        if not isinstance(v, list) or len(v) != f.dim:
            raise InputError(f"{where}: expected a list of {f.dim} numbers")
        return [_number(x, f"{where}[{i}]") for i, x in enumerate(v)]
    raise AssertionError(t)


def _parse_all(model: Model, features) -> list:
    if not isinstance(features, dict):
        raise InputError(f"features must be a JSON object, got {_jtype(features)}")
    return [_parse(f, features) for f in model.features]


# ----------------------------------------------------------------------------------------------
# forward pass, one input, element by element (the literal reading of the spec)

def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _gelu(x: float) -> float:
    return x * (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0


def _field(f: Feature, p) -> list:
    t = f.type
    if t == "categorical":
        return list(f.table_rows[p])
    if t == "multi_categorical":
        rows, ws = p
        es = [f.table_rows[r] for r in rows]
        out = []
        for k in range(f.width):
            terms = [w * e[k] for w, e in zip(ws, es)]
            if f.pooling == "sum":
                out.append(math.fsum(terms))
            elif f.pooling == "mean":
                wsum = math.fsum(ws)
                out.append(0.0 if wsum == 0 else math.fsum(terms) / wsum)
            else:
                out.append(max(terms))
        return out
    if t == "numeric":
        x = p
        if x is None:
            if f.default is None:
                return [0.0]
            x = f.default
        if f.transform == "none":
            y = x
        elif f.transform == "zscore":
            y = (x - f.mean) / f.std
        elif f.transform == "log1p":
            y = math.log1p(max(x, 0.0))
        else:
            y = min(max((x - f.min) / (f.max - f.min), 0.0), 1.0)
        return [y]
    if t == "bucketize":
        row = 0 if p is None else 1 + sum(1 for b in f.boundaries.tolist() if b <= p)
        return list(f.table_rows[row])
    if t == "dense":
        return [0.0] * f.dim if p is None else list(p)
    raise AssertionError(t)


def fields(model: Model, features) -> list:
    """The raw fields (before SENet) of one input, as float64 arrays."""
    return [np.array(_field(f, p)) for f, p in zip(model.features, _parse_all(model, features))]


def check_keys(model: Model, features) -> None:
    """embed_user is strict: a key that is not a feature of the model is an error. (Item rows,
    read as to_jsonb(row), carry other columns, which embed_item and the refresh ignore.)"""
    if isinstance(features, dict):
        unknown = sorted(set(features) - {f.name for f in model.features})
        if unknown:
            raise InputError(f"input key {unknown[0]!r} is not a feature of this model")


def embed(model: Model, features, strict=None) -> np.ndarray:
    """Forward pass for one features object (dict). Plain float64 math, exactly-rounded sums.
    `strict` (default: for user towers) rejects keys that are not features."""
    if model.kind == "prerank":
        raise ValueError("embed: a prerank model scores pairs: use prerank_forward")
    if strict if strict is not None else model.kind == "user":
        check_keys(model, features)
    parsed = _parse_all(model, features)
    raw = [_field(f, p) for f, p in zip(model.features, parsed)]
    return np.array(_forward_fields(model, raw), dtype=np.float64)


def _forward_fields(model: Model, raw) -> list:
    """SENet, then the layer stack or the graph, over the raw fields of one input."""
    flds = raw
    if model.senet is not None:
        w1, b1, w2, b2 = (t.tolist() for t in model.senet)
        z = [math.fsum(fl) / len(fl) for fl in raw]
        s = [max(math.fsum(wj[i] * z[i] for i in range(len(z))) + b1[j], 0.0)
             for j, wj in enumerate(w1)]
        a = [_sigmoid(math.fsum(wi[j] * s[j] for j in range(len(s))) + b2[i])
             for i, wi in enumerate(w2)]
        flds = [[a[i] * x for x in fl] for i, fl in enumerate(raw)]
    h = [x for fl in flds for x in fl]
    if model.graph is not None:
        h = _run_graph(model, h)
    else:
        h = _apply_layers(model.layers, h, raw)
    return h


def _apply_layers(layers, h, raw):
    """A layer stack over one row h (float64 lists, exactly rounded sums)."""
    for t, p in layers:
        n = len(h)
        if t == "linear":
            b = p["b_list"]
            h = [math.fsum(wr[i] * h[i] for i in range(n)) + (0.0 if b is None else b[o])
                 for o, wr in enumerate(p["w_rows"])]
        elif t == "relu":
            h = [x if x > 0 else 0.0 for x in h]
        elif t == "gelu":
            h = [_gelu(x) for x in h]
        elif t == "tanh":
            h = [math.tanh(x) for x in h]
        elif t == "sigmoid":
            h = [_sigmoid(x) for x in h]
        elif t == "layernorm":
            mu = math.fsum(h) / n
            var = math.fsum((x - mu) ** 2 for x in h) / n
            d = math.sqrt(var + p["eps"])
            w, b = p["weight"].tolist(), p["bias"].tolist()
            h = [(x - mu) / d * w[i] + b[i] for i, x in enumerate(h)]
        elif t == "batchnorm":
            w, b = p["weight"].tolist(), p["bias"].tolist()
            rm, rv = p["running_mean"].tolist(), p["running_var"].tolist()
            h = [(x - rm[i]) / math.sqrt(rv[i] + p["eps"]) * w[i] + b[i]
                 for i, x in enumerate(h)]
        elif t == "dropout":
            pass
        elif t == "shortcut":
            h = h + [x for i in p["fields"] for x in raw[i]]
        elif t == "l2_normalize":
            norm = math.sqrt(math.fsum(x * x for x in h))
            if norm > 0:
                h = [x / norm for x in h]
        else:
            raise AssertionError(t)
    return h


def _run_graph(model, h):
    """The graph over one row h (the SENet-weighted fields side by side)."""
    outs = {}

    def value(kind, v):
        return h[v[0]:v[0] + v[1]] if kind == "field" else outs[v]

    for name, node in model.graph:
        parts = [value(kind, v) for kind, v in node["inputs"]]
        x = [v for part in parts for v in part]
        if "layers" in node:
            y = _apply_layers(node["layers"], x, None)
        else:
            c, k = node["combine"], len(parts)
            if c == "concat":
                y = x
            elif c == "weighted_concat":
                w = node["weight"].tolist()
                y = [w[i] * v for i, part in enumerate(parts) for v in part]
            elif c == "scale":
                # scene gate: x * 2 sigmoid(W g + b), g the gate inputs side by side
                g = [v for kind, r in node["gate"] for v in value(kind, r)]
                W = node["weight"].tolist()
                b = node["bias"].tolist() if node["bias"] is not None else [0.0] * len(x)
                y = [x[o] * (2.0 * _sigmoid(math.fsum(W[o][j] * g[j] for j in range(len(g)))
                                            + b[o])) for o in range(len(x))]
            else:
                if c == "sum":
                    a = [1.0] * k
                elif c == "weighted_sum":
                    a = node["weight"].tolist()
                else:
                    # attention: scores from the inputs themselves; gate: from the gate inputs
                    src = x if c == "attention" else [v for kind, r in node["gate"]
                                                      for v in value(kind, r)]
                    W = node["weight"].tolist()
                    b = node["bias"].tolist() if node["bias"] is not None else [0.0] * k
                    sc = [math.fsum(W[i][j] * src[j] for j in range(len(src))) + b[i]
                          for i in range(k)]
                    mx = max(sc)
                    e = [math.exp(v - mx) for v in sc]
                    z = math.fsum(e)
                    a = [v / z for v in e]
                d = len(parts[0])
                y = [math.fsum(a[i] * parts[i][j] for i in range(k)) for j in range(d)]
        outs[name] = y
    return outs[model.graph[-1][0]]


# ----------------------------------------------------------------------------------------------
# pre-rank models: one (request, candidate) pair at a time

def _cos(a, b) -> float:
    na = math.sqrt(math.fsum(x * x for x in a))
    nb = math.sqrt(math.fsum(x * x for x in b))
    if na == 0 or nb == 0:
        return 0.0
    return math.fsum(x * y for x, y in zip(a, b)) / (na * nb)


def _vector(x, n, what) -> list:
    if x is None or not isinstance(x, (list, tuple, np.ndarray)) or len(x) != n:
        raise InputError(f"{what}: expected a vector of {n} numbers")
    return [_number(float(v) if isinstance(v, np.floating) else v, what) for v in x]


def _cross_field(f: Feature, u, v, history, scalars) -> list:
    """The value of one cross input (docs/model-format.md, Pre-rank models)."""
    c, d = f.cross, f.dim
    if c == "user_vector":
        return _vector(u, d, "u")
    if c == "item_vector":
        return _vector(v, d, "v")
    if c == "product":
        return [a * b for a, b in zip(_vector(u, d, "u"), _vector(v, d, "v"))]
    if c == "target_attention":
        vv = _vector(v, d, "v")
        hs = [_vector(x, d, "history item") for x in history][:256]
        if not hs:
            return [0.0] * d
        wq, wk = (t.tolist() for t in f.attention)
        r = len(wq)
        q = [math.fsum(wq[a][j] * vv[j] for j in range(d)) for a in range(r)]
        sc = []
        for hh in hs:
            key = [math.fsum(wk[a][j] * hh[j] for j in range(d)) for a in range(r)]
            sc.append(math.fsum(q[a] * key[a] for a in range(r)) / math.sqrt(r))
        mx = max(sc)
        e = [math.exp(s - mx) for s in sc]
        z = math.fsum(e)
        return [math.fsum(e[i] / z * hs[i][j] for i in range(len(hs))) for j in range(d)]
    if c in ("history_max", "history_mean"):
        if scalars and c in scalars:
            return [_number(scalars[c], c)]
        vv = _vector(v, len(v) if v is not None else 0, "v")
        cs = [_cos(vv, _vector(x, len(vv), "history item")) for x in history]
        if not cs:
            return [0.0]
        return [max(cs)] if c == "history_max" else [math.fsum(cs) / len(cs)]
    # score (by the towers' metric) and recall_rank (ln of the position): given by the caller
    if not scalars or c not in scalars:
        raise InputError(f"cross input {c!r}: give its value in scalars")
    return [_number(scalars[c], c)]


def prerank_fields(model: Model, user, item, u=None, v=None, history=(), scalars=None,
                   strict=True) -> list:
    """The raw fields (before SENet) of one (request, candidate) pair of a pre-rank model.

    user: the request's features object (the features with source "user"); item: the candidate's
    row (source "item"); u, v: the user and item vectors; history: the history's item vectors
    (most recent first); scalars: {cross name: field value} for the one-number cross inputs the
    caller knows (score, recall_rank; history_max/history_mean are computed from v and history
    unless given). strict: a key of `user` that is not a user-source feature is an error (item
    rows carry other columns and are read leniently)."""
    if model.kind != "prerank":
        raise ValueError("prerank_fields: not a prerank model")
    for what, obj in (("user", user), ("item", item)):
        if not isinstance(obj, dict):
            raise InputError(f"{what} features must be a JSON object, got {_jtype(obj)}")
    if strict:
        unknown = sorted(set(user) - {f.name for f in model.features if f.source == "user"})
        if unknown:
            raise InputError(f"input key {unknown[0]!r} is not a user feature of this model")
    out = []
    for f in model.features:
        if f.source == "cross":
            out.append(_cross_field(f, u, v, list(history), scalars))
        else:
            out.append(_field(f, _parse(f, user if f.source == "user" else item)))
    return out


def prerank_forward(model: Model, user, item, u=None, v=None, history=(), scalars=None,
                    strict=True) -> np.ndarray:
    """A pre-rank model's output row (its logits, [dim]) for one (request, candidate) pair;
    arguments as for prerank_fields. Plain float64 math, exactly-rounded sums."""
    raw = prerank_fields(model, user, item, u, v, history, scalars, strict)
    return np.array(_forward_fields(model, raw), dtype=np.float64)


def task_scores(model: Model, row):
    """The task scores of a pre-rank output row and the fused score.

    With output tasks: ({name: link(logit_t)}, sum_t fuse_t * link(logit_t)), link sigmoid or
    identity. Without tasks the model's one output is its score: ({}, row[0])."""
    row = [float(x) for x in row]
    if model.tasks is None:
        if len(row) != 1:
            raise ValueError("task_scores: a model without tasks has one output")
        return {}, row[0]
    if len(row) != len(model.tasks):
        raise ValueError(f"task_scores: expected {len(model.tasks)} logits, got {len(row)}")
    scores = {}
    for t, x in zip(model.tasks, row):
        scores[t["name"]] = _sigmoid(x) if t["link"] == "sigmoid" else x
    fused = math.fsum(t["fuse"] * scores[t["name"]] for t in model.tasks)
    return scores, fused


# ----------------------------------------------------------------------------------------------
# forward pass, vectorised over a batch

_erf = np.frompyfunc(math.erf, 1, 1)


def _np_sigmoid(x):
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def embed_batch(model: Model, rows, dtype=np.float64, strict=None) -> np.ndarray:
    """Forward pass for a list of features objects; returns [len(rows), dim].

    Parsing is per input (Python); all arithmetic is matrix ops over the batch. dtype=np.float32
    runs the arithmetic in f32 (weights rounded to f32 first), like an f32 engine would.
    """
    if model.kind == "prerank":
        raise ValueError("embed_batch: a prerank model scores pairs: use prerank_forward")
    rows = list(rows)
    bsz = len(rows)
    if bsz == 0:
        return np.zeros((0, model.dim), dtype=dtype)
    if model.graph is not None:
        # Graphs: the row-at-a-time float64 path (the reference's one implementation of them).
        return np.array([embed(model, r, strict) for r in rows], dtype=np.float64).astype(dtype)
    if strict if strict is not None else model.kind == "user":
        for r in rows:
            check_keys(model, r)
    parsed = [_parse_all(model, r) for r in rows]
    dt = np.dtype(dtype)
    raw = []
    for j, f in enumerate(model.features):
        col = [p[j] for p in parsed]
        t = f.type
        if t == "categorical":
            idx = np.fromiter(col, dtype=np.intp, count=bsz)
            fld = model.cast(f.table, dt)[idx]
        elif t == "multi_categorical":
            width = max(len(r) for r, _ in col)
            idx = np.zeros((bsz, width), dtype=np.intp)
            w = np.zeros((bsz, width), dtype=dt)
            mask = np.zeros((bsz, width), dtype=bool)
            for b, (r, ws) in enumerate(col):
                idx[b, :len(r)] = r
                w[b, :len(r)] = ws
                mask[b, :len(r)] = True
            e = model.cast(f.table, dt)[idx]                        # [B, L, d]
            if f.pooling == "max":
                we = w[:, :, None] * e
                we[~mask] = -np.inf
                fld = we.max(axis=1)
            else:
                fld = np.einsum("bl,bld->bd", w, e)
                if f.pooling == "mean":
                    wsum = w.sum(axis=1)[:, None]
                    fld = np.divide(fld, wsum, out=np.zeros_like(fld), where=wsum != 0)
        elif t == "numeric":
            missing = np.array([x is None for x in col])
            x = np.array([f.default if x is None and f.default is not None else
                          (0.0 if x is None else x) for x in col], dtype=dt)
            if f.transform == "zscore":
                x = (x - dt.type(f.mean)) / dt.type(f.std)
            elif f.transform == "log1p":
                x = np.log1p(np.maximum(x, 0))
            elif f.transform == "minmax":
                x = np.clip((x - dt.type(f.min)) / (dt.type(f.max) - dt.type(f.min)), 0, 1)
            if f.default is None:
                x[missing] = 0
            fld = x[:, None]
        elif t == "bucketize":
            missing = np.array([x is None for x in col])
            x = np.array([0.0 if x is None else x for x in col], dtype=dt)
            idx = 1 + np.searchsorted(model.cast(f.boundaries, dt), x, side="right")
            idx[missing] = 0
            fld = model.cast(f.table, dt)[idx]
        else:  # dense
            fld = np.array([[0.0] * f.dim if x is None else x for x in col], dtype=dt)
        raw.append(fld.astype(dt, copy=False))

    h = np.concatenate(raw, axis=1)                                    # [B, W]
    if model.senet is not None:
        w1, b1, w2, b2 = (model.cast(t, dt) for t in model.senet)
        z = h @ model.cast(model.field_mean, dt)                       # [B, F] field means
        s = np.maximum(z @ w1.T + b1, 0)
        a = _np_sigmoid(s @ w2.T + b2)                                 # [B, F]
        h = h * a[:, model.column_field]                               # a_i on field i's columns
    for t, p in model.layers:
        if t == "linear":
            h = h @ model.cast(p["weight"], dt).T
            if p["bias"] is not None:
                h = h + model.cast(p["bias"], dt)
        elif t == "relu":
            h = np.maximum(h, 0)
        elif t == "gelu":
            h = h * (1 + _erf(h / np.sqrt(dt.type(2))).astype(dt)) / 2
        elif t == "tanh":
            h = np.tanh(h)
        elif t == "sigmoid":
            h = _np_sigmoid(h)
        elif t == "layernorm":
            mu = h.mean(axis=1, keepdims=True)
            var = ((h - mu) ** 2).mean(axis=1, keepdims=True)
            h = (h - mu) / np.sqrt(var + dt.type(p["eps"])) * model.cast(p["weight"], dt) \
                + model.cast(p["bias"], dt)
        elif t == "batchnorm":
            h = (h - model.cast(p["running_mean"], dt)) \
                / np.sqrt(model.cast(p["running_var"], dt) + dt.type(p["eps"])) \
                * model.cast(p["weight"], dt) + model.cast(p["bias"], dt)
        elif t == "dropout":
            pass
        elif t == "shortcut":
            h = np.concatenate([h] + [raw[i] for i in p["fields"]], axis=1)
        elif t == "l2_normalize":
            norm = np.sqrt((h * h).sum(axis=1, keepdims=True))
            h = np.divide(h, norm, out=h.copy(), where=norm > 0)
        else:
            raise AssertionError(t)
    return h.astype(dt, copy=False)


# ----------------------------------------------------------------------------------------------

def _main(argv):
    if len(argv) not in (4, 5):
        print("usage: tower_ref.py SPEC.json WEIGHTS.safetensors INPUTS.json [EXPECTED.json]",
              file=sys.stderr)
        return 2
    model = load_model(argv[1], argv[2])
    with open(argv[3], encoding="utf-8") as f:
        inputs = json.load(f)
    out = [embed(model, x).tolist() for x in inputs]
    if len(argv) == 4:
        print(json.dumps(out))
        return 0
    with open(argv[4], encoding="utf-8") as f:
        expected = json.load(f)
    worst = max(float(np.max(np.abs(np.array(a) - np.array(b)))) for a, b in zip(out, expected))
    ok = len(out) == len(expected) and worst <= 1e-12
    print(f"{model}: {len(out)} inputs, max |diff| = {worst:.3g} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
