#!/usr/bin/env python3
"""Negative feedback in recall on MovieLens-100k (part of `make bench`; alone:
`python3 bench/movielens_feedback.py`, after `make demo` or with TT_SKIP_LOAD unset).

The protocol (issue 29):
- per user, ratings sorted by time (ties in file order); the first 80 % train, the last 20 %
  test; ratings >= 4 are positive feedback, <= 2 negative feedback, 3 neither;
- POS@50: recall@50 of the held-out positive items, over users with one; NEG@50: recall@50 of
  the held-out negative ones (lower is better), over users with one; the user's training items
  are masked; exact ranking over every item (and through the index, for the test);
- (a) the demo's model trained on every rating as a positive, (b) the same model on the positive
  ratings only, (c) the negative-feedback objective (label column, `negative_feedback`), (d) (c)
  with the negative feedback also as a feature (a history of the user's disliked items, fixed
  beforehand: 20 items, decay 0.97 per position; not tuned), (e) (b) with the negative feedback
  as hard negatives of the softmax (`hard_negatives`, `hard_per_row` tuned like (c)).
Tuning on validation only: the last 20 % of each user's training ratings validate (models
trained on the first 80 % of them); (c)'s setting is the one with the lowest validation NEG@50
among those whose validation POS@50 is no lower than (b)'s (the highest POS@50 when none).
Then each kept configuration is trained on the whole training part with TT_SEEDS seeds
(default 3) and the test is touched once per seed. Prints markdown tables.
"""

import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from movielens import psql  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

with open(os.path.join(ROOT, "scripts", "movielens-options.json")) as f:
    BASE = json.load(f)

# (c)'s settings, tried on validation.
GRID = [{"weight": w, "margin": m, "temperature": 0.1} for w in (0.3, 1.0, 3.0) for m in (0.0, 0.3)]


SETUP = """
DROP TABLE IF EXISTS nf_ranked, nf_train, nf_test, nf_fit, nf_valid CASCADE;
CREATE TABLE nf_ranked AS
  SELECT r.seq, r.user_id, r.item_id, r.ts,
         CASE WHEN r.rating >= 4 THEN 1 WHEN r.rating <= 2 THEN -1 ELSE 0 END AS label,
         row_number() OVER (PARTITION BY r.user_id ORDER BY r.ts, r.seq) AS pos,
         count(*) OVER (PARTITION BY r.user_id) AS n
    FROM ml_ratings r;
-- Train: the first 80 % of each user's ratings; inside it, the first 80 % fit and the rest
-- validates. Tables in file order (the tie rule).
CREATE TABLE nf_train AS SELECT seq, user_id, item_id, ts, label FROM nf_ranked
  WHERE pos <= floor(0.8 * n) ORDER BY seq;
CREATE TABLE nf_test AS SELECT seq, user_id, item_id, ts, label FROM nf_ranked
  WHERE pos > floor(0.8 * n) ORDER BY seq;
CREATE TABLE nf_fit AS SELECT seq, user_id, item_id, ts, label FROM nf_ranked
  WHERE pos <= floor(0.8 * floor(0.8 * n)) ORDER BY seq;
CREATE TABLE nf_valid AS SELECT seq, user_id, item_id, ts, label FROM nf_ranked
  WHERE pos > floor(0.8 * floor(0.8 * n)) AND pos <= floor(0.8 * n) ORDER BY seq;
-- (b)'s sources: the positive ratings only.
CREATE VIEW nf_train_pos AS SELECT * FROM nf_train WHERE label > 0;
CREATE VIEW nf_fit_pos AS SELECT * FROM nf_fit WHERE label > 0;
-- (e)'s hard negatives: the negative ratings.
CREATE VIEW nf_train_neg AS SELECT user_id, item_id FROM nf_train WHERE label < 0;
CREATE VIEW nf_fit_neg AS SELECT user_id, item_id FROM nf_fit WHERE label < 0;
ANALYZE nf_train, nf_test, nf_fit, nf_valid;
SELECT (SELECT count(*) FROM nf_train) || ' ' || (SELECT count(*) FROM nf_test) || ' ' ||
       (SELECT count(*) FROM nf_train WHERE label > 0) || ' ' || (SELECT count(*) FROM nf_train WHERE label < 0) || ' ' ||
       (SELECT count(*) FROM nf_test WHERE label > 0) || ' ' || (SELECT count(*) FROM nf_test WHERE label < 0);
"""


