#!/usr/bin/env python3
"""Golden fixture for the training engine's two extra objectives, the negative-feedback term and
the popularity-debiasing (BPR) pairs, computed in numpy independently of crates/train.

    python3 tests/golden/train_objectives_ref.py   (needs numpy; run train_ref.py first)

Writes tests/golden/train/steps_objectives.json only. The towers and initial weights are those
of train_ref.py (train/user_spec.json, item_spec.json, init.safetensors): this script rebuilds
them the way train_ref.py does and checks them byte for byte against the stored files, so the
Rust test reuses its setup.

Method (as train_ref.py): tower_ref's forward pass in float64, gradients by central finite
differences of the whole loss (no hand-written backward pass), Adam (lr 0.01) on the dense
tensors, lazy Adam (lr 0.05) on the table rows the batch reads (OOV row 0 included): the users'
rows of every user input (positive rows and negative-feedback rows), the items' rows of every
column (positives, the global negative, the debiasing pair items, the disliked items).

The loss, from docs/training.md ("Negative feedback", "Popularity debiasing", the options
table), on a batch of b positive rows (user_i, item_i, weight w_i), one shared global negative
n (options.negatives = 1), debiasing pairs (row i -> a head item p_i, for some rows) and F
negative-feedback examples (user_r, disliked item d_r, weight f_r):

    wbar_i = w_i / sum_k w_k            (over the b positive rows)
    fbar_r = f_r / sum_k f_k            (over the F negative-feedback rows only)
    s(x, y) = cos(user vector x, item vector y)

    L = sum_i wbar_i * CE_i                                               (in-batch softmax)
      + debias.weight * sum_{i with a pair} wbar_i
                        * ln(1 + exp(-(s(u_i, v_i) - s(u_i, v_{p_i})) / debias.temperature))
      + nf.weight * sum_r fbar_r * ln(1 + exp((s(u_r, v_{d_r}) - nf.margin) / nf.temperature))

    CE_i = logsumexp_{j in C_i} l_ij - l_ii,  l_ij = s(u_i, v_j) / temperature - logq_j,
    C_i = {i} + {the other positive columns j with item_j != item_i} + {n if item_n != item_i}.

Readings of points where the docs alone leave a choice. Each is what crates/train's code does
when this fixture was written (quoted from crates/train/src/loss.rs and train.rs); the fixture
follows the docs as read here, not the code, so a change in the code shows up as a failure:

1. The debias pair items and the disliked items are in no softmax: not in another row's
   candidates (docs: "negative rows are never another row's candidate"; "The drawn items are
   scored by their row only (no other row's candidate), without logQ") and not in their own
   row's either: a pair item enters its row's loss through the BPR term only, a disliked item
   its feedback row's loss through the sigmoid term only. ("Without logQ" is read as: the BPR
   term compares raw cosines.) Code: the softmax keeps column j for row i only if
   `(x.owner[j] < 0 || x.owner[j] == i as i32)`, and train_from gives pair columns
   `owner.push(i32::MAX)` ("Scored by its row through `pairs` only: no row's candidate") and
   disliked columns `owner.push((b + r) as i32)`. The batches give those columns deliberately
   non-zero logq values (-2.5, -3.0), which must not enter any term.
2. The negative-feedback rows are in no softmax (they have no positive) and score only their
   own disliked item: `if i >= b { let j = c - x.feedback + (i - b); ... continue; }`.
3. w̄ in the BPR term is the positive rows' normalised weight, the one of the softmax (over all
   b positive rows, rows without a pair included), not renormalised over the paired rows:
   `let wi = x.weights[i] as f64 / wsum;` ... `let w = d.weight as f64 * wi;`.
4. w̄ in the negative-feedback term is normalised over the feedback rows only, times nf.weight,
   and the parts are added (no renormalisation over b + F rows):
   `let fsum = sum(&x.weights[b..b + x.feedback]);`
   `let w = x.nf.weight as f64 * x.weights[i] as f64 / fsum;`.
5. Each term has its own temperature, never the softmax's; the margin is subtracted from the
   cosine before dividing: `let z = (srow[j] as f64 - x.nf.margin as f64) / t;` with
   `t = x.nf.temperature`; `let z = (sp - srow[j] as f64) / t;` with `t = d.temperature`.
6. The masking rule (a column holding the row's positive item is not its negative) applies to
   the in-batch positives and the global negative (batch 2: item 14 is both row 2's positive
   and the global negative; item 12 is two rows' positive).
7. The parameters: the rows "the batch reads" include those read only by a feedback row or a
   pair column. (Batch 3's unknown item 15, row 0, gets a zero gradient: every ReLU unit of the
   item tower is off for it; it was never read before, so its lazy-Adam update is 0 whether or
   not a zero-gradient row counts as touched.)

Batch layout (what crates/train's `Batch` expects; train.rs `train_from` builds the same):
    users   = the b positive users, then the F feedback users
    items   = columns: the b positives (column i is row i's), the global negative, the pair
              items (in row order), then the F disliked items (column c - F + r is row b + r's)
    logq    = per column
    weights = per row: the b positives' weights, then the F feedback weights
    owner   = per column: -1 (positives, global negative), 2147483647 = i32::MAX (pair columns:
              "no row's candidate", as train_from pushes), b + r (disliked item of row b + r)
    feedback = F, paired = number of pair columns,
    pairs   = per positive row, its pair's column index or -1
The numpy loss below does not read this layout: it works on the batch's semantic description
(BATCHES), and the layout is checked against it.
"""

