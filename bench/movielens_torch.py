#!/usr/bin/env python3
"""The PyTorch reference of the MovieLens job (bench/movielens.sh runs it; needs torch).

The same split, features, architecture, loss and schedule as the in-database run of
scripts/movielens.sh, trained in PyTorch with the modules of docs/pytorch-export.md, exported
with that page's export() and written to OUT/{user,item}_{spec.json,weights.safetensors} for
twotower.import_model_file, so both models are evaluated through the same serving path.

    movielens_torch.py OUT CONFIG.json < rows.jsonl

rows.jsonl holds {"t": "train"|"user"|"item", ...} lines (ml_train in file order, ml_users,
ml_items). Prints one JSON line: examples/s, the best epoch and its validation HR@k.
"""

import json
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(HERE, "..", "docs", "pytorch-export.md")
sys.dont_write_bytecode = True


def load_doc_modules():
    with open(DOC, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    ns = {}
    exec("\n".join(b for b in blocks if not b.startswith("# example")), ns)
    return ns


def main():
    out, cfg_path = sys.argv[1], sys.argv[2]
    cfg = json.load(open(cfg_path))
    torch.manual_seed(cfg.get("seed", 42))
    torch.set_num_threads(cfg.get("threads", 2))
    doc = load_doc_modules()
    Tower, L2Normalize, export = doc["Tower"], doc["L2Normalize"], doc["export"]

    train, users, items = [], {}, {}
    for line in sys.stdin:
        r = json.loads(line)
        t = r.pop("t")
        if t == "train":
            train.append(r)
        elif t == "user":
            users[str(r["user_id"])] = r
        else:
            items[str(r["item_id"])] = r
    # Timelines: by time, ties in file order (the input order); the last validates.
    by_user = {}
    for k, r in enumerate(train):
        by_user.setdefault(str(r["user_id"]), []).append(k)
    for u in by_user:
        by_user[u].sort(key=lambda k: train[k]["ts"])
    examples, valid = [], []
    for u, ks in by_user.items():
        for p, k in enumerate(ks):
            (valid if p == len(ks) - 1 and len(ks) >= 2 else examples).append((u, p))
    max_len, decay = cfg["history_max_len"], cfg["history_decay"]

    def user_input(u, p):
        row = dict(users.get(u, {}))
        row.setdefault("user_id", u)
        ks = by_user[u][:p]
        recent = [str(train[k]["item_id"]) for k in reversed(ks)][:max_len]
        w = [decay ** i for i in range(len(recent))]
        row["history"] = {"ids": recent, "weights": w}
        return row

    def item_input(i):
        row = dict(items.get(i, {}))
        row.setdefault("item_id", i)
        return row

    # Vocabularies and statistics from the training examples only (as twotower.train).
    def vocab(values):
        counts = {}
        for v in values:
            for x in (v if isinstance(v, list) else [v]):
                if x is not None:
                    key = doc["canonical_id"](x)
                    counts[key] = counts.get(key, 0) + 1
        return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]

    ex_users = [user_input(u, p) for u, p in examples]
    ex_items = [str(train[by_user[u][p]]["item_id"]) for u, p in examples]
    item_vocab = vocab(ex_items)

    def zstats(vals):
        vals = [float(v) for v in vals if isinstance(v, (int, float))]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / len(vals)
        return mean, (math.sqrt(var) if var > 1e-24 else 1.0)

    dim, hidden = cfg["dim"], cfg["hidden"]
    am, asd = zstats([r.get("age") for r in ex_users])
    user_features = [
        {"name": "user_id", "type": "categorical", "table": "user_id", "emb_dim": dim,
         "vocabulary": vocab([r["user_id"] for r in ex_users])},
        {"name": "gender", "type": "categorical", "table": "gender", "emb_dim": 4,
         "vocabulary": vocab([r.get("gender") for r in ex_users])},
        {"name": "occupation", "type": "categorical", "table": "occupation", "emb_dim": 8,
         "vocabulary": vocab([r.get("occupation") for r in ex_users])},
        {"name": "age", "type": "numeric", "transform": "zscore", "mean": am, "std": asd},
        {"name": "history", "type": "multi_categorical", "table": "history", "emb_dim": dim,
         "vocabulary": item_vocab, "pooling": "mean", "max_len": max_len, "weighted": True},
    ]
    ex_item_rows = [item_input(i) for i in ex_items]
    ym, ysd = zstats([r.get("year") for r in ex_item_rows])
    item_features = [
        {"name": "item_id", "type": "categorical", "table": "item_id", "emb_dim": dim,
         "vocabulary": item_vocab},
        {"name": "genres", "type": "multi_categorical", "table": "genres", "emb_dim": 16,
         "vocabulary": vocab([r.get("genres") or [] for r in ex_item_rows]), "pooling": "mean",
         "max_len": 100},
        {"name": "year", "type": "numeric", "transform": "zscore", "mean": ym, "std": ysd},
    ]

    def mlp(width):
        return [nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, dim), L2Normalize()]

    ut = Tower("user", user_features, make_layers=mlp)
    it = Tower("item", item_features, make_layers=mlp)
    for t in (ut, it):
        for e in t.tables.values():
            nn.init.normal_(e.weight, std=cfg["init_std"])
            e.sparse = True
    dense = [p for t in (ut, it) for n, p in t.named_parameters() if not n.startswith("tables.")]
    sparse = [p for t in (ut, it) for n, p in t.named_parameters() if n.startswith("tables.")]
    opt_d = torch.optim.Adam(dense, lr=cfg["lr"])
    opt_s = torch.optim.SparseAdam(sparse, lr=cfg["sparse_lr"])

    # Encoded once (featurize by the format's rules).
    all_items = sorted(items) if items else sorted(set(ex_items))
    item_batch_all = it.featurize([item_input(i) for i in all_items])
    item_pos = {i: n for n, i in enumerate(all_items)}
    freq = {}
    for i in ex_items:
        freq[i] = freq.get(i, 0) + 1
    total = len(ex_items)
    B, tau = cfg["batch_size"], cfg["temperature"]
    logq_all = torch.tensor([math.log(B * freq.get(i, 0) / total) if freq.get(i) else 0.0
                             for i in all_items])
    seen = {}
    for u, p in examples:
        seen.setdefault(u, set()).add(item_pos[str(train[by_user[u][p]]["item_id"])])
    v_inputs = ut.featurize([user_input(u, p) for u, p in valid])
    v_targets = [item_pos[str(train[by_user[u][p]]["item_id"])] for u, p in valid]
    v_seen = [sorted(seen.get(u, ())) for u, _ in valid]

    def take(batch, idx):
        out = {}
        for k, v in batch.items():
            out[k] = tuple(x[idx] for x in v) if isinstance(v, tuple) else v[idx]
        return out

    def validate():
        ut.eval(); it.eval()
        with torch.no_grad():
            iv = it(item_batch_all)
            uv = ut(v_inputs)
            s = uv @ iv.T
            for r, m in enumerate(v_seen):
                if m:
                    s[r, m] = -float("inf")
            tgt = s[torch.arange(len(v_targets)), v_targets]
            ahead = (s > tgt[:, None]).sum(dim=1)
            rank = ahead + 1
            k = cfg["k"]
            hr = (rank <= k).float().mean().item()
        ut.train(); it.train()
        return hr

    u_all = ut.featurize(ex_users)
    i_idx = torch.tensor([item_pos[i] for i in ex_items])
    best, best_epoch, since, report = -1.0, 0, 0, []
    gen = torch.Generator().manual_seed(cfg.get("seed", 42))
    best_state = None
    for epoch in range(1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        order = torch.randperm(len(examples), generator=gen)
        losses = []
        for s0 in range(0, len(order), B):
            idx = order[s0:s0 + B]
            if len(idx) < 2:
                continue
            ub = take(u_all, idx)
            pos = i_idx[idx]
            ib = take(item_batch_all, pos)
            u = ut(ub)
            v = it(ib)
            logits = (u @ v.T) / tau - logq_all[pos][None, :]
            same = pos[:, None] == pos[None, :]
            eye = torch.eye(len(idx), dtype=torch.bool)
            logits = logits.masked_fill(same & ~eye, float("-inf"))
            loss = F.cross_entropy(logits, torch.arange(len(idx)))
            opt_d.zero_grad(); opt_s.zero_grad()
            loss.backward()
            opt_d.step(); opt_s.step()
            losses.append(loss.item() * len(idx))
        secs = time.perf_counter() - t0
        hr = validate()
        report.append({"epoch": epoch, "loss": sum(losses) / len(examples),
                       "examples_per_s": len(examples) / secs, "valid_hr": hr})
        print(json.dumps(report[-1]), file=sys.stderr)
        if hr > best:
            best, best_epoch, since = hr, epoch, 0
            best_state = ({k: v.clone() for k, v in ut.state_dict().items()},
                          {k: v.clone() for k, v in it.state_dict().items()})
        else:
            since += 1
            if since >= cfg["patience"]:
                break
    ut.load_state_dict(best_state[0]); it.load_state_dict(best_state[1])
    ut.eval(); it.eval()
    os.makedirs(out, exist_ok=True)
    export(ut, os.path.join(out, "user_"))
    export(it, os.path.join(out, "item_"))
    eps = sorted(r["examples_per_s"] for r in report)
    print(json.dumps({"best_epoch": best_epoch, "valid_hr": best,
                      "examples_per_s_median": eps[len(eps) // 2], "epochs": len(report),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