# (d)'s feature: the user's negative feedback as a history, next to the demo's features.
NEG_HISTORY = {"name": "disliked", "type": "history", "max_len": 20, "decay": {"position": 0.97},
               "feedback": "negative"}


def with_negative_history(over):
    user = json.loads(json.dumps(BASE["user"]))
    user["features"].append(NEG_HISTORY)
    return dict(over, user=user)


def run(variant, part, over, seed):
    """Trains one variant on `part` ('fit' or 'train'), evaluates on the following part; returns
    {(method, metric, k): value} and the query counts."""
    name = f"nf_{variant}"
    cfg = json.loads(json.dumps(BASE))
    cfg.update(over)
    cfg["seed"] = seed
    opts = json.dumps(cfg).replace("'", "''")
    target = "nf_valid" if part == "fit" else "nf_test"
    if variant == "a":
        src, label = f"nf_{part}", ""
    elif variant == "e":
        src, label = f"nf_{part}_pos", f", hard_negatives => 'nf_{part}_neg'"
    elif variant == "b":
        src, label = f"nf_{part}_pos", ""
    else:
        src, label = f"nf_{part}", ", label_column => 'label'"
    via = "false" if part == "fit" else "true"
    out = psql(f"""
SET client_min_messages = warning;
SELECT count(*) FROM (SELECT twotower.drop_model(name) FROM twotower.models
                       WHERE name IN ('{name}_user', '{name}_item') GROUP BY name) d;
SELECT count(*) FROM twotower.train('{name}_user', '{name}_item', '{src}', '{opts}',
       user_features => 'ml_users', item_features => 'ml_items', time_column => 'ts'{label});
DROP TABLE IF EXISTS {name}_v, {name}_q, {name}_qn;
CREATE TABLE {name}_v (id bigint PRIMARY KEY, embedding real[]);
SELECT count(*) FROM twotower.refresh_item_vectors('{name}_item', 'ml_items', '{name}_v', id_column => 'item_id');
CREATE INDEX {name}_v_idx ON {name}_v USING twotower_hnsw (embedding real_cosine_ops);
-- Each user's features at the end of the training part (their history from the model's own
-- source), one row per held-out item.
CREATE TABLE {name}_q AS
  WITH u AS (SELECT DISTINCT user_id FROM {target})
  SELECT t.user_id, f.features, t.item_id::bigint AS target
    FROM {target} t JOIN (SELECT user_id, twotower.user_features('{name}_user', user_id::text) AS features FROM u) f
      USING (user_id)
   WHERE t.label > 0;
CREATE TABLE {name}_qn AS
  WITH u AS (SELECT DISTINCT user_id FROM {target})
  SELECT t.user_id, f.features, t.item_id::bigint AS target
    FROM {target} t JOIN (SELECT user_id, twotower.user_features('{name}_user', user_id::text) AS features FROM u) f
      USING (user_id)
   WHERE t.label < 0;
SELECT method || ':' || metric || ':' || k || ':' || value || ':' || queries
  FROM twotower.evaluate('{name}_user', '{name}_v_idx', '{name}_q', seen => 'nf_{part}', k => '{{50}}',
                         via_index => {via}, negative_queries => '{name}_qn');
""")
    res = {}
    for line in out.strip().splitlines():
        p = line.split(":")
        if len(p) == 5:
            res[(p[0], p[1], int(p[2]))] = float(p[3])
            res[(p[0], p[1] + "_users", int(p[2]))] = int(p[4])
    return res