import json
import os
import sys

import numpy as np

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tower_ref  # noqa: E402
import train_ref  # noqa: E402  (towers, shapes, safetensors writer; its main() is not run)

OUT = os.path.join(HERE, "train")
LR, SPARSE_LR, T = train_ref.LR, train_ref.SPARSE_LR, train_ref.T
B1, B2, EPS = train_ref.B1, train_ref.B2, train_ref.EPS
NF = {"weight": 0.7, "margin": 0.1, "temperature": 0.5}
DEBIAS = {"weight": 0.5, "head": 0.2, "temperature": 0.3}
I32_MAX = 2**31 - 1
PAIR_LOGQ, FEEDBACK_LOGQ = -2.5, -3.0


def u(uid, age, ids, weights):
    return {"user_id": uid, "age": age, "history": {"ids": ids, "weights": weights}}


# Per batch: positives (user, item, weight), the global negative (item, logq), the positives'
# logq, pairs {row: head item}, feedback (user, disliked item, weight). Head items are 12, 13
# (the pairs are given, not drawn: `head` is in the options only because Config needs it).
BATCHES = [
    {   # rows 0, 1 have head positives (no pair); rows 2, 3 tail positives with pairs.
        "pos": [(u(1, 25, [10, 11], [1.0, 0.5]), 12, 1.0),
                (u(2, 41, [12], [1.0]), 13, 1.0),
                (u(3, 33, [13, 14, 10], [1.0, 0.5, 0.25]), 10, 1.0),
                (u(4, 19, [14], [1.0]), 11, 1.0)],
        "logq": [-1.2, -0.8, -1.5, -1.0],
        "neg": (14, -2.0),
        "pairs": {2: 12, 3: 13},
        "feedback": [(u(1, 25, [10], [1.0]), 14, 1.0),
                     (u(3, 33, [13, 14], [1.0, 0.5]), 11, 3.0)],
    },
    {   # item 12 is the positive of rows 0 and 1 (masked for each other); the global negative
        # 14 is row 2's positive (masked for row 2); one feedback row, on item 12.
        "pos": [(u(2, 41, [13, 12], [1.0, 0.5]), 12, 1.0),
                (u(1, 25, [12, 10, 11], [1.0, 0.5, 0.25]), 12, 2.0),
                (u(4, 19, [11, 14], [1.0, 0.5]), 14, 0.5),
                (u(3, 33, [10], [1.0]), 11, 1.0)],
        "logq": [-0.9, -0.9, -1.3, -1.1],
        "neg": (14, -1.7),
        "pairs": {2: 13, 3: 12},
        "feedback": [(u(4, 19, [11], [1.0]), 12, 2.0)],
    },
    {   # three pairs (item 12 twice: two columns); an unknown history id (row 0), an empty
        # history (row 0); three feedback rows, one on item 15, outside the vocabulary (row 0).
        "pos": [(u(3, 33, [99, 13], [1.0, 0.5]), 14, 1.0),
                (u(1, 25, [], []), 10, 1.0),
                (u(2, 41, [12, 14], [1.0, 0.5]), 11, 1.0),
                (u(4, 19, [14, 11, 10], [1.0, 0.5, 0.25]), 13, 1.0)],
        "logq": [-1.4, -1.0, -0.7, -1.2],
        "neg": (12, -1.9),
        "pairs": {0: 12, 1: 13, 2: 12},
        "feedback": [(u(2, 41, [12], [1.0]), 10, 0.5),
                     (u(1, 25, [], []), 15, 1.0),
                     (u(3, 33, [13, 14, 10], [1.0, 0.5, 0.25]), 14, 1.5)],
    },
]


def softplus(z):
    return float(np.logaddexp(0.0, z))


def layout(bt):
    """The batch as crates/train's `Batch` holds it (see the module docstring)."""
    b, nf = len(bt["pos"]), len(bt["feedback"])
    users = [p[0] for p in bt["pos"]] + [f[0] for f in bt["feedback"]]
    items = [p[1] for p in bt["pos"]] + [bt["neg"][0]]
    logq = list(bt["logq"]) + [bt["neg"][1]]
    owner = [-1] * (b + 1)
    pairs = [-1] * b
    for row in sorted(bt["pairs"]):
        pairs[row] = len(items)
        items.append(bt["pairs"][row])
        logq.append(PAIR_LOGQ)
        owner.append(I32_MAX)
    for r, f in enumerate(bt["feedback"]):
        items.append(f[1])
        logq.append(FEEDBACK_LOGQ)
        owner.append(b + r)
    weights = [p[2] for p in bt["pos"]] + [f[2] for f in bt["feedback"]]
    c = len(items)
    # The positions crates/train reads: row b + r's disliked item is column c - F + r, the pair
    # columns are just before the feedback ones.
    for r, f in enumerate(bt["feedback"]):
        assert items[c - nf + r] == f[1] and users[b + r] is f[0]
    paired = len(bt["pairs"])
    assert all(c - nf - paired <= j < c - nf for j in pairs if j >= 0)
    return {"users": users, "items": items, "logq": logq, "weights": weights, "owner": owner,
            "feedback": nf, "paired": paired, "pairs": pairs}