def main():
    if os.environ.get("TT_SKIP_LOAD") != "1":
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "movielens.sh")], check=True,
                       stdout=subprocess.DEVNULL)
    counts = psql(SETUP).strip().splitlines()[-1].split()
    print("# Negative feedback on MovieLens-100k: 80/20 by time per user, >= 4 positive, <= 2 negative")
    print()
    print(f"Training ratings {counts[0]} ({counts[2]} positive, {counts[3]} negative); test ratings "
          f"{counts[1]} ({counts[4]} positive, {counts[5]} negative).")
    print()
    seed0 = BASE["seed"]
    print("Validation (models on the first 80 % of each user's training ratings, exact ranking):")
    print()
    print("| variant | POS@50 | NEG@50 |")
    print("|---|---|---|")
    va = run("a", "fit", {}, seed0)
    vb = run("b", "fit", {}, seed0)
    for tag, r in (("(a) all ratings as positives", va), ("(b) positive ratings only", vb)):
        print(f"| {tag} | {r[('exact', 'recall', 50)]:.4f} | {r[('exact', 'neg_recall', 50)]:.4f} |", flush=True)
    tried = []
    for g in GRID:
        r = run("c", "fit", {"negative_feedback": g}, seed0)
        tried.append((g, r))
        print(f"| (c) negative feedback {json.dumps(g)} | {r[('exact', 'recall', 50)]:.4f} | "
              f"{r[('exact', 'neg_recall', 50)]:.4f} |", flush=True)
    floor = vb[("exact", "recall", 50)]
    ok = [t for t in tried if t[1][("exact", "recall", 50)] >= floor]
    if ok:
        kept = min(ok, key=lambda t: t[1][("exact", "neg_recall", 50)])[0]
        why = "the lowest validation NEG@50 with POS@50 no lower than (b)'s"
    else:
        kept = max(tried, key=lambda t: t[1][("exact", "recall", 50)])[0]
        why = "no setting kept (b)'s validation POS@50: the highest POS@50"
    r = run("d", "fit", with_negative_history({"negative_feedback": kept}), seed0)
    print(f"| (d) (c) kept + the negative history feature | {r[('exact', 'recall', 50)]:.4f} | "
          f"{r[('exact', 'neg_recall', 50)]:.4f} |", flush=True)
    tried_e = []
    for h in (2, 8):
        r = run("e", "fit", {"hard_per_row": h}, seed0)
        tried_e.append((h, r))
        print(f"| (e) positives, negative feedback as hard negatives, hard_per_row {h} | "
              f"{r[('exact', 'recall', 50)]:.4f} | {r[('exact', 'neg_recall', 50)]:.4f} |", flush=True)
    ok_e = [t for t in tried_e if t[1][("exact", "recall", 50)] >= floor]
    kept_e = (min(ok_e, key=lambda t: t[1][("exact", "neg_recall", 50)]) if ok_e
              else max(tried_e, key=lambda t: t[1][("exact", "recall", 50)]))[0]
    print()
    print(f"(c) kept: {json.dumps(kept)} ({why}). (e) kept: hard_per_row {kept_e} (the same rule).")
    print()
    seeds = [seed0 + i for i in range(int(os.environ.get("TT_SEEDS", "3")))]
    print(f"Test (models on the whole training part, seeds {seeds}, test touched once per seed; "
          "mean ± spread (max − min) over the seeds):")
    print()
    print("| variant | POS@50 | NEG@50 | POS@50 through the index | NEG@50 through the index | users (pos / neg) |")
    print("|---|---|---|---|---|---|")
    for tag, variant, over in (("(a) all ratings as positives", "a", {}),
                               ("(b) positive ratings only", "b", {}),
                               ("(c) negative feedback", "c", {"negative_feedback": kept}),
                               ("(d) (c) + the negative history feature", "d",
                                with_negative_history({"negative_feedback": kept})),
                               ("(e) (b) + negative feedback as hard negatives", "e", {"hard_per_row": kept_e})):
        rs = [run(variant, "train", over, s) for s in seeds]

        def cell(key):
            xs = [r[key] for r in rs]
            return f"{statistics.mean(xs):.4f} ± {max(xs) - min(xs):.4f}"
        users = f"{int(rs[0][('exact', 'recall_users', 50)])} / {int(rs[0][('exact', 'neg_recall_users', 50)])}"
        print(f"| {tag} | {cell(('exact', 'recall', 50))} | {cell(('exact', 'neg_recall', 50))} | "
              f"{cell(('index', 'recall', 50))} | {cell(('index', 'neg_recall', 50))} | {users} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