def make_loss(models, variant=None):
    """The batch loss (float64) of the module docstring; `variant` names another reading of
    the docs (used only to show that the fixture tells them apart)."""

    def uvecs(xs):
        return tower_ref.embed_batch(models["user"], xs)

    def ivecs(ids):
        return tower_ref.embed_batch(models["item"], [{"item_id": i} for i in ids])

    def loss(bt):
        pos_users = uvecs([p[0] for p in bt["pos"]])
        pos_items = [p[1] for p in bt["pos"]]
        vp = ivecs(pos_items)
        neg_item, neg_logq = bt["neg"]
        vn = ivecs([neg_item])[0]
        w = np.array([p[2] for p in bt["pos"]])
        wbar = w / w.sum()
        b = len(pos_items)
        pair_rows = sorted(bt["pairs"])
        vpair = ivecs([bt["pairs"][r] for r in pair_rows]) if pair_rows else np.zeros((0, 3))
        fb = bt["feedback"]
        vd = ivecs([f[1] for f in fb])
        ud = uvecs([f[0] for f in fb])
        # In-batch softmax with logQ over each row's candidates.
        main = 0.0
        for i in range(b):
            ui = pos_users[i]
            logits = [ui @ vp[i] / T - bt["logq"][i]]
            for j in range(b):
                if j != i and pos_items[j] != pos_items[i]:
                    logits.append(ui @ vp[j] / T - bt["logq"][j])
            if neg_item != pos_items[i]:
                logits.append(ui @ vn / T - neg_logq)
            if variant == "pair_in_own_softmax" and i in bt["pairs"]:
                logits.append(ui @ vpair[pair_rows.index(i)] / T)
            if variant == "feedback_items_in_softmax":
                for r, f in enumerate(fb):
                    if f[1] != pos_items[i]:
                        logits.append(ui @ vd[r] / T - FEEDBACK_LOGQ)
            logits = np.array(logits)
            mx = logits.max()
            main += wbar[i] * (mx + np.log(np.exp(logits - mx).sum()) - logits[0])
        # Debiasing pairs: BPR of the row's positive over its pair item.
        dt = DEBIAS["temperature"] if variant != "softmax_temperature" else T
        dbar = wbar
        if variant == "debias_over_paired_rows":
            dbar = np.array([w[i] if i in bt["pairs"] else 0.0 for i in range(b)])
            dbar = dbar / dbar.sum()
        debias = 0.0
        for k, i in enumerate(pair_rows):
            sp, spop = pos_users[i] @ vp[i], pos_users[i] @ vpair[k]
            if variant == "pair_logq":
                sp, spop = sp - T * bt["logq"][i], spop - T * PAIR_LOGQ
            debias += dbar[i] * softplus(-(sp - spop) / dt)
        debias *= DEBIAS["weight"]
        # Negative feedback: sigmoid cross-entropy against label 0 on the disliked item.
        f = np.array([x[2] for x in fb])
        fbar = f / f.sum()
        if variant == "feedback_over_all_rows":
            fbar = f / (f.sum() + w.sum())
        nt = NF["temperature"] if variant != "softmax_temperature" else T
        neg = 0.0
        for r in range(len(fb)):
            neg += fbar[r] * softplus((ud[r] @ vd[r] - NF["margin"]) / nt)
        neg *= NF["weight"]
        if variant == "parts":
            return main, debias, neg
        return main + debias + neg

    return loss


def touched(bt):
    """The table rows the batch reads, per tensor (OOV row 0 included)."""
    uvoc = train_ref.USER_SPEC["features"][0]["vocabulary"]
    hvoc = train_ref.USER_SPEC["features"][2]["vocabulary"]
    ivoc = train_ref.ITEM_VOCAB
    lay = layout(bt)
    rows = {"user_id.embedding": set(), "history.embedding": set(), "item_id.embedding": set()}
    for x in lay["users"]:
        rows["user_id.embedding"].add(uvoc.index(str(x["user_id"])) + 1)
        ids = x["history"]["ids"][:3]
        for h in ids or [None]:
            rows["history.embedding"].add(hvoc.index(str(h)) + 1 if h is not None and str(h) in hvoc else 0)
    for i in lay["items"]:
        rows["item_id.embedding"].add(ivoc.index(str(i)) + 1 if str(i) in ivoc else 0)
    return rows


def main():
    # The initial weights of train_ref.py, rebuilt and checked against the stored file.
    rs = np.random.RandomState(20261128)
    init = {}
    for kind in ("user", "item"):
        for name, shape in train_ref.SHAPES[kind].items():
            init[f"{kind}/{name}"] = (rs.standard_normal(shape) * 0.5).astype(np.float32)
    with open(os.path.join(OUT, "init.safetensors"), "rb") as fh:
        assert fh.read() == train_ref.safetensors_bytes(init), "init.safetensors is train_ref.py's"
    for name, spec in (("user_spec.json", train_ref.USER_SPEC), ("item_spec.json", train_ref.ITEM_SPEC)):
        with open(os.path.join(OUT, name)) as fh:
            assert json.load(fh) == spec, name
    specs = {"user": train_ref.USER_SPEC, "item": train_ref.ITEM_SPEC}
    models, arrays = {}, {}
    for kind, spec in specs.items():
        tensors = {n: init[f"{kind}/{n}"] for n in train_ref.SHAPES[kind]}
        models[kind] = tower_ref.load_model_bytes(spec, train_ref.safetensors_bytes(tensors))
        arrays[kind] = train_ref.param_arrays(models[kind], spec)
        for n, a in arrays[kind].items():
            assert a.dtype == np.float64 and np.array_equal(a, init[f"{kind}/{n}"].astype(np.float64)), n

    loss = make_loss(models)
    # The fixture tells the readings apart: at the initial weights, each other reading of the
    # docs moves the first batch's loss (or, for a variant the first batch cannot see, some
    # batch's) by far more than the Rust test's tolerance of 1e-5.
    variants = ["pair_in_own_softmax", "feedback_items_in_softmax", "debias_over_paired_rows",
                "feedback_over_all_rows", "softmax_temperature", "pair_logq"]
    parts0 = [make_loss(models, "parts")(bt) for bt in BATCHES]
    print("each batch at the initial weights: softmax, debias, negative-feedback parts:")
    for p in parts0:
        print("  ", [round(float(x), 6) for x in p])
    for v in variants:
        alt = make_loss(models, v)
        d = max(abs(alt(bt) - loss(bt)) for bt in BATCHES)
        print(f"  reading {v}: max |loss - fixture's| over the batches = {d:.4g}")
        assert d > 1e-3, v

    state = {k: {n: (np.zeros_like(a), np.zeros_like(a)) for n, a in arrays[k].items()} for k in arrays}
    losses = []
    h = 1e-6
    for t, bt in enumerate(BATCHES, start=1):
        losses.append(loss(bt))
        grads = {}
        for kind in arrays:
            for n, a in arrays[kind].items():
                g = np.zeros_like(a)
                for idx in np.ndindex(a.shape):
                    orig = a[idx]
                    a[idx] = orig + h
                    lp = loss(bt)
                    a[idx] = orig - h
                    lm = loss(bt)
                    a[idx] = orig
                    g[idx] = (lp - lm) / (2 * h)
                grads[(kind, n)] = g
        assert all(np.abs(g).max() > 1e-6 for g in grads.values()), "every tensor has a gradient"
        rows = touched(bt)
        # A row read without a gradient would make "rows read" and "rows with a gradient"
        # differ for lazy Adam unless its moments are zero (then its update is 0 either way).
        # (Batch 3's unknown item 15, row 0, is such a row: every ReLU unit of the item tower
        # is off for it, its vector is the last bias's direction; its row was never read before.)
        for n, sel in rows.items():
            kind = "item" if n.startswith("item") else "user"
            for r in sel:
                if np.abs(grads[(kind, n)][r]).max() <= 1e-12:
                    assert not state[kind][n][0][r].any(), (t, n, r)
                    print(f"  step {t}: {kind}/{n} row {r} read, zero gradient, zero moments")
        for kind in arrays:
            for n, a in arrays[kind].items():
                g = grads[(kind, n)]
                m, v = state[kind][n]
                if n.endswith(".embedding"):
                    lr, sel = SPARSE_LR, sorted(rows[n])
                else:
                    lr, sel = LR, None
                train_ref.adam_step(a, g, m, v, t, lr, sel)
    result = {
        "options": {"lr": LR, "sparse_lr": SPARSE_LR, "temperature": T, "negatives": 1,
                    "negative_feedback": NF, "debias": DEBIAS},
        "batches": [layout(bt) for bt in BATCHES],
        "losses": losses,
        "after": {f"{k}/{n}": a.ravel().tolist() for k in arrays for n, a in arrays[k].items()},
    }
    with open(os.path.join(OUT, "steps_objectives.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("losses", [float(x) for x in losses])


if __name__ == "__main__":
    main()
